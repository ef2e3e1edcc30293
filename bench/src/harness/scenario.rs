//! The scenarios: what each deploys, what it sends, and which objectives judge it.

use std::sync::Arc;

use base64::Engine as _;
use serde::Serialize;
use tensor_wasm::exposition::Route;

use super::client::Response;
use super::guests::{self, GuestSource};
use super::hostile;
use super::load::RequestClass;
use super::slo::TrafficClass;
use super::target::{Endpoint, Implementation};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// `GET /healthz`.
    Healthz,
    /// Invoke of the empty WASI hello.
    Hello,
    /// Invoke of the Rust guest `json-stats`: parses a JSON body and writes JSON.
    Json,
    /// Invoke of the Rust guest `tensor-ops`: a dense layer through the dispatch path.
    Tensor,
    /// Invokes of examples/encoder: one transformer encoder block on 16 tokens, with resident
    /// seeded weights, half of them f32 and half mixed-precision bf16 (a class each).
    Encoder,
    /// Invokes of examples/digits: the MLP classifier with its resident trained weights, on one
    /// held-out sample.
    Digits,
    /// Four tenants with rate limits on; one offers far more than its limit.
    TenantMix,
    /// Invokes of hello while functions are deployed and deleted beside them.
    DeployStorm,
    /// A CPU-bound guest offered past capacity, with a small instance pool: the server must shed
    /// with 503 `overloaded`, keep admitted requests fast, and hold its memory.
    Overload,
    /// A bystander tenant's `/healthz` and invokes, first alone and then beside each attack of
    /// tests/hostile.rs at rate (`harness::hostile`): its P99 must stay within 2× of the quiet one.
    Hostile,
    /// Three replicas sharing a NATS registry against one node (`harness::fleet`): deploy latency
    /// and propagation, and hello on a replica against hello on the node.
    Fleet,
}

