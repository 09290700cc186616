//! Certificates for the TLS tests, made with rcgen: a CA, and server and client certificates
//! it signs (valid, expired, or from another CA), written as PEM files into a directory.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

/// A certificate and its key, as files.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A test certificate authority writing into `dir`.
pub struct Pki {
    dir: PathBuf,
    name: String,
    key: KeyPair,
    cert: rcgen::Certificate,
    /// The CA certificate (PEM).
    pub ca: PathBuf,
}

impl Pki {
    /// A new CA named `name`, its certificate in `<dir>/<name>-ca.pem`.
    pub fn new(dir: &Path, name: &str) -> Pki {
        let key = KeyPair::generate().expect("a CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, format!("Pledge test CA {name}"));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("a self-signed CA");
        let ca = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&ca, cert.pem()).expect("writing the CA");
        Pki { dir: dir.to_path_buf(), name: name.to_string(), key, cert, ca }
    }

    /// A certificate for `name` (also its common name), valid for 127.0.0.1 and localhost, for
    /// servers and clients alike; `expired`: valid only in 2000.
    pub fn issue(&self, name: &str, expired: bool) -> Issued {
        let key = KeyPair::generate().expect("a key");
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).expect("parameters");
        params.subject_alt_names.push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        if expired {
            params.not_before = rcgen::date_time_ymd(2000, 1, 1);
            params.not_after = rcgen::date_time_ymd(2000, 12, 31);
        }
        let cert = params.signed_by(&key, &self.cert, &self.key).expect("a signed certificate");
        let issued = Issued {
            cert: self.dir.join(format!("{}-{name}.pem", self.name)),
            key: self.dir.join(format!("{}-{name}.key", self.name)),
        };
        std::fs::write(&issued.cert, cert.pem()).expect("writing a certificate");
        std::fs::write(&issued.key, key.serialize_pem()).expect("writing a key");
        issued
    }
}

/// Writes a CA bundle trusting every CA of `pkis` to `path`.
pub fn bundle(path: &Path, pkis: &[&Pki]) -> PathBuf {
    let pem: String = pkis.iter().map(|p| std::fs::read_to_string(&p.ca).expect("a CA file")).collect();
    std::fs::write(path, pem).expect("writing a CA bundle");
    path.to_path_buf()
}
