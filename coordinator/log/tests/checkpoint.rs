//! Checkpoints: written off the commit path into their own files, the files they cover go
//! away, replay starts at the newest checkpoint, and a crash at any point of writing one leaves
//! a log that opens to a consistent state.

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

/// What replay delivers for `snapshot()`: its records, with LSN 0.
fn snapshot_records() -> Vec<Record> {
    snapshot().iter().map(|(t, p)| record(0, *t, p)).collect()
}

async fn append_n(writer: &pledge_log::LogWriter, from: u64, count: u64) {
    for i in from..from + count {
        writer.append(1, payload(i, PAYLOAD_BYTES)).await.unwrap();
    }
}

fn checkpoint_name(lsn: u64) -> String {
    format!("{lsn:020}.ckpt")
}

/// Copies every segment and checkpoint file of `from` into `to`.
fn copy_files(from: &Path, to: &Path) -> Vec<PathBuf> {
    fs::create_dir_all(to).unwrap();
    segments(from)
        .into_iter()
        .chain(checkpoints(from))
        .map(|file| {
            let dest = to.join(file.file_name().unwrap());
            fs::copy(&file, &dest).unwrap();
            dest
        })
        .collect()
}

#[tokio::test]
async fn checkpoint_deletes_what_it_covers_and_replay_starts_from_it() {
    let dir = TempDir::new().unwrap();
    let config = small_segments(dir.path());
    let (log, _) = open(&config);
    let writer = log.writer();
    append_n(&writer, 0, 200).await;
    let before = segments(dir.path());
    assert!(before.len() >= 4, "{before:?}");

    // The barrier: replay continues from LSN 201, in a segment of its own.
    assert_eq!(writer.checkpoint(snapshot()).await.unwrap(), 201);
    assert_eq!(segments(dir.path()), vec![dir.path().join(segment_name(201))], "older segments are gone");
    assert_eq!(checkpoints(dir.path()), vec![dir.path().join(checkpoint_name(201))]);
    for old in &before {
        assert!(!old.exists(), "{old:?} still exists");
    }
    assert_eq!(writer.append(9, b"later-1".to_vec()).await.unwrap(), 201, "checkpoints take no LSNs");
    writer.append_lazy(9, b"later-2".to_vec()).await.unwrap();
    log.shutdown().await.unwrap();
    let stats = writer.stats(); // after shutdown: the lazy record is committed too
    assert_eq!((stats.checkpoints, stats.records), (1, 200 + 3 + 2));

    let mut expected = snapshot_records();
    expected.push(record(201, 9, b"later-1"));
    expected.push(record(202, 9, b"later-2"));
    let (log, replayed) = open(&config);
    assert_eq!(replayed, expected, "exactly the checkpoint's records and what came after");
    assert_eq!(log.writer().append(1, b"x".to_vec()).await.unwrap(), 203);
    log.shutdown().await.unwrap();

    // inspect shows the end marker the replay callback never sees.
    let items: Vec<InspectItem> = pledge_log::inspect(&config).map(Result::unwrap).collect();
    assert!(items.iter().any(|i| matches!(i, InspectItem::Segment { checkpoint_file: true, first_lsn: 201, .. })));
    assert!(items.iter().any(|i| matches!(i, InspectItem::CheckpointEnd { record_count: 3, .. })));
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
    assert_eq!(checkpoint.await.unwrap(), 11, "the 10 records are covered");
    assert_eq!(after.await.unwrap(), 11);
    log.shutdown().await.unwrap();
    let mut expected = snapshot_records();
    expected.push(record(11, 7, b"after"));
    assert_eq!(replay(&config).await, expected);
}

/// A large snapshot is written by the checkpoint thread while the writer goes on: a commit
/// submitted after it is durable long before it is.
#[tokio::test]
async fn commits_do_not_wait_for_a_checkpoint() {
    let dir = TempDir::new().unwrap();
    let config = config(dir.path());
    let (log, _) = open(&config);
    let writer = log.writer();
    writer.append(1, b"before".to_vec()).await.unwrap();
    let big: Vec<(u8, Vec<u8>)> = (0..300_000).map(|i| (2, payload(i, 100))).collect();
    let mut checkpoint = writer.submit_checkpoint(big).await.unwrap();
    let after = writer.append(1, b"after".to_vec()).await.unwrap();
    assert_eq!(after, 2);
    // The checkpoint (30 MB to write and sync) is still on its way.
    assert!(futures::poll!(&mut checkpoint).is_pending(), "the commit waited for the checkpoint to be written");
    assert_eq!(checkpoint.await.unwrap(), 2);
    log.shutdown().await.unwrap();
    let replayed = replay(&config).await;
    assert_eq!(replayed.len(), 300_001);
    assert_eq!(replayed.last().unwrap(), &record(2, 1, b"after"));
}

