//! Recovery, the engine's side (decisions only; the I/O is in `crate::recovery`): rebuilding
//! from the decision log after a restart, resuming what the crash interrupted, resolving the
//! branches participants report in doubt, and the snapshots that bound the replay.

use pledge_proto::ResourceId;

use super::protocol::phase2_command;
use super::*;

impl Ctx {
    /// Resumes a transaction rebuilt from records (a restart, a shard taken over): phase 2 of
    /// a commit, the resend of a one-phase commit (the participant answers from its own
    /// record), the termination protocol of a pre-committed three-phase transaction.
    pub(super) fn resume(&mut self, txn: &mut Txn) {
        match txn.phase {
            // Every branch settled by an operator, the End record lost.
            Phase::Committing | Phase::Aborting if txn.all_acked() => self.finish_if_done(txn),
            Phase::Committing => self.send_phase2(txn, Phase2Op::Commit),
            // Only an operator's decision (a `Resolve` record) replays to an abort under way.
            Phase::Aborting => self.send_phase2(txn, Phase2Op::Abort),
            Phase::OnePhaseCommit => self.send_one_phase(txn),
            Phase::Terminating => self.send_state_calls(txn),
            _ => {}
        }
    }
}

impl Engine {
    /// Rebuilds the engine from the decision log after a restart. `now` is the restart time.
    /// Call [`Engine::start`] next to get the commands that finish what the crash interrupted.
    pub fn restore(cfg: EngineConfig, now: Millis, records: impl IntoIterator<Item = LogRecord>) -> Self {
        let mut engine = Engine::new(cfg);
        engine.cx.now = now;
        for record in records {
            engine.apply_replayed(record);
        }
        let Engine { txns, cx } = &mut engine;
        for txn in txns.values_mut().filter(|t| t.phase.is_finished()) {
            let since = txn.retained_since();
            cx.retain(txn, since);
        }
        cx.retired.make_contiguous().sort();
        engine
    }

    /// A transaction rebuilt from a record replaces any earlier one of that GTID (a later
    /// record tells more), and its idempotency key finds it again.
    /// Operators' resolutions stay with it (they are applied on top of its records).
    fn insert_replayed(&mut self, mut txn: Txn) {
        if let Some(old) = self.txns.get_mut(&txn.gtid) {
            txn.resolutions = std::mem::take(&mut old.resolutions);
        }
        if let Some(slot) = txn.idempotency_slot() {
            self.cx.idempotency.insert(slot, txn.gtid);
        }
        self.txns.insert(txn.gtid, txn);
    }

    fn replay_decision(&mut self, c: CommitRecord, phase: Phase) {
        let mut txn = Txn::new(c.gtid, c.created_ms, c.created_ms, c.idempotency_key);
        txn.phase = phase;
        txn.three_phase = c.three_phase;
        txn.commit_requested = true;
        txn.decision_epoch = c.epoch;
        txn.decided_ms = c.decided_ms;
        txn.owner = c.owner;
        for lb in c.branches {
            let mut b = Branch::new(lb.key);
            b.acked = lb.vote != Vote::Prepared;
            b.vote = Some(lb.vote);
            b.metadata = lb.metadata;
            b.prepared_ms = lb.prepared_ms;
            txn.branches.push(b);
        }
        self.insert_replayed(txn);
    }

    pub(super) fn apply_replayed(&mut self, record: LogRecord) {
        match record {
            LogRecord::Register { resource, endpoint } => {
                self.cx.participants.insert(resource, endpoint);
            }
            LogRecord::Forgotten { through_ms } => {
                self.cx.forgotten_through_ms = self.cx.forgotten_through_ms.max(through_ms);
            }
            LogRecord::OnePhase(o) => {
                let mut txn = Txn::new(o.gtid, o.created_ms, o.created_ms, o.idempotency_key);
                txn.phase = Phase::OnePhaseCommit;
                txn.one_phase = true;
                txn.commit_requested = true;
                txn.decision_epoch = o.epoch;
                txn.decided_ms = o.decided_ms;
                txn.owner = o.owner;
                let mut b = Branch::new(o.branch);
                b.may_be_empty = o.may_be_empty;
                txn.branches.push(b);
                self.insert_replayed(txn);
            }
            LogRecord::Commit(c) => self.replay_decision(c, Phase::Committing),
            // Three-phase, with no decision after it (a later record would replace this
            // transaction): the termination protocol decides.
            LogRecord::PreCommit(c) => self.replay_decision(c, Phase::Terminating),
            LogRecord::End(e) => {
                let mut txn = Txn::new(e.gtid, e.created_ms, e.created_ms, e.idempotency_key.clone());
                txn.phase = if e.committed { Phase::Committed } else { Phase::Aborted };
                txn.commit_requested = true;
                txn.abort_reason = e.reason.clone();
                txn.decided_ms = e.decided_ms;
                txn.completed_ms = e.completed_ms;
                txn.one_phase = e.one_phase;
                txn.three_phase = e.three_phase;
                txn.owner = e.owner.clone();
                for eb in &e.branches {
                    let mut b = Branch::new(eb.key.clone());
                    b.vote = eb.vote;
                    b.outcome = eb.outcome;
                    b.acked = true;
                    txn.branches.push(b);
                }
                txn.end = Some(e);
                self.insert_replayed(txn);
            }
            LogRecord::Resolve(r) => self.replay_resolution(r),
        }
    }

