//! Bookkeeping every resource adapter needs for its branches: one lock per branch, the outcome
//! of finished branches, and the rules for branches it has never heard of.
//!
//! * **One lock per branch.** Every operation on a branch (its work, prepare, commit, abort)
//!   holds the branch's [`Slot`] lock, so they are ordered without a lock on anything else.
//!   The slot also holds what the branch has open at the resource (a database connection, a
//!   transactional producer), behind the adapter's own type `S`.
//! * **Finished branches are remembered** ([`Fin`]) so repeated requests get the first answer
//!   and a prepare arriving after an abort (a "dangling prepare") is refused, for
//!   `retention` and at most `max_finished` of them.
//! * **Unknown branches** are refused when their GTID (a UUIDv7: its first 48 bits are the
//!   issue time) predates this process — work the branch did before a restart may be lost —
//!   or predates the newest aborted branch forgotten (the watermark): forgetting never admits
//!   a dangling prepare. This assumes the coordinator's clock is not ahead of this machine's.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pledge_proto::{BranchId, Gtid};
use tokio::sync::OwnedMutexGuard;

use crate::Vote;

/// A branch at one resource.
pub type Key = (Gtid, BranchId);

/// How a branch ended here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fin {
    Prepared,
    /// Did nothing here: no second phase needed.
    ReadOnly,
    Committed,
    Aborted(String),
}

impl Fin {
    pub fn name(&self) -> &'static str {
        match self {
            Fin::Prepared => "prepared",
            Fin::ReadOnly => "read-only (prepared without work)",
            Fin::Committed => "committed",
            Fin::Aborted(_) => "aborted",
        }
    }
}

/// What a branch has open at its resource.
pub trait SlotState: Default + Send + 'static {
    /// The branch holds something open (a connection in a transaction, a producer).
    fn is_open(&self) -> bool;
}

/// One branch's place in line.
#[derive(Default)]
pub struct Slot<S> {
    pub state: S,
    /// When the branch was opened (for its active timeout).
    pub since: Option<Instant>,
    /// Taken out of the table: whoever locks it next must look the branch up again.
    removed: bool,
}

pub type SlotGuard<S> = OwnedMutexGuard<Slot<S>>;

struct Inner<S> {
    slots: HashMap<Key, Arc<tokio::sync::Mutex<Slot<S>>>>,
    finished: HashMap<Key, Fin>,
    finished_order: VecDeque<(Instant, Key)>,
    watermark_ms: u64,
}

/// See the module documentation.
pub struct BranchTable<S> {
    inner: Mutex<Inner<S>>,
    started_ms: u64,
    retention: Duration,
    max_finished: usize,
}

