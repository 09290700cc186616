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
