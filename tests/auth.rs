//! Bearer tokens, tenant scopes, tenant isolation and token rotation, against a real server.

mod common;

use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use common::{guests, within, Client, Response, Server};
use serde_json::json;

const ADMIN: &str = "admin-0123456789abcdef0123456789";
const SVC7: &str = "svc7-0123456789abcdef0123456789ab";
const FLEET: &str = "fleet-0123456789abcdef0123456789a";
const METRICS: &str = "metrics-0123456789abcdef01234567";

fn token_list() -> String {
    format!("{ADMIN}:tenant=*,{SVC7}:tenant=7,{FLEET}:tenant=1,2,3")
}

fn start_with_tokens(args: &[&str]) -> (Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(dir.path(), args, |cmd| {
        cmd.env("TENSOR_WASM_API_TOKENS", token_list()).env("TENSOR_WASM_API_TOKEN_ID_KEY", "test-key");
    });
    (server, dir)
}

/// A request with an optional bearer token and tenant header.
fn call(c: &mut Client, method: &str, path: &str, token: Option<&str>, tenant: Option<&str>, body: &[u8]) -> Response {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = Vec::new();
    if let Some(a) = &auth {
        headers.push(("authorization", a.as_str()));
    }
    if let Some(t) = tenant {
        headers.push(("x-tensor-wasm-tenant", t));
    }
    c.request(method, path, &headers, body)
}

fn deploy_body(name: &str) -> Vec<u8> {
    json!({"name": name, "wasm_b64": base64::engine::general_purpose::STANDARD.encode(guests::hello())})
        .to_string()
        .into_bytes()
}

#[test]
fn bearer_tokens_and_tenant_scopes() {
    let (server, _dir) = start_with_tokens(&[]);
    let mut c = server.client();

    // Probes stay open; function routes need a valid bearer.
    assert_eq!(call(&mut c, "GET", "/healthz", None, None, b"").status, 200);
    assert_eq!(call(&mut c, "GET", "/readyz", None, None, b"").status, 200);
    assert_eq!(call(&mut c, "GET", "/metrics", None, None, b"").status, 200);
    for (label, header) in [
        ("none", None),
        ("unknown", Some(format!("Bearer {}", "x".repeat(32)))),
        ("prefix of a real token", Some(format!("Bearer {}", &ADMIN[..20]))),
        ("basic scheme", Some(format!("Basic {ADMIN}"))),
        ("empty", Some("Bearer ".to_string())),
    ] {
        let headers: Vec<(&str, &str)> = header.iter().map(|h| ("authorization", h.as_str())).collect();
        let r = c.request("GET", "/functions", &headers, b"");
        assert_eq!((r.status, r.error_kind().as_str()), (401, "unauthorized"), "{label}");
        assert_eq!(r.header("www-authenticate"), Some("Bearer realm=\"tensor-wasm\""), "{label}");
    }
    // The scheme is case-insensitive.
    assert_eq!(c.request("GET", "/functions", &[("authorization", &format!("bearer {ADMIN}"))], b"").status, 200);

    // Scopes: svc7 acts for 7 only (and not for the default tenant 0); fleet for 1, 2, 3.
    assert_eq!(call(&mut c, "POST", "/functions", Some(SVC7), Some("7"), &deploy_body("a")).status, 201);
    for (token, tenant) in [(SVC7, Some("8")), (SVC7, None), (FLEET, Some("4")), (FLEET, Some("0"))] {
        let r = call(&mut c, "GET", "/functions", Some(token), tenant, b"");
        assert_eq!((r.status, r.error_kind().as_str()), (403, "tenant_scope_denied"), "{tenant:?}");
    }
    for tenant in ["1", "2", "3"] {
        assert_eq!(call(&mut c, "GET", "/functions", Some(FLEET), Some(tenant), b"").status, 200);
    }
    assert_eq!(call(&mut c, "GET", "/functions", Some(ADMIN), Some("18446744073709551615"), b"").status, 200);

    // Bad tenant headers.
    for bad in ["abc", "-1", "1.5", "18446744073709551616", ""] {
        let r = call(&mut c, "GET", "/functions", Some(ADMIN), Some(bad), b"");
        assert_eq!((r.status, r.error_kind().as_str()), (400, "invalid_tenant"), "{bad:?}");
    }
    let auth = format!("Bearer {ADMIN}");
    let r = c.request(
        "GET",
        "/functions",
        &[("authorization", &auth), ("x-tensor-wasm-tenant", "7"), ("X-Tensor-Wasm-Tenant", "7")],
        b"",
    );
    assert_eq!((r.status, r.error_kind().as_str()), (400, "duplicate_tenant_header"));

    // 401 comes before any tenant check, so nothing leaks to an anonymous caller.
    let r = call(&mut c, "GET", "/functions", None, Some("abc"), b"");
    assert_eq!(r.status, 401);

    // Tokens never appear in the log.
    let log = server.stderr();
    for t in [ADMIN, SVC7, FLEET] {
        assert!(!log.contains(t), "a token reached the log");
    }
}

