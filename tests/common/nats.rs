//! A real NATS server with JetStream (Debian's `nats-server`, which `./test` installs), started
//! by a test on a loopback port with a store dir of its own, for the fleet's registry.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{free_port, within};

pub struct Nats {
    child: Option<Child>,
    pub port: u16,
    store: tempfile::TempDir,
}

impl Nats {
    /// Starts `nats-server -js` and waits until it accepts connections.
    pub fn start() -> Nats {
        let mut nats = Nats { child: None, port: free_port().port(), store: tempfile::tempdir().unwrap() };
        nats.restart();
        nats
    }

    /// The registry flag that points a replica here.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL): its clients see the connection drop.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        within(Duration::from_secs(5), "nats-server's port closing", || {
            TcpStream::connect(("127.0.0.1", self.port)).is_err()
        });
    }

    /// Stops the server and starts it on the same port with an empty store: a NATS whose storage
    /// was lost.
    pub fn wipe(&mut self) {
        self.stop();
        self.store = tempfile::tempdir().unwrap();
        self.restart();
    }

    /// Starts the server again on the same port and store: JetStream keeps what it held.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "nats-server runs already");
        let binary = which("nats-server")
            .unwrap_or_else(|| panic!("nats-server is not installed: run ./test, which installs it from Debian"));
        let child = Command::new(binary)
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string(), "-sd"])
            .arg(self.store.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nats-server");
        self.child = Some(child);
        within(Duration::from_secs(10), "nats-server accepting connections", || {
            TcpStream::connect(("127.0.0.1", self.port)).is_ok()
        });
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `name` on the PATH, or in the sbin folders Debian installs servers to.
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"])
        .map(|d| PathBuf::from(d).join(name))
        .find(|p| p.is_file());
    found
}
