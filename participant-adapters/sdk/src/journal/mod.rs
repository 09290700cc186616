//! The branch journal: what a participant must know after a crash to answer every question
//! about a branch truthfully, kept in a `pledge-log` write-ahead log in its data directory.
//!
//! | record | written | synced before | so that after kill -9 |
//! |---|---|---|---|
//! | Opened | first work in a branch | that work is acknowledged | the branch is known to have lost its work: more work and its Prepare are refused |
//! | Prepared (+ vote metadata; three-phase: + wait deadline) | the resource prepared the branch | the vote | the branch is listed by Recover and can be finished; a three-phase one aborts itself at its wait deadline |
//! | PreCommitted (+ do-commit deadline, epoch) | three-phase PreCommit | its answer | the branch commits itself at its deadline, also after a restart |
//! | Epoch | a higher coordinator epoch asks about an undecided three-phase branch | the answer | a PreCommit from a lower epoch is refused |
//! | Committing (+ metadata) | before a one-phase commit is sent to the resource | it is sent | a repeated Commit asks the resource how it ended instead of guessing |
//! | Finished (the answer) | a branch ended | the answer | a repeated request gets the same answer |
//!
//! Every answer is durable before it is given. A branch the journal has no entry for is
//! [`Unrecorded`]: either never seen here, or seen so long ago that its answer was forgotten
//! (see retention below) or by a journal that was lost; the journal tells which, so a caller
//! never mistakes one for the other.
//!
//! **Retention.** Finished branches are remembered for `answer_retention` and at most
//! `max_answers` of them (oldest forgotten first). The journal then remembers only the GTID time
//! up to which it forgot (`forgotten_through_ms`): a question about an unrecorded branch of a
//! transaction begun at or before that time is answered as a heuristic hazard, never guessed.
//! A coordinator asks again only until it has recorded an answer (seconds, unless it is down),
//! so the defaults (two hours, a million answers) leave a wide margin.
//!
//! **Checkpoints.** After `checkpoint_every_records` records, and at least as many as the last
//! checkpoint held, the journal's whole state (open, in-flight and remembered branches) is
//! written as a checkpoint and older segments are deleted, so the log stays within about twice
//! the state.

mod records;

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use pledge_log::{Durable, LogConfig, LogWriter};
use pledge_proto::{Gtid, ResourceId, Xid};
use prost::Message;

pub use records::End;
use records::*;

use crate::{Error, InDoubt, Outcome};

/// Why a branch that did work here and was never prepared is refused after a restart.
pub const LOST_WORK: &str = "its work was lost when the participant restarted";

#[derive(Debug, Clone)]
pub struct JournalConfig {
    /// Directory of the journal's log.
    pub dir: PathBuf,
    /// How long a finished branch's answer is kept.
    pub answer_retention: Duration,
    /// Most finished branches remembered; beyond it the oldest answers are forgotten early
    /// (counted in `pledge_journal_answers_forgotten_total{why="capacity"}`).
    pub max_answers: usize,
    /// Records between checkpoints (at least; see the module docs).
    pub checkpoint_every_records: u64,
    /// Most request ids one branch may take.
    pub max_claims_per_branch: usize,
}

impl JournalConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        JournalConfig {
            dir: dir.into(),
            answer_retention: Duration::from_secs(2 * 3600),
            max_answers: 1_000_000,
            checkpoint_every_records: 100_000,
            max_claims_per_branch: 1_024,
        }
    }
}

/// A three-phase branch's deadline, and the highest coordinator epoch answered about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    /// Unix ms, on this participant's clock.
    pub at_ms: u64,
    pub epoch: u64,
}

/// What the journal holds of one branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Work began in this process; nothing of it is durable at the resource yet.
    Open,
    /// Prepared at the resource, waiting for the decision. `wait`: prepared under three-phase
    /// commit, it aborts itself at this deadline unless pre-committed (or committed) first.
    Prepared { coordinator_id: String, metadata: Bytes, prepared_ms: u64, wait: Option<Deadline> },
    /// Three-phase commit: pre-committed; it commits itself at `docommit` unless told first.
    PreCommitted { coordinator_id: String, metadata: Bytes, prepared_ms: u64, docommit: Deadline },
    /// A one-phase commit was sent (or was about to be): only the resource knows how it ended.
    Committing { coordinator_id: String, metadata: Bytes },
    /// Ended; the answer every later request gets.
    Finished(End),
}

