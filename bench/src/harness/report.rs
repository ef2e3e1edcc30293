//! The harness's results: one JSON document and the same as Markdown tables.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::fleet::{self, FleetRun};
use super::hostile::HostileRun;
use super::measure::Measurement;
use super::search::StepSearch;
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
    /// Each server's rounds at that rate (`suite::EQUAL_LOAD_ROUNDS`, and the repeats of those in
    /// which the machine stalled), in the order taken.
    pub ours_at_equal_load: Vec<Measurement>,
    pub baseline_at_equal_load: Vec<Measurement>,
    /// The median P99 of each side's rounds (µs), leaving out those in which the machine stalled
    /// unless every round did.
    pub ours_equal_load_p99_us: f64,
    pub baseline_equal_load_p99_us: f64,
    /// Our best achieved rate over the baseline's.
    pub throughput_ratio: Option<f64>,
    /// The baseline's median P99 over ours, at equal offered load.
    pub p99_ratio: Option<f64>,
}

impl Comparison {
    /// Every measurement taken for it: both step searches, then the equal-load pair.
    pub fn measurements(&self) -> impl Iterator<Item = &Measurement> {
        self.ours
            .steps
            .iter()
            .chain(&self.baseline.steps)
            .chain(&self.ours_at_equal_load)
            .chain(&self.baseline_at_equal_load)
    }

    pub fn new(
        scenario: &'static str,
        ours: StepSearch,
        baseline: StepSearch,
        equal_load_rate: f64,
        ours_at_equal_load: Vec<Measurement>,
        baseline_at_equal_load: Vec<Measurement>,
    ) -> Comparison {
        let throughput_ratio = match (ours.best(), baseline.best()) {
            (Some(o), Some(b)) if b.achieved_rate > 0.0 => Some(o.achieved_rate / b.achieved_rate),
            _ => None,
        };
        let median_p99 = |rounds: &[Measurement]| {
            median_of_unstalled(rounds.iter().map(|m| (m.latency.p99_us, m.machine_stalled))).unwrap_or(0.0)
        };
        let ours_equal_load_p99_us = median_p99(&ours_at_equal_load);
        let baseline_equal_load_p99_us = median_p99(&baseline_at_equal_load);
        let p99_ratio = (ours_equal_load_p99_us > 0.0).then(|| baseline_equal_load_p99_us / ours_equal_load_p99_us);
        Comparison {
            scenario,
            ours,
            baseline,
            equal_load_rate,
            ours_at_equal_load,
            baseline_at_equal_load,
            ours_equal_load_p99_us,
            baseline_equal_load_p99_us,
            throughput_ratio,
            p99_ratio,
        }
    }
}

/// The machine a run was taken on.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    /// CPUs online.
    pub cpus: usize,
    /// The CPUs the harness ran on, and those of the servers it started when they were kept
    /// apart (`--server-cpus`), as CPU lists.
    pub harness_cpus: String,
    pub server_cpus: Option<String>,
    pub cpu_model: String,
    pub kernel: String,
    /// How late a 200 µs sleep wakes, at P50 and P99 (µs): the scheduling noise of this machine,
    /// which every latency measured on it carries too. Large on a VM whose idle vCPUs halt.
    pub wake_late_p50_us: f64,
    pub wake_late_p99_us: f64,
}

