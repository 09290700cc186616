//! `pledge-sim`: runs the coordinator simulation over many seeds (see the crate docs).
//!
//! ```text
//! pledge-sim --seeds 0..100000        # a range of seeds
//! pledge-sim --for-secs 3600          # random seeds for an hour
//! pledge-sim --seed 4242 --trace      # replay one seed, event by event
//! ```
//! Exits 1 at the first failing seed, naming it.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use pledge_sim::{Options, run};

#[derive(Parser)]
#[command(about = "Deterministic simulation of the Pledge coordinator")]
struct Args {
    /// Seeds to run, as START..END (END excluded).
    #[arg(long, default_value = "0..1000", conflicts_with_all = ["seed", "for_secs"])]
    seeds: String,
    /// One seed (with --trace, replay it event by event).
    #[arg(long)]
    seed: Option<u64>,
    /// Run random seeds until this many seconds have passed.
    #[arg(long)]
    for_secs: Option<u64>,
    /// Client transactions per seed.
    #[arg(long, default_value_t = 60)]
    transactions: usize,
    /// Concurrent clients per seed.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Print every event of the run (use with --seed).
    #[arg(long)]
    trace: bool,
    /// Share of transactions that run three-phase commit.
    #[arg(long, default_value_t = 0.5)]
    three_phase_share: f64,
    /// Partition participants from the coordinator for longer than three-phase commit's timeouts.
    #[arg(long)]
    partitions: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let opts = Options {
        transactions: args.transactions,
        clients: args.clients,
        trace: args.trace,
        three_phase_share: args.three_phase_share,
        partitions: args.partitions,
    };
    let started = Instant::now();
    let mut ran = 0u64;
    let mut one = |seed: u64| -> bool {
        ran += 1;
        match run(seed, &opts) {
            Ok(report) => {
                if opts.trace {
                    println!("seed {seed}: ok {report:?}");
                }
                true
            }
            Err(v) => {
                println!("FAILED {v}");
                println!("replay: cargo run -p pledge-sim -- --seed {} --trace", v.seed);
                false
            }
        }
    };
    let ok = if let Some(seed) = args.seed {
        one(seed)
    } else if let Some(secs) = args.for_secs {
        let until = started + Duration::from_secs(secs);
        let mut rng = fastrand::Rng::new();
        let mut ok = true;
        while ok && Instant::now() < until {
            ok = one(rng.u64(..));
        }
        ok
    } else {
        let Some((a, b)) = args.seeds.split_once("..").and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
        else {
            eprintln!("error: --seeds must look like START..END");
            return ExitCode::from(2);
        };
        (a..b).all(&mut one)
    };
    println!("{ran} seeds in {:.1} s: {}", started.elapsed().as_secs_f64(), if ok { "ok" } else { "FAILED" });
    if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
