//! A blocking HTTP/1.1 client, one request per connection, over plain TCP or TLS, for threads
//! that may block: the sink workers and the command-line client. Shards never use it.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::ChunkedDecoder;
use crate::tls::ClientTls;

/// Most bytes of a response head read.
const MAX_HEAD: usize = 16 * 1024;

/// An `http://` or `https://host[:port][/path]` URL, split.
#[derive(Debug, PartialEq, Eq, Clone)]
pub struct Target {
    /// `https://`.
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, String> {
        let (tls, rest) = match (url.strip_prefix("http://"), url.strip_prefix("https://")) {
            (Some(rest), _) => (false, rest),
            (_, Some(rest)) => (true, rest),
            _ => return Err("only http:// and https:// URLs are supported".into()),
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.contains('@') {
            return Err("user info in the URL is not supported".into());
        }
        let (host, port) = match authority.rsplit_once(':').filter(|(h, _)| !h.ends_with(']') || h.starts_with('[')) {
            Some((host, port)) if !host.is_empty() && !port.contains(']') => {
                (host, port.parse::<u16>().map_err(|_| format!("bad port {port:?}"))?)
            }
            _ => (authority, if tls { 443 } else { 80 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
            return Err(format!("bad host {host:?}"));
        }
        if path.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
            return Err("the path holds whitespace or control characters".into());
        }
        let path = if path.starts_with('?') { format!("/{path}") } else { path.to_string() };
        Ok(Target { tls, host: host.to_string(), port, path })
    }

    /// `host:port` as a `host` header carries it, an IPv6 address in brackets.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The same server, another path (which starts with `/`).
    pub fn with_path(&self, path: &str) -> Target {
        let base = self.path.trim_end_matches('/');
        Target { path: format!("{base}{path}"), ..self.clone() }
    }
}

/// A response.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// A request: `content-type: application/json` and a content length are added when there is a
/// body; the connection closes after the answer.
pub fn encode_request(method: &str, target: &Target, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut head =
        format!("{method} {} HTTP/1.1\r\nhost: {}\r\nconnection: close\r\n", target.path, target.authority());
    if !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH") {
        head.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut request = head.into_bytes();
    request.extend_from_slice(body);
    request
}

/// A blocking client connection, plain or TLS; the socket is kept at hand for its timeouts. Also
/// the benchmark harness's set-up connection.
pub enum ClientStream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl ClientStream {
    pub fn socket(&self) -> &TcpStream {
        match self {
            ClientStream::Plain(s) => s,
            ClientStream::Tls(s) => &s.sock,
        }
    }
}

impl Read for ClientStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            ClientStream::Plain(s) => s.read(buf),
            ClientStream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for ClientStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            ClientStream::Plain(s) => s.write(buf),
            ClientStream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            ClientStream::Plain(s) => s.flush(),
            ClientStream::Tls(s) => s.flush(),
        }
    }
}

/// How one exchange is bounded and secured.
#[derive(Clone, Copy)]
pub struct Exchange<'a> {
    /// For the whole exchange: connect, TLS handshake, send and read.
    pub timeout: Duration,
    /// Most bytes of body read, a longer one being an error; `None` reads the head only.
    pub max_body: Option<usize>,
    /// For an https:// target; `None` checks the server against the system's trust store.
    pub tls: Option<&'a ClientTls>,
    /// The addresses that may be connected to; `None`: any. Checked for each address before its
    /// connect, and for the peer after it.
    pub allow: Option<&'a dyn Fn(IpAddr) -> bool>,
}

/// Sends `request` to `target` and reads the answer, as `how` bounds it.
pub fn exchange(target: &Target, request: &[u8], how: Exchange<'_>) -> Result<Answer, String> {
    exchange_at(&resolve(target)?, target, request, how)
}

/// The addresses `target`'s host names (the host itself, where it is an address).
pub fn resolve(target: &Target) -> Result<Vec<SocketAddr>, String> {
    let addrs =
        (target.host.as_str(), target.port).to_socket_addrs().map_err(|e| format!("resolving {}: {e}", target.host))?;
    Ok(addrs.collect())
}

