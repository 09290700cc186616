//! How the adapter talks to the brokers: Kafka's four security protocols (PLAINTEXT, SSL,
//! SASL_PLAINTEXT, SASL_SSL), the CA that signs the brokers' certificates, an optional client
//! certificate (mutual TLS), and SASL credentials (SCRAM-SHA-256, SCRAM-SHA-512 or PLAIN).
//!
//! One [`BrokerSecurity`] configures both ways the adapter reaches Kafka: librdkafka (every
//! producer and consumer it creates, [`BrokerSecurity::apply`]) and the adapter's own wire
//! client ([`crate::wire`], TLS with rustls and SASL in [`crate::scram`]), so the two can never
//! disagree about which listener and credentials they use.
//!
//! Combinations that cannot work are refused before anything is started
//! ([`BrokerSecurity::from_options`], [`BrokerSecurity::check`]), each with a message naming the
//! option to fix. The password never comes from a command-line value (which `ps` shows to every
//! user): it is read from a file or from an environment variable, and [`Password`] keeps it out
//! of `Debug` output and logs.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use rdkafka::ClientConfig;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls;

/// The environment variable the binary reads the SASL password from (when no password file is
/// given). Not a command-line flag: flags show in `ps`.
pub const PASSWORD_ENV: &str = "PLEDGE_KAFKA_SASL_PASSWORD";
/// Longest password file read, in bytes.
pub const MAX_PASSWORD_FILE_BYTES: u64 = 4096;
/// Longest certificate, key or CA file read, in bytes (the same bound as the gRPC side's).
pub const MAX_PEM_FILE_BYTES: u64 = pledge_proto::tls::MAX_PEM_FILE_BYTES;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecurityError {
    /// Options that do not go together (or one missing).
    #[error("{0}")]
    Options(String),
    /// A file named by the options that cannot be used.
    #[error("{path}: {error}")]
    File { path: PathBuf, error: String },
}

fn options(message: impl Into<String>) -> SecurityError {
    SecurityError::Options(message.into())
}

fn file_error(path: &Path, error: impl fmt::Display) -> SecurityError {
    SecurityError::File { path: path.to_path_buf(), error: error.to_string() }
}

/// Kafka's `security.protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SecurityProtocol {
    #[default]
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl SecurityProtocol {
    pub const ALL: [SecurityProtocol; 4] = [
        SecurityProtocol::Plaintext,
        SecurityProtocol::Ssl,
        SecurityProtocol::SaslPlaintext,
        SecurityProtocol::SaslSsl,
    ];

    /// Whether connections are TLS.
    pub fn tls(self) -> bool {
        matches!(self, SecurityProtocol::Ssl | SecurityProtocol::SaslSsl)
    }

    /// Whether connections authenticate with SASL.
    pub fn sasl(self) -> bool {
        matches!(self, SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl)
    }

    /// Kafka's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "PLAINTEXT",
            SecurityProtocol::Ssl => "SSL",
            SecurityProtocol::SaslPlaintext => "SASL_PLAINTEXT",
            SecurityProtocol::SaslSsl => "SASL_SSL",
        }
    }
}

impl fmt::Display for SecurityProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SecurityProtocol {
    type Err = String;

    /// Kafka's names, in any case.
    fn from_str(s: &str) -> Result<Self, String> {
        SecurityProtocol::ALL.into_iter().find(|p| p.as_str().eq_ignore_ascii_case(s)).ok_or_else(|| {
            format!("{s:?} is not a Kafka security protocol (PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL)")
        })
    }
}

/// Kafka's `sasl.mechanism`, as far as the adapter speaks it (not GSSAPI or OAUTHBEARER).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaslMechanism {
    ScramSha256,
    ScramSha512,
    /// The password sent as it is: only over TLS ([`BrokerSecurity::check`]).
    Plain,
}

impl SaslMechanism {
    pub const ALL: [SaslMechanism; 3] = [SaslMechanism::ScramSha256, SaslMechanism::ScramSha512, SaslMechanism::Plain];

    pub fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
            SaslMechanism::Plain => "PLAIN",
        }
    }
}

