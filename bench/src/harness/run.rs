//! Running scenarios: one rate, a step search for the highest rate within the SLO, the
//! side-by-side with the baseline, and the shard-scaling curve.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tensor_wasm::metrics::exposition::{self, ScrapedHistogram};

use super::guests;
use super::interrupt;
use super::load::{self, LoadOutcome, LoadPlan, Progress};
use super::scenario::{deploy, Prepared, Scenario, ScenarioOptions};
use super::scrape::{self, HistogramSeries};
use super::slo::{Gate, Measure, Verdict};
use super::target::{Endpoint, Implementation, StartedServer, StartedTls};
use crate::histogram;

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
    endpoint: Endpoint,
    prepared: Prepared,
    process: Option<StartedServer>,
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
        let (endpoint, process, shards) = match source {
            ServerSource::Remote(endpoint) => (endpoint.clone(), None, None),
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
                (process.endpoint.clone(), Some(process), Some(shards))
            }
        };
        let prepared = scenario.prepare(&endpoint, process.is_some(), &settings.scenario)?;
        Ok(Session { scenario, server: implementation.name(), shards, endpoint, prepared, process })
    }

    /// One measurement at `rate` requests per second.
    pub fn measure(&self, rate: f64, settings: &Settings) -> Result<Measurement, String> {
        self.measure_beside(rate, settings, |_| ()).map(|(m, ())| m)
    }

    /// One measurement at `rate` requests per second, with `beside` running on a thread of its
    /// own from the start of the warm-up until the load ends: it must return soon after the flag
    /// it is given clears (the hostile scenario's attacks). What it returns comes back with the
    /// measurement, after it returned.
    pub fn measure_beside<T: Send>(
        &self,
        rate: f64,
        settings: &Settings,
        beside: impl FnOnce(&AtomicBool) -> T + Send,
    ) -> Result<(Measurement, T), String> {
        let plan = LoadPlan {
            addr: self.endpoint.addr,
            tls: self.endpoint.tls.clone(),
            rate,
            warmup: settings.warmup,
            duration: settings.duration,
            connections: settings.connections,
            threads: settings.threads,
            classes: self.prepared.classes.clone(),
            io_timeout: settings.io_timeout,
            spin: settings.spin,
        };
        let metrics_before = self.server_metrics();
        let progress = Progress::default();
        let server_cpu_before = self.process.as_ref().and_then(|p| cpu_seconds(p.pid()));
        let harness_cpu_before = cpu_seconds(std::process::id());
        let machine_before = machine_ticks();
        let running = AtomicBool::new(true);
        let label = format!("{} on {} at {rate:.0}/s", self.scenario.name(), self.server);
        let (outcome, storm, memory, beside) = std::thread::scope(|scope| {
            let beside = {
                let running = &running;
                scope.spawn(move || beside(running))
            };
            let memory = self.process.as_ref().map(|p| {
                let (pid, running, warmup) = (p.pid(), &running, settings.warmup);
                scope.spawn(move || sample_memory(pid, warmup, running))
            });
            let storm = self.prepared.storm.then(|| {
                let endpoint = &self.endpoint;
                let running = &running;
                let rate = settings.storm_rate;
                scope.spawn(move || storm(endpoint, rate, running))
            });
            let reporter = settings.progress.then(|| {
                let (progress, running) = (&progress, &running);
                let total = settings.warmup + settings.duration;
                let label = &label;
                scope.spawn(move || report_progress(label, total, progress, running))
            });
            let outcome = load::run(&plan, &progress);
            running.store(false, Ordering::Relaxed);
            let storm = storm.map(|h| h.join().expect("the storm thread does not panic"));
            if let Some(h) = reporter {
                let _ = h.join();
            }
            let memory = memory.and_then(|h| h.join().ok().flatten());
            let beside = beside.join();
            (outcome, storm, memory, beside)
        });
        let beside = beside.map_err(|_| "the work beside the load panicked".to_string())?;
        let outcome = outcome?;
        if interrupt::interrupted() {
            return Err(interrupt::MESSAGE.into());
        }
        // CPU per answer, over the whole plan (warm-up included, as its answers are counted too).
        let answered = progress.answered.load(Ordering::Relaxed).max(1) as f64;
        let per_answer = |before: Option<f64>, after: Option<f64>| Some((after? - before?) / answered * 1e6);
        let cpu = CpuReport {
            server_us_per_answer: per_answer(
                server_cpu_before,
                self.process.as_ref().and_then(|p| cpu_seconds(p.pid())),
            ),
            harness_us_per_answer: per_answer(harness_cpu_before, cpu_seconds(std::process::id())),
            stolen_percent: machine_before.zip(machine_ticks()).and_then(|((total0, stolen0), (total1, stolen1))| {
                (total1 > total0).then(|| 100.0 * (stolen1 - stolen0) as f64 / (total1 - total0) as f64)
            }),
        };
        let metrics_after = self.server_metrics();
        let over_the_run = |series: HistogramSeries| {
            BucketQuantiles::of(&scrape::between(metrics_before.as_ref()?, metrics_after.as_ref()?, series))
        };
        let dispatch =
            matches!(self.scenario, Scenario::Tensor).then(|| over_the_run(scrape::KERNEL_LATENCY)).flatten();
        let in_server = over_the_run(scrape::request_duration(self.scenario.route().template()));
        let mut measurement = Measurement::new(self, &outcome, cpu, dispatch, storm, settings);
        measurement.server_memory = memory;
        measurement.in_server = in_server;
        Ok((measurement, beside))
    }

    /// The server under test, as the scenario's own identity reaches it.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The process id of the server, where the harness started it.
    pub fn server_pid(&self) -> Option<u32> {
        self.process.as_ref().map(StartedServer::pid)
    }

    /// Searches for the highest rate within the SLO along `plan` (`StepPlan::search`). A missed
    /// step, bisections included, is measured again while the machine stalled during it
    /// (`machine_stalled`), up to `MEASUREMENTS_PER_RATE` times; every measurement stays in the
    /// record.
    pub fn step_search(&self, plan: &StepPlan, settings: &Settings) -> Result<StepSearch, String> {
        let mut steps: Vec<Measurement> = Vec::new();
        let verdicts = plan.search(|rate| {
            let pass = self.measure_again_if(rate, settings, &mut steps, |m| !m.pass && m.machine_stalled)?;
            pause_between_steps();
            Ok(pass)
        })?;
        let best = verdicts.best().and_then(|r| steps.iter().rposition(|m| m.pass && m.offered_rate == r));
        Ok(StepSearch { scenario: self.scenario.name(), server: self.server, shards: self.shards, steps, best })
    }

    /// Measures `rate` onto `record`, again while `again` holds for the last measurement, at most
    /// `MEASUREMENTS_PER_RATE` times in all (every one stays in the record); whether the last one
    /// passed.
    pub fn measure_again_if(
        &self,
        rate: f64,
        settings: &Settings,
        record: &mut Vec<Measurement>,
        again: impl Fn(&Measurement) -> bool,
    ) -> Result<bool, String> {
        let mut attempts = 0;
        loop {
            let m = self.measure(rate, settings)?;
            attempts += 1;
            let (pass, retry) = (m.pass, attempts < MEASUREMENTS_PER_RATE && again(&m));
            record.push(m);
            if !retry {
                return Ok(pass);
            }
            pause_between_steps();
        }
    }

    /// The server's `/metrics`, parsed, where it has one (ours, not the baseline).
    fn server_metrics(&self) -> Option<Vec<exposition::Sample>> {
        (self.server == Implementation::TensorWasm.name())
            .then(|| self.endpoint.metrics().ok())
            .flatten()
            .map(|t| exposition::parse(&t))
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

/// The most times one rate is measured while the machine stalls. On the development VM a stall
/// lasts from seconds to minutes, so one retry often fell into the same one (perf/HISTORY.md, run
/// AA); three attempts cost at most two more windows.
const MEASUREMENTS_PER_RATE: usize = 3;

/// A generator late by more than this at P99 was stalled along with the machine.
const STALLED_GENERATOR_LAG_US: f64 = 1000.0;
/// A step in which the hypervisor took more than this share of the machine's CPU measured the
/// host. On the development VM a quiet step loses 0.0 to 0.5%; the steps that failed on host
/// stalls lost 3 to 27.5% (perf/HISTORY.md, runs G and H).
const STALLED_STEAL_PERCENT: f64 = 1.0;

/// Whether the machine, not the server, stalled during a measurement: the generator fell more
/// than a millisecond behind at P99, or the hypervisor took more than 1% of the CPU.
fn machine_stalled(generator_lag_p99_us: f64, stolen_percent: Option<f64>) -> bool {
    generator_lag_p99_us > STALLED_GENERATOR_LAG_US || stolen_percent.is_some_and(|p| p > STALLED_STEAL_PERCENT)
}

/// Lets the server drain what the last step queued before the next one starts.
fn pause_between_steps() {
    std::thread::sleep(Duration::from_millis(300));
}

/// Latency percentiles in microseconds.
#[derive(Clone, Debug, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_us: f64,
    pub p95_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
}