impl State {
    pub fn name(&self) -> &'static str {
        match self {
            State::Open => "active",
            State::Prepared { wait: None, .. } => "prepared (two-phase)",
            State::Prepared { wait: Some(_), .. } => "prepared (three-phase)",
            State::PreCommitted { .. } => "pre-committed",
            State::Committing { .. } => "committing in one phase",
            State::Finished(end) => end.name(),
        }
    }
}

/// What the journal can say of a branch it has no entry for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unrecorded {
    /// Its transaction began after this journal was created and after every answer it forgot:
    /// the branch never did anything here.
    Never,
    /// It may have been here: its answer may have been forgotten (older than the retention), or
    /// it predates this journal (whose data directory may have replaced a lost one).
    MaybeForgotten,
}

/// Why work cannot begin in a branch ([`Journal::open_branch`]).
#[derive(Debug)]
pub enum NotOpened {
    /// The journal holds the branch: it is open already elsewhere, in flight, or finished.
    Known(State),
    /// Its transaction is older than what the journal remembers.
    MaybeForgotten,
    /// The journal failed.
    Journal(Error),
}

/// Why a request id cannot be taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    #[error("request id {request_id:?} was already processed by branch {by}, which committed")]
    Committed { request_id: String, by: Xid },
    #[error("request id {request_id:?} is held by branch {by}, not yet decided; ask again once it is")]
    Undecided { request_id: String, by: Xid },
    #[error("a branch may take at most {max} request ids")]
    TooMany { max: usize },
}

struct Entry {
    state: State,
    at_ms: u64,
    claims: Vec<String>,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<Xid, Entry>,
    /// Prepared (and pre-committed) branches, in Recover's order.
    prepared: BTreeSet<Xid>,
    /// Branches committing in one phase.
    committing: HashSet<Xid>,
    /// Finished branches in finishing order, for retention.
    finished: VecDeque<(u64, Xid)>,
    /// Request id -> the branch that took it.
    claims: HashMap<String, Xid>,
    created_ms: u64,
    forgotten_through_ms: u64,
    records_since_checkpoint: u64,
    last_checkpoint_records: u64,
}

/// See the module documentation. One per process; shared by every resource it serves.
pub struct Journal {
    log: LogWriter,
    /// A tokio mutex, held while a record is queued and the state changed together: the state
    /// and the log's order must agree, or a checkpoint could miss a record queued beside it.
    inner: tokio::sync::Mutex<Inner>,
    config: JournalConfig,
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn journal_error(e: pledge_log::LogError) -> Error {
    Error::new(format!("the branch journal failed: {e}"))
}

impl Journal {
    /// Opens (or creates) the journal in `config.dir` and replays it. Branches whose work began
    /// before this start and were neither prepared nor finished are finished as aborted
    /// ([`LOST_WORK`]): that work died with the previous process.
    pub async fn open(config: JournalConfig) -> anyhow::Result<(Journal, pledge_log::Log)> {
        anyhow::ensure!(!config.answer_retention.is_zero(), "answer_retention must be greater than 0");
        anyhow::ensure!(config.max_answers > 0, "max_answers must be greater than 0");
        anyhow::ensure!(config.checkpoint_every_records > 0, "checkpoint_every_records must be greater than 0");
        let dir = config.dir.clone();
        let (inner, log, new) = tokio::task::spawn_blocking(move || {
            let mut inner = Inner::default();
            let mut new = true;
            let log = pledge_log::open(LogConfig::new(&dir), |record| {
                new &= record.rtype != TYPE_META;
                inner.replay(record.rtype, &record.payload)
            })
            .map_err(|e| anyhow::anyhow!("cannot open the branch journal in {}: {e}", dir.display()))?;
            anyhow::Ok((inner, log, new))
        })
        .await??;
        let journal = Journal { log: log.writer(), inner: tokio::sync::Mutex::new(inner), config };
        let now = now_ms();
        {
            let mut inner = journal.inner.lock().await;
            let lost: Vec<Xid> =
                inner.entries.iter().filter(|(_, e)| e.state == State::Open).map(|(x, _)| x.clone()).collect();
            if !lost.is_empty() {
                tracing::info!(branches = lost.len(), "branches lost their work in the restart; they will vote no");
            }
            for xid in lost {
                inner.finish(xid, End::Outcome(Outcome::Aborted { reason: LOST_WORK.into() }), now);
            }
            if new {
                inner.created_ms = now;
                let meta = MetaPb { created_ms: now, forgotten_through_ms: 0 }.encode_to_vec();
                journal.log.append(TYPE_META, meta).await.map_err(|e| anyhow::anyhow!("{}", journal_error(e)))?;
            }
            let prepared = inner.prepared.len();
            tracing::info!(dir = %journal.config.dir.display(), prepared, remembered = inner.finished.len(), "branch journal opened");
        }
        Ok((journal, log))
    }

