//! A minimal client for the three Kafka requests librdkafka does not expose: FindCoordinator
//! (of a transactional id), DescribeTransactions and EndTxn. Messages are encoded by the
//! `kafka-protocol` crate; this module only frames them (4-byte length, request header, body)
//! over TCP, one request at a time per connection, every step bounded by a timeout.
//!
//! Security, as [`BrokerSecurity`] says (the same settings librdkafka gets): TLS with rustls
//! (the brokers' certificates checked against the configured CA and the address dialled, a
//! client certificate if given), then SASL — SaslHandshake v1, then SaslAuthenticate v2 carrying
//! SCRAM ([`crate::scram`], whose server signature is verified before the connection is used)
//! or PLAIN. A connection is opened (TCP, TLS handshake, SASL exchange) within one timeout.
//! [`TxnClient::check_brokers`] does it once at start, so a CA that did not sign the broker or
//! a refused login stops the adapter with the reason instead of failing every branch later.
//!
//! Why not librdkafka: it cannot resume a transaction after its producer is gone, and calling
//! InitProducerId for the transactional id (what `init_transactions` does) would abort the
//! open transaction. Finishing a prepared branch after a restart means sending EndTxn with the
//! producer id and epoch recorded at prepare, to the transaction coordinator.
//!
//! Versions: FindCoordinator v1 (key type 1 = transaction), EndTxn v1 (pre-KIP-890 rules, the
//! ones librdkafka's transactions follow), DescribeTransactions v0.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, ApiVersionsResponse, DescribeTransactionsRequest, DescribeTransactionsResponse,
    EndTxnRequest, EndTxnResponse, FindCoordinatorRequest, FindCoordinatorResponse, ProducerId, RequestHeader,
    ResponseHeader, SaslAuthenticateRequest, SaslAuthenticateResponse, SaslHandshakeRequest, SaslHandshakeResponse,
    TransactionalId,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::scram::{ScramClient, ScramHash};
use crate::security::{BrokerSecurity, SaslCredentials, SaslMechanism, SecurityError};

/// Largest response accepted, in bytes.
const MAX_RESPONSE_BYTES: usize = 16 << 20;
/// Largest SASL token accepted from a broker, in bytes (SCRAM's are a few hundred).
const MAX_SASL_BYTES: usize = crate::scram::MAX_MESSAGE_BYTES;

const FIND_COORDINATOR_VERSION: i16 = 1;
const END_TXN_VERSION: i16 = 1;
const DESCRIBE_TRANSACTIONS_VERSION: i16 = 0;
/// v1: the SASL exchange that follows is made of SaslAuthenticate requests (v0's raw tokens are
/// gone from Kafka 4).
const SASL_HANDSHAKE_VERSION: i16 = 1;
const SASL_AUTHENTICATE_VERSION: i16 = 2;
const API_VERSIONS_VERSION: i16 = 3;

/// Kafka error codes this adapter acts on.
pub mod code {
    pub const NONE: i16 = 0;
    pub const COORDINATOR_LOAD_IN_PROGRESS: i16 = 14;
    pub const COORDINATOR_NOT_AVAILABLE: i16 = 15;
    pub const NOT_COORDINATOR: i16 = 16;
    pub const UNSUPPORTED_SASL_MECHANISM: i16 = 33;
    pub const INVALID_PRODUCER_EPOCH: i16 = 47;
    pub const INVALID_TXN_STATE: i16 = 48;
    pub const INVALID_PRODUCER_ID_MAPPING: i16 = 49;
    pub const CONCURRENT_TRANSACTIONS: i16 = 51;
    pub const TRANSACTIONAL_ID_NOT_FOUND: i16 = 105;
    pub const PRODUCER_FENCED: i16 = 90;

