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
    /// For pipeline requests: the pipeline's id (32 hex digits).
    pub pipeline_id: Option<String>,
    pub tenant_id: Option<u64>,
    pub status_code: u16,
    pub error_kind: Option<&'static str>,
    /// For a failed pipeline invocation: the failing step's index and function id.
    pub failed_step: Option<(usize, String)>,
    pub latency_us: u64,
    pub peer_addr: SocketAddr,
    pub client_cert_subject: Option<String>,
}

/// A JSON string literal, escaped straight into `out` (no allocation: this runs per record).
fn json_str(out: &mut String, s: &str) {
    out.push('"');
    if !s.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
        out.push_str(s);
        out.push('"');
        return;
    }
    let mut plain = 0;
    for (i, c) in s.char_indices() {
        let escape = match c {
            '"' => "\\\"",
            '\\' => "\\\\",
            '\n' => "\\n",
            '\r' => "\\r",
            '\t' => "\\t",
            c if (c as u32) < 0x20 => "",
            _ => continue,
        };
        out.push_str(&s[plain..i]);
        if escape.is_empty() {
            let _ = write!(out, "\\u{:04x}", c as u32);
        } else {
            out.push_str(escape);
        }
        plain = i + c.len_utf8();
    }
    out.push_str(&s[plain..]);
    out.push('"');
}

/// Lowercase hex of a 32-byte hash, straight into `out`.
fn hex_into(out: &mut String, bytes: &[u8; 32]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = [0u8; 64];
    for (i, b) in bytes.iter().enumerate() {
        text[2 * i] = DIGITS[(b >> 4) as usize];
        text[2 * i + 1] = DIGITS[(b & 15) as usize];
    }
    out.push_str(std::str::from_utf8(&text).unwrap_or_default());
}

fn opt_str(out: &mut String, s: Option<&str>) {
    match s {
        Some(s) => json_str(out, s),
        None => out.push_str("null"),
    }
}

fn num(out: &mut String, n: u64) {
    out.push_str(itoa::Buffer::new().format(n));
}

fn addr(out: &mut String, a: &SocketAddr) {
    match a {
        SocketAddr::V4(v4) => {
            let [a, b, c, d] = v4.ip().octets();
            for (i, octet) in [a, b, c, d].into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                num(out, u64::from(octet));
            }
            out.push(':');
            num(out, u64::from(v4.port()));
        }
        SocketAddr::V6(_) => {
            let _ = write!(out, "{a}");
        }
    }
}

/// Renders `event` as a complete line (with its trailing newline) into `out`; returns its hash.
pub fn encode(event: &AuditEvent, shard: usize, seq: u64, prev_hash: &[u8; 32], out: &mut String) -> [u8; 32] {
    out.clear();
    out.push_str("{\"ts_unix_ms\":");
    num(out, event.ts_unix_ms);
    out.push_str(",\"request_id\":");
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
                        if i > 0 {
                            out.push(',');
                        }
                        num(out, *t);
                    }
                    out.push_str("],\"tenants_truncated\":");
                    out.push_str(if tenants.len() > MAX_TENANTS { "true}}" } else { "false}}" });
                }
            }
        }
    }
    out.push_str(",\"action\":");
    json_str(out, event.action);
    out.push_str(",\"resource\":{\"function_id\":");
    opt_str(out, event.function_id.as_deref());
    // Only on pipeline requests, so that function records keep their shape.
    if let Some(pipeline) = &event.pipeline_id {
        out.push_str(",\"pipeline_id\":");
        json_str(out, pipeline);
    }
    out.push_str(",\"tenant_id\":");
    match event.tenant_id {
        Some(t) => num(out, t),
        None => out.push_str("null"),
    }
    out.push_str("},\"outcome\":{\"status_code\":");
    num(out, u64::from(event.status_code));
    out.push_str(",\"error_kind\":");
    opt_str(out, event.error_kind);
    if let Some((index, function)) = &event.failed_step {
        out.push_str(",\"failed_step\":{\"index\":");
        num(out, *index as u64);
        out.push_str(",\"function_id\":");
        json_str(out, function);
        out.push('}');
    }
    out.push_str("},\"latency_us\":");
    num(out, event.latency_us);
    out.push_str(",\"peer_addr\":\"");
    addr(out, &event.peer_addr);
    out.push_str("\",\"client_cert_subject\":");
    let subject = event.client_cert_subject.as_deref().map(|s| truncate(s, MAX_SUBJECT));
    opt_str(out, subject);
    out.push_str(",\"shard\":");
    num(out, shard as u64);
    out.push_str(",\"seq\":");
    num(out, seq);
    out.push_str(",\"prev_hash\":\"");
    hex_into(out, prev_hash);
    out.push('"');
    let hash: [u8; 32] = Sha256::digest(out.as_bytes()).into();
    out.push_str(",\"hash\":\"");
    hex_into(out, &hash);
    out.push_str("\"}\n");
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

/// 64 lowercase hex digits, as `encode` writes them. Uppercase is refused: a record whose bytes
/// changed is a changed record, even where the change would decode to the same hash.
fn parse_hex32(text: &[u8]) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.iter().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b)) {
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
            pipeline_id: None,
            tenant_id: Some(7),
            status_code: 200,
            error_kind: None,
            failed_step: None,
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

        assert!(v["resource"].get("pipeline_id").is_none() && v["outcome"].get("failed_step").is_none());
        let mut failed = event();
        failed.pipeline_id = Some("fedcba9876543210fedcba9876543210".into());
        failed.failed_step = Some((2, "0123456789abcdef0123456789abcdef".into()));
        let mut line = String::new();
        encode(&failed, 3, 1, &GENESIS, &mut line);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["resource"]["pipeline_id"], "fedcba9876543210fedcba9876543210");
        assert_eq!(
            v["outcome"]["failed_step"],
            serde_json::json!({"index": 2, "function_id": "0123456789abcdef0123456789abcdef"})
        );

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
    fn strings_are_escaped_as_serde_would() {
        for s in ["plain", "a\"b\\c", "line\nbreak\t\r", "\u{1}\u{1f}", "é✓ \u{7f}"] {
            let mut out = String::new();
            json_str(&mut out, s);
            assert_eq!(serde_json::from_str::<String>(&out).unwrap(), s, "{out}");
        }
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
