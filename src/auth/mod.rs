//! Who may call: bearer tokens scoped to tenants, the tenant header, and dev mode.
//!
//! The token list is published process-wide ([`crate::runtime::published::Published`]); each shard
//! keeps its own copy in a [`ShardAuth`], refreshed only when the list's generation moves. A
//! request therefore authenticates with one SHA-256, one hash-map lookup and a constant-time
//! comparison, and writes nothing shared.

pub mod fleet;
pub mod rate_limit;
pub mod refusals;
pub mod reload;
pub mod tokens;

use std::collections::HashMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;

use crate::cidr::Cidr;
use crate::error::ApiError;
use crate::http::header_rules::TENANT_HEADER;
use crate::http::RequestHead;
use crate::runtime::published::{Derived, Published};
use rate_limit::LocalAllowance;
pub use rate_limit::RateLimit;
pub use tokens::{Scope, TokenEntry, TokenPolicy, TokenSet};

/// Where the token list comes from. No `Debug`: it may hold the tokens themselves.
#[derive(Clone)]
pub enum TokenSource {
    /// No tokens: every request is the dev caller. Loopback listeners only, unless
    /// `--allow-unauthenticated`.
    Dev,
    /// `TENSOR_WASM_API_TOKENS`.
    Inline(String),
    /// `TENSOR_WASM_API_TOKENS_FILE`, re-read when it changes and on SIGHUP.
    File(PathBuf),
}

/// No `Debug`: it holds secrets.
#[derive(Clone)]
pub struct AuthConfig {
    pub source: TokenSource,
    pub token_id_key: Vec<u8>,
    pub metrics_token: Option<String>,
    pub require_tenant: bool,
    /// Per token, across every shard; `None`: unlimited.
    pub rate_limit: Option<RateLimit>,
    /// Peers whose `X-Forwarded-Client-Cert` is believed.
    pub trusted_proxies: Vec<Cidr>,
    /// Per source address, across the process, for requests that fail authentication; `None`:
    /// unlimited.
    pub unauthenticated_rate_limit: Option<RateLimit>,
    /// Sources and tokens a shard remembers refusals of (`auth::refusals`).
    pub max_refusal_sources: usize,
    /// With a NATS registry: how often a replica reports its demand and sets its shares, and how
    /// long a silent replica still counts (`auth::fleet`).
    pub fleet_share_interval: std::time::Duration,
    pub fleet_peer_timeout: std::time::Duration,
}

/// The authenticated caller of one request.
#[derive(Clone, Debug)]
pub enum Caller {
    Dev,
    Bearer(Rc<LocalToken>),
}

impl Caller {
    pub fn may_act_for(&self, tenant: u64) -> bool {
        match self {
            Caller::Dev => true,
            Caller::Bearer(t) => t.entry.scope.allows(tenant),
        }
    }

    pub fn token_id(&self) -> Option<&str> {
        match self {
            Caller::Dev => None,
            Caller::Bearer(t) => Some(&t.id),
        }
    }
}

/// A shard's handle on one token: the shared entry, and what this shard alone keeps for it.
#[derive(Debug)]
pub struct LocalToken {
    pub entry: Arc<TokenEntry>,
    pub id: Rc<str>,
    allowance: LocalAllowance,
}

/// A shard's view of the token list.
pub struct ShardAuth {
    config: Arc<AuthConfig>,
    tokens: Option<Arc<Published<TokenSet>>>,
    shard: usize,
    /// Admissions taken from a token's bucket at once (see `rate_limit::batch_size`).
    batch: u32,
    local: Derived<HashMap<[u8; 32], Rc<LocalToken>>>,
}

impl ShardAuth {
    /// `tokens` is `None` in dev mode.
    pub fn new(config: Arc<AuthConfig>, tokens: Option<Arc<Published<TokenSet>>>, shard: usize, shards: usize) -> Self {
        let batch = config.rate_limit.map_or(1, |limit| rate_limit::batch_size(limit, shards));
        ShardAuth { config, tokens, shard, batch, local: Derived::default() }
    }