    /// Worth asking again (after finding the coordinator anew).
    pub fn retriable(code: i16) -> bool {
        matches!(
            code,
            COORDINATOR_LOAD_IN_PROGRESS | COORDINATOR_NOT_AVAILABLE | NOT_COORDINATOR | CONCURRENT_TRANSACTIONS
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("I/O with {addr}: {source}")]
    Io { addr: String, source: std::io::Error },
    /// The TLS session failed: the broker's certificate was not accepted (or ours was not), or
    /// what answered does not speak TLS. A configuration problem, not a passing one.
    #[error("TLS with {addr}: {error}")]
    Tls { addr: String, error: String },
    /// The SASL login failed, or the broker could not prove it knows the credentials.
    #[error("{addr} refused the SASL {mechanism} login as {username:?}: {message}")]
    Auth { addr: String, mechanism: SaslMechanism, username: String, message: String },
    #[error("{addr} did not answer within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("Kafka error {code} from {what}{}", message.as_deref().map(|m| format!(": {m}")).unwrap_or_default())]
    Kafka { what: &'static str, code: i16, message: Option<String> },
}

impl WireError {
    /// The brokers refuse this client as configured (TLS or SASL): trying again will not help.
    pub fn is_refusal(&self) -> bool {
        matches!(self, WireError::Tls { .. } | WireError::Auth { .. })
    }
}

/// An I/O error on `addr`: one that rustls raised (a certificate refused, an alert from the
/// broker) is a [`WireError::Tls`].
fn io_error(addr: &str, source: std::io::Error) -> WireError {
    use tokio_rustls::rustls::{AlertDescription, Error};
    let Some(e) = source.get_ref().and_then(|e| e.downcast_ref::<Error>()) else {
        return WireError::Io { addr: addr.into(), source };
    };
    let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
    let hint = match e {
        Error::InvalidCertificate(_) => format!(
            " (is the CA file the one that signed the broker's certificate, and does that certificate name {host}?)"
        ),
        Error::AlertReceived(
            AlertDescription::BadCertificate | AlertDescription::CertificateRequired | AlertDescription::UnknownCA,
        ) => " (the listener wants a client certificate it accepts: --kafka-cert and --kafka-key)".into(),
        _ => String::new(),
    };
    WireError::Tls { addr: addr.into(), error: format!("{e}{hint}") }
}

/// How the wire client reaches brokers: TLS (its rustls configuration) and SASL, as
/// [`BrokerSecurity`] says.
struct WireSecurity {
    tls: Option<TlsConnector>,
    sasl: Option<SaslCredentials>,
}

/// A connection's byte stream: TCP, or TLS over TCP.
trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// What the transaction coordinator knows of a transactional id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnDescription {
    /// Empty, Ongoing, PrepareCommit, PrepareAbort, CompleteCommit, CompleteAbort, Dead, ...
    pub state: String,
    pub producer_id: i64,
    pub producer_epoch: i16,
    /// (topic, partition) added to the ongoing transaction.
    pub partitions: Vec<(String, i32)>,
    /// When the transaction began, broker time (ms); with the producer id and epoch it tells
    /// one transaction of a transactional id from the next.
    pub start_ms: i64,
}

/// One connection to one broker, authenticated if SASL is configured.
struct Connection {
    addr: String,
    stream: Box<dyn Stream>,
    correlation_id: i32,
    timeout: Duration,
}

impl Connection {
    /// TCP, then the TLS handshake and the SASL exchange if configured, all within `timeout`.
    async fn open(addr: &str, timeout: Duration, security: &WireSecurity) -> Result<Connection, WireError> {
        tokio::time::timeout(timeout, Connection::establish(addr, timeout, security))
            .await
            .map_err(|_| WireError::Timeout { addr: addr.into(), timeout })?
    }

    async fn establish(addr: &str, timeout: Duration, security: &WireSecurity) -> Result<Connection, WireError> {
        let tcp = TcpStream::connect(addr).await.map_err(|source| WireError::Io { addr: addr.into(), source })?;
        let _ = tcp.set_nodelay(true);
        let stream: Box<dyn Stream> = match &security.tls {
            None => Box::new(tcp),
            Some(connector) => {
                let tls = connector.connect(server_name(addr)?, tcp).await.map_err(|e| match io_error(addr, e) {
                    // Connected, then the handshake broke off: whatever listens there does not
                    // speak TLS (a PLAINTEXT listener closes on a ClientHello).
                    WireError::Io { addr, source } => {
                        WireError::Tls { addr, error: format!("the TLS handshake failed: {source}") }
                    }
                    other => other,
                })?;
                Box::new(tls)
            }
        };
        let mut conn = Connection { addr: addr.into(), stream, correlation_id: 0, timeout };
        if let Some(sasl) = &security.sasl {
            conn.authenticate(sasl).await?;
        }
        tracing::debug!(
            addr,
            tls = security.tls.is_some(),
            sasl = security.sasl.as_ref().map(|s| s.mechanism.as_str()),
            "connected to a broker"
        );
        Ok(conn)
    }

