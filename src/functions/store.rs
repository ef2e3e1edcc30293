use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::record::{hex, FunctionRecord};
use crate::functions::PipelineRecord;

/// Header of a stored precompiled artifact: magic, then the SHA-256 of the payload. wasmtime trusts
/// the bytes it deserializes, so a corrupt artifact must be caught before it gets there.
const ARTIFACT_MAGIC: &[u8; 8] = b"TWART01\n";

/// An exclusive lock on a data dir, held for as long as a server uses it: a second server on
/// the same directory (a rolling update over a ReadWriteOnce volume, an operator's slip) would
/// take the other's freshly written module for an orphan, and both would append to one audit
/// chain. Released by the kernel when the process exits, however it exits.
pub struct DataDirLock {
    _file: File,
}

impl DataDirLock {
    /// Locks `root` (creating it and its `.lock` file if needed); fails at once when another
    /// process holds it.
    pub fn acquire(root: &Path) -> io::Result<DataDirLock> {
        use std::os::fd::AsRawFd as _;
        fs::create_dir_all(root)?;
        let file = fs::OpenOptions::new().create(true).truncate(false).write(true).open(root.join(".lock"))?;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(io::Error::new(io::ErrorKind::WouldBlock, "another tensor-wasm process is using it"));
            }
            return Err(e);
        }
        Ok(DataDirLock { _file: file })
    }
}

/// What [`FunctionStore::sweep`] removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    pub temp_files: usize,
    pub orphaned_modules: usize,
}

/// The data dir:
/// ```text
/// modules/<sha256-hex>.wasm    the module as deployed
/// modules/<sha256-hex>.cwasm   its precompiled artifact (magic, checksum, wasmtime bytes); a
///                              functions-directory module has this alone
/// modules/<sha256-hex>.safetensors  a function's resident tensors, as deployed
/// functions/<id>.json          one record per function
/// pipelines/<id>.json          one record per pipeline
/// ```
/// Functions and pipelines from the functions directory are not stored: the directory is theirs.
#[derive(Debug, Clone)]
pub struct FunctionStore {
    /// The largest module file read back (`--max-body-bytes` in the server); artifacts may be
    /// `ARTIFACT_TO_MODULE` times that. A larger file is no module this server stored.
    max_module_bytes: u64,
    modules: PathBuf,
    functions: PathBuf,
    pipelines: PathBuf,
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// `sha256:<hex>` as shown by the API.
pub fn digest_of(wasm: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(wasm))
}

/// `name` as a file name in one of the store's folders: itself when it is one plain name (letters,
/// digits, `-`, `_`, not starting with `.`), else a name derived from its hash. Ids and digests
/// reach here from the API, the functions directory and a fleet's registry, all checked before;
/// this is the store's own guarantee that none of them ever names a path outside its folder.
fn stem(name: &str) -> std::borrow::Cow<'_, str> {
    let plain = !name.is_empty()
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if plain {
        std::borrow::Cow::Borrowed(name)
    } else {
        std::borrow::Cow::Owned(format!("unsafe-name-{}", sha256_hex(name.as_bytes())))
    }
}

