//! The writer thread (group commit) and the handles that feed it.

use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::thread::JoinHandle;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};

use crate::Lsn;
use crate::config::LogConfig;
use crate::error::LogError;
use crate::format::{self, FIRST_RESERVED_TYPE, SEGMENT_HEADER_BYTES, SegmentHeader};
use crate::recovery::Recovered;
use crate::segment::{self, SegmentFile};

/// Size of the zero block used to preallocate segments (written repeatedly).
pub(crate) const ZERO_BLOCK_BYTES: usize = 256 * 1024;

/// A request to the writer thread.
enum Request {
    /// `done` is None for `append_lazy`.
    Append {
        rtype: u8,
        payload: Bytes,
        done: Option<oneshot::Sender<Lsn>>,
    },
    Checkpoint {
        records: Vec<(u8, Bytes)>,
        done: oneshot::Sender<Lsn>,
    },
    /// Stop accepting requests, commit everything already queued, then exit.
    Shutdown {
        done: oneshot::Sender<()>,
    },
}

/// State shared between the writer thread and every handle. Only the writer thread stores.
struct Shared {
    durable_lsn: AtomicU64,
    records: AtomicU64,
    batches: AtomicU64,
    syncs: AtomicU64,
    bytes_written: AtomicU64,
    checkpoints: AtomicU64,
    max_record_bytes: usize,
}

/// Counters since `open`, for metrics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogStats {
    /// Records written (appended and checkpoint records; not the checkpoint markers).
    pub records: u64,
    /// Group-commit batches written (one write + one fdatasync each).
    pub batches: u64,
    /// fdatasync calls on segment files: batches, checkpoints and segment rotations.
    pub syncs: u64,
    /// Frame and header bytes written (not preallocation zeros).
    pub bytes_written: u64,
    pub checkpoints: u64,
}

/// An open log. Owns the writer thread; hand out [`LogWriter`]s to append.
///
/// Dropping a `Log` without [`shutdown`](Log::shutdown) detaches the writer thread: it keeps
/// serving the remaining `LogWriter`s and exits, after committing what it was given, when the
/// last one is dropped.
pub struct Log {
    writer: LogWriter,
    thread: JoinHandle<()>,
    recovered_lsn: Lsn,
}

/// A cheap, cloneable handle for appending to the log from any task.
#[derive(Clone)]
pub struct LogWriter {
    tx: mpsc::Sender<Request>,
    shared: Arc<Shared>,
}

/// Resolves to the record's LSN once the fdatasync covering it has returned.
/// Returned by [`LogWriter::submit`]: the record's place in the log is fixed when `submit`
/// returns, so a caller can queue several records in order and await them later.
#[must_use = "the record is queued either way; drop the Durable only if you do not need to know when it is on disk"]
pub struct Durable {
    rx: oneshot::Receiver<Lsn>,
}

impl Future for Durable {
    type Output = Result<Lsn, LogError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // The writer drops the sender without answering only when it stops before committing
        // the record (writer panic, or the request raced a shutdown).
        Pin::new(&mut self.rx).poll(cx).map(|r| r.map_err(|_| LogError::Closed))
    }
}

impl Log {
    pub(crate) fn start(config: &LogConfig, recovered: Recovered) -> Result<Self, io::Error> {
        let shared = Arc::new(Shared {
            durable_lsn: AtomicU64::new(recovered.next_lsn - 1),
            records: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            checkpoints: AtomicU64::new(0),
            max_record_bytes: config.max_record_bytes,
        });
        let (tx, rx) = mpsc::channel(config.queue_capacity);
        let recovered_lsn = recovered.next_lsn - 1;
        let thread = WriterThread {
            rx,
            shared: Arc::clone(&shared),
            dir_path: config.dir.clone(),
            dir: recovered.dir,
            _lock: recovered.lock,
            active: recovered.active,
            older: recovered.older,
            next_lsn: recovered.next_lsn,
            segment_size_bytes: config.segment_size_bytes,
            max_batch_bytes: config.max_batch_bytes,
            preallocate_chunk_bytes: config.preallocate_chunk_bytes,
            buf: Vec::with_capacity(config.max_batch_bytes),
            batch_records: 0,
            waiting: Vec::new(),
            shutdown_waiters: Vec::new(),
            zeros: vec![0u8; ZERO_BLOCK_BYTES].into_boxed_slice(),
        };
        let thread = std::thread::Builder::new().name("pledge-log-writer".into()).spawn(move || thread.run())?;
        Ok(Self { writer: LogWriter { tx, shared }, thread, recovered_lsn })
    }

