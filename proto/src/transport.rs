//! Where Pledge's gRPC servers listen and how its clients reach them: TCP, or a Unix domain
//! socket for processes on one host (a coordinator beside its adapters, an adapter beside its
//! application). A Unix socket skips the TCP stack: on the benchmark machine a small round
//! trip costs about half the CPU time it costs over loopback TCP.
//!
//! Addresses follow gRPC's naming: a listen address is `host:port` or `unix:<path>`, and a
//! target (what a client dials) is `http://host:port` or `unix:<path>`, where `unix:///abs`
//! and `unix:/abs` name the same absolute path.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tonic::transport::server::{Router, TcpIncoming};
use tonic::transport::{Channel, Endpoint, Uri};

use tower::layer::util::{Identity, Stack};

use crate::auth::{Auth, AuthLayer};
use crate::telemetry::TraceLayer;
use crate::tls::{ClientTls, ServerTls};

/// Longest Unix socket path Linux accepts (`sun_path` holds 108 bytes with the terminating NUL).
pub const MAX_UNIX_PATH_BYTES: usize = 107;

#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    #[error("'{0}': expected host:port or unix:<path>")]
    BadListen(String),
    #[error("'{0}': expected http://host:port, https://host:port or unix:<path>")]
    BadTarget(String),
    #[error("'{path}': a Unix socket path is at most {MAX_UNIX_PATH_BYTES} bytes, this one is {len}")]
    PathTooLong { path: String, len: usize },
    #[error("'{0}': TLS is configured for this client, so the target must be https://host:port")]
    TlsRequired(String),
    #[error("'{0}': an https:// target needs the CA of its server (tls_ca)")]
    TlsNotConfigured(String),
}

/// The path of a `unix:` address, if `address` is one; `bad` names the error for a malformed one.
fn unix_path(address: &str, bad: fn(String) -> AddressError) -> Option<Result<PathBuf, AddressError>> {
    let rest = address.strip_prefix("unix:")?;
    // unix:///abs (URI form with an empty authority) and unix:/abs both mean /abs.
    let path = rest.strip_prefix("//").unwrap_or(rest);
    Some(if path.is_empty() || path.contains('\0') {
        Err(bad(address.to_string()))
    } else if path.len() > MAX_UNIX_PATH_BYTES {
        Err(AddressError::PathTooLong { path: path.to_string(), len: path.len() })
    } else {
        Ok(PathBuf::from(path))
    })
}

/// Where a server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::str::FromStr for ListenAddr {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match unix_path(s, AddressError::BadListen) {
            Some(path) => path.map(ListenAddr::Unix),
            None => s.parse().map(ListenAddr::Tcp).map_err(|_| AddressError::BadListen(s.to_string())),
        }
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => write!(f, "{addr}"),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// A bound listening socket.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    /// The socket and its path, removed when the server stops.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Binds `addr`. A Unix socket file left behind by a server that is gone (nobody accepts
    /// on it) is replaced; one a live server answers on is an error, as a TCP port in use is.
    pub async fn bind(addr: &ListenAddr) -> std::io::Result<Listener> {
        match addr {
            ListenAddr::Tcp(addr) => Ok(Listener::Tcp(TcpListener::bind(addr).await?)),
            ListenAddr::Unix(path) => {
                use std::os::unix::fs::FileTypeExt;
                if let Ok(meta) = std::fs::symlink_metadata(path)
                    && meta.file_type().is_socket()
                    && UnixStream::connect(path).await.is_err()
                {
                    std::fs::remove_file(path)?;
                }
                Ok(Listener::Unix(UnixListener::bind(path)?, path.clone()))
            }
        }
    }

    /// The bound address: `127.0.0.1:7600` (the port picked, for port 0) or `unix:/path`.
    pub fn local_addr(&self) -> std::io::Result<ListenAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().map(ListenAddr::Tcp),
            Listener::Unix(_, path) => Ok(ListenAddr::Unix(path.clone())),
        }
    }

    /// Serves `router` on this socket until `signal` resolves, then removes a Unix socket's
    /// file. Every accepted TCP connection gets TCP_NODELAY: without it a small reply waits for
    /// the peer's delayed ACK (40 ms on Linux); `Server::tcp_nodelay` covers only sockets tonic
    /// binds itself.
    ///
    /// With `tls`, every connection is TLS ([`crate::tls`]; TCP only: see
    /// [`crate::tls::check_listen`]).
    pub async fn serve(
        self,
        router: Routes,
        signal: impl Future<Output = ()> + Send,
        tls: Option<ServerTls>,
    ) -> Result<(), tonic::transport::Error> {
        match (self, tls) {
            (Listener::Tcp(l), None) => {
                let incoming = TcpIncoming::from(l).with_nodelay(Some(true)).with_keepalive(Some(KEEPALIVE_INTERVAL));
                router.serve_with_incoming_shutdown(incoming, signal).await
            }
            (Listener::Tcp(l), Some(tls)) => {
                router.serve_with_incoming_shutdown(crate::tls::incoming(l, tls, KEEPALIVE_INTERVAL), signal).await
            }
            (Listener::Unix(l, path), tls) => {
                assert!(tls.is_none(), "TLS on a Unix socket is refused at start (tls::check_listen)");
                let _remove = RemoveOnDrop(path);
                router.serve_with_incoming_shutdown(tokio_stream::wrappers::UnixListenerStream::new(l), signal).await
            }
        }
    }
}

