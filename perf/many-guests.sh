#!/usr/bin/env bash
# How a shard's scheduler behaves with many runnable guests: N guests that never yield on their
# own (an empty loop) spin on one shard, and /healthz is timed meanwhile, on a connection of its
# own, one request after another (at most PROBES of them, and 40 s).
#
#   perf/many-guests.sh [COUNTS] [PROBES]
#
# COUNTS: space-separated runnable guests per shard, default "0 50 200 1000". Needs a release
# build. The guests' deadline (60 s) outlasts the probes; each count gets a fresh server.
# SERVER_CPUS=1 runs the server on those CPUs only (`taskset -c`); run the script itself under
# `taskset -c 0` then, so that the probe does not share the shard's CPU. TENSOR_WASM_IO_DRIVER
# and the server's other TENSOR_WASM_* variables pass through.
set -euo pipefail
counts=${1:-0 50 200 1000}
probes=${2:-300}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${TENSOR_WASM_BIN:-$root/target/release/tensor-wasm}
[ -x "$bin" ] || { echo "build first: cargo build --release" >&2; exit 1; }

# Builds from before per-tenant concurrency have no such flag (and no such limit).
tenant_cap=""
if "$bin" serve --help | grep -q -- --max-concurrent-per-tenant; then tenant_cap="--max-concurrent-per-tenant 1100"; fi

echo "| runnable guests on the shard | probes | /healthz P50 ms | P99 ms | max ms | guests still running after |"
echo "| --- | --- | --- | --- | --- | --- |"
for n in $counts; do
  data=$(mktemp -d)
  out=$(mktemp)
  ${SERVER_CPUS:+taskset -c "$SERVER_CPUS"} "$bin" serve --listen 127.0.0.1:0 --data-dir "$data" --shards 1 --audit-log none --log-level warn \
    --max-instances 1100 $tenant_cap --default-memory-limit-mb 1 \
    --max-memory-limit-mb 16 >"$out" 2>/dev/null &
  pid=$!
  for _ in $(seq 100); do grep -q listening "$out" && break; sleep 0.05; done
  addr=$(sed -n 's/^listening on //p' "$out")
  python3 - "$addr" "$n" "$probes" <<'PY'
import base64, http.client, json, socket, statistics, sys, time

addr, n, probes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
host, port = addr.rsplit(":", 1)
# (module (func (export "_start") (loop $l (br $l))))
spin = (b"\x00asm\x01\x00\x00\x00" + b"\x01\x04\x01\x60\x00\x00" + b"\x03\x02\x01\x00"
        + b"\x07\x0a\x01\x06_start\x00\x00" + b"\x0a\x09\x01\x07\x00\x03\x40\x0c\x00\x0b\x0b")

def metric(name):
    c = http.client.HTTPConnection(host, int(port), timeout=30); c.request("GET", "/metrics")
    text = c.getresponse().read().decode(); c.close()
    return sum(float(l.split()[-1]) for l in text.splitlines() if l.startswith(name + " ") or l.startswith(name + "{"))

c = http.client.HTTPConnection(host, int(port), timeout=30)
c.request("POST", "/functions", body=json.dumps({"name": "spin", "wasm_b64": base64.b64encode(spin).decode(),
                                                 "timeout_ms": 60000, "memory_limit_mb": 1}))
r = c.getresponse(); fid = json.loads(r.read())["id"]; c.close()
socks = []
for _ in range(n):
    s = socket.create_connection((host, int(port)))
    s.sendall(f"POST /functions/{fid}/invoke HTTP/1.1\r\nhost: t\r\ncontent-length: 0\r\n\r\n".encode())
    socks.append(s)
deadline = time.time() + 30
while n and metric("tensor_wasm_active_instances") < n:
    assert time.time() < deadline, "the guests did not all start"
    time.sleep(0.05)
probe = http.client.HTTPConnection(host, int(port), timeout=30)
times = []
began = time.time()
# At most `probes` probes and 40 s of them, well inside the guests' 60 s deadline.
while len(times) < probes and time.time() - began < 40:
    t = time.perf_counter(); probe.request("GET", "/healthz"); probe.getresponse().read()
    times.append((time.perf_counter() - t) * 1000)
running = metric("tensor_wasm_active_instances")
times.sort()
print(f"| {n} | {len(times)} | {statistics.median(times):.2f} | {times[len(times) * 99 // 100]:.2f} | {times[-1]:.2f} | {running:.0f} |")
PY
  kill "$pid"; wait "$pid" 2>/dev/null || true
  rm -rf "$data" "$out"
done
