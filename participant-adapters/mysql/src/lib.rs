//! MySQL and MariaDB as a Pledge participant, through XA (issue 15).
//!
//! A branch is an XA transaction on a connection the adapter pins to it from `XA START` to
//! `XA PREPARE` (see [`resource`]); XA statements go over the text protocol (they cannot be
//! prepared statements), with the XID as hex literals ([`xid::XaXid::sql`]). The prepared
//! branch stays on its session until phase 2 runs there (MariaDB 10.11 lost track of prepared
//! transactions detached from their sessions under load: see `resource::Database`). MariaDB ≥
//! 10.5 and MySQL ≥ 8.0 keep prepared XA transactions across disconnects and crashes (older
//! servers are refused at start), so when the adapter dies its prepared branches are the
//! server's, and `XA COMMIT` / `XA ROLLBACK` finish them from any session.
//!
//! * XA START needs the XID, and the XID names the coordinator (the gtrid prefix `XA RECOVER`
//!   is filtered by) before any coordinator has spoken to the branch: the adapter is configured
//!   with the coordinator id it serves ([`MysqlConfig::coordinator_id`]; a cluster's instances
//!   share one), and a Prepare from another coordinator votes no.
//! * No outcome without proof: the branch's first statement inserts a fence row
//!   ([`FENCE_TABLE`], keyed by the XID) inside the XA transaction, so the row exists iff the
//!   branch committed. An `XA COMMIT` answered "unknown XID" (1397) is settled by it
//!   (committed, or rolled back outside Pledge: a heuristic rollback), and so is a one-phase
//!   commit whose answer was lost — always under a lock, never by a plain read (see
//!   `resource::Databases::fate`). Fence rows older than [`MysqlConfig::fence_retention`]
//!   are deleted; a branch that old with no row is a heuristic hazard.
//! * Checked at start, refusing clearly: the server version, the privilege `XA RECOVER`
//!   needs, and the settings that make a prepared XA transaction durable
//!   (`innodb_flush_log_at_trx_commit = 1`, and `sync_binlog = 1` when the binary log is on).
//! * The branch journal, repeated answers, unknown branches and restarts are the SDK's
//!   (`pledge_sdk::journaled`), as for PostgreSQL and Kafka; three-phase commit comes with it.
//!
//! Use it as a library (open a branch with [`MysqlParticipant::branch`], run your own sqlx
//! statements on [`BranchGuard::conn`], serve [`MysqlParticipant::participant`] with
//! `pledge_sdk::routes`) or through the `pledge-mysql-adapter` binary, whose
//! `MysqlBranch.Execute` runs statements for services in any language.

pub mod resource;
pub mod service;

use std::collections::HashMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use pledge_proto::{BranchId, Gtid, ResourceId, Xid};
use pledge_sdk::BranchError;
use pledge_sdk::journal::{Journal, JournalConfig};
use pledge_sdk::journaled::{self, Journaled};
use sqlx::mysql::{MySqlConnectOptions, MySqlPool};

/// The XID mapping lives with the gRPC contract, which shows every branch's XID.
pub use pledge_proto::xa as xid;
pub use pledge_proto::xa::XaXid;
pub use pledge_sql::ResourceConfig;
use resource::{Database, Databases};

/// The table of fence rows (see the crate docs), created in every database at start.
pub const FENCE_TABLE: &str = "pledge_xa_fence";

#[derive(Debug, Clone)]
pub struct MysqlConfig {
    pub resources: Vec<ResourceConfig>,
    /// The coordinator whose branches this adapter takes (its XIDs name it from XA START on).
    pub coordinator_id: String,
    /// An active branch not prepared within this long is rolled back.
    pub active_timeout: Duration,
    /// Client-side bound of every statement (a server or network that stopped answering).
    pub statement_timeout: Duration,
    /// Longest wait for a pooled connection.
    pub acquire_timeout: Duration,
    /// Most active branches per database (each holds a connection).
    pub max_active_branches: usize,
    /// Fence rows older than this are deleted (see the crate docs).
    pub fence_retention: Duration,
    /// The branch journal (its directory, retention and bounds): see `pledge_sdk::journal`.
    pub journal: JournalConfig,
}

