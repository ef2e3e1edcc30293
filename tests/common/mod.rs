//! Test harness: the real `tensor-wasm` binary on an ephemeral loopback port, a plain blocking
//! HTTP/1.1 client over real sockets, and the guests the tests deploy.
#![allow(dead_code)]

pub mod bystander;
pub mod ca;
pub mod configmap;
pub mod guests;
pub mod nats;
pub mod starve;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;

pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// A loopback port that no other test holds, for a server that must listen on an address known
/// before it starts. It lies below the kernel's ephemeral range (32768 and up by default): a
/// port from that range can be handed to another test's server (bound to port 0) in the
/// meantime, and a test that takes a successful connect as "this server listens" would then
/// reach that one. It is never handed out twice while this process lives, nor to another test
/// binary running at the same time (see `claim`): two tests that each picked a free port before
/// either's server bound it would otherwise both take it with SO_REUSEPORT, each answering the
/// other's test (a SIGTERM sent to a server still starting killed it).
pub fn free_port() -> SocketAddr {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    let mut rng = Rng((u64::from(std::process::id()) << 32 | u64::from(nanos)) | 1);
    static CLAIMS: Mutex<Vec<std::fs::File>> = Mutex::new(Vec::new());
    let mut claims = CLAIMS.lock().unwrap_or_else(|p| p.into_inner());
    for _ in 0..1000 {
        let port = 20_000 + rng.below(10_000) as u16;
        let Some(claimed) = claim(port) else { continue };
        if let Ok(listener) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            claims.push(claimed);
            return listener.local_addr().unwrap();
        }
    }
    panic!("no free port between 20000 and 30000");
}

/// Claims `port` for this process's lifetime: an exclusive `flock` on a file named after it. A
/// second claim fails whether it comes from this process (flock locks belong to the open file,
/// and each claim opens its own) or from another test binary, and the kernel drops the lock when
/// the process exits, however it exits, so no claim outlives its test binary.
fn claim(port: u16) -> Option<std::fs::File> {
    use std::os::fd::AsRawFd;
    let dir = std::env::temp_dir().join("tensor-wasm-test-ports");
    std::fs::create_dir_all(&dir).ok()?;
    let file =
        std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(dir.join(port.to_string())).ok()?;
    // SAFETY: flock on a descriptor this function owns; it touches no memory.
    let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
    locked.then_some(file)
}

/// Waits for `child` to exit, at most `limit`; past it, kills it and fails the test with what
/// `log` returns.
pub fn wait_exit(child: &mut Child, limit: Duration, log: impl Fn() -> String) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("server did not exit within {limit:?}; stderr:\n{}", log());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Polls `check` every few milliseconds until it holds and returns how long that took; fails the
/// test, naming `what`, once `limit` has passed. Every wait for the server's background work
/// (a reload, a sealed segment, a thread's start) goes through here, never a guessed sleep.
pub fn within(limit: Duration, what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    loop {
        if check() {
            return started.elapsed();
        }
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs `tensor-wasm ARGS` with `env`, and none of the client settings of this process's
/// environment; returns (exit code, stdout, stderr).
pub fn tensor_wasm(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tensor-wasm"));
    cmd.args(args).stdin(Stdio::null());
    for var in [
        "TENSOR_WASM_SERVER",
        "TENSOR_WASM_TOKEN",
        "TENSOR_WASM_TENANT",
        "TENSOR_WASM_API_METRICS_TOKEN",
        "TENSOR_WASM_CA_CERT",
        "TENSOR_WASM_CLIENT_CERT",
        "TENSOR_WASM_CLIENT_KEY",
        "SSL_CERT_FILE",
    ] {
        cmd.env_remove(var);
    }
    let out = cmd.envs(env.iter().copied()).output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

pub fn sha256(bytes: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).to_vec()
}

/// xorshift64*: enough randomness for kill moments, operation mixes and input mutations, and
/// reproducible from the seed a test prints.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// A position in something `len` long (0 when it is empty).
    pub fn index(&mut self, len: usize) -> usize {
        self.below(len as u64) as usize
    }
}

/// A running server process. Killed when dropped.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    stderr: Arc<Mutex<String>>,
    /// The signed checkpoints it printed.
    stdout: Arc<Mutex<Vec<String>>>,
    _temp: Option<tempfile::TempDir>,
}

impl Server {
    /// Starts a server with a fresh data dir and two shards, plus `args`.
    pub fn start(args: &[&str]) -> Server {
        Server::start_fresh_with(args, |_| {})
    }

    /// Like `start`, with a last say over the command. The data dir is removed with the server.
    pub fn start_fresh_with(args: &[&str], configure: impl FnOnce(&mut Command)) -> Server {
        let temp = tempfile::tempdir().expect("tempdir");
        let mut s = Server::start_with(temp.path(), args, configure);
        s._temp = Some(temp);
        s
    }

    /// Starts a server on `data_dir` (which outlives it), plus `args`.
    pub fn start_in(data_dir: &Path, args: &[&str]) -> Server {
        Server::start_with(data_dir, args, |_| {})
    }

