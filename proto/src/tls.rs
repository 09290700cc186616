//! TLS on every gRPC hop (rustls with ring), server and client, mutual when asked.
//!
//! A server is given its certificate chain and key, and, for mutual TLS, the CA whose client
//! certificates it accepts ([`ServerTlsFiles`]); a client the CA it trusts, and its own
//! certificate and key when the server asks for one ([`ClientTlsFiles`]). Both re-read their
//! files on [`ServerTls::reload`] / [`ClientTls::reload`] (the binaries call them on SIGHUP:
//! [`reload_on_sighup`]): connections made after it use the new files, those open go on with
//! what they were made with, so rotating a certificate drops no call. A reload that fails
//! (a missing file, a key that does not match) keeps the old configuration and says why.
//!
//! TLS runs over TCP only: a Unix socket is protected by its file's permissions, and a server
//! or client configured with both is refused when it starts ([`check_listen`], [`Target`]).
//!
//! Handshakes are bounded: at most [`MAX_PENDING_HANDSHAKES`] at once per server, each within
//! [`HANDSHAKE_TIMEOUT`]. A refused one (no client certificate, one from another CA, an
//! expired one, a plaintext client) is logged and counted (`pledge_tls_handshake_failures_total`)
//! and never reaches a service.
//!
//! [`Target`]: crate::transport::Target

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::transport::ListenAddr;

/// Longest a TLS handshake may take, client or server side (a peer that stalls it is dropped).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most handshakes a server runs at once; past it, it accepts no connection until one ends.
pub const MAX_PENDING_HANDSHAKES: usize = 1024;
/// Longest certificate, key or CA file read, in bytes.
pub const MAX_PEM_FILE_BYTES: u64 = 1 << 20;
/// The counter of refused handshakes.
pub const HANDSHAKE_FAILURES: &str = "pledge_tls_handshake_failures_total";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {error}")]
    File { path: PathBuf, error: String },
    #[error("{0}")]
    Config(String),
}

fn file_error(path: &Path, error: impl std::fmt::Display) -> TlsError {
    TlsError::File { path: path.to_path_buf(), error: error.to_string() }
}

fn read_pem(path: &Path) -> Result<Vec<u8>, TlsError> {
    let len = std::fs::metadata(path).map_err(|e| file_error(path, e))?.len();
    if len > MAX_PEM_FILE_BYTES {
        return Err(file_error(path, format!("{len} bytes; a PEM file here is at most {MAX_PEM_FILE_BYTES} bytes")));
    }
    std::fs::read(path).map_err(|e| file_error(path, e))
}

/// The PEM certificates in the file at `path` (at least one; the file at most
/// [`MAX_PEM_FILE_BYTES`]).
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_pem(path)?;
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&pem).collect::<Result<_, _>>().map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no PEM certificate in it"));
    }
    Ok(certs)
}

/// The PEM private key in the file at `path`.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(&read_pem(path)?).map_err(|e| file_error(path, format!("no private key: {e}")))
}

/// The CA certificates in the file at `path`, as trust roots.
pub fn read_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path)? {
        roots.add(cert).map_err(|e| file_error(path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server's TLS files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsFiles {
    /// The server's certificate chain (PEM), its own certificate first.
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// Mutual TLS: the CA certificates (PEM) whose client certificates are accepted; every
    /// client must present one. `None`: any client may connect (authenticated otherwise, or not).
    pub client_ca: Option<PathBuf>,
}

impl ServerTlsFiles {
    /// From the `--tls-cert`, `--tls-key` and `--tls-client-ca` options: `None` when neither
    /// certificate nor key is given; an error when only one is, or a client CA without them.
    pub fn from_options(
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        client_ca: Option<PathBuf>,
    ) -> Result<Option<ServerTlsFiles>, TlsError> {
        match (cert, key) {
            (Some(cert), Some(key)) => Ok(Some(ServerTlsFiles { cert, key, client_ca })),
            (None, None) if client_ca.is_none() => Ok(None),
            (None, None) => Err(TlsError::Config("tls_client_ca needs tls_cert and tls_key".into())),
            _ => Err(TlsError::Config("tls_cert and tls_key go together".into())),
        }
    }
}

/// A server's TLS configuration, reloadable (see the module documentation).
#[derive(Clone)]
pub struct ServerTls {
    files: ServerTlsFiles,
    current: Arc<RwLock<Arc<ServerConfig>>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").field("files", &self.files).finish_non_exhaustive()
    }
}

impl ServerTls {
    pub fn load(files: ServerTlsFiles) -> Result<ServerTls, TlsError> {
        let config = Arc::new(server_config(&files)?);
        Ok(ServerTls { files, current: Arc::new(RwLock::new(config)) })
    }

    /// Reads the files again; connections accepted from now on use them. On error the
    /// configuration in use stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = Arc::new(server_config(&self.files)?);
        *self.current.write().expect("TLS configuration lock") = config;
        Ok(())
    }

    pub fn files(&self) -> &ServerTlsFiles {
        &self.files
    }

    /// Whether clients must present a certificate.
    pub fn mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }

    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.read().expect("TLS configuration lock").clone())
    }
}

