//! Shard leases: taking, renewing, balancing and handing over the shards of the cluster.
//!
//! Every `lease_renew_interval_ms` the lease manager
//! 1. renews this instance's membership row and every lease it holds (database time: the
//!    store's `now()`, never this machine's clock); a lease not renewed at the epoch this
//!    instance holds it at is lost, and its shard dropped at once;
//! 2. reads every lease and live instance (for routing and for `pledge cluster status`);
//! 3. balances: an instance takes free or expired shards up to its share (the shard count
//!    divided by the live instances, rounded up) and hands over what it holds beyond it;
//! 4. learns participants registered at other instances;
//! 5. deletes the records of finished transactions past their retention in its shards.
//!
//! If renewals fail for longer than the lease, the instance stops driving every shard on its
//! own (its leases may have been taken; the fence would refuse its writes anyway).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pledge_proto::{Gtid, ResourceId};
use sqlx::postgres::PgPool;
use sqlx::postgres::types::PgInterval;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{ClusterState, Owner};
use crate::engine::{LogRecord, Millis};
use crate::records;

/// What the lease manager asks of the runtime.
#[derive(Debug)]
pub enum ShardCommand {
    /// Own `shard` from now on (see [`crate::engine::Event::AdoptShard`]).
    Adopt { shard: u16, epoch: u64, forgotten_through_ms: Millis, records: Vec<LogRecord> },
    /// Hand `shard` over: issue no new GTIDs in it, let its live transactions finish for at
    /// most `drain`, drop it, then answer `done`.
    Release { shard: u16, epoch: u64, drain: Duration, done: oneshot::Sender<()> },
    /// A participant registered at some instance.
    Participant { resource: ResourceId, endpoint: String },
}

pub struct LeaseConfig {
    pub lease: Duration,
    pub renew_interval: Duration,
    pub drain: Duration,
    pub completed_retention_ms: u64,
}

/// A shard owned in the [`ClusterState`] but not yet adopted by the runtime: forgotten again
/// if dropped armed (the adoption failed or was cut short), so the state never claims a shard
/// nobody drives. Its lease row stays this instance's and is taken again at a new epoch.
struct Unadopted<'a> {
    state: &'a ClusterState,
    shard: u16,
    epoch: u64,
    armed: bool,
}

impl Drop for Unadopted<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.state.lose(self.shard, self.epoch);
        }
    }
}

/// How long the membership row of an instance that stopped renewing is kept.
const DEAD_INSTANCE_KEPT: Duration = Duration::from_secs(3600);

/// shard, holder, epoch, unexpired, the holder's address if it is live.
type LeaseRow = (i32, Option<String>, i64, bool, Option<String>);

/// Most finished transactions' records deleted per shard-set per round.
const MAX_FORGET_PER_ROUND: i64 = 10_000;

pub struct LeaseManager {
    pool: PgPool,
    state: Arc<ClusterState>,
    commands: mpsc::Sender<ShardCommand>,
    config: LeaseConfig,
    participants: BTreeMap<String, String>,
    /// When the last successful renewal was sent (leases last at least `lease` from then).
    renewed_at: Option<Instant>,
    releasing: Arc<Mutex<BTreeSet<u16>>>,
}

fn interval(d: Duration) -> PgInterval {
    PgInterval { months: 0, days: 0, microseconds: d.as_micros() as i64 }
}

impl LeaseManager {
    pub fn new(
        pool: PgPool,
        state: Arc<ClusterState>,
        commands: mpsc::Sender<ShardCommand>,
        config: LeaseConfig,
    ) -> Self {
        LeaseManager {
            pool,
            state,
            commands,
            config,
            participants: BTreeMap::new(),
            renewed_at: None,
            releasing: Arc::new(Mutex::new(BTreeSet::new())),
        }
    }

