#!/usr/bin/env python3
"""Time from exec to serving for a data dir of stored functions.

    TW_BENCH_DATA_DIR=/tmp/tw1000 cargo bench -p tensor-wasm-bench --bench catalog_load
    python3 perf/restart-1000.py /tmp/tw1000 [runs]

For each run: start target/release/tensor-wasm on the data dir, poll /readyz every millisecond
until it answers 200 (that is the figure), then invoke every stored function once over one
keep-alive connection and check each answers 200.
"""
import http.client, json, os, subprocess, sys, time

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
data_dir = sys.argv[1]
runs = int(sys.argv[2]) if len(sys.argv) > 2 else 5
binary = os.path.join(root, "target/release/tensor-wasm")

results = []
for run in range(runs):
    started = time.monotonic()
    proc = subprocess.Popen([binary, "serve", "--listen", "127.0.0.1:0", "--data-dir", data_dir,
                             "--log-level", "warn"], stdout=subprocess.PIPE, text=True)
    try:
        host, port = proc.stdout.readline().split()[-1].rsplit(":", 1)
        listening = time.monotonic() - started
        while True:
            conn = http.client.HTTPConnection(host, int(port))
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                break
            time.sleep(0.001)
        ready = time.monotonic() - started
        conn = http.client.HTTPConnection(host, int(port))
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
    finally:
        proc.terminate(); proc.wait()
results.sort()
print(f"exec to ready: median {results[len(results)//2]*1e3:.1f} ms, worst {results[-1]*1e3:.1f} ms")
