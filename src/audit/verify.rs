//! `tensor-wasm audit verify`: every record's hash and every chain's links, across all segments;
//! with a public key, every signed checkpoint too, and that the log still holds the records each
//! one covers.
//!
//! A hash chain proves order, not completeness: a log cut at its end, or rewritten and chained
//! again, verifies as a chain. A checkpoint that left the host does not let that pass: the record
//! it names must still be there with the hash it signed.
//!
//! Replicas (`--replica-id`): a segment's records name one replica (or none: `chain::walk` reports
//! a segment that mixes them), and a chain may go on under another from one segment to the next,
//! where a server started under another id; each such place is noted. With `--replica` the log is
//! held to one replica: a record that names another is broken. A checkpoint that names a replica
//! is checked only against a log of that replica (one its records or its own checkpoint files
//! name, or `--replica`): the shipped checkpoints of a whole fleet can be passed to each
//! replica's log. One that names none is checked against any log, as before the field.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::chain::{replica_name, tail, walk, ChainState, Tail};
use super::checkpoint::{notes_in, Checkpoint, NoteError, VerifierKey, FILE_NAME, OLD_FILE_NAME};
use super::record::ReplicaId;
use super::segment::list_segments;

/// A broken record, or bytes that are no record.
#[derive(Debug)]
pub struct Broken {
    pub file: PathBuf,
    pub offset: usize,
    /// The `seq` the broken record should have had.
    pub seq: u64,
    pub reason: String,
}

/// A signed checkpoint the log does not match: the proof that records were lost or changed.
#[derive(Debug)]
pub struct Contradicted {
    pub checkpoint: Checkpoint,
    /// Where the note was read.
    pub source: PathBuf,
    pub reason: String,
    /// How many of the shard's checkpoints the log contradicts, this one (the earliest) included.
    pub of_shard: usize,
}

/// What the checkpoints said.
#[derive(Debug, Default)]
pub struct CheckpointReport {
    /// Distinct checkpoints of this log (not another replica's) whose signature verified.
    pub verified: usize,
    /// Checkpoints the log contradicts: the earliest per shard.
    pub contradicted: Vec<Contradicted>,
    /// Notes signed by the key's name and ID whose signature fails, and where they were.
    pub forged: Vec<PathBuf>,
    /// Notes of other keys, malformed notes, and notes cut short at the end of a file.
    pub ignored: usize,
    /// Checkpoints older than the oldest record retention kept: not checkable.
    pub beyond_retention: usize,
    /// Checkpoints whose signature verified that name a replica this log is not: another
    /// replica's, not checked against it.
    pub other_replicas: BTreeMap<ReplicaId, usize>,
    /// The replicas the checkpoints given from elsewhere (`--checkpoints`, those shipped off the
    /// host) name, when none of them is one this log names: a log renamed to escape them.
    pub shipped_for_others: Option<BTreeSet<ReplicaId>>,
    /// Per shard: the newest checkpoint the log matches.
    pub newest: BTreeMap<u64, Checkpoint>,
    /// Per shard: records after its newest checkpoint, which nothing signed covers yet.
    pub uncovered: BTreeMap<u64, u64>,
}

/// Where a chain goes on under another replica: a start under another `--replica-id`.
#[derive(Debug, PartialEq, Eq)]
pub struct Handover {
    /// The segment whose records name `to`.
    pub file: PathBuf,
    pub from: Option<ReplicaId>,
    pub to: Option<ReplicaId>,
}

#[derive(Debug, Default)]
pub struct Report {
    /// Records that verified.
    pub records: u64,
    /// The replicas the records name.
    pub replicas: BTreeSet<ReplicaId>,
    /// Records that verified and name no replica.
    pub unnamed: u64,
    /// Where a chain changes replica, segment to segment.
    pub handovers: Vec<Handover>,
    /// Live segments that end in a record a crash cut short.
    pub unfinished: Vec<PathBuf>,
    pub broken: Vec<Broken>,
    pub checkpoints: Option<CheckpointReport>,
}

