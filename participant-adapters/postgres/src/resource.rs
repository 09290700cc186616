//! PostgreSQL's side of a branch ([`Resource`]): what the SDK's journaled participant asks of
//! each database. The contract around it (the journal, repeated answers, unknown branches,
//! restarts) is the SDK's; this module only knows SQL.
//!
//! * **open** → a connection (a warm one, or from the pool), `BEGIN; SELECT txid_current()`;
//!   the transaction id is the branch's identity at PostgreSQL, later its vote metadata.
//! * **prepare** → the same-transaction check, the session reset (below; its `RESET ROLE` also
//!   makes the prepared transaction the adapter's role's, or no other session of the adapter
//!   could finish it) and `PREPARE TRANSACTION '<gid>'`, in one message.
//! * **one-phase commit** → the check, the reset and `COMMIT`; its answer lost (connection
//!   broken, no answer in time) → `txid_status` of the branch's transaction id tells how it
//!   ended.
//! * **finish** → `COMMIT PREPARED` / `ROLLBACK PREPARED`; a GID PostgreSQL no longer has
//!   (42704) is asked of `txid_status` (or the dedup table): committed, rolled back outside
//!   Pledge (a heuristic outcome), or unknown (a heuristic hazard) — never presumed.
//! * Every statement has a client-side bound (`statement_timeout` + 5 s): PostgreSQL's own
//!   timeout does not cover a server or network that stopped answering.
//! * A connection a branch used goes back (to the warm set or the pool) only after its
//!   transaction ended with its session reset, so what one client's statements set never
//!   reaches the next client's branch. The reset rides in the message that ends the
//!   transaction: settings changed in a transaction (`SET ROLE`, `SET statement_timeout`, any
//!   `SET`) last past its PREPARE or COMMIT, so resetting them just before takes effect for the
//!   session ([`RESET_BEFORE_PREPARE`], [`RESET_BEFORE_COMMIT`]); a ROLLBACK reverts them by
//!   itself ([`RESET_AFTER_ROLLBACK`] releases what it does not: session advisory locks). What
//!   PREPARE refuses to carry (LISTEN, temporary tables, cursors WITH HOLD) cannot outlive a
//!   prepared branch. Any error closes the connection instead.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pledge_proto::{ResourceId, Xid};
use pledge_sdk::journaled::{OnePhase, Resource, Sealed};
use pledge_sdk::{BranchError, Error, InDoubt, Outcome};
use pledge_sql::resource::{ActiveBranches, DatabaseSet};
use sqlx::pool::PoolConnection;
use sqlx::postgres::PgPool;
use sqlx::{AssertSqlSafe, Postgres, Row};
use tokio::sync::OwnedSemaphorePermit;

use crate::PostgresConfig;
use crate::gid::{self, Gid};

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

/// The dedup table's key of a branch's fence. (Without the resource: each database has its
/// own table.)
fn fence_key(xid: &Xid) -> String {
    format!("branch:{}:{}", xid.gtid, xid.branch)
}

/// `undefined_object`: COMMIT/ROLLBACK PREPARED of a GID PostgreSQL does not have.
const UNDEFINED_OBJECT: &str = "42704";

/// Run inside a branch's transaction just before PREPARE: everything its statements can leave in
/// the session that a prepared transaction does not refuse (what `DISCARD ALL` would reset, but
/// `DEALLOCATE ALL`, which would pull the adapter's cached statements from under it).
pub const RESET_BEFORE_PREPARE: &str = "RESET ALL; RESET ROLE; SELECT pg_advisory_unlock_all(); DISCARD SEQUENCES";
/// The same before a one-phase COMMIT, which (unlike PREPARE) would carry LISTEN, temporary
/// tables and cursors WITH HOLD into the session.
pub const RESET_BEFORE_COMMIT: &str = "RESET ALL; RESET ROLE; SELECT pg_advisory_unlock_all(); DISCARD SEQUENCES; \
                                       CLOSE ALL; UNLISTEN *; DISCARD TEMP";
