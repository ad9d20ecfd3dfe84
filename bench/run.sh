#!/usr/bin/env bash
# The benchmark, in one command: letterbox against Postfix, smtp-sink and the
# disk's own ceiling (bench/fsync_ceiling.rs) on the same machine, same
# loads, one interleaved run. Writes bench/RESULTS.md and
# bench/throughput.png and prints the table.
#
#   bench/run.sh            the full matrix, 2 repetitions (about 15 minutes)
#   bench/run.sh --quick    a quarter of the messages, for a first look
#   bench/run.sh --reps 3 --loads 20s-4K-1r --only letterbox,postfix
#   bench/run.sh --submission --reps 3
#                           instead of the matrix, issue #14's load: 20
#                           sessions log in on a submission port (STARTTLS,
#                           AUTH PLAIN) and send 4 KiB messages to a remote
#                           domain, delivered through the queue to a sink on
#                           127.0.0.2 (bench/submit_load.rs); letterbox with
#                           and without DKIM against a private Postfix
#                           instance (Dovecot SASL, OpenDKIM milter) with
#                           and without. Its results replace only the
#                           submission part of results.json; the system
#                           Postfix is left alone.
#
# Needs root (Postfix is configured system-wide: see postfix-peer.sh) and
# Debian 12's packages below; installs what is missing. Stops Postfix at
# the end. PostgreSQL is used when LETTERBOX_BENCH_POSTGRES (an admin URL)
# is set or one answers on 127.0.0.1:5432.
set -euo pipefail
cd "$(dirname "$0")/.."

# /usr/bin/python3: Debian's, which sees python3-matplotlib (a pyenv python would not).
packages=(postfix postfix-sqlite sqlite3 python3 python3-matplotlib postgresql-client)
submission=false
if [[ " $* " == *" --submission "* ]]; then
    submission=true
    packages+=(openssl dovecot-core opendkim python3-dkim dnsmasq-base)
fi
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

cargo build --release --quiet --bin letterbox --example fsync_ceiling --example submit_load
binary=${CARGO_TARGET_DIR:-$PWD/target}/release/letterbox
ceiling=${CARGO_TARGET_DIR:-$PWD/target}/release/examples/fsync_ceiling

# 10,000 idle connections need as many descriptors in the server and here.
ulimit -n "$(ulimit -Hn)"

if ! $submission; then   # --submission runs a private Postfix instance of its own
    bench/postfix-peer.sh 1000 >/dev/null
    postfix stop >/dev/null 2>&1 || true   # the harness starts it for its runs
    trap 'postfix stop >/dev/null 2>&1 || true' EXIT
fi

pg=${LETTERBOX_BENCH_POSTGRES:-}
if [[ -z $pg ]] && pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
    pg=postgres://postgres@127.0.0.1:5432/postgres
fi

/usr/bin/python3 bench/harness.py --binary "$binary" --work /var/tmp/letterbox-bench \
    --ceiling "$ceiling" --out bench ${pg:+--postgres "$pg"} "$@"
