//! `tensor-wasm backup` and `restore`: a consistent copy of the data dir, taken while the server
//! runs, and putting one back into an empty data dir (docs/BACKUP-RESTORE.md).
//!
//! A backup holds the function and pipeline records, the modules they use with their precompiled
//! artifacts, and the audit log's sealed segments, each with its SHA-256 in `BACKUP.json`, which
//! is written last: a directory without it is not a backup.
//!
//! Consistency without stopping the server comes from the order the server writes in. A deploy
//! writes its module before its record, and a delete removes the record before the module, each
//! file atomically. So a record is copied only when its module is there too, which is a function
//! that was live at some moment of the backup. Sealed audit segments never change again; the
//! active ones are left out (their records are in the next backup). Signed checkpoints come along
//! as far as the copied segments hold what they sign, so that `audit verify --public-key` passes
//! on a restored log, and the manifest names the keys that signed them.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::audit::checkpoint;
use crate::functions::record::FunctionRecord;
use crate::functions::store::{sha256_hex, write_atomic};

const MANIFEST: &str = "BACKUP.json";
const FORMAT: u32 = 1;

#[derive(Serialize, Deserialize)]
struct Manifest {
    format: u32,
    created_unix_ms: u64,
    files: Vec<Entry>,
    /// `<name>+<hex key ID>` of each key that signed a checkpoint in the backup: the start of the
    /// verifier key an auditor checks the restored log with. Absent from backups before it.
    #[serde(default)]
    checkpoint_keys: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct Entry {
    /// Relative to the backup: `functions/…`, `pipelines/…`, `modules/…` or `audit/shard-N/…`.
    path: String,
    sha256: String,
    bytes: u64,
}

/// What a backup or restore copied.
#[derive(Debug, Default)]
pub struct Summary {
    pub functions: usize,
    pub pipelines: usize,
    pub modules: usize,
    pub audit_segments: usize,
    /// Signed checkpoints, and the keys that signed them (`<name>+<hex key ID>`).
    pub checkpoints: usize,
    pub checkpoint_keys: Vec<String>,
    /// Records left out because their function was deleted during the backup, and active or
    /// unsealed audit segments.
    pub skipped: Vec<String>,
    /// Damage carried into the backup as it is: records whose module file is missing or
    /// corrupt, audit segments that end in a damaged record.
    pub damaged: Vec<String>,
}

/// The `.json` files of `dir` that are not temp files, by name; none when `dir` is absent.
fn json_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut files = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !name.starts_with('.') && name.ends_with(".json") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// Copies the data dir at `data_dir` (and the audit log at `audit_dir`) into `out`, which must not
/// exist yet or be empty.
pub fn backup(data_dir: &Path, audit_dir: &Path, out: &Path) -> Result<Summary, String> {
    if fs::read_dir(out).is_ok_and(|mut d| d.next().is_some()) {
        return Err(format!("{} is not empty; a backup goes into a new directory", out.display()));
    }
    if !data_dir.join("functions").is_dir() {
        return Err(format!("{} is not a tensor-wasm data dir (it has no functions/)", data_dir.display()));
    }
    let mut summary = Summary::default();
    let mut files = Vec::new();
    let mut put = |relative: String, bytes: &[u8]| -> Result<(), String> {
        let path = out.join(&relative);
        fs::create_dir_all(path.parent().unwrap_or(out))
            .map_err(|e| format!("cannot create {}: {e}", out.display()))?;
        write_atomic(&path, bytes).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        files.push(Entry { path: relative, sha256: sha256_hex(bytes), bytes: bytes.len() as u64 });
        Ok(())
    };

    let mut modules = std::collections::BTreeSet::new();
    for path in json_files(&data_dir.join("functions")).map_err(|e| e.to_string())? {
        // A record deleted since the listing was a function deleted during the backup.
        let Ok(bytes) = fs::read(&path) else { continue };
        let record: FunctionRecord =
            serde_json::from_slice(&bytes).map_err(|e| format!("{}: not a function record: {e}", path.display()))?;
        let hex = record.digest.strip_prefix("sha256:").unwrap_or(&record.digest).to_string();
        let module = data_dir.join("modules").join(format!("{hex}.wasm"));
        let wasm = match fs::read(&module) {
            Ok(w) if sha256_hex(&w) == hex => Some(w),
            // A delete removes the record before the module: a record still there whose module is
            // not is damage, which the backup carries rather than hides. The server lists such a
            // function as broken (or runs it from its artifact) and a deploy of the same bytes
            // repairs it; a backup that dropped it would lose what the tenant was told.
            _ if path.exists() => {
                summary.damaged.push(format!("function {}: its module file is missing or corrupt", record.id));
                None
            }
            _ => {
                summary.skipped.push(format!("function {} (deleted during the backup)", record.id));
                continue;
            }
        };
        if modules.insert(hex.clone()) {
            if let Some(wasm) = &wasm {
                put(format!("modules/{hex}.wasm"), wasm)?;
            }
            // The artifact only saves a compile; a missing one is rebuilt at start-up.
            if let Ok(artifact) = fs::read(data_dir.join("modules").join(format!("{hex}.cwasm"))) {
                put(format!("modules/{hex}.cwasm"), &artifact)?;
            }
        }
        put(format!("functions/{}.json", record.id), &bytes)?;
        summary.functions += 1;
    }
    summary.modules = modules.len();
    for path in json_files(&data_dir.join("pipelines")).map_err(|e| e.to_string())? {
        let Ok(bytes) = fs::read(&path) else { continue };
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        put(format!("pipelines/{name}"), &bytes)?;
        summary.pipelines += 1;
    }

    let mut keys = std::collections::BTreeSet::new();
    for (shard, segments) in audit_segments(audit_dir)? {
        let (sealed, active) = segments.split_at(segments.len().saturating_sub(1));
        for path in active {
            summary.skipped.push(format!("{} (active)", path.display()));
        }
        let mut last_seq = 0;
        for path in sealed {
            let bytes = read(path)?;
            // A segment is sealed once cut to its records: until the sealer has cut it, its
            // reserved tail is zeros. Any other ending is damage recovery kept byte for byte, and
            // it is evidence: copied, and named.
            match bytes.last() {
                Some(b'\n') => {}
                Some(0) => {
                    summary.skipped.push(format!("{} (not sealed yet)", path.display()));
                    continue;
                }
                _ => summary.damaged.push(format!("{} ends in a torn or damaged record", path.display())),
            }
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            put(format!("audit/{shard}/{name}"), &bytes)?;
            summary.audit_segments += 1;
            last_seq = last_seq.max(last_record_seq(&bytes));
        }
        let (notes, signers) = checkpoints_within(&audit_dir.join(&shard), last_seq)?;
        if !notes.is_empty() {
            put(format!("audit/{shard}/{}", checkpoint::FILE_NAME), notes.concat().as_bytes())?;
            summary.checkpoints += notes.len();
            keys.extend(signers);
        }
    }
    summary.checkpoint_keys = keys.into_iter().collect();

    let manifest =
        Manifest { format: FORMAT, created_unix_ms: now_ms(), files, checkpoint_keys: summary.checkpoint_keys.clone() };
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| e.to_string())?;
    write_atomic(&out.join(MANIFEST), &json).map_err(|e| format!("cannot write the manifest: {e}"))?;
    Ok(summary)
}