impl Scenario {
    /// Every scenario a plain run measures. `overload` is asked for by name: it is meant to
    /// fail a 5xx objective, and judges itself against its own. So is `hostile`: it takes a
    /// measurement per attack, and judges each against the first, quiet one.
    pub const ALL: [Scenario; 6] = [
        Scenario::Healthz,
        Scenario::Hello,
        Scenario::Json,
        Scenario::Tensor,
        Scenario::TenantMix,
        Scenario::DeployStorm,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Healthz => "healthz",
            Scenario::Hello => "hello",
            Scenario::Json => "json",
            Scenario::Tensor => "tensor",
            Scenario::Encoder => "encoder",
            Scenario::Digits => "digits",
            Scenario::TenantMix => "tenant-mix",
            Scenario::DeployStorm => "deploy-storm",
            Scenario::Overload => "overload",
            Scenario::Hostile => "hostile",
            Scenario::Fleet => "fleet",
        }
    }

    /// The server's route that the scenario's load goes to.
    pub fn route(self) -> Route {
        match self {
            Scenario::Healthz => Route::Healthz,
            Scenario::Hello
            | Scenario::Json
            | Scenario::Tensor
            | Scenario::Encoder
            | Scenario::Digits
            | Scenario::TenantMix
            | Scenario::DeployStorm
            | Scenario::Overload
            | Scenario::Hostile
            | Scenario::Fleet => Route::Invoke,
        }
    }

    /// Whether the server's kernel-dispatch histogram is read over the scenario's runs.
    pub fn dispatches(self) -> bool {
        matches!(self, Scenario::Tensor | Scenario::Encoder | Scenario::Digits)
    }

    /// Whether `implementation` can serve the scenario. The conventional baseline has no dispatch
    /// path, tokens or rate limits.
    pub fn runs_on(self, implementation: Implementation) -> bool {
        implementation == Implementation::TensorWasm
            || matches!(self, Scenario::Healthz | Scenario::Hello | Scenario::Json | Scenario::DeployStorm)
    }

    /// The shard count of a server started for this scenario on `cpus` CPUs: one per CPU, except
    /// that the tensor scenarios leave one to the device worker, which otherwise waits for a shard
    /// to yield its CPU (perf/DISPATCH.md).
    pub fn default_shards(self, implementation: Implementation, cpus: usize) -> usize {
        match (self, implementation) {
            (Scenario::Tensor | Scenario::Encoder | Scenario::Digits, Implementation::TensorWasm) => {
                cpus.saturating_sub(1).max(1)
            }
            _ => cpus,
        }
    }

    /// The flags and environment a server started for this scenario, with `shards`, needs.
    pub fn server_settings(self, options: &ScenarioOptions, shards: usize) -> ServerSettings {
        match self {
            Scenario::TenantMix => ServerSettings {
                args: vec![
                    "--rate-limit-qps".into(),
                    options.mix_limit_qps.to_string(),
                    "--rate-limit-burst".into(),
                    options.mix_limit_qps.to_string(),
                ],
                env: vec![(
                    "TENSOR_WASM_API_TOKENS".into(),
                    MIX_TENANTS.map(|t| format!("{}:tenant={t}", mix_token(t))).join(","),
                )],
            },
            Scenario::Overload => ServerSettings {
                args: vec!["--max-instances".into(), (OVERLOAD_SLOTS_PER_SHARD * shards).to_string()],
                env: Vec::new(),
            },
            Scenario::Hostile => hostile::server_settings(shards),
            _ => ServerSettings::default(),
        }
    }

    /// Deploys what the scenario needs on `endpoint` and encodes its requests.
    /// `started` says whether the harness started the server (and so configured it).
    pub fn prepare(self, endpoint: &Endpoint, started: bool, options: &ScenarioOptions) -> Result<Prepared, String> {
        let invoke = |endpoint: &Endpoint, id: &str, body: &[u8]| -> Arc<[u8]> {
            endpoint.request("POST", &format!("/functions/{id}/invoke"), body).into()
        };
        let single = |name: &str, request: Arc<[u8]>, traffic| Prepared {
            classes: vec![RequestClass { name: name.into(), request, weight: 1 }],
            traffic,
            expected: Vec::new(),
            judge_admitted: false,
            storm: false,
            functions: Vec::new(),
        };
        let prepared = match self {
            Scenario::Healthz => {
                single("healthz", endpoint.request("GET", "/healthz", b"").into(), TrafficClass::Healthz)
            }
            Scenario::Hello | Scenario::DeployStorm | Scenario::Fleet => {
                let id = deploy(endpoint, "bench-hello", &guests::hello())?;
                let mut p = single("hello", invoke(endpoint, &id, b""), TrafficClass::InvokeHost);
                p.functions.push((endpoint.clone(), id));
                p.storm = self == Scenario::DeployStorm;
                p
            }
            Scenario::Json => {
                let id = deploy(endpoint, "bench-json", &options.guests.rust_guest("json-stats")?)?;
                let mut p = single("json", invoke(endpoint, &id, &guests::json_stats_body()), TrafficClass::InvokeHost);
                p.functions.push((endpoint.clone(), id));
                p
            }
            Scenario::Tensor => {
                let id = deploy(endpoint, "bench-tensor", &options.guests.rust_guest("tensor-ops")?)?;
                let matrix = |rows: usize, cols: usize| -> Vec<Vec<f64>> {
                    (0..rows).map(|r| (0..cols).map(|c| ((r * cols + c) % 7) as f64 * 0.25 - 0.5).collect()).collect()
                };
                let body = serde_json::json!({ "x": matrix(16, 32), "w": matrix(32, 16), "scale": 0.5 });
                let gpu = live_backend(endpoint)? == "cuda";
                let mut p = single(
                    "tensor",
                    invoke(endpoint, &id, body.to_string().as_bytes()),
                    TrafficClass::InvokeTensor { gpu },
                );
                p.functions.push((endpoint.clone(), id));
                p
            }
            Scenario::Encoder => encoder(endpoint, &options.guests)?,
            Scenario::Digits => {
                // Built in, so that the harness carried to a GPU machine without the repository
                // still has them (perf/gpu-check.sh).
                let weights = base64::engine::general_purpose::STANDARD.encode(DIGITS_WEIGHTS);
                let sample = DIGITS_HOLDOUT.lines().next().unwrap_or_default().as_bytes();
                let extra = serde_json::json!({ "tensors_b64": weights });
                let id = deploy_with(endpoint, "bench-digits", &options.guests.example("digits")?, extra)?;
                let gpu = live_backend(endpoint)? == "cuda";
                let mut p = single("digits", invoke(endpoint, &id, sample), TrafficClass::InvokeModel { gpu });
                p.functions.push((endpoint.clone(), id));
                p
            }
            Scenario::Overload => {
                let id = deploy(endpoint, "bench-spin", &guests::spin(OVERLOAD_SPIN_ITERATIONS))?;
                let mut p = single("spin", invoke(endpoint, &id, b""), TrafficClass::Overload);
                p.expected.push(("spin".into(), 503));
                p.judge_admitted = true;
                p.functions.push((endpoint.clone(), id));
                p
            }
            Scenario::Hostile => {
                if !started {
                    return Err("the hostile scenario configures tokens and limits, so it runs only on a server the \
                                harness starts (leave out --server)"
                        .into());
                }
                hostile::prepare_bystander(endpoint)?
            }
            Scenario::TenantMix => {
                if !started {
                    return Err("the tenant-mix scenario configures tokens and rate limits, so it runs only on a \
                                server the harness starts (leave out --server)"
                        .into());
                }
                let mut p = Prepared {
                    classes: Vec::new(),
                    traffic: TrafficClass::InvokeHost,
                    expected: Vec::new(),
                    judge_admitted: false,
                    storm: false,
                    functions: Vec::new(),
                };
                for tenant in MIX_TENANTS {
                    let as_tenant = endpoint.acting_as(Some(mix_token(tenant)), Some(tenant));
                    let id = deploy(&as_tenant, &format!("bench-hello-{tenant}"), &guests::hello())?;
                    let noisy = tenant == MIX_TENANTS[0];
                    let name = if noisy { format!("tenant {tenant} (noisy)") } else { format!("tenant {tenant}") };
                    // The noisy tenant offers half the total, three times each quiet tenant's share.
                    p.classes.push(RequestClass {
                        name: name.clone(),
                        request: invoke(&as_tenant, &id, b""),
                        weight: if noisy { 3 } else { 1 },
                    });
                    if noisy {
                        p.expected.push((name, 429));
                    }
                    p.functions.push((as_tenant, id));
                }
                p
            }
        };
        Ok(prepared)
    }
}

