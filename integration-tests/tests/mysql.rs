//! The MySQL/MariaDB participant against the real MariaDB the project's scripts start: the
//! participant conformance suite (two-phase and three-phase); transfers across MariaDB,
//! PostgreSQL and Kafka through a coordinator, committed together or, when a branch fails,
//! aborted together; kill -9 of the adapter after XA PREPARE, of `mariadbd` itself with a branch
//! prepared and of the coordinator between its decision and phase 2; a one-phase commit cut
//! short; every heuristic outcome produced for real (branches ended by hand, an adapter's lost
//! journal), reported, and resolved by an operator with `pledge txn resolve`.
//!
//! The test that kills the server takes [`SERVER`] for writing; every other test of this file
//! holds it for reading, so none of them runs while the server is down.

use pledge_conformance::{Options, Target};
use pledge_integration_tests::kafka::{committed_keys, kafka_client, produce, unique};
use pledge_integration_tests::mariadb::{kill9_server, mariadb_url, restart_server};
use pledge_integration_tests::mysql::*;
use pledge_integration_tests::pg::{self, int, text};
use pledge_integration_tests::*;
use pledge_proto::v1;

/// The conformance suite's own coordinator id: the adapter serves that coordinator.
const CONFORMANCE: &str = "conformance";

/// Held for reading by every test of this file, for writing by the one that kills the server.
static SERVER: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

struct Adapter {
    dir: TestDir,
    process: Process,
    table: String,
}

impl Target for Adapter {
    fn endpoint(&self) -> String {
        self.process.endpoint()
    }

    fn resource(&self) -> String {
        "my_a".into()
    }

    async fn work(&mut self, gtid: &str, branch: &str, key: &str) -> Result<(), String> {
        let mut c = mysql_client(&self.process).await;
        let sql = format!("INSERT INTO {} (k) VALUES (?)", self.table);
        mysql_execute(&mut c, "my_a", gtid, branch, &sql, vec![text(key)]).await.map(drop).map_err(|e| e.to_string())
    }

