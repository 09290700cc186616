//! Opening a log: pick the starting segment, replay, repair a torn tail, refuse anything else.
//!
//! Runs before the writer thread exists, on the caller's thread, with plain blocking I/O.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use tracing::{info, warn};

use crate::config::LogConfig;
use crate::error::{Corruption, OpenError};
use crate::format::{self, SEGMENT_HEADER_BYTES, SegmentHeader};
use crate::segment::{self, FrameCursor, FrameKind, MarkerTracker, SegmentFile, Step, TailLimits};
use crate::writer::ActiveSegment;
use crate::{Lsn, Record};

/// Everything the writer thread needs to continue the log.
pub(crate) struct Recovered {
    pub dir: File,
    /// Holds the directory's advisory lock for as long as the writer lives.
    pub lock: File,
    pub active: ActiveSegment,
    /// Live segments older than the active one, oldest first.
    pub older: Vec<SegmentFile>,
    pub next_lsn: Lsn,
}

pub(crate) fn recover<E>(
    config: &LogConfig,
    replay: &mut impl FnMut(Record) -> Result<(), E>,
) -> Result<Recovered, OpenError<E>> {
    config.validate().map_err(OpenError::InvalidConfig)?;
    let dir_path = config.dir.as_path();
    create_dir(dir_path)?;
    let lock = segment::lock_dir(dir_path)
        .map_err(|e| OpenError::io(dir_path.join("LOCK"), e))?
        .ok_or_else(|| OpenError::Locked { dir: dir_path.to_owned() })?;
    let dir = File::open(dir_path).map_err(|e| OpenError::io(dir_path, e))?;
    let listing = segment::list_dir(dir_path).map_err(|e| OpenError::io(dir_path, e))?;
    let limits = TailLimits { max_batch_bytes: config.max_batch_bytes, max_record_bytes: config.max_record_bytes };

    let mut dir_changed = false;
    for tmp in &listing.tmp_files {
        // A checkpoint is renamed into place only once complete and synced, so a leftover
        // temporary file is an unfinished checkpoint: the log never depended on it.
        warn!(file = %tmp.display(), "removing unfinished checkpoint file");
        remove(tmp)?;
        dir_changed = true;
    }
    let mut segments = listing.segments;

    // A crash while a segment was being created can leave the last one with a torn header.
    // It was synced before anything was written into it, so it can hold no record.
    if let Some(last) = segments.last() {
        let header_bytes = read_prefix(&last.path, SEGMENT_HEADER_BYTES)?;
        if let Err(e) = format::decode_header(&header_bytes)
            && e.maybe_torn()
        {
            let data = read(&last.path)?;
            segment::classify_damage(&data, 0, Corruption::BadHeader(e), 0, limits)
                .map_err(|reason| OpenError::Corrupt { path: last.path.clone(), offset: 0, reason })?;
            warn!(file = %last.path.display(), error = %e, len_bytes = data.len(),
                "deleting last segment: its header is torn and it holds no record (crash while creating it)");
            remove(&last.path)?;
            dir_changed = true;
            segments.pop();
        }
    }

    let start = find_start(&mut segments, limits, &mut dir_changed)?;
    let start_index = start.as_ref().map_or(0, |(index, _)| *index);
    if start_index > 0 {
        // The checkpoint was synced but the crash came before its older segments were deleted.
        warn!(
            count = start_index,
            checkpoint_lsn = segments[start_index].first_lsn,
            "deleting segments older than the newest complete checkpoint (cleanup was interrupted)"
        );
        for old in segments.drain(..start_index) {
            remove(&old.path)?;
        }
        dir_changed = true;
    }
    if dir_changed {
        segment::sync_dir(&dir).map_err(|e| OpenError::io(dir_path, e))?;
    }

    if segments.is_empty() {
        return start_fresh(config, dir, lock);
    }
    if start.is_none() && segments[0].first_lsn != 1 {
        return Err(OpenError::CorruptSegment {
            path: segments[0].path.clone(),
            reason: Corruption::MissingHistory { first_lsn: segments[0].first_lsn },
        });
    }

    let mut start_data = start.map(|(_, data)| data);
    let mut expected_lsn = segments[0].first_lsn;
    let mut records_replayed = 0u64;
    let mut end_offset = 0u64;
    let last_index = segments.len() - 1;
    for (index, seg) in segments.iter().enumerate() {
        let data = match start_data.take() {
            Some(data) => data,
            None => read(&seg.path)?,
        };
        let corrupt_segment = |reason| OpenError::CorruptSegment { path: seg.path.clone(), reason };
        let header = format::decode_header(&data).map_err(|e| corrupt_segment(Corruption::BadHeader(e)))?;
        if header.first_lsn != seg.first_lsn {
            return Err(corrupt_segment(Corruption::NameMismatch {
                name_lsn: seg.first_lsn,
                header_lsn: header.first_lsn,
            }));
        }
        if header.first_lsn != expected_lsn {
            return Err(corrupt_segment(Corruption::LsnDiscontinuity {
                expected: expected_lsn,
                found: header.first_lsn,
            }));
        }
        let corrupt = |offset, reason| OpenError::Corrupt { path: seg.path.clone(), offset, reason };
        let mut markers = MarkerTracker::new(header);
        let mut cursor = FrameCursor::new(&data, config.max_record_bytes);
        end_offset = loop {
            match cursor.step() {
                Step::Frame { offset, frame } => {
                    if frame.lsn != expected_lsn {
                        return Err(corrupt(
                            offset,
                            Corruption::LsnDiscontinuity { expected: expected_lsn, found: frame.lsn },
                        ));
                    }
                    let kind = markers.observe(&frame).map_err(|reason| corrupt(offset, reason))?;
                    if kind == FrameKind::Record {
                        let record = Record { lsn: frame.lsn, rtype: frame.rtype, payload: frame.payload.to_vec() };
                        replay(record).map_err(|source| OpenError::Replay { lsn: frame.lsn, source })?;
                        records_replayed += 1;
                    }
                    expected_lsn += 1;
                }
                Step::End { offset } => break offset,
                Step::Bad { offset, reason } if index == last_index => {
                    segment::classify_damage(&data, offset, reason.clone(), expected_lsn - 1, limits)
                        .map_err(|reason| corrupt(offset, reason))?;
                    truncate(&seg.path, offset)?;
                    warn!(file = %seg.path.display(), offset, dropped_bytes = data.len() as u64 - offset, %reason,
                        "truncated torn tail of the log (a write cut short by a crash; never acknowledged)");
                    break offset;
                }
                Step::Bad { offset, reason } => return Err(corrupt(offset, reason)),
            }
        };
        if markers.inside_checkpoint() {
            // find_start verified the starting checkpoint and no later segment begins one.
            return Err(corrupt(end_offset, Corruption::IncompleteCheckpoint));
        }
    }

    let last = &segments[last_index];
    let file = OpenOptions::new().write(true).open(&last.path).map_err(|e| OpenError::io(&last.path, e))?;
    let file_len = file.metadata().map_err(|e| OpenError::io(&last.path, e))?.len();
    info!(dir = %dir_path.display(), segments = segments.len(), records_replayed, next_lsn = expected_lsn, "log opened");
    let active = ActiveSegment {
        file,
        path: last.path.clone(),
        first_lsn: last.first_lsn,
        write_offset_bytes: end_offset,
        allocated_bytes: file_len,
    };
    segments.truncate(last_index);
    Ok(Recovered { dir, lock, active, older: segments, next_lsn: expected_lsn })
}

