//! The container images (deploy/Dockerfile) and deploy/compose.yaml, really built and run by a
//! Docker engine: the images are built, the compose file is brought up (PostgreSQL, Kafka, the
//! two adapters and the coordinator, started in dependency order as each reports healthy), an
//! application's transaction runs through the published ports (Begin at the coordinator, a row
//! at the PostgreSQL adapter, a record at the Kafka adapter, Commit), and the row and the
//! committed record are read back from the host. Everything is torn down (`down -v`) when the
//! test ends, also when it fails.
//!
//! Needs a Docker engine and the base images the files name (`bash
//! integration-tests/scripts/docker.sh start` provides both; integration-tests/run.sh runs it).
//! Without an engine the test fails, saying so: it never skips.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use pledge_integration_tests::{TestDir, bin};
use pledge_proto::v1::coordinator_client::CoordinatorClient;
use pledge_proto::v1::kafka_branch_client::KafkaBranchClient;
use pledge_proto::v1::postgres_branch_client::PostgresBranchClient;
use pledge_proto::v1::{self, value::Kind};

/// The compose project: fixed, so a run killed before its teardown is cleaned up by the next.
const PROJECT: &str = "pledge-it-compose";
/// Building the images from nothing compiles cargo-chef, the dependencies and the workspace in
/// release mode: 19 minutes measured on a busy 2-core machine. With the dependencies in
/// Docker's layer cache (Cargo.lock unchanged), only the workspace's crates: about 3.5 minutes.
const BUILD_TIMEOUT: Duration = Duration::from_secs(45 * 60);
/// `up` returns once every service is started, each after the ones it depends on are healthy
/// (Kafka's JVM start dominates).
const UP_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// Then every container must report healthy.
const HEALTHY_TIMEOUT: Duration = Duration::from_secs(2 * 60);
/// Short docker calls (info, inspect, ps, logs, run --help).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
const DOWN_TIMEOUT: Duration = Duration::from_secs(3 * 60);
/// How long the checks from the host keep asking (a commit is answered before Kafka's markers
/// are written; a reader sees the record after).
const READ_TIMEOUT: Duration = Duration::from_secs(60);
const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// What a failing test shows of each service's log.
const LOG_TAIL_LINES: usize = 60;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// Runs `cmd` to completion within `limit`, its stdout and stderr together in `log` (a file, so
/// a chatty build cannot fill a pipe). Kills it when time is up. Returns its status and output.
fn run_bounded(cmd: &mut Command, limit: Duration, log: &Path) -> (ExitStatus, String) {
    let out = File::create(log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
    let err = out.try_clone().expect("log file handle");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for a child") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {limit:?}; its output:\n{}", tail(log, 40));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    (status, std::fs::read_to_string(log).unwrap_or_default())
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The ports compose.yaml publishes (its PLEDGE_COMPOSE_*_PORT variables), chosen free so that the
/// test does not collide with services on the defaults.
struct Ports {
    postgres: u16,
    kafka: u16,
    postgres_adapter: u16,
    kafka_adapter: u16,
    coordinator: u16,
    metrics: u16,
}

impl Ports {
    /// Six distinct free ports on 127.0.0.1: all are held at once while they are chosen (a
    /// port let go at once can be handed out again), then let go for compose to bind.
    fn free() -> Ports {
        let held: Vec<TcpListener> =
            (0..6).map(|_| TcpListener::bind("127.0.0.1:0").expect("a free port on 127.0.0.1")).collect();
        let port = |i: usize| held[i].local_addr().expect("bound address").port();
        Ports {
            postgres: port(0),
            kafka: port(1),
            postgres_adapter: port(2),
            kafka_adapter: port(3),
            coordinator: port(4),
            metrics: port(5),
        }
    }

    fn env(&self) -> [(&'static str, String); 6] {
        [
            ("PLEDGE_COMPOSE_POSTGRES_PORT", self.postgres.to_string()),
            ("PLEDGE_COMPOSE_KAFKA_PORT", self.kafka.to_string()),
            ("PLEDGE_COMPOSE_POSTGRES_ADAPTER_PORT", self.postgres_adapter.to_string()),
            ("PLEDGE_COMPOSE_KAFKA_ADAPTER_PORT", self.kafka_adapter.to_string()),
            ("PLEDGE_COMPOSE_COORDINATOR_PORT", self.coordinator.to_string()),
            ("PLEDGE_COMPOSE_METRICS_PORT", self.metrics.to_string()),
        ]
    }
}

/// Panics, saying how to get one, unless a Docker engine answers.
fn require_engine(dir: &TestDir) {
    let hint = "this test builds and runs the images, so it needs a Docker engine: start one with \
                `bash integration-tests/scripts/docker.sh start` (integration-tests/run.sh does)";
    let cli = Command::new("docker").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status();
    assert!(cli.is_ok(), "the Docker CLI cannot be run ({}): {hint}", cli.unwrap_err());
    let mut info = Command::new("docker");
    info.args(["info", "--format", "{{.ServerVersion}}"]);
    let (status, out) = run_bounded(&mut info, CALL_TIMEOUT, &dir.path().join("info.log"));
    assert!(status.success(), "no Docker engine answers (`docker info`: {}): {hint}", out.trim());
}

/// `docker build --target target --tag image` of deploy/Dockerfile; panics with its output
/// unless it succeeds.
fn docker_build(root: &Path, target: &str, image: &str, dir: &Path) {
    let mut build = Command::new("docker");
    build.current_dir(root).args(["build", "--file", "deploy/Dockerfile", "--target", target, "--tag", image, "."]);
    let log = dir.join(format!("build-{target}.log"));
    let (status, _) = run_bounded(&mut build, BUILD_TIMEOUT, &log);
    assert!(status.success(), "docker build --target {target} failed:\n{}", tail(&log, 40));
}

/// `docker compose` (the v2 plugin) when installed, else Debian's `docker-compose` (v1).
fn compose_program() -> Vec<String> {
    let plugin = Command::new("docker")
        .args(["compose", "version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if plugin { vec!["docker".into(), "compose".into()] } else { vec!["docker-compose".into()] }
}

/// The compose project brought up by the test; `down -v` when dropped (after a failure, first
/// shows every service's log and state).
struct Compose {
    program: Vec<String>,
    file: PathBuf,
    env: Vec<(&'static str, String)>,
    dir: PathBuf,
}

impl Compose {
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.program[0]);
        c.args(&self.program[1..])
            .arg("--file")
            .arg(&self.file)
            .args(["--project-name", PROJECT])
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())));
        c
    }

    /// Runs compose with `args`; panics with its output unless it succeeds.
    fn run(&self, args: &[&str], limit: Duration, log_name: &str) -> String {
        let (status, out) = run_bounded(&mut self.command(args), limit, &self.dir.join(log_name));
        assert!(status.success(), "compose {args:?} failed ({status}):\n{}", tail(&self.dir.join(log_name), 60));
        out
    }

    /// The project's containers with their health (`none` for a container without a
    /// HEALTHCHECK) and state, as (name, health, state).
    fn health(&self) -> Vec<(String, String, String)> {
        let ids = self.run(&["ps", "-q"], CALL_TIMEOUT, "ps.log");
        let ids: Vec<&str> = ids.lines().map(str::trim).filter(|l| !l.is_empty() && !l.contains(' ')).collect();
        if ids.is_empty() {
            return Vec::new();
        }
        let mut inspect = Command::new("docker");
        inspect
            .args([
                "inspect",
                "--format",
                "{{.Name}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}} {{.State.Status}}",
            ])
            .args(&ids);
        let (status, out) = run_bounded(&mut inspect, CALL_TIMEOUT, &self.dir.join("inspect.log"));
        assert!(status.success(), "docker inspect failed: {out}");
        out.lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                Some((f.next()?.trim_start_matches('/').to_string(), f.next()?.to_string(), f.next()?.to_string()))
            })
            .collect()
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let tail_lines = LOG_TAIL_LINES.to_string();
            let (_, logs) = run_bounded(
                &mut self.command(&["logs", "--no-color", "--tail", &tail_lines]),
                CALL_TIMEOUT,
                &self.dir.join("logs.log"),
            );
            let (_, ps) = run_bounded(&mut self.command(&["ps"]), CALL_TIMEOUT, &self.dir.join("ps-final.log"));
            eprintln!(
                "---- compose services ----\n{ps}\n---- their logs (last {LOG_TAIL_LINES} lines each) ----\n{logs}"
            );
        }
        let (status, out) = run_bounded(
            &mut self.command(&["down", "--volumes", "--remove-orphans", "--timeout", "10"]),
            DOWN_TIMEOUT,
            &self.dir.join("down.log"),
        );
        if !status.success() {
            eprintln!("compose down failed ({status}): {out}");
        }
    }
}