    /// What the journal holds of `xid`.
    pub async fn state(&self, xid: &Xid) -> Option<State> {
        self.inner.lock().await.entries.get(xid).map(|e| e.state.clone())
    }

    /// For a branch with no entry: was it never here, or may it have been? See [`Unrecorded`].
    pub async fn unrecorded(&self, gtid: &Gtid) -> Unrecorded {
        self.inner.lock().await.unrecorded(gtid)
    }

    /// Records that work begins in `xid`, if it may: not when the journal holds the branch
    /// already (past taking work, or lost in a restart), nor when it is [`Unrecorded::MaybeForgotten`]
    /// (it may have ended already). The returned future resolves once the record is durable:
    /// acknowledge the work only then.
    pub async fn open_branch(&self, xid: &Xid) -> Result<Durable, NotOpened> {
        let mut inner = self.inner.lock().await;
        if let Some(e) = inner.entries.get(xid) {
            return Err(NotOpened::Known(e.state.clone()));
        }
        if inner.unrecorded(&xid.gtid) == Unrecorded::MaybeForgotten {
            return Err(NotOpened::MaybeForgotten);
        }
        let at_ms = now_ms();
        let record = OpenedPb { xid: Some(xid_pb(xid)), at_ms }.encode_to_vec();
        let durable = self.log.submit(TYPE_OPENED, record).await.map_err(|e| NotOpened::Journal(journal_error(e)))?;
        inner.entries.insert(xid.clone(), Entry { state: State::Open, at_ms, claims: Vec::new() });
        self.maybe_checkpoint(&mut inner).await.map_err(NotOpened::Journal)?;
        Ok(durable)
    }

    /// Records that `xid` is prepared at its resource; returns once that is durable.
    pub async fn prepared(&self, xid: &Xid, coordinator_id: &str, metadata: &[u8]) -> Result<(), Error> {
        self.in_flight(xid, TYPE_PREPARED, coordinator_id, metadata, 0).await.map(drop)
    }

    /// Records that `xid` is prepared at its resource under three-phase commit, waiting at most
    /// `precommit_wait_ms` (> 0) for PreCommit; returns its wait deadline once that is durable.
    pub async fn prepared_three_phase(
        &self,
        xid: &Xid,
        coordinator_id: &str,
        metadata: &[u8],
        precommit_wait_ms: u64,
    ) -> Result<Deadline, Error> {
        assert!(precommit_wait_ms > 0, "a three-phase prepare waits for some time");
        let deadline = self.in_flight(xid, TYPE_PREPARED, coordinator_id, metadata, precommit_wait_ms).await?;
        Ok(deadline.expect("a three-phase prepare has a deadline"))
    }