impl MysqlConfig {
    /// Defaults, with the branch journal in `<data_dir>/journal`.
    pub fn new(resources: Vec<ResourceConfig>, coordinator_id: String, data_dir: impl Into<PathBuf>) -> Self {
        MysqlConfig {
            resources,
            coordinator_id,
            active_timeout: Duration::from_secs(60),
            statement_timeout: Duration::from_secs(30),
            acquire_timeout: Duration::from_secs(10),
            max_active_branches: 24,
            fence_retention: Duration::from_secs(7 * 24 * 3600),
            journal: JournalConfig::new(data_dir.into().join("journal")),
        }
    }
}

/// Locked access to an open branch; see [`MysqlParticipant::branch`].
pub struct BranchGuard {
    branch: journaled::Branch<Databases>,
}

impl BranchGuard {
    /// The branch's connection, inside its XA transaction. Run your statements on it; do not
    /// end the transaction yourself (no COMMIT, ROLLBACK, XA statements or statements that
    /// commit implicitly, such as DDL): the coordinator decides.
    pub fn conn(&mut self) -> &mut sqlx::MySqlConnection {
        self.branch.open().get()
    }

    /// Rolls the branch back after a failed statement; it will vote no with `reason`.
    pub async fn fail(self, reason: String) {
        self.branch.fail(reason).await;
    }
}

/// The MySQL/MariaDB participant. Cheap to clone.
#[derive(Clone)]
pub struct MysqlParticipant {
    inner: Journaled<Databases>,
}

/// Keeps the branch journal open; [`MysqlHandle::shutdown`] flushes it.
pub struct MysqlHandle {
    log: pledge_log::Log,
}

impl MysqlHandle {
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.log.shutdown().await?;
        Ok(())
    }
}

impl MysqlParticipant {
    /// Connects to every database, checks the server (version, XA RECOVER, durability
    /// settings), creates the fence table, opens the branch journal and starts the background
    /// tasks.
    pub async fn connect(config: MysqlConfig) -> anyhow::Result<(Self, MysqlHandle)> {
        anyhow::ensure!(!config.resources.is_empty(), "at least one database (resource) is required");
        let mut pools = Vec::new();
        for rc in &config.resources {
            let options = MySqlConnectOptions::from_str(&rc.url)
                .map_err(|e| anyhow::anyhow!("resource {}: invalid url: {e}", rc.id))?;
            let pool = pledge_sql::connect_pool(options, rc.max_connections, config.acquire_timeout)
                .await
                .map_err(|e| anyhow::anyhow!("resource {}: cannot connect: {e}", rc.id))?;
            pools.push((rc.id.clone(), pool));
        }
        Self::with_pools(config, pools).await
    }

