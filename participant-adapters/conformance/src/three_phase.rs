//! The three-phase commit checks (docs/three-phase.md; the rules are `pledge_sdk`'s crate
//! docs): PreCommit, QueryState, the wait-deadline self-abort, the do-commit-deadline
//! self-commit, and that deadlines and epochs survive a kill -9. PreCommit and QueryState
//! alternate between unary calls and the pipeline stream like the other calls.
//!
//! A check holds at most four branches undecided at once (a participant may hold a connection
//! or a producer for each), and leaves none behind. Waiting on a deadline polls QueryState,
//! bounded by the deadline plus the suite's visibility timeout, never a fixed sleep.

use std::time::Duration;

use pledge_proto::v1::{self, BranchOutcome, BranchState, Vote};
use tonic::Status;

use crate::{Branch, Check, Suite, Target, status};

/// The epoch the suite presents, unless a check is about epochs.
const EPOCH: u64 = 1;
/// A wait or do-commit timeout no check waits for (it outlives every check).
const LONG_MS: u64 = 120_000;

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl<T: Target> Suite<'_, T> {
    /// Three-phase Prepare (CanCommit) of `b`, waiting at most `wait_ms` for PreCommit.
    async fn can_commit(&mut self, b: &Branch, wait_ms: u64) -> Result<v1::PrepareResult, String> {
        let branch = v1::PrepareBranch { xid: Some(self.xid(b)), may_be_empty: false, precommit_wait_ms: wait_ms };
        let request = v1::PrepareRequest { coordinator_id: self.coordinator(), branches: vec![branch] };
        let timeout = self.options.call_timeout;
        let mut results = match self.pipelined() {
            true => self.pipeline.prepare(request, timeout).await.map_err(|e| status("prepare (pipeline)", e))?.results,
            false => self.client.prepare(request).await.map_err(|e| status("prepare", e))?.into_inner().results,
        };
        ensure_eq!(results.len(), 1, "votes for one branch");
        Ok(results.remove(0))
    }

    /// A PreCommit call of `branches` (with their vote metadata), each to commit itself
    /// `docommit_ms` after it; the call's status if it failed.
    async fn pre_commit_call(
        &mut self,
        epoch: u64,
        branches: &[(&Branch, &[u8])],
        docommit_ms: u64,
    ) -> Result<Vec<v1::BranchStateResult>, Status> {
        let branches = branches
            .iter()
            .map(|(b, metadata)| v1::PreCommitBranch {
                xid: Some(self.xid(b)),
                metadata: metadata.to_vec(),
                docommit_wait_ms: docommit_ms,
            })
            .collect();
        let request = v1::PreCommitRequest { coordinator_id: self.coordinator(), epoch, branches };
        match self.pipelined() {
            true => match self
                .any_call
                .call(v1::participant_call::Call::PreCommit(request), self.options.call_timeout)
                .await?
            {
                v1::participant_reply::Reply::PreCommit(r) => Ok(r.results),
                other => Err(Status::internal(format!("a PreCommit answered with {other:?}"))),
            },
            false => Ok(self.client.pre_commit(request).await?.into_inner().results),
        }
    }

    /// A QueryState call of `branches`; the call's status if it failed.
    async fn query_call(&mut self, epoch: u64, branches: &[&Branch]) -> Result<Vec<v1::BranchStateResult>, Status> {
        let branches = branches.iter().map(|b| self.xid(b)).collect();
        let request = v1::QueryStateRequest { coordinator_id: self.coordinator(), epoch, branches };
        match self.pipelined() {
            true => match self
                .any_call
                .call(v1::participant_call::Call::QueryState(request), self.options.call_timeout)
                .await?
            {
                v1::participant_reply::Reply::QueryState(r) => Ok(r.results),
                other => Err(Status::internal(format!("a QueryState answered with {other:?}"))),
            },
            false => Ok(self.client.query_state(request).await?.into_inner().results),
        }
    }

    /// The results must name the branches asked about, in request order.
    fn named(
        &self,
        branches: &[&Branch],
        results: Vec<v1::BranchStateResult>,
    ) -> Result<Vec<v1::BranchStateResult>, String> {
        ensure_eq!(results.len(), branches.len(), "one result per branch");
        for (b, r) in branches.iter().zip(&results) {
            ensure_eq!(r.xid.as_ref(), Some(&self.xid(b)), "results must name their branches, in request order");
        }
        Ok(results)
    }

    async fn pre_commit(
        &mut self,
        b: &Branch,
        metadata: &[u8],
        epoch: u64,
        docommit_ms: u64,
    ) -> Result<v1::BranchStateResult, String> {
        let results =
            self.pre_commit_call(epoch, &[(b, metadata)], docommit_ms).await.map_err(|e| status("pre_commit", e))?;
        Ok(self.named(&[b], results)?.remove(0))
    }

    async fn query(&mut self, b: &Branch, epoch: u64) -> Result<v1::BranchStateResult, String> {
        let results = self.query_call(epoch, &[b]).await.map_err(|e| status("query_state", e))?;
        Ok(self.named(&[b], results)?.remove(0))
    }

    /// Polls QueryState until `b` is `want`, at most until `deadline_ms` (Unix ms) plus the
    /// visibility timeout; fails if it is anything but `from` or `want` meanwhile.
    async fn becomes(
        &mut self,
        b: &Branch,
        from: BranchState,
        want: BranchState,
        deadline_ms: u64,
    ) -> Result<v1::BranchStateResult, String> {
        let patience = deadline_ms.saturating_sub(now_ms()) + self.options.visibility_timeout.as_millis() as u64;
        let until = tokio::time::Instant::now() + Duration::from_millis(patience);
        loop {
            let r = self.query(b, EPOCH).await?;
            if r.state() == want {
                return Ok(r);
            }
            ensure!(
                r.state() == from,
                "{} went from {from:?} to {:?} ({}), not to {want:?}",
                b.branch,
                r.state(),
                r.reason
            );
            ensure!(
                tokio::time::Instant::now() < until,
                "{} is still {from:?} {patience} ms later, not {want:?}",
                b.branch
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// A fresh branch with work, voted yes in a three-phase Prepare waiting `wait_ms`.
    async fn voted_yes(&mut self, check: &str, wait_ms: u64) -> Result<(Branch, Vec<u8>), String> {
        let b = self.branch_with_work(check).await?;
        let vote = self.can_commit(&b, wait_ms).await?;
        ensure_eq!(vote.vote(), Vote::Prepared, "three-phase prepare of {}: {}", b.branch, vote.reason);
        Ok((b, vote.metadata))
    }

    /// The capability probe (QueryState naming no branches) answers OK, unary and pipelined:
    /// `Ok(true)`. Or UNIMPLEMENTED, and then a three-phase Prepare votes no (never a two-phase
    /// yes in its place) and PreCommit is UNIMPLEMENTED too: `Ok(false)`.
    pub(crate) async fn three_phase_is_offered_or_refused_cleanly(&mut self) -> Result<bool, String> {
        let mut offered = Vec::new();
        for _ in 0..2 {
            match self.query_call(0, &[]).await {
                Ok(results) => {
                    ensure!(results.is_empty(), "the capability probe answered {} results", results.len());
                    offered.push(true);
                }
                Err(e) if e.code() == tonic::Code::Unimplemented => offered.push(false),
                Err(e) => return Err(status("the capability probe (QueryState naming no branches)", e)),
            }
        }
        ensure!(offered[0] == offered[1], "the capability probe answered differently unary and pipelined");
        if offered[0] {
            return Ok(true);
        }
        let b = self.branch_with_work("3pc-refused").await?;
        let vote = self.can_commit(&b, LONG_MS).await?;
        ensure_eq!(vote.vote(), Vote::Aborted, "a three-phase Prepare at a participant without three-phase commit");
        match self.pre_commit_call(EPOCH, &[(&b, &[])], LONG_MS).await {
            Err(e) if e.code() == tonic::Code::Unimplemented => {}
            other => return Err(format!("PreCommit must be UNIMPLEMENTED where QueryState is, got {other:?}")),
        }
        self.abort(&b, &[]).await?;
        Ok(false)
    }

    /// One QueryState of branches in every state answers each (in request order, naming it):
    /// UNKNOWN, ACTIVE, PREPARED (two-phase: no deadline; three-phase: its wait deadline),
    /// PRECOMMITTED (its do-commit deadline), COMMITTED, ABORTED.
    pub(crate) async fn query_state_tells_every_state(&mut self) -> Check {
        let committed = self.branch_with_work("3pc-q-committed").await?;
        let vote = self.can_commit(&committed, LONG_MS).await?;
        ensure_eq!(vote.vote(), Vote::Prepared, "three-phase prepare: {}", vote.reason);
        ensure_eq!(self.commit(&committed, false, &vote.metadata).await?.outcome(), BranchOutcome::Committed, "commit");
        let aborted = self.branch_with_work("3pc-q-aborted").await?;
        ensure_eq!(self.abort(&aborted, &[]).await?.outcome(), BranchOutcome::Aborted, "abort");
        let unknown = self.new_branch("3pc-q-unknown");
        let active = self.branch_with_work("3pc-q-active").await?;
        let two_phase = self.branch_with_work("3pc-q-two-phase").await?;
        let two_vote = self.prepare(&two_phase).await?;
        ensure_eq!(two_vote.vote(), Vote::Prepared, "prepare: {}", two_vote.reason);
        let before = now_ms();
        let (waiting, wait_meta) = self.voted_yes("3pc-q-waiting", LONG_MS).await?;
        let (pre_committed, pc_meta) = self.voted_yes("3pc-q-pre-committed", LONG_MS).await?;
        self.pre_commit(&pre_committed, &pc_meta, EPOCH, LONG_MS).await?;
        let all = [&unknown, &active, &two_phase, &waiting, &pre_committed, &committed, &aborted];
        let results = self.query_call(EPOCH, &all).await.map_err(|e| status("query_state", e))?;
        let results = self.named(&all, results)?;
        let got: Vec<BranchState> = results.iter().map(|r| r.state()).collect();
        use BranchState as S;
        ensure_eq!(
            got,
            [S::Unknown, S::Active, S::Prepared, S::Prepared, S::Precommitted, S::Committed, S::Aborted],
            "states"
        );
        ensure_eq!(results[2].deadline_unix_ms, 0, "a two-phase prepared branch has no deadline");
        for (i, what) in [(3, "wait"), (4, "do-commit")] {
            let d = results[i].deadline_unix_ms;
            ensure!(
                d >= before + LONG_MS && d <= now_ms() + LONG_MS + 5_000,
                "the {what} deadline {d} is not about {LONG_MS} ms after the call (now: {})",
                now_ms()
            );
        }
        for r in [&results[0], &results[1], &results[5], &results[6]] {
            ensure_eq!(r.deadline_unix_ms, 0, "{:?} has no deadline", r.state());
        }
        // Leave nothing in doubt.
        ensure_eq!(self.abort(&active, &[]).await?.outcome(), BranchOutcome::Aborted, "abort of the active branch");
        ensure_eq!(self.abort(&two_phase, &two_vote.metadata).await?.outcome(), BranchOutcome::Aborted, "abort");
        ensure_eq!(self.abort(&waiting, &wait_meta).await?.outcome(), BranchOutcome::Aborted, "abort");
        ensure_eq!(self.commit(&pre_committed, false, &pc_meta).await?.outcome(), BranchOutcome::Committed, "commit");
        Ok(())
    }

    /// PreCommit answers PRECOMMITTED with a do-commit deadline; repeated, the same answer (the
    /// deadline not extended); the branch is in doubt until Commit (DoCommit) commits it, after
    /// which a PreCommit answers COMMITTED.
    pub(crate) async fn pre_commit_is_idempotent_and_commit_finishes_it(&mut self) -> Check {
        let (b, metadata) = self.voted_yes("3pc-idempotent", LONG_MS).await?;
        let before = now_ms();
        let first = self.pre_commit(&b, &metadata, EPOCH, LONG_MS).await?;
        ensure_eq!(first.state(), BranchState::Precommitted, "PreCommit: {}", first.reason);
        ensure!(
            first.deadline_unix_ms >= before + LONG_MS,
            "the do-commit deadline {} is too early",
            first.deadline_unix_ms
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        let again = self.pre_commit(&b, &metadata, EPOCH, LONG_MS).await?;
        ensure_eq!(
            (again.state(), again.deadline_unix_ms),
            (BranchState::Precommitted, first.deadline_unix_ms),
            "a repeated PreCommit answers the same (the deadline not extended)"
        );
        ensure_eq!(self.listed(&b).await?, 1, "a pre-committed branch is in doubt (recover lists it)");
        ensure!(!self.visible(&b.key).await?, "pre-committed work must not be visible before it commits");
        for attempt in 0..2 {
            let r = self.commit(&b, false, &metadata).await?;
            ensure_eq!(r.outcome(), BranchOutcome::Committed, "commit attempt {attempt}: {}", r.reason);
        }
        ensure!(self.becomes_visible(&b.key).await?, "committed work is not visible");
        ensure_eq!(self.listed(&b).await?, 0, "a committed branch is no longer in doubt");
        let late = self.pre_commit(&b, &metadata, EPOCH, LONG_MS).await?;
        ensure_eq!(late.state(), BranchState::Committed, "a PreCommit after the commit");
        Ok(())
    }

    /// A PreCommit of a branch the participant never saw answers UNKNOWN and creates nothing
    /// (it stays unknown); of a branch prepared under two-phase commit it is refused with
    /// FAILED_PRECONDITION, and the branch stays as it was.
    pub(crate) async fn pre_commit_never_creates_a_branch_nor_pre_commits_a_two_phase_one(&mut self) -> Check {
        let unknown = self.new_branch("3pc-unknown");
        for _ in 0..2 {
            let r = self.pre_commit(&unknown, &[], EPOCH, LONG_MS).await?;
            ensure_eq!(r.state(), BranchState::Unknown, "PreCommit of a branch never seen: {}", r.reason);
        }
        ensure_eq!(self.query(&unknown, EPOCH).await?.state(), BranchState::Unknown, "a PreCommit created it");
        let two_phase = self.branch_with_work("3pc-two-phase").await?;
        let vote = self.prepare(&two_phase).await?;
        ensure_eq!(vote.vote(), Vote::Prepared, "prepare: {}", vote.reason);
        match self.pre_commit_call(EPOCH, &[(&two_phase, &vote.metadata)], LONG_MS).await {
            Err(e) if e.code() == tonic::Code::FailedPrecondition => {}
            other => {
                return Err(format!(
                    "PreCommit of a two-phase prepared branch must fail with FAILED_PRECONDITION, got {other:?}"
                ));
            }
        }
        let r = self.query(&two_phase, EPOCH).await?;
        ensure_eq!(
            (r.state(), r.deadline_unix_ms),
            (BranchState::Prepared, 0),
            "the two-phase branch after the refusal"
        );
        ensure_eq!(self.abort(&two_phase, &vote.metadata).await?.outcome(), BranchOutcome::Aborted, "its abort");
        ensure!(!self.visible(&two_phase.key).await?, "aborted work is visible");
        Ok(())
    }

    /// Once a coordinator at epoch N has been answered about a branch (QueryState or
    /// PreCommit), a PreCommit from a lower epoch is refused with FAILED_PRECONDITION and
    /// changes nothing; the same epoch again is a retry. An Abort of the pre-committed branch
    /// then commits it (its only way forward) and answers COMMITTED.
    pub(crate) async fn pre_commit_from_an_epoch_lower_than_one_answered_is_refused(&mut self) -> Check {
        let (b, metadata) = self.voted_yes("3pc-epoch", LONG_MS).await?;
        ensure_eq!(self.query(&b, 7).await?.state(), BranchState::Prepared, "QueryState at epoch 7");
        match self.pre_commit_call(6, &[(&b, &metadata)], LONG_MS).await {
            Err(e) if e.code() == tonic::Code::FailedPrecondition => {}
            other => {
                return Err(format!(
                    "a PreCommit at epoch 6 after epoch 7 was answered must fail with FAILED_PRECONDITION, got {other:?}"
                ));
            }
        }
        ensure_eq!(self.query(&b, 7).await?.state(), BranchState::Prepared, "the refused PreCommit changed the branch");
        let r = self.pre_commit(&b, &metadata, 7, LONG_MS).await?;
        ensure_eq!(r.state(), BranchState::Precommitted, "PreCommit at epoch 7: {}", r.reason);
        let r = self.pre_commit(&b, &metadata, 7, LONG_MS).await?;
        ensure_eq!(r.state(), BranchState::Precommitted, "PreCommit at epoch 7 again (a retry): {}", r.reason);
        ensure!(
            self.pre_commit_call(EPOCH, &[(&b, &metadata)], LONG_MS)
                .await
                .is_err_and(|e| e.code() == tonic::Code::FailedPrecondition),
            "a stale PreCommit of a pre-committed branch must fail with FAILED_PRECONDITION"
        );
        let r = self.abort(&b, &metadata).await?;
        ensure_eq!(
            r.outcome(),
            BranchOutcome::Committed,
            "an Abort of a pre-committed branch commits it: {}",
            r.reason
        );
        ensure!(self.becomes_visible(&b.key).await?, "the pre-committed branch's work is not visible after its Abort");
        ensure_eq!(self.listed(&b).await?, 0, "still in doubt");
        Ok(())
    }

    /// A branch that voted yes and hears no PreCommit aborts itself at its wait deadline (not
    /// before): rolled back, no longer in doubt, and a late PreCommit or Commit hears ABORTED.
    pub(crate) async fn a_yes_vote_with_no_pre_commit_aborts_itself_at_its_wait_deadline(&mut self) -> Check {
        let wait = self.options.self_deadline_wait.as_millis() as u64;
        let (b, metadata) = self.voted_yes("3pc-self-abort", wait).await?;
        let prepared = self.query(&b, EPOCH).await?;
        ensure_eq!(prepared.state(), BranchState::Prepared, "after the vote: {}", prepared.reason);
        let deadline = prepared.deadline_unix_ms;
        ensure!(deadline > 0, "a three-phase prepared branch tells its wait deadline");
        let r = self.becomes(&b, BranchState::Prepared, BranchState::Aborted, deadline).await?;
        ensure!(now_ms() + 50 >= deadline, "aborted at {} ms, before its wait deadline {deadline}", now_ms());
        ensure!(!r.reason.is_empty(), "an abort at the wait deadline says why");
        ensure!(!self.visible(&b.key).await?, "work of a branch that aborted itself is visible");
        ensure_eq!(self.listed(&b).await?, 0, "a branch that aborted itself is still in doubt");
        let late = self.pre_commit(&b, &metadata, EPOCH, LONG_MS).await?;
        ensure_eq!(late.state(), BranchState::Aborted, "a PreCommit after the wait deadline");
        let r = self.commit(&b, false, &metadata).await?;
        ensure!(
            !matches!(r.outcome(), BranchOutcome::Committed | BranchOutcome::Retry),
            "a Commit of a branch that aborted itself must say so, got {:?}",
            r.outcome()
        );
        ensure!(!self.visible(&b.key).await?, "work of a branch that aborted itself is visible after a late Commit");
        Ok(())
    }

    /// A pre-committed branch that hears no DoCommit commits itself at its do-commit deadline
    /// (not before): its work becomes visible, it is no longer in doubt, a late Commit hears
    /// COMMITTED.
    pub(crate) async fn a_pre_committed_branch_commits_itself_at_its_do_commit_deadline(&mut self) -> Check {
        let wait = self.options.self_deadline_wait.as_millis() as u64;
        let (b, metadata) = self.voted_yes("3pc-self-commit", LONG_MS).await?;
        let r = self.pre_commit(&b, &metadata, EPOCH, wait).await?;
        ensure_eq!(r.state(), BranchState::Precommitted, "PreCommit: {}", r.reason);
        let deadline = r.deadline_unix_ms;
        self.becomes(&b, BranchState::Precommitted, BranchState::Committed, deadline).await?;
        ensure!(now_ms() + 50 >= deadline, "committed at {} ms, before its do-commit deadline {deadline}", now_ms());
        ensure!(self.becomes_visible(&b.key).await?, "the work of a branch that committed itself is not visible");
        ensure_eq!(self.listed(&b).await?, 0, "a branch that committed itself is still in doubt");
        let r = self.commit(&b, false, &metadata).await?;
        ensure_eq!(r.outcome(), BranchOutcome::Committed, "a late Commit: {}", r.reason);
        Ok(())
    }

    /// kill -9 with a branch waiting for PreCommit, one pre-committed (both with short
    /// deadlines) and one whose epoch was raised: after the restart the first aborts itself,
    /// the second commits itself (at once if their deadlines passed while the participant was
    /// down), and the third still refuses a PreCommit from a lower epoch.
    pub(crate) async fn three_phase_deadlines_and_epochs_survive_a_restart(&mut self) -> Check {
        let wait = self.options.self_deadline_wait.as_millis() as u64;
        let (waiting, waiting_meta) = self.voted_yes("3pc-restart-waiting", wait).await?;
        let (pre_committed, pc_meta) = self.voted_yes("3pc-restart-pre-committed", LONG_MS).await?;
        let r = self.pre_commit(&pre_committed, &pc_meta, EPOCH, wait).await?;
        ensure_eq!(r.state(), BranchState::Precommitted, "PreCommit: {}", r.reason);
        let (fenced, fenced_meta) = self.voted_yes("3pc-restart-epoch", LONG_MS).await?;
        ensure_eq!(self.query(&fenced, 5).await?.state(), BranchState::Prepared, "QueryState at epoch 5");
        self.restart().await?;
        let deadline = now_ms();
        self.becomes(&waiting, BranchState::Prepared, BranchState::Aborted, deadline).await?;
        self.becomes(&pre_committed, BranchState::Precommitted, BranchState::Committed, deadline).await?;
        ensure!(self.becomes_visible(&pre_committed.key).await?, "the self-commit after a restart is not visible");
        ensure!(!self.visible(&waiting.key).await?, "the self-abort after a restart left its work visible");
        match self.pre_commit_call(4, &[(&fenced, &fenced_meta)], LONG_MS).await {
            Err(e) if e.code() == tonic::Code::FailedPrecondition => {}
            other => {
                return Err(format!(
                    "after a restart, a PreCommit at epoch 4 after epoch 5 was answered must fail with FAILED_PRECONDITION, got {other:?}"
                ));
            }
        }
        ensure_eq!(
            self.abort(&fenced, &fenced_meta).await?.outcome(),
            BranchOutcome::Aborted,
            "abort of the fenced branch"
        );
        ensure_eq!(self.abort(&waiting, &waiting_meta).await?.outcome(), BranchOutcome::Aborted, "a repeated abort");
        for b in [&waiting, &pre_committed, &fenced] {
            ensure_eq!(self.listed(b).await?, 0, "{} is still in doubt", b.branch);
        }
        Ok(())
    }
}
