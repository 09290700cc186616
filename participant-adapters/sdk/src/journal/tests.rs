//! The journal against real files: every answer survives a reopen (kill -9 is a reopen without
//! shutdown: nothing is acknowledged before its sync), checkpoints included.

use std::time::Duration;

use pledge_proto::{Gtid, Xid};

use super::*;

fn xid(resource: &str, gtid: Gtid, branch: &str) -> Xid {
    Xid { resource: resource.parse().unwrap(), gtid, branch: branch.parse().unwrap() }
}

fn config(dir: &std::path::Path) -> JournalConfig {
    JournalConfig::new(dir.join("journal"))
}

async fn reopen(
    dir: &std::path::Path,
    config: JournalConfig,
    log: pledge_log::Log,
    journal: Journal,
) -> (Journal, pledge_log::Log) {
    drop(journal);
    log.shutdown().await.unwrap();
    let _ = dir;
    Journal::open(config).await.unwrap()
}

fn aborted(reason: &str) -> End {
    End::Outcome(Outcome::Aborted { reason: reason.into() })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_state_and_answer_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (journal, log) = Journal::open(config(dir.path())).await.unwrap();
    let [prepared, committing, committed, rolled_back, read_only, open] =
        ["p", "c", "ok", "rb", "ro", "open"].map(|b| xid("db", Gtid::new_v7(), b));
    journal.open_branch(&prepared).await.unwrap().await.unwrap();
    journal.prepared(&prepared, "coord", b"txid=7").await.unwrap();
    journal.committing(&committing, "coord", b"txid=8").await.unwrap();
    journal.finish(&committed, End::Outcome(Outcome::Committed)).await.unwrap();
    let heuristic = End::Outcome(Outcome::HeuristicRollback { reason: "lost at the broker".into() });
    journal.finish(&rolled_back, heuristic.clone()).await.unwrap();
    journal.finish(&read_only, End::ReadOnly).await.unwrap();
    journal.open_branch(&open).await.unwrap().await.unwrap();

    let (journal, log) = reopen(dir.path(), config(dir.path()), log, journal).await;
    match journal.state(&prepared).await {
        Some(State::Prepared { coordinator_id, metadata, wait, .. }) => {
            assert_eq!((coordinator_id.as_str(), &metadata[..], wait), ("coord", &b"txid=7"[..], None), "two-phase");
        }
        other => panic!("prepared: {other:?}"),
    }
    assert_eq!(
        journal.state(&committing).await,
        Some(State::Committing { coordinator_id: "coord".into(), metadata: "txid=8".into() })
    );
    assert_eq!(journal.state(&committed).await, Some(State::Finished(End::Outcome(Outcome::Committed))));
    assert_eq!(journal.state(&rolled_back).await, Some(State::Finished(heuristic)));
    assert_eq!(journal.state(&read_only).await, Some(State::Finished(End::ReadOnly)));
    // Work that began before the restart and was never prepared: lost, and known to be.
    assert_eq!(journal.state(&open).await, Some(State::Finished(aborted(LOST_WORK))));
    let mut flight: Vec<Xid> = journal.in_flight_branches().await.into_iter().map(|(x, _)| x).collect();
    flight.sort();
    let mut want = vec![prepared.clone(), committing.clone()];
    want.sort();
    assert_eq!(flight, want);
    drop(journal);
    log.shutdown().await.unwrap();
}

