//! The MySQL/MariaDB adapter as a process, and its work API, for tests against the real
//! MariaDB the project's scripts start (see [`crate::mariadb`]).

use pledge_proto::v1::{self, mysql_branch_client::MysqlBranchClient};
use sqlx::MySqlPool;
use tokio::process::Command;
use tonic::transport::Channel;

use crate::mariadb::mariadb_url;
use crate::{Process, TestDir, bin};

impl TestDir {
    /// A MySQL adapter for `coordinator_id` serving `resources` (resource id, database URL),
    /// with its journal in `<dir>/<name>` (a restart under the same name finds it again).
    pub async fn mysql_adapter(
        &self,
        name: &str,
        port: u16,
        coordinator_id: &str,
        resources: &[(&str, String)],
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Process {
        let mut c = Command::new(bin("pledge-mysql-adapter"));
        c.arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--coordinator-id")
            .arg(coordinator_id)
            .arg("--data-dir")
            .arg(self.path().join(name))
            .args(args)
            .env("RUST_LOG", "info");
        for (id, url) in resources {
            c.arg("--resource").arg(format!("{id}={url}"));
        }
        for (k, v) in env {
            c.env(k, v);
        }
        let log = self.path().join(format!("{name}.log"));
        Process::spawn(name, c, log).await.unwrap_or_else(|e| panic!("{e:#}"))
    }
}

/// A pool on MariaDB database `db` ('a' or 'b').
pub async fn mysql_pool(db: char) -> MySqlPool {
    MySqlPool::connect(&mariadb_url(db)).await.expect("connecting to the test MariaDB")
}

pub async fn mysql_client(p: &Process) -> MysqlBranchClient<Channel> {
    MysqlBranchClient::connect(p.endpoint()).await.unwrap()
}

/// Runs one statement (`?` placeholders) in branch (gtid, branch) at `resource`.
pub async fn mysql_execute(
    c: &mut MysqlBranchClient<Channel>,
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