    /// Like [`MysqlParticipant::connect`], on pools the embedding service already has.
    pub async fn with_pools(
        config: MysqlConfig,
        pools: Vec<(ResourceId, MySqlPool)>,
    ) -> anyhow::Result<(Self, MysqlHandle)> {
        anyhow::ensure!(!pools.is_empty(), "at least one database (resource) is required");
        let cid = &config.coordinator_id;
        anyhow::ensure!(
            ResourceId::parse_field("coordinator_id", cid).is_ok() && cid.len() <= xid::MAX_COORDINATOR_ID_BYTES,
            "coordinator id {cid:?}: it must be an id (A-Z a-z 0-9 . _ -) of at most {} bytes to fit an XA gtrid",
            xid::MAX_COORDINATOR_ID_BYTES
        );
        let mut databases = HashMap::new();
        for (id, pool) in pools {
            // XA COMMIT/ROLLBACK of prepared branches need connections of their own.
            let size = pool.options().get_max_connections() as usize;
            anyhow::ensure!(
                config.max_active_branches < size,
                "resource {id}: max_active_branches ({}) must be below the pool's max_connections ({size}), \
                 leaving connections for XA COMMIT/ROLLBACK",
                config.max_active_branches
            );
            let server = check_server(&pool).await.map_err(|e| anyhow::anyhow!("resource {id}: {e}"))?;
            create_fence_table(&pool)
                .await
                .map_err(|e| anyhow::anyhow!("resource {id}: creating {FENCE_TABLE}: {e}"))?;
            tracing::info!(resource = %id, server, "database ready");
            // Prepared branches keep their session until phase 2 (see `resource::Database`): what
            // the pool has beside active branches and one connection for control statements, at
            // least as many as active branches.
            let max_pinned = size - config.max_active_branches - 1;
            anyhow::ensure!(
                max_pinned >= config.max_active_branches,
                "resource {id}: the pool's max_connections ({size}) must leave room for the prepared branches waiting \
                 for phase 2 on their own sessions: at least 2 × max_active_branches ({}) + 1",
                config.max_active_branches
            );
            databases.insert(id.clone(), Arc::new(Database::new(id, pool, config.max_active_branches, max_pinned)));
        }
        let (journal, log) = Journal::open(config.journal.clone()).await?;
        let active_timeout = config.active_timeout;
        let participant =
            MysqlParticipant { inner: Journaled::new(Databases::new(config, databases), journal, active_timeout) };
        participant.spawn_housekeeping();
        Ok((participant, MysqlHandle { log }))
    }

    fn config(&self) -> &MysqlConfig {
        &self.inner.resource().config
    }

    /// The Participant service of these databases, to serve with `pledge_sdk::routes`.
    pub fn participant(&self) -> Journaled<Databases> {
        self.inner.clone()
    }

    /// Opens branch (gtid, branch) at `resource`, or resumes it if it is open, and returns it
    /// locked: concurrent calls for the same branch wait their turn. Refused once the branch is
    /// prepared or finished, or if its work was lost in a restart of the adapter.
    pub async fn branch(
        &self,
        resource: &ResourceId,
        gtid: Gtid,
        branch: BranchId,
    ) -> Result<BranchGuard, BranchError> {
        let xid = Xid { resource: resource.clone(), gtid, branch };
        Ok(BranchGuard { branch: self.inner.branch(&xid).await? })
    }

    /// The client-side bound of every statement the adapter runs.
    pub fn statement_bound(&self) -> Duration {
        self.inner.resource().bound()
    }

    fn spawn_housekeeping(&self) {
        for db in self.inner.resource().databases.values() {
            let (p, db) = (self.clone(), db.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(60));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    if let Err(e) = expire_fences(&db.pool, p.config().fence_retention).await {
                        tracing::warn!(resource = %db.id, error = %e, "cannot expire old fence rows");
                    }
                }
            });
        }
    }
}

/// Deletes fence rows older than `retention`, on a session of its own (closed afterwards): READ
/// COMMITTED, so the range delete takes no gap locks, and a short lock wait, so a row still
/// held by an undecided branch is skipped this time rather than holding the cleanup up.
async fn expire_fences(pool: &MySqlPool, retention: Duration) -> Result<(), sqlx::Error> {
    use sqlx::Connection;
    let mut conn = pool.acquire().await?.detach();
    let sql = format!(
        "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED; SET SESSION innodb_lock_wait_timeout = 1; \
         DELETE FROM pledge_xa_fence WHERE created_at < NOW(3) - INTERVAL {} SECOND LIMIT 10000",
        retention.as_secs()
    );
    let deleted =
        pledge_sql::bounded(Duration::from_secs(30), sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut conn)).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.close()).await;
    deleted.map(drop)
}

