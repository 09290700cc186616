//! The participant contract, kept once for every adapter: [`Journaled`] wraps a
//! [`Resource`] — what an adapter does at its resource — and implements [`Participant`] on top
//! of the [`journal`](crate::journal), so that every answer is durable before it is given, an
//! unknown branch votes no, work lost in a restart is refused, a one-phase commit cut short by a
//! crash is resolved by asking the resource, and an outcome nothing can prove is reported as a
//! heuristic hazard. An adapter written this way cannot get those rules wrong one by one.
//!
//! What happens to a branch, by the journal's state and the request:
//!
//! | journal says | Prepare | Commit (2PC) | Commit (one phase) | Abort |
//! |---|---|---|---|---|
//! | open (this process) | [`Resource::seal`], then [`Resource::prepare`] while the journal writes Prepared | roll back: never prepared | [`Resource::seal`], journal Committing, then [`Resource::commit_one_phase`] | roll back |
//! | prepared | same vote | [`Resource::finish`] | same as 2PC | [`Resource::finish`] |
//! | pre-committed (three-phase) | yes | [`Resource::finish`] (commit) | same as 2PC | [`Resource::finish`] (commit), answered committed |
//! | committing | — (error) | [`Resource::resolve`] | [`Resource::resolve`] | [`Resource::resolve`] |
//! | finished | same answer | same answer | same answer | same answer (and the resource is told to roll back again, harmlessly: a prepare whose vote was lost may have left the branch prepared there) |
//! | nothing, never seen | ABORTED, or READ_ONLY if may be empty | [`Resource::finish`] with the coordinator's metadata | ABORTED, or committed if may be empty | aborted (recorded: a late Prepare is refused) |
//! | nothing, maybe forgotten | ABORTED | [`Resource::finish`] with the coordinator's metadata | heuristic hazard | aborted |
//!
//! Three-phase commit ([`ThreePhase`], in `three_phase.rs`): a CanCommit yes vote records the
//! wait deadline with the Prepared record; PreCommit records the do-commit deadline. A task per
//! undecided three-phase branch (armed at the vote, and for every such branch in the journal
//! when the participant starts) acts on its deadline: [`Resource::finish`] (roll back at the
//! wait deadline, commit at the do-commit deadline), retried with capped backoff until the
//! resource answers, then the end is recorded. Commit, Abort and PreCommit of a branch whose
//! deadline has passed act on the deadline first (the same way), so no answer depends on how
//! late that task runs.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use pledge_proto::{ResourceId, Xid};

use crate::journal::{End, Journal, NotOpened, State, Unrecorded};
use crate::table::{SlotGuard, Slots};
use crate::{
    BranchError, CommitKind, Error, InDoubt, Outcome, Participant, RecoverPage, RecoverQuery, ThreePhase, Vote,
};

mod three_phase;

/// What [`Resource::seal`] found of an open branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sealed {
    /// Ready to be prepared (or committed in one phase); `metadata` identifies its transaction
    /// at the resource (it goes into the journal, and to the coordinator with the vote).
    Ready { metadata: Vec<u8> },
    /// The branch did nothing here: nothing to commit. (It is then rolled back.)
    ReadOnly,
    /// It cannot commit. (It is then rolled back.)
    Refused { reason: String },
}

/// What [`Resource::commit_one_phase`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnePhase {
    Committed,
    /// The resource refused; nothing was committed.
    Aborted {
        reason: String,
    },
    /// The commit was sent but its answer never came: only [`Resource::resolve`] can tell.
    Unknown {
        error: String,
    },
}

