//! The reference participant: a small durable key-value store whose writes are staged in a
//! branch (`Put`), made durable at prepare, and applied at commit.
//!
//! State lives in memory and in a `pledge-log` write-ahead log in its data directory (group
//! commit, CRC-framed records, checkpoints), so a prepared branch survives kill -9 and commits
//! after the restart. One task (the "actor") owns the state, so operations on the same branch
//! are ordered without locks; an answer that depends on a record waits until that record is
//! synced, including a repeated request that finds the record still on its way to disk.
//!
//! It keeps the SDK's contract by hand (the adapters get it from `pledge_sdk::journaled`),
//! which makes it a second implementation for the conformance kit to check.
//!
//! # What is durable, and why that is enough
//! * Every answer that may be asked for again is synced before it is given: Prepared (with its
//!   writes), Committed, Read-only and Aborted records.
//! * A branch's first write is acknowledged only once an Opened record is synced. Its staged
//!   writes are memory only, so after a restart a branch with an Opened record and no end is
//!   known to have lost them: its further writes and its Prepare are refused. No clock is
//!   involved.
//! * A Prepare (or one-phase Commit) of a branch with no record votes no, unless the client
//!   declared the branch may be empty (then it votes read-only); either answer is recorded.
//! * Finished branches are remembered for `tombstone_retention_ms` (and at most
//!   `max_tombstones`); forgetting one raises the watermark to its GTID's time, and a branch of
//!   a GTID that old or older with no record is refused (its answer may have been forgotten):
//!   a Commit of it is answered as a heuristic hazard, never guessed.
//! * Three-phase commit (`three_phase.rs`): the wait deadline rides in the Prepared record, a
//!   PreCommitted record carries the do-commit deadline, an Epoch record the highest
//!   coordinator epoch answered; the actor fires due deadlines before every operation and on a
//!   timer set to the next one.

mod durable;
mod records;
mod store;
mod three_phase;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use pledge_log::{Durable, LogError, LogWriter};
use pledge_proto::{BranchId, Gtid, ResourceId, Xid};
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

pub use crate::BranchState;
use crate::journal::Deadline;
use crate::{
    BranchStatus, CommitKind, Error, InDoubt, Outcome, Participant, RecoverPage, RecoverQuery, ThreePhase,
    ThreePhaseError, Vote,
};
use records::*;
pub use store::StoreService;

#[derive(Debug, Clone)]
pub struct ReferenceConfig {
    pub resource: ResourceId,
    pub data_dir: PathBuf,
    /// Vote no on every Prepare (and refuse every one-phase commit), for tests.
    pub vote_no: bool,
    /// Wait this long before handling each Prepare / each Commit, for tests (0: no stall).
    pub stall_prepare: Duration,
    pub stall_commit: Duration,
    pub tombstone_retention_ms: u64,
    pub max_tombstones: usize,
    /// An active (not yet prepared) branch is rolled back after this long.
    pub active_timeout_ms: u64,
    pub max_active_branches: usize,
    pub max_writes_per_branch: usize,
    /// Most bytes (keys and values) one branch may stage: its prepare record carries them all,
    /// and a log record holds at most 1 MiB.
    pub max_branch_bytes: usize,
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
    pub checkpoint_every_records: u64,
}

