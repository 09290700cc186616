//! Load generation shared by the benchmarks: client tasks running one transaction after
//! another (or on a fixed schedule), a warm-up, then a measured window with an HDR histogram
//! of latencies.

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use hdrhistogram::Histogram;

/// A benchmark setting from the environment, or its default.
pub fn env_or<T: FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Prints why a transaction failed, for the first few failures of the process (a benchmark
/// counts errors; this says what they were). Returns `false`: the transaction did not succeed.
pub fn report_error(error: impl std::fmt::Display) -> bool {
    static REPORTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    if REPORTED.fetch_add(1, Ordering::Relaxed) < 5 {
        eprintln!("transaction failed: {error}");
    }
    false
}

/// How much load to apply.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub clients: usize,
    pub warmup: Duration,
    pub measure: Duration,
    /// 0: each client starts its next transaction as soon as the last one ends (maximum
    /// throughput). N: the clients together start N transactions a second on a fixed schedule,
    /// and latency counts from the scheduled start, so a stall counts against every transaction
    /// it delays (no coordinated omission).
    pub rate_per_second: u64,
}

/// Seconds the machine's CPUs have spent busy since boot (all processes; idle, I/O wait and
/// time stolen by the hypervisor excluded), from `/proc/stat`. `None` where there is none.
///
/// Throughput on a shared VM moves by a third from minute to minute; CPU time per transaction
/// moves much less, so benchmarks report both.
pub fn busy_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat.lines().next()?.split_whitespace().skip(1).map_while(|f| f.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal ...
    let busy: u64 = [0, 1, 2, 5, 6].iter().filter_map(|&i| fields.get(i)).sum();
    // /proc/stat counts in USER_HZ, 100 a second on every Linux architecture.
    Some(busy as f64 / 100.0)
}

/// Busy CPU seconds of the machine from `start` (a [`busy_cpu_seconds`] reading) to now.
pub fn busy_cpu_since(start: Option<f64>) -> Option<f64> {
    start.zip(busy_cpu_seconds()).map(|(before, after)| after - before)
}

/// What a measured window saw.
pub struct Run {
    pub txns: u64,
    pub errors: u64,
    pub seconds: f64,
    /// CPU seconds the whole machine was busy during the window (see [`busy_cpu_seconds`]).
    pub cpu_seconds: Option<f64>,
    /// Microseconds.
    pub latency: Histogram<u64>,
}

impl Run {
    pub fn rate(&self) -> f64 {
        self.txns as f64 / self.seconds
    }

    /// Machine CPU time per successful transaction, in microseconds.
    pub fn cpu_us_per_txn(&self) -> Option<f64> {
        self.cpu_seconds.filter(|_| self.txns > 0).map(|s| s * 1e6 / self.txns as f64)
    }