impl Report {
    /// Whether the log is intact: nothing broken, no checkpoint contradicted or forged, and with a
    /// key, at least one checkpoint that verified.
    pub fn ok(&self) -> bool {
        let checkpoints_ok = self.checkpoints.as_ref().is_none_or(|c| {
            c.contradicted.is_empty() && c.forged.is_empty() && c.verified > 0 && c.shipped_for_others.is_none()
        });
        self.broken.is_empty() && checkpoints_ok
    }
}

/// The chain directories under an audit directory (`shard-N`), or the directory itself when it
/// is one.
pub fn chain_dirs(dir: &Path) -> io::Result<Vec<PathBuf>> {
    if !list_segments(dir)?.is_empty() || dir.join(FILE_NAME).exists() {
        return Ok(vec![dir.to_path_buf()]);
    }
    // Exactly `shard-<N>`: a copy beside them (`shard-0.orig`) is no chain, so it cannot stand in
    // for the records a checkpoint names.
    let mut dirs: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir() && shard_of(p).is_some())
        .collect();
    dirs.sort();
    Ok(dirs)
}

/// The shard a chain directory named `shard-<N>` holds.
fn shard_of(dir: &Path) -> Option<u64> {
    let n = dir.file_name()?.to_str()?.strip_prefix("shard-")?;
    n.bytes().all(|b| b.is_ascii_digit()).then(|| n.parse().ok()).flatten()
}

/// Where checkpoints are read: each chain directory's own files, and `extra` (a file, or a
/// directory whose files and subdirectories' files are read).
fn checkpoint_files(chains: &[PathBuf], extra: Option<&Path>) -> io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> =
        chains.iter().flat_map(|c| [c.join(OLD_FILE_NAME), c.join(FILE_NAME)]).filter(|p| p.is_file()).collect();
    match extra {
        Some(path) if path.is_dir() => {
            let mut found = Vec::new();
            for entry in fs::read_dir(path)? {
                let entry = entry?.path();
                if entry.is_file() {
                    found.push(entry);
                } else if entry.is_dir() {
                    for inner in fs::read_dir(&entry)? {
                        let inner = inner?.path();
                        if inner.is_file() && !list_segments(&entry)?.contains(&inner) {
                            found.push(inner);
                        }
                    }
                }
            }
            found.sort();
            files.extend(found);
        }
        Some(path) => files.push(path.to_path_buf()),
        None => {}
    }
    Ok(files)
}

