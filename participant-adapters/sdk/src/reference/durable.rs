//! What the reference participant keeps on disk and in memory across time: replaying its log
//! after a restart, the branches a restart cut short, remembering finished branches for their
//! retention (and forgetting them after), and the checkpoints that let old log segments go.

use bytes::Bytes;
use pledge_proto::{BranchId, Gtid};
use prost::Message;

use super::records::*;
use super::*;
use crate::journal::Deadline;

impl Actor {
    pub(super) fn replay(&mut self, rtype: u8, payload: &[u8]) -> Result<(), String> {
        let writes_of = |ws: Vec<WritePb>| ws.into_iter().map(|w| (w.key, Bytes::from(w.value))).collect::<Vec<_>>();
        match rtype {
            TYPE_PREPARED => {
                let r = PreparedPb::decode(payload).map_err(|e| e.to_string())?;
                let key = (gtid_of(&r.gtid)?, branch_of(&r.branch_id)?);
                let wait = (r.wait_deadline_ms > 0).then_some(Deadline { at_ms: r.wait_deadline_ms, epoch: r.epoch });
                let entry = Entry::Prepared {
                    writes: writes_of(r.writes),
                    coordinator_id: r.coordinator_id,
                    prepared_ms: r.prepared_ms,
                    seq: 0,
                    wait,
                };
                self.prepared.insert(key.clone());
                self.branches.insert(key, entry);
            }
            TYPE_COMMITTED => {
                let r = CommittedPb::decode(payload).map_err(|e| e.to_string())?;
                let key = (gtid_of(&r.gtid)?, branch_of(&r.branch_id)?);
                if let Some(Entry::Prepared { writes, .. } | Entry::PreCommitted { writes, .. }) =
                    self.branches.remove(&key)
                {
                    self.data.extend(writes);
                }
                self.data.extend(writes_of(r.writes));
                let ended = if r.read_only { Ended::ReadOnly } else { Ended::Committed };
                self.finish(key, ended, 0, r.at_ms);
            }
            TYPE_ABORTED => {
                let r = AbortedPb::decode(payload).map_err(|e| e.to_string())?;
                let key = (gtid_of(&r.gtid)?, branch_of(&r.branch_id)?);
                match r.reason.is_empty() {
                    true => self.finish(key, Ended::Aborted, 0, r.at_ms),
                    false => self.remember_aborted(key, r.reason, 0, r.at_ms),
                }
            }
            TYPE_PRECOMMITTED => {
                let r = PreCommittedPb::decode(payload).map_err(|e| e.to_string())?;
                let key = (gtid_of(&r.gtid)?, branch_of(&r.branch_id)?);
                self.replay_pre_committed(key, r.deadline_ms, r.epoch)?;
            }
            TYPE_EPOCH => {
                let r = EpochPb::decode(payload).map_err(|e| e.to_string())?;
                let key = (gtid_of(&r.gtid)?, branch_of(&r.branch_id)?);
                if let Some(Entry::Prepared { wait: Some(d), .. } | Entry::PreCommitted { docommit: d, .. }) =
                    self.branches.get_mut(&key)
                {
                    d.epoch = d.epoch.max(r.epoch);
                }
            }
            TYPE_OPENED => {
                let r = OpenedPb::decode(payload).map_err(|e| e.to_string())?;
                let key = (gtid_of(&r.gtid)?, branch_of(&r.branch_id)?);
                self.branches.insert(key, Entry::Active { writes: Vec::new(), since_ms: r.at_ms });
            }
            TYPE_DATA => {
                let r = DataPb::decode(payload).map_err(|e| e.to_string())?;
                self.data.insert(r.key, Bytes::from(r.value));
            }
            other => return Err(format!("unknown record type {other}")),
        }
        Ok(())
    }

