//! The server under test: one the harness starts (TensorWasm or the conventional baseline), or a
//! live deployment named by URL.

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tensor_wasm::client::{ClientTls, Target};

use super::client::{encode, Connection, Response, Tls};

/// How long a started server may take to print its address and become ready.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// The I/O timeout of the harness's own set-up requests (deploys included).
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Which server implementation a started target runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Implementation {
    TensorWasm,
    Baseline,
}

impl Implementation {
    pub fn name(self) -> &'static str {
        match self {
            Implementation::TensorWasm => "tensor-wasm",
            Implementation::Baseline => "baseline",
        }
    }
}

/// Where requests go and what identity they carry.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// The `host` header.
    pub host: String,
    pub token: Option<String>,
    pub tenant: Option<u64>,
    /// For an https:// server.
    pub tls: Option<Tls>,
}

impl Endpoint {
    /// An endpoint from `http://host[:port]` or `https://host[:port]`. An https:// server is
    /// checked against `tls`'s CAs and offered its client certificate, or checked against the
    /// system's trust store where `tls` is `None`; an http:// one ignores `tls`.
    pub fn from_url(
        url: &str,
        token: Option<String>,
        tenant: Option<u64>,
        tls: Option<&ClientTls>,
    ) -> Result<Endpoint, String> {
        let target = Target::parse(url).map_err(|e| format!("--server `{url}`: {e}"))?;
        if target.path != "/" {
            // The scenarios' routes are the API's own, from the root.
            return Err(format!("--server `{url}`: give the server's root URL, without a path"));
        }
        let addr = (target.host.as_str(), target.port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve `{}`: {e}", target.host))?
            .next()
            .ok_or_else(|| format!("`{}` resolves to no address", target.host))?;
        let tls = match (target.tls, tls) {
            (false, _) => None,
            (true, Some(client)) => Some(Tls::new(client, &target.host)?),
            (true, None) => Some(Tls::new(&ClientTls::system()?, &target.host)?),
        };
        Ok(Endpoint { addr, host: target.authority(), token, tenant, tls })
    }

    /// This endpoint acting with another token and tenant.
    pub fn acting_as(&self, token: Option<String>, tenant: Option<u64>) -> Endpoint {
        Endpoint { token, tenant, ..self.clone() }
    }

    /// A request with this endpoint's host, token and tenant, encoded once.
    pub fn request(&self, method: &str, path: &str, body: &[u8]) -> Vec<u8> {
        let bearer = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let tenant = self.tenant.map(|t| t.to_string());
        let mut headers: Vec<(&str, &str)> = Vec::new();
        if let Some(b) = &bearer {
            headers.push(("authorization", b));
        }
        if let Some(t) = &tenant {
            headers.push(("x-tensor-wasm-tenant", t));
        }
        if !body.is_empty() {
            headers.push(("content-type", "application/json"));
        }
        encode(method, path, &self.host, &headers, body)
    }

    /// One set-up request on a fresh connection.
    pub fn call(&self, method: &str, path: &str, body: &[u8]) -> Result<Response, String> {
        let mut conn = Connection::connect(self.addr, self.tls.as_ref(), SETUP_TIMEOUT)
            .map_err(|e| format!("{}: {e}", self.addr))?;
        conn.round_trip(&self.request(method, path, body)).map_err(|e| format!("{method} {path}: {e}"))
    }

    /// The server's `/metrics` text.
    pub fn metrics(&self) -> Result<String, String> {
        let r = self.call("GET", "/metrics", b"")?;
        if r.status != 200 {
            return Err(format!("GET /metrics answered {}: {}", r.status, r.text()));
        }
        Ok(r.text())
    }
}

/// TLS for the servers the harness starts (`--tls`): a fresh self-signed certificate for
/// `localhost` and 127.0.0.1, the files ours is started with, and a client that trusts it and
/// nothing else. What a deployment's TLS costs does not depend on who signed its certificate,
/// since the harness's keep-alive connections handshake once, before the schedule starts.
#[derive(Clone, Debug)]
pub struct StartedTls {
    /// Holds `cert.pem` and `key.pem`; removed with the last clone.
    dir: Arc<tempfile::TempDir>,
    pub client: Tls,
}

impl StartedTls {
    pub fn self_signed() -> Result<StartedTls, String> {
        const NAME: &str = "localhost";
        let made = rcgen::generate_simple_self_signed(vec![NAME.to_string(), "127.0.0.1".to_string()])
            .map_err(|e| format!("cannot make a self-signed certificate: {e}"))?;
        let dir = tempfile::tempdir().map_err(|e| format!("cannot make a folder for the certificate: {e}"))?;
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        for (path, pem) in [(&cert, made.cert.pem()), (&key, made.signing_key.serialize_pem())] {
            std::fs::write(path, pem).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        }
        let client = Tls::new(&ClientTls::new(Some(&cert), None)?, NAME)?;
        Ok(StartedTls { dir: Arc::new(dir), client })
    }

    /// The certificate's PEM file, which is also the only CA its client trusts.
    pub fn cert(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }

