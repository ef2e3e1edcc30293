//! Native TLS and mTLS with certificates made at test time, certificate reload, and
//! X-Forwarded-Client-Cert from trusted proxies only.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::ca::Ca;
use common::{guests, within, Server};
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName};

/// The CLI client's own TLS set-up, trusting `trust` and presenting `identity` when given.
fn client_config(trust: &Path, identity: Option<(&Path, &Path)>) -> Arc<rustls::ClientConfig> {
    tensor_wasm::client::ClientTls::new(Some(trust), identity).unwrap().config
}

/// One HTTP/1.1 request over TLS; the status and body, or the I/O error (a failed handshake).
fn https(
    addr: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
    body: &[u8],
) -> std::io::Result<(u16, String)> {
    let conn = rustls::ClientConnection::new(config.clone(), ServerName::try_from("localhost").unwrap()).unwrap();
    let sock = TcpStream::connect(addr)?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let request = common::encode_request(method, path, &[("connection", "close")], body);
    tls.write_all(&request)?;
    tls.flush()?;
    let mut reader = BufReader::new(tls);
    let mut status_line = String::new();
    reader.read_line(&mut status_line)?;
    let status = status_line.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, format!("bad status line {status_line:?}"))
    })?;
    let mut rest = Vec::new();
    let _ = reader.read_to_end(&mut rest);
    let text = String::from_utf8_lossy(&rest);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

fn wait_https_ready(server: &Server, config: &Arc<rustls::ClientConfig>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if matches!(https(server.addr, config, "GET", "/readyz", b""), Ok((200, _))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("TLS server never became ready:\n{}", server.stderr());
}

/// A TLS server whose certificate `ca` signed (the CA also written to `CA_NAME.pem`), with
/// `extra` flags; its certificate and key files, and a client that trusts `ca`.
fn tls_server(
    dir: &Path,
    ca: &Ca,
    ca_name: &str,
    extra: &[&str],
) -> (Server, PathBuf, PathBuf, Arc<rustls::ClientConfig>) {
    let ca_file = dir.join(format!("{ca_name}.pem"));
    ca.write_ca(&ca_file);
    let (cert, key) = ca.issue(dir, "server", "localhost");
    let mut args = vec!["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()];
    args.extend_from_slice(extra);
    let server = Server::spawn(&dir.join("data"), &args, |_| {});
    let client = client_config(&ca_file, None);
    (server, cert, key, client)
}

fn deploy_body() -> Vec<u8> {
    use base64::Engine as _;
    serde_json::json!({"name": "hello", "wasm_b64": base64::engine::general_purpose::STANDARD.encode(guests::hello())})
        .to_string()
        .into_bytes()
}

#[test]
fn tls_serves_https_and_refuses_plain_text() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _, _, client) = tls_server(dir.path(), &Ca::new("Test CA"), "ca", &[]);
    wait_https_ready(&server, &client);

    let (status, body) = https(server.addr, &client, "GET", "/healthz", b"").unwrap();
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ok"}"#));
    let (status, body) = https(server.addr, &client, "POST", "/functions", &deploy_body()).unwrap();
    assert_eq!(status, 201, "{body}");
    let id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"].as_str().unwrap().to_string();
    let (status, body) = https(server.addr, &client, "POST", &format!("/functions/{id}/invoke"), b"{}").unwrap();
    assert_eq!(status, 200, "{body}");

    // Plain HTTP to a TLS listener: at most a TLS alert comes back, never HTTP, then the close.
    let mut plain = TcpStream::connect(server.addr).unwrap();
    plain.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    plain.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    plain.read_to_end(&mut answer).expect("the server closes the connection");
    assert!(!answer.starts_with(b"HTTP/"), "{answer:?}");
    assert!(answer.is_empty() || answer[0] == 0x15, "a TLS alert record, if anything: {answer:?}");
    // A client that does not trust the server's CA refuses it.
    let other = Ca::new("Other CA");
    other.write_ca(&dir.path().join("other.pem"));
    assert!(https(server.addr, &client_config(&dir.path().join("other.pem"), None), "GET", "/healthz", b"").is_err());

    let (_, metrics) = https(server.addr, &client, "GET", "/metrics", b"").unwrap();
    assert!(common::sum_metric(&metrics, "tensor_wasm_tls_handshake_failures_total", &[]) >= 1.0, "{metrics}");
}

