//! Evidence that survives: a restart never removes a complete audit record, tampering is kept and
//! recorded, and signed checkpoints expose the cuts and rewrites a hash chain alone cannot.
//! Each test runs a real server on its own data dir and works on the files it leaves.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{tensor_wasm, within, Client, Server};
use serde_json::Value;

fn verify(dir: &Path, extra: &[&str]) -> (i32, String, String) {
    let mut args = vec!["audit", "verify", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    tensor_wasm(&args, &[])
}

/// Every record under `dir`, via `audit tail`.
fn records(dir: &Path) -> Vec<Value> {
    let (code, out, err) = tensor_wasm(&["audit", "tail", "-n", "1000000", dir.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    out.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn segments(shard_dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(shard_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    files
}

/// Each segment's bytes up to its last end of line: its complete records.
fn complete_lines(audit: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    for shard in std::fs::read_dir(audit).unwrap().map(|e| e.unwrap().path()).filter(|p| p.is_dir()) {
        for path in segments(&shard) {
            let bytes = std::fs::read(&path).unwrap();
            let end = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |at| at + 1);
            out.insert(path, bytes[..end].to_vec());
        }
    }
    out
}

fn line_count(snapshot: &BTreeMap<PathBuf, Vec<u8>>) -> usize {
    snapshot.values().map(|b| b.iter().filter(|c| **c == b'\n').count()).sum()
}

/// Start of line `n` (0-based) of `bytes`.
fn line_start(bytes: &[u8], n: usize) -> usize {
    if n == 0 {
        return 0;
    }
    bytes.iter().enumerate().filter(|(_, b)| **b == b'\n').nth(n - 1).unwrap().0 + 1
}

/// `n` requests, each on one of `connections` connections in turn (so that both shards get some).
fn load(server: &Server, n: usize, connections: usize) {
    let mut clients: Vec<Client> = (0..connections).map(|_| server.client()).collect();
    for i in 0..n {
        let r = clients[i % connections].request("GET", &format!("/functions/{i:032x}"), &[], b"");
        assert_eq!(r.status, 404);
    }
}

fn stop(server: &mut Server) {
    server.signal(libc::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(10)).success(), "{}", server.stderr());
}

#[test]
fn tampering_then_a_restart_removes_no_complete_record() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = ["--shards", "1", "--audit-segment-bytes", "65536"];
    let mut server = Server::start_in(&data, &args);
    load(&server, 800, 1);
    stop(&mut server);

    let audit = data.join("audit");
    let files = segments(&audit.join("shard-0"));
    assert!(files.len() >= 3, "{files:?}");
    let (sealed, active) = (&files[files.len() - 2], &files[files.len() - 1]);
    // One byte of line 5 of the newest segment, and of line 3 of the sealed one before it.
    let mut tampered = Vec::new();
    for (path, line) in [(sealed, 2), (active, 4)] {
        let mut bytes = std::fs::read(path).unwrap();
        let at = line_start(&bytes, line);
        bytes[at + 30] ^= 0x01;
        std::fs::write(path, &bytes).unwrap();
        let first: u64 = path.file_stem().unwrap().to_str().unwrap().parse().unwrap();
        tampered.push((path.clone(), at, first + line as u64));
    }
    let before = complete_lines(&audit);
    let (code, _, err) = verify(&audit, &[]);
    assert_eq!(code, 1, "{err}");

    let mut server = Server::start_in(&data, &args);
    server.wait_for_stderr("integrity failure");
    assert_eq!(server.metric("tensor_wasm_audit_integrity_failures_total", &[]), 2.0);
    load(&server, 5, 1);
    stop(&mut server);

    // Nothing of what was there is gone or changed: every segment is kept byte for byte.
    let after = complete_lines(&audit);
    for (path, bytes) in &before {
        assert!(after.get(path) == Some(bytes), "{} changed", path.display());
    }
    // Two audit_integrity records and the five requests are all that was added.
    assert_eq!(line_count(&after), line_count(&before) + 2 + 5);

    // The new segment starts with the reports, naming file, offset and seq.
    let new_segment = segments(&audit.join("shard-0")).pop().unwrap();
    assert!(!before.contains_key(&new_segment), "a new segment started");
    let first_two: Vec<Value> = std::fs::read_to_string(&new_segment)
        .unwrap()
        .lines()
        .take(2)
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for (record, (path, offset, seq)) in first_two.iter().zip(&tampered) {
        assert_eq!(record["action"], "audit_integrity", "{record}");
        assert_eq!(record["actor"]["kind"], "system");
        let name = format!("shard-0/{}", path.file_name().unwrap().to_str().unwrap());
        assert_eq!(record["integrity"]["file"], name.as_str(), "{record}");
        assert_eq!(record["integrity"]["offset"], *offset as u64, "{record}");
        assert_eq!(record["integrity"]["seq"], *seq, "{record}");
    }

    // verify still fails at exactly the two tampered records, and nowhere else: the records
    // written since chain from the last good record.
    let (code, out, err) = verify(&audit, &[]);
    assert_eq!(code, 1, "{out}{err}");
    let broken: Vec<&str> = err.lines().filter(|l| l.contains("broken audit record")).collect();
    assert_eq!(broken.len(), 2, "{err}");
    for ((path, offset, seq), line) in tampered.iter().zip(&broken) {
        assert!(line.contains(path.to_str().unwrap()), "{line}");
        assert!(line.contains(&format!("offset {offset} (seq {seq})")), "{line}");
    }
    let all = records(&audit);
    assert_eq!(all.iter().filter(|r| r["action"] == "audit_integrity").count(), 2);

    // A second restart finds nothing new to report: the damage is on record already.
    let mut server = Server::start_in(&data, &args);
    load(&server, 1, 1);
    assert_eq!(server.metric("tensor_wasm_audit_integrity_failures_total", &[]), 0.0);
    stop(&mut server);
    let (_, _, err) = verify(&audit, &[]);
    assert_eq!(err.lines().filter(|l| l.contains("broken audit record")).count(), 2, "{err}");
}

/// Generates a key pair under `dir` with the CLI; returns (private, public).
fn keygen(dir: &Path) -> (PathBuf, PathBuf) {
    let key = dir.join("audit-key");
    let (code, out, err) =
        tensor_wasm(&["audit", "keygen", "--out", key.to_str().unwrap(), "--name", "test.example/audit"], &[]);
    assert_eq!(code, 0, "{out}{err}");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    let public = dir.join("audit-key.pub");
    assert!(std::fs::read_to_string(&public).unwrap().starts_with("test.example/audit+"));
    (key, public)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Links `record` to `prev` (a hash in hex; `None`: left as it is) and gives it the hash of its
/// new content, as the server would have; returns that hash.
fn rechain(record: &mut String, prev: Option<&str>) -> String {
    if let Some(prev) = prev {
        let at = record.find(",\"prev_hash\":\"").unwrap() + 14;
        record.replace_range(at..at + 64, prev);
    }
    let at = record.find(",\"hash\":\"").unwrap();
    let hash = hex(&common::sha256(&record.as_bytes()[..at]));
    record.replace_range(at + 9..at + 9 + 64, &hash);
    hash
}

/// Rewrites record `line` of the chain in `shard_dir` (counting from its first segment) and
/// chains every record after it again, as an insider with the files would.
fn rewrite_and_rechain(shard_dir: &Path, line: usize) {
    rewrite_and_rechain_with(shard_dir, line, |record| record.replacen("\"status_code\":404", "\"status_code\":200", 1))
}

/// [`rewrite_and_rechain`], with `edit` as the rewrite.
fn rewrite_and_rechain_with(shard_dir: &Path, line: usize, edit: impl Fn(&str) -> String) {
    let mut prev: Option<String> = None;
    let mut n = 0;
    for path in segments(shard_dir) {
        let text = std::fs::read_to_string(&path).unwrap();
        let mut out = String::new();
        for record in text.lines() {
            let mut record = record.to_string();
            if n == line {
                record = edit(&record);
            }
            if n >= line {
                rechain(&mut record, prev.as_deref());
            }
            let at = record.find(",\"hash\":\"").unwrap() + 9;
            prev = Some(record[at..at + 64].to_string());
            out.push_str(&record);
            out.push('\n');
            n += 1;
        }
        std::fs::write(&path, out).unwrap();
    }
}

/// Replaces the chain in `shard_dir` by its newest segment's records renumbered far past every
/// checkpoint and chained again: a log that starts later than anything signed.
fn replace_with_later(shard_dir: &Path) {
    let all = segments(shard_dir);
    let text = std::fs::read_to_string(all.last().unwrap()).unwrap();
    let (mut out, mut prev, mut first) = (String::new(), None::<String>, None);
    for record in text.lines() {
        let at = record.find(",\"seq\":").unwrap() + 7;
        let end = at + record[at..].find(',').unwrap();
        let seq: u64 = record[at..end].parse::<u64>().unwrap() + 1_000_000;
        first.get_or_insert(seq);
        let mut record = format!("{}{seq}{}", &record[..at], &record[end..]);
        prev = Some(rechain(&mut record, prev.as_deref()));
        out.push_str(&record);
        out.push('\n');
    }
    for path in all {
        std::fs::remove_file(path).unwrap();
    }
    std::fs::write(shard_dir.join(format!("{:020}.jsonl", first.unwrap())), out).unwrap();
}

#[test]
fn signed_checkpoints_expose_what_the_chain_alone_cannot() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = keygen(dir.path());
    let data = dir.path().join("data");
    let mut server = Server::start_in(
        &data,
        &["--shards", "2", "--audit-segment-bytes", "65536", "--audit-signing-key", key.to_str().unwrap()],
    );
    // Enough that each shard fills more than a segment however the kernel spreads the 16
    // connections over the two: with 600 requests, a shard dealt few of them (a fresh-clone CI
    // run) sealed none.
    let requests = 2400;
    load(&server, requests, 16);
    stop(&mut server);
    // What a log shipper carried off the host: the checkpoints the server printed.
    let shipped = dir.path().join("shipped.jsonl");
    let lines = server.checkpoint_lines();
    assert!(!lines.is_empty());
    // Verbatim, as a shipper keeps stdout: the server's first line is not JSON.
    std::fs::write(&shipped, format!("listening on {}\n{}\n", server.addr, lines.join("\n"))).unwrap();
    let audit = data.join("audit");
    assert!(segments(&audit.join("shard-0")).len() >= 2 && segments(&audit.join("shard-1")).len() >= 2);
    let public = public.to_str().unwrap();
    let with_key = ["--public-key", public, "--checkpoints", shipped.to_str().unwrap()];

    let (code, out, err) = verify(&audit, &with_key);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("ok: {requests} records")) && out.contains("shard 0: the log matches"), "{out}");
    assert!(!out.contains("not covered"), "the shutdown checkpoint covers every record: {out}");

    let newest = |shard: &Path| segments(shard).pop().unwrap();
    type Attack = fn(&Path, &dyn Fn(&Path) -> PathBuf);
    let attacks: [(&str, Attack); 8] = [
        ("delete the newest segment", |a, newest| std::fs::remove_file(newest(&a.join("shard-0"))).unwrap()),
        ("truncate it at a line boundary", |a, newest| {
            let path = newest(&a.join("shard-0"));
            let bytes = std::fs::read(&path).unwrap();
            let lines = bytes.iter().filter(|b| **b == b'\n').count();
            std::fs::write(&path, &bytes[..line_start(&bytes, lines - 3)]).unwrap();
        }),
        ("zero its tail", |a, newest| {
            let path = newest(&a.join("shard-0"));
            let mut bytes = std::fs::read(&path).unwrap();
            let len = bytes.len();
            bytes[len - 1000..].fill(0);
            std::fs::write(&path, &bytes).unwrap();
        }),
        ("remove a shard directory", |a, _| std::fs::remove_dir_all(a.join("shard-1")).unwrap()),
        ("rewrite a record and chain the rest again", |a, _| rewrite_and_rechain(&a.join("shard-0"), 10)),
        // Only the shipped copy is left to prove it.
        ("cut the newest segment and delete the checkpoints beside the log", |a, newest| {
            std::fs::remove_file(newest(&a.join("shard-0"))).unwrap();
            for name in ["checkpoints", "checkpoints.1"] {
                let _ = std::fs::remove_file(a.join("shard-0").join(name));
            }
        }),
        ("replace the whole log with a later-looking chain", |a, _| replace_with_later(&a.join("shard-0"))),
        ("keep a copy of the chain beside a rewritten one", |a, _| {
            copy_dir(&a.join("shard-0"), &a.join("shard-0.orig"));
            rewrite_and_rechain(&a.join("shard-0"), 10);
        }),
    ];
    for (i, (what, attack)) in attacks.iter().enumerate() {
        let copy = dir.path().join(format!("attack-{i}"));
        copy_dir(&audit, &copy);
        attack(&copy, &newest);
        let (code, out, err) = verify(&copy, &[]);
        assert_eq!(code, 0, "{what}: the chain alone does not see it: {out}{err}");
        let (code, out, err) = verify(&copy, &with_key);
        assert_eq!(code, 1, "{what}: {out}{err}");
        assert!(err.contains("records lost or changed: checkpoint test.example/audit/shard-"), "{what}: {err}");
        assert!(err.contains("proves it"), "{what}: {err}");
    }

    // The audit directory's own checkpoint files suffice while they are there.
    let copy = dir.path().join("own-files");
    copy_dir(&audit, &copy);
    std::fs::remove_file(newest(&copy.join("shard-0"))).unwrap();
    let (code, _, err) = verify(&copy, &["--public-key", public]);
    assert_eq!(code, 1, "{err}");
    // A forged checkpoint is refused.
    let forged = dir.path().join("forged.jsonl");
    let text = std::fs::read_to_string(&shipped).unwrap();
    let last = text.lines().last().unwrap();
    let v: Value = serde_json::from_str(last).unwrap();
    let note = v["audit_checkpoint"]["note"].as_str().unwrap();
    let size = v["audit_checkpoint"]["size"].as_u64().unwrap();
    let changed = note.replacen(&format!("\n{size}\n"), &format!("\n{}\n", size + 1), 1);
    std::fs::write(&forged, serde_json::json!({"audit_checkpoint": {"note": changed}}).to_string()).unwrap();
    let (code, _, err) = verify(&audit, &["--public-key", public, "--checkpoints", forged.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("does not verify"), "{err}");
}

#[test]
fn kill_9_mid_write_cuts_only_a_torn_suffix_and_every_checkpoint_still_verifies() {
    const ROUNDS: u64 = 20;
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = keygen(dir.path());
    let data = dir.path().join("data");
    let audit = data.join("audit");
    let args = [
        "--shards",
        "2",
        "--audit-segment-bytes",
        "65536",
        "--audit-signing-key",
        key.to_str().unwrap(),
        "--audit-checkpoint-interval-ms",
        "20",
    ];
    let mut shipped = Vec::new();
    let mut before: BTreeMap<PathBuf, Vec<u8>> = BTreeMap::new();
    let mut kills_with_traffic = 0;
    for round in 0..=ROUNDS {
        let mut server = Server::start_in(&data, &args);
        // Start-up recovery is done: every complete record from before the kill is still there.
        let after = complete_lines(&audit);
        for (path, bytes) in &before {
            let now = after.get(path).unwrap_or_else(|| panic!("round {round}: {} is gone", path.display()));
            assert!(now.starts_with(bytes), "round {round}: {} lost a complete record", path.display());
        }
        assert!(!server.stderr().contains("integrity failure"), "round {round}: {}", server.stderr());
        if round == ROUNDS {
            load(&server, 10, 4);
            stop(&mut server);
            shipped.extend(server.checkpoint_lines());
            break;
        }
        let stop_flag = Arc::new(AtomicBool::new(false));
        let clients: Vec<_> = (0..4)
            .map(|t| {
                let (stop_flag, addr) = (stop_flag.clone(), server.addr);
                std::thread::spawn(move || {
                    let mut c = Client::connect(addr);
                    let mut answered = 0;
                    for i in 0..100_000 {
                        if stop_flag.load(Ordering::Relaxed) {
                            break;
                        }
                        match c.try_request("GET", &format!("/functions/{t:016x}{i:016x}"), &[], b"") {
                            Ok(_) => answered += 1,
                            Err(_) => break, // killed mid-request
                        }
                    }
                    answered
                })
            })
            .collect();
        // Records flow and checkpoints are signed, then the kill lands in the middle of it.
        let signed = server.checkpoint_lines().len();
        within(Duration::from_secs(10), "a checkpoint signed while records flow", || {
            server.checkpoint_lines().len() > signed + 2
        });
        server.kill9();
        stop_flag.store(true, Ordering::Relaxed);
        let answered: u64 = clients.into_iter().map(|c| c.join().unwrap()).sum();
        kills_with_traffic += u64::from(answered > 0);
        shipped.extend(server.checkpoint_lines());
        before = complete_lines(&audit);
    }
    assert_eq!(kills_with_traffic, ROUNDS);

    let shipped_file = dir.path().join("shipped.jsonl");
    std::fs::write(&shipped_file, shipped.join("\n") + "\n").unwrap();
    let (code, out, err) = verify(&audit, &[]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) =
        verify(&audit, &["--public-key", public.to_str().unwrap(), "--checkpoints", shipped_file.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let verified: usize =
        out.lines().find_map(|l| l.strip_prefix("checkpoints: ")?.strip_suffix(" verified")?.parse().ok()).unwrap();
    assert!(verified as u64 >= 2 * ROUNDS, "{out}");
}

#[test]
fn a_backup_carries_the_checkpoints_its_segments_prove_and_names_their_key() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = keygen(dir.path());
    let data = dir.path().join("data");
    let args = ["--audit-segment-bytes", "65536", "--audit-checkpoint-interval-ms", "20"];
    let mut server = Server::start_in(&data, &[&args[..], &["--audit-signing-key", key.to_str().unwrap()]].concat());
    load(&server, 600, 16);
    // Taken while the server runs, as an operator would: the active segments stay behind, and
    // with them every checkpoint that signs their records.
    let backup = dir.path().join("backup");
    let (code, out, err) =
        tensor_wasm(&["backup", backup.to_str().unwrap(), "--data-dir", data.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("signed checkpoints, signed by test.example/audit+"), "{out}");
    let manifest: Value = serde_json::from_slice(&std::fs::read(backup.join("BACKUP.json")).unwrap()).unwrap();
    let key_id = std::fs::read_to_string(&public).unwrap().split('+').take(2).collect::<Vec<_>>().join("+");
    assert_eq!(manifest["checkpoint_keys"], serde_json::json!([key_id]));
    stop(&mut server);

    let restored = dir.path().join("restored");
    let (code, out, err) =
        tensor_wasm(&["restore", backup.to_str().unwrap(), "--data-dir", restored.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&key_id), "{out}");
    let audit = restored.join("audit");
    let public = public.to_str().unwrap();
    let (code, out, err) = verify(&audit, &["--public-key", public]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("shard 0: the log matches"), "{out}");
    // The checkpoints came along: the restored log cannot be cut unnoticed either. Cut it just
    // before the record its newest carried checkpoint signs (cutting the oldest segment would be
    // what retention does, which checkpoints allow).
    let notes = std::fs::read_to_string(audit.join("shard-0/checkpoints")).unwrap();
    let newest: u64 = notes.split("\n\n").filter_map(|note| note.lines().nth(1)?.parse().ok()).max().unwrap();
    cut_before(&audit.join("shard-0"), newest);
    let (code, _, err) = verify(&audit, &["--public-key", public]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("proves it"), "{err}");
}

/// Cuts the chain in `shard_dir` just before the record with `seq`: that segment ends before it,
/// and every later one is gone.
fn cut_before(shard_dir: &Path, seq: u64) {
    let mut cut = false;
    for path in segments(shard_dir) {
        if cut {
            std::fs::remove_file(&path).unwrap();
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        if let Some(at) = text.find(&format!(",\"seq\":{seq},")) {
            let line = text[..at].rfind('\n').map_or(0, |i| i + 1);
            std::fs::write(&path, &text[..line]).unwrap();
            cut = true;
        }
    }
    assert!(cut, "no record {seq} in {}", shard_dir.display());
}

#[test]
fn a_backup_carries_a_damaged_sealed_segment_as_evidence() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = Server::start_in(&data, &["--shards", "1", "--audit-segment-bytes", "65536"]);
    load(&server, 600, 1);
    stop(&mut server);
    let files = segments(&data.join("audit/shard-0"));
    assert!(files.len() >= 2, "{files:?}");
    // What recovery keeps byte for byte after tampering: a sealed segment that does not end in
    // a whole record.
    let damaged = &files[0];
    let mut bytes = std::fs::read(damaged).unwrap();
    bytes.extend_from_slice(b"{\"forged\":");
    std::fs::write(damaged, &bytes).unwrap();

    let backup = dir.path().join("backup");
    let (code, out, err) =
        tensor_wasm(&["backup", backup.to_str().unwrap(), "--data-dir", data.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("damaged, carried as it is") && out.contains("ends in a torn or damaged record"), "{out}");
    let copied = backup.join("audit/shard-0").join(damaged.file_name().unwrap());
    assert_eq!(std::fs::read(copied).unwrap(), bytes, "the evidence is in the backup, byte for byte");
}

/// Every complete record under `audit`, as the segment files hold them.
fn lines_on_disk(audit: &Path) -> Vec<String> {
    let text: Vec<String> = complete_lines(audit).into_values().map(|b| String::from_utf8(b).unwrap()).collect();
    text.iter().flat_map(|t| t.lines()).map(str::to_string).collect()
}

#[test]
fn records_and_checkpoints_name_their_replica_so_that_a_fleets_logs_merge_by_it() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = keygen(dir.path());
    let public = public.to_str().unwrap();
    // One shard, so that every record lands in one chain whatever the kernel does.
    let run = |replica: &str, data: &Path, n: usize| -> Vec<String> {
        let key = key.to_str().unwrap();
        let args = ["--shards", "1", "--audit-segment-bytes", "65536", "--audit-signing-key", key];
        let mut server = Server::start_in(data, &[&args[..], &["--replica-id", replica]].concat());
        load(&server, n, 4);
        stop(&mut server);
        server.checkpoint_lines()
    };
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let (shipped_a, shipped_b) = (run("r-1", &a, 400), run("r-2", &b, 200));
    let (audit_a, audit_b) = (a.join("audit"), b.join("audit"));

    // Every record on disk names its replica, before the chain's fields, under the hash.
    let lines = lines_on_disk(&audit_a);
    assert_eq!(lines.len(), 400);
    assert!(segments(&audit_a.join("shard-0")).len() >= 2, "the field crosses a rotation");
    for line in &lines {
        assert!(line.contains(",\"replica\":\"r-1\",\"shard\":0,\"seq\":"), "{line}");
    }
    assert!(lines_on_disk(&audit_b).iter().all(|l| l.contains(",\"replica\":\"r-2\",\"shard\":")));
    // `audit tail` shows it.
    let tailed = records(&audit_a);
    assert_eq!(tailed.len(), 400);
    assert!(tailed.iter().all(|r| r["replica"] == "r-1"), "{:?}", tailed[0]);
    // So does every checkpoint, in its origin, its signed text and its stdout line.
    assert!(!shipped_a.is_empty());
    for line in &shipped_a {
        let v: Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["audit_checkpoint"]["replica"], "r-1", "{line}");
        let note = v["audit_checkpoint"]["note"].as_str().unwrap();
        assert!(note.starts_with("test.example/audit/r-1/shard-0\n") && note.contains("\nreplica r-1\n"), "{note}");
    }

    // What the fleet's shipper kept: both replicas' checkpoints in one file, two shard 0s among
    // them. Each log is checked against its own replica's and passes; the other's are set aside.
    let fleet = dir.path().join("fleet.jsonl");
    std::fs::write(&fleet, [shipped_a, shipped_b].concat().join("\n") + "\n").unwrap();
    let with_fleet = ["--public-key", public, "--checkpoints", fleet.to_str().unwrap()];
    for (audit, own, other) in [(&audit_a, "r-1", "r-2"), (&audit_b, "r-2", "r-1")] {
        let (code, out, err) = verify(audit, &with_fleet);
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains(&format!("\nreplicas: {own}\n")), "{out}");
        assert!(
            out.contains(&format!("checkpoints of replica {other}, another replica's log, are not checked")),
            "{out}"
        );
        let (code, out, err) = verify(audit, &[&with_fleet[..], &["--replica", own]].concat());
        assert_eq!(code, 0, "{out}{err}");
    }
    // Held to the other replica, a log is not that replica's: its records and that replica's
    // checkpoints both say so.
    let (code, out, err) = verify(&audit_a, &[&with_fleet[..], &["--replica", "r-2"]].concat());
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("records of replica r-1 in the log of replica r-2"), "{err}");
    assert!(err.contains("records lost or changed: checkpoint test.example/audit/r-2/shard-0"), "{err}");

    // Another replica's name in one record is an edit its hash catches, at that record.
    let shard = audit_a.join("shard-0");
    let copy = dir.path().join("renamed");
    copy_dir(&audit_a, &copy);
    let first = &segments(&copy.join("shard-0"))[0];
    let mut bytes = std::fs::read(first).unwrap();
    let at = line_start(&bytes, 2);
    let field = at + String::from_utf8_lossy(&bytes[at..]).find("\"replica\":\"r-1\"").unwrap();
    bytes[field + 13] = b'2';
    std::fs::write(first, &bytes).unwrap();
    let (code, out, err) = verify(&copy, &[]);
    assert_eq!(code, 1, "{out}{err}");
    let broken: Vec<&str> = err.lines().filter(|l| l.contains("broken audit record")).collect();
    assert_eq!(broken.len(), 1, "{err}");
    assert!(broken[0].contains(&format!("{} at offset {at} (seq 3)", first.display())), "{err}");
    assert!(broken[0].contains("hash does not match"), "{err}");
    // Given its hash too, and the chain after it rehashed: a segment of two replicas.
    let copy = dir.path().join("renamed-and-rechained");
    copy_dir(&audit_a, &copy);
    rewrite_and_rechain_with(&copy.join("shard-0"), 2, |r| r.replacen("\"replica\":\"r-1\"", "\"replica\":\"r-2\"", 1));
    let (code, out, err) = verify(&copy, &[]);
    assert_eq!(code, 1, "{out}{err}");
    let broken: Vec<&str> = err.lines().filter(|l| l.contains("broken audit record")).collect();
    assert_eq!(broken.len(), 2, "{err}");
    let first = segments(&copy.join("shard-0"))[0].clone();
    assert!(broken[0].contains(&format!("{} at offset {at} (seq 3)", first.display())), "{err}");
    assert!(broken[0].contains("records of two replicas in one segment: replica r-1 before, replica r-2 from here"));
    assert!(broken[1].contains("replica r-2 before, replica r-1 from here"), "{err}");

    // The same data dir started under another id: the chain goes on in a new segment, each
    // segment one replica's, and verify notes where it changed hands.
    let before = segments(&shard);
    let mut server = Server::start_in(&a, &["--shards", "1", "--audit-segment-bytes", "65536", "--replica-id", "r-3"]);
    load(&server, 20, 2);
    stop(&mut server);
    let after = segments(&shard);
    assert_eq!(after.len(), before.len() + 1, "{after:?}");
    let (code, out, err) = verify(&audit_a, &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("ok: 420 records") && out.contains("\nreplicas: r-1, r-3\n"), "{out}");
    let handover = format!(
        "note: {} goes on as replica r-3 (the chain's records before it name replica r-1)",
        after.last().unwrap().display()
    );
    assert!(out.contains(&handover), "{out}");
    let newest = std::fs::read_to_string(after.last().unwrap()).unwrap();
    assert_eq!(newest.lines().filter(|l| l.contains(",\"replica\":\"r-3\",")).count(), 20, "{newest}");
    assert_eq!(newest.lines().count(), 20);
    let (code, out, err) = verify(&audit_a, &["--replica", "r-1"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("records of replica r-3 in the log of replica r-1 (20 in this segment)"), "{err}");

    // A single node with no --replica-id writes no such field.
    let c = dir.path().join("c");
    let mut server = Server::start_in(&c, &["--shards", "1"]);
    load(&server, 3, 1);
    stop(&mut server);
    let lines = lines_on_disk(&c.join("audit"));
    assert_eq!(lines.len(), 3);
    assert!(lines.iter().all(|l| !l.contains("replica")), "{lines:?}");
    let (code, out, err) = verify(&c.join("audit"), &[]);
    assert!(code == 0 && !out.contains("replicas:"), "{out}{err}");
}

#[test]
fn a_replica_id_that_is_no_plain_name_stops_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let long = "a".repeat(64);
    for (value, says) in [
        ("a\"b", "holds '\"'"),
        ("r/1", "holds '/'"),
        ("r\n1", "holds '\\n'"),
        ("r 1", "holds ' '"),
        ("", "is empty"),
        (long.as_str(), "is 64 characters long"),
        ("-r", "must begin with a letter or a digit"),
        ("..", "must begin with a letter or a digit"),
    ] {
        let flag = format!("--replica-id={value}");
        let serve = ["serve", "--listen", "127.0.0.1:0", "--data-dir", data];
        let (code, out, err) = tensor_wasm(&[&serve[..], &[flag.as_str()]].concat(), &[]);
        assert_eq!(code, 2, "{value:?}: {out}{err}");
        assert!(err.contains("tensor-wasm: --replica-id") && err.contains(says), "{value:?}: {err}");
        if !value.is_empty() {
            let (code, _, err) = tensor_wasm(&serve, &[("TENSOR_WASM_REPLICA_ID", value)]);
            assert_eq!(code, 2, "{value:?} from the environment: {err}");
            assert!(err.contains("tensor-wasm: --replica-id") && err.contains(says), "{value:?}: {err}");
        }
    }
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "nothing started: the data dir is untouched");
    // The longest that is allowed starts, and its records carry it.
    let longest = "a".repeat(63);
    let mut server = Server::start_in(dir.path(), &["--shards", "1", "--replica-id", &longest]);
    load(&server, 1, 1);
    stop(&mut server);
    let lines = lines_on_disk(&dir.path().join("audit"));
    assert!(lines.len() == 1 && lines[0].contains(&format!("\"replica\":\"{longest}\"")), "{lines:?}");
}

