//! The module store trusts no file it did not check, repairs itself from the next deploy of the
//! same bytes, sweeps what a crash left, and never drops an acknowledged function silently: one it
//! cannot load is listed as broken (docs/API.md, "POST /functions").

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::starve::{last_cpu, on_cpu, CpuHog};
use common::{guests, tensor_wasm, Server};
use serde_json::json;

fn module_file(dir: &Path, wasm: &[u8], extension: &str) -> PathBuf {
    let hex: String = common::sha256(wasm).iter().map(|b| format!("{b:02x}")).collect();
    dir.join("modules").join(format!("{hex}.{extension}"))
}

/// A module whose bytes differ per `n` (a data segment), so each has a file of its own.
fn numbered(n: u32) -> Vec<u8> {
    guests::wasm(&format!(r#"(module (memory 1) (data (i32.const 0) "module-{n}") (func (export "_start")))"#))
}

fn stop(mut server: Server) {
    server.signal(libc::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(10)).success());
}

/// Deploys each `(name, module)` on a server over `dir`, stops it cleanly; returns the ids.
fn deployed(dir: &Path, modules: &[(&str, &[u8])]) -> Vec<String> {
    let server = Server::start_in(dir, &[]);
    let ids = modules.iter().map(|(name, wasm)| server.deploy(name, wasm)).collect();
    stop(server);
    ids
}

/// Deploys `modules` as `f0`, `f1`, … and stops; then removes their artifacts, as a restore
/// without them or an upgrade of wasmtime leaves a store. Returns the ids.
fn deployed_without_artifacts(dir: &Path, modules: &[Vec<u8>]) -> Vec<String> {
    let named: Vec<(String, &[u8])> =
        modules.iter().enumerate().map(|(n, w)| (format!("f{n}"), w.as_slice())).collect();
    let ids = deployed(dir, &named.iter().map(|(n, w)| (n.as_str(), *w)).collect::<Vec<_>>());
    for wasm in modules {
        std::fs::remove_file(module_file(dir, wasm, "cwasm")).unwrap();
    }
    ids
}

/// Starts a server over `dir` with `args`; returns it with its "stored functions loaded" log.
fn restarted(dir: &Path, args: &[&str]) -> (Server, String) {
    let server = Server::start_in(dir, args);
    let log = server.wait_for_stderr("stored functions loaded");
    (server, log)
}

fn state(server: &Server, id: &str) -> serde_json::Value {
    server.client().request("GET", &format!("/functions/{id}"), &[], b"").json()
}

#[test]
fn a_truncated_module_is_rewritten_by_a_deploy_of_the_same_bytes_and_survives_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = guests::echo();
    let first = deployed(dir.path(), &[("echo", &wasm)]).remove(0);
    // The issue's case: the module cut to 10 bytes and its artifact gone.
    std::fs::write(module_file(dir.path(), &wasm, "wasm"), &wasm[..10]).unwrap();
    std::fs::remove_file(module_file(dir.path(), &wasm, "cwasm")).unwrap();

    let (server, log) = restarted(dir.path(), &[]);
    assert!(log.contains("broken=1"), "{log}");
    assert_eq!(state(&server, &first)["state"], "broken");
    // The same bytes again: "already stored" is decided by the digest, not by a file name.
    let second = server.deploy("echo-again", &wasm);
    assert_eq!(std::fs::read(module_file(dir.path(), &wasm, "wasm")).unwrap(), wasm);
    assert!(module_file(dir.path(), &wasm, "cwasm").exists());
    // The function left broken runs again at once, with the new one.
    assert_eq!(state(&server, &first)["state"], "ready");
    assert_eq!(server.client().invoke(&first, b"a").text(), "a");
    assert_eq!(server.metric("tensor_wasm_functions_broken", &[]), 0.0);
    stop(server);

    for round in 0..2 {
        let (server, log) = restarted(dir.path(), &[]);
        assert!(log.contains("functions=2") && log.contains("broken=0") && log.contains("damaged=0"), "{log}");
        for id in [&first, &second] {
            assert_eq!(server.client().invoke(id, b"b").text(), "b", "round {round}");
        }
        stop(server);
    }
}

#[test]
fn a_corrupt_module_with_an_intact_artifact_still_runs_and_is_repaired_by_a_deploy() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = guests::echo();
    let id = deployed(dir.path(), &[("echo", &wasm)]).remove(0);
    let file = module_file(dir.path(), &wasm, "wasm");
    let mut flipped = wasm.clone();
    flipped[20] ^= 0x01;
    std::fs::write(&file, &flipped).unwrap();

    let (server, log) = restarted(dir.path(), &[]);
    assert!(log.contains("damaged=1") && log.contains("broken=0"), "{log}");
    assert!(server.stderr().contains("the next deploy of the same bytes rewrites it"));
    assert_eq!(server.client().invoke(&id, b"c").text(), "c");
    server.deploy("echo-again", &wasm);
    assert_eq!(std::fs::read(&file).unwrap(), wasm, "the deploy rewrote the corrupt file");
}

