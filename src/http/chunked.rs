//! An incremental decoder for `Transfer-Encoding: chunked` request bodies (RFC 9112 §7.1).
//!
//! It consumes whatever bytes have arrived and keeps its state between reads, so a 64 MiB body
//! arriving in small pieces is decoded in one pass.

use std::fmt;

/// Longest chunk-size line accepted, extensions included.
const MAX_LINE: usize = 4096;
/// Most trailer bytes accepted after the last chunk.
const MAX_TRAILERS: usize = 16 * 1024;

#[derive(Debug, PartialEq, Eq)]
pub enum ChunkedError {
    Malformed(&'static str),
    TooLarge,
}

impl fmt::Display for ChunkedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChunkedError::Malformed(m) => write!(f, "malformed chunked body: {m}"),
            ChunkedError::TooLarge => write!(f, "chunked body exceeds the limit"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading the hex size line; `line_len` counts its bytes so far.
    Size,
    /// Inside chunk data with this many bytes left.
    Data(u64),
    /// Expecting the CRLF after chunk data.
    DataEnd,
    /// After the zero-size chunk: trailer lines until an empty one.
    Trailers,
    Done,
}

#[derive(Debug)]
pub struct ChunkedDecoder {
    state: State,
    size: u64,
    size_digits: usize,
    in_extension: bool,
    line_len: usize,
    trailer_bytes: usize,
    trailer_line_len: usize,
    decoded: u64,
    limit: u64,
}

impl ChunkedDecoder {
    pub fn new(limit: u64) -> Self {
        ChunkedDecoder {
            state: State::Size,
            size: 0,
            size_digits: 0,
            in_extension: false,
            line_len: 0,
            trailer_bytes: 0,
            trailer_line_len: 0,
            decoded: 0,
            limit,
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Decodes from `input`, appending body bytes to `out`. Returns how many input bytes were
    /// consumed; when [`is_done`](Self::is_done), the rest of `input` is the next request.
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, ChunkedError> {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                State::Done => break,
                State::Size => {
                    let b = input[i];
                    i += 1;
                    self.line_len += 1;
                    if self.line_len > MAX_LINE {
                        return Err(ChunkedError::Malformed("chunk-size line too long"));
                    }
                    match b {
                        b'\n' => {
                            if self.size_digits == 0 {
                                return Err(ChunkedError::Malformed("missing chunk size"));
                            }
                            self.state = if self.size == 0 { State::Trailers } else { State::Data(self.size) };
                            self.size = 0;
                            self.size_digits = 0;
                            self.in_extension = false;
                            self.line_len = 0;
                        }
                        b'\r' => {}
                        _ if self.in_extension => {}
                        b';' => self.in_extension = true,
                        b' ' | b'\t' if self.size_digits > 0 => self.in_extension = true,
                        _ => {
                            let digit =
                                (b as char).to_digit(16).ok_or(ChunkedError::Malformed("invalid chunk size"))?;
                            self.size_digits += 1;
                            if self.size_digits > 16 {
                                return Err(ChunkedError::Malformed("chunk size overflows"));
                            }
                            self.size = (self.size << 4) | u64::from(digit);
                            if self.decoded.saturating_add(self.size) > self.limit {
                                return Err(ChunkedError::TooLarge);
                            }
                        }
                    }
                }
                State::Data(left) => {
                    let take = (left.min((input.len() - i) as u64)) as usize;
                    out.extend_from_slice(&input[i..i + take]);
                    i += take;
                    self.decoded += take as u64;
                    let left = left - take as u64;
                    self.state = if left == 0 { State::DataEnd } else { State::Data(left) };
                }
                State::DataEnd => {
                    let b = input[i];
                    i += 1;
                    match b {
                        b'\r' => {}
                        b'\n' => self.state = State::Size,
                        _ => return Err(ChunkedError::Malformed("missing CRLF after chunk data")),
                    }
                }
                State::Trailers => {
                    let b = input[i];
                    i += 1;
                    self.trailer_bytes += 1;
                    if self.trailer_bytes > MAX_TRAILERS {
                        return Err(ChunkedError::Malformed("trailers too large"));
                    }
                    match b {
                        b'\n' => {
                            if self.trailer_line_len == 0 {
                                self.state = State::Done;
                            }
                            self.trailer_line_len = 0;
                        }
                        b'\r' => {}
                        _ => self.trailer_line_len += 1,
                    }
                }
            }
        }
        Ok(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8], step: usize) -> Result<(Vec<u8>, usize), ChunkedError> {
        let mut d = ChunkedDecoder::new(1 << 20);
        let mut out = Vec::new();
        let mut pos = 0;
        while !d.is_done() && pos < input.len() {
            let end = (pos + step).min(input.len());
            pos += d.decode(&input[pos..end], &mut out)?;
        }
        assert!(d.is_done(), "decoder not done");
        Ok((out, pos))
    }

    #[test]
    fn decodes_in_any_split() {
        let body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        for step in 1..body.len() {
            let (out, used) = decode_all(body, step).unwrap();
            assert_eq!(out, b"hello world");
            assert_eq!(&body[used..], b"NEXT");
        }
    }

    #[test]
    fn rejects_bad_input_and_enforces_limit() {
        assert!(decode_all(b"zz\r\n", 4).is_err());
        assert!(decode_all(b"\r\n", 4).is_err());
        assert!(decode_all(b"1\r\nab\r\n0\r\n\r\n", 64).is_err());
        assert!(decode_all(b"11111111111111111\r\n", 64).is_err());
        let mut d = ChunkedDecoder::new(4);
        assert_eq!(d.decode(b"5\r\nhello\r\n", &mut Vec::new()), Err(ChunkedError::TooLarge));
    }
}
