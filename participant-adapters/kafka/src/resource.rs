//! Kafka's side of a branch ([`Resource`]): what the SDK's journaled participant asks of the
//! broker. The contract around it (the journal, repeated answers, unknown branches, restarts)
//! is the SDK's.
//!
//! * **open** → a producer of the pool, `begin_transaction`.
//! * **prepare** (and the seal before a one-phase commit) → flush, then DescribeTransactions:
//!   the transaction the broker holds open on the producer's transactional id must be this
//!   producer's (its own id and epoch, from its statistics) and hold every partition the branch
//!   wrote to — or another process on the same transactional ids has fenced this one, and the
//!   branch votes no. Its [`TxnRef`] (id, epoch, start time) is the vote metadata. The producer
//!   stays with the branch until its decision.
//! * **commit / abort** → `commit_transaction` / `abort_transaction` on that producer; if it
//!   fails, or after a restart (the producer is gone, its transactional id kept unused),
//!   `EndTxn` with the recorded id and epoch. EndTxn is only ever sent on a transactional id no
//!   one else in the process uses, so it can only end the branch's own transaction.
//! * **how it ended** → DescribeTransactions, read with [`TxnRef::fate`]: only the same
//!   transaction (producer, start time) tells; anything else is unknown, and a commit that
//!   nothing proves is a heuristic hazard.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use pledge_proto::{ResourceId, Xid, bounded_reason};
use pledge_sdk::journaled::{OnePhase, Resource, Sealed};
use pledge_sdk::{BranchError, Error, Outcome};
use rdkafka::producer::Producer;

use crate::KafkaConfig;
use crate::pool::{Lease, ProducerPool};
use crate::txn::{Fate, TxnRef};
use crate::wire::{TxnClient, code};

/// What an active branch holds: a producer with the branch's transaction open.
pub struct KafkaOpen {
    pub(crate) lease: Lease,
    /// (topic, partition) of every record delivered in the branch.
    pub(crate) partitions: BTreeSet<(String, i32)>,
    /// Consumer offsets added. A branch with neither records nor offsets votes READ_ONLY.
    pub(crate) offsets: bool,
    /// Where each request id's records went: a retried Produce is answered with them.
    pub(crate) requests: HashMap<String, Vec<(i32, i64)>>,
}

impl KafkaOpen {
    fn is_empty(&self) -> bool {
        self.partitions.is_empty() && !self.offsets
    }
}

/// A prepared (or one-phase committing) branch's producer, kept until the journal has
/// recorded the branch's end ([`Resource::finished`]): given back earlier, the producer could
/// begin another branch's transaction under the same producer id and epoch, which an EndTxn
/// repeated after a crash would then end.
struct Held {
    lease: Lease,
    txn: TxnRef,
    /// How its transaction ended, once known (a repeated call gets it without asking again).
    ended: Option<Fate>,
}

/// The Kafka cluster of one adapter, as a [`Resource`].
pub struct Kafka {
    pub(crate) config: KafkaConfig,
    pub(crate) pool: ProducerPool,
    pub(crate) txn: TxnClient,
    held: Mutex<HashMap<Xid, Held>>,
    /// Branches in flight when the adapter started, and the transactional id each keeps out of
    /// use until the journal has recorded its end.
    quarantined: Mutex<HashMap<Xid, String>>,
}

impl Kafka {
    pub(crate) fn new(
        config: KafkaConfig,
        pool: ProducerPool,
        txn: TxnClient,
        quarantined: HashMap<Xid, String>,
    ) -> Kafka {
        Kafka { config, pool, txn, held: Mutex::new(HashMap::new()), quarantined: Mutex::new(quarantined) }
    }

    /// Ends an open branch's transaction with `abort_transaction` and gives its producer back
    /// (a producer whose abort failed is replaced: its restart aborts what is left open).
    async fn abort_open(&self, xid: &Xid, open: KafkaOpen) {
        let mut lease = open.lease;
        let (producer, timeout) = (lease.producer.clone(), self.pool.call_timeout());
        let aborted = tokio::task::spawn_blocking(move || producer.abort_transaction(timeout)).await;
        if !matches!(aborted, Ok(Ok(()))) {
            tracing::warn!(%xid, result = ?aborted, "abort_transaction failed; replacing the producer");
            lease.poison();
        }
    }

