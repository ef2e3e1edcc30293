//! One HTTP/1.1 connection: read a head, read its body, answer, repeat. Pipelined requests are
//! answered in order and their responses written together. Every read has a deadline: the idle
//! keep-alive timeout between requests, the header timeout once a head has begun, the body timeout
//! for its body; every write has the write timeout. A client can therefore never hold a shard.

use std::future::Future;
use std::io;
use std::rc::Rc;
use std::time::{Duration, Instant};

use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

use crate::api::PendingAudit;
use crate::config::Limits;
use crate::error::ApiError;
use crate::http::{
    parse_head, BodyFraming, ChunkedDecoder, ChunkedError, HeadParse, Method, Peer, Persistence, RequestHead, Response,
    ResponseWriter,
};
use crate::route::Route;
use crate::runtime::event::{race, Either, LocalEvent};
use crate::shard::{BodyReservation, ConnectionGuard, Shard};
use crate::tls::TlsStream;

/// What carries a connection's bytes: plain TCP, or TLS over it. Reads append to the buffer's
/// spare capacity; both hand their owned buffer back, as monoio's I/O does.
pub trait Transport {
    fn read_into(&mut self, buf: Vec<u8>) -> impl Future<Output = (io::Result<usize>, Vec<u8>)>;
    fn write_all_from(&mut self, buf: Vec<u8>) -> impl Future<Output = (io::Result<()>, Vec<u8>)>;
}

impl Transport for TcpStream {
    async fn read_into(&mut self, buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        let (len, cap) = (buf.len(), buf.capacity());
        let (res, slice) = self.read(buf.slice_mut(len..cap)).await;
        (res, slice.into_inner())
    }

    async fn write_all_from(&mut self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        let (res, buf) = self.write_all(buf).await;
        (res.map(|_| ()), buf)
    }
}

impl Transport for TlsStream {
    async fn read_into(&mut self, buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        TlsStream::read_into(self, buf).await
    }

    async fn write_all_from(&mut self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        TlsStream::write_all(self, buf).await
    }
}

/// Bytes asked of the kernel per read when the buffer has little room left.
const READ_CHUNK: usize = 16 * 1024;
/// Pending pipelined responses are written once they reach this size.
const FLUSH_AT: usize = 64 * 1024;

enum Read {
    Data,
    Eof,
    TimedOut,
    Drained,
    Failed,
}

/// Reads more bytes onto the end of `buf`. On a timeout or drain the read is cancelled and `buf`'s
/// contents are gone: callers only continue after `Read::Data`.
async fn read_more<T: Transport>(
    stream: &mut T,
    buf: &mut Vec<u8>,
    timeout: Duration,
    drain: Option<&LocalEvent>,
) -> Read {
    let mut owned = std::mem::take(buf);
    if owned.capacity() - owned.len() < READ_CHUNK / 4 {
        owned.reserve(READ_CHUNK);
    }
    let read = monoio::time::timeout(timeout, stream.read_into(owned));
    let result = match drain {
        Some(event) => match race(read, event.wait()).await {
            Either::Left(r) => r,
            Either::Right(()) => return Read::Drained,
        },
        None => read.await,
    };
    match result {
        Err(_elapsed) => Read::TimedOut,
        Ok((res, owned)) => {
            *buf = owned;
            match res {
                Ok(0) => Read::Eof,
                Ok(_) => Read::Data,
                Err(_) => Read::Failed,
            }
        }
    }
}

/// Writes and clears `out`. False when the peer is gone or too slow.
async fn flush<T: Transport>(stream: &mut T, out: &mut Vec<u8>, timeout: Duration) -> bool {
    if out.is_empty() {
        return true;
    }
    let owned = std::mem::take(out);
    match monoio::time::timeout(timeout, stream.write_all_from(owned)).await {
        Ok((Ok(()), mut owned)) => {
            owned.clear();
            *out = owned;
            true
        }
        _ => false,
    }
}

/// Answers a connection refused at the connection limit, then closes it.
pub async fn refuse(mut stream: TcpStream, err: ApiError) {
    let mut out = Vec::new();
    ResponseWriter::default().write(&mut out, &err.response(), Persistence::Close, false);
    let _ = flush(&mut stream, &mut out, Duration::from_secs(1)).await;
}

