//! The gRPC Coordinator service: validates each request once, on receipt, hands it to the
//! runtime, and maps the answer (or the error) to the wire.
//!
//! Every domain error maps to a gRPC status in [`status_of`], one exhaustive match with no
//! wildcard: a new error must choose its status.

use pledge_proto::auth::Principal;
use pledge_proto::metrics::observe;
use pledge_proto::pipeline;
use pledge_proto::v1::coordinator_server::Coordinator;
use pledge_proto::v1::{self};
use pledge_proto::{BranchKey, Gtid, IdError, ResourceId};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use std::sync::Arc;

use crate::cluster::router::{self, Route, Router};
use crate::config::{MAX_BRANCHES_LIMIT, validate_endpoint};
use crate::driver::{ApiRequest, CallError, RuntimeHandle};
use crate::engine::{
    BranchOutcome, BranchView, CommitOutcome, EngineError, Enlisted, ListFilter, ParticipantState, Protocol, Reply,
    ResolveAction, ResolveEffect, ResolveRecord, ResolveRequest, TxnState, TxnView, Vote,
};

/// Longest idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 128;
/// Most transactions one List returns.
pub const MAX_LIST_LIMIT: usize = 1_000;
/// Most bytes of transactions one List returns (then `truncated`; page with `older_than_ms`
/// or a smaller `limit`).
pub const MAX_LIST_RESPONSE_BYTES: usize = 3 << 20;
const DEFAULT_LIST_LIMIT: usize = 100;
/// Longest reason a Resolve may give, in bytes (it is logged, and shown by Get).
pub const MAX_RESOLVE_REASON_BYTES: usize = 1_024;
/// Longest operator name a Resolve may give, in bytes.
pub const MAX_OPERATOR_BYTES: usize = 128;
/// Most calls of one pipeline stream handled at a time; the coordinator reads no more of the
/// stream until one is answered (HTTP/2 flow control then holds the client back).
pub const MAX_PIPELINE_CALLS_IN_FLIGHT: usize = 1024;

#[derive(Clone)]
pub struct CoordinatorService {
    runtime: RuntimeHandle,
    /// Cancelled at shutdown: ends the pipeline streams, which a graceful shutdown would
    /// otherwise wait for forever.
    closing: CancellationToken,
    /// In a cluster: sends calls about other instances' shards to their owners.
    router: Option<Arc<Router>>,
    /// This coordinator's id: part of every branch's XA XID shown by Get and List.
    coordinator_id: Arc<str>,
    /// Participants are called with TLS: a registered endpoint must be https://.
    client_tls: bool,
}

impl CoordinatorService {
    pub fn new(runtime: RuntimeHandle, closing: CancellationToken, coordinator_id: &str, client_tls: bool) -> Self {
        CoordinatorService { runtime, closing, router: None, coordinator_id: coordinator_id.into(), client_tls }
    }

    pub fn with_router(mut self, router: Arc<Router>) -> Self {
        self.router = Some(router);
        self
    }

    /// The router, unless this call was forwarded here (it is then answered here).
    fn router_for<T>(&self, request: &Request<T>) -> Option<&Router> {
        self.router.as_deref().filter(|_| !router::forwarded(request))
    }

    /// Who made `request`: the transport's address, always, and the authenticated principal.
    /// A call forwarded within a cluster names its original caller; that is believed when the
    /// forwarding instance authenticated as a coordinator, and shown as a claim (with the
    /// address it came from) when calls are not authenticated.
    fn caller<T>(&self, request: &Request<T>) -> router::Caller {
        use pledge_proto::auth::Role;
        let transport =
            pledge_proto::tls::remote_addr(request).map_or_else(|| "unknown".to_string(), |a| a.to_string());
        let direct = pledge_proto::auth::principal(request);
        let forwarded = router::forwarded_caller(request).filter(|_| self.router.is_some());
        match (forwarded, direct) {
            (Some(f), Some(d)) if d.role == Role::Coordinator => {
                router::Caller { peer: format!("{} (forwarded by {} at {transport})", f.peer, d.name), ..f }
            }
            (Some(f), None) => router::Caller {
                peer: format!("{} (forwarded by {transport})", f.peer),
                principal: None,
                application: None,
            },
            (_, direct) => router::Caller {
                peer: transport,
                principal: direct.map(|d| d.name.to_string()),
                application: direct.filter(|d| d.role == Role::Application).map(|d| d.name.to_string()),
            },
        }
    }