impl ReferenceConfig {
    pub fn new(resource: ResourceId, data_dir: impl Into<PathBuf>) -> Self {
        ReferenceConfig {
            resource,
            data_dir: data_dir.into(),
            vote_no: false,
            stall_prepare: Duration::ZERO,
            stall_commit: Duration::ZERO,
            tombstone_retention_ms: 2 * 3_600_000,
            max_tombstones: 1_000_000,
            active_timeout_ms: 600_000,
            max_active_branches: 100_000,
            max_writes_per_branch: 1_000,
            max_branch_bytes: 512 << 10,
            max_key_bytes: 256,
            max_value_bytes: 64 << 10,
            checkpoint_every_records: 100_000,
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

type Write = (String, Bytes);

/// A finished branch remembered for retention, with the record checkpoints keep of it.
struct Finished {
    at_ms: u64,
    gtid: Gtid,
    branch: BranchId,
    tombstone: (u8, Bytes),
}

#[derive(Debug)]
enum Entry {
    /// Taking writes (in memory). Replay creates one for each Opened record; one left at the
    /// end of replay lost its writes in the restart.
    Active {
        writes: Vec<Write>,
        since_ms: u64,
    },
    /// `seq`: the actor's number of the record that made it so (see `Actor::synced_seq`).
    /// `wait`: prepared under three-phase commit; aborts itself at this deadline.
    Prepared {
        writes: Vec<Write>,
        coordinator_id: String,
        prepared_ms: u64,
        seq: u64,
        wait: Option<Deadline>,
    },
    /// Three-phase commit: commits itself at `docommit` unless told first.
    PreCommitted {
        writes: Vec<Write>,
        coordinator_id: String,
        prepared_ms: u64,
        seq: u64,
        docommit: Deadline,
    },
    Committed {
        seq: u64,
    },
    /// Voted read-only: there was nothing to commit.
    ReadOnly {
        seq: u64,
    },
    /// `reason`: why, when the participant decided it itself (a wait deadline passed).
    Aborted {
        seq: u64,
        reason: String,
    },
}

/// How a branch ended here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    Committed,
    ReadOnly,
    Aborted,
}

enum Op {
    /// `precommit_wait_ms` > 0: CanCommit (three-phase).
    Prepare {
        coordinator_id: String,
        xid: Xid,
        may_be_empty: bool,
        precommit_wait_ms: u64,
        reply: oneshot::Sender<Result<Vote, Error>>,
    },
    PreCommit {
        epoch: u64,
        xid: Xid,
        docommit_wait_ms: u64,
        reply: oneshot::Sender<Result<BranchStatus, ThreePhaseError>>,
    },
    QueryState {
        epoch: u64,
        xid: Xid,
        reply: oneshot::Sender<Result<BranchStatus, ThreePhaseError>>,
    },
    Commit {
        xid: Xid,
        kind: CommitKind,
        reply: oneshot::Sender<Result<Outcome, Error>>,
    },
    Abort {
        xid: Xid,
        reply: oneshot::Sender<Result<Outcome, Error>>,
    },
    Recover {
        coordinator_id: String,
        query: RecoverQuery,
        reply: oneshot::Sender<RecoverPage>,
    },
    Put {
        gtid: Gtid,
        branch: BranchId,
        key: String,
        value: Bytes,
        reply: oneshot::Sender<Result<(), Status>>,
    },
    Read {
        key: String,
        reply: oneshot::Sender<Option<Bytes>>,
    },
    Status {
        gtid: Gtid,
        branch: BranchId,
        reply: oneshot::Sender<BranchState>,
    },
}

/// An answer held back until the record it depends on is synced.
type Deferred = Box<dyn FnOnce() + Send>;

/// The reference participant. Cheap to clone; all clones talk to the same actor.
#[derive(Clone)]
pub struct ReferenceParticipant {
    ops: mpsc::Sender<Op>,
    config: Arc<ReferenceConfig>,
}

/// Keeps the log open; [`ReferenceHandle::shutdown`] flushes it.
pub struct ReferenceHandle {
    log: pledge_log::Log,
    actor: tokio::task::JoinHandle<Result<(), LogError>>,
}

impl ReferenceHandle {
    /// Stops the actor (after the last [`ReferenceParticipant`] clone is dropped) and flushes the log.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.actor.await??;
        self.log.shutdown().await?;
        Ok(())
    }
}

impl ReferenceParticipant {
    /// Replays the state in `config.data_dir` and starts the actor. Blocking replay; call from
    /// async code at start-up.
    pub fn open(config: ReferenceConfig) -> anyhow::Result<(ReferenceParticipant, ReferenceHandle)> {
        let mut actor = Actor::new(config.clone());
        let log = pledge_log::open(pledge_log::LogConfig::new(config.data_dir.join("log")), |record| {
            actor.replay(record.rtype, &record.payload)
        })
        .map_err(|e| anyhow::anyhow!("cannot open the participant's state in {}: {e}", config.data_dir.display()))?;
        actor.lose_unfinished_work(now_ms());
        // Checkpoints list finished branches in no particular order; retention expects them by age.
        actor.finished.make_contiguous().sort_by_key(|f| f.at_ms);
        actor.index_deadlines();
        let prepared = actor.prepared.len();
        tracing::info!(resource = %config.resource, prepared, keys = actor.data.len(), "participant state replayed");
        let (ops, rx) = mpsc::channel(4096);
        let writer = log.writer();
        let resource = config.resource.clone();
        let task = tokio::spawn(async move {
            let ended = actor.run(writer, rx).await;
            if let Err(e) = &ended {
                // Every call fails from now on ("shutting down"); say why, once.
                tracing::error!(resource = %resource, error = %e, "participant state log failed; restart the participant");
            }
            ended
        });
        Ok((ReferenceParticipant { ops, config: Arc::new(config) }, ReferenceHandle { log, actor: task }))
    }

