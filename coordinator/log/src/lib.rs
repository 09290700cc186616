//! Pledge's write-ahead log: the coordinator's decision log and the participant adapters'
//! durable state files.
//!
//! The log knows nothing about transactions. A record is a type byte and a payload; the log
//! gives it the next LSN (log sequence number; the first record gets 1) and makes it durable.
//! Types `0xF0..=0xFF` are reserved for the log's own checkpoint markers.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let mut state = Vec::new();
//! let log = pledge_log::open(pledge_log::LogConfig::new("/var/lib/pledge/log"), |record| {
//!     state.push(record); // rebuild in-memory state
//!     Ok::<(), std::convert::Infallible>(())
//! })?;
//! let writer = log.writer();
//! let lsn = writer.append(1, b"commit T1".to_vec()).await?; // returns after fdatasync
//! log.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! # On-disk format (version 2)
//!
//! A directory of segment files named `{first_lsn:020}.seg` and checkpoint files named
//! `{lsn:020}.ckpt` (zero-padded so that name order is LSN order), plus a `LOCK` file that
//! keeps a second process out. All integers little endian.
//!
//! File header, 24 bytes:
//!
//! | bytes | field     | why |
//! |-------|-----------|-----|
//! | 8     | magic `PLEDGLOG` | refuse a directory holding something else |
//! | 2     | format version (2) | refuse a format this build does not know, instead of misreading it |
//! | 2     | flags: bit 0 = checkpoint file | a file's kind is in the file, not only in its name |
//! | 8     | first_lsn (of a checkpoint: the LSN the segments continue it from) | check that files continue each other with no gap |
//! | 4     | crc32c of the 20 bytes above | tell a torn or damaged header from a valid one |
//!
//! Then **batches**, one per group commit. Batch header, 32 bytes:
//!
//! | bytes | field | why |
//! |-------|-------|-----|
//! | 4 | magic `PLBT` | find batch boundaries; a batch never starts with zeros, so zeros are unwritten space |
//! | 4 | body_bytes | where the next batch starts; above the largest batch the writer makes is invalid |
//! | 8 | first_lsn | the batch's place in the log |
//! | 8 | synced_through | every record up to this LSN was synced before this batch was written: the "synced through" mark |
//! | 4 | crc32c of the body | a batch is whole or it is not: a crash cannot leave half of one looking valid |
//! | 4 | crc32c of the 28 bytes above | a damaged header never misframes |
//!
//! The body is record frames, 17 bytes + payload each:
//!
//! | bytes | field  | why |
//! |-------|--------|-----|
//! | 4     | length = bytes of type + lsn + payload | find the next frame |
//! | 1     | type   | the owner's record type |
//! | 8     | lsn    | consecutive within and across batches and segments: a lost, repeated or misplaced record is detected |
//! | n     | payload | |
//! | 4     | crc32c over length, type, lsn and payload | each record checked on its own too |
//!
//! A batch with no frames is a **synced-through mark**: the writer appends one (without a sync
//! of its own) whenever a sync leaves it idle, so the last batch of a quiet log is vouched for
//! by what follows it, like every other. The active segment is preallocated with zeros in steps
//! of `LogConfig::preallocate_chunk_bytes` so most fdatasyncs need not commit a file-size change
//! (measured here: about 100 µs instead of 220 µs).
//!
//! A checkpoint file holds the owner's snapshot as batches of frames numbered from 1, ended by
//! a reserved `CheckpointEnd` frame that counts them. Version 1 logs (no batches, checkpoints
//! inside segments) are refused with a message saying so; they are read by the build that
//! wrote them.
//!
//! # Writing: one thread, group commit
//!
//! [`open`] starts one dedicated OS thread, fed by a bounded queue (`queue_capacity`). It
//! blocks for a request, takes every request already queued (up to `max_batch_bytes` of
//! frames), assigns LSNs in that order (so file order is LSN order), encodes the frames into
//! one reused buffer behind a batch header, writes them with one call, calls fdatasync once,
//! and only then answers every request in the batch. Nothing is acknowledged before the sync
//! that covers it. An OS thread rather than a tokio task because fdatasync blocks for its whole
//! duration and must not hold a runtime worker. A new segment is started between batches once
//! the active one reaches `segment_size_bytes`; the new file is synced and the directory
//! fsynced before any record is written into it.
//!
//! **A failed write or fsync aborts the process.** After a failed fsync Linux may already have
//! dropped the dirty pages and marked them clean, so retrying can report success for data that
//! never reached the disk. The writer cannot tell its callers the truth about such records, so
//! it stops; the restart's recovery reads what is really on disk.
//!
//! # Checkpoints, off the commit path
//!
//! [`LogWriter::submit_checkpoint`] takes a snapshot of the owner's live state as ordinary
//! records. The writer syncs what it has, starts a new segment at that point (the barrier) and
//! hands the snapshot to a second thread, then goes straight back to committing appends: no
//! commit waits behind a snapshot. The checkpoint thread writes `{barrier}.ckpt` under a
//! temporary name, fdatasyncs it, renames it into place and fsyncs the directory, and only then
//! deletes the segments before the barrier and older checkpoints. So the log stays bounded by
//! the live state plus what was written since the last checkpoint; at most one more checkpoint
//! waits while one is written (the writer waits beyond that).
//!
//! # Recovery ([`open`]), streaming
//!
//! Files are read a batch at a time through a 1 MiB read-ahead (one read per megabyte, not two
//! per batch), so memory stays bounded by that or one batch, whatever the size of a segment or
//! checkpoint.
//!
//! - Replay starts with the newest checkpoint's records (delivered with LSN 0) and goes on with
//!   the segments from its barrier; older checkpoints and the segments before the barrier are
//!   deleted (a crash came between the checkpoint's rename and their deletion). Without a
//!   checkpoint it starts at LSN 1. A checkpoint that is not whole refuses to start: it was
//!   renamed into place only once synced.
//! - In every segment but the last, any damage is corruption: `open` fails, naming file and
//!   offset. LSNs must be consecutive across batches and segments.
//! - In the last segment, damage at offset X is a **torn tail** (a batch cut short by a crash
//!   before its sync returned, so never acknowledged) only if nothing written after it exists:
//!   no valid batch header (a later batch, or the synced-through mark written once a batch is
//!   synced) follows it, and the bytes from X on fit in one batch. A torn tail is truncated
//!   (logged with file, offset and bytes dropped). Damage to a batch something vouches for
//!   refuses to start, naming file and offset: it was synced and may have been acknowledged.
//!   A batch whose later pages reached the disk before its earlier ones is torn, not corrupt:
//!   its checksum covers it whole. Only when a power loss also takes the unsynced mark can
//!   damage to the very last acknowledged batch go unproven, and then only together with
//!   media damage to a batch that was synced.
//! - A last segment whose header is torn and that holds no valid batch is deleted.
//! - What replay read of the last segment is synced before the writer starts, since a batch
//!   the writer writes next vouches for it.
//!
//! Nothing is ever repaired silently: every deletion and truncation is logged at warn level.
//!
//! # Metrics
//!
//! The writer records through the [`metrics`](https://docs.rs/metrics) facade (no-ops until the
//! process installs a recorder); [`describe_metrics`] registers their help texts:
//! `pledge_log_records_total`, `pledge_log_syncs_total`, `pledge_log_bytes_written_total`,
//! `pledge_log_checkpoints_total`, and the histograms `pledge_log_sync_duration_seconds` (each
//! batch's write and fdatasync) and `pledge_log_checkpoint_duration_seconds`. Records per sync
//! is the group-commit batch size.