    /// Like `start_in`, with a last say over the command (its environment, limits, filters).
    pub fn start_with(data_dir: &Path, args: &[&str], configure: impl FnOnce(&mut Command)) -> Server {
        let server = Server::spawn(data_dir, args, configure);
        server.wait_ready();
        server
    }

    /// Starts a server without waiting for plain-HTTP readiness (a TLS listener does not answer it).
    pub fn spawn(data_dir: &Path, args: &[&str], configure: impl FnOnce(&mut Command)) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tensor-wasm"));
        cmd.args(["serve", "--data-dir"])
            .arg(data_dir)
            .args(["--log-level", "info"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Two shards and a small instance pool unless the test says otherwise.
        for (flag, value) in [("--listen", "127.0.0.1:0"), ("--shards", "2"), ("--max-instances", "64")] {
            if !args.contains(&flag) {
                cmd.args([flag, value]);
            }
        }
        configure(&mut cmd);
        let mut child = cmd.spawn().expect("spawn tensor-wasm");
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        let mut err_pipe = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err_pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let stdout_lines = Arc::new(Mutex::new(Vec::new()));
        let kept = stdout_lines.clone();
        std::thread::spawn(move || {
            // Signed checkpoints are kept for the tests that read them, as a log shipper would;
            // other lines (audit records mirrored to stdout) are not, so that memory stays flat.
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.starts_with("listening on ") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(line.clone());
                    }
                }
                if line.starts_with("{\"audit_checkpoint\"") {
                    kept.lock().unwrap().push(line);
                }
            }
        });
        let line = match rx.recv_timeout(IO_TIMEOUT) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                panic!("server did not start; stderr:\n{}", stderr.lock().unwrap());
            }
        };
        let mut addr: SocketAddr =
            line.strip_prefix("listening on ").expect("listening line").parse().expect("address");
        if addr.ip().is_unspecified() {
            // Bound to every address: talk to it over loopback only.
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        Server { child, addr, data_dir: data_dir.to_path_buf(), stderr, stdout: stdout_lines, _temp: None }
    }

    pub fn wait_ready(&self) {
        let deadline = Instant::now() + IO_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(r) = self.client().try_request("GET", "/readyz", &[], b"") {
                if r.status == 200 {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("server never became ready; stderr:\n{}", self.stderr());
    }

    pub fn client(&self) -> Client {
        Client::connect(self.addr)
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// The signed checkpoints the server printed to stdout so far, one JSON line each (read by
    /// another thread).
    pub fn checkpoint_lines(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    /// Waits until the server's log contains `needle` (it is read by another thread), at most
    /// `IO_TIMEOUT`; returns the log.
    pub fn wait_for_stderr(&self, needle: &str) -> String {
        let deadline = Instant::now() + IO_TIMEOUT;
        loop {
            let log = self.stderr();
            if log.contains(needle) {
                return log;
            }
            assert!(Instant::now() < deadline, "the log never said {needle:?}:\n{log}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, signal);
        }
    }

    /// Waits for the process to exit, at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let stderr = self.stderr.clone();
        wait_exit(&mut self.child, limit, || stderr.lock().unwrap().clone())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Deploys `wasm` under `name` with extra JSON fields; returns the new id.
    pub fn deploy(&self, name: &str, wasm: &[u8]) -> String {
        let r = self.client().deploy(name, wasm, serde_json::json!({}));
        assert_eq!(r.status, 201, "deploy failed: {}", r.text());
        r.json()["id"].as_str().unwrap().to_string()
    }

    /// The id of the function named `name`, from the listing.
    pub fn function_id(&self, name: &str) -> Option<String> {
        let list = self.client().request("GET", "/functions", &[], b"").json();
        list["functions"].as_array()?.iter().find(|f| f["name"] == name).map(|f| f["id"].as_str().unwrap().into())
    }

    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let text = self.client().request("GET", "/metrics", &[], b"").text();
        sum_metric(&text, name, labels)
    }

    /// Waits until the metric reaches `at_least`, at most `IO_TIMEOUT`: how a test knows that the
    /// server got as far as it needs, where a sleep would only guess.
    pub fn wait_for_metric(&self, name: &str, labels: &[(&str, &str)], at_least: f64) {
        within(IO_TIMEOUT, &format!("{name} {labels:?} reaching {at_least}"), || self.metric(name, labels) >= at_least);
    }
}

/// A thread of a process, as /proc shows it.
#[derive(Debug)]
pub struct ThreadInfo {
    pub tid: u32,
    /// Cut to 15 bytes by the kernel.
    pub name: String,
    /// `Cpus_allowed_list`.
    pub cpus: String,
    pub nice: i64,
    /// The scheduling policy: 0 normal, 5 SCHED_IDLE.
    pub policy: u64,
    /// User plus system time, counted in the kernel's clock ticks (10 ms where `CLK_TCK` is 100).
    pub cpu_time: Duration,
}

/// The threads of process `pid` (a thread that exits while they are read is left out).
pub fn threads(pid: u32) -> Vec<ThreadInfo> {
    let read = |task: &Path| -> Option<ThreadInfo> {
        let status = std::fs::read_to_string(task.join("status")).ok()?;
        let stat = std::fs::read_to_string(task.join("stat")).ok()?;
        // Fields after the name's closing parenthesis start at field 3 of proc(5).
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        Some(ThreadInfo {
            tid: task.file_name()?.to_str()?.parse().ok()?,
            name: std::fs::read_to_string(task.join("comm")).ok()?.trim().to_string(),
            cpus: status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?.trim().to_string(),
            nice: fields[19 - 3].parse().ok()?,
            policy: fields[41 - 3].parse().ok()?,
            cpu_time: tensor_wasm::cpu::cpu_time_from_stat(&stat)?,
        })
    };
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    tasks.filter_map(|t| read(&t.ok()?.path())).collect()
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The sum of a metric's samples whose label set contains every `labels` pair.
pub fn sum_metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            if metric != name {
                return None;
            }
            let all = labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            all.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
    /// The `kind` of an error body, after checking the body has the error shape.
    pub fn error_kind(&self) -> String {
        let v = self.json();
        assert!(v["error"]["message"].is_string(), "error body without message: {v}");
        v["error"]["kind"].as_str().unwrap_or_else(|| panic!("not an error body: {v}")).to_string()
    }
}

/// A keep-alive HTTP/1.1 client on one connection.
pub struct Client {
    pub stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        Client::over(TcpStream::connect(addr).expect("connect"))
    }

    /// A client on a connection already made: for a caller that must survive a refused connect.
    pub fn over(stream: TcpStream) -> Client {
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Client { stream, reader }
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.try_send_raw(bytes).expect("write");
    }

    pub fn try_send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    pub fn request(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
        self.try_request(method, path, headers, body).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    pub fn try_request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<Response> {
        self.stream.write_all(&encode_request(method, path, headers, body))?;
        self.read_response_to(method)
    }

    pub fn read_response(&mut self) -> Response {
        self.read_response_to("GET").expect("read response")
    }

    fn read_response_to(&mut self, method: &str) -> std::io::Result<Response> {
        let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
        let mut line = String::new();
        loop {
            line.clear();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed"));
            }
            // Interim 1xx responses carry no body: skip them and their blank line.
            let status: u16 = line.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| bad(&line))?;
            let mut headers = Vec::new();
            loop {
                let mut h = String::new();
                self.reader.read_line(&mut h)?;
                let h = h.trim_end();
                if h.is_empty() {
                    break;
                }
                let (n, v) = h.split_once(':').ok_or_else(|| bad(h))?;
                headers.push((n.trim().to_string(), v.trim().to_string()));
            }
            if (100..200).contains(&status) {
                continue;
            }
            let len = headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                .map(|(_, v)| v.parse::<usize>().unwrap())
                .unwrap_or(0);
            let mut body = vec![0; if method == "HEAD" || status == 204 { 0 } else { len }];
            self.reader.read_exact(&mut body)?;
            return Ok(Response { status, headers, body });
        }
    }

    pub fn deploy(&mut self, name: &str, wasm: &[u8], extra: serde_json::Value) -> Response {
        let mut body = serde_json::json!({
            "name": name,
            "wasm_b64": base64::engine::general_purpose::STANDARD.encode(wasm),
        });
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        self.request("POST", "/functions", &[("content-type", "application/json")], body.to_string().as_bytes())
    }

    pub fn invoke(&mut self, id: &str, body: &[u8]) -> Response {
        self.request("POST", &format!("/functions/{id}/invoke"), &[], body)
    }

    /// True when the server has closed this connection (EOF within `wait`).
    pub fn is_closed(&mut self, wait: Duration) -> bool {
        self.stream.set_read_timeout(Some(wait)).unwrap();
        let mut b = [0u8; 1];
        let closed = matches!(self.reader.read(&mut b), Ok(0));
        self.stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        closed
    }
}

pub fn encode_request(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nhost: test\r\n");
    for (n, v) in headers {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    let chunked = headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("transfer-encoding"));
    if !chunked && (!body.is_empty() || method == "POST") {
        out.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// Makes `io_uring_setup` fail with EPERM in the child, as container runtimes' default seccomp
/// profiles do.
pub fn deny_io_uring(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    const IO_URING_SETUP: u32 = 425; // the same number on every architecture
                                     // SAFETY: between fork and exec we only call prctl with a filter that lives on this stack.
    unsafe {
        cmd.pre_exec(|| {
            let mut filter = [
                libc::sock_filter { code: 0x20, jt: 0, jf: 0, k: 0 }, // ld [nr]
                libc::sock_filter { code: 0x15, jt: 0, jf: 1, k: IO_URING_SETUP }, // jeq
                libc::sock_filter { code: 0x06, jt: 0, jf: 0, k: 0x0005_0000 | libc::EPERM as u32 }, // ret errno
                libc::sock_filter { code: 0x06, jt: 0, jf: 0, k: 0x7fff_0000 }, // ret allow
            ];
            let prog = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_mut_ptr() };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(libc::PR_SET_SECCOMP, 2, &prog as *const libc::sock_fprog) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
