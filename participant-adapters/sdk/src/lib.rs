//! Pledge's generic participant SDK.
//!
//! A service takes part in Pledge's global transactions by implementing [`Participant`]
//! (prepare / commit / abort / recover for one branch at a time) and serving it with
//! [`server::routes`], which adds gRPC health checking and server reflection. The server
//! validates every request once, on receipt, and runs the branches of a batched call
//! concurrently.
//!
//! [`reference`] is a complete participant built on this SDK: a small durable key-value store
//! (binary `pledge-reference-participant`) used by tests, demos and benchmarks.
//!
//! # The contract an implementation must keep
//! * **Prepare is a pledge.** Answer [`Vote::Prepared`] only once the branch's work is durable
//!   and can be committed even after a crash; from then on, never roll it back on your own.
//! * **Idempotent on (gtid, branch, operation).** A repeated Prepare, Commit or Abort returns the
//!   same answer as the first. Commit of a branch you prepared but no longer know means it was
//!   already committed: answer [`Outcome::Committed`].
//! * **No dangling prepare.** A Prepare that arrives after an Abort of the same branch is
//!   refused with [`Vote::Aborted`]. Remember aborted branches (at least as long as the
//!   coordinator's longest transaction timeout), or refuse prepares of GTIDs older than what
//!   you remember: a GTID is a UUIDv7 whose timestamp tells its age.
//! * **Recover lists exactly the prepared branches** of the asking coordinator.
//! * Transient trouble (database unreachable, lock timeout) is an [`Error`]; the coordinator
//!   retries phase 2 until it gets an answer.

pub mod metrics;
pub mod reference;
pub mod server;
pub mod table;

use pledge_proto::Xid;

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
    HeuristicHazard {
        reason: String,
    },
}

/// A branch a participant holds prepared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InDoubt {
    pub xid: Xid,
    pub metadata: Vec<u8>,
    pub prepared_unix_ms: u64,
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

/// One resource's side of the participant protocol. See the crate docs for the contract.
#[tonic::async_trait]
pub trait Participant: Send + Sync + 'static {
    async fn prepare(&self, coordinator_id: &str, xid: &Xid) -> Result<Vote, Error>;

    /// Commits a prepared branch, or, with `one_phase`, a branch that was never prepared (the
    /// participant then decides: [`Outcome::Committed`] or [`Outcome::Aborted`]).
    async fn commit(&self, coordinator_id: &str, xid: &Xid, one_phase: bool, metadata: &[u8])
    -> Result<Outcome, Error>;

    /// Rolls a branch back, whether prepared, still active, or unknown (then remember it, so a
    /// late Prepare is refused).
    async fn abort(&self, coordinator_id: &str, xid: &Xid, metadata: &[u8]) -> Result<Outcome, Error>;

    /// The branches prepared for `coordinator_id` and not yet committed or aborted.
    async fn recover(&self, coordinator_id: &str) -> Result<Vec<InDoubt>, Error>;
}
