//! Segment files: a shard's chain is a series of them in its own directory, named by the `seq` of
//! their first record (`00000000000000000001.jsonl`).
//!
//! The active segment is preallocated (`posix_fallocate`) to its full size and mapped: an append
//! is a copy into the mapping, which a `kill -9` cannot lose (the page cache outlives the process)
//! and which can never fail for lack of disk, since the blocks are already reserved. Past the last
//! record the file is zeros. A sealed segment is cut to its exact length and fsynced: a plain
//! JSONL file.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::MmapMut;

use super::record::{check_line, LineError, LineFacts};

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
    map: MmapMut,
    len: usize,
    /// Bytes from the start whose pages were dropped from the mapping (see `release_written`).
    released: usize,
}

/// How much written data stays mapped behind the write position: a segment's eighth, at most
/// 8 MiB, in whole pages. Pages behind it are released, so the resident set stays bounded.
fn release_lag(capacity: usize) -> usize {
    (capacity / 8).clamp(PAGE, 8 << 20) & !(PAGE - 1)
}

const PAGE: usize = 4096;

impl ActiveSegment {
    /// Creates a new segment of `capacity` bytes, all reserved on disk. With `sync_dir` the
    /// directory entry is made durable now; otherwise the caller arranges it (see [`Sealer`]).
    pub fn create(path: PathBuf, capacity: usize, sync_dir: bool) -> io::Result<ActiveSegment> {
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(&path)?;
        Self::reserve(&file, capacity).inspect_err(|_| {
            let _ = fs::remove_file(&path);
        })?;
        if sync_dir {
            sync_parent(&path)?;
        }
        Self::map(path, file, 0)
    }

    /// Reopens an existing active segment whose valid records end at `len`, after a restart.
    pub fn reopen(path: PathBuf, len: usize, capacity: usize) -> io::Result<ActiveSegment> {
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        // Zero whatever a torn write left past the valid end, then reserve the full size again.
        file.set_len(len as u64)?;
        Self::reserve(&file, capacity.max(len))?;
        Self::map(path, file, len)
    }

    fn reserve(file: &File, capacity: usize) -> io::Result<()> {
        // SAFETY: fallocate on an fd we own.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, capacity as libc::off_t) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(())
    }

    fn map(path: PathBuf, file: File, len: usize) -> io::Result<ActiveSegment> {
        // SAFETY: the file is ours alone (one writer per shard directory) and stays open and at
        // least this long while mapped; other processes only read it.
        let map = unsafe { MmapMut::map_mut(&file)? };
        Ok(ActiveSegment { path, file: Arc::new(file), map, len, released: 0 })
    }