fn digest_hex(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

/// The marker file of a data dir that was in step with a fleet's registry once.
const REGISTRY_SYNCED: &str = "registry-synced";

impl FunctionStore {
    /// Opens (creating if needed) the data dir.
    pub fn open(root: &Path) -> io::Result<Self> {
        let store = FunctionStore {
            max_module_bytes: u64::MAX / ARTIFACT_TO_MODULE,
            modules: root.join("modules"),
            functions: root.join("functions"),
            pipelines: root.join("pipelines"),
        };
        for dir in [&store.modules, &store.functions, &store.pipelines] {
            fs::create_dir_all(dir)?;
        }
        Ok(store)
    }

    /// When this data dir was last in step with a fleet's registry (`mark_registry_synced`), in
    /// Unix ms, and which bucket that was; `None` if never: only then is it a cache a replica may
    /// serve from while NATS is away.
    pub fn registry_synced_at(&self) -> Option<(u64, String)> {
        let root = self.functions.parent()?;
        let text = fs::read_to_string(root.join(REGISTRY_SYNCED)).ok()?;
        let (at, bucket) = text.trim().split_once(' ')?;
        Some((at.parse().ok()?, bucket.to_string()))
    }

    /// Records that the catalog here was in step with the registry's `bucket` (its identity: its
    /// creation time) at `unix_ms`.
    pub fn mark_registry_synced(&self, unix_ms: u64, bucket: &str) -> io::Result<()> {
        let root = self.functions.parent().ok_or_else(|| io::Error::other("the data dir has no root"))?;
        write_atomic(&root.join(REGISTRY_SYNCED), format!("{unix_ms} {bucket}").as_bytes())
    }

    /// Reads no module file over `bytes`, and no artifact over `ARTIFACT_TO_MODULE` times that.
    pub fn with_max_module_bytes(mut self, bytes: u64) -> Self {
        self.max_module_bytes = bytes.min(u64::MAX / ARTIFACT_TO_MODULE);
        self
    }

    /// Removes what a crash can leave behind: temp files of writes cut short, and stored modules
    /// (with their artifacts) that no record in `referenced` uses, such as a deploy's module
    /// written before a kill -9 kept its record from being written. Run at start-up, before
    /// anything else writes. Artifacts without a module are the functions directory's, swept with
    /// it. Without `orphans`, modules are left alone: when a record is unreadable, `referenced`
    /// is not the whole truth, and a module is not deleted on a guess.
    pub fn sweep(&self, referenced: &HashSet<&str>, orphans: bool) -> io::Result<Swept> {
        let mut swept = Swept::default();
        for dir in [&self.modules, &self.functions, &self.pipelines] {
            for entry in fs::read_dir(dir)? {
                let entry = entry?;
                if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                    // One that cannot go (a directory of that name, a permission) stops nothing.
                    match remove_if_present(&entry.path()) {
                        Ok(()) => swept.temp_files += 1,
                        Err(e) => tracing::warn!(file = %entry.path().display(), "cannot remove a temp file: {e}"),
                    }
                }
            }
        }
        let modules: Vec<io::Result<fs::DirEntry>> =
            if orphans { fs::read_dir(&self.modules)?.collect() } else { Vec::new() };
        for entry in modules {
            let path = entry?.path();
            if let Some(hex) = stored_hex(&path, "safetensors") {
                if !referenced.contains(format!("sha256:{hex}").as_str()) {
                    match remove_if_present(&path) {
                        Ok(()) => swept.orphaned_modules += 1,
                        Err(e) => tracing::warn!(file = %path.display(), "cannot remove orphaned tensors: {e}"),
                    }
                }
                continue;
            }
            let Some(hex) = stored_hex(&path, "wasm") else { continue };
            if !referenced.contains(format!("sha256:{hex}").as_str()) {
                match remove_if_present(&path.with_extension("cwasm")).and_then(|()| remove_if_present(&path)) {
                    Ok(()) => swept.orphaned_modules += 1,
                    Err(e) => tracing::warn!(file = %path.display(), "cannot remove an orphaned module: {e}"),
                }
            }
        }
        if swept != Swept::default() {
            sync_dir(&self.modules)?;
        }
        Ok(swept)
    }

    fn module_path(&self, digest: &str) -> PathBuf {
        self.modules.join(format!("{}.wasm", stem(digest_hex(digest))))
    }

    fn artifact_path(&self, digest: &str) -> PathBuf {
        self.modules.join(format!("{}.cwasm", stem(digest_hex(digest))))
    }

    fn tensors_path(&self, digest: &str) -> PathBuf {
        self.modules.join(format!("{}.safetensors", stem(digest_hex(digest))))
    }

    /// Stores a function's safetensors file under its digest.
    pub fn write_tensors(&self, digest: &str, file: &[u8]) -> io::Result<()> {
        write_atomic(&self.tensors_path(digest), file)
    }

    /// A stored safetensors file, if present, at most `max_bytes`, and matching its digest.
    pub fn read_tensors(&self, digest: &str, max_bytes: u64) -> io::Result<Vec<u8>> {
        let bytes = read_stored(&self.tensors_path(digest), max_bytes)?;
        if sha256_hex(&bytes) != digest_hex(digest) {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "not the bytes of its digest"));
        }
        Ok(bytes)
    }

    /// Bytes a stored safetensors file takes (0 when absent).
    pub fn tensors_bytes(&self, digest: &str) -> u64 {
        fs::metadata(self.tensors_path(digest)).map(|m| m.len()).unwrap_or(0)
    }

    pub fn remove_tensors(&self, digest: &str) -> io::Result<()> {
        remove_if_present(&self.tensors_path(digest))?;
        sync_dir(&self.modules)
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.functions.join(format!("{}.json", stem(id)))
    }

    pub fn write_module(&self, digest: &str, wasm: &[u8]) -> io::Result<()> {
        write_atomic(&self.module_path(digest), wasm)
    }

    /// Checks the module's file against its digest, streaming it through the hash: `Ok` only for
    /// a file that holds exactly the deployed bytes. "Already stored" means this, never that a
    /// file of that name exists.
    pub fn verify_module(&self, digest: &str) -> io::Result<()> {
        let mut file = open_stored(&self.module_path(digest), self.max_module_bytes)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => hasher.update(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if hex(&hasher.finalize()) != digest_hex(digest) {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "not the bytes of its digest"));
        }
        Ok(())
    }

    /// The module's bytes, if present and matching their digest.
    pub fn read_module(&self, digest: &str) -> io::Result<Vec<u8>> {
        let bytes = read_stored(&self.module_path(digest), self.max_module_bytes)?;
        if sha256_hex(&bytes) != digest_hex(digest) {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "not the bytes of its digest"));
        }
        Ok(bytes)
    }

    /// Bytes the module and its artifact take on disk (0 for a file that is not there).
    pub fn stored_bytes(&self, digest: &str) -> u64 {
        let len = |p: PathBuf| fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        len(self.module_path(digest)) + len(self.artifact_path(digest))
    }

    /// Free bytes on the file system that holds the store, for unprivileged writers.
    pub fn free_bytes(&self) -> io::Result<u64> {
        free_bytes(&self.modules)
    }

    pub fn write_artifact(&self, digest: &str, artifact: &[u8]) -> io::Result<()> {
        let mut framed = Vec::with_capacity(ARTIFACT_MAGIC.len() + 32 + artifact.len());
        framed.extend_from_slice(ARTIFACT_MAGIC);
        framed.extend_from_slice(&Sha256::digest(artifact));
        framed.extend_from_slice(artifact);
        // Not fsynced: an artifact is rebuilt from its module, and one cut short by a crash fails
        // its checksum and is compiled again. That keeps fsyncs off a folder reload.
        write_by_rename(&self.artifact_path(digest), &framed, false)
    }

    /// The artifact's wasmtime bytes, if present and intact.
    pub fn read_artifact(&self, digest: &str) -> io::Result<Vec<u8>> {
        let mut framed = read_stored(&self.artifact_path(digest), self.max_module_bytes * ARTIFACT_TO_MODULE)?;
        let header = ARTIFACT_MAGIC.len() + 32;
        let intact = framed.len() >= header
            && &framed[..ARTIFACT_MAGIC.len()] == ARTIFACT_MAGIC
            && Sha256::digest(&framed[header..]).as_slice() == &framed[ARTIFACT_MAGIC.len()..header];
        if !intact {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "artifact checksum mismatch"));
        }
        framed.drain(..header);
        Ok(framed)
    }

    /// Digests (`sha256:<hex>`) of the artifacts with no module beside them: those of
    /// functions-directory modules, whose bytes live in the folder.
    pub fn artifacts_without_module(&self) -> io::Result<Vec<String>> {
        let mut digests = Vec::new();
        for entry in fs::read_dir(&self.modules)? {
            let path = entry?.path();
            let Some(hex) = stored_hex(&path, "cwasm") else { continue };
            if !path.with_extension("wasm").exists() {
                digests.push(format!("sha256:{hex}"));
            }
        }
        Ok(digests)
    }

    /// Not fsynced either: an unused artifact that reappears after a crash is swept again.
    pub fn remove_artifact(&self, digest: &str) -> io::Result<()> {
        remove_if_present(&self.artifact_path(digest))
    }

    /// Removes the module's bytes and its artifact.
    pub fn remove_module(&self, digest: &str) -> io::Result<()> {
        self.remove_artifact(digest)?;
        self.remove_module_bytes(digest)
    }

    /// Removes the module's bytes and keeps its artifact, which is then a functions-directory
    /// module's (see [`Self::artifacts_without_module`]).
    pub fn remove_module_bytes(&self, digest: &str) -> io::Result<()> {
        remove_if_present(&self.module_path(digest))?;
        sync_dir(&self.modules)
    }

    pub fn write_record(&self, record: &FunctionRecord) -> io::Result<()> {
        let json = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
        write_atomic(&self.record_path(&record.id), &json)
    }

    pub fn remove_record(&self, id: &str) -> io::Result<()> {
        fs::remove_file(self.record_path(id))?;
        sync_dir(&self.functions)
    }

    /// Every stored function record; unreadable ones are returned as errors naming their file.
    pub fn list_records(&self) -> io::Result<Vec<Result<FunctionRecord, String>>> {
        list_json(&self.functions)
    }

    pub fn write_pipeline(&self, pipeline: &PipelineRecord) -> io::Result<()> {
        let json = serde_json::to_vec_pretty(pipeline).map_err(io::Error::other)?;
        write_atomic(&self.pipelines.join(format!("{}.json", stem(&pipeline.id))), &json)
    }

    pub fn remove_pipeline(&self, id: &str) -> io::Result<()> {
        fs::remove_file(self.pipelines.join(format!("{}.json", stem(id))))?;
        sync_dir(&self.pipelines)
    }

    /// Every stored pipeline, as `list_records`.
    pub fn list_pipelines(&self) -> io::Result<Vec<Result<PipelineRecord, String>>> {
        list_json(&self.pipelines)
    }
}

