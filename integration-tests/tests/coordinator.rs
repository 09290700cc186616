//! The coordinator end to end, with reference participants, as real processes on loopback:
//! commit and abort paths, kill -9 of the coordinator at each step of the protocol, kill -9 of
//! a participant between prepare and commit, and the API's answers to bad input.

use pledge_integration_tests::*;
use pledge_proto::v1::{self, BranchState};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_participants_commit_atomically() {
    let dir = TestDir::new("commit");
    let p1 = dir.participant("db1", 0, &[], &[]).await;
    let p2 = dir.participant("db2", 0, &[], &[]).await;
    let coordinator = dir.coordinator(&[("db1", &p1), ("db2", &p2)], &[]).await;
    let mut c = coordinator_client(&coordinator).await;
    let (mut s1, mut s2) = (store_client(&p1).await, store_client(&p2).await);

    let gtid = begin(&mut c, &[("db1", "debit"), ("db2", "credit")]).await;
    put(&mut s1, &gtid, "debit", "alice", "90").await;
    put(&mut s2, &gtid, "credit", "bob", "110").await;
    // Staged writes are invisible before the commit.
    assert_eq!(read(&mut s1, "alice").await, None);

    let r = commit(&mut c, &gtid, true).await.unwrap();
    assert_eq!((r.outcome(), r.completed), (v1::Outcome::Committed, true));
    assert_eq!(read(&mut s1, "alice").await.as_deref(), Some("90"));
    assert_eq!(read(&mut s2, "bob").await.as_deref(), Some("110"));
    let t = get(&mut c, &gtid).await.unwrap();
    assert_eq!(t.state(), v1::TransactionState::Committed);
    assert!(t.branches.iter().all(|b| b.vote() == v1::Vote::Prepared && b.acknowledged));
    assert!(t.decided_unix_ms >= t.created_unix_ms && t.completed_unix_ms >= t.decided_unix_ms);

    // Commit is idempotent: a retry gets the same answer and changes nothing.
    let again = commit(&mut c, &gtid, false).await.unwrap();
    assert_eq!((again.outcome(), again.completed), (v1::Outcome::Committed, true));
}

/// Every hop over Unix sockets (application to coordinator, coordinator to participants, the
/// CLI to the coordinator): a transaction commits at both participants, and the socket files
/// are gone once the processes stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_sockets_carry_every_hop() {
    let dir = TestDir::new("unix");
    let sock = |name: &str| format!("unix:{}", dir.path().join(format!("{name}.sock")).display());
    let mut p1 = dir.participant_on("db1", &sock("db1"), &[], &[]).await;
    let mut p2 = dir.participant_on("db2", &sock("db2"), &[], &[]).await;
    assert_eq!(p1.endpoint(), sock("db1"));
    let mut coordinator =
        dir.coordinator_with(&[("db1", &p1), ("db2", &p2)], &["--listen", &sock("pledge")], &[]).await;
    let mut c = coordinator_client(&coordinator).await;
    let (mut s1, mut s2) = (store_client(&p1).await, store_client(&p2).await);

    let gtid = begin(&mut c, &[("db1", "debit"), ("db2", "credit")]).await;
    put(&mut s1, &gtid, "debit", "alice", "90").await;
    put(&mut s2, &gtid, "credit", "bob", "110").await;
    let r = commit(&mut c, &gtid, true).await.unwrap();
    assert_eq!((r.outcome(), r.completed), (v1::Outcome::Committed, true));
    assert_eq!(read(&mut s1, "alice").await.as_deref(), Some("90"));
    assert_eq!(read(&mut s2, "bob").await.as_deref(), Some("110"));

    let cli = tokio::process::Command::new(bin("pledge"))
        .args(["txn", "get", &gtid, "--coordinator", &coordinator.endpoint()])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&cli.stdout);
    assert!(cli.status.success(), "{text}{}", String::from_utf8_lossy(&cli.stderr));
    assert!(text.contains(&gtid) && text.to_lowercase().contains("committed"), "{text}");

    for p in [&mut coordinator, &mut p1, &mut p2] {
        assert!(p.terminate().await.success());
    }
    for name in ["pledge", "db1", "db2"] {
        assert!(!dir.path().join(format!("{name}.sock")).exists(), "{name}.sock is removed at shutdown");
    }
}

