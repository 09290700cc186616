//! MySQL's and MariaDB's side of a branch ([`Resource`]): what the SDK's journaled participant
//! asks of each database, in XA statements. The contract around it (the journal, repeated
//! answers, unknown branches, restarts) is the SDK's; this module only knows XA.
//!
//! * **open** → a connection, `XA START <xid>`, the branch's fence row (see the crate docs),
//!   `SELECT CONNECTION_ID()`: the session's id goes into the vote metadata.
//! * **prepare** → `XA END` + `XA PREPARE` in one message; the session is kept for phase 2
//!   (see [`Database`]); past the bound it is closed, which detaches the prepared transaction
//!   (it stays prepared at the server).
//! * **one-phase commit** → `XA END` + `XA COMMIT … ONE PHASE`; its answer lost, the fence row
//!   tells how it ended, once no transaction holds it any more.
//! * **finish** → `XA COMMIT` / `XA ROLLBACK` on the branch's own session when this process
//!   still has it, else on a connection of the adapter's own; an XID the
//!   server does not hold (1397, XAER_NOTA) is settled by the fence row: committed, or rolled
//!   back outside Pledge (a heuristic outcome) — never presumed.
//! * **in doubt** → `XA RECOVER`, filtered by format id, the coordinator's gtrid prefix and the
//!   resource's tag.
//! * Every statement has a client-side bound (`statement_bound`); a connection that erred, or
//!   that a branch used, is closed rather than handed to anyone else inside a transaction.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use pledge_proto::{ResourceId, Xid};
use pledge_sdk::journaled::{OnePhase, Resource, Sealed};
use pledge_sdk::{BranchError, Error, InDoubt, Outcome};
use pledge_sql::resource::{ActiveBranches, DatabaseSet};
use sqlx::mysql::{MySqlDatabaseError, MySqlPool};
use sqlx::pool::PoolConnection;
use sqlx::{AssertSqlSafe, MySql, Row};
use tokio::sync::OwnedSemaphorePermit;

use crate::MysqlConfig;
use crate::xid::{self, XaXid};

/// XAER_NOTA: the server holds no XA transaction with that XID.
pub const XAER_NOTA: u16 = 1397;
/// How long `XA COMMIT` / `XA ROLLBACK` of a branch is asked again while the session that
/// prepared it is still ending (the server refuses it from another session until then), and
/// how often.
const SESSION_END_WAIT: Duration = Duration::from_secs(2);
const SESSION_END_POLL: Duration = Duration::from_millis(20);

/// One database the adapter serves.
pub(crate) struct Database {
    pub id: ResourceId,
    pub pool: MySqlPool,
    /// Slots for active branches (`max_active_branches`), each holding a connection.
    active: ActiveBranches,
    /// Prepared branches still on the session that prepared them, for their XA COMMIT or XA
    /// ROLLBACK (at most `max_pinned`). MariaDB 10.11 was seen to lose track of prepared XA
    /// transactions whose session ended under load (XA COMMIT from another session answered
    /// "unknown XID" and XA RECOVER did not list them until the server restarted), so the normal
    /// path never detaches one: phase 2 runs on the session that prepared the branch.
    pinned: std::sync::Mutex<HashMap<XaXid, PoolConnection<MySql>>>,
    max_pinned: usize,
}

impl Database {
    pub fn new(id: ResourceId, pool: MySqlPool, max_active_branches: usize, max_pinned: usize) -> Database {
        Database {
            id,
            pool,
            active: ActiveBranches::new(max_active_branches),
            pinned: std::sync::Mutex::new(HashMap::new()),
            max_pinned,
        }
    }

    /// Keeps the session of a branch just prepared, if there is room.
    fn pin(&self, xa: XaXid, conn: PoolConnection<MySql>) -> Result<(), PoolConnection<MySql>> {
        let mut pinned = self.pinned.lock().expect("pinned sessions lock");
        if pinned.len() >= self.max_pinned {
            return Err(conn);
        }
        pinned.insert(xa, conn);
        Ok(())
    }

    fn unpin(&self, xa: &XaXid) -> Option<PoolConnection<MySql>> {
        self.pinned.lock().expect("pinned sessions lock").remove(xa)
    }
}

