//! One lock per branch. Every operation on a branch (its work, prepare, commit, abort) holds the
//! branch's [`Slot`], so they are ordered without a lock on anything else; the slot also holds
//! what the branch has open at its resource (a database connection inside its transaction, a
//! producer with its transaction open), as the adapter's type `S`. A slot with nothing open
//! leaves the table when its holder lets go ([`Slots::release`]): what is known of finished
//! branches lives in the [`journal`](crate::journal), not here.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use pledge_proto::Xid;
use tokio::sync::OwnedMutexGuard;

/// One branch's place in line.
pub struct Slot<S> {
    /// What the branch holds open at its resource, while it is active.
    pub open: Option<S>,
    /// When the branch was opened (for its active timeout).
    pub since: Option<Instant>,
    /// Taken out of the table: whoever locks it next must look the branch up again.
    removed: bool,
}

impl<S> Default for Slot<S> {
    fn default() -> Self {
        Slot { open: None, since: None, removed: false }
    }
}

pub type SlotGuard<S> = OwnedMutexGuard<Slot<S>>;

/// See the module documentation.
pub struct Slots<S> {
    slots: Mutex<HashMap<Xid, Arc<tokio::sync::Mutex<Slot<S>>>>>,
}

impl<S: Send + 'static> Default for Slots<S> {
    fn default() -> Self {
        Slots { slots: Mutex::new(HashMap::new()) }
    }
}

impl<S: Send + 'static> Slots<S> {
    /// Locks the branch's slot (creating it if absent), retrying if the slot it waited for was
    /// taken out of the table meanwhile.
    pub async fn lock(&self, xid: &Xid) -> SlotGuard<S> {
        loop {
            let slot = self.slots.lock().unwrap().entry(xid.clone()).or_default().clone();
            let guard = slot.lock_owned().await;
            if !guard.removed {
                return guard;
            }
        }
    }

    /// Takes a slot that holds nothing open out of the table. Call before dropping a guard.
    pub fn release(&self, xid: &Xid, slot: &mut Slot<S>) {
        if slot.open.is_none() && !slot.removed {
            slot.removed = true;
            self.slots.lock().unwrap().remove(xid);
        }
    }

    /// The slots in the table (branches open, or being worked on), for timeouts.
    pub fn all(&self) -> Vec<(Xid, Arc<tokio::sync::Mutex<Slot<S>>>)> {
        self.slots.lock().unwrap().iter().map(|(k, s)| (k.clone(), s.clone())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pledge_proto::Gtid;

    fn xid() -> Xid {
        Xid { resource: "db".parse().unwrap(), gtid: Gtid::new_v7(), branch: "b".parse().unwrap() }
    }

    #[tokio::test]
    async fn a_slot_is_exclusive_and_released_when_nothing_is_open() {
        let slots: Arc<Slots<u32>> = Arc::new(Slots::default());
        let x = xid();
        let mut first = slots.lock(&x).await;
        first.open = Some(7);
        let (s, x2) = (slots.clone(), x.clone());
        let second = tokio::spawn(async move { s.lock(&x2).await.open });
        tokio::task::yield_now().await;
        assert!(!second.is_finished(), "the second locker waits for the first");
        drop(first);
        assert_eq!(second.await.unwrap(), Some(7), "it sees what the first left open");
        let mut again = slots.lock(&x).await;
        again.open = None;
        slots.release(&x, &mut again);
        drop(again);
        assert!(slots.all().is_empty());
    }
}