/// The Coordinator.Pipeline stream answers as the unary calls do: a transaction begun and
/// committed on it commits at both participants, a retried Commit (unary) gets the same answer,
/// bad input gets the same precise status without harming the stream, and a SIGTERM with the
/// stream open still shuts the coordinator down cleanly (it ends the stream).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_answers_as_unary_calls_do() {
    use pledge_proto::pipeline::CoordinatorPipeline;
    let dir = TestDir::new("pipeline-api");
    let p1 = dir.participant("db1", 0, &[], &[]).await;
    let p2 = dir.participant("db2", 0, &[], &[]).await;
    let mut coordinator = dir.coordinator(&[("db1", &p1), ("db2", &p2)], &[]).await;
    let pipeline = CoordinatorPipeline::new(coordinator.channel().await, std::time::Duration::from_secs(30));
    let mut c = coordinator_client(&coordinator).await;
    let (mut s1, mut s2) = (store_client(&p1).await, store_client(&p2).await);

    let begun = pipeline
        .begin(v1::BeginRequest { branches: vec![branch("db1", "debit")], ..Default::default() })
        .await
        .unwrap();
    let gtid = begun.gtid;
    pipeline.enlist(v1::EnlistRequest { gtid: gtid.clone(), branches: vec![branch("db2", "credit")] }).await.unwrap();
    put(&mut s1, &gtid, "debit", "alice", "90").await;
    put(&mut s2, &gtid, "credit", "bob", "110").await;
    let r = pipeline
        .commit(v1::CommitRequest { gtid: gtid.clone(), wait_for_completion: true, ..Default::default() })
        .await
        .unwrap();
    assert_eq!((r.outcome(), r.completed), (v1::Outcome::Committed, true));
    assert_eq!(read(&mut s1, "alice").await.as_deref(), Some("90"));
    assert_eq!(read(&mut s2, "bob").await.as_deref(), Some("110"));
    let again = commit(&mut c, &gtid, false).await.unwrap();
    assert_eq!((again.outcome(), again.completed), (v1::Outcome::Committed, true), "a unary retry, same answer");

    // Bad input: the unary calls' statuses, call by call, on the same stream.
    let malformed = pipeline.commit(v1::CommitRequest { gtid: "nope".into(), ..Default::default() }).await;
    assert_eq!(malformed.unwrap_err().code(), Code::InvalidArgument);
    let unknown = pledge_proto::Gtid::new_v7().to_string();
    let missing = pipeline.abort(v1::AbortRequest { gtid: unknown.clone() }).await.unwrap_err();
    let unary = c.abort(v1::AbortRequest { gtid: unknown }).await.unwrap_err();
    assert_eq!((missing.code(), missing.message()), (unary.code(), unary.message()));
    let late = pipeline.abort(v1::AbortRequest { gtid: gtid.clone() }).await.unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition, "abort after commit: {late:?}");
    let next = pipeline.begin(v1::BeginRequest::default()).await.unwrap();
    assert_ne!(next.gtid, gtid, "the stream still works");

    assert!(coordinator.terminate().await.success(), "a clean shutdown with a pipeline stream open");
}