#[test]
fn mtls_accepts_trusted_client_certificates_only() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Test CA");
    let ca_arg = dir.path().join("ca.pem");
    let (server, _, _, _) = tls_server(dir.path(), &ca, "ca", &["--tls-client-ca", ca_arg.to_str().unwrap()]);
    let (client_cert, client_key) = ca.issue(dir.path(), "client", "svc7-client");
    let (rogue_cert, rogue_key) = Ca::new("Rogue CA").issue(dir.path(), "rogue", "svc7-client");
    let trusted = client_config(&ca_arg, Some((&client_cert, &client_key)));
    wait_https_ready(&server, &trusted);

    // With a trusted certificate: served, and its subject reaches the request (here, the log).
    let (status, body) = https(server.addr, &trusted, "POST", "/functions", &deploy_body()).unwrap();
    assert_eq!(status, 201, "{body}");
    let log = server.wait_for_stderr("function deployed");
    assert!(log.contains("CN=svc7-client"), "{log}");

    // Without a certificate, or with one from another CA: the handshake fails.
    let anonymous = client_config(&ca_arg, None);
    assert!(https(server.addr, &anonymous, "GET", "/healthz", b"").is_err());
    let untrusted = client_config(&ca_arg, Some((&rogue_cert, &rogue_key)));
    assert!(https(server.addr, &untrusted, "GET", "/healthz", b"").is_err());
    // The server keeps serving the trusted client.
    assert_eq!(https(server.addr, &trusted, "GET", "/healthz", b"").unwrap().0, 200);
    let (_, metrics) = https(server.addr, &trusted, "GET", "/metrics", b"").unwrap();
    assert!(common::sum_metric(&metrics, "tensor_wasm_tls_handshake_failures_total", &[]) >= 2.0, "{metrics}");
}

#[test]
fn certificates_are_reloaded_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (server, cert, key, trusts_first) = tls_server(dir.path(), &Ca::new("First CA"), "first", &[]);
    wait_https_ready(&server, &trusts_first);

    // A renewal by another CA, written over the same files (key first, then the certificate).
    let second = Ca::new("Second CA");
    second.write_ca(&dir.path().join("second.pem"));
    let renewed = tempfile::tempdir().unwrap();
    let (new_cert, new_key) = second.issue(renewed.path(), "server", "localhost");
    std::fs::copy(&new_key, &key).unwrap();
    std::fs::copy(&new_cert, &cert).unwrap();
    let trusts_second = client_config(&dir.path().join("second.pem"), None);
    let deadline = Instant::now() + Duration::from_secs(10);
    while https(server.addr, &trusts_second, "GET", "/healthz", b"").is_err() {
        assert!(Instant::now() < deadline, "the renewed certificate was not picked up:\n{}", server.stderr());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(https(server.addr, &trusts_first, "GET", "/healthz", b"").is_err(), "the old certificate is gone");
    server.wait_for_stderr("TLS configuration reloaded");
}

/// The server's log once it holds `n` deploy lines.
fn within_log(server: &Server, n: usize) -> String {
    within(Duration::from_secs(10), "the deploy log lines", || {
        server.stderr().matches("function deployed").count() >= n
    });
    server.stderr()
}

