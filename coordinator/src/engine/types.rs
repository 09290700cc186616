//! The engine's vocabulary: events in, commands out, and the records it asks the log to keep.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use pledge_proto::{BranchKey, Gtid, ResourceId};

/// Wall-clock time in Unix milliseconds. The engine never reads a clock: every event comes with
/// the time at which the runtime handles it, so tests and simulations control time exactly.
pub type Millis = u64;

/// Identifies one API request so that its reply can find its way back to the caller.
pub type ReqId = u64;

/// Something that happened, for the engine to react to.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Begin a transaction under `gtid` (issued by the runtime; unused if the idempotency key
    /// matches an earlier transaction).
    Begin {
        req: ReqId,
        gtid: Gtid,
        timeout_ms: Option<u64>,
        idempotency_key: Option<String>,
        branches: Vec<Enlisted>,
        protocol: Protocol,
        /// The authenticated application that begins it: only it may act on the transaction
        /// (`None`: no restriction, calls are not authenticated or come from an operator).
        owner: Option<Arc<str>>,
    },
    Enlist {
        req: ReqId,
        gtid: Gtid,
        branches: Vec<Enlisted>,
    },
    Commit {
        req: ReqId,
        gtid: Gtid,
        branches: Vec<Enlisted>,
        wait_for_completion: bool,
    },
    Abort {
        req: ReqId,
        gtid: Gtid,
    },
    Get {
        req: ReqId,
        gtid: Gtid,
    },
    List {
        req: ReqId,
        filter: ListFilter,
    },
    RegisterParticipant {
        req: ReqId,
        resource: ResourceId,
        endpoint: String,
    },
    ListParticipants {
        req: ReqId,
    },
    /// An operator acts on a decided transaction (see [`ResolveAction`]): retry phase 2 now,
    /// settle a branch its participant cannot finish, decide a three-phase transaction nothing
    /// else can, or forget repaired heuristic outcomes.
    Resolve {
        req: ReqId,
        request: ResolveRequest,
    },
    /// A participant's answer to Prepare (or the failure to get one).
    Voted {
        gtid: Gtid,
        branch: BranchKey,
        vote: VoteResult,
    },
    /// A participant's answer to a phase-2 Commit or Abort (or the failure to get one).
    Phase2Done {
        gtid: Gtid,
        branch: BranchKey,
        op: Phase2Op,
        result: Phase2Result,
    },
    /// Three-phase commit: a participant's answer to PreCommit or QueryState (or the failure to
    /// get one).
    BranchState {
        gtid: Gtid,
        branch: BranchKey,
        result: StateResult,
    },
    /// Whether the participant at `endpoint` supports three-phase commit (its answer to the
    /// capability probe made when the coordinator connects to it, and again now and then).
    /// Ignored if the resource has moved to another endpoint since.
    Capability {
        resource: ResourceId,
        endpoint: String,
        three_phase: bool,
    },
    /// A record appended with a sync token is durable.
    Synced(SyncToken),
    /// A participant listed the branches it holds prepared for this coordinator.
    InDoubt {
        resource: ResourceId,
        branches: Vec<InDoubtBranch>,
        /// When the scan that listed them was started (engine time): the participant's list is
        /// no older than this. A transaction forgotten before it cannot be on the list.
        listed_ms: Millis,
        /// Cluster: the leases (shard, epoch) the store said this instance held, read after the
        /// list arrived. A branch this engine has no record of is presumed aborted only in a
        /// shard confirmed at the epoch the engine adopted it at: then no other instance owned
        /// the shard since, so the branch's transaction was this engine's and undecided. An
        /// instance whose lease lapsed unnoticed (paused, partitioned) must not roll back a
        /// branch its successor committed. `None`: not confirmed (no presumed abort in a
        /// cluster); ignored when not sharded.
        confirmed: Option<BTreeMap<u16, u64>>,
    },
    /// Cluster: this coordinator now owns `shard` under lease `epoch` (a takeover, or a
    /// shard handed over). `records` are every record the store holds for the shard, and
    /// `forgotten_through_ms` the shard's horizon of forgotten transactions. The engine
    /// rebuilds the shard's transactions from them and resumes them, as after a restart.
    AdoptShard {
        shard: u16,
        epoch: u64,
        forgotten_through_ms: Millis,
        records: Vec<LogRecord>,
    },
    /// Cluster: this coordinator no longer owns `shard` (handed over, fenced, or its lease
    /// lapsed): its transactions are dropped at once, their waiting callers told to retry
    /// at the new owner, and nothing more is sent for them.
    DropShard {
        shard: u16,
    },
    /// Cluster: a participant registered at another instance (read from the shared store,
    /// where it is already durable).
    ParticipantKnown {
        resource: ResourceId,
        endpoint: String,
    },
    /// Time passed: fire the deadlines that are due.
    Tick,
    /// The callers of these Commit requests stopped waiting (deadline, disconnect): their
    /// places among the transaction's waiters are free again.
    CallersGone(Vec<(ReqId, Gtid)>),
}

