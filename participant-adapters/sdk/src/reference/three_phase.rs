//! The reference participant's three-phase commit (the rules are in the crate docs): CanCommit
//! is its Prepare with a wait deadline in the Prepared record; PreCommit, QueryState and the
//! self-deadlines are here.
//!
//! Every deadline of an undecided branch is in `Actor::deadlines`. The actor fires those that
//! are due before it handles any operation (so no answer depends on how late the timer ran)
//! and when its timer, set to the soonest one, wakes it. Firing is an in-memory change and a
//! log record, like any other end of a branch: a wait deadline aborts the branch, a do-commit
//! deadline applies its writes. At start-up the index is rebuilt from the replayed state, so
//! deadlines passed while the participant was down fire at once.

use super::*;

impl Actor {
    /// After replay: indexes the deadlines of the undecided three-phase branches.
    pub(super) fn index_deadlines(&mut self) {
        for ((gtid, branch), entry) in &self.branches {
            if let Entry::Prepared { wait: Some(d), .. } | Entry::PreCommitted { docommit: d, .. } = entry {
                self.deadlines.insert((d.at_ms, *gtid, branch.clone()));
            }
        }
        if !self.deadlines.is_empty() {
            tracing::info!(branches = self.deadlines.len(), "three-phase branches replayed: their deadlines are armed");
        }
    }

    /// Replays a PreCommitted record: the branch's Prepared record came before it.
    pub(super) fn replay_pre_committed(
        &mut self,
        key: (Gtid, BranchId),
        deadline_ms: u64,
        epoch: u64,
    ) -> Result<(), String> {
        let Some(Entry::Prepared { writes, coordinator_id, prepared_ms, wait, .. }) = self.branches.remove(&key) else {
            return Err(format!("a PreCommitted record of branch {}/{}, which is not prepared", key.0, key.1));
        };
        let docommit = Deadline { at_ms: deadline_ms, epoch: epoch.max(wait.map_or(0, |w| w.epoch)) };
        self.branches.insert(key, Entry::PreCommitted { writes, coordinator_id, prepared_ms, seq: 0, docommit });
        Ok(())
    }

    /// Marks a branch aborted for `reason` (`seq`: of the record that says so, 0 for none),
    /// with a tombstone that keeps the reason.
    pub(super) fn remember_aborted(&mut self, key: (Gtid, BranchId), reason: String, seq: u64, at_ms: u64) {
        let pb = AbortedPb { gtid: key.0.as_bytes().to_vec(), branch_id: key.1.to_string(), at_ms, reason };
        let tombstone = (TYPE_ABORTED, Bytes::from(pb.encode_to_vec()));
        self.remember(key.clone(), Ended::Aborted, seq, at_ms, tombstone);
        if let Some(Entry::Aborted { reason, .. }) = self.branches.get_mut(&key) {
            *reason = pb.reason;
        }
    }

    /// Acts on every deadline due by `now`: a wait deadline aborts its branch, a do-commit
    /// deadline commits it.
    pub(super) fn fire_due(&mut self, now: u64, out: &mut Vec<(u64, Submission)>) {
        while let Some((at, gtid, branch)) = self.deadlines.first().cloned() {
            if at > now {
                return;
            }
            self.deadlines.pop_first();
            let key = (gtid, branch);
            match self.branches.get_mut(&key) {
                Some(Entry::Prepared { wait: Some(w), prepared_ms, .. }) if w.at_ms == at => {
                    let reason = format!("no PreCommit within {} ms", at.saturating_sub(*prepared_ms));
                    tracing::info!(gtid = %key.0, branch = %key.1, reason, "rolled back at its wait deadline");
                    let pb = AbortedPb {
                        gtid: key.0.as_bytes().to_vec(),
                        branch_id: key.1.to_string(),
                        at_ms: now,
                        reason: reason.clone(),
                    };
                    let seq = self.record(out, TYPE_ABORTED, pb.encode_to_vec().into());
                    self.remember_aborted(key, reason.clone(), seq, now);
                    crate::metrics::self_deadline(false, &Outcome::Aborted { reason });
                }
                Some(Entry::PreCommitted { docommit, writes, .. }) if docommit.at_ms == at => {
                    tracing::info!(gtid = %key.0, branch = %key.1, "committed at its do-commit deadline (no DoCommit came)");
                    let writes = std::mem::take(writes);
                    self.finish_logged(out, key, Ended::Committed, now);
                    self.data.extend(writes);
                    crate::metrics::self_deadline(true, &Outcome::Committed);
                }
                // Decided meanwhile, or pre-committed to a later deadline (indexed too).
                _ => {}
            }
        }
    }

