//! Operator resolution (`Resolve`, `pledge txn resolve`): what a person can do about a
//! transaction the protocol cannot finish on its own, or finished with a heuristic outcome.
//!
//! | asked | of | does |
//! |---|---|---|
//! | commit/rollback, no branch | phase 2 under way (or a one-phase commit, commit only) | sends it again now, not after the backoff |
//! | commit/rollback, a branch | not acknowledged | takes the branch as ended so: its participant cannot finish it; phase 2 to it stops |
//! | commit/rollback, a branch | heuristic outcome | records that a person repaired it by hand to match the decision |
//! | commit/rollback, no branch | three-phase, undecided after a restart (termination protocol stuck) | decides |
//! | forget, [a branch] | finished, heuristic | records the repair; the transaction is kept no longer than any other |
//!
//! Never against the decision: a transaction decided to commit cannot be resolved to roll
//! back, nor the reverse (and a three-phase one not against a state its branches answered).
//! A request that needs nothing (repeated, or already done by the protocol) changes nothing
//! and is not logged: resolution is idempotent. One that does something is applied at once
//! and logged (a `Resolve` record: caller, reason, effect); the caller hears of it once the
//! record is durable. Replay applies the record again (see [`Engine::replay_resolution`]).

use std::sync::Arc;

use pledge_proto::BranchKey;

use super::three_phase::mark_hazard;
use super::*;
use crate::metrics::{self, AbortCause};

/// What a resolution would do, decided before anything changes.
enum Plan {
    Apply(ResolveEffect),
    /// Nothing to do; why.
    Nothing(String),
}

impl Engine {
    pub(super) fn resolve(&mut self, req: ReqId, r: ResolveRequest) {
        let Engine { txns, cx } = self;
        let gtid = r.gtid;
        let Some(txn) = txns.get_mut(&gtid) else {
            return cx.reply(req, Err(cx.unknown(gtid)));
        };
        if let Some(key) = &r.branch
            && !txn.branches.iter().any(|b| &b.key == key)
        {
            return cx.reply(req, Err(EngineError::NoSuchBranch { gtid, branch: key.clone() }));
        }
        let effect = match plan(txn, r.branch.as_ref(), r.action) {
            Err(refusal) => return cx.reply(req, Err(EngineError::ResolveRefused(refusal))),
            Ok(Plan::Nothing(detail)) => {
                let transaction = Box::new(txn.view(true));
                return cx.reply(req, Ok(Reply::Resolved { changed: false, detail, transaction }));
            }
            Ok(Plan::Apply(effect)) => effect,
        };
        let commit = r.action == ResolveAction::Commit;
        let branch_outcome = match (effect, &r.branch) {
            (ResolveEffect::BranchSettled, Some(key)) => {
                let b = txn.branches.iter().find(|b| &b.key == key).expect("checked above");
                Some(match b.outcome {
                    Some(o) if o.is_heuristic() => o,
                    _ if commit => BranchOutcome::Committed,
                    _ => BranchOutcome::Aborted,
                })
            }
            _ => None,
        };
        let hazards = match effect {
            ResolveEffect::Decided if !commit => txn
                .branches
                .iter()
                .filter(|b| b.participant_state == Some(ParticipantState::Unknown))
                .map(|b| b.key.clone())
                .collect(),
            _ => Vec::new(),
        };
        let mut record = ResolveRecord {
            gtid,
            epoch: cx.epoch_of(gtid),
            at_ms: cx.now,
            action: r.action,
            branch: r.branch,
            operator: r.operator,
            peer: r.peer,
            reason: r.reason,
            effect,
            branch_outcome,
            hazards,
            releases: false,
        };
        // Among its resolutions before anything else: a transaction it finishes is retained by
        // it, and whether it repairs the last heuristic outcome counts it.
        txn.push_resolution(Arc::new(record.clone()));
        let kept_for_operator = txn.end.as_ref().is_some_and(|e| e.kept_for_operator);
        if txn.phase.is_finished() && kept_for_operator && !txn.needs_operator() {
            record.releases = true;
            *txn.resolutions.last_mut().expect("pushed above") = Arc::new(record.clone());
        }
        metrics::resolution(record.action, record.effect);
        tracing::warn!(%gtid, branch = ?record.branch.as_ref().map(ToString::to_string), action = %record.action,
            effect = %record.effect, operator = %record.operator, peer = %record.peer, reason = %record.reason,
            "operator resolution");
        // The record first, then what it causes (an End or Commit record, calls): the log never
        // holds an effect without the resolution that explains it.
        cx.append(LogRecord::Resolve(Arc::new(record.clone())), Some(SyncToken::Resolve { req, gtid }));
        cx.apply_resolution(txn, &record);
        if record.releases && cx.kept_heuristic.remove(&gtid) {
            // Repaired: from now on kept for the retention, like any finished transaction.
            cx.retired.push_back((cx.now, gtid));
        }
    }

