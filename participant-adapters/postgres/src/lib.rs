//! PostgreSQL as a Pledge participant.
//!
//! A branch is a PostgreSQL transaction on a connection the adapter holds for it, from the
//! branch's first statement until the coordinator prepares (`PREPARE TRANSACTION`) or aborts
//! it. After the prepare the connection goes back to the pool and the branch lives on in
//! PostgreSQL itself (`pg_prepared_xacts`), durable across crashes of the adapter and of the
//! database; `COMMIT PREPARED` / `ROLLBACK PREPARED` finish it from any connection.
//!
//! Use it as a library (open a branch with [`PostgresParticipant::branch`], run your own sqlx
//! statements on [`BranchGuard::conn`], and serve [`PostgresParticipant`] with
//! `pledge_sdk::routes`) or through the `pledge-postgres-adapter` binary, whose
//! `PostgresBranch.Execute` runs statements for services in any language.
//!
//! # Operations
//! * **prepare** → `PREPARE TRANSACTION '<gid>'` (see [`gid`]), in one message after a check
//!   that the transaction is still the branch's; the check fails in a failed transaction, so
//!   PREPARE never meets one (there it would answer with a silent ROLLBACK). A branch with no
//!   work here votes READ_ONLY.
//! * **commit** → `COMMIT PREPARED`; one-phase → plain `COMMIT`. Idempotent: an unknown GID
//!   for a branch that was prepared means it was already committed (with the dedup table, the
//!   adapter checks instead of presuming).
//! * **abort** → `ROLLBACK PREPARED`, or `ROLLBACK` of a branch still active.
//! * **recover** → `pg_prepared_xacts` rows of this database whose GID starts with
//!   `pledge:<coordinator id>:`.
//!
//! # Safety
//! * At start every database must have `max_prepared_transactions > 0`, or the adapter refuses
//!   to start.
//! * A branch not prepared within `active_timeout` is rolled back (its client may be gone); as
//!   a second line, each connection has `idle_in_transaction_session_timeout` set a little
//!   above it.
//! * A connection goes back to the pool (or is kept warm for the next branch, see
//!   [`PostgresConfig::warm_connections`]) only after its transaction ended in COMMIT, ROLLBACK
//!   or PREPARE TRANSACTION; after any error it is closed instead.
//! * The age of the oldest prepared branch of each database is checked periodically and logged
//!   when it exceeds `prepared_age_warn` (a forgotten prepared transaction holds its locks and
//!   the xmin horizon).
//! * A prepare arriving after an abort is refused: aborted branches are remembered (and, with
//!   the dedup table, fenced in the database); after a restart of the adapter, a branch it does
//!   not know whose GTID predates the restart is refused too (its work may have been lost).
//!
//! # Exactly-once (optional dedup table)
//! With `dedup`, the adapter keeps `pledge_dedup` in every database. Each branch's first
//! statement inserts a `branch:` row in the branch's own transaction, so the row exists iff the
//! branch committed; an abort inserts an `abort` row, so a late statement or prepare of that
//! branch fails on the key. A request id (or message id) given with a statement is inserted in
//! the same transaction as the work: processed twice, it takes effect once.

pub mod gid;
pub mod service;

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pledge_proto::{BranchId, Gtid, ResourceId, Xid};
use pledge_sdk::table::{BranchTable, Fin, Key, SlotGuard, SlotState};
use pledge_sdk::{Error, InDoubt, Outcome, Participant, Vote};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Postgres, Row};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use gid::Gid;

/// The dedup table's name.
pub const DEDUP_TABLE: &str = "pledge_dedup";

#[derive(Debug, Clone)]
pub struct ResourceConfig {
    pub id: ResourceId,
    /// postgres://user@host:port/database
    pub url: String,
    /// Connections to this database: active branches hold one each until prepared.
    pub max_connections: u32,
}

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
    /// How long finished branches are remembered in memory (and how many at most).
    pub tombstone_retention: Duration,
    pub max_tombstones: usize,
}

impl PostgresConfig {
    pub fn new(resources: Vec<ResourceConfig>) -> Self {
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
            tombstone_retention: Duration::from_secs(2 * 3600),
            max_tombstones: 1_000_000,
        }
    }
}

