//! The PostgreSQL decision store: [`PgLog`] carries out the engine's appends with the local
//! log's group-commit shape, and fences every write with the shard's lease epoch.
//!
//! A writer task takes whatever appends are queued (up to `store_max_batch_records`) and
//! writes them in one statement, so one round trip and one database transaction: it
//! share-locks the lease rows of the shards involved (`SELECT ... FOR SHARE`), keeps only the
//! records whose shard is still this instance's at the epoch they were decided under, upserts
//! them, and commits. Nothing is acknowledged before that commit returns. A takeover's lease
//! update waits for the row lock, so it either comes first (and this write is refused: the
//! shard is [`StoreError::Fenced`]) or after (and the new owner reads what this write left).
//!
//! The shards are split among `store_writer_lanes` writers (shard modulo lanes), each with its
//! own connection, so several batches are in flight at once (the database flushes their
//! commits together); share locks do not wait for each other. A transaction's records all go
//! through one lane, in order.
//!
//! A write whose answer is lost (timeout, reset connection, failover) has an unknown outcome:
//! it is written again, which is idempotent (an upsert of the same rows), until it succeeds or
//! its shard is no longer this instance's — never assumed either way.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pledge_proto::Gtid;
use sqlx::postgres::PgPool;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::ClusterState;
use crate::engine::LogRecord;
use crate::records;
use crate::store::{DecisionLog, Durable, StoreError};

/// Appends queued for the writer before `append` waits (backpressure).
const QUEUE_CAPACITY: usize = 65_536;
/// Longest a write is retried while the store cannot be reached, for records of no shard
/// (participant registrations; a shard's records are retried while the shard is owned).
const MAX_UNSHARDED_RETRY: Duration = Duration::from_secs(30);
const RETRY_INITIAL_BACKOFF: Duration = Duration::from_millis(20);
const RETRY_MAX_BACKOFF: Duration = Duration::from_secs(1);

enum Row {
    Decision {
        gtid: Gtid,
        shard: u16,
        epoch: u64,
        kind: u8,
        finished: bool,
        keep: bool,
        completed_ms: u64,
        record: Vec<u8>,
    },
    Participant {
        resource: String,
        endpoint: String,
    },
    /// An operator's resolution; `releases`: the transaction's row is kept no longer (from
    /// `at_ms`, for the retention).
    Resolution {
        gtid: Gtid,
        shard: u16,
        epoch: u64,
        at_ms: u64,
        releases: bool,
        record: Vec<u8>,
    },
}

struct Op {
    row: Row,
    done: Option<oneshot::Sender<Result<(), StoreError>>>,
}

/// The engine's side of the PostgreSQL store (see the module docs).
pub struct PgLog {
    lanes: Vec<mpsc::Sender<Op>>,
    state: Arc<ClusterState>,
}

impl PgLog {
    /// Starts `config.lanes` writer tasks on `pool` (which needs a connection for each).
    pub fn start(pool: PgPool, state: Arc<ClusterState>, config: WriterConfig) -> PgLog {
        let lanes = (0..config.lanes.max(1))
            .map(|_| {
                let (ops, rx) = mpsc::channel(QUEUE_CAPACITY);
                let writer = Writer { pool: pool.clone(), state: state.clone(), config: config.clone() };
                tokio::spawn(writer.run(rx));
                ops
            })
            .collect();
        PgLog { lanes, state }
    }

