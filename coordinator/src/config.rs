//! Configuration of `pledge serve`: defaults, then an optional TOML file, then environment
//! variables and flags (the CLI layer applies those last).
//!
//! The embedded default needs nothing else: data in `./data`, listening on 127.0.0.1:7600.
//! Every limit carries its unit in its name.

use pledge_proto::tls::{ClientTlsFiles, ServerTlsFiles};
use pledge_proto::transport::{AddressError, ListenAddr, Target};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::engine::EngineConfig;

pub use crate::limits::{MAX_BATCH_LIMIT, MAX_BRANCHES_LIMIT};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7600";
/// `store` value of the embedded decision log.
pub const LOCAL_STORE: &str = "local";
/// What a derived `precommit_wait_ms` adds to the prepare round and the PreCommit call: the
/// forced pre-commit write, and room for a coordinator that is slow, not dead.
pub const PRECOMMIT_WAIT_MARGIN_MS: u64 = 5_000;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address of the gRPC server: `host:port`, or `unix:<path>` for clients and participants
    /// on this host.
    #[serde(deserialize_with = "listen_addr")]
    pub listen: ListenAddr,
    /// Where the decision log and the coordinator id live (local store).
    pub data_dir: PathBuf,
    /// The decision store: `local` (the default: a log in `data_dir`, one coordinator), or
    /// `postgres://user@host:port/db` for a cluster of coordinators sharing a PostgreSQL
    /// database (see `crate::cluster`). The URL must reach the current primary (a managed
    /// database's endpoint, or a proxy that follows failover).
    pub store: String,
    /// Cluster: the address other instances forward calls to (`http://host:port`); defaults
    /// to `http://` + `listen` when that is not a wildcard address.
    pub advertise: Option<String>,
    /// Cluster: shards the GTID space is split into, fixed when the cluster is created (the
    /// first instance to start on an empty store); later instances use the store's.
    pub cluster_shards: u64,
    /// Cluster: how long a shard lease lasts without renewal (database time). An instance
    /// that dies is replaced as owner of its shards after at most this plus one renewal.
    pub lease_ms: u64,
    /// Cluster: how often leases are renewed, membership read and shards rebalanced.
    pub lease_renew_interval_ms: u64,
    /// Cluster: longest a shard being handed over (shutdown, rebalance) waits for its live
    /// transactions to finish before it is released anyway (they are then presumed aborted).
    pub handover_drain_ms: u64,
    /// Cluster: most decision records in one store transaction (group commit).
    pub store_max_batch_records: u64,
    /// Cluster: store writes in flight at once, each for its own subset of the shards (one
    /// connection each). One is fastest where the store is near (batches grow with the load);
    /// more overlap round trips to a distant store.
    pub store_writer_lanes: u64,
    /// Cluster: longest a store round trip may take before its outcome is treated as unknown
    /// (then re-read or retried, never assumed).
    pub store_timeout_ms: u64,
    /// Serve Prometheus metrics (`GET /metrics`) on this `host:port` (port 0: any free port,
    /// printed as `metrics on <addr>`). Not set: no metrics endpoint, and nothing recorded.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Names this coordinator to participants (they keep branches of different coordinators
    /// apart by it; the PostgreSQL adapter puts it in GIDs). Generated on first start and kept
    /// in `<data_dir>/coordinator.id` when not set; a configured id that differs from the stored
    /// one is refused, because it would orphan the branches prepared under the old one.
    pub coordinator_id: Option<String>,
    /// Participants known from configuration: resource id -> gRPC endpoint.
    pub participants: BTreeMap<String, String>,

    pub default_txn_timeout_ms: u64,
    pub max_txn_timeout_ms: u64,
    pub prepare_timeout_ms: u64,
    /// Three-phase commit: how long a branch that voted yes waits for PreCommit before it
    /// aborts itself. At least prepare_timeout_ms + participant_rpc_timeout_ms (the votes, then
    /// the PreCommit call), plus the forced write between them. Not set: that sum plus
    /// [`PRECOMMIT_WAIT_MARGIN_MS`] (see [`Config::precommit_wait_ms`]).
    pub precommit_wait_ms: Option<u64>,
    /// Three-phase commit: how long a pre-committed branch waits for the commit before it
    /// commits itself; also how long the coordinator waits for PreCommit acknowledgements.
    pub docommit_wait_ms: u64,
    /// Deadline of one phase-2 (commit/abort) or recover call to a participant.
    pub participant_rpc_timeout_ms: u64,
    pub retry_initial_backoff_ms: u64,
    pub retry_max_backoff_ms: u64,
    /// How often every participant is asked for its in-doubt branches (also once at start).
    pub recovery_interval_ms: u64,
    pub max_live_transactions: usize,
    pub max_branches_per_transaction: usize,
    /// How long a finished transaction's outcome stays answerable (Get, a retried Commit or
    /// Abort, a Begin idempotency key). Load never shortens it.
    pub completed_retention_ms: u64,
    /// Most finished transactions kept at once (memory: a few hundred bytes each). At the bound
    /// Begin is refused with RESOURCE_EXHAUSTED until older ones expire; size it as peak
    /// transactions per second × completed_retention_ms / 1000.
    pub max_retained_transactions: usize,
    /// Most branches in one Prepare/Commit/Abort call to a participant.
    pub participant_max_batch_branches: usize,
    /// Calls of one kind in flight to one participant; while they are, new work queues up and
    /// goes out as the next batch.
    pub participant_max_inflight_calls: usize,
    /// Send Prepare / Commit / Abort over each participant's pipeline stream, at well under half
    /// the CPU of unary calls (a participant without one gets unary calls anyway). Off: unary
    /// calls only, e.g. behind a proxy that cuts long-lived streams.
    pub participant_pipeline: bool,
    /// Longest a client call waits for its answer before getting DEADLINE_EXCEEDED (the
    /// transaction goes on; Get tells how it ended).
    pub max_request_wait_ms: u64,
    /// Largest gRPC request accepted, in bytes.
    pub max_request_bytes: usize,

    pub log_segment_size_bytes: u64,
    pub log_max_batch_bytes: usize,
    pub log_queue_capacity: usize,
    pub checkpoint_every_records: u64,

    /// Serve TLS with this certificate chain (PEM), with `tls_key`; reloaded on SIGHUP.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Mutual TLS: accept only clients with a certificate from this CA (PEM).
    pub tls_client_ca: Option<PathBuf>,
    /// TLS for the calls this coordinator makes (to participants and, in a cluster, to other
    /// instances): the CA their certificates chain to. With it every such endpoint is
    /// `https://`, without it none is.
    pub client_tls_ca: Option<PathBuf>,
    /// This coordinator's client certificate and key (PEM) for servers that require mutual TLS.
    pub client_tls_cert: Option<PathBuf>,
    pub client_tls_key: Option<PathBuf>,
    /// Authenticate and authorize every call against the principals in this TOML file
    /// (`pledge_proto::auth`); reloaded on SIGHUP. Unset: every call is taken.
    pub auth_file: Option<PathBuf>,
    /// Export OpenTelemetry traces over OTLP/gRPC to this collector (`http://host:4317`).
    /// Unset: no export, unless `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is
    /// set, which takes precedence (see `pledge_proto::telemetry`).
    pub otlp_endpoint: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        let engine = EngineConfig::default();
        Config {
            listen: DEFAULT_LISTEN.parse().expect("valid default address"),
            data_dir: PathBuf::from("./data"),
            store: LOCAL_STORE.to_string(),
            advertise: None,
            cluster_shards: 64,
            lease_ms: 5_000,
            lease_renew_interval_ms: 1_000,
            handover_drain_ms: 5_000,
            store_max_batch_records: 1_024,
            store_writer_lanes: 1,
            store_timeout_ms: 5_000,
            metrics_listen: None,
            coordinator_id: None,
            participants: BTreeMap::new(),
            default_txn_timeout_ms: engine.default_txn_timeout_ms,
            max_txn_timeout_ms: engine.max_txn_timeout_ms,
            prepare_timeout_ms: engine.prepare_timeout_ms,
            precommit_wait_ms: None,
            docommit_wait_ms: engine.docommit_wait_ms,
            participant_rpc_timeout_ms: 5_000,
            retry_initial_backoff_ms: engine.retry_initial_backoff_ms,
            retry_max_backoff_ms: engine.retry_max_backoff_ms,
            recovery_interval_ms: 30_000,
            max_live_transactions: engine.max_live_transactions,
            max_branches_per_transaction: engine.max_branches_per_transaction,
            completed_retention_ms: engine.completed_retention_ms,
            max_retained_transactions: engine.max_retained_transactions,
            participant_max_batch_branches: 256,
            participant_max_inflight_calls: 4,
            participant_pipeline: true,
            max_request_wait_ms: 60_000,
            max_request_bytes: 1 << 20,
            log_segment_size_bytes: 64 << 20,
            log_max_batch_bytes: 1 << 20,
            log_queue_capacity: 16_384,
            checkpoint_every_records: engine.checkpoint_every_records,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            client_tls_ca: None,
            client_tls_cert: None,
            client_tls_key: None,
            auth_file: None,
            otlp_endpoint: None,
        }
    }
}

