//! The writer thread (group commit) and the handles that feed it.

use std::fs::File;
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
use tracing::{debug, error};

use crate::Lsn;
use crate::checkpointer::{self, Checkpointer, Job};
use crate::config::LogConfig;
use crate::error::LogError;
use crate::format::{self, BATCH_HEADER_BYTES, FIRST_RESERVED_TYPE, SEGMENT_HEADER_BYTES};
use crate::recovery::Recovered;
use crate::segment;

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

/// State shared between the writer thread, the checkpointer and every handle.
pub(crate) struct Shared {
    durable_lsn: AtomicU64,
    pub(crate) records: AtomicU64,
    batches: AtomicU64,
    pub(crate) syncs: AtomicU64,
    pub(crate) bytes_written: AtomicU64,
    pub(crate) checkpoints: AtomicU64,
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
    /// Batch, frame and header bytes written (not preallocation zeros).
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
        let checkpointer = checkpointer::start(config, recovered.dir.try_clone()?, Arc::clone(&shared))?;
        let thread = WriterThread {
            rx,
            shared: Arc::clone(&shared),
            dir_path: config.dir.clone(),
            dir: recovered.dir,
            _lock: recovered.lock,
            active: recovered.active,
            checkpointer: Some(checkpointer),
            next_lsn: recovered.next_lsn,
            segment_size_bytes: config.segment_size_bytes,
            max_batch_bytes: config.max_batch_bytes,
            preallocate_chunk_bytes: config.preallocate_chunk_bytes,
            buf: Vec::with_capacity(config.max_batch_bytes),
            batch_first_lsn: 0,
            batch_records: 0,
            unvouched: false,
            mark_unsynced: false,
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

    /// Writes a checkpoint and, once it is durable, deletes every older file; resolves with the
    /// LSN from which replay continues after it. See [`submit_checkpoint`](Self::submit_checkpoint).
    pub async fn checkpoint<P: Into<Bytes>>(&self, records: Vec<(u8, P)>) -> Result<Lsn, LogError> {
        self.submit_checkpoint(records).await?.await
    }

    /// Queues a checkpoint: `records` are a snapshot of the owner's live state. The writer
    /// starts a new segment at this point (the barrier: every record submitted before is in
    /// older segments) and hands the snapshot to the checkpoint thread, which writes it into
    /// its own file while appends go on. Once that file is durable, the segments before the
    /// barrier and older checkpoints are deleted. After a restart, replay delivers the
    /// checkpoint's records (with LSN 0) and then every record from the barrier on.
    ///
    /// The caller must keep it consistent: the snapshot has to reflect exactly the records
    /// submitted before this call, so take the snapshot and submit it without another record
    /// being submitted in between. The returned `Durable` resolves with the barrier LSN.
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
    /// The LSN of its first record (the next LSN when it was created).
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
    /// Writes checkpoints off the commit path (None once shut down).
    checkpointer: Option<Checkpointer>,
    next_lsn: Lsn,
    segment_size_bytes: u64,
    max_batch_bytes: usize,
    preallocate_chunk_bytes: u64,
    /// The batch being built: room for its header, then its encoded frames. Reused: no
    /// allocation per batch once warm.
    buf: Vec<u8>,
    batch_first_lsn: Lsn,
    batch_records: u64,
    /// The last thing written is a batch that no later batch or mark vouches for yet.
    unvouched: bool,
    /// A mark was written since the last sync.
    mark_unsynced: bool,
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
            while self.buf.len() < self.max_batch_bytes + BATCH_HEADER_BYTES {
                match self.rx.try_recv() {
                    Ok(request) => self.take(request),
                    Err(_) => break,
                }
            }
            if self.commit_batch() && self.rx.is_empty() {
                self.write_mark();
            }
        }
        // The queue is closed and drained (shutdown) or every handle is gone; everything taken
        // has been committed. The last batch gets its mark, synced (a clean stop can afford
        // it), and checkpoints handed over are finished before shutdown answers.
        if self.unvouched {
            self.write_mark();
        }
        if self.mark_unsynced {
            or_abort(self.active.file.sync_data(), "fdatasync", &self.active.path);
        }
        if let Some(checkpointer) = self.checkpointer.take() {
            checkpointer.finish();
        }
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
                if self.buf.is_empty() {
                    // Room for the batch header, filled in when the batch is committed.
                    self.buf.resize(BATCH_HEADER_BYTES, 0);
                    self.batch_first_lsn = lsn;
                }
                format::encode_frame(&mut self.buf, rtype, lsn, &payload);
                self.batch_records += 1;
                if let Some(done) = done {
                    self.waiting.push((done, lsn));
                }
            }
            Request::Checkpoint { records, done } => {
                // What came before the checkpoint is synced first, into the old segment; then a
                // new segment starts at the barrier, so every segment before it is covered by
                // the checkpoint. The snapshot itself is written by the checkpoint thread.
                self.commit_batch();
                // A segment holding no record (maybe a mark) already starts at the barrier.
                if self.next_lsn > self.active.first_lsn {
                    self.rotate(self.next_lsn);
                }
                let job = Job { barrier_lsn: self.next_lsn, records, done };
                self.checkpointer.as_ref().expect("running").submit(job);
            }
            Request::Shutdown { done } => {
                // Later sends fail with Closed; what is already queued is still drained.
                self.rx.close();
                self.shutdown_waiters.push(done);
            }
        }
    }

    /// Writes and syncs the batch being built, then acknowledges its records. Returns whether
    /// there was one. Its header vouches for everything synced before it.
    fn commit_batch(&mut self) -> bool {
        if self.buf.is_empty() {
            return false;
        }
        if self.active.write_offset_bytes >= self.segment_size_bytes {
            self.rotate(self.batch_first_lsn);
        }
        let synced_through = self.shared.durable_lsn.load(Ordering::Relaxed);
        let header = format::encode_batch_header(self.batch_first_lsn, synced_through, &self.buf[BATCH_HEADER_BYTES..]);
        self.buf[..BATCH_HEADER_BYTES].copy_from_slice(&header);
        let offset = self.active.write_offset_bytes;
        let end = offset + self.buf.len() as u64;
        let path = &self.active.path;
        let started = std::time::Instant::now();
        or_abort(self.active.file.write_all_at(&self.buf, offset), "write", path);
        self.preallocate(end);
        or_abort(self.active.file.sync_data(), "fdatasync", &self.active.path);
        self.mark_unsynced = false;
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
        self.unvouched = true;
        true
    }

    /// Writes a synced-through mark (an empty batch) after a sync that left the writer idle:
    /// it proves the batch before it was synced, so damage to that batch is never mistaken for
    /// a torn write. Not synced itself (it rides with the next batch's sync); a process crash
    /// keeps it (it is in the page cache), and only a power loss within the writeback delay
    /// can lose it, which leaves the last batch as unproven as it was before marks existed.
    fn write_mark(&mut self) {
        let durable = self.shared.durable_lsn.load(Ordering::Relaxed);
        let mark = format::encode_batch_header(self.next_lsn, durable, &[]);
        let offset = self.active.write_offset_bytes;
        or_abort(self.active.file.write_all_at(&mark, offset), "write", &self.active.path);
        let end = offset + mark.len() as u64;
        self.preallocate(end);
        self.active.write_offset_bytes = end;
        self.unvouched = false;
        self.mark_unsynced = true;
        self.count(0, 0, 0, mark.len() as u64);
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
        // The sealed segment's last batch needs no mark: damage anywhere but in the last
        // segment is corruption anyway. (A mark here would land in an empty segment.)
        self.unvouched = false;
        self.mark_unsynced = false;
        debug!(sealed = %old.path.display(), new = %self.active.path.display(), "rotated log segment");
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
pub(crate) fn or_abort<T>(result: io::Result<T>, what: &str, path: &Path) -> T {
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
