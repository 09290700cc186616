//! Operator resolution driven event by event: what each request does in each state, what it
//! logs, what it refuses, and what a restart makes of its records.

use super::tests::*;
use super::three_phase_tests::{record, state};
use super::*;

fn resolve(h: &mut Harness, g: Gtid, branch: Option<BranchKey>, action: ResolveAction) -> (ReqId, Vec<Command>) {
    let req = h.req();
    let request = ResolveRequest {
        gtid: g,
        branch,
        action,
        operator: "alice".into(),
        peer: "127.0.0.1:5555".into(),
        reason: "checked the database by hand".into(),
    };
    (req, h.ev(Event::Resolve { req, request }))
}

/// The reply to `req` among `out`.
fn reply_to(out: &[Command], req: ReqId) -> Option<&Result<Reply, EngineError>> {
    out.iter().find_map(|c| match c {
        Command::Reply { req: r, reply } if *r == req => Some(reply),
        _ => None,
    })
}

/// The `changed` flag of a Resolve answer.
fn changed(reply: Option<&Result<Reply, EngineError>>) -> bool {
    match reply {
        Some(Ok(Reply::Resolved { changed, .. })) => *changed,
        other => panic!("not a resolution answer: {other:?}"),
    }
}

fn refused(reply: Option<&Result<Reply, EngineError>>) -> String {
    match reply {
        Some(Err(EngineError::ResolveRefused(why))) => why.clone(),
        other => panic!("not refused: {other:?}"),
    }
}

fn resolve_records(out: &[Command]) -> Vec<Arc<ResolveRecord>> {
    out.iter()
        .filter_map(|c| match c {
            Command::Append { record: LogRecord::Resolve(r), .. } => Some(r.clone()),
            _ => None,
        })
        .collect()
}

fn heuristic_list(h: &mut Harness) -> usize {
    let req = h.req();
    let filter = ListFilter { heuristic: true, limit: 10, ..ListFilter::default() };
    match h.ev(Event::List { req, filter }).pop() {
        Some(Command::Reply { reply: Ok(Reply::List { transactions, .. }), .. }) => transactions.len(),
        other => panic!("{other:?}"),
    }
}

/// A committed transaction whose db2 branch was rolled back by its participant on its own.
fn heuristic_rollback(h: &mut Harness, g: Gtid) {
    prepared_two(h, g);
    h.synced(g);
    h.ack(g, db1(), Phase2Op::Commit, BranchOutcome::Committed);
    h.ack(g, db2(), Phase2Op::Commit, BranchOutcome::Aborted);
}

