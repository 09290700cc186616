//! Three-phase commit (docs/three-phase.md), the coordinator's side.
//!
//! The prepare round is two-phase commit's, with the participants' wait deadline in it
//! (CanCommit). Then:
//! 1. every vote yes: the `PreCommit` record (the decision's branches and both timeouts) is
//!    forced before any participant hears PreCommit;
//! 2. PreCommit to every prepared branch, asked again after failures until it answers its state;
//! 3. once every branch answered: commit if any is pre-committed or committed (each of those
//!    commits whatever happens), abort otherwise. Not before every answer: a branch still
//!    waiting for its PreCommit aborts itself at its wait deadline, so the first commit may only
//!    go out once every branch is past that point. If the acknowledgements are not all in when
//!    `docommit_wait_ms` passes, the acknowledged branches are committing on their own: the
//!    coordinator commits too and tells the rest;
//! 4. the commit record (forced), then the commit calls: two-phase commit's phase 2.
//!
//! After a restart or takeover, a transaction with a `PreCommit` record and no decision runs the
//! termination protocol: QueryState (at the current epoch, which makes every branch refuse a
//! stale owner's PreCommit) to every prepared branch; commit as soon as one is pre-committed or
//! committed, abort once all answered and none is. Branches that ended otherwise than the
//! decision come back from phase 2 as heuristic outcomes, and the transaction is heuristic mixed
//! (see `Ctx::finish_if_done`).

use super::*;
use crate::metrics::AbortCause;

impl Engine {
    /// The pre-commit record is durable: PreCommit to every prepared branch.
    pub(super) fn precommit_durable(&mut self, gtid: Gtid) {
        let Engine { txns, cx } = self;
        let Some(txn) = txns.get_mut(&gtid) else { return };
        if txn.phase != Phase::PreCommitPending {
            return;
        }
        let timeouts = txn.three_phase.expect("only a three-phase transaction writes a pre-commit record");
        txn.phase = Phase::PreCommitting;
        // Each branch's wait deadline runs from its yes vote: at the earliest, from when the
        // Prepares went out. PreCommits that may arrive after it could pre-commit some branches
        // while others abort themselves. Nothing is pre-committed yet, so abort instead.
        let prepares_sent_ms = txn.prepare_deadline_ms.saturating_sub(cx.cfg.prepare_timeout_ms);
        let earliest_wait_deadline_ms = prepares_sent_ms + timeouts.precommit_wait_ms;
        if cx.now + cx.cfg.precommit_delivery_ms >= earliest_wait_deadline_ms {
            let reason = format!(
                "three-phase: the pre-commit decision was durable {} ms after the prepare round began, too late for \
                 PreCommit to reach every branch within its {} ms wait (a slow decision log or store)",
                cx.now - prepares_sent_ms,
                timeouts.precommit_wait_ms
            );
            cx.decide_abort(txn, AbortCause::PreCommitLate, reason);
            return cx.finish_if_done(txn);
        }
        txn.precommit_ack_deadline_ms = cx.now + timeouts.docommit_wait_ms;
        cx.timers.insert((txn.precommit_ack_deadline_ms, gtid, TimerKind::PreCommitAck));
        cx.send_state_calls(txn);
    }

    /// A participant answered PreCommit or QueryState (or the call failed).
    pub(super) fn state_answered(&mut self, gtid: Gtid, key: BranchKey, result: StateResult) {
        let Engine { txns, cx } = self;
        let Some(txn) = txns.get_mut(&gtid) else { return };
        if !matches!(txn.phase, Phase::PreCommitting | Phase::Terminating) {
            return; // decided without this answer; phase 2 settles the branch
        }
        let now = cx.now;
        let Some(branch) = txn.branch_mut(&key) else { return };
        if branch.vote != Some(Vote::Prepared) || branch.participant_state.is_some() {
            return; // never asked, or a duplicate
        }
        branch.in_flight = false;
        branch.attempts += 1;
        match result {
            StateResult::Failed { error } => {
                branch.last_error = Some(error);
                branch.next_retry_ms = now + cx.backoff_ms(branch.attempts);
                let due = branch.next_retry_ms;
                cx.arm_retry(txn, due);
                return;
            }
            StateResult::State { state, reason } => {
                branch.participant_state = Some(state);
                branch.next_retry_ms = 0;
                if reason.is_some() {
                    branch.last_error = reason;
                }
            }
        }
        cx.settle_three_phase(txn);
        cx.finish_if_done(txn);
    }
}

/// Why a branch that answered the termination protocol with no record is a hazard.
const UNKNOWN_AT_TERMINATION: &str = "it voted yes, then answered the three-phase state query with no record of the \
                                      branch (lost, or forgotten after its retention): whether it committed on its \
                                      own is not known";

/// An aborting branch that answered it has no record: finished as a heuristic hazard (the
/// state only; replay uses it as is).
pub(super) fn mark_hazard(b: &mut Branch) {
    b.acked = true;
    b.in_flight = false;
    b.outcome = Some(BranchOutcome::HeuristicHazard);
    b.last_error = Some(match b.last_error.take() {
        Some(said) if !said.starts_with(UNKNOWN_AT_TERMINATION) => {
            format!("{UNKNOWN_AT_TERMINATION}; the participant said: {said}")
        }
        Some(said) => said,
        None => UNKNOWN_AT_TERMINATION.to_string(),
    });
}

