//! `tensor-wasm doctor`: checks this host the way the server would use it, one line per check
//! with ok, warn or fail and, where something is wrong, the fix. Exit status 0, or 1 when a check
//! failed; `--json` for machines. Nothing here changes the host: the data dir is probed with a
//! temp file that is removed again, and the GPU checks free what they upload.
//!
//! The checks that compute (the host back-end, and each CUDA device) run a tiny add, softmax and
//! matmul through the real dispatcher and compare them with a float64 reference, so "ok" means
//! this host ran our kernels, not that a library was found.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;
use tensor_wasm_dispatch::{probe, BackendChoice, DispatchConfig, Dispatcher, Done, Op, Session};

use crate::runtime::cpu;

#[derive(clap::Args)]
pub struct DoctorArgs {
    /// The data dir the server will use.
    #[arg(long, env = "TENSOR_WASM_DATA_DIR", default_value = "./tensor-wasm-data")]
    pub data_dir: PathBuf,
    /// The audit log's reserve the server will keep (`serve --audit-reserve-mb`).
    #[arg(long, env = "TENSOR_WASM_AUDIT_RESERVE_MB", default_value_t = 256)]
    pub audit_reserve_mb: u64,
    /// A host without a usable GPU fails, rather than warns (for GPU nodes).
    #[arg(long)]
    pub require_gpu: bool,
    /// One JSON object instead of lines.
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Level {
    Ok,
    Warn,
    Fail,
}

#[derive(Serialize)]
struct Check {
    name: String,
    level: Level,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    fix: Option<String>,
}

fn check(name: &str, level: Level, detail: impl Into<String>, fix: Option<&str>) -> Check {
    Check { name: name.into(), level, detail: detail.into(), fix: fix.map(str::to_string) }
}

pub fn run(args: DoctorArgs) -> i32 {
    let uring = io_uring();
    let memlock = memlock(uring.level != Level::Ok);
    let mut checks = vec![cpus(), memlock, uring, data_dir(&args.data_dir, args.audit_reserve_mb), clock()];
    checks.push(compute("host back-end", BackendChoice::Host, None));
    checks.extend(gpu(args.require_gpu));
    let failed = checks.iter().any(|c| c.level == Level::Fail);
    if args.json {
        let report = serde_json::json!({ "ok": !failed, "checks": checks });
        println!("{report}");
    } else {
        let mut out = std::io::stdout().lock();
        for c in &checks {
            let level = match c.level {
                Level::Ok => "ok",
                Level::Warn => "warn",
                Level::Fail => "FAIL",
            };
            let _ = writeln!(out, "{level:<5} {:<22} {}", c.name, c.detail);
            if let Some(fix) = &c.fix {
                let _ = writeln!(out, "{:<28} fix: {fix}", "");
            }
        }
        let _ = writeln!(out, "{}", if failed { "doctor: something failed" } else { "doctor: this host can serve" });
    }
    i32::from(failed)
}

fn cpus() -> Check {
    let allowed = match cpu::allowed_cpus() {
        Ok(cpus) => cpus,
        Err(e) => return check("cpus", Level::Fail, format!("sched_getaffinity: {e}"), None),
    };
    let detail = format!("{} allowed ({})", allowed.len(), cpu::format_list(&allowed));
    match cpu::cgroup_cpu_limit() {
        Some(limit) if limit < allowed.len() => check(
            "cpus",
            Level::Warn,
            format!("{detail}, but the cgroup allows {limit}: the default shard count follows the limit"),
            Some("give the pod whole CPUs equal to its limit (Kubernetes static CPU policy, Guaranteed QoS)"),
        ),
        Some(limit) => check("cpus", Level::Ok, format!("{detail}; cgroup limit {limit}"), None),
        None => check("cpus", Level::Ok, format!("{detail}; no cgroup CPU limit"), None),
    }
}

/// io_uring's rings count against RLIMIT_MEMLOCK on kernels before 5.12: a low limit makes it fail
/// with ENOMEM (the server then falls back to epoll). Only then is a low limit worth a warning.
fn memlock(uring_failed: bool) -> Check {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit fills the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) } != 0 {
        return check("memlock", Level::Warn, format!("getrlimit: {}", std::io::Error::last_os_error()), None);
    }
    const ENOUGH_BYTES: u64 = 64 << 20;
    let shown = if limit.rlim_cur == libc::RLIM_INFINITY { "unlimited".into() } else { mib(limit.rlim_cur) };
    if !uring_failed || limit.rlim_cur == libc::RLIM_INFINITY || limit.rlim_cur >= ENOUGH_BYTES {
        return check("memlock", Level::Ok, shown, None);
    }
    check(
        "memlock",
        Level::Warn,
        format!("{shown}: low enough to be why io_uring failed (kernels before 5.12 count its rings here)"),
        Some("raise the memlock limit (ulimit -l, LimitMEMLOCK= in the systemd unit, or the container runtime's default)"),
    )
}

fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes >> 20)
}

/// Builds the io_uring runtime exactly as a shard does.
fn io_uring() -> Check {
    let built = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
        .with_entries(crate::server::shard::URING_ENTRIES)
        .enable_timer()
        .build();
    match built {
        Ok(_) => check("io_uring", Level::Ok, "a shard's ring can be set up", None),
        Err(e) => check(
            "io_uring",
            Level::Warn,
            format!("unavailable ({e}): shards will use epoll, which costs a little CPU per request"),
            Some("allow io_uring_setup in the seccomp profile, or run with --io-driver epoll to say so"),
        ),
    }
}

fn data_dir(dir: &Path, reserve_mb: u64) -> Check {
    // The nearest existing ancestor is where the server would create it; it must be a directory.
    let existing = dir.ancestors().find(|p| p.exists()).unwrap_or(Path::new("."));
    if !existing.is_dir() {
        return check(
            "data dir",
            Level::Fail,
            format!("{}: {} is not a directory", dir.display(), existing.display()),
            Some("point --data-dir at a directory on a writable volume"),
        );
    }
    let probe = existing.join(format!(".tmp-doctor-{}", std::process::id()));
    let written = std::fs::File::create(&probe).and_then(|mut f| {
        f.write_all(b"doctor")?;
        f.sync_all()
    });
    let _ = std::fs::remove_file(&probe);
    if let Err(e) = written {
        return check(
            "data dir",
            Level::Fail,
            format!("{}: cannot write and fsync a file: {e}", existing.display()),
            Some("mount a writable volume there, owned by the server's user"),
        );
    }
    let reserve = reserve_mb << 20;
    match crate::functions::store::free_bytes(existing) {
        Ok(free) if free < reserve => check(
            "data dir",
            Level::Fail,
            format!(
                "{}: {} free, under the audit reserve of {}: every deploy would get 507",
                dir.display(),
                mib(free),
                mib(reserve)
            ),
            Some("grow the volume, or lower --audit-reserve-mb knowing what it protects (docs/CONFIG.md)"),
        ),
        Ok(free) if free < reserve.saturating_mul(4) => check(
            "data dir",
            Level::Warn,
            format!(
                "{}: writable; {} free, less than four times the audit reserve ({})",
                dir.display(),
                mib(free),
                mib(reserve)
            ),
            Some("grow the volume before deploys and audit segments fill it"),
        ),
        Ok(free) => check("data dir", Level::Ok, format!("{}: writable; {} free", dir.display(), mib(free)), None),
        Err(e) => check("data dir", Level::Warn, format!("{}: writable; free space unknown: {e}", dir.display()), None),
    }
}

/// Deadlines, the epoch ticker and every latency histogram read the clock; `hpet` and `acpi_pm`
/// make each read a slow trip out of user space.
fn clock() -> Check {
    let path = "/sys/devices/system/clocksource/clocksource0/current_clocksource";
    match std::fs::read_to_string(path) {
        Ok(source) => match source.trim() {
            fast @ ("tsc" | "kvm-clock" | "arch_sys_counter" | "hyperv_clocksource_tsc_page") => {
                check("clock source", Level::Ok, fast, None)
            }
            slow => check(
                "clock source",
                Level::Warn,
                format!("{slow}: each clock read may trap to the kernel"),
                Some("use tsc where the host's TSC is stable (clocksource=tsc on the kernel command line)"),
            ),
        },
        Err(e) => check("clock source", Level::Warn, format!("{path}: {e}"), None),
    }
}

