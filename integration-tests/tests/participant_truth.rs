//! Participants tell the truth after any crash and any misuse: each test here is one way a
//! participant could report an outcome it cannot prove (a one-phase commit killed before its
//! answer, a lost data directory, another process's transaction, a branch it never saw, a
//! prepared transaction rolled back by hand), or leak one client's session into another's, or
//! wait without bound on a database that stopped answering.

use std::time::Duration;

use pledge_integration_tests::kafka::*;
use pledge_integration_tests::pg::*;
use pledge_integration_tests::proxy::{Link, Proxy, pg_addr, via};
use pledge_integration_tests::*;
use pledge_proto::Gtid;
use pledge_proto::v1::{self, participant_client::ParticipantClient};
use tonic::transport::Channel;

async fn participant_client(p: &Process) -> ParticipantClient<Channel> {
    ParticipantClient::new(p.channel().await)
}

fn xid(resource: &str, gtid: &str, branch: &str) -> v1::BranchXid {
    v1::BranchXid { resource_id: resource.into(), gtid: gtid.into(), branch_id: branch.into() }
}

async fn prepare_one(p: &mut ParticipantClient<Channel>, x: v1::BranchXid) -> v1::PrepareResult {
    let branches = vec![v1::PrepareBranch { xid: Some(x), may_be_empty: false, ..Default::default() }];
    let r = p.prepare(v1::PrepareRequest { coordinator_id: "truth".into(), branches }).await;
    r.expect("prepare call").into_inner().results.remove(0)
}

async fn commit_one(p: &mut ParticipantClient<Channel>, x: v1::BranchXid, metadata: Vec<u8>) -> v1::BranchResult {
    let branch = v1::CommitBranch { xid: Some(x), one_phase: false, metadata, may_be_empty: false };
    let r = p.commit(v1::CommitBranchesRequest { coordinator_id: "truth".into(), branches: vec![branch] }).await;
    r.expect("commit call").into_inner().results.remove(0)
}

/// Runs the `pledge` CLI against `coordinator`; its standard output.
/// Finding 1 at PostgreSQL: the adapter runs the one-phase COMMIT and is killed before it
/// answers. The coordinator asks again after the restart: the answer must be "committed".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_one_phase_commit_killed_before_its_answer_is_reported_committed() {
    let dir = TestDir::new("pg-1pc-crash");
    let resources = [("db_a", pg_url('a'))];
    let crash = [("PLEDGE_CRASH_AT", "postgres::after_one_phase_commit")];
    let mut adapter = dir.postgres_adapter("pg", 0, &resources, &[], &crash).await;
    let coordinator = dir.coordinator_with(&[("db_a", &adapter)], &[], &[]).await;
    let bank = Bank::new("onephase", 1, 100).await;
    let mut c = coordinator_client(&coordinator).await;
    let gtid = begin(&mut c, &[("db_a", "only")]).await;
    let mut pg = branch_client(&adapter).await;
    execute(&mut pg, "db_a", &gtid, "only", &bank.update(), vec![int(-10), int(1)]).await.unwrap();
    let committing = tokio::spawn({
        let (mut c, gtid) = (c.clone(), gtid.clone());
        async move { commit(&mut c, &gtid, true).await }
    });
    adapter.wait_crashed().await;
    assert_eq!(bank.balance('a', 1).await, 90, "the COMMIT ran before the adapter died");
    adapter = dir.postgres_adapter("pg", adapter.port(), &resources, &[], &[]).await;
    let r = committing.await.unwrap().expect("commit");
    assert_eq!((r.outcome(), r.heuristic), (v1::Outcome::Committed, false), "{}", r.reason);
    drop(adapter);
}

