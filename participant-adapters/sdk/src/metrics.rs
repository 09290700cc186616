//! A participant's Prometheus metrics, recorded by [`crate::server`] for every participant
//! built on the SDK (no-ops until [`crate::server::serve_metrics`] installs the recorder).
//! With them: `pledge_rpc_*` per call (see [`pledge_proto::metrics`]) and, for participants
//! that keep a `pledge-log`, the log's `pledge_log_*`.

use metrics::{counter, describe_counter};

use crate::{Error, Outcome, Vote};

/// Branch operations, by operation and result.
pub const BRANCH_OPERATIONS: &str = "pledge_branch_operations_total";

pub fn describe() {
    pledge_log::describe_metrics();
    describe_counter!(
        BRANCH_OPERATIONS,
        "branch operations handled, by operation (prepare, commit, one_phase_commit, abort) and result"
    );
}

pub(crate) fn prepared(vote: &Result<Vote, Error>) {
    let result = match vote {
        Ok(Vote::Prepared { .. }) => "prepared",
        Ok(Vote::ReadOnly) => "read_only",
        Ok(Vote::Aborted { .. }) => "aborted",
        Err(_) => "error",
    };
    counter!(BRANCH_OPERATIONS, "operation" => "prepare", "result" => result).increment(1);
}

pub(crate) fn finished(operation: &'static str, outcome: &Result<Outcome, Error>) {
    let result = match outcome {
        Ok(Outcome::Committed) => "committed",
        Ok(Outcome::Aborted { .. }) => "aborted",
        Ok(_) => "heuristic",
        Err(_) => "error",
    };
    counter!(BRANCH_OPERATIONS, "operation" => operation, "result" => result).increment(1);
}