#[test]
fn a_repaired_heuristic_rollback_is_resolved_once_logged_and_then_kept_only_for_the_retention() {
    let cfg = EngineConfig { completed_retention_ms: 1_000, ..EngineConfig::default() };
    let mut h = Harness::with_config(cfg.clone());
    let g = gtid(1);
    heuristic_rollback(&mut h, g);
    assert_eq!(h.engine.gauges(h.now).heuristic, 1);
    assert_eq!(heuristic_list(&mut h), 1);

    // Against the decision: refused, nothing logged.
    let (req, out) = resolve(&mut h, g, Some(db2()), ResolveAction::Rollback);
    assert!(refused(reply_to(&out, req)).contains("would contradict it"), "{out:?}");
    assert_eq!(out.len(), 1);
    // Nothing to retry in a finished transaction: unchanged, nothing logged.
    let (req, out) = resolve(&mut h, g, None, ResolveAction::Commit);
    assert!(!changed(reply_to(&out, req)));
    assert_eq!(out.len(), 1);

    // The branch repaired by hand: logged, answered once durable.
    h.now += 5;
    let (req, out) = resolve(&mut h, g, Some(db2()), ResolveAction::Commit);
    assert!(reply_to(&out, req).is_none(), "answered before the record is durable: {out:?}");
    let records = resolve_records(&out);
    assert_eq!(records.len(), 1);
    let r = &records[0];
    assert_eq!((r.effect, r.releases, r.at_ms), (ResolveEffect::BranchSettled, true, T0 + 5));
    assert_eq!((r.operator.as_str(), r.peer.as_str()), ("alice", "127.0.0.1:5555"));
    let out = h.sync_all();
    assert!(changed(reply_to(&out, req)));
    let view = h.get(g).unwrap();
    // What happened stays; that it was repaired is said beside it.
    assert_eq!(view.branches[1].outcome, Some(BranchOutcome::HeuristicRollback));
    assert!(view.branches[1].resolved && !view.branches[0].resolved);
    assert!(view.heuristic && view.heuristic_resolved);
    assert_eq!(view.resolutions.len(), 1);
    assert_eq!(heuristic_list(&mut h), 0);
    let gauges = h.engine.gauges(h.now);
    assert_eq!((gauges.heuristic, gauges.retained), (0, 1));

    // Idempotent: asked again, nothing changes and nothing is logged.
    let (req, out) = resolve(&mut h, g, Some(db2()), ResolveAction::Commit);
    assert!(!changed(reply_to(&out, req)));
    assert_eq!(out.len(), 1);
    let (req, out) = resolve(&mut h, g, None, ResolveAction::Forget);
    assert!(!changed(reply_to(&out, req)));

    // A restart from the log (the lazy End record survived) knows the resolution.
    let records: Vec<LogRecord> = h.appended.iter().map(|(r, _)| r.clone()).collect();
    let (mut r, _) = Harness::restored(cfg.clone(), h.now, records.clone());
    let view = r.get(g).unwrap();
    assert!(view.heuristic_resolved && view.branches[1].resolved);
    assert_eq!(r.engine.gauges(r.now).heuristic, 0);
    // ... and forgets it after the retention, counted from the resolution.
    r.now = T0 + 5 + 1_000;
    r.ev(Event::Tick);
    assert!(r.get(g).is_err());

    // Without the resolution record the transaction is still kept for an operator.
    let before: Vec<LogRecord> = records.into_iter().filter(|r| !matches!(r, LogRecord::Resolve(_))).collect();
    let (mut r, _) = Harness::restored(cfg, T0 + 100_000, before);
    assert!(!r.get(g).unwrap().heuristic_resolved);
    assert_eq!(r.engine.gauges(r.now).heuristic, 1);
}

#[test]
fn retry_now_sends_phase_two_at_once_and_not_twice() {
    let mut h = Harness::new();
    let g = gtid(1);
    prepared_two(&mut h, g);
    h.synced(g);
    h.ack(g, db1(), Phase2Op::Commit, BranchOutcome::Committed);
    let error = "unavailable".to_string();
    h.ev(Event::Phase2Done { gtid: g, branch: db2(), op: Phase2Op::Commit, result: Phase2Result::Retry { error } });
    let due = h.get(g).unwrap().branches[1].next_retry_ms;
    assert!(due > h.now);

    let (req, out) = resolve(&mut h, g, None, ResolveAction::Commit);
    assert!(out.contains(&commit_cmd(g, db2(), Bytes::new())), "{out:?}");
    assert_eq!(resolve_records(&out)[0].effect, ResolveEffect::Retried);
    assert!(changed(reply_to(&h.sync_all(), req)));
    // The call is on its way: asking again sends nothing.
    let (req, out) = resolve(&mut h, g, None, ResolveAction::Commit);
    assert!(!changed(reply_to(&out, req)));
    assert!(!out.iter().any(|c| matches!(c, Command::Commit { .. })));
    // Rollback contradicts the commit decision.
    let (req, out) = resolve(&mut h, g, None, ResolveAction::Rollback);
    refused(reply_to(&out, req));
    // Forget is for finished transactions.
    let (req, out) = resolve(&mut h, g, None, ResolveAction::Forget);
    assert!(refused(reply_to(&out, req)).contains("1 branch(es) have not acknowledged"));
    // The retry's answer finishes it; the old backoff timer finds nothing to send.
    h.ack(g, db2(), Phase2Op::Commit, BranchOutcome::Committed);
    assert_eq!(h.get(g).unwrap().state, TxnState::Committed);
    h.now = due;
    assert!(h.ev(Event::Tick).is_empty());
}

