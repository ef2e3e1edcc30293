//! The client commands: `deploy`, `invoke` and `functions list|get|delete`, against a running
//! server. Errors are sentences on stderr and a non-zero exit.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use clap::{Args, Subcommand};

use crate::http::client::{encode_request, exchange, Answer, Exchange, Target};
use crate::tls::ClientTls;

/// Most bytes of an answer the client reads.
const MAX_ANSWER: usize = 64 * 1024 * 1024;

/// Exit status when the request could not be made or the server refused it.
pub const EXIT_FAILED: i32 = 1;

/// How the client reaches an https:// server.
#[derive(Args, Clone, Debug)]
pub struct TlsArgs {
    /// PEM file of the CAs to trust for an https:// server. Default: the system's trust store
    /// (`SSL_CERT_FILE`, or the distribution's bundle).
    #[arg(long, env = "TENSOR_WASM_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Client certificate chain (PEM) for a server that requires mTLS.
    #[arg(long, env = "TENSOR_WASM_CLIENT_CERT", requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "TENSOR_WASM_CLIENT_KEY", requires = "client_cert", hide_env_values = true)]
    pub client_key: Option<PathBuf>,
}

impl TlsArgs {
    /// The TLS settings these flags give; `None` where they give none, and an https:// server is
    /// then checked against the system's trust store.
    pub fn client_tls(&self) -> Result<Option<ClientTls>, String> {
        let identity = self.client_cert.as_deref().zip(self.client_key.as_deref());
        if self.ca_cert.is_none() && identity.is_none() {
            return Ok(None);
        }
        ClientTls::new(self.ca_cert.as_deref(), identity).map(Some)
    }
}

#[derive(Args, Clone, Debug)]
pub struct ClientArgs {
    /// The server's base URL, http:// or https://.
    #[arg(long, env = "TENSOR_WASM_SERVER", default_value = "http://127.0.0.1:8080")]
    pub server: String,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// The bearer token.
    #[arg(long, env = "TENSOR_WASM_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The tenant to act for (`x-tensor-wasm-tenant`).
    #[arg(long, env = "TENSOR_WASM_TENANT")]
    pub tenant: Option<u64>,
    /// Give up on a request after this many seconds.
    #[arg(long, default_value_t = 60)]
    pub timeout_secs: u64,
}

#[derive(Subcommand)]
pub enum FunctionsCommand {
    /// One line per function of the tenant.
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// One function, as JSON.
    Get {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Deletes a function.
    Delete {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Args)]
pub struct DeployArgs {
    /// The module (.wasm).
    pub file: PathBuf,
    /// The function's name.
    #[arg(long)]
    pub name: String,
    /// `command` (stdin/stdout) or `envelope` (Fiso's JSON envelope).
    #[arg(long)]
    pub abi: Option<String>,
    #[arg(long)]
    pub timeout_ms: Option<u64>,
    #[arg(long)]
    pub memory_limit_mb: Option<u64>,
    /// A safetensors file: the function's resident tensors, which its guest names with
    /// `tensor_weight`.
    #[arg(long)]
    pub tensors: Option<PathBuf>,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Args)]
pub struct InvokeArgs {
    pub id: String,
    /// The request body: text, `@FILE`, or `-` for stdin. Default: empty.
    #[arg(long, short = 'd')]
    pub data: Option<String>,
    #[command(flatten)]
    pub client: ClientArgs,
}

impl ClientArgs {
    fn target(&self, path: &str) -> Result<Target, String> {
        let base = Target::parse(&self.server).map_err(|e| format!("--server {}: {e}", self.server))?;
        Ok(base.with_path(path))
    }

    /// One request; a non-2xx answer becomes the server's error sentence.
    pub fn call(&self, method: &str, path: &str, body: &[u8]) -> Result<Answer, String> {
        let target = self.target(path)?;
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let tenant = self.tenant.map(|t| t.to_string());
        let mut headers = vec![("accept", "application/json")];
        if !body.is_empty() {
            headers.push(("content-type", "application/json"));
        }
        if let Some(auth) = &auth {
            headers.push(("authorization", auth));
        }
        if let Some(tenant) = &tenant {
            headers.push(("x-tensor-wasm-tenant", tenant));
        }
        let request = encode_request(method, &target, &headers, body);
        let tls = self.tls.client_tls()?;
        let how = Exchange {
            timeout: Duration::from_secs(self.timeout_secs),
            max_body: Some(MAX_ANSWER),
            tls: tls.as_ref(),
            allow: None,
        };
        let answer = exchange(&target, &request, how).map_err(|e| format!("cannot reach {}: {e}", self.server))?;
        if (200..300).contains(&answer.status) {
            return Ok(answer);
        }
        Err(error_sentence(&answer))
    }
}

