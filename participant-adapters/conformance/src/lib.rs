//! The participant conformance kit: one suite every Pledge participant must pass, whatever its
//! language, run over gRPC exactly as a coordinator would talk to it.
//!
//! It checks the contract of `pledge_sdk` (see that crate's docs): idempotent prepare, commit
//! and abort; a prepare after an abort refused; a branch the participant never saw voting no
//! (read-only only when declared possibly empty); a commit nothing proves never answered
//! "committed"; Recover listing exactly the prepared branches, per resource and page by page;
//! and, given a way to restart the participant, that prepared branches, answers given and one-
//! phase commits survive a kill -9, and that work lost in one is never prepared. Prepare, Commit
//! and Abort alternate between unary calls and the pipeline stream, so every check covers both
//! and a repeated call crosses from one to the other.
//!
//! Three-phase commit ([`three_phase`]): a participant that answers the capability probe (a
//! QueryState naming no branches) is checked for PreCommit (idempotent, refused from a stale
//! epoch, UNKNOWN for a branch it never saw), QueryState (every state), both self-deadlines
//! (with waits of [`Options::self_deadline_wait`]) and, given a restart, that its deadlines
//! and epochs survive a kill -9. One that answers UNIMPLEMENTED must vote no to a three-phase
//! Prepare; the other three-phase checks are then skipped.
//!
//! Use it as a library (implement [`Target`] and call [`run`]) or as the `pledge-conformance`
//! binary, which drives the in-tree adapters' work APIs or any participant through shell
//! commands.

pub mod drivers;

use std::time::Duration;

use pledge_proto::Gtid;
use pledge_proto::pipeline::{ParticipantPipeline, Pipeline};
use pledge_proto::v1::participant_client::ParticipantClient;
use pledge_proto::v1::{self, BranchOutcome, Vote};
use tonic::transport::Channel;

/// What the suite needs from a participant beyond the Participant protocol.
pub trait Target {
    /// The Participant service's endpoint (may change after [`Target::restart`]).
    fn endpoint(&self) -> String;
    /// The resource id the participant serves.
    fn resource(&self) -> String;
    /// Does some work in branch (gtid, branch) that becomes visible under `key` once the
    /// branch commits. An error when the participant refuses it.
    fn work(&mut self, gtid: &str, branch: &str, key: &str) -> impl Future<Output = Result<(), String>>;
    /// Whether the work done under `key` is visible (committed).
    fn visible(&mut self, key: &str) -> impl Future<Output = Result<bool, String>>;
    /// Whether [`Target::restart`] is available; the restart checks are skipped without it.
    fn can_restart(&self) -> bool {
        true
    }
    /// kill -9 the participant and start it again on the same state; resolve once it serves.
    fn restart(&mut self) -> impl Future<Output = Result<(), String>>;
}

/// How the suite talks to the participant.
#[derive(Debug, Clone)]
pub struct Options {
    /// The coordinator id the suite calls itself (branches of other coordinators are left alone).
    pub coordinator_id: String,
    /// Deadline of each call.
    pub call_timeout: Duration,
    /// How long committed work may take to become visible (a Kafka read_committed reader sees a
    /// transaction once the broker has written its markers, after it answered the commit).
    pub visibility_timeout: Duration,
    /// The wait and do-commit timeouts of the three-phase self-deadline checks (long enough
    /// for a Prepare to finish within it).
    pub self_deadline_wait: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            coordinator_id: "conformance".into(),
            call_timeout: Duration::from_secs(30),
            visibility_timeout: Duration::from_secs(30),
            self_deadline_wait: Duration::from_millis(800),
        }
    }
}

