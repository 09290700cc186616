//! Checkpoints: old segments go away, replay starts at the newest complete checkpoint, and a
//! crash at any point of writing one leaves a log that opens to a consistent state.

mod common;

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};

use common::*;
use pledge_log::{InspectItem, LogConfig, Record};
use tempfile::TempDir;

const PAYLOAD_BYTES: usize = 100;

/// Small segments so a few hundred records span several files.
fn small_segments(dir: &Path) -> LogConfig {
    let mut config = config(dir);
    config.segment_size_bytes = 4096;
    config.preallocate_chunk_bytes = 1024;
    config
}

fn snapshot() -> Vec<(u8, Vec<u8>)> {
    vec![(1, b"live-a".to_vec()), (2, b"live-b".to_vec()), (3, Vec::new())]
}

async fn append_n(writer: &pledge_log::LogWriter, from: u64, count: u64) {
    for i in from..from + count {
        writer.append(1, payload(i, PAYLOAD_BYTES)).await.unwrap();
    }
}

/// Copies every segment file of `from` into `to`.
fn copy_segments(from: &Path, to: &Path) -> Vec<PathBuf> {
    fs::create_dir_all(to).unwrap();
    segments(from)
        .into_iter()
        .map(|seg| {
            let dest = to.join(seg.file_name().unwrap());
            fs::copy(&seg, &dest).unwrap();
            dest
        })
        .collect()
}

fn expected_after_checkpoint(begin_lsn: u64) -> Vec<Record> {
    snapshot().iter().zip(begin_lsn + 1..).map(|((t, p), lsn)| record(lsn, *t, p)).collect()
}

/// Byte offset just past the checkpoint's second record in a checkpoint segment written from
/// `snapshot()`: header, begin marker (8-byte payload), two records.
fn inside_checkpoint_offset() -> u64 {
    HEADER_BYTES + (FRAME_OVERHEAD_BYTES + 8) + (FRAME_OVERHEAD_BYTES + 6) * 2
}

#[tokio::test]
async fn checkpoint_deletes_old_segments_and_replay_starts_from_it() {
    let dir = TempDir::new().unwrap();
    let config = small_segments(dir.path());
    let (log, _) = open(&config);
    let writer = log.writer();
    append_n(&writer, 0, 200).await;
    let before = segments(dir.path());
    assert!(before.len() >= 4, "{before:?}");

    // Begin marker 201, records 202..=204, end marker 205.
    assert_eq!(writer.checkpoint(snapshot()).await.unwrap(), 205);
    assert_eq!(writer.durable_lsn(), 205);
    let after = segments(dir.path());
    assert_eq!(after, vec![dir.path().join(segment_name(201))], "older segments are gone from disk");
    for old in &before {
        assert!(!old.exists(), "{old:?} still exists");
    }
    assert_eq!(writer.append(9, b"later-1".to_vec()).await.unwrap(), 206);
    writer.append_lazy(9, b"later-2".to_vec()).await.unwrap();
    log.shutdown().await.unwrap();
    let stats = writer.stats(); // after shutdown: the lazy record is committed too
    assert_eq!((stats.checkpoints, stats.records), (1, 200 + 3 + 2));

    let mut expected = expected_after_checkpoint(201);
    expected.push(record(206, 9, b"later-1"));
    expected.push(record(207, 9, b"later-2"));
    let (log, replayed) = open(&config);
    assert_eq!(replayed, expected, "exactly the checkpoint's records and what came after");
    assert_eq!(log.writer().append(1, b"x".to_vec()).await.unwrap(), 208);
    log.shutdown().await.unwrap();

    // inspect shows the markers the replay callback never sees.
    let markers: Vec<_> = pledge_log::inspect(&config)
        .map(Result::unwrap)
        .filter_map(|item| match item {
            InspectItem::CheckpointBegin { lsn, record_count, .. } => Some(("begin", lsn, record_count)),
            InspectItem::CheckpointEnd { lsn, record_count, .. } => Some(("end", lsn, record_count)),
            _ => None,
        })
        .collect();
    assert_eq!(markers, vec![("begin", 201, 3), ("end", 205, 3)]);
}

