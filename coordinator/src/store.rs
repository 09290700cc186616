//! The decision log at the driver boundary: where the engine's records become durable.
//!
//! The runtime asks three things of a store, and nothing else:
//! * **ordered appends**: a record is never durable before one appended ahead of it, and a
//!   record the engine waits for ([`LogRecord`] with a sync token) comes with a [`Durable`]
//!   that resolves once it is; lazy records ride along with a later sync;
//! * **snapshots with a barrier**: a snapshot reflects exactly the records appended before it,
//!   and once it is durable a restart replays the snapshot and whatever followed it;
//! * **an epoch**: the store's writer holds one, and the engine stamps it on every decision
//!   record. A replicated store admits a write only while its epoch is the current owner's,
//!   checked in the same transaction as the write (a fencing token, never a clock); here the
//!   local store's directory lock is the fence, and its epoch counts the coordinator's starts,
//!   so `pledge log inspect` shows which run decided what.
//!
//! A store failure is fatal to the runtime: it cannot tell a waiting caller the truth about a
//! record it could not make durable, so it stops and the restart's recovery reads the store.
//! The one exception is a fenced write in a cluster ([`StoreError::Fenced`]): the shard has a
//! new owner, who reads the store; this instance drops the shard and goes on with the others.
//!
//! [`LocalLog`] is the embedded store: `pledge-log`, a directory on this machine.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;

use anyhow::Context;
use pledge_log::LogWriter;

use crate::engine::LogRecord;
use crate::records;

/// Resolves once a record (or snapshot) is durable.
pub type Durable = Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send>>;

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Fatal to the runtime (see the module docs).
    #[error("decision log: {0}")]
    Failed(String),
    /// Cluster: the write was refused because `shard` is no longer this instance's at
    /// `epoch` (another instance took it over). Not fatal: the runtime drops the shard.
    #[error("decision store: shard {shard} is no longer ours at epoch {epoch}")]
    Fenced { shard: u16, epoch: u64 },
}

/// See the module docs.
pub trait DecisionLog: Send + 'static {
    /// Appends `record` after every record appended before. With `durable`, the returned
    /// [`Durable`] resolves once it is on stable storage; without, it becomes durable with a
    /// later sync (`None`).
    fn append(
        &mut self,
        record: &LogRecord,
        durable: bool,
    ) -> impl Future<Output = Result<Option<Durable>, StoreError>> + Send;

    /// Writes a snapshot of the live state as of every record appended before it.
    fn snapshot(&mut self, records: &[LogRecord]) -> impl Future<Output = Result<Durable, StoreError>> + Send;

    /// The writer's epoch, stamped on decision records.
    fn epoch(&self) -> u64;
}

/// The embedded store: records encoded by [`records`], appended to a `pledge-log` directory.
pub struct LocalLog {
    writer: LogWriter,
    epoch: u64,
}

impl LocalLog {
    pub fn new(writer: LogWriter, epoch: u64) -> Self {
        LocalLog { writer, epoch }
    }
}

impl DecisionLog for LocalLog {
    async fn append(&mut self, record: &LogRecord, durable: bool) -> Result<Option<Durable>, StoreError> {
        let (rtype, payload) = records::encode(record);
        if durable {
            let synced = self.writer.submit(rtype, payload).await.map_err(log_error)?;
            Ok(Some(Box::pin(async move { synced.await.map(drop).map_err(log_error) })))
        } else {
            self.writer.append_lazy(rtype, payload).await.map_err(log_error)?;
            Ok(None)
        }
    }

    async fn snapshot(&mut self, records: &[LogRecord]) -> Result<Durable, StoreError> {
        // Queued now, in order after the records it reflects; written and synced by the log's
        // checkpoint thread while the writer goes on.
        let encoded = records.iter().map(records::encode).collect();
        let written = self.writer.submit_checkpoint(encoded).await.map_err(log_error)?;
        Ok(Box::pin(async move { written.await.map(drop).map_err(log_error) }))
    }

    fn epoch(&self) -> u64 {
        self.epoch
    }
}

fn log_error(e: pledge_log::LogError) -> StoreError {
    StoreError::Failed(e.to_string())
}

/// The file in the data directory that counts the coordinator's starts (the local epoch).
pub const EPOCH_FILE: &str = "epoch";

/// Takes the next local epoch: one more than the last start's, kept in `<data_dir>/epoch`
/// (written to a temporary file, synced and renamed, so a crash leaves the old or the new).
pub fn next_local_epoch(data_dir: &Path) -> anyhow::Result<u64> {
    let path = data_dir.join(EPOCH_FILE);
    let last = match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse::<u64>().with_context(|| format!("{} is damaged", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let epoch = last + 1;
    crate::server::write_atomically(&path, format!("{epoch}\n").as_bytes())?;
    Ok(epoch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_start_takes_the_next_epoch() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(next_local_epoch(dir.path()).unwrap(), 1);
        assert_eq!(next_local_epoch(dir.path()).unwrap(), 2);
        std::fs::write(dir.path().join(EPOCH_FILE), "garbage").unwrap();
        assert!(next_local_epoch(dir.path()).unwrap_err().to_string().contains("is damaged"));
    }
}