    /// Records that the three-phase prepared branch `xid` is pre-committed by a coordinator at
    /// `epoch`, to commit itself `docommit_wait_ms` from now; returns its do-commit deadline
    /// once that is durable. The caller has checked the branch (under its slot): prepared under
    /// three-phase commit, its wait deadline not passed, `epoch` not stale.
    pub async fn pre_committed(&self, xid: &Xid, epoch: u64, docommit_wait_ms: u64) -> Result<Deadline, Error> {
        let (durable, docommit) = {
            let mut inner = self.inner.lock().await;
            let Some(Entry {
                state: State::Prepared { coordinator_id, metadata, prepared_ms, wait: Some(wait) }, ..
            }) = inner.entries.get(xid)
            else {
                return Err(Error::new(format!(
                    "participant bug: pre-commit of {xid}, which is not prepared under three-phase commit"
                )));
            };
            let at_ms = now_ms();
            let docommit = Deadline { at_ms: at_ms + docommit_wait_ms, epoch: epoch.max(wait.epoch) };
            let state = State::PreCommitted {
                coordinator_id: coordinator_id.clone(),
                metadata: metadata.clone(),
                prepared_ms: *prepared_ms,
                docommit,
            };
            let record =
                PreCommittedPb { xid: Some(xid_pb(xid)), deadline_ms: docommit.at_ms, epoch: docommit.epoch, at_ms }
                    .encode_to_vec();
            let durable = self.log.submit(TYPE_PRECOMMITTED, record).await.map_err(journal_error)?;
            inner.entries.get_mut(xid).expect("just seen").state = state;
            self.maybe_checkpoint(&mut inner).await?;
            (durable, docommit)
        };
        durable.await.map_err(journal_error)?;
        Ok(docommit)
    }

    /// Records that a coordinator at `epoch` is answered about `xid`, if the branch is an
    /// undecided three-phase one and `epoch` is higher than the one recorded; returns once that
    /// is durable (at once if there is nothing to record).
    pub async fn raise_epoch(&self, xid: &Xid, epoch: u64) -> Result<(), Error> {
        let durable = {
            let mut inner = self.inner.lock().await;
            let recorded = match inner.entries.get(xid).map(|e| &e.state) {
                Some(State::Prepared { wait: Some(d), .. } | State::PreCommitted { docommit: d, .. }) => d.epoch,
                _ => return Ok(()),
            };
            if recorded >= epoch {
                return Ok(());
            }
            let record = EpochPb { xid: Some(xid_pb(xid)), epoch }.encode_to_vec();
            let durable = self.log.submit(TYPE_EPOCH, record).await.map_err(journal_error)?;
            if let Some(State::Prepared { wait: Some(d), .. } | State::PreCommitted { docommit: d, .. }) =
                inner.entries.get_mut(xid).map(|e| &mut e.state)
            {
                d.epoch = epoch;
            }
            self.maybe_checkpoint(&mut inner).await?;
            durable
        };
        durable.await.map(drop).map_err(journal_error)
    }

    /// Forgets the open entry of a branch whose opening failed at its resource, so that it may
    /// be opened again. (Its Opened record stays in the log: after a restart the branch counts
    /// as having lost its work, which is true of a branch that never opened, and harmless.)
    pub async fn discard_open(&self, xid: &Xid) {
        let mut inner = self.inner.lock().await;
        if matches!(inner.entries.get(xid), Some(Entry { state: State::Open, .. })) {
            let entry = inner.entries.remove(xid).expect("just seen");
            for claim in entry.claims {
                inner.claims.remove(&claim);
            }
        }
    }

    /// Records that a one-phase commit of `xid` is about to reach its resource; returns once
    /// that is durable: send it only then.
    pub async fn committing(&self, xid: &Xid, coordinator_id: &str, metadata: &[u8]) -> Result<(), Error> {
        self.in_flight(xid, TYPE_COMMITTING, coordinator_id, metadata, 0).await.map(drop)
    }

