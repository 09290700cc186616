//! A simulated participant that keeps the participant contract the way the SDK's `Journaled`
//! does: every answer it gives about a prepared or finished branch is durable (it survives the
//! participant's crash); work not yet prepared is lost in a crash; a branch it has no record of
//! votes no and is recorded aborted when told to abort (the dangling-prepare fence).
//!
//! Three-phase commit as the SDK keeps it: a yes vote with a wait deadline aborts itself when
//! no PreCommit comes by then; a pre-committed branch commits itself at its do-commit deadline;
//! deadlines and the highest epoch answered per branch are durable; a PreCommit from a lower
//! epoch is refused.

use std::collections::BTreeMap;

use bytes::Bytes;
use pledge_coordinator::engine::{BranchOutcome, InDoubtBranch, ParticipantState, StateResult, VoteResult};
use pledge_proto::{BranchKey, Gtid};

/// A branch's state at the participant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Work done, not prepared: lost in a crash.
    Active,
    /// Prepared; three-phase: aborts itself at `wait_deadline` unless pre-committed before.
    Prepared {
        wait_deadline: Option<u64>,
    },
    /// Three-phase: commits itself at `deadline` unless told to commit before.
    PreCommitted {
        deadline: u64,
    },
    Committed,
    Aborted,
}

type Slot = (Gtid, BranchKey);

pub struct Participant {
    pub up: bool,
    pub branches: BTreeMap<Slot, State>,
    /// Three-phase: the highest epoch answered per branch (durable).
    epochs: BTreeMap<Slot, u64>,
    /// Operations that contradicted a decision (a commit of a branch never prepared, an abort
    /// of a committed one): the oracle reports them.
    pub contradictions: Vec<String>,
}

impl Participant {
    pub fn new() -> Self {
        Participant { up: true, branches: BTreeMap::new(), epochs: BTreeMap::new(), contradictions: Vec::new() }
    }

    pub fn crash(&mut self) {
        self.up = false;
        self.branches.retain(|_, s| *s != State::Active);
    }

    /// Back up: deadlines that passed while it was down are acted on at once.
    pub fn restart(&mut self, now: u64) {
        self.up = true;
        let slots: Vec<Slot> = self.branches.keys().cloned().collect();
        for (gtid, key) in slots {
            self.deadline(gtid, &key, now);
        }
    }

    /// The client's work on a branch.
    pub fn work(&mut self, gtid: Gtid, key: BranchKey) {
        self.branches.entry((gtid, key)).or_insert(State::Active);
    }

    /// `refuse`: the resource refuses to prepare (a constraint failed). Three-phase
    /// (`precommit_wait_ms` > 0): a yes vote aborts itself if no PreCommit comes within it.
    pub fn prepare(
        &mut self,
        gtid: Gtid,
        key: &BranchKey,
        refuse: bool,
        precommit_wait_ms: u64,
        now: u64,
    ) -> VoteResult {
        let slot = (gtid, key.clone());
        let wait_deadline = (precommit_wait_ms > 0).then_some(now + precommit_wait_ms);
        match self.branches.get(&slot).copied() {
            Some(State::Active) if refuse => {
                self.branches.insert(slot, State::Aborted);
                VoteResult::Aborted { reason: "constraint failed".into() }
            }
            Some(State::Active) => {
                self.branches.insert(slot, State::Prepared { wait_deadline });
                VoteResult::Prepared { metadata: Bytes::from(format!("{gtid}/{key}")) }
            }
            // A duplicate Prepare arriving late (the network repeats messages): the vote stands.
            Some(State::Prepared { .. } | State::PreCommitted { .. }) => {
                VoteResult::Prepared { metadata: Bytes::from(format!("{gtid}/{key}")) }
            }
            Some(State::Committed) => VoteResult::Prepared { metadata: Bytes::new() },
            Some(State::Aborted) => VoteResult::Aborted { reason: "rolled back".into() },
            // No record: the work was lost (or never done). Silence is not consent.
            None => VoteResult::Aborted { reason: "unknown branch".into() },
        }
    }

    pub fn commit(&mut self, gtid: Gtid, key: &BranchKey, one_phase: bool, refuse: bool) -> BranchOutcome {
        let slot = (gtid, key.clone());
        match (self.branches.get(&slot).copied(), one_phase) {
            (Some(State::Active), true) if refuse => {
                self.branches.insert(slot, State::Aborted);
                BranchOutcome::Aborted
            }
            (Some(State::Active), true) | (Some(State::Prepared { .. } | State::PreCommitted { .. }), _) => {
                self.branches.insert(slot, State::Committed);
                BranchOutcome::Committed
            }
            (Some(State::Committed), _) => BranchOutcome::Committed,
            (Some(State::Aborted), _) => BranchOutcome::Aborted,
            (None, true) => {
                self.branches.insert(slot, State::Aborted);
                BranchOutcome::Aborted
            }
            (Some(State::Active), false) | (None, false) => {
                self.contradictions.push(format!("two-phase commit of unprepared branch {gtid} {key}"));
                BranchOutcome::HeuristicHazard
            }
        }
    }

