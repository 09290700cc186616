//! The gRPC Participant service around a [`Participant`] implementation.

use std::sync::Arc;

use anyhow::Context;
use futures::future::join_all;
use pledge_proto::metrics::observe;
use pledge_proto::pipeline;
use pledge_proto::transport::{ListenAddr, Listener};
use pledge_proto::v1::participant_server::{Participant as _, ParticipantServer};
use pledge_proto::v1::{self};
use pledge_proto::{IdError, MAX_VOTE_METADATA_BYTES, ResourceId, Xid, bounded_reason};
use tokio_util::sync::CancellationToken;
use tonic::service::RoutesBuilder;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::{
    BranchState, BranchStatus, CommitKind, MAX_DOCOMMIT_WAIT_MS, MAX_PRECOMMIT_WAIT_MS, Outcome, Participant,
    RecoverQuery, ThreePhaseError, Vote,
};

/// Most branches accepted in one call (the coordinator sends at most 512 by default).
pub const MAX_BRANCHES_PER_CALL: usize = 4096;
/// Largest request, in bytes.
pub const MAX_REQUEST_BYTES: usize = 4 << 20;
/// Most in-doubt branches in one Recover response (each may carry 4 KiB of metadata, and the
/// response must stay well under the 4 MiB a gRPC client accepts by default).
pub const MAX_RECOVER_PAGE: usize = 500;
/// Most calls of one pipeline stream handled at a time; the server reads no more of the stream
/// until one is answered. (The coordinator keeps a few calls of each kind in flight.)
pub const MAX_PIPELINE_CALLS_IN_FLIGHT: usize = 256;

/// Why PreCommit and QueryState answer UNIMPLEMENTED, and a three-phase Prepare votes no: the
/// participant does not offer [`crate::ThreePhase`] (see [`Participant::three_phase`]).
const NO_THREE_PHASE: &str = "this participant does not support three-phase commit";

/// gRPC health checking, server reflection and the Participant service for `participant`.
/// Add a work API with `.add_service(...)` and serve with [`serve`], or with
/// `tonic::transport::Server::builder().add_routes(routes.routes())`.
///
/// `closing` must be cancelled when the server shuts down (as [`serve`] does): it ends the
/// pipeline streams (after the calls they carry are answered), which a graceful shutdown would
/// otherwise wait for forever. Serving the routes yourself, cancel it before (or with) the
/// server's own shutdown signal.
pub async fn routes<P: Participant>(participant: Arc<P>, closing: CancellationToken) -> RoutesBuilder {
    routes_for(ParticipantService::new(participant, closing)).await
}

/// [`routes`] around a service set up by hand (e.g. [`ParticipantService::without_pipeline`]).
pub async fn routes_for<P: Participant>(service: ParticipantService<P>) -> RoutesBuilder {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<ParticipantServer<ParticipantService<P>>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pledge_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the embedded descriptor sets are valid");
    let mut routes = RoutesBuilder::default();
    routes
        .add_service(health_service)
        .add_service(reflection)
        .add_service(ParticipantServer::new(service).max_decoding_message_size(MAX_REQUEST_BYTES));
    routes
}

/// Runs `work` to completion in its own task, even if the caller stops waiting.
///
/// A gRPC call is cancelled when its deadline passes or its client goes away: tonic drops the
/// handler future at its next await. A participant operation stopped half-way (a prepare
/// recorded but its branch not updated, a connection taken out of its slot but not returned)
/// breaks the adapter's invariants, so every call's work on its branches runs detached (one
/// task per call, its branches concurrently inside it), and the call only waits for it.
pub async fn detached<T, F>(work: F) -> Result<T, Status>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    tokio::spawn(work).await.map_err(|e| Status::internal(format!("the operation failed: {e}")))
}

/// A vote on the wire, naming its branch (`xid`, as the request did).
fn prepare_result(xid: Option<v1::BranchXid>, vote: Result<Vote, crate::Error>) -> v1::PrepareResult {
    let result = match vote {
        Ok(Vote::Prepared { metadata }) if metadata.len() > MAX_VOTE_METADATA_BYTES => v1::PrepareResult {
            vote: v1::Vote::Aborted as i32,
            metadata: Vec::new(),
            reason: format!("participant bug: {} bytes of metadata exceed {MAX_VOTE_METADATA_BYTES}", metadata.len()),
            ..Default::default()
        },
        Ok(Vote::Prepared { metadata }) => {
            v1::PrepareResult { vote: v1::Vote::Prepared as i32, metadata, ..Default::default() }
        }
        Ok(Vote::ReadOnly) => v1::PrepareResult { vote: v1::Vote::ReadOnly as i32, ..Default::default() },
        Ok(Vote::Aborted { reason }) => {
            v1::PrepareResult { vote: v1::Vote::Aborted as i32, reason: bounded_reason(reason), ..Default::default() }
        }
        // A prepare that failed is a "no": the coordinator aborts (presumed abort makes that
        // safe) and tells this branch too, in case it prepared before failing.
        Err(e) => v1::PrepareResult {
            vote: v1::Vote::Aborted as i32,
            metadata: Vec::new(),
            reason: bounded_reason(format!("prepare failed: {e}")),
            ..Default::default()
        },
    };
    v1::PrepareResult { xid, ..result }
}

