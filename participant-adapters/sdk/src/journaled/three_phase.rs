//! Three-phase commit for every [`Resource`]: CanCommit, PreCommit and QueryState on the
//! journal, and the self-deadlines (see the crate docs for the rules, docs/three-phase.md for
//! the design).
//!
//! A branch's deadline is kept by a task of its own, started when the branch votes yes in a
//! CanCommit (and, at start-up, for every undecided three-phase branch the journal holds). The
//! task sleeps until the deadline, then acts under the branch's slot: [`Resource::finish`]
//! rolls the branch back at its wait deadline, or commits it at its do-commit deadline, and the
//! end is recorded. A PreCommit starts a second task for the do-commit deadline (which may come
//! before the wait deadline); the first wakes at the wait deadline and finds the branch
//! pre-committed (it then keeps the do-commit deadline too) or finished. A Commit or Abort
//! leaves the tasks to find the branch finished. At most two tasks per branch, each ending
//! when the branch is decided. A failure at the
//! resource is retried with capped backoff until it succeeds: a pre-committed branch must
//! commit eventually, and a branch whose wait deadline passed must not stay prepared.
//!
//! Deadlines are wall-clock Unix ms ([`now_ms`]), so a restarted participant keeps them; the
//! task's sleep is on tokio's clock and only wakes it to look again.

use std::sync::{Arc, Weak};
use std::time::Duration;

use pledge_proto::Xid;
use tracing::Instrument;

use super::{Journaled, Resource, Shared};
use crate::journal::{Deadline, End, State, Unrecorded};
use crate::{BranchState, BranchStatus, Error, Outcome, ThreePhase, ThreePhaseError, Vote};

pub(super) use crate::journal::now_ms;

/// First wait after a self-commit or self-abort failed at the resource; it doubles up to
/// [`RETRY_MAX_MS`].
const RETRY_FIRST_MS: u64 = 100;
/// Longest wait between attempts at a self-commit or self-abort.
const RETRY_MAX_MS: u64 = 10_000;
/// A failing self-commit or self-abort is logged at its first failure and every this many after.
const LOG_EVERY_FAILURES: u32 = 30;

/// Why a branch aborted itself.
pub(super) fn no_pre_commit(wait: Deadline, prepared_ms: u64) -> String {
    format!("no PreCommit within {} ms", wait.at_ms.saturating_sub(prepared_ms))
}

/// Starts a task for the deadlines of every undecided three-phase branch in the journal (at
/// start-up): past ones are acted on at once.
pub(super) async fn arm<R: Resource>(shared: Weak<Shared<R>>) {
    let Some(shared) = shared.upgrade() else { return };
    let participant = Journaled { shared };
    let branches = participant.shared.journal.three_phase_branches().await;
    if !branches.is_empty() {
        tracing::info!(branches = branches.len(), "three-phase branches in the journal: their deadlines are armed");
    }
    for xid in branches {
        participant.watch(xid);
    }
}

/// Keeps `xid`'s deadlines until it is decided; holds the participant only while acting.
async fn watch_branch<R: Resource>(shared: Weak<Shared<R>>, xid: Xid) {
    let mut failures = 0u32;
    loop {
        let Some(strong) = shared.upgrade() else { return };
        let due = match strong.journal.state(&xid).await {
            Some(State::Prepared { wait: Some(d), .. } | State::PreCommitted { docommit: d, .. }) => d.at_ms,
            _ => return, // decided (or two-phase): nothing to keep
        };
        let now = now_ms();
        if now < due {
            drop(strong);
            tokio::time::sleep(Duration::from_millis(due - now)).await;
            continue;
        }
        let participant = Journaled { shared: strong };
        let mut slot = participant.shared.slots.lock(&xid).await;
        let settled = participant.settle_locked(&xid).await;
        participant.shared.slots.release(&xid, &mut slot);
        drop(slot);
        match settled {
            Ok(_) => {
                if failures > 0 {
                    tracing::info!(%xid, failures, "the branch's deadline is acted on after failed attempts");
                }
                failures = 0;
            }
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(LOG_EVERY_FAILURES) {
                    tracing::warn!(%xid, failures, error = %e, "cannot act on the branch's deadline at the resource; retrying");
                }
                crate::metrics::self_deadline_failed();
                drop(participant);
                let backoff = RETRY_FIRST_MS.saturating_mul(1 << failures.min(16)).min(RETRY_MAX_MS);
                tokio::time::sleep(Duration::from_millis(backoff)).await;
            }
        }
    }
}

