//! Helpers for tests against a real MariaDB: the server the project's scripts start
//! (integration-tests/scripts/mariadb.sh), or with `PLEDGE_TEST_SERVICES=testcontainers` this
//! process's container ([`crate::containers::mariadb`]). Its URLs, SQL through the `mariadb`
//! client binary, and kill -9 / restart of the scripts' server itself (local only).
//!
//! SQL here goes through the client binary (installed with the server by mariadb.sh), over TCP
//! as the tests' `pledge` account, so these checks of the server itself depend on nothing of
//! Pledge's and work against either server; tests of the adapter use sqlx's MySQL pool
//! (`crate::mysql`).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::{EXIT_TIMEOUT, START_TIMEOUT};

const HOW_TO_START: &str = "these tests need the real MariaDB the project's scripts start \
     (bash integration-tests/run.sh does it; by hand: bash integration-tests/scripts/mariadb.sh start \
     && eval \"$(bash integration-tests/scripts/mariadb.sh env)\")";

fn env(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| panic!("{var} is not set: {HOW_TO_START}"))
}

/// `PLEDGE_MARIADB_URL_A` or `PLEDGE_MARIADB_URL_B`:
/// `mysql://pledge:pledge@127.0.0.1:<port>/pledge_a` (`pledge_b`).
///
/// With `PLEDGE_TEST_SERVICES=testcontainers`, the same URL to this process's container
/// ([`crate::containers::mariadb`]).
pub fn mariadb_url(db: char) -> String {
    if crate::containers::enabled() {
        assert!(matches!(db, 'a' | 'b'), "mariadb_url({db:?}): the test databases are 'a' and 'b'");
        return crate::containers::mariadb().url(&format!("pledge_{db}"));
    }
    let var = format!("PLEDGE_MARIADB_URL_{}", db.to_ascii_uppercase());
    std::env::var(&var).unwrap_or_else(|_| {
        panic!("{var} is not set: {HOW_TO_START}; or {} in containers", crate::containers::SWITCH_HINT)
    })
}

/// The parts of a `mysql://user:password@host:port/database` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MariadbParams {
    pub user: String,
    pub password: String,
    pub host: String,
    pub port: u16,
    pub database: String,
}

pub fn parse_url(url: &str) -> anyhow::Result<MariadbParams> {
    let rest = url.strip_prefix("mysql://").or_else(|| url.strip_prefix("mariadb://"));
    let rest = rest.with_context(|| format!("not a mysql:// URL: {url}"))?;
    let (auth, rest) = rest.split_once('@').with_context(|| format!("no user in {url}"))?;
    let (user, password) = auth.split_once(':').unwrap_or((auth, ""));
    let (hostport, database) = rest.split_once('/').with_context(|| format!("no database in {url}"))?;
    let (host, port) = hostport.rsplit_once(':').unwrap_or((hostport, "3306"));
    Ok(MariadbParams {
        user: user.into(),
        password: password.into(),
        host: host.into(),
        port: port.parse().with_context(|| format!("bad port in {url}"))?,
        database: database.split('?').next().unwrap_or_default().into(),
    })
}

/// The `mariadb` client for database `db` ('a' or 'b'): TCP, no option files read, batch
/// output without column names (tab-separated, special characters escaped as `\t`, `\n`,
/// `\\`), errors abort.
fn client(db: char) -> Command {
    let p = parse_url(&mariadb_url(db)).expect("PLEDGE_MARIADB_URL_*");
    let mut cmd = Command::new("mariadb");
    cmd.arg("--no-defaults")
        .arg("--protocol=tcp")
        .arg(format!("--host={}", p.host))
        .arg(format!("--port={}", p.port))
        .arg(format!("--user={}", p.user))
        .arg(format!("--password={}", p.password))
        .arg(format!("--database={}", p.database))
        .arg("--connect-timeout=5")
        .args(["--batch", "--skip-column-names"])
        .stdin(Stdio::null());
    cmd
}