    /// Runs until `shutdown`, then hands every shard over (see the module docs).
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.config.renew_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            // Renewal and the view, bounded so that a hung store is noticed by the lapse check
            // about when the leases expire in the store.
            let round_timeout =
                self.config.lease.saturating_sub(self.config.renew_interval).max(self.config.renew_interval);
            let wanted = match tokio::time::timeout(round_timeout, self.round()).await {
                Ok(Ok(wanted)) => wanted,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "lease round failed");
                    None
                }
                Err(_) => {
                    tracing::warn!(timeout_ms = round_timeout.as_millis() as u64, "lease round timed out");
                    None
                }
            };
            self.check_lapse().await;
            // Taking shards reads their rows: bounded like a round, so the next renewal is not
            // held up past the lease. Shards taken but not read when it ends are let go and
            // taken again next round (see `acquire`); those adopted stay, so each round makes
            // progress.
            if let Some((free, expired_held)) = wanted {
                match tokio::time::timeout(round_timeout, self.acquire(&free, &expired_held)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "taking shards failed"),
                    Err(_) => tracing::warn!(timeout_ms = round_timeout.as_millis() as u64, "taking shards timed out"),
                }
            }
            match tokio::time::timeout(round_timeout, self.housekeeping()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "cluster housekeeping failed"),
                Err(_) => tracing::warn!("cluster housekeeping timed out"),
            }
        }
        if let Err(e) = self.hand_over_all().await {
            tracing::warn!(error = %e, "handing shards over at shutdown failed; they move when their leases expire");
        }
    }

    /// Renews this instance's leases, reads every lease and live instance, hands over what is
    /// beyond its share; returns the shards to try to take (and which of them were held by
    /// another instance whose lease expired), if it is below its share.
    async fn round(&mut self) -> Result<Option<(Vec<u16>, BTreeSet<u16>)>, sqlx::Error> {
        let me = self.state.instance_id.clone();
        let lease = interval(self.config.lease);
        let sent = Instant::now();
        sqlx::query(
            "INSERT INTO pledge_instance (id, address, started_at, expires_at) VALUES ($1, $2, now(), now() + $3)
             ON CONFLICT (id) DO UPDATE SET address = excluded.address, expires_at = excluded.expires_at",
        )
        .bind(&me)
        .bind(&self.state.address)
        .bind(lease)
        .execute(&self.pool)
        .await?;
        // Only the shards this instance drives: one it holds in the table but not here (its
        // records could not be read) is left to expire.
        let owned: Vec<i32> = self.state.owned().keys().map(|&s| i32::from(s)).collect();
        let renewed = renew(&self.pool, &me, self.config.lease, &owned).await?;
        self.renewed_at = Some(sent);
        let renewed: BTreeMap<u16, u64> = renewed.into_iter().map(|(s, e)| (s as u16, e as u64)).collect();
        for (shard, epoch) in self.state.owned() {
            if renewed.get(&shard) != Some(&epoch) {
                tracing::warn!(shard, epoch, "shard lease lost to another instance; dropping the shard");
                self.lose(shard, epoch);
            }
        }

        // Every lease and live instance.
        let rows: Vec<LeaseRow> = sqlx::query_as(
            "SELECT l.shard, l.holder, l.epoch, l.expires_at > now(), i.address
             FROM pledge_lease l LEFT JOIN pledge_instance i ON i.id = l.holder AND i.expires_at > now()
             ORDER BY l.shard",
        )
        .fetch_all(&self.pool)
        .await?;
        let instances: Vec<(String, String)> =
            sqlx::query_as("SELECT id, address FROM pledge_instance WHERE expires_at > now() ORDER BY id")
                .fetch_all(&self.pool)
                .await?;
        let mut owners = vec![None; usize::from(self.state.shard_count)];
        let mut free = Vec::new();
        let mut expired_held = BTreeSet::new();
        // Read after the rows: a shard this instance is handing over is in `releasing` until
        // its row is freed.
        let (owned, releasing) = (self.state.owned(), self.releasing.lock().expect("releasing").clone());
        let orphan = |s: i32| !owned.contains_key(&(s as u16)) && !releasing.contains(&(s as u16));
        for (shard, holder, epoch, live, address) in rows {
            let Some(slot) = owners.get_mut(shard as usize) else { continue };
            match (holder, live, address) {
                // Held in the store by this instance but not driven by it (its lease lapsed
                // unnoticed by the store, or taking it was cut short): take it again.
                (Some(instance), _, _) if instance == me && orphan(shard) => free.push(shard as u16),
                (Some(instance), true, Some(address)) => *slot = Some(Owner { instance, address, epoch: epoch as u64 }),
                (Some(instance), _, _) if instance != me => {
                    free.push(shard as u16);
                    expired_held.insert(shard as u16);
                }
                (None, _, _) => free.push(shard as u16),
                _ => {}
            }
        }
        self.state.set_view(owners, instances.clone());

        // Balance.
        let live = instances.len().max(1);
        let share = usize::from(self.state.shard_count).div_ceil(live);
        let held: Vec<(u16, u64)> = owned.into_iter().filter(|(s, _)| !releasing.contains(s)).collect();
        if held.len() > share {
            for &(shard, epoch) in held.iter().rev().take(held.len() - share) {
                self.release(shard, epoch);
            }
        } else if held.len() < share && !free.is_empty() {
            fastrand::shuffle(&mut free);
            free.truncate(share - held.len());
            return Ok(Some((free, expired_held)));
        }
        Ok(None)
    }

    /// Learns participants registered elsewhere, forgets expired transactions of this
    /// instance's shards, and prunes long-dead instances.
    async fn housekeeping(&mut self) -> Result<(), sqlx::Error> {
        self.learn_participants().await?;
        self.forget_expired().await?;
        // Instances gone for good (killed) leave their rows; they are shown as dead a while.
        sqlx::query("DELETE FROM pledge_instance WHERE expires_at < now() - $1")
            .bind(interval(DEAD_INSTANCE_KEPT))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn acquire(&mut self, shards: &[u16], expired_held: &BTreeSet<u16>) -> Result<(), sqlx::Error> {
        let candidates: Vec<i32> = shards.iter().map(|&s| i32::from(s)).collect();
        let taken: Vec<(i32, i64, i64)> = sqlx::query_as(
            "UPDATE pledge_lease SET holder = $1, epoch = epoch + 1, expires_at = now() + $2
             WHERE shard IN (SELECT shard FROM pledge_lease
                             WHERE shard = ANY($3) AND (holder IS NULL OR expires_at < now() OR holder = $1)
                             ORDER BY shard FOR UPDATE)
               AND (holder IS NULL OR expires_at < now() OR holder = $1)
             RETURNING shard, epoch, forgotten_through_ms",
        )
        .bind(&self.state.instance_id)
        .bind(interval(self.config.lease))
        .bind(&candidates)
        .fetch_all(&self.pool)
        .await?;
        for (shard, epoch, forgotten_through_ms) in taken {
            let (shard, epoch) = (shard as u16, epoch as u64);
            // Owned before any write of it can be made; read after the epoch is raised, so
            // every write of the former owner that will ever be accepted is in the read. Let
            // go again unless the runtime gets it (the load failed, or this was cut short).
            self.state.own(shard, epoch);
            let mut unadopted = Unadopted { state: &self.state, shard, epoch, armed: true };
            let started = Instant::now();
            let records = match self.load(shard).await {
                Ok(records) => records,
                Err(e) => {
                    // Not adopted: give it back (or let it expire) rather than drive it blind.
                    tracing::error!(shard, error = %e, "cannot read the records of an acquired shard; releasing it");
                    drop(unadopted);
                    let _ = self.release_row(shard, epoch).await;
                    continue;
                }
            };
            let takeover = expired_held.contains(&shard);
            crate::metrics::shard_acquired(takeover);
            tracing::info!(
                shard,
                epoch,
                takeover,
                records = records.len(),
                load_ms = started.elapsed().as_millis() as u64,
                "shard acquired"
            );
            let adopt =
                ShardCommand::Adopt { shard, epoch, forgotten_through_ms: forgotten_through_ms as u64, records };
            if self.commands.send(adopt).await.is_err() {
                return Ok(()); // the runtime stopped
            }
            unadopted.armed = false;
        }
        Ok(())
    }

    async fn load(&self, shard: u16) -> anyhow::Result<Vec<LogRecord>> {
        let mut rows: Vec<(i16, Vec<u8>)> = sqlx::query_as("SELECT kind, record FROM pledge_decision WHERE shard = $1")
            .bind(i32::from(shard))
            .fetch_all(&self.pool)
            .await?;
        // Resolutions after every transaction's record, each transaction's in the order made.
        let resolutions: Vec<Vec<u8>> =
            sqlx::query_scalar("SELECT record FROM pledge_resolution WHERE shard = $1 ORDER BY gtid, id")
                .bind(i32::from(shard))
                .fetch_all(&self.pool)
                .await?;
        rows.extend(resolutions.into_iter().map(|r| (i16::from(records::TYPE_RESOLVE), r)));
        rows.into_iter()
            .map(|(kind, record)| {
                records::decode(kind as u8, &record)
                    .map_err(|e| anyhow::anyhow!("shard {shard}: unreadable record: {e}"))
            })
            .collect()
    }

    /// Forgets `shard` in the cluster state; the runtime stops driving it at its next
    /// reconciliation (see `Runtime::reconcile_shards`).
    fn lose(&self, shard: u16, epoch: u64) {
        if self.state.lose(shard, epoch) {
            crate::metrics::shard_lost();
        }
    }

    /// Stops driving every shard if no renewal has succeeded for a whole lease.
    async fn check_lapse(&mut self) {
        let lapsed = self.renewed_at.is_some_and(|at| at.elapsed() >= self.config.lease);
        if !lapsed {
            return;
        }
        for (shard, epoch) in self.state.owned() {
            tracing::warn!(shard, epoch, "lease not renewed for lease_ms; no longer driving the shard");
            self.lose(shard, epoch);
        }
    }

    /// Hands `shard` over in the background (drain, drop, free the lease).
    fn release(&self, shard: u16, epoch: u64) {
        self.releasing.lock().expect("releasing").insert(shard);
        let (commands, pool, state, releasing) =
            (self.commands.clone(), self.pool.clone(), self.state.clone(), self.releasing.clone());
        let drain = self.config.drain.min(self.config.lease / 2);
        tokio::spawn(async move {
            hand_over(&commands, &pool, &state, shard, epoch, drain).await;
            releasing.lock().expect("releasing").remove(&shard);
        });
    }

    async fn release_row(&self, shard: u16, epoch: u64) -> Result<(), sqlx::Error> {
        free_lease(&self.pool, &self.state.instance_id, shard, epoch).await
    }

    /// At shutdown: leave the membership first (so the others' share grows to cover ours),
    /// renew once (the drain runs within a fresh lease), then hand every shard over at once.
    async fn hand_over_all(&mut self) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM pledge_instance WHERE id = $1")
            .bind(&self.state.instance_id)
            .execute(&self.pool)
            .await?;
        let owned: Vec<i32> = self.state.owned().keys().map(|&s| i32::from(s)).collect();
        renew(&self.pool, &self.state.instance_id, self.config.lease, &owned).await?;
        let drain = self.config.drain.min(self.config.lease / 2);
        let owned = self.state.owned();
        let releasing = self.releasing.lock().expect("releasing").clone();
        let handovers = owned
            .into_iter()
            .filter(|(s, _)| !releasing.contains(s))
            .map(|(shard, epoch)| hand_over(&self.commands, &self.pool, &self.state, shard, epoch, drain));
        futures::future::join_all(handovers).await;
        tracing::info!("every shard handed over");
        Ok(())
    }

    async fn learn_participants(&mut self) -> Result<(), sqlx::Error> {
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT resource, endpoint FROM pledge_participant").fetch_all(&self.pool).await?;
        for (resource, endpoint) in rows {
            if self.participants.get(&resource) == Some(&endpoint) {
                continue;
            }
            let Ok(id) = ResourceId::parse_field("resource_id", &resource) else {
                tracing::error!(resource, "the store holds an invalid participant id; ignored");
                continue;
            };
            self.participants.insert(resource, endpoint.clone());
            let _ = self.commands.send(ShardCommand::Participant { resource: id, endpoint }).await;
        }
        Ok(())
    }

    /// Deletes the records of finished transactions (not heuristic) past their retention in
    /// this instance's shards, and raises those shards' horizon of forgotten transactions, in
    /// one transaction fenced like any write.
    async fn forget_expired(&self) -> Result<(), sqlx::Error> {
        let owned = self.state.owned();
        if owned.is_empty() {
            return Ok(());
        }
        let horizon = crate::driver::now_ms().saturating_sub(self.config.completed_retention_ms) as i64;
        let shards: Vec<i32> = owned.keys().map(|&s| i32::from(s)).collect();
        // Most rounds have nothing to forget: then no lease row is locked (a lock holds up
        // this instance's decision writes).
        let due: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pledge_decision
                            WHERE shard = ANY($1) AND finished AND NOT keep AND completed_ms < $2)",
        )
        .bind(&shards)
        .bind(horizon)
        .fetch_one(&self.pool)
        .await?;
        if !due {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        let held: Vec<(i32, i64)> = sqlx::query_as(
            "SELECT shard, epoch FROM pledge_lease WHERE shard = ANY($1) AND holder = $2 ORDER BY shard FOR UPDATE",
        )
        .bind(&shards)
        .bind(&self.state.instance_id)
        .fetch_all(&mut *tx)
        .await?;
        let mine: Vec<i32> =
            held.into_iter().filter(|&(s, e)| owned.get(&(s as u16)) == Some(&(e as u64))).map(|(s, _)| s).collect();
        let gone: Vec<(i32, uuid::Uuid)> = sqlx::query_as(
            "DELETE FROM pledge_decision WHERE gtid IN (
                 SELECT gtid FROM pledge_decision
                 WHERE shard = ANY($1) AND finished AND NOT keep AND completed_ms < $2 LIMIT $3)
             RETURNING shard, gtid",
        )
        .bind(&mine)
        .bind(horizon)
        .bind(MAX_FORGET_PER_ROUND)
        .fetch_all(&mut *tx)
        .await?;
        let gone_gtids: Vec<uuid::Uuid> = gone.iter().map(|(_, g)| *g).collect();
        sqlx::query("DELETE FROM pledge_resolution WHERE gtid = ANY($1)").bind(&gone_gtids).execute(&mut *tx).await?;
        // Resolutions of transactions with no record left, older than the retention (a retried
        // abort, under presumed abort, has none): nothing replays them any more.
        sqlx::query(
            "DELETE FROM pledge_resolution WHERE id IN (
                 SELECT r.id FROM pledge_resolution r
                 WHERE r.shard = ANY($1) AND r.at_ms < $2
                   AND NOT EXISTS (SELECT 1 FROM pledge_decision d WHERE d.gtid = r.gtid)
                 LIMIT $3)",
        )
        .bind(&mine)
        .bind(horizon)
        .bind(MAX_FORGET_PER_ROUND)
        .execute(&mut *tx)
        .await?;
        let mut through: BTreeMap<i32, i64> = BTreeMap::new();
        for (shard, gtid) in &gone {
            let ms = Gtid::from_uuid(*gtid).unix_ms().unwrap_or(0) as i64;
            let t = through.entry(*shard).or_default();
            *t = (*t).max(ms);
        }
        for (shard, ms) in through {
            sqlx::query(
                "UPDATE pledge_lease SET forgotten_through_ms = GREATEST(forgotten_through_ms, $2) WHERE shard = $1",
            )
            .bind(shard)
            .bind(ms)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        if !gone.is_empty() {
            tracing::debug!(count = gone.len(), "records of finished transactions past their retention deleted");
        }
        Ok(())
    }
}

