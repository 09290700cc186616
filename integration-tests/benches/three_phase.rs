//! Three-phase commit beside two-phase commit: the same coordinator and the same two reference
//! participants, the same end-to-end load (`bench::e2e`: Begin with a branch at each, a Put in
//! each, Commit), the protocols alternating (2PC, 3PC, 2PC, 3PC) in one invocation so that
//! their ratio is meaningful. Three-phase costs one more round trip to the participants
//! (PreCommit) and one more forced write (the pre-commit record) per transaction.
//!
//! ```sh
//! cargo build --release -p pledge-coordinator -p pledge-sdk --bins
//! cargo bench -p pledge-integration-tests --bench three_phase
//! ```
//! Settings as for `benches/e2e.rs` (BENCH_CLIENTS, BENCH_SECONDS, BENCH_WARMUP_SECONDS,
//! BENCH_API, BENCH_CHANNELS, BENCH_RATE, BENCH_DIR), and BENCH_ROUNDS (2).

use pledge_integration_tests::TestDir;
use pledge_integration_tests::bench::e2e::{print, run_with};
use pledge_integration_tests::bench::env_or;
use pledge_proto::v1::Protocol;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        if let Some(dir) = std::env::var_os("BENCH_DIR") {
            // SAFETY: single-threaded at this point of the benchmark's start-up.
            unsafe { std::env::set_var("TMPDIR", dir) };
        }
        let dir = TestDir::new("bench-3pc");
        let p1 = dir.participant("db1", 0, &[], &[]).await;
        let p2 = dir.participant("db2", 0, &[], &[]).await;
        let args = ["--recovery-interval-ms", "30000"];
        let coordinator = dir.coordinator_with(&[("db1", &p1), ("db2", &p2)], &args, &[]).await;
        let participants = [("db1", &p1), ("db2", &p2)];
        let rounds = env_or("BENCH_ROUNDS", 2);
        println!(
            "three-phase vs two-phase: {rounds} rounds, binaries from {}",
            pledge_integration_tests::bin_dir().display()
        );
        for round in 1..=rounds {
            let two = run_with(&[&coordinator], &participants, Protocol::TwoPhase).await;
            let three = run_with(&[&coordinator], &participants, Protocol::ThreePhase).await;
            print(&format!("round {round}: 2PC"), &two);
            print(&format!("round {round}: 3PC"), &three);
            println!(
                "round {round}: ratio 3PC / 2PC: throughput {:.2}, p50 latency {:.2}, p99 latency {:.2}",
                three.rate() / two.rate(),
                three.ms(0.5) / two.ms(0.5),
                three.ms(0.99) / two.ms(0.99)
            );
        }
    });
}