    /// A new handle for appending.
    pub fn writer(&self) -> LogWriter {
        self.writer.clone()
    }

    /// The LSN of the last record found by replay (0 for a new log).
    pub fn recovered_lsn(&self) -> Lsn {
        self.recovered_lsn
    }

    /// Stops the log: requests already queued are committed (written and synced), requests
    /// submitted from now on fail with [`LogError::Closed`], and the writer thread is joined.
    pub async fn shutdown(self) -> Result<(), LogError> {
        let (done, wait) = oneshot::channel();
        // If the writer is already gone, the send fails; joining tells us why.
        let _ = self.writer.tx.send(Request::Shutdown { done }).await;
        let _ = wait.await;
        let thread = self.thread;
        match tokio::task::spawn_blocking(move || thread.join()).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(LogError::WriterPanicked),
        }
    }
}

impl LogWriter {
    /// Appends a record and resolves with its LSN once it is durable.
    pub async fn append(&self, rtype: u8, payload: impl Into<Bytes>) -> Result<Lsn, LogError> {
        self.submit(rtype, payload).await?.await
    }

    /// Queues a record and returns once it has its place in the log (waiting for queue room if
    /// the queue is full). Records submitted one after another by one task get increasing LSNs.
    /// The returned [`Durable`] resolves when the record is on disk.
    pub async fn submit(&self, rtype: u8, payload: impl Into<Bytes>) -> Result<Durable, LogError> {
        let payload = payload.into();
        self.check(rtype, &payload)?;
        let (done, rx) = oneshot::channel();
        self.send(Request::Append { rtype, payload, done: Some(done) }).await?;
        Ok(Durable { rx })
    }

    /// Queues a record without asking to be told when it is durable: it becomes durable with
    /// the next sync, in order with every other record. For records whose loss in a crash is
    /// harmless (e.g. "transaction finished" under presumed abort). Saves the oneshot.
    pub async fn append_lazy(&self, rtype: u8, payload: impl Into<Bytes>) -> Result<(), LogError> {
        let payload = payload.into();
        self.check(rtype, &payload)?;
        self.send(Request::Append { rtype, payload, done: None }).await
    }

    /// Writes a checkpoint and, once it is durable, deletes every older segment; resolves with
    /// the LSN of the checkpoint's end marker. See [`submit_checkpoint`](Self::submit_checkpoint).
    pub async fn checkpoint<P: Into<Bytes>>(&self, records: Vec<(u8, P)>) -> Result<Lsn, LogError> {
        self.submit_checkpoint(records).await?.await
    }

    /// Queues a checkpoint: `records` are a snapshot of the owner's live state, written as
    /// ordinary records into a new segment between reserved begin/end markers. After a restart,
    /// replay starts with these records and skips everything older.
    ///
    /// The caller must keep it consistent: the snapshot has to reflect exactly the records
    /// submitted before this call (they are written before the checkpoint and then deleted), so
    /// take the snapshot and submit it without another record being submitted in between.
    /// The checkpoint's records get consecutive LSNs after the begin marker's; the returned
    /// `Durable` resolves with the end marker's LSN.
    ///
    /// Payloads may be shared (`Bytes`, like every payload here): an owner that keeps its
    /// records' encodings hands them over without copying each one.
    pub async fn submit_checkpoint<P: Into<Bytes>>(&self, records: Vec<(u8, P)>) -> Result<Durable, LogError> {
        let records: Vec<(u8, Bytes)> = records.into_iter().map(|(rtype, payload)| (rtype, payload.into())).collect();
        for (rtype, payload) in &records {
            self.check(*rtype, payload)?;
        }
        let (done, rx) = oneshot::channel();
        self.send(Request::Checkpoint { records, done }).await?;
        Ok(Durable { rx })
    }

    /// The highest LSN known to be on disk.
    pub fn durable_lsn(&self) -> Lsn {
        self.shared.durable_lsn.load(Ordering::Acquire)
    }

