#!/usr/bin/env bash
# Starts a private rspamd as a milter for the benchmark, the same setup as
# the tests' (tests/common/daemons.rs): Debian's rules, every path in its
# own directory, no DNS or network, the proxy worker scanning by itself.
# Prints its milter address (inet:127.0.0.1:PORT) once it listens.
#   bench/rspamd.sh DIR PORT       stop it with: kill "$(cat DIR/run/rspamd.pid)"
set -euo pipefail
dir=$1 port=$2
command -v rspamd >/dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rspamd >/dev/null
}
rm -rf "$dir" && mkdir -p "$dir"/{db,run,local.d,override.d}
printf 'org\ncom\nnet\nexample\ntest\n' >"$dir/tld.dat"
cat >"$dir/rspamd.conf" <<CONF
.include "\$CONFDIR/common.conf"
options {
    pidfile = "\$RUNDIR/rspamd.pid";
    filters = "chartable,dkim,regexp";
    url_tld = "$dir/tld.dat";
    hs_cache_dir = "\$DBDIR/";
    control_socket = "\$DBDIR/rspamd.sock mode=0600";
    stats_file = "\$DBDIR/stats.ucl";
    history_file = "\$DBDIR/rspamd.history";
    cache_file = "\$DBDIR/symbols.cache";
    dynamic_conf = "\$DBDIR/rspamd_dynamic";
    dns { nameserver = ["127.0.0.1:9"]; timeout = 0.2s; retransmits = 1; }
    task_timeout = 8s;
    disable_hyperscan = true;
}
logging { type = "file"; filename = "\$LOGDIR/rspamd.log"; level = "warning"; }
worker "rspamd_proxy" {
    bind_socket = "127.0.0.1:$port";
    milter = yes;
    timeout = 30s;
    count = 2;
    upstream "local" { default = yes; self_scan = yes; }
}
CONF
echo 'enabled = false;' >"$dir/override.d/fuzzy_check.conf"
printf 'use = ["x-spamd-result", "x-spam-status"];\nskip_local = false;\n' >"$dir/local.d/milter_headers.conf"
rspamd -i -u root -g root -c "$dir/rspamd.conf" --var="LOCAL_CONFDIR=$dir" --var="DBDIR=$dir/db" \
    --var="RUNDIR=$dir/run" --var="LOGDIR=$dir"
for _ in $(seq 1 600); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && { echo "inet:127.0.0.1:$port"; exit 0; }
    sleep 0.1
done
echo "rspamd did not listen on $port; see $dir/rspamd.log" >&2
exit 1