/// What QueryState and PreCommit say of a branch the journal holds as `state`.
fn status_of(state: &State) -> BranchStatus {
    use BranchState as S;
    match state {
        State::Open => BranchStatus::new(S::Active, 0, ""),
        // The participant's own one-phase commit is under way: not decided by a coordinator.
        State::Committing { .. } => BranchStatus::new(S::Active, 0, "committing in one phase"),
        State::Prepared { wait, .. } => BranchStatus::new(S::Prepared, wait.map_or(0, |w| w.at_ms), ""),
        State::PreCommitted { docommit, .. } => BranchStatus::new(S::PreCommitted, docommit.at_ms, ""),
        State::Finished(End::ReadOnly) => BranchStatus::new(S::Committed, 0, "voted read-only: nothing to commit"),
        State::Finished(End::Outcome(outcome)) => match outcome {
            Outcome::Committed => BranchStatus::new(S::Committed, 0, ""),
            Outcome::HeuristicCommit { reason } => BranchStatus::new(S::Committed, 0, reason.clone()),
            Outcome::Aborted { reason } | Outcome::HeuristicRollback { reason } => {
                BranchStatus::new(S::Aborted, 0, reason.clone())
            }
            // Nothing proves either: never reported as one of them.
            Outcome::HeuristicMixed { reason } | Outcome::HeuristicHazard { reason } => {
                BranchStatus::new(S::Unknown, 0, format!("ended with a heuristic outcome: {reason}"))
            }
        },
    }
}

impl<R: Resource> Journaled<R> {
    /// Starts the task that keeps `xid`'s three-phase deadlines.
    pub(super) fn watch(&self, xid: Xid) {
        let span = tracing::info_span!("three_phase_deadline", %xid);
        tokio::spawn(watch_branch(Arc::downgrade(&self.shared), xid).instrument(span));
    }

    /// Acts on `xid`'s three-phase deadline if it has passed (its slot held): rolls the branch
    /// back at its wait deadline, commits it at its do-commit deadline, and records the end.
    /// `Ok(true)` if it acted; an error leaves the branch as it was.
    pub(super) async fn settle_locked(&self, xid: &Xid) -> Result<bool, Error> {
        let s = &self.shared;
        let (commit, coordinator_id, metadata, reason) = match s.journal.state(xid).await {
            Some(State::Prepared { coordinator_id, metadata, prepared_ms, wait: Some(w) }) if now_ms() >= w.at_ms => {
                (false, coordinator_id, metadata, no_pre_commit(w, prepared_ms))
            }
            Some(State::PreCommitted { coordinator_id, metadata, docommit, .. }) if now_ms() >= docommit.at_ms => {
                (true, coordinator_id, metadata, String::new())
            }
            _ => return Ok(false),
        };
        let action = if commit { "self_commit" } else { "self_abort" };
        let span = tracing::info_span!("self_deadline", action);
        let outcome = s.resource.finish(&coordinator_id, xid, &metadata, commit, true).instrument(span.clone()).await?;
        let outcome = match outcome {
            Outcome::Aborted { .. } if !commit => Outcome::Aborted { reason },
            other => other,
        };
        self.record_end(xid, End::Outcome(outcome.clone())).await?;
        let _entered = span.enter();
        match (&outcome, commit) {
            (Outcome::Committed, true) => {
                tracing::info!(%xid, "committed at its do-commit deadline (no DoCommit came)")
            }
            (Outcome::Aborted { reason }, false) => tracing::info!(%xid, reason, "rolled back at its wait deadline"),
            _ => tracing::warn!(%xid, ?outcome, action, "the resource ended the branch otherwise: a heuristic outcome"),
        }
        crate::metrics::self_deadline(commit, &outcome);
        Ok(true)
    }

    /// What the journal holds of `xid` (its slot held), after acting on a three-phase deadline
    /// that has passed: a request never finds a branch in a state its deadline has ended.
    pub(super) async fn settled_state(&self, xid: &Xid) -> Result<Option<State>, Error> {
        let state = self.shared.journal.state(xid).await;
        let now = now_ms();
        match &state {
            Some(State::Prepared { wait: Some(d), .. } | State::PreCommitted { docommit: d, .. }) if now >= d.at_ms => {
                self.settle_locked(xid).await?;
                Ok(self.shared.journal.state(xid).await)
            }
            _ => Ok(state),
        }
    }

