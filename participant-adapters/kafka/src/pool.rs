//! A fixed pool of transactional producers, so branches run in parallel (a transactional
//! producer carries one transaction at a time).
//!
//! Producer `i` always has transactional.id `<prefix>-<i>`: stable across restarts, so the
//! first `init_transactions` after a restart fences a zombie from the previous process and
//! aborts whatever unprepared transaction it left open. A transactional id whose transaction a
//! prepared branch still needs is **quarantined**: its producer is not started (that would abort
//! the transaction) until the branch has been finished with EndTxn.
//!
//! Each producer knows its own producer id and epoch from librdkafka's statistics (emitted
//! every second; a producer is lent only once they have come): prepare checks that the
//! transaction the broker holds open on the transactional id is this producer's, not that of
//! another process started on the same ids (which fences this one).

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientConfig, ClientContext};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

/// A producer's id and epoch as it knows them itself.
pub type Identity = (i64, i16);

/// Collects a producer's id and epoch from librdkafka's statistics.
pub struct IdentityContext {
    identity: watch::Sender<Option<Identity>>,
}

impl ClientContext for IdentityContext {
    fn stats(&self, statistics: Statistics) {
        if let Some(eos) = statistics.eos
            && eos.producer_id >= 0
            && eos.producer_epoch >= 0
        {
            self.identity.send_replace(Some((eos.producer_id, eos.producer_epoch as i16)));
        }
    }
}

pub type TxnProducer = FutureProducer<IdentityContext>;

#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub bootstrap: String,
    pub transactional_id_prefix: String,
    pub size: usize,
    /// `transaction.timeout.ms`: the broker aborts a transaction open longer than this.
    pub transaction_timeout: Duration,
    /// Bound of every blocking producer call (init, flush, commit, abort, offsets).
    pub call_timeout: Duration,
    /// TLS and SASL for every producer.
    pub security: crate::security::BrokerSecurity,
}

struct Entry {
    transactional_id: String,
    /// Started lazily, dropped after a fatal error (and started again on next use).
    producer: Option<Started>,
}

#[derive(Clone)]
struct Started {
    producer: Arc<TxnProducer>,
    identity: watch::Receiver<Option<Identity>>,
}

struct Inner {
    config: PoolConfig,
    entries: Vec<Mutex<Entry>>,
    free: Mutex<Free>,
    available: Arc<Semaphore>,
}

/// Producers not lent out, and the quarantined ones (neither free nor lent).
struct Free {
    queue: VecDeque<usize>,
    quarantined: HashSet<usize>,
}

/// See the module documentation. Cheap to clone.
#[derive(Clone)]
pub struct ProducerPool {
    inner: Arc<Inner>,
}

/// One producer, lent to one branch until it is committed or aborted.
pub struct Lease {
    pool: Arc<Inner>,
    index: usize,
    pub producer: Arc<TxnProducer>,
    pub transactional_id: String,
    identity: watch::Receiver<Option<Identity>>,
    poisoned: bool,
    _permit: OwnedSemaphorePermit,
}

impl Lease {
    /// The producer hit a fatal error (fenced, broker-side abort...): it is dropped and a new
    /// one is started for the next branch.
    pub fn poison(&mut self) {
        self.poisoned = true;
    }

    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// The producer's id and epoch, as it last reported them.
    pub fn identity(&self) -> Option<Identity> {
        *self.identity.borrow()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.poisoned {
            self.pool.entries[self.index].lock().unwrap().producer = None;
        }
        self.pool.free.lock().unwrap().queue.push_back(self.index);
        // The permit goes back with `_permit`.
    }
}

impl ProducerPool {
    /// A pool whose producers with transactional ids in `quarantined` stay unused until
    /// [`ProducerPool::release_quarantine`].
    pub fn new(config: PoolConfig, quarantined: &[String]) -> ProducerPool {
        let entries: Vec<Mutex<Entry>> = (0..config.size)
            .map(|i| {
                Mutex::new(Entry {
                    transactional_id: format!("{}-{i}", config.transactional_id_prefix),
                    producer: None,
                })
            })
            .collect();
        let (mut queue, mut held) = (VecDeque::new(), HashSet::new());
        for (i, entry) in entries.iter().enumerate() {
            if quarantined.contains(&entry.lock().unwrap().transactional_id) {
                held.insert(i);
            } else {
                queue.push_back(i);
            }
        }
        let available = Arc::new(Semaphore::new(queue.len()));
        let free = Mutex::new(Free { queue, quarantined: held });
        ProducerPool { inner: Arc::new(Inner { config, entries, free, available }) }
    }

    pub fn owns(&self, transactional_id: &str) -> Option<usize> {
        self.inner.entries.iter().position(|e| e.lock().unwrap().transactional_id == transactional_id)
    }

