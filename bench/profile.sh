#!/usr/bin/env bash
# Where letterbox spends its time on the benchmark's headline load (20
# sessions, 4 KiB, 1 recipient): perf's cpu-clock sampler (this machine has
# no hardware counters) for CPU, and strace -c for syscall counts and time.
# Run bench/run.sh first: it provisions the SQLite directory reused here.
#   bench/profile.sh [MESSAGES_PER_SESSION]
set -euo pipefail
cd "$(dirname "$0")/.."
per=${1:-300}
work=/var/tmp/letterbox-bench/sqlite
config=$work/letterbox.toml
[[ -f $config ]] || { echo "no $config: run bench/run.sh first" >&2; exit 1; }
command -v perf >/dev/null || apt-get install -y -qq linux-perf strace >/dev/null
binary=${CARGO_TARGET_DIR:-$PWD/target}/release/letterbox
out=$(mktemp -d)

load() {
    for s in $(seq 0 19); do
        smtp-source -l 4096 -m "$per" -f sender@client.test -t "$s@bench.test" \
            -M client.test "127.0.0.1:$port" &
    done
    wait
}

"$binary" --config "$config" serve >"$out/stdout" 2>"$out/stderr" &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -rf "$out"' EXIT
until grep -q '^letterbox: ready' "$out/stdout"; do sleep 0.05; done
port=$(sed -n 's/^letterbox: smtp listening on .*:\([0-9]*\)$/\1/p' "$out/stdout" | head -1)

perf record -q -e cpu-clock -F 2000 -g -p "$pid" -o "$out/perf.data" 2>/dev/null &
rec=$!
sleep 0.3
load
kill -INT $rec; wait $rec 2>/dev/null || true
echo "== CPU by syscall (children, % of samples)"
perf report -i "$out/perf.data" --children --sort sym -g none 2>/dev/null |
    grep -E '__x64_sys_' | head -15
echo "== CPU by function (self)"
perf report -i "$out/perf.data" --no-children --sort dso,sym -g none 2>/dev/null |
    grep -v '^#' | grep -v '^$' | head -25

strace -c -f -p "$pid" -o "$out/strace.txt" 2>/dev/null &
st=$!
sleep 0.3
load
kill -INT $st; wait $st 2>/dev/null || true
echo "== syscalls for $((20 * per)) messages (strace -c; strace slows everything down)"
head -25 "$out/strace.txt"
