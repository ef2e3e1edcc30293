//! How fast stored functions serve again after a restart: 1,000 functions (distinct modules) are
//! deployed into a data dir, then the catalog worker loads them from disk (reusing the
//! precompiled artifacts) and a shard pre-links every one of them.
//!
//! Protects: a restart with 1,000 stored functions ready in ≤ 1 s (perf/CORE.md).
//!
//! `cargo bench -p tensor-wasm-bench --bench catalog_load`
//! With `TW_BENCH_DATA_DIR=DIR` the data dir is kept there, to time a real server start on it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use tensor_wasm::catalog::{
    spawn_worker, Catalog, DeployRequest, FunctionCache, FunctionStore, RegistryConfig, Spawned,
};
use tensor_wasm::guest::GuestProfiler;
use tensor_wasm::settings::Limits;

const FUNCTIONS: usize = 1_000;
const ROUNDS: usize = 5;

fn main() {
    let temp = tempfile::tempdir().unwrap();
    let dir = std::env::var_os("TW_BENCH_DATA_DIR").map(Into::into).unwrap_or_else(|| temp.path().to_path_buf());
    let config = tensor_wasm_bench::default_config();
    // Compiles in-process: this binary is not `tensor-wasm`, whose compile child the server runs.
    let limits = Arc::new(Limits { compile_budget: None, ..config.limits.clone() });
    let engine = tensor_wasm::guest::build_engine(&limits, GuestProfiler::Off).unwrap();

    // Deploy.
    let catalog = Arc::new(Catalog::default());
    let store = FunctionStore::open(&dir).unwrap();
    let spawn = |store, catalog: &Arc<Catalog>| {
        let Spawned { admin, thread, .. } = spawn_worker(
            engine.clone(),
            store,
            catalog.clone(),
            limits.clone(),
            (64, 16),
            None,
            GuestProfiler::Off,
            RegistryConfig::File,
        )
        .unwrap();
        (admin, thread)
    };
    let (admin, thread) = spawn(store, &catalog);
    let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().enable_timer().build().unwrap();
    let deploy_started = Instant::now();
    let ids: Vec<String> = rt.block_on(async {
        let mut ids = Vec::with_capacity(FUNCTIONS);
        for i in 0..FUNCTIONS {
            let wat = format!(r#"(module (global (export "n") i32 (i32.const {i})) (func (export "_start")))"#);
            let b64 = base64::engine::general_purpose::STANDARD.encode(wat::parse_str(&wat).unwrap());
            let body = serde_json::json!({"name": format!("f{i}"), "wasm_b64": b64}).to_string().into_bytes();
            let record = admin.deploy(DeployRequest { body, tenant_id: 0 }).await.unwrap();
            ids.push(record.id);
        }
        ids
    });
    let deploy_took = deploy_started.elapsed();
    drop(admin);
    thread.join().unwrap();

    println!("{FUNCTIONS} functions deployed in {:.2} s", deploy_took.as_secs_f64());
    println!("| round | load from disk (ms) | pre-link on one shard (ms) | total (ms) |");
    println!("| --- | --- | --- | --- |");
    let mut totals = Vec::new();
    for round in 0..ROUNDS {
        let catalog = Arc::new(Catalog::default());
        let store = FunctionStore::open(&dir).unwrap();
        let started = Instant::now();
        let (admin, thread) = spawn(store, &catalog);
        while !catalog.is_loaded() {
            std::thread::sleep(Duration::from_micros(100));
        }
        let loaded = started.elapsed();
        assert_eq!(catalog.len(), FUNCTIONS);
        let cache = FunctionCache::new(&engine).unwrap();
        for id in &ids {
            assert!(cache.get(&catalog, 0, id).is_ok());
        }
        let total = started.elapsed();
        println!(
            "| {round} | {:.1} | {:.1} | {:.1} |",
            loaded.as_secs_f64() * 1e3,
            (total - loaded).as_secs_f64() * 1e3,
            total.as_secs_f64() * 1e3
        );
        totals.push(total);
        drop(admin);
        thread.join().unwrap();
    }
    totals.sort();
    println!(
        "median total: {:.1} ms, worst: {:.1} ms",
        totals[ROUNDS / 2].as_secs_f64() * 1e3,
        totals[ROUNDS - 1].as_secs_f64() * 1e3
    );
}