#[test]
fn a_missing_artifact_is_recompiled_from_the_checked_module() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = guests::echo();
    let id = deployed(dir.path(), &[("echo", &wasm)]).remove(0);
    std::fs::remove_file(module_file(dir.path(), &wasm, "cwasm")).unwrap();
    let (server, log) = restarted(dir.path(), &[]);
    assert!(log.contains("recompiled=1") && log.contains("broken=0"), "{log}");
    assert!(module_file(dir.path(), &wasm, "cwasm").exists());
    assert_eq!(server.client().invoke(&id, b"d").text(), "d");
}

#[test]
fn orphans_and_temporary_files_are_removed_at_start_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let (kept, orphan) = (numbered(1), numbered(2));
    let id = {
        let server = Server::start_in(dir.path(), &[]);
        let id = server.deploy("kept", &kept);
        stop(server);
        id
    };
    // What a kill -9 between a deploy's module write and its record write leaves, and a write cut
    // short before its rename.
    std::fs::write(module_file(dir.path(), &orphan, "wasm"), &orphan).unwrap();
    std::fs::write(module_file(dir.path(), &orphan, "cwasm"), b"artifact").unwrap();
    let temp = dir.path().join("modules/.tmp-0123-abc.wasm");
    std::fs::write(&temp, vec![0u8; 1 << 20]).unwrap();
    std::fs::write(dir.path().join("functions/.tmp-0123-x.json"), b"{").unwrap();

    let server = Server::start_in(dir.path(), &[]);
    let log = server.wait_for_stderr("store swept");
    assert!(log.contains("temp_files=2") && log.contains("orphaned_modules=1"), "{log}");
    assert!(!temp.exists() && !module_file(dir.path(), &orphan, "wasm").exists());
    assert!(!module_file(dir.path(), &orphan, "cwasm").exists());
    assert!(module_file(dir.path(), &kept, "wasm").exists() && module_file(dir.path(), &kept, "cwasm").exists());
    assert_eq!(server.client().invoke(&id, b"").status, 200);
    stop(server);

    // With a record unreadable, it may be the one that uses a module: nothing is taken for an
    // orphan on that guess.
    std::fs::write(module_file(dir.path(), &orphan, "wasm"), &orphan).unwrap();
    std::fs::write(dir.path().join("functions/0123456789abcdef0123456789abcdef.json"), b"{\"id\":").unwrap();
    let server = Server::start_in(dir.path(), &[]);
    let log = server.wait_for_stderr("store swept");
    assert!(log.contains("orphaned_modules=0") && log.contains("orphans_kept_for_unreadable_records=true"), "{log}");
    assert!(module_file(dir.path(), &orphan, "wasm").exists());
}

