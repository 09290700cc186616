//! `pledge.v1.PostgresBranch`: run SQL inside a branch, for services in any language.
//!
//! The request checks, the statement loop and its bounds are `pledge_sql::execute`'s; this module
//! says what the database decides (its `Dialect`).

use pledge_proto::v1::{self, postgres_branch_server::PostgresBranch, value::Kind};
use pledge_proto::{BranchId, Gtid, ResourceId};
use pledge_sql::execute::{self, SqlQuery};
use sqlx::postgres::{PgQueryResult, PgRow, PgTypeInfo};
use sqlx::{Column, Postgres, Row, TypeInfo};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use pledge_sdk::{BranchError, status_of};

use crate::PostgresParticipant;
use crate::resource::branch_error;

pub use pledge_sql::execute::{MAX_RESULT_BYTES, MAX_ROWS_PER_STATEMENT, MAX_STATEMENTS_PER_CALL};

/// Longest request id (the dedup table's key).
pub const MAX_REQUEST_ID_BYTES: usize = 200;

/// Why a statement may not run in a branch, if it may not: the command it starts with, and the
/// reason. Checked on the statement's first words (after comments), which is what decides its
/// kind in PostgreSQL's grammar.
///
/// * Transaction control (`BEGIN`, `COMMIT`, `ROLLBACK`, `PREPARE TRANSACTION`, ...): the
///   coordinator decides how the branch's transaction ends.
/// * `SET`/`RESET SESSION AUTHORIZATION`: the branch must stay in the adapter's session user
///   (`SET ROLE` is fine: the adapter takes its own role back before preparing, and resets it
///   before the connection serves anyone else).
/// * `LISTEN`, `UNLISTEN`, `NOTIFY`: a prepared transaction cannot carry them.
/// * `PREPARE name AS`, `DEALLOCATE`, `DISCARD`: they outlive the branch, or tear down the
///   adapter's own session state; pass parameters instead.
pub fn refused_statement(sql: &str) -> Option<(String, &'static str)> {
    let mut words = execute::leading_words(sql, &["--"]);
    let first = words.next()?;
    let second = words.next().unwrap_or_default();
    let third = words.next().unwrap_or_default();
    const ENDS: &str = "the coordinator decides how the transaction ends";
    let why = match (first.as_str(), second.as_str()) {
        ("BEGIN" | "START" | "COMMIT" | "END" | "ABORT", _) => ENDS,
        // ROLLBACK TO SAVEPOINT stays inside the transaction.
        ("ROLLBACK", s) if s != "TO" => ENDS,
        ("PREPARE", "TRANSACTION") => ENDS,
        ("SET" | "RESET", "SESSION") if third == "AUTHORIZATION" => {
            "the branch must run as the adapter's session user (SET ROLE is allowed)"
        }
        ("LISTEN" | "UNLISTEN" | "NOTIFY", _) => "a prepared transaction cannot carry notifications",
        ("PREPARE" | "DEALLOCATE" | "DISCARD", _) => {
            "it outlives the branch or drops the adapter's session state; pass parameters instead"
        }
        _ => return None,
    };
    let command = match (second.is_empty(), first.as_str()) {
        (true, _) => first,
        (false, "SET" | "RESET") if second == "SESSION" => format!("{first} {second} {third}"),
        (false, _) => format!("{first} {second}"),
    };
    Some((command, why))
}

pub struct BranchService {
    participant: PostgresParticipant,
}

impl BranchService {
    pub fn new(participant: PostgresParticipant) -> Self {
        BranchService { participant }
    }
}

/// A NULL parameter with no declared type (OID 0), so PostgreSQL infers it from the statement
/// instead of insisting on text.
struct UntypedNull;

impl sqlx::Type<Postgres> for UntypedNull {
    fn type_info() -> PgTypeInfo {
        PgTypeInfo::with_oid(sqlx::postgres::types::Oid(0))
    }
}

impl sqlx::Encode<'_, Postgres> for UntypedNull {
    fn encode_by_ref(
        &self,
        _buf: &mut sqlx::postgres::PgArgumentBuffer,
    ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
        Ok(sqlx::encode::IsNull::Yes)
    }
}

/// PostgreSQL's side of Execute (see `pledge_sql::execute`).
struct PgDialect;

impl execute::Dialect for PgDialect {
    type Db = Postgres;

    fn refused_statement(sql: &str) -> Option<(String, &'static str)> {
        refused_statement(sql)
    }