    /// Flushes the branch's records and checks, with DescribeTransactions, that the broker holds
    /// the branch's transaction open as this producer's, with every partition it wrote to.
    async fn seal_txn(&self, open: &KafkaOpen) -> Result<TxnRef, String> {
        let (producer, timeout) = (open.lease.producer.clone(), self.pool.call_timeout());
        match tokio::task::spawn_blocking(move || producer.flush(timeout)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("flush: {e}")),
            Err(e) => return Err(format!("flush panicked: {e}")),
        }
        let tid = &open.lease.transactional_id;
        let described = self.txn.describe(tid).await.map_err(|e| format!("DescribeTransactions for {tid}: {e}"))?;
        let own = open.lease.identity().ok_or("the producer has not reported its producer id")?;
        let d = match described {
            Some(d) if d.state == "Ongoing" && (d.producer_id, d.producer_epoch) == own => d,
            other => {
                return Err(format!(
                    "the broker does not hold this branch's transaction open as this producer's (producer id {}, \
                     epoch {}): it reports {other:?} for {tid} (fenced by another process on the same \
                     transactional ids?)",
                    own.0, own.1
                ));
            }
        };
        let listed: BTreeSet<(String, i32)> = d.partitions.iter().cloned().collect();
        if let Some((topic, partition)) = open.partitions.iter().find(|p| !listed.contains(*p)) {
            return Err(format!(
                "the transaction open on {tid} does not hold partition {topic}/{partition}, which this branch wrote to"
            ));
        }
        Ok(TxnRef {
            transactional_id: tid.clone(),
            producer_id: d.producer_id,
            producer_epoch: d.producer_epoch,
            start_ms: d.start_ms,
        })
    }

    /// How `txn` ended, asked of the broker.
    async fn fate(&self, txn: &TxnRef) -> Result<Fate, Error> {
        let described = self
            .txn
            .describe(&txn.transactional_id)
            .await
            .map_err(|e| Error::new(format!("DescribeTransactions for {}: {e}", txn.transactional_id)))?;
        Ok(txn.fate(described.as_ref()))
    }

    /// Ends `txn` with EndTxn (its transactional id must be this branch's alone: held, or
    /// quarantined since the start) and tells how it ended.
    async fn end_txn(&self, txn: &TxnRef, commit: bool) -> Result<Fate, Error> {
        let what = if commit { "commit" } else { "abort" };
        let result = self
            .txn
            .end_txn(&txn.transactional_id, txn.producer_id, txn.producer_epoch, commit)
            .await
            .map_err(|e| Error::new(format!("EndTxn ({what}) for {}: {e}", txn.transactional_id)))?;
        let fate = match result {
            code::NONE if commit => Fate::Committed,
            code::NONE => Fate::Aborted,
            // No longer open under this producer id and epoch (a repeated EndTxn of the same
            // outcome succeeds, so this is not a retry of ours): ask how it ended.
            code::INVALID_PRODUCER_EPOCH
            | code::PRODUCER_FENCED
            | code::INVALID_TXN_STATE
            | code::INVALID_PRODUCER_ID_MAPPING => self.fate(txn).await?,
            other => {
                return Err(Error::new(format!("EndTxn ({what}) for {}: Kafka error {other}", txn.transactional_id)));
            }
        };
        tracing::info!(transactional_id = txn.transactional_id, ?fate, what, "prepared branch finished with EndTxn");
        Ok(fate)
    }

    /// Finishes a held branch on its own producer; if that fails, with EndTxn.
    async fn finish_held(&self, held: &mut Held, commit: bool) -> Result<Fate, Error> {
        if let Some(fate) = held.ended {
            return Ok(fate);
        }
        let fate = self.end_held(held, commit).await?;
        if fate != Fate::Pending {
            held.ended = Some(fate);
        }
        Ok(fate)
    }

    async fn end_held(&self, held: &mut Held, commit: bool) -> Result<Fate, Error> {
        if !held.lease.is_poisoned() {
            let (producer, timeout) = (held.lease.producer.clone(), self.pool.call_timeout());
            fail::fail_point!("kafka::commit_transaction", commit, |_| {
                held.lease.poison();
                Err(Error::new("injected: commit_transaction failed"))
            });
            let done = tokio::task::spawn_blocking(move || match commit {
                true => producer.commit_transaction(timeout),
                false => producer.abort_transaction(timeout),
            })
            .await;
            match done {
                Ok(Ok(())) => return Ok(if commit { Fate::Committed } else { Fate::Aborted }),
                other => {
                    // A producer that failed to end its transaction is broken: it is replaced
                    // once the branch is finished (its restart would abort the transaction),
                    // and the transaction is ended from outside, by id and epoch.
                    tracing::warn!(transactional_id = held.txn.transactional_id, result = ?other, commit, "the producer could not end its transaction; ending it with EndTxn");
                    held.lease.poison();
                }
            }
        }
        self.end_txn(&held.txn, commit).await
    }
}

