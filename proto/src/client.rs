//! A Coordinator client for a cluster of coordinators.
//!
//! Any instance answers any call (it forwards a call about another instance's shard to its
//! owner, and names that owner in the reply's `pledge-owner` metadata). [`ClusterClient`]
//! learns the owner of each transaction from those replies and sends the transaction's next
//! calls straight there, saving the hop; until it knows, it uses the instances it was given,
//! in turn. A call that fails UNAVAILABLE (an instance gone, a shard moving) forgets what was
//! learned about that transaction, so the retry goes through an instance again. The client
//! does not retry on its own: Commit and Abort are idempotent, so the caller may.
//!
//! Each call carries the caller's current span as W3C trace context when trace export is on
//! ([`crate::telemetry`]), as [`crate::pipeline::CoordinatorPipeline`]'s calls do.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::tls::ClientTls;
use crate::transport::{AddressError, Target};
use crate::v1::{self, coordinator_client::CoordinatorClient};

/// Reply metadata naming the instance that owns the call's transaction.
pub const OWNER_METADATA: &str = "pledge-owner";
/// Most transactions whose owner is remembered (then the memory starts over).
pub const MAX_LEARNED_OWNERS: usize = 100_000;

pub struct ClusterClient {
    instances: Vec<String>,
    next: AtomicUsize,
    channels: Mutex<HashMap<String, CoordinatorClient<Channel>>>,
    owners: Mutex<HashMap<String, String>>,
    tls: Option<ClientTls>,
}

impl ClusterClient {
    /// A client of the cluster whose instances listen at `endpoints` (`http://host:port`).
    pub fn new(endpoints: Vec<String>) -> Result<ClusterClient, AddressError> {
        ClusterClient::with_tls(endpoints, None)
    }

    /// [`ClusterClient::new`] calling with `tls` (the endpoints are then `https://host:port`).
    pub fn with_tls(endpoints: Vec<String>, tls: Option<ClientTls>) -> Result<ClusterClient, AddressError> {
        for e in &endpoints {
            Target::parse_with(e, tls.as_ref())?;
        }
        assert!(!endpoints.is_empty(), "a cluster client needs at least one instance");
        Ok(ClusterClient {
            instances: endpoints,
            next: AtomicUsize::new(0),
            channels: Mutex::new(HashMap::new()),
            owners: Mutex::new(HashMap::new()),
            tls,
        })
    }

    /// The owner learned for `gtid`, if any.
    pub fn owner_of(&self, gtid: &str) -> Option<String> {
        self.owners.lock().expect("owners").get(gtid).cloned()
    }

    fn client(&self, endpoint: &str) -> Result<CoordinatorClient<Channel>, Status> {
        let mut channels = self.channels.lock().expect("channels");
        if let Some(c) = channels.get(endpoint) {
            return Ok(c.clone());
        }
        let target =
            Target::parse_with(endpoint, self.tls.as_ref()).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let client = CoordinatorClient::new(target.connect_lazy());
        channels.insert(endpoint.to_string(), client.clone());
        Ok(client)
    }

    fn any_instance(&self) -> String {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.instances.len();
        self.instances[i].clone()
    }

    /// Runs `call` at the owner of `gtid` if known (else at any instance), and learns the
    /// owner from the reply.
    async fn call<T, R, F, Fut>(&self, gtid: Option<&str>, message: T, call: F) -> Result<Response<R>, Status>
    where
        F: FnOnce(CoordinatorClient<Channel>, Request<T>) -> Fut,
        Fut: Future<Output = Result<Response<R>, Status>>,
        R: HasGtid,
    {
        let endpoint = gtid.and_then(|g| self.owner_of(g)).unwrap_or_else(|| self.any_instance());
        // The caller's span goes with the call (W3C trace context), so the coordinator's spans
        // join the application's trace (see `crate::telemetry`; nothing is added with it off).
        let request = crate::telemetry::with_trace_context(Request::new(message));
        let result = call(self.client(&endpoint)?, request).await.map_err(retriable_transport);
        match &result {
            Ok(response) => {
                let gtid = gtid.map(str::to_string).or_else(|| response.get_ref().gtid());
                // Answered without forwarding: the instance asked is the owner.
                let owner = response.metadata().get(OWNER_METADATA).and_then(|v| v.to_str().ok()).unwrap_or(&endpoint);
                if let Some(gtid) = gtid {
                    let mut owners = self.owners.lock().expect("owners");
                    if owners.len() >= MAX_LEARNED_OWNERS {
                        owners.clear();
                    }
                    owners.insert(gtid, owner.to_string());
                }
            }
            Err(status) if status.code() == tonic::Code::Unavailable => {
                if let Some(g) = gtid {
                    self.owners.lock().expect("owners").remove(g);
                }
            }
            Err(_) => {}
        }
        result
    }

    pub async fn begin(&self, request: v1::BeginRequest) -> Result<v1::BeginResponse, Status> {
        let r = self.call(None, request, |mut c, r| async move { c.begin(r).await }).await?;
        Ok(r.into_inner())
    }

    pub async fn enlist(&self, request: v1::EnlistRequest) -> Result<v1::EnlistResponse, Status> {
        let gtid = request.gtid.clone();
        Ok(self.call(Some(&gtid), request, |mut c, r| async move { c.enlist(r).await }).await?.into_inner())
    }

    pub async fn commit(&self, request: v1::CommitRequest) -> Result<v1::CommitResponse, Status> {
        let gtid = request.gtid.clone();
        Ok(self.call(Some(&gtid), request, |mut c, r| async move { c.commit(r).await }).await?.into_inner())
    }

    pub async fn abort(&self, request: v1::AbortRequest) -> Result<v1::AbortResponse, Status> {
        let gtid = request.gtid.clone();
        Ok(self.call(Some(&gtid), request, |mut c, r| async move { c.abort(r).await }).await?.into_inner())
    }

    pub async fn get(&self, request: v1::GetRequest) -> Result<v1::GetResponse, Status> {
        let gtid = request.gtid.clone();
        Ok(self.call(Some(&gtid), request, |mut c, r| async move { c.get(r).await }).await?.into_inner())
    }
}

/// Whether `status` reports that the call never got a gRPC answer: the connection failed,
/// was reset, or the server went away (an HTTP/2 GOAWAY as it shuts down). tonic reports some
/// of these as INTERNAL or UNKNOWN; they are no answer from the service, so retriable.
pub fn is_transport_failure(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if e.is::<tonic::transport::Error>() || e.is::<std::io::Error>() {
            return true;
        }
        source = e.source();
    }
    false
}

/// A transport failure as UNAVAILABLE (see [`is_transport_failure`]); other statuses as they are.
pub fn retriable_transport(status: Status) -> Status {
    if status.code() != tonic::Code::Unavailable && is_transport_failure(&status) {
        Status::unavailable(format!("no answer from the instance ({}); retry", status.message()))
    } else {
        status
    }
}

/// A reply that names a transaction (Begin's names the one it began).
pub trait HasGtid {
    fn gtid(&self) -> Option<String> {
        None
    }
}

impl HasGtid for v1::BeginResponse {
    fn gtid(&self) -> Option<String> {
        Some(self.gtid.clone())
    }
}
impl HasGtid for v1::EnlistResponse {}
impl HasGtid for v1::CommitResponse {}
impl HasGtid for v1::AbortResponse {}
impl HasGtid for v1::GetResponse {}