    async fn ask<T>(&self, op: impl FnOnce(oneshot::Sender<T>) -> Op) -> Result<T, Error> {
        let (tx, rx) = oneshot::channel();
        self.ops.send(op(tx)).await.map_err(|_| Error::new("participant is shutting down"))?;
        rx.await.map_err(|_| Error::new("participant is shutting down"))
    }

    pub async fn status(&self, gtid: Gtid, branch: BranchId) -> Result<BranchState, Error> {
        self.ask(|reply| Op::Status { gtid, branch, reply }).await
    }

    pub async fn read(&self, key: String) -> Result<Option<Bytes>, Error> {
        self.ask(|reply| Op::Read { key, reply }).await
    }

    pub async fn put(&self, gtid: Gtid, branch: BranchId, key: String, value: Bytes) -> Result<(), Status> {
        self.ask(|reply| Op::Put { gtid, branch, key, value, reply })
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?
    }
}

#[tonic::async_trait]
impl Participant for ReferenceParticipant {
    async fn prepare(&self, coordinator_id: &str, xid: &Xid, may_be_empty: bool) -> Result<Vote, Error> {
        if !self.config.stall_prepare.is_zero() {
            tokio::time::sleep(self.config.stall_prepare).await;
        }
        let (coordinator_id, xid) = (coordinator_id.to_string(), xid.clone());
        self.ask(|reply| Op::Prepare { coordinator_id, xid, may_be_empty, precommit_wait_ms: 0, reply }).await?
    }

    async fn commit(
        &self,
        _coordinator_id: &str,
        xid: &Xid,
        kind: CommitKind,
        _metadata: &[u8],
    ) -> Result<Outcome, Error> {
        if !self.config.stall_commit.is_zero() {
            tokio::time::sleep(self.config.stall_commit).await;
        }
        fail::fail_point!("participant::before_commit");
        let xid = xid.clone();
        self.ask(|reply| Op::Commit { xid, kind, reply }).await?
    }

    async fn abort(&self, _coordinator_id: &str, xid: &Xid, _metadata: &[u8]) -> Result<Outcome, Error> {
        let xid = xid.clone();
        self.ask(|reply| Op::Abort { xid, reply }).await?
    }

    async fn recover(&self, coordinator_id: &str, query: &RecoverQuery) -> Result<RecoverPage, Error> {
        let (coordinator_id, query) = (coordinator_id.to_string(), query.clone());
        self.ask(|reply| Op::Recover { coordinator_id, query, reply }).await
    }

    fn three_phase(&self) -> Option<&dyn ThreePhase> {
        Some(self)
    }
}

struct Actor {
    config: ReferenceConfig,
    branches: HashMap<(Gtid, BranchId), Entry>,
    /// The prepared branches, in Recover's order.
    prepared: BTreeSet<(Gtid, BranchId)>,
    data: BTreeMap<String, Bytes>,
    /// Finished branches in finishing order, for retention.
    finished: VecDeque<Finished>,
    /// Active branches in creation order, for their timeout.
    active: VecDeque<(u64, Gtid, BranchId)>,
    active_count: usize,
    /// Branches with no record and a GTID issued at or before this time may have been here: an
    /// answer that old may have been forgotten.
    watermark_ms: u64,
    /// Records submitted by this actor are numbered 1, 2, ...; `synced_seq` is the highest whose
    /// sync has been confirmed. The log syncs in order, so every lower one is durable too.
    next_seq: u64,
    synced_seq: u64,
    deferred: BTreeMap<u64, Vec<Deferred>>,
    records_since_checkpoint: u64,
    /// Records in the last checkpoint.
    last_checkpoint_records: u64,
    /// Three-phase deadlines (Unix ms) of undecided branches, soonest first. An entry whose
    /// branch moved on (decided, or pre-committed to a later deadline) is dropped when due.
    deadlines: BTreeSet<(u64, Gtid, BranchId)>,
}

impl Actor {
    fn new(config: ReferenceConfig) -> Self {
        Actor {
            config,
            branches: HashMap::new(),
            prepared: BTreeSet::new(),
            data: BTreeMap::new(),
            finished: VecDeque::new(),
            active: VecDeque::new(),
            active_count: 0,
            watermark_ms: 0,
            next_seq: 0,
            synced_seq: 0,
            deferred: BTreeMap::new(),
            records_since_checkpoint: 0,
            last_checkpoint_records: 0,
            deadlines: BTreeSet::new(),
        }
    }