/// After a ROLLBACK, which reverts settings, LISTEN, temporary tables and cursors itself.
pub const RESET_AFTER_ROLLBACK: &str = "SELECT pg_advisory_unlock_all(); DISCARD SEQUENCES";

/// One database the adapter serves.
pub(crate) struct Database {
    pub id: ResourceId,
    pub pool: PgPool,
    /// Slots for active branches (`max_active_branches`), each holding a connection.
    active: ActiveBranches,
    /// Idle connections kept out of the pool, most recently used last (`warm_connections`).
    warm: Mutex<Vec<PoolConnection<Postgres>>>,
    max_warm: usize,
    /// This resource's part of its GIDs.
    tag: String,
}

impl Database {
    pub fn new(id: ResourceId, pool: PgPool, max_active_branches: usize, max_warm: usize) -> Database {
        let tag = gid::resource_tag(&id);
        Database {
            id,
            pool,
            active: ActiveBranches::new(max_active_branches),
            warm: Mutex::new(Vec::new()),
            max_warm,
            tag,
        }
    }

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
    pub fn cool_down(&self) {
        // Taken out first: each drop starts the pool's check, not under the lock.
        drop(std::mem::take(&mut *self.warm.lock().expect("warm connections lock")));
    }
}

/// An active branch's connection, inside its open transaction.
///
/// Dropped without being recycled (after an error, or anywhere it should not have been), the
/// connection is closed rather than returned to the pool: its transaction may still be open,
/// and the pool would hand it to the next branch inside it.
pub struct BranchConn {
    conn: Option<PoolConnection<Postgres>>,
    /// `txid_current()` at BEGIN: the branch's identity at PostgreSQL. At prepare, a different
    /// one means the branch's own statements ended its transaction (and maybe committed part of
    /// its work outside 2PC).
    txid: i64,
    db: Arc<Database>,
    /// One of `max_active_branches`.
    _active: OwnedSemaphorePermit,
}

impl BranchConn {
    /// The connection, inside the branch's transaction.
    pub fn get(&mut self) -> &mut PoolConnection<Postgres> {
        self.conn.as_mut().expect("a branch connection is present until recycled")
    }

    /// Hands the connection back, once its transaction ended with its session reset.
    fn recycle(mut self) {
        if let Some(conn) = self.conn.take() {
            self.db.put_back(conn);
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

/// Every database of the adapter, as one [`Resource`].
pub struct Databases {
    pub(crate) config: PostgresConfig,
    pub(crate) databases: DatabaseSet<Database>,
}

/// How a transaction that PostgreSQL no longer holds prepared ended, as far as anything tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Committed,
    Aborted,
    InProgress,
    Unknown,
}

/// The vote metadata of a branch: its transaction id, readable in `pledge log inspect`.
pub fn txid_metadata(txid: i64) -> Vec<u8> {
    format!("txid={txid}").into_bytes()
}

/// The transaction id in vote metadata written by [`txid_metadata`].
pub fn txid_of(metadata: &[u8]) -> Option<i64> {
    std::str::from_utf8(metadata).ok()?.split_whitespace().find_map(|p| p.strip_prefix("txid=")?.parse().ok())
}

pub(crate) fn sqlstate(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(db) => db.code().map(|c| c.to_string()),
        _ => None,
    }
}

/// A failed statement as a branch error: SQLSTATE class 40 (serialization failure, deadlock) is
/// worth retrying, 42 and 22 mean the request is wrong, others that the data does not allow it.
pub fn branch_error(e: &sqlx::Error) -> BranchError {
    match e {
        // The same-transaction check failed: say what it means, not how it was raised.
        sqlx::Error::Database(db) if db.message().contains(REPLACED_TRANSACTION) => {
            BranchError::Refused(REPLACED_TRANSACTION.to_string())
        }
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.to_string()).unwrap_or_default();
            let message = format!("SQL error {code}: {}", db.message());
            match code.get(..2) {
                Some("40") => BranchError::Aborted(message),
                Some("42" | "22") => BranchError::Invalid(message),
                _ => BranchError::Refused(message),
            }
        }
        other => BranchError::Unavailable(other.to_string()),
    }
}

