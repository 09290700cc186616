//! Talking to one participant: batched Prepare / Commit / Abort calls, three-phase commit's
//! PreCommit / QueryState calls and its capability probe (its recovery scan is in
//! `crate::recovery`).
//!
//! Each participant gets four batchers (prepare, commit, abort, and the three-phase state
//! calls). A batcher takes whatever work
//! is queued for its participant, up to `max_batch_branches`, and sends it as ONE call; at most
//! `max_inflight_calls` calls of a kind are in flight, so under load work accumulates while
//! calls are out and the batches grow on their own: the same idea as the log's group commit.
//!
//! The calls go over the participant's pipeline stream (`Participant.Pipeline`, see
//! [`pledge_proto::pipeline`]), which costs well under half the CPU of a unary call; a
//! participant that does not offer one (UNIMPLEMENTED) gets unary calls instead.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use pledge_proto::pipeline::ParticipantPipeline;
use pledge_proto::telemetry::{self, TraceContext};
use pledge_proto::transport::Target;
use pledge_proto::v1::participant_client::ParticipantClient;
use pledge_proto::v1::{self, BranchXid};
use pledge_proto::{BranchKey, Gtid, MAX_VOTE_METADATA_BYTES, ResourceId, bounded_reason};
use tokio::sync::{Semaphore, mpsc};
use tonic::transport::Channel;
use tracing::Instrument;

use crate::engine::{BranchOutcome, Event, ParticipantState, Phase2Op, Phase2Result, StateResult, VoteResult};

/// Largest response accepted from a participant, in bytes.
const MAX_RESPONSE_BYTES: usize = 8 << 20;

#[derive(Debug, Clone)]
pub struct CallConfig {
    pub coordinator_id: String,
    pub prepare_timeout: Duration,
    pub rpc_timeout: Duration,
    pub max_batch_branches: usize,
    pub max_inflight_calls: usize,
    /// Use participants' pipeline streams (false: unary calls only).
    pub pipeline: bool,
    /// TLS of the calls (`None`: plaintext); endpoints are then https://.
    pub tls: Option<pledge_proto::tls::ClientTls>,
}

pub struct PrepareItem {
    pub gtid: Gtid,
    pub branch: BranchKey,
    pub may_be_empty: bool,
    /// Three-phase (CanCommit): the wait for PreCommit; 0: two-phase.
    pub precommit_wait_ms: u64,
    /// Where the call's span goes in the transaction's trace (see `super::trace`).
    pub trace: Option<TraceContext>,
}

/// A three-phase call about one branch: PreCommit, or the termination protocol's QueryState.
pub struct StateItem {
    pub gtid: Gtid,
    pub branch: BranchKey,
    /// The epoch the call is made at (one call carries one epoch: a batch is split by it).
    pub epoch: u64,
    /// `Some`: PreCommit with this metadata and do-commit wait; `None`: QueryState.
    pub precommit: Option<(Bytes, u64)>,
    pub trace: Option<TraceContext>,
}

/// First and largest pause between capability probes of a participant not reached yet.
const PROBE_INITIAL_BACKOFF: Duration = Duration::from_millis(100);
const PROBE_MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often a participant's answer to the capability probe is asked again.
const PROBE_REFRESH: Duration = Duration::from_secs(60);
/// Failed probes in a row before a warning (and every ten times as many after).
const PROBE_WARN_AFTER_FAILURES: u32 = 10;

pub struct Phase2Item {
    pub gtid: Gtid,
    pub branch: BranchKey,
    pub one_phase: bool,
    pub metadata: Bytes,
    /// With `one_phase`: the branch was enlisted as possibly empty.
    pub may_be_empty: bool,
    pub trace: Option<TraceContext>,
}

