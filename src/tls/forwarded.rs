//! `X-Forwarded-Client-Cert` (XFCC), the client certificate an mTLS-terminating proxy saw. It is
//! believed only from peers inside `TENSOR_WASM_API_TRUSTED_PROXY_CIDRS`; from anyone else it is
//! ignored (and counted), since any client could send it.

/// The `Subject` of the first element of an XFCC header (Envoy's format:
/// `By=…;Hash=…;Subject="CN=client,O=org";URI=…`).
pub fn xfcc_subject(value: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(value).ok()?;
    let first = first_element(text);
    for pair in split_outside_quotes(first, ';') {
        let (key, value) = pair.split_once('=')?;
        if key.trim().eq_ignore_ascii_case("subject") {
            let v = value.trim();
            let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v);
            return (!v.is_empty()).then(|| v.replace("\\\"", "\""));
        }
    }
    None
}

fn first_element(text: &str) -> &str {
    split_outside_quotes(text, ',').next().unwrap_or("")
}

fn split_outside_quotes(text: &str, sep: char) -> impl Iterator<Item = &str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in text.char_indices() {
        match c {
            '\\' if quoted && !escaped => {
                escaped = true;
                continue;
            }
            '"' if !escaped => quoted = !quoted,
            c if c == sep && !quoted => {
                parts.push(&text[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
        escaped = false;
    }
    parts.push(&text[start..]);
    parts.into_iter()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xfcc() {
        let v = br#"By=spiffe://a;Hash=abc;Subject="CN=svc7,O=Acme, Inc.";URI=spiffe://b,By=x;Subject="CN=second""#;
        assert_eq!(xfcc_subject(v).as_deref(), Some("CN=svc7,O=Acme, Inc."));
        assert_eq!(xfcc_subject(b"Subject=CN=plain").as_deref(), Some("CN=plain"));
        assert_eq!(xfcc_subject(br#"Subject="CN=a \"quoted\" name""#).as_deref(), Some(r#"CN=a "quoted" name"#));
        assert_eq!(xfcc_subject(b"Hash=abc"), None);
        assert_eq!(xfcc_subject(b"\xff"), None);
    }
}
