//! The `pledge` command line: `serve`, client commands for transactions and participants,
//! `health` (a probe for containers and scripts), and `log inspect`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use pledge_proto::BranchKey;
use pledge_proto::tls::{ClientTls, ClientTlsFiles};
use pledge_proto::transport::{ListenAddr, Target};
use pledge_proto::v1::coordinator_client::CoordinatorClient;
use pledge_proto::v1::{self};
use tonic::transport::Channel;

use crate::config::Config;
use crate::engine::LogRecord;
use crate::records;

#[derive(Parser, Debug)]
#[command(name = "pledge", version, about = "Pledge: a durable distributed-transaction coordinator")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the coordinator.
    Serve(Box<ServeArgs>),
    /// Begin, enlist, commit, abort and inspect transactions.
    Txn {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: TxnCommand,
    },
    /// Register and list participants.
    Participant {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: ParticipantCommand,
    },
    /// A cluster of coordinators on a PostgreSQL store.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Read the decision log.
    Log {
        #[command(subcommand)]
        command: LogCommand,
    },
    /// Ask a Pledge server (the coordinator or any adapter) whether it serves, through the
    /// gRPC health service; exits 0 when it answers SERVING, 1 otherwise (never 2, which
    /// Docker's HEALTHCHECK reserves).
    Health(HealthArgs),
}

#[derive(Args, Debug, Default)]
pub struct ServeArgs {
    /// TOML config file (flags and environment variables override it).
    #[arg(long, env = "PLEDGE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on: host:port, or unix:<path> for a Unix socket [default: 127.0.0.1:7600].
    #[arg(long, env = "PLEDGE_LISTEN")]
    pub listen: Option<ListenAddr>,
    /// Data directory (decision log, coordinator id) [default: ./data].
    #[arg(long, env = "PLEDGE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Serve Prometheus metrics (GET /metrics) on host:port [default: off].
    #[arg(long, env = "PLEDGE_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// This coordinator's id, as participants see it [default: generated once, kept in the
    /// data directory].
    #[arg(long, env = "PLEDGE_COORDINATOR_ID")]
    pub coordinator_id: Option<String>,
    /// A participant, as RESOURCE=ENDPOINT (e.g. db1=http://127.0.0.1:7701). Repeatable.
    #[arg(long = "participant", env = "PLEDGE_PARTICIPANTS", value_delimiter = ',')]
    pub participants: Vec<String>,
    /// Decision store: `local` (a log in the data directory) or postgres://user@host:port/db
    /// for a cluster of coordinators sharing it [default: local].
    #[arg(long, env = "PLEDGE_STORE")]
    pub store: Option<String>,
    /// Cluster: the address other instances forward calls to [default: http://<listen>].
    #[arg(long, env = "PLEDGE_ADVERTISE")]
    pub advertise: Option<String>,
    /// Cluster: shards of the GTID space, when this instance creates the cluster [default: 64].
    #[arg(long, env = "PLEDGE_CLUSTER_SHARDS")]
    pub cluster_shards: Option<u64>,
    /// Cluster: how long a shard lease lasts without renewal, ms [default: 5000].
    #[arg(long, env = "PLEDGE_LEASE_MS")]
    pub lease_ms: Option<u64>,
    /// Cluster: how often leases are renewed and shards balanced, ms [default: 1000].
    #[arg(long, env = "PLEDGE_LEASE_RENEW_INTERVAL_MS")]
    pub lease_renew_interval_ms: Option<u64>,
    /// Cluster: store writes in flight at once, a connection each [default: 1].
    #[arg(long, env = "PLEDGE_STORE_WRITER_LANES")]
    pub store_writer_lanes: Option<u64>,
    /// Deadline of the prepare round, ms.
    #[arg(long, env = "PLEDGE_PREPARE_TIMEOUT_MS")]
    pub prepare_timeout_ms: Option<u64>,
    /// Deadline of one commit, abort, PreCommit or state call to a participant, ms.
    #[arg(long, env = "PLEDGE_PARTICIPANT_RPC_TIMEOUT_MS")]
    pub participant_rpc_timeout_ms: Option<u64>,
    /// Three-phase commit: how long a branch that voted yes waits for PreCommit before it
    /// aborts itself, ms [default: 20000].
    #[arg(long, env = "PLEDGE_PRECOMMIT_WAIT_MS")]
    pub precommit_wait_ms: Option<u64>,
    /// Three-phase commit: how long a pre-committed branch waits for the commit before it
    /// commits itself, ms [default: 10000].
    #[arg(long, env = "PLEDGE_DOCOMMIT_WAIT_MS")]
    pub docommit_wait_ms: Option<u64>,
    /// How often participants are asked for in-doubt branches, ms.
    #[arg(long, env = "PLEDGE_RECOVERY_INTERVAL_MS")]
    pub recovery_interval_ms: Option<u64>,
    /// Write a checkpoint after this many log records.
    #[arg(long, env = "PLEDGE_CHECKPOINT_EVERY_RECORDS")]
    pub checkpoint_every_records: Option<u64>,
    /// Size at which a log segment is closed, bytes.
    #[arg(long, env = "PLEDGE_LOG_SEGMENT_SIZE_BYTES")]
    pub log_segment_size_bytes: Option<u64>,
    /// Call participants over their pipeline streams (true) or with unary calls only (false)
    /// [default: true].
    #[arg(long, env = "PLEDGE_PARTICIPANT_PIPELINE")]
    pub participant_pipeline: Option<bool>,
    /// Serve TLS with this certificate chain (PEM), with --tls-key; reloaded on SIGHUP.
    #[arg(long, env = "PLEDGE_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, env = "PLEDGE_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Mutual TLS: accept only clients with a certificate from this CA (PEM).
    #[arg(long, env = "PLEDGE_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// Call participants (and other instances) with TLS, trusting this CA (PEM); their
    /// endpoints are then https://.
    #[arg(long, env = "PLEDGE_CLIENT_TLS_CA")]
    pub client_tls_ca: Option<PathBuf>,
    /// The certificate (PEM) this coordinator presents to servers that require mutual TLS,
    /// with --client-tls-key; reloaded on SIGHUP.
    #[arg(long, env = "PLEDGE_CLIENT_TLS_CERT")]
    pub client_tls_cert: Option<PathBuf>,
    #[arg(long, env = "PLEDGE_CLIENT_TLS_KEY")]
    pub client_tls_key: Option<PathBuf>,
    /// Authenticate and authorize every call against the principals in this TOML file (see
    /// the README's Security section); reloaded on SIGHUP.
    #[arg(long, env = "PLEDGE_AUTH_FILE")]
    pub auth_file: Option<PathBuf>,
}