    /// Records a Prepared (with `wait_ms` > 0: three-phase, returning its wait deadline) or
    /// Committing branch; returns once that is durable.
    async fn in_flight(
        &self,
        xid: &Xid,
        rtype: u8,
        coordinator_id: &str,
        metadata: &[u8],
        wait_ms: u64,
    ) -> Result<Option<Deadline>, Error> {
        let (durable, wait) = {
            let mut inner = self.inner.lock().await;
            let at_ms = now_ms();
            let wait = (wait_ms > 0).then_some(Deadline { at_ms: at_ms + wait_ms, epoch: 0 });
            let claims = inner.entries.get(xid).map(|e| e.claims.clone()).unwrap_or_default();
            let metadata = Bytes::copy_from_slice(metadata);
            let record = InFlightPb {
                xid: Some(xid_pb(xid)),
                coordinator_id: coordinator_id.to_string(),
                metadata: metadata.clone(),
                at_ms,
                claims: claims.clone(),
                wait_deadline_ms: wait.map_or(0, |w| w.at_ms),
                epoch: 0,
            }
            .encode_to_vec();
            let durable = self.log.submit(rtype, record).await.map_err(journal_error)?;
            let coordinator_id = coordinator_id.to_string();
            let state = if rtype == TYPE_PREPARED {
                inner.prepared.insert(xid.clone());
                State::Prepared { coordinator_id, metadata, prepared_ms: at_ms, wait }
            } else {
                inner.committing.insert(xid.clone());
                State::Committing { coordinator_id, metadata }
            };
            inner.entries.insert(xid.clone(), Entry { state, at_ms, claims });
            self.maybe_checkpoint(&mut inner).await?;
            (durable, wait)
        };
        durable.await.map_err(journal_error)?;
        Ok(wait)
    }

    /// Records how `xid` ended (creating its entry if it has none); returns once that is
    /// durable: give the answer only then. A branch already finished keeps its first answer.
    pub async fn finish(&self, xid: &Xid, end: End) -> Result<(), Error> {
        let durable = {
            let mut inner = self.inner.lock().await;
            if matches!(inner.entries.get(xid), Some(Entry { state: State::Finished(_), .. })) {
                return Ok(());
            }
            let at_ms = now_ms();
            let claims = match inner.entries.get(xid) {
                Some(e) if end.committed() => e.claims.clone(),
                _ => Vec::new(),
            };
            let (code, reason) = end.to_pb();
            let record = FinishedPb { xid: Some(xid_pb(xid)), end: code as i32, reason: reason.into(), at_ms, claims }
                .encode_to_vec();
            let durable = self.log.submit(TYPE_FINISHED, record).await.map_err(journal_error)?;
            inner.finish(xid.clone(), end, at_ms);
            self.maybe_checkpoint(&mut inner).await?;
            durable
        };
        durable.await.map(drop).map_err(journal_error)
    }

    /// Takes `request_id` for the open branch `xid`: `Ok(true)` if newly taken, `Ok(false)` if
    /// this branch holds it already (a retry). Taken ids are written with the branch's Prepared
    /// record and kept while the branch is undecided, or committed and remembered.
    pub async fn claim(&self, xid: &Xid, request_id: &str) -> Result<bool, ClaimError> {
        let mut inner = self.inner.lock().await;
        if let Some(by) = inner.claims.get(request_id) {
            if by == xid {
                return Ok(false);
            }
            let by = by.clone();
            let request_id = request_id.to_string();
            return Err(match inner.entries.get(&by).map(|e| &e.state) {
                Some(State::Finished(_)) => ClaimError::Committed { request_id, by },
                _ => ClaimError::Undecided { request_id, by },
            });
        }
        let max = self.config.max_claims_per_branch;
        let entry = inner.entries.get_mut(xid).expect("claims are taken by open branches");
        if entry.claims.len() >= max {
            return Err(ClaimError::TooMany { max });
        }
        entry.claims.push(request_id.to_string());
        inner.claims.insert(request_id.to_string(), xid.clone());
        Ok(true)
    }

