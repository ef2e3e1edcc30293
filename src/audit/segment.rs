//! Segment files: a shard's chain is a series of them in its own directory, named by the `seq` of
//! their first record (`00000000000000000001.jsonl`).
//!
//! The active segment is preallocated (`posix_fallocate`) to its full size and mapped: an append
//! is a copy into the mapping, which a `kill -9` cannot lose (the page cache outlives the process)
//! and which can never fail for lack of disk, since the blocks are already reserved. Past the last
//! record the file is zeros. A sealed segment is cut to its exact length and fsynced: a plain
//! JSONL file.
//!
//! Reserving a segment (zeroing 64 MiB on tmpfs, allocating its blocks on disk) takes milliseconds,
//! so each shard keeps one [`Spare`] made ahead of time by the background thread: a rotation on
//! the shard is then a rename.
//!
//! The slow work (sealing, spares, retention, prefaulting) runs on the audit log's helper threads,
//! through the [`Helpers`] handle each chain holds (see [`super::helpers`]).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::MmapRaw;

use super::helpers::{Helpers, Prefaulter};
use super::record::{check_line, LineFacts};

pub fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}.jsonl")
}

/// The segments of one chain directory, oldest first.
pub fn list_segments(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut paths: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|e| e == "jsonl")
                && p.file_stem()
                    .and_then(|s| s.to_str())
                    .is_some_and(|s| s.len() == 20 && s.bytes().all(|b| b.is_ascii_digit()))
        })
        .collect();
    paths.sort();
    Ok(paths)
}

/// The segment being appended to.
pub struct ActiveSegment {
    pub path: PathBuf,
    file: Arc<File>,
    /// Shared with the prefault thread, which only ever madvises it: the shard is the one thread
    /// that forms references to its bytes.
    map: Arc<MmapRaw>,
    len: usize,
    /// Bytes from the start whose pages were dropped from the mapping (see `release_written`).
    released: usize,
    /// Bytes from the start whose pages were asked to be mapped writable ahead of the writes.
    prefaulted: usize,
    /// `None`: no prefault thread, and the writes fault the pages in themselves.
    prefaulter: Option<Prefaulter>,
}

/// How much written data stays mapped behind the write position: a segment's eighth, at most
/// 1 MiB, in whole pages. Pages behind it are released, so the resident set stays flat.
fn release_lag(capacity: usize) -> usize {
    (capacity / 8).clamp(PAGE, 1 << 20) & !(PAGE - 1)
}

/// Pages are released this many bytes at a time (or a lag's worth, if less): one madvise per
/// few hundred records, and a resident set that moves by no more than this per shard.
const RELEASE_STEP: usize = 256 * 1024;

const PAGE: usize = 4096;
/// Pages are faulted in by the prefault thread this many bytes at a time: a page fault costs the
/// shard more than an append.
const PREFAULT_WINDOW: usize = 128 * 1024;
/// How far ahead of the write position the pages asked for reach. At a million records a second
/// a shard writes 128 KiB in about 0.25 ms, less than an idle CPU of a VM may take to wake the
/// prefault thread: with one window of lead the shard itself faulted one page in five.
const PREFAULT_LEAD: usize = 8 * PREFAULT_WINDOW;

impl ActiveSegment {
    /// Creates a new segment of `capacity` bytes, all reserved on disk. With `sync_dir` the
    /// directory entry is made durable now; otherwise the caller arranges it
    /// ([`Helpers::sync_dir`]).
    pub fn create(path: PathBuf, capacity: usize, sync_dir: bool, helpers: &Helpers) -> io::Result<ActiveSegment> {
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(&path)?;
        Self::reserve(&file, capacity).inspect_err(|_| {
            let _ = fs::remove_file(&path);
        })?;
        if sync_dir {
            sync_parent(&path)?;
        }
        Self::map(path, file, 0, helpers)
    }

    /// Makes the shard's spare, when it is ready, the segment at `path`; `None` when it is not.
    pub fn from_spare(
        spare: &Spare,
        path: PathBuf,
        sync_dir: bool,
        helpers: &Helpers,
    ) -> Option<io::Result<ActiveSegment>> {
        let file = spare.ready.lock().unwrap_or_else(|p| p.into_inner()).take()?;
        let renamed = fs::rename(&spare.path, &path).and_then(|()| if sync_dir { sync_parent(&path) } else { Ok(()) });
        Some(renamed.and_then(|()| Self::map(path, file, 0, helpers)))
    }