    async fn pre_commit_locked(
        &self,
        epoch: u64,
        xid: &Xid,
        docommit_wait_ms: u64,
    ) -> Result<BranchStatus, ThreePhaseError> {
        let s = &self.shared;
        // A deadline that passed decides first: a branch past its wait deadline has aborted.
        let state = match self.settled_state(xid).await? {
            Some(state) => state,
            // Never created by a PreCommit.
            None => return Ok(self.unrecorded(xid).await),
        };
        match &state {
            State::Open | State::Committing { .. } | State::Prepared { wait: None, .. } => {
                Err(ThreePhaseError::NotThreePhase { state: state.name() })
            }
            State::Prepared { wait: Some(d), .. } | State::PreCommitted { docommit: d, .. } if epoch < d.epoch => {
                Err(ThreePhaseError::StaleEpoch { asked: epoch, answered: d.epoch })
            }
            State::Prepared { wait: Some(_), .. } => {
                let docommit = s.journal.pre_committed(xid, epoch, docommit_wait_ms).await?;
                // The task keeping the wait deadline sleeps until then; this one may be sooner.
                self.watch(xid.clone());
                tracing::debug!(%xid, epoch, deadline_unix_ms = docommit.at_ms, "pre-committed");
                Ok(BranchStatus::new(BranchState::PreCommitted, docommit.at_ms, ""))
            }
            // A repeated PreCommit: the same answer, the deadline not extended.
            State::PreCommitted { .. } => {
                s.journal.raise_epoch(xid, epoch).await?;
                Ok(status_of(&state))
            }
            State::Finished(_) => Ok(status_of(&state)),
        }
    }

    async fn unrecorded(&self, xid: &Xid) -> BranchStatus {
        let reason = match self.shared.journal.unrecorded(&xid.gtid).await {
            Unrecorded::Never => "this participant has no record of the branch",
            Unrecorded::MaybeForgotten => {
                "this participant has no record of the branch, which is older than what it remembers (its journal's \
                 retention, or its creation)"
            }
        };
        BranchStatus::new(BranchState::Unknown, 0, reason)
    }
}

#[tonic::async_trait]
impl<R: Resource> ThreePhase for Journaled<R> {
    async fn can_commit(
        &self,
        coordinator_id: &str,
        xid: &Xid,
        may_be_empty: bool,
        precommit_wait_ms: u64,
    ) -> Result<Vote, Error> {
        let s = &self.shared;
        if !s.resource.serves(&xid.resource) {
            return Ok(Vote::Aborted { reason: format!("this participant does not serve resource {}", xid.resource) });
        }
        let mut slot = s.slots.lock(xid).await;
        let vote = self.prepare_locked(coordinator_id, xid, may_be_empty, precommit_wait_ms.max(1), &mut slot).await;
        s.slots.release(xid, &mut slot);
        vote
    }

    async fn pre_commit(
        &self,
        _coordinator_id: &str,
        epoch: u64,
        xid: &Xid,
        _metadata: &[u8],
        docommit_wait_ms: u64,
    ) -> Result<BranchStatus, ThreePhaseError> {
        let s = &self.shared;
        if !s.resource.serves(&xid.resource) {
            return Err(ThreePhaseError::Failed(Error::new(format!(
                "this participant does not serve resource {}",
                xid.resource
            ))));
        }
        let mut slot = s.slots.lock(xid).await;
        let status = self.pre_commit_locked(epoch, xid, docommit_wait_ms).await;
        s.slots.release(xid, &mut slot);
        status
    }

    async fn query_state(&self, _coordinator_id: &str, epoch: u64, xid: &Xid) -> Result<BranchStatus, ThreePhaseError> {
        let s = &self.shared;
        match s.journal.state(xid).await {
            None => return Ok(self.unrecorded(xid).await),
            // Taking work: answered without waiting for the work call that may hold its slot.
            Some(State::Open) => return Ok(status_of(&State::Open)),
            Some(_) => {}
        }
        // Under the slot: ordered with PreCommit, so an epoch raised here fences any PreCommit
        // from a lower one that comes after.
        let mut slot = s.slots.lock(xid).await;
        let status = async {
            let Some(state) = s.journal.state(xid).await else { return Ok(self.unrecorded(xid).await) };
            s.journal.raise_epoch(xid, epoch).await?;
            Ok(status_of(&state))
        }
        .await;
        s.slots.release(xid, &mut slot);
        status
    }
}
