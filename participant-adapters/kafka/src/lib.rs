//! Kafka as a Pledge participant: records produced (and consumer offsets added) inside a branch
//! become visible to read_committed consumers only if the global transaction commits — even
//! when the adapter crashes between prepare and commit.
//!
//! A branch is a Kafka transaction of one of the adapter's transactional producers
//! ([`pool`]). Kafka has no real prepare, so the adapter follows Flink's route (see
//! [`resource`]): prepare flushes, checks with DescribeTransactions that the transaction open
//! on the producer's transactional id is this producer's and holds the branch's partitions,
//! and votes with (transactional id, producer id, epoch, start time) as metadata; commit and
//! abort go through the producer that holds the transaction, or, when it failed or after a
//! restart, through EndTxn with the recorded id and epoch ([`wire`]) — never InitProducerId for
//! that transactional id, which would abort it.
//!
//! The participant contract (durable answers, unknown branches voting no, work lost in a
//! restart refused, one-phase commits resolved after a crash, outcomes never presumed) is
//! kept by `pledge_sdk::journaled`, with the branch journal in the adapter's data directory.
//! So is three-phase commit (docs/three-phase.md): a branch pre-committed and not told to
//! commit ends its transaction with a commit at its own do-commit deadline (on its producer,
//! or EndTxn after a restart), and one that voted yes and heard no PreCommit aborts it at its
//! wait deadline. A pre-committed branch keeps its producer (and transactional id) out of use
//! until then, like a prepared one.
//!
//! **Timeouts.** The broker aborts a transaction open longer than `transaction.timeout.ms`
//! (configurable here, capped by the broker's `transaction.max.timeout.ms`, 15 min by
//! default). A prepared branch that outlives it is lost: its commit then reports a heuristic
//! rollback, never success. The same holds for a three-phase branch whose wait and do-commit
//! timeouts together outlast it: its self-commit records a heuristic rollback.
//!
//! **Security.** The brokers are reached over PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL
//! (SCRAM-SHA-256, SCRAM-SHA-512 or PLAIN), by librdkafka and by the wire client alike
//! ([`security`]); at start the adapter logs in to a bootstrap broker once, and a CA that did
//! not sign the broker's certificate or a refused login stops it with the reason.
//!
//! **Exactly-once.** A Produce may carry a request id: a retry in the same branch gets the first
//! call's positions without sending again, and an id taken by a committed (or undecided) branch
//! is refused, for as long as the journal keeps the branch's answer.

pub mod pool;
pub mod resource;
pub mod scram;
pub mod security;
pub mod service;
pub mod txn;
pub mod wire;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pledge_proto::{BranchId, Gtid, ResourceId, Xid, bounded_reason};
use pledge_sdk::BranchError;
use pledge_sdk::journal::{Journal, JournalConfig, State};
use pledge_sdk::journaled::{Journaled, Resource};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use pool::{PoolConfig, ProducerPool};
use resource::Kafka;
use security::BrokerSecurity;
use txn::TxnRef;
use wire::TxnClient;

#[derive(Debug, Clone)]
pub struct KafkaConfig {
    pub resource: ResourceId,
    pub bootstrap: String,
    pub data_dir: PathBuf,
    /// Transactional ids are `<prefix>-0` .. `<prefix>-<producers - 1>`; keep the prefix
    /// stable across restarts and unique per adapter instance.
    pub transactional_id_prefix: String,
    pub producers: usize,
    pub transaction_timeout: Duration,
    /// Bound of each producer call and broker request.
    pub call_timeout: Duration,
    /// Longest wait for a free producer when a branch opens.
    pub acquire_timeout: Duration,
    /// A branch not prepared within this long is aborted (keep it below transaction_timeout).
    pub active_timeout: Duration,
    /// The branch journal (in `<data_dir>/journal`): see `pledge_sdk::journal`.
    pub journal: JournalConfig,
    /// How every client of the brokers connects (TLS, SASL): PLAINTEXT by default.
    pub security: BrokerSecurity,
}

impl KafkaConfig {
    pub fn new(resource: ResourceId, bootstrap: &str, data_dir: impl Into<PathBuf>) -> Self {
        let prefix = format!("pledge-{resource}");
        let data_dir = data_dir.into();
        KafkaConfig {
            journal: JournalConfig::new(data_dir.join("journal")),
            resource,
            bootstrap: bootstrap.to_string(),
            data_dir,
            transactional_id_prefix: prefix,
            producers: 8,
            // The broker's default transaction.max.timeout.ms: the longest a prepared branch can
            // wait for its decision. Unprepared branches do not live that long: the adapter
            // aborts them after active_timeout, and a restart aborts them at once.
            transaction_timeout: Duration::from_secs(900),
            call_timeout: Duration::from_secs(10),
            acquire_timeout: Duration::from_secs(10),
            active_timeout: Duration::from_secs(60),
            security: BrokerSecurity::default(),
        }
    }
}