/// The outcome of a phase-2 operation from how the transaction ended.
fn outcome(commit: bool, fate: Fate, txn: &TxnRef) -> Result<Outcome, Error> {
    let id = &txn.transactional_id;
    Ok(match (commit, fate) {
        (true, Fate::Committed) => Outcome::Committed,
        (false, Fate::Aborted) => Outcome::Aborted { reason: String::new() },
        (true, Fate::Aborted) => Outcome::HeuristicRollback {
            reason: bounded_reason(format!(
                "the broker aborted the transaction on {id} (after transaction.timeout.ms, or a producer restarted on \
                 the id)"
            )),
        },
        (false, Fate::Committed) => {
            Outcome::HeuristicCommit { reason: bounded_reason(format!("the transaction on {id} was committed")) }
        }
        (_, Fate::Pending) => return Err(Error::new(format!("the transaction on {id} is not finished yet"))),
        // Never committed by this adapter without being told: an abort stands.
        (false, Fate::Unknown) => Outcome::Aborted { reason: String::new() },
        (true, Fate::Unknown) => Outcome::HeuristicHazard {
            reason: bounded_reason(format!(
                "the broker no longer knows the branch's transaction on {id}, and nothing tells whether it committed"
            )),
        },
    })
}

#[tonic::async_trait]
impl Resource for Kafka {
    type Open = KafkaOpen;

    fn serves(&self, resource: &ResourceId) -> bool {
        *resource == self.config.resource
    }

    fn resources(&self) -> Vec<ResourceId> {
        vec![self.config.resource.clone()]
    }

    async fn open(&self, _xid: &Xid) -> Result<KafkaOpen, BranchError> {
        // The pool bounds the branches open at once: this waits (bounded) for a free producer.
        let mut lease = self.pool.acquire(self.config.acquire_timeout).await.map_err(BranchError::Busy)?;
        if let Err(e) = lease.producer.begin_transaction() {
            lease.poison();
            return Err(BranchError::Unavailable(format!("begin_transaction: {e}")));
        }
        Ok(KafkaOpen { lease, partitions: BTreeSet::new(), offsets: false, requests: HashMap::new() })
    }

    async fn seal(&self, _coordinator_id: &str, _xid: &Xid, open: &mut KafkaOpen) -> Sealed {
        if open.is_empty() {
            return Sealed::ReadOnly; // nothing sent: nothing to commit
        }
        match self.seal_txn(open).await {
            Ok(txn) => Sealed::Ready { metadata: txn.metadata() },
            Err(reason) => {
                Sealed::Refused { reason: bounded_reason(format!("the transaction cannot commit: {reason}")) }
            }
        }
    }

    async fn prepare(&self, _coordinator_id: &str, xid: &Xid, open: KafkaOpen, metadata: &[u8]) -> Result<(), String> {
        // Kafka has no prepare: sealed, the transaction waits on its producer for the decision.
        let Some(txn) = TxnRef::from_metadata(metadata) else {
            self.abort_open(xid, open).await;
            return Err("participant bug: the seal's metadata does not parse".into());
        };
        self.held.lock().unwrap().insert(xid.clone(), Held { lease: open.lease, txn, ended: None });
        Ok(())
    }

