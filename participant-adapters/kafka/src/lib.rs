//! Kafka as a Pledge participant: records produced (and consumer offsets added) inside a branch
//! become visible to read_committed consumers only if the global transaction commits — even
//! when the adapter crashes between prepare and commit.
//!
//! A branch is a Kafka transaction of one of the adapter's transactional producers
//! ([`pool`]). Kafka has no real prepare, so the adapter follows Flink's route:
//! * **prepare** = flush and confirm every delivery, then ask the transaction coordinator
//!   (DescribeTransactions) for the transaction's producer id and epoch, record
//!   (transactional.id, producer id, epoch) durably ([`state`]) and return it as vote metadata
//!   (the coordinator logs it with its decision). A branch that sent nothing votes READ_ONLY.
//! * **commit / abort** = `commit_transaction` / `abort_transaction` on the producer that holds
//!   it; after an adapter restart, when that producer is gone, EndTxn with the recorded id and
//!   epoch ([`wire`]) — never InitProducerId for that transactional id, which would abort it.
//! * **recover** = the recorded prepared branches, each checked with DescribeTransactions.
//!
//! **Timeouts.** The broker aborts a transaction open longer than `transaction.timeout.ms`
//! (configurable here, capped by the broker's `transaction.max.timeout.ms`, 15 min by
//! default). A prepared branch that outlives it is lost: its commit then reports a heuristic
//! rollback (fenced producer, invalid state, or a moved epoch), never success.

pub mod pool;
pub mod service;
pub mod state;
pub mod wire;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pledge_proto::{BranchId, Gtid, ResourceId, Xid, bounded_reason};
use pledge_sdk::table::{BranchTable, Fin, Key, SlotGuard, SlotState};
use pledge_sdk::{Error, InDoubt, Outcome, Participant, Vote};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use pool::{Lease, PoolConfig, ProducerPool};
use state::{Finished, PreparedTxn, State};
use wire::{TxnClient, code};

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
    pub tombstone_retention: Duration,
    pub max_tombstones: usize,
}

impl KafkaConfig {
    pub fn new(resource: ResourceId, bootstrap: &str, data_dir: impl Into<PathBuf>) -> Self {
        let prefix = format!("pledge-{resource}");
        KafkaConfig {
            resource,
            bootstrap: bootstrap.to_string(),
            data_dir: data_dir.into(),
            transactional_id_prefix: prefix,
            producers: 8,
            // The broker's default transaction.max.timeout.ms: the longest a prepared branch can
            // wait for its decision. Unprepared branches do not live that long: the adapter
            // aborts them after active_timeout, and a restart aborts them at once.
            transaction_timeout: Duration::from_secs(900),
            call_timeout: Duration::from_secs(10),
            acquire_timeout: Duration::from_secs(10),
            active_timeout: Duration::from_secs(60),
            tombstone_retention: Duration::from_secs(2 * 3600),
            max_tombstones: 1_000_000,
        }
    }
}

/// Most records in one Produce call, and their largest size in bytes.
pub const MAX_RECORDS_PER_CALL: usize = 10_000;
pub const MAX_RECORD_BYTES: usize = 1 << 20;

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

/// Why branch work was refused or failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BranchError {
    #[error("unknown resource {0:?}")]
    UnknownResource(String),
    #[error("branch is {state}{}", if reason.is_empty() { String::new() } else { format!(": {reason}") })]
    Finished { state: &'static str, reason: String },
    /// The request itself is wrong.
    #[error("{0}")]
    Invalid(String),
    /// The branch cannot be taken here (e.g. begun before this adapter started).
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Busy(String),
    #[error("Kafka: {0}")]
    Kafka(String),
}

/// What an open branch holds: its producer (with the branch's transaction open on it).
#[derive(Default)]
struct KafkaSlot {
    lease: Option<Lease>,
    /// Records sent and offsets added: a branch with neither votes READ_ONLY.
    sent: u64,
    offsets: bool,
    /// Prepared: still holding its producer, waiting for the decision.
    prepared: Option<PreparedTxn>,
}

impl SlotState for KafkaSlot {
    fn is_open(&self) -> bool {
        self.lease.is_some()
    }
}

struct Inner {
    config: KafkaConfig,
    branches: BranchTable<KafkaSlot>,
    pool: ProducerPool,
    state: State,
    txn: TxnClient,
    /// Consumer handles, one per group, for the group metadata offsets are committed under.
    groups: Mutex<HashMap<String, Arc<BaseConsumer>>>,
    /// Prepared branches already reported lost at the broker (warned once, not every scan).
    warned: Mutex<HashSet<Key>>,
}

