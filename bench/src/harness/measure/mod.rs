//! The measurement room: one measurement of a session at one rate (`Session::measure`): the load
//! generator ([`super::load`]) runs the plan, while beside it the server's memory is sampled, the
//! deploy storm runs (`beside`) and the progress line is drawn; then the outcome is tallied into a
//! [`Measurement`] and judged against the scenario's targets. What the machine and the server
//! process did meanwhile is read in `host`.

mod beside;
mod host;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use hdrhistogram::Histogram;
use serde::Serialize;
use tensor_wasm::exposition::{self, ScrapedHistogram};

use super::interrupt;
use super::load::{self, LoadOutcome, LoadPlan, Progress};
use super::scenario::Prepared;
use super::scrape::{self, HistogramSeries};
use super::session::{Session, Settings};
use super::slo::{Gate, Measure, Verdict};
use super::target::{Implementation, StartedServer};
use crate::histogram;
use beside::{report_progress, storm};
use host::{machine_stalled, sample_memory, CpuStart};
pub use host::{CpuReport, MemoryReport};

/// What a plan run beside its helpers gives back: the load's outcome, the storm's report, the
/// server's memory, and what `beside` returned (or its panic).
type RanBeside<T> = (Result<LoadOutcome, String>, Option<StormReport>, Option<MemoryReport>, std::thread::Result<T>);

impl Session {
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
        let server_pid = self.process.as_ref().map(StartedServer::pid);
        let cpu_before = CpuStart::now(server_pid);
        let (outcome, storm, memory, beside) = self.run_beside(&plan, settings, &progress, beside);
        let beside = beside.map_err(|_| "the work beside the load panicked".to_string())?;
        let outcome = outcome?;
        if interrupt::interrupted() {
            return Err(interrupt::MESSAGE.into());
        }
        let cpu = cpu_before.report(server_pid, progress.answered.load(Ordering::Relaxed));
        let metrics_after = self.server_metrics();
        let over_the_run = |series: HistogramSeries| {
            BucketQuantiles::of(&scrape::between(metrics_before.as_ref()?, metrics_after.as_ref()?, series))
        };
        let dispatch = self.scenario.dispatches().then(|| over_the_run(scrape::KERNEL_LATENCY)).flatten();
        let in_server = over_the_run(scrape::request_duration(self.scenario.route().template()));
        let mut measurement = Measurement::new(self, &outcome, cpu, dispatch, storm, settings);
        measurement.server_memory = memory;
        measurement.in_server = in_server;
        Ok((measurement, beside))
    }

    /// Runs `plan` to its end, with `beside`, the memory sampler, the deploy storm and the
    /// progress line on threads of their own until it ends.
    fn run_beside<T: Send>(
        &self,
        plan: &LoadPlan,
        settings: &Settings,
        progress: &Progress,
        beside: impl FnOnce(&AtomicBool) -> T + Send,
    ) -> RanBeside<T> {
        let running = AtomicBool::new(true);
        let label = format!("{} on {} at {:.0}/s", self.scenario.name(), self.server, plan.rate);
        std::thread::scope(|scope| {
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
                let running = &running;
                let total = settings.warmup + settings.duration;
                let label = &label;
                scope.spawn(move || report_progress(label, total, progress, running))
            });
            let outcome = load::run(plan, progress);
            running.store(false, Ordering::Relaxed);
            let storm = storm.map(|h| h.join().expect("the storm thread does not panic"));
            if let Some(h) = reporter {
                let _ = h.join();
            }
            let memory = memory.and_then(|h| h.join().ok().flatten());
            let beside = beside.join();
            (outcome, storm, memory, beside)
        })
    }

    /// The server's `/metrics`, parsed, where it has one (ours, not the baseline).
    fn server_metrics(&self) -> Option<Vec<exposition::Sample>> {
        (self.server == Implementation::TensorWasm.name())
            .then(|| self.endpoint.metrics().ok())
            .flatten()
            .map(|t| exposition::parse(&t))
    }
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
        let tally = Tally::of(outcome, &session.prepared, storm.as_ref());
        let verdicts = judge(&tally, dispatch.as_ref(), &session.prepared, settings);
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
            latency: LatencySummary::of(&tally.judged),
            classes: tally.classes,
            statuses: tally.statuses,
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

/// A load's outcome summed over its classes (and the storm's deploys): what the scenario's
/// targets are judged on.
struct Tally {
    classes: Vec<ClassReport>,
    /// Every answer by status, all classes together.
    statuses: BTreeMap<String, u64>,
    /// The latency of the judged classes together.
    judged: Histogram<u64>,
    attempts: u64,
    /// 5xx answers, and requests that got no answer or were never sent.
    server_errors: u64,
    /// Answers the scenario did not expect, and requests that got no answer or were never sent.
    failed: u64,
}

impl Tally {
    fn of(outcome: &LoadOutcome, prepared: &Prepared, storm: Option<&StormReport>) -> Tally {
        let seconds = outcome.measured.as_secs_f64();
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
        if let Some(s) = storm {
            attempts += s.deploys;
            failed += s.failed;
        }
        Tally { classes, statuses, judged, attempts, server_errors, failed }
    }

    /// `n` as a share of the attempts; `None` when there were none.
    fn ratio(&self, n: u64) -> Option<f64> {
        if self.attempts == 0 {
            None
        } else {
            Some(n as f64 / self.attempts as f64)
        }
    }
}

/// A verdict on each of the scenario's targets, from the tally and the server's own dispatch
/// latency.
fn judge(tally: &Tally, dispatch: Option<&BucketQuantiles>, prepared: &Prepared, settings: &Settings) -> Vec<Verdict> {
    let judged = &tally.judged;
    prepared
        .traffic
        .targets(settings.p99_override)
        .into_iter()
        .map(|target| {
            let measured = match target.measure {
                Measure::HttpLatency { quantile } => {
                    (!judged.is_empty()).then(|| judged.value_at_quantile(quantile) as f64 / 1e9)
                }
                Measure::DispatchLatency { quantile } => dispatch
                    .and_then(|d| match quantile {
                        q if q <= 0.5 => d.p50_bound_us,
                        q if q <= 0.95 => d.p95_bound_us,
                        _ => d.p99_bound_us,
                    })
                    .map(|us| us / 1e6),
                Measure::ServerErrorRatio => tally.ratio(tally.server_errors),
                Measure::FailedRatio => tally.ratio(tally.failed),
                // Across measurements: `harness::hostile` judges these (`add_verdict`), and
                // no scenario's own targets name them.
                Measure::QuietP99Ratio | Measure::UnexpectedAnswers => None,
            };
            Verdict::judge(target, measured)
        })
        .collect()
}

impl Measurement {
    /// Adds a verdict reached outside the measurement (the hostile scenario's, against its quiet
    /// phase), and judges the measurement again with it under `gate`.
    pub fn add_verdict(&mut self, verdict: Verdict, gate: Gate) {
        self.verdicts.push(verdict);
        self.pass = self.verdicts.iter().filter(|v| gate.gates(&v.target)).all(|v| v.pass);
    }
}
