//! A blocking HTTP/1.1 keep-alive connection: the load generator's only client.
//!
//! Blocking sockets on their own threads keep the timing honest: the send time is taken right
//! before `write`, and the completion time right after the last byte of the body is read, with no
//! event loop in between to add its own queueing.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

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

/// A keep-alive connection. After any I/O error it must be replaced, as the stream's framing is
/// then unknown.
pub struct Connection {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Bytes of `buf` already received but not yet consumed.
    filled: usize,
    /// The server announced `connection: close`.
    pub closed: bool,
}

impl Connection {
    pub fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<Connection> {
        let stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(Connection { stream, buf: vec![0; 16 * 1024], filled: 0, closed: false })
    }

    /// Sends one complete, pre-encoded request.
    pub fn send(&mut self, request: &[u8]) -> io::Result<()> {
        self.stream.write_all(request)
    }

    /// Reads one response. With `keep_body` false the body is read and discarded.
    pub fn receive(&mut self, keep_body: bool) -> io::Result<Response> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut parsed = httparse::Response::new(&mut headers);
            match parsed.parse(&self.buf[..self.filled]).map_err(|e| invalid(format!("bad response head: {e}")))? {
                httparse::Status::Complete(head_len) => {
                    let status = parsed.code.unwrap_or(0);
                    let mut length = None;
                    let mut chunked = false;
                    for h in parsed.headers.iter() {
                        if h.name.eq_ignore_ascii_case("content-length") {
                            let text = std::str::from_utf8(h.value).map_err(|_| invalid("bad content-length"))?;
                            length = Some(text.trim().parse::<usize>().map_err(|_| invalid("bad content-length"))?);
                        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                            chunked = h.value.eq_ignore_ascii_case(b"chunked");
                        } else if h.name.eq_ignore_ascii_case("connection") {
                            self.closed |= h.value.eq_ignore_ascii_case(b"close");
                        }
                    }
                    self.consume(head_len);
                    let body = if chunked {
                        self.read_chunked(keep_body)?
                    } else {
                        let length = length.unwrap_or(0);
                        if length > MAX_BODY_BYTES {
                            return Err(invalid(format!("a body of {length} bytes is over the client's limit")));
                        }
                        self.read_exact_body(length, keep_body)?
                    };
                    return Ok(Response { status, body });
                }
                httparse::Status::Partial => {
                    if self.filled >= MAX_HEAD_BYTES {
                        return Err(invalid("the response head is too large"));
                    }
                    self.fill()?;
                }
            }
        }
    }

    /// Sends a request and reads its answer, keeping the body.
    pub fn round_trip(&mut self, request: &[u8]) -> io::Result<Response> {
        self.send(request)?;
        self.receive(true)
    }

    fn read_exact_body(&mut self, mut length: usize, keep: bool) -> io::Result<Vec<u8>> {
        let mut body = Vec::with_capacity(if keep { length } else { 0 });
        while length > 0 {
            if self.filled == 0 {
                self.fill()?;
            }
            let take = length.min(self.filled);
            if keep {
                body.extend_from_slice(&self.buf[..take]);
            }
            self.consume(take);
            length -= take;
        }
        Ok(body)
    }

    fn read_chunked(&mut self, keep: bool) -> io::Result<Vec<u8>> {
        let mut body = Vec::new();
        let mut total = 0usize;
        loop {
            let line = self.read_line()?;
            let size_text = line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_text, 16).map_err(|_| invalid("bad chunk size"))?;
            total += size;
            if total > MAX_BODY_BYTES {
                return Err(invalid("a chunked body is over the client's limit"));
            }
            if size == 0 {
                // Trailers, up to the empty line.
                while !self.read_line()?.is_empty() {}
                return Ok(body);
            }
            body.extend(self.read_exact_body(size, keep)?);
            if !self.read_line()?.is_empty() {
                return Err(invalid("a chunk is not followed by CRLF"));
            }
        }
    }

    fn read_line(&mut self) -> io::Result<String> {
        loop {
            if let Some(end) = self.buf[..self.filled].windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                self.consume(end + 2);
                return Ok(line);
            }
            if self.filled >= MAX_HEAD_BYTES {
                return Err(invalid("a chunk-size line is too long"));
            }
            self.fill()?;
        }
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