/// Everything a read_committed consumer sees in partition 0 of `topic` at `bootstrap`, up to the
/// last stable offset, as (key, value); empty when the topic does not exist yet.
fn read_committed(bootstrap: &str, topic: &str) -> Vec<(String, String)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("pledge-compose-reader-{}", fastrand::u64(..)))
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .create()
        .expect("a Kafka consumer");
    let high = match consumer.fetch_watermarks(topic, 0, Duration::from_secs(5)) {
        Ok((_, high)) if high > 0 => high,
        _ => return Vec::new(),
    };
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning).expect("partition 0");
    consumer.assign(&tpl).expect("assign");
    let deadline = Instant::now() + READ_TIMEOUT;
    let mut out = Vec::new();
    loop {
        let position =
            consumer.position().expect("position").find_partition(topic, 0).and_then(|p| p.offset().to_raw());
        if position.is_some_and(|p| p >= high) {
            return out;
        }
        assert!(Instant::now() < deadline, "reading {topic}: stuck at {position:?} of {high}");
        if let Some(message) = consumer.poll(Duration::from_millis(100)) {
            let m = message.expect("consuming");
            let text = |b: Option<&[u8]>| String::from_utf8_lossy(b.unwrap_or_default()).to_string();
            out.push((text(m.key()), text(m.payload())));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_images_run_a_transaction_through_compose() {
    let dir = TestDir::new("compose");
    require_engine(&dir);
    let root = repo_root();
    let ports = Ports::free();
    let compose = Compose {
        program: compose_program(),
        file: root.join("deploy/compose.yaml"),
        env: ports.env().to_vec(),
        dir: dir.path().to_path_buf(),
    };
    // What an earlier run that was killed before its teardown left behind.
    compose.run(&["down", "--volumes", "--remove-orphans", "--timeout", "10"], DOWN_TIMEOUT, "down-before.log");

    // The images: the three compose builds, then the two targets compose does not run (a
    // binary that cannot start in its runtime image, e.g. for a missing library, fails here).
    let started = Instant::now();
    compose.run(&["build"], BUILD_TIMEOUT, "build.log");
    // The build stage, tagged so that its layers (the compiled dependencies) are not dangling
    // when integration-tests/scripts/docker.sh prunes the replaced ones.
    docker_build(&root, "build", "pledge/build-stage:dev", dir.path());
    for (target, binary) in
        [("mysql-adapter", "pledge-mysql-adapter"), ("reference-participant", "pledge-reference-participant")]
    {
        let image = format!("pledge/{target}:dev");
        docker_build(&root, target, &image, dir.path());
        for program in [binary, "pledge"] {
            let mut run = Command::new("docker");
            run.args(["run", "--rm", &image, program, "--help"]);
            let (status, out) = run_bounded(&mut run, CALL_TIMEOUT, &dir.path().join("run-help.log"));
            assert!(status.success(), "{program} does not run in {image}: {out}");
        }
    }
    eprintln!("images built in {:.1} s", started.elapsed().as_secs_f64());

    let started = Instant::now();
    compose.run(&["up", "--detach"], UP_TIMEOUT, "up.log");
    let deadline = Instant::now() + HEALTHY_TIMEOUT;
    let services = loop {
        let services = compose.health();
        if services.len() == 5 && services.iter().all(|(_, health, _)| health == "healthy") {
            break services;
        }
        let broken: Vec<_> = services.iter().filter(|(_, h, s)| h == "unhealthy" || s != "running").collect();
        assert!(broken.is_empty(), "services failed: {broken:?}");
        assert!(Instant::now() < deadline, "not every service is healthy after {HEALTHY_TIMEOUT:?}: {services:?}");
        tokio::time::sleep(POLL_INTERVAL).await;
    };
    eprintln!("compose up and healthy in {:.1} s: {services:?}", started.elapsed().as_secs_f64());

    // The probe the images' HEALTHCHECK runs, from the host: SERVING through a published port
    // (exit 0); a port where no gRPC server answers (PostgreSQL's) is a failure (exit 1).
    let health = |endpoint: String| {
        let mut probe = Command::new(bin("pledge"));
        probe.args(["health", &endpoint, "--timeout-ms", "3000"]);
        run_bounded(&mut probe, CALL_TIMEOUT, &dir.path().join("health.log"))
    };
    let (status, out) = health(format!("http://127.0.0.1:{}", ports.coordinator));
    assert!(status.success() && out.contains("SERVING"), "pledge health of the coordinator: {status}: {out}");
    let (status, out) = health(format!("http://127.0.0.1:{}", ports.postgres));
    assert_eq!(status.code(), Some(1), "pledge health of a port without a gRPC server: {out}");

    // The application: a table of its own in the database compose created.
    let started = Instant::now();
    let db_url = format!("postgres://pledge:pledge@127.0.0.1:{}/orders", ports.postgres);
    let db = sqlx::PgPool::connect(&db_url).await.expect("PostgreSQL through its published port");
    sqlx::query("CREATE TABLE orders (id bigint PRIMARY KEY, item text NOT NULL)").execute(&db).await.unwrap();
    let order_id = i64::from(fastrand::u32(..));
    let topic = "order-events";
    let key = format!("order-{order_id}");

    let mut coordinator = CoordinatorClient::connect(format!("http://127.0.0.1:{}", ports.coordinator))
        .await
        .expect("the coordinator through its published port");
    let gtid = coordinator
        .begin(v1::BeginRequest {
            timeout_ms: None,
            idempotency_key: String::new(),
            branches: vec![
                v1::BranchRef { resource_id: "orders".into(), branch_id: "row".into(), may_be_empty: false },
                v1::BranchRef { resource_id: "events".into(), branch_id: "event".into(), may_be_empty: false },
            ],
            protocol: v1::Protocol::TwoPhase as i32,
        })
        .await
        .expect("Begin")
        .into_inner()
        .gtid;

    let mut postgres_adapter = PostgresBranchClient::connect(format!("http://127.0.0.1:{}", ports.postgres_adapter))
        .await
        .expect("the PostgreSQL adapter through its published port");
    let executed = postgres_adapter
        .execute(v1::ExecuteRequest {
            resource_id: "orders".into(),
            gtid: gtid.clone(),
            branch_id: "row".into(),
            statements: vec![v1::Statement {
                sql: "INSERT INTO orders (id, item) VALUES ($1, $2)".into(),
                params: vec![
                    v1::Value { kind: Some(Kind::Int(order_id)) },
                    v1::Value { kind: Some(Kind::Text("espresso machine".into())) },
                ],
            }],
            request_id: String::new(),
        })
        .await
        .expect("Execute at the PostgreSQL adapter")
        .into_inner();
    assert_eq!(executed.results[0].rows_affected, 1);

    let mut kafka_adapter = KafkaBranchClient::connect(format!("http://127.0.0.1:{}", ports.kafka_adapter))
        .await
        .expect("the Kafka adapter through its published port");
    kafka_adapter
        .produce(v1::ProduceRequest {
            resource_id: "events".into(),
            gtid: gtid.clone(),
            branch_id: "event".into(),
            records: vec![v1::KafkaRecord {
                topic: topic.into(),
                partition: Some(0),
                key: key.clone().into_bytes(),
                value: b"created".to_vec(),
                headers: vec![],
            }],
            request_id: String::new(),
        })
        .await
        .expect("Produce at the Kafka adapter");

    // Before the commit neither is visible: the row is in an open database transaction, the
    // record in an open Kafka transaction.
    let count = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM orders WHERE id = $1")
            .bind(order_id)
            .fetch_one(&db)
            .await
            .unwrap()
    };
    assert_eq!(count().await, 0, "the row is visible before the commit");
    let bootstrap = format!("127.0.0.1:{}", ports.kafka);
    let (b, t) = (bootstrap.clone(), topic.to_string());
    let before = tokio::task::spawn_blocking(move || read_committed(&b, &t)).await.unwrap();
    assert!(before.iter().all(|(k, _)| *k != key), "the record is visible before the commit: {before:?}");

    let committed = coordinator
        .commit(v1::CommitRequest { gtid: gtid.clone(), branches: vec![], wait_for_completion: true })
        .await
        .expect("Commit")
        .into_inner();
    assert_eq!((committed.outcome(), committed.completed), (v1::Outcome::Committed, true), "{}", committed.reason);

    let item: String = sqlx::query_scalar("SELECT item FROM orders WHERE id = $1")
        .bind(order_id)
        .fetch_one(&db)
        .await
        .expect("the committed row");
    assert_eq!(item, "espresso machine");

    let deadline = Instant::now() + READ_TIMEOUT;
    loop {
        let (b, t) = (bootstrap.clone(), topic.to_string());
        let seen = tokio::task::spawn_blocking(move || read_committed(&b, &t)).await.unwrap();
        if seen.contains(&(key.clone(), "created".to_string())) {
            assert_eq!(seen.len(), 1, "exactly the committed record: {seen:?}");
            break;
        }
        assert!(Instant::now() < deadline, "the committed record is not readable after {READ_TIMEOUT:?}: {seen:?}");
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    eprintln!("transaction checked in {:.1} s", started.elapsed().as_secs_f64());
    drop(db);
}
