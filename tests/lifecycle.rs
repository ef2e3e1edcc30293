//! The process's life: restart persistence, artifact reuse and recovery, drain on SIGTERM,
//! configuration errors, the I/O driver choice and shard pinning.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{guests, Server};
use serde_json::json;

#[test]
fn functions_survive_restarts_with_their_ids() {
    let dir = tempfile::tempdir().unwrap();
    let (echo, hello, listed) = {
        let server = Server::start_in(dir.path(), &[]);
        let echo = server.deploy("echo", &guests::echo());
        let hello = server.deploy("hello", &guests::hello());
        let gone = server.deploy("gone", &guests::trap());
        assert_eq!(server.client().request("DELETE", &format!("/functions/{gone}"), &[], b"").status, 204);
        let listed = server.client().request("GET", "/functions", &[], b"").json();
        (echo, hello, listed)
    }; // Dropping the server kills it with SIGKILL: nothing is flushed at exit.

    for round in 0..2 {
        let mut server = Server::start_in(dir.path(), &[]);
        let mut c = server.client();
        assert_eq!(c.request("GET", "/functions", &[], b"").json(), listed, "round {round}");
        assert_eq!(c.invoke(&echo, b"[1]").text(), "[1]");
        assert_eq!(c.invoke(&hello, b"").json(), json!({"result": "ok", "function_id": hello}));
        let log = server.wait_for_stderr("stored functions loaded");
        assert!(log.contains("functions=2") && log.contains("recompiled=0"), "{log}");
        server.signal(libc::SIGTERM);
        assert!(server.wait_exit(Duration::from_secs(10)).success());
    }
}