/// An active branch's connection, inside its XA transaction. Never returned to the pool: a
/// branch's connection ends with its transaction (closed after XA PREPARE, or after a
/// one-phase commit or a rollback), so no session state it set reaches anyone else.
pub struct BranchConn {
    conn: Option<PoolConnection<MySql>>,
    xa: XaXid,
    /// `CONNECTION_ID()`, in the vote metadata (for an operator matching the branch with the
    /// server's process list).
    session: u64,
    _active: OwnedSemaphorePermit,
}

impl BranchConn {
    /// Ends the branch's session and waits until the server has its goodbye: a prepared XA
    /// transaction can be committed from another session only once its own has ended.
    async fn close(mut self, bound: Duration) {
        if let Some(conn) = self.conn.take() {
            use sqlx::Connection;
            let _ = tokio::time::timeout(bound, conn.detach().close()).await;
        }
    }

    /// The connection, inside the branch's XA transaction.
    pub fn get(&mut self) -> &mut PoolConnection<MySql> {
        self.conn.as_mut().expect("a branch connection is present until its transaction ends")
    }

    /// The branch's XID.
    pub fn xa(&self) -> &XaXid {
        &self.xa
    }
}

impl Drop for BranchConn {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.as_mut() {
            // Closed, never pooled: the server rolls back an active XA transaction whose session
            // ends, and detaches a prepared one.
            conn.close_on_drop();
        }
    }
}

/// Every database of the adapter, as one [`Resource`].
pub struct Databases {
    pub(crate) config: MysqlConfig,
    pub(crate) databases: DatabaseSet<Database>,
}

/// How an XA transaction the server no longer holds ended, as far as the fence row tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Committed,
    NotCommitted,
    /// No fence row, but the branch is older than the fences' retention: it may have been
    /// deleted.
    Unknown,
}

/// The vote metadata of a branch: its XID and its session, readable in `pledge log inspect`.
pub fn metadata(xa: &XaXid, session: u64) -> Vec<u8> {
    format!("xid={xa} session={session}").into_bytes()
}

/// The XID in vote metadata written by [`metadata`].
pub fn xa_of(metadata: &[u8]) -> Option<XaXid> {
    let text = std::str::from_utf8(metadata).ok()?;
    let value = text.split_whitespace().find_map(|p| p.strip_prefix("xid="))?;
    let mut parts = value.split(':');
    let (format, gtrid, bqual) = (parts.next()?, parts.next()?, parts.next()?);
    if format.parse::<u32>().ok()? != xid::FORMAT_ID || parts.next().is_some() {
        return None;
    }
    let unhex = |h: &str| -> Option<Vec<u8>> {
        h.len()
            .is_multiple_of(2)
            .then(|| (0..h.len()).step_by(2).map(|i| u8::from_str_radix(h.get(i..i + 2)?, 16).ok()).collect())?
    };
    Some(XaXid { gtrid: unhex(gtrid)?, bqual: unhex(bqual)? })
}

/// How long the fence check waits for the branch's own fence row's lock, seconds.
const FENCE_LOCK_WAIT_S: u64 = 1;

/// An integer column, signed or not (servers differ on XA RECOVER's column types).
fn int_at(row: &sqlx::mysql::MySqlRow, i: usize) -> Result<i64, sqlx::Error> {
    row.try_get::<i64, _>(i).or_else(|_| row.try_get::<u64, _>(i).map(|n| i64::try_from(n).unwrap_or(i64::MAX)))
}

/// The MySQL error number of a failed statement, if the server answered with one.
pub(crate) fn error_number(e: &sqlx::Error) -> Option<u16> {
    e.as_database_error()?.try_downcast_ref::<MySqlDatabaseError>().map(MySqlDatabaseError::number)
}

/// A failed statement as a branch error: a deadlock or lock wait timeout (1213, 1205) is worth
/// retrying as a new transaction, a syntax or type error (SQLSTATE 42, 22) means the request is
/// wrong, others that the data does not allow it.
pub fn branch_error(e: &sqlx::Error) -> BranchError {
    match e.as_database_error().and_then(|d| d.try_downcast_ref::<MySqlDatabaseError>()) {
        Some(db) => {
            let message = format!("SQL error {}: {}", db.number(), db.message());
            match (db.number(), db.code().and_then(|c| c.get(..2))) {
                (1213 | 1205, _) | (_, Some("40")) => BranchError::Aborted(message),
                (_, Some("42" | "22")) => BranchError::Invalid(message),
                _ => BranchError::Refused(message),
            }
        }
        None => BranchError::Unavailable(e.to_string()),
    }
}

