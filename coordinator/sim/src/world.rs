//! The simulated world: an event queue ordered by simulated time, and the coordinator host,
//! disk, network, participants and clients that its events move.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};

use bytes::Bytes;
use pledge_coordinator::engine::{
    BranchOutcome, Command, Engine, EngineConfig, EngineError, Enlisted, Event, LogRecord, Phase2Op, Phase2Result,
    Protocol, Reply, ReqId, StateResult, SyncToken, TxnState, VoteResult,
};
use pledge_coordinator::records;
use pledge_proto::{BranchKey, Gtid};

use crate::oracle::{Heard, Oracle, Violation};
use crate::participant::{Participant, state_result};

/// Simulated time starts here (Unix ms), so GTIDs and times look real.
const T0: u64 = 1_700_000_000_000;
const RESOURCES: [&str; 3] = ["db1", "db2", "kafka"];
/// How long a participant call may take before the driver gives up on it.
const RPC_TIMEOUT_MS: u64 = 200;
/// How long a client waits for the coordinator's answer.
const CLIENT_TIMEOUT_MS: u64 = 2_000;
const RECOVERY_INTERVAL_MS: u64 = 1_000;
/// After the last transaction, faults stop and the system gets this long to settle.
const SETTLE_MS: u64 = 30_000;
/// How long a client waits before beginning again after RetentionFull.
const RETENTION_FULL_RETRY_MS: u64 = 5_000;
/// A run whose clients have not finished by then is stuck.
const MAX_SIM_MS: u64 = 3_600_000;

/// The size of a run.
#[derive(Debug, Clone)]
pub struct Options {
    pub transactions: usize,
    pub clients: usize,
    /// Print every event (to replay a failing seed).
    pub trace: bool,
    /// The share of transactions that run three-phase commit (0.0..=1.0).
    pub three_phase_share: f64,
    /// Partitions between the coordinator and a participant that outlast three-phase commit's
    /// timeouts: outside its assumption, so branches may end differently, and each such
    /// transaction must then be reported heuristic mixed.
    pub partitions: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options { transactions: 60, clients: 4, trace: false, three_phase_share: 0.5, partitions: false }
    }
}

/// The fault rates of a run, drawn from its seed.
#[derive(Debug, Clone)]
pub struct Faults {
    pub message_loss: f64,
    pub message_duplication: f64,
    pub coordinator_crash_per_ms: f64,
    pub participant_crash_per_ms: f64,
    pub fsync_failure: f64,
    /// A group commit that takes seconds (a stalled disk): a three-phase decision can become
    /// durable after the branches' wait deadlines.
    pub slow_sync: f64,
    pub vote_no: f64,
    /// Partitions (coordinator <-> one participant) per ms; 0 unless `Options::partitions`.
    pub partition_per_ms: f64,
}

