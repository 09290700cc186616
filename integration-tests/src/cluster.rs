//! Coordinator clusters on a PostgreSQL decision store: instances as real processes, and what
//! the store says about them (leases, owners, decisions).

use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::process::Command;

use crate::{Process, TestDir, bin};

/// Settings that make takeovers quick in tests (the defaults: 5000 / 1000).
pub const LEASE_MS: u64 = 2_000;
pub const RENEW_MS: u64 = 500;

impl TestDir {
    /// A coordinator instance of the cluster on `store`, named `name` (its log is
    /// `<dir>/<name>.log`), with `cluster_id` as the coordinator id participants see, and
    /// leases, renewals and recovery scans quicker than the defaults unless `args` set them.
    pub async fn cluster_instance(
        &self,
        name: &str,
        store: &str,
        cluster_id: &str,
        participants: &[(&str, String)],
        args: &[&str],
    ) -> Process {
        self.cluster_instance_with_env(name, store, cluster_id, participants, args, &[]).await
    }

    /// [`TestDir::cluster_instance`] with extra environment variables (crash points).
    pub async fn cluster_instance_with_env(
        &self,
        name: &str,
        store: &str,
        cluster_id: &str,
        participants: &[(&str, String)],
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Process {
        let mut c = Command::new(bin("pledge"));
        for (k, v) in env {
            c.env(k, v);
        }
        c.arg("serve")
            .arg("--store")
            .arg(store)
            .arg("--coordinator-id")
            .arg(cluster_id)
            .args(if args.contains(&"--listen") { &[][..] } else { &["--listen", "127.0.0.1:0"][..] })
            .arg("--metrics-listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(self.path().join(name))
            .args(args)
            .env("RUST_LOG", "info,pledge_coordinator::cluster::lease=info");
        let defaults = [
            ("--lease-ms", LEASE_MS.to_string()),
            ("--lease-renew-interval-ms", RENEW_MS.to_string()),
            ("--recovery-interval-ms", "1000".to_string()),
        ];
        for (flag, value) in defaults {
            if !args.contains(&flag) {
                c.arg(flag).arg(value);
            }
        }
        for (resource, endpoint) in participants {
            c.arg("--participant").arg(format!("{resource}={endpoint}"));
        }
        let log = self.path().join(format!("{name}.log"));
        Process::spawn(name, c, log).await.unwrap_or_else(|e| panic!("{e:#}"))
    }
}

/// The store as tests read it.
pub struct StoreView {
    pub pool: PgPool,
}

impl StoreView {
    pub async fn connect(url: &str) -> StoreView {
        StoreView { pool: PgPool::connect(url).await.expect("connecting to the decision store") }
    }

    /// The instance id of the instance serving at `p`'s address.
    pub async fn instance_id(&self, p: &Process) -> String {
        let address = p.endpoint();
        crate::eventually(&format!("{address} registered in the store"), || async {
            // The newest live one: an instance killed at that address left its row behind.
            sqlx::query_scalar::<_, String>(
                "SELECT id FROM pledge_instance WHERE address = $1 AND expires_at > now()
                 ORDER BY started_at DESC LIMIT 1",
            )
            .bind(&address)
            .fetch_optional(&self.pool)
            .await
            .ok()
            .flatten()
        })
        .await
    }

    /// (shard, holder, epoch) of every lease that has not expired.
    pub async fn live_leases(&self) -> Vec<(i32, String, i64)> {
        sqlx::query_as("SELECT shard, holder, epoch FROM pledge_lease WHERE holder IS NOT NULL AND expires_at > now() ORDER BY shard")
            .fetch_all(&self.pool)
            .await
            .expect("reading leases")
    }

    pub async fn shard_count(&self) -> usize {
        let n: i32 = sqlx::query_scalar("SELECT shard_count FROM pledge_schema WHERE id = 1")
            .fetch_one(&self.pool)
            .await
            .expect("reading the shard count");
        n as usize
    }

    /// Shards whose live owner is `instance`.
    pub async fn shards_of(&self, instance: &str) -> Vec<i32> {
        self.live_leases().await.into_iter().filter(|(_, h, _)| h == instance).map(|(s, _, _)| s).collect()
    }

    /// Waits until every shard has a live owner among `instances`, none of which owns more than
    /// its share (the shard count over theirs, rounded up: a joining instance has taken its
    /// share); returns how long it took.
    pub async fn wait_owned_evenly_by(&self, instances: &[String], within: Duration) -> Duration {
        let started = Instant::now();
        let count = self.shard_count().await;
        loop {
            let leases = self.live_leases().await;
            let share = count.div_ceil(instances.len());
            let spread = instances.iter().all(|i| leases.iter().filter(|(_, h, _)| h == i).count() <= share);
            if leases.len() == count && leases.iter().all(|(_, h, _)| instances.contains(h)) && spread {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < within,
                "shards not all owned evenly by {instances:?} within {within:?}: {} of {count} live leases",
                leases.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The owner of `shard` and its epoch, if its lease is live.
    pub async fn owner(&self, shard: i32) -> Option<(String, i64)> {
        self.live_leases().await.into_iter().find(|(s, _, _)| *s == shard).map(|(_, h, e)| (h, e))
    }

    /// The kind of the record the store holds for `gtid` (2: commit, 3: end, 5: one-phase, 6:
    /// three-phase pre-commit).
    pub async fn record_kind(&self, gtid: &str) -> Option<i16> {
        let uuid: uuid::Uuid = gtid.parse().expect("a GTID");
        sqlx::query_scalar("SELECT kind FROM pledge_decision WHERE gtid = $1")
            .bind(uuid)
            .fetch_optional(&self.pool)
            .await
            .expect("reading a decision")
    }
}

/// The shard of `gtid` in a cluster of `count` shards (as `pledge_proto::Gtid::shard`).
pub fn shard_of(gtid: &str, count: usize) -> i32 {
    let g: pledge_proto::Gtid = gtid.parse().expect("a GTID");
    i32::from(g.shard(count as u16))
}

/// A fresh database for one test's store on the shared test server (`PLEDGE_PG_URL_A`'s).
pub async fn fresh_database(test: &str) -> String {
    let admin = crate::pg_url('a');
    let name = format!("store_{}_{:08x}", test.replace('-', "_"), fastrand::u32(..));
    let pool = PgPool::connect(&admin).await.expect("connecting to the test server");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&pool)
        .await
        .expect("creating a database");
    let (base, _) = admin.rsplit_once('/').expect("a database URL");
    format!("{base}/{name}")
}