mod checkpointer;
mod config;
mod error;
mod format;
mod inspect;
mod metrics;
mod reader;
mod recovery;
mod segment;
mod writer;

pub use config::LogConfig;
pub use error::{Corruption, LogError, OpenError};
pub use format::{BatchHeaderError, FIRST_RESERVED_TYPE, HeaderError};
pub use inspect::{Inspect, InspectError, InspectItem, InspectedRecord, inspect};
pub use metrics::describe_metrics;
pub use writer::{Durable, Log, LogStats, LogWriter};

/// Log sequence number: the position of a record in the log. The first record gets 1;
/// 0 means "nothing".
pub type Lsn = u64;

/// A record delivered to the replay callback of [`open`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The record's LSN; 0 for a checkpoint's records.
    pub lsn: Lsn,
    pub rtype: u8,
    pub payload: Vec<u8>,
}

/// Opens (or creates) the log in `config.dir`, replays it through `replay`, then starts the
/// writer thread.
///
/// `replay` sees the records of the newest checkpoint (with LSN 0), then every record after it
/// in LSN order; never the checkpoint markers. If `open` fails, discard whatever `replay` was given:
/// corruption found late in the log still fails the whole open. Blocking (file I/O); from async
/// code call it inside `spawn_blocking`.
pub fn open<E, F>(config: LogConfig, mut replay: F) -> Result<Log, OpenError<E>>
where
    F: FnMut(Record) -> Result<(), E>,
{
    let recovered = recovery::recover(&config, &mut replay)?;
    Log::start(&config, recovered).map_err(|e| OpenError::io(&config.dir, e))
}