    /// Reopens an existing active segment whose valid records end at `len`, after a restart.
    pub fn reopen(path: PathBuf, len: usize, capacity: usize, helpers: &Helpers) -> io::Result<ActiveSegment> {
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        // Zero whatever a torn write left past the valid end, then reserve the full size again.
        file.set_len(len as u64)?;
        Self::reserve(&file, capacity.max(len))?;
        Self::map(path, file, len, helpers)
    }

    fn reserve(file: &File, capacity: usize) -> io::Result<()> {
        // With the shard's slice timer held back: tmpfs's fallocate fails with EINTR on any pending
        // signal, and undoes what it reserved.
        // SAFETY: fallocate on an fd we own.
        let rc = crate::runtime::slice_timer::ticks_held(|| unsafe {
            libc::posix_fallocate(file.as_raw_fd(), 0, capacity as libc::off_t)
        });
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(())
    }

    fn map(path: PathBuf, file: File, len: usize, helpers: &Helpers) -> io::Result<ActiveSegment> {
        // SAFETY: the file is ours alone (one writer per shard directory) and stays open and at
        // least this long while mapped; other processes only read it.
        let map = MmapRaw::map_raw(&file)?;
        // No read-around on faults. The file's pages are reserved but unwritten, so a fault makes
        // the kernel zero its whole read-ahead window in one go, without a preemption point: with
        // the VM disk's `read_ahead_kb` of 8 MiB that held the shard (or the prefaulter, on the
        // shard's CPU) for 9 ms per fault (perf/AUDIT.md). Writes are sequential; reads are ours.
        // Only a hint: refused, it costs tail latency, not the audit log.
        let _ = map.advise(memmap2::Advice::Random);
        let map = Arc::new(map);
        let mut segment = ActiveSegment {
            path,
            file: Arc::new(file),
            map,
            len,
            released: 0,
            prefaulted: len & !(PAGE - 1),
            prefaulter: helpers.prefaulter.clone(),
        };
        segment.prefault_ahead();
        Ok(segment)
    }