    fn bind<'q>(query: SqlQuery<'q, Postgres>, i: usize, value: v1::Value) -> Result<SqlQuery<'q, Postgres>, Status> {
        Ok(match value.kind {
            None => return Err(Status::invalid_argument(format!("params[{i}]: a value needs a kind"))),
            Some(Kind::Null(_)) => query.bind(UntypedNull),
            Some(Kind::Bool(b)) => query.bind(b),
            Some(Kind::Int(n)) => query.bind(n),
            Some(Kind::Float(x)) => query.bind(x),
            Some(Kind::Text(s)) => query.bind(s),
            Some(Kind::Bytes(b)) => query.bind(b),
        })
    }

    fn column_value(row: &PgRow, i: usize) -> Result<v1::Value, String> {
        let column = &row.columns()[i];
        let type_name = column.type_info().name().to_string();
        let get = |e: sqlx::Error| format!("column {:?}: {e}", column.name());
        let kind = match type_name.as_str() {
            "BOOL" => row.try_get::<Option<bool>, _>(i).map_err(get)?.map(Kind::Bool),
            "INT2" => row.try_get::<Option<i16>, _>(i).map_err(get)?.map(|n| Kind::Int(n.into())),
            "INT4" => row.try_get::<Option<i32>, _>(i).map_err(get)?.map(|n| Kind::Int(n.into())),
            "INT8" => row.try_get::<Option<i64>, _>(i).map_err(get)?.map(Kind::Int),
            "FLOAT4" => row.try_get::<Option<f32>, _>(i).map_err(get)?.map(|x| Kind::Float(x.into())),
            "FLOAT8" => row.try_get::<Option<f64>, _>(i).map_err(get)?.map(Kind::Float),
            "TEXT" | "VARCHAR" | "BPCHAR" | "NAME" => row.try_get::<Option<String>, _>(i).map_err(get)?.map(Kind::Text),
            "BYTEA" => row.try_get::<Option<Vec<u8>>, _>(i).map_err(get)?.map(Kind::Bytes),
            "UUID" => row.try_get::<Option<uuid::Uuid>, _>(i).map_err(get)?.map(|u| Kind::Text(u.to_string())),
            other => {
                return Err(format!(
                    "column {:?} has type {other}, which Execute does not return; cast it in the query (e.g. ::text)",
                    column.name()
                ));
            }
        };
        Ok(v1::Value { kind: Some(kind.unwrap_or(Kind::Null(true))) })
    }

    fn branch_error(e: &sqlx::Error) -> BranchError {
        branch_error(e)
    }

    fn rows_affected(done: &PgQueryResult) -> u64 {
        done.rows_affected()
    }
}

#[tonic::async_trait]
impl PostgresBranch for BranchService {
    async fn execute(&self, request: Request<v1::ExecuteRequest>) -> Result<Response<v1::ExecuteResponse>, Status> {
        pledge_proto::metrics::observe("Execute", async {
            let r = request.into_inner();
            let (resource, gtid, branch) = execute::branch_of(&r)?;
            let span = tracing::debug_span!("execute", resource = %resource, %gtid, branch = %branch);
            // Detached, like every branch operation (see `pledge_sdk::server::detached`): a
            // deadline must not stop it between taking the branch's connection and putting it back.
            let participant = self.participant.clone();
            let work =
                execute_in_branch(participant, resource, gtid, branch, r.request_id, r.statements).instrument(span);
            pledge_sdk::server::detached(work).await?
        })
        .await
    }
}

async fn execute_in_branch(
    participant: PostgresParticipant,
    resource: ResourceId,
    gtid: Gtid,
    branch: BranchId,
    request_id: String,
    statements: Vec<v1::Statement>,
) -> Result<Response<v1::ExecuteResponse>, Status> {
    // Everything that can be checked without the database is checked first, so a request
    // refused as invalid has changed nothing: not run a statement, not opened the branch.
    if request_id.len() > MAX_REQUEST_ID_BYTES {
        return Err(Status::invalid_argument(format!("request_id: must be at most {MAX_REQUEST_ID_BYTES} bytes")));
    }
    let queries = execute::queries::<PgDialect>(statements)?;
    let mut guard = participant.branch(&resource, gtid, branch).await.map_err(|e| status_of(&e))?;
    if !request_id.is_empty() {
        guard.claim_request(&request_id).await.map_err(|e| status_of(&e))?;
    }
    match execute::run_all::<PgDialect>(queries, guard.conn(), participant.statement_bound()).await {
        Ok(results) => Ok(Response::new(v1::ExecuteResponse { results })),
        Err(failed) => {
            // PostgreSQL has aborted the transaction (or the connection is in doubt): the branch
            // is over.
            guard.fail(failed.reason()).await;
            Err(failed.status())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::refused_statement;

    fn command(sql: &str) -> Option<String> {
        refused_statement(sql).map(|(command, _)| command)
    }

    #[test]
    fn statements_that_must_not_run_in_a_branch_are_recognised() {
        assert_eq!(command("commit").as_deref(), Some("COMMIT"));
        let begin = "  /* x */ -- y\n BEGIN ISOLATION LEVEL SERIALIZABLE";
        assert_eq!(command(begin).as_deref(), Some("BEGIN ISOLATION"));
        assert_eq!(command("PREPARE TRANSACTION 'x'").as_deref(), Some("PREPARE TRANSACTION"));
        assert_eq!(command("rollback").as_deref(), Some("ROLLBACK"));
        assert_eq!(command("set session authorization bob").as_deref(), Some("SET SESSION AUTHORIZATION"));
        assert_eq!(command("LISTEN ch").as_deref(), Some("LISTEN CH"));
        assert_eq!(command("PREPARE q AS SELECT 1").as_deref(), Some("PREPARE Q"));
        assert_eq!(command("DISCARD ALL").as_deref(), Some("DISCARD ALL"));
        assert_eq!(command("ROLLBACK TO SAVEPOINT s"), None);
        assert_eq!(command("SET ROLE app"), None);
        assert_eq!(command("SET statement_timeout = 5"), None);
        assert_eq!(command("SET SESSION statement_timeout = 5"), None);
        assert_eq!(command("UPDATE t SET commit = 1"), None);
        assert_eq!(command("SELECT 'BEGIN'"), None);
    }
}