    pub fn stats(&self) -> LogStats {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        LogStats {
            records: load(&self.shared.records),
            batches: load(&self.shared.batches),
            syncs: load(&self.shared.syncs),
            bytes_written: load(&self.shared.bytes_written),
            checkpoints: load(&self.shared.checkpoints),
        }
    }

    fn check(&self, rtype: u8, payload: &[u8]) -> Result<(), LogError> {
        if rtype >= FIRST_RESERVED_TYPE {
            return Err(LogError::ReservedType(rtype));
        }
        if payload.len() > self.shared.max_record_bytes {
            return Err(LogError::RecordTooLarge {
                payload_bytes: payload.len(),
                max_record_bytes: self.shared.max_record_bytes,
            });
        }
        Ok(())
    }

    async fn send(&self, request: Request) -> Result<(), LogError> {
        self.tx.send(request).await.map_err(|_| LogError::Closed)
    }
}

/// The segment the writer appends to.
pub(crate) struct ActiveSegment {
    pub file: File,
    pub path: PathBuf,
    pub first_lsn: Lsn,
    /// Where the next frame goes (end of valid data).
    pub write_offset_bytes: u64,
    /// File length: valid data plus preallocated zeros.
    pub allocated_bytes: u64,
}

struct WriterThread {
    rx: mpsc::Receiver<Request>,
    shared: Arc<Shared>,
    dir_path: PathBuf,
    dir: File,
    /// Held, never read: the directory lock lasts as long as this thread.
    _lock: File,
    active: ActiveSegment,
    /// Live segments older than `active`, oldest first; deleted by the next checkpoint.
    older: Vec<SegmentFile>,
    next_lsn: Lsn,
    segment_size_bytes: u64,
    max_batch_bytes: usize,
    preallocate_chunk_bytes: u64,
    /// Encoded frames of the batch being built. Reused: no allocation per batch once warm.
    buf: Vec<u8>,
    batch_records: u64,
    /// Completions of the batch in `buf`, answered after its sync. Reused like `buf`.
    waiting: Vec<(oneshot::Sender<Lsn>, Lsn)>,
    shutdown_waiters: Vec<oneshot::Sender<()>>,
    zeros: Box<[u8]>,
}

impl WriterThread {
    /// Group commit: block for one request, take whatever else is already queued (up to
    /// `max_batch_bytes`), write it with one call, sync once, answer everyone. No timer, no
    /// linger: under light load a record is synced at once; under heavy load requests pile up
    /// during each sync and the next batch takes them all, so syncs per record fall as load
    /// rises.
    fn run(mut self) {
        while let Some(request) = self.rx.blocking_recv() {
            self.take(request);
            while self.buf.len() < self.max_batch_bytes {
                match self.rx.try_recv() {
                    Ok(request) => self.take(request),
                    Err(_) => break,
                }
            }
            self.commit_batch();
        }
        // The queue is closed and drained (shutdown) or every handle is gone; everything taken
        // has been committed.
        debug!(next_lsn = self.next_lsn, "log writer stopped");
        for done in self.shutdown_waiters.drain(..) {
            let _ = done.send(());
        }
    }

    fn take(&mut self, request: Request) {
        match request {
            Request::Append { rtype, payload, done } => {
                let lsn = self.next_lsn;
                self.next_lsn += 1;
                format::encode_frame(&mut self.buf, rtype, lsn, &payload);
                self.batch_records += 1;
                if let Some(done) = done {
                    self.waiting.push((done, lsn));
                }
            }
            Request::Checkpoint { records, done } => {
                // What came before the checkpoint is synced first, into the old segment.
                self.commit_batch();
                self.write_checkpoint(records, done);
            }
            Request::Shutdown { done } => {
                // Later sends fail with Closed; what is already queued is still drained.
                self.rx.close();
                self.shutdown_waiters.push(done);
            }
        }
    }