#[test]
fn a_branch_its_participant_cannot_finish_is_settled_and_the_transaction_finishes_also_after_a_crash() {
    let mut h = Harness::new();
    let g = gtid(1);
    let client = prepared_two(&mut h, g);
    h.synced(g);
    h.ack(g, db1(), Phase2Op::Commit, BranchOutcome::Committed);
    let error = "connection refused".to_string();
    h.ev(Event::Phase2Done { gtid: g, branch: db2(), op: Phase2Op::Commit, result: Phase2Result::Retry { error } });

    let (req, out) = resolve(&mut h, g, Some(db2()), ResolveAction::Commit);
    // Finished: its End record, then the resolution.
    let kinds: Vec<&str> = out
        .iter()
        .filter_map(|c| match c {
            Command::Append { record: LogRecord::End(e), .. } if e.committed && !e.kept_for_operator => Some("end"),
            Command::Append { record: LogRecord::Resolve(_), .. } => Some("resolve"),
            _ => None,
        })
        .collect();
    assert_eq!(kinds, ["resolve", "end"], "{out:?}");
    assert!(changed(reply_to(&h.sync_all(), req)));
    let view = h.get(g).unwrap();
    assert_eq!(view.state, TxnState::Committed);
    assert_eq!(view.branches[1].outcome, Some(BranchOutcome::Committed));
    assert!(view.branches[1].resolved && !view.heuristic);
    // The participant's late answer changes nothing.
    let late = h.ack(g, db2(), Phase2Op::Commit, BranchOutcome::Aborted);
    assert!(late.is_empty(), "{late:?}");
    assert_eq!(h.get(g).unwrap().branches[1].outcome, Some(BranchOutcome::Committed));
    let _ = client;

    // A crash that kept the resolution but lost the (lazy) End record: the restart sends no
    // commit to the settled branch and finishes the transaction.
    let records: Vec<LogRecord> =
        h.appended.iter().map(|(r, _)| r.clone()).filter(|r| !matches!(r, LogRecord::End(_))).collect();
    let (mut r, start) = Harness::restored(EngineConfig::default(), h.now + 10, records);
    // (db1's acknowledgement is not logged: it is asked again.)
    let commits: Vec<&Command> = start.iter().filter(|c| matches!(c, Command::Commit { .. })).collect();
    assert_eq!(commits, [&commit_cmd(g, db1(), meta("m1"))]);
    let out = r.ack(g, db1(), Phase2Op::Commit, BranchOutcome::Committed);
    assert!(out.iter().any(|c| matches!(c, Command::Append { record: LogRecord::End(e), .. } if e.committed)));
    let view = r.get(g).unwrap();
    assert_eq!(view.state, TxnState::Committed);
    assert!(view.branches[1].resolved);
}

