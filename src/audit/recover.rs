//! Start-up recovery of a shard's chain. It never removes a complete record.
//!
//! A crash (a `kill -9` while a record is formatted in place in the mapping) leaves at most one
//! record's prefix after the last end of line: that torn suffix, never acknowledged, is all that
//! is cut. A complete line that does not verify (its hash does not match its contents, it does
//! not link to its predecessor, it does not parse) is not what a crash leaves: it is damage, and
//! the segment holding it is kept byte for byte and sealed as it is. The chain then goes on in a
//! new segment, from the last record that verifies, whose first record is an `audit_integrity`
//! event naming the damage (the shard writes it, `ShardAudit::record_integrity`).
//!
//! A start under another replica id (`--replica-id`, or the host name a fleet replica defaults
//! to) than the newest segment's records name also starts a new segment, so that each segment
//! holds one replica's records; the chain goes on across it.
//!
//! Start-up reads the newest two segments of each shard: the active one and the sealed one
//! before it, so that the work is bounded by two segments whatever the retention. Older sealed
//! segments are only read by `tensor-wasm audit verify`.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::chain::replica_name;
use super::chain::{tail, walk, ChainState, Finding, Tail};
use super::helpers::Helpers;
use super::record::{Integrity, ReplicaId, GENESIS};
use super::segment::{finish_seal, list_segments, scan, segment_name, ActiveSegment};

/// Where a shard's chain goes on after start-up.
pub struct Recovered {
    /// The `seq` the chain stands at: the next record takes `seq + 1`.
    pub seq: u64,
    /// The hash the next record links to: the last record that verifies.
    pub prev_hash: [u8; 32],
    /// The segment to append to; `None` when the chain has none yet.
    pub active: Option<ActiveSegment>,
    /// Damage found, each to be recorded as an `audit_integrity` event before anything else.
    pub damage: Vec<Integrity>,
}

/// The `seq` a segment's name says its first record has.
fn first_seq(path: &Path) -> u64 {
    path.file_stem().and_then(|s| s.to_str()).and_then(|s| s.parse().ok()).unwrap_or(1)
}

/// One integrity event per damaged segment: its first damaged region, and how many there are.
fn report(shard: usize, path: &Path, findings: &[Finding]) -> Option<Integrity> {
    let first = findings.first()?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let reason = match findings.len() {
        1 => first.reason.clone(),
        n => format!("{} (and {} more damaged regions in the segment)", first.reason, n - 1),
    };
    Some(Integrity { file: format!("shard-{shard}/{name}"), offset: first.offset as u64, seq: first.seq, reason })
}

