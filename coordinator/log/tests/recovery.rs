//! Recovery: torn tails are cut off, everything else is refused with file and offset. Offsets
//! come from `inspect`, so the tests say what they damage (a record, a batch, a mark), not
//! where the format happens to put it.

mod common;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::*;
use pledge_log::{InspectItem, LogConfig};
use tempfile::TempDir;

const PAYLOAD_BYTES: u64 = 100;

/// Both with and without preallocation (the zero tail changes what follows the last record),
/// each in its own directory.
fn configs() -> Vec<(TempDir, LogConfig)> {
    [true, false]
        .map(|preallocate| {
            let dir = TempDir::new().unwrap();
            let mut config = config(dir.path());
            if !preallocate {
                config.preallocate_chunk_bytes = 0;
            }
            (dir, config)
        })
        .into()
}

/// Writes `count` records of PAYLOAD_BYTES into a fresh log, shuts down, returns the only
/// segment's path.
async fn write_records(config: &LogConfig, count: u64) -> PathBuf {
    let (log, _) = open(config);
    let writer = log.writer();
    for i in 0..count {
        writer.append(1, payload(i, PAYLOAD_BYTES as usize)).await.unwrap();
    }
    log.shutdown().await.unwrap();
    let files = segments(&config.dir);
    assert_eq!(files.len(), 1);
    files[0].clone()
}

fn write_at(path: &Path, offset: u64, bytes: &[u8]) {
    OpenOptions::new().write(true).open(path).unwrap().write_all_at(bytes, offset).unwrap();
}

fn flip_byte(path: &Path, offset: u64) {
    let file = OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, offset).unwrap();
    file.write_all_at(&[byte[0] ^ 0x55], offset).unwrap();
}

fn set_len(path: &Path, len: u64) {
    OpenOptions::new().write(true).open(path).unwrap().set_len(len).unwrap();
}

fn assert_payloads(records: &[pledge_log::Record], count: u64) {
    assert_eq!(records.len() as u64, count);
    for (i, r) in records.iter().enumerate() {
        assert_eq!((r.lsn, &r.payload), (i as u64 + 1, &payload(i as u64, PAYLOAD_BYTES as usize)));
    }
}

#[tokio::test]
async fn a_batch_cut_in_the_middle_is_a_torn_tail() {
    for (_dir, config) in configs() {
        let seg = write_records(&config, 20).await;
        let last_batch = layout(&config, &seg).batch_of(20);
        // The crash came while the last batch was being written: no mark follows it.
        set_len(&seg, last_batch + 50);

        let (log, replayed) = open(&config);
        assert_payloads(&replayed, 19);
        assert_eq!(file_len(&seg), last_batch, "the torn batch is cut off");
        assert_eq!(log.writer().append(1, b"after".to_vec()).await.unwrap(), 20, "LSN 20 is reused");
        log.shutdown().await.unwrap();

        let replayed = replay(&config).await;
        assert_eq!(replayed.len(), 20);
        assert_eq!(replayed[19], record(20, 1, b"after"));
    }
}

#[tokio::test]
async fn garbage_after_the_last_batch_is_a_torn_tail() {
    for (_dir, config) in configs() {
        let seg = write_records(&config, 20).await;
        let end = layout(&config, &seg).end;
        let mut rng = fastrand::Rng::with_seed(7);
        let garbage: Vec<u8> = (0..300).map(|_| rng.u8(1..)).collect();
        write_at(&seg, end, &garbage);

        let (log, replayed) = open(&config);
        assert_payloads(&replayed, 20);
        assert_eq!(file_len(&seg), end, "truncated at the first bad byte");
        assert_eq!(log.writer().append(1, b"after".to_vec()).await.unwrap(), 21);
        log.shutdown().await.unwrap();
        assert_eq!(replay(&config).await.len(), 21);
    }
}

