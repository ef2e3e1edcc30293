#!/usr/bin/env bash
# Soak: a release server under the mixed workload (invokes while functions are deployed and
# deleted beside them: the deploy-storm scenario) at a fixed rate for MINUTES one-minute windows,
# on one server that is never restarted. After each window: the window's P99 and errors (from the
# harness), and the server's RSS, anonymous memory and open file descriptors (from /proc). Two
# columns tell a stalled machine from a slow server: the load generator's own lag P99 (it runs
# beside the server and is late when the machine is), and the share of CPU time the hypervisor
# stole (/proc/stat).
#
#   perf/soak.sh [OUT_DIR]
#
# Env: RATE (default 9000: 70% of deploy-storm's best step rate on the 2-vCPU VM, perf/HISTORY.md run B),
#      MINUTES (default 10), CONNECTIONS (32), THREADS (the generator's, 1), BIN_DIR (a folder
#      holding tensor-wasm and tensor-wasm-bench, for a machine without a Rust toolchain; by
#      default they are built), SERVER_ARGS (more flags for the server, e.g. audit retention on a
#      fast machine). Loopback only; every run stops by itself.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=${1:-perf/results/soak-$(date -u +%F)-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
rate=${RATE:-9000}
minutes=${MINUTES:-10}
connections=${CONNECTIONS:-32}
mkdir -p "$out"
threads=${THREADS:-1}
if [ -n "${BIN_DIR:-}" ]; then
  bin=$BIN_DIR
else
  cargo build --release --workspace --bins >&2
  bin=target/release
fi
data=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$bin/tensor-wasm" serve --listen "127.0.0.1:$port" --data-dir "$data" --log-level warn ${SERVER_ARGS:-} >"$out/server.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -rf "$data"' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done

steal_ticks() { # the machine's stolen and total CPU ticks so far (/proc/stat)
  awk '/^cpu /{t=0; for(i=2;i<=NF;i++) t+=$i; print $9, t}' /proc/stat
}
sample() { # RSS MiB, anonymous MiB, open fds
  awk '/^VmRSS:/{r=$2} /^RssAnon:/{a=$2} END{printf "%.1f %.1f", r/1024, a/1024}' "/proc/$pid/status"
  printf ' %s\n' "$(ls "/proc/$pid/fd" | wc -l)"
}
echo "| minute | offered/s | answered/s | P50 µs | P99 µs | max µs | errors | deploys | generator lag P99 µs | CPU stolen % | RSS MiB | anonymous MiB | open fds |" >"$out/soak.md"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |" >>"$out/soak.md"
echo "| 0 | - | - | - | - | - | - | - | - | - | $(sample | awk '{print $1" | "$2" | "$3}') |" >>"$out/soak.md"
status=0
for minute in $(seq "$minutes"); do
  read -r steal0 total0 < <(steal_ticks)
  "$bin/tensor-wasm-bench" --server "http://127.0.0.1:$port" --scenario deploy-storm \
    --rate "$rate" --duration 60s --warmup 1s --connections "$connections" --threads "$threads" --quiet \
    --out "$out/minute-$minute" >/dev/null || status=$?
  [ "$status" -ne 2 ] || { echo "perf/soak.sh: minute $minute failed to run" >&2; exit 2; }
  row=$(python3 - "$out/minute-$minute/results.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))["measurements"][0]
storm = m.get("storm") or {}
errors = m["io_errors"] + m["unsent"] + sum(n for s, n in m["statuses"].items() if not s.startswith("2")) + storm.get("failed", 0)
l = m["latency"]
print(f'{m["offered_rate"]:.0f} | {m["achieved_rate"]:.0f} | {l["p50_us"]:.0f} | {l["p99_us"]:.0f} | {l["max_us"]:.0f} | {errors} | {storm.get("deploys", 0)} | {m["generator_lag_p99_us"]:.0f}')
PY
)
  read -r steal1 total1 < <(steal_ticks)
  stolen=$(awk -v s="$((steal1 - steal0))" -v t="$((total1 - total0))" 'BEGIN{printf "%.1f", t ? 100 * s / t : 0}')
  echo "| $minute | $row | $stolen | $(sample | awk '{print $1" | "$2" | "$3}') |" >>"$out/soak.md"
  tail -1 "$out/soak.md" >&2
done
cat "$out/soak.md"
