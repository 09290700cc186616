//! Two-branch transfers between two MariaDB databases through Pledge, beside the same
//! statements run directly as local XA transactions by this process, in one invocation and with
//! equal client counts (1, 8, 32 by default).
//!
//! * Direct XA: per transaction `XA START`, `UPDATE`, `XA END`, `XA PREPARE`, `XA COMMIT`, each
//!   its own round trip on the client's own connection, on database a: one prepared-and-
//!   committed branch per transaction.
//! * Pledge: Begin (two branches) -> UPDATE at database a -> UPDATE at database b -> Commit,
//!   through the coordinator (Begin and Commit on its pipeline stream) and the MySQL adapter
//!   (each UPDATE an `Execute` call); two XA branches per transaction.
//!
//! Reported: Pledge branches/s as a ratio of direct XA transactions/s.
//!
//! ```sh
//! bash integration-tests/scripts/mariadb.sh start && eval "$(bash integration-tests/scripts/mariadb.sh env)"
//! cargo build --release -p pledge-coordinator -p pledge-mysql --bins
//! cargo bench -p pledge-integration-tests --bench mysql
//! ```
//! Settings (environment): BENCH_CLIENTS (1,8,32), BENCH_SECONDS (10), BENCH_ACCOUNTS (10000).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use pledge_integration_tests::bench::{Load, Run, env_or, measure, report_error};
use pledge_integration_tests::mariadb::mariadb_url;
use pledge_integration_tests::{Process, TestDir, branch};
use pledge_proto::pipeline::CoordinatorPipeline;
use pledge_proto::v1::mysql_branch_client::MysqlBranchClient;
use pledge_proto::v1::{self, value::Kind};
use sqlx::MySqlPool;
use tokio::sync::Mutex;
use tonic::transport::{Channel, Endpoint};

const TABLE: &str = "pledge_bench_accounts";
const COORDINATOR_ID: &str = "bench-mysql";

async fn prepare_tables(accounts: i64) {
    for db in ['a', 'b'] {
        let pool = MySqlPool::connect(&mariadb_url(db)).await.unwrap();
        // Branches a killed earlier run left prepared hold their rows' locks.
        let leftovers = sqlx::raw_sql("XA RECOVER FORMAT='SQL'").fetch_all(&pool).await.unwrap();
        for row in leftovers {
            use sqlx::Row;
            let xid: String = row.get(3);
            let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("XA ROLLBACK {xid}"))).execute(&pool).await;
        }
        for sql in [
            format!("DROP TABLE IF EXISTS {TABLE}"),
            format!("CREATE TABLE {TABLE} (id INT PRIMARY KEY, balance BIGINT NOT NULL) ENGINE=InnoDB"),
            format!("INSERT INTO {TABLE} SELECT seq, 0 FROM seq_1_to_{accounts}"),
        ] {
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&pool).await.unwrap();
        }
    }
}

/// Direct XA transactions per second with `clients` clients, each on its own connection.
async fn direct(clients: u32, seconds: u64, accounts: i64) -> Run {
    let pool =
        sqlx::mysql::MySqlPoolOptions::new().max_connections(clients + 2).connect(&mariadb_url('a')).await.unwrap();
    let counter = Arc::new(AtomicU64::new(0));
    let load = Load {
        clients: clients as usize,
        warmup: Duration::from_secs(1),
        measure: Duration::from_secs(seconds),
        rate_per_second: 0,
    };
    let mut conns = Vec::new();
    for _ in 0..clients {
        conns.push(Arc::new(Mutex::new(pool.acquire().await.unwrap())));
    }
    measure(load, |i| {
        let (conn, counter) = (conns[i].clone(), counter.clone());
        move || {
            let (conn, counter) = (conn.clone(), counter.clone());
            Box::pin(async move {
                let mut conn = conn.lock().await;
                let xid = format!("'bench-direct-{}'", counter.fetch_add(1, Ordering::Relaxed));
                let id = fastrand::i64(1..=accounts);
                for sql in [
                    format!("XA START {xid}"),
                    format!("UPDATE {TABLE} SET balance = balance + 1 WHERE id = {id}"),
                    format!("XA END {xid}"),
                    format!("XA PREPARE {xid}"),
                    format!("XA COMMIT {xid}"),
                ] {
                    if let Err(e) = sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut **conn).await {
                        // Leave the connection outside any XA transaction for the next one.
                        for end in [format!("XA END {xid}"), format!("XA ROLLBACK {xid}")] {
                            let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(end)).execute(&mut **conn).await;
                        }
                        return report_error(format_args!("direct XA: {e}"));
                    }
                }
                true
            }) as BoxFuture<'static, bool>
        }
    })
    .await
}

