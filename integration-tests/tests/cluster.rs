//! A cluster of coordinators on a PostgreSQL decision store, as real processes: the store's
//! fence refusing a former owner's write, kill -9 of an instance under a bank workload over two
//! PostgreSQL databases, and a paused owner that wakes up after its shard was taken over.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use pledge_coordinator::cluster::{ClusterState, schema, store::PgLog, store::WriterConfig};
use pledge_coordinator::engine::{
    BranchOutcome, CommitRecord, EndBranch, EndRecord, LogRecord, LoggedBranch, ResolveAction, ResolveEffect,
    ResolveRecord, Vote,
};
use pledge_coordinator::store::{DecisionLog, StoreError};
use pledge_integration_tests::cluster::*;
use pledge_integration_tests::pg::*;
use pledge_integration_tests::proxy::{Link, Proxy, pg_addr, via};
use pledge_integration_tests::store::StorePair;
use pledge_integration_tests::*;
use pledge_proto::v1::coordinator_client::CoordinatorClient;
use pledge_proto::v1::{self, postgres_branch_client::PostgresBranchClient};
use pledge_proto::{BranchKey, Gtid};
use sqlx::PgPool;
use tokio::sync::Mutex;
use tonic::Code;

fn commit_record(gtid: Gtid, epoch: u64) -> LogRecord {
    LogRecord::Commit(CommitRecord {
        gtid,
        epoch,
        created_ms: 1,
        decided_ms: 2,
        idempotency_key: None,
        branches: vec![LoggedBranch {
            key: BranchKey::new("db1", "b1").unwrap(),
            vote: Vote::Prepared,
            metadata: Bytes::new(),
            prepared_ms: 1,
        }],
        three_phase: None,
        owner: None,
    })
}

/// Get, retried while it answers UNAVAILABLE (a shard moving between instances, as shards do
/// for a moment after a failover or a restart: what a client does too); any other error fails.
async fn get_retrying(c: &CoordinatorClient<tonic::transport::Channel>, gtid: &str) -> v1::Transaction {
    eventually(&format!("{gtid} answered"), || {
        let mut c = c.clone();
        async move {
            match get(&mut c, gtid).await {
                Ok(t) => Some(t),
                Err(e) if e.code() == Code::Unavailable => None,
                Err(e) => panic!("{gtid}: {e}"),
            }
        }
    })
    .await
}

/// Instances `a` then `b` of one cluster on `store_url`, returned once they own the shards
/// evenly; `a_env` arms crash points at `a`.
struct Two {
    a: Process,
    b: Process,
    a_id: String,
    b_id: String,
    store: StoreView,
    /// The cluster's shard count.
    count: usize,
}

async fn two_instances(
    dir: &TestDir,
    store_url: &str,
    cid: &str,
    participants: &[(&str, String)],
    args: &[&str],
    a_env: &[(&str, &str)],
) -> Two {
    let a = dir.cluster_instance_with_env("a", store_url, cid, participants, args, a_env).await;
    let store = StoreView::connect(store_url).await;
    let a_id = store.instance_id(&a).await;
    store.wait_owned_evenly_by(std::slice::from_ref(&a_id), Duration::from_secs(30)).await;
    let b = dir.cluster_instance("b", store_url, cid, participants, args).await;
    let b_id = store.instance_id(&b).await;
    store.wait_owned_evenly_by(&[a_id.clone(), b_id.clone()], Duration::from_secs(30)).await;
    let count = store.shard_count().await;
    Two { a, b, a_id, b_id, store, count }
}

