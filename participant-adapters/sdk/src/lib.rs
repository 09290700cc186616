//! Pledge's generic participant SDK.
//!
//! A service takes part in Pledge's global transactions by implementing [`Participant`]
//! (prepare / commit / abort / recover for one branch at a time) and serving it with
//! [`server::routes`], which adds gRPC health checking and server reflection. The server
//! validates every request once, on receipt, and runs the branches of a batched call
//! concurrently.
//!
//! Most implementations should not write [`Participant`] by hand: implement
//! [`journaled::Resource`] (what to do at the resource: open, prepare, commit, roll back, and
//! how to find out how a transaction ended) and wrap it in [`journaled::Journaled`], which
//! keeps the whole contract below on top of the [`journal`]. The PostgreSQL and Kafka adapters
//! are built that way. [`reference`] is a participant written by hand on its own log: a small
//! durable key-value store (binary `pledge-reference-participant`) used by tests, demos and
//! benchmarks.
//!
//! # The contract every participant keeps
//! The conformance kit (`pledge-conformance`) checks each rule over gRPC, for a participant in
//! any language.
//!
//! * **Prepare is a pledge.** Answer [`Vote::Prepared`] only once the branch's work is durable
//!   and can be committed even after a crash; from then on, never roll it back on your own.
//! * **Only durable state answers.** Every answer that may be asked for again survives a kill
//!   -9: write it down (and sync it) before giving it. A repeated Prepare, Commit or Abort of
//!   (gtid, branch) returns the first answer, also after a restart.
//! * **Silence never reads as consent.** A Prepare of a branch you have no record of votes
//!   [`Vote::Aborted`] — a mistyped branch id, or work that went to another instance, must not
//!   commit without that work — unless the client declared the branch may be empty
//!   (`may_be_empty`), which votes [`Vote::ReadOnly`]. The same holds for a one-phase Commit.
//! * **The restart rule.** Work in a branch is recorded as begun before it is acknowledged, so
//!   after a restart a branch whose work died with the previous process is known: its further
//!   work and its Prepare are refused. No clock is involved.
//! * **No dangling prepare.** A Prepare that arrives after an Abort of the same branch is
//!   refused with [`Vote::Aborted`] (the abort is recorded, even of a branch never seen).
//! * **No outcome without proof.** A Commit of a prepared branch the resource no longer holds
//!   is answered with what the resource can prove (committed, or a heuristic rollback), and
//!   with [`Outcome::HeuristicHazard`] where nothing can prove either — never with success. A
//!   one-phase Commit cut short by a crash is answered the same way, after asking the resource.
//! * **Vote metadata** (at most 4096 bytes) comes back with every Commit and Abort and in
//!   Recover. It is for finding the branch's transaction at the resource when your own record
//!   is gone (a lost data directory); your own record stays the source of truth while it
//!   exists, and the metadata never proves an outcome by itself.
//! * **Recover lists exactly the prepared branches** of the asking coordinator, per resource,
//!   in (resource, gtid, branch) order, a page at a time: one resource that cannot be read fails
//!   only its own listing.
//! * Transient trouble (database unreachable, lock timeout) is an [`Error`]; the coordinator
//!   retries phase 2 until it gets an answer.
//!
//! # Three-phase commit (optional)
//! A participant opts in by returning its [`ThreePhase`] from [`Participant::three_phase`]
//! ([`journaled::Journaled`] and [`reference`] do); one that does not answers PreCommit and
//! QueryState with UNIMPLEMENTED and votes no to a three-phase Prepare (never a two-phase yes
//! in its place). docs/three-phase.md is the design; an implementation keeps these rules:
//!
//! * **CanCommit** (a Prepare with `precommit_wait_ms`): a yes vote is recorded as PREPARED
//!   with its *wait deadline* (the participant's wall-clock now + `precommit_wait_ms`), synced
//!   before the vote. With no PreCommit (nor Commit) by then, the branch rolls itself back and
//!   is recorded aborted ("no PreCommit within N ms").
//! * **PreCommit** moves such a branch to PRECOMMITTED with its *do-commit deadline* (now +
//!   `docommit_wait_ms`), synced before the answer; at that deadline it commits itself.
//!   Repeated, it answers the same (the deadline is not extended); a branch that committed
//!   answers COMMITTED, one that aborted (its wait deadline passed first) ABORTED with the
//!   reason, one with no record UNKNOWN (it is never created). A branch prepared under
//!   two-phase commit, or not prepared at all, is refused ([`ThreePhaseError::NotThreePhase`]:
//!   the call fails with FAILED_PRECONDITION).
//! * **Epochs**: a participant records, per three-phase branch, the highest epoch it has
//!   answered a PreCommit or QueryState of, before answering, and refuses a PreCommit from a
//!   lower epoch ([`ThreePhaseError::StaleEpoch`], FAILED_PRECONDITION): a paused former
//!   coordinator cannot pre-commit a branch its successor is terminating. A PreCommit naming
//!   several branches is handled per branch: one refused fails the call (the first refusal in
//!   request order is its status), and the others are still handled as asked.
//! * **QueryState** answers each branch's [`BranchState`] and deadline from the record as it
//!   stands (a deadline in the past: the branch is acting on it right now). A QueryState
//!   naming no branches is the capability probe.
//! * **Deadlines survive restarts**: at start, past ones are acted on at once, later ones
//!   armed. A self-commit or self-abort that fails at the resource is retried (capped backoff)
//!   until it succeeds. Any request that would change a branch whose deadline has passed acts
//!   on the deadline first, so no answer depends on how late a timer ran.
//! * **Commit** (DoCommit) of a PREPARED or PRECOMMITTED branch commits it. **Abort** of a
//!   PREPARED one rolls it back; of a PRECOMMITTED one commits it (its only way forward) and
//!   answers COMMITTED, which the coordinator records as a heuristic commit.
//! * **Recover** lists three-phase PREPARED and PRECOMMITTED branches like two-phase ones.

