//! `pledge.v1.MysqlBranch`: run SQL inside a branch, for services in any language.

use pledge_proto::v1::{self, mysql_branch_server::MysqlBranch, value::Kind};
use pledge_proto::{BranchId, Gtid, ResourceId};
use pledge_sdk::{BranchError, status_of};
use sqlx::mysql::{MySqlArguments, MySqlRow};
use sqlx::query::Query;
use sqlx::{AssertSqlSafe, Column, MySql, Row, TypeInfo};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::MysqlParticipant;
use crate::resource::branch_error;

/// Most statements in one Execute call.
pub const MAX_STATEMENTS_PER_CALL: usize = 100;
/// Most rows returned per statement (a branch API, not a bulk export).
pub const MAX_ROWS_PER_STATEMENT: usize = 10_000;
/// Largest answer of one Execute call, in bytes (values counted by their encoded size).
pub const MAX_RESULT_BYTES: usize = 4 << 20;

/// Why a statement may not run in a branch, if it may not: its first words, and the reason.
/// The server itself refuses statements that would commit implicitly inside an XA transaction
/// (DDL, LOCK TABLES); these are the ones that would end or change the transaction.
pub fn refused_statement(sql: &str) -> Option<(String, &'static str)> {
    let mut rest = sql.trim_start();
    loop {
        if let Some(after) = rest.strip_prefix("--").or_else(|| rest.strip_prefix('#')) {
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
    const ENDS: &str = "the coordinator decides how the transaction ends";
    let why = match (first.as_str(), second.as_str()) {
        ("BEGIN" | "COMMIT" | "XA", _) | ("START", "TRANSACTION") => ENDS,
        // ROLLBACK TO SAVEPOINT stays inside the transaction.
        ("ROLLBACK", s) if s != "TO" => ENDS,
        ("SET", "AUTOCOMMIT" | "TRANSACTION" | "SESSION" | "GLOBAL") => {
            "it changes how the branch's transaction runs or the server; set what you need per statement"
        }
        _ => return None,
    };
    Some((if second.is_empty() { first } else { format!("{first} {second}") }, why))
}

pub struct BranchService {
    participant: MysqlParticipant,
}

impl BranchService {
    pub fn new(participant: MysqlParticipant) -> Self {
        BranchService { participant }
    }
}

fn bind<'q>(
    query: Query<'q, MySql, MySqlArguments>,
    i: usize,
    value: v1::Value,
) -> Result<Query<'q, MySql, MySqlArguments>, Status> {
    Ok(match value.kind {
        None => return Err(Status::invalid_argument(format!("params[{i}]: a value needs a kind"))),
        Some(Kind::Null(_)) => query.bind(None::<String>),
        Some(Kind::Bool(b)) => query.bind(b),
        Some(Kind::Int(n)) => query.bind(n),
        Some(Kind::Float(x)) => query.bind(x),
        Some(Kind::Text(s)) => query.bind(s),
        Some(Kind::Bytes(b)) => query.bind(b),
    })
}

fn column_value(row: &MySqlRow, i: usize) -> Result<v1::Value, String> {
    let column = &row.columns()[i];
    let type_name = column.type_info().name().to_string();
    let get = |e: sqlx::Error| format!("column {:?}: {e}", column.name());
    let kind = match type_name.as_str() {
        "BOOLEAN" => row.try_get::<Option<bool>, _>(i).map_err(get)?.map(Kind::Bool),
        t if t.ends_with("UNSIGNED") && t.contains("INT") => match row.try_get::<Option<u64>, _>(i).map_err(get)? {
            Some(n) => Some(Kind::Int(
                i64::try_from(n)
                    .map_err(|_| format!("column {:?}: {n} does not fit a signed 64-bit int", column.name()))?,
            )),
            None => None,
        },
        t if t.contains("INT") => row.try_get::<Option<i64>, _>(i).map_err(get)?.map(Kind::Int),
        "FLOAT" => row.try_get::<Option<f32>, _>(i).map_err(get)?.map(|x| Kind::Float(x.into())),
        "DOUBLE" => row.try_get::<Option<f64>, _>(i).map_err(get)?.map(Kind::Float),
        "VARCHAR" | "CHAR" | "TEXT" | "TINYTEXT" | "MEDIUMTEXT" | "LONGTEXT" | "ENUM" | "SET" | "JSON" => {
            row.try_get::<Option<String>, _>(i).map_err(get)?.map(Kind::Text)
        }
        "VARBINARY" | "BINARY" | "BLOB" | "TINYBLOB" | "MEDIUMBLOB" | "LONGBLOB" => {
            row.try_get::<Option<Vec<u8>>, _>(i).map_err(get)?.map(Kind::Bytes)
        }
        other => {
            return Err(format!(
                "column {:?} has type {other}, which Execute does not return; cast it in the query (CAST(… AS CHAR))",
                column.name()
            ));
        }
    };
    Ok(v1::Value { kind: Some(kind.unwrap_or(Kind::Null(true))) })
}

