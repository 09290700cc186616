//! The PostgreSQL participant used as a library: a Rust service opens branches on its own
//! pools, runs its own sqlx statements in them, and serves the Participant API itself; the
//! coordinator (a real process) commits across two real databases.

use std::sync::Arc;
use std::time::Duration;

use pledge_integration_tests::*;
use pledge_postgres::{PostgresConfig, PostgresParticipant};
use pledge_proto::{BranchId, Gtid, ResourceId, v1};

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
    let dir = TestDir::new("pg-library");
    let mut config = PostgresConfig::new(vec![], dir.path().join("adapter"));
    config.active_timeout = Duration::from_secs(30);
    config.max_active_branches = 8; // below the pools' 16 connections
    // An embedding service must leave connections for commits: the adapter checks.
    let too_many = PostgresConfig { max_active_branches: 16, ..config.clone() };
    let e = PostgresParticipant::with_pools(too_many, vec![(db_a.clone(), a.clone())]).await.err().unwrap();
    assert!(e.to_string().contains("must be below the pool's max_connections"), "{e}");
    let (participant, _journal) =
        PostgresParticipant::with_pools(config, vec![(db_a.clone(), a.clone()), (db_b.clone(), b.clone())])
            .await
            .unwrap();

    // The service serves the Participant API next to its own.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let routes =
        pledge_sdk::routes(Arc::new(participant.participant()), tokio_util::sync::CancellationToken::new()).await;
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tokio::spawn(tonic::transport::Server::builder().add_routes(routes.routes()).serve_with_incoming(incoming));

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