/// The encoder scenario: the example's block deployed twice, with f32 and with bf16 weights, and
/// the same 16-token request to each, asking for the pooled output (so that the guest's JSON stays
/// small beside the block's work).
fn encoder(endpoint: &Endpoint, guests: &GuestSource) -> Result<Prepared, String> {
    let wasm = guests.example("encoder")?;
    let config = encoder_model::Config::SMALL;
    let ids = encoder_model::token_ids(config, ENCODER_SEED, ENCODER_TOKENS);
    let gpu = live_backend(endpoint)? == "cuda";
    let mut p = Prepared {
        classes: Vec::new(),
        traffic: TrafficClass::InvokeModel { gpu },
        expected: Vec::new(),
        judge_admitted: false,
        storm: false,
        functions: Vec::new(),
    };
    for precision in [encoder_model::Precision::F32, encoder_model::Precision::Bf16] {
        let name = format!("encoder {}", precision.name());
        let weights = encoder_model::weights(config, ENCODER_SEED, precision);
        let tensors = base64::engine::general_purpose::STANDARD.encode(encoder_model::safetensors(&weights));
        let extra = serde_json::json!({ "tensors_b64": tensors });
        let id = deploy_with(endpoint, &format!("bench-encoder-{}", precision.name()), &wasm, extra)?;
        let request =
            endpoint.request("POST", &format!("/functions/{id}/invoke"), encoder_model::request(&ids, true).as_bytes());
        p.classes.push(RequestClass { name, request: request.into(), weight: 1 });
        p.functions.push((endpoint.clone(), id));
    }
    Ok(p)
}

// Shared with tests/encoder.rs, which uses all of it (the reference needs `LN_EPS` and `heads`).
#[path = "../../../examples/encoder/model.rs"]
#[allow(dead_code)]
mod encoder_model;

/// examples/digits' trained weights, and its held-out samples (the scenario sends the first).
const DIGITS_WEIGHTS: &[u8] = include_bytes!("../../../examples/digits/digits.safetensors");
const DIGITS_HOLDOUT: &str = include_str!("../../../examples/digits/holdout.jsonl");

/// The encoder scenario's weights and tokens come from this seed.
const ENCODER_SEED: u64 = 34;
/// Tokens per encoder request: half the example's longest sequence.
const ENCODER_TOKENS: usize = 16;

/// Settings of the scenarios that have any.
#[derive(Clone, Debug)]
pub struct ScenarioOptions {
    pub guests: GuestSource,
    /// The per-token rate limit of the tenant-mix server.
    pub mix_limit_qps: u32,
    /// The attacks of the hostile scenario and how fast they come.
    pub hostile: hostile::HostileOptions,
}

