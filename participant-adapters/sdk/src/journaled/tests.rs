//! The contract around a resource, with an in-memory fake [`Resource`] (what it was asked, and
//! what it answers) over a real journal in a temporary directory. A "restart" reopens the
//! journal under a fresh participant, as a process started after kill -9 would.

use std::sync::{Arc, Mutex};

use pledge_proto::{Gtid, ResourceId, Xid};

use super::*;
use crate::journal::JournalConfig;

#[derive(Default)]
struct Fake {
    /// Every call, in order.
    calls: Mutex<Vec<String>>,
    /// What `commit_one_phase` answers.
    one_phase: Mutex<Option<OnePhase>>,
    /// What `resolve` answers.
    resolved: Mutex<Option<Option<Outcome>>>,
    /// What `finish` answers.
    finish: Mutex<Option<Outcome>>,
}

impl Fake {
    fn called(&self, what: String) {
        self.calls.lock().unwrap().push(what);
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

#[tonic::async_trait]
impl Resource for Arc<Fake> {
    type Open = ();

    fn serves(&self, resource: &ResourceId) -> bool {
        resource.as_str() == "db"
    }

    fn resources(&self) -> Vec<ResourceId> {
        vec!["db".parse().unwrap()]
    }

    async fn open(&self, xid: &Xid) -> Result<(), BranchError> {
        self.called(format!("open {}", xid.branch));
        Ok(())
    }

    async fn seal(&self, _: &str, xid: &Xid, _: &mut ()) -> Sealed {
        self.called(format!("seal {}", xid.branch));
        Sealed::Ready { metadata: format!("meta-{}", xid.branch).into_bytes() }
    }

    async fn prepare(&self, _: &str, xid: &Xid, _: (), metadata: &[u8]) -> Result<(), String> {
        self.called(format!("prepare {} {}", xid.branch, String::from_utf8_lossy(metadata)));
        Ok(())
    }

    async fn commit_one_phase(&self, xid: &Xid, _: (), metadata: &[u8]) -> OnePhase {
        self.called(format!("commit_one_phase {} {}", xid.branch, String::from_utf8_lossy(metadata)));
        self.one_phase.lock().unwrap().clone().unwrap_or(OnePhase::Committed)
    }

    async fn rollback(&self, xid: &Xid, _: ()) {
        self.called(format!("rollback {}", xid.branch));
    }

    async fn finish(
        &self,
        _: &str,
        xid: &Xid,
        metadata: &[u8],
        commit: bool,
        recorded: bool,
    ) -> Result<Outcome, Error> {
        let m = String::from_utf8_lossy(metadata);
        self.called(format!("finish {} commit={commit} recorded={recorded} {m}", xid.branch));
        Ok(self.finish.lock().unwrap().clone().unwrap_or(match commit {
            true => Outcome::Committed,
            false => Outcome::Aborted { reason: String::new() },
        }))
    }

    async fn resolve(&self, xid: &Xid, metadata: &[u8]) -> Result<Option<Outcome>, Error> {
        self.called(format!("resolve {} {}", xid.branch, String::from_utf8_lossy(metadata)));
        Ok(self.resolved.lock().unwrap().clone().unwrap_or(Some(Outcome::Committed)))
    }

    fn finished(&self, xid: &Xid) {
        self.called(format!("finished {}", xid.branch));
    }
}

struct Rig {
    dir: tempfile::TempDir,
    fake: Arc<Fake>,
    participant: Journaled<Arc<Fake>>,
    log: Option<pledge_log::Log>,
}

impl Rig {
    async fn new() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let (fake, participant, log) = Rig::start(dir.path()).await;
        Rig { dir, fake, participant, log: Some(log) }
    }

    async fn start(dir: &std::path::Path) -> (Arc<Fake>, Journaled<Arc<Fake>>, pledge_log::Log) {
        let (journal, log) = Journal::open(JournalConfig::new(dir.join("journal"))).await.unwrap();
        let fake = Arc::new(Fake::default());
        (fake.clone(), Journaled::new(fake, journal, Duration::from_secs(60)), log)
    }

    /// kill -9 and start again: the journal is reopened from what is on disk.
    async fn restart(&mut self) {
        self.log.take().unwrap().shutdown().await.unwrap();
        let (fake, participant, log) = Rig::start(self.dir.path()).await;
        (self.fake, self.participant, self.log) = (fake, participant, Some(log));
    }

    async fn work(&self, x: &Xid) -> Result<(), BranchError> {
        self.participant.branch(x).await.map(drop)
    }
}

fn xid(branch: &str) -> Xid {
    Xid { resource: "db".parse().unwrap(), gtid: Gtid::new_v7(), branch: branch.parse().unwrap() }
}

fn aborted(vote: &Vote) -> bool {
    matches!(vote, Vote::Aborted { .. })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_never_seen_votes_no_unless_it_may_be_empty() {
    let rig = Rig::new().await;
    let (unknown, empty) = (xid("unknown"), xid("empty"));
    let p = &rig.participant;
    assert!(aborted(&p.prepare("c", &unknown, false).await.unwrap()));
    assert!(aborted(&p.prepare("c", &unknown, true).await.unwrap()), "the first answer stands");
    assert!(matches!(rig.work(&unknown).await, Err(BranchError::Finished { .. })), "and no more work");
    assert_eq!(p.prepare("c", &empty, true).await.unwrap(), Vote::ReadOnly);
    let one_phase = xid("one-phase");
    let r = p.commit("c", &one_phase, CommitKind::OnePhase { may_be_empty: false }, &[]).await.unwrap();
    assert!(matches!(r, Outcome::Aborted { .. }), "{r:?}");
    let r = p.commit("c", &xid("one-phase-empty"), CommitKind::OnePhase { may_be_empty: true }, &[]).await.unwrap();
    assert_eq!(r, Outcome::Committed);
    assert!(
        rig.fake.calls().iter().all(|c| c.starts_with("finished")),
        "nothing was asked of the resource: {:?}",
        rig.fake.calls()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_lost_in_a_restart_is_refused_and_its_prepare_votes_no() {
    let mut rig = Rig::new().await;
    let x = xid("lost");
    rig.work(&x).await.unwrap();
    rig.restart().await;
    assert!(matches!(rig.work(&x).await, Err(BranchError::Finished { .. })));
    assert!(aborted(&rig.participant.prepare("c", &x, true).await.unwrap()));
}

/// The one-phase commit's answer lost (the resource cannot say at once): the resource is asked
/// how it ended, and the answer is kept; after a restart it is given again without asking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_phase_commit_whose_answer_was_lost_is_resolved_by_the_resource() {
    let mut rig = Rig::new().await;
    let x = xid("b");
    rig.work(&x).await.unwrap();
    *rig.fake.one_phase.lock().unwrap() = Some(OnePhase::Unknown { error: "connection lost".into() });
    *rig.fake.resolved.lock().unwrap() = Some(None); // cannot tell yet
    let one_phase = CommitKind::OnePhase { may_be_empty: false };
    assert!(rig.participant.commit("c", &x, one_phase, &[]).await.is_err(), "no answer until the resource tells");
    *rig.fake.resolved.lock().unwrap() = Some(Some(Outcome::Committed));
    assert_eq!(rig.participant.commit("c", &x, one_phase, &[]).await.unwrap(), Outcome::Committed);
    let calls = rig.fake.calls();
    assert_eq!(
        calls,
        ["open b", "seal b", "commit_one_phase b meta-b", "resolve b meta-b", "resolve b meta-b", "finished b"],
        "the seal is recorded before the commit is sent, and resolves it"
    );
    rig.restart().await;
    assert_eq!(rig.participant.commit("c", &x, one_phase, &[]).await.unwrap(), Outcome::Committed);
    assert!(rig.fake.calls().is_empty(), "answered from the journal: {:?}", rig.fake.calls());
}

/// Killed after the one-phase commit was recorded as on its way (and maybe sent): after the
/// restart, the repeated commit asks the resource; it never says "aborted" on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_phase_commit_cut_by_a_crash_is_resolved_after_the_restart() {
    let mut rig = Rig::new().await;
    let x = xid("b");
    rig.participant.journal().committing(&x, "c", b"meta-b").await.unwrap();
    rig.restart().await;
    let r = rig.participant.commit("c", &x, CommitKind::OnePhase { may_be_empty: false }, &[]).await.unwrap();
    assert_eq!(r, Outcome::Committed);
    assert_eq!(rig.fake.calls(), ["resolve b meta-b", "finished b"]);
}

/// A two-phase commit of a branch the journal has no record of (a lost data directory) goes
/// to the resource with the coordinator's metadata, marked unrecorded: the resource says what
/// it can prove. An abort of it is recorded, so a late prepare is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unrecorded_branch_is_finished_by_the_resource_with_the_coordinators_metadata() {
    let rig = Rig::new().await;
    let (x, y) = (xid("x"), xid("y"));
    *rig.fake.finish.lock().unwrap() = Some(Outcome::HeuristicHazard { reason: "nothing tells".into() });
    let r = rig.participant.commit("c", &x, CommitKind::TwoPhase, b"meta-x").await.unwrap();
    assert!(matches!(r, Outcome::HeuristicHazard { .. }), "{r:?}");
    *rig.fake.finish.lock().unwrap() = None;
    assert!(matches!(rig.participant.abort("c", &y, b"meta-y").await.unwrap(), Outcome::Aborted { .. }));
    assert!(aborted(&rig.participant.prepare("c", &y, false).await.unwrap()));
    assert_eq!(
        rig.fake.calls(),
        [
            "finish x commit=true recorded=false meta-x",
            "finished x",
            "finish y commit=false recorded=false meta-y",
            "finished y"
        ]
    );
}

/// Prepared, committed, then asked again after a restart: the first answer, without the
/// resource; prepared and aborted, asked to abort again: the resource is told to roll back
/// again (a prepare whose vote was lost may have left it prepared there), and the answer stands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_are_given_again_and_an_abort_is_repeated_at_the_resource() {
    let mut rig = Rig::new().await;
    let (c, a) = (xid("c"), xid("a"));
    for x in [&c, &a] {
        rig.work(x).await.unwrap();
        let vote = rig.participant.prepare("coord", x, false).await.unwrap();
        assert_eq!(vote, Vote::Prepared { metadata: format!("meta-{}", x.branch).into_bytes() });
    }
    assert_eq!(rig.participant.commit("coord", &c, CommitKind::TwoPhase, b"meta-c").await.unwrap(), Outcome::Committed);
    assert!(matches!(rig.participant.abort("coord", &a, b"meta-a").await.unwrap(), Outcome::Aborted { .. }));
    rig.restart().await;
    assert_eq!(rig.participant.commit("coord", &c, CommitKind::TwoPhase, b"meta-c").await.unwrap(), Outcome::Committed);
    assert!(matches!(rig.participant.prepare("coord", &c, false).await.unwrap(), Vote::Prepared { .. }));
    assert!(matches!(rig.participant.abort("coord", &a, b"meta-a").await.unwrap(), Outcome::Aborted { .. }));
    assert_eq!(rig.fake.calls(), ["finish a commit=false recorded=false meta-a"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recover_merges_the_journal_and_the_resource_per_resource_in_order() {
    let rig = Rig::new().await;
    let mut prepared = Vec::new();
    for b in ["p1", "p2", "p3"] {
        let x = xid(b);
        rig.work(&x).await.unwrap();
        rig.participant.prepare("coord", &x, false).await.unwrap();
        prepared.push(x);
    }
    let query = |after: Option<Xid>| RecoverQuery { resources: vec![], after, limit: 2 };
    let first = rig.participant.recover("coord", &query(None)).await.unwrap();
    assert!(first.truncated);
    let second = rig.participant.recover("coord", &query(first.branches.last().map(|b| b.xid.clone()))).await.unwrap();
    assert!(!second.truncated);
    let listed: Vec<Xid> = first.branches.iter().chain(&second.branches).map(|b| b.xid.clone()).collect();
    prepared.sort();
    assert_eq!(listed, prepared);
    assert_eq!(second.branches[0].metadata, format!("meta-{}", prepared[2].branch).into_bytes());
    let other = rig.participant.recover("another", &query(None)).await.unwrap();
    assert!(other.branches.is_empty());
    let elsewhere = RecoverQuery { resources: vec!["nope".parse().unwrap()], after: None, limit: 2 };
    assert!(rig.participant.recover("coord", &elsewhere).await.is_err(), "a resource not served is refused");
}

// Three-phase commit.

use crate::{BranchState, BranchStatus, ThreePhase, ThreePhaseError};

/// Polls QueryState until `xid` is `want` (bounded), and returns what it said.
async fn becomes(p: &Journaled<Arc<Fake>>, x: &Xid, want: BranchState) -> BranchStatus {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = p.query_state("coord", 1, x).await.unwrap();
        if status.state == want {
            return status;
        }
        assert!(Instant::now() < deadline, "{x} is still {status:?}, not {want:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A yes vote and its wait deadline: prepared (listed by Recover) until the deadline, then
/// rolled back at the resource and recorded aborted with the reason; a PreCommit or Commit
/// after that hears ABORTED, never pre-commits or commits it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_yes_vote_with_no_pre_commit_aborts_itself_at_its_wait_deadline() {
    let rig = Rig::new().await;
    let (p, x) = (&rig.participant, xid("w"));
    rig.work(&x).await.unwrap();
    let before = crate::journal::now_ms();
    let vote = p.can_commit("coord", &x, false, 400).await.unwrap();
    assert_eq!(vote, Vote::Prepared { metadata: b"meta-w".to_vec() });
    let status = p.query_state("coord", 1, &x).await.unwrap();
    assert_eq!(status.state, BranchState::Prepared);
    assert!((before + 400..before + 1_000).contains(&status.deadline_unix_ms), "{status:?}");
    let query = RecoverQuery { resources: vec![], after: None, limit: 10 };
    assert_eq!(p.recover("coord", &query).await.unwrap().branches.len(), 1, "in doubt while it waits");
    let aborted = becomes(p, &x, BranchState::Aborted).await;
    assert!(crate::journal::now_ms() >= status.deadline_unix_ms, "not before its deadline");
    assert_eq!(aborted.reason, "no PreCommit within 400 ms");
    assert!(p.recover("coord", &query).await.unwrap().branches.is_empty());
    let r = p.pre_commit("coord", 1, &x, b"meta-w", 5_000).await.unwrap();
    assert_eq!((r.state, r.reason.as_str()), (BranchState::Aborted, "no PreCommit within 400 ms"));
    let r = p.commit("coord", &x, CommitKind::TwoPhase, b"meta-w").await.unwrap();
    assert!(matches!(r, Outcome::Aborted { .. }), "{r:?}");
    assert_eq!(
        rig.fake.calls(),
        ["open w", "seal w", "prepare w meta-w", "finish w commit=false recorded=true meta-w", "finished w"],
        "rolled back at the resource once, with the branch's own record"
    );
}

/// PreCommit: PRECOMMITTED with a do-commit deadline; repeated, the same deadline (not
/// extended). Killed before the deadline and started again after it, the participant commits
/// the branch at once; a DoCommit then hears COMMITTED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pre_committed_branch_commits_itself_and_its_deadline_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, p, log) = Rig::start(dir.path()).await;
    let (x, waiting) = (xid("p"), xid("w"));
    for b in [&x, &waiting] {
        p.branch(b).await.unwrap();
        assert!(matches!(p.can_commit("coord", b, false, 300).await.unwrap(), Vote::Prepared { .. }));
    }
    let before = crate::journal::now_ms();
    let first = p.pre_commit("coord", 1, &x, b"meta-p", 600).await.unwrap();
    assert_eq!(first.state, BranchState::PreCommitted);
    assert!((before + 600..before + 1_200).contains(&first.deadline_unix_ms), "{first:?}");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let again = p.pre_commit("coord", 1, &x, b"meta-p", 600).await.unwrap();
    assert_eq!(again, first, "a repeated PreCommit: the same answer, the deadline not extended");
    let query = RecoverQuery { resources: vec![], after: None, limit: 10 };
    let listed: Vec<Xid> = p.recover("coord", &query).await.unwrap().branches.into_iter().map(|b| b.xid).collect();
    assert!(listed.contains(&x) && listed.contains(&waiting), "pre-committed and prepared are in doubt: {listed:?}");
    // kill -9, and down past both deadlines.
    drop(p);
    log.shutdown().await.unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(fake.calls().iter().all(|c| !c.starts_with("finish ")), "{:?}", fake.calls());
    let (fake, p, log) = Rig::start(dir.path()).await;
    becomes(&p, &x, BranchState::Committed).await;
    let aborted = becomes(&p, &waiting, BranchState::Aborted).await;
    assert_eq!(aborted.reason, "no PreCommit within 300 ms");
    let mut calls = fake.calls();
    calls.sort();
    assert_eq!(
        calls,
        [
            "finish p commit=true recorded=true meta-p",
            "finish w commit=false recorded=true meta-w",
            "finished p",
            "finished w"
        ]
    );
    assert_eq!(p.commit("coord", &x, CommitKind::TwoPhase, b"meta-p").await.unwrap(), Outcome::Committed);
    let r = p.pre_commit("coord", 1, &x, b"meta-p", 600).await.unwrap();
    assert_eq!(r.state, BranchState::Committed);
    drop(p);
    log.shutdown().await.unwrap();
}

/// A do-commit deadline sooner than the wait deadline is kept too (by a live participant).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_do_commit_deadline_before_the_wait_deadline_is_kept() {
    let rig = Rig::new().await;
    let (p, x) = (&rig.participant, xid("soon"));
    rig.work(&x).await.unwrap();
    p.can_commit("coord", &x, false, 60_000).await.unwrap();
    let r = p.pre_commit("coord", 1, &x, b"meta-soon", 300).await.unwrap();
    assert_eq!(r.state, BranchState::PreCommitted);
    becomes(p, &x, BranchState::Committed).await;
    assert!(crate::journal::now_ms() >= r.deadline_unix_ms);
    assert!(rig.fake.calls().contains(&"finish soon commit=true recorded=true meta-soon".to_string()));
}

/// The highest epoch answered is recorded before the answer, survives a restart, and fences
/// PreCommits from lower epochs; an equal epoch (a retry) is fine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pre_commit_from_an_epoch_lower_than_one_answered_is_refused() {
    let mut rig = Rig::new().await;
    let x = xid("e");
    rig.work(&x).await.unwrap();
    rig.participant.can_commit("coord", &x, false, 60_000).await.unwrap();
    assert_eq!(rig.participant.query_state("coord", 5, &x).await.unwrap().state, BranchState::Prepared);
    let stale = rig.participant.pre_commit("coord", 4, &x, b"", 60_000).await;
    assert_eq!(stale, Err(ThreePhaseError::StaleEpoch { asked: 4, answered: 5 }));
    rig.restart().await;
    let p = &rig.participant;
    let stale = p.pre_commit("coord", 4, &x, b"", 60_000).await;
    assert_eq!(stale, Err(ThreePhaseError::StaleEpoch { asked: 4, answered: 5 }), "after a restart too");
    assert_eq!(p.query_state("coord", 1, &x).await.unwrap().state, BranchState::Prepared, "refused: unchanged");
    let r = p.pre_commit("coord", 5, &x, b"", 60_000).await.unwrap();
    assert_eq!(r.state, BranchState::PreCommitted);
    assert_eq!(p.pre_commit("coord", 5, &x, b"", 60_000).await.unwrap(), r, "the same epoch again: a retry");
    p.query_state("coord", 8, &x).await.unwrap();
    let stale = p.pre_commit("coord", 7, &x, b"", 60_000).await;
    assert_eq!(stale, Err(ThreePhaseError::StaleEpoch { asked: 7, answered: 8 }), "a pre-committed branch too");
}

/// Abort of a pre-committed branch commits it (its only way forward) and says so; Abort of a
/// three-phase prepared one rolls it back as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_of_a_pre_committed_branch_commits_it() {
    let rig = Rig::new().await;
    let (p, pc, w) = (&rig.participant, xid("pc"), xid("w"));
    for x in [&pc, &w] {
        rig.work(x).await.unwrap();
        p.can_commit("coord", x, false, 60_000).await.unwrap();
    }
    p.pre_commit("coord", 1, &pc, b"meta-pc", 60_000).await.unwrap();
    assert_eq!(p.abort("coord", &pc, b"meta-pc").await.unwrap(), Outcome::Committed);
    assert_eq!(p.abort("coord", &pc, b"meta-pc").await.unwrap(), Outcome::Committed, "repeated");
    assert_eq!(p.query_state("coord", 1, &pc).await.unwrap().state, BranchState::Committed);
    assert!(matches!(p.abort("coord", &w, b"meta-w").await.unwrap(), Outcome::Aborted { .. }));
    let calls: Vec<String> = rig.fake.calls().into_iter().filter(|c| c.starts_with("finish ")).collect();
    assert_eq!(calls, ["finish pc commit=true recorded=true meta-pc", "finish w commit=false recorded=true meta-w"]);
}