#[test]
fn forget_needs_a_finished_transaction_with_a_heuristic_outcome() {
    let mut h = Harness::new();
    let (clean, g) = (gtid(1), gtid(2));
    prepared_two(&mut h, clean);
    h.synced(clean);
    h.ack(clean, db1(), Phase2Op::Commit, BranchOutcome::Committed);
    h.ack(clean, db2(), Phase2Op::Commit, BranchOutcome::Committed);
    let (req, out) = resolve(&mut h, clean, None, ResolveAction::Forget);
    assert!(refused(reply_to(&out, req)).contains("no heuristic outcome"));
    let (req, out) = resolve(&mut h, gtid(9), None, ResolveAction::Forget);
    assert_eq!(reply_to(&out, req), Some(&Err(EngineError::UnknownTransaction(gtid(9)))));
    let (req, out) = resolve(&mut h, clean, Some(key("db3", "nope")), ResolveAction::Forget);
    assert!(matches!(reply_to(&out, req), Some(Err(EngineError::NoSuchBranch { .. }))));

    // Heuristic commit at an aborted transaction, forgotten after repair: the whole
    // transaction, then (unchanged) the branch.
    h.begin(g, vec![db1(), db2()]);
    h.commit(g);
    h.vote(g, db1(), VoteResult::Prepared { metadata: Bytes::new() });
    h.vote(g, db2(), VoteResult::Aborted { reason: "no".into() });
    h.ack(g, db1(), Phase2Op::Abort, BranchOutcome::Committed);
    h.ack(g, db2(), Phase2Op::Abort, BranchOutcome::Aborted);
    let view = h.get(g).unwrap();
    assert_eq!(view.branches[0].outcome, Some(BranchOutcome::HeuristicCommit));
    let (req, out) = resolve(&mut h, g, Some(db1()), ResolveAction::Commit);
    refused(reply_to(&out, req));
    let (req, out) = resolve(&mut h, g, None, ResolveAction::Forget);
    assert_eq!(resolve_records(&out)[0].effect, ResolveEffect::Forgotten);
    assert!(resolve_records(&out)[0].releases);
    assert!(changed(reply_to(&h.sync_all(), req)));
    let (req, out) = resolve(&mut h, g, Some(db1()), ResolveAction::Forget);
    assert!(!changed(reply_to(&out, req)));
    assert_eq!(h.engine.gauges(h.now).heuristic, 0);
}

#[test]
fn a_one_phase_commit_with_no_answer_is_retried_or_settled_by_the_operator() {
    let mut h = Harness::new();
    let g = gtid(1);
    h.begin(g, vec![db1()]);
    let (client, _) = h.commit(g);
    h.sync_all();
    // Being decided by its participant: whole-transaction rollback is refused, commit retries
    // once the call in flight has failed.
    let (req, out) = resolve(&mut h, g, None, ResolveAction::Rollback);
    assert!(refused(reply_to(&out, req)).contains("one-phase"));
    let (req, out) = resolve(&mut h, g, None, ResolveAction::Commit);
    assert!(!changed(reply_to(&out, req)), "a call is in flight");
    let error = "timeout".to_string();
    h.ev(Event::Phase2Done { gtid: g, branch: db1(), op: Phase2Op::Commit, result: Phase2Result::Retry { error } });
    let (_, out) = resolve(&mut h, g, None, ResolveAction::Commit);
    assert!(out.iter().any(|c| matches!(c, Command::Commit { one_phase: true, .. })), "{out:?}");

    // The operator found it rolled back: the transaction aborted, and the client hears so.
    let error = "timeout".to_string();
    h.ev(Event::Phase2Done { gtid: g, branch: db1(), op: Phase2Op::Commit, result: Phase2Result::Retry { error } });
    let (req, _) = resolve(&mut h, g, Some(db1()), ResolveAction::Rollback);
    let out = h.sync_all();
    assert!(changed(reply_to(&out, req)));
    match reply_to(&out, client) {
        Some(Ok(Reply::CommitOutcome(o))) => {
            assert!(!o.committed);
            assert!(o.reason.as_deref().unwrap().contains("alice"), "{o:?}");
        }
        other => panic!("{other:?}"),
    }
    let view = h.get(g).unwrap();
    assert_eq!((view.state, view.branches[0].outcome), (TxnState::Aborted, Some(BranchOutcome::Aborted)));
    // Restarted from the log: the same.
    let (mut r, start) = Harness::restored(EngineConfig::default(), h.now, h.synced_records());
    assert!(!start.iter().any(|c| matches!(c, Command::Commit { .. })));
    assert_eq!(r.get(g).unwrap().state, TxnState::Aborted);
}

