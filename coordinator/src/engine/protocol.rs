//! The protocol's steps, on one transaction at a time: enlisting, starting the commit (one
//! phase or prepare), deciding abort, phase 2 and its retries, finishing and retention.

use std::sync::Arc;

use pledge_proto::{BranchKey, Gtid};

use super::*;
use crate::metrics::{self, AbortCause};

pub(super) fn phase2_command(op: Phase2Op, gtid: Gtid, b: &Branch, one_phase: bool) -> Command {
    let (branch, metadata) = (b.key.clone(), b.metadata.clone());
    match op {
        Phase2Op::Commit => Command::Commit { gtid, branch, one_phase, metadata, may_be_empty: b.may_be_empty },
        Phase2Op::Abort => Command::Abort { gtid, branch, metadata },
    }
}

impl Ctx {
    /// The error for a GTID with no transaction here.
    pub(super) fn unknown(&self, gtid: Gtid) -> EngineError {
        match gtid.unix_ms() {
            Some(t) if t <= self.forgotten_through_ms => EngineError::OutcomeForgotten(gtid),
            _ => EngineError::UnknownTransaction(gtid),
        }
    }

    /// Adds a Commit call to the transaction's waiters, or refuses it when too many wait. Only a
    /// call that must wait can be refused so: one that can be answered now always is.
    pub(super) fn add_waiter(&mut self, txn: &mut Txn, waiter: Waiter) {
        if txn.waiters.len() >= MAX_WAITERS_PER_TXN {
            let e = EngineError::TooManyWaiters { gtid: txn.gtid, max: MAX_WAITERS_PER_TXN };
            return self.reply(waiter.req, Err(e));
        }
        txn.waiters.push(waiter);
    }

    pub(super) fn reply(&mut self, req: ReqId, reply: Result<Reply, EngineError>) {
        self.out.push(Command::Reply { req, reply });
    }

    pub(super) fn append(&mut self, record: LogRecord, sync: Option<SyncToken>) {
        self.records_since_checkpoint += 1;
        self.out.push(Command::Append { record, sync });
    }

    pub(super) fn add_branches(&mut self, txn: &mut Txn, branches: Vec<Enlisted>) -> Result<(), EngineError> {
        // Validate everything first: a refused request changes nothing.
        // Linear in the request: a client's list is never compared with itself pairwise.
        let mut seen: std::collections::HashMap<&BranchKey, bool> =
            txn.branches.iter().map(|b| (&b.key, b.may_be_empty)).collect();
        for e in &branches {
            if !self.participants.contains_key(&e.key.resource) {
                return Err(EngineError::UnknownResource(e.key.resource.clone()));
            }
            if txn.three_phase.is_some() {
                // Never downgraded: a participant that cannot keep three-phase commit's
                // promises is refused, not enlisted under two-phase rules.
                match self.three_phase_capable.get(&e.key.resource) {
                    Some(true) => {}
                    Some(false) => return Err(EngineError::NotThreePhase(e.key.resource.clone())),
                    None => return Err(EngineError::CapabilityUnknown(e.key.resource.clone())),
                }
            }
            match seen.insert(&e.key, e.may_be_empty) {
                Some(was) if was != e.may_be_empty => {
                    return Err(EngineError::EnlistConflict { branch: e.key.clone(), may_be_empty: was });
                }
                _ => {}
            }
        }
        let count = seen.len();
        if count > self.cfg.max_branches_per_transaction {
            return Err(EngineError::TooManyBranches { count, max: self.cfg.max_branches_per_transaction });
        }
        for e in branches {
            if !txn.branches.iter().any(|b| b.key == e.key) {
                let mut branch = Branch::new(e.key);
                branch.may_be_empty = e.may_be_empty;
                txn.branches.push(branch);
            }
        }
        Ok(())
    }

