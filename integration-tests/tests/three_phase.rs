//! Three-phase commit (docs/three-phase.md) with real processes: the reference participant, the
//! PostgreSQL adapter on the real database and the Kafka adapter on the real broker, in one
//! transaction. Commit and abort; the coordinator killed after the pre-commit acknowledgements
//! (every branch commits on its own) and after the votes (every branch aborts on its own), then
//! restarted (the termination protocol reaches the same outcome and reports it); a participant
//! killed while pre-committed and restarted after its deadline; a partition past both timeouts
//! between the coordinator and one participant, reported as heuristic mixed.

use pledge_integration_tests::kafka::*;
use pledge_integration_tests::pg::{self, int};
use pledge_integration_tests::proxy::{Link, Proxy};
use pledge_integration_tests::*;
use pledge_proto::v1;
use pledge_proto::v1::participant_client::ParticipantClient;
use tonic::Code;

/// Short timeouts so that the participants' own deadlines come within a test: a yes vote waits
/// 4 s for PreCommit, a pre-committed branch 2 s for the commit.
const TIMEOUTS: [&str; 8] = [
    "--prepare-timeout-ms",
    "1000",
    "--participant-rpc-timeout-ms",
    "1000",
    "--precommit-wait-ms",
    "4000",
    "--docommit-wait-ms",
    "2000",
];

/// A branch's state as its participant answers the termination protocol's query.
async fn participant_state(p: &Process, resource: &str, gtid: &str, branch_id: &str) -> v1::BranchState {
    let mut c = ParticipantClient::new(p.channel().await);
    let xid = v1::BranchXid { resource_id: resource.into(), gtid: gtid.into(), branch_id: branch_id.into() };
    let r = c
        .query_state(v1::QueryStateRequest { coordinator_id: "observer".into(), epoch: 0, branches: vec![xid] })
        .await
        .expect("QueryState")
        .into_inner();
    r.results[0].state()
}

async fn wait_state(p: &Process, resource: &str, gtid: &str, branch_id: &str, want: v1::BranchState) {
    eventually(&format!("{resource}/{branch_id} of {gtid} to be {want:?}"), || async {
        (participant_state(p, resource, gtid, branch_id).await == want).then_some(())
    })
    .await;
}

/// The reference participant, PostgreSQL (database a) and Kafka, and a table for the rows.
struct World {
    dir: TestDir,
    reference: Process,
    pg: Process,
    kafka: Process,
    /// This test's coordinator id (its PostgreSQL GIDs carry it).
    cid: String,
    table: String,
    topic: String,
}

impl World {
    async fn new(test: &str) -> World {
        let dir = TestDir::new(test);
        let prefix = unique(test);
        let reference = dir.participant("ref", 0, &[], &[]).await;
        let pg = dir.postgres_adapter("pg", 0, &[("db_a", pg_url('a'))], &[], &[]).await;
        let kafka = dir.kafka_adapter("kafka", 0, &prefix, &[], &[]).await;
        let table = format!("three_phase_{}", fastrand::u32(..));
        let ddl = format!("CREATE TABLE {table} (id int PRIMARY KEY)");
        sqlx::query(sqlx::AssertSqlSafe(ddl)).execute(&pg::pool('a').await).await.unwrap();
        World { dir, reference, pg, kafka, cid: prefix, table, topic: unique("three-phase") }
    }

    async fn coordinator(&self, env: &[(&str, &str)]) -> Process {
        let participants = [("ref", &self.reference), ("db_a", &self.pg), ("kafka", &self.kafka)];
        let args: Vec<&str> = TIMEOUTS.iter().copied().chain(["--coordinator-id", &self.cid]).collect();
        self.dir.coordinator_with(&participants, &args, env).await
    }