#[test]
fn an_undecided_three_phase_transaction_is_decided_by_the_operator_never_against_its_branches() {
    let cfg = EngineConfig { epoch: 4, ..EngineConfig::default() };
    let g = gtid(1);
    let votes = vec![(db1(), meta("m1"), T0 + 1), (db2(), Bytes::new(), T0 + 1)];
    let precommit = LogRecord::PreCommit(record(g, T0 + 1, 3, votes));

    // While the termination protocol asks, it is the operator's to decide, as a whole.
    let (mut h, _) = Harness::restored(cfg.clone(), T0 + 100, vec![precommit.clone()]);
    let (req, out) = resolve(&mut h, g, Some(db1()), ResolveAction::Rollback);
    assert!(refused(reply_to(&out, req)).contains("decide the whole transaction"));
    // db1 rolled itself back; db2 never answers. Commit would contradict db1.
    state(&mut h, g, db1(), ParticipantState::Aborted);
    let (req, out) = resolve(&mut h, g, None, ResolveAction::Commit);
    assert!(refused(reply_to(&out, req)).contains("Aborted"));
    let (req, out) = resolve(&mut h, g, None, ResolveAction::Rollback);
    assert!(out.contains(&abort_cmd(g, db2(), Bytes::new())), "{out:?}");
    assert_eq!(resolve_records(&out)[0].effect, ResolveEffect::Decided);
    assert!(changed(reply_to(&h.sync_all(), req)));
    assert_eq!(h.get(g).unwrap().state, TxnState::Aborting);
    // A crash now: the log holds the pre-commit and the operator's decision; the restart
    // rolls back, it does not ask again.
    let (mut r, start) = Harness::restored(cfg.clone(), T0 + 200, h.synced_records_with(&precommit));
    assert!(start.contains(&abort_cmd(g, db1(), meta("m1"))), "{start:?}");
    assert!(!start.iter().any(|c| matches!(c, Command::QueryState { .. })), "{start:?}");
    assert_eq!(r.get(g).unwrap().state, TxnState::Aborting);

    // A pre-committed branch makes rollback a contradiction (the protocol commits then anyway;
    // the refusal is checked on a branch that answered before a silent one).
    let (mut h, _) = Harness::restored(cfg.clone(), T0 + 100, vec![precommit.clone()]);
    let (req, out) = resolve(&mut h, g, None, ResolveAction::Commit);
    let records = resolve_records(&out);
    assert_eq!(records[0].effect, ResolveEffect::Decided);
    // The commit record first, then phase 2 once it is durable.
    assert!(out.iter().any(|c| matches!(c, Command::Append { record: LogRecord::Commit(c), .. } if c.epoch == 4)));
    let out = h.sync_all();
    assert!(changed(reply_to(&out, req)));
    assert!(out.contains(&commit_cmd(g, db1(), meta("m1"))), "{out:?}");
    let (req, out) = resolve(&mut h, g, None, ResolveAction::Rollback);
    refused(reply_to(&out, req));
}

