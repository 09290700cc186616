//! `pledge serve`: opens the data directory, recovers, and serves gRPC (and, if configured,
//! Prometheus metrics) until SIGTERM / Ctrl-C.
//!
//! Start-up order matters: the log is replayed and the engine rebuilt before the port opens,
//! so no client can see a coordinator that has forgotten a decision. Shutdown is the reverse:
//! stop accepting calls, stop the engine, flush and sync the log, exit.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use pledge_proto::ResourceId;
use pledge_proto::transport::Listener;
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
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data directory {}", config.data_dir.display()))?;
    let coordinator_id = coordinator_id(&config.data_dir, config.coordinator_id.as_deref())?;
    // Before the log opens, so that replay and everything after it is recorded.
    if let Some(listen) = config.metrics_listen {
        let addr = pledge_proto::metrics::serve(listen, crate::metrics::describe, shutdown.clone())
            .await
            .with_context(|| format!("cannot serve metrics on {listen}"))?;
        println!("metrics on {addr}");
        tracing::info!(%addr, "metrics served at http://{addr}/metrics");
    }

    let log_config = log_config(&config);
    let started = std::time::Instant::now();
    let (log, records) = tokio::task::spawn_blocking(move || recovery::open_log(log_config)).await??;
    let epoch = crate::store::next_local_epoch(&config.data_dir)?;
    let mut engine = Engine::restore(config.engine(epoch), crate::driver::now_ms(), records);
    for (resource, endpoint) in &config.participants {
        engine.add_configured_participant(ResourceId::parse_field("participants", resource)?, endpoint.clone());
    }
    tracing::info!(
        coordinator_id,
        epoch,
        data_dir = %config.data_dir.display(),
        live_transactions = engine.live_transactions(),
        replay_ms = started.elapsed().as_millis() as u64,
        "decision log replayed"
    );

    let runtime_config = RuntimeConfig {
        call: std::sync::Arc::new(CallConfig {
            coordinator_id: coordinator_id.clone(),
            prepare_timeout: Duration::from_millis(config.prepare_timeout_ms),
            rpc_timeout: Duration::from_millis(config.participant_rpc_timeout_ms),
            max_batch_branches: config.participant_max_batch_branches,
            max_inflight_calls: config.participant_max_inflight_calls,
            pipeline: config.participant_pipeline,
        }),
        recovery_interval: Duration::from_millis(config.recovery_interval_ms),
        api_queue_capacity: 4096,
        max_request_wait: Duration::from_millis(config.max_request_wait_ms),
        publish_gauges: config.metrics_listen.is_some(),
    };
    let (runtime, handle) = Runtime::new(engine, LocalLog::new(log.writer(), epoch), runtime_config);
    let engine_stop = CancellationToken::new();
    let runtime_task = tokio::spawn(runtime.run(engine_stop.clone()));

    let listener =
        Listener::bind(&config.listen).await.with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<CoordinatorServer<CoordinatorService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pledge_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let service = CoordinatorServer::new(CoordinatorService::new(handle, shutdown.clone()))
        .max_decoding_message_size(config.max_request_bytes);

    println!("listening on {addr}");
    tracing::info!(%addr, "coordinator serving");

    let stop = shutdown.clone();
    if handle_signals {
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown requested");
            stop.cancel();
        });
    }
    let router =
        pledge_proto::transport::server().add_service(health_service).add_service(reflection).add_service(service);
    let server = listener.serve(router, shutdown.cancelled_owned());

    // The engine task ends only on a fatal log error or when told to stop.
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
    log.shutdown().await.context("flushing the decision log")?;
    tracing::info!("coordinator stopped; decision log flushed");
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