/// Adapts a [`Participant`] to the generated gRPC service: validation, batching, tracing.
pub struct ParticipantService<P> {
    participant: Arc<P>,
    /// Cancelled at shutdown: ends the pipeline streams.
    closing: CancellationToken,
    /// Whether `Pipeline` is offered (else it answers UNIMPLEMENTED).
    pipeline: bool,
}

impl<P> ParticipantService<P> {
    pub fn new(participant: Arc<P>, closing: CancellationToken) -> Self {
        ParticipantService { participant, closing, pipeline: true }
    }

    /// Answers `Pipeline` with UNIMPLEMENTED, as a participant written without it does: the
    /// coordinator then makes unary calls. For tests of that path, and for networks whose
    /// proxies cut long-lived streams.
    pub fn without_pipeline(self) -> Self {
        ParticipantService { pipeline: false, ..self }
    }
}

impl<P> Clone for ParticipantService<P> {
    fn clone(&self) -> Self {
        ParticipantService {
            participant: self.participant.clone(),
            closing: self.closing.clone(),
            pipeline: self.pipeline,
        }
    }
}

impl<P: Participant> ParticipantService<P> {
    /// One call from a pipeline stream, handled exactly as the unary call of its kind.
    async fn pipelined(self, call: v1::participant_call::Call) -> Result<v1::participant_reply::Reply, Status> {
        use v1::participant_call::Call;
        use v1::participant_reply::Reply;
        match call {
            Call::Prepare(r) => self.prepare(Request::new(r)).await.map(|r| Reply::Prepare(r.into_inner())),
            Call::Commit(r) => self.commit(Request::new(r)).await.map(|r| Reply::Commit(r.into_inner())),
            Call::Abort(r) => self.abort(Request::new(r)).await.map(|r| Reply::Abort(r.into_inner())),
            Call::PreCommit(r) => self.pre_commit(Request::new(r)).await.map(|r| Reply::PreCommit(r.into_inner())),
            Call::QueryState(r) => self.query_state(Request::new(r)).await.map(|r| Reply::QueryState(r.into_inner())),
        }
    }
}

fn coordinator_id(value: &str) -> Result<(), Status> {
    ResourceId::parse_field("coordinator_id", value).map(drop).map_err(|e| Status::invalid_argument(e.to_string()))
}

/// Parses every xid of a call up front, so a malformed one refuses the whole call and nothing
/// happens to the others.
fn xids<'a>(items: impl Iterator<Item = Option<&'a v1::BranchXid>>) -> Result<Vec<Xid>, Status> {
    let mut out = Vec::new();
    for (i, item) in items.enumerate() {
        if i >= MAX_BRANCHES_PER_CALL {
            return Err(Status::invalid_argument(format!(
                "branches: more than {MAX_BRANCHES_PER_CALL} branches in one call"
            )));
        }
        let xid = item.ok_or_else(|| Status::invalid_argument(format!("branches[{i}].xid: is required")))?;
        out.push(Xid::try_from(xid).map_err(|e: IdError| Status::invalid_argument(format!("branches[{i}].{e}")))?);
    }
    Ok(out)
}

/// A three-phase call's epoch: 0 is not one (the coordinator's epochs start at 1).
fn epoch(value: u64) -> Result<u64, Status> {
    match value {
        0 => Err(Status::invalid_argument("epoch: is required (a coordinator's epochs start at 1)")),
        epoch => Ok(epoch),
    }
}

/// A branch's state on the wire, naming its branch (`xid`, as the request did).
fn state_result(xid: Option<v1::BranchXid>, status: BranchStatus) -> v1::BranchStateResult {
    use v1::BranchState as S;
    let state = match status.state {
        BranchState::Unknown => S::Unknown,
        BranchState::Active => S::Active,
        BranchState::Prepared => S::Prepared,
        BranchState::PreCommitted => S::Precommitted,
        BranchState::Committed => S::Committed,
        BranchState::Aborted => S::Aborted,
    };
    v1::BranchStateResult {
        xid,
        state: state as i32,
        deadline_unix_ms: status.deadline_unix_ms,
        reason: bounded_reason(status.reason),
    }
}

/// The one place where a three-phase refusal or failure becomes the call's status.
fn three_phase_status(i: usize, xid: &Xid, e: &ThreePhaseError) -> Status {
    let message = format!("branches[{i}] ({xid}): {e}");
    match e {
        ThreePhaseError::StaleEpoch { .. } | ThreePhaseError::NotThreePhase { .. } => {
            Status::failed_precondition(message)
        }
        ThreePhaseError::Failed(_) => Status::unavailable(message),
    }
}

