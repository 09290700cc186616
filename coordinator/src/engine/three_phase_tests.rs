//! Three-phase commit driven event by event, asserting the exact commands on every path: the
//! pre-commit decision, the PreCommit round, the termination protocol after a restart, and the
//! heuristic mixed outcome of branches that decided differently.

use super::tests::*;
use super::*;

pub(super) const TIMEOUTS: ThreePhaseTimeouts =
    ThreePhaseTimeouts { precommit_wait_ms: 20_000, docommit_wait_ms: 10_000 };

/// A harness whose db1 and db2 support three-phase commit and db3 does not.
fn harness(cfg: EngineConfig) -> Harness {
    let mut h = Harness::with_config(cfg);
    for (r, three_phase) in [("db1", true), ("db2", true), ("db3", false)] {
        h.ev(Event::Capability { resource: r.parse().unwrap(), endpoint: format!("http://{r}"), three_phase });
    }
    h
}

fn begin3(h: &mut Harness, g: Gtid, branches: Vec<BranchKey>) -> Vec<Command> {
    let req = h.req();
    let branches = branches.into_iter().map(Enlisted::from).collect();
    h.ev(Event::Begin {
        req,
        gtid: g,
        timeout_ms: None,
        idempotency_key: None,
        branches,
        protocol: Protocol::ThreePhase,
        owner: None,
    })
}

pub(super) fn state(h: &mut Harness, g: Gtid, b: BranchKey, state: ParticipantState) -> Vec<Command> {
    h.ev(Event::BranchState { gtid: g, branch: b, result: StateResult::State { state, reason: None } })
}

fn precommit_cmd(g: Gtid, b: BranchKey, m: Bytes, epoch: u64) -> Command {
    Command::PreCommit { gtid: g, branch: b, metadata: m, docommit_wait_ms: TIMEOUTS.docommit_wait_ms, epoch }
}

pub(super) fn record(g: Gtid, decided: Millis, epoch: u64, votes: Vec<(BranchKey, Bytes, Millis)>) -> CommitRecord {
    CommitRecord {
        gtid: g,
        epoch,
        created_ms: T0,
        decided_ms: decided,
        idempotency_key: None,
        branches: votes
            .into_iter()
            .map(|(key, metadata, prepared_ms)| LoggedBranch { key, vote: Vote::Prepared, metadata, prepared_ms })
            .collect(),
        three_phase: Some(TIMEOUTS),
        owner: None,
    }
}

/// Begins a three-phase transaction over db1 and db2, asks to commit and brings both yes votes
/// (at T0 + 1), returning the commit request.
fn voted_yes(h: &mut Harness, g: Gtid) -> (ReqId, Vec<Command>) {
    begin3(h, g, vec![db1(), db2()]);
    let (req, out) = h.commit(g);
    assert_eq!(
        out,
        vec![
            Command::Prepare { gtid: g, branch: db1(), may_be_empty: false, precommit_wait_ms: 20_000 },
            Command::Prepare { gtid: g, branch: db2(), may_be_empty: false, precommit_wait_ms: 20_000 },
        ]
    );
    h.now += 1;
    h.vote(g, db1(), VoteResult::Prepared { metadata: meta("m1") });
    (req, h.vote(g, db2(), VoteResult::Prepared { metadata: Bytes::new() }))
}

