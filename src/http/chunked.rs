//! An incremental decoder for `Transfer-Encoding: chunked` request bodies (RFC 9112 §7.1).
//!
//! It consumes whatever bytes have arrived and keeps its state between reads, so a 64 MiB body
//! arriving in small pieces is decoded in one pass.
//!
//! The grammar is taken exactly, with no leniency: every line ends in CRLF, and a CR or LF alone
//! anywhere is refused, as is anything the chunk-size, chunk-ext and trailer-field grammars do not
//! allow. A proxy in front of us that reads a lenient shape differently (`1\r0` as 1 or 16, a bare
//! LF as a line end or not) would otherwise see a different body, or a different next request,
//! than we do: request smuggling. Refusing is safe, because conforming clients never send them.

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

/// Where in a chunk-size line the decoder is: `chunk-size [ chunk-ext ] CRLF`, with
/// `chunk-ext = *( BWS ";" BWS ext-name [ BWS "=" BWS ext-val ] )`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// Hex digits of the size.
    Digits,
    /// Whitespace after the size or after an extension value: only more of it or a `;` may
    /// follow, since the grammar's whitespace (BWS) comes before `;` and `=`, never before CRLF.
    Gap,
    /// After `;`: whitespace, then an extension name.
    NameStart,
    Name,
    /// Whitespace after a name: `=`, `;` or the CR.
    AfterName,
    /// After `=`: whitespace, then a token or a quoted string.
    ValueStart,
    Token,
    Quoted,
    /// After a quoted string's closing quote.
    AfterQuoted,
    /// After a backslash inside a quoted string.
    QuotedPair,
    /// The CR was read; only LF may follow.
    Lf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a chunk-size line.
    Size(Line),
    /// Inside chunk data with this many bytes left.
    Data(u64),
    /// Expecting the CR after chunk data, then (`true`) the LF.
    DataEnd(bool),
    /// After the zero-size chunk: at the start of a trailer line, or of the final CRLF.
    TrailerStart,
    /// In a trailer field's name, then (after `:`) its value.
    TrailerName,
    TrailerValue,
    /// A trailer line's CR was read.
    TrailerLf,
    /// The final CR was read.
    FinalLf,
    Done,
}

#[derive(Debug)]
pub struct ChunkedDecoder {
    state: State,
    size: u64,
    line_len: usize,
    trailer_bytes: usize,
    decoded: u64,
    limit: u64,
}

/// An RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A byte of a field value or quoted string other than the delimiters: SP, HTAB, VCHAR or
/// obs-text. Never CR, LF, NUL or another control.
fn is_text(b: u8) -> bool {
    b == b' ' || b == b'\t' || (0x21..=0x7e).contains(&b) || b >= 0x80
}

