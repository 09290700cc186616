//! Operator resolution with the CLI, as real processes (reference participants; the heuristic
//! outcomes produced at MariaDB are resolved in `tests/mysql.rs`): phase 2 waiting out a long
//! backoff is sent at once, a branch whose participant is gone for good is settled, what
//! contradicts the decision or names nothing is refused, every action is in the decision log
//! (`pledge log inspect`) and survives a restart.

use pledge_integration_tests::*;
use pledge_proto::v1;

/// Phase-2 retries ten minutes apart and no recovery scan after the first: within a test,
/// only an operator can make a branch that missed its commit hear it again.
const SLOW_RETRIES: &str = "retry_initial_backoff_ms = 600000\nretry_max_backoff_ms = 600000\n";

fn resolve_args<'a>(gtid: &'a str, branch: Option<&'a str>, action: &'a str, reason: &'a str) -> Vec<&'a str> {
    let mut args = vec!["txn", "resolve", gtid];
    args.extend(branch);
    args.extend([action, "--reason", reason, "--operator", "tester"]);
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_retries_phase_two_now_and_settles_a_branch_whose_participant_is_gone() {
    let dir = TestDir::new("resolve");
    let config = dir.path().join("pledge.toml");
    std::fs::write(&config, SLOW_RETRIES).unwrap();
    let crash = [("PLEDGE_CRASH_AT", "participant::before_commit")];
    let r1 = dir.participant("r1", 0, &[], &[]).await;
    let mut r2 = dir.participant("r2", 0, &[], &crash).await;
    let mut r3 = dir.participant("r3", 0, &[], &crash).await;
    let participants = [("r1", r1.endpoint()), ("r2", r2.endpoint()), ("r3", r3.endpoint())];
    let args = ["--config", config.to_str().unwrap(), "--recovery-interval-ms", "600000"];
    let mut coordinator = dir.coordinator_for(&participants, &args, &[]).await;
    let mut c = coordinator_client(&coordinator).await;

    // Committed; r2 dies as phase 2 reaches it and is retried ten minutes later.
    let g1 = begin(&mut c, &[("r1", "a"), ("r2", "b")]).await;
    put(&mut store_client(&r1).await, &g1, "a", "k1", "v1").await;
    put(&mut store_client(&r2).await, &g1, "b", "k1", "v1").await;
    let r = commit(&mut c, &g1, false).await.unwrap();
    assert_eq!(r.outcome(), v1::Outcome::Committed);
    r2.wait_crashed().await;
    let retry_at = eventually("r2's commit failed and is due again later", || {
        let mut c = c.clone();
        let g1 = g1.clone();
        async move {
            let t = get(&mut c, &g1).await.unwrap();
            let b = t.branches.iter().find(|b| b.resource_id == "r2").unwrap();
            (b.attempts >= 1 && b.next_retry_unix_ms > 0).then_some(b.next_retry_unix_ms)
        }
    })
    .await;
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    assert!(retry_at > now_ms + 60_000, "the next retry is minutes away");
    let port = r2.port();
    r2 = dir.participant("r2", port, &[], &[]).await;

    // Rolling back a committed transaction is refused and changes nothing.
    let refused = cli_refused(&coordinator, &resolve_args(&g1, None, "--rollback", "wrong"));
    assert!(refused.contains("FailedPrecondition") && refused.contains("would contradict"), "{refused}");
    // Retry now: the commit reaches r2 at once.
    let out = cli(&coordinator, &resolve_args(&g1, None, "--commit", "r2 is back"));
    assert!(out.starts_with("resolved: phase 2 (commit) sent again now"), "{out}");
    eventually("g1 finished", || {
        let mut c = c.clone();
        let g1 = g1.clone();
        async move { (get(&mut c, &g1).await.unwrap().state() == v1::TransactionState::Committed).then_some(()) }
    })
    .await;
    assert_eq!(read(&mut store_client(&r2).await, "k1").await.as_deref(), Some("v1"));
    // Nothing left to retry: unchanged, not logged.
    let out = cli(&coordinator, &resolve_args(&g1, None, "--commit", "again"));
    assert!(out.starts_with("unchanged:"), "{out}");

    // r3 dies as phase 2 reaches it and never comes back: its branch is settled by hand.
    let g2 = begin(&mut c, &[("r1", "a"), ("r3", "b")]).await;
    put(&mut store_client(&r1).await, &g2, "a", "k2", "v2").await;
    put(&mut store_client(&r3).await, &g2, "b", "k2", "v2").await;
    assert_eq!(commit(&mut c, &g2, false).await.unwrap().outcome(), v1::Outcome::Committed);
    r3.wait_crashed().await;
    let refused = cli_refused(&coordinator, &resolve_args(&g2, Some("r3/b"), "--forget", "x"));
    assert!(refused.contains("have not acknowledged"), "{refused}");
    let refused = cli_refused(&coordinator, &resolve_args(&g2, Some("r9/b"), "--commit", "x"));
    assert!(refused.contains("NotFound") && refused.contains("has no branch r9/b"), "{refused}");
    let refused = cli_refused(&coordinator, &resolve_args(&g2, Some("r3/b"), "--commit", " "));
    assert!(refused.contains("InvalidArgument") && refused.contains("reason: required"), "{refused}");
    let out = cli(&coordinator, &resolve_args(&g2, Some("r3/b"), "--commit", "r3 retired; k2 restored from backup"));
    assert!(out.starts_with("resolved: branch r3/b recorded as committed"), "{out}");
    assert!(out.contains("state:      COMMITTED") && out.contains("resolved"), "{out}");
    let r = commit(&mut c, &g2, true).await.unwrap();
    assert_eq!((r.outcome(), r.completed, r.heuristic), (v1::Outcome::Committed, true, false));
    let refused = cli_refused(&coordinator, &resolve_args(&g2, None, "--forget", "x"));
    assert!(refused.contains("no heuristic outcome to forget"), "{refused}");

    // Both actions are in the decision log, with who and why.
    let log = log_inspect(&dir.path().join("coordinator"));
    let resolves: Vec<&str> = log.lines().filter(|l| l.contains("RESOLVE ")).collect();
    assert_eq!(resolves.len(), 2, "{log}");
    assert!(resolves[0].contains(&format!("RESOLVE {g1} commit * effect=retried")), "{log}");
    assert!(resolves[0].contains("by \"tester\" from 127.0.0.1:") && resolves[0].contains("reason=\"r2 is back\""));
    assert!(resolves[1].contains(&format!("RESOLVE {g2} commit r3/b effect=branch-settled")), "{log}");

    // A restart knows: g2 finished, r3's branch settled (nothing is sent to r3 again).
    coordinator.kill9().await;
    coordinator = dir.coordinator_for(&participants, &args, &[]).await;
    let mut c = coordinator_client(&coordinator).await;
    let t = get(&mut c, &g2).await.unwrap();
    assert_eq!(t.state(), v1::TransactionState::Committed);
    let b = t.branches.iter().find(|b| b.resource_id == "r3").unwrap();
    assert!(b.resolved && b.acknowledged, "{b:?}");
    assert_eq!(t.resolutions.len(), 1);
    let res = &t.resolutions[0];
    assert_eq!((res.operator.as_str(), res.reason.as_str()), ("tester", "r3 retired; k2 restored from backup"));
    assert_eq!(res.effect(), v1::ResolveEffect::BranchSettled);
    assert_eq!(get(&mut c, &g1).await.unwrap().resolutions[0].effect(), v1::ResolveEffect::Retried);
}