/// Checks what the server must offer, and says what to change if it does not: a version that
/// keeps prepared XA transactions across disconnects and crashes, the privilege `XA RECOVER`
/// needs, and durable commits. Returns the server's version.
async fn check_server(pool: &MySqlPool) -> anyhow::Result<String> {
    let version: String = sqlx::query_scalar("SELECT VERSION()").fetch_one(pool).await?;
    check_version(&version)?;
    let (flush, log_bin, sync_binlog): (i64, i64, i64) = sqlx::query_as(
        "SELECT CAST(@@innodb_flush_log_at_trx_commit AS SIGNED), CAST(@@log_bin AS SIGNED), \
             CAST(@@sync_binlog AS SIGNED)",
    )
    .fetch_one(pool)
    .await?;
    check_durability(flush, log_bin, sync_binlog)?;
    if let Err(e) = sqlx::raw_sql("XA RECOVER").fetch_all(pool).await {
        anyhow::bail!(
            "XA RECOVER failed ({e}): the adapter's user needs the privilege to list prepared XA transactions \
             (MariaDB: SUPER, or BINLOG ADMIN from 10.5.2 on; MySQL 8: XA_RECOVER_ADMIN)"
        );
    }
    Ok(version)
}

fn check_version(version: &str) -> anyhow::Result<()> {
    let numbers: Vec<u32> =
        version.split(|c: char| !c.is_ascii_digit()).take(2).map(|n| n.parse().unwrap_or(0)).collect();
    let (major, minor) = (numbers.first().copied().unwrap_or(0), numbers.get(1).copied().unwrap_or(0));
    let mariadb = version.to_ascii_lowercase().contains("mariadb");
    let ok = if mariadb { (major, minor) >= (10, 5) } else { major >= 8 };
    anyhow::ensure!(
        ok,
        "server version {version}: prepared XA transactions survive disconnects and crashes from MariaDB 10.5 and \
         MySQL 8.0 on; this server would lose them"
    );
    Ok(())
}

fn check_durability(flush: i64, log_bin: i64, sync_binlog: i64) -> anyhow::Result<()> {
    anyhow::ensure!(
        flush == 1,
        "innodb_flush_log_at_trx_commit is {flush}: a prepared XA transaction is durable only with 1 (set it in the \
         server's configuration)"
    );
    anyhow::ensure!(
        log_bin == 0 || sync_binlog == 1,
        "sync_binlog is {sync_binlog} with the binary log on: XA PREPARE is durable only with sync_binlog = 1"
    );
    Ok(())
}

async fn create_fence_table(pool: &MySqlPool) -> Result<(), sqlx::Error> {
    // kind: `work`, written in the branch's own XA transaction; `abort`, written by the fence
    // check once nothing holds the branch's row (see `resource::Databases::fate`).
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS pledge_xa_fence (\
           gtrid VARBINARY(64) NOT NULL, \
           bqual VARBINARY(64) NOT NULL, \
           kind VARCHAR(5) NOT NULL DEFAULT 'work', \
           created_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3), \
           PRIMARY KEY (gtrid, bqual), \
           KEY pledge_xa_fence_created_at (created_at)) ENGINE=InnoDB",
    )
    .execute(pool)
    .await?;
    // A table made before `kind` existed.
    let has_kind: Option<i64> = sqlx::query_scalar(
        "SELECT 1 FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'pledge_xa_fence' \
         AND COLUMN_NAME = 'kind'",
    )
    .fetch_optional(pool)
    .await?;
    if has_kind.is_none() {
        sqlx::raw_sql("ALTER TABLE pledge_xa_fence ADD COLUMN kind VARCHAR(5) NOT NULL DEFAULT 'work'")
            .execute(pool)
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_that_would_lose_prepared_xa_transactions_are_refused() {
        check_version("10.11.6-MariaDB-0+deb12u1-log").unwrap();
        check_version("8.0.36").unwrap();
        let e = check_version("10.4.32-MariaDB").unwrap_err().to_string();
        assert!(e.contains("from MariaDB 10.5"), "{e}");
        assert!(check_version("5.7.44-log").is_err());
        check_durability(1, 1, 1).unwrap();
        check_durability(1, 0, 0).unwrap();
        assert!(check_durability(2, 0, 0).unwrap_err().to_string().contains("innodb_flush_log_at_trx_commit is 2"));
        assert!(check_durability(1, 1, 0).unwrap_err().to_string().contains("sync_binlog is 0"));
    }
}