#[test]
fn tenants_see_only_their_own_functions() {
    let (server, _dir) = start_with_tokens(&[]);
    let mut c = server.client();
    let r = call(&mut c, "POST", "/functions", Some(SVC7), Some("7"), &deploy_body("mine"));
    let id = r.json()["id"].as_str().unwrap().to_string();
    let r = call(&mut c, "POST", "/functions", Some(ADMIN), Some("8"), &deploy_body("theirs"));
    let other = r.json()["id"].as_str().unwrap().to_string();

    // Tenant 8 (via the wildcard token) cannot see, run or delete tenant 7's function: 404, not 403.
    for (method, path) in [
        ("GET", format!("/functions/{id}")),
        ("POST", format!("/functions/{id}/invoke")),
        ("DELETE", format!("/functions/{id}")),
    ] {
        let r = call(&mut c, method, &path, Some(ADMIN), Some("8"), b"");
        assert_eq!((r.status, r.error_kind().as_str()), (404, "function_not_found"), "{method} {path}");
    }
    let listed = call(&mut c, "GET", "/functions", Some(ADMIN), Some("8"), b"").json();
    let ids: Vec<_> = listed["functions"].as_array().unwrap().iter().map(|f| f["id"].clone()).collect();
    assert_eq!(ids, vec![json!(other)]);

    // Tenant 7 sees and runs its own.
    let listed = call(&mut c, "GET", "/functions", Some(SVC7), Some("7"), b"").json();
    assert_eq!(listed["functions"].as_array().unwrap().len(), 1);
    let r = call(&mut c, "POST", &format!("/functions/{id}/invoke"), Some(SVC7), Some("7"), b"{}");
    assert_eq!(r.json(), json!({"result": "ok", "function_id": id}));
    // ... and the delete tenant 8 attempted did not happen.
    assert_eq!(call(&mut c, "DELETE", &format!("/functions/{id}"), Some(SVC7), Some("7"), b"").status, 204);

    // Ownership survives a restart.
    drop(c);
    let dir = server.data_dir.clone();
    drop(server);
    let server = Server::start_with(&dir, &[], |cmd| {
        cmd.env("TENSOR_WASM_API_TOKENS", token_list());
    });
    let mut c = server.client();
    assert_eq!(call(&mut c, "GET", &format!("/functions/{other}"), Some(ADMIN), Some("8"), b"").status, 200);
    assert_eq!(call(&mut c, "GET", &format!("/functions/{other}"), Some(ADMIN), Some("7"), b"").status, 404);
}

#[test]
fn require_tenant_and_the_metrics_token() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(dir.path(), &["--require-tenant"], |cmd| {
        cmd.env("TENSOR_WASM_API_TOKENS", token_list()).env("TENSOR_WASM_API_METRICS_TOKEN", METRICS);
    });
    let mut c = server.client();
    let r = call(&mut c, "GET", "/functions", Some(ADMIN), None, b"");
    assert_eq!((r.status, r.error_kind().as_str()), (400, "missing_tenant"));
    assert_eq!(call(&mut c, "GET", "/functions", Some(ADMIN), Some("0"), b"").status, 200);

    let r = call(&mut c, "GET", "/metrics", None, None, b"");
    assert_eq!((r.status, r.error_kind().as_str()), (401, "unauthorized"));
    assert_eq!(
        call(&mut c, "GET", "/metrics", Some(ADMIN), None, b"").status,
        401,
        "function tokens are not metrics tokens"
    );
    assert_eq!(call(&mut c, "GET", "/metrics", Some(METRICS), None, b"").status, 200);
    assert_eq!(call(&mut c, "GET", "/healthz", None, None, b"").status, 200);

    // The env var form of the boolean works as Helm sets it.
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(dir.path(), &[], |cmd| {
        cmd.env("TENSOR_WASM_API_TOKENS", token_list()).env("TENSOR_WASM_API_REQUIRE_TENANT", "true");
    });
    assert_eq!(call(&mut server.client(), "GET", "/functions", Some(ADMIN), None, b"").status, 400);
}