impl Event {
    /// The request and GTID of a client call about one transaction.
    pub(super) fn request_gtid(&self) -> Option<(ReqId, Gtid)> {
        match self {
            Event::Begin { req, gtid, .. }
            | Event::Enlist { req, gtid, .. }
            | Event::Commit { req, gtid, .. }
            | Event::Abort { req, gtid }
            | Event::Get { req, gtid } => Some((*req, *gtid)),
            Event::Resolve { req, request } => Some((*req, request.gtid)),
            _ => None,
        }
    }
}

/// The atomic commitment protocol a transaction runs, chosen at Begin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Protocol {
    #[default]
    TwoPhase,
    /// Three-phase commit (docs/three-phase.md): participants finish on their own when the
    /// coordinator is gone, under bounded message delay.
    ThreePhase,
}

/// Three-phase commit's timeouts, chosen by the coordinator when the transaction begins,
/// carried in the messages and logged with the decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreePhaseTimeouts {
    /// A branch that voted yes aborts itself if no PreCommit reaches it this long after its vote.
    pub precommit_wait_ms: u64,
    /// A pre-committed branch commits itself this long after the PreCommit, unless told to
    /// before. Also how long the coordinator waits for every PreCommit acknowledgement before it
    /// commits without the missing ones (the acknowledged branches commit then in any case).
    pub docommit_wait_ms: u64,
}

/// Where a branch is at its participant, as PreCommit and QueryState answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParticipantState {
    /// No record (never seen, or forgotten after the participant's retention).
    Unknown,
    Active,
    Prepared,
    PreCommitted,
    Committed,
    Aborted,
}

impl ParticipantState {
    /// Pre-committed or committed: the branch commits whatever the coordinator does, so the
    /// transaction can only commit (the termination protocol's rule).
    pub fn is_committable(self) -> bool {
        matches!(self, ParticipantState::PreCommitted | ParticipantState::Committed)
    }
}

/// What a PreCommit or QueryState call came back with, for one branch.
#[derive(Debug, Clone, PartialEq)]
pub enum StateResult {
    State {
        state: ParticipantState,
        reason: Option<String>,
    },
    /// No answer: the call failed or timed out. Asked again after a backoff.
    Failed {
        error: String,
    },
}

/// A branch as a client enlists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enlisted {
    pub key: BranchKey,
    /// The client declared the branch may have done nothing at its participant: a participant
    /// with no record of it then votes READ_ONLY rather than ABORTED.
    pub may_be_empty: bool,
}

impl From<BranchKey> for Enlisted {
    fn from(key: BranchKey) -> Self {
        Enlisted { key, may_be_empty: false }
    }
}

