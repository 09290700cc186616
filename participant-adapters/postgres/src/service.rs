//! `pledge.v1.PostgresBranch`: run SQL inside a branch, for services in any language.

use pledge_proto::v1::{self, postgres_branch_server::PostgresBranch, value::Kind};
use pledge_proto::{BranchId, Gtid, ResourceId};
use sqlx::postgres::{PgArguments, PgRow, PgTypeInfo};
use sqlx::query::Query;
use sqlx::{AssertSqlSafe, Column, Postgres, Row, TypeInfo};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use pledge_sdk::{BranchError, status_of};

use crate::PostgresParticipant;
use crate::resource::branch_error;

/// Longest request id (the dedup table's key).
pub const MAX_REQUEST_ID_BYTES: usize = 200;
/// Most statements in one Execute call.
pub const MAX_STATEMENTS_PER_CALL: usize = 100;
/// Most rows returned per statement (a branch API, not a bulk export).
pub const MAX_ROWS_PER_STATEMENT: usize = 10_000;
/// Largest answer of one Execute call, in bytes (values counted by their encoded size).
pub const MAX_RESULT_BYTES: usize = 4 << 20;

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
    let mut rest = sql.trim_start();
    // Skip leading comments.
    loop {
        if let Some(after) = rest.strip_prefix("--") {
            rest = after.split_once('\n').map_or("", |(_, r)| r).trim_start();
        } else if let Some(after) = rest.strip_prefix("/*") {
            rest = after.split_once("*/").map_or("", |(_, r)| r).trim_start();
        } else {
            break;
        }
    }
    let mut words = rest.split(|c: char| !c.is_ascii_alphanumeric() && c != '_').filter(|w| !w.is_empty());
    let first = words.next()?.to_ascii_uppercase();
    let second = words.next().map(|w| w.to_ascii_uppercase()).unwrap_or_default();
    let third = words.next().map(|w| w.to_ascii_uppercase()).unwrap_or_default();
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

fn bind<'q>(
    query: Query<'q, Postgres, PgArguments>,
    i: usize,
    value: v1::Value,
) -> Result<Query<'q, Postgres, PgArguments>, Status> {
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

#[tonic::async_trait]
impl PostgresBranch for BranchService {
    async fn execute(&self, request: Request<v1::ExecuteRequest>) -> Result<Response<v1::ExecuteResponse>, Status> {
        pledge_proto::metrics::observe("Execute", async {
            let r = request.into_inner();
            let invalid = |e: pledge_proto::IdError| Status::invalid_argument(e.to_string());
            let resource = ResourceId::parse_field("resource_id", &r.resource_id).map_err(invalid)?;
            let gtid = Gtid::parse_field("gtid", &r.gtid).map_err(invalid)?;
            let branch = BranchId::parse_field("branch_id", &r.branch_id).map_err(invalid)?;
            if r.statements.is_empty() || r.statements.len() > MAX_STATEMENTS_PER_CALL {
                return Err(Status::invalid_argument(format!("statements: 1 to {MAX_STATEMENTS_PER_CALL} per call")));
            }
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
    if let Some((n, (command, why))) =
        statements.iter().enumerate().find_map(|(n, st)| refused_statement(&st.sql).map(|c| (n, c)))
    {
        return Err(Status::invalid_argument(format!("statements[{n}]: {command} is not allowed in a branch: {why}")));
    }
    let mut queries = Vec::with_capacity(statements.len());
    for (n, statement) in statements.into_iter().enumerate() {
        let mut query = sqlx::query(AssertSqlSafe(statement.sql));
        for (i, param) in statement.params.into_iter().enumerate() {
            query = bind(query, i, param)
                .map_err(|s| Status::invalid_argument(format!("statements[{n}].{}", s.message())))?;
        }
        queries.push(query);
    }
    let mut guard = participant.branch(&resource, gtid, branch).await.map_err(|e| status_of(&e))?;
    if !request_id.is_empty() {
        guard.claim_request(&request_id).await.map_err(|e| status_of(&e))?;
    }
    let mut results = Vec::with_capacity(queries.len());
    let mut result_bytes = 0usize;
    let bound = participant.statement_bound();
    for (n, query) in queries.into_iter().enumerate() {
        let ran = tokio::time::timeout(bound, run(query, guard.conn(), &mut result_bytes)).await;
        let e = match ran {
            Ok(Ok(result)) => {
                results.push(result);
                continue;
            }
            Ok(Err(e)) => e,
            Err(_) => RunError::Sql(BranchError::Unavailable(format!(
                "the database did not answer within {} ms",
                bound.as_millis()
            ))),
        };
        // PostgreSQL has aborted the transaction (or the connection is in doubt): the branch
        // is over.
        guard.fail(format!("statements[{n}]: {e}")).await;
        let error = match e {
            RunError::Sql(e) => e,
            RunError::Result(message) => BranchError::Refused(message),
        };
        let status = status_of(&error);
        return Err(Status::new(status.code(), format!("statements[{n}]: {}", status.message())));
    }
    Ok(Response::new(v1::ExecuteResponse { results }))
}

enum RunError {
    Sql(BranchError),
    Result(String),
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::Sql(e) => write!(f, "{e}"),
            RunError::Result(m) => f.write_str(m),
        }
    }
}

async fn run(
    query: Query<'_, Postgres, PgArguments>,
    conn: &mut sqlx::PgConnection,
    result_bytes: &mut usize,
) -> Result<v1::StatementResult, RunError> {
    use futures::TryStreamExt;
    // `fetch_many` is deprecated for running several statements in one prepared statement;
    // here it runs exactly one, and is the only call that yields both rows and the
    // affected-row count of a statement whose kind we do not know in advance.
    #[allow(deprecated)]
    let mut stream = query.fetch_many(conn);
    let mut result = v1::StatementResult::default();
    while let Some(item) = stream.try_next().await.map_err(|e| RunError::Sql(branch_error(&e)))? {
        match item {
            sqlx::Either::Left(done) => result.rows_affected += done.rows_affected(),
            sqlx::Either::Right(row) => {
                if result.columns.is_empty() {
                    result.columns = row.columns().iter().map(|c| c.name().to_string()).collect();
                }
                if result.rows.len() >= MAX_ROWS_PER_STATEMENT {
                    return Err(RunError::Result(format!("more than {MAX_ROWS_PER_STATEMENT} rows; add a LIMIT")));
                }
                let values = (0..row.len())
                    .map(|i| column_value(&row, i))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(RunError::Result)?;
                *result_bytes += values.iter().map(prost::Message::encoded_len).sum::<usize>();
                if *result_bytes > MAX_RESULT_BYTES {
                    return Err(RunError::Result(format!("the answer would exceed {MAX_RESULT_BYTES} bytes")));
                }
                result.rows.push(v1::Row { values });
            }
        }
    }
    Ok(result)
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
