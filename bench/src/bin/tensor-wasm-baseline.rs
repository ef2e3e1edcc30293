//! The conventional server the SLO harness compares TensorWasm with: see `tensor_wasm_bench::baseline`.
//!
//! `tensor-wasm-baseline [--listen ADDR] [--threads N]`

use std::net::SocketAddr;

use clap::Parser;

#[derive(Parser)]
#[command(about = "tokio + hyper + wasmtime, a fresh non-pooled instance per request: the harness's baseline")]
struct Args {
    /// The address to serve on.
    #[arg(long, default_value = "127.0.0.1:8081")]
    listen: SocketAddr,
    /// tokio worker threads.
    #[arg(long, default_value_t = std::thread::available_parallelism().map_or(1, |n| n.get()))]
    threads: usize,
}

fn main() {
    let args = Args::parse();
    if let Err(e) = tensor_wasm_bench::baseline::serve(args.listen, args.threads) {
        eprintln!("tensor-wasm-baseline: {e}");
        std::process::exit(1);
    }
}
