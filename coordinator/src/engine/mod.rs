//! The transaction state machine: two-phase commit with presumed abort, free of I/O.
//!
//! Events go in ([`Event`]: client requests, votes, acknowledgements, log syncs, the passing of
//! time) and commands come out ([`Command`]: append a record, send prepare/commit/abort,
//! reply). The engine never reads a clock, opens a socket or touches a file, so tests drive it
//! event by event and assert on the exact commands, crash points included (a crash is "build a
//! new engine from the records that were synced").
//!
//! Deadlines (transaction timeout, prepare deadline, phase-2 retry) are engine state: the
//! runtime asks [`Engine::next_deadline`] when to come back and then sends [`Event::Tick`].
//!
//! # Protocol
//! * **Presumed abort.** Only the commit decision is forced to disk, with the full branch list,
//!   before any participant hears "commit". No commit record means aborted, so aborts are never
//!   forced and a crash before the decision aborts the transaction.
//! * **One-phase commit** for a transaction with a single branch: no prepare round; the
//!   participant decides. The decision to ask it is forced to the log first (`OnePhase`), so
//!   after a crash the coordinator resends it and hears the participant's recorded answer
//!   instead of presuming an abort the participant may not have made.
//! * **Read-only votes** skip phase 2; a transaction whose every vote is read-only commits
//!   without a decision record (its End record is synced before the client hears "committed").
//! * **Retention.** A finished transaction stays answerable for `completed_retention_ms`,
//!   whatever the load: when `max_retained_transactions` are kept, Begin is refused instead of
//!   forgetting early. One with a heuristic outcome is kept until an operator acts on it.
//! * **Phase 2** is retried with exponential backoff and jitter until every prepared branch
//!   acknowledges; there is no retry count limit, because a commit decision must reach every
//!   branch, but the rate is bounded by `retry_max_backoff_ms`.
//! * **Three-phase commit**, per transaction (`Protocol::ThreePhase`): the same prepare round
//!   (CanCommit), then a forced `PreCommit` record, PreCommit to every prepared branch, and the
//!   commit record once every branch acknowledged; after a crash the termination protocol asks
//!   the branches' states. See `three_phase` and docs/three-phase.md.

mod protocol;
mod recovery;
mod resolve;
mod shards;
mod three_phase;
mod txn;
mod types;

#[cfg(test)]
mod resolve_tests;
#[cfg(test)]
mod shard_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod three_phase_tests;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use pledge_proto::{BranchKey, Gtid, ResourceId};

use crate::metrics::{self, AbortCause};

pub use types::*;

/// Limits and timings of the engine. Every bound has its unit in its name.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Timeout of an active transaction when Begin names none.
    pub default_txn_timeout_ms: u64,
    /// Largest timeout a Begin may ask for.
    pub max_txn_timeout_ms: u64,
    /// How long the prepare round may take before the transaction is aborted.
    pub prepare_timeout_ms: u64,
    /// First phase-2 retry delay; doubles per attempt up to `retry_max_backoff_ms`.
    pub retry_initial_backoff_ms: u64,
    pub retry_max_backoff_ms: u64,
    /// Transactions not yet finished (a bound on memory and on the work a crash leaves).
    pub max_live_transactions: usize,
    pub max_branches_per_transaction: usize,
    /// How long a finished transaction stays visible to Get, idempotent Commit/Abort and Begin
    /// idempotency keys. Load never shortens it: see `max_retained_transactions`.
    pub completed_retention_ms: u64,
    /// Most finished transactions kept at once (a bound on memory and checkpoint size). At the
    /// bound Begin is refused (RetentionFull) until older ones expire; none is forgotten early.
    pub max_retained_transactions: usize,
    /// Largest record the decision log takes. A vote whose metadata would make the commit
    /// record larger is refused (the transaction aborts) rather than failing the log.
    pub max_record_bytes: usize,
    /// Write a checkpoint after this many appended records.
    pub checkpoint_every_records: u64,
    /// Seed of the backoff jitter (fixed in tests, random in production).
    pub rng_seed: u64,
    /// The decision log writer's epoch, stamped on every decision record (local store).
    pub epoch: u64,
    /// Cluster: the number of shards GTIDs are split into (see [`Gtid::shard`]). The engine
    /// then owns only the shards it adopted ([`Event::AdoptShard`]), each with its lease
    /// epoch, which it stamps on that shard's decisions. 0: not sharded; it owns every GTID.
    pub shard_count: u16,
    /// Three-phase commit: how long a branch that voted yes waits for PreCommit before it
    /// aborts itself. Must cover the prepare round, the forced pre-commit write and the
    /// PreCommit's delivery, so it is above `prepare_timeout_ms`.
    pub precommit_wait_ms: u64,
    /// Three-phase commit: how long a pre-committed branch waits for the commit before it
    /// commits itself (and how long the coordinator waits for PreCommit acknowledgements).
    pub docommit_wait_ms: u64,
    /// Three-phase commit: the longest a PreCommit call may take to reach a participant (the
    /// participant call timeout). A pre-commit decision that becomes durable too late for its
    /// PreCommits to arrive before the earliest wait deadline aborts instead.
    pub precommit_delivery_ms: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            default_txn_timeout_ms: 60_000,
            max_txn_timeout_ms: 3_600_000,
            prepare_timeout_ms: 10_000,
            retry_initial_backoff_ms: 50,
            retry_max_backoff_ms: 10_000,
            max_live_transactions: 100_000,
            max_branches_per_transaction: 64,
            completed_retention_ms: 600_000,
            max_retained_transactions: 2_000_000,
            max_record_bytes: 1 << 20,
            checkpoint_every_records: 200_000,
            rng_seed: 0x5eed,
            epoch: 0,
            shard_count: 0,
            precommit_wait_ms: 20_000,
            docommit_wait_ms: 10_000,
            precommit_delivery_ms: 5_000,
        }
    }
}