#[test]
fn commit_forces_the_precommit_decision_then_commits_once_every_branch_is_precommitted() {
    // A real epoch (the log writer's: the count of starts), carried by every PreCommit.
    let mut h = harness(EngineConfig { epoch: 3, ..EngineConfig::default() });
    let g = gtid(1);
    let (req, out) = voted_yes(&mut h, g);
    let votes = vec![(db1(), meta("m1"), T0 + 1), (db2(), Bytes::new(), T0 + 1)];
    assert_eq!(
        out,
        vec![Command::Append {
            record: LogRecord::PreCommit(record(g, T0 + 1, 3, votes.clone())),
            sync: Some(SyncToken::PreCommit(g)),
        }]
    );
    // Nobody hears PreCommit before the decision is durable.
    h.now += 1;
    let out = h.sync_all();
    assert_eq!(out, vec![precommit_cmd(g, db1(), meta("m1"), 3), precommit_cmd(g, db2(), Bytes::new(), 3)]);
    assert_eq!(h.abort_req(g), Err(EngineError::CommitDecided { gtid: g, state: TxnState::Preparing }));

    // One acknowledgement is not enough: the other branch may still be waiting for its
    // PreCommit, and would abort itself at its deadline if the first commit went out now.
    h.now += 1;
    assert_eq!(state(&mut h, g, db1(), ParticipantState::PreCommitted), vec![]);
    let out = state(&mut h, g, db2(), ParticipantState::PreCommitted);
    assert_eq!(
        out,
        vec![Command::Append {
            record: LogRecord::Commit(record(g, T0 + 3, 3, votes)),
            sync: Some(SyncToken::Commit(g))
        }]
    );
    let out = h.sync_all();
    assert_eq!(out, vec![commit_cmd(g, db1(), meta("m1")), commit_cmd(g, db2(), Bytes::new()), committed(req, false)]);
    h.ack(g, db1(), Phase2Op::Commit, BranchOutcome::Committed);
    let out = h.ack(g, db2(), Phase2Op::Commit, BranchOutcome::Committed);
    let Some(Command::Append { record: LogRecord::End(end), sync: None }) = out.first() else { panic!("{out:?}") };
    assert_eq!(end.three_phase, Some(TIMEOUTS));
    let view = h.get(g).unwrap();
    assert_eq!(
        (view.state, view.protocol, view.heuristic, view.heuristic_mixed),
        (TxnState::Committed, Protocol::ThreePhase, false, false)
    );
    assert_eq!(view.branches[0].participant_state, Some(ParticipantState::PreCommitted));
}

#[test]
fn a_participant_without_three_phase_commit_is_refused_never_downgraded() {
    let mut h = harness(EngineConfig::default());
    let g = gtid(1);
    let out = begin3(&mut h, g, vec![db1(), key("db3", "b")]);
    let refused = EngineError::NotThreePhase("db3".parse().unwrap());
    assert!(matches!(&out[..], [Command::Reply { reply: Err(e), .. }] if *e == refused), "{out:?}");
    // Nothing was begun.
    assert_eq!(h.get(g), Err(EngineError::UnknownTransaction(g)));

    // A participant not probed yet: unavailable (retry), not refused.
    h.engine.add_configured_participant("db4".parse().unwrap(), "http://db4".into());
    let out = begin3(&mut h, g, vec![key("db4", "b")]);
    let unknown = EngineError::CapabilityUnknown("db4".parse().unwrap());
    assert!(matches!(&out[..], [Command::Reply { reply: Err(e), .. }] if *e == unknown), "{out:?}");

    // Enlisting it later, or at Commit, is refused the same way and changes nothing.
    begin3(&mut h, g, vec![db1()]);
    let req = h.req();
    let out = h.ev(Event::Enlist { req, gtid: g, branches: vec![key("db3", "b").into()] });
    assert_eq!(out, vec![Command::Reply { req, reply: Err(refused.clone()) }]);
    let req = h.req();
    let out = h.ev(Event::Commit { req, gtid: g, branches: vec![key("db3", "b").into()], wait_for_completion: false });
    assert_eq!(out, vec![Command::Reply { req, reply: Err(refused) }]);
    assert_eq!(h.get(g).unwrap().branches.len(), 1);

    // Two-phase commit takes it.
    let out = h.begin(gtid(2), vec![key("db3", "b")]);
    assert!(matches!(&out[..], [Command::Reply { reply: Ok(Reply::Begun { .. }), .. }]), "{out:?}");
}

