//! Signed checkpoints: a shard's chain head (its record count and the hash of its last record)
//! signed with Ed25519, as a C2SP signed note (c2sp.org/signed-note), laid out like a
//! c2sp.org/tlog-checkpoint:
//!
//! ```text
//! <key name>/shard-<N>
//! <seq of the last record>
//! <base64 of the last record's hash>
//! time <unix ms>
//!
//! — <key name> <base64(key ID || signature)>
//! ```
//!
//! A fleet replica (`--replica-id`) names itself in the origin, `<key name>/<replica>/shard-<N>`,
//! and in an extension line after the time, `replica <id>`: the replicas of a fleet share a key,
//! and a log's origin must be its own (a witness, or `audit verify` reading every replica's
//! shipped checkpoints, would otherwise take two replicas' shard 0 for one log that forked). The
//! line says which part of the origin is the replica, as a key name may hold `/` too. Without a
//! replica id the note is what it was before.
//!
//! The third line is the chain head, not an RFC 6962 Merkle root: any signed-note verifier checks
//! the signature, and `tensor-wasm audit verify --public-key` checks it against the log. A chain
//! head commits to every record before it, so a checkpoint that left the host proves that the log
//! held those records: a log cut or rewritten since no longer matches it.
//!
//! Keys are stored as the Go `note` package writes them: the signer key
//! `PRIVATE+KEY+<name>+<hex key ID>+<base64(0x01 || seed)>` and the verifier key
//! `<name>+<hex key ID>+<base64(0x01 || public key)>`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ed25519_dalek::Signer as _;
use sha2::{Digest, Sha256};

use super::record::ReplicaId;

/// The signed-note signature type of Ed25519.
const ALG_ED25519: u8 = 0x01;
const SIGNATURE_PREFIX: &str = "\u{2014} ";
const PRIVATE_PREFIX: &str = "PRIVATE+KEY+";
/// The extension line that names a checkpoint's replica.
const REPLICA_LINE: &str = "replica ";
/// The per-shard file checkpoints are appended to, and the one it is renamed to when full.
pub const FILE_NAME: &str = "checkpoints";
pub const OLD_FILE_NAME: &str = "checkpoints.1";

#[derive(Debug)]
pub enum KeyError {
    Io(PathBuf, io::Error),
    /// The file does not hold a key of the expected form.
    Format(PathBuf, &'static str),
    /// A key name with a space or a plus, which the signed-note format forbids.
    BadName(String),
}

impl std::fmt::Display for KeyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyError::Io(path, e) => write!(f, "{}: {e}", path.display()),
            KeyError::Format(path, why) => write!(f, "{}: not a key: {why}", path.display()),
            KeyError::BadName(name) => write!(f, "key name `{name}` is empty or holds a space or `+`"),
        }
    }
}

/// Why a signed note was not accepted.
#[derive(Debug, PartialEq, Eq)]
pub enum NoteError {
    /// No signature by the key: another key's note, ignored as the spec asks.
    UnknownKey,
    /// Signed by the key's name and ID, and the signature does not verify: forged or damaged.
    BadSignature,
    /// Not a note, or not a checkpoint.
    Malformed(&'static str),
}

impl std::fmt::Display for NoteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoteError::UnknownKey => write!(f, "not signed by this key"),
            NoteError::BadSignature => write!(f, "its signature does not verify (forged or damaged)"),
            NoteError::Malformed(why) => write!(f, "malformed checkpoint: {why}"),
        }
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && !name.chars().any(|c| c.is_whitespace() || c == '+' || c.is_control())
}

/// The signed-note key ID: SHA-256(name || 0x0A || 0x01 || public key), first four bytes.
fn key_id(name: &str, public: &[u8; 32]) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update([b'\n', ALG_ED25519]);
    h.update(public);
    let digest = h.finalize();
    [digest[0], digest[1], digest[2], digest[3]]
}

