//! A transaction's own state: what Get and List show of it, and the records that carry it
//! into the decision log.

use std::sync::Arc;

use bytes::Bytes;
use pledge_proto::BranchKey;

use super::*;

impl Txn {
    pub(super) fn new(gtid: Gtid, created_ms: Millis, deadline_ms: Millis, idempotency_key: Option<String>) -> Self {
        Txn {
            gtid,
            phase: Phase::Active,
            created_ms,
            deadline_ms,
            prepare_deadline_ms: 0,
            decided_ms: 0,
            completed_ms: 0,
            one_phase: false,
            three_phase: None,
            precommit_ack_deadline_ms: 0,
            commit_requested: false,
            idempotency_key,
            abort_reason: None,
            branches: Vec::new(),
            waiters: Vec::new(),
            retry_timer_ms: None,
            end_syncing: false,
            decision_epoch: 0,
            end: None,
            resolutions: Vec::new(),
            end_sync: false,
            owner: None,
        }
    }

    /// Its idempotency key in its owner's namespace: two applications using the same key
    /// begin two transactions, and neither learns of the other's.
    pub(super) fn idempotency_slot(&self) -> Option<super::IdempotencySlot> {
        self.idempotency_key.as_ref().map(|k| (self.owner.clone(), k.clone()))
    }

    pub(super) fn branch_mut(&mut self, key: &BranchKey) -> Option<&mut Branch> {
        self.branches.iter_mut().find(|b| &b.key == key)
    }

    pub(super) fn all_acked(&self) -> bool {
        self.branches.iter().all(|b| b.acked)
    }

    pub(super) fn commit_outcome(&self) -> CommitOutcome {
        CommitOutcome {
            committed: matches!(self.phase, Phase::Committing | Phase::Committed),
            reason: self.abort_reason.clone(),
            completed: self.phase.is_finished(),
            heuristic: self.heuristic(),
        }
    }

    /// A participant reported a heuristic outcome for some branch.
    pub(super) fn heuristic(&self) -> bool {
        self.branches.iter().any(|b| b.outcome.is_some_and(BranchOutcome::is_heuristic))
    }

    /// Adds a resolution, keeping only the latest retry (retries change nothing a replay
    /// rebuilds, and an operator may retry as often as a participant stays away).
    pub(super) fn push_resolution(&mut self, r: Arc<ResolveRecord>) {
        if r.effect == ResolveEffect::Retried {
            self.resolutions.retain(|x| x.effect != ResolveEffect::Retried);
        }
        self.resolutions.push(r);
    }

    /// Since when a finished transaction is retained: its completion, or the resolution that
    /// repaired its last heuristic outcome.
    pub(super) fn retained_since(&self) -> Millis {
        self.resolutions.iter().filter(|r| r.releases).map(|r| r.at_ms).fold(self.completed_ms, Millis::max)
    }

    /// An operator settled this branch, or forgot its heuristic outcome.
    pub(super) fn resolved(&self, key: &BranchKey) -> bool {
        self.resolutions.iter().any(|r| match r.effect {
            ResolveEffect::BranchSettled => r.branch.as_ref() == Some(key),
            ResolveEffect::Forgotten => r.branch.as_ref().is_none_or(|b| b == key),
            ResolveEffect::Retried | ResolveEffect::Decided => false,
        })
    }

    /// Some branch has a heuristic outcome that no operator has resolved: the transaction is
    /// kept, and listed by `List --heuristic`, until one does.
    pub(super) fn needs_operator(&self) -> bool {
        self.branches.iter().any(|b| b.outcome.is_some_and(BranchOutcome::is_heuristic) && !self.resolved(&b.key))
    }

    /// Branches ended differently: some committed, some rolled back.
    pub(super) fn heuristic_mixed(&self) -> bool {
        heuristic_mixed(self.branches.iter().filter_map(|b| b.outcome))
    }

    pub(super) fn protocol(&self) -> Protocol {
        if self.three_phase.is_some() { Protocol::ThreePhase } else { Protocol::TwoPhase }
    }