async fn pledge(clients: u32, seconds: u64, accounts: i64, coordinator: &Process, adapter: Channel) -> Run {
    let coordinator_channel = Endpoint::from_shared(coordinator.endpoint()).unwrap().connect().await.unwrap();
    let pipeline = CoordinatorPipeline::new(coordinator_channel, Duration::from_secs(30));
    let update: Arc<str> = format!("UPDATE {TABLE} SET balance = balance + ? WHERE id = ?").into();
    let load = Load {
        clients: clients as usize,
        warmup: Duration::from_secs(1),
        measure: Duration::from_secs(seconds),
        rate_per_second: 0,
    };
    let run = measure(load, |_| {
        let (c, adapter, update) = (pipeline.clone(), adapter.clone(), update.clone());
        move || {
            let (c, adapter, update) = (c.clone(), adapter.clone(), update.clone());
            Box::pin(async move {
                let (from, to) = (fastrand::i64(1..=accounts), fastrand::i64(1..=accounts));
                let branches = vec![branch("my_a", "debit"), branch("my_b", "credit")];
                let gtid = match c.begin(v1::BeginRequest { branches, ..Default::default() }).await {
                    Ok(r) => r.gtid,
                    Err(e) => return report_error(format_args!("Begin: {e}")),
                };
                let int = |n: i64| v1::Value { kind: Some(Kind::Int(n)) };
                for (resource, b, amount, id) in [("my_a", "debit", -1, from), ("my_b", "credit", 1, to)] {
                    let request = v1::ExecuteRequest {
                        resource_id: resource.into(),
                        gtid: gtid.clone(),
                        branch_id: b.into(),
                        statements: vec![v1::Statement { sql: update.to_string(), params: vec![int(amount), int(id)] }],
                        request_id: String::new(),
                    };
                    if let Err(e) = MysqlBranchClient::new(adapter.clone()).execute(request).await {
                        let _ = c.abort(v1::AbortRequest { gtid: gtid.clone() }).await;
                        return report_error(format_args!("UPDATE at {resource}: {e}"));
                    }
                }
                match c.commit(v1::CommitRequest { gtid, branches: vec![], wait_for_completion: false }).await {
                    Ok(r) if r.outcome() == v1::Outcome::Committed => true,
                    Ok(r) => report_error(format_args!("Commit: {:?} {}", r.outcome(), r.reason)),
                    Err(e) => report_error(format_args!("Commit: {e}")),
                }
            }) as BoxFuture<'static, bool>
        }
    })
    .await;
    pledge_integration_tests::drain(coordinator).await;
    run
}

fn main() {
    let clients: Vec<u32> = env_or("BENCH_CLIENTS", "1,8,32".to_string())
        .split(',')
        .map(|c| c.trim().parse().expect("BENCH_CLIENTS: comma-separated client counts"))
        .collect();
    let seconds: u64 = env_or("BENCH_SECONDS", 10);
    let accounts: i64 = env_or("BENCH_ACCOUNTS", 10000);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        prepare_tables(accounts).await;
        let dir = TestDir::new("bench-mysql");
        let max_clients = clients.iter().max().copied().unwrap_or(1);
        // Prepared branches keep their session until phase 2: room for them beside the active ones.
        let (connections, active) = ((2 * max_clients + 16).to_string(), (max_clients + 4).to_string());
        let adapter_args = ["--max-connections", &connections, "--max-active-branches", &active];
        let resources = [("my_a", mariadb_url('a')), ("my_b", mariadb_url('b'))];
        let adapter =
            dir.mysql_adapter("mysql", 0, COORDINATOR_ID, &resources, &adapter_args, &[("RUST_LOG", "warn")]).await;
        let coordinator_args = ["--coordinator-id", COORDINATOR_ID, "--recovery-interval-ms", "30000"];
        let coordinator = dir.coordinator_with(&[("my_a", &adapter), ("my_b", &adapter)], &coordinator_args, &[]).await;
        let adapter_channel = Endpoint::from_shared(adapter.endpoint()).unwrap().connect().await.unwrap();
        println!(
            "MariaDB XA benchmark: {seconds} s per run, {accounts} accounts, binaries from {}",
            pledge_integration_tests::bin_dir().display()
        );
        println!("ratio: Pledge branches/s over direct XA transactions/s, run one after the other");
        println!(
            "{:>7}  {:>11}  {:>7}  {:>8}  {:>8}  {:>7}  {:>7}  {:>5}",
            "clients", "direct XA/s", "CPU", "txn/s", "branch/s", "p50 ms", "p99 ms", "ratio"
        );
        let us = |v: Option<f64>| v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "-".into());
        for &n in &clients {
            let d = direct(n, seconds, accounts).await;
            let run = pledge(n, seconds, accounts, &coordinator, adapter_channel.clone()).await;
            println!(
                "{n:>7}  {:>11.0}  {:>7}  {:>8.0}  {:>8.0}  {:>7.2}  {:>7.2}  {:>5.2}{}",
                d.rate(),
                us(d.cpu_us_per_txn()),
                run.rate(),
                2.0 * run.rate(),
                run.ms(0.5),
                run.ms(0.99),
                2.0 * run.rate() / d.rate(),
                if run.errors + d.errors > 0 {
                    format!("  ({} + {} errors)", d.errors, run.errors)
                } else {
                    String::new()
                }
            );
        }
    });
}
