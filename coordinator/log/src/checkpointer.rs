//! The checkpoint thread: writes snapshots into their own files while the writer thread goes on
//! committing appends, so no commit's sync waits behind a snapshot.
//!
//! For each job it writes `{barrier:020}.ckpt.tmp` (a header, then batches of the snapshot's
//! records and an end marker that counts them), fdatasyncs it, renames it to `.ckpt`, fsyncs
//! the directory, and only then deletes the segments before the barrier and older checkpoints
//! (and fsyncs the directory again). The rename makes a checkpoint appear whole or not at all.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::thread::JoinHandle;

use bytes::Bytes;
use tokio::sync::oneshot;
use tracing::{info, warn};

use crate::Lsn;
use crate::config::LogConfig;
use crate::format::{self, BATCH_HEADER_BYTES, SegmentHeader};
use crate::segment;
use crate::writer::{Shared, or_abort};

/// Checkpoints waiting for the thread while it writes another. The writer blocks beyond it:
/// snapshots asked for faster than they can be written are pushed back on their owner.
const QUEUED_CHECKPOINTS: usize = 1;

/// A snapshot to write: it reflects every record below `barrier_lsn`.
pub(crate) struct Job {
    pub barrier_lsn: Lsn,
    pub records: Vec<(u8, Bytes)>,
    pub done: oneshot::Sender<Lsn>,
}

pub(crate) struct Checkpointer {
    tx: mpsc::SyncSender<Job>,
    thread: JoinHandle<()>,
}

impl Checkpointer {
    pub(crate) fn submit(&self, job: Job) {
        // The thread ends only when this sender is dropped (or it aborted the process).
        let _ = self.tx.send(job);
    }

    /// Waits until every submitted checkpoint is written.
    pub(crate) fn finish(self) {
        drop(self.tx);
        let _ = self.thread.join();
    }
}

pub(crate) fn start(config: &LogConfig, dir: File, shared: Arc<Shared>) -> std::io::Result<Checkpointer> {
    let (tx, rx) = mpsc::sync_channel::<Job>(QUEUED_CHECKPOINTS);
    let dir_path = config.dir.clone();
    let max_batch_bytes = config.max_batch_bytes;
    let thread = std::thread::Builder::new().name("pledge-log-checkpoint".into()).spawn(move || {
        for job in rx {
            write(&dir_path, &dir, &shared, max_batch_bytes, job);
        }
    })?;
    Ok(Checkpointer { tx, thread })
}

fn write(dir_path: &Path, dir: &File, shared: &Shared, max_batch_bytes: usize, job: Job) {
    let started = std::time::Instant::now();
    let barrier = job.barrier_lsn;
    let tmp_path = segment::tmp_checkpoint_path(dir_path, barrier);
    let final_path = segment::checkpoint_path(dir_path, barrier);
    let opened = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp_path);
    let file = or_abort(opened, "creating checkpoint file", &tmp_path);
    let header = format::encode_header(SegmentHeader { first_lsn: barrier, checkpoint_file: true });
    or_abort(file.write_all_at(&header, 0), "write", &tmp_path);
    let mut offset = header.len() as u64;

    // Batches of at most max_batch_bytes (plus one frame), so a reader needs no more memory
    // than for the segments. Frames are numbered 1..=n within the file; the end marker n + 1.
    let record_count = job.records.len() as u64;
    let mut batch = BatchBuf { buf: Vec::with_capacity(max_batch_bytes + BATCH_HEADER_BYTES), first_lsn: 1 };
    let mut flush = |batch: &mut BatchBuf, next_lsn: Lsn| {
        if batch.buf.len() > BATCH_HEADER_BYTES {
            let h = format::encode_batch_header(batch.first_lsn, 0, &batch.buf[BATCH_HEADER_BYTES..]);
            batch.buf[..BATCH_HEADER_BYTES].copy_from_slice(&h);
            or_abort(file.write_all_at(&batch.buf, offset), "write", &tmp_path);
            offset += batch.buf.len() as u64;
        }
        batch.buf.clear();
        batch.buf.resize(BATCH_HEADER_BYTES, 0);
        batch.first_lsn = next_lsn;
    };
    flush(&mut batch, 1);
    for (lsn, (rtype, payload)) in (1..).zip(&job.records) {
        format::encode_frame(&mut batch.buf, *rtype, lsn, payload);
        if batch.buf.len() >= max_batch_bytes + BATCH_HEADER_BYTES {
            flush(&mut batch, lsn + 1);
        }
    }
    let end_lsn = record_count + 1;
    format::encode_frame(
        &mut batch.buf,
        format::TYPE_CHECKPOINT_END,
        end_lsn,
        &format::encode_checkpoint_end(record_count),
    );
    flush(&mut batch, end_lsn + 1);
    or_abort(file.sync_data(), "fdatasync", &tmp_path);
    or_abort(fs::rename(&tmp_path, &final_path), "renaming checkpoint into place", &tmp_path);
    or_abort(segment::sync_dir(dir), "directory fsync", dir_path);

    // Durable: replay starts from it, so what it covers is dead.
    let deleted = delete_covered(dir_path, dir, barrier);
    let s = shared;
    s.records.fetch_add(record_count, Ordering::Relaxed);
    s.syncs.fetch_add(1, Ordering::Relaxed);
    s.bytes_written.fetch_add(offset, Ordering::Relaxed);
    s.checkpoints.fetch_add(1, Ordering::Relaxed);
    crate::metrics::written(record_count, 1, offset);
    crate::metrics::checkpoint(started.elapsed());
    info!(
        barrier_lsn = barrier,
        record_count,
        bytes = offset,
        deleted_files = deleted,
        took_ms = started.elapsed().as_millis() as u64,
        "checkpoint written"
    );
    let _ = job.done.send(barrier);
}

struct BatchBuf {
    buf: Vec<u8>,
    first_lsn: Lsn,
}

/// Deletes the segments wholly before `barrier` and older checkpoints. Not fatal: a file left
/// behind is deleted by the next open or checkpoint, and replay skips it.
fn delete_covered(dir_path: &Path, dir: &File, barrier: Lsn) -> usize {
    let listing = match segment::list_dir(dir_path) {
        Ok(listing) => listing,
        Err(e) => {
            warn!(dir = %dir_path.display(), error = %e, "could not list the log directory to delete covered files");
            return 0;
        }
    };
    let covered: Vec<PathBuf> =
        listing.segments.into_iter().chain(listing.checkpoints).filter(|f| f.lsn < barrier).map(|f| f.path).collect();
    let mut deleted = 0;
    for path in covered {
        match fs::remove_file(&path) {
            Ok(()) => deleted += 1,
            Err(e) => warn!(file = %path.display(), error = %e, "could not delete a file the checkpoint covers"),
        }
    }
    if let Err(e) = segment::sync_dir(dir) {
        warn!(dir = %dir_path.display(), error = %e, "directory fsync after deleting covered files failed");
    }
    deleted
}