    /// SaslHandshake, then the mechanism's exchange in SaslAuthenticate requests. With SCRAM
    /// the broker's final signature is verified: a broker that does not know the credentials
    /// is refused like a wrong password.
    async fn authenticate(&mut self, sasl: &SaslCredentials) -> Result<(), WireError> {
        let mechanism = sasl.mechanism;
        let refused = |addr: &str, message: String| WireError::Auth {
            addr: addr.into(),
            mechanism,
            username: sasl.username.clone(),
            message,
        };
        let request = SaslHandshakeRequest::default().with_mechanism(StrBytes::from_static_str(mechanism.as_str()));
        let r: SaslHandshakeResponse = self.call(ApiKey::SaslHandshake, SASL_HANDSHAKE_VERSION, &request).await?;
        match r.error_code {
            code::NONE => {}
            code::UNSUPPORTED_SASL_MECHANISM => {
                let offered: Vec<&str> = r.mechanisms.iter().map(|m| m.as_str()).collect();
                return Err(refused(
                    &self.addr,
                    format!("the listener does not offer {mechanism}; it offers {offered:?}"),
                ));
            }
            other => return Err(WireError::Kafka { what: "SaslHandshake", code: other, message: None }),
        }
        let hash = match mechanism {
            SaslMechanism::Plain => {
                let token = format!("\0{}\0{}", sasl.username, sasl.password.expose());
                self.sasl_authenticate(Bytes::from(token), &refused).await?;
                return Ok(());
            }
            SaslMechanism::ScramSha256 => ScramHash::Sha256,
            SaslMechanism::ScramSha512 => ScramHash::Sha512,
        };
        let scram = ScramClient::new(hash, &sasl.username);
        let server_first = self.sasl_authenticate(Bytes::from(scram.client_first()), &refused).await?;
        // PBKDF2 (thousands of HMACs) off the async workers.
        let password = sasl.password.clone();
        let (client_final, expected) =
            tokio::task::spawn_blocking(move || scram.client_final(password.expose(), &server_first))
                .await
                .map_err(|e| WireError::Protocol(format!("SCRAM computation failed: {e}")))?
                .map_err(|e| refused(&self.addr, e.to_string()))?;
        let server_final = self.sasl_authenticate(Bytes::from(client_final), &refused).await?;
        expected.verify(&server_final).map_err(|e| refused(&self.addr, e.to_string()))
    }

    /// One SaslAuthenticate round: sends `token`, answers the broker's.
    async fn sasl_authenticate(
        &mut self,
        token: Bytes,
        refused: &impl Fn(&str, String) -> WireError,
    ) -> Result<Bytes, WireError> {
        let request = SaslAuthenticateRequest::default().with_auth_bytes(token);
        let r: SaslAuthenticateResponse =
            self.call(ApiKey::SaslAuthenticate, SASL_AUTHENTICATE_VERSION, &request).await?;
        if r.error_code != code::NONE {
            let message = r.error_message.map(|m| m.to_string()).unwrap_or_default();
            return Err(refused(&self.addr, format!("{message} (Kafka error {})", r.error_code)));
        }
        if r.auth_bytes.len() > MAX_SASL_BYTES {
            return Err(WireError::Protocol(format!(
                "a SASL token of {} bytes; at most {MAX_SASL_BYTES}",
                r.auth_bytes.len()
            )));
        }
        Ok(r.auth_bytes)
    }