/// What a Prepare call came back with.
#[derive(Debug, Clone, PartialEq)]
pub enum VoteResult {
    Prepared {
        metadata: Bytes,
    },
    ReadOnly,
    Aborted {
        reason: String,
    },
    /// No vote: the call failed or timed out. Counts as a "no".
    Failed {
        error: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase2Op {
    Commit,
    Abort,
}

/// What a phase-2 call came back with.
#[derive(Debug, Clone, PartialEq)]
pub enum Phase2Result {
    /// The participant reports this final outcome for the branch.
    Outcome { outcome: BranchOutcome, reason: Option<String> },
    /// The call failed, or the participant asked for a retry: try again after a backoff.
    Retry { error: String },
}

/// A branch's final outcome as its participant reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BranchOutcome {
    Committed,
    Aborted,
    HeuristicCommit,
    HeuristicRollback,
    HeuristicMixed,
    HeuristicHazard,
}

impl BranchOutcome {
    pub fn is_heuristic(self) -> bool {
        !matches!(self, BranchOutcome::Committed | BranchOutcome::Aborted)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct InDoubtBranch {
    pub gtid: Gtid,
    pub branch: BranchKey,
    pub metadata: Bytes,
}

/// Names what a synced append completes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncToken {
    /// The commit record of this transaction.
    Commit(Gtid),
    /// Three-phase commit: the pre-commit record of this transaction.
    PreCommit(Gtid),
    /// The registration answering this request.
    Register(ReqId),
    /// The one-phase intent record: synced before the participant is told to commit.
    OnePhase(Gtid),
    /// The end record of a transaction whose outcome no other record holds (one-phase, empty,
    /// all read-only): synced before the client hears the outcome.
    End(Gtid),
    /// An operator's resolution of this transaction, answering this request once durable.
    Resolve { req: ReqId, gtid: Gtid },
}

/// Something the runtime must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Append a record to the decision log. With `sync`, report [`Event::Synced`] once it is
    /// durable; without, it is written lazily (it rides along with the next sync).
    Append { record: LogRecord, sync: Option<SyncToken> },
    /// Write a checkpoint of the live state (so older log segments can be deleted).
    Checkpoint { records: Vec<LogRecord> },
    /// Ask a participant to prepare a branch; answer with [`Event::Voted`]. Three-phase commit
    /// (CanCommit): a nonzero `precommit_wait_ms` asks a yes vote to abort itself if no
    /// PreCommit follows within it.
    Prepare { gtid: Gtid, branch: BranchKey, may_be_empty: bool, precommit_wait_ms: u64 },
    /// Three-phase commit: move a prepared branch to pre-committed; it commits on its own
    /// `docommit_wait_ms` later. `epoch` is the decision's (see docs/three-phase.md). Answer
    /// with [`Event::BranchState`].
    PreCommit { gtid: Gtid, branch: BranchKey, metadata: Bytes, docommit_wait_ms: u64, epoch: u64 },
    /// Three-phase termination protocol: ask a branch's state, at the asking coordinator's
    /// epoch. Answer with [`Event::BranchState`].
    QueryState { gtid: Gtid, branch: BranchKey, epoch: u64 },
    /// Tell a participant to commit a branch (in one phase: the transaction's only branch, never
    /// prepared, and `may_be_empty` as enlisted); answer with [`Event::Phase2Done`].
    Commit { gtid: Gtid, branch: BranchKey, one_phase: bool, metadata: Bytes, may_be_empty: bool },
    /// Tell a participant to roll back a branch; answer with [`Event::Phase2Done`].
    Abort { gtid: Gtid, branch: BranchKey, metadata: Bytes },
    /// (Re)connect to a participant at this endpoint.
    Connect { resource: ResourceId, endpoint: String },
    /// Answer an API request.
    Reply { req: ReqId, reply: Result<Reply, EngineError> },
}

/// The answer to an API request.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Begun {
        gtid: Gtid,
        existing: bool,
        deadline_ms: Millis,
    },
    Enlisted,
    CommitOutcome(CommitOutcome),
    Aborted,
    Transaction(Box<TxnView>),
    List {
        transactions: Vec<TxnView>,
        truncated: bool,
    },
    Registered,
    Participants(Vec<(ResourceId, String)>),
    /// The answer to Resolve: whether it changed anything (a repeated resolution does not),
    /// what it did or why nothing was needed, and the transaction as it is now.
    Resolved {
        changed: bool,
        detail: String,
        transaction: Box<TxnView>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitOutcome {
    pub committed: bool,
    pub reason: Option<String>,
    /// Every branch acknowledged the outcome.
    pub completed: bool,
    /// Some participant reported a heuristic outcome (see Get).
    pub heuristic: bool,
}

/// Why the engine refused a request. Each maps to one gRPC status in the API layer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error(
        "no record of transaction {0}: it was never committed here (presumed aborted: the coordinator logs every \
         commit decision, one-phase ones included, before any participant hears it)"
    )]
    UnknownTransaction(Gtid),
    #[error("unknown resource {0:?}: register the participant first (RegisterParticipant or the config file)")]
    UnknownResource(ResourceId),
    #[error("transaction {gtid} is {state}; branches can only be enlisted while it is active")]
    NotActive { gtid: Gtid, state: TxnState },
    #[error("transaction {gtid} was aborted before commit was requested: {reason}")]
    AlreadyAborted { gtid: Gtid, reason: String },
    #[error("transaction {gtid} is {state}: its commit is under way or decided and can no longer be aborted")]
    CommitDecided { gtid: Gtid, state: TxnState },
    #[error("timeout_ms {requested} is above the coordinator's max_txn_timeout_ms {max}")]
    TimeoutTooLong { requested: u64, max: u64 },
    #[error("a transaction may have at most {max} branches (this request would make it {count})")]
    TooManyBranches { count: usize, max: usize },
    #[error("the coordinator already has {max} live transactions (max_live_transactions); retry later")]
    TooManyTransactions { max: usize },
    #[error(
        "transaction {0} finished longer ago than the coordinator remembers finished transactions \
         (completed_retention_ms); its outcome is no longer known here"
    )]
    OutcomeForgotten(Gtid),
    #[error(
        "the coordinator keeps {max} finished transactions for completed_retention_ms = {retention_ms} ms \
         (max_retained_transactions) and forgets none early; {heuristic} of them have a heuristic outcome and \
         are kept until an operator acts on them; retry once older ones expire, or raise the bound"
    )]
    RetentionFull { max: usize, retention_ms: u64, heuristic: usize },
    #[error("{max} Commit calls are already waiting on transaction {gtid}")]
    TooManyWaiters { gtid: Gtid, max: usize },
    #[error("{max} participants are registered already; no more can be")]
    TooManyParticipants { max: usize },
    #[error("branch {branch} is enlisted already with may_be_empty = {may_be_empty}; enlist it the same way")]
    EnlistConflict { branch: BranchKey, may_be_empty: bool },
    #[error(
        "transaction {gtid} belongs to shard {shard}, which this coordinator does not own (it moved or is \
         moving to another instance); retry"
    )]
    NotOwner { gtid: Gtid, shard: u16 },
    #[error(
        "this coordinator owns no shard at the moment (starting, handing its shards over, or cut off from the \
         store); retry"
    )]
    NoShard,
    #[error("the decision store cannot be reached: {0}; retry")]
    StoreUnavailable(String),
    #[error(
        "participant {0:?} does not support three-phase commit (it answered UNIMPLEMENTED to the capability \
         probe); a three-phase transaction cannot enlist it — use two-phase commit"
    )]
    NotThreePhase(ResourceId),
    #[error(
        "the coordinator has not reached participant {0:?} yet, so it does not know whether it supports \
         three-phase commit; retry"
    )]
    CapabilityUnknown(ResourceId),
    #[error("transaction {gtid} has no branch {branch}")]
    NoSuchBranch { gtid: Gtid, branch: BranchKey },
    /// The same answer whether another principal began `gtid` or no such transaction is known
    /// here: an application learns nothing of transactions that are not its own.
    #[error(
        "transaction {gtid} is not one that {caller} began here: an application may act only on its own transactions"
    )]
    NotYours { gtid: Gtid, caller: Arc<str> },
    #[error("{0}")]
    ResolveRefused(String),
}

