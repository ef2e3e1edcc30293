//! The service-level objectives a run is judged against: docs/SLO.md's table, in code.

use std::time::Duration;

use serde::Serialize;

/// Whose objective it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The production tutorial's SLOs and alert thresholds.
    Seed,
    /// Our own, tighter ones.
    Ours,
}

/// What a target measures.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Measure {
    /// A quantile of the harness's HTTP latency, corrected for coordinated omission.
    HttpLatency { quantile: f64 },
    /// A quantile of the server's `tensor_wasm_kernel_latency_seconds`, over the run.
    DispatchLatency { quantile: f64 },
    /// The share of requests answered 5xx or not at all.
    ServerErrorRatio,
    /// The share of requests that failed in any way the scenario did not expect.
    FailedRatio,
    /// The hostile scenario: a phase's P99 over the P99 of its quiet phase, in which no attacker
    /// ran. Judged across measurements, by `harness::hostile`.
    QuietP99Ratio,
    /// The hostile scenario: the attacker's answers that were not the refusals its attack is
    /// meant to get (an unexpected status or kind, or no answer).
    UnexpectedAnswers,
}

/// One objective: a measure and its limit (seconds for latencies, a ratio otherwise).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Target {
    pub name: &'static str,
    pub source: Source,
    pub measure: Measure,
    pub limit: f64,
}

/// The kind of traffic a scenario is, which decides its targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrafficClass {
    Healthz,
    InvokeHost,
    /// An invoke whose guest dispatches kernels; `gpu` when the live back-end is CUDA.
    InvokeTensor {
        gpu: bool,
    },
    /// An invoke that runs a model (the digits MLP, the encoder block): judged on its latency
    /// alone. Its tensor calls include waits on real work (a read after a chain of matmuls), so
    /// the tiny-kernel dispatch objectives do not apply; the report still shows their histogram.
    InvokeModel {
        gpu: bool,
    },
    /// Invokes offered past capacity: shedding (503) is expected, so there is no 5xx objective;
    /// the admitted requests are judged.
    Overload,
    /// A bystander's `/healthz` and invokes beside an attacker: every one must succeed. Its
    /// latency is judged against its own quiet P99 (`QUIET_P99_RATIO`), not an absolute limit,
    /// since the attacks take the CPUs that the bystander's round trips share.
    Hostile,
}

/// The hostile scenario's objective (issue 31): the bystander's P99 beside an attack at most
/// twice its P99 with no attacker.
pub const QUIET_P99_RATIO: Target = Target {
    name: "bystander P99 ≤ 2× its quiet P99",
    source: Source::Ours,
    measure: Measure::QuietP99Ratio,
    limit: 2.0,
};

/// The hostile scenario's other objective: every attacker request got the precise refusal (or
/// the cut-off) it is meant to.
pub const ONLY_REFUSALS: Target = Target {
    name: "attacker got only its refusals",
    source: Source::Ours,
    measure: Measure::UnexpectedAnswers,
    limit: 0.0,
};

const SEED_AVAILABILITY: Target =
    Target { name: "5xx ratio ≤ 0.5%", source: Source::Seed, measure: Measure::ServerErrorRatio, limit: 0.005 };
const OUR_AVAILABILITY: Target =
    Target { name: "failed ratio ≤ 0.01%", source: Source::Ours, measure: Measure::FailedRatio, limit: 0.0001 };

fn p95(name: &'static str, source: Source, seconds: f64) -> Target {
    Target { name, source, measure: Measure::HttpLatency { quantile: 0.95 }, limit: seconds }
}

fn p99(name: &'static str, source: Source, seconds: f64) -> Target {
    Target { name, source, measure: Measure::HttpLatency { quantile: 0.99 }, limit: seconds }
}

fn dispatch_p95(name: &'static str, source: Source, seconds: f64) -> Target {
    Target { name, source, measure: Measure::DispatchLatency { quantile: 0.95 }, limit: seconds }
}