impl LatencySummary {
    pub fn of(h: &Histogram<u64>) -> LatencySummary {
        let us = |ns: u64| ns as f64 / 1e3;
        LatencySummary {
            count: h.len(),
            p50_us: us(h.value_at_quantile(0.50)),
            p95_us: us(h.value_at_quantile(0.95)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
            mean_us: h.mean() / 1e3,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ClassReport {
    pub name: String,
    /// Whether its latency counts toward the SLO (a class expected to be refused does not).
    pub judged: bool,
    pub latency: LatencySummary,
    /// Answers by status, as strings for JSON.
    pub statuses: BTreeMap<String, u64>,
    pub io_errors: u64,
    pub unsent: u64,
    /// Answers per second, of any status.
    pub throughput: f64,
}

/// CPU time per answered request, from /proc: the fairest comparison of two designs on a machine
/// where the load generator shares the CPUs.
#[derive(Clone, Debug, Serialize)]
pub struct CpuReport {
    /// The server process (only when the harness started it).
    pub server_us_per_answer: Option<f64>,
    /// The harness itself: the load generator's cost.
    pub harness_us_per_answer: Option<f64>,
    /// The share of the machine's CPU time its hypervisor took for other guests over the plan
    /// (`steal` in /proc/stat). Above a few percent, tail latency measures the host, not the server.
    pub stolen_percent: Option<f64>,
}

/// The server's resident memory over a run: whether it stays flat under load. Anonymous memory
/// (heap, stacks, instance slots) is what can leak; the rest of the resident set is mostly the
/// audit log's mapped segment, page cache that grows to the segment size and is released when
/// the segment is sealed.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct MemoryReport {
    /// Anonymous memory at the end of the warm-up, in MiB.
    pub anon_after_warmup_mib: f64,
    /// At the end of the run.
    pub anon_end_mib: f64,
    /// The most seen in between (sampled every 250 ms).
    pub anon_peak_mib: f64,
    /// The whole resident set at its largest, file-backed pages included.
    pub rss_peak_mib: f64,
}

/// Samples `pid`'s memory every 250 ms while `running`.
fn sample_memory(pid: u32, warmup: Duration, running: &AtomicBool) -> Option<MemoryReport> {
    let read = || -> Option<(f64, f64)> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| -> Option<f64> {
            let kib = status.lines().find_map(|l| l.strip_prefix(name))?.trim().trim_end_matches("kB").trim();
            Some(kib.parse::<f64>().ok()? / 1024.0)
        };
        Some((field("RssAnon:")?, field("VmRSS:")?))
    };
    let started = Instant::now();
    let (mut after_warmup, mut end, mut peak, mut rss_peak) = (None, None, 0.0f64, 0.0f64);
    while running.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(250));
        let Some((anon, rss)) = read() else { break };
        if after_warmup.is_none() && started.elapsed() >= warmup {
            after_warmup = Some(anon);
        }
        if after_warmup.is_some() {
            peak = peak.max(anon);
            rss_peak = rss_peak.max(rss);
        }
        end = Some(anon);
    }
    Some(MemoryReport {
        anon_after_warmup_mib: after_warmup?,
        anon_end_mib: end?,
        anon_peak_mib: peak,
        rss_peak_mib: rss_peak,
    })
}