impl Machine {
    pub fn this(server_cpus: Option<&[usize]>) -> Machine {
        use tensor_wasm::cpu;
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
        let (wake_late_p50_us, wake_late_p99_us) = wake_lateness();
        // SAFETY: sysconf only reads.
        let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
        Machine {
            cpus: usize::try_from(online).unwrap_or(1).max(1),
            harness_cpus: cpu::allowed_cpus().map(|c| cpu::format_list(&c)).unwrap_or_default(),
            server_cpus: server_cpus.map(cpu::format_list),
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
    let mut late = crate::histogram();
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
    /// The connections spoke TLS.
    pub tls: bool,
    /// Load-generator threads the connections were dealt out among.
    pub threads: usize,
    /// The generator's threads polled instead of sleeping, each taking a whole CPU.
    pub spin: bool,
    pub warmup_s: f64,
    pub duration_s: f64,
    pub measurements: Vec<Measurement>,
    pub searches: Vec<StepSearch>,
    pub comparisons: Vec<Comparison>,
    pub scale: Vec<StepSearch>,
    /// The hostile scenario's phases, where it ran.
    pub hostile: Vec<HostileRun>,
    /// The fleet scenario's figures, where it ran.
    pub fleet: Vec<FleetRun>,
    /// Every gated SLO held in every fixed-rate measurement (every hostile phase included), and
    /// every step search found a passing rate.
    pub pass: bool,
}

impl Report {
    pub fn to_markdown(&self) -> String {
        let mut md = String::new();
        let m = &self.machine;
        let _ = writeln!(
            md,
            "Machine: {} CPUs ({}), Linux {}; a 200 µs sleep wakes {:.0} µs late at P50 and {:.0} µs at P99. \
             {}. {} {}connections over {} {}generator thread{}, {} s warm-up, {} s measured per rate.\n",
            m.cpus,
            m.cpu_model,
            m.kernel,
            m.wake_late_p50_us,
            m.wake_late_p99_us,
            match &m.server_cpus {
                Some(server) => format!(
                    "Started servers on CPUs {server} (ours with pinned shards), the harness on {}",
                    m.harness_cpus
                ),
                None => format!(
                    "The harness ran on CPUs {}, beside any server it started (ours with floating shards)",
                    m.harness_cpus
                ),
            },
            self.connections,
            if self.tls { "TLS " } else { "" },
            self.threads,
            if self.spin { "spinning " } else { "" },
            if self.threads == 1 { "" } else { "s" },
            seconds(self.warmup_s),
            seconds(self.duration_s)
        );
        if !self.measurements.is_empty() {
            md.push_str("### Fixed rate\n\n");
            measurement_table(&mut md, self.measurements.iter());
            md.push_str("\n### SLO verdicts\n\n");
            verdict_table(&mut md, &self.measurements);
            class_table(&mut md, &self.measurements);
            memory_table(&mut md, &self.measurements);
        }
        let dispatch: Vec<&Measurement> = self.all_measurements().filter(|m| m.dispatch.is_some()).collect();
        if !dispatch.is_empty() {
            md.push_str("\n### Kernel dispatch (the server's histogram over each run; bucket bounds)\n\n");
            md.push_str(
                "Tensor calls per invoke: the calls the histogram counted over the invokes the server counted, every class \
                 and status together.\n\n",
            );
            table(
                &mut md,
                &["scenario", "server", "offered/s", "tensor calls", "per invoke", "P50 ≤ µs", "P95 ≤ µs", "P99 ≤ µs"],
                dispatch.iter().filter_map(|m| {
                    let d = m.dispatch.as_ref()?;
                    let per_invoke = m.in_server.as_ref().filter(|s| s.samples > 0);
                    Some(vec![
                        m.scenario.into(),
                        m.server.into(),
                        format!("{:.0}", m.offered_rate),
                        d.samples.to_string(),
                        per_invoke.map_or("-".into(), |s| format!("{:.1}", d.samples as f64 / s.samples as f64)),
                        bucket_bound(d.p50_bound_us),
                        bucket_bound(d.p95_bound_us),
                        bucket_bound(d.p99_bound_us),
                    ])
                }),
            );
        }
        let storms: Vec<&Measurement> = self.all_measurements().filter(|m| m.storm.is_some()).collect();
        if !storms.is_empty() {
            md.push_str("\n### Deploys beside the load (each a fresh module, deleted again)\n\n");
            table(
                &mut md,
                &["scenario", "server", "offered/s", "deploys", "failed", "P50 ms", "P99 ms", "max ms", "first error"],
                storms.iter().filter_map(|m| {
                    let s = m.storm.as_ref()?;
                    Some(vec![
                        m.scenario.into(),
                        m.server.into(),
                        format!("{:.0}", m.offered_rate),
                        s.deploys.to_string(),
                        s.failed.to_string(),
                        format!("{:.1}", s.deploy_latency.p50_us / 1e3),
                        format!("{:.1}", s.deploy_latency.p99_us / 1e3),
                        format!("{:.1}", s.deploy_latency.max_us / 1e3),
                        s.first_error.clone().unwrap_or_default(),
                    ])
                }),
            );
        }
        if !self.searches.is_empty() {
            md.push_str("\n### Highest rate within the SLO (step mode)\n\n");
            search_table(&mut md, self.searches.iter());
            md.push_str("\nEvery step:\n\n");
            measurement_table(&mut md, self.searches.iter().flat_map(|s| &s.steps));
        }
        if !self.comparisons.is_empty() {
            md.push_str("\n### TensorWasm against the conventional baseline\n\n");
            let best = |s: &StepSearch| s.best().map_or("none passed".into(), |m| format!("{:.0}", m.achieved_rate));
            let ratio = |r: Option<f64>| r.map_or("n/a".into(), |r| format!("{r:.1}×"));
            table(
                &mut md,
                &[
                    "scenario",
                    "best rate, ours",
                    "best rate, baseline",
                    "throughput ×",
                    "equal load/s",
                    "P99 ours µs (median of rounds)",
                    "P99 baseline µs (median of rounds)",
                    "P99 ÷",
                ],
                self.comparisons.iter().map(|c| {
                    vec![
                        c.scenario.into(),
                        best(&c.ours),
                        best(&c.baseline),
                        ratio(c.throughput_ratio),
                        format!("{:.0}", c.equal_load_rate),
                        p99_rounds(c.ours_equal_load_p99_us, &c.ours_at_equal_load),
                        p99_rounds(c.baseline_equal_load_p99_us, &c.baseline_at_equal_load),
                        ratio(c.p99_ratio),
                    ]
                }),
            );
            md.push_str("\nEvery step of both:\n\n");
            search_table(&mut md, self.comparisons.iter().flat_map(|c| [&c.ours, &c.baseline]));
            md.push('\n');
            measurement_table(&mut md, self.comparisons.iter().flat_map(Comparison::measurements));
        }
        if !self.scale.is_empty() {
            md.push_str("\n### Scale: highest rate within the SLO against shards\n\n");
            search_table(&mut md, self.scale.iter());
        }
        for run in &self.hostile {
            hostile_tables(&mut md, run);
        }
        for run in &self.fleet {
            fleet_table(&mut md, run);
        }
        let _ = writeln!(md, "\nResult: {}", if self.pass { "PASS" } else { "FAIL" });
        md
    }

    fn all_measurements(&self) -> impl Iterator<Item = &Measurement> {
        self.measurements
            .iter()
            .chain(self.searches.iter().flat_map(|s| &s.steps))
            .chain(self.comparisons.iter().flat_map(Comparison::measurements))
            .chain(self.scale.iter().flat_map(|s| &s.steps))
            .chain(self.hostile.iter().flat_map(|h| h.phases.iter().map(|p| &p.bystander)))
            .chain(self.fleet.iter().flat_map(|f| [&f.single, &f.replica]))
    }
}

/// The middle value, or the mean of the two middle ones; `None` for no values.
fn median(values: impl Iterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    match v.len() {
        0 => None,
        n if n % 2 == 1 => Some(v[mid]),
        _ => Some((v[mid - 1] + v[mid]) / 2.0),
    }
}

/// The median of the `(value, stalled)` rounds in which the machine did not stall, or of all of
/// them when it stalled in every one.
fn median_of_unstalled(rounds: impl Iterator<Item = (f64, bool)>) -> Option<f64> {
    let rounds: Vec<(f64, bool)> = rounds.collect();
    let clean = rounds.iter().filter(|(_, stalled)| !stalled).map(|(v, _)| *v);
    median(clean).or_else(|| median(rounds.iter().map(|(v, _)| *v)))
}

/// `median (round, round, …)`, in µs.
fn p99_rounds(median: f64, rounds: &[Measurement]) -> String {
    let each: Vec<String> = rounds
        .iter()
        .map(|m| format!("{:.0}{}", m.latency.p99_us, if m.machine_stalled { " stalled" } else { "" }))
        .collect();
    format!("{median:.0} ({})", each.join(", "))
}

/// A quantile read from one of the server's histograms: the upper bound of its bucket.
fn bucket_bound(bound_us: Option<f64>) -> String {
    bound_us.map_or("over the last bucket".into(), |v| format!("{v:.1}"))
}

fn shards(s: Option<usize>) -> String {
    s.map_or("?".into(), |s| s.to_string())
}

/// A Markdown table: the head, its rule, and a line per row.
fn table(md: &mut String, head: &[&str], rows: impl IntoIterator<Item = Vec<String>>) {
    let _ = writeln!(md, "| {} |", head.join(" | "));
    let _ = writeln!(md, "|{}", " --- |".repeat(head.len()));
    for row in rows {
        let _ = writeln!(md, "| {} |", row.join(" | "));
    }
}

fn pass_text(pass: bool) -> String {
    if pass { "pass" } else { "FAIL" }.into()
}

fn measurement_table<'a>(md: &mut String, rows: impl Iterator<Item = &'a Measurement>) {
    let head = [
        "scenario",
        "server",
        "shards",
        "offered/s",
        "achieved/s",
        "P50 µs",
        "P95 µs",
        "P99 µs",
        "P99.9 µs",
        "max µs",
        "in-server P99 ≤ µs",
        "answers by status",
        "no answer",
        "lag P99 µs",
        "server CPU µs/req",
        "harness CPU µs/req",
        "stolen CPU %",
        "SLO",
    ];
    table(
        md,
        &head,
        rows.map(|m| {
            let statuses = m.statuses.iter().map(|(s, n)| format!("{s}: {n}")).collect::<Vec<_>>().join(", ");
            let l = &m.latency;
            vec![
                m.scenario.into(),
                m.server.into(),
                shards(m.shards),
                format!("{:.0}", m.offered_rate),
                format!("{:.0}", m.achieved_rate),
                format!("{:.1}", l.p50_us),
                format!("{:.1}", l.p95_us),
                format!("{:.1}", l.p99_us),
                format!("{:.1}", l.p999_us),
                format!("{:.1}", l.max_us),
                m.in_server.as_ref().map_or("-".into(), |q| bucket_bound(q.p99_bound_us)),
                statuses,
                (m.io_errors + m.unsent).to_string(),
                format!("{:.0}", m.generator_lag_p99_us),
                cpu(m.cpu.server_us_per_answer),
                cpu(m.cpu.harness_us_per_answer),
                m.cpu.stolen_percent.map_or("n/a".into(), |p| format!("{p:.1}")),
                pass_text(m.pass),
            ]
        }),
    );
}

/// Each request class of the runs that send more than one (the encoder's f32 and bf16, the
/// tenant mix's tenants), so that one class's latency is not hidden in the others'.
fn class_table(md: &mut String, rows: &[Measurement]) {
    let rows: Vec<_> = rows.iter().filter(|m| m.classes.len() > 1).collect();
    if rows.is_empty() {
        return;
    }
    md.push_str("\n### By request class\n\n");
    table(
        md,
        &[
            "scenario",
            "server",
            "offered/s",
            "class",
            "judged",
            "answers/s, any status",
            "P50 µs",
            "P99 µs",
            "P99.9 µs",
        ],
        rows.iter().flat_map(|m| {
            m.classes.iter().map(move |c| {
                vec![
                    m.scenario.into(),
                    m.server.into(),
                    format!("{:.0}", m.offered_rate),
                    c.name.clone(),
                    if c.judged { "yes" } else { "no" }.into(),
                    format!("{:.0}", c.throughput),
                    format!("{:.1}", c.latency.p50_us),
                    format!("{:.1}", c.latency.p99_us),
                    format!("{:.1}", c.latency.p999_us),
                ]
            })
        }),
    );
}

/// The server's resident memory per fixed-rate run, where the harness started the server.
fn memory_table(md: &mut String, rows: &[Measurement]) {
    let rows: Vec<_> = rows.iter().filter_map(|m| m.server_memory.map(|r| (m, r))).collect();
    if rows.is_empty() {
        return;
    }
    md.push_str("\n### Server memory\n\n");
    table(
        md,
        &[
            "scenario",
            "offered/s",
            "anonymous after warm-up MiB",
            "anonymous at the end",
            "anonymous peak",
            "RSS peak (with mapped audit segments)",
        ],
        rows.into_iter().map(|(m, r)| {
            vec![
                m.scenario.into(),
                format!("{:.0}", m.offered_rate),
                format!("{:.1}", r.anon_after_warmup_mib),
                format!("{:.1}", r.anon_end_mib),
                format!("{:.1}", r.anon_peak_mib),
                format!("{:.1}", r.rss_peak_mib),
            ]
        }),
    );
}

fn cpu(us: Option<f64>) -> String {
    us.map_or("-".into(), |v| format!("{v:.1}"))
}

fn verdict_table(md: &mut String, rows: &[Measurement]) {
    table(
        md,
        &["scenario", "server", "offered/s", "objective", "whose", "measured", "result"],
        rows.iter().flat_map(|m| {
            m.verdicts.iter().map(move |v| {
                let whose = match v.target.source {
                    Source::Seed => "seed",
                    Source::Ours => "ours",
                };
                vec![
                    m.scenario.into(),
                    m.server.into(),
                    format!("{:.0}", m.offered_rate),
                    v.target.name.into(),
                    whose.into(),
                    v.measured_text(),
                    pass_text(v.pass),
                ]
            })
        }),
    );
}

/// The fleet scenario: deploys and propagation, and a replica's invoke cost against a node's.
fn fleet_table(md: &mut String, run: &FleetRun) {
    let _ = writeln!(
        md,
        "\n### Fleet: {} replicas on a NATS registry against one node\n\n{} deploys of distinct modules on \
         each side (the fleet's round robin over its replicas); propagation is from a deploy's 201 to a 200 on \
         the slowest other replica, polled every millisecond.\n",
        run.replicas, run.deploys
    );
    let ms = |us: f64| format!("{:.2}", us / 1e3);
    table(
        md,
        &["what", "P50 ms", "P99 ms", "max ms"],
        [
            ("deploy, single node", &run.deploy_single),
            ("deploy, fleet replica", &run.deploy_fleet),
            ("propagation to every replica", &run.propagation),
        ]
        .into_iter()
        .map(|(what, l)| vec![what.to_string(), ms(l.p50_us), ms(l.p99_us), ms(l.max_us)]),
    );
    let cpu = |m: &Measurement| m.cpu.server_us_per_answer.map_or("-".into(), |c| format!("{c:.1}"));
    let _ = writeln!(
        md,
        "\nHello at {:.0}/s: server CPU per answer {} µs on the single node, {} µs on a replica ({}; at most \
         {:.2}× passes); P99 {:.1} and {:.1} µs. Propagation P99 at most {:.0} ms passes. Result: {}.",
        run.single.offered_rate,
        cpu(&run.single),
        cpu(&run.replica),
        run.invoke_cpu_ratio.map_or("no ratio".into(), |r| format!("{r:.2}×")),
        fleet::INVOKE_CPU_RATIO,
        run.single.latency.p99_us,
        run.replica.latency.p99_us,
        fleet::PROPAGATION_P99_MS,
        if run.pass { "PASS" } else { "FAIL" }
    );
}

/// The hostile scenario: a row per phase, what each attack got, and every verdict.
fn hostile_tables(md: &mut String, run: &HostileRun) {
    let _ = writeln!(
        md,
        "\n### Hostile tenants: the bystander beside each attack\n\nThe bystander's `/healthz` and invokes at \
         {:.0}/s, alone (quiet) and beside each attack at up to {:.0} attacker requests a second; {} shards.\n",
        run.offered_rate,
        run.attack_rate,
        shards(run.shards)
    );
    let class_p99 = |m: &Measurement, name: &str| {
        m.classes.iter().find(|c| c.name == name).map_or("-".into(), |c| format!("{:.1}", c.latency.p99_us))
    };
    table(
        md,
        &[
            "phase",
            "bystander requests",
            "success",
            "P50 µs",
            "P99 µs",
            "P99 ÷ quiet",
            "healthz P99 µs",
            "invoke P99 µs",
            "max µs",
            "server RSS peak MiB",
            "VmHWM MiB",
            "attacker answers",
            "stolen CPU %",
            "result",
        ],
        run.phases.iter().map(|p| {
            let m = &p.bystander;
            // Every attack's answers of the phase together, by label.
            let mut by_label = std::collections::BTreeMap::<&str, u64>::new();
            for (label, n) in p.attacks.iter().flat_map(|a| &a.answers) {
                *by_label.entry(label).or_default() += n;
            }
            let answers: Vec<String> = by_label.iter().map(|(label, n)| format!("{label}: {n}")).collect();
            vec![
                p.name.into(),
                p.bystander_requests.to_string(),
                p.bystander_success_ratio.map_or("-".into(), |r| format!("{:.2}%", r * 100.0)),
                format!("{:.1}", m.latency.p50_us),
                format!("{:.1}", m.latency.p99_us),
                p.p99_over_quiet.map_or("-".into(), |r| format!("{r:.2}×")),
                class_p99(m, "bystander healthz"),
                class_p99(m, "bystander invoke"),
                format!("{:.1}", m.latency.max_us),
                m.server_memory.map_or("-".into(), |r| format!("{:.1}", r.rss_peak_mib)),
                p.server_vm_hwm_mib.map_or("-".into(), |v| format!("{v:.1}")),
                if answers.is_empty() { "-".into() } else { answers.join(", ") },
                m.cpu.stolen_percent.map_or("n/a".into(), |p| format!("{p:.1}")),
                pass_text(m.pass),
            ]
        }),
    );
    md.push_str("\nThe attacks:\n\n");
    table(
        md,
        &["phase", "attack", "threads", "offered/s", "attempts", "unexpected", "first unexpected"],
        run.phases.iter().flat_map(|p| {
            p.attacks.iter().map(move |a| {
                vec![
                    p.name.into(),
                    a.attack.name().into(),
                    a.workers.to_string(),
                    format!("{:.0}", a.offered_rate),
                    a.attempts.to_string(),
                    a.unexpected.to_string(),
                    a.first_unexpected.clone().unwrap_or_default().replace('|', "\\|"),
                ]
            })
        }),
    );
    md.push_str("\nVerdicts:\n\n");
    table(
        md,
        &["phase", "objective", "whose", "measured", "result"],
        run.phases.iter().flat_map(|p| {
            p.bystander.verdicts.iter().map(move |v| {
                let whose = match v.target.source {
                    Source::Seed => "seed",
                    Source::Ours => "ours",
                };
                vec![p.name.into(), v.target.name.into(), whose.into(), v.measured_text(), pass_text(v.pass)]
            })
        }),
    );
    md.push_str("\nEvery phase:\n\n");
    measurement_table(md, run.phases.iter().map(|p| &p.bystander));
}

fn search_table<'a>(md: &mut String, rows: impl Iterator<Item = &'a StepSearch>) {
    table(
        md,
        &["scenario", "server", "shards", "rates tried", "best offered/s", "achieved/s", "P99 µs there"],
        rows.map(|s| {
            let best = s.best().map_or(["none passed".into(), "-".into(), "-".into()], |m| {
                [
                    format!("{:.0}", m.offered_rate),
                    format!("{:.0}", m.achieved_rate),
                    format!("{:.1}", m.latency.p99_us),
                ]
            });
            [s.scenario.into(), s.server.into(), shards(s.shards), s.steps.len().to_string()]
                .into_iter()
                .chain(best)
                .collect()
        }),
    );
}