/// One connection's state between its requests: the transport, the bytes read and not yet
/// consumed, the answers not yet written, and the head being parsed (its storage reused).
struct Connection<T> {
    shard: Rc<Shard>,
    stream: T,
    peer: Peer,
    buf: Vec<u8>,
    out: Vec<u8>,
    head: RequestHead,
    writer: ResponseWriter,
}

/// Serves the connection's requests in order until it is to close. `guard` counts it against the
/// shard's connections until then.
pub async fn serve<T: Transport>(guard: ConnectionGuard, stream: T, peer: Peer) {
    let mut conn = Connection {
        shard: guard.shard.clone(),
        stream,
        peer,
        buf: Vec::with_capacity(READ_CHUNK),
        out: Vec::with_capacity(4096),
        head: RequestHead::default(),
        writer: ResponseWriter::default(),
    };
    while conn.serve_request().await {}
}

impl<T: Transport> Connection<T> {
    /// Reads, admits and answers one request. False once the connection is to close.
    async fn serve_request(&mut self) -> bool {
        // 1. A complete request head.
        let Some(parsed) = self.read_head().await else { return false };
        let started = Instant::now();
        self.shard.idle_spin.note_request();
        let consumed = match parsed {
            Ok(n) => n,
            Err(e) => {
                let failure = Failure { head: None, audit: None, err: e, started };
                answer_protocol_error(&self.shard, &mut self.stream, &mut self.out, &mut self.buf, &self.peer, failure)
                    .await;
                return false;
            }
        };
        self.buf.drain(..consumed);
        // 2. and 3.: admission on the head, then the body and the answer.
        let mut audit = None;
        let Some((route, response, body_consumed)) = self.admit_then_respond(&mut audit, started).await else {
            return false;
        };
        self.write_answer(route, response, audit, body_consumed, started).await
    }

    /// Reads until the buffer holds a whole request head, and parses it: the bytes it took, or the
    /// error to answer. While it waits, the answers already queued are written and the stores
    /// their guests spent dropped. None when the connection is to close unanswered: idle past the
    /// keep-alive timeout, idle when the shard drains, closed or failed.
    async fn read_head(&mut self) -> Option<Result<usize, ApiError>> {
        let limits: &Limits = &self.shard.limits;
        let mut head_deadline: Option<Instant> = None;
        loop {
            if !self.buf.is_empty() {
                match parse_head(&self.buf, &mut self.head, limits.max_header_bytes, limits.max_headers) {
                    Ok(HeadParse::Complete(n)) => return Some(Ok(n)),
                    Ok(HeadParse::Partial) => {}
                    Err(e) => return Some(Err(e.into())),
                }
            }
            if !flush(&mut self.stream, &mut self.out, limits.write_timeout()).await {
                return None;
            }
            // The answers are out: now the memory their guests dirtied is reset.
            self.shard.drop_spent();
            let idle = self.buf.is_empty();
            let (timeout, drain) = if idle {
                if self.shard.drain.is_fired() {
                    return None;
                }
                (limits.idle_timeout(), Some(&self.shard.drain))
            } else {
                let deadline = *head_deadline.get_or_insert_with(|| Instant::now() + limits.header_timeout());
                (deadline.saturating_duration_since(Instant::now()), None)
            };
            match read_more(&mut self.stream, &mut self.buf, timeout, drain).await {
                Read::Data => {}
                Read::TimedOut if !idle => return Some(Err(ApiError::RequestTimeout)),
                Read::Eof | Read::TimedOut | Read::Drained | Read::Failed => return None,
            }
        }
    }

    /// Decides on the parsed head alone whether the request is served, so that a refused request
    /// costs no body; an admitted one has its body read and the API answers it. The route, the
    /// answer, and whether the request's body is consumed (a refused one's may still be
    /// arriving); None when the connection is to close at once, answered or not.
    async fn admit_then_respond(
        &mut self,
        audit: &mut Option<PendingAudit>,
        started: Instant,
    ) -> Option<(Route, Response, bool)> {
        let Connection { shard, stream, peer, buf, out, head, .. } = self;
        let (route, admitted) = crate::api::admit(shard, peer, head, audit);
        let admitted = admitted.and_then(|a| {
            let declared = declared_body(head, a.body_limit)?;
            Ok((shard.reserve_body(a.tenant(), declared)?, a))
        });
        let (reservation, admitted) = match admitted {
            Err(e) => return Some((route, e.response(), skip_buffered_body(head, buf))),
            Ok(admitted) => admitted,
        };
        match read_body(stream, buf, out, head, admitted.body_limit, &reservation, &shard.limits).await {
            Ok(body) => Some((route, crate::api::respond(shard, admitted, head, body, audit).await, true)),
            Err(BodyError::Connection) => {
                if let Some(pending) = audit.take() {
                    shard.audit.forget(pending.ticket);
                }
                None
            }
            Err(BodyError::Http(e)) => {
                drop(reservation);
                let failure = Failure { head: Some(head), audit: audit.take(), err: e, started };
                answer_protocol_error(shard, stream, out, buf, peer, failure).await;
                None
            }
        }
    }