impl Two {
    /// Begins transactions over db1/b1 and db2/b1 at `a` until one lands in a shard `a` owns
    /// (the others are aborted); its GTID and shard.
    async fn begin_at_a(&self) -> (String, i32) {
        let mut ca = coordinator_client(&self.a).await;
        loop {
            let gtid = begin(&mut ca, &[("db1", "b1"), ("db2", "b1")]).await;
            let shard = shard_of(&gtid, self.count);
            if self.store.owner(shard).await.is_some_and(|(h, _)| h == self.a_id) {
                return (gtid, shard);
            }
            let _ = ca.abort(v1::AbortRequest { gtid }).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_refuses_a_former_owners_decision() {
    let url = fresh_database("fence").await;
    let pool = PgPool::connect(&url).await.unwrap();
    let info = schema::prepare(&pool, 4, "fence-test").await.unwrap();
    assert_eq!(info.shard_count, 4);
    let take = |holder: &'static str, epoch: i64| {
        let pool = pool.clone();
        async move {
            sqlx::query(
                "UPDATE pledge_lease SET holder = $1, epoch = $2, expires_at = now() + interval '1 hour' WHERE shard = 1",
            )
            .bind(holder)
            .bind(epoch)
            .execute(&pool)
            .await
            .unwrap();
        }
    };
    take("a", 1).await;
    let a = Arc::new(ClusterState::new("a".into(), "http://a".into(), 4));
    a.own(1, 1);
    let config = WriterConfig {
        lanes: 2,
        max_batch_records: 64,
        timeout: Duration::from_secs(5),
        max_retry: Duration::from_secs(10),
    };
    let mut log = PgLog::start(pool.clone(), a.clone(), config);
    let store = StoreView { pool: pool.clone() };

    let first = Gtid::new_v7_in_shard(1, 4);
    let durable = log.append(&commit_record(first, 1), true).await.unwrap().expect("a durable append");
    durable.await.expect("written while the lease is ours");
    assert_eq!(store.record_kind(&first.to_string()).await, Some(2));

    // Another instance takes the shard over; `a` has not noticed (paused, partitioned...).
    take("b", 2).await;
    let second = Gtid::new_v7_in_shard(1, 4);
    let durable = log.append(&commit_record(second, 1), true).await.unwrap().expect("a durable append");
    match durable.await {
        Err(StoreError::Fenced { shard: 1, epoch: 1 }) => {}
        other => panic!("a former owner's decision must be refused by the store, got {other:?}"),
    }
    assert_eq!(store.record_kind(&second.to_string()).await, None, "the refused decision was written");
    assert_eq!(a.epoch_of(1), None, "the fenced instance still believes it owns the shard");
}

/// Resolutions go to their own table, fenced like decisions, written again after an unknown
/// outcome without a second row; one that repairs a kept transaction's last heuristic outcome
/// lets its row expire from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_keeps_resolutions_fenced_and_releases_a_repaired_transaction() {
    let url = fresh_database("resolutions").await;
    let pool = PgPool::connect(&url).await.unwrap();
    schema::prepare(&pool, 4, "resolutions-test").await.unwrap();
    let take = |holder: &'static str, epoch: i64| {
        sqlx::query(
            "UPDATE pledge_lease SET holder = $1, epoch = $2, expires_at = now() + interval '1 hour' WHERE shard = 1",
        )
        .bind(holder)
        .bind(epoch)
        .execute(&pool)
    };
    take("a", 1).await.unwrap();
    let a = Arc::new(ClusterState::new("a".into(), "http://a".into(), 4));
    a.own(1, 1);
    let config = WriterConfig {
        lanes: 1,
        max_batch_records: 64,
        timeout: Duration::from_secs(5),
        max_retry: Duration::from_secs(10),
    };
    let mut log = PgLog::start(pool.clone(), a.clone(), config);
    let gtid = Gtid::new_v7_in_shard(1, 4);
    let key = BranchKey::new("db1", "b1").unwrap();
    let end = LogRecord::End(Arc::new(EndRecord {
        gtid,
        committed: true,
        reason: None,
        created_ms: 1,
        decided_ms: 2,
        completed_ms: 3,
        one_phase: false,
        three_phase: None,
        idempotency_key: None,
        branches: vec![EndBranch {
            key: key.clone(),
            vote: Some(Vote::Prepared),
            outcome: Some(BranchOutcome::HeuristicRollback),
        }],
        kept_for_operator: true,
        encoded: Default::default(),
        owner: None,
    }));
    let resolution = |releases: bool, epoch: u64| {
        LogRecord::Resolve(Arc::new(ResolveRecord {
            gtid,
            epoch,
            at_ms: 12_345,
            action: ResolveAction::Commit,
            branch: Some(key.clone()),
            operator: "tester".into(),
            peer: "127.0.0.1:1".into(),
            reason: "re-applied by hand".into(),
            effect: ResolveEffect::BranchSettled,
            branch_outcome: Some(BranchOutcome::HeuristicRollback),
            hazards: vec![],
            releases,
        }))
    };
    let row = || async {
        let (keep, completed): (bool, i64) =
            sqlx::query_as("SELECT keep, completed_ms FROM pledge_decision WHERE gtid = $1")
                .bind(gtid.as_uuid())
                .fetch_one(&pool)
                .await
                .unwrap();
        let resolutions: i64 = sqlx::query_scalar("SELECT count(*) FROM pledge_resolution WHERE gtid = $1")
            .bind(gtid.as_uuid())
            .fetch_one(&pool)
            .await
            .unwrap();
        (keep, completed, resolutions)
    };
    log.append(&end, true).await.unwrap().unwrap().await.unwrap();
    assert_eq!(row().await, (true, 3, 0), "kept for an operator");
    for _ in 0..2 {
        log.append(&resolution(true, 1), true).await.unwrap().unwrap().await.unwrap();
    }
    assert_eq!(row().await, (false, 12_345, 1), "released from the resolution on, written once");

    // Another instance took the shard: a resolution at the old epoch is refused.
    take("b", 2).await.unwrap();
    match log.append(&resolution(false, 1), true).await.unwrap().unwrap().await {
        Err(StoreError::Fenced { shard: 1, epoch: 1 }) => {}
        other => panic!("a former owner's resolution must be refused by the store, got {other:?}"),
    }
    assert_eq!(row().await, (false, 12_345, 1));
}