    fn commit_batch(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        if self.active.write_offset_bytes >= self.segment_size_bytes {
            let first_lsn = self.next_lsn - self.batch_records;
            self.rotate(first_lsn);
        }
        let offset = self.active.write_offset_bytes;
        let end = offset + self.buf.len() as u64;
        let path = &self.active.path;
        let started = std::time::Instant::now();
        or_abort(self.active.file.write_all_at(&self.buf, offset), "write", path);
        self.preallocate(end);
        or_abort(self.active.file.sync_data(), "fdatasync", &self.active.path);
        crate::metrics::batch_synced(started.elapsed());
        self.active.write_offset_bytes = end;

        let durable = self.next_lsn - 1;
        self.shared.durable_lsn.store(durable, Ordering::Release);
        self.count(self.batch_records, 1, 1, self.buf.len() as u64);
        for (done, lsn) in self.waiting.drain(..) {
            // The requester may have stopped waiting; the record is durable regardless.
            let _ = done.send(lsn);
        }
        self.buf.clear();
        self.batch_records = 0;
    }

    /// Makes sure the file is allocated (zero-filled) past `data_end`, extending it by one
    /// chunk when needed. The zeros go through the page cache and are made durable by the same
    /// fdatasync as the batch; from then on, syncs of writes into that range need not commit
    /// a new file size.
    fn preallocate(&mut self, data_end: u64) {
        let active = &mut self.active;
        if data_end <= active.allocated_bytes {
            return;
        }
        let target = data_end + self.preallocate_chunk_bytes;
        or_abort(
            segment::write_zeros(&active.file, &self.zeros, data_end, target),
            "preallocating write",
            &active.path,
        );
        active.allocated_bytes = target;
    }

    /// Seals the active segment and starts a new one whose first record is `first_lsn`.
    fn rotate(&mut self, first_lsn: Lsn) {
        self.trim_active();
        let created =
            segment::create_segment(&self.dir_path, &self.dir, first_lsn, &self.zeros, self.preallocate_chunk_bytes);
        let (file, path) = or_abort(created, "creating segment", &segment::segment_path(&self.dir_path, first_lsn));
        self.count(0, 0, 1, 0);
        let header_end = SEGMENT_HEADER_BYTES as u64;
        let new = ActiveSegment {
            file,
            path,
            first_lsn,
            write_offset_bytes: header_end,
            allocated_bytes: header_end + self.preallocate_chunk_bytes,
        };
        let old = std::mem::replace(&mut self.active, new);
        debug!(sealed = %old.path.display(), new = %self.active.path.display(), "rotated log segment");
        self.older.push(SegmentFile { first_lsn: old.first_lsn, path: old.path });
    }

    /// Cuts the preallocated zeros off a segment that will receive no more records, so sealed
    /// segments take only the space of their data. (Readers accept a zero tail anywhere; this
    /// is tidiness, not correctness.)
    fn trim_active(&mut self) {
        let active = &mut self.active;
        if active.allocated_bytes > active.write_offset_bytes {
            or_abort(active.file.set_len(active.write_offset_bytes), "truncating sealed segment", &active.path);
            or_abort(active.file.sync_data(), "fdatasync", &active.path);
            active.allocated_bytes = active.write_offset_bytes;
            self.count(0, 0, 1, 0);
        }
    }

    /// Writes a checkpoint segment (begin marker, records, end marker) under a temporary name,
    /// syncs it, renames it into place and syncs the directory; only then deletes the older
    /// segments. The rename makes the checkpoint appear whole or not at all, and lets it replace
    /// an empty active segment that has the same first LSN (and so the same name).
    fn write_checkpoint(&mut self, records: Vec<(u8, Bytes)>, done: oneshot::Sender<Lsn>) {
        debug_assert!(self.buf.is_empty(), "the pending batch is committed first");
        let begin_lsn = self.next_lsn;
        let record_count = records.len() as u64;
        let end_lsn = begin_lsn + record_count + 1;
        let tmp_path = segment::tmp_segment_path(&self.dir_path, begin_lsn);
        let final_path = segment::segment_path(&self.dir_path, begin_lsn);

        let opened = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp_path);
        let file = or_abort(opened, "creating checkpoint file", &tmp_path);
        let header = SegmentHeader { first_lsn: begin_lsn, begins_with_checkpoint: true };
        self.buf.extend_from_slice(&format::encode_header(header));
        format::encode_frame(
            &mut self.buf,
            format::TYPE_CHECKPOINT_BEGIN,
            begin_lsn,
            &format::encode_checkpoint_begin(record_count),
        );
        let mut offset = 0u64;
        let mut bytes_written = 0u64;
        // Written in max_batch_bytes pieces so a large snapshot needs no buffer of its size.
        let mut flush = |buf: &mut Vec<u8>, offset: &mut u64| {
            or_abort(file.write_all_at(buf, *offset), "write", &tmp_path);
            *offset += buf.len() as u64;
            bytes_written += buf.len() as u64;
            buf.clear();
        };
        for (lsn, (rtype, payload)) in (begin_lsn + 1..).zip(records) {
            format::encode_frame(&mut self.buf, rtype, lsn, &payload);
            if self.buf.len() >= self.max_batch_bytes {
                flush(&mut self.buf, &mut offset);
            }
        }
        format::encode_frame(
            &mut self.buf,
            format::TYPE_CHECKPOINT_END,
            end_lsn,
            &format::encode_checkpoint_end(begin_lsn, record_count),
        );
        flush(&mut self.buf, &mut offset);
        let allocated = offset + self.preallocate_chunk_bytes;
        or_abort(segment::write_zeros(&file, &self.zeros, offset, allocated), "preallocating write", &tmp_path);
        or_abort(file.sync_data(), "fdatasync", &tmp_path);
        or_abort(fs::rename(&tmp_path, &final_path), "renaming checkpoint into place", &tmp_path);
        or_abort(segment::sync_dir(&self.dir), "directory fsync", &self.dir_path);

