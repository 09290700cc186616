//! `pledge serve`: opens the data directory, recovers, and serves gRPC (and, if configured,
//! Prometheus metrics) until SIGTERM / Ctrl-C.
//!
//! Start-up order matters: the log is replayed and the engine rebuilt before the port opens,
//! so no client can see a coordinator that has forgotten a decision. Shutdown is the reverse:
//! stop accepting calls, stop the engine, flush and sync the log, exit.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use pledge_proto::ResourceId;
use pledge_proto::auth::Auth;
use pledge_proto::tls::{ClientTls, ServerTls};
use pledge_proto::transport::{ListenAddr, Listener};
use pledge_proto::v1::coordinator_server::CoordinatorServer;
use tokio_util::sync::CancellationToken;

use crate::api::CoordinatorService;
use crate::config::Config;
use crate::driver::participant::CallConfig;
use crate::driver::{Runtime, RuntimeConfig};
use crate::engine::Engine;
use crate::recovery;
use crate::store::LocalLog;

pub const COORDINATOR_ID_FILE: &str = "coordinator.id";

/// Runs the coordinator until `shutdown` is cancelled (or a signal arrives, when
/// `handle_signals`). Prints `listening on <addr>` to stdout once the port is open, which
/// scripts and tests wait for.
pub async fn serve(config: Config, shutdown: CancellationToken, handle_signals: bool) -> anyhow::Result<()> {
    config.validate()?;
    // Before the store opens, so that replay and everything after it is recorded.
    if let Some(listen) = config.metrics_listen {
        let addr = pledge_proto::metrics::serve(listen, crate::metrics::describe, shutdown.clone())
            .await
            .with_context(|| format!("cannot serve metrics on {listen}"))?;
        println!("metrics on {addr}");
        tracing::info!(%addr, "metrics served at http://{addr}/metrics");
    }
    if config.is_local_store() {
        serve_local(config, shutdown, handle_signals).await
    } else {
        serve_cluster(config, shutdown, handle_signals).await
    }
}

fn runtime_config(config: &Config, coordinator_id: String, tls: &Tls) -> RuntimeConfig {
    RuntimeConfig {
        call: std::sync::Arc::new(CallConfig {
            coordinator_id,
            prepare_timeout: Duration::from_millis(config.prepare_timeout_ms),
            rpc_timeout: Duration::from_millis(config.participant_rpc_timeout_ms),
            max_batch_branches: config.participant_max_batch_branches,
            max_inflight_calls: config.participant_max_inflight_calls,
            pipeline: config.participant_pipeline,
            tls: tls.client.clone(),
        }),
        recovery_interval: Duration::from_millis(config.recovery_interval_ms),
        api_queue_capacity: 4096,
        max_request_wait: Duration::from_millis(config.max_request_wait_ms),
        publish_gauges: config.metrics_listen.is_some(),
    }
}

fn add_configured_participants(engine: &mut Engine, config: &Config) -> anyhow::Result<()> {
    for (resource, endpoint) in &config.participants {
        engine.add_configured_participant(ResourceId::parse_field("participants", resource)?, endpoint.clone());
    }
    Ok(())
}