/// The `seq` of a sealed segment's last record (0 when it has none that parses).
fn last_record_seq(segment: &[u8]) -> u64 {
    let last = segment.strip_suffix(b"\n").unwrap_or(segment);
    let line = last.rsplit(|b| *b == b'\n').next().unwrap_or_default();
    serde_json::from_slice::<serde_json::Value>(line).ok().and_then(|v| v["seq"].as_u64()).unwrap_or(0)
}

/// The shard's checkpoint notes (older file first) that sign no record past `last_seq`, which a
/// backup holding records up to `last_seq` can still prove; and the keys that signed them. A
/// checkpoint of records left out (the active segment's) would fail `verify` on the restored log.
fn checkpoints_within(shard_dir: &Path, last_seq: u64) -> Result<(Vec<String>, Vec<String>), String> {
    let (mut notes, mut keys) = (Vec::new(), Vec::new());
    for name in [checkpoint::OLD_FILE_NAME, checkpoint::FILE_NAME] {
        let text = match fs::read_to_string(shard_dir.join(name)) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("cannot read {}: {e}", shard_dir.join(name).display())),
        };
        for note in checkpoint::notes_in(&text).0 {
            match checkpoint::unverified(&note) {
                Some((c, signers)) if c.size <= last_seq => {
                    // As the server appends them: each note followed by a blank line.
                    notes.push(format!("{note}\n"));
                    keys.extend(signers);
                }
                _ => {}
            }
        }
    }
    Ok((notes, keys))
}

