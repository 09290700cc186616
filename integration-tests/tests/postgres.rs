//! The PostgreSQL participant against the real server the project's scripts start: atomic
//! transfers between two databases, aborts, kill -9 of the coordinator and of the adapter, the
//! bank invariant under repeated coordinator crashes, exactly-once request ids, and the
//! participant conformance suite.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use pledge_conformance::{Options, Target};
use pledge_integration_tests::pg::*;
use pledge_integration_tests::*;
use pledge_proto::v1::{self, postgres_branch_client::PostgresBranchClient};
use tonic::Code;

fn coordinator_id(test: &str) -> String {
    format!("{test}-{:08x}", fastrand::u32(..))
}

struct Setup {
    dir: TestDir,
    adapter: Process,
    coordinator: Process,
    cid: String,
}

async fn setup(
    test: &str,
    adapter_args: &[&str],
    adapter_env: &[(&str, &str)],
    coordinator_env: &[(&str, &str)],
) -> Setup {
    let dir = TestDir::new(test);
    let adapter =
        dir.postgres_adapter("pg", 0, &[("db_a", pg_url('a')), ("db_b", pg_url('b'))], adapter_args, adapter_env).await;
    let cid = coordinator_id(test);
    let coordinator = dir
        .coordinator_with(&[("db_a", &adapter), ("db_b", &adapter)], &["--coordinator-id", &cid], coordinator_env)
        .await;
    Setup { dir, adapter, coordinator, cid }
}

impl Setup {
    async fn restart_coordinator(&mut self) {
        self.coordinator = self
            .dir
            .coordinator_with(
                &[("db_a", &self.adapter), ("db_b", &self.adapter)],
                &["--coordinator-id", &self.cid],
                &[],
            )
            .await;
    }

