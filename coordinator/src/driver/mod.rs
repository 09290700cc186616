//! The runtime around the engine: it owns the [`Engine`], feeds it events (API calls,
//! participant answers, log syncs, the clock) and carries out its commands (log appends,
//! participant calls, replies).
//!
//! One task runs the engine, so the engine needs no locks. Everything slow happens elsewhere:
//! the log writer thread does the disk I/O, and per-participant batchers do the network calls;
//! their results come back as events.

pub mod participant;
mod trace;

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::stream::FuturesUnordered;
use futures::{Future, StreamExt};
use pledge_proto::{Gtid, ResourceId};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::cluster::ClusterState;
use crate::cluster::lease::ShardCommand;
use crate::engine::{
    Command, Engine, EngineError, Enlisted, Event, InDoubtBranch, ListFilter, LogRecord, Millis, Phase2Op,
    Phase2Result, Protocol, Reply, ReqId, ResolveRequest, StateResult, SyncToken, VoteResult,
};
use crate::store::{DecisionLog, StoreError};
use participant::{CallConfig, ParticipantHandle, Phase2Item, PrepareItem, StateItem};

/// Wall-clock time in Unix milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The engine's clock: Unix milliseconds at start, advanced by a monotonic clock, so a wall
/// clock stepped back (or forward) by NTP neither stalls nor fires every deadline at once.
/// Times shown to clients drift from the wall clock only by the adjustments made since start.
#[derive(Clone, Copy)]
struct Clock {
    base_ms: u64,
    base: Instant,
}

impl Clock {
    fn start() -> Clock {
        Clock { base_ms: now_ms(), base: Instant::now() }
    }

    fn now(&self) -> u64 {
        self.base_ms + self.base.elapsed().as_millis() as u64
    }

    fn instant_at(&self, at_ms: u64) -> Instant {
        self.base + Duration::from_millis(at_ms.saturating_sub(self.base_ms))
    }
}

/// A client request, as the API layer hands it to the runtime.
#[derive(Debug)]
pub enum ApiRequest {
    Begin {
        timeout_ms: Option<u64>,
        idempotency_key: Option<String>,
        branches: Vec<Enlisted>,
        protocol: Protocol,
        /// The authenticated application beginning it: only it may act on the transaction.
        owner: Option<Arc<str>>,
    },
    Enlist {
        gtid: Gtid,
        branches: Vec<Enlisted>,
    },
    Commit {
        gtid: Gtid,
        branches: Vec<Enlisted>,
        wait_for_completion: bool,
    },
    Abort {
        gtid: Gtid,
    },
    Get {
        gtid: Gtid,
    },
    List {
        filter: ListFilter,
    },
    RegisterParticipant {
        resource: ResourceId,
        endpoint: String,
    },
    ListParticipants,
    Resolve(ResolveRequest),
}

impl ApiRequest {
    /// The transaction a call about one transaction names.
    fn gtid(&self) -> Option<Gtid> {
        match self {
            ApiRequest::Enlist { gtid, .. }
            | ApiRequest::Commit { gtid, .. }
            | ApiRequest::Abort { gtid }
            | ApiRequest::Get { gtid } => Some(*gtid),
            ApiRequest::Resolve(r) => Some(r.gtid),
            ApiRequest::Begin { .. }
            | ApiRequest::List { .. }
            | ApiRequest::RegisterParticipant { .. }
            | ApiRequest::ListParticipants => None,
        }
    }