/// Finds the newest segment that begins with a complete checkpoint, and returns its index and
/// bytes. An incomplete checkpoint can only be the torn end of the log (nothing is written after
/// a checkpoint before it is synced): then that segment is deleted and the search goes on to
/// the previous checkpoint, whose segments still exist because they are deleted only after a
/// newer checkpoint is complete. Anywhere else, an incomplete checkpoint is corruption.
fn find_start<E>(
    segments: &mut Vec<SegmentFile>,
    limits: TailLimits,
    dir_changed: &mut bool,
) -> Result<Option<(usize, Vec<u8>)>, OpenError<E>> {
    for index in (0..segments.len()).rev() {
        let seg = &segments[index];
        // A bad header is reported by replay if the segment is still needed.
        let Ok(header) = format::decode_header(&read_prefix(&seg.path, SEGMENT_HEADER_BYTES)?) else { continue };
        if !header.begins_with_checkpoint {
            continue;
        }
        let data = read(&seg.path)?;
        let corrupt = |offset, reason| OpenError::Corrupt { path: seg.path.clone(), offset, reason };
        match scan_checkpoint(&data, header, limits.max_record_bytes) {
            CheckpointScan::Complete => return Ok(Some((index, data))),
            CheckpointScan::Corrupt { offset, reason } => return Err(corrupt(offset, reason)),
            CheckpointScan::Stopped { offset, .. } if index + 1 != segments.len() => {
                return Err(corrupt(offset, Corruption::IncompleteCheckpoint));
            }
            CheckpointScan::Stopped { offset, damage, last_good_lsn } => {
                if let Some(cause) = damage {
                    segment::classify_damage(&data, offset, cause, last_good_lsn, limits)
                        .map_err(|reason| corrupt(offset, reason))?;
                }
                warn!(file = %seg.path.display(), offset,
                    "deleting incomplete checkpoint at the end of the log; replaying from the previous one");
                remove(&seg.path)?;
                *dir_changed = true;
                segments.pop();
            }
        }
    }
    Ok(None)
}

