//! The PostgreSQL participant used as a library: a Rust service opens branches on its own
//! pools, runs its own sqlx statements in them, and serves the Participant API itself; the
//! coordinator (a real process) commits across two real databases.

use std::sync::Arc;
use std::time::Duration;

use pledge_integration_tests::*;
use pledge_postgres::{PostgresConfig, PostgresParticipant};
use pledge_proto::{BranchId, Gtid, ResourceId, Xid, v1};
use pledge_sdk::{Outcome, Participant, Vote};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_embeds_the_adapter_on_its_own_pools() {
    let pool = |db: char| async move {
        sqlx::postgres::PgPoolOptions::new().max_connections(16).connect(&pg_url(db)).await.unwrap()
    };
    let (a, b) = (pool('a').await, pool('b').await);
    let table = format!("lib_{}", fastrand::u32(..));
    for p in [&a, &b] {
        let ddl = format!("CREATE TABLE {table} (id int PRIMARY KEY, balance int NOT NULL CHECK (balance >= 0))");
        sqlx::query(sqlx::AssertSqlSafe(ddl)).execute(p).await.unwrap();
        let fill = format!("INSERT INTO {table} VALUES (1, 100)");
        sqlx::query(sqlx::AssertSqlSafe(fill)).execute(p).await.unwrap();
    }
    let (db_a, db_b): (ResourceId, ResourceId) = ("lib_a".parse().unwrap(), "lib_b".parse().unwrap());
    let mut config = PostgresConfig::new(vec![]);
    config.active_timeout = Duration::from_secs(30);
    config.max_active_branches = 8; // below the pools' 16 connections
    // An embedding service must leave connections for commits: the adapter checks.
    let too_many = PostgresConfig { max_active_branches: 16, ..config.clone() };
    let e = PostgresParticipant::with_pools(too_many, vec![(db_a.clone(), a.clone())]).await.err().unwrap();
    assert!(e.to_string().contains("must be below the pool's max_connections"), "{e}");
    let participant =
        PostgresParticipant::with_pools(config, vec![(db_a.clone(), a.clone()), (db_b.clone(), b.clone())])
            .await
            .unwrap();

    // The service serves the Participant API next to its own.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let routes = pledge_sdk::routes(Arc::new(participant.clone())).await;
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tokio::spawn(tonic::transport::Server::builder().add_routes(routes.routes()).serve_with_incoming(incoming));

    let dir = TestDir::new("pg-library");
    let coordinator = dir.coordinator_for(&[("lib_a", endpoint.clone()), ("lib_b", endpoint)], &[], &[]).await;
    let mut c = coordinator_client(&coordinator).await;
    let gtid_text = begin(&mut c, &[("lib_a", "debit"), ("lib_b", "credit")]).await;
    let gtid: Gtid = gtid_text.parse().unwrap();

    // The service's own statements, in the branches.
    let update = format!("UPDATE {table} SET balance = balance + $1 WHERE id = 1");
    let mut debit = participant.branch(&db_a, gtid, BranchId::parse_field("b", "debit").unwrap()).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(update.clone())).bind(-40).execute(debit.conn()).await.unwrap();
    drop(debit);
    let mut credit = participant.branch(&db_b, gtid, BranchId::parse_field("b", "credit").unwrap()).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(update.clone())).bind(40).execute(credit.conn()).await.unwrap();
    drop(credit);

    let r = commit(&mut c, &gtid_text, true).await.unwrap();
    assert_eq!((r.outcome(), r.completed), (v1::Outcome::Committed, true), "{}", r.reason);
    let balance = format!("SELECT balance::int8 FROM {table} WHERE id = 1");
    let balance_a: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(balance.clone())).fetch_one(&a).await.unwrap();
    let balance_b: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(balance)).fetch_one(&b).await.unwrap();
    assert_eq!((balance_a, balance_b), (60, 140));
    // The branch is finished: the service cannot reopen it.
    assert!(participant.branch(&db_a, gtid, BranchId::parse_field("b", "debit").unwrap()).await.is_err());

    // A service that ends the branch's transaction itself (here sqlx's begin/commit, which
    // issue COMMIT on the branch's connection) gets the branch voted down at prepare.
    let gtid_text = begin(&mut c, &[("lib_a", "rogue"), ("lib_b", "fine")]).await;
    let gtid: Gtid = gtid_text.parse().unwrap();
    let mut rogue = participant.branch(&db_a, gtid, BranchId::parse_field("b", "rogue").unwrap()).await.unwrap();
    sqlx::query("COMMIT").execute(rogue.conn()).await.unwrap();
    drop(rogue);
    let fine = participant.branch(&db_b, gtid, BranchId::parse_field("b", "fine").unwrap()).await.unwrap();
    drop(fine);
    let r = commit(&mut c, &gtid_text, true).await.unwrap();
    assert_eq!(r.outcome(), v1::Outcome::Aborted);
    assert!(r.reason.contains("ended by its own statements"), "{}", r.reason);

    // A statement that failed leaves the branch's transaction failed; the service carries on
    // regardless. PREPARE there would answer with a silent ROLLBACK: the branch must be voted
    // down with PostgreSQL's reason, and nothing of it left prepared.
    let gtid_text = begin(&mut c, &[("lib_a", "failed"), ("lib_b", "fine")]).await;
    let gtid: Gtid = gtid_text.parse().unwrap();
    let mut failed = participant.branch(&db_a, gtid, BranchId::parse_field("b", "failed").unwrap()).await.unwrap();
    let overdraw = format!("UPDATE {table} SET balance = balance - 1000 WHERE id = 1");
    assert!(sqlx::query(sqlx::AssertSqlSafe(overdraw)).execute(failed.conn()).await.is_err(), "the CHECK fails");
    drop(failed);
    let mut fine = participant.branch(&db_b, gtid, BranchId::parse_field("b", "fine").unwrap()).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(update)).bind(1).execute(fine.conn()).await.unwrap();
    drop(fine);
    let r = commit(&mut c, &gtid_text, true).await.unwrap();
    assert_eq!(r.outcome(), v1::Outcome::Aborted);
    assert!(r.reason.contains("25P02"), "PostgreSQL's in_failed_sql_transaction: {}", r.reason);
    let ours = format!("SELECT count(*)::int8 FROM pg_prepared_xacts WHERE gid LIKE '%{gtid_text}%'");
    let left: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(ours)).fetch_one(&a).await.unwrap();
    assert_eq!(left, 0);
    let balance = format!("SELECT balance::int8 FROM {table} WHERE id = 1");
    let balance_b: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(balance)).fetch_one(&b).await.unwrap();
    assert_eq!(balance_b, 140, "the other branch rolled back");

    // The adapter keeps connections warm between branches, out of the service's pool; it hands
    // them all back within a second or so when they are not used.
    let returned = async {
        while [&a, &b].iter().any(|p| p.num_idle() as u32 != p.size()) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let in_time = tokio::time::timeout(Duration::from_secs(10), returned).await;
    assert!(in_time.is_ok(), "pools: a {} idle of {}, b {} idle of {}", a.num_idle(), a.size(), b.num_idle(), b.size());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepare_beyond_max_prepared_branches_waits_for_a_place_and_votes_no_after_its_wait() {
    let a = sqlx::postgres::PgPoolOptions::new().max_connections(8).connect(&pg_url('a')).await.unwrap();
    let table = format!("places_{}", fastrand::u32(..));
    let ddl = format!("CREATE TABLE {table} (id int PRIMARY KEY, n int NOT NULL)");
    sqlx::query(sqlx::AssertSqlSafe(ddl)).execute(&a).await.unwrap();
    let fill = format!("INSERT INTO {table} SELECT g, 0 FROM generate_series(1, 4) g");
    sqlx::query(sqlx::AssertSqlSafe(fill)).execute(&a).await.unwrap();
    let resource: ResourceId = "lib_places".parse().unwrap();
    let coordinator_id = format!("places{}", fastrand::u32(..));
    let ours = format!("SELECT count(*)::int8 FROM pg_prepared_xacts WHERE gid LIKE 'pledge:{coordinator_id}:%'");
    let prepared_now =
        || async { sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(ours.clone())).fetch_one(&a).await.unwrap() };
    let value = |id: i32| {
        let sql = format!("SELECT n FROM {table} WHERE id = {id}");
        let a = a.clone();
        async move { sqlx::query_scalar::<_, i32>(sqlx::AssertSqlSafe(sql)).fetch_one(&a).await.unwrap() }
    };
    let participant = |wait: Duration| {
        let mut config = PostgresConfig::new(vec![]);
        config.max_active_branches = 4;
        config.max_prepared_branches = Some(1);
        config.prepared_slot_wait = wait;
        PostgresParticipant::with_pools(config, vec![(resource.clone(), a.clone())])
    };
    // A branch that sets row `id` to 1.
    let work = |p: PostgresParticipant, id: i32| {
        let (resource, table) = (resource.clone(), table.clone());
        async move {
            let (gtid, branch) = (Gtid::new_v7(), BranchId::parse_field("branch", "w").unwrap());
            let mut b = p.branch(&resource, gtid, branch.clone()).await.unwrap();
            let sql = format!("UPDATE {table} SET n = 1 WHERE id = $1");
            sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id).execute(b.conn()).await.unwrap();
            drop(b);
            Xid { resource, gtid, branch }
        }
    };

    // One place: the second prepare waits until the first branch commits.
    let p = participant(Duration::from_secs(30)).await.unwrap();
    let (first, second) = (work(p.clone(), 1).await, work(p.clone(), 2).await);
    assert!(matches!(p.prepare(&coordinator_id, &first).await.unwrap(), Vote::Prepared { .. }));
    let mut waiting = tokio::spawn({
        let (p, coordinator_id, second) = (p.clone(), coordinator_id.clone(), second.clone());
        async move { p.prepare(&coordinator_id, &second).await }
    });
    // (Nothing signals "still waiting": a bounded look that it did not finish.)
    assert!(tokio::time::timeout(Duration::from_millis(300), &mut waiting).await.is_err(), "the second prepare waits");
    assert_eq!(prepared_now().await, 1);
    assert!(matches!(p.commit(&coordinator_id, &first, false, &[]).await.unwrap(), Outcome::Committed));
    let vote = tokio::time::timeout(Duration::from_secs(10), waiting).await.expect("prepared after the commit");
    assert!(matches!(vote.unwrap().unwrap(), Vote::Prepared { .. }));
    assert!(matches!(p.commit(&coordinator_id, &second, false, &[]).await.unwrap(), Outcome::Committed));
    assert_eq!((value(1).await, value(2).await, prepared_now().await), (1, 1, 0));

    // A short wait that runs out: the branch votes no, saying why, and its work is rolled back.
    let p = participant(Duration::from_millis(100)).await.unwrap();
    let (third, fourth) = (work(p.clone(), 3).await, work(p.clone(), 4).await);
    assert!(matches!(p.prepare(&coordinator_id, &third).await.unwrap(), Vote::Prepared { .. }));
    match p.prepare(&coordinator_id, &fourth).await.unwrap() {
        Vote::Aborted { reason } => assert!(reason.contains("no place for another prepared transaction"), "{reason}"),
        other => panic!("expected a no vote, got {other:?}"),
    }
    assert!(matches!(p.abort(&coordinator_id, &third, &[]).await.unwrap(), Outcome::Aborted { .. }));
    assert_eq!((value(3).await, value(4).await, prepared_now().await), (0, 0, 0));
}