pub mod journal;
pub mod journaled;
pub mod metrics;
pub mod reference;
pub mod server;
pub mod table;

use pledge_proto::{ResourceId, Xid};
use tonic::Status;

pub use server::routes;

/// A participant's answer to Prepare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Vote {
    /// Durably prepared. `metadata` (at most 4096 bytes) is logged by the coordinator with its
    /// decision and handed back on commit, abort and recovery.
    Prepared { metadata: Vec<u8> },
    /// The branch changed nothing; it needs no second phase.
    ReadOnly,
    /// Cannot commit; the branch has been rolled back.
    Aborted { reason: String },
}

/// How a branch ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Committed,
    Aborted {
        reason: String,
    },
    /// The resource decided on its own, against or without the coordinator's decision.
    HeuristicCommit {
        reason: String,
    },
    HeuristicRollback {
        reason: String,
    },
    HeuristicMixed {
        reason: String,
    },
    /// Nothing can prove how the branch ended.
    HeuristicHazard {
        reason: String,
    },
}

/// How a Commit reaches a branch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitKind {
    /// Phase 2 of a branch that voted PREPARED.
    TwoPhase,
    /// The transaction's only branch, never prepared: the participant decides (committed or
    /// aborted). `may_be_empty` as in Prepare.
    OnePhase { may_be_empty: bool },
}

/// A branch a participant holds prepared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InDoubt {
    pub xid: Xid,
    pub metadata: Vec<u8>,
    pub prepared_unix_ms: u64,
}

/// Which in-doubt branches a Recover call asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoverQuery {
    /// Only these resources (sorted, no duplicates); empty: every resource served.
    pub resources: Vec<ResourceId>,
    /// Only branches after this one, in (resource, gtid, branch) order.
    pub after: Option<Xid>,
    /// At most this many.
    pub limit: usize,
}