    /// `gtid`: what a Begin issues (see `Runtime::issue`).
    fn into_event(self, req: ReqId, gtid: Gtid) -> Event {
        match self {
            ApiRequest::Begin { timeout_ms, idempotency_key, branches, protocol, owner } => {
                Event::Begin { req, gtid, timeout_ms, idempotency_key, branches, protocol, owner }
            }
            ApiRequest::Enlist { gtid, branches } => Event::Enlist { req, gtid, branches },
            ApiRequest::Commit { gtid, branches, wait_for_completion } => {
                Event::Commit { req, gtid, branches, wait_for_completion }
            }
            ApiRequest::Abort { gtid } => Event::Abort { req, gtid },
            ApiRequest::Get { gtid } => Event::Get { req, gtid },
            ApiRequest::List { filter } => Event::List { req, filter },
            ApiRequest::RegisterParticipant { resource, endpoint } => {
                Event::RegisterParticipant { req, resource, endpoint }
            }
            ApiRequest::ListParticipants => Event::ListParticipants { req },
            ApiRequest::Resolve(request) => Event::Resolve { req, request },
        }
    }
}

type ReplySender = oneshot::Sender<Result<Reply, EngineError>>;

/// A request, the authenticated application making it (`None`: unrestricted), and the trace
/// context of the API call (with trace export on: see [`trace`]).
type Call = (ApiRequest, Option<Arc<str>>, Option<pledge_proto::telemetry::TraceContext>);

/// Why a request got no answer from the runtime.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("the coordinator is shutting down")]
    ShuttingDown,
    #[error("the coordinator is overloaded: the request waited {0} ms for the engine; retry later")]
    Overloaded(u64),
    #[error("no answer within {0} ms; the transaction goes on, Get tells how it ends")]
    TimedOut(u64),
}

/// Cheap, cloneable handle through which the API layer talks to the runtime.
#[derive(Clone)]
pub struct RuntimeHandle {
    api: mpsc::Sender<(Call, ReplySender)>,
    max_wait: Duration,
}

impl RuntimeHandle {
    /// Hands a request to the engine and waits for its answer, at most `max_request_wait_ms`
    /// in all: waiting for room in the queue (the engine is behind) counts as overload, waiting
    /// for the answer as a timeout.
    pub async fn call(&self, request: ApiRequest) -> Result<Result<Reply, EngineError>, CallError> {
        self.call_as(None, request).await
    }

    /// [`RuntimeHandle::call`] for an authenticated `application`: a call about a transaction
    /// it did not begin is refused ([`EngineError::NotYours`]).
    pub async fn call_as(
        &self,
        application: Option<Arc<str>>,
        request: ApiRequest,
    ) -> Result<Result<Reply, EngineError>, CallError> {
        let (tx, rx) = oneshot::channel();
        let deadline = tokio::time::Instant::now() + self.max_wait;
        let max_ms = self.max_wait.as_millis() as u64;
        let trace = pledge_proto::telemetry::current_context();
        match tokio::time::timeout_at(deadline, self.api.send(((request, application, trace), tx))).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(CallError::ShuttingDown),
            Err(_) => return Err(CallError::Overloaded(max_ms)),
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(CallError::ShuttingDown),
            Err(_) => Err(CallError::TimedOut(max_ms)),
        }
    }
}

pub struct RuntimeConfig {
    pub call: Arc<CallConfig>,
    pub recovery_interval: Duration,
    /// Queue of client requests waiting for the engine (backpressure beyond it).
    pub api_queue_capacity: usize,
    pub max_request_wait: Duration,
    /// Publish the engine's gauges (see [`crate::metrics`]) every [`GAUGE_INTERVAL`]; off when
    /// no metrics recorder is installed, to spare the pass over the live transactions.
    pub publish_gauges: bool,
}

/// How often requests whose callers gave up are looked for (see `sweep_gone_callers`).
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// How often the engine's gauges are published. Each time is one pass over the transactions
/// the engine holds (live and retained: ~1 ms per 100,000 here), on the engine's task.
pub const GAUGE_INTERVAL: Duration = Duration::from_secs(5);

/// Most events handled in one go before the commands are carried out (keeps the latency of a
/// command bounded while still amortising the loop).
const MAX_EVENTS_PER_TURN: usize = 256;

/// A pending sync: of a record the engine waits for, or (`None`) of a checkpoint.
type SyncFuture = Pin<Box<dyn Future<Output = (Option<SyncToken>, Result<(), StoreError>)> + Send>>;

