use std::ops::Range;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Patch,
    Options,
    Other,
}

impl Method {
    pub const ALL: [Method; 8] = [
        Method::Get,
        Method::Head,
        Method::Post,
        Method::Put,
        Method::Delete,
        Method::Patch,
        Method::Options,
        Method::Other,
    ];

    fn parse(s: &str) -> Method {
        match s {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "DELETE" => Method::Delete,
            "PATCH" => Method::Patch,
            "OPTIONS" => Method::Options,
            _ => Method::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
            Method::Patch => "PATCH",
            Method::Options => "OPTIONS",
            Method::Other => "OTHER",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyFraming {
    None,
    Length(u64),
    Chunked,
}

/// A parsed request head. Names and values are ranges into `raw`, a copy of the head's bytes, so
/// that the connection's read buffer is free to move while the request is handled.
#[derive(Debug, Default)]
pub struct RequestHead {
    raw: Vec<u8>,
    path: Range<usize>,
    headers: Vec<(Range<usize>, Range<usize>)>,
    pub method: Option<Method>,
    pub framing: Option<BodyFraming>,
    /// The minor version: 1 for HTTP/1.1, 0 for HTTP/1.0.
    pub version: u8,
    pub keep_alive: bool,
    pub expect_continue: bool,
}

impl RequestHead {
    pub fn method(&self) -> Method {
        self.method.unwrap_or(Method::Other)
    }

    pub fn framing(&self) -> BodyFraming {
        self.framing.unwrap_or(BodyFraming::None)
    }

    /// The path without its query string.
    pub fn path(&self) -> &str {
        // httparse hands the request target out as `str`, so these bytes are UTF-8.
        std::str::from_utf8(&self.raw[self.path.clone()]).unwrap_or("")
    }

    /// The first value of header `name` (ASCII case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| self.raw[n.clone()].eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| &self.raw[v.clone()])
    }

    /// Every value of header `name` (ASCII case-insensitive), in order: for a header that must
    /// not be repeated.
    pub fn header_values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| self.raw[n.clone()].eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| &self.raw[v.clone()])
    }

    /// Every header, in order.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.headers
            .iter()
            .map(|(n, v)| (std::str::from_utf8(&self.raw[n.clone()]).unwrap_or(""), &self.raw[v.clone()]))
    }
}

/// The most header fields `--max-headers` may allow: a head is parsed into an array of this many
/// slots on the shard's stack. 256 is four times the default, and far more than any browser or
/// proxy sends; a larger array would cost stack on every parse for heads nobody sends.
pub const MAX_HEADERS_CAP: usize = 256;

pub enum HeadParse {
    /// A complete head of this many bytes was parsed into the given `RequestHead`.
    Complete(usize),
    /// More bytes are needed.
    Partial,
}

/// Why a head was refused. The codec's own error, so that it names nothing above it;
/// `error::ApiError` maps each to a status and a kind.
#[derive(Debug, PartialEq, Eq)]
pub enum HeadError {
    /// Not HTTP/1.x as RFC 9112 has it.
    Malformed(String),
    /// Longer than `--max-header-bytes`.
    TooLarge { limit: usize },
    /// More fields than `--max-headers`.
    TooManyHeaders { limit: usize },
    /// A transfer coding other than `chunked`.
    UnsupportedTransferEncoding(String),
    /// An `expect` other than `100-continue`.
    ExpectationFailed(String),
}

