//! A certificate authority made at test time, and certificates it signs, written as PEM files. The
//! benchmark harness's tests include this file with `#[path]`, as they do `cargo_build.rs`.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

/// A CA, and certificates it signs, written as PEM files.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        Ca { issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap() }
    }

    pub fn write_ca(&self, path: &Path) {
        std::fs::write(path, self.issuer.pem()).unwrap();
    }

    /// Writes `NAME.pem` and `NAME.key` into `dir`, for `common_name` (also the DNS name).
    pub fn issue(&self, dir: &Path, name: &str, common_name: &str) -> (PathBuf, PathBuf) {
        let mut params = CertificateParams::new(vec![common_name.to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.distinguished_name.push(DnType::OrganizationName, "TensorWasm Tests");
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (cert_path, key_path) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }
}
