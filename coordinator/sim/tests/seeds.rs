//! The simulation in every test run: a fixed range of seeds (`PLEDGE_SIM_SEEDS=START..END`
//! changes it), split in two halves that run in parallel, half the transactions three-phase.
//! A failure names its seed; replay it with `cargo run -p pledge-sim -- --seed N --trace`.

use pledge_sim::{Options, run};

fn seeds() -> (u64, u64) {
    let spec = std::env::var("PLEDGE_SIM_SEEDS").unwrap_or_else(|_| "0..4000".into());
    let (a, b) = spec.split_once("..").expect("PLEDGE_SIM_SEEDS looks like START..END");
    (a.parse().unwrap(), b.parse().unwrap())
}

fn run_range(from: u64, to: u64) {
    let opts = Options::default();
    let (mut crashes, mut three_phase) = (0, 0);
    let mut three_phase_committed = 0;
    for seed in from..to {
        match run(seed, &opts) {
            // Within three-phase commit's assumption (crash-stop, bounded delay), branches
            // never end differently, whatever crashes and message loss do.
            Ok(report) if report.heuristic_mixed > 0 => {
                panic!("seed {seed}: {} heuristic mixed transactions without a partition", report.heuristic_mixed)
            }
            Ok(report) => {
                crashes += report.coordinator_crashes;
                three_phase += report.three_phase;
                three_phase_committed += report.three_phase_committed;
            }
            Err(v) => panic!("{v}\nreplay: cargo run -p pledge-sim -- --seed {} --trace", v.seed),
        }
    }
    // The faults are real: over a range this size the coordinator crashes many times.
    assert!(to - from < 100 || crashes > (to - from) as usize / 10, "only {crashes} coordinator crashes");
    assert!(to - from < 100 || three_phase > (to - from) as usize, "only {three_phase} three-phase transactions");
    // ... and they commit through the PreCommit round, not only abort.
    assert!(
        to - from < 100 || three_phase_committed > three_phase / 20,
        "{three_phase_committed} of {three_phase} three-phase transactions committed with a prepare round"
    );
}

/// Outside the assumption: partitions longer than the timeouts. Branches may then end
/// differently, and every such transaction must be reported heuristic mixed (the oracle fails
/// a run where branches disagree silently). Over the range, some do.
#[test]
fn partitions_past_the_timeouts_end_as_reported_heuristics_never_silently() {
    let (a, b) = seeds();
    let (from, to) = (a, a + (b - a) / 4);
    let opts = Options { partitions: true, three_phase_share: 1.0, ..Options::default() };
    let (mut partitions, mut mixed) = (0, 0);
    for seed in from..to {
        match run(seed, &opts) {
            Ok(report) => {
                partitions += report.partitions;
                mixed += report.heuristic_mixed;
            }
            Err(v) => panic!("{v}\nreplay: cargo run -p pledge-sim -- --partitions --seed {} --trace", v.seed),
        }
    }
    assert!(to - from < 100 || (partitions > 0 && mixed > 0), "{partitions} partitions, {mixed} heuristic mixed");
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
