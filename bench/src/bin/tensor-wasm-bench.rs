//! `tensor-wasm-bench`: the SLO harness. See the README's "Benchmark it" and docs/SLO.md.
//!
//! Exit status: 0 when every gated SLO held, 1 when one did not, 2 when the run could not be made,
//! 130 when Ctrl-C or SIGTERM ended it (after it cleaned up; see `harness::interrupt`).

use std::path::PathBuf;
use std::time::Duration;

use clap::builder::TypedValueParser;
use clap::Parser;
use tensor_wasm_bench::harness::guests::GuestSource;
use tensor_wasm_bench::harness::hostile::{Attack, HostileOptions};
use tensor_wasm_bench::harness::interrupt;
use tensor_wasm_bench::harness::scenario::{Scenario, ScenarioOptions};
use tensor_wasm_bench::harness::search::StepPlan;
use tensor_wasm_bench::harness::session::{ServerSource, Settings};
use tensor_wasm_bench::harness::slo::Gate;
use tensor_wasm_bench::harness::suite::{run_suite, Mode, SuiteOptions, EQUAL_LOAD_ROUNDS};
use tensor_wasm_bench::harness::target::{sibling_binary, Endpoint, StartedTls};

#[derive(Parser, Debug)]
#[command(
    name = "tensor-wasm-bench",
    about = "Open-loop SLO benchmark harness for TensorWasm",
    long_about = "Sends open-loop, constant-rate load over keep-alive connections, records latency \
                  corrected for coordinated omission, and judges it against docs/SLO.md. Without \
                  --server it starts a fresh tensor-wasm for every scenario on a loopback port."
)]
struct Args {
    /// Scenarios to run, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "healthz,hello,json,tensor,tenant-mix,deploy-storm"
    )]
    scenario: Vec<Scenario>,

    /// A live server to measure (http://host:port, or https://host:port) instead of starting one.
    #[arg(long, env = "TENSOR_WASM_SERVER")]
    server: Option<String>,
    /// How a live https:// server is trusted, and the client certificate it may ask for.
    #[command(flatten)]
    trust: tensor_wasm::client::TlsArgs,
    /// The bearer token for a live server.
    #[arg(long, env = "TENSOR_WASM_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The tenant to act as on a live server.
    #[arg(long, env = "TENSOR_WASM_TENANT")]
    tenant: Option<u64>,
    /// The tensor-wasm binary to start (default: beside this one).
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// The baseline binary to start (default: beside this one).
    #[arg(long)]
    baseline_bin: Option<PathBuf>,
    /// Shards of a started server (baseline: tokio workers). Default: every CPU, but one CPU is
    /// left to the device worker in the tensor scenario.
    #[arg(long)]
    shards: Option<usize>,
    /// CPUs for the servers the harness starts (ours and the baseline), as `taskset -c` writes
    /// them (0-3,8); the harness's own threads then run on the other CPUs it may use. Default
    /// shard counts follow this set, and ours pins its shards there. Without it, servers and
    /// generator share every CPU, and ours' shards float.
    #[arg(long)]
    server_cpus: Option<String>,
    /// Start ours speaking TLS, with a fresh self-signed certificate for localhost that the
    /// harness trusts: what TLS costs a deployment. Not with --server (whose URL says https://)
    /// or --baseline (which speaks plain HTTP only).
    #[arg(long)]
    tls: bool,
    /// Folder with the prebuilt guests: json-stats.wasm, tensor-ops.wasm, and for the model
    /// scenarios encoder.wasm and digits.wasm (default: build them with cargo).
    #[arg(long)]
    guests_dir: Option<PathBuf>,

    /// The offered rate of a fixed-rate run, in requests per second.
    #[arg(long, default_value_t = 2000.0)]
    rate: f64,
    /// Step mode: ramp the rate and report the highest at which the SLO holds, confirmed by a
    /// second pass.
    #[arg(long)]
    step: bool,
    /// The step search's first rate.
    #[arg(long, default_value_t = 1000.0)]
    step_start: f64,
    /// Each step multiplies the rate by this.
    #[arg(long, default_value_t = 1.5)]
    step_factor: f64,
    /// The step search stops here.
    #[arg(long, default_value_t = 1_000_000.0)]
    step_max: f64,
    /// Bisections between the best passing and the lowest failing rate, after the ramp and again
    /// each time a confirmation refutes the best rate.
    #[arg(long, default_value_t = 2)]
    step_refine: u32,
    /// Also run the conventional baseline server and print the ratios.
    #[arg(long)]
    baseline: bool,
    /// With --baseline: how many times each server is measured at the equal offered load (80% of
    /// the lower best rate). Its P99 there is the median of its rounds.
    #[arg(long, default_value_t = EQUAL_LOAD_ROUNDS,
          value_parser = clap::value_parser!(u16).range(1..=100).map(usize::from))]
    equal_load_rounds: usize,
    /// Also measure the shard-scaling curve (step mode at each count).
    #[arg(long)]
    scale: bool,
    /// Shard counts of the curve, comma-separated. Default: 1, 2, 4, ... and every CPU.
    #[arg(long, value_delimiter = ',')]
    scale_shards: Vec<usize>,
    /// The curve's scenario.
    #[arg(long, value_enum, default_value = "hello")]
    scale_scenario: Scenario,

    /// Keep-alive connections, each with its own schedule.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Load-generator threads, each an event loop over its share of the connections. Default: one
    /// per CPU the harness has to itself (at most --connections): those --server-cpus leaves it,
    /// or all it may use against a --server on another machine; else 1, so that a generator
    /// beside the servers takes one CPU at most.
    #[arg(long)]
    threads: Option<usize>,
    /// The generator's threads poll instead of sleeping, each taking its whole CPU, so that no
    /// answer pays to wake a parked generator on the same machine, as none would from a client on
    /// another. Only where the harness has CPUs of its own (--server-cpus, or a --server on another
    /// machine), at least one per thread.
    #[arg(long)]
    spin: bool,
    /// Sent but not recorded, before each measurement (e.g. 2s, 500ms).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    warmup: Duration,
    /// The measured window of each rate.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// A request unanswered for this long is an error.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    io_timeout: Duration,
    /// Replaces our own P99 objective (e.g. 2ms).
    #[arg(long, value_parser = parse_duration)]
    p99_target: Option<Duration>,
    /// Which objectives decide the exit status.
    #[arg(long, value_enum, default_value = "all")]
    gate: Gate,
    /// Deploys per second in the deploy-storm scenario.
    #[arg(long, default_value_t = 10.0)]
    storm_rate: f64,
    /// Each tenant's rate limit in the tenant-mix scenario (requests per second).
    #[arg(long, default_value_t = 2000)]
    mix_limit_qps: u32,
    /// The hostile scenario's attacks, comma-separated: a phase each after the quiet one, and one
    /// of all of them together.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "big-bodies,auth-flood,spinners,random-get,bulk-memory,deploy-flood"
    )]
    attacks: Vec<Attack>,
    /// The most requests a second each attack of the hostile scenario sends.
    #[arg(long, default_value_t = 100.0)]
    attack_rate: f64,

    /// Writes results.json and results.md into this folder.
    #[arg(long)]
    out: Option<PathBuf>,
    /// No progress line.
    #[arg(long)]
    quiet: bool,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = text.find(|c: char| c.is_ascii_alphabetic()).map_or((text, "s"), |i| text.split_at(i));
    let value: f64 = number.trim().parse().map_err(|_| format!("`{text}` is not a duration such as 10s or 500ms"))?;
    let seconds = match unit {
        "s" => value,
        "ms" => value / 1e3,
        "us" | "µs" => value / 1e6,
        "m" => value * 60.0,
        _ => return Err(format!("`{text}`: the unit must be m, s, ms or us")),
    };
    if !(seconds.is_finite() && seconds >= 0.0) {
        return Err(format!("`{text}` is not a duration"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

fn main() {
    let args = Args::parse();
    if let Err(e) = interrupt::catch_signals() {
        eprintln!("tensor-wasm-bench: cannot catch Ctrl-C: {e}");
        std::process::exit(2);
    }
    match run(args) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("tensor-wasm-bench: {e}");
            std::process::exit(if interrupt::interrupted() { interrupt::EXIT_INTERRUPTED } else { 2 });
        }
    }
}

/// Moves this process (before it starts any thread) off `server_cpus`, onto the rest of the CPUs
/// it may use, so that the generator never takes a started server's CPU. Returns how many are left.
fn confine_away_from(server_cpus: &[usize]) -> Result<usize, String> {
    use tensor_wasm::cpu;
    let allowed = cpu::allowed_cpus().map_err(|e| format!("cannot read this process's CPUs: {e}"))?;
    if let Some(cpu) = server_cpus.iter().find(|c| !allowed.contains(c)) {
        return Err(format!("--server-cpus names CPU {cpu}, which this process may not use ({allowed:?})"));
    }
    let rest: Vec<usize> = allowed.into_iter().filter(|c| !server_cpus.contains(c)).collect();
    if rest.is_empty() {
        return Err("--server-cpus takes every CPU; leave at least one to the load generator".into());
    }
    cpu::confine_current_thread(&rest).map_err(|e| format!("cannot move the harness to CPUs {rest:?}: {e}"))?;
    Ok(rest.len())
}

/// Whether `ip` is one of this machine's own addresses: only those can be bound to.
fn on_this_machine(ip: std::net::IpAddr) -> bool {
    ip.is_loopback() || std::net::UdpSocket::bind((ip, 0)).is_ok()
}

/// `--threads`, or its default: a thread per CPU the harness has to itself, since a generator
/// short of CPU sends late and measures itself; one where it shares the CPUs with the servers,
/// since each more thread would take CPU from what it measures.
fn generator_threads(explicit: Option<usize>, cpus_of_its_own: Option<usize>, connections: usize) -> usize {
    explicit.unwrap_or_else(|| cpus_of_its_own.unwrap_or(1).clamp(1, connections))
}

fn run(args: Args) -> Result<bool, String> {
    if args.rate <= 0.0
        || args.step_start <= 0.0
        || args.step_factor <= 1.0
        || args.connections == 0
        || args.threads == Some(0)
    {
        return Err(
            "--rate and --step-start must be positive, --step-factor above 1, --connections and --threads at least 1"
                .into(),
        );
    }
    if args.threads.is_some_and(|t| t > args.connections) {
        return Err("--threads must not exceed --connections: a thread without a connection sends nothing".into());
    }
    if !(args.attack_rate.is_finite() && args.attack_rate > 0.0) || args.attacks.is_empty() {
        return Err("--attack-rate must be positive, and --attacks name at least one attack".into());
    }
    if args.duration.is_zero() {
        return Err("--duration must be longer than zero".into());
    }
    let (server_cpus, harness_cpus) = match &args.server_cpus {
        Some(list) => {
            let cpus = tensor_wasm::cpu::parse_list(list)?;
            let rest = confine_away_from(&cpus)?;
            (Some(cpus), Some(rest))
        }
        None => (None, None),
    };
    let cpus = tensor_wasm_bench::harness::session::cpu_count(server_cpus.as_deref());
    let trust = args.trust.client_tls()?;
    let source = match &args.server {
        Some(url) => {
            if args.baseline || args.scale || server_cpus.is_some() || args.tls {
                return Err(
                    "--baseline, --scale, --server-cpus and --tls start their own servers; leave out --server".into()
                );
            }
            ServerSource::Remote(Endpoint::from_url(url, args.token.clone(), args.tenant, trust.as_ref())?)
        }
        None if trust.is_some() => {
            return Err("--ca-cert and --client-cert are for a live https:// --server".into());
        }
        None => ServerSource::Start {
            binary: match &args.server_bin {
                Some(p) => p.clone(),
                None => sibling_binary("tensor-wasm")?,
            },
            baseline_binary: match &args.baseline_bin {
                Some(p) => Some(p.clone()),
                None if args.baseline => Some(sibling_binary("tensor-wasm-baseline")?),
                None => None,
            },
            shards: args.shards,
            cpus: server_cpus,
            tls: if args.tls { Some(StartedTls::self_signed()?) } else { None },
        },
    };
    let cpus_of_its_own = match (&source, harness_cpus) {
        (_, Some(rest)) => Some(rest),
        // Without --server-cpus, `cpus` counts every CPU this process may use.
        (ServerSource::Remote(endpoint), None) if !on_this_machine(endpoint.addr.ip()) => Some(cpus),
        _ => None,
    };
    let threads = generator_threads(args.threads, cpus_of_its_own, args.connections);
    if args.spin && cpus_of_its_own.is_none_or(|cpus| threads > cpus) {
        return Err("--spin takes a CPU per generator thread: give the servers --server-cpus, and use no more --threads than the CPUs left".into());
    }
    let steps =
        StepPlan { start: args.step_start, factor: args.step_factor, max: args.step_max, refine: args.step_refine };
    let scale = args.scale.then(|| {
        let counts = if args.scale_shards.is_empty() {
            let mut c: Vec<usize> =
                std::iter::successors(Some(1usize), |n| Some(n * 2)).take_while(|n| *n < cpus).collect();
            c.push(cpus);
            c
        } else {
            args.scale_shards.clone()
        };
        (counts, args.scale_scenario)
    });
    let options = SuiteOptions {
        scenarios: args.scenario.clone(),
        source,
        mode: if args.step { Mode::Step(steps) } else { Mode::Fixed { rate: args.rate } },
        steps,
        baseline: args.baseline,
        equal_load_rounds: args.equal_load_rounds,
        scale,
        settings: Settings {
            connections: args.connections,
            threads,
            spin: args.spin,
            warmup: args.warmup,
            duration: args.duration,
            io_timeout: args.io_timeout,
            p99_override: args.p99_target,
            gate: args.gate,
            storm_rate: args.storm_rate,
            scenario: ScenarioOptions {
                guests: args.guests_dir.clone().map_or(GuestSource::Build, GuestSource::Prebuilt),
                mix_limit_qps: args.mix_limit_qps,
                hostile: HostileOptions { attacks: args.attacks.clone(), attack_rate: args.attack_rate },
            },
            progress: !args.quiet,
        },
        command: std::env::args().collect(),
    };
    let report = run_suite(&options)?;
    let markdown = report.to_markdown();
    print!("{markdown}");
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let json = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        for (name, text) in [("results.json", json.as_str()), ("results.md", markdown.as_str())] {
            let path = dir.join(name);
            std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        }
    }
    Ok(report.pass)
}