/// The overload server's instance slots per shard: an admitted request waits behind at most
/// this many guests of its shard.
pub const OVERLOAD_SLOTS_PER_SHARD: usize = 2;
/// The overload guest's loop: about a millisecond of CPU on the 2-vCPU development VM.
const OVERLOAD_SPIN_ITERATIONS: u32 = 1_000_000;

#[derive(Clone, Debug, Default)]
pub struct ServerSettings {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

/// A scenario ready to run.
#[derive(Clone, Debug)]
pub struct Prepared {
    pub classes: Vec<RequestClass>,
    pub traffic: TrafficClass,
    /// Statuses a class is expected to get besides 2xx: they are neither errors nor judged.
    pub expected: Vec<(String, u16)>,
    /// Judge the latency of the 2xx answers alone, even of a class with expected refusals.
    pub judge_admitted: bool,
    /// Whether functions are deployed and deleted beside the load.
    pub storm: bool,
    /// What was deployed, and as whom: deleted when the scenario ends.
    pub functions: Vec<(Endpoint, String)>,
}

impl Prepared {
    /// Whether `status` on class `class` is expected.
    pub fn expects(&self, class: &str, status: u16) -> bool {
        (200..300).contains(&status) || self.expected.iter().any(|(c, s)| c == class && *s == status)
    }

    /// Whether a class's latency is judged: a class with an expected refusal is not, as its fast
    /// 429s would flatter the percentiles.
    pub fn judged(&self, class: &str) -> bool {
        self.judge_admitted || !self.expected.iter().any(|(c, _)| c == class)
    }

    /// Deletes what `prepare` deployed; failures are reported, not fatal.
    pub fn clean_up(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for (endpoint, id) in &self.functions {
            match endpoint.call("DELETE", &format!("/functions/{id}"), b"") {
                Ok(r) if r.status < 300 || r.status == 404 => {}
                Ok(r) => problems.push(format!("deleting {id} answered {}: {}", r.status, r.text())),
                Err(e) => problems.push(format!("deleting {id}: {e}")),
            }
        }
        problems
    }
}

/// The tenants of the mix; the first is the noisy one.
const MIX_TENANTS: [u64; 4] = [1, 2, 3, 4];

/// The mix server's token for `tenant`, scoped to it alone.
fn mix_token(tenant: u64) -> String {
    format!("tensor-wasm-bench-tenant-{tenant}")
}

/// Deploys `wasm` as `name`; returns its id.
pub fn deploy(endpoint: &Endpoint, name: &str, wasm: &[u8]) -> Result<String, String> {
    deploy_with(endpoint, name, wasm, serde_json::json!({}))
}

/// `POST /functions` of `wasm` as `name`, with the fields of `extra` (`timeout_ms`, say); the
/// answer, whatever its status.
pub fn deploy_request(
    endpoint: &Endpoint,
    name: &str,
    wasm: &[u8],
    extra: serde_json::Value,
) -> Result<Response, String> {
    let mut body = serde_json::json!({
        "name": name,
        "wasm_b64": base64::engine::general_purpose::STANDARD.encode(wasm),
    });
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    endpoint.call("POST", "/functions", body.to_string().as_bytes())
}

/// Deploys `wasm` as `name` with the fields of `extra`; returns its id.
pub fn deploy_with(endpoint: &Endpoint, name: &str, wasm: &[u8], extra: serde_json::Value) -> Result<String, String> {
    let r = deploy_request(endpoint, name, wasm, extra)?;
    if r.status != 201 {
        return Err(format!("deploying {name} answered {}: {}", r.status, r.text()));
    }
    r.json()
        .ok()
        .and_then(|v| v["id"].as_str().map(str::to_string))
        .ok_or_else(|| format!("deploying {name} answered no id: {}", r.text()))
}

/// The dispatch back-end the server runs: `cuda` or `host`, from its `tensor_wasm_gpu_devices`.
fn live_backend(endpoint: &Endpoint) -> Result<&'static str, String> {
    let text = endpoint.metrics()?;
    let cuda = text.lines().any(|l| {
        l.starts_with("tensor_wasm_gpu_devices{backend=\"cuda\"}")
            && l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).is_some_and(|v| v > 0.0)
    });
    Ok(if cuda { "cuda" } else { "host" })
}