/// The embedded store: one coordinator, its decision log in the data directory.
async fn serve_local(config: Config, shutdown: CancellationToken, handle_signals: bool) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data directory {}", config.data_dir.display()))?;
    let coordinator_id = coordinator_id(&config.data_dir, config.coordinator_id.as_deref())?;
    let log_config = log_config(&config);
    let started = std::time::Instant::now();
    let (log, records) = tokio::task::spawn_blocking(move || recovery::open_log(log_config)).await??;
    let epoch = crate::store::next_local_epoch(&config.data_dir)?;
    let mut engine = Engine::restore(config.engine(epoch), crate::driver::now_ms(), records);
    add_configured_participants(&mut engine, &config)?;
    tracing::info!(
        coordinator_id,
        epoch,
        data_dir = %config.data_dir.display(),
        live_transactions = engine.live_transactions(),
        replay_ms = started.elapsed().as_millis() as u64,
        "decision log replayed"
    );
    let tls = Tls::load(&config)?;
    let runtime_config = runtime_config(&config, coordinator_id.clone(), &tls);
    let (runtime, handle) = Runtime::new(engine, LocalLog::new(log.writer(), epoch), runtime_config);
    let engine_stop = CancellationToken::new();
    let runtime_task = tokio::spawn(runtime.run(engine_stop.clone()));

    // The log is replayed and the engine rebuilt before the port opens.
    let listener =
        Listener::bind(&config.listen).await.with_context(|| format!("cannot listen on {}", config.listen))?;
    let service = CoordinatorService::new(handle, shutdown.clone(), &coordinator_id, tls.client.is_some());
    if handle_signals {
        let stop = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown requested");
            stop.cancel();
        });
    }
    serve_grpc(&config, listener, service, shutdown, runtime_task, &engine_stop, tls).await?;
    log.shutdown().await.context("flushing the decision log")?;
    tracing::info!("coordinator stopped; decision log flushed");
    Ok(())
}

/// An instance of a cluster on a PostgreSQL store (see `crate::cluster`).
async fn serve_cluster(config: Config, shutdown: CancellationToken, handle_signals: bool) -> anyhow::Result<()> {
    use crate::cluster::lease::{LeaseConfig, LeaseManager};
    use crate::cluster::{ClusterState, router::Router, schema, store::PgLog, store::WriterConfig};
    use crate::driver::ClusterLink;

    let store_timeout = Duration::from_millis(config.store_timeout_ms);
    // A connection per writer lane, and a few for leases, routing lookups and cleanup.
    let options = sqlx::postgres::PgConnectOptions::from_str(&config.store)
        .with_context(|| format!("invalid store URL {}", redact(&config.store)))?
        // A transaction left open by a paused or partitioned instance holds lease-row locks
        // that a takeover waits for: the database ends its session after this long.
        .options([("idle_in_transaction_session_timeout", config.store_timeout_ms.to_string())]);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(config.store_writer_lanes as u32 + 4)
        .acquire_timeout(store_timeout)
        .connect_with(options)
        .await
        .with_context(|| format!("cannot connect to the decision store {}", redact(&config.store)))?;
    let wanted_id = match &config.coordinator_id {
        Some(id) => {
            ResourceId::parse_field("coordinator_id", id)?;
            id.clone()
        }
        None => format!("c{:012x}", fastrand::u64(..) & 0xffff_ffff_ffff),
    };
    let shards = u16::try_from(config.cluster_shards).context("cluster_shards")?;
    let info = schema::prepare(&pool, shards, &wanted_id).await.context("preparing the decision store")?;
    if let Some(id) = &config.coordinator_id
        && *id != info.cluster_id
    {
        anyhow::bail!(
            "configured coordinator_id {id:?} differs from the cluster's {:?} kept in the store: every instance \
             of a cluster uses the cluster's id",
            info.cluster_id
        );
    }
    if u64::from(info.shard_count) != config.cluster_shards {
        tracing::info!(
            configured = config.cluster_shards,
            store = info.shard_count,
            "the cluster's shard count is the store's"
        );
    }

    // The port opens first (the advertised address may need it); no shard is owned, so calls
    // are answered UNAVAILABLE, until the lease manager has adopted some.
    let listener =
        Listener::bind(&config.listen).await.with_context(|| format!("cannot listen on {}", config.listen))?;
    let address = match (&config.advertise, listener.local_addr()?) {
        (Some(a), _) => a.clone(),
        (None, ListenAddr::Tcp(a)) if !a.ip().is_unspecified() => format!("http://{a}"),
        (None, other) => anyhow::bail!(
            "advertise is not set and {other} cannot be reached by other instances: set advertise = \"http://host:port\""
        ),
    };
    let instance_id = format!("{}-{:08x}", info.cluster_id, fastrand::u32(..));
    let state = Arc::new(ClusterState::new(instance_id.clone(), address.clone(), info.shard_count));
    let mut engine_config = config.engine(0);
    engine_config.shard_count = info.shard_count;
    let mut engine = Engine::new(engine_config);
    add_configured_participants(&mut engine, &config)?;
    let writers = WriterConfig {
        lanes: config.store_writer_lanes as usize,
        max_batch_records: config.store_max_batch_records as usize,
        timeout: store_timeout,
        max_retry: Duration::from_millis(config.lease_ms) * 2,
    };
    let log = PgLog::start(pool.clone(), state.clone(), writers);
    let (commands_tx, commands) = tokio::sync::mpsc::channel(1024);
    let tls = Tls::load(&config)?;
    let (runtime, handle) = Runtime::new(engine, log, runtime_config(&config, info.cluster_id.clone(), &tls));
    let runtime =
        runtime.with_cluster(ClusterLink { state: state.clone(), commands, pool: pool.clone(), store_timeout });
    let engine_stop = CancellationToken::new();
    let runtime_task = tokio::spawn(runtime.run(engine_stop.clone()));
    let lease = LeaseManager::new(
        pool.clone(),
        state.clone(),
        commands_tx,
        LeaseConfig {
            lease: Duration::from_millis(config.lease_ms),
            renew_interval: Duration::from_millis(config.lease_renew_interval_ms),
            drain: Duration::from_millis(config.handover_drain_ms),
            completed_retention_ms: config.completed_retention_ms,
        },
    );
    let lease_stop = CancellationToken::new();
    let lease_task = tokio::spawn(lease.run(lease_stop.clone()));
    let handed_over = CancellationToken::new();
    {
        let handed_over = handed_over.clone();
        let lease_task = lease_task;
        tokio::spawn(async move {
            let _ = lease_task.await;
            handed_over.cancel();
        });
    }
    tracing::info!(
        cluster_id = info.cluster_id,
        instance_id,
        address,
        shards = info.shard_count,
        store = %redact(&config.store),
        "cluster instance started"
    );

    let router =
        Arc::new(Router::new(state, pool, Duration::from_millis(config.max_request_wait_ms), tls.client.clone()));
    let service =
        CoordinatorService::new(handle, shutdown.clone(), &info.cluster_id, tls.client.is_some()).with_router(router);
    if handle_signals {
        // Hand the shards over while still serving (calls about them are answered here until
        // each is released), then stop.
        let (stop, lease_stop, handed_over) = (shutdown.clone(), lease_stop.clone(), handed_over.clone());
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown requested; handing shards over");
            lease_stop.cancel();
            handed_over.cancelled().await;
            stop.cancel();
        });
    }
    let served = serve_grpc(&config, listener, service, shutdown, runtime_task, &engine_stop, tls);
    let result = served.await;
    lease_stop.cancel();
    handed_over.cancelled().await;
    tracing::info!("cluster instance stopped");
    result
}

