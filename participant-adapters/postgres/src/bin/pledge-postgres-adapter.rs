//! The PostgreSQL participant as a gRPC server: the Participant service (for the coordinator)
//! and the PostgresBranch work API (for application services), over one or more databases.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use pledge_postgres::service::BranchService;
use pledge_postgres::{PostgresConfig, PostgresParticipant, ResourceConfig};
use pledge_proto::transport::ListenAddr;
use pledge_proto::v1::postgres_branch_server::PostgresBranchServer;

/// The same allocator as the coordinator's (see there): the gRPC stack's many short-lived
/// buffers cost glibc's malloc 5-10% of the CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(name = "pledge-postgres-adapter", version, about)]
struct Args {
    /// Address to listen on: host:port (port 0: any free port; the chosen address is printed),
    /// or unix:<path> for a Unix socket.
    #[arg(long, env = "PLEDGE_POSTGRES_LISTEN", default_value = "127.0.0.1:7801")]
    listen: ListenAddr,
    #[command(flatten)]
    security: pledge_sdk::server::ServerSecurityArgs,
    /// A database this adapter serves, as RESOURCE=URL (e.g.
    /// accounts=postgres://app@127.0.0.1:5432/accounts). Repeatable.
    #[arg(long = "resource", env = "PLEDGE_POSTGRES_RESOURCES", value_delimiter = ',', required = true)]
    resources: Vec<String>,
    /// Where the adapter keeps its branch journal (what it answered, and what it must finish
    /// after a crash). Keep it across restarts: without it, outcomes it cannot prove are
    /// reported as heuristic hazards.
    #[arg(long, env = "PLEDGE_POSTGRES_DATA_DIR", default_value = "./postgres-adapter-data")]
    data_dir: PathBuf,
    /// How long a finished branch's answer is kept for a coordinator that asks again, ms.
    #[arg(long, default_value_t = 2 * 3_600_000)]
    answer_retention_ms: u64,
    /// Connections per database (each active branch holds one until it is prepared).
    #[arg(long, default_value_t = 64)]
    max_connections: u32,
    /// Most active (not yet prepared) branches per database.
    #[arg(long, default_value_t = 48)]
    max_active_branches: usize,
    /// Idle connections per database kept out of the pool between uses, reused without the
    /// pool's check (a round trip) on every return; all go back to the pool once a second.
    #[arg(long, default_value_t = 16)]
    warm_connections: usize,
    /// Roll back a branch not prepared within this many ms.
    #[arg(long, default_value_t = 60_000)]
    active_timeout_ms: u64,
    /// PostgreSQL statement_timeout on the adapter's connections, ms.
    #[arg(long, default_value_t = 30_000)]
    statement_timeout_ms: u64,
    /// Keep the exactly-once dedup table `pledge_dedup` in every database.
    #[arg(long)]
    dedup: bool,
    /// Delete dedup rows older than this many ms.
    #[arg(long, default_value_t = 7 * 24 * 3_600_000)]
    dedup_retention_ms: u64,
    /// Warn when a prepared branch is older than this many ms.
    #[arg(long, default_value_t = 60_000)]
    prepared_age_warn_ms: u64,
    /// How often the age of the oldest prepared branch is read, ms.
    #[arg(long, default_value_t = 10_000)]
    prepared_age_interval_ms: u64,
    /// application_name of the adapter's database sessions.
    #[arg(long, default_value = "pledge-postgres-adapter")]
    application_name: String,
    /// Serve Prometheus metrics (GET /metrics) on host:port [default: off].
    #[arg(long, env = "PLEDGE_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
}

fn main() -> anyhow::Result<()> {
    pledge_sdk::server::init_logging();
    #[cfg(feature = "failpoints")]
    pledge_crashpoints::install();
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run(Args::parse()))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let shutdown = tokio_util::sync::CancellationToken::new();
    if let Some(listen) = args.metrics_listen {
        pledge_sdk::server::serve_metrics(listen, pledge_postgres::describe_metrics, shutdown.clone()).await?;
    }
    let resources = args
        .resources
        .iter()
        .map(|spec| ResourceConfig::parse(spec, args.max_connections))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut config = PostgresConfig::new(resources, &args.data_dir);
    config.journal.answer_retention = Duration::from_millis(args.answer_retention_ms);
    config.max_active_branches = args.max_active_branches;
    config.warm_connections = args.warm_connections;
    config.active_timeout = Duration::from_millis(args.active_timeout_ms);
    config.statement_timeout = Duration::from_millis(args.statement_timeout_ms);
    config.dedup = args.dedup;
    config.dedup_retention = Duration::from_millis(args.dedup_retention_ms);
    config.prepared_age_warn = Duration::from_millis(args.prepared_age_warn_ms);
    config.prepared_age_interval = Duration::from_millis(args.prepared_age_interval_ms);
    config.application_name = args.application_name;
    let (participant, handle) = PostgresParticipant::connect(config).await?;

    let mut routes = pledge_sdk::routes(Arc::new(participant.participant()), shutdown.clone()).await;
    routes.add_service(PostgresBranchServer::new(BranchService::new(participant)));
    pledge_sdk::server::serve(&args.listen, &args.security, routes, "PostgreSQL adapter", shutdown).await?;
    handle.shutdown().await?;
    tracing::info!("PostgreSQL adapter stopped; journal flushed");
    Ok(())
}
