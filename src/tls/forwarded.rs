//! `X-Forwarded-Client-Cert` (XFCC), the client certificate an mTLS-terminating proxy saw. It is
//! believed only from peers inside `TENSOR_WASM_API_TRUSTED_PROXY_CIDRS`; from anyone else it is
//! ignored (and counted), since any client could send it.
//!
//! The header is a comma-separated list, one element per proxy that forwarded the request, each
//! appended to what it received. Only the last element was written by the peer we trust, the
//! nearest proxy; every element before it came from further away, the client included, and so
//! is taken from the last element alone. The proxy must still overwrite the header rather than
//! append to it (Envoy's `forward_client_cert_details: SANITIZE_SET`): when a client without a
//! certificate connects, an appending proxy adds nothing, and the last element is then the
//! client's own (docs/API.md).

/// The `Subject` of the last element of an XFCC header's values, taken as one list in order
/// (Envoy's format: `By=…;Hash=…;Subject="CN=client,O=org";URI=…`).
pub fn xfcc_subject<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> Option<String> {
    let last = values.into_iter().last()?;
    let text = std::str::from_utf8(last).ok()?;
    // An unbalanced quote hides where elements start: a client could open one in its element so
    // that the proxy's comma lands inside it. Such a header names nobody.
    let element = split_outside_quotes(text, ',')?.last()?;
    for pair in split_outside_quotes(element, ';')? {
        let (key, value) = pair.split_once('=')?;
        if key.trim().eq_ignore_ascii_case("subject") {
            let v = value.trim();
            let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v);
            return (!v.is_empty()).then(|| v.replace("\\\"", "\""));
        }
    }
    None
}

/// `text` split at each `sep` outside double quotes; `None` when a quote is left open.
fn split_outside_quotes(text: &str, sep: char) -> Option<impl Iterator<Item = &str>> {
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
    if quoted {
        return None;
    }
    parts.push(&text[start..]);
    Some(parts.into_iter())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(value: &[u8]) -> Option<String> {
        xfcc_subject([value])
    }

    #[test]
    fn xfcc() {
        assert_eq!(
            one(br#"By=spiffe://a;Hash=abc;Subject="CN=svc7,O=Acme, Inc.";URI=spiffe://b"#).as_deref(),
            Some("CN=svc7,O=Acme, Inc.")
        );
        assert_eq!(one(b"Subject=CN=plain").as_deref(), Some("CN=plain"));
        assert_eq!(one(br#"Subject="CN=a \"quoted\" name""#).as_deref(), Some(r#"CN=a "quoted" name"#));
        assert_eq!(one(b"Hash=abc"), None);
        assert_eq!(one(b"\xff"), None);
        assert_eq!(xfcc_subject(std::iter::empty()), None);
    }

    #[test]
    fn the_nearest_proxys_element_wins() {
        // A client's own element first, then the one the trusted proxy appended.
        let v = br#"Subject="CN=forged";By=x,By=spiffe://a;Hash=abc;Subject="CN=real, Inc.""#;
        assert_eq!(one(v).as_deref(), Some("CN=real, Inc."));
        // The same across header lines: the last line's last element.
        let lines: [&[u8]; 2] = [br#"Subject="CN=forged""#, br#"Subject="CN=one",Subject="CN=real""#];
        assert_eq!(xfcc_subject(lines).as_deref(), Some("CN=real"));
        // A last element without a subject names nobody, whatever came before it.
        assert_eq!(one(br#"Subject="CN=forged",Hash=abc"#), None);
        assert_eq!(one(br#"Subject="CN=forged","#), None);
        // A quote the client left open would swallow the proxy's comma: nobody.
        assert_eq!(one(br#"Subject="CN=forged,By=x;Subject="CN=real""#), None);
        assert_eq!(one(br#"Subject="CN=forged,,By=x;Subject="CN=real""#), None);
    }
}