/// `url` without its password.
fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// The coordinator's TLS (what it serves with, and what it calls participants and other
/// instances with) and the principals it authenticates calls against.
pub struct Tls {
    pub server: Option<ServerTls>,
    pub client: Option<ClientTls>,
    pub auth: Option<Auth>,
}

impl Tls {
    fn load(config: &Config) -> anyhow::Result<Tls> {
        let server = config.server_tls_files()?.map(ServerTls::load).transpose()?;
        pledge_proto::tls::check_listen(&config.listen, server.as_ref())?;
        let auth = config.auth_file.as_deref().map(Auth::load).transpose()?;
        if (server.is_none() || auth.is_none()) && pledge_proto::tls::exposed(&config.listen) {
            tracing::warn!(listen = %config.listen, tls = server.is_some(), auth = auth.is_some(),
                "serving WITHOUT TLS AND AUTHENTICATION on an address other hosts can reach: anyone there can \
                 begin, commit and resolve transactions; set tls_cert, tls_key, tls_client_ca and auth_file");
        }
        let client = config.client_tls_files()?.map(ClientTls::load).transpose()?;
        Ok(Tls { server, client, auth })
    }
}

/// Serves gRPC on `listener` until `shutdown`, then stops the engine. Prints `listening on
/// <addr>` to stdout once the port serves, which scripts and tests wait for.
async fn serve_grpc(
    config: &Config,
    listener: Listener,
    service: CoordinatorService,
    shutdown: CancellationToken,
    runtime_task: tokio::task::JoinHandle<Result<(), crate::store::StoreError>>,
    engine_stop: &CancellationToken,
    tls: Tls,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<CoordinatorServer<CoordinatorService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pledge_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let service = CoordinatorServer::new(service).max_decoding_message_size(config.max_request_bytes);

    println!("listening on {addr}");
    tracing::info!(%addr, "coordinator serving");
    let router = pledge_proto::transport::server(tls.auth.clone())
        .add_service(health_service)
        .add_service(reflection)
        .add_service(service);
    pledge_proto::tls::reload_on_sighup(tls.server.clone(), tls.client.iter().cloned().collect(), tls.auth.clone());
    let server = listener.serve(router, shutdown.cancelled_owned(), tls.server);

    // The engine task ends only on a fatal store error or when told to stop.
    let mut runtime_task = runtime_task;
    let served = tokio::select! {
        served = server => served.map_err(anyhow::Error::from),
        ended = &mut runtime_task => {
            return Err(match ended {
                Ok(Err(e)) => anyhow::anyhow!("decision log failed: {e}"),
                Ok(Ok(())) => anyhow::anyhow!("engine stopped unexpectedly"),
                Err(e) => anyhow::anyhow!("engine task failed: {e}"),
            });
        }
    };
    engine_stop.cancel();
    runtime_task.await?.context("engine")?;
    served
}

