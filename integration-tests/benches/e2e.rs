//! End-to-end throughput and latency: committed transactions per second through a real
//! coordinator (fsync on) with reference participants, all on loopback on this machine.
//!
//! Two runs in one invocation, so their ratio is meaningful:
//! * 2PC: two participants, each transaction `Begin` (both branches enlisted) + `Commit`, so the
//!   coordinator prepares both, forces the decision, and commits both;
//! * 1PC: one participant, one-phase commit (no prepare, no forced record): the baseline.
//!
//! Build the binaries without crash points first, then run:
//! ```sh
//! cargo build --release -p pledge-coordinator -p pledge-sdk --bins
//! cargo bench -p pledge-integration-tests --bench e2e
//! ```
//! Settings (environment): BENCH_CLIENTS (64), BENCH_SECONDS (10), BENCH_WARMUP_SECONDS (2),
//! BENCH_CHANNELS (8 HTTP/2 connections shared by the clients), BENCH_DIR (where data goes;
//! must be a real disk so fsync costs what it costs), BENCH_RATE (0: each client starts its
//! next transaction as soon as the last one ends, i.e. maximum throughput; N: the clients
//! together start N transactions per second on a fixed schedule, and latency is measured from
//! the scheduled start, so a stall counts against every transaction it delays).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use pledge_integration_tests::{Process, TestDir, branch};
use pledge_proto::v1::{self, coordinator_client::CoordinatorClient};
use tonic::transport::{Channel, Endpoint};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

struct Result {
    name: &'static str,
    txns: u64,
    errors: u64,
    seconds: f64,
    latency: Histogram<u64>,
}

impl Result {
    fn rate(&self) -> f64 {
        self.txns as f64 / self.seconds
    }

    fn print(&self) {
        let us = |q: f64| self.latency.value_at_quantile(q) as f64 / 1000.0;
        println!(
            "{:<28} {:>10.0} txn/s   p50 {:>6.2} ms   p99 {:>6.2} ms   p99.9 {:>6.2} ms   ({} txns, {} errors)",
            self.name,
            self.rate(),
            us(0.50),
            us(0.99),
            us(0.999),
            self.txns,
            self.errors
        );
    }
}

async fn run(name: &'static str, coordinator: &Process, resources: &[&'static str]) -> Result {
    let clients = env("BENCH_CLIENTS", 64);
    let seconds = env("BENCH_SECONDS", 10);
    let warmup = env("BENCH_WARMUP_SECONDS", 2);
    let channels: Vec<Channel> = {
        let mut v = Vec::new();
        for _ in 0..env("BENCH_CHANNELS", 8) {
            v.push(Endpoint::from_shared(coordinator.endpoint()).unwrap().tcp_nodelay(true).connect().await.unwrap());
        }
        v
    };
    let rate = env("BENCH_RATE", 0);
    let epoch = tokio::time::Instant::now() + Duration::from_millis(100);
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..clients {
        let mut c = CoordinatorClient::new(channels[i as usize % channels.len()].clone());
        let (measuring, stop) = (measuring.clone(), stop.clone());
        let branches: Vec<v1::BranchRef> = resources.iter().map(|r| branch(r, "b")).collect();
        tasks.push(tokio::spawn(async move {
            let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
            let (mut txns, mut errors) = (0u64, 0u64);
            // Paced: client i starts at epoch + i * period / clients, then every period.
            let mut schedule = (rate > 0).then(|| {
                let period = Duration::from_secs_f64(clients as f64 / rate as f64);
                let mut ticks = tokio::time::interval_at(epoch + period.mul_f64(i as f64 / clients as f64), period);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                ticks
            });
            while !stop.load(Ordering::Relaxed) {
                let start = match schedule.as_mut() {
                    Some(ticks) => ticks.tick().await.into_std(),
                    None => Instant::now(),
                };
                let ok = async {
                    let gtid = c
                        .begin(v1::BeginRequest { branches: branches.clone(), ..Default::default() })
                        .await?
                        .into_inner()
                        .gtid;
                    let r = c.commit(v1::CommitRequest { gtid, ..Default::default() }).await?.into_inner();
                    Ok::<bool, tonic::Status>(r.outcome() == v1::Outcome::Committed)
                }
                .await;
                if measuring.load(Ordering::Relaxed) {
                    match ok {
                        Ok(true) => {
                            txns += 1;
                            latency.saturating_record(start.elapsed().as_micros() as u64);
                        }
                        _ => errors += 1,
                    }
                }
            }
            (txns, errors, latency)
        }));
    }
    tokio::time::sleep(Duration::from_secs(warmup)).await;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let mut result = Result {
        name,
        txns: 0,
        errors: 0,
        seconds: elapsed,
        latency: Histogram::new_with_bounds(1, 60_000_000, 3).unwrap(),
    };
    for t in tasks {
        let (txns, errors, latency) = t.await.unwrap();
        result.txns += txns;
        result.errors += errors;
        result.latency.add(latency).unwrap();
    }
    result
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        if let Some(dir) = std::env::var_os("BENCH_DIR") {
            // SAFETY: single-threaded at this point of the benchmark's start-up.
            unsafe { std::env::set_var("TMPDIR", dir) };
        }
        println!(
            "end-to-end benchmark: {} clients, {}, {} s per run, binaries from {}",
            env("BENCH_CLIENTS", 64),
            match env("BENCH_RATE", 0) {
                0 => "as fast as they can".to_string(),
                r => format!("{r} transactions/s scheduled"),
            },
            env("BENCH_SECONDS", 10),
            pledge_integration_tests::bin_dir().display()
        );

        let dir = TestDir::new("bench-2pc");
        let p1 = dir.participant("db1", 0, &[], &[]).await;
        let p2 = dir.participant("db2", 0, &[], &[]).await;
        let coordinator = dir.coordinator(&[("db1", &p1), ("db2", &p2)], &[]).await;
        let two_phase = run("2PC, 2 participants", &coordinator, &["db1", "db2"]).await;
        drop((coordinator, p1, p2, dir));

        let dir = TestDir::new("bench-1pc");
        let p1 = dir.participant("db1", 0, &[], &[]).await;
        let coordinator = dir.coordinator(&[("db1", &p1)], &[]).await;
        let one_phase = run("1PC, 1 participant", &coordinator, &["db1"]).await;
        drop((coordinator, p1, dir));

        two_phase.print();
        one_phase.print();
        let p50 = |r: &Result| r.latency.value_at_quantile(0.5) as f64;
        println!(
            "ratio 2PC / 1PC: throughput {:.2}, p50 latency {:.2}",
            two_phase.rate() / one_phase.rate(),
            p50(&two_phase) / p50(&one_phase)
        );
    });
}