    async fn visible(&mut self, key: &str) -> Result<bool, String> {
        let sql = format!("SELECT count(*) FROM {} WHERE k = ?", self.table);
        let n: i64 =
            sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).bind(key).fetch_one(&mysql_pool('a').await).await.unwrap();
        Ok(n == 1)
    }

    async fn restart(&mut self) -> Result<(), String> {
        self.process.kill9().await;
        let port = self.process.port();
        let resources = [("my_a", mariadb_url('a'))];
        self.process = self.dir.mysql_adapter("mysql", port, CONFORMANCE, &resources, &[], &[]).await;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_adapter_conforms() {
    let _server = SERVER.read().await;
    let dir = TestDir::new("mysql-conformance");
    let table = format!("conf_{}", fastrand::u32(..));
    let ddl = format!("CREATE TABLE {table} (k VARCHAR(255) PRIMARY KEY)");
    sqlx::query(sqlx::AssertSqlSafe(ddl)).execute(&mysql_pool('a').await).await.unwrap();
    let resources = [("my_a", mariadb_url('a'))];
    let process = dir.mysql_adapter("mysql", 0, CONFORMANCE, &resources, &[], &[]).await;
    let report = pledge_conformance::run(&mut Adapter { dir, process, table }, &Options::default()).await;
    assert!(report.ok() && report.skipped.is_empty(), "{report}");
    for check in [
        "a_yes_vote_with_no_pre_commit_aborts_itself_at_its_wait_deadline",
        "a_pre_committed_branch_commits_itself_at_its_do_commit_deadline",
        "three_phase_deadlines_and_epochs_survive_a_restart",
    ] {
        assert!(report.passed.contains(&check), "{check} did not run: {report}");
    }
}

/// Accounts in MariaDB (database a) and PostgreSQL (database a), one adapter each, one
/// coordinator: a transfer commits at both or at neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_across_mariadb_postgres_and_kafka_commit_atomically_and_a_failing_branch_aborts_all() {
    let _server = SERVER.read().await;
    let dir = TestDir::new("mysql-transfer");
    let cid = format!("mysql-transfer-{:06x}", fastrand::u32(..) & 0xffffff);
    let table = format!("acct_{}", fastrand::u32(..));
    let my = mysql_pool('a').await;
    let ddl = format!("CREATE TABLE {table} (id INT PRIMARY KEY, balance INT NOT NULL CHECK (balance >= 0))");
    sqlx::query(sqlx::AssertSqlSafe(ddl.clone())).execute(&my).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("INSERT INTO {table} VALUES (1, 100)"))).execute(&my).await.unwrap();
    let pgp = pg::pool('a').await;
    sqlx::query(sqlx::AssertSqlSafe(ddl)).execute(&pgp).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("INSERT INTO {table} VALUES (1, 100)"))).execute(&pgp).await.unwrap();

    let mysql = dir.mysql_adapter("mysql", 0, &cid, &[("my_a", mariadb_url('a'))], &[], &[]).await;
    let pga = dir.postgres_adapter("pg", 0, &[("db_a", pg_url('a'))], &[], &[]).await;
    let kafka = dir.kafka_adapter("kafka", 0, &unique("mysql-transfer"), &[], &[]).await;
    let participants = [("my_a", &mysql), ("db_a", &pga), ("kafka", &kafka)];
    let coordinator = dir.coordinator_with(&participants, &["--coordinator-id", &cid], &[]).await;
    let topic = unique("transfers");
    let mut c = coordinator_client(&coordinator).await;
    let (mut myc, mut pgc) = (mysql_client(&mysql).await, pg::branch_client(&pga).await);
    let my_update = format!("UPDATE {table} SET balance = balance + ? WHERE id = ?");
    let pg_update = format!("UPDATE {table} SET balance = balance + $1 WHERE id = $2");
    let balances = || async {
        let sql = format!("SELECT balance FROM {table} WHERE id = 1");
        let m: i32 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.clone())).fetch_one(&my).await.unwrap();
        let p: i32 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).fetch_one(&pgp).await.unwrap();
        (m, p)
    };

    // 30 from MariaDB to PostgreSQL, announced on Kafka.
    let gtid = begin(&mut c, &[("my_a", "debit"), ("db_a", "credit"), ("kafka", "event")]).await;
    let r = mysql_execute(&mut myc, "my_a", &gtid, "debit", &my_update, vec![int(-30), int(1)]).await.unwrap();
    assert_eq!(r.results[0].rows_affected, 1);
    pg::execute(&mut pgc, "db_a", &gtid, "credit", &pg_update, vec![int(30), int(1)]).await.unwrap();
    produce(&mut kafka_client(&kafka).await, &gtid, "event", &topic, &[("transfer-1", "30")]).await.unwrap();
    let t = commit(&mut c, &gtid, true).await.unwrap();
    assert_eq!((t.outcome(), t.completed), (v1::Outcome::Committed, true), "{}", t.reason);
    assert_eq!(balances().await, (70, 130));
    assert_eq!(committed_keys(&topic, &["transfer-1"]).await, vec!["transfer-1"]);
    let got = get(&mut c, &gtid).await.unwrap();
    let debit = got.branches.iter().find(|b| b.resource_id == "my_a").unwrap();
    let metadata = String::from_utf8(debit.metadata.clone()).unwrap();
    assert!(metadata.starts_with("xid=1347175495:"), "the vote metadata names the XA XID: {metadata}");

    // 100 more would overdraw the MariaDB account: its statement fails, the branch votes no,
    // and the PostgreSQL credit and the Kafka event are rolled back with it.
    let gtid = begin(&mut c, &[("my_a", "debit"), ("db_a", "credit"), ("kafka", "event")]).await;
    pg::execute(&mut pgc, "db_a", &gtid, "credit", &pg_update, vec![int(100), int(1)]).await.unwrap();
    produce(&mut kafka_client(&kafka).await, &gtid, "event", &topic, &[("transfer-2", "100")]).await.unwrap();
    let e = mysql_execute(&mut myc, "my_a", &gtid, "debit", &my_update, vec![int(-100), int(1)]).await.unwrap_err();
    assert!(e.message().contains("SQL error 4025"), "a CHECK constraint failure: {}", e.message());
    let t = commit(&mut c, &gtid, true).await.unwrap();
    assert_eq!(t.outcome(), v1::Outcome::Aborted, "{}", t.reason);
    assert_eq!(balances().await, (70, 130));
    // A later committed event proves the reader got past where the aborted one was.
    let gtid = begin(&mut c, &[("kafka", "event")]).await;
    produce(&mut kafka_client(&kafka).await, &gtid, "event", &topic, &[("marker", "")]).await.unwrap();
    assert_eq!(commit(&mut c, &gtid, true).await.unwrap().outcome(), v1::Outcome::Committed);
    assert_eq!(committed_keys(&topic, &["transfer-1", "marker"]).await, vec!["transfer-1", "marker"]);
    assert!(pg::prepared_of(&cid).await.is_empty());
    assert!(prepared_of(&cid).await.is_empty(), "no XA transaction of coordinator {cid} is left prepared");
}