impl Config {
    pub fn from_file(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("invalid config file {}: {e}", path.display()))
    }

    /// Checks what serde cannot: every limit's range (see [`crate::limits`]) and the
    /// participants' ids and endpoints.
    pub fn validate(&self) -> anyhow::Result<()> {
        crate::limits::check(self).map_err(anyhow::Error::msg)?;
        if !self.is_local_store() && !self.store.starts_with("postgres://") && !self.store.starts_with("postgresql://")
        {
            anyhow::bail!("store = {:?}: it must be \"local\" or a postgres:// URL", self.store);
        }
        let server_tls = self.server_tls_files()?;
        let client_tls = self.client_tls_files()?.is_some();
        if let Some(a) = &self.advertise {
            // Other instances reach this one with their client TLS, so it serves TLS.
            validate_endpoint(a, server_tls.is_some()).map_err(|e| anyhow::anyhow!("advertise: {e}"))?;
        }
        for (resource, endpoint) in &self.participants {
            pledge_proto::ResourceId::parse_field("participants", resource)?;
            validate_endpoint(endpoint, client_tls).map_err(|e| anyhow::anyhow!("participant {resource}: {e}"))?;
        }
        Ok(())
    }

    /// The server TLS files, when configured.
    pub fn server_tls_files(&self) -> anyhow::Result<Option<ServerTlsFiles>> {
        Ok(ServerTlsFiles::from_options(self.tls_cert.clone(), self.tls_key.clone(), self.tls_client_ca.clone())?)
    }

    /// The TLS files of the calls this coordinator makes, when configured.
    pub fn client_tls_files(&self) -> anyhow::Result<Option<ClientTlsFiles>> {
        Ok(ClientTlsFiles::from_options(
            self.client_tls_ca.clone(),
            self.client_tls_cert.clone(),
            self.client_tls_key.clone(),
        )?)
    }

    /// Three-phase commit's wait for PreCommit: as configured, or derived from the prepare and
    /// participant call timeouts (so raising those never makes a configuration invalid).
    pub fn precommit_wait_ms(&self) -> u64 {
        self.precommit_wait_ms.unwrap_or_else(|| {
            self.prepare_timeout_ms
                .saturating_add(self.participant_rpc_timeout_ms)
                .saturating_add(PRECOMMIT_WAIT_MARGIN_MS)
        })
    }

    pub fn is_local_store(&self) -> bool {
        self.store == LOCAL_STORE
    }

    /// The engine's settings; `epoch` is the decision log writer's (see `crate::store`).
    pub fn engine(&self, epoch: u64) -> EngineConfig {
        EngineConfig {
            default_txn_timeout_ms: self.default_txn_timeout_ms,
            max_txn_timeout_ms: self.max_txn_timeout_ms,
            prepare_timeout_ms: self.prepare_timeout_ms,
            retry_initial_backoff_ms: self.retry_initial_backoff_ms,
            retry_max_backoff_ms: self.retry_max_backoff_ms,
            max_live_transactions: self.max_live_transactions,
            max_branches_per_transaction: self.max_branches_per_transaction,
            completed_retention_ms: self.completed_retention_ms,
            max_retained_transactions: self.max_retained_transactions,
            max_record_bytes: pledge_log::LogConfig::new("").max_record_bytes,
            checkpoint_every_records: self.checkpoint_every_records,
            rng_seed: fastrand::u64(..),
            epoch,
            shard_count: 0,
            precommit_wait_ms: self.precommit_wait_ms(),
            docommit_wait_ms: self.docommit_wait_ms,
            precommit_delivery_ms: self.participant_rpc_timeout_ms,
        }
    }
}

