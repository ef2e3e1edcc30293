#!/usr/bin/env python3
"""Time from a token file's rotation to the removed token being refused, in a release build.

    cargo build --release
    python3 perf/token-rotation.py [rotations]

Starts target/release/tensor-wasm with --api-tokens-file. Each rotation writes a new file (a
temp file renamed over the old one, as a Secret update does) that adds a new token and drops the
previous one, then calls GET /functions with the dropped token every millisecond until it gets
401: the figure is that time, from just before the rename. The new token must work by then.
"""
import http.client, os, shutil, subprocess, sys, tempfile, time

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
rotations = int(sys.argv[1]) if len(sys.argv) > 1 else 20
binary = os.path.join(root, "target/release/tensor-wasm")


def token(n):
    return f"rotation-token-{n:04}-" + "x" * 24


def write(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.rename(path + ".tmp", path)


def status(host, port, bearer):
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("GET", "/functions", headers={"authorization": f"Bearer {bearer}"})
    response = conn.getresponse()
    response.read()
    conn.close()
    return response.status


work = tempfile.mkdtemp(prefix="tw-token-rotation-")
tokens = os.path.join(work, "tokens")
write(tokens, f"{token(0)}:tenant=*\n")
proc = subprocess.Popen([binary, "serve", "--listen", "127.0.0.1:0", "--data-dir", os.path.join(work, "data"),
                         "--api-tokens-file", tokens, "--log-level", "warn"],
                        stdout=subprocess.PIPE, text=True, env=dict(os.environ, TENSOR_WASM_API_AUDIT_LOG="none"))
try:
    host, port = proc.stdout.readline().split()[-1].rsplit(":", 1)
    port = int(port)
    while status(host, port, token(0)) != 200:
        time.sleep(0.001)
    took = []
    for n in range(1, rotations + 1):
        started = time.monotonic()
        write(tokens, f"{token(n)}:tenant=*\n")
        while status(host, port, token(n - 1)) != 401:
            if time.monotonic() - started > 30:
                sys.exit(f"rotation {n}: the old token still works after 30 s")
            time.sleep(0.001)
        took.append((time.monotonic() - started) * 1000)
        assert status(host, port, token(n)) == 200, f"rotation {n}: the new token does not work"
        print(f"rotation {n:2}: old token refused after {took[-1]:6.1f} ms", flush=True)
    took.sort()
    print(f"{rotations} rotations: min {took[0]:.1f} ms, median {took[len(took) // 2]:.1f} ms, max {took[-1]:.1f} ms")
finally:
    proc.terminate()
    proc.wait()
    shutil.rmtree(work)