    async fn run(mut self, log: LogWriter, mut ops: mpsc::Receiver<Op>) -> Result<(), LogError> {
        let mut syncs: FuturesUnordered<SeqDurable> = FuturesUnordered::new();
        let mut housekeeping = tokio::time::interval(Duration::from_secs(1));
        // Set to the soonest three-phase deadline (`timer_at`, Unix ms), if any.
        let mut timer = Box::pin(tokio::time::sleep(Duration::ZERO));
        let mut timer_at = None;
        enum Wake {
            Synced(u64, Result<u64, LogError>),
            Op(Option<Op>),
            Housekeeping,
            Deadline,
        }
        loop {
            let next = self.deadlines.first().map(|(at, _, _)| *at);
            if next != timer_at {
                timer_at = next;
                if let Some(at) = next {
                    let wait = Duration::from_millis(at.saturating_sub(now_ms()));
                    timer.as_mut().reset(tokio::time::Instant::now() + wait);
                }
            }
            let wake = tokio::select! {
                biased;
                Some((seq, result)) = syncs.next(), if !syncs.is_empty() => Wake::Synced(seq, result),
                op = ops.recv() => Wake::Op(op),
                () = &mut timer, if timer_at.is_some() => Wake::Deadline,
                _ = housekeeping.tick() => Wake::Housekeeping,
            };
            match wake {
                Wake::Synced(seq, result) => {
                    result?;
                    self.synced(seq);
                }
                Wake::Op(Some(op)) => {
                    let mut out = Vec::new();
                    self.handle(op, &mut out);
                    self.maybe_checkpoint(&mut out);
                    for (seq, submission) in out {
                        // Not `syncs.push(submit(..).await?)`: `push` takes `&self`, and a
                        // shared borrow held across the await would make this future !Send.
                        let durable = submit(&log, seq, submission).await?;
                        syncs.push(durable);
                    }
                }
                Wake::Op(None) => break,
                Wake::Housekeeping => self.expire(now_ms()),
                Wake::Deadline => {
                    // The timer runs on tokio's clock: woken early (by the wall clock), it is
                    // set again for what is left.
                    timer_at = None;
                    let mut out = Vec::new();
                    self.fire_due(now_ms(), &mut out);
                    self.maybe_checkpoint(&mut out);
                    for (seq, submission) in out {
                        let durable = submit(&log, seq, submission).await?;
                        syncs.push(durable);
                    }
                }
            }
        }
        // Answer what is still waiting for its sync before stopping.
        while let Some((seq, result)) = syncs.next().await {
            result?;
            self.synced(seq);
        }
        Ok(())
    }

    fn synced(&mut self, seq: u64) {
        self.synced_seq = self.synced_seq.max(seq);
        while let Some(entry) = self.deferred.first_entry() {
            if *entry.key() > self.synced_seq {
                break;
            }
            for answer in entry.remove() {
                answer();
            }
        }
    }

    /// Runs `answer` once record `seq` is durable (at once if it already is).
    fn when_synced(&mut self, seq: u64, answer: Deferred) {
        if seq <= self.synced_seq {
            answer();
        } else {
            self.deferred.entry(seq).or_default().push(answer);
        }
    }

    fn record(&mut self, out: &mut Vec<(u64, Submission)>, rtype: u8, payload: Bytes) -> u64 {
        self.next_seq += 1;
        self.records_since_checkpoint += 1;
        out.push((self.next_seq, Submission::Record(rtype, payload)));
        self.next_seq
    }