    /// After replay: a branch opened before the restart and neither prepared nor finished
    /// lost its staged writes with the previous process. It is aborted (in memory; its Opened
    /// record says the same after another restart, until a checkpoint records the abort).
    pub(super) fn lose_unfinished_work(&mut self, now: u64) {
        let lost: Vec<_> =
            self.branches.iter().filter(|(_, e)| matches!(e, Entry::Active { .. })).map(|(k, _)| k.clone()).collect();
        if !lost.is_empty() {
            tracing::info!(
                branches = lost.len(),
                "branches lost their staged writes in the restart; they will vote no"
            );
        }
        for key in lost {
            self.finish(key, Ended::Aborted, 0, now);
        }
    }

    /// A branch with no record: may it have been here before, its answer since forgotten?
    pub(super) fn maybe_forgotten(&self, gtid: &Gtid) -> bool {
        gtid.unix_ms().is_none_or(|t| t <= self.watermark_ms)
    }

    /// Marks a branch finished (`seq`: of the record that says so, 0 for none) and remembers
    /// it for retention, with the record a checkpoint keeps of it, encoded once here rather
    /// than at every checkpoint.
    pub(super) fn finish(&mut self, key: (Gtid, BranchId), ended: Ended, seq: u64, at_ms: u64) {
        let tombstone = tombstone(&key, ended, at_ms);
        self.remember(key, ended, seq, at_ms, tombstone);
    }

    /// [`finish`](Self::finish), logging the end with the tombstone itself as the record (all a
    /// commit without writes of its own, or an abort, has to say). Returns the record's number.
    pub(super) fn finish_logged(
        &mut self,
        out: &mut Vec<(u64, Submission)>,
        key: (Gtid, BranchId),
        ended: Ended,
        at_ms: u64,
    ) -> u64 {
        let tombstone = tombstone(&key, ended, at_ms);
        let seq = self.record(out, tombstone.0, tombstone.1.clone());
        self.remember(key, ended, seq, at_ms, tombstone);
        seq
    }

    pub(super) fn remember(
        &mut self,
        key: (Gtid, BranchId),
        ended: Ended,
        seq: u64,
        at_ms: u64,
        tombstone: (u8, Bytes),
    ) {
        self.finished.push_back(Finished { at_ms, gtid: key.0, branch: key.1.clone(), tombstone });
        self.prepared.remove(&key);
        let entry = match ended {
            Ended::Committed => Entry::Committed { seq },
            Ended::ReadOnly => Entry::ReadOnly { seq },
            Ended::Aborted => Entry::Aborted { seq, reason: String::new() },
        };
        self.branches.insert(key, entry);
    }

    /// Rolls back active branches past their timeout and forgets finished branches past their
    /// retention.
    pub(super) fn expire(&mut self, now: u64) {
        while let Some(&(since, gtid, ref branch)) = self.active.front() {
            if since + self.config.active_timeout_ms > now {
                break;
            }
            let key = (gtid, branch.clone());
            self.active.pop_front();
            if matches!(self.branches.get(&key), Some(Entry::Active { since_ms, .. }) if *since_ms == since) {
                tracing::info!(%gtid, branch = %key.1, "rolling back a branch that was not prepared in time");
                self.active_count -= 1;
                self.finish(key, Ended::Aborted, 0, now);
            }
        }
        while let Some(&Finished { at_ms, gtid, ref branch, .. }) = self.finished.front() {
            if at_ms + self.config.tombstone_retention_ms > now && self.finished.len() <= self.config.max_tombstones {
                break;
            }
            let key = (gtid, branch.clone());
            match self.branches.get(&key) {
                // Its record is still on its way to disk: forget it next time.
                Some(Entry::Aborted { seq, .. } | Entry::Committed { seq } | Entry::ReadOnly { seq })
                    if *seq > self.synced_seq =>
                {
                    break;
                }
                Some(Entry::Aborted { .. } | Entry::Committed { .. } | Entry::ReadOnly { .. }) => {
                    // From now on a branch this old with no record may be this one: never guessed.
                    self.watermark_ms = self.watermark_ms.max(gtid.unix_ms().unwrap_or(0));
                    self.branches.remove(&key);
                }
                _ => {}
            }
            self.finished.pop_front();
        }
    }

