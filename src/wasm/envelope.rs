//! The JSON envelope ABI of Fiso's modules (`abi = "envelope"`), over WASI stdin and stdout:
//!
//! ```text
//! stdin:  {"payload": <JSON>, "headers": {"k": "v"}, "direction": "inbound"}
//! stdout: {"payload": <JSON>, "headers": {"k": "v"}}
//! ```
//!
//! The payload travels as raw JSON text: it is checked, never re-encoded, so numbers and key order
//! reach the guest exactly as the client sent them.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::ApiError;
use crate::http::header_rules;

/// Header names to values, as a guest sees them.
pub type Headers = BTreeMap<String, String>;

/// Builds the guest's stdin from a payload that must be JSON.
pub fn encode_input(payload: &[u8], headers: &Headers) -> Result<Vec<u8>, ApiError> {
    let payload = std::str::from_utf8(payload).map_err(|_| ApiError::InvalidPayload("it is not UTF-8".into()))?;
    if payload.trim().is_empty() {
        return Err(ApiError::InvalidPayload("it is empty".into()));
    }
    let raw: &RawValue = serde_json::from_str(payload).map_err(|e| ApiError::InvalidPayload(e.to_string()))?;
    let headers = serde_json::to_string(headers).map_err(|e| ApiError::Internal(e.to_string()))?;
    let mut stdin = Vec::with_capacity(raw.get().len() + headers.len() + 48);
    stdin.extend_from_slice(b"{\"payload\":");
    stdin.extend_from_slice(raw.get().as_bytes());
    stdin.extend_from_slice(b",\"headers\":");
    stdin.extend_from_slice(headers.as_bytes());
    stdin.extend_from_slice(b",\"direction\":\"inbound\"}");
    Ok(stdin)
}

/// What an envelope guest answered: its payload as JSON text, and its headers.
#[derive(Debug)]
pub struct EnvelopeOutput {
    pub payload: Vec<u8>,
    pub headers: Headers,
}

#[derive(Deserialize)]
struct Output<'a> {
    // Present-but-null is a payload (`null`); absent is an error. Hence not a plain `Option`.
    #[serde(borrow, default, deserialize_with = "present")]
    payload: Option<&'a RawValue>,
    #[serde(default)]
    headers: Option<Headers>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// Parses a guest's stdout. Headers must be strings that HTTP can carry, at most `max_headers` of
/// them; a missing or null `headers` is none.
pub fn decode_output(stdout: &[u8], max_headers: usize) -> Result<EnvelopeOutput, ApiError> {
    // serde would also read a struct from an array (`[payload, headers]`); the ABI is an object.
    if stdout.trim_ascii_start().first() != Some(&b'{') {
        let shown = String::from_utf8_lossy(&stdout[..stdout.len().min(120)]).into_owned();
        return Err(ApiError::InvalidEnvelopeOutput(format!("it is not a JSON object; stdout began {shown:?}")));
    }
    let output: Output<'_> = serde_json::from_slice(stdout).map_err(|e| {
        let shown = String::from_utf8_lossy(&stdout[..stdout.len().min(120)]).into_owned();
        ApiError::InvalidEnvelopeOutput(format!("{e}; stdout began {shown:?}"))
    })?;
    let payload = output.payload.ok_or(ApiError::EnvelopeMissingPayload)?;
    let headers = output.headers.unwrap_or_default();
    if headers.len() > max_headers {
        return Err(ApiError::InvalidEnvelopeOutput(format!("{} headers, more than {max_headers}", headers.len())));
    }
    for (name, value) in &headers {
        header_rules::check(name, value).map_err(ApiError::InvalidEnvelopeOutput)?;
    }
    Ok(EnvelopeOutput { payload: payload.get().as_bytes().to_vec(), headers })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_keeps_the_payload_verbatim() {
        let headers = Headers::from([("x-trace".to_string(), "7".to_string())]);
        let stdin = encode_input(br#" {"amount": 99.990, "b": 1, "a": 2} "#, &headers).unwrap();
        assert_eq!(
            String::from_utf8(stdin).unwrap(),
            r#"{"payload":{"amount": 99.990, "b": 1, "a": 2},"headers":{"x-trace":"7"},"direction":"inbound"}"#
        );
        for bad in [&b""[..], b"  ", b"{", b"not json", b"\xff"] {
            assert_eq!(encode_input(bad, &headers).unwrap_err().kind(), "invalid_payload", "{bad:?}");
        }
    }

    #[test]
    fn output_shapes() {
        let decode = |b: &[u8]| decode_output(b, 4);
        let out = decode(b"{\"payload\":{\"a\":1},\"headers\":{\"X-WASM-Processed\":\"true\"}}\n").unwrap();
        assert_eq!(out.payload, br#"{"a":1}"#);
        assert_eq!(out.headers["X-WASM-Processed"], "true");
        assert_eq!(decode(br#"{"payload":null,"headers":null}"#).unwrap().payload, b"null");
        assert_eq!(decode(br#"{"headers":{}}"#).unwrap_err().kind(), "envelope_missing_payload");
        let bad: [&[u8]; 7] = [
            b"hello",
            b"",
            b"[1]",
            br#"{"payload":1,"headers":{"a":1}}"#,
            br#"{"payload":1,"headers":{"bad name":"v"}}"#,
            br#"{"payload":1,"headers":{"x":"a\r\nb"}}"#,
            br#"{"payload":1,"headers":{"a":"","b":"","c":"","d":"","e":""}}"#,
        ];
        for bad in bad {
            assert_eq!(
                decode(bad).unwrap_err().kind(),
                "invalid_envelope_output",
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