async fn hand_over(
    commands: &mpsc::Sender<ShardCommand>,
    pool: &PgPool,
    state: &ClusterState,
    shard: u16,
    epoch: u64,
    drain: Duration,
) {
    let (done, drained) = oneshot::channel();
    if commands.send(ShardCommand::Release { shard, epoch, drain, done }).await.is_ok() {
        let _ = drained.await;
    }
    if !state.lose(shard, epoch) {
        return; // lost meanwhile: nothing of ours to free
    }
    crate::metrics::shard_lost();
    match free_lease(pool, &state.instance_id, shard, epoch).await {
        Ok(()) => tracing::info!(shard, epoch, "shard handed over"),
        Err(e) => tracing::warn!(shard, error = %e, "cannot free the lease; the shard moves when it expires"),
    }
}

/// Frees a lease held at `epoch` (the next owner raises the epoch when it takes it).
async fn free_lease(pool: &PgPool, me: &str, shard: u16, epoch: u64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE pledge_lease SET holder = NULL, expires_at = '1970-01-01T00:00:00Z'
         WHERE shard = $1 AND holder = $2 AND epoch = $3",
    )
    .bind(i32::from(shard))
    .bind(me)
    .bind(epoch as i64)
    .execute(pool)
    .await?;
    Ok(())
}

