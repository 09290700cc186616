//! The tests' PostgreSQL, Kafka and MariaDB from containers (testcontainers-rs), chosen by one switch:
//! `PLEDGE_TEST_SERVICES=testcontainers`.
//!
//! By default (the switch unset, or `local`) the tests use the services the project's scripts
//! start (`integration-tests/scripts/services.sh`), found through the variables its `env`
//! prints. With the switch, the first call of a service getter in a test binary
//! ([`crate::pg_url`], [`crate::pg_ca`], [`crate::kafka_bootstrap`],
//! [`crate::mariadb::mariadb_url`]) starts that service's
//! container, waits until it serves, and sets it up as the scripts set up theirs; every test
//! of the binary then shares it, as they share the scripts' services. The images are the ones
//! `integration-tests/scripts/docker.sh start` provides (pulled, or built from Debian's
//! packages under the same names where no registry answers): [`POSTGRES_IMAGE`],
//! [`KAFKA_IMAGE`] and [`MARIADB_IMAGE`].
//!
//! A runtime of its own: each `#[tokio::test]` runs on a runtime of its own, dropped when the
//! test ends, and the Docker client (bollard over hyper) keeps its connections' tasks on the
//! runtime it was first used on. The containers outlive the test that started them, so they
//! are started, probed and removed on one background runtime that lives as long as the
//! process; a getter blocks its caller (whatever runtime, if any, it runs on) until that work
//! is done, bounded by [`STARTUP_TIMEOUT`] and [`PROBE_TIMEOUT`].
//!
//! Removal: statics are never dropped, so the containers are removed by an `atexit` handler
//! (libtest ends a test binary with `exit`), bounded by [`REMOVE_TIMEOUT`], and on SIGINT,
//! SIGTERM or SIGQUIT by testcontainers' watchdog (its `watchdog` feature). A process killed
//! outright (SIGKILL) cannot do either: every container carries the label [`LABEL`], by which
//! `docker ps -aq --filter label=dev.pledge.test | xargs -r docker rm -f -v` removes what is
//! left (CI runs it after the tests).
//!
//! Not here: the Kafka broker's TLS and SASL listeners, and the tests that kill or restart a
//! server process themselves (`mariadbd` by [`crate::mariadb::kill9_server`], PostgreSQL by
//! `StorePair`): they call [`require_local`].

use std::ffi::OsString;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use testcontainers::bollard::models::HostConfig;
use testcontainers::core::{IntoContainerPort, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, ContainerRequest, CopyTargetOptions, GenericImage, Image, ImageExt};

/// The switch: `local` (or unset) for the scripts' services, `testcontainers` for containers.
pub const SWITCH: &str = "PLEDGE_TEST_SERVICES";
/// How to turn the switch on, for messages that say where else a service can come from.
pub const SWITCH_HINT: &str = "PLEDGE_TEST_SERVICES=testcontainers (with a Docker engine: bash \
     integration-tests/scripts/docker.sh start) to run PostgreSQL, Kafka and MariaDB";
/// The label on every container started here (its value: the test binary's name).
pub const LABEL: &str = "dev.pledge.test";
/// PostgreSQL, as deploy/compose.yaml names it (docker.sh builds a substitute when no registry
/// serves it).
pub const POSTGRES_IMAGE: (&str, &str) = ("postgres", "15");
/// Kafka, as deploy/compose.yaml names it; the version is docker.sh's `KAFKA_VERSION`, the
/// jars scripts/kafka.sh runs.
pub const KAFKA_IMAGE: (&str, &str) = ("apache/kafka", "4.3.1");
/// MariaDB, the series scripts/mariadb.sh runs (Debian 12's); docker.sh builds a substitute
/// when no registry serves it.
pub const MARIADB_IMAGE: (&str, &str) = ("mariadb", "10.11");