impl ServeArgs {
    /// Defaults, then the config file, then environment variables and flags.
    pub fn into_config(self) -> anyhow::Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(v) = self.listen.clone() {
            config.listen = v;
        }
        if let Some(v) = self.data_dir {
            config.data_dir = v;
        }
        if let Some(v) = self.metrics_listen {
            config.metrics_listen = Some(v);
        }
        if let Some(v) = self.coordinator_id {
            config.coordinator_id = Some(v);
        }
        for p in self.participants {
            let (resource, endpoint) =
                p.split_once('=').with_context(|| format!("--participant {p:?}: expected RESOURCE=ENDPOINT"))?;
            config.participants.insert(resource.to_string(), endpoint.to_string());
        }
        if let Some(v) = self.store {
            config.store = v;
        }
        if let Some(v) = self.advertise {
            config.advertise = Some(v);
        }
        if let Some(v) = self.cluster_shards {
            config.cluster_shards = v;
        }
        if let Some(v) = self.lease_ms {
            config.lease_ms = v;
        }
        if let Some(v) = self.lease_renew_interval_ms {
            config.lease_renew_interval_ms = v;
        }
        if let Some(v) = self.store_writer_lanes {
            config.store_writer_lanes = v;
        }
        if let Some(v) = self.prepare_timeout_ms {
            config.prepare_timeout_ms = v;
        }
        if let Some(v) = self.participant_rpc_timeout_ms {
            config.participant_rpc_timeout_ms = v;
        }
        if let Some(v) = self.precommit_wait_ms {
            config.precommit_wait_ms = Some(v);
        }
        if let Some(v) = self.docommit_wait_ms {
            config.docommit_wait_ms = v;
        }
        if let Some(v) = self.recovery_interval_ms {
            config.recovery_interval_ms = v;
        }
        if let Some(v) = self.checkpoint_every_records {
            config.checkpoint_every_records = v;
        }
        if let Some(v) = self.log_segment_size_bytes {
            config.log_segment_size_bytes = v;
        }
        if let Some(v) = self.participant_pipeline {
            config.participant_pipeline = v;
        }
        for (from, to) in [
            (self.tls_cert, &mut config.tls_cert),
            (self.tls_key, &mut config.tls_key),
            (self.tls_client_ca, &mut config.tls_client_ca),
            (self.client_tls_ca, &mut config.client_tls_ca),
            (self.client_tls_cert, &mut config.client_tls_cert),
            (self.client_tls_key, &mut config.client_tls_key),
            (self.auth_file, &mut config.auth_file),
        ] {
            if from.is_some() {
                *to = from;
            }
        }
        config.validate()?;
        Ok(config)
    }
}

