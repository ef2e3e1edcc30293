#!/usr/bin/env python3
"""From SIGTERM to exit for an idle server, with no drain grace and with the chart's 5 s: what
a rolling update or `Recreate` waits for before the next pod can start (docs/UPGRADE.md §9).

    python3 perf/drain-time.py        # target/release/tensor-wasm, or $TENSOR_WASM_BIN

Requests in flight add up to --drain-timeout-ms on top (tests/lifecycle.rs shows the bound).
"""
import subprocess, time, signal, sys, tempfile, urllib.request
import os
B = os.environ.get("TENSOR_WASM_BIN", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "target/release/tensor-wasm"))
for grace in ["0", "5000"]:
    for run in range(3):
        d = tempfile.mkdtemp()
        p = subprocess.Popen([B, "serve", "--listen", "127.0.0.1:0", "--data-dir", d, "--log-level", "warn", "--drain-grace-ms", grace], stdout=subprocess.PIPE, text=True)
        addr = p.stdout.readline().split()[-1]
        while True:
            try:
                if urllib.request.urlopen(f"http://{addr}/readyz").status == 200: break
            except Exception: time.sleep(0.005)
        t = time.monotonic(); p.send_signal(signal.SIGTERM); p.wait()
        print(f"--drain-grace-ms {grace}: SIGTERM to exit {1000*(time.monotonic()-t):.1f} ms, exit {p.returncode}")