/// The results of a PreCommit or QueryState in request order; if a branch was refused, the
/// call fails with the first refusal (FAILED_PRECONDITION), else with the first failure
/// (UNAVAILABLE: the caller asks again; every branch's answer is idempotent).
fn state_results(
    xids: &[Xid],
    wire: Vec<Option<v1::BranchXid>>,
    results: Vec<Result<BranchStatus, ThreePhaseError>>,
) -> Result<Vec<v1::BranchStateResult>, Status> {
    let refused = |e: &&ThreePhaseError| !matches!(e, ThreePhaseError::Failed(_));
    let errors = || results.iter().enumerate().filter_map(|(i, r)| r.as_ref().err().map(|e| (i, e)));
    if let Some((i, e)) = errors().find(|(_, e)| refused(e)).or_else(|| errors().next()) {
        return Err(three_phase_status(i, &xids[i], e));
    }
    Ok(wire.into_iter().zip(results).map(|(xid, r)| state_result(xid, r.expect("no errors"))).collect())
}

/// Logs (where it is handled) and counts one branch's three-phase answer.
fn three_phase_answered(operation: &'static str, xid: &Xid, result: &Result<BranchStatus, ThreePhaseError>) {
    match result {
        Ok(status) => tracing::debug!(operation, %xid, ?status, "answered"),
        Err(e @ ThreePhaseError::Failed(_)) => {
            tracing::warn!(operation, %xid, error = %e, "failed; the coordinator asks again")
        }
        Err(e) => tracing::warn!(operation, %xid, error = %e, "refused"),
    }
    crate::metrics::three_phase(operation, result);
}

/// A branch's phase-2 result on the wire, naming its branch (`xid`, as the request did);
/// `operation` (commit, one_phase_commit, abort) names it in the log and the metrics. Runs in
/// the branch's span. A failure (the coordinator retries) and a heuristic outcome are logged
/// here, where they are handled.
fn outcome_result(
    operation: &'static str,
    xid: Option<v1::BranchXid>,
    result: Result<Outcome, crate::Error>,
) -> v1::BranchResult {
    use v1::BranchOutcome as O;
    match &result {
        Err(e) => tracing::warn!(operation, error = %e, "branch operation failed; the coordinator retries"),
        Ok(Outcome::Committed | Outcome::Aborted { .. }) => tracing::debug!(operation, ?result, "branch finished"),
        Ok(outcome) => tracing::warn!(operation, ?outcome, "heuristic outcome"),
    }
    crate::metrics::finished(operation, &result);
    let (outcome, reason) = match result {
        Ok(Outcome::Committed) => (O::Committed, String::new()),
        Ok(Outcome::Aborted { reason }) => (O::Aborted, reason),
        Ok(Outcome::HeuristicCommit { reason }) => (O::HeuristicCommit, reason),
        Ok(Outcome::HeuristicRollback { reason }) => (O::HeuristicRollback, reason),
        Ok(Outcome::HeuristicMixed { reason }) => (O::HeuristicMixed, reason),
        Ok(Outcome::HeuristicHazard { reason }) => (O::HeuristicHazard, reason),
        Err(e) => (O::Retry, e.0),
    };
    v1::BranchResult { outcome: outcome as i32, reason: bounded_reason(reason), xid }
}

#[tonic::async_trait]
impl<P: Participant> v1::participant_server::Participant for ParticipantService<P> {
    async fn prepare(&self, request: Request<v1::PrepareRequest>) -> Result<Response<v1::PrepareResponse>, Status> {
        observe("Prepare", async {
            let r = request.into_inner();
            coordinator_id(&r.coordinator_id)?;
            let xids = xids(r.branches.iter().map(|b| b.xid.as_ref()))?;
            if let Some((i, b)) =
                r.branches.iter().enumerate().find(|(_, b)| b.precommit_wait_ms > MAX_PRECOMMIT_WAIT_MS)
            {
                return Err(Status::invalid_argument(format!(
                    "branches[{i}].precommit_wait_ms: {} ms exceeds the limit of {MAX_PRECOMMIT_WAIT_MS} ms",
                    b.precommit_wait_ms
                )));
            }
            let span = tracing::debug_span!("prepare", coordinator = r.coordinator_id, branches = xids.len());
            let (p, coordinator, branches) = (self.participant.clone(), r.coordinator_id, r.branches);
            let votes = detached(
                async move {
                    let (p, coordinator) = (&p, &coordinator);
                    join_all(xids.iter().zip(&branches).map(|(xid, b)| {
                        async move {
                            let (operation, vote) = match (b.precommit_wait_ms, p.three_phase()) {
                                (0, _) => ("prepare", p.prepare(coordinator, xid, b.may_be_empty).await),
                                (wait, Some(three)) => {
                                    ("can_commit", three.can_commit(coordinator, xid, b.may_be_empty, wait).await)
                                }
                                // A three-phase vote promises a self-deadline this participant
                                // does not keep: no (never a two-phase yes in its place).
                                (_, None) => ("can_commit", Ok(Vote::Aborted { reason: NO_THREE_PHASE.into() })),
                            };
                            match &vote {
                                Err(e) => tracing::warn!(%xid, operation, error = %e, "prepare failed; voting no"),
                                _ => tracing::debug!(%xid, operation, ?vote, "prepared"),
                            }
                            crate::metrics::prepared(operation, &vote);
                            prepare_result(b.xid.clone(), vote)
                        }
                        .instrument(tracing::debug_span!("branch", %xid))
                    }))
                    .await
                }
                .instrument(span),
            )
            .await?;
            Ok(Response::new(v1::PrepareResponse { results: votes }))
        })
        .await
    }

