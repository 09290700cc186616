//! The coordinator's Prometheus metrics, recorded through the `metrics` facade (no-ops unless
//! `metrics_listen` is set; see [`pledge_proto::metrics`] for the endpoint and the per-call
//! `pledge_rpc_*` metrics, and `pledge_log` for the decision log's `pledge_log_*`).
//!
//! What an operator watches: commit and abort rates and why transactions abort
//! (`pledge_transaction_aborts_total{cause}`), transactions in flight by state, how long the
//! oldest decided transaction has waited for its participants (a participant that is down
//! shows here first), participant call errors and latency, and the log's sync latency.

use std::time::Duration;

use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use pledge_proto::ResourceId;

use crate::engine::{Gauges, TxnState};

pub const BEGUN: &str = "pledge_transactions_begun_total";
pub const FINISHED: &str = "pledge_transactions_finished_total";
pub const ABORTS: &str = "pledge_transaction_aborts_total";
pub const PHASE2_RETRIES: &str = "pledge_phase2_retries_total";
pub const HEURISTIC: &str = "pledge_heuristic_outcomes_total";
pub const HEURISTIC_MIXED: &str = "pledge_heuristic_mixed_transactions_total";
pub const LIVE: &str = "pledge_transactions";
pub const OLDEST_IN_DOUBT: &str = "pledge_oldest_in_doubt_seconds";
pub const RETAINED: &str = "pledge_transactions_retained";
pub const HEURISTIC_KEPT: &str = "pledge_heuristic_transactions";
pub const RESOLUTIONS: &str = "pledge_operator_resolutions_total";
pub const RETENTION_FULL: &str = "pledge_retention_full_refusals_total";
pub const PROTOCOL_ERRORS: &str = "pledge_participant_protocol_errors_total";
pub const PARTICIPANT_CALLS: &str = "pledge_participant_calls_total";
pub const PARTICIPANT_BRANCHES: &str = "pledge_participant_call_branches_total";
pub const PARTICIPANT_CALL_DURATION: &str = "pledge_participant_call_duration_seconds";
pub const SHARDS_OWNED: &str = "pledge_cluster_shards_owned";
pub const OWNERSHIP_CHANGES: &str = "pledge_cluster_ownership_changes_total";
pub const TAKEOVERS: &str = "pledge_cluster_takeovers_total";
pub const FENCED_WRITES: &str = "pledge_store_fenced_writes_total";
pub const STORE_RETRIES: &str = "pledge_store_write_retries_total";
pub const STORE_WRITE_DURATION: &str = "pledge_store_write_duration_seconds";
pub const STORE_BATCH_RECORDS: &str = "pledge_store_batch_records";

/// Why the engine decided to abort a transaction (the `cause` label of [`ABORTS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortCause {
    /// The client called Abort.
    Client,
    /// A branch voted no.
    Vote,
    /// A prepare call failed (participant unreachable, error, bad answer).
    PrepareFailed,
    /// The transaction was not committed within its timeout.
    Timeout,
    /// Not every vote arrived within the prepare deadline.
    PrepareTimeout,
    /// The participant of a one-phase commit did not commit the branch (rolled it back, or
    /// reported a mixed or hazard heuristic outcome).
    OnePhase,
    /// Three-phase: every branch answered PreCommit or the termination protocol's state query,
    /// and none was pre-committed.
    NotPreCommitted,
    /// Three-phase: the pre-commit decision became durable too late for PreCommit to reach every
    /// branch before its wait deadline (a slow decision log or store).
    PreCommitLate,
    /// An operator resolved the transaction to roll back (`pledge txn resolve`).
    Operator,
}

impl AbortCause {
    pub fn label(self) -> &'static str {
        match self {
            AbortCause::Client => "client",
            AbortCause::Vote => "vote",
            AbortCause::PrepareFailed => "prepare_failed",
            AbortCause::Timeout => "timeout",
            AbortCause::PrepareTimeout => "prepare_timeout",
            AbortCause::OnePhase => "one_phase",
            AbortCause::NotPreCommitted => "not_precommitted",
            AbortCause::PreCommitLate => "precommit_late",
            AbortCause::Operator => "operator",
        }
    }
}