/// An adapter's side of a branch, at its resource. See the module documentation for when each
/// method is called; every call for one branch comes one at a time.
#[tonic::async_trait]
pub trait Resource: Send + Sync + 'static {
    /// What an active branch holds at the resource (a connection inside its transaction, a
    /// producer with its transaction open).
    type Open: Send + 'static;

    /// Whether this adapter serves `resource`.
    fn serves(&self, resource: &ResourceId) -> bool;

    /// The resources this adapter serves, sorted.
    fn resources(&self) -> Vec<ResourceId>;

    /// Opens branch `xid` at its resource. Bounded in time and number (refuse with
    /// [`BranchError::Busy`] when full).
    async fn open(&self, xid: &Xid) -> Result<Self::Open, BranchError>;

    /// Before a prepare or a one-phase commit: checks the branch can commit, and says what
    /// identifies its transaction at the resource, so that [`Resource::finish`] and
    /// [`Resource::resolve`] can find out how it ended after a crash.
    async fn seal(&self, coordinator_id: &str, xid: &Xid, open: &mut Self::Open) -> Sealed;

    /// Makes a sealed branch's work durable at the resource. The journal writes the branch's
    /// Prepared record meanwhile, so a crash may leave a record of a branch the resource never
    /// prepared: [`Resource::finish`] then finds it rolled back. `Err`: not prepared (if it
    /// may have been after all, say so in the reason: the abort that follows rolls it back).
    async fn prepare(&self, coordinator_id: &str, xid: &Xid, open: Self::Open, metadata: &[u8]) -> Result<(), String>;

    /// Commits an open branch in one phase.
    async fn commit_one_phase(&self, xid: &Xid, open: Self::Open, metadata: &[u8]) -> OnePhase;

    /// Rolls an open branch back.
    async fn rollback(&self, xid: &Xid, open: Self::Open);

    /// Commits (`commit`) or rolls back a branch prepared at the resource, and says how it
    /// ended — including when the resource no longer holds it (then: what the resource can
    /// prove, or [`Outcome::HeuristicHazard`]). `recorded`: the journal holds the branch as
    /// prepared with this `metadata`; otherwise `metadata` is what the coordinator handed back
    /// (maybe nothing) and the journal has no record, e.g. after a lost data directory. A
    /// rollback may also be asked for a branch that was never prepared: say
    /// [`Outcome::Aborted`].
    async fn finish(
        &self,
        coordinator_id: &str,
        xid: &Xid,
        metadata: &[u8],
        commit: bool,
        recorded: bool,
    ) -> Result<Outcome, Error>;

    /// How the one-phase commit of `xid` (sealed with `metadata`) ended, once the resource can
    /// tell; `None` while it cannot yet.
    async fn resolve(&self, xid: &Xid, metadata: &[u8]) -> Result<Option<Outcome>, Error>;

    /// The journal has durably recorded how `xid` ended: what the resource kept for the branch
    /// until then (a producer, a transactional id no one else may use) can go. Until this is
    /// called, a crash leaves the branch in flight in the journal and the resource is asked
    /// again; so nothing that a repeated [`Resource::finish`] or [`Resource::resolve`] relies
    /// on may be released earlier.
    fn finished(&self, _xid: &Xid) {}

    /// Branches of `coordinator_id` prepared at the resource itself, after `after`, in order, at
    /// most `limit`: for resources that keep prepared transactions on their own (PostgreSQL),
    /// whose list may hold one the journal missed (a crash between the resource's prepare and
    /// the journal's record). The default: none.
    async fn in_doubt(
        &self,
        _coordinator_id: &str,
        _resource: &ResourceId,
        _after: Option<&Xid>,
        _limit: usize,
    ) -> Result<Vec<InDoubt>, Error> {
        Ok(Vec::new())
    }
}

struct Shared<R: Resource> {
    resource: R,
    journal: Journal,
    slots: Slots<R::Open>,
    active_timeout: Duration,
}

/// See the module documentation. Cheap to clone.
pub struct Journaled<R: Resource> {
    shared: Arc<Shared<R>>,
}

impl<R: Resource> Clone for Journaled<R> {
    fn clone(&self) -> Self {
        Journaled { shared: self.shared.clone() }
    }
}

/// Why a branch with no record is refused.
pub const NO_RECORD: &str = "this participant has no record of the branch: it did no work here (a mistyped branch id, or \
                         work sent to another instance?), or its work was lost";

impl<R: Resource> Journaled<R> {
    /// Serves `resource` with `journal`; an active branch not prepared within `active_timeout`
    /// is rolled back. Starts the housekeeping task (timeouts, the journal's retention), which
    /// ends when the last clone is dropped.
    pub fn new(resource: R, journal: Journal, active_timeout: Duration) -> Self {
        let shared = Arc::new(Shared { resource, journal, slots: Slots::default(), active_timeout });
        let weak = Arc::downgrade(&shared);
        tokio::spawn(housekeeping(weak.clone()));
        // The three-phase deadlines the journal holds: past ones acted on at once.
        tokio::spawn(three_phase::arm(weak));
        Journaled { shared }
    }