/// From creating a container to the log line saying it serves: PostgreSQL's init takes about
/// 2 s, MariaDB's about 5 s, Kafka's JVM start about 18 s on a 2-core machine that is also
/// compiling.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(180);
/// How long the real probe after that line (a connection, a transaction) may keep failing.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(60);
/// Between two attempts of the probe.
const PROBE_INTERVAL: Duration = Duration::from_millis(200);
/// How long removing the containers at exit may take.
pub const REMOVE_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts at starting Kafka on a free port picked here: another process can take the port
/// between the pick and Docker's bind.
const KAFKA_PORT_ATTEMPTS: u32 = 3;

/// The user the tests connect as (the cluster's superuser, as in scripts/postgres.sh).
const PG_USER: &str = "pledge";
/// scripts/postgres.sh's `MIN_PREPARED_XACTS`: the tests keep many branches prepared at once.
const MIN_PREPARED_XACTS: u32 = 64;
/// The Docker default (64 MiB) is short for 200 connections' parallel queries.
const PG_SHM_BYTES: u64 = 256 * 1024 * 1024;

/// scripts/mariadb.sh's account and databases.
const MDB_USER: &str = "pledge";
const MDB_PASSWORD: &str = "pledge";
/// scripts/mariadb.sh's `MDB_SERVER_ID`: crash recovery of XA transactions matches them by
/// server_id (MDEV-27342), so it is fixed, and the same in both forms.
const MDB_SERVER_ID: u32 = 53306;

/// Where the tests' services come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Services {
    /// The services the project's scripts start, found through their environment variables.
    Local,
    /// Containers started by the test binary itself (this module).
    Containers,
}

/// The services selected by [`SWITCH`] (read once); panics on a value it does not know.
pub fn services() -> Services {
    static SERVICES: OnceLock<Result<Services, String>> = OnceLock::new();
    match SERVICES.get_or_init(|| parse_switch(std::env::var_os(SWITCH))) {
        Ok(services) => *services,
        Err(e) => panic!("{e}"),
    }
}

/// True when the tests run against containers.
pub fn enabled() -> bool {
    services() == Services::Containers
}

fn parse_switch(value: Option<OsString>) -> Result<Services, String> {
    let Some(value) = value else { return Ok(Services::Local) };
    match value.to_str() {
        Some("" | "local") => Ok(Services::Local),
        Some("testcontainers") => Ok(Services::Containers),
        _ => Err(format!(
            "{SWITCH}={value:?}: expected `local` (the default: the services \
             integration-tests/scripts/services.sh starts) or `testcontainers` (PostgreSQL, Kafka and \
             MariaDB in containers of the Docker engine integration-tests/scripts/docker.sh starts)"
        )),
    }
}

/// Panics when the tests run against containers: `what` needs the local service processes
/// themselves (it kills or restarts them, or runs their binaries) and has no container form.
pub fn require_local(what: &str) {
    if enabled() {
        panic!(
            "{what} needs the local services the project's scripts start and has no container form: \
             run it without {SWITCH}=testcontainers"
        );
    }
}

// ------------------------------------------------------------------ PostgreSQL

/// A PostgreSQL 15 container set up as scripts/postgres.sh sets up its cluster: superuser
/// `pledge` with trust authentication (from the loopback port only), databases `pledge_a` and
/// `pledge_b`, `max_prepared_transactions` = 256, durability on, TLS offered with a server
/// certificate for 127.0.0.1 and localhost from a CA of its own.
#[derive(Debug)]
pub struct Postgres {
    /// The loopback port mapped to the container's 5432.
    pub port: u16,
    /// The CA certificate (PEM) that signed the server's certificate.
    pub ca: PathBuf,
}

impl Postgres {
    /// `postgres://pledge@127.0.0.1:<port>/<database>`: the shape of the scripts' URLs.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://{PG_USER}@127.0.0.1:{}/{database}", self.port)
    }
}

/// This process's PostgreSQL container, started by the first call.
pub fn postgres() -> &'static Postgres {
    static POSTGRES: OnceLock<Result<Postgres, String>> = OnceLock::new();
    match POSTGRES.get_or_init(|| on_background(start_postgres()).map_err(|e| format!("{e:#}"))) {
        Ok(pg) => pg,
        Err(e) => panic!("{SWITCH}=testcontainers: PostgreSQL's container: {e}"),
    }
}