#[test]
fn only_the_latest_retry_is_kept_and_settling_works_after_any_number_of_them() {
    let cfg = EngineConfig { checkpoint_every_records: 1_000_000, ..EngineConfig::default() };
    let mut h = Harness::with_config(cfg.clone());
    let g = gtid(1);
    prepared_two(&mut h, g);
    h.synced(g);
    h.ack(g, db2(), Phase2Op::Commit, BranchOutcome::Committed);
    for n in 0..40 {
        let error = format!("down {n}");
        h.ev(Event::Phase2Done { gtid: g, branch: db1(), op: Phase2Op::Commit, result: Phase2Result::Retry { error } });
        h.now += 1;
        let (req, _) = resolve(&mut h, g, None, ResolveAction::Commit);
        assert!(changed(reply_to(&h.sync_all(), req)));
    }
    assert_eq!(h.get(g).unwrap().resolutions.len(), 1);
    let error = "down".to_string();
    h.ev(Event::Phase2Done { gtid: g, branch: db1(), op: Phase2Op::Commit, result: Phase2Result::Retry { error } });
    let (req, _) = resolve(&mut h, g, Some(db1()), ResolveAction::Commit);
    assert!(changed(reply_to(&h.sync_all(), req)));
    let view = h.get(g).unwrap();
    assert_eq!((view.state, view.resolutions.len()), (TxnState::Committed, 2));

    // The log holds all 41; a replay keeps what the live engine kept.
    let records: Vec<LogRecord> = h.appended.iter().map(|(r, _)| r.clone()).collect();
    assert_eq!(records.iter().filter(|r| matches!(r, LogRecord::Resolve(_))).count(), 41);
    let (mut r, _) = Harness::restored(cfg.clone(), h.now, records);
    assert_eq!(r.get(g).unwrap().resolutions, view.resolutions);
    // So does a checkpoint: the End record, then the resolutions after it.
    h.engine.cx.records_since_checkpoint = u64::MAX;
    let out = h.ev(Event::Tick);
    let Some(Command::Checkpoint { records }) = out.last() else { panic!("{out:?}") };
    let kinds: Vec<&str> = records
        .iter()
        .filter_map(|r| match r {
            LogRecord::End(_) => Some("end"),
            LogRecord::Resolve(_) => Some("resolve"),
            _ => None,
        })
        .collect();
    assert_eq!(kinds, ["end", "resolve", "resolve"]);
    let (mut r, _) = Harness::restored(cfg, h.now, records.clone());
    assert_eq!(r.get(g).unwrap().resolutions, view.resolutions);
}

#[test]
fn a_heuristic_outcome_resolved_before_the_transaction_finished_survives_a_replay() {
    let mut h = Harness::new();
    let g = gtid(1);
    prepared_two(&mut h, g);
    h.synced(g);
    // db2 rolled back on its own (its answer is not logged: the transaction goes on).
    h.ack(g, db2(), Phase2Op::Commit, BranchOutcome::Aborted);
    let (req, out) = resolve(&mut h, g, Some(db2()), ResolveAction::Commit);
    assert_eq!(resolve_records(&out)[0].branch_outcome, Some(BranchOutcome::HeuristicRollback));
    assert!(changed(reply_to(&h.sync_all(), req)));
    let (mut r, _) = Harness::restored(EngineConfig::default(), h.now, h.synced_records());
    let view = r.get(g).unwrap();
    assert_eq!(view.branches[1].outcome, Some(BranchOutcome::HeuristicRollback), "what happened stays");
    assert!(view.heuristic && view.branches[1].resolved);
}

#[test]
fn a_transaction_finished_by_a_resolution_is_answered_only_once_its_end_is_durable() {
    let mut h = Harness::new();
    let g = gtid(1);
    h.begin(g, vec![db1(), db2()]);
    let client = h.req();
    h.ev(Event::Commit { req: client, gtid: g, branches: vec![], wait_for_completion: true });
    h.vote(g, db1(), VoteResult::Prepared { metadata: Bytes::new() });
    h.vote(g, db2(), VoteResult::Prepared { metadata: Bytes::new() });
    h.synced(g);
    h.ack(g, db1(), Phase2Op::Commit, BranchOutcome::Committed);
    let (req, out) = resolve(&mut h, g, Some(db2()), ResolveAction::Commit);
    // The resolution first, then the End record it causes, both to be synced; no answer yet.
    let appended: Vec<(&str, bool)> = out
        .iter()
        .filter_map(|c| match c {
            Command::Append { record: LogRecord::Resolve(_), sync } => Some(("resolve", sync.is_some())),
            Command::Append { record: LogRecord::End(_), sync } => Some(("end", sync.is_some())),
            _ => None,
        })
        .collect();
    assert_eq!(appended, [("resolve", true), ("end", true)]);
    assert!(reply_to(&out, client).is_none() && reply_to(&out, req).is_none(), "{out:?}");
    let out = h.sync_all();
    assert!(changed(reply_to(&out, req)));
    assert!(matches!(reply_to(&out, client), Some(Ok(Reply::CommitOutcome(o))) if o.committed && o.completed));
}

