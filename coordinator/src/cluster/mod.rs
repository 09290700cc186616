//! A cluster of coordinators on a shared PostgreSQL decision store, with no single point of
//! failure and no trust in clocks.
//!
//! * **Shards.** The GTID space is split into a fixed number of shards, set when the cluster is
//!   created ([`Gtid::shard`]: the GTID's last two bytes modulo the count). A Begin issues its
//!   GTID in a shard its instance owns; a Begin with an idempotency key, in the key's shard
//!   ([`key_shard`]), so a retry at any instance finds the same transaction.
//! * **Fenced leases** ([`lease`]). One row per shard: holder, epoch, expiry (database time).
//!   A free or expired lease is taken by raising its epoch. Every decision write locks the
//!   lease rows of its shards and is kept only where holder and epoch are still the writer's
//!   ([`store`]), so a paused, partitioned or slow former owner cannot write: only the database
//!   decides who may. Expiry decides only *when* another instance may take a shard, never
//!   whether a write is accepted.
//! * **Takeover.** The taker reads the shard's records and resumes them exactly as a restart
//!   resumes its log: phase 2 of committed transactions goes on, one-phase commits are resent.
//!   Transactions of the shard that were not decided have no record; the epoch the taker wrote
//!   is their abort decision, made durable before anything else happens (the former owner can
//!   never commit them: its commit record would be refused), and participants' in-doubt
//!   branches of them are rolled back by presumed abort, at once and then every
//!   `recovery_interval_ms`.
//! * **Handover.** A shard leaves an instance that shuts down or has more than its share:
//!   no new GTIDs are issued in it, its live transactions get `handover_drain_ms` to finish,
//!   then it is dropped and its lease released for the next owner to take.
//! * **Routing** ([`router`]). Any instance answers any call: one about a GTID of another
//!   instance's shard is forwarded to its owner (the reply names the owner in the
//!   `pledge-owner` metadata, so clients can go direct), List asks every instance.

pub mod lease;
pub mod router;
pub mod schema;
pub mod status;
pub mod store;

use std::collections::BTreeMap;
use std::sync::{Mutex, RwLock};

use pledge_proto::Gtid;

pub use schema::ClusterInfo;

/// The shard of a Begin idempotency key (FNV-1a of its bytes): a retried Begin with the same
/// key lands in the same shard, whichever instance receives it.
pub fn key_shard(key: &str, shard_count: u16) -> u16 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % u64::from(shard_count.max(1))) as u16
}

/// Who owns a shard, as of the last lease read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub instance: String,
    pub address: String,
    pub epoch: u64,
}

/// What this instance's parts share: the shards it owns (the lease manager's word, checked by
/// the store writer before each write) and where every shard's owner is (for routing).
pub struct ClusterState {
    pub instance_id: String,
    /// The address other instances forward calls to.
    pub address: String,
    pub shard_count: u16,
    /// Owned shards and their lease epochs.
    owned: Mutex<BTreeMap<u16, u64>>,
    /// Every shard's owner, by shard; `None`: no live owner.
    owners: RwLock<Vec<Option<Owner>>>,
    /// Live instances (id, address), as of the last read.
    instances: RwLock<Vec<(String, String)>>,
}

impl ClusterState {
    pub fn new(instance_id: String, address: String, shard_count: u16) -> ClusterState {
        ClusterState {
            instance_id,
            address,
            shard_count,
            owned: Mutex::new(BTreeMap::new()),
            owners: RwLock::new(vec![None; usize::from(shard_count)]),
            instances: RwLock::new(Vec::new()),
        }
    }

    pub fn shard_of(&self, gtid: Gtid) -> u16 {
        gtid.shard(self.shard_count)
    }

    pub fn epoch_of(&self, shard: u16) -> Option<u64> {
        self.owned.lock().expect("owned shards").get(&shard).copied()
    }

    pub fn owned(&self) -> BTreeMap<u16, u64> {
        self.owned.lock().expect("owned shards").clone()
    }

    /// Records `shard` as owned at `epoch` (the lease manager, once the store granted it).
    pub fn own(&self, shard: u16, epoch: u64) {
        self.owned.lock().expect("owned shards").insert(shard, epoch);
        self.set_owner(shard, Some(Owner { instance: self.instance_id.clone(), address: self.address.clone(), epoch }));
    }

    /// Forgets `shard` if it is still owned at `epoch`; whether it was.
    pub(crate) fn lose(&self, shard: u16, epoch: u64) -> bool {
        let mut owned = self.owned.lock().expect("owned shards");
        if owned.get(&shard) != Some(&epoch) {
            return false;
        }
        owned.remove(&shard);
        drop(owned);
        self.set_owner(shard, None);
        true
    }

    fn set_owner(&self, shard: u16, owner: Option<Owner>) {
        if let Some(slot) = self.owners.write().expect("owners").get_mut(usize::from(shard)) {
            *slot = owner;
        }
    }

    /// The owner of `shard` as last seen (this instance's own shards are always current).
    pub fn owner_of(&self, shard: u16) -> Option<Owner> {
        self.owners.read().expect("owners").get(usize::from(shard)).cloned().flatten()
    }

    /// Live instances other than this one: (id, address).
    pub fn peers(&self) -> Vec<(String, String)> {
        self.instances.read().expect("instances").iter().filter(|(id, _)| *id != self.instance_id).cloned().collect()
    }

    pub(crate) fn set_view(&self, owners: Vec<Option<Owner>>, instances: Vec<(String, String)>) {
        let owned = self.owned();
        let mut view = owners;
        // Our own shards are known first-hand: the lease read may predate a change.
        for (shard, slot) in view.iter_mut().enumerate() {
            let mine = slot.as_ref().is_some_and(|o| o.instance == self.instance_id);
            match owned.get(&(shard as u16)) {
                Some(&epoch) => {
                    *slot = Some(Owner { instance: self.instance_id.clone(), address: self.address.clone(), epoch })
                }
                None if mine => *slot = None,
                None => {}
            }
        }
        *self.owners.write().expect("owners") = view;
        *self.instances.write().expect("instances") = instances;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_shards_are_stable_and_spread() {
        assert_eq!(key_shard("order-42", 64), key_shard("order-42", 64));
        let mut seen = [0u32; 16];
        for i in 0..16_000 {
            seen[key_shard(&format!("key-{i}"), 16) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| (700..1300).contains(&n)), "{seen:?}");
    }

    #[test]
    fn a_shard_is_lost_only_at_the_epoch_it_was_owned_at() {
        let s = ClusterState::new("a".into(), "http://a".into(), 4);
        s.own(1, 7);
        assert!(!s.lose(1, 6));
        assert_eq!(s.epoch_of(1), Some(7));
        assert_eq!(s.owner_of(1).unwrap().instance, "a");
        assert!(s.lose(1, 7));
        assert_eq!(s.epoch_of(1), None);
        assert_eq!(s.owner_of(1), None);
    }
}