/// The XA transactions of coordinator `cid` the server holds prepared (as hex of gtrid+bqual).
async fn prepared_of(cid: &str) -> Vec<String> {
    use sqlx::Row;
    let prefix: String = format!("{cid}:").bytes().map(|b| format!("{b:02x}")).collect();
    let rows = sqlx::raw_sql("XA RECOVER").fetch_all(&mysql_pool('a').await).await.unwrap();
    rows.iter()
        .filter(|r| {
            r.try_get::<i64, _>(0).or_else(|_| r.try_get::<u64, _>(0).map(|n| n as i64)).ok() == Some(1347175495)
        })
        .map(|r| r.get::<Vec<u8>, _>(3).iter().map(|b| format!("{b:02x}")).collect::<String>())
        .filter(|data| data.starts_with(&prefix))
        .collect()
}

/// A MySQL adapter (resource `my_a`), a reference participant (`ref`) and a coordinator, all
/// for coordinator id `cid`, and a table of keys in MariaDB.
struct Setup {
    dir: TestDir,
    cid: String,
    mysql: Process,
    reference: Process,
    coordinator: Process,
    table: String,
}

impl Setup {
    async fn new(test: &str, mysql_env: &[(&str, &str)], coordinator_env: &[(&str, &str)]) -> Setup {
        let dir = TestDir::new(test);
        let cid = format!("{test}-{:06x}", fastrand::u32(..) & 0xffffff);
        let table = format!("keys_{}", fastrand::u32(..));
        let ddl = format!("CREATE TABLE {table} (k VARCHAR(255) PRIMARY KEY)");
        sqlx::query(sqlx::AssertSqlSafe(ddl)).execute(&mysql_pool('a').await).await.unwrap();
        let mysql = dir.mysql_adapter("mysql", 0, &cid, &[("my_a", mariadb_url('a'))], &[], mysql_env).await;
        let reference = dir.participant("ref", 0, &[], &[]).await;
        let coordinator = start_coordinator(&dir, &cid, &mysql, &reference, coordinator_env).await;
        Setup { dir, cid, mysql, reference, coordinator, table }
    }

    async fn restart_coordinator(&mut self) {
        self.coordinator = start_coordinator(&self.dir, &self.cid, &self.mysql, &self.reference, &[]).await;
    }

    async fn restart_mysql(&mut self) {
        let port = self.mysql.port();
        self.mysql = self.dir.mysql_adapter("mysql", port, &self.cid, &[("my_a", mariadb_url('a'))], &[], &[]).await;
    }

    /// A transaction inserting `key` in MariaDB (and, with `reference`, writing it at the
    /// reference participant too).
    async fn work(&self, key: &str, reference: bool) -> String {
        let mut c = coordinator_client(&self.coordinator).await;
        let branches: &[(&str, &str)] = if reference { &[("my_a", "rows"), ("ref", "r")] } else { &[("my_a", "rows")] };
        let gtid = begin(&mut c, branches).await;
        let sql = format!("INSERT INTO {} (k) VALUES (?)", self.table);
        mysql_execute(&mut mysql_client(&self.mysql).await, "my_a", &gtid, "rows", &sql, vec![text(key)])
            .await
            .unwrap();
        if reference {
            put(&mut store_client(&self.reference).await, &gtid, "r", key, "v").await;
        }
        gtid
    }

