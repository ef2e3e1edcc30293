use std::borrow::Cow;
use std::time::{SystemTime, UNIX_EPOCH};

use super::Status;

/// A complete response. Bodies are small enough here (capped guest output, JSON) to be buffered.
#[derive(Debug)]
pub struct Response {
    pub status: Status,
    pub content_type: &'static str,
    /// Owned names are a guest's (envelope ABI), checked by `header_rules`.
    pub headers: Vec<(Cow<'static, str>, String)>,
    pub body: Vec<u8>,
    /// The error kind, when this answers an error (for the audit record).
    pub error_kind: Option<&'static str>,
}

impl Response {
    pub fn new(status: Status, content_type: &'static str, body: Vec<u8>) -> Self {
        Response { status, content_type, headers: Vec::new(), body, error_kind: None }
    }

    pub fn json(status: Status, body: Vec<u8>) -> Self {
        Self::new(status, "application/json", body)
    }

    pub fn json_value(status: Status, value: &impl serde::Serialize) -> Self {
        Self::json(status, serde_json::to_vec(value).unwrap_or_default())
    }

    pub fn empty(status: Status) -> Self {
        Self::new(status, "", Vec::new())
    }
}

/// What a response says about its connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Persistence {
    /// The connection closes after this response: `connection: close`.
    Close,
    /// It stays open, which HTTP/1.1 assumes: nothing to say.
    KeepAlive,
    /// It stays open for an HTTP/1.0 client, which assumes the opposite unless told so:
    /// `connection: keep-alive` (RFC 9112 §9.3). Without it, such a client closes after reading
    /// the answer, or, worse, waits for a close that never comes to end a body it cannot frame.
    KeepAliveHttp10,
}

impl Persistence {
    /// For a request of HTTP/1.`version` whose connection stays open when `keep_alive`.
    pub fn new(keep_alive: bool, version: u8) -> Self {
        match (keep_alive, version) {
            (false, _) => Persistence::Close,
            (true, 0) => Persistence::KeepAliveHttp10,
            (true, _) => Persistence::KeepAlive,
        }
    }
}

/// Serialises responses into a connection's output buffer, with a `date` header cached per second.
pub struct ResponseWriter {
    date_secs: u64,
    date: [u8; 29],
}

impl Default for ResponseWriter {
    fn default() -> Self {
        ResponseWriter { date_secs: u64::MAX, date: [b' '; 29] }
    }
}

impl ResponseWriter {
    pub fn write(&mut self, out: &mut Vec<u8>, resp: &Response, persistence: Persistence, head_only: bool) {
        self.refresh_date();
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(resp.status.code().to_string().as_bytes());
        out.push(b' ');
        out.extend_from_slice(resp.status.reason().as_bytes());
        out.extend_from_slice(b"\r\ndate: ");
        out.extend_from_slice(&self.date);
        if !resp.content_type.is_empty() {
            out.extend_from_slice(b"\r\ncontent-type: ");
            out.extend_from_slice(resp.content_type.as_bytes());
        }
        if resp.status != Status::NoContent {
            out.extend_from_slice(b"\r\ncontent-length: ");
            out.extend_from_slice(resp.body.len().to_string().as_bytes());
        }
        for (name, value) in &resp.headers {
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
        }
        // Static bytes either way: no allocation on the hot path.
        match persistence {
            Persistence::Close => out.extend_from_slice(b"\r\nconnection: close"),
            Persistence::KeepAliveHttp10 => out.extend_from_slice(b"\r\nconnection: keep-alive"),
            Persistence::KeepAlive => {}
        }
        out.extend_from_slice(b"\r\n\r\n");
        if !head_only && resp.status != Status::NoContent {
            out.extend_from_slice(&resp.body);
        }
    }

    fn refresh_date(&mut self) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        if now != self.date_secs {
            self.date_secs = now;
            self.date = http_date(now);
        }
    }
}

/// IMF-fixdate, e.g. `Sun, 06 Nov 1994 08:49:37 GMT`.
fn http_date(secs: u64) -> [u8; 29] {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days as i64);
    let s = format!(
        "{}, {:02} {} {:04} {:02}:{:02}:{:02} GMT",
        DAYS[(days % 7) as usize],
        d,
        MONTHS[(m - 1) as usize],
        y,
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    );
    let mut out = [b' '; 29];
    let n = s.len().min(29);
    out[..n].copy_from_slice(&s.as_bytes()[..n]);
    out
}

/// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(persistence: Persistence) -> String {
        let mut out = Vec::new();
        let resp = Response::json(Status::Ok, b"{}".to_vec());
        ResponseWriter::default().write(&mut out, &resp, persistence, false);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn says_what_happens_to_the_connection() {
        assert_eq!(Persistence::new(true, 0), Persistence::KeepAliveHttp10);
        assert_eq!(Persistence::new(true, 1), Persistence::KeepAlive);
        assert_eq!(Persistence::new(false, 0), Persistence::Close);
        assert_eq!(Persistence::new(false, 1), Persistence::Close);
        assert!(written(Persistence::KeepAliveHttp10).contains("\r\nconnection: keep-alive\r\n"));
        assert!(written(Persistence::Close).contains("\r\nconnection: close\r\n"));
        assert!(!written(Persistence::KeepAlive).contains("connection:"));
    }

    #[test]
    fn formats_http_dates() {
        assert_eq!(&super::http_date(784_111_777), b"Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(&super::http_date(0), b"Thu, 01 Jan 1970 00:00:00 GMT");
    }
}