/// Runs as the server's OS user at the cluster's creation (the images' init hook): the TLS
/// files were copied in as root's, and PostgreSQL serves only a key its own user owns and
/// nobody else reads.
const PG_TLS_INIT: &str = "#!/bin/sh
# Written by pledge-integration-tests (src/containers.rs).
set -eu
install -m 600 /etc/pledge-tls/server.key \"$PGDATA/server.key\"
install -m 644 /etc/pledge-tls/server.crt \"$PGDATA/server.crt\"
";

async fn start_postgres() -> anyhow::Result<Postgres> {
    let dir = state_dir()?;
    // The CA and the server's certificate made here (rcgen), so the tests find the CA on this
    // host's file system, where sslrootcert= points.
    let (ca, server) = tokio::task::spawn_blocking(move || {
        let pki = crate::tls::Pki::new(&dir, "postgres");
        let server = pki.issue("postgres-server", false);
        (pki.ca, server)
    })
    .await?;
    let cert = std::fs::read(&server.cert).with_context(|| format!("reading {}", server.cert.display()))?;
    let key = std::fs::read(&server.key).with_context(|| format!("reading {}", server.key.display()))?;
    // scripts/postgres.sh's settings (its pledge.conf) as server flags; the files named are
    // relative to the data directory, where PG_TLS_INIT puts them.
    let settings = [
        "max_prepared_transactions=256",
        "max_connections=200",
        "fsync=on",
        "synchronous_commit=on",
        "full_page_writes=on",
        "ssl=on",
        "ssl_cert_file=server.crt",
        "ssl_key_file=server.key",
        "log_line_prefix=%m [%p] %q%u@%d ",
    ];
    let mut cmd = vec!["postgres".to_string()];
    for s in settings {
        cmd.extend(["-c".to_string(), s.to_string()]);
    }
    let request = GenericImage::new(POSTGRES_IMAGE.0, POSTGRES_IMAGE.1)
        .with_exposed_port(5432.tcp())
        // The server started for the cluster's init logs to stdout and listens on no TCP
        // port; this line on stderr is the real server's (as in the official image).
        .with_wait_for(WaitFor::message_on_stderr("database system is ready to accept connections"))
        .with_env_var("POSTGRES_USER", PG_USER)
        .with_env_var("POSTGRES_HOST_AUTH_METHOD", "trust")
        .with_env_var("POSTGRES_DB", "pledge_a")
        .with_env_var("POSTGRES_INITDB_ARGS", "--encoding=UTF8 --no-locale")
        .with_copy_to(CopyTargetOptions::new("/etc/pledge-tls/server.crt").with_mode(0o644), cert)
        .with_copy_to(CopyTargetOptions::new("/etc/pledge-tls/server.key").with_mode(0o644), key)
        .with_copy_to(
            CopyTargetOptions::new("/docker-entrypoint-initdb.d/pledge-tls.sh").with_mode(0o755),
            PG_TLS_INIT.as_bytes().to_vec(),
        )
        .with_cmd(cmd)
        .with_shm_size(PG_SHM_BYTES)
        // Host port 0: Docker picks a free one.
        .with_mapped_port(0, 5432.tcp());
    let container = start(request, "PostgreSQL").await?;
    let port = container.get_host_port_ipv4(5432.tcp()).await.context("the host port of PostgreSQL's 5432")?;
    keep_until_exit(container);
    let pg = Postgres { port, ca };
    let url = pg.url("pledge_a");
    let mut conn = probe("PostgreSQL", || async {
        use sqlx::Connection;
        Ok(sqlx::PgConnection::connect(&url).await?)
    })
    .await?;
    let (prepared, ssl): (String, String) =
        sqlx::query_as("SELECT current_setting('max_prepared_transactions'), current_setting('ssl')")
            .fetch_one(&mut conn)
            .await
            .context("reading PostgreSQL's settings")?;
    let prepared: u32 = prepared.parse().with_context(|| format!("max_prepared_transactions = {prepared:?}"))?;
    ensure!(prepared >= MIN_PREPARED_XACTS, "max_prepared_transactions = {prepared}, need >= {MIN_PREPARED_XACTS}");
    ensure!(ssl == "on", "ssl = {ssl}: the server's TLS is off (its log says why)");
    sqlx::query("CREATE DATABASE pledge_b OWNER pledge") // PG_USER
        .execute(&mut conn)
        .await
        .context("creating database pledge_b")?;
    Ok(pg)
}

