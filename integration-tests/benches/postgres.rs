//! Two-branch transfers between two PostgreSQL databases through Pledge, beside the same
//! statements run by `pgbench` as local two-phase transactions, in one invocation and with
//! equal client counts (1, 8, 32 by default).
//!
//! * pgbench: `BEGIN; UPDATE ...; PREPARE TRANSACTION 'gid'; COMMIT PREPARED 'gid'` on one
//!   database: one prepared-and-committed branch per transaction.
//! * Pledge: Begin (two branches) -> UPDATE at database A -> UPDATE at database B -> Commit,
//!   through the coordinator (Begin and Commit on its pipeline stream) and the PostgreSQL
//!   adapter; two branches per transaction, each
//!   BEGIN/UPDATE/PREPARE TRANSACTION/COMMIT PREPARED in PostgreSQL. Twice: with the adapter
//!   as its own process (each UPDATE an `Execute` call to it), and embedded in the benchmark's
//!   process as a Rust service would use it (each UPDATE with sqlx on the branch's connection;
//!   the coordinator calls the benchmark's Participant API).
//!
//! Reported: Pledge branches/s as a ratio of pgbench's 2PC transactions/s.
//!
//! ```sh
//! bash integration-tests/scripts/postgres.sh start && eval "$(bash integration-tests/scripts/postgres.sh env)"
//! cargo build --release -p pledge-coordinator -p pledge-postgres --bins
//! cargo bench -p pledge-integration-tests --bench postgres
//! ```
//! Settings (environment): BENCH_CLIENTS (1,8,32), BENCH_SECONDS (10), BENCH_ACCOUNTS (10000),
//! BENCH_WAIT_FOR_COMPLETION (0: Commit answers once the decision is durable; 1: once both
//! branches are committed in PostgreSQL), BENCH_ADAPTER_ARGS (extra flags for the adapter,
//! space-separated, e.g. `--warm-connections 0`).

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use pledge_integration_tests::bench::{Load, Run, busy_cpu_seconds, busy_cpu_since, env_or, measure, report_error};
use pledge_integration_tests::{Process, TestDir, branch, pg_url};
use pledge_postgres::{PostgresConfig, PostgresParticipant, ResourceConfig};
use pledge_proto::pipeline::CoordinatorPipeline;
use pledge_proto::v1::postgres_branch_client::PostgresBranchClient;
use pledge_proto::v1::{self, value::Kind};
use pledge_proto::{BranchId, Gtid, ResourceId};
use tonic::transport::{Channel, Endpoint};

const TABLE: &str = "pledge_bench_accounts";

/// The benchmark's coordinator ids: GIDs `pledge:bench:...` (through the adapter process) and
/// `pledge:bench-embedded:...` (through the adapter embedded in the benchmark).
const COORDINATOR_ID: &str = "bench";
const EMBEDDED_COORDINATOR_ID: &str = "bench-embedded";

async fn prepare_tables(accounts: i64) {
    pledge_integration_tests::roll_back_leftovers(COORDINATOR_ID).await;
    for db in ['a', 'b'] {
        let pool = sqlx::PgPool::connect(&pg_url(db)).await.unwrap();
        for sql in [
            format!("DROP TABLE IF EXISTS {TABLE}"),
            format!("CREATE TABLE {TABLE} (id int PRIMARY KEY, balance bigint NOT NULL)"),
            format!("INSERT INTO {TABLE} SELECT g, 0 FROM generate_series(1, {accounts}) g"),
            format!("VACUUM ANALYZE {TABLE}"),
        ] {
            sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&pool).await.unwrap();
        }
    }
}

fn pgbench_path() -> String {
    if let Ok(path) = std::env::var("PGBENCH") {
        return path;
    }
    let mut found: Vec<_> = glob_bins().into_iter().filter(|p| std::path::Path::new(p).exists()).collect();
    found.sort();
    found.pop().unwrap_or_else(|| "pgbench".into())
}

fn glob_bins() -> Vec<String> {
    std::fs::read_dir("/usr/lib/postgresql")
        .map(|dirs| dirs.flatten().map(|d| format!("{}/bin/pgbench", d.path().display())).collect())
        .unwrap_or_default()
}

