//! End-to-end throughput and latency: committed transactions per second through a real
//! coordinator (fsync on) with reference participants, all on this machine: over loopback TCP,
//! or with BENCH_TRANSPORT=unix over Unix sockets (every hop: clients to coordinator,
//! coordinator to participants).
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
//! BENCH_API (pipeline: Begin and Commit on the coordinator's pipeline stream, one per
//! connection; unary: unary calls), BENCH_CHANNELS (HTTP/2 connections shared by the clients:
//! 2 for the pipeline, where fewer connections coalesce more messages per write; 8 for unary
//! calls), BENCH_DIR (where data goes;
//! must be a real disk so fsync costs what it costs), BENCH_PARTICIPANT_DIR (where the
//! participants' data goes, default BENCH_DIR: on one machine three processes fsyncing one
//! virtual disk contend for it, which participants on their own hosts would not), BENCH_RATE (0: each client starts its
//! next transaction as soon as the last one ends, i.e. maximum throughput; N: the clients
//! together start N transactions per second on a fixed schedule, and latency is measured from
//! the scheduled start, so a stall counts against every transaction it delays), BENCH_TRANSPORT
//! (tcp or unix), BENCH_METRICS (0; 1: every process records and serves Prometheus metrics,
//! to measure what they cost).

use pledge_integration_tests::bench::e2e::{Api, api, load, print, run};
use pledge_integration_tests::bench::env_or;
use pledge_integration_tests::{Process, TestDir};

/// The coordinator's own recovery interval, not the tests' 500 ms.
const RECOVERY_DEFAULT: &[&str] = &["--recovery-interval-ms", "30000"];

/// Extra arguments of every process: a metrics endpoint if BENCH_METRICS=1.
fn metrics_args() -> &'static [&'static str] {
    match env_or("BENCH_METRICS", 0) {
        0 => &[],
        _ => &["--metrics-listen", "127.0.0.1:0"],
    }
}

/// Where a benchmark process listens: a free loopback port, or a Unix socket in `dir`.
fn listen(dir: &TestDir, name: &str) -> String {
    match env_or("BENCH_TRANSPORT", "tcp".to_string()).as_str() {
        "tcp" => "127.0.0.1:0".into(),
        "unix" => format!("unix:{}", dir.path().join(format!("{name}.sock")).display()),
        other => panic!("BENCH_TRANSPORT: tcp or unix, not {other:?}"),
    }
}

/// A coordinator in `dir` with these participants, listening as BENCH_TRANSPORT says.
async fn start_coordinator(dir: &TestDir, participants: &[(&str, &Process)]) -> Process {
    let listen = listen(dir, "coordinator");
    let args = [RECOVERY_DEFAULT, &["--listen", &listen], metrics_args()].concat();
    dir.coordinator_with(participants, &args, &[]).await
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        if let Some(dir) = std::env::var_os("BENCH_DIR") {
            // SAFETY: single-threaded at this point of the benchmark's start-up.
            unsafe { std::env::set_var("TMPDIR", dir) };
        }
        let l = load();
        println!(
            "end-to-end benchmark: {} clients ({} calls), {}, {} s per run, over {}{}, binaries from {}",
            l.clients,
            if api() == Api::Pipeline { "pipeline" } else { "unary" },
            match l.rate_per_second {
                0 => "as fast as they can".to_string(),
                r => format!("{r} transactions/s scheduled"),
            },
            l.measure.as_secs(),
            env_or("BENCH_TRANSPORT", "tcp".to_string()),
            if metrics_args().is_empty() { "" } else { ", metrics on" },
            pledge_integration_tests::bin_dir().display()
        );

        let participants_dir = || match std::env::var_os("BENCH_PARTICIPANT_DIR") {
            Some(base) => TestDir::new_in("bench-participants", base.as_ref()),
            None => TestDir::new("bench-participants"),
        };
        let (dir, pdir) = (TestDir::new("bench-2pc"), participants_dir());
        println!("coordinator data in {}, participants' in {}", dir.path().display(), pdir.path().display());
        let p1 = pdir.participant_on("db1", &listen(&pdir, "db1"), metrics_args(), &[]).await;
        let p2 = pdir.participant_on("db2", &listen(&pdir, "db2"), metrics_args(), &[]).await;
        let coordinator = start_coordinator(&dir, &[("db1", &p1), ("db2", &p2)]).await;
        let two_phase = run(&[&coordinator], &[("db1", &p1), ("db2", &p2)]).await;
        drop((coordinator, p1, p2, dir, pdir));

        let (dir, pdir) = (TestDir::new("bench-1pc"), participants_dir());
        let p1 = pdir.participant_on("db1", &listen(&pdir, "db1"), metrics_args(), &[]).await;
        let coordinator = start_coordinator(&dir, &[("db1", &p1)]).await;
        let one_phase = run(&[&coordinator], &[("db1", &p1)]).await;
        drop((coordinator, p1, dir, pdir));

        print("2PC, 2 participants", &two_phase);
        print("1PC, 1 participant", &one_phase);
        println!(
            "ratio 2PC / 1PC: throughput {:.2}, p50 latency {:.2}",
            two_phase.rate() / one_phase.rate(),
            two_phase.ms(0.5) / one_phase.ms(0.5)
        );
    });
}