impl fmt::Display for SaslMechanism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SaslMechanism {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        SaslMechanism::ALL.into_iter().find(|m| m.as_str().eq_ignore_ascii_case(s)).ok_or_else(|| {
            format!("{s:?} is not a SASL mechanism the adapter speaks (SCRAM-SHA-256, SCRAM-SHA-512 or PLAIN)")
        })
    }
}

/// A SASL password: never shown by `Debug` (configurations are logged and printed in errors).
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    /// A password given as it is (from an environment variable, say); refused empty.
    pub fn new(password: String) -> Result<Password, SecurityError> {
        if password.is_empty() {
            return Err(options("the SASL password is empty"));
        }
        if password.contains('\0') {
            return Err(options("the SASL password contains a NUL character"));
        }
        Ok(Password(password))
    }

    /// The password in `path`: its whole content as UTF-8, but for one trailing newline (`\n`
    /// or `\r\n`, as editors and `echo` leave), at most [`MAX_PASSWORD_FILE_BYTES`].
    pub fn from_file(path: &Path) -> Result<Password, SecurityError> {
        let file = std::fs::File::open(path).map_err(|e| file_error(path, e))?;
        let mut bytes = Vec::new();
        file.take(MAX_PASSWORD_FILE_BYTES + 1).read_to_end(&mut bytes).map_err(|e| file_error(path, e))?;
        if bytes.len() as u64 > MAX_PASSWORD_FILE_BYTES {
            return Err(file_error(path, format!("longer than {MAX_PASSWORD_FILE_BYTES} bytes; not a password file?")));
        }
        let mut text = String::from_utf8(bytes).map_err(|_| file_error(path, "not UTF-8"))?;
        if text.ends_with('\n') {
            text.pop();
            if text.ends_with('\r') {
                text.pop();
            }
        }
        Password::new(text).map_err(|e| file_error(path, e))
    }

    /// The password itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

/// Who the adapter is to SASL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaslCredentials {
    pub mechanism: SaslMechanism,
    pub username: String,
    pub password: Password,
}

/// How to reach the brokers (see the module documentation). The default is PLAINTEXT.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BrokerSecurity {
    pub protocol: SecurityProtocol,
    /// The CA certificates (PEM) the brokers' certificates must chain to (SSL and SASL_SSL).
    pub ca: Option<PathBuf>,
    /// Mutual TLS: the adapter's certificate chain and private key (PEM), for listeners that
    /// ask for a client certificate.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// SASL_PLAINTEXT and SASL_SSL.
    pub sasl: Option<SaslCredentials>,
}

/// The options as the binary takes them (`--kafka-*`), before they are checked.
#[derive(Debug, Clone, Default)]
pub struct SecurityOptions {
    pub protocol: SecurityProtocol,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub sasl_mechanism: Option<SaslMechanism>,
    pub sasl_username: Option<String>,
    pub sasl_password_file: Option<PathBuf>,
    /// The value of [`PASSWORD_ENV`], if set.
    pub sasl_password_env: Option<String>,
}

