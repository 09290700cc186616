//! A participant's Prometheus metrics, recorded by [`crate::server`] for every participant
//! built on the SDK (no-ops until [`crate::server::serve_metrics`] installs the recorder).
//! With them: `pledge_rpc_*` per call (see [`pledge_proto::metrics`]) and, for participants
//! that keep a `pledge-log`, the log's `pledge_log_*`.

use metrics::{counter, describe_counter, describe_gauge, gauge};

use crate::{BranchState, BranchStatus, Error, Outcome, ThreePhaseError, Vote};

/// Branch operations, by operation and result.
pub const BRANCH_OPERATIONS: &str = "pledge_branch_operations_total";
/// Branches the journal holds, by state.
pub const JOURNAL_BRANCHES: &str = "pledge_journal_branches";
/// Answers the journal forgot, by why.
pub const JOURNAL_FORGOTTEN: &str = "pledge_journal_answers_forgotten_total";
/// Three-phase branches committed at their own do-commit deadline (no DoCommit came).
pub const SELF_COMMITS: &str = "pledge_participant_self_commits_total";
/// Three-phase branches rolled back at their own wait deadline (no PreCommit came).
pub const SELF_ABORTS: &str = "pledge_participant_self_aborts_total";
/// Failed attempts at a self-commit or self-abort (each is retried until it succeeds).
pub const SELF_DEADLINE_FAILURES: &str = "pledge_participant_self_deadline_failures_total";

pub fn describe() {
    pledge_log::describe_metrics();
    describe_counter!(
        BRANCH_OPERATIONS,
        "branch operations handled, by operation (prepare, can_commit, commit, one_phase_commit, abort, pre_commit, \
         query_state) and result"
    );
    describe_counter!(
        SELF_COMMITS,
        "three-phase branches that committed at their own do-commit deadline (no DoCommit came), by result (committed, \
         heuristic: the resource had ended the branch otherwise)"
    );
    describe_counter!(
        SELF_ABORTS,
        "three-phase branches that rolled back at their own wait deadline (no PreCommit came), by result (aborted, \
         heuristic)"
    );
    describe_counter!(
        SELF_DEADLINE_FAILURES,
        "failed attempts to act on a three-phase deadline at the resource; each is retried with capped backoff until \
         it succeeds"
    );
    describe_gauge!(
        JOURNAL_BRANCHES,
        "branches the participant's journal holds, by state (open, prepared (pre-committed included), committing, \
         finished); sampled every second"
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

/// A vote: `operation` is prepare, or can_commit (a three-phase prepare).
pub(crate) fn prepared(operation: &'static str, vote: &Result<Vote, Error>) {
    let result = match vote {
        Ok(Vote::Prepared { .. }) => "prepared",
        Ok(Vote::ReadOnly) => "read_only",
        Ok(Vote::Aborted { .. }) => "aborted",
        Err(_) => "error",
    };
    counter!(BRANCH_OPERATIONS, "operation" => operation, "result" => result).increment(1);
}

/// A PreCommit or QueryState of one branch, by the state it answered (or why it did not).
pub(crate) fn three_phase(operation: &'static str, result: &Result<BranchStatus, ThreePhaseError>) {
    let result = match result {
        Ok(s) => match s.state {
            BranchState::Unknown => "unknown",
            BranchState::Active => "active",
            BranchState::Prepared => "prepared",
            BranchState::PreCommitted => "precommitted",
            BranchState::Committed => "committed",
            BranchState::Aborted => "aborted",
        },
        Err(ThreePhaseError::StaleEpoch { .. }) => "stale_epoch",
        Err(ThreePhaseError::NotThreePhase { .. }) => "not_three_phase",
        Err(ThreePhaseError::Failed(_)) => "error",
    };
    counter!(BRANCH_OPERATIONS, "operation" => operation, "result" => result).increment(1);
}

/// A branch acted on its own deadline (`commit`: the do-commit deadline) and ended so.
pub(crate) fn self_deadline(commit: bool, outcome: &Outcome) {
    let result = match outcome {
        Outcome::Committed => "committed",
        Outcome::Aborted { .. } => "aborted",
        _ => "heuristic",
    };
    counter!(if commit { SELF_COMMITS } else { SELF_ABORTS }, "result" => result).increment(1);
}

pub(crate) fn self_deadline_failed() {
    counter!(SELF_DEADLINE_FAILURES).increment(1);
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