/// The queues into one participant's batchers.
///
/// The queues are unbounded channels on purpose: the runtime must never block on them, since
/// the batchers' results flow back into the runtime (a bounded queue both ways could deadlock).
/// They are bounded all the same, by the engine: at most `max_live_transactions` ×
/// `max_branches_per_transaction` branches can have a call pending.
pub struct ParticipantHandle {
    pub resource: ResourceId,
    pub endpoint: String,
    pub(crate) client: ParticipantClient<Channel>,
    prepare: mpsc::UnboundedSender<PrepareItem>,
    commit: mpsc::UnboundedSender<Phase2Item>,
    abort: mpsc::UnboundedSender<Phase2Item>,
    state: mpsc::UnboundedSender<StateItem>,
    /// Stops the capability probe when the handle goes (replaced by another endpoint's).
    _probe: tokio_util::sync::DropGuard,
    pub(crate) config: Arc<CallConfig>,
    /// A recovery scan of this participant is under way (one at a time).
    pub(crate) scanning: Arc<AtomicBool>,
    /// Aborts queued or in flight. While more are than the calls in flight can carry at once,
    /// scans wait: a scan lists those branches again (they are still prepared) and would queue
    /// the same aborts once more, so a participant slow to abort would see its queue grow by a
    /// scan's worth every interval. (Below that, scans go on: a steady stream of ordinary
    /// aborts must not starve recovery.)
    pub(crate) aborts_pending: Arc<AtomicUsize>,
}

impl ParticipantHandle {
    /// Starts the batchers for a participant. The connection is made lazily (and remade after
    /// failures) by the channel, so an unreachable participant costs failed calls, not a
    /// failed start.
    pub fn spawn(
        resource: ResourceId,
        endpoint: String,
        config: Arc<CallConfig>,
        events: mpsc::UnboundedSender<Event>,
    ) -> Result<Self, String> {
        let channel = Target::parse_with(&endpoint, config.tls.as_ref())
            .map_err(|e| format!("invalid endpoint {endpoint:?}: {e}"))?
            .configure(|e| {
                e.connect_timeout(config.rpc_timeout)
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(10))
                    .keep_alive_timeout(Duration::from_secs(10))
            })
            .connect_lazy();
        let pipeline = config.pipeline.then(|| ParticipantPipeline::new(channel.clone(), MAX_RESPONSE_BYTES));
        let client = ParticipantClient::new(channel).max_decoding_message_size(MAX_RESPONSE_BYTES);

        let (prepare, prepare_rx) = mpsc::unbounded_channel();
        let (commit, commit_rx) = mpsc::unbounded_channel();
        let (abort, abort_rx) = mpsc::unbounded_channel();
        let (state, state_rx) = mpsc::unbounded_channel();
        let call =
            Caller { resource: resource.clone(), client: client.clone(), pipeline, config: config.clone(), events };
        tokio::spawn(batcher(prepare_rx, config.clone(), {
            let call = call.clone();
            move |batch| call.clone().prepare(batch)
        }));
        tokio::spawn(batcher(commit_rx, config.clone(), {
            let call = call.clone();
            move |batch| call.clone().phase2(Phase2Op::Commit, batch)
        }));
        tokio::spawn(batcher(state_rx, config.clone(), {
            let call = call.clone();
            move |batch| call.clone().state_calls(batch)
        }));
        let probe = tokio_util::sync::CancellationToken::new();
        tokio::spawn(call.clone().probe(endpoint.clone(), probe.clone()));
        let aborts_pending = Arc::new(AtomicUsize::new(0));
        let pending = aborts_pending.clone();
        tokio::spawn(batcher(abort_rx, config.clone(), move |batch| {
            let (n, pending) = (batch.len(), pending.clone());
            let call = call.clone().phase2(Phase2Op::Abort, batch);
            async move {
                call.await;
                pending.fetch_sub(n, Ordering::AcqRel);
            }
        }));
        Ok(ParticipantHandle {
            resource,
            endpoint,
            client,
            prepare,
            commit,
            abort,
            state,
            _probe: probe.drop_guard(),
            config,
            scanning: Arc::new(AtomicBool::new(false)),
            aborts_pending,
        })
    }

    pub fn prepare(&self, item: PrepareItem) {
        // A send fails only when the batcher is gone, i.e. during shutdown.
        let _ = self.prepare.send(item);
    }

    pub fn state_call(&self, item: StateItem) {
        let _ = self.state.send(item);
    }

    pub fn phase2(&self, op: Phase2Op, item: Phase2Item) {
        let _ = match op {
            Phase2Op::Commit => self.commit.send(item),
            Phase2Op::Abort => {
                self.aborts_pending.fetch_add(1, Ordering::AcqRel);
                self.abort.send(item).inspect_err(|_| {
                    self.aborts_pending.fetch_sub(1, Ordering::AcqRel);
                })
            }
        };
    }
}