/// One page of in-doubt branches.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RecoverPage {
    /// In (resource, gtid, branch) order.
    pub branches: Vec<InDoubt>,
    /// More follow: ask again with `after` = the last one.
    pub truncated: bool,
}

/// A transient failure: the operation did not happen and may be retried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Error(pub String);

impl Error {
    pub fn new(message: impl Into<String>) -> Self {
        Error(message.into())
    }
}

/// Longest `precommit_wait_ms` a three-phase Prepare may ask for (longer: INVALID_ARGUMENT).
pub const MAX_PRECOMMIT_WAIT_MS: u64 = 3_600_000;
/// Longest `docommit_wait_ms` a PreCommit may ask for (longer, or 0: INVALID_ARGUMENT).
pub const MAX_DOCOMMIT_WAIT_MS: u64 = 3_600_000;

/// Where a branch is at its participant (three-phase commit's QueryState and PreCommit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BranchState {
    /// No record: never seen here, or forgotten after its retention (the reason says which).
    Unknown,
    /// Taking work, not prepared.
    Active,
    /// Voted yes; in three-phase commit, waiting for PreCommit until its wait deadline.
    Prepared,
    /// Pre-committed: commits itself at its do-commit deadline unless Commit comes first.
    PreCommitted,
    /// Committed (or voted read-only: nothing to commit).
    Committed,
    Aborted,
}

/// A branch's state and deadline: the answer to PreCommit and QueryState.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BranchStatus {
    pub state: BranchState,
    /// [`BranchState::Prepared`] under three-phase commit: its wait deadline;
    /// [`BranchState::PreCommitted`]: its do-commit deadline. Unix ms on this participant's
    /// clock; 0 when the state has none.
    pub deadline_unix_ms: u64,
    pub reason: String,
}

impl BranchStatus {
    pub fn new(state: BranchState, deadline_unix_ms: u64, reason: impl Into<String>) -> Self {
        BranchStatus { state, deadline_unix_ms, reason: reason.into() }
    }
}

/// Why a three-phase call about one branch was not answered with a state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ThreePhaseError {
    /// A coordinator of a later epoch has been answered about this branch (FAILED_PRECONDITION).
    #[error("a PreCommit at epoch {asked} is stale: epoch {answered} has been answered for this branch")]
    StaleEpoch { asked: u64, answered: u64 },
    /// PreCommit of a branch that did not vote yes in a three-phase Prepare: prepared under
    /// two-phase commit, or not prepared at all (FAILED_PRECONDITION).
    #[error("the branch is {state}: only a branch that voted yes in a three-phase Prepare can be pre-committed")]
    NotThreePhase { state: &'static str },
    /// Transient trouble (the journal, the resource): nothing changed; ask again (UNAVAILABLE).
    #[error("{0}")]
    Failed(Error),
}

impl From<Error> for ThreePhaseError {
    fn from(e: Error) -> Self {
        ThreePhaseError::Failed(e)
    }
}

/// Three-phase commit, for a participant that keeps the rules in the crate docs. Offered by
/// [`Participant::three_phase`]. The server validates every request before calling it
/// (`precommit_wait_ms` in 1..=[`MAX_PRECOMMIT_WAIT_MS`], `docommit_wait_ms` in
/// 1..=[`MAX_DOCOMMIT_WAIT_MS`], a PreCommit's `epoch` above 0; a QueryState at epoch 0 asks
/// as an observer and records nothing).
#[tonic::async_trait]
pub trait ThreePhase: Send + Sync {
    /// CanCommit: [`Participant::prepare`] whose yes vote waits at most `precommit_wait_ms`
    /// for PreCommit (the wait deadline is recorded with the vote), then aborts itself.
    async fn can_commit(
        &self,
        coordinator_id: &str,
        xid: &Xid,
        may_be_empty: bool,
        precommit_wait_ms: u64,
    ) -> Result<Vote, Error>;