fn hex4(id: &[u8; 4]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// `<hex id>+<base64(0x01 || 32 bytes)>` after the name: the 32 bytes, checked against the ID.
fn parse_key_tail(path: &Path, name: &str, rest: &str) -> Result<([u8; 4], [u8; 32]), KeyError> {
    let bad = |why| KeyError::Format(path.to_path_buf(), why);
    let (id_hex, material) = rest.split_once('+').ok_or(bad("no key ID"))?;
    let id = u32::from_str_radix(id_hex, 16)
        .ok()
        .filter(|_| id_hex.len() == 8)
        .ok_or(bad("the key ID is not 8 hex digits"))?;
    let bytes = B64.decode(material.trim()).map_err(|_| bad("the key is not base64"))?;
    let (&alg, key) = bytes.split_first().ok_or(bad("empty key"))?;
    if alg != ALG_ED25519 {
        return Err(bad("not an Ed25519 key"));
    }
    let key: [u8; 32] = key.try_into().map_err(|_| bad("an Ed25519 key is 32 bytes"))?;
    if !valid_name(name) {
        return Err(KeyError::BadName(name.into()));
    }
    Ok((id.to_be_bytes(), key))
}

/// The server's signing key. No `Debug` of the secret: it prints its name only.
pub struct SigningKey {
    name: String,
    id: [u8; 4],
    key: ed25519_dalek::SigningKey,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({}+{})", self.name, hex4(&self.id))
    }
}

impl SigningKey {
    /// A new key from the operating system's random source.
    pub fn generate(name: &str) -> Result<SigningKey, KeyError> {
        if !valid_name(name) {
            return Err(KeyError::BadName(name.into()));
        }
        let mut seed = zeroize::Zeroizing::new([0u8; 32]);
        getrandom::fill(seed.as_mut())
            .map_err(|e| KeyError::Io("getrandom".into(), io::Error::other(e.to_string())))?;
        Ok(SigningKey::from_seed(name, &seed))
    }

    fn from_seed(name: &str, seed: &[u8; 32]) -> SigningKey {
        let key = ed25519_dalek::SigningKey::from_bytes(seed);
        SigningKey { name: name.into(), id: key_id(name, key.verifying_key().as_bytes()), key }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads a signer key file (`PRIVATE+KEY+…`). A file others may read is refused: whoever
    /// reads it can sign checkpoints for a log they cut.
    pub fn load(path: &Path) -> Result<SigningKey, KeyError> {
        let io = |e| KeyError::Io(path.to_path_buf(), e);
        let mode = fs::metadata(path).map_err(io)?.mode();
        if mode & 0o007 != 0 {
            return Err(KeyError::Format(
                path.to_path_buf(),
                "anyone may read it (chmod 0600, or a Secret's defaultMode 0400)",
            ));
        }
        if mode & 0o070 != 0 {
            // Kubernetes adds group read to a Secret's files when the pod sets an fsGroup.
            tracing::warn!(file = %path.display(), "the audit signing key is readable by its group");
        }
        let text = zeroize::Zeroizing::new(fs::read_to_string(path).map_err(io)?);
        let rest = text
            .trim()
            .strip_prefix(PRIVATE_PREFIX)
            .ok_or(KeyError::Format(path.to_path_buf(), "no PRIVATE+KEY+ prefix"))?;
        let (name, tail) = rest.split_once('+').ok_or(KeyError::Format(path.to_path_buf(), "no key name"))?;
        let (id, seed) = parse_key_tail(path, name, tail)?;
        let seed = zeroize::Zeroizing::new(seed);
        let key = SigningKey::from_seed(name, &seed);
        if key.id != id {
            return Err(KeyError::Format(path.to_path_buf(), "the key ID does not match the key"));
        }
        Ok(key)
    }

    pub fn verifier(&self) -> VerifierKey {
        VerifierKey { name: self.name.clone(), id: self.id, key: self.key.verifying_key() }
    }

    /// Writes the key pair: `out` (mode 0600, never over an existing file) and `out.pub`.
    pub fn write_pair(&self, out: &Path) -> Result<PathBuf, KeyError> {
        let mut material = zeroize::Zeroizing::new(vec![ALG_ED25519]);
        material.extend_from_slice(self.key.as_bytes());
        let text = zeroize::Zeroizing::new(format!(
            "{PRIVATE_PREFIX}{}+{}+{}\n",
            self.name,
            hex4(&self.id),
            B64.encode(&material)
        ));
        let public = pub_path(out);
        let write = |path: &Path, mode: u32, text: &str| -> Result<(), KeyError> {
            let io = |e| KeyError::Io(path.to_path_buf(), e);
            let mut file = OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(io)?;
            file.write_all(text.as_bytes()).and_then(|()| file.sync_all()).map_err(io)
        };
        write(out, 0o600, &text)?;
        write(&public, 0o644, &format!("{}\n", self.verifier().to_text()))?;
        Ok(public)
    }

    /// `text` as a signed note: the text, a blank line, one signature line.
    pub fn sign_note(&self, text: &str) -> String {
        debug_assert!(text.ends_with('\n'));
        let signature = self.key.sign(text.as_bytes());
        let mut blob = self.id.to_vec();
        blob.extend_from_slice(&signature.to_bytes());
        format!("{text}\n{SIGNATURE_PREFIX}{} {}\n", self.name, B64.encode(blob))
    }
}

/// `FILE.pub` for `FILE`.
pub fn pub_path(out: &Path) -> PathBuf {
    let mut name = out.as_os_str().to_owned();
    name.push(".pub");
    PathBuf::from(name)
}

/// A public key, as a signed-note verifier key.
#[derive(Clone, Debug)]
pub struct VerifierKey {
    name: String,
    id: [u8; 4],
    key: ed25519_dalek::VerifyingKey,
}

impl VerifierKey {
    pub fn to_text(&self) -> String {
        let mut material = vec![ALG_ED25519];
        material.extend_from_slice(self.key.as_bytes());
        format!("{}+{}+{}", self.name, hex4(&self.id), B64.encode(material))
    }