    async fn call<Req: Encodable, Resp: Decodable>(
        &mut self,
        api_key: ApiKey,
        version: i16,
        request: &Req,
    ) -> Result<Resp, WireError> {
        self.correlation_id += 1;
        let header = RequestHeader::default()
            .with_request_api_key(api_key as i16)
            .with_request_api_version(version)
            .with_correlation_id(self.correlation_id)
            .with_client_id(Some(StrBytes::from_static_str("pledge-kafka-adapter")));
        let protocol = |e: anyhow::Error| WireError::Protocol(e.to_string());
        let mut body = BytesMut::new();
        header.encode(&mut body, api_key.request_header_version(version)).map_err(protocol)?;
        request.encode(&mut body, version).map_err(protocol)?;
        let mut frame = BytesMut::with_capacity(4 + body.len());
        frame.put_u32(body.len() as u32);
        frame.extend_from_slice(&body);

        let (addr, timeout) = (self.addr.clone(), self.timeout);
        let exchange = async {
            self.stream.write_all(&frame).await?;
            // TLS buffers what is written: send it now.
            self.stream.flush().await?;
            let len = self.stream.read_u32().await? as usize;
            if len > MAX_RESPONSE_BYTES {
                return Err(std::io::Error::other(format!("response of {len} bytes")));
            }
            let mut buf = vec![0u8; len];
            self.stream.read_exact(&mut buf).await?;
            Ok(Bytes::from(buf))
        };
        let mut response = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| WireError::Timeout { addr: addr.clone(), timeout })?
            .map_err(|source| io_error(&addr, source))?;
        let header =
            ResponseHeader::decode(&mut response, api_key.response_header_version(version)).map_err(protocol)?;
        if header.correlation_id != self.correlation_id {
            return Err(WireError::Protocol(format!(
                "correlation id {} in answer to {}",
                header.correlation_id, self.correlation_id
            )));
        }
        let decoded = Resp::decode(&mut response, version).map_err(protocol)?;
        if response.has_remaining() {
            tracing::debug!(remaining = response.remaining(), "unread bytes after a Kafka response");
        }
        Ok(decoded)
    }
}

/// The name a broker's certificate must carry: the host of `addr` (`host:port`, `[v6]:port`).
fn server_name(addr: &str) -> Result<ServerName<'static>, WireError> {
    let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string())
        .map_err(|e| WireError::Tls { addr: addr.into(), error: format!("{host:?} cannot name a TLS server: {e}") })
}

/// Idle connections kept per broker, at most.
const MAX_IDLE_PER_BROKER: usize = 4;

/// Talks to the transaction coordinator of transactional ids, through any bootstrap broker.
/// Connections are kept and reused (at most [`MAX_IDLE_PER_BROKER`] idle per broker), and each
/// transactional id's coordinator is remembered until a call says it moved: a prepare's
/// DescribeTransactions is then one request on an open connection, not two new ones.
#[derive(Clone)]
pub struct TxnClient {
    bootstrap: Vec<String>,
    timeout: Duration,
    security: Arc<WireSecurity>,
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    /// Transactional id -> its transaction coordinator's address (bounded: cleared when full).
    coordinators: std::sync::Mutex<std::collections::HashMap<String, String>>,
    /// Broker address -> idle connections.
    idle: std::sync::Mutex<std::collections::HashMap<String, Vec<Connection>>>,
}

/// Most transactional ids whose coordinator is remembered.
const MAX_REMEMBERED_COORDINATORS: usize = 4096;

impl TxnClient {
    /// A client of brokers' PLAINTEXT listeners.
    pub fn new(bootstrap: &str, timeout: Duration) -> TxnClient {
        TxnClient::with_security(bootstrap, timeout, &BrokerSecurity::default())
            .expect("PLAINTEXT needs no files to read")
    }

    /// A client reaching the brokers as `security` says. Reads the TLS files now (a missing
    /// or unusable one is an error here, not at the first request).
    pub fn with_security(
        bootstrap: &str,
        timeout: Duration,
        security: &BrokerSecurity,
    ) -> Result<TxnClient, SecurityError> {
        security.check()?;
        let tls = security.rustls_config()?.map(TlsConnector::from);
        Ok(TxnClient {
            bootstrap: bootstrap.split(',').map(|s| s.trim().to_string()).collect(),
            timeout,
            security: Arc::new(WireSecurity { tls, sasl: security.sasl.clone() }),
            shared: Default::default(),
        })
    }