/// Most Commit calls waiting on one transaction at once (each holds a reply slot).
pub const MAX_WAITERS_PER_TXN: usize = 16;
/// Most participants (resource ids) a coordinator knows: each has its connection, batchers,
/// a place in every checkpoint and a recovery scan every interval.
pub const MAX_PARTICIPANTS: usize = 1_024;

/// Where a transaction is in its life. Finer than [`TxnState`], which is what clients see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Active,
    /// Prepare sent to every branch; collecting votes.
    Preparing,
    /// Single branch: the one-phase intent is on its way to disk.
    OnePhasePending,
    /// Single branch: one-phase commit sent; the participant decides.
    OnePhaseCommit,
    /// Three-phase: every vote was yes; the pre-commit record is on its way to disk.
    PreCommitPending,
    /// Three-phase: the pre-commit record is durable; PreCommit sent, collecting the branches'
    /// states.
    PreCommitting,
    /// Three-phase, after a restart or takeover with a pre-commit record and no decision: the
    /// termination protocol is asking every branch its state.
    Terminating,
    /// Every vote was yes; the commit record is on its way to disk.
    CommitPending,
    /// The commit record is durable; phase 2 in progress.
    Committing,
    Aborting,
    Committed,
    Aborted,
}

impl Phase {
    fn state(self) -> TxnState {
        match self {
            Phase::Active => TxnState::Active,
            Phase::Preparing
            | Phase::OnePhasePending
            | Phase::OnePhaseCommit
            | Phase::PreCommitPending
            | Phase::PreCommitting
            | Phase::Terminating
            | Phase::CommitPending => TxnState::Preparing,
            Phase::Committing => TxnState::Committing,
            Phase::Aborting => TxnState::Aborting,
            Phase::Committed => TxnState::Committed,
            Phase::Aborted => TxnState::Aborted,
        }
    }