    pub fn load(path: &Path) -> Result<VerifierKey, KeyError> {
        let text = fs::read_to_string(path).map_err(|e| KeyError::Io(path.to_path_buf(), e))?;
        VerifierKey::parse(path, text.trim())
    }

    fn parse(path: &Path, text: &str) -> Result<VerifierKey, KeyError> {
        let (name, rest) = text.split_once('+').ok_or(KeyError::Format(path.to_path_buf(), "no key name"))?;
        let (id, public) = parse_key_tail(path, name, rest)?;
        let key = ed25519_dalek::VerifyingKey::from_bytes(&public)
            .map_err(|_| KeyError::Format(path.to_path_buf(), "not an Ed25519 public key"))?;
        if key_id(name, &public) != id {
            return Err(KeyError::Format(path.to_path_buf(), "the key ID does not match the key"));
        }
        Ok(VerifierKey { name: name.into(), id, key })
    }

    /// The note's text, if a signature line of this key verifies it. Signatures of other keys
    /// are ignored, as the signed-note spec asks; one of this key that fails rejects the note.
    pub fn open<'n>(&self, note: &'n str) -> Result<&'n str, NoteError> {
        // The text ends at the last blank line; signature lines follow it.
        let split = note.rfind("\n\n").ok_or(NoteError::Malformed("no blank line before the signatures"))?;
        let (text, signatures) = (&note[..split + 1], &note[split + 2..]);
        let mut verified = false;
        for line in signatures.lines() {
            let rest = line.strip_prefix(SIGNATURE_PREFIX).ok_or(NoteError::Malformed("a signature line without —"))?;
            let (name, blob) =
                rest.split_once(' ').ok_or(NoteError::Malformed("a signature line without a signature"))?;
            let blob = B64.decode(blob).map_err(|_| NoteError::Malformed("a signature that is not base64"))?;
            if name != self.name || blob.len() < 4 || blob[..4] != self.id {
                continue;
            }
            let signature: [u8; 64] = blob[4..].try_into().map_err(|_| NoteError::BadSignature)?;
            let signature = ed25519_dalek::Signature::from_bytes(&signature);
            self.key.verify_strict(text.as_bytes(), &signature).map_err(|_| NoteError::BadSignature)?;
            verified = true;
        }
        if verified {
            Ok(text)
        } else {
            Err(NoteError::UnknownKey)
        }
    }
}

/// One shard's chain head at a moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// `<key name>/shard-<N>`, or `<key name>/<replica>/shard-<N>`.
    pub origin: String,
    /// The fleet replica whose chain it is; `None` for a server with no replica id (and every
    /// checkpoint made before the field).
    pub replica: Option<ReplicaId>,
    pub shard: u64,
    /// The `seq` of the last record: how many records the chain has had.
    pub size: u64,
    /// The last record's `hash`.
    pub hash: [u8; 32],
    pub time_unix_ms: u64,
}