    /// The prepared (and pre-committed) branches of `coordinator_id` at `resource` after
    /// `after`, in order, at most `limit`.
    pub async fn in_doubt(
        &self,
        coordinator_id: &str,
        resource: &ResourceId,
        after: Option<&Xid>,
        limit: usize,
    ) -> Vec<InDoubt> {
        let inner = self.inner.lock().await;
        // The first xid of `resource`: every branch id is at least "-" (the lowest character
        // of the id alphabet), every GTID at least all zeros.
        let first = Xid {
            resource: resource.clone(),
            gtid: Gtid::from_bytes([0; 16]),
            branch: "-".parse().expect("a valid branch id"),
        };
        let from = match after {
            Some(a) if *a >= first => std::ops::Bound::Excluded(a.clone()),
            _ => std::ops::Bound::Included(first),
        };
        inner
            .prepared
            .range((from, std::ops::Bound::Unbounded))
            .take_while(|x| x.resource == *resource)
            .filter_map(|x| match &inner.entries.get(x)?.state {
                State::Prepared { coordinator_id: c, metadata, prepared_ms, .. }
                | State::PreCommitted { coordinator_id: c, metadata, prepared_ms, .. }
                    if c == coordinator_id =>
                {
                    Some(InDoubt { xid: x.clone(), metadata: metadata.to_vec(), prepared_unix_ms: *prepared_ms })
                }
                _ => None,
            })
            .take(limit)
            .collect()
    }

    /// Every branch prepared (pre-committed included) or committing in one phase, with its
    /// metadata: what an adapter must keep for them at its resource when it starts (e.g.
    /// producers it must not restart).
    pub async fn in_flight_branches(&self) -> Vec<(Xid, State)> {
        let inner = self.inner.lock().await;
        let in_flight = inner.prepared.iter().chain(&inner.committing);
        in_flight.filter_map(|x| Some((x.clone(), inner.entries.get(x)?.state.clone()))).collect()
    }

    /// The undecided three-phase branches (prepared with a wait deadline, or pre-committed):
    /// the deadlines a participant arms when it starts.
    pub async fn three_phase_branches(&self) -> Vec<Xid> {
        let inner = self.inner.lock().await;
        let undecided = |x: &&Xid| {
            matches!(
                inner.entries.get(*x).map(|e| &e.state),
                Some(State::Prepared { wait: Some(_), .. } | State::PreCommitted { .. })
            )
        };
        inner.prepared.iter().filter(undecided).cloned().collect()
    }

    /// Forgets answers past their retention (or beyond `max_answers`), and publishes the
    /// journal's gauges. Call periodically.
    pub async fn expire(&self) {
        let now = now_ms();
        let retention = self.config.answer_retention.as_millis() as u64;
        let mut inner = self.inner.lock().await;
        let mut forgotten = [0u64; 2];
        while let Some((at_ms, xid)) = inner.finished.front().cloned() {
            let past_retention = at_ms + retention <= now;
            if !past_retention && inner.finished.len() <= self.config.max_answers {
                break;
            }
            inner.finished.pop_front();
            forgotten[usize::from(!past_retention)] += 1;
            if let Some(entry) = inner.entries.remove(&xid) {
                for claim in entry.claims {
                    inner.claims.remove(&claim);
                }
            }
            inner.forgotten_through_ms = inner.forgotten_through_ms.max(xid.gtid.unix_ms().unwrap_or(0));
        }
        if forgotten[1] > 0 {
            tracing::warn!(
                forgotten = forgotten[1],
                max_answers = self.config.max_answers,
                "answers forgotten before their retention: more branches finished than max_answers holds"
            );
        }
        crate::metrics::journal(&inner.gauges(), forgotten);
    }

    /// A checkpoint after enough records (see the module docs). Queued in order; not awaited:
    /// no answer depends on it.
    async fn maybe_checkpoint(&self, inner: &mut Inner) -> Result<(), Error> {
        inner.records_since_checkpoint += 1;
        if inner.records_since_checkpoint < self.config.checkpoint_every_records.max(inner.last_checkpoint_records) {
            return Ok(());
        }
        inner.records_since_checkpoint = 0;
        let records = inner.snapshot();
        inner.last_checkpoint_records = records.len() as u64;
        drop(self.log.submit_checkpoint(records).await.map_err(journal_error)?);
        Ok(())
    }
}

/// Counts of the journal's branches by state.
pub(crate) struct Gauges {
    pub open: usize,
    pub prepared: usize,
    pub committing: usize,
    pub finished: usize,
}

impl Inner {
    fn unrecorded(&self, gtid: &Gtid) -> Unrecorded {
        match gtid.unix_ms() {
            // Issued in the millisecond the journal was created counts as after it; one issued
            // in the millisecond of a forgotten answer may be that one.
            Some(t) if t >= self.created_ms && t > self.forgotten_through_ms => Unrecorded::Never,
            _ => Unrecorded::MaybeForgotten,
        }
    }