/// A transaction's state as the API shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TxnState {
    Active,
    Preparing,
    Committing,
    Committed,
    Aborting,
    Aborted,
}

impl fmt::Display for TxnState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TxnState::Active => "active",
            TxnState::Preparing => "preparing",
            TxnState::Committing => "committing",
            TxnState::Committed => "committed",
            TxnState::Aborting => "aborting",
            TxnState::Aborted => "aborted",
        })
    }
}

/// What [`Engine::gauges`](super::Engine::gauges) counts: unfinished transactions by state,
/// and how long ago the oldest unfinished decision (committing or aborting) was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Gauges {
    /// Finished transactions kept for Get and retries (within `completed_retention_ms`).
    pub retained: usize,
    /// Finished transactions with a heuristic outcome, kept until an operator acts on them.
    pub heuristic: usize,
    pub active: usize,
    pub preparing: usize,
    pub committing: usize,
    pub aborting: usize,
    pub oldest_in_doubt_ms: u64,
}

/// How a branch voted, as kept in the engine and the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Vote {
    Prepared,
    ReadOnly,
    Aborted,
}

/// What Get and List show of a transaction.
#[derive(Debug, Clone, PartialEq)]
pub struct TxnView {
    pub gtid: Gtid,
    pub state: TxnState,
    pub abort_reason: Option<String>,
    pub created_ms: Millis,
    pub deadline_ms: Millis,
    pub decided_ms: Millis,
    pub completed_ms: Millis,
    pub one_phase: bool,
    pub protocol: Protocol,
    /// Some participant reported a heuristic outcome.
    pub heuristic: bool,
    /// Branches ended differently: some committed, some rolled back (see
    /// [`heuristic_mixed`]).
    pub heuristic_mixed: bool,
    pub idempotency_key: Option<String>,
    pub branches: Vec<BranchView>,
    /// The application principal that began it (see [`EndRecord::owner`]).
    pub owner: Option<Arc<str>>,
    /// What operators did to it, oldest first.
    pub resolutions: Vec<Arc<ResolveRecord>>,
    /// Every heuristic outcome has been resolved by an operator: it is kept no longer.
    pub heuristic_resolved: bool,
}

