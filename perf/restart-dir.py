#!/usr/bin/env python3
"""Time from exec to ready for a functions directory of N distinct Rust guests.

    cargo build --release && cargo test --test rust_guest   # builds target/guests/.../json-stats.wasm
    python3 perf/restart-dir.py [N] [runs]

Writes N copies of the json-stats guest, each made distinct by a custom section, into a fresh
functions directory with a fresh data dir. Then, for each run, starts target/release/tensor-wasm
on them and polls /readyz every millisecond until it answers 200 (that is the figure). The first
start compiles every module; the later ones find the precompiled artifacts in the data dir.
"""
import http.client, os, shutil, subprocess, sys, tempfile, time

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
count = int(sys.argv[1]) if len(sys.argv) > 1 else 100
runs = int(sys.argv[2]) if len(sys.argv) > 2 else 4
binary = os.path.join(root, "target/release/tensor-wasm")
guest = open(os.path.join(root, "target/guests/wasm32-wasip1/release/json-stats.wasm"), "rb").read()

work = tempfile.mkdtemp(prefix="tw-restart-dir-")
functions, data = os.path.join(work, "functions"), os.path.join(work, "data")
os.makedirs(functions)
for i in range(count):
    name = f"copy-{i}".encode()
    section = bytes([len(name)]) + name  # a custom section (id 0): its name, no payload
    with open(os.path.join(functions, f"f{i}.wasm"), "wb") as f:
        f.write(guest + b"\x00" + bytes([len(section)]) + section)

try:
    for run in range(runs):
        started = time.monotonic()
        proc = subprocess.Popen([binary, "serve", "--listen", "127.0.0.1:0", "--data-dir", data,
                                 "--functions-dir", functions, "--log-level", "warn"],
                                stdout=subprocess.PIPE, text=True,
                                env=dict(os.environ, TENSOR_WASM_API_AUDIT_LOG="none"))
        try:
            host, port = proc.stdout.readline().split()[-1].rsplit(":", 1)
            while True:
                conn = http.client.HTTPConnection(host, int(port))
                conn.request("GET", "/readyz")
                if conn.getresponse().status == 200:
                    break
                conn.close()
                time.sleep(0.001)
            print(f"run {run}: {count} functions ready in {(time.monotonic() - started) * 1000:.1f} ms", flush=True)
        finally:
            proc.terminate()
            proc.wait()
finally:
    shutil.rmtree(work)
