//! A simulated participant that keeps the participant contract the way the SDK's `Journaled`
//! does: every answer it gives about a prepared or finished branch is durable (it survives the
//! participant's crash); work not yet prepared is lost in a crash; a branch it has no record of
//! votes no and is recorded aborted when told to abort (the dangling-prepare fence).

use std::collections::BTreeMap;

use bytes::Bytes;
use pledge_coordinator::engine::{BranchOutcome, InDoubtBranch, VoteResult};
use pledge_proto::{BranchKey, Gtid};

/// A branch's state at the participant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Work done, not prepared: lost in a crash.
    Active,
    Prepared,
    Committed,
    Aborted,
}

pub struct Participant {
    pub up: bool,
    pub branches: BTreeMap<(Gtid, BranchKey), State>,
    /// Operations that contradicted a decision (a commit of a branch never prepared, an abort
    /// of a committed one): the oracle reports them.
    pub contradictions: Vec<String>,
}

impl Participant {
    pub fn new() -> Self {
        Participant { up: true, branches: BTreeMap::new(), contradictions: Vec::new() }
    }

    pub fn crash(&mut self) {
        self.up = false;
        self.branches.retain(|_, s| *s != State::Active);
    }

    /// The client's work on a branch.
    pub fn work(&mut self, gtid: Gtid, key: BranchKey) {
        self.branches.entry((gtid, key)).or_insert(State::Active);
    }

    /// `refuse`: the resource refuses to prepare (a constraint failed).
    pub fn prepare(&mut self, gtid: Gtid, key: &BranchKey, refuse: bool) -> VoteResult {
        let slot = (gtid, key.clone());
        match self.branches.get(&slot).copied() {
            Some(State::Active) if refuse => {
                self.branches.insert(slot, State::Aborted);
                VoteResult::Aborted { reason: "constraint failed".into() }
            }
            Some(State::Active) | Some(State::Prepared) => {
                self.branches.insert(slot, State::Prepared);
                VoteResult::Prepared { metadata: Bytes::from(format!("{gtid}/{key}")) }
            }
            // A duplicate Prepare arriving late (the network repeats messages): the vote stands.
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
            (Some(State::Active), true) | (Some(State::Prepared), _) => {
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
            _ => {
                self.branches.insert(slot, State::Aborted);
                BranchOutcome::Aborted
            }
        }
    }

    pub fn in_doubt(&self) -> Vec<InDoubtBranch> {
        self.branches
            .iter()
            .filter(|(_, s)| **s == State::Prepared)
            .map(|((gtid, branch), _)| InDoubtBranch {
                gtid: *gtid,
                branch: branch.clone(),
                metadata: Bytes::from(format!("{gtid}/{branch}")),
            })
            .collect()
    }
}
