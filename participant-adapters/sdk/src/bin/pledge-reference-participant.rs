//! The reference participant: a durable key-value store that takes part in Pledge
//! transactions. For tests, demos and benchmarks; `--vote-no` and `--stall-*-ms` inject
//! faults, `--no-pipeline` makes it a participant that serves unary calls only.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use pledge_proto::ResourceId;
use pledge_proto::transport::ListenAddr;
use pledge_proto::v1::reference_store_server::ReferenceStoreServer;
use pledge_sdk::reference::{ReferenceConfig, ReferenceParticipant, StoreService};
use pledge_sdk::server::ParticipantService;

/// glibc's malloc costs this service 5-10% of its CPU (its arenas consolidate on the many
/// short-lived buffers of the gRPC stack); mimalloc's thread-local pages do not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(name = "pledge-reference-participant", version, about)]
struct Args {
    /// Address to listen on: host:port (port 0: any free port; the chosen address is printed),
    /// or unix:<path> for a Unix socket.
    #[arg(long, env = "PLEDGE_PARTICIPANT_LISTEN", default_value = "127.0.0.1:7701")]
    listen: ListenAddr,
    #[command(flatten)]
    security: pledge_sdk::server::ServerSecurityArgs,
    /// The resource id this participant serves (as registered with the coordinator).
    #[arg(long, env = "PLEDGE_RESOURCE_ID", default_value = "ref")]
    resource_id: String,
    /// Where its durable state lives.
    #[arg(long, env = "PLEDGE_PARTICIPANT_DATA_DIR", default_value = "./participant-data")]
    data_dir: PathBuf,
    /// Vote no on every Prepare (fault injection).
    #[arg(long)]
    vote_no: bool,
    /// Wait this long before handling each Prepare (fault injection).
    #[arg(long, default_value_t = 0)]
    stall_prepare_ms: u64,
    /// Wait this long before handling each Commit (fault injection).
    #[arg(long, default_value_t = 0)]
    stall_commit_ms: u64,
    /// Answer the Participant.Pipeline stream with UNIMPLEMENTED, as a participant written
    /// without it would (the coordinator then makes unary calls).
    #[arg(long)]
    no_pipeline: bool,
    /// Write a checkpoint of the state after this many log records (and at least as many as
    /// the last checkpoint held).
    #[arg(long, default_value_t = 100_000)]
    checkpoint_every_records: u64,
    /// Serve Prometheus metrics (GET /metrics) on host:port [default: off].
    #[arg(long, env = "PLEDGE_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
}

fn main() -> anyhow::Result<()> {
    pledge_sdk::server::init_logging();
    install_crash_points();
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run(Args::parse()))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let shutdown = tokio_util::sync::CancellationToken::new();
    if let Some(listen) = args.metrics_listen {
        pledge_sdk::server::serve_metrics(listen, || {}, shutdown.clone()).await?;
    }
    let mut config = ReferenceConfig::new(ResourceId::parse_field("resource_id", &args.resource_id)?, &args.data_dir);
    config.vote_no = args.vote_no;
    config.stall_prepare = Duration::from_millis(args.stall_prepare_ms);
    config.stall_commit = Duration::from_millis(args.stall_commit_ms);
    config.checkpoint_every_records = args.checkpoint_every_records;
    let (participant, handle) = tokio::task::block_in_place(|| ReferenceParticipant::open(config))?;

    let mut service = ParticipantService::new(Arc::new(participant.clone()), shutdown.clone());
    if args.no_pipeline {
        service = service.without_pipeline();
    }
    let mut routes = pledge_sdk::server::routes_for(service).await;
    routes.add_service(ReferenceStoreServer::new(StoreService::new(participant)));
    pledge_sdk::server::serve(&args.listen, &args.security, routes, "reference participant", shutdown).await?;
    handle.shutdown().await?;
    tracing::info!("reference participant stopped; state flushed");
    Ok(())
}

/// With the `failpoints` feature, `PLEDGE_CRASH_AT` kills this process at named crash points
/// (see `pledge-crashpoints`); without it the points compile to nothing.
fn install_crash_points() {
    #[cfg(feature = "failpoints")]
    pledge_crashpoints::install();
}