#[test]
fn a_function_that_cannot_load_is_listed_broken_answers_503_and_fails_observe_but_not_readyz() {
    let dir = tempfile::tempdir().unwrap();
    let (good, bad) = (guests::echo(), guests::hello());
    let (good_id, bad_id) = {
        let server = Server::start_in(dir.path(), &[]);
        let ids = (server.deploy("good", &good), server.deploy("bad", &bad));
        stop(server);
        ids
    };
    std::fs::remove_file(module_file(dir.path(), &bad, "wasm")).unwrap();
    std::fs::remove_file(module_file(dir.path(), &bad, "cwasm")).unwrap();

    let server = Server::start_in(dir.path(), &[]);
    let mut c = server.client();
    assert_eq!(c.request("GET", "/readyz", &[], b"").status, 200);
    let listed = c.request("GET", "/functions", &[], b"").json();
    let functions = listed["functions"].as_array().unwrap();
    assert_eq!(functions.len(), 2, "{listed}");
    let shown = functions.iter().find(|f| f["id"] == bad_id.as_str()).unwrap();
    assert_eq!(shown["state"], "broken");
    assert!(shown["reason"].as_str().unwrap().contains("no usable artifact"), "{shown}");
    assert_eq!(functions.iter().find(|f| f["id"] == good_id.as_str()).unwrap()["state"], "ready");

    let r = c.invoke(&bad_id, b"");
    assert_eq!((r.status, r.error_kind().as_str()), (503, "function_unavailable"), "{}", r.text());
    assert!(r.header("retry-after").is_none(), "waiting does not repair it");
    assert_eq!(c.invoke(&good_id, b"e").text(), "e");
    assert_eq!(server.metric("tensor_wasm_functions_broken", &[]), 1.0);

    let url = format!("http://{}", server.addr);
    let (code, out, _) = tensor_wasm(&["observe", "--once", "--interval", "200ms", "--server", &url], &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("1 broken functions"), "{out}");

    // A pipeline step naming it is told so, not sent elsewhere.
    let r = c.request(
        "POST",
        "/pipelines",
        &[("content-type", "application/json")],
        json!({"name": "p", "steps": [{"function": "bad"}]}).to_string().as_bytes(),
    );
    assert_eq!((r.status, r.error_kind().as_str()), (400, "invalid_pipeline"), "{}", r.text());
    assert!(r.text().contains("broken"), "{}", r.text());

    // It can be deleted like any function, and then nothing is broken.
    assert_eq!(c.request("DELETE", &format!("/functions/{bad_id}"), &[], b"").status, 204);
    assert_eq!(server.metric("tensor_wasm_functions_broken", &[]), 0.0);
    let (code, out, _) = tensor_wasm(&["observe", "--once", "--interval", "200ms", "--server", &url], &[]);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn a_restart_without_artifacts_compiles_the_store_in_parallel_and_refused_modules_do_not_hold_readiness() {
    let dir = tempfile::tempdir().unwrap();
    let modules: Vec<Vec<u8>> = (0..6).map(numbered).collect();
    let ids = deployed_without_artifacts(dir.path(), &modules);
    let (server, log) = restarted(dir.path(), &["--load-threads", "3"]);
    assert!(log.contains("recompiled=6") && log.contains("broken=0"), "{log}");
    for id in &ids {
        assert_eq!(server.client().invoke(id, b"").status, 200);
    }
    stop(server);

    // Limits tightened since: every stored module is refused by its shape, before any compile,
    // and the server is ready with them listed as broken.
    for wasm in &modules {
        std::fs::remove_file(module_file(dir.path(), wasm, "cwasm")).unwrap();
    }
    let (server, log) = restarted(dir.path(), &["--max-function-body-bytes", "1"]);
    assert!(log.contains("broken=6") && log.contains("recompiled=0"), "{log}");
    assert_eq!(server.client().request("GET", "/readyz", &[], b"").status, 200);
    let shown = state(&server, &ids[0]);
    assert!(shown["reason"].as_str().unwrap().contains("no longer accepted"), "{shown}");
}

#[test]
fn hostile_files_under_the_stores_names_neither_hang_nor_exhaust_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let (good, hung, fifo, huge) = (numbered(10), numbered(11), numbered(12), numbered(13));
    let ids: Vec<String> = {
        let server = Server::start_in(dir.path(), &["--max-body-bytes", "1048576"]);
        let ids =
            [&good, &hung, &fifo, &huge].iter().enumerate().map(|(n, w)| server.deploy(&format!("f{n}"), w)).collect();
        stop(server);
        ids
    };
    // An insider puts what would hang or exhaust a reader under the store's names: /dev/zero
    // (hashing it never ends), a FIFO (opening it blocks), a file past any module's size.
    for wasm in [&hung, &fifo, &huge] {
        std::fs::remove_file(module_file(dir.path(), wasm, "cwasm")).unwrap();
        std::fs::remove_file(module_file(dir.path(), wasm, "wasm")).unwrap();
    }
    std::os::unix::fs::symlink("/dev/zero", module_file(dir.path(), &hung, "wasm")).unwrap();
    let path = std::ffi::CString::new(module_file(dir.path(), &fifo, "wasm").to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
    let file = std::fs::File::create(module_file(dir.path(), &huge, "wasm")).unwrap();
    file.set_len(4 << 30).unwrap(); // sparse: 4 GiB that take no disk
                                    // And a record that is no record: /dev/zero under a record's name.
    std::os::unix::fs::symlink("/dev/zero", dir.path().join("functions/0123456789abcdef0123456789abcdef.json"))
        .unwrap();

    let (server, log) = restarted(dir.path(), &["--max-body-bytes", "1048576"]);
    assert!(log.contains("broken=3") && log.contains("unreadable=1"), "{log}");
    assert_eq!(server.client().request("GET", "/readyz", &[], b"").status, 200);
    assert_eq!(server.client().invoke(&ids[0], b"").status, 200);
    for id in &ids[1..] {
        let shown = state(&server, id);
        assert_eq!(shown["state"], "broken", "{shown}");
    }
    assert!(state(&server, &ids[1])["reason"].as_str().unwrap().contains("not a regular file"));
    assert!(state(&server, &ids[3])["reason"].as_str().unwrap().contains("more than the"));
}

#[test]
fn a_second_server_on_the_same_data_dir_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_in(dir.path(), &[]);
    let data = dir.path().to_str().unwrap();
    let (code, _, err) = tensor_wasm(&["serve", "--listen", "127.0.0.1:0", "--data-dir", data], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("another tensor-wasm process is using it"), "{err}");
    // The first serves on, and once it is gone the next one starts.
    assert_eq!(server.client().request("GET", "/readyz", &[], b"").status, 200);
    stop(server);
    let next = Server::start_in(dir.path(), &[]);
    assert_eq!(next.client().request("GET", "/readyz", &[], b"").status, 200);
}

