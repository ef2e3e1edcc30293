use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use crate::runtime::periodic::Periodic;
use crate::runtime::published::Published;
use crate::runtime::watch;

/// How often the certificate files are checked for changes.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// The PEM files TLS is configured from.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by one of these CAs.
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    fn paths(&self) -> impl Iterator<Item = &Path> {
        [self.cert.as_path(), self.key.as_path()].into_iter().chain(self.client_ca.as_deref())
    }

    /// Builds the rustls configuration. Errors name the file and what is wrong with it.
    pub fn load(&self) -> Result<ServerConfig, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = read_certificates(&self.cert, "TLS certificate")?;
        let key = read_key(&self.key, "TLS key")?;
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let roots = read_roots(path, "TLS client CA")?;
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| format!("TLS client CA {}: {e}", path.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(chain, key)
            .map_err(|e| format!("TLS certificate {} and key {}: {e}", self.cert.display(), self.key.display()))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}

/// The certificates of PEM file `path`, at least one; errors start with `what` and the path.
pub(crate) fn read_certificates(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|e| format!("{what} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{what} {}: no certificate in the file", path.display()));
    }
    Ok(certs)
}

/// The private key of PEM file `path`.
pub(crate) fn read_key(path: &Path, what: &str) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("{what} {}: {e}", path.display()))
}

/// The CA certificates of PEM file `path` that parse, at least one.
pub(crate) fn read_roots(path: &Path, what: &str) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(read_certificates(path, what)?);
    if added == 0 {
        return Err(format!("{what} {}: no usable CA certificate", path.display()));
    }
    Ok(roots)
}

/// The current TLS configuration, rebuilt when its files change.
pub struct TlsWatcher;

impl TlsWatcher {
    /// Watches `files`; a configuration that fails to build is logged and the previous one kept.
    pub fn spawn(files: TlsFiles, published: Arc<Published<ServerConfig>>) -> std::io::Result<Periodic> {
        let watched = files.paths().map(Path::to_path_buf).collect();
        watch::spawn_poller(
            "tw-tls",
            POLL_INTERVAL,
            watched,
            || false,
            move |_| match files.load() {
                Ok(config) => {
                    tracing::info!(cert = %files.cert.display(), "TLS configuration reloaded");
                    published.publish(config);
                }
                Err(e) => tracing::error!("{e}; keeping the previous TLS configuration"),
            },
        )
    }
}