/// Seconds as a person writes them: `2`, `0.5`, `1.25` (to the millisecond).
fn seconds(value: f64) -> String {
    let text = format!("{value:.3}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::{median, median_of_unstalled, seconds};

    #[test]
    fn seconds_read_as_written() {
        let cases = [(0.0, "0"), (0.5, "0.5"), (2.0, "2"), (10.0, "10"), (1.25, "1.25"), (0.0004, "0")];
        for (value, text) in cases {
            assert_eq!(seconds(value), text, "{value}");
        }
    }

    #[test]
    fn the_median_ignores_one_stalled_round() {
        assert_eq!(median([].into_iter()), None);
        // Two quiet rounds and one that a host stall spoiled.
        assert_eq!(median([110.3, 703.0, 150.0].into_iter()), Some(150.0));
        assert_eq!(median([4.0, 1.0, 3.0, 2.0].into_iter()), Some(2.5));
    }

    #[test]
    fn a_round_in_which_the_machine_stalled_is_left_out_of_the_median() {
        // Three rounds; the first stalled and was taken again.
        let rounds = [(2427.0, true), (732.0, false), (488.0, false), (985.0, false)];
        assert_eq!(median_of_unstalled(rounds.into_iter()), Some(732.0));
        // Stalled throughout: the median of what there is, rather than nothing.
        assert_eq!(median_of_unstalled([(300.0, true), (100.0, true), (200.0, true)].into_iter()), Some(200.0));
        assert_eq!(median_of_unstalled([].into_iter()), None);
    }
}