fn gpu(require: bool) -> Vec<Check> {
    let missing = if require { Level::Fail } else { Level::Warn };
    let Some(cuda) = probe::cuda() else {
        return vec![check(
            "gpu",
            missing,
            "no NVIDIA driver library (libcuda): tensor ops run on the host back-end",
            require.then_some("install the NVIDIA driver and expose the GPU (docs/CUDA-SETUP.md)"),
        )];
    };
    let mut checks = Vec::new();
    let version = |r: Result<String, String>, name: &str, fix: &str| match r {
        Ok(v) => check(name, Level::Ok, v, None),
        Err(e) => check(name, Level::Fail, e, Some(fix)),
    };
    checks.push(version(
        cuda.driver_version.map(|v| format!("CUDA driver API {}.{}", v / 1000, v % 1000 / 10)),
        "gpu driver",
        "install an NVIDIA driver that supports CUDA 12",
    ));
    checks.push(version(
        cuda.nvrtc_version.map(|(a, b)| format!("NVRTC {a}.{b}")),
        "nvrtc",
        "install the CUDA 12 NVRTC library where the loader finds it",
    ));
    checks.push(version(
        cuda.cublas_version.map(|(a, b, c)| format!("cuBLAS {a}.{b}.{c}")),
        "cublas",
        "install the CUDA 12 cuBLAS library where the loader finds it",
    ));
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "unset".into());
    match cuda.devices {
        Ok(devices) if devices.is_empty() => checks.push(check(
            "gpu devices",
            missing,
            format!("none visible (CUDA_VISIBLE_DEVICES={visible})"),
            Some("check CUDA_VISIBLE_DEVICES and the device plugin's allocation"),
        )),
        Ok(devices) => {
            checks.push(check(
                "gpu devices",
                Level::Ok,
                format!("{} (CUDA_VISIBLE_DEVICES={visible})", devices.len()),
                None,
            ));
            for d in &devices {
                checks.push(device(d));
            }
            checks.push(compute("cuda", BackendChoice::Cuda, Some(devices.len())));
        }
        Err(e) => checks.push(check("gpu devices", Level::Fail, e, Some("check the driver with nvidia-smi"))),
    }
    checks
}

fn device(d: &probe::DeviceProbe) -> Check {
    let name = format!("gpu {}", d.ordinal);
    let shown = |r: &Result<String, String>| r.clone().unwrap_or_else(|e| format!("name unknown ({e})"));
    let sm = match &d.compute_capability {
        Ok((major, minor)) => format!("sm_{major}{minor}"),
        Err(e) => format!("SM unknown ({e})"),
    };
    let memory = d.memory_bytes.as_ref().map(|b| format!("{} MiB", b >> 20)).unwrap_or_else(|e| e.clone());
    let detail = format!("{}, {sm}, {memory}", shown(&d.name));
    match &d.kernels {
        Ok(()) => check(&name, Level::Ok, format!("{detail}; kernels compiled for it"), None),
        Err(e) => check(
            &name,
            Level::Fail,
            format!("{detail}; kernels do not compile for it: {e}"),
            Some("use an NVRTC that supports this SM (docs/CUDA-SETUP.md, the SM compatibility matrix)"),
        ),
    }
}

/// Runs a tiny add, softmax and matmul through a dispatcher on `backend` and compares each with a
/// float64 reference; then times tiny adds for the dispatch round trip.
fn compute(name: &str, backend: BackendChoice, devices: Option<usize>) -> Check {
    let started = Instant::now();
    let host_devices = devices.filter(|_| backend == BackendChoice::Host).unwrap_or(1);
    let dispatcher = match Dispatcher::start(DispatchConfig { backend, host_devices, ..Default::default() }) {
        Ok(d) => d,
        Err(e) => return check(name, Level::Fail, format!("cannot start: {e}"), None),
    };
    // A session takes an id when made and is placed (`Dispatcher::place`, another id) at its
    // first request, on the idle device its id names. So with every device idle, each placement
    // made here moves the next session's device by one: at most `n` of them reach `device`.
    let n = devices.unwrap_or(1);
    let mut ran_on = std::collections::BTreeSet::<usize>::new();
    let mut cover = || -> Result<(), String> {
        for device in 0..n {
            // The last session's release, on its way to its device, would skew the placement.
            let idle = Instant::now();
            while dispatcher.devices.iter().any(|d| d.in_flight() > 0) && idle.elapsed() < DEADLINE {
                std::thread::sleep(Duration::from_millis(1));
            }
            for _ in 0..n {
                if (dispatcher.place(0) + 2) % n == device {
                    break;
                }
            }
            let mut session = Session::new(dispatcher.clone(), 0, 0);
            tiny_ops(&mut session)?;
            ran_on.extend(session.device());
        }
        Ok(())
    };
    let outcome = cover().and_then(|()| round_trip(&mut Session::new(dispatcher.clone(), 0, 0))).and_then(|t| {
        match ran_on.len() == n {
            true => Ok(t),
            false => Err(format!("the tiny ops ran on devices {ran_on:?} only, of {n}: the others were not checked")),
        }
    });
    dispatcher.shutdown();
    match outcome {
        Ok(round_trip) => check(
            name,
            Level::Ok,
            format!(
                "add, softmax and matmul match the float64 reference on device {}; tiny add round trip \
                 median {:.1} µs ({:.0} ms in all)",
                ran_on.iter().map(usize::to_string).collect::<Vec<_>>().join(", "),
                round_trip.as_secs_f64() * 1e6,
                started.elapsed().as_secs_f64() * 1e3
            ),
            None,
        ),
        Err(e) => check(name, Level::Fail, e, Some("see docs/CUDA-SETUP.md, Troubleshooting")),
    }
}

