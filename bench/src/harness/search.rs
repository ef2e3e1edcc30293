//! The search room: the highest rate a session's server holds within the SLO (`Session::step_search`):
//! the ramp, the bisections of its edge, and the confirmation that judges a rate best only when it
//! passed twice and never missed. Each rate is measured by [`super::measure`].

use std::time::Duration;

use serde::Serialize;

use super::measure::Measurement;
use super::session::{Session, Settings};

/// The most times one rate is measured while the machine stalls. On the development VM a stall
/// lasts from seconds to minutes, so one retry often fell into the same one (perf/HISTORY.md, run
/// AA); three attempts cost at most two more windows.
const MEASUREMENTS_PER_RATE: usize = 3;

/// Lets the server drain what the last step queued before the next one starts.
fn pause_between_steps() {
    std::thread::sleep(Duration::from_millis(300));
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

impl Session {
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
}

#[cfg(test)]
mod tests {
    use super::{StepPlan, Verdicts, NARROWINGS};

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
}