impl Checkpoint {
    pub fn new(
        key_name: &str,
        replica: Option<&ReplicaId>,
        shard: usize,
        size: u64,
        hash: [u8; 32],
        time_unix_ms: u64,
    ) -> Checkpoint {
        let origin = match replica {
            Some(replica) => format!("{key_name}/{replica}/shard-{shard}"),
            None => format!("{key_name}/shard-{shard}"),
        };
        Checkpoint { origin, replica: replica.cloned(), shard: shard as u64, size, hash, time_unix_ms }
    }

    /// The note text: origin, size, hash, then the time (and the replica) as extension lines.
    pub fn text(&self) -> String {
        let mut text =
            format!("{}\n{}\n{}\ntime {}\n", self.origin, self.size, B64.encode(self.hash), self.time_unix_ms);
        if let Some(replica) = &self.replica {
            text.push_str(&format!("{REPLICA_LINE}{replica}\n"));
        }
        text
    }

    /// Reads a verified note text back.
    pub fn parse(text: &str) -> Result<Checkpoint, NoteError> {
        let mut lines = text.lines();
        let origin = lines.next().filter(|l| !l.is_empty()).ok_or(NoteError::Malformed("no origin"))?;
        let shard = origin
            .rsplit_once("/shard-")
            .and_then(|(_, n)| n.parse().ok())
            .ok_or(NoteError::Malformed("the origin names no shard"))?;
        let size = lines.next().and_then(|l| l.parse().ok()).ok_or(NoteError::Malformed("no size"))?;
        let hash = lines
            .next()
            .and_then(|l| B64.decode(l).ok())
            .and_then(|h| <[u8; 32]>::try_from(h).ok())
            .ok_or(NoteError::Malformed("no 32-byte hash"))?;
        let (mut time_unix_ms, mut replica) = (0, None);
        for extension in lines {
            if let Some(time) = extension.strip_prefix("time ") {
                time_unix_ms = time.parse().unwrap_or(0);
            } else if let Some(named) = extension.strip_prefix(REPLICA_LINE) {
                let named =
                    ReplicaId::parse(named).map_err(|_| NoteError::Malformed("the replica is no replica id"))?;
                // The origin must be this replica's, so that no note names one replica in its origin
                // and another on this line.
                if !origin.ends_with(&format!("/{named}/shard-{shard}")) {
                    return Err(NoteError::Malformed("the origin does not name the note's replica"));
                }
                replica = Some(named);
            }
        }
        Ok(Checkpoint { origin: origin.into(), replica, shard, size, hash, time_unix_ms })
    }

    /// The one JSON line written to stdout for log shippers.
    pub fn json_line(&self, note: &str) -> String {
        let mut fields = serde_json::json!({
            "shard": self.shard,
            "size": self.size,
            "hash": B64.encode(self.hash),
            "time_unix_ms": self.time_unix_ms,
            "note": note,
        });
        if let Some(replica) = &self.replica {
            fields["replica"] = replica.as_str().into();
        }
        serde_json::json!({ "audit_checkpoint": fields }).to_string()
    }
}

/// A note's checkpoint and the keys that signed it (`<name>+<hex key ID>`, the start of their
/// verifier keys), read without verifying anything: what a backup needs to keep the checkpoints a
/// restore can still prove, and to name the keys an auditor must hold to check them.
pub fn unverified(note: &str) -> Option<(Checkpoint, Vec<String>)> {
    let (text, signatures) = note.split_once("\n\n")?;
    let checkpoint = Checkpoint::parse(&format!("{text}\n")).ok()?;
    let keys = signatures
        .lines()
        .filter_map(|line| {
            let (name, signature) = line.strip_prefix(SIGNATURE_PREFIX)?.split_once(' ')?;
            let id = B64.decode(signature).ok()?;
            Some(format!("{name}+{}", id.get(..4)?.iter().map(|b| format!("{b:02x}")).collect::<String>()))
        })
        .collect();
    Some((checkpoint, keys))
}