#[test]
fn a_no_vote_aborts_before_any_precommit_decision() {
    let mut h = harness(EngineConfig::default());
    let g = gtid(1);
    begin3(&mut h, g, vec![db1(), db2()]);
    let (req, _) = h.commit(g);
    h.vote(g, db1(), VoteResult::Prepared { metadata: meta("m1") });
    let out = h.vote(g, db2(), VoteResult::Aborted { reason: "constraint".into() });
    assert_eq!(
        out,
        vec![
            abort_cmd(g, db1(), meta("m1")),
            abort_cmd(g, db2(), Bytes::new()),
            aborted(req, "branch db2/b1 voted no: constraint", false),
        ]
    );
    assert!(h.appended.is_empty(), "presumed abort: nothing is logged");
}

#[test]
fn no_branch_precommitted_aborts_and_a_branch_that_aborted_beside_a_precommitted_one_is_heuristic_mixed() {
    // Every branch answers that it aborted itself (its PreCommit came too late): abort.
    let mut h = harness(EngineConfig::default());
    let g = gtid(1);
    let (req, _) = voted_yes(&mut h, g);
    h.sync_all();
    state(&mut h, g, db1(), ParticipantState::Aborted);
    let out = state(&mut h, g, db2(), ParticipantState::Aborted);
    let reason = "three-phase: no branch was pre-committed (db1/b1 Aborted, db2/b1 Aborted)";
    assert_eq!(
        out,
        vec![abort_cmd(g, db1(), meta("m1")), abort_cmd(g, db2(), Bytes::new()), aborted(req, reason, false)]
    );

    // One pre-committed (it commits whatever happens), one aborted: commit, and the branch
    // that ended otherwise makes the transaction heuristic mixed — never a clean outcome.
    let g = gtid(2);
    let (req, _) = voted_yes(&mut h, g);
    h.sync_all();
    state(&mut h, g, db1(), ParticipantState::PreCommitted);
    let out = state(&mut h, g, db2(), ParticipantState::Aborted);
    assert!(matches!(&out[..], [Command::Append { record: LogRecord::Commit(_), .. }]), "{out:?}");
    let out = h.sync_all();
    assert_eq!(out, vec![commit_cmd(g, db1(), meta("m1")), commit_cmd(g, db2(), Bytes::new()), committed(req, false)]);
    h.ack(g, db1(), Phase2Op::Commit, BranchOutcome::Committed);
    h.ack(g, db2(), Phase2Op::Commit, BranchOutcome::Aborted);
    let view = h.get(g).unwrap();
    assert_eq!((view.state, view.heuristic, view.heuristic_mixed), (TxnState::Committed, true, true));
    assert_eq!(view.branches[1].outcome, Some(BranchOutcome::HeuristicRollback));
    // Kept for an operator, not expired with the retention.
    h.now += EngineConfig::default().completed_retention_ms + 1;
    h.ev(Event::Tick);
    assert!(h.get(g).unwrap().heuristic_mixed);
}