/// How many CPUs a started server gets: `cpus` when it is confined to them, else every CPU the
/// harness may use. Default shard counts follow it.
pub fn cpu_count(cpus: Option<&[usize]>) -> usize {
    cpus.map_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()), <[usize]>::len)
}

/// The machine's CPU time so far, all CPUs and states together, and the part of it stolen, in
/// clock ticks (the `cpu` line of /proc/stat).
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<u64> = line.split_whitespace().skip(1).map(|t| t.parse().unwrap_or(0)).collect();
    // user nice system idle iowait irq softirq steal guest guest_nice; guest time is already in user.
    Some((ticks.iter().take(8).sum(), *ticks.get(7)?))
}

/// User plus system CPU seconds of process `pid` so far.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    tensor_wasm::runtime::cpu::cpu_time_from_stat(&stat).map(|t| t.as_secs_f64())
}

/// One of the server's histograms over a run (warm-up included): the upper bounds, in µs, of the
/// buckets that hold each quantile; `None` past the last finite bucket.
#[derive(Clone, Debug, Serialize)]
pub struct BucketQuantiles {
    pub samples: u64,
    pub p50_bound_us: Option<f64>,
    pub p95_bound_us: Option<f64>,
    pub p99_bound_us: Option<f64>,
}

impl BucketQuantiles {
    /// `None` for a histogram without samples.
    fn of(run: &ScrapedHistogram) -> Option<BucketQuantiles> {
        let bound = |q: f64| run.quantile_bound(q).map(|s| s * 1e6);
        (run.count() > 0.0).then(|| BucketQuantiles {
            samples: run.count() as u64,
            p50_bound_us: bound(0.50),
            p95_bound_us: bound(0.95),
            p99_bound_us: bound(0.99),
        })
    }
}

