//! Limits that were constants outside `config` and are now flags, the guest slice and the
//! compile's budget and priority: each reaches the configuration, refuses a value it cannot
//! honour, and where a guest can reach it, holds.

mod common;

use std::time::Duration;

use common::{guests, Server};
use tensor_wasm::settings::{serve_config, CompilePriority};

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
    assert_eq!(config.limits.module_shape.max_table_elements, 64);
    assert_eq!(config.limits.guest_slice(), std::time::Duration::from_micros(250));
    let budget = config.limits.compile_budget.unwrap();
    assert_eq!((budget.cpu, budget.wall), (Duration::from_secs(5), Duration::from_secs(5)));
    assert_eq!(budget.priority, CompilePriority::Nice(19));

    let defaults = serve_config(Vec::<String>::new()).unwrap();
    assert_eq!(defaults.dispatch.max_tensor_elements, 64 << 20);
    assert_eq!(defaults.dispatch.max_tickets_per_shard, 4096);
    assert_eq!(defaults.dispatch.worker_spin, std::time::Duration::from_micros(50));
    assert_eq!(defaults.limits.module_shape.max_table_elements, 20_000);
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
        ("--max-tensor-elements", "2147483648"),
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
    // A table that starts at the limit is deployed; one that starts past it, first or not, is
    // refused from the module's sections, before the instance pool could fail to hold it.
    server.deploy("starts-at-limit", &guests::wasm(r#"(module (table 64 funcref) (func (export "_start")))"#));
    for (name, wat) in [
        ("starts-larger", r#"(module (table 65 funcref) (func (export "_start")))"#),
        ("second-larger", r#"(module (table 1 funcref) (table 65 funcref) (func (export "_start")))"#),
    ] {
        let refused = client.deploy(name, &guests::wasm(wat), serde_json::json!({}));
        assert_eq!(refused.status, 400, "{name}: {}", refused.text());
        assert_eq!(refused.json()["error"]["kind"], "table_too_large", "{name}");
        assert!(refused.text().contains("exceeds the limit of 64"), "{name}: {}", refused.text());
    }
    assert_eq!(client.request("GET", "/healthz", &[], b"").status, 200);
}

#[test]
fn a_module_with_more_tables_or_memories_than_a_slot_holds_is_refused_from_its_sections() {
    let server = Server::start(&["--max-memory-limit-mb", "8", "--default-memory-limit-mb", "8"]);
    let mut client = server.client();
    server.deploy("four-tables", &guests::wasm(r#"(module (table 1 funcref) (table 1 funcref) (table 1 funcref) (table 1 funcref) (func (export "_start")))"#));
    server.deploy("memory-at-limit", &guests::wasm(r#"(module (memory 128) (func (export "_start")))"#));
    for (name, wat, kind, says) in [
        (
            "five-tables",
            r#"(module (table 1 funcref) (table 1 funcref) (table 1 funcref) (table 1 funcref) (table 1 funcref) (func (export "_start")))"#,
            "too_many_tables",
            "5 tables, more than the 4",
        ),
        (
            "two-memories",
            r#"(module (memory 1) (memory 1) (func (export "_start")))"#,
            "too_many_memories",
            "2 memories",
        ),
        (
            "memory-past-limit",
            r#"(module (memory 129) (func (export "_start")))"#,
            "memory_too_large",
            "limit of 8 MiB",
        ),
    ] {
        let refused = client.deploy(name, &guests::wasm(wat), serde_json::json!({}));
        assert_eq!((refused.status, refused.error_kind().as_str()), (400, kind), "{name}: {}", refused.text());
        assert!(refused.text().contains(says), "{name}: {}", refused.text());
    }
    assert_eq!(client.request("GET", "/healthz", &[], b"").status, 200);
}