/// The answers a checkpoint keeps are the answers given: a restart after a checkpoint (which
/// deleted the records they were written in) gives them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_survive_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.checkpoint_every_records = 5;
    let (journal, log) = Journal::open(cfg.clone()).await.unwrap();
    let heuristic = End::Outcome(Outcome::HeuristicRollback { reason: "aborted by the broker".into() });
    let rolled_back = xid("kafka", Gtid::new_v7(), "rb");
    journal.finish(&rolled_back, heuristic.clone()).await.unwrap();
    let prepared = xid("kafka", Gtid::new_v7(), "p");
    journal.open_branch(&prepared).await.unwrap().await.unwrap();
    journal.prepared(&prepared, "c", b"m").await.unwrap();
    // Enough other branches for several checkpoints.
    for i in 0..40 {
        journal
            .finish(&xid("kafka", Gtid::new_v7(), &format!("x{i}")), End::Outcome(Outcome::Committed))
            .await
            .unwrap();
    }
    let (journal, log) = reopen(dir.path(), cfg, log, journal).await;
    // Counted once the log has stopped (checkpoints are written, and what they cover deleted,
    // by a thread of their own; a stop waits for it).
    let segments = std::fs::read_dir(dir.path().join("journal"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "seg"))
        .count();
    assert!(segments <= 2, "checkpoints let old segments go ({segments} segments)");
    assert_eq!(journal.state(&rolled_back).await, Some(State::Finished(heuristic)));
    assert!(matches!(journal.state(&prepared).await, Some(State::Prepared { .. })));
    drop(journal);
    log.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_branch_keeps_its_first_answer() {
    let dir = tempfile::tempdir().unwrap();
    let (journal, log) = Journal::open(config(dir.path())).await.unwrap();
    let x = xid("db", Gtid::new_v7(), "b");
    journal.finish(&x, End::Outcome(Outcome::Committed)).await.unwrap();
    journal.finish(&x, aborted("later")).await.unwrap();
    assert_eq!(journal.state(&x).await, Some(State::Finished(End::Outcome(Outcome::Committed))));
    drop(journal);
    log.shutdown().await.unwrap();
}