/// Checks `dir`; with `key`, the checkpoints in it and in `extra` as well. With `replica`, the log
/// is that replica's: a record that names another is broken.
pub fn verify(
    dir: &Path,
    key: Option<&VerifierKey>,
    extra: Option<&Path>,
    replica: Option<&ReplicaId>,
) -> io::Result<Report> {
    let chains = chain_dirs(dir)?;
    let mut report = Report::default();

    // The checkpoints first, so that the walk keeps only the hashes they name.
    let mut signed: Vec<(Checkpoint, PathBuf)> = Vec::new();
    let mut checks = key.map(|_| CheckpointReport::default());
    // The replicas this log is: `replica`, or those its records and its own checkpoint files name.
    let mut own_replicas: BTreeSet<ReplicaId> = replica.into_iter().cloned().collect();
    // The replicas the checkpoints from elsewhere name.
    let mut shipped_replicas: BTreeSet<ReplicaId> = BTreeSet::new();
    if let (Some(key), Some(checks)) = (key, checks.as_mut()) {
        let mut seen = std::collections::HashSet::new();
        for file in checkpoint_files(&chains, extra)? {
            let text = fs::read(&file)?;
            let own = file.parent().is_some_and(|parent| chains.iter().any(|c| c == parent));
            let (notes, torn) = notes_in(&String::from_utf8_lossy(&text));
            checks.ignored += torn;
            for note in notes {
                match key.open(&note).and_then(Checkpoint::parse) {
                    Ok(cp) => {
                        if let Some(named) = cp.replica.as_ref().filter(|_| own && replica.is_none()) {
                            own_replicas.insert(named.clone());
                        }
                        if let Some(named) = cp.replica.as_ref().filter(|_| !own) {
                            shipped_replicas.insert(named.clone());
                        }
                        if seen.insert((cp.replica.clone(), cp.shard, cp.size, cp.hash)) {
                            signed.push((cp, file.clone()));
                        }
                    }
                    Err(NoteError::BadSignature) => checks.forged.push(file.clone()),
                    Err(_) => checks.ignored += 1,
                }
            }
        }
    }
    let wanted: std::collections::HashSet<(u64, u64)> = signed.iter().map(|(c, _)| (c.shard, c.size)).collect();

    // Per shard: the first and last `seq` that verified, and the hashes of the checkpointed ones.
    let mut span: HashMap<u64, (u64, u64)> = HashMap::new();
    let mut hashes: HashMap<(u64, u64), Vec<[u8; 32]>> = HashMap::new();
    for chain in &chains {
        let segments = list_segments(chain)?;
        let mut state = ChainState::default();
        let own = shard_of(chain);
        for (i, path) in segments.iter().enumerate() {
            let bytes = fs::read(path)?;
            let first_seq = path.file_stem().and_then(|s| s.to_str()).and_then(|s| s.parse().ok()).unwrap_or(1);
            // A record of another shard in `shard-N`: a chain moved in to stand for this one's.
            let mut strangers: Vec<(usize, u64, u64)> = Vec::new();
            // Records of another replica than `replica`: the first one's offset, seq and replica, and
            // how many there are in the segment.
            let mut foreign: Option<(usize, u64, ReplicaId, u64)> = None;
            // The replica the chain's last record named, and the one the segment's first names.
            let before = state.last_good.as_ref().map(|last| last.replica.clone());
            let mut first_named: Option<Option<ReplicaId>> = None;
            let found = walk(&bytes, first_seq, &mut state, |offset, facts| {
                if own.is_some_and(|own| own != facts.shard) {
                    strangers.push((offset, facts.seq, facts.shard));
                    return;
                }
                first_named.get_or_insert_with(|| facts.replica.clone());
                match &facts.replica {
                    Some(named) => {
                        if !report.replicas.contains(named) {
                            report.replicas.insert(named.clone());
                        }
                        if replica.is_some_and(|r| r != named) {
                            match &mut foreign {
                                Some((_, _, _, n)) => *n += 1,
                                None => foreign = Some((offset, facts.seq, named.clone(), 1)),
                            }
                        }
                    }
                    None => report.unnamed += 1,
                }
                let s = span.entry(facts.shard).or_insert((facts.seq, facts.seq));
                s.0 = s.0.min(facts.seq);
                s.1 = s.1.max(facts.seq);
                if wanted.contains(&(facts.shard, facts.seq)) {
                    hashes.entry((facts.shard, facts.seq)).or_default().push(facts.hash);
                }
            });
            report.records += found.records;
            for (offset, seq, shard) in strangers {
                report.broken.push(Broken {
                    file: path.clone(),
                    offset,
                    seq,
                    reason: format!("a record of shard {shard} in {}", chain.display()),
                });
            }
            if let Some((offset, seq, named, n)) = foreign {
                let reason = format!(
                    "records of {} in the log of {} ({n} in this segment)",
                    replica_name(Some(&named)),
                    replica_name(replica)
                );
                report.broken.push(Broken { file: path.clone(), offset, seq, reason });
            }
            if let (Some(from), Some(to)) = (before, first_named) {
                if from != to {
                    report.handovers.push(Handover { file: path.clone(), from, to });
                }
            }
            let next_seq = state.next_seq.unwrap_or(first_seq);
            for f in found.findings {
                report.broken.push(Broken { file: path.clone(), offset: f.offset, seq: f.seq, reason: f.reason });
            }
            // After the last record of a shard's newest, still live segment (its last byte a zero):
            // a zero tail, and before it at most one record's prefix with no end of line, which a
            // process killed mid-record leaves. A sealed segment has no such excuse.
            let live = i + 1 == segments.len() && bytes.last() == Some(&0);
            match tail(&bytes, found.lines_end) {
                Tail::Clean => {}
                Tail::Unfinished if live => report.unfinished.push(path.clone()),
                Tail::Unfinished => report.broken.push(Broken {
                    file: path.clone(),
                    offset: found.lines_end,
                    seq: next_seq,
                    reason: "torn record (no end of line)".into(),
                }),
                Tail::Damaged(why) => report.broken.push(Broken {
                    file: path.clone(),
                    offset: found.lines_end,
                    seq: next_seq,
                    reason: why.into(),
                }),
            }
        }
    }

    if let Some(checks) = checks.as_mut() {
        if replica.is_none() {
            own_replicas.extend(report.replicas.iter().cloned());
        }
        // Checkpoints shipped off the host, none of them of a replica this log names: a log that
        // took another name (its records renamed and chained again, its own checkpoint files
        // replaced) must not pass as "another replica's" and go unchecked. Against a whole fleet's
        // shipped checkpoints, a log names at least one replica they cover.
        if !shipped_replicas.is_empty() && shipped_replicas.is_disjoint(&own_replicas) {
            checks.shipped_for_others = Some(shipped_replicas.clone());
        }
        // Another replica's checkpoints are not this log's to answer for.
        signed.retain(|(cp, _)| match &cp.replica {
            Some(named) if !own_replicas.contains(named) => {
                *checks.other_replicas.entry(named.clone()).or_default() += 1;
                false
            }
            _ => true,
        });
        checks.verified = signed.len();
        signed.sort_by_key(|(c, _)| (c.shard, c.size));
        let mut by_shard: BTreeMap<u64, Vec<(Checkpoint, PathBuf)>> = BTreeMap::new();
        let (mut newest_size, mut newest_checkpoint, mut newest_source) =
            (HashMap::new(), HashMap::new(), HashMap::new());
        for (cp, file) in signed {
            // Sorted by size: the last one of a shard is its newest.
            newest_size.insert(cp.shard, cp.size);
            newest_checkpoint.insert(cp.shard, cp.clone());
            newest_source.insert(cp.shard, file.clone());
            by_shard.entry(cp.shard).or_default().push((cp, file));
        }
        for (shard, list) in by_shard {
            let mut failed: Vec<(Checkpoint, PathBuf, String)> = Vec::new();
            for (cp, file) in list {
                let reason = match span.get(&shard) {
                    None => Some(format!("the log holds no record of shard {shard}")),
                    Some(&(_, last)) if cp.size > last => Some(format!("the log of shard {shard} ends at seq {last}")),
                    Some(&(first, _)) if cp.size < first => {
                        checks.beyond_retention += 1;
                        None
                    }
                    Some(_) => match hashes.get(&(shard, cp.size)) {
                        None => Some(format!("record {} is missing", cp.size)),
                        Some(found) if !found.contains(&cp.hash) => {
                            Some(format!("record {} is not the one signed: it was changed", cp.size))
                        }
                        Some(_) => None,
                    },
                };
                match reason {
                    Some(reason) => failed.push((cp, file, reason)),
                    None if cp.size >= span.get(&shard).map_or(0, |s| s.0) => {
                        checks.newest.insert(shard, cp);
                    }
                    None => {}
                }
            }
            // The newest signed checkpoint older than every record kept: retention never removes the
            // active segment, so nothing it signed can be gone unless the log was replaced or cut
            // from its start.
            let newest_signed = newest_size.get(&shard).copied().unwrap_or(0);
            if span.get(&shard).is_some_and(|&(first, _)| newest_signed < first) {
                let reason =
                    format!("every record up to {newest_signed}, the newest signed, is gone: the log was replaced");
                failed.insert(0, (newest_checkpoint[&shard].clone(), newest_source[&shard].clone(), reason));
            }
            let last = span.get(&shard).map_or(0, |s| s.1);
            let covered = checks.newest.get(&shard).map_or(0, |c| c.size);
            if last > covered {
                checks.uncovered.insert(shard, last - covered);
            }
            let of_shard = failed.len();
            if let Some((checkpoint, source, reason)) = failed.into_iter().next() {
                checks.contradicted.push(Contradicted { checkpoint, source, reason, of_shard });
            }
        }
        // A shard with records and no checkpoint at all: everything it holds is uncovered.
        for (shard, (_, last)) in &span {
            if !checks.newest.contains_key(shard) && !checks.contradicted.iter().any(|c| c.checkpoint.shard == *shard) {
                checks.uncovered.insert(*shard, *last);
            }
        }
    }
    report.checkpoints = checks;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::checkpoint::SigningKey;
    use crate::audit::record::tests::event;
    use crate::audit::record::{encode, ReplicaField, GENESIS};
    use crate::audit::segment::segment_name;

    fn id(r: &str) -> ReplicaId {
        ReplicaId::parse(r).unwrap()
    }

    /// A sealed segment of shard 0 in `dir` from seq `first`, one record per entry of `replicas`;
    /// returns each record's hash.
    fn segment(dir: &Path, first: u64, replicas: &[Option<&str>], prev: &mut [u8; 32]) -> Vec<[u8; 32]> {
        let (mut bytes, mut hashes, mut line) = (Vec::new(), Vec::new(), String::new());
        for (seq, replica) in (first..).zip(replicas) {
            let named = replica.map(id);
            *prev = encode(&event(), &ReplicaField::new(named.as_ref()), 0, seq, prev, &mut line);
            hashes.push(*prev);
            bytes.extend_from_slice(line.as_bytes());
        }
        fs::create_dir_all(dir.join("shard-0")).unwrap();
        fs::write(dir.join("shard-0").join(segment_name(first)), bytes).unwrap();
        hashes
    }

    #[test]
    fn a_chain_may_change_replica_between_segments_and_is_held_to_one_with_replica() {
        let dir = tempfile::tempdir().unwrap();
        let mut prev = GENESIS;
        segment(dir.path(), 1, &[None, None], &mut prev);
        segment(dir.path(), 3, &[Some("r-1"), Some("r-1"), Some("r-1")], &mut prev);
        segment(dir.path(), 6, &[Some("r-2")], &mut prev);
        let report = verify(dir.path(), None, None, None).unwrap();
        assert!(report.ok(), "{:?}", report.broken);
        assert_eq!((report.records, report.unnamed), (6, 2));
        assert_eq!(report.replicas, [id("r-1"), id("r-2")].into());
        let shard = dir.path().join("shard-0");
        assert_eq!(
            report.handovers,
            vec![
                Handover { file: shard.join(segment_name(3)), from: None, to: Some(id("r-1")) },
                Handover { file: shard.join(segment_name(6)), from: Some(id("r-1")), to: Some(id("r-2")) },
            ]
        );

        // Held to r-1, the record of r-2 is broken; those that name none are its history.
        let report = verify(dir.path(), None, None, Some(&id("r-1"))).unwrap();
        assert!(!report.ok());
        assert_eq!(report.broken.len(), 1, "{:?}", report.broken);
        let broken = &report.broken[0];
        assert_eq!((&broken.file, broken.offset, broken.seq), (&shard.join(segment_name(6)), 0, 6));
        assert_eq!(broken.reason, "records of replica r-2 in the log of replica r-1 (1 in this segment)");
    }

    #[test]
    fn a_segment_of_two_replicas_is_broken() {
        let dir = tempfile::tempdir().unwrap();
        let mut prev = GENESIS;
        segment(dir.path(), 1, &[Some("r-1"), Some("r-2"), Some("r-1")], &mut prev);
        let report = verify(dir.path(), None, None, None).unwrap();
        let reasons: Vec<&str> = report.broken.iter().map(|b| b.reason.as_str()).collect();
        assert_eq!(
            reasons,
            [
                "records of two replicas in one segment: replica r-1 before, replica r-2 from here",
                "records of two replicas in one segment: replica r-2 before, replica r-1 from here"
            ]
        );
        assert_eq!(report.broken.iter().map(|b| b.seq).collect::<Vec<_>>(), [2, 3]);
    }

    #[test]
    fn only_the_logs_own_replicas_checkpoints_are_checked_against_it() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("audit");
        let key = SigningKey::generate("tw.example/audit").unwrap();
        let vkey = key.verifier();
        let mut prev = GENESIS;
        let hashes = segment(&log, 1, &[Some("r-1"), Some("r-1"), Some("r-1")], &mut prev);
        let note = |replica: Option<&str>, size, hash| {
            let named = replica.map(id);
            let cp = Checkpoint::new(key.name(), named.as_ref(), 0, size, hash, 1);
            cp.json_line(&key.sign_note(&cp.text())) + "\n"
        };
        // The log's own checkpoint, as the server keeps it beside the log.
        let own = Checkpoint::new(key.name(), Some(&id("r-1")), 0, 3, hashes[2], 1);
        fs::write(log.join("shard-0").join(FILE_NAME), key.sign_note(&own.text()) + "\n").unwrap();
        // What the fleet's shipper kept: r-1's, and r-2's shard 0, a longer chain of its own.
        let shipped = dir.path().join("shipped.jsonl");
        fs::write(&shipped, note(Some("r-1"), 2, hashes[1]) + &note(Some("r-2"), 100, [9; 32])).unwrap();
        let report = verify(&log, Some(&vkey), Some(&shipped), None).unwrap();
        let checks = report.checkpoints.as_ref().unwrap();
        assert!(report.ok(), "{:?}", checks.contradicted);
        assert_eq!(checks.verified, 2);
        assert_eq!(checks.other_replicas, [(id("r-2"), 1)].into());

        // One that names no replica (from before the field) is checked against any log, as before.
        let old = dir.path().join("old.jsonl");
        fs::write(&old, note(None, 100, [9; 32])).unwrap();
        let report = verify(&log, Some(&vkey), Some(&old), None).unwrap();
        let checks = report.checkpoints.as_ref().unwrap();
        assert_eq!(checks.contradicted.len(), 1);
        assert_eq!(checks.contradicted[0].reason, "the log of shard 0 ends at seq 3");

        // Held to r-2, r-2's checkpoint is this log's and proves it is not r-2's log; its own r-1
        // checkpoint is another replica's.
        let report = verify(&log, Some(&vkey), Some(&shipped), Some(&id("r-2"))).unwrap();
        let checks = report.checkpoints.as_ref().unwrap();
        assert!(!report.ok());
        assert_eq!(report.broken.len(), 1, "{:?}", report.broken);
        assert_eq!(checks.contradicted.len(), 1);
        assert_eq!(checks.contradicted[0].checkpoint.replica, Some(id("r-2")));
        assert_eq!(checks.other_replicas, [(id("r-1"), 2)].into());

        // A log with no record left: its own checkpoint files still say whose it is.
        fs::remove_file(log.join("shard-0").join(segment_name(1))).unwrap();
        let report = verify(&log, Some(&vkey), Some(&shipped), None).unwrap();
        let checks = report.checkpoints.as_ref().unwrap();
        assert_eq!(checks.contradicted.len(), 1, "{checks:?}");
        assert_eq!(checks.contradicted[0].reason, "the log holds no record of shard 0");
        assert_eq!(checks.other_replicas, [(id("r-2"), 1)].into());
    }
}