/// Each `shard-N` directory under `audit_dir` with its segments, oldest first.
fn audit_segments(audit_dir: &Path) -> Result<Vec<(String, Vec<PathBuf>)>, String> {
    let Ok(entries) = fs::read_dir(audit_dir) else { return Ok(Vec::new()) };
    let mut shards = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("shard-") || !entry.path().is_dir() {
            continue;
        }
        let mut segments: Vec<PathBuf> = fs::read_dir(entry.path())
            .map_err(|e| format!("cannot list {}: {e}", entry.path().display()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("jsonl"))
            .collect();
        segments.sort();
        shards.push((name, segments));
    }
    shards.sort();
    Ok(shards)
}

/// Puts the backup at `from` into `data_dir` and `audit_dir`, after checking every file against
/// the manifest. Refuses a data dir that already holds functions, pipelines or audit segments.
pub fn restore(from: &Path, data_dir: &Path, audit_dir: &Path) -> Result<Summary, String> {
    let manifest: Manifest = serde_json::from_slice(&read(&from.join(MANIFEST))?)
        .map_err(|e| format!("{}: not a backup manifest: {e}", from.join(MANIFEST).display()))?;
    if manifest.format != FORMAT {
        return Err(format!("backup format {} is not supported (this build reads {FORMAT})", manifest.format));
    }
    for dir in [data_dir.join("functions"), data_dir.join("pipelines")] {
        if !json_files(&dir).map_err(|e| e.to_string())?.is_empty() {
            return Err(format!("{} already holds records; restore into an empty data dir", dir.display()));
        }
    }
    if audit_segments(audit_dir)?.iter().any(|(_, s)| !s.is_empty()) {
        return Err(format!("{} already holds an audit log; restore into an empty one", audit_dir.display()));
    }
    // Everything is checked before anything is written.
    let mut contents = Vec::with_capacity(manifest.files.len());
    for entry in &manifest.files {
        let safe = !entry.path.starts_with('/') && !entry.path.split('/').any(|c| c == ".." || c.is_empty());
        if !safe {
            return Err(format!("the manifest names an unsafe path {:?}", entry.path));
        }
        let bytes = read(&from.join(&entry.path))?;
        if sha256_hex(&bytes) != entry.sha256 || bytes.len() as u64 != entry.bytes {
            return Err(format!("{} does not match its checksum in the manifest: the backup is damaged", entry.path));
        }
        contents.push((entry, bytes));
    }
    let mut summary = Summary { checkpoint_keys: manifest.checkpoint_keys.clone(), ..Summary::default() };
    for (entry, bytes) in contents {
        let target = match entry.path.strip_prefix("audit/") {
            Some(rest) => {
                if rest.ends_with(".jsonl") {
                    summary.audit_segments += 1;
                } else if rest.ends_with(checkpoint::FILE_NAME) {
                    summary.checkpoints += 1;
                }
                audit_dir.join(rest)
            }
            None => {
                match entry.path.split('/').next() {
                    Some("functions") => summary.functions += 1,
                    Some("pipelines") => summary.pipelines += 1,
                    Some("modules") if entry.path.ends_with(".wasm") => summary.modules += 1,
                    _ => {}
                }
                data_dir.join(&entry.path)
            }
        };
        let parent = target.parent().unwrap_or(data_dir);
        fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        write_atomic(&target, &bytes).map_err(|e| format!("cannot write {}: {e}", target.display()))?;
    }
    Ok(summary)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