#[test]
fn a_backup_carries_a_damaged_function_instead_of_dropping_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (good, damaged) = (numbered(20), numbered(21));
    let server = Server::start_in(&data, &[]);
    let ids = [server.deploy("good", &good), server.deploy("damaged", &damaged)];
    // Its module file gone, its artifact intact: the server runs it from the artifact.
    std::fs::remove_file(module_file(&data, &damaged, "wasm")).unwrap();
    let backup = dir.path().join("backup");
    let (code, out, err) =
        tensor_wasm(&["backup", backup.to_str().unwrap(), "--data-dir", data.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("damaged, carried as it is: function {}", ids[1])), "{out}");
    stop(server);

    let restored = dir.path().join("restored");
    let (code, out, err) =
        tensor_wasm(&["restore", backup.to_str().unwrap(), "--data-dir", restored.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{out}{err}");
    let server = Server::start_in(&restored, &[]);
    for id in &ids {
        assert_eq!(server.client().invoke(id, b"").status, 200, "{id}");
    }
    // A deploy of its bytes repairs the restored store too.
    server.deploy("again", &damaged);
    assert_eq!(std::fs::read(module_file(&restored, &damaged, "wasm")).unwrap(), damaged);
}

/// Two stored modules of thousands of functions each, without their artifacts: tens of
/// milliseconds of compiling at start-up.
fn many_without_artifacts(dir: &Path) -> Vec<String> {
    let many = |n: u32| {
        let body: String = (0..3000).map(|i| format!("(func (result i32) (i32.const {i}))")).collect();
        guests::wasm(&format!(r#"(module (memory 1) (data (i32.const 0) "many-{n}") {body} (func (export "_start")))"#))
    };
    deployed_without_artifacts(dir, &[many(30), many(31)])
}

#[test]
fn a_compile_starved_of_cpu_at_start_is_tried_again_alone() {
    let dir = tempfile::tempdir().unwrap();
    let ids = many_without_artifacts(dir.path());
    // The server on one CPU that a thread beside it keeps busy: the compile children, under
    // SCHED_IDLE, get a fraction of a percent of it, each tried twice, then listed broken with why.
    let cpu = last_cpu();
    let hog = CpuHog::on(cpu);
    let args = ["--compile-timeout-ms", "1000", "--compile-wall-timeout-ms", "1000", "--shards", "1"];
    let server = Server::start_with(dir.path(), &args, |cmd| on_cpu(cmd, cpu));
    let log = server.wait_for_stderr("stored functions loaded");
    assert_eq!(log.matches("retrying the compile alone").count(), 2, "{log}");
    assert!(log.contains("broken=2"), "{log}");
    let reason = state(&server, &ids[0])["reason"].as_str().unwrap().to_string();
    assert!(
        reason.contains("--compile-wall-timeout-ms (1000 ms)") && reason.contains("the next start tries again"),
        "{reason}"
    );
    stop(server);
    drop(hog);
    // With the CPU free they load, and nothing needed repairing.
    let (server, log) = restarted(dir.path(), &[]);
    assert!(log.contains("broken=0") && log.contains("recompiled=2"), "{log}");
    assert_eq!(server.client().invoke(&ids[1], b"").status, 200);
}

#[test]
fn a_module_over_the_cpu_budget_at_start_is_broken_without_a_second_try() {
    let dir = tempfile::tempdir().unwrap();
    let ids = many_without_artifacts(dir.path());
    // No compile fits in a millisecond of CPU time, and a second try would not either.
    let (server, log) = restarted(dir.path(), &["--compile-timeout-ms", "1"]);
    assert_eq!(log.matches("retrying the compile alone").count(), 0, "{log}");
    assert!(log.contains("broken=2"), "{log}");
    let reason = state(&server, &ids[0])["reason"].as_str().unwrap().to_string();
    assert!(
        reason.contains("no longer accepted") && reason.contains("--compile-timeout-ms (1 ms) of CPU time"),
        "{reason}"
    );
    stop(server);
    // Within the default budget they load.
    let (server, log) = restarted(dir.path(), &[]);
    assert!(log.contains("broken=0") && log.contains("recompiled=2"), "{log}");
    assert_eq!(server.client().invoke(&ids[1], b"").status, 200);
}