    /// The authenticated application making `request`, which may act only on the transactions
    /// it began (`None`: any other caller, or calls are not authenticated).
    fn application<T>(&self, request: &Request<T>) -> Option<Arc<str>> {
        self.caller(request).application.map(Arc::from)
    }

    /// Where a call about `gtid` is answered.
    async fn route<T>(&self, request: &Request<T>, gtid: Gtid) -> Result<Route, Status> {
        match self.router_for(request) {
            Some(router) => router.route(router.state.shard_of(gtid)).await,
            None => Ok(Route::Local),
        }
    }

    /// One call from a pipeline stream, handled exactly as the unary call of its kind.
    /// One call from a pipeline stream opened by `principal` (when calls are authenticated).
    async fn pipelined(
        self,
        principal: Option<Principal>,
        call: v1::coordinator_call::Call,
    ) -> Result<v1::coordinator_reply::Reply, Status> {
        use v1::coordinator_call::Call;
        use v1::coordinator_reply::Reply;
        fn by<T>(principal: &Option<Principal>, message: T) -> Request<T> {
            let mut request = Request::new(message);
            if let Some(p) = principal {
                request.extensions_mut().insert(p.clone());
            }
            request
        }
        match call {
            Call::Begin(r) => self.begin(by(&principal, r)).await.map(|r| Reply::Begin(r.into_inner())),
            Call::Enlist(r) => self.enlist(by(&principal, r)).await.map(|r| Reply::Enlist(r.into_inner())),
            Call::Commit(r) => self.commit(by(&principal, r)).await.map(|r| Reply::Commit(r.into_inner())),
            Call::Abort(r) => self.abort(by(&principal, r)).await.map(|r| Reply::Abort(r.into_inner())),
        }
    }

    /// List across the cluster: this instance's shards and every peer's, merged in GTID (issue
    /// time) order. A peer that cannot answer fails the call: a partial list would hide
    /// transactions.
    async fn list_cluster(
        &self,
        r: v1::ListRequest,
        peers: Vec<(String, String)>,
    ) -> Result<Response<v1::ListResponse>, Status> {
        let router = self.router.as_ref().expect("listed across the cluster");
        let limit = match r.limit as usize {
            0 => DEFAULT_LIST_LIMIT,
            n => n,
        };
        let mut local = Request::new(r.clone());
        local.metadata_mut().insert(router::FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
        let mut answers = vec![self.list(local).await?.into_inner()];
        let asks = peers.into_iter().map(|(id, address)| {
            let r = r.clone();
            async move {
                router
                    .forward(address, r, |mut c, r| async move { c.list(r).await })
                    .await
                    .map(Response::into_inner)
                    .map_err(|s| {
                        Status::unavailable(format!("instance {id} could not list its shards: {}", s.message()))
                    })
            }
        });
        for answer in futures::future::join_all(asks).await {
            answers.push(answer?);
        }
        let mut truncated = answers.iter().any(|a| a.truncated);
        let mut transactions: Vec<v1::Transaction> = answers.into_iter().flat_map(|a| a.transactions).collect();
        transactions.sort_by(|a, b| a.gtid.cmp(&b.gtid));
        transactions.dedup_by(|a, b| a.gtid == b.gtid);
        if transactions.len() > limit {
            transactions.truncate(limit);
            truncated = true;
        }
        let mut bytes = 0;
        let keep = transactions
            .iter()
            .position(|t| {
                bytes += prost::Message::encoded_len(t);
                bytes > MAX_LIST_RESPONSE_BYTES
            })
            .map_or(transactions.len(), |i| i.max(1));
        if keep < transactions.len() {
            transactions.truncate(keep);
            truncated = true;
        }
        Ok(Response::new(v1::ListResponse { transactions, truncated }))
    }

    async fn call(&self, request: ApiRequest) -> Result<Reply, Status> {
        self.call_as(None, request).await
    }

    /// [`CoordinatorService::call`] for an authenticated application, which may act only on
    /// the transactions it began.
    async fn call_as(&self, application: Option<Arc<str>>, request: ApiRequest) -> Result<Reply, Status> {
        match self.runtime.call_as(application, request).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(e)) => Err(status_of(&e)),
            Err(e) => Err(status_of_call(&e)),
        }
    }
}