// ------------------------------------------------------------------ Kafka

/// A single-node Kafka (KRaft, combined broker and controller) with scripts/kafka.sh's broker
/// settings and one PLAINTEXT listener, on a loopback port mapped to the same port inside the
/// container so that the address the broker advertises is the one clients dialled.
#[derive(Debug)]
pub struct Kafka {
    /// `127.0.0.1:<port>`.
    pub bootstrap: String,
}

/// This process's Kafka container, started by the first call.
pub fn kafka() -> &'static Kafka {
    static KAFKA: OnceLock<Result<Kafka, String>> = OnceLock::new();
    match KAFKA.get_or_init(|| on_background(start_kafka()).map_err(|e| format!("{e:#}"))) {
        Ok(kafka) => kafka,
        Err(e) => panic!("{SWITCH}=testcontainers: Kafka's container: {e}"),
    }
}

fn kafka_request(port: u16) -> ContainerRequest<GenericImage> {
    let settings = [
        ("KAFKA_NODE_ID", "1".to_string()),
        ("KAFKA_PROCESS_ROLES", "broker,controller".to_string()),
        // Clients come through Docker's port mapping, so the broker listens on every address
        // of the container; the controller only for itself.
        ("KAFKA_LISTENERS", format!("PLAINTEXT://0.0.0.0:{port},CONTROLLER://127.0.0.1:9093")),
        ("KAFKA_ADVERTISED_LISTENERS", format!("PLAINTEXT://127.0.0.1:{port}")),
        ("KAFKA_LISTENER_SECURITY_PROTOCOL_MAP", "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT".to_string()),
        ("KAFKA_CONTROLLER_LISTENER_NAMES", "CONTROLLER".to_string()),
        ("KAFKA_INTER_BROKER_LISTENER_NAME", "PLAINTEXT".to_string()),
        ("KAFKA_CONTROLLER_QUORUM_VOTERS", "1@127.0.0.1:9093".to_string()),
        ("KAFKA_LOG_DIRS", "/var/lib/kafka/data".to_string()),
        ("KAFKA_HEAP_OPTS", "-Xms256m -Xmx512m".to_string()),
        // From here, scripts/kafka.sh's server.properties. One node: every internal topic
        // makes do with one replica, or the group and transaction coordinators never start.
        ("KAFKA_NUM_PARTITIONS", "1".to_string()),
        ("KAFKA_DEFAULT_REPLICATION_FACTOR", "1".to_string()),
        ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "1".to_string()),
        ("KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR", "1".to_string()),
        ("KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "1".to_string()),
        ("KAFKA_SHARE_COORDINATOR_STATE_TOPIC_REPLICATION_FACTOR", "1".to_string()),
        ("KAFKA_SHARE_COORDINATOR_STATE_TOPIC_MIN_ISR", "1".to_string()),
        // Tests create topics by producing to them and want consumers to join at once.
        ("KAFKA_AUTO_CREATE_TOPICS_ENABLE", "true".to_string()),
        ("KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS", "0".to_string()),
        // Tests of transactions the broker aborts on timeout.
        ("KAFKA_TRANSACTION_ABORT_TIMED_OUT_TRANSACTION_CLEANUP_INTERVAL_MS", "500".to_string()),
        ("KAFKA_NUM_NETWORK_THREADS", "2".to_string()),
        ("KAFKA_NUM_IO_THREADS", "4".to_string()),
        ("KAFKA_NUM_RECOVERY_THREADS_PER_DATA_DIR", "1".to_string()),
    ];
    let mut request = GenericImage::new(KAFKA_IMAGE.0, KAFKA_IMAGE.1)
        .with_wait_for(WaitFor::message_on_stdout("Kafka Server started"))
        .with_mapped_port(port, port.tcp());
    for (name, value) in settings {
        request = request.with_env_var(name, value);
    }
    request
}

