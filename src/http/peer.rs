//! Who a request came from, as the connection knows it.

use std::net::SocketAddr;

/// Who is on the other end of a connection.
#[derive(Clone, Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The subject of the client certificate verified during the TLS handshake (mTLS).
    pub client_cert_subject: Option<String>,
}