/// Why branch work was refused or failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BranchError {
    #[error("unknown resource {0:?}")]
    UnknownResource(String),
    #[error("branch is {state}{}", if reason.is_empty() { String::new() } else { format!(": {reason}") })]
    Finished { state: &'static str, reason: String },
    #[error("{0}")]
    Refused(String),
    #[error("{max} branches are already active at this database (max_active_branches)")]
    TooManyActive { max: usize },
    #[error("request id {0:?} was already processed")]
    DuplicateRequest(String),
    #[error("SQL error{}: {message}", sqlstate.as_ref().map(|s| format!(" {s}")).unwrap_or_default())]
    Sql { sqlstate: Option<String>, message: String },
    #[error("database unavailable: {0}")]
    Unavailable(String),
}

impl BranchError {
    fn from_sqlx(e: &sqlx::Error) -> Self {
        match e {
            // The same-transaction check failed: say what it means, not how it was raised.
            sqlx::Error::Database(db) if db.message().contains(REPLACED_TRANSACTION) => {
                BranchError::Refused(REPLACED_TRANSACTION.to_string())
            }
            sqlx::Error::Database(db) => {
                BranchError::Sql { sqlstate: db.code().map(|c| c.to_string()), message: db.message().to_string() }
            }
            other => BranchError::Unavailable(other.to_string()),
        }
    }
}

fn sqlstate(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(db) => db.code().map(|c| c.to_string()),
        _ => None,
    }
}

/// `undefined_object`: COMMIT/ROLLBACK PREPARED of a GID PostgreSQL does not have.
const UNDEFINED_OBJECT: &str = "42704";

/// An active branch's connection, inside its open transaction.
///
/// Dropped without [`BranchConn::release`] (after an error, or anywhere it should not have
/// been), the connection is closed rather than returned to the pool: its transaction may still
/// be open, and the pool would hand it to the next branch inside it.
struct BranchConn {
    conn: Option<PoolConnection<Postgres>>,
    /// `txid_current()` at BEGIN: at prepare, a different one means the branch's own statements
    /// ended its transaction (and maybe committed part of its work outside 2PC).
    txid: i64,
    /// One of `max_active_branches`.
    _active: OwnedSemaphorePermit,
}

impl BranchConn {
    fn get(&mut self) -> &mut PoolConnection<Postgres> {
        self.conn.as_mut().expect("a branch connection is present until released")
    }

    /// Back to the pool (or kept warm): only after the transaction ended (PREPARE, COMMIT or
    /// ROLLBACK).
    fn release(mut self, r: &Resource) {
        if let Some(conn) = self.conn.take() {
            r.put_back(conn);
        }
    }
}

impl Drop for BranchConn {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.as_mut() {
            conn.close_on_drop();
        }
    }
}

/// What an active branch holds.
#[derive(Default)]
struct PgSlot {
    conn: Option<BranchConn>,
}

impl SlotState for PgSlot {
    fn is_open(&self) -> bool {
        self.conn.is_some()
    }
}

type Slot = pledge_sdk::table::Slot<PgSlot>;

struct Resource {
    id: ResourceId,
    pool: PgPool,
    branches: BranchTable<PgSlot>,
    /// Permits for active branches (`max_active_branches`), each holding a connection.
    active: Arc<Semaphore>,
    /// Idle connections kept out of the pool, most recently used last (`warm_connections`).
    warm: Mutex<Vec<PoolConnection<Postgres>>>,
    max_warm: usize,
}

impl Resource {
    /// A connection outside any transaction: a warm one, else one from the pool.
    async fn acquire(&self) -> Result<PoolConnection<Postgres>, sqlx::Error> {
        let warm = self.warm.lock().expect("warm connections lock").pop();
        match warm {
            Some(conn) => Ok(conn),
            None => self.pool.acquire().await,
        }
    }

    /// Takes back a connection whose last statement succeeded and left no transaction open.
    fn put_back(&self, conn: PoolConnection<Postgres>) {
        let mut warm = self.warm.lock().expect("warm connections lock");
        if warm.len() < self.max_warm {
            warm.push(conn);
        } else {
            drop(warm);
            drop(conn); // to the pool, which pings it first
        }
    }

    /// Hands every warm connection back to the pool.
    fn cool_down(&self) {
        // Taken out first: each drop starts the pool's check, not under the lock.
        drop(std::mem::take(&mut *self.warm.lock().expect("warm connections lock")));
    }
}

/// Locked access to a branch; see [`PostgresParticipant::branch`].
pub struct BranchGuard {
    slot: SlotGuard<PgSlot>,
    participant: PostgresParticipant,
    resource: Arc<Resource>,
    key: Key,
}

