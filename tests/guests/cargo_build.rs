//! Builds a Rust guest of this folder for wasm32-wasip1. Shared by the integration tests
//! (tests/common/guests.rs) and the harness (bench/src/harness/guests.rs), which include this
//! file with `#[path]`: the two are separate crates, and neither should depend on the other.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Builds the guest crate in `folder` (relative to `repo`, an example's say) into
/// `repo/target/guests`, and returns the folder that then holds its `.wasm` binaries.
pub fn build_crate(repo: &Path, folder: &str, name: &str) -> Result<PathBuf, String> {
    let manifest = repo.join(format!("{folder}/Cargo.toml"));
    if !manifest.is_file() {
        return Err(format!("{} is missing", manifest.display()));
    }
    let target_dir = repo.join("target/guests");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--quiet", "--release", "--target", "wasm32-wasip1", "--manifest-path"])
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&target_dir)
        // The guest must not inherit the caller's build flags (coverage, sanitizers, ...).
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .status()
        .map_err(|e| format!("cannot run cargo to build the guest {name}: {e}"))?;
    if !status.success() {
        return Err(format!(
            "building the guest {name} failed (is the target installed? `rustup target add wasm32-wasip1`)"
        ));
    }
    Ok(target_dir.join("wasm32-wasip1/release"))
}