    /// The flags that make ours speak TLS with this certificate.
    pub fn server_args(&self) -> [String; 4] {
        let key = self.dir.path().join("key.pem");
        ["--tls-cert".into(), self.cert().display().to_string(), "--tls-key".into(), key.display().to_string()]
    }
}

/// A server process the harness started. Killed when dropped.
pub struct StartedServer {
    child: Child,
    pub implementation: Implementation,
    pub endpoint: Endpoint,
    _data_dir: tempfile::TempDir,
}

impl StartedServer {
    /// Starts `binary` on an ephemeral loopback port with a fresh data dir, `shards` shards or
    /// worker threads, confined to `cpus` when given, with `args` and `env`, and waits until it
    /// is ready: over TLS where `tls` is given (and `args` make the server speak it). The server is
    /// killed when the thread that calls this exits (see `tie_child`), so call it from one that
    /// outlives the server.
    pub fn start(
        implementation: Implementation,
        binary: &Path,
        shards: usize,
        cpus: Option<&[usize]>,
        args: &[String],
        env: &[(String, String)],
        tls: Option<&Tls>,
    ) -> Result<StartedServer, String> {
        let data_dir = tempfile::tempdir().map_err(|e| format!("cannot make a data dir: {e}"))?;
        let mut cmd = Command::new(binary);
        match implementation {
            Implementation::TensorWasm => {
                cmd.arg("serve").arg("--data-dir").arg(data_dir.path()).args(["--log-level", "warn"]);
                // A shard is pinned where the servers have CPUs of their own, also where the scale
                // curve runs fewer shards than there are CPUs (which `--pin-shards auto` would let
                // float). Where the generator shares the CPUs, a pinned shard must wait for it
                // while the other CPU idles, and the baseline's threads, which float, need not:
                // there the shards float too (perf/METHOD.md, "How load is generated", and HISTORY.md).
                let pin = if cpus.is_some() { "always" } else { "never" };
                cmd.args(["--shards", &shards.to_string(), "--pin-shards", pin]);
            }
            Implementation::Baseline => {
                cmd.args(["--threads", &shards.to_string()]);
            }
        }
        cmd.args(["--listen", "127.0.0.1:0"]).args(args);
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        tie_child(&mut cmd, cpus)
            .map_err(|e| format!("cannot confine {} to CPUs {cpus:?}: {e}", implementation.name()))?;
        let mut child = cmd.spawn().map_err(|e| format!("cannot run {}: {e}", binary.display()))?;

        // The first line of stdout is `listening on ADDR`; stderr is kept for the error message.
        let stdout = child.stdout.take().expect("piped");
        let mut stderr = child.stderr.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            for _ in lines {}
        });
        let (err_tx, err_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            let _ = err_tx.send(text);
        });
        let fail = |mut child: Child, what: String| {
            let _ = child.kill();
            let _ = child.wait();
            let log = err_rx.recv_timeout(Duration::from_secs(2)).unwrap_or_default();
            Err(format!("{} {what}; its log:\n{log}", implementation.name()))
        };
        let line = match rx.recv_timeout(START_TIMEOUT) {
            Ok(Some(Ok(line))) => line,
            _ => return fail(child, "did not start".into()),
        };
        let Some(addr) = line.strip_prefix("listening on ").and_then(|a| a.parse::<SocketAddr>().ok()) else {
            return fail(child, format!("printed `{line}` instead of its address"));
        };
        let endpoint = Endpoint { addr, host: addr.to_string(), token: None, tenant: None, tls: tls.cloned() };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if endpoint.call("GET", "/readyz", b"").is_ok_and(|r| r.status == 200) {
                break;
            }
            if Instant::now() > deadline {
                return fail(child, "never became ready".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(cpus) = cpus {
            let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
            let actual = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).map(str::trim);
            let asked = tensor_wasm::cpu::format_list(cpus);
            if actual != Some(asked.as_str()) {
                let actual = actual.unwrap_or("that /proc does not show");
                return fail(child, format!("runs on CPUs {actual}, not on {asked} as asked"));
            }
        }
        Ok(StartedServer { child, implementation, endpoint, _data_dir: data_dir })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for StartedServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Ties the process `cmd` starts to this one: it is killed when the harness dies, however the
/// harness dies (a started server left behind would skew every later measurement on the
/// machine), and with `cpus` it runs on those CPUs only, from its first instruction (TensorWasm
/// pins its shards to the first CPUs of the set it starts with; tokio's workers inherit it).
pub(super) fn tie_child(cmd: &mut Command, cpus: Option<&[usize]>) -> std::io::Result<()> {
    use std::os::unix::process::CommandExt as _;
    let set = cpus.map(tensor_wasm::cpu::cpu_set).transpose()?;
    // SAFETY: the closure runs between fork and exec, where only async-signal-safe calls are
    // allowed; it makes plain system calls on values built before the fork, and allocates nothing.
    // The parent-death signal belongs to the spawning thread, the harness's main thread, which
    // lives as long as the run.
    let harness = std::process::id();
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The harness died before the signal was armed: do not start an orphan.
            if u32::try_from(libc::getppid()).ok() != Some(harness) {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            match &set {
                Some(set) => tensor_wasm::cpu::apply_cpu_set(set),
                None => Ok(()),
            }
        });
    }
    Ok(())
}

/// The binary `name` beside the running executable, as cargo lays out `target/<profile>/`.
pub fn sibling_binary(name: &str) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    // Test executables live one level down, in `deps/`.
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "{} does not exist; build it with `cargo build --release --workspace --bins`, or name it with a flag",
            path.display()
        ))
    }
}