/// Branches of one transaction ended differently: some committed, some rolled back. The
/// outcome of three-phase commit under a partition longer than its timeouts, or of
/// participants that decided heuristically against the coordinator's decision.
pub fn heuristic_mixed(outcomes: impl IntoIterator<Item = BranchOutcome>) -> bool {
    let (mut committed, mut rolled_back) = (false, false);
    for o in outcomes {
        match o {
            BranchOutcome::Committed | BranchOutcome::HeuristicCommit => committed = true,
            BranchOutcome::Aborted | BranchOutcome::HeuristicRollback => rolled_back = true,
            BranchOutcome::HeuristicMixed => return true,
            BranchOutcome::HeuristicHazard => {}
        }
    }
    committed && rolled_back
}

#[derive(Debug, Clone, PartialEq)]
pub struct BranchView {
    pub key: BranchKey,
    pub may_be_empty: bool,
    pub vote: Option<Vote>,
    pub metadata: Bytes,
    pub acknowledged: bool,
    pub outcome: Option<BranchOutcome>,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub next_retry_ms: Millis,
    /// When the PREPARED vote arrived (0: not prepared).
    pub prepared_ms: Millis,
    /// Three-phase commit: the branch's state as its participant last answered PreCommit or
    /// QueryState.
    pub participant_state: Option<ParticipantState>,
    /// An operator settled this branch or forgot its heuristic outcome (see
    /// [`TxnView::resolutions`]).
    pub resolved: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ListFilter {
    /// Empty: any state.
    pub states: Vec<TxnState>,
    /// Decided, but not yet acknowledged by every branch.
    pub in_doubt: bool,
    /// With a heuristic outcome at some branch that no operator has resolved yet.
    pub heuristic: bool,
    /// Created at least this many milliseconds ago.
    pub older_than_ms: u64,
    pub limit: usize,
}

/// What the engine keeps in the decision log.
///
/// Presumed abort: only the decision to commit is forced, before any participant hears it:
/// `Commit` before phase 2, `OnePhase` before a one-phase commit is sent. So a transaction with
/// neither record was never committed anywhere, and an abort is never forced. `End` is written
/// lazily when every branch has acknowledged the outcome (losing it costs a repeated, idempotent
/// phase 2 after a crash), except where it is the only record of an answer the client is about
/// to hear (one-phase, empty and all-read-only transactions): then it is synced first.
#[derive(Debug, Clone, PartialEq)]
pub enum LogRecord {
    /// A participant registered at run time (resource id -> endpoint).
    Register { resource: ResourceId, endpoint: String },
    /// The commit decision, with every branch that must be told.
    Commit(CommitRecord),
    /// Three-phase commit: every branch voted yes and PreCommit is about to be sent (the
    /// termination protocol decides after a crash: see docs/three-phase.md). Its
    /// `three_phase` is set.
    PreCommit(CommitRecord),
    /// A one-phase commit is about to be sent to the transaction's only branch.
    OnePhase(OnePhaseRecord),
    /// Every branch acknowledged the outcome; the transaction is finished. Shared: the same
    /// record stays with the retained transaction and goes into every checkpoint.
    End(Arc<EndRecord>),
    /// Finished transactions with GTIDs up to this time were forgotten (checkpoints only).
    Forgotten { through_ms: Millis },
    /// An operator's action on a transaction: who, why, and what it did. Applied on replay
    /// after the transaction's other records; a checkpoint repeats it after them.
    Resolve(Arc<ResolveRecord>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct CommitRecord {
    pub gtid: Gtid,
    /// The epoch of the log writer that made the decision (see `crate::store`).
    pub epoch: u64,
    pub created_ms: Millis,
    pub decided_ms: Millis,
    pub idempotency_key: Option<String>,
    pub branches: Vec<LoggedBranch>,
    /// Three-phase commit's timeouts; `None`: two-phase.
    pub three_phase: Option<ThreePhaseTimeouts>,
    /// The application principal that began it, when calls are authenticated (see
    /// `pledge_proto::auth`): only it may act on the transaction.
    pub owner: Option<Arc<str>>,
}

/// The decision to commit a single-branch transaction in one phase. After a crash it is resent
/// (idempotent): the participant's own record answers how the branch ended.
#[derive(Debug, Clone, PartialEq)]
pub struct OnePhaseRecord {
    pub gtid: Gtid,
    /// The epoch of the log writer that made the decision (see `crate::store`).
    pub epoch: u64,
    pub created_ms: Millis,
    pub decided_ms: Millis,
    pub idempotency_key: Option<String>,
    pub branch: BranchKey,
    pub may_be_empty: bool,
    /// The application principal that began it, when calls are authenticated (see
    /// `pledge_proto::auth`): only it may act on the transaction.
    pub owner: Option<Arc<str>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoggedBranch {
    pub key: BranchKey,
    pub vote: Vote,
    pub metadata: Bytes,
    pub prepared_ms: Millis,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EndRecord {
    pub gtid: Gtid,
    pub committed: bool,
    pub reason: Option<String>,
    pub created_ms: Millis,
    pub decided_ms: Millis,
    pub completed_ms: Millis,
    pub one_phase: bool,
    pub three_phase: Option<ThreePhaseTimeouts>,
    pub idempotency_key: Option<String>,
    pub branches: Vec<EndBranch>,
    /// Kept until an operator acts: some branch has a heuristic outcome no resolution covers
    /// (the store keeps such a row past the retention).
    pub kept_for_operator: bool,
    /// The record's encoding, made once (see `records::encode`).
    pub encoded: EncodedOnce,
    /// The application principal that began it, when calls are authenticated (see
    /// `pledge_proto::auth`): only it may act on the transaction.
    pub owner: Option<Arc<str>>,
}

/// A record's encoding, made at most once. A finished transaction's End record is written
/// when it finishes and again into every checkpoint while it is retained (up to
/// `completed_retention_max` of them); encoding them all anew at each checkpoint held the
/// engine up for tens of milliseconds.
#[derive(Default)]
pub struct EncodedOnce(OnceLock<Bytes>);

impl EncodedOnce {
    pub fn get_or_init(&self, encode: impl FnOnce() -> Vec<u8>) -> Bytes {
        self.0.get_or_init(|| encode().into()).clone()
    }
}

impl From<Vec<u8>> for EncodedOnce {
    /// Already known, e.g. read from the log.
    fn from(encoded: Vec<u8>) -> Self {
        EncodedOnce(OnceLock::from(Bytes::from(encoded)))
    }
}

/// A cache, not part of the value: copies start empty, and any two compare equal.
impl Clone for EncodedOnce {
    fn clone(&self) -> Self {
        EncodedOnce::default()
    }
}

impl PartialEq for EncodedOnce {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl fmt::Debug for EncodedOnce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.get().is_some() { "encoded" } else { "not encoded" })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct EndBranch {
    pub key: BranchKey,
    pub vote: Option<Vote>,
    pub outcome: Option<BranchOutcome>,
}

/// What an operator asks for (`pledge txn resolve`; docs in coordinator.proto).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResolveAction {
    Commit,
    Rollback,
    Forget,
}

impl fmt::Display for ResolveAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ResolveAction::Commit => "commit",
            ResolveAction::Rollback => "rollback",
            ResolveAction::Forget => "forget",
        })
    }
}