async fn start_kafka() -> anyhow::Result<Kafka> {
    let mut attempt = 1;
    let (container, port) = loop {
        let port = free_port()?;
        match start(kafka_request(port), "Kafka").await {
            Ok(container) => break (container, port),
            // Docker's words when the host port went to someone else after the pick.
            Err(e)
                if attempt < KAFKA_PORT_ATTEMPTS
                    && ["port is already allocated", "address already in use"]
                        .iter()
                        .any(|m| format!("{e:#}").contains(m)) =>
            {
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    };
    keep_until_exit(container);
    let bootstrap = format!("127.0.0.1:{port}");
    let kafka = Kafka { bootstrap: bootstrap.clone() };
    tokio::task::spawn_blocking(move || warm_up_kafka(&bootstrap)).await??;
    Ok(kafka)
}

/// One transaction that also commits a consumer group's offsets, retried until it goes
/// through (bounded by [`PROBE_TIMEOUT`]): the broker answers, and its transaction and group
/// coordinators are up. A new broker creates their internal topics on first use, which the
/// scripts' long-lived broker did long ago; the tests' first transactions must not race that.
fn warm_up_kafka(bootstrap: &str) -> anyhow::Result<()> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    use rdkafka::{ClientConfig, Offset, TopicPartitionList};

    const TOPIC: &str = "pledge-containers-warm-up";
    let deadline = Instant::now() + PROBE_TIMEOUT;
    let left = || deadline.saturating_duration_since(Instant::now());
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("transactional.id", TOPIC)
        .create()
        .context("a transactional producer")?;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", TOPIC)
        .create()
        .context("a consumer")?;
    let fail = |e: rdkafka::error::KafkaError| {
        anyhow!("Kafka at {bootstrap} ran no transaction within {PROBE_TIMEOUT:?}: {e}")
    };
    loop {
        match producer.init_transactions(left()) {
            Ok(()) => break,
            Err(e) if left().is_zero() => return Err(fail(e)),
            Err(_) => std::thread::sleep(PROBE_INTERVAL),
        }
    }
    loop {
        let transaction = || {
            producer.begin_transaction()?;
            producer.send(BaseRecord::<str, str>::to(TOPIC).key("warm-up").payload("warm-up")).map_err(|(e, _)| e)?;
            let mut offsets = TopicPartitionList::new();
            offsets.add_partition_offset(TOPIC, 0, Offset::Offset(1))?;
            let group = consumer.group_metadata().expect("a consumer with a group.id has group metadata");
            producer.send_offsets_to_transaction(&offsets, &group, left())?;
            producer.commit_transaction(left())
        };
        match transaction() {
            Ok(()) => return Ok(()),
            // A transaction that can be aborted can be tried again; one that cannot is the answer.
            Err(e) if left().is_zero() || producer.abort_transaction(left()).is_err() => return Err(fail(e)),
            Err(_) => std::thread::sleep(PROBE_INTERVAL),
        }
    }
}

// ------------------------------------------------------------------ MariaDB

/// A MariaDB 10.11 server set up as scripts/mariadb.sh sets up its own: the binary log on
/// (ROW) and synced at every commit with the redo log (`sync_binlog=1`,
/// `innodb_flush_log_at_trx_commit=1`) so a prepared XA transaction survives a crash, a fixed
/// server_id, databases `pledge_a` and `pledge_b`, and the account `pledge`/`pledge` with every
/// privilege on both plus BINLOG MONITOR and PROCESS (what the adapter's start-up check and
/// lock diagnostics read). XA RECOVER needs no privilege in 10.11.
///
/// The container has no kill -9 or restart of `mariadbd` from the tests (they need the
/// scripts' server: [`require_local`]), so its binary log and data live and die with it.
#[derive(Debug)]
pub struct Mariadb {
    /// The loopback port mapped to the container's 3306.
    pub port: u16,
}

impl Mariadb {
    /// `mysql://pledge:pledge@127.0.0.1:<port>/<database>`: the shape of the scripts' URLs.
    pub fn url(&self, database: &str) -> String {
        format!("mysql://{MDB_USER}:{MDB_PASSWORD}@127.0.0.1:{}/{database}", self.port)
    }
}

/// This process's MariaDB container, started by the first call.
pub fn mariadb() -> &'static Mariadb {
    static MARIADB: OnceLock<Result<Mariadb, String>> = OnceLock::new();
    match MARIADB.get_or_init(|| on_background(start_mariadb()).map_err(|e| format!("{e:#}"))) {
        Ok(mariadb) => mariadb,
        Err(e) => panic!("{SWITCH}=testcontainers: MariaDB's container: {e}"),
    }
}

