//! The MySQL/MariaDB participant as a gRPC server: the Participant service (for the
//! coordinator) and the MysqlBranch work API (for application services), over one or more
//! databases, with branches as XA transactions.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use pledge_mysql::service::BranchService;
use pledge_mysql::{MysqlConfig, MysqlParticipant, ResourceConfig};
use pledge_proto::transport::ListenAddr;
use pledge_proto::v1::mysql_branch_server::MysqlBranchServer;

/// The same allocator as the coordinator's (see there).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(name = "pledge-mysql-adapter", version, about)]
struct Args {
    /// Address to listen on: host:port (port 0: any free port; the chosen address is printed),
    /// or unix:<path> for a Unix socket.
    #[arg(long, env = "PLEDGE_MYSQL_LISTEN", default_value = "127.0.0.1:7901")]
    listen: ListenAddr,
    #[command(flatten)]
    security: pledge_sdk::server::ServerSecurityArgs,
    /// A database this adapter serves, as RESOURCE=URL (e.g.
    /// orders=mysql://app:secret@127.0.0.1:3306/orders). Repeatable.
    #[arg(long = "resource", env = "PLEDGE_MYSQL_RESOURCES", value_delimiter = ',', required = true)]
    resources: Vec<String>,
    /// The coordinator whose branches this adapter takes: its id names every XA XID from XA
    /// START on (a coordinator cluster's instances share it). At most 47 bytes.
    #[arg(long, env = "PLEDGE_COORDINATOR_ID")]
    coordinator_id: String,
    /// Where the adapter keeps its branch journal. Keep it across restarts.
    #[arg(long, env = "PLEDGE_MYSQL_DATA_DIR", default_value = "./mysql-adapter-data")]
    data_dir: PathBuf,
    /// How long a finished branch's answer is kept for a coordinator that asks again, ms.
    #[arg(long, default_value_t = 2 * 3_600_000)]
    answer_retention_ms: u64,
    /// Connections per database (each active branch holds one until it is prepared).
    #[arg(long, default_value_t = 64)]
    max_connections: u32,
    /// Most active (not yet prepared) branches per database (at most (max-connections - 1) / 2:
    /// prepared branches keep their sessions until phase 2).
    #[arg(long, default_value_t = 24)]
    max_active_branches: usize,
    /// Roll back a branch not prepared within this many ms.
    #[arg(long, default_value_t = 60_000)]
    active_timeout_ms: u64,
    /// Client-side bound of every statement, ms.
    #[arg(long, default_value_t = 30_000)]
    statement_timeout_ms: u64,
    /// Delete fence rows older than this many ms (a branch that old is a heuristic hazard if
    /// the server no longer holds it).
    #[arg(long, default_value_t = 7 * 24 * 3_600_000)]
    fence_retention_ms: u64,
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
        pledge_sdk::server::serve_metrics(listen, || {}, shutdown.clone()).await?;
    }
    let resources = args
        .resources
        .iter()
        .map(|spec| ResourceConfig::parse(spec, args.max_connections))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut config = MysqlConfig::new(resources, args.coordinator_id, &args.data_dir);
    config.journal.answer_retention = Duration::from_millis(args.answer_retention_ms);
    config.max_active_branches = args.max_active_branches;
    config.active_timeout = Duration::from_millis(args.active_timeout_ms);
    config.statement_timeout = Duration::from_millis(args.statement_timeout_ms);
    config.fence_retention = Duration::from_millis(args.fence_retention_ms);
    let (participant, handle) = MysqlParticipant::connect(config).await?;

    let mut routes = pledge_sdk::routes(Arc::new(participant.participant()), shutdown.clone()).await;
    routes.add_service(MysqlBranchServer::new(BranchService::new(participant)));
    pledge_sdk::server::serve(&args.listen, &args.security, routes, "MySQL adapter", shutdown).await?;
    handle.shutdown().await?;
    tracing::info!("MySQL adapter stopped; journal flushed");
    Ok(())
}
