#!/usr/bin/env python3
"""Time from exec to serving for a data dir of stored functions.

    TW_BENCH_DATA_DIR=/tmp/tw1000 cargo bench -p tensor-wasm-bench --bench catalog_load
    python3 perf/restart-1000.py /tmp/tw1000 [runs]

For each run: start target/release/tensor-wasm on the data dir, poll /readyz every millisecond
until it answers 200 (that is the figure), then invoke every stored function once over one
keep-alive connection and check each answers 200.
"""
import http.client, json, sys, time

from release_server import serving, wait_ready

data_dir = sys.argv[1]
runs = int(sys.argv[2]) if len(sys.argv) > 2 else 5

results = []
for run in range(runs):
    started = time.monotonic()
    # The audit log stays on, as the measured runs had it.
    with serving("--data-dir", data_dir, audit=True) as (host, port):
        listening = time.monotonic() - started
        wait_ready(host, port)
        ready = time.monotonic() - started
        conn = http.client.HTTPConnection(host, port)
        conn.request("GET", "/functions")
        ids = [f["id"] for f in json.loads(conn.getresponse().read())["functions"]]
        for fid in ids:
            conn.request("POST", f"/functions/{fid}/invoke", body=b"{}")
            r = conn.getresponse(); r.read()
            assert r.status == 200, r.status
        all_invoked = time.monotonic() - started
        results.append(ready)
        print(f"run {run}: listening {listening*1e3:.1f} ms, ready {ready*1e3:.1f} ms, "
              f"all {len(ids)} invoked once by {all_invoked*1e3:.1f} ms")
results.sort()
print(f"exec to ready: median {results[len(results)//2]*1e3:.1f} ms, worst {results[-1]*1e3:.1f} ms")