    /// PreCommit of one branch from a coordinator at `epoch`; the state it is in afterwards.
    async fn pre_commit(
        &self,
        coordinator_id: &str,
        epoch: u64,
        xid: &Xid,
        metadata: &[u8],
        docommit_wait_ms: u64,
    ) -> Result<BranchStatus, ThreePhaseError>;

    /// The state of one branch, for a coordinator at `epoch` (recorded first, for a
    /// three-phase branch that is still undecided, when it is higher than the one recorded).
    async fn query_state(&self, coordinator_id: &str, epoch: u64, xid: &Xid) -> Result<BranchStatus, ThreePhaseError>;
}

/// One resource's side of the participant protocol. See the crate docs for the contract.
#[tonic::async_trait]
pub trait Participant: Send + Sync + 'static {
    async fn prepare(&self, coordinator_id: &str, xid: &Xid, may_be_empty: bool) -> Result<Vote, Error>;

    /// Commits a prepared branch, or, one-phase, a branch that was never prepared (the
    /// participant then decides: [`Outcome::Committed`] or [`Outcome::Aborted`]).
    async fn commit(
        &self,
        coordinator_id: &str,
        xid: &Xid,
        kind: CommitKind,
        metadata: &[u8],
    ) -> Result<Outcome, Error>;

    /// Rolls a branch back, whether prepared, still active, or unknown (then remember it, so a
    /// late Prepare is refused).
    async fn abort(&self, coordinator_id: &str, xid: &Xid, metadata: &[u8]) -> Result<Outcome, Error>;

    /// A page of the branches prepared (or pre-committed) for `coordinator_id` and not yet
    /// committed or aborted.
    async fn recover(&self, coordinator_id: &str, query: &RecoverQuery) -> Result<RecoverPage, Error>;

    /// Three-phase commit, if this participant keeps it (see the crate docs). `None` (the
    /// default): PreCommit and QueryState answer UNIMPLEMENTED, a three-phase Prepare votes no.
    fn three_phase(&self) -> Option<&dyn ThreePhase> {
        None
    }
}

/// Why work in a branch (a participant's own work API: run SQL, produce records) was refused
/// or failed. One enum for every adapter, mapped to a gRPC status by [`status_of`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BranchError {
    #[error("unknown resource {0:?}")]
    UnknownResource(String),
    /// The branch is past taking work (prepared, committed, aborted, or lost in a restart).
    #[error("branch is {state}{}", if reason.is_empty() { String::new() } else { format!(": {reason}") })]
    Finished { state: &'static str, reason: String },
    /// The request is wrong (a bad statement, an invalid topic name).
    #[error("{0}")]
    Invalid(String),
    /// The branch cannot take it as things stand (e.g. the branch's transaction was ended by
    /// its own statement, a constraint would be violated).
    #[error("{0}")]
    Refused(String),
    /// A bound is reached (active branches, producers, request ids per branch).
    #[error("{0}")]
    Busy(String),
    /// A request id already processed by a committed branch.
    #[error("{0}")]
    Duplicate(String),
    /// The work failed at the resource and the branch was rolled back: retry the transaction
    /// (a serialization failure, a deadlock, a record that could not be delivered).
    #[error("{0}")]
    Aborted(String),
    /// The resource (or the journal) cannot be reached now; nothing was done.
    #[error("{0}")]
    Unavailable(String),
}

/// The one place where branch errors become gRPC statuses.
pub fn status_of(e: &BranchError) -> Status {
    let message = e.to_string();
    match e {
        BranchError::UnknownResource(_) => Status::not_found(message),
        BranchError::Finished { .. } | BranchError::Refused(_) => Status::failed_precondition(message),
        BranchError::Invalid(_) => Status::invalid_argument(message),
        BranchError::Busy(_) => Status::resource_exhausted(message),
        BranchError::Duplicate(_) => Status::already_exists(message),
        BranchError::Aborted(_) => Status::aborted(message),
        BranchError::Unavailable(_) => Status::unavailable(message),
    }
}
