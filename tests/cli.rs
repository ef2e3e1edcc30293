//! The operator's commands against a real server: the client commands, `token generate`,
//! `observe`, and `backup`/`restore`.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::{guests, tensor_wasm as run, Server};
use serde_json::Value;

fn url(server: &Server) -> String {
    format!("http://{}", server.addr)
}

#[test]
fn client_commands_with_a_generated_token() {
    // A token made by `token generate`, used as the server's token list and the client's token.
    let (code, out, err) = run(&["token", "generate", "--tenant", "7"], &[]);
    assert_eq!(code, 0, "{err}");
    let field = |name: &str| out.lines().find_map(|l| l.strip_prefix(name)).unwrap().trim().to_string();
    let (token, entry) = (field("token:"), field("entry:"));
    assert_eq!(token.len(), 64);
    assert_eq!(entry, format!("{token}:tenant=7"));
    let data = tempfile::tempdir().unwrap();
    let server = Server::start_with(data.path(), &[], |cmd| {
        cmd.env("TENSOR_WASM_API_TOKENS", &entry);
    });
    let env = [
        ("TENSOR_WASM_SERVER", url(&server)),
        ("TENSOR_WASM_TOKEN", token.clone()),
        ("TENSOR_WASM_TENANT", "7".into()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();

    let dir = tempfile::tempdir().unwrap();
    let wasm = dir.path().join("stats.wasm");
    std::fs::write(&wasm, guests::rust_json_stats()).unwrap();
    let (code, out, err) = run(&["deploy", wasm.to_str().unwrap(), "--name", "stats", "--timeout-ms", "2000"], &env);
    assert_eq!(code, 0, "{err}");
    let deployed: Value = serde_json::from_str(&out).unwrap();
    let id = deployed["id"].as_str().unwrap();
    assert_eq!(deployed["timeout_ms"], 2000);

    let (code, out, _) = run(&["functions", "list"], &env);
    assert_eq!(code, 0);
    assert!(out.lines().nth(1).unwrap().starts_with(&format!("{id}  stats")), "{out}");
    let (code, out, _) = run(&["functions", "get", id], &env);
    assert_eq!((code, serde_json::from_str::<Value>(&out).unwrap()["name"].as_str()), (0, Some("stats")));

    // Bodies inline, from a file, and from stdin.
    let body = dir.path().join("body.json");
    std::fs::write(&body, br#"{"values":[1,2,3]}"#).unwrap();
    let (code, out, _) = run(&["invoke", id, "--data", r#"{"values":[4]}"#], &env);
    assert_eq!((code, serde_json::from_str::<Value>(&out).unwrap()["sum"].as_f64()), (0, Some(4.0)));
    let (_, out, _) = run(&["invoke", id, "--data", &format!("@{}", body.display())], &env);
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["sum"], 6.0);
    let mut child = Command::new(env!("CARGO_BIN_EXE_tensor-wasm"))
        .args(["invoke", id, "-d", "-", "--server", &url(&server), "--token", &token, "--tenant", "7"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(br#"{"values":[10,20]}"#).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(serde_json::from_slice::<Value>(&out.stdout).unwrap()["sum"], 30.0);

    // Errors are sentences and a non-zero exit.
    let (code, _, err) = run(&["invoke", id, "--data", "not json"], &env);
    assert_eq!(code, 1);
    assert!(
        err.starts_with("error: the server refused: the function exited with code 2 (HTTP 502 guest_exit)"),
        "{err}"
    );
    let (code, _, err) = run(&["functions", "list", "--tenant", "8"], &env);
    assert_eq!(code, 1);
    assert!(err.contains("may not act for tenant 8") && err.contains("403 tenant_scope_denied"), "{err}");
    let (code, _, err) = run(&["functions", "list", "--token", "wrong-token-wrong-token"], &env);
    assert!(code == 1 && err.contains("401 unauthorized"), "{err}");
    let (code, _, err) = run(&["deploy", "/nonexistent.wasm", "--name", "x"], &env);
    assert!(code == 1 && err.contains("cannot read /nonexistent.wasm"), "{err}");
    let (code, _, err) = run(&["functions", "list", "--server", "ftp://127.0.0.1"], &env);
    assert!(code == 1 && err.contains("only http:// and https://"), "{err}");
    let (code, _, err) = run(&["token", "generate"], &[]);
    assert!(code == 2 && err.contains("--tenant"), "{err}");

    let (code, out, _) = run(&["functions", "delete", id], &env);
    assert_eq!((code, out.trim()), (0, format!("deleted {id}").as_str()));
    assert_eq!(run(&["functions", "get", id], &env).0, 1);
    let (code, out, _) = run(&["token", "generate", "--all-tenants"], &[]);
    assert!(code == 0 && out.contains(":tenant=*"));
}

#[test]
fn observe_once_reports_health() {
    let server = Server::start(&[]);
    let id = server.deploy("hello", &guests::hello());
    let mut client = server.client();
    for _ in 0..20 {
        assert_eq!(client.invoke(&id, b"").status, 200);
    }
    let (code, out, err) = run(&["observe", "--once", "--interval", "200ms", "--server", &url(&server)], &[]);
    assert_eq!(code, 0, "{out}{err}");
    for expected in ["healthz 200   readyz 200", "functions 1", "audit        ok", "HEALTHY"] {
        assert!(out.contains(expected), "missing {expected:?} in:\n{out}");
    }
    assert_eq!(
        out.lines().filter(|l| l.starts_with("0 ") || l.starts_with("1 ")).count(),
        2,
        "one row per shard:\n{out}"
    );

    // 5xx above 0.5% of the window's answers: unhealthy, exit 1. The failing invokes run while
    // observe measures.
    let trap = server.deploy("trap", &guests::trap());
    let addr = server.addr;
    let load = std::thread::spawn(move || {
        let mut client = common::Client::connect(addr);
        for _ in 0..40 {
            client.invoke(&trap, b"");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    });
    let (code, out, _) = run(&["observe", "--once", "--interval", "300ms", "--server", &url(&server)], &[]);
    load.join().unwrap();
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("UNHEALTHY: 5xx are"), "{out}");
    // The window's invokes have a P95, read from the server's histogram; no kernel ran.
    let p95 = out.lines().find(|l| l.starts_with("P95")).unwrap_or_default();
    assert!(p95.contains(" invoke ") && !p95.contains("invoke -") && p95.ends_with("dispatch -"), "{out}");

    // Unreachable: exit 2 with a sentence.
    drop(server);
    let (code, _, err) = run(&["observe", "--once", "--server", &format!("http://{addr}")], &[]);
    assert_eq!(code, 2);
    assert!(err.starts_with("error: cannot read"), "{err}");
}

#[test]
fn observe_needs_the_metrics_token_when_one_is_set() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start_with(data.path(), &[], |cmd| {
        cmd.env("TENSOR_WASM_API_METRICS_TOKEN", "metrics-0123456789abcdef");
    });
    let (code, _, err) = run(&["observe", "--once", "--interval", "100ms", "--server", &url(&server)], &[]);
    assert!(code == 2 && err.contains("is --token needed?"), "{err}");
    let (code, out, _) = run(
        &["observe", "--once", "--interval", "100ms", "--server", &url(&server), "--token", "metrics-0123456789abcdef"],
        &[],
    );
    assert_eq!(code, 0, "{out}");
}

fn audit_verify(dir: &Path) -> (i32, String, String) {
    run(&["audit", "verify", dir.to_str().unwrap()], &[])
}

#[test]
fn a_backup_taken_while_serving_restores_into_a_fresh_server() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start_in(data.path(), &["--audit-segment-bytes", "65536", "--audit-sync", "always"]);
    let hello = server.deploy("hello", &guests::hello());
    let stats = server.deploy("stats", &guests::rust_json_stats());
    let doomed = server.deploy("doomed", &guests::hello());
    let r = server.client().request(
        "POST",
        "/pipelines",
        &[],
        serde_json::json!({"name": "twice", "steps": [stats.clone()]}).to_string().as_bytes(),
    );
    assert_eq!(r.status, 201);
    let pipeline = r.json()["id"].as_str().unwrap().to_string();
    assert_eq!(server.client().request("DELETE", &format!("/functions/{doomed}"), &[], b"").status, 204);
    // Enough records to seal a few segments on each shard.
    let mut client = server.client();
    for _ in 0..600 {
        assert_eq!(client.invoke(&hello, b"").status, 200);
    }

    // Taken while the server keeps serving.
    let (addr, id) = (server.addr, hello.clone());
    let load = std::thread::spawn(move || {
        let mut client = common::Client::connect(addr);
        (0..200).all(|_| client.invoke(&id, b"").status == 200)
    });
    let backup = tempfile::tempdir().unwrap();
    let out_dir = backup.path().join("b1");
    let data_dir = data.path().to_str().unwrap();
    let (code, out, err) = run(&["backup", out_dir.to_str().unwrap(), "--data-dir", data_dir], &[]);
    assert!(load.join().unwrap(), "invokes failed during the backup");
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("backed up: 2 functions, 1 pipelines, 2 modules, "), "{out}");
    let sealed: usize = out.split(", ").nth(3).unwrap().split(' ').next().unwrap().parse().unwrap();
    assert!(sealed >= 2, "{out}");
    let (code, _, err) = run(&["backup", out_dir.to_str().unwrap(), "--data-dir", data_dir], &[]);
    assert!(code == 1 && err.contains("is not empty"), "{err}");

    // Restored into a fresh data dir, it serves the same functions and pipeline.
    let fresh = tempfile::tempdir().unwrap();
    let fresh_dir = fresh.path().to_str().unwrap();
    let (code, out, err) = run(&["restore", out_dir.to_str().unwrap(), "--data-dir", fresh_dir], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with(&format!("restored: 2 functions, 1 pipelines, 2 modules, {sealed} audit segments")),
        "{out}"
    );
    let (code, out, err) = audit_verify(&fresh.path().join("audit"));
    assert_eq!(code, 0, "{out}{err}");
    let restored = Server::start_in(fresh.path(), &[]);
    assert_eq!(restored.client().invoke(&hello, b"").status, 200);
    assert_eq!(restored.client().invoke(&doomed, b"").status, 404);
    let r = restored.client().request("POST", &format!("/pipelines/{pipeline}/invoke"), &[], br#"{"values":[2,3]}"#);
    assert_eq!(r.json()["sum"], 5.0);
    drop(restored);

    // Restore refuses a data dir in use and a damaged backup, and says why.
    let (code, _, err) = run(&["restore", out_dir.to_str().unwrap(), "--data-dir", fresh_dir], &[]);
    assert!(code == 1 && err.contains("restore into an empty data dir"), "{err}");
    let record = std::fs::read_dir(out_dir.join("functions")).unwrap().next().unwrap().unwrap().path();
    let mut bytes = std::fs::read(&record).unwrap();
    bytes[10] ^= 1;
    std::fs::write(&record, bytes).unwrap();
    let empty = tempfile::tempdir().unwrap();
    let (code, _, err) =
        run(&["restore", out_dir.to_str().unwrap(), "--data-dir", empty.path().to_str().unwrap()], &[]);
    assert!(code == 1 && err.contains("the backup is damaged"), "{err}");
    assert!(!empty.path().join("functions").exists(), "nothing is written from a damaged backup");
}

#[test]
fn doctor_checks_this_host_and_fails_on_what_the_server_could_not_use() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let data = data_dir.to_str().unwrap();
    let (code, out, err) = run(&["doctor", "--data-dir", data], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("host back-end") && out.contains("match the float64 reference"), "{out}");
    assert!(!data_dir.exists(), "the doctor creates nothing");

    let (code, out, _) = run(&["doctor", "--data-dir", data, "--json"], &[]);
    assert_eq!(code, 0, "{out}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["ok"], true);
    let checks = report["checks"].as_array().unwrap();
    let names: Vec<&str> = checks.iter().map(|c| c["name"].as_str().unwrap()).collect();
    for name in ["cpus", "memlock", "io_uring", "data dir", "clock source", "host back-end"] {
        assert!(names.contains(&name), "{names:?}");
    }
    let host = checks.iter().find(|c| c["name"] == "host back-end").unwrap();
    assert_eq!(host["level"], "ok", "{host}");

    // A data dir that cannot be written: a path below a plain file.
    let file = dir.path().join("file");
    std::fs::write(&file, b"").unwrap();
    let below = file.join("data");
    let (code, out, _) = run(&["doctor", "--data-dir", below.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAIL  data dir") && out.contains("fix:"), "{out}");

    // Less room than the audit reserve: every deploy would be refused.
    let (code, out, _) = run(&["doctor", "--data-dir", data, "--audit-reserve-mb", "1000000000"], &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("under the audit reserve"), "{out}");

    // A GPU node that lost its driver fails when the GPU is required.
    let gpu = checks.iter().find(|c| c["name"] == "gpu");
    if gpu.is_some_and(|g| g["detail"].as_str().unwrap().contains("no NVIDIA driver")) {
        let (code, out, _) = run(&["doctor", "--data-dir", data, "--require-gpu"], &[]);
        assert_eq!(code, 1, "{out}");
        assert!(out.contains("FAIL  gpu"), "{out}");
    }
}
