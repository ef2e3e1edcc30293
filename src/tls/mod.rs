//! Native TLS and mTLS on every shard listener (rustls with the ring provider).
//!
//! - [`config`]: building a rustls `ServerConfig` from PEM files, and a watcher that rebuilds it
//!   when the files change (a cert-manager renewal needs no restart);
//! - [`stream`]: a TLS connection over monoio's owned-buffer I/O, written here because it must
//!   expose the verified client certificate to the request;
//! - [`forwarded`]: `X-Forwarded-Client-Cert` from trusted proxies only;
//! - [`client`]: what the blocking HTTP client (the CLI, sinks) trusts and presents.

pub mod client;
pub mod config;
pub mod forwarded;
pub mod stream;

pub use client::ClientTls;
pub use config::{TlsFiles, TlsWatcher};
pub use stream::TlsStream;