/// The rule for a branch a participant has no record of (see the module documentation): refused
/// if its GTID was issued before the participant started (`started_ms`) or at or before the
/// newest aborted branch it forgot (`watermark_ms`).
pub fn may_start(gtid: &Gtid, started_ms: u64, watermark_ms: u64) -> Result<(), String> {
    match gtid.unix_ms() {
        None => Err("GTID is not a UUIDv7".into()),
        Some(t) if t < started_ms => {
            Err("unknown branch of a transaction begun before this participant started (its work may be lost)".into())
        }
        Some(t) if t <= watermark_ms => Err("unknown branch older than the aborted branches remembered".into()),
        Some(_) => Ok(()),
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl<S: SlotState> BranchTable<S> {
    /// A table for a process that starts now.
    pub fn new(retention: Duration, max_finished: usize) -> Self {
        BranchTable {
            inner: Mutex::new(Inner {
                slots: HashMap::new(),
                finished: HashMap::new(),
                finished_order: VecDeque::new(),
                watermark_ms: 0,
            }),
            started_ms: now_ms(),
            retention,
            max_finished,
        }
    }

    /// Locks the branch's slot (creating it if absent), retrying if the slot it waited for was
    /// taken out of the table meanwhile.
    pub async fn lock(&self, key: &Key) -> SlotGuard<S> {
        loop {
            let slot = self.inner.lock().unwrap().slots.entry(key.clone()).or_default().clone();
            let guard = slot.lock_owned().await;
            if !guard.removed {
                return guard;
            }
        }
    }

    /// Takes a slot that holds nothing open out of the table (the branch is finished, or was
    /// never opened). Call before dropping a guard.
    pub fn release(&self, key: &Key, slot: &mut Slot<S>) {
        if !slot.state.is_open() && !slot.removed {
            slot.removed = true;
            self.inner.lock().unwrap().slots.remove(key);
        }
    }

    /// The slots of branches that hold something open, for timeouts.
    pub fn open_slots(&self) -> Vec<(Key, Arc<tokio::sync::Mutex<Slot<S>>>)> {
        self.inner.lock().unwrap().slots.iter().map(|(k, s)| (k.clone(), s.clone())).collect()
    }

    pub fn finished(&self, key: &Key) -> Option<Fin> {
        self.inner.lock().unwrap().finished.get(key).cloned()
    }

    pub fn finish(&self, key: &Key, fin: Fin) {
        let mut inner = self.inner.lock().unwrap();
        if inner.finished.insert(key.clone(), fin).is_none() {
            inner.finished_order.push_back((Instant::now(), key.clone()));
        }
    }

    /// May this process take a branch it has no record of? See the module documentation.
    pub fn may_start(&self, gtid: &Gtid) -> Result<(), String> {
        let watermark = self.inner.lock().unwrap().watermark_ms;
        may_start(gtid, self.started_ms, watermark)
    }

    /// The vote a repeated prepare of a finished branch gets: the first one again. (A branch
    /// prepared or committed here votes Prepared without metadata: the coordinator already
    /// holds the first vote's.)
    pub fn finished_vote(&self, key: &Key) -> Option<Vote> {
        self.finished(key).map(|fin| match fin {
            Fin::Prepared | Fin::Committed => Vote::Prepared { metadata: Vec::new() },
            Fin::ReadOnly => Vote::ReadOnly,
            Fin::Aborted(reason) => Vote::Aborted { reason },
        })
    }

    /// The vote for a prepare of a branch that did nothing here as far as this process knows:
    /// read-only if [`BranchTable::may_start`] admits it (nothing was done, so nothing can be
    /// lost), aborted if not. The answer is remembered, so a later request gets the same.
    pub fn vote_without_work(&self, key: &Key) -> Vote {
        match self.may_start(&key.0) {
            Ok(()) => {
                self.finish(key, Fin::ReadOnly);
                Vote::ReadOnly
            }
            Err(reason) => {
                self.finish(key, Fin::Aborted(reason.clone()));
                Vote::Aborted { reason }
            }
        }
    }

    /// Forgets finished branches past their retention (or beyond `max_finished`). A prepared
    /// branch is never forgotten here: it waits for its commit or abort (and the number of
    /// prepared branches has its own bound at the resource), or a late operation on it could be
    /// taken for the first.
    pub fn expire_finished(&self) {
        let mut inner = self.inner.lock().unwrap();
        let mut kept = Vec::new();
        while let Some((at, key)) = inner.finished_order.front().cloned() {
            if at.elapsed() < self.retention && inner.finished_order.len() <= self.max_finished {
                break;
            }
            inner.finished_order.pop_front();
            match inner.finished.get(&key) {
                Some(Fin::Prepared) => kept.push((Instant::now(), key)),
                Some(Fin::Aborted(_)) => {
                    inner.finished.remove(&key);
                    inner.watermark_ms = inner.watermark_ms.max(key.0.unix_ms().unwrap_or(0));
                }
                Some(_) => {
                    inner.finished.remove(&key);
                }
                None => {}
            }
        }
        inner.finished_order.extend(kept);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Open(bool);

    impl SlotState for Open {
        fn is_open(&self) -> bool {
            self.0
        }
    }

    fn key(g: Gtid) -> Key {
        (g, BranchId::parse_field("b", "b").unwrap())
    }

    #[tokio::test]
    async fn unknown_branches_older_than_the_process_or_the_watermark_are_refused() {
        let table: BranchTable<Open> = BranchTable::new(Duration::ZERO, 10);
        let before = Gtid::from_parts(table.started_ms - 1, 1);
        let after = Gtid::from_parts(table.started_ms + 10, 2);
        assert!(table.may_start(&before).unwrap_err().contains("before this participant started"));
        assert!(table.may_start(&after).is_ok());
        // An aborted branch forgotten raises the watermark past its GTID.
        table.finish(&key(after), Fin::Aborted("x".into()));
        table.expire_finished();
        assert_eq!(table.finished(&key(after)), None);
        assert!(table.may_start(&after).is_err());
        assert!(table.may_start(&Gtid::from_parts(table.started_ms + 20, 3)).is_ok());
    }

    #[tokio::test]
    async fn a_prepare_without_work_is_answered_once_and_then_remembered() {
        let table: BranchTable<Open> = BranchTable::new(Duration::from_secs(60), 10);
        let (fresh, old) = (key(Gtid::from_parts(table.started_ms + 10, 1)), key(Gtid::from_parts(1, 2)));
        assert_eq!(table.finished_vote(&fresh), None);
        assert_eq!(table.vote_without_work(&fresh), Vote::ReadOnly);
        assert_eq!(table.finished_vote(&fresh), Some(Vote::ReadOnly));
        let Vote::Aborted { reason } = table.vote_without_work(&old) else {
            panic!("an old unknown branch is refused")
        };
        assert_eq!(table.finished_vote(&old), Some(Vote::Aborted { reason }));
        table.finish(&fresh, Fin::Committed);
        assert_eq!(table.finished_vote(&fresh), Some(Vote::Prepared { metadata: Vec::new() }));
    }

    #[tokio::test]
    async fn a_slot_is_exclusive_and_released_when_nothing_is_open() {
        let table: Arc<BranchTable<Open>> = Arc::new(BranchTable::new(Duration::from_secs(60), 10));
        let k = key(Gtid::new_v7());
        let mut first = table.lock(&k).await;
        first.state = Open(true);
        let t = table.clone();
        let k2 = k.clone();
        let second = tokio::spawn(async move { t.lock(&k2).await.state.is_open() });
        tokio::task::yield_now().await;
        assert!(!second.is_finished(), "the second locker waits for the first");
        drop(first);
        assert!(second.await.unwrap(), "it sees what the first left open");
        let mut again = table.lock(&k).await;
        again.state = Open(false);
        table.release(&k, &mut again);
        drop(again);
        assert!(table.open_slots().is_empty());
    }

    #[tokio::test]
    async fn prepared_branches_are_not_forgotten() {
        let table: BranchTable<Open> = BranchTable::new(Duration::ZERO, 10);
        let (prepared, committed) = (key(Gtid::new_v7()), key(Gtid::new_v7()));
        table.finish(&prepared, Fin::Prepared);
        table.finish(&committed, Fin::Committed);
        table.expire_finished();
        assert_eq!(table.finished(&prepared), Some(Fin::Prepared));
        assert_eq!(table.finished(&committed), None);
    }
}
