//! `pledge.v1.MysqlBranch`: run SQL inside a branch, for services in any language.
//!
//! The request checks, the statement loop and its bounds are `pledge_sql::execute`'s; this module
//! says what the database decides (its `Dialect`).

use pledge_proto::v1::{self, mysql_branch_server::MysqlBranch, value::Kind};
use pledge_proto::{BranchId, Gtid, ResourceId};
use pledge_sdk::{BranchError, status_of};
use pledge_sql::execute::{self, SqlQuery};
use sqlx::mysql::{MySqlQueryResult, MySqlRow};
use sqlx::{Column, MySql, Row, TypeInfo};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::MysqlParticipant;
use crate::resource::branch_error;

pub use pledge_sql::execute::{MAX_RESULT_BYTES, MAX_ROWS_PER_STATEMENT, MAX_STATEMENTS_PER_CALL};

/// Why a statement may not run in a branch, if it may not: its first words, and the reason.
/// The server itself refuses statements that would commit implicitly inside an XA transaction
/// (DDL, LOCK TABLES); these are the ones that would end or change the transaction.
pub fn refused_statement(sql: &str) -> Option<(String, &'static str)> {
    let mut words = execute::leading_words(sql, &["--", "#"]);
    let first = words.next()?;
    let second = words.next().unwrap_or_default();
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

/// MySQL's side of Execute (see `pledge_sql::execute`).
struct MysqlDialect;

impl execute::Dialect for MysqlDialect {
    type Db = MySql;

    fn refused_statement(sql: &str) -> Option<(String, &'static str)> {
        refused_statement(sql)
    }

    fn bind<'q>(query: SqlQuery<'q, MySql>, i: usize, value: v1::Value) -> Result<SqlQuery<'q, MySql>, Status> {
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

    fn branch_error(e: &sqlx::Error) -> BranchError {
        branch_error(e)
    }

    fn rows_affected(done: &MySqlQueryResult) -> u64 {
        done.rows_affected()
    }
}

#[tonic::async_trait]
impl MysqlBranch for BranchService {
    async fn execute(&self, request: Request<v1::ExecuteRequest>) -> Result<Response<v1::ExecuteResponse>, Status> {
        pledge_proto::metrics::observe("Execute", async {
            let r = request.into_inner();
            let (resource, gtid, branch) = execute::branch_of(&r)?;
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
    let queries = execute::queries::<MysqlDialect>(statements)?;
    let mut guard = participant.branch(&resource, gtid, branch).await.map_err(|e| status_of(&e))?;
    match execute::run_all::<MysqlDialect>(queries, guard.conn(), participant.statement_bound()).await {
        Ok(results) => Ok(Response::new(v1::ExecuteResponse { results })),
        Err(failed) => {
            // A failed statement may have rolled back part of the XA transaction, or all of it
            // (a deadlock does): the branch is over.
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