    /// Begins a three-phase transaction over the three and does its work at each: a key at
    /// the reference participant, row `id` in PostgreSQL, record `id` in Kafka.
    async fn transfer(&self, coordinator: &Process, id: i64) -> String {
        let c = coordinator_client(coordinator).await;
        // The coordinator learns at connect whether each participant supports three-phase
        // commit; until then a three-phase Begin is UNAVAILABLE (retry).
        let gtid = eventually("a three-phase Begin", || {
            let mut c = c.clone();
            async move {
                let r = c
                    .begin(v1::BeginRequest {
                        branches: vec![branch("ref", "r"), branch("db_a", "row"), branch("kafka", "event")],
                        protocol: v1::Protocol::ThreePhase as i32,
                        ..Default::default()
                    })
                    .await;
                match r {
                    Ok(r) => Some(r.into_inner().gtid),
                    Err(e) if e.code() == Code::Unavailable => None,
                    Err(e) => panic!("three-phase Begin: {e:?}"),
                }
            }
        })
        .await;
        put(&mut store_client(&self.reference).await, &gtid, "r", &format!("k{id}"), "v").await;
        let insert = format!("INSERT INTO {} VALUES ($1)", self.table);
        pg::execute(&mut pg::branch_client(&self.pg).await, "db_a", &gtid, "row", &insert, vec![int(id)])
            .await
            .unwrap();
        let key = format!("e{id}");
        produce(&mut kafka_client(&self.kafka).await, &gtid, "event", &self.topic, &[(&key, "v")]).await.unwrap();
        gtid
    }

    async fn rows(&self) -> Vec<i32> {
        let sql = format!("SELECT id FROM {} ORDER BY id", self.table);
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).fetch_all(&pg::pool('a').await).await.unwrap()
    }

    async fn reference_value(&self, id: i64) -> Option<String> {
        read(&mut store_client(&self.reference).await, &format!("k{id}")).await
    }

    /// Every branch of `gtid` is in `want` at its participant.
    async fn wait_all(&self, gtid: &str, want: v1::BranchState) {
        wait_state(&self.reference, "ref", gtid, "r", want).await;
        wait_state(&self.pg, "db_a", gtid, "row", want).await;
        wait_state(&self.kafka, "kafka", gtid, "event", want).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_phase_commits_and_aborts_over_reference_postgres_and_kafka() {
    let w = World::new("3pc-paths").await;
    let coordinator = w.coordinator(&[]).await;
    let mut c = coordinator_client(&coordinator).await;

    let gtid = w.transfer(&coordinator, 1).await;
    let r = commit(&mut c, &gtid, true).await.unwrap();
    assert_eq!((r.outcome(), r.completed, r.heuristic), (v1::Outcome::Committed, true, false), "{}", r.reason);
    let t = get(&mut c, &gtid).await.unwrap();
    assert_eq!((t.protocol(), t.heuristic_mixed), (v1::Protocol::ThreePhase, false));
    for b in &t.branches {
        // Each branch answered PreCommit before the commit went out.
        assert_eq!(b.participant_state(), v1::BranchState::Precommitted, "{}", b.resource_id);
        assert_eq!(b.outcome(), v1::BranchOutcome::Committed, "{}", b.resource_id);
    }
    assert_eq!(w.rows().await, vec![1]);
    assert_eq!(w.reference_value(1).await.as_deref(), Some("v"));
    assert_eq!(committed_keys(&w.topic, &["e1"]).await, vec!["e1"]);

    // A branch that did no work votes no: everything is rolled back, nothing pre-committed.
    let no = w.transfer(&coordinator, 2).await;
    c.enlist(v1::EnlistRequest { gtid: no.clone(), branches: vec![branch("ref", "idle")] }).await.unwrap();
    let r = commit(&mut c, &no, true).await.unwrap();
    assert_eq!(r.outcome(), v1::Outcome::Aborted);
    assert!(r.reason.contains("branch ref/idle voted no"), "{}", r.reason);
    // The client's Abort.
    let aborted = w.transfer(&coordinator, 3).await;
    c.abort(v1::AbortRequest { gtid: aborted.clone() }).await.unwrap();
    w.wait_all(&aborted, v1::BranchState::Aborted).await;
    w.wait_all(&no, v1::BranchState::Aborted).await;
    assert_eq!(w.rows().await, vec![1]);
    assert_eq!(w.reference_value(2).await, None);
    assert!(pg::prepared_of(&w.cid).await.is_empty());
    // A later commit is visible past both aborted transactions: they hold no reader back.
    let later = w.transfer(&coordinator, 4).await;
    assert_eq!(commit(&mut c, &later, true).await.unwrap().outcome(), v1::Outcome::Committed);
    assert_eq!(committed_keys(&w.topic, &["e1", "e4"]).await, vec!["e1", "e4"]);
}

/// Killed once every branch acknowledged PreCommit, never restarted: each branch commits on its
/// own at its do-commit deadline. Then restarted: the termination protocol finds them
/// committed and reports the transaction committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_killed_after_precommit_every_branch_commits_on_its_own() {
    let w = World::new("3pc-kill-precommit").await;
    let mut coordinator = w.coordinator(&[("PLEDGE_CRASH_AT", "coordinator::after_precommit_acked")]).await;
    let id = w.cid.clone();
    let gtid = w.transfer(&coordinator, 1).await;
    assert!(commit(&mut coordinator_client(&coordinator).await, &gtid, false).await.is_err());
    coordinator.wait_crashed().await;

    // No coordinator: the branches commit themselves.
    w.wait_all(&gtid, v1::BranchState::Committed).await;
    assert!(pg::prepared_of(&id).await.is_empty(), "PostgreSQL has no prepared GID left");
    assert_eq!(w.rows().await, vec![1]);
    assert_eq!(committed_keys(&w.topic, &["e1"]).await, vec!["e1"], "read_committed readers see the record");
    assert_eq!(w.reference_value(1).await.as_deref(), Some("v"));

    let coordinator = w.coordinator(&[]).await;
    let mut c = coordinator_client(&coordinator).await;
    let t = eventually("the termination protocol to finish", || {
        let (mut c, gtid) = (c.clone(), gtid.clone());
        async move { get(&mut c, &gtid).await.ok().filter(|t| t.state() == v1::TransactionState::Committed) }
    })
    .await;
    assert!(!t.heuristic && !t.heuristic_mixed, "{t:?}");
    let r = commit(&mut c, &gtid, true).await.unwrap();
    assert_eq!(r.outcome(), v1::Outcome::Committed);
}