/// An operator's resolution sent to any instance is carried out by the owner of the
/// transaction's shard, kept in the store, and known to the instance that takes the shard
/// over when the owner dies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolution_is_forwarded_to_the_owner_and_survives_a_takeover() {
    let dir = TestDir::new("cl-resolve");
    let store_url = fresh_database("cl-resolve").await;
    let cid = format!("cl-resolve-{:06x}", fastrand::u32(..) & 0xffffff);
    let db1 = dir.participant("db1", 0, &[], &[]).await;
    let mut db2 = dir.participant("db2", 0, &[], &[("PLEDGE_CRASH_AT", "participant::before_commit")]).await;
    let participants = [("db1", db1.endpoint()), ("db2", db2.endpoint())];
    let mut two = two_instances(&dir, &store_url, &cid, &participants, &[], &[]).await;

    // A transaction in one of a's shards, committed; db2 dies as its commit reaches it.
    let (gtid, shard) = two.begin_at_a().await;
    let mut ca = coordinator_client(&two.a).await;
    put(&mut store_client(&db1).await, &gtid, "b1", "k1", "v1").await;
    put(&mut store_client(&db2).await, &gtid, "b1", "k1", "v1").await;
    assert_eq!(commit(&mut ca, &gtid, false).await.unwrap().outcome(), v1::Outcome::Committed);
    db2.wait_crashed().await;

    // Asked at b, done by a.
    let args = ["txn", "resolve", &gtid, "db2/b1", "--commit", "--reason", "db2 retired", "--operator", "tester"];
    let out = cli(&two.b, &args);
    assert!(out.starts_with("resolved: branch db2/b1 recorded as committed"), "{out}");
    let in_store: i64 = sqlx::query_scalar("SELECT count(*) FROM pledge_resolution WHERE gtid = $1::uuid")
        .bind(&gtid)
        .fetch_one(&PgPool::connect(&store_url).await.unwrap())
        .await
        .unwrap();
    assert_eq!(in_store, 1);

    // a dies; b takes the shard over and knows the transaction finished by the operator.
    two.a.kill9().await;
    let (store, b_id) = (&two.store, &two.b_id);
    eventually("b owns the dead instance's shard", || async { store.owner(shard).await.filter(|(h, _)| h == b_id) })
        .await;
    let t = get_retrying(&coordinator_client(&two.b).await, &gtid).await;
    assert_eq!(t.state(), v1::TransactionState::Committed, "{t:?}");
    assert_eq!(t.resolutions.len(), 1);
    assert_eq!((t.resolutions[0].operator.as_str(), t.resolutions[0].reason.as_str()), ("tester", "db2 retired"));
    assert!(t.branches.iter().find(|b| b.resource_id == "db2").unwrap().resolved);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_schema_newer_than_the_binary_is_refused() {
    let url = fresh_database("schema").await;
    let pool = PgPool::connect(&url).await.unwrap();
    schema::prepare(&pool, 8, "schema-test").await.unwrap();
    // Preparing again is a no-op that keeps the cluster's settings.
    let again = schema::prepare(&pool, 16, "other").await.unwrap();
    assert_eq!((again.shard_count, again.cluster_id.as_str()), (8, "schema-test"));
    sqlx::query("UPDATE pledge_schema SET version = $1").bind(schema::SCHEMA_VERSION + 1).execute(&pool).await.unwrap();
    let e = schema::prepare(&pool, 8, "schema-test").await.unwrap_err().to_string();
    assert!(e.contains("newer than this binary knows"), "{e}");
}

/// Three instances on one store; one PostgreSQL adapter for two databases.
struct Bank3 {
    dir: TestDir,
    /// A primary with a synchronous standby; `store_url` reaches the primary.
    store: StorePair,
    store_url: String,
    cid: String,
    adapter: Process,
    instances: Vec<Process>,
}

impl Bank3 {
    async fn start(test: &str, count: usize) -> Bank3 {
        let dir = TestDir::new(test);
        let store = StorePair::start().await;
        let store_url = store.url();
        let cid = format!("{test}-{:06x}", fastrand::u32(..) & 0xffffff);
        let adapter = dir
            .postgres_adapter(
                "pg",
                0,
                &[("db_a", pg_url('a')), ("db_b", pg_url('b'))],
                &["--active-timeout-ms", "3000", "--statement-timeout-ms", "5000"],
                &[],
            )
            .await;
        let mut b = Bank3 { dir, store, store_url, cid, adapter, instances: Vec::new() };
        for i in 0..count {
            let p = b.instance(&format!("c{i}")).await;
            b.instances.push(p);
        }
        b
    }

    async fn instance(&self, name: &str) -> Process {
        let participants = [("db_a", self.adapter.endpoint()), ("db_b", self.adapter.endpoint())];
        self.dir.cluster_instance(name, &self.store_url, &self.cid, &participants, &[]).await
    }
}