    /// The resolution's record is durable: its caller hears what the transaction is now.
    pub(super) fn resolve_durable(&mut self, req: ReqId, gtid: Gtid) {
        let reply = match self.txns.get(&gtid) {
            Some(txn) => {
                let detail = txn.resolutions.last().map(|r| describe_effect(r)).unwrap_or_default();
                Ok(Reply::Resolved { changed: true, detail, transaction: Box::new(txn.view(true)) })
            }
            None => Err(self.cx.unknown(gtid)),
        };
        self.cx.reply(req, reply);
    }

    /// Applies a logged resolution to the transaction rebuilt from the records before it:
    /// its state only, since the commands it caused are resent by [`Engine::start`] (or were
    /// answered). A transaction no longer known ended under presumed abort: nothing to apply.
    pub(super) fn replay_resolution(&mut self, r: Arc<ResolveRecord>) {
        let Some(txn) = self.txns.get_mut(&r.gtid) else { return };
        txn.push_resolution(r.clone());
        let commit = r.action == ResolveAction::Commit;
        match r.effect {
            ResolveEffect::Retried | ResolveEffect::Forgotten => {}
            ResolveEffect::BranchSettled => {
                let phase = txn.phase;
                let Some(b) = r.branch.as_ref().and_then(|k| txn.branch_mut(k)) else { return };
                if b.acked {
                    return; // a later record (End) already holds its outcome
                }
                settle_branch(b, &r);
                if phase == Phase::OnePhaseCommit {
                    finish_one_phase(txn, &r, commit);
                    txn.completed_ms = r.at_ms;
                }
            }
            ResolveEffect::Decided if txn.phase == Phase::Terminating => {
                txn.decided_ms = r.at_ms;
                if commit {
                    txn.phase = Phase::Committing;
                } else {
                    txn.phase = Phase::Aborting;
                    txn.abort_reason = Some(operator_reason(&r, "decided abort"));
                    for b in &mut txn.branches {
                        b.acked = b.vote == Some(Vote::ReadOnly);
                        if r.hazards.contains(&b.key) {
                            mark_hazard(b);
                        }
                    }
                }
            }
            ResolveEffect::Decided => {}
        }
    }
}

