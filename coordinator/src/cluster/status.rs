//! What `pledge cluster status` shows, read from the store (works with every instance down).

use sqlx::postgres::PgPoolOptions;

pub struct InstanceStatus {
    pub id: String,
    pub address: String,
    pub expires_in_ms: i64,
}

pub struct ShardStatus {
    pub shard: i32,
    pub holder: Option<String>,
    pub epoch: i64,
    /// The lease has not expired.
    pub live: bool,
    /// Milliseconds until the lease expires (negative: expired that long ago).
    pub expires_in_ms: i64,
    /// Commit and one-phase records not yet followed by an end: decided, not acknowledged.
    pub in_doubt: i64,
    /// Finished transactions still kept.
    pub finished: i64,
}

pub struct ClusterStatus {
    pub cluster_id: String,
    pub schema_version: i32,
    pub shard_count: i32,
    pub instances: Vec<InstanceStatus>,
    pub shards: Vec<ShardStatus>,
}

type ShardRow = (i32, Option<String>, i64, bool, f64, Option<i64>, Option<i64>);

pub async fn read(url: &str) -> anyhow::Result<ClusterStatus> {
    let pool = PgPoolOptions::new().max_connections(1).connect(url).await?;
    let (schema_version, shard_count, cluster_id): (i32, i32, String) =
        sqlx::query_as("SELECT version, shard_count, cluster_id FROM pledge_schema WHERE id = 1")
            .fetch_optional(&pool)
            .await?
            .ok_or_else(|| anyhow::anyhow!("no Pledge cluster in this database (no pledge_schema row)"))?;
    let instances: Vec<(String, String, f64)> = sqlx::query_as(
        "SELECT id, address, (EXTRACT(EPOCH FROM (expires_at - now())) * 1000)::float8 FROM pledge_instance
         WHERE expires_at > now() ORDER BY id",
    )
    .fetch_all(&pool)
    .await?;
    let shards: Vec<ShardRow> = sqlx::query_as(
        "SELECT l.shard, l.holder, l.epoch, l.expires_at > now(),
                (EXTRACT(EPOCH FROM (l.expires_at - now())) * 1000)::float8,
                d.undecided, d.finished
         FROM pledge_lease l LEFT JOIN (
             SELECT shard, count(*) FILTER (WHERE NOT finished) AS undecided, count(*) FILTER (WHERE finished) AS finished
             FROM pledge_decision GROUP BY shard) d ON d.shard = l.shard
         ORDER BY l.shard",
    )
    .fetch_all(&pool)
    .await?;
    Ok(ClusterStatus {
        cluster_id,
        schema_version,
        shard_count,
        instances: instances
            .into_iter()
            .map(|(id, address, ms)| InstanceStatus { id, address, expires_in_ms: ms as i64 })
            .collect(),
        shards: shards
            .into_iter()
            .map(|(shard, holder, epoch, live, ms, in_doubt, finished)| ShardStatus {
                shard,
                holder,
                epoch,
                live,
                expires_in_ms: ms.max(-1e12) as i64,
                in_doubt: in_doubt.unwrap_or(0),
                finished: finished.unwrap_or(0),
            })
            .collect(),
    })
}