/// Parses one request head from the start of `buf` into `head` (reusing its allocations).
pub fn parse_head(
    buf: &[u8],
    head: &mut RequestHead,
    max_header_bytes: usize,
    max_headers: usize,
) -> Result<HeadParse, HeadError> {
    // Tolerate the empty lines some clients send between pipelined requests (RFC 9112 §2.2).
    let mut skip = 0;
    while buf[skip..].starts_with(b"\r\n") {
        skip += 2;
    }
    let buf = &buf[skip..];
    // Uninitialised slots: an initialised array of 256 headers would be an 8 KiB memset on every
    // parse, on the hot path.
    let mut storage = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS_CAP];
    // `--max-headers` is checked against the cap at start-up; the `min` only keeps a caller
    // that skipped that check (a fuzz target) in bounds.
    let slots = max_headers.min(storage.len());
    let mut req = httparse::Request::new(&mut []);
    let status = match req.parse_with_uninit_headers(buf, &mut storage[..slots]) {
        Ok(s) => s,
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyHeaders { limit: max_headers }),
        Err(e) => return Err(HeadError::Malformed(e.to_string())),
    };
    let len = match status {
        httparse::Status::Partial => {
            if buf.len() > max_header_bytes {
                return Err(HeadError::TooLarge { limit: max_header_bytes });
            }
            return Ok(HeadParse::Partial);
        }
        httparse::Status::Complete(len) => len,
    };
    if len > max_header_bytes {
        return Err(HeadError::TooLarge { limit: max_header_bytes });
    }
    let version = req.version.unwrap_or(1);
    let method = Method::parse(req.method.unwrap_or(""));
    let target = req.path.unwrap_or("");
    if !target.starts_with('/') {
        return Err(HeadError::Malformed("request target must be an absolute path".into()));
    }

    head.raw.clear();
    head.raw.extend_from_slice(&buf[..len]);
    head.headers.clear();
    let offset_of = |s: &[u8]| s.as_ptr() as usize - buf.as_ptr() as usize;
    let path_start = offset_of(target.as_bytes());
    let path_len = target.find('?').unwrap_or(target.len());
    head.path = path_start..path_start + path_len;

    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut keep_alive = version == 1;
    let mut expect_continue = false;
    let mut hosts = 0u32;
    for h in req.headers.iter() {
        let n = offset_of(h.name.as_bytes());
        let v = offset_of(h.value);
        head.headers.push((n..n + h.name.len(), v..v + h.value.len()));
        let value = trim(h.value);
        if h.name.eq_ignore_ascii_case("host") {
            hosts += 1;
        } else if h.name.eq_ignore_ascii_case("content-length") {
            let parsed = std::str::from_utf8(value)
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| HeadError::Malformed("invalid content-length".into()))?;
            if content_length.is_some_and(|c| c != parsed) {
                return Err(HeadError::Malformed("conflicting content-length headers".into()));
            }
            content_length = Some(parsed);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // HTTP/1.0 has no chunked coding: such a message's framing is faulty (RFC 9112 §6.1),
            // and on a kept-alive 1.0 connection a reader in front of us may frame it otherwise.
            if version == 0 {
                return Err(HeadError::Malformed("transfer-encoding in an HTTP/1.0 request".into()));
            }
            // Only `chunked` is supported, and it must be the final coding (RFC 9112 §6.1).
            let text = String::from_utf8_lossy(value).to_ascii_lowercase();
            let codings: Vec<&str> = text.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
            if codings != ["chunked"] || chunked {
                return Err(HeadError::UnsupportedTransferEncoding(text));
            }
            chunked = true;
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in value.split(|b| *b == b',') {
                let token = trim(token);
                if token.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive = true;
                }
            }
        } else if h.name.eq_ignore_ascii_case("expect") {
            if value.eq_ignore_ascii_case(b"100-continue") {
                expect_continue = version == 1;
            } else {
                return Err(HeadError::ExpectationFailed(String::from_utf8_lossy(value).into_owned()));
            }
        }
    }
    if chunked && content_length.is_some() {
        // Both framings at once is the request-smuggling shape: refuse it (RFC 9112 §6.3).
        return Err(HeadError::Malformed("both content-length and transfer-encoding".into()));
    }
    // RFC 9112 §3.2: a server must answer 400 to an HTTP/1.1 request without Host, and to any
    // with more than one. Two could name two different authorities, and a proxy that routes by
    // one while we log or check the other is the confusion the rule exists to prevent.
    if hosts > 1 {
        return Err(HeadError::Malformed("more than one Host header".into()));
    }
    if hosts == 0 && version == 1 {
        return Err(HeadError::Malformed("an HTTP/1.1 request must have a Host header".into()));
    }
    head.method = Some(method);
    head.framing = Some(if chunked {
        BodyFraming::Chunked
    } else {
        match content_length {
            Some(0) | None => BodyFraming::None,
            Some(n) => BodyFraming::Length(n),
        }
    });
    head.version = version;
    head.keep_alive = keep_alive;
    head.expect_continue = expect_continue;
    Ok(HeadParse::Complete(skip + len))
}

