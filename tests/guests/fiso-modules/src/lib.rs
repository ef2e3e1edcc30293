//! The envelope as Fiso's modules see it: `{"payload", "headers", "direction"}` on stdin,
//! `{"payload", "headers"}` on stdout.

use std::io::{Read, Write};

use serde_json::{Map, Value};

pub struct Envelope {
    pub payload: Value,
    pub headers: Map<String, Value>,
}

/// Reads the input envelope; exits 1 with a message on stderr when it is not one.
pub fn read() -> Envelope {
    let mut input = String::new();
    if std::io::stdin().read_to_string(&mut input).is_err() {
        fail("stdin is not UTF-8");
    }
    let mut value: Value = serde_json::from_str(&input).unwrap_or_else(|e| fail(&format!("invalid JSON: {e}")));
    let payload = value.get_mut("payload").map(Value::take).unwrap_or_else(|| fail("no payload"));
    let headers = match value.get_mut("headers").map(Value::take) {
        Some(Value::Object(map)) => map,
        _ => Map::new(),
    };
    Envelope { payload, headers }
}

/// Writes the output envelope.
pub fn write(envelope: Envelope) {
    let out = serde_json::json!({ "payload": envelope.payload, "headers": envelope.headers });
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(out.to_string().as_bytes());
    let _ = stdout.write_all(b"\n");
}

pub fn fail(message: &str) -> ! {
    eprintln!("{message}");
    std::process::exit(1)
}
