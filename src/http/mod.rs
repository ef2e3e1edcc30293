//! HTTP/1.1 written for this server on top of `httparse`: a codec of request heads, bodies
//! (Content-Length and chunked), responses and status codes, plus the blocking client.
//!
//! Boundary: a codec. It knows nothing of routes, shards or the API; the connection loop that
//! drives it is `server::conn`.

mod chunked;
pub mod client;
pub mod header_rules;
mod peer;
mod request;
mod response;
mod status;

pub use chunked::{ChunkedDecoder, ChunkedError};
pub use peer::Peer;
pub use request::{parse_head, BodyFraming, HeadError, HeadParse, Method, RequestHead, MAX_HEADERS_CAP};
pub use response::{Persistence, Response, ResponseWriter};
pub use status::Status;
