#!/usr/bin/env bash
# Starts dnsmasq as the benchmark's DNS server: the sender domain's SPF
# and DMARC records, and an empty DNS blocklist zone, answered from its
# config alone (nothing forwarded, nothing leaves the machine).
#
# It serves `test` as an authoritative zone, as the real servers of a
# sender's domain and of a blocklist do: answers carry a 300 s TTL, and
# "no such name" carries the zone's SOA, whose 300 s negative TTL lets a
# resolver cache it (RFC 2308). dnsmasq's plain local records have TTL 0
# and its local NXDOMAIN no SOA, so nothing could be cached and every
# message paid three uncached lookups that no real zone imposes.
#   bench/dns.sh DIR PORT [LINE…]    stop it with: kill "$(cat DIR/dnsmasq.pid)"
# Each LINE is added to its dnsmasq.conf (harness.py --submission adds the
# remote domain's MX record).
set -euo pipefail
dir=$1 port=$2
shift 2
[[ -x /usr/sbin/dnsmasq ]] || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dnsmasq-base >/dev/null
}
rm -rf "$dir" && mkdir -p "$dir"
cat >"$dir/dnsmasq.conf" <<CONF
port=$port
listen-address=127.0.0.1
bind-interfaces
no-resolv
no-hosts
pid-file=$dir/dnsmasq.pid
auth-server=ns.bench.test,127.0.0.1
auth-zone=test
auth-soa=1,hostmaster.bench.test,1200,120,604800
auth-ttl=300
txt-record=client.test,"v=spf1 ip4:127.0.0.1 -all"
txt-record=_dmarc.client.test,"v=DMARC1; p=reject"
CONF
if (($#)); then printf '%s\n' "$@" >>"$dir/dnsmasq.conf"; fi
/usr/sbin/dnsmasq --conf-file="$dir/dnsmasq.conf"
echo "127.0.0.1:$port"