/// Finding 1 at Kafka: the same window, around the producer's commit_transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_one_phase_commit_killed_before_its_answer_is_reported_committed() {
    let dir = TestDir::new("kafka-1pc-crash");
    let prefix = unique("kafka-1pc-crash");
    let crash = [("PLEDGE_CRASH_AT", "kafka::after_one_phase_commit")];
    let mut kafka = dir.kafka_adapter("kafka", 0, &prefix, &[], &crash).await;
    let coordinator = dir.coordinator(&[("kafka", &kafka)], &[]).await;
    let topic = unique("onephase");
    let mut c = coordinator_client(&coordinator).await;
    let gtid = begin(&mut c, &[("kafka", "out")]).await;
    produce(&mut kafka_client(&kafka).await, &gtid, "out", &topic, &[("k1", "v")]).await.unwrap();
    let committing = tokio::spawn({
        let (mut c, gtid) = (c.clone(), gtid.clone());
        async move { commit(&mut c, &gtid, true).await }
    });
    kafka.wait_crashed().await;
    kafka = dir.kafka_adapter("kafka", kafka.port(), &prefix, &[], &[]).await;
    let r = committing.await.unwrap().expect("commit");
    assert_eq!((r.outcome(), r.heuristic), (v1::Outcome::Committed, false), "{}", r.reason);
    assert_eq!(committed_keys(&topic, &["k1"]).await, vec!["k1"]);
    drop(kafka);
}

/// Finding 2: with its data directory lost, the Kafka adapter has no record of a prepared
/// branch (and its restart aborted the branch's transaction at the broker): a commit must not be
/// answered "committed".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_without_its_data_directory_never_answers_committed() {
    let dir = TestDir::new("kafka-lost-dir");
    let prefix = unique("kafka-lost-dir");
    let one = ["--producers", "1"];
    let mut kafka = dir.kafka_adapter("kafka", 0, &prefix, &one, &[]).await;
    let topic = unique("lostdir");
    let gtid = Gtid::new_v7().to_string();
    produce(&mut kafka_client(&kafka).await, &gtid, "b", &topic, &[("lost", "v")]).await.unwrap();
    let vote = prepare_one(&mut participant_client(&kafka).await, xid("kafka", &gtid, "b")).await;
    assert_eq!(vote.vote(), v1::Vote::Prepared, "{}", vote.reason);
    kafka.kill9().await;
    std::fs::remove_dir_all(dir.path().join("kafka")).unwrap();
    kafka = dir.kafka_adapter("kafka", kafka.port(), &prefix, &one, &[]).await;
    let r = commit_one(&mut participant_client(&kafka).await, xid("kafka", &gtid, "b"), vote.metadata).await;
    assert_ne!(r.outcome(), v1::BranchOutcome::Committed, "records that are not there: {}", r.reason);
    assert!(read_committed(&topic).await.is_empty());
}

/// Finding 3: two adapter processes on one transactional-id prefix fence each other's
/// producers; neither may take the other's transaction for its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_kafka_adapters_on_one_prefix_never_take_each_others_transactions() {
    let dir = TestDir::new("kafka-shared-prefix");
    let prefix = unique("kafka-shared-prefix");
    let one = ["--producers", "1"];
    let a = dir.kafka_adapter("a", 0, &prefix, &one, &[]).await;
    let topic = unique("shared");
    let ga = Gtid::new_v7().to_string();
    produce(&mut kafka_client(&a).await, &ga, "b", &topic, &[("from-a", "v")]).await.unwrap();
    // B starts on the same transactional id: its producer fences A's, whose open transaction
    // the broker aborts. B's own transaction is then the one open on that id.
    let b = dir.kafka_adapter("b", 0, &prefix, &one, &[]).await;
    let gb = Gtid::new_v7().to_string();
    produce(&mut kafka_client(&b).await, &gb, "b", &topic, &[("from-b", "v")]).await.unwrap();
    let vote_a = prepare_one(&mut participant_client(&a).await, xid("kafka", &ga, "b")).await;
    assert_eq!(vote_a.vote(), v1::Vote::Aborted, "A's records were aborted by B's start: {vote_a:?}");
    let vote_b = prepare_one(&mut participant_client(&b).await, xid("kafka", &gb, "b")).await;
    assert_eq!(vote_b.vote(), v1::Vote::Prepared, "{}", vote_b.reason);
    let r = commit_one(&mut participant_client(&b).await, xid("kafka", &gb, "b"), vote_b.metadata).await;
    assert_eq!(r.outcome(), v1::BranchOutcome::Committed, "{}", r.reason);
    assert_eq!(committed_keys(&topic, &["from-b"]).await, vec!["from-b"]);
}