#[test]
fn dev_mode_is_loopback_only_and_tenant_aware() {
    let server = Server::start(&[]);
    let mut c = server.client();
    let r = call(&mut c, "POST", "/functions", None, Some("5"), &deploy_body("dev"));
    assert_eq!(r.status, 201);
    let id = r.json()["id"].as_str().unwrap().to_string();
    assert_eq!(call(&mut c, "GET", &format!("/functions/{id}"), None, Some("5"), b"").status, 200);
    assert_eq!(call(&mut c, "GET", &format!("/functions/{id}"), None, None, b"").status, 404);

    let run = |args: &[&str], env: &[(&str, &str)]| {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tensor-wasm"));
        cmd.arg("serve").args(args).arg("--data-dir").arg(dir.path());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    // No tokens on a non-loopback address: refused.
    let (code, stderr) = run(&["--listen", "0.0.0.0:0"], &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--allow-unauthenticated"), "{stderr}");
    // A token list that does not parse: refused, naming the entry, never the token.
    let secret = "s3cret-s3cret-s3cret-s3cret";
    let (code, stderr) = run(
        &["--listen", "127.0.0.1:0"],
        &[("TENSOR_WASM_API_TOKENS", &format!("{ADMIN}:tenant=*,{secret}:tenant=x"))],
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("entry 2"), "{stderr}");
    assert!(!stderr.contains(secret) && !stderr.contains(ADMIN), "{stderr}");
    let (code, stderr) = run(&["--listen", "127.0.0.1:0"], &[("TENSOR_WASM_API_TOKENS", " , ")]);
    assert_eq!(code, Some(2), "{stderr}");
    let (code, _) = run(
        &["--listen", "127.0.0.1:0", "--api-tokens-file", "/nonexistent"],
        &[("TENSOR_WASM_API_TOKENS", &token_list())],
    );
    assert_eq!(code, Some(2));

    // With --allow-unauthenticated it starts, and says so loudly.
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(dir.path(), &["--listen", "0.0.0.0:0", "--allow-unauthenticated"], |_| {});
    server.wait_for_stderr("SERVING WITHOUT AUTHENTICATION");
}

#[test]
fn token_file_rotation_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens");
    let write = |content: &str| {
        // Like a Secret update: a new file renamed over the old one.
        let tmp = dir.path().join("tokens.tmp");
        std::fs::write(&tmp, content).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
    };
    write(&format!("{ADMIN}:tenant=*\n"));
    let data = dir.path().join("data");
    let server = Server::start_with(&data, &["--api-tokens-file", file.to_str().unwrap()], |_| {});
    let mut c = server.client();
    let works = |c: &mut Client, token: &str| call(c, "GET", "/functions", Some(token), None, b"").status == 200;
    // The promise is a second, measured in a release build by perf/token-rotation.py; a debug
    // build sharing CI's CPUs with every other test gets more room.
    let takes_effect = |c: &mut Client, token: &str, want: bool| {
        within(Duration::from_secs(5), "the token's new state", || works(c, token) == want);
    };
    assert!(works(&mut c, ADMIN));
    assert!(!works(&mut c, SVC7));

    // Rotation: old and new overlap, then the old one goes.
    write(&format!("{ADMIN}:tenant=*\n{SVC7}:tenant=0\n"));
    takes_effect(&mut c, SVC7, true);
    assert!(works(&mut c, ADMIN));
    write(&format!("{SVC7}:tenant=0\n"));
    takes_effect(&mut c, ADMIN, false);

    // A broken file is ignored: the previous list keeps serving.
    write("garbage");
    server.wait_for_stderr("keeping the previous token list");
    assert!(works(&mut c, SVC7));

    // SIGHUP re-reads even when the file looks unchanged: same inode, size and modification time.
    // The content is rewritten in place and the old time put back; a poll that falls between the
    // two sees the new time and reloads, so such a try is made again (at most five).
    let path = std::ffi::CString::new(file.to_str().unwrap()).unwrap();
    let unnoticed = (0..5).any(|_| {
        write(&format!("{FLEET}:tenant=0\n"));
        takes_effect(&mut c, FLEET, true);
        let modified =
            std::fs::metadata(&file).unwrap().modified().unwrap().duration_since(std::time::UNIX_EPOCH).unwrap();
        std::fs::write(&file, format!("{}:tenant=0\n", "z".repeat(FLEET.len()))).unwrap();
        let mtime = libc::timespec { tv_sec: modified.as_secs() as i64, tv_nsec: modified.subsec_nanos() as i64 };
        // SAFETY: utimensat on a path we own, with two valid timespecs.
        assert_eq!(unsafe { libc::utimensat(libc::AT_FDCWD, path.as_ptr(), [mtime, mtime].as_ptr(), 0) }, 0);
        std::thread::sleep(Duration::from_millis(600));
        works(&mut c, FLEET)
    });
    assert!(unnoticed, "every try, the poll alone saw the change");
    server.signal(libc::SIGHUP);
    takes_effect(&mut c, FLEET, false);
    server.wait_for_stderr("reason=\"SIGHUP\"");
    assert_eq!(call(&mut c, "GET", "/healthz", None, None, b"").status, 200, "SIGHUP does not stop the server");
}