        // The checkpoint is durable and recovery will start from it: older segments are dead.
        let new = ActiveSegment {
            file,
            path: final_path,
            first_lsn: begin_lsn,
            write_offset_bytes: offset,
            allocated_bytes: allocated,
        };
        let old = std::mem::replace(&mut self.active, new);
        let dead =
            self.older.drain(..).chain(std::iter::once(SegmentFile { first_lsn: old.first_lsn, path: old.path }));
        drop(old.file);
        let mut deleted = 0usize;
        for segment in dead.filter(|s| s.first_lsn < begin_lsn) {
            // Not fatal: a segment left behind is deleted by the next open or checkpoint, and
            // replay skips it because the checkpoint is newer.
            match fs::remove_file(&segment.path) {
                Ok(()) => deleted += 1,
                Err(e) => {
                    warn!(file = %segment.path.display(), error = %e, "could not delete segment superseded by checkpoint")
                }
            }
        }
        if let Err(e) = segment::sync_dir(&self.dir) {
            warn!(dir = %self.dir_path.display(), error = %e, "directory fsync after deleting old segments failed");
        }

        self.next_lsn = end_lsn + 1;
        self.shared.durable_lsn.store(end_lsn, Ordering::Release);
        self.count(record_count, 0, 1, bytes_written);
        self.shared.checkpoints.fetch_add(1, Ordering::Relaxed);
        crate::metrics::checkpoint();
        info!(begin_lsn, end_lsn, record_count, deleted_segments = deleted, "checkpoint written");
        let _ = done.send(end_lsn);
    }

    fn count(&self, records: u64, batches: u64, syncs: u64, bytes: u64) {
        let s = &self.shared;
        s.records.fetch_add(records, Ordering::Relaxed);
        s.batches.fetch_add(batches, Ordering::Relaxed);
        s.syncs.fetch_add(syncs, Ordering::Relaxed);
        s.bytes_written.fetch_add(bytes, Ordering::Relaxed);
        crate::metrics::written(records, syncs, bytes);
    }
}

/// A failed write or sync ends the process. After a failed fsync the kernel may already have
/// dropped the dirty pages and marked them clean (Linux does), so a retry can "succeed" without
/// the data ever reaching the disk; and a failed write leaves the file in an unknown state.
/// Neither can be answered honestly to a waiting caller, and continuing would let later records
/// be acknowledged on top of a hole. Restarting runs recovery, which reads what is really on disk.
fn or_abort<T>(result: io::Result<T>, what: &str, path: &Path) -> T {
    match result {
        Ok(value) => value,
        Err(e) => {
            error!(file = %path.display(), error = %e, "log {what} failed; aborting (a failed write or fsync cannot be retried safely)");
            // tracing may have no subscriber, and abort skips any buffered output: say it on
            // stderr as well, so the reason is never lost.
            eprintln!("pledge-log: {what} of {} failed: {e}; aborting", path.display());
            std::process::abort();
        }
    }
}