/// What a run found.
#[derive(Debug, Default)]
pub struct Report {
    pub passed: Vec<&'static str>,
    /// Check and why it was not run.
    pub skipped: Vec<(&'static str, String)>,
    /// Check and what it found.
    pub failed: Vec<(&'static str, String)>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.failed.is_empty()
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for name in &self.passed {
            writeln!(f, "ok       {name}")?;
        }
        for (name, why) in &self.skipped {
            writeln!(f, "skipped  {name}: {why}")?;
        }
        for (name, why) in &self.failed {
            writeln!(f, "FAILED   {name}: {why}")?;
        }
        write!(f, "{} passed, {} failed, {} skipped", self.passed.len(), self.failed.len(), self.skipped.len())
    }
}

type Check = Result<(), String>;

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

macro_rules! ensure_eq {
    ($left:expr, $right:expr, $($fmt:tt)+) => {{
        let (left, right) = (&$left, &$right);
        if left != right {
            return Err(format!("{}: got {:?}, expected {:?}", format!($($fmt)+), left, right));
        }
    }};
}

// After the macros, which it uses.
pub mod three_phase;

/// Runs every check against `target`, one after the other, and reports each.
pub async fn run<T: Target>(target: &mut T, options: &Options) -> Report {
    let mut report = Report::default();
    let (client, pipeline, calls) = match connect(&target.endpoint()).await {
        Ok(c) => c,
        Err(e) => {
            report.failed.push(("connect", e));
            return report;
        }
    };
    let restartable = target.can_restart();
    let mut suite = Suite { target, options: options.clone(), client, pipeline, any_call: calls, calls: 0, n: 0 };
    macro_rules! checks {
        ($($name:ident),* ; restart: $($restart:ident),*) => {
            $(
                match suite.$name().await {
                    Ok(()) => report.passed.push(stringify!($name)),
                    Err(e) => report.failed.push((stringify!($name), e)),
                }
            )*
            $(
                if !restartable {
                    report.skipped.push((stringify!($restart), "no way to restart the participant was given".into()));
                } else {
                    match suite.$restart().await {
                        Ok(()) => report.passed.push(stringify!($restart)),
                        Err(e) => report.failed.push((stringify!($restart), e)),
                    }
                }
            )*
        };
    }
    checks!(
        pipelined_calls_in_flight_together_get_their_own_answers,
        prepare_and_commit_are_idempotent,
        abort_is_idempotent,
        prepare_after_abort_is_refused,
        one_phase_commit_is_idempotent,
        a_branch_never_seen_votes_no,
        a_branch_declared_possibly_empty_votes_read_only,
        a_commit_nothing_proves_is_never_reported_committed,
        recover_lists_exactly_the_prepared_branches_per_resource_and_page,
        a_prepare_whose_call_gave_up_still_ends_cleanly;
        restart:
        commit_survives_a_restart,
        abort_survives_a_restart,
        answers_survive_a_restart,
        work_lost_in_a_restart_is_never_prepared
    );
    // Three-phase commit: checked if offered (or its refusal checked if not).
    let offered = match suite.three_phase_is_offered_or_refused_cleanly().await {
        Ok(offered) => {
            report.passed.push("three_phase_is_offered_or_refused_cleanly");
            offered
        }
        Err(e) => {
            report.failed.push(("three_phase_is_offered_or_refused_cleanly", e));
            false
        }
    };
    if offered {
        checks!(
            query_state_tells_every_state,
            pre_commit_is_idempotent_and_commit_finishes_it,
            pre_commit_never_creates_a_branch_nor_pre_commits_a_two_phase_one,
            pre_commit_from_an_epoch_lower_than_one_answered_is_refused,
            a_yes_vote_with_no_pre_commit_aborts_itself_at_its_wait_deadline,
            a_pre_committed_branch_commits_itself_at_its_do_commit_deadline;
            restart:
            three_phase_deadlines_and_epochs_survive_a_restart
        );
    } else {
        for name in [
            "query_state_tells_every_state",
            "pre_commit_is_idempotent_and_commit_finishes_it",
            "pre_commit_never_creates_a_branch_nor_pre_commits_a_two_phase_one",
            "pre_commit_from_an_epoch_lower_than_one_answered_is_refused",
            "a_yes_vote_with_no_pre_commit_aborts_itself_at_its_wait_deadline",
            "a_pre_committed_branch_commits_itself_at_its_do_commit_deadline",
            "three_phase_deadlines_and_epochs_survive_a_restart",
        ] {
            report.skipped.push((name, "the participant does not offer three-phase commit".into()));
        }
    }
    report
}

struct Suite<'a, T: Target> {
    target: &'a mut T,
    options: Options,
    client: ParticipantClient<Channel>,
    pipeline: ParticipantPipeline,
    /// The same pipeline stream's client for any call (PreCommit and QueryState).
    any_call: Pipeline<v1::ParticipantCall, v1::ParticipantReply>,
    /// Calls made so far: odd ones go over the pipeline.
    calls: u32,
    n: u32,
}

type Clients = (ParticipantClient<Channel>, ParticipantPipeline, Pipeline<v1::ParticipantCall, v1::ParticipantReply>);