/// What the deploys beside the load did.
#[derive(Clone, Debug, Serialize)]
pub struct StormReport {
    pub deploys: u64,
    pub failed: u64,
    pub deploy_latency: LatencySummary,
    pub first_error: Option<String>,
}

/// One scenario at one rate.
#[derive(Clone, Debug, Serialize)]
pub struct Measurement {
    pub scenario: &'static str,
    pub server: &'static str,
    pub shards: Option<usize>,
    /// Every request went over TLS.
    pub tls: bool,
    pub offered_rate: f64,
    /// Answers per second of any status, over the measured window.
    pub achieved_rate: f64,
    /// The judged classes together.
    pub latency: LatencySummary,
    pub classes: Vec<ClassReport>,
    /// Every answer by status, all classes together.
    pub statuses: BTreeMap<String, u64>,
    pub io_errors: u64,
    pub unsent: u64,
    /// The generator's own lateness at P99 (µs): large values mean the load generator, not the
    /// server, fell behind.
    pub generator_lag_p99_us: f64,
    pub cpu: CpuReport,
    /// The machine stalled during the window (the generator fell behind or the hypervisor took
    /// CPU), so the window measured the machine as much as the server.
    pub machine_stalled: bool,
    /// The server's memory over the run, when the harness started the server.
    pub server_memory: Option<MemoryReport>,
    /// The server's kernel-dispatch latency over the run (the tensor scenario).
    pub dispatch: Option<BucketQuantiles>,
    /// The server's own time per request on the scenario's route over the run, where it exports
    /// one: what of the measured latency was spent inside it.
    pub in_server: Option<BucketQuantiles>,
    pub storm: Option<StormReport>,
    pub verdicts: Vec<Verdict>,
    /// Every verdict the gate counts passed.
    pub pass: bool,
}