    pub fn resource(&self) -> &R {
        &self.shared.resource
    }

    pub fn journal(&self) -> &Journal {
        &self.shared.journal
    }

    /// Opens branch `xid` (or resumes it, if open) and returns it locked: concurrent calls for
    /// the same branch wait their turn. Refused when the branch is past taking work (prepared,
    /// finished, or lost in a restart) or older than what this participant remembers.
    pub async fn branch(&self, xid: &Xid) -> Result<Branch<R>, BranchError> {
        let s = &self.shared;
        if !s.resource.serves(&xid.resource) {
            return Err(BranchError::UnknownResource(xid.resource.to_string()));
        }
        let mut slot = s.slots.lock(xid).await;
        if slot.open.is_none()
            && let Err(e) = self.open(xid, &mut slot).await
        {
            s.slots.release(xid, &mut slot);
            return Err(e);
        }
        Ok(Branch { slot, shared: s.clone(), xid: xid.clone() })
    }

    async fn open(&self, xid: &Xid, slot: &mut SlotGuard<R::Open>) -> Result<(), BranchError> {
        let s = &self.shared;
        // The journal's record and the resource's opening overlap; the work is acknowledged
        // only once both are done.
        let durable = s.journal.open_branch(xid).await.map_err(|e| match e {
            NotOpened::Known(state) => {
                let reason = match &state {
                    State::Finished(End::Outcome(Outcome::Aborted { reason })) => reason.clone(),
                    _ => String::new(),
                };
                BranchError::Finished { state: state.name(), reason }
            }
            NotOpened::MaybeForgotten => BranchError::Refused(
                "the transaction is older than what this participant remembers (its journal's retention, or its \
                 creation): it cannot tell whether the branch ended already"
                    .into(),
            ),
            NotOpened::Journal(e) => BranchError::Unavailable(e.0),
        })?;
        let open = match s.resource.open(xid).await {
            Ok(open) => open,
            Err(e) => {
                s.journal.discard_open(xid).await;
                return Err(e);
            }
        };
        if let Err(e) = durable.await {
            s.resource.rollback(xid, open).await;
            s.journal.discard_open(xid).await;
            return Err(BranchError::Unavailable(format!("the branch journal failed: {e}")));
        }
        slot.open = Some(open);
        slot.since = Some(Instant::now());
        Ok(())
    }

    /// Records how `xid` ended (durably), then lets the resource release what it kept for it.
    async fn record_end(&self, xid: &Xid, end: End) -> Result<(), Error> {
        self.shared.journal.finish(xid, end).await?;
        self.shared.resource.finished(xid);
        Ok(())
    }

    /// Ends an open branch as aborted (rolled back at the resource, recorded in the journal).
    async fn roll_back_open(&self, xid: &Xid, open: R::Open, reason: String) -> Result<(), Error> {
        self.shared.resource.rollback(xid, open).await;
        self.record_end(xid, End::Outcome(Outcome::Aborted { reason })).await
    }

    /// Records `outcome` as the branch's end, then gives it.
    async fn answer(&self, xid: &Xid, outcome: Outcome) -> Result<Outcome, Error> {
        self.record_end(xid, End::Outcome(outcome.clone())).await?;
        Ok(outcome)
    }