/// Extends `holder`'s leases of `shards` by `lease` from the database's now; returns the
/// (shard, epoch) renewed. Rows are locked in shard order, as the store's writers lock them
/// (see `cluster::store`), so a renewal and a write never deadlock.
async fn renew(pool: &PgPool, holder: &str, lease: Duration, shards: &[i32]) -> Result<Vec<(i32, i64)>, sqlx::Error> {
    sqlx::query_as(
        "UPDATE pledge_lease SET expires_at = now() + $2
         WHERE shard IN (SELECT shard FROM pledge_lease WHERE holder = $1 AND shard = ANY($3)
                         ORDER BY shard FOR UPDATE)
           AND holder = $1
         RETURNING shard, epoch",
    )
    .bind(holder)
    .bind(interval(lease))
    .bind(shards)
    .fetch_all(pool)
    .await
}

/// The leases (shard, epoch) `holder` holds in the store now, expired or not: a lease that
/// expired but was not taken still fences every other writer.
pub async fn held_leases(pool: &PgPool, holder: &str) -> Result<BTreeMap<u16, u64>, sqlx::Error> {
    let rows: Vec<(i32, i64)> =
        sqlx::query_as("SELECT shard, epoch FROM pledge_lease WHERE holder = $1").bind(holder).fetch_all(pool).await?;
    Ok(rows.into_iter().map(|(shard, epoch)| (shard as u16, epoch as u64)).collect())
}