impl Measurement {
    fn new(
        session: &Session,
        outcome: &LoadOutcome,
        cpu: CpuReport,
        dispatch: Option<BucketQuantiles>,
        storm: Option<StormReport>,
        settings: &Settings,
    ) -> Measurement {
        let seconds = outcome.measured.as_secs_f64();
        let prepared = &session.prepared;
        let mut judged = histogram();
        let (mut attempts, mut server_errors, mut failed) = (0u64, 0u64, 0u64);
        let mut statuses = BTreeMap::new();
        let classes = outcome
            .classes
            .iter()
            .map(|c| {
                let is_judged = prepared.judged(&c.name);
                if is_judged {
                    let _ = if prepared.judge_admitted { judged.add(c.admitted()) } else { judged.add(&c.latency) };
                }
                attempts += c.answered() + c.io_errors + c.unsent;
                server_errors += c.io_errors + c.unsent;
                failed += c.io_errors + c.unsent;
                for (status, n) in &c.statuses {
                    if *status >= 500 {
                        server_errors += n;
                    }
                    if !prepared.expects(&c.name, *status) {
                        failed += n;
                    }
                    *statuses.entry(status.to_string()).or_default() += n;
                }
                ClassReport {
                    name: c.name.clone(),
                    judged: is_judged,
                    latency: LatencySummary::of(&c.latency),
                    statuses: c.statuses.iter().map(|(s, n)| (s.to_string(), *n)).collect(),
                    io_errors: c.io_errors,
                    unsent: c.unsent,
                    throughput: c.answered() as f64 / seconds,
                }
            })
            .collect::<Vec<_>>();
        if let Some(s) = &storm {
            attempts += s.deploys;
            failed += s.failed;
        }
        let ratio = |n: u64| if attempts == 0 { None } else { Some(n as f64 / attempts as f64) };
        let verdicts = prepared
            .traffic
            .targets(settings.p99_override)
            .into_iter()
            .map(|target| {
                let measured = match target.measure {
                    Measure::HttpLatency { quantile } => {
                        (!judged.is_empty()).then(|| judged.value_at_quantile(quantile) as f64 / 1e9)
                    }
                    Measure::DispatchLatency { quantile } => dispatch
                        .as_ref()
                        .and_then(|d| match quantile {
                            q if q <= 0.5 => d.p50_bound_us,
                            q if q <= 0.95 => d.p95_bound_us,
                            _ => d.p99_bound_us,
                        })
                        .map(|us| us / 1e6),
                    Measure::ServerErrorRatio => ratio(server_errors),
                    Measure::FailedRatio => ratio(failed),
                    // Across measurements: `harness::hostile` judges these (`add_verdict`), and
                    // no scenario's own targets name them.
                    Measure::QuietP99Ratio | Measure::UnexpectedAnswers => None,
                };
                Verdict::judge(target, measured)
            })
            .collect::<Vec<_>>();
        let pass = verdicts.iter().filter(|v| settings.gate.gates(&v.target)).all(|v| v.pass);
        let total = outcome.total();
        let generator_lag_p99_us = outcome.lag.value_at_quantile(0.99) as f64 / 1e3;
        Measurement {
            scenario: session.scenario.name(),
            server: session.server,
            shards: session.shards,
            tls: session.endpoint.tls.is_some(),
            offered_rate: outcome.offered_rate,
            achieved_rate: total.answered() as f64 / seconds,
            latency: LatencySummary::of(&judged),
            classes,
            statuses,
            io_errors: total.io_errors,
            unsent: total.unsent,
            generator_lag_p99_us,
            machine_stalled: machine_stalled(generator_lag_p99_us, cpu.stolen_percent),
            cpu,
            server_memory: None,
            in_server: None,
            dispatch,
            storm,
            verdicts,
            pass,
        }
    }
}

