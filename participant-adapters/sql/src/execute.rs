//! The `Execute` call of `pledge.v1.PostgresBranch` and `pledge.v1.MysqlBranch`: run SQL inside
//! a branch, for services in any language. What the database decides (which statements a branch
//! refuses, how parameters bind, how column types map, what a failed statement means) is the
//! adapter's [`Dialect`]; the rest is here:
//!
//! 1. [`branch_of`]: the request's branch and statement count, checked on receipt.
//! 2. [`queries`]: every statement checked and its parameters bound before the branch is opened,
//!    so a request refused as invalid has changed nothing.
//! 3. [`run_all`]: the statements run in order on the branch's connection, each within the
//!    statement bound, their answers bounded by [`MAX_ROWS_PER_STATEMENT`] and
//!    [`MAX_RESULT_BYTES`]. The first that fails ends the run ([`Failed`]), and the adapter fails
//!    the branch.

use std::time::Duration;

use pledge_proto::v1;
use pledge_proto::{BranchId, Gtid, ResourceId};
use pledge_sdk::{BranchError, status_of};
use sqlx::query::Query;
use sqlx::{AssertSqlSafe, Column, Database, Executor, Row};
use tonic::Status;

/// Most statements in one Execute call.
pub const MAX_STATEMENTS_PER_CALL: usize = 100;
/// Most rows returned per statement (a branch API, not a bulk export).
pub const MAX_ROWS_PER_STATEMENT: usize = 10_000;
/// Largest answer of one Execute call, in bytes (values counted by their encoded size).
pub const MAX_RESULT_BYTES: usize = 4 << 20;

/// A statement of database `DB` with its parameters bound.
pub type SqlQuery<'q, DB> = Query<'q, DB, <DB as Database>::Arguments>;

/// What one database decides about the statements an Execute call runs.
pub trait Dialect {
    /// The sqlx database.
    type Db: Database<Arguments: sqlx::IntoArguments<Self::Db>>;

    /// Why `sql` may not run in a branch, if it may not: the command it starts with, and the
    /// reason (read its first words with [`leading_words`]).
    fn refused_statement(sql: &str) -> Option<(String, &'static str)>;

    /// `query` with `value` bound as its parameter `i` (counted from 0, for the error:
    /// `params[i]: …`).
    fn bind<'q>(query: SqlQuery<'q, Self::Db>, i: usize, value: v1::Value) -> Result<SqlQuery<'q, Self::Db>, Status>;

    /// Column `i` of `row` as an Execute value; an error names the column (a type Execute does
    /// not return, a value out of range).
    fn column_value(row: &<Self::Db as Database>::Row, i: usize) -> Result<v1::Value, String>;

    /// A failed statement as a branch error.
    fn branch_error(e: &sqlx::Error) -> BranchError;

    /// The rows a statement changed.
    fn rows_affected(done: &<Self::Db as Database>::QueryResult) -> u64;
}

/// The branch an Execute request names, and the check of its statement count (1 to
/// [`MAX_STATEMENTS_PER_CALL`]): what can be refused before anything else is looked at.
pub fn branch_of(r: &v1::ExecuteRequest) -> Result<(ResourceId, Gtid, BranchId), Status> {
    let invalid = |e: pledge_proto::IdError| Status::invalid_argument(e.to_string());
    let resource = ResourceId::parse_field("resource_id", &r.resource_id).map_err(invalid)?;
    let gtid = Gtid::parse_field("gtid", &r.gtid).map_err(invalid)?;
    let branch = BranchId::parse_field("branch_id", &r.branch_id).map_err(invalid)?;
    if r.statements.is_empty() || r.statements.len() > MAX_STATEMENTS_PER_CALL {
        return Err(Status::invalid_argument(format!("statements: 1 to {MAX_STATEMENTS_PER_CALL} per call")));
    }
    Ok((resource, gtid, branch))
}

