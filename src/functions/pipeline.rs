//! A pipeline's definition, as the API and the functions directory give it, and as it is stored.

use serde::{Deserialize, Serialize};

use super::manifest::either_timeout;
use super::record::{validate_name, Source};
use crate::config::Limits;
use crate::error::ApiError;

/// Most steps a pipeline may have. This and the sink's bounds below are rules of a pipeline's
/// definition (docs/API.md), the same on every server so that a definition that one accepts
/// every other accepts: not operator limits, so they stay here rather than in `config`.
pub const MAX_STEPS: usize = 32;
/// Most attempts a sink delivery may make.
pub const MAX_SINK_ATTEMPTS: u32 = 10;
/// A sink's defaults: attempts, and each attempt's deadline.
const DEFAULT_SINK_ATTEMPTS: u32 = 3;
const DEFAULT_SINK_TIMEOUT_MS: u64 = 5_000;
const DEFAULT_SINK_BACKOFF_MS: u64 = 100;

/// A stored pipeline. Stored as `pipelines/<id>.json` when it came from the API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineRecord {
    pub id: String,
    pub name: String,
    pub tenant_id: u64,
    pub created_unix_ms: u64,
    /// The whole pipeline's deadline, steps included, sink delivery not.
    pub timeout_ms: u64,
    pub steps: Vec<Step>,
    pub sink: Option<Sink>,
    #[serde(default)]
    pub source: Source,
}

/// One step: a function of the pipeline's tenant, by id or by name. A name resolves, at each
/// invocation, to the newest function of that name, so redeploying a function moves its
/// pipelines to the new version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    pub function: String,
    /// This step's deadline; `None`: the function's own `timeout_ms`.
    pub timeout_ms: Option<u64>,
}

/// Where a pipeline delivers its final output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sink {
    pub url: String,
    pub method: String,
    pub max_attempts: u32,
    /// Each attempt's deadline: connect, send and answer.
    pub timeout_ms: u64,
    /// The first retry's wait; it doubles each time (capped at 5 s), or follows `retry-after`.
    pub backoff_ms: u64,
}

impl PipelineRecord {
    /// The API's view.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "name": self.name,
            "created_unix_ms": self.created_unix_ms,
            "timeout_ms": self.timeout_ms,
            "steps": self.steps,
            "sink": self.sink,
            "source": self.source.as_str(),
        })
    }
}

impl PipelineRecord {
    /// The record written back as a spec, every field explicit: what a record from elsewhere (the
    /// fleet's registry) is checked through, with the checks a spec of this server's gets.
    pub fn as_spec(&self) -> PipelineSpec {
        let steps = self
            .steps
            .iter()
            .map(|s| {
                StepSpec::Detailed(DetailedStep {
                    function: s.function.clone(),
                    timeout_ms: s.timeout_ms,
                    timeout: None,
                })
            })
            .collect();
        let sink = self.sink.as_ref().map(|s| SinkSpec {
            url: s.url.clone(),
            method: Some(s.method.clone()),
            max_attempts: Some(s.max_attempts),
            timeout_ms: Some(s.timeout_ms),
            backoff_ms: Some(s.backoff_ms),
        });
        PipelineSpec { name: None, tenant: None, steps, timeout_ms: Some(self.timeout_ms), timeout: None, sink }
    }
}