impl Databases {
    pub(crate) fn new(config: PostgresConfig, databases: HashMap<ResourceId, Arc<Database>>) -> Databases {
        Databases { config, databases: DatabaseSet::new(databases) }
    }

    /// Bound of every statement, client side: `statement_timeout` covers a server that works
    /// slowly, not one (or a network) that stopped answering.
    pub(crate) fn bound(&self) -> Duration {
        self.config.statement_timeout + Duration::from_secs(5)
    }

    /// `fut` within [`Databases::bound`]; a timeout is an error like a broken connection.
    async fn bounded<T>(&self, fut: impl Future<Output = Result<T, sqlx::Error>>) -> Result<T, sqlx::Error> {
        pledge_sql::bounded(self.bound(), fut).await
    }

    /// Runs one control statement (COMMIT/ROLLBACK PREPARED) on a connection of the database's
    /// own (never a branch's).
    async fn control(&self, db: &Database, sql: String) -> Result<(), sqlx::Error> {
        let mut conn = self.bounded(db.acquire()).await?;
        // Simple protocol: one round trip. As a prepared statement (sqlx::query) each of these
        // one-off texts (the GID differs every time) cost three: parse and describe, closing the
        // statement it pushed out of the connection's cache, then bind and execute.
        let done = self.bounded(sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut *conn)).await;
        match done {
            Ok(_) => db.put_back(conn),
            // In autocommit mode an error leaves no transaction open, but the connection may be
            // broken or still busy: do not hand it to anyone else.
            Err(_) => conn.close_on_drop(),
        }
        done.map(drop)
    }

    /// How the branch's transaction ended, when PostgreSQL no longer holds it prepared: from
    /// the dedup table's fence (with `dedup`), else from `txid_status` of the transaction id in
    /// its metadata.
    async fn fate(&self, db: &Database, xid: &Xid, metadata: &[u8]) -> Result<Fate, Error> {
        if self.config.dedup {
            match self.fence(db, xid).await?.as_deref() {
                Some("work") => return Ok(Fate::Committed),
                Some(_) => return Ok(Fate::Aborted),
                None => {}
            }
        }
        let Some(txid) = txid_of(metadata) else { return Ok(Fate::Unknown) };
        let status: Option<String> = self
            .bounded(sqlx::query_scalar("SELECT txid_status($1)").bind(txid).fetch_one(&db.pool))
            .await
            .map_err(|e| Error::new(format!("resource {}: asking txid_status of transaction {txid}: {e}", db.id)))?;
        Ok(match status.as_deref() {
            Some("committed") => Fate::Committed,
            Some("aborted") => Fate::Aborted,
            Some(_) => Fate::InProgress,
            // Too old: its commit status has been truncated away.
            None => Fate::Unknown,
        })
    }

    /// With the dedup table, inserts the abort fence (best effort: the journal already refuses a
    /// late prepare; the fence keeps refusing it in the database, whatever becomes of the journal).
    async fn fence_abort(&self, db: &Database, xid: &Xid) {
        if !self.config.dedup {
            return;
        }
        let fenced = tokio::time::timeout(
            self.bound(),
            sqlx::query(
                "INSERT INTO pledge_dedup (key, kind, gtid, branch_id) VALUES ($1, 'abort', $2, $3) \
                 ON CONFLICT (key) DO NOTHING",
            )
            .bind(fence_key(xid))
            .bind(*xid.gtid.as_uuid())
            .bind(xid.branch.to_string())
            .execute(&db.pool),
        )
        .await;
        if !matches!(fenced, Ok(Ok(_))) {
            tracing::warn!(resource = %db.id, %xid, result = ?fenced, "cannot record the abort fence");
        }
    }

    /// The kind of this branch's dedup row ('work' = it committed, 'abort'), if any.
    async fn fence(&self, db: &Database, xid: &Xid) -> Result<Option<String>, Error> {
        let found = tokio::time::timeout(
            self.bound(),
            sqlx::query_scalar("SELECT kind FROM pledge_dedup WHERE key = $1")
                .bind(fence_key(xid))
                .fetch_optional(&db.pool),
        )
        .await;
        match found {
            Ok(Ok(kind)) => Ok(kind),
            Ok(Err(e)) => Err(Error::new(format!("reading the dedup table: {e}"))),
            Err(_) => Err(Error::new("reading the dedup table: no answer in time")),
        }
    }
}

