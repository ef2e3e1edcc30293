#!/usr/bin/env python3
"""The window signed checkpoints leave: how far apart, in time and in records, consecutive
checkpoints of a shard are under load. What was written after the last checkpoint that left the
host can be cut undetected (docs/AUDIT-LOG.md, "The window that remains"); this measures it.

    python3 perf/checkpoint-window.py [INTERVAL_MS] [SECONDS] [SHARDS]

Starts target/release/tensor-wasm (or $TENSOR_WASM_BIN) with a fresh signing key and
--audit-checkpoint-interval-ms INTERVAL_MS, drives wrk at GET /functions/<an unknown id> for
SECONDS (a 404 and an audit record each; probes are not audited), stops the server with SIGTERM
and reads the checkpoint lines it printed.
"""
import json, os, shutil, signal, subprocess, sys, tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.environ.get("TENSOR_WASM_BIN", os.path.join(ROOT, "target/release/tensor-wasm"))
interval = sys.argv[1] if len(sys.argv) > 1 else "1000"
seconds = sys.argv[2] if len(sys.argv) > 2 else "10"
shards = sys.argv[3] if len(sys.argv) > 3 else "2"

work = tempfile.mkdtemp(prefix="tw-window-")
key = os.path.join(work, "key")
subprocess.run([BINARY, "audit", "keygen", "--out", key, "--name", "perf.example/audit"], check=True,
               stdout=subprocess.DEVNULL)
out = open(os.path.join(work, "stdout"), "w+")
server = subprocess.Popen([BINARY, "serve", "--listen", "127.0.0.1:0", "--data-dir", os.path.join(work, "data"),
                           "--shards", shards, "--log-level", "warn", "--audit-signing-key", key,
                           "--audit-checkpoint-interval-ms", interval], stdout=out)
try:
    while True:
        out.seek(0)
        listening = [l for l in out.read().splitlines() if l.startswith("listening on ")]
        if listening:
            addr = listening[0].split()[-1]
            break
    subprocess.run(["wrk", "-t1", "-c16", f"-d{seconds}s", f"http://{addr}/functions/{'0' * 32}"], check=True,
                   stdout=subprocess.DEVNULL)
finally:
    server.send_signal(signal.SIGTERM)
    server.wait()
out.seek(0)
points = {}
for line in out.read().splitlines():
    if line.startswith("{"):
        c = json.loads(line)["audit_checkpoint"]
        points.setdefault(c["shard"], []).append((c["time_unix_ms"], c["size"]))
for shard, cps in sorted(points.items()):
    gaps = sorted(b[0] - a[0] for a, b in zip(cps, cps[1:]))
    records = sorted(b[1] - a[1] for a, b in zip(cps, cps[1:]))
    if not gaps:
        continue
    print(f"shard {shard}: {len(cps)} checkpoints; between two: median {gaps[len(gaps) // 2]} ms, "
          f"max {gaps[-1]} ms; median {records[len(records) // 2]} records, max {records[-1]}")
shutil.rmtree(work)
