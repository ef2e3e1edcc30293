//! `tensor-wasm observe`: a one-screen status board from a server's `/metrics`, `/healthz` and
//! `/readyz`. Rates and percentiles cover the last interval (the first board: since start-up).
//!
//! `--once` prints one board, over one interval, and exits 0 when the server is healthy, 1 when
//! it is not (a probe failing, audit errors, or 5xx over 0.5% of answers: the seed's SLO), and 2
//! when it cannot be reached.

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use clap::Args;

use crate::functions::manifest::duration_ms;
use crate::http::client::{encode_request, exchange, Exchange, Target};
use crate::metrics::exposition::{self, Sample, ScrapedHistogram};
use crate::tls::ClientTls;

/// The share of 5xx answers over which the board says unhealthy (docs/SLO.md, the seed's target).
const MAX_5XX_RATIO: f64 = 0.005;

#[derive(Args)]
pub struct ObserveArgs {
    /// The server's base URL, http:// or https://.
    #[arg(long, env = "TENSOR_WASM_SERVER", default_value = "http://127.0.0.1:8080")]
    pub server: String,
    #[command(flatten)]
    pub tls: super::client::TlsArgs,
    /// Time between boards, e.g. `2s` or `500ms`.
    #[arg(long, default_value = "2s")]
    pub interval: String,
    /// The `/metrics` token, when the server has `TENSOR_WASM_API_METRICS_TOKEN`.
    #[arg(long, env = "TENSOR_WASM_API_METRICS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print one board and exit: 0 healthy, 1 unhealthy, 2 unreachable.
    #[arg(long)]
    pub once: bool,
}

/// One scrape of the server.
struct Scrape {
    at: Instant,
    samples: Vec<Sample>,
    healthz: Result<u16, String>,
    readyz: Result<u16, String>,
}

impl Scrape {
    fn take(base: &Target, token: Option<&str>, tls: Option<&ClientTls>) -> Result<Scrape, String> {
        let get = |path: &str, auth: Option<&str>| {
            let target = base.with_path(path);
            let bearer = auth.map(|t| format!("Bearer {t}"));
            let headers: Vec<(&str, &str)> = bearer.iter().map(|b| ("authorization", b.as_str())).collect();
            let request = encode_request("GET", &target, &headers, b"");
            exchange(
                &target,
                &request,
                Exchange { timeout: Duration::from_secs(10), max_body: Some(64 << 20), tls, allow: None },
            )
        };
        let metrics = get("/metrics", token)?;
        if metrics.status != 200 {
            return Err(format!("/metrics answered HTTP {} (is --token needed?)", metrics.status));
        }
        Ok(Scrape {
            at: Instant::now(),
            samples: exposition::parse(&String::from_utf8_lossy(&metrics.body)),
            healthz: get("/healthz", None).map(|a| a.status),
            readyz: get("/readyz", None).map(|a| a.status),
        })
    }

    /// The sum of `name`'s samples whose labels include every pair of `want`.
    fn sum(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.matching(name, want).map(|s| s.value).sum()
    }

    fn matching<'a>(&'a self, name: &'a str, want: &'a [(&'a str, &'a str)]) -> impl Iterator<Item = &'a Sample> + 'a {
        exposition::matching(&self.samples, name, want)
    }

    fn histogram(&self, name: &str, want: &[(&str, &str)]) -> ScrapedHistogram {
        ScrapedHistogram::of(&self.samples, name, want)
    }
}

/// What changed between two scrapes (or since start-up, when there is no earlier one).
struct Window<'a> {
    now: &'a Scrape,
    before: Option<&'a Scrape>,
}

