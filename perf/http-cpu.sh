#!/usr/bin/env bash
# Server CPU per request on loopback, under wrk's keep-alive load.
#
#   perf/http-cpu.sh [ROUTE] [IO_DRIVER] [SHARDS] [SECONDS] [CONNECTIONS]
#
# ROUTE: healthz | hello (invoke of the seed's hello.wasm, an empty `_start`)
# IO_DRIVER: io-uring | epoll.  Needs wrk (apt-get install wrk) and a release build.
# SERVER_ARGS: extra flags for the server, e.g. SERVER_ARGS="--audit-log none".
# TENSOR_WASM_BIN: the binary to measure (default: target/release/tensor-wasm), to compare builds.
# Prints requests/s and the server's own CPU time (utime + stime from /proc) per request.
set -euo pipefail
route=${1:-hello}
driver=${2:-io-uring}
shards=${3:-1}
seconds=${4:-10}
connections=${5:-32}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${TENSOR_WASM_BIN:-$root/target/release/tensor-wasm}
[ -x "$bin" ] || { echo "build first: cargo build --release" >&2; exit 1; }
command -v wrk >/dev/null || { echo "install wrk first: apt-get install wrk" >&2; exit 1; }

trap 'kill "${pid:-}" 2>/dev/null; rm -rf "${data:-}" "${out:-}" "${lua:-}"' EXIT
. "$root/perf/route-server.sh"

ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
wrk -t1 -c"$connections" -d1s -s "$lua" "$url" >/dev/null # warm up
before=$(ticks)
result=$(wrk -t1 -c"$connections" -d"${seconds}s" -s "$lua" "$url")
after=$(ticks)
requests=$(echo "$result" | awk '/requests in/ {print $1}')
errors=$(echo "$result" | awk '/Non-2xx/ {print $NF}')
hz=$(getconf CLK_TCK)
python3 - "$route" "$driver" "$shards" "$requests" "$before" "$after" "$hz" "$seconds" "${errors:-0}" <<'PY'
import sys
route, driver, shards, requests, before, after, hz, seconds, errors = sys.argv[1:]
requests = int(requests); cpu = (int(after) - int(before)) / int(hz)
print(f"| {route} | {driver} | {shards} | {requests / float(seconds):,.0f} | {cpu / requests * 1e6:.2f} | {errors} |")
PY