    /// The prepared branch that held `transactional_id` when the adapter started is finished:
    /// its producer may start. Only a quarantined producer is released (never one in use).
    pub fn release_quarantine(&self, transactional_id: &str) {
        let Some(index) = self.owns(transactional_id) else { return };
        let mut free = self.inner.free.lock().unwrap();
        if free.quarantined.remove(&index) {
            free.queue.push_back(index);
            self.inner.available.add_permits(1);
        }
    }

    /// Starts every free producer not yet started, all at once, and lends none: a producer's
    /// first `init_transactions` costs about half a second (librdkafka finds the transaction
    /// coordinator on a timer), which would otherwise land on the first branch of each producer.
    /// It also fences, early, whatever a previous process left open under these ids, so
    /// read_committed consumers are not held back until each producer happens to be used.
    /// Answers how many producers are ready and the first error, if any; a producer that fails
    /// to start is started again on first use.
    pub async fn warm(&self) -> (usize, Option<String>) {
        let mut permits = Vec::new();
        while let Ok(permit) = self.inner.available.clone().try_acquire_owned() {
            permits.push(permit);
        }
        let results = futures::future::join_all(permits.into_iter().map(|permit| self.lend(permit))).await;
        let ready = results.iter().filter(|r| r.is_ok()).count();
        (ready, results.into_iter().find_map(Result::err))
    }

    /// Lends a producer, waiting at most `wait` for one to be free; starts it if needed
    /// (`init_transactions`, which fences any previous holder of its transactional id).
    pub async fn acquire(&self, wait: Duration) -> Result<Lease, String> {
        let permit = tokio::time::timeout(wait, self.inner.available.clone().acquire_owned())
            .await
            .map_err(|_| {
                format!(
                    "no transactional producer free within {} ms (pool of {})",
                    wait.as_millis(),
                    self.inner.config.size
                )
            })?
            .map_err(|_| "producer pool closed".to_string())?;
        self.lend(permit).await
    }

    /// Lends the producer `permit` stands for, starting it if needed.
    async fn lend(&self, permit: OwnedSemaphorePermit) -> Result<Lease, String> {
        // A permit stands for a free producer, taken under the lock that gives producers back.
        let index = self.inner.free.lock().unwrap().queue.pop_front().ok_or("producer pool out of step")?;
        let (transactional_id, existing) = {
            let entry = self.inner.entries[index].lock().unwrap();
            (entry.transactional_id.clone(), entry.producer.clone())
        };
        let started = match existing {
            Some(p) => p,
            None => match self.start(&transactional_id).await {
                Ok(p) => {
                    self.inner.entries[index].lock().unwrap().producer = Some(p.clone());
                    p
                }
                Err(e) => {
                    self.inner.free.lock().unwrap().queue.push_back(index);
                    return Err(e);
                }
            },
        };
        Ok(Lease {
            pool: self.inner.clone(),
            index,
            producer: started.producer,
            transactional_id,
            identity: started.identity,
            poisoned: false,
            _permit: permit,
        })
    }

    async fn start(&self, transactional_id: &str) -> Result<Started, String> {
        let c = &self.inner.config;
        let (identity, mut identity_rx) = watch::channel(None);
        let mut config = ClientConfig::new();
        c.security.apply(&mut config);
        let producer: TxnProducer = config
            .set("bootstrap.servers", &c.bootstrap)
            .set("transactional.id", transactional_id)
            .set("transaction.timeout.ms", c.transaction_timeout.as_millis().to_string())
            // A record not delivered by then fails its branch (it must not outlive the transaction).
            .set("message.timeout.ms", c.call_timeout.as_millis().min(c.transaction_timeout.as_millis()).to_string())
            .set("linger.ms", "1")
            // The producer's own id and epoch come with its statistics (librdkafka's finest
            // interval is a second).
            .set("statistics.interval.ms", "1000")
            .create_with_context(IdentityContext { identity })
            .map_err(|e| format!("creating producer {transactional_id}: {e}"))?;
        let producer = Arc::new(producer);
        let (p, timeout) = (producer.clone(), c.call_timeout);
        tokio::task::spawn_blocking(move || p.init_transactions(timeout))
            .await
            .map_err(|e| format!("init_transactions panicked: {e}"))?
            .map_err(|e| format!("init_transactions for {transactional_id}: {e}"))?;
        // Statistics come every second: wait (bounded) for the first one that knows the id.
        let wait = c.call_timeout.max(std::time::Duration::from_secs(3));
        let known = tokio::time::timeout(wait, identity_rx.wait_for(Option::is_some)).await.map(|r| r.map(|id| *id));
        let Ok(Ok(Some(identity))) = known else {
            return Err(format!("producer {transactional_id} did not report its producer id in time"));
        };
        tracing::info!(
            transactional_id,
            producer_id = identity.0,
            epoch = identity.1,
            "transactional producer started"
        );
        Ok(Started { producer, identity: identity_rx })
    }

    pub fn call_timeout(&self) -> Duration {
        self.inner.config.call_timeout
    }

    pub fn size(&self) -> usize {
        self.inner.config.size
    }
}