/// [`exchange`] with `target` reached at `addrs`, tried in turn: for a caller that has checked
/// the addresses it resolved, so that a second lookup cannot answer differently.
pub fn exchange_at(addrs: &[SocketAddr], target: &Target, request: &[u8], how: Exchange<'_>) -> Result<Answer, String> {
    let Exchange { timeout, max_body, tls, allow } = how;
    let deadline = Instant::now() + timeout;
    let left = || deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    let allowed = |ip: IpAddr| allow.is_none_or(|allow| allow(ip));
    let mut stream = None;
    let mut error = format!("{} has no address", target.host);
    for addr in addrs {
        if !allowed(addr.ip()) {
            error = format!("{addr} is not an address this client may connect to");
            continue;
        }
        match TcpStream::connect_timeout(addr, left()) {
            Ok(s) if s.peer_addr().is_ok_and(|peer| allowed(peer.ip())) => {
                stream = Some(s);
                break;
            }
            Ok(_) => error = format!("connected to {addr}, but its peer address is not one this client may reach"),
            Err(e) => error = format!("connecting to {addr}: {e}"),
        }
    }
    let stream = stream.ok_or(error)?;
    let mut stream = if target.tls {
        let system;
        let tls = match tls {
            Some(tls) => tls,
            None => {
                system = ClientTls::system()?;
                &system
            }
        };
        let session = tls.session(&target.host)?;
        ClientStream::Tls(Box::new(rustls::StreamOwned::new(session, stream)))
    } else {
        ClientStream::Plain(stream)
    };
    // The TLS handshake runs inside the first write and read, under the same timeouts.
    stream.socket().set_write_timeout(Some(left())).map_err(|e| e.to_string())?;
    stream.socket().set_read_timeout(Some(left())).map_err(|e| e.to_string())?;
    stream.write_all(request).and_then(|()| stream.flush()).map_err(|e| format!("sending: {e}"))?;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 16 * 1024];
    let mut read = |stream: &mut ClientStream, buf: &mut Vec<u8>| -> Result<usize, String> {
        stream.socket().set_read_timeout(Some(left())).map_err(|e| e.to_string())?;
        let n = stream.read(&mut chunk).map_err(|e| format!("reading the answer: {e}"))?;
        buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    };
    let (status, headers, head_len) = loop {
        if read(&mut stream, &mut buf)? == 0 {
            return Err("the connection closed before an answer".into());
        }
        let mut parsed = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut parsed);
        match response.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let headers = response
                    .headers
                    .iter()
                    .map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).into_owned()))
                    .collect::<Vec<_>>();
                break (response.code.unwrap_or(0), headers, len);
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
            Ok(httparse::Status::Partial) => return Err("the response head is too large".into()),
            Err(e) => return Err(format!("the answer is not HTTP: {e}")),
        }
    };
    let mut answer = Answer { status, headers, body: Vec::new() };
    let Some(max_body) = max_body else { return Ok(answer) };
    let mut rest = buf.split_off(head_len);
    let too_large = || format!("the answer's body is larger than {max_body} bytes");
    if answer.header("transfer-encoding").is_some_and(|te| te.eq_ignore_ascii_case("chunked")) {
        let mut decoder = ChunkedDecoder::new(max_body as u64);
        loop {
            let used = decoder.decode(&rest, &mut answer.body).map_err(|e| e.to_string())?;
            rest.drain(..used);
            if decoder.is_done() {
                return Ok(answer);
            }
            if read(&mut stream, &mut rest)? == 0 {
                return Err("the connection closed inside a chunked body".into());
            }
        }
    }
    let length = answer.header("content-length").and_then(|v| v.trim().parse::<usize>().ok());
    if length.is_some_and(|n| n > max_body) {
        return Err(too_large());
    }
    while length.is_none_or(|n| rest.len() < n) {
        if rest.len() > max_body {
            return Err(too_large());
        }
        if read(&mut stream, &mut rest)? == 0 {
            if length.is_some() {
                return Err("the connection closed inside the body".into());
            }
            break;
        }
    }
    rest.truncate(length.unwrap_or(rest.len()));
    answer.body = rest;
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let t = |host: &str, port, path: &str| Target { tls: false, host: host.into(), port, path: path.into() };
        assert_eq!(Target::parse("http://user-service:8082").unwrap(), t("user-service", 8082, "/"));
        assert_eq!(Target::parse("http://127.0.0.1:9/events?x=1").unwrap(), t("127.0.0.1", 9, "/events?x=1"));
        assert_eq!(Target::parse("http://[::1]:81/a").unwrap(), t("::1", 81, "/a"));
        assert_eq!(Target::parse("http://[::1]:81/a").unwrap().authority(), "[::1]:81");
        assert_eq!(Target::parse("http://example").unwrap().authority(), "example:80");
        assert_eq!(Target::parse("http://example").unwrap(), t("example", 80, "/"));
        assert_eq!(Target::parse("http://h:1/api/").unwrap().with_path("/metrics").path, "/api/metrics");
        let https = Target::parse("https://example/a").unwrap();
        assert_eq!((https.tls, https.port, https.path.as_str()), (true, 443, "/a"));
        for bad in ["ftp://x", "http://", "http://a:b", "http://u@h/", "http://h/a b"] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn never_connects_to_an_address_it_may_not_reach() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let target = Target::parse(&format!("http://{addr}/")).unwrap();
        let refuse = |_: IpAddr| false;
        let how = Exchange { timeout: Duration::from_secs(5), max_body: None, tls: None, allow: Some(&refuse) };
        let e = exchange_at(&[addr], &target, &encode_request("GET", &target, &[], b""), how).unwrap_err();
        assert!(e.contains("not an address this client may connect to"), "{e}");
        assert_eq!(listener.accept().map(|_| ()).unwrap_err().kind(), std::io::ErrorKind::WouldBlock);
    }

    #[test]
    fn reads_length_chunked_and_close_framed_bodies() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let target = Target::parse(&format!("http://{}/", listener.local_addr().unwrap())).unwrap();
        let answers: [&[u8]; 3] = [
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
            b"HTTP/1.1 201 Created\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
            b"HTTP/1.1 503 Busy\r\nretry-after: 2\r\n\r\nuntil close",
        ];
        let server = std::thread::spawn(move || {
            for answer in answers {
                let (mut s, _) = listener.accept().unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).unwrap();
                s.write_all(answer).unwrap();
            }
        });
        let get = || {
            let how = Exchange { timeout: Duration::from_secs(5), max_body: Some(1024), tls: None, allow: None };
            exchange(&target, &encode_request("GET", &target, &[], b""), how).unwrap()
        };
        let a = get();
        assert_eq!((a.status, a.body.as_slice()), (200, &b"hello"[..]));
        let a = get();
        assert_eq!((a.status, a.body.as_slice()), (201, &b"abcde"[..]));
        let a = get();
        assert_eq!((a.status, a.body.as_slice(), a.header("Retry-After")), (503, &b"until close"[..], Some("2")));
        server.join().unwrap();
    }
}