    /// Latency at quantile `q`, in milliseconds.
    pub fn ms(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// Runs `load.clients` clients; client `i` calls `make(i)()` for each transaction, which
/// answers whether the transaction succeeded.
pub async fn measure<F>(load: Load, make: impl Fn(usize) -> F) -> Run
where
    F: FnMut() -> BoxFuture<'static, bool> + Send + 'static,
{
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let epoch = tokio::time::Instant::now() + Duration::from_millis(100);
    let mut tasks = Vec::new();
    for i in 0..load.clients {
        let mut one = make(i);
        let (stop, measuring) = (stop.clone(), measuring.clone());
        // Paced: client i starts at epoch + i * period / clients, then every period.
        let mut schedule = (load.rate_per_second > 0).then(|| {
            let period = Duration::from_secs_f64(load.clients as f64 / load.rate_per_second as f64);
            let offset = period.mul_f64(i as f64 / load.clients as f64);
            let mut ticks = tokio::time::interval_at(epoch + offset, period);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            ticks
        });
        tasks.push(tokio::spawn(async move {
            let mut latency = histogram();
            let (mut txns, mut errors) = (0, 0);
            while !stop.load(Ordering::Relaxed) {
                let start = match schedule.as_mut() {
                    Some(ticks) => ticks.tick().await.into_std(),
                    None => Instant::now(),
                };
                let ok = one().await;
                if measuring.load(Ordering::Relaxed) {
                    if ok {
                        txns += 1;
                        latency.saturating_record(start.elapsed().as_micros() as u64);
                    } else {
                        errors += 1;
                    }
                }
            }
            (txns, errors, latency)
        }));
    }
    tokio::time::sleep(load.warmup).await;
    measuring.store(true, Ordering::Relaxed);
    let (started, cpu_before) = (Instant::now(), busy_cpu_seconds());
    tokio::time::sleep(load.measure).await;
    measuring.store(false, Ordering::Relaxed);
    let seconds = started.elapsed().as_secs_f64();
    let cpu_seconds = busy_cpu_since(cpu_before);
    stop.store(true, Ordering::Relaxed);
    let mut run = Run { txns: 0, errors: 0, seconds, cpu_seconds, latency: histogram() };
    for t in tasks {
        let (txns, errors, latency) = t.await.expect("benchmark client");
        run.txns += txns;
        run.errors += errors;
        run.latency.add(latency).expect("same histogram bounds");
    }
    run
}

/// The end-to-end load of `benches/e2e.rs` and `benches/cluster.rs`.
pub mod e2e {
    use std::time::Duration;

    use futures::future::BoxFuture;
    use pledge_proto::pipeline::CoordinatorPipeline;
    use pledge_proto::v1::{self, coordinator_client::CoordinatorClient, reference_store_client::ReferenceStoreClient};
    use tonic::transport::Channel;

    use super::{Load, Run, env_or, measure};
    use crate::{Process, branch};

    pub fn load() -> Load {
        Load {
            clients: env_or("BENCH_CLIENTS", 64),
            warmup: Duration::from_secs(env_or("BENCH_WARMUP_SECONDS", 2)),
            measure: Duration::from_secs(env_or("BENCH_SECONDS", 10)),
            rate_per_second: env_or("BENCH_RATE", 0),
        }
    }

    pub fn print(name: &str, r: &Run) {
        println!(
            "{name:<28} {:>10.0} txn/s   p50 {:>6.2} ms   p99 {:>6.2} ms   p99.9 {:>6.2} ms   CPU {:>4} µs/txn   ({} txns, {} errors)",
            r.rate(),
            r.ms(0.50),
            r.ms(0.99),
            r.ms(0.999),
            r.cpu_us_per_txn().map(|c| format!("{c:.0}")).unwrap_or_else(|| "-".into()),
            r.txns,
            r.errors
        );
    }

    /// How clients call the coordinator (BENCH_API).
    #[derive(Clone, Copy, PartialEq)]
    pub enum Api {
        /// Begin and Commit on the coordinator's pipeline stream (one per channel).
        Pipeline,
        /// Begin and Commit as unary calls.
        Unary,
    }

    pub fn api() -> Api {
        match env_or("BENCH_API", "pipeline".to_string()).as_str() {
            "pipeline" => Api::Pipeline,
            "unary" => Api::Unary,
            other => panic!("BENCH_API: pipeline or unary, not {other:?}"),
        }
    }

    /// Begin (with `resources`' branches) and Commit, from each client, over shared channels.
    /// Each transaction: Begin with a branch at each participant, a Put in each branch (the
    /// reference store's work API, a unary call), Commit. With several coordinators (instances of
    /// a cluster), each gets its share of the channels and a client keeps to one: a Begin issues
    /// its GTID in a shard of the instance asked, so the Commit is answered there too.
    pub async fn run(coordinators: &[&Process], participants: &[(&'static str, &Process)]) -> Run {
        run_with(coordinators, participants, v1::Protocol::TwoPhase).await
    }

    /// [`run`] with transactions of `protocol`. A three-phase run first waits until the
    /// coordinator knows its participants support it (a Begin answers UNAVAILABLE until then).
    pub async fn run_with(
        coordinators: &[&Process],
        participants: &[(&'static str, &Process)],
        protocol: v1::Protocol,
    ) -> Run {
        for coordinator in coordinators {
            let mut c = CoordinatorClient::new(coordinator.channel().await);
            let branches: Vec<v1::BranchRef> = participants.iter().map(|(r, _)| branch(r, "probe")).collect();
            let probe = v1::BeginRequest { branches, protocol: protocol as i32, ..Default::default() };
            let begun = crate::eventually("the coordinator to accept a Begin of the protocol", || {
                let (mut c, probe) = (c.clone(), probe.clone());
                async move { c.begin(probe).await.ok() }
            })
            .await
            .into_inner();
            c.abort(v1::AbortRequest { gtid: begun.gtid }).await.expect("aborting the probe");
        }
        let mut channels: Vec<Channel> = Vec::new();
        let api = api();
        let default_channels = if api == Api::Pipeline { 2 } else { 8 };
        let per_instance = env_or("BENCH_CHANNELS", default_channels).max(1);
        for i in 0..per_instance * coordinators.len() {
            let coordinator = coordinators[i % coordinators.len()];
            let target = coordinator.target().configure(|e| e.tcp_nodelay(true));
            channels.push(target.connect().await.unwrap());
        }
        let pipelines: Vec<_> =
            channels.iter().map(|c| CoordinatorPipeline::new(c.clone(), Duration::from_secs(30))).collect();
        let mut stores = Vec::new();
        for (resource, p) in participants {
            let target = p.target().configure(|e| e.tcp_nodelay(true));
            stores.push((*resource, ReferenceStoreClient::new(target.connect().await.unwrap())));
        }
        measure(load(), |i| {
            let c = CoordinatorClient::new(channels[i % channels.len()].clone());
            let p = pipelines[i % pipelines.len()].clone();
            let stores = stores.clone();
            move || {
                let (mut c, p, mut stores) = (c.clone(), p.clone(), stores.clone());
                Box::pin(async move {
                    let branches = stores.iter().map(|(r, _)| branch(r, "b")).collect();
                    let begin = v1::BeginRequest { branches, protocol: protocol as i32, ..Default::default() };
                    let begun = match api {
                        Api::Pipeline => p.begin(begin).await,
                        Api::Unary => c.begin(begin).await.map(tonic::Response::into_inner),
                    };
                    let Ok(begun) = begun else { return false };
                    for (_, store) in &mut stores {
                        let put = v1::PutRequest {
                            gtid: begun.gtid.clone(),
                            branch_id: "b".into(),
                            key: format!("k{}", fastrand::u16(..)),
                            value: b"v".to_vec(),
                        };
                        if store.put(put).await.is_err() {
                            return false;
                        }
                    }
                    let commit = v1::CommitRequest { gtid: begun.gtid, ..Default::default() };
                    let committed = match api {
                        Api::Pipeline => p.commit(commit).await,
                        Api::Unary => c.commit(commit).await.map(tonic::Response::into_inner),
                    };
                    matches!(committed, Ok(r) if r.outcome() == v1::Outcome::Committed)
                }) as BoxFuture<'static, bool>
            }
        })
        .await
    }
}