impl Ctx {
    /// Carries out a resolution just logged (see the module documentation).
    fn apply_resolution(&mut self, txn: &mut Txn, r: &ResolveRecord) {
        let commit = r.action == ResolveAction::Commit;
        match r.effect {
            ResolveEffect::Retried => match txn.phase {
                Phase::OnePhaseCommit => self.send_one_phase(txn),
                Phase::Committing => self.send_phase2(txn, Phase2Op::Commit),
                _ => self.send_phase2(txn, Phase2Op::Abort),
            },
            ResolveEffect::BranchSettled => {
                let phase = txn.phase;
                let b = txn.branch_mut(r.branch.as_ref().expect("planned for a branch")).expect("checked");
                if !b.acked {
                    settle_branch(b, r);
                    if phase == Phase::OnePhaseCommit {
                        finish_one_phase(txn, r, commit);
                        if !commit {
                            metrics::aborted(AbortCause::Operator);
                        }
                    }
                    // Finished by the operator: nobody hears it before its End record (after
                    // this resolution in the log) is durable.
                    txn.end_sync = true;
                }
                self.finish_if_done(txn);
            }
            ResolveEffect::Decided if commit => self.decide_three_phase_commit(txn),
            ResolveEffect::Decided => {
                self.decide_abort(txn, AbortCause::Operator, operator_reason(r, "decided abort"));
                // A branch with no record may have committed on its own: a hazard, as when the
                // termination protocol decides abort itself.
                self.unknown_branches_are_hazards(txn);
                self.finish_if_done(txn);
            }
            ResolveEffect::Forgotten => {}
        }
    }
}

/// An unacknowledged branch taken as ended the way the operator says, with the outcome the
/// record holds: a heuristic outcome it reported stays as it was (what happened); the
/// resolution says how it was repaired.
fn settle_branch(b: &mut Branch, r: &ResolveRecord) {
    b.acked = true;
    b.in_flight = false;
    b.next_retry_ms = 0;
    b.outcome = r.branch_outcome.or(b.outcome);
}

/// A one-phase commit whose only branch an operator settled: the transaction ended so.
fn finish_one_phase(txn: &mut Txn, r: &ResolveRecord, commit: bool) {
    if commit {
        txn.phase = Phase::Committed;
    } else {
        txn.phase = Phase::Aborted;
        txn.abort_reason = Some(operator_reason(r, "recorded the one-phase commit as rolled back"));
    }
}

fn operator_reason(r: &ResolveRecord, what: &str) -> String {
    format!("{} (operator {} from {}) {what}: {}", r.at_ms, r.operator, r.peer, r.reason)
}

/// What a logged resolution did, for its caller.
fn describe_effect(r: &ResolveRecord) -> String {
    let branch = r.branch.as_ref().map(|b| format!("branch {b}")).unwrap_or_else(|| "every branch".into());
    let mut s = match r.effect {
        ResolveEffect::Retried => {
            format!("phase 2 ({}) sent again now to every unacknowledged branch", r.action)
        }
        ResolveEffect::BranchSettled => format!("{branch} recorded as {}", ended(r.action)),
        ResolveEffect::Decided => format!("decided {} (three-phase, undecided until now)", r.action),
        ResolveEffect::Forgotten => format!("heuristic outcome of {branch} recorded as repaired"),
    };
    if r.releases {
        s.push_str("; no heuristic outcome is left unresolved: the transaction is kept for the retention only");
    }
    s
}

fn ended(action: ResolveAction) -> &'static str {
    match action {
        ResolveAction::Commit => "committed",
        _ => "rolled back",
    }
}

