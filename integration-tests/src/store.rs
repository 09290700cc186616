//! A PostgreSQL primary with a streaming synchronous standby, started for one test: the
//! decision store of a coordinator cluster as it runs in production, with a failover.
//!
//! Clients reach the primary through a TCP proxy ([`StorePair::url`]), as they would through a
//! managed database's endpoint or a CloudNativePG `-rw` service: [`StorePair::promote_standby`]
//! moves it to the promoted standby. Debian's server binaries are used (the test service
//! scripts install them); as root, server commands run as the `postgres` OS user, which
//! PostgreSQL requires.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sqlx::PgPool;

use crate::proxy::Proxy;

/// Longest a server start, a replication catch-up or a promotion may take.
const WAIT: Duration = Duration::from_secs(60);
pub const DATABASE: &str = "pledge_store";

struct Server {
    data: PathBuf,
    port: u16,
    log: PathBuf,
}

pub struct StorePair {
    root: PathBuf,
    bin: PathBuf,
    primary: Server,
    standby: Server,
    proxy: Proxy,
}

fn pg_bin() -> PathBuf {
    if let Ok(dir) = std::env::var("PLEDGE_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed (integration-tests/scripts/postgres.sh start installs it)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("postgres").exists())
        .collect();
    found.sort_by_key(|p| {
        p.parent().and_then(|v| v.file_name()).and_then(|v| v.to_str()).and_then(|v| v.parse::<u32>().ok())
    });
    found.pop().expect("no PostgreSQL server binaries under /usr/lib/postgresql")
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `program` run as the server's OS user.
fn as_pg(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.arg("-u").arg("postgres").arg("--").arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn run(mut c: Command, what: &str, log: Option<&Path>) {
    let out = c.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    if !out.status.success() {
        let log = log.map(|l| std::fs::read_to_string(l).unwrap_or_default()).unwrap_or_default();
        panic!(
            "{what} failed ({}):\n{}\n{}\n{log}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut f =
        std::fs::OpenOptions::new().append(true).open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    f.write_all(text.as_bytes()).unwrap();
}

fn url(port: u16) -> String {
    format!("postgres://pledge@127.0.0.1:{port}/{DATABASE}")
}

impl StorePair {
    /// Starts a primary and a synchronous standby (see the module docs) and waits until the
    /// standby streams synchronously. Its files live in a directory of its own (the server's
    /// OS user must reach them), removed when the pair is dropped.
    pub async fn start() -> StorePair {
        crate::containers::require_local("StorePair (PostgreSQL servers run and killed from this host's binaries)");
        let root = std::env::temp_dir().join(format!("pledge-store-{:08x}", fastrand::u32(..)));
        let bin = pg_bin();
        let (root2, bin2) = (root.clone(), bin.clone());
        let (primary, standby) = tokio::task::spawn_blocking(move || StorePair::create(&root2, &bin2)).await.unwrap();
        let proxy = Proxy::start(SocketAddr::from(([127, 0, 0, 1], primary.port))).await;
        let pair = StorePair { root, bin, primary, standby, proxy };
        pair.wait_sync().await;
        pair
    }

    fn create(root: &Path, bin: &Path) -> (Server, Server) {
        std::fs::create_dir_all(root).unwrap();
        if is_root() {
            let mut chown = Command::new("chown");
            chown.arg("postgres:").arg(root);
            run(chown, "chown", None);
        }
        let server =
            |name: &str| Server { data: root.join(name), port: free_port(), log: root.join(format!("{name}.log")) };
        let (primary, standby) = (server("primary"), server("standby"));
        let mut initdb = as_pg(&bin.join("initdb"));
        initdb.arg("-D").arg(&primary.data).args(["-U", "pledge", "--auth=trust", "-E", "UTF8", "--no-locale"]);
        run(initdb, "initdb", None);
        append(
            &primary.data.join("postgresql.conf"),
            &format!(
                "\nlisten_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\nfsync = on\n\
                 synchronous_commit = on\nwal_level = replica\n\
                 max_wal_senders = 4\nmax_connections = 100\nshared_buffers = 32MB\nlogging_collector = off\n",
                primary.port,
                root.display()
            ),
        );
        StorePair::pg_ctl_start(bin, &primary);
        let mut psql = Command::new(bin.join("psql"));
        psql.args(["-X", "-q", "-h", "127.0.0.1", "-U", "pledge", "-d", "postgres", "-p"])
            .arg(primary.port.to_string())
            .args(["-c", &format!("CREATE DATABASE {DATABASE}")]);
        run(psql, "creating the store database", Some(&primary.log));
        let mut backup = as_pg(&bin.join("pg_basebackup"));
        backup
            .args(["-h", "127.0.0.1", "-U", "pledge", "-R", "-X", "stream", "--checkpoint=fast", "-p"])
            .arg(primary.port.to_string())
            .arg("-D")
            .arg(&standby.data);
        run(backup, "pg_basebackup", Some(&primary.log));
        append(
            &standby.data.join("postgresql.auto.conf"),
            &format!(
                "port = {}\nprimary_conninfo = 'host=127.0.0.1 port={} user=pledge application_name=standby1'\n",
                standby.port, primary.port
            ),
        );
        StorePair::pg_ctl_start(bin, &standby);
        (primary, standby)
    }

    fn pg_ctl_start(bin: &Path, server: &Server) {
        let mut start = as_pg(&bin.join("pg_ctl"));
        start.arg("-D").arg(&server.data).arg("-l").arg(&server.log).args(["-w", "-t", "60", "start"]);
        run(start, "pg_ctl start", Some(&server.log));
    }

    async fn wait_sync(&self) {
        let pool = PgPool::connect(&self.primary_url()).await.expect("connecting to the primary");
        // Only now: with no standby yet, every commit (CREATE DATABASE too) would wait for one.
        sqlx::query("ALTER SYSTEM SET synchronous_standby_names = 'standby1'").execute(&pool).await.unwrap();
        sqlx::query("SELECT pg_reload_conf()").execute(&pool).await.unwrap();
        let started = Instant::now();
        loop {
            let state: Option<String> =
                sqlx::query_scalar("SELECT sync_state FROM pg_stat_replication WHERE application_name = 'standby1'")
                    .fetch_optional(&pool)
                    .await
                    .unwrap();
            if state.as_deref() == Some("sync") {
                return;
            }
            assert!(started.elapsed() < WAIT, "the standby is not synchronous after {WAIT:?} ({state:?})");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What clients use: the current primary, through the proxy.
    pub fn url(&self) -> String {
        url(self.proxy.addr.port())
    }

    pub fn primary_url(&self) -> String {
        url(self.primary.port)
    }

    pub fn standby_url(&self) -> String {
        url(self.standby.port)
    }

    /// kill -9 of the primary's postmaster (its backends die with it).
    pub fn kill_primary(&self) {
        let pid_file = std::fs::read_to_string(self.primary.data.join("postmaster.pid")).expect("postmaster.pid");
        let pid: libc::pid_t = pid_file.lines().next().unwrap().trim().parse().unwrap();
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }

    /// Promotes the standby, lets it commit without a synchronous standby (what Patroni does
    /// when none is left), and points the proxy at it.
    pub async fn promote_standby(&self) {
        let mut promote = as_pg(&self.bin.join("pg_ctl"));
        promote.arg("-D").arg(&self.standby.data).args(["-w", "-t", "60", "promote"]);
        let log = self.standby.log.clone();
        tokio::task::spawn_blocking(move || run(promote, "pg_ctl promote", Some(&log))).await.unwrap();
        let pool = PgPool::connect(&self.standby_url()).await.expect("connecting to the promoted standby");
        sqlx::query("ALTER SYSTEM SET synchronous_standby_names = ''").execute(&pool).await.unwrap();
        sqlx::query("SELECT pg_reload_conf()").execute(&pool).await.unwrap();
        let started = Instant::now();
        while sqlx::query_scalar::<_, bool>("SELECT pg_is_in_recovery()").fetch_one(&pool).await.unwrap() {
            assert!(started.elapsed() < WAIT, "the standby did not leave recovery");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.proxy.retarget(SocketAddr::from(([127, 0, 0, 1], self.standby.port)));
    }
}

impl Drop for StorePair {
    fn drop(&mut self) {
        for server in [&self.primary, &self.standby] {
            let mut stop = as_pg(&self.bin.join("pg_ctl"));
            stop.arg("-D").arg(&server.data).args(["-m", "immediate", "stop"]);
            let _ = stop.output();
        }
        if std::thread::panicking() {
            eprintln!("the store's files and server logs are kept in {}", self.root.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}
