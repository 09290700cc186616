//! How the `pledge-conformance` binary does work in a branch and sees it committed: through
//! the work API of an in-tree participant (the reference store, the PostgreSQL adapter's
//! Execute, the Kafka adapter's Produce), or through shell commands for any other participant.
//! A restart is a shell command too; the kit then waits for the participant's gRPC health
//! check to answer SERVING.

use std::time::Duration;

use pledge_proto::Gtid;
use pledge_proto::v1::kafka_branch_client::KafkaBranchClient;
use pledge_proto::v1::participant_client::ParticipantClient;
use pledge_proto::v1::postgres_branch_client::PostgresBranchClient;
use pledge_proto::v1::reference_store_client::ReferenceStoreClient;
use pledge_proto::v1::{self, value::Kind};
use tonic::transport::Channel;

use crate::Target;

/// How long a restarted participant may take to serve again.
const RESTART_TIMEOUT: Duration = Duration::from_secs(60);

/// What does the work.
#[derive(Debug, Clone)]
pub enum Work {
    /// `pledge.v1.ReferenceStore`: Put, then Read.
    Reference,
    /// `pledge.v1.PostgresBranch.Execute`: an INSERT into `table` (created if missing), read
    /// back in a branch of its own that is then aborted.
    Postgres { table: String },
    /// `pledge.v1.KafkaBranch.Produce` to partition 0 of `topic`, read back by a read_committed
    /// consumer from `bootstrap`.
    Kafka { topic: String, bootstrap: String },
    /// Shell commands: `work` with `{gtid}`, `{branch}` and `{key}` replaced (exit 0: done,
    /// anything else: refused), `visible` with `{key}` (exit 0: visible, 1: not, else: error).
    Commands { work: String, visible: String },
}

/// A participant reached at `endpoint`, serving `resource`.
pub struct Driven {
    pub endpoint: String,
    pub resource: String,
    pub work: Work,
    /// `sh -c` command that kills the participant with SIGKILL and starts it again.
    pub restart: Option<String>,
    channel: Option<Channel>,
}

async fn channel(endpoint: &str) -> Result<Channel, String> {
    pledge_proto::transport::Target::parse(endpoint)
        .map_err(|e| format!("endpoint {endpoint:?}: {e}"))?
        .connect()
        .await
        .map_err(|e| format!("connecting to {endpoint}: {e}"))
}

fn status(what: &str, e: tonic::Status) -> String {
    format!("{what}: {:?}: {}", e.code(), e.message())
}

async fn shell(command: &str) -> Result<std::process::ExitStatus, String> {
    tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .status()
        .await
        .map_err(|e| format!("running {command:?}: {e}"))
}

impl Driven {
    pub fn new(endpoint: String, resource: String, work: Work, restart: Option<String>) -> Driven {
        Driven { endpoint, resource, work, restart, channel: None }
    }

    async fn channel(&mut self) -> Result<Channel, String> {
        if self.channel.is_none() {
            self.channel = Some(channel(&self.endpoint).await?);
        }
        Ok(self.channel.clone().expect("just set"))
    }

    /// Readies the work: for PostgreSQL, creates the table (in a branch committed in one phase).
    pub async fn prepare_work(&mut self) -> Result<(), String> {
        let Work::Postgres { table } = self.work.clone() else { return Ok(()) };
        let ddl = format!("CREATE TABLE IF NOT EXISTS {table} (key text PRIMARY KEY)");
        let gtid = Gtid::new_v7().to_string();
        self.execute(&gtid, "conformance-setup", &ddl, vec![]).await?;
        let channel = self.channel().await?;
        let xid = v1::BranchXid { resource_id: self.resource.clone(), gtid, branch_id: "conformance-setup".into() };
        let branch = v1::CommitBranch { xid: Some(xid), one_phase: true, metadata: vec![], may_be_empty: false };
        let r = ParticipantClient::new(channel)
            .commit(v1::CommitBranchesRequest { coordinator_id: "conformance-setup".into(), branches: vec![branch] })
            .await
            .map_err(|e| status("creating the table", e))?
            .into_inner();
        match r.results.first().map(|r| r.outcome()) {
            Some(v1::BranchOutcome::Committed) => Ok(()),
            other => Err(format!("creating table {table}: {other:?}")),
        }
    }

    async fn execute(
        &mut self,
        gtid: &str,
        branch: &str,
        sql: &str,
        params: Vec<v1::Value>,
    ) -> Result<v1::ExecuteResponse, String> {
        let channel = self.channel().await?;
        PostgresBranchClient::new(channel)
            .execute(v1::ExecuteRequest {
                resource_id: self.resource.clone(),
                gtid: gtid.into(),
                branch_id: branch.into(),
                statements: vec![v1::Statement { sql: sql.into(), params }],
                request_id: String::new(),
            })
            .await
            .map(tonic::Response::into_inner)
            .map_err(|e| status("Execute", e))
    }
}

fn text(s: &str) -> v1::Value {
    v1::Value { kind: Some(Kind::Text(s.into())) }
}

fn fill(template: &str, pairs: &[(&str, &str)]) -> String {
    pairs.iter().fold(template.to_string(), |t, (k, v)| t.replace(&format!("{{{k}}}"), v))
}

impl Target for Driven {
    fn endpoint(&self) -> String {
        self.endpoint.clone()
    }

    fn resource(&self) -> String {
        self.resource.clone()
    }