/// Before `--replica-id`, a log rewritten and chained again was caught by
/// the checkpoints that had left the host. Now `audit verify` checks a checkpoint that names a
/// replica only against a log of that replica, and takes the log's replica from its own records
/// (and its own checkpoint files): an insider who rewrites a record and renames every record to
/// another replica, chaining them all again, and removes the local checkpoint files, gets a log
/// that verified (exit 0) against the fleet's shipped checkpoints, which were then "another
/// replica's" and not checked. Now shipped checkpoints that name none of the log's replicas fail
/// it. The same attack without the rename is caught too.
#[test]
fn renaming_the_replica_in_a_rewritten_log_does_not_escape_the_shipped_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = keygen(dir.path());
    let data = dir.path().join("a");
    let args = ["--shards", "1", "--audit-segment-bytes", "65536", "--audit-signing-key", key.to_str().unwrap()];
    let mut server = Server::start_in(&data, &[&args[..], &["--replica-id", "r-1"]].concat());
    load(&server, 300, 4);
    stop(&mut server);
    let shipped = dir.path().join("fleet.jsonl");
    std::fs::write(&shipped, server.checkpoint_lines().join("\n") + "\n").unwrap();
    let with_fleet = ["--public-key", public.to_str().unwrap(), "--checkpoints", shipped.to_str().unwrap()];
    let audit = data.join("audit");
    let (code, out, err) = verify(&audit, &with_fleet);
    assert_eq!(code, 0, "{out}{err}");

    // The insider's edit: record 10 says 200 rather than 404, every record after is chained again.
    let edited = dir.path().join("edited");
    copy_dir(&audit, &edited);
    rewrite_and_rechain(&edited.join("shard-0"), 10);
    let (code, out, err) = verify(&edited, &with_fleet);
    assert_eq!(code, 1, "the plain rewrite is caught: {out}{err}");

    // The same edit, with every record renamed to r-9 and the local checkpoint files gone.
    let renamed_data = dir.path().join("renamed-data");
    let renamed = renamed_data.join("audit");
    copy_dir(&audit, &renamed);
    for name in ["checkpoints", "checkpoints.1"] {
        let _ = std::fs::remove_file(renamed.join("shard-0").join(name));
        let _ = std::fs::remove_file(renamed.join(name));
    }
    let mut prev: Option<String> = None;
    let mut n = 0;
    for path in segments(&renamed.join("shard-0")) {
        let text = std::fs::read_to_string(&path).unwrap();
        let mut out = String::new();
        for record in text.lines() {
            let mut record = record.replacen("\"replica\":\"r-1\"", "\"replica\":\"r-9\"", 1);
            if n == 10 {
                record = record.replacen("\"status_code\":404", "\"status_code\":200", 1);
            }
            prev = Some(rechain(&mut record, prev.as_deref()));
            out.push_str(&record);
            out.push('\n');
            n += 1;
        }
        std::fs::write(&path, out).unwrap();
    }
    // Nothing signed for r-9 yet: verify still fails ("no checkpoint signed by this key").
    let (code, out, err) = verify(&renamed, &with_fleet);
    eprintln!("audit: verify of the renamed log before re-signing: exit {code}\n{out}{err}");
    // The insider has the host, so the signing key: a server started on the renamed log as r-9
    // signs checkpoints of it, which the shipped r-1 checkpoints can no longer contradict.
    let mut server = Server::start_in(&renamed_data, &[&args[..], &["--replica-id", "r-9"]].concat());
    load(&server, 5, 1);
    stop(&mut server);
    let (code, out, err) = verify(&renamed, &with_fleet);
    eprintln!("audit: verify of the renamed, re-signed log: exit {code}\n{out}{err}");
    assert_eq!(code, 1, "a rewritten log escaped the shipped checkpoints by naming another replica: {out}{err}");
}