    fn is_finished(self) -> bool {
        matches!(self, Phase::Committed | Phase::Aborted)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKind {
    TxnTimeout,
    PrepareTimeout,
    /// Three-phase: the wait for every PreCommit acknowledgement is over.
    PreCommitAck,
    Retry,
}

#[derive(Debug)]
struct Branch {
    key: BranchKey,
    /// Enlisted as possibly empty (see [`Enlisted`]).
    may_be_empty: bool,
    vote: Option<Vote>,
    metadata: Bytes,
    /// The participant confirmed the outcome (or needs no phase 2).
    acked: bool,
    outcome: Option<BranchOutcome>,
    attempts: u32,
    last_error: Option<String>,
    /// When the next phase-2 attempt is due; 0 while a call is in flight or none is needed.
    next_retry_ms: Millis,
    /// A phase-2 call is in flight (so recovery does not send a second one).
    in_flight: bool,
    /// When the PREPARED vote arrived (0: not prepared).
    prepared_ms: Millis,
    /// Three-phase: the state the participant answered PreCommit or QueryState with.
    participant_state: Option<ParticipantState>,
}

impl Branch {
    fn new(key: BranchKey) -> Self {
        Branch {
            key,
            may_be_empty: false,
            vote: None,
            metadata: Bytes::new(),
            acked: false,
            outcome: None,
            attempts: 0,
            last_error: None,
            next_retry_ms: 0,
            in_flight: false,
            prepared_ms: 0,
            participant_state: None,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Waiter {
    req: ReqId,
    wait_for_completion: bool,
}

#[derive(Debug)]
struct Txn {
    gtid: Gtid,
    phase: Phase,
    created_ms: Millis,
    deadline_ms: Millis,
    prepare_deadline_ms: Millis,
    decided_ms: Millis,
    completed_ms: Millis,
    one_phase: bool,
    /// Three-phase commit's timeouts; `None`: two-phase.
    three_phase: Option<ThreePhaseTimeouts>,
    /// Three-phase: when the wait for PreCommit acknowledgements ends (0: not waiting).
    precommit_ack_deadline_ms: Millis,
    /// Commit was asked for (so a later Commit on an aborted transaction repeats the answer
    /// instead of reporting "aborted before commit").
    commit_requested: bool,
    idempotency_key: Option<String>,
    abort_reason: Option<String>,
    branches: Vec<Branch>,
    waiters: Vec<Waiter>,
    /// The armed retry timer, if any (one per transaction: the earliest due branch).
    retry_timer_ms: Option<Millis>,
    /// Finished, and its End record (the only record of its outcome) is being synced; the
    /// client hears the outcome, and retention starts, only after that.
    end_syncing: bool,
    /// The epoch of the writer that logged the decision.
    decision_epoch: u64,
    /// The End record, once finished.
    end: Option<Arc<EndRecord>>,
    /// What operators did to it, oldest first. Bounded by what can be resolved: each branch is
    /// settled or forgotten once, a transaction decided once, and only the latest retry is kept
    /// (an earlier one changes nothing a replay needs).
    resolutions: Vec<Arc<ResolveRecord>>,
    /// An operator settled its last unacknowledged branch: the End record is synced before
    /// anyone hears that it finished (the log then holds the resolution before it).
    end_sync: bool,
    /// The application that began it, when calls are authenticated.
    owner: Option<Arc<str>>,
}

/// An idempotency key in its owner's namespace (see [`Txn::idempotency_slot`]).
type IdempotencySlot = (Option<Arc<str>>, String);

/// What a Begin asks for (see [`Event::Begin`]).
struct NewTxn {
    timeout_ms: Option<u64>,
    idempotency_key: Option<String>,
    branches: Vec<Enlisted>,
    protocol: Protocol,
    owner: Option<Arc<str>>,
}

/// Everything but the transaction table, so handlers can hold `&mut Txn` and `&mut Ctx` at once.
struct Ctx {
    cfg: EngineConfig,
    now: Millis,
    out: Vec<Command>,
    timers: BTreeSet<(Millis, Gtid, TimerKind)>,
    /// Finished transactions in completion order, for retention expiry.
    retired: VecDeque<(Millis, Gtid)>,
    /// Finished transactions with a heuristic outcome: not in `retired`, kept until an operator
    /// acts on them (they count towards `max_retained_transactions`).
    kept_heuristic: BTreeSet<Gtid>,
    /// Idempotency keys, each in its owner's namespace: an application's keys are its own.
    idempotency: HashMap<IdempotencySlot, Gtid>,
    participants: BTreeMap<ResourceId, String>,
    /// The newest GTID timestamp among the finished transactions forgotten after their
    /// retention: an unknown GTID at or below it may have finished either way.
    forgotten_through_ms: Millis,
    /// When a finished transaction was last forgotten (engine time; 0: not since start).
    last_forgotten_at_ms: Millis,
    records_since_checkpoint: u64,
    rng: fastrand::Rng,
    /// Cluster: the shards this engine owns, with their lease epochs (unused when not sharded).
    owned: BTreeMap<u16, u64>,
    /// Whether each participant supports three-phase commit (absent: not probed yet).
    three_phase_capable: HashMap<ResourceId, bool>,
}

/// The 2PC state machine. See the module documentation.
pub struct Engine {
    /// Keyed by GTID; UUIDv7 GTIDs sort by issue time, so iteration is oldest first.
    txns: BTreeMap<Gtid, Txn>,
    cx: Ctx,
}

impl Engine {
    /// A fresh engine with no history.
    pub fn new(cfg: EngineConfig) -> Self {
        let rng = fastrand::Rng::with_seed(cfg.rng_seed);
        Engine {
            txns: BTreeMap::new(),
            cx: Ctx {
                cfg,
                now: 0,
                out: Vec::new(),
                timers: BTreeSet::new(),
                retired: VecDeque::new(),
                kept_heuristic: BTreeSet::new(),
                idempotency: HashMap::new(),
                participants: BTreeMap::new(),
                forgotten_through_ms: 0,
                last_forgotten_at_ms: 0,
                records_since_checkpoint: 0,
                rng,
                owned: BTreeMap::new(),
                three_phase_capable: HashMap::new(),
            },
        }
    }

    /// Adds participants known from configuration (not logged: the config file is their record).
    pub fn add_configured_participant(&mut self, resource: ResourceId, endpoint: String) {
        self.cx.participants.insert(resource, endpoint);
    }

    /// The earliest time at which a [`Event::Tick`] has something to do.
    pub fn next_deadline(&self) -> Option<Millis> {
        let timer = self.cx.timers.first().map(|t| t.0);
        let expiry = self.cx.retired.front().map(|(done, _)| done + self.cx.cfg.completed_retention_ms);
        match (timer, expiry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether the authenticated application `caller` may make a call about `gtid`: only about
    /// a transaction it began. The refusal says nothing of whether another's exists: a GTID
    /// another application began and one nobody began get the same error — PERMISSION_DENIED,
    /// or for a GTID as old as the forgotten ones the OUT_OF_RANGE anyone gets for those (it
    /// depends on the GTID's time alone). A shard this engine does not own is let through, for
    /// the NOT_OWNER answer that sends the caller on (ownership of shards is no secret).
    pub fn may_act(&self, gtid: Gtid, caller: &Arc<str>) -> Result<(), EngineError> {
        if !self.cx.owns(gtid) || self.txns.get(&gtid).and_then(|t| t.owner.as_ref()) == Some(caller) {
            return Ok(());
        }
        match self.cx.unknown(gtid) {
            forgotten @ EngineError::OutcomeForgotten(_) => Err(forgotten),
            _ => Err(EngineError::NotYours { gtid, caller: caller.clone() }),
        }
    }

    /// Number of transactions not yet finished.
    pub fn live_transactions(&self) -> usize {
        self.txns.len() - self.cx.retained()
    }

    /// Transactions not yet finished, by state, and the age of the oldest unfinished decision
    /// (one pass over the live transactions; the runtime samples it every few seconds).
    pub fn gauges(&self, now: Millis) -> Gauges {
        let mut g =
            Gauges { retained: self.cx.retired.len(), heuristic: self.cx.kept_heuristic.len(), ..Gauges::default() };
        let mut oldest_decision: Option<Millis> = None;
        for txn in self.txns.values() {
            match txn.phase.state() {
                TxnState::Active => g.active += 1,
                TxnState::Preparing => g.preparing += 1,
                TxnState::Committing => g.committing += 1,
                TxnState::Aborting => g.aborting += 1,
                TxnState::Committed | TxnState::Aborted => continue,
            }
            if matches!(txn.phase, Phase::Committing | Phase::Aborting | Phase::PreCommitting | Phase::Terminating) {
                oldest_decision = Some(oldest_decision.map_or(txn.decided_ms, |o| o.min(txn.decided_ms)));
            }
        }
        g.oldest_in_doubt_ms = oldest_decision.map_or(0, |at| now.saturating_sub(at));
        g
    }

    /// Handles one event at time `now`, appending the resulting commands to `out`.
    pub fn handle(&mut self, now: Millis, event: Event, out: &mut Vec<Command>) {
        // Time never goes backwards for the engine, even if the wall clock does.
        self.cx.now = self.cx.now.max(now);
        // Deadlines first: a transaction past its timeout must not be committed by an event
        // that happens to arrive before the tick.
        self.fire_timers();
        if let Some((req, gtid)) = event.request_gtid()
            && !self.cx.owns(gtid)
        {
            let shard = gtid.shard(self.cx.cfg.shard_count);
            self.cx.reply(req, Err(EngineError::NotOwner { gtid, shard }));
            return self.finish_turn(out);
        }
        match event {
            Event::Begin { req, gtid, timeout_ms, idempotency_key, branches, protocol, owner } => {
                self.begin(req, gtid, NewTxn { timeout_ms, idempotency_key, branches, protocol, owner })
            }
            Event::Enlist { req, gtid, branches } => self.enlist(req, gtid, branches),
            Event::Commit { req, gtid, branches, wait_for_completion } => {
                self.commit(req, gtid, branches, wait_for_completion)
            }
            Event::Abort { req, gtid } => self.abort(req, gtid),
            Event::Get { req, gtid } => {
                let reply = match self.txns.get(&gtid) {
                    Some(txn) => Ok(Reply::Transaction(Box::new(txn.view(true)))),
                    None => Err(self.cx.unknown(gtid)),
                };
                self.cx.reply(req, reply);
            }
            Event::List { req, filter } => self.list(req, filter),
            Event::RegisterParticipant { req, resource, endpoint } => {
                if !self.cx.participants.contains_key(&resource) && self.cx.participants.len() >= MAX_PARTICIPANTS {
                    self.cx.reply(req, Err(EngineError::TooManyParticipants { max: MAX_PARTICIPANTS }));
                    return self.finish_turn(out);
                }
                if self.cx.participants.insert(resource.clone(), endpoint.clone()).as_ref() != Some(&endpoint) {
                    // Another endpoint: whether it supports three-phase commit is probed anew.
                    self.cx.three_phase_capable.remove(&resource);
                }
                self.cx.out.push(Command::Connect { resource: resource.clone(), endpoint: endpoint.clone() });
                self.cx.append(LogRecord::Register { resource, endpoint }, Some(SyncToken::Register(req)));
            }
            Event::Resolve { req, request } => self.resolve(req, request),
            Event::ListParticipants { req } => {
                let list = self.cx.participants.iter().map(|(r, e)| (r.clone(), e.clone())).collect();
                self.cx.reply(req, Ok(Reply::Participants(list)));
            }
            Event::Voted { gtid, branch, vote } => self.voted(gtid, branch, vote),
            Event::Phase2Done { gtid, branch, op, result } => self.phase2_done(gtid, branch, op, result),
            Event::Synced(SyncToken::Commit(gtid)) => self.commit_durable(gtid),
            Event::Synced(SyncToken::PreCommit(gtid)) => self.precommit_durable(gtid),
            Event::BranchState { gtid, branch, result } => self.state_answered(gtid, branch, result),
            Event::Capability { resource, endpoint, three_phase } => {
                if self.cx.participants.get(&resource) == Some(&endpoint) {
                    self.cx.three_phase_capable.insert(resource, three_phase);
                }
            }
            Event::Synced(SyncToken::OnePhase(gtid)) => {
                if let Some(txn) = self.txns.get_mut(&gtid)
                    && txn.phase == Phase::OnePhasePending
                {
                    txn.phase = Phase::OnePhaseCommit;
                    self.cx.send_one_phase(txn);
                }
            }
            Event::Synced(SyncToken::End(gtid)) => {
                if let Some(txn) = self.txns.get_mut(&gtid)
                    && txn.end_syncing
                {
                    txn.end_syncing = false;
                    let outcome = txn.commit_outcome();
                    self.cx.reply_waiters(txn, |_| true, &outcome);
                    let now = self.cx.now;
                    self.cx.retain(txn, now);
                }
            }
            Event::Synced(SyncToken::Register(req)) => self.cx.reply(req, Ok(Reply::Registered)),
            Event::Synced(SyncToken::Resolve { req, gtid }) => self.resolve_durable(req, gtid),
            Event::InDoubt { resource, branches, listed_ms, confirmed } => {
                self.in_doubt(resource, branches, listed_ms, confirmed.as_ref())
            }
            Event::AdoptShard { shard, epoch, forgotten_through_ms, records } => {
                self.adopt_shard(shard, epoch, forgotten_through_ms, records)
            }
            Event::DropShard { shard } => self.drop_shard(shard),
            Event::ParticipantKnown { resource, endpoint } => self.participant_known(resource, endpoint),
            Event::Tick => {}
            Event::CallersGone(gone) => {
                for (req, gtid) in gone {
                    if let Some(txn) = self.txns.get_mut(&gtid) {
                        txn.waiters.retain(|w| w.req != req);
                    }
                }
            }
        }
        self.finish_turn(out);
    }

    /// What every event ends with: due timers, expiry, a checkpoint if due, and the commands.
    fn finish_turn(&mut self, out: &mut Vec<Command>) {
        self.fire_timers();
        self.expire_retired();
        self.maybe_checkpoint();
        out.append(&mut self.cx.out);
    }

    fn begin(&mut self, req: ReqId, gtid: Gtid, new: NewTxn) {
        let NewTxn { timeout_ms, idempotency_key, branches, protocol, owner } = new;
        let cx = &mut self.cx;
        if let Some(key) = &idempotency_key
            && let Some(existing) = cx.idempotency.get(&(owner.clone(), key.clone()))
            && let Some(txn) = self.txns.get(existing)
        {
            let reply = Reply::Begun { gtid: txn.gtid, existing: true, deadline_ms: txn.deadline_ms };
            return cx.reply(req, Ok(reply));
        }
        let timeout = match timeout_ms {
            None | Some(0) => cx.cfg.default_txn_timeout_ms,
            Some(t) if t > cx.cfg.max_txn_timeout_ms => {
                let e = EngineError::TimeoutTooLong { requested: t, max: cx.cfg.max_txn_timeout_ms };
                return cx.reply(req, Err(e));
            }
            Some(t) => t,
        };
        if self.txns.len() - cx.retained() >= cx.cfg.max_live_transactions {
            return cx.reply(req, Err(EngineError::TooManyTransactions { max: cx.cfg.max_live_transactions }));
        }
        if cx.retained() >= cx.cfg.max_retained_transactions {
            let (max, retention_ms) = (cx.cfg.max_retained_transactions, cx.cfg.completed_retention_ms);
            let heuristic = cx.kept_heuristic.len();
            metrics::retention_full();
            return cx.reply(req, Err(EngineError::RetentionFull { max, retention_ms, heuristic }));
        }
        let mut txn = Txn::new(gtid, cx.now, cx.now + timeout, idempotency_key);
        txn.owner = owner;
        if protocol == Protocol::ThreePhase {
            let (precommit_wait_ms, docommit_wait_ms) = (cx.cfg.precommit_wait_ms, cx.cfg.docommit_wait_ms);
            txn.three_phase = Some(ThreePhaseTimeouts { precommit_wait_ms, docommit_wait_ms });
        }
        if let Err(e) = cx.add_branches(&mut txn, branches) {
            return cx.reply(req, Err(e));
        }
        if let Some(slot) = txn.idempotency_slot() {
            cx.idempotency.insert(slot, gtid);
        }
        cx.timers.insert((txn.deadline_ms, gtid, TimerKind::TxnTimeout));
        metrics::begun();
        cx.reply(req, Ok(Reply::Begun { gtid, existing: false, deadline_ms: txn.deadline_ms }));
        self.txns.insert(gtid, txn);
    }

    fn enlist(&mut self, req: ReqId, gtid: Gtid, branches: Vec<Enlisted>) {
        let Engine { txns, cx } = self;
        let Some(txn) = txns.get_mut(&gtid) else {
            return cx.reply(req, Err(cx.unknown(gtid)));
        };
        if txn.phase != Phase::Active {
            return cx.reply(req, Err(EngineError::NotActive { gtid, state: txn.phase.state() }));
        }
        let reply = cx.add_branches(txn, branches).map(|()| Reply::Enlisted);
        cx.reply(req, reply);
    }

    fn commit(&mut self, req: ReqId, gtid: Gtid, branches: Vec<Enlisted>, wait_for_completion: bool) {
        let Engine { txns, cx } = self;
        let Some(txn) = txns.get_mut(&gtid) else {
            return cx.reply(req, Err(cx.unknown(gtid)));
        };
        let waiter = Waiter { req, wait_for_completion };
        match txn.phase {
            Phase::Active => {
                if let Err(e) = cx.add_branches(txn, branches) {
                    return cx.reply(req, Err(e));
                }
                txn.commit_requested = true;
                // The first Commit: nobody waits yet, so this never refuses.
                cx.add_waiter(txn, waiter);
                cx.timers.remove(&(txn.deadline_ms, gtid, TimerKind::TxnTimeout));
                cx.start_commit(txn);
            }
            _ if !branches.iter().all(|e| txn.branches.iter().any(|b| b.key == e.key)) => {
                // A retry may repeat the branches it enlisted; new ones are too late.
                cx.reply(req, Err(EngineError::NotActive { gtid, state: txn.phase.state() }));
            }
            Phase::Aborting | Phase::Aborted if !txn.commit_requested => {
                let reason = txn.abort_reason.clone().unwrap_or_default();
                cx.reply(req, Err(EngineError::AlreadyAborted { gtid, reason }));
            }
            Phase::Preparing
            | Phase::OnePhasePending
            | Phase::OnePhaseCommit
            | Phase::PreCommitPending
            | Phase::PreCommitting
            | Phase::Terminating
            | Phase::CommitPending => cx.add_waiter(txn, waiter),
            _ if txn.end_syncing => cx.add_waiter(txn, waiter),
            Phase::Committing | Phase::Aborting if wait_for_completion => cx.add_waiter(txn, waiter),
            Phase::Committing | Phase::Aborting | Phase::Committed | Phase::Aborted => {
                cx.reply(req, Ok(Reply::CommitOutcome(txn.commit_outcome())))
            }
        }
        cx.finish_if_done(txn);
    }

    fn abort(&mut self, req: ReqId, gtid: Gtid) {
        let Engine { txns, cx } = self;
        let Some(txn) = txns.get_mut(&gtid) else {
            return cx.reply(req, Err(cx.unknown(gtid)));
        };
        match txn.phase {
            Phase::Active | Phase::Preparing => {
                cx.decide_abort(txn, AbortCause::Client, "aborted by client".to_string());
                cx.reply(req, Ok(Reply::Aborted));
                cx.finish_if_done(txn);
            }
            Phase::Aborting | Phase::Aborted => cx.reply(req, Ok(Reply::Aborted)),
            // One-phase: the participant is deciding; the outcome is no longer ours to change.
            // Three-phase past the votes: branches may be pre-committed (they commit on their
            // own), so only the termination rules decide.
            Phase::OnePhasePending
            | Phase::OnePhaseCommit
            | Phase::PreCommitPending
            | Phase::PreCommitting
            | Phase::Terminating
            | Phase::CommitPending
            | Phase::Committing
            | Phase::Committed => cx.reply(req, Err(EngineError::CommitDecided { gtid, state: txn.phase.state() })),
        }
    }

    fn list(&mut self, req: ReqId, filter: ListFilter) {
        let cx = &mut self.cx;
        let limit = filter.limit.max(1);
        let cutoff = cx.now.saturating_sub(filter.older_than_ms);
        let mut matching = self.txns.values().filter(|t| {
            let state = t.phase.state();
            (filter.states.is_empty() || filter.states.contains(&state))
                && (!filter.in_doubt
                    || matches!(
                        t.phase,
                        Phase::Committing | Phase::Aborting | Phase::PreCommitting | Phase::Terminating
                    ))
                && (!filter.heuristic || t.needs_operator())
                && (filter.older_than_ms == 0 || t.created_ms <= cutoff)
        });
        // Without vote metadata (up to 4 KiB a branch): Get has it.
        let transactions: Vec<TxnView> = matching.by_ref().take(limit).map(|t| t.view(false)).collect();
        let truncated = matching.next().is_some();
        cx.reply(req, Ok(Reply::List { transactions, truncated }));
    }

    fn voted(&mut self, gtid: Gtid, key: BranchKey, vote: VoteResult) {
        let Engine { txns, cx } = self;
        let Some(txn) = txns.get_mut(&gtid) else {
            // A vote for a transaction we no longer know: presumed abort. Roll the branch back
            // so it does not stay in doubt (unless its shard is another instance's now: its
            // owner decides).
            if let VoteResult::Prepared { metadata } = vote
                && cx.owns(gtid)
            {
                cx.out.push(Command::Abort { gtid, branch: key, metadata });
            }
            return;
        };
        let phase = txn.phase;
        let Some(branch) = txn.branch_mut(&key) else { return };
        if branch.vote.is_some() {
            return; // duplicate
        }
        if phase != Phase::Preparing {
            // Late vote: the transaction was decided without it, which can only have been an
            // abort (a commit needs every vote). While aborting, the abort already sent to this
            // branch settles it; once finished, send one more (recovery would otherwise).
            if let VoteResult::Prepared { metadata } = vote {
                branch.vote = Some(Vote::Prepared);
                branch.metadata = metadata;
                branch.prepared_ms = cx.now;
                if phase == Phase::Aborted {
                    cx.out.push(Command::Abort { gtid, branch: key, metadata: branch.metadata.clone() });
                }
            }
            return;
        }
        let vote = match vote {
            VoteResult::Prepared { metadata } => {
                let record_bytes = txn.commit_record_bytes(metadata.len());
                if record_bytes > cx.cfg.max_record_bytes {
                    // The decision could not be logged: refuse the vote rather than fail the log.
                    // The branch is prepared, so the abort goes to it with its metadata.
                    let branch = txn.branch_mut(&key).expect("found above");
                    branch.vote = Some(Vote::Prepared);
                    branch.metadata = metadata.clone();
                    let error = format!(
                        "its vote metadata ({} bytes) would make the commit record up to {record_bytes} bytes, above \
                         the decision log's limit of {} bytes",
                        metadata.len(),
                        cx.cfg.max_record_bytes
                    );
                    VoteResult::Failed { error }
                } else {
                    VoteResult::Prepared { metadata }
                }
            }
            other => other,
        };
        let branch = txn.branch_mut(&key).expect("found above");
        match vote {
            VoteResult::Prepared { metadata } => {
                branch.vote = Some(Vote::Prepared);
                branch.metadata = metadata;
                branch.prepared_ms = cx.now;
            }
            VoteResult::ReadOnly => {
                branch.vote = Some(Vote::ReadOnly);
                branch.acked = true;
            }
            VoteResult::Aborted { reason } => {
                branch.vote = Some(Vote::Aborted);
                branch.acked = true;
                let reason = format!("branch {key} voted no: {reason}");
                cx.decide_abort(txn, AbortCause::Vote, reason);
                return cx.finish_if_done(txn);
            }
            VoteResult::Failed { error } => {
                branch.last_error = Some(error.clone());
                let reason = format!("prepare of branch {key} failed: {error}");
                cx.decide_abort(txn, AbortCause::PrepareFailed, reason);
                return cx.finish_if_done(txn);
            }
        }
        if txn.branches.iter().all(|b| b.vote.is_some()) {
            cx.timers.remove(&(txn.prepare_deadline_ms, gtid, TimerKind::PrepareTimeout));
            if txn.three_phase.is_some() && txn.branches.iter().any(|b| b.vote == Some(Vote::Prepared)) {
                cx.start_precommit(txn);
            } else if txn.branches.iter().any(|b| b.vote == Some(Vote::Prepared)) {
                // Every vote is yes: force the decision to disk before anyone hears "commit".
                txn.phase = Phase::CommitPending;
                txn.decided_ms = cx.now;
                txn.decision_epoch = cx.epoch_of(txn.gtid);
                cx.append(LogRecord::Commit(txn.commit_record()), Some(SyncToken::Commit(gtid)));
            } else {
                // All read-only: nothing to commit anywhere, nothing to log.
                txn.phase = Phase::Committed;
                txn.decided_ms = cx.now;
                cx.finish_if_done(txn);
            }
        }
    }

    fn commit_durable(&mut self, gtid: Gtid) {
        let Engine { txns, cx } = self;
        let Some(txn) = txns.get_mut(&gtid) else { return };
        if txn.phase != Phase::CommitPending {
            return;
        }
        txn.phase = Phase::Committing;
        cx.send_phase2(txn, Phase2Op::Commit);
        let outcome = txn.commit_outcome();
        cx.reply_waiters(txn, |w| !w.wait_for_completion, &outcome);
        cx.finish_if_done(txn);
    }

    fn phase2_done(&mut self, gtid: Gtid, key: BranchKey, op: Phase2Op, result: Phase2Result) {
        let Engine { txns, cx } = self;
        let Some(txn) = txns.get_mut(&gtid) else { return };
        let expected = match txn.phase {
            Phase::OnePhaseCommit | Phase::Committing => Phase2Op::Commit,
            Phase::Aborting => Phase2Op::Abort,
            _ => return, // stale: the transaction is finished or never reached phase 2
        };
        if op != expected {
            return;
        }
        let one_phase = txn.phase == Phase::OnePhaseCommit;
        let now = cx.now;
        let Some(branch) = txn.branch_mut(&key) else { return };
        if branch.acked {
            return; // duplicate
        }
        branch.in_flight = false;
        match result {
            Phase2Result::Retry { error } => {
                metrics::phase2_retry();
                branch.attempts += 1;
                branch.last_error = Some(error);
                let delay = cx.backoff_ms(branch.attempts);
                branch.next_retry_ms = now + delay;
                let due = branch.next_retry_ms;
                cx.arm_retry(txn, due);
                return;
            }
            Phase2Result::Outcome { outcome, reason } => {
                branch.attempts += 1;
                branch.next_retry_ms = 0;
                branch.acked = true;
                if one_phase {
                    // The participant decided: committed, or aborted with its reason.
                    branch.outcome = Some(outcome);
                    txn.decided_ms = now;
                    if outcome.is_heuristic() {
                        metrics::heuristic(outcome);
                        tracing::warn!(%gtid, branch = %key, ?outcome, "heuristic outcome reported by participant");
                    }
                    // Committed, or heuristically so; anything else did not commit (a mixed or
                    // hazard outcome is flagged as heuristic for an operator to look into).
                    if matches!(outcome, BranchOutcome::Committed | BranchOutcome::HeuristicCommit) {
                        txn.phase = Phase::Committed;
                    } else {
                        txn.phase = Phase::Aborted;
                        metrics::aborted(AbortCause::OnePhase);
                        txn.abort_reason =
                            Some(format!("branch {key} aborted in one-phase commit: {}", reason.unwrap_or_default()));
                    }
                } else {
                    // Told to commit but rolled back (or the reverse): the resource decided on its
                    // own. Record it as the heuristic outcome it is; never report plain success.
                    let outcome = match (op, outcome) {
                        (Phase2Op::Commit, BranchOutcome::Aborted) => BranchOutcome::HeuristicRollback,
                        (Phase2Op::Abort, BranchOutcome::Committed) => BranchOutcome::HeuristicCommit,
                        (_, o) => o,
                    };
                    if outcome.is_heuristic() {
                        metrics::heuristic(outcome);
                        branch.last_error = reason;
                        tracing::warn!(%gtid, branch = %key, ?outcome, "heuristic outcome reported by participant");
                    }
                    branch.outcome = Some(outcome);
                }
            }
        }
        cx.finish_if_done(txn);
    }

    fn fire_timers(&mut self) {
        let Engine { txns, cx } = self;
        while let Some(&(at, gtid, kind)) = cx.timers.first() {
            if at > cx.now {
                break;
            }
            cx.timers.pop_first();
            let Some(txn) = txns.get_mut(&gtid) else { continue };
            match kind {
                TimerKind::TxnTimeout if txn.phase == Phase::Active && txn.deadline_ms == at => {
                    let reason = format!("transaction timed out after {} ms", at - txn.created_ms);
                    cx.decide_abort(txn, AbortCause::Timeout, reason);
                }
                TimerKind::PrepareTimeout if txn.phase == Phase::Preparing && txn.prepare_deadline_ms == at => {
                    let missing: Vec<String> =
                        txn.branches.iter().filter(|b| b.vote.is_none()).map(|b| b.key.to_string()).collect();
                    let reason = format!(
                        "prepare timed out after {} ms waiting for {}",
                        cx.cfg.prepare_timeout_ms,
                        missing.join(", ")
                    );
                    cx.decide_abort(txn, AbortCause::PrepareTimeout, reason);
                }
                TimerKind::PreCommitAck if txn.phase == Phase::PreCommitting && txn.precommit_ack_deadline_ms == at => {
                    cx.precommit_ack_timeout(txn);
                }
                TimerKind::Retry if txn.retry_timer_ms == Some(at) => {
                    txn.retry_timer_ms = None;
                    cx.send_due_retries(txn);
                }
                _ => continue,
            }
            cx.finish_if_done(txn);
        }
    }

    /// Forgets finished transactions whose retention has passed: by time only, so load never
    /// shortens the window in which a retried call still gets its answer.
    fn expire_retired(&mut self) {
        let Engine { txns, cx } = self;
        while let Some(&(done, gtid)) = cx.retired.front() {
            if done + cx.cfg.completed_retention_ms > cx.now {
                break;
            }
            cx.retired.pop_front();
            cx.forgotten_through_ms = cx.forgotten_through_ms.max(gtid.unix_ms().unwrap_or(0));
            cx.last_forgotten_at_ms = cx.now;
            if let Some(txn) = txns.remove(&gtid)
                && let Some(slot) = txn.idempotency_slot()
                && cx.idempotency.get(&slot) == Some(&gtid)
            {
                cx.idempotency.remove(&slot);
            }
        }
    }
}