#[test]
fn forwarded_client_certificates_only_from_trusted_proxies() {
    let xfcc = r#"By=spiffe://ingress;Hash=abc;Subject="CN=via-proxy,O=Acme""#;
    // Loopback is a trusted proxy: the header is believed.
    let trusting = Server::start(&["--trusted-proxy-cidrs", "127.0.0.0/8"]);
    let r = trusting.client().request("POST", "/functions", &[("x-forwarded-client-cert", xfcc)], &deploy_body());
    assert_eq!(r.status, 201);
    let log = trusting.wait_for_stderr("function deployed");
    assert!(log.contains("CN=via-proxy,O=Acme"), "{log}");
    assert_eq!(trusting.metric("tensor_wasm_xfcc_ignored_total", &[]), 0.0);

    // A proxy that appends: the client's own element comes first, the proxy's last. Only the
    // last is believed, whether the elements share one header line or not.
    let appended = format!(r#"By=x;Subject="CN=forged-first",{xfcc}"#);
    let r = trusting.client().request("POST", "/functions", &[("x-forwarded-client-cert", &appended)], &deploy_body());
    assert_eq!(r.status, 201);
    let lines = [("x-forwarded-client-cert", r#"Subject="CN=forged-line""#), ("x-forwarded-client-cert", xfcc)];
    let r = trusting.client().request("POST", "/functions", &lines, &deploy_body());
    assert_eq!(r.status, 201);
    // A quote the client leaves open would swallow the proxy's comma: the header names nobody.
    let unbalanced = format!(r#"Subject="CN=forged-open,{xfcc}"#);
    let r =
        trusting.client().request("POST", "/functions", &[("x-forwarded-client-cert", &unbalanced)], &deploy_body());
    assert_eq!(r.status, 201);
    let log = within_log(&trusting, 4);
    assert!(!log.contains("forged"), "{log}");
    assert_eq!(log.matches(r#"client="CN=via-proxy,O=Acme""#).count(), 3, "{log}");
    assert_eq!(log.matches(r#"client="-""#).count(), 1, "{log}");
    assert_eq!(trusting.client().request("GET", "/healthz", &[], b"").status, 200);

    // Nobody is trusted: the header is ignored, and counted.
    let wary = Server::start(&[]);
    let r = wary.client().request("POST", "/functions", &[("x-forwarded-client-cert", xfcc)], &deploy_body());
    assert_eq!(r.status, 201);
    let log = wary.wait_for_stderr("function deployed");
    assert!(!log.contains("via-proxy"), "{log}");
    assert_eq!(wary.metric("tensor_wasm_xfcc_ignored_total", &[]), 1.0);

    // A bad network list stops start-up.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tensor-wasm"))
        .args(["serve", "--trusted-proxy-cidrs", "10.0.0.0/99"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn bad_tls_files_stop_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate").unwrap();
    for args in [
        vec!["serve", "--tls-cert", junk.to_str().unwrap(), "--tls-key", junk.to_str().unwrap()],
        vec!["serve", "--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.key"],
        vec!["serve", "--tls-cert", junk.to_str().unwrap()],
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tensor-wasm"))
            .args(&args)
            .arg("--data-dir")
            .arg(dir.path().join("d"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn the_client_commands_reach_an_https_server_with_mtls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Test CA");
    let ca_file = dir.path().join("ca.pem");
    let (server, _, _, _) = tls_server(dir.path(), &ca, "ca", &["--tls-client-ca", ca_file.to_str().unwrap()]);
    let (cert, key) = ca.issue(dir.path(), "client", "svc7-client");
    wait_https_ready(&server, &client_config(&ca_file, Some((&cert, &key))));
    let url = format!("https://localhost:{}", server.addr.port());
    let hello = dir.path().join("hello.wasm");
    std::fs::write(&hello, guests::hello()).unwrap();
    let (ca_arg, cert_arg, key_arg) = (ca_file.to_str().unwrap(), cert.to_str().unwrap(), key.to_str().unwrap());
    let with = |args: &[&str]| -> Vec<String> {
        let tls = ["--server", &url, "--ca-cert", ca_arg, "--client-cert", cert_arg, "--client-key", key_arg];
        args.iter().chain(tls.iter()).map(|s| s.to_string()).collect()
    };
    let run = |args: Vec<String>| common::tensor_wasm(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[]);

    let (code, out, err) = run(with(&["deploy", hello.to_str().unwrap(), "--name", "hello"]));
    assert_eq!(code, 0, "{err}");
    let id = serde_json::from_str::<serde_json::Value>(&out).unwrap()["id"].as_str().unwrap().to_string();
    let (code, out, err) = run(with(&["invoke", &id]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"result\":\"ok\""), "{out}");
    let (code, out, err) = run(with(&["observe", "--once", "--interval", "200ms"]));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("HEALTHY"), "{out}");

    // Without a client certificate the server ends the handshake: a sentence and exit 1.
    let (code, _, err) = common::tensor_wasm(&["functions", "list", "--server", &url, "--ca-cert", ca_arg], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot reach"), "{err}");
    // By default the server is checked against the system's trust store (SSL_CERT_FILE here).
    let other = dir.path().join("other.pem");
    Ca::new("Other CA").write_ca(&other);
    let list = ["functions", "list", "--server", &url, "--client-cert", cert_arg, "--client-key", key_arg];
    let (code, _, err) = common::tensor_wasm(&list, &[("SSL_CERT_FILE", other.to_str().unwrap())]);
    assert_eq!(code, 1);
    assert!(err.contains("certificate"), "{err}");
    let (code, out, err) = common::tensor_wasm(&list, &[("SSL_CERT_FILE", ca_file.to_str().unwrap())]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&id), "{out}");
    // A certificate without its key is a usage error.
    let (code, _, err) = common::tensor_wasm(&["functions", "list", "--server", &url, "--client-cert", cert_arg], &[]);
    assert_eq!(code, 2, "{err}");
}

/// A one-shot HTTPS sink on loopback with `cert` and `key`: answers the request it gets with 200
/// and returns its body; a failed handshake returns `None`.
fn https_sink(cert: &Path, key: &Path) -> (u16, std::thread::JoinHandle<Option<String>>) {
    let chain = CertificateDer::pem_file_iter(cert).unwrap().map(Result::unwrap).collect();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, PrivateKeyDer::from_pem_file(key).unwrap())
        .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let thread = std::thread::spawn(move || {
        let (sock, _) = listener.accept().unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let session = rustls::ServerConnection::new(Arc::new(config)).unwrap();
        let mut reader = BufReader::new(rustls::StreamOwned::new(session, sock));
        let mut length = 0;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).ok()?;
            match line.trim_end().split_once(':') {
                Some((name, value)) if name.eq_ignore_ascii_case("content-length") => {
                    length = value.trim().parse().unwrap();
                }
                None if line.trim_end().is_empty() => break,
                _ => {}
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).ok()?;
        let tls = reader.get_mut();
        tls.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").ok()?;
        tls.conn.send_close_notify();
        tls.flush().ok()?;
        Some(String::from_utf8(body).unwrap())
    });
    (port, thread)
}

#[test]
fn pipelines_deliver_to_https_sinks_that_the_trust_store_vouches_for() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Sink CA");
    let ca_file = dir.path().join("sink-ca.pem");
    ca.write_ca(&ca_file);
    // The sinks listen on loopback, which the default policy refuses.
    let server = Server::start_with(&dir.path().join("data"), &["--sink-allowed-cidrs", "127.0.0.0/8,::1"], |cmd| {
        cmd.env("SSL_CERT_FILE", &ca_file);
    });
    let r = server.client().deploy("enrich", &guests::fiso_module("enrich"), serde_json::json!({"abi": "envelope"}));
    assert_eq!(r.status, 201, "{}", r.text());
    let pipeline = |name: &str, port: u16| {
        let sink = serde_json::json!({"url": format!("https://localhost:{port}/events"), "max_attempts": 1});
        let spec = serde_json::json!({"name": name, "steps": ["enrich"], "sink": sink}).to_string();
        let r = server.client().request("POST", "/pipelines", &[("content-type", "application/json")], spec.as_bytes());
        assert_eq!(r.status, 201, "{}", r.text());
        let id = r.json()["id"].as_str().unwrap().to_string();
        server.client().request("POST", &format!("/pipelines/{id}/invoke"), &[], br#"{"order_id":"1"}"#)
    };

    let (cert, key) = ca.issue(dir.path(), "sink", "localhost");
    let (port, sink) = https_sink(&cert, &key);
    let r = pipeline("trusted", port);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!((r.json()["delivered"].clone(), r.json()["sink"]["status"].clone()), (true.into(), 200.into()));
    assert!(sink.join().unwrap().unwrap().contains("processed_by"));

    // A sink whose certificate no trusted CA signed is not delivered to, and the answer says why.
    let (cert, key) = Ca::new("Rogue CA").issue(dir.path(), "rogue", "localhost");
    let (port, sink) = https_sink(&cert, &key);
    let r = pipeline("untrusted", port);
    assert_eq!((r.status, r.error_kind().as_str()), (502, "sink_delivery_failed"), "{}", r.text());
    assert!(r.text().contains("certificate"), "{}", r.text());
    assert_eq!(sink.join().unwrap(), None);
}