/// Forgetting is honest: once an answer is forgotten, a branch of a transaction that old with
/// no record is "maybe forgotten", never "never seen"; one of a newer transaction still is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgotten_answers_leave_a_horizon_behind() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.max_answers = 2;
    let (journal, log) = Journal::open(cfg.clone()).await.unwrap();
    let now = Gtid::new_v7().unix_ms().unwrap();
    assert_eq!(
        journal.unrecorded(&Gtid::from_parts(now - 60_000, 1)).await,
        Unrecorded::MaybeForgotten,
        "before the journal existed"
    );
    let (old, mid, new) = (Gtid::from_parts(now + 10, 1), Gtid::from_parts(now + 20, 2), Gtid::from_parts(now + 30, 3));
    for (g, b) in [(old, "a"), (mid, "b"), (new, "c")] {
        journal.finish(&xid("db", g, b), End::Outcome(Outcome::Committed)).await.unwrap();
    }
    let unseen = Gtid::from_parts(now + 5, 9);
    assert_eq!(journal.unrecorded(&unseen).await, Unrecorded::Never);
    journal.expire().await;
    assert_eq!(journal.state(&xid("db", old, "a")).await, None, "beyond max_answers: forgotten");
    assert!(journal.state(&xid("db", new, "c")).await.is_some());
    assert_eq!(journal.unrecorded(&unseen).await, Unrecorded::MaybeForgotten);
    assert_eq!(journal.unrecorded(&Gtid::from_parts(now + 40, 9)).await, Unrecorded::Never);
    // A restart before a checkpoint replays what was forgotten (the records are still there,
    // so nothing is lost); forgotten again and checkpointed, the horizon survives a restart.
    cfg.checkpoint_every_records = 1;
    let (journal, log) = reopen(dir.path(), cfg.clone(), log, journal).await;
    assert!(journal.state(&xid("db", old, "a")).await.is_some(), "replayed from the log");
    journal.expire().await;
    journal.finish(&xid("db", Gtid::from_parts(now + 50, 5), "d"), End::ReadOnly).await.unwrap();
    let (journal, log) = reopen(dir.path(), cfg, log, journal).await;
    assert_eq!(journal.unrecorded(&unseen).await, Unrecorded::MaybeForgotten);
    drop(journal);
    log.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_held_while_undecided_and_kept_when_committed() {
    let dir = tempfile::tempdir().unwrap();
    let (journal, log) = Journal::open(config(dir.path())).await.unwrap();
    let (a, b, c) = (xid("k", Gtid::new_v7(), "a"), xid("k", Gtid::new_v7(), "b"), xid("k", Gtid::new_v7(), "c"));
    for x in [&a, &b, &c] {
        journal.open_branch(x).await.unwrap().await.unwrap();
    }
    assert_eq!(journal.claim(&a, "req-1").await, Ok(true));
    assert_eq!(journal.claim(&a, "req-1").await, Ok(false), "a retry in the same branch");
    assert!(matches!(journal.claim(&b, "req-1").await, Err(ClaimError::Undecided { .. })));
    journal.prepared(&a, "c", b"").await.unwrap();
    journal.finish(&a, End::Outcome(Outcome::Committed)).await.unwrap();
    assert!(matches!(journal.claim(&b, "req-1").await, Err(ClaimError::Committed { .. })));
    // An aborted branch gives its ids back.
    assert_eq!(journal.claim(&b, "req-2").await, Ok(true));
    journal.finish(&b, aborted("")).await.unwrap();
    assert_eq!(journal.claim(&c, "req-2").await, Ok(true));
    // Committed ids survive a restart (through a checkpoint too).
    let mut cfg = config(dir.path());
    cfg.checkpoint_every_records = 1;
    let (journal, log) = reopen(dir.path(), cfg.clone(), log, journal).await;
    let d = xid("k", Gtid::new_v7(), "d");
    journal.open_branch(&d).await.unwrap().await.unwrap();
    let (journal, log) = reopen(dir.path(), cfg, log, journal).await;
    let e = xid("k", Gtid::new_v7(), "e");
    journal.open_branch(&e).await.unwrap().await.unwrap();
    assert!(matches!(journal.claim(&e, "req-1").await, Err(ClaimError::Committed { .. })));
    // c's claim died with its work in the restart.
    assert_eq!(journal.claim(&e, "req-2").await, Ok(true));
    drop(journal);
    log.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_doubt_pages_per_resource_and_coordinator_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (journal, log) = Journal::open(config(dir.path())).await.unwrap();
    let mut ours = Vec::new();
    for i in 0..5 {
        let x = xid("db_a", Gtid::new_v7(), &format!("b{i}"));
        journal.prepared(&x, "c1", b"").await.unwrap();
        ours.push(x);
    }
    journal.prepared(&xid("db_a", Gtid::new_v7(), "other"), "c2", b"").await.unwrap();
    journal.prepared(&xid("db_b", Gtid::new_v7(), "elsewhere"), "c1", b"").await.unwrap();
    let db_a = "db_a".parse().unwrap();
    let first = journal.in_doubt("c1", &db_a, None, 2).await;
    let second = journal.in_doubt("c1", &db_a, Some(&first[1].xid), 10).await;
    let listed: Vec<Xid> = first.iter().chain(&second).map(|d| d.xid.clone()).collect();
    ours.sort();
    assert_eq!(listed, ours);
    // Another resource's last branch as `after` starts at this resource's first.
    let before = xid("db", Gtid::new_v7(), "z");
    assert_eq!(journal.in_doubt("c1", &db_a, Some(&before), 1).await[0].xid, ours[0]);
    drop(journal);
    log.shutdown().await.unwrap();
    let _ = Duration::ZERO;
}