/// What a resolution did, as the engine decided it from the transaction's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResolveEffect {
    /// Phase 2 (or the one-phase commit) sent again at once to every unacknowledged branch
    /// with no call on its way, instead of after the backoff.
    Retried,
    /// The named branch is taken as ended the way the action says: its participant cannot
    /// finish it (phase 2 to it stops), or a person repaired its heuristic outcome by hand.
    BranchSettled,
    /// A three-phase transaction the termination protocol could not decide (a branch
    /// unreachable or without a record) was decided by the operator.
    Decided,
    /// Heuristic outcomes repaired by hand: the transaction is kept no longer than any other.
    Forgotten,
}

impl fmt::Display for ResolveEffect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ResolveEffect::Retried => "retried",
            ResolveEffect::BranchSettled => "branch-settled",
            ResolveEffect::Decided => "decided",
            ResolveEffect::Forgotten => "forgotten",
        })
    }
}

/// An operator's request, validated by the API layer.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolveRequest {
    pub gtid: Gtid,
    /// `None`: the whole transaction.
    pub branch: Option<BranchKey>,
    pub action: ResolveAction,
    /// Who asks, as the caller names itself (later: its authenticated identity).
    pub operator: String,
    /// Where the call came from.
    pub peer: String,
    pub reason: String,
}

/// One resolution, as the decision log keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolveRecord {
    pub gtid: Gtid,
    /// The shard's epoch when it was written (the store's fence).
    pub epoch: u64,
    pub at_ms: Millis,
    pub action: ResolveAction,
    pub branch: Option<BranchKey>,
    pub operator: String,
    pub peer: String,
    pub reason: String,
    pub effect: ResolveEffect,
    /// [`ResolveEffect::BranchSettled`]: the outcome the branch is left with (the heuristic one
    /// it reported, which stays, or the one the operator gave it), so that a replay rebuilds it
    /// even when the participant's answer before the resolution was never logged.
    pub branch_outcome: Option<BranchOutcome>,
    /// [`ResolveEffect::Decided`] abort: the branches that had answered with no record of the
    /// branch (each a heuristic hazard: it may have committed on its own before it forgot).
    pub hazards: Vec<BranchKey>,
    /// The transaction is finished and this resolution covered its last unresolved heuristic
    /// outcome: from `at_ms` it is kept for the retention only.
    pub releases: bool,
}