impl Window<'_> {
    fn secs(&self) -> Option<f64> {
        self.before.map(|b| self.now.at.duration_since(b.at).as_secs_f64().max(1e-3))
    }

    fn delta(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.now.sum(name, want) - self.before.map_or(0.0, |b| b.sum(name, want))
    }

    fn p95(&self, name: &str, want: &[(&str, &str)]) -> Option<f64> {
        let before = self.before.map(|b| b.histogram(name, want)).unwrap_or_default();
        self.now.histogram(name, want).since(&before).quantile(0.95)
    }

    /// Answers by status class in the window: 2xx, 3xx, 4xx, 5xx.
    fn by_class(&self) -> [f64; 4] {
        let mut classes = [0.0; 4];
        let statuses: Vec<String> = self
            .now
            .matching("tensor_wasm_http_requests_total", &[])
            .filter_map(|s| s.labels.get("status").cloned())
            .collect();
        for status in statuses.iter().collect::<std::collections::BTreeSet<_>>() {
            let n = self.delta("tensor_wasm_http_requests_total", &[("status", status)]);
            if let Some(class) = status.chars().next().and_then(|c| c.to_digit(10)).filter(|c| (2..=5).contains(c)) {
                classes[class as usize - 2] += n;
            }
        }
        classes
    }
}

fn millis(seconds: Option<f64>) -> String {
    match seconds {
        None => "-".into(),
        Some(s) if s < 1e-3 => format!("{:.1} µs", s * 1e6),
        Some(s) => format!("{:.2} ms", s * 1e3),
    }
}

fn probe(status: &Result<u16, String>) -> String {
    match status {
        Ok(code) => code.to_string(),
        Err(e) => format!("unreachable ({e})"),
    }
}

/// The board, and whether it shows a healthy server.
fn board(server: &str, w: &Window<'_>) -> (String, Vec<String>) {
    let mut out = String::new();
    let mut problems = Vec::new();
    let span = match w.secs() {
        Some(s) => format!("last {s:.1} s"),
        None => "since start-up".into(),
    };
    let _ = writeln!(out, "tensor-wasm observe  {server}  ({span})");
    let (healthz, readyz) = (&w.now.healthz, &w.now.readyz);
    let _ = writeln!(out, "healthz {}   readyz {}", probe(healthz), probe(readyz));
    if healthz.as_ref().ok() != Some(&200) {
        problems.push(format!("/healthz: {}", probe(healthz)));
    }
    if readyz.as_ref().ok() != Some(&200) {
        problems.push(format!("/readyz: {}", probe(readyz)));
    }
    let classes = w.by_class();
    let per = |n: f64| match w.secs() {
        Some(s) => format!("{:.1}/s", n / s),
        None => format!("{n:.0}"),
    };
    let _ = writeln!(
        out,
        "requests     2xx {}  3xx {}  4xx {}  5xx {}",
        per(classes[0]),
        per(classes[1]),
        per(classes[2]),
        per(classes[3])
    );
    let answered: f64 = classes.iter().sum();
    if answered > 0.0 && classes[3] / answered > MAX_5XX_RATIO {
        problems.push(format!(
            "5xx are {:.2}% of answers (over {:.1}%)",
            100.0 * classes[3] / answered,
            100.0 * MAX_5XX_RATIO
        ));
    }
    let duration = "tensor_wasm_http_request_duration_seconds";
    let _ = writeln!(
        out,
        "P95          invoke {}  healthz {}  dispatch {}",
        millis(w.p95(duration, &[("route", "/functions/:id/invoke")])),
        millis(w.p95(duration, &[("route", "/healthz")])),
        millis(w.p95("tensor_wasm_kernel_latency_seconds", &[])),
    );
    let broken = w.now.sum("tensor_wasm_functions_broken", &[]);
    let _ = writeln!(
        out,
        "instances    {} active   functions {} ({broken} broken)   pipelines {}   connections {}",
        w.now.sum("tensor_wasm_active_instances", &[]),
        w.now.sum("tensor_wasm_functions_total", &[]),
        w.now.sum("tensor_wasm_pipelines_total", &[]),
        w.now.sum("tensor_wasm_connections", &[]),
    );
    // /readyz stays 200 with broken functions, so that one bad module cannot take a fleet out of
    // rotation; the operator hears of them here.
    if broken > 0.0 {
        problems.push(format!("{broken} broken functions (their stored modules cannot be loaded; see GET /functions)"));
    }
    let audit_errors = w.delta("tensor_wasm_audit_errors_total", &[]);
    let audit = if audit_errors > 0.0 {
        problems.push(format!("{audit_errors} audit write errors"));
        "FAILING"
    } else {
        "ok"
    };
    let _ = writeln!(
        out,
        "audit        {audit}   records {}   errors {}",
        per(w.delta("tensor_wasm_audit_records_total", &[])),
        w.now.sum("tensor_wasm_audit_errors_total", &[])
    );
    // With a fleet registry: whether this replica is in step with it, and since when not.
    if w.now.matching("tensor_wasm_registry_connected", &[]).next().is_some() {
        let connected = w.now.sum("tensor_wasm_registry_connected", &[]) > 0.0;
        let stale = w.now.matching("tensor_wasm_registry_stale_seconds", &[]).next().map(|s| s.value);
        let state = match (connected, stale) {
            (true, _) => "in step".to_string(),
            (false, Some(s)) => format!("AWAY for {s:.1} s"),
            (false, None) => "never reached".to_string(),
        };
        if !connected {
            problems.push(format!(
                "the registry is {} (serving the last known catalog; deploys and deletes get 503)",
                state.to_lowercase()
            ));
        }
        let _ = writeln!(out, "registry     {state}   resyncs {}", w.now.sum("tensor_wasm_registry_syncs_total", &[]));
    }
    // With rate limits shared across the fleet: how many replicas share each token's rate.
    if w.now.matching("tensor_wasm_fleet_replicas", &[]).next().is_some() {
        let replicas = w.now.sum("tensor_wasm_fleet_replicas", &[]);
        let hearing = w.now.sum("tensor_wasm_fleet_limits_connected", &[]) > 0.0;
        let how = if hearing { "shares follow demand" } else { "NATS AWAY: each admits rate ÷ replicas" };
        let _ = writeln!(out, "limits       {replicas} replicas   {how}");
    }
    let _ = writeln!(out, "{:<6} {:>12} {:>12}  driver", "shard", "requests", "accepted");
    let mut shards: Vec<String> = w
        .now
        .matching("tensor_wasm_shard_requests_total", &[])
        .filter_map(|s| s.labels.get("shard").cloned())
        .collect();
    shards.sort_by_key(|s| s.parse::<u64>().unwrap_or(u64::MAX));
    for shard in shards {
        let want = [("shard", shard.as_str())];
        let driver = w
            .now
            .matching("tensor_wasm_shard_io_driver", &want)
            .find(|s| s.value > 0.0)
            .and_then(|s| s.labels.get("driver").cloned())
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "{:<6} {:>12} {:>12}  {driver}",
            shard,
            per(w.delta("tensor_wasm_shard_requests_total", &want)),
            per(w.delta("tensor_wasm_shard_connections_accepted_total", &want)),
        );
    }
    let verdict =
        if problems.is_empty() { "HEALTHY".to_string() } else { format!("UNHEALTHY: {}", problems.join("; ")) };
    let _ = writeln!(out, "{verdict}");
    (out, problems)
}