/// Finding 4: a branch enlisted with the coordinator but never seen by its participant (a
/// mistyped branch id, work sent elsewhere) votes no, and the transaction aborts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_its_participant_never_saw_aborts_the_transaction() {
    let dir = TestDir::new("unknown-branch");
    let p1 = dir.participant("db1", 0, &[], &[]).await;
    let p2 = dir.participant("db2", 0, &[], &[]).await;
    let pg = dir.postgres_adapter("pg", 0, &[("db_a", pg_url('a'))], &[], &[]).await;
    let coordinator = dir.coordinator(&[("db1", &p1), ("db2", &p2), ("db_a", &pg)], &[]).await;
    let mut c = coordinator_client(&coordinator).await;
    let bank = Bank::new("unknownbranch", 1, 100).await;

    // The reference participant.
    let gtid = begin(&mut c, &[("db1", "debit"), ("db2", "credit")]).await;
    put(&mut store_client(&p2).await, &gtid, "credit", &format!("{gtid}-k"), "v").await;
    let r = commit(&mut c, &gtid, true).await.unwrap();
    assert_eq!(r.outcome(), v1::Outcome::Aborted, "db1/debit did nothing there");
    assert!(r.reason.contains("db1/debit"), "{}", r.reason);
    assert_eq!(read(&mut store_client(&p2).await, &format!("{gtid}-k")).await, None);

    // The PostgreSQL adapter.
    let gtid = begin(&mut c, &[("db_a", "debit"), ("db2", "credit")]).await;
    put(&mut store_client(&p2).await, &gtid, "credit", &format!("{gtid}-k"), "v").await;
    let r = commit(&mut c, &gtid, true).await.unwrap();
    assert_eq!(r.outcome(), v1::Outcome::Aborted, "db_a/debit did nothing there");
    assert!(r.reason.contains("db_a/debit"), "{}", r.reason);
    assert_eq!(bank.balance('a', 1).await, 100);

    // Declared possibly empty (here with the CLI), the same branches vote read-only and the
    // transaction commits the work that was done.
    let cli = |args: &[&str]| cli(&coordinator, args);
    let gtid = cli(&["txn", "begin", "--branch", "db2/credit", "--branch-may-be-empty", "db1/debit"]);
    let gtid = gtid.trim();
    cli(&["txn", "enlist", gtid, "--may-be-empty", "db_a/debit"]);
    put(&mut store_client(&p2).await, gtid, "credit", &format!("{gtid}-k"), "v").await;
    let r = commit(&mut c, gtid, true).await.unwrap();
    assert_eq!(r.outcome(), v1::Outcome::Committed, "{}", r.reason);
    let t = get(&mut c, gtid).await.unwrap();
    let votes: Vec<(String, v1::Vote)> = t.branches.iter().map(|b| (b.resource_id.clone(), b.vote())).collect();
    assert_eq!(
        votes,
        [("db2".into(), v1::Vote::Prepared), ("db1".into(), v1::Vote::ReadOnly), ("db_a".into(), v1::Vote::ReadOnly)]
    );
    assert!(cli(&["txn", "get", gtid]).contains("db1/debit  vote=READ_ONLY"));
    assert_eq!(read(&mut store_client(&p2).await, &format!("{gtid}-k")).await.as_deref(), Some("v"));
}

