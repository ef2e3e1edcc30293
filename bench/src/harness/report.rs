//! The harness's results: one JSON document and the same as Markdown tables.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::run::{Measurement, StepSearch};
use super::slo::Source;

/// TensorWasm and the baseline on one scenario.
#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    pub scenario: &'static str,
    pub ours: StepSearch,
    pub baseline: StepSearch,
    /// The offered rate of the equal-load pair: 80% of the lower of the two best rates, which
    /// both servers sustain.
    pub equal_load_rate: f64,
    pub ours_at_equal_load: Measurement,
    pub baseline_at_equal_load: Measurement,
    /// Our best achieved rate over the baseline's.
    pub throughput_ratio: Option<f64>,
    /// The baseline's P99 over ours, at equal offered load.
    pub p99_ratio: Option<f64>,
}

impl Comparison {
    pub fn new(
        scenario: &'static str,
        ours: StepSearch,
        baseline: StepSearch,
        equal_load_rate: f64,
        ours_at_equal_load: Measurement,
        baseline_at_equal_load: Measurement,
    ) -> Comparison {
        let throughput_ratio = match (ours.best(), baseline.best()) {
            (Some(o), Some(b)) if b.achieved_rate > 0.0 => Some(o.achieved_rate / b.achieved_rate),
            _ => None,
        };
        let p99_ratio = (ours_at_equal_load.latency.p99_us > 0.0)
            .then(|| baseline_at_equal_load.latency.p99_us / ours_at_equal_load.latency.p99_us);
        Comparison {
            scenario,
            ours,
            baseline,
            equal_load_rate,
            ours_at_equal_load,
            baseline_at_equal_load,
            throughput_ratio,
            p99_ratio,
        }
    }
}

/// The machine a run was taken on.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub kernel: String,
    /// How late a 200 µs sleep wakes, at P50 and P99 (µs): the scheduling noise of this machine,
    /// which every latency measured on it carries too. Large on a VM whose idle vCPUs halt.
    pub wake_late_p50_us: f64,
    pub wake_late_p99_us: f64,
}

impl Machine {
    pub fn this() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
        let (wake_late_p50_us, wake_late_p99_us) = wake_lateness();
        Machine {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
            kernel,
            wake_late_p50_us,
            wake_late_p99_us,
        }
    }
}

/// Sleeps 200 µs a thousand times and returns how late it woke at P50 and P99, in µs.
fn wake_lateness() -> (f64, f64) {
    const SLEEP: Duration = Duration::from_micros(200);
    let mut late = super::load::latency_histogram();
    super::load::set_timer_slack_ns(1_000);
    for _ in 0..1000 {
        let t = Instant::now();
        std::thread::sleep(SLEEP);
        let _ = late.record((t.elapsed().saturating_sub(SLEEP).as_nanos() as u64).max(1));
    }
    (late.value_at_quantile(0.5) as f64 / 1e3, late.value_at_quantile(0.99) as f64 / 1e3)
}

/// Everything one harness run produced.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub tool: &'static str,
    pub started_unix_s: u64,
    pub machine: Machine,
    pub command: Vec<String>,
    pub connections: usize,
    pub warmup_s: f64,
    pub duration_s: f64,
    pub measurements: Vec<Measurement>,
    pub searches: Vec<StepSearch>,
    pub comparisons: Vec<Comparison>,
    pub scale: Vec<StepSearch>,
    /// Every gated SLO held in every fixed-rate measurement, and every step search found a
    /// passing rate.
    pub pass: bool,
}