    async fn work(&mut self, gtid: &str, branch: &str, key: &str) -> Result<(), String> {
        match self.work.clone() {
            Work::Reference => {
                let request = v1::PutRequest {
                    gtid: gtid.into(),
                    branch_id: branch.into(),
                    key: key.into(),
                    value: b"v".to_vec(),
                };
                ReferenceStoreClient::new(self.channel().await?).put(request).await.map_err(|e| status("Put", e))?;
                Ok(())
            }
            Work::Postgres { table } => {
                let sql = format!("INSERT INTO {table} (key) VALUES ($1)");
                self.execute(gtid, branch, &sql, vec![text(key)]).await.map(drop)
            }
            Work::Kafka { topic, .. } => {
                let record = v1::KafkaRecord {
                    topic,
                    partition: Some(0),
                    key: key.as_bytes().to_vec(),
                    value: b"v".to_vec(),
                    headers: vec![],
                };
                let request = v1::ProduceRequest {
                    resource_id: self.resource.clone(),
                    gtid: gtid.into(),
                    branch_id: branch.into(),
                    records: vec![record],
                    request_id: String::new(),
                };
                KafkaBranchClient::new(self.channel().await?)
                    .produce(request)
                    .await
                    .map_err(|e| status("Produce", e))?;
                Ok(())
            }
            Work::Commands { work, .. } => {
                let command = fill(&work, &[("gtid", gtid), ("branch", branch), ("key", key)]);
                let done = shell(&command).await?;
                if done.success() { Ok(()) } else { Err(format!("{command:?} exited with {done}")) }
            }
        }
    }

    async fn visible(&mut self, key: &str) -> Result<bool, String> {
        match self.work.clone() {
            Work::Reference => {
                let channel = self.channel().await?;
                let r = ReferenceStoreClient::new(channel)
                    .read(v1::ReadRequest { key: key.into() })
                    .await
                    .map_err(|e| status("Read", e))?;
                Ok(r.into_inner().found)
            }
            Work::Postgres { table } => {
                // Read in a branch of its own, then abort it.
                let (gtid, branch) = (Gtid::new_v7().to_string(), "conformance-read");
                let sql = format!("SELECT count(*) FROM {table} WHERE key = $1");
                let rows = self.execute(&gtid, branch, &sql, vec![text(key)]).await?;
                let xid = v1::BranchXid { resource_id: self.resource.clone(), gtid, branch_id: branch.into() };
                let abort = v1::AbortBranchesRequest {
                    coordinator_id: "conformance-read".into(),
                    branches: vec![v1::AbortBranch { xid: Some(xid), metadata: vec![] }],
                };
                ParticipantClient::new(self.channel().await?).abort(abort).await.map_err(|e| status("Abort", e))?;
                let count = rows.results.first().and_then(|r| r.rows.first()).and_then(|r| r.values.first());
                Ok(matches!(count.and_then(|v| v.kind.clone()), Some(Kind::Int(n)) if n > 0))
            }
            Work::Kafka { topic, bootstrap } => {
                let key = key.to_string();
                tokio::task::spawn_blocking(move || kafka_keys(&bootstrap, &topic).map(|keys| keys.contains(&key)))
                    .await
                    .map_err(|e| format!("reading {e}"))?
            }
            Work::Commands { visible, .. } => {
                let command = fill(&visible, &[("key", key)]);
                match shell(&command).await?.code() {
                    Some(0) => Ok(true),
                    Some(1) => Ok(false),
                    other => Err(format!("{command:?} exited with {other:?}")),
                }
            }
        }
    }

    fn can_restart(&self) -> bool {
        self.restart.is_some()
    }

    async fn restart(&mut self) -> Result<(), String> {
        let command = self.restart.clone().ok_or("no restart command")?;
        let done = shell(&command).await?;
        if !done.success() {
            return Err(format!("restart command {command:?} exited with {done}"));
        }
        self.channel = None;
        serving(&self.endpoint).await
    }
}

/// Waits (bounded) until the participant at `endpoint` answers its health check with SERVING.
pub async fn serving(endpoint: &str) -> Result<(), String> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let deadline = tokio::time::Instant::now() + RESTART_TIMEOUT;
    loop {
        if let Ok(c) = channel(endpoint).await {
            let r = HealthClient::new(c).check(HealthCheckRequest { service: String::new() }).await;
            if r.is_ok_and(|r| r.into_inner().status() == ServingStatus::Serving) {
                return Ok(());
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("{endpoint} did not serve within {RESTART_TIMEOUT:?}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The keys a read_committed consumer sees in partition 0 of `topic`, up to its last stable
/// offset.
fn kafka_keys(bootstrap: &str, topic: &str) -> Result<Vec<String>, String> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("pledge-conformance-{}", fastrand::u64(..)))
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| format!("consumer: {e}"))?;
    let high = match consumer.fetch_watermarks(topic, 0, Duration::from_secs(5)) {
        Ok((_, high)) => high,
        // Not created yet: nothing committed to it.
        Err(_) => return Ok(Vec::new()),
    };
    let mut keys = Vec::new();
    if high == 0 {
        return Ok(keys);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning).map_err(|e| e.to_string())?;
    consumer.assign(&tpl).map_err(|e| e.to_string())?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let position =
            consumer.position().map_err(|e| e.to_string())?.find_partition(topic, 0).and_then(|p| p.offset().to_raw());
        if position.is_some_and(|p| p >= high) {
            return Ok(keys);
        }
        if std::time::Instant::now() >= deadline {
            return Err(format!("reading {topic}: stuck at {position:?} of {high}"));
        }
        if let Some(message) = consumer.poll(Duration::from_millis(100)) {
            let m = message.map_err(|e| format!("consuming {topic}: {e}"))?;
            keys.push(String::from_utf8_lossy(m.key().unwrap_or_default()).to_string());
        }
    }
}