const DEADLINE: Duration = Duration::from_secs(10);

fn call(session: &mut Session, call: Result<tensor_wasm_dispatch::Call, i32>, what: &str) -> Result<Done, String> {
    let call = call.map_err(|s| format!("{what}: refused with status {s}"))?;
    session.call_blocking(call, Instant::now() + DEADLINE).map_err(|s| format!("{what}: failed with status {s}"))
}

fn tensor(session: &mut Session, shape: &[u32], data: Vec<f32>) -> Result<i32, String> {
    let upload = session.upload(shape, data);
    match call(session, upload, "upload")? {
        Done::Tensor(h) => Ok(h),
        other => Err(format!("upload answered {other:?}")),
    }
}

fn kernel(session: &mut Session, op: Op, a: i32, b: i32) -> Result<Vec<f32>, String> {
    let run = session.kernel(op, a, b, 0.0);
    let Done::Tensor(out) = call(session, run, &format!("{op:?}"))? else {
        return Err(format!("{op:?} answered no tensor"));
    };
    let download = session.download(out);
    match call(session, download, "download")? {
        Done::Data(data) => Ok(data),
        other => Err(format!("download answered {other:?}")),
    }
}

fn tiny_ops(session: &mut Session) -> Result<(), String> {
    let a: Vec<f32> = (0..6).map(|i| i as f32 * 0.5 - 1.0).collect();
    let b: Vec<f32> = (0..6).map(|i| 1.0 + i as f32 * 0.25).collect();
    let (ha, hb) = (tensor(session, &[2, 3], a.clone())?, tensor(session, &[2, 3], b.clone())?);
    let hm = tensor(session, &[3, 2], b.clone())?;
    let add: Vec<f64> = a.iter().zip(&b).map(|(x, y)| f64::from(*x) + f64::from(*y)).collect();
    let softmax: Vec<f64> = a
        .chunks(3)
        .flat_map(|row| {
            let max = row.iter().fold(f64::MIN, |m, &x| m.max(f64::from(x)));
            let exps: Vec<f64> = row.iter().map(|&x| (f64::from(x) - max).exp()).collect();
            let sum: f64 = exps.iter().sum();
            exps.into_iter().map(move |e| e / sum)
        })
        .collect();
    let matmul: Vec<f64> = (0..2)
        .flat_map(|i| {
            let (a, b) = (&a, &b);
            (0..2).map(move |j| (0..3).map(|k| f64::from(a[i * 3 + k]) * f64::from(b[k * 2 + j])).sum())
        })
        .collect();
    compare("add", &kernel(session, Op::Add, ha, hb)?, &add)?;
    compare("softmax", &kernel(session, Op::Softmax, ha, 0)?, &softmax)?;
    compare("matmul", &kernel(session, Op::Matmul, ha, hm)?, &matmul)
}

fn compare(op: &str, got: &[f32], want: &[f64]) -> Result<(), String> {
    // A NaN (an element nothing wrote) is off too: it is within no bound.
    let within = |g: f32, w: f64| (f64::from(g) - w).abs() <= 1e-5 * w.abs().max(1.0);
    let off = got.len() != want.len() || got.iter().zip(want).any(|(&g, &w)| !within(g, w));
    if off {
        return Err(format!("{op} gave {got:?}, the float64 reference {want:?}"));
    }
    Ok(())
}

/// The median of 200 tiny adds' round trips, each through the rings and back.
fn round_trip(session: &mut Session) -> Result<Duration, String> {
    const ROUNDS: usize = 200;
    let (a, b) = (tensor(session, &[4], vec![1.0; 4])?, tensor(session, &[4], vec![2.0; 4])?);
    let mut times = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let started = Instant::now();
        let add = session.kernel(Op::Add, a, b, 0.0);
        let Done::Tensor(out) = call(session, add, "add")? else { return Err("add answered no tensor".into()) };
        times.push(started.elapsed());
        session.free(out).map_err(|s| format!("free: status {s}"))?;
    }
    times.sort_unstable();
    Ok(times[ROUNDS / 2])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Several host "devices" stand in for GPUs: every one of them runs the tiny ops.
    #[test]
    fn the_computation_check_reaches_every_device() {
        for devices in [1, 2, 3, 4, 8] {
            let c = compute("host", BackendChoice::Host, Some(devices));
            assert_eq!(c.level, Level::Ok, "{devices} devices: {}", c.detail);
            let all: Vec<String> = (0..devices).map(|d| d.to_string()).collect();
            assert!(c.detail.contains(&format!("on device {};", all.join(", "))), "{}", c.detail);
        }
    }
}