/// Runs `sql` (one or more `;`-separated statements, in one session) in database `db` and
/// returns its output, or the client's error message (e.g. `ERROR 1397 (XAE04) ...`).
pub fn try_mariadb_sql(db: char, sql: &str) -> anyhow::Result<String> {
    let out = client(db)
        .arg("--execute")
        .arg(sql)
        .output()
        .context("running the `mariadb` client (installed by integration-tests/scripts/mariadb.sh start)")?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `sql` in database `db` as the tests' account and returns its tab-separated output
/// (one line a row, no header); panics with the server's message if it fails.
///
/// Each call is one session: an XA branch must be started, ended and prepared in the same
/// call. For `XA RECOVER` use `XA RECOVER FORMAT='SQL'`, whose `data` column is printable
/// (`X'..',X'..',<format id>` for binary XIDs).
pub fn mariadb_sql(db: char, sql: &str) -> String {
    try_mariadb_sql(db, sql).unwrap_or_else(|e| panic!("MariaDB ({db}) failed on `{sql}`: {e}"))
}

/// Checks that database `db` accepts a connection as the tests' account (`SELECT 1`).
pub fn mariadb_ping(db: char) -> anyhow::Result<()> {
    let out = try_mariadb_sql(db, "SELECT 1")?;
    anyhow::ensure!(out.trim() == "1", "SELECT 1 answered {out:?}");
    Ok(())
}

/// Waits until the server accepts connections (bounded by [`START_TIMEOUT`]).
pub async fn wait_ready() {
    let started = Instant::now();
    loop {
        let ping = tokio::task::spawn_blocking(|| mariadb_ping('a')).await.unwrap();
        match ping {
            Ok(()) => return,
            Err(e) if started.elapsed() > START_TIMEOUT => {
                panic!("MariaDB does not accept connections after {START_TIMEOUT:?}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// The pid of the running `mariadbd` (from `PLEDGE_MARIADB_PID_FILE`). Local only: a
/// container's server is not this host's process.
pub fn server_pid() -> libc::pid_t {
    crate::containers::require_local("the pid of mariadbd (kill -9 of the MariaDB server)");
    let file = env("PLEDGE_MARIADB_PID_FILE");
    let text = std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("reading {file} ({e}): is the MariaDB server running? {HOW_TO_START}"));
    text.trim().parse().unwrap_or_else(|_| panic!("{file} holds no pid: {text:?}"))
}

/// True while `pid` runs. A killed server is not reaped by its parent (the start script
/// exited long ago; the init of a container may not reap either), so a zombie counts as gone.
fn alive(pid: libc::pid_t) -> bool {
    // SAFETY: kill(2) with signal 0 only checks the process exists.
    if unsafe { libc::kill(pid, 0) } != 0 {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "<pid> (<comm>) <state> ...": the state follows the last ')'.
        Ok(stat) => stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()) != Some("Z"),
        Err(_) => false,
    }
}

/// kill -9 of `mariadbd` (every session dies with it; prepared XA transactions must
/// survive), then waits until it is gone.
///
/// Local only ([`crate::containers::require_local`]): the container's server is not killed
/// from here.
pub async fn kill9_server() {
    crate::containers::require_local("kill -9 of the MariaDB server (mariadbd)");
    let pid = server_pid();
    assert!(alive(pid), "the MariaDB server (pid {pid}) is not running");
    // SAFETY: kill(2) has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0, "SIGKILL to mariadbd (pid {pid})");
    let started = Instant::now();
    while alive(pid) {
        assert!(started.elapsed() < EXIT_TIMEOUT, "mariadbd (pid {pid}) still runs {EXIT_TIMEOUT:?} after SIGKILL");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts the server again after [`kill9_server`] (the `PLEDGE_MARIADB_START` command: InnoDB
/// crash recovery, prepared XA transactions come back) and waits until it accepts
/// connections. Also fine when it is already running. Local only, as [`kill9_server`].
pub async fn restart_server() {
    crate::containers::require_local("restarting the MariaDB server (mariadbd)");
    let start = env("PLEDGE_MARIADB_START");
    let out = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(&start)
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap_or_else(|e| panic!("running `{start}`: {e}"));
    assert!(
        out.status.success(),
        "`{start}` failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    wait_ready().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_scripts_urls() {
        assert_eq!(
            parse_url("mysql://pledge:pledge@127.0.0.1:53306/pledge_a").unwrap(),
            MariadbParams {
                user: "pledge".into(),
                password: "pledge".into(),
                host: "127.0.0.1".into(),
                port: 53306,
                database: "pledge_a".into(),
            }
        );
    }
}