/// A participant without the pipeline (UNIMPLEMENTED) gets unary calls: a transaction across it
/// and a participant with the pipeline commits, and one where it votes no aborts everywhere;
/// the participant with the pipeline is called over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participants_without_the_pipeline_get_unary_calls() {
    let dir = TestDir::new("no-pipeline");
    let p1 = dir.participant("db1", 0, &[], &[]).await;
    let p2 = dir.participant("db2", 0, &["--no-pipeline"], &[]).await;
    let p3 = dir.participant("db3", 0, &["--no-pipeline", "--vote-no"], &[]).await;
    let coordinator = dir.coordinator(&[("db1", &p1), ("db2", &p2), ("db3", &p3)], &[]).await;
    let mut c = coordinator_client(&coordinator).await;
    let (mut s1, mut s2) = (store_client(&p1).await, store_client(&p2).await);

    let gtid = begin(&mut c, &[("db1", "debit"), ("db2", "credit")]).await;
    put(&mut s1, &gtid, "debit", "alice", "90").await;
    put(&mut s2, &gtid, "credit", "bob", "110").await;
    let r = commit(&mut c, &gtid, true).await.unwrap();
    assert_eq!((r.outcome(), r.completed), (v1::Outcome::Committed, true), "{}", r.reason);
    assert_eq!(read(&mut s2, "bob").await.as_deref(), Some("110"));

    let gtid = begin(&mut c, &[("db1", "debit"), ("db3", "credit")]).await;
    put(&mut s1, &gtid, "debit", "carol", "1").await;
    put(&mut store_client(&p3).await, &gtid, "credit", "dave", "1").await;
    let r = commit(&mut c, &gtid, true).await.unwrap();
    assert_eq!(r.outcome(), v1::Outcome::Aborted);
    assert!(r.reason.contains("db3/credit voted no: configured to vote no"), "{}", r.reason);
    assert!(r.completed, "the abort reached both, over the pipeline and over a unary call");
    assert_eq!(branch_state(&mut s1, &gtid, "debit").await, BranchState::Aborted);
    assert_eq!(read(&mut s1, "carol").await, None);
    assert!(p1.log().contains("pipeline stream opened"), "the coordinator calls db1 over its pipeline");
    assert!(!p2.log().contains("pipeline stream opened"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_no_vote_aborts_every_branch() {
    let dir = TestDir::new("abort");
    let p1 = dir.participant("db1", 0, &[], &[]).await;
    let p2 = dir.participant("db2", 0, &["--vote-no"], &[]).await;
    let coordinator = dir.coordinator(&[("db1", &p1), ("db2", &p2)], &[]).await;
    let mut c = coordinator_client(&coordinator).await;
    let (mut s1, mut s2) = (store_client(&p1).await, store_client(&p2).await);

    let gtid = begin(&mut c, &[("db1", "debit"), ("db2", "credit")]).await;
    put(&mut s1, &gtid, "debit", "alice", "90").await;
    put(&mut s2, &gtid, "credit", "bob", "110").await;
    let r = commit(&mut c, &gtid, true).await.unwrap();
    assert_eq!(r.outcome(), v1::Outcome::Aborted);
    assert!(r.reason.contains("db2/credit voted no: configured to vote no"), "{}", r.reason);
    assert!(r.completed);
    assert_eq!(read(&mut s1, "alice").await, None);
    assert_eq!(read(&mut s2, "bob").await, None);
    assert_eq!(branch_state(&mut s1, &gtid, "debit").await, BranchState::Aborted);
    assert_eq!(get(&mut c, &gtid).await.unwrap().state(), v1::TransactionState::Aborted);
    // The same answer again.
    assert_eq!(commit(&mut c, &gtid, false).await.unwrap().outcome(), v1::Outcome::Aborted);
}

/// Starts two participants and a coordinator armed to crash at `crash_at`, begins a 2-branch
/// transaction with a write at each participant, and commits it (the commit call fails or
/// succeeds depending on where the crash is).
struct CrashSetup {
    dir: TestDir,
    p1: Process,
    p2: Process,
    coordinator: Process,
    gtid: String,
}

async fn crash_setup(
    test: &str,
    crash_at: &str,
    p2_args: &[&str],
) -> (CrashSetup, Result<v1::CommitResponse, tonic::Status>) {
    crash_setup_with(test, crash_at, &[], p2_args).await
}

async fn crash_setup_with(
    test: &str,
    crash_at: &str,
    p1_args: &[&str],
    p2_args: &[&str],
) -> (CrashSetup, Result<v1::CommitResponse, tonic::Status>) {
    let dir = TestDir::new(test);
    let p1 = dir.participant("db1", 0, p1_args, &[]).await;
    let p2 = dir.participant("db2", 0, p2_args, &[]).await;
    let coordinator = dir.coordinator(&[("db1", &p1), ("db2", &p2)], &[("PLEDGE_CRASH_AT", crash_at)]).await;
    let mut c = coordinator_client(&coordinator).await;
    let gtid = begin(&mut c, &[("db1", "debit"), ("db2", "credit")]).await;
    put(&mut store_client(&p1).await, &gtid, "debit", "alice", "90").await;
    put(&mut store_client(&p2).await, &gtid, "credit", "bob", "110").await;
    let result = commit(&mut c, &gtid, false).await;
    (CrashSetup { dir, p1, p2, coordinator, gtid }, result)
}

impl CrashSetup {
    async fn restart_coordinator(&mut self) {
        self.coordinator = self.dir.coordinator(&[("db1", &self.p1), ("db2", &self.p2)], &[]).await;
    }

    async fn states(&self) -> (BranchState, BranchState) {
        (
            branch_state(&mut store_client(&self.p1).await, &self.gtid, "debit").await,
            branch_state(&mut store_client(&self.p2).await, &self.gtid, "credit").await,
        )
    }

    /// After the restart: phase 2 completes (Commit with wait answers once every branch has
    /// acknowledged), and both writes are visible.
    async fn assert_committed_everywhere(&self) {
        let mut c = coordinator_client(&self.coordinator).await;
        let r = commit(&mut c, &self.gtid, true).await.unwrap();
        assert_eq!((r.outcome(), r.completed), (v1::Outcome::Committed, true));
        assert_eq!(self.states().await, (BranchState::Committed, BranchState::Committed));
        assert_eq!(read(&mut store_client(&self.p1).await, "alice").await.as_deref(), Some("90"));
        assert_eq!(read(&mut store_client(&self.p2).await, "bob").await.as_deref(), Some("110"));
        assert_eq!(get(&mut c, &self.gtid).await.unwrap().state(), v1::TransactionState::Committed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_killed_after_the_decision_is_synced_commits_after_restart() {
    let (mut s, result) = crash_setup("crash-synced", "coordinator::after_commit_synced", &[]).await;
    assert!(result.is_err(), "the coordinator died before answering: {result:?}");
    s.coordinator.wait_crashed().await;
    // Killed before phase 2: both branches are prepared, nobody has heard "commit".
    assert_eq!(s.states().await, (BranchState::Prepared, BranchState::Prepared));
    s.restart_coordinator().await;
    s.assert_committed_everywhere().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_killed_during_phase_two_finishes_it_after_restart() {
    // db2 takes its time with commits, so the crash (right after db1's commit call returns)
    // lands while db2 has not committed; db1 takes a little, so the client's answer (sent as
    // phase 2 starts) is out before the crash even on a busy machine.
    let (mut s, result) = crash_setup_with(
        "crash-phase2",
        "coordinator::after_commit_call",
        &["--stall-commit-ms", "300"],
        &["--stall-commit-ms", "3000"],
    )
    .await;
    // The decision was durable before phase 2, so the client had its answer.
    assert_eq!(result.unwrap().outcome(), v1::Outcome::Committed);
    s.coordinator.wait_crashed().await;
    assert_eq!(s.states().await, (BranchState::Committed, BranchState::Prepared));
    s.restart_coordinator().await;
    s.assert_committed_everywhere().await;
}

/// A single-branch transaction commits in one phase: the participant decides. Killed after the
/// participant committed and before the coordinator's End record is durable, the coordinator
/// must not answer "no record, presumed aborted" after its restart (it did: the client would
/// redo committed work). It logs the one-phase decision before sending it, resends it after the
/// restart, and the participant answers from its own record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_killed_after_a_one_phase_commit_answers_committed_after_restart() {
    let dir = TestDir::new("crash-one-phase");
    let p1 = dir.participant("db1", 0, &[], &[]).await;
    let mut coordinator =
        dir.coordinator(&[("db1", &p1)], &[("PLEDGE_CRASH_AT", "coordinator::after_commit_call")]).await;
    let mut c = coordinator_client(&coordinator).await;
    let gtid = begin(&mut c, &[("db1", "only")]).await;
    put(&mut store_client(&p1).await, &gtid, "only", "carol", "42").await;
    let result = commit(&mut c, &gtid, false).await;
    assert!(result.is_err(), "the coordinator died before answering: {result:?}");
    coordinator.wait_crashed().await;
    // The participant committed on its own authority.
    assert_eq!(read(&mut store_client(&p1).await, "carol").await.as_deref(), Some("42"));

    let coordinator = dir.coordinator(&[("db1", &p1)], &[]).await;
    let mut c = coordinator_client(&coordinator).await;
    let r = commit(&mut c, &gtid, false).await.expect("the retried Commit gets the outcome");
    assert_eq!((r.outcome(), r.completed), (v1::Outcome::Committed, true));
    let t = get(&mut c, &gtid).await.unwrap();
    assert_eq!((t.state(), t.one_phase), (v1::TransactionState::Committed, true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_killed_before_the_decision_aborts_after_restart() {
    let (mut s, result) = crash_setup("crash-undecided", "coordinator::before_commit_record", &[]).await;
    assert!(result.is_err(), "the coordinator died before deciding: {result:?}");
    s.coordinator.wait_crashed().await;
    assert_eq!(s.states().await, (BranchState::Prepared, BranchState::Prepared));
    s.restart_coordinator().await;
    // No commit record: presumed abort. The recovery scan finds both prepared branches and
    // rolls them back.
    eventually("both branches rolled back by recovery", || async {
        (s.states().await == (BranchState::Aborted, BranchState::Aborted)).then_some(())
    })
    .await;
    assert_eq!(read(&mut store_client(&s.p1).await, "alice").await, None);
    assert_eq!(read(&mut store_client(&s.p2).await, "bob").await, None);
    let mut c = coordinator_client(&s.coordinator).await;
    assert_eq!(get(&mut c, &s.gtid).await.unwrap_err().code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_asks_again_a_participant_that_was_down_at_restart() {
    let (mut s, result) = crash_setup("crash-recovery-later", "coordinator::before_commit_record", &[]).await;
    assert!(result.is_err());
    s.coordinator.wait_crashed().await;
    assert_eq!(s.states().await, (BranchState::Prepared, BranchState::Prepared));
    // db2 is down while the coordinator restarts: its first recovery scan cannot reach it.
    let db2_port = s.p2.port();
    s.p2.kill9().await;
    s.restart_coordinator().await;
    wait_branch_state(&s.p1, &s.gtid, "debit", BranchState::Aborted).await;
    // db2 comes back (same port, same data): a later periodic scan finds its prepared branch.
    s.p2 = s.dir.participant("db2", db2_port, &[], &[]).await;
    let mut s2 = store_client(&s.p2).await;
    wait_branch_state(&s.p2, &s.gtid, "credit", BranchState::Aborted).await;
    assert_eq!(read(&mut s2, "bob").await, None);
}

/// Clients commit transactions concurrently while the coordinator is killed at the moment the
/// 150th commit decision becomes durable. After the restart, every commit a client saw
/// acknowledged is committed at both participants, and every other transaction ended the same
/// way at both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_commit_is_lost_when_the_coordinator_is_killed_under_load() {
    let dir = TestDir::new("crash-load");
    let p1 = dir.participant("db1", 0, &[], &[]).await;
    let p2 = dir.participant("db2", 0, &[], &[]).await;
    let coordinator = dir
        .coordinator(&[("db1", &p1), ("db2", &p2)], &[("PLEDGE_CRASH_AT", "coordinator::after_commit_synced@150")])
        .await;
    let endpoint = coordinator.endpoint();

    let mut clients = Vec::new();
    for client in 0..8 {
        let (endpoint, e1, e2) = (endpoint.clone(), p1.endpoint(), p2.endpoint());
        clients.push(tokio::spawn(async move {
            let mut c = v1::coordinator_client::CoordinatorClient::connect(endpoint).await.unwrap();
            let mut s1 = v1::reference_store_client::ReferenceStoreClient::connect(e1).await.unwrap();
            let mut s2 = v1::reference_store_client::ReferenceStoreClient::connect(e2).await.unwrap();
            let (mut acknowledged, mut unknown) = (Vec::new(), Vec::new());
            for i in 0.. {
                let Ok(r) = c
                    .begin(v1::BeginRequest {
                        branches: vec![branch("db1", "a"), branch("db2", "b")],
                        ..Default::default()
                    })
                    .await
                else {
                    break; // the coordinator is gone
                };
                let gtid = r.into_inner().gtid;
                let key = format!("c{client}-{i}");
                put(&mut s1, &gtid, "a", &key, "x").await;
                put(&mut s2, &gtid, "b", &key, "y").await;
                match commit(&mut c, &gtid, false).await {
                    Ok(r) => {
                        assert_eq!(r.outcome(), v1::Outcome::Committed);
                        acknowledged.push((gtid, key));
                    }
                    // No answer: the outcome is unknown, not absent.
                    Err(_) => {
                        unknown.push((gtid, key));
                        break;
                    }
                }
            }
            (acknowledged, unknown)
        }));
    }
    let mut coordinator = coordinator;
    coordinator.wait_crashed().await;
    let (mut acknowledged, mut unknown) = (Vec::new(), Vec::new());
    for c in clients {
        let (a, u) = c.await.unwrap();
        acknowledged.extend(a);
        unknown.extend(u);
    }
    assert!(acknowledged.len() >= 140, "only {} commits acknowledged before the crash", acknowledged.len());

    let coordinator = dir.coordinator(&[("db1", &p1), ("db2", &p2)], &[]).await;
    let mut c = coordinator_client(&coordinator).await;
    let (mut s1, mut s2) = (store_client(&p1).await, store_client(&p2).await);
    for (gtid, key) in &acknowledged {
        let r = commit(&mut c, gtid, true).await.unwrap_or_else(|e| panic!("acknowledged {gtid} lost: {e}"));
        assert_eq!((r.outcome(), r.completed), (v1::Outcome::Committed, true), "{gtid}");
        assert_eq!(read(&mut s1, key).await.as_deref(), Some("x"), "{gtid} at db1");
        assert_eq!(read(&mut s2, key).await.as_deref(), Some("y"), "{gtid} at db2");
    }
    // The unanswered ones end the same way at both participants, whichever way that is. A
    // branch the crash caught before its prepare stays active until the participant's own
    // timeout rolls it back; it can no longer commit.
    for (gtid, key) in &unknown {
        let states = eventually("the unanswered transaction to leave the prepared state", || async {
            let (mut s1, mut s2) = (store_client(&p1).await, store_client(&p2).await);
            let states = (branch_state(&mut s1, gtid, "a").await, branch_state(&mut s2, gtid, "b").await);
            (states.0 != BranchState::Prepared && states.1 != BranchState::Prepared).then_some(states)
        })
        .await;
        assert_eq!(
            states.0 == BranchState::Committed,
            states.1 == BranchState::Committed,
            "{gtid} committed at one participant only: {states:?}"
        );
        let visible = (read(&mut s1, key).await.is_some(), read(&mut s2, key).await.is_some());
        assert_eq!(visible.0, visible.1, "{gtid}: writes visible at one participant only");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participant_killed_between_prepare_and_commit_commits_after_its_restart() {
    let dir = TestDir::new("participant-crash");
    let p1 = dir.participant("db1", 0, &[], &[]).await;
    let mut p2 = dir.participant("db2", 0, &[], &[("PLEDGE_CRASH_AT", "participant::before_commit")]).await;
    let coordinator = dir.coordinator(&[("db1", &p1), ("db2", &p2)], &[]).await;
    let mut c = coordinator_client(&coordinator).await;
    let gtid = begin(&mut c, &[("db1", "debit"), ("db2", "credit")]).await;
    put(&mut store_client(&p1).await, &gtid, "debit", "alice", "90").await;
    put(&mut store_client(&p2).await, &gtid, "credit", "bob", "110").await;

    // The decision is durable, so the client hears "committed"; db2 dies as its commit arrives.
    assert_eq!(commit(&mut c, &gtid, false).await.unwrap().outcome(), v1::Outcome::Committed);
    p2.wait_crashed().await;
    let t = eventually("a failed commit attempt at db2 to be recorded", || async {
        let t = get(&mut coordinator_client(&coordinator).await, &gtid).await.unwrap();
        (t.branches[1].attempts >= 1).then_some(t)
    })
    .await;
    assert_eq!(t.state(), v1::TransactionState::Committing);
    assert!(!t.branches[1].acknowledged && !t.branches[1].last_error.is_empty());

    // Same port and data directory, no crash point: the prepared branch is still there.
    let p2 = dir.participant("db2", p2.port(), &[], &[]).await;
    let r = commit(&mut c, &gtid, true).await.unwrap();
    assert_eq!((r.outcome(), r.completed), (v1::Outcome::Committed, true));
    let mut s2 = store_client(&p2).await;
    assert_eq!(branch_state(&mut s2, &gtid, "credit").await, BranchState::Committed);
    assert_eq!(read(&mut s2, "bob").await.as_deref(), Some("110"));
    assert_eq!(read(&mut store_client(&p1).await, "alice").await.as_deref(), Some("90"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_precise_status_and_changes_nothing() {
    let dir = TestDir::new("bad-input");
    let p1 = dir.participant("db1", 0, &[], &[]).await;
    let coordinator = dir.coordinator(&[("db1", &p1)], &[]).await;
    let mut c = coordinator_client(&coordinator).await;

    let e = commit(&mut c, "not-a-gtid", false).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("gtid: \"not-a-gtid\" is not a UUID"), "{}", e.message());

    let unknown = "01900000-0000-7000-8000-000000000000";
    assert_eq!(get(&mut c, unknown).await.unwrap_err().code(), Code::NotFound);

    // More branches than a transaction may ever have: refused before any is looked at.
    let many = (0..201).map(|i| branch("db1", &format!("b{i}"))).collect();
    let e = c.begin(v1::BeginRequest { branches: many, ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("branches: 201 entries"), "{}", e.message());

    let e =
        c.begin(v1::BeginRequest { branches: vec![branch("nosuch", "b")], ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains("unknown resource \"nosuch\""), "{}", e.message());

    let e = c.begin(v1::BeginRequest { branches: vec![branch("db1", "b c")], ..Default::default() }).await.unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (Code::InvalidArgument, "branches[0].branch_id: character ' ' is not allowed (use A-Z a-z 0-9 . _ -)")
    );

    let gtid = begin(&mut c, &[("db1", "a")]).await;
    c.abort(v1::AbortRequest { gtid: gtid.clone() }).await.unwrap();
    let e = commit(&mut c, &gtid, false).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("aborted before commit was requested: aborted by client"), "{}", e.message());
    assert!(get(&mut c, &gtid).await.unwrap().state() != v1::TransactionState::Committed);

    let e = c.begin(v1::BeginRequest { idempotency_key: "k".repeat(2 << 20), ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "oversized request: {e:?}");

    let e = c.begin(v1::BeginRequest { timeout_ms: Some(u64::MAX), ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("max_txn_timeout_ms"), "{}", e.message());

    // Begin with the same idempotency key: the same GTID.
    let key = v1::BeginRequest { idempotency_key: "order-42".into(), ..Default::default() };
    let first = c.begin(key.clone()).await.unwrap().into_inner();
    let second = c.begin(key).await.unwrap().into_inner();
    assert_eq!((first.gtid, first.existing, second.existing), (second.gtid, false, true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_registration_survives_a_restart_and_probes_work() {
    let dir = TestDir::new("register");
    let p1 = dir.participant("late", 0, &[], &[]).await;
    let mut coordinator = dir.coordinator(&[], &[]).await;
    let mut c = coordinator_client(&coordinator).await;
    c.register_participant(v1::RegisterParticipantRequest { resource_id: "late".into(), endpoint: p1.endpoint() })
        .await
        .unwrap();
    let e = c
        .register_participant(v1::RegisterParticipantRequest { resource_id: "x".into(), endpoint: "nope".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // SIGTERM: clean shutdown, log flushed.
    assert!(coordinator.terminate().await.success(), "{}", coordinator.log_tail());
    let coordinator = dir.coordinator(&[], &[]).await;
    let mut c = coordinator_client(&coordinator).await;
    let list = c.list_participants(v1::ListParticipantsRequest {}).await.unwrap().into_inner();
    assert_eq!(list.participants.len(), 1);
    assert_eq!((list.participants[0].resource_id.as_str(), &list.participants[0].endpoint), ("late", &p1.endpoint()));
    let gtid = begin(&mut c, &[("late", "b")]).await;
    put(&mut store_client(&p1).await, &gtid, "b", "k", "v").await;
    assert_eq!(commit(&mut c, &gtid, true).await.unwrap().outcome(), v1::Outcome::Committed);

    // Standard probes: gRPC health checking and server reflection, on both kinds of server.
    for endpoint in [coordinator.endpoint(), p1.endpoint()] {
        let channel = tonic::transport::Endpoint::from_shared(endpoint.clone()).unwrap().connect().await.unwrap();
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        let status = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap();
        assert_eq!(status.into_inner().status(), tonic_health::pb::health_check_response::ServingStatus::Serving);
        let services = list_services(&endpoint).await;
        let want = if endpoint == p1.endpoint() { "pledge.v1.Participant" } else { "pledge.v1.Coordinator" };
        assert!(services.iter().any(|s| s == want), "{want} not in {services:?}");
    }
}

async fn list_services(endpoint: &str) -> Vec<String> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_string()).unwrap().connect().await.unwrap();
    let mut client = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client.server_reflection_info(futures::stream::iter([request])).await.unwrap().into_inner();
    let response = responses.message().await.unwrap().expect("a reflection response");
    match response.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => list.service.into_iter().map(|s| s.name).collect(),
        other => panic!("unexpected reflection response {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_keep_the_log_bounded_and_restarts_read_them() {
    let dir = TestDir::new("checkpoint");
    let p1 = dir.participant("db1", 0, &[], &[]).await;
    let p2 = dir.participant("db2", 0, &[], &[]).await;
    let args = ["--checkpoint-every-records", "40", "--log-segment-size-bytes", "4096"];
    let mut coordinator = dir.coordinator_with(&[("db1", &p1), ("db2", &p2)], &args, &[]).await;
    let mut c = coordinator_client(&coordinator).await;
    let (mut s1, mut s2) = (store_client(&p1).await, store_client(&p2).await);
    let mut committed = Vec::new();
    // 150 transactions: a commit and an end record each, about 7 checkpoints.
    for _ in 0..150 {
        let gtid = begin(&mut c, &[("db1", "a"), ("db2", "b")]).await;
        put(&mut s1, &gtid, "a", "k", "v").await;
        put(&mut s2, &gtid, "b", "k", "v").await;
        let r = commit(&mut c, &gtid, true).await.unwrap();
        assert_eq!(r.outcome(), v1::Outcome::Committed);
        committed.push(gtid);
    }
    let log_dir = dir.path().join("coordinator/log");
    let segments = || {
        std::fs::read_dir(&log_dir)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "seg"))
            .count()
    };
    assert!(coordinator.terminate().await.success());
    // Without checkpoints, 300 records of ~100 bytes would fill about 8 segments of 4 KiB.
    // (Counted after the stop: a checkpoint thread deletes what it covers, and a stop waits
    // for it.)
    assert!(segments() <= 2, "old segments were not deleted: {} left", segments());
    let text = log_inspect(&dir.path().join("coordinator"));
    assert!(text.contains("CHECKPOINT END"), "{text}");
    // Decision records name the epoch (the start) that made them.
    assert!(text.contains("COMMIT ") && text.contains("epoch=1 "), "{text}");

    // After a restart, finished transactions are still known through the checkpoint: the
    // first one (checkpointed several times over) and the last.
    let coordinator = dir.coordinator_with(&[("db1", &p1), ("db2", &p2)], &args, &[]).await;
    let mut c = coordinator_client(&coordinator).await;
    for gtid in [&committed[0], &committed[149]] {
        assert_eq!(get(&mut c, gtid).await.unwrap().state(), v1::TransactionState::Committed, "{gtid}");
    }
}

/// With `--metrics-listen`, the coordinator and its participants serve Prometheus metrics
/// that count what happened: a commit, an abort by the client, an abort on a "no" vote, a
/// call with bad input, the participant calls and the log's syncs; the gauges show a
/// transaction left open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_happened() {
    let dir = TestDir::new("metrics");
    let metrics = ["--metrics-listen", "127.0.0.1:0"];
    let p1 = dir.participant("db1", 0, &metrics, &[]).await;
    let p2 = dir.participant("db2", 0, &metrics, &[]).await;
    let no = dir.participant("no", 0, &["--vote-no", "--metrics-listen", "127.0.0.1:0"], &[]).await;
    let coordinator = dir.coordinator_with(&[("db1", &p1), ("db2", &p2), ("no", &no)], &metrics, &[]).await;
    let mut c = coordinator_client(&coordinator).await;
    let mut s1 = store_client(&p1).await;

    // Committed on both participants.
    let committed = begin(&mut c, &[("db1", "debit"), ("db2", "credit")]).await;
    put(&mut s1, &committed, "debit", "alice", "90").await;
    put(&mut store_client(&p2).await, &committed, "credit", "bob", "110").await;
    let r = commit(&mut c, &committed, true).await.unwrap();
    assert_eq!((r.outcome(), r.completed), (v1::Outcome::Committed, true));
    // Aborted by the client.
    let aborted = begin(&mut c, &[("db1", "a")]).await;
    c.abort(v1::AbortRequest { gtid: aborted.clone() }).await.unwrap();
    // Aborted because a participant votes no.
    let refused = begin(&mut c, &[("db2", "b"), ("no", "c")]).await;
    put(&mut store_client(&p2).await, &refused, "b", "k", "v").await;
    put(&mut store_client(&no).await, &refused, "c", "k", "v").await;
    let r = commit(&mut c, &refused, true).await.unwrap();
    assert_eq!(r.outcome(), v1::Outcome::Aborted);
    // Bad input: a commit of a transaction that does not exist.
    let unknown = commit(&mut c, "01900000-0000-7000-8000-000000000000", false).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    // Left open.
    begin(&mut c, &[("db1", "open")]).await;

    // The client's Abort is answered once decided; the transaction finishes when db1 has
    // acknowledged the abort.
    let m = eventually("the client-aborted transaction to finish", || async {
        let m = coordinator.metrics().await;
        (m.value(r#"pledge_transactions_finished_total{outcome="aborted"}"#) == Some(2.0)).then_some(m)
    })
    .await;
    assert_eq!(m.get("pledge_transactions_begun_total"), 4.0);
    assert_eq!(m.get(r#"pledge_transactions_finished_total{outcome="committed"}"#), 1.0);
    assert_eq!(m.get(r#"pledge_transaction_aborts_total{cause="client"}"#), 1.0);
    assert_eq!(m.get(r#"pledge_transaction_aborts_total{cause="vote"}"#), 1.0);
    assert_eq!(m.get(r#"pledge_rpc_requests_total{method="Begin",code="OK"}"#), 4.0);
    assert_eq!(m.get(r#"pledge_rpc_requests_total{method="Commit",code="NOT_FOUND"}"#), 1.0);
    assert_eq!(m.get(r#"pledge_rpc_duration_seconds_count{method="Commit"}"#), 3.0);
    assert_eq!(m.get(r#"pledge_participant_calls_total{resource="no",call="Prepare",code="OK"}"#), 1.0);
    assert!(m.get(r#"pledge_participant_calls_total{resource="db1",call="Commit",code="OK"}"#) >= 1.0);
    // The commit decision was forced to the log.
    assert!(m.get("pledge_log_syncs_total") >= 1.0);
    assert!(m.get("pledge_log_sync_duration_seconds_count") >= 1.0);
    // Published every few seconds: the open transaction, and nothing waiting for a participant.
    eventually("the gauges to show the open transaction and nothing in doubt", || async {
        let m = coordinator.metrics().await;
        let open = m.value(r#"pledge_transactions{state="active"}"#) == Some(1.0)
            && m.value(r#"pledge_transactions{state="aborting"}"#) == Some(0.0);
        (open && m.value("pledge_oldest_in_doubt_seconds") == Some(0.0)).then_some(())
    })
    .await;

    let m = p1.metrics().await;
    assert_eq!(m.get(r#"pledge_branch_operations_total{operation="prepare",result="prepared"}"#), 1.0);
    assert_eq!(m.get(r#"pledge_branch_operations_total{operation="commit",result="committed"}"#), 1.0);
    assert_eq!(m.get(r#"pledge_rpc_requests_total{method="Prepare",code="OK"}"#), 1.0);
    let m = no.metrics().await;
    assert_eq!(m.get(r#"pledge_branch_operations_total{operation="prepare",result="aborted"}"#), 1.0);
    assert!(m.value(r#"pledge_branch_operations_total{operation="commit",result="committed"}"#).is_none());
}