pub(crate) fn parse_xid(xid: &BranchXid) -> Result<(Gtid, BranchKey), pledge_proto::IdError> {
    let x = pledge_proto::Xid::try_from(xid)?;
    Ok((x.gtid, BranchKey { resource: x.resource, branch: x.branch }))
}

fn xid(gtid: &Gtid, branch: &BranchKey) -> BranchXid {
    BranchXid { resource_id: branch.resource.to_string(), gtid: gtid.to_string(), branch_id: branch.branch.to_string() }
}

pub(crate) fn status_text(status: tonic::Status) -> String {
    bounded_reason(format!("{:?}: {}", status.code(), status.message()))
}

/// Takes one item, then whatever else is queued (up to the batch limit), waits for a call slot,
/// tops the batch up with what arrived meanwhile, and sends it.
async fn batcher<I, F, Fut>(mut rx: mpsc::UnboundedReceiver<I>, config: Arc<CallConfig>, send: F)
where
    I: Send + 'static,
    F: Fn(Vec<I>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(config.max_inflight_calls));
    let max = config.max_batch_branches;
    while let Some(first) = rx.recv().await {
        let mut batch = Vec::with_capacity(max.min(64));
        batch.push(first);
        let fill = |batch: &mut Vec<I>, rx: &mut mpsc::UnboundedReceiver<I>| {
            while batch.len() < max {
                match rx.try_recv() {
                    Ok(item) => batch.push(item),
                    Err(_) => break,
                }
            }
        };
        fill(&mut batch, &mut rx);
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        fill(&mut batch, &mut rx);
        let call = send(batch);
        tokio::spawn(async move {
            call.await;
            drop(slot);
        });
    }
}

#[derive(Clone)]
struct Caller {
    resource: ResourceId,
    client: ParticipantClient<Channel>,
    pipeline: Option<ParticipantPipeline>,
    config: Arc<CallConfig>,
    events: mpsc::UnboundedSender<Event>,
}

/// A pipeline call's result, or `None` when the participant offers no pipeline (the stream was
/// refused with UNIMPLEMENTED, so the call was never made) and the unary call must be made
/// instead. An UNIMPLEMENTED answer to the call itself stands: making it again would only get
/// the same answer.
fn settled<T>(pipeline: &ParticipantPipeline, result: Result<T, tonic::Status>) -> Option<Result<T, tonic::Status>> {
    match result {
        Err(status) if status.code() == tonic::Code::Unimplemented && pipeline.unsupported() => None,
        other => Some(other),
    }
}

impl Caller {
    /// One call: on the pipeline if the participant offers one, else unary (`pipelined` and
    /// `unary` make it each way). The request is built by `request`, twice when the pipeline
    /// turns out to be missing.
    async fn call<Req, T, PF, UF>(
        &self,
        name: &'static str,
        branches: usize,
        timeout: Duration,
        request: impl Fn() -> Req,
        pipelined: impl FnOnce(ParticipantPipeline, Req) -> PF,
        unary: impl FnOnce(ParticipantClient<Channel>, tonic::Request<Req>) -> UF,
    ) -> Result<T, tonic::Status>
    where
        PF: Future<Output = Result<T, tonic::Status>>,
        UF: Future<Output = Result<T, tonic::Status>>,
    {
        let started = std::time::Instant::now();
        let result = async {
            if let Some(pipeline) = &self.pipeline
                && let Some(result) = settled(pipeline, pipelined(pipeline.clone(), request()).await)
            {
                return result;
            }
            let mut request = telemetry::with_trace_context(tonic::Request::new(request()));
            request.set_timeout(timeout);
            unary(self.client.clone(), request).await
        }
        .await;
        let code = result.as_ref().map_or_else(|status| status.code(), |_| tonic::Code::Ok);
        crate::metrics::participant_call(&self.resource, name, branches, code, started.elapsed());
        result
    }

