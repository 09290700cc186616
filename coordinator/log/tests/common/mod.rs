//! Helpers shared by the integration tests. Every test works on real files in a TempDir.
#![allow(dead_code)] // each test binary uses a different subset

use std::convert::Infallible;
use std::path::{Path, PathBuf};

use pledge_log::{Log, LogConfig, Record};

/// Segment header bytes (magic 8, version 2, flags 2, first_lsn 8, crc 4).
pub const HEADER_BYTES: u64 = 24;
/// Batch header bytes (magic 4, body_bytes 4, first_lsn 8, synced_through 8, crcs 4 + 4).
pub const BATCH_HEADER_BYTES: u64 = 32;
/// Frame bytes besides the payload (length 4, type 1, lsn 8, crc 4).
pub const FRAME_OVERHEAD_BYTES: u64 = 17;

/// Default config with smaller preallocation steps, so tests stay light on disk.
pub fn config(dir: &Path) -> LogConfig {
    let mut config = LogConfig::new(dir);
    config.preallocate_chunk_bytes = 64 * 1024;
    config
}

/// Opens the log and returns it with everything replay delivered.
pub fn open(config: &LogConfig) -> (Log, Vec<Record>) {
    let mut records = Vec::new();
    let log = pledge_log::open(config.clone(), |r| {
        records.push(r);
        Ok::<_, Infallible>(())
    })
    .unwrap_or_else(|e| panic!("open failed: {e}"));
    (log, records)
}

/// Opens, collects the replayed records, shuts down.
pub async fn replay(config: &LogConfig) -> Vec<Record> {
    let (log, records) = open(config);
    log.shutdown().await.unwrap();
    records
}

/// Opens expecting failure; returns the error's message.
pub fn open_err(config: &LogConfig) -> String {
    match pledge_log::open(config.clone(), |_| Ok::<_, Infallible>(())) {
        Ok(_) => panic!("open succeeded but should have failed"),
        Err(e) => e.to_string(),
    }
}

/// Segment files in the directory, oldest first.
pub fn segments(dir: &Path) -> Vec<PathBuf> {
    files_named(dir, "seg")
}

/// Checkpoint files in the directory, oldest first.
pub fn checkpoints(dir: &Path) -> Vec<PathBuf> {
    files_named(dir, "ckpt")
}

fn files_named(dir: &Path, extension: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == extension))
        .collect();
    files.sort();
    files
}

pub fn segment_name(first_lsn: u64) -> String {
    format!("{first_lsn:020}.seg")
}

/// A payload that encodes its index, so content checks catch reordering and mix-ups.
pub fn payload(i: u64, len: usize) -> Vec<u8> {
    let mut out = i.to_le_bytes().repeat(len.div_ceil(8));
    out.truncate(len);
    out
}

pub fn record(lsn: u64, rtype: u8, payload: &[u8]) -> Record {
    Record { lsn, rtype, payload: payload.to_vec() }
}

/// Where things are in a segment, as `inspect` reports them.
#[derive(Debug, Default)]
pub struct Layout {
    /// (offset, lsn) of each record.
    pub records: Vec<(u64, u64)>,
    /// (offset, first lsn, records) of each batch; marks have 0 records.
    pub batches: Vec<(u64, u64, u64)>,
    /// Where the data ends.
    pub end: u64,
}

impl Layout {
    /// Offset of the batch holding `lsn`.
    pub fn batch_of(&self, lsn: u64) -> u64 {
        self.batches.iter().rev().find(|(_, first, n)| *n > 0 && *first <= lsn).unwrap().0
    }

    /// Offset of the record `lsn`.
    pub fn record(&self, lsn: u64) -> u64 {
        self.records.iter().find(|(_, l)| *l == lsn).unwrap().0
    }
}

pub fn layout(config: &LogConfig, segment: &Path) -> Layout {
    let mut layout = Layout::default();
    for item in pledge_log::inspect(config).map(Result::unwrap) {
        match item {
            pledge_log::InspectItem::Record(r) if r.path == segment => layout.records.push((r.offset, r.lsn)),
            pledge_log::InspectItem::Batch { path, offset, first_lsn, records, .. } if path == segment => {
                layout.batches.push((offset, first_lsn, records))
            }
            pledge_log::InspectItem::SegmentEnd { path, offset, .. } if path == segment => layout.end = offset,
            _ => {}
        }
    }
    layout
}

pub fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}