    /// Writes the request's audit record, then queues its answer and counts it. Flushes when the
    /// connection closes after it, or when enough answers are queued. False once the connection
    /// is to close.
    async fn write_answer(
        &mut self,
        route: Route,
        mut response: Response,
        audit: Option<PendingAudit>,
        body_consumed: bool,
        started: Instant,
    ) -> bool {
        if let Some(pending) = audit {
            // Written before the response leaves: an answered request always has its record.
            write_audit(&self.shard, pending, &mut response, started, &self.peer);
        }
        // Once the process drains, every response closes its connection so clients move elsewhere.
        // A refused request whose body has not arrived closes too, once the client stops sending.
        let keep_alive = self.head.keep_alive && body_consumed && !self.shard.shared.is_draining();
        let (persistence, method) = (Persistence::new(keep_alive, self.head.version), self.head.method());
        self.writer.write(&mut self.out, &response, persistence, method == Method::Head);
        self.shard.metrics.record_request(route, method, response.status, started.elapsed());
        let write_timeout = self.shard.limits.write_timeout();
        if !keep_alive {
            if flush(&mut self.stream, &mut self.out, write_timeout).await && !body_consumed {
                linger(&mut self.stream, &mut self.buf, &self.shard.limits, &self.shard.drain).await;
            }
            return false;
        }
        self.out.len() < FLUSH_AT || flush(&mut self.stream, &mut self.out, write_timeout).await
    }
}

/// Writes a request's audit record and names it on the response.
fn write_audit(shard: &Shard, pending: PendingAudit, response: &mut Response, started: Instant, peer: &Peer) {
    response.headers.push(("x-request-id".into(), pending.request_id.clone()));
    let (ticket, event) = pending.into_event(response, started.elapsed(), peer.addr);
    shard.audit.record(ticket, &event);
}

/// The body length a head declares (what to reserve before reading it), or 413 when it is over
/// `limit`. A chunked body declares nothing: it is reserved as it is decoded.
fn declared_body(head: &RequestHead, limit: u64) -> Result<u64, ApiError> {
    match head.framing() {
        BodyFraming::Length(n) if n > limit => Err(ApiError::BodyTooLarge { limit }),
        BodyFraming::Length(n) => Ok(n),
        BodyFraming::None | BodyFraming::Chunked => Ok(0),
    }
}

/// Consumes a refused request's body when all of it is already buffered, so that the connection
/// can carry the next request. False when some of it is still to come: the connection then closes
/// after the answer, and what the client still sends is discarded (`linger`), never buffered.
fn skip_buffered_body(head: &RequestHead, buf: &mut Vec<u8>) -> bool {
    match head.framing() {
        BodyFraming::None => true,
        BodyFraming::Length(n) if n <= buf.len() as u64 => {
            buf.drain(..n as usize);
            true
        }
        BodyFraming::Length(_) | BodyFraming::Chunked => false,
    }
}

/// A request whose framing failed: its head, if it was parsed, its pending audit record, if it
/// was admitted, and what went wrong.
struct Failure<'h> {
    head: Option<&'h RequestHead>,
    audit: Option<PendingAudit>,
    err: ApiError,
    started: Instant,
}

