#!/usr/bin/env python3
"""Time from a token file's rotation to the removed token being refused, in a release build.

    cargo build --release
    python3 perf/token-rotation.py [rotations]

Starts target/release/tensor-wasm with --api-tokens-file. Each rotation writes a new file (a
temp file renamed over the old one, as a Secret update does) that adds a new token and drops the
previous one, then calls GET /functions with the dropped token every millisecond until it gets
401: the figure is that time, from just before the rename. The new token must work by then.
"""
import os, shutil, sys, tempfile, time

from release_server import put, request, serving, summary

rotations = int(sys.argv[1]) if len(sys.argv) > 1 else 20


def token(n):
    return f"rotation-token-{n:04}-" + "x" * 24


def status(host, port, bearer):
    return request(host, port, "GET", "/functions", headers={"authorization": f"Bearer {bearer}"})[0]


work = tempfile.mkdtemp(prefix="tw-token-rotation-")
tokens = os.path.join(work, "tokens")
put(tokens, f"{token(0)}:tenant=*\n".encode())
try:
    with serving("--data-dir", os.path.join(work, "data"), "--api-tokens-file", tokens) as (host, port):
        while status(host, port, token(0)) != 200:
            time.sleep(0.001)
        took = []
        for n in range(1, rotations + 1):
            started = time.monotonic()
            put(tokens, f"{token(n)}:tenant=*\n".encode())
            while status(host, port, token(n - 1)) != 401:
                if time.monotonic() - started > 30:
                    sys.exit(f"rotation {n}: the old token still works after 30 s")
                time.sleep(0.001)
            took.append((time.monotonic() - started) * 1000)
            assert status(host, port, token(n)) == 200, f"rotation {n}: the new token does not work"
            print(f"rotation {n:2}: old token refused after {took[-1]:6.1f} ms", flush=True)
        print(summary(rotations, "rotations", took))
finally:
    shutil.rmtree(work)