    pub fn room(&self) -> usize {
        self.map.len() - self.len
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The file, for the group-commit thread's fdatasync.
    pub fn file(&self) -> Arc<File> {
        self.file.clone()
    }

    /// Copies `line` in. The caller has checked `room()`.
    pub fn append(&mut self, line: &[u8]) {
        assert!(line.len() <= self.room(), "audit segment overflow");
        self.map[self.len..self.len + line.len()].copy_from_slice(line);
        self.len += line.len();
        self.release_written();
    }

    /// Drops pages written well behind the write position from the mapping, once a lag's worth
    /// has gathered. Without it every written page of a 64 MiB segment stays resident until the
    /// segment is sealed. Nothing is lost: the mapping is shared, so the kernel marks each
    /// unmapped page dirty in the page cache, where fdatasync, sealing and readers find it; and
    /// `sync_tail` only ever reaches the last record, which stays mapped.
    fn release_written(&mut self) {
        let lag = release_lag(self.map.len());
        if self.len < self.released + 2 * lag {
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

/// Finishes the seal of a segment a crash interrupted: cuts its zero tail. Returns whether it
/// was unsealed (its last byte a zero).
pub fn finish_seal(path: &Path) -> io::Result<bool> {
    let bytes = fs::read(path)?;
    if bytes.last().is_none_or(|b| *b != 0) {
        return Ok(false);
    }
    let valid = scan(&bytes, None).valid_len;
    let file = OpenOptions::new().write(true).open(path)?;
    file.set_len(valid as u64)?;
    file.sync_all()?;
    Ok(true)
}

/// Work done off the shards: sealing full segments (msync, cut, fsync) and making new segments'
/// directory entries durable. One thread per process; its queue is bounded, and when it is full
/// the shard does the work itself.
pub struct Sealer {
    tx: std::sync::mpsc::SyncSender<SealJob>,
}

enum SealJob {
    Seal(ActiveSegment),
    SyncDir(PathBuf),
    /// Answered once every job before it is done.
    Barrier(std::sync::mpsc::Sender<()>),
}

impl Sealer {
    /// The process's sealer, started on first use.
    pub fn get() -> Option<&'static Sealer> {
        static SEALER: std::sync::OnceLock<Option<Sealer>> = std::sync::OnceLock::new();
        SEALER
            .get_or_init(|| {
                let (tx, rx) = std::sync::mpsc::sync_channel::<SealJob>(64);
                let spawned = std::thread::Builder::new().name("tw-audit-seal".into()).spawn(move || {
                    while let Ok(job) = rx.recv() {
                        let result = match job {
                            SealJob::Seal(segment) => segment.seal().map(|_| ()),
                            SealJob::SyncDir(path) => sync_parent(&path),
                            SealJob::Barrier(done) => {
                                let _ = done.send(());
                                Ok(())
                            }
                        };
                        if let Err(e) = result {
                            tracing::error!("audit: background seal failed: {e}");
                        }
                    }
                });
                spawned.ok().map(|_| Sealer { tx })
            })
            .as_ref()
    }

    /// Seals `segment` in the background, or here when the sealer is busy or absent.
    pub fn seal(segment: ActiveSegment) -> io::Result<()> {
        let segment = match Self::get() {
            Some(sealer) => match sealer.tx.try_send(SealJob::Seal(segment)) {
                Ok(()) => return Ok(()),
                Err(std::sync::mpsc::TrySendError::Full(SealJob::Seal(s)))
                | Err(std::sync::mpsc::TrySendError::Disconnected(SealJob::Seal(s))) => s,
                Err(_) => return Ok(()),
            },
            None => segment,
        };
        segment.seal().map(|_| ())
    }

    /// Waits until every seal queued so far is done (at shutdown).
    pub fn flush() {
        if let Some(sealer) = Self::get() {
            let (tx, rx) = std::sync::mpsc::channel();
            if sealer.tx.send(SealJob::Barrier(tx)).is_ok() {
                let _ = rx.recv();
            }
        }
    }

    /// Makes `path`'s directory entry durable, in the background when possible.
    pub fn sync_dir(path: PathBuf) -> io::Result<()> {
        match Self::get().map(|s| s.tx.try_send(SealJob::SyncDir(path.clone()))) {
            Some(Ok(())) => Ok(()),
            _ => sync_parent(&path),
        }
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
    /// The first invalid record, if any, at `valid_len`: zeros past the end are not one.
    pub damage: Option<LineError>,
}

/// Reads a segment's records in order, checking each line and the chain from `prev`.
pub fn scan(bytes: &[u8], mut prev: Option<LineFacts>) -> Scan {
    let mut at = 0;
    let mut records = 0;
    while at < bytes.len() && bytes[at] != 0 {
        let Some(end) = bytes[at..].iter().position(|b| *b == b'\n') else {
            return Scan { valid_len: at, last: prev, records, damage: Some(LineError::Torn) };
        };
        let line = &bytes[at..at + end];
        let facts = match check_line(line) {
            Ok(f) => f,
            Err(e) => return Scan { valid_len: at, last: prev, records, damage: Some(e) },
        };
        if let Some(p) = &prev {
            if facts.prev_hash != p.hash || facts.seq != p.seq + 1 {
                return Scan { valid_len: at, last: prev, records, damage: Some(LineError::Malformed("chain broken")) };
            }
        }
        prev = Some(facts);
        records += 1;
        at += end + 1;
    }
    Scan { valid_len: at, last: prev, records, damage: None }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_pages_keep_their_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(segment_name(1));
        let mut segment = ActiveSegment::create(path.clone(), 64 * 1024, false).unwrap();
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
