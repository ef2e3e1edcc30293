//! What the blocking HTTP client trusts and presents over TLS: the command-line client talking to
//! an https:// server, and sinks delivering to https:// URLs.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection};

use super::config::{read_certificates, read_key, read_roots};

/// Where the system keeps its trust store, when `SSL_CERT_FILE` does not say: Debian and Ubuntu,
/// Fedora and RHEL, openSUSE, Alpine and macOS.
const SYSTEM_BUNDLES: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// A rustls client configuration: the CAs to trust and, for mTLS, the certificate to present.
#[derive(Clone, Debug)]
pub struct ClientTls {
    pub config: Arc<ClientConfig>,
}

impl ClientTls {
    /// Trusts the CAs of PEM file `ca` (the system's trust store when `None`) and presents
    /// `identity`, a certificate chain and its key, when the server asks for one.
    ///
    /// ```
    /// use tensor_wasm::client::ClientTls;
    /// let err = ClientTls::new(Some("/nonexistent/ca.pem".as_ref()), None).err().unwrap();
    /// assert!(err.contains("/nonexistent/ca.pem"), "{err}");
    /// ```
    pub fn new(ca: Option<&Path>, identity: Option<(&Path, &Path)>) -> Result<ClientTls, String> {
        let roots = match ca {
            Some(path) => read_roots(path, "CA certificate")?,
            None => read_roots(&system_bundle()?, "the system's trust store")?,
        };
        let builder = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(roots);
        let mut config = match identity {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => builder
                .with_client_auth_cert(read_certificates(cert, "client certificate")?, read_key(key, "client key")?)
                .map_err(|e| format!("client certificate {} and key {}: {e}", cert.display(), key.display()))?,
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(ClientTls { config: Arc::new(config) })
    }

    /// A session toward `host`, whose certificate must carry that name; its handshake runs in its
    /// first reads and writes.
    pub fn session(&self, host: &str) -> Result<ClientConnection, String> {
        let name =
            ServerName::try_from(host.to_string()).map_err(|e| format!("`{host}` is no TLS server name: {e}"))?;
        ClientConnection::new(self.config.clone(), name).map_err(|e| format!("TLS: {e}"))
    }

    /// The system's trust store, read once per process.
    pub fn system() -> Result<ClientTls, String> {
        static SYSTEM: OnceLock<Result<ClientTls, String>> = OnceLock::new();
        SYSTEM.get_or_init(|| ClientTls::new(None, None)).clone()
    }
}

/// `SSL_CERT_FILE`, as OpenSSL reads it, or the first of the usual bundles that exists.
fn system_bundle() -> Result<PathBuf, String> {
    if let Some(file) = std::env::var_os("SSL_CERT_FILE") {
        return Ok(PathBuf::from(file));
    }
    SYSTEM_BUNDLES.iter().map(PathBuf::from).find(|p| p.is_file()).ok_or_else(|| {
        format!("no system trust store ({}, or SSL_CERT_FILE); give a CA certificate", SYSTEM_BUNDLES.join(", "))
    })
}