/// One transfer through `c`: begin, a debit and a credit at the adapter, commit. `Ok(Some(gtid))`
/// if the commit was acknowledged, `Ok(None)` if it aborted, `Err` if the coordinator failed.
async fn transfer(
    c: &mut CoordinatorClient<tonic::transport::Channel>,
    pg: &mut PostgresBranchClient<tonic::transport::Channel>,
    bank: &Bank,
    accounts: i64,
) -> Result<Option<String>, tonic::Status> {
    let (from, to) = (fastrand::i64(1..=accounts), fastrand::i64(1..=accounts));
    let amount = fastrand::i64(1..=50);
    let branches = vec![branch("db_a", "d"), branch("db_b", "c")];
    let gtid = c.begin(v1::BeginRequest { branches, ..Default::default() }).await?.into_inner().gtid;
    let worked = async {
        execute(pg, "db_a", &gtid, "d", &bank.update(), vec![int(-amount), int(from)]).await?;
        execute(pg, "db_b", &gtid, "c", &bank.update(), vec![int(amount), int(to)]).await
    }
    .await;
    if worked.is_err() {
        let _ = c.abort(v1::AbortRequest { gtid }).await;
        return Ok(None);
    }
    let r = commit(c, &gtid, false).await?;
    Ok((r.outcome() == v1::Outcome::Committed).then_some(gtid))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_killed_mid_load_loses_no_commit_and_its_shards_move() {
    const ACCOUNTS: i64 = 20;
    const CLIENTS: usize = 12;
    let mut b = Bank3::start("cl-kill", 3).await;
    let store = StoreView::connect(&b.store_url).await;
    let mut ids = Vec::new();
    for p in &b.instances {
        ids.push(store.instance_id(p).await);
    }
    store.wait_owned_evenly_by(&ids, Duration::from_secs(30)).await;
    let bank = Arc::new(Bank::new("clkill", ACCOUNTS, 1000).await);
    let initial = bank.total().await;
    let endpoints: Vec<String> = b.instances.iter().map(Process::endpoint).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut clients = Vec::new();
    for n in 0..CLIENTS {
        let (bank, stop, acknowledged, endpoints) =
            (bank.clone(), stop.clone(), acknowledged.clone(), endpoints.clone());
        let adapter = b.adapter.endpoint();
        clients.push(tokio::spawn(async move {
            let mut pg = PostgresBranchClient::connect(adapter).await.unwrap();
            let mut at = n % endpoints.len();
            let (mut failures, mut other_codes) = (0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let Ok(mut c) = CoordinatorClient::connect(endpoints[at].clone()).await else {
                    at = (at + 1) % endpoints.len();
                    continue;
                };
                while !stop.load(Ordering::Relaxed) {
                    match transfer(&mut c, &mut pg, &bank, ACCOUNTS).await {
                        Ok(Some(gtid)) => acknowledged.lock().await.push(gtid),
                        Ok(None) => {}
                        Err(status) => {
                            failures += 1;
                            if !matches!(
                                status.code(),
                                Code::Unavailable | Code::NotFound | Code::Unknown | Code::Cancelled
                            ) {
                                other_codes.push(status.to_string());
                            }
                            // Another instance (this one may be dead).
                            at = (at + 1) % endpoints.len();
                            break;
                        }
                    }
                }
            }
            (failures, other_codes)
        }));
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    let victim_shards = store.shards_of(&ids[0]).await;
    assert!(!victim_shards.is_empty());
    b.instances[0].kill9().await;
    let moved = store.wait_owned_evenly_by(&ids[1..], Duration::from_secs(10)).await;
    println!("the killed instance's {} shards were owned elsewhere after {moved:?}", victim_shards.len());
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let (_, other_codes) = c.await.unwrap();
        assert!(other_codes.is_empty(), "calls failed with non-retriable statuses: {other_codes:?}");
    }
    let acknowledged = acknowledged.lock().await.clone();
    assert!(acknowledged.len() > 50, "only {} transfers committed", acknowledged.len());
    // No acknowledged commit is lost: every one is committed in the store (asked at any instance).
    let c = coordinator_client(&b.instances[2]).await;
    for gtid in &acknowledged {
        let t = get_retrying(&c, gtid).await;
        assert!(
            matches!(t.state(), v1::TransactionState::Committed | v1::TransactionState::Committing),
            "{gtid} was acknowledged as committed but is {:?}",
            t.state()
        );
    }
    eventually("no prepared transaction of the cluster left", || async {
        prepared_of(&b.cid).await.is_empty().then_some(())
    })
    .await;
    assert_eq!(bank.total().await, initial, "money was created or destroyed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_owner_is_fenced_and_steps_down_without_contradicting_the_new_owner() {
    let dir = TestDir::new("cl-pause");
    let pair = StorePair::start().await;
    let store_url = pair.url();
    let cid = format!("cl-pause-{:06x}", fastrand::u32(..) & 0xffffff);
    let db1 = dir.participant("db1", 0, &[], &[]).await;
    // db2 answers each Prepare only after this long: the owner is paused meanwhile.
    let db2 = dir.participant("db2", 0, &["--stall-prepare-ms", "6000"], &[]).await;
    let participants = [("db1", db1.endpoint()), ("db2", db2.endpoint())];
    let args = ["--prepare-timeout-ms", "60000"];
    let two = two_instances(&dir, &store_url, &cid, &participants, &args, &[]).await;

    // A transaction in one of a's shards, with work at both participants.
    let (gtid, shard) = two.begin_at_a().await;
    let Two { a, b_id, store, .. } = two;
    let ca = coordinator_client(&a).await;
    let (_, epoch_a) = store.owner(shard).await.unwrap();
    put(&mut store_client(&db1).await, &gtid, "b1", "k1", "v1").await;
    put(&mut store_client(&db2).await, &gtid, "b1", "k2", "v2").await;
    // a asks both to prepare: db1 votes at once, db2 in 6 s; a is about to commit.
    let committing = {
        let mut ca = ca.clone();
        let gtid = gtid.clone();
        tokio::spawn(async move { commit(&mut ca, &gtid, false).await })
    };
    wait_branch_state(&db1, &gtid, "b1", v1::BranchState::Prepared).await;
    a.signal(libc::SIGSTOP);

    // b takes the shard over once a's lease expires, and decides: no record, so abort.
    let taken = eventually("b owns the paused instance's shard", || async {
        store.owner(shard).await.filter(|(h, _)| *h == b_id)
    })
    .await;
    assert!(taken.1 > epoch_a, "the takeover raised the epoch");
    wait_branch_state(&db1, &gtid, "b1", v1::BranchState::Aborted).await;

    // db2 votes yes (to the paused a) after its stall; then a wakes up.
    tokio::time::sleep(Duration::from_secs(7)).await;
    a.signal(libc::SIGCONT);
    let answer = tokio::time::timeout(Duration::from_secs(30), committing).await.expect("a answers").unwrap();
    match answer {
        Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status}"),
        Ok(r) => assert_ne!(r.outcome(), v1::Outcome::Committed, "the paused owner committed after its takeover"),
    }
    // Its decision write was refused: the store holds no commit of the transaction.
    assert_ne!(store.record_kind(&gtid).await, Some(2), "the former owner's commit reached the store");
    // Neither participant ever commits it; the new owner's recovery rolls db2 back too.
    wait_branch_state(&db2, &gtid, "b1", v1::BranchState::Aborted).await;
    assert_eq!(branch_state(&mut store_client(&db1).await, &gtid, "b1").await, v1::BranchState::Aborted);
    assert_eq!(read(&mut store_client(&db1).await, "k1").await, None);
    assert_eq!(read(&mut store_client(&db2).await, "k2").await, None);
    // a stepped down: the shard is b's, and a forwards calls about it there.
    assert_eq!(store.owner(shard).await.map(|(h, _)| h), Some(b_id));
    // Whichever it noticed first: its lease lapsed, the store refused its write, or a renewal
    // found another holder.
    let owner_log = a.log();
    assert!(
        ["no longer driving the shard", "decision write refused", "shard lease lost"]
            .iter()
            .any(|m| owner_log.contains(m)),
        "the paused instance did not report losing its shard:\n{}",
        a.log_tail()
    );
    let metrics = a.metrics().await;
    assert!(metrics.get("pledge_cluster_ownership_changes_total{change=\"lost\"}") >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_owner_never_rolls_back_a_branch_its_successor_committed() {
    let dir = TestDir::new("cl-stale");
    let store_url = fresh_database("cl-stale").await;
    let cid = format!("cl-stale-{:06x}", fastrand::u32(..) & 0xffffff);
    let db1 = dir.participant("db1", 0, &[], &[]).await;
    // db2 takes its time over each Commit: the branch stays prepared (listed as in doubt)
    // while the new owner's commit is on its way.
    let db2 = dir.participant("db2", 0, &["--stall-commit-ms", "4000"], &[]).await;
    let participants = [("db1", db1.endpoint()), ("db2", db2.endpoint())];
    let Two { a, b, a_id, b_id, store, count } = two_instances(&dir, &store_url, &cid, &participants, &[], &[]).await;
    let shard = store.shards_of(&b_id).await[0];

    // b stops; a takes its shards over once the lease expires.
    b.signal(libc::SIGSTOP);
    eventually("a owns the paused instance's shard", || async { store.owner(shard).await.filter(|(h, _)| *h == a_id) })
        .await;

    // a commits a transaction in that shard; db2's branch stays prepared while its commit
    // stalls.
    let mut ca = coordinator_client(&a).await;
    let gtid = loop {
        let gtid = begin(&mut ca, &[("db1", "b1"), ("db2", "b1")]).await;
        if shard_of(&gtid, count) == shard {
            break gtid;
        }
        let _ = ca.abort(v1::AbortRequest { gtid }).await;
    };
    put(&mut store_client(&db1).await, &gtid, "b1", "k1", "v1").await;
    put(&mut store_client(&db2).await, &gtid, "b1", "k2", "v2").await;
    let r = commit(&mut ca, &gtid, false).await.expect("committed");
    assert_eq!(r.outcome(), v1::Outcome::Committed);
    wait_branch_state(&db1, &gtid, "b1", v1::BranchState::Committed).await;
    assert_eq!(branch_state(&mut store_client(&db2).await, &gtid, "b1").await, v1::BranchState::Prepared);

    // b wakes believing it still owns the shard; its overdue recovery scan lists db2's
    // branch, of a transaction it has no record of. It must not presume an abort: the store
    // no longer confirms its lease.
    b.signal(libc::SIGCONT);
    eventually("b's recovery scan ran after it woke", || async {
        b.log().contains("resolving in-doubt branches").then_some(())
    })
    .await;
    wait_branch_state(&db2, &gtid, "b1", v1::BranchState::Committed).await;
    assert_eq!(read(&mut store_client(&db2).await, "k2").await.as_deref(), Some("v2"));
    let t = eventually("a hears db2's commit", || {
        let (mut ca, gtid) = (ca.clone(), gtid.clone());
        async move { get(&mut ca, &gtid).await.ok().filter(|t| t.state() == v1::TransactionState::Committed) }
    })
    .await;
    assert!(!t.heuristic, "{t:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_cut_off_from_the_store_past_its_lease_takes_its_shards_back() {
    let dir = TestDir::new("cl-outage");
    let direct = fresh_database("cl-outage").await;
    let proxy = Proxy::start(pg_addr()).await;
    let cid = format!("cl-outage-{:06x}", fastrand::u32(..) & 0xffffff);
    let db1 = dir.participant("db1", 0, &[], &[]).await;
    let participants = [("db1", db1.endpoint())];
    let a = dir.cluster_instance("a", &via(&direct, proxy.addr), &cid, &participants, &[]).await;
    let store = StoreView::connect(&direct).await;
    let a_id = store.instance_id(&a).await;
    store.wait_owned_evenly_by(std::slice::from_ref(&a_id), Duration::from_secs(30)).await;
    let mut c = coordinator_client(&a).await;
    let begin_at = |c: &CoordinatorClient<_>| {
        let mut c = c.clone();
        async move { c.begin(v1::BeginRequest { branches: vec![branch("db1", "b")], ..Default::default() }).await }
    };
    let serving = |c: &CoordinatorClient<_>| {
        let c = c.clone();
        async move {
            // Every shard adopted: Begin issues GTIDs in any of them.
            for _ in 0..32 {
                begin_at(&c).await.ok()?;
            }
            Some(())
        }
    };
    eventually("the instance serves", || serving(&c)).await;
    let epochs = || async { store.live_leases().await.iter().map(|(s, _, e)| (*s, *e)).collect::<Vec<_>>() };
    let before = epochs().await;
    assert_eq!(before.len(), store.shard_count().await);

    // The store goes away for longer than the lease: the instance stops driving every shard,
    // and calls fail with a retriable status.
    proxy.set(Link::Cut);
    eventually("the instance stops issuing transactions", || async {
        begin_at(&c).await.err().filter(|s| s.code() == Code::Unavailable).map(|_| ())
    })
    .await;

    // It comes back: the lease rows still name the instance, and it takes every shard again
    // at a new epoch (nobody else would: it is the only instance).
    proxy.set(Link::Open);
    eventually("every shard is taken again at a new epoch", || async {
        let after = epochs().await;
        (after.len() == before.len() && after.iter().zip(&before).all(|(a, b)| a.1 > b.1)).then_some(())
    })
    .await;
    eventually("the instance serves again", || serving(&c)).await;
    let gtid = begin_at(&c).await.expect("begin").into_inner().gtid;
    put(&mut store_client(&db1).await, &gtid, "b", "k", "v").await;
    let r = commit(&mut c, &gtid, true).await.expect("commit");
    assert_eq!(r.outcome(), v1::Outcome::Committed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_instance_answers_any_call_and_the_client_learns_the_owner() {
    let dir = TestDir::new("cl-route");
    let store_url = fresh_database("cl-route").await;
    let cid = format!("cl-route-{:06x}", fastrand::u32(..) & 0xffffff);
    let (db1, db2) = (dir.participant("db1", 0, &[], &[]).await, dir.participant("db2", 0, &[], &[]).await);
    let a = dir.cluster_instance("a", &store_url, &cid, &[], &[]).await;
    let b = dir.cluster_instance("b", &store_url, &cid, &[], &[]).await;
    let store = StoreView::connect(&store_url).await;
    let ids = [store.instance_id(&a).await, store.instance_id(&b).await];
    store.wait_owned_evenly_by(&ids, Duration::from_secs(30)).await;

    // Participants registered at one instance are known to every instance.
    let mut ca = coordinator_client(&a).await;
    for (resource, p) in [("db1", &db1), ("db2", &db2)] {
        let r = v1::RegisterParticipantRequest { resource_id: resource.into(), endpoint: p.endpoint() };
        ca.register_participant(r).await.unwrap();
    }
    let mut cb = coordinator_client(&b).await;
    eventually("b knows the participants registered at a", || {
        let mut cb = cb.clone();
        async move {
            let list = cb.list_participants(v1::ListParticipantsRequest {}).await.ok()?.into_inner().participants;
            (list.len() == 2).then_some(())
        }
    })
    .await;

    // Transactions through the cluster client, begun at either instance, committed where
    // their shard lives.
    let client = pledge_proto::client::ClusterClient::new(vec![a.endpoint(), b.endpoint()]).unwrap();
    let mut gtids = Vec::new();
    for i in 0..6 {
        let branches = vec![branch("db1", "b1"), branch("db2", "b1")];
        let gtid = client.begin(v1::BeginRequest { branches, ..Default::default() }).await.unwrap().gtid;
        let owner = client.owner_of(&gtid).expect("the owner is learned from Begin");
        let shard = shard_of(&gtid, store.shard_count().await);
        let (holder, _) = store.owner(shard).await.unwrap();
        let owner_id = if owner == a.endpoint() { &ids[0] } else { &ids[1] };
        assert_eq!(&holder, owner_id, "the learned owner is the shard's owner");
        put(&mut store_client(&db1).await, &gtid, "b1", &format!("x{i}"), "1").await;
        put(&mut store_client(&db2).await, &gtid, "b1", &format!("y{i}"), "1").await;
        let r = client.commit(v1::CommitRequest { gtid: gtid.clone(), ..Default::default() }).await.unwrap();
        assert_eq!(r.outcome(), v1::Outcome::Committed);
        gtids.push(gtid);
    }
    // Get at either instance; List at either lists every instance's transactions.
    for gtid in &gtids {
        for c in [&mut ca, &mut cb] {
            assert_eq!(get(c, gtid).await.unwrap().state(), v1::TransactionState::Committed);
        }
    }
    for c in [&mut ca, &mut cb] {
        let listed = c.list(v1::ListRequest::default()).await.unwrap().into_inner().transactions;
        for gtid in &gtids {
            assert!(listed.iter().any(|t| t.gtid == *gtid), "{gtid} missing from List");
        }
    }
    // The operator's view, from the store.
    let status = tokio::process::Command::new(bin("pledge"))
        .args(["cluster", "status", "--store", &store_url])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{text}{}", String::from_utf8_lossy(&status.stderr));
    assert!(text.contains("instances (2 live)"), "{text}");
    assert!(text.contains(&ids[0]) && text.contains(&ids[1]), "{text}");
    assert!(text.contains("0 shard(s) without a live owner"), "{text}");
    // A call about a transaction of the other instance's shard is forwarded and says so.
    let theirs = gtids.iter().find(|g| client.owner_of(g) == Some(b.endpoint())).expect("some at b");
    let r = ca.get(v1::GetRequest { gtid: theirs.clone() }).await.unwrap();
    assert_eq!(r.metadata().get("pledge-owner").and_then(|v| v.to_str().ok()), Some(b.endpoint().as_str()));
}

/// A transfer through the cluster client, retrying calls that fail UNAVAILABLE (the only
/// failure a rolling restart may cause). `Err` carries any other failure.
async fn transfer_retrying(
    client: &pledge_proto::client::ClusterClient,
    pg: &mut PostgresBranchClient<tonic::transport::Channel>,
    bank: &Bank,
    accounts: i64,
    unavailable: &mut u64,
) -> Result<Option<String>, tonic::Status> {
    async fn retry<T, F, Fut>(unavailable: &mut u64, mut call: F) -> Result<T, tonic::Status>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        for _ in 0..200 {
            match call().await {
                Err(s) if s.code() == Code::Unavailable => {
                    *unavailable += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => return other,
            }
        }
        Err(tonic::Status::deadline_exceeded("still unavailable after 200 tries"))
    }
    let (from, to) = (fastrand::i64(1..=accounts), fastrand::i64(1..=accounts));
    let amount = fastrand::i64(1..=50);
    let begun = retry(unavailable, || {
        let branches = vec![branch("db_a", "d"), branch("db_b", "c")];
        client.begin(v1::BeginRequest { branches, ..Default::default() })
    })
    .await?;
    let gtid = begun.gtid;
    let worked = async {
        execute(pg, "db_a", &gtid, "d", &bank.update(), vec![int(-amount), int(from)]).await?;
        execute(pg, "db_b", &gtid, "c", &bank.update(), vec![int(amount), int(to)]).await
    }
    .await;
    if worked.is_err() {
        retry(unavailable, || client.abort(v1::AbortRequest { gtid: gtid.clone() })).await?;
        return Ok(None);
    }
    let r =
        retry(unavailable, || client.commit(v1::CommitRequest { gtid: gtid.clone(), ..Default::default() })).await?;
    Ok((r.outcome() == v1::Outcome::Committed).then_some(gtid))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_load_fails_no_call_but_with_unavailable() {
    const ACCOUNTS: i64 = 20;
    const CLIENTS: usize = 8;
    let mut b = Bank3::start("cl-roll", 3).await;
    let store = StoreView::connect(&b.store_url).await;
    let mut ids = Vec::new();
    for p in &b.instances {
        ids.push(store.instance_id(p).await);
    }
    store.wait_owned_evenly_by(&ids, Duration::from_secs(30)).await;
    let bank = Arc::new(Bank::new("clroll", ACCOUNTS, 1000).await);
    let initial = bank.total().await;
    // The clients know the instances by endpoint; restarted instances come back on new ports,
    // so every endpoint any instance ever had is given up front (ports picked now).
    let ports: Vec<u16> = (0..6).map(|_| free_port()).collect();
    let endpoints: Vec<String> = b
        .instances
        .iter()
        .map(Process::endpoint)
        .chain(ports[3..].iter().map(|p| format!("http://127.0.0.1:{p}")))
        .collect();
    let client = Arc::new(pledge_proto::client::ClusterClient::new(endpoints).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let (bank, stop, acknowledged, client) = (bank.clone(), stop.clone(), acknowledged.clone(), client.clone());
        let adapter = b.adapter.endpoint();
        clients.push(tokio::spawn(async move {
            let mut pg = PostgresBranchClient::connect(adapter).await.unwrap();
            let (mut unavailable, mut failures) = (0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match transfer_retrying(&client, &mut pg, &bank, ACCOUNTS, &mut unavailable).await {
                    Ok(Some(gtid)) => acknowledged.lock().await.push(gtid),
                    Ok(None) => {}
                    Err(status) => failures.push(status.to_string()),
                }
            }
            (unavailable, failures)
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    for i in 0..3 {
        let status = b.instances[i].terminate().await;
        assert!(status.success(), "instance {i} exited with {status}:\n{}", b.instances[i].log_tail());
        let name = format!("c{i}-restarted");
        let participants = [("db_a", b.adapter.endpoint()), ("db_b", b.adapter.endpoint())];
        let listen = format!("127.0.0.1:{}", ports[3 + i]);
        let p = b.dir.cluster_instance(&name, &b.store_url, &b.cid, &participants, &["--listen", &listen]).await;
        ids[i] = store.instance_id(&p).await;
        b.instances[i] = p;
        // Balanced again before the next one goes.
        eventually("the restarted instance took its share", || async {
            (store.shards_of(&ids[i]).await.len() >= 20).then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut unavailable = 0;
    for c in clients {
        let (u, failures) = c.await.unwrap();
        unavailable += u;
        assert!(failures.is_empty(), "calls failed with other than UNAVAILABLE: {failures:?}");
    }
    let acknowledged = acknowledged.lock().await.clone();
    println!("rolling restart: {} committed, {unavailable} calls answered UNAVAILABLE and retried", acknowledged.len());
    assert!(acknowledged.len() > 50, "only {} transfers committed", acknowledged.len());
    let c = coordinator_client(&b.instances[0]).await;
    for gtid in &acknowledged {
        let t = get_retrying(&c, gtid).await;
        assert!(
            matches!(t.state(), v1::TransactionState::Committed | v1::TransactionState::Committing),
            "{gtid} was acknowledged as committed but is {:?}",
            t.state()
        );
    }
    eventually("no prepared transaction of the cluster left", || async {
        prepared_of(&b.cid).await.is_empty().then_some(())
    })
    .await;
    assert_eq!(bank.total().await, initial, "money was created or destroyed");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stores_primary_fails_over_and_no_acknowledged_decision_is_lost() {
    const ACCOUNTS: i64 = 20;
    const CLIENTS: usize = 8;
    let b = Bank3::start("cl-failover", 2).await;
    let store = StoreView::connect(&b.store_url).await;
    let ids = [store.instance_id(&b.instances[0]).await, store.instance_id(&b.instances[1]).await];
    store.wait_owned_evenly_by(&ids, Duration::from_secs(30)).await;
    drop(store);
    let bank = Arc::new(Bank::new("clfail", ACCOUNTS, 1000).await);
    let initial = bank.total().await;
    let endpoints: Vec<String> = b.instances.iter().map(Process::endpoint).collect();
    let client = Arc::new(pledge_proto::client::ClusterClient::new(endpoints).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let (bank, stop, acknowledged, client) = (bank.clone(), stop.clone(), acknowledged.clone(), client.clone());
        let adapter = b.adapter.endpoint();
        clients.push(tokio::spawn(async move {
            let mut pg = PostgresBranchClient::connect(adapter).await.unwrap();
            let (mut retriable, mut lost, mut failures) = (0u64, 0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match transfer_retrying(&client, &mut pg, &bank, ACCOUNTS, &mut retriable).await {
                    Ok(Some(gtid)) => acknowledged.lock().await.push(gtid),
                    Ok(None) => {}
                    // A transaction active when its shard's owner stopped driving it (the
                    // store was gone for a lease) has no decision: not committed.
                    Err(s) if s.code() == Code::NotFound => lost += 1,
                    Err(s) if s.code() == Code::DeadlineExceeded => retriable += 1,
                    Err(s) => failures.push(s.to_string()),
                }
            }
            (retriable, lost, failures)
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = acknowledged.lock().await.len();
    b.store.kill_primary();
    // Longer than a lease: the instances stop driving their shards (a shorter gap is
    // bridged: their writes are retried until the new primary answers).
    tokio::time::sleep(Duration::from_millis(LEASE_MS + 1_000)).await;
    b.store.promote_standby().await;
    // The instances reconnect and take their shards back; the load goes on.
    let store = StoreView::connect(&b.store_url).await;
    store.wait_owned_evenly_by(&ids, Duration::from_secs(30)).await;
    eventually("transactions commit again after the failover", || {
        let acknowledged = acknowledged.clone();
        async move { (acknowledged.lock().await.len() > before + 50).then_some(()) }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let (mut retriable, mut lost) = (0, 0);
    for c in clients {
        let (r, l, failures) = c.await.unwrap();
        retriable += r;
        lost += l;
        assert!(failures.is_empty(), "calls failed with a status that is not retriable: {failures:?}");
    }
    let acknowledged = acknowledged.lock().await.clone();
    println!(
        "failover: {} committed ({before} before it), {retriable} calls answered with a retriable status, {lost} \
         transactions lost undecided",
        acknowledged.len()
    );
    assert!(retriable > 0, "no call saw the store's failover");
    let c = coordinator_client(&b.instances[0]).await;
    for gtid in &acknowledged {
        let t = get_retrying(&c, gtid).await;
        assert!(
            matches!(t.state(), v1::TransactionState::Committed | v1::TransactionState::Committing),
            "{gtid} was acknowledged as committed but is {:?} after the failover",
            t.state()
        );
    }
    eventually("no prepared transaction of the cluster left", || async {
        prepared_of(&b.cid).await.is_empty().then_some(())
    })
    .await;
    assert_eq!(bank.total().await, initial, "money was created or destroyed");
}

/// Three-phase commit in a cluster: the owner of a transaction's shard dies once every branch
/// acknowledged PreCommit (its pre-commit record is in the store, its commit is not). The
/// instance that takes the shard over runs the termination protocol at its new epoch: it finds
/// the branches pre-committed and commits them — long before their own do-commit deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_terminates_a_pre_committed_three_phase_transaction() {
    let dir = TestDir::new("cl-3pc");
    let pair = StorePair::start().await;
    let store_url = pair.url();
    let cid = format!("cl-3pc-{:06x}", fastrand::u32(..) & 0xffffff);
    let db1 = dir.participant("db1", 0, &[], &[]).await;
    let db2 = dir.participant("db2", 0, &[], &[]).await;
    let participants = [("db1", db1.endpoint()), ("db2", db2.endpoint())];
    // The branches would commit on their own only after 120 s: a commit within the tests'
    // patience (30 s) is the new owner's.
    let args = [
        "--prepare-timeout-ms",
        "1000",
        "--participant-rpc-timeout-ms",
        "1000",
        "--precommit-wait-ms",
        "5000",
        "--docommit-wait-ms",
        "120000",
    ];
    let crash = [("PLEDGE_CRASH_AT", "coordinator::after_precommit_acked")];
    let Two { mut a, b, a_id, b_id, store, count } =
        two_instances(&dir, &store_url, &cid, &participants, &args, &crash).await;

    // A three-phase transaction in one of a's shards (a Begin is UNAVAILABLE until a has
    // heard both participants' capability).
    let ca = coordinator_client(&a).await;
    let (gtid, shard) = loop {
        let r = eventually("a three-phase Begin at a", || {
            let mut ca = ca.clone();
            async move {
                let begin = v1::BeginRequest {
                    branches: vec![branch("db1", "b1"), branch("db2", "b1")],
                    protocol: v1::Protocol::ThreePhase as i32,
                    ..Default::default()
                };
                ca.begin(begin).await.ok().map(|r| r.into_inner().gtid)
            }
        })
        .await;
        let shard = shard_of(&r, count);
        if store.owner(shard).await.is_some_and(|(h, _)| h == a_id) {
            break (r, shard);
        }
        let _ = ca.clone().abort(v1::AbortRequest { gtid: r }).await;
    };
    let (_, epoch_a) = store.owner(shard).await.unwrap();
    put(&mut store_client(&db1).await, &gtid, "b1", "k1", "v1").await;
    put(&mut store_client(&db2).await, &gtid, "b1", "k2", "v2").await;
    assert!(commit(&mut ca.clone(), &gtid, false).await.is_err());
    a.wait_crashed().await;
    assert_eq!(store.record_kind(&gtid).await, Some(6), "the pre-commit record is in the store, no commit");
    wait_branch_state(&db1, &gtid, "b1", v1::BranchState::Precommitted).await;

    // b takes the shard over, asks the branches at its epoch, and commits.
    let (_, epoch_b) = eventually("b owns the dead instance's shard", || async {
        store.owner(shard).await.filter(|(h, _)| *h == b_id)
    })
    .await;
    assert!(epoch_b > epoch_a, "the takeover raised the epoch");
    wait_branch_state(&db1, &gtid, "b1", v1::BranchState::Committed).await;
    wait_branch_state(&db2, &gtid, "b1", v1::BranchState::Committed).await;
    let mut cb = coordinator_client(&b).await;
    let t = get_retrying(&cb, &gtid).await;
    assert_eq!(
        (t.state(), t.protocol(), t.heuristic),
        (v1::TransactionState::Committed, v1::Protocol::ThreePhase, false)
    );
    let r = commit(&mut cb, &gtid, true).await.unwrap();
    assert_eq!(r.outcome(), v1::Outcome::Committed);
    assert_eq!(read(&mut store_client(&db2).await, "k2").await.as_deref(), Some("v2"));
}