/// The first words of `sql`, upper-cased: what decides a statement's kind. Leading white space
/// and comments are skipped: `/* … */` and, to the end of the line, each of `line_comments`
/// (`--` everywhere, `#` too in MySQL). A word is a run of ASCII letters, digits and `_`.
pub fn leading_words<'a>(sql: &'a str, line_comments: &[&str]) -> impl Iterator<Item = String> + 'a {
    let mut rest = sql.trim_start();
    loop {
        if let Some(after) = line_comments.iter().find_map(|marker| rest.strip_prefix(marker)) {
            rest = after.split_once('\n').map_or("", |(_, r)| r).trim_start();
        } else if let Some(after) = rest.strip_prefix("/*") {
            rest = after.split_once("*/").map_or("", |(_, r)| r).trim_start();
        } else {
            break;
        }
    }
    rest.split(|c: char| !c.is_ascii_alphanumeric() && c != '_').filter(|w| !w.is_empty()).map(str::to_ascii_uppercase)
}

/// The request's statements with their parameters bound, once none is refused
/// ([`Dialect::refused_statement`]) and every parameter binds. Errors name the statement
/// (`statements[n]…`).
pub fn queries<'q, D: Dialect>(statements: Vec<v1::Statement>) -> Result<Vec<SqlQuery<'q, D::Db>>, Status> {
    if let Some((n, (command, why))) =
        statements.iter().enumerate().find_map(|(n, st)| D::refused_statement(&st.sql).map(|c| (n, c)))
    {
        return Err(Status::invalid_argument(format!("statements[{n}]: {command} is not allowed in a branch: {why}")));
    }
    let mut queries = Vec::with_capacity(statements.len());
    for (n, statement) in statements.into_iter().enumerate() {
        let mut query = sqlx::query(AssertSqlSafe(statement.sql));
        for (i, param) in statement.params.into_iter().enumerate() {
            query = D::bind(query, i, param)
                .map_err(|s| Status::invalid_argument(format!("statements[{n}].{}", s.message())))?;
        }
        queries.push(query);
    }
    Ok(queries)
}

/// The statement of an Execute call that failed (counted from 0), and why. The branch is over
/// then: the database may have rolled back part of its transaction or all of it, or the
/// connection is in doubt.
#[derive(Debug)]
pub struct Failed {
    /// Which statement failed.
    pub statement: usize,
    /// Why.
    pub error: BranchError,
}

impl Failed {
    /// The reason the branch fails with (and votes no with): `statements[n]: <error>`.
    pub fn reason(&self) -> String {
        format!("statements[{}]: {}", self.statement, self.error)
    }

    /// The answer to the Execute call: the error's status, its message naming the statement.
    pub fn status(&self) -> Status {
        let status = status_of(&self.error);
        Status::new(status.code(), format!("statements[{}]: {}", self.statement, status.message()))
    }
}

/// Runs `queries` in order on `conn` (the branch's connection, inside its transaction), each
/// within `bound` (no answer in time: [`BranchError::Unavailable`]), and returns their results;
/// stops at the first that fails.
pub async fn run_all<'q, D: Dialect>(
    queries: Vec<SqlQuery<'q, D::Db>>,
    conn: &mut <D::Db as Database>::Connection,
    bound: Duration,
) -> Result<Vec<v1::StatementResult>, Failed>
where
    for<'c> &'c mut <D::Db as Database>::Connection: Executor<'c, Database = D::Db>,
{
    let mut results = Vec::with_capacity(queries.len());
    let mut result_bytes = 0usize;
    for (n, query) in queries.into_iter().enumerate() {
        let error = match tokio::time::timeout(bound, run::<D>(query, &mut *conn, &mut result_bytes)).await {
            Ok(Ok(result)) => {
                results.push(result);
                continue;
            }
            Ok(Err(e)) => e,
            Err(_) => BranchError::Unavailable(format!("the database did not answer within {} ms", bound.as_millis())),
        };
        return Err(Failed { statement: n, error });
    }
    Ok(results)
}