    fn replay(&mut self, rtype: u8, payload: &[u8]) -> Result<(), String> {
        let decode = |e: prost::DecodeError| e.to_string();
        match rtype {
            TYPE_META => {
                let m = MetaPb::decode(payload).map_err(decode)?;
                self.created_ms = m.created_ms;
                self.forgotten_through_ms = self.forgotten_through_ms.max(m.forgotten_through_ms);
            }
            TYPE_OPENED => {
                let r = OpenedPb::decode(payload).map_err(decode)?;
                let xid = xid_of(r.xid)?;
                self.entries.insert(xid, Entry { state: State::Open, at_ms: r.at_ms, claims: Vec::new() });
            }
            TYPE_PREPARED | TYPE_COMMITTING => {
                let r = InFlightPb::decode(payload).map_err(decode)?;
                let xid = xid_of(r.xid)?;
                let state = if rtype == TYPE_PREPARED {
                    self.prepared.insert(xid.clone());
                    let wait =
                        (r.wait_deadline_ms > 0).then_some(Deadline { at_ms: r.wait_deadline_ms, epoch: r.epoch });
                    State::Prepared {
                        coordinator_id: r.coordinator_id,
                        metadata: r.metadata,
                        prepared_ms: r.at_ms,
                        wait,
                    }
                } else {
                    self.committing.insert(xid.clone());
                    State::Committing { coordinator_id: r.coordinator_id, metadata: r.metadata }
                };
                for claim in &r.claims {
                    self.claims.insert(claim.clone(), xid.clone());
                }
                self.entries.insert(xid, Entry { state, at_ms: r.at_ms, claims: r.claims });
            }
            TYPE_PRECOMMITTED => {
                let r = PreCommittedPb::decode(payload).map_err(decode)?;
                let xid = xid_of(r.xid)?;
                let entry = self.entries.get_mut(&xid);
                let Some(Entry { state: State::Prepared { coordinator_id, metadata, prepared_ms, wait }, .. }) = entry
                else {
                    let state = entry.map(|e| e.state.name());
                    return Err(format!("a PreCommitted record of branch {xid}, which is {state:?}, not prepared"));
                };
                let epoch = r.epoch.max(wait.map_or(0, |w| w.epoch));
                let docommit = Deadline { at_ms: r.deadline_ms, epoch };
                let (coordinator_id, metadata, prepared_ms) =
                    (std::mem::take(coordinator_id), std::mem::take(metadata), *prepared_ms);
                self.entries.get_mut(&xid).expect("just seen").state =
                    State::PreCommitted { coordinator_id, metadata, prepared_ms, docommit };
            }
            TYPE_EPOCH => {
                let r = EpochPb::decode(payload).map_err(decode)?;
                let xid = xid_of(r.xid)?;
                // Only undecided three-phase branches keep an epoch; a finished one needs none.
                if let Some(State::Prepared { wait: Some(d), .. } | State::PreCommitted { docommit: d, .. }) =
                    self.entries.get_mut(&xid).map(|e| &mut e.state)
                {
                    d.epoch = d.epoch.max(r.epoch);
                }
            }
            TYPE_FINISHED => {
                let r = FinishedPb::decode(payload).map_err(decode)?;
                let xid = xid_of(r.xid)?;
                let end = End::from_pb(r.end, r.reason)?;
                if matches!(self.entries.get(&xid), Some(Entry { state: State::Finished(_), .. })) {
                    return Ok(());
                }
                // The record lists the request ids the branch keeps (a committed one's).
                if let Some(old) = self.entries.remove(&xid) {
                    for claim in old.claims {
                        self.claims.remove(&claim);
                    }
                }
                for claim in &r.claims {
                    self.claims.insert(claim.clone(), xid.clone());
                }
                self.prepared.remove(&xid);
                self.committing.remove(&xid);
                self.finished.push_back((r.at_ms, xid.clone()));
                self.entries.insert(xid, Entry { state: State::Finished(end), at_ms: r.at_ms, claims: r.claims });
            }
            other => return Err(format!("unknown journal record type {other}")),
        }
        Ok(())
    }