impl Databases {
    pub(crate) fn new(config: MysqlConfig, databases: HashMap<ResourceId, Arc<Database>>) -> Databases {
        Databases { config, databases: DatabaseSet::new(databases) }
    }

    /// Bound of every statement, client side: the server's lock wait timeout covers a server
    /// that works slowly, not one (or a network) that stopped answering.
    pub(crate) fn bound(&self) -> Duration {
        self.config.statement_timeout
    }

    /// `fut` within [`Databases::bound`]; a timeout is an error like a broken connection.
    pub(crate) async fn bounded<T>(&self, fut: impl Future<Output = Result<T, sqlx::Error>>) -> Result<T, sqlx::Error> {
        pledge_sql::bounded(self.bound(), fut).await
    }

    /// The XID of `xid`, for the configured coordinator.
    fn xa(&self, coordinator_id: &str, xid: &Xid) -> Result<XaXid, String> {
        if coordinator_id != self.config.coordinator_id {
            return Err(format!(
                "this adapter serves coordinator {:?} (its XA XIDs name it from XA START on), not {coordinator_id:?}",
                self.config.coordinator_id
            ));
        }
        XaXid::new(coordinator_id, xid)
    }

    /// Runs one XA control statement on a connection of the database's own (never a branch's),
    /// closed afterwards if it failed.
    async fn control(&self, db: &Database, sql: String) -> Result<(), sqlx::Error> {
        let mut conn = self.bounded(db.pool.acquire()).await?;
        let done = self.bounded(sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut *conn)).await;
        if done.is_err() {
            conn.close_on_drop();
        }
        done.map(drop)
    }

    /// Whether the branch's XA transaction committed, by its fence row, proven under a lock:
    /// an `abort` fence is inserted with a short lock wait. It goes in only if no transaction
    /// holds the branch's own fence row — so the branch did not commit, and can no longer: its
    /// row would collide. A duplicate is read back (`work`: committed; `abort`: an earlier
    /// check). A lock wait means the branch's XA transaction still holds its row somewhere
    /// (prepared but detached, or committing): `Err`, asked again later. Never a plain read,
    /// which cannot see a transaction that is still prepared.
    async fn fate(&self, db: &Database, xid: &Xid, xa: &XaXid) -> Result<Fate, Error> {
        let fail = |e: String| Error::new(format!("resource {}: the fence of {xa}: {e}", db.id));
        // A session of its own, closed afterwards: its lock wait setting must not reach others.
        let mut conn = self.bounded(db.pool.acquire()).await.map_err(|e| fail(e.to_string()))?.detach();
        let sql = format!(
            "SET SESSION innodb_lock_wait_timeout = {FENCE_LOCK_WAIT_S}; \
             INSERT INTO pledge_xa_fence (gtrid, bqual, kind) VALUES (X'{}', X'{}', 'abort')",
            xid::hex(&xa.gtrid),
            xid::hex(&xa.bqual)
        );
        let inserted = self.bounded(sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut conn)).await;
        let kind: Option<String> = match &inserted {
            Err(e) if error_number(e) == Some(1062) => self
                .bounded(
                    sqlx::query_scalar("SELECT kind FROM pledge_xa_fence WHERE gtrid = ? AND bqual = ?")
                        .bind(&xa.gtrid)
                        .bind(&xa.bqual)
                        .fetch_optional(&mut conn),
                )
                .await
                .map_err(|e| fail(e.to_string()))?,
            _ => None,
        };
        {
            use sqlx::Connection;
            let _ = tokio::time::timeout(self.bound(), conn.close()).await;
        }
        let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
        let retained_since_ms = now_ms.saturating_sub(self.config.fence_retention.as_millis()) as u64;
        match inserted {
            // Past the retention its `work` row may have been deleted: nothing proves it.
            Ok(_) if xid.gtid.unix_ms().is_none_or(|t| t < retained_since_ms) => Ok(Fate::Unknown),
            Ok(_) => Ok(Fate::NotCommitted),
            Err(_) if kind.as_deref() == Some("work") => Ok(Fate::Committed),
            Err(_) if kind.is_some() => Ok(Fate::NotCommitted),
            Err(e) if error_number(&e) == Some(1205) => Err(fail(
                "its XA transaction still holds it (prepared in a session that has not ended, or committing); asking \
                 again"
                    .into(),
            )),
            Err(e) => Err(fail(e.to_string())),
        }
    }

    /// The XID the branch was prepared under: from its vote metadata when there is one (so a
    /// coordinator id changed since cannot make another), else this adapter's.
    fn recorded_xa(&self, xid: &Xid, metadata: &[u8]) -> Result<XaXid, Error> {
        if let Some(xa) = xa_of(metadata) {
            return Ok(xa);
        }
        XaXid::new(&self.config.coordinator_id, xid).map_err(Error)
    }

    /// The prepared XA transactions of the server, as (format id, gtrid, bqual).
    pub(crate) async fn xa_recover(&self, db: &Database) -> Result<Vec<(i64, Vec<u8>, Vec<u8>)>, sqlx::Error> {
        let rows = self.bounded(sqlx::raw_sql("XA RECOVER").fetch_all(&db.pool)).await?;
        let mut found = Vec::with_capacity(rows.len());
        for row in rows {
            let (format_id, gtrid_len, bqual_len) = (int_at(&row, 0)?, int_at(&row, 1)?, int_at(&row, 2)?);
            let data: Vec<u8> = row.try_get(3)?;
            let g = usize::try_from(gtrid_len).unwrap_or(usize::MAX).min(data.len());
            let b = usize::try_from(bqual_len).unwrap_or(usize::MAX).min(data.len() - g);
            found.push((format_id, data[..g].to_vec(), data[g..g + b].to_vec()));
        }
        Ok(found)
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
        let xa = self.xa(&self.config.coordinator_id, xid).map_err(BranchError::Invalid)?;
        let permit = db.active.take()?;
        let conn = self.bounded(db.pool.acquire()).await.map_err(|e| BranchError::Unavailable(e.to_string()))?;
        let mut open = BranchConn { conn: Some(conn), xa, session: 0, _active: permit };
        // One message: start the XA transaction, insert its fence (committed with the branch,
        // so it exists iff the branch committed), and learn the session's id.
        let sql = format!(
            "XA START {}; INSERT INTO pledge_xa_fence (gtrid, bqual) VALUES (X'{}', X'{}'); SELECT CONNECTION_ID()",
            open.xa.sql(),
            xid::hex(&open.xa.gtrid),
            xid::hex(&open.xa.bqual)
        );
        let rows = self.bounded(sqlx::raw_sql(AssertSqlSafe(sql)).fetch_all(&mut **open.get())).await;
        open.session = match rows.as_deref() {
            Ok([row]) => int_at(row, 0).map_err(|e| BranchError::Unavailable(e.to_string()))? as u64,
            Ok(rows) => return Err(BranchError::Unavailable(format!("XA START answered {} rows", rows.len()))),
            // A duplicate fence: the branch ran here before and committed (or another session
            // holds its XID).
            Err(e) if matches!(error_number(e), Some(1062 | 1440)) => {
                return Err(BranchError::Finished { state: "finished or in use", reason: e.to_string() });
            }
            Err(e) => return Err(branch_error(e)),
        };
        Ok(open)
    }

    async fn seal(&self, coordinator_id: &str, xid: &Xid, open: &mut BranchConn) -> Sealed {
        match self.xa(coordinator_id, xid) {
            Ok(xa) if xa == open.xa => Sealed::Ready { metadata: metadata(&open.xa, open.session) },
            Ok(_) => Sealed::Refused { reason: "the branch's XID does not match its coordinator".into() },
            Err(reason) => Sealed::Refused { reason },
        }
    }

    async fn prepare(&self, _coordinator_id: &str, xid: &Xid, mut open: BranchConn, _: &[u8]) -> Result<(), String> {
        let sql = format!("XA END {xa}; XA PREPARE {xa}", xa = open.xa.sql());
        let prepared = self.bounded(sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut **open.get())).await;
        fail::fail_point!("mysql::after_prepare");
        if prepared.is_ok()
            && let Some(db) = self.databases.get(&xid.resource)
        {
            // Kept for phase 2 on this very session (see `Database::pinned`).
            let conn = open.conn.take().expect("a branch connection is present until its transaction ends");
            match db.pin(open.xa.clone(), conn) {
                Ok(()) => return Ok(()),
                Err(conn) => {
                    tracing::warn!(resource = %db.id, max_pinned = db.max_pinned,
                        "too many prepared branches kept on their sessions; this one is detached");
                    open.conn = Some(conn);
                }
            }
        }
        // Closed: a prepared XA transaction stays at the server, detached from the session; an
        // active one is rolled back with it.
        open.close(self.bound()).await;
        prepared.map(drop).map_err(|e| match e {
            sqlx::Error::PoolTimedOut => format!(
                "XA PREPARE got no answer within {} ms (if it went through, the abort that follows rolls it back)",
                self.bound().as_millis()
            ),
            e => format!("XA PREPARE failed: {}", branch_error(&e)),
        })
    }

    async fn commit_one_phase(&self, _xid: &Xid, mut open: BranchConn, _metadata: &[u8]) -> OnePhase {
        let sql = format!("XA END {xa}; XA COMMIT {xa} ONE PHASE", xa = open.xa.sql());
        let result = self.bounded(sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut **open.get())).await;
        fail::fail_point!("mysql::after_one_phase_commit");
        drop(open);
        match result {
            Ok(_) => OnePhase::Committed,
            // The server refused and rolled back (XA_RB*, a deadlock, a lock wait): nothing
            // committed. Any other error may have come after the commit began: the fence tells.
            Err(e) if matches!(error_number(&e), Some(1402 | 1613 | 1614 | 1213 | 1205)) => {
                OnePhase::Aborted { reason: format!("commit failed: {}", branch_error(&e)) }
            }
            // The connection failed or stopped answering: the commit may or may not have happened.
            Err(e) => OnePhase::Unknown { error: format!("the connection failed during XA COMMIT ONE PHASE: {e}") },
        }
    }

    async fn rollback(&self, xid: &Xid, mut open: BranchConn) {
        let sql = format!("XA END {xa}; XA ROLLBACK {xa}", xa = open.xa.sql());
        if let Err(e) = self.bounded(sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut **open.get())).await {
            // Closing the session rolls the active XA transaction back all the same.
            tracing::info!(%xid, error = %e, "XA ROLLBACK failed; closing the branch's connection");
        }
    }

    /// The XID comes from the vote metadata (see [`Databases::recorded_xa`]), not from the
    /// asking coordinator's id.
    async fn finish(
        &self,
        _coordinator_id: &str,
        xid: &Xid,
        metadata: &[u8],
        commit: bool,
        recorded: bool,
    ) -> Result<Outcome, Error> {
        let db = self.databases.get_or_error(&xid.resource)?;
        let xa = self.recorded_xa(xid, metadata)?;
        let verb = if commit { "XA COMMIT" } else { "XA ROLLBACK" };
        // On the session that prepared it, when this process still has it.
        if let Some(mut conn) = db.unpin(&xa) {
            let done =
                self.bounded(sqlx::raw_sql(AssertSqlSafe(format!("{verb} {}", xa.sql()))).execute(&mut *conn)).await;
            // Closed, never pooled: whatever the branch's work set on the session (variables,
            // settings, locks) must not reach anyone else.
            {
                use sqlx::Connection;
                let _ = tokio::time::timeout(self.bound(), conn.detach().close()).await;
            }
            match done {
                Ok(_) if commit => return Ok(Outcome::Committed),
                Ok(_) => return Ok(Outcome::Aborted { reason: String::new() }),
                // From another session below; the fence check waits while this one's commit
                // may still be under way.
                Err(e) => {
                    tracing::info!(%xa, error = %e, "{verb} on the preparing session failed; asking from another")
                }
            }
        }
        // "Unknown XID" is also the answer while the session that prepared it has not quite
        // ended (its goodbye is handled by the server on its own time): the server still lists
        // it then. Asked again within a bound; only a transaction the server no longer holds
        // is settled by its fence.
        let started = std::time::Instant::now();
        loop {
            match self.control(db, format!("{verb} {}", xa.sql())).await {
                Ok(()) if commit => return Ok(Outcome::Committed),
                Ok(()) => return Ok(Outcome::Aborted { reason: String::new() }),
                // Unknown XID, or rolled back under it (XA_RBROLLBACK, XA_RBTIMEOUT,
                // XA_RBDEADLOCK): the fence tells.
                Err(e) if matches!(error_number(&e), Some(XAER_NOTA | 1402 | 1613 | 1614)) => {}
                Err(e) => return Err(Error::new(format!("{verb} of {xa} failed: {}", branch_error(&e)))),
            }
            let listed = self
                .xa_recover(db)
                .await
                .map_err(|e| Error::new(format!("resource {}: XA RECOVER failed: {e}", db.id)))?;
            if !listed.iter().any(|(f, g, b)| *f == i64::from(xid::FORMAT_ID) && *g == xa.gtrid && *b == xa.bqual) {
                break;
            }
            if started.elapsed() >= SESSION_END_WAIT {
                return Err(Error::new(format!(
                    "{verb} of {xa}: the server holds it prepared but will not finish it from another session (the \
                     one that prepared it has not ended within {} ms); asking again later",
                    SESSION_END_WAIT.as_millis()
                )));
            }
            tokio::time::sleep(SESSION_END_POLL).await;
        }
        // The server holds no such XA transaction (any more): its fence tells how it ended.
        let fate = self.fate(db, xid, &xa).await?;
        let outside = |what: &str, how: &str| format!("XA transaction {xa} was {what} outside Pledge ({how})");
        Ok(match (commit, fate) {
            (true, Fate::Committed) => Outcome::Committed, // a repeated commit
            (true, Fate::NotCommitted) if recorded => Outcome::HeuristicRollback {
                reason: outside("rolled back", "XA ROLLBACK by hand, or lost by the server"),
            },
            // No record here, nothing at the server: never prepared, or rolled back and its
            // record lost with the adapter's data directory; nothing proves which.
            (true, Fate::NotCommitted) => Outcome::HeuristicHazard {
                reason: format!("XA transaction {xa} is not at the server and this adapter has no record of it"),
            },
            (false, Fate::NotCommitted) => Outcome::Aborted { reason: String::new() },
            (false, Fate::Committed) => Outcome::HeuristicCommit { reason: outside("committed", "XA COMMIT by hand?") },
            (false, Fate::Unknown) if !recorded => Outcome::Aborted { reason: String::new() },
            (_, Fate::Unknown) => Outcome::HeuristicHazard {
                reason: format!(
                    "XA transaction {xa} is not at the server and is older than the fence rows' retention: nothing \
                     tells how it ended"
                ),
            },
        })
    }

    async fn resolve(&self, xid: &Xid, metadata: &[u8]) -> Result<Option<Outcome>, Error> {
        let db = self.databases.get_or_error(&xid.resource)?;
        let xa = self.recorded_xa(xid, metadata)?;
        // While the commit may be under way its fence row is locked: asked again later.
        let fate = match self.fate(db, xid, &xa).await {
            Ok(fate) => fate,
            Err(e) => {
                tracing::info!(%xa, error = %e, "the one-phase commit's outcome is not known yet");
                return Ok(None);
            }
        };
        Ok(Some(match fate {
            Fate::Committed => Outcome::Committed,
            Fate::NotCommitted => Outcome::Aborted { reason: "the one-phase XA COMMIT did not take effect".into() },
            Fate::Unknown => Outcome::HeuristicHazard {
                reason: "the answer to the one-phase commit was lost and its fence row is past its retention".into(),
            },
        }))
    }

    async fn in_doubt(
        &self,
        coordinator_id: &str,
        resource: &ResourceId,
        after: Option<&Xid>,
        limit: usize,
    ) -> Result<Vec<InDoubt>, Error> {
        let db = self.databases.get_or_error(resource)?;
        let listed = self
            .xa_recover(db)
            .await
            .map_err(|e| Error::new(format!("resource {resource}: XA RECOVER failed: {e}")))?;
        let key = |x: &Xid| (x.gtid, x.branch.clone());
        let mut ours: Vec<Xid> = listed
            .into_iter()
            .filter_map(|(format_id, gtrid, bqual)| XaXid::parse(coordinator_id, resource, format_id, &gtrid, &bqual))
            .filter(|x| after.is_none_or(|a| key(x) > key(a)))
            .collect();
        ours.sort_by_key(key);
        ours.truncate(limit);
        Ok(ours.into_iter().map(|xid| InDoubt { xid, metadata: Vec::new(), prepared_unix_ms: 0 }).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vote_metadata_carries_the_xid_and_the_session() {
        let xa = XaXid { gtrid: b"c:g\x00\xff".to_vec(), bqual: b"b".to_vec() };
        let m = metadata(&xa, 4_294_967_301);
        assert!(std::str::from_utf8(&m).unwrap().ends_with(" session=4294967301"));
        assert_eq!(xa_of(&m), Some(xa));
        assert_eq!(xa_of(b"garbage"), None);
        assert_eq!(xa_of(b"xid=1:00:00"), None, "another format id");
        assert_eq!(xa_of(b"xid=1347175495:0:00"), None, "odd hex");
    }
}
