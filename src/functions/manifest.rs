//! `NAME.toml`, the optional manifest beside `NAME.wasm` in the functions directory:
//!
//! ```toml
//! tenant = 7                 # default 0
//! abi = "envelope"           # or "command" (the default)
//! timeout_ms = 2000          # or timeout = "2s"; default --default-timeout-ms
//! memory_limit_mb = 64       # default --default-memory-limit-mb
//! [env]
//! MODE = "strict"
//! ```

use std::collections::BTreeMap;

use serde::Deserialize;

use super::record::Abi;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionManifest {
    pub tenant: Option<u64>,
    pub abi: Option<Abi>,
    pub timeout_ms: Option<u64>,
    pub timeout: Option<String>,
    pub memory_limit_mb: Option<u64>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

impl FunctionManifest {
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// The timeout in milliseconds, from either spelling.
    pub fn timeout_ms(&self) -> Result<Option<u64>, String> {
        either_timeout(self.timeout_ms, self.timeout.as_deref())
    }
}

/// A timeout given as `timeout_ms` or as a `timeout` duration string, not both.
pub fn either_timeout(ms: Option<u64>, text: Option<&str>) -> Result<Option<u64>, String> {
    match (ms, text) {
        (Some(_), Some(_)) => Err("set `timeout_ms` or `timeout`, not both".into()),
        (Some(ms), None) => Ok(Some(ms)),
        (None, Some(text)) => duration_ms(text).map(Some).map_err(|e| format!("`timeout`: {e}")),
        (None, None) => Ok(None),
    }
}

/// `"250ms"`, `"5s"`, `"2m"` in milliseconds: the spelling of Fiso's flow files.
pub fn duration_ms(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits.parse().map_err(|_| format!("{text:?} is not a duration such as \"500ms\" or \"5s\""))?;
    let scale = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        _ => return Err(format!("{text:?} has no unit of ms, s or m")),
    };
    n.checked_mul(scale).ok_or_else(|| format!("{text:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(duration_ms("250ms"), Ok(250));
        assert_eq!(duration_ms(" 5s "), Ok(5_000));
        assert_eq!(duration_ms("2m"), Ok(120_000));
        for bad in ["", "5", "s", "1.5s", "-1s", "5h", "99999999999999999999m"] {
            assert!(duration_ms(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn manifests() {
        let m =
            FunctionManifest::parse("tenant = 7\nabi = \"envelope\"\ntimeout = \"2s\"\n[env]\nMODE = \"x\"\n").unwrap();
        assert_eq!((m.tenant, m.abi, m.timeout_ms()), (Some(7), Some(Abi::Envelope), Ok(Some(2_000))));
        assert_eq!(m.env["MODE"], "x");
        assert!(FunctionManifest::parse("abi = \"grpc\"").is_err());
        assert!(FunctionManifest::parse("timeot = 5").is_err());
        assert!(FunctionManifest::parse("timeout_ms = 1\ntimeout = \"1s\"").unwrap().timeout_ms().is_err());
    }
}