/// The runtime's part in a cluster (see `crate::cluster`).
pub struct ClusterLink {
    pub state: Arc<ClusterState>,
    pub commands: mpsc::Receiver<ShardCommand>,
    /// The store, to confirm leases before a presumed abort (see [`Event::InDoubt`]).
    pub pool: sqlx::PgPool,
    pub store_timeout: Duration,
}

/// A shard being handed over: dropped once its live transactions finish or at `deadline`.
struct Drain {
    shard: u16,
    epoch: u64,
    deadline: Instant,
    done: oneshot::Sender<()>,
}

/// How often shards being handed over are checked for live transactions (one pass over the
/// engine's transactions each), and the engine's shards compared with the cluster state's.
const DRAIN_CHECK_INTERVAL: Duration = Duration::from_millis(50);

pub struct Runtime<L> {
    engine: Engine,
    cluster: Option<ClusterLink>,
    draining: Vec<Drain>,
    log: L,
    config: RuntimeConfig,
    clock: Clock,
    api_rx: mpsc::Receiver<(Call, ReplySender)>,
    events_tx: mpsc::UnboundedSender<Event>,
    events_rx: mpsc::UnboundedReceiver<Event>,
    participants: HashMap<ResourceId, ParticipantHandle>,
    /// Reply channels of requests in the engine, with the GTID of a Commit (which may wait).
    replies: HashMap<ReqId, (ReplySender, Option<Gtid>)>,
    /// Trace contexts of the transactions being traced.
    traces: trace::Traces,
    next_req: ReqId,
    syncs: FuturesUnordered<SyncFuture>,
    /// Events produced while carrying out commands (e.g. a call to an unknown participant
    /// fails at once); handled before anything new.
    local: VecDeque<Event>,
    commands: Vec<Command>,
}

impl<L: DecisionLog> Runtime<L> {
    pub fn new(engine: Engine, log: L, config: RuntimeConfig) -> (Runtime<L>, RuntimeHandle) {
        let (api_tx, api_rx) = mpsc::channel(config.api_queue_capacity);
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let handle = RuntimeHandle { api: api_tx, max_wait: config.max_request_wait };
        let runtime = Runtime {
            engine,
            cluster: None,
            draining: Vec::new(),
            log,
            config,
            clock: Clock::start(),
            api_rx,
            events_tx,
            events_rx,
            participants: HashMap::new(),
            replies: HashMap::new(),
            traces: trace::Traces::default(),
            next_req: 0,
            syncs: FuturesUnordered::new(),
            local: VecDeque::new(),
            commands: Vec::with_capacity(1024),
        };
        (runtime, handle)
    }

    /// Makes this runtime an instance of a cluster: it owns only the shards the lease manager
    /// gives it (through `link.commands`).
    pub fn with_cluster(mut self, link: ClusterLink) -> Self {
        self.cluster = Some(link);
        self
    }