    /// Prepare (`precommit_wait_ms` 0) or CanCommit of a branch whose slot is held.
    async fn prepare_locked(
        &self,
        coordinator_id: &str,
        xid: &Xid,
        may_be_empty: bool,
        precommit_wait_ms: u64,
        slot: &mut SlotGuard<R::Open>,
    ) -> Result<Vote, Error> {
        let s = &self.shared;
        if let Some(mut open) = slot.open.take() {
            return match s.resource.seal(coordinator_id, xid, &mut open).await {
                Sealed::Ready { metadata } => {
                    // The record and the resource's prepare overlap: the vote waits for both.
                    let record = async {
                        match precommit_wait_ms {
                            0 => s.journal.prepared(xid, coordinator_id, &metadata).await,
                            wait => {
                                let recorded =
                                    s.journal.prepared_three_phase(xid, coordinator_id, &metadata, wait).await;
                                // Recorded with a deadline: someone must keep it.
                                recorded.map(|_| self.watch(xid.clone()))
                            }
                        }
                    };
                    let (recorded, prepared) =
                        futures::join!(record, s.resource.prepare(coordinator_id, xid, open, &metadata));
                    match (recorded, prepared) {
                        (Ok(()), Ok(())) => {
                            // Prepared and recorded; the vote not yet given.
                            fail::fail_point!("journaled::after_prepare");
                            if precommit_wait_ms > 0 && self.settle_locked(xid).await? {
                                // The resource took longer than the wait: rolled back already.
                                let reason =
                                    format!("preparing took longer than precommit_wait_ms ({precommit_wait_ms} ms)");
                                return Ok(Vote::Aborted { reason });
                            }
                            Ok(Vote::Prepared { metadata })
                        }
                        (_, Err(reason)) => {
                            self.record_end(xid, End::Outcome(Outcome::Aborted { reason: reason.clone() })).await?;
                            Ok(Vote::Aborted { reason })
                        }
                        // Prepared at the resource, but not recorded: vote no. The abort that
                        // follows rolls it back (the resource still has it, by its own name).
                        (Err(e), Ok(())) => {
                            Ok(Vote::Aborted { reason: format!("cannot record the prepared branch: {e}") })
                        }
                    }
                }
                Sealed::ReadOnly => {
                    s.resource.rollback(xid, open).await;
                    self.record_end(xid, End::ReadOnly).await?;
                    Ok(Vote::ReadOnly)
                }
                Sealed::Refused { reason } => {
                    self.roll_back_open(xid, open, reason.clone()).await?;
                    Ok(Vote::Aborted { reason })
                }
            };
        }
        Ok(match s.journal.state(xid).await {
            Some(State::Prepared { wait, metadata, prepared_ms, .. }) => match (wait, precommit_wait_ms) {
                (None, 0) => Vote::Prepared { metadata: metadata.to_vec() },
                (Some(w), 1..) if three_phase::now_ms() >= w.at_ms => {
                    Vote::Aborted { reason: three_phase::no_pre_commit(w, prepared_ms) }
                }
                (Some(_), 1..) => Vote::Prepared { metadata: metadata.to_vec() },
                (None, _) | (Some(_), 0) => {
                    return Err(Error::new(format!(
                        "the branch was prepared under {}-phase commit; a {}-phase Prepare of it is a coordinator bug",
                        if wait.is_none() { "two" } else { "three" },
                        if precommit_wait_ms == 0 { "two" } else { "three" },
                    )));
                }
            },
            // Voted yes and pre-committed since.
            Some(State::PreCommitted { metadata, .. }) => Vote::Prepared { metadata: metadata.to_vec() },
            Some(State::Committing { .. }) => {
                return Err(Error::new("prepare of a branch being committed in one phase"));
            }
            Some(State::Finished(End::ReadOnly)) => Vote::ReadOnly,
            // Committed: the coordinator already holds the first vote's metadata.
            Some(State::Finished(end)) if end.committed() => Vote::Prepared { metadata: Vec::new() },
            Some(State::Finished(End::Outcome(o))) => Vote::Aborted { reason: reason_of(&o) },
            Some(State::Open) => Vote::Aborted { reason: "branch is open in no slot (participant bug)".into() },
            None => {
                let never = s.journal.unrecorded(&xid.gtid).await == Unrecorded::Never;
                if may_be_empty && never {
                    self.record_end(xid, End::ReadOnly).await?;
                    Vote::ReadOnly
                } else {
                    // Recorded, so that a late Prepare or more work is refused too.
                    let reason = NO_RECORD.to_string();
                    self.record_end(xid, End::Outcome(Outcome::Aborted { reason: reason.clone() })).await?;
                    Vote::Aborted { reason }
                }
            }
        })
    }

