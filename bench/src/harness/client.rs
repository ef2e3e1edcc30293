//! The harness's HTTP/1.1 client side: a blocking keep-alive connection for set-up requests
//! (deploys, scrapes, readiness), TLS toward an https:// server, the response framing that the
//! load generator's event loops use too, and request encoding.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use tensor_wasm::client::{ClientStream, ClientTls};

/// The largest response head the client accepts.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// The largest response body the client accepts; the scenarios' answers are a few KiB.
const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// One answered request: its status and body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(&self) -> io::Result<serde_json::Value> {
        serde_json::from_slice(&self.body).map_err(|e| invalid(format!("the response is not JSON: {e}")))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// TLS toward an https:// server: what to trust and present, and the name its certificate must
/// carry.
#[derive(Clone, Debug)]
pub struct Tls {
    client: ClientTls,
    host: String,
}

impl Tls {
    /// Fails where `host` cannot name a certificate.
    pub fn new(client: &ClientTls, host: &str) -> Result<Tls, String> {
        client.session(host)?;
        Ok(Tls { client: client.clone(), host: host.to_string() })
    }

    /// Runs a handshake over the blocking `stream`, so that no measured request pays for it.
    fn handshake(&self, stream: &mut TcpStream) -> io::Result<rustls::ClientConnection> {
        let mut session = self.client.session(&self.host).map_err(io::Error::other)?;
        while session.is_handshaking() {
            session.complete_io(stream)?;
        }
        Ok(session)
    }
}

/// A blocking socket to `addr` without Nagle's delay, each read and write bounded by `timeout`, and
/// past its TLS handshake where `tls` is given: what the set-up connection and every connection of
/// the load generator start from.
pub fn open(
    addr: SocketAddr,
    tls: Option<&Tls>,
    timeout: Duration,
) -> io::Result<(TcpStream, Option<rustls::ClientConnection>)> {
    let mut socket = TcpStream::connect_timeout(&addr, timeout)?;
    socket.set_nodelay(true)?;
    socket.set_read_timeout(Some(timeout))?;
    socket.set_write_timeout(Some(timeout))?;
    let session = tls.map(|tls| tls.handshake(&mut socket)).transpose()?;
    Ok((socket, session))
}

/// A keep-alive connection. After any I/O error it must be replaced, as the stream's framing is
/// then unknown.
pub struct Connection {
    stream: ClientStream,
    buf: Vec<u8>,
    /// Bytes of `buf` already received but not yet consumed.
    filled: usize,
}

impl Connection {
    /// Connects to `addr`, with TLS where `tls` is given.
    pub fn connect(addr: SocketAddr, tls: Option<&Tls>, timeout: Duration) -> io::Result<Connection> {
        let stream = match open(addr, tls, timeout)? {
            (socket, None) => ClientStream::Plain(socket),
            (socket, Some(session)) => ClientStream::Tls(Box::new(rustls::StreamOwned::new(session, socket))),
        };
        Ok(Connection { stream, buf: vec![0; 16 * 1024], filled: 0 })
    }

    /// Sends one complete, pre-encoded request.
    pub fn send(&mut self, request: &[u8]) -> io::Result<()> {
        self.stream.write_all(request)?;
        self.stream.flush()
    }

    /// Reads one response. With `keep_body` false the body is read and discarded.
    pub fn receive(&mut self, keep_body: bool) -> io::Result<Response> {
        loop {
            if let Some(framed) = frame(&self.buf[..self.filled])? {
                let body = if keep_body { framed.body(&self.buf) } else { Vec::new() };
                self.consume(framed.len);
                return Ok(Response { status: framed.status, body });
            }
            self.fill()?;
        }
    }

    /// Sends a request and reads its answer, keeping the body.
    pub fn round_trip(&mut self, request: &[u8]) -> io::Result<Response> {
        self.send(request)?;
        self.receive(true)
    }

