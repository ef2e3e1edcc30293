//! The session room: the server under test, started here or reached by URL, with one
//! scenario deployed on it, for as long as the scenario runs (`Session`). What it measures is in
//! [`super::measure`]; how it searches for the best rate is in [`super::search`].

use std::path::PathBuf;
use std::time::Duration;

use super::scenario::{Prepared, Scenario, ScenarioOptions};
use super::slo::Gate;
use super::target::{Endpoint, Implementation, StartedServer, StartedTls};

/// How every measurement of a harness run is taken.
#[derive(Clone, Debug)]
pub struct Settings {
    pub connections: usize,
    /// Load-generator threads.
    pub threads: usize,
    /// The generator's threads poll instead of sleeping (`LoadPlan::spin`).
    pub spin: bool,
    pub warmup: Duration,
    pub duration: Duration,
    pub io_timeout: Duration,
    pub p99_override: Option<Duration>,
    pub gate: Gate,
    /// Deploys per second beside the load in the deploy-storm scenario.
    pub storm_rate: f64,
    pub scenario: ScenarioOptions,
    pub progress: bool,
}

/// Why a run cannot start the baseline with TLS.
pub const BASELINE_WITHOUT_TLS: &str = "the baseline server speaks plain HTTP only; compare without --tls";

/// Where the server under test comes from.
#[derive(Clone, Debug)]
pub enum ServerSource {
    /// A live server; the harness only sends requests.
    Remote(Endpoint),
    /// A server process the harness starts for each scenario, with a fresh data dir.
    /// `shards`: the shard count (baseline: tokio workers); `None` for the scenario's default.
    /// `cpus`: the CPUs the server is confined to; `None` for the harness's own.
    /// `tls`: ours speaks TLS with it (the baseline speaks plain HTTP only).
    Start {
        binary: PathBuf,
        baseline_binary: Option<PathBuf>,
        shards: Option<usize>,
        cpus: Option<Vec<usize>>,
        tls: Option<StartedTls>,
    },
}

impl ServerSource {
    /// Whether the server under test is reached over TLS.
    pub fn speaks_tls(&self) -> bool {
        match self {
            ServerSource::Remote(endpoint) => endpoint.tls.is_some(),
            ServerSource::Start { tls, .. } => tls.is_some(),
        }
    }
}

/// A server ready for one scenario, and the scenario deployed on it.
pub struct Session {
    pub scenario: Scenario,
    pub server: &'static str,
    pub shards: Option<usize>,
    pub(super) endpoint: Endpoint,
    pub(super) prepared: Prepared,
    pub(super) process: Option<StartedServer>,
}

impl Session {
    /// Starts (or reaches) the server for `scenario` and deploys what it needs.
    pub fn open(
        source: &ServerSource,
        implementation: Implementation,
        scenario: Scenario,
        shards: Option<usize>,
        settings: &Settings,
    ) -> Result<Session, String> {
        if !scenario.runs_on(implementation) {
            return Err(format!("the {} server cannot run the {} scenario", implementation.name(), scenario.name()));
        }
        match source {
            ServerSource::Remote(endpoint) => {
                let prepared = scenario.prepare(endpoint, false, &settings.scenario)?;
                let endpoint = endpoint.clone();
                Ok(Session { scenario, server: implementation.name(), shards: None, endpoint, prepared, process: None })
            }
            ServerSource::Start { binary, baseline_binary, shards: configured, cpus, tls } => {
                let binary = match implementation {
                    Implementation::TensorWasm => binary.clone(),
                    Implementation::Baseline if tls.is_some() => return Err(BASELINE_WITHOUT_TLS.into()),
                    Implementation::Baseline => {
                        baseline_binary.clone().ok_or("the baseline server's binary was not found (--baseline-bin)")?
                    }
                };
                let shards = shards
                    .or(*configured)
                    .unwrap_or_else(|| scenario.default_shards(implementation, cpu_count(cpus.as_deref())));
                let mut extra = scenario.server_settings(&settings.scenario, shards);
                extra.args.extend(tls.iter().flat_map(StartedTls::server_args));
                let process = StartedServer::start(
                    implementation,
                    &binary,
                    shards,
                    cpus.as_deref(),
                    &extra.args,
                    &extra.env,
                    tls.as_ref().map(|t| &t.client),
                )?;
                Session::started(process, scenario, shards, settings)
            }
        }
    }

    /// A session on a server the harness started with `shards` (and whatever the scenario's
    /// flags): deploys what `scenario` needs on it.
    pub fn started(
        process: StartedServer,
        scenario: Scenario,
        shards: usize,
        settings: &Settings,
    ) -> Result<Session, String> {
        let endpoint = process.endpoint.clone();
        let prepared = scenario.prepare(&endpoint, true, &settings.scenario)?;
        let server = process.implementation.name();
        Ok(Session { scenario, server, shards: Some(shards), endpoint, prepared, process: Some(process) })
    }

    /// The server under test, as the scenario's own identity reaches it.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The process id of the server, where the harness started it.
    pub fn server_pid(&self) -> Option<u32> {
        self.process.as_ref().map(StartedServer::pid)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // A started server goes away with its data; a live one gets its functions deleted.
        if self.process.is_none() {
            for problem in self.prepared.clean_up() {
                eprintln!("tensor-wasm-bench: clean-up: {problem}");
            }
        }
    }
}

/// How many CPUs a started server gets: `cpus` when it is confined to them, else every CPU the
/// harness may use. Default shard counts follow it.
pub fn cpu_count(cpus: Option<&[usize]>) -> usize {
    cpus.map_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()), <[usize]>::len)
}
