#!/usr/bin/env python3
"""Time from exec to ready for N stored functions whose precompiled artifacts are gone: what a
restart after an upgrade of wasmtime, or from a backup without artifacts, costs.

    cargo build --release && cargo test --test rust_guest   # builds target/guests/.../json-stats.wasm
    python3 perf/restart-cold.py [N] [runs]

Deploys N distinct copies of the json-stats guest through the API on a fresh data dir. Then, for
each run, removes every artifact, starts target/release/tensor-wasm (or $TENSOR_WASM_BIN) on the
data dir, polls /readyz every millisecond until it answers 200 (the figure), and checks that
every function answers an invoke. Every module is compiled again in each run.
"""
import base64, glob, json, os, shutil, sys, tempfile, time

from release_server import JSON_STATS, distinct, request, serving, summary, wait_ready

count = int(sys.argv[1]) if len(sys.argv) > 1 else 40
runs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
guest = open(JSON_STATS, "rb").read()

data = tempfile.mkdtemp(prefix="tw-restart-cold-")
try:
    with serving("--data-dir", data) as (host, port):
        wait_ready(host, port)
        for i in range(count):
            body = json.dumps({"name": f"f{i}", "wasm_b64": base64.b64encode(distinct(guest, f"copy-{i}")).decode()})
            status, answer = request(host, port, "POST", "/functions", body, {"content-type": "application/json"})
            assert status == 201, answer
    timings = []
    for run in range(runs):
        for artifact in glob.glob(os.path.join(data, "modules", "*.cwasm")):
            os.remove(artifact)
        started = time.monotonic()
        with serving("--data-dir", data) as (host, port):
            wait_ready(host, port)
            ready_ms = (time.monotonic() - started) * 1000
            functions = json.loads(request(host, port, "GET", "/functions")[1])["functions"]
            assert len(functions) == count, functions
            for f in functions:
                status, answer = request(host, port, "POST", f"/functions/{f['id']}/invoke", b'{"values":[1,2]}')
                assert status == 200, answer
        timings.append(ready_ms)
        print(f"run {run}: {count} functions compiled again and ready in {ready_ms:.1f} ms", flush=True)
    print(summary(count, "ready", timings))
finally:
    shutil.rmtree(data)