/// Finding 5: a prepared branch rolled back by hand (`ROLLBACK PREPARED`) before the
/// coordinator's commit reaches it: the transaction ends with a heuristic outcome, shown by Get
/// and by List's heuristic filter, never as plain success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_branch_rolled_back_by_hand_is_a_heuristic_outcome() {
    let dir = TestDir::new("pg-by-hand");
    let resources = [("db_a", pg_url('a')), ("db_b", pg_url('b'))];
    let adapter = dir.postgres_adapter("pg", 0, &resources, &[], &[]).await;
    let cid = format!("by-hand-{:08x}", fastrand::u32(..));
    let participants = [("db_a", &adapter), ("db_b", &adapter)];
    let crash = [("PLEDGE_CRASH_AT", "coordinator::after_commit_synced")];
    let mut coordinator = dir.coordinator_with(&participants, &["--coordinator-id", &cid], &crash).await;
    let bank = Bank::new("byhand", 1, 100).await;
    let mut c = coordinator_client(&coordinator).await;
    let gtid = begin(&mut c, &[("db_a", "debit"), ("db_b", "credit")]).await;
    let mut pg = branch_client(&adapter).await;
    execute(&mut pg, "db_a", &gtid, "debit", &bank.update(), vec![int(-10), int(1)]).await.unwrap();
    execute(&mut pg, "db_b", &gtid, "credit", &bank.update(), vec![int(10), int(1)]).await.unwrap();
    assert!(commit(&mut c, &gtid, false).await.is_err(), "the coordinator dies once the decision is durable");
    coordinator.wait_crashed().await;
    let gids = prepared_of(&cid).await;
    let debit = gids.iter().find(|g| g.contains(":debit")).expect("the debit branch is prepared").clone();
    sqlx::query(sqlx::AssertSqlSafe(format!("ROLLBACK PREPARED '{debit}'"))).execute(&bank.a).await.unwrap();

    coordinator = dir.coordinator_with(&participants, &["--coordinator-id", &cid], &[]).await;
    let mut c = coordinator_client(&coordinator).await;
    let r = commit(&mut c, &gtid, true).await.unwrap();
    assert_eq!((r.outcome(), r.completed, r.heuristic), (v1::Outcome::Committed, true, true), "{r:?}");
    let t = get(&mut c, &gtid).await.unwrap();
    let branch = t.branches.iter().find(|b| b.resource_id == "db_a").unwrap();
    assert!(
        matches!(branch.outcome(), v1::BranchOutcome::HeuristicRollback | v1::BranchOutcome::HeuristicHazard),
        "{branch:?}"
    );
    let listed = c.list(v1::ListRequest { heuristic: true, limit: 1000, ..Default::default() }).await.unwrap();
    assert!(listed.into_inner().transactions.iter().any(|t| t.gtid == gtid), "List's heuristic filter shows it");
    // And the operator's view: the CLI.
    let cli = |args: &[&str]| cli(&coordinator, args);
    let shown = cli(&["txn", "get", &gtid]);
    assert!(shown.contains("HEURISTIC") && shown.contains("rolled back outside Pledge"), "{shown}");
    assert!(cli(&["txn", "list", "--heuristic", "--limit", "1000"]).contains(&gtid));
    assert_eq!((bank.balance('a', 1).await, bank.balance('b', 1).await), (100, 110));
}

/// Finding 6: a `SET` made inside one client's branch (its role, its statement timeout) must
/// not be seen by the next branch that gets the same connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_session_settings_do_not_leak_into_the_next_branch() {
    let dir = TestDir::new("pg-leak");
    // Few connections and no warm ones: the next branches soon get the first branch's.
    let args = ["--max-connections", "3", "--max-active-branches", "2", "--warm-connections", "0"];
    let adapter = dir.postgres_adapter("pg", 0, &[("db_a", pg_url('a'))], &args, &[]).await;
    let coordinator = dir.coordinator(&[("db_a", &adapter)], &[]).await;
    let a = pool('a').await;
    sqlx::raw_sql(
        "DO $$ BEGIN CREATE ROLE pledge_leak_test NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$",
    )
    .execute(&a)
    .await
    .unwrap();
    let mut c = coordinator_client(&coordinator).await;
    let mut pg = branch_client(&adapter).await;
    let sets = ["SET ROLE pledge_leak_test", "SET statement_timeout = 1234", "SELECT pg_advisory_lock(424242)::text"];
    // What a branch leaves must not reach the next branches, however the branch ends: prepared
    // (two branches: two-phase commit), committed in one phase, rolled back after an error.
    for (case, branches, fail) in [
        ("two-phase", &[("db_a", "setter"), ("db_a", "other")][..], false),
        ("one-phase", &[("db_a", "setter")][..], false),
        ("rolled back", &[("db_a", "setter")][..], true),
    ] {
        let gtid = begin(&mut c, branches).await;
        let pid = "SELECT pg_backend_pid()::int8";
        let setter =
            execute(&mut pg, "db_a", &gtid, "setter", pid, vec![]).await.unwrap().results[0].rows[0].values[0].clone();
        for sql in sets {
            execute(&mut pg, "db_a", &gtid, "setter", sql, vec![]).await.unwrap();
        }
        if branches.len() > 1 {
            execute(&mut pg, "db_a", &gtid, "other", "SELECT 1", vec![]).await.unwrap();
        }
        if fail {
            assert!(execute(&mut pg, "db_a", &gtid, "setter", "SELECT 1/0", vec![]).await.is_err());
        }
        let r = commit(&mut c, &gtid, true).await.unwrap();
        let want = if fail { v1::Outcome::Aborted } else { v1::Outcome::Committed };
        assert_eq!(r.outcome(), want, "{case}: {}", r.reason);
        let mut reused = false;
        let mut seen = std::collections::BTreeSet::new();
        for n in 0..50 {
            let gtid = begin(&mut c, &[("db_a", "reader")]).await;
            let sql = "SELECT current_user::text, current_setting('statement_timeout'), \
                       (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()), \
                       pg_backend_pid()::int8";
            let r = execute(&mut pg, "db_a", &gtid, "reader", sql, vec![]).await.unwrap();
            let row = &r.results[0].rows[0].values;
            assert_eq!(row[0], text("pledge"), "{case}: branch {n} runs as another client's role");
            assert_ne!(row[1], text("1234ms"), "{case}: branch {n} has another client's statement_timeout");
            assert_eq!(row[2], int(0), "{case}: branch {n} holds another client's advisory lock");
            c.abort(v1::AbortRequest { gtid }).await.unwrap();
            seen.insert(format!("{:?}", row[3].kind));
            if row[3] == setter {
                reused = true;
                break;
            }
        }
        assert!(reused, "{case}: no later branch got the setter's connection {setter:?}; they had {seen:?}");
    }
}