impl ChunkedDecoder {
    pub fn new(limit: u64) -> Self {
        ChunkedDecoder { state: State::Size(Line::Digits), size: 0, line_len: 0, trailer_bytes: 0, decoded: 0, limit }
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
                State::Data(left) => {
                    let take = (left.min((input.len() - i) as u64)) as usize;
                    out.extend_from_slice(&input[i..i + take]);
                    i += take;
                    self.decoded += take as u64;
                    let left = left - take as u64;
                    self.state = if left == 0 { State::DataEnd(false) } else { State::Data(left) };
                    continue;
                }
                _ => {}
            }
            let b = input[i];
            i += 1;
            self.state = match self.state {
                State::Size(line) => {
                    self.line_len += 1;
                    if self.line_len > MAX_LINE {
                        return Err(ChunkedError::Malformed("chunk-size line too long"));
                    }
                    self.size_line(line, b)?
                }
                State::DataEnd(false) if b == b'\r' => State::DataEnd(true),
                State::DataEnd(true) if b == b'\n' => State::Size(Line::Digits),
                State::DataEnd(_) => return Err(ChunkedError::Malformed("missing CRLF after chunk data")),
                trailer => {
                    self.trailer_bytes += 1;
                    if self.trailer_bytes > MAX_TRAILERS {
                        return Err(ChunkedError::Malformed("trailers too large"));
                    }
                    Self::trailer(trailer, b)?
                }
            };
        }
        Ok(i)
    }

    /// The next state of a chunk-size line after byte `b`.
    fn size_line(&mut self, line: Line, b: u8) -> Result<State, ChunkedError> {
        const BAD_END: ChunkedError = ChunkedError::Malformed("chunk-size line not ended by CRLF");
        let ws = b == b' ' || b == b'\t';
        let next = match (line, b) {
            (Line::Lf, b'\n') => {
                let size = std::mem::take(&mut self.size);
                self.line_len = 0;
                return Ok(if size == 0 { State::TrailerStart } else { State::Data(size) });
            }
            (Line::Lf, _) | (_, b'\n') => return Err(BAD_END),
            (Line::Digits, _) if b.is_ascii_hexdigit() => {
                if self.size > u64::MAX >> 4 {
                    return Err(ChunkedError::Malformed("chunk size overflows"));
                }
                self.size = (self.size << 4) | u64::from((b as char).to_digit(16).unwrap_or(0));
                if self.decoded.saturating_add(self.size) > self.limit {
                    return Err(ChunkedError::TooLarge);
                }
                Line::Digits
            }
            // The line's first byte (`line_len` counts it) must be a digit.
            (Line::Digits, _) if self.line_len == 1 => return Err(ChunkedError::Malformed("invalid chunk size")),
            (Line::Digits | Line::Name | Line::Token | Line::AfterQuoted, b'\r') => Line::Lf,
            (Line::Digits | Line::Name | Line::AfterName | Line::Token | Line::AfterQuoted | Line::Gap, b';') => {
                Line::NameStart
            }
            (Line::Digits | Line::Token | Line::AfterQuoted | Line::Gap, _) if ws => Line::Gap,
            (Line::Digits, _) => return Err(ChunkedError::Malformed("invalid chunk size")),
            (Line::NameStart | Line::AfterName | Line::ValueStart, _) if ws => line,
            (Line::Name, _) if ws => Line::AfterName,
            (Line::NameStart | Line::Name, _) if is_tchar(b) => Line::Name,
            (Line::Name | Line::AfterName, b'=') => Line::ValueStart,
            (Line::ValueStart, b'"') => Line::Quoted,
            (Line::ValueStart | Line::Token, _) if is_tchar(b) => Line::Token,
            (Line::Quoted, b'"') => Line::AfterQuoted,
            (Line::Quoted, b'\\') => Line::QuotedPair,
            (Line::Quoted | Line::QuotedPair, _) if is_text(b) => Line::Quoted,
            _ => return Err(ChunkedError::Malformed("invalid chunk extension")),
        };
        Ok(State::Size(next))
    }

    /// The next state of the trailer section after byte `b`: `*( field-line CRLF ) CRLF`.
    fn trailer(state: State, b: u8) -> Result<State, ChunkedError> {
        const BAD_END: ChunkedError = ChunkedError::Malformed("trailer line not ended by CRLF");
        Ok(match (state, b) {
            (State::TrailerStart, b'\r') => State::FinalLf,
            (State::FinalLf, b'\n') => State::Done,
            (State::TrailerLf, b'\n') => State::TrailerStart,
            (State::FinalLf | State::TrailerLf, _) | (_, b'\n') => return Err(BAD_END),
            (State::TrailerStart | State::TrailerName, _) if is_tchar(b) => State::TrailerName,
            (State::TrailerName, b':') => State::TrailerValue,
            (State::TrailerValue, b'\r') => State::TrailerLf,
            (State::TrailerValue, _) if is_text(b) => State::TrailerValue,
            _ => return Err(ChunkedError::Malformed("invalid trailer field")),
        })
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

    /// The first error decoding `input` byte by byte, or the decoded body.
    fn outcome(input: &[u8]) -> Result<Vec<u8>, ChunkedError> {
        let mut d = ChunkedDecoder::new(1 << 20);
        let mut out = Vec::new();
        for b in input {
            d.decode(std::slice::from_ref(b), &mut out)?;
        }
        assert!(d.is_done(), "{:?} left the decoder unfinished", String::from_utf8_lossy(input));
        Ok(out)
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

    #[test]
    fn accepts_the_whole_extension_and_trailer_grammar() {
        for ok in [
            &b"1\r\na\r\n0\r\n\r\n"[..],
            b"1;a\r\na\r\n0\r\n\r\n",
            b"1 ;a\r\na\r\n0\r\n\r\n",
            b"1\t; a = b ;c\r\na\r\n0\r\n\r\n",
            b"1;a=\"q \\\" ;\\\\ \x80\"\r\na\r\n0\r\n\r\n",
            b"1;a=\"q\" ;b=c\r\na\r\n0;last\r\n\r\n",
            b"0001\r\na\r\n00000000000000000000\r\n\r\n",
            b"1\r\na\r\n0\r\nx-a: 1\r\nx-b:\r\nx-c: \t v \x80\r\n\r\n",
        ] {
            assert_eq!(outcome(ok), Ok(b"a".to_vec()), "{:?}", String::from_utf8_lossy(ok));
        }
    }

    #[test]
    fn refuses_every_lenient_shape() {
        for bad in [
            // A bare CR inside the size: `1\r0` is neither 1 nor 16.
            &b"1\r0\r\n"[..],
            b"1\r\r\n",
            b"\r1\r\n",
            // Bare LF ends no line, anywhere.
            b"1\na\r\n0\r\n\r\n",
            b"1;a\na\r\n0\r\n\r\n",
            b"1\r\na\n0\r\n\r\n",
            b"1\r\na\r\n0\n\r\n",
            b"1\r\na\r\n0\r\n\n",
            b"1\r\na\r\n0\r\nx: 1\n\r\n",
            // A bare CR after chunk data, in an extension, in a trailer.
            b"1\r\na\r0\r\n\r\n",
            b"1;a\rb\r\n",
            b"1;a=\"b\rc\"\r\n",
            b"1\r\na\r\n0\r\nx: 1\r2\r\n\r\n",
            b"1\r\na\r\n0\r\n\r\r\n",
            // Sizes: whitespace inside or before, signs, a prefix, nothing before an extension.
            b"1 0\r\n",
            b" 1\r\n",
            b"+1\r\n",
            b"0x1\r\n",
            b";a\r\n",
            b"1 \r\n",
            // Extensions: no name, a name that is not a token, an unterminated or stray quote,
            // a control character, whitespace after a token value with no `;`.
            b"1;\r\n",
            b"1;=b\r\n",
            b"1;a@b\r\n",
            b"1;a=\r\n",
            b"1;a=b c\r\n",
            b"1;a=\"b\r\n",
            b"1;a=\"b\"c\r\n",
            b"1;a=\x01\r\n",
            b"1;a=\"\x00\"\r\n",
            // Trailers: a folded line, no colon, a name that is not a token, a control character.
            b"1\r\na\r\n0\r\n x: 1\r\n\r\n",
            b"1\r\na\r\n0\r\nx\r\n\r\n",
            b"1\r\na\r\n0\r\nx y: 1\r\n\r\n",
            b"1\r\na\r\n0\r\nx: \x01\r\n\r\n",
        ] {
            assert!(
                matches!(outcome(bad), Err(ChunkedError::Malformed(_))),
                "{:?} was accepted",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn a_bare_cr_in_the_size_names_the_line_ending() {
        let e = outcome(b"1\r0\r\n").unwrap_err();
        assert_eq!(e, ChunkedError::Malformed("chunk-size line not ended by CRLF"));
    }
}
