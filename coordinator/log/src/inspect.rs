//! Read-only walk over a log directory for operators (`pledge log inspect`). Never writes,
//! never truncates, never takes the directory lock, so it can run next to a live log (it then
//! sees whatever has reached the page cache).

use std::collections::VecDeque;
use std::fmt;
use std::fs;
use std::io;
use std::path::PathBuf;

use crate::Lsn;
use crate::config::LogConfig;
use crate::error::Corruption;
use crate::format;
use crate::segment::{self, FrameCursor, FrameKind, MarkerTracker, Step, TailLimits};

/// One ordinary record found by [`inspect`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InspectedRecord {
    pub path: PathBuf,
    /// Byte offset of the frame in its segment file.
    pub offset: u64,
    pub lsn: Lsn,
    pub rtype: u8,
    pub payload: Vec<u8>,
}

/// What [`inspect`] reports, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InspectItem {
    /// A segment file starts.
    Segment {
        path: PathBuf,
        first_lsn: Lsn,
        begins_with_checkpoint: bool,
        len_bytes: u64,
    },
    Record(InspectedRecord),
    CheckpointBegin {
        path: PathBuf,
        offset: u64,
        lsn: Lsn,
        record_count: u64,
    },
    CheckpointEnd {
        path: PathBuf,
        offset: u64,
        lsn: Lsn,
        begin_lsn: Lsn,
        record_count: u64,
    },
    /// The segment's data ends cleanly at `offset`; `zero_tail_bytes` of preallocated, unwritten
    /// space follow it.
    SegmentEnd {
        path: PathBuf,
        offset: u64,
        zero_tail_bytes: u64,
    },
    /// Damage at the end of the log that `open` would cut off (`dropped_bytes` from `offset`).
    TornTail {
        path: PathBuf,
        offset: u64,
        dropped_bytes: u64,
        reason: Corruption,
    },
    /// A checkpoint without its end marker. At the end of the log `open` deletes the segment
    /// and replays from the previous checkpoint; anywhere else it refuses to start.
    IncompleteCheckpoint {
        path: PathBuf,
        offset: u64,
    },
    /// Damage `open` would refuse to start on. The rest of this segment is skipped.
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: Corruption,
    },
    /// A segment that is unusable as a whole, or does not continue its predecessor.
    CorruptSegment {
        path: PathBuf,
        reason: Corruption,
    },
    /// An unfinished checkpoint file from a crash; `open` deletes it.
    UnfinishedCheckpointFile {
        path: PathBuf,
    },
}

impl fmt::Display for InspectItem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Segment { path, first_lsn, begins_with_checkpoint, len_bytes } => write!(
                f,
                "segment {} first_lsn={first_lsn} len={len_bytes}{}",
                path.display(),
                if *begins_with_checkpoint { " (begins with checkpoint)" } else { "" }
            ),
            Self::Record(r) => {
                write!(f, "  @{:<10} lsn={} type={:#04x} len={}", r.offset, r.lsn, r.rtype, r.payload.len())
            }
            Self::CheckpointBegin { offset, lsn, record_count, .. } => {
                write!(f, "  @{offset:<10} lsn={lsn} CHECKPOINT BEGIN records={record_count}")
            }
            Self::CheckpointEnd { offset, lsn, begin_lsn, record_count, .. } => {
                write!(f, "  @{offset:<10} lsn={lsn} CHECKPOINT END begin_lsn={begin_lsn} records={record_count}")
            }
            Self::SegmentEnd { offset, zero_tail_bytes, .. } => {
                write!(f, "  @{offset:<10} end of data ({zero_tail_bytes} preallocated bytes follow)")
            }
            Self::TornTail { path, offset, dropped_bytes, reason } => write!(
                f,
                "  @{offset:<10} TORN TAIL in {}: {reason}; open would drop {dropped_bytes} bytes",
                path.display()
            ),
            Self::IncompleteCheckpoint { path, offset } => {
                write!(f, "  @{offset:<10} INCOMPLETE CHECKPOINT in {}", path.display())
            }
            Self::Corrupt { path, offset, reason } => {
                write!(f, "  @{offset:<10} CORRUPT record in {} at offset {offset}: {reason}", path.display())
            }
            Self::CorruptSegment { path, reason } => write!(f, "CORRUPT segment {}: {reason}", path.display()),
            Self::UnfinishedCheckpointFile { path } => {
                write!(f, "unfinished checkpoint file {} (open deletes it)", path.display())
            }
        }
    }
}

/// An I/O error while inspecting.
#[derive(Debug, thiserror::Error)]
#[error("I/O error on {}: {source}", path.display())]
pub struct InspectError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// Walks every segment in `config.dir` (including ones a checkpoint has superseded but a crash
/// left behind) and reports records, checkpoint markers, and damage, classified the way `open`
/// would treat it. The config supplies the bounds that decide what is a torn tail. Reads one
/// segment at a time.
pub fn inspect(config: &LogConfig) -> Inspect {
    let mut inspect = Inspect {
        segments: VecDeque::new(),
        pending: VecDeque::new(),
        limits: TailLimits { max_batch_bytes: config.max_batch_bytes, max_record_bytes: config.max_record_bytes },
        expected_lsn: None,
        first_segment: true,
    };
    match segment::list_dir(&config.dir) {
        Ok(listing) => {
            inspect
                .pending
                .extend(listing.tmp_files.into_iter().map(|path| Ok(InspectItem::UnfinishedCheckpointFile { path })));
            inspect.segments = listing.segments.into_iter().map(|s| s.path).collect();
        }
        Err(source) => inspect.pending.push_back(Err(InspectError { path: config.dir.clone(), source })),
    }
    inspect
}