#[test]
fn missing_acknowledgements_commit_when_the_wait_passes_only_if_a_branch_is_precommitted() {
    let mut h = harness(EngineConfig::default());
    // db1 pre-committed, db2 silent: when docommit_wait_ms passes, db1 is committing on its own,
    // so the coordinator commits and tells db2.
    let g = gtid(1);
    voted_yes(&mut h, g);
    h.sync_all();
    let precommitted_at = h.now;
    state(&mut h, g, db1(), ParticipantState::PreCommitted);
    let failed = StateResult::Failed { error: "unavailable".into() };
    let out = h.ev(Event::BranchState { gtid: g, branch: db2(), result: failed.clone() });
    assert_eq!(out, vec![]);
    // Asked again after the backoff (25..=50 ms for the first attempt).
    h.now += 50;
    let out = h.ev(Event::Tick);
    assert_eq!(out, vec![precommit_cmd(g, db2(), Bytes::new(), 0)]);
    h.now = precommitted_at + TIMEOUTS.docommit_wait_ms;
    let out = h.ev(Event::Tick);
    assert!(matches!(&out[..], [Command::Append { record: LogRecord::Commit(_), .. }]), "{out:?}");
    // The PreCommit still in flight does not stop the commit call to db2, and its late answer
    // changes nothing.
    let out = h.sync_all();
    assert!(out.contains(&commit_cmd(g, db2(), Bytes::new())), "{out:?}");
    assert_eq!(state(&mut h, g, db2(), ParticipantState::PreCommitted), vec![]);

    // Nobody answered: nothing decides (a silent branch may be pre-committed with its answer
    // lost); PreCommit is asked again, and the answers decide when they come.
    let g = gtid(2);
    voted_yes(&mut h, g);
    h.sync_all();
    let start = h.now;
    for b in [db1(), db2()] {
        h.ev(Event::BranchState { gtid: g, branch: b, result: failed.clone() });
    }
    h.now = start + TIMEOUTS.docommit_wait_ms;
    let out = h.ev(Event::Tick);
    assert!(out.iter().all(|c| matches!(c, Command::PreCommit { .. })), "{out:?}");
    assert_eq!(h.get(g).unwrap().state, TxnState::Preparing);
}

#[test]
fn after_a_restart_the_termination_protocol_commits_if_any_branch_is_precommitted_else_aborts() {
    let g = gtid(1);
    let votes = vec![(db1(), meta("m1"), T0 + 1), (db2(), Bytes::new(), T0 + 1)];
    let precommit = LogRecord::PreCommit(record(g, T0 + 1, 3, votes.clone()));
    let cfg = EngineConfig { epoch: 4, ..EngineConfig::default() };

    // Restarted at epoch 4: each branch is asked its state at the new epoch, which makes its
    // participant refuse a PreCommit from the epoch-3 process, should it still be around.
    let (mut h, out) = Harness::restored(cfg.clone(), T0 + 100, vec![precommit.clone()]);
    let query = |b: BranchKey| Command::QueryState { gtid: g, branch: b, epoch: 4 };
    assert_eq!(
        out.iter().filter(|c| !matches!(c, Command::Connect { .. })).collect::<Vec<_>>(),
        vec![&query(db1()), &query(db2())]
    );
    // One pre-committed answer decides: commit at once (db2's answer is not needed).
    let out = state(&mut h, g, db1(), ParticipantState::PreCommitted);
    assert_eq!(
        out,
        vec![Command::Append {
            record: LogRecord::Commit(record(g, T0 + 100, 4, votes.clone())),
            sync: Some(SyncToken::Commit(g)),
        }]
    );
    let out = h.sync_all();
    assert_eq!(out, vec![commit_cmd(g, db1(), meta("m1")), commit_cmd(g, db2(), Bytes::new())]);

    // Every branch answered and none is pre-committed: abort (they abort at their wait
    // deadline anyway). A failed query is asked again.
    let (mut h, _) = Harness::restored(cfg.clone(), T0 + 100, vec![precommit.clone()]);
    let failed = StateResult::Failed { error: "unavailable".into() };
    h.ev(Event::BranchState { gtid: g, branch: db2(), result: failed });
    assert_eq!(state(&mut h, g, db1(), ParticipantState::Prepared), vec![]);
    h.now += 50;
    assert_eq!(h.ev(Event::Tick), vec![query(db2())]);
    let out = state(&mut h, g, db2(), ParticipantState::Aborted);
    assert_eq!(out, vec![abort_cmd(g, db1(), meta("m1")), abort_cmd(g, db2(), Bytes::new())]);
    h.ack(g, db1(), Phase2Op::Abort, BranchOutcome::Aborted);
    h.ack(g, db2(), Phase2Op::Abort, BranchOutcome::Aborted);
    let view = h.get(g).unwrap();
    assert_eq!((view.state, view.heuristic_mixed), (TxnState::Aborted, false));
    assert!(view.abort_reason.unwrap().contains("no branch was pre-committed (db1/b1 Prepared, db2/b1 Aborted)"));

    // While terminating, an in-doubt listing of the branches changes nothing.
    let (mut h, _) = Harness::restored(cfg, T0 + 100, vec![precommit]);
    let listed = vec![InDoubtBranch { gtid: g, branch: db1(), metadata: meta("m1") }];
    let out = h.ev(Event::InDoubt {
        resource: "db1".parse().unwrap(),
        branches: listed,
        listed_ms: T0 + 100,
        confirmed: None,
    });
    assert_eq!(out, vec![]);
}