#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Instances, shards, owners, lease epochs and expiry, and unfinished decisions per shard,
    /// read from the store.
    Status {
        /// The cluster's store: postgres://user@host:port/db.
        #[arg(long, env = "PLEDGE_STORE")]
        store: String,
    },
}

/// `pledge cluster status`.
pub async fn cluster(command: ClusterCommand) -> anyhow::Result<()> {
    let ClusterCommand::Status { store } = command;
    let status = crate::cluster::status::read(&store).await?;
    println!("cluster {} (schema v{}, {} shards)", status.cluster_id, status.schema_version, status.shard_count);
    println!("\ninstances ({} live):", status.instances.len());
    for i in &status.instances {
        let owned = status.shards.iter().filter(|s| s.holder.as_deref() == Some(i.id.as_str()) && s.live).count();
        println!("  {}  {}  shards {}  lease expires in {} ms", i.id, i.address, owned, i.expires_in_ms);
    }
    println!("\nshard  owner                     epoch  expires_in_ms  undecided_records  finished_records");
    for s in &status.shards {
        let owner = match (&s.holder, s.live) {
            (Some(h), true) => h.clone(),
            (Some(h), false) => format!("({h}, expired)"),
            (None, _) => "-".to_string(),
        };
        println!(
            "{:>5}  {:<24}  {:>5}  {:>13}  {:>17}  {:>16}",
            s.shard, owner, s.epoch, s.expires_in_ms, s.in_doubt, s.finished
        );
    }
    let unowned = status.shards.iter().filter(|s| !s.live).count();
    let in_doubt: i64 = status.shards.iter().map(|s| s.in_doubt).sum();
    println!("\n{unowned} shard(s) without a live owner; {in_doubt} decision(s) not yet acknowledged by every branch");
    Ok(())
}

#[derive(Args, Debug)]
pub struct ClientArgs {
    /// Coordinator endpoint: http://host:port, https://host:port (with --tls-ca), or
    /// unix:<path> for a Unix socket.
    #[arg(long, env = "PLEDGE_COORDINATOR", default_value = "http://127.0.0.1:7600", global = true)]
    pub coordinator: String,
    /// The CA (PEM) the coordinator's certificate chains to: the call is made with TLS.
    #[arg(long, env = "PLEDGE_CLIENT_TLS_CA", global = true)]
    pub tls_ca: Option<PathBuf>,
    /// A client certificate (PEM) for a coordinator that requires mutual TLS, with --tls-key.
    #[arg(long, env = "PLEDGE_CLIENT_TLS_CERT", global = true)]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, env = "PLEDGE_CLIENT_TLS_KEY", global = true)]
    pub tls_key: Option<PathBuf>,
    /// A bearer token for a coordinator that authenticates calls (better in PLEDGE_TOKEN than on
    /// the command line, where other users of the host can see it).
    #[arg(long, env = "PLEDGE_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
}

/// A branch on the command line: RESOURCE/BRANCH, e.g. `db1/transfer-out`.
fn parse_branch(s: &str) -> Result<BranchKey, String> {
    let (resource, branch) = s.split_once('/').ok_or_else(|| format!("{s:?}: expected RESOURCE/BRANCH"))?;
    BranchKey::new(resource, branch).map_err(|e| e.to_string())
}

