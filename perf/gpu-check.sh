#!/usr/bin/env bash
# Every GPU check in one command, for a lent GPU machine that has no Rust toolchain.
#
#   perf/gpu-check.sh prepare        # here: build and gather what the GPU machine runs into .gpu/
#   perf/gpu-check.sh run [OUT]      # there, with .gpu/ carried (stripped, about 30 MiB): run it
#                                    # all, writing OUT/*.txt
#
# `run`, in order, each step's output in its own file under OUT (default ./gpu-check-out):
#   1. tensor-wasm doctor --require-gpu: the driver, NVRTC, cuBLAS, every device's SM, the
#      kernels compiled for it and a tiny add, softmax and matmul checked against float64;
#   2. the dispatch crate's op tests (tests/ops.rs, tests/general.rs, tests/streams.rs) with
#      TENSOR_WASM_REQUIRE_CUDA=1, so a missing device fails instead of skipping;
#   3. the dispatch latency bench (tiny add P50/P95/P99, idle and with other shards submitting;
#      sgemm throughput), DISPATCH_BENCH_ITERS samples per case (default 20,000);
#   4. the harness against a started server on the GPU, every shard submitting: the tensor
#      scenario (dispatch P95 under load), the encoder block (examples/encoder, f32 and bf16) and
#      the digits example at 1,000 req/s (issue 34's P99 target), HARNESS_SECONDS each (default 10).
# It stops at the first failed check and exits with its status; a harness run that misses an
# objective is reported and the rest still run. The numbers go to perf/DISPATCH.md
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
    executables test --release --test ops --test general --test streams | while read -r name exe; do strip -o ".gpu/tests/$name" "$exe"; done
    executables bench --bench dispatch_latency | while read -r name exe; do strip -o ".gpu/tests/$name" "$exe"; done
    # The harness and the guests it deploys: the machine has no toolchain to build them.
    cargo build --release -p tensor-wasm-bench --bin tensor-wasm-bench
    strip -o .gpu/bin/tensor-wasm-bench target/release/tensor-wasm-bench
    mkdir -p .gpu/guests
    for guest in tests/guests/tensor-ops examples/digits/guest examples/encoder/guest; do
      cargo build --quiet --release --target wasm32-wasip1 --manifest-path "$guest/Cargo.toml" --target-dir target/guests
    done
    cp target/guests/wasm32-wasip1/release/{tensor-ops,digits,encoder}.wasm .gpu/guests/
    ls -la .gpu/bin .gpu/tests .gpu/guests
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
    step streams .gpu/tests/streams
    step dispatch-latency .gpu/tests/dispatch_latency --bench
    seconds=${HARNESS_SECONDS:-10}
    # The servers the harness starts must run on the GPU: with `auto` a broken CUDA set-up would
    # fall back to the host back-end and be judged against the host's objectives.
    export TENSOR_WASM_GPU=cuda
    # A missed objective (exit 1) is a number to record, not a broken check: the next runs still
    # go. Anything else (a guest missing, a server that did not start: exit 2) stops here.
    missed=""
    harness() { # name, scenario, rate
      local rc=0
      step "$1" .gpu/bin/tensor-wasm-bench --server-bin .gpu/bin/tensor-wasm --guests-dir .gpu/guests \
        --scenario "$2" --rate "$3" --warmup 2s --duration "${seconds}s" --out "$out/$1" || rc=$?
      [ "$rc" -eq 0 ] && return 0
      [ "$rc" -eq 1 ] || exit "$rc"
      missed="$missed $1"
      echo "== $1: an objective was missed (the verdicts are in $out/$1.txt)"
    }
    harness harness-tensor tensor 2000
    harness harness-encoder encoder 1000
    harness harness-digits digits 1000
    if [ -n "$missed" ]; then
      echo "== every check ran; objectives missed in:$missed; outputs in $out"
      exit 1
    fi
    echo "== all GPU checks passed; outputs in $out"
    ;;
  *)
    echo "usage: perf/gpu-check.sh prepare | run [OUT]" >&2
    exit 2
    ;;
esac