    async fn visible(&self, key: &str) -> bool {
        let sql = format!("SELECT count(*) FROM {} WHERE k = ?", self.table);
        let n: i64 =
            sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).bind(key).fetch_one(&mysql_pool('a').await).await.unwrap();
        n == 1
    }
}

async fn start_coordinator(
    dir: &TestDir,
    cid: &str,
    mysql: &Process,
    reference: &Process,
    env: &[(&str, &str)],
) -> Process {
    dir.coordinator_with(&[("my_a", mysql), ("ref", reference)], &["--coordinator-id", cid], env).await
}

/// Killed right after its XA PREPARE, before answering: the coordinator gets no vote and
/// aborts; the prepared branch waits at the server (detached from the dead session) until the
/// restarted adapter rolls it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapter_killed_after_xa_prepare_is_rolled_back_after_its_restart() {
    let _server = SERVER.read().await;
    let mut s = Setup::new("my-kill-prepare", &[("PLEDGE_CRASH_AT", "mysql::after_prepare")], &[]).await;
    let gtid = s.work("k1", true).await;
    let r = commit(&mut coordinator_client(&s.coordinator).await, &gtid, false).await.unwrap();
    assert_eq!(r.outcome(), v1::Outcome::Aborted, "no vote from the dead adapter: {}", r.reason);
    s.mysql.wait_crashed().await;
    assert_eq!(prepared_of(&s.cid).await.len(), 1, "the adapter died after XA PREPARE");
    s.restart_mysql().await;
    let r = commit(&mut coordinator_client(&s.coordinator).await, &gtid, true).await.unwrap();
    assert_eq!((r.outcome(), r.completed), (v1::Outcome::Aborted, true));
    eventually("no prepared XA transaction of ours left", || async {
        prepared_of(&s.cid).await.is_empty().then_some(())
    })
    .await;
    assert!(!s.visible("k1").await);
}

/// The coordinator dies once its commit decision is durable, before phase 2; then `mariadbd`
/// itself is killed with the branch prepared and started again: the branch is still prepared
/// (XA RECOVER lists it, and so does the adapter's Recover, which the coordinator's recovery
/// scan calls), and the restarted coordinator commits it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepared_branch_survives_mariadb_killed_and_is_committed_after_the_coordinator_restarts() {
    let _server = SERVER.write().await;
    let mut s = Setup::new("my-kill-server", &[], &[("PLEDGE_CRASH_AT", "coordinator::after_commit_synced")]).await;
    let gtid = s.work("k1", true).await;
    assert!(commit(&mut coordinator_client(&s.coordinator).await, &gtid, false).await.is_err());
    s.coordinator.wait_crashed().await;
    eventually("the branch prepared at the server", || async { (prepared_of(&s.cid).await.len() == 1).then_some(()) })
        .await;

    kill9_server().await;
    restart_server().await;
    let listed = prepared_of(&s.cid).await;
    assert_eq!(listed.len(), 1, "the prepared branch survived kill -9 of mariadbd");
    assert!(!s.visible("k1").await);
    // What the restarted coordinator's recovery scan asks: the adapter finds the branch with
    // XA RECOVER (its session died with the server).
    let p = pledge_proto::v1::participant_client::ParticipantClient::new(s.mysql.channel().await);
    let recover = v1::RecoverRequest { coordinator_id: s.cid.clone(), ..Default::default() };
    let in_doubt = eventually("the adapter lists the branch in doubt", || {
        let (mut p, recover) = (p.clone(), recover.clone());
        async move { p.recover(recover).await.ok().map(|r| r.into_inner().branches).filter(|b| !b.is_empty()) }
    })
    .await;
    let xids: Vec<(String, String)> =
        in_doubt.iter().filter_map(|b| b.xid.as_ref().map(|x| (x.gtid.clone(), x.branch_id.clone()))).collect();
    assert_eq!(xids, [(gtid.clone(), "rows".to_string())]);

    s.restart_coordinator().await;
    let mut c = coordinator_client(&s.coordinator).await;
    let r = commit(&mut c, &gtid, true).await.unwrap();
    assert_eq!((r.outcome(), r.completed), (v1::Outcome::Committed, true), "{}", r.reason);
    assert!(s.visible("k1").await);
    assert!(prepared_of(&s.cid).await.is_empty());
    // Get shows the branch's XID: the one XA RECOVER listed.
    let t = get(&mut c, &gtid).await.unwrap();
    let xid = t.branches.iter().find(|b| b.resource_id == "my_a").unwrap().xid.clone().expect("an XID");
    let hex = |b: &[u8]| b.iter().map(|b| format!("{b:02x}")).collect::<String>();
    assert_eq!((xid.format_id, format!("{}{}", hex(&xid.gtrid), hex(&xid.bqual))), (1347175495, listed[0].clone()));
    let shown = cli(&s.coordinator, &["txn", "get", &gtid]);
    assert!(shown.contains(&format!("xid=1347175495:{}:{}", hex(&xid.gtrid), hex(&xid.bqual))), "{shown}");
}

