//! The engine as a cluster instance: what it owns, adopts and drops (see `shards.rs`).

use super::*;

const T0: Millis = 1_700_000_000_000;
/// Shards in these tests: `gtid(n)` is in shard `n % SHARDS`.
const SHARDS: u16 = 4;

fn gtid(n: u64) -> Gtid {
    Gtid::from_parts(T0, n)
}

fn key(resource: &str) -> BranchKey {
    BranchKey::new(resource, "b1").unwrap()
}

struct Node {
    engine: Engine,
    req: ReqId,
}

impl Node {
    fn new() -> Node {
        let cfg = EngineConfig { shard_count: SHARDS, ..EngineConfig::default() };
        let mut engine = Engine::new(cfg);
        for r in ["db1", "db2"] {
            engine.add_configured_participant(r.parse().unwrap(), format!("http://{r}"));
        }
        Node { engine, req: 0 }
    }

    fn ev(&mut self, event: Event) -> Vec<Command> {
        let mut out = Vec::new();
        self.engine.handle(T0 + 10, event, &mut out);
        out
    }

    fn next(&mut self) -> ReqId {
        self.req += 1;
        self.req
    }

    fn begin(&mut self, g: Gtid) -> Result<Reply, EngineError> {
        let req = self.next();
        let branches = vec![key("db1").into(), key("db2").into()];
        reply(self.ev(Event::Begin {
            req,
            gtid: g,
            timeout_ms: None,
            idempotency_key: None,
            branches,
            protocol: Protocol::TwoPhase,
            owner: None,
        }))
    }

    fn get(&mut self, g: Gtid) -> Result<Reply, EngineError> {
        let req = self.next();
        reply(self.ev(Event::Get { req, gtid: g }))
    }

    fn adopt(&mut self, shard: u16, epoch: u64, records: Vec<LogRecord>) -> Vec<Command> {
        self.ev(Event::AdoptShard { shard, epoch, forgotten_through_ms: 0, records })
    }
}

fn reply(mut out: Vec<Command>) -> Result<Reply, EngineError> {
    match out.pop() {
        Some(Command::Reply { reply, .. }) => reply,
        other => panic!("expected a reply, got {other:?}"),
    }
}

fn prepared() -> VoteResult {
    VoteResult::Prepared { metadata: Bytes::new() }
}

#[test]
fn a_cluster_engine_answers_only_for_shards_it_adopted_and_stamps_their_epoch() {
    let mut n = Node::new();
    let g = gtid(5); // shard 1
    assert_eq!(n.begin(g), Err(EngineError::NotOwner { gtid: g, shard: 1 }));
    assert!(n.adopt(1, 7, vec![]).is_empty());
    assert!(matches!(n.begin(g), Ok(Reply::Begun { .. })));
    let req = n.next();
    n.ev(Event::Commit { req, gtid: g, branches: vec![], wait_for_completion: false });
    n.ev(Event::Voted { gtid: g, branch: key("db1"), vote: prepared() });
    let out = n.ev(Event::Voted { gtid: g, branch: key("db2"), vote: prepared() });
    let epochs: Vec<u64> = out
        .iter()
        .filter_map(|c| match c {
            Command::Append { record: LogRecord::Commit(c), .. } => Some(c.epoch),
            _ => None,
        })
        .collect();
    assert_eq!(epochs, vec![7], "{out:?}");
    // Another shard is still not ours.
    assert_eq!(n.get(gtid(6)), Err(EngineError::NotOwner { gtid: gtid(6), shard: 2 }));
}

#[test]
fn an_adopted_shard_resumes_its_committed_transactions_and_keeps_its_finished_ones() {
    let mut donor = Node::new();
    donor.adopt(1, 3, vec![]);
    let (committed, finished) = (gtid(1), gtid(9));
    // The records the store would hold: a decided commit, and a finished transaction.
    let records = vec![
        LogRecord::Commit(CommitRecord {
            gtid: committed,
            epoch: 3,
            created_ms: T0,
            decided_ms: T0 + 1,
            idempotency_key: None,
            branches: vec![
                LoggedBranch { key: key("db1"), vote: Vote::Prepared, metadata: Bytes::new(), prepared_ms: T0 },
                LoggedBranch { key: key("db2"), vote: Vote::ReadOnly, metadata: Bytes::new(), prepared_ms: 0 },
            ],
            three_phase: None,
            owner: None,
        }),
        LogRecord::End(Arc::new(EndRecord {
            gtid: finished,
            committed: false,
            reason: Some("vote".into()),
            created_ms: T0,
            decided_ms: T0,
            completed_ms: T0 + 2,
            one_phase: false,
            three_phase: None,
            idempotency_key: None,
            branches: vec![],
            kept_for_operator: false,
            encoded: Default::default(),
            owner: None,
        })),
    ];
    let mut n = Node::new();
    let out = n.adopt(1, 4, records);
    // Phase 2 goes on at the prepared branch only.
    assert_eq!(out.len(), 1, "{out:?}");
    assert!(
        matches!(&out[0], Command::Commit { gtid, branch, one_phase: false, .. } if *gtid == committed && *branch == key("db1"))
    );
    match n.get(finished) {
        Ok(Reply::Transaction(view)) => assert_eq!(view.state, TxnState::Aborted),
        other => panic!("{other:?}"),
    }
    assert_eq!(n.engine.owned_shards().get(&1), Some(&4));
}