/// The Kafka participant. Cheap to clone.
#[derive(Clone)]
pub struct KafkaParticipant {
    inner: Arc<Inner>,
}

/// Keeps the state log open; [`KafkaHandle::shutdown`] flushes it.
pub struct KafkaHandle {
    log: pledge_log::Log,
}

impl KafkaHandle {
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.log.shutdown().await?;
        Ok(())
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl KafkaParticipant {
    /// Replays the state in `config.data_dir` (blocking) and prepares the producer pool; the
    /// producers of prepared branches' transactional ids stay unused until those are finished.
    pub fn open(config: KafkaConfig) -> anyhow::Result<(KafkaParticipant, KafkaHandle)> {
        anyhow::ensure!(config.producers > 0, "at least one producer is needed");
        anyhow::ensure!(
            config.active_timeout < config.transaction_timeout,
            "active_timeout must be below transaction_timeout, or the broker aborts branches before the adapter does"
        );
        let (state, log, finished) = State::open(&config.data_dir)?;
        let prepared = futures::executor::block_on(state.list());
        let quarantined: Vec<String> = prepared.iter().map(|(_, t)| t.transactional_id.clone()).collect();
        if !prepared.is_empty() {
            tracing::info!(resource = %config.resource, prepared = prepared.len(), "prepared branches waiting for their decision");
        }
        let pool = ProducerPool::new(
            PoolConfig {
                bootstrap: config.bootstrap.clone(),
                transactional_id_prefix: config.transactional_id_prefix.clone(),
                size: config.producers,
                transaction_timeout: config.transaction_timeout,
                call_timeout: config.call_timeout,
            },
            &quarantined,
        );
        // Answers given before the restart are given again.
        let branches = BranchTable::new(config.tombstone_retention, config.max_tombstones);
        for (key, f) in finished {
            branches.finish(&key, if f.committed { Fin::Committed } else { Fin::Aborted(f.reason) });
        }
        let inner = Inner {
            branches,
            warned: Mutex::new(HashSet::new()),
            txn: TxnClient::new(&config.bootstrap, config.call_timeout),
            pool,
            state,
            groups: Mutex::new(HashMap::new()),
            config,
        };
        let participant = KafkaParticipant { inner: Arc::new(inner) };
        participant.spawn_housekeeping();
        let pool = participant.inner.pool.clone();
        tokio::spawn(async move {
            match pool.warm().await {
                (ready, None) => tracing::info!(ready, "transactional producers started"),
                (ready, Some(e)) => {
                    tracing::warn!(ready, error = %e, "not every transactional producer started; the rest start on first use")
                }
            }
        });
        Ok((participant, KafkaHandle { log }))
    }

    fn check_resource(&self, resource: &ResourceId) -> Result<(), BranchError> {
        if *resource == self.inner.config.resource {
            Ok(())
        } else {
            Err(BranchError::UnknownResource(resource.to_string()))
        }
    }

    /// Locks branch (gtid, branch), opening it (a producer and a new Kafka transaction) if needed.
    async fn open_branch(&self, key: &Key) -> Result<SlotGuard<KafkaSlot>, BranchError> {
        let table = &self.inner.branches;
        let mut slot = table.lock(key).await;
        if slot.state.prepared.is_some() {
            return Err(BranchError::Finished { state: "prepared", reason: String::new() });
        }
        if slot.state.lease.is_some() {
            return Ok(slot);
        }
        let refuse = |slot: &mut SlotGuard<KafkaSlot>, e: BranchError| {
            table.release(key, slot);
            Err(e)
        };
        if let Some(fin) = table.finished(key) {
            let reason = if let Fin::Aborted(r) = &fin { r.clone() } else { String::new() };
            return refuse(&mut slot, BranchError::Finished { state: fin.name(), reason });
        }
        if let Err(reason) = table.may_start(&key.0) {
            return refuse(&mut slot, BranchError::Refused(reason));
        }
        // The pool bounds the branches open at once: this waits (bounded) for a free producer.
        let lease = match self.inner.pool.acquire(self.inner.config.acquire_timeout).await {
            Ok(lease) => lease,
            Err(e) => return refuse(&mut slot, BranchError::Busy(e)),
        };
        if let Err(e) = lease.producer.begin_transaction() {
            let mut lease = lease;
            lease.poison();
            return refuse(&mut slot, BranchError::Kafka(format!("begin_transaction: {e}")));
        }
        slot.state = KafkaSlot { lease: Some(lease), sent: 0, offsets: false, prepared: None };
        slot.since = Some(Instant::now());
        Ok(slot)
    }

    /// Sends records inside the branch; returns (partition, offset) of each once the broker has
    /// acknowledged all of them. A failure rolls the branch back.
    ///
    /// Records that cannot be sent as given (too many, too large, an invalid topic name or a
    /// negative partition) are refused with [`BranchError::Invalid`] before anything is sent,
    /// and the branch is left as it was. The sending runs in a task of its own, so a caller that
    /// stops waiting (a deadline) cannot leave the branch's count of sent records behind what
    /// was sent.
    pub async fn produce(
        &self,
        resource: &ResourceId,
        gtid: Gtid,
        branch: BranchId,
        records: Vec<Record>,
    ) -> Result<Vec<(i32, i64)>, BranchError> {
        self.check_resource(resource)?;
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
        let this = self.clone();
        tokio::spawn(async move { this.send_records(gtid, branch, records).await })
            .await
            .map_err(|e| BranchError::Kafka(format!("sending the records failed: {e}")))?
    }

    async fn send_records(
        &self,
        gtid: Gtid,
        branch: BranchId,
        records: Vec<Record>,
    ) -> Result<Vec<(i32, i64)>, BranchError> {
        let key = (gtid, branch);
        let mut slot = self.open_branch(&key).await?;
        let producer = slot.state.lease.as_ref().expect("open branch").producer.clone();
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
        for delivery in deliveries {
            match delivery {
                Ok(future) => match future.await {
                    Ok(Ok(delivered)) => positions.push((delivered.partition, delivered.offset)),
                    Ok(Err((e, _))) => failure = failure.or(Some(e.to_string())),
                    Err(_) => failure = failure.or(Some("delivery cancelled".into())),
                },
                Err(e) => failure = failure.or(Some(e.to_string())),
            }
        }
        slot.state.sent += positions.len() as u64;
        if let Some(e) = failure {
            let reason = bounded_reason(format!("a record could not be delivered: {e}"));
            // Not prepared, so ending it cannot fail.
            let _ = self.abort_open(&key, &mut slot, Fin::Aborted(reason.clone())).await;
            self.inner.branches.release(&key, &mut slot);
            return Err(BranchError::Kafka(reason));
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
        self.check_resource(resource)?;
        let metadata = self
            .group(group_id)?
            .group_metadata()
            .ok_or_else(|| BranchError::Kafka(format!("no group metadata for consumer group {group_id:?}")))?;
        let mut tpl = TopicPartitionList::new();
        for (topic, partition, offset) in &offsets {
            tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset))
                .map_err(|e| BranchError::Invalid(format!("offset {topic}/{partition}/{offset}: {e}")))?;
        }
        let key = (gtid, branch);
        let mut slot = self.open_branch(&key).await?;
        let producer = slot.state.lease.as_ref().expect("open branch").producer.clone();
        let timeout = self.inner.pool.call_timeout();
        let sent = tokio::task::spawn_blocking(move || producer.send_offsets_to_transaction(&tpl, &metadata, timeout))
            .await
            .map_err(|e| BranchError::Kafka(format!("send_offsets_to_transaction panicked: {e}")))?;
        match sent {
            Ok(()) => {
                slot.state.offsets = true;
                Ok(())
            }
            Err(e) => {
                let reason = bounded_reason(format!("adding consumer offsets failed: {e}"));
                let _ = self.abort_open(&key, &mut slot, Fin::Aborted(reason.clone())).await;
                self.inner.branches.release(&key, &mut slot);
                Err(BranchError::Kafka(reason))
            }
        }
    }

