//! Pledge's coordinator. Where things are:
//!
//! * [`engine`]: the 2PC state machine, free of I/O (events in, commands out).
//! * [`records`]: how engine records are stored in the decision log (`pledge-log`).
//! * [`store`]: the decision log at the driver boundary (the seam a replicated store plugs
//!   into) and the embedded local store.
//! * [`limits`]: every limit, with the range it is checked against at start.
//! * [`driver`]: the runtime that runs the engine: log appends, batched participant calls,
//!   retries and timers.
//! * [`metrics`]: the Prometheus metrics it records.
//! * [`api`]: the gRPC Coordinator service and the error -> status mapping.
//! * [`recovery`]: log replay and in-doubt resolution after a restart.
//! * [`server`]: `pledge serve` wiring (data directory, health, reflection, shutdown).
//! * [`config`]: settings and their defaults.
//! * [`cli`]: the `pledge` command line.

pub mod api;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod driver;
pub mod engine;
pub mod limits;
pub mod metrics;
pub mod records;
pub mod recovery;
pub mod server;
pub mod store;
