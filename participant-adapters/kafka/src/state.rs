//! The adapter's durable state: which branches are prepared, on which transactional id, as
//! which producer (id, epoch). Kept in a `pledge-log` write-ahead log in the data directory;
//! a prepared branch is recorded (and synced) before the adapter votes, so after a crash the
//! adapter can still finish it with EndTxn.

use std::collections::HashMap;
use std::path::Path;

use pledge_log::{Log, LogConfig, LogError, LogWriter};
use pledge_proto::{BranchId, Gtid};
use pledge_sdk::table::Key;
use prost::Message;

const TYPE_PREPARED: u8 = 1;
const TYPE_FINISHED: u8 = 2;
/// Write a checkpoint (the prepared branches) after this many records.
const CHECKPOINT_EVERY_RECORDS: u64 = 10_000;

/// A prepared branch's Kafka transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedTxn {
    pub coordinator_id: String,
    pub transactional_id: String,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub prepared_ms: u64,
}

impl PreparedTxn {
    /// The vote metadata: readable in `pledge log inspect`, parsed back by [`PreparedTxn::from_metadata`].
    pub fn metadata(&self) -> Vec<u8> {
        format!(
            "transactional.id={} producer.id={} producer.epoch={}",
            self.transactional_id, self.producer_id, self.producer_epoch
        )
        .into_bytes()
    }

    /// The transaction named by vote metadata (as handed back by the coordinator).
    pub fn from_metadata(coordinator_id: &str, metadata: &[u8]) -> Option<PreparedTxn> {
        let text = std::str::from_utf8(metadata).ok()?;
        let mut fields = HashMap::new();
        for part in text.split_whitespace() {
            let (k, v) = part.split_once('=')?;
            fields.insert(k, v);
        }
        Some(PreparedTxn {
            coordinator_id: coordinator_id.to_string(),
            transactional_id: fields.get("transactional.id")?.to_string(),
            producer_id: fields.get("producer.id")?.parse().ok()?,
            producer_epoch: fields.get("producer.epoch")?.parse().ok()?,
            prepared_ms: 0,
        })
    }
}

#[derive(Clone, PartialEq, Message)]
struct PreparedPb {
    #[prost(bytes = "vec", tag = "1")]
    gtid: Vec<u8>,
    #[prost(string, tag = "2")]
    branch_id: String,
    #[prost(string, tag = "3")]
    coordinator_id: String,
    #[prost(string, tag = "4")]
    transactional_id: String,
    #[prost(int64, tag = "5")]
    producer_id: i64,
    #[prost(int32, tag = "6")]
    producer_epoch: i32,
    #[prost(uint64, tag = "7")]
    prepared_ms: u64,
}

#[derive(Clone, PartialEq, Message)]
struct FinishedPb {
    #[prost(bytes = "vec", tag = "1")]
    gtid: Vec<u8>,
    #[prost(string, tag = "2")]
    branch_id: String,
    /// The answer given: a repeated request after a restart gets the same one.
    #[prost(bool, tag = "3")]
    committed: bool,
    #[prost(string, tag = "4")]
    reason: String,
}

/// How a prepared branch ended, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    pub committed: bool,
    /// Why it did not commit as asked (a heuristic outcome), or empty.
    pub reason: String,
}

fn prepared_pb(key: &Key, t: &PreparedTxn) -> Vec<u8> {
    PreparedPb {
        gtid: key.0.as_bytes().to_vec(),
        branch_id: key.1.to_string(),
        coordinator_id: t.coordinator_id.clone(),
        transactional_id: t.transactional_id.clone(),
        producer_id: t.producer_id,
        producer_epoch: i32::from(t.producer_epoch),
        prepared_ms: t.prepared_ms,
    }
    .encode_to_vec()
}

fn key_of(gtid: &[u8], branch: &str) -> Result<Key, String> {
    let gtid = Gtid::from_slice(gtid).map_err(|len| format!("gtid of {len} bytes"))?;
    Ok((gtid, BranchId::parse_field("branch_id", branch).map_err(|e| e.to_string())?))
}

struct Inner {
    prepared: HashMap<Key, PreparedTxn>,
    records_since_checkpoint: u64,
}

/// See the module documentation.
pub struct State {
    log: LogWriter,
    /// A tokio mutex, held while a record is queued and the map changed together: the map and
    /// the log order must agree, or a checkpoint could miss a branch queued just before it.
    inner: tokio::sync::Mutex<Inner>,
}