/// The adapter runs `XA COMMIT … ONE PHASE` and dies before answering. After its restart the
/// coordinator asks again; the answer is how the commit really ended (the fence row says it
/// committed), never a guess.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_phase_commit_cut_short_is_answered_with_its_real_outcome() {
    let _server = SERVER.read().await;
    let mut s = Setup::new("my-kill-1pc", &[("PLEDGE_CRASH_AT", "mysql::after_one_phase_commit")], &[]).await;
    let gtid = s.work("k1", false).await;
    // The client's Commit waits while the coordinator asks again (the adapter is down).
    let committing = {
        let (mut c, gtid) = (coordinator_client(&s.coordinator).await, gtid.clone());
        tokio::spawn(async move { commit(&mut c, &gtid, true).await })
    };
    s.mysql.wait_crashed().await;
    s.restart_mysql().await;
    let r = committing.await.unwrap().unwrap();
    assert_eq!((r.outcome(), r.completed, r.heuristic), (v1::Outcome::Committed, true, false), "{}", r.reason);
    assert!(s.visible("k1").await);
}

/// Runs an XA statement by hand, as an operator or another application would: `verb` (XA
/// COMMIT or XA ROLLBACK) on the XID of branch `rows` of `gtid` at `my_a`.
async fn by_hand(verb: &str, cid: &str, gtid: &str) {
    let xid = pledge_proto::Xid {
        resource: "my_a".parse().unwrap(),
        gtid: gtid.parse().unwrap(),
        branch: pledge_proto::BranchId::parse_field("b", "rows").unwrap(),
    };
    let xa = pledge_proto::xa::XaXid::new(cid, &xid).unwrap();
    let sql = format!("{verb} {}", xa.sql());
    let pool = mysql_pool('a').await;
    // The branch's session was the adapter's, which just died: until the server has noticed
    // the connection is gone, the prepared XID is still attached to it and unknown to other
    // sessions (XAER_NOTA, 1397). Asked again until it is detached, bounded.
    let deadline = std::time::Instant::now() + EVENTUALLY_TIMEOUT;
    loop {
        match sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone())).execute(&pool).await {
            Ok(_) => return,
            Err(sqlx::Error::Database(e))
                if e.code().as_deref() == Some("XAE04") && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await
            }
            Err(e) => panic!("{sql}: {e}"),
        }
    }
}

/// `pledge txn resolve` as the tests' operator ("tester") runs it.
fn resolve(coordinator: &Process, gtid: &str, branch: Option<&str>, action: &str, reason: &str) -> String {
    let mut args = vec!["txn", "resolve", gtid];
    args.extend(branch);
    args.extend([action, "--reason", reason, "--operator", "tester"]);
    cli(coordinator, &args)
}

fn resolve_refused(coordinator: &Process, gtid: &str, branch: Option<&str>, action: &str) -> String {
    let mut args = vec!["txn", "resolve", gtid];
    args.extend(branch);
    args.extend([action, "--reason", "trying", "--operator", "tester"]);
    cli_refused(coordinator, &args)
}

fn outcome(t: &v1::Transaction, resource: &str) -> v1::BranchOutcome {
    t.branches.iter().find(|b| b.resource_id == resource).unwrap().outcome()
}

