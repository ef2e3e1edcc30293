//! Which headers may cross between a request, a guest and a response. The envelope ABI hands
//! request headers to guests and guest headers to responses and sinks; these rules keep framing,
//! credentials and connection management out of guests' hands.

/// The header that names the tenant a request acts for (`auth` checks it against the token's
/// scope).
pub const TENANT_HEADER: &str = "x-tensor-wasm-tenant";

/// Headers about one hop's connection (RFC 9110 §7.6.1), or about this message's framing.
fn is_hop_or_framing(name: &str) -> bool {
    const NAMES: [&str; 10] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "expect",
        "host",
    ];
    NAMES.iter().any(|n| n.eq_ignore_ascii_case(name)) || name.to_ascii_lowercase().starts_with("proxy-")
}

/// Whether a request header is passed to an envelope guest: not hop-by-hop or framing, not the
/// credentials, not the tenant (the guest runs for exactly one tenant anyway).
pub fn passes_to_guest(name: &str) -> bool {
    !is_hop_or_framing(name) && !name.eq_ignore_ascii_case("authorization") && !name.eq_ignore_ascii_case(TENANT_HEADER)
}

/// Whether a guest's header goes out on a response or a sink request. The server writes these
/// itself: framing, `date`, `content-type` (an envelope payload is JSON), `x-request-id`.
pub fn passes_from_guest(name: &str) -> bool {
    const OURS: [&str; 4] = ["date", "content-type", "x-request-id", "server"];
    !is_hop_or_framing(name) && !OURS.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// Whether a guest's header goes out on a sink request: what may go on a response, less the
/// caller's credentials and cookies and what proxies say about a request. A guest saw its
/// caller's headers (all but `authorization`) and may copy any of them into its output; a sink
/// must receive neither the caller's secrets nor an identity it might believe, such as a client
/// certificate (`x-forwarded-client-cert`) or an address (`forwarded`, `x-forwarded-*`), nor
/// the tenant header, which another TensorWasm behind the sink would act on.
pub fn passes_to_sink(name: &str) -> bool {
    const CREDENTIALS_AND_FORWARDING: [&str; 7] =
        ["authorization", "proxy-authorization", "cookie", "set-cookie", "forwarded", "x-real-ip", TENANT_HEADER];
    let forwarded = name.as_bytes().get(..12).is_some_and(|p| p.eq_ignore_ascii_case(b"x-forwarded-"));
    passes_from_guest(name) && !forwarded && !CREDENTIALS_AND_FORWARDING.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// A header name is an RFC 9110 token; a value holds no control characters but tab.
pub fn check(name: &str, value: &str) -> Result<(), String> {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || !name.bytes().all(token) {
        return Err(format!("header name {name:?} is not a valid token"));
    }
    if value.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(format!("header {name} has a control character in its value"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules() {
        assert!(passes_to_guest("X-Trace"));
        assert!(passes_to_guest("content-type"));
        for name in ["Authorization", "X-Tensor-Wasm-Tenant", "Connection", "Transfer-Encoding", "Proxy-Authorization"]
        {
            assert!(!passes_to_guest(name), "{name}");
        }
        assert!(passes_from_guest("X-WASM-Processed"));
        for name in ["Content-Length", "content-type", "X-Request-Id", "Date", "Keep-Alive"] {
            assert!(!passes_from_guest(name), "{name}");
        }
        assert!(check("X-WASM-Processed", "true").is_ok());
        assert!(passes_to_sink("X-WASM-Processed"));
        assert!(passes_to_sink("x-forwarded"), "not one of the x-forwarded-* family");
        for name in [
            "Connection",
            "Keep-Alive",
            "Proxy-Connection",
            "Proxy-Authorization",
            "Proxy-Anything",
            "TE",
            "Trailer",
            "Transfer-Encoding",
            "Upgrade",
            "Content-Length",
            "Host",
            "Authorization",
            "AUTHORIZATION",
            "Cookie",
            "Set-Cookie",
            "Forwarded",
            "X-Forwarded-For",
            "x-forwarded-host",
            "X-Forwarded-Proto",
            "X-Forwarded-Client-Cert",
            "X-Real-IP",
            "X-Tensor-Wasm-Tenant",
            "Date",
            "X-Request-Id",
        ] {
            assert!(!passes_to_sink(name), "{name}");
        }
        // A guest may still set cookies on its own caller's response.
        assert!(passes_from_guest("Set-Cookie"));
        assert!(check("bad name", "v").is_err());
        assert!(check("x", "a\r\nb").is_err());
    }
}
