//! What every SQL adapter's `Resource` (see `pledge_sdk::journaled`) keeps about its databases,
//! whatever the database: which resource ids it serves ([`DatabaseSet`]) and how many branches
//! may be active at each at once ([`ActiveBranches`]).

use std::collections::HashMap;
use std::sync::Arc;

use pledge_proto::ResourceId;
use pledge_sdk::{BranchError, Error};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The databases of an adapter (`D`: what it keeps about one), by resource id.
pub struct DatabaseSet<D> {
    by_id: HashMap<ResourceId, Arc<D>>,
    /// The resource ids, sorted: the order `Resource::resources` lists them in.
    ids: Vec<ResourceId>,
}

impl<D> DatabaseSet<D> {
    /// The set of `by_id`.
    pub fn new(by_id: HashMap<ResourceId, Arc<D>>) -> DatabaseSet<D> {
        let mut ids: Vec<ResourceId> = by_id.keys().cloned().collect();
        ids.sort();
        DatabaseSet { by_id, ids }
    }

    /// The database of resource `id`, if the adapter serves it.
    pub fn get(&self, id: &ResourceId) -> Option<&Arc<D>> {
        self.by_id.get(id)
    }

    /// The database of resource `id`, or the error a coordinator gets for a resource the adapter
    /// does not serve.
    pub fn get_or_error(&self, id: &ResourceId) -> Result<&Arc<D>, Error> {
        self.get(id).ok_or_else(|| Error::new(format!("this adapter does not serve resource {id}")))
    }

    /// The database a branch at resource `id` opens in, or [`BranchError::UnknownResource`].
    pub fn get_for_branch(&self, id: &ResourceId) -> Result<&Arc<D>, BranchError> {
        self.get(id).ok_or_else(|| BranchError::UnknownResource(id.to_string()))
    }

    /// Whether the adapter serves resource `id`.
    pub fn contains(&self, id: &ResourceId) -> bool {
        self.by_id.contains_key(id)
    }

    /// The resource ids served, sorted.
    pub fn ids(&self) -> &[ResourceId] {
        &self.ids
    }

    /// Every database, in no particular order.
    pub fn values(&self) -> impl Iterator<Item = &Arc<D>> {
        self.by_id.values()
    }
}

/// The slots for active (not yet prepared) branches at one database, `max_active_branches` of
/// them: each active branch holds a connection, and the pool must keep some for the statements
/// that finish prepared branches.
pub struct ActiveBranches {
    slots: Arc<Semaphore>,
    max_active_branches: usize,
}

impl ActiveBranches {
    /// `max_active_branches` free slots.
    pub fn new(max_active_branches: usize) -> ActiveBranches {
        ActiveBranches { slots: Arc::new(Semaphore::new(max_active_branches)), max_active_branches }
    }

    /// A slot for a branch that opens, held until the branch is no longer active; without
    /// waiting: [`BranchError::Busy`] when all are taken.
    pub fn take(&self) -> Result<OwnedSemaphorePermit, BranchError> {
        self.slots.clone().try_acquire_owned().map_err(|_| {
            BranchError::Busy(format!(
                "{} branches are already active at this database (max_active_branches)",
                self.max_active_branches
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn databases_are_found_by_resource_and_listed_in_order() {
        let id = |s: &str| -> ResourceId { s.parse().unwrap() };
        let set = DatabaseSet::new(HashMap::from([(id("b"), Arc::new(2)), (id("a"), Arc::new(1))]));
        assert_eq!(set.ids(), &[id("a"), id("b")]);
        assert_eq!(set.get(&id("b")).map(|d| **d), Some(2));
        assert!(set.contains(&id("a")) && !set.contains(&id("c")));
        assert_eq!(set.get_or_error(&id("c")).err().unwrap().to_string(), "this adapter does not serve resource c");
        assert!(matches!(set.get_for_branch(&id("c")), Err(BranchError::UnknownResource(r)) if r == "c"));
        assert_eq!(set.values().count(), 2);
    }

    #[test]
    fn a_branch_past_max_active_branches_is_busy_until_a_slot_frees() {
        let active = ActiveBranches::new(1);
        let first = active.take().unwrap();
        let e = active.take().unwrap_err();
        assert!(
            matches!(&e, BranchError::Busy(m) if m == "1 branches are already active at this database (max_active_branches)")
        );
        drop(first);
        let _second = active.take().unwrap();
    }
}
