//! Test harness: starts Pledge's binaries as real processes on loopback, talks to them over
//! gRPC, and kills them with SIGKILL.
//!
//! Every process is started on port 0 (or a port it had before, for restarts) and prints
//! `listening on <addr>` once it serves; the harness waits for that line (a signal, not a
//! sleep). A process's stderr goes to a file in the test's directory, and its tail is shown
//! when a wait fails.

use std::future::Future;

pub mod bench;
pub mod cluster;
pub mod containers;
pub mod kafka;
pub mod mariadb;
pub mod mysql;
pub mod pg;
pub mod proxy;
pub mod store;
pub mod tls;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use pledge_proto::transport::{ListenAddr, Target};
use pledge_proto::v1::coordinator_client::CoordinatorClient;
use pledge_proto::v1::reference_store_client::ReferenceStoreClient;
use pledge_proto::v1::{self};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::transport::Channel;

/// How long a process may take to print `listening on`.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long [`eventually`] keeps asking.
pub const EVENTUALLY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a process may take to exit after SIGKILL/SIGTERM or a crash point.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// The directory holding the workspace's binaries (`PLEDGE_BIN_DIR`, or the `target/<profile>`
/// this test binary was built into).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PLEDGE_BIN_DIR") {
        return PathBuf::from(dir);
    }
    // target/<profile>/deps/<test binary>
    let exe = std::env::current_exe().expect("test binary path");
    exe.parent().and_then(Path::parent).expect("target/<profile>").to_path_buf()
}

pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`, which \
         integration-tests/run.sh does)",
        path.display()
    );
    path
}

/// A running Pledge process. Killed when dropped.
pub struct Process {
    name: String,
    child: Child,
    /// Where it listens: TCP `host:port` or `unix:<path>`.
    pub addr: ListenAddr,
    /// Where it serves Prometheus metrics, if started with `--metrics-listen` (it prints
    /// `metrics on <addr>` before `listening on`).
    pub metrics_addr: Option<std::net::SocketAddr>,
    log: PathBuf,
    /// It serves TLS: clients call it with this ([`Process::with_tls`]).
    tls: Option<pledge_proto::tls::ClientTls>,
}

impl Process {
    /// Spawns `command` and waits until it prints `listening on <addr>`.
    pub async fn spawn(name: &str, mut command: Command, log: PathBuf) -> anyhow::Result<Process> {
        let stderr = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
        command.stdout(Stdio::piped()).stderr(stderr).stdin(Stdio::null()).kill_on_drop(true);
        let mut child = command.spawn().with_context(|| format!("spawning {name}"))?;
        let stdout = child.stdout.take().expect("piped stdout");
        // (the metrics address, if printed before; the serving address)
        let (tx, rx) = tokio::sync::oneshot::channel::<(Option<String>, String)>();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            let mut tx = Some(tx);
            let mut metrics = None;
            // Keep draining after the first line so the child never blocks on a full pipe.
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(addr) = line.strip_prefix("metrics on ") {
                    metrics = Some(addr.trim().to_string());
                } else if let Some(addr) = line.strip_prefix("listening on ")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send((metrics.take(), addr.trim().to_string()));
                }
            }
        });
        let (metrics_addr, addr) = match tokio::time::timeout(START_TIMEOUT, rx).await {
            Ok(Ok((metrics, addr))) => (
                metrics
                    .map(|m| m.parse().with_context(|| format!("{name} printed a bad metrics address {m:?}")))
                    .transpose()?,
                addr.parse().with_context(|| format!("{name} printed a bad address {addr:?}"))?,
            ),
            Ok(Err(_)) => bail!("{name} exited before serving:\n{}", tail(&log)),
            Err(_) => bail!("{name} did not start within {START_TIMEOUT:?}:\n{}", tail(&log)),
        };
        Ok(Process { name: name.to_string(), child, addr, metrics_addr, log, tls: None })
    }

    /// It serves TLS: [`Process::endpoint`] is `https://`, and [`Process::channel`] calls it
    /// with `tls`.
    pub fn with_tls(mut self, tls: pledge_proto::tls::ClientTls) -> Process {
        self.tls = Some(tls);
        self
    }

    /// What a client dials: `http://host:port` (`https://` with TLS) or `unix:<path>`.
    pub fn endpoint(&self) -> String {
        match (&self.addr, &self.tls) {
            (ListenAddr::Tcp(addr), None) => format!("http://{addr}"),
            (ListenAddr::Tcp(addr), Some(_)) => format!("https://{addr}"),
            (ListenAddr::Unix(_), _) => self.addr.to_string(),
        }
    }

    /// What a client dials, with the TLS it is called with.
    pub fn target(&self) -> Target {
        Target::parse_with(&self.endpoint(), self.tls.as_ref()).expect("a process's endpoint is a valid target")
    }

    /// A channel to it (TCP, TLS or Unix socket), connected now.
    pub async fn channel(&self) -> Channel {
        let target = self.target();
        target.connect().await.unwrap_or_else(|e| panic!("connecting to {} at {}: {e}", self.name, self.endpoint()))
    }

    /// Its TCP port (a restart passes it back so the coordinator finds the process again).
    pub fn port(&self) -> u16 {
        match &self.addr {
            ListenAddr::Tcp(addr) => addr.port(),
            ListenAddr::Unix(path) => panic!("{} listens on a Unix socket ({}), not a port", self.name, path.display()),
        }
    }

    /// Its metrics in Prometheus' text format (`GET /metrics` over plain HTTP/1.1).
    pub async fn metrics(&self) -> Metrics {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.metrics_addr.unwrap_or_else(|| panic!("{} was started without --metrics-listen", self.name));
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connecting to the metrics endpoint");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: pledge\r\nConnection: close\r\n\r\n")
            .await
            .expect("sending the metrics request");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("reading the metrics response");
        let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
        assert!(head.starts_with("HTTP/1.1 200"), "metrics endpoint of {} answered {head}", self.name);
        Metrics(body.to_string())
    }

    /// The last lines the process wrote to stderr.
    pub fn log_tail(&self) -> String {
        tail(&self.log)
    }

    /// Everything the process wrote to stderr (its log) so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// kill -9, and wait for it to be gone.
    pub async fn kill9(&mut self) {
        self.child.start_kill().expect("sending SIGKILL");
        self.wait_exit().await;
    }

    /// SIGTERM (clean shutdown); returns the exit status.
    pub async fn terminate(&mut self) -> ExitStatus {
        let pid = self.child.id().expect("running process") as libc::pid_t;
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        self.wait_exit().await
    }

    /// Sends `signal` (e.g. SIGSTOP / SIGCONT to pause and resume it).
    pub fn signal(&self, signal: libc::c_int) {
        let pid = self.child.id().expect("running process") as libc::pid_t;
        // SAFETY: kill(2) has no memory-safety preconditions.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "signalling {}", self.name);
    }

    /// Waits for the process to exit on its own (e.g. at a crash point).
    pub async fn wait_exit(&mut self) -> ExitStatus {
        match tokio::time::timeout(EXIT_TIMEOUT, self.child.wait()).await {
            Ok(status) => status.expect("waiting for the process"),
            Err(_) => panic!("{} did not exit within {EXIT_TIMEOUT:?}:\n{}", self.name, self.log_tail()),
        }
    }

    /// Waits for the process to die at a crash point (SIGKILL from itself) and checks that it
    /// did, rather than exit for another reason.
    pub async fn wait_crashed(&mut self) {
        let status = self.wait_exit().await;
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "{} was expected to die at its crash point, but exited with {status}:\n{}",
            self.name,
            self.log_tail()
        );
        assert!(self.log_tail().contains("crash point"), "{} died without reaching its crash point", self.name);
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// A test's own directory: data directories and process logs. Kept when the test fails (the
/// path is printed) so the logs can be read.
pub struct TestDir {
    dir: Option<tempfile::TempDir>,
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(dir) = self.dir.take()
        {
            eprintln!("test failed: its processes' logs are kept in {}", dir.keep().display());
        }
    }
}

