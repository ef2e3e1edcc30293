#!/usr/bin/env bash
# Guest-visible dispatch latency on the host back-end, with the server idle and under HTTP load.
#
#   perf/dispatch-under-load.sh [SHARDS] [LOAD_SECONDS]
#
# Deploys tests/guests/tensor-ops (built for wasm32-wasip1) and calls its probe: 20,000 round trips,
# each an add of two 1,024-element tensors and the tensor_sync that waits for it, timed inside the
# guest. First with the server idle, then while wrk keeps every shard busy with /healthz on 16
# connections. Needs wrk and a release build.
set -euo pipefail
shards=${1:-1}
seconds=${2:-20}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$root/target/release/tensor-wasm
[ -x "$bin" ] || { echo "build first: cargo build --release" >&2; exit 1; }
command -v wrk >/dev/null || { echo "install wrk first: apt-get install wrk" >&2; exit 1; }
cargo build -q --release --target wasm32-wasip1 --manifest-path "$root/tests/guests/tensor-ops/Cargo.toml" \
  --target-dir "$root/target/guests"
wasm=$root/target/guests/wasm32-wasip1/release/tensor-ops.wasm

data=$(mktemp -d)
out=$(mktemp)
trap 'kill "$pid" 2>/dev/null; rm -rf "$data" "$out"' EXIT
"$bin" serve --listen 127.0.0.1:0 --data-dir "$data" --shards "$shards" --gpu host --audit-log none \
  --log-level warn >"$out" &
pid=$!
for _ in $(seq 100); do grep -q listening "$out" && break; sleep 0.05; done
addr=$(sed -n 's/^listening on //p' "$out")
id=$(python3 - "$addr" "$wasm" <<'PY'
import base64, json, sys, urllib.request
addr, path = sys.argv[1], sys.argv[2]
body = json.dumps({"name": "tensor-ops", "wasm_b64": base64.b64encode(open(path, "rb").read()).decode()}).encode()
print(json.load(urllib.request.urlopen(urllib.request.Request(f"http://{addr}/functions", body)))["id"])
PY
)
probe() {
  for _ in 1 2 3; do
    curl -sf -X POST "http://$addr/functions/$id/invoke" -d '{"probe": 20000, "len": 1024}'
    echo
  done
}
echo "## idle ($shards shards)"
probe
echo "## under load: wrk -t1 -c16 /healthz"
wrk -t1 -c16 -d"${seconds}s" "http://$addr/healthz" >/tmp/dispatch-wrk.txt &
wrk_pid=$!
sleep 1
probe
wait $wrk_pid
grep -E 'Requests/sec' /tmp/dispatch-wrk.txt