#[derive(Subcommand, Debug)]
pub enum TxnCommand {
    /// Begin a transaction; prints its GTID.
    Begin {
        #[arg(long)]
        timeout_ms: Option<u64>,
        #[arg(long, default_value = "")]
        idempotency_key: String,
        /// Enlist RESOURCE/BRANCH right away. Repeatable.
        #[arg(long = "branch", value_parser = parse_branch)]
        branches: Vec<BranchKey>,
        /// Enlist RESOURCE/BRANCH as possibly empty: if its participant never saw it, it votes
        /// read-only instead of no. Repeatable.
        #[arg(long = "branch-may-be-empty", value_parser = parse_branch)]
        maybe_empty: Vec<BranchKey>,
        /// Run three-phase commit (docs/three-phase.md) instead of two-phase.
        #[arg(long)]
        three_phase: bool,
    },
    /// Enlist branches (RESOURCE/BRANCH ...).
    Enlist {
        gtid: String,
        #[arg(value_parser = parse_branch, required = true)]
        branches: Vec<BranchKey>,
        /// The branches may be empty (see `begin --branch-may-be-empty`).
        #[arg(long)]
        may_be_empty: bool,
    },
    /// Commit; prints the outcome.
    Commit {
        gtid: String,
        #[arg(long = "branch", value_parser = parse_branch)]
        branches: Vec<BranchKey>,
        #[arg(long = "branch-may-be-empty", value_parser = parse_branch)]
        maybe_empty: Vec<BranchKey>,
        /// Wait until every participant has acknowledged.
        #[arg(long)]
        wait: bool,
    },
    Abort {
        gtid: String,
    },
    Get {
        gtid: String,
    },
    List {
        #[arg(long = "state", value_enum)]
        states: Vec<StateArg>,
        #[arg(long)]
        in_doubt: bool,
        #[arg(long, default_value_t = 0)]
        older_than_ms: u64,
        /// Only transactions with a heuristic outcome no operator has resolved yet.
        #[arg(long)]
        heuristic: bool,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Act on a decided transaction (docs/heuristics.md): retry phase 2 now (no branch), settle
    /// a branch its participant cannot finish or a heuristic outcome repaired by hand (a
    /// branch), decide a three-phase transaction stuck undecided, or forget repaired heuristic
    /// outcomes. Never against the durable decision; logged with --operator and --reason.
    #[command(group(clap::ArgGroup::new("action").required(true).args(["commit", "rollback", "forget"])))]
    Resolve {
        gtid: String,
        /// RESOURCE/BRANCH to act on; without it, the whole transaction.
        #[arg(value_parser = parse_branch)]
        branch: Option<BranchKey>,
        #[arg(long)]
        commit: bool,
        #[arg(long)]
        rollback: bool,
        #[arg(long)]
        forget: bool,
        /// Why (logged, shown by `txn get` and `log inspect`).
        #[arg(long)]
        reason: String,
        /// Who acts (logged); defaults to the login name.
        #[arg(long, env = "USER")]
        operator: String,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum StateArg {
    Active,
    Preparing,
    Committing,
    Committed,
    Aborting,
    Aborted,
}

impl From<StateArg> for v1::TransactionState {
    fn from(s: StateArg) -> Self {
        match s {
            StateArg::Active => v1::TransactionState::Active,
            StateArg::Preparing => v1::TransactionState::Preparing,
            StateArg::Committing => v1::TransactionState::Committing,
            StateArg::Committed => v1::TransactionState::Committed,
            StateArg::Aborting => v1::TransactionState::Aborting,
            StateArg::Aborted => v1::TransactionState::Aborted,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum ParticipantCommand {
    /// Register (or move) a participant: RESOURCE ENDPOINT.
    Register {
        resource: String,
        endpoint: String,
    },
    List,
}

#[derive(Subcommand, Debug)]
pub enum LogCommand {
    /// Print every record of the decision log, readably. Read-only; safe beside a running
    /// coordinator.
    Inspect {
        #[arg(long, env = "PLEDGE_DATA_DIR", default_value = "./data")]
        data_dir: PathBuf,
    },
}

/// `pledge health`: the probe a container's HEALTHCHECK (or a script waiting for a server)
/// runs. The health service answers without credentials, so it takes no token.
#[derive(Args, Debug)]
pub struct HealthArgs {
    /// The server: http://host:port, https://host:port (with --tls-ca) or unix:<path>. From
    /// PLEDGE_HEALTH_ENDPOINT when not given (the container images set it to their server's).
    #[arg(env = "PLEDGE_HEALTH_ENDPOINT")]
    pub endpoint: String,
    /// The service to ask about; empty (the default) means the server as a whole.
    #[arg(long, default_value = "")]
    pub service: String,
    /// Give up (exit 1) when the server has not answered within this many milliseconds:
    /// connecting and the call together.
    #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout_ms: u64,
    /// The CA (PEM) the server's certificate chains to: the call is made with TLS.
    #[arg(long, env = "PLEDGE_CLIENT_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// A client certificate (PEM) for a server that requires mutual TLS, with --tls-key.
    #[arg(long, env = "PLEDGE_CLIENT_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, env = "PLEDGE_CLIENT_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
}

/// Checks `grpc.health.v1.Health/Check` once, bounded by `--timeout-ms`; prints the status.
/// Any answer but SERVING (NOT_SERVING while a server starts or drains, an unknown service,
/// no answer in time) is an error, so the exit code alone tells a probe what it needs.
pub async fn health(args: HealthArgs) -> anyhow::Result<()> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let files = ClientTlsFiles::from_options(args.tls_ca, args.tls_cert, args.tls_key)?;
    let tls = files.map(ClientTls::load).transpose()?;
    let timeout = std::time::Duration::from_millis(args.timeout_ms);
    let target = Target::parse_with(&args.endpoint, tls.as_ref())?.configure(|e| e.connect_timeout(timeout));
    let check = async {
        let channel = target.connect().await.with_context(|| format!("cannot reach {}", args.endpoint))?;
        let response = HealthClient::new(channel)
            .check(HealthCheckRequest { service: args.service.clone() })
            .await
            // Not `status`: its exit codes (3 for NOT_FOUND, an unknown service) are the
            // transaction commands'; a probe fails with 1.
            .map_err(|e| anyhow::anyhow!("{:?}: {}", e.code(), e.message()))?;
        anyhow::Ok(response.into_inner().status())
    };
    let answer = tokio::time::timeout(timeout, check).await.map_err(|_| {
        anyhow::anyhow!("{} did not answer its health check within {} ms", args.endpoint, args.timeout_ms)
    })??;
    println!("{}", answer.as_str_name());
    anyhow::ensure!(answer == ServingStatus::Serving, "{} is {}", args.endpoint, answer.as_str_name());
    Ok(())
}

/// A bearer token added to every call (`--token`), when given.
#[derive(Clone)]
struct Token(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Token {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

type Client = CoordinatorClient<tonic::service::interceptor::InterceptedService<Channel, Token>>;

async fn connect(client: &ClientArgs) -> anyhow::Result<Client> {
    let files = ClientTlsFiles::from_options(client.tls_ca.clone(), client.tls_cert.clone(), client.tls_key.clone())?;
    let tls = files.map(ClientTls::load).transpose()?;
    let token = match &client.token {
        Some(t) => Some(format!("Bearer {t}").parse().context("--token: not a valid header value")?),
        None => None,
    };
    let channel = Target::parse_with(&client.coordinator, tls.as_ref())?
        .connect()
        .await
        .with_context(|| format!("cannot reach the coordinator at {}", client.coordinator))?;
    Ok(CoordinatorClient::with_interceptor(channel, Token(token)))
}

/// The branches as the API takes them: `branches`, then `maybe_empty` (declared possibly empty).
fn refs(branches: &[BranchKey], maybe_empty: &[BranchKey]) -> Vec<v1::BranchRef> {
    let refs = |keys: &[BranchKey], may_be_empty| {
        keys.iter().map(move |k| v1::BranchRef { may_be_empty, ..v1::BranchRef::from(k) }).collect::<Vec<_>>()
    };
    [refs(branches, false), refs(maybe_empty, true)].concat()
}

/// A call the coordinator answered with an error status.
#[derive(Debug, thiserror::Error)]
#[error("{:?}: {}", .0.code(), .0.message())]
pub struct CallFailed(pub tonic::Status);

fn status(e: tonic::Status) -> anyhow::Error {
    anyhow::Error::new(CallFailed(e))
}

/// The exit code for a failed command, so scripts can tell the answers apart: 2 an aborted
/// commit (printed, not an error), 3 no record of the transaction (never committed here),
/// 4 its outcome is older than the coordinator's retention, 1 anything else.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    match e.downcast_ref::<CallFailed>().map(|c| c.0.code()) {
        Some(tonic::Code::NotFound) => 3,
        Some(tonic::Code::OutOfRange) => 4,
        _ => 1,
    }
}

pub async fn txn(client: ClientArgs, command: TxnCommand) -> anyhow::Result<()> {
    let mut c = connect(&client).await?;
    match command {
        TxnCommand::Begin { timeout_ms, idempotency_key, branches, maybe_empty, three_phase } => {
            let protocol = if three_phase { v1::Protocol::ThreePhase } else { v1::Protocol::TwoPhase } as i32;
            let branches = refs(&branches, &maybe_empty);
            let r = c
                .begin(v1::BeginRequest { timeout_ms, idempotency_key, branches, protocol })
                .await
                .map_err(status)?
                .into_inner();
            println!("{}", r.gtid);
        }
        TxnCommand::Enlist { gtid, branches, may_be_empty } => {
            let branches = if may_be_empty { refs(&[], &branches) } else { refs(&branches, &[]) };
            c.enlist(v1::EnlistRequest { gtid, branches }).await.map_err(status)?;
            println!("enlisted");
        }
        TxnCommand::Commit { gtid, branches, maybe_empty, wait } => {
            let branches = refs(&branches, &maybe_empty);
            let r = c
                .commit(v1::CommitRequest { gtid, branches, wait_for_completion: wait })
                .await
                .map_err(status)?
                .into_inner();
            match v1::Outcome::try_from(r.outcome) {
                Ok(v1::Outcome::Committed) => println!(
                    "committed{}{}",
                    if r.completed { "" } else { " (phase 2 in progress)" },
                    if r.heuristic { " WITH A HEURISTIC OUTCOME (see txn get)" } else { "" }
                ),
                _ => {
                    println!("aborted: {}", r.reason);
                    std::process::exit(2);
                }
            }
        }
        TxnCommand::Abort { gtid } => {
            c.abort(v1::AbortRequest { gtid }).await.map_err(status)?;
            println!("aborted");
        }
        TxnCommand::Get { gtid } => {
            let r = c.get(v1::GetRequest { gtid }).await.map_err(status)?.into_inner();
            if let Some(t) = r.transaction {
                print_transaction(&t);
            }
        }
        TxnCommand::List { states, in_doubt, heuristic, older_than_ms, limit } => {
            let r = c
                .list(v1::ListRequest {
                    states: states.into_iter().map(|s| v1::TransactionState::from(s) as i32).collect(),
                    in_doubt,
                    older_than_ms,
                    limit,
                    heuristic,
                })
                .await
                .map_err(status)?
                .into_inner();
            for t in &r.transactions {
                println!(
                    "{}  {:<10}  branches={}  created={}{}{}",
                    t.gtid,
                    state_name(t.state),
                    t.branches.len(),
                    t.created_unix_ms,
                    match (t.heuristic_mixed, t.heuristic) {
                        (true, _) => "  HEURISTIC MIXED",
                        (false, true) => "  HEURISTIC",
                        _ => "",
                    },
                    if t.abort_reason.is_empty() { String::new() } else { format!("  reason={}", t.abort_reason) }
                );
            }
            if r.truncated {
                println!("(more transactions match; raise --limit)");
            }
        }
        TxnCommand::Resolve { gtid, branch, commit, rollback, forget: _, reason, operator } => {
            let action = match (commit, rollback) {
                (true, _) => v1::ResolveAction::Commit,
                (_, true) => v1::ResolveAction::Rollback,
                _ => v1::ResolveAction::Forget,
            } as i32;
            let branch = branch.as_ref().map(v1::BranchRef::from);
            let r = c
                .resolve(v1::ResolveRequest { gtid, branch, action, reason, operator })
                .await
                .map_err(status)?
                .into_inner();
            println!("{}: {}", if r.changed { "resolved" } else { "unchanged" }, r.detail);
            if let Some(t) = r.transaction {
                print_transaction(&t);
            }
        }
    }
    Ok(())
}

fn state_name(state: i32) -> &'static str {
    v1::TransactionState::try_from(state)
        .map(|s| s.as_str_name().trim_start_matches("TRANSACTION_STATE_"))
        .unwrap_or("?")
}

fn print_transaction(t: &v1::Transaction) {
    println!("gtid:       {}", t.gtid);
    println!("state:      {}", state_name(t.state));
    if !t.abort_reason.is_empty() {
        println!("reason:     {}", t.abort_reason);
    }
    println!("created:    {} (unix ms)", t.created_unix_ms);
    if t.decided_unix_ms != 0 {
        println!("decided:    {}", t.decided_unix_ms);
    }
    if t.completed_unix_ms != 0 {
        println!("completed:  {}", t.completed_unix_ms);
    }
    if t.one_phase {
        println!("one-phase:  yes");
    }
    if t.protocol() == v1::Protocol::ThreePhase {
        println!("protocol:   three-phase");
    }
    if !t.owner.is_empty() {
        println!("owner:      {}", t.owner);
    }
    let resolved = if t.heuristic_resolved { " (resolved by an operator)" } else { "" };
    if t.heuristic_mixed {
        println!("HEURISTIC MIXED: some branches committed and some rolled back; see the branch outcomes{resolved}");
    } else if t.heuristic {
        println!("HEURISTIC:  a participant decided on its own; see the branch outcomes{resolved}");
    }
    for b in &t.branches {
        let vote = v1::Vote::try_from(b.vote).map(|v| v.as_str_name().trim_start_matches("VOTE_")).unwrap_or("?");
        let outcome = v1::BranchOutcome::try_from(b.outcome)
            .map(|o| o.as_str_name().trim_start_matches("BRANCH_OUTCOME_"))
            .unwrap_or("?");
        print!(
            "branch:     {}/{}  vote={vote}  outcome={outcome}  acknowledged={}  attempts={}",
            b.resource_id, b.branch_id, b.acknowledged, b.attempts
        );
        if b.may_be_empty {
            print!("  may_be_empty");
        }
        if let Ok(state) = v1::BranchState::try_from(b.participant_state)
            && state != v1::BranchState::Unspecified
        {
            print!("  participant_state={}", state.as_str_name().trim_start_matches("BRANCH_STATE_"));
        }
        if b.prepared_unix_ms != 0 && !b.acknowledged {
            let age_ms = crate::driver::now_ms().saturating_sub(b.prepared_unix_ms);
            print!("  prepared_for={age_ms}ms");
        }
        if let Some(x) = &b.xid {
            print!("  xid={}:{}:{}", x.format_id, pledge_proto::xa::hex(&x.gtrid), pledge_proto::xa::hex(&x.bqual));
        }
        if b.resolved {
            print!("  resolved");
        }
        if !b.last_error.is_empty() {
            print!("  last_error={:?}", b.last_error);
        }
        println!();
    }
    for r in &t.resolutions {
        let action = v1::ResolveAction::try_from(r.action)
            .map(|a| a.as_str_name().trim_start_matches("RESOLVE_ACTION_"))
            .unwrap_or("?");
        let effect = v1::ResolveEffect::try_from(r.effect)
            .map(|e| e.as_str_name().trim_start_matches("RESOLVE_EFFECT_"))
            .unwrap_or("?");
        let target =
            if r.resource_id.is_empty() { "*".to_string() } else { format!("{}/{}", r.resource_id, r.branch_id) };
        println!(
            "resolution: at={} {action} {target} effect={effect} by {} from {}  reason={:?}",
            r.at_unix_ms, r.operator, r.peer, r.reason
        );
    }
}

pub async fn participant(client: ClientArgs, command: ParticipantCommand) -> anyhow::Result<()> {
    let mut c = connect(&client).await?;
    match command {
        ParticipantCommand::Register { resource, endpoint } => {
            c.register_participant(v1::RegisterParticipantRequest { resource_id: resource, endpoint })
                .await
                .map_err(status)?;
            println!("registered");
        }
        ParticipantCommand::List => {
            let r = c.list_participants(v1::ListParticipantsRequest {}).await.map_err(status)?.into_inner();
            for p in r.participants {
                println!("{}\t{}", p.resource_id, p.endpoint);
            }
        }
    }
    Ok(())
}

/// Prints the log's segments and records, decoding the coordinator's records. Exits non-zero
/// if it found damage.
pub fn log_inspect(data_dir: PathBuf) -> anyhow::Result<()> {
    let config = pledge_log::LogConfig::new(data_dir.join("log"));
    let mut damaged = false;
    for item in pledge_log::inspect(&config) {
        let item = item?;
        match &item {
            pledge_log::InspectItem::Record(r) => match records::decode(r.rtype, &r.payload) {
                Ok(record) => println!("  @{:<10} lsn={:<8} {}", r.offset, r.lsn, describe(&record)),
                Err(e) => {
                    damaged = true;
                    println!("  @{:<10} lsn={:<8} UNREADABLE type={}: {e}", r.offset, r.lsn, r.rtype)
                }
            },
            pledge_log::InspectItem::Corrupt { .. }
            | pledge_log::InspectItem::CorruptSegment { .. }
            | pledge_log::InspectItem::TornTail { .. }
            | pledge_log::InspectItem::IncompleteCheckpoint { .. } => {
                damaged = true;
                println!("{item}");
            }
            _ => println!("{item}"),
        }
    }
    if damaged {
        anyhow::bail!("the log is damaged (see above)");
    }
    Ok(())
}

fn describe(record: &LogRecord) -> String {
    let branches = |list: Vec<String>| list.join(", ");
    match record {
        LogRecord::Register { resource, endpoint } => format!("REGISTER {resource} -> {endpoint}"),
        LogRecord::Commit(c) | LogRecord::PreCommit(c) => format!(
            "{}{} {} decided={} epoch={} branches=[{}]{}",
            if matches!(record, LogRecord::PreCommit(_)) { "PRE-COMMIT" } else { "COMMIT" },
            c.three_phase
                .map(|t| format!(
                    " three-phase(precommit_wait_ms={} docommit_wait_ms={})",
                    t.precommit_wait_ms, t.docommit_wait_ms
                ))
                .unwrap_or_default(),
            c.gtid,
            c.decided_ms,
            c.epoch,
            branches(
                c.branches.iter().map(|b| format!("{} {:?}{}", b.key, b.vote, meta_suffix(&b.metadata))).collect()
            ),
            c.idempotency_key.as_ref().map(|k| format!(" key={k:?}")).unwrap_or_default()
        ),
        LogRecord::OnePhase(o) => format!(
            "ONE-PHASE {} decided={} epoch={} branch={}{}{}",
            o.gtid,
            o.decided_ms,
            o.epoch,
            o.branch,
            if o.may_be_empty { " may_be_empty" } else { "" },
            o.idempotency_key.as_ref().map(|k| format!(" key={k:?}")).unwrap_or_default()
        ),
        LogRecord::End(e) => format!(
            "END {} {} completed={} branches=[{}]{}",
            e.gtid,
            if e.committed { "committed" } else { "aborted" },
            e.completed_ms,
            branches(e.branches.iter().map(|b| format!("{} {:?}", b.key, b.outcome)).collect()),
            e.reason.as_ref().map(|r| format!(" reason={r:?}")).unwrap_or_default()
        ),
        LogRecord::Forgotten { through_ms } => format!("FORGOTTEN finished transactions through {through_ms}"),
        LogRecord::Resolve(r) => format!(
            "RESOLVE {} {} {} effect={} at={} epoch={} by {:?} from {} reason={:?}{}",
            r.gtid,
            r.action,
            r.branch.as_ref().map_or_else(|| "*".to_string(), ToString::to_string),
            r.effect,
            r.at_ms,
            r.epoch,
            r.operator,
            r.peer,
            r.reason,
            if r.releases { " releases" } else { "" }
        ),
    }
}

fn meta_suffix(metadata: &[u8]) -> String {
    if metadata.is_empty() {
        return String::new();
    }
    match std::str::from_utf8(metadata) {
        Ok(s) if s.chars().all(|c| !c.is_control()) => format!(" metadata={s:?}"),
        _ => format!(" metadata=<{} bytes>", metadata.len()),
    }
}