/// Run as root by the image's init, after it made `pledge_a` and the account `pledge`@'%'
/// (MARIADB_DATABASE, MARIADB_USER): what scripts/mariadb.sh's `setup_accounts` grants beyond
/// that. `'%'`, not the script's 127.0.0.1 and localhost: through Docker's port mapping the
/// server sees the bridge's address.
const MDB_INIT_SQL: &str = "-- Written by pledge-integration-tests (src/containers.rs).
CREATE DATABASE IF NOT EXISTS pledge_b CHARACTER SET utf8mb4;
GRANT ALL PRIVILEGES ON pledge_a.* TO 'pledge'@'%';
GRANT ALL PRIVILEGES ON pledge_b.* TO 'pledge'@'%';
GRANT BINLOG MONITOR, PROCESS ON *.* TO 'pledge'@'%';
";

async fn start_mariadb() -> anyhow::Result<Mariadb> {
    // scripts/mariadb.sh's my.cnf as server options (its paths aside: the image's data
    // directory holds the binary log).
    let server_id = format!("--server-id={MDB_SERVER_ID}");
    let options = [
        "--log-bin=mariadb-bin",
        "--binlog-format=ROW",
        "--sync-binlog=1",
        "--innodb-flush-log-at-trx-commit=1",
        &server_id,
        "--max-binlog-size=256M",
        "--max-connections=200",
        "--innodb-lock-wait-timeout=10",
        "--character-set-server=utf8mb4",
        "--collation-server=utf8mb4_general_ci",
        "--skip-name-resolve",
    ];
    let mut cmd = vec!["mariadbd".to_string()];
    cmd.extend(options.iter().map(|o| o.to_string()));
    let request = GenericImage::new(MARIADB_IMAGE.0, MARIADB_IMAGE.1)
        .with_exposed_port(3306.tcp())
        // The init's temporary server listens on no port ("port: 0" in its start line); this
        // is the real server's start line (the official image and the substitute alike).
        .with_wait_for(WaitFor::message_on_stderr("port: 3306"))
        .with_env_var("MARIADB_USER", MDB_USER)
        .with_env_var("MARIADB_PASSWORD", MDB_PASSWORD)
        .with_env_var("MARIADB_DATABASE", "pledge_a")
        // root is never used; its port is on loopback only, as the scripts' server's.
        .with_env_var("MARIADB_ALLOW_EMPTY_ROOT_PASSWORD", "1")
        .with_copy_to(
            CopyTargetOptions::new("/docker-entrypoint-initdb.d/pledge.sql").with_mode(0o644),
            MDB_INIT_SQL.as_bytes().to_vec(),
        )
        .with_cmd(cmd)
        .with_mapped_port(0, 3306.tcp());
    let container = start(request, "MariaDB").await?;
    let port = container.get_host_port_ipv4(3306.tcp()).await.context("the host port of MariaDB's 3306")?;
    keep_until_exit(container);
    let mariadb = Mariadb { port };
    let url = mariadb.url("pledge_a");
    let mut conn = probe("MariaDB", || async {
        use sqlx::Connection;
        Ok(sqlx::MySqlConnection::connect(&url).await?)
    })
    .await?;
    // What scripts/mariadb.sh's check_settings checks, as the tests' account.
    let settings: String = sqlx::query_scalar(
        "SELECT CONCAT_WS(' ', @@log_bin, @@sync_binlog, @@innodb_flush_log_at_trx_commit, @@binlog_format, \
         @@server_id)",
    )
    .fetch_one(&mut conn)
    .await
    .context("reading MariaDB's settings")?;
    let want = format!("ON 1 1 ROW {MDB_SERVER_ID}");
    ensure!(
        settings == want,
        "MariaDB's log_bin, sync_binlog, innodb_flush_log_at_trx_commit, binlog_format, server_id: got [{settings}], want [{want}]"
    );
    // The grants: both databases visible to the account, the binary log readable, XA RECOVER
    // answered (its rows are whatever is prepared: none on a new server).
    let databases: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME IN ('pledge_a', 'pledge_b')",
    )
    .fetch_one(&mut conn)
    .await
    .context("listing MariaDB's databases")?;
    ensure!(databases == 2, "the account {MDB_USER} sees {databases} of the databases pledge_a and pledge_b");
    sqlx::raw_sql("SHOW BINARY LOGS").execute(&mut conn).await.context("SHOW BINARY LOGS as the tests' account")?;
    sqlx::raw_sql("XA RECOVER").execute(&mut conn).await.context("XA RECOVER as the tests' account")?;
    Ok(mariadb)
}