impl Report {
    pub fn to_markdown(&self) -> String {
        let mut md = String::new();
        let m = &self.machine;
        let _ = writeln!(
            md,
            "Machine: {} CPUs ({}), Linux {}; a 200 µs sleep wakes {:.0} µs late at P50 and {:.0} µs at P99. \
             {} connections, {:.0} s warm-up, {:.0} s measured per rate.\n",
            m.cpus,
            m.cpu_model,
            m.kernel,
            m.wake_late_p50_us,
            m.wake_late_p99_us,
            self.connections,
            self.warmup_s,
            self.duration_s
        );
        if !self.measurements.is_empty() {
            md.push_str("### Fixed rate\n\n");
            measurement_table(&mut md, self.measurements.iter());
            md.push_str("\n### SLO verdicts\n\n");
            verdict_table(&mut md, &self.measurements);
        }
        let dispatch: Vec<&Measurement> = self.all_measurements().filter(|m| m.dispatch.is_some()).collect();
        if !dispatch.is_empty() {
            md.push_str("\n### Kernel dispatch (the server's histogram over each run; bucket bounds)\n\n");
            md.push_str("| scenario | server | offered/s | kernels | P50 ≤ µs | P95 ≤ µs | P99 ≤ µs |\n");
            md.push_str("| --- | --- | --- | --- | --- | --- | --- |\n");
            for m in dispatch {
                let d = m.dispatch.as_ref().expect("filtered");
                let b = |v: Option<f64>| v.map_or("over the last bucket".into(), |v| format!("{v:.1}"));
                let _ = writeln!(
                    md,
                    "| {} | {} | {:.0} | {} | {} | {} | {} |",
                    m.scenario,
                    m.server,
                    m.offered_rate,
                    d.kernels,
                    b(d.p50_bound_us),
                    b(d.p95_bound_us),
                    b(d.p99_bound_us)
                );
            }
        }
        let storms: Vec<&Measurement> = self.all_measurements().filter(|m| m.storm.is_some()).collect();
        if !storms.is_empty() {
            md.push_str("\n### Deploys beside the load (each a fresh module, deleted again)\n\n");
            md.push_str(
                "| scenario | server | offered/s | deploys | failed | P50 ms | P99 ms | max ms | first error |\n",
            );
            md.push_str("| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
            for m in storms {
                let s = m.storm.as_ref().expect("filtered");
                let _ = writeln!(
                    md,
                    "| {} | {} | {:.0} | {} | {} | {:.1} | {:.1} | {:.1} | {} |",
                    m.scenario,
                    m.server,
                    m.offered_rate,
                    s.deploys,
                    s.failed,
                    s.deploy_latency.p50_us / 1e3,
                    s.deploy_latency.p99_us / 1e3,
                    s.deploy_latency.max_us / 1e3,
                    s.first_error.as_deref().unwrap_or("")
                );
            }
        }
        if !self.searches.is_empty() {
            md.push_str("\n### Highest rate within the SLO (step mode)\n\n");
            search_table(&mut md, self.searches.iter());
            md.push_str("\nEvery step:\n\n");
            measurement_table(&mut md, self.searches.iter().flat_map(|s| &s.steps));
        }
        if !self.comparisons.is_empty() {
            md.push_str("\n### TensorWasm against the conventional baseline\n\n");
            md.push_str(
                "| scenario | best rate, ours | best rate, baseline | throughput × | equal load/s | P99 ours µs | \
                 P99 baseline µs | P99 ÷ |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n",
            );
            for c in &self.comparisons {
                let best =
                    |s: &StepSearch| s.best().map_or("none passed".into(), |m| format!("{:.0}", m.achieved_rate));
                let ratio = |r: Option<f64>| r.map_or("n/a".into(), |r| format!("{r:.1}×"));
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {:.0} | {:.0} | {:.0} | {} |",
                    c.scenario,
                    best(&c.ours),
                    best(&c.baseline),
                    ratio(c.throughput_ratio),
                    c.equal_load_rate,
                    c.ours_at_equal_load.latency.p99_us,
                    c.baseline_at_equal_load.latency.p99_us,
                    ratio(c.p99_ratio)
                );
            }
            md.push_str("\nEvery step of both:\n\n");
            search_table(&mut md, self.comparisons.iter().flat_map(|c| [&c.ours, &c.baseline]));
            md.push('\n');
            measurement_table(
                &mut md,
                self.comparisons
                    .iter()
                    .flat_map(|c| c.ours.steps.iter().chain(&c.baseline.steps))
                    .chain(self.comparisons.iter().flat_map(|c| [&c.ours_at_equal_load, &c.baseline_at_equal_load])),
            );
        }
        if !self.scale.is_empty() {
            md.push_str("\n### Scale: highest rate within the SLO against shards\n\n");
            search_table(&mut md, self.scale.iter());
        }
        let _ = writeln!(md, "\nResult: {}", if self.pass { "PASS" } else { "FAIL" });
        md
    }