    fn row(&self, record: &LogRecord) -> Option<Row> {
        let count = self.state.shard_count;
        let (rtype, payload) = records::encode(record);
        let decision = |gtid: Gtid, epoch: Option<u64>, finished, keep, completed_ms| {
            let shard = gtid.shard(count);
            // A decision carries the epoch it was made under; an end record, the shard's now.
            let epoch = epoch.or_else(|| self.state.epoch_of(shard))?;
            Some(Row::Decision {
                gtid,
                shard,
                epoch,
                kind: rtype,
                finished,
                keep,
                completed_ms,
                record: payload.to_vec(),
            })
        };
        match record {
            LogRecord::Commit(c) | LogRecord::PreCommit(c) => decision(c.gtid, Some(c.epoch), false, false, 0),
            LogRecord::OnePhase(o) => decision(o.gtid, Some(o.epoch), false, false, 0),
            LogRecord::End(e) => decision(e.gtid, None, true, e.kept_for_operator, e.completed_ms),
            LogRecord::Resolve(r) => Some(Row::Resolution {
                gtid: r.gtid,
                shard: r.gtid.shard(count),
                epoch: r.epoch,
                at_ms: r.at_ms,
                releases: r.releases,
                record: payload.to_vec(),
            }),
            LogRecord::Register { resource, endpoint } => {
                Some(Row::Participant { resource: resource.to_string(), endpoint: endpoint.clone() })
            }
            // Checkpoints only; the store keeps its own horizon per shard.
            LogRecord::Forgotten { .. } => None,
        }
    }
}

impl DecisionLog for PgLog {
    async fn append(&mut self, record: &LogRecord, durable: bool) -> Result<Option<Durable>, StoreError> {
        let Some(row) = self.row(record) else {
            if let LogRecord::End(e) = record {
                // The end of a transaction of a shard no longer owned (the engine has not
                // heard yet): the new owner repeats what it stood for. One the engine waits
                // for is refused as fenced; the shard's drop releases its waiters.
                let shard = e.gtid.shard(self.state.shard_count);
                return Ok(durable
                    .then(|| -> Durable { Box::pin(async move { Err(StoreError::Fenced { shard, epoch: 0 }) }) }));
            }
            return Ok(None); // a checkpoint's horizon: the store keeps its own
        };
        let (done, rx) = if durable {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let lane = match &row {
            Row::Decision { shard, .. } | Row::Resolution { shard, .. } => usize::from(*shard) % self.lanes.len(),
            Row::Participant { .. } => 0,
        };
        self.lanes[lane]
            .send(Op { row, done })
            .await
            .map_err(|_| StoreError::Failed("the store writer stopped".into()))?;
        Ok(rx.map(|rx| -> Durable {
            Box::pin(
                async move { rx.await.unwrap_or_else(|_| Err(StoreError::Failed("the store writer stopped".into()))) },
            )
        }))
    }

    async fn snapshot(&mut self, _records: &[LogRecord]) -> Result<Durable, StoreError> {
        // The store keeps one row per transaction: nothing to compact.
        Ok(Box::pin(async { Ok(()) }))
    }

    fn epoch(&self) -> u64 {
        0
    }
}

/// How the store's writers batch, time out and give up.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// Writers, each with one write in flight, the shards split among them.
    pub lanes: usize,
    /// Most records in one write (group commit).
    pub max_batch_records: usize,
    /// One attempt's bound: past it the write's outcome is unknown, and it is written again.
    pub timeout: Duration,
    /// Longest a batch of decisions is retried while its shards are still owned. A store that
    /// renews leases but refuses writes this long is failing in a way waiting does not fix:
    /// the writes fail, the coordinator stops, and another instance takes its shards over.
    pub max_retry: Duration,
}

struct Writer {
    pool: PgPool,
    state: Arc<ClusterState>,
    config: WriterConfig,
}