#[test]
fn an_operators_three_phase_abort_survives_a_checkpoint_and_keeps_a_branch_without_record_a_hazard() {
    let cfg = EngineConfig { epoch: 4, ..EngineConfig::default() };
    let g = gtid(1);
    let db3 = key("db3", "b1");
    let votes = vec![(db1(), meta("m1"), T0 + 1), (db2(), Bytes::new(), T0 + 1), (db3.clone(), Bytes::new(), T0 + 1)];
    let precommit = LogRecord::PreCommit(record(g, T0 + 1, 3, votes));
    let (mut h, _) = Harness::restored(cfg.clone(), T0 + 100, vec![precommit.clone()]);
    // db1 has no record of the branch, db2 is prepared, db3 never answers.
    state(&mut h, g, db1(), ParticipantState::Unknown);
    state(&mut h, g, db2(), ParticipantState::Prepared);
    let (req, out) = resolve(&mut h, g, None, ResolveAction::Rollback);
    assert_eq!(resolve_records(&out)[0].hazards, vec![db1()]);
    assert!(changed(reply_to(&h.sync_all(), req)));
    let hazard =
        |v: &TxnView| v.branches[0].outcome == Some(BranchOutcome::HeuristicHazard) && v.branches[0].acknowledged;
    assert!(hazard(&h.get(g).unwrap()));

    // From the log, and from a checkpoint: the same abort under way, the same hazard.
    let (mut r, start) = Harness::restored(cfg.clone(), T0 + 200, h.synced_records_with(&precommit));
    assert!(hazard(&r.get(g).unwrap()) && start.contains(&abort_cmd(g, db3.clone(), Bytes::new())), "{start:?}");
    h.engine.cx.records_since_checkpoint = u64::MAX;
    let out = h.ev(Event::Tick);
    let Some(Command::Checkpoint { records }) = out.last() else { panic!("{out:?}") };
    let (mut r2, start) = Harness::restored(cfg, T0 + 200, records.clone());
    let view = r2.get(g).unwrap();
    assert_eq!(view.state, TxnState::Aborting);
    assert!(hazard(&view) && start.contains(&abort_cmd(g, db3, Bytes::new())), "{start:?}");
    assert_eq!(view.resolutions, r.get(g).unwrap().resolutions);
}

#[test]
fn a_one_phase_heuristic_forgotten_while_its_end_is_syncing_is_released() {
    let mut h = Harness::new();
    let g = gtid(1);
    h.begin(g, vec![db1()]);
    h.commit(g);
    h.sync_all();
    let hazard = Phase2Result::Outcome { outcome: BranchOutcome::HeuristicHazard, reason: None };
    let out = h.ev(Event::Phase2Done { gtid: g, branch: db1(), op: Phase2Op::Commit, result: hazard });
    assert!(out.iter().any(|c| matches!(c, Command::Append { record: LogRecord::End(e), .. } if e.kept_for_operator)));
    // Before the End record is durable:
    let (_, out) = resolve(&mut h, g, None, ResolveAction::Forget);
    assert!(resolve_records(&out)[0].releases, "the store keeps the row until a release: {out:?}");
    h.sync_all();
    let gauges = h.engine.gauges(h.now);
    assert_eq!((gauges.heuristic, gauges.retained), (0, 1));
}

impl Harness {
    /// The synced records, after `first` (a record the test restored this harness from).
    fn synced_records_with(&self, first: &LogRecord) -> Vec<LogRecord> {
        std::iter::once(first.clone()).chain(self.synced_records()).collect()
    }
}
