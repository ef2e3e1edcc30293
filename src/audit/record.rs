//! One audit record: a JSON line whose last field is the SHA-256 of everything before it.
//!
//! ```text
//! {"ts_unix_ms":…,"request_id":"…",…,"replica":"r-1","shard":0,"seq":42,"prev_hash":"<64 hex>","hash":"<64 hex>"}
//! ```
//!
//! `hash` covers the line's bytes up to (not including) `,"hash":`, so a torn or edited record is
//! detectable on its own line, and `prev_hash` (the previous record's `hash`) chains each shard's
//! records, so removing or reordering one breaks the chain. The line stays plain JSON.
//!
//! `replica` is the fleet replica that wrote the record (`--replica-id`), under the hash like every
//! other field; a server with no replica id writes no such field, so its records are the same
//! bytes they were before the field existed.

use std::net::SocketAddr;

use sha2::{Digest, Sha256};

/// The action of a record that reports damage found in the chain at start-up.
pub const INTEGRITY_ACTION: &str = "audit_integrity";
/// The `prev_hash` of a chain's first record.
pub const GENESIS: [u8; 32] = [0; 32];
/// No record is longer: fields a client controls are capped so that this always holds, and a
/// segment always keeps this much room before an action is taken. Part of the log's format, which
/// `audit verify` reads on any machine, so it and the caps below are not `config` limits.
pub const MAX_RECORD: usize = 8192;
const HASH_FIELD: &[u8] = b",\"hash\":\"";
const MAX_SUBJECT: usize = 512;
const MAX_TENANTS: usize = 32;
/// The longest replica id: a DNS label's length, as a Kubernetes pod's host name is cut to.
pub const MAX_REPLICA_ID: usize = 63;
const REPLICA_KEY: &[u8] = b",\"replica\":\"";
/// `,"replica":"<id>"` at its longest.
const REPLICA_FIELD_MAX: usize = REPLICA_KEY.len() + MAX_REPLICA_ID + 1;

/// A fleet replica's name (`--replica-id`): 1 to 63 characters of `A-Z a-z 0-9 . _ -`, the first a
/// letter or digit. It goes into records, checkpoints' origins and file names as it is: nothing in
/// it needs escaping, and it is never `.`, `..` or something that reads as a flag.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReplicaId(String);

impl ReplicaId {
    /// Checks `text`; the error says what is wrong with it, without the flag's name.
    pub fn parse(text: &str) -> Result<ReplicaId, String> {
        let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if text.is_empty() {
            return Err("is empty".into());
        }
        if let Some(bad) = text.chars().find(|c| !allowed(*c)) {
            return Err(format!("holds {bad:?}: only A-Z, a-z, 0-9, `.`, `_` and `-` may appear"));
        }
        if text.len() > MAX_REPLICA_ID {
            return Err(format!("is {} characters long; at most {MAX_REPLICA_ID} may be", text.len()));
        }
        if !text.starts_with(|c: char| c.is_ascii_alphanumeric()) {
            return Err("must begin with a letter or a digit".into());
        }
        Ok(ReplicaId(text.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The bytes `,"replica":"<id>"` every record of a chain carries, made once when its writer is
/// made, so that a record copies them rather than formatting them; none without a replica id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplicaField {
    bytes: [u8; REPLICA_FIELD_MAX],
    len: usize,
}

impl ReplicaField {
    /// No field: the records of a server with no replica id.
    pub const NONE: ReplicaField = ReplicaField { bytes: [0; REPLICA_FIELD_MAX], len: 0 };

    pub fn new(id: Option<&ReplicaId>) -> ReplicaField {
        let Some(id) = id else { return ReplicaField::NONE };
        let mut field = ReplicaField::NONE;
        for piece in [REPLICA_KEY, id.as_str().as_bytes(), b"\""] {
            field.bytes[field.len..field.len + piece.len()].copy_from_slice(piece);
            field.len += piece.len();
        }
        field
    }

    fn bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// Who made the request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Actor {
    /// A bearer token; `None` when authentication failed.
    Bearer {
        token_id: Option<String>,
        scope: ActorScope,
    },
    Dev,
    /// The server itself, for records no request caused (`audit_integrity`).
    System,
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
    /// For a coalesced refusal: how many more like it were left out of the log before this record
    /// (`auth::refusals`). Written only when non-zero.
    pub repeated: u64,
    /// For an `audit_integrity` record: the damage found. Written only then.
    pub integrity: Option<Integrity>,
}

/// Damage found in the chain at start-up (`audit::recover`): where its first broken record is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Integrity {
    /// The segment, relative to the audit directory: `shard-N/<first seq>.jsonl`.
    pub file: String,
    /// Byte offset of the first broken record in it.
    pub offset: u64,
    /// The `seq` that record should have had.
    pub seq: u64,
    pub reason: String,
}

impl AuditEvent {
    /// Now, as a record's `ts_unix_ms` says it.
    pub fn now_unix_ms() -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
    }
}

/// A record being written into a buffer of `MAX_RECORD` bytes or more: the active segment's
/// mapping itself, so a record is formatted and hashed in place and never copied. A push past the
/// end is dropped and remembered, so a broken size invariant loses the record, not the process.
struct LineOut<'a> {
    buf: &'a mut [u8],
    len: usize,
    overflow: bool,
}