    async fn commit(
        &self,
        request: Request<v1::CommitBranchesRequest>,
    ) -> Result<Response<v1::CommitBranchesResponse>, Status> {
        observe("Commit", async {
            let r = request.into_inner();
            coordinator_id(&r.coordinator_id)?;
            let xids = xids(r.branches.iter().map(|b| b.xid.as_ref()))?;
            let span = tracing::debug_span!("commit", coordinator = r.coordinator_id, branches = xids.len());
            let (p, coordinator, branches) = (self.participant.clone(), r.coordinator_id, r.branches);
            let results = detached(
                async move {
                    let (p, coordinator) = (&p, &coordinator);
                    join_all(xids.iter().zip(&branches).map(|(xid, b)| {
                        async move {
                            let kind = match b.one_phase {
                                true => CommitKind::OnePhase { may_be_empty: b.may_be_empty },
                                false => CommitKind::TwoPhase,
                            };
                            let result = p.commit(coordinator, xid, kind, &b.metadata).await;
                            let operation = if b.one_phase { "one_phase_commit" } else { "commit" };
                            outcome_result(operation, b.xid.clone(), result)
                        }
                        .instrument(tracing::debug_span!("branch", %xid))
                    }))
                    .await
                }
                .instrument(span),
            )
            .await?;
            Ok(Response::new(v1::CommitBranchesResponse { results }))
        })
        .await
    }

    async fn abort(
        &self,
        request: Request<v1::AbortBranchesRequest>,
    ) -> Result<Response<v1::AbortBranchesResponse>, Status> {
        observe("Abort", async {
            let r = request.into_inner();
            coordinator_id(&r.coordinator_id)?;
            let xids = xids(r.branches.iter().map(|b| b.xid.as_ref()))?;
            let span = tracing::debug_span!("abort", coordinator = r.coordinator_id, branches = xids.len());
            let (p, coordinator, branches) = (self.participant.clone(), r.coordinator_id, r.branches);
            let results = detached(
                async move {
                    let (p, coordinator) = (&p, &coordinator);
                    join_all(xids.iter().zip(&branches).map(|(xid, b)| {
                        async move {
                            let result = p.abort(coordinator, xid, &b.metadata).await;
                            outcome_result("abort", b.xid.clone(), result)
                        }
                        .instrument(tracing::debug_span!("branch", %xid))
                    }))
                    .await
                }
                .instrument(span),
            )
            .await?;
            Ok(Response::new(v1::AbortBranchesResponse { results }))
        })
        .await
    }

    type PipelineStream = pipeline::ReplyStream<v1::ParticipantReply>;

    async fn pipeline(
        &self,
        request: Request<Streaming<v1::ParticipantCall>>,
    ) -> Result<Response<Self::PipelineStream>, Status> {
        if !self.pipeline {
            return Err(Status::unimplemented("this participant serves unary calls only"));
        }
        let span = tracing::info_span!("pipeline", peer = ?request.remote_addr());
        tracing::info!(parent: &span, "pipeline stream opened");
        let service = self.clone();
        let calls = request.into_inner();
        let replies = span.in_scope(|| {
            pipeline::serve(calls, self.closing.clone(), MAX_PIPELINE_CALLS_IN_FLIGHT, move |call| {
                service.clone().pipelined(call)
            })
        });
        Ok(Response::new(replies))
    }

