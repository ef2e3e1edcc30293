//! Walking a shard's chain segment by segment: which records verify, where the damage is, and
//! where the next record goes. `verify` walks every segment; start-up recovery (`recover`) walks
//! the newest two.
//!
//! A walk does not stop at the first broken record. It reports the start of each damaged region
//! and picks the chain up again at the next record that verifies on its own, so that what follows
//! damage is still checked, and a record written after damage was found (which links to the last
//! good record, see `recover`) verifies.
//!
//! A segment holds the records of one replica (or records that name none): the server starts a new
//! segment when it starts under another `--replica-id` (`recover`), so a segment whose records
//! name two is damage, reported where the second begins. A chain may change replica from one
//! segment to the next; `verify` notes where.

use super::record::{check_line, LineFacts, ReplicaId, MAX_RECORD};

/// The start of a damaged region: a record that does not verify, or bytes that are no record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// Byte offset in the segment.
    pub offset: usize,
    /// The `seq` the record there should have had.
    pub seq: u64,
    pub reason: String,
}

/// Where a walk stands between records, carried from one segment to the next.
#[derive(Clone, Debug, Default)]
pub struct ChainState {
    /// The last record that verified on its own: the chain goes on from it.
    pub last_good: Option<LineFacts>,
    /// The `seq` of the next line. Every complete line takes one, broken or not, so that a record
    /// written after damage never reuses a number a kept line has.
    pub next_seq: Option<u64>,
    /// Inside a damaged region: lines after a broken one, before a record verifies again.
    pub damaged: bool,
}

impl ChainState {
    /// Whether `facts` continues the chain: links to the last good record with the next `seq`. An
    /// `audit_integrity` record written after damage links to the last good record and takes a
    /// `seq` past every kept line, which skips the broken lines' numbers.
    fn links(&self, facts: &LineFacts) -> bool {
        let Some(last) = &self.last_good else { return true };
        let seq_ok = facts.seq == last.seq + 1
            || (self.damaged && facts.integrity.is_some() && self.next_seq.is_some_and(|next| facts.seq >= next));
        facts.prev_hash == last.hash && seq_ok
    }
}

/// What one segment holds, as a walk found it.
#[derive(Debug, Default)]
pub struct SegmentWalk {
    /// Records that verify on their own.
    pub records: u64,
    /// Complete lines (ending in a newline), broken ones included.
    pub lines: u64,
    /// Where the complete lines end: what comes after has no end of line.
    pub lines_end: usize,
    /// Damage among the complete lines.
    pub findings: Vec<Finding>,
    /// The replica the segment's last record that verified names (`Some(None)`: it names none);
    /// `None` when no record verified.
    pub replica: Option<Option<ReplicaId>>,
}

/// Walks the complete lines of `bytes` (a segment named after `first_seq`) from `state`, and
/// shows `on_record` each record that verifies on its own, with its byte offset.
pub fn walk(
    bytes: &[u8],
    first_seq: u64,
    state: &mut ChainState,
    mut on_record: impl FnMut(usize, &LineFacts),
) -> SegmentWalk {
    let lines_end = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |at| at + 1);
    let mut out = SegmentWalk { lines_end, ..SegmentWalk::default() };
    let mut next_seq = state.next_seq.unwrap_or(first_seq);
    let mut at = 0;
    while at < lines_end {
        let end = at + bytes[at..lines_end].iter().position(|b| *b == b'\n').expect("lines_end ends a line");
        let line = &bytes[at..end];
        out.lines += 1;
        match check_line(line) {
            Ok(facts) => {
                state.next_seq = Some(next_seq);
                if !state.links(&facts) && !state.damaged {
                    out.findings.push(Finding { offset: at, seq: next_seq, reason: "chain broken".into() });
                } else if let Some(before) = out.replica.as_ref().filter(|r| **r != facts.replica) {
                    let reason = format!(
                        "records of two replicas in one segment: {} before, {} from here",
                        replica_name(before.as_ref()),
                        replica_name(facts.replica.as_ref())
                    );
                    out.findings.push(Finding { offset: at, seq: next_seq, reason });
                }
                out.replica = Some(facts.replica.clone());
                // Damage reported or not, the chain goes on from a record that verifies on its own:
                // what follows is still checked against it.
                out.records += 1;
                next_seq = facts.seq.max(next_seq) + 1;
                on_record(at, &facts);
                state.last_good = Some(facts);
                state.damaged = false;
            }
            Err(e) => {
                if !state.damaged {
                    let reason =
                        if line.first() == Some(&0) { "zeros where a record should be".into() } else { e.to_string() };
                    out.findings.push(Finding { offset: at, seq: next_seq, reason });
                }
                state.damaged = true;
                next_seq += 1;
            }
        }
        at = end + 1;
    }
    state.next_seq = Some(next_seq);
    out
}