impl Setup {
    async fn insert_by_hand(&self, key: &str) {
        let sql = format!("INSERT INTO {} (k) VALUES (?)", self.table);
        sqlx::query(sqlx::AssertSqlSafe(sql)).bind(key).execute(&mysql_pool('a').await).await.unwrap();
    }

    async fn delete_by_hand(&self, key: &str) {
        let sql = format!("DELETE FROM {} WHERE k = ?", self.table);
        sqlx::query(sqlx::AssertSqlSafe(sql)).bind(key).execute(&mysql_pool('a').await).await.unwrap();
    }

    /// Whether `txn list --heuristic` (the operator's work list) shows `gtid`.
    fn on_the_work_list(&self, gtid: &str) -> bool {
        cli(&self.coordinator, &["txn", "list", "--heuristic"]).contains(gtid)
    }

    /// Commits `gtid` with a coordinator set to die once its decision is durable, then kills
    /// the adapter too: the prepared branch is the server's alone, and anyone can end it.
    async fn decided_then_both_down(&mut self, gtid: &str) {
        assert!(commit(&mut coordinator_client(&self.coordinator).await, gtid, false).await.is_err());
        self.coordinator.wait_crashed().await;
        self.mysql.kill9().await;
        eventually("the branch prepared at the server", || async {
            (prepared_of(&self.cid).await.len() == 1).then_some(())
        })
        .await;
    }
}

/// Each way a branch can end against the decision, produced for real at MariaDB, reported,
/// then resolved with the CLI once repaired by hand: rolled back by hand before the
/// coordinator's commit reached it (a heuristic rollback; with the other branch committed, the
/// transaction is heuristic mixed), committed by hand after the coordinator decided abort (a
/// heuristic commit). A resolution against the decision is refused; one repeated changes
/// nothing; each is in the decision log and survives a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn branches_ended_by_hand_against_the_decision_are_reported_then_resolved_by_an_operator() {
    let _server = SERVER.read().await;
    // Committed by the coordinator, rolled back by hand first.
    let mut s = Setup::new("my-heur-rb", &[], &[("PLEDGE_CRASH_AT", "coordinator::after_commit_synced")]).await;
    let gtid = s.work("k1", true).await;
    s.decided_then_both_down(&gtid).await;
    by_hand("XA ROLLBACK", &s.cid, &gtid).await;
    s.restart_mysql().await;
    s.restart_coordinator().await;
    let mut c = coordinator_client(&s.coordinator).await;
    let r = commit(&mut c, &gtid, true).await.unwrap();
    assert_eq!((r.outcome(), r.completed, r.heuristic), (v1::Outcome::Committed, true, true), "{}", r.reason);
    let t = get(&mut c, &gtid).await.unwrap();
    assert_eq!(outcome(&t, "my_a"), v1::BranchOutcome::HeuristicRollback);
    assert_eq!(outcome(&t, "ref"), v1::BranchOutcome::Committed);
    assert!(t.heuristic_mixed && !t.heuristic_resolved, "{t:?}");
    assert!(!s.visible("k1").await);
    assert!(s.on_the_work_list(&gtid));
    assert!(cli(&s.coordinator, &["txn", "get", &gtid]).contains("HEURISTIC MIXED"));

    // Rolling the transaction back would contradict its commit: refused.
    let refused = resolve_refused(&s.coordinator, &gtid, Some("my_a/rows"), "--rollback");
    assert!(refused.contains("FailedPrecondition") && refused.contains("would contradict"), "{refused}");
    assert!(s.on_the_work_list(&gtid));
    // A person re-applies the branch's work, then says so.
    s.insert_by_hand("k1").await;
    let out = resolve(&s.coordinator, &gtid, Some("my_a/rows"), "--commit", "re-inserted k1 by hand");
    assert!(out.starts_with("resolved: branch my_a/rows recorded as committed"), "{out}");
    assert!(out.contains("resolved by an operator") && out.contains("by tester from 127.0.0.1:"), "{out}");
    assert!(!s.on_the_work_list(&gtid));
    let out = resolve(&s.coordinator, &gtid, Some("my_a/rows"), "--commit", "re-inserted k1 by hand");
    assert!(out.starts_with("unchanged:"), "a repeat changes nothing: {out}");
    let log = log_inspect(&s.dir.path().join("coordinator"));
    let line = log.lines().find(|l| l.contains("RESOLVE ")).unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains(&format!("RESOLVE {gtid} commit my_a/rows effect=branch-settled")), "{line}");
    assert!(line.contains("by \"tester\"") && line.contains("reason=\"re-inserted k1 by hand\" releases"), "{line}");
    assert_eq!(log.matches("RESOLVE ").count(), 1, "the repeat is not logged: {log}");
    // Durable: a restarted coordinator knows.
    s.coordinator.kill9().await;
    s.restart_coordinator().await;
    let t = get(&mut coordinator_client(&s.coordinator).await, &gtid).await.unwrap();
    assert!(t.heuristic_mixed && t.heuristic_resolved, "what happened stays, and that it was repaired: {t:?}");
    assert_eq!(t.resolutions.len(), 1);
    assert!(!s.on_the_work_list(&gtid));

    // Aborted by the coordinator (the adapter died after XA PREPARE, so no vote came),
    // committed by hand before the adapter came back.
    let mut s = Setup::new("my-heur-commit", &[("PLEDGE_CRASH_AT", "mysql::after_prepare")], &[]).await;
    let gtid = s.work("k2", true).await;
    let r = commit(&mut coordinator_client(&s.coordinator).await, &gtid, false).await.unwrap();
    assert_eq!(r.outcome(), v1::Outcome::Aborted);
    s.mysql.wait_crashed().await;
    by_hand("XA COMMIT", &s.cid, &gtid).await;
    s.restart_mysql().await;
    let mut c = coordinator_client(&s.coordinator).await;
    let r = commit(&mut c, &gtid, true).await.unwrap();
    assert_eq!((r.outcome(), r.completed, r.heuristic), (v1::Outcome::Aborted, true, true), "{}", r.reason);
    let t = get(&mut c, &gtid).await.unwrap();
    assert_eq!(outcome(&t, "my_a"), v1::BranchOutcome::HeuristicCommit);
    assert!(s.visible("k2").await, "committed by hand");
    assert!(s.on_the_work_list(&gtid));
    // Committing the aborted transaction would contradict it: refused.
    let refused = resolve_refused(&s.coordinator, &gtid, None, "--commit");
    assert!(refused.contains("the decision to abort it is durable"), "{refused}");
    // The stray row removed by hand; the transaction is forgotten.
    s.delete_by_hand("k2").await;
    let out = resolve(&s.coordinator, &gtid, None, "--forget", "deleted k2 by hand");
    assert!(out.starts_with("resolved: heuristic outcome of every branch recorded as repaired"), "{out}");
    assert!(!s.on_the_work_list(&gtid));
    let out = resolve(&s.coordinator, &gtid, None, "--forget", "deleted k2 by hand");
    assert!(out.starts_with("unchanged:"), "{out}");
}