impl BrokerSecurity {
    /// From the binary's options: reads the password (file or environment) and checks that the
    /// options go together ([`BrokerSecurity::check`]); every refusal names the option to fix.
    pub fn from_options(o: SecurityOptions) -> Result<BrokerSecurity, SecurityError> {
        let protocol = o.protocol;
        let sasl_given = o.sasl_mechanism.is_some()
            || o.sasl_username.is_some()
            || o.sasl_password_file.is_some()
            || o.sasl_password_env.is_some();
        let sasl = match (protocol.sasl(), sasl_given) {
            (false, false) => None,
            (false, true) => {
                let given = [
                    o.sasl_mechanism.is_some().then_some("--kafka-sasl-mechanism"),
                    o.sasl_username.is_some().then_some("--kafka-sasl-username"),
                    o.sasl_password_file.is_some().then_some("--kafka-sasl-password-file"),
                    o.sasl_password_env.is_some().then_some(PASSWORD_ENV),
                ];
                let given: Vec<&str> = given.into_iter().flatten().collect();
                return Err(options(format!(
                    "{} given, but --kafka-security-protocol is {protocol}: SASL needs SASL_SSL (or SASL_PLAINTEXT)",
                    given.join(", ")
                )));
            }
            (true, _) => {
                let mechanism = o.sasl_mechanism.ok_or_else(|| {
                    options(format!(
                        "--kafka-security-protocol {protocol} needs --kafka-sasl-mechanism (SCRAM-SHA-256, SCRAM-SHA-512 or PLAIN)"
                    ))
                })?;
                let username = o.sasl_username.filter(|u| !u.is_empty()).ok_or_else(|| {
                    options(format!("--kafka-security-protocol {protocol} needs --kafka-sasl-username"))
                })?;
                let password = match (o.sasl_password_file, o.sasl_password_env) {
                    (Some(path), None) => Password::from_file(&path)?,
                    (None, Some(value)) => Password::new(value).map_err(|e| options(format!("{PASSWORD_ENV}: {e}")))?,
                    (Some(path), Some(_)) => {
                        return Err(options(format!(
                            "the SASL password is given twice, in --kafka-sasl-password-file {} and in {PASSWORD_ENV}: \
                             keep one",
                            path.display()
                        )));
                    }
                    (None, None) => {
                        return Err(options(format!(
                            "--kafka-security-protocol {protocol} needs the SASL password: --kafka-sasl-password-file \
                             or the {PASSWORD_ENV} environment variable"
                        )));
                    }
                };
                Some(SaslCredentials { mechanism, username, password })
            }
        };
        let security = BrokerSecurity { protocol, ca: o.ca, cert: o.cert, key: o.key, sasl };
        security.check()?;
        Ok(security)
    }

    /// Refuses settings that cannot work together (see [`BrokerSecurity::from_options`] for the
    /// binary's; this one also guards configurations built in code).
    pub fn check(&self) -> Result<(), SecurityError> {
        let p = self.protocol;
        if p.tls() {
            if self.ca.is_none() {
                return Err(options(format!(
                    "--kafka-security-protocol {p} needs --kafka-ca: the CA certificates (PEM) that signed the brokers' \
                     certificates (for a public CA, the system bundle, e.g. /etc/ssl/certs/ca-certificates.crt)"
                )));
            }
            if self.cert.is_some() != self.key.is_some() {
                return Err(options(
                    "--kafka-cert and --kafka-key go together: the client certificate for mutual TLS and its private key",
                ));
            }
        } else {
            let given: Vec<&str> = [
                self.ca.is_some().then_some("--kafka-ca"),
                self.cert.is_some().then_some("--kafka-cert"),
                self.key.is_some().then_some("--kafka-key"),
            ]
            .into_iter()
            .flatten()
            .collect();
            if !given.is_empty() {
                return Err(options(format!(
                    "{} given, but --kafka-security-protocol is {p}: TLS to the brokers needs SSL or SASL_SSL",
                    given.join(", ")
                )));
            }
        }
        match (&self.sasl, p.sasl()) {
            (None, true) => {
                return Err(options(format!("--kafka-security-protocol {p} needs SASL credentials")));
            }
            (Some(_), false) => {
                return Err(options(format!("SASL credentials given, but --kafka-security-protocol is {p}")));
            }
            (Some(sasl), true) => {
                if sasl.username.is_empty() || sasl.username.contains('\0') {
                    return Err(options("--kafka-sasl-username must be non-empty and without NUL characters"));
                }
                if sasl.mechanism == SaslMechanism::Plain && !p.tls() {
                    return Err(options(
                        "--kafka-sasl-mechanism PLAIN sends the password as it is, which SASL_PLAINTEXT leaves readable \
                         on the network: use SASL_SSL, or a SCRAM mechanism",
                    ));
                }
            }
            (None, false) => {}
        }
        Ok(())
    }

    /// For logs: the protocol, and the SASL mechanism and user.
    pub fn describe(&self) -> String {
        match &self.sasl {
            Some(s) => format!("{}, {} as {}", self.protocol, s.mechanism, s.username),
            None if self.cert.is_some() => format!("{} with a client certificate", self.protocol),
            None => self.protocol.to_string(),
        }
    }