impl Writer {
    async fn run(self, mut rx: mpsc::Receiver<Op>) {
        let mut batch = Vec::with_capacity(self.config.max_batch_records);
        while let Some(op) = rx.recv().await {
            batch.push(op);
            while batch.len() < self.config.max_batch_records {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            self.write(&mut batch).await;
        }
    }

    /// Writes `batch` and settles every op in it.
    async fn write(&self, batch: &mut Vec<Op>) {
        let started = Instant::now();
        let mut backoff = RETRY_INITIAL_BACKOFF;
        loop {
            // Records of shards no longer this instance's (at their epoch) are not written.
            batch.retain_mut(|op| match &op.row {
                Row::Decision { shard, epoch, .. } | Row::Resolution { shard, epoch, .. }
                    if self.state.epoch_of(*shard) != Some(*epoch) =>
                {
                    settle(op, Err(StoreError::Fenced { shard: *shard, epoch: *epoch }));
                    false
                }
                Row::Participant { .. } if started.elapsed() > MAX_UNSHARDED_RETRY => {
                    settle(op, Err(StoreError::Failed("the store could not be reached".into())));
                    false
                }
                _ => true,
            });
            if batch.is_empty() {
                return;
            }
            if started.elapsed() > self.config.max_retry {
                tracing::error!(
                    max_retry_ms = self.config.max_retry.as_millis() as u64,
                    records = batch.len(),
                    "decision store writes kept failing while the shards are still held; giving up"
                );
                for mut op in batch.drain(..) {
                    settle(&mut op, Err(StoreError::Failed("the decision store kept refusing writes".into())));
                }
                return;
            }
            let attempt = Instant::now();
            let result = tokio::time::timeout(self.config.timeout, self.try_write(batch)).await;
            crate::metrics::store_write(attempt.elapsed(), batch.len());
            match result {
                Ok(Ok(fenced)) => {
                    // The shard is lost before anyone hears of the refusal.
                    for (&shard, &epoch) in &fenced {
                        crate::metrics::fenced_write();
                        tracing::warn!(shard, epoch, "decision write refused: the shard has a new owner");
                        // The runtime stops driving it at its next reconciliation.
                        if self.state.lose(shard, epoch) {
                            crate::metrics::shard_lost();
                        }
                    }
                    for mut op in batch.drain(..) {
                        let result = match &op.row {
                            Row::Decision { shard, epoch, .. } | Row::Resolution { shard, epoch, .. }
                                if fenced.contains_key(shard) =>
                            {
                                Err(StoreError::Fenced { shard: *shard, epoch: *epoch })
                            }
                            _ => Ok(()),
                        };
                        settle(&mut op, result);
                    }
                    return;
                }
                Ok(Err(e)) if !transient(&e) => {
                    tracing::error!(error = %e, "decision store write failed");
                    for mut op in batch.drain(..) {
                        settle(&mut op, Err(StoreError::Failed(e.to_string())));
                    }
                    return;
                }
                // Unknown outcome: written again (idempotent) until it succeeds or the shard
                // is lost.
                Ok(Err(e)) => {
                    crate::metrics::store_retry();
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "decision store write failed; retrying");
                }
                Err(_) => {
                    crate::metrics::store_retry();
                    tracing::warn!(
                        timeout_ms = self.config.timeout.as_millis() as u64,
                        "decision store write timed out; retrying"
                    );
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(RETRY_MAX_BACKOFF);
        }
    }

    /// One attempt: the shards whose lease (holder, epoch) no longer matches are returned and
    /// their records left out.
    ///
    /// The decisions go in one statement, so one round trip and one commit: it share-locks the
    /// lease rows of the batch's shards that this instance holds (a takeover's update of such a
    /// row waits for this commit; writers do not wait for each other), upserts the records whose
    /// epoch matches, and returns the held leases. Locks are taken in shard order, as every
    /// lease update takes them, so the two never deadlock.
    async fn try_write(&self, batch: &[Op]) -> Result<BTreeMap<u16, u64>, sqlx::Error> {
        // The latest row of each GTID in the batch (one upsert may not touch a row twice).
        let mut latest: HashMap<Gtid, usize> = HashMap::new();
        let (mut resources, mut endpoints) = (Vec::new(), Vec::new());
        let mut resolutions = Vec::new();
        for (i, op) in batch.iter().enumerate() {
            match &op.row {
                Row::Decision { gtid, .. } => {
                    latest.insert(*gtid, i);
                }
                Row::Participant { resource, endpoint } => {
                    resources.push(resource.clone());
                    endpoints.push(endpoint.clone());
                }
                Row::Resolution { .. } => resolutions.push(i),
            }
        }
        if !resources.is_empty() {
            sqlx::query(
                "INSERT INTO pledge_participant (resource, endpoint, updated_at)
                 SELECT r, e, now() FROM unnest($1::text[], $2::text[]) AS p (r, e)
                 ON CONFLICT (resource) DO UPDATE SET endpoint = excluded.endpoint, updated_at = excluded.updated_at",
            )
            .bind(resources)
            .bind(endpoints)
            .execute(&self.pool)
            .await?;
        }
        let mut fenced = BTreeMap::new();
        if resolutions.is_empty() {
            if !latest.is_empty() {
                let mut conn = self.pool.acquire().await?;
                self.write_decisions(&mut conn, batch, &latest, &mut fenced).await?;
            }
            return Ok(fenced);
        }
        // Resolutions are rare: then one database transaction for the decisions and the
        // resolutions, so that both or neither are written (an effect is never in the store
        // without the resolution that explains it), under the same lease locks. The
        // resolutions after the decisions: a release applies to an End record written here.
        let mut tx = self.pool.begin().await?;
        if !latest.is_empty() {
            self.write_decisions(&mut tx, batch, &latest, &mut fenced).await?;
        }
        self.write_resolutions(&mut tx, batch, &resolutions, &mut fenced).await?;
        tx.commit().await?;
        Ok(fenced)
    }

    async fn write_decisions(
        &self,
        conn: &mut sqlx::PgConnection,
        batch: &[Op],
        latest: &HashMap<Gtid, usize>,
        fenced: &mut BTreeMap<u16, u64>,
    ) -> Result<(), sqlx::Error> {
        let n = latest.len();
        let (mut gtids, mut shard_col, mut kinds, mut epochs) =
            (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        let (mut finished, mut keep, mut completed, mut bodies) =
            (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        for &i in latest.values() {
            if let Row::Decision { gtid, shard, epoch, kind, finished: f, keep: k, completed_ms, record } =
                &batch[i].row
            {
                gtids.push(*gtid.as_uuid());
                shard_col.push(i32::from(*shard));
                kinds.push(i16::from(*kind));
                epochs.push(*epoch as i64);
                finished.push(*f);
                keep.push(*k);
                completed.push(*completed_ms as i64);
                bodies.push(record.clone());
            }
        }
        let shards = distinct(&shard_col);
        let held: Vec<(i32, i64)> = sqlx::query_as(concat!(
            held_leases!(),
            ", written AS (
                 INSERT INTO pledge_decision (gtid, shard, kind, epoch, finished, keep, completed_ms, record)
                 SELECT r.gtid, r.shard, r.kind, r.epoch, r.finished, r.keep, r.completed_ms, r.record
                 FROM unnest($3::uuid[], $4::integer[], $5::smallint[], $6::bigint[], $7::boolean[],
                             $8::boolean[], $9::bigint[], $10::bytea[])
                      AS r (gtid, shard, kind, epoch, finished, keep, completed_ms, record)
                 JOIN held h ON h.shard = r.shard AND h.epoch = r.epoch
                 ON CONFLICT (gtid) DO UPDATE SET kind = excluded.kind, epoch = excluded.epoch,
                     finished = excluded.finished, keep = excluded.keep, completed_ms = excluded.completed_ms,
                     record = excluded.record
                 WHERE NOT pledge_decision.finished
             )
             SELECT shard, epoch FROM held",
        ))
        .bind(&shards)
        .bind(&self.state.instance_id)
        .bind(gtids as Vec<Uuid>)
        .bind(&shard_col)
        .bind(kinds)
        .bind(&epochs)
        .bind(finished)
        .bind(keep)
        .bind(completed)
        .bind(bodies)
        .fetch_all(&mut *conn)
        .await?;
        note_fenced(held, &shard_col, &epochs, fenced);
        Ok(())
    }

    /// The resolutions of `batch` at `indexes`, fenced like the decisions: inserted (a repeat
    /// of one already written is a no-op), and each that releases its transaction marks the
    /// transaction's row as no longer kept.
    async fn write_resolutions(
        &self,
        conn: &mut sqlx::PgConnection,
        batch: &[Op],
        indexes: &[usize],
        fenced: &mut BTreeMap<u16, u64>,
    ) -> Result<(), sqlx::Error> {
        let n = indexes.len();
        let (mut gtids, mut shard_col, mut epochs) =
            (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        let (mut at, mut releases, mut bodies) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        for &i in indexes {
            if let Row::Resolution { gtid, shard, epoch, at_ms, releases: r, record } = &batch[i].row {
                gtids.push(*gtid.as_uuid());
                shard_col.push(i32::from(*shard));
                epochs.push(*epoch as i64);
                at.push(*at_ms as i64);
                releases.push(*r);
                bodies.push(record.clone());
            }
        }
        let shards = distinct(&shard_col);
        let held: Vec<(i32, i64)> = sqlx::query_as(concat!(
            held_leases!(),
            ", r AS (
                 SELECT r.* FROM unnest($3::uuid[], $4::integer[], $5::bigint[], $6::bigint[], $7::boolean[],
                                        $8::bytea[]) WITH ORDINALITY
                          AS r (gtid, shard, epoch, at_ms, releases, record, n)
                 JOIN held h ON h.shard = r.shard AND h.epoch = r.epoch
             ), written AS (
                 INSERT INTO pledge_resolution (gtid, shard, at_ms, digest, record)
                 SELECT gtid, shard, at_ms, sha256(record), record FROM r ORDER BY n
                 ON CONFLICT (gtid, digest) DO NOTHING
             ), released AS (
                 UPDATE pledge_decision d SET keep = false, completed_ms = r.at_ms
                 FROM r WHERE r.releases AND d.gtid = r.gtid
             )
             SELECT shard, epoch FROM held",
        ))
        .bind(&shards)
        .bind(&self.state.instance_id)
        .bind(gtids as Vec<Uuid>)
        .bind(&shard_col)
        .bind(&epochs)
        .bind(at)
        .bind(releases)
        .bind(bodies)
        .fetch_all(&mut *conn)
        .await?;
        note_fenced(held, &shard_col, &epochs, fenced);
        Ok(())
    }
}

/// The start of every fenced write: a CTE `held` that share-locks the lease rows of the write's
/// shards (`$1`) this instance (`$2`) holds, in shard order (as every lease update takes them,
/// so the two never deadlock). A takeover's update of such a row waits for the write's commit.
macro_rules! held_leases {
    () => {
        "WITH held AS (
             SELECT shard, epoch FROM pledge_lease WHERE shard = ANY($1) AND holder = $2
             ORDER BY shard FOR SHARE
         )"
    };
}
use held_leases;

/// The shards of a write, each once, in order.
fn distinct(shards: &[i32]) -> Vec<i32> {
    let mut shards = shards.to_vec();
    shards.sort_unstable();
    shards.dedup();
    shards
}

/// Adds to `fenced` every shard of a write whose lease this instance no longer held at the
/// write's epoch (`held`: what the write's lease query returned).
fn note_fenced(held: Vec<(i32, i64)>, shards: &[i32], epochs: &[i64], fenced: &mut BTreeMap<u16, u64>) {
    let held: HashMap<u16, u64> = held.into_iter().map(|(shard, epoch)| (shard as u16, epoch as u64)).collect();
    for (shard, epoch) in shards.iter().zip(epochs) {
        let (shard, epoch) = (*shard as u16, *epoch as u64);
        if held.get(&shard) != Some(&epoch) {
            fenced.insert(shard, epoch);
        }
    }
}

fn settle(op: &mut Op, result: Result<(), StoreError>) {
    if let Some(done) = op.done.take() {
        let _ = done.send(result);
    }
}

/// Whether a store error may be retried (the write's outcome is unknown, or it was refused for
/// a reason that passes): lost connections, timeouts, serialization conflicts, a server
/// starting, stopping or read-only (a standby not yet promoted).
pub fn transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.to_string()).unwrap_or_default();
            code.starts_with("08")
                || code.starts_with("40")
                || code.starts_with("53")
                || code.starts_with("57P")
                || code == "25006"
                || code == "55000"
        }
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        _ => false,
    }
}