/// Most records in one Produce call, and their largest size in bytes.
pub const MAX_RECORDS_PER_CALL: usize = 10_000;
pub const MAX_RECORD_BYTES: usize = 1 << 20;
/// Longest request id of a Produce, in bytes.
pub const MAX_REQUEST_ID_BYTES: usize = 200;

/// Kafka's rule for topic names (`org.apache.kafka.common.internals.Topic`): 1 to 249 of
/// `[A-Za-z0-9._-]`, and not `.` or `..`.
fn check_topic(topic: &str) -> Result<(), String> {
    if topic.is_empty() || topic.len() > 249 {
        return Err(format!("{} characters; a topic name has 1 to 249", topic.len()));
    }
    if topic == "." || topic == ".." {
        return Err(format!("{topic:?} is not a valid topic name"));
    }
    if let Some(c) = topic.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(format!("{topic:?} contains {c:?}; topic names use only ASCII letters, digits, '.', '_' and '-'"));
    }
    Ok(())
}

/// Most consumer groups whose metadata is cached (one consumer handle each); beyond it an idle
/// one is dropped from the cache.
const MAX_GROUPS: usize = 64;

/// The Kafka participant. Cheap to clone.
#[derive(Clone)]
pub struct KafkaParticipant {
    inner: Journaled<Kafka>,
    /// Consumer handles, one per group, for the group metadata offsets are committed under.
    groups: Arc<Mutex<HashMap<String, Arc<BaseConsumer>>>>,
}

/// Keeps the branch journal open; [`KafkaHandle::shutdown`] flushes it.
pub struct KafkaHandle {
    log: pledge_log::Log,
}

impl KafkaHandle {
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.log.shutdown().await?;
        Ok(())
    }
}