    async fn prepare(self, batch: Vec<PrepareItem>) {
        let span = tracing::debug_span!(parent: None, "participant.prepare", otel.kind = "client",
            resource = %self.resource, branches = batch.len());
        telemetry::adopt(&span, batch.iter().filter_map(|i| i.trace.as_ref()));
        let coordinator_id = self.config.coordinator_id.clone();
        let asked: Vec<BranchXid> = batch.iter().map(|i| xid(&i.gtid, &i.branch)).collect();
        let request = || v1::PrepareRequest {
            coordinator_id: coordinator_id.clone(),
            branches: asked
                .iter()
                .zip(&batch)
                .map(|(x, i)| v1::PrepareBranch {
                    xid: Some(x.clone()),
                    may_be_empty: i.may_be_empty,
                    precommit_wait_ms: i.precommit_wait_ms,
                })
                .collect(),
        };
        let timeout = self.config.prepare_timeout;
        let result = self
            .call(
                "Prepare",
                batch.len(),
                timeout,
                request,
                |p, r| async move { p.prepare(r, timeout).await.map(|r| r.results) },
                |mut c, r| async move { c.prepare(r).await.map(|r| r.into_inner().results) },
            )
            .instrument(span)
            .await;
        let votes: Vec<VoteResult> = match result {
            Ok(results) => self.settle(
                "Prepare",
                &asked,
                results,
                |r| r.xid.as_ref(),
                vote_result,
                |error| VoteResult::Failed { error },
            ),
            Err(status) => {
                // Handled here: every branch of the batch votes "failed", so its transaction aborts.
                tracing::warn!(resource = %self.resource, branches = batch.len(), code = ?status.code(),
                    error = status.message(), "prepare call failed; the transactions abort");
                vec![VoteResult::Failed { error: status_text(status) }; batch.len()]
            }
        };
        for (item, vote) in batch.into_iter().zip(votes) {
            tracing::debug!(resource = %self.resource, gtid = %item.gtid, branch = %item.branch, ?vote, "vote");
            let _ = self.events.send(Event::Voted { gtid: item.gtid, branch: item.branch, vote });
        }
    }

    async fn phase2(self, op: Phase2Op, batch: Vec<Phase2Item>) {
        let span = tracing::debug_span!(parent: None, "participant.phase2", otel.kind = "client",
            resource = %self.resource, ?op, branches = batch.len());
        telemetry::adopt(&span, batch.iter().filter_map(|i| i.trace.as_ref()));
        let coordinator_id = self.config.coordinator_id.clone();
        let timeout = self.config.rpc_timeout;
        let asked: Vec<BranchXid> = batch.iter().map(|i| xid(&i.gtid, &i.branch)).collect();
        let result = match op {
            Phase2Op::Commit => {
                let request = || v1::CommitBranchesRequest {
                    coordinator_id: coordinator_id.clone(),
                    branches: asked
                        .iter()
                        .zip(&batch)
                        .map(|(x, i)| v1::CommitBranch {
                            xid: Some(x.clone()),
                            one_phase: i.one_phase,
                            metadata: i.metadata.to_vec(),
                            may_be_empty: i.may_be_empty,
                        })
                        .collect(),
                };
                let call = self.call(
                    "Commit",
                    batch.len(),
                    timeout,
                    request,
                    |p, r| async move { p.commit(r, timeout).await.map(|r| r.results) },
                    |mut c, r| async move { c.commit(r).await.map(|r| r.into_inner().results) },
                );
                call.instrument(span).await
            }
            Phase2Op::Abort => {
                let request = || v1::AbortBranchesRequest {
                    coordinator_id: coordinator_id.clone(),
                    branches: asked
                        .iter()
                        .zip(&batch)
                        .map(|(x, i)| v1::AbortBranch { xid: Some(x.clone()), metadata: i.metadata.to_vec() })
                        .collect(),
                };
                let call = self.call(
                    "Abort",
                    batch.len(),
                    timeout,
                    request,
                    |p, r| async move { p.abort(r, timeout).await.map(|r| r.results) },
                    |mut c, r| async move { c.abort(r).await.map(|r| r.into_inner().results) },
                );
                call.instrument(span).await
            }
        };
        let results: Vec<Phase2Result> = match result {
            Ok(results) => {
                if op == Phase2Op::Commit {
                    fail::fail_point!("coordinator::after_commit_call");
                }
                let name = if op == Phase2Op::Commit { "Commit" } else { "Abort" };
                let retry = |error| Phase2Result::Retry { error };
                self.settle(name, &asked, results, |r| r.xid.as_ref(), phase2_result, retry)
            }
            Err(status) => {
                // Handled here: every branch of the batch is retried after its backoff.
                tracing::warn!(resource = %self.resource, ?op, branches = batch.len(), code = ?status.code(),
                    error = status.message(), "phase-2 call failed; retrying with backoff");
                vec![Phase2Result::Retry { error: status_text(status) }; batch.len()]
            }
        };
        for (item, result) in batch.into_iter().zip(results) {
            tracing::debug!(resource = %self.resource, gtid = %item.gtid, branch = %item.branch, ?op, ?result, "phase 2");
            let _ = self.events.send(Event::Phase2Done { gtid: item.gtid, branch: item.branch, op, result });
        }
    }
}