pub fn run(args: ObserveArgs) -> i32 {
    let base = match Target::parse(&args.server) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: --server {}: {e}", args.server);
            return 2;
        }
    };
    let interval = match duration_ms(&args.interval) {
        Ok(ms) if ms > 0 => Duration::from_millis(ms),
        _ => {
            eprintln!("error: --interval {:?} is not a duration such as 2s or 500ms", args.interval);
            return 2;
        }
    };
    let tls = match args.tls.client_tls() {
        Ok(tls) => tls,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    let token = args.token.as_deref();
    let tty = std::io::stdout().is_terminal();
    let mut before: Option<Scrape> = None;
    loop {
        let now = match Scrape::take(&base, token, tls.as_ref()) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: cannot read {}: {e}", args.server);
                if args.once {
                    return 2;
                }
                std::thread::sleep(interval);
                continue;
            }
        };
        // `--once` measures one interval, so that its rates and percentiles are current.
        if args.once && before.is_none() {
            before = Some(now);
            std::thread::sleep(interval);
            continue;
        }
        let (text, problems) = board(&args.server, &Window { now: &now, before: before.as_ref() });
        if tty && !args.once {
            print!("\x1b[H\x1b[2J");
        }
        println!("{text}");
        if args.once {
            return i32::from(!problems.is_empty());
        }
        before = Some(now);
        std::thread::sleep(interval);
    }
}