    pub fn room(&self) -> usize {
        self.map.len() - self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The file, for the group-commit thread's fdatasync.
    pub fn file(&self) -> Arc<File> {
        self.file.clone()
    }

    /// The unwritten rest of the segment, where the next record is formatted in place; it becomes
    /// part of the segment only through [`ActiveSegment::commit`].
    pub fn unwritten(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is live while `self` is, `len <= map.len()`, and the shard (through
        // `&mut self`) is the only one that forms references to its bytes; other processes and
        // the prefault thread do not (see `map`).
        unsafe { std::slice::from_raw_parts_mut(self.map.as_mut_ptr().add(self.len), self.room()) }
    }

    /// Makes the first `n` bytes of [`ActiveSegment::unwritten`] part of the segment.
    pub fn commit(&mut self, n: usize) {
        assert!(n <= self.room(), "audit segment overflow");
        self.len += n;
        self.release_written();
        self.prefault_ahead();
    }

    /// Asks the prefault thread for the next window once the write position is within
    /// [`PREFAULT_LEAD`] of the end of what was asked for. When its queue is full the shard faults
    /// the pages in itself, as it writes them.
    fn prefault_ahead(&mut self) {
        if self.len + PREFAULT_LEAD <= self.prefaulted || self.prefaulted >= self.map.len() {
            return;
        }
        let start = self.prefaulted.max(self.len & !(PAGE - 1));
        let end = (start + PREFAULT_WINDOW).min(self.map.len());
        if let Some(prefaulter) = &self.prefaulter {
            prefaulter.ask(&self.map, start..end);
        }
        self.prefaulted = end;
    }

    /// The last `n` bytes committed.
    pub fn tail(&self, n: usize) -> &[u8] {
        // SAFETY: as in `unwritten`; these bytes are written and no `&mut` to them is live.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(self.len - n), n) }
    }

    /// Copies `line` in. The caller has checked `room()`.
    #[cfg(test)]
    pub(super) fn append(&mut self, line: &[u8]) {
        self.unwritten()[..line.len()].copy_from_slice(line);
        self.commit(line.len());
    }

    /// Drops pages written well behind the write position from the mapping, once a lag's worth
    /// has gathered. Without it every written page of a 64 MiB segment stays resident until the
    /// segment is sealed. Nothing is lost: the mapping is shared, so the kernel marks each
    /// unmapped page dirty in the page cache, where fdatasync, sealing and readers find it; and
    /// `sync_tail` only ever reaches the last record, which stays mapped.
    fn release_written(&mut self) {
        let lag = release_lag(self.map.len());
        if self.len < self.released + lag + RELEASE_STEP.min(lag) {
            return;
        }
        let end = (self.len - lag) & !(PAGE - 1);
        // SAFETY: MADV_DONTNEED on a shared file mapping only unmaps pages; their contents stay
        // in the file's page cache. The range is page-aligned and inside the mapping.
        let released = unsafe {
            self.map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, self.released, end - self.released)
        };
        if released.is_ok() {
            self.released = end;
        }
    }

    /// Makes the last `n` appended bytes durable (`--audit-sync always`).
    pub fn sync_tail(&self, n: usize) -> io::Result<()> {
        self.map.flush_range(self.len - n, n)
    }

    /// Cuts the file to its records and fsyncs it: a plain JSONL file from now on.
    pub fn seal(self) -> io::Result<PathBuf> {
        let ActiveSegment { path, file, map, len, .. } = self;
        map.flush()?;
        drop(map);
        file.set_len(len as u64)?;
        file.sync_all()?;
        Ok(path)
    }
}

/// Finishes the seal of a segment a crash interrupted, or seals a damaged one as it is: cuts its
/// zero tail, and nothing before it. Returns whether it was unsealed (its last byte a zero).
pub fn finish_seal(path: &Path) -> io::Result<bool> {
    let bytes = fs::read(path)?;
    if bytes.last().is_none_or(|b| *b != 0) {
        return Ok(false);
    }
    // Never fewer bytes than are not zeros: whatever they are, damage included, is evidence.
    let valid = bytes.iter().rposition(|b| *b != 0).map_or(0, |at| at + 1);
    let file = OpenOptions::new().write(true).open(path)?;
    file.set_len(valid as u64)?;
    file.sync_all()?;
    Ok(true)
}

/// A shard's next segment file, reserved ahead of time under a name no reader lists
/// (`next.jsonl.spare` in the shard's directory).
pub struct Spare {
    path: PathBuf,
    capacity: usize,
    /// The reserved file, once the background thread has made it.
    ready: std::sync::Mutex<Option<File>>,
    /// A request is queued or being worked on: one at a time.
    requested: std::sync::atomic::AtomicBool,
    /// Shut down: a spare the background thread finishes now is removed, not kept.
    closed: std::sync::atomic::AtomicBool,
}

impl Spare {
    /// The spare for the chain in `dir`; one a previous run left behind is removed (its size may
    /// be another configuration's).
    pub fn new(dir: &Path, capacity: usize) -> Arc<Spare> {
        let path = dir.join("next.jsonl.spare");
        let _ = fs::remove_file(&path);
        Arc::new(Spare {
            path,
            capacity,
            ready: Default::default(),
            requested: Default::default(),
            closed: Default::default(),
        })
    }

    /// Asks the background thread for a spare, unless one is ready or on its way. When the
    /// thread's queue is full, or there is none, the next rotation reserves its segment itself.
    pub fn request(self: &Arc<Self>, helpers: &Helpers) {
        use std::sync::atomic::Ordering;
        let ready = self.ready.lock().unwrap_or_else(|p| p.into_inner()).is_some();
        if ready || self.closed.load(Ordering::Acquire) || self.requested.swap(true, Ordering::AcqRel) {
            return;
        }
        let spare = self.clone();
        if !helpers.offer(Box::new(move || spare.prepare())) {
            self.requested.store(false, Ordering::Release);
        }
    }

    fn prepare(&self) -> io::Result<()> {
        let made = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&self.path);
        let reserved = made.and_then(|file| ActiveSegment::reserve(&file, self.capacity).map(|()| file));
        let outcome = match reserved {
            Ok(file) => {
                let mut ready = self.ready.lock().unwrap_or_else(|p| p.into_inner());
                // Checked under the lock `remove` takes: a spare finished after shutdown began
                // gives its blocks back at once.
                if self.closed.load(std::sync::atomic::Ordering::Acquire) {
                    drop(file);
                    let _ = fs::remove_file(&self.path);
                } else {
                    *ready = Some(file);
                }
                Ok(())
            }
            Err(e) => {
                let _ = fs::remove_file(&self.path);
                Err(e)
            }
        };
        // Only now: a request seen before the file is ready would reserve it twice.
        self.requested.store(false, std::sync::atomic::Ordering::Release);
        outcome
    }

