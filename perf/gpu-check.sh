#!/usr/bin/env bash
# Every GPU check in one command, for a lent GPU machine that has no Rust toolchain.
#
#   perf/gpu-check.sh prepare        # here: build and gather what the GPU machine runs into .gpu/
#   perf/gpu-check.sh run [OUT]      # there, with .gpu/ carried (stripped, about 40 MiB): run it
#                                    # all, writing OUT/*.txt
#
# `run`, in order, each step's output in its own file under OUT (default ./gpu-check-out):
#   1. tensor-wasm doctor --require-gpu: the driver, NVRTC, cuBLAS, every device's SM, the
#      kernels compiled for it and a tiny add, softmax and matmul checked against float64;
#   2. the dispatch crate's op tests (tests/ops.rs, tests/general.rs) with
#      TENSOR_WASM_REQUIRE_CUDA=1, so a missing device fails instead of skipping;
#   3. the dispatch latency bench (tiny add P50/P95/P99, idle and with other shards submitting;
#      sgemm throughput), DISPATCH_BENCH_ITERS samples per case (default 20,000).
# It stops at the first failure and exits with its status. The numbers go to perf/DISPATCH.md
# with the machine named.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
mode=${1:-}

case $mode in
  prepare)
    mkdir -p .gpu/bin .gpu/tests .git/info
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo /.gpu/ >> .git/info/exclude
    cargo build --release -p tensor-wasm --bin tensor-wasm
    strip -o .gpu/bin/tensor-wasm target/release/tensor-wasm
    # The test and bench executables, found by name in cargo's own report of what it built.
    executables() {
      cargo "$@" --no-run --message-format=json -p tensor-wasm-dispatch 2>/dev/null |
        python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] != ["lib"]:
        print(m["target"]["name"], m["executable"])'
    }
    executables test --release --test ops --test general | while read -r name exe; do strip -o ".gpu/tests/$name" "$exe"; done
    executables bench --bench dispatch_latency | while read -r name exe; do strip -o ".gpu/tests/$name" "$exe"; done
    ls -la .gpu/bin .gpu/tests
    du -sh .gpu
    ;;
  run)
    out=${2:-gpu-check-out}
    mkdir -p "$out"
    [ -x .gpu/bin/tensor-wasm ] || { echo "carry .gpu/ (perf/gpu-check.sh prepare) first" >&2; exit 2; }
    step() { # name, command...
      local name=$1; shift
      echo "== $name: $*"
      "$@" 2>&1 | tee "$out/$name.txt"
      return "${PIPESTATUS[0]}"
    }
    step doctor .gpu/bin/tensor-wasm doctor --require-gpu --data-dir "$out/doctor-data"
    export TENSOR_WASM_REQUIRE_CUDA=1
    step ops .gpu/tests/ops
    step general .gpu/tests/general
    step dispatch-latency .gpu/tests/dispatch_latency --bench
    echo "== all GPU checks passed; outputs in $out"
    ;;
  *)
    echo "usage: perf/gpu-check.sh prepare | run [OUT]" >&2
    exit 2
    ;;
esac