async fn connect(endpoint: &str) -> Result<Clients, String> {
    let channel = pledge_proto::transport::Target::parse(endpoint)
        .map_err(|e| format!("participant endpoint {endpoint:?}: {e}"))?
        .connect()
        .await
        .map_err(|e| format!("connecting to the participant at {endpoint}: {e}"))?;
    let client = ParticipantClient::new(channel.clone());
    let any = client.clone().max_decoding_message_size(8 << 20);
    let any_call = Pipeline::new(move |calls| {
        let mut client = any.clone();
        async move { client.pipeline(calls).await }
    });
    Ok((client, ParticipantPipeline::new(channel, 8 << 20), any_call))
}

struct Branch {
    gtid: String,
    branch: String,
    key: String,
}

fn status(what: &str, e: tonic::Status) -> String {
    format!("{what} call failed: {:?}: {}", e.code(), e.message())
}

impl<T: Target> Suite<'_, T> {
    /// A fresh branch (new GTID, issued now), with no work done in it.
    fn new_branch(&mut self, check: &str) -> Branch {
        self.n += 1;
        Branch {
            gtid: Gtid::new_v7().to_string(),
            branch: format!("b{}", self.n),
            key: format!("conformance-{check}-{}-{}", self.n, fastrand::u32(..)),
        }
    }

    /// A fresh branch with work done in it.
    async fn branch_with_work(&mut self, check: &str) -> Result<Branch, String> {
        let b = self.new_branch(check);
        self.target.work(&b.gtid, &b.branch, &b.key).await.map_err(|e| format!("work in {}: {e}", b.branch))?;
        Ok(b)
    }

    fn xid(&self, b: &Branch) -> v1::BranchXid {
        v1::BranchXid { resource_id: self.target.resource(), gtid: b.gtid.clone(), branch_id: b.branch.clone() }
    }

    fn coordinator(&self) -> String {
        self.options.coordinator_id.clone()
    }

    async fn restart(&mut self) -> Check {
        self.target.restart().await.map_err(|e| format!("restarting the participant: {e}"))?;
        (self.client, self.pipeline, self.any_call) = connect(&self.target.endpoint()).await?;
        Ok(())
    }

    /// Whether the next call goes over the pipeline (every other one does).
    fn pipelined(&mut self) -> bool {
        self.calls += 1;
        self.calls % 2 == 1
    }

    async fn prepare_as(&mut self, b: &Branch, may_be_empty: bool) -> Result<v1::PrepareResult, String> {
        let branches = vec![v1::PrepareBranch { xid: Some(self.xid(b)), may_be_empty, ..Default::default() }];
        let request = v1::PrepareRequest { coordinator_id: self.coordinator(), branches };
        let timeout = self.options.call_timeout;
        let mut results = match self.pipelined() {
            true => self.pipeline.prepare(request, timeout).await.map_err(|e| status("prepare (pipeline)", e))?.results,
            false => self.client.prepare(request).await.map_err(|e| status("prepare", e))?.into_inner().results,
        };
        ensure_eq!(results.len(), 1, "votes for one branch");
        Ok(results.remove(0))
    }

    async fn prepare(&mut self, b: &Branch) -> Result<v1::PrepareResult, String> {
        self.prepare_as(b, false).await
    }

    async fn commit_as(
        &mut self,
        b: &Branch,
        one_phase: bool,
        may_be_empty: bool,
        metadata: &[u8],
    ) -> Result<v1::BranchResult, String> {
        let branch = v1::CommitBranch { xid: Some(self.xid(b)), one_phase, metadata: metadata.to_vec(), may_be_empty };
        let request = v1::CommitBranchesRequest { coordinator_id: self.coordinator(), branches: vec![branch] };
        let timeout = self.options.call_timeout;
        let mut results = match self.pipelined() {
            true => self.pipeline.commit(request, timeout).await.map_err(|e| status("commit (pipeline)", e))?.results,
            false => self.client.commit(request).await.map_err(|e| status("commit", e))?.into_inner().results,
        };
        ensure_eq!(results.len(), 1, "results for one branch");
        Ok(results.remove(0))
    }

    async fn commit(&mut self, b: &Branch, one_phase: bool, metadata: &[u8]) -> Result<v1::BranchResult, String> {
        self.commit_as(b, one_phase, false, metadata).await
    }

    async fn abort(&mut self, b: &Branch, metadata: &[u8]) -> Result<v1::BranchResult, String> {
        let branch = v1::AbortBranch { xid: Some(self.xid(b)), metadata: metadata.to_vec() };
        let request = v1::AbortBranchesRequest { coordinator_id: self.coordinator(), branches: vec![branch] };
        let timeout = self.options.call_timeout;
        let mut results = match self.pipelined() {
            true => self.pipeline.abort(request, timeout).await.map_err(|e| status("abort (pipeline)", e))?.results,
            false => self.client.abort(request).await.map_err(|e| status("abort", e))?.into_inner().results,
        };
        ensure_eq!(results.len(), 1, "results for one branch");
        Ok(results.remove(0))
    }

    /// The (gtid, branch, metadata) the participant lists as in doubt for `coordinator_id` at
    /// `resource`, fetched in pages of two so paging is exercised too.
    async fn recover_at(
        &mut self,
        coordinator_id: &str,
        resource: &str,
    ) -> Result<Vec<(String, String, Vec<u8>)>, String> {
        let mut all = Vec::new();
        let mut after = None;
        for _ in 0..10_000 {
            let r = self
                .client
                .recover(v1::RecoverRequest {
                    coordinator_id: coordinator_id.into(),
                    resource_ids: vec![resource.into()],
                    after: after.take(),
                    limit: 2,
                })
                .await
                .map_err(|e| status("recover", e))?
                .into_inner();
            ensure!(r.branches.len() <= 2, "a page held {} branches, above its limit of 2", r.branches.len());
            for b in r.branches {
                let x = b.xid.ok_or("an in-doubt branch without xid")?;
                ensure_eq!(x.resource_id, resource.to_string(), "recover listed another resource's branch");
                if let Some(previous) = &after {
                    let key = |x: &v1::BranchXid| (x.gtid.clone(), x.branch_id.clone());
                    ensure!(key(previous) < key(&x), "recover's pages are not in (gtid, branch) order");
                }
                all.push((x.gtid.clone(), x.branch_id.clone(), b.metadata));
                after = Some(x);
            }
            if !r.truncated {
                return Ok(all);
            }
            ensure!(after.is_some(), "a truncated page must not be empty");
        }
        Err("recover never ended its pages".into())
    }

    async fn recover(&mut self) -> Result<Vec<(String, String, Vec<u8>)>, String> {
        let (coordinator, resource) = (self.coordinator(), self.target.resource());
        self.recover_at(&coordinator, &resource).await
    }

    async fn listed(&mut self, b: &Branch) -> Result<usize, String> {
        Ok(self.recover().await?.iter().filter(|(g, br, _)| *g == b.gtid && *br == b.branch).count())
    }

    /// Whether work under `key` is visible, or becomes so within the suite's patience.
    async fn becomes_visible(&mut self, key: &str) -> Result<bool, String> {
        let deadline = tokio::time::Instant::now() + self.options.visibility_timeout;
        loop {
            if self.target.visible(key).await? {
                return Ok(true);
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn visible(&mut self, key: &str) -> Result<bool, String> {
        self.target.visible(key).await
    }

    /// Calls for many branches in flight together on one pipeline stream (as the coordinator
    /// sends them) each get their own answer; a malformed call gets INVALID_ARGUMENT and leaves
    /// the stream and the other calls alone.
    async fn pipelined_calls_in_flight_together_get_their_own_answers(&mut self) -> Check {
        // Four: a participant with a handful of producers or connections serves them at once.
        let mut branches = Vec::new();
        for _ in 0..4 {
            branches.push(self.branch_with_work("pipelined").await?);
        }
        let (xids, pipeline): (Vec<_>, _) = (branches.iter().map(|b| self.xid(b)).collect(), &self.pipeline);
        let (coordinator, timeout) = (self.options.coordinator_id.clone(), self.options.call_timeout);
        let prepare = |xid: v1::BranchXid| v1::PrepareRequest {
            coordinator_id: coordinator.clone(),
            branches: vec![v1::PrepareBranch { xid: Some(xid), may_be_empty: false, ..Default::default() }],
        };
        let prepares = xids.iter().map(|xid| pipeline.prepare(prepare(xid.clone()), timeout));
        let mut bad = xids[0].clone();
        bad.gtid = "not-a-gtid".into();
        let malformed = pipeline.prepare(prepare(bad), timeout);
        let (votes, malformed) = futures::join!(futures::future::join_all(prepares), malformed);
        match malformed {
            Err(e) if e.code() == tonic::Code::InvalidArgument => {}
            other => return Err(format!("a malformed gtid must be refused with INVALID_ARGUMENT, got {other:?}")),
        }
        let mut metadata = Vec::new();
        for (b, vote) in branches.iter().zip(votes) {
            let vote = vote.map_err(|e| status("prepare (pipeline)", e))?.results.remove(0);
            ensure_eq!(vote.vote(), Vote::Prepared, "prepare of {}: {}", b.branch, vote.reason);
            metadata.push(vote.metadata);
        }
        let commits = xids.iter().zip(&metadata).map(|(xid, metadata)| {
            let branch = v1::CommitBranch {
                xid: Some(xid.clone()),
                one_phase: false,
                metadata: metadata.clone(),
                may_be_empty: false,
            };
            pipeline.commit(
                v1::CommitBranchesRequest { coordinator_id: coordinator.clone(), branches: vec![branch] },
                timeout,
            )
        });
        for (b, result) in branches.iter().zip(futures::future::join_all(commits).await) {
            let result = result.map_err(|e| status("commit (pipeline)", e))?.results.remove(0);
            ensure_eq!(result.outcome(), BranchOutcome::Committed, "commit of {}: {}", b.branch, result.reason);
        }
        for b in &branches {
            ensure!(self.becomes_visible(&b.key).await?, "committed work of {} is not visible", b.branch);
        }
        Ok(())
    }

    async fn prepare_and_commit_are_idempotent(&mut self) -> Check {
        let b = self.branch_with_work("idempotent-commit").await?;
        let first = self.prepare(&b).await?;
        ensure_eq!(first.vote(), Vote::Prepared, "prepare: {}", first.reason);
        let again = self.prepare(&b).await?;
        ensure_eq!(
            (again.vote(), &again.metadata),
            (Vote::Prepared, &first.metadata),
            "a repeated prepare answers the same"
        );
        ensure_eq!(self.listed(&b).await?, 1, "a prepared branch is listed by recover, once");
        ensure!(!self.visible(&b.key).await?, "prepared work must not be visible before commit");
        for attempt in 0..2 {
            let r = self.commit(&b, false, &first.metadata).await?;
            ensure_eq!(r.outcome(), BranchOutcome::Committed, "commit attempt {attempt}: {}", r.reason);
        }
        ensure!(self.becomes_visible(&b.key).await?, "committed work is not visible");
        ensure_eq!(self.listed(&b).await?, 0, "a committed branch is no longer in doubt");
        let late = self.prepare(&b).await?;
        ensure!(late.vote() != Vote::Aborted, "a prepare repeated after the commit must not claim a rollback");
        Ok(())
    }

    async fn abort_is_idempotent(&mut self) -> Check {
        let b = self.branch_with_work("idempotent-abort").await?;
        let vote = self.prepare(&b).await?;
        ensure_eq!(vote.vote(), Vote::Prepared, "prepare: {}", vote.reason);
        for attempt in 0..2 {
            let r = self.abort(&b, &vote.metadata).await?;
            ensure_eq!(r.outcome(), BranchOutcome::Aborted, "abort attempt {attempt}: {}", r.reason);
        }
        ensure!(!self.visible(&b.key).await?, "aborted work must not be visible");
        ensure_eq!(self.listed(&b).await?, 0, "an aborted branch is not in doubt");
        Ok(())
    }

    async fn prepare_after_abort_is_refused(&mut self) -> Check {
        // With work done: the abort rolls it back, and the late prepare is refused.
        let b = self.branch_with_work("dangling").await?;
        ensure_eq!(self.abort(&b, &[]).await?.outcome(), BranchOutcome::Aborted, "abort of an active branch");
        ensure_eq!(self.prepare(&b).await?.vote(), Vote::Aborted, "a prepare after an abort");
        ensure!(!self.visible(&b.key).await?, "aborted work is visible");
        ensure_eq!(self.listed(&b).await?, 0, "listed in doubt after its abort");
        // Without any work seen before the abort (the abort overtook everything), even one
        // declared possibly empty.
        let unknown = self.new_branch("dangling-unknown");
        ensure_eq!(self.abort(&unknown, &[]).await?.outcome(), BranchOutcome::Aborted, "abort of an unknown branch");
        ensure_eq!(
            self.prepare_as(&unknown, true).await?.vote(),
            Vote::Aborted,
            "prepare after abort of an unknown branch"
        );
        Ok(())
    }

    async fn one_phase_commit_is_idempotent(&mut self) -> Check {
        let b = self.branch_with_work("one-phase").await?;
        for attempt in 0..2 {
            let r = self.commit(&b, true, &[]).await?;
            ensure_eq!(r.outcome(), BranchOutcome::Committed, "one-phase commit attempt {attempt}: {}", r.reason);
        }
        ensure!(self.becomes_visible(&b.key).await?, "committed work is not visible");
        ensure_eq!(self.listed(&b).await?, 0, "a committed branch is no longer in doubt");
        Ok(())
    }

    /// Silence is not consent: a prepare (or a one-phase commit) of a branch the participant has
    /// no record of is refused, and stays refused; the branch then takes no work either.
    async fn a_branch_never_seen_votes_no(&mut self) -> Check {
        let b = self.new_branch("never-seen");
        let vote = self.prepare(&b).await?;
        ensure_eq!(vote.vote(), Vote::Aborted, "prepare of a branch never seen");
        ensure_eq!(self.prepare(&b).await?.vote(), Vote::Aborted, "the same prepare again");
        ensure!(
            self.target.work(&b.gtid, &b.branch, &b.key).await.is_err(),
            "work in a branch that voted no was taken"
        );
        ensure!(!self.visible(&b.key).await?, "work of a branch that voted no is visible");
        let b = self.new_branch("never-seen-one-phase");
        let r = self.commit(&b, true, &[]).await?;
        ensure_eq!(r.outcome(), BranchOutcome::Aborted, "one-phase commit of a branch never seen");
        ensure_eq!(self.commit(&b, true, &[]).await?.outcome(), BranchOutcome::Aborted, "the same commit again");
        Ok(())
    }

    /// A branch the client declared possibly empty, never seen here, votes read-only (and a
    /// one-phase commit of it commits nothing), and a repeated request gets the same answer.
    async fn a_branch_declared_possibly_empty_votes_read_only(&mut self) -> Check {
        let b = self.new_branch("maybe-empty");
        ensure_eq!(self.prepare_as(&b, true).await?.vote(), Vote::ReadOnly, "prepare of an empty branch declared so");
        ensure_eq!(self.prepare_as(&b, true).await?.vote(), Vote::ReadOnly, "the same prepare again");
        ensure_eq!(self.listed(&b).await?, 0, "a read-only branch is not in doubt");
        let b = self.new_branch("maybe-empty-one-phase");
        let r = self.commit_as(&b, true, true, &[]).await?;
        ensure_eq!(r.outcome(), BranchOutcome::Committed, "one-phase commit of an empty branch declared so");
        // Work does not need the flag: a branch that did work prepares as usual with it.
        let b = self.branch_with_work("maybe-empty-with-work").await?;
        let vote = self.prepare_as(&b, true).await?;
        ensure_eq!(vote.vote(), Vote::Prepared, "prepare of a branch with work, declared possibly empty");
        ensure_eq!(self.commit(&b, false, &vote.metadata).await?.outcome(), BranchOutcome::Committed, "its commit");
        ensure!(self.becomes_visible(&b.key).await?, "its work is not visible");
        Ok(())
    }

    /// A two-phase commit of a branch the participant never prepared (it lost its record, or
    /// the coordinator is confused) must not be answered "committed": nothing proves it.
    async fn a_commit_nothing_proves_is_never_reported_committed(&mut self) -> Check {
        let b = self.new_branch("unproven");
        let r = self.commit(&b, false, &[]).await?;
        ensure!(
            r.outcome() != BranchOutcome::Committed,
            "a commit of a branch never prepared here was answered COMMITTED"
        );
        ensure!(
            r.outcome() != BranchOutcome::Retry,
            "a commit of a branch never prepared here must get an answer, not RETRY: {}",
            r.reason
        );
        Ok(())
    }

    async fn recover_lists_exactly_the_prepared_branches_per_resource_and_page(&mut self) -> Check {
        // At most four branches open at once (a participant may hold a connection or a
        // producer for each).
        let committed = self.branch_with_work("recover-committed").await?;
        let aborted = self.branch_with_work("recover-aborted").await?;
        for b in [&committed, &aborted] {
            let vote = self.prepare(b).await?;
            ensure_eq!(vote.vote(), Vote::Prepared, "prepare of {}: {}", b.branch, vote.reason);
        }
        self.commit(&committed, false, &[]).await?;
        self.abort(&aborted, &[]).await?;
        let prepared_1 = self.branch_with_work("recover-p1").await?;
        let prepared_2 = self.branch_with_work("recover-p2").await?;
        let prepared_3 = self.branch_with_work("recover-p3").await?;
        let active = self.branch_with_work("recover-active").await?;
        for b in [&prepared_1, &prepared_2, &prepared_3] {
            let vote = self.prepare(b).await?;
            ensure_eq!(vote.vote(), Vote::Prepared, "prepare of {}: {}", b.branch, vote.reason);
        }
        let all = [&prepared_1, &prepared_2, &prepared_3, &active, &committed, &aborted];
        let ours: Vec<String> = all.iter().map(|b| b.gtid.clone()).collect();
        let mut listed: Vec<String> =
            self.recover().await?.into_iter().map(|(g, _, _)| g).filter(|g| ours.contains(g)).collect();
        listed.sort();
        let mut want = vec![prepared_1.gtid.clone(), prepared_2.gtid.clone(), prepared_3.gtid.clone()];
        want.sort();
        ensure_eq!(listed, want, "recover must list exactly the prepared branches");
        let resource = self.target.resource();
        let other = self.recover_at("another-coordinator", &resource).await?;
        ensure!(other.iter().all(|(g, _, _)| !ours.contains(g)), "branches of one coordinator were listed to another");
        // Another resource's listing holds none of this resource's branches (a participant that
        // does not serve it may refuse the call instead).
        let coordinator = self.coordinator();
        if let Ok(elsewhere) = self.recover_at(&coordinator, "conformance-no-such-resource").await {
            ensure!(elsewhere.is_empty(), "a resource this participant does not serve listed branches");
        }
        // Leave nothing in doubt.
        for b in [&prepared_1, &prepared_2, &prepared_3, &active] {
            self.abort(b, &[]).await?;
        }
        Ok(())
    }

    /// The coordinator's deadline may cut a Prepare call short; the participant must still end
    /// up in a consistent state: the abort that follows rolls the branch back, and recover
    /// does not list it.
    async fn a_prepare_whose_call_gave_up_still_ends_cleanly(&mut self) -> Check {
        let b = self.branch_with_work("prepare-deadline").await?;
        let branches = vec![v1::PrepareBranch { xid: Some(self.xid(&b)), may_be_empty: false, ..Default::default() }];
        let mut request = tonic::Request::new(v1::PrepareRequest { coordinator_id: self.coordinator(), branches });
        request.set_timeout(Duration::from_millis(1));
        let _ = self.client.prepare(request).await; // may or may not have finished
        let r = self.abort(&b, &[]).await?;
        ensure_eq!(r.outcome(), BranchOutcome::Aborted, "abort after a cut-short prepare: {}", r.reason);
        ensure_eq!(self.listed(&b).await?, 0, "left in doubt");
        ensure!(!self.visible(&b.key).await?, "aborted work is visible");
        ensure_eq!(self.prepare(&b).await?.vote(), Vote::Aborted, "a prepare after the abort");

        // The same over the pipeline, whose deadline is the caller's alone.
        let b = self.branch_with_work("prepare-deadline-pipelined").await?;
        let branches = vec![v1::PrepareBranch { xid: Some(self.xid(&b)), may_be_empty: false, ..Default::default() }];
        let request = v1::PrepareRequest { coordinator_id: self.coordinator(), branches };
        let _ = self.pipeline.prepare(request, Duration::from_millis(1)).await;
        let r = self.abort(&b, &[]).await?;
        ensure_eq!(r.outcome(), BranchOutcome::Aborted, "abort after a cut-short pipelined prepare: {}", r.reason);
        ensure_eq!(self.listed(&b).await?, 0, "left in doubt");
        ensure!(!self.visible(&b.key).await?, "aborted work is visible");
        Ok(())
    }

    async fn commit_survives_a_restart(&mut self) -> Check {
        let b = self.branch_with_work("restart-commit").await?;
        let vote = self.prepare(&b).await?;
        ensure_eq!(vote.vote(), Vote::Prepared, "prepare: {}", vote.reason);
        self.restart().await?;
        let listed = self.recover().await?;
        let entry = listed.iter().find(|(g, br, _)| *g == b.gtid && *br == b.branch);
        let entry = entry.ok_or("a prepared branch did not survive a kill -9 (recover does not list it)")?;
        ensure_eq!(entry.2, vote.metadata, "recover hands back the vote's metadata");
        let r = self.commit(&b, false, &vote.metadata).await?;
        ensure_eq!(r.outcome(), BranchOutcome::Committed, "commit after restart: {}", r.reason);
        ensure!(self.becomes_visible(&b.key).await?, "committed work is not visible");
        self.restart().await?;
        ensure!(self.becomes_visible(&b.key).await?, "a commit did not survive a restart");
        // New work prepared in between (on whatever the participant reuses: a connection, a
        // producer) must not be touched by a repeated commit of the old branch.
        let next = self.branch_with_work("restart-commit-next").await?;
        let next_vote = self.prepare(&next).await?;
        ensure_eq!(next_vote.vote(), Vote::Prepared, "prepare after restart: {}", next_vote.reason);
        let r = self.commit(&b, false, &vote.metadata).await?;
        ensure_eq!(r.outcome(), BranchOutcome::Committed, "repeated commit after restart: {}", r.reason);
        ensure_eq!(self.listed(&b).await?, 0, "still in doubt after its commit");
        let r = self.commit(&next, false, &next_vote.metadata).await?;
        ensure_eq!(r.outcome(), BranchOutcome::Committed, "the other branch's commit: {}", r.reason);
        ensure!(self.becomes_visible(&next.key).await?, "the other branch's work is not visible");
        Ok(())
    }

    async fn abort_survives_a_restart(&mut self) -> Check {
        let b = self.branch_with_work("restart-abort").await?;
        let vote = self.prepare(&b).await?;
        ensure_eq!(vote.vote(), Vote::Prepared, "prepare: {}", vote.reason);
        self.restart().await?;
        ensure_eq!(self.abort(&b, &vote.metadata).await?.outcome(), BranchOutcome::Aborted, "abort after restart");
        self.restart().await?;
        ensure_eq!(self.listed(&b).await?, 0, "an abort did not survive a restart");
        ensure!(!self.visible(&b.key).await?, "aborted work is visible");
        ensure_eq!(self.prepare(&b).await?.vote(), Vote::Aborted, "a prepare after the abort, after a restart");
        ensure_eq!(self.abort(&b, &vote.metadata).await?.outcome(), BranchOutcome::Aborted, "a repeated abort");
        Ok(())
    }

    /// Every answer given is given again after a kill -9: a two-phase and a one-phase commit
    /// (its first answer lost, the coordinator asks again), a read-only vote, a no.
    async fn answers_survive_a_restart(&mut self) -> Check {
        let two_phase = self.branch_with_work("answers-2pc").await?;
        let vote = self.prepare(&two_phase).await?;
        ensure_eq!(vote.vote(), Vote::Prepared, "prepare: {}", vote.reason);
        ensure_eq!(self.commit(&two_phase, false, &vote.metadata).await?.outcome(), BranchOutcome::Committed, "commit");
        let one_phase = self.branch_with_work("answers-1pc").await?;
        let r = self.commit(&one_phase, true, &[]).await?;
        ensure_eq!(r.outcome(), BranchOutcome::Committed, "one-phase commit: {}", r.reason);
        let read_only = self.new_branch("answers-read-only");
        ensure_eq!(self.prepare_as(&read_only, true).await?.vote(), Vote::ReadOnly, "prepare of an empty branch");
        let refused = self.new_branch("answers-refused");
        ensure_eq!(self.prepare(&refused).await?.vote(), Vote::Aborted, "prepare of a branch never seen");
        self.restart().await?;
        let r = self.commit(&two_phase, false, &vote.metadata).await?;
        ensure_eq!(r.outcome(), BranchOutcome::Committed, "a repeated commit after a restart: {}", r.reason);
        ensure!(
            self.prepare(&two_phase).await?.vote() != Vote::Aborted,
            "a repeated prepare of a committed branch claims a rollback"
        );
        let r = self.commit(&one_phase, true, &[]).await?;
        ensure_eq!(r.outcome(), BranchOutcome::Committed, "a repeated one-phase commit after a restart: {}", r.reason);
        ensure_eq!(self.prepare_as(&read_only, true).await?.vote(), Vote::ReadOnly, "a repeated read-only vote");
        ensure_eq!(
            self.prepare_as(&refused, true).await?.vote(),
            Vote::Aborted,
            "a repeated no, even declared possibly empty now"
        );
        ensure!(self.becomes_visible(&one_phase.key).await?, "the one-phase commit's work is not visible");
        Ok(())
    }

    /// Work done before a participant restart may be lost with it: that branch must never vote
    /// PREPARED (nor READ_ONLY), or the transaction would commit without it; more work in it is
    /// refused too (it would commit half of the branch).
    async fn work_lost_in_a_restart_is_never_prepared(&mut self) -> Check {
        let b = self.branch_with_work("lost-work").await?;
        self.restart().await?;
        let more = self.target.work(&b.gtid, &b.branch, &format!("{}-more", b.key)).await;
        ensure!(more.is_err(), "more work in a branch whose work was lost in a restart was taken");
        let vote = self.prepare_as(&b, true).await?;
        ensure_eq!(vote.vote(), Vote::Aborted, "work from before a restart: {}", vote.reason);
        ensure!(!self.visible(&b.key).await?, "lost work is visible");
        Ok(())
    }
}
