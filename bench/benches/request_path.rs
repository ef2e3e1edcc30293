//! Micro-benchmarks of the per-request steps before a guest runs: HTTP head parse, bearer-token
//! lookup, and the rate-limit check. Each one states the figure it protects; a regression past it
//! is a finding for perf/CORE.md.
//!
//! `cargo bench -p tensor-wasm-bench --bench request_path`
//!
//! - parse of a 6-header invoke head: ≤ 1 µs, so that parsing stays under a tenth of the ~8 µs of
//!   server CPU a loopback request costs (perf/CORE.md);
//! - token lookup in a list of 1,000 tokens: ≤ 1 µs (a SHA-256 of the presented token, a map
//!   lookup, a constant-time compare), independent of the list's length;
//! - rate-limit admission from the shard's local allowance: ≤ 100 ns (a clock read, no shared
//!   write), and a refill from the token's shared bucket, once per batch: ≤ 200 ns (one CAS).

use std::hint::black_box;
use std::time::Instant;

use tensor_wasm::http_codec::{parse_head, HeadParse, RequestHead};
use tensor_wasm::tokens::{GlobalBucket, LocalAllowance, RateLimit, TokenPolicy, TokenSet};
use tensor_wasm_bench::{histogram, pin_like_a_shard, record, row, TABLE_HEAD};

const N: usize = 1_000_000;
/// Operations per timed sample: one clock read costs about as much as the cheaper steps.
const BATCH: usize = 100;

/// Times `N` calls of `f` in batches of `BATCH`; each sample is the batch's mean.
fn measure(name: &str, mut f: impl FnMut(usize)) -> String {
    let mut h = histogram();
    for i in 0..N / 10 {
        f(i);
    }
    for b in 0..N / BATCH {
        let t = Instant::now();
        for i in 0..BATCH {
            f(b * BATCH + i);
        }
        record(&mut h, t.elapsed() / BATCH as u32);
    }
    row(name, &h)
}

fn main() {
    pin_like_a_shard();
    let mut rows = vec![TABLE_HEAD.to_string()];

    let request = b"POST /functions/fn-0123456789abcdef/invoke HTTP/1.1\r\nhost: 127.0.0.1:8080\r\n\
user-agent: bench\r\naccept: */*\r\nauthorization: Bearer 0123456789abcdef0123456789abcdef\r\n\
x-tensor-wasm-tenant: 7\r\ncontent-length: 2\r\n\r\n{}";
    let mut head = RequestHead::default();
    rows.push(measure("parse an invoke head (6 headers)", |_| {
        let parsed = parse_head(black_box(request), &mut head, 16 * 1024, 100);
        assert!(matches!(parsed, Ok(HeadParse::Complete(_))));
    }));

    let tokens: Vec<String> = (0..1000).map(|i| format!("bench-token-{i:04}-0123456789abcdef")).collect();
    let list: String = tokens.iter().map(|t| format!("{t}:tenant=*")).collect::<Vec<_>>().join(",");
    let policy = TokenPolicy { token_id_key: b"bench key".to_vec(), rate_limit: None, shards: 1 };
    let set = TokenSet::parse(&list, &policy, None).expect("valid token list");
    rows.push(measure("token lookup, 1,000 tokens", |i| {
        assert!(set.find(black_box(tokens[i % 1000].as_bytes())).is_some());
    }));

    let bucket = GlobalBucket::new(RateLimit { qps: RateLimit::MAX_QPS, burst: RateLimit::MAX_QPS });
    let local = LocalAllowance::default();
    rows.push(measure("rate limit, batches of 64", |_| {
        assert!(local.admit(black_box(&bucket), 64).is_ok());
    }));
    rows.push(measure("rate limit, a shared-bucket refill every time", |_| {
        assert!(LocalAllowance::default().admit(black_box(&bucket), 1).is_ok());
    }));

    println!("{}", rows.join("\n"));
}