#[tonic::async_trait]
impl Resource for Databases {
    type Open = BranchConn;

    fn serves(&self, resource: &ResourceId) -> bool {
        self.databases.contains(resource)
    }

    fn resources(&self) -> Vec<ResourceId> {
        self.databases.ids().to_vec()
    }

    async fn open(&self, xid: &Xid) -> Result<BranchConn, BranchError> {
        let db = self.databases.get_for_branch(&xid.resource)?;
        let permit = db.active.take()?;
        let conn = self.bounded(db.acquire()).await.map_err(|e| BranchError::Unavailable(e.to_string()))?;
        let mut open = BranchConn { conn: Some(conn), txid: 0, db: db.clone(), _active: permit };
        // On any error below `open` is dropped: closed, with its transaction.
        let begun = self.bounded(sqlx::raw_sql("BEGIN; SELECT txid_current()").fetch_all(&mut **open.get())).await;
        open.txid = match begun.as_deref() {
            Ok([row]) => row.try_get::<i64, _>(0).map_err(|e| BranchError::Unavailable(e.to_string()))?,
            Ok(rows) => return Err(BranchError::Unavailable(format!("BEGIN answered {} rows", rows.len()))),
            Err(e) => return Err(branch_error(e)),
        };
        if self.config.dedup {
            // The branch's fence: committed with the branch, so it exists iff the branch
            // committed; an abort's fence with the same key makes this fail instead.
            let fenced = self
                .bounded(
                    sqlx::query(
                        "INSERT INTO pledge_dedup (key, kind, gtid, branch_id) VALUES ($1, 'work', $2, $3) \
                         ON CONFLICT (key) DO NOTHING",
                    )
                    .bind(fence_key(xid))
                    .bind(*xid.gtid.as_uuid())
                    .bind(xid.branch.to_string())
                    .execute(&mut **open.get()),
                )
                .await;
            match fenced {
                Ok(done) if done.rows_affected() == 1 => {}
                Ok(_) => return Err(BranchError::Finished { state: "aborted or finished", reason: String::new() }),
                Err(e) => return Err(branch_error(&e)),
            }
        }
        Ok(open)
    }

    async fn seal(&self, _coordinator_id: &str, _xid: &Xid, open: &mut BranchConn) -> Sealed {
        // PostgreSQL cannot tell cheaply whether the branch changed anything: it is prepared.
        Sealed::Ready { metadata: txid_metadata(open.txid) }
    }