impl Caller {
    /// Asks the participant at `endpoint` whether it supports three-phase commit (a QueryState
    /// naming no branch: OK yes, UNIMPLEMENTED no), again with backoff until it answers one or
    /// the other, and tells the engine; then again every [`PROBE_REFRESH`], so an upgraded (or
    /// downgraded) participant is noticed without a restart.
    async fn probe(self, endpoint: String, stop: tokio_util::sync::CancellationToken) {
        let mut backoff = PROBE_INITIAL_BACKOFF;
        let mut failures = 0u32;
        let mut known: Option<bool> = None;
        loop {
            let request = || v1::QueryStateRequest {
                coordinator_id: self.config.coordinator_id.clone(),
                epoch: 0,
                branches: Vec::new(),
            };
            let timeout = self.config.rpc_timeout;
            let call = self.call(
                "QueryState",
                0,
                timeout,
                request,
                |p, r| async move { p.query_state(r, timeout).await },
                |mut c, r| async move { c.query_state(r).await.map(|r| r.into_inner()) },
            );
            let answer = tokio::select! {
                _ = stop.cancelled() => return,
                answer = call => answer,
            };
            let three_phase = match answer {
                Ok(_) => true,
                Err(status) if status.code() == tonic::Code::Unimplemented => false,
                Err(status) => {
                    // Unreachable for a while is ordinary (logged at debug); an answer that
                    // stays wrong is not: three-phase Begins naming it are UNAVAILABLE meanwhile.
                    failures += 1;
                    if failures == PROBE_WARN_AFTER_FAILURES || failures.is_multiple_of(10 * PROBE_WARN_AFTER_FAILURES)
                    {
                        tracing::warn!(resource = %self.resource, failures, code = ?status.code(),
                            error = status.message(), "the participant does not answer the capability probe");
                    } else {
                        tracing::debug!(resource = %self.resource, code = ?status.code(), error = status.message(),
                            "capability probe failed; asking again");
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(PROBE_MAX_BACKOFF);
                    continue;
                }
            };
            if known != Some(three_phase) {
                tracing::info!(resource = %self.resource, three_phase, "participant capability");
                known = Some(three_phase);
                let (resource, endpoint) = (self.resource.clone(), endpoint.clone());
                let _ = self.events.send(Event::Capability { resource, endpoint, three_phase });
            }
            (backoff, failures) = (PROBE_INITIAL_BACKOFF, 0);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(PROBE_REFRESH) => {}
            }
        }
    }

    /// PreCommit and QueryState calls, one per (kind, epoch) in the batch.
    async fn state_calls(self, mut batch: Vec<StateItem>) {
        batch.sort_by_key(|i| (i.precommit.is_some(), i.epoch));
        while !batch.is_empty() {
            let key = (batch[0].precommit.is_some(), batch[0].epoch);
            let split = batch.iter().position(|i| (i.precommit.is_some(), i.epoch) != key).unwrap_or(batch.len());
            let rest = batch.split_off(split);
            let group = std::mem::replace(&mut batch, rest);
            match self.state_call(&group).await {
                // One branch refused (a stale epoch, a branch not prepared for three-phase
                // commit) fails the whole call: ask branch by branch, so that the others get
                // their answers now instead of after a backoff behind it.
                Err(status) if status.code() == tonic::Code::FailedPrecondition && group.len() > 1 => {
                    for item in group {
                        let result = self.state_call(std::slice::from_ref(&item)).await;
                        self.report_states(vec![item], result);
                    }
                }
                result => self.report_states(group, result),
            }
        }
    }