    async fn commit_locked(
        &self,
        coordinator_id: &str,
        xid: &Xid,
        kind: CommitKind,
        metadata: &[u8],
        slot: &mut SlotGuard<R::Open>,
    ) -> Result<Outcome, Error> {
        let s = &self.shared;
        if let Some(mut open) = slot.open.take() {
            if kind == CommitKind::TwoPhase {
                let reason = "commit of a branch that was never prepared".to_string();
                self.roll_back_open(xid, open, reason.clone()).await?;
                return Ok(Outcome::Aborted { reason });
            }
            let sealed = match s.resource.seal(coordinator_id, xid, &mut open).await {
                Sealed::Ready { metadata } => metadata,
                Sealed::ReadOnly => {
                    // Nothing to commit.
                    s.resource.rollback(xid, open).await;
                    self.record_end(xid, End::ReadOnly).await?;
                    return Ok(Outcome::Committed);
                }
                Sealed::Refused { reason } => {
                    self.roll_back_open(xid, open, reason.clone()).await?;
                    return Ok(Outcome::Aborted { reason });
                }
            };
            if let Err(e) = s.journal.committing(xid, coordinator_id, &sealed).await {
                // Not sent: roll back and say why (the coordinator asks again, and hears it).
                self.roll_back_open(xid, open, format!("cannot record the one-phase commit: {e}")).await?;
                return Err(e);
            }
            return match s.resource.commit_one_phase(xid, open, &sealed).await {
                OnePhase::Committed => self.answer(xid, Outcome::Committed).await,
                OnePhase::Aborted { reason } => self.answer(xid, Outcome::Aborted { reason }).await,
                OnePhase::Unknown { error } => match s.resource.resolve(xid, &sealed).await {
                    Ok(Some(outcome)) => self.answer(xid, outcome).await,
                    Ok(None) | Err(_) => Err(Error::new(format!(
                        "the one-phase commit's answer was lost ({error}); its outcome is asked of the resource again"
                    ))),
                },
            };
        }
        match self.settled_state(xid).await? {
            Some(State::Prepared { metadata, .. } | State::PreCommitted { metadata, .. }) => {
                let outcome = s.resource.finish(coordinator_id, xid, &metadata, true, true).await?;
                self.answer(xid, outcome).await
            }
            Some(State::Committing { metadata, .. }) => self.resolved(xid, &metadata).await,
            Some(State::Finished(End::ReadOnly)) => Ok(Outcome::Committed),
            Some(State::Finished(End::Outcome(outcome))) => Ok(outcome),
            Some(State::Open) => Err(Error::new("branch is open in no slot (participant bug)")),
            None => match kind {
                CommitKind::OnePhase { may_be_empty } => {
                    match s.journal.unrecorded(&xid.gtid).await {
                        Unrecorded::Never if may_be_empty => {
                            self.record_end(xid, End::ReadOnly).await?;
                            Ok(Outcome::Committed)
                        }
                        Unrecorded::Never => self.answer(xid, Outcome::Aborted { reason: NO_RECORD.into() }).await,
                        // It may have committed before its answer was forgotten.
                        Unrecorded::MaybeForgotten => Ok(Outcome::HeuristicHazard {
                            reason: "no record of this branch, which is older than what this participant remembers: \
                                     it cannot tell whether its one-phase commit happened"
                                .into(),
                        }),
                    }
                }
                CommitKind::TwoPhase => {
                    let outcome = s.resource.finish(coordinator_id, xid, metadata, true, false).await?;
                    self.answer(xid, outcome).await
                }
            },
        }
    }

    /// The outcome of a one-phase commit cut short, from the resource.
    async fn resolved(&self, xid: &Xid, metadata: &[u8]) -> Result<Outcome, Error> {
        match self.shared.resource.resolve(xid, metadata).await? {
            Some(outcome) => self.answer(xid, outcome).await,
            None => Err(Error::new("the resource cannot tell yet how the one-phase commit ended")),
        }
    }

