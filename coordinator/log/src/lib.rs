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
//! # On-disk format
//!
//! A directory of segment files named `{first_lsn:020}.seg` (zero-padded so that name order is
//! LSN order), plus a `LOCK` file that keeps a second process out. All integers little endian.
//!
//! Segment header, 24 bytes:
//!
//! | bytes | field     | why |
//! |-------|-----------|-----|
//! | 8     | magic `PLEDGLOG` | refuse a directory holding something else |
//! | 2     | format version (1) | refuse a format this build does not know, instead of misreading it |
//! | 2     | flags: bit 0 = segment begins with a checkpoint | find the replay start by reading headers only |
//! | 8     | first_lsn | check that segments continue each other with no gap |
//! | 4     | crc32c of the 20 bytes above | tell a torn or damaged header from a valid one |
//!
//! Record frame, 17 bytes + payload:
//!
//! | bytes | field  | why |
//! |-------|--------|-----|
//! | 4     | length = bytes of type + lsn + payload | find the next frame; 0..=8 or above `max_record_bytes + 9` is invalid, so garbage rarely looks like a frame and never makes us read gigabytes |
//! | 1     | type   | the owner's record type |
//! | 8     | lsn    | every frame carries its LSN so a lost, repeated or misplaced frame is detected, and the torn-tail rule can tell old data from new |
//! | n     | payload | |
//! | 4     | crc32c over length, type, lsn and payload | detect torn and damaged frames; CRC32C is hardware-accelerated and covers the length too, so a damaged length cannot silently misframe |
//!
//! The checksum sits after the payload (as in tikv/raft-engine), so a frame can be encoded in
//! one pass into the batch buffer. The active segment is preallocated with zeros in steps of
//! `LogConfig::preallocate_chunk_bytes` so most fdatasyncs need not commit a file-size change
//! (measured here: about 100 µs instead of 220 µs); a frame never starts with a zero length, so
//! readers treat an all-zero remainder as the end of the data.
//!
//! A checkpoint segment starts with a reserved `CheckpointBegin` frame (payload: record count),
//! then the owner's snapshot records, then a reserved `CheckpointEnd` frame (payload: the begin
//! LSN and the record count). The markers take LSNs like any frame; the replay callback never
//! sees them. Ordinary records follow in the same segment.
//!
//! # Writing: one thread, group commit
//!
//! [`open`] starts one dedicated OS thread, fed by a bounded queue (`queue_capacity`). It
//! blocks for a request, takes every request already queued (up to `max_batch_bytes` of
//! frames), assigns LSNs in that order (so file order is LSN order), encodes the frames into
//! one reused buffer, writes them with one call, calls fdatasync once, and only then answers
//! every request in the batch. Nothing is acknowledged before the sync that covers it. An OS
//! thread rather than a tokio task because fdatasync blocks for its whole duration and must not
//! hold a runtime worker. A new segment is started between batches once the active one reaches
//! `segment_size_bytes`; the new file is synced and the directory fsynced before any record is
//! written into it.
//!
//! **A failed write or fsync aborts the process.** After a failed fsync Linux may already have
//! dropped the dirty pages and marked them clean, so retrying can report success for data that
//! never reached the disk. The writer cannot tell its callers the truth about such records, so
//! it stops; the restart's recovery reads what is really on disk.
//!
//! # Checkpoints
//!
//! [`LogWriter::checkpoint`] takes a snapshot of the owner's live state as ordinary records.
//! The writer syncs what it has, writes a new checkpoint segment under a temporary name,
//! fdatasyncs it, renames it into place and fsyncs the directory, and only then deletes every
//! older segment (and fsyncs the directory again). So the log stays bounded by live state plus
//! what was written since the last checkpoint.
//!
//! # Recovery ([`open`])
//!
//! - Replay starts at the newest segment that begins with a complete checkpoint (begin and end
//!   markers present and valid); older segments are deleted (a crash came between the
//!   checkpoint's sync and their deletion). Without a checkpoint it starts at LSN 1.
//! - An incomplete checkpoint can only be the torn end of the log (nothing is written after a
//!   checkpoint before it is synced): its segment is deleted and replay falls back to the
//!   previous complete checkpoint, or to the beginning. Anywhere else it is corruption.
//! - In every segment but the last, an invalid frame is corruption: `open` fails, naming file
//!   and offset. LSNs must be consecutive across frames and segments.
//! - In the last segment, damage at offset X is a **torn tail** (the unsynced end of the final
//!   batch, never acknowledged) only if nothing valid follows it: the non-zero bytes from X on
//!   are fewer than `max_batch_bytes` plus one frame (the most one unsynced batch can hold), and
//!   no offset after X starts a CRC-valid frame with an LSN above the last good one. A torn tail
//!   is truncated (logged with file, offset and bytes dropped); anything else is corruption.
//!   If a crash persisted a batch's later pages but not its earlier ones, this refuses to start
//!   rather than guess; [`inspect`] shows the operator what is there.
//! - A last segment whose header is torn and that holds no valid frame is deleted.
//!
//! Nothing is ever repaired silently: every deletion and truncation is logged at warn level.
//!
//! # Metrics
//!
//! The writer records through the [`metrics`](https://docs.rs/metrics) facade (no-ops until the
//! process installs a recorder); [`describe_metrics`] registers their help texts:
//! `pledge_log_records_total`, `pledge_log_syncs_total`, `pledge_log_bytes_written_total`,
//! `pledge_log_checkpoints_total`, and the histogram `pledge_log_sync_duration_seconds` (each
//! batch's write and fdatasync). Records per sync is the group-commit batch size.

mod config;
mod error;
mod format;
mod inspect;
mod metrics;
mod recovery;
mod segment;
mod writer;

pub use config::LogConfig;
pub use error::{Corruption, LogError, OpenError};
pub use format::{FIRST_RESERVED_TYPE, HeaderError};
pub use inspect::{Inspect, InspectError, InspectItem, InspectedRecord, inspect};
pub use metrics::describe_metrics;
pub use writer::{Durable, Log, LogStats, LogWriter};

/// Log sequence number: the position of a record in the log. The first record gets 1;
/// 0 means "nothing".
pub type Lsn = u64;

/// A record delivered to the replay callback of [`open`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub lsn: Lsn,
    pub rtype: u8,
    pub payload: Vec<u8>,
}

/// Opens (or creates) the log in `config.dir`, replays it through `replay`, then starts the
/// writer thread.
///
/// `replay` sees, in LSN order, the records of the newest complete checkpoint and every record
/// after it; never the checkpoint markers. If `open` fails, discard whatever `replay` was given:
/// corruption found late in the log still fails the whole open. Blocking (file I/O); from async
/// code call it inside `spawn_blocking`.
pub fn open<E, F>(config: LogConfig, mut replay: F) -> Result<Log, OpenError<E>>
where
    F: FnMut(Record) -> Result<(), E>,
{
    let recovered = recovery::recover(&config, &mut replay)?;
    Log::start(&config, recovered).map_err(|e| OpenError::io(&config.dir, e))
}