    pub(super) fn start_commit(&mut self, txn: &mut Txn) {
        match txn.branches.len() {
            0 => {
                txn.phase = Phase::Committed;
                txn.decided_ms = self.now;
            }
            1 => {
                // The decision to commit is forced before the participant hears it, like a
                // commit record: after a crash, the coordinator asks again instead of presuming.
                txn.phase = Phase::OnePhasePending;
                txn.one_phase = true;
                txn.decided_ms = self.now;
                txn.decision_epoch = self.epoch_of(txn.gtid);
                self.append(LogRecord::OnePhase(txn.one_phase_record()), Some(SyncToken::OnePhase(txn.gtid)));
            }
            _ => {
                txn.phase = Phase::Preparing;
                txn.prepare_deadline_ms = self.now + self.cfg.prepare_timeout_ms;
                self.timers.insert((txn.prepare_deadline_ms, txn.gtid, TimerKind::PrepareTimeout));
                let precommit_wait_ms = txn.three_phase.map_or(0, |t| t.precommit_wait_ms);
                for b in &txn.branches {
                    self.out.push(Command::Prepare {
                        gtid: txn.gtid,
                        branch: b.key.clone(),
                        may_be_empty: b.may_be_empty,
                        precommit_wait_ms,
                    });
                }
            }
        }
    }

    /// Decides abort (presumed: nothing is forced to the log) and tells every branch that may
    /// hold work or a prepared state to roll back.
    pub(super) fn decide_abort(&mut self, txn: &mut Txn, cause: AbortCause, reason: String) {
        match txn.phase {
            Phase::Active => {
                self.timers.remove(&(txn.deadline_ms, txn.gtid, TimerKind::TxnTimeout));
            }
            Phase::Preparing => {
                self.timers.remove(&(txn.prepare_deadline_ms, txn.gtid, TimerKind::PrepareTimeout));
            }
            // Three-phase: the termination rules found no branch pre-committed.
            Phase::PreCommitting | Phase::Terminating => {
                self.timers.remove(&(txn.precommit_ack_deadline_ms, txn.gtid, TimerKind::PreCommitAck));
                self.end_state_calls(txn);
            }
            _ => return,
        }
        txn.phase = Phase::Aborting;
        txn.decided_ms = self.now;
        txn.abort_reason = Some(reason);
        metrics::aborted(cause);
        for b in &mut txn.branches {
            // Every branch but a read-only one is told to roll back: prepared ones, ones not yet
            // asked or not yet answered (a Prepare still on its way then becomes a refused
            // "dangling prepare"), and ones that voted no, since a participant may have
            // prepared and then failed to say so.
            b.acked = b.vote == Some(Vote::ReadOnly);
        }
        self.send_phase2(txn, Phase2Op::Abort);
        let outcome = txn.commit_outcome();
        self.reply_waiters(txn, |w| !w.wait_for_completion, &outcome);
    }

    /// Sends the one-phase commit of a transaction's only branch (its intent is durable).
    pub(super) fn send_one_phase(&mut self, txn: &mut Txn) {
        let branch = &mut txn.branches[0];
        branch.in_flight = true;
        branch.next_retry_ms = 0;
        self.out.push(phase2_command(Phase2Op::Commit, txn.gtid, branch, true));
    }

    /// Finished transactions kept (for retention, or until an operator acts).
    pub(super) fn retained(&self) -> usize {
        self.retired.len() + self.kept_heuristic.len()
    }

    /// Starts keeping a finished transaction whose outcome is durable: for the retention, or
    /// until an operator acts on it if it has a heuristic outcome.
    pub(super) fn retain(&mut self, txn: &mut Txn, since: Millis) {
        if txn.needs_operator() {
            self.kept_heuristic.insert(txn.gtid);
        } else {
            self.retired.push_back((since, txn.gtid));
        }
    }

    pub(super) fn send_phase2(&mut self, txn: &mut Txn, op: Phase2Op) {
        for b in txn.branches.iter_mut().filter(|b| !b.acked && !b.in_flight) {
            b.in_flight = true;
            b.next_retry_ms = 0;
            self.out.push(phase2_command(op, txn.gtid, b, false));
        }
    }

    pub(super) fn send_due_retries(&mut self, txn: &mut Txn) {
        if !matches!(
            txn.phase,
            Phase::OnePhaseCommit | Phase::Committing | Phase::Aborting | Phase::PreCommitting | Phase::Terminating
        ) {
            return;
        }
        let mut next: Option<Millis> = None;
        for i in 0..txn.branches.len() {
            let b = &txn.branches[i];
            if b.acked || b.in_flight || b.next_retry_ms == 0 {
                continue;
            }
            if b.next_retry_ms <= self.now {
                let command = self.retry_command(txn, b);
                self.out.push(command);
                let b = &mut txn.branches[i];
                b.in_flight = true;
                b.next_retry_ms = 0;
            } else {
                next = Some(next.map_or(b.next_retry_ms, |n| n.min(b.next_retry_ms)));
            }
        }
        if let Some(at) = next {
            self.arm_retry(txn, at);
        }
    }

