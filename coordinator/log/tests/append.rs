//! Appending and replaying: the writer's contract.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};

use common::*;
use pledge_log::{InspectItem, LogConfig, LogError};
use tempfile::TempDir;

#[tokio::test]
async fn append_then_replay_round_trip() {
    let dir = TempDir::new().unwrap();
    let config = config(dir.path());
    let (log, replayed) = open(&config);
    assert!(replayed.is_empty());
    assert_eq!(log.recovered_lsn(), 0);
    let writer = log.writer();
    let mut expected = Vec::new();
    for i in 0..50u64 {
        let rtype = (i % 7) as u8;
        let payload = payload(i, (i * 13 % 200) as usize); // includes an empty payload
        let lsn = writer.append(rtype, payload.clone()).await.unwrap();
        assert_eq!(lsn, i + 1, "LSNs are contiguous from 1");
        expected.push(record(lsn, rtype, &payload));
    }
    assert_eq!(writer.durable_lsn(), 50);
    log.shutdown().await.unwrap();

    let (log, replayed) = open(&config);
    assert_eq!(replayed, expected);
    assert_eq!(log.recovered_lsn(), 50);
    assert_eq!(log.writer().append(1, b"next".to_vec()).await.unwrap(), 51);
    log.shutdown().await.unwrap();
    assert_eq!(replay(&config).await.len(), 51);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_keeps_submission_order() {
    let dir = TempDir::new().unwrap();
    let config = config(dir.path());
    let (log, _) = open(&config);
    let writer = log.writer();
    let mut pending = Vec::new();
    for i in 0..200u64 {
        pending.push((i, writer.submit(1, payload(i, 24)).await.unwrap()));
    }
    // Await in reverse: the LSN order must still be the submission order.
    let mut lsns = Vec::new();
    while let Some((i, durable)) = pending.pop() {
        lsns.push((i, durable.await.unwrap()));
    }
    for (i, lsn) in lsns {
        assert_eq!(lsn, i + 1);
    }
    log.shutdown().await.unwrap();
    let replayed = replay(&config).await;
    let payloads: Vec<_> = replayed.iter().map(|r| r.payload.clone()).collect();
    assert_eq!(payloads, (0..200).map(|i| payload(i, 24)).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_records_are_durable_once_a_later_append_returns() {
    let dir = TempDir::new().unwrap();
    let config = config(dir.path());
    let (log, _) = open(&config);
    let writer = log.writer();
    for i in 0..100u64 {
        writer.append_lazy(2, payload(i, 40)).await.unwrap();
    }
    assert_eq!(writer.append(3, b"forced".to_vec()).await.unwrap(), 101);
    assert!(writer.durable_lsn() >= 101, "the forced record's sync covers the lazy ones before it");
    // Without shutting down, the records are in the segment file already.
    let on_disk = pledge_log::inspect(&config).filter(|item| matches!(item, Ok(InspectItem::Record(_)))).count();
    assert_eq!(on_disk, 101);
    log.shutdown().await.unwrap();
}

/// The child half of `acknowledged_records_survive_a_crash`: appends, then aborts without
/// shutting down (no flush, no destructors).
async fn crash_child(dir: &str) {
    let (log, _) = open(&config(std::path::Path::new(dir)));
    let writer = log.writer();
    for i in 0..100u64 {
        writer.append_lazy(2, payload(i, 40)).await.unwrap();
    }
    let lsn = writer.append(3, b"forced".to_vec()).await.unwrap();
    assert_eq!(lsn, 101);
    // Queued but never acknowledged: may or may not survive; must not break recovery.
    for i in 0..50u64 {
        let _ = writer.append_lazy(2, payload(1000 + i, 40)).await;
    }
    std::process::abort();
}

/// Runs the appends in a child process that aborts right after an `append` returned, then
/// recovers in this process. A process crash keeps the page cache, so this checks that nothing
/// is acknowledged before it was written (and the replay after a real crash), not the sync.
#[tokio::test]
async fn acknowledged_records_survive_a_crash() {
    const CHILD_ENV: &str = "PLEDGE_LOG_TEST_CRASH_CHILD_DIR";
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        crash_child(&dir).await;
    }
    let dir = TempDir::new().unwrap();
    let status = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "acknowledged_records_survive_a_crash", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir.path())
        // Its stdout would add a "running 1 test" line to this run's output.
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.signal(), Some(libc_sigabrt()), "child must reach its abort: {status:?}");

    let replayed = replay(&config(dir.path())).await;
    assert!(replayed.len() >= 101, "only {} records survived", replayed.len());
    for (i, r) in replayed.iter().take(100).enumerate() {
        assert_eq!((r.lsn, &r.payload), (i as u64 + 1, &payload(i as u64, 40)));
    }
    assert_eq!(replayed[100].payload, b"forced");
    for (i, r) in replayed.iter().enumerate() {
        assert_eq!(r.lsn, i as u64 + 1, "LSNs contiguous");
    }
}