    /// Snapshot the data, the prepared branches and the remembered finished ones, so the log's
    /// older segments can go: after `checkpoint_every_records` records, and at least as many as
    /// the last checkpoint held. The snapshot grows with the remembered branches (up to
    /// `max_tombstones`); without the second rule a large state was rewritten every few seconds
    /// under load (ten times the log's own writes) and held the participant up each time. With
    /// it, checkpoints write at most as much as the log does, and the log stays within about
    /// twice the state.
    pub(super) fn maybe_checkpoint(&mut self, out: &mut Vec<(u64, Submission)>) {
        if self.records_since_checkpoint < self.config.checkpoint_every_records.max(self.last_checkpoint_records) {
            return;
        }
        self.records_since_checkpoint = 0;
        let mut records: Vec<(u8, Bytes)> = self
            .data
            .iter()
            .map(|(k, v)| (TYPE_DATA, DataPb { key: k.clone(), value: v.to_vec() }.encode_to_vec().into()))
            .collect();
        for ((gtid, branch), entry) in &self.branches {
            if let Entry::Active { since_ms, .. } = entry {
                // Its staged writes are not durable, but that it had some is.
                let opened =
                    OpenedPb { gtid: gtid.as_bytes().to_vec(), branch_id: branch.to_string(), at_ms: *since_ms };
                records.push((TYPE_OPENED, opened.encode_to_vec().into()));
            }
            if let Entry::Prepared { writes, coordinator_id, prepared_ms, .. }
            | Entry::PreCommitted { writes, coordinator_id, prepared_ms, .. } = entry
            {
                let wait = match entry {
                    Entry::Prepared { wait: Some(d), .. } => *d,
                    _ => Deadline { at_ms: 0, epoch: 0 },
                };
                let prepared = PreparedPb {
                    gtid: gtid.as_bytes().to_vec(),
                    branch_id: branch.to_string(),
                    coordinator_id: coordinator_id.clone(),
                    prepared_ms: *prepared_ms,
                    writes: writes.iter().map(|(k, v)| WritePb { key: k.clone(), value: v.to_vec() }).collect(),
                    wait_deadline_ms: wait.at_ms,
                    epoch: wait.epoch,
                };
                records.push((TYPE_PREPARED, prepared.encode_to_vec().into()));
            }
            // A pre-committed branch: its Prepared record, then what became of it.
            if let Entry::PreCommitted { docommit, .. } = entry {
                let pre_committed = PreCommittedPb {
                    gtid: gtid.as_bytes().to_vec(),
                    branch_id: branch.to_string(),
                    deadline_ms: docommit.at_ms,
                    epoch: docommit.epoch,
                    at_ms: 0,
                };
                records.push((TYPE_PRECOMMITTED, pre_committed.encode_to_vec().into()));
            }
        }
        // Every finished branch is in `finished` until `expire` forgets both.
        records.extend(self.finished.iter().map(|f| f.tombstone.clone()));
        self.last_checkpoint_records = records.len() as u64;
        self.next_seq += 1;
        out.push((self.next_seq, Submission::Checkpoint(records)));
    }
}

/// The record that a finished branch leaves: what the log says when it finishes, and what
/// checkpoints keep of it while it is remembered.
pub(super) fn tombstone(key: &(Gtid, BranchId), ended: Ended, at_ms: u64) -> (u8, Bytes) {
    let (gtid, branch_id) = (key.0.as_bytes().to_vec(), key.1.to_string());
    match ended {
        Ended::Committed | Ended::ReadOnly => {
            let read_only = ended == Ended::ReadOnly;
            let record = CommittedPb { gtid, branch_id, at_ms, writes: Vec::new(), read_only };
            (TYPE_COMMITTED, record.encode_to_vec().into())
        }
        Ended::Aborted => {
            (TYPE_ABORTED, AbortedPb { gtid, branch_id, at_ms, reason: String::new() }.encode_to_vec().into())
        }
    }
}