    /// librdkafka's settings for these (`security.protocol`, `ssl.*`, `sasl.*`).
    pub fn client_settings(&self) -> Vec<(&'static str, String)> {
        let mut settings = vec![("security.protocol", self.protocol.as_str().to_ascii_lowercase())];
        if self.protocol.tls() {
            // librdkafka's default since 2.0, said here so that no other default can turn the
            // check of the broker's name off.
            settings.push(("ssl.endpoint.identification.algorithm", "https".into()));
            let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.to_string_lossy().into_owned());
            settings.extend(path(&self.ca).map(|ca| ("ssl.ca.location", ca)));
            settings.extend(path(&self.cert).map(|c| ("ssl.certificate.location", c)));
            settings.extend(path(&self.key).map(|k| ("ssl.key.location", k)));
        }
        if let Some(s) = &self.sasl {
            settings.push(("sasl.mechanism", s.mechanism.as_str().into()));
            settings.push(("sasl.username", s.username.clone()));
            settings.push(("sasl.password", s.password.expose().into()));
        }
        settings
    }

    /// Adds [`BrokerSecurity::client_settings`] to a librdkafka client's configuration.
    pub fn apply<'a>(&self, config: &'a mut ClientConfig) -> &'a mut ClientConfig {
        for (key, value) in self.client_settings() {
            config.set(key, value);
        }
        config
    }

    /// The wire client's TLS configuration (rustls with ring, like the gRPC side's): the CA as
    /// the only roots, the client certificate if given. `None` without TLS. Reads and checks
    /// every file now, so a missing or unreadable one stops the adapter at start.
    pub fn rustls_config(&self) -> Result<Option<Arc<rustls::ClientConfig>>, SecurityError> {
        if !self.protocol.tls() {
            return Ok(None);
        }
        let ca = self.ca.as_ref().ok_or_else(|| options("TLS needs a CA file"))?;
        let roots = pledge_proto::tls::read_roots(ca).map_err(from_tls)?;
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| options(e.to_string()))?
            .with_root_certificates(roots);
        let config = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => builder
                .with_client_auth_cert(read_certs(cert)?, read_key(key)?)
                .map_err(|e| options(format!("{} with {}: {e}", cert.display(), key.display())))?,
            _ => builder.with_no_client_auth(),
        };
        Ok(Some(Arc::new(config)))
    }
}

/// Certificates and keys are read as the gRPC servers and clients read theirs.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, SecurityError> {
    pledge_proto::tls::read_certs(path).map_err(from_tls)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, SecurityError> {
    pledge_proto::tls::read_key(path).map_err(from_tls)
}