#[cfg(test)]
mod tests {
    use super::{generator_threads, on_this_machine};

    #[test]
    fn the_generator_takes_a_thread_per_cpu_of_its_own_and_one_beside_the_servers() {
        assert_eq!(generator_threads(None, None, 32), 1, "beside the servers");
        assert_eq!(generator_threads(None, Some(4), 32), 4, "four CPUs of its own");
        assert_eq!(generator_threads(None, Some(64), 32), 32, "no more threads than connections");
        assert_eq!(generator_threads(Some(3), Some(4), 32), 3, "--threads wins");
        assert_eq!(generator_threads(Some(2), None, 32), 2, "--threads wins beside the servers too");
    }

    #[test]
    fn a_server_is_on_this_machine_where_its_address_is_one_of_ours() {
        assert!(on_this_machine("127.0.0.1".parse().unwrap()));
        // The address this machine would send from toward another, where it has a route: its own,
        // though not a loopback one. A UDP connect sends nothing.
        let probe = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        if probe.connect("192.0.2.1:9").is_ok() {
            let own = probe.local_addr().unwrap().ip();
            assert!(!own.is_loopback() && on_this_machine(own), "{own}");
        }
        // An address from TEST-NET-2 (RFC 5737), which no machine should hold.
        assert!(!on_this_machine("198.51.100.77".parse().unwrap()));
    }
}