impl State {
    /// Replays the state in `dir` (blocking). Also returns the branches that finished since the
    /// last checkpoint, so their answers can be repeated.
    #[allow(clippy::type_complexity)]
    pub fn open(dir: &Path) -> anyhow::Result<(State, Log, Vec<(Key, Finished)>)> {
        let mut prepared = HashMap::new();
        let mut finished = Vec::new();
        let log = pledge_log::open(LogConfig::new(dir.join("log")), |record| {
            match record.rtype {
                TYPE_PREPARED => {
                    let r = PreparedPb::decode(record.payload.as_slice()).map_err(|e| e.to_string())?;
                    let txn = PreparedTxn {
                        coordinator_id: r.coordinator_id,
                        transactional_id: r.transactional_id,
                        producer_id: r.producer_id,
                        producer_epoch: r.producer_epoch as i16,
                        prepared_ms: r.prepared_ms,
                    };
                    prepared.insert(key_of(&r.gtid, &r.branch_id)?, txn);
                }
                TYPE_FINISHED => {
                    let r = FinishedPb::decode(record.payload.as_slice()).map_err(|e| e.to_string())?;
                    let key = key_of(&r.gtid, &r.branch_id)?;
                    prepared.remove(&key);
                    finished.push((key, Finished { committed: r.committed, reason: r.reason }));
                }
                other => return Err(format!("unknown record type {other}")),
            }
            Ok::<(), String>(())
        })
        .map_err(|e| anyhow::anyhow!("cannot open the adapter's state in {}: {e}", dir.display()))?;
        let state = State {
            log: log.writer(),
            inner: tokio::sync::Mutex::new(Inner { prepared, records_since_checkpoint: 0 }),
        };
        Ok((state, log, finished))
    }

    /// Records a prepared branch; returns once the record is durable.
    pub async fn prepared(&self, key: &Key, txn: PreparedTxn) -> Result<(), LogError> {
        let durable = {
            let mut inner = self.inner.lock().await;
            let durable = self.log.submit(TYPE_PREPARED, prepared_pb(key, &txn)).await?;
            inner.prepared.insert(key.clone(), txn);
            self.maybe_checkpoint(&mut inner).await?;
            durable
        };
        durable.await.map(drop)
    }

    /// Records that a prepared branch is finished (committed, aborted, or lost at the broker)
    /// and the answer given; returns once the record is durable.
    pub async fn finished(&self, key: &Key, outcome: &Finished) -> Result<(), LogError> {
        let durable = {
            let mut inner = self.inner.lock().await;
            if !inner.prepared.contains_key(key) {
                return Ok(());
            }
            let payload = FinishedPb {
                gtid: key.0.as_bytes().to_vec(),
                branch_id: key.1.to_string(),
                committed: outcome.committed,
                reason: outcome.reason.clone(),
            }
            .encode_to_vec();
            // Queued first, forgotten after: if queueing fails, the branch stays prepared.
            let durable = self.log.submit(TYPE_FINISHED, payload).await?;
            inner.prepared.remove(key);
            self.maybe_checkpoint(&mut inner).await?;
            durable
        };
        durable.await.map(drop)
    }

    pub async fn get(&self, key: &Key) -> Option<PreparedTxn> {
        self.inner.lock().await.prepared.get(key).cloned()
    }

    /// Every prepared branch.
    pub async fn list(&self) -> Vec<(Key, PreparedTxn)> {
        self.inner.lock().await.prepared.iter().map(|(k, t)| (k.clone(), t.clone())).collect()
    }

    /// The log holds only what a restart needs: after enough records, a checkpoint of the
    /// prepared branches lets the older segments go.
    async fn maybe_checkpoint(&self, inner: &mut Inner) -> Result<(), LogError> {
        inner.records_since_checkpoint += 1;
        if inner.records_since_checkpoint < CHECKPOINT_EVERY_RECORDS {
            return Ok(());
        }
        inner.records_since_checkpoint = 0;
        let records = inner.prepared.iter().map(|(k, t)| (TYPE_PREPARED, prepared_pb(k, t))).collect();
        // Not awaited: it is queued in order, and an acknowledged record never depends on it.
        drop(self.log.submit_checkpoint(records).await?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vote_metadata_round_trips() {
        let t = PreparedTxn {
            coordinator_id: "c1".into(),
            transactional_id: "pledge-orders-3".into(),
            producer_id: 4001,
            producer_epoch: 7,
            prepared_ms: 0,
        };
        assert_eq!(PreparedTxn::from_metadata("c1", &t.metadata()), Some(t));
        assert_eq!(PreparedTxn::from_metadata("c1", b"garbage"), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn prepared_branches_survive_a_reopen_until_finished() {
        let dir = tempfile::tempdir().unwrap();
        let k1 = (Gtid::new_v7(), BranchId::parse_field("b", "b1").unwrap());
        let k2 = (Gtid::new_v7(), BranchId::parse_field("b", "b2").unwrap());
        let t = |id: &str| PreparedTxn {
            coordinator_id: "c".into(),
            transactional_id: id.into(),
            producer_id: 1,
            producer_epoch: 0,
            prepared_ms: 5,
        };
        let done = Finished { committed: false, reason: "lost at the broker".into() };
        {
            let (state, log, _) = State::open(dir.path()).unwrap();
            state.prepared(&k1, t("a")).await.unwrap();
            state.prepared(&k2, t("b")).await.unwrap();
            state.finished(&k1, &done).await.unwrap();
            drop(state);
            log.shutdown().await.unwrap();
        }
        let (state, log, finished) = State::open(dir.path()).unwrap();
        assert_eq!(state.list().await, vec![(k2, t("b"))]);
        assert_eq!(finished, vec![(k1, done)], "the answer given is remembered");
        drop(state);
        log.shutdown().await.unwrap();
    }
}
