use serde::{Deserialize, Serialize};

/// A deployed function's metadata. Stored as `functions/<id>.json`.
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
}

impl FunctionRecord {
    /// The API's view of the function.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "name": self.name,
            "digest": self.digest,
            "created_unix_ms": self.created_unix_ms,
            "timeout_ms": self.timeout_ms,
            "memory_limit_mb": self.memory_limit_mb,
        })
    }
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
    fn ids() {
        let id = new_id();
        assert!(is_valid_id(&id));
        assert_ne!(id, new_id());
        assert!(!is_valid_id("../../etc/passwd"));
        assert!(!is_valid_id(&id.to_uppercase()));
    }
}