/// The largest function or pipeline record read back: a record is its settings, names and an
/// environment of at most 16 KiB (`record::MAX_ENV_BYTES`); anything near this is no record.
const MAX_RECORD_BYTES: u64 = 1 << 20;

/// How much larger than its module an artifact may be: compiled code runs to a few times the
/// wasm's size (100,000 small functions: 21 MB from 2.6 MB, perf/HOSTILE.md).
const ARTIFACT_TO_MODULE: u64 = 16;

/// Opens a file the store wrote, refusing anything else an insider may have put under its name:
/// a symlink (to /dev/zero, say, which would hash forever), a FIFO (whose open would block), a
/// directory, or a file over `max_bytes` (which would be read whole into memory).
fn open_stored(path: &Path, max_bytes: u64) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let opened = fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path);
    let file = match opened {
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "a symbolic link, not a regular file"));
        }
        other => other?,
    };
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not a regular file"));
    }
    if meta.len() > max_bytes {
        let why = format!("{} bytes, more than the {max_bytes} a stored file may have", meta.len());
        return Err(io::Error::new(io::ErrorKind::InvalidData, why));
    }
    Ok(file)
}

fn read_stored(path: &Path, max_bytes: u64) -> io::Result<Vec<u8>> {
    let mut file = open_stored(path, max_bytes)?;
    let mut bytes = Vec::new();
    // At most one byte past the cap, should the file grow after the check.
    (&mut file).take(max_bytes.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max_bytes {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "grew past the size a stored file may have"));
    }
    Ok(bytes)
}