/// The signed notes in a checkpoints file, or in JSON lines a log shipper kept (lines with an
/// `audit_checkpoint` object; other lines, audit records among them, are skipped). A note cut
/// short at the end of a file (no signature yet) is left out and counted.
pub fn notes_in(text: &str) -> (Vec<String>, usize) {
    // Shipped stdout is JSON lines among others (`listening on …` first): any line that is an
    // `audit_checkpoint` object makes it such a log, whatever its first line is.
    let shipped: Vec<String> = text
        .lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["audit_checkpoint"]["note"].as_str().map(str::to_string))
        .collect();
    if !shipped.is_empty() || text.trim_start().starts_with('{') {
        return (shipped, 0);
    }
    // A note: non-empty text lines, a blank line, signature lines. Notes follow each other,
    // each after a blank line.
    let (mut notes, mut torn) = (Vec::new(), 0);
    let mut lines = text.split_inclusive('\n').peekable();
    while lines.peek().is_some() {
        let mut note = String::new();
        while let Some(line) = lines.next_if(|l| l.trim_end_matches('\n').is_empty()) {
            let _ = line; // blank lines between notes
        }
        while let Some(line) = lines.next_if(|l| !l.trim_end_matches('\n').is_empty()) {
            note.push_str(line);
        }
        let Some(blank) = lines.next() else {
            torn += usize::from(!note.is_empty());
            break;
        };
        note.push_str(blank);
        let mut signed = false;
        while let Some(line) = lines.next_if(|l| l.starts_with(SIGNATURE_PREFIX)) {
            note.push_str(line);
            signed = true;
        }
        if signed && note.ends_with('\n') {
            notes.push(note);
        } else {
            torn += 1;
        }
    }
    (notes, torn)
}

/// A shard's checkpoint file: appended to, one note at a time, and renamed to
/// [`OLD_FILE_NAME`] when it would pass its size limit, so that it stays bounded.
pub struct CheckpointFile {
    path: PathBuf,
    file: Option<File>,
    len: u64,
    max_bytes: u64,
}

impl CheckpointFile {
    pub fn new(dir: &Path, max_bytes: u64) -> CheckpointFile {
        CheckpointFile { path: dir.join(FILE_NAME), file: None, len: 0, max_bytes }
    }

    /// Appends `note` in one write(2): a process killed mid-write leaves the whole note or none.
    pub fn append(&mut self, note: &str) -> io::Result<()> {
        let entry = format!("{note}\n");
        if self.file.is_some() && self.len + entry.len() as u64 > self.max_bytes {
            self.file = None;
            fs::rename(&self.path, self.path.with_file_name(OLD_FILE_NAME))?;
        }
        if self.file.is_none() {
            let file = OpenOptions::new().create(true).append(true).open(&self.path)?;
            self.len = file.metadata()?.len();
            self.file = Some(file);
        }
        let file = self.file.as_mut().expect("opened above");
        file.write_all(entry.as_bytes())?;
        self.len += entry.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_follow_the_signed_note_spec() {
        // The spec's example verifier key and note (c2sp.org/signed-note).
        let vkey =
            VerifierKey::parse(Path::new("x"), "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k")
                .unwrap();
        let note = "This is an example message.\n\n\u{2014} example.com/foo Uw2QOkn8srV1yJGh2VYRlL1Tnagv1YEq6TfXppzi2ONncAlTgK7Ztg1ERYNZXsYjOBH3mFXmRKuwHjG1Yu72IneyaQM=\n";
        assert_eq!(vkey.open(note), Ok("This is an example message.\n"));
        let forged = note.replace("example message", "exemplary message");
        assert_eq!(vkey.open(&forged), Err(NoteError::BadSignature));
    }

    #[test]
    fn checkpoints_sign_verify_and_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::generate("tw.example/audit").unwrap();
        let out = dir.path().join("key");
        let public = key.write_pair(&out).unwrap();
        assert_eq!(fs::metadata(&out).unwrap().mode() & 0o777, 0o600);
        let loaded = SigningKey::load(&out).unwrap();
        let vkey = VerifierKey::load(&public).unwrap();
        assert_eq!(vkey.to_text(), key.verifier().to_text());
        assert!(SigningKey::generate("has space").is_err() && SigningKey::generate("a+b").is_err());

        let cp = Checkpoint::new(loaded.name(), None, 3, 42, [7; 32], 1_795_000_000_000);
        let note = loaded.sign_note(&cp.text());
        let text = vkey.open(&note).unwrap();
        assert_eq!(Checkpoint::parse(text).unwrap(), cp);
        // Another key's note is not this key's business; a changed byte is a forgery.
        let other = SigningKey::generate("tw.example/audit").unwrap();
        assert_eq!(vkey.open(&other.sign_note(&cp.text())), Err(NoteError::UnknownKey));
        assert_eq!(vkey.open(&note.replace("\n42\n", "\n41\n")), Err(NoteError::BadSignature));

        // A file of notes, and the JSON lines of stdout, read back alike.
        let two = format!("{note}\n{note}\n");
        assert_eq!(notes_in(&two), (vec![note.clone(), note.clone()], 0));
        assert_eq!(notes_in(&format!("{two}{}", cp.text())).1, 1, "a note without its signature is torn");
        let json = format!("{{\"seq\":1}}\n{}\n", cp.json_line(&note));
        assert_eq!(notes_in(&json).0, vec![note]);
    }