/// Killed once every vote was yes, before the pre-commit decision: each branch aborts on its
/// own at its wait deadline. Restarted: no decision record, so presumed abort, which is what the
/// branches did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_killed_after_the_votes_every_branch_aborts_on_its_own() {
    let w = World::new("3pc-kill-votes").await;
    let mut coordinator = w.coordinator(&[("PLEDGE_CRASH_AT", "coordinator::after_cancommit_votes")]).await;
    let id = w.cid.clone();
    let gtid = w.transfer(&coordinator, 1).await;
    assert!(commit(&mut coordinator_client(&coordinator).await, &gtid, false).await.is_err());
    coordinator.wait_crashed().await;
    assert_eq!(participant_state(&w.pg, "db_a", &gtid, "row").await, v1::BranchState::Prepared);

    w.wait_all(&gtid, v1::BranchState::Aborted).await;
    assert!(pg::prepared_of(&id).await.is_empty(), "PostgreSQL has no prepared GID left");
    assert!(w.rows().await.is_empty());
    assert_eq!(w.reference_value(1).await, None);

    let coordinator = w.coordinator(&[]).await;
    let mut c = coordinator_client(&coordinator).await;
    let e = get(&mut c, &gtid).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "never committed here: {}", e.message());
    // The aborted Kafka transaction holds no reader back.
    let later = w.transfer(&coordinator, 2).await;
    assert_eq!(commit(&mut c, &later, true).await.unwrap().outcome(), v1::Outcome::Committed);
    assert_eq!(committed_keys(&w.topic, &["e2"]).await, vec!["e2"]);
}

/// The PostgreSQL adapter killed while its branch is pre-committed (and the coordinator gone),
/// restarted after the deadline: it commits at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_killed_while_precommitted_commits_when_restarted_after_its_deadline() {
    let mut w = World::new("3pc-kill-participant").await;
    let mut coordinator = w.coordinator(&[("PLEDGE_CRASH_AT", "coordinator::after_precommit_acked")]).await;
    let id = w.cid.clone();
    let gtid = w.transfer(&coordinator, 1).await;
    assert!(commit(&mut coordinator_client(&coordinator).await, &gtid, false).await.is_err());
    coordinator.wait_crashed().await;
    w.pg.kill9().await;

    // The reference participant's deadline (set at the same PreCommit round) passes: it commits.
    wait_state(&w.reference, "ref", &gtid, "r", v1::BranchState::Committed).await;
    assert_eq!(pg::prepared_of(&id).await.len(), 1, "nobody commits PostgreSQL's branch while its adapter is down");
    let port = w.pg.port();
    w.pg = w.dir.postgres_adapter("pg", port, &[("db_a", pg_url('a'))], &[], &[]).await;
    wait_state(&w.pg, "db_a", &gtid, "row", v1::BranchState::Committed).await;
    assert!(pg::prepared_of(&id).await.is_empty());
    assert_eq!(w.rows().await, vec![1]);
}