    fn handle(&mut self, op: Op, out: &mut Vec<(u64, Submission)>) {
        let now = now_ms();
        // A three-phase deadline that has passed decides before anything asks.
        self.fire_due(now, out);
        match op {
            Op::PreCommit { epoch, xid, docommit_wait_ms, reply } => {
                self.pre_commit(out, epoch, &xid, docommit_wait_ms, now, reply)
            }
            Op::QueryState { epoch, xid, reply } => self.query_state(out, epoch, &xid, reply),
            Op::Prepare { coordinator_id, xid, may_be_empty, precommit_wait_ms, reply } => {
                if xid.resource != self.config.resource {
                    let reason = format!("this participant serves resource {:?}", self.config.resource.as_str());
                    let _ = reply.send(Ok(Vote::Aborted { reason }));
                    return;
                }
                let key = (xid.gtid, xid.branch.clone());
                let forgotten = self.maybe_forgotten(&xid.gtid);
                let writes = match self.branches.get_mut(&key) {
                    Some(Entry::Prepared { wait, .. }) if wait.is_some() != (precommit_wait_ms > 0) => {
                        let _ = reply.send(Err(Error::new(format!(
                            "the branch was prepared under {}-phase commit; a {}-phase Prepare of it is a coordinator \
                             bug",
                            if wait.is_none() { "two" } else { "three" },
                            if precommit_wait_ms == 0 { "two" } else { "three" },
                        ))));
                        return;
                    }
                    Some(Entry::Prepared { seq, .. } | Entry::PreCommitted { seq, .. } | Entry::Committed { seq }) => {
                        // Repeated prepare: same answer, once the first one's record is durable.
                        let seq = *seq;
                        return self.when_synced(seq, Box::new(move || drop(reply.send(Ok(prepared())))));
                    }
                    Some(Entry::ReadOnly { seq }) => {
                        let seq = *seq;
                        return self.when_synced(seq, Box::new(move || drop(reply.send(Ok(Vote::ReadOnly)))));
                    }
                    Some(Entry::Aborted { seq, reason }) => {
                        let seq = *seq;
                        let reason = match reason.is_empty() {
                            true => "branch was aborted (a dangling prepare, or its work was lost)".to_string(),
                            false => reason.clone(),
                        };
                        return self.when_synced(seq, Box::new(move || drop(reply.send(Ok(Vote::Aborted { reason })))));
                    }
                    Some(Entry::Active { writes, .. }) => {
                        self.active_count -= 1;
                        std::mem::take(writes)
                    }
                    None if may_be_empty && !forgotten => {
                        let seq = self.finish_logged(out, key, Ended::ReadOnly, now);
                        return self.when_synced(seq, Box::new(move || drop(reply.send(Ok(Vote::ReadOnly)))));
                    }
                    None => {
                        // Silence is not consent: recorded, so a later Put or Prepare is refused too.
                        let seq = self.finish_logged(out, key, Ended::Aborted, now);
                        let reason = crate::journaled::NO_RECORD.to_string();
                        return self.when_synced(seq, Box::new(move || drop(reply.send(Ok(Vote::Aborted { reason })))));
                    }
                };
                if self.config.vote_no {
                    let seq = self.finish_logged(out, key, Ended::Aborted, now);
                    let reason = "configured to vote no".to_string();
                    return self.when_synced(seq, Box::new(move || drop(reply.send(Ok(Vote::Aborted { reason })))));
                }
                let wait = (precommit_wait_ms > 0).then_some(Deadline { at_ms: now + precommit_wait_ms, epoch: 0 });
                let payload = PreparedPb {
                    gtid: xid.gtid.as_bytes().to_vec(),
                    branch_id: xid.branch.to_string(),
                    coordinator_id: coordinator_id.clone(),
                    prepared_ms: now,
                    writes: writes.iter().map(|(k, v)| WritePb { key: k.clone(), value: v.to_vec() }).collect(),
                    wait_deadline_ms: wait.map_or(0, |w| w.at_ms),
                    epoch: 0,
                }
                .encode_to_vec();
                let seq = self.record(out, TYPE_PREPARED, payload.into());
                self.prepared.insert(key.clone());
                if let Some(w) = wait {
                    self.deadlines.insert((w.at_ms, key.0, key.1.clone()));
                }
                self.branches.insert(key, Entry::Prepared { writes, coordinator_id, prepared_ms: now, seq, wait });
                self.when_synced(seq, Box::new(move || drop(reply.send(Ok(prepared())))));
            }
            Op::Commit { xid, kind, reply } => {
                if xid.resource != self.config.resource {
                    let _ = reply.send(Err(Error::new(format!(
                        "this participant serves resource {:?}, not {:?}",
                        self.config.resource.as_str(),
                        xid.resource.as_str()
                    ))));
                    return;
                }
                let one_phase = kind != CommitKind::TwoPhase;
                let key = (xid.gtid, xid.branch.clone());
                let forgotten = self.maybe_forgotten(&xid.gtid);
                let (writes, one_phase_writes) = match self.branches.get_mut(&key) {
                    Some(Entry::Committed { seq } | Entry::ReadOnly { seq }) => {
                        let seq = *seq;
                        return self.when_synced(seq, Box::new(move || drop(reply.send(Ok(Outcome::Committed)))));
                    }
                    Some(Entry::Aborted { seq, reason }) => {
                        let seq = *seq;
                        let reason = match reason.is_empty() {
                            true => "branch was rolled back".to_string(),
                            false => reason.clone(),
                        };
                        return self
                            .when_synced(seq, Box::new(move || drop(reply.send(Ok(Outcome::Aborted { reason })))));
                    }
                    Some(Entry::Prepared { writes, .. } | Entry::PreCommitted { writes, .. }) => {
                        (std::mem::take(writes), false)
                    }
                    Some(Entry::Active { writes, .. }) if one_phase && !self.config.vote_no => {
                        self.active_count -= 1;
                        (std::mem::take(writes), true)
                    }
                    Some(Entry::Active { .. }) if one_phase => {
                        self.active_count -= 1;
                        let seq = self.finish_logged(out, key, Ended::Aborted, now);
                        let reason = "configured to vote no".to_string();
                        return self
                            .when_synced(seq, Box::new(move || drop(reply.send(Ok(Outcome::Aborted { reason })))));
                    }
                    Some(Entry::Active { .. }) => {
                        // Two-phase commit of a branch that never prepared: a coordinator bug.
                        let reason = "commit of a branch that was never prepared".to_string();
                        let _ = reply.send(Ok(Outcome::Aborted { reason }));
                        return;
                    }
                    None if forgotten || !one_phase => {
                        // No record: forgotten (older than the retention), or never prepared
                        // here. Nothing can prove an outcome.
                        let reason = "this participant has no record of the branch (forgotten after its retention, \
                                      or never prepared here)"
                            .to_string();
                        let _ = reply.send(Ok(Outcome::HeuristicHazard { reason }));
                        return;
                    }
                    None => {
                        let empty = matches!(kind, CommitKind::OnePhase { may_be_empty: true }) && !self.config.vote_no;
                        let (ended, outcome) = match empty {
                            true => (Ended::ReadOnly, Outcome::Committed),
                            false => {
                                (Ended::Aborted, Outcome::Aborted { reason: crate::journaled::NO_RECORD.to_string() })
                            }
                        };
                        let seq = self.finish_logged(out, key, ended, now);
                        return self.when_synced(seq, Box::new(move || drop(reply.send(Ok(outcome)))));
                    }
                };
                // Applied now, in memory: readers see it once the record is on its way; a crash
                // before the sync loses both the record and the memory, consistently.
                let seq = if one_phase_writes && !writes.is_empty() {
                    let payload = CommittedPb {
                        gtid: xid.gtid.as_bytes().to_vec(),
                        branch_id: xid.branch.to_string(),
                        at_ms: now,
                        writes: writes.iter().map(|(k, v)| WritePb { key: k.clone(), value: v.to_vec() }).collect(),
                        read_only: false,
                    };
                    let seq = self.record(out, TYPE_COMMITTED, payload.encode_to_vec().into());
                    self.finish(key, Ended::Committed, seq, now);
                    seq
                } else {
                    // Prepared writes are in the prepare record: the tombstone says it all.
                    self.finish_logged(out, key, Ended::Committed, now)
                };
                self.data.extend(writes);
                self.when_synced(seq, Box::new(move || drop(reply.send(Ok(Outcome::Committed)))));
            }
            Op::Abort { xid, reply } => {
                let key = (xid.gtid, xid.branch.clone());
                match self.branches.get_mut(&key) {
                    Some(Entry::Aborted { seq, reason }) => {
                        let (seq, reason) = (*seq, reason.clone());
                        self.when_synced(seq, Box::new(move || drop(reply.send(Ok(Outcome::Aborted { reason })))));
                    }
                    Some(Entry::ReadOnly { seq }) => {
                        let seq = *seq;
                        let reason = String::new();
                        self.when_synced(seq, Box::new(move || drop(reply.send(Ok(Outcome::Aborted { reason })))));
                    }
                    // Pre-committed: its only way forward is commit (the coordinator records the
                    // answer as a heuristic commit).
                    Some(Entry::PreCommitted { writes, .. }) => {
                        tracing::warn!(%xid, "abort of a pre-committed branch: committing it, its only way forward");
                        let writes = std::mem::take(writes);
                        let seq = self.finish_logged(out, key, Ended::Committed, now);
                        self.data.extend(writes);
                        self.when_synced(seq, Box::new(move || drop(reply.send(Ok(Outcome::Committed)))));
                    }
                    Some(Entry::Committed { seq }) => {
                        let seq = *seq;
                        self.when_synced(seq, Box::new(move || drop(reply.send(Ok(Outcome::Committed)))));
                    }
                    Some(Entry::Active { .. } | Entry::Prepared { .. }) | None => {
                        if matches!(self.branches.get(&key), Some(Entry::Active { .. })) {
                            self.active_count -= 1;
                        }
                        // Recorded: a late Prepare (or Put) of the branch is refused, also after
                        // a restart.
                        let seq = self.finish_logged(out, key, Ended::Aborted, now);
                        let reason = String::new();
                        self.when_synced(seq, Box::new(move || drop(reply.send(Ok(Outcome::Aborted { reason })))));
                    }
                }
            }
            Op::Recover { coordinator_id, query, reply } => {
                let synced = self.synced_seq;
                let mut page = RecoverPage::default();
                let ours = query.resources.is_empty() || query.resources.contains(&self.config.resource);
                let after = query.after.as_ref().filter(|a| a.resource == self.config.resource);
                let past = query.after.as_ref().is_some_and(|a| a.resource > self.config.resource);
                if ours && !past {
                    let from = match after {
                        Some(a) => std::ops::Bound::Excluded((a.gtid, a.branch.clone())),
                        None => std::ops::Bound::Unbounded,
                    };
                    for (gtid, branch) in self.prepared.range((from, std::ops::Bound::Unbounded)) {
                        let Some(
                            Entry::Prepared { coordinator_id: c, prepared_ms, seq, .. }
                            | Entry::PreCommitted { coordinator_id: c, prepared_ms, seq, .. },
                        ) = self.branches.get(&(*gtid, branch.clone()))
                        else {
                            continue;
                        };
                        if *c != coordinator_id || *seq > synced {
                            continue;
                        }
                        if page.branches.len() == query.limit {
                            page.truncated = true;
                            break;
                        }
                        page.branches.push(InDoubt {
                            xid: Xid { resource: self.config.resource.clone(), gtid: *gtid, branch: branch.clone() },
                            metadata: Vec::new(),
                            prepared_unix_ms: *prepared_ms,
                        });
                    }
                }
                let _ = reply.send(page);
            }
            Op::Put { gtid, branch, key, value, reply } => match self.put(out, gtid, branch, key, value, now) {
                // A branch's first write: acknowledged once its Opened record is durable.
                Ok(Some(seq)) => self.when_synced(seq, Box::new(move || drop(reply.send(Ok(()))))),
                done => drop(reply.send(done.map(drop))),
            },
            Op::Read { key, reply } => {
                let _ = reply.send(self.data.get(&key).cloned());
            }
            Op::Status { gtid, branch, reply } => {
                let state = match self.branches.get(&(gtid, branch)) {
                    None => BranchState::Unknown,
                    Some(Entry::Active { .. }) => BranchState::Active,
                    Some(Entry::Prepared { .. }) => BranchState::Prepared,
                    Some(Entry::PreCommitted { .. }) => BranchState::PreCommitted,
                    Some(Entry::Committed { .. } | Entry::ReadOnly { .. }) => BranchState::Committed,
                    Some(Entry::Aborted { .. }) => BranchState::Aborted,
                };
                let _ = reply.send(state);
            }
        }
    }

