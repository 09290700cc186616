//! The participant conformance suite: written once, run against every participant
//! implementation (the reference participant, the PostgreSQL adapter, the Kafka adapter).
//!
//! It speaks the Participant protocol directly, as a coordinator would, and checks the
//! contract every implementation must keep: idempotent prepare/commit/abort, a prepare after an
//! abort refused, recover listing exactly the prepared branches, and commit and abort surviving
//! a kill -9 of the participant. Its Prepare, Commit and Abort calls alternate between unary
//! calls and the pipeline stream, so every check covers both, and a repeated call crosses from
//! one to the other.

use std::time::Duration;

use pledge_proto::Gtid;
use pledge_proto::pipeline::ParticipantPipeline;
use pledge_proto::v1::participant_client::ParticipantClient;
use pledge_proto::v1::{self, BranchOutcome, Vote};
use tonic::transport::Channel;

/// What the suite needs from an implementation beyond the Participant protocol.
pub trait Target {
    /// The Participant service's endpoint (may change after [`Target::restart`]).
    fn endpoint(&self) -> String;
    /// The resource id the participant serves.
    fn resource(&self) -> String;
    /// Does some work in branch (gtid, branch) that becomes visible under `key` once the
    /// branch commits.
    fn work(&mut self, gtid: &str, branch: &str, key: &str) -> impl Future<Output = ()>;
    /// Whether the work done under `key` is visible (committed).
    fn visible(&mut self, key: &str) -> impl Future<Output = bool>;
    /// kill -9 the participant and start it again on the same state.
    fn restart(&mut self) -> impl Future<Output = ()>;
}

const COORDINATOR_ID: &str = "conformance";
/// Deadline of a call on the pipeline.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

struct Suite<'a, T: Target> {
    target: &'a mut T,
    client: ParticipantClient<Channel>,
    pipeline: ParticipantPipeline,
    /// Calls made so far: odd ones go over the pipeline.
    calls: u32,
    n: u32,
}

async fn connect(endpoint: &str) -> (ParticipantClient<Channel>, ParticipantPipeline) {
    let channel = pledge_proto::transport::Target::parse(endpoint)
        .expect("participant endpoint")
        .connect()
        .await
        .expect("connecting to the participant");
    (ParticipantClient::new(channel.clone()), ParticipantPipeline::new(channel, 8 << 20))
}

/// Runs every check against `target`, one after the other. Panics on the first violation,
/// naming the check.
pub async fn run<T: Target>(target: &mut T) {
    let (client, pipeline) = connect(&target.endpoint()).await;
    let mut suite = Suite { target, client, pipeline, calls: 0, n: 0 };
    suite.pipelined_calls_in_flight_together_get_their_own_answers().await;
    suite.prepare_and_commit_are_idempotent().await;
    suite.abort_is_idempotent().await;
    suite.prepare_after_abort_is_refused().await;
    suite.one_phase_commit_is_idempotent().await;
    suite.recover_lists_exactly_the_prepared_branches().await;
    suite.commit_survives_a_restart().await;
    suite.abort_survives_a_restart().await;
    suite.work_lost_in_a_restart_is_never_prepared().await;
    suite.a_prepare_whose_call_gave_up_still_ends_cleanly().await;
}

struct Branch {
    gtid: String,
    branch: String,
    key: String,
}