/// Recovers the chain of shard `shard` in `dir`, which goes on under `replica`; new segments are
/// `segment_bytes` long, and the active one is prefaulted by `helpers`.
pub fn recover(
    dir: &Path,
    shard: usize,
    segment_bytes: usize,
    replica: Option<&ReplicaId>,
    helpers: &Helpers,
) -> io::Result<Recovered> {
    let segments = list_segments(dir)?;
    // Seals a crash interrupted (in the background sealer) are finished first.
    for path in segments.iter().rev().skip(1) {
        if !finish_seal(path)? {
            break;
        }
        tracing::info!(shard, file = %path.display(), "audit: finished an interrupted seal");
    }
    let Some(newest) = segments.last() else {
        return Ok(Recovered { seq: 0, prev_hash: GENESIS, active: None, damage: Vec::new() });
    };
    let mut state = ChainState::default();
    let mut damage: Vec<(PathBuf, Integrity)> = Vec::new();

    if let Some(sealed) = segments.len().checked_sub(2).map(|i| &segments[i]) {
        let bytes = fs::read(sealed)?;
        let mut found = walk(&bytes, first_seq(sealed), &mut state, |_, _| ());
        // A sealed segment has no excuse for bytes after its last record.
        if !matches!(tail(&bytes, found.lines_end), Tail::Clean) {
            let seq = state.next_seq.unwrap_or(1);
            found.findings.push(Finding { offset: found.lines_end, seq, reason: "bytes after the last record".into() });
        }
        if let Some(found) = report(shard, sealed, &found.findings) {
            damage.push((sealed.clone(), found));
        }
    }

    let bytes = fs::read(newest)?;
    let mut reported = HashSet::new();
    let found = walk(&bytes, first_seq(newest), &mut state, |_, facts| {
        if let Some(named) = &facts.integrity {
            reported.insert(named.clone());
        }
    });
    // Damage an earlier start already recorded in this segment is not recorded again.
    damage.retain(|(_, d)| !reported.contains(&(d.file.clone(), d.offset)));
    let newest_damaged = report(shard, newest, &found.findings);
    let after_lines = bytes[found.lines_end..].iter().filter(|b| **b != 0).count();
    // The newest segment's records name another replica than the one this start writes as.
    let handed_over = found.replica.as_ref().filter(|named| named.as_ref() != replica);

    let active = if let Some(d) = newest_damaged {
        damage.push((newest.clone(), d));
        // Kept byte for byte, torn suffix included: only its reserved zeros are cut.
        finish_seal(newest)?;
        // Past every kept line, so that no `seq` is used twice and the name sorts after it.
        let next = state.next_seq.unwrap_or(1).max(first_seq(newest) + found.lines);
        state.next_seq = Some(next);
        ActiveSegment::create(dir.join(segment_name(next)), segment_bytes, true, helpers)?
    } else if (!damage.is_empty() || handed_over.is_some()) && found.lines > 0 {
        // The damage is in the sealed segment before: a new segment still starts, so that its
        // first record is the report. Under another replica id: so that no segment holds two.
        if let Some(named) = handed_over {
            tracing::info!(
                shard,
                file = %newest.display(),
                "audit: the chain goes on as {} in a new segment (the last one's records name {})",
                replica_name(replica),
                replica_name(named.as_ref())
            );
        }
        finish_seal_at(newest, found.lines_end, after_lines, shard)?;
        let next = state.next_seq.unwrap_or(1).max(first_seq(newest) + found.lines);
        state.next_seq = Some(next);
        ActiveSegment::create(dir.join(segment_name(next)), segment_bytes, true, helpers)?
    } else {
        if after_lines > 0 {
            tracing::warn!(shard, file = %newest.display(), cut_bytes = after_lines, "audit: torn tail cut away");
        }
        // Always continue in the newest segment, even an empty one: its name is taken.
        ActiveSegment::reopen(newest.clone(), found.lines_end, segment_bytes, helpers)?
    };

    for (path, d) in &damage {
        tracing::error!(
            shard,
            file = %path.display(),
            offset = d.offset,
            seq = d.seq,
            reason = %d.reason,
            "audit: integrity failure: a complete record does not verify; the segment is kept as it is"
        );
    }
    let prev_hash = match &state.last_good {
        Some(last) => last.hash,
        // No record in the newest two segments: the newest record of an older one, if any.
        None => older_last_hash(&segments)?,
    };
    let seq = state.next_seq.map_or(0, |next| next - 1);
    Ok(Recovered { seq, prev_hash, active: Some(active), damage: damage.into_iter().map(|(_, d)| d).collect() })
}

/// Cuts a segment whose complete lines end at `lines_end` to them (a torn suffix of
/// `after_lines` non-zero bytes goes) and seals it.
fn finish_seal_at(path: &Path, lines_end: usize, after_lines: usize, shard: usize) -> io::Result<()> {
    if after_lines > 0 {
        tracing::warn!(shard, file = %path.display(), cut_bytes = after_lines, "audit: torn tail cut away");
    }
    let file = fs::OpenOptions::new().write(true).open(path)?;
    file.set_len(lines_end as u64)?;
    file.sync_all()
}