    /// Connects to the bootstrap brokers in turn (TCP, TLS, SASL as configured) and asks the
    /// first that answers for its API versions: the broker's address, or why none answered.
    /// A refusal ([`WireError::is_refusal`]: a certificate not accepted, a login refused) is
    /// returned at once; any other failure moves on to the next broker. Each broker takes at
    /// most two timeouts (connecting, then the request).
    pub async fn check_brokers(&self) -> Result<String, WireError> {
        let request = ApiVersionsRequest::default()
            .with_client_software_name(StrBytes::from_static_str("pledge-kafka-adapter"))
            .with_client_software_version(StrBytes::from_static_str(env!("CARGO_PKG_VERSION")));
        let mut last = None;
        for broker in &self.bootstrap {
            match self.call::<_, ApiVersionsResponse>(broker, ApiKey::ApiVersions, API_VERSIONS_VERSION, &request).await
            {
                Ok(r) if r.error_code == code::NONE => return Ok(broker.clone()),
                Ok(r) => last = Some(WireError::Kafka { what: "ApiVersions", code: r.error_code, message: None }),
                Err(e) if e.is_refusal() => return Err(e),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| WireError::Protocol("no bootstrap broker".into())))
    }

    /// An idle connection to `addr` (and `true`), or a new one.
    async fn connection(&self, addr: &str) -> Result<(Connection, bool), WireError> {
        let idle = self.shared.idle.lock().unwrap().get_mut(addr).and_then(Vec::pop);
        match idle {
            Some(conn) => Ok((conn, true)),
            None => Ok((Connection::open(addr, self.timeout, &self.security).await?, false)),
        }
    }

    /// Gives back a connection whose last exchange completed.
    fn put_back(&self, conn: Connection) {
        let mut idle = self.shared.idle.lock().unwrap();
        let list = idle.entry(conn.addr.clone()).or_default();
        if list.len() < MAX_IDLE_PER_BROKER {
            list.push(conn);
        }
    }

    /// One request on a kept (or new) connection to `addr`. A kept connection the broker has
    /// closed meanwhile fails at once; the request is then made once more on a new one.
    async fn call<Req: Encodable, Resp: Decodable>(
        &self,
        addr: &str,
        api_key: ApiKey,
        version: i16,
        request: &Req,
    ) -> Result<Resp, WireError> {
        let (mut conn, reused) = self.connection(addr).await?;
        let result = match conn.call(api_key, version, request).await {
            Err(WireError::Io { .. } | WireError::Tls { .. }) if reused => {
                conn = Connection::open(addr, self.timeout, &self.security).await?;
                conn.call(api_key, version, request).await
            }
            other => other,
        };
        if result.is_ok() {
            self.put_back(conn);
        }
        result
    }

    /// The address of the transaction coordinator of `transactional_id`.
    async fn coordinator(&self, transactional_id: &str) -> Result<String, WireError> {
        if let Some(addr) = self.shared.coordinators.lock().unwrap().get(transactional_id) {
            return Ok(addr.clone());
        }
        let mut last = None;
        for broker in &self.bootstrap {
            let request = FindCoordinatorRequest::default()
                .with_key(StrBytes::from_string(transactional_id.to_string()))
                .with_key_type(1);
            let attempt = self
                .call::<_, FindCoordinatorResponse>(broker, ApiKey::FindCoordinator, FIND_COORDINATOR_VERSION, &request)
                .await;
            match attempt {
                Ok(r) if r.error_code == code::NONE => {
                    let addr = format!("{}:{}", r.host.as_str(), r.port);
                    let mut known = self.shared.coordinators.lock().unwrap();
                    if known.len() >= MAX_REMEMBERED_COORDINATORS {
                        known.clear();
                    }
                    known.insert(transactional_id.to_string(), addr.clone());
                    return Ok(addr);
                }
                Ok(r) => {
                    last = Some(WireError::Kafka {
                        what: "FindCoordinator",
                        code: r.error_code,
                        message: r.error_message.map(|m| m.to_string()),
                    })
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| WireError::Protocol("no bootstrap broker".into())))
    }

    /// The coordinator of `transactional_id` moved (or cannot be reached): ask again next time.
    fn forget_coordinator(&self, transactional_id: &str) {
        self.shared.coordinators.lock().unwrap().remove(transactional_id);
    }

    /// Sends `request` to the transaction coordinator of `transactional_id`, finding it again
    /// and retrying (a bounded number of times, with a short pause) while it is moving or
    /// loading (`retriable` reads that from the response).
    async fn to_coordinator<Req: Encodable, Resp: Decodable>(
        &self,
        transactional_id: &str,
        api_key: ApiKey,
        version: i16,
        request: &Req,
        retriable: impl Fn(&Resp) -> Option<i16>,
    ) -> Result<Resp, WireError> {
        const ATTEMPTS: u32 = 10;
        // One bound for the whole call, however many attempts it takes.
        let deadline = tokio::time::Instant::now() + 3 * self.timeout;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let call = async {
                let addr = self.coordinator(transactional_id).await?;
                tracing::debug!(
                    request = api_key_name(api_key),
                    transactional_id,
                    coordinator = addr,
                    "to the transaction coordinator"
                );
                self.call::<_, Resp>(&addr, api_key, version, request).await
            };
            let result = tokio::time::timeout_at(deadline, call).await.unwrap_or_else(|_| {
                Err(WireError::Timeout {
                    addr: format!("coordinator of {transactional_id}"),
                    timeout: 3 * self.timeout,
                })
            });
            let retry = match &result {
                Ok(r) => retriable(r).filter(|c| code::retriable(*c)),
                Err(_) => None,
            };
            if result.is_err() || retry.is_some() {
                self.forget_coordinator(transactional_id);
            }
            match retry {
                Some(code) if attempt >= ATTEMPTS => {
                    return Err(WireError::Kafka { what: api_key_name(api_key), code, message: None });
                }
                Some(_) => tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await,
                None => return result,
            }
        }
    }

