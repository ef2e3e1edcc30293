#!/usr/bin/env bash
# How long one bulk-memory instruction over a guest's whole memory takes, and one allocation of a
# GC array as large as its memory limit allows. wasmtime runs
# `memory.fill` and `memory.copy` each as one libcall that nothing interrupts; since the server
# cuts them into 64 KiB steps before compiling (`wasm::bulk_memory`), this is what the instruction
# costs its guest, not how long it holds the shard. For each memory size, a guest whose `_start` is
# one such instruction over all of its memory (fresh pages, as a new instance has them) is
# invoked, and the median round trip of a guest with the same memory and an empty `_start` is
# subtracted. A GC array's allocation zeroes all of it at once, and nothing cuts that one into
# steps: it is the longest instruction left, and `--max-memory-limit-mb` bounds it.
#
#   perf/bulk-memory.sh [SIZES_MB] [ROUNDS]
#
# SIZES_MB: space-separated, default "64 128 256 512 1024". Needs a release build.
set -euo pipefail
sizes=${1:-64 128 256 512 1024}
rounds=${2:-7}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${TENSOR_WASM_BIN:-$root/target/release/tensor-wasm}
[ -x "$bin" ] || { echo "build first: cargo build --release" >&2; exit 1; }
max=$(echo "$sizes" | tr ' ' '\n' | sort -n | tail -1)

data=$(mktemp -d)
out=$(mktemp)
trap 'kill "$pid" 2>/dev/null; rm -rf "$data" "$out"' EXIT
"$bin" serve --listen 127.0.0.1:0 --data-dir "$data" --shards 1 --audit-log none --log-level warn \
  --max-memory-limit-mb "$max" --max-instances 4 >"$out" &
pid=$!
for _ in $(seq 100); do grep -q listening "$out" && break; sleep 0.05; done
addr=$(sed -n 's/^listening on //p' "$out")

python3 - "$addr" "$rounds" $sizes <<'PY'
import base64, http.client, json, statistics, sys, time

addr, rounds, sizes = sys.argv[1], int(sys.argv[2]), [int(s) for s in sys.argv[3:]]
host, port = addr.rsplit(":", 1)

def leb_u(n):
    out = bytearray()
    while True:
        b = n & 0x7F; n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n: return bytes(out)

def leb_s(n):
    out = bytearray()
    while True:
        b = n & 0x7F; n >>= 7
        done = (n == 0 and not b & 0x40) or (n == -1 and b & 0x40)
        out.append(b | (0 if done else 0x80))
        if done: return bytes(out)

def section(id, body): return bytes([id]) + leb_u(len(body)) + body
def name(s): return leb_u(len(s)) + s.encode()

def module(pages, code):
    body = b"\x00" + code + b"\x0b"  # no locals, code, end
    return (b"\x00asm\x01\x00\x00\x00"
            + section(1, b"\x01\x60\x00\x00")
            + section(3, b"\x01\x00")
            + section(5, b"\x01\x00" + leb_u(pages))
            + section(7, b"\x02" + name("memory") + b"\x02\x00" + name("_start") + b"\x00\x00")
            + section(10, b"\x01" + leb_u(len(body)) + body))

def const(n): return b"\x41" + leb_s(n)

def gc_module(n):
    # Types: 0 the function, 1 `(array (mut i8))`; `_start` drops `array.new_default 1` of n bytes.
    body = b"\x00" + const(n) + b"\xfb\x07\x01" + b"\x1a" + b"\x0b"
    return (b"\x00asm\x01\x00\x00\x00"
            + section(1, b"\x02\x60\x00\x00\x5e\x78\x01")
            + section(3, b"\x01\x00")
            + section(7, b"\x01" + name("_start") + b"\x00\x00")
            + section(10, b"\x01" + leb_u(len(body)) + body))

def call(method, path, body=b""):
    c = http.client.HTTPConnection(host, int(port), timeout=120)
    c.request(method, path, body=body, headers={"content-type": "application/json"})
    r = c.getresponse(); data = r.read(); c.close()
    return r.status, data

def deploy(label, wasm, mb):
    status, data = call("POST", "/functions", json.dumps({
        "name": label, "wasm_b64": base64.b64encode(wasm).decode(),
        "memory_limit_mb": mb, "timeout_ms": 60000}).encode())
    assert status == 201, data
    return json.loads(data)["id"]

def median_ms(fid):
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        status, data = call("POST", f"/functions/{fid}/invoke")
        times.append((time.perf_counter() - t) * 1000)
        assert status == 200, data
    return statistics.median(times)

print("| memory | empty `_start` ms | `memory.fill` over all ms | `memory.copy` of half onto the other half ms | GC `array.new_default` of all but 1 MiB ms |")
print("| --- | --- | --- | --- | --- |")
for mb in sizes:
    pages, nbytes = mb * 16, mb * 1024 * 1024
    empty = deploy(f"empty{mb}", module(pages, b""), mb)
    fill = deploy(f"fill{mb}", module(pages, const(0) + const(0xAB) + const(nbytes) + b"\xfc\x0b\x00"), mb)
    copy = deploy(f"copy{mb}", module(pages, const(nbytes // 2) + const(0) + const(nbytes // 2) + b"\xfc\x0a\x00\x00"), mb)
    # The GC heap is held to the function's memory limit too, less what the heap keeps for itself.
    gc = deploy(f"gc{mb}", gc_module(nbytes - 1024 * 1024), mb)
    base = median_ms(empty)
    print(f"| {mb} MiB | {base:.2f} | {median_ms(fill) - base:.1f} | {median_ms(copy) - base:.1f} | {median_ms(gc) - base:.1f} |")
PY
