//! The engine driven event by event, asserting the exact commands on every path.

use super::*;

pub(super) const T0: Millis = 1_700_000_000_000;

pub(super) fn key(resource: &str, branch: &str) -> BranchKey {
    BranchKey::new(resource, branch).unwrap()
}

pub(super) fn db1() -> BranchKey {
    key("db1", "b1")
}

pub(super) fn db2() -> BranchKey {
    key("db2", "b1")
}

pub(super) fn gtid(n: u64) -> Gtid {
    Gtid::from_parts(T0, n)
}

pub(super) fn meta(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

/// An engine with two configured participants, a controllable clock and a record of every
/// append (for crash-restart tests).
pub(super) struct Harness {
    pub(super) engine: Engine,
    pub(super) now: Millis,
    pub(super) next_req: ReqId,
    /// Every record appended, with whether it has been reported synced.
    pub(super) appended: Vec<(LogRecord, bool)>,
    /// Appended records waiting for a sync, by index into `appended`.
    pub(super) pending: Vec<(usize, SyncToken)>,
}

impl Harness {
    pub(super) fn new() -> Self {
        Harness::with_config(EngineConfig::default())
    }

    pub(super) fn with_config(cfg: EngineConfig) -> Self {
        let mut engine = Engine::new(cfg);
        for r in ["db1", "db2", "db3"] {
            engine.add_configured_participant(r.parse().unwrap(), format!("http://{r}"));
        }
        Harness { engine, now: T0, next_req: 1, appended: Vec::new(), pending: Vec::new() }
    }

    pub(super) fn restored(cfg: EngineConfig, now: Millis, records: Vec<LogRecord>) -> (Self, Vec<Command>) {
        let mut engine = Engine::restore(cfg, now, records);
        for r in ["db1", "db2", "db3"] {
            engine.add_configured_participant(r.parse().unwrap(), format!("http://{r}"));
        }
        let mut out = Vec::new();
        engine.start(now, &mut out);
        (Harness { engine, now, next_req: 1000, appended: Vec::new(), pending: Vec::new() }, out)
    }

    pub(super) fn ev(&mut self, event: Event) -> Vec<Command> {
        let mut out = Vec::new();
        self.engine.handle(self.now, event, &mut out);
        for c in &out {
            if let Command::Append { record, sync } = c {
                if let Some(token) = sync {
                    self.pending.push((self.appended.len(), token.clone()));
                }
                self.appended.push((record.clone(), false));
            }
        }
        out
    }

    /// Reports every record appended with a sync token as durable (a group commit), and
    /// returns what that produced.
    pub(super) fn sync_all(&mut self) -> Vec<Command> {
        let mut out = Vec::new();
        while !self.pending.is_empty() {
            for (index, token) in std::mem::take(&mut self.pending) {
                self.appended[index].1 = true;
                out.extend(self.ev(Event::Synced(token)));
            }
        }
        out
    }

    pub(super) fn req(&mut self) -> ReqId {
        self.next_req += 1;
        self.next_req
    }

    pub(super) fn begin(&mut self, g: Gtid, branches: Vec<BranchKey>) -> Vec<Command> {
        let req = self.req();
        let branches = branches.into_iter().map(Enlisted::from).collect();
        self.ev(Event::Begin {
            req,
            gtid: g,
            timeout_ms: None,
            idempotency_key: None,
            branches,
            protocol: Protocol::TwoPhase,
            owner: None,
        })
    }

    pub(super) fn commit(&mut self, g: Gtid) -> (ReqId, Vec<Command>) {
        let req = self.req();
        (req, self.ev(Event::Commit { req, gtid: g, branches: vec![], wait_for_completion: false }))
    }

    pub(super) fn vote(&mut self, g: Gtid, b: BranchKey, vote: VoteResult) -> Vec<Command> {
        self.ev(Event::Voted { gtid: g, branch: b, vote })
    }

    pub(super) fn synced(&mut self, g: Gtid) -> Vec<Command> {
        for (record, synced) in &mut self.appended {
            if matches!(record, LogRecord::Commit(c) if c.gtid == g) {
                *synced = true;
            }
        }
        self.pending.retain(|(_, t)| *t != SyncToken::Commit(g));
        self.ev(Event::Synced(SyncToken::Commit(g)))
    }

    pub(super) fn ack(&mut self, g: Gtid, b: BranchKey, op: Phase2Op, outcome: BranchOutcome) -> Vec<Command> {
        self.ev(Event::Phase2Done { gtid: g, branch: b, op, result: Phase2Result::Outcome { outcome, reason: None } })
    }

    pub(super) fn abort_req(&mut self, g: Gtid) -> Result<Reply, EngineError> {
        let req = self.req();
        match self.ev(Event::Abort { req, gtid: g }).pop() {
            Some(Command::Reply { reply, .. }) => reply,
            other => panic!("unexpected {other:?}"),
        }
    }

    pub(super) fn get(&mut self, g: Gtid) -> Result<TxnView, EngineError> {
        let req = self.req();
        match self.ev(Event::Get { req, gtid: g }).pop() {
            Some(Command::Reply { reply: Ok(Reply::Transaction(view)), .. }) => Ok(*view),
            Some(Command::Reply { reply: Err(e), .. }) => Err(e),
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Records a crash would leave: what was synced, plus lazy records (which may or may not
    /// survive; tests choose).
    pub(super) fn synced_records(&self) -> Vec<LogRecord> {
        self.appended.iter().filter(|(_, s)| *s).map(|(r, _)| r.clone()).collect()
    }
}

pub(super) fn committed(req: ReqId, completed: bool) -> Command {
    Command::Reply {
        req,
        reply: Ok(Reply::CommitOutcome(CommitOutcome { committed: true, reason: None, completed, heuristic: false })),
    }
}

pub(super) fn aborted(req: ReqId, reason: &str, completed: bool) -> Command {
    Command::Reply {
        req,
        reply: Ok(Reply::CommitOutcome(CommitOutcome {
            committed: false,
            reason: Some(reason.to_string()),
            completed,
            heuristic: false,
        })),
    }
}

pub(super) fn commit_cmd(g: Gtid, b: BranchKey, m: Bytes) -> Command {
    Command::Commit { gtid: g, branch: b, one_phase: false, metadata: m, may_be_empty: false }
}

pub(super) fn abort_cmd(g: Gtid, b: BranchKey, m: Bytes) -> Command {
    Command::Abort { gtid: g, branch: b, metadata: m }
}

pub(super) fn commit_record(
    g: Gtid,
    created: Millis,
    decided: Millis,
    branches: Vec<(BranchKey, Vote, Bytes)>,
) -> LogRecord {
    LogRecord::Commit(CommitRecord {
        epoch: 0,
        gtid: g,
        created_ms: created,
        decided_ms: decided,
        idempotency_key: None,
        // In these tests every vote arrives at the decision's time.
        branches: branches
            .into_iter()
            .map(|(key, vote, metadata)| {
                let prepared_ms = if vote == Vote::Prepared { decided } else { 0 };
                LoggedBranch { key, vote, metadata, prepared_ms }
            })
            .collect(),
        three_phase: None,
        owner: None,
    })
}

/// Runs a 2-branch transaction up to the point where both votes are in and the commit record
/// is appended, returning the commit request id.
pub(super) fn prepared_two(h: &mut Harness, g: Gtid) -> ReqId {
    h.begin(g, vec![db1(), db2()]);
    let (req, _) = h.commit(g);
    h.vote(g, db1(), VoteResult::Prepared { metadata: meta("m1") });
    h.vote(g, db2(), VoteResult::Prepared { metadata: Bytes::new() });
    req
}

#[test]
fn all_yes_commits_forcing_the_decision_before_phase_two() {
    let mut h = Harness::new();
    let g = gtid(1);
    let out = h.begin(g, vec![db1(), db2()]);
    assert_eq!(
        out,
        vec![Command::Reply { req: 2, reply: Ok(Reply::Begun { gtid: g, existing: false, deadline_ms: T0 + 60_000 }) }]
    );

    h.now += 5;
    let (req, out) = h.commit(g);
    assert_eq!(
        out,
        vec![
            Command::Prepare { gtid: g, branch: db1(), may_be_empty: false, precommit_wait_ms: 0 },
            Command::Prepare { gtid: g, branch: db2(), may_be_empty: false, precommit_wait_ms: 0 }
        ]
    );

    h.now += 1;
    assert_eq!(h.vote(g, db1(), VoteResult::Prepared { metadata: meta("m1") }), vec![]);
    let out = h.vote(g, db2(), VoteResult::Prepared { metadata: Bytes::new() });
    assert_eq!(
        out,
        vec![Command::Append {
            record: commit_record(
                g,
                T0,
                T0 + 6,
                vec![(db1(), Vote::Prepared, meta("m1")), (db2(), Vote::Prepared, Bytes::new())]
            ),
            sync: Some(SyncToken::Commit(g)),
        }]
    );
    // Nobody hears "commit" and the client gets no answer before the record is durable.
    assert_eq!(h.get(g).unwrap().state, TxnState::Preparing);

    let out = h.synced(g);
    assert_eq!(out, vec![commit_cmd(g, db1(), meta("m1")), commit_cmd(g, db2(), Bytes::new()), committed(req, false)]);
    assert_eq!(h.get(g).unwrap().state, TxnState::Committing);

    assert_eq!(h.ack(g, db1(), Phase2Op::Commit, BranchOutcome::Committed), vec![]);
    h.now += 3;
    let out = h.ack(g, db2(), Phase2Op::Commit, BranchOutcome::Committed);
    let [Command::Append { record: LogRecord::End(end), sync: None }] = out.as_slice() else {
        panic!("expected one lazy end record, got {out:?}");
    };
    assert!(end.committed);
    assert_eq!(end.completed_ms, T0 + 9);
    let view = h.get(g).unwrap();
    assert_eq!(view.state, TxnState::Committed);
    assert!(view.branches.iter().all(|b| b.acknowledged && b.outcome == Some(BranchOutcome::Committed)));
    assert_eq!(h.engine.live_transactions(), 0);
}

#[test]
fn one_no_vote_aborts_and_rolls_back_every_branch_but_read_only_ones() {
    let mut h = Harness::new();
    let g = gtid(1);
    h.begin(g, vec![db1(), db2(), key("db3", "x")]);
    let (req, _) = h.commit(g);
    assert_eq!(h.vote(g, db1(), VoteResult::Prepared { metadata: meta("m1") }), vec![]);
    let out = h.vote(g, db2(), VoteResult::Aborted { reason: "unique violation".into() });
    let reason = "branch db2/b1 voted no: unique violation";
    // db1 prepared and db3 has not voted: both are told to roll back; so is db2, which voted
    // no (a participant may have prepared and then failed to say so).
    assert_eq!(
        out,
        vec![
            abort_cmd(g, db1(), meta("m1")),
            abort_cmd(g, db2(), Bytes::new()),
            abort_cmd(g, key("db3", "x"), Bytes::new()),
            aborted(req, reason, false)
        ]
    );
    // Nothing is forced for an abort.
    assert!(h.appended.is_empty());
    // db3's vote arrives late: its abort is already on the way.
    assert_eq!(h.vote(g, key("db3", "x"), VoteResult::Prepared { metadata: Bytes::new() }), vec![]);
    assert_eq!(h.ack(g, db1(), Phase2Op::Abort, BranchOutcome::Aborted), vec![]);
    assert_eq!(h.ack(g, db2(), Phase2Op::Abort, BranchOutcome::Aborted), vec![]);
    let out = h.ack(g, key("db3", "x"), Phase2Op::Abort, BranchOutcome::Aborted);
    assert!(matches!(out.as_slice(), [Command::Append { record: LogRecord::End(e), sync: None }] if !e.committed));
    let view = h.get(g).unwrap();
    assert_eq!(view.state, TxnState::Aborted);
    assert_eq!(view.abort_reason.as_deref(), Some(reason));

    // A retried Commit gets the same answer.
    let (req2, out) = h.commit(g);
    assert_eq!(out, vec![aborted(req2, reason, true)]);
}

#[test]
fn failed_prepare_call_counts_as_no() {
    let mut h = Harness::new();
    let g = gtid(1);
    h.begin(g, vec![db1(), db2()]);
    let (req, _) = h.commit(g);
    let out = h.vote(g, db1(), VoteResult::Failed { error: "connection refused".into() });
    assert_eq!(
        out,
        vec![
            abort_cmd(g, db1(), Bytes::new()),
            abort_cmd(g, db2(), Bytes::new()),
            aborted(req, "prepare of branch db1/b1 failed: connection refused", false),
        ]
    );
}

#[test]
fn active_transaction_times_out_and_is_aborted() {
    let mut h = Harness::new();
    let g = gtid(1);
    let req = h.req();
    h.ev(Event::Begin {
        req,
        gtid: g,
        timeout_ms: Some(1_000),
        idempotency_key: None,
        branches: vec![db1().into()],
        protocol: Protocol::TwoPhase,
        owner: None,
    });
    assert_eq!(h.engine.next_deadline(), Some(T0 + 1_000));
    h.now = T0 + 999;
    assert_eq!(h.ev(Event::Tick), vec![]);
    h.now = T0 + 1_000;
    assert_eq!(h.ev(Event::Tick), vec![abort_cmd(g, db1(), Bytes::new())]);
    assert_eq!(h.get(g).unwrap().abort_reason.as_deref(), Some("transaction timed out after 1000 ms"));
    // Commit after the timeout: refused, and nothing changes.
    let (req, out) = h.commit(g);
    let reason = "transaction timed out after 1000 ms".to_string();
    assert_eq!(out, vec![Command::Reply { req, reply: Err(EngineError::AlreadyAborted { gtid: g, reason }) }]);
    assert_eq!(h.get(g).unwrap().state, TxnState::Aborting);
}

#[test]
fn commit_disarms_the_transaction_timeout() {
    let mut h = Harness::new();
    let g = gtid(1);
    h.begin(g, vec![db1(), db2()]);
    h.commit(g);
    // Only the prepare deadline remains.
    assert_eq!(h.engine.next_deadline(), Some(T0 + 10_000));
}

#[test]
fn prepare_deadline_aborts_and_a_late_vote_after_the_end_is_rolled_back() {
    let mut h = Harness::new();
    let g = gtid(1);
    h.begin(g, vec![db1(), db2()]);
    let (req, _) = h.commit(g);
    h.vote(g, db1(), VoteResult::Prepared { metadata: Bytes::new() });
    h.now = T0 + 10_000;
    let out = h.ev(Event::Tick);
    let reason = "prepare timed out after 10000 ms waiting for db2/b1";
    assert_eq!(
        out,
        vec![abort_cmd(g, db1(), Bytes::new()), abort_cmd(g, db2(), Bytes::new()), aborted(req, reason, false)]
    );
    h.ack(g, db1(), Phase2Op::Abort, BranchOutcome::Aborted);
    h.ack(g, db2(), Phase2Op::Abort, BranchOutcome::Aborted);
    assert_eq!(h.get(g).unwrap().state, TxnState::Aborted);
    // The prepare reached db2 before its abort did and its vote arrives now: roll it back.
    let out = h.vote(g, db2(), VoteResult::Prepared { metadata: meta("late") });
    assert_eq!(out, vec![abort_cmd(g, db2(), meta("late"))]);
}

#[test]
fn duplicate_messages_change_nothing() {
    let mut h = Harness::new();
    let g = gtid(1);
    let req = prepared_two(&mut h, g);
    // Duplicate vote: no second commit record.
    assert_eq!(h.vote(g, db2(), VoteResult::Prepared { metadata: Bytes::new() }), vec![]);
    // A second Commit while the record syncs waits for the same outcome.
    let (req2, out) = h.commit(g);
    assert_eq!(out, vec![]);
    let out = h.synced(g);
    assert_eq!(out[2..], [committed(req, false), committed(req2, false)]);
    // Duplicate sync report: nothing is sent twice.
    assert_eq!(h.ev(Event::Synced(SyncToken::Commit(g))), vec![]);
    h.ack(g, db1(), Phase2Op::Commit, BranchOutcome::Committed);
    assert_eq!(h.ack(g, db1(), Phase2Op::Commit, BranchOutcome::Committed), vec![]);
    // An abort ack for a committing transaction is stale.
    assert_eq!(h.ack(g, db2(), Phase2Op::Abort, BranchOutcome::Aborted), vec![]);
    assert!(!h.get(g).unwrap().branches[1].acknowledged);
    // Abort after the decision is refused.
    let req3 = h.req();
    let out = h.ev(Event::Abort { req: req3, gtid: g });
    assert_eq!(
        out,
        vec![Command::Reply {
            req: req3,
            reply: Err(EngineError::CommitDecided { gtid: g, state: TxnState::Committing })
        }]
    );
}

#[test]
fn commit_waiting_for_completion_answers_after_every_ack() {
    let mut h = Harness::new();
    let g = gtid(1);
    h.begin(g, vec![db1(), db2()]);
    let req = h.req();
    h.ev(Event::Commit { req, gtid: g, branches: vec![], wait_for_completion: true });
    h.vote(g, db1(), VoteResult::Prepared { metadata: Bytes::new() });
    h.vote(g, db2(), VoteResult::Prepared { metadata: Bytes::new() });
    let out = h.synced(g);
    assert_eq!(out.len(), 2, "no reply yet: {out:?}");
    assert_eq!(h.ack(g, db1(), Phase2Op::Commit, BranchOutcome::Committed), vec![]);
    let out = h.ack(g, db2(), Phase2Op::Commit, BranchOutcome::Committed);
    assert_eq!(out.last(), Some(&committed(req, true)));
}

#[test]
fn single_branch_commits_in_one_phase_after_forcing_its_intent() {
    let mut h = Harness::new();
    let g = gtid(1);
    h.begin(g, vec![db1()]);
    let (req, out) = h.commit(g);
    // No prepare round; the decision to ask for a one-phase commit is forced first.
    let [Command::Append { record: LogRecord::OnePhase(o), sync: Some(SyncToken::OnePhase(synced)) }] = out.as_slice()
    else {
        panic!("expected the one-phase intent, got {out:?}");
    };
    assert_eq!((o.gtid, &o.branch, o.may_be_empty, *synced), (g, &db1(), false, g));
    assert_eq!(h.abort_req(g), Err(EngineError::CommitDecided { gtid: g, state: TxnState::Preparing }));
    let out = h.sync_all();
    assert_eq!(
        out,
        vec![Command::Commit { gtid: g, branch: db1(), one_phase: true, metadata: Bytes::new(), may_be_empty: false }]
    );
    let out = h.ack(g, db1(), Phase2Op::Commit, BranchOutcome::Committed);
    // The participant decided; the end record is the coordinator's only record of it, so the
    // client hears the outcome once that record is durable (and a repeated Commit waits too).
    let [Command::Append { record: LogRecord::End(e), sync: Some(SyncToken::End(synced)) }] = out.as_slice() else {
        panic!("expected one synced end record, got {out:?}");
    };
    assert!(e.committed && e.one_phase && *synced == g);
    let (req2, out) = h.commit(g);
    assert_eq!(out, vec![]);
    let out = h.ev(Event::Synced(SyncToken::End(g)));
    assert_eq!(out, vec![committed(req, true), committed(req2, true)]);
    assert!(h.get(g).unwrap().one_phase);
    let (req3, out) = h.commit(g);
    assert_eq!(out, vec![committed(req3, true)]);
}

#[test]
fn one_phase_refusal_aborts_with_the_participants_reason() {
    let mut h = Harness::new();
    let g = gtid(1);
    h.begin(g, vec![db1()]);
    let (req, _) = h.commit(g);
    h.sync_all();
    let out = h.ev(Event::Phase2Done {
        gtid: g,
        branch: db1(),
        op: Phase2Op::Commit,
        result: Phase2Result::Outcome { outcome: BranchOutcome::Aborted, reason: Some("check violation".into()) },
    });
    assert!(matches!(&out[0], Command::Append { record: LogRecord::End(e), sync: Some(_) } if !e.committed));
    let out = h.ev(Event::Synced(SyncToken::End(g)));
    assert_eq!(out, vec![aborted(req, "branch db1/b1 aborted in one-phase commit: check violation", true)]);
}

#[test]
fn read_only_votes_skip_phase_two_and_the_commit_record() {
    let mut h = Harness::new();
    let g = gtid(1);
    h.begin(g, vec![db1(), db2()]);
    let (req, _) = h.commit(g);
    assert_eq!(h.vote(g, db1(), VoteResult::ReadOnly), vec![]);
    let out = h.vote(g, db2(), VoteResult::ReadOnly);
    // No commit record; the End record is the only record of the answer, so it is synced
    // before the client hears "committed".
    let [Command::Append { record: LogRecord::End(e), sync: Some(SyncToken::End(_)) }] = out.as_slice() else {
        panic!("expected a synced end record, got {out:?}");
    };
    assert!(e.committed);
    assert_eq!(h.sync_all(), vec![committed(req, true)]);

    // Mixed: only the prepared branch takes part in phase 2.
    let g = gtid(2);
    h.begin(g, vec![db1(), db2()]);
    h.commit(g);
    h.vote(g, db1(), VoteResult::ReadOnly);
    h.vote(g, db2(), VoteResult::Prepared { metadata: Bytes::new() });
    let out = h.synced(g);
    assert_eq!(out[0], commit_cmd(g, db2(), Bytes::new()));
    assert_eq!(out.len(), 2);
    let out = h.ack(g, db2(), Phase2Op::Commit, BranchOutcome::Committed);
    assert!(matches!(&out[0], Command::Append { record: LogRecord::End(_), .. }));
}

#[test]
fn phase_two_retries_with_growing_jittered_backoff_until_acknowledged() {
    let mut h = Harness::new();
    let g = gtid(1);
    prepared_two(&mut h, g);
    h.synced(g);
    h.ack(g, db2(), Phase2Op::Commit, BranchOutcome::Committed);
    let mut previous_delay = 0;
    for attempt in 1..=8u32 {
        let out = h.ev(Event::Phase2Done {
            gtid: g,
            branch: db1(),
            op: Phase2Op::Commit,
            result: Phase2Result::Retry { error: "unavailable".into() },
        });
        assert_eq!(out, vec![]);
        let due = h.engine.next_deadline().unwrap();
        let delay = due - h.now;
        let nominal = (50u64 << (attempt - 1)).min(10_000);
        assert!(delay >= nominal / 2 && delay <= nominal, "attempt {attempt}: delay {delay} vs {nominal}");
        if nominal < 10_000 {
            assert!(delay >= previous_delay / 2, "backoff must grow");
        }
        previous_delay = delay;
        h.now = due - 1;
        assert_eq!(h.ev(Event::Tick), vec![], "not due yet");
        h.now = due;
        assert_eq!(h.ev(Event::Tick), vec![commit_cmd(g, db1(), meta("m1"))]);
        let view = h.get(g).unwrap();
        assert_eq!(view.branches[0].attempts, attempt);
        assert_eq!(view.branches[0].last_error.as_deref(), Some("unavailable"));
    }
    let out = h.ack(g, db1(), Phase2Op::Commit, BranchOutcome::Committed);
    assert!(matches!(&out[0], Command::Append { record: LogRecord::End(e), .. } if e.committed));
}

#[test]
fn participant_that_rolled_back_a_committed_branch_is_a_heuristic_outcome() {
    let mut h = Harness::new();
    let g = gtid(1);
    prepared_two(&mut h, g);
    h.synced(g);
    h.ack(g, db1(), Phase2Op::Commit, BranchOutcome::Committed);
    let out = h.ack(g, db2(), Phase2Op::Commit, BranchOutcome::Aborted);
    let [Command::Append { record: LogRecord::End(end), .. }] = out.as_slice() else { panic!("{out:?}") };
    assert_eq!(end.branches[1].outcome, Some(BranchOutcome::HeuristicRollback));
    assert_eq!(h.get(g).unwrap().branches[1].outcome, Some(BranchOutcome::HeuristicRollback));
}

#[test]
fn bad_requests_are_refused_and_change_nothing() {
    let mut h = Harness::new();
    let g = gtid(1);
    let unknown = gtid(99);
    let req = h.req();
    let out = h.ev(Event::Enlist { req, gtid: unknown, branches: vec![db1().into()] });
    assert_eq!(out, vec![Command::Reply { req, reply: Err(EngineError::UnknownTransaction(unknown)) }]);

    let req = h.req();
    let out = h.ev(Event::Begin {
        req,
        gtid: g,
        timeout_ms: Some(3_600_001),
        idempotency_key: None,
        branches: vec![],
        protocol: Protocol::TwoPhase,
        owner: None,
    });
    assert_eq!(
        out,
        vec![Command::Reply { req, reply: Err(EngineError::TimeoutTooLong { requested: 3_600_001, max: 3_600_000 }) }]
    );
    assert!(h.get(g).is_err(), "a refused Begin creates nothing");

    h.begin(g, vec![db1()]);
    let req = h.req();
    let out = h.ev(Event::Enlist { req, gtid: g, branches: vec![db2().into(), key("nope", "b").into()] });
    assert_eq!(out, vec![Command::Reply { req, reply: Err(EngineError::UnknownResource("nope".parse().unwrap())) }]);
    assert_eq!(h.get(g).unwrap().branches.len(), 1, "db2 must not have been enlisted");

    let mut h = Harness::with_config(EngineConfig { max_branches_per_transaction: 2, ..EngineConfig::default() });
    h.begin(g, vec![db1(), db2()]);
    let req = h.req();
    let out = h.ev(Event::Enlist { req, gtid: g, branches: vec![db2().into(), key("db3", "z").into()] });
    assert_eq!(out, vec![Command::Reply { req, reply: Err(EngineError::TooManyBranches { count: 3, max: 2 }) }]);
    // Enlisting an enlisted branch again is fine (idempotent).
    let req = h.req();
    assert_eq!(
        h.ev(Event::Enlist { req, gtid: g, branches: vec![db2().into()] }),
        vec![Command::Reply { req, reply: Ok(Reply::Enlisted) }]
    );

    h.commit(g);
    let req = h.req();
    let out = h.ev(Event::Enlist { req, gtid: g, branches: vec![key("db3", "z").into()] });
    assert_eq!(
        out,
        vec![Command::Reply { req, reply: Err(EngineError::NotActive { gtid: g, state: TxnState::Preparing }) }]
    );
}

#[test]
fn live_transactions_are_bounded() {
    let mut h = Harness::with_config(EngineConfig { max_live_transactions: 2, ..EngineConfig::default() });
    h.begin(gtid(1), vec![]);
    h.begin(gtid(2), vec![]);
    let out = h.begin(gtid(3), vec![]);
    assert!(matches!(&out[0], Command::Reply { reply: Err(EngineError::TooManyTransactions { max: 2 }), .. }));
    // Finishing one frees a place.
    h.commit(gtid(1));
    h.sync_all();
    assert!(matches!(&h.begin(gtid(3), vec![])[0], Command::Reply { reply: Ok(Reply::Begun { .. }), .. }));
}

#[test]
fn begin_with_the_same_idempotency_key_returns_the_same_gtid() {
    let mut h = Harness::new();
    let begin = |h: &mut Harness, g: Gtid| {
        let req = h.req();
        h.ev(Event::Begin {
            req,
            gtid: g,
            timeout_ms: None,
            idempotency_key: Some("order-7".into()),
            branches: vec![],
            protocol: Protocol::TwoPhase,
            owner: None,
        })
    };
    let out = begin(&mut h, gtid(1));
    assert!(matches!(&out[0], Command::Reply { reply: Ok(Reply::Begun { existing: false, .. }), .. }));
    let out = begin(&mut h, gtid(2));
    let Command::Reply { reply: Ok(Reply::Begun { gtid: g, existing, .. }), .. } = &out[0] else { panic!() };
    assert_eq!((*g, *existing), (gtid(1), true));
    assert!(h.get(gtid(2)).is_err());
}

/// Authenticated applications: each acts only on what it began, has its own idempotency keys,
/// and is refused alike for another's GTID and an unknown one (for a GTID as old as the
/// forgotten ones: OUT_OF_RANGE, as for anyone).
#[test]
fn an_application_may_act_only_on_its_own_transactions() {
    let mut h = Harness::with_config(EngineConfig { completed_retention_ms: 1_000, ..EngineConfig::default() });
    let (a, b): (Arc<str>, Arc<str>) = ("payments".into(), "reports".into());
    let begin = |h: &mut Harness, g: Gtid, owner: &Arc<str>| {
        let req = h.req();
        let out = h.ev(Event::Begin {
            req,
            gtid: g,
            timeout_ms: None,
            idempotency_key: Some("order-7".into()),
            branches: vec![],
            protocol: Protocol::TwoPhase,
            owner: Some(owner.clone()),
        });
        let [Command::Reply { reply: Ok(Reply::Begun { gtid, existing, .. }), .. }] = out.as_slice() else {
            panic!("{out:?}")
        };
        (*gtid, *existing)
    };
    assert_eq!(begin(&mut h, gtid(1), &a), (gtid(1), false));
    assert_eq!(begin(&mut h, gtid(2), &b), (gtid(2), false), "the same key, another application: its own");
    assert_eq!(begin(&mut h, gtid(3), &a), (gtid(1), true));
    assert_eq!(h.engine.may_act(gtid(1), &a), Ok(()));
    let not_yours = |g| Err(EngineError::NotYours { gtid: g, caller: b.clone() });
    assert_eq!(h.engine.may_act(gtid(1), &b), not_yours(gtid(1)));
    assert_eq!(h.engine.may_act(gtid(9), &b), not_yours(gtid(9)), "unknown: the same answer");
    h.commit(gtid(1));
    h.sync_all();
    h.now = T0 + 1_000;
    h.ev(Event::Tick);
    assert_eq!(h.engine.may_act(gtid(1), &a), Err(EngineError::OutcomeForgotten(gtid(1))));
    assert_eq!(h.engine.may_act(gtid(2), &b), Ok(()), "not finished: kept");
    assert_eq!(h.engine.may_act(gtid(2), &a), Err(EngineError::OutcomeForgotten(gtid(2))), "as old as a forgotten one");
}

#[test]
fn client_abort_tells_every_branch_and_is_idempotent() {
    let mut h = Harness::new();
    let g = gtid(1);
    h.begin(g, vec![db1(), db2()]);
    let req = h.req();
    let out = h.ev(Event::Abort { req, gtid: g });
    assert_eq!(
        out,
        vec![
            abort_cmd(g, db1(), Bytes::new()),
            abort_cmd(g, db2(), Bytes::new()),
            Command::Reply { req, reply: Ok(Reply::Aborted) }
        ]
    );
    let req = h.req();
    assert_eq!(h.ev(Event::Abort { req, gtid: g }), vec![Command::Reply { req, reply: Ok(Reply::Aborted) }]);
}

#[test]
fn finished_transactions_are_forgotten_after_their_retention() {
    let mut h = Harness::with_config(EngineConfig { completed_retention_ms: 1_000, ..EngineConfig::default() });
    let g = gtid(1);
    h.begin(g, vec![]);
    h.commit(g);
    h.sync_all();
    assert_eq!(h.engine.next_deadline(), Some(T0 + 1_000));
    h.now = T0 + 1_000;
    h.ev(Event::Tick);
    assert_eq!(h.get(g), Err(EngineError::OutcomeForgotten(g)));
}

#[test]
fn list_filters_by_state_age_and_doubt() {
    let mut h = Harness::new();
    h.begin(gtid(1), vec![db1(), db2()]);
    h.now += 100;
    h.begin(gtid(2), vec![db1(), db2()]);
    prepared_two(&mut h, gtid(3));
    h.synced(gtid(3));
    let list = |h: &mut Harness, filter: ListFilter| {
        let req = h.req();
        match h.ev(Event::List { req, filter }).pop() {
            Some(Command::Reply { reply: Ok(Reply::List { transactions, truncated }), .. }) => {
                (transactions.iter().map(|t| t.gtid).collect::<Vec<_>>(), truncated)
            }
            other => panic!("{other:?}"),
        }
    };
    let all = ListFilter { limit: 100, ..ListFilter::default() };
    assert_eq!(list(&mut h, all.clone()), (vec![gtid(1), gtid(2), gtid(3)], false));
    assert_eq!(list(&mut h, ListFilter { limit: 2, ..all.clone() }), (vec![gtid(1), gtid(2)], true));
    assert_eq!(list(&mut h, ListFilter { in_doubt: true, ..all.clone() }), (vec![gtid(3)], false));
    assert_eq!(list(&mut h, ListFilter { older_than_ms: 50, ..all.clone() }), (vec![gtid(1)], false));
    assert_eq!(list(&mut h, ListFilter { states: vec![TxnState::Active], ..all }), (vec![gtid(1), gtid(2)], false));
}

#[test]
fn registration_answers_only_once_durable() {
    let mut h = Harness::new();
    let req = h.req();
    let resource: ResourceId = "payments".parse().unwrap();
    let out = h.ev(Event::RegisterParticipant { req, resource: resource.clone(), endpoint: "http://x:1".into() });
    assert_eq!(
        out,
        vec![
            Command::Connect { resource: resource.clone(), endpoint: "http://x:1".into() },
            Command::Append {
                record: LogRecord::Register { resource: resource.clone(), endpoint: "http://x:1".into() },
                sync: Some(SyncToken::Register(req))
            },
        ]
    );
    assert_eq!(
        h.ev(Event::Synced(SyncToken::Register(req))),
        vec![Command::Reply { req, reply: Ok(Reply::Registered) }]
    );
    // Survives a restart through its record.
    let (mut h2, start) =
        Harness::restored(EngineConfig::default(), T0, h.appended.iter().map(|r| r.0.clone()).collect());
    assert!(start.contains(&Command::Connect { resource, endpoint: "http://x:1".into() }));
    let g = gtid(5);
    let out = h2.begin(g, vec![key("payments", "p")]);
    assert!(matches!(&out[0], Command::Reply { reply: Ok(Reply::Begun { .. }), .. }));
}

/// The steps of a committing 2-branch transaction, after each of which the coordinator may
/// crash. Returns the harness after `steps` steps.
fn run_until(steps: usize) -> (Harness, Gtid) {
    let mut h = Harness::new();
    let g = gtid(1);
    let all: [&dyn Fn(&mut Harness); 7] = [
        &|h| drop(h.begin(g, vec![db1(), db2()])),
        &|h| drop(h.commit(g)),
        &|h| drop(h.vote(g, db1(), VoteResult::Prepared { metadata: meta("m1") })),
        &|h| drop(h.vote(g, db2(), VoteResult::Prepared { metadata: Bytes::new() })),
        &|h| drop(h.synced(g)),
        &|h| drop(h.ack(g, db1(), Phase2Op::Commit, BranchOutcome::Committed)),
        &|h| drop(h.ack(g, db2(), Phase2Op::Commit, BranchOutcome::Committed)),
    ];
    for step in &all[..steps] {
        h.now += 1;
        step(&mut h);
    }
    (h, g)
}

#[test]
fn crash_restart_at_every_step_ends_as_the_log_says() {
    for steps in 0..=7 {
        let (h, g) = run_until(steps);
        // Once the client has its answer (step 5, the sync), the commit record must be among
        // the synced records.
        let acknowledged = steps >= 5;
        assert_eq!(h.synced_records().iter().any(|r| matches!(r, LogRecord::Commit(_))), acknowledged);
        // Records not yet synced (the commit record before its sync, the lazy end record) may
        // or may not survive a crash: try both.
        for keep_unsynced in [false, true] {
            let records: Vec<LogRecord> =
                if keep_unsynced { h.appended.iter().map(|(r, _)| r.clone()).collect() } else { h.synced_records() };
            let decision_durable = records.iter().any(|r| matches!(r, LogRecord::Commit(_)));
            let ended = records.iter().any(|r| matches!(r, LogRecord::End(_)));
            let (mut r, start) = Harness::restored(EngineConfig::default(), T0 + 100, records);
            let commits: Vec<&Command> = start.iter().filter(|c| matches!(c, Command::Commit { .. })).collect();
            if decision_durable && !ended {
                // Phase 2 resumes for every branch, with the metadata from the log.
                assert_eq!(
                    commits,
                    vec![&commit_cmd(g, db1(), meta("m1")), &commit_cmd(g, db2(), Bytes::new())],
                    "steps={steps}"
                );
            } else {
                assert!(commits.is_empty(), "steps={steps} keep_unsynced={keep_unsynced}: {start:?}");
            }
            // Each participant reports the branch in doubt (it prepared before the crash).
            for b in [db1(), db2()] {
                let out = r.ev(Event::InDoubt {
                    listed_ms: u64::MAX,
                    confirmed: None,
                    resource: b.resource.clone(),
                    branches: vec![InDoubtBranch { gtid: g, branch: b.clone(), metadata: Bytes::new() }],
                });
                if decision_durable && !ended {
                    // Already being committed (in flight from start): nothing more.
                    assert_eq!(out, vec![], "steps={steps}");
                } else if decision_durable {
                    // Finished according to the log, yet listed: repeat the commit.
                    assert!(matches!(&out[..], [Command::Commit { one_phase: false, .. }]), "steps={steps}");
                } else {
                    // No commit record: presumed abort.
                    assert_eq!(out, vec![abort_cmd(g, b.clone(), Bytes::new())], "steps={steps}");
                }
            }
            match r.get(g) {
                Ok(view) if decision_durable => {
                    let want = if ended { TxnState::Committed } else { TxnState::Committing };
                    assert_eq!(view.state, want, "steps={steps}")
                }
                Err(EngineError::UnknownTransaction(_)) if !decision_durable => {}
                other => panic!("steps={steps}: {other:?}"),
            }
            if decision_durable && !ended {
                r.ack(g, db1(), Phase2Op::Commit, BranchOutcome::Committed);
                r.ack(g, db2(), Phase2Op::Commit, BranchOutcome::Committed);
                assert_eq!(r.get(g).unwrap().state, TxnState::Committed);
            }
        }
    }
}

#[test]
fn unknown_in_doubt_branch_is_presumed_aborted_but_one_being_decided_is_left_alone() {
    let mut h = Harness::new();
    let g = gtid(1);
    h.begin(g, vec![db1(), db2()]);
    h.commit(g);
    h.vote(g, db1(), VoteResult::Prepared { metadata: Bytes::new() });
    // db1 lists its prepared branch while the vote round is still running.
    let out = h.ev(Event::InDoubt {
        listed_ms: u64::MAX,
        confirmed: None,
        resource: "db1".parse().unwrap(),
        branches: vec![
            InDoubtBranch { gtid: g, branch: db1(), metadata: Bytes::new() },
            InDoubtBranch { gtid: gtid(42), branch: db1(), metadata: meta("k") },
            // A participant speaking for another resource is ignored.
            InDoubtBranch { gtid: gtid(43), branch: db2(), metadata: Bytes::new() },
        ],
    });
    assert_eq!(out, vec![abort_cmd(gtid(42), db1(), meta("k"))]);
}

#[test]
fn checkpoint_holds_participants_undecided_commits_and_retained_ends() {
    let cfg = EngineConfig { checkpoint_every_records: 3, ..EngineConfig::default() };
    let g1 = gtid(1);
    let g2 = gtid(2);
    // g1 finishes (commit + end: 2 records); g3 stays active; g2's commit record is the
    // third append and triggers the checkpoint in the same handling.
    let mut h = Harness::with_config(cfg.clone());
    prepared_two(&mut h, g1);
    h.synced(g1);
    h.ack(g1, db1(), Phase2Op::Commit, BranchOutcome::Committed);
    h.ack(g1, db2(), Phase2Op::Commit, BranchOutcome::Committed);
    h.begin(gtid(3), vec![db1()]);
    h.begin(g2, vec![db1(), db2()]);
    h.commit(g2);
    h.vote(g2, db1(), VoteResult::Prepared { metadata: Bytes::new() });
    let out = h.vote(g2, db2(), VoteResult::Prepared { metadata: Bytes::new() });
    let Some(Command::Checkpoint { records }) = out.last() else { panic!("no checkpoint: {out:?}") };
    let kinds: Vec<String> = records
        .iter()
        .map(|r| match r {
            LogRecord::Register { resource, .. } => format!("register {resource}"),
            LogRecord::Commit(c) => format!("commit {}", c.gtid == g2),
            LogRecord::End(e) => format!("end {}", e.gtid == g1),
            LogRecord::OnePhase(o) => format!("one-phase {}", o.gtid),
            LogRecord::PreCommit(c) => format!("pre-commit {}", c.gtid),
            LogRecord::Forgotten { .. } => "forgotten".into(),
            LogRecord::Resolve(r) => format!("resolve {}", r.gtid),
        })
        .collect();
    assert_eq!(kinds, vec!["register db1", "register db2", "register db3", "end true", "commit true"]);
    // Restoring from the checkpoint alone resumes g2 and remembers g1.
    let (mut r, start) = Harness::restored(cfg, T0 + 10, records.clone());
    assert_eq!(start.iter().filter(|c| matches!(c, Command::Commit { gtid, .. } if *gtid == g2)).count(), 2);
    assert_eq!(r.get(g1).unwrap().state, TxnState::Committed);
    assert!(r.get(gtid(3)).is_err());
}

#[test]
fn a_deadline_that_passed_wins_over_an_event_that_arrives_before_the_tick() {
    let mut h = Harness::new();
    let g = gtid(1);
    let req = h.req();
    h.ev(Event::Begin {
        req,
        gtid: g,
        timeout_ms: Some(1_000),
        idempotency_key: None,
        branches: vec![db1().into(), db2().into()],
        protocol: Protocol::TwoPhase,
        owner: None,
    });
    // No tick was delivered at T0+1000; the Commit comes at T0+5000.
    h.now = T0 + 5_000;
    let (req, out) = h.commit(g);
    let reason = "transaction timed out after 1000 ms".to_string();
    assert_eq!(
        out,
        vec![
            abort_cmd(g, db1(), Bytes::new()),
            abort_cmd(g, db2(), Bytes::new()),
            Command::Reply { req, reply: Err(EngineError::AlreadyAborted { gtid: g, reason }) }
        ]
    );
}

#[test]
fn a_forgotten_outcome_is_told_apart_from_an_unknown_transaction_also_after_a_restart() {
    let cfg = EngineConfig { completed_retention_ms: 1_000, checkpoint_every_records: 2, ..EngineConfig::default() };
    let mut h = Harness::with_config(cfg.clone());
    let g = gtid(1);
    h.begin(g, vec![]);
    h.commit(g);
    h.sync_all();
    h.now = T0 + 1_000;
    h.ev(Event::Tick);
    assert_eq!(h.get(g), Err(EngineError::OutcomeForgotten(g)));
    // A GTID issued after the forgotten ones is simply unknown.
    let later = Gtid::from_parts(T0 + 2_000, 1);
    assert_eq!(h.get(later), Err(EngineError::UnknownTransaction(later)));
    // The watermark is part of the next checkpoint, so a restart keeps telling them apart.
    let g2 = gtid(2);
    h.begin(g2, vec![]);
    let (_, mut out) = h.commit(g2);
    out.extend(h.sync_all());
    let Some(Command::Checkpoint { records }) = out.iter().rev().find(|c| matches!(c, Command::Checkpoint { .. }))
    else {
        panic!("no checkpoint: {out:?}")
    };
    let (mut r, _) = Harness::restored(cfg, T0 + 3_000, records.clone());
    assert_eq!(r.get(g), Err(EngineError::OutcomeForgotten(g)));
    assert_eq!(r.get(later), Err(EngineError::UnknownTransaction(later)));
}

#[test]
fn waiting_commit_calls_are_bounded_per_transaction() {
    let mut h = Harness::new();
    let g = gtid(1);
    h.begin(g, vec![db1(), db2()]);
    let mut waiting = Vec::new();
    for _ in 0..MAX_WAITERS_PER_TXN {
        let req = h.req();
        let out = h.ev(Event::Commit { req, gtid: g, branches: vec![], wait_for_completion: true });
        assert!(out.iter().all(|c| !matches!(c, Command::Reply { .. })), "{out:?}");
        waiting.push(req);
    }
    let (req, out) = h.commit(g);
    assert_eq!(
        out,
        vec![Command::Reply { req, reply: Err(EngineError::TooManyWaiters { gtid: g, max: MAX_WAITERS_PER_TXN }) }]
    );
    // Callers that gave up free their places (and are not answered later).
    let gone = waiting.pop().unwrap();
    h.ev(Event::CallersGone(vec![(gone, g)]));
    let req = h.req();
    let out = h.ev(Event::Commit { req, gtid: g, branches: vec![], wait_for_completion: true });
    assert!(out.is_empty(), "a place was free: {out:?}");
    waiting.push(req);

    // Decided, phase 2 under way: a Commit that does not wait is answered at once, however
    // many wait for completion.
    for b in [db1(), db2()] {
        h.vote(g, b, VoteResult::Prepared { metadata: Bytes::new() });
    }
    h.synced(g);
    let req = h.req();
    let out = h.ev(Event::Commit { req, gtid: g, branches: vec![], wait_for_completion: false });
    assert_eq!(out, vec![committed(req, false)]);
    let req = h.req();
    let out = h.ev(Event::Commit { req, gtid: g, branches: vec![], wait_for_completion: true });
    assert_eq!(
        out,
        vec![Command::Reply { req, reply: Err(EngineError::TooManyWaiters { gtid: g, max: MAX_WAITERS_PER_TXN }) }]
    );

    // Completion answers exactly the callers still waiting.
    let mut out = h.ack(g, db1(), Phase2Op::Commit, BranchOutcome::Committed);
    out.extend(h.ack(g, db2(), Phase2Op::Commit, BranchOutcome::Committed));
    let mut answered: Vec<ReqId> =
        out.iter().filter_map(|c| if let Command::Reply { req, .. } = c { Some(*req) } else { None }).collect();
    answered.sort();
    waiting.sort();
    assert_eq!(answered, waiting);
    assert!(!answered.contains(&gone));
}

#[test]
fn a_heuristic_outcome_is_flagged_to_the_waiting_client_and_in_list() {
    let mut h = Harness::new();
    let g = gtid(1);
    h.begin(g, vec![db1(), db2()]);
    let req = h.req();
    h.ev(Event::Commit { req, gtid: g, branches: vec![], wait_for_completion: true });
    h.vote(g, db1(), VoteResult::Prepared { metadata: Bytes::new() });
    h.vote(g, db2(), VoteResult::Prepared { metadata: Bytes::new() });
    h.synced(g);
    h.ack(g, db1(), Phase2Op::Commit, BranchOutcome::Committed);
    let out = h.ack(g, db2(), Phase2Op::Commit, BranchOutcome::HeuristicHazard);
    let want = CommitOutcome { committed: true, reason: None, completed: true, heuristic: true };
    assert_eq!(out.last(), Some(&Command::Reply { req, reply: Ok(Reply::CommitOutcome(want)) }));
    assert!(h.get(g).unwrap().heuristic);
    let req = h.req();
    let out = h.ev(Event::List { req, filter: ListFilter { heuristic: true, limit: 10, ..ListFilter::default() } });
    assert!(
        matches!(&out[0], Command::Reply { reply: Ok(Reply::List { transactions, .. }), .. } if transactions.len() == 1)
    );
}

#[test]
fn in_doubt_reports_of_a_committing_transaction_resend_or_repeat_the_commit() {
    let mut h = Harness::new();
    let g = gtid(1);
    prepared_two(&mut h, g);
    h.synced(g);
    h.ack(g, db1(), Phase2Op::Commit, BranchOutcome::Committed);
    // db2's commit failed and waits for its backoff; a scan lists both branches.
    h.ev(Event::Phase2Done {
        gtid: g,
        branch: db2(),
        op: Phase2Op::Commit,
        result: Phase2Result::Retry { error: "unavailable".into() },
    });
    for b in [db1(), db2()] {
        let out = h.ev(Event::InDoubt {
            listed_ms: u64::MAX,
            confirmed: None,
            resource: b.resource.clone(),
            branches: vec![InDoubtBranch { gtid: g, branch: b.clone(), metadata: Bytes::new() }],
        });
        let metadata = if b == db1() { meta("m1") } else { Bytes::new() };
        // db2: sent now instead of after the backoff; db1: acknowledged yet still listed, so
        // the outcome is repeated.
        assert_eq!(out, vec![commit_cmd(g, b.clone(), metadata)], "{b}");
    }
    // db2's commit is in flight now: a second listing sends nothing more.
    let out = h.ev(Event::InDoubt {
        listed_ms: u64::MAX,
        confirmed: None,
        resource: db2().resource.clone(),
        branches: vec![InDoubtBranch { gtid: g, branch: db2(), metadata: Bytes::new() }],
    });
    assert_eq!(out, vec![]);
}

/// The gauges count unfinished transactions by state, and measure how long the oldest decided
/// but unfinished one has waited for its participants.
#[test]
fn gauges_count_live_transactions_and_age_the_oldest_decision() {
    let mut h = Harness::new();
    assert_eq!(h.engine.gauges(h.now), Gauges::default());
    let (open, deciding, preparing) = (gtid(1), gtid(2), gtid(3));
    h.begin(open, vec![db1()]);
    h.begin(deciding, vec![db1(), db2()]);
    h.begin(preparing, vec![db1(), db2()]);
    h.commit(deciding);
    h.commit(preparing);
    h.vote(deciding, db1(), VoteResult::Prepared { metadata: Bytes::new() });
    h.vote(deciding, db2(), VoteResult::Prepared { metadata: Bytes::new() });
    // The commit record is on its way to disk: still deciding (shown as preparing).
    let g = h.engine.gauges(h.now);
    assert_eq!((g.active, g.preparing, g.committing, g.aborting, g.oldest_in_doubt_ms), (1, 2, 0, 0, 0));

    h.synced(deciding);
    h.now += 1_500;
    h.ack(deciding, db1(), Phase2Op::Commit, BranchOutcome::Committed);
    h.ev(Event::Tick);
    // Decided 1.5 s ago, db2 has not acknowledged.
    let g = h.engine.gauges(h.now);
    assert_eq!((g.active, g.preparing, g.committing, g.oldest_in_doubt_ms), (1, 1, 1, 1_500));

    let aborted_later = gtid(4);
    h.begin(aborted_later, vec![key("db3", "b1")]);
    h.ev(Event::Abort { req: 77, gtid: aborted_later });
    let g = h.engine.gauges(h.now);
    // The older decision is the one shown.
    assert_eq!((g.aborting, g.oldest_in_doubt_ms), (1, 1_500));

    h.ack(deciding, db2(), Phase2Op::Commit, BranchOutcome::Committed);
    h.ack(aborted_later, key("db3", "b1"), Phase2Op::Abort, BranchOutcome::Aborted);
    let g = h.engine.gauges(h.now);
    assert_eq!((g.active, g.preparing, g.committing, g.aborting, g.oldest_in_doubt_ms), (1, 1, 0, 0, 0));
}

/// The engine's counters: a Begin repeated with its idempotency key counts once, each abort
/// counts under its cause, finished transactions under their outcome, and transactions rebuilt
/// from the log after a restart are not counted again.
#[test]
fn counters_count_each_transaction_once_and_aborts_by_cause() {
    let recorder = pledge_proto::metrics::recorder();
    let handle = recorder.handle();
    let _local = ::metrics::set_default_local_recorder(&recorder);
    let value = |series: &str| -> f64 {
        let text = handle.render();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
    };
    let mut h = Harness::new();

    // Begun twice with one key: one transaction. Then aborted by its timeout.
    let (g1, g1_again) = (gtid(1), gtid(2));
    for (req, g) in [(101, g1), (102, g1_again)] {
        let key = Some("order-7".to_string());
        h.ev(Event::Begin {
            req,
            gtid: g,
            timeout_ms: Some(1_000),
            idempotency_key: key,
            branches: vec![db1().into()],
            protocol: Protocol::TwoPhase,
            owner: None,
        });
    }
    h.now += 1_000;
    h.ev(Event::Tick);
    h.ack(g1, db1(), Phase2Op::Abort, BranchOutcome::Aborted);
    // Prepare deadline passed.
    let g2 = gtid(3);
    h.begin(g2, vec![db1(), db2()]);
    h.commit(g2);
    h.vote(g2, db1(), VoteResult::Prepared { metadata: Bytes::new() });
    h.now += EngineConfig::default().prepare_timeout_ms;
    h.ev(Event::Tick);
    // Refused in a one-phase commit.
    let g3 = gtid(4);
    h.begin(g3, vec![db2()]);
    h.commit(g3);
    h.sync_all();
    let refused = Phase2Result::Outcome { outcome: BranchOutcome::Aborted, reason: None };
    h.ev(Event::Phase2Done { gtid: g3, branch: db2(), op: Phase2Op::Commit, result: refused });
    // Committed, the commit record synced but one branch not yet acknowledged.
    let g4 = gtid(5);
    h.begin(g4, vec![db1(), db2()]);
    h.commit(g4);
    h.vote(g4, db1(), VoteResult::Prepared { metadata: Bytes::new() });
    h.vote(g4, db2(), VoteResult::Prepared { metadata: Bytes::new() });
    h.synced(g4);
    h.ack(g4, db1(), Phase2Op::Commit, BranchOutcome::Committed);

    assert_eq!(value("pledge_transactions_begun_total"), 4.0);
    assert_eq!(value(r#"pledge_transaction_aborts_total{cause="timeout"}"#), 1.0);
    assert_eq!(value(r#"pledge_transaction_aborts_total{cause="prepare_timeout"}"#), 1.0);
    assert_eq!(value(r#"pledge_transaction_aborts_total{cause="one_phase"}"#), 1.0);
    // g1 and g3 finished; g2 waits for its branches' abort acknowledgements, g4 for db2.
    assert_eq!(value(r#"pledge_transactions_finished_total{outcome="aborted"}"#), 2.0);
    assert!(!handle.render().contains(r#"outcome="committed""#));

    // After a restart the committed transaction is rebuilt from its record and finishes; it
    // is not begun again.
    let (mut h, _) = Harness::restored(EngineConfig::default(), h.now, h.synced_records());
    h.ack(g4, db2(), Phase2Op::Commit, BranchOutcome::Committed);
    h.ack(g4, db1(), Phase2Op::Commit, BranchOutcome::Committed);
    assert_eq!(value("pledge_transactions_begun_total"), 4.0);
    assert_eq!(value(r#"pledge_transactions_finished_total{outcome="committed"}"#), 1.0);
}

#[test]
fn participants_are_bounded_but_a_known_one_may_move() {
    let mut h = Harness::new();
    let mut registered = h.engine.cx.participants.len();
    while registered < MAX_PARTICIPANTS {
        let req = h.req();
        let resource: ResourceId = format!("r{registered}").parse().unwrap();
        h.ev(Event::RegisterParticipant { req, resource, endpoint: "http://x:1".into() });
        registered += 1;
    }
    let req = h.req();
    let out =
        h.ev(Event::RegisterParticipant { req, resource: "one-more".parse().unwrap(), endpoint: "http://x:1".into() });
    assert_eq!(
        out,
        vec![Command::Reply { req, reply: Err(EngineError::TooManyParticipants { max: MAX_PARTICIPANTS }) }]
    );
    // A known participant moving to a new endpoint is no new participant.
    let req = h.req();
    let out =
        h.ev(Event::RegisterParticipant { req, resource: "db1".parse().unwrap(), endpoint: "http://db1:2".into() });
    assert!(
        out.iter().any(|c| matches!(c, Command::Connect { endpoint, .. } if endpoint == "http://db1:2")),
        "{out:?}"
    );
}

/// A branch enlisted as possibly empty carries the flag to its participant, in Prepare and in
/// a one-phase Commit (retries included); enlisting it again the other way is refused and
/// changes nothing.
#[test]
fn a_branch_declared_possibly_empty_says_so_to_its_participant() {
    let maybe = |k: BranchKey| Enlisted { key: k, may_be_empty: true };
    let mut h = Harness::new();
    let g = gtid(1);
    let req = h.req();
    h.ev(Event::Begin {
        req,
        gtid: g,
        timeout_ms: None,
        idempotency_key: None,
        branches: vec![maybe(db1()), db2().into()],
        protocol: Protocol::TwoPhase,
        owner: None,
    });
    let req = h.req();
    let out = h.ev(Event::Enlist { req, gtid: g, branches: vec![db2().into(), db1().into()] });
    assert_eq!(
        out,
        vec![Command::Reply { req, reply: Err(EngineError::EnlistConflict { branch: db1(), may_be_empty: true }) }]
    );
    let req = h.req();
    assert_eq!(
        h.ev(Event::Enlist { req, gtid: g, branches: vec![maybe(db1())] }),
        vec![Command::Reply { req, reply: Ok(Reply::Enlisted) }],
        "the same enlistment again is fine"
    );
    let flags: Vec<bool> = h.get(g).unwrap().branches.iter().map(|b| b.may_be_empty).collect();
    assert_eq!(flags, vec![true, false]);
    let (_, out) = h.commit(g);
    assert_eq!(
        out,
        vec![
            Command::Prepare { gtid: g, branch: db1(), may_be_empty: true, precommit_wait_ms: 0 },
            Command::Prepare { gtid: g, branch: db2(), may_be_empty: false, precommit_wait_ms: 0 },
        ]
    );

    // One phase: the commit, and its retry.
    let g = gtid(2);
    let req = h.req();
    h.ev(Event::Begin {
        req,
        gtid: g,
        timeout_ms: None,
        idempotency_key: None,
        branches: vec![maybe(db1())],
        protocol: Protocol::TwoPhase,
        owner: None,
    });
    let one_phase =
        Command::Commit { gtid: g, branch: db1(), one_phase: true, metadata: Bytes::new(), may_be_empty: true };
    h.commit(g);
    assert_eq!(h.sync_all(), vec![one_phase.clone()]);
    let retry = Phase2Result::Retry { error: "unavailable".into() };
    h.ev(Event::Phase2Done { gtid: g, branch: db1(), op: Phase2Op::Commit, result: retry });
    h.now += 60_000;
    assert!(h.ev(Event::Tick).contains(&one_phase), "the retry says so too");
}

// ---- issue 12 findings, written against the old engine first ----

#[test]
fn finding1_a_one_phase_commit_is_never_reported_aborted_after_a_crash() {
    let mut h = Harness::new();
    let g = gtid(1);
    h.begin(g, vec![db1()]);
    let (_, mut out) = h.commit(g);
    out.extend(h.sync_all());
    let sent = Command::Commit { gtid: g, branch: db1(), one_phase: true, metadata: Bytes::new(), may_be_empty: false };
    assert!(out.contains(&sent));
    // The participant committed; the coordinator crashes before the End record is durable.
    let (mut r, start) = Harness::restored(EngineConfig::default(), T0 + 100, h.synced_records());
    match r.get(g) {
        Ok(view) => assert_eq!(view.state, TxnState::Preparing),
        Err(e) => panic!("after a crash the one-phase commit is reported as {e}"),
    }
    // The commit is asked again; the participant answers from its record, and the retried
    // Commit hears that answer.
    assert!(start.contains(&sent), "{start:?}");
    let (req, _) = r.commit(g);
    r.ack(g, db1(), Phase2Op::Commit, BranchOutcome::Committed);
    assert_eq!(r.sync_all(), vec![committed(req, true)]);
}

#[test]
fn finding1_a_read_only_commit_answer_survives_a_crash() {
    let mut h = Harness::new();
    let g = gtid(1);
    h.begin(g, vec![db1(), db2()]);
    let (req, _) = h.commit(g);
    h.vote(g, db1(), VoteResult::ReadOnly);
    let out = h.vote(g, db2(), VoteResult::ReadOnly);
    let answered = out.contains(&committed(req, true));
    let (mut r, _) = Harness::restored(EngineConfig::default(), T0 + 100, h.synced_records());
    if answered {
        assert_eq!(r.get(g).map(|v| v.state), Ok(TxnState::Committed), "the client heard committed");
    }
}

#[test]
fn finding3_zero_retention_still_answers_a_one_phase_commit() {
    let mut h = Harness::with_config(EngineConfig { completed_retention_ms: 0, ..EngineConfig::default() });
    let g = gtid(1);
    h.begin(g, vec![db1()]);
    let (req, _) = h.commit(g);
    h.sync_all();
    let mut out = h.ack(g, db1(), Phase2Op::Commit, BranchOutcome::Committed);
    for _ in 0..3 {
        let syncs: Vec<SyncToken> = out
            .iter()
            .filter_map(|c| match c {
                Command::Append { sync: Some(t), .. } => Some(t.clone()),
                _ => None,
            })
            .collect();
        if out.contains(&committed(req, true)) {
            return;
        }
        out = syncs.into_iter().flat_map(|t| h.ev(Event::Synced(t))).collect();
    }
    panic!("the Commit call was never answered");
}

#[test]
fn finding6_heuristic_outcomes_outlive_the_retention() {
    let mut h = Harness::with_config(EngineConfig { completed_retention_ms: 1_000, ..EngineConfig::default() });
    let g = gtid(1);
    prepared_two(&mut h, g);
    h.synced(g);
    h.ack(g, db1(), Phase2Op::Commit, BranchOutcome::Committed);
    h.ack(g, db2(), Phase2Op::Commit, BranchOutcome::HeuristicMixed);
    h.now += 10_000_000;
    h.ev(Event::Tick);
    assert!(h.get(g).expect("a heuristic outcome is kept until an operator acts").heuristic);
}

#[test]
fn finding2_retention_is_a_time_load_cannot_shrink_and_a_full_one_refuses_begin() {
    let cfg = EngineConfig { completed_retention_ms: 10_000, max_retained_transactions: 2, ..EngineConfig::default() };
    let mut h = Harness::with_config(cfg);
    for n in 1..=2 {
        h.begin(gtid(n), vec![]);
        h.commit(gtid(n));
        h.sync_all();
    }
    // A third would exceed the bound: Begin is refused, and both answers are still there.
    let out = h.begin(gtid(3), vec![]);
    assert!(
        matches!(
            &out[0],
            Command::Reply {
                reply: Err(EngineError::RetentionFull { max: 2, retention_ms: 10_000, heuristic: 0 }),
                ..
            }
        ),
        "{out:?}"
    );
    assert_eq!(h.get(gtid(1)).unwrap().state, TxnState::Committed);
    assert_eq!(h.engine.gauges(h.now).retained, 2);
    // Once their time is up they go, and Begin works again.
    h.now += 10_000;
    h.ev(Event::Tick);
    assert_eq!(h.get(gtid(1)), Err(EngineError::OutcomeForgotten(gtid(1))));
    assert!(matches!(&h.begin(gtid(3), vec![])[0], Command::Reply { reply: Ok(Reply::Begun { .. }), .. }));
}

#[test]
fn finding6_a_heuristic_outcome_is_kept_across_restarts_and_counted() {
    let cfg = EngineConfig { completed_retention_ms: 1_000, checkpoint_every_records: 3, ..EngineConfig::default() };
    let mut h = Harness::with_config(cfg.clone());
    let g = gtid(1);
    prepared_two(&mut h, g);
    h.synced(g);
    h.ack(g, db1(), Phase2Op::Commit, BranchOutcome::HeuristicRollback);
    h.ack(g, db2(), Phase2Op::Commit, BranchOutcome::Committed);
    assert_eq!(h.engine.gauges(h.now).heuristic, 1);
    // Restart from everything written (the End record is lazy): still kept, still counted.
    let records: Vec<LogRecord> = h.appended.iter().map(|(r, _)| r.clone()).collect();
    let (mut r, _) = Harness::restored(cfg, h.now + 10_000_000, records);
    r.ev(Event::Tick);
    assert!(r.get(g).unwrap().heuristic);
    assert_eq!((r.engine.gauges(r.now).heuristic, r.engine.gauges(r.now).retained), (1, 0));
}

#[test]
fn finding8_a_vote_that_would_overflow_the_commit_record_aborts_the_transaction() {
    let cfg = EngineConfig { max_record_bytes: 600, ..EngineConfig::default() };
    let mut h = Harness::with_config(cfg);
    let g = gtid(1);
    h.begin(g, vec![db1(), db2()]);
    let (req, _) = h.commit(g);
    h.vote(g, db1(), VoteResult::Prepared { metadata: Bytes::from(vec![1u8; 200]) });
    let big = Bytes::from(vec![2u8; 400]);
    let out = h.vote(g, db2(), VoteResult::Prepared { metadata: big.clone() });
    // No commit record is attempted; both prepared branches are rolled back, the big one with
    // its metadata, and the client hears why.
    assert!(!out.iter().any(|c| matches!(c, Command::Append { record: LogRecord::Commit(_), .. })), "{out:?}");
    assert!(out.contains(&abort_cmd(g, db2(), big)), "{out:?}");
    let Some(Command::Reply { req: r, reply: Ok(Reply::CommitOutcome(o)) }) =
        out.iter().find(|c| matches!(c, Command::Reply { .. }))
    else {
        panic!("no answer: {out:?}")
    };
    assert_eq!(*r, req);
    assert!(!o.committed);
    let reason = o.reason.as_deref().unwrap();
    assert!(reason.contains("would make the commit record up to") && reason.contains("limit of 600 bytes"), "{reason}");
    // Within the limit, the same transaction shape commits.
    let mut h = Harness::with_config(EngineConfig { max_record_bytes: 1_000, ..EngineConfig::default() });
    h.begin(g, vec![db1(), db2()]);
    h.commit(g);
    h.vote(g, db1(), VoteResult::Prepared { metadata: Bytes::from(vec![1u8; 200]) });
    let out = h.vote(g, db2(), VoteResult::Prepared { metadata: Bytes::from(vec![2u8; 400]) });
    assert!(matches!(&out[0], Command::Append { record: LogRecord::Commit(_), .. }), "{out:?}");
}

/// Found by the simulation: a recovery scan lists a branch while it is prepared; by the time
/// the list is handled, the transaction committed, every branch acknowledged and (with a short
/// retention) it was forgotten. Presuming abort then would roll back a committed branch.
#[test]
fn a_stale_in_doubt_list_never_aborts_a_transaction_forgotten_after_it_was_made() {
    let mut h = Harness::with_config(EngineConfig { completed_retention_ms: 1_000, ..EngineConfig::default() });
    let g = gtid(1);
    prepared_two(&mut h, g);
    let listed_ms = h.now; // the participant lists db1's branch as prepared now
    h.synced(g);
    h.ack(g, db1(), Phase2Op::Commit, BranchOutcome::Committed);
    h.ack(g, db2(), Phase2Op::Commit, BranchOutcome::Committed);
    h.now += 1_000;
    h.ev(Event::Tick);
    assert_eq!(h.get(g), Err(EngineError::OutcomeForgotten(g)));
    let stale = InDoubtBranch { gtid: g, branch: db1(), metadata: Bytes::new() };
    let out = h.ev(Event::InDoubt {
        resource: db1().resource.clone(),
        branches: vec![stale.clone()],
        listed_ms,
        confirmed: None,
    });
    assert_eq!(out, vec![], "a list older than the forgetting is not trusted for forgotten GTIDs");
    // A list made after the forgetting that still holds the branch is believed: no record,
    // presumed abort (as for any transaction never committed here).
    h.now += 1;
    let out = h.ev(Event::InDoubt {
        resource: db1().resource.clone(),
        branches: vec![stale],
        listed_ms: h.now,
        confirmed: None,
    });
    assert_eq!(out, vec![abort_cmd(g, db1(), Bytes::new())]);
}

/// Found in review: with finished transactions forgotten every few milliseconds (steady load),
/// "made before the last forgetting" is true of almost every list; a branch of a transaction
/// never committed here must still be rolled back when its list is handled within the
/// retention of being made.
#[test]
fn a_prompt_in_doubt_list_is_trusted_while_other_transactions_are_forgotten() {
    let mut h = Harness::with_config(EngineConfig { completed_retention_ms: 1_000, ..EngineConfig::default() });
    let never_committed = gtid(1);
    // Something issued later finishes and is forgotten: the horizon passes never_committed.
    let later = Gtid::from_parts(T0 + 5, 2);
    h.begin(later, vec![]);
    h.commit(later);
    h.sync_all();
    h.now += 1_000;
    let listed_ms = h.now;
    h.now += 10; // the scan's answer takes a while; meanwhile another forgetting happens
    h.ev(Event::Tick);
    assert_eq!(h.get(later), Err(EngineError::OutcomeForgotten(later)));
    let branch = InDoubtBranch { gtid: never_committed, branch: db1(), metadata: Bytes::new() };
    let out =
        h.ev(Event::InDoubt { resource: db1().resource.clone(), branches: vec![branch], listed_ms, confirmed: None });
    assert_eq!(out, vec![abort_cmd(never_committed, db1(), Bytes::new())]);
}