    /// Marks `xid` finished with `end` in memory, releasing its request ids unless it committed.
    fn finish(&mut self, xid: Xid, end: End, at_ms: u64) {
        self.prepared.remove(&xid);
        self.committing.remove(&xid);
        let entry = self.entries.entry(xid.clone()).or_insert(Entry { state: State::Open, at_ms, claims: Vec::new() });
        if matches!(entry.state, State::Finished(_)) {
            return;
        }
        if !end.committed() {
            for claim in std::mem::take(&mut entry.claims) {
                self.claims.remove(&claim);
            }
        }
        entry.state = State::Finished(end);
        entry.at_ms = at_ms;
        self.finished.push_back((at_ms, xid));
    }

    /// The whole state as records: what a checkpoint writes.
    fn snapshot(&self) -> Vec<(u8, Vec<u8>)> {
        let mut records = Vec::with_capacity(self.entries.len() + 1);
        let meta = MetaPb { created_ms: self.created_ms, forgotten_through_ms: self.forgotten_through_ms };
        records.push((TYPE_META, meta.encode_to_vec()));
        for (xid, e) in &self.entries {
            let record = match &e.state {
                State::Open => (TYPE_OPENED, OpenedPb { xid: Some(xid_pb(xid)), at_ms: e.at_ms }.encode_to_vec()),
                State::Prepared { coordinator_id, metadata, .. }
                | State::PreCommitted { coordinator_id, metadata, .. }
                | State::Committing { coordinator_id, metadata } => {
                    let rtype =
                        if matches!(e.state, State::Committing { .. }) { TYPE_COMMITTING } else { TYPE_PREPARED };
                    let wait = match &e.state {
                        State::Prepared { wait: Some(d), .. } => *d,
                        _ => Deadline { at_ms: 0, epoch: 0 },
                    };
                    let pb = InFlightPb {
                        xid: Some(xid_pb(xid)),
                        coordinator_id: coordinator_id.clone(),
                        metadata: metadata.clone(),
                        at_ms: e.at_ms,
                        claims: e.claims.clone(),
                        wait_deadline_ms: wait.at_ms,
                        epoch: wait.epoch,
                    };
                    records.push((rtype, pb.encode_to_vec()));
                    // A pre-committed branch: its Prepared record, then what became of it.
                    let State::PreCommitted { docommit, .. } = &e.state else { continue };
                    let pb = PreCommittedPb {
                        xid: Some(xid_pb(xid)),
                        deadline_ms: docommit.at_ms,
                        epoch: docommit.epoch,
                        at_ms: e.at_ms,
                    };
                    (TYPE_PRECOMMITTED, pb.encode_to_vec())
                }
                State::Finished(_) => continue, // below, in finishing order
            };
            records.push(record);
        }
        for (_, xid) in &self.finished {
            let Some(Entry { state: State::Finished(end), at_ms, claims }) = self.entries.get(xid) else { continue };
            let (code, reason) = end.to_pb();
            let pb = FinishedPb {
                xid: Some(xid_pb(xid)),
                end: code as i32,
                reason: reason.into(),
                at_ms: *at_ms,
                claims: claims.clone(),
            };
            records.push((TYPE_FINISHED, pb.encode_to_vec()));
        }
        records
    }

    /// From the sets the journal keeps anyway (every finished branch is in `finished` once).
    fn gauges(&self) -> Gauges {
        let (prepared, committing, finished) = (self.prepared.len(), self.committing.len(), self.finished.len());
        let open = self.entries.len().saturating_sub(prepared + committing + finished);
        Gauges { open, prepared, committing, finished }
    }
}

#[cfg(test)]
mod tests;
