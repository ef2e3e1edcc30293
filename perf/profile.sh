#!/usr/bin/env bash
# Where a route's server CPU goes: `perf record -e cpu-clock` of the server under wrk's load,
# reported by thread and by symbol.
#
#   perf/profile.sh [ROUTE] [SECONDS] [CONNECTIONS] [TOP]
#
# ROUTE: healthz | hello. One shard, epoll (as perf/http-cpu.sh's rows). SERVER_ARGS: extra flags
# for the server (e.g. "--audit-log none"). TENSOR_WASM_BIN: the binary (default: the release
# build). Needs perf, wrk and curl. Prints each thread's share of the server's samples, then the
# TOP symbols (default 30) with their share and the thread they ran on.
set -euo pipefail
route=${1:-hello}
seconds=${2:-8}
connections=${3:-32}
top=${4:-30}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${TENSOR_WASM_BIN:-$root/target/release/tensor-wasm}
[ -x "$bin" ] || { echo "build first: cargo build --release" >&2; exit 1; }
for tool in perf wrk curl; do command -v $tool >/dev/null || { echo "install $tool first" >&2; exit 1; }; done

samples=$(mktemp --suffix=.data)
trap 'kill "${pid:-}" 2>/dev/null; rm -rf "${data:-}" "${out:-}" "${lua:-}"; [ -n "${KEEP:-}" ] && mv "$samples" "$KEEP" || rm -f "$samples"' EXIT
shards=1
driver=epoll
. "$root/perf/route-server.sh"
wrk -t1 -c"$connections" -d1s -s "$lua" "$url" >/dev/null # warm up
perf record -q -e cpu-clock -F 9999 -p "$pid" -o "$samples" -- sleep "$seconds" 2>/dev/null &
recorder=$!
result=$(wrk -t1 -c"$connections" -d"${seconds}s" -s "$lua" "$url")
wait "$recorder" || true
requests=$(echo "$result" | awk '/requests in/ {print $1}')
echo "route $route, ${SERVER_ARGS:-default flags}: $requests requests in ${seconds}s"
echo "## by thread (share of the server's samples)"
perf report -i "$samples" --no-children --sort comm --stdio 2>/dev/null | grep -E '^ +[0-9]' | head -12
echo "## top $top symbols"
perf report -i "$samples" --no-children --sort comm,sym --stdio 2>/dev/null | grep -E '^ +[0-9]' | head -"$top"
