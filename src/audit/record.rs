//! One audit record: a JSON line whose last field is the SHA-256 of everything before it.
//!
//! ```text
//! {"ts_unix_ms":…,"request_id":"…",…,"shard":0,"seq":42,"prev_hash":"<64 hex>","hash":"<64 hex>"}
//! ```
//!
//! `hash` covers the line's bytes up to (not including) `,"hash":`, so a torn or edited record is
//! detectable on its own line, and `prev_hash` (the previous record's `hash`) chains each shard's
//! records, so removing or reordering one breaks the chain. The line stays plain JSON.

use std::fmt::Write as _;
use std::net::SocketAddr;

use sha2::{Digest, Sha256};

use crate::functions::record::hex;

/// The `prev_hash` of a chain's first record.
pub const GENESIS: [u8; 32] = [0; 32];
/// No record is longer: fields a client controls are capped so that this always holds, and a
/// segment always keeps this much room before an action is taken.
pub const MAX_RECORD: usize = 8192;
const HASH_FIELD: &[u8] = b",\"hash\":\"";
const MAX_SUBJECT: usize = 512;
const MAX_TENANTS: usize = 32;

/// Who made the request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Actor {
    /// A bearer token; `None` when authentication failed.
    Bearer {
        token_id: Option<String>,
        scope: ActorScope,
    },
    Dev,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ActorScope {
    Wildcard,
    TenantSet(Vec<u64>),
    /// Unknown: authentication failed.
    None,
}

/// What happened, as the shard saw it.
#[derive(Clone, Debug)]
pub struct AuditEvent {
    pub ts_unix_ms: u64,
    pub request_id: String,
    pub actor: Actor,
    pub action: &'static str,
    pub function_id: Option<String>,
    pub tenant_id: Option<u64>,
    pub status_code: u16,
    pub error_kind: Option<&'static str>,
    pub latency_us: u64,
    pub peer_addr: SocketAddr,
    pub client_cert_subject: Option<String>,
}

fn json_str(out: &mut String, s: &str) {
    // serde_json's escaping, into our buffer.
    out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into()));
}

fn opt_str(out: &mut String, s: Option<&str>) {
    match s {
        Some(s) => json_str(out, s),
        None => out.push_str("null"),
    }
}