#[test]
fn a_checkpoint_keeps_the_precommit_decision_and_a_commit_record_replaces_it() {
    let cfg = EngineConfig { checkpoint_every_records: 1, ..EngineConfig::default() };
    let mut h = harness(cfg.clone());
    let g = gtid(1);
    let (_, out) = voted_yes(&mut h, g);
    let Some(Command::Checkpoint { records }) = out.last() else { panic!("no checkpoint: {out:?}") };
    assert!(records.iter().any(|r| matches!(r, LogRecord::PreCommit(c) if c.gtid == g)), "{records:?}");
    let (_, start) = Harness::restored(cfg.clone(), T0 + 10, records.clone());
    assert!(start.iter().any(|c| matches!(c, Command::QueryState { gtid, .. } if *gtid == g)), "{start:?}");

    // The commit record after it wins on replay: phase 2 resumes, nobody is asked its state.
    h.sync_all();
    state(&mut h, g, db1(), ParticipantState::PreCommitted);
    state(&mut h, g, db2(), ParticipantState::PreCommitted);
    h.sync_all();
    let (mut r, start) = Harness::restored(cfg, T0 + 10, h.synced_records());
    assert!(start.iter().all(|c| !matches!(c, Command::QueryState { .. })), "{start:?}");
    assert_eq!(start.iter().filter(|c| matches!(c, Command::Commit { .. })).count(), 2, "{start:?}");
    assert_eq!(r.get(g).unwrap().protocol, Protocol::ThreePhase);
}

/// A cluster instance that takes a shard over runs the termination protocol for the shard's
/// pre-committed transactions, asking at the shard's new lease epoch (so every branch refuses
/// the former owner's PreCommit from then on), and the commit it writes carries that epoch.
#[test]
fn a_takeover_runs_the_termination_protocol_at_the_new_epoch() {
    let cfg = EngineConfig { shard_count: 4, ..EngineConfig::default() };
    let mut h = harness(cfg);
    let g = gtid(2); // shard 2 of 4
    let votes = vec![(db1(), meta("m1"), T0 + 1), (db2(), Bytes::new(), T0 + 1)];
    let records = vec![LogRecord::PreCommit(record(g, T0 + 1, 6, votes.clone()))];
    let out = h.ev(Event::AdoptShard { shard: g.shard(4), epoch: 7, forgotten_through_ms: 0, records });
    assert_eq!(
        out,
        vec![
            Command::QueryState { gtid: g, branch: db1(), epoch: 7 },
            Command::QueryState { gtid: g, branch: db2(), epoch: 7 },
        ]
    );
    let out = state(&mut h, g, db2(), ParticipantState::Committed);
    assert_eq!(
        out,
        vec![Command::Append { record: LogRecord::Commit(record(g, T0, 7, votes)), sync: Some(SyncToken::Commit(g)) }]
    );
}

