//! PostgreSQL as a Pledge participant.
//!
//! A branch is a PostgreSQL transaction on a connection the adapter holds for it, from the
//! branch's first statement until the coordinator prepares (`PREPARE TRANSACTION`) or aborts
//! it. After the prepare the connection goes back to the pool and the branch lives on in
//! PostgreSQL itself (`pg_prepared_xacts`), durable across crashes of the adapter and of the
//! database; `COMMIT PREPARED` / `ROLLBACK PREPARED` finish it from any connection.
//!
//! The participant contract (durable answers, unknown branches voting no, work lost in a
//! restart refused, one-phase commits resolved after a crash, heuristic outcomes never
//! presumed) is kept by `pledge_sdk::journaled` around [`resource::Databases`], with the branch
//! journal in the adapter's data directory; [`resource`] says what happens in PostgreSQL.
//! Three-phase commit comes with it (docs/three-phase.md): the yes vote is the same PREPARE
//! TRANSACTION; a pre-committed branch runs COMMIT PREPARED at DoCommit or at its own do-commit
//! deadline, and one that heard no PreCommit runs ROLLBACK PREPARED at its wait deadline (both
//! retried until PostgreSQL answers, also after a restart of the adapter).
//!
//! Use it as a library (open a branch with [`PostgresParticipant::branch`], run your own sqlx
//! statements on [`BranchGuard::conn`], and serve [`PostgresParticipant::participant`] with
//! `pledge_sdk::routes`) or through the `pledge-postgres-adapter` binary, whose
//! `PostgresBranch.Execute` runs statements for services in any language.
//!
//! # Safety
//! * At start every database must have `max_prepared_transactions > 0`, or the adapter refuses
//!   to start.
//! * A branch not prepared within `active_timeout` is rolled back (its client may be gone); as
//!   a second line, each connection has `idle_in_transaction_session_timeout` set a little
//!   above it.
//! * A connection goes back to the pool (or is kept warm for the next branch, see
//!   [`PostgresConfig::warm_connections`]) only after its transaction ended in COMMIT, ROLLBACK
//!   or PREPARE TRANSACTION and its session was reset; after any error it is closed instead.
//! * The age of the oldest prepared branch of each database is checked periodically and logged
//!   when it exceeds `prepared_age_warn` (a forgotten prepared transaction holds its locks and
//!   the xmin horizon).
//!
//! # Exactly-once (optional dedup table)
//! With `dedup`, the adapter keeps `pledge_dedup` in every database. Each branch's first
//! statement inserts a `branch:` row in the branch's own transaction, so the row exists iff the
//! branch committed; an abort inserts an `abort` row, so a late statement or prepare of that
//! branch fails on the key. A request id (or message id) given with a statement is inserted in
//! the same transaction as the work: processed twice, it takes effect once.

pub mod gid;
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
use sqlx::postgres::{PgConnectOptions, PgPool};

pub use gid::Gid;
pub use pledge_sql::ResourceConfig;
use resource::{Database, Databases, branch_error, sqlstate};

/// The dedup table's name.
pub const DEDUP_TABLE: &str = "pledge_dedup";

#[derive(Debug, Clone)]
pub struct PostgresConfig {
    pub resources: Vec<ResourceConfig>,
    /// An active branch not prepared within this long is rolled back.
    pub active_timeout: Duration,
    /// PostgreSQL's `statement_timeout` on the adapter's connections (bounds every wait on a
    /// lock, including a dedup key held by another branch).
    pub statement_timeout: Duration,
    /// Longest wait for a pooled connection.
    pub acquire_timeout: Duration,
    /// Most active branches per database (each holds a connection).
    pub max_active_branches: usize,
    /// Idle connections kept out of the pool between uses, at most this many per database.
    ///
    /// sqlx's pool checks every connection handed back to it with a round trip to the server
    /// (a ping), with no way to turn it off; the adapter hands a connection back twice per
    /// branch (after PREPARE, after COMMIT PREPARED), so that is two of the six round trips a
    /// branch would cost. The adapter hands back only connections whose last statement
    /// succeeded outside any transaction (after an error it closes them), so the ping has
    /// nothing to find; a kept connection is reused without one. All of them go back to the
    /// pool once a second, so the pool's own limits (lifetime, idle timeout) still apply, and
    /// at most as many are kept as leave one pool connection free beside `max_active_branches`
    /// active ones. With a pool shared with the embedding service, these connections are out of
    /// its reach for up to that second; 0 turns this off.
    pub warm_connections: usize,
    /// Keep the exactly-once dedup table (see the crate docs).
    pub dedup: bool,
    /// Dedup rows older than this are deleted.
    pub dedup_retention: Duration,
    /// Log a warning when a prepared branch is older than this.
    pub prepared_age_warn: Duration,
    /// How often the age of the oldest prepared branch is read (for the warning and the
    /// `pledge_postgres_oldest_prepared_seconds` gauge).
    pub prepared_age_interval: Duration,
    /// `application_name` of the adapter's sessions (shows in `pg_stat_activity`).
    pub application_name: String,
    /// The branch journal (its directory, retention and bounds): see `pledge_sdk::journal`.
    pub journal: JournalConfig,
}

