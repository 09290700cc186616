//! Recovery after a restart, in three steps:
//!
//! 1. [`open_log`] replays the decision log (from its newest checkpoint) into records;
//!    [`Engine::restore`](crate::engine::Engine::restore) rebuilds every committed transaction
//!    that had not finished, and the finished ones still within their retention.
//! 2. [`Engine::start`](crate::engine::Engine::start) resumes phase 2 of those transactions:
//!    committed branches that have not acknowledged are told to commit again (idempotent).
//! 3. The runtime asks every known participant for its in-doubt (prepared) branches, at start
//!    and then every `recovery_interval_ms` (participants unreachable now are asked again
//!    later), and the engine resolves each against the log: commit if there is a commit
//!    record, abort if there is none (presumed abort), leave it alone if its transaction is
//!    still being decided.

use anyhow::Context;
use pledge_log::{Log, LogConfig, OpenError};

use crate::engine::LogRecord;
use crate::records::{self, DecodeError};

/// Opens the decision log and decodes every record to replay. Refuses to start on corruption
/// (naming the file and offset) and on a record this version cannot read (naming its LSN).
pub fn open_log(config: LogConfig) -> anyhow::Result<(Log, Vec<LogRecord>)> {
    let dir = config.dir.clone();
    let mut replayed = Vec::new();
    let log = pledge_log::open(config, |record| {
        replayed.push(records::decode(record.rtype, &record.payload)?);
        Ok::<(), DecodeError>(())
    })
    .map_err(|e| match e {
        OpenError::Replay { lsn, source } => {
            anyhow::anyhow!("decision log {}: record at LSN {lsn} cannot be read: {source}", dir.display())
        }
        other => anyhow::Error::from(other),
    })
    .context("refusing to start: the decision log cannot be opened")?;
    Ok((log, replayed))
}