/// A replica as reports name it: `replica r-1`, or `no replica`.
pub fn replica_name(replica: Option<&ReplicaId>) -> String {
    match replica {
        Some(id) => format!("replica {id}"),
        None => "no replica".into(),
    }
}

/// What comes after a segment's last complete line.
#[derive(Debug, PartialEq, Eq)]
pub enum Tail {
    /// Nothing, or zeros only: a live segment's reserved space, or a seal a crash interrupted.
    Clean,
    /// At most one record's prefix with no end of line, then zeros only: what a process killed
    /// while formatting a record in place leaves. It was never acknowledged.
    Unfinished,
    /// Anything else.
    Damaged(&'static str),
}

/// Classifies `bytes[lines_end..]`.
pub fn tail(bytes: &[u8], lines_end: usize) -> Tail {
    let rest = &bytes[lines_end..];
    let zeros_from = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
    let zero_tail = rest[zeros_from..].iter().all(|b| *b == 0);
    match (zeros_from, zero_tail) {
        (0, true) => Tail::Clean,
        (n, true) if n < MAX_RECORD && rest.len() > n => Tail::Unfinished,
        (_, true) => Tail::Damaged("torn record (no end of line)"),
        (_, false) => Tail::Damaged("bytes after the last record"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::tests::event;
    use crate::audit::record::{encode, ReplicaField, ReplicaId, GENESIS, INTEGRITY_ACTION};

    /// `n` chained lines from seq 1, and each line's start.
    fn lines(n: u64) -> (Vec<u8>, Vec<usize>, Vec<[u8; 32]>) {
        let (mut bytes, mut starts, mut hashes, mut prev, mut line) =
            (Vec::new(), Vec::new(), Vec::new(), GENESIS, String::new());
        for seq in 1..=n {
            starts.push(bytes.len());
            prev = encode(&event(), &ReplicaField::NONE, 0, seq, &prev, &mut line);
            hashes.push(prev);
            bytes.extend_from_slice(line.as_bytes());
        }
        (bytes, starts, hashes)
    }

    /// Chained lines from seq `first` after `prev`, one per entry of `replicas`, each naming it.
    fn lines_of(replicas: &[Option<&str>], first: u64, prev: &mut [u8; 32]) -> (Vec<u8>, Vec<usize>) {
        let (mut bytes, mut starts, mut line) = (Vec::new(), Vec::new(), String::new());
        for (seq, replica) in (first..).zip(replicas) {
            let id = replica.map(|r| ReplicaId::parse(r).unwrap());
            starts.push(bytes.len());
            *prev = encode(&event(), &ReplicaField::new(id.as_ref()), 0, seq, prev, &mut line);
            bytes.extend_from_slice(line.as_bytes());
        }
        (bytes, starts)
    }

    #[test]
    fn a_segment_holds_one_replicas_records_and_a_chain_may_change_replica_between_segments() {
        let named = |r: &str| Some(ReplicaId::parse(r).unwrap());
        let mut prev = GENESIS;
        let (bytes, starts) = lines_of(&[Some("r-1"), Some("r-1"), Some("r-2"), Some("r-2")], 1, &mut prev);
        let found = walk(&bytes, 1, &mut ChainState::default(), |_, _| ());
        assert_eq!(
            found.findings,
            vec![Finding {
                offset: starts[2],
                seq: 3,
                reason: "records of two replicas in one segment: replica r-1 before, replica r-2 from here".into()
            }]
        );
        assert_eq!(found.records, 4, "each record still verifies on its own");
        // Records that name none and records that name one are two replicas too.
        let mut prev = GENESIS;
        let (bytes, starts) = lines_of(&[None, Some("r-1")], 1, &mut prev);
        let found = walk(&bytes, 1, &mut ChainState::default(), |_, _| ());
        assert_eq!(found.findings.len(), 1, "{:?}", found.findings);
        assert_eq!(found.findings[0].offset, starts[1]);
        assert!(found.findings[0].reason.contains("no replica before, replica r-1 from here"));

        // One replica per segment, the chain going on from one to the next: nothing to report.
        let (mut state, mut prev) = (ChainState::default(), GENESIS);
        let (first, _) = lines_of(&[None, None], 1, &mut prev);
        let (second, _) = lines_of(&[Some("r-1"), Some("r-1")], 3, &mut prev);
        let (third, _) = lines_of(&[Some("r-2")], 5, &mut prev);
        let mut seen = Vec::new();
        for (bytes, first_seq, replica) in [(&first, 1, None), (&second, 3, named("r-1")), (&third, 5, named("r-2"))] {
            let found = walk(bytes, first_seq, &mut state, |_, facts| seen.push(facts.replica.clone()));
            assert!(found.findings.is_empty(), "{:?}", found.findings);
            assert_eq!(found.replica, Some(replica));
        }
        assert_eq!(seen, vec![None, None, named("r-1"), named("r-1"), named("r-2")]);
        assert_eq!(walk(b"", 6, &mut state, |_, _| ()).replica, None, "no record, no replica");
    }

    #[test]
    fn a_tampered_record_is_one_finding_and_the_rest_still_verifies() {
        let (mut bytes, starts, _) = lines(10);
        bytes[starts[4] + 20] ^= 1;
        let mut state = ChainState::default();
        let found = walk(&bytes, 1, &mut state, |_, _| ());
        assert_eq!(found.findings.len(), 1, "{:?}", found.findings);
        assert_eq!((found.findings[0].offset, found.findings[0].seq), (starts[4], 5));
        assert_eq!((found.records, found.lines), (9, 10));
        assert_eq!(state.last_good.as_ref().unwrap().seq, 10);
        assert_eq!(state.next_seq, Some(11));
    }

    #[test]
    fn after_a_broken_last_record_an_integrity_record_links_to_the_last_good_one() {
        let (mut bytes, starts, hashes) = lines(5);
        bytes[starts[4] + 20] ^= 1;
        let mut state = ChainState::default();
        let found = walk(&bytes, 1, &mut state, |_, _| ());
        assert_eq!(found.findings.len(), 1);
        assert_eq!((state.last_good.as_ref().unwrap().seq, state.next_seq), (4, Some(6)));
        // The next segment starts with the integrity record: seq 6, linked to record 4.
        let mut e = event();
        e.action = INTEGRITY_ACTION;
        e.integrity = Some(crate::audit::record::Integrity { file: "f".into(), offset: 1, seq: 5, reason: "r".into() });
        let mut line = String::new();
        let h6 = encode(&e, &ReplicaField::NONE, 0, 6, &hashes[3], &mut line);
        let mut next = line.clone().into_bytes();
        encode(&event(), &ReplicaField::NONE, 0, 7, &h6, &mut line);
        next.extend_from_slice(line.as_bytes());
        let found = walk(&next, 6, &mut state, |_, _| ());
        assert!(found.findings.is_empty(), "{:?}", found.findings);
        assert_eq!(found.records, 2);
        // An ordinary record may not skip numbers so.
        let mut state = ChainState::default();
        walk(&bytes, 1, &mut state, |_, _| ());
        encode(&event(), &ReplicaField::NONE, 0, 6, &hashes[3], &mut line);
        assert_eq!(walk(line.as_bytes(), 6, &mut state, |_, _| ()).findings.len(), 0, "damage already reported");
        let mut clean = ChainState::default();
        let (good, _, hashes) = lines(4);
        walk(&good, 1, &mut clean, |_, _| ());
        encode(&event(), &ReplicaField::NONE, 0, 6, &hashes[3], &mut line);
        assert_eq!(walk(line.as_bytes(), 6, &mut clean, |_, _| ()).findings[0].reason, "chain broken");
    }

    #[test]
    fn a_removed_record_breaks_the_chain() {
        let (bytes, starts, _) = lines(6);
        let mut cut = bytes[..starts[2]].to_vec();
        cut.extend_from_slice(&bytes[starts[3]..]);
        let found = walk(&cut, 1, &mut ChainState::default(), |_, _| ());
        assert_eq!(found.findings, vec![Finding { offset: starts[2], seq: 3, reason: "chain broken".into() }]);
    }

    #[test]
    fn tails() {
        let (mut bytes, _, _) = lines(2);
        let end = bytes.len();
        assert_eq!(tail(&bytes, end), Tail::Clean);
        bytes.extend_from_slice(&[0; 100]);
        assert_eq!(tail(&bytes, end), Tail::Clean);
        bytes[end..end + 10].copy_from_slice(b"{\"ts_unix_");
        assert_eq!(tail(&bytes, end), Tail::Unfinished);
        bytes[end + 50] = b'x';
        assert_eq!(tail(&bytes, end), Tail::Damaged("bytes after the last record"));
        let mut cut = bytes[..end + 10].to_vec();
        assert_eq!(tail(&cut, end), Tail::Damaged("torn record (no end of line)"));
        cut.push(0);
        assert_eq!(tail(&cut, end), Tail::Unfinished);
    }
}
