//! A deterministic simulation of Pledge's coordinator.
//!
//! The real [`Engine`](pledge_coordinator::engine::Engine) runs, record for record: its log
//! records are encoded and decoded by the real [`records`](pledge_coordinator::records) code,
//! and after a crash it is rebuilt by the real `Engine::restore` from whatever the simulated
//! disk kept. Around it, everything is simulated and driven by one seeded random number
//! generator and one simulated clock, so a seed replays exactly:
//!
//! * **clients** begin transactions over 1 to 3 branches (with idempotency keys), do work at
//!   the participants, then commit, abort or abandon them, retrying calls that got no answer;
//! * **participants** that keep a durable journal as the SDK's `Journaled` does (prepared,
//!   committed and aborted branches survive their crash; unprepared work does not), vote no
//!   now and then, and list their prepared branches to recovery scans;
//! * **the network** between them delays, loses, duplicates and so reorders messages; a call
//!   whose answer does not come back in time fails, as the real driver's deadline makes it;
//! * **the disk** keeps appended records in a page cache until a group commit syncs them; a
//!   crash keeps a random prefix of the unsynced ones (a torn or lost tail), and a failed
//!   fsync ends the process as the real log writer does;
//! * **crashes and restarts** of the coordinator and of participants, at any moment.
//!
//! What the real driver adds around the engine (batching, tonic, the log writer thread) is
//! replaced by this simulation's own execution of the engine's commands; its decisions (vote
//! matching, metadata bounds) have unit tests of their own.
//!
//! The [`oracle`] checks every run: atomicity at the participants, no branch left in doubt
//! once faults stop, every answer a client heard consistent with what the participants did and
//! with every other answer, no call left unanswered, and no outcome forgotten within the
//! retention window. A call that timed out is *unknown*, never taken as absent.
//!
//! Run it: `cargo run --release -p pledge-sim -- --seeds 0..100000`, or for an hour:
//! `cargo run --release -p pledge-sim -- --for-secs 3600`. A failing seed prints its number;
//! `--seed N --trace` replays it event by event.

mod oracle;
mod participant;
mod world;

pub use oracle::Violation;
pub use world::{Faults, Options, Report, run};