impl Measurement {
    /// Adds a verdict reached outside the measurement (the hostile scenario's, against its quiet
    /// phase), and judges the measurement again with it under `gate`.
    pub fn add_verdict(&mut self, verdict: Verdict, gate: Gate) {
        self.verdicts.push(verdict);
        self.pass = self.verdicts.iter().filter(|v| gate.gates(&v.target)).all(|v| v.pass);
    }
}

/// The ramp of a step search, and how finely it narrows the edge.
#[derive(Clone, Copy, Debug)]
pub struct StepPlan {
    pub start: f64,
    /// Each step of the ramp multiplies the rate by this (above 1).
    pub factor: f64,
    pub max: f64,
    /// Bisections each time the edge is narrowed.
    pub refine: u32,
}

/// How many times one search narrows its edge: after the ramp, and again after each confirmation
/// that refutes the best rate, because the edge then lies below it, between rates that may be a
/// whole step of the ramp apart (run AP's baseline: 3,375/s confirmed, 5,062/s refuted, nothing
/// measured between). Bounded, because a server that passes every rate once and misses it the
/// second time would otherwise be bisected for ever.
const NARROWINGS: usize = 3;

impl StepPlan {
    /// The search itself, apart from how a rate is measured: `measure` says whether a rate passed.
    /// It steps the rate up from `start` by `factor`, up to `max`, until two steps in a row miss
    /// (one miss may be noise, such as a stalled vCPU), then narrows the edge above the best
    /// passing rate by `refine` bisections. Last, the best rate is confirmed: it is measured once
    /// more, and a miss there sends the search down to the next passing rate, whose edge is
    /// narrowed again (up to `NARROWINGS` times in all) and whose best is confirmed in turn.
    fn search(&self, mut measure: impl FnMut(f64) -> Result<bool, String>) -> Result<Verdicts, String> {
        let mut verdicts = Verdicts::default();
        let mut step = |rate: f64, verdicts: &mut Verdicts| -> Result<bool, String> {
            let pass = measure(rate)?;
            verdicts.record(rate, pass);
            Ok(pass)
        };
        let (mut rate, mut misses_in_a_row) = (self.start, 0);
        while rate <= self.max && misses_in_a_row < 2 {
            misses_in_a_row = if step(rate, &mut verdicts)? { 0 } else { misses_in_a_row + 1 };
            rate *= self.factor;
        }
        // Each round narrows the edge (while narrowings are left), then measures the best rate
        // again. A pass confirms it, since the best rate held and has now passed twice, and ends
        // the search; a miss refutes that rate for good and starts another round. Rates to refute
        // come only from the ramp and from at most `NARROWINGS` narrowings, so this ends.
        for round in 0.. {
            if round < NARROWINGS {
                for _ in 0..self.refine {
                    let Some(low) = verdicts.best() else { break };
                    let Some(high) = verdicts.lowest_miss_above(low) else { break };
                    step((low + high) / 2.0, &mut verdicts)?;
                }
            }
            let Some(best) = verdicts.best().filter(|&r| !verdicts.confirmed(r)) else { break };
            if step(best, &mut verdicts)? {
                debug_assert!(verdicts.confirmed(best));
                break;
            }
        }
        Ok(verdicts)
    }
}

/// What a step search has learnt of each rate: one verdict per time it was measured, the last of
/// a stalled step's attempts standing for them all.
#[derive(Debug, Default)]
struct Verdicts {
    by_rate: Vec<(f64, bool)>,
}

impl Verdicts {
    fn record(&mut self, rate: f64, pass: bool) {
        self.by_rate.push((rate, pass));
    }

    /// Passed every time it was measured.
    fn held(&self, rate: f64) -> bool {
        self.by_rate.iter().filter(|(r, _)| *r == rate).all(|(_, pass)| *pass)
    }

    /// Held, and passed at least twice: one pass at the edge of the server's capacity may be luck.
    fn confirmed(&self, rate: f64) -> bool {
        self.held(rate) && self.by_rate.iter().filter(|(r, pass)| *r == rate && *pass).count() >= 2
    }