    /// Commits (or aborts) the transaction of `transactional_id` as producer (`producer_id`,
    /// `producer_epoch`). Returns the Kafka error code: 0, or why not.
    pub async fn end_txn(
        &self,
        transactional_id: &str,
        producer_id: i64,
        producer_epoch: i16,
        commit: bool,
    ) -> Result<i16, WireError> {
        let request = EndTxnRequest::default()
            .with_transactional_id(TransactionalId(StrBytes::from_string(transactional_id.to_string())))
            .with_producer_id(ProducerId(producer_id))
            .with_producer_epoch(producer_epoch)
            .with_committed(commit);
        let r: EndTxnResponse = self
            .to_coordinator(transactional_id, ApiKey::EndTxn, END_TXN_VERSION, &request, |r: &EndTxnResponse| {
                Some(r.error_code)
            })
            .await?;
        Ok(r.error_code)
    }

    /// What the coordinator knows of `transactional_id` (`None`: nothing).
    pub async fn describe(&self, transactional_id: &str) -> Result<Option<TxnDescription>, WireError> {
        let request = DescribeTransactionsRequest::default()
            .with_transactional_ids(vec![TransactionalId(StrBytes::from_string(transactional_id.to_string()))]);
        let first_code = |r: &DescribeTransactionsResponse| r.transaction_states.first().map(|s| s.error_code);
        let r: DescribeTransactionsResponse = self
            .to_coordinator(
                transactional_id,
                ApiKey::DescribeTransactions,
                DESCRIBE_TRANSACTIONS_VERSION,
                &request,
                first_code,
            )
            .await?;
        let Some(state) = r.transaction_states.into_iter().next() else { return Ok(None) };
        match state.error_code {
            code::NONE => Ok(Some(TxnDescription {
                state: state.transaction_state.to_string(),
                producer_id: state.producer_id.0,
                producer_epoch: state.producer_epoch,
                start_ms: state.transaction_start_time_ms,
                partitions: state
                    .topics
                    .into_iter()
                    .flat_map(|t| {
                        let topic = t.topic.0.to_string();
                        t.partitions.into_iter().map(move |p| (topic.clone(), p))
                    })
                    .collect(),
            })),
            code::TRANSACTIONAL_ID_NOT_FOUND => Ok(None),
            other => Err(WireError::Kafka { what: "DescribeTransactions", code: other, message: None }),
        }
    }
}

fn api_key_name(api_key: ApiKey) -> &'static str {
    match api_key {
        ApiKey::EndTxn => "EndTxn",
        ApiKey::DescribeTransactions => "DescribeTransactions",
        ApiKey::FindCoordinator => "FindCoordinator",
        _ => "request",
    }
}