// ------------------------------------------------------------------ the machinery

/// The runtime every container operation runs on (see the module docs).
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("pledge-containers")
            .enable_all()
            .build()
            .expect("building the containers' runtime")
    })
}

/// Runs `work` on [`runtime`] and blocks the calling thread until it is done. Safe from any
/// thread, a test runtime's included: the work never needs the caller's runtime.
fn on_background<T: Send + 'static>(
    work: impl Future<Output = anyhow::Result<T>> + Send + 'static,
) -> anyhow::Result<T> {
    match futures::executor::block_on(runtime().spawn(work)) {
        Ok(result) => result,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(anyhow!("the container task was cancelled: {e}")),
    }
}

/// Starts `request` (labelled, ports on loopback only, startup bounded), saying what to do
/// when there is no engine or no image.
async fn start(
    request: impl Into<ContainerRequest<GenericImage>>,
    what: &str,
) -> anyhow::Result<ContainerAsync<GenericImage>> {
    let request: ContainerRequest<GenericImage> = request.into();
    let image = format!("{}:{}", request.image().name(), request.image().tag());
    request
        .with_label(LABEL, test_binary())
        .with_host_config_modifier(loopback_only)
        .with_startup_timeout(STARTUP_TIMEOUT)
        .start()
        .await
        .with_context(|| {
            format!(
                "starting {what} ({image}); a Docker engine and the image are needed: \
                 bash integration-tests/scripts/docker.sh start provides both"
            )
        })
}

/// Publishes the container's ports on 127.0.0.1 only, as the scripts' services listen: the
/// PostgreSQL container trusts every connection, MariaDB's root has no password.
fn loopback_only(host: &mut HostConfig) {
    for bindings in host.port_bindings.iter_mut().flat_map(|map| map.values_mut()).flatten() {
        for binding in bindings {
            binding.host_ip = Some("127.0.0.1".to_string());
        }
    }
}

/// The label's value: this test binary's file name.
fn test_binary() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "unknown".to_string())
}

/// A loopback port nobody listens on now.
fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("picking a free port")?;
    Ok(listener.local_addr()?.port())
}

/// `connect` until it succeeds, bounded by [`PROBE_TIMEOUT`] (the last error when it passes).
async fn probe<T, F, Fut>(what: &str, mut connect: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let deadline = Instant::now() + PROBE_TIMEOUT;
    loop {
        match tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), connect()).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) if Instant::now() >= deadline => {
                return Err(e.context(format!("{what} refused connections for {PROBE_TIMEOUT:?}")));
            }
            Err(_) => bail!("{what} did not answer within {PROBE_TIMEOUT:?}"),
            Ok(Err(_)) => tokio::time::sleep(PROBE_INTERVAL).await,
        }
    }
}

