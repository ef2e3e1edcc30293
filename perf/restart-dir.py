#!/usr/bin/env python3
"""Time from exec to ready for a functions directory of N distinct Rust guests.

    cargo build --release && cargo test --test rust_guest   # builds target/guests/.../json-stats.wasm
    python3 perf/restart-dir.py [N] [runs]

Writes N copies of the json-stats guest, each made distinct by a custom section, into a fresh
functions directory with a fresh data dir. Then, for each run, starts target/release/tensor-wasm
on them and polls /readyz every millisecond until it answers 200 (that is the figure). The first
start compiles every module; the later ones find the precompiled artifacts in the data dir.
"""
import os, shutil, sys, tempfile, time

from release_server import JSON_STATS, distinct, serving, wait_ready

count = int(sys.argv[1]) if len(sys.argv) > 1 else 100
runs = int(sys.argv[2]) if len(sys.argv) > 2 else 4
guest = open(JSON_STATS, "rb").read()

work = tempfile.mkdtemp(prefix="tw-restart-dir-")
functions, data = os.path.join(work, "functions"), os.path.join(work, "data")
os.makedirs(functions)
for i in range(count):
    with open(os.path.join(functions, f"f{i}.wasm"), "wb") as f:
        f.write(distinct(guest, f"copy-{i}"))

try:
    for run in range(runs):
        started = time.monotonic()
        with serving("--data-dir", data, "--functions-dir", functions) as (host, port):
            wait_ready(host, port)
            print(f"run {run}: {count} functions ready in {(time.monotonic() - started) * 1000:.1f} ms", flush=True)
finally:
    shutil.rmtree(work)