impl PostgresConfig {
    /// Defaults, with the branch journal in `<data_dir>/journal`.
    pub fn new(resources: Vec<ResourceConfig>, data_dir: impl Into<PathBuf>) -> Self {
        PostgresConfig {
            resources,
            active_timeout: Duration::from_secs(60),
            statement_timeout: Duration::from_secs(30),
            acquire_timeout: Duration::from_secs(10),
            max_active_branches: 48,
            warm_connections: 16,
            dedup: false,
            dedup_retention: Duration::from_secs(7 * 24 * 3600),
            prepared_age_warn: Duration::from_secs(60),
            prepared_age_interval: Duration::from_secs(10),
            application_name: "pledge-postgres-adapter".into(),
            journal: JournalConfig::new(data_dir.into().join("journal")),
        }
    }
}

/// Locked access to an open branch; see [`PostgresParticipant::branch`].
pub struct BranchGuard {
    branch: journaled::Branch<Databases>,
    participant: PostgresParticipant,
}

impl BranchGuard {
    /// The branch's connection, inside its open transaction. Run your statements on it; do not
    /// commit, roll back or prepare yourself (the coordinator decides).
    ///
    /// Do not begin, commit, roll back or prepare on it (sqlx's `begin()` included): the
    /// adapter checks at prepare that the branch's transaction is still the one it opened, and
    /// votes no if not, but work committed by the branch itself cannot be undone. What you
    /// `SET` on it lasts until the branch ends; the session is reset before anyone else gets it.
    pub fn conn(&mut self) -> &mut sqlx::PgConnection {
        self.branch.open().get()
    }

    /// Exactly-once: records `request_id` in this branch's transaction. Fails with
    /// [`BranchError::Duplicate`] if a committed (or still undecided) branch recorded it
    /// already; waits for an undecided one (bounded by `statement_timeout`). Needs `dedup`.
    pub async fn claim_request(&mut self, request_id: &str) -> Result<(), BranchError> {
        if !self.participant.config().dedup {
            return Err(BranchError::Refused("request ids need the adapter's dedup table (--dedup)".into()));
        }
        if request_id.is_empty() || request_id.len() > 200 {
            return Err(BranchError::Invalid("request_id: must be 1 to 200 bytes".into()));
        }
        let xid = self.branch.xid().clone();
        let bound = self.participant.inner.resource().bound();
        let inserted = pledge_sql::bounded(
            bound,
            sqlx::query(
                "INSERT INTO pledge_dedup (key, kind, gtid, branch_id) VALUES ($1, 'request', $2, $3) \
                 ON CONFLICT (key) DO NOTHING",
            )
            .bind(format!("request:{request_id}"))
            .bind(*xid.gtid.as_uuid())
            .bind(xid.branch.to_string())
            .execute(self.conn()),
        )
        .await;
        match inserted {
            Ok(r) if r.rows_affected() == 1 => Ok(()),
            Ok(_) => Err(BranchError::Duplicate(format!("request id {request_id:?} was already processed"))),
            Err(e) => Err(branch_error(&e)),
        }
    }

    /// Rolls the branch back after a failed statement; it will vote no with `reason`.
    pub async fn fail(self, reason: String) {
        self.branch.fail(reason).await;
    }
}

/// The PostgreSQL participant. Cheap to clone.
#[derive(Clone)]
pub struct PostgresParticipant {
    inner: Journaled<Databases>,
}

/// Keeps the branch journal open; [`PostgresHandle::shutdown`] flushes it.
pub struct PostgresHandle {
    log: pledge_log::Log,
}

impl PostgresHandle {
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.log.shutdown().await?;
        Ok(())
    }
}