/// What [`remove_at_exit`] removes: the containers and this process's directory of files
/// for them.
struct Started {
    containers: Vec<ContainerAsync<GenericImage>>,
    dir: Option<PathBuf>,
}

static STARTED: Mutex<Started> = Mutex::new(Started { containers: Vec::new(), dir: None });

fn started() -> std::sync::MutexGuard<'static, Started> {
    // A panic while holding the lock leaves the list itself intact.
    STARTED.lock().unwrap_or_else(PoisonError::into_inner)
}

fn keep_until_exit(container: ContainerAsync<GenericImage>) {
    register_exit_handler();
    started().containers.push(container);
}

/// This process's directory for files the containers' clients read (made once).
fn state_dir() -> anyhow::Result<PathBuf> {
    register_exit_handler();
    let mut started = started();
    if let Some(dir) = &started.dir {
        return Ok(dir.clone());
    }
    let dir = tempfile::Builder::new().prefix("pledge-containers-").tempdir().context("a state directory")?.keep();
    started.dir = Some(dir.clone());
    Ok(dir)
}

fn register_exit_handler() {
    static REGISTERED: std::sync::Once = std::sync::Once::new();
    REGISTERED.call_once(|| {
        // SAFETY: atexit(3) takes a function without arguments that it calls once at exit;
        // remove_at_exit never unwinds (see there).
        let rc = unsafe { libc::atexit(remove_at_exit) };
        assert_eq!(rc, 0, "atexit refused the containers' removal");
    });
}

/// Removes the containers (bounded by [`REMOVE_TIMEOUT`]) and the state directory. It runs
/// inside `exit`, where an unwinding panic would abort: every failure is only reported, on
/// stderr (no test is left to fail, and no tracing subscriber to ask). The
/// background runtime's thread still runs then (exit ends threads after its handlers).
extern "C" fn remove_at_exit() {
    let _ = std::panic::catch_unwind(|| {
        let Started { containers, dir } =
            std::mem::replace(&mut *started(), Started { containers: Vec::new(), dir: None });
        if !containers.is_empty() {
            let removal = runtime().spawn(async move {
                for container in containers {
                    let id = container.id().to_string();
                    match tokio::time::timeout(REMOVE_TIMEOUT, container.rm()).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => eprintln!("pledge-integration-tests: removing container {id}: {e}"),
                        Err(_) => {
                            eprintln!("pledge-integration-tests: container {id} not removed within {REMOVE_TIMEOUT:?}")
                        }
                    }
                }
            });
            if let Err(e) = futures::executor::block_on(removal) {
                eprintln!("pledge-integration-tests: removing the containers: {e}");
            }
        }
        if let Some(dir) = dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_switch_takes_local_or_testcontainers_and_names_both_otherwise() {
        assert_eq!(parse_switch(None), Ok(Services::Local));
        assert_eq!(parse_switch(Some("".into())), Ok(Services::Local));
        assert_eq!(parse_switch(Some("local".into())), Ok(Services::Local));
        assert_eq!(parse_switch(Some("testcontainers".into())), Ok(Services::Containers));
        let e = parse_switch(Some("docker".into())).unwrap_err();
        assert!(e.starts_with("PLEDGE_TEST_SERVICES=\"docker\": expected"), "{e}");
        assert!(e.contains("`local`") && e.contains("`testcontainers`"), "{e}");
    }

    #[test]
    fn published_ports_are_bound_to_loopback_only() {
        use testcontainers::bollard::models::PortBinding;
        let mut host = HostConfig {
            port_bindings: Some(
                [("5432/tcp".to_string(), Some(vec![PortBinding { host_ip: None, host_port: Some("0".into()) }]))]
                    .into(),
            ),
            ..Default::default()
        };
        loopback_only(&mut host);
        let bindings = host.port_bindings.unwrap();
        let binding = &bindings["5432/tcp"].as_ref().unwrap()[0];
        assert_eq!(binding.host_ip.as_deref(), Some("127.0.0.1"));
        assert_eq!(binding.host_port.as_deref(), Some("0"));
    }
}