    /// Counts the request against its token's rate: 429 `rate_limited` past it.
    pub fn admit(&self, caller: &Caller) -> Result<(), ApiError> {
        let Caller::Bearer(token) = caller else { return Ok(()) };
        let entry = &token.entry;
        let verdict = match &entry.bucket {
            Some(bucket) => token.allowance.admit(bucket, self.batch),
            None => Ok(()),
        };
        match verdict {
            Ok(()) => {
                entry.counts[self.shard].admitted.inc();
                Ok(())
            }
            Err(wait) => {
                entry.counts[self.shard].limited.inc();
                Err(ApiError::RateLimited { retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64 })
            }
        }
    }

    /// The caller of a protected route: 401 `unauthorized` without a valid bearer token.
    pub fn authenticate(&self, head: &RequestHead) -> Result<Caller, ApiError> {
        let presented = bearer(head)?;
        let Some(tokens) = &self.tokens else { return Ok(Caller::Dev) };
        let presented = presented.ok_or(ApiError::Unauthorized)?;
        let local = self.local.get(tokens, |set, mut old| {
            set.entries()
                .map(|(key, entry)| {
                    // An unchanged token keeps this shard's unspent allowance.
                    let kept = old.remove(key).filter(|t| Arc::ptr_eq(&t.entry, entry));
                    let token = kept.unwrap_or_else(|| {
                        Rc::new(LocalToken {
                            entry: entry.clone(),
                            id: entry.id.as_str().into(),
                            allowance: LocalAllowance::default(),
                        })
                    });
                    (*key, token)
                })
                .collect()
        });
        let token = local.get(&tokens::lookup_key(presented)).filter(|t| t.entry.matches(presented));
        token.map(|t| Caller::Bearer(t.clone())).ok_or(ApiError::Unauthorized)
    }

    /// Whether `ip` is a proxy whose `X-Forwarded-Client-Cert` may be believed.
    pub fn trusts_proxy(&self, ip: std::net::IpAddr) -> bool {
        self.config.trusted_proxies.iter().any(|net| net.contains(ip))
    }

    /// `/metrics` needs `TENSOR_WASM_API_METRICS_TOKEN` when it is set.
    pub fn authorize_metrics(&self, head: &RequestHead) -> Result<(), ApiError> {
        let presented = bearer(head)?;
        match &self.config.metrics_token {
            None => Ok(()),
            Some(expected) => match presented {
                Some(presented) if tokens::constant_time_eq(expected.as_bytes(), presented) => Ok(()),
                _ => Err(ApiError::Unauthorized),
            },
        }
    }

    /// The tenant a request acts for, checked against the caller's scope.
    pub fn tenant(&self, head: &RequestHead, caller: &Caller) -> Result<u64, ApiError> {
        let mut values = head.headers().filter(|(n, _)| n.eq_ignore_ascii_case(TENANT_HEADER)).map(|(_, v)| v);
        let tenant = match (values.next(), values.next()) {
            (Some(_), Some(_)) => return Err(ApiError::DuplicateTenantHeader),
            (None, _) if self.config.require_tenant => return Err(ApiError::MissingTenant),
            (None, _) => 0,
            (Some(v), None) => std::str::from_utf8(v)
                .ok()
                .map(str::trim)
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or(ApiError::InvalidTenant)?,
        };
        if !caller.may_act_for(tenant) {
            return Err(ApiError::TenantScopeDenied { tenant });
        }
        Ok(tenant)
    }
}

/// The token of an `Authorization: Bearer <token>` header (the scheme is case-insensitive).
///
/// Two `authorization` headers are refused (400 `duplicate_authorization_header`), as two tenant
/// headers are, whatever they hold and even in dev mode: which one counts would be a choice, and
/// a proxy in front of us that checks the other one could be made to vouch for a request we
/// authenticate as someone else.
fn bearer(head: &RequestHead) -> Result<Option<&[u8]>, ApiError> {
    let mut values = head.header_values("authorization");
    match (values.next(), values.next()) {
        (Some(_), Some(_)) => Err(ApiError::DuplicateAuthorizationHeader),
        (value, _) => Ok(value.and_then(bearer_token)),
    }
}

fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let (scheme, token) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = token.trim_ascii();
    (!token.is_empty()).then_some(token)
}
