//! The Kafka participant as a gRPC server: the Participant service (for the coordinator) and
//! the KafkaBranch work API (for application services).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use pledge_kafka::security::{BrokerSecurity, PASSWORD_ENV, SaslMechanism, SecurityOptions, SecurityProtocol};
use pledge_kafka::service::BranchService;
use pledge_kafka::{KafkaConfig, KafkaParticipant};
use pledge_proto::ResourceId;
use pledge_proto::transport::ListenAddr;
use pledge_proto::v1::kafka_branch_server::KafkaBranchServer;

/// The same allocator as the coordinator's (see there): the gRPC stack's many short-lived
/// buffers cost glibc's malloc 5-10% of the CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(name = "pledge-kafka-adapter", version, about)]
struct Args {
    /// Address to listen on: host:port (port 0: any free port; the chosen address is printed),
    /// or unix:<path> for a Unix socket.
    #[arg(long, env = "PLEDGE_KAFKA_LISTEN", default_value = "127.0.0.1:7901")]
    listen: ListenAddr,
    #[command(flatten)]
    security: pledge_sdk::server::ServerSecurityArgs,
    /// The resource id of this Kafka cluster, as registered with the coordinator.
    #[arg(long, env = "PLEDGE_RESOURCE_ID", default_value = "kafka")]
    resource_id: String,
    /// Bootstrap servers, host:port[,host:port...].
    #[arg(long, env = "PLEDGE_KAFKA_BOOTSTRAP")]
    bootstrap: String,
    #[command(flatten)]
    kafka_security: KafkaSecurityArgs,
    /// Where the adapter keeps its branch journal (what it answered, and what it must finish
    /// after a crash). Keep it across restarts: without it, outcomes it cannot prove are
    /// reported as heuristic hazards.
    #[arg(long, env = "PLEDGE_KAFKA_DATA_DIR", default_value = "./kafka-adapter-data")]
    data_dir: PathBuf,
    /// Transactional id prefix [default: pledge-<resource id>]. Stable across restarts and unique
    /// per adapter instance.
    #[arg(long)]
    transactional_id_prefix: Option<String>,
    /// Transactional producers (branches open at once).
    #[arg(long, default_value_t = 8)]
    producers: usize,
    /// transaction.timeout.ms: the broker aborts a transaction open longer than this (capped by
    /// its transaction.max.timeout.ms); a prepared branch older than this is lost.
    #[arg(long, default_value_t = 900_000)]
    transaction_timeout_ms: u64,
    /// Abort a branch not prepared within this many ms (below transaction_timeout_ms).
    #[arg(long, default_value_t = 60_000)]
    active_timeout_ms: u64,
    /// Bound of each producer call and broker request, ms.
    #[arg(long, default_value_t = 10_000)]
    call_timeout_ms: u64,
    /// How long a finished branch's answer (and the request ids of a committed one) is kept,
    /// ms.
    #[arg(long, default_value_t = 2 * 3_600_000)]
    answer_retention_ms: u64,
    /// Serve Prometheus metrics (GET /metrics) on host:port [default: off].
    #[arg(long, env = "PLEDGE_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
}

/// How the adapter reaches the brokers (for every producer, consumer and its own EndTxn client).
#[derive(clap::Args, Debug)]
struct KafkaSecurityArgs {
    /// Security protocol of the brokers' listener: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.
    #[arg(long, env = "PLEDGE_KAFKA_SECURITY_PROTOCOL", default_value = "PLAINTEXT")]
    kafka_security_protocol: SecurityProtocol,
    /// SSL, SASL_SSL: the CA certificates (PEM) that signed the brokers' certificates.
    #[arg(long, env = "PLEDGE_KAFKA_CA")]
    kafka_ca: Option<PathBuf>,
    /// SSL, SASL_SSL: a client certificate (PEM) for listeners that require one (mutual TLS);
    /// with --kafka-key.
    #[arg(long, env = "PLEDGE_KAFKA_CERT")]
    kafka_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "PLEDGE_KAFKA_KEY")]
    kafka_key: Option<PathBuf>,
    /// SASL_SSL, SASL_PLAINTEXT: SCRAM-SHA-256, SCRAM-SHA-512 or PLAIN (PLAIN over SASL_SSL only).
    #[arg(long, env = "PLEDGE_KAFKA_SASL_MECHANISM")]
    kafka_sasl_mechanism: Option<SaslMechanism>,
    /// The SASL user name.
    #[arg(long, env = "PLEDGE_KAFKA_SASL_USERNAME")]
    kafka_sasl_username: Option<String>,
    /// A file holding the SASL password (one trailing newline ignored). Or set the
    /// PLEDGE_KAFKA_SASL_PASSWORD environment variable; never on the command line, which `ps`
    /// shows.
    #[arg(long, env = "PLEDGE_KAFKA_SASL_PASSWORD_FILE")]
    kafka_sasl_password_file: Option<PathBuf>,
}

impl KafkaSecurityArgs {
    /// The checked settings (the password read from its file or the environment).
    fn security(self) -> anyhow::Result<BrokerSecurity> {
        let password_env = match std::env::var(PASSWORD_ENV) {
            Ok(value) => Some(value),
            Err(std::env::VarError::NotPresent) => None,
            Err(std::env::VarError::NotUnicode(_)) => anyhow::bail!("{PASSWORD_ENV} is not UTF-8"),
        };
        Ok(BrokerSecurity::from_options(SecurityOptions {
            protocol: self.kafka_security_protocol,
            ca: self.kafka_ca,
            cert: self.kafka_cert,
            key: self.kafka_key,
            sasl_mechanism: self.kafka_sasl_mechanism,
            sasl_username: self.kafka_sasl_username,
            sasl_password_file: self.kafka_sasl_password_file,
            sasl_password_env: password_env,
        })?)
    }
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
    let resource = ResourceId::parse_field("resource_id", &args.resource_id)?;
    let security = args.kafka_security.security()?;
    let mut config = KafkaConfig::new(resource, &args.bootstrap, &args.data_dir);
    config.security = security;
    if let Some(prefix) = args.transactional_id_prefix {
        config.transactional_id_prefix = prefix;
    }
    config.producers = args.producers;
    config.transaction_timeout = Duration::from_millis(args.transaction_timeout_ms);
    config.active_timeout = Duration::from_millis(args.active_timeout_ms);
    config.call_timeout = Duration::from_millis(args.call_timeout_ms);
    config.journal.answer_retention = Duration::from_millis(args.answer_retention_ms);
    let (participant, handle) = KafkaParticipant::open(config).await?;

    let mut routes = pledge_sdk::routes(Arc::new(participant.participant()), shutdown.clone()).await;
    routes.add_service(KafkaBranchServer::new(BranchService::new(participant)));
    pledge_sdk::server::serve(&args.listen, &args.security, routes, "Kafka adapter", shutdown).await?;
    handle.shutdown().await?;
    tracing::info!("Kafka adapter stopped; state flushed");
    Ok(())
}