impl PostgresParticipant {
    /// Connects to every database, checks `max_prepared_transactions`, creates the dedup
    /// table when configured, opens the branch journal, and starts the background tasks
    /// (active-branch timeout, the journal's retention, dedup retention, prepared-age check).
    pub async fn connect(config: PostgresConfig) -> anyhow::Result<(Self, PostgresHandle)> {
        anyhow::ensure!(!config.resources.is_empty(), "at least one database (resource) is required");
        let mut pools = Vec::new();
        for rc in &config.resources {
            // Server-side bounds, set at connection start-up: every statement, and every idle
            // open transaction (a second line behind the adapter's own active-branch timeout).
            // They are the session's defaults, so a branch's own SET is undone by the reset.
            let idle_ms = config.active_timeout.as_millis() as u64 + 5_000;
            let options = PgConnectOptions::from_str(&rc.url)
                .map_err(|e| anyhow::anyhow!("resource {}: invalid url: {e}", rc.id))?
                .application_name(&config.application_name)
                .options([
                    ("statement_timeout", format!("{}", config.statement_timeout.as_millis())),
                    ("idle_in_transaction_session_timeout", format!("{idle_ms}")),
                ]);
            let pool = pledge_sql::connect_pool(options, rc.max_connections, config.acquire_timeout)
                .await
                .map_err(|e| anyhow::anyhow!("resource {}: cannot connect to {}: {e}", rc.id, rc.url))?;
            pools.push((rc.id.clone(), pool));
        }
        Self::with_pools(config, pools).await
    }

    /// Like [`PostgresParticipant::connect`], on pools the embedding service already has
    /// (`config.resources` is not used). Branches take connections from these pools; size them
    /// for the branches you keep open at once, and consider setting PostgreSQL's
    /// `idle_in_transaction_session_timeout` on them as a second line behind `active_timeout`.
    pub async fn with_pools(
        config: PostgresConfig,
        pools: Vec<(ResourceId, PgPool)>,
    ) -> anyhow::Result<(Self, PostgresHandle)> {
        anyhow::ensure!(!pools.is_empty(), "at least one database (resource) is required");
        anyhow::ensure!(!config.prepared_age_interval.is_zero(), "prepared_age_interval must be greater than 0");
        let mut databases = HashMap::new();
        for (id, pool) in pools {
            // Commits and rollbacks of prepared branches need connections of their own: if active
            // branches could take them all, a prepared branch holding a lock they wait for could
            // never be committed.
            let size = pool.options().get_max_connections() as usize;
            anyhow::ensure!(
                config.max_active_branches < size,
                "resource {id}: max_active_branches ({}) must be below the pool's max_connections ({size}), \
                 leaving connections for COMMIT/ROLLBACK PREPARED",
                config.max_active_branches
            );
            let setting: String = sqlx::query_scalar("SHOW max_prepared_transactions").fetch_one(&pool).await?;
            let database: String = sqlx::query_scalar("SELECT current_database()").fetch_one(&pool).await?;
            let max_prepared = check_max_prepared(&id, &database, &setting)?;
            if config.dedup {
                create_dedup_table(&pool).await.map_err(|e| anyhow::anyhow!("resource {id}: {e}"))?;
            }
            tracing::info!(resource = %id, database, max_prepared, dedup = config.dedup, "database ready");
            // Never so many warm connections that a statement on the pool itself (recovery,
            // the dedup fence) finds it empty while every active branch holds a connection.
            let max_warm = config.warm_connections.min(size - config.max_active_branches - 1);
            databases.insert(id.clone(), Arc::new(Database::new(id, pool, config.max_active_branches, max_warm)));
        }
        let (journal, log) = Journal::open(config.journal.clone()).await?;
        let active_timeout = config.active_timeout;
        let participant =
            PostgresParticipant { inner: Journaled::new(Databases::new(config, databases), journal, active_timeout) };
        participant.spawn_housekeeping();
        Ok((participant, PostgresHandle { log }))
    }

    fn config(&self) -> &PostgresConfig {
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
        let branch = self.inner.branch(&xid).await?;
        Ok(BranchGuard { branch, participant: self.clone() })
    }

    /// The client-side bound of every statement the adapter runs.
    pub fn statement_bound(&self) -> Duration {
        self.inner.resource().bound()
    }

