//! The Kafka participant against the real broker the project's scripts start: read_committed
//! visibility of committed and aborted branches, PostgreSQL and Kafka in one transaction, kill
//! -9 of the adapter after prepare (finished with EndTxn) and of the coordinator after the
//! decision, a branch the broker aborted on timeout (a heuristic outcome), a restart aborting
//! what the previous process left open, and the participant conformance suite.

use pledge_conformance::{Options, Target};
use pledge_integration_tests::kafka::*;
use pledge_integration_tests::*;
use pledge_proto::v1::postgres_branch_client::PostgresBranchClient;
use pledge_proto::v1::{self, value::Kind};

struct Setup {
    dir: TestDir,
    kafka: Process,
    reference: Process,
    coordinator: Process,
    prefix: String,
}

async fn setup(test: &str, kafka_env: &[(&str, &str)], coordinator_env: &[(&str, &str)]) -> Setup {
    let dir = TestDir::new(test);
    let prefix = unique(test);
    let kafka = dir.kafka_adapter("kafka", 0, &prefix, &[], kafka_env).await;
    let reference = dir.participant("ref", 0, &[], &[]).await;
    let coordinator = dir.coordinator(&[("kafka", &kafka), ("ref", &reference)], coordinator_env).await;
    Setup { dir, kafka, reference, coordinator, prefix }
}

impl Setup {
    async fn restart_kafka(&mut self, args: &[&str]) {
        let port = self.kafka.port();
        self.kafka = self.dir.kafka_adapter("kafka", port, &self.prefix, args, &[]).await;
    }