    async fn abort_locked(
        &self,
        coordinator_id: &str,
        xid: &Xid,
        metadata: &[u8],
        slot: &mut SlotGuard<R::Open>,
    ) -> Result<Outcome, Error> {
        let s = &self.shared;
        if let Some(open) = slot.open.take() {
            self.roll_back_open(xid, open, "aborted by the coordinator".into()).await?;
            return Ok(Outcome::Aborted { reason: String::new() });
        }
        match self.settled_state(xid).await? {
            Some(State::Prepared { metadata, .. }) => {
                let outcome = s.resource.finish(coordinator_id, xid, &metadata, false, true).await?;
                self.answer(xid, outcome).await
            }
            // Pre-committed: its only way forward is commit (every other branch may be
            // committing on its own by now). The coordinator records it as a heuristic commit.
            Some(State::PreCommitted { metadata, .. }) => {
                tracing::warn!(%xid, "abort of a pre-committed branch: committing it, its only way forward");
                let outcome = s.resource.finish(coordinator_id, xid, &metadata, true, true).await?;
                self.answer(xid, outcome).await
            }
            Some(State::Committing { metadata, .. }) => self.resolved(xid, &metadata).await,
            Some(State::Finished(end)) => {
                if !end.committed() {
                    // A prepare whose vote was lost (or not recorded) may have left the branch
                    // prepared at the resource; rolling back again is harmless.
                    s.resource.finish(coordinator_id, xid, metadata, false, false).await?;
                }
                Ok(match end {
                    End::ReadOnly => Outcome::Aborted { reason: String::new() },
                    End::Outcome(outcome) => outcome,
                })
            }
            Some(State::Open) => Err(Error::new("branch is open in no slot (participant bug)")),
            None => {
                let outcome = s.resource.finish(coordinator_id, xid, metadata, false, false).await?;
                self.answer(xid, outcome).await
            }
        }
    }

    /// Rolls back active branches older than the active timeout (their client may be gone).
    async fn expire_active(&self) {
        let s = &self.shared;
        for (xid, slot) in s.slots.all() {
            // A branch in use right now is not idle; look again next time.
            let Ok(mut slot) = slot.try_lock_owned() else { continue };
            if slot.open.is_some() && slot.since.is_some_and(|t| t.elapsed() >= s.active_timeout) {
                tracing::info!(%xid, "rolling back a branch not prepared in time");
                let reason = format!("not prepared within active_timeout ({} ms)", s.active_timeout.as_millis());
                let open = slot.open.take().expect("checked above");
                if let Err(e) = self.roll_back_open(&xid, open, reason).await {
                    tracing::warn!(%xid, error = %e, "cannot record the rollback of a timed-out branch");
                }
                s.slots.release(&xid, &mut slot);
            }
        }
    }
}

fn reason_of(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Committed => String::new(),
        Outcome::Aborted { reason }
        | Outcome::HeuristicCommit { reason }
        | Outcome::HeuristicRollback { reason }
        | Outcome::HeuristicMixed { reason }
        | Outcome::HeuristicHazard { reason } => reason.clone(),
    }
}

async fn housekeeping<R: Resource>(shared: Weak<Shared<R>>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else { return };
        let participant = Journaled { shared };
        participant.expire_active().await;
        participant.shared.journal.expire().await;
    }
}

/// An open branch, locked; see [`Journaled::branch`]. Dropping it lets the next operation on
/// the branch in.
pub struct Branch<R: Resource> {
    slot: SlotGuard<R::Open>,
    shared: Arc<Shared<R>>,
    xid: Xid,
}

impl<R: Resource> Branch<R> {
    pub fn xid(&self) -> &Xid {
        &self.xid
    }

    /// What the branch holds open at its resource.
    pub fn open(&mut self) -> &mut R::Open {
        self.slot.open.as_mut().expect("a branch handed out is open until it fails")
    }

    /// Exactly-once: takes `request_id` for this branch. `Ok(true)`: newly taken; `Ok(false)`:
    /// this branch took it before (a retried request). Refused if a committed branch took it
    /// ([`BranchError::Duplicate`]) or an undecided one holds it ([`BranchError::Unavailable`]).
    pub async fn claim(&mut self, request_id: &str) -> Result<bool, BranchError> {
        use crate::journal::ClaimError;
        self.shared.journal.claim(&self.xid, request_id).await.map_err(|e| match e {
            ClaimError::Committed { .. } => BranchError::Duplicate(e.to_string()),
            ClaimError::Undecided { .. } => BranchError::Unavailable(e.to_string()),
            ClaimError::TooMany { .. } => BranchError::Busy(e.to_string()),
        })
    }

