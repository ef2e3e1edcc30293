//! A whole harness run: the chosen scenarios at a fixed rate or by step search, optionally side by
//! side with the baseline and along the shard-scaling curve.

use super::report::{Comparison, Machine, Report};
use super::scenario::Scenario;
use super::search::{StepPlan, StepSearch};
use super::session::{ServerSource, Session, Settings, BASELINE_WITHOUT_TLS};
use super::target::Implementation;
use super::{fleet, hostile};

/// How rates are chosen.
#[derive(Clone, Debug)]
pub enum Mode {
    /// Every scenario at this rate.
    Fixed { rate: f64 },
    /// Every scenario by step search.
    Step(StepPlan),
}

/// How many times each server is measured at the equal offered load, by default. A P99 is the
/// worst hundredth of a window, and on a shared VM one host stall fills it (perf/METHOD.md,
/// "Noise"): each side's P99 is the median of its rounds, and the rounds alternate so that a noisy
/// minute spoils one round of each side rather than every round of one. A round in which the
/// machine stalled is taken again (`Session::measure_again_if`), and the median leaves the stalled
/// ones out. Five, not three: near its capacity the baseline's P99 varied fourfold from round to
/// round on the same server (248 to 1,048 µs in run AV), so the median of three was one round
/// away from either answer.
pub const EQUAL_LOAD_ROUNDS: usize = 5;

#[derive(Clone, Debug)]
pub struct SuiteOptions {
    pub scenarios: Vec<Scenario>,
    pub source: ServerSource,
    pub mode: Mode,
    /// The ramp for the comparison and the scale curve, whatever the mode.
    pub steps: StepPlan,
    pub baseline: bool,
    /// Rounds per server at the equal offered load (at least one).
    pub equal_load_rounds: usize,
    /// Shard counts for the scaling curve, and its scenario.
    pub scale: Option<(Vec<usize>, Scenario)>,
    pub settings: Settings,
    pub command: Vec<String>,
}

pub fn run_suite(options: &SuiteOptions) -> Result<Report, String> {
    if options.baseline && matches!(options.source, ServerSource::Start { tls: Some(_), .. }) {
        // Said before the first scenario rather than minutes later, at the first comparison.
        return Err(BASELINE_WITHOUT_TLS.into());
    }
    for special in [Scenario::Hostile, Scenario::Fleet] {
        let step = matches!(options.mode, Mode::Step(_)) && options.scenarios.contains(&special);
        if step || options.scale.as_ref().is_some_and(|(_, s)| *s == special) {
            // Each compares two set-ups at one rate (the bystander with and without attacks; a
            // replica and a single node); a search would answer another question.
            return Err(format!(
                "the {} scenario measures at one rate (--rate): leave it out of --step and --scale",
                special.name()
            ));
        }
    }
    let settings = &options.settings;
    let started_unix_s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut report = Report {
        tool: concat!("tensor-wasm-bench ", env!("CARGO_PKG_VERSION")),
        started_unix_s,
        machine: Machine::this(match &options.source {
            ServerSource::Start { cpus, .. } => cpus.as_deref(),
            ServerSource::Remote(_) => None,
        }),
        command: options.command.clone(),
        connections: settings.connections,
        tls: options.source.speaks_tls(),
        threads: settings.threads,
        spin: settings.spin,
        warmup_s: settings.warmup.as_secs_f64(),
        duration_s: settings.duration.as_secs_f64(),
        measurements: Vec::new(),
        searches: Vec::new(),
        comparisons: Vec::new(),
        scale: Vec::new(),
        hostile: Vec::new(),
        fleet: Vec::new(),
        pass: true,
    };
    let search = |session: &Session, plan: &StepPlan| session.step_search(plan, settings);

    for &scenario in &options.scenarios {
        if let (Scenario::Fleet, Mode::Fixed { rate }) = (scenario, &options.mode) {
            let run = fleet::run(&options.source, *rate, settings)?;
            report.pass &= run.pass;
            report.fleet.push(run);
            continue;
        }
        let session = Session::open(&options.source, Implementation::TensorWasm, scenario, None, settings)?;
        match &options.mode {
            Mode::Fixed { rate } if scenario == Scenario::Hostile => {
                let h = hostile::run(&session, *rate, settings)?;
                report.pass &= h.pass;
                report.hostile.push(h);
            }
            Mode::Fixed { rate } => {
                let m = session.measure(*rate, settings)?;
                report.pass &= m.pass;
                report.measurements.push(m);
            }
            Mode::Step(plan) => {
                let s = search(&session, plan)?;
                report.pass &= s.best.is_some();
                report.searches.push(s);
            }
        }
    }

    if options.baseline {
        assert!(options.equal_load_rounds >= 1, "a P99 at equal load needs a round of each server");
        for &scenario in options.scenarios.iter().filter(|s| s.runs_on(Implementation::Baseline)) {
            let ours = Session::open(&options.source, Implementation::TensorWasm, scenario, None, settings)?;
            let ours_search = search(&ours, &options.steps)?;
            // Only one server runs at a time, so that neither takes CPUs from the other; ours is
            // started again, fresh, for the equal-load measurement.
            drop(ours);
            let base = Session::open(&options.source, Implementation::Baseline, scenario, None, settings)?;
            let base_search = search(&base, &options.steps)?;
            let best = |s: &StepSearch| s.best().map(|m| m.offered_rate);
            let equal = 0.8
                * match (best(&ours_search), best(&base_search)) {
                    (Some(a), Some(b)) => a.min(b),
                    (Some(r), None) | (None, Some(r)) => r,
                    (None, None) => options.steps.start,
                };
            // Rounds alternate, baseline first (its server is still up), each on a freshly
            // started server.
            let (mut base_equal, mut ours_equal) = (Vec::new(), Vec::new());
            let mut base = Some(base);
            for _ in 0..options.equal_load_rounds {
                let session = match base.take() {
                    Some(session) => session,
                    None => Session::open(&options.source, Implementation::Baseline, scenario, None, settings)?,
                };
                session.measure_again_if(equal, settings, &mut base_equal, |m| m.machine_stalled)?;
                drop(session);
                let ours = Session::open(&options.source, Implementation::TensorWasm, scenario, None, settings)?;
                ours.measure_again_if(equal, settings, &mut ours_equal, |m| m.machine_stalled)?;
            }
            report.comparisons.push(Comparison::new(
                scenario.name(),
                ours_search,
                base_search,
                equal,
                ours_equal,
                base_equal,
            ));
        }
    }

    if let Some((shard_counts, scenario)) = &options.scale {
        for &shards in shard_counts {
            let session =
                Session::open(&options.source, Implementation::TensorWasm, *scenario, Some(shards), settings)?;
            report.scale.push(search(&session, &options.steps)?);
        }
    }
    Ok(report)
}
