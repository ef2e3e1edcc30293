//! The functions directory (`--functions-dir`): what is in it, and which files changed.
//!
//! ```text
//! NAME.wasm            a function, named NAME
//! NAME.toml            its optional manifest (functions::manifest)
//! NAME.safetensors     its optional resident tensors (`tensor_weight`)
//! NAME.pipeline.toml   a pipeline, named NAME (functions::pipeline::PipelineSpec)
//! ```
//!
//! The catalog worker lists it every `--functions-dir-poll-ms` and compares each file's [`Stamp`]
//! with the one it last loaded. Stamps follow symlinks, so a Kubernetes ConfigMap volume's atomic
//! `..data` swap (every file's target moves to a new directory) shows as a change of every file.
//! Hidden entries (`..data`, `..2024_…`) are that mechanism's internals and are skipped.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use super::record::validate_name;

/// Most bytes of a manifest read.
pub const MAX_MANIFEST_BYTES: u64 = 64 * 1024;

pub use crate::runtime::watch::{stamp, Stamp};

/// A function's files.
#[derive(Debug, PartialEq, Eq)]
pub struct FunctionFiles {
    pub wasm: PathBuf,
    pub manifest: Option<PathBuf>,
    pub tensors: Option<PathBuf>,
}

/// A function's files' stamps: module, manifest, tensors.
pub type FileStamps = (Stamp, Option<Stamp>, Option<Stamp>);

impl FunctionFiles {
    /// Every file's stamp; a change in any reloads the function.
    pub fn stamps(&self) -> io::Result<FileStamps> {
        let optional = |p: &Option<PathBuf>| p.as_deref().map(stamp).transpose();
        Ok((stamp(&self.wasm)?, optional(&self.manifest)?, optional(&self.tensors)?))
    }
}

/// The directory's contents, by name.
#[derive(Debug, Default)]
pub struct Listing {
    pub functions: BTreeMap<String, FunctionFiles>,
    pub pipelines: BTreeMap<String, PathBuf>,
    /// Files that look meant for us but cannot be used, and why.
    pub ignored: Vec<(String, String)>,
}

/// Lists `root`. Files of other kinds (a README) are left alone.
pub fn list(root: &Path) -> io::Result<Listing> {
    let mut listing = Listing::default();
    let mut manifests = BTreeMap::new();
    let mut tensor_files = BTreeMap::new();
    for entry in std::fs::read_dir(root)? {
        let entry = entry?;
        let Ok(file) = entry.file_name().into_string() else { continue };
        if file.starts_with('.') {
            continue;
        }
        let path = entry.path();
        let (name, kind) = if let Some(name) = file.strip_suffix(".pipeline.toml") {
            (name, Kind::Pipeline)
        } else if let Some(name) = file.strip_suffix(".wasm") {
            (name, Kind::Module)
        } else if let Some(name) = file.strip_suffix(".toml") {
            (name, Kind::Manifest)
        } else if let Some(name) = file.strip_suffix(".safetensors") {
            (name, Kind::Tensors)
        } else {
            continue;
        };
        if let Err(e) = validate_name(name) {
            listing.ignored.push((file.clone(), format!("the name is not usable: {e}")));
            continue;
        }
        let name = name.to_string();
        match kind {
            Kind::Module => {
                listing.functions.insert(name, FunctionFiles { wasm: path, manifest: None, tensors: None });
            }
            Kind::Manifest => {
                manifests.insert(name, path);
            }
            Kind::Tensors => {
                tensor_files.insert(name, path);
            }
            Kind::Pipeline => {
                listing.pipelines.insert(name, path);
            }
        }
    }
    for (name, path) in manifests {
        match listing.functions.get_mut(&name) {
            Some(files) => files.manifest = Some(path),
            None => listing.ignored.push((format!("{name}.toml"), format!("there is no {name}.wasm beside it"))),
        }
    }
    for (name, path) in tensor_files {
        match listing.functions.get_mut(&name) {
            Some(files) => files.tensors = Some(path),
            None => listing.ignored.push((format!("{name}.safetensors"), format!("there is no {name}.wasm beside it"))),
        }
    }
    Ok(listing)
}

enum Kind {
    Module,
    Manifest,
    Tensors,
    Pipeline,
}

/// A file's bytes, refusing one larger than `limit` without reading past it.
pub fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(limit + 1).read_to_end(&mut bytes))
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if bytes.len() as u64 > limit {
        return Err(format!("{} is larger than {limit} bytes", path.display()));
    }
    Ok(bytes)
}

/// A manifest's text, refusing anything larger than [`MAX_MANIFEST_BYTES`].
pub fn read_manifest(path: &Path) -> Result<String, String> {
    String::from_utf8(read_limited(path, MAX_MANIFEST_BYTES)?).map_err(|_| format!("{} is not UTF-8", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_what_is_ours() {
        let dir = tempfile::tempdir().unwrap();
        for file in ["a.wasm", "a.toml", "b.wasm", "orphan.toml", "chain.pipeline.toml", "README.md", "bad name.wasm"] {
            std::fs::write(dir.path().join(file), b"").unwrap();
        }
        std::fs::create_dir(dir.path().join("..data")).unwrap();
        let l = list(dir.path()).unwrap();
        assert_eq!(l.functions.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(l.functions["a"].manifest, Some(dir.path().join("a.toml")));
        assert_eq!(l.functions["b"].manifest, None);
        assert_eq!(l.pipelines.keys().collect::<Vec<_>>(), ["chain"]);
        let ignored: Vec<_> = l.ignored.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(ignored, ["bad name.wasm", "orphan.toml"]);
    }

    #[test]
    fn stamps_follow_symlink_swaps() {
        let dir = tempfile::tempdir().unwrap();
        let (v1, v2) = (dir.path().join("..v1"), dir.path().join("..v2"));
        for v in [&v1, &v2] {
            std::fs::create_dir(v).unwrap();
            std::fs::write(v.join("f.wasm"), b"same size").unwrap();
        }
        std::os::unix::fs::symlink("..v1", dir.path().join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/f.wasm", dir.path().join("f.wasm")).unwrap();
        let before = stamp(&dir.path().join("f.wasm")).unwrap();
        std::os::unix::fs::symlink("..v2", dir.path().join("..data_tmp")).unwrap();
        std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
        assert_ne!(before, stamp(&dir.path().join("f.wasm")).unwrap());
    }
}
