//! The actor's own bounds: checkpoint spacing and the bytes a branch may stage.

use super::*;

#[test]
fn checkpoints_wait_for_the_interval_and_for_as_many_records_as_the_last_one_held() {
    let mut config = ReferenceConfig::new("db".parse().unwrap(), "/nonexistent");
    config.checkpoint_every_records = 2;
    let mut actor = Actor::new(config);
    for i in 0..3 {
        actor.data.insert(format!("k{i}"), Bytes::new());
    }
    let branch = |id: &str| (Gtid::new_v7(), id.parse::<BranchId>().unwrap());
    let (committed, aborted) = (branch("c"), branch("a"));
    actor.finish(committed.clone(), Ended::Committed, 1, 7);
    actor.finish(aborted.clone(), Ended::Aborted, 2, 8);
    let mut out = Vec::new();
    let mut after = |actor: &mut Actor, records: u64| {
        out.clear();
        actor.records_since_checkpoint = records;
        actor.maybe_checkpoint(&mut out);
        match out.as_slice() {
            [] => None,
            [(_, Submission::Checkpoint(records))] => Some(records.clone()),
            _ => panic!("more than one submission"),
        }
    };
    assert_eq!(after(&mut actor, 1), None, "below the interval");
    let records = after(&mut actor, 2).expect("the interval reached: the whole state");
    assert_eq!(records.len(), 5);
    assert_eq!(records.iter().filter(|(t, _)| *t == TYPE_DATA).count(), 3);
    // The finished branches, as they were when they finished.
    let mut replayed = Actor::new(ReferenceConfig::new("db".parse().unwrap(), "/nonexistent"));
    for (rtype, payload) in &records {
        replayed.replay(*rtype, payload).unwrap();
    }
    assert!(matches!(replayed.branches.get(&committed), Some(Entry::Committed { .. })));
    assert!(matches!(replayed.branches.get(&aborted), Some(Entry::Aborted { .. })));
    let at: Vec<u64> = replayed.finished.iter().map(|f| f.at_ms).collect();
    assert_eq!(at, [7, 8]);

    assert_eq!(after(&mut actor, 4), None, "fewer records than the last checkpoint held");
    assert_eq!(after(&mut actor, 5).map(|r| r.len()), Some(5));
}

/// What a branch stages stays under what one log record can hold: with the default limits,
/// the write that would pass `max_branch_bytes` is refused and the branch keeps the rest.
#[test]
fn a_branch_stages_at_most_max_branch_bytes() {
    let config = ReferenceConfig::new("db".parse().unwrap(), "/nonexistent");
    let (limit, value_bytes) = (config.max_branch_bytes, config.max_value_bytes);
    assert!(limit < 1 << 20, "a prepare record must fit in one log record");
    let mut actor = Actor::new(config);
    let (gtid, branch) = (Gtid::new_v7(), "b".parse::<BranchId>().unwrap());
    let value = Bytes::from(vec![7u8; value_bytes]);
    let fit = limit / (value_bytes + 2);
    for i in 0..fit {
        actor.put(&mut Vec::new(), gtid, branch.clone(), format!("k{i}"), value.clone(), 1).unwrap();
    }
    let e = actor.put(&mut Vec::new(), gtid, branch.clone(), "one-more".into(), value, 1).unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    assert!(e.message().contains("bytes of keys and values"), "{}", e.message());
    match actor.branches.get(&(gtid, branch)) {
        Some(Entry::Active { writes, .. }) => assert_eq!(writes.len(), fit),
        _ => panic!("the branch is still active"),
    }
}
