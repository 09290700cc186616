//! Cluster: the shards of the GTID space this engine owns.
//!
//! In a cluster every GTID belongs to one shard ([`Gtid::shard`]), and one instance at a time
//! owns a shard under a lease whose epoch the shared store checks on every decision write (the
//! fence; see `crate::cluster`). The engine is told what it owns by events: it adopts a shard
//! with every record the store holds for it, exactly as a restart replays its log, and drops
//! a shard at once when it loses it. Calls about a GTID of a shard it does not own are refused
//! with [`EngineError::NotOwner`], and participants' in-doubt branches of such shards are left
//! to their owner: presuming abort for them here could contradict a commit decided there.
//!
//! Not sharded (`shard_count` 0, the local store) the engine owns every GTID.

use pledge_proto::ResourceId;

use super::*;

impl Ctx {
    pub(super) fn owns(&self, gtid: Gtid) -> bool {
        self.cfg.shard_count == 0 || self.owned.contains_key(&gtid.shard(self.cfg.shard_count))
    }

    /// Whether the store confirmed (see [`Event::InDoubt`]) that `gtid`'s shard is still this
    /// engine's at the epoch it adopted it at. Always true when not sharded.
    pub(super) fn lease_confirmed(&self, gtid: Gtid, confirmed: Option<&BTreeMap<u16, u64>>) -> bool {
        if self.cfg.shard_count == 0 {
            return true;
        }
        let shard = gtid.shard(self.cfg.shard_count);
        let held = confirmed.and_then(|c| c.get(&shard));
        held.is_some() && held == self.owned.get(&shard)
    }

    /// The epoch stamped on a decision about `gtid`: its shard's lease epoch in a cluster.
    pub(super) fn epoch_of(&self, gtid: Gtid) -> u64 {
        if self.cfg.shard_count == 0 {
            return self.cfg.epoch;
        }
        self.owned.get(&gtid.shard(self.cfg.shard_count)).copied().unwrap_or(0)
    }
}

impl Engine {
    /// The shards owned, with their lease epochs.
    pub fn owned_shards(&self) -> &BTreeMap<u16, u64> {
        &self.cx.owned
    }

    /// Transactions of `shard` not yet finished (a shard being handed over is released once
    /// this reaches 0, or its drain time is up).
    pub fn live_in_shard(&self, shard: u16) -> usize {
        let count = self.cx.cfg.shard_count;
        self.txns.values().filter(|t| t.gtid.shard(count) == shard && (!t.phase.is_finished() || t.end_syncing)).count()
    }

    pub(super) fn adopt_shard(
        &mut self,
        shard: u16,
        epoch: u64,
        forgotten_through_ms: Millis,
        records: Vec<LogRecord>,
    ) {
        let count = self.cx.cfg.shard_count;
        if shard >= count {
            // The lease table and the configuration disagree: a bug, never a reason to guess.
            tracing::error!(shard, shard_count = count, "asked to adopt a shard outside the shard count");
            return;
        }
        // Adopted again (lost, then taken back): the store alone says what happened since.
        if self.cx.owned.contains_key(&shard) {
            self.drop_shard(shard);
        }
        self.cx.owned.insert(shard, epoch);
        let mut adopted = Vec::with_capacity(records.len());
        for record in records {
            let gtid = match &record {
                LogRecord::Commit(c) | LogRecord::PreCommit(c) => c.gtid,
                LogRecord::OnePhase(o) => o.gtid,
                LogRecord::End(e) => e.gtid,
                LogRecord::Resolve(r) => r.gtid,
                LogRecord::Register { .. } | LogRecord::Forgotten { .. } => {
                    self.apply_replayed(record);
                    continue;
                }
            };
            if gtid.shard(count) != shard {
                tracing::error!(%gtid, shard, "the store returned a record of another shard; ignored");
                continue;
            }
            self.apply_replayed(record);
            adopted.push(gtid);
        }
        let Engine { txns, cx } = self;
        if forgotten_through_ms > 0 {
            cx.forgotten_through_ms = cx.forgotten_through_ms.max(forgotten_through_ms);
            cx.last_forgotten_at_ms = cx.now;
        }
        let mut retired = false;
        for gtid in adopted {
            let Some(txn) = txns.get_mut(&gtid) else { continue };
            match txn.phase {
                Phase::Committed | Phase::Aborted => {
                    retired = true;
                    let since = txn.retained_since();
                    cx.retain(txn, since);
                }
                // Resumed exactly as after a restart (see `Engine::start`).
                _ => cx.resume(txn),
            }
        }
        if retired {
            cx.retired.make_contiguous().sort();
        }
    }

    pub(super) fn drop_shard(&mut self, shard: u16) {
        let Engine { txns, cx } = self;
        let count = cx.cfg.shard_count;
        if count == 0 || cx.owned.remove(&shard).is_none() {
            return;
        }
        let dropped: Vec<Gtid> = txns.keys().filter(|g| g.shard(count) == shard).copied().collect();
        for gtid in dropped {
            let Some(txn) = txns.remove(&gtid) else { continue };
            for w in &txn.waiters {
                cx.out.push(Command::Reply { req: w.req, reply: Err(EngineError::NotOwner { gtid, shard }) });
            }
            if let Some(slot) = txn.idempotency_slot()
                && cx.idempotency.get(&slot) == Some(&gtid)
            {
                cx.idempotency.remove(&slot);
            }
            cx.kept_heuristic.remove(&gtid);
        }
        // Their timers find no transaction and lapse.
        cx.retired.retain(|(_, g)| g.shard(count) != shard);
    }

    pub(super) fn participant_known(&mut self, resource: ResourceId, endpoint: String) {
        let cx = &mut self.cx;
        if cx.participants.get(&resource) == Some(&endpoint) {
            return;
        }
        if !cx.participants.contains_key(&resource) && cx.participants.len() >= MAX_PARTICIPANTS {
            tracing::error!(resource = %resource, max = MAX_PARTICIPANTS, "participant registered elsewhere not taken: too many");
            return;
        }
        cx.participants.insert(resource.clone(), endpoint.clone());
        cx.three_phase_capable.remove(&resource);
        cx.out.push(Command::Connect { resource, endpoint });
    }
}