/// A pipeline as written: the body of `POST /pipelines`, or a `NAME.pipeline.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSpec {
    /// API only: a file's name is its pipeline's name.
    pub name: Option<String>,
    /// Directory only: the API takes the tenant from the request.
    pub tenant: Option<u64>,
    pub steps: Vec<StepSpec>,
    pub timeout_ms: Option<u64>,
    /// `"5s"`, `"500ms"`, `"1m"`: as Fiso's flow files write timeouts.
    pub timeout: Option<String>,
    pub sink: Option<SinkSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StepSpec {
    Function(String),
    Detailed(DetailedStep),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetailedStep {
    pub function: String,
    pub timeout_ms: Option<u64>,
    pub timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkSpec {
    pub url: String,
    pub method: Option<String>,
    pub max_attempts: Option<u32>,
    pub timeout_ms: Option<u64>,
    pub backoff_ms: Option<u64>,
}

/// A timeout given as `timeout_ms` or as a duration string, in `1..=max` milliseconds.
fn timeout(ms: Option<u64>, text: Option<&str>, max: u64) -> Result<Option<u64>, String> {
    let Some(ms) = either_timeout(ms, text)? else { return Ok(None) };
    if !(1..=max).contains(&ms) {
        return Err(format!("`timeout` must be between 1 and {max} ms, got {ms}"));
    }
    Ok(Some(ms))
}

impl PipelineSpec {
    /// Checks the spec against the server's limits and builds the record. Steps are checked to
    /// exist by the caller, which knows the catalog.
    pub fn into_record(
        self,
        id: String,
        name: String,
        tenant_id: u64,
        created_unix_ms: u64,
        source: Source,
        limits: &Limits,
    ) -> Result<PipelineRecord, ApiError> {
        let invalid = ApiError::InvalidPipeline;
        validate_name(&name).map_err(invalid)?;
        if self.steps.is_empty() || self.steps.len() > MAX_STEPS {
            return Err(invalid(format!("a pipeline has 1 to {MAX_STEPS} steps, got {}", self.steps.len())));
        }
        let max = limits.max_timeout_ms;
        let timeout_ms = timeout(self.timeout_ms, self.timeout.as_deref(), max).map_err(invalid)?;
        let mut steps = Vec::with_capacity(self.steps.len());
        for (index, step) in self.steps.into_iter().enumerate() {
            let step = match step {
                StepSpec::Function(function) => Step { function, timeout_ms: None },
                StepSpec::Detailed(d) => Step {
                    timeout_ms: timeout(d.timeout_ms, d.timeout.as_deref(), max)
                        .map_err(|e| invalid(format!("step {index}: {e}")))?,
                    function: d.function,
                },
            };
            if step.function.is_empty() {
                return Err(invalid(format!("step {index} names no function")));
            }
            steps.push(step);
        }
        let sink = self.sink.map(|s| s.into_sink(limits)).transpose().map_err(invalid)?;
        Ok(PipelineRecord {
            id,
            name,
            tenant_id,
            created_unix_ms,
            timeout_ms: timeout_ms.unwrap_or(max),
            steps,
            sink,
            source,
        })
    }
}

impl SinkSpec {
    fn into_sink(self, limits: &Limits) -> Result<Sink, String> {
        let target = crate::http::client::Target::parse(&self.url).map_err(|e| format!("sink `url`: {e}"))?;
        // A host name is checked at each delivery, against the addresses it resolves to then.
        if let Ok(ip) = target.host.parse::<std::net::IpAddr>() {
            if !limits.sink_networks.allows(ip) {
                return Err(format!("sink `url`: {}", limits.sink_networks.refusal(ip)));
            }
        }
        let method = self.method.unwrap_or_else(|| "POST".into()).to_ascii_uppercase();
        if !matches!(method.as_str(), "POST" | "PUT" | "PATCH") {
            return Err(format!("sink `method` must be POST, PUT or PATCH, got {method}"));
        }
        let max_attempts = self.max_attempts.unwrap_or(DEFAULT_SINK_ATTEMPTS);
        if !(1..=MAX_SINK_ATTEMPTS).contains(&max_attempts) {
            return Err(format!("sink `max_attempts` must be between 1 and {MAX_SINK_ATTEMPTS}, got {max_attempts}"));
        }
        let timeout_ms = timeout(self.timeout_ms, None, limits.max_timeout_ms)?
            .unwrap_or(DEFAULT_SINK_TIMEOUT_MS.min(limits.max_timeout_ms));
        let backoff_ms = self.backoff_ms.unwrap_or(DEFAULT_SINK_BACKOFF_MS).min(limits.max_timeout_ms);
        Ok(Sink { url: self.url, method, max_attempts, timeout_ms, backoff_ms })
    }
}