fn from_tls(e: pledge_proto::tls::TlsError) -> SecurityError {
    match e {
        pledge_proto::tls::TlsError::File { path, error } => SecurityError::File { path, error },
        other => options(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sasl_ssl(dir: &Path) -> SecurityOptions {
        let password = dir.join("password");
        std::fs::write(&password, "s3cret\n").unwrap();
        SecurityOptions {
            protocol: SecurityProtocol::SaslSsl,
            ca: Some(dir.join("ca.pem")),
            sasl_mechanism: Some(SaslMechanism::ScramSha512),
            sasl_username: Some("pledge".into()),
            sasl_password_file: Some(password),
            ..Default::default()
        }
    }

    fn refused(o: SecurityOptions) -> String {
        BrokerSecurity::from_options(o).expect_err("refused").to_string()
    }

    #[test]
    fn names_parse_in_any_case() {
        assert_eq!("sasl_ssl".parse(), Ok(SecurityProtocol::SaslSsl));
        assert_eq!("SSL".parse(), Ok(SecurityProtocol::Ssl));
        assert_eq!("scram-sha-512".parse(), Ok(SaslMechanism::ScramSha512));
        assert!("TLS".parse::<SecurityProtocol>().unwrap_err().contains("SASL_SSL"));
        assert!("GSSAPI".parse::<SaslMechanism>().unwrap_err().contains("SCRAM-SHA-256"));
    }

    #[test]
    fn a_complete_sasl_ssl_configuration_is_taken_and_its_password_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let security = BrokerSecurity::from_options(sasl_ssl(dir.path())).unwrap();
        let sasl = security.sasl.as_ref().unwrap();
        assert_eq!(sasl.password.expose(), "s3cret", "one trailing newline is not part of the password");
        assert!(!format!("{security:?}").contains("s3cret"));
        assert_eq!(security.describe(), "SASL_SSL, SCRAM-SHA-512 as pledge");
        let settings = security.client_settings();
        for expected in [
            ("security.protocol", "sasl_ssl"),
            ("sasl.mechanism", "SCRAM-SHA-512"),
            ("sasl.username", "pledge"),
            ("sasl.password", "s3cret"),
        ] {
            assert!(settings.iter().any(|(k, v)| (*k, v.as_str()) == expected), "{expected:?} in {settings:?}");
        }
        assert!(settings.iter().any(|(k, _)| *k == "ssl.ca.location"));
    }

    #[test]
    fn the_password_comes_from_one_place() {
        let dir = tempfile::tempdir().unwrap();
        let both = SecurityOptions { sasl_password_env: Some("x".into()), ..sasl_ssl(dir.path()) };
        assert!(refused(both).contains("given twice"));
        let none = SecurityOptions { sasl_password_file: None, ..sasl_ssl(dir.path()) };
        assert!(refused(none).contains(PASSWORD_ENV));
        let env =
            SecurityOptions { sasl_password_file: None, sasl_password_env: Some("e".into()), ..sasl_ssl(dir.path()) };
        assert_eq!(BrokerSecurity::from_options(env).unwrap().sasl.unwrap().password.expose(), "e");
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let o = SecurityOptions { sasl_password_file: Some(empty), ..sasl_ssl(dir.path()) };
        assert!(refused(o).contains("empty"));
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'x'; MAX_PASSWORD_FILE_BYTES as usize + 1]).unwrap();
        let o = SecurityOptions { sasl_password_file: Some(big), ..sasl_ssl(dir.path()) };
        assert!(refused(o).contains("longer than"));
        let missing = SecurityOptions { sasl_password_file: Some(dir.path().join("nope")), ..sasl_ssl(dir.path()) };
        assert!(refused(missing).contains("nope"));
    }

    #[test]
    fn bad_combinations_are_refused_with_the_option_to_fix() {
        let dir = tempfile::tempdir().unwrap();
        let o = || sasl_ssl(dir.path());
        assert!(refused(SecurityOptions { ca: None, ..o() }).contains("needs --kafka-ca"));
        assert!(refused(SecurityOptions { sasl_mechanism: None, ..o() }).contains("needs --kafka-sasl-mechanism"));
        assert!(refused(SecurityOptions { sasl_username: None, ..o() }).contains("needs --kafka-sasl-username"));
        assert!(refused(SecurityOptions { cert: Some("c.pem".into()), ..o() }).contains("go together"));
        let plain_text = SecurityOptions {
            protocol: SecurityProtocol::SaslPlaintext,
            ca: None,
            sasl_mechanism: Some(SaslMechanism::Plain),
            ..o()
        };
        assert!(refused(plain_text).contains("PLAIN sends the password"));
        let ssl_with_sasl = SecurityOptions { protocol: SecurityProtocol::Ssl, ..o() };
        let e = refused(ssl_with_sasl);
        assert!(e.contains("--kafka-sasl-mechanism") && e.contains("is SSL"), "{e}");
        let plaintext_with_ca = SecurityOptions { ca: Some("ca.pem".into()), ..Default::default() };
        assert!(refused(plaintext_with_ca).contains("--kafka-ca given, but --kafka-security-protocol is PLAINTEXT"));
        // SCRAM over SASL_PLAINTEXT never sends the password: allowed.
        let scram_clear =
            SecurityOptions { protocol: SecurityProtocol::SaslPlaintext, ca: None, ..sasl_ssl(dir.path()) };
        assert!(BrokerSecurity::from_options(scram_clear).is_ok());
        assert_eq!(BrokerSecurity::from_options(SecurityOptions::default()), Ok(BrokerSecurity::default()));
    }

    #[test]
    fn tls_files_are_read_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let security = BrokerSecurity::from_options(sasl_ssl(dir.path())).unwrap();
        let e = security.rustls_config().unwrap_err().to_string();
        assert!(e.contains("ca.pem"), "{e}");
        std::fs::write(dir.path().join("ca.pem"), "not a certificate").unwrap();
        let e = security.rustls_config().unwrap_err().to_string();
        assert!(e.contains("no PEM certificate"), "{e}");
        assert!(BrokerSecurity::default().rustls_config().unwrap().is_none());
    }
}
