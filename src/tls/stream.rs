//! A server-side TLS connection over a monoio `TcpStream`.
//!
//! rustls does the protocol; this moves its records over monoio's owned-buffer reads and writes.
//! It exists (rather than monoio-rustls) because the request needs the verified client
//! certificate, which that crate does not expose after the handshake.

use std::io::{self, Read, Write};
use std::sync::Arc;

use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use rustls::{ServerConfig, ServerConnection};

/// Raw TLS bytes read from the socket per read.
const RECORD_READ: usize = 16 * 1024 + 512;

pub struct TlsStream {
    io: TcpStream,
    conn: ServerConnection,
    incoming: Vec<u8>,
    outgoing: Vec<u8>,
}

impl TlsStream {
    /// Runs the server handshake. With a client CA configured, a missing or untrusted client
    /// certificate fails it (after the alert is sent).
    pub async fn accept(io: TcpStream, config: Arc<ServerConfig>) -> io::Result<TlsStream> {
        let conn = ServerConnection::new(config).map_err(io::Error::other)?;
        let mut tls =
            TlsStream { io, conn, incoming: Vec::with_capacity(RECORD_READ), outgoing: Vec::with_capacity(4096) };
        loop {
            if tls.conn.wants_write() {
                tls.flush_tls().await?;
            }
            if !tls.conn.is_handshaking() {
                return Ok(tls);
            }
            if tls.read_tls().await? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "peer closed during the TLS handshake"));
            }
        }
    }

    /// The subject of the verified client certificate, as x509-parser renders it (`CN=…, O=…`).
    pub fn client_cert_subject(&self) -> Option<String> {
        let der = self.conn.peer_certificates()?.first()?;
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
        Some(cert.subject().to_string())
    }

    /// Reads raw TLS bytes from the socket into rustls. Returns how many were read (0 at EOF).
    async fn read_tls(&mut self) -> io::Result<usize> {
        let mut buf = std::mem::take(&mut self.incoming);
        buf.clear();
        // A cancelled read (a deadline) takes its buffer with it: make sure there is room again.
        buf.reserve(RECORD_READ);
        let (res, slice) = self.io.read(buf.slice_mut(0..RECORD_READ)).await;
        self.incoming = slice.into_inner();
        let n = res?;
        let mut pending = &self.incoming[..n];
        while !pending.is_empty() {
            self.conn.read_tls(&mut pending)?;
            if let Err(e) = self.conn.process_new_packets() {
                // Tell the peer why (a bad certificate, say) before giving up.
                let _ = self.flush_tls().await;
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
        }
        Ok(n)
    }

    /// Writes every TLS record rustls has ready.
    async fn flush_tls(&mut self) -> io::Result<()> {
        while self.conn.wants_write() {
            let mut out = std::mem::take(&mut self.outgoing);
            out.clear();
            self.conn.write_tls(&mut out)?;
            let (res, out) = self.io.write_all(out).await;
            self.outgoing = out;
            res?;
        }
        Ok(())
    }

    /// Appends decrypted bytes to `buf` (at least one, or 0 at the end of the stream).
    pub async fn read_into(&mut self, mut buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        loop {
            let start = buf.len();
            // Zero-filled before each read: capped near a few records, or a large body's reserved
            // capacity would be zeroed again on every 16 KiB record (quadratic in the body).
            let room = (buf.capacity() - start).clamp(4096, 4 * RECORD_READ);
            buf.resize(start + room, 0);
            let read = self.conn.reader().read(&mut buf[start..]);
            match read {
                Ok(n) => {
                    buf.truncate(start + n);
                    return (Ok(n), buf);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => buf.truncate(start),
                Err(e) => {
                    buf.truncate(start);
                    return (Err(e), buf);
                }
            }
            match self.read_tls().await {
                Ok(0) => return (Ok(0), buf),
                Ok(_) => {}
                Err(e) => return (Err(e), buf),
            }
            if self.conn.wants_write() {
                if let Err(e) = self.flush_tls().await {
                    return (Err(e), buf);
                }
            }
        }
    }

    /// Encrypts and writes all of `buf`.
    pub async fn write_all(&mut self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        let mut written = 0;
        while written < buf.len() {
            match self.conn.writer().write(&buf[written..]) {
                Ok(n) => written += n,
                Err(e) => return (Err(e), buf),
            }
            if let Err(e) = self.flush_tls().await {
                return (Err(e), buf);
            }
        }
        (Ok(()), buf)
    }
}