    async fn prepare(&self, coordinator_id: &str, xid: &Xid, mut open: BranchConn, _: &[u8]) -> Result<(), String> {
        let gid = Gid::new(coordinator_id, &xid.resource, xid.gtid, xid.branch.clone())?;
        // One message, one round trip (simple protocol): check that the transaction is still the
        // one the branch began (its own statements may have ended it), take back the adapter's
        // role, then prepare. PREPARE in a failed transaction would answer with a silent
        // ROLLBACK, but it cannot get there: in a failed transaction the check itself fails, and
        // an error skips the rest of the message. So PREPARE either prepares or fails (a
        // deferred constraint, a serialization failure).
        let check = same_transaction_check(open.txid);
        let sql = format!("{check}; {RESET_BEFORE_PREPARE}; PREPARE TRANSACTION {}", gid.literal());
        let prepared = self.bounded(sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut **open.get())).await;
        fail::fail_point!("postgres::after_prepare");
        match prepared {
            Ok(_) => {
                open.recycle(); // PREPARE TRANSACTION ended its transaction
                Ok(())
            }
            Err(e) => {
                drop(open); // closed: PostgreSQL rolls back whatever is left
                Err(match e {
                    sqlx::Error::PoolTimedOut => format!(
                        "PREPARE TRANSACTION got no answer within {} ms (if it went through, the abort that follows \
                         rolls it back)",
                        self.bound().as_millis()
                    ),
                    e => format!("PREPARE TRANSACTION failed: {}", branch_error(&e)),
                })
            }
        }
    }

    async fn commit_one_phase(&self, xid: &Xid, mut open: BranchConn, _metadata: &[u8]) -> OnePhase {
        // COMMIT of a failed transaction answers with a silent ROLLBACK: the check before it,
        // in the same message, fails in a failed (or replaced) transaction and skips the COMMIT.
        let sql = format!("{}; {RESET_BEFORE_COMMIT}; COMMIT", same_transaction_check(open.txid));
        let result = self.bounded(sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut **open.get())).await;
        fail::fail_point!("postgres::after_one_phase_commit");
        match result {
            Ok(_) => {
                open.recycle();
                OnePhase::Committed
            }
            // PostgreSQL refused (a deferred constraint, a serialization failure, the check):
            // the transaction did not commit.
            Err(e @ sqlx::Error::Database(_)) => {
                let db = open.db.clone();
                drop(open);
                self.fence_abort(&db, xid).await;
                OnePhase::Aborted { reason: format!("commit failed: {}", branch_error(&e)) }
            }
            // The connection failed or stopped answering: the COMMIT may or may not have happened.
            Err(e) => {
                drop(open);
                OnePhase::Unknown { error: format!("the connection failed during COMMIT: {e}") }
            }
        }
    }

    async fn rollback(&self, xid: &Xid, mut open: BranchConn) {
        let db = open.db.clone();
        let sql = format!("ROLLBACK; {RESET_AFTER_ROLLBACK}");
        match self.bounded(sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut **open.get())).await {
            Ok(_) => open.recycle(),
            // Dropped: closed, and PostgreSQL rolls the transaction back.
            Err(e) => tracing::info!(%xid, error = %e, "ROLLBACK failed; closing the branch's connection"),
        }
        self.fence_abort(&db, xid).await;
    }

    async fn finish(
        &self,
        coordinator_id: &str,
        xid: &Xid,
        metadata: &[u8],
        commit: bool,
        recorded: bool,
    ) -> Result<Outcome, Error> {
        let db = self.databases.get_or_error(&xid.resource)?;
        let gid = Gid::new(coordinator_id, &xid.resource, xid.gtid, xid.branch.clone()).map_err(Error)?;
        let verb = if commit { "COMMIT PREPARED" } else { "ROLLBACK PREPARED" };
        match self.control(db, format!("{verb} {}", gid.literal())).await {
            Ok(()) if commit => return Ok(Outcome::Committed),
            Ok(()) => {
                self.fence_abort(db, xid).await;
                return Ok(Outcome::Aborted { reason: String::new() });
            }
            Err(e) if sqlstate(&e).as_deref() == Some(UNDEFINED_OBJECT) => {}
            Err(e) => return Err(Error::new(format!("{verb} failed: {}", branch_error(&e)))),
        }
        // PostgreSQL has no such prepared transaction (any more): ask how it ended.
        let fate = self.fate(db, xid, metadata).await?;
        let outside = |what: &str, how: &str| format!("prepared transaction {gid} was {what} outside Pledge ({how})");
        Ok(match (commit, fate) {
            (true, Fate::Committed) => Outcome::Committed, // a repeated commit
            (true, Fate::Aborted) => Outcome::HeuristicRollback {
                reason: outside("rolled back", "ROLLBACK PREPARED by hand, or lost in a failover"),
            },
            (false, Fate::Aborted) => {
                self.fence_abort(db, xid).await;
                Outcome::Aborted { reason: String::new() }
            }
            (false, Fate::Committed) => {
                Outcome::HeuristicCommit { reason: outside("committed", "COMMIT PREPARED by hand?") }
            }
            (_, Fate::InProgress) => {
                return Err(Error::new(format!("transaction of {gid} is still in progress at PostgreSQL")));
            }
            // Never prepared (its prepare failed): nothing to roll back.
            (false, Fate::Unknown) if !recorded => Outcome::Aborted { reason: String::new() },
            (_, Fate::Unknown) => Outcome::HeuristicHazard {
                reason: format!(
                    "prepared transaction {gid} is gone and nothing tells how it ended (no transaction id known, or too \
                     old for txid_status)"
                ),
            },
        })
    }

    async fn resolve(&self, xid: &Xid, metadata: &[u8]) -> Result<Option<Outcome>, Error> {
        let db = self.databases.get_or_error(&xid.resource)?;
        Ok(match self.fate(db, xid, metadata).await? {
            Fate::Committed => Some(Outcome::Committed),
            Fate::Aborted => {
                self.fence_abort(db, xid).await;
                Some(Outcome::Aborted { reason: "the one-phase COMMIT did not take effect".into() })
            }
            Fate::InProgress => None,
            Fate::Unknown => Some(Outcome::HeuristicHazard {
                reason: "the answer to the one-phase COMMIT was lost and its transaction is too old for txid_status"
                    .into(),
            }),
        })
    }

    async fn in_doubt(
        &self,
        coordinator_id: &str,
        resource: &ResourceId,
        after: Option<&Xid>,
        limit: usize,
    ) -> Result<Vec<InDoubt>, Error> {
        let db = self.databases.get_or_error(resource)?;
        let cid = ResourceId::parse_field("coordinator_id", coordinator_id).map_err(|e| Error(e.to_string()))?;
        let prefix = Gid::coordinator_prefix(&cid);
        // GIDs of one resource sort (bytewise) as their branches do: by GTID, then branch id.
        let after_gid = match after {
            Some(a) => Gid::new(coordinator_id, resource, a.gtid, a.branch.clone()).map_err(Error)?.to_string(),
            None => prefix.clone(),
        };
        let rows: Vec<(String, f64)> = self
            .bounded(
                sqlx::query_as(
                    "SELECT gid, (extract(epoch FROM prepared) * 1000)::float8 FROM pg_prepared_xacts \
                     WHERE database = current_database() AND starts_with(gid, $1) AND gid COLLATE \"C\" > $2 \
                     AND split_part(gid, ':', 4) = $3 ORDER BY gid COLLATE \"C\" LIMIT $4",
                )
                .bind(&prefix)
                .bind(&after_gid)
                .bind(&db.tag)
                .bind(limit as i64)
                .fetch_all(&db.pool),
            )
            .await
            .map_err(|e| Error::new(format!("resource {resource}: reading pg_prepared_xacts: {e}")))?;
        Ok(rows
            .into_iter()
            .filter_map(|(gid, prepared_ms)| {
                let parsed = Gid::parse(&gid).filter(|g| g.resource_tag == db.tag)?;
                Some(InDoubt {
                    xid: Xid { resource: resource.clone(), gtid: parsed.gtid, branch: parsed.branch },
                    metadata: Vec::new(),
                    prepared_unix_ms: prepared_ms as u64,
                })
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vote_metadata_carries_the_transaction_id() {
        assert_eq!(txid_of(&txid_metadata(4_294_967_301)), Some(4_294_967_301));
        assert_eq!(txid_of(b"garbage"), None);
        assert_eq!(txid_of(b""), None);
    }
}