#[tokio::test]
async fn records_queued_before_a_checkpoint_are_written_before_it() {
    let dir = TempDir::new().unwrap();
    let config = small_segments(dir.path());
    let (log, _) = open(&config);
    let writer = log.writer();
    for i in 0..10 {
        writer.append_lazy(1, payload(i, 10)).await.unwrap();
    }
    let checkpoint = writer.submit_checkpoint(snapshot()).await.unwrap();
    let after = writer.submit(7, b"after".to_vec()).await.unwrap();
    assert_eq!(checkpoint.await.unwrap(), 15, "10 records, begin 11, records 12..=14, end 15");
    assert_eq!(after.await.unwrap(), 16);
    log.shutdown().await.unwrap();
    let mut expected = expected_after_checkpoint(11);
    expected.push(record(16, 7, b"after"));
    assert_eq!(replay(&config).await, expected);
}

#[tokio::test]
async fn checkpoint_of_a_fresh_log_and_back_to_back_checkpoints() {
    let dir = TempDir::new().unwrap();
    let config = config(dir.path());
    let (log, _) = open(&config);
    let writer = log.writer();
    // The active segment is empty and named 1.seg, the checkpoint's name: it is replaced.
    assert_eq!(writer.checkpoint(snapshot()).await.unwrap(), 5);
    assert_eq!(segments(dir.path()), vec![dir.path().join(segment_name(1))]);
    assert_eq!(writer.checkpoint(vec![(4, b"only".to_vec())]).await.unwrap(), 8);
    assert_eq!(segments(dir.path()), vec![dir.path().join(segment_name(6))]);
    assert_eq!(writer.checkpoint(Vec::<(u8, Vec<u8>)>::new()).await.unwrap(), 10, "an empty snapshot is allowed");
    log.shutdown().await.unwrap();
    assert_eq!(replay(&config).await, vec![]);
}

#[tokio::test]
async fn crash_after_checkpoint_sync_but_before_deleting_old_segments() {
    let dir = TempDir::new().unwrap();
    let config = small_segments(dir.path());
    let saved = TempDir::new().unwrap();
    let (log, _) = open(&config);
    let writer = log.writer();
    append_n(&writer, 0, 200).await;
    let old = copy_segments(dir.path(), saved.path());
    assert!(old.len() >= 4);
    writer.checkpoint(snapshot()).await.unwrap();
    writer.append(9, b"later".to_vec()).await.unwrap();
    log.shutdown().await.unwrap();
    // Put the old segments back, as if the crash came before their deletion.
    let restored = copy_segments(saved.path(), dir.path());

    let mut expected = expected_after_checkpoint(201);
    expected.push(record(206, 9, b"later"));
    assert_eq!(replay(&config).await, expected);
    for old in &restored {
        assert!(!old.exists(), "open deletes superseded segment {old:?}");
    }
    assert_eq!(segments(dir.path()), vec![dir.path().join(segment_name(201))]);
}

/// Puts the checkpoint segment written in `with` into `without` (a copy of the log from before
/// that checkpoint), cut inside the checkpoint: a crash while the checkpoint was being written.
fn plant_torn_checkpoint(with: &Path, without: &Path, checkpoint_lsn: u64) -> PathBuf {
    let source = with.join(segment_name(checkpoint_lsn));
    let torn = without.join(segment_name(checkpoint_lsn));
    fs::copy(&source, &torn).unwrap();
    OpenOptions::new().write(true).open(&torn).unwrap().set_len(inside_checkpoint_offset() + 7).unwrap();
    torn
}

