//! Helpers shared by the integration tests. Every test works on real files in a TempDir.
#![allow(dead_code)] // each test binary uses a different subset

use std::convert::Infallible;
use std::path::{Path, PathBuf};

use pledge_log::{Log, LogConfig, Record};

/// Segment header bytes (magic 8, version 2, flags 2, first_lsn 8, crc 4).
pub const HEADER_BYTES: u64 = 24;
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
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
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

/// Offset of the `index`-th (0-based) frame in a segment whose frames all carry
/// `payload_bytes` of payload.
pub fn frame_offset(index: u64, payload_bytes: u64) -> u64 {
    HEADER_BYTES + index * (FRAME_OVERHEAD_BYTES + payload_bytes)
}

pub fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}