    /// Stages a write. `Ok(Some(seq))`: the branch's first, to be acknowledged once record
    /// `seq` (its Opened record) is durable.
    fn put(
        &mut self,
        out: &mut Vec<(u64, Submission)>,
        gtid: Gtid,
        branch: BranchId,
        key: String,
        value: Bytes,
        now: u64,
    ) -> Result<Option<u64>, Status> {
        let c = &self.config;
        if key.is_empty() || key.len() > c.max_key_bytes {
            return Err(Status::invalid_argument(format!("key: must be 1 to {} bytes", c.max_key_bytes)));
        }
        if value.len() > c.max_value_bytes {
            return Err(Status::invalid_argument(format!(
                "value: {} bytes exceeds the limit of {} bytes",
                value.len(),
                c.max_value_bytes
            )));
        }
        let k = (gtid, branch);
        match self.branches.get_mut(&k) {
            Some(Entry::Active { writes, .. }) => {
                if writes.len() >= c.max_writes_per_branch {
                    return Err(Status::resource_exhausted(format!(
                        "a branch may stage at most {} writes",
                        c.max_writes_per_branch
                    )));
                }
                let staged: usize = writes.iter().map(|(k, v)| k.len() + v.len()).sum();
                if staged + key.len() + value.len() > c.max_branch_bytes {
                    return Err(Status::resource_exhausted(format!(
                        "a branch may stage at most {} bytes of keys and values ({staged} staged)",
                        c.max_branch_bytes
                    )));
                }
                writes.push((key, value));
                Ok(None)
            }
            Some(other) => Err(Status::failed_precondition(format!(
                "branch is {}; writes are only accepted while it is active",
                match other {
                    Entry::Prepared { .. } => "prepared",
                    Entry::PreCommitted { .. } => "pre-committed",
                    Entry::Committed { .. } | Entry::ReadOnly { .. } => "committed",
                    _ => "aborted (or its work was lost in a restart)",
                }
            ))),
            None => {
                if self.maybe_forgotten(&gtid) {
                    return Err(Status::failed_precondition(
                        "the transaction is older than what this participant remembers: it cannot tell whether the \
                         branch ended already",
                    ));
                }
                if self.active_count >= c.max_active_branches {
                    return Err(Status::resource_exhausted(format!(
                        "{} branches are already active (max_active_branches)",
                        c.max_active_branches
                    )));
                }
                self.active_count += 1;
                self.active.push_back((now, k.0, k.1.clone()));
                // Entries of branches that moved on leave the queue lazily, at their timeout;
                // compact it when they pile up so it stays proportional to the active ones.
                if self.active.len() > 2 * c.max_active_branches.max(1) {
                    let branches = &self.branches;
                    self.active.retain(|(since, g, b)| {
                        matches!(branches.get(&(*g, b.clone())), Some(Entry::Active { since_ms, .. }) if since_ms == since)
                    });
                }
                let opened = OpenedPb { gtid: gtid.as_bytes().to_vec(), branch_id: k.1.to_string(), at_ms: now };
                let seq = self.record(out, TYPE_OPENED, opened.encode_to_vec().into());
                self.branches.insert(k, Entry::Active { writes: vec![(key, value)], since_ms: now });
                Ok(Some(seq))
            }
        }
    }
}

fn prepared() -> Vote {
    Vote::Prepared { metadata: Vec::new() }
}

enum Submission {
    Record(u8, Bytes),
    Checkpoint(Vec<(u8, Bytes)>),
}

type SeqDurable = std::pin::Pin<Box<dyn std::future::Future<Output = (u64, Result<u64, LogError>)> + Send>>;

async fn submit(log: &LogWriter, seq: u64, submission: Submission) -> Result<SeqDurable, LogError> {
    let durable: Durable = match submission {
        Submission::Record(rtype, payload) => log.submit(rtype, payload).await?,
        Submission::Checkpoint(records) => log.submit_checkpoint(records).await?,
    };
    Ok(Box::pin(async move { (seq, durable.await) }))
}

#[cfg(test)]
mod tests;