    async fn commit_one_phase(&self, xid: &Xid, open: KafkaOpen, metadata: &[u8]) -> OnePhase {
        let Some(txn) = TxnRef::from_metadata(metadata) else {
            self.abort_open(xid, open).await;
            return OnePhase::Aborted { reason: "participant bug: the seal's metadata does not parse".into() };
        };
        let mut held = Held { lease: open.lease, txn, ended: None };
        let fate = self.finish_held(&mut held, true).await;
        if matches!(fate, Ok(Fate::Committed)) {
            fail::fail_point!("kafka::after_one_phase_commit");
        }
        // Kept, with its transactional id, until the journal has the answer.
        self.held.lock().unwrap().insert(xid.clone(), held);
        match fate {
            Ok(Fate::Committed) => OnePhase::Committed,
            Ok(Fate::Aborted) => OnePhase::Aborted { reason: "the broker aborted the transaction".into() },
            other => OnePhase::Unknown { error: format!("{other:?}") },
        }
    }

    async fn rollback(&self, xid: &Xid, open: KafkaOpen) {
        self.abort_open(xid, open).await;
    }

    fn finished(&self, xid: &Xid) {
        // Its producer goes back to the pool (replaced if broken).
        drop(self.held.lock().unwrap().remove(xid));
        if let Some(transactional_id) = self.quarantined.lock().unwrap().remove(xid) {
            self.pool.release_quarantine(&transactional_id);
        }
    }

    async fn finish(
        &self,
        _coordinator_id: &str,
        xid: &Xid,
        metadata: &[u8],
        commit: bool,
        recorded: bool,
    ) -> Result<Outcome, Error> {
        let held = self.held.lock().unwrap().remove(xid);
        if let Some(mut held) = held {
            let fate = self.finish_held(&mut held, commit).await;
            let result = fate.and_then(|fate| outcome(commit, fate, &held.txn));
            // The producer (and its transactional id) stays until the journal has the end.
            self.held.lock().unwrap().insert(xid.clone(), held);
            return result;
        }
        let Some(txn) = TxnRef::from_metadata(metadata) else {
            return match (commit, recorded) {
                (false, _) => Ok(Outcome::Aborted { reason: String::new() }),
                (true, _) => Ok(Outcome::HeuristicHazard {
                    reason: "no record of the branch's Kafka transaction (neither here nor in the vote metadata)"
                        .into(),
                }),
            };
        };
        if !recorded {
            // No record here (a lost data directory): the transactional id may carry another
            // branch's transaction by now, so nothing is sent; the broker is only asked.
            return match commit {
                false => Ok(Outcome::Aborted { reason: String::new() }),
                true => outcome(true, self.fate(&txn).await?, &txn),
            };
        }
        // Prepared before a restart: the transactional id has been kept unused since (and stays
        // so until the journal has recorded the end).
        self.end_txn(&txn, commit).await.and_then(|fate| outcome(commit, fate, &txn))
    }

    async fn resolve(&self, xid: &Xid, metadata: &[u8]) -> Result<Option<Outcome>, Error> {
        let txn = TxnRef::from_metadata(metadata)
            .ok_or_else(|| Error::new("participant bug: a one-phase commit's metadata does not parse"))?;
        // The one-phase commit was decided here: committing whatever is still open is its end.
        let held = self.held.lock().unwrap().remove(xid);
        let fate = match held {
            Some(mut held) => {
                let fate = self.finish_held(&mut held, true).await;
                self.held.lock().unwrap().insert(xid.clone(), held);
                fate?
            }
            // Committing before a restart: its transactional id has been kept unused since.
            None => self.end_txn(&txn, true).await?,
        };
        Ok(match fate {
            Fate::Committed => Some(Outcome::Committed),
            Fate::Aborted => Some(Outcome::Aborted { reason: "the broker aborted the transaction".into() }),
            Fate::Pending => None,
            Fate::Unknown => Some(Outcome::HeuristicHazard {
                reason: format!(
                    "the one-phase commit's answer was lost and the broker no longer knows the transaction on {}",
                    txn.transactional_id
                ),
            }),
        })
    }
}