#[tokio::test]
async fn an_incomplete_checkpoint_falls_back_to_the_full_log() {
    let dir = TempDir::new().unwrap();
    let config = small_segments(dir.path());
    let saved = TempDir::new().unwrap();
    let (log, _) = open(&config);
    append_n(&log.writer(), 0, 200).await;
    log.shutdown().await.unwrap();
    copy_segments(dir.path(), saved.path());

    let (log, _) = open(&config);
    assert_eq!(log.writer().checkpoint(snapshot()).await.unwrap(), 205);
    log.shutdown().await.unwrap();

    let torn = plant_torn_checkpoint(dir.path(), saved.path(), 201);
    let saved_config = small_segments(saved.path());
    let (log, replayed) = open(&saved_config);
    assert_eq!(replayed.len(), 200, "the state before the checkpoint");
    assert!(
        replayed
            .iter()
            .enumerate()
            .all(|(i, r)| r.lsn == i as u64 + 1 && r.payload == payload(i as u64, PAYLOAD_BYTES))
    );
    assert!(!torn.exists(), "the incomplete checkpoint segment is deleted");
    assert_eq!(log.writer().append(1, b"next".to_vec()).await.unwrap(), 201);
    log.shutdown().await.unwrap();
    assert_eq!(replay(&saved_config).await.len(), 201);
}

#[tokio::test]
async fn an_incomplete_checkpoint_falls_back_to_the_previous_checkpoint() {
    let dir = TempDir::new().unwrap();
    let config = small_segments(dir.path());
    let saved = TempDir::new().unwrap();
    let (log, _) = open(&config);
    let writer = log.writer();
    append_n(&writer, 0, 50).await;
    assert_eq!(writer.checkpoint(snapshot()).await.unwrap(), 55);
    append_n(&writer, 1000, 60).await; // LSNs 56..=115, spilling into new segments
    log.shutdown().await.unwrap();
    copy_segments(dir.path(), saved.path());
    assert!(segments(saved.path()).len() >= 2);

    let (log, _) = open(&config);
    assert_eq!(log.writer().checkpoint(snapshot()).await.unwrap(), 120);
    log.shutdown().await.unwrap();
    plant_torn_checkpoint(dir.path(), saved.path(), 116);

    let replayed = replay(&small_segments(saved.path())).await;
    let mut expected = expected_after_checkpoint(51);
    expected.extend((0..60).map(|i| record(56 + i, 1, &payload(1000 + i, PAYLOAD_BYTES))));
    assert_eq!(replayed, expected);
}

#[tokio::test]
async fn an_incomplete_checkpoint_with_later_segments_is_corruption() {
    let dir = TempDir::new().unwrap();
    let config = small_segments(dir.path());
    let (log, _) = open(&config);
    let writer = log.writer();
    append_n(&writer, 0, 10).await;
    writer.checkpoint(snapshot()).await.unwrap(); // segment 11
    append_n(&writer, 100, 100).await; // rotates past it
    log.shutdown().await.unwrap();
    let checkpoint = dir.path().join(segment_name(11));
    assert!(segments(dir.path()).len() >= 2);
    // Damage the checkpoint's third record: valid frames follow, in this and later segments.
    let file = OpenOptions::new().write(true).open(&checkpoint).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, b"XX", inside_checkpoint_offset() + 4).unwrap();

    let message = open_err(&config);
    let expected = format!("corrupt record in {} at offset {}: ", checkpoint.display(), inside_checkpoint_offset());
    assert!(message.starts_with(&expected), "{message}");
    assert!(message.contains("incomplete checkpoint"), "{message}");
}

#[tokio::test]
async fn an_unfinished_checkpoint_file_is_removed() {
    let dir = TempDir::new().unwrap();
    let config = config(dir.path());
    let (log, _) = open(&config);
    append_n(&log.writer(), 0, 3).await;
    log.shutdown().await.unwrap();
    let tmp = dir.path().join(format!("{:020}.seg.tmp", 4));
    fs::write(&tmp, b"PLEDGLOG partial checkpoint").unwrap();
    let (log, replayed) = open(&config);
    assert_eq!(replayed.len(), 3);
    assert!(!tmp.exists());
    log.shutdown().await.unwrap();
}
