use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// How a function talks to its caller.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Abi {
    /// A WASI command: the request body is stdin, stdout is the response body.
    #[default]
    Command,
    /// Fiso's JSON envelope (`wasm::envelope`): `{payload, headers, direction}` in,
    /// `{payload, headers}` out.
    Envelope,
}

impl Abi {
    pub fn as_str(self) -> &'static str {
        match self {
            Abi::Command => "command",
            Abi::Envelope => "envelope",
        }
    }
}

/// Who manages a function or pipeline, and so who may change it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Created through the API and kept in the data dir.
    #[default]
    Api,
    /// Loaded from `--functions-dir`; only the directory changes it, and the API answers 409.
    Directory,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Api => "api",
            Source::Directory => "directory",
        }
    }
}

/// A deployed function's metadata. Stored as `functions/<id>.json` when it came from the API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionRecord {
    pub id: String,
    pub name: String,
    /// `sha256:<hex>` of the module bytes; also the module's file name in the store.
    pub digest: String,
    pub created_unix_ms: u64,
    pub timeout_ms: u64,
    pub memory_limit_mb: u32,
    #[serde(default)]
    pub tenant_id: u64,
    #[serde(default)]
    pub abi: Abi,
    #[serde(default)]
    pub source: Source,
    /// The guest's environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// `sha256:<hex>` of the safetensors file of its resident tensors, if it carries any; also
    /// the file's name in the store. Absent in records written before tensors existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tensors: Option<String>,
}

impl FunctionRecord {
    /// The API's view of the function. Environment values are not shown: they may be secrets.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "name": self.name,
            "digest": self.digest,
            "created_unix_ms": self.created_unix_ms,
            "timeout_ms": self.timeout_ms,
            "memory_limit_mb": self.memory_limit_mb,
            "abi": self.abi.as_str(),
            "source": self.source.as_str(),
            "env_keys": self.env.keys().collect::<Vec<_>>(),
            "tensors_digest": self.tensors,
        })
    }
}

/// Most environment variables a function may set, and their total size in bytes. Like
/// `MAX_NAME_LEN`, a rule of a function's record, the same on every server (a record stored by one
/// must load in another), so not a `config` limit.
pub const MAX_ENV_VARS: usize = 64;
pub const MAX_ENV_BYTES: usize = 16 * 1024;

/// Keys are non-empty and hold no `=` or NUL; values hold no NUL: what a WASI environment can carry.
pub fn validate_env(env: &BTreeMap<String, String>) -> Result<(), String> {
    if env.len() > MAX_ENV_VARS {
        return Err(format!("`env` may hold at most {MAX_ENV_VARS} variables, got {}", env.len()));
    }
    let bytes: usize = env.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
    if bytes > MAX_ENV_BYTES {
        return Err(format!("`env` may hold at most {MAX_ENV_BYTES} bytes, got {bytes}"));
    }
    for (k, v) in env {
        if k.is_empty() || k.contains(['=', '\0']) {
            return Err(format!("environment variable name {k:?} must be non-empty and hold no `=` or NUL"));
        }
        if v.contains('\0') {
            return Err(format!("environment variable {k} holds a NUL byte"));
        }
    }
    Ok(())
}

/// The id of a function or pipeline loaded from the functions directory: derived from its kind and
/// name only, so that it is the same across restarts and on every replica mounting the same folder.
pub fn directory_id(kind: &str, name: &str) -> String {
    let digest = Sha256::new().chain_update(b"tensor-wasm functions-dir\0").chain_update(kind).chain_update(b"\0");
    hex(&digest.chain_update(name).finalize()[..16])
}

/// How a pipeline step's reference picks among a tenant's functions of one name: the directory's
/// first (its names are unique), then the newest.
pub fn name_rank(r: &FunctionRecord) -> (bool, u64) {
    (r.source == Source::Directory, r.created_unix_ms)
}

/// The function of `tenant` that `reference` (an id, or a name) means.
pub fn resolve<'a>(
    records: impl Iterator<Item = &'a FunctionRecord>,
    tenant: u64,
    reference: &str,
) -> Option<&'a FunctionRecord> {
    let by_id = is_valid_id(reference);
    records
        .filter(|r| r.tenant_id == tenant && if by_id { r.id == reference } else { r.name == reference })
        .max_by_key(|r| name_rank(r))
}

/// Longest function name accepted.
pub const MAX_NAME_LEN: usize = 128;

/// Names are 1 to 128 characters of `A-Z a-z 0-9 . _ -`, not starting with a dot: safe in paths,
/// URLs, logs and metric labels.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!("`name` must be 1 to {MAX_NAME_LEN} characters long"));
    }
    if name.starts_with('.') {
        return Err("`name` must not start with a dot".into());
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(format!("`name` may contain only letters, digits, `.`, `_` and `-`; found {c:?}"));
    }
    Ok(())
}

/// Ids are 32 lowercase hex digits (128 random bits).
pub fn is_valid_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

pub fn new_id() -> String {
    let mut bytes = [0u8; 16];
    // The OS RNG failing is not recoverable in any useful way; ids must never collide.
    getrandom::fill(&mut bytes).expect("the OS random source is available");
    hex(&bytes)
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("hello-world_1.v2").is_ok());
        for bad in ["", ".hidden", "a/b", "a b", "é", &"x".repeat(129), "..", "a\0"] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn directory_ids_are_stable_and_distinct() {
        let id = directory_id("function", "enrich");
        assert!(is_valid_id(&id));
        assert_eq!(id, directory_id("function", "enrich"));
        assert_ne!(id, directory_id("pipeline", "enrich"));
        assert_ne!(id, directory_id("function", "enrich2"));
    }

    #[test]
    fn env_rules() {
        let env = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
        assert!(validate_env(&env("MODE", "fast")).is_ok());
        assert!(validate_env(&env("", "x")).is_err());
        assert!(validate_env(&env("A=B", "x")).is_err());
        assert!(validate_env(&env("A", "x\0")).is_err());
    }

    #[test]
    fn ids() {
        let id = new_id();
        assert!(is_valid_id(&id));
        assert_ne!(id, new_id());
        assert!(!is_valid_id("../../etc/passwd"));
        assert!(!is_valid_id(&id.to_uppercase()));
    }
}