    /// Runs until `shutdown` is cancelled. Returns an error only for a fatal store failure.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), StoreError> {
        self.engine.start(self.clock.now(), &mut self.commands);
        self.execute().await?;
        let mut recovery = tokio::time::interval(self.config.recovery_interval);
        recovery.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // One timer, moved when the engine's next deadline moves (not a new one every turn).
        let far = Duration::from_secs(365 * 24 * 3600);
        let timer = tokio::time::sleep(far);
        tokio::pin!(timer);
        let mut armed: Option<Instant> = None;
        let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut gauges = tokio::time::interval(GAUGE_INTERVAL);
        gauges.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut drain_check = tokio::time::interval(DRAIN_CHECK_INTERVAL);
        drain_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let clustered = self.cluster.is_some();
        loop {
            let deadline = self.engine.next_deadline().map(|at| self.clock.instant_at(at));
            if deadline != armed {
                timer.as_mut().reset(deadline.unwrap_or_else(|| Instant::now() + far));
                armed = deadline;
            }
            // Biased, in this order: what frees the engine (syncs) and what is due (timers,
            // recovery) before new work, so a steady stream of requests cannot starve them.
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some((token, result)) = self.syncs.next(), if !self.syncs.is_empty() => {
                    if let Err(e) = result {
                        self.store_failed(token, e)?;
                        self.execute().await?;
                        continue;
                    }
                    // `None`: a checkpoint (the log writer says what it wrote and deleted).
                    if let Some(token) = token {
                        if matches!(token, SyncToken::Commit(_)) {
                            fail::fail_point!("coordinator::after_commit_synced");
                        }
                        self.handle(Event::Synced(token));
                    }
                }
                _ = &mut timer, if armed.is_some() => {
                    armed = None;
                    self.handle(Event::Tick);
                }
                _ = recovery.tick() => {
                    let interval = self.config.recovery_interval;
                    crate::recovery::scan_in_doubt(self.participants.values(), &self.events_tx, self.clock.now(), interval);
                }
                Some(command) = async { self.cluster.as_mut()?.commands.recv().await }, if clustered => {
                    self.shard_command(command);
                }
                _ = drain_check.tick(), if clustered => {
                    self.reconcile_shards();
                    self.check_drains();
                }
                _ = sweep.tick() => {
                    self.sweep_gone_callers();
                    self.traces.sweep();
                }
                _ = gauges.tick(), if self.config.publish_gauges => {
                    crate::metrics::publish(&self.engine.gauges(self.clock.now()));
                }
                Some(event) = self.events_rx.recv() => {
                    self.handle(event);
                    for _ in 1..MAX_EVENTS_PER_TURN {
                        match self.events_rx.try_recv() {
                            Ok(event) => self.handle(event),
                            Err(_) => break,
                        }
                    }
                }
                Some((request, reply)) = self.api_rx.recv() => {
                    self.api(request, reply);
                    for _ in 1..MAX_EVENTS_PER_TURN {
                        match self.api_rx.try_recv() {
                            Ok((request, reply)) => self.api(request, reply),
                            Err(_) => break,
                        }
                    }
                }
            }
            self.execute().await?;
        }
        Ok(())
    }

    fn api(&mut self, (request, application, trace): Call, reply: ReplySender) {
        // An application acts only on the transactions it began (see `Engine::may_act`).
        if let Some(caller) = application
            && let Some(gtid) = request.gtid()
            && let Err(refused) = self.engine.may_act(gtid, &caller)
        {
            let _ = reply.send(Err(refused));
            return;
        }
        self.next_req += 1;
        let req = self.next_req;
        let commit_of = match &request {
            ApiRequest::Commit { gtid, .. } => Some(*gtid),
            _ => None,
        };
        let gtid = match &request {
            ApiRequest::Begin { idempotency_key, .. } => match self.issue(idempotency_key.as_deref()) {
                Some(gtid) => gtid,
                None => {
                    let _ = reply.send(Err(EngineError::NoShard));
                    return;
                }
            },
            _ => Gtid::new_v7(), // unused
        };
        self.replies.insert(req, (reply, commit_of));
        self.traces.requested(&request, trace);
        self.handle(request.into_event(req, gtid));
    }

    /// The GTID a Begin issues: in a cluster, in the idempotency key's shard, or else in a
    /// random shard this instance owns and is not handing over (`None`: it has none).
    fn issue(&self, idempotency_key: Option<&str>) -> Option<Gtid> {
        let Some(cluster) = &self.cluster else { return Some(Gtid::new_v7()) };
        let count = cluster.state.shard_count;
        if let Some(key) = idempotency_key {
            // Refused by the engine if the shard is not ours (the router sends such a Begin
            // to the key shard's owner).
            return Some(Gtid::new_v7_in_shard(crate::cluster::key_shard(key, count), count));
        }
        let owned = self.engine.owned_shards();
        let open = owned.len() - self.draining.iter().filter(|d| owned.contains_key(&d.shard)).count();
        if open == 0 {
            return None;
        }
        let pick = fastrand::usize(..open);
        let shard = owned.keys().filter(|s| !self.draining.iter().any(|d| d.shard == **s)).nth(pick)?;
        Some(Gtid::new_v7_in_shard(*shard, count))
    }

    fn shard_command(&mut self, command: ShardCommand) {
        match command {
            ShardCommand::Adopt { shard, epoch, forgotten_through_ms, records } => {
                self.handle(Event::AdoptShard { shard, epoch, forgotten_through_ms, records });
                // Resolve what participants hold in doubt for the shard now, not at the next
                // scan (skipped for a participant whose scan is under way).
                let interval = self.config.recovery_interval;
                crate::recovery::scan_in_doubt(self.participants.values(), &self.events_tx, self.clock.now(), interval);
            }
            ShardCommand::Release { shard, epoch, drain, done } => {
                self.draining.push(Drain { shard, epoch, deadline: Instant::now() + drain, done });
                self.check_drains();
            }
            ShardCommand::Participant { resource, endpoint } => {
                self.handle(Event::ParticipantKnown { resource, endpoint })
            }
        }
    }

    /// Drops every shard the engine drives that the cluster state no longer holds at the same
    /// epoch. The one way a lost shard leaves the engine, whoever noticed the loss (and logged
    /// why): the lease manager (a lapsed lease, another holder) or the store writer (a fenced
    /// write). Runs every `DRAIN_CHECK_INTERVAL`, and at once when a waited-for write is fenced.
    fn reconcile_shards(&mut self) {
        let Some(cluster) = &self.cluster else { return };
        let held = cluster.state.owned();
        let stale: Vec<(u16, u64)> = self
            .engine
            .owned_shards()
            .iter()
            .filter(|&(shard, epoch)| held.get(shard) != Some(epoch))
            .map(|(s, e)| (*s, *e))
            .collect();
        for (shard, epoch) in stale {
            tracing::debug!(shard, epoch, "no longer driving the shard");
            self.handle(Event::DropShard { shard });
        }
    }

    /// Drops every shard being handed over whose live transactions have finished (or whose
    /// drain time is up: the rest are left to the next owner, as after a crash).
    fn check_drains(&mut self) {
        let now = Instant::now();
        for d in std::mem::take(&mut self.draining) {
            let held = self.engine.owned_shards().get(&d.shard) == Some(&d.epoch);
            let live = if held { self.engine.live_in_shard(d.shard) } else { 0 };
            if held && live > 0 && now < d.deadline {
                self.draining.push(d);
                continue;
            }
            if held {
                if live > 0 {
                    tracing::warn!(
                        shard = d.shard,
                        live,
                        "handover drain time is up; the next owner finishes the rest"
                    );
                }
                self.handle(Event::DropShard { shard: d.shard });
            }
            let _ = d.done.send(());
        }
    }

    /// A record could not be made durable. Fenced: the shard has a new owner (the store writer
    /// already took it out of the cluster state); drop it now and go on. A registration in a
    /// cluster: tell its caller. Anything else is fatal.
    fn store_failed(&mut self, token: Option<SyncToken>, error: StoreError) -> Result<(), StoreError> {
        match (&error, token, &self.cluster) {
            // A resolution whose record the store refused: its caller hears so, and the shard's
            // new owner knows nothing of it (a write carrying a resolution is one database
            // transaction, its effects included).
            (StoreError::Fenced { .. }, Some(SyncToken::Resolve { req, .. }), Some(_)) => {
                if let Some((tx, _)) = self.replies.remove(&req) {
                    let _ = tx.send(Err(EngineError::StoreUnavailable(error.to_string())));
                }
                self.reconcile_shards();
                Ok(())
            }
            (StoreError::Fenced { .. }, _, Some(_)) => {
                self.reconcile_shards();
                Ok(())
            }
            (StoreError::Failed(message), Some(SyncToken::Register(req)), Some(_)) => {
                if let Some((tx, _)) = self.replies.remove(&req) {
                    let _ = tx.send(Err(EngineError::StoreUnavailable(message.clone())));
                }
                Ok(())
            }
            _ => Err(error),
        }
    }

    /// Forgets requests whose callers stopped waiting, and tells the engine of the Commit
    /// calls among them: a client retrying Commit while a participant is down would otherwise
    /// fill the transaction's waiter places with calls nobody waits for.
    fn sweep_gone_callers(&mut self) {
        let mut gone = Vec::new();
        self.replies.retain(|req, (tx, commit_of)| {
            if !tx.is_closed() {
                return true;
            }
            if let Some(gtid) = commit_of {
                gone.push((*req, *gtid));
            }
            false
        });
        if !gone.is_empty() {
            self.handle(Event::CallersGone(gone));
        }
    }

    fn handle(&mut self, event: Event) {
        match (event, &self.cluster) {
            (Event::InDoubt { resource, branches, listed_ms, confirmed: None }, Some(cluster)) => {
                confirm_leases(cluster, &self.events_tx, resource, branches, listed_ms)
            }
            (event, _) => self.engine.handle(self.clock.now(), event, &mut self.commands),
        }
    }

    /// Carries out the engine's commands, and whatever commands the events they cause at once
    /// produce, until none are left.
    async fn execute(&mut self) -> Result<(), StoreError> {
        loop {
            for command in std::mem::take(&mut self.commands) {
                self.run_command(command).await?;
            }
            match self.local.pop_front() {
                Some(event) => self.handle(event),
                None if self.commands.is_empty() => return Ok(()),
                None => {}
            }
        }
    }

    async fn run_command(&mut self, command: Command) -> Result<(), StoreError> {
        match command {
            Command::Append { record, sync } => {
                match &record {
                    // Three-phase: every PreCommit acknowledged (or their wait over), the
                    // commit decision not yet written.
                    LogRecord::Commit(c) if c.three_phase.is_some() => {
                        fail::fail_point!("coordinator::after_precommit_acked", |_| Ok(()));
                    }
                    LogRecord::Commit(_) => {
                        fail::fail_point!("coordinator::before_commit_record", |_| Ok(()));
                    }
                    // Three-phase: every vote yes, the pre-commit decision not yet written.
                    LogRecord::PreCommit(_) => fail::fail_point!("coordinator::after_cancommit_votes", |_| Ok(())),
                    _ => {}
                }
                let span = self.traces.append(&record, sync.is_some());
                if let Some(durable) = self.log.append(&record, sync.is_some()).instrument(span.clone()).await?
                    && let Some(token) = sync
                {
                    self.syncs.push(Box::pin(async move { (Some(token), durable.await) }.instrument(span)));
                }
            }
            Command::Checkpoint { records } => {
                // In order after the records it reflects; the store writes it while the
                // engine goes on.
                let durable = self.log.snapshot(&records).await?;
                self.syncs.push(Box::pin(async move { (None, durable.await) }));
            }
            Command::Prepare { gtid, branch, may_be_empty, precommit_wait_ms } => {
                match self.participants.get(&branch.resource) {
                    Some(p) => {
                        let trace = self.traces.prepare(gtid);
                        p.prepare(PrepareItem { gtid, branch, may_be_empty, precommit_wait_ms, trace })
                    }
                    None => {
                        let error = format!("no endpoint for resource {:?}", branch.resource.as_str());
                        self.local.push_back(Event::Voted { gtid, branch, vote: VoteResult::Failed { error } });
                    }
                }
            }
            Command::Commit { gtid, branch, one_phase, metadata, may_be_empty } => {
                let trace = self.traces.phase2(gtid, Phase2Op::Commit);
                self.phase2(Phase2Op::Commit, Phase2Item { gtid, branch, one_phase, metadata, may_be_empty, trace })
            }
            Command::PreCommit { gtid, branch, metadata, docommit_wait_ms, epoch } => {
                let (trace, precommit) = (self.traces.call(gtid), Some((metadata, docommit_wait_ms)));
                self.state_call(StateItem { gtid, branch, epoch, precommit, trace })
            }
            Command::QueryState { gtid, branch, epoch } => {
                self.state_call(StateItem { gtid, branch, epoch, precommit: None, trace: self.traces.call(gtid) })
            }
            Command::Abort { gtid, branch, metadata } => {
                let trace = self.traces.phase2(gtid, Phase2Op::Abort);
                let item = Phase2Item { gtid, branch, one_phase: false, metadata, may_be_empty: false, trace };
                self.phase2(Phase2Op::Abort, item)
            }
            Command::Connect { resource, endpoint } => {
                if self.participants.get(&resource).is_some_and(|p| p.endpoint == endpoint) {
                    return Ok(());
                }
                match ParticipantHandle::spawn(
                    resource.clone(),
                    endpoint.clone(),
                    self.config.call.clone(),
                    self.events_tx.clone(),
                ) {
                    Ok(handle) => {
                        tracing::info!(resource = %resource, endpoint, "participant connected");
                        self.participants.insert(resource, handle);
                    }
                    // Endpoints are validated before they reach the engine; this is a bug.
                    Err(e) => tracing::error!(resource = %resource, error = e, "cannot use participant endpoint"),
                }
            }
            Command::Reply { req, reply } => {
                if let Some((tx, _)) = self.replies.remove(&req) {
                    // The caller may have given up (deadline); nothing to do then.
                    let _ = tx.send(reply);
                }
            }
        }
        Ok(())
    }

    fn state_call(&mut self, item: StateItem) {
        match self.participants.get(&item.branch.resource) {
            Some(p) => p.state_call(item),
            None => {
                let error = format!("no endpoint for resource {:?}", item.branch.resource.as_str());
                let result = StateResult::Failed { error };
                self.local.push_back(Event::BranchState { gtid: item.gtid, branch: item.branch, result });
            }
        }
    }

    fn phase2(&mut self, op: Phase2Op, item: Phase2Item) {
        match self.participants.get(&item.branch.resource) {
            Some(p) => p.phase2(op, item),
            None => {
                let error = format!("no endpoint for resource {:?}", item.branch.resource.as_str());
                self.local.push_back(Event::Phase2Done {
                    gtid: item.gtid,
                    branch: item.branch,
                    op,
                    result: Phase2Result::Retry { error },
                });
            }
        }
    }
}

/// A participant's in-doubt list, in a cluster: the store is asked which leases this instance
/// still holds, after the list arrived, and the list goes to the engine with the answer (see
/// [`Event::InDoubt`]: no presumed abort without it). If the store cannot answer, the branches
/// wait for the next scan.
fn confirm_leases(
    cluster: &ClusterLink,
    events: &mpsc::UnboundedSender<Event>,
    resource: ResourceId,
    branches: Vec<InDoubtBranch>,
    listed_ms: Millis,
) {
    let (pool, holder, events, timeout) =
        (cluster.pool.clone(), cluster.state.instance_id.clone(), events.clone(), cluster.store_timeout);
    tokio::spawn(async move {
        match tokio::time::timeout(timeout, crate::cluster::lease::held_leases(&pool, &holder)).await {
            Ok(Ok(held)) => {
                let _ = events.send(Event::InDoubt { resource, branches, listed_ms, confirmed: Some(held) });
            }
            Ok(Err(e)) => tracing::warn!(
                resource = %resource,
                error = %e,
                "cannot confirm leases in the store; in-doubt branches wait for the next scan"
            ),
            Err(_) => {
                tracing::warn!(resource = %resource, "confirming leases timed out; in-doubt branches wait for the next scan")
            }
        }
    });
}