/// Answers a request whose framing failed; the connection closes after it, once the client has
/// stopped sending (`linger`). Answers already queued in `out` go first.
async fn answer_protocol_error<T: Transport>(
    shard: &Shard,
    stream: &mut T,
    out: &mut Vec<u8>,
    buf: &mut Vec<u8>,
    peer: &Peer,
    failure: Failure<'_>,
) {
    let Failure { head, audit, err, started } = failure;
    // A framing error, or a chunked body that outgrew the shard's body budget (503): either way
    // the rest of the body is unread, so the connection cannot carry another request.
    debug_assert!(err.closes_connection() || matches!(err, ApiError::Overloaded(_)));
    let mut response = err.response();
    if let Some(pending) = audit {
        write_audit(shard, pending, &mut response, started, peer);
    }
    // The connection's last answer: a fresh writer's one formatting of the date costs nothing here.
    ResponseWriter::default().write(out, &response, Persistence::Close, false);
    let (route, method) = match head {
        Some(h) => (Route::match_path(h.path()).0, h.method()),
        None => (Route::Unmatched, Method::Other),
    };
    shard.metrics.record_request(route, method, response.status, started.elapsed());
    // A client too slow to finish its request is not waited for again.
    if flush(stream, out, shard.limits.write_timeout()).await && !matches!(err, ApiError::RequestTimeout) {
        linger(stream, buf, &shard.limits, &shard.drain).await;
    }
}

/// Reads and discards what the client still sends, until it closes, for at most `--linger-ms`
/// (less once the process drains, unless bytes keep coming). A socket closed with unread bytes
/// sends a reset, which fails the client's write of the rest of its request and can discard the
/// answer before it is read. The time bounds the cost: a legitimate upload of the largest body
/// costs as much.
async fn linger<T: Transport>(stream: &mut T, buf: &mut Vec<u8>, limits: &Limits, drain: &LocalEvent) {
    let deadline = Instant::now() + limits.linger();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        buf.clear();
        match read_more(stream, buf, left, Some(drain)).await {
            Read::Data => {}
            Read::Eof | Read::TimedOut | Read::Drained | Read::Failed => return,
        }
    }
}

enum BodyError {
    /// Answer with this error, then close.
    Http(ApiError),
    /// The peer is gone: just close.
    Connection,
}

async fn read_body<T: Transport>(
    stream: &mut T,
    buf: &mut Vec<u8>,
    out: &mut Vec<u8>,
    head: &RequestHead,
    limit: u64,
    reservation: &BodyReservation<'_>,
    limits: &Limits,
) -> Result<Vec<u8>, BodyError> {
    let framing = head.framing();
    if framing == BodyFraming::None {
        return Ok(Vec::new());
    }
    // Told only now, once the request is admitted and its declared size reserved.
    // Only to a request whose route takes a body: a chunked body on a route that takes none would
    // be invited only to be refused.
    if head.expect_continue && buf.is_empty() && limit > 0 {
        out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
        if !flush(stream, out, limits.write_timeout()).await {
            return Err(BodyError::Connection);
        }
    }
    let deadline = Instant::now() + limits.body_timeout();
    let more = |read: Read| match read {
        Read::Data => Ok(()),
        Read::TimedOut => Err(BodyError::Http(ApiError::RequestTimeout)),
        _ => Err(BodyError::Connection),
    };
    match framing {
        BodyFraming::None => Ok(Vec::new()),
        BodyFraming::Length(n) => {
            let n = n as usize;
            if buf.len() < n {
                buf.reserve(n - buf.len());
            }
            while buf.len() < n {
                more(read_more(stream, buf, deadline.saturating_duration_since(Instant::now()), None).await)?;
            }
            if buf.len() == n {
                return Ok(std::mem::take(buf));
            }
            // Pipelined bytes follow the body: keep the (large) body's allocation, move the tail.
            let rest = buf.split_off(n);
            Ok(std::mem::replace(buf, rest))
        }
        BodyFraming::Chunked => {
            let mut decoder = ChunkedDecoder::new(limit);
            let mut body = Vec::new();
            loop {
                let used = decoder.decode(buf, &mut body).map_err(|e| {
                    BodyError::Http(match e {
                        ChunkedError::TooLarge => ApiError::BodyTooLarge { limit },
                        ChunkedError::Malformed(_) => ApiError::MalformedRequest(e.to_string()),
                    })
                })?;
                buf.drain(..used);
                // Counted as it arrives: a chunked body declares no size to reserve up front.
                reservation.grow_to(body.len() as u64).map_err(BodyError::Http)?;
                if decoder.is_done() {
                    return Ok(body);
                }
                more(read_more(stream, buf, deadline.saturating_duration_since(Instant::now()), None).await)?;
            }
        }
    }
}