    /// Tells the engine how a state call went for each of its branches.
    fn report_states(&self, batch: Vec<StateItem>, result: Result<Vec<StateResult>, tonic::Status>) {
        let results = match result {
            Ok(results) => results,
            Err(status) => {
                // Handled here: each branch is asked again after its backoff.
                tracing::warn!(resource = %self.resource, branches = batch.len(), code = ?status.code(),
                    error = status.message(), "three-phase call failed; asking again with backoff");
                vec![StateResult::Failed { error: status_text(status) }; batch.len()]
            }
        };
        for (item, result) in batch.into_iter().zip(results) {
            tracing::debug!(resource = %self.resource, gtid = %item.gtid, branch = %item.branch, ?result, "branch state");
            let _ = self.events.send(Event::BranchState { gtid: item.gtid, branch: item.branch, result });
        }
    }

    /// One PreCommit or QueryState call (every item of the same kind and epoch): a result per
    /// branch, or the call's failure.
    async fn state_call(&self, batch: &[StateItem]) -> Result<Vec<StateResult>, tonic::Status> {
        let precommit = batch[0].precommit.is_some();
        let epoch = batch[0].epoch;
        let name = if precommit { "PreCommit" } else { "QueryState" };
        let span = tracing::debug_span!(parent: None, "participant.state", otel.kind = "client",
            resource = %self.resource, call = name, epoch, branches = batch.len());
        telemetry::adopt(&span, batch.iter().filter_map(|i| i.trace.as_ref()));
        let coordinator_id = self.config.coordinator_id.clone();
        let timeout = self.config.rpc_timeout;
        let asked: Vec<BranchXid> = batch.iter().map(|i| xid(&i.gtid, &i.branch)).collect();
        let result = if precommit {
            let request = || v1::PreCommitRequest {
                coordinator_id: coordinator_id.clone(),
                epoch,
                branches: asked
                    .iter()
                    .zip(batch)
                    .map(|(x, i)| {
                        let (metadata, docommit_wait_ms) = i.precommit.clone().unwrap_or_default();
                        v1::PreCommitBranch { xid: Some(x.clone()), metadata: metadata.to_vec(), docommit_wait_ms }
                    })
                    .collect(),
            };
            self.call(
                name,
                batch.len(),
                timeout,
                request,
                |p, r| async move { p.pre_commit(r, timeout).await.map(|r| r.results) },
                |mut c, r| async move { c.pre_commit(r).await.map(|r| r.into_inner().results) },
            )
            .instrument(span)
            .await
        } else {
            let request =
                || v1::QueryStateRequest { coordinator_id: coordinator_id.clone(), epoch, branches: asked.clone() };
            self.call(
                name,
                batch.len(),
                timeout,
                request,
                |p, r| async move { p.query_state(r, timeout).await.map(|r| r.results) },
                |mut c, r| async move { c.query_state(r).await.map(|r| r.into_inner().results) },
            )
            .instrument(span)
            .await
        };
        let results = result?;
        Ok(self.settle(name, &asked, results, |r| r.xid.as_ref(), state_result, |error| StateResult::Failed { error }))
    }

    /// One result per asked branch, matched by xid ([`match_results`]): `convert` for a matched
    /// one, `unanswered` (with the error) for one without. A mismatch is handled here: logged
    /// once per call and counted.
    fn settle<R, T>(
        &self,
        call: &'static str,
        asked: &[BranchXid],
        results: Vec<R>,
        xid_of: impl Fn(&R) -> Option<&BranchXid>,
        convert: impl Fn(R) -> T,
        unanswered: impl Fn(String) -> T,
    ) -> Vec<T> {
        let (matched, error) = match_results(asked, results, xid_of);
        let error = error.map(|error| {
            tracing::warn!(resource = %self.resource, call, error,
                "participant broke the protocol; unmatched branches count as unanswered");
            crate::metrics::protocol_error(&self.resource);
            format!("protocol error in the participant's {call} answer: {error}")
        });
        matched
            .into_iter()
            .map(|r| match r {
                Some(r) => convert(r),
                None => unanswered(error.clone().unwrap_or_default()),
            })
            .collect()
    }
}