/// What is wrong with a stored file, after "the module file is": "missing", or why it is no
/// good.
pub fn describe(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::NotFound => "missing".into(),
        io::ErrorKind::InvalidData => e.to_string(),
        _ => format!("unreadable ({e})"),
    }
}

/// Free bytes on the file system that holds `path`, for unprivileged writers.
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    let path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a statvfs the call fills in.
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stat.f_bavail as u64 * stat.f_frsize as u64)
}

/// The hex digest that names `path`, a stored file with `extension`; `None` for anything else (a
/// temp file of a write in progress among them).
fn stored_hex<'a>(path: &'a Path, extension: &str) -> Option<&'a str> {
    let hex = path.file_stem()?.to_str()?;
    let named = path.extension().is_some_and(|e| e == extension)
        && hex.len() == 64
        && hex.bytes().all(|b| b.is_ascii_hexdigit());
    named.then_some(hex)
}

fn list_json<T: serde::de::DeserializeOwned>(dir: &Path) -> io::Result<Vec<Result<T, String>>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        // A temp file is a write cut short, never a record (`write_by_rename`; `sweep` removes it).
        let temp = path.file_name().is_some_and(|n| n.to_string_lossy().starts_with(".tmp-"));
        if temp || path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let parsed = read_stored(&path, MAX_RECORD_BYTES)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<T>(&b).map_err(|e| e.to_string()))
            .map_err(|e| format!("{}: {e}", path.display()));
        out.push(parsed);
    }
    Ok(out)
}

/// Removes `path`; one already gone is not an error.
fn remove_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Writes `bytes` to `path` so that a crash leaves either the old file or the new one: a temp
/// file in the same directory, fsynced, renamed over the target, and the directory fsynced.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_by_rename(path, bytes, true)
}

