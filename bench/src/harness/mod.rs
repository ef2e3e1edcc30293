//! `tensor-wasm-bench`: the SLO harness. It drives a live server with open-loop, constant-rate
//! load, corrects latency for coordinated omission, and judges the results against docs/SLO.md.
//!
//! Three rooms, each of one concern:
//!
//! - session: [`session`], the server under test for one scenario, started here or reached by
//!   URL, with the scenario deployed; [`target`], the started processes and their CPUs.
//! - measurement: [`load`], the load generator (epoll loops over keep-alive connections, each on a
//!   schedule, timing each answer); [`measure`], one measurement at one rate and its report;
//!   [`scrape`], the server's own histograms (dispatch, time per request).
//! - search: [`search`], the step search for the highest rate within the SLO; [`slo`], the
//!   objectives a measurement is judged against.
//!
//! Around them: [`client`] (response framing, TLS, a blocking connection for set-up requests),
//! [`scenario`] (what each scenario deploys and sends), [`guests`] (the modules), [`hostile`] (the
//! hostile scenario's attacks and phases), [`fleet`] (replicas on a NATS registry against one node), [`suite`] (a whole run), [`report`] (its JSON and
//! Markdown), and [`interrupt`] (Ctrl-C ends a run early and cleanly).
//!
//! ```no_run
//! use std::time::Duration;
//! use tensor_wasm_bench::harness::load::{self, LoadPlan, Progress, RequestClass};
//!
//! let plan = LoadPlan {
//!     addr: "127.0.0.1:8080".parse().unwrap(),
//!     tls: None,
//!     rate: 1000.0,
//!     warmup: Duration::from_secs(1),
//!     duration: Duration::from_secs(5),
//!     connections: 8,
//!     threads: 1,
//!     classes: vec![RequestClass {
//!         name: "healthz".into(),
//!         request: b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n".to_vec().into(),
//!         weight: 1,
//!     }],
//!     io_timeout: Duration::from_secs(10),
//!     spin: false,
//! };
//! let outcome = load::run(&plan, &Progress::default()).unwrap();
//! println!("P99: {} ns", outcome.total().latency.value_at_quantile(0.99));
//! ```

pub mod client;
pub mod fleet;
pub mod guests;
pub mod hostile;
pub mod interrupt;
pub mod load;
pub mod measure;
pub mod report;
pub mod scenario;
pub mod scrape;
pub mod search;
pub mod session;
pub mod slo;
pub mod suite;
pub mod target;