impl BranchGuard {
    /// The branch's connection, inside its open transaction. Run your statements on it; do not
    /// commit, roll back or prepare yourself (the coordinator decides).
    ///
    /// Do not begin, commit, roll back or prepare on it (sqlx's `begin()` included): the
    /// adapter checks at prepare that the branch's transaction is still the one it opened, and
    /// votes no if not, but work committed by the branch itself cannot be undone.
    pub fn conn(&mut self) -> &mut sqlx::PgConnection {
        self.slot.state.conn.as_mut().expect("an open branch has a connection").get()
    }

    /// Exactly-once: records `request_id` in this branch's transaction. Fails with
    /// [`BranchError::DuplicateRequest`] if a committed (or still undecided) branch recorded it
    /// already; waits for an undecided one (bounded by `statement_timeout`). Needs `dedup`.
    pub async fn claim_request(&mut self, request_id: &str) -> Result<(), BranchError> {
        if !self.participant.inner.config.dedup {
            return Err(BranchError::Refused("request ids need the adapter's dedup table (--dedup)".into()));
        }
        if request_id.is_empty() || request_id.len() > 200 {
            return Err(BranchError::Refused("request_id: must be 1 to 200 bytes".into()));
        }
        let (gtid, branch) = (self.key.0, self.key.1.to_string());
        let inserted = sqlx::query(
            "INSERT INTO pledge_dedup (key, kind, gtid, branch_id) VALUES ($1, 'request', $2, $3) \
             ON CONFLICT (key) DO NOTHING",
        )
        .bind(format!("request:{request_id}"))
        .bind(*gtid.as_uuid())
        .bind(branch)
        .execute(self.conn())
        .await;
        match inserted {
            Ok(r) if r.rows_affected() == 1 => Ok(()),
            Ok(_) => Err(BranchError::DuplicateRequest(request_id.to_string())),
            Err(e) => {
                let error = BranchError::from_sqlx(&e);
                self.fail(error.to_string()).await;
                Err(error)
            }
        }
    }

    /// Rolls the branch back after a failed statement; it will vote no with `reason`.
    pub async fn fail(&mut self, reason: String) {
        let participant = self.participant.clone();
        participant.rollback_active(&self.resource, &self.key, &mut self.slot, Fin::Aborted(reason)).await;
    }
}

impl Drop for BranchGuard {
    fn drop(&mut self) {
        if self.slot.state.conn.is_none() {
            self.resource.branches.release(&self.key, &mut self.slot);
        }
    }
}

struct Inner {
    config: PostgresConfig,
    resources: HashMap<ResourceId, Arc<Resource>>,
}

/// The PostgreSQL participant. Cheap to clone.
#[derive(Clone)]
pub struct PostgresParticipant {
    inner: Arc<Inner>,
}

