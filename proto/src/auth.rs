//! Who may call what: every call to a Pledge server is authenticated (a bearer token, or the
//! client certificate of a mutual-TLS connection) and authorized by the caller's role.
//!
//! The principals are listed in a TOML file (`--auth-file`), reloaded on SIGHUP with the TLS
//! certificates ([`Auth::reload`]):
//!
//! ```toml
//! [[principal]]
//! name = "orders-service"
//! role = "application"
//! token_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"  # of its token
//!
//! [[principal]]
//! name = "coordinator"
//! role = "coordinator"
//! cert_cn = "coordinator"            # the subject CN of its client certificate
//! ```
//!
//! Tokens are kept as SHA-256 digests only (`printf %s "$TOKEN" | sha256sum`); a call carries
//! one as `authorization: Bearer <token>`. A token, when a call has one, decides: an unknown one
//! is refused even on a connection with a known certificate.
//!
//! Roles ([`Role`], [`allowed`]): an **application** begins, enlists, commits, aborts and reads
//! transactions, and does work at participants; an **operator** does everything on the
//! coordinator (list, resolve, register participants) and at participants' work APIs; a
//! **coordinator** (another instance, or the coordinator calling a participant) is the only
//! caller of the Participant service. Health checks need no credentials (probes). A call without
//! valid credentials is UNAUTHENTICATED, one its role may not make PERMISSION_DENIED; both are
//! logged and counted (`pledge_auth_refusals_total{code}`). Without `--auth-file` a server
//! takes every call, as before (plaintext on loopback stays the embedded default).

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use tonic::Status;

use crate::tls::TlsConnectInfo;

/// Longest principals file read, in bytes.
pub const MAX_AUTH_FILE_BYTES: u64 = 1 << 20;
/// Most principals in one file.
pub const MAX_PRINCIPALS: usize = 10_000;
pub const AUTH_REFUSALS: &str = "pledge_auth_refusals_total";

/// What a principal may do (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Application,
    Operator,
    Coordinator,
}

/// An authenticated caller, put in each call's extensions for the services to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub name: Arc<str>,
    pub role: Role,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{path}: {error}")]
    File { path: PathBuf, error: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthFile {
    #[serde(default)]
    principal: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    role: Role,
    token_sha256: Option<String>,
    cert_cn: Option<String>,
}

/// The principals by credential.
#[derive(Default)]
struct Table {
    tokens: HashMap<[u8; 32], Principal>,
    names: HashMap<String, Principal>,
}

fn read_table(path: &Path) -> Result<Table, AuthError> {
    let fail = |error: String| AuthError::File { path: path.to_path_buf(), error };
    let len = std::fs::metadata(path).map_err(|e| fail(e.to_string()))?.len();
    if len > MAX_AUTH_FILE_BYTES {
        return Err(fail(format!("{len} bytes; at most {MAX_AUTH_FILE_BYTES}")));
    }
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    let file: AuthFile = toml::from_str(&text).map_err(|e| fail(e.to_string()))?;
    if file.principal.len() > MAX_PRINCIPALS {
        return Err(fail(format!("{} principals; at most {MAX_PRINCIPALS}", file.principal.len())));
    }
    let mut table = Table::default();
    let mut roles = HashMap::new();
    for (i, e) in file.principal.into_iter().enumerate() {
        let what = format!("principal {} ({:?})", i + 1, e.name);
        if e.name.is_empty() || e.token_sha256.is_none() && e.cert_cn.is_none() {
            return Err(fail(format!("{what}: needs a name and a token_sha256 or a cert_cn")));
        }
        if !valid_name(&e.name) {
            return Err(fail(format!(
                "{what}: a name is 1 to {MAX_PRINCIPAL_NAME_BYTES} bytes of A-Z a-z 0-9 . _ : @ - (it travels in \
                 request metadata between cluster instances and is recorded as transactions' owner)"
            )));
        }
        // The name is the identity (transactions are owned by name): one name, one role.
        match roles.insert(e.name.clone(), e.role) {
            Some(role) if role != e.role => {
                return Err(fail(format!("{what}: the name is given the roles {role:?} and {:?}", e.role)));
            }
            _ => {}
        }
        let principal = Principal { name: e.name.as_str().into(), role: e.role };
        if let Some(hex) = &e.token_sha256 {
            let digest = parse_digest(hex).ok_or_else(|| fail(format!("{what}: token_sha256 is not 64 hex digits")))?;
            if digest == EMPTY_TOKEN_SHA256 {
                return Err(fail(format!(
                    "{what}: token_sha256 is the digest of an empty token (was the token's variable unset?)"
                )));
            }
            if table.tokens.insert(digest, principal.clone()).is_some() {
                return Err(fail(format!("{what}: the same token as another principal")));
            }
        }
        if let Some(cn) = e.cert_cn
            && table.names.insert(cn.clone(), principal).is_some()
        {
            return Err(fail(format!("{what}: cert_cn {cn:?} names another principal too")));
        }
    }
    Ok(table)
}

/// Longest principal name.
pub const MAX_PRINCIPAL_NAME_BYTES: usize = 128;

/// SHA-256 of the empty string: never a token.
const EMPTY_TOKEN_SHA256: [u8; 32] = [
    0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24, 0x27, 0xae, 0x41,
    0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
];

/// A principal name: printable ASCII without spaces or quotes, so it survives request
/// metadata unchanged (a forwarded caller's name must arrive as it left).
pub fn valid_name(name: &str) -> bool {
    (1..=MAX_PRINCIPAL_NAME_BYTES).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:@-".contains(&b))
}

fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The principals of a server, reloadable.
#[derive(Clone)]
pub struct Auth {
    path: PathBuf,
    table: Arc<RwLock<Arc<Table>>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth").field("path", &self.path).finish_non_exhaustive()
    }
}