    /// Rolls the branch back after its work failed; it will vote no with `reason`.
    pub async fn fail(mut self, reason: String) {
        if let Some(open) = self.slot.open.take() {
            let participant = Journaled { shared: self.shared.clone() };
            if let Err(e) = participant.roll_back_open(&self.xid, open, reason).await {
                tracing::warn!(xid = %self.xid, error = %e, "cannot record the rollback of a failed branch");
            }
        }
    }
}

impl<R: Resource> Drop for Branch<R> {
    fn drop(&mut self) {
        self.shared.slots.release(&self.xid, &mut self.slot);
    }
}

#[tonic::async_trait]
impl<R: Resource> Participant for Journaled<R> {
    async fn prepare(&self, coordinator_id: &str, xid: &Xid, may_be_empty: bool) -> Result<Vote, Error> {
        let s = &self.shared;
        if !s.resource.serves(&xid.resource) {
            return Ok(Vote::Aborted { reason: format!("this participant does not serve resource {}", xid.resource) });
        }
        let mut slot = s.slots.lock(xid).await;
        let vote = self.prepare_locked(coordinator_id, xid, may_be_empty, 0, &mut slot).await;
        s.slots.release(xid, &mut slot);
        vote
    }

    async fn commit(
        &self,
        coordinator_id: &str,
        xid: &Xid,
        kind: CommitKind,
        metadata: &[u8],
    ) -> Result<Outcome, Error> {
        fail::fail_point!("journaled::before_commit");
        let s = &self.shared;
        if !s.resource.serves(&xid.resource) {
            return Err(Error::new(format!("this participant does not serve resource {}", xid.resource)));
        }
        let mut slot = s.slots.lock(xid).await;
        let outcome = self.commit_locked(coordinator_id, xid, kind, metadata, &mut slot).await;
        s.slots.release(xid, &mut slot);
        outcome
    }

    async fn abort(&self, coordinator_id: &str, xid: &Xid, metadata: &[u8]) -> Result<Outcome, Error> {
        let s = &self.shared;
        if !s.resource.serves(&xid.resource) {
            return Err(Error::new(format!("this participant does not serve resource {}", xid.resource)));
        }
        let mut slot = s.slots.lock(xid).await;
        let outcome = self.abort_locked(coordinator_id, xid, metadata, &mut slot).await;
        s.slots.release(xid, &mut slot);
        outcome
    }

    async fn recover(&self, coordinator_id: &str, query: &RecoverQuery) -> Result<RecoverPage, Error> {
        let s = &self.shared;
        let resources = if query.resources.is_empty() { s.resource.resources() } else { query.resources.clone() };
        let mut page = RecoverPage::default();
        for resource in resources.iter().filter(|r| query.after.as_ref().is_none_or(|a| **r >= a.resource)) {
            if !s.resource.serves(resource) {
                return Err(Error::new(format!("this participant does not serve resource {resource}")));
            }
            // One more than wanted: to know whether the page is truncated.
            let want = query.limit + 1 - page.branches.len();
            let after = query.after.as_ref().filter(|a| a.resource == *resource);
            let mut found = s.journal.in_doubt(coordinator_id, resource, after, want).await;
            let at_resource = s.resource.in_doubt(coordinator_id, resource, after, want).await?;
            found.extend(at_resource);
            found.sort_by(|a, b| a.xid.cmp(&b.xid));
            // The journal's entry (with its metadata) first, then the resource's of the same branch.
            found.dedup_by(|later, earlier| later.xid == earlier.xid);
            found.truncate(want);
            page.branches.extend(found);
            if page.branches.len() > query.limit {
                break;
            }
        }
        page.truncated = page.branches.len() > query.limit;
        page.branches.truncate(query.limit);
        Ok(page)
    }

    fn three_phase(&self) -> Option<&dyn ThreePhase> {
        Some(self)
    }
}

#[cfg(test)]
mod tests;