impl PostgresParticipant {
    /// Connects to every database, checks `max_prepared_transactions`, creates the dedup
    /// table when configured, and starts the background tasks (active-branch timeout, dedup
    /// retention, prepared-age check).
    pub async fn connect(config: PostgresConfig) -> anyhow::Result<Self> {
        anyhow::ensure!(!config.resources.is_empty(), "at least one database (resource) is required");
        let mut pools = Vec::new();
        for rc in &config.resources {
            // Server-side bounds, set at connection start-up: every statement, and every idle
            // open transaction (a second line behind the adapter's own active-branch timeout).
            let idle_ms = config.active_timeout.as_millis() as u64 + 5_000;
            let options = PgConnectOptions::from_str(&rc.url)
                .map_err(|e| anyhow::anyhow!("resource {}: invalid url: {e}", rc.id))?
                .application_name(&config.application_name)
                .options([
                    ("statement_timeout", format!("{}", config.statement_timeout.as_millis())),
                    ("idle_in_transaction_session_timeout", format!("{idle_ms}")),
                ]);
            let pool = PgPoolOptions::new()
                .max_connections(rc.max_connections)
                .acquire_timeout(config.acquire_timeout)
                // No ping on every acquire: a broken connection fails its statement, and every
                // failure path here closes the connection instead of returning it.
                .test_before_acquire(false)
                .connect_with(options)
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
    pub async fn with_pools(config: PostgresConfig, pools: Vec<(ResourceId, PgPool)>) -> anyhow::Result<Self> {
        anyhow::ensure!(!pools.is_empty(), "at least one database (resource) is required");
        anyhow::ensure!(!config.prepared_age_interval.is_zero(), "prepared_age_interval must be greater than 0");
        let mut resources = HashMap::new();
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
            let branches = BranchTable::new(config.tombstone_retention, config.max_tombstones);
            let active = Arc::new(Semaphore::new(config.max_active_branches));
            let resource = Resource {
                id: id.clone(),
                pool,
                branches,
                active,
                warm: Mutex::new(Vec::new()),
                // Never so many that a statement on the pool itself (recovery, the dedup
                // fence) finds it empty while every active branch holds a connection.
                max_warm: config.warm_connections.min(size - config.max_active_branches - 1),
            };
            resources.insert(id, Arc::new(resource));
        }
        let participant = PostgresParticipant { inner: Arc::new(Inner { config, resources }) };
        participant.spawn_housekeeping();
        Ok(participant)
    }

    fn resource(&self, id: &ResourceId) -> Option<Arc<Resource>> {
        self.inner.resources.get(id).cloned()
    }

    /// Opens branch (gtid, branch) at `resource`, or resumes it if it is open, and returns it
    /// locked: concurrent calls for the same branch wait their turn.
    pub async fn branch(
        &self,
        resource: &ResourceId,
        gtid: Gtid,
        branch: BranchId,
    ) -> Result<BranchGuard, BranchError> {
        let r = self.resource(resource).ok_or_else(|| BranchError::UnknownResource(resource.to_string()))?;
        let key = (gtid, branch);
        let mut slot = r.branches.lock(&key).await;
        if slot.state.conn.is_none() {
            if let Some(fin) = r.branches.finished(&key) {
                let reason = if let Fin::Aborted(reason) = &fin { reason.clone() } else { String::new() };
                r.branches.release(&key, &mut slot);
                return Err(BranchError::Finished { state: fin.name(), reason });
            }
            if let Err(e) = self.open(&r, &key, &mut slot).await {
                r.branches.release(&key, &mut slot);
                return Err(e);
            }
        }
        Ok(BranchGuard { slot, participant: self.clone(), resource: r, key })
    }

    async fn open(&self, r: &Arc<Resource>, key: &Key, slot: &mut Slot) -> Result<(), BranchError> {
        r.branches.may_start(&key.0).map_err(BranchError::Refused)?;
        let permit = r
            .active
            .clone()
            .try_acquire_owned()
            .map_err(|_| BranchError::TooManyActive { max: self.inner.config.max_active_branches })?;
        let opened = async {
            let conn = r.acquire().await.map_err(|e| BranchError::Unavailable(e.to_string()))?;
            let mut conn = BranchConn { conn: Some(conn), txid: 0, _active: permit };
            let begun = sqlx::raw_sql("BEGIN; SELECT txid_current()").fetch_all(&mut **conn.get()).await;
            conn.txid = match begun.as_deref() {
                Ok([row]) => row.try_get::<i64, _>(0).map_err(|e| BranchError::Unavailable(e.to_string()))?,
                Ok(rows) => return Err(BranchError::Unavailable(format!("BEGIN answered {} rows", rows.len()))),
                Err(e) => return Err(BranchError::from_sqlx(e)),
            };
            if self.inner.config.dedup {
                // The branch's fence: committed with the branch, so it exists iff the branch
                // committed; an abort's fence with the same key makes this fail instead.
                let fenced = sqlx::query(
                    "INSERT INTO pledge_dedup (key, kind, gtid, branch_id) VALUES ($1, 'work', $2, $3) \
                     ON CONFLICT (key) DO NOTHING",
                )
                .bind(fence_key(key))
                .bind(*key.0.as_uuid())
                .bind(key.1.to_string())
                .execute(&mut **conn.get())
                .await;
                match fenced {
                    Ok(done) if done.rows_affected() == 1 => {}
                    Ok(_) => return Err(BranchError::Finished { state: "aborted or finished", reason: String::new() }),
                    Err(e) => return Err(BranchError::from_sqlx(&e)),
                }
            }
            Ok(conn)
        }
        .await;
        // On error `conn` is dropped inside the block above: closed, with its transaction.
        slot.state.conn = Some(opened?);
        slot.since = Some(Instant::now());
        Ok(())
    }

    /// Ends an active branch with ROLLBACK (the connection is closed if that fails) and
    /// remembers it as `fin`.
    async fn rollback_active(&self, r: &Resource, key: &Key, slot: &mut Slot, fin: Fin) {
        if let Some(mut conn) = slot.state.conn.take() {
            let rolled_back =
                tokio::time::timeout(self.control_timeout(), sqlx::query("ROLLBACK").execute(&mut **conn.get())).await;
            if matches!(rolled_back, Ok(Ok(_))) {
                conn.release(r);
            } // else dropped: closed, and PostgreSQL rolls the transaction back
        }
        if self.inner.config.dedup {
            self.fence_abort(r, key).await;
        }
        r.branches.finish(key, fin);
    }

    /// Inserts the abort fence (best effort: the in-memory tombstone and the restart rule
    /// already refuse a late prepare; the fence keeps refusing it across restarts).
    async fn fence_abort(&self, r: &Resource, key: &Key) {
        let fenced = sqlx::query(
            "INSERT INTO pledge_dedup (key, kind, gtid, branch_id) VALUES ($1, 'abort', $2, $3) ON CONFLICT (key) DO NOTHING",
        )
        .bind(fence_key(key))
        .bind(*key.0.as_uuid())
        .bind(key.1.to_string())
        .execute(&r.pool)
        .await;
        if let Err(e) = fenced {
            tracing::warn!(resource = %r.id, gtid = %key.0, branch = %key.1, error = %e, "cannot record the abort fence");
        }
    }

    /// The kind of this branch's dedup row ('work' = it committed, 'abort'), if any.
    async fn fence(&self, r: &Resource, key: &Key) -> Result<Option<String>, Error> {
        sqlx::query_scalar("SELECT kind FROM pledge_dedup WHERE key = $1")
            .bind(fence_key(key))
            .fetch_optional(&r.pool)
            .await
            .map_err(|e| Error::new(format!("reading the dedup table: {e}")))
    }

    async fn is_prepared(&self, r: &Resource, gid: &Gid) -> Result<bool, Error> {
        sqlx::query_scalar::<_, i32>("SELECT 1 FROM pg_prepared_xacts WHERE gid = $1 AND database = current_database()")
            .bind(gid.to_string())
            .fetch_optional(&r.pool)
            .await
            .map(|found| found.is_some())
            .map_err(|e| Error::new(format!("reading pg_prepared_xacts: {e}")))
    }

    /// Bound of a control statement, client side: `statement_timeout` covers the server, not
    /// a connection that stopped answering.
    fn control_timeout(&self) -> Duration {
        self.inner.config.statement_timeout + Duration::from_secs(5)
    }

    /// Runs one control statement (COMMIT/ROLLBACK PREPARED) on a pooled connection.
    async fn control(&self, r: &Resource, sql: String) -> Result<(), sqlx::Error> {
        let mut conn = r.acquire().await?;
        // Simple protocol: one round trip. As a prepared statement (sqlx::query) each of these
        // one-off texts (the GID differs every time) cost three: parse and describe, closing the
        // statement it pushed out of the connection's cache, then bind and execute.
        let done = tokio::time::timeout(self.control_timeout(), sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut *conn))
            .await
            .unwrap_or(Err(sqlx::Error::PoolTimedOut));
        match done {
            Ok(_) => r.put_back(conn),
            // In autocommit mode an error leaves no transaction open, but the connection may be
            // broken or still busy: do not hand it to anyone else.
            Err(_) => conn.close_on_drop(),
        }
        done.map(drop)
    }