impl TrafficClass {
    /// docs/SLO.md's targets for this traffic. `p99_override` replaces our own P99 limit.
    pub fn targets(self, p99_override: Option<Duration>) -> Vec<Target> {
        let mut targets = match self {
            TrafficClass::Overload => {
                // Admitted requests keep the seed's invoke objective. Ours is the budget we give a
                // GPU invoke: an admitted request may share its shard's CPU with the other guest
                // of its slot pool (OVERLOAD_SLOTS_PER_SHARD) and with the load generator.
                return vec![
                    p95("admitted invoke P95 ≤ 100 ms", Source::Seed, 0.100),
                    p99("admitted invoke P99 ≤ 20 ms", Source::Ours, p99_override.map_or(0.020, |d| d.as_secs_f64())),
                    OUR_AVAILABILITY,
                ];
            }
            TrafficClass::Hostile => {
                // Not one bystander failure, beside any attack (issue 31).
                return vec![
                    SEED_AVAILABILITY,
                    Target {
                        name: "no bystander failure",
                        source: Source::Ours,
                        measure: Measure::FailedRatio,
                        limit: 0.0,
                    },
                ];
            }
            TrafficClass::Healthz => {
                vec![p95("/healthz P95 ≤ 10 ms", Source::Seed, 0.010), p99("/healthz P99 ≤ 1 ms", Source::Ours, 0.001)]
            }
            TrafficClass::InvokeHost | TrafficClass::InvokeModel { gpu: false } => {
                vec![p95("invoke P95 ≤ 100 ms", Source::Seed, 0.100), p99("invoke P99 ≤ 5 ms", Source::Ours, 0.005)]
            }
            TrafficClass::InvokeModel { gpu: true } => {
                // Issue 34's target for the digits example at 1,000 req/s, held for the encoder too.
                vec![
                    p95("invoke P95 ≤ 500 ms (GPU)", Source::Seed, 0.500),
                    p99("invoke P99 ≤ 2 ms (GPU)", Source::Ours, 0.002),
                ]
            }
            TrafficClass::InvokeTensor { gpu } => {
                let mut t = if gpu {
                    vec![
                        p95("invoke P95 ≤ 500 ms (GPU)", Source::Seed, 0.500),
                        p99("invoke P99 ≤ 20 ms (GPU)", Source::Ours, 0.020),
                        dispatch_p95("dispatch P95 ≤ 15 µs (CUDA)", Source::Ours, 0.000_015),
                    ]
                } else {
                    vec![
                        p95("invoke P95 ≤ 100 ms", Source::Seed, 0.100),
                        p99("invoke P99 ≤ 5 ms", Source::Ours, 0.005),
                        dispatch_p95("dispatch P95 ≤ 5 µs (host)", Source::Ours, 0.000_005),
                    ]
                };
                t.push(dispatch_p95("dispatch P95 ≤ 50 µs", Source::Seed, 0.000_050));
                t
            }
        };
        if let Some(limit) = p99_override {
            for t in targets.iter_mut() {
                if t.source == Source::Ours && t.measure == (Measure::HttpLatency { quantile: 0.99 }) {
                    t.name = "P99 ≤ the given --p99-target";
                    t.limit = limit.as_secs_f64();
                }
            }
        }
        targets.push(SEED_AVAILABILITY);
        targets.push(OUR_AVAILABILITY);
        targets
    }
}

/// A target and what the run measured for it.
#[derive(Clone, Debug, Serialize)]
pub struct Verdict {
    pub target: Target,
    /// `None` when the run has no data for it (no kernels were dispatched, say): a failure.
    pub measured: Option<f64>,
    pub pass: bool,
}

impl Verdict {
    pub fn judge(target: Target, measured: Option<f64>) -> Verdict {
        let pass = measured.is_some_and(|m| m <= target.limit);
        Verdict { target, measured, pass }
    }

    /// The measured value for a table: latencies in µs or ms, ratios in percent.
    pub fn measured_text(&self) -> String {
        match (self.measured, self.target.measure) {
            (None, _) => "no data".into(),
            (Some(v), Measure::ServerErrorRatio | Measure::FailedRatio) => format!("{:.3}%", v * 100.0),
            (Some(v), Measure::QuietP99Ratio) => format!("{v:.2}×"),
            (Some(v), Measure::UnexpectedAnswers) => format!("{v:.0}"),
            (Some(v), _) if v < 0.001 => format!("{:.1} µs", v * 1e6),
            (Some(v), _) => format!("{:.2} ms", v * 1e3),
        }
    }
}

/// Which targets decide the exit status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Gate {
    /// The seed's objectives only: what a deployment must meet.
    Seed,
    /// The seed's and ours.
    All,
}

impl Gate {
    pub fn gates(self, target: &Target) -> bool {
        self == Gate::All || target.source == Source::Seed
    }
}