    #[test]
    fn a_replicas_checkpoint_names_it_and_one_without_is_what_it_was() {
        let key = SigningKey::generate("tw.example/audit").unwrap();
        let vkey = key.verifier();
        let plain = Checkpoint::new(key.name(), None, 3, 42, [7; 32], 1_795_000_000_000);
        let b64 = B64.encode([7; 32]);
        assert_eq!(plain.text(), format!("tw.example/audit/shard-3\n42\n{b64}\ntime 1795000000000\n"));
        assert!(!plain.json_line("n").contains("replica"));

        let r1 = ReplicaId::parse("r-1").unwrap();
        let cp = Checkpoint::new(key.name(), Some(&r1), 3, 42, [7; 32], 1_795_000_000_000);
        assert_eq!(cp.text(), format!("tw.example/audit/r-1/shard-3\n42\n{b64}\ntime 1795000000000\nreplica r-1\n"));
        let note = key.sign_note(&cp.text());
        let parsed = Checkpoint::parse(vkey.open(&note).unwrap()).unwrap();
        assert_eq!(parsed, cp);
        assert_eq!(parsed.replica, Some(r1));
        let json: serde_json::Value = serde_json::from_str(&cp.json_line(&note)).unwrap();
        assert_eq!(json["audit_checkpoint"]["replica"], "r-1");
        assert_eq!(notes_in(&cp.json_line(&note)).0, vec![note.clone()]);
        // The replica is signed: naming another breaks the signature.
        assert_eq!(vkey.open(&note.replace("replica r-1", "replica r-2")), Err(NoteError::BadSignature));
        // A note whose origin names another replica than its line, even signed, is no checkpoint.
        for text in [
            format!("tw.example/audit/r-2/shard-3\n42\n{b64}\ntime 1\nreplica r-1\n"),
            format!("tw.example/audit/shard-3\n42\n{b64}\ntime 1\nreplica r-1\n"),
            format!("tw.example/audit/xr-1/shard-3\n42\n{b64}\ntime 1\nreplica r-1\n"),
        ] {
            let opened = vkey.open(&key.sign_note(&text)).map(str::to_string).unwrap();
            assert_eq!(
                Checkpoint::parse(&opened),
                Err(NoteError::Malformed("the origin does not name the note's replica"))
            );
        }
        let bad = format!("tw.example/audit/a b/shard-3\n42\n{b64}\ntime 1\nreplica a b\n");
        assert_eq!(Checkpoint::parse(&bad), Err(NoteError::Malformed("the replica is no replica id")));
    }

    #[test]
    fn a_key_file_others_may_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("key");
        SigningKey::generate("n").unwrap().write_pair(&out).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(&out, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(SigningKey::load(&out), Err(KeyError::Format(..))));
    }

    #[test]
    fn the_checkpoint_file_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = CheckpointFile::new(dir.path(), 1000);
        for _ in 0..30 {
            file.append(&"x".repeat(99)).unwrap();
        }
        let len = |n| fs::metadata(dir.path().join(n)).unwrap().len();
        assert!(len(FILE_NAME) <= 1000 && len(OLD_FILE_NAME) <= 1000);
    }
}