impl Auth {
    pub fn load(path: &Path) -> Result<Auth, AuthError> {
        let table = Arc::new(read_table(path)?);
        Ok(Auth { path: path.to_path_buf(), table: Arc::new(RwLock::new(table)) })
    }

    /// Reads the file again; calls from now on are checked against it. On error the principals
    /// in use stay.
    pub fn reload(&self) -> Result<(), AuthError> {
        let table = Arc::new(read_table(&self.path)?);
        *self.table.write().expect("principals lock") = table;
        Ok(())
    }

    /// The caller of a request with `headers`, over `tls` (if TLS).
    fn authenticate(&self, headers: &http::HeaderMap, tls: Option<&TlsConnectInfo>) -> Result<Principal, Status> {
        let table = self.table.read().expect("principals lock").clone();
        if let Some(value) = headers.get(http::header::AUTHORIZATION) {
            let token = value
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer "))
                .ok_or_else(|| Status::unauthenticated("the authorization header is not \"Bearer <token>\""))?;
            let token = token.trim();
            if token.is_empty() {
                return Err(Status::unauthenticated("the bearer token is empty"));
            }
            let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
            return table.tokens.get(&digest).cloned().ok_or_else(|| Status::unauthenticated("unknown token"));
        }
        let cert = tls.and_then(|t| t.peer_certs.as_ref()).and_then(|c| c.first());
        let Some(cert) = cert else {
            return Err(Status::unauthenticated("no credentials: send a bearer token or a client certificate"));
        };
        let cn = common_name(cert)
            .ok_or_else(|| Status::unauthenticated("the client certificate has no subject common name"))?;
        table
            .names
            .get(&cn)
            .cloned()
            .ok_or_else(|| Status::unauthenticated(format!("no principal has the certificate name {cn:?}")))
    }
}

/// The subject common name of a DER certificate.
fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    Some(cn)
}

/// The roles that may call the gRPC method at `path` (`/package.Service/Method`).
pub fn allowed(path: &str) -> &'static [Role] {
    const APP: &[Role] = &[Role::Application, Role::Operator, Role::Coordinator];
    const OPS: &[Role] = &[Role::Operator, Role::Coordinator];
    const COORDINATOR: &[Role] = &[Role::Coordinator];
    const WORK: &[Role] = &[Role::Application, Role::Operator];
    let (service, method) = path.trim_start_matches('/').split_once('/').unwrap_or((path, ""));
    match service {
        "pledge.v1.Coordinator" => match method {
            "Begin" | "Enlist" | "Commit" | "Abort" | "Get" | "Pipeline" => APP,
            _ => OPS,
        },
        "pledge.v1.Participant" => COORDINATOR,
        "pledge.v1.ReferenceStore" | "pledge.v1.PostgresBranch" | "pledge.v1.MysqlBranch" | "pledge.v1.KafkaBranch" => {
            WORK
        }
        // Reflection, and whatever else: operators.
        _ => &[Role::Operator],
    }
}

/// Health checks: answered without credentials (container and load-balancer probes).
fn public(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/")
}

fn refuse<B: Default>(status: Status, path: &str, who: Option<&Principal>) -> http::Response<B> {
    metrics::counter!(AUTH_REFUSALS, "code" => format!("{:?}", status.code())).increment(1);
    tracing::info!(method = path, caller = who.map(|p| &*p.name), code = ?status.code(), reason = status.message(),
        "call refused");
    status.into_http()
}

