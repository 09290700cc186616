//! The reference participant's three-phase commit against its real log in a temporary
//! directory: a "restart" stops the actor and opens the data directory again (every answer is
//! synced before it is given, so this is what a kill -9 leaves).

use std::path::Path;

use super::*;

fn open(dir: &Path, checkpoint_every_records: u64) -> (ReferenceParticipant, ReferenceHandle) {
    let mut config = ReferenceConfig::new("ref".parse().unwrap(), dir);
    config.checkpoint_every_records = checkpoint_every_records;
    tokio::task::block_in_place(|| ReferenceParticipant::open(config)).unwrap()
}

async fn stop(p: ReferenceParticipant, handle: ReferenceHandle) {
    drop(p);
    handle.shutdown().await.unwrap();
}

/// A branch with a write of `key` in it.
async fn branch(p: &ReferenceParticipant, name: &str, key: &str) -> Xid {
    let x = Xid { resource: "ref".parse().unwrap(), gtid: Gtid::new_v7(), branch: name.parse().unwrap() };
    p.put(x.gtid, x.branch.clone(), key.into(), Bytes::from_static(b"v")).await.unwrap();
    x
}

/// Pre-committed and waiting branches, their deadlines and the epochs answered come back as
/// they were after restarts, through checkpoints too (one after every record here); an Abort
/// of the pre-committed one then commits it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_phase_states_survive_restarts_and_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let (p, handle) = open(dir.path(), 1);
    let (pc, w) = (branch(&p, "pc", "k-pc").await, branch(&p, "w", "k-w").await);
    for x in [&pc, &w] {
        assert_eq!(p.can_commit("c", x, false, 60_000).await.unwrap(), Vote::Prepared { metadata: vec![] });
    }
    assert_eq!(p.query_state("c", 4, &w).await.unwrap().state, BranchState::Prepared);
    let pre_committed = p.pre_commit("c", 2, &pc, b"", 60_000).await.unwrap();
    let waiting = p.query_state("c", 1, &w).await.unwrap();
    assert_eq!(pre_committed.state, BranchState::PreCommitted);
    stop(p, handle).await;
    for round in 0..2 {
        let (p, handle) = open(dir.path(), 1);
        assert_eq!(p.query_state("c", 1, &pc).await.unwrap(), pre_committed, "round {round}");
        assert_eq!(p.query_state("c", 1, &w).await.unwrap(), waiting, "round {round}");
        let stale = p.pre_commit("c", 3, &w, b"", 60_000).await;
        assert_eq!(stale, Err(ThreePhaseError::StaleEpoch { asked: 3, answered: 4 }), "round {round}");
        let query = RecoverQuery { resources: vec![], after: None, limit: 10 };
        assert_eq!(p.recover("c", &query).await.unwrap().branches.len(), 2, "both in doubt");
        stop(p, handle).await;
    }
    let (p, handle) = open(dir.path(), 1);
    assert_eq!(p.abort("c", &pc, b"").await.unwrap(), Outcome::Committed, "its only way forward");
    assert!(matches!(p.abort("c", &w, b"").await.unwrap(), Outcome::Aborted { .. }));
    assert!(p.read("k-pc".into()).await.unwrap().is_some());
    assert!(p.read("k-w".into()).await.unwrap().is_none());
    stop(p, handle).await;
    let (p, handle) = open(dir.path(), 1);
    assert_eq!(p.query_state("c", 1, &pc).await.unwrap().state, BranchState::Committed);
    assert_eq!(p.query_state("c", 1, &w).await.unwrap().state, BranchState::Aborted);
    assert!(p.read("k-pc".into()).await.unwrap().is_some());
    stop(p, handle).await;
}

/// Deadlines that passed while the participant was down are acted on when it starts: the
/// waiting branch aborts (with the reason), the pre-committed one commits (its write applied).
/// A repeated PreCommit does not extend a deadline, and never creates a branch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_passed_while_down_are_acted_on_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let (p, handle) = open(dir.path(), 100_000);
    let (pc, w) = (branch(&p, "pc", "k-pc").await, branch(&p, "w", "k-w").await);
    p.can_commit("c", &pc, false, 60_000).await.unwrap();
    p.can_commit("c", &w, false, 300).await.unwrap();
    let first = p.pre_commit("c", 1, &pc, b"", 300).await.unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert_eq!(p.pre_commit("c", 1, &pc, b"", 300).await.unwrap(), first, "not extended");
    let unknown = Xid { resource: "ref".parse().unwrap(), gtid: Gtid::new_v7(), branch: "u".parse().unwrap() };
    assert_eq!(p.pre_commit("c", 1, &unknown, b"", 300).await.unwrap().state, BranchState::Unknown);
    assert_eq!(p.status(unknown.gtid, unknown.branch.clone()).await.unwrap(), BranchState::Unknown, "not created");
    stop(p, handle).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (p, handle) = open(dir.path(), 100_000);
    assert!(crate::journal::now_ms() > first.deadline_unix_ms);
    assert_eq!(p.query_state("c", 1, &pc).await.unwrap().state, BranchState::Committed);
    let aborted = p.query_state("c", 1, &w).await.unwrap();
    assert_eq!((aborted.state, aborted.reason.as_str()), (BranchState::Aborted, "no PreCommit within 300 ms"));
    assert!(p.read("k-pc".into()).await.unwrap().is_some(), "the self-commit applied the write");
    assert!(p.read("k-w".into()).await.unwrap().is_none());
    let r = p.commit("c", &w, CommitKind::TwoPhase, b"").await.unwrap();
    assert_eq!(r, Outcome::Aborted { reason: "no PreCommit within 300 ms".into() }, "a late DoCommit hears why");
    stop(p, handle).await;
    // The reason survives a checkpoint too.
    let (p, handle) = open(dir.path(), 1);
    branch(&p, "x", "k-x").await;
    branch(&p, "y", "k-y").await;
    stop(p, handle).await;
    let (p, handle) = open(dir.path(), 1);
    assert_eq!(p.query_state("c", 1, &w).await.unwrap().reason, "no PreCommit within 300 ms");
    stop(p, handle).await;
}

/// A live participant commits a pre-committed branch at its deadline without being asked
/// anything (its timer), and the commit is durable: it is there after a restart that nothing
/// else would have triggered it in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pre_committed_branch_commits_on_its_timer() {
    let dir = tempfile::tempdir().unwrap();
    let (p, handle) = open(dir.path(), 100_000);
    let x = branch(&p, "pc", "k-pc").await;
    p.can_commit("c", &x, false, 60_000).await.unwrap();
    let status = p.pre_commit("c", 1, &x, b"", 200).await.unwrap();
    assert_eq!(status.state, BranchState::PreCommitted);
    tokio::time::sleep(Duration::from_millis(400)).await;
    stop(p, handle).await;
    // Replayed with no deadline logic at all: only the records tell.
    let mut actor = Actor::new(ReferenceConfig::new("ref".parse().unwrap(), dir.path()));
    pledge_log::open(pledge_log::LogConfig::new(dir.path().join("log")), |r| actor.replay(r.rtype, &r.payload))
        .unwrap()
        .shutdown()
        .await
        .unwrap();
    assert!(matches!(actor.branches.get(&(x.gtid, x.branch.clone())), Some(Entry::Committed { .. })));
    assert!(actor.data.contains_key("k-pc"));
}