#[tonic::async_trait]
impl MysqlBranch for BranchService {
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
            if !r.request_id.is_empty() {
                return Err(Status::invalid_argument("request_id: the MySQL adapter does not take request ids"));
            }
            let span = tracing::debug_span!("execute", resource = %resource, %gtid, branch = %branch);
            // Detached, like every branch operation (see `pledge_sdk::server::detached`): a
            // deadline must not stop it between taking the branch's connection and putting it back.
            let work = execute_in_branch(self.participant.clone(), resource, gtid, branch, r.statements);
            pledge_sdk::server::detached(work.instrument(span)).await?
        })
        .await
    }
}

async fn execute_in_branch(
    participant: MysqlParticipant,
    resource: ResourceId,
    gtid: Gtid,
    branch: BranchId,
    statements: Vec<v1::Statement>,
) -> Result<Response<v1::ExecuteResponse>, Status> {
    // Everything that can be checked without the database is checked first, so a request
    // refused as invalid has changed nothing.
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
            Err(_) => BranchError::Unavailable(format!("the database did not answer within {} ms", bound.as_millis())),
        };
        // A failed statement may have rolled back part of the XA transaction, or all of it
        // (a deadlock does): the branch is over.
        guard.fail(format!("statements[{n}]: {e}")).await;
        let status = status_of(&e);
        return Err(Status::new(status.code(), format!("statements[{n}]: {}", status.message())));
    }
    Ok(Response::new(v1::ExecuteResponse { results }))
}

async fn run(
    query: Query<'_, MySql, MySqlArguments>,
    conn: &mut sqlx::MySqlConnection,
    result_bytes: &mut usize,
) -> Result<v1::StatementResult, BranchError> {
    use futures::TryStreamExt;
    // The only call that yields both rows and the affected-row count of a statement whose kind
    // is not known in advance (it runs exactly one statement here).
    #[allow(deprecated)]
    let mut stream = query.fetch_many(conn);
    let mut result = v1::StatementResult::default();
    while let Some(item) = stream.try_next().await.map_err(|e| branch_error(&e))? {
        match item {
            sqlx::Either::Left(done) => result.rows_affected += done.rows_affected(),
            sqlx::Either::Right(row) => {
                if result.columns.is_empty() {
                    result.columns = row.columns().iter().map(|c| c.name().to_string()).collect();
                }
                if result.rows.len() >= MAX_ROWS_PER_STATEMENT {
                    return Err(BranchError::Refused(format!("more than {MAX_ROWS_PER_STATEMENT} rows; add a LIMIT")));
                }
                let values = (0..row.len())
                    .map(|i| column_value(&row, i))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(BranchError::Refused)?;
                *result_bytes += values.iter().map(prost::Message::encoded_len).sum::<usize>();
                if *result_bytes > MAX_RESULT_BYTES {
                    return Err(BranchError::Refused(format!("the answer would exceed {MAX_RESULT_BYTES} bytes")));
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
    fn statements_that_would_end_the_branch_are_recognised() {
        assert_eq!(command("commit").as_deref(), Some("COMMIT"));
        assert_eq!(command("  /* x */ # y\n START TRANSACTION").as_deref(), Some("START TRANSACTION"));
        assert_eq!(command("XA END 'x'").as_deref(), Some("XA END"));
        assert_eq!(command("rollback").as_deref(), Some("ROLLBACK"));
        assert_eq!(command("SET autocommit = 1").as_deref(), Some("SET AUTOCOMMIT"));
        assert_eq!(command("ROLLBACK TO SAVEPOINT s"), None);
        assert_eq!(command("SAVEPOINT s"), None);
        assert_eq!(command("SET @x = 1"), None);
        assert_eq!(command("UPDATE t SET commit = 1"), None);
        assert_eq!(command("SELECT 'BEGIN'"), None);
    }
}