fn server_config(files: &ServerTlsFiles) -> Result<ServerConfig, TlsError> {
    let certs = read_certs(&files.cert)?;
    let key = read_key(&files.key)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(read_roots(ca)?), provider())
                .build()
                .map_err(|e| file_error(ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(format!("{} with {}: {e}", files.cert.display(), files.key.display())))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// A client's TLS files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTlsFiles {
    /// The CA certificates (PEM) that server certificates must chain to.
    pub ca: PathBuf,
    /// The client's certificate chain and key (PEM), for servers that require mutual TLS.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl ClientTlsFiles {
    /// From `--tls-ca`, `--tls-cert` and `--tls-key` (or a config file's equivalents): `None`
    /// when none is given; an error when a certificate comes without its key (or the reverse),
    /// or either without a CA.
    pub fn from_options(
        ca: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
    ) -> Result<Option<ClientTlsFiles>, TlsError> {
        match (ca, cert.is_some() == key.is_some()) {
            (_, false) => Err(TlsError::Config("a client certificate and its key go together".into())),
            (Some(ca), true) => Ok(Some(ClientTlsFiles { ca, cert, key })),
            (None, true) if cert.is_none() => Ok(None),
            (None, true) => Err(TlsError::Config("a client certificate needs the CA of the servers (tls_ca)".into())),
        }
    }
}

/// A client's TLS configuration, reloadable (see the module documentation).
#[derive(Clone)]
pub struct ClientTls {
    files: ClientTlsFiles,
    current: Arc<RwLock<Arc<ClientConfig>>>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls").field("files", &self.files).finish_non_exhaustive()
    }
}

impl ClientTls {
    pub fn load(files: ClientTlsFiles) -> Result<ClientTls, TlsError> {
        let config = Arc::new(client_config(&files)?);
        Ok(ClientTls { files, current: Arc::new(RwLock::new(config)) })
    }

    /// Reads the files again; connections made from now on use them. On error the
    /// configuration in use stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = Arc::new(client_config(&self.files)?);
        *self.current.write().expect("TLS configuration lock") = config;
        Ok(())
    }

    /// A TLS connection to `host:port` (`host` also names the server for its certificate),
    /// TCP and handshake within [`HANDSHAKE_TIMEOUT`].
    pub(crate) async fn connect(
        &self,
        host: &str,
        port: u16,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let name = ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']').to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{host}: {e}")))?;
        let connector = TlsConnector::from(self.current.read().expect("TLS configuration lock").clone());
        let connect = async {
            let tcp = TcpStream::connect((host.trim_start_matches('[').trim_end_matches(']'), port)).await?;
            tcp.set_nodelay(true)?;
            connector.connect(name, tcp).await
        };
        tokio::time::timeout(HANDSHAKE_TIMEOUT, connect).await.unwrap_or_else(|_| {
            Err(io::Error::new(io::ErrorKind::TimedOut, format!("TLS connection to {host}:{port} timed out")))
        })
    }
}