/// Finding 7: a Produce retried with its request id takes effect once; the id stays taken by
/// the committed branch, so another branch cannot process the same request again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_produce_with_a_request_id_takes_effect_once() {
    let dir = TestDir::new("kafka-request-id");
    let prefix = unique("kafka-request-id");
    let kafka = dir.kafka_adapter("kafka", 0, &prefix, &[], &[]).await;
    let coordinator = dir.coordinator(&[("kafka", &kafka)], &[]).await;
    let topic = unique("request-id");
    let mut c = coordinator_client(&coordinator).await;
    let mut k = kafka_client(&kafka).await;
    let request_id = format!("payment-{}", fastrand::u32(..));
    let produce_once = |gtid: &str, key: &str| v1::ProduceRequest {
        resource_id: "kafka".into(),
        gtid: gtid.into(),
        branch_id: "out".into(),
        records: vec![v1::KafkaRecord {
            topic: topic.clone(),
            partition: Some(0),
            key: key.into(),
            ..Default::default()
        }],
        request_id: request_id.clone(),
    };
    let gtid = begin(&mut c, &[("kafka", "out")]).await;
    let first = k.produce(produce_once(&gtid, "k1")).await.unwrap().into_inner();
    let retry = k.produce(produce_once(&gtid, "k1")).await.unwrap().into_inner();
    assert_eq!(first.positions, retry.positions, "a retry gets the first call's positions");
    // Another branch with the same id while the first is undecided: not now.
    let other = begin(&mut c, &[("kafka", "out")]).await;
    let e = k.produce(produce_once(&other, "k2")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert_eq!(commit(&mut c, &gtid, true).await.unwrap().outcome(), v1::Outcome::Committed);
    let later = begin(&mut c, &[("kafka", "out")]).await;
    let e = k.produce(produce_once(&later, "k3")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");
    assert_eq!(committed_keys(&topic, &["k1"]).await, vec!["k1"], "the record was sent once");
    let bad = v1::ProduceRequest { request_id: "x".repeat(201), ..produce_once(&later, "k4") };
    assert_eq!(k.produce(bad).await.unwrap_err().code(), tonic::Code::InvalidArgument);
}

/// Finding 7: a Kafka producer whose commit keeps failing must not hold a prepared branch until
/// the broker's timeout turns it into a heuristic rollback: the adapter finishes it with EndTxn
/// and the producer id and epoch it recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_commit_on_a_broken_producer_falls_back_to_end_txn() {
    let dir = TestDir::new("kafka-broken-commit");
    let prefix = unique("kafka-broken-commit");
    let fail = [("PLEDGE_FAIL_AT", "kafka::commit_transaction")];
    let kafka = dir.kafka_adapter("kafka", 0, &prefix, &[], &fail).await;
    let reference = dir.participant("ref", 0, &[], &[]).await;
    let coordinator = dir.coordinator(&[("kafka", &kafka), ("ref", &reference)], &[]).await;
    let topic = unique("broken");
    let mut c = coordinator_client(&coordinator).await;
    let gtid = begin(&mut c, &[("kafka", "out"), ("ref", "r")]).await;
    produce(&mut kafka_client(&kafka).await, &gtid, "out", &topic, &[("k", "v")]).await.unwrap();
    put(&mut store_client(&reference).await, &gtid, "r", &format!("{gtid}-r"), "x").await;
    let r = commit(&mut c, &gtid, true).await.unwrap();
    assert_eq!((r.outcome(), r.completed, r.heuristic), (v1::Outcome::Committed, true, false), "{r:?}");
    assert_eq!(committed_keys(&topic, &["k"]).await, vec!["k"]);
}