    /// Begins a transfer of `amount` from account 1 at db_a to account 1 at db_b and runs both
    /// statements; returns the GTID.
    async fn transfer(&self, bank: &Bank, amount: i64) -> (String, Result<(), tonic::Status>) {
        let mut c = coordinator_client(&self.coordinator).await;
        let gtid = begin(&mut c, &[("db_a", "debit"), ("db_b", "credit")]).await;
        let mut pg = branch_client(&self.adapter).await;
        let debit = execute(&mut pg, "db_a", &gtid, "debit", &bank.update(), vec![int(-amount), int(1)]).await;
        let credit = execute(&mut pg, "db_b", &gtid, "credit", &bank.update(), vec![int(amount), int(1)]).await;
        (gtid, debit.and(credit).map(drop))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_between_two_databases_commits_atomically() {
    let s = setup("pg-transfer", &["--metrics-listen", "127.0.0.1:0"], &[], &[]).await;
    let bank = Bank::new("transfer", 1, 100).await;
    let (gtid, executed) = s.transfer(&bank, 30).await;
    executed.unwrap();
    // Not visible before the commit.
    assert_eq!((bank.balance('a', 1).await, bank.balance('b', 1).await), (100, 100));
    let r = commit(&mut coordinator_client(&s.coordinator).await, &gtid, true).await.unwrap();
    assert_eq!((r.outcome(), r.completed), (v1::Outcome::Committed, true), "{}", r.reason);
    assert_eq!((bank.balance('a', 1).await, bank.balance('b', 1).await), (70, 130));
    assert!(prepared_of(&s.cid).await.is_empty());
    // The adapter's metrics count the work and both branches' two phases.
    let m = s.adapter.metrics().await;
    assert_eq!(m.get(r#"pledge_rpc_requests_total{method="Execute",code="OK"}"#), 2.0);
    assert_eq!(m.get(r#"pledge_branch_operations_total{operation="prepare",result="prepared"}"#), 2.0);
    assert_eq!(m.get(r#"pledge_branch_operations_total{operation="commit",result="committed"}"#), 2.0);
    // The coordinator shows when each branch was prepared.
    let t = get(&mut coordinator_client(&s.coordinator).await, &gtid).await.unwrap();
    assert!(
        t.branches.iter().all(|b| b.prepared_unix_ms >= t.created_unix_ms && b.prepared_unix_ms <= t.decided_unix_ms)
    );

    // Rows come back typed. A branch declared possibly empty that ran no statement here votes
    // READ_ONLY and takes no part in phase 2.
    let mut c = coordinator_client(&s.coordinator).await;
    let mut idle = branch("db_b", "idle");
    idle.may_be_empty = true;
    let branches = vec![branch("db_a", "read"), branch("db_b", "write"), idle];
    let begun = c.begin(v1::BeginRequest { branches, ..Default::default() }).await.unwrap().into_inner();
    let gtid = begun.gtid;
    let mut pg = branch_client(&s.adapter).await;
    let sql = format!("SELECT balance::int8 AS balance, 'x'::text AS tag FROM {} WHERE id = $1", bank.table);
    let rows = execute(&mut pg, "db_a", &gtid, "read", &sql, vec![int(1)]).await.unwrap();
    assert_eq!(rows.results[0].columns, vec!["balance", "tag"]);
    assert_eq!(rows.results[0].rows[0].values, vec![int(70), text("x")]);
    let updated = execute(&mut pg, "db_b", &gtid, "write", &bank.update(), vec![int(1), int(1)]).await.unwrap();
    assert_eq!(updated.results[0].rows_affected, 1);
    assert_eq!(commit(&mut c, &gtid, true).await.unwrap().outcome(), v1::Outcome::Committed);
    assert_eq!(bank.balance('b', 1).await, 131);
    let t = get(&mut c, &gtid).await.unwrap();
    let votes: Vec<v1::Vote> = t.branches.iter().map(|b| b.vote()).collect();
    assert_eq!(votes, vec![v1::Vote::Prepared, v1::Vote::Prepared, v1::Vote::ReadOnly]);
    assert_eq!(t.branches.iter().map(|b| b.may_be_empty).collect::<Vec<_>>(), vec![false, false, true]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_branch_id_at_two_databases_of_one_cluster() {
    // GIDs are unique per cluster, not per database: the resource tag keeps these apart.
    let s = setup("pg-same-branch", &[], &[], &[]).await;
    let bank = Bank::new("samebranch", 1, 100).await;
    let mut c = coordinator_client(&s.coordinator).await;
    let gtid = begin(&mut c, &[("db_a", "main"), ("db_b", "main")]).await;
    let mut pg = branch_client(&s.adapter).await;
    execute(&mut pg, "db_a", &gtid, "main", &bank.update(), vec![int(-5), int(1)]).await.unwrap();
    execute(&mut pg, "db_b", &gtid, "main", &bank.update(), vec![int(5), int(1)]).await.unwrap();
    let r = commit(&mut c, &gtid, true).await.unwrap();
    assert_eq!((r.outcome(), r.completed), (v1::Outcome::Committed, true), "{}", r.reason);
    assert_eq!((bank.balance('a', 1).await, bank.balance('b', 1).await), (95, 105));
    assert!(prepared_of(&s.cid).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_cannot_end_its_own_transaction() {
    let s = setup("pg-no-commit", &[], &[], &[]).await;
    let bank = Bank::new("nocommit", 1, 100).await;
    let mut c = coordinator_client(&s.coordinator).await;
    let gtid = begin(&mut c, &[("db_a", "a"), ("db_b", "b")]).await;
    let mut pg = branch_client(&s.adapter).await;
    let refused = [
        "COMMIT",
        "  -- sneaky\n rollback",
        "BEGIN",
        "PREPARE TRANSACTION 'mine'",
        "END",
        "SET SESSION AUTHORIZATION pledge",
        "LISTEN channel",
        "DISCARD ALL",
    ];
    for sql in refused {
        let e = execute(&mut pg, "db_a", &gtid, "a", sql, vec![]).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{sql}: {}", e.message());
        assert!(e.message().contains("not allowed in a branch"), "{}", e.message());
    }
    // A bad parameter in a later statement refuses the whole call before any of it runs.
    let e = pg
        .execute(v1::ExecuteRequest {
            resource_id: "db_a".into(),
            gtid: gtid.clone(),
            branch_id: "a".into(),
            statements: vec![
                v1::Statement { sql: bank.update(), params: vec![int(-50), int(1)] },
                v1::Statement { sql: bank.update(), params: vec![v1::Value { kind: None }, int(1)] },
            ],
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    assert!(e.message().starts_with("statements[1].params[0]"), "{}", e.message());
    // Refused before running: the branch goes on (without the -50 of the refused call).
    execute(&mut pg, "db_a", &gtid, "a", &bank.update(), vec![int(-1), int(1)]).await.unwrap();
    execute(&mut pg, "db_b", &gtid, "b", &bank.update(), vec![int(1), int(1)]).await.unwrap();
    assert_eq!(commit(&mut c, &gtid, true).await.unwrap().outcome(), v1::Outcome::Committed);
    assert_eq!((bank.balance('a', 1).await, bank.balance('b', 1).await), (99, 101));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_constraint_violation_aborts_both_databases() {
    let s = setup("pg-violation", &["--application-name", "pledge-violation-test"], &[], &[]).await;
    let bank = Bank::new("violation", 1, 100).await;
    let (gtid, executed) = s.transfer(&bank, 130).await;
    let e = executed.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("23514"), "the SQLSTATE of the check violation: {}", e.message());
    let r = commit(&mut coordinator_client(&s.coordinator).await, &gtid, true).await.unwrap();
    assert_eq!(r.outcome(), v1::Outcome::Aborted);
    assert!(r.reason.contains("db_a/debit voted no") && r.reason.contains("23514"), "{}", r.reason);
    assert_eq!((bank.balance('a', 1).await, bank.balance('b', 1).await), (100, 100));
    assert!(prepared_of(&s.cid).await.is_empty());
    // The failed branch is over: more work in it is refused.
    let mut pg = branch_client(&s.adapter).await;
    let e = execute(&mut pg, "db_a", &gtid, "debit", &bank.update(), vec![int(-1), int(1)]).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    // No connection of the adapter was left with a transaction open (its pool would hand it out).
    let open: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pledge-violation-test' \
         AND state LIKE 'idle in transaction%'",
    )
    .fetch_one(&pool('a').await)
    .await
    .unwrap();
    assert_eq!(open, 0, "sessions left with a transaction open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_never_prepared_is_rolled_back_after_its_deadline() {
    let s = setup("pg-active-timeout", &["--active-timeout-ms", "300"], &[], &[]).await;
    let bank = Bank::new("timeout", 1, 100).await;
    let mut c = coordinator_client(&s.coordinator).await;
    let gtid = begin(&mut c, &[("db_a", "debit")]).await;
    let mut pg = branch_client(&s.adapter).await;
    execute(&mut pg, "db_a", &gtid, "debit", &bank.update(), vec![int(-10), int(1)]).await.unwrap();
    // The client goes away without committing. The branch holds the row lock until the
    // adapter rolls it back; then another transaction can take the lock at once.
    eventually("the abandoned branch to release its row lock", || async {
        let sql = format!("UPDATE {} SET balance = balance WHERE id = 1", bank.table);
        let mut tx = bank.a.begin().await.unwrap();
        sqlx::query("SET LOCAL lock_timeout = '50ms'").execute(&mut *tx).await.unwrap();
        let took = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut *tx).await.is_ok();
        tx.rollback().await.unwrap();
        took.then_some(())
    })
    .await;
    assert_eq!(bank.balance('a', 1).await, 100);
    // Its late commit finds it rolled back.
    let r = commit(&mut c, &gtid, true).await.unwrap();
    assert_eq!(r.outcome(), v1::Outcome::Aborted);
    assert!(r.reason.contains("active_timeout"), "{}", r.reason);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_killed_after_the_decision_commits_both_databases_after_restart() {
    let metrics = ["--metrics-listen", "127.0.0.1:0", "--prepared-age-interval-ms", "100"];
    let mut s =
        setup("pg-crash-coord", &metrics, &[], &[("PLEDGE_CRASH_AT", "coordinator::after_commit_synced")]).await;
    let bank = Bank::new("crashcoord", 1, 100).await;
    let (gtid, executed) = s.transfer(&bank, 25).await;
    executed.unwrap();
    assert!(commit(&mut coordinator_client(&s.coordinator).await, &gtid, false).await.is_err());
    s.coordinator.wait_crashed().await;
    assert_eq!(prepared_of(&s.cid).await.len(), 2, "both branches prepared, none committed");
    // The adapter shows them waiting (other tests' branches may be older, never younger).
    eventually("the adapter to show prepared branches waiting in both databases", || async {
        let m = s.adapter.metrics().await;
        let age = |r| m.value(&format!(r#"pledge_postgres_oldest_prepared_seconds{{resource="{r}"}}"#));
        (age("db_a") > Some(0.0) && age("db_b") > Some(0.0)).then_some(())
    })
    .await;
    s.restart_coordinator().await;
    let r = commit(&mut coordinator_client(&s.coordinator).await, &gtid, true).await.unwrap();
    assert_eq!((r.outcome(), r.completed), (v1::Outcome::Committed, true));
    assert_eq!((bank.balance('a', 1).await, bank.balance('b', 1).await), (75, 125));
    assert!(prepared_of(&s.cid).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapter_killed_after_prepare_is_resolved_after_its_restart() {
    // Killed right after its PREPARE TRANSACTION, before answering: the coordinator gets no
    // vote and aborts; the prepared branch waits in PostgreSQL until the adapter is back.
    let mut s = setup("pg-crash-prepare", &[], &[("PLEDGE_CRASH_AT", "postgres::after_prepare")], &[]).await;
    let bank = Bank::new("crashprep", 1, 100).await;
    let (gtid, executed) = s.transfer(&bank, 10).await;
    executed.unwrap();
    let r = commit(&mut coordinator_client(&s.coordinator).await, &gtid, false).await.unwrap();
    assert_eq!(r.outcome(), v1::Outcome::Aborted, "no vote from the dead adapter: {}", r.reason);
    s.adapter.wait_crashed().await;
    assert!(!prepared_of(&s.cid).await.is_empty(), "the adapter died after preparing a branch");
    let port = s.adapter.port();
    s.adapter = s.dir.postgres_adapter("pg", port, &[("db_a", pg_url('a')), ("db_b", pg_url('b'))], &[], &[]).await;
    // The coordinator's abort retries (and its recovery scan) reach the restarted adapter.
    let mut c = coordinator_client(&s.coordinator).await;
    let r = commit(&mut c, &gtid, true).await.unwrap();
    assert_eq!((r.outcome(), r.completed), (v1::Outcome::Aborted, true));
    eventually("no prepared transaction of ours left", || async { prepared_of(&s.cid).await.is_empty().then_some(()) })
        .await;
    assert_eq!((bank.balance('a', 1).await, bank.balance('b', 1).await), (100, 100));

    // Killed after voting, when the commit arrives: the decision waits for the adapter.
    let mut s = setup("pg-crash-commit", &[], &[("PLEDGE_CRASH_AT", "journaled::before_commit")], &[]).await;
    let (gtid, executed) = s.transfer(&bank, 10).await;
    executed.unwrap();
    let r = commit(&mut coordinator_client(&s.coordinator).await, &gtid, false).await.unwrap();
    assert_eq!(r.outcome(), v1::Outcome::Committed);
    s.adapter.wait_crashed().await;
    assert_eq!(prepared_of(&s.cid).await.len(), 2);
    let port = s.adapter.port();
    s.adapter = s.dir.postgres_adapter("pg", port, &[("db_a", pg_url('a')), ("db_b", pg_url('b'))], &[], &[]).await;
    let r = commit(&mut coordinator_client(&s.coordinator).await, &gtid, true).await.unwrap();
    assert_eq!((r.outcome(), r.completed), (v1::Outcome::Committed, true));
    assert_eq!((bank.balance('a', 1).await, bank.balance('b', 1).await), (90, 110));
    assert!(prepared_of(&s.cid).await.is_empty());
}

/// 16 clients make random transfers between accounts in two databases for 30 s while the
/// coordinator is killed with SIGKILL and restarted 3 times. Money is never created or
/// destroyed, and no prepared transaction of ours is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bank_invariant_holds_while_the_coordinator_is_killed_three_times() {
    const ACCOUNTS: i64 = 20;
    const CLIENTS: usize = 16;
    let run_for = Duration::from_secs(env_u64("PLEDGE_BANK_SECONDS", 30));
    let mut s = setup("pg-bank", &["--active-timeout-ms", "2000", "--statement-timeout-ms", "5000"], &[], &[]).await;
    let bank = Arc::new(Bank::new("bank", ACCOUNTS, 1000).await);
    let initial = bank.total().await;
    let (endpoint_tx, endpoint_rx) = tokio::sync::watch::channel(s.coordinator.endpoint());
    let stop = Arc::new(AtomicBool::new(false));
    let (committed, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let (bank, mut endpoint, stop) = (bank.clone(), endpoint_rx.clone(), stop.clone());
        let (committed, failed, adapter) = (committed.clone(), failed.clone(), s.adapter.endpoint());
        clients.push(tokio::spawn(async move {
            let mut pg = PostgresBranchClient::connect(adapter).await.unwrap();
            while !stop.load(Ordering::Relaxed) {
                let current = endpoint.borrow_and_update().clone();
                let Ok(mut c) = v1::coordinator_client::CoordinatorClient::connect(current).await else {
                    // The coordinator is down: wait for the next one.
                    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.changed()).await;
                    continue;
                };
                while !stop.load(Ordering::Relaxed) {
                    let dbs = ["db_a", "db_b"];
                    let (from, to) = (dbs[fastrand::usize(..2)], dbs[fastrand::usize(..2)]);
                    let (from_id, to_id) = (fastrand::i64(1..=ACCOUNTS), fastrand::i64(1..=ACCOUNTS));
                    if from == to && from_id == to_id {
                        continue;
                    }
                    let amount = fastrand::i64(1..=80);
                    let branches =
                        if from == to { vec![branch(from, "t")] } else { vec![branch(from, "d"), branch(to, "c")] };
                    let (bd, bc) = if from == to { ("t", "t") } else { ("d", "c") };
                    let Ok(r) = c.begin(v1::BeginRequest { branches, ..Default::default() }).await else { break };
                    let gtid = r.into_inner().gtid;
                    let worked = async {
                        execute(&mut pg, from, &gtid, bd, &bank.update(), vec![int(-amount), int(from_id)]).await?;
                        execute(&mut pg, to, &gtid, bc, &bank.update(), vec![int(amount), int(to_id)]).await
                    }
                    .await;
                    if worked.is_err() {
                        failed.fetch_add(1, Ordering::Relaxed);
                        let _ = c.abort(v1::AbortRequest { gtid }).await;
                        continue;
                    }
                    match commit(&mut c, &gtid, false).await {
                        Ok(r) if r.outcome() == v1::Outcome::Committed => committed.fetch_add(1, Ordering::Relaxed),
                        Ok(_) => failed.fetch_add(1, Ordering::Relaxed),
                        Err(_) => break, // coordinator gone: outcome unknown, recovery settles it
                    };
                }
            }
        }));
    }
    // Kill the coordinator three times, spread over the run.
    let slice = run_for / 4;
    for _ in 0..3 {
        tokio::time::sleep(slice).await;
        s.coordinator.kill9().await;
        s.restart_coordinator().await;
        endpoint_tx.send(s.coordinator.endpoint()).unwrap();
    }
    tokio::time::sleep(slice).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let committed = committed.load(Ordering::Relaxed);
    assert!(committed > 100, "only {committed} transfers committed");
    // Every in-doubt branch is resolved by the coordinator's recovery, and every orphaned active
    // branch by the adapter's timeout; then the books must balance.
    eventually("no prepared transaction of ours left", || async { prepared_of(&s.cid).await.is_empty().then_some(()) })
        .await;
    assert_eq!(bank.total().await, initial, "money was created or destroyed");
    println!("bank: {committed} committed, {} failed or aborted", failed.load(Ordering::Relaxed));
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_takes_effect_once() {
    let s = setup("pg-dedup", &["--dedup"], &[], &[]).await;
    let bank = Bank::new("dedup", 1, 100).await;
    let mut pg = branch_client(&s.adapter).await;
    let mut c = coordinator_client(&s.coordinator).await;
    let sql = bank.update();
    // The dedup table outlives test runs: make this run's ids its own.
    let run_id = fastrand::u32(..);
    let run = move |request_id: &str, gtid: &str| v1::ExecuteRequest {
        resource_id: "db_a".into(),
        gtid: gtid.into(),
        branch_id: "b".into(),
        statements: vec![v1::Statement { sql: sql.clone(), params: vec![int(5), int(1)] }],
        request_id: format!("{request_id}-{run_id}"),
    };
    let first = begin(&mut c, &[("db_a", "b")]).await;
    pg.execute(run("payment-7", &first)).await.unwrap();
    // The same request in another transaction while the first is still undecided waits for
    // it; once the first commits, it is refused.
    let second = begin(&mut c, &[("db_a", "b")]).await;
    let mut pg2 = branch_client(&s.adapter).await;
    let request = run("payment-7", &second);
    let retry = tokio::spawn(async move { pg2.execute(request).await });
    assert_eq!(commit(&mut c, &first, true).await.unwrap().outcome(), v1::Outcome::Committed);
    let e = retry.await.unwrap().unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{}", e.message());
    assert_eq!(bank.balance('a', 1).await, 105, "the payment took effect once");
    // A request id whose transaction aborted may run again.
    let third = begin(&mut c, &[("db_a", "b")]).await;
    pg.execute(run("payment-8", &third)).await.unwrap();
    c.abort(v1::AbortRequest { gtid: third.clone() }).await.unwrap();
    let fourth = begin(&mut c, &[("db_a", "b")]).await;
    pg.execute(run("payment-8", &fourth)).await.unwrap();
    assert_eq!(commit(&mut c, &fourth, true).await.unwrap().outcome(), v1::Outcome::Committed);
    assert_eq!(bank.balance('a', 1).await, 110);
    // An aborted branch is fenced: more work in it is refused.
    let e = pg.execute(run("payment-9", &third)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
}

struct Adapter {
    dir: TestDir,
    process: Process,
    table: String,
    args: Vec<&'static str>,
}

impl Target for Adapter {
    fn endpoint(&self) -> String {
        self.process.endpoint()
    }

    fn resource(&self) -> String {
        "db_a".into()
    }

    async fn work(&mut self, gtid: &str, branch: &str, key: &str) -> Result<(), String> {
        let mut c = branch_client(&self.process).await;
        let sql = format!("INSERT INTO {} (key) VALUES ($1)", self.table);
        execute(&mut c, "db_a", gtid, branch, &sql, vec![text(key)]).await.map(drop).map_err(|e| e.to_string())
    }

    async fn visible(&mut self, key: &str) -> Result<bool, String> {
        let sql = format!("SELECT count(*) FROM {} WHERE key = $1", self.table);
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).bind(key).fetch_one(&pool('a').await).await.unwrap();
        Ok(n == 1)
    }

    async fn restart(&mut self) -> Result<(), String> {
        self.process.kill9().await;
        let port = self.process.port();
        self.process = self.dir.postgres_adapter("pg", port, &[("db_a", pg_url('a'))], &self.args, &[]).await;
        Ok(())
    }
}

async fn conformance_run(test: &str, args: Vec<&'static str>) {
    let dir = TestDir::new(test);
    let table = format!("conf_{}", fastrand::u32(..));
    let ddl = format!("CREATE TABLE {table} (key text PRIMARY KEY)");
    sqlx::query(sqlx::AssertSqlSafe(ddl)).execute(&pool('a').await).await.unwrap();
    let process = dir.postgres_adapter("pg", 0, &[("db_a", pg_url('a'))], &args, &[]).await;
    let report = pledge_conformance::run(&mut Adapter { dir, process, table, args }, &Options::default()).await;
    assert!(report.ok() && report.skipped.is_empty(), "{report}");
    // Three-phase commit is offered and checked: PreCommit, QueryState, both self-deadlines.
    for check in [
        "a_yes_vote_with_no_pre_commit_aborts_itself_at_its_wait_deadline",
        "a_pre_committed_branch_commits_itself_at_its_do_commit_deadline",
        "three_phase_deadlines_and_epochs_survive_a_restart",
    ] {
        assert!(report.passed.contains(&check), "{check} did not run: {report}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_adapter_conforms() {
    conformance_run("pg-conformance", vec![]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_adapter_with_dedup_table_conforms() {
    conformance_run("pg-conformance-dedup", vec!["--dedup"]).await;
}

/// The adapter reaches PostgreSQL over TLS when its URL asks for it (`sslmode=verify-full` with
/// the server's CA in `sslrootcert`): the branch's session is encrypted, and the transaction
/// commits. With a CA that did not sign the server's certificate the adapter refuses to start,
/// saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_adapter_reaches_postgres_over_tls_with_sslmode_verify_full() {
    let dir = TestDir::new("pg-tls");
    let url = format!("{}?sslmode=verify-full&sslrootcert={}", pg_url('a'), pg_ca().display());
    let adapter = dir.postgres_adapter("pg", 0, &[("db_a", url)], &[], &[]).await;
    let coordinator = dir.coordinator(&[("db_a", &adapter)], &[]).await;
    let mut c = coordinator_client(&coordinator).await;
    let gtid = begin(&mut c, &[("db_a", "b")]).await;
    let sql = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
    let r = execute(&mut branch_client(&adapter).await, "db_a", &gtid, "b", sql, vec![]).await.unwrap();
    assert_eq!(r.results[0].rows[0].values[0].kind, Some(v1::value::Kind::Bool(true)), "the session is encrypted");
    assert_eq!(commit(&mut c, &gtid, true).await.unwrap().outcome(), v1::Outcome::Committed);

    let other = pledge_integration_tests::tls::Pki::new(dir.path(), "other");
    let bad = format!("{}?sslmode=verify-full&sslrootcert={}", pg_url('a'), other.ca.display());
    let out = tokio::process::Command::new(bin("pledge-postgres-adapter"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("pg-bad"))
        .arg("--resource")
        .arg(format!("db_a={bad}"))
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started with a CA that did not sign the server's certificate: {stderr}");
    assert!(stderr.to_lowercase().contains("certificate"), "{stderr}");
}
