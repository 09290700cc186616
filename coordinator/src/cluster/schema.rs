//! The store's schema: created and migrated by `pledge` itself, versioned.
//!
//! `pledge_schema` holds one row: the schema version, the cluster's shard count and its id
//! (the coordinator id participants see, shared by every instance). Each start takes that row
//! `FOR UPDATE`, so instances starting together migrate one at a time; a version newer than
//! this binary knows is refused (an older binary must not write a schema it does not
//! understand). The SQL keeps to what CockroachDB and YugabyteDB accept too.

use sqlx::postgres::PgPool;
use sqlx::{Postgres, Transaction};

/// The schema version this binary writes.
pub const SCHEMA_VERSION: i32 = 2;

/// What every instance of one cluster shares.
#[derive(Debug, Clone)]
pub struct ClusterInfo {
    pub shard_count: u16,
    /// The coordinator id participants key branches by (one for the whole cluster).
    pub cluster_id: String,
}

/// Steps from version N-1 to N, in order; index 0 makes version 1.
const MIGRATIONS: &[&[&str]] = &[
    &[
        // One lease per shard: `holder` owns it until `expires_at` (database time); `epoch` grows
        // with every new owner and is the fence every decision write checks.
        "CREATE TABLE pledge_lease (
        shard integer PRIMARY KEY,
        holder text,
        epoch bigint NOT NULL,
        expires_at timestamptz NOT NULL,
        forgotten_through_ms bigint NOT NULL DEFAULT 0
    )",
        // Instances alive (renewed with their leases) and where they take forwarded calls.
        "CREATE TABLE pledge_instance (
        id text PRIMARY KEY,
        address text NOT NULL,
        started_at timestamptz NOT NULL,
        expires_at timestamptz NOT NULL
    )",
        // The latest record of each transaction (a later record tells more: commit or one-phase
        // intent, then end), encoded as in the local log (`crate::records`).
        "CREATE TABLE pledge_decision (
        gtid uuid PRIMARY KEY,
        shard integer NOT NULL,
        kind smallint NOT NULL,
        epoch bigint NOT NULL,
        finished boolean NOT NULL,
        keep boolean NOT NULL,
        completed_ms bigint NOT NULL,
        record bytea NOT NULL
    )",
        "CREATE INDEX pledge_decision_shard ON pledge_decision (shard, finished, completed_ms)",
        "CREATE TABLE pledge_participant (
        resource text PRIMARY KEY,
        endpoint text NOT NULL,
        updated_at timestamptz NOT NULL
    )",
    ],
    &[
        // Operators' resolutions (`Resolve`): every one of a transaction, in order, beside its
        // latest record; forgotten with it. Written again after an unknown outcome: the digest
        // makes that a no-op.
        "CREATE TABLE pledge_resolution (
        id bigserial PRIMARY KEY,
        gtid uuid NOT NULL,
        shard integer NOT NULL,
        at_ms bigint NOT NULL,
        digest bytea NOT NULL,
        record bytea NOT NULL,
        UNIQUE (gtid, digest)
    )",
        "CREATE INDEX pledge_resolution_shard ON pledge_resolution (shard, gtid, at_ms, id)",
    ],
];

/// Creates or migrates the schema and returns the cluster's settings. `shards` and
/// `cluster_id` are used only when this call creates the cluster.
pub async fn prepare(pool: &PgPool, shards: u16, cluster_id: &str) -> anyhow::Result<ClusterInfo> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS pledge_schema (
            id integer PRIMARY KEY,
            version integer NOT NULL,
            shard_count integer NOT NULL,
            cluster_id text NOT NULL,
            created_at timestamptz NOT NULL
        )",
    )
    .execute(pool)
    .await?;
    sqlx::query(
        "INSERT INTO pledge_schema (id, version, shard_count, cluster_id, created_at)
         VALUES (1, 0, $1, $2, now()) ON CONFLICT (id) DO NOTHING",
    )
    .bind(i32::from(shards))
    .bind(cluster_id)
    .execute(pool)
    .await?;
    let mut tx = pool.begin().await?;
    let (version, shard_count, cluster_id): (i32, i32, String) =
        sqlx::query_as("SELECT version, shard_count, cluster_id FROM pledge_schema WHERE id = 1 FOR UPDATE")
            .fetch_one(&mut *tx)
            .await?;
    if version > SCHEMA_VERSION {
        anyhow::bail!(
            "the store's schema is version {version}, newer than this binary knows ({SCHEMA_VERSION}): \
             upgrade pledge before running it against this store"
        );
    }
    let shard_count = u16::try_from(shard_count)
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| anyhow::anyhow!("the store's shard count {shard_count} is out of range"))?;
    for (step, statements) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        for statement in *statements {
            sqlx::query(*statement).execute(&mut *tx).await?;
        }
        if step == 0 {
            create_leases(&mut tx, shard_count).await?;
        }
        tracing::info!(version = step + 1, "store schema migrated");
    }
    sqlx::query("UPDATE pledge_schema SET version = $1 WHERE id = 1")
        .bind(SCHEMA_VERSION.max(version))
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(ClusterInfo { shard_count, cluster_id })
}

async fn create_leases(tx: &mut Transaction<'_, Postgres>, shard_count: u16) -> Result<(), sqlx::Error> {
    let shards: Vec<i32> = (0..i32::from(shard_count)).collect();
    sqlx::query(
        "INSERT INTO pledge_lease (shard, holder, epoch, expires_at)
         SELECT s, NULL, 0, '1970-01-01T00:00:00Z' FROM unnest($1::integer[]) AS s",
    )
    .bind(shards)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