/// A branch nothing can prove the outcome of: the coordinator decided commit, the branch was
/// rolled back by hand while the adapter was down, and the adapter lost its journal (its disk
/// replaced). The adapter has no record and the server no transaction: committed or never
/// prepared, nothing says which. A heuristic hazard, reported, never a guess; the operator
/// finds the row missing, restores it and resolves the branch to commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_nothing_can_prove_is_a_heuristic_hazard_until_an_operator_resolves_it() {
    let _server = SERVER.read().await;
    let mut s = Setup::new("my-hazard", &[], &[("PLEDGE_CRASH_AT", "coordinator::after_commit_synced")]).await;
    let gtid = s.work("k3", true).await;
    s.decided_then_both_down(&gtid).await;
    by_hand("XA ROLLBACK", &s.cid, &gtid).await;
    std::fs::remove_dir_all(s.dir.path().join("mysql")).unwrap();
    s.restart_mysql().await;
    s.restart_coordinator().await;
    let mut c = coordinator_client(&s.coordinator).await;
    let r = commit(&mut c, &gtid, true).await.unwrap();
    assert_eq!((r.outcome(), r.completed, r.heuristic), (v1::Outcome::Committed, true, true), "{}", r.reason);
    let t = get(&mut c, &gtid).await.unwrap();
    assert_eq!(outcome(&t, "my_a"), v1::BranchOutcome::HeuristicHazard, "{t:?}");
    let b = t.branches.iter().find(|b| b.resource_id == "my_a").unwrap();
    assert!(b.last_error.contains("has no record"), "{}", b.last_error);
    assert!(!s.visible("k3").await);
    assert!(s.on_the_work_list(&gtid));

    let refused = resolve_refused(&s.coordinator, &gtid, Some("my_a/rows"), "--rollback");
    assert!(refused.contains("would contradict"), "{refused}");
    s.insert_by_hand("k3").await;
    let out = resolve(&s.coordinator, &gtid, Some("my_a/rows"), "--commit", "k3 was missing; restored it");
    assert!(out.starts_with("resolved: branch my_a/rows recorded as committed"), "{out}");
    assert!(!s.on_the_work_list(&gtid));
    let t = get(&mut c, &gtid).await.unwrap();
    assert_eq!(outcome(&t, "my_a"), v1::BranchOutcome::HeuristicHazard, "what happened stays");
    assert!(t.heuristic_resolved && t.branches.iter().find(|b| b.resource_id == "my_a").unwrap().resolved);
}