impl LineOut<'_> {
    #[inline]
    fn push(&mut self, bytes: &[u8]) {
        match self.buf.get_mut(self.len..self.len + bytes.len()) {
            Some(to) => {
                to.copy_from_slice(bytes);
                self.len += bytes.len();
            }
            None => self.overflow = true,
        }
    }

    #[inline]
    fn text(&mut self, s: &str) {
        self.push(s.as_bytes());
    }

    fn num(&mut self, n: u64) {
        self.text(itoa::Buffer::new().format(n));
    }

    /// A string known to need no escaping: the names this program gives its actions and errors.
    fn known_str(&mut self, s: &'static str) {
        debug_assert!(!needs_escape(s));
        self.push(b"\"");
        self.text(s);
        self.push(b"\"");
    }

    /// A JSON string literal, escaped as serde_json would.
    fn json_str(&mut self, s: &str) {
        self.push(b"\"");
        if !needs_escape(s) {
            self.text(s);
            self.push(b"\"");
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
            self.text(&s[plain..i]);
            if escape.is_empty() {
                const DIGITS: &[u8; 16] = b"0123456789abcdef";
                let code = c as usize;
                self.push(&[b'\\', b'u', b'0', b'0', DIGITS[code >> 4], DIGITS[code & 15]]);
            } else {
                self.text(escape);
            }
            plain = i + c.len_utf8();
        }
        self.text(&s[plain..]);
        self.push(b"\"");
    }

    fn opt_str(&mut self, s: Option<&str>) {
        match s {
            Some(s) => self.json_str(s),
            None => self.push(b"null"),
        }
    }

    /// Lowercase hex of a 32-byte hash.
    fn hex(&mut self, bytes: &[u8; 32]) {
        let mut text = [0u8; 64];
        for (pair, b) in text.chunks_exact_mut(2).zip(bytes) {
            pair.copy_from_slice(&HEX_PAIRS[usize::from(*b)]);
        }
        self.push(&text);
    }

    fn addr(&mut self, a: &SocketAddr) {
        match a {
            SocketAddr::V4(v4) => {
                for (i, octet) in v4.ip().octets().into_iter().enumerate() {
                    if i > 0 {
                        self.push(b".");
                    }
                    self.num(u64::from(octet));
                }
                self.push(b":");
                self.num(u64::from(v4.port()));
            }
            SocketAddr::V6(_) => self.text(&a.to_string()),
        }
    }
}

/// The two lowercase hex digits of every byte: one lookup per byte of a hash.
const HEX_PAIRS: [[u8; 2]; 256] = {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut pairs = [[0; 2]; 256];
    let mut b = 0;
    while b < 256 {
        pairs[b] = [DIGITS[b >> 4], DIGITS[b & 15]];
        b += 1;
    }
    pairs
};

/// Whether `s` holds a byte JSON must escape. Without an early exit, so that the compiler can
/// compare 16 or 32 bytes at a time: the strings are short, and almost never need escaping.
fn needs_escape(s: &str) -> bool {
    s.bytes().fold(false, |found, b| found | (b < 0x20) | (b == b'"') | (b == b'\\'))
}