    pub fn abort(&mut self, gtid: Gtid, key: &BranchKey) -> BranchOutcome {
        let slot = (gtid, key.clone());
        match self.branches.get(&slot).copied() {
            Some(State::Committed) => {
                self.contradictions.push(format!("abort of committed branch {gtid} {key}"));
                BranchOutcome::Committed
            }
            Some(State::PreCommitted { .. }) => {
                // Its only way forward is commit (the SDK's rule); the coordinator never asks
                // this of a pre-committed branch, so it is reported all the same.
                self.contradictions.push(format!("abort of pre-committed branch {gtid} {key}"));
                self.branches.insert(slot, State::Committed);
                BranchOutcome::Committed
            }
            _ => {
                self.branches.insert(slot, State::Aborted);
                BranchOutcome::Aborted
            }
        }
    }

    /// Three-phase PreCommit: `None` when refused (a lower epoch than one answered, or a
    /// two-phase branch), which the coordinator sees as a failed call.
    pub fn pre_commit(
        &mut self,
        gtid: Gtid,
        key: &BranchKey,
        epoch: u64,
        docommit_wait_ms: u64,
        now: u64,
    ) -> Option<ParticipantState> {
        // A deadline that passed decides first, as in the SDK.
        self.deadline(gtid, key, now);
        let slot = (gtid, key.clone());
        if self.epochs.get(&slot).is_some_and(|e| *e > epoch) {
            return None;
        }
        match self.branches.get(&slot).copied() {
            Some(State::Prepared { wait_deadline: Some(_) }) => {
                self.epochs.insert(slot.clone(), epoch);
                self.branches.insert(slot, State::PreCommitted { deadline: now + docommit_wait_ms });
                Some(ParticipantState::PreCommitted)
            }
            Some(State::Prepared { wait_deadline: None }) => None,
            Some(State::PreCommitted { .. }) => {
                self.epochs.insert(slot, epoch);
                Some(ParticipantState::PreCommitted)
            }
            other => Some(public(other)),
        }
    }

    /// The termination protocol's query: raises the branch's epoch, so an older coordinator's
    /// PreCommit is refused from now on.
    pub fn query_state(&mut self, gtid: Gtid, key: &BranchKey, epoch: u64) -> ParticipantState {
        let slot = (gtid, key.clone());
        let state = self.branches.get(&slot).copied();
        if matches!(state, Some(State::Prepared { .. } | State::PreCommitted { .. })) {
            let e = self.epochs.entry(slot).or_insert(0);
            *e = (*e).max(epoch);
        }
        public(state)
    }

    /// A deadline of the branch may have passed: act on it.
    pub fn deadline(&mut self, gtid: Gtid, key: &BranchKey, now: u64) {
        let slot = (gtid, key.clone());
        match self.branches.get(&slot).copied() {
            Some(State::Prepared { wait_deadline: Some(at) }) if at <= now => {
                self.branches.insert(slot, State::Aborted);
            }
            Some(State::PreCommitted { deadline }) if deadline <= now => {
                self.branches.insert(slot, State::Committed);
            }
            _ => {}
        }
    }

    pub fn in_doubt(&self) -> Vec<InDoubtBranch> {
        self.branches
            .iter()
            .filter(|(_, s)| matches!(s, State::Prepared { .. } | State::PreCommitted { .. }))
            .map(|((gtid, branch), _)| InDoubtBranch {
                gtid: *gtid,
                branch: branch.clone(),
                metadata: Bytes::from(format!("{gtid}/{branch}")),
            })
            .collect()
    }
}

fn public(state: Option<State>) -> ParticipantState {
    match state {
        None => ParticipantState::Unknown,
        Some(State::Active) => ParticipantState::Active,
        Some(State::Prepared { .. }) => ParticipantState::Prepared,
        Some(State::PreCommitted { .. }) => ParticipantState::PreCommitted,
        Some(State::Committed) => ParticipantState::Committed,
        Some(State::Aborted) => ParticipantState::Aborted,
    }
}

/// A PreCommit or QueryState answer as the coordinator receives it.
pub fn state_result(state: Option<ParticipantState>) -> StateResult {
    match state {
        Some(state) => StateResult::State { state, reason: None },
        None => StateResult::Failed { error: "FailedPrecondition: refused".into() },
    }
}