fn artifact_paths(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir.join("modules"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .collect()
}

#[test]
fn corrupt_or_incompatible_artifacts_are_recompiled() {
    let dir = tempfile::tempdir().unwrap();
    let echo = {
        let server = Server::start_in(dir.path(), &[]);
        server.deploy("echo", &guests::echo())
    };
    let artifacts = artifact_paths(dir.path());
    assert_eq!(artifacts.len(), 1);
    let original = std::fs::read(&artifacts[0]).unwrap();

    // 1. Flipped bytes: the checksum catches them before wasmtime sees them.
    let mut corrupt = original.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 0xff;
    std::fs::write(&artifacts[0], &corrupt).unwrap();
    {
        let server = Server::start_in(dir.path(), &[]);
        assert_eq!(server.client().invoke(&echo, b"ok").text(), "ok");
        let log = server.wait_for_stderr("stored functions loaded");
        assert!(log.contains("recompiled=1"), "{log}");
    }
    assert_eq!(std::fs::read(&artifacts[0]).unwrap(), original, "the artifact was rewritten");

    // 2. A well-framed artifact that wasmtime refuses (another version's, say).
    let payload = b"not a wasmtime artifact".to_vec();
    let mut framed = b"TWART01\n".to_vec();
    framed.extend_from_slice(&common::sha256(&payload));
    framed.extend_from_slice(&payload);
    std::fs::write(&artifacts[0], &framed).unwrap();
    let server = Server::start_in(dir.path(), &[]);
    assert_eq!(server.client().invoke(&echo, b"still ok").text(), "still ok");
    server.wait_for_stderr("recompiling");

    // 3. A missing artifact, and a truncated record file next to good ones.
    drop(server);
    std::fs::remove_file(&artifacts[0]).unwrap();
    std::fs::write(dir.path().join("functions/ffffffffffffffffffffffffffffffff.json"), b"{\"id\":").unwrap();
    let server = Server::start_in(dir.path(), &[]);
    assert_eq!(server.client().invoke(&echo, b"again").text(), "again");
    let log = server.wait_for_stderr("stored functions loaded");
    assert!(log.contains("unreadable=1") && log.contains("broken=0"), "{log}");
}

#[test]
fn sigterm_drains_in_flight_requests_then_exits_zero() {
    // A port below the ephemeral range: once this server closes its listener, no other test's
    // server (bound to port 0) can take the port and answer the connects below in its place.
    let listen = common::free_port().to_string();
    let args = ["--listen", &listen, "--drain-grace-ms", "1500", "--drain-timeout-ms", "20000"];
    let mut server = Server::start(&args);
    // Outlasts the grace period, so that the drain is seen waiting for it.
    let busy = server.deploy("busy", &guests::busy(3000));
    let addr = server.addr;
    let id = busy.clone();
    let in_flight = std::thread::spawn(move || common::Client::connect(addr).invoke(&id, b""));
    let mut idle = server.client();
    assert_eq!(idle.request("GET", "/healthz", &[], b"").status, 200);
    common::within(common::IO_TIMEOUT, "the invoke is running", || {
        server.metric("tensor_wasm_active_instances", &[]) >= 1.0
    });

    server.signal(libc::SIGTERM);
    // During the grace period: readiness is off (once the signal is handled), responses close
    // their connections.
    let mut seen = None;
    common::within(common::IO_TIMEOUT, "readiness off after SIGTERM", || {
        let r = server.client().request("GET", "/readyz", &[], b"");
        let off = r.status == 503;
        seen = Some(r);
        off
    });
    let r = seen.unwrap();
    assert_eq!((r.status, r.error_kind().as_str()), (503, "draining"));
    assert_eq!(r.header("connection"), Some("close"));
    assert_eq!(server.client().request("GET", "/healthz", &[], b"").status, 200);

    // After it: no new connections, idle ones closed, the in-flight request finishes.
    common::within(common::IO_TIMEOUT, "the listener closes after the grace period", || {
        std::net::TcpStream::connect(addr).is_err()
    });
    assert!(idle.is_closed(Duration::from_secs(5)));
    let r = in_flight.join().unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, r#"{"done":true}"#));
    assert_eq!(r.header("connection"), Some("close"));
    // It exits once the invoke is done, not at the drain timeout.
    let status = server.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_sigterm_as_soon_as_the_port_accepts_still_drains() {
    // A supervisor may signal the moment the port accepts, before the server has said that it
    // listens. Several starts, since the moment is a race.
    for _ in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let addr = common::free_port();
        let mut child = Command::new(env!("CARGO_BIN_EXE_tensor-wasm"))
            .args(["serve", "--listen", &addr.to_string(), "--shards", "2", "--data-dir"])
            .arg(dir.path())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(started.elapsed() < Duration::from_secs(30), "the port never accepted");
            std::thread::sleep(Duration::from_micros(100));
        }
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = common::wait_exit(&mut child, Duration::from_secs(30), String::new);
        // Killed by the signal, it would have no exit code.
        assert_eq!(status.code(), Some(0), "{status:?}");
    }
}

#[test]
fn drain_timeout_bounds_the_shutdown() {
    let mut server = Server::start(&["--drain-timeout-ms", "300"]);
    let busy = server.client().deploy("busy", &guests::busy(5000), json!({"timeout_ms": 10000})).json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let addr = server.addr;
    let in_flight = std::thread::spawn(move || {
        common::Client::connect(addr).try_request("POST", &format!("/functions/{busy}/invoke"), &[], b"")
    });
    // The guest runs before the signal, or the test would show only a refused connection.
    server.wait_for_metric("tensor_wasm_active_instances", &[], 1.0);
    server.signal(libc::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status:?}: {}", server.stderr());
    // Had the drain waited for the guest (5 s), its request would have been answered 200.
    assert!(in_flight.join().unwrap().is_err(), "the cut request sees its connection close");
}

fn run_cli(args: &[&str]) -> (i32, String) {
    let (code, _, stderr) = common::tensor_wasm(args, &[]);
    (code, stderr)
}