/// Most concurrent calls (HTTP/2 streams) on one client connection; a client opening more
/// waits for one to finish (HTTP/2 flow control), so one connection cannot pile up unbounded
/// work. Pipelines multiplex many calls on one stream and bound those themselves.
pub const MAX_CONCURRENT_STREAMS: u32 = 1024;
/// HTTP/2 pings on an idle connection: a peer that vanished without closing (host gone,
/// network cut) is noticed within interval + timeout and its calls and streams end.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The gRPC server builder every Pledge server uses: bounded concurrent calls per connection,
/// and keepalive pings that end the connections (and the calls and pipeline streams on them)
/// of peers that are gone.
///
/// Every call goes through `auth` (see [`crate::auth`]; `None`: every call is taken), inside
/// the call's trace span ([`crate::telemetry::TraceLayer`], outermost so that a refused call is
/// traced too; with trace export off it passes calls through).
pub fn server(auth: Option<Auth>) -> tonic::transport::Server<ServerLayers> {
    tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .layer(TraceLayer)
        .layer(AuthLayer(auth))
}

/// The layers every Pledge server runs its calls through (the first added is the outermost).
pub type ServerLayers = Stack<AuthLayer, Stack<TraceLayer, Identity>>;

/// The services of a Pledge server, as [`server`] builds them.
pub type Routes = Router<ServerLayers>;

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// What a client dials: an HTTP/2 endpoint (`http://host:port`, `https://...`) or a Unix
/// socket (`unix:<path>`).
#[derive(Debug, Clone)]
pub struct Target {
    endpoint: Endpoint,
    unix: Option<PathBuf>,
    /// `https://` targets: the TLS the connections are made with, and the host and port.
    tls: Option<(ClientTls, String, u16)>,
}

impl Target {
    pub fn parse(target: &str) -> Result<Target, AddressError> {
        let bad = || AddressError::BadTarget(target.to_string());
        match unix_path(target, AddressError::BadTarget) {
            Some(path) => {
                // The URI only names the :authority tonic sends; the connector ignores it.
                let endpoint = Endpoint::from_static("http://localhost");
                Ok(Target { endpoint, unix: Some(path?), tls: None })
            }
            None => {
                let uri: Uri = target.parse().map_err(|_| bad())?;
                if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
                    return Err(bad());
                }
                Ok(Target { endpoint: Endpoint::from(uri), unix: None, tls: None })
            }
        }
    }

    /// `target` made with `tls` (`None`: plaintext). An `https://` target needs TLS, and TLS an
    /// `https://` target: a client configured for TLS never falls back to plaintext over TCP. A
    /// `unix:` target is plaintext either way (its file's permissions protect it).
    pub fn parse_with(target: &str, tls: Option<&ClientTls>) -> Result<Target, AddressError> {
        let mut t = Target::parse(target)?;
        if t.unix.is_some() {
            return Ok(t);
        }
        let https = t.endpoint.uri().scheme_str() == Some("https");
        match (tls, https) {
            (Some(tls), true) => {
                let uri = t.endpoint.uri();
                let host = uri.host().expect("checked by parse").to_string();
                let port = uri.port_u16().unwrap_or(443);
                t.tls = Some((tls.clone(), host, port));
                Ok(t)
            }
            (None, false) => Ok(t),
            (Some(_), false) => Err(AddressError::TlsRequired(target.to_string())),
            (None, true) => Err(AddressError::TlsNotConfigured(target.to_string())),
        }
    }

    /// The Unix socket's path, for a `unix:` target.
    pub fn unix_path(&self) -> Option<&Path> {
        self.unix.as_deref()
    }

    /// The port of an http(s) target, when it names one.
    pub fn port(&self) -> Option<u16> {
        self.unix.is_none().then(|| self.endpoint.uri().port_u16()).flatten()
    }

    /// Adjusts the endpoint's settings (timeouts, keep-alive, window sizes, ...).
    pub fn configure(mut self, f: impl FnOnce(Endpoint) -> Endpoint) -> Target {
        self.endpoint = f(self.endpoint);
        self
    }

    /// A channel that connects on first use and reconnects after a failure.
    pub fn connect_lazy(&self) -> Channel {
        match (&self.unix, &self.tls) {
            (Some(path), _) => self.endpoint.connect_with_connector_lazy(unix_connector(path.clone())),
            (None, Some(tls)) => self.endpoint.connect_with_connector_lazy(tls_connector(tls.clone())),
            (None, None) => self.endpoint.connect_lazy(),
        }
    }

    /// A channel connected now (an error if nobody answers).
    pub async fn connect(&self) -> Result<Channel, tonic::transport::Error> {
        match (&self.unix, &self.tls) {
            (Some(path), _) => self.endpoint.connect_with_connector(unix_connector(path.clone())).await,
            (None, Some(tls)) => self.endpoint.connect_with_connector(tls_connector(tls.clone())).await,
            (None, None) => self.endpoint.connect().await,
        }
    }
}

