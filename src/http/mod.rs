//! HTTP/1.1 written for this server on top of `httparse`: request heads, bodies (Content-Length and
//! chunked), responses, and the per-connection loop with its deadlines, keep-alive and pipelining.

mod chunked;
pub mod client;
pub mod conn;
pub mod header_rules;
mod request;
mod response;
mod status;

pub use chunked::{ChunkedDecoder, ChunkedError};
pub use request::{parse_head, BodyFraming, HeadParse, Method, RequestHead, MAX_HEADERS_CAP};
pub use response::{Persistence, Response, ResponseWriter};
pub use status::Status;