pub fn log_config(config: &Config) -> pledge_log::LogConfig {
    let mut log = pledge_log::LogConfig::new(config.data_dir.join("log"));
    log.segment_size_bytes = config.log_segment_size_bytes;
    log.max_batch_bytes = config.log_max_batch_bytes;
    log.queue_capacity = config.log_queue_capacity;
    log
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Reads the coordinator id kept in the data directory, or stores the configured (or a newly
/// generated) one. Written to a temporary file, synced and renamed, so a crash leaves either
/// no file or a whole one.
fn coordinator_id(data_dir: &Path, configured: Option<&str>) -> anyhow::Result<String> {
    let path = data_dir.join(COORDINATOR_ID_FILE);
    if let Some(id) = configured {
        pledge_proto::ResourceId::parse_field("coordinator_id", id)?;
    }
    match std::fs::read_to_string(&path) {
        Ok(stored) => {
            let stored = stored.trim().to_string();
            pledge_proto::ResourceId::parse_field("coordinator_id", &stored)
                .with_context(|| format!("{} is damaged", path.display()))?;
            if let Some(id) = configured
                && id != stored
            {
                anyhow::bail!(
                    "configured coordinator_id {id:?} differs from {stored:?} stored in {}: changing it would orphan \
                     branches prepared under the old id (remove the file only if no transaction is in doubt)",
                    path.display()
                );
            }
            Ok(stored)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = match configured {
                Some(id) => id.to_string(),
                None => format!("c{:012x}", fastrand::u64(..) & 0xffff_ffff_ffff),
            };
            write_atomically(&path, format!("{id}\n").as_bytes())?;
            Ok(id)
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let tmp: PathBuf = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(path.parent().unwrap_or(Path::new(".")))?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coordinator_id_is_generated_once_and_guarded() {
        let dir = tempfile::tempdir().unwrap();
        let id = coordinator_id(dir.path(), None).unwrap();
        assert_eq!(coordinator_id(dir.path(), None).unwrap(), id);
        assert_eq!(coordinator_id(dir.path(), Some(&id)).unwrap(), id);
        let e = coordinator_id(dir.path(), Some("other")).unwrap_err();
        assert!(e.to_string().contains("would orphan"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(coordinator_id(dir.path(), Some("east-1")).unwrap(), "east-1");
        assert!(coordinator_id(dir.path(), Some("bad id")).is_err());
    }
}