    async fn prepare_active(&self, r: &Resource, key: &Key, gid: &Gid, slot: &mut Slot) -> Vote {
        let mut conn = slot.state.conn.take().expect("active branch");
        // One message, one round trip (simple protocol): check that the transaction is still the
        // one the branch began (its own statements may have ended it), then prepare. PREPARE in
        // a failed transaction would answer with a silent ROLLBACK, but it cannot get there: in a
        // failed transaction the check itself fails, and an error skips the rest of the message.
        // So PREPARE either prepares or fails (a deferred constraint, a serialization failure).
        let sql = format!("{}; PREPARE TRANSACTION {}", same_transaction_check(conn.txid), gid.literal());
        let prepared = sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut **conn.get()).await;
        fail::fail_point!("postgres::after_prepare");
        let outcome = match prepared {
            Ok(_) => Ok(()),
            Err(e) => Err(format!("PREPARE TRANSACTION failed: {}", BranchError::from_sqlx(&e))),
        };
        match outcome {
            Ok(()) => {
                conn.release(r); // PREPARE TRANSACTION ended its transaction
                r.branches.finish(key, Fin::Prepared);
                Vote::Prepared { metadata: Vec::new() }
            }
            Err(reason) => {
                drop(conn); // closed: PostgreSQL rolls back whatever is left
                r.branches.finish(key, Fin::Aborted(reason.clone()));
                Vote::Aborted { reason }
            }
        }
    }

    async fn commit_one_phase(&self, r: &Resource, key: &Key, slot: &mut Slot) -> Result<Outcome, Error> {
        let mut conn = slot.state.conn.take().expect("active branch");
        // COMMIT of a failed transaction answers with a silent ROLLBACK: the check before it,
        // in the same message, fails in a failed (or replaced) transaction and skips the COMMIT.
        let sql = format!("{}; COMMIT", same_transaction_check(conn.txid));
        let result = sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut **conn.get()).await.map(drop);
        match result {
            Ok(()) => {
                conn.release(r);
                r.branches.finish(key, Fin::Committed);
                Ok(Outcome::Committed)
            }
            // PostgreSQL refused (a deferred constraint, a serialization failure, the check):
            // the transaction did not commit.
            Err(e @ sqlx::Error::Database(_)) => {
                drop(conn);
                let reason = format!("commit failed: {}", BranchError::from_sqlx(&e));
                if self.inner.config.dedup {
                    self.fence_abort(r, key).await;
                }
                r.branches.finish(key, Fin::Aborted(reason.clone()));
                Ok(Outcome::Aborted { reason })
            }
            // The connection failed: the COMMIT may or may not have happened.
            Err(e) => {
                drop(conn);
                let reason = format!("the connection failed during COMMIT: {e}");
                if self.inner.config.dedup {
                    // The branch's fence row exists if and only if its transaction committed.
                    return Ok(match self.fence(r, key).await?.as_deref() {
                        Some("work") => {
                            r.branches.finish(key, Fin::Committed);
                            Outcome::Committed
                        }
                        _ => {
                            self.fence_abort(r, key).await;
                            r.branches.finish(key, Fin::Aborted(reason.clone()));
                            Outcome::Aborted { reason }
                        }
                    });
                }
                tracing::warn!(resource = %r.id, gtid = %key.0, branch = %key.1, error = %e, "one-phase commit outcome unknown");
                r.branches.finish(key, Fin::Aborted(reason.clone()));
                Ok(Outcome::HeuristicHazard { reason })
            }
        }
    }

    fn spawn_housekeeping(&self) {
        for r in self.inner.resources.values() {
            let (p, r2) = (self.clone(), r.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(p.inner.config.prepared_age_interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    p.check_prepared_age(&r2).await;
                }
            });
            let (p, r) = (self.clone(), r.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                let mut n: u64 = 0;
                loop {
                    tick.tick().await;
                    n += 1;
                    // First, so the warm connections are back in the pool for what follows.
                    r.cool_down();
                    p.expire_active(&r).await;
                    r.branches.expire_finished();
                    if p.inner.config.dedup && n.is_multiple_of(10) {
                        p.expire_dedup(&r).await;
                    }
                }
            });
        }
    }

    /// Rolls back active branches older than `active_timeout` (their client may be gone).
    async fn expire_active(&self, r: &Arc<Resource>) {
        let timeout = self.inner.config.active_timeout;
        for (key, slot) in r.branches.open_slots() {
            // A branch in use right now is not idle; look again next time.
            let Ok(mut slot) = slot.try_lock_owned() else { continue };
            if slot.state.conn.is_some() && slot.since.is_some_and(|s| s.elapsed() >= timeout) {
                tracing::info!(resource = %r.id, gtid = %key.0, branch = %key.1, "rolling back a branch not prepared in time");
                let reason = format!("not prepared within active_timeout ({} ms)", timeout.as_millis());
                self.rollback_active(r, &key, &mut slot, Fin::Aborted(reason)).await;
                r.branches.release(&key, &mut slot);
            }
        }
    }

    /// Publishes the age of the oldest Pledge branch prepared in the resource's database, by
    /// any coordinator (gauge `pledge_postgres_oldest_prepared_seconds{resource}`, 0 when
    /// there is none; unchanged when the query fails, which is logged), and logs it when it is
    /// above the warning age.
    async fn check_prepared_age(&self, r: &Resource) {
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
            Ok(Some((gid, age_s))) if age_s * 1000.0 >= self.inner.config.prepared_age_warn.as_millis() as f64 => {
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

    async fn expire_dedup(&self, r: &Resource) {
        let deleted = sqlx::query(
            "DELETE FROM pledge_dedup WHERE key IN (SELECT key FROM pledge_dedup \
             WHERE created_at < now() - make_interval(secs => $1) LIMIT 10000)",
        )
        .bind(self.inner.config.dedup_retention.as_secs_f64())
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

/// What a failed [`same_transaction_check`] means (and the text its error carries).
const REPLACED_TRANSACTION: &str =
    "the transaction of the branch was ended by its own statements (work may have committed outside 2PC)";

/// A statement that fails unless the current transaction is the branch's (`txid` from BEGIN).
///
/// Plain SQL rather than a PL/pgSQL `DO` block, which PostgreSQL compiles on every call: with
/// it (and a lookup in `pg_prepared_xacts` after PREPARE, now gone) PostgreSQL managed half the
/// 2PC transactions a second (pgbench, 32 clients). The cast fails only on the branch taken
/// when the transaction differs (its input is not a constant, so the planner cannot fold it),
/// and its error carries [`REPLACED_TRANSACTION`].
fn same_transaction_check(txid: i64) -> String {
    format!(
        "SELECT CASE WHEN txid_current() = {txid} THEN 1 \
         ELSE ('pledge: {REPLACED_TRANSACTION}; now in transaction ' || txid_current())::int END"
    )
}

fn fence_key(key: &Key) -> String {
    format!("branch:{}:{}", key.0, key.1)
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

impl PostgresParticipant {
    fn gid(&self, coordinator_id: &str, xid: &Xid) -> Result<(Arc<Resource>, Key, Gid), String> {
        let r = self.resource(&xid.resource).ok_or_else(|| format!("unknown resource {:?}", xid.resource.as_str()))?;
        let gid = Gid::new(coordinator_id, &xid.resource, xid.gtid, xid.branch.clone())?;
        Ok((r, (xid.gtid, xid.branch.clone()), gid))
    }
}

#[tonic::async_trait]
impl Participant for PostgresParticipant {
    async fn prepare(&self, coordinator_id: &str, xid: &Xid) -> Result<Vote, Error> {
        let (r, key, gid) = match self.gid(coordinator_id, xid) {
            Ok(found) => found,
            Err(reason) => return Ok(Vote::Aborted { reason }),
        };
        let mut slot = r.branches.lock(&key).await;
        let vote = if slot.state.conn.is_some() {
            self.prepare_active(&r, &key, &gid, &mut slot).await
        } else if let Some(vote) = r.branches.finished_vote(&key) {
            vote
        } else if self.is_prepared(&r, &gid).await? {
            r.branches.finish(&key, Fin::Prepared);
            Vote::Prepared { metadata: Vec::new() }
        } else {
            let fence = if self.inner.config.dedup { self.fence(&r, &key).await? } else { None };
            match fence.as_deref() {
                Some("work") => Vote::Prepared { metadata: Vec::new() }, // prepared and committed before
                Some(_) => Vote::Aborted { reason: "branch was aborted (dangling prepare refused)".into() },
                // No statement ran here: nothing to prepare or commit.
                None => r.branches.vote_without_work(&key),
            }
        };
        r.branches.release(&key, &mut slot);
        Ok(vote)
    }

    async fn commit(
        &self,
        coordinator_id: &str,
        xid: &Xid,
        one_phase: bool,
        _metadata: &[u8],
    ) -> Result<Outcome, Error> {
        fail::fail_point!("postgres::before_commit");
        let (r, key, gid) = self.gid(coordinator_id, xid).map_err(Error)?;
        let mut slot = r.branches.lock(&key).await;
        let outcome = self.commit_locked(&r, &key, &gid, one_phase, &mut slot).await;
        r.branches.release(&key, &mut slot);
        outcome
    }

    async fn abort(&self, coordinator_id: &str, xid: &Xid, _metadata: &[u8]) -> Result<Outcome, Error> {
        let (r, key, gid) = self.gid(coordinator_id, xid).map_err(Error)?;
        let mut slot = r.branches.lock(&key).await;
        let outcome = self.abort_locked(&r, &key, &gid, &mut slot).await;
        r.branches.release(&key, &mut slot);
        outcome
    }

    async fn recover(&self, coordinator_id: &str) -> Result<Vec<InDoubt>, Error> {
        let cid = ResourceId::parse_field("coordinator_id", coordinator_id).map_err(|e| Error(e.to_string()))?;
        let prefix = Gid::coordinator_prefix(&cid);
        let mut out = Vec::new();
        for r in self.inner.resources.values() {
            let rows: Vec<(String, f64)> = sqlx::query_as(
                "SELECT gid, (extract(epoch FROM prepared) * 1000)::float8 FROM pg_prepared_xacts \
                 WHERE database = current_database() AND starts_with(gid, $1) ORDER BY prepared",
            )
            .bind(&prefix)
            .fetch_all(&r.pool)
            .await
            .map_err(|e| Error::new(format!("resource {}: reading pg_prepared_xacts: {e}", r.id)))?;
            for (gid, prepared_ms) in rows {
                // GIDs are cluster-wide: another resource's branch may be listed in this database.
                let Some(parsed) = Gid::parse(&gid).filter(|g| g.resource_tag == gid::resource_tag(&r.id)) else {
                    continue;
                };
                out.push(InDoubt {
                    xid: Xid { resource: r.id.clone(), gtid: parsed.gtid, branch: parsed.branch },
                    metadata: Vec::new(),
                    prepared_unix_ms: prepared_ms as u64,
                });
            }
        }
        Ok(out)
    }
}

impl PostgresParticipant {
    async fn commit_locked(
        &self,
        r: &Resource,
        key: &Key,
        gid: &Gid,
        one_phase: bool,
        slot: &mut Slot,
    ) -> Result<Outcome, Error> {
        if slot.state.conn.is_some() {
            if one_phase {
                return self.commit_one_phase(r, key, slot).await;
            }
            // Two-phase commit of a branch that never prepared: the coordinator cannot have
            // decided commit with it. Roll it back and say so.
            let reason = "commit of a branch that was never prepared".to_string();
            self.rollback_active(r, key, slot, Fin::Aborted(reason.clone())).await;
            return Ok(Outcome::Aborted { reason });
        }
        match r.branches.finished(key) {
            Some(Fin::Committed | Fin::ReadOnly) => return Ok(Outcome::Committed),
            Some(Fin::Aborted(reason)) => return Ok(Outcome::Aborted { reason }),
            Some(Fin::Prepared) | None => {}
        }
        if one_phase && !self.is_prepared(r, gid).await? {
            // Never opened here (or opened before a restart): decide from what is known.
            let fence = if self.inner.config.dedup { self.fence(r, key).await? } else { None };
            return Ok(match (fence.as_deref(), r.branches.may_start(&key.0)) {
                (Some("work"), _) => Outcome::Committed,
                (Some(_), _) => Outcome::Aborted { reason: "branch was aborted".into() },
                (None, Ok(())) => Outcome::Committed, // nothing was done here: nothing to commit
                (None, Err(reason)) => Outcome::Aborted { reason },
            });
        }
        match self.control(r, format!("COMMIT PREPARED {}", gid.literal())).await {
            Ok(()) => {
                r.branches.finish(key, Fin::Committed);
                Ok(Outcome::Committed)
            }
            Err(e) if sqlstate(&e).as_deref() == Some(UNDEFINED_OBJECT) => {
                // PostgreSQL no longer has it: committed earlier (a repeated commit), unless
                // the dedup table says it never committed (rolled back behind our back).
                let fence = if self.inner.config.dedup { self.fence(r, key).await? } else { Some("work".into()) };
                if fence.as_deref() == Some("work") {
                    r.branches.finish(key, Fin::Committed);
                    Ok(Outcome::Committed)
                } else {
                    Ok(Outcome::Aborted { reason: format!("prepared transaction {gid} vanished without committing") })
                }
            }
            Err(e) => Err(Error::new(format!("COMMIT PREPARED failed: {}", BranchError::from_sqlx(&e)))),
        }
    }

    async fn abort_locked(&self, r: &Resource, key: &Key, gid: &Gid, slot: &mut Slot) -> Result<Outcome, Error> {
        if slot.state.conn.is_some() {
            self.rollback_active(r, key, slot, Fin::Aborted("aborted by the coordinator".into())).await;
            return Ok(Outcome::Aborted { reason: String::new() });
        }
        // Even a branch remembered as aborted is rolled back in PostgreSQL: a prepare whose
        // answer was lost (the connection failed after PREPARE) left it prepared there.
        if let Some(Fin::Committed) = r.branches.finished(key) {
            return Ok(Outcome::Committed);
        }
        match self.control(r, format!("ROLLBACK PREPARED {}", gid.literal())).await {
            Ok(()) => {}
            Err(e) if sqlstate(&e).as_deref() == Some(UNDEFINED_OBJECT) => {
                // Not prepared (never, or rolled back already), unless it committed.
                if self.inner.config.dedup && self.fence(r, key).await?.as_deref() == Some("work") {
                    r.branches.finish(key, Fin::Committed);
                    return Ok(Outcome::Committed);
                }
            }
            Err(e) => return Err(Error::new(format!("ROLLBACK PREPARED failed: {}", BranchError::from_sqlx(&e)))),
        }
        if self.inner.config.dedup {
            self.fence_abort(r, key).await;
        }
        r.branches.finish(key, Fin::Aborted("aborted by the coordinator".into()));
        Ok(Outcome::Aborted { reason: String::new() })
    }
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
