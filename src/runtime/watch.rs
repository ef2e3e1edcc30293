//! Watched files: a file's version told without reading it (`Stamp`), and a thread that polls
//! a few files' stamps and reloads when one moves (`spawn_poller`, a `periodic::Periodic`). The token file, the TLS files
//! and the functions directory use them.
//!
//! Stamps follow symlinks, so a Kubernetes Secret's or ConfigMap's atomic `..data` swap (every
//! file's target moves to a new directory) shows as a change.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::periodic::Periodic;

/// A file's version, told without reading it: its device, inode, size and modification time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

/// The stamp of the file `path` names, through symlinks.
pub fn stamp(path: &Path) -> io::Result<Stamp> {
    let m = std::fs::metadata(path)?;
    Ok(Stamp {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
    })
}

/// The stamps of `paths`, `None` for a file that cannot be read.
fn stamps(paths: &[PathBuf]) -> Vec<Option<Stamp>> {
    paths.iter().map(|p| stamp(p).ok()).collect()
}

/// Starts thread `name`, which checks the stamps of `paths` every `interval` and calls
/// `reload(asked)` when one moved, or when `asked()` says a reload was asked for (SIGHUP). The
/// stamps now are the baseline: what the caller loaded already. Its owner stops it.
pub fn spawn_poller(
    name: &str,
    interval: Duration,
    paths: Vec<PathBuf>,
    asked: impl Fn() -> bool + Send + 'static,
    mut reload: impl FnMut(bool) + Send + 'static,
) -> io::Result<Periodic> {
    let mut seen = stamps(&paths);
    Periodic::spawn(name, interval, move || {
        let now = stamps(&paths);
        let asked = asked();
        if now == seen && !asked {
            return;
        }
        seen = now;
        reload(asked);
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn a_stamp_moves_with_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "a").unwrap();
        let first = stamp(&path).unwrap();
        assert_eq!(stamp(&path).unwrap(), first);
        let next = dir.path().join("g");
        std::fs::write(&next, "bb").unwrap();
        std::fs::rename(&next, &path).unwrap();
        assert_ne!(stamp(&path).unwrap(), first, "a file renamed over it");
        assert!(stamp(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn the_poller_reloads_on_a_change_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "a").unwrap();
        let reloads = Arc::new(AtomicUsize::new(0));
        let counted = reloads.clone();
        let tick = Duration::from_millis(5);
        let _poller = spawn_poller(
            "tw-test-watch",
            tick,
            vec![path.clone()],
            || false,
            move |_| {
                counted.fetch_add(1, Ordering::SeqCst);
            },
        )
        .unwrap();
        std::thread::sleep(tick * 10);
        assert_eq!(reloads.load(Ordering::SeqCst), 0, "nothing changed");
        let next = dir.path().join("g");
        std::fs::write(&next, "bb").unwrap();
        std::fs::rename(&next, &path).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while reloads.load(Ordering::SeqCst) == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(tick);
        }
        assert_eq!(reloads.load(Ordering::SeqCst), 1);
    }
}