    /// Gives the reserved blocks back (at shutdown), also those of a spare the background thread
    /// is making now: it is waited for, at most `WAIT`, so that none is left after a clean exit.
    pub fn remove(&self) {
        use std::sync::atomic::Ordering;
        const WAIT: std::time::Duration = std::time::Duration::from_secs(2);
        {
            let _ready = self.ready.lock().unwrap_or_else(|p| p.into_inner());
            self.closed.store(true, Ordering::Release);
        }
        let started = std::time::Instant::now();
        while self.requested.load(Ordering::Acquire) && started.elapsed() < WAIT {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        if self.ready.lock().unwrap_or_else(|p| p.into_inner()).take().is_some() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// How many sealed segments a chain keeps, by count and by total size (`None`: no limit).
#[derive(Clone, Copy, Debug)]
pub struct Retention {
    pub segments: Option<usize>,
    pub bytes: Option<u64>,
}

/// Removes the oldest sealed segments of the chain in `dir` beyond `retention`.
fn apply_retention(dir: &Path, retention: Retention) -> io::Result<()> {
    let segments = list_segments(dir)?;
    // The newest is the active one: never removed.
    let sealed = &segments[..segments.len().saturating_sub(1)];
    let sizes: Vec<u64> = sealed.iter().map(|p| fs::metadata(p).map(|m| m.len()).unwrap_or(0)).collect();
    let mut total: u64 = sizes.iter().sum();
    let mut count = sealed.len();
    for (path, size) in sealed.iter().zip(sizes) {
        let over_count = retention.segments.is_some_and(|n| count > n);
        let over_bytes = retention.bytes.is_some_and(|b| total > b);
        if !over_count && !over_bytes {
            break;
        }
        fs::remove_file(path)?;
        count -= 1;
        total -= size;
    }
    Ok(())
}

/// What a chain asks of the helper threads (`helpers.rs`): the work is the segments', the threads
/// that run it are not. Each job runs on the sealer, or here when its queue is full, it has
/// stopped, or there is none.
impl Helpers {
    /// Seals `segment` in the background, or here when the sealer is busy or absent.
    pub fn seal(&self, segment: ActiveSegment) -> io::Result<()> {
        self.submit(Box::new(move || segment.seal().map(|_| ())))
    }

    /// Applies `retention` to the chain in `dir` (removing a 64 MiB file takes milliseconds), in
    /// the background when possible.
    pub fn retain(&self, dir: PathBuf, retention: Retention) -> io::Result<()> {
        self.submit(Box::new(move || apply_retention(&dir, retention)))
    }

    /// Makes `path`'s directory entry durable, in the background when possible.
    pub fn sync_dir(&self, path: PathBuf) -> io::Result<()> {
        self.submit(Box::new(move || sync_parent(&path)))
    }
}

fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) => File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// Where a segment's valid records end, and the last one's facts.
#[derive(Debug)]
pub struct Scan {
    /// Bytes of valid records from the start.
    pub valid_len: usize,
    pub last: Option<LineFacts>,
    pub records: u64,
}

/// Reads a segment's records in order, checking each line and the chain from `prev`.
pub fn scan(bytes: &[u8], mut prev: Option<LineFacts>) -> Scan {
    let mut at = 0;
    let mut records = 0;
    while at < bytes.len() && bytes[at] != 0 {
        let Some(end) = bytes[at..].iter().position(|b| *b == b'\n') else { break };
        let Ok(facts) = check_line(&bytes[at..at + end]) else { break };
        if prev.as_ref().is_some_and(|p| facts.prev_hash != p.hash || facts.seq != p.seq + 1) {
            break;
        }
        prev = Some(facts);
        records += 1;
        at += end + 1;
    }
    Scan { valid_len: at, last: prev, records }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_pages_keep_their_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(segment_name(1));
        let mut segment = ActiveSegment::create(path.clone(), 64 * 1024, false, &Helpers::default()).unwrap();
        let mut written = Vec::new();
        let mut i = 0u64;
        while segment.room() > 200 {
            let line = format!("{{\"record\":{i},\"pad\":\"{}\"}}\n", "x".repeat((i % 97) as usize));
            if line.len() > segment.room() {
                break;
            }
            segment.append(line.as_bytes());
            written.extend_from_slice(line.as_bytes());
            i += 1;
        }
        assert!(segment.released >= 32 * 1024, "pages were released: {}", segment.released);
        // Readers see every byte while the segment is active, and after it is sealed.
        assert_eq!(&fs::read(&path).unwrap()[..written.len()], &written[..]);
        segment.sync_tail(10).unwrap();
        let sealed = segment.seal().unwrap();
        assert_eq!(fs::read(sealed).unwrap(), written);
    }
}