/// pgbench's 2PC transactions per second with `clients` clients, and the machine's CPU time per
/// transaction (µs) while it ran.
fn pgbench(clients: u32, seconds: u64, accounts: i64, dir: &std::path::Path) -> (f64, Option<f64>) {
    let script = dir.join("pgbench-2pc.sql");
    std::fs::write(
        &script,
        format!(
            "\\set id random(1, {accounts})\nBEGIN;\nUPDATE {TABLE} SET balance = balance + 1 WHERE id = :id;\n\
             PREPARE TRANSACTION 'pgbench_:client_id';\nCOMMIT PREPARED 'pgbench_:client_id';\n"
        ),
    )
    .unwrap();
    let cpu_before = busy_cpu_seconds();
    let out = std::process::Command::new(pgbench_path())
        .args(["-n", "-M", "simple", "-c", &clients.to_string(), "-j", &clients.min(2).to_string()])
        .args(["-T", &seconds.to_string(), "-f"])
        .arg(&script)
        .arg(pg_url('a'))
        .output()
        .expect("running pgbench");
    let cpu = busy_cpu_since(cpu_before);
    let text = String::from_utf8_lossy(&out.stdout);
    let tps = text
        .lines()
        .find_map(|l| l.strip_prefix("tps = ").and_then(|r| r.split_whitespace().next()).and_then(|n| n.parse().ok()));
    let tps: f64 = tps.unwrap_or_else(|| panic!("pgbench failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr)));
    // Its CPU time includes pgbench's start (connections), a small part of a run of seconds.
    (tps, cpu.map(|s| s * 1e6 / (tps * seconds as f64)))
}

/// How the benchmark's transfers reach PostgreSQL.
#[derive(Clone)]
enum Via {
    /// The `pledge-postgres-adapter` process: branch work through its `PostgresBranch.Execute`.
    Adapter(Channel),
    /// The adapter embedded in this process (what a Rust service does): branch work with sqlx
    /// on the branch's connection; the coordinator calls this process's Participant API.
    Embedded(PostgresParticipant),
}

impl Via {
    /// Runs `UPDATE ... balance + amount WHERE id` in branch (`gtid`, `b`) at `resource`.
    async fn update(
        &self,
        update: &str,
        resource: &str,
        gtid: &str,
        b: &str,
        amount: i64,
        id: i64,
    ) -> Result<(), String> {
        match self {
            Via::Adapter(channel) => {
                let int = |n: i64| v1::Value { kind: Some(Kind::Int(n)) };
                let request = v1::ExecuteRequest {
                    resource_id: resource.into(),
                    gtid: gtid.into(),
                    branch_id: b.into(),
                    statements: vec![v1::Statement { sql: update.into(), params: vec![int(amount), int(id)] }],
                    request_id: String::new(),
                };
                let mut pg = PostgresBranchClient::new(channel.clone());
                pg.execute(request).await.map(drop).map_err(|s| s.message().to_string())
            }
            Via::Embedded(participant) => {
                let resource: ResourceId = resource.parse().map_err(|e| format!("{e}"))?;
                let gtid: Gtid = gtid.parse().map_err(|e| format!("{e}"))?;
                let b = BranchId::parse_field("branch", b).map_err(|e| format!("{e}"))?;
                let mut branch = participant.branch(&resource, gtid, b).await.map_err(|e| e.to_string())?;
                let done = sqlx::query(sqlx::AssertSqlSafe(update.to_string()))
                    .bind(amount)
                    .bind(id)
                    .execute(branch.conn())
                    .await;
                if let Err(e) = done {
                    branch.fail(e.to_string()).await;
                    return Err(e.to_string());
                }
                Ok(())
            }
        }
    }
}

async fn pledge(clients: u32, seconds: u64, accounts: i64, coordinator: &Process, via: &Via) -> Run {
    let wait = env_or("BENCH_WAIT_FOR_COMPLETION", 0) == 1;
    let coordinator_channel = Endpoint::from_shared(coordinator.endpoint()).unwrap().connect().await.unwrap();
    // Begin, Commit and Abort on the coordinator's pipeline stream, shared by every client.
    let pipeline = CoordinatorPipeline::new(coordinator_channel, Duration::from_secs(30));
    let update: Arc<str> = format!("UPDATE {TABLE} SET balance = balance + $1 WHERE id = $2").into();
    let load = Load {
        clients: clients as usize,
        warmup: Duration::from_secs(1),
        measure: Duration::from_secs(seconds),
        rate_per_second: 0,
    };
    let run = measure(load, |_| {
        let (c, via, update) = (pipeline.clone(), via.clone(), update.clone());
        move || {
            let (c, via, update) = (c.clone(), via.clone(), update.clone());
            Box::pin(async move {
                let (from, to) = (fastrand::i64(1..=accounts), fastrand::i64(1..=accounts));
                let branches = vec![branch("db_a", "debit"), branch("db_b", "credit")];
                let gtid = match c.begin(v1::BeginRequest { branches, ..Default::default() }).await {
                    Ok(r) => r.gtid,
                    Err(e) => return report_error(format_args!("Begin: {e}")),
                };
                for (resource, b, amount, id) in [("db_a", "debit", -1, from), ("db_b", "credit", 1, to)] {
                    if let Err(e) = via.update(&update, resource, &gtid, b, amount, id).await {
                        let _ = c.abort(v1::AbortRequest { gtid: gtid.clone() }).await;
                        return report_error(format_args!("UPDATE at {resource}: {e}"));
                    }
                }
                match c.commit(v1::CommitRequest { gtid, branches: vec![], wait_for_completion: wait }).await {
                    Ok(r) if r.outcome() == v1::Outcome::Committed => true,
                    Ok(r) => report_error(format_args!("Commit: {:?} {}", r.outcome(), r.reason)),
                    Err(e) => report_error(format_args!("Commit: {e}")),
                }
            }) as BoxFuture<'static, bool>
        }
    })
    .await;
    // Let phase 2 of the last transactions finish before the next run (or the end) starts.
    pledge_integration_tests::drain(coordinator).await;
    run
}

/// The adapter embedded in this process, serving the Participant API on a local port.
async fn embedded_adapter(max_clients: u32, data_dir: &std::path::Path) -> (PostgresParticipant, String) {
    let resource = |id: &str, db: char| ResourceConfig {
        id: id.parse().unwrap(),
        url: pg_url(db),
        max_connections: max_clients + 16,
    };
    let mut config = PostgresConfig::new(vec![resource("db_a", 'a'), resource("db_b", 'b')], data_dir);
    config.max_active_branches = max_clients as usize + 8;
    // The journal stays open until the process ends.
    let (participant, journal) = PostgresParticipant::connect(config).await.unwrap();
    std::mem::forget(journal);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let routes =
        pledge_sdk::routes(Arc::new(participant.participant()), tokio_util::sync::CancellationToken::new()).await;
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tokio::spawn(tonic::transport::Server::builder().add_routes(routes.routes()).serve_with_incoming(incoming));
    (participant, endpoint)
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
        pledge_integration_tests::roll_back_leftovers(EMBEDDED_COORDINATOR_ID).await;
        let dir = TestDir::new("bench-postgres");
        let max_clients = clients.iter().max().copied().unwrap_or(1);
        let connections = (max_clients + 16).to_string();
        let active = (max_clients + 8).to_string();
        let extra = env_or("BENCH_ADAPTER_ARGS", String::new());
        let mut adapter_args = vec!["--max-connections", &connections, "--max-active-branches", &active];
        adapter_args.extend(extra.split_whitespace());
        let adapter = dir
            .postgres_adapter(
                "pg",
                0,
                &[("db_a", pg_url('a')), ("db_b", pg_url('b'))],
                &adapter_args,
                &[("RUST_LOG", "warn")],
            )
            .await;
        // The coordinator's own recovery interval, not the tests' 500 ms (each scan reads
        // pg_prepared_xacts).
        let coordinator_args = |id| ["--coordinator-id", id, "--recovery-interval-ms", "30000"];
        let coordinator = dir
            .coordinator_with(&[("db_a", &adapter), ("db_b", &adapter)], &coordinator_args(COORDINATOR_ID), &[])
            .await;
        // Its own coordinator id: each coordinator's recovery rolls back prepared branches of
        // its id that it does not know.
        let embedded_dir = TestDir::new("bench-postgres-embedded");
        let (embedded, endpoint) = embedded_adapter(max_clients, &embedded_dir.path().join("adapter")).await;
        let embedded_coordinator = embedded_dir
            .coordinator_for(
                &[("db_a", endpoint.clone()), ("db_b", endpoint)],
                &coordinator_args(EMBEDDED_COORDINATOR_ID),
                &[],
            )
            .await;
        let adapter_channel = Endpoint::from_shared(adapter.endpoint()).unwrap().connect().await.unwrap();
        let modes = [
            ("adapter process", &coordinator, Via::Adapter(adapter_channel)),
            ("adapter embedded", &embedded_coordinator, Via::Embedded(embedded)),
        ];

        println!(
            "PostgreSQL 2PC benchmark: {seconds} s per run, {accounts} accounts, binaries from {}",
            pledge_integration_tests::bin_dir().display()
        );
        println!("ratio: Pledge branches/s over pgbench 2PC transactions/s, run one after the other");
        println!("CPU: the whole machine's CPU time per pgbench transaction / per Pledge branch, µs");
        println!(
            "{:>7}  {:>13}  {:>7}  {:<16}  {:>8}  {:>8}  {:>7}  {:>7}  {:>5}  {:>7}",
            "clients", "pgbench 2PC/s", "CPU", "Pledge via", "txn/s", "branch/s", "p50 ms", "p99 ms", "ratio", "CPU"
        );
        let us = |v: Option<f64>| v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "-".into());
        for &n in &clients {
            let (pgb, pgb_cpu) = pgbench(n, seconds, accounts, dir.path());
            for (i, (name, coordinator, via)) in modes.iter().enumerate() {
                let run = pledge(n, seconds, accounts, coordinator, via).await;
                let (txn_rate, first) = (run.rate(), i == 0);
                println!(
                    "{:>7}  {:>13}  {:>7}  {name:<16}  {txn_rate:>8.0}  {:>8.0}  {:>7.2}  {:>7.2}  {:>5.2}  {:>7}{}",
                    if first { n.to_string() } else { String::new() },
                    if first { format!("{pgb:.0}") } else { String::new() },
                    if first { us(pgb_cpu) } else { String::new() },
                    2.0 * txn_rate,
                    run.ms(0.5),
                    run.ms(0.99),
                    2.0 * txn_rate / pgb,
                    us(run.cpu_us_per_txn().map(|t| t / 2.0)),
                    if run.errors > 0 { format!("  ({} errors)", run.errors) } else { String::new() }
                );
            }
        }
    });
}