/// PreCommit never creates a branch (UNKNOWN), and refuses a branch prepared under two-phase
/// commit or not prepared; QueryState tells every state; a two-phase and a three-phase Prepare
/// of the same branch do not mix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pre_commit_refuses_what_did_not_vote_yes_in_three_phase_and_creates_nothing() {
    let rig = Rig::new().await;
    let p = &rig.participant;
    let unknown = xid("unknown");
    let r = p.pre_commit("coord", 1, &unknown, b"", 1_000).await.unwrap();
    assert_eq!(r.state, BranchState::Unknown);
    assert_eq!(p.journal().state(&unknown).await, None, "nothing recorded");
    let (two, active, three) = (xid("two"), xid("active"), xid("three"));
    for x in [&two, &active, &three] {
        rig.work(x).await.unwrap();
    }
    assert_eq!(p.query_state("coord", 1, &active).await.unwrap().state, BranchState::Active);
    p.prepare("coord", &two, false).await.unwrap();
    let r = p.query_state("coord", 1, &two).await.unwrap();
    assert_eq!((r.state, r.deadline_unix_ms), (BranchState::Prepared, 0), "two-phase: no deadline");
    for x in [&two, &active] {
        let r = p.pre_commit("coord", 1, x, b"", 1_000).await;
        assert!(matches!(r, Err(ThreePhaseError::NotThreePhase { .. })), "{x}: {r:?}");
    }
    assert!(p.can_commit("coord", &two, false, 1_000).await.is_err(), "a three-phase Prepare of a two-phase yes");
    p.can_commit("coord", &three, false, 60_000).await.unwrap();
    assert!(p.prepare("coord", &three, false).await.is_err(), "a two-phase Prepare of a three-phase yes");
    assert!(matches!(p.can_commit("coord", &three, false, 60_000).await.unwrap(), Vote::Prepared { .. }));
    assert_eq!(p.commit("coord", &three, CommitKind::TwoPhase, b"").await.unwrap(), Outcome::Committed, "DoCommit");
    assert_eq!(p.query_state("coord", 1, &three).await.unwrap().state, BranchState::Committed);
}