#[test]
fn bad_configuration_exits_2_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"").unwrap();
    let file_arg = file.to_str().unwrap().to_string();
    for args in [
        vec!["serve", "--shards", "0"],
        vec!["serve", "--listen", "not-an-address"],
        vec!["serve", "--max-body-bytes", "0"],
        vec!["serve", "--max-body-bytes", "-5"],
        vec!["serve", "--io-driver", "kqueue"],
        vec!["serve", "--pin-shards", "sometimes"],
        vec!["serve", "--sink-allowed-cidrs", "10.0.0.0/99"],
        vec!["serve", "--sink-allowed-cidrs", "public,nonsense"],
        vec!["serve", "--sink-workers", "4", "--sink-max-inflight-per-tenant", "4"],
        vec!["serve", "--sink-workers", "1", "--sink-max-inflight-per-tenant", "2"],
        vec!["serve", "--sink-max-inflight-per-tenant", "0"],
        vec!["serve", "--sink-max-delivery-ms", "0"],
        vec!["serve", "--gpu", "tpu"],
        vec!["serve", "--rate-limit-qps", "2000000000"],
        vec!["serve", "--dispatch-ring-depth", "0"],
        vec!["serve", "--default-timeout-ms", "9000", "--max-timeout-ms", "1000"],
        vec!["serve", "--no-such-flag"],
        vec!["serve", "--listen", "127.0.0.1:0", "--data-dir", &file_arg],
    ] {
        let (code, stderr) = run_cli(&args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        let lines: Vec<_> = stderr.lines().filter(|l| !l.contains(" INFO ") && !l.contains(" WARN ")).collect();
        assert_eq!(lines.len(), 1, "{args:?}: {stderr}");
        assert!(lines[0].starts_with("tensor-wasm: "), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    let (code, _) = run_cli(&["serve", "--help"]);
    assert_eq!(code, 0);
    let out = Command::new(env!("CARGO_BIN_EXE_tensor-wasm")).args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--listen",
        "TENSOR_WASM_API_LISTEN_ADDR",
        "--shards",
        "TENSOR_WASM_SHARDS",
        "--data-dir",
        "TENSOR_WASM_DATA_DIR",
        "--max-body-bytes",
        "--io-driver",
    ] {
        assert!(help.contains(flag), "serve --help lacks {flag}");
    }
    // Environment variables configure the same settings.
    let out = Command::new(env!("CARGO_BIN_EXE_tensor-wasm"))
        .args(["serve"])
        .env("TENSOR_WASM_SHARDS", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn the_io_driver_is_selectable_and_reported() {
    for (flag, label) in [("epoll", "epoll"), ("auto", "")] {
        let server = Server::start(&["--io-driver", flag]);
        let text = server.client().request("GET", "/metrics", &[], b"").text();
        let line = text.lines().find(|l| l.starts_with("tensor_wasm_shard_io_driver{shard=\"0\"")).unwrap().to_string();
        assert!(line.contains(label), "{line}");
        assert!(line.contains("io_uring") || line.contains("epoll"), "{line}");
        let hello = server.deploy("hello", &guests::hello());
        assert_eq!(server.client().invoke(&hello, b"").status, 200);
    }
}

#[test]
fn a_shard_spins_for_its_window_after_a_request_then_sleeps_and_its_deadlines_still_fire() {
    let window = Duration::from_millis(1500);
    let server = Server::start(&["--shards", "1", "--idle-spin-us", "1500000", "--header-timeout-ms", "300"]);
    let shard_cpu = || {
        let threads = common::threads(server.pid());
        threads.iter().find(|t| t.name == "tw-shard-0").expect("the shard thread").cpu_time
    };
    let cpu_over = |span: Duration| {
        let before = shard_cpu();
        std::thread::sleep(span);
        shard_cpu() - before
    };
    let text = server.client().request("GET", "/metrics", &[], b"").text();
    assert!(text.contains("tensor_wasm_shard_io_driver{shard=\"0\",driver=\"epoll\"} 1"), "auto picks epoll");
    // One shard over this machine's CPUs floats: the operator hears what spinning costs there.
    if common::threads(server.pid()).iter().any(|t| t.name == "tw-shard-0" && t.cpus.contains([',', '-'])) {
        server.wait_for_stderr("shards spin after requests but share their CPUs");
    }

    // Spinning for the window after that request, then asleep. The bounds are loose (a spinning
    // shard takes a whole CPU, a sleeping one next to nothing) for a machine running other tests.
    let spun = cpu_over(Duration::from_secs(1));
    assert!(spun >= Duration::from_millis(250), "spun for {spun:?} of 1 s");
    std::thread::sleep(window);
    let slept = cpu_over(Duration::from_secs(1));
    assert!(slept <= Duration::from_millis(100), "idle, yet took {slept:?} of 1 s");

    // A header deadline fires on time while requests keep the shard spinning.
    let stop = Arc::new(AtomicBool::new(false));
    let busy = {
        let (stop, mut client) = (stop.clone(), server.client());
        std::thread::spawn(move || {
            let started = Instant::now();
            while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(5) {
                assert_eq!(client.request("GET", "/healthz", &[], b"").status, 200);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let mut stalled = server.client();
    stalled.send_raw(b"GET /healthz HTTP/1.1\r\n");
    let sent = Instant::now();
    assert_eq!(stalled.read_response().status, 408);
    let answered = sent.elapsed();
    let spinning = cpu_over(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    busy.join().unwrap();
    assert!(answered < Duration::from_secs(2), "the 300 ms header deadline fired after {answered:?}");
    assert!(spinning >= Duration::from_millis(100), "not spinning meanwhile: {spinning:?} of 500 ms");

    // io_uring takes other threads' wakes only when it sleeps: it does not spin.
    let (code, _, stderr) = common::tensor_wasm(&["serve", "--io-driver", "io-uring", "--idle-spin-us", "50"], &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--idle-spin-us needs the epoll driver"), "{stderr}");
}

#[test]
fn guest_functions_are_named_for_perf_only_when_asked() {
    // A name no other module in the process carries, from the WAT's name section.
    let probe = wat::parse_str(r#"(module (func $tensor_wasm_perf_map_probe (export "_start")))"#).unwrap();
    for (args, named) in [(&["--guest-perf-map"][..], true), (&[][..], false)] {
        let server = Server::start(args);
        let map = std::path::PathBuf::from(format!("/tmp/perf-{}.map", server.pid()));
        let id = server.deploy("probe", &probe);
        assert_eq!(server.client().invoke(&id, b"").status, 200);
        let text = std::fs::read_to_string(&map).unwrap_or_default();
        let _ = std::fs::remove_file(&map);
        // perf's format: start address and size in hex (the address may carry 0x), then the name.
        let line = text.lines().find(|l| l.ends_with(" tensor_wasm_perf_map_probe"));
        assert_eq!(line.is_some(), named, "{args:?}: {}", map.display());
        if let Some(line) = line {
            let hex = |f: &str| u64::from_str_radix(f.trim_start_matches("0x"), 16).is_ok_and(|n| n > 0);
            assert!(line.split(' ').take(2).all(hex), "{line}");
        }
    }
}

#[test]
fn io_uring_blocked_by_seccomp_falls_back_to_epoll() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(dir.path(), &[], common::deny_io_uring);
    let text = server.client().request("GET", "/metrics", &[], b"").text();
    for shard in ["0", "1"] {
        let series = format!("tensor_wasm_shard_io_driver{{shard=\"{shard}\",driver=\"epoll\"}} 1");
        assert!(text.contains(&series), "{text}");
    }
    let stderr = server.wait_for_stderr("io_uring unavailable");
    assert_eq!(stderr.matches("io_uring unavailable").count(), 1, "said once:\n{stderr}");
    let echo = server.deploy("echo", &guests::echo());
    assert_eq!(server.client().invoke(&echo, b"[42]").text(), "[42]");

    // Asked for io_uring alone, the server refuses to start rather than run on something else.
    // A data dir of its own: the first server still holds this one's lock.
    let other = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tensor-wasm"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--io-driver", "io-uring", "--data-dir"]).arg(other.path());
    common::deny_io_uring(&mut cmd);
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("io_uring unavailable"));
}

/// The CPU lists of the threads whose names start with `prefix`, in name order.
fn cpu_lists(threads: &[common::ThreadInfo], prefix: &str) -> Vec<String> {
    let mut named: Vec<_> = threads.iter().filter(|t| t.name.starts_with(prefix)).collect();
    named.sort_by_key(|t| t.name.clone());
    named.iter().map(|t| t.cpus.clone()).collect()
}

/// Each shard thread's CPU list and each device worker's, in order, and the process's main
/// thread's.
fn shard_cpu_lists(server: &Server) -> (Vec<String>, Vec<String>, String) {
    let threads = common::threads(server.pid());
    let process = threads.iter().find(|t| t.tid == server.pid()).unwrap().cpus.clone();
    (cpu_lists(&threads, "tw-shard-"), cpu_lists(&threads, "tw-device-"), process)
}

#[test]
fn shards_and_device_workers_are_pinned_only_where_each_has_a_cpu_of_its_own() {
    use std::os::unix::process::CommandExt as _;
    use tensor_wasm::cpu;
    let allowed = cpu::allowed_cpus().unwrap();
    let Some(two) = allowed.get(..2) else {
        eprintln!("one CPU: nothing to pin or float");
        return;
    };
    let (first, second, both) = (two[0].to_string(), two[1].to_string(), cpu::format_list(two));
    let set = cpu::cpu_set(two).unwrap();
    // SAFETY: one sched_setaffinity call on a set built before the fork.
    let on_two_cpus = |cmd: &mut Command| unsafe {
        cmd.pre_exec(move || cpu::apply_cpu_set(&set));
    };
    let dir = tempfile::tempdir().unwrap();
    // (flags, each shard's CPUs, each worker's CPUs, what the log says)
    type Case<'a> = (&'a [&'a str], Vec<String>, Vec<String>, &'a str);
    let cases: [Case; 6] = [
        // One shard per allowed CPU: each owns its CPU, as under Kubernetes' static policy; the
        // device worker has none left, and floats.
        (&["--shards", "2"], vec![first.clone(), second.clone()], vec![both.clone()], "shards pinned, one per CPU"),
        (&["--shards", "2", "--pin-shards", "never"], vec![both.clone(); 2], vec![both.clone()], "shards not pinned"),
        // One CPU for the shard and one for the host back-end's worker: each gets its own.
        (&["--shards", "1"], vec![first.clone()], vec![second.clone()], "device workers pinned, one per CPU"),
        // More threads than CPUs: a shared set, where pinning would stack replicas on one CPU.
        (&["--shards", "1", "--gpu-host-devices", "2"], vec![both.clone()], vec![both.clone(); 2], "shards not pinned"),
        (&["--shards", "1", "--pin-shards", "never"], vec![both.clone()], vec![both.clone()], "shards not pinned"),
        (
            &["--shards", "1", "--gpu-host-devices", "2", "--pin-shards", "always"],
            vec![first.clone()],
            vec![both.clone(); 2],
            "shards pinned, one per CPU",
        ),
    ];
    for (args, shards, workers, log) in cases {
        let args: Vec<&str> = ["--gpu", "host"].iter().chain(args).copied().collect();
        let server = Server::start_with(dir.path(), &args, on_two_cpus);
        assert_eq!(shard_cpu_lists(&server), (shards, workers, both.clone()), "{args:?}");
        server.wait_for_stderr(log);
        let hello = server.deploy("hello", &guests::hello());
        assert_eq!(server.client().invoke(&hello, b"").status, 200, "{args:?}");
    }
}

#[test]
fn the_default_shard_count_follows_the_cgroups_cpu_limit() {
    use std::io::BufRead as _;
    use std::os::fd::AsRawFd as _;
    use std::os::unix::process::CommandExt as _;
    // A real cgroup needs a writable v1 cpu controller (root, as on the development VM); where
    // there is none, cpu.rs's unit tests read the same files from a temporary directory.
    let cgroup = std::path::Path::new("/sys/fs/cgroup/cpu").join(format!("tensor-wasm-test-{}", std::process::id()));
    if tensor_wasm::cpu::allowed_cpus().unwrap().len() < 2 || std::fs::create_dir(&cgroup).is_err() {
        eprintln!("no second CPU or no writable cgroup v1 cpu controller: not run");
        return;
    }
    struct Removed<'a>(&'a std::path::Path);
    impl Drop for Removed<'_> {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(self.0);
        }
    }
    let _removed = Removed(&cgroup);
    // Half a CPU per 100 ms period, as a Kubernetes limit of `500m` sets it.
    std::fs::write(cgroup.join("cpu.cfs_quota_us"), "50000").unwrap();
    let procs = std::fs::OpenOptions::new().write(true).open(cgroup.join("cgroup.procs")).unwrap();
    let fd = procs.as_raw_fd();
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tensor-wasm"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--log-level", "info", "--data-dir"]).arg(dir.path());
    cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
    // SAFETY: one write(2) of a static byte between fork and exec: "0" moves the writer itself.
    unsafe {
        cmd.pre_exec(move || match libc::write(fd, b"0".as_ptr().cast(), 1) {
            1 => Ok(()),
            _ => Err(std::io::Error::last_os_error()),
        });
    }
    let mut child = cmd.spawn().unwrap();
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    // The server either says it listens or exits, which ends the lines.
    let log: Vec<String> = stderr.lines().map_while(Result::ok).take_while(|l| !l.contains("listening")).collect();
    let _ = child.kill();
    let _ = child.wait();
    let log = log.join("\n");
    assert!(log.contains("shards not pinned") && log.contains("shards=1 "), "{log}");
}

#[test]
fn metrics_expose_the_contract() {
    let server = Server::start(&[]);
    let hello = server.deploy("hello", &guests::hello());
    let mut c = server.client();
    assert_eq!(c.invoke(&hello, b"{}").status, 200);
    let r = c.request("GET", "/metrics", &[], b"");
    assert!(r.header("content-type").unwrap().starts_with("text/plain; version=0.0.4"));
    let text = r.text();
    for needle in [
        "# TYPE tensor_wasm_http_requests_total counter",
        "tensor_wasm_http_requests_total{route=\"/functions/:id/invoke\",method=\"POST\",status=\"200\"} 1",
        "tensor_wasm_http_requests_total{route=\"/functions\",method=\"POST\",status=\"201\"} 1",
        "# TYPE tensor_wasm_http_request_duration_seconds histogram",
        "tensor_wasm_http_request_duration_seconds_bucket{route=\"/functions/:id/invoke\",method=\"POST\",le=\"0.00005\"}",
        "tensor_wasm_http_request_duration_seconds_bucket{route=\"/functions/:id/invoke\",method=\"POST\",le=\"10\"} 1",
        "tensor_wasm_http_request_duration_seconds_bucket{route=\"/functions/:id/invoke\",method=\"POST\",le=\"+Inf\"} 1",
        "tensor_wasm_http_request_duration_seconds_count{route=\"/functions/:id/invoke\",method=\"POST\"} 1",
        "tensor_wasm_active_instances 0",
        "tensor_wasm_instance_spawns_total 1",
        "tensor_wasm_functions_total 1",
        "tensor_wasm_shards 2",
        "tensor_wasm_build_info{version=",
    ] {
        assert!(text.contains(needle), "missing {needle}\n{text}");
    }
    assert!(!text.contains("summary"));
}