/// Finding 8: Recover is per resource: a database that cannot be reached fails the scan of its
/// own resource only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_recover_of_one_database_works_while_another_is_unreachable() {
    let dir = TestDir::new("pg-recover-one");
    let proxy = Proxy::start(pg_addr()).await;
    let resources = [("db_a", pg_url('a')), ("db_b", via(&pg_url('b'), proxy.addr))];
    let adapter = dir.postgres_adapter("pg", 0, &resources, &[], &[]).await;
    proxy.set(Link::Cut);
    let mut p = participant_client(&adapter).await;
    let recover = |resource: &str| v1::RecoverRequest {
        coordinator_id: "truth".into(),
        resource_ids: vec![resource.into()],
        ..Default::default()
    };
    p.recover(recover("db_a")).await.expect("db_a is reachable: its scan works");
    let e = p.recover(recover("db_b")).await.expect_err("db_b cannot be reached");
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
}

/// Finding 9: a database that stops answering (connections open, nothing comes back) cannot
/// hold a branch's PREPARE, or a client's Execute, beyond the adapter's own bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_calls_to_a_silent_database_are_bounded() {
    let dir = TestDir::new("pg-silent");
    let proxy = Proxy::start(pg_addr()).await;
    let resources = [("db_a", via(&pg_url('a'), proxy.addr))];
    let args = ["--statement-timeout-ms", "1000"];
    let adapter = dir.postgres_adapter("pg", 0, &resources, &args, &[]).await;
    let bank = Bank::new("silent", 1, 100).await;
    let mut pg = branch_client(&adapter).await;
    let gtid = Gtid::new_v7().to_string();
    execute(&mut pg, "db_a", &gtid, "b", &bank.update(), vec![int(-1), int(1)]).await.unwrap();
    let other = Gtid::new_v7().to_string();
    execute(&mut pg, "db_a", &other, "b", "SELECT 1", vec![]).await.unwrap();
    proxy.set(Link::Frozen);
    let mut p = participant_client(&adapter).await;
    let mut request = tonic::Request::new(v1::PrepareRequest {
        coordinator_id: "truth".into(),
        branches: vec![v1::PrepareBranch {
            xid: Some(xid("db_a", &gtid, "b")),
            may_be_empty: false,
            ..Default::default()
        }],
    });
    request.set_timeout(Duration::from_secs(20));
    let vote = p.prepare(request).await.expect("prepare answered within the adapter's bound");
    assert_eq!(vote.into_inner().results[0].vote(), v1::Vote::Aborted);
    let mut request = tonic::Request::new(v1::ExecuteRequest {
        resource_id: "db_a".into(),
        gtid: other.clone(),
        branch_id: "b".into(),
        statements: vec![v1::Statement { sql: "SELECT 2".into(), params: vec![] }],
        ..Default::default()
    });
    request.set_timeout(Duration::from_secs(20));
    let e = pg.execute(request).await.expect_err("nothing answers");
    assert_ne!(e.code(), tonic::Code::DeadlineExceeded, "the adapter's own bound answers first: {e:?}");
}