    /// The call a branch is due to get again in the transaction's phase.
    fn retry_command(&self, txn: &Txn, b: &Branch) -> Command {
        match txn.phase {
            Phase::OnePhaseCommit => phase2_command(Phase2Op::Commit, txn.gtid, b, true),
            Phase::Committing => phase2_command(Phase2Op::Commit, txn.gtid, b, false),
            Phase::Aborting => phase2_command(Phase2Op::Abort, txn.gtid, b, false),
            _ => self.state_command(txn, b),
        }
    }

    pub(super) fn arm_retry(&mut self, txn: &mut Txn, at: Millis) {
        match txn.retry_timer_ms {
            Some(armed) if armed <= at => {}
            armed => {
                if let Some(old) = armed {
                    self.timers.remove(&(old, txn.gtid, TimerKind::Retry));
                }
                txn.retry_timer_ms = Some(at);
                self.timers.insert((at, txn.gtid, TimerKind::Retry));
            }
        }
    }

    /// Exponential backoff with "equal jitter": half the delay is fixed, half random, so
    /// retries against a recovering participant spread out but never fire back-to-back.
    pub(super) fn backoff_ms(&mut self, attempt: u32) -> u64 {
        let exp = attempt.saturating_sub(1).min(32);
        let delay = self.cfg.retry_initial_backoff_ms.saturating_mul(1u64 << exp).min(self.cfg.retry_max_backoff_ms);
        let half = delay / 2;
        half + self.rng.u64(0..=delay - half)
    }

    pub(super) fn reply_waiters(&mut self, txn: &mut Txn, which: impl Fn(&Waiter) -> bool, outcome: &CommitOutcome) {
        let out = &mut self.out;
        txn.waiters.retain(|w| {
            if which(w) {
                out.push(Command::Reply { req: w.req, reply: Ok(Reply::CommitOutcome(outcome.clone())) });
                false
            } else {
                true
            }
        });
    }

    /// Moves a transaction whose every branch has acknowledged to its final state: end record,
    /// remaining waiters answered, retained for a while for Get and retries.
    pub(super) fn finish_if_done(&mut self, txn: &mut Txn) {
        let finished = match txn.phase {
            Phase::Committing if txn.all_acked() => Phase::Committed,
            Phase::Aborting if txn.all_acked() => Phase::Aborted,
            // Reached directly (empty, all read-only, one-phase) and not yet finished.
            Phase::Committed | Phase::Aborted if txn.end.is_none() => txn.phase,
            _ => return,
        };
        txn.phase = finished;
        txn.completed_ms = self.now;
        metrics::finished(finished == Phase::Committed);
        if txn.heuristic_mixed() {
            // Never a clean outcome: counted, logged here once, kept for an operator and shown
            // by Get and List.
            metrics::heuristic_mixed();
            let outcomes: Vec<String> =
                txn.branches.iter().filter_map(|b| Some(format!("{}: {:?}", b.key, b.outcome?))).collect();
            tracing::error!(gtid = %txn.gtid, protocol = ?txn.protocol(), outcomes = %outcomes.join(", "),
                "heuristic mixed: branches of one transaction ended differently");
        }
        if let Some(at) = txn.retry_timer_ms.take() {
            self.timers.remove(&(at, txn.gtid, TimerKind::Retry));
        }
        let end = Arc::new(txn.end_record());
        txn.end = Some(end.clone());
        // A commit no other record holds (empty, all read-only: nothing was logged; one-phase:
        // the participant's answer is news): the client hears it only once this record is
        // durable, so the same answer is given after a crash. Retention starts then too.
        let only_record = txn.one_phase || (finished == Phase::Committed && !txn.decision_logged()) || txn.end_sync;
        if only_record {
            txn.end_syncing = true;
            self.append(LogRecord::End(end), Some(SyncToken::End(txn.gtid)));
        } else {
            // Lazy: losing it costs a repeated (idempotent) phase 2 after a crash, or an abort
            // that presumed abort tells anyway; keeping it lets Get and retried Commit/Abort
            // answer for finished transactions after a restart.
            self.append(LogRecord::End(end), None);
            let outcome = txn.commit_outcome();
            self.reply_waiters(txn, |_| true, &outcome);
            let now = self.now;
            self.retain(txn, now);
        }
    }
}
