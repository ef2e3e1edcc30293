//! A fuzz smoke run on the stable toolchain, for CI: each fuzz target's body (fuzz/targets.rs,
//! the code libFuzzer runs) over its committed seeds, then over random mutations of them, bounded
//! in count and time. It has no coverage guidance, so it is no substitute for `fuzz/run.sh`; it
//! runs every target's checks on thousands of malformed inputs in every CI run.
//!
//! A failing input is written to `target/fuzz-smoke/`; replay it with
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run -s none TARGET FILE` in fuzz/. `FUZZ_SMOKE_SEED=N` varies the
//! mutations, `FUZZ_SMOKE_RUNS=N` sets how many there are per target.

mod common;
#[path = "../fuzz/targets.rs"]
mod targets;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::Rng;

const DEFAULT_RUNS: usize = 100_000;
/// However many runs are asked for, a target stops after this long.
const TIME_LIMIT: Duration = Duration::from_secs(5);
const MAX_INPUT: usize = 64 * 1024;
/// Bytes that mean something to one of the grammars under test.
const INTERESTING: &[u8] = b"\0\xff\x7f\x80\n\r:,\"{}[]\\09-=* \t";

fn mutate(rng: &mut Rng, input: &mut Vec<u8>, other: &[u8]) {
    for _ in 0..1 + rng.index(4) {
        let len = input.len();
        let at = rng.index(len + 1);
        match rng.index(7) {
            0 if len > 0 => input[at.min(len - 1)] ^= 1 << rng.index(8),
            1 if len > 0 => input[at.min(len - 1)] = INTERESTING[rng.index(INTERESTING.len())],
            2 => {
                let bytes: Vec<u8> =
                    (0..1 + rng.index(8))
                        .map(|_| {
                            if rng.index(2) == 0 {
                                rng.next() as u8
                            } else {
                                INTERESTING[rng.index(INTERESTING.len())]
                            }
                        })
                        .collect();
                input.splice(at..at, bytes);
            }
            3 => {
                let end = (at + 1 + rng.index(16)).min(len);
                input.drain(at.min(end)..end);
            }
            4 if len > 0 => {
                let start = rng.index(len);
                let piece = input[start..(start + 1 + rng.index(32)).min(len)].to_vec();
                input.splice(at..at, piece);
            }
            5 if !other.is_empty() => {
                let from = rng.index(other.len());
                input.truncate(at);
                input.extend_from_slice(&other[from..]);
            }
            _ => input.truncate(at),
        }
    }
    input.truncate(MAX_INPUT);
}

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let seeds: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    seeds
}

/// Runs `input` through the target; on a panic, keeps the input and fails with how to replay it.
fn run_one(target: &str, body: fn(&[u8]), input: &[u8], what: &str) {
    if catch_unwind(AssertUnwindSafe(|| body(input))).is_ok() {
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-smoke");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("{target}-{}", what.replace(' ', "-")));
    std::fs::write(&file, input).unwrap();
    panic!("fuzz target {target} failed on {what}; the input is in {}", file.display());
}

fn smoke(target: &str) {
    let body = targets::TARGETS.iter().find(|(name, _)| *name == target).expect("a known target").1;
    let runs = std::env::var("FUZZ_SMOKE_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_RUNS);
    let seed = std::env::var("FUZZ_SMOKE_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x5eed_u64);
    // Each target its own stream, from the same seed.
    let mut rng = Rng(target.bytes().fold(seed | 1, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)) | 1);
    let seeds = seeds(target);
    for (i, input) in seeds.iter().enumerate() {
        run_one(target, body, input, &format!("seed {i}"));
    }
    // Mutants that passed feed later ones, so mutations compound; the pool stays small.
    let mut pool = seeds.clone();
    let started = Instant::now();
    let mut done = 0;
    while done < runs && started.elapsed() < TIME_LIMIT {
        let mut input = pool[rng.index(pool.len())].clone();
        let other = &seeds[rng.index(seeds.len())];
        mutate(&mut rng, &mut input, other);
        run_one(target, body, &input, &format!("seed {seed} run {done}"));
        if pool.len() < 64 {
            pool.push(input);
        } else {
            let slot = seeds.len() + rng.index(64 - seeds.len());
            pool[slot] = input;
        }
        done += 1;
    }
    eprintln!("{target}: {} seeds and {done} mutations (seed {seed}) in {:.1?}", seeds.len(), started.elapsed());
    assert!(done >= runs.min(100), "{target}: only {done} runs in {TIME_LIMIT:?}");
}

#[test]
fn http_request() {
    smoke("http_request");
}

#[test]
fn token_list() {
    smoke("token_list");
}

#[test]
fn json_bodies() {
    smoke("json_bodies");
}

#[test]
fn audit_segment() {
    smoke("audit_segment");
}

#[test]
fn manifests() {
    smoke("manifests");
}

#[test]
fn tensor_args() {
    smoke("tensor_args");
}

/// Every target in fuzz/targets.rs has a test above and seeds.
#[test]
fn every_target_is_smoked() {
    let source = std::fs::read_to_string(file!()).unwrap();
    for (name, _) in targets::TARGETS {
        assert!(source.contains(&format!("smoke(\"{name}\")")), "{name} has no smoke test");
        assert!(!seeds(name).is_empty());
    }
}