/// `the server refused: <message> (HTTP 404 function_not_found)`, from an error body.
fn error_sentence(answer: &Answer) -> String {
    let body: Option<serde_json::Value> = serde_json::from_slice(&answer.body).ok();
    let error = body.as_ref().map(|b| &b["error"]);
    match error.and_then(|e| Some((e["kind"].as_str()?, e["message"].as_str()?))) {
        Some((kind, message)) => format!("the server refused: {message} (HTTP {} {kind})", answer.status),
        None => format!("the server answered HTTP {}: {}", answer.status, String::from_utf8_lossy(&answer.body).trim()),
    }
}

fn pretty(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned())
}

/// Runs a client command; prints its result and returns the exit status.
fn finish(result: Result<String, String>) -> i32 {
    match result {
        Ok(out) => {
            if !out.is_empty() {
                println!("{out}");
            }
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            EXIT_FAILED
        }
    }
}

pub fn deploy(args: DeployArgs) -> i32 {
    finish((|| {
        let wasm = std::fs::read(&args.file).map_err(|e| format!("cannot read {}: {e}", args.file.display()))?;
        let mut body = serde_json::json!({
            "name": args.name,
            "wasm_b64": base64::engine::general_purpose::STANDARD.encode(&wasm),
        });
        let tensors = match &args.tensors {
            Some(path) => {
                let file = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                Some(serde_json::Value::from(base64::engine::general_purpose::STANDARD.encode(&file)))
            }
            None => None,
        };
        for (key, value) in [
            ("tensors_b64", tensors),
            ("abi", args.abi.map(serde_json::Value::from)),
            ("timeout_ms", args.timeout_ms.map(serde_json::Value::from)),
            ("memory_limit_mb", args.memory_limit_mb.map(serde_json::Value::from)),
        ] {
            if let Some(value) = value {
                body[key] = value;
            }
        }
        let answer = args.client.call("POST", "/functions", body.to_string().as_bytes())?;
        Ok(pretty(&answer.body))
    })())
}

pub fn invoke(args: InvokeArgs) -> i32 {
    finish((|| {
        let body = match args.data.as_deref() {
            None => Vec::new(),
            Some("-") => {
                let mut b = Vec::new();
                std::io::stdin().read_to_end(&mut b).map_err(|e| format!("cannot read stdin: {e}"))?;
                b
            }
            Some(data) => match data.strip_prefix('@') {
                Some(path) => std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))?,
                None => data.as_bytes().to_vec(),
            },
        };
        let answer = args.client.call("POST", &format!("/functions/{}/invoke", args.id), &body)?;
        Ok(String::from_utf8_lossy(&answer.body).into_owned())
    })())
}

pub fn functions(command: FunctionsCommand) -> i32 {
    finish(match command {
        FunctionsCommand::List { client } => client.call("GET", "/functions", b"").and_then(|a| list_table(&a.body)),
        FunctionsCommand::Get { id, client } => {
            client.call("GET", &format!("/functions/{id}"), b"").map(|a| pretty(&a.body))
        }
        FunctionsCommand::Delete { id, client } => {
            client.call("DELETE", &format!("/functions/{id}"), b"").map(|_| format!("deleted {id}"))
        }
    })
}

/// `ID  NAME  ABI  SOURCE  TIMEOUT_MS  MEMORY_MB`, one function a line.
fn list_table(body: &[u8]) -> Result<String, String> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| format!("the listing is not JSON: {e}"))?;
    let functions = value["functions"].as_array().ok_or("the listing has no `functions`")?;
    let mut out = format!(
        "{:<32}  {:<24}  {:<8}  {:<9}  {:>10}  {:>9}",
        "ID", "NAME", "ABI", "SOURCE", "TIMEOUT_MS", "MEMORY_MB"
    );
    for f in functions {
        let s = |k: &str| f[k].as_str().map(str::to_string).unwrap_or_else(|| f[k].to_string());
        out.push_str(&format!(
            "\n{:<32}  {:<24}  {:<8}  {:<9}  {:>10}  {:>9}",
            s("id"),
            s("name"),
            s("abi"),
            s("source"),
            s("timeout_ms"),
            s("memory_limit_mb")
        ));
    }
    Ok(out)
}