#[test]
fn a_dropped_shard_releases_its_waiters_and_sends_nothing_more() {
    let mut n = Node::new();
    n.adopt(1, 2, vec![]);
    let g = gtid(13); // shard 1
    n.begin(g).unwrap();
    let req = n.next();
    n.ev(Event::Commit { req, gtid: g, branches: vec![], wait_for_completion: false });
    assert_eq!(n.engine.live_in_shard(1), 1);
    let out = n.ev(Event::DropShard { shard: 1 });
    assert_eq!(out, vec![Command::Reply { req, reply: Err(EngineError::NotOwner { gtid: g, shard: 1 }) }]);
    assert_eq!(n.engine.live_in_shard(1), 0);
    // A late vote is the new owner's business: no abort from here.
    assert!(n.ev(Event::Voted { gtid: g, branch: key("db1"), vote: prepared() }).is_empty());
    assert_eq!(n.get(g), Err(EngineError::NotOwner { gtid: g, shard: 1 }));
}

#[test]
fn in_doubt_branches_of_shards_owned_elsewhere_are_left_to_their_owner() {
    let mut n = Node::new();
    n.adopt(2, 1, vec![]);
    let mine = gtid(2); // shard 2, no record: presumed abort
    let theirs = gtid(3); // shard 3
    let branch = |g: Gtid| InDoubtBranch { gtid: g, branch: key("db1"), metadata: Bytes::new() };
    let out = n.ev(Event::InDoubt {
        resource: "db1".parse().unwrap(),
        branches: vec![branch(mine), branch(theirs)],
        listed_ms: T0 + 10,
        confirmed: Some(BTreeMap::from([(2, 1)])),
    });
    assert_eq!(out, vec![Command::Abort { gtid: mine, branch: key("db1"), metadata: Bytes::new() }]);
}

#[test]
fn no_presumed_abort_without_the_store_confirming_the_lease_after_the_list() {
    // An instance that believes it owns shard 2 at epoch 1 (its lease lapsed unnoticed while
    // it was paused) lists a branch it has no record of: another owner may have committed it.
    let mut n = Node::new();
    n.adopt(2, 1, vec![]);
    let g = gtid(2);
    let listed = |n: &mut Node, confirmed: Option<BTreeMap<u16, u64>>| {
        n.ev(Event::InDoubt {
            resource: "db1".parse().unwrap(),
            branches: vec![InDoubtBranch { gtid: g, branch: key("db1"), metadata: Bytes::new() }],
            listed_ms: T0 + 10,
            confirmed,
        })
    };
    assert!(listed(&mut n, None).is_empty(), "unconfirmed");
    assert!(listed(&mut n, Some(BTreeMap::new())).is_empty(), "the lease is no longer held");
    assert!(listed(&mut n, Some(BTreeMap::from([(2, 2)]))).is_empty(), "held again at a newer epoch");
    assert_eq!(
        listed(&mut n, Some(BTreeMap::from([(2, 1)]))),
        vec![Command::Abort { gtid: g, branch: key("db1"), metadata: Bytes::new() }],
        "confirmed at the adopted epoch: nobody else owned the shard since"
    );
}

#[test]
fn a_participant_registered_elsewhere_is_connected_once() {
    let mut n = Node::new();
    let known = |n: &mut Node| {
        n.ev(Event::ParticipantKnown { resource: "db9".parse().unwrap(), endpoint: "http://db9".into() })
    };
    assert_eq!(
        known(&mut n),
        vec![Command::Connect { resource: "db9".parse().unwrap(), endpoint: "http://db9".into() }]
    );
    assert!(known(&mut n).is_empty());
}