/// The tower layer every Pledge server runs its services behind: checks each call (see the
/// module documentation), or lets every call through when `None`.
#[derive(Clone, Default)]
pub struct AuthLayer(pub Option<Auth>);

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService { inner, auth: self.0.clone() }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    auth: Option<Auth>,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for AuthService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        let Some(auth) = &self.auth else {
            return Box::pin(self.inner.call(request));
        };
        let path = request.uri().path().to_string();
        if public(&path) {
            return Box::pin(self.inner.call(request));
        }
        let tls = request.extensions().get::<TlsConnectInfo>();
        match auth.authenticate(request.headers(), tls) {
            Err(status) => {
                let response = refuse(status, &path, None);
                Box::pin(async move { Ok(response) })
            }
            Ok(who) if !allowed(&path).contains(&who.role) => {
                let status = Status::permission_denied(format!("{} ({:?}) may not call {path}", who.name, who.role));
                let response = refuse(status, &path, Some(&who));
                Box::pin(async move { Ok(response) })
            }
            Ok(who) => {
                request.extensions_mut().insert(who);
                Box::pin(self.inner.call(request))
            }
        }
    }
}

/// The caller of a request, when the server authenticates calls.
pub fn principal<T>(request: &tonic::Request<T>) -> Option<&Principal> {
    request.extensions().get::<Principal>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_by_role() {
        assert_eq!(allowed("/pledge.v1.Coordinator/Commit"), &[Role::Application, Role::Operator, Role::Coordinator]);
        assert_eq!(allowed("/pledge.v1.Coordinator/Resolve"), &[Role::Operator, Role::Coordinator]);
        assert_eq!(allowed("/pledge.v1.Coordinator/List"), &[Role::Operator, Role::Coordinator]);
        assert_eq!(allowed("/pledge.v1.Participant/Prepare"), &[Role::Coordinator]);
        assert_eq!(allowed("/pledge.v1.ReferenceStore/Put"), &[Role::Application, Role::Operator]);
        assert_eq!(allowed("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"), &[Role::Operator]);
        assert!(public("/grpc.health.v1.Health/Check"));
    }

    #[test]
    fn principals_file_is_checked() {
        let dir = std::env::temp_dir().join(format!("pledge-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("auth.toml");
        let digest = format!("{:x}", Sha256::digest(b"s3cret"));
        std::fs::write(
            &path,
            format!(
                "[[principal]]\nname = \"app\"\nrole = \"application\"\ntoken_sha256 = \"{digest}\"\n\n\
                 [[principal]]\nname = \"c\"\nrole = \"coordinator\"\ncert_cn = \"coordinator\"\n"
            ),
        )
        .unwrap();
        let auth = Auth::load(&path).unwrap();
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::AUTHORIZATION, "Bearer s3cret".parse().unwrap());
        let who = auth.authenticate(&headers, None).unwrap();
        assert_eq!((&*who.name, who.role), ("app", Role::Application));
        headers.insert(http::header::AUTHORIZATION, "Bearer wrong".parse().unwrap());
        assert_eq!(auth.authenticate(&headers, None).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert_eq!(auth.authenticate(&http::HeaderMap::new(), None).unwrap_err().code(), tonic::Code::Unauthenticated);
        for bad in [
            "[[principal]]\nname = \"x\"\nrole = \"application\"\n",
            "[[principal]]\nname = \"x\"\nrole = \"root\"\ncert_cn = \"x\"\n",
            "[[principal]]\nname = \"x\"\nrole = \"application\"\ntoken_sha256 = \"abc\"\n",
            "[[principal]]\nname = \"x\"\nrole = \"application\"\ncert_cn = \"x\"\nextra = 1\n",
            // The digest of an empty token (`printf %s "$UNSET" | sha256sum`).
            "[[principal]]\nname = \"x\"\nrole = \"operator\"\n\
             token_sha256 = \"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\"\n",
            // Names that would not survive request metadata.
            "[[principal]]\nname = \"zahlungsdienst-\u{fc}\"\nrole = \"application\"\ncert_cn = \"x\"\n",
            "[[principal]]\nname = \"two words\"\nrole = \"application\"\ncert_cn = \"x\"\n",
            // One name, two roles.
            "[[principal]]\nname = \"x\"\nrole = \"application\"\ncert_cn = \"x\"\n\n\
             [[principal]]\nname = \"x\"\nrole = \"operator\"\ncert_cn = \"y\"\n",
        ] {
            std::fs::write(&path, bad).unwrap();
            assert!(auth.reload().is_err(), "{bad}");
        }
        // A failed reload keeps the principals in use.
        headers.insert(http::header::AUTHORIZATION, "Bearer s3cret".parse().unwrap());
        assert!(auth.authenticate(&headers, None).is_ok());
        headers.insert(http::header::AUTHORIZATION, "Bearer ".parse().unwrap());
        assert_eq!(auth.authenticate(&headers, None).unwrap_err().message(), "the bearer token is empty");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