    /// The state of branch `key` and the record its answer waits for (0: none).
    fn status(&self, key: &(Gtid, BranchId)) -> (BranchStatus, u64) {
        use BranchState as S;
        match self.branches.get(key) {
            None => {
                let reason = match self.maybe_forgotten(&key.0) {
                    false => "this participant has no record of the branch",
                    true => {
                        "this participant has no record of the branch, which is older than what it remembers (its \
                         retention)"
                    }
                };
                (BranchStatus::new(S::Unknown, 0, reason), 0)
            }
            Some(Entry::Active { .. }) => (BranchStatus::new(S::Active, 0, ""), 0),
            Some(Entry::Prepared { wait, seq, .. }) => {
                (BranchStatus::new(S::Prepared, wait.map_or(0, |w| w.at_ms), ""), *seq)
            }
            Some(Entry::PreCommitted { docommit, seq, .. }) => {
                (BranchStatus::new(S::PreCommitted, docommit.at_ms, ""), *seq)
            }
            Some(Entry::Committed { seq }) => (BranchStatus::new(S::Committed, 0, ""), *seq),
            Some(Entry::ReadOnly { seq }) => {
                (BranchStatus::new(S::Committed, 0, "voted read-only: nothing to commit"), *seq)
            }
            Some(Entry::Aborted { seq, reason }) => (BranchStatus::new(S::Aborted, 0, reason.clone()), *seq),
        }
    }

    /// Records that a coordinator at `epoch` is answered about `key`, if it is an undecided
    /// three-phase branch and `epoch` is higher than the one recorded.
    fn raise_epoch(&mut self, out: &mut Vec<(u64, Submission)>, key: &(Gtid, BranchId), epoch: u64) {
        let Some(Entry::Prepared { wait: Some(d), .. } | Entry::PreCommitted { docommit: d, .. }) =
            self.branches.get_mut(key)
        else {
            return;
        };
        if d.epoch >= epoch {
            return;
        }
        d.epoch = epoch;
        let pb = EpochPb { gtid: key.0.as_bytes().to_vec(), branch_id: key.1.to_string(), epoch };
        let seq = self.record(out, TYPE_EPOCH, pb.encode_to_vec().into());
        if let Some(Entry::Prepared { seq: s, .. } | Entry::PreCommitted { seq: s, .. }) = self.branches.get_mut(key) {
            // Answers about the branch wait for this record from now on.
            *s = seq;
        }
    }

    /// Answers `reply` with the state of `key` once what it says is durable.
    fn answer(&mut self, key: &(Gtid, BranchId), reply: oneshot::Sender<Result<BranchStatus, ThreePhaseError>>) {
        let (status, seq) = self.status(key);
        self.when_synced(seq, Box::new(move || drop(reply.send(Ok(status)))));
    }