/// Runs one statement and returns its rows (at most [`MAX_ROWS_PER_STATEMENT`]) and the rows it
/// changed. `result_bytes` counts the call's answer so far, at most [`MAX_RESULT_BYTES`]; past a
/// bound the statement fails with [`BranchError::Refused`].
async fn run<'q, D: Dialect>(
    query: SqlQuery<'q, D::Db>,
    conn: &mut <D::Db as Database>::Connection,
    result_bytes: &mut usize,
) -> Result<v1::StatementResult, BranchError>
where
    for<'c> &'c mut <D::Db as Database>::Connection: Executor<'c, Database = D::Db>,
{
    use futures::TryStreamExt;
    // `fetch_many` is deprecated for running several statements in one prepared statement;
    // here it runs exactly one, and is the only call that yields both rows and the
    // affected-row count of a statement whose kind is not known in advance.
    #[allow(deprecated)]
    let mut stream = query.fetch_many(conn);
    let mut result = v1::StatementResult::default();
    while let Some(item) = stream.try_next().await.map_err(|e| D::branch_error(&e))? {
        match item {
            sqlx::Either::Left(done) => result.rows_affected += D::rows_affected(&done),
            sqlx::Either::Right(row) => {
                if result.columns.is_empty() {
                    result.columns = row.columns().iter().map(|c| c.name().to_string()).collect();
                }
                if result.rows.len() >= MAX_ROWS_PER_STATEMENT {
                    return Err(BranchError::Refused(format!("more than {MAX_ROWS_PER_STATEMENT} rows; add a LIMIT")));
                }
                let values = (0..row.len())
                    .map(|i| D::column_value(&row, i))
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
    use super::*;

    fn words(sql: &str, line_comments: &[&str]) -> Vec<String> {
        leading_words(sql, line_comments).collect()
    }

    #[test]
    fn leading_comments_are_skipped_and_words_upper_cased() {
        assert_eq!(words("  /* x */ -- y\n begin isolation", &["--"]), ["BEGIN", "ISOLATION"]);
        assert_eq!(words("# y\n/* a */ xa_end 'x'", &["--", "#"]), ["XA_END", "X"]);
        assert_eq!(words("# y\ncommit", &["--"]), ["Y", "COMMIT"], "# is a comment only where named");
        assert!(words("-- only a comment", &["--"]).is_empty());
        assert!(words("/* unterminated", &["--"]).is_empty());
        assert!(words("", &["--"]).is_empty());
    }

    #[test]
    fn a_failed_statement_is_named_in_the_reason_and_the_status() {
        let failed = Failed { statement: 2, error: BranchError::Refused("more than 10000 rows; add a LIMIT".into()) };
        assert_eq!(failed.reason(), "statements[2]: more than 10000 rows; add a LIMIT");
        let status = failed.status();
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert_eq!(status.message(), "statements[2]: more than 10000 rows; add a LIMIT");
    }

    #[test]
    fn a_request_names_its_branch_and_one_to_the_most_statements() {
        let statement = v1::Statement { sql: "SELECT 1".into(), ..Default::default() };
        let mut r = v1::ExecuteRequest {
            resource_id: "orders".into(),
            gtid: "0190b5a0-0000-7000-8000-000000000000".into(),
            branch_id: "b1".into(),
            statements: vec![statement.clone()],
            ..Default::default()
        };
        let (resource, _, branch) = branch_of(&r).unwrap();
        assert_eq!((resource.to_string(), branch.to_string()), ("orders".into(), "b1".into()));
        r.statements = vec![statement; MAX_STATEMENTS_PER_CALL + 1];
        assert_eq!(branch_of(&r).unwrap_err().message(), "statements: 1 to 100 per call");
        r.statements.clear();
        assert_eq!(branch_of(&r).unwrap_err().code(), tonic::Code::InvalidArgument);
        r.resource_id = String::new();
        assert_eq!(branch_of(&r).unwrap_err().code(), tonic::Code::InvalidArgument);
    }
}