impl<T: Target> Suite<'_, T> {
    /// A fresh branch (new GTID, issued now) with work done in it.
    async fn branch_with_work(&mut self, check: &str) -> Branch {
        self.n += 1;
        let b = Branch {
            gtid: Gtid::new_v7().to_string(),
            branch: format!("b{}", self.n),
            key: format!("conformance-{check}-{}-{}", self.n, fastrand::u32(..)),
        };
        self.target.work(&b.gtid, &b.branch, &b.key).await;
        b
    }

    fn xid(&self, b: &Branch) -> v1::BranchXid {
        v1::BranchXid { resource_id: self.target.resource(), gtid: b.gtid.clone(), branch_id: b.branch.clone() }
    }

    async fn reconnect(&mut self) {
        (self.client, self.pipeline) = connect(&self.target.endpoint()).await;
    }

    /// Whether the next call goes over the pipeline (every other one does).
    fn pipelined(&mut self) -> bool {
        self.calls += 1;
        self.calls % 2 == 1
    }

    async fn prepare(&mut self, b: &Branch) -> v1::PrepareResult {
        let request = v1::PrepareRequest { coordinator_id: COORDINATOR_ID.into(), branches: vec![self.xid(b)] };
        let mut results = match self.pipelined() {
            true => self.pipeline.prepare(request, CALL_TIMEOUT).await.expect("prepare call (pipeline)").results,
            false => self.client.prepare(request).await.expect("prepare call").into_inner().results,
        };
        assert_eq!(results.len(), 1, "one vote per branch");
        results.remove(0)
    }

    async fn commit(&mut self, b: &Branch, one_phase: bool, metadata: &[u8]) -> v1::BranchResult {
        let request = v1::CommitBranchesRequest {
            coordinator_id: COORDINATOR_ID.into(),
            branches: vec![v1::CommitBranch { xid: Some(self.xid(b)), one_phase, metadata: metadata.to_vec() }],
        };
        let mut results = match self.pipelined() {
            true => self.pipeline.commit(request, CALL_TIMEOUT).await.expect("commit call (pipeline)").results,
            false => self.client.commit(request).await.expect("commit call").into_inner().results,
        };
        assert_eq!(results.len(), 1, "one result per branch");
        results.remove(0)
    }

    async fn abort(&mut self, b: &Branch, metadata: &[u8]) -> v1::BranchResult {
        let request = v1::AbortBranchesRequest {
            coordinator_id: COORDINATOR_ID.into(),
            branches: vec![v1::AbortBranch { xid: Some(self.xid(b)), metadata: metadata.to_vec() }],
        };
        let mut results = match self.pipelined() {
            true => self.pipeline.abort(request, CALL_TIMEOUT).await.expect("abort call (pipeline)").results,
            false => self.client.abort(request).await.expect("abort call").into_inner().results,
        };
        assert_eq!(results.len(), 1, "one result per branch");
        results.remove(0)
    }

    /// The (gtid, branch, metadata) the participant lists as in doubt for `coordinator_id`,
    /// fetched in pages of two so paging is exercised too.
    async fn recover(&mut self, coordinator_id: &str) -> Vec<(String, String, Vec<u8>)> {
        let mut all = Vec::new();
        let mut after = None;
        loop {
            let r = self
                .client
                .recover(v1::RecoverRequest {
                    coordinator_id: coordinator_id.into(),
                    resource_ids: vec![self.target.resource()],
                    after: after.take(),
                    limit: 2,
                })
                .await
                .expect("recover call")
                .into_inner();
            assert!(r.branches.len() <= 2, "a page holds at most `limit` branches");
            for b in r.branches {
                let x = b.xid.expect("xid");
                assert_eq!(x.resource_id, self.target.resource(), "recover listed another resource's branch");
                all.push((x.gtid.clone(), x.branch_id.clone(), b.metadata));
                after = Some(x);
            }
            if !r.truncated {
                break;
            }
            assert!(after.is_some(), "a truncated page must not be empty");
        }
        let mut keys: Vec<_> = all.iter().map(|(g, b, _)| (g.clone(), b.clone())).collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), all.len(), "paging listed a branch twice");
        all
    }

    /// Whether work under `key` is visible, or becomes so within the tests' patience: a
    /// commit's answer may come before its effect can be read (a Kafka read_committed consumer
    /// sees a transaction once the broker has written its markers, which it does after
    /// answering EndTxn).
    async fn becomes_visible(&mut self, key: &str) -> bool {
        let deadline = tokio::time::Instant::now() + crate::EVENTUALLY_TIMEOUT;
        loop {
            if self.target.visible(key).await {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn listed(&mut self, b: &Branch) -> usize {
        self.recover(COORDINATOR_ID).await.iter().filter(|(g, br, _)| *g == b.gtid && *br == b.branch).count()
    }

    /// Calls for many branches in flight together on one pipeline stream (as the coordinator
    /// sends them) each get their own answer; a malformed call gets INVALID_ARGUMENT and leaves
    /// the stream and the other calls alone.
    async fn pipelined_calls_in_flight_together_get_their_own_answers(&mut self) {
        // Four: the Kafka adapter's suite runs with five producers, one per open branch.
        let mut branches = Vec::new();
        for _ in 0..4 {
            branches.push(self.branch_with_work("pipelined").await);
        }
        let (xids, pipeline): (Vec<_>, _) = (branches.iter().map(|b| self.xid(b)).collect(), &self.pipeline);
        let prepares = xids.iter().map(|xid| {
            pipeline.prepare(
                v1::PrepareRequest { coordinator_id: COORDINATOR_ID.into(), branches: vec![xid.clone()] },
                CALL_TIMEOUT,
            )
        });
        let mut bad = xids[0].clone();
        bad.gtid = "not-a-gtid".into();
        let malformed = pipeline
            .prepare(v1::PrepareRequest { coordinator_id: COORDINATOR_ID.into(), branches: vec![bad] }, CALL_TIMEOUT);
        let (votes, malformed) = futures::join!(futures::future::join_all(prepares), malformed);
        let malformed = malformed.expect_err("a malformed gtid is refused");
        assert_eq!(malformed.code(), tonic::Code::InvalidArgument, "{malformed:?}");
        let mut metadata = Vec::new();
        for (b, vote) in branches.iter().zip(votes) {
            let vote = vote.expect("prepare call (pipeline)").results.remove(0);
            assert_eq!(vote.vote(), Vote::Prepared, "prepare of {}: {}", b.branch, vote.reason);
            metadata.push(vote.metadata);
        }
        let commits = xids.iter().zip(&metadata).map(|(xid, metadata)| {
            pipeline.commit(
                v1::CommitBranchesRequest {
                    coordinator_id: COORDINATOR_ID.into(),
                    branches: vec![v1::CommitBranch {
                        xid: Some(xid.clone()),
                        one_phase: false,
                        metadata: metadata.clone(),
                    }],
                },
                CALL_TIMEOUT,
            )
        });
        for (b, result) in branches.iter().zip(futures::future::join_all(commits).await) {
            let result = result.expect("commit call (pipeline)").results.remove(0);
            assert_eq!(result.outcome(), BranchOutcome::Committed, "commit of {}: {}", b.branch, result.reason);
        }
        for b in &branches {
            assert!(self.becomes_visible(&b.key).await, "committed work of {} is visible", b.branch);
        }
    }

    async fn prepare_and_commit_are_idempotent(&mut self) {
        let b = self.branch_with_work("idempotent-commit").await;
        let first = self.prepare(&b).await;
        assert_eq!(first.vote(), Vote::Prepared, "prepare: {}", first.reason);
        let again = self.prepare(&b).await;
        assert_eq!(
            (again.vote(), &again.metadata),
            (Vote::Prepared, &first.metadata),
            "a repeated prepare answers the same"
        );
        assert_eq!(self.listed(&b).await, 1, "a prepared branch is listed by recover, once");
        assert!(!self.target.visible(&b.key).await, "prepared work must not be visible before commit");
        for attempt in 0..2 {
            let r = self.commit(&b, false, &first.metadata).await;
            assert_eq!(r.outcome(), BranchOutcome::Committed, "commit attempt {attempt}: {}", r.reason);
        }
        assert!(self.becomes_visible(&b.key).await, "committed work is visible");
        assert_eq!(self.listed(&b).await, 0, "a committed branch is no longer in doubt");
        let late = self.prepare(&b).await;
        assert_ne!(late.vote(), Vote::Aborted, "a prepare repeated after the commit must not claim a rollback");
    }

    async fn abort_is_idempotent(&mut self) {
        let b = self.branch_with_work("idempotent-abort").await;
        let vote = self.prepare(&b).await;
        assert_eq!(vote.vote(), Vote::Prepared, "prepare: {}", vote.reason);
        for attempt in 0..2 {
            let r = self.abort(&b, &vote.metadata).await;
            assert_eq!(r.outcome(), BranchOutcome::Aborted, "abort attempt {attempt}: {}", r.reason);
        }
        assert!(!self.target.visible(&b.key).await, "aborted work must not be visible");
        assert_eq!(self.listed(&b).await, 0, "an aborted branch is not in doubt");
    }

    async fn prepare_after_abort_is_refused(&mut self) {
        // With work done: the abort rolls it back, and the late prepare is refused.
        let b = self.branch_with_work("dangling").await;
        assert_eq!(self.abort(&b, &[]).await.outcome(), BranchOutcome::Aborted);
        let late = self.prepare(&b).await;
        assert_eq!(late.vote(), Vote::Aborted, "a prepare after an abort must be refused");
        assert!(!self.target.visible(&b.key).await);
        assert_eq!(self.listed(&b).await, 0);
        // Without any work seen before the abort (the abort overtook everything).
        self.n += 1;
        let unknown = Branch { gtid: Gtid::new_v7().to_string(), branch: format!("b{}", self.n), key: String::new() };
        assert_eq!(self.abort(&unknown, &[]).await.outcome(), BranchOutcome::Aborted, "abort of an unknown branch");
        assert_eq!(self.prepare(&unknown).await.vote(), Vote::Aborted, "prepare after abort of an unknown branch");
    }

    async fn one_phase_commit_is_idempotent(&mut self) {
        let b = self.branch_with_work("one-phase").await;
        for attempt in 0..2 {
            let r = self.commit(&b, true, &[]).await;
            assert_eq!(r.outcome(), BranchOutcome::Committed, "one-phase commit attempt {attempt}: {}", r.reason);
        }
        assert!(self.becomes_visible(&b.key).await);
        assert_eq!(self.listed(&b).await, 0);
    }

    async fn recover_lists_exactly_the_prepared_branches(&mut self) {
        let prepared_1 = self.branch_with_work("recover-p1").await;
        let prepared_2 = self.branch_with_work("recover-p2").await;
        let active = self.branch_with_work("recover-active").await;
        let committed = self.branch_with_work("recover-committed").await;
        let aborted = self.branch_with_work("recover-aborted").await;
        for b in [&prepared_1, &prepared_2, &committed, &aborted] {
            assert_eq!(self.prepare(b).await.vote(), Vote::Prepared);
        }
        self.commit(&committed, false, &[]).await;
        self.abort(&aborted, &[]).await;
        let ours: Vec<String> =
            [&prepared_1, &prepared_2, &active, &committed, &aborted].iter().map(|b| b.gtid.clone()).collect();
        let mut listed: Vec<String> =
            self.recover(COORDINATOR_ID).await.into_iter().map(|(g, _, _)| g).filter(|g| ours.contains(g)).collect();
        listed.sort();
        let mut want = vec![prepared_1.gtid.clone(), prepared_2.gtid.clone()];
        want.sort();
        assert_eq!(listed, want, "recover must list exactly the prepared branches");
        let other = self.recover("another-coordinator").await;
        assert!(
            other.iter().all(|(g, _, _)| !ours.contains(g)),
            "branches of one coordinator must not be listed to another"
        );
        // Leave nothing in doubt.
        self.abort(&prepared_1, &[]).await;
        self.abort(&prepared_2, &[]).await;
        self.abort(&active, &[]).await;
    }

    async fn commit_survives_a_restart(&mut self) {
        let b = self.branch_with_work("restart-commit").await;
        let vote = self.prepare(&b).await;
        assert_eq!(vote.vote(), Vote::Prepared, "prepare: {}", vote.reason);
        self.target.restart().await;
        self.reconnect().await;
        let listed = self.recover(COORDINATOR_ID).await;
        let entry = listed.iter().find(|(g, br, _)| *g == b.gtid && *br == b.branch);
        let entry = entry.expect("a prepared branch survives a kill -9 and is listed by recover");
        assert_eq!(entry.2, vote.metadata, "recover hands back the vote's metadata");
        let r = self.commit(&b, false, &vote.metadata).await;
        assert_eq!(r.outcome(), BranchOutcome::Committed, "commit after restart: {}", r.reason);
        assert!(self.becomes_visible(&b.key).await);
        self.target.restart().await;
        self.reconnect().await;
        assert!(self.becomes_visible(&b.key).await, "a commit survives a restart");
        // New work prepared in between (on whatever the participant reuses: a connection, a
        // producer) must not be touched by a repeated commit of the old branch.
        let next = self.branch_with_work("restart-commit-next").await;
        let next_vote = self.prepare(&next).await;
        assert_eq!(next_vote.vote(), Vote::Prepared, "prepare after restart: {}", next_vote.reason);
        let r = self.commit(&b, false, &vote.metadata).await;
        assert_eq!(r.outcome(), BranchOutcome::Committed, "repeated commit after restart: {}", r.reason);
        assert_eq!(self.listed(&b).await, 0);
        let r = self.commit(&next, false, &next_vote.metadata).await;
        assert_eq!(r.outcome(), BranchOutcome::Committed, "the other branch still commits: {}", r.reason);
        assert!(self.becomes_visible(&next.key).await);
    }

    /// Work done before a participant restart may be lost with it: that branch must never vote
    /// PREPARED (nor READ_ONLY), or the transaction would commit without it.
    async fn work_lost_in_a_restart_is_never_prepared(&mut self) {
        let b = self.branch_with_work("lost-work").await;
        self.target.restart().await;
        self.reconnect().await;
        let vote = self.prepare(&b).await;
        assert_eq!(vote.vote(), Vote::Aborted, "work from before a restart: {}", vote.reason);
        assert!(!self.target.visible(&b.key).await);
    }

    /// The coordinator's deadline may cut a Prepare call short; the participant must still end
    /// up in a consistent state: the abort that follows rolls the branch back, and recover
    /// does not list it.
    async fn a_prepare_whose_call_gave_up_still_ends_cleanly(&mut self) {
        let b = self.branch_with_work("prepare-deadline").await;
        let mut request = tonic::Request::new(v1::PrepareRequest {
            coordinator_id: COORDINATOR_ID.into(),
            branches: vec![self.xid(&b)],
        });
        request.set_timeout(Duration::from_millis(1));
        let _ = self.client.prepare(request).await; // may or may not have finished
        let r = self.abort(&b, &[]).await;
        assert_eq!(r.outcome(), BranchOutcome::Aborted, "abort after a cut-short prepare: {}", r.reason);
        assert_eq!(self.listed(&b).await, 0, "nothing left in doubt");
        assert!(!self.target.visible(&b.key).await);
        assert_eq!(self.prepare(&b).await.vote(), Vote::Aborted);

        // The same over the pipeline, whose deadline is the caller's alone.
        let b = self.branch_with_work("prepare-deadline-pipelined").await;
        let request = v1::PrepareRequest { coordinator_id: COORDINATOR_ID.into(), branches: vec![self.xid(&b)] };
        let _ = self.pipeline.prepare(request, Duration::from_millis(1)).await;
        let r = self.abort(&b, &[]).await;
        assert_eq!(r.outcome(), BranchOutcome::Aborted, "abort after a cut-short pipelined prepare: {}", r.reason);
        assert_eq!(self.listed(&b).await, 0, "nothing left in doubt");
        assert!(!self.target.visible(&b.key).await);
    }

    async fn abort_survives_a_restart(&mut self) {
        let b = self.branch_with_work("restart-abort").await;
        let vote = self.prepare(&b).await;
        assert_eq!(vote.vote(), Vote::Prepared, "prepare: {}", vote.reason);
        self.target.restart().await;
        self.reconnect().await;
        assert_eq!(self.abort(&b, &vote.metadata).await.outcome(), BranchOutcome::Aborted);
        self.target.restart().await;
        self.reconnect().await;
        assert_eq!(self.listed(&b).await, 0, "an abort survives a restart");
        assert!(!self.target.visible(&b.key).await);
        assert_eq!(self.prepare(&b).await.vote(), Vote::Aborted, "no prepare after an abort, even after a restart");
        assert_eq!(self.abort(&b, &vote.metadata).await.outcome(), BranchOutcome::Aborted);
    }
}
