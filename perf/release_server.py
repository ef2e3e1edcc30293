"""What the perf/ scripts share: a release server on a loopback port, plain HTTP calls to it,
distinct copies of the json-stats guest, atomic file writes, and a summary line of timings."""
import contextlib, http.client, os, subprocess, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# TENSOR_WASM_BIN picks another build (an older commit's, to compare), as perf/http-cpu.sh does.
BINARY = os.environ.get("TENSOR_WASM_BIN", os.path.join(ROOT, "target/release/tensor-wasm"))
# Built by `cargo test --test rust_guest`.
JSON_STATS = os.path.join(ROOT, "target/guests/wasm32-wasip1/release/json-stats.wasm")


@contextlib.contextmanager
def serving(*args, audit=False):
    """target/release/tensor-wasm serving with `args` on a loopback port (without an audit log
    unless `audit`); yields (host, port) once it listens, and stops the server on the way out."""
    env = dict(os.environ) if audit else dict(os.environ, TENSOR_WASM_API_AUDIT_LOG="none")
    proc = subprocess.Popen([BINARY, "serve", "--listen", "127.0.0.1:0", "--log-level", "warn", *args],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        host, port = proc.stdout.readline().split()[-1].rsplit(":", 1)
        yield host, int(port)
    finally:
        proc.terminate()
        proc.wait()


def wait_ready(host, port):
    """Polls /readyz every millisecond until it answers 200."""
    while request(host, port, "GET", "/readyz")[0] != 200:
        time.sleep(0.001)


def request(host, port, method, path, body=None, headers=None):
    """One request on a fresh connection; (status, body)."""
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data


def distinct(module, label):
    """`module` with a custom section (id 0) named `label` and no payload: the same code, but a
    module of its own, compiled afresh."""
    name = label.encode()
    section = bytes([len(name)]) + name
    return module + b"\x00" + bytes([len(section)]) + section


def put(path, data):
    """Writes `data` (bytes) to a temp file beside `path` and renames it over `path`, as a CI job
    or a Secret update would."""
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.rename(tmp, path)


def summary(count, what, timings_ms):
    """`N what: min …, median …, max …` of `timings_ms`."""
    timings = sorted(timings_ms)
    return (f"{count} {what}: min {timings[0]:.1f} ms, median {timings[len(timings) // 2]:.1f} ms, "
            f"max {timings[-1]:.1f} ms")
