use std::path::PathBuf;

use crate::format::{MAX_RECORD_BYTES_LIMIT, SEGMENT_HEADER_BYTES};

/// How a log is laid out and bounded. Build it with [`LogConfig::new`] and adjust fields.
///
/// The reader applies the same bounds as the writer: `max_record_bytes` decides which frame
/// lengths are plausible, and `max_batch_bytes` decides how much damage at the end of the log
/// can still be a torn write. Lowering either for an existing log can make `open` refuse it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// Directory holding the segment files (created if missing).
    pub dir: PathBuf,
    /// A segment is closed and a new one started once its size reaches this many bytes
    /// (checked between batches, so a segment may exceed it by one batch).
    pub segment_size_bytes: u64,
    /// The writer stops taking queued requests into a batch once the encoded frames reach this
    /// many bytes. Also bounds how large a torn write at the tail can be (see crate docs).
    pub max_batch_bytes: usize,
    /// Largest payload `append` accepts.
    pub max_record_bytes: usize,
    /// Requests that may wait in the writer's queue; `append` waits for room beyond it
    /// (back-pressure instead of unbounded memory).
    pub queue_capacity: usize,
    /// The writer extends the active segment with zeros in steps of this many bytes, so that
    /// most fdatasyncs only flush data and need not also commit a new file size to the
    /// filesystem journal (measured: about half the cost per sync). 0 turns it off.
    pub preallocate_chunk_bytes: u64,
}

impl LogConfig {
    /// Defaults: 64 MiB segments, 1 MiB batches and records, 4096 queued requests, 1 MiB
    /// preallocation steps.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        const MIB: usize = 1 << 20;
        Self {
            dir: dir.into(),
            segment_size_bytes: 64 * MIB as u64,
            max_batch_bytes: MIB,
            max_record_bytes: MIB,
            queue_capacity: 4096,
            preallocate_chunk_bytes: MIB as u64,
        }
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.segment_size_bytes <= SEGMENT_HEADER_BYTES as u64 {
            return Err(format!(
                "segment_size_bytes ({}) must exceed the segment header ({SEGMENT_HEADER_BYTES} bytes)",
                self.segment_size_bytes
            ));
        }
        if self.max_batch_bytes == 0 {
            return Err("max_batch_bytes must be positive".into());
        }
        if self.max_record_bytes > MAX_RECORD_BYTES_LIMIT {
            return Err(format!(
                "max_record_bytes ({}) exceeds what a frame can hold ({MAX_RECORD_BYTES_LIMIT})",
                self.max_record_bytes
            ));
        }
        if self.queue_capacity == 0 {
            return Err("queue_capacity must be positive".into());
        }
        Ok(())
    }
}