fn client_config(files: &ClientTlsFiles) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(read_roots(&files.ca)?);
    let mut config = match (&files.cert, &files.key) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(read_certs(cert)?, read_key(key)?)
            .map_err(|e| TlsError::Config(format!("{} with {}: {e}", cert.display(), key.display())))?,
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Refuses TLS on a Unix socket (see the module documentation).
pub fn check_listen(listen: &ListenAddr, tls: Option<&ServerTls>) -> Result<(), TlsError> {
    match (listen, tls) {
        (ListenAddr::Unix(path), Some(_)) => Err(TlsError::Config(format!(
            "unix:{}: TLS runs over TCP only (a Unix socket is protected by its file's permissions)",
            path.display()
        ))),
        _ => Ok(()),
    }
}

/// Whether `listen` is reachable from other hosts (not loopback, not a Unix socket): serving
/// there without TLS deserves a warning.
pub fn exposed(listen: &ListenAddr) -> bool {
    matches!(listen, ListenAddr::Tcp(addr) if !addr.ip().is_loopback())
}

/// Re-reads every configuration in `server` and `clients`, and the principals of `auth`, on
/// each SIGHUP, logging the outcome.
pub fn reload_on_sighup(server: Option<ServerTls>, clients: Vec<ClientTls>, auth: Option<crate::auth::Auth>) {
    if server.is_none() && clients.is_empty() && auth.is_none() {
        return;
    }
    let mut hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => return tracing::error!(error = %e, "cannot watch SIGHUP: certificates will not be reloaded"),
    };
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            let mut failed = false;
            if let Some(s) = &server
                && let Err(e) = s.reload()
            {
                failed = true;
                tracing::error!(error = %e, "SIGHUP: server certificate not reloaded; the previous one stays in use");
            }
            for c in &clients {
                if let Err(e) = c.reload() {
                    failed = true;
                    tracing::error!(error = %e, "SIGHUP: client certificate not reloaded; the previous one stays in use");
                }
            }
            if let Some(a) = &auth
                && let Err(e) = a.reload()
            {
                failed = true;
                tracing::error!(error = %e, "SIGHUP: principals not reloaded; the previous ones stay in use");
            }
            if !failed {
                tracing::info!("SIGHUP: reloaded the TLS certificates and principals");
            }
        }
    });
}

/// What a call over TLS knows of its connection: the peer's address and, with mutual TLS, its
/// certificate chain (its own certificate first).
#[derive(Debug, Clone)]
pub struct TlsConnectInfo {
    pub tcp: TcpConnectInfo,
    pub peer_certs: Option<Arc<Vec<CertificateDer<'static>>>>,
}

/// The peer address of a call, over plain TCP or TLS.
pub fn remote_addr<T>(request: &tonic::Request<T>) -> Option<SocketAddr> {
    request.remote_addr().or_else(|| request.extensions().get::<TlsConnectInfo>()?.tcp.remote_addr())
}

/// A server's TLS connection, as tonic serves it.
pub struct TlsConnection(tokio_rustls::server::TlsStream<TcpStream>);

impl Connected for TlsConnection {
    type ConnectInfo = TlsConnectInfo;

    fn connect_info(&self) -> TlsConnectInfo {
        let (tcp, session) = self.0.get_ref();
        let peer_certs =
            session.peer_certificates().map(|certs| Arc::new(certs.iter().map(|c| c.clone().into_owned()).collect()));
        TlsConnectInfo { tcp: tcp.connect_info(), peer_certs }
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// The TLS connections accepted on `listener`: each TCP connection's handshake runs on a task
/// of its own (a slow peer holds up no other), bounded in number and time; the stream ends
/// when the server drops it.
pub(crate) fn incoming(
    listener: TcpListener,
    tls: ServerTls,
    keepalive: Duration,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<TlsConnection>> {
    let (tx, rx) = mpsc::channel(MAX_PENDING_HANDSHAKES);
    let permits = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
                _ = tx.closed() => return,
            };
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors, say: pause rather than spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            let _ = tcp.set_nodelay(true);
            let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(keepalive));
            let (acceptor, tx) = (tls.acceptor(), tx.clone());
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(TlsConnection(stream))).await;
                    }
                    Ok(Err(e)) => refused(peer, &e.to_string()),
                    Err(_) => refused(peer, "the handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

fn refused(peer: SocketAddr, why: &str) {
    metrics::counter!(HANDSHAKE_FAILURES).increment(1);
    tracing::info!(%peer, error = why, "TLS handshake refused");
}