/// The one place where domain errors become gRPC statuses.
pub fn status_of(e: &EngineError) -> Status {
    let message = e.to_string();
    match e {
        // NOT_FOUND: no record, so never committed here (presumed abort is proven, see the
        // engine). OUT_OF_RANGE: older than the retention window; the outcome is not known.
        EngineError::UnknownTransaction(_) | EngineError::UnknownResource(_) => Status::not_found(message),
        EngineError::OutcomeForgotten(_) => Status::out_of_range(message),
        EngineError::NotActive { .. }
        | EngineError::NotThreePhase(_)
        | EngineError::AlreadyAborted { .. }
        | EngineError::CommitDecided { .. }
        | EngineError::EnlistConflict { .. }
        | EngineError::ResolveRefused(_) => Status::failed_precondition(message),
        EngineError::NoSuchBranch { .. } => Status::not_found(message),
        EngineError::NotYours { .. } => Status::permission_denied(message),
        EngineError::TimeoutTooLong { .. } | EngineError::TooManyBranches { .. } => Status::invalid_argument(message),
        EngineError::TooManyTransactions { .. }
        | EngineError::TooManyWaiters { .. }
        | EngineError::TooManyParticipants { .. }
        | EngineError::RetentionFull { .. } => Status::resource_exhausted(message),
        // Retriable: the shard's new owner answers (the router finds it on the next call).
        EngineError::NotOwner { .. }
        | EngineError::NoShard
        | EngineError::StoreUnavailable(_)
        | EngineError::CapabilityUnknown(_) => Status::unavailable(message),
    }
}

/// ... and where the runtime's own failures do.
pub fn status_of_call(e: &CallError) -> Status {
    let message = e.to_string();
    match e {
        CallError::ShuttingDown | CallError::Overloaded(_) => Status::unavailable(message),
        CallError::TimedOut(_) => Status::deadline_exceeded(message),
    }
}

fn invalid(e: IdError) -> Status {
    Status::invalid_argument(e.to_string())
}

fn gtid(value: &str) -> Result<Gtid, Status> {
    Gtid::parse_field("gtid", value).map_err(invalid)
}

/// Parses a request's branch list. More than [`MAX_BRANCHES_LIMIT`] entries can never be
/// accepted (it bounds every transaction's branches), so such a list is refused before any of
/// it is looked at.
fn branches(refs: &[v1::BranchRef]) -> Result<Vec<Enlisted>, Status> {
    if refs.len() > MAX_BRANCHES_LIMIT {
        return Err(Status::invalid_argument(format!(
            "branches: {} entries; a transaction has at most {MAX_BRANCHES_LIMIT} branches",
            refs.len()
        )));
    }
    refs.iter()
        .enumerate()
        .map(|(i, r)| match BranchKey::try_from(r) {
            Ok(key) => Ok(Enlisted { key, may_be_empty: r.may_be_empty }),
            Err(e) => Err(Status::invalid_argument(format!("branches[{i}].{e}"))),
        })
        .collect()
}