impl TestDir {
    pub fn new(test: &str) -> TestDir {
        TestDir::new_in(test, &std::env::temp_dir())
    }

    /// A test directory under `base` (a benchmark puts processes on different disks this way).
    pub fn new_in(test: &str, base: &Path) -> TestDir {
        let dir = tempfile::Builder::new().prefix(&format!("pledge-{test}-")).tempdir_in(base).expect("temp dir");
        TestDir { dir: Some(dir) }
    }

    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("test directory").path()
    }

    /// A reference participant serving `resource`, with its data in `<dir>/<resource>`.
    /// `port` 0 picks a free one; a restart passes the old port so the coordinator finds it.
    pub async fn participant(&self, resource: &str, port: u16, args: &[&str], env: &[(&str, &str)]) -> Process {
        self.participant_on(resource, &format!("127.0.0.1:{port}"), args, env).await
    }

    /// [`TestDir::participant`] listening on `listen` (`host:port` or `unix:<path>`).
    pub async fn participant_on(&self, resource: &str, listen: &str, args: &[&str], env: &[(&str, &str)]) -> Process {
        let mut c = Command::new(bin("pledge-reference-participant"));
        c.arg("--listen")
            .arg(listen)
            .arg("--resource-id")
            .arg(resource)
            .arg("--data-dir")
            .arg(self.path().join(resource))
            .args(args)
            .env("RUST_LOG", "info");
        for (k, v) in env {
            c.env(k, v);
        }
        let log = self.path().join(format!("{resource}.log"));
        Process::spawn(resource, c, log).await.unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// A coordinator with its data in `<dir>/coordinator` and these participants configured.
    pub async fn coordinator(&self, participants: &[(&str, &Process)], env: &[(&str, &str)]) -> Process {
        self.coordinator_with(participants, &[], env).await
    }

    /// [`TestDir::coordinator`] with extra `pledge serve` arguments.
    pub async fn coordinator_with(
        &self,
        participants: &[(&str, &Process)],
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Process {
        let endpoints: Vec<(&str, String)> = participants.iter().map(|(r, p)| (*r, p.endpoint())).collect();
        self.coordinator_for(&endpoints, args, env).await
    }

    /// A coordinator whose participants are given as (resource id, endpoint), listening on a
    /// free TCP port unless `args` hold a `--listen`.
    pub async fn coordinator_for(
        &self,
        participants: &[(&str, String)],
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Process {
        let mut c = Command::new(bin("pledge"));
        c.arg("serve").args(args);
        if !args.contains(&"--listen") {
            c.arg("--listen").arg("127.0.0.1:0");
        }
        c.arg("--data-dir").arg(self.path().join("coordinator")).env("RUST_LOG", "info");
        if !args.contains(&"--recovery-interval-ms") {
            // Tests restart participants and expect recovery to notice soon.
            c.arg("--recovery-interval-ms").arg("500");
        }
        for (resource, endpoint) in participants {
            c.arg("--participant").arg(format!("{resource}={endpoint}"));
        }
        for (k, v) in env {
            c.env(k, v);
        }
        let log = self.path().join("coordinator.log");
        Process::spawn("coordinator", c, log).await.unwrap_or_else(|e| panic!("{e:#}"))
    }
}

/// Database `db` ('a' or 'b': `pledge_a`, `pledge_b`) of the tests' PostgreSQL, as
/// `postgres://pledge@127.0.0.1:<port>/pledge_<db>`: the server the service scripts start
/// (`integration-tests/scripts/postgres.sh`; `PLEDGE_PG_URL_A`, `PLEDGE_PG_URL_B`), or with
/// `PLEDGE_TEST_SERVICES=testcontainers` this process's container ([`containers::postgres`]).
pub fn pg_url(db: char) -> String {
    if containers::enabled() {
        let db = db.to_ascii_lowercase();
        assert!(matches!(db, 'a' | 'b'), "pg_url({db:?}): the test databases are 'a' and 'b'");
        return containers::postgres().url(&format!("pledge_{db}"));
    }
    let var = format!("PLEDGE_PG_URL_{}", db.to_ascii_uppercase());
    std::env::var(&var).unwrap_or_else(|_| {
        panic!(
            "{var} is not set: these tests need the real PostgreSQL the project's scripts start \
             (bash integration-tests/run.sh does it; by hand: bash integration-tests/scripts/postgres.sh start \
             && eval \"$(bash integration-tests/scripts/postgres.sh env)\"), or {} in containers",
            containers::SWITCH_HINT
        )
    })
}

/// The CA certificate (PEM file) that signed the tests' PostgreSQL's server certificate, for
/// `sslmode=verify-full&sslrootcert=...`: `PLEDGE_PG_CA` of the service scripts, or the
/// container's ([`containers::Postgres::ca`]).
pub fn pg_ca() -> PathBuf {
    if containers::enabled() {
        return containers::postgres().ca.clone();
    }
    std::env::var_os("PLEDGE_PG_CA").map(PathBuf::from).unwrap_or_else(|| {
        panic!(
            "PLEDGE_PG_CA is not set: the CA of the scripts' PostgreSQL (eval \"$(bash \
             integration-tests/scripts/services.sh env)\"), or {} in containers",
            containers::SWITCH_HINT
        )
    })
}

impl TestDir {
    /// A PostgreSQL adapter serving `resources` (resource id, database URL), with its journal in
    /// `<dir>/<name>` (a restart under the same name finds it again).
    pub async fn postgres_adapter(
        &self,
        name: &str,
        port: u16,
        resources: &[(&str, String)],
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Process {
        let mut c = Command::new(bin("pledge-postgres-adapter"));
        c.arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(self.path().join(name))
            .args(args)
            .env("RUST_LOG", "info");
        for (id, url) in resources {
            c.arg("--resource").arg(format!("{id}={url}"));
        }
        for (k, v) in env {
            c.env(k, v);
        }
        let log = self.path().join(format!("{name}.log"));
        Process::spawn(name, c, log).await.unwrap_or_else(|e| panic!("{e:#}"))
    }
}

/// The tests' Kafka broker, as `127.0.0.1:<port>`: the one the service scripts start
/// (`integration-tests/scripts/kafka.sh`; `PLEDGE_KAFKA_BOOTSTRAP`), or with
/// `PLEDGE_TEST_SERVICES=testcontainers` this process's container ([`containers::kafka`]).
pub fn kafka_bootstrap() -> String {
    if containers::enabled() {
        return containers::kafka().bootstrap.clone();
    }
    std::env::var("PLEDGE_KAFKA_BOOTSTRAP").unwrap_or_else(|_| {
        panic!(
            "PLEDGE_KAFKA_BOOTSTRAP is not set: these tests need the real Kafka broker the project's scripts start \
             (bash integration-tests/run.sh does it; by hand: bash integration-tests/scripts/kafka.sh start \
             && eval \"$(bash integration-tests/scripts/kafka.sh env)\"), or {} in containers",
            containers::SWITCH_HINT
        )
    })
}

impl TestDir {
    /// A Kafka adapter serving resource `kafka`, with its state in `<dir>/<name>` and
    /// transactional ids `<prefix>-N` (keep the prefix for restarts; make it unique per test, or
    /// tests fence each other's producers).
    pub async fn kafka_adapter(
        &self,
        name: &str,
        port: u16,
        prefix: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Process {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        self.kafka_adapter_at(name, port, prefix, &kafka_bootstrap(), &args, env).await
    }
}

/// Everything a read_committed consumer sees in partition 0 of `topic`, from the beginning up
/// to the last stable offset, as (key, value). Waits (bounded) for the partition to exist.
pub async fn read_committed(topic: &str) -> Vec<(String, String)> {
    kafka::read_committed_with(&kafka::Listener::plaintext(), topic).await
}

/// Runs the `pledge` CLI against `coordinator` (`--coordinator` added) and returns what it
/// printed; fails the test if it exits non-zero.
pub fn cli(coordinator: &Process, args: &[&str]) -> String {
    let out = std::process::Command::new(bin("pledge"))
        .args(args)
        .args(["--coordinator", &coordinator.endpoint()])
        .output()
        .expect("running pledge");
    assert!(out.status.success(), "pledge {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("pledge prints UTF-8")
}

/// Runs the `pledge` CLI against `coordinator` expecting it to fail; returns what it printed
/// on stderr (the refusal).
pub fn cli_refused(coordinator: &Process, args: &[&str]) -> String {
    let out = std::process::Command::new(bin("pledge"))
        .args(args)
        .args(["--coordinator", &coordinator.endpoint()])
        .output()
        .expect("running pledge");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "pledge {args:?} succeeded: {}", String::from_utf8_lossy(&out.stdout));
    stderr
}

/// `pledge log inspect` of the coordinator data directory `data_dir`: every record, readably.
pub fn log_inspect(data_dir: &Path) -> String {
    let out = std::process::Command::new(bin("pledge"))
        .args(["log", "inspect", "--data-dir"])
        .arg(data_dir)
        .output()
        .expect("running pledge");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "pledge log inspect: {text}{}", String::from_utf8_lossy(&out.stderr));
    text
}

pub async fn coordinator_client(p: &Process) -> CoordinatorClient<Channel> {
    CoordinatorClient::new(p.channel().await)
}

pub async fn store_client(p: &Process) -> ReferenceStoreClient<Channel> {
    ReferenceStoreClient::new(p.channel().await)
}

pub fn branch(resource: &str, branch: &str) -> v1::BranchRef {
    v1::BranchRef { resource_id: resource.into(), branch_id: branch.into(), may_be_empty: false }
}

/// Begins a transaction with these branches; returns its GTID.
pub async fn begin(c: &mut CoordinatorClient<Channel>, branches: &[(&str, &str)]) -> String {
    c.begin(v1::BeginRequest {
        timeout_ms: None,
        idempotency_key: String::new(),
        branches: branches.iter().map(|(r, b)| branch(r, b)).collect(),
        protocol: v1::Protocol::TwoPhase as i32,
    })
    .await
    .expect("begin")
    .into_inner()
    .gtid
}

pub async fn put(s: &mut ReferenceStoreClient<Channel>, gtid: &str, branch_id: &str, key: &str, value: &str) {
    s.put(v1::PutRequest {
        gtid: gtid.into(),
        branch_id: branch_id.into(),
        key: key.into(),
        value: value.as_bytes().to_vec(),
    })
    .await
    .expect("put");
}

pub async fn read(s: &mut ReferenceStoreClient<Channel>, key: &str) -> Option<String> {
    let r = s.read(v1::ReadRequest { key: key.into() }).await.expect("read").into_inner();
    r.found.then(|| String::from_utf8(r.value).expect("utf-8 value"))
}

pub async fn branch_state(s: &mut ReferenceStoreClient<Channel>, gtid: &str, branch_id: &str) -> v1::BranchState {
    let r = s
        .branch_status(v1::BranchStatusRequest { gtid: gtid.into(), branch_id: branch_id.into() })
        .await
        .expect("branch status")
        .into_inner();
    v1::BranchState::try_from(r.state).expect("known state")
}

/// Waits (bounded) until branch (gtid, branch_id) at reference participant `p` is in `want`.
pub async fn wait_branch_state(p: &Process, gtid: &str, branch_id: &str, want: v1::BranchState) {
    let what = format!("branch {gtid}/{branch_id} at {} to become {want:?}", p.name);
    eventually(&what, || async {
        let mut s = store_client(p).await;
        (branch_state(&mut s, gtid, branch_id).await == want).then_some(())
    })
    .await
}

pub async fn commit(
    c: &mut CoordinatorClient<Channel>,
    gtid: &str,
    wait_for_completion: bool,
) -> Result<v1::CommitResponse, tonic::Status> {
    c.commit(v1::CommitRequest { gtid: gtid.into(), branches: vec![], wait_for_completion })
        .await
        .map(tonic::Response::into_inner)
}

pub async fn get(c: &mut CoordinatorClient<Channel>, gtid: &str) -> Result<v1::Transaction, tonic::Status> {
    c.get(v1::GetRequest { gtid: gtid.into() })
        .await
        .map(|r| r.into_inner().transaction.expect("transaction in GetResponse"))
}

/// A scrape of a process's metrics (Prometheus text format).
#[derive(Debug, Clone)]
pub struct Metrics(pub String);

impl Metrics {
    /// The value of the sample `series`, written as it appears in the exposition: the name,
    /// then the labels in the order the process records them, e.g.
    /// `pledge_transactions_finished_total{outcome="committed"}`. `None` if absent.
    pub fn value(&self, series: &str) -> Option<f64> {
        self.0.lines().find_map(|line| {
            let value = line.strip_prefix(series)?.strip_prefix(' ')?;
            Some(value.trim().parse().unwrap_or_else(|e| panic!("sample {series}: bad value {value:?}: {e}")))
        })
    }

    /// [`Metrics::value`], which must be present.
    pub fn get(&self, series: &str) -> f64 {
        self.value(series).unwrap_or_else(|| panic!("no sample {series} in:\n{}", self.0))
    }
}

/// Asks `check` every 20 ms until it returns `Some`, for at most [`EVENTUALLY_TIMEOUT`]. For
/// conditions that have no signal to wait on (a participant's state after a recovery scan).
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + EVENTUALLY_TIMEOUT;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {EVENTUALLY_TIMEOUT:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Rolls back the prepared transactions a run of coordinator `coordinator_id` left behind in
/// the test databases (a benchmark's coordinator goes away with its data directory, so nothing
/// would ever finish them; they hold their locks).
pub async fn roll_back_leftovers(coordinator_id: &str) {
    for db in ['a', 'b'] {
        let pool = sqlx::PgPool::connect(&pg_url(db)).await.expect("connecting to the test database");
        let leftover: Vec<String> = sqlx::query_scalar(
            "SELECT gid FROM pg_prepared_xacts WHERE database = current_database() AND starts_with(gid, $1)",
        )
        .bind(format!("pledge:{coordinator_id}:"))
        .fetch_all(&pool)
        .await
        .expect("reading pg_prepared_xacts");
        for gid in leftover {
            // The GID is ours (prefix checked above) and has no quote (ids are validated).
            let sql = format!("ROLLBACK PREPARED '{gid}'");
            sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&pool).await.expect("rolling back a leftover");
        }
    }
}

/// Waits (bounded) until the coordinator has no transaction left in flight, so a benchmark
/// run leaves nothing prepared behind.
pub async fn drain(coordinator: &Process) {
    let c = coordinator_client(coordinator).await;
    let live = [
        v1::TransactionState::Active,
        v1::TransactionState::Preparing,
        v1::TransactionState::Committing,
        v1::TransactionState::Aborting,
    ]
    .map(|s| s as i32)
    .to_vec();
    eventually("the coordinator to finish its transactions", || {
        let (mut c, states) = (c.clone(), live.clone());
        async move {
            let r = c.list(v1::ListRequest { states, limit: 1, ..Default::default() }).await.ok()?;
            r.into_inner().transactions.is_empty().then_some(())
        }
    })
    .await;
}