    async fn pre_commit(
        &self,
        request: Request<v1::PreCommitRequest>,
    ) -> Result<Response<v1::PreCommitResponse>, Status> {
        observe("PreCommit", async {
            if self.participant.three_phase().is_none() {
                return Err(Status::unimplemented(NO_THREE_PHASE));
            }
            let r = request.into_inner();
            coordinator_id(&r.coordinator_id)?;
            let epoch = epoch(r.epoch)?;
            let xids = xids(r.branches.iter().map(|b| b.xid.as_ref()))?;
            let bad_wait = |b: &&v1::PreCommitBranch| !(1..=MAX_DOCOMMIT_WAIT_MS).contains(&b.docommit_wait_ms);
            if let Some((i, b)) = r.branches.iter().enumerate().find(|(_, b)| bad_wait(b)) {
                return Err(Status::invalid_argument(format!(
                    "branches[{i}].docommit_wait_ms: {} ms; it must be 1 to {MAX_DOCOMMIT_WAIT_MS} ms",
                    b.docommit_wait_ms
                )));
            }
            let span = tracing::debug_span!("pre_commit", coordinator = r.coordinator_id, epoch, branches = xids.len());
            let (p, coordinator, branches) = (self.participant.clone(), r.coordinator_id, r.branches);
            let (xids, results, wire) = detached(
                async move {
                    let (three, coordinator) = (p.three_phase().expect("checked above"), &coordinator);
                    let results = join_all(xids.iter().zip(&branches).map(|(xid, b)| {
                        async move {
                            let r = three.pre_commit(coordinator, epoch, xid, &b.metadata, b.docommit_wait_ms).await;
                            three_phase_answered("pre_commit", xid, &r);
                            r
                        }
                        .instrument(tracing::debug_span!("branch", %xid))
                    }))
                    .await;
                    (xids, results, branches.into_iter().map(|b| b.xid).collect())
                }
                .instrument(span),
            )
            .await?;
            Ok(Response::new(v1::PreCommitResponse { results: state_results(&xids, wire, results)? }))
        })
        .await
    }

    async fn query_state(
        &self,
        request: Request<v1::QueryStateRequest>,
    ) -> Result<Response<v1::QueryStateResponse>, Status> {
        observe("QueryState", async {
            if self.participant.three_phase().is_none() {
                return Err(Status::unimplemented(NO_THREE_PHASE));
            }
            let r = request.into_inner();
            coordinator_id(&r.coordinator_id)?;
            let xids = xids(r.branches.iter().map(Some))?;
            if xids.is_empty() {
                // The capability probe: three-phase commit is supported.
                return Ok(Response::new(v1::QueryStateResponse { results: Vec::new() }));
            }
            // Epoch 0 (below every coordinator's) asks as an observer: nothing is recorded.
            let epoch = r.epoch;
            let span =
                tracing::debug_span!("query_state", coordinator = r.coordinator_id, epoch, branches = xids.len());
            let (p, coordinator) = (self.participant.clone(), r.coordinator_id);
            let (xids, results) = detached(
                async move {
                    let (three, coordinator) = (p.three_phase().expect("checked above"), &coordinator);
                    let results = join_all(xids.iter().map(|xid| {
                        async move {
                            let r = three.query_state(coordinator, epoch, xid).await;
                            three_phase_answered("query_state", xid, &r);
                            r
                        }
                        .instrument(tracing::debug_span!("branch", %xid))
                    }))
                    .await;
                    (xids, results)
                }
                .instrument(span),
            )
            .await?;
            let wire = r.branches.into_iter().map(Some).collect();
            Ok(Response::new(v1::QueryStateResponse { results: state_results(&xids, wire, results)? }))
        })
        .await
    }

    async fn recover(&self, request: Request<v1::RecoverRequest>) -> Result<Response<v1::RecoverResponse>, Status> {
        observe("Recover", async {
            let r = request.into_inner();
            coordinator_id(&r.coordinator_id)?;
            let mut resources = r
                .resource_ids
                .iter()
                .map(|id| ResourceId::parse_field("resource_ids", id))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            resources.sort();
            resources.dedup();
            let after = r
                .after
                .as_ref()
                .map(Xid::try_from)
                .transpose()
                .map_err(|e| Status::invalid_argument(format!("after.{e}")))?;
            let limit = match r.limit as usize {
                0 => MAX_RECOVER_PAGE,
                n => n.min(MAX_RECOVER_PAGE),
            };
            let span = tracing::info_span!("recover", coordinator = r.coordinator_id, resources = ?r.resource_ids);
            let query = RecoverQuery { resources, after, limit };
            let page = self
                .participant
                .recover(&r.coordinator_id, &query)
                .instrument(span)
                .await
                .map_err(|e| Status::unavailable(format!("recover failed: {e}")))?;
            // The implementation's page, held to the contract: only what was asked, in order,
            // no more than the limit.
            let mut branches: Vec<_> = page
                .branches
                .into_iter()
                .filter(|b| query.resources.is_empty() || query.resources.contains(&b.xid.resource))
                .filter(|b| query.after.as_ref().is_none_or(|a| b.xid > *a))
                .collect();
            branches.sort_by(|a, b| a.xid.cmp(&b.xid));
            let truncated = page.truncated || branches.len() > limit;
            branches.truncate(limit);
            Ok(Response::new(v1::RecoverResponse {
                branches: branches
                    .into_iter()
                    .map(|b| v1::InDoubtBranch {
                        xid: Some((&b.xid).into()),
                        metadata: b.metadata,
                        prepared_unix_ms: b.prepared_unix_ms,
                    })
                    .collect(),
                truncated,
            }))
        })
        .await
    }
}

