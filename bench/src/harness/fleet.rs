//! The fleet scenario (issue 35): three replicas sharing a NATS JetStream registry, against one
//! node with the file registry, on this machine.
//!
//! The harness starts `nats-server -js` (Debian's, found on PATH or in /usr/sbin) on a loopback
//! port with a store of its own, then:
//!
//! 1. the single node: `DEPLOYS` deploys of distinct modules, timed, then the hello load at the
//!    run's rate (a [`Measurement`], with the server's CPU per answer);
//! 2. three replicas with `--registry nats://…`: the same deploys, round robin over the replicas,
//!    each timed, and for each the time from its 201 to the first 200 of an invoke on each other
//!    replica (the propagation, polled every `POLL`); then the same hello load on the first
//!    replica while the other two stay connected.
//!
//! Judged: propagation P99 at most [`PROPAGATION_P99_MS`] (the bound), and the replica's
//! CPU per invoke at most [`INVOKE_CPU_RATIO`] times the single node's: the registry is never on
//! the invoke path, so the two cost the same but for this machine's noise.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use super::guests;
use super::interrupt;
use super::measure::{LatencySummary, Measurement};
use super::scenario::{deploy, Scenario};
use super::session::{cpu_count, ServerSource, Session, Settings};
use super::target::{tie_child, Endpoint, Implementation, StartedServer};

/// Deploys timed on each side.
const DEPLOYS: usize = 30;
/// Replicas of the fleet.
const REPLICAS: usize = 3;
/// How often another replica is asked whether it serves a new function yet.
const POLL: Duration = Duration::from_millis(1);
/// A deploy that has not reached a replica by then is an error, not a slow sample.
const PROPAGATION_GIVE_UP: Duration = Duration::from_secs(10);
/// The bound for a deploy to reach every replica.
pub const PROPAGATION_P99_MS: f64 = 1000.0;
/// A replica's CPU per invoke over the single node's, at most: equal, but for a shared VM's noise
/// between two runs of a few seconds each (perf/METHOD.md, "Noise").
pub const INVOKE_CPU_RATIO: f64 = 1.25;

/// What the fleet scenario measured.
#[derive(Clone, Debug, Serialize)]
pub struct FleetRun {
    pub replicas: usize,
    pub deploys: usize,
    /// From a deploy's 201 on one replica to a 200 on the slowest other one, in µs.
    pub propagation: LatencySummary,
    /// Deploys answered by a replica (the registry acknowledged the module and the record).
    pub deploy_fleet: LatencySummary,
    /// Deploys answered by the single node.
    pub deploy_single: LatencySummary,
    /// Hello at the run's rate on the single node, and on the first replica of the fleet.
    pub single: Measurement,
    pub replica: Measurement,
    /// The replica's server CPU per answer over the single node's.
    pub invoke_cpu_ratio: Option<f64>,
    pub pass: bool,
}

/// Runs the scenario at `rate` invokes a second.
pub fn run(source: &ServerSource, rate: f64, settings: &Settings) -> Result<FleetRun, String> {
    let ServerSource::Start { binary, shards, cpus, tls: None, .. } = source else {
        return Err(
            "the fleet scenario starts its own replicas and NATS, in plain HTTP: leave out --server and --tls".into()
        );
    };
    let shards = shards
        .unwrap_or_else(|| Scenario::Fleet.default_shards(Implementation::TensorWasm, cpu_count(cpus.as_deref())));
    let start = |args: Vec<String>| {
        StartedServer::start(Implementation::TensorWasm, binary, shards, cpus.as_deref(), &args, &[], None)
    };

    // The single node first, alone on the machine.
    let node = start(Vec::new())?;
    let deploy_single = time_deploys(std::slice::from_ref(&node.endpoint), "single", None)?;
    let mut single = Session::started(node, Scenario::Fleet, shards, settings)?.measure(rate, settings)?;
    single.server = "tensor-wasm, single node";

    let nats = Nats::start()?;
    let registry = vec!["--registry".to_string(), nats.url()];
    let replicas: Vec<StartedServer> = (0..REPLICAS).map(|_| start(registry.clone())).collect::<Result<_, _>>()?;
    let endpoints: Vec<Endpoint> = replicas.iter().map(|r| r.endpoint.clone()).collect();
    let mut propagation = histogram();
    let deploy_fleet = time_deploys(&endpoints, "fleet", Some(&mut propagation))?;
    let mut replicas = replicas.into_iter();
    let first = replicas.next().ok_or("no replica started")?;
    // The others stay up, connected, watching: what a replica of a fleet carries beside its load.
    let _others: Vec<StartedServer> = replicas.collect();
    let mut replica = Session::started(first, Scenario::Fleet, shards, settings)?.measure(rate, settings)?;
    replica.server = "tensor-wasm, fleet replica";
    drop(nats);

    let invoke_cpu_ratio = match (replica.cpu.server_us_per_answer, single.cpu.server_us_per_answer) {
        (Some(r), Some(s)) if s > 0.0 => Some(r / s),
        _ => None,
    };
    let propagation = LatencySummary::of(&propagation);
    let pass = propagation.p99_us / 1e3 <= PROPAGATION_P99_MS
        && invoke_cpu_ratio.is_some_and(|r| r <= INVOKE_CPU_RATIO)
        && single.pass
        && replica.pass;
    Ok(FleetRun {
        replicas: REPLICAS,
        deploys: DEPLOYS,
        propagation,
        deploy_fleet,
        deploy_single,
        single,
        replica,
        invoke_cpu_ratio,
        pass,
    })
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds")
}

