//! Helpers for tests against the real PostgreSQL the project's scripts start: pools, the
//! adapter's work API, and a two-database bank.

use pledge_proto::v1::postgres_branch_client::PostgresBranchClient;
use pledge_proto::v1::{self, value::Kind};
use sqlx::PgPool;
use tonic::transport::Channel;

use crate::{Process, pg_url};

pub fn int(n: i64) -> v1::Value {
    v1::Value { kind: Some(Kind::Int(n)) }
}

pub fn text(s: &str) -> v1::Value {
    v1::Value { kind: Some(Kind::Text(s.into())) }
}

pub async fn pool(db: char) -> PgPool {
    PgPool::connect(&pg_url(db)).await.expect("connecting to the test database")
}

/// A table of accounts in both databases, named for the test so tests run in parallel.
pub struct Bank {
    pub table: String,
    pub a: PgPool,
    pub b: PgPool,
}

impl Bank {
    pub async fn new(name: &str, accounts: i64, balance: i64) -> Bank {
        let table = format!("acct_{name}_{}", fastrand::u32(..));
        let (a, b) = (pool('a').await, pool('b').await);
        for p in [&a, &b] {
            let ddl = format!("CREATE TABLE {table} (id int PRIMARY KEY, balance int NOT NULL CHECK (balance >= 0))");
            sqlx::query(sqlx::AssertSqlSafe(ddl)).execute(p).await.unwrap();
            let fill = format!("INSERT INTO {table} SELECT g, $1 FROM generate_series(1, $2) g");
            sqlx::query(sqlx::AssertSqlSafe(fill)).bind(balance as i32).bind(accounts as i32).execute(p).await.unwrap();
        }
        Bank { table, a, b }
    }

    pub async fn balance(&self, db: char, id: i64) -> i64 {
        let p = if db == 'a' { &self.a } else { &self.b };
        let sql = format!("SELECT balance::int8 FROM {} WHERE id = $1", self.table);
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).bind(id as i32).fetch_one(p).await.unwrap()
    }

    pub async fn total(&self) -> i64 {
        let sql = format!("SELECT coalesce(sum(balance), 0)::int8 FROM {}", self.table);
        let a: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.clone())).fetch_one(&self.a).await.unwrap();
        let b: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).fetch_one(&self.b).await.unwrap();
        a + b
    }

    pub fn update(&self) -> String {
        format!("UPDATE {} SET balance = balance + $1 WHERE id = $2", self.table)
    }
}

/// Prepared transactions of coordinator `coordinator_id` in either database.
pub async fn prepared_of(coordinator_id: &str) -> Vec<String> {
    let mut gids = Vec::new();
    for db in ['a', 'b'] {
        let p = pool(db).await;
        let found: Vec<String> = sqlx::query_scalar(
            "SELECT gid FROM pg_prepared_xacts WHERE database = current_database() AND starts_with(gid, $1)",
        )
        .bind(format!("pledge:{coordinator_id}:"))
        .fetch_all(&p)
        .await
        .unwrap();
        gids.extend(found);
    }
    gids
}

pub async fn execute(
    c: &mut PostgresBranchClient<Channel>,
    resource: &str,
    gtid: &str,
    branch: &str,
    sql: &str,
    params: Vec<v1::Value>,
) -> Result<v1::ExecuteResponse, tonic::Status> {
    c.execute(v1::ExecuteRequest {
        resource_id: resource.into(),
        gtid: gtid.into(),
        branch_id: branch.into(),
        statements: vec![v1::Statement { sql: sql.into(), params }],
        request_id: String::new(),
    })
    .await
    .map(tonic::Response::into_inner)
}

pub async fn branch_client(p: &Process) -> PostgresBranchClient<Channel> {
    PostgresBranchClient::connect(p.endpoint()).await.unwrap()
}
