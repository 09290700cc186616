//! A participant's Prometheus metrics, recorded by [`crate::server`] for every participant
//! built on the SDK (no-ops until [`crate::server::serve_metrics`] installs the recorder).
//! With them: `pledge_rpc_*` per call (see [`pledge_proto::metrics`]) and, for participants
//! that keep a `pledge-log`, the log's `pledge_log_*`.

use metrics::{counter, describe_counter, describe_gauge, gauge};

use crate::{Error, Outcome, Vote};

/// Branch operations, by operation and result.
pub const BRANCH_OPERATIONS: &str = "pledge_branch_operations_total";
/// Branches the journal holds, by state.
pub const JOURNAL_BRANCHES: &str = "pledge_journal_branches";
/// Answers the journal forgot, by why.
pub const JOURNAL_FORGOTTEN: &str = "pledge_journal_answers_forgotten_total";

pub fn describe() {
    pledge_log::describe_metrics();
    describe_counter!(
        BRANCH_OPERATIONS,
        "branch operations handled, by operation (prepare, commit, one_phase_commit, abort) and result"
    );
    describe_gauge!(
        JOURNAL_BRANCHES,
        "branches the participant's journal holds, by state (open, prepared, committing, finished); sampled every second"
    );
    describe_counter!(
        JOURNAL_FORGOTTEN,
        "finished branches' answers forgotten, by why: retention (older than answer_retention) or capacity (more than \
         max_answers; forgotten early, so a late question gets a heuristic hazard)"
    );
}

pub(crate) fn journal(g: &crate::journal::Gauges, forgotten: [u64; 2]) {
    for (state, n) in
        [("open", g.open), ("prepared", g.prepared), ("committing", g.committing), ("finished", g.finished)]
    {
        gauge!(JOURNAL_BRANCHES, "state" => state).set(n as f64);
    }
    for (why, n) in [("retention", forgotten[0]), ("capacity", forgotten[1])] {
        if n > 0 {
            counter!(JOURNAL_FORGOTTEN, "why" => why).increment(n);
        }
    }
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