/// Deploys `DEPLOYS` distinct modules round robin over `endpoints`, timing each; with
/// `propagation`, also the time from each 201 until every other endpoint serves it.
fn time_deploys(
    endpoints: &[Endpoint],
    label: &str,
    mut propagation: Option<&mut Histogram<u64>>,
) -> Result<LatencySummary, String> {
    let mut deploys = histogram();
    for i in 0..DEPLOYS {
        if interrupt::interrupted() {
            return Err(interrupt::MESSAGE.into());
        }
        let at = &endpoints[i % endpoints.len()];
        let started = Instant::now();
        let id = deploy(at, &format!("bench-fleet-{label}-{i}"), &guests::unique_hello(i as u64))?;
        let answered = Instant::now();
        deploys.saturating_record(answered.duration_since(started).as_nanos() as u64);
        if let Some(propagation) = propagation.as_deref_mut() {
            let others = endpoints.iter().filter(|e| e.addr != at.addr);
            let mut slowest = Duration::ZERO;
            for other in others {
                slowest = slowest.max(until_served(other, &id, answered)?);
            }
            propagation.saturating_record(slowest.as_nanos() as u64);
        }
    }
    Ok(LatencySummary::of(&deploys))
}

/// How long after `since` `endpoint` first answers an invoke of `id` with 200.
fn until_served(endpoint: &Endpoint, id: &str, since: Instant) -> Result<Duration, String> {
    let path = format!("/functions/{id}/invoke");
    loop {
        let r = endpoint.call("POST", &path, b"")?;
        if r.status == 200 {
            return Ok(since.elapsed());
        }
        if r.status != 404 {
            return Err(format!("an invoke of {id} on {} answered {}: {}", endpoint.addr, r.status, r.text()));
        }
        if since.elapsed() > PROPAGATION_GIVE_UP {
            return Err(format!("{id} did not reach {} within {PROPAGATION_GIVE_UP:?}", endpoint.addr));
        }
        std::thread::sleep(POLL);
    }
}

/// A `nats-server -js` on a loopback port, with a store of its own; killed when dropped.
struct Nats {
    child: Child,
    addr: SocketAddr,
    _store: tempfile::TempDir,
}

impl Nats {
    fn start() -> Result<Nats, String> {
        let binary = ["/usr/bin/nats-server", "/usr/sbin/nats-server", "/usr/local/bin/nats-server"]
            .into_iter()
            .map(PathBuf::from)
            .chain(std::env::var_os("PATH").iter().flat_map(std::env::split_paths).map(|d| d.join("nats-server")))
            .find(|p| p.is_file())
            .ok_or("the fleet scenario needs nats-server (Debian: apt install nats-server; ./test installs it)")?;
        let store = tempfile::tempdir().map_err(|e| format!("cannot make a folder for NATS: {e}"))?;
        // A free port: bound, read, released, then taken by the server.
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(|e| e.to_string())?.port();
        let mut cmd = Command::new(&binary);
        cmd.args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(store.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // Killed with the harness, however it dies, like the servers.
        tie_child(&mut cmd, None).map_err(|e| format!("cannot tie nats-server to the harness: {e}"))?;
        let child = cmd.spawn().map_err(|e| format!("cannot run {}: {e}", binary.display()))?;
        let nats = Nats { child, addr: SocketAddr::from(([127, 0, 0, 1], port)), _store: store };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(nats.addr).is_err() {
            if Instant::now() > deadline {
                return Err(format!("nats-server did not listen on {} within 10 s", nats.addr));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(nats)
    }

    fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
