//! What Pledge's SQL participants share, whatever the database: the PostgreSQL adapter
//! (`pledge-postgres`, branches as `PREPARE TRANSACTION`) and the MySQL/MariaDB adapter
//! (`pledge-mysql`, branches as XA transactions).
//!
//! Only logic that is the same for every database lives here; each adapter keeps what its
//! database decides (how a branch begins, prepares and ends, how errors and column types map,
//! which statements a branch refuses).
//!
//! * [`ResourceConfig`]: one database an adapter serves, and how the binaries parse it.
//! * [`connect_pool`]: the adapters' pool policy.
//! * [`bounded`]: the client-side bound of a statement.
//! * [`resource`]: the databases of an adapter by resource id, and their active-branch slots.
//! * [`execute`]: the `Execute` call of `PostgresBranch` and `MysqlBranch` (run SQL inside a
//!   branch), generic over a [`execute::Dialect`].
//!
//! It depends on sqlx's generic API only; the drivers are the adapters' business.

pub mod execute;
pub mod resource;

use std::time::Duration;

use pledge_proto::ResourceId;
use sqlx::pool::{Pool, PoolOptions};

/// One database an adapter serves.
#[derive(Debug, Clone)]
pub struct ResourceConfig {
    /// The resource id the coordinator knows the database by.
    pub id: ResourceId,
    /// The database's URL: postgres://user@host:port/database for the PostgreSQL adapter,
    /// mysql://user:password@host:port/database for the MySQL one.
    pub url: String,
    /// Connections to this database: active branches hold one each until prepared.
    pub max_connections: u32,
}

impl ResourceConfig {
    /// A database as the adapters' `--resource` flag gives it, `RESOURCE=URL`, with
    /// `max_connections` connections.
    pub fn parse(spec: &str, max_connections: u32) -> anyhow::Result<ResourceConfig> {
        let (id, url) =
            spec.split_once('=').ok_or_else(|| anyhow::anyhow!("--resource {spec:?}: expected RESOURCE=URL"))?;
        Ok(ResourceConfig { id: ResourceId::parse_field("resource", id)?, url: url.to_string(), max_connections })
    }
}

/// A pool of at most `max_connections` connections made with `options`, handing one out within
/// `acquire_timeout`.
///
/// No ping on every acquire: a broken connection fails its statement, and every failure path of
/// the adapters closes the connection instead of returning it.
pub async fn connect_pool<DB: sqlx::Database>(
    options: <DB::Connection as sqlx::Connection>::Options,
    max_connections: u32,
    acquire_timeout: Duration,
) -> Result<Pool<DB>, sqlx::Error> {
    PoolOptions::<DB>::new()
        .max_connections(max_connections)
        .acquire_timeout(acquire_timeout)
        .test_before_acquire(false)
        .connect_with(options)
        .await
}

/// `fut` within `bound`, client side: the server's own timeouts cover a server that works
/// slowly, not one (or a network) that stopped answering. A timeout is an error like a broken
/// connection ([`sqlx::Error::PoolTimedOut`]).
pub async fn bounded<T>(bound: Duration, fut: impl Future<Output = Result<T, sqlx::Error>>) -> Result<T, sqlx::Error> {
    tokio::time::timeout(bound, fut).await.unwrap_or(Err(sqlx::Error::PoolTimedOut))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resource_is_given_as_id_equals_url() {
        let r = ResourceConfig::parse("orders=postgres://app@db:5432/orders?x=y", 8).unwrap();
        assert_eq!(
            (r.id.to_string().as_str(), r.url.as_str(), r.max_connections),
            ("orders", "postgres://app@db:5432/orders?x=y", 8)
        );
        let e = ResourceConfig::parse("postgres://app@db/orders", 8).unwrap_err().to_string();
        assert_eq!(e, r#"--resource "postgres://app@db/orders": expected RESOURCE=URL"#);
        assert!(ResourceConfig::parse("not an id=postgres://db/x", 8).is_err());
    }

    #[tokio::test]
    async fn a_statement_past_its_bound_fails_like_a_broken_connection() {
        let never = std::future::pending::<Result<(), sqlx::Error>>();
        assert!(matches!(bounded(Duration::from_millis(1), never).await, Err(sqlx::Error::PoolTimedOut)));
        assert_eq!(bounded(Duration::from_secs(1), async { Ok(7) }).await.unwrap(), 7);
    }
}