/// Three-phase states, deadlines and epochs are given back as recorded after a reopen, also
/// from a checkpoint (which wrote a pre-committed branch as its Prepared record and what became
/// of it), and journals of two-phase prepared branches read as before (no wait deadline).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_phase_states_deadlines_and_epochs_survive_reopens_and_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    let (journal, log) = Journal::open(cfg.clone()).await.unwrap();
    let [waiting, pre_committed, two_phase] = ["w", "p", "two"].map(|b| xid("db", Gtid::new_v7(), b));
    let wait = journal.prepared_three_phase(&waiting, "coord", b"m-w", 60_000).await.unwrap();
    assert!(wait.at_ms >= now_ms() + 59_000 && wait.epoch == 0, "{wait:?}");
    journal.prepared_three_phase(&pre_committed, "coord", b"m-p", 60_000).await.unwrap();
    journal.raise_epoch(&pre_committed, 3).await.unwrap();
    // A PreCommit from a lower epoch than the one answered keeps the higher one.
    let docommit = journal.pre_committed(&pre_committed, 2, 30_000).await.unwrap();
    assert_eq!(docommit.epoch, 3);
    journal.raise_epoch(&waiting, 7).await.unwrap();
    journal.raise_epoch(&waiting, 5).await.unwrap(); // lower: nothing to record
    journal.prepared(&two_phase, "coord", b"m-two").await.unwrap();
    journal.raise_epoch(&two_phase, 9).await.unwrap(); // two-phase: keeps no epoch
    assert!(journal.pre_committed(&two_phase, 9, 1_000).await.is_err(), "a two-phase branch is never pre-committed");

    let expect = |prepared_ms: u64| {
        (
            State::Prepared {
                coordinator_id: "coord".into(),
                metadata: "m-w".into(),
                prepared_ms,
                wait: Some(Deadline { at_ms: wait.at_ms, epoch: 7 }),
            },
            State::PreCommitted {
                coordinator_id: "coord".into(),
                metadata: "m-p".into(),
                prepared_ms,
                docommit: Deadline { at_ms: docommit.at_ms, epoch: 3 },
            },
        )
    };
    let check = |journal: Journal, log: pledge_log::Log| async {
        let prepared_ms = |s: &Option<State>| match s {
            Some(State::Prepared { prepared_ms, .. } | State::PreCommitted { prepared_ms, .. }) => *prepared_ms,
            other => panic!("{other:?}"),
        };
        let (w, p) = (journal.state(&waiting).await, journal.state(&pre_committed).await);
        assert_eq!(w, Some(expect(prepared_ms(&w)).0));
        assert_eq!(p, Some(expect(prepared_ms(&p)).1));
        assert!(matches!(journal.state(&two_phase).await, Some(State::Prepared { wait: None, .. })));
        let mut armed = journal.three_phase_branches().await;
        armed.sort();
        let mut want = vec![waiting.clone(), pre_committed.clone()];
        want.sort();
        assert_eq!(armed, want, "the undecided three-phase branches, whose deadlines are armed at start");
        let db = "db".parse().unwrap();
        assert_eq!(journal.in_doubt("coord", &db, None, 10).await.len(), 3, "all three are in doubt");
        (journal, log)
    };
    let (journal, log) = check(journal, log).await;
    let (journal, log) = reopen(dir.path(), cfg.clone(), log, journal).await;
    let (journal, log) = check(journal, log).await;
    // Through a checkpoint: every record from here on writes one.
    cfg.checkpoint_every_records = 1;
    let (journal, log) = reopen(dir.path(), cfg.clone(), log, journal).await;
    journal.finish(&xid("db", Gtid::new_v7(), "other"), End::ReadOnly).await.unwrap();
    journal.finish(&xid("db", Gtid::new_v7(), "other2"), End::ReadOnly).await.unwrap();
    let (journal, log) = reopen(dir.path(), cfg.clone(), log, journal).await;
    let (journal, log) = check(journal, log).await;
    // Decided: no longer armed, no longer in doubt.
    journal.finish(&pre_committed, End::Outcome(Outcome::Committed)).await.unwrap();
    journal.finish(&waiting, aborted("no PreCommit within 60000 ms")).await.unwrap();
    let (journal, log) = reopen(dir.path(), cfg, log, journal).await;
    assert!(journal.three_phase_branches().await.is_empty());
    assert_eq!(journal.state(&waiting).await, Some(State::Finished(aborted("no PreCommit within 60000 ms"))));
    drop(journal);
    log.shutdown().await.unwrap();
}