/// Matches a participant's results to the branches asked about (`asked`, in request order) by
/// the xid each result names: never by position, so a participant that answers for a
/// different set (a bug, a proxy mixing up calls) cannot have its answers taken for another
/// branch's. Returns one slot per asked branch (`None`: no result for it) and, if anything did
/// not match (a result for a branch not asked about, one without an xid, a second result for a
/// branch, a branch without a result), what.
fn match_results<R>(
    asked: &[BranchXid],
    results: Vec<R>,
    xid_of: impl Fn(&R) -> Option<&BranchXid>,
) -> (Vec<Option<R>>, Option<String>) {
    let mut slots: Vec<Option<R>> = std::iter::repeat_with(|| None).take(asked.len()).collect();
    let mut error: Option<String> = None;
    let mut note = |e: String| {
        error.get_or_insert(e);
    };
    // Usually the results come in request order: match those without building an index.
    let in_order = results.len() == asked.len() && results.iter().zip(asked).all(|(r, a)| xid_of(r) == Some(a));
    if in_order {
        for (slot, r) in slots.iter_mut().zip(results) {
            *slot = Some(r);
        }
        return (slots, None);
    }
    // Otherwise by an index of the asked branches (owned keys: this path is the rare one).
    let key_of = |x: &BranchXid| (x.resource_id.clone(), x.gtid.clone(), x.branch_id.clone());
    let mut index: std::collections::HashMap<(String, String, String), Vec<usize>> = std::collections::HashMap::new();
    for (i, a) in asked.iter().enumerate().rev() {
        index.entry(key_of(a)).or_default().push(i);
    }
    for r in results {
        let slot = match xid_of(&r) {
            None => Err("a result without an xid".to_string()),
            Some(x) => index.get_mut(&key_of(x)).and_then(Vec::pop).ok_or_else(|| {
                format!(
                    "a result for {}/{}/{}, which was not asked about (or twice)",
                    x.resource_id, x.gtid, x.branch_id
                )
            }),
        };
        match slot {
            Ok(i) => slots[i] = Some(r),
            Err(e) => note(e),
        }
    }
    if let Some(i) = slots.iter().position(Option::is_none) {
        let a = &asked[i];
        note(format!("no result for {}/{}/{}", a.resource_id, a.gtid, a.branch_id));
    }
    (slots, error)
}

fn vote_result(r: v1::PrepareResult) -> VoteResult {
    match v1::Vote::try_from(r.vote) {
        Ok(v1::Vote::Prepared) if r.metadata.len() > MAX_VOTE_METADATA_BYTES => VoteResult::Failed {
            error: format!("vote metadata of {} bytes exceeds {MAX_VOTE_METADATA_BYTES}", r.metadata.len()),
        },
        Ok(v1::Vote::Prepared) => VoteResult::Prepared { metadata: r.metadata.into() },
        Ok(v1::Vote::ReadOnly) => VoteResult::ReadOnly,
        Ok(v1::Vote::Aborted) => VoteResult::Aborted { reason: bounded_reason(r.reason) },
        Ok(v1::Vote::Unspecified) | Err(_) => VoteResult::Failed { error: format!("invalid vote {}", r.vote) },
    }
}

fn state_result(r: v1::BranchStateResult) -> StateResult {
    let reason = (!r.reason.is_empty()).then(|| bounded_reason(r.reason));
    let state = match v1::BranchState::try_from(r.state) {
        Ok(v1::BranchState::Unknown) => ParticipantState::Unknown,
        Ok(v1::BranchState::Active) => ParticipantState::Active,
        Ok(v1::BranchState::Prepared) => ParticipantState::Prepared,
        Ok(v1::BranchState::Precommitted) => ParticipantState::PreCommitted,
        Ok(v1::BranchState::Committed) => ParticipantState::Committed,
        Ok(v1::BranchState::Aborted) => ParticipantState::Aborted,
        Ok(v1::BranchState::Unspecified) | Err(_) => {
            return StateResult::Failed { error: format!("invalid branch state {}", r.state) };
        }
    };
    StateResult::State { state, reason }
}