fn libc_sigabrt() -> i32 {
    6 // SIGABRT on Linux
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_flushes_queued_lazy_records() {
    const COUNT: u64 = 20_000;
    let dir = TempDir::new().unwrap();
    let mut config = config(dir.path());
    config.queue_capacity = COUNT as usize + 1;
    let (log, _) = open(&config);
    let writer = log.writer();
    for i in 0..COUNT {
        writer.append_lazy(1, payload(i, 32)).await.unwrap();
    }
    // The shutdown request usually lands in the same batch as the last lazy records.
    log.shutdown().await.unwrap();
    assert_eq!(writer.stats().records, COUNT, "everything queued before shutdown was written");
    assert_eq!(writer.durable_lsn(), COUNT);
    assert_eq!(writer.append(1, b"late".to_vec()).await, Err(LogError::Closed));
    assert_eq!(writer.append_lazy(1, b"late".to_vec()).await, Err(LogError::Closed));

    let replayed = replay(&config).await;
    assert_eq!(replayed.len() as u64, COUNT);
    assert_eq!(replayed[COUNT as usize - 1].payload, payload(COUNT - 1, 32));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_batches_concurrent_appends() {
    const TASKS: u64 = 64;
    const PER_TASK: u64 = 50;
    // Batching needs syncs that take time (requests pile up during one). On tmpfs fdatasync is
    // nearly free and batches stay small, so use the build's disk rather than $TMPDIR.
    let dir = TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let config = config(dir.path());
    let (log, _) = open(&config);
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let writer = log.writer();
        tasks.push(tokio::spawn(async move {
            let mut last = 0;
            for i in 0..PER_TASK {
                let lsn = writer.append(1, payload(t * 1000 + i, 128)).await.unwrap();
                assert!(lsn > last, "one task's records keep their order");
                last = lsn;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let stats = log.writer().stats();
    log.shutdown().await.unwrap();
    assert_eq!(stats.records, TASKS * PER_TASK);
    assert!(stats.syncs >= 1);
    assert!(stats.syncs * 4 < stats.records, "group commit should need far fewer syncs than records: {stats:?}");
    assert_eq!(stats.batches, stats.syncs, "no rotation or checkpoint here: one sync per batch");
    assert_eq!(replay(&config).await.len() as u64, TASKS * PER_TASK);
}

#[tokio::test]
async fn replays_100k_records() {
    const COUNT: u64 = 100_000;
    let dir = TempDir::new().unwrap();
    let config = config(dir.path());
    let (log, _) = open(&config);
    let writer = log.writer();
    for i in 0..COUNT - 1 {
        writer.append_lazy((i % 200) as u8, payload(i, 20 + (i % 50) as usize)).await.unwrap();
    }
    let i = COUNT - 1;
    assert_eq!(writer.append((i % 200) as u8, payload(i, 20 + (i % 50) as usize)).await.unwrap(), COUNT);
    log.shutdown().await.unwrap();

    let replayed = replay(&config).await;
    assert_eq!(replayed.len() as u64, COUNT);
    for (index, r) in replayed.iter().enumerate() {
        assert_eq!(r.lsn, index as u64 + 1, "order");
    }
    for i in (0..COUNT).step_by(997).chain([COUNT - 1]) {
        let r = &replayed[i as usize];
        assert_eq!((r.rtype, &r.payload), ((i % 200) as u8, &payload(i, 20 + (i % 50) as usize)));
    }
}

#[tokio::test]
async fn segments_rotate_and_replay_across_them() {
    let dir = TempDir::new().unwrap();
    let mut config = config(dir.path());
    config.segment_size_bytes = 4096;
    config.preallocate_chunk_bytes = 1024;
    let (log, _) = open(&config);
    let writer = log.writer();
    for i in 0..200u64 {
        assert_eq!(writer.append(1, payload(i, 100)).await.unwrap(), i + 1);
    }
    log.shutdown().await.unwrap();

    let files = segments(dir.path());
    assert!(files.len() >= 5, "expected several segments, got {files:?}");
    // Each file is named after the first LSN it holds, and sealed ones carry no zero tail.
    let mut segment_firsts = Vec::new();
    for item in pledge_log::inspect(&config) {
        match item.unwrap() {
            InspectItem::Segment { path, first_lsn, .. } => {
                assert_eq!(path.file_name().unwrap().to_str().unwrap(), segment_name(first_lsn));
                segment_firsts.push(first_lsn);
            }
            InspectItem::SegmentEnd { path, zero_tail_bytes, .. } if path != *files.last().unwrap() => {
                assert_eq!(zero_tail_bytes, 0, "sealed segment {path:?} was trimmed");
            }
            InspectItem::Record(_) | InspectItem::Batch { .. } | InspectItem::SegmentEnd { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(segment_firsts.len(), files.len());
    assert_eq!(segment_firsts[0], 1);

    let replayed = replay(&config).await;
    assert_eq!(replayed.len(), 200);
    assert!(replayed.iter().enumerate().all(|(i, r)| r.payload == payload(i as u64, 100)));
}

#[tokio::test]
async fn rejects_reserved_types_and_oversized_records() {
    let dir = TempDir::new().unwrap();
    let mut config = config(dir.path());
    config.max_record_bytes = 100;
    let (log, _) = open(&config);
    let writer = log.writer();
    for rtype in [0xF0, 0xF1, 0xFF] {
        assert_eq!(writer.append(rtype, vec![]).await, Err(LogError::ReservedType(rtype)));
        assert_eq!(writer.append_lazy(rtype, vec![]).await, Err(LogError::ReservedType(rtype)));
        assert_eq!(writer.checkpoint(vec![(rtype, vec![])]).await, Err(LogError::ReservedType(rtype)));
    }
    assert_eq!(
        writer.append(1, vec![0; 101]).await,
        Err(LogError::RecordTooLarge { payload_bytes: 101, max_record_bytes: 100 })
    );
    assert_eq!(writer.append(0xEF, vec![0; 100]).await, Ok(1), "the largest allowed record and type");
    log.shutdown().await.unwrap();
    assert_eq!(replay(&config).await, vec![record(1, 0xEF, &[0; 100])]);
}

#[tokio::test]
async fn a_second_open_of_the_same_directory_is_refused() {
    let dir = TempDir::new().unwrap();
    let config = config(dir.path());
    let (log, _) = open(&config);
    let message = open_err(&config);
    assert!(message.contains("is locked by another process"), "{message}");
    log.shutdown().await.unwrap();
    let (log, _) = open(&config);
    log.shutdown().await.unwrap();
}

#[test]
fn invalid_config_is_refused() {
    let dir = TempDir::new().unwrap();
    let mut config = LogConfig::new(dir.path());
    config.queue_capacity = 0;
    assert!(open_err(&config).contains("queue_capacity"));
}