impl Faults {
    fn draw(rng: &mut fastrand::Rng) -> Self {
        let pick = |rng: &mut fastrand::Rng, choices: &[f64]| choices[rng.usize(..choices.len())];
        Faults {
            message_loss: pick(rng, &[0.0, 0.01, 0.1]),
            message_duplication: pick(rng, &[0.0, 0.05]),
            coordinator_crash_per_ms: pick(rng, &[0.0, 0.0005, 0.003]),
            participant_crash_per_ms: pick(rng, &[0.0, 0.0005]),
            fsync_failure: pick(rng, &[0.0, 0.01]),
            slow_sync: pick(rng, &[0.0, 0.01]),
            vote_no: pick(rng, &[0.0, 0.1]),
            partition_per_ms: 0.0,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub transactions: usize,
    pub committed: usize,
    pub coordinator_crashes: usize,
    pub participant_crashes: usize,
    pub three_phase: usize,
    /// Three-phase transactions the coordinator reports committed at the end.
    pub three_phase_committed: usize,
    /// Transactions whose branches ended differently (each reported heuristic mixed).
    pub heuristic_mixed: usize,
    pub partitions: usize,
    pub events: u64,
    pub sim_ms: u64,
}

#[derive(Debug, Clone)]
enum Api {
    Begin { key: String, branches: Vec<BranchKey>, protocol: Protocol },
    Commit { gtid: Gtid, wait: bool },
    Abort { gtid: Gtid },
}

#[derive(Debug, Clone)]
enum Msg {
    Prepare { gtid: Gtid, branch: BranchKey, precommit_wait_ms: u64 },
    Commit { gtid: Gtid, branch: BranchKey, one_phase: bool },
    Abort { gtid: Gtid, branch: BranchKey },
    PreCommit { gtid: Gtid, branch: BranchKey, epoch: u64, docommit_wait_ms: u64 },
    QueryState { gtid: Gtid, branch: BranchKey, epoch: u64 },
}

impl Msg {
    fn branch(&self) -> &BranchKey {
        match self {
            Msg::Prepare { branch, .. }
            | Msg::Commit { branch, .. }
            | Msg::Abort { branch, .. }
            | Msg::PreCommit { branch, .. }
            | Msg::QueryState { branch, .. } => branch,
        }
    }
}

#[derive(Debug)]
enum Ev {
    ClientStep(usize),
    ClientTimeout {
        client: usize,
        call: u64,
    },
    /// A client's call reaches the coordinator.
    ApiArrives {
        client: usize,
        call: u64,
        api: Api,
    },
    ApiReply {
        client: usize,
        call: u64,
        reply: Result<Reply, EngineError>,
    },
    /// A coordinator's call reaches a participant.
    MsgArrives {
        incarnation: u64,
        call: u64,
        resource: String,
        msg: Msg,
    },
    /// A participant's answer reaches the coordinator.
    Answer {
        incarnation: u64,
        call: u64,
        event: Event,
    },
    /// The driver's deadline for a participant call.
    CallDeadline {
        incarnation: u64,
        call: u64,
    },
    DiskSync {
        incarnation: u64,
    },
    Tick {
        incarnation: u64,
    },
    Recovery {
        incarnation: u64,
    },
    InDoubt {
        incarnation: u64,
        event: Event,
    },
    CoordinatorCrash,
    CoordinatorRestart,
    ParticipantCrash(String),
    ParticipantRestart(String),
    /// A three-phase deadline of a branch at its participant.
    ParticipantDeadline {
        resource: String,
        gtid: Gtid,
        branch: BranchKey,
    },
    PartitionStart(String),
    PartitionEnd(String),
    Settle,
}

struct Scheduled {
    at: u64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// A record the coordinator appended, not yet synced.
enum Unsynced {
    Record { rtype: u8, payload: Bytes, token: Option<SyncToken> },
    Checkpoint(Vec<(u8, Bytes)>),
}

/// The coordinator process: its engine and what it is waiting for. Replaced on restart.
struct Host {
    engine: Engine,
    incarnation: u64,
    unsynced: Vec<Unsynced>,
    sync_scheduled: bool,
    next_req: ReqId,
    /// Client calls in the engine: request id -> (client, call).
    calls: HashMap<ReqId, (usize, u64)>,
    /// Participant calls in flight: call id -> the event to report if it fails.
    pending: HashMap<u64, Event>,
    tick_at: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
enum Plan {
    Commit,
    Abort,
    Abandon,
}

#[derive(Debug)]
struct ClientTxn {
    key: String,
    branches: Vec<BranchKey>,
    protocol: Protocol,
    plan: Plan,
    gtid: Option<Gtid>,
    worked: bool,
    /// Commit/Abort calls made without an answer yet (retried up to a bound).
    attempts: u32,
    done: bool,
}

struct Client {
    txn: Option<ClientTxn>,
    /// The call waited for, if any.
    waiting: Option<u64>,
}

struct World {
    rng: fastrand::Rng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<Scheduled>>,
    opts: Options,
    faults: Faults,
    cfg: EngineConfig,
    /// The coordinator's durable records (from its newest durable checkpoint on).
    disk: Vec<(u8, Bytes)>,
    host: Option<Host>,
    incarnations: u64,
    participants: BTreeMap<String, Participant>,
    /// Participants the coordinator cannot reach now (and that cannot reach it).
    partitioned: BTreeSet<String>,
    clients: Vec<Client>,
    next_call: u64,
    next_gtid: u64,
    started: usize,
    settling: bool,
    oracle: Oracle,
    report: Report,
    violation: Option<String>,
}

/// Runs one seed. `Err` names the first rule broken.
pub fn run(seed: u64, opts: &Options) -> Result<Report, Violation> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut faults = Faults::draw(&mut rng);
    if opts.partitions {
        faults.partition_per_ms = 0.0002;
    }
    let cfg = engine_config(&mut rng);
    if opts.trace {
        eprintln!("seed {seed}: {faults:?}\n{cfg:?}");
    }
    let mut w = World {
        rng,
        now: T0,
        seq: 0,
        queue: BinaryHeap::new(),
        opts: opts.clone(),
        faults,
        cfg,
        disk: Vec::new(),
        host: None,
        incarnations: 0,
        participants: RESOURCES.iter().map(|r| (r.to_string(), Participant::new())).collect(),
        partitioned: BTreeSet::new(),
        clients: (0..opts.clients).map(|_| Client { txn: None, waiting: None }).collect(),
        next_call: 0,
        next_gtid: 0,
        started: 0,
        settling: false,
        oracle: Oracle::default(),
        report: Report::default(),
        violation: None,
    };
    w.start_coordinator();
    for c in 0..w.clients.len() {
        let d = w.rng.u64(0..50);
        w.at(d, Ev::ClientStep(c));
    }
    w.schedule_faults();
    while let Some(Reverse(s)) = w.queue.pop() {
        w.now = w.now.max(s.at);
        w.report.events += 1;
        if w.opts.trace {
            eprintln!("t={} {:?}", w.now - T0, s.ev);
        }
        if matches!(s.ev, Ev::Settle) {
            break;
        }
        w.step(s.ev);
        if let Some(what) = w.violation.take() {
            return Err(Violation { seed, at_ms: w.now - T0, what });
        }
        if w.now - T0 > MAX_SIM_MS {
            return Err(Violation {
                seed,
                at_ms: w.now - T0,
                what: "the clients did not finish within an hour".into(),
            });
        }
    }
    w.report.sim_ms = w.now - T0;
    w.finish().map_err(|what| Violation { seed, at_ms: w.now - T0, what })?;
    Ok(w.report)
}

/// The engine's settings for a run: small and large values alike, including the edges a
/// configuration may reach (a short retention, a checkpoint after every few records).
fn engine_config(rng: &mut fastrand::Rng) -> EngineConfig {
    let pick = |rng: &mut fastrand::Rng, choices: &[u64]| choices[rng.usize(..choices.len())];
    let retention_ms = pick(rng, &[0, 1_000, 600_000]);
    EngineConfig {
        default_txn_timeout_ms: pick(rng, &[300, 5_000]),
        prepare_timeout_ms: pick(rng, &[150, 1_000]),
        retry_initial_backoff_ms: 10,
        retry_max_backoff_ms: pick(rng, &[50, 500]),
        completed_retention_ms: retention_ms,
        // Small enough that Begin is refused while finished transactions are kept (with a
        // short retention: a long one would only stretch the run).
        max_retained_transactions: if retention_ms <= 1_000 { pick(rng, &[20, 2_000_000]) as usize } else { 2_000_000 },
        checkpoint_every_records: pick(rng, &[3, 50, 200_000]),
        rng_seed: rng.u64(..),
        // Three-phase: well above the prepare round plus the retries a lossy network needs
        // (the bounded delay the protocol assumes), short enough to be reached in a run.
        precommit_wait_ms: 5_000,
        docommit_wait_ms: pick(rng, &[1_000, 3_000]),
        precommit_delivery_ms: RPC_TIMEOUT_MS,
        ..EngineConfig::default()
    }
}

impl World {
    fn at(&mut self, delay_ms: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse(Scheduled { at: self.now + delay_ms, seq: self.seq, ev }));
    }

    fn chance(&mut self, p: f64) -> bool {
        !self.settling && p > 0.0 && self.rng.f64() < p
    }

    fn delay(&mut self) -> u64 {
        self.rng.u64(1..=20)
    }

    fn incarnation(&self) -> Option<u64> {
        self.host.as_ref().map(|h| h.incarnation)
    }

    fn fail(&mut self, what: String) {
        self.violation.get_or_insert(what);
    }

    fn schedule_faults(&mut self) {
        self.crash_later(Ev::CoordinatorCrash, self.faults.coordinator_crash_per_ms);
        for r in RESOURCES {
            self.crash_later(Ev::ParticipantCrash(r.to_string()), self.faults.participant_crash_per_ms);
            self.crash_later(Ev::PartitionStart(r.to_string()), self.faults.partition_per_ms);
        }
    }

    /// Crashes come after an exponentially distributed wait (from the rate), drawn at start
    /// and after each restart.
    fn crash_later(&mut self, crash: Ev, rate_per_ms: f64) {
        if rate_per_ms > 0.0 && !self.settling {
            let wait = (-self.rng.f64().max(1e-9).ln() / rate_per_ms).min(MAX_SIM_MS as f64) as u64;
            self.at(wait.max(1), crash);
        }
    }

    fn step(&mut self, ev: Ev) {
        match ev {
            Ev::ClientStep(c) => self.client_step(c),
            Ev::ClientTimeout { client, call } => {
                if self.clients[client].waiting == Some(call) {
                    // No answer: unknown. The client tries again.
                    self.clients[client].waiting = None;
                    let d = self.delay();
                    self.at(d, Ev::ClientStep(client));
                }
            }
            Ev::ApiArrives { client, call, api } => self.api_arrives(client, call, api),
            Ev::ApiReply { client, call, reply } => self.api_reply(client, call, reply),
            Ev::MsgArrives { incarnation, call, resource, msg } => self.msg_arrives(incarnation, call, resource, msg),
            Ev::Answer { incarnation, call, event } => {
                if self.incarnation() == Some(incarnation)
                    && self.host.as_mut().and_then(|h| h.pending.remove(&call)).is_some()
                {
                    self.engine(event);
                }
            }
            Ev::CallDeadline { incarnation, call } => {
                if self.incarnation() == Some(incarnation)
                    && let Some(failure) = self.host.as_mut().and_then(|h| h.pending.remove(&call))
                {
                    self.engine(failure);
                }
            }
            Ev::DiskSync { incarnation } => self.disk_sync(incarnation),
            Ev::Tick { incarnation } => {
                if let Some(h) = self.host.as_mut().filter(|h| h.incarnation == incarnation) {
                    h.tick_at = None;
                    self.engine(Event::Tick);
                }
            }
            Ev::Recovery { incarnation } => {
                if self.incarnation() != Some(incarnation) {
                    return;
                }
                for r in RESOURCES {
                    if !self.participants[r].up || self.partitioned.contains(r) || self.chance(self.faults.message_loss)
                    {
                        continue;
                    }
                    let branches = self.participants[r].in_doubt();
                    let d = self.delay();
                    let event =
                        Event::InDoubt { resource: r.parse().unwrap(), branches, listed_ms: self.now, confirmed: None };
                    self.at(d, Ev::InDoubt { incarnation, event });
                }
                self.at(RECOVERY_INTERVAL_MS, Ev::Recovery { incarnation });
            }
            Ev::InDoubt { incarnation, event } => {
                if self.incarnation() == Some(incarnation) {
                    self.engine(event);
                }
            }
            Ev::CoordinatorCrash => {
                if self.settling {
                    return;
                }
                self.crash_coordinator();
                let d = self.rng.u64(10..500);
                self.at(d, Ev::CoordinatorRestart);
            }
            Ev::CoordinatorRestart => {
                if self.host.is_none() {
                    self.start_coordinator();
                    self.crash_later(Ev::CoordinatorCrash, self.faults.coordinator_crash_per_ms);
                }
            }
            Ev::ParticipantCrash(r) => {
                if self.settling {
                    return;
                }
                self.report.participant_crashes += 1;
                self.participants.get_mut(&r).unwrap().crash();
                let d = self.rng.u64(10..500);
                self.at(d, Ev::ParticipantRestart(r));
            }
            Ev::ParticipantRestart(r) => {
                self.participants.get_mut(&r).unwrap().restart(self.now);
                self.crash_later(Ev::ParticipantCrash(r), self.faults.participant_crash_per_ms);
            }
            Ev::ParticipantDeadline { resource, gtid, branch } => {
                let p = self.participants.get_mut(&resource).unwrap();
                if p.up {
                    p.deadline(gtid, &branch, self.now);
                }
            }
            Ev::PartitionStart(r) => {
                if self.settling {
                    return;
                }
                self.report.partitions += 1;
                self.partitioned.insert(r.clone());
                // Longer than both of three-phase commit's timeouts: outside its assumption.
                let wait = self.cfg.precommit_wait_ms + self.cfg.docommit_wait_ms;
                let d = self.rng.u64(wait..3 * wait);
                self.at(d, Ev::PartitionEnd(r));
            }
            Ev::PartitionEnd(r) => {
                self.partitioned.remove(&r);
                self.crash_later(Ev::PartitionStart(r), self.faults.partition_per_ms);
            }
            Ev::Settle => {}
        }
    }

    // ---- the coordinator ----

    fn start_coordinator(&mut self) {
        self.incarnations += 1;
        let incarnation = self.incarnations;
        let records = self.disk.iter().map(|(t, p)| records::decode(*t, p).expect("the sim's own records decode"));
        let cfg = EngineConfig { epoch: incarnation, ..self.cfg.clone() };
        let mut engine = Engine::restore(cfg, self.now, records);
        for r in RESOURCES {
            engine.add_configured_participant(r.parse().unwrap(), format!("http://{r}"));
        }
        let mut out = Vec::new();
        engine.start(self.now, &mut out);
        // Every simulated participant supports three-phase commit (the driver's capability
        // probe would say so).
        for r in RESOURCES {
            let (resource, endpoint) = (r.parse().unwrap(), format!("http://{r}"));
            engine.handle(self.now, Event::Capability { resource, endpoint, three_phase: true }, &mut out);
        }
        self.host = Some(Host {
            engine,
            incarnation,
            unsynced: Vec::new(),
            sync_scheduled: false,
            next_req: 0,
            calls: HashMap::new(),
            pending: HashMap::new(),
            tick_at: None,
        });
        self.execute(out);
        self.at(0, Ev::Recovery { incarnation });
    }

    /// kill -9: what was not synced may be lost, from any point on (a random prefix of it
    /// survives: written but unsynced data, or a torn tail the log truncates).
    fn crash_coordinator(&mut self) {
        let Some(mut host) = self.host.take() else { return };
        self.report.coordinator_crashes += 1;
        let keep = self.rng.usize(0..=host.unsynced.len());
        host.unsynced.truncate(keep);
        for u in host.unsynced {
            self.persist(u);
        }
        // Calls in the engine die with it: the clients time out (the outcome is unknown).
    }

    fn persist(&mut self, u: Unsynced) {
        let written: Vec<(u8, Bytes)> = match u {
            Unsynced::Record { rtype, payload, .. } => {
                self.disk.push((rtype, payload.clone()));
                vec![(rtype, payload)]
            }
            Unsynced::Checkpoint(records) => {
                self.disk = records.clone();
                records
            }
        };
        // The oracle learns from the disk when each transaction completed (retention counts
        // from there).
        for (rtype, payload) in written {
            if rtype == records::TYPE_END
                && let Ok(LogRecord::End(e)) = records::decode(rtype, &payload)
            {
                self.oracle.completed(e.gtid, e.completed_ms);
            }
        }
    }

    fn disk_sync(&mut self, incarnation: u64) {
        if self.incarnation() != Some(incarnation) {
            return;
        }
        if self.chance(self.faults.fsync_failure) {
            // A failed fsync ends the process (the log writer aborts; retrying is unsafe).
            self.crash_coordinator();
            let d = self.rng.u64(10..500);
            self.at(d, Ev::CoordinatorRestart);
            return;
        }
        let host = self.host.as_mut().unwrap();
        host.sync_scheduled = false;
        let synced = std::mem::take(&mut host.unsynced);
        let mut tokens = Vec::new();
        for u in synced {
            if let Unsynced::Record { token: Some(t), .. } = &u {
                tokens.push(t.clone());
            }
            self.persist(u);
        }
        for t in tokens {
            self.engine(Event::Synced(t));
        }
    }

    fn engine(&mut self, event: Event) {
        let Some(host) = self.host.as_mut() else { return };
        let mut out = Vec::new();
        host.engine.handle(self.now, event, &mut out);
        self.execute(out);
    }

    fn execute(&mut self, commands: Vec<Command>) {
        let incarnation = self.incarnation().expect("commands come from a running coordinator");
        for command in commands {
            match command {
                Command::Append { record, sync } => {
                    let (rtype, payload) = records::encode(&record);
                    self.unsynced(Unsynced::Record { rtype, payload, token: sync });
                }
                Command::Checkpoint { records } => {
                    let encoded = records.iter().map(records::encode).collect();
                    self.unsynced(Unsynced::Checkpoint(encoded));
                }
                Command::Prepare { gtid, branch, precommit_wait_ms, .. } => {
                    let failure = Event::Voted {
                        gtid,
                        branch: branch.clone(),
                        vote: VoteResult::Failed { error: "deadline exceeded".into() },
                    };
                    self.call(incarnation, failure, Msg::Prepare { gtid, branch, precommit_wait_ms });
                }
                Command::PreCommit { gtid, branch, epoch, docommit_wait_ms, .. } => {
                    let failure = state_failed(gtid, &branch);
                    self.call(incarnation, failure, Msg::PreCommit { gtid, branch, epoch, docommit_wait_ms });
                }
                Command::QueryState { gtid, branch, epoch } => {
                    let failure = state_failed(gtid, &branch);
                    self.call(incarnation, failure, Msg::QueryState { gtid, branch, epoch });
                }
                Command::Commit { gtid, branch, one_phase, .. } => {
                    let failure = retry(gtid, &branch, Phase2Op::Commit);
                    self.call(incarnation, failure, Msg::Commit { gtid, branch, one_phase });
                }
                Command::Abort { gtid, branch, .. } => {
                    let failure = retry(gtid, &branch, Phase2Op::Abort);
                    self.call(incarnation, failure, Msg::Abort { gtid, branch });
                }
                Command::Connect { .. } => {}
                Command::Reply { req, reply } => {
                    let host = self.host.as_mut().unwrap();
                    if let Some((client, call)) = host.calls.remove(&req)
                        && !self.chance(self.faults.message_loss)
                    {
                        let d = self.delay();
                        self.at(d, Ev::ApiReply { client, call, reply });
                    }
                }
            }
        }
        let host = self.host.as_mut().unwrap();
        if let Some(at) = host.engine.next_deadline()
            && host.tick_at.is_none_or(|t| at < t)
        {
            host.tick_at = Some(at);
            let delay = at.saturating_sub(self.now);
            self.at(delay, Ev::Tick { incarnation });
        }
    }

    fn unsynced(&mut self, u: Unsynced) {
        let host = self.host.as_mut().unwrap();
        host.unsynced.push(u);
        if !host.sync_scheduled {
            host.sync_scheduled = true;
            let incarnation = host.incarnation;
            let d = if self.chance(self.faults.slow_sync) { self.rng.u64(2_000..8_000) } else { self.rng.u64(1..=5) };
            self.at(d, Ev::DiskSync { incarnation });
        }
    }

    fn call(&mut self, incarnation: u64, failure: Event, msg: Msg) {
        self.next_call += 1;
        let call = self.next_call;
        let resource = msg.branch().resource.to_string();
        self.host.as_mut().unwrap().pending.insert(call, failure);
        self.at(RPC_TIMEOUT_MS, Ev::CallDeadline { incarnation, call });
        if self.partitioned.contains(&resource) || self.chance(self.faults.message_loss) {
            return;
        }
        let copies = if self.chance(self.faults.message_duplication) { 2 } else { 1 };
        for _ in 0..copies {
            let d = self.delay();
            self.at(d, Ev::MsgArrives { incarnation, call, resource: resource.clone(), msg: msg.clone() });
        }
    }

    fn msg_arrives(&mut self, incarnation: u64, call: u64, resource: String, msg: Msg) {
        let refuse = self.chance(self.faults.vote_no);
        let now = self.now;
        let p = self.participants.get_mut(&resource).unwrap();
        if !p.up || self.partitioned.contains(&resource) {
            return; // the call times out
        }
        let mut deadline = None;
        let event = match msg {
            Msg::Prepare { gtid, branch, precommit_wait_ms } => {
                let vote = p.prepare(gtid, &branch, refuse, precommit_wait_ms, now);
                if precommit_wait_ms > 0 {
                    deadline = Some((precommit_wait_ms, gtid, branch.clone()));
                }
                Event::Voted { gtid, branch, vote }
            }
            Msg::PreCommit { gtid, branch, epoch, docommit_wait_ms } => {
                let state = p.pre_commit(gtid, &branch, epoch, docommit_wait_ms, now);
                deadline = Some((docommit_wait_ms, gtid, branch.clone()));
                Event::BranchState { gtid, branch, result: state_result(state) }
            }
            Msg::QueryState { gtid, branch, epoch } => {
                let state = p.query_state(gtid, &branch, epoch);
                Event::BranchState { gtid, branch, result: state_result(Some(state)) }
            }
            Msg::Commit { gtid, branch, one_phase } => {
                let outcome = p.commit(gtid, &branch, one_phase, refuse);
                Event::Phase2Done { gtid, branch, op: Phase2Op::Commit, result: outcome_result(outcome) }
            }
            Msg::Abort { gtid, branch } => {
                let outcome = p.abort(gtid, &branch);
                Event::Phase2Done { gtid, branch, op: Phase2Op::Abort, result: outcome_result(outcome) }
            }
        };
        if let Some((after_ms, gtid, branch)) = deadline {
            self.at(after_ms, Ev::ParticipantDeadline { resource: resource.clone(), gtid, branch });
        }
        if !self.chance(self.faults.message_loss) && !self.partitioned.contains(&resource) {
            let d = self.delay();
            self.at(d, Ev::Answer { incarnation, call, event });
        }
    }

    // ---- clients ----

    fn client_call(&mut self, client: usize, api: Api) {
        self.next_call += 1;
        let call = self.next_call;
        self.clients[client].waiting = Some(call);
        self.at(CLIENT_TIMEOUT_MS, Ev::ClientTimeout { client, call });
        if !self.chance(self.faults.message_loss) {
            let d = self.delay();
            self.at(d, Ev::ApiArrives { client, call, api });
        }
    }

    fn api_arrives(&mut self, client: usize, call: u64, api: Api) {
        let Some(host) = self.host.as_mut() else { return };
        host.next_req += 1;
        let req = host.next_req;
        host.calls.insert(req, (client, call));
        let event = match api {
            Api::Begin { key, branches, protocol } => {
                self.next_gtid += 1;
                Event::Begin {
                    req,
                    gtid: Gtid::from_parts(self.now, self.next_gtid),
                    timeout_ms: None,
                    idempotency_key: Some(key),
                    branches: branches.into_iter().map(Enlisted::from).collect(),
                    protocol,
                    owner: None,
                }
            }
            Api::Commit { gtid, wait } => Event::Commit { req, gtid, branches: vec![], wait_for_completion: wait },
            Api::Abort { gtid } => Event::Abort { req, gtid },
        };
        self.engine(event);
    }

    fn client_step(&mut self, c: usize) {
        if self.clients[c].waiting.is_some() {
            return;
        }
        let next = match self.clients[c].txn.take() {
            Some(txn) if !txn.done => txn,
            _ => {
                if self.started >= self.opts.transactions {
                    self.maybe_settle();
                    return;
                }
                self.started += 1;
                self.report.transactions += 1;
                let n = self.rng.usize(1..=3);
                let mut branches: Vec<BranchKey> = Vec::new();
                for i in 0..n {
                    let r = RESOURCES[self.rng.usize(..RESOURCES.len())];
                    branches.push(BranchKey::new(r, &format!("b{i}")).unwrap());
                }
                let plan = match self.rng.u32(0..20) {
                    0 => Plan::Abort,
                    1 => Plan::Abandon,
                    _ => Plan::Commit,
                };
                let protocol = if self.rng.f64() < self.opts.three_phase_share {
                    self.report.three_phase += 1;
                    Protocol::ThreePhase
                } else {
                    Protocol::TwoPhase
                };
                ClientTxn {
                    key: format!("c{c}-t{}", self.started),
                    branches,
                    protocol,
                    plan,
                    gtid: None,
                    worked: false,
                    attempts: 0,
                    done: false,
                }
            }
        };
        let mut txn = next;
        match txn.gtid {
            None => {
                let (key, branches, protocol) = (txn.key.clone(), txn.branches.clone(), txn.protocol);
                self.client_call(c, Api::Begin { key, branches, protocol })
            }
            Some(gtid) if !txn.worked => {
                // The client works at each participant directly (no coordinator involved).
                for b in &txn.branches {
                    let p = self.participants.get_mut(b.resource.as_str()).unwrap();
                    if p.up {
                        p.work(gtid, b.clone());
                    } else if txn.plan == Plan::Commit {
                        txn.plan = Plan::Abort;
                    }
                }
                txn.worked = true;
                let d = self.rng.u64(0..100);
                self.at(d, Ev::ClientStep(c));
            }
            Some(gtid) => {
                txn.attempts += 1;
                if txn.attempts > 20 {
                    txn.done = true; // gave up; the oracle still checks what was heard
                } else {
                    match txn.plan {
                        Plan::Commit => {
                            let wait = self.rng.bool();
                            self.client_call(c, Api::Commit { gtid, wait })
                        }
                        Plan::Abort => self.client_call(c, Api::Abort { gtid }),
                        Plan::Abandon => txn.done = true,
                    }
                }
                if txn.done {
                    let d = self.rng.u64(0..50);
                    self.at(d, Ev::ClientStep(c));
                }
            }
        }
        self.clients[c].txn = Some(txn);
    }

    fn api_reply(&mut self, c: usize, call: u64, reply: Result<Reply, EngineError>) {
        if self.clients[c].waiting != Some(call) {
            return; // the client stopped waiting
        }
        self.clients[c].waiting = None;
        let retention = self.cfg.completed_retention_ms;
        let mut txn = self.clients[c].txn.take().expect("a call belongs to a transaction");
        let heard = match reply {
            Ok(Reply::Begun { gtid, .. }) => {
                if txn.gtid.is_some_and(|g| g != gtid) {
                    // A retried Begin after the first GTID was lost in a crash (never logged):
                    // the old transaction is abandoned; work starts over under the new one.
                    txn.worked = false;
                }
                txn.gtid = Some(gtid);
                self.oracle.enlisted.insert(gtid, txn.branches.clone());
                None
            }
            Ok(Reply::CommitOutcome(o)) => {
                txn.done = true;
                if o.committed {
                    self.report.committed += 1;
                }
                Some(if o.committed { Heard::Committed } else { Heard::Aborted })
            }
            Ok(Reply::Aborted) => {
                txn.done = true;
                Some(Heard::Aborted)
            }
            Ok(other) => {
                self.fail(format!("unexpected reply {other:?}"));
                None
            }
            Err(EngineError::UnknownTransaction(_)) => {
                txn.done = true;
                Some(Heard::NoRecord)
            }
            Err(EngineError::OutcomeForgotten(_)) => {
                txn.done = true;
                Some(Heard::Forgotten)
            }
            Err(EngineError::CommitDecided { .. }) if txn.plan == Plan::Abort => {
                // Abort refused: the commit was decided (a retried Abort after a Commit? the
                // sim never sends both) — treat as no claim and stop.
                txn.done = true;
                None
            }
            Err(EngineError::TooManyWaiters { .. }) => None,
            Err(EngineError::RetentionFull { .. }) => {
                // Nothing was begun; the client tries again once older answers may have expired.
                self.clients[c].txn = Some(txn);
                self.at(RETENTION_FULL_RETRY_MS, Ev::ClientStep(c));
                return;
            }
            Err(e) => {
                txn.done = true;
                if !matches!(e, EngineError::AlreadyAborted { .. }) {
                    self.fail(format!("unexpected refusal: {e}"));
                }
                Some(Heard::Aborted)
            }
        };
        if let (Some(heard), Some(gtid)) = (heard, txn.gtid) {
            let call_name = match txn.plan {
                Plan::Abort => "Abort",
                _ => "Commit",
            };
            if let Err(what) = self.oracle.heard(self.now, gtid, heard, call_name, retention) {
                self.fail(what);
            }
        }
        self.clients[c].txn = Some(txn);
        let d = self.delay();
        self.at(d, Ev::ClientStep(c));
    }

    /// Once every transaction has been started and every client is done, faults stop and the
    /// system settles: recovery and retries must then finish everything.
    fn maybe_settle(&mut self) {
        let busy = self.clients.iter().any(|c| c.waiting.is_some() || c.txn.as_ref().is_some_and(|t| !t.done));
        if busy || self.settling {
            return;
        }
        self.settling = true;
        self.partitioned.clear();
        for p in self.participants.values_mut() {
            if !p.up {
                p.restart(self.now);
            }
        }
        if self.host.is_none() {
            self.start_coordinator();
        }
        self.at(SETTLE_MS, Ev::Settle);
    }

    /// After settling: ask the coordinator about every transaction (a Get is an answer like
    /// any other), then check everything.
    fn finish(&mut self) -> Result<(), String> {
        if !self.settling {
            return Err("the run ended before every client finished".into());
        }
        let retention = self.cfg.completed_retention_ms;
        let gtids: Vec<Gtid> = self.oracle.enlisted.keys().copied().collect();
        for gtid in gtids {
            let host = self.host.as_mut().expect("running after settling");
            let mut out = Vec::new();
            host.engine.handle(self.now, Event::Get { req: u64::MAX, gtid }, &mut out);
            let heard = match out.pop() {
                Some(Command::Reply { reply: Ok(Reply::Transaction(view)), .. }) if view.heuristic_mixed => {
                    // Branches ended differently, and the coordinator says so.
                    self.report.heuristic_mixed += 1;
                    self.oracle.reported_mixed.insert(gtid);
                    continue;
                }
                Some(Command::Reply { reply: Ok(Reply::Transaction(view)), .. }) => match view.state {
                    TxnState::Committed if view.protocol == Protocol::ThreePhase && !view.one_phase => {
                        self.report.three_phase_committed += 1;
                        Heard::Committed
                    }
                    TxnState::Committed => Heard::Committed,
                    TxnState::Aborted => Heard::Aborted,
                    other => {
                        // Settled: a transaction still active was abandoned and must have timed out.
                        return Err(format!("{gtid} is still {other} after the system settled"));
                    }
                },
                Some(Command::Reply { reply: Err(EngineError::UnknownTransaction(_)), .. }) => Heard::NoRecord,
                Some(Command::Reply { reply: Err(EngineError::OutcomeForgotten(_)), .. }) => Heard::Forgotten,
                other => return Err(format!("Get {gtid} answered {other:?}")),
            };
            self.oracle.heard(self.now, gtid, heard, "Get", retention)?;
        }
        let host = self.host.as_ref().unwrap();
        if let Some((req, (client, _))) = host.calls.iter().next() {
            return Err(format!("request {req} of client {client} was never answered"));
        }
        self.oracle.check_end(&self.participants)
    }
}

fn retry(gtid: Gtid, branch: &BranchKey, op: Phase2Op) -> Event {
    Event::Phase2Done {
        gtid,
        branch: branch.clone(),
        op,
        result: Phase2Result::Retry { error: "deadline exceeded".into() },
    }
}

fn state_failed(gtid: Gtid, branch: &BranchKey) -> Event {
    Event::BranchState {
        gtid,
        branch: branch.clone(),
        result: StateResult::Failed { error: "deadline exceeded".into() },
    }
}

fn outcome_result(outcome: BranchOutcome) -> Phase2Result {
    Phase2Result::Outcome { outcome, reason: None }
}