    fn fill(&mut self) -> io::Result<()> {
        if self.filled == self.buf.len() {
            self.buf.resize(self.buf.len() * 2, 0);
        }
        let n = self.stream.read(&mut self.buf[self.filled..])?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the server closed the connection"));
        }
        self.filled += n;
        Ok(())
    }

    fn consume(&mut self, n: usize) {
        self.buf.copy_within(n..self.filled, 0);
        self.filled -= n;
    }
}

/// One whole response at the start of a buffer: where it ends, and where its body lies.
#[derive(Debug)]
pub struct Framed {
    pub status: u16,
    /// The server announced `connection: close`.
    pub close: bool,
    /// The bytes of the whole response, head and body.
    pub len: usize,
    /// The body's pieces in the buffer: one range, or one per chunk.
    body: Vec<std::ops::Range<usize>>,
}

impl Framed {
    pub fn body(&self, buf: &[u8]) -> Vec<u8> {
        self.body.iter().flat_map(|r| buf[r.clone()].iter().copied()).collect()
    }
}

/// Finds a complete response at the start of `buf`: `None` until all of it has arrived. The one
/// framing parser of the harness, for its blocking and its event-loop connections alike.
pub fn frame(buf: &[u8]) -> io::Result<Option<Framed>> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut parsed = httparse::Response::new(&mut headers);
    let head_len = match parsed.parse(buf).map_err(|e| invalid(format!("bad response head: {e}")))? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial if buf.len() >= MAX_HEAD_BYTES => {
            return Err(invalid("the response head is too large"))
        }
        httparse::Status::Partial => return Ok(None),
    };
    let (mut length, mut chunked, mut close) = (0usize, false, false);
    for h in parsed.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let text = std::str::from_utf8(h.value).map_err(|_| invalid("bad content-length"))?;
            length = text.trim().parse::<usize>().map_err(|_| invalid("bad content-length"))?;
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = h.value.eq_ignore_ascii_case(b"chunked");
        } else if h.name.eq_ignore_ascii_case("connection") {
            close = h.value.eq_ignore_ascii_case(b"close");
        }
    }
    let status = parsed.code.unwrap_or(0);
    if !chunked {
        if length > MAX_BODY_BYTES {
            return Err(invalid(format!("a body of {length} bytes is over the client's limit")));
        }
        let len = head_len + length;
        return Ok((buf.len() >= len).then(|| Framed {
            status,
            close,
            len,
            body: std::iter::once(head_len..len).collect(),
        }));
    }
    let line = |at: usize| -> Option<(usize, &[u8])> {
        let end = buf.get(at..)?.windows(2).position(|w| w == b"\r\n")?;
        Some((at + end + 2, &buf[at..at + end]))
    };
    let (mut at, mut body, mut total) = (head_len, Vec::new(), 0usize);
    loop {
        let Some((next, size_line)) = line(at) else { return Ok(None) };
        let size_text = std::str::from_utf8(size_line).unwrap_or("").split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| invalid("bad chunk size"))?;
        total += size;
        if total > MAX_BODY_BYTES {
            return Err(invalid("a chunked body is over the client's limit"));
        }
        if size == 0 {
            // Trailers, up to the empty line.
            let mut at = next;
            loop {
                let Some((after, trailer)) = line(at) else { return Ok(None) };
                at = after;
                if trailer.is_empty() {
                    return Ok(Some(Framed { status, close, len: at, body }));
                }
            }
        }
        if buf.len() < next + size + 2 {
            return Ok(None);
        }
        if &buf[next + size..next + size + 2] != b"\r\n" {
            return Err(invalid("a chunk is not followed by CRLF"));
        }
        body.push(next..next + size);
        at = next + size + 2;
    }
}

/// Encodes a request once, so the load loop only writes bytes.
pub fn encode(method: &str, path: &str, host: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nhost: {host}\r\n");
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() || method == "POST" || method == "PUT" {
        out.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}
