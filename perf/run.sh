#!/usr/bin/env bash
# The whole performance suite on this machine, the GPU machine included. Writes every table into
# one folder and prints where.
#
#   perf/run.sh [OUT_DIR]
#
# Env: DURATION (measured seconds per rate, default 5), WARMUP (default 2), CONNECTIONS (32),
#      RATE (the fixed-rate pass, default 2000), SKIP_MICRO=1, SKIP_FIXED=1, SKIP_STEP=1,
#      SKIP_BASELINE=1, SKIP_SCALE=1 (to split the suite over several shorter runs),
#      SERVER_CPUS (e.g. 0-11: started servers run there, the harness on the other CPUs, with a
#      generator thread for each), SCALE_SCENARIO (the curve's guest: hello, the default, or json),
#      BIN_DIR and GUESTS_DIR (prebuilt release binaries and json-stats.wasm/tensor-ops.wasm, for
#      a machine without a toolchain; the micro-benchmarks then need cargo and are skipped).
# Needs: a Rust toolchain with the wasm32-wasip1 target, or BIN_DIR and GUESTS_DIR. Sends traffic
# to loopback only.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
out=${1:-perf/results/$(date -u +%F)-$(hostname)-$commit}
mkdir -p "$out"
duration=${DURATION:-5}
warmup=${WARMUP:-2}
connections=${CONNECTIONS:-32}
rate=${RATE:-2000}

common=(--duration "${duration}s" --warmup "${warmup}s" --connections "$connections")
if [ -n "${BIN_DIR:-}" ]; then
  bench=$BIN_DIR/tensor-wasm-bench
  common+=(--server-bin "$BIN_DIR/tensor-wasm" --baseline-bin "$BIN_DIR/tensor-wasm-baseline")
  [ -n "${GUESTS_DIR:-}" ] || { echo "perf/run.sh: BIN_DIR needs GUESTS_DIR too" >&2; exit 2; }
  command -v cargo >/dev/null || SKIP_MICRO=1
else
  rustup target add wasm32-wasip1 >/dev/null 2>&1 || true
  cargo build --release --workspace --bins
  bench=target/release/tensor-wasm-bench
fi
[ -z "${GUESTS_DIR:-}" ] || common+=(--guests-dir "$GUESTS_DIR")
[ -z "${SERVER_CPUS:-}" ] || common+=(--server-cpus "$SERVER_CPUS")

status=0
run() { # name, harness args...
  local name=$1
  shift
  echo "== $name" >&2
  "$bench" "${common[@]}" --out "$out/$name" "$@" >/dev/null || status=$?
  # Exit 1 is an SLO miss, recorded in the tables; 2 means the run itself failed.
  [ "$status" -ne 2 ] || { echo "perf/run.sh: the $name run failed" >&2; exit 2; }
}

if [ -z "${SKIP_MICRO:-}" ]; then
  echo "== micro-benchmarks" >&2
  {
    for b in request_path instantiate audit_append; do
      echo "### $b"
      echo
      cargo bench -q -p tensor-wasm-bench --bench "$b" 2>/dev/null | grep '^|'
      echo
    done
    echo "### dispatch_latency"
    echo
    cargo bench -q -p tensor-wasm-dispatch --bench dispatch_latency 2>/dev/null | grep '^|'
  } >"$out/micro.md"
fi

[ -n "${SKIP_FIXED:-}" ] || run fixed --rate "$rate"
[ -n "${SKIP_STEP:-}" ] || run step --step
[ -n "${SKIP_BASELINE:-}" ] || run baseline --scenario healthz,hello,json --baseline --rate "$rate"
[ -n "${SKIP_SCALE:-}" ] || run scale --scenario healthz --scale --scale-scenario "${SCALE_SCENARIO:-hello}" --rate "$rate"

{
  echo "# Performance run $(date -u +%F), commit $commit"
  echo
  echo "Command: \`perf/run.sh\` with DURATION=$duration WARMUP=$warmup CONNECTIONS=$connections RATE=$rate${SERVER_CPUS:+ SERVER_CPUS=$SERVER_CPUS}${SCALE_SCENARIO:+ SCALE_SCENARIO=$SCALE_SCENARIO}."
  echo
  [ -f "$out/micro.md" ] && { echo "## Micro-benchmarks"; echo; cat "$out/micro.md"; echo; }
  [ -f "$out/fixed/results.md" ] && { echo "## Fixed rate, every scenario"; echo; cat "$out/fixed/results.md"; echo; }
  [ -f "$out/step/results.md" ] && { echo "## Step search, every scenario"; echo; cat "$out/step/results.md"; echo; }
  [ -f "$out/baseline/results.md" ] && { echo "## Against the baseline"; echo; cat "$out/baseline/results.md"; echo; }
  [ -f "$out/scale/results.md" ] && { echo "## Scale"; echo; cat "$out/scale/results.md"; echo; }
} >"$out/README.md"
echo "perf/run.sh: the tables are in $out/README.md" >&2
exit "$status"