/// Checks a Resolve request: a refused one changes nothing.
fn resolve_request(gtid: Gtid, r: v1::ResolveRequest, peer: String) -> Result<ResolveRequest, Status> {
    let action = match v1::ResolveAction::try_from(r.action) {
        Ok(v1::ResolveAction::Commit) => ResolveAction::Commit,
        Ok(v1::ResolveAction::Rollback) => ResolveAction::Rollback,
        Ok(v1::ResolveAction::Forget) => ResolveAction::Forget,
        Ok(v1::ResolveAction::Unspecified) | Err(_) => {
            return Err(Status::invalid_argument(format!(
                "action: {} is not a resolution (1: commit, 2: rollback, 3: forget)",
                r.action
            )));
        }
    };
    let branch = match &r.branch {
        Some(b) => Some(BranchKey::try_from(b).map_err(|e| Status::invalid_argument(format!("branch.{e}")))?),
        None => None,
    };
    let text = |field: &str, value: String, max: usize| -> Result<String, Status> {
        if value.trim().is_empty() {
            return Err(Status::invalid_argument(format!("{field}: required (it is logged with the resolution)")));
        }
        if value.len() > max {
            return Err(Status::invalid_argument(format!(
                "{field}: {} bytes is longer than the limit of {max} bytes",
                value.len()
            )));
        }
        Ok(value)
    };
    Ok(ResolveRequest {
        gtid,
        branch,
        action,
        reason: text("reason", r.reason, MAX_RESOLVE_REASON_BYTES)?,
        operator: text("operator", r.operator, MAX_OPERATOR_BYTES)?,
        peer,
    })
}