/// Writes `bytes` to a temporary file beside `path` and renames it over `path`, so that readers
/// see the old bytes or the new ones, never a mix; with `durable`, fsyncs the file and then the
/// directory, so that the new bytes survive a crash once this returns.
fn write_by_rename(path: &Path, bytes: &[u8], durable: bool) -> io::Result<()> {
    let dir = path.parent().ok_or_else(|| io::Error::other("path has no parent"))?;
    let name = path.file_name().ok_or_else(|| io::Error::other("path has no file name"))?;
    let tmp = dir.join(format!(".tmp-{}-{}", super::record::new_id(), name.to_string_lossy()));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        if durable {
            f.sync_all()?;
        }
        fs::rename(&tmp, path)?;
        if durable {
            sync_dir(dir)?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn artifacts_are_verified() {
        let dir = tempfile::tempdir().unwrap();
        let store = FunctionStore::open(dir.path()).unwrap();
        let digest = digest_of(b"module");
        store.write_artifact(&digest, b"compiled bytes").unwrap();
        assert_eq!(store.read_artifact(&digest).unwrap(), b"compiled bytes");
        let path = store.artifact_path(&digest);
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&path, bytes).unwrap();
        assert_eq!(store.read_artifact(&digest).unwrap_err().kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn module_digest_is_checked_and_temp_files_swept() {
        let dir = tempfile::tempdir().unwrap();
        let store = FunctionStore::open(dir.path()).unwrap();
        let digest = digest_of(b"abc");
        store.write_module(&digest, b"abc").unwrap();
        assert_eq!(store.read_module(&digest).unwrap(), b"abc");
        fs::write(store.module_path(&digest), b"abd").unwrap();
        assert!(store.read_module(&digest).is_err());
        assert_eq!(store.verify_module(&digest).unwrap_err().kind(), io::ErrorKind::InvalidData);
        fs::write(store.module_path(&digest), b"abc").unwrap();
        store.verify_module(&digest).unwrap();
        fs::remove_file(store.module_path(&digest)).unwrap();
        assert_eq!(store.verify_module(&digest).unwrap_err().kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn sweep_removes_temp_files_and_orphans_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = FunctionStore::open(dir.path()).unwrap();
        let (kept, orphan, folder) = (digest_of(b"kept"), digest_of(b"orphan"), digest_of(b"folder"));
        for d in [&kept, &orphan] {
            store.write_module(d, d.as_bytes()).unwrap();
            store.write_artifact(d, b"compiled").unwrap();
        }
        store.write_artifact(&folder, b"compiled").unwrap();
        fs::write(dir.path().join("functions/.tmp-x-y.json"), b"{").unwrap();
        fs::write(dir.path().join("modules/notes.txt"), b"an operator's").unwrap();

        // With a record unreadable, no module is taken for an orphan.
        assert_eq!(
            store.sweep(&HashSet::from([kept.as_str()]), false).unwrap(),
            Swept { temp_files: 1, orphaned_modules: 0 }
        );
        assert!(store.module_path(&orphan).exists());
        let swept = store.sweep(&HashSet::from([kept.as_str()]), true).unwrap();
        assert_eq!(swept, Swept { temp_files: 0, orphaned_modules: 1 });
        assert!(!dir.path().join("functions/.tmp-x-y.json").exists());
        assert!(!store.module_path(&orphan).exists() && !store.artifact_path(&orphan).exists());
        assert!(store.module_path(&kept).exists() && store.artifact_path(&kept).exists());
        assert!(store.artifact_path(&folder).exists() && dir.path().join("modules/notes.txt").exists());
        assert_eq!(store.sweep(&HashSet::from([kept.as_str()]), true).unwrap(), Swept::default());
    }

    #[test]
    fn only_artifacts_without_their_module_are_the_folders() {
        let dir = tempfile::tempdir().unwrap();
        let store = FunctionStore::open(dir.path()).unwrap();
        let (stored, folder) = (digest_of(b"stored"), digest_of(b"folder"));
        store.write_module(&stored, b"stored").unwrap();
        store.write_artifact(&stored, b"compiled").unwrap();
        store.write_artifact(&folder, b"compiled").unwrap();
        // A write cut short by a crash leaves a temp file, which is not an artifact.
        fs::write(dir.path().join(format!("modules/.tmp-x-{}.cwasm", sha256_hex(b"other"))), b"").unwrap();
        assert_eq!(store.artifacts_without_module().unwrap(), std::slice::from_ref(&folder));
        store.remove_artifact(&folder).unwrap();
        store.remove_artifact(&folder).unwrap();
        assert!(store.artifacts_without_module().unwrap().is_empty());
        assert!(store.read_artifact(&stored).is_ok());
    }
}
