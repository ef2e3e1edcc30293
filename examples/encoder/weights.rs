//! Writes the encoder example's seeded random weights as a safetensors file, for deploying the
//! example by hand (../README.md). The test and the harness make the same weights from the same
//! seed (model.rs).
//!
//!     cargo run -p tensor-wasm-bench --example encoder-weights -- --precision bf16 --out encoder.safetensors

use std::path::PathBuf;

use clap::Parser;

#[path = "model.rs"]
#[allow(dead_code)] // the test's reference uses the rest
mod model;

#[derive(Parser)]
#[command(about = "Writes examples/encoder's seeded random weights as a safetensors file")]
struct Args {
    /// `f32`, or `bf16` for bf16 matrices and embedding (the guest then runs mixed precision).
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    precision: String,
    /// The weights' seed: the harness's `encoder` scenario and tests/encoder.rs use 34.
    #[arg(long, default_value_t = 34)]
    seed: u64,
    /// Where to write the file.
    #[arg(long)]
    out: PathBuf,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let precision = if args.precision == "bf16" { model::Precision::Bf16 } else { model::Precision::F32 };
    let file = model::safetensors(&model::weights(model::Config::SMALL, args.seed, precision));
    match std::fs::write(&args.out, &file) {
        Ok(()) => {
            println!("wrote {} ({} bytes, {} weights)", args.out.display(), file.len(), precision.name());
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cannot write {}: {e}", args.out.display());
            std::process::ExitCode::FAILURE
        }
    }
}