impl Ctx {
    /// Every vote is in and some branch prepared: force the pre-commit decision before any
    /// participant hears PreCommit.
    pub(super) fn start_precommit(&mut self, txn: &mut Txn) {
        txn.phase = Phase::PreCommitPending;
        txn.decided_ms = self.now;
        txn.decision_epoch = self.epoch_of(txn.gtid);
        self.append(LogRecord::PreCommit(txn.commit_record()), Some(SyncToken::PreCommit(txn.gtid)));
    }

    /// The wait for PreCommit acknowledgements is over with some missing. If a branch is
    /// pre-committed it is committing on its own by now: commit, and tell the silent ones.
    /// Otherwise nothing is known that decides: keep asking (a silent branch may be
    /// pre-committed, with its answer lost).
    pub(super) fn precommit_ack_timeout(&mut self, txn: &mut Txn) {
        if self.any_committable(txn) {
            tracing::warn!(gtid = %txn.gtid, "three-phase: not every branch acknowledged PreCommit in time; committing");
            self.decide_three_phase_commit(txn);
        }
    }

    /// Sends PreCommit (or, terminating, QueryState) to every prepared branch with no answer
    /// and no call in flight.
    pub(super) fn send_state_calls(&mut self, txn: &mut Txn) {
        for i in 0..txn.branches.len() {
            let b = &txn.branches[i];
            if b.vote != Some(Vote::Prepared) || b.participant_state.is_some() || b.in_flight {
                continue;
            }
            let command = self.state_command(txn, b);
            self.out.push(command);
            let b = &mut txn.branches[i];
            b.in_flight = true;
            b.next_retry_ms = 0;
        }
    }

    /// The three-phase call a prepared branch gets in the transaction's phase.
    pub(super) fn state_command(&self, txn: &Txn, b: &Branch) -> Command {
        let (gtid, branch) = (txn.gtid, b.key.clone());
        match txn.phase {
            Phase::PreCommitting => Command::PreCommit {
                gtid,
                branch,
                metadata: b.metadata.clone(),
                docommit_wait_ms: txn.three_phase.map_or(0, |t| t.docommit_wait_ms),
                epoch: txn.decision_epoch,
            },
            // The current epoch, not the record's: asking at it fences a former owner's
            // PreCommit still on its way.
            _ => Command::QueryState { gtid, branch, epoch: self.epoch_of(gtid) },
        }
    }

    fn any_committable(&self, txn: &Txn) -> bool {
        txn.branches.iter().any(|b| b.participant_state.is_some_and(ParticipantState::is_committable))
    }

    /// Applies the termination rules to the answers so far.
    fn settle_three_phase(&mut self, txn: &mut Txn) {
        let committable = self.any_committable(txn);
        let all_answered =
            txn.branches.iter().filter(|b| b.vote == Some(Vote::Prepared)).all(|b| b.participant_state.is_some());
        // Past the do-commit wait, a pre-committed branch is committing on its own.
        let waited = self.now >= txn.precommit_ack_deadline_ms;
        match txn.phase {
            Phase::PreCommitting if committable && (all_answered || waited) => self.decide_three_phase_commit(txn),
            Phase::Terminating if committable => self.decide_three_phase_commit(txn),
            Phase::PreCommitting | Phase::Terminating if all_answered => {
                let states: Vec<String> =
                    txn.branches.iter().filter_map(|b| Some(format!("{} {:?}", b.key, b.participant_state?))).collect();
                let reason = format!("three-phase: no branch was pre-committed ({})", states.join(", "));
                self.decide_abort(txn, AbortCause::NotPreCommitted, reason);
                self.unknown_branches_are_hazards(txn);
            }
            _ => {}
        }
    }

    /// Aborting, some branch that voted yes answered that it has no record of the branch (it
    /// lost it, or forgot it after its retention). It may have been pre-committed and have
    /// committed on its own before it forgot: nothing proves how it ended. A heuristic hazard,
    /// recorded, counted and kept for an operator — never taken for an abort.
    pub(super) fn unknown_branches_are_hazards(&mut self, txn: &mut Txn) {
        let gtid = txn.gtid;
        for b in txn.branches.iter_mut().filter(|b| b.participant_state == Some(ParticipantState::Unknown)) {
            mark_hazard(b);
            crate::metrics::heuristic(BranchOutcome::HeuristicHazard);
            tracing::warn!(%gtid, branch = %b.key, "heuristic hazard: {UNKNOWN_AT_TERMINATION}");
        }
    }

    /// Commits: the commit record (forced), then phase 2 as in two-phase commit.
    pub(super) fn decide_three_phase_commit(&mut self, txn: &mut Txn) {
        self.timers.remove(&(txn.precommit_ack_deadline_ms, txn.gtid, TimerKind::PreCommitAck));
        self.end_state_calls(txn);
        txn.phase = Phase::CommitPending;
        txn.decided_ms = self.now;
        txn.decision_epoch = self.epoch_of(txn.gtid);
        self.append(LogRecord::Commit(txn.commit_record()), Some(SyncToken::Commit(txn.gtid)));
    }

    /// The state calls are over (decided): late answers are ignored, and phase 2 starts afresh.
    pub(super) fn end_state_calls(&mut self, txn: &mut Txn) {
        if let Some(at) = txn.retry_timer_ms.take() {
            self.timers.remove(&(at, txn.gtid, TimerKind::Retry));
        }
        for b in &mut txn.branches {
            b.in_flight = false;
            b.next_retry_ms = 0;
            b.attempts = 0;
        }
    }
}