/// Renders `event` as a complete line (with its trailing newline) at the start of `out`, which
/// should hold `MAX_RECORD` bytes. Returns the line's length and its hash, or `None` when it did
/// not fit (what was written is then garbage past the caller's valid end).
pub fn encode_into(
    event: &AuditEvent,
    replica: &ReplicaField,
    shard: usize,
    seq: u64,
    prev_hash: &[u8; 32],
    out: &mut [u8],
) -> Option<(usize, [u8; 32])> {
    let mut out = LineOut { buf: out, len: 0, overflow: false };
    out.push(b"{\"ts_unix_ms\":");
    out.num(event.ts_unix_ms);
    out.push(b",\"request_id\":");
    out.json_str(&event.request_id);
    out.push(b",\"actor\":");
    match &event.actor {
        Actor::Dev => out.push(br#"{"kind":"dev","token_id":null,"scope":{"kind":"dev","tenants":null}}"#),
        Actor::System => out.push(br#"{"kind":"system","token_id":null,"scope":null}"#),
        Actor::Bearer { token_id, scope } => {
            out.push(b"{\"kind\":\"bearer\",\"token_id\":");
            out.opt_str(token_id.as_deref());
            match scope {
                ActorScope::Wildcard => out.push(br#","scope":{"kind":"wildcard","tenants":null}}"#),
                ActorScope::None => out.push(br#","scope":null}"#),
                ActorScope::TenantSet(tenants) => {
                    out.push(br#","scope":{"kind":"tenant_set","tenants":["#);
                    for (i, t) in tenants.iter().take(MAX_TENANTS).enumerate() {
                        if i > 0 {
                            out.push(b",");
                        }
                        out.num(*t);
                    }
                    // Only when true: the field would otherwise cost every record a hash block.
                    out.push(if tenants.len() > MAX_TENANTS { b"],\"tenants_truncated\":true}}" } else { b"]}}" });
                }
            }
        }
    }
    out.push(b",\"action\":");
    out.known_str(event.action);
    out.push(b",\"resource\":{\"function_id\":");
    out.opt_str(event.function_id.as_deref());
    // Only on pipeline requests, so that function records keep their shape.
    if let Some(pipeline) = &event.pipeline_id {
        out.push(b",\"pipeline_id\":");
        out.json_str(pipeline);
    }
    out.push(b",\"tenant_id\":");
    match event.tenant_id {
        Some(t) => out.num(t),
        None => out.push(b"null"),
    }
    out.push(b"},\"outcome\":{\"status_code\":");
    out.num(u64::from(event.status_code));
    out.push(b",\"error_kind\":");
    match event.error_kind {
        Some(kind) => out.known_str(kind),
        None => out.push(b"null"),
    }
    if event.repeated > 0 {
        out.push(b",\"repeated\":");
        out.num(event.repeated);
    }
    if let Some((index, function)) = &event.failed_step {
        out.push(b",\"failed_step\":{\"index\":");
        out.num(*index as u64);
        out.push(b",\"function_id\":");
        out.json_str(function);
        out.push(b"}");
    }
    out.push(b"}");
    // Only on `audit_integrity` records, so that every other record keeps its shape.
    if let Some(found) = &event.integrity {
        out.push(b",\"integrity\":{\"file\":");
        out.json_str(&found.file);
        out.push(b",\"offset\":");
        out.num(found.offset);
        out.push(b",\"seq\":");
        out.num(found.seq);
        out.push(b",\"reason\":");
        out.json_str(truncate(&found.reason, MAX_SUBJECT));
        out.push(b"}");
    }
    out.push(b",\"latency_us\":");
    out.num(event.latency_us);
    out.push(b",\"peer_addr\":\"");
    out.addr(&event.peer_addr);
    out.push(b"\",\"client_cert_subject\":");
    let subject = event.client_cert_subject.as_deref().map(|s| truncate(s, MAX_SUBJECT));
    out.opt_str(subject);
    // Empty without a replica id: the record is then byte for byte what it was before the field.
    out.push(replica.bytes());
    out.push(b",\"shard\":");
    out.num(shard as u64);
    out.push(b",\"seq\":");
    out.num(seq);
    out.push(b",\"prev_hash\":\"");
    out.hex(prev_hash);
    out.push(b"\"");
    let hashed = out.len.min(out.buf.len());
    let hash: [u8; 32] = Sha256::digest(&out.buf[..hashed]).into();
    out.push(HASH_FIELD);
    out.hex(&hash);
    out.push(b"\"}\n");
    debug_assert!(out.overflow || out.len <= MAX_RECORD);
    (!out.overflow).then_some((out.len, hash))
}

/// [`encode_into`] for callers that want the line on its own: tests, tools.
///
/// Its `expect`s stay, rather than a `bug!`: nothing on the request path calls it (the writer
/// calls `encode_into` and counts a record past `MAX_RECORD` as an audit error), and its callers
/// want the hash, not an error to handle.
pub fn encode(
    event: &AuditEvent,
    replica: &ReplicaField,
    shard: usize,
    seq: u64,
    prev_hash: &[u8; 32],
    out: &mut String,
) -> [u8; 32] {
    let mut buf = vec![0; MAX_RECORD];
    let (len, hash) =
        encode_into(event, replica, shard, seq, prev_hash, &mut buf).expect("every record fits MAX_RECORD");
    buf.truncate(len);
    *out = String::from_utf8(buf).expect("records are UTF-8: every piece is a &str or ASCII");
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
    /// The replica that wrote it; `None` when the record names none (a server with no replica id).
    pub replica: Option<ReplicaId>,
    pub shard: u64,
    pub seq: u64,
    pub prev_hash: [u8; 32],
    pub hash: [u8; 32],
    /// For an `audit_integrity` record: the file (as the record names it) and offset of the
    /// damage it reports.
    pub integrity: Option<(String, u64)>,
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
    let integrity = match value.get("action").and_then(|v| v.as_str()) {
        Some(INTEGRITY_ACTION) => {
            let found = value.get("integrity").ok_or(LineError::Malformed("audit_integrity without integrity"))?;
            let file = found.get("file").and_then(|v| v.as_str()).ok_or(LineError::Malformed("integrity.file"))?;
            let offset =
                found.get("offset").and_then(|v| v.as_u64()).ok_or(LineError::Malformed("integrity.offset"))?;
            Some((file.to_string(), offset))
        }
        _ => None,
    };
    let replica = match value.get("replica") {
        None => None,
        Some(named) => Some(
            named
                .as_str()
                .and_then(|r| ReplicaId::parse(r).ok())
                .ok_or(LineError::Malformed("replica is not a replica id"))?,
        ),
    };
    Ok(LineFacts {
        replica,
        shard: field("shard")?,
        seq: field("seq")?,
        prev_hash: parse_hex32(prev.as_bytes()).ok_or(LineError::Malformed("prev_hash is not hex"))?,
        hash,
        integrity,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A request's event with every field the encoder writes: shared by the audit tests.
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
            repeated: 0,
            integrity: None,
        }
    }

    #[test]
    fn integrity_records_name_the_damage() {
        let mut e = event();
        e.action = INTEGRITY_ACTION;
        e.actor = Actor::System;
        e.integrity = Some(Integrity {
            file: "shard-0/00000000000000000001.jsonl".into(),
            offset: 1234,
            seq: 5,
            reason: "the record's hash does not match its contents".into(),
        });
        let mut line = String::new();
        encode(&e, &ReplicaField::NONE, 0, 9, &GENESIS, &mut line);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["actor"], serde_json::json!({"kind": "system", "token_id": null, "scope": null}));
        assert_eq!(v["integrity"]["offset"], 1234);
        assert_eq!(v["integrity"]["seq"], 5);
        let facts = check_line(line.trim_end().as_bytes()).unwrap();
        assert_eq!(facts.integrity, Some(("shard-0/00000000000000000001.jsonl".into(), 1234)));
        // Other records do not carry the field.
        encode(&event(), &ReplicaField::NONE, 0, 1, &GENESIS, &mut line);
        assert!(!line.contains("integrity"), "{line}");
    }

    #[test]
    fn lines_are_json_hashed_and_chained() {
        let mut line = String::new();
        let h1 = encode(&event(), &ReplicaField::NONE, 3, 1, &GENESIS, &mut line);
        assert!(line.ends_with("}\n"));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["actor"]["scope"]["tenants"], serde_json::json!([7, 8]));
        assert_eq!(v["resource"]["tenant_id"], 7);
        assert_eq!(v["client_cert_subject"], "CN=a \"quoted\" client");
        let facts = check_line(line.trim_end().as_bytes()).unwrap();
        assert_eq!((facts.shard, facts.seq, facts.prev_hash, facts.hash, facts.integrity), (3, 1, GENESIS, h1, None));

        assert!(v["resource"].get("pipeline_id").is_none() && v["outcome"].get("failed_step").is_none());
        let mut failed = event();
        failed.pipeline_id = Some("fedcba9876543210fedcba9876543210".into());
        failed.failed_step = Some((2, "0123456789abcdef0123456789abcdef".into()));
        let mut line = String::new();
        encode(&failed, &ReplicaField::NONE, 3, 1, &GENESIS, &mut line);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["resource"]["pipeline_id"], "fedcba9876543210fedcba9876543210");
        assert_eq!(
            v["outcome"]["failed_step"],
            serde_json::json!({"index": 2, "function_id": "0123456789abcdef0123456789abcdef"})
        );

        let mut second = String::new();
        encode(&event(), &ReplicaField::NONE, 3, 2, &h1, &mut second);
        assert_eq!(check_line(second.trim_end().as_bytes()).unwrap().prev_hash, h1);

        // Any flipped byte is caught; a cut line is torn.
        let mut bytes = line.trim_end().as_bytes().to_vec();
        bytes[20] ^= 1;
        assert_eq!(check_line(&bytes), Err(LineError::BadHash));
        assert_eq!(check_line(&line.as_bytes()[..line.len() / 2]), Err(LineError::Torn));
    }

    /// The line `encode` writes for `event()` on shard 3 at seq 1, spelt out field by field, with
    /// `replica` (the whole `,"replica":…` field, or nothing) where it goes.
    fn spelt_out(replica: &str) -> String {
        let hashed = format!(
            "{{\"ts_unix_ms\":1795000000000,\"request_id\":\"r-1\",\"actor\":{{\"kind\":\"bearer\",\
             \"token_id\":\"0011223344556677\",\"scope\":{{\"kind\":\"tenant_set\",\"tenants\":[7,8]}}}},\
             \"action\":\"invoke_function\",\"resource\":{{\"function_id\":\"0123456789abcdef0123456789abcdef\",\
             \"tenant_id\":7}},\"outcome\":{{\"status_code\":200,\"error_kind\":null}},\"latency_us\":12,\
             \"peer_addr\":\"127.0.0.1:4000\",\"client_cert_subject\":\"CN=a \\\"quoted\\\" client\"{replica},\
             \"shard\":3,\"seq\":1,\"prev_hash\":\"{}\"",
            "0".repeat(64)
        );
        let hash: String = Sha256::digest(hashed.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
        format!("{hashed},\"hash\":\"{hash}\"}}\n")
    }

    #[test]
    fn without_a_replica_id_a_record_is_what_it_was_and_with_one_it_names_the_replica() {
        let mut line = String::new();
        encode(&event(), &ReplicaField::NONE, 3, 1, &GENESIS, &mut line);
        assert_eq!(line, spelt_out(""), "a single node's records are unchanged, byte for byte");
        assert_eq!(check_line(line.trim_end().as_bytes()).unwrap().replica, None);

        let r1 = ReplicaId::parse("r-1").unwrap();
        encode(&event(), &ReplicaField::new(Some(&r1)), 3, 1, &GENESIS, &mut line);
        assert_eq!(line, spelt_out(",\"replica\":\"r-1\""), "before shard, seq and the hashes");
        assert_eq!(check_line(line.trim_end().as_bytes()).unwrap().replica, Some(r1));
        assert_eq!(ReplicaField::new(None), ReplicaField::NONE);

        // The hash covers it: another replica's name in this record is an edit.
        let edited = line.replacen("\"replica\":\"r-1\"", "\"replica\":\"r-2\"", 1);
        assert_ne!(edited, line);
        assert_eq!(check_line(edited.trim_end().as_bytes()), Err(LineError::BadHash));
        // A replica field that is no replica id is refused even when its hash matches.
        for bad in ["\"a b\"", "\"\"", "7", "null"] {
            let mut forged = line.replacen("\"replica\":\"r-1\"", &format!("\"replica\":{bad}"), 1);
            let at = forged.find(",\"hash\":\"").unwrap();
            let hash: String = Sha256::digest(&forged.as_bytes()[..at]).iter().map(|b| format!("{b:02x}")).collect();
            forged.replace_range(at + 9..at + 9 + 64, &hash);
            assert_eq!(
                check_line(forged.trim_end().as_bytes()),
                Err(LineError::Malformed("replica is not a replica id")),
                "{forged}"
            );
        }
    }

    #[test]
    fn replica_ids_are_short_plain_names() {
        for good in ["r-1", "a", "tensor-wasm-7c9f5d-x2kq", "pod.ns_1", "0", &"a".repeat(63)] {
            assert_eq!(ReplicaId::parse(good).map(|r| r.to_string()), Ok(good.to_string()));
        }
        for (bad, says) in [
            ("", "is empty"),
            (&"a".repeat(64), "is 64 characters long"),
            ("a\"b", "holds '\"'"),
            ("a/b", "holds '/'"),
            ("a\nb", "holds '\\n'"),
            ("a b", "holds ' '"),
            ("a\\b", "holds '\\\\'"),
            ("é", "holds 'é'"),
            ("-a", "must begin with a letter or a digit"),
            (".", "must begin"),
            ("..", "must begin"),
        ] {
            let err = ReplicaId::parse(bad).unwrap_err();
            assert!(err.contains(says), "{bad:?}: {err}");
        }
    }

    #[test]
    fn strings_are_escaped_as_serde_would() {
        for s in ["plain", "a\"b\\c", "line\nbreak\t\r", "\u{1}\u{1f}", "é✓ \u{7f}"] {
            let mut buf = [0u8; 64];
            let mut out = LineOut { buf: &mut buf, len: 0, overflow: false };
            out.json_str(s);
            let len = out.len;
            let written = std::str::from_utf8(&buf[..len]).unwrap();
            assert_eq!(serde_json::from_str::<String>(written).unwrap(), s, "{written}");
        }
    }

    #[test]
    fn client_controlled_fields_are_capped() {
        let mut e = event();
        e.client_cert_subject = Some("é".repeat(5000));
        e.actor = Actor::Bearer { token_id: None, scope: ActorScope::TenantSet((0..10_000).collect()) };
        let mut line = String::new();
        encode(&e, &ReplicaField::NONE, 0, 1, &GENESIS, &mut line);
        assert!(line.len() <= MAX_RECORD, "{}", line.len());
        // At their longest: a subject that escapes to six bytes a byte, the largest tenants, and
        // the longest replica id.
        let mut longest = e.clone();
        longest.client_cert_subject = Some("\u{1}".repeat(5000));
        longest.actor = Actor::Bearer { token_id: None, scope: ActorScope::TenantSet(vec![u64::MAX; 100]) };
        let replica = ReplicaField::new(Some(&ReplicaId::parse(&"r".repeat(MAX_REPLICA_ID)).unwrap()));
        let mut buf = vec![0; MAX_RECORD];
        let written = encode_into(&longest, &replica, usize::MAX, u64::MAX, &GENESIS, &mut buf);
        assert!(written.is_some_and(|(len, _)| len <= MAX_RECORD));
        assert!(check_line(line.trim_end().as_bytes()).is_ok());
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["actor"]["scope"]["tenants"].as_array().unwrap().len(), MAX_TENANTS);
        assert_eq!(v["actor"]["scope"]["tenants_truncated"], true);
        // Present only when true.
        encode(&event(), &ReplicaField::NONE, 0, 1, &GENESIS, &mut line);
        assert!(!line.contains("tenants_truncated"), "{line}");
    }

    #[test]
    fn hashes_are_lowercase_hex() {
        let mut buf = [0u8; 64];
        let mut out = LineOut { buf: &mut buf, len: 0, overflow: false };
        out.hex(&std::array::from_fn(|i| (i * 37) as u8));
        let expected: String = (0..32).map(|i| format!("{:02x}", (i * 37) as u8)).collect();
        assert_eq!(std::str::from_utf8(&buf).unwrap(), expected);
    }
}