fn older_last_hash(segments: &[PathBuf]) -> io::Result<[u8; 32]> {
    for path in segments.iter().rev().skip(2) {
        if let Some(last) = scan(&fs::read(path)?, None).last {
            return Ok(last.hash);
        }
    }
    Ok(GENESIS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::tests::event;
    use crate::audit::record::{encode, ReplicaField};

    fn segment(dir: &Path, seqs: std::ops::RangeInclusive<u64>, prev: &mut [u8; 32], zeros: usize) -> Vec<u8> {
        named_segment(dir, None, seqs, prev, zeros)
    }

    fn named_segment(
        dir: &Path,
        replica: Option<&ReplicaId>,
        seqs: std::ops::RangeInclusive<u64>,
        prev: &mut [u8; 32],
        zeros: usize,
    ) -> Vec<u8> {
        let (first, mut bytes, mut line) = (*seqs.start(), Vec::new(), String::new());
        for seq in seqs {
            *prev = encode(&event(), &ReplicaField::new(replica), 0, seq, prev, &mut line);
            bytes.extend_from_slice(line.as_bytes());
        }
        let mut file = bytes.clone();
        file.resize(bytes.len() + zeros, 0);
        fs::write(dir.join(segment_name(first)), &file).unwrap();
        bytes
    }

    #[test]
    fn a_torn_suffix_is_all_that_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let mut prev = GENESIS;
        let records = segment(dir.path(), 1..=5, &mut prev, 0);
        let path = dir.path().join(segment_name(1));
        let mut torn = records.clone();
        torn.extend_from_slice(&records[..40]);
        torn.resize(70_000, 0);
        fs::write(&path, &torn).unwrap();
        let r = recover(dir.path(), 0, 65536, None, &Helpers::default()).unwrap();
        assert!(r.damage.is_empty());
        assert_eq!((r.seq, r.prev_hash), (5, prev));
        assert!(
            fs::read(&path).unwrap()[..records.len() + 1] == [&records[..], &[0]].concat()[..],
            "only the torn suffix goes"
        );
    }

    #[test]
    fn a_tampered_record_keeps_its_segment_and_a_new_one_starts() {
        let dir = tempfile::tempdir().unwrap();
        let mut prev = GENESIS;
        let mut records = segment(dir.path(), 1..=5, &mut prev, 4096);
        let path = dir.path().join(segment_name(1));
        let fifth = records.iter().enumerate().filter(|(_, b)| **b == b'\n').nth(3).unwrap().0 + 1;
        records[fifth + 30] ^= 1;
        let mut live = records.clone();
        live.resize(records.len() + 4096, 0);
        fs::write(&path, &live).unwrap();
        let r = recover(dir.path(), 3, 65536, None, &Helpers::default()).unwrap();
        // Kept byte for byte (only the reserved zeros go), and sealed.
        assert!(fs::read(&path).unwrap() == records, "the segment is kept byte for byte");
        assert_eq!(r.damage.len(), 1);
        assert_eq!(r.damage[0].file, "shard-3/00000000000000000001.jsonl");
        assert_eq!((r.damage[0].offset, r.damage[0].seq), (fifth as u64, 5));
        // The chain goes on from record 4, the last good one, at seq 6: past every kept line.
        assert_eq!(r.seq, 5);
        let active = r.active.unwrap();
        assert_eq!(active.path, dir.path().join(segment_name(6)));
        assert_ne!(r.prev_hash, prev);
    }

    #[test]
    fn a_start_under_another_replica_id_goes_on_in_a_new_segment() {
        let r1 = ReplicaId::parse("r-1").unwrap();
        let r2 = ReplicaId::parse("r-2").unwrap();
        for (named, starts_as, new_segment) in [
            (Some(&r1), Some(&r1), false),
            (None, None, false),
            (Some(&r1), Some(&r2), true),
            (Some(&r1), None, true),
            (None, Some(&r1), true),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let mut prev = GENESIS;
            let records = named_segment(dir.path(), named, 1..=5, &mut prev, 4096);
            let path = dir.path().join(segment_name(1));
            let r = recover(dir.path(), 0, 65536, starts_as, &Helpers::default()).unwrap();
            let case = format!("{named:?} then {starts_as:?}");
            assert!(r.damage.is_empty(), "{case}: {:?}", r.damage);
            assert_eq!((r.seq, r.prev_hash), (5, prev), "{case}: the chain goes on from the last record");
            let active = r.active.unwrap();
            if new_segment {
                assert_eq!(active.path, dir.path().join(segment_name(6)), "{case}");
                assert!(fs::read(&path).unwrap() == records, "{case}: the old segment is sealed as it was");
            } else {
                assert_eq!(active.path, path, "{case}");
            }
        }
    }
}