/// Renders `event` as a complete line (with its trailing newline) into `out`; returns its hash.
pub fn encode(event: &AuditEvent, shard: usize, seq: u64, prev_hash: &[u8; 32], out: &mut String) -> [u8; 32] {
    out.clear();
    let _ = write!(out, "{{\"ts_unix_ms\":{},\"request_id\":", event.ts_unix_ms);
    json_str(out, &event.request_id);
    out.push_str(",\"actor\":");
    match &event.actor {
        Actor::Dev => out.push_str(r#"{"kind":"dev","token_id":null,"scope":{"kind":"dev","tenants":null}}"#),
        Actor::Bearer { token_id, scope } => {
            out.push_str("{\"kind\":\"bearer\",\"token_id\":");
            opt_str(out, token_id.as_deref());
            match scope {
                ActorScope::Wildcard => out.push_str(r#","scope":{"kind":"wildcard","tenants":null}}"#),
                ActorScope::None => out.push_str(r#","scope":null}"#),
                ActorScope::TenantSet(tenants) => {
                    out.push_str(r#","scope":{"kind":"tenant_set","tenants":["#);
                    for (i, t) in tenants.iter().take(MAX_TENANTS).enumerate() {
                        let _ = write!(out, "{}{t}", if i > 0 { "," } else { "" });
                    }
                    let _ = write!(out, "],\"tenants_truncated\":{}}}}}", tenants.len() > MAX_TENANTS);
                }
            }
        }
    }
    out.push_str(",\"action\":");
    json_str(out, event.action);
    out.push_str(",\"resource\":{\"function_id\":");
    opt_str(out, event.function_id.as_deref());
    match event.tenant_id {
        Some(t) => {
            let _ = write!(out, ",\"tenant_id\":{t}}}");
        }
        None => out.push_str(",\"tenant_id\":null}"),
    }
    let _ = write!(out, ",\"outcome\":{{\"status_code\":{},\"error_kind\":", event.status_code);
    opt_str(out, event.error_kind);
    let _ = write!(
        out,
        "}},\"latency_us\":{},\"peer_addr\":\"{}\",\"client_cert_subject\":",
        event.latency_us, event.peer_addr
    );
    let subject = event.client_cert_subject.as_deref().map(|s| truncate(s, MAX_SUBJECT));
    opt_str(out, subject);
    let _ = write!(out, ",\"shard\":{shard},\"seq\":{seq},\"prev_hash\":\"{}\"", hex(prev_hash));
    let hash: [u8; 32] = Sha256::digest(out.as_bytes()).into();
    let _ = writeln!(out, ",\"hash\":\"{}\"}}", hex(&hash));
    debug_assert!(out.len() <= MAX_RECORD);
    hash
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// What a valid line says about its place in the chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LineFacts {
    pub shard: u64,
    pub seq: u64,
    pub prev_hash: [u8; 32],
    pub hash: [u8; 32],
}

/// Why a line is not a valid record.
#[derive(Debug, PartialEq, Eq)]
pub enum LineError {
    Torn,
    BadHash,
    Malformed(&'static str),
}

impl std::fmt::Display for LineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LineError::Torn => write!(f, "torn record (no end of line)"),
            LineError::BadHash => write!(f, "the record's hash does not match its contents"),
            LineError::Malformed(m) => write!(f, "malformed record: {m}"),
        }
    }
}

fn parse_hex32(text: &[u8]) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in text.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

/// Checks one line (without its newline) and returns its chain facts.
pub fn check_line(line: &[u8]) -> Result<LineFacts, LineError> {
    let at = line.windows(HASH_FIELD.len()).rposition(|w| w == HASH_FIELD).ok_or(LineError::Torn)?;
    let tail = &line[at + HASH_FIELD.len()..];
    if tail.len() != 66 || &tail[64..] != b"\"}" {
        return Err(LineError::Torn);
    }
    let hash = parse_hex32(&tail[..64]).ok_or(LineError::Malformed("hash is not hex"))?;
    let computed: [u8; 32] = Sha256::digest(&line[..at]).into();
    if computed != hash {
        return Err(LineError::BadHash);
    }
    let value: serde_json::Value = serde_json::from_slice(line).map_err(|_| LineError::Malformed("not JSON"))?;
    let field =
        |name| value.get(name).and_then(serde_json::Value::as_u64).ok_or(LineError::Malformed("missing shard or seq"));
    let prev = value.get("prev_hash").and_then(|v| v.as_str()).ok_or(LineError::Malformed("missing prev_hash"))?;
    Ok(LineFacts {
        shard: field("shard")?,
        seq: field("seq")?,
        prev_hash: parse_hex32(prev.as_bytes()).ok_or(LineError::Malformed("prev_hash is not hex"))?,
        hash,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn event() -> AuditEvent {
        AuditEvent {
            ts_unix_ms: 1_795_000_000_000,
            request_id: "r-1".into(),
            actor: Actor::Bearer {
                token_id: Some("0011223344556677".into()),
                scope: ActorScope::TenantSet(vec![7, 8]),
            },
            action: "invoke_function",
            function_id: Some("0123456789abcdef0123456789abcdef".into()),
            tenant_id: Some(7),
            status_code: 200,
            error_kind: None,
            latency_us: 12,
            peer_addr: "127.0.0.1:4000".parse().unwrap(),
            client_cert_subject: Some("CN=a \"quoted\" client".into()),
        }
    }

    #[test]
    fn lines_are_json_hashed_and_chained() {
        let mut line = String::new();
        let h1 = encode(&event(), 3, 1, &GENESIS, &mut line);
        assert!(line.ends_with("}\n"));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["actor"]["scope"]["tenants"], serde_json::json!([7, 8]));
        assert_eq!(v["resource"]["tenant_id"], 7);
        assert_eq!(v["client_cert_subject"], "CN=a \"quoted\" client");
        let facts = check_line(line.trim_end().as_bytes()).unwrap();
        assert_eq!((facts.shard, facts.seq, facts.prev_hash, facts.hash), (3, 1, GENESIS, h1));

        let mut second = String::new();
        encode(&event(), 3, 2, &h1, &mut second);
        assert_eq!(check_line(second.trim_end().as_bytes()).unwrap().prev_hash, h1);

        // Any flipped byte is caught; a cut line is torn.
        let mut bytes = line.trim_end().as_bytes().to_vec();
        bytes[20] ^= 1;
        assert_eq!(check_line(&bytes), Err(LineError::BadHash));
        assert_eq!(check_line(&line.as_bytes()[..line.len() / 2]), Err(LineError::Torn));
    }

    #[test]
    fn client_controlled_fields_are_capped() {
        let mut e = event();
        e.client_cert_subject = Some("é".repeat(5000));
        e.actor = Actor::Bearer { token_id: None, scope: ActorScope::TenantSet((0..10_000).collect()) };
        let mut line = String::new();
        encode(&e, 0, 1, &GENESIS, &mut line);
        assert!(line.len() <= MAX_RECORD, "{}", line.len());
        assert!(check_line(line.trim_end().as_bytes()).is_ok());
    }
}