/// Connections over TLS, with the configuration as last loaded (a certificate reloaded on
/// SIGHUP serves the next connection).
fn tls_connector(
    (tls, host, port): (ClientTls, String, u16),
) -> impl tower::Service<
    Uri,
    Response = TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    Error = std::io::Error,
    Future = impl Future<Output = std::io::Result<TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>>> + Send,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |_: Uri| {
        let (tls, host) = (tls.clone(), host.clone());
        async move { tls.connect(&host, port).await.map(TokioIo::new) }
    })
}

fn unix_connector(
    path: PathBuf,
) -> impl tower::Service<
    Uri,
    Response = TokioIo<UnixStream>,
    Error = std::io::Error,
    Future = impl Future<Output = std::io::Result<TokioIo<UnixStream>>> + Send,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |_: Uri| {
        let path = path.clone();
        async move { UnixStream::connect(path).await.map(TokioIo::new) }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        assert_eq!("127.0.0.1:7600".parse::<ListenAddr>().unwrap(), ListenAddr::Tcp("127.0.0.1:7600".parse().unwrap()));
        assert_eq!("unix:/run/p.sock".parse::<ListenAddr>().unwrap(), ListenAddr::Unix("/run/p.sock".into()));
        assert_eq!("unix:///run/p.sock".parse::<ListenAddr>().unwrap(), ListenAddr::Unix("/run/p.sock".into()));
        assert_eq!("unix:p.sock".parse::<ListenAddr>().unwrap(), ListenAddr::Unix("p.sock".into()));
        assert_eq!(ListenAddr::Unix("/run/p.sock".into()).to_string(), "unix:/run/p.sock");
        for bad in ["", "localhost", "unix:", "http://127.0.0.1:1"] {
            assert!(matches!(bad.parse::<ListenAddr>(), Err(AddressError::BadListen(_))), "{bad}");
        }
        let long = format!("unix:/{}", "x".repeat(MAX_UNIX_PATH_BYTES));
        assert!(matches!(long.parse::<ListenAddr>(), Err(AddressError::PathTooLong { len: 108, .. })));
    }

    #[test]
    fn targets() {
        assert_eq!(Target::parse("unix:///run/p.sock").unwrap().unix_path(), Some(Path::new("/run/p.sock")));
        assert_eq!(Target::parse("http://127.0.0.1:7600").unwrap().unix_path(), None);
        assert_eq!(Target::parse("http://127.0.0.1:7600").unwrap().port(), Some(7600));
        assert_eq!(Target::parse("unix:/run/p.sock").unwrap().port(), None);
        assert!(Target::parse("https://coordinator.internal:7600").is_ok());
        for bad in ["127.0.0.1:7600", "ftp://host:1", "http://", "unix:", "not a uri"] {
            assert!(matches!(Target::parse(bad), Err(AddressError::BadTarget(_))), "{bad}");
        }
    }

    /// A server on a Unix socket answers a client dialing `unix:<path>`; a second bind of a live
    /// socket fails, a stale socket file is replaced, and the file is gone after shutdown.
    #[tokio::test]
    async fn serves_and_dials_a_unix_socket() {
        let dir = std::env::temp_dir().join(format!("pledge-transport-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.sock");
        let addr = ListenAddr::Unix(path.clone());
        // A stale file from a server that died without removing it.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());

        let listener = Listener::bind(&addr).await.expect("a stale socket file is replaced");
        assert_eq!(listener.local_addr().unwrap(), addr);
        let (_reporter, health) = tonic_health::server::health_reporter();
        let stop = tokio_util::sync::CancellationToken::new();
        let router = server(None).add_service(health);
        let server = tokio::spawn(listener.serve(router, stop.clone().cancelled_owned(), None));

        let err = Listener::bind(&addr).await.expect_err("a live socket is not taken over");
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);

        let channel = Target::parse(&format!("unix:{}", path.display())).unwrap().connect().await.unwrap();
        let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
        let status = client.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap();
        assert_eq!(status.get_ref().status(), tonic_health::pb::health_check_response::ServingStatus::Serving);

        stop.cancel();
        server.await.unwrap().unwrap();
        assert!(!path.exists(), "the socket file is removed at shutdown");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