    /// What Get (`with_metadata`) and List show.
    pub(super) fn view(&self, with_metadata: bool) -> TxnView {
        TxnView {
            gtid: self.gtid,
            state: self.phase.state(),
            abort_reason: self.abort_reason.clone(),
            created_ms: self.created_ms,
            deadline_ms: self.deadline_ms,
            decided_ms: self.decided_ms,
            completed_ms: self.completed_ms,
            one_phase: self.one_phase,
            protocol: self.protocol(),
            heuristic: self.heuristic(),
            heuristic_mixed: self.heuristic_mixed(),
            idempotency_key: self.idempotency_key.clone(),
            resolutions: self.resolutions.clone(),
            owner: self.owner.clone(),
            heuristic_resolved: self.heuristic() && !self.needs_operator(),
            branches: self
                .branches
                .iter()
                .map(|b| BranchView {
                    key: b.key.clone(),
                    may_be_empty: b.may_be_empty,
                    vote: b.vote,
                    metadata: if with_metadata { b.metadata.clone() } else { Bytes::new() },
                    acknowledged: b.acked,
                    outcome: b.outcome,
                    attempts: b.attempts,
                    last_error: b.last_error.clone(),
                    next_retry_ms: b.next_retry_ms,
                    prepared_ms: b.prepared_ms,
                    participant_state: b.participant_state,
                    resolved: self.resolved(&b.key),
                })
                .collect(),
        }
    }

    pub(super) fn commit_record(&self) -> CommitRecord {
        CommitRecord {
            gtid: self.gtid,
            epoch: self.decision_epoch,
            created_ms: self.created_ms,
            decided_ms: self.decided_ms,
            idempotency_key: self.idempotency_key.clone(),
            branches: self
                .branches
                .iter()
                .filter_map(|b| {
                    b.vote.map(|vote| LoggedBranch {
                        key: b.key.clone(),
                        vote,
                        metadata: b.metadata.clone(),
                        prepared_ms: b.prepared_ms,
                    })
                })
                .collect(),
            three_phase: self.three_phase,
            owner: self.owner.clone(),
        }
    }

    pub(super) fn end_record(&self) -> EndRecord {
        EndRecord {
            gtid: self.gtid,
            committed: self.phase == Phase::Committed,
            reason: self.abort_reason.clone(),
            created_ms: self.created_ms,
            decided_ms: self.decided_ms,
            completed_ms: self.completed_ms,
            one_phase: self.one_phase,
            three_phase: self.three_phase,
            idempotency_key: self.idempotency_key.clone(),
            branches: self
                .branches
                .iter()
                .map(|b| EndBranch { key: b.key.clone(), vote: b.vote, outcome: b.outcome })
                .collect(),
            kept_for_operator: self.needs_operator(),
            encoded: EncodedOnce::default(),
            owner: self.owner.clone(),
        }
    }

    pub(super) fn one_phase_record(&self) -> OnePhaseRecord {
        let branch = &self.branches[0];
        OnePhaseRecord {
            gtid: self.gtid,
            epoch: self.decision_epoch,
            created_ms: self.created_ms,
            decided_ms: self.decided_ms,
            idempotency_key: self.idempotency_key.clone(),
            branch: branch.key.clone(),
            may_be_empty: branch.may_be_empty,
            owner: self.owner.clone(),
        }
    }

    /// A Commit or OnePhase record holds the decision (so the End record may be lazy): a
    /// commit record is forced exactly when some branch voted PREPARED.
    pub(super) fn decision_logged(&self) -> bool {
        self.one_phase || self.branches.iter().any(|b| b.vote == Some(Vote::Prepared))
    }

    /// An upper bound of the commit record's size with a vote of `extra_metadata_bytes` more.
    pub(super) fn commit_record_bytes(&self, extra_metadata_bytes: usize) -> usize {
        let branches = self.branches.iter().map(|b| crate::records::branch_bytes_bound(&b.key, b.metadata.len()));
        crate::records::commit_bytes_bound(self.idempotency_key.as_deref(), self.owner.as_deref())
            + branches.sum::<usize>()
            + extra_metadata_bytes
    }

    /// The End record of a finished transaction: made once when it finishes (or replayed),
    /// then shared by the log append and every checkpoint that retains it.
    pub(super) fn end(&self) -> Arc<EndRecord> {
        self.end.clone().unwrap_or_else(|| Arc::new(self.end_record()))
    }
}