/// A record to produce.
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: String,
    pub partition: Option<i32>,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl KafkaParticipant {
    /// Opens the branch journal and prepares the producer pool; the producers of branches the
    /// journal holds prepared (or committing in one phase) stay unused until those are
    /// finished: starting one would abort the transaction its branch still needs.
    ///
    /// The brokers are asked first, once ([`wire::TxnClient::check_brokers`], within twice
    /// `call_timeout`): if they refuse the adapter (a certificate not accepted, a login refused)
    /// it does not start. Brokers that cannot be reached only get a warning, as before: the
    /// adapter serves, and finishes what its journal holds once they are back.
    pub async fn open(config: KafkaConfig) -> anyhow::Result<(KafkaParticipant, KafkaHandle)> {
        anyhow::ensure!(config.producers > 0, "at least one producer is needed");
        anyhow::ensure!(
            config.active_timeout < config.transaction_timeout,
            "active_timeout must be below transaction_timeout, or the broker aborts branches before the adapter does"
        );
        let security = &config.security;
        let txn = TxnClient::with_security(&config.bootstrap, config.call_timeout, security)?;
        // Bounded as a whole: brokers that do not answer delay the start by this much at most.
        let check_timeout = 2 * config.call_timeout;
        let checked = tokio::time::timeout(check_timeout, txn.check_brokers()).await.unwrap_or_else(|_| {
            Err(wire::WireError::Timeout { addr: config.bootstrap.clone(), timeout: check_timeout })
        });
        match checked {
            Ok(broker) => tracing::info!(broker, security = security.describe(), "reached the Kafka brokers"),
            Err(e) if e.is_refusal() => {
                anyhow::bail!("the Kafka brokers refuse the adapter ({}): {e}", security.describe())
            }
            Err(e) => tracing::warn!(
                error = %e,
                security = security.describe(),
                "no Kafka broker reached; starting anyway (if they are up, check that the security protocol is the \
                 listener's)"
            ),
        }
        let (journal, log) = Journal::open(config.journal.clone()).await?;
        let mut quarantined = HashMap::new();
        for (xid, state) in journal.in_flight_branches().await {
            let (State::Prepared { metadata, .. }
            | State::PreCommitted { metadata, .. }
            | State::Committing { metadata, .. }) = state
            else {
                continue;
            };
            match TxnRef::from_metadata(&metadata) {
                Some(txn) => drop(quarantined.insert(xid, txn.transactional_id)),
                None => anyhow::bail!("branch {xid} in the journal has metadata that does not parse: {metadata:?}"),
            }
        }
        if !quarantined.is_empty() {
            tracing::info!(resource = %config.resource, branches = quarantined.len(), "prepared branches waiting for their decision");
        }
        let pool = ProducerPool::new(
            PoolConfig {
                bootstrap: config.bootstrap.clone(),
                transactional_id_prefix: config.transactional_id_prefix.clone(),
                size: config.producers,
                transaction_timeout: config.transaction_timeout,
                call_timeout: config.call_timeout,
                security: config.security.clone(),
            },
            &quarantined.values().cloned().collect::<Vec<_>>(),
        );
        let active_timeout = config.active_timeout;
        let inner = Journaled::new(Kafka::new(config, pool.clone(), txn, quarantined), journal, active_timeout);
        tokio::spawn(async move {
            match pool.warm().await {
                (ready, None) => tracing::info!(ready, "transactional producers started"),
                (ready, Some(e)) => {
                    tracing::warn!(ready, error = %e, "not every transactional producer started; the rest start on first use")
                }
            }
        });
        let participant = KafkaParticipant { inner, groups: Arc::new(Mutex::new(HashMap::new())) };
        Ok((participant, KafkaHandle { log }))
    }

    fn config(&self) -> &KafkaConfig {
        &self.inner.resource().config
    }

    /// The Participant service of this Kafka cluster, to serve with `pledge_sdk::routes`.
    pub fn participant(&self) -> Journaled<Kafka> {
        self.inner.clone()
    }

    /// Sends records inside the branch; returns (partition, offset) of each once the broker has
    /// acknowledged all of them. A failure rolls the branch back.
    ///
    /// Records that cannot be sent as given (too many, too large, an invalid topic name or a
    /// negative partition) are refused with [`BranchError::Invalid`] before anything is sent,
    /// and the branch is left as it was. With a `request_id`, a retry in the same branch gets
    /// the first call's positions and sends nothing, and an id another branch took is refused
    /// (see the crate docs). The sending runs in a task of its own, so a caller that stops
    /// waiting (a deadline) cannot leave the branch's record of what it sent behind.
    pub async fn produce(
        &self,
        resource: &ResourceId,
        gtid: Gtid,
        branch: BranchId,
        records: Vec<Record>,
        request_id: Option<String>,
    ) -> Result<Vec<(i32, i64)>, BranchError> {
        if records.len() > MAX_RECORDS_PER_CALL {
            return Err(BranchError::Invalid(format!("at most {MAX_RECORDS_PER_CALL} records per call")));
        }
        for (i, r) in records.iter().enumerate() {
            if r.key.len() + r.value.len() > MAX_RECORD_BYTES {
                return Err(BranchError::Invalid(format!(
                    "records[{i}]: a record for topic {:?} is larger than {MAX_RECORD_BYTES} bytes",
                    r.topic
                )));
            }
            if let Err(e) = check_topic(&r.topic) {
                return Err(BranchError::Invalid(format!("records[{i}].topic: {e}")));
            }
            if let Some(p) = r.partition.filter(|p| *p < 0) {
                return Err(BranchError::Invalid(format!("records[{i}].partition: {p} is negative")));
            }
        }
        if let Some(id) = &request_id
            && (id.is_empty() || id.len() > MAX_REQUEST_ID_BYTES)
        {
            return Err(BranchError::Invalid(format!("request_id: must be 1 to {MAX_REQUEST_ID_BYTES} bytes")));
        }
        let xid = Xid { resource: resource.clone(), gtid, branch };
        let this = self.clone();
        tokio::spawn(async move { this.send_records(xid, records, request_id).await })
            .await
            .map_err(|e| BranchError::Unavailable(format!("sending the records failed: {e}")))?
    }

    async fn send_records(
        &self,
        xid: Xid,
        records: Vec<Record>,
        request_id: Option<String>,
    ) -> Result<Vec<(i32, i64)>, BranchError> {
        let mut branch = self.inner.branch(&xid).await?;
        if let Some(id) = &request_id {
            if let Some(positions) = branch.open().requests.get(id) {
                return Ok(positions.clone()); // a retry: its records were sent
            }
            branch.claim(id).await?;
        }
        let producer = branch.open().lease.producer.clone();
        let deliveries: Vec<_> = records
            .iter()
            .map(|r| {
                let mut record = FutureRecord::to(&r.topic).key(&r.key[..]).payload(&r.value[..]);
                if let Some(p) = r.partition {
                    record = record.partition(p);
                }
                if !r.headers.is_empty() {
                    let mut headers = rdkafka::message::OwnedHeaders::new_with_capacity(r.headers.len());
                    for (k, v) in &r.headers {
                        headers = headers.insert(rdkafka::message::Header { key: k, value: Some(&v[..]) });
                    }
                    record = record.headers(headers);
                }
                producer.send_result(record).map_err(|(e, _)| e)
            })
            .collect();
        let mut positions = Vec::with_capacity(deliveries.len());
        let mut failure = None;
        for (delivery, r) in deliveries.into_iter().zip(&records) {
            match delivery {
                Ok(future) => match future.await {
                    Ok(Ok(delivered)) => {
                        positions.push((delivered.partition, delivered.offset));
                        branch.open().partitions.insert((r.topic.clone(), delivered.partition));
                    }
                    Ok(Err((e, _))) => failure = failure.or(Some(e.to_string())),
                    Err(_) => failure = failure.or(Some("delivery cancelled".into())),
                },
                Err(e) => failure = failure.or(Some(e.to_string())),
            }
        }
        if let Some(e) = failure {
            let reason = bounded_reason(format!("a record could not be delivered: {e}"));
            branch.fail(reason.clone()).await;
            return Err(BranchError::Aborted(reason));
        }
        if let Some(id) = request_id {
            branch.open().requests.insert(id, positions.clone());
        }
        Ok(positions)
    }

    /// Adds `offsets` of consumer group `group_id` to the branch.
    pub async fn add_offsets(
        &self,
        resource: &ResourceId,
        gtid: Gtid,
        branch: BranchId,
        group_id: &str,
        offsets: Vec<(String, i32, i64)>,
    ) -> Result<(), BranchError> {
        if !self.inner.resource().serves(resource) {
            return Err(BranchError::UnknownResource(resource.to_string()));
        }
        let metadata = self
            .group(group_id)?
            .group_metadata()
            .ok_or_else(|| BranchError::Unavailable(format!("no group metadata for consumer group {group_id:?}")))?;
        let mut tpl = TopicPartitionList::new();
        for (topic, partition, offset) in &offsets {
            tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset))
                .map_err(|e| BranchError::Invalid(format!("offset {topic}/{partition}/{offset}: {e}")))?;
        }
        let xid = Xid { resource: resource.clone(), gtid, branch };
        let mut branch = self.inner.branch(&xid).await?;
        let producer = branch.open().lease.producer.clone();
        let timeout = self.inner.resource().pool.call_timeout();
        let sent = tokio::task::spawn_blocking(move || producer.send_offsets_to_transaction(&tpl, &metadata, timeout))
            .await
            .map_err(|e| BranchError::Unavailable(format!("send_offsets_to_transaction panicked: {e}")))?;
        match sent {
            Ok(()) => {
                branch.open().offsets = true;
                Ok(())
            }
            Err(e) => {
                let reason = bounded_reason(format!("adding consumer offsets failed: {e}"));
                branch.fail(reason.clone()).await;
                Err(BranchError::Aborted(reason))
            }
        }
    }

    fn group(&self, group_id: &str) -> Result<Arc<BaseConsumer>, BranchError> {
        let mut groups = self.groups.lock().unwrap();
        if let Some(c) = groups.get(group_id) {
            return Ok(c.clone());
        }
        if groups.len() >= MAX_GROUPS {
            // Full: drop the handle of a group no call is using right now (it is only a cache;
            // the group's metadata is fetched again if it comes back).
            let idle = groups.iter().find(|(_, c)| Arc::strong_count(c) == 1).map(|(g, _)| g.clone());
            match idle {
                Some(idle) => {
                    groups.remove(&idle);
                }
                None => return Err(BranchError::Busy(format!("{MAX_GROUPS} consumer groups are in use at once"))),
            }
        }
        let consumer: BaseConsumer = self
            .config()
            .security
            .apply(ClientConfig::new().set("bootstrap.servers", &self.config().bootstrap).set("group.id", group_id))
            .create()
            .map_err(|e| BranchError::Unavailable(format!("consumer for group {group_id:?}: {e}")))?;
        let consumer = Arc::new(consumer);
        groups.insert(group_id.to_string(), consumer.clone());
        Ok(consumer)
    }
}

#[cfg(test)]
mod topic_tests {
    use super::check_topic;

    #[test]
    fn topic_names_follow_kafkas_rule() {
        for good in ["orders", "a.b_c-1", &"t".repeat(249)] {
            assert_eq!(check_topic(good), Ok(()), "{good}");
        }
        for bad in ["", ".", "..", "has space", "ünicode", &"t".repeat(250)] {
            assert!(check_topic(bad).is_err(), "{bad:?}");
        }
    }
}