/// Logging for a participant's binary: `RUST_LOG` (default `info`) to stderr, and OpenTelemetry
/// trace export when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (see `pledge_proto::telemetry`; the
/// service is named after the binary, or `OTEL_SERVICE_NAME`). [`serve`] sends the queued spans
/// when the server stops. A malformed endpoint ends the process with the reason: a participant
/// asked to export traces does not run silently without.
pub fn init_logging() {
    let settings = pledge_proto::telemetry::Settings::for_executable("pledge-participant", "info");
    if let Err(e) = pledge_proto::telemetry::init(settings) {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
}

/// A participant server's TLS and authentication options (every participant binary takes
/// them: see [`pledge_proto::tls`] and [`pledge_proto::auth`]). Mutual TLS (`--tls-client-ca`)
/// with an `--auth-file` naming the coordinators is what to run with: the Participant service
/// then takes calls from coordinators only.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ServerSecurityArgs {
    /// Serve TLS with this certificate chain (PEM); with --tls-key. Reloaded on SIGHUP.
    #[arg(long, env = "PLEDGE_TLS_CERT")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, env = "PLEDGE_TLS_KEY")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Mutual TLS: accept only clients with a certificate from this CA (PEM).
    #[arg(long, env = "PLEDGE_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<std::path::PathBuf>,
    /// Authenticate and authorize every call against the principals in this TOML file
    /// (tokens by SHA-256, client certificates by subject CN, each with a role); reloaded on
    /// SIGHUP. Without it every call is taken.
    #[arg(long, env = "PLEDGE_AUTH_FILE")]
    pub auth_file: Option<std::path::PathBuf>,
}

impl ServerSecurityArgs {
    /// The TLS these options ask for, loaded (`None`: plaintext).
    pub fn load(&self) -> anyhow::Result<Option<pledge_proto::tls::ServerTls>> {
        let files = pledge_proto::tls::ServerTlsFiles::from_options(
            self.tls_cert.clone(),
            self.tls_key.clone(),
            self.tls_client_ca.clone(),
        )?;
        Ok(files.map(pledge_proto::tls::ServerTls::load).transpose()?)
    }
}

/// Serves `routes` on `listen` (`host:port` or `unix:<path>`), with `tls` when given, until
/// SIGTERM or Ctrl-C, or until `shutdown` is cancelled (a signal cancels it; pass the token
/// given to [`routes`]). Prints `listening on <addr>` to stdout once the socket is open (scripts
/// and tests wait for that line; port 0 picks a free one). SIGHUP reloads the certificates.
pub async fn serve(
    listen: &ListenAddr,
    security: &ServerSecurityArgs,
    routes: RoutesBuilder,
    what: &str,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let tls = security.load()?;
    let auth = security.auth_file.as_deref().map(pledge_proto::auth::Auth::load).transpose()?;
    pledge_proto::tls::check_listen(listen, tls.as_ref())?;
    if (tls.is_none() || auth.is_none()) && pledge_proto::tls::exposed(listen) {
        tracing::warn!(%listen, tls = tls.is_some(), auth = auth.is_some(), "serving WITHOUT TLS AND AUTHENTICATION \
            on an address other hosts can reach: use --tls-cert, --tls-key, --tls-client-ca and --auth-file");
    }
    let listener = Listener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    println!("listening on {addr}");
    tracing::info!(%addr, tls = tls.is_some(), mutual_tls = tls.as_ref().is_some_and(|t| t.mutual()), "{what} serving");
    pledge_proto::tls::reload_on_sighup(tls.clone(), Vec::new(), auth.clone());
    let signalled = shutdown.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        signalled.cancel();
    });
    let router = pledge_proto::transport::server(auth).add_routes(routes.routes());
    let served = listener.serve(router, shutdown.cancelled_owned(), tls).await;
    // The spans of the last calls go out before the process ends.
    pledge_proto::telemetry::flush();
    served?;
    Ok(())
}