    /// The highest rate that held.
    fn best(&self) -> Option<f64> {
        self.by_rate.iter().map(|(r, _)| *r).filter(|r| self.held(*r)).reduce(f64::max)
    }

    /// The lowest rate above `rate` that missed: with the best rate, the other end of a bisection.
    fn lowest_miss_above(&self, rate: f64) -> Option<f64> {
        self.by_rate.iter().filter(|(r, pass)| !pass && *r > rate).map(|(r, _)| *r).reduce(f64::min)
    }
}

/// A step search's measurements, in the order taken, and the best passing one.
#[derive(Clone, Debug, Serialize)]
pub struct StepSearch {
    pub scenario: &'static str,
    pub server: &'static str,
    pub shards: Option<usize>,
    pub steps: Vec<Measurement>,
    /// Index into `steps` of the last measurement of the highest rate within the SLO: a rate
    /// that passed every time it was measured, and at least twice.
    pub best: Option<usize>,
}

impl StepSearch {
    pub fn best(&self) -> Option<&Measurement> {
        self.best.map(|i| &self.steps[i])
    }
}

/// Deploys a fresh module and deletes it again, `rate` times a second, until `running` clears.
/// Deploys are paced, not open-loop: a slow one delays the next.
fn storm(endpoint: &Endpoint, rate: f64, running: &AtomicBool) -> StormReport {
    let period = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let mut latency = histogram();
    let (mut deploys, mut failed, mut first_error) = (0u64, 0u64, None);
    let start = Instant::now();
    let mut n = 0u64;
    while running.load(Ordering::Relaxed) {
        let due = start + period.mul_f64(n as f64);
        let now = Instant::now();
        if now < due {
            // Sleep in short slices so that the end of the load is noticed promptly.
            std::thread::sleep((due - now).min(Duration::from_millis(50)));
            continue;
        }
        n += 1;
        let t = Instant::now();
        let name = format!("bench-storm-{n}");
        match deploy(endpoint, &name, &guests::unique_hello(n)) {
            Ok(id) => {
                let _ = latency.record((t.elapsed().as_nanos() as u64).max(1));
                deploys += 1;
                if let Err(e) = endpoint.call("DELETE", &format!("/functions/{id}"), b"") {
                    failed += 1;
                    first_error.get_or_insert(e);
                }
            }
            Err(e) => {
                deploys += 1;
                failed += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    StormReport { deploys, failed, deploy_latency: LatencySummary::of(&latency), first_error }
}

/// A progress line on stderr, once a second: rewritten in place on a terminal, a line each
/// otherwise.
fn report_progress(label: &str, total: Duration, progress: &Progress, running: &AtomicBool) {
    let tty = std::io::stderr().is_terminal();
    let start = Instant::now();
    let mut next = start + Duration::from_secs(1);
    while running.load(Ordering::Relaxed) {
        if Instant::now() < next {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        next += Duration::from_secs(1);
        let line = format!(
            "{label}: {:.0}/{:.0} s, {} answered, {} failed",
            start.elapsed().as_secs_f64().min(total.as_secs_f64()),
            total.as_secs_f64(),
            progress.answered.load(Ordering::Relaxed),
            progress.failed.load(Ordering::Relaxed),
        );
        if tty {
            eprint!("\r\x1b[2K{line}");
        } else {
            eprintln!("{line}");
        }
    }
    if tty {
        eprint!("\r\x1b[2K");
    }
}

#[cfg(test)]
mod tests {
    use super::{machine_stalled, StepPlan, Verdicts, NARROWINGS};

    #[test]
    fn the_best_rate_is_the_highest_that_passed_twice_and_never_missed() {
        let mut v = Verdicts::default();
        for (rate, pass) in [(1000.0, true), (1500.0, true), (2250.0, false), (3375.0, false), (1875.0, true)] {
            v.record(rate, pass);
        }
        // One pass at 1,875/s is not yet a confirmed best, and 2,250/s bounds the next bisection.
        assert_eq!((v.best(), v.confirmed(1875.0)), (Some(1875.0), false));
        assert_eq!(v.lowest_miss_above(1875.0), Some(2250.0));
        // Its confirmation misses: the search falls back to 1,500/s, which must pass again too.
        v.record(1875.0, false);
        assert_eq!((v.best(), v.confirmed(1500.0)), (Some(1500.0), false));
        assert_eq!(v.lowest_miss_above(1500.0), Some(1875.0));
        v.record(1500.0, true);
        assert_eq!((v.best(), v.confirmed(1500.0)), (Some(1500.0), true));
        // Nothing held: no best.
        let mut none = Verdicts::default();
        none.record(1000.0, false);
        assert_eq!(none.best(), None);
    }

    /// Runs `plan`'s search against a model server, `passes(rate, times measured before)`; the
    /// rates measured, in order, and the best.
    fn search_model(plan: StepPlan, passes: impl Fn(f64, usize) -> bool) -> (Vec<f64>, Option<f64>) {
        let mut measured: Vec<f64> = Vec::new();
        let verdicts = plan
            .search(|rate| {
                let before = measured.iter().filter(|&&r| r == rate).count();
                measured.push(rate);
                Ok(passes(rate, before))
            })
            .unwrap();
        (measured, verdicts.best())
    }

    const RAMP: StepPlan = StepPlan { start: 1000.0, factor: 1.5, max: 1e6, refine: 2 };

    #[test]
    fn a_steady_edge_is_bisected_then_confirmed() {
        let (measured, best) = search_model(RAMP, |rate, _| rate <= 4000.0);
        // The ramp to two misses, two bisections (4,219 misses, 3,797 passes), one confirmation.
        assert_eq!(measured, [1000.0, 1500.0, 2250.0, 3375.0, 5062.5, 7593.75, 4218.75, 3796.875, 3796.875]);
        assert_eq!(best, Some(3796.875));
    }

    #[test]
    fn a_refuted_best_rate_sends_the_bisection_below_it() {
        // Run AP's baseline: 5,062/s passes once and misses its confirmation, while the edge
        // really lies at 4,000/s. The search must look between 3,375 and 5,062/s, not stop at 3,375.
        let (measured, best) = search_model(RAMP, |rate, before| rate <= 4000.0 || (rate == 5062.5 && before == 0));
        assert_eq!(best, Some(3796.875));
        assert_eq!(measured[..7], [1000.0, 1500.0, 2250.0, 3375.0, 5062.5, 7593.75, 11390.625]);
        // Bisections above 5,062/s, its refuting confirmation, bisections below it, confirmation.
        assert_eq!(measured[7..], [6328.125, 5695.3125, 5062.5, 4218.75, 3796.875, 3796.875]);
    }

    #[test]
    fn a_server_that_never_passes_twice_ends_the_search_with_no_best() {
        let plan = StepPlan { max: 10_000.0, ..RAMP };
        let (measured, best) = search_model(plan, |_, before| before == 0);
        assert_eq!(best, None);
        // Every rate the ramp passed (1,000 to 7,594/s), and every one the narrowings added, is
        // refuted once; no more.
        let ramp = 6;
        let bisections = NARROWINGS * plan.refine as usize;
        assert!(measured.len() <= 2 * (ramp + bisections), "{measured:?}");
    }

    #[test]
    fn a_step_is_measured_again_only_when_the_machine_stalled() {
        // Quiet steps of perf/HISTORY.md's runs: 0.0 to 0.5% stolen, lag in tens of microseconds.
        assert!(!machine_stalled(68.0, Some(0.5)));
        // No /proc/stat (not Linux): only the generator's lag can tell.
        assert!(!machine_stalled(68.0, None));
        assert!(machine_stalled(1200.0, None));
        // Run G's healthz miss at 57,665/s (3.1% stolen) and run H's baseline steps (up to 27.5%).
        assert!(machine_stalled(21.0, Some(3.1)));
        assert!(machine_stalled(37.0, Some(27.5)));
    }
}