    fn group(&self, group_id: &str) -> Result<Arc<BaseConsumer>, BranchError> {
        let mut groups = self.inner.groups.lock().unwrap();
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
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.inner.config.bootstrap)
            .set("group.id", group_id)
            .create()
            .map_err(|e| BranchError::Kafka(format!("consumer for group {group_id:?}: {e}")))?;
        let consumer = Arc::new(consumer);
        groups.insert(group_id.to_string(), consumer.clone());
        Ok(consumer)
    }

    /// Aborts an open branch's transaction and gives its producer back (a producer whose abort
    /// failed is replaced). Records the end of a prepared branch durably; if that fails, the
    /// branch keeps its producer and stays prepared, and the error is returned.
    async fn abort_open(&self, key: &Key, slot: &mut SlotGuard<KafkaSlot>, fin: Fin) -> Result<(), Error> {
        let Some(lease) = slot.state.lease.as_mut() else { return Ok(()) };
        let (producer, timeout) = (lease.producer.clone(), self.inner.pool.call_timeout());
        let aborted = tokio::task::spawn_blocking(move || producer.abort_transaction(timeout)).await;
        if !matches!(aborted, Ok(Ok(()))) {
            tracing::warn!(gtid = %key.0, branch = %key.1, result = ?aborted, "abort_transaction failed; replacing the producer");
            lease.poison();
        }
        self.close(key, slot, fin).await
    }

    /// Ends an open branch: records a prepared one's end (the answer given) durably, then
    /// gives the producer back and remembers the answer.
    async fn close(&self, key: &Key, slot: &mut SlotGuard<KafkaSlot>, fin: Fin) -> Result<(), Error> {
        if slot.state.prepared.is_some() {
            let finished = match &fin {
                Fin::Committed => Finished { committed: true, reason: String::new() },
                Fin::Aborted(reason) => Finished { committed: false, reason: reason.clone() },
                Fin::Prepared | Fin::ReadOnly => Finished { committed: false, reason: String::new() },
            };
            self.inner
                .state
                .finished(key, &finished)
                .await
                .map_err(|e| Error::new(format!("cannot record the end of the branch: {e}")))?;
            slot.state.prepared = None;
        }
        drop(slot.state.lease.take());
        self.inner.branches.finish(key, fin);
        Ok(())
    }

    fn spawn_housekeeping(&self) {
        let p = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                p.expire_active().await;
                p.inner.branches.expire_finished();
            }
        });
    }

    /// Aborts branches open longer than `active_timeout` and not prepared.
    async fn expire_active(&self) {
        let timeout = self.inner.config.active_timeout;
        for (key, slot) in self.inner.branches.open_slots() {
            let Ok(mut slot) = slot.try_lock_owned() else { continue };
            let stale = slot.state.lease.is_some()
                && slot.state.prepared.is_none()
                && slot.since.is_some_and(|s| s.elapsed() >= timeout);
            if stale {
                tracing::info!(gtid = %key.0, branch = %key.1, "aborting a branch not prepared in time");
                let reason = format!("not prepared within active_timeout ({} ms)", timeout.as_millis());
                let _ = self.abort_open(&key, &mut slot, Fin::Aborted(reason)).await;
                self.inner.branches.release(&key, &mut slot);
            }
        }
    }

    async fn prepare_open(&self, coordinator_id: &str, key: &Key, slot: &mut SlotGuard<KafkaSlot>) -> Vote {
        let lease = slot.state.lease.as_ref().expect("open branch");
        let (producer, timeout) = (lease.producer.clone(), self.inner.pool.call_timeout());
        let transactional_id = lease.transactional_id.clone();
        if slot.state.sent == 0 && !slot.state.offsets {
            // Nothing sent: nothing to commit. (Not prepared, so ending it cannot fail.)
            let _ = self.abort_open(key, slot, Fin::ReadOnly).await;
            return Vote::ReadOnly;
        }
        let flushed = tokio::task::spawn_blocking(move || producer.flush(timeout)).await;
        let described = match flushed {
            Ok(Ok(())) => self.inner.txn.describe(&transactional_id).await.map_err(|e| e.to_string()),
            Ok(Err(e)) => Err(format!("flush: {e}")),
            Err(e) => Err(format!("flush panicked: {e}")),
        };
        let txn = match described {
            Ok(Some(d)) if d.state == "Ongoing" => PreparedTxn {
                coordinator_id: coordinator_id.to_string(),
                transactional_id,
                producer_id: d.producer_id,
                producer_epoch: d.producer_epoch,
                prepared_ms: now_ms(),
            },
            Ok(other) => {
                let reason = bounded_reason(format!(
                    "prepare failed: the transaction coordinator does not hold it open: {other:?}"
                ));
                let _ = self.abort_open(key, slot, Fin::Aborted(reason.clone())).await;
                return Vote::Aborted { reason };
            }
            Err(reason) => {
                let reason = bounded_reason(format!("prepare failed: {reason}"));
                let _ = self.abort_open(key, slot, Fin::Aborted(reason.clone())).await;
                return Vote::Aborted { reason };
            }
        };
        // The slot knows it is prepared before the record is awaited: whatever happens next,
        // ending the branch also ends its record.
        slot.state.prepared = Some(txn.clone());
        if let Err(e) = self.inner.state.prepared(key, txn.clone()).await {
            let reason = format!("cannot record the prepared branch: {e}");
            if let Err(abort_error) = self.abort_open(key, slot, Fin::Aborted(reason.clone())).await {
                tracing::error!(gtid = %key.0, branch = %key.1, error = %e, %abort_error, "the adapter's state log failed");
            }
            return Vote::Aborted { reason };
        }
        fail::fail_point!("kafka::after_prepare");
        Vote::Prepared { metadata: txn.metadata() }
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

#[tonic::async_trait]
impl Participant for KafkaParticipant {
    async fn prepare(&self, coordinator_id: &str, xid: &Xid) -> Result<Vote, Error> {
        if self.check_resource(&xid.resource).is_err() {
            return Ok(Vote::Aborted {
                reason: format!("this adapter serves resource {}", self.inner.config.resource),
            });
        }
        let key = (xid.gtid, xid.branch.clone());
        let table = &self.inner.branches;
        let mut slot = table.lock(&key).await;
        let vote = if let Some(txn) = &slot.state.prepared {
            Vote::Prepared { metadata: txn.metadata() }
        } else if slot.state.lease.is_some() {
            self.prepare_open(coordinator_id, &key, &mut slot).await
        } else if let Some(txn) = self.inner.state.get(&key).await {
            Vote::Prepared { metadata: txn.metadata() } // prepared before a restart
        } else {
            table.finished_vote(&key).unwrap_or_else(|| table.vote_without_work(&key))
        };
        table.release(&key, &mut slot);
        Ok(vote)
    }

    // The vote metadata handed back is not used: the adapter's own record (written before the
    // vote) is the one source of what a prepared branch holds.
    async fn commit(
        &self,
        _coordinator_id: &str,
        xid: &Xid,
        one_phase: bool,
        _metadata: &[u8],
    ) -> Result<Outcome, Error> {
        fail::fail_point!("kafka::before_commit");
        self.check_resource(&xid.resource).map_err(|e| Error(e.to_string()))?;
        let key = (xid.gtid, xid.branch.clone());
        let mut slot = self.inner.branches.lock(&key).await;
        let outcome = self.commit_locked(&key, one_phase, &mut slot).await;
        self.inner.branches.release(&key, &mut slot);
        outcome
    }

    async fn abort(&self, _coordinator_id: &str, xid: &Xid, _metadata: &[u8]) -> Result<Outcome, Error> {
        self.check_resource(&xid.resource).map_err(|e| Error(e.to_string()))?;
        let key = (xid.gtid, xid.branch.clone());
        let mut slot = self.inner.branches.lock(&key).await;
        let outcome = self.abort_locked(&key, &mut slot).await;
        self.inner.branches.release(&key, &mut slot);
        outcome
    }

    async fn recover(&self, coordinator_id: &str) -> Result<Vec<InDoubt>, Error> {
        let mut out = Vec::new();
        for (key, txn) in self.inner.state.list().await {
            if txn.coordinator_id != coordinator_id {
                continue;
            }
            // Check the broker still holds it; if not, its commit will report a heuristic
            // rollback. Say so once (scans repeat), where it is found.
            if !self.inner.warned.lock().unwrap().contains(&key) {
                match self.inner.txn.describe(&txn.transactional_id).await {
                    // Still open, or committing as we speak (a recovery scan can overlap a commit).
                    Ok(Some(d))
                        if d.producer_id == txn.producer_id
                            && d.producer_epoch == txn.producer_epoch
                            && matches!(d.state.as_str(), "Ongoing" | "PrepareCommit" | "CompleteCommit") => {}
                    Ok(other) => {
                        tracing::warn!(
                            gtid = %key.0,
                            branch = %key.1,
                            transactional_id = txn.transactional_id,
                            broker = ?other,
                            "the broker no longer holds this prepared branch open (transaction timeout?); \
                             committing it will report a heuristic rollback"
                        );
                        let mut warned = self.inner.warned.lock().unwrap();
                        if warned.len() >= 10_000 {
                            warned.clear(); // bounded; at worst a warning is repeated
                        }
                        warned.insert(key.clone());
                    }
                    Err(e) => tracing::warn!(
                        transactional_id = txn.transactional_id,
                        error = %e,
                        "cannot check a prepared branch"
                    ),
                }
            }
            out.push(InDoubt {
                xid: Xid { resource: self.inner.config.resource.clone(), gtid: key.0, branch: key.1 },
                metadata: txn.metadata(),
                prepared_unix_ms: txn.prepared_ms,
            });
        }
        Ok(out)
    }
}

impl KafkaParticipant {
    async fn commit_locked(
        &self,
        key: &Key,
        one_phase: bool,
        slot: &mut SlotGuard<KafkaSlot>,
    ) -> Result<Outcome, Error> {
        if slot.state.lease.is_some() {
            if slot.state.prepared.is_none() && !one_phase {
                let reason = "commit of a branch that was never prepared".to_string();
                self.abort_open(key, slot, Fin::Aborted(reason.clone())).await?;
                return Ok(Outcome::Aborted { reason });
            }
            return self.commit_open(key, slot).await;
        }
        // Prepared before a restart: its producer is gone; EndTxn finishes it.
        if let Some(txn) = self.inner.state.get(key).await {
            return self.end_txn(key, &txn, true).await;
        }
        // Every prepared branch is recorded before its vote, and its end before its answer, so a
        // branch with neither is finished or was never here.
        Ok(match self.inner.branches.finished(key) {
            Some(Fin::Committed | Fin::ReadOnly | Fin::Prepared) => Outcome::Committed,
            Some(Fin::Aborted(reason)) => Outcome::Aborted { reason },
            // Prepared, committed and forgotten: committed.
            None if !one_phase => Outcome::Committed,
            // One-phase of a branch never opened here: nothing to commit, if it could not have
            // had work this process lost.
            None => match self.inner.branches.may_start(&key.0) {
                Ok(()) => Outcome::Committed,
                Err(reason) => Outcome::Aborted { reason },
            },
        })
    }

    /// Commits an open branch's transaction with the producer that holds it.
    async fn commit_open(&self, key: &Key, slot: &mut SlotGuard<KafkaSlot>) -> Result<Outcome, Error> {
        let lease = slot.state.lease.as_ref().expect("open branch");
        let (producer, timeout) = (lease.producer.clone(), self.inner.pool.call_timeout());
        let committed = tokio::task::spawn_blocking(move || producer.commit_transaction(timeout))
            .await
            .map_err(|e| Error::new(format!("commit_transaction panicked: {e}")))?;
        let error = match committed {
            Ok(()) => {
                self.close(key, slot, Fin::Committed).await?;
                return Ok(Outcome::Committed);
            }
            Err(e) => e,
        };
        let rd = match &error {
            rdkafka::error::KafkaError::Transaction(rd) => Some(rd),
            _ => None,
        };
        if rd.is_some_and(|rd| rd.is_retriable()) {
            // The branch keeps its producer; the coordinator asks again.
            return Err(Error::new(format!("commit_transaction: {error}")));
        }
        let reason = bounded_reason(format!("the Kafka transaction could not commit: {error}"));
        let prepared = slot.state.prepared.clone();
        if let Some(lease) = slot.state.lease.as_mut() {
            lease.poison();
        }
        let outcome = match prepared {
            // A prepared branch: ask the broker how it really ended before answering.
            Some(txn) => match self.broker_outcome(&txn).await? {
                Some(true) => Outcome::Committed,
                Some(false) => Outcome::HeuristicRollback { reason: reason.clone() },
                None => return Err(Error::new(format!("{reason}; the broker has not finished it yet"))),
            },
            // One-phase, and the transaction must be aborted: it did not commit.
            None if rd.is_some_and(|rd| rd.txn_requires_abort()) => {
                let _ = self.abort_open(key, slot, Fin::Aborted(reason.clone())).await;
                return Ok(Outcome::Aborted { reason });
            }
            // One-phase, and the producer failed fatally: the outcome is unknown.
            None => Outcome::HeuristicHazard { reason: reason.clone() },
        };
        let fin = if outcome == Outcome::Committed { Fin::Committed } else { Fin::Aborted(reason) };
        self.close(key, slot, fin).await?;
        Ok(outcome)
    }

    /// How the broker ended the transaction of a prepared branch: committed (`Some(true)`), not
    /// committed (`Some(false)`: aborted, or its producer id and epoch moved on), or still
    /// deciding (`None`).
    async fn broker_outcome(&self, txn: &PreparedTxn) -> Result<Option<bool>, Error> {
        let described = self
            .inner
            .txn
            .describe(&txn.transactional_id)
            .await
            .map_err(|e| Error::new(format!("DescribeTransactions for {}: {e}", txn.transactional_id)))?;
        Ok(match described {
            Some(d) if d.producer_id == txn.producer_id && d.producer_epoch == txn.producer_epoch => {
                match d.state.as_str() {
                    "CompleteCommit" => Some(true),
                    "CompleteAbort" | "PrepareAbort" | "Empty" => Some(false),
                    _ => None, // Ongoing, PrepareCommit: not final yet
                }
            }
            // Another epoch or producer: the broker fenced or aborted ours.
            _ => Some(false),
        })
    }

    async fn abort_locked(&self, key: &Key, slot: &mut SlotGuard<KafkaSlot>) -> Result<Outcome, Error> {
        if slot.state.lease.is_some() {
            self.abort_open(key, slot, Fin::Aborted("aborted by the coordinator".into())).await?;
            return Ok(Outcome::Aborted { reason: String::new() });
        }
        if let Some(txn) = self.inner.state.get(key).await {
            return self.end_txn(key, &txn, false).await;
        }
        Ok(match self.inner.branches.finished(key) {
            Some(Fin::Committed) => Outcome::Committed,
            _ => {
                // Remember it: a late Prepare or Produce of this branch is refused.
                self.inner.branches.finish(key, Fin::Aborted("aborted by the coordinator".into()));
                Outcome::Aborted { reason: String::new() }
            }
        })
    }

    /// Finishes a prepared branch whose producer is gone (adapter restart) with EndTxn, records
    /// the answer, then lets its transactional id's producer start again.
    async fn end_txn(&self, key: &Key, txn: &PreparedTxn, commit: bool) -> Result<Outcome, Error> {
        let what = if commit { "commit" } else { "abort" };
        let result = self
            .inner
            .txn
            .end_txn(&txn.transactional_id, txn.producer_id, txn.producer_epoch, commit)
            .await
            .map_err(|e| Error::new(format!("EndTxn ({what}) for {}: {e}", txn.transactional_id)))?;
        let outcome = match result {
            code::NONE if commit => Outcome::Committed,
            code::NONE => Outcome::Aborted { reason: String::new() },
            // No longer open under this producer id and epoch (a repeated EndTxn of the same
            // outcome succeeds, so this is not a retry of ours): ask how it ended.
            code::INVALID_PRODUCER_EPOCH
            | code::PRODUCER_FENCED
            | code::INVALID_TXN_STATE
            | code::INVALID_PRODUCER_ID_MAPPING => {
                let reason = bounded_reason(format!(
                    "EndTxn ({what}) refused with Kafka error {result}: the broker had already ended the transaction \
                     (e.g. aborted it after transaction.timeout.ms)"
                ));
                match (commit, self.broker_outcome(txn).await?) {
                    (true, Some(true)) => Outcome::Committed,
                    (true, Some(false)) => Outcome::HeuristicRollback { reason },
                    (false, Some(true)) => Outcome::HeuristicCommit { reason },
                    (false, Some(false)) => Outcome::Aborted { reason: String::new() },
                    (_, None) => return Err(Error::new(format!("{reason}; the broker has not finished it yet"))),
                }
            }
            other => {
                return Err(Error::new(format!("EndTxn ({what}) for {}: Kafka error {other}", txn.transactional_id)));
            }
        };
        let finished = match &outcome {
            Outcome::Committed | Outcome::HeuristicCommit { .. } => Finished { committed: true, reason: String::new() },
            Outcome::HeuristicRollback { reason } => Finished { committed: false, reason: reason.clone() },
            _ => Finished { committed: false, reason: String::new() },
        };
        self.inner
            .state
            .finished(key, &finished)
            .await
            .map_err(|e| Error::new(format!("cannot record the end of the branch: {e}")))?;
        self.inner.pool.release_quarantine(&txn.transactional_id);
        let fin = if finished.committed { Fin::Committed } else { Fin::Aborted(finished.reason) };
        self.inner.branches.finish(key, fin);
        tracing::info!(gtid = %key.0, branch = %key.1, transactional_id = txn.transactional_id, ?outcome, "prepared branch finished with EndTxn");
        Ok(outcome)
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