fn unexpected(reply: Reply) -> Status {
    // The runtime answers each request kind with its own reply kind; anything else is a bug.
    tracing::error!(?reply, "unexpected reply from the engine");
    Status::internal("unexpected reply from the engine")
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn begin(&self, request: Request<v1::BeginRequest>) -> Result<Response<v1::BeginResponse>, Status> {
        observe("Begin", async {
            if let Some(router) = self.router_for(&request) {
                let key = &request.get_ref().idempotency_key;
                let route = match key.is_empty() {
                    true => router.route_begin()?,
                    false => router.route(crate::cluster::key_shard(key, router.state.shard_count)).await?,
                };
                if let Route::Remote(to) = route {
                    return router
                        .forward_for(Some(self.caller(&request)), to, request.into_inner(), |mut c, r| async move {
                            c.begin(r).await
                        })
                        .await;
                }
            }
            let application = self.application(&request);
            let r = request.into_inner();
            if r.idempotency_key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
                return Err(Status::invalid_argument(format!(
                    "idempotency_key: {} bytes is longer than the limit of {MAX_IDEMPOTENCY_KEY_BYTES} bytes",
                    r.idempotency_key.len()
                )));
            }
            let request = ApiRequest::Begin {
                timeout_ms: r.timeout_ms,
                idempotency_key: (!r.idempotency_key.is_empty()).then_some(r.idempotency_key),
                branches: branches(&r.branches)?,
                protocol: protocol(r.protocol)?,
                owner: application.clone(),
            };
            let span = tracing::debug_span!("Begin", gtid = tracing::field::Empty);
            match self.call_as(application, request).instrument(span.clone()).await? {
                Reply::Begun { gtid, existing, deadline_ms } => {
                    span.record("gtid", tracing::field::display(gtid));
                    Ok(Response::new(v1::BeginResponse {
                        gtid: gtid.to_string(),
                        existing,
                        deadline_unix_ms: deadline_ms,
                    }))
                }
                other => Err(unexpected(other)),
            }
        })
        .await
    }

    async fn enlist(&self, request: Request<v1::EnlistRequest>) -> Result<Response<v1::EnlistResponse>, Status> {
        observe("Enlist", async {
            let gtid = gtid(&request.get_ref().gtid)?;
            if let Route::Remote(to) = self.route(&request, gtid).await? {
                let router = self.router.as_ref().expect("routed");
                return router
                    .forward_for(Some(self.caller(&request)), to, request.into_inner(), |mut c, r| async move {
                        c.enlist(r).await
                    })
                    .await;
            }
            let application = self.application(&request);
            let r = request.into_inner();
            let request = ApiRequest::Enlist { gtid, branches: branches(&r.branches)? };
            match self.call_as(application, request).instrument(tracing::debug_span!("Enlist", %gtid)).await? {
                Reply::Enlisted => Ok(Response::new(v1::EnlistResponse {})),
                other => Err(unexpected(other)),
            }
        })
        .await
    }

    async fn commit(&self, request: Request<v1::CommitRequest>) -> Result<Response<v1::CommitResponse>, Status> {
        observe("Commit", async {
            let gtid = gtid(&request.get_ref().gtid)?;
            if let Route::Remote(to) = self.route(&request, gtid).await? {
                let router = self.router.as_ref().expect("routed");
                return router
                    .forward_for(Some(self.caller(&request)), to, request.into_inner(), |mut c, r| async move {
                        c.commit(r).await
                    })
                    .await;
            }
            let application = self.application(&request);
            let r = request.into_inner();
            let request = ApiRequest::Commit {
                gtid,
                branches: branches(&r.branches)?,
                wait_for_completion: r.wait_for_completion,
            };
            match self.call_as(application, request).instrument(tracing::debug_span!("Commit", %gtid)).await? {
                Reply::CommitOutcome(o) => Ok(Response::new(commit_response(o))),
                other => Err(unexpected(other)),
            }
        })
        .await
    }

    async fn abort(&self, request: Request<v1::AbortRequest>) -> Result<Response<v1::AbortResponse>, Status> {
        observe("Abort", async {
            let gtid = gtid(&request.get_ref().gtid)?;
            if let Route::Remote(to) = self.route(&request, gtid).await? {
                let router = self.router.as_ref().expect("routed");
                return router
                    .forward_for(Some(self.caller(&request)), to, request.into_inner(), |mut c, r| async move {
                        c.abort(r).await
                    })
                    .await;
            }
            let application = self.application(&request);
            let call = self.call_as(application, ApiRequest::Abort { gtid });
            match call.instrument(tracing::debug_span!("Abort", %gtid)).await? {
                Reply::Aborted => Ok(Response::new(v1::AbortResponse {})),
                other => Err(unexpected(other)),
            }
        })
        .await
    }

    async fn get(&self, request: Request<v1::GetRequest>) -> Result<Response<v1::GetResponse>, Status> {
        observe("Get", async {
            let gtid = gtid(&request.get_ref().gtid)?;
            if let Route::Remote(to) = self.route(&request, gtid).await? {
                let router = self.router.as_ref().expect("routed");
                return router
                    .forward_for(Some(self.caller(&request)), to, request.into_inner(), |mut c, r| async move {
                        c.get(r).await
                    })
                    .await;
            }
            let application = self.application(&request);
            let call = self.call_as(application, ApiRequest::Get { gtid });
            match call.instrument(tracing::debug_span!("Get", %gtid)).await? {
                Reply::Transaction(view) => {
                    Ok(Response::new(v1::GetResponse { transaction: Some(transaction(&view, &self.coordinator_id)) }))
                }
                other => Err(unexpected(other)),
            }
        })
        .await
    }

    async fn list(&self, request: Request<v1::ListRequest>) -> Result<Response<v1::ListResponse>, Status> {
        observe("List", async {
            let peers = match self.router_for(&request) {
                Some(router) => router.state.peers(),
                None => Vec::new(),
            };
            if !peers.is_empty() {
                return self.list_cluster(request.into_inner(), peers).await;
            }
            let r = request.into_inner();
            let states = r
                .states
                .iter()
                .map(|&s| {
                    v1::TransactionState::try_from(s)
                        .ok()
                        .and_then(state_from_wire)
                        .ok_or_else(|| Status::invalid_argument(format!("states: {s} is not a transaction state")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let limit = match r.limit as usize {
                0 => DEFAULT_LIST_LIMIT,
                n if n > MAX_LIST_LIMIT => {
                    return Err(Status::invalid_argument(format!(
                        "limit: {n} is above the maximum of {MAX_LIST_LIMIT}"
                    )));
                }
                n => n,
            };
            let filter = ListFilter {
                states,
                in_doubt: r.in_doubt,
                heuristic: r.heuristic,
                older_than_ms: r.older_than_ms,
                limit,
            };
            match self.call(ApiRequest::List { filter }).instrument(tracing::debug_span!("List")).await? {
                Reply::List { transactions, mut truncated } => {
                    // Bounded in bytes too: branches' errors make a transaction up to ~200 KiB,
                    // and a reply must stay under what clients accept (4 MiB by default).
                    let mut listed = Vec::with_capacity(transactions.len());
                    let mut bytes = 0;
                    for t in &transactions {
                        let t = transaction(t, &self.coordinator_id);
                        bytes += prost::Message::encoded_len(&t);
                        if bytes > MAX_LIST_RESPONSE_BYTES && !listed.is_empty() {
                            truncated = true;
                            break;
                        }
                        listed.push(t);
                    }
                    Ok(Response::new(v1::ListResponse { transactions: listed, truncated }))
                }
                other => Err(unexpected(other)),
            }
        })
        .await
    }

    async fn register_participant(
        &self,
        request: Request<v1::RegisterParticipantRequest>,
    ) -> Result<Response<v1::RegisterParticipantResponse>, Status> {
        observe("RegisterParticipant", async {
            let r = request.into_inner();
            let resource = ResourceId::parse_field("resource_id", &r.resource_id).map_err(invalid)?;
            validate_endpoint(&r.endpoint, self.client_tls).map_err(Status::invalid_argument)?;
            let span = tracing::info_span!("RegisterParticipant", resource = %resource, endpoint = r.endpoint);
            match self.call(ApiRequest::RegisterParticipant { resource, endpoint: r.endpoint }).instrument(span).await?
            {
                Reply::Registered => Ok(Response::new(v1::RegisterParticipantResponse {})),
                other => Err(unexpected(other)),
            }
        })
        .await
    }

    async fn resolve(&self, request: Request<v1::ResolveRequest>) -> Result<Response<v1::ResolveResponse>, Status> {
        observe("Resolve", async {
            let gtid = gtid(&request.get_ref().gtid)?;
            let caller = self.caller(&request);
            if let Route::Remote(to) = self.route(&request, gtid).await? {
                let router = self.router.as_ref().expect("routed");
                let r = request.into_inner();
                return router.forward_for(Some(caller), to, r, |mut c, r| async move { c.resolve(r).await }).await;
            }
            let mut r = request.into_inner();
            // Authenticated, the operator is the principal (a name it declares otherwise is
            // kept beside it).
            if let Some(name) = &caller.principal
                && r.operator != *name
            {
                r.operator = if r.operator.trim().is_empty() {
                    name.clone()
                } else {
                    format!("{name} (declared {:?})", r.operator)
                };
            }
            let request = resolve_request(gtid, r, caller.peer)?;
            let span = tracing::info_span!("Resolve", %gtid, action = %request.action, operator = %request.operator);
            match self.call(ApiRequest::Resolve(request)).instrument(span).await? {
                Reply::Resolved { changed, detail, transaction: t } => Ok(Response::new(v1::ResolveResponse {
                    changed,
                    detail,
                    transaction: Some(transaction(&t, &self.coordinator_id)),
                })),
                other => Err(unexpected(other)),
            }
        })
        .await
    }

    type PipelineStream = pipeline::ReplyStream<v1::CoordinatorReply>;

    async fn pipeline(
        &self,
        request: Request<Streaming<v1::CoordinatorCall>>,
    ) -> Result<Response<Self::PipelineStream>, Status> {
        // Debug: an application may open one per process, and each of its calls has a span.
        let span = tracing::debug_span!("pipeline", peer = ?request.remote_addr());
        tracing::debug!(parent: &span, "pipeline stream opened");
        let service = self.clone();
        let principal = pledge_proto::auth::principal(&request).cloned();
        let calls = request.into_inner();
        let replies = span.in_scope(|| {
            pipeline::serve(calls, self.closing.clone(), MAX_PIPELINE_CALLS_IN_FLIGHT, move |call| {
                service.clone().pipelined(principal.clone(), call)
            })
        });
        Ok(Response::new(replies))
    }

    async fn list_participants(
        &self,
        _request: Request<v1::ListParticipantsRequest>,
    ) -> Result<Response<v1::ListParticipantsResponse>, Status> {
        observe("ListParticipants", async {
            match self.call(ApiRequest::ListParticipants).instrument(tracing::debug_span!("ListParticipants")).await? {
                Reply::Participants(list) => Ok(Response::new(v1::ListParticipantsResponse {
                    participants: list
                        .into_iter()
                        .map(|(r, endpoint)| v1::ParticipantInfo { resource_id: r.to_string(), endpoint })
                        .collect(),
                })),
                other => Err(unexpected(other)),
            }
        })
        .await
    }
}

fn commit_response(o: CommitOutcome) -> v1::CommitResponse {
    v1::CommitResponse {
        outcome: if o.committed { v1::Outcome::Committed } else { v1::Outcome::Aborted } as i32,
        reason: o.reason.unwrap_or_default(),
        completed: o.completed,
        heuristic: o.heuristic,
    }
}

pub fn state_to_wire(s: TxnState) -> v1::TransactionState {
    match s {
        TxnState::Active => v1::TransactionState::Active,
        TxnState::Preparing => v1::TransactionState::Preparing,
        TxnState::Committing => v1::TransactionState::Committing,
        TxnState::Committed => v1::TransactionState::Committed,
        TxnState::Aborting => v1::TransactionState::Aborting,
        TxnState::Aborted => v1::TransactionState::Aborted,
    }
}

fn state_from_wire(s: v1::TransactionState) -> Option<TxnState> {
    Some(match s {
        v1::TransactionState::Unspecified => return None,
        v1::TransactionState::Active => TxnState::Active,
        v1::TransactionState::Preparing => TxnState::Preparing,
        v1::TransactionState::Committing => TxnState::Committing,
        v1::TransactionState::Committed => TxnState::Committed,
        v1::TransactionState::Aborting => TxnState::Aborting,
        v1::TransactionState::Aborted => TxnState::Aborted,
    })
}

fn vote_to_wire(v: Option<Vote>) -> v1::Vote {
    match v {
        None => v1::Vote::Unspecified,
        Some(Vote::Prepared) => v1::Vote::Prepared,
        Some(Vote::ReadOnly) => v1::Vote::ReadOnly,
        Some(Vote::Aborted) => v1::Vote::Aborted,
    }
}

fn outcome_to_wire(o: Option<BranchOutcome>) -> v1::BranchOutcome {
    match o {
        None => v1::BranchOutcome::Unspecified,
        Some(BranchOutcome::Committed) => v1::BranchOutcome::Committed,
        Some(BranchOutcome::Aborted) => v1::BranchOutcome::Aborted,
        Some(BranchOutcome::HeuristicCommit) => v1::BranchOutcome::HeuristicCommit,
        Some(BranchOutcome::HeuristicRollback) => v1::BranchOutcome::HeuristicRollback,
        Some(BranchOutcome::HeuristicMixed) => v1::BranchOutcome::HeuristicMixed,
        Some(BranchOutcome::HeuristicHazard) => v1::BranchOutcome::HeuristicHazard,
    }
}

fn transaction(t: &TxnView, coordinator_id: &str) -> v1::Transaction {
    v1::Transaction {
        gtid: t.gtid.to_string(),
        state: state_to_wire(t.state) as i32,
        abort_reason: t.abort_reason.clone().unwrap_or_default(),
        created_unix_ms: t.created_ms,
        deadline_unix_ms: t.deadline_ms,
        decided_unix_ms: t.decided_ms,
        completed_unix_ms: t.completed_ms,
        branches: t.branches.iter().map(|b| branch(b, t.gtid, coordinator_id)).collect(),
        one_phase: t.one_phase,
        idempotency_key: t.idempotency_key.clone().unwrap_or_default(),
        heuristic: t.heuristic,
        protocol: match t.protocol {
            Protocol::TwoPhase => v1::Protocol::TwoPhase,
            Protocol::ThreePhase => v1::Protocol::ThreePhase,
        } as i32,
        heuristic_mixed: t.heuristic_mixed,
        resolutions: t.resolutions.iter().map(|r| resolution(r)).collect(),
        heuristic_resolved: t.heuristic_resolved,
        owner: t.owner.as_deref().unwrap_or_default().to_string(),
    }
}

fn resolution(r: &ResolveRecord) -> v1::Resolution {
    let (resource_id, branch_id) =
        r.branch.as_ref().map(|b| (b.resource.to_string(), b.branch.to_string())).unwrap_or_default();
    v1::Resolution {
        at_unix_ms: r.at_ms,
        action: match r.action {
            ResolveAction::Commit => v1::ResolveAction::Commit,
            ResolveAction::Rollback => v1::ResolveAction::Rollback,
            ResolveAction::Forget => v1::ResolveAction::Forget,
        } as i32,
        resource_id,
        branch_id,
        operator: r.operator.clone(),
        peer: r.peer.clone(),
        reason: r.reason.clone(),
        effect: match r.effect {
            ResolveEffect::Retried => v1::ResolveEffect::Retried,
            ResolveEffect::BranchSettled => v1::ResolveEffect::BranchSettled,
            ResolveEffect::Decided => v1::ResolveEffect::Decided,
            ResolveEffect::Forgotten => v1::ResolveEffect::Forgotten,
        } as i32,
    }
}

fn protocol(value: i32) -> Result<Protocol, Status> {
    match v1::Protocol::try_from(value) {
        Ok(v1::Protocol::Unspecified | v1::Protocol::TwoPhase) => Ok(Protocol::TwoPhase),
        Ok(v1::Protocol::ThreePhase) => Ok(Protocol::ThreePhase),
        Err(_) => {
            Err(Status::invalid_argument(format!("protocol: {value} is not a protocol (1: two-phase, 2: three-phase)")))
        }
    }
}

fn participant_state_to_wire(state: Option<ParticipantState>) -> v1::BranchState {
    match state {
        None => v1::BranchState::Unspecified,
        Some(ParticipantState::Unknown) => v1::BranchState::Unknown,
        Some(ParticipantState::Active) => v1::BranchState::Active,
        Some(ParticipantState::Prepared) => v1::BranchState::Prepared,
        Some(ParticipantState::PreCommitted) => v1::BranchState::Precommitted,
        Some(ParticipantState::Committed) => v1::BranchState::Committed,
        Some(ParticipantState::Aborted) => v1::BranchState::Aborted,
    }
}

fn branch(b: &BranchView, gtid: Gtid, coordinator_id: &str) -> v1::Branch {
    let xid = pledge_proto::Xid { resource: b.key.resource.clone(), gtid, branch: b.key.branch.clone() };
    let xid = pledge_proto::xa::XaXid::new(coordinator_id, &xid).ok().map(|x| v1::XaXid {
        format_id: pledge_proto::xa::FORMAT_ID,
        gtrid: x.gtrid,
        bqual: x.bqual,
    });
    v1::Branch {
        xid,
        resource_id: b.key.resource.to_string(),
        branch_id: b.key.branch.to_string(),
        vote: vote_to_wire(b.vote) as i32,
        metadata: b.metadata.to_vec(),
        acknowledged: b.acknowledged,
        outcome: outcome_to_wire(b.outcome) as i32,
        attempts: b.attempts,
        last_error: b.last_error.clone().unwrap_or_default(),
        next_retry_unix_ms: b.next_retry_ms,
        prepared_unix_ms: b.prepared_ms,
        may_be_empty: b.may_be_empty,
        participant_state: participant_state_to_wire(b.participant_state) as i32,
        resolved: b.resolved,
    }
}