/// A partition between the coordinator and one participant, from just before PreCommit until
/// past both timeouts: the other branches pre-commit and commit on their own, the cut-off one
/// aborts on its own. Healed, the coordinator hears it and reports the transaction heuristic
/// mixed: logged, counted, shown by Get and List — never a clean outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_past_both_timeouts_is_reported_as_heuristic_mixed() {
    let dir = TestDir::new("3pc-partition");
    let near = dir.participant("near", 0, &[], &[]).await;
    let far = dir.participant("far", 0, &[], &[]).await;
    let proxy = Proxy::start(format!("127.0.0.1:{}", far.port()).parse().unwrap()).await;
    let participants = [("near", near.endpoint()), ("far", format!("http://{}", proxy.addr))];
    let metrics = ["--metrics-listen", "127.0.0.1:0"];
    let args: Vec<&str> = TIMEOUTS.iter().copied().chain(metrics).collect();
    // Paused for 1.5 s once the votes are in, before the pre-commit decision is written: time
    // for the test to cut the link.
    let env = [("PLEDGE_PAUSE_AT", "coordinator::after_cancommit_votes=1500")];
    let coordinator = dir.coordinator_for(&participants, &args, &env).await;
    let mut c = coordinator_client(&coordinator).await;
    let gtid = eventually("a three-phase Begin", || {
        let mut c = c.clone();
        async move {
            c.begin(v1::BeginRequest {
                branches: vec![branch("near", "a"), branch("far", "b")],
                protocol: v1::Protocol::ThreePhase as i32,
                ..Default::default()
            })
            .await
            .ok()
            .map(|r| r.into_inner().gtid)
        }
    })
    .await;
    put(&mut store_client(&near).await, &gtid, "a", "x", "1").await;
    put(&mut store_client(&far).await, &gtid, "b", "y", "1").await;
    let committing = {
        let (mut c, gtid) = (c.clone(), gtid.clone());
        tokio::spawn(async move { commit(&mut c, &gtid, false).await })
    };
    eventually("the coordinator to pause after the votes", || async {
        coordinator.log().contains("pause point coordinator::after_cancommit_votes reached").then_some(())
    })
    .await;
    proxy.set(Link::Frozen);

    // Past both timeouts: the reachable branch committed on its own, the cut-off one aborted.
    wait_state(&near, "near", &gtid, "a", v1::BranchState::Committed).await;
    wait_state(&far, "far", &gtid, "b", v1::BranchState::Aborted).await;
    // The coordinator committed (a pre-committed branch decides) and heard it from `near`.
    let r = committing.await.unwrap().unwrap();
    assert_eq!(r.outcome(), v1::Outcome::Committed);

    proxy.set(Link::Open);
    let t = eventually("the coordinator to hear from the healed participant", || {
        let (mut c, gtid) = (c.clone(), gtid.clone());
        async move { get(&mut c, &gtid).await.ok().filter(|t| t.state() == v1::TransactionState::Committed) }
    })
    .await;
    assert!(t.heuristic && t.heuristic_mixed, "{t:?}");
    let far_branch = t.branches.iter().find(|b| b.resource_id == "far").unwrap();
    assert_eq!(far_branch.outcome(), v1::BranchOutcome::HeuristicRollback);
    let near_branch = t.branches.iter().find(|b| b.resource_id == "near").unwrap();
    assert_eq!(near_branch.outcome(), v1::BranchOutcome::Committed);
    let listed =
        c.list(v1::ListRequest { heuristic: true, ..Default::default() }).await.unwrap().into_inner().transactions;
    assert!(listed.iter().any(|l| l.gtid == gtid && l.heuristic_mixed), "{listed:?}");
    let metrics = coordinator.metrics().await;
    assert_eq!(metrics.get("pledge_heuristic_mixed_transactions_total"), 1.0);
    assert_eq!(metrics.get(r#"pledge_heuristic_outcomes_total{kind="rollback"}"#), 1.0);
    // The operator's view.
    let shown = cli(&coordinator, &["txn", "get", &gtid]);
    assert!(shown.contains("protocol:   three-phase") && shown.contains("HEURISTIC MIXED"), "{shown}");
    assert!(shown.contains("far/b  vote=PREPARED  outcome=HEURISTIC_ROLLBACK"), "{shown}");
    let listed = cli(&coordinator, &["txn", "list", "--heuristic"]);
    assert!(listed.contains(&gtid) && listed.contains("HEURISTIC MIXED"), "{listed}");
    assert!(coordinator.log().contains("heuristic mixed: branches of one transaction ended differently"));
}

/// A participant built on the SDK that does not offer three-phase commit (it keeps
/// `Participant::three_phase`'s default): its branches never change, and it says so to the
/// capability probe with UNIMPLEMENTED.
struct TwoPhaseOnly;

#[tonic::async_trait]
impl pledge_sdk::Participant for TwoPhaseOnly {
    async fn prepare(&self, _: &str, _: &pledge_proto::Xid, _: bool) -> Result<pledge_sdk::Vote, pledge_sdk::Error> {
        Ok(pledge_sdk::Vote::ReadOnly)
    }

    async fn commit(
        &self,
        _: &str,
        _: &pledge_proto::Xid,
        _: pledge_sdk::CommitKind,
        _: &[u8],
    ) -> Result<pledge_sdk::Outcome, pledge_sdk::Error> {
        Ok(pledge_sdk::Outcome::Committed)
    }

    async fn abort(&self, _: &str, _: &pledge_proto::Xid, _: &[u8]) -> Result<pledge_sdk::Outcome, pledge_sdk::Error> {
        Ok(pledge_sdk::Outcome::Aborted { reason: "aborted".into() })
    }

    async fn recover(
        &self,
        _: &str,
        _: &pledge_sdk::RecoverQuery,
    ) -> Result<pledge_sdk::RecoverPage, pledge_sdk::Error> {
        Ok(pledge_sdk::RecoverPage::default())
    }
}

/// A three-phase transaction that names a participant without three-phase commit is refused,
/// at Begin and at Enlist, with FAILED_PRECONDITION naming it — never run as two-phase — and
/// changes nothing; a two-phase transaction takes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_without_three_phase_commit_is_refused_by_name() {
    let closing = tokio_util::sync::CancellationToken::new();
    let routes = pledge_sdk::routes(std::sync::Arc::new(TwoPhaseOnly), closing.clone()).await;
    let listener = pledge_proto::transport::Listener::bind(&"127.0.0.1:0".parse().unwrap()).await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let router = pledge_proto::transport::server(None).add_routes(routes.routes());
    let served = tokio::spawn(listener.serve(router, closing.clone().cancelled_owned(), None));

    let dir = TestDir::new("3pc-refused");
    let reference = dir.participant("ref", 0, &[], &[]).await;
    let participants = [("ref", reference.endpoint()), ("legacy", endpoint)];
    let coordinator = dir.coordinator_for(&participants, &[], &[]).await;
    let mut c = coordinator_client(&coordinator).await;
    let three_phase = |branches: Vec<v1::BranchRef>| v1::BeginRequest {
        branches,
        protocol: v1::Protocol::ThreePhase as i32,
        ..Default::default()
    };
    // Until the coordinator has heard the probe's answer: UNAVAILABLE, not a guess.
    let e = eventually("the capability probe's answer", || {
        let mut c = c.clone();
        async move {
            match c.begin(three_phase(vec![branch("ref", "a"), branch("legacy", "b")])).await {
                Err(e) if e.code() == Code::Unavailable => None,
                other => Some(other.expect_err("refused")),
            }
        }
    })
    .await;
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert!(e.message().contains("participant \"legacy\" does not support three-phase commit"), "{}", e.message());

    let gtid = c.begin(three_phase(vec![branch("ref", "a")])).await.unwrap().into_inner().gtid;
    let e =
        c.enlist(v1::EnlistRequest { gtid: gtid.clone(), branches: vec![branch("legacy", "b")] }).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert!(e.message().contains("\"legacy\""), "{}", e.message());
    let t = get(&mut c, &gtid).await.unwrap();
    assert_eq!(t.branches.len(), 1, "the refused Enlist changed nothing: {t:?}");
    c.abort(v1::AbortRequest { gtid }).await.unwrap();

    let two = begin(&mut c, &[("ref", "a"), ("legacy", "b")]).await;
    put(&mut store_client(&reference).await, &two, "a", "k", "v").await;
    assert_eq!(commit(&mut c, &two, true).await.unwrap().outcome(), v1::Outcome::Committed);
    closing.cancel();
    served.await.unwrap().unwrap();
}
