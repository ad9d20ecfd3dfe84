#!/usr/bin/env bash
# Where letterbox spends its time on the benchmark's headline load (20
# sessions, 4 KiB, 1 recipient): perf's cpu-clock sampler (this machine has
# no hardware counters) for CPU, and strace -c for syscall counts and time.
# Run bench/run.sh first: it provisions the SQLite directory reused here.
#   bench/profile.sh [MESSAGES_PER_SESSION]
set -euo pipefail
cd "$(dirname "$0")/.."
per=${1:-600}
# LETTERBOX_BENCH_WORK: another server dir bench/run.sh provisioned
# (`base` for a --baseline binary); LETTERBOX_BENCH_BINARY: that binary.
work=${LETTERBOX_BENCH_WORK:-/var/tmp/letterbox-bench/sqlite}
config=$work/letterbox.toml
[[ -f $config ]] || { echo "no $config: run bench/run.sh first" >&2; exit 1; }
# As bench/run.sh does, wait until the inodes its last run freed may be
# reused (Graveyard in harness.py): until then every create walks past them.
stamp=/var/tmp/letterbox-bench-graveyard.freed
if [[ -f $stamp ]]; then
    age=$(($(date +%s) - $(stat -c %Y "$stamp")))
    if ((age < 365)); then
        echo "waiting $((365 - age)) s for the inodes the last benchmark freed to age"
        sleep $((365 - age))
    fi
fi
command -v perf >/dev/null || apt-get install -y -qq linux-perf strace >/dev/null
binary=${LETTERBOX_BENCH_BINARY:-${CARGO_TARGET_DIR:-$PWD/target}/release/letterbox}
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

# System-wide, over a fixed window inside the load: `perf record -p` with
# call graphs stalled for minutes on this kernel, and much of a message's
# cost is outside the server anyway (smtp-source, kworkers, interrupts).
# tokio names its blocking-pool threads tokio-rt-worker too.
switches() {
    # A thread may end while this reads it (the blocking pool shrinks).
    for t in /proc/$pid/task/*; do
        echo "$(cat "$t/comm" 2>/dev/null) $(awk '/voluntary_ctxt_switches/ { s += $2 } END { print s + 0 }' "$t/status" 2>/dev/null)"
    done | awk 'NF == 2' || true
}
switches >"$out/switches.before"
load &
loader=$!
sleep 0.5
timeout -s INT 2 perf record -q -a -g -e cpu-clock -o "$out/perf.data" >/dev/null 2>&1 || true
wait $loader
switches >"$out/switches.after"
# head closes the reports' pipes early; that is not a failure.
set +o pipefail
echo "== CPU by process (% of all samples, both cores)"
perf report -i "$out/perf.data" --no-children --sort comm,dso -g none 2>/dev/null |
    grep -v '^#' | grep -v '^$' | head -12
echo "== letterbox: CPU by syscall (children, % of all samples)"
perf report -i "$out/perf.data" --comm tokio-rt-worker --children --sort sym -g none 2>/dev/null |
    grep -E '__x64_sys_|asm_common_interrupt' | head -15
echo "== letterbox: CPU by function (self)"
perf report -i "$out/perf.data" --comm tokio-rt-worker --no-children --sort dso,sym -g none 2>/dev/null |
    grep -v '^#' | grep -v '^$' | head -25
echo "== letterbox: context switches per message, by thread name"
awk -v n=$((20 * per)) '
    FNR == NR { before[$1] += $2; next }
    { after[$1] += $2 }
    END { for (k in after) printf "%-16s %.1f\n", k, (after[k] - before[k]) / n }' \
    "$out/switches.before" "$out/switches.after"

strace -c -f -p "$pid" -o "$out/strace.txt" 2>/dev/null &
st=$!
sleep 0.3
load
kill -INT $st; wait $st 2>/dev/null || true
echo "== syscalls for $((20 * per)) messages (strace -c; strace slows everything down)"
head -25 "$out/strace.txt"