fn trim(mut v: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = v {
        if first.is_ascii_whitespace() {
            v = rest;
        } else {
            break;
        }
    }
    while let [rest @ .., last] = v {
        if last.is_ascii_whitespace() {
            v = rest;
        } else {
            break;
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Result<(RequestHead, usize), HeadError> {
        let mut head = RequestHead::default();
        match parse_head(raw.as_bytes(), &mut head, 8192, 32)? {
            HeadParse::Complete(n) => Ok((head, n)),
            HeadParse::Partial => panic!("partial"),
        }
    }

    #[test]
    fn parses_path_headers_and_framing() {
        let (h, n) = parse("POST /functions?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello").unwrap();
        assert_eq!(n, 60);
        assert_eq!(h.method(), Method::Post);
        assert_eq!(h.path(), "/functions");
        assert_eq!(h.header("host"), Some(&b"a"[..]));
        assert_eq!(h.framing(), BodyFraming::Length(5));
        assert!(h.keep_alive);
    }

    #[test]
    fn http10_defaults_to_close_and_skips_leading_crlf() {
        let (h, n) = parse("\r\nGET / HTTP/1.0\r\n\r\n").unwrap();
        assert_eq!(n, 20);
        assert!(!h.keep_alive);
    }

    #[test]
    fn refuses_smuggling_shapes() {
        assert!(parse("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n").is_err());
        assert!(parse("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n").is_err());
        assert!(parse("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\n").is_err());
        let e = parse("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n").unwrap_err();
        assert!(matches!(e, HeadError::UnsupportedTransferEncoding(_)), "{e:?}");
    }

    #[test]
    fn host_is_required_on_http11_and_never_repeated() {
        let e = parse("GET / HTTP/1.1\r\nX: 1\r\n\r\n").err().unwrap();
        assert!(matches!(e, HeadError::Malformed(_)), "{e:?}");
        assert!(format!("{e:?}").contains("Host"), "{e:?}");
        let e = parse("GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n").err().unwrap();
        assert!(format!("{e:?}").contains("more than one Host"), "{e:?}");
        let e = parse("GET / HTTP/1.0\r\nHost: a\r\nHOST: a\r\n\r\n").err().unwrap();
        assert!(matches!(e, HeadError::Malformed(_)), "{e:?}");
        // HTTP/1.0 predates Host: without one it is still served.
        let (h, _) = parse("GET / HTTP/1.0\r\n\r\n").unwrap();
        assert_eq!(h.version, 0);
        let (h, _) = parse("GET / HTTP/1.1\r\nhOsT: a\r\n\r\n").unwrap();
        assert_eq!(h.version, 1);
    }

    #[test]
    fn http10_keeps_alive_only_when_asked() {
        let (h, _) = parse("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").unwrap();
        assert!(h.keep_alive);
        assert_eq!(h.version, 0);
        let (h, _) = parse("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").unwrap();
        assert!(!h.keep_alive);
        let e = parse("POST / HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n").err().unwrap();
        assert!(matches!(e, HeadError::Malformed(_)), "{e:?}");
    }

    #[test]
    fn limits_head_size_and_count() {
        let mut head = RequestHead::default();
        let big = format!("GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n", "a".repeat(100));
        let e = parse_head(big.as_bytes(), &mut head, 64, 32).err().unwrap();
        assert_eq!(e, HeadError::TooLarge { limit: 64 });
        let many: String = (0..10).map(|i| format!("H{i}: v\r\n")).collect();
        let req = format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n");
        let e = parse_head(req.as_bytes(), &mut head, 8192, 4).err().unwrap();
        assert_eq!(e, HeadError::TooManyHeaders { limit: 4 });
    }
}