/// Iterator returned by [`inspect`].
pub struct Inspect {
    segments: VecDeque<PathBuf>,
    pending: VecDeque<Result<InspectItem, InspectError>>,
    limits: TailLimits,
    /// LSN the next segment should start with, once one has been read.
    expected_lsn: Option<Lsn>,
    first_segment: bool,
}

impl Iterator for Inspect {
    type Item = Result<InspectItem, InspectError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some(item);
            }
            let path = self.segments.pop_front()?;
            let is_last = self.segments.is_empty();
            match fs::read(&path) {
                Ok(data) => self.inspect_segment(path, &data, is_last),
                Err(source) => self.pending.push_back(Err(InspectError { path, source })),
            }
        }
    }
}

impl Inspect {
    fn inspect_segment(&mut self, path: PathBuf, data: &[u8], is_last: bool) {
        let first_segment = std::mem::replace(&mut self.first_segment, false);
        let header = match format::decode_header(data) {
            Ok(header) => header,
            Err(e) => {
                let reason = Corruption::BadHeader(e);
                let torn = is_last
                    && e.maybe_torn()
                    && segment::classify_damage(data, 0, reason.clone(), 0, self.limits).is_ok();
                self.push(if torn {
                    InspectItem::TornTail { path, offset: 0, dropped_bytes: data.len() as u64, reason }
                } else {
                    InspectItem::CorruptSegment { path, reason }
                });
                self.expected_lsn = None;
                return;
            }
        };
        self.push(InspectItem::Segment {
            path: path.clone(),
            first_lsn: header.first_lsn,
            begins_with_checkpoint: header.begins_with_checkpoint,
            len_bytes: data.len() as u64,
        });
        match self.expected_lsn {
            Some(expected) if expected != header.first_lsn => {
                let reason = Corruption::LsnDiscontinuity { expected, found: header.first_lsn };
                self.push(InspectItem::CorruptSegment { path: path.clone(), reason });
            }
            None if first_segment && !header.begins_with_checkpoint && header.first_lsn != 1 => {
                let reason = Corruption::MissingHistory { first_lsn: header.first_lsn };
                self.push(InspectItem::CorruptSegment { path: path.clone(), reason });
            }
            _ => {}
        }
        let mut expected = header.first_lsn;
        self.expected_lsn = None;
        let mut markers = MarkerTracker::new(header);
        let mut cursor = FrameCursor::new(data, self.limits.max_record_bytes);
        loop {
            match cursor.step() {
                Step::Frame { offset, frame } => {
                    if frame.lsn != expected {
                        let reason = Corruption::LsnDiscontinuity { expected, found: frame.lsn };
                        return self.push(InspectItem::Corrupt { path, offset, reason });
                    }
                    let path = path.clone();
                    let item = match markers.observe(&frame) {
                        Ok(FrameKind::Record) => InspectItem::Record(InspectedRecord {
                            path,
                            offset,
                            lsn: frame.lsn,
                            rtype: frame.rtype,
                            payload: frame.payload.to_vec(),
                        }),
                        Ok(FrameKind::CheckpointBegin { record_count }) => {
                            InspectItem::CheckpointBegin { path, offset, lsn: frame.lsn, record_count }
                        }
                        Ok(FrameKind::CheckpointEnd { begin_lsn, record_count }) => {
                            InspectItem::CheckpointEnd { path, offset, lsn: frame.lsn, begin_lsn, record_count }
                        }
                        Err(reason) => return self.push(InspectItem::Corrupt { path, offset, reason }),
                    };
                    self.push(item);
                    expected += 1;
                }
                Step::End { offset } => {
                    if markers.inside_checkpoint() {
                        self.push(InspectItem::IncompleteCheckpoint { path: path.clone(), offset });
                    }
                    let zero_tail_bytes = data.len() as u64 - offset;
                    self.expected_lsn = Some(expected);
                    return self.push(InspectItem::SegmentEnd { path, offset, zero_tail_bytes });
                }
                Step::Bad { offset, reason } => {
                    let verdict = if is_last {
                        segment::classify_damage(data, offset, reason.clone(), expected - 1, self.limits)
                    } else {
                        Err(reason.clone())
                    };
                    let dropped_bytes = data.len() as u64 - offset;
                    if markers.inside_checkpoint() && verdict.is_ok() {
                        self.push(InspectItem::IncompleteCheckpoint { path: path.clone(), offset });
                    }
                    return self.push(match verdict {
                        Ok(()) => InspectItem::TornTail { path, offset, dropped_bytes, reason },
                        Err(reason) => InspectItem::Corrupt { path, offset, reason },
                    });
                }
            }
        }
    }

    fn push(&mut self, item: InspectItem) {
        self.pending.push_back(Ok(item));
    }
}