    fn spawn_housekeeping(&self) {
        for db in self.inner.resource().databases.values() {
            let (p, db2) = (self.clone(), db.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(p.config().prepared_age_interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    p.check_prepared_age(&db2).await;
                }
            });
            let (p, db) = (self.clone(), db.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                let mut n: u64 = 0;
                loop {
                    tick.tick().await;
                    n += 1;
                    db.cool_down();
                    if p.config().dedup && n.is_multiple_of(10) {
                        p.expire_dedup(&db).await;
                    }
                }
            });
        }
    }

    /// Publishes the age of the oldest Pledge branch prepared in the resource's database, by
    /// any coordinator (gauge `pledge_postgres_oldest_prepared_seconds{resource}`, 0 when
    /// there is none; unchanged when the query fails, which is logged), and logs it when it is
    /// above the warning age.
    async fn check_prepared_age(&self, r: &Database) {
        let oldest: Result<Option<(String, f64)>, _> = sqlx::query_as(
            "SELECT gid, extract(epoch FROM now() - prepared)::float8 FROM pg_prepared_xacts \
             WHERE database = current_database() AND starts_with(gid, $1) ORDER BY prepared LIMIT 1",
        )
        .bind(gid::PREFIX)
        .fetch_optional(&r.pool)
        .await;
        if let Ok(oldest) = &oldest {
            let age_s = oldest.as_ref().map_or(0.0, |(_, age_s)| *age_s);
            metrics::gauge!(OLDEST_PREPARED, "resource" => r.id.to_string()).set(age_s);
        }
        match oldest {
            Ok(Some((gid, age_s))) if age_s * 1000.0 >= self.config().prepared_age_warn.as_millis() as f64 => {
                tracing::warn!(
                    resource = %r.id,
                    gid,
                    age_s = age_s as u64,
                    "a prepared branch is waiting for its coordinator's decision; it holds its locks and the \
                     xmin horizon until committed or rolled back"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(resource = %r.id, error = %e, "cannot read pg_prepared_xacts"),
        }
    }

    async fn expire_dedup(&self, r: &Database) {
        let deleted = sqlx::query(
            "DELETE FROM pledge_dedup WHERE key IN (SELECT key FROM pledge_dedup \
             WHERE created_at < now() - make_interval(secs => $1) LIMIT 10000)",
        )
        .bind(self.config().dedup_retention.as_secs_f64())
        .execute(&r.pool)
        .await;
        if let Err(e) = deleted {
            tracing::warn!(resource = %r.id, error = %e, "cannot expire old dedup rows");
        }
    }
}

/// Gauge: age of the oldest prepared branch of ours, per resource (see `check_prepared_age`).
pub const OLDEST_PREPARED: &str = "pledge_postgres_oldest_prepared_seconds";

/// Registers the help texts of the adapter's own metrics (the SDK registers its own).
pub fn describe_metrics() {
    metrics::describe_gauge!(
        OLDEST_PREPARED,
        metrics::Unit::Seconds,
        "age of the oldest Pledge branch prepared in the resource's database and not yet committed or rolled back \
         (read every prepared_age_interval), by resource"
    );
}

/// PREPARE TRANSACTION fails on a server with `max_prepared_transactions = 0` (the default):
/// refuse to start instead, saying what to change.
fn check_max_prepared(resource: &ResourceId, database: &str, setting: &str) -> anyhow::Result<i64> {
    let value: i64 = setting
        .trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("resource {resource}: unexpected max_prepared_transactions {setting:?}"))?;
    anyhow::ensure!(
        value > 0,
        "resource {resource}: max_prepared_transactions is 0 on database {database}; PREPARE TRANSACTION needs it \
         above 0 (set it in postgresql.conf, e.g. equal to max_connections, and restart PostgreSQL)"
    );
    Ok(value)
}

async fn create_dedup_table(pool: &PgPool) -> Result<(), sqlx::Error> {
    for (name, ddl) in [
        (
            "pledge_dedup",
            "CREATE TABLE IF NOT EXISTS pledge_dedup (\
               key text PRIMARY KEY, \
               kind text NOT NULL, \
               gtid uuid NOT NULL, \
               branch_id text NOT NULL, \
               created_at timestamptz NOT NULL DEFAULT now())",
        ),
        // Retention deletes by age.
        ("pledge_dedup_created_at", "CREATE INDEX IF NOT EXISTS pledge_dedup_created_at ON pledge_dedup (created_at)"),
    ] {
        // Look first: even with IF NOT EXISTS, CREATE INDEX waits for the table's lock, which
        // prepared branches that wrote to it hold until their decision, and that decision needs
        // this adapter up.
        let exists: Option<String> =
            sqlx::query_scalar("SELECT to_regclass($1)::text").bind(name).fetch_one(pool).await?;
        if exists.is_some() {
            continue;
        }
        match sqlx::query(ddl).execute(pool).await {
            // Two adapters creating it at once: one wins, the other sees a duplicate.
            Err(e) if matches!(sqlstate(&e).as_deref(), Some("23505" | "42P07")) => {}
            other => {
                other?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_prepared_transactions_of_zero_refuses_start_saying_what_to_change() {
        let r: ResourceId = "orders".parse().unwrap();
        let e = check_max_prepared(&r, "shop", "0").unwrap_err().to_string();
        assert!(e.contains("max_prepared_transactions is 0 on database shop") && e.contains("postgresql.conf"), "{e}");
        assert_eq!(check_max_prepared(&r, "shop", "128").unwrap(), 128);
        assert!(check_max_prepared(&r, "shop", "lots").is_err());
    }
}