/// The pre-commit record became durable so late (a slow log or store) that PreCommit might
/// reach a branch after its wait deadline, which runs from its vote: some branches would be
/// pre-committed while others abort themselves. Nothing is pre-committed yet, so it aborts.
#[test]
fn a_precommit_decision_durable_too_late_for_the_wait_deadlines_aborts() {
    // Prepares went out at T0; the earliest wait deadline is T0 + 20 s, and a PreCommit may take
    // 5 s to arrive: from T0 + 15 s on, too late.
    let mut h = harness(EngineConfig::default());
    let g = gtid(1);
    let (req, _) = voted_yes(&mut h, g);
    h.now = T0 + 15_000;
    let out = h.sync_all();
    let reason = "three-phase: the pre-commit decision was durable 15000 ms after the prepare round began, too late \
                  for PreCommit to reach every branch within its 20000 ms wait (a slow decision log or store)";
    assert_eq!(
        out,
        vec![abort_cmd(g, db1(), meta("m1")), abort_cmd(g, db2(), Bytes::new()), aborted(req, reason, false)]
    );

    // A moment earlier, PreCommit goes out.
    let g = gtid(2);
    h.now = T0 + 100_000;
    voted_yes(&mut h, g);
    h.now += 14_998;
    let out = h.sync_all();
    assert!(out.iter().all(|c| matches!(c, Command::PreCommit { .. })) && out.len() == 2, "{out:?}");
}

/// A branch that voted yes and then answers the termination protocol's query with no record
/// (it lost the branch, or forgot it after its retention) may have pre-committed and committed
/// on its own: its outcome is a heuristic hazard, kept for an operator, never an abort.
#[test]
fn a_branch_with_no_record_at_termination_is_a_hazard_not_an_abort() {
    let g = gtid(1);
    let votes = vec![(db1(), meta("m1"), T0 + 1), (db2(), Bytes::new(), T0 + 1)];
    let cfg = EngineConfig { epoch: 4, ..EngineConfig::default() };
    let (mut h, _) = Harness::restored(cfg, T0 + 100, vec![LogRecord::PreCommit(record(g, T0 + 1, 3, votes))]);
    state(&mut h, g, db1(), ParticipantState::Unknown);
    let out = state(&mut h, g, db2(), ParticipantState::Prepared);
    assert!(out.contains(&abort_cmd(g, db2(), Bytes::new())), "{out:?}");
    h.ack(g, db2(), Phase2Op::Abort, BranchOutcome::Aborted);
    let view = h.get(g).unwrap();
    assert_eq!((view.state, view.heuristic, view.heuristic_mixed), (TxnState::Aborted, true, false));
    assert_eq!(view.branches[0].outcome, Some(BranchOutcome::HeuristicHazard));
    assert!(view.branches[0].last_error.as_deref().unwrap().contains("whether it committed on its own is not known"));
    // Its late Abort answer changes nothing.
    h.ack(g, db1(), Phase2Op::Abort, BranchOutcome::Aborted);
    assert_eq!(h.get(g).unwrap().branches[0].outcome, Some(BranchOutcome::HeuristicHazard));
    // Kept for an operator past the retention.
    h.now += EngineConfig::default().completed_retention_ms + 1;
    h.ev(Event::Tick);
    assert!(h.get(g).unwrap().heuristic);
}

/// The do-commit wait passed with no pre-committed answer yet; one comes later: it decides at
/// once (that branch is committing on its own), without waiting for a silent branch.
#[test]
fn a_precommitted_answer_after_the_do_commit_wait_commits_without_the_silent_branch() {
    let mut h = harness(EngineConfig::default());
    let g = gtid(1);
    voted_yes(&mut h, g);
    h.sync_all();
    let start = h.now;
    let failed = StateResult::Failed { error: "unavailable".into() };
    for b in [db1(), db2()] {
        h.ev(Event::BranchState { gtid: g, branch: b, result: failed.clone() });
    }
    h.now = start + TIMEOUTS.docommit_wait_ms + 1;
    h.ev(Event::Tick);
    assert_eq!(h.get(g).unwrap().state, TxnState::Preparing, "nothing decides without a committable answer");
    let out = state(&mut h, g, db1(), ParticipantState::PreCommitted);
    assert!(matches!(&out[..], [Command::Append { record: LogRecord::Commit(_), .. }]), "{out:?}");
}