#[tokio::test]
async fn checkpoint_of_a_fresh_log_and_back_to_back_checkpoints() {
    let dir = TempDir::new().unwrap();
    let config = config(dir.path());
    let (log, _) = open(&config);
    let writer = log.writer();
    // Nothing written yet: the barrier is LSN 1 and the empty segment stays.
    assert_eq!(writer.checkpoint(snapshot()).await.unwrap(), 1);
    assert_eq!(segments(dir.path()), vec![dir.path().join(segment_name(1))]);
    // A second one at the same barrier replaces the first.
    assert_eq!(writer.checkpoint(vec![(4, b"only".to_vec())]).await.unwrap(), 1);
    assert_eq!(checkpoints(dir.path()), vec![dir.path().join(checkpoint_name(1))]);
    writer.append(5, b"one".to_vec()).await.unwrap();
    assert_eq!(writer.checkpoint(Vec::<(u8, Vec<u8>)>::new()).await.unwrap(), 2, "an empty snapshot is allowed");
    assert_eq!(checkpoints(dir.path()), vec![dir.path().join(checkpoint_name(2))]);
    log.shutdown().await.unwrap();
    assert_eq!(replay(&config).await, vec![]);
}

#[tokio::test]
async fn crash_after_checkpoint_sync_but_before_deleting_what_it_covers() {
    let dir = TempDir::new().unwrap();
    let config = small_segments(dir.path());
    let saved = TempDir::new().unwrap();
    let (log, _) = open(&config);
    let writer = log.writer();
    append_n(&writer, 0, 100).await;
    writer.checkpoint(vec![(5, b"older".to_vec())]).await.unwrap();
    append_n(&writer, 100, 100).await;
    let old = copy_files(dir.path(), saved.path());
    assert!(old.len() >= 4);
    writer.checkpoint(snapshot()).await.unwrap();
    writer.append(9, b"later".to_vec()).await.unwrap();
    log.shutdown().await.unwrap();
    // Put the old files back (segments and the older checkpoint), as if the crash came before
    // their deletion.
    let restored = copy_files(saved.path(), dir.path());

    let mut expected = snapshot_records();
    expected.push(record(201, 9, b"later"));
    assert_eq!(replay(&config).await, expected);
    for old in &restored {
        assert!(!old.exists(), "open deletes superseded file {old:?}");
    }
    assert_eq!(segments(dir.path()), vec![dir.path().join(segment_name(201))]);
}

#[tokio::test]
async fn a_damaged_checkpoint_is_refused_not_skipped() {
    let dir = TempDir::new().unwrap();
    let config = small_segments(dir.path());
    let (log, _) = open(&config);
    let writer = log.writer();
    append_n(&writer, 0, 10).await;
    writer.checkpoint(snapshot()).await.unwrap();
    append_n(&writer, 100, 10).await;
    log.shutdown().await.unwrap();
    let checkpoint = dir.path().join(checkpoint_name(11));
    // A checkpoint is renamed into place only once synced whole: damage is never a torn write,
    // and the segments it covered are gone, so nothing could replace it.
    let len = file_len(&checkpoint);
    OpenOptions::new().write(true).open(&checkpoint).unwrap().set_len(len - 3).unwrap();
    let message = open_err(&config);
    assert!(message.starts_with(&format!("corrupt record in {} at offset", checkpoint.display())), "{message}");
}

#[tokio::test]
async fn an_unfinished_checkpoint_file_is_removed() {
    let dir = TempDir::new().unwrap();
    let config = config(dir.path());
    let (log, _) = open(&config);
    append_n(&log.writer(), 0, 3).await;
    log.shutdown().await.unwrap();
    let tmp = dir.path().join(format!("{:020}.ckpt.tmp", 4));
    fs::write(&tmp, b"PLEDGLOG partial checkpoint").unwrap();
    let (log, replayed) = open(&config);
    assert_eq!(replayed.len(), 3);
    assert!(!tmp.exists());
    log.shutdown().await.unwrap();
}

/// A checkpoint starts a new segment at its barrier; a clean shutdown right after it, then a
/// reopen and another checkpoint with nothing appended in between, must not try to start a
/// second segment of the same name.
#[tokio::test]
async fn checkpoints_across_a_restart_with_nothing_appended_between() {
    let dir = TempDir::new().unwrap();
    let config = config(dir.path());
    let (log, _) = open(&config);
    // Queued together: the checkpoint follows the last batch before any mark could.
    for i in 0..5 {
        log.writer().append_lazy(1, payload(i, 10)).await.unwrap();
    }
    assert_eq!(log.writer().checkpoint(snapshot()).await.unwrap(), 6);
    log.shutdown().await.unwrap();
    let (log, replayed) = open(&config);
    assert_eq!(replayed, snapshot_records());
    assert_eq!(log.writer().checkpoint(vec![(4, b"again".to_vec())]).await.unwrap(), 6);
    assert_eq!(log.writer().append(1, b"next".to_vec()).await.unwrap(), 6);
    log.shutdown().await.unwrap();
    assert_eq!(replay(&config).await, vec![record(0, 4, b"again"), record(6, 1, b"next")]);
}
