#!/usr/bin/env python3
"""Time from a change in the functions directory to the new module serving, under load.

    cargo build --release && cargo test --test rust_guest   # builds target/guests/.../json-stats.wasm
    python3 perf/reload-dir.py [swaps]

Starts target/release/tensor-wasm on a functions directory that holds two copies of the json-stats
guest: `plain.wasm`, replaced by a write to a temp file and a rename, and `mounted.wasm`, laid out
as a Kubernetes ConfigMap volume (a symlink into `..data`, itself a symlink swapped in one
rename). Each swap writes a new version of one of them (the guest plus a custom section naming
the version, so that every version is a new module to compile) and polls the function's record
every millisecond until its digest is the new one: the figure is that time, from just before the
write. Two threads invoke both functions back to back meanwhile; any answer but 200 is counted.
"""
import hashlib, http.client, json, os, shutil, sys, tempfile, threading, time

from release_server import JSON_STATS, distinct, put, request, serving, summary, wait_ready

swaps = int(sys.argv[1]) if len(sys.argv) > 1 else 20
guest = open(JSON_STATS, "rb").read()
BODY = json.dumps({"values": list(range(64)), "label": "reload"})


def version(n):
    return distinct(guest, f"version-{n}")


class ConfigMapVolume:
    def __init__(self, directory, name, data):
        self.directory, self.name, self.version = directory, name, 0
        self.update(data)
        os.symlink(f"..data/{name}", os.path.join(directory, name))

    def update(self, data):
        self.version += 1
        target = f"..2026_11_23_{self.version}"
        os.mkdir(os.path.join(self.directory, target))
        with open(os.path.join(self.directory, target, self.name), "wb") as f:
            f.write(data)
        os.symlink(target, os.path.join(self.directory, "..data_tmp"))
        os.rename(os.path.join(self.directory, "..data_tmp"), os.path.join(self.directory, "..data"))


work = tempfile.mkdtemp(prefix="tw-reload-dir-")
functions, data = os.path.join(work, "functions"), os.path.join(work, "data")
os.makedirs(functions)
volume = ConfigMapVolume(functions, "mounted.wasm", version(0))
put(os.path.join(functions, "plain.wasm"), version(0))
stop = threading.Event()
try:
    with serving("--data-dir", data, "--functions-dir", functions) as (host, port):
        wait_ready(host, port)
        listing = json.loads(request(host, port, "GET", "/functions")[1])
        ids = {f["name"]: f["id"] for f in listing["functions"]}

        counts = {"invokes": 0, "failed": 0}

        def load():
            conn = http.client.HTTPConnection(host, port, timeout=10)
            deadline = time.monotonic() + 600
            while not stop.is_set() and time.monotonic() < deadline:
                for fid in ids.values():
                    conn.request("POST", f"/functions/{fid}/invoke", body=BODY)
                    response = conn.getresponse()
                    response.read()
                    counts["invokes"] += 1
                    counts["failed"] += response.status != 200

        loaders = [threading.Thread(target=load) for _ in range(2)]
        for t in loaders:
            t.start()

        took = []
        for swap in range(1, swaps + 1):
            name = "mounted" if swap % 2 == 0 else "plain"
            new = version(swap)
            digest = "sha256:" + hashlib.sha256(new).hexdigest()
            started = time.monotonic()
            if name == "mounted":
                volume.update(new)
            else:
                put(os.path.join(functions, "plain.wasm"), new)
            while json.loads(request(host, port, "GET", f"/functions/{ids[name]}")[1]).get("digest") != digest:
                if time.monotonic() - started > 30:
                    sys.exit(f"swap {swap} of {name}: not live after 30 s")
                time.sleep(0.001)
            took.append((time.monotonic() - started) * 1000)
            print(f"swap {swap:2} ({name:7}): live in {took[-1]:6.1f} ms", flush=True)
        stop.set()
        for t in loaders:
            t.join()
        print(f"{summary(swaps, 'swaps', took)}; {counts['invokes']} invokes meanwhile, {counts['failed']} not 200")
finally:
    stop.set()
    shutil.rmtree(work)