enum CheckpointScan {
    Complete,
    /// The checkpoint stops before its end marker, at `offset`: at a clean end of data
    /// (`damage` is None) or at a damaged frame.
    Stopped {
        offset: u64,
        damage: Option<Corruption>,
        last_good_lsn: Lsn,
    },
    /// Valid frames that the writer cannot have produced.
    Corrupt {
        offset: u64,
        reason: Corruption,
    },
}

fn scan_checkpoint(data: &[u8], header: SegmentHeader, max_record_bytes: usize) -> CheckpointScan {
    let mut markers = MarkerTracker::new(header);
    let mut cursor = FrameCursor::new(data, max_record_bytes);
    let mut expected_lsn = header.first_lsn;
    loop {
        match cursor.step() {
            Step::Frame { offset, frame } => {
                if frame.lsn != expected_lsn {
                    let reason = Corruption::LsnDiscontinuity { expected: expected_lsn, found: frame.lsn };
                    return CheckpointScan::Corrupt { offset, reason };
                }
                match markers.observe(&frame) {
                    Ok(FrameKind::CheckpointEnd { .. }) => return CheckpointScan::Complete,
                    Ok(_) => expected_lsn += 1,
                    Err(reason) => return CheckpointScan::Corrupt { offset, reason },
                }
            }
            Step::End { offset } => {
                return CheckpointScan::Stopped { offset, damage: None, last_good_lsn: expected_lsn - 1 };
            }
            Step::Bad { offset, reason } => {
                return CheckpointScan::Stopped { offset, damage: Some(reason), last_good_lsn: expected_lsn - 1 };
            }
        }
    }
}

fn start_fresh<E>(config: &LogConfig, dir: File, lock: File) -> Result<Recovered, OpenError<E>> {
    let zeros = vec![0u8; crate::writer::ZERO_BLOCK_BYTES];
    let (file, path) = segment::create_segment(&config.dir, &dir, 1, &zeros, config.preallocate_chunk_bytes)
        .map_err(|e| OpenError::io(segment::segment_path(&config.dir, 1), e))?;
    info!(dir = %config.dir.display(), "created a new log");
    let header_end = SEGMENT_HEADER_BYTES as u64;
    let active = ActiveSegment {
        file,
        path,
        first_lsn: 1,
        write_offset_bytes: header_end,
        allocated_bytes: header_end + config.preallocate_chunk_bytes,
    };
    Ok(Recovered { dir, lock, active, older: Vec::new(), next_lsn: 1 })
}

/// `create_dir_all`, and if the log directory is new, sync its parent so the directory entry
/// itself survives a crash (the first segment inside it is synced separately).
fn create_dir<E>(dir: &Path) -> Result<(), OpenError<E>> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::create_dir_all(dir).map_err(|e| OpenError::io(dir, e))?;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        File::open(parent).and_then(|p| segment::sync_dir(&p)).map_err(|e| OpenError::io(parent, e))?;
    }
    Ok(())
}

fn read<E>(path: &Path) -> Result<Vec<u8>, OpenError<E>> {
    fs::read(path).map_err(|e| OpenError::io(path, e))
}

/// Up to `len` bytes from the start of the file (fewer if it is shorter).
fn read_prefix<E>(path: &Path, len: usize) -> Result<Vec<u8>, OpenError<E>> {
    let read = || -> io::Result<Vec<u8>> {
        let file = File::open(path)?;
        let mut buf = vec![0u8; len];
        let mut filled = 0;
        while filled < len {
            match file.read_at(&mut buf[filled..], filled as u64)? {
                0 => break,
                n => filled += n,
            }
        }
        buf.truncate(filled);
        Ok(buf)
    };
    read().map_err(|e| OpenError::io(path, e))
}

fn remove<E>(path: &Path) -> Result<(), OpenError<E>> {
    fs::remove_file(path).map_err(|e| OpenError::io(path, e))
}

/// Cuts a torn tail off and makes the new length durable before anything is appended after it.
fn truncate<E>(path: &Path, len_bytes: u64) -> Result<(), OpenError<E>> {
    let cut = || -> io::Result<()> {
        let file = OpenOptions::new().write(true).open(path)?;
        file.set_len(len_bytes)?;
        file.sync_all()
    };
    cut().map_err(|e| OpenError::io(path, e))
}