/// Decides what a resolution would do, or why it is refused (the message says what is wrong
/// and what to do instead).
fn plan(txn: &Txn, branch: Option<&BranchKey>, action: ResolveAction) -> Result<Plan, String> {
    let gtid = txn.gtid;
    let state = txn.phase.state();
    let decided_commit = match txn.phase {
        Phase::Committing | Phase::Committed => Some(true),
        Phase::Aborting | Phase::Aborted => Some(false),
        Phase::OnePhaseCommit | Phase::Terminating => None,
        Phase::Active
        | Phase::Preparing
        | Phase::OnePhasePending
        | Phase::PreCommitPending
        | Phase::PreCommitting
        | Phase::CommitPending => {
            return Err(format!(
                "transaction {gtid} is {state} and being decided by the protocol right now; resolve acts on \
                 decided transactions (to stop an active one, abort it)"
            ));
        }
    };
    let what = match branch {
        Some(k) => format!("branch {k} of transaction {gtid}"),
        None => format!("transaction {gtid}"),
    };
    if action == ResolveAction::Forget {
        if !txn.phase.is_finished() {
            let waiting = txn.branches.iter().filter(|b| !b.acked).count();
            return Err(format!(
                "transaction {gtid} is {state}: {waiting} branch(es) have not acknowledged its outcome. Forget is \
                 for finished transactions with a heuristic outcome; resolve it with --commit or --rollback (naming \
                 a branch settles that branch)"
            ));
        }
        let heuristic: Vec<&Branch> = txn
            .branches
            .iter()
            .filter(|b| branch.is_none_or(|k| &b.key == k) && b.outcome.is_some_and(BranchOutcome::is_heuristic))
            .collect();
        if heuristic.is_empty() {
            return Err(format!(
                "{what} has no heuristic outcome to forget; a finished transaction is forgotten on its own after \
                 the retention"
            ));
        }
        if heuristic.iter().all(|b| txn.resolved(&b.key)) {
            return Ok(Plan::Nothing(format!("the heuristic outcome of {what} is resolved already")));
        }
        return Ok(Plan::Apply(ResolveEffect::Forgotten));
    }
    let commit = action == ResolveAction::Commit;
    if let Some(decided) = decided_commit
        && decided != commit
    {
        let (decision, other) = if decided { ("commit", "rollback") } else { ("abort", "commit") };
        return Err(format!(
            "transaction {gtid} is {state}: the decision to {decision} it is durable, and resolving it to {other} \
             would contradict it. A branch repaired by hand to match the decision is resolved with --{}; one \
             repaired otherwise, with --forget once every branch is consistent",
            if decided { "commit" } else { "rollback" }
        ));
    }
    if txn.phase == Phase::Terminating {
        if let Some(k) = branch {
            return Err(format!(
                "transaction {gtid} is undecided (three-phase, its termination protocol is still asking its \
                 branches): decide the whole transaction, without naming branch {k}"
            ));
        }
        let conflict = txn.branches.iter().find_map(|b| {
            let s = b.participant_state?;
            let against = if commit { s == ParticipantState::Aborted } else { s.is_committable() };
            against.then_some((&b.key, s))
        });
        if let Some((key, s)) = conflict {
            return Err(format!(
                "branch {key} of transaction {gtid} answered that it is {s:?}: the transaction can only {}",
                if commit { "abort" } else { "commit (a pre-committed branch commits on its own)" }
            ));
        }
        return Ok(Plan::Apply(ResolveEffect::Decided));
    }
    let Some(key) = branch else {
        if txn.phase.is_finished() {
            return Ok(Plan::Nothing(format!(
                "transaction {gtid} is {state}: every branch acknowledged, nothing to retry (name a branch to \
                 record a repair by hand, or forget its heuristic outcome)"
            )));
        }
        if txn.phase == Phase::OnePhaseCommit && !commit {
            return Err(format!(
                "transaction {gtid} is a one-phase commit in its participant's hands: --commit sends it again now; \
                 to record how its branch ended, name the branch"
            ));
        }
        let waiting = txn.branches.iter().filter(|b| !b.acked).count();
        if !txn.branches.iter().any(|b| !b.acked && !b.in_flight) {
            return Ok(Plan::Nothing(format!(
                "a call to each of the {waiting} unacknowledged branch(es) of transaction {gtid} is on its way already"
            )));
        }
        return Ok(Plan::Apply(ResolveEffect::Retried));
    };
    let b = txn.branches.iter().find(|b| &b.key == key).expect("checked by the caller");
    if txn.resolved(key) {
        return Ok(Plan::Nothing(format!("{what} is resolved already")));
    }
    if !b.acked || b.outcome.is_some_and(BranchOutcome::is_heuristic) {
        return Ok(Plan::Apply(ResolveEffect::BranchSettled));
    }
    Ok(Plan::Nothing(match b.outcome {
        Some(BranchOutcome::Committed) => format!("{what} committed; nothing to resolve"),
        Some(_) => format!("{what} rolled back; nothing to resolve"),
        None => format!("{what} needs no phase 2 (it voted {:?})", b.vote),
    }))
}