#[tokio::test]
async fn zeros_after_the_last_batch_end_the_log_without_truncation() {
    let dir = TempDir::new().unwrap();
    let mut config = config(dir.path());
    config.preallocate_chunk_bytes = 0;
    let seg = write_records(&config, 20).await;
    let end = layout(&config, &seg).end;
    assert_eq!(file_len(&seg), end);
    set_len(&seg, end + 8192); // as after a crash that extended the file but lost the data

    let (log, replayed) = open(&config);
    assert_payloads(&replayed, 20);
    assert_eq!(file_len(&seg), end + 8192, "zeros are not damage: nothing is cut");
    assert_eq!(log.writer().append(1, b"after".to_vec()).await.unwrap(), 21);
    log.shutdown().await.unwrap();
    let replayed = replay(&config).await;
    assert_eq!(replayed[20], record(21, 1, b"after"));
}

#[tokio::test]
async fn a_damaged_batch_followed_by_valid_ones_is_refused_with_file_and_offset() {
    for (_dir, config) in configs() {
        let seg = write_records(&config, 20).await;
        let l = layout(&config, &seg);
        let bad_batch = l.batch_of(5);
        flip_byte(&seg, l.record(5) + 13 + 10); // inside the payload of LSN 5
        let before = fs::read(&seg).unwrap();

        let message = open_err(&config);
        let expected = format!("corrupt record in {} at offset {bad_batch}: batch crc mismatch", seg.display());
        assert!(message.starts_with(&expected), "message: {message}\nexpected prefix: {expected}");
        assert!(message.contains("may have been acknowledged"), "{message}");
        assert_eq!(fs::read(&seg).unwrap(), before, "a refused log is left untouched");
    }
}

/// Issue 12, finding 4: damage to the last acknowledged record used to be cut off as a torn
/// write (the test that stood here accepted it). The synced-through mark written after its
/// sync proves it was durable, so the log refuses to start, naming file and offset.
#[tokio::test]
async fn damage_to_the_last_acknowledged_batch_is_refused() {
    for (_dir, config) in configs() {
        let seg = write_records(&config, 20).await;
        let l = layout(&config, &seg);
        let last_batch = l.batch_of(20);
        assert_eq!(l.batches.last().map(|b| b.2), Some(0), "a mark follows the last batch");
        flip_byte(&seg, l.record(20) + 20);
        let message = open_err(&config);
        let expected = format!("corrupt record in {} at offset {last_batch}: batch crc mismatch", seg.display());
        assert!(message.starts_with(&expected), "{message}");
        assert!(message.contains("first LSN 21"), "names the mark that vouches for it: {message}");
    }
}

#[tokio::test]
async fn damage_followed_by_more_than_one_batch_is_refused() {
    let dir = TempDir::new().unwrap();
    let mut config = config(dir.path());
    config.preallocate_chunk_bytes = 0;
    config.max_batch_bytes = 4096;
    config.max_record_bytes = 1024;
    let seg = write_records(&config, 20).await;
    let end = layout(&config, &seg).end;
    // More non-zero bytes than a crash can leave unsynced: a mark, then one batch (header,
    // body, one frame over).
    write_at(&seg, end, &vec![0xA5; 32 + 32 + 4096 + 1024 + 17 + 1]);
    let message = open_err(&config);
    let expected = format!("corrupt record in {} at offset {end}: ", seg.display());
    assert!(message.starts_with(&expected), "{message}");
    assert!(message.contains("more than one batch"), "{message}");
}

#[tokio::test]
async fn damage_in_a_sealed_segment_is_refused_even_at_its_end() {
    let dir = TempDir::new().unwrap();
    let mut config = config(dir.path());
    config.segment_size_bytes = 2048;
    config.preallocate_chunk_bytes = 0;
    let (log, _) = open(&config);
    let writer = log.writer();
    for i in 0..60 {
        writer.append(1, payload(i, PAYLOAD_BYTES as usize)).await.unwrap();
    }
    log.shutdown().await.unwrap();
    let files = segments(dir.path());
    assert!(files.len() >= 3);
    // Cut the first segment's last batch (or mark) short: fine for a last segment, not here.
    let first = &files[0];
    let last = layout(&config, first).batches.last().unwrap().0;
    set_len(first, file_len(first) - 5);
    let message = open_err(&config);
    let expected = format!("corrupt record in {} at offset {last}: frame of ", first.display());
    assert!(message.starts_with(&expected) && message.contains("runs past the end"), "{message}");
}