fn listen_addr<'de, D: serde::Deserializer<'de>>(d: D) -> Result<ListenAddr, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(serde::de::Error::custom)
}

/// A participant endpoint is an http URI with a host and port, or `unix:<path>` for a
/// participant on this host; with `tls` (the calls to it are made with TLS), an https URI.
pub fn validate_endpoint(endpoint: &str, tls: bool) -> Result<(), String> {
    let shape = || match tls {
        false => format!("endpoint {endpoint:?} must look like http://host:port or unix:/path/to.sock"),
        true => format!("endpoint {endpoint:?} must look like https://host:port (calls are made with TLS)"),
    };
    let target = Target::parse(endpoint).map_err(|e| match e {
        AddressError::PathTooLong { .. } => format!("endpoint {endpoint:?}: {e}"),
        _ => shape(),
    })?;
    // A Unix socket is plaintext whatever the TLS settings (its file's permissions protect it).
    let https = endpoint.starts_with("https://");
    if target.unix_path().is_none() && https != tls {
        return Err(if https {
            format!("endpoint {endpoint:?} is https://, but no client_tls_ca is configured for calls with TLS")
        } else {
            shape()
        });
    }
    match (target.unix_path(), target.port()) {
        (None, None) => Err(shape()),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_settings_override_defaults_and_unknown_keys_are_refused() {
        let c: Config = toml::from_str(
            "listen = \"0.0.0.0:9000\"\nprepare_timeout_ms = 250\n[participants]\ndb1 = \"http://127.0.0.1:7701\"\n",
        )
        .unwrap();
        assert_eq!(c.listen, ListenAddr::Tcp("0.0.0.0:9000".parse().unwrap()));
        assert_eq!(c.prepare_timeout_ms, 250);
        assert_eq!(c.data_dir, PathBuf::from("./data"));
        c.validate().unwrap();
        let e = toml::from_str::<Config>("prepare_timeout = 5").unwrap_err();
        assert!(e.to_string().contains("unknown field `prepare_timeout`"), "{e}");
    }

    #[test]
    fn the_sample_deployment_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/pledge.toml");
        let c = Config::from_file(&path).unwrap();
        c.validate().unwrap();
        assert_eq!(c.coordinator_id.as_deref(), Some("pledge-eu-1"));
        assert_eq!(c.participants.len(), 3);
        assert!(matches!(c.listen, ListenAddr::Tcp(a) if a.port() == 7600));
        assert_eq!(c.metrics_listen.map(|a| a.port()), Some(9600));
    }

    #[test]
    fn invalid_settings_are_named() {
        let c = Config { prepare_timeout_ms: 0, ..Config::default() };
        assert!(c.validate().unwrap_err().to_string().starts_with("prepare_timeout_ms = 0 is out of range"));
        let mut c = Config::default();
        c.participants.insert("db1".into(), "127.0.0.1:7701".into());
        assert!(c.validate().unwrap_err().to_string().contains("must look like http://host:port or unix:"));
        for good in ["http://127.0.0.1:7701", "https://db1.internal:7701", "unix:/run/pledge/db1.sock"] {
            assert_eq!(validate_endpoint(good, good.starts_with("https")), Ok(()), "{good}");
        }
        for bad in ["http://127.0.0.1", "unix:", "db1.internal:7701"] {
            assert!(validate_endpoint(bad, false).is_err(), "{bad}");
        }
    }
}