/// More prepared branches waiting for phase 2 than the adapter keeps sessions for: the one past
/// the bound is detached from its session (with a warning) and stays prepared at the server,
/// and phase 2 finishes it from another session like the ones kept. Driven as a coordinator
/// would, through the Participant API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepared_branch_past_the_kept_sessions_is_detached_and_still_committed() {
    use pledge_proto::v1::participant_client::ParticipantClient;
    let _server = SERVER.read().await;
    let dir = TestDir::new("my-detach");
    let cid = format!("my-detach-{:06x}", fastrand::u32(..) & 0xffffff);
    let table = format!("keys_{}", fastrand::u32(..));
    let my = mysql_pool('a').await;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE TABLE {table} (k VARCHAR(255) PRIMARY KEY)")))
        .execute(&my)
        .await
        .unwrap();
    // 5 connections, 2 active branches: 2 prepared ones keep their sessions.
    let args = ["--max-connections", "5", "--max-active-branches", "2"];
    let mysql = dir.mysql_adapter("mysql", 0, &cid, &[("my_a", mariadb_url('a'))], &args, &[]).await;
    let mut work = mysql_client(&mysql).await;
    let mut p = ParticipantClient::new(mysql.channel().await);
    let sql = format!("INSERT INTO {table} (k) VALUES (?)");
    let mut prepared = Vec::new();
    for i in 0..3 {
        let gtid = pledge_proto::Gtid::new_v7().to_string();
        mysql_execute(&mut work, "my_a", &gtid, "rows", &sql, vec![text(&format!("k{i}"))]).await.unwrap();
        let xid = v1::BranchXid { resource_id: "my_a".into(), gtid, branch_id: "rows".into() };
        let branches = vec![v1::PrepareBranch { xid: Some(xid.clone()), ..Default::default() }];
        let r = p.prepare(v1::PrepareRequest { coordinator_id: cid.clone(), branches }).await.unwrap().into_inner();
        assert_eq!(r.results[0].vote(), v1::Vote::Prepared, "{}", r.results[0].reason);
        prepared.push((xid, r.results[0].metadata.clone()));
    }
    assert_eq!(prepared_of(&cid).await.len(), 3, "every branch is prepared at the server");
    assert_eq!(mysql.log().matches("this one is detached").count(), 1, "{}", mysql.log_tail());

    let branches = prepared
        .iter()
        .map(|(xid, metadata)| v1::CommitBranch {
            xid: Some(xid.clone()),
            metadata: metadata.clone(),
            ..Default::default()
        })
        .collect();
    let r = p.commit(v1::CommitBranchesRequest { coordinator_id: cid.clone(), branches }).await.unwrap().into_inner();
    for result in &r.results {
        assert_eq!(result.outcome(), v1::BranchOutcome::Committed, "{}", result.reason);
    }
    assert_eq!(r.results.len(), 3);
    let n: i64 =
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}"))).fetch_one(&my).await.unwrap();
    assert_eq!(n, 3);
    assert!(prepared_of(&cid).await.is_empty());
}