/// Registers the help texts (the log's and the coordinator's).
pub fn describe() {
    pledge_log::describe_metrics();
    describe_counter!(BEGUN, "transactions begun (a Begin repeated with the same idempotency key counts once)");
    describe_counter!(FINISHED, "transactions finished (every branch acknowledged), by outcome");
    describe_counter!(ABORTS, "abort decisions, by cause");
    describe_counter!(PHASE2_RETRIES, "commit or abort calls to a branch that must be retried (after backoff)");
    describe_counter!(
        HEURISTIC,
        "heuristic outcomes of branches (need an operator), by kind: commit, rollback, mixed, hazard"
    );
    describe_counter!(
        HEURISTIC_MIXED,
        "transactions whose branches ended differently, some committed and some rolled back (need an operator)"
    );
    describe_gauge!(LIVE, "transactions not yet finished, by state");
    describe_gauge!(
        OLDEST_IN_DOUBT,
        Unit::Seconds,
        "time since the oldest unfinished decision was made (a transaction whose outcome is decided but not yet \
         acknowledged by every branch); 0 when there is none"
    );
    describe_gauge!(
        RETAINED,
        "finished transactions kept for Get and retried calls (completed_retention_ms); at \
         max_retained_transactions Begin is refused"
    );
    describe_gauge!(HEURISTIC_KEPT, "finished transactions with a heuristic outcome, kept until an operator acts");
    describe_counter!(
        RESOLUTIONS,
        "operator resolutions that changed something (pledge txn resolve), by action (commit, rollback, forget) and \
         effect (retried, branch-settled, decided, forgotten)"
    );
    describe_counter!(
        RETENTION_FULL,
        "Begin calls refused because max_retained_transactions finished transactions are kept (none is forgotten \
         before completed_retention_ms)"
    );
    describe_counter!(
        PROTOCOL_ERRORS,
        "participant answers that break the protocol (a result for a branch not asked about, or none for one \
         that was), by resource; such a branch counts as having no answer"
    );
    describe_counter!(
        PARTICIPANT_CALLS,
        "calls to participants (Prepare, Commit, Abort, and Recover pages), by resource, call and gRPC status code"
    );
    describe_counter!(
        PARTICIPANT_BRANCHES,
        "branches carried by calls to participants (calls are batched; for Recover, the branches listed)"
    );
    describe_histogram!(PARTICIPANT_CALL_DURATION, Unit::Seconds, "participant call latency, by resource and call");
    describe_gauge!(SHARDS_OWNED, "cluster: shards this instance owns");
    describe_counter!(
        OWNERSHIP_CHANGES,
        "cluster: shards this instance started or stopped owning, by change (acquired, lost)"
    );
    describe_counter!(TAKEOVERS, "cluster: shards taken over from an instance whose lease expired");
    describe_counter!(
        FENCED_WRITES,
        "cluster: decision writes refused because the shard has a new owner (this instance then drops the shard)"
    );
    describe_counter!(
        STORE_RETRIES,
        "cluster: decision store writes retried (lost connection, timeout, failover: the outcome was unknown)"
    );
    describe_histogram!(STORE_WRITE_DURATION, Unit::Seconds, "cluster: one decision store transaction (group commit)");
    describe_histogram!(STORE_BATCH_RECORDS, "cluster: records in one decision store transaction");
}

pub fn store_write(took: Duration, records: usize) {
    histogram!(STORE_WRITE_DURATION).record(took);
    histogram!(STORE_BATCH_RECORDS).record(records as f64);
}

pub fn store_retry() {
    counter!(STORE_RETRIES).increment(1);
}

pub fn fenced_write() {
    counter!(FENCED_WRITES).increment(1);
}

pub fn shard_acquired(takeover: bool) {
    counter!(OWNERSHIP_CHANGES, "change" => "acquired").increment(1);
    gauge!(SHARDS_OWNED).increment(1.0);
    if takeover {
        counter!(TAKEOVERS).increment(1);
    }
}

pub fn shard_lost() {
    counter!(OWNERSHIP_CHANGES, "change" => "lost").increment(1);
    gauge!(SHARDS_OWNED).decrement(1.0);
}

pub fn begun() {
    counter!(BEGUN).increment(1);
}

pub fn finished(committed: bool) {
    counter!(FINISHED, "outcome" => if committed { "committed" } else { "aborted" }).increment(1);
}

pub fn aborted(cause: AbortCause) {
    counter!(ABORTS, "cause" => cause.label()).increment(1);
}

pub fn phase2_retry() {
    counter!(PHASE2_RETRIES).increment(1);
}

/// A branch's heuristic outcome, by kind: `commit`, `rollback`, `mixed` or `hazard`.
pub fn heuristic(outcome: crate::engine::BranchOutcome) {
    use crate::engine::BranchOutcome as O;
    let kind = match outcome {
        O::HeuristicCommit => "commit",
        O::HeuristicRollback => "rollback",
        O::HeuristicMixed => "mixed",
        O::HeuristicHazard => "hazard",
        O::Committed | O::Aborted => return,
    };
    counter!(HEURISTIC, "kind" => kind).increment(1);
}

/// An operator's resolution that took effect.
pub fn resolution(action: crate::engine::ResolveAction, effect: crate::engine::ResolveEffect) {
    counter!(RESOLUTIONS, "action" => action.to_string(), "effect" => effect.to_string()).increment(1);
}

pub fn heuristic_mixed() {
    counter!(HEURISTIC_MIXED).increment(1);
}

pub fn retention_full() {
    counter!(RETENTION_FULL).increment(1);
}

pub fn protocol_error(resource: &ResourceId) {
    counter!(PROTOCOL_ERRORS, "resource" => resource.to_string()).increment(1);
}

/// Publishes the engine's gauges (the runtime calls this every `GAUGE_INTERVAL`).
pub fn publish(g: &Gauges) {
    for (state, count) in [
        (TxnState::Active, g.active),
        (TxnState::Preparing, g.preparing),
        (TxnState::Committing, g.committing),
        (TxnState::Aborting, g.aborting),
    ] {
        gauge!(LIVE, "state" => state.to_string()).set(count as f64);
    }
    gauge!(OLDEST_IN_DOUBT).set(g.oldest_in_doubt_ms as f64 / 1000.0);
    gauge!(RETAINED).set(g.retained as f64);
    gauge!(HEURISTIC_KEPT).set(g.heuristic as f64);
}

/// One call to a participant: `call` is Prepare, Commit, Abort or Recover.
pub fn participant_call(resource: &ResourceId, call: &'static str, branches: usize, code: tonic::Code, took: Duration) {
    let resource = resource.to_string();
    let code = pledge_proto::metrics::code_name(code);
    counter!(PARTICIPANT_CALLS, "resource" => resource.clone(), "call" => call, "code" => code).increment(1);
    counter!(PARTICIPANT_BRANCHES, "resource" => resource.clone(), "call" => call).increment(branches as u64);
    histogram!(PARTICIPANT_CALL_DURATION, "resource" => resource, "call" => call).record(took);
}