    /// The commands to run once after construction: connect to every participant, resume
    /// phase 2 of every committed transaction that is not finished, and resend every one-phase
    /// commit whose answer was not recorded (the participant answers from its own record).
    pub fn start(&mut self, now: Millis, out: &mut Vec<Command>) {
        let Engine { txns, cx } = self;
        cx.now = now;
        for (resource, endpoint) in &cx.participants {
            cx.out.push(Command::Connect { resource: resource.clone(), endpoint: endpoint.clone() });
        }
        for txn in txns.values_mut() {
            cx.resume(txn);
        }
        out.append(&mut cx.out);
    }

    pub(super) fn in_doubt(
        &mut self,
        resource: ResourceId,
        branches: Vec<InDoubtBranch>,
        listed_ms: Millis,
        confirmed: Option<&BTreeMap<u16, u64>>,
    ) {
        let Engine { txns, cx } = self;
        for ib in branches {
            if ib.branch.resource != resource {
                continue; // a participant may only speak for its own resource
            }
            if !cx.owns(ib.gtid) {
                continue; // another instance's shard: its owner resolves it
            }
            let Some(txn) = txns.get_mut(&ib.gtid) else {
                // Maybe a transaction that finished (every branch acknowledged) and was forgotten
                // after this list was made: then the list is stale, and presuming abort would roll
                // back a committed branch. That needs the list to be older than the retention
                // (the branch was prepared when it was made, so its transaction completed later,
                // and was kept at least the retention after that) and older than the last
                // forgetting. Such a branch waits for the next scan, which settles it; a list
                // handled promptly, as under any load, is trusted.
                let stale = cx.now.saturating_sub(listed_ms) >= cx.cfg.completed_retention_ms
                    && listed_ms <= cx.last_forgotten_at_ms
                    && ib.gtid.unix_ms().unwrap_or(0) <= cx.forgotten_through_ms;
                if stale || !cx.lease_confirmed(ib.gtid, confirmed) {
                    continue;
                }
                // No record of it: presumed abort.
                cx.out.push(Command::Abort { gtid: ib.gtid, branch: ib.branch, metadata: ib.metadata });
                continue;
            };
            let op = match txn.phase {
                // Still being decided: the prepare round (or the sync, or the three-phase
                // rounds) will settle it.
                Phase::Active
                | Phase::Preparing
                | Phase::OnePhasePending
                | Phase::OnePhaseCommit
                | Phase::PreCommitPending
                | Phase::PreCommitting
                | Phase::Terminating
                | Phase::CommitPending => continue,
                Phase::Committing | Phase::Committed => Phase2Op::Commit,
                Phase::Aborting | Phase::Aborted => Phase2Op::Abort,
            };
            let gtid = txn.gtid;
            match txn.branch_mut(&ib.branch) {
                Some(b) if b.in_flight => {}
                Some(b) => {
                    // Unacknowledged: due for a retry anyway, send it now rather than after the
                    // backoff. Acknowledged, yet still listed (the participant lost it, or
                    // answered before making it durable): repeat the outcome.
                    if !b.acked {
                        b.in_flight = true;
                        b.next_retry_ms = 0;
                    }
                    if b.metadata.is_empty() {
                        b.metadata = ib.metadata;
                    }
                    cx.out.push(phase2_command(op, gtid, b, false));
                }
                None => {
                    // Not a branch of this transaction's decision: it was never part of a commit.
                    cx.out.push(Command::Abort { gtid, branch: ib.branch, metadata: ib.metadata });
                }
            }
        }
    }

    /// After `checkpoint_every_records` appends, snapshot what a restart needs: registered
    /// participants, every committed transaction not yet finished, and the retained finished
    /// ones (so Get and idempotent retries keep working across restarts).
    pub(super) fn maybe_checkpoint(&mut self) {
        let Engine { txns, cx } = self;
        if cx.records_since_checkpoint < cx.cfg.checkpoint_every_records {
            return;
        }
        cx.records_since_checkpoint = 0;
        let mut records: Vec<LogRecord> = cx
            .participants
            .iter()
            .map(|(r, e)| LogRecord::Register { resource: r.clone(), endpoint: e.clone() })
            .collect();
        if cx.forgotten_through_ms > 0 {
            records.push(LogRecord::Forgotten { through_ms: cx.forgotten_through_ms });
        }
        for txn in txns.values() {
            let before = records.len();
            match txn.phase {
                // CommitPending is included: its commit record was submitted before this
                // checkpoint, so if the checkpoint is durable, so is the decision.
                Phase::CommitPending | Phase::Committing => records.push(LogRecord::Commit(txn.commit_record())),
                // Likewise the pre-commit decision.
                Phase::PreCommitPending | Phase::PreCommitting | Phase::Terminating => {
                    records.push(LogRecord::PreCommit(txn.commit_record()))
                }
                // Likewise the one-phase intent.
                Phase::OnePhasePending | Phase::OnePhaseCommit => {
                    records.push(LogRecord::OnePhase(txn.one_phase_record()))
                }
                // A finished transaction whose End record is still being synced is kept too:
                // the checkpoint is written after that record.
                Phase::Committed | Phase::Aborted => records.push(LogRecord::End(txn.end())),
                // An abort an operator decided for a three-phase transaction: its pre-commit
                // record, then the decision (below), as the log holds them. Any other abort
                // under way needs no record (presumed abort).
                Phase::Aborting if txn.resolutions.iter().any(|r| r.effect == ResolveEffect::Decided) => {
                    records.push(LogRecord::PreCommit(txn.commit_record()))
                }
                Phase::Active | Phase::Preparing | Phase::Aborting => {}
            }
            // Its resolutions after its record, as in the log.
            if records.len() > before {
                records.extend(txn.resolutions.iter().cloned().map(LogRecord::Resolve));
            }
        }
        cx.out.push(Command::Checkpoint { records });
    }
}