    pub(super) fn pre_commit(
        &mut self,
        out: &mut Vec<(u64, Submission)>,
        epoch: u64,
        xid: &Xid,
        docommit_wait_ms: u64,
        now: u64,
        reply: oneshot::Sender<Result<BranchStatus, ThreePhaseError>>,
    ) {
        if xid.resource != self.config.resource {
            let reason = format!("this participant serves resource {:?}", self.config.resource.as_str());
            let _ = reply.send(Ok(BranchStatus::new(BranchState::Unknown, 0, reason)));
            return;
        }
        let key = (xid.gtid, xid.branch.clone());
        let refusal = match self.branches.get(&key) {
            Some(Entry::Active { .. }) => Some(ThreePhaseError::NotThreePhase { state: "active" }),
            Some(Entry::Prepared { wait: None, .. }) => {
                Some(ThreePhaseError::NotThreePhase { state: "prepared (two-phase)" })
            }
            Some(Entry::Prepared { wait: Some(d), .. } | Entry::PreCommitted { docommit: d, .. })
                if epoch < d.epoch =>
            {
                Some(ThreePhaseError::StaleEpoch { asked: epoch, answered: d.epoch })
            }
            _ => None,
        };
        if let Some(e) = refusal {
            let _ = reply.send(Err(e));
            return;
        }
        match self.branches.get(&key) {
            Some(Entry::Prepared { wait: Some(_), .. }) => {
                // Before its wait deadline (a passed one fired before this operation).
                let Some(Entry::Prepared { writes, coordinator_id, prepared_ms, wait: Some(w), .. }) =
                    self.branches.remove(&key)
                else {
                    unreachable!("matched above")
                };
                let docommit = Deadline { at_ms: now + docommit_wait_ms, epoch: epoch.max(w.epoch) };
                let pb = PreCommittedPb {
                    gtid: key.0.as_bytes().to_vec(),
                    branch_id: key.1.to_string(),
                    deadline_ms: docommit.at_ms,
                    epoch: docommit.epoch,
                    at_ms: now,
                };
                let seq = self.record(out, TYPE_PRECOMMITTED, pb.encode_to_vec().into());
                self.deadlines.insert((docommit.at_ms, key.0, key.1.clone()));
                let entry = Entry::PreCommitted { writes, coordinator_id, prepared_ms, seq, docommit };
                self.branches.insert(key.clone(), entry);
            }
            // A repeated PreCommit: the same answer, the deadline not extended.
            Some(Entry::PreCommitted { .. }) => self.raise_epoch(out, &key, epoch),
            // Decided, or never seen (a PreCommit creates nothing); refused above.
            Some(
                Entry::Committed { .. }
                | Entry::ReadOnly { .. }
                | Entry::Aborted { .. }
                | Entry::Active { .. }
                | Entry::Prepared { wait: None, .. },
            )
            | None => {}
        }
        self.answer(&key, reply);
    }

    pub(super) fn query_state(
        &mut self,
        out: &mut Vec<(u64, Submission)>,
        epoch: u64,
        xid: &Xid,
        reply: oneshot::Sender<Result<BranchStatus, ThreePhaseError>>,
    ) {
        if xid.resource != self.config.resource {
            let reason = format!("this participant serves resource {:?}", self.config.resource.as_str());
            let _ = reply.send(Ok(BranchStatus::new(BranchState::Unknown, 0, reason)));
            return;
        }
        let key = (xid.gtid, xid.branch.clone());
        self.raise_epoch(out, &key, epoch);
        self.answer(&key, reply);
    }
}

#[tonic::async_trait]
impl ThreePhase for ReferenceParticipant {
    async fn can_commit(
        &self,
        coordinator_id: &str,
        xid: &Xid,
        may_be_empty: bool,
        precommit_wait_ms: u64,
    ) -> Result<Vote, Error> {
        if !self.config.stall_prepare.is_zero() {
            tokio::time::sleep(self.config.stall_prepare).await;
        }
        let (coordinator_id, xid, precommit_wait_ms) =
            (coordinator_id.to_string(), xid.clone(), precommit_wait_ms.max(1));
        self.ask(|reply| Op::Prepare { coordinator_id, xid, may_be_empty, precommit_wait_ms, reply }).await?
    }

    async fn pre_commit(
        &self,
        _coordinator_id: &str,
        epoch: u64,
        xid: &Xid,
        _metadata: &[u8],
        docommit_wait_ms: u64,
    ) -> Result<BranchStatus, ThreePhaseError> {
        let xid = xid.clone();
        self.ask(|reply| Op::PreCommit { epoch, xid, docommit_wait_ms, reply }).await?
    }

    async fn query_state(&self, _coordinator_id: &str, epoch: u64, xid: &Xid) -> Result<BranchStatus, ThreePhaseError> {
        let xid = xid.clone();
        self.ask(|reply| Op::QueryState { epoch, xid, reply }).await?
    }
}

#[cfg(test)]
mod tests;
