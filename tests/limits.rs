//! Limits that were constants outside `config` and are now flags, the guest slice and the
//! compile's budget and priority: each reaches the configuration, refuses a value it cannot
//! honour, and where a guest can reach it, holds.

mod common;

use std::time::Duration;

use common::{guests, Server};
use tensor_wasm::cli::serve_config;
use tensor_wasm::config::CompilePriority;

#[test]
fn the_flags_reach_the_configuration() {
    let config = serve_config([
        "--max-tensor-elements",
        "1000",
        "--dispatch-max-tickets-per-shard",
        "8",
        "--dispatch-worker-spin-us",
        "0",
        "--max-table-elements",
        "64",
        "--guest-slice-us",
        "250",
        "--compile-timeout-ms",
        "5000",
        "--compile-wall-timeout-ms",
        "5000",
        "--compile-priority",
        "19",
    ])
    .unwrap();
    assert_eq!(config.dispatch.max_tensor_elements, 1000);
    assert_eq!(config.dispatch.max_tickets_per_shard, 8);
    assert!(config.dispatch.worker_spin.is_zero());
    assert_eq!(config.limits.max_table_elements, 64);
    assert_eq!(config.limits.guest_slice(), std::time::Duration::from_micros(250));
    let budget = config.limits.compile_budget.unwrap();
    assert_eq!((budget.cpu, budget.wall), (Duration::from_secs(5), Duration::from_secs(5)));
    assert_eq!(budget.priority, CompilePriority::Nice(19));

    let defaults = serve_config(Vec::<String>::new()).unwrap();
    assert_eq!(defaults.dispatch.max_tensor_elements, 64 << 20);
    assert_eq!(defaults.dispatch.max_tickets_per_shard, 4096);
    assert_eq!(defaults.dispatch.worker_spin, std::time::Duration::from_micros(50));
    assert_eq!(defaults.limits.max_table_elements, 20_000);
    assert_eq!(defaults.limits.guest_slice(), std::time::Duration::from_micros(100));
    let budget = defaults.limits.compile_budget.unwrap();
    assert_eq!((budget.cpu, budget.wall), (Duration::from_secs(30), Duration::from_secs(120)));
    assert_eq!(budget.priority, CompilePriority::Idle);
    assert_eq!(
        serve_config(["--compile-priority", "0"]).unwrap().limits.compile_budget.unwrap().priority,
        CompilePriority::Nice(0)
    );
}

#[test]
fn values_that_cannot_be_honoured_are_refused() {
    for (flag, value) in [
        ("--max-tensor-elements", "0"),
        ("--max-tensor-elements", "4294967296"),
        ("--dispatch-max-tickets-per-shard", "0"),
        ("--dispatch-max-tickets-per-shard", "65535"),
        ("--max-table-elements", "0"),
        ("--dispatch-worker-spin-us", "-1"),
        // Under ten microseconds, or longer than the (1 ms) epoch tick it shortens.
        ("--guest-slice-us", "9"),
        ("--guest-slice-us", "1001"),
        // Neither `idle` nor a nice value a process may lower itself to.
        ("--compile-priority", "20"),
        ("--compile-priority", "-1"),
        ("--compile-priority", "batch"),
        ("--compile-timeout-ms", "0"),
        // Below the default CPU budget (30 s): a compile could never use all of it.
        ("--compile-wall-timeout-ms", "29999"),
    ] {
        let err = serve_config([flag, value]).err().unwrap_or_else(|| panic!("{flag} {value} was accepted"));
        assert!(err.contains(flag.trim_start_matches("--")) || err.contains(value), "{flag} {value}: {err}");
    }
    assert!(serve_config(["--dispatch-max-tickets-per-shard", "65534"]).is_ok());
    assert!(serve_config(["--guest-slice-us", "1000"]).is_ok());
    assert!(serve_config(["--guest-slice-us", "2000", "--epoch-tick-ms", "2"]).is_ok());
    assert!(serve_config(["--compile-wall-timeout-ms", "1000", "--compile-timeout-ms", "1000"]).is_ok());
}

/// `table.grow` by `by` from one element; traps unless it grew.
fn grows_table(by: u32) -> Vec<u8> {
    guests::wasm(&format!(
        r#"(module (table 1 funcref)
             (func (export "_start")
               (if (i32.eq (table.grow (ref.null func) (i32.const {by})) (i32.const -1)) (then unreachable))))"#
    ))
}

#[test]
fn a_guest_table_stays_within_max_table_elements() {
    let server = Server::start(&["--max-table-elements", "64"]);
    let mut client = server.client();
    let within = server.deploy("within", &grows_table(63));
    assert_eq!(client.invoke(&within, b"").status, 200, "1 + 63 elements fit in 64");
    let past = server.deploy("past", &grows_table(64));
    let refused = client.invoke(&past, b"");
    assert_eq!(refused.status, 502, "{}", refused.text());
    assert_eq!(refused.json()["error"]["kind"], "guest_trap");
    // Such a module is refused at deploy, where its artifact is loaded into the instance pool.
    let table = guests::wasm(r#"(module (table 65 funcref) (func (export "_start")))"#);
    let refused = client.deploy("starts-larger", &table, serde_json::json!({}));
    assert!(refused.status >= 400, "{} {}", refused.status, refused.text());
    assert!(refused.text().contains("exceeds the limit of 64"), "{}", refused.text());
}
