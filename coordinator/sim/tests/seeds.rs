//! The simulation in every test run: a fixed range of seeds (`PLEDGE_SIM_SEEDS=START..END`
//! changes it), split in two halves that run in parallel. A failure names its seed; replay it
//! with `cargo run -p pledge-sim -- --seed N --trace`.

use pledge_sim::{Options, run};

fn seeds() -> (u64, u64) {
    let spec = std::env::var("PLEDGE_SIM_SEEDS").unwrap_or_else(|_| "0..4000".into());
    let (a, b) = spec.split_once("..").expect("PLEDGE_SIM_SEEDS looks like START..END");
    (a.parse().unwrap(), b.parse().unwrap())
}

fn run_range(from: u64, to: u64) {
    let opts = Options::default();
    let mut crashes = 0;
    for seed in from..to {
        match run(seed, &opts) {
            Ok(report) => crashes += report.coordinator_crashes,
            Err(v) => panic!("{v}\nreplay: cargo run -p pledge-sim -- --seed {} --trace", v.seed),
        }
    }
    // The faults are real: over a range this size the coordinator crashes many times.
    assert!(to - from < 100 || crashes > (to - from) as usize / 10, "only {crashes} coordinator crashes");
}

#[test]
fn first_half_of_the_seeds() {
    let (a, b) = seeds();
    run_range(a, a + (b - a) / 2);
}

#[test]
fn second_half_of_the_seeds() {
    let (a, b) = seeds();
    run_range(a + (b - a) / 2, b);
}

#[test]
fn a_seed_replays_exactly() {
    let opts = Options::default();
    for seed in [7, 1234, 99_999] {
        let (a, b) = (run(seed, &opts).unwrap(), run(seed, &opts).unwrap());
        assert_eq!((a.events, a.sim_ms, a.committed), (b.events, b.sim_ms, b.committed), "seed {seed}");
    }
}