#[tokio::test]
async fn a_missing_segment_is_refused() {
    let dir = TempDir::new().unwrap();
    let mut config = config(dir.path());
    config.segment_size_bytes = 2048;
    let (log, _) = open(&config);
    for i in 0..60 {
        log.writer().append(1, payload(i, PAYLOAD_BYTES as usize)).await.unwrap();
    }
    log.shutdown().await.unwrap();
    let files = segments(dir.path());
    assert!(files.len() >= 3);

    fs::rename(&files[1], dir.path().join("moved-away")).unwrap();
    let message = open_err(&config);
    assert!(message.starts_with(&format!("corrupt segment {}: expected LSN", files[2].display())), "{message}");

    // Without its first segment the log has lost its beginning.
    fs::rename(dir.path().join("moved-away"), &files[1]).unwrap();
    fs::remove_file(&files[0]).unwrap();
    let message = open_err(&config);
    assert!(message.contains("older segments are missing"), "{message}");
}

#[tokio::test]
async fn a_torn_header_on_the_last_segment_is_discarded() {
    let dir = TempDir::new().unwrap();
    let config = config(dir.path());
    write_records(&config, 20).await;
    // A crash while creating segment 21: only part of its header reached the disk.
    let torn = dir.path().join(segment_name(21));
    let mut header = b"PLEDGLOG".to_vec();
    header.extend_from_slice(&[1, 0, 0]);
    fs::write(&torn, &header).unwrap();

    let (log, replayed) = open(&config);
    assert_payloads(&replayed, 20);
    assert!(!torn.exists(), "the torn segment is deleted");
    assert_eq!(log.writer().append(1, b"after".to_vec()).await.unwrap(), 21);
    log.shutdown().await.unwrap();
    assert_eq!(replay(&config).await.len(), 21);
}

#[tokio::test]
async fn a_bad_header_on_a_sealed_segment_is_refused() {
    let dir = TempDir::new().unwrap();
    let mut config = config(dir.path());
    config.segment_size_bytes = 2048;
    let (log, _) = open(&config);
    for i in 0..60 {
        log.writer().append(1, payload(i, PAYLOAD_BYTES as usize)).await.unwrap();
    }
    log.shutdown().await.unwrap();
    let files = segments(dir.path());
    flip_byte(&files[1], 14); // first_lsn byte
    let message = open_err(&config);
    assert_eq!(message, format!("corrupt segment {}: bad segment header: header crc mismatch", files[1].display()));
}

#[tokio::test]
async fn inspect_reports_a_torn_tail_without_repairing_it() {
    let dir = TempDir::new().unwrap();
    let config = config(dir.path());
    let seg = write_records(&config, 5).await;
    let l = layout(&config, &seg);
    let last_batch = l.batch_of(5);
    set_len(&seg, last_batch + 30);

    let items: Vec<InspectItem> = pledge_log::inspect(&config).map(Result::unwrap).collect();
    assert!(matches!(&items[0], InspectItem::Segment { first_lsn: 1, checkpoint_file: false, .. }));
    let records: Vec<_> = items
        .iter()
        .filter_map(|i| match i {
            InspectItem::Record(r) => Some((r.offset, r.lsn)),
            _ => None,
        })
        .collect();
    assert_eq!(records, l.records[..4].to_vec());
    assert!(
        matches!(items.last().unwrap(), InspectItem::TornTail { offset, dropped_bytes: 30, .. } if *offset == last_batch),
        "{:?}",
        items.last()
    );
    assert_eq!(file_len(&seg), last_batch + 30, "inspect never truncates");

    // And a damaged batch with valid ones after it is reported as corruption at its offset.
    flip_byte(&seg, l.record(2) + 20);
    let corrupt: Vec<_> = pledge_log::inspect(&config)
        .map(Result::unwrap)
        .filter_map(|i| match i {
            InspectItem::Corrupt { offset, .. } => Some(offset),
            _ => None,
        })
        .collect();
    assert_eq!(corrupt, vec![l.batch_of(2)]);
}