    /// A transaction with a Kafka branch (records `keys` to `topic`) and a reference branch.
    async fn begin_with_records(&self, topic: &str, keys: &[&str]) -> String {
        let mut c = coordinator_client(&self.coordinator).await;
        let gtid = begin(&mut c, &[("kafka", "out"), ("ref", "r")]).await;
        let records: Vec<(&str, &str)> = keys.iter().map(|k| (*k, "v")).collect();
        let positions = produce(&mut kafka_client(&self.kafka).await, &gtid, "out", topic, &records).await.unwrap();
        assert_eq!(positions.positions.len(), keys.len());
        put(&mut store_client(&self.reference).await, &gtid, "r", &format!("{gtid}-ref"), "x").await;
        gtid
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_records_are_seen_once_and_aborted_ones_never() {
    let s = setup("kafka-visibility", &[], &[]).await;
    let topic = unique("visibility");
    let mut c = coordinator_client(&s.coordinator).await;

    // Two-phase: Kafka + the reference participant.
    let committed = s.begin_with_records(&topic, &["c1", "c2"]).await;
    // Invisible while the transaction is open: a read_committed reader stops before it.
    let aborted = s.begin_with_records(&topic, &["a1"]).await;
    c.abort(v1::AbortRequest { gtid: aborted.clone() }).await.unwrap();
    let r = commit(&mut c, &committed, true).await.unwrap();
    assert_eq!((r.outcome(), r.completed), (v1::Outcome::Committed, true), "{}", r.reason);
    let t = get(&mut c, &committed).await.unwrap();
    let kafka_branch = t.branches.iter().find(|b| b.resource_id == "kafka").unwrap();
    let metadata = String::from_utf8(kafka_branch.metadata.clone()).unwrap();
    assert!(metadata.starts_with(&format!("transactional.id={}-", s.prefix)), "vote metadata: {metadata}");

    // One-phase: Kafka alone.
    let one = begin(&mut c, &[("kafka", "solo")]).await;
    // A record that cannot be sent as given is refused before anything is sent; the branch
    // goes on as if it had not been asked.
    let e = produce(&mut kafka_client(&s.kafka).await, &one, "solo", "bad topic", &[("x", "v")]).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message());
    assert!(e.message().contains("records[0].topic"), "{}", e.message());
    produce(&mut kafka_client(&s.kafka).await, &one, "solo", &topic, &[("s1", "v")]).await.unwrap();
    let r = commit(&mut c, &one, true).await.unwrap();
    assert_eq!(r.outcome(), v1::Outcome::Committed);
    assert!(get(&mut c, &one).await.unwrap().one_phase);

    // An aborted branch's producer is handed out again: its records are never seen either.
    let seen = committed_keys(&topic, &["c1", "c2", "s1"]).await;
    assert_eq!(seen, vec!["c1", "c2", "s1"], "exactly the committed records, once each");

    // Work in an aborted branch is refused.
    let e = produce(&mut kafka_client(&s.kafka).await, &aborted, "out", &topic, &[("late", "v")]).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{}", e.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_and_kafka_commit_together_and_a_postgres_failure_hides_the_records() {
    let dir = TestDir::new("kafka-postgres");
    let prefix = unique("kafka-postgres");
    let kafka = dir.kafka_adapter("kafka", 0, &prefix, &[], &[]).await;
    let pg = dir.postgres_adapter("pg", 0, &[("db_a", pg_url('a'))], &[], &[]).await;
    let coordinator = dir.coordinator(&[("kafka", &kafka), ("db_a", &pg)], &[]).await;
    let table = format!("orders_{}", fastrand::u32(..));
    let db = sqlx::PgPool::connect(&pg_url('a')).await.unwrap();
    let ddl = format!("CREATE TABLE {table} (id int PRIMARY KEY, qty int NOT NULL CHECK (qty > 0))");
    sqlx::query(sqlx::AssertSqlSafe(ddl)).execute(&db).await.unwrap();
    let topic = unique("orders");
    let insert = format!("INSERT INTO {table} VALUES ($1, $2)");
    let mut c = coordinator_client(&coordinator).await;
    let mut pgc = PostgresBranchClient::connect(pg.endpoint()).await.unwrap();
    let order = |id: i64, qty: i64, gtid: &str| v1::ExecuteRequest {
        resource_id: "db_a".into(),
        gtid: gtid.into(),
        branch_id: "row".into(),
        statements: vec![v1::Statement {
            sql: insert.clone(),
            params: vec![v1::Value { kind: Some(Kind::Int(id)) }, v1::Value { kind: Some(Kind::Int(qty)) }],
        }],
        request_id: String::new(),
    };

    let ok = begin(&mut c, &[("db_a", "row"), ("kafka", "event")]).await;
    pgc.execute(order(1, 5, &ok)).await.unwrap();
    produce(&mut kafka_client(&kafka).await, &ok, "event", &topic, &[("order-1", "created")]).await.unwrap();
    assert_eq!(commit(&mut c, &ok, true).await.unwrap().outcome(), v1::Outcome::Committed);

    // The row violates the check: the branch fails, the transaction aborts, the event is never seen.
    let bad = begin(&mut c, &[("db_a", "row"), ("kafka", "event")]).await;
    produce(&mut kafka_client(&kafka).await, &bad, "event", &topic, &[("order-2", "created")]).await.unwrap();
    let e = pgc.execute(order(2, 0, &bad)).await.unwrap_err();
    assert!(e.message().contains("23514"), "{}", e.message());
    let r = commit(&mut c, &bad, true).await.unwrap();
    assert_eq!(r.outcome(), v1::Outcome::Aborted);

    let rows: Vec<i32> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT id FROM {table} ORDER BY id")))
        .fetch_all(&db)
        .await
        .unwrap();
    assert_eq!(rows, vec![1]);
    assert_eq!(committed_keys(&topic, &["order-1"]).await, vec!["order-1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapter_killed_after_prepare_commits_with_end_txn_after_restart() {
    let mut s = setup("kafka-crash-adapter", &[("PLEDGE_CRASH_AT", "journaled::before_commit")], &[]).await;
    let topic = unique("crash-adapter");
    let gtid = s.begin_with_records(&topic, &["k1", "k2"]).await;
    let mut c = coordinator_client(&s.coordinator).await;
    // The decision is durable; the adapter dies as the commit reaches it, its producer with it.
    assert_eq!(commit(&mut c, &gtid, false).await.unwrap().outcome(), v1::Outcome::Committed);
    s.kafka.wait_crashed().await;
    // Restarted, the adapter no longer has the producer: it finishes the branch with EndTxn
    // (its transactional id's producer is not started until then, which would abort it).
    s.restart_kafka(&[]).await;
    let r = commit(&mut c, &gtid, true).await.unwrap();
    assert_eq!((r.outcome(), r.completed, r.heuristic), (v1::Outcome::Committed, true, false), "{}", r.reason);
    assert!(s.kafka.log_tail().contains("prepared branch finished with EndTxn"), "{}", s.kafka.log_tail());
    assert_eq!(committed_keys(&topic, &["k1", "k2"]).await, vec!["k1", "k2"]);

    // The producer of that transactional id works again afterwards.
    let next = s.begin_with_records(&topic, &["k3"]).await;
    assert_eq!(commit(&mut c, &next, true).await.unwrap().outcome(), v1::Outcome::Committed);
    assert_eq!(committed_keys(&topic, &["k1", "k2", "k3"]).await, vec!["k1", "k2", "k3"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapter_killed_before_voting_is_rolled_back_with_end_txn() {
    let mut s = setup("kafka-crash-vote", &[("PLEDGE_CRASH_AT", "journaled::after_prepare")], &[]).await;
    let topic = unique("crash-vote");
    let gtid = s.begin_with_records(&topic, &["lost"]).await;
    let mut c = coordinator_client(&s.coordinator).await;
    // Prepared and recorded, then killed before answering: no vote, so the coordinator aborts.
    assert_eq!(commit(&mut c, &gtid, false).await.unwrap().outcome(), v1::Outcome::Aborted);
    s.kafka.wait_crashed().await;
    s.restart_kafka(&[]).await;
    let r = commit(&mut c, &gtid, true).await.unwrap();
    assert_eq!((r.outcome(), r.completed), (v1::Outcome::Aborted, true));
    assert!(s.kafka.log_tail().contains("prepared branch finished with EndTxn"), "{}", s.kafka.log_tail());
    let after = s.begin_with_records(&topic, &["kept"]).await;
    assert_eq!(commit(&mut c, &after, true).await.unwrap().outcome(), v1::Outcome::Committed);
    assert_eq!(committed_keys(&topic, &["kept"]).await, vec!["kept"]);
}

/// A restarted adapter starts its whole producer pool at once, so a transaction its previous
/// process left open (never prepared) is aborted right away: not when its producer happens to
/// be used again, nor when the broker's transaction timeout (15 minutes by default) runs out.
/// Until then that transaction holds back every read_committed reader of its partitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_adapter_at_once_aborts_what_its_previous_process_left_open() {
    let mut s = setup("kafka-warm", &[], &[]).await;
    let topic = unique("warm");
    let _gtid = s.begin_with_records(&topic, &["lost"]).await;
    let client = pledge_kafka::wire::TxnClient::new(&kafka_bootstrap(), std::time::Duration::from_secs(5));
    let mut open = None;
    for i in 0..8 {
        let id = format!("{}-{i}", s.prefix);
        if client.describe(&id).await.unwrap().is_some_and(|d| d.state == "Ongoing") {
            open = Some(id);
        }
    }
    let open = open.expect("one of the adapter's transactional ids has the branch's transaction open");
    s.kafka.kill9().await;
    assert_eq!(client.describe(&open).await.unwrap().map(|d| d.state), Some("Ongoing".to_string()));

    // No branch work reaches the restarted adapter.
    s.restart_kafka(&[]).await;
    eventually("the restarted adapter to abort the transaction left open", || async {
        let state = client.describe(&open).await.ok().flatten()?.state;
        (state == "CompleteAbort").then_some(())
    })
    .await;
    assert!(read_committed(&topic).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_killed_after_the_decision_completes_the_kafka_branch_after_restart() {
    let mut s = setup("kafka-crash-coord", &[], &[("PLEDGE_CRASH_AT", "coordinator::after_commit_synced")]).await;
    let topic = unique("crash-coord");
    let gtid = s.begin_with_records(&topic, &["d1"]).await;
    assert!(commit(&mut coordinator_client(&s.coordinator).await, &gtid, false).await.is_err());
    s.coordinator.wait_crashed().await;
    s.coordinator = s.dir.coordinator(&[("kafka", &s.kafka), ("ref", &s.reference)], &[]).await;
    let r = commit(&mut coordinator_client(&s.coordinator).await, &gtid, true).await.unwrap();
    assert_eq!((r.outcome(), r.completed), (v1::Outcome::Committed, true));
    assert_eq!(committed_keys(&topic, &["d1"]).await, vec!["d1"]);
}

/// The broker aborts a prepared branch whose transaction outlives transaction.timeout.ms. Its
/// commit is then reported as a heuristic rollback — recorded by the coordinator, shown by Get
/// and List, never reported as plain success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_the_broker_aborted_on_timeout_is_a_heuristic_rollback() {
    let timeouts = ["--transaction-timeout-ms", "1500", "--active-timeout-ms", "1000"];
    let dir = TestDir::new("kafka-timeout");
    let prefix = unique("kafka-timeout");
    let mut kafka =
        dir.kafka_adapter("kafka", 0, &prefix, &timeouts, &[("PLEDGE_CRASH_AT", "journaled::before_commit")]).await;
    let reference = dir.participant("ref", 0, &[], &[]).await;
    let coordinator = dir.coordinator(&[("kafka", &kafka), ("ref", &reference)], &[]).await;
    let topic = unique("timeout");
    let mut c = coordinator_client(&coordinator).await;
    let gtid = begin(&mut c, &[("kafka", "out"), ("ref", "r")]).await;
    produce(&mut kafka_client(&kafka).await, &gtid, "out", &topic, &[("never", "v")]).await.unwrap();
    put(&mut store_client(&reference).await, &gtid, "r", &format!("{gtid}-ref"), "x").await;
    assert_eq!(commit(&mut c, &gtid, false).await.unwrap().outcome(), v1::Outcome::Committed);
    kafka.wait_crashed().await;

    // Wait for the broker to abort the orphaned transaction.
    let metadata =
        get(&mut c, &gtid).await.unwrap().branches.iter().find(|b| b.resource_id == "kafka").unwrap().metadata.clone();
    let txn = pledge_kafka::txn::TxnRef::from_metadata(&metadata).expect("vote metadata");
    let client = pledge_kafka::wire::TxnClient::new(&kafka_bootstrap(), std::time::Duration::from_secs(5));
    eventually("the broker to abort the timed-out transaction", || async {
        let d = client.describe(&txn.transactional_id).await.ok().flatten();
        d.filter(|d| d.state == "CompleteAbort").map(drop)
    })
    .await;

    kafka = dir.kafka_adapter("kafka", kafka.port(), &prefix, &timeouts, &[]).await;
    let r = commit(&mut c, &gtid, true).await.unwrap();
    assert_eq!((r.outcome(), r.completed, r.heuristic), (v1::Outcome::Committed, true, true), "{r:?}");
    let t = get(&mut c, &gtid).await.unwrap();
    assert!(t.heuristic);
    let branch = t.branches.iter().find(|b| b.resource_id == "kafka").unwrap();
    assert_eq!(branch.outcome(), v1::BranchOutcome::HeuristicRollback, "{branch:?}");
    let listed = c.list(v1::ListRequest { heuristic: true, ..Default::default() }).await.unwrap().into_inner();
    assert!(listed.transactions.iter().any(|t| t.gtid == gtid));
    assert!(coordinator.log_tail().contains("heuristic outcome"), "{}", coordinator.log_tail());
    assert!(read_committed(&topic).await.is_empty(), "the records must not be visible");
    drop(kafka);
}

/// With one producer every branch reuses the same transactional id. A commit repeated after an
/// adapter restart (its first answer lost) must be answered from the adapter's record, and must
/// not touch the transaction another branch now has open on that id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_commit_after_a_restart_leaves_the_reused_producer_alone() {
    let dir = TestDir::new("kafka-reuse");
    let prefix = unique("kafka-reuse");
    let one = ["--producers", "1"];
    let mut kafka = dir.kafka_adapter("kafka", 0, &prefix, &one, &[]).await;
    let topic = unique("reuse");
    let participant = |p: &Process| {
        let endpoint = p.endpoint();
        async move { v1::participant_client::ParticipantClient::connect(endpoint).await.unwrap() }
    };
    let xid =
        |gtid: &str, b: &str| v1::BranchXid { resource_id: "kafka".into(), gtid: gtid.into(), branch_id: b.into() };
    let commit_branch = |gtid: &str, b: &str| v1::CommitBranchesRequest {
        coordinator_id: "c".into(),
        branches: vec![v1::CommitBranch { xid: Some(xid(gtid, b)), one_phase: false, ..Default::default() }],
    };
    let prepare = |gtid: &str, b: &str| v1::PrepareRequest {
        coordinator_id: "c".into(),
        branches: vec![v1::PrepareBranch { xid: Some(xid(gtid, b)), may_be_empty: false, ..Default::default() }],
    };

    let x = pledge_proto::Gtid::new_v7().to_string();
    produce(&mut kafka_client(&kafka).await, &x, "b", &topic, &[("x", "v")]).await.unwrap();
    let mut p = participant(&kafka).await;
    assert_eq!(p.prepare(prepare(&x, "b")).await.unwrap().into_inner().results[0].vote(), v1::Vote::Prepared);
    let r = p.commit(commit_branch(&x, "b")).await.unwrap().into_inner();
    assert_eq!(r.results[0].outcome(), v1::BranchOutcome::Committed);
    // The answer is lost (the coordinator will ask again), the adapter restarts.
    kafka.kill9().await;
    kafka = dir.kafka_adapter("kafka", kafka.port(), &prefix, &one, &[]).await;
    let y = pledge_proto::Gtid::new_v7().to_string();
    produce(&mut kafka_client(&kafka).await, &y, "b", &topic, &[("y", "v")]).await.unwrap();
    let mut p = participant(&kafka).await;
    assert_eq!(p.prepare(prepare(&y, "b")).await.unwrap().into_inner().results[0].vote(), v1::Vote::Prepared);
    let again = p.commit(commit_branch(&x, "b")).await.unwrap().into_inner();
    assert_eq!(again.results[0].outcome(), v1::BranchOutcome::Committed, "{}", again.results[0].reason);
    let r = p.commit(commit_branch(&y, "b")).await.unwrap().into_inner();
    assert_eq!(r.results[0].outcome(), v1::BranchOutcome::Committed, "{}", r.results[0].reason);
    assert_eq!(committed_keys(&topic, &["x", "y"]).await, vec!["x", "y"]);
}

struct Adapter {
    dir: TestDir,
    process: Process,
    prefix: String,
    topic: String,
}

impl Target for Adapter {
    fn endpoint(&self) -> String {
        self.process.endpoint()
    }

    fn resource(&self) -> String {
        "kafka".into()
    }

    async fn work(&mut self, gtid: &str, branch: &str, key: &str) -> Result<(), String> {
        let mut k = kafka_client(&self.process).await;
        produce(&mut k, gtid, branch, &self.topic, &[(key, "v")]).await.map(drop).map_err(|e| e.to_string())
    }

    async fn visible(&mut self, key: &str) -> Result<bool, String> {
        Ok(read_committed(&self.topic).await.iter().any(|(k, _)| k == key))
    }

    async fn restart(&mut self) -> Result<(), String> {
        self.process.kill9().await;
        let port = self.process.port();
        self.process = self.dir.kafka_adapter("kafka", port, &self.prefix, &["--producers", "5"], &[]).await;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_adapter_conforms() {
    let dir = TestDir::new("kafka-conformance");
    let prefix = unique("kafka-conformance");
    // Five producers: the suite holds five branches open at once.
    let process = dir.kafka_adapter("kafka", 0, &prefix, &["--producers", "5"], &[]).await;
    let mut adapter = Adapter { dir, process, prefix, topic: unique("conformance") };
    let report = pledge_conformance::run(&mut adapter, &Options::default()).await;
    assert!(report.ok() && report.skipped.is_empty(), "{report}");
    // Three-phase commit is offered and checked: PreCommit, QueryState, both self-deadlines.
    for check in [
        "a_yes_vote_with_no_pre_commit_aborts_itself_at_its_wait_deadline",
        "a_pre_committed_branch_commits_itself_at_its_do_commit_deadline",
        "three_phase_deadlines_and_epochs_survive_a_restart",
    ] {
        assert!(report.passed.contains(&check), "{check} did not run: {report}");
    }
}

/// The adapter caches one consumer handle per consumer group, at most 64: a 65th group is
/// served by dropping an idle one from the cache, not refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_consumer_groups_than_the_cache_holds_are_served() {
    let s = setup("kafka-groups", &[], &[]).await;
    let topic = unique("groups");
    let mut c = coordinator_client(&s.coordinator).await;
    let mut k = kafka_client(&s.kafka).await;
    let gtid = begin(&mut c, &[("kafka", "out")]).await;
    produce(&mut k, &gtid, "out", &topic, &[("g", "v")]).await.unwrap();
    for i in 0..65 {
        k.add_offsets(v1::AddOffsetsRequest {
            resource_id: "kafka".into(),
            gtid: gtid.clone(),
            branch_id: "out".into(),
            group_id: format!("{topic}-group-{i}"),
            offsets: vec![v1::TopicPartitionOffset { topic: topic.clone(), partition: 0, offset: 1 }],
        })
        .await
        .unwrap_or_else(|e| panic!("group {i}: {e}"));
    }
    let r = commit(&mut c, &gtid, true).await.unwrap();
    assert_eq!(r.outcome(), v1::Outcome::Committed, "{}", r.reason);
}