/// Serves Prometheus metrics (`GET /metrics`) on `listen` until `shutdown` is cancelled, and
/// prints `metrics on <addr>` to stdout (port 0 picks a free one). Call it before opening the
/// participant's state, so that everything from then on is recorded; without it the SDK's
/// metrics are not recorded at all. `describe` registers the help texts of the adapter's own
/// metrics (the SDK's and the log's are registered here).
pub async fn serve_metrics(
    listen: std::net::SocketAddr,
    describe: impl FnOnce(),
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let describe = || {
        crate::metrics::describe();
        describe();
    };
    let addr = pledge_proto::metrics::serve(listen, describe, shutdown)
        .await
        .with_context(|| format!("cannot serve metrics on {listen}"))?;
    println!("metrics on {addr}");
    tracing::info!(%addr, "metrics served at http://{addr}/metrics");
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C: the adapters' binaries shut down cleanly on either.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use pledge_proto::v1::participant_server::Participant as _;

    use super::*;
    use crate::{Error, RecoverPage};

    /// A two-phase participant that votes yes and counts the prepares it is asked for.
    #[derive(Default)]
    struct TwoPhaseOnly {
        prepares: AtomicUsize,
    }

    #[tonic::async_trait]
    impl Participant for TwoPhaseOnly {
        async fn prepare(&self, _: &str, _: &Xid, _: bool) -> Result<Vote, Error> {
            self.prepares.fetch_add(1, Ordering::SeqCst);
            Ok(Vote::Prepared { metadata: Vec::new() })
        }
        async fn commit(&self, _: &str, _: &Xid, _: CommitKind, _: &[u8]) -> Result<Outcome, Error> {
            Ok(Outcome::Committed)
        }
        async fn abort(&self, _: &str, _: &Xid, _: &[u8]) -> Result<Outcome, Error> {
            Ok(Outcome::Aborted { reason: String::new() })
        }
        async fn recover(&self, _: &str, _: &RecoverQuery) -> Result<RecoverPage, Error> {
            Ok(RecoverPage::default())
        }
    }

    fn xid(branch: &str) -> v1::BranchXid {
        v1::BranchXid {
            resource_id: "db1".into(),
            gtid: pledge_proto::Gtid::new_v7().to_string(),
            branch_id: branch.into(),
        }
    }

    #[tokio::test]
    async fn a_participant_without_three_phase_commit_refuses_it_and_never_downgrades() {
        let p = Arc::new(TwoPhaseOnly::default());
        let service = ParticipantService::new(p.clone(), CancellationToken::new());
        let (two, three) = (xid("two"), xid("three"));
        let request = v1::PrepareRequest {
            coordinator_id: "c1".into(),
            branches: vec![
                v1::PrepareBranch { xid: Some(two.clone()), ..Default::default() },
                v1::PrepareBranch { xid: Some(three.clone()), precommit_wait_ms: 5_000, ..Default::default() },
            ],
        };
        let votes = service.prepare(Request::new(request)).await.unwrap().into_inner().results;
        assert_eq!(votes[0].vote(), v1::Vote::Prepared);
        // The three-phase vote is a no, and the participant never prepared the branch.
        assert_eq!((votes[1].vote(), votes[1].xid.as_ref()), (v1::Vote::Aborted, Some(&three)));
        assert!(votes[1].reason.contains("three-phase"), "{}", votes[1].reason);
        assert_eq!(p.prepares.load(Ordering::SeqCst), 1);

        // PreCommit and QueryState (the capability probe included): UNIMPLEMENTED, unary and
        // on the pipeline alike.
        let pre_commit = v1::PreCommitRequest {
            coordinator_id: "c1".into(),
            epoch: 1,
            branches: vec![v1::PreCommitBranch { xid: Some(two), docommit_wait_ms: 5_000, ..Default::default() }],
        };
        let probe = v1::QueryStateRequest { coordinator_id: "c1".into(), epoch: 1, branches: vec![] };
        let e = service.pre_commit(Request::new(pre_commit.clone())).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unimplemented, "{e}");
        let e = service.query_state(Request::new(probe.clone())).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unimplemented, "{e}");
        for call in [v1::participant_call::Call::PreCommit(pre_commit), v1::participant_call::Call::QueryState(probe)] {
            let e = service.clone().pipelined(call).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unimplemented, "{e}");
        }
    }

    /// Opted in (the reference participant): every three-phase call is validated once, on
    /// receipt; results come in request order, naming their branches; a branch that cannot be
    /// pre-committed fails the call with FAILED_PRECONDITION naming it; unary and pipelined
    /// calls mean the same.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn three_phase_calls_are_validated_on_receipt_and_answered_in_request_order() {
        use crate::reference::{ReferenceConfig, ReferenceParticipant};
        use v1::participant_call::Call;
        let dir = tempfile::tempdir().unwrap();
        let config = ReferenceConfig::new("db1".parse().unwrap(), dir.path());
        let (p, handle) = tokio::task::block_in_place(|| ReferenceParticipant::open(config)).unwrap();
        let service = ParticipantService::new(Arc::new(p.clone()), CancellationToken::new());
        fn code<T>(r: Result<T, Status>) -> tonic::Code {
            r.map(drop).unwrap_err().code()
        }
        let probe = v1::QueryStateRequest { coordinator_id: "c1".into(), epoch: 0, branches: vec![] };
        assert!(service.query_state(Request::new(probe)).await.unwrap().into_inner().results.is_empty());

        let (two, three, other, unknown) = (xid("two"), xid("three"), xid("other"), xid("unknown"));
        for x in [&two, &three, &other] {
            let (gtid, branch) = (x.gtid.parse().unwrap(), x.branch_id.parse().unwrap());
            p.put(gtid, branch, format!("k-{}", x.branch_id), bytes::Bytes::new()).await.unwrap();
        }
        let prepare = |branches: Vec<(&v1::BranchXid, u64)>| v1::PrepareRequest {
            coordinator_id: "c1".into(),
            branches: branches
                .into_iter()
                .map(|(x, w)| v1::PrepareBranch { xid: Some(x.clone()), precommit_wait_ms: w, ..Default::default() })
                .collect(),
        };
        let e = service.prepare(Request::new(prepare(vec![(&three, MAX_PRECOMMIT_WAIT_MS + 1)]))).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("branches[0].precommit_wait_ms"), "{e}");
        let votes = service
            .prepare(Request::new(prepare(vec![(&two, 0), (&three, 60_000), (&other, 60_000)])))
            .await
            .unwrap()
            .into_inner()
            .results;
        assert!(votes.iter().all(|v| v.vote() == v1::Vote::Prepared), "{votes:?}");

        let pre_commit = |epoch, branches: Vec<(&v1::BranchXid, u64)>| v1::PreCommitRequest {
            coordinator_id: "c1".into(),
            epoch,
            branches: branches
                .into_iter()
                .map(|(x, w)| v1::PreCommitBranch { xid: Some(x.clone()), docommit_wait_ms: w, ..Default::default() })
                .collect(),
        };
        let query = |epoch, branches: Vec<&v1::BranchXid>| v1::QueryStateRequest {
            coordinator_id: "c1".into(),
            epoch,
            branches: branches.into_iter().cloned().collect(),
        };
        // Refused on receipt, before anything happens: epoch 0, bounds, malformed ids.
        let invalid = tonic::Code::InvalidArgument;
        assert_eq!(code(service.pre_commit(Request::new(pre_commit(0, vec![(&three, 1_000)]))).await), invalid);
        assert_eq!(code(service.pre_commit(Request::new(pre_commit(1, vec![(&three, 0)]))).await), invalid);
        let too_long = pre_commit(1, vec![(&three, 1_000), (&other, MAX_DOCOMMIT_WAIT_MS + 1)]);
        let e = service.pre_commit(Request::new(too_long)).await.unwrap_err();
        assert!(e.code() == invalid && e.message().contains("branches[1].docommit_wait_ms"), "{e}");
        let mut bad = three.clone();
        bad.gtid = "not-a-gtid".into();
        assert_eq!(code(service.pre_commit(Request::new(pre_commit(1, vec![(&bad, 1_000)]))).await), invalid);
        assert_eq!(code(service.query_state(Request::new(query(1, vec![&bad]))).await), invalid);
        // Epoch 0 asks as an observer.
        let r = service.query_state(Request::new(query(0, vec![&three]))).await.unwrap().into_inner().results;
        assert_eq!(r[0].state(), v1::BranchState::Prepared, "nothing happened to it");

        // States in request order, each naming its branch.
        let states = service
            .query_state(Request::new(query(1, vec![&unknown, &three, &two])))
            .await
            .unwrap()
            .into_inner()
            .results;
        let got: Vec<_> = states.iter().map(|r| (r.xid.clone().unwrap(), r.state(), r.deadline_unix_ms > 0)).collect();
        assert_eq!(
            got,
            [
                (unknown.clone(), v1::BranchState::Unknown, false),
                (three.clone(), v1::BranchState::Prepared, true),
                (two.clone(), v1::BranchState::Prepared, false)
            ]
        );
        // A two-phase yes is never pre-committed: the call fails naming it (the other branch
        // of the call is handled as asked: pre-committed).
        let e = service.pre_commit(Request::new(pre_commit(1, vec![(&three, 60_000), (&two, 60_000)]))).await;
        let e = e.unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(e.message().contains("branches[1]") && e.message().contains("two-phase"), "{e}");
        let r = service.query_state(Request::new(query(1, vec![&two]))).await.unwrap().into_inner().results;
        assert_eq!(r[0].state(), v1::BranchState::Prepared, "still prepared, under two-phase commit");
        // Pipelined and unary alike.
        let reply = service.clone().pipelined(Call::PreCommit(pre_commit(1, vec![(&other, 60_000)]))).await.unwrap();
        let v1::participant_reply::Reply::PreCommit(r) = reply else { panic!("{reply:?}") };
        assert_eq!((r.results[0].xid.as_ref(), r.results[0].state()), (Some(&other), v1::BranchState::Precommitted));
        let reply = service.clone().pipelined(Call::QueryState(query(9, vec![&other, &three]))).await.unwrap();
        let v1::participant_reply::Reply::QueryState(r) = reply else { panic!("{reply:?}") };
        let got: Vec<_> = r.results.iter().map(|r| r.state()).collect();
        assert_eq!(got, [v1::BranchState::Precommitted, v1::BranchState::Precommitted]);
        // Epoch 9 was answered: a PreCommit from 8 is stale, and says which epochs.
        let e = service.pre_commit(Request::new(pre_commit(8, vec![(&other, 60_000)]))).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(e.message().contains("epoch 8") && e.message().contains("epoch 9"), "{e}");
        drop((service, p));
        handle.shutdown().await.unwrap();
    }
}