    fn all_measurements(&self) -> impl Iterator<Item = &Measurement> {
        self.measurements
            .iter()
            .chain(self.searches.iter().flat_map(|s| &s.steps))
            .chain(self.comparisons.iter().flat_map(|c| {
                c.ours.steps.iter().chain(&c.baseline.steps).chain([&c.ours_at_equal_load, &c.baseline_at_equal_load])
            }))
            .chain(self.scale.iter().flat_map(|s| &s.steps))
    }
}

fn shards(s: Option<usize>) -> String {
    s.map_or("?".into(), |s| s.to_string())
}

fn measurement_table<'a>(md: &mut String, rows: impl Iterator<Item = &'a Measurement>) {
    md.push_str(
        "| scenario | server | shards | offered/s | achieved/s | P50 µs | P95 µs | P99 µs | P99.9 µs | max µs | \
         answers by status | no answer | lag P99 µs | server CPU µs/req | harness CPU µs/req | SLO |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for m in rows {
        let statuses = m.statuses.iter().map(|(s, n)| format!("{s}: {n}")).collect::<Vec<_>>().join(", ");
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.0} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {:.0} | {} | {} | {} |",
            m.scenario,
            m.server,
            shards(m.shards),
            m.offered_rate,
            m.achieved_rate,
            m.latency.p50_us,
            m.latency.p95_us,
            m.latency.p99_us,
            m.latency.p999_us,
            m.latency.max_us,
            statuses,
            m.io_errors + m.unsent,
            m.generator_lag_p99_us,
            cpu(m.cpu.server_us_per_answer),
            cpu(m.cpu.harness_us_per_answer),
            if m.pass { "pass" } else { "FAIL" }
        );
    }
}

fn cpu(us: Option<f64>) -> String {
    us.map_or("-".into(), |v| format!("{v:.1}"))
}

fn verdict_table(md: &mut String, rows: &[Measurement]) {
    md.push_str("| scenario | server | offered/s | objective | whose | measured | result |\n");
    md.push_str("| --- | --- | --- | --- | --- | --- | --- |\n");
    for m in rows {
        for v in &m.verdicts {
            let _ = writeln!(
                md,
                "| {} | {} | {:.0} | {} | {} | {} | {} |",
                m.scenario,
                m.server,
                m.offered_rate,
                v.target.name,
                match v.target.source {
                    Source::Seed => "seed",
                    Source::Ours => "ours",
                },
                v.measured_text(),
                if v.pass { "pass" } else { "FAIL" }
            );
        }
    }
}

fn search_table<'a>(md: &mut String, rows: impl Iterator<Item = &'a StepSearch>) {
    md.push_str("| scenario | server | shards | rates tried | best offered/s | achieved/s | P99 µs there |\n");
    md.push_str("| --- | --- | --- | --- | --- | --- | --- |\n");
    for s in rows {
        let (offered, achieved, p99) = s.best().map_or(("none passed".into(), "-".into(), "-".into()), |m| {
            (format!("{:.0}", m.offered_rate), format!("{:.0}", m.achieved_rate), format!("{:.1}", m.latency.p99_us))
        });
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {offered} | {achieved} | {p99} |",
            s.scenario,
            s.server,
            shards(s.shards),
            s.steps.len()
        );
    }
}