fn phase2_result(r: v1::BranchResult) -> Phase2Result {
    let reason = (!r.reason.is_empty()).then(|| bounded_reason(r.reason));
    let outcome = match v1::BranchOutcome::try_from(r.outcome) {
        Ok(v1::BranchOutcome::Committed) => BranchOutcome::Committed,
        Ok(v1::BranchOutcome::Aborted) => BranchOutcome::Aborted,
        Ok(v1::BranchOutcome::HeuristicCommit) => BranchOutcome::HeuristicCommit,
        Ok(v1::BranchOutcome::HeuristicRollback) => BranchOutcome::HeuristicRollback,
        Ok(v1::BranchOutcome::HeuristicMixed) => BranchOutcome::HeuristicMixed,
        Ok(v1::BranchOutcome::HeuristicHazard) => BranchOutcome::HeuristicHazard,
        Ok(v1::BranchOutcome::Retry) => {
            return Phase2Result::Retry { error: reason.unwrap_or_else(|| "participant asked to retry".into()) };
        }
        Ok(v1::BranchOutcome::Unspecified) | Err(_) => {
            return Phase2Result::Retry { error: format!("invalid outcome {}", r.outcome) };
        }
    };
    Phase2Result::Outcome { outcome, reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn x(gtid: &str, branch: &str) -> BranchXid {
        BranchXid { resource_id: "db1".into(), gtid: gtid.into(), branch_id: branch.into() }
    }

    #[test]
    fn results_are_matched_by_branch_not_by_position() {
        let asked = vec![x("g1", "a"), x("g2", "a"), x("g2", "b")];
        let tagged = |xid: &BranchXid, n: u32| (Some(xid.clone()), n);
        fn key(r: &(Option<BranchXid>, u32)) -> Option<&BranchXid> {
            r.0.as_ref()
        }
        let values = |slots: Vec<Option<(Option<BranchXid>, u32)>>| -> Vec<Option<u32>> {
            slots.into_iter().map(|s| s.map(|r| r.1)).collect()
        };

        // In order, or shuffled: each result lands on its branch.
        let (slots, e) =
            match_results(&asked, vec![tagged(&asked[0], 0), tagged(&asked[1], 1), tagged(&asked[2], 2)], key);
        assert_eq!((values(slots), e), (vec![Some(0), Some(1), Some(2)], None));
        let (slots, e) =
            match_results(&asked, vec![tagged(&asked[2], 2), tagged(&asked[0], 0), tagged(&asked[1], 1)], key);
        assert_eq!((values(slots), e), (vec![Some(0), Some(1), Some(2)], None));

        // The right count for the wrong set: the stranger's result is not taken for anyone's,
        // and the branch left without one is unanswered. (Matching by position accepted it.)
        let (slots, e) =
            match_results(&asked, vec![tagged(&asked[0], 0), tagged(&x("g9", "z"), 9), tagged(&asked[2], 2)], key);
        assert_eq!(values(slots), vec![Some(0), None, Some(2)]);
        assert!(e.unwrap().contains("g9/z, which was not asked about"));

        // Twice for one branch, none for another; and a result naming no branch.
        let (slots, e) =
            match_results(&asked, vec![tagged(&asked[0], 0), tagged(&asked[0], 5), tagged(&asked[2], 2)], key);
        assert_eq!(values(slots), vec![Some(0), None, Some(2)]);
        assert!(e.is_some());
        let (slots, e) = match_results(&asked, vec![(None, 0), tagged(&asked[1], 1), tagged(&asked[2], 2)], key);
        assert_eq!(values(slots), vec![None, Some(1), Some(2)]);
        assert_eq!(e.as_deref(), Some("a result without an xid"));

        // The same branch asked twice (a resend while listed in doubt) gets both results.
        let twice = vec![x("g1", "a"), x("g1", "a")];
        let (slots, e) = match_results(&twice, vec![tagged(&twice[0], 7), tagged(&twice[0], 8)], key);
        assert_eq!((values(slots), e), (vec![Some(7), Some(8)], None));
    }
}
