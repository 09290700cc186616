//! Read-only walk over a log directory for operators (`pledge log inspect`). Never writes,
//! never truncates, never takes the directory lock, so it can run next to a live log (it then
//! sees whatever has reached the page cache). Reads one batch at a time.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::path::PathBuf;

use crate::Lsn;
use crate::config::LogConfig;
use crate::error::Corruption;
use crate::format;
use crate::reader::{self, BatchReader, Limits, Step};
use crate::segment::{self, LogFile};

/// One ordinary record found by [`inspect`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InspectedRecord {
    pub path: PathBuf,
    /// Byte offset of the frame in its file.
    pub offset: u64,
    /// 0 for a checkpoint's records (they stand for the state below the checkpoint's LSN).
    pub lsn: Lsn,
    pub rtype: u8,
    pub payload: Vec<u8>,
}

/// What [`inspect`] reports, in order: checkpoint files, then segments, each front to back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InspectItem {
    /// A file starts: a segment, or a checkpoint (`checkpoint_file`; `first_lsn` is then the LSN
    /// the segments continue it from).
    Segment {
        path: PathBuf,
        first_lsn: Lsn,
        checkpoint_file: bool,
        len_bytes: u64,
    },
    /// A batch (one group commit): `records` frames follow (0: a synced-through mark), and
    /// every record up to `synced_through` was durable before it was written.
    Batch {
        path: PathBuf,
        offset: u64,
        first_lsn: Lsn,
        records: u64,
        synced_through: Lsn,
    },
    Record(InspectedRecord),
    /// The end marker of a checkpoint file.
    CheckpointEnd {
        path: PathBuf,
        offset: u64,
        record_count: u64,
    },
    /// The file's data ends cleanly at `offset`; `zero_tail_bytes` of preallocated, unwritten
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
    /// A checkpoint file without its end marker: `open` refuses to start.
    IncompleteCheckpoint {
        path: PathBuf,
        offset: u64,
    },
    /// Damage `open` would refuse to start on. The rest of this file is skipped.
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: Corruption,
    },
    /// A file that is unusable as a whole, or does not continue its predecessor.
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
            Self::Segment { path, first_lsn, checkpoint_file, len_bytes } => {
                if *checkpoint_file {
                    write!(f, "checkpoint {} continues at lsn={first_lsn} len={len_bytes}", path.display())
                } else {
                    write!(f, "segment {} first_lsn={first_lsn} len={len_bytes}", path.display())
                }
            }
            Self::Batch { offset, first_lsn, records: 0, synced_through, .. } => {
                write!(f, "  @{offset:<10} MARK next_lsn={first_lsn} synced_through={synced_through}")
            }
            Self::Batch { offset, first_lsn, records, synced_through, .. } => write!(
                f,
                "  @{offset:<10} BATCH lsn={first_lsn}..={} synced_through={synced_through}",
                first_lsn + records - 1
            ),
            Self::Record(r) => {
                write!(f, "  @{:<10} lsn={} type={:#04x} len={}", r.offset, r.lsn, r.rtype, r.payload.len())
            }
            Self::CheckpointEnd { offset, record_count, .. } => {
                write!(f, "  @{offset:<10} CHECKPOINT END records={record_count}")
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
                write!(f, "  @{offset:<10} CORRUPT data in {} at offset {offset}: {reason}", path.display())
            }
            Self::CorruptSegment { path, reason } => write!(f, "CORRUPT file {}: {reason}", path.display()),
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

/// Walks every file in `config.dir` (including ones a checkpoint has superseded but a crash
/// left behind) and reports batches, records, checkpoint markers and damage, classified the
/// way `open` would treat it. The config supplies the bounds that decide what is a torn tail.
pub fn inspect(config: &LogConfig) -> Inspect {
    let mut inspect = Inspect {
        files: VecDeque::new(),
        pending: VecDeque::new(),
        limits: Limits { max_batch_bytes: config.max_batch_bytes, max_record_bytes: config.max_record_bytes },
        expected_lsn: None,
        newest_checkpoint: None,
    };
    match segment::list_dir(&config.dir) {
        Ok(listing) => {
            inspect
                .pending
                .extend(listing.tmp_files.into_iter().map(|path| Ok(InspectItem::UnfinishedCheckpointFile { path })));
            inspect.newest_checkpoint = listing.checkpoints.last().map(|c| c.lsn);
            let segments = listing.segments.len();
            inspect.files = listing.checkpoints.into_iter().map(|c| (c, true, false)).collect();
            inspect.files.extend(listing.segments.into_iter().enumerate().map(|(i, s)| (s, false, i + 1 == segments)));
        }
        Err(source) => inspect.pending.push_back(Err(InspectError { path: config.dir.clone(), source })),
    }
    inspect
}

/// Iterator returned by [`inspect`].
pub struct Inspect {
    /// (file, is a checkpoint, is the last segment)
    files: VecDeque<(LogFile, bool, bool)>,
    pending: VecDeque<Result<InspectItem, InspectError>>,
    limits: Limits,
    /// LSN the next segment should start with, once one has been read.
    expected_lsn: Option<Lsn>,
    newest_checkpoint: Option<Lsn>,
}

impl Iterator for Inspect {
    type Item = Result<InspectItem, InspectError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some(item);
            }
            let (file, checkpoint, last) = self.files.pop_front()?;
            if let Err(source) = self.inspect_file(&file, checkpoint, last) {
                self.pending.push_back(Err(InspectError { path: file.path, source }));
            }
        }
    }
}

impl Inspect {
    fn inspect_file(&mut self, file: &LogFile, checkpoint: bool, last: bool) -> io::Result<()> {
        let path = file.path.clone();
        let (mut reader, header) = BatchReader::open(&path, self.limits)?;
        let header = match header {
            Ok(header) => header,
            Err(reason) => {
                let torn = last
                    && matches!(reason, Corruption::BadHeader(e) if e.maybe_torn())
                    && reader::classify_damage(reader.file(), reader.len(), 0, reason.clone(), None, 0, self.limits)?
                        .is_ok();
                self.push(if torn {
                    InspectItem::TornTail { path, offset: 0, dropped_bytes: reader.len(), reason }
                } else {
                    InspectItem::CorruptSegment { path, reason }
                });
                self.expected_lsn = None;
                return Ok(());
            }
        };
        self.push(InspectItem::Segment {
            path: path.clone(),
            first_lsn: header.first_lsn,
            checkpoint_file: header.checkpoint_file,
            len_bytes: reader.len(),
        });
        if header.checkpoint_file != checkpoint {
            let reason = Corruption::BadCheckpointMarker("file name and header disagree on the kind of file");
            self.push(InspectItem::CorruptSegment { path: path.clone(), reason });
        }
        if !checkpoint {
            let reason = match self.expected_lsn.or(self.newest_checkpoint) {
                Some(expected) if expected != header.first_lsn => {
                    Some(Corruption::LsnDiscontinuity { expected, found: header.first_lsn })
                }
                None if header.first_lsn != 1 => Some(Corruption::MissingHistory { first_lsn: header.first_lsn }),
                _ => None,
            };
            if let Some(reason) = reason {
                self.push(InspectItem::CorruptSegment { path: path.clone(), reason });
            }
        }
        let mut expected = if checkpoint { 1 } else { header.first_lsn };
        let mut ended = false;
        self.expected_lsn = None;
        loop {
            match reader.step()? {
                Step::Batch { offset, header: batch, frames } => {
                    self.push(InspectItem::Batch {
                        path: path.clone(),
                        offset,
                        first_lsn: batch.first_lsn,
                        records: frames.len() as u64,
                        synced_through: batch.synced_through,
                    });
                    if batch.first_lsn != expected {
                        let reason = Corruption::LsnDiscontinuity { expected, found: batch.first_lsn };
                        self.push(InspectItem::Corrupt { path, offset, reason });
                        return Ok(());
                    }
                    for f in frames {
                        expected += 1;
                        if checkpoint && f.rtype == format::TYPE_CHECKPOINT_END {
                            let record_count = format::decode_checkpoint_end(&f.payload).unwrap_or(u64::MAX);
                            ended = true;
                            self.push(InspectItem::CheckpointEnd {
                                path: path.clone(),
                                offset: f.offset,
                                record_count,
                            });
                            continue;
                        }
                        self.push(InspectItem::Record(InspectedRecord {
                            path: path.clone(),
                            offset: f.offset,
                            lsn: if checkpoint { 0 } else { f.lsn },
                            rtype: f.rtype,
                            payload: f.payload,
                        }));
                    }
                }
                Step::End { offset } => {
                    if checkpoint && !ended {
                        self.push(InspectItem::IncompleteCheckpoint { path: path.clone(), offset });
                    }
                    if !checkpoint {
                        self.expected_lsn = Some(expected);
                    }
                    let zero_tail_bytes = reader.len() - offset;
                    self.push(InspectItem::SegmentEnd { path, offset, zero_tail_bytes });
                    return Ok(());
                }
                Step::Bad { offset, reason, extent, maybe_torn } => {
                    let verdict = if last && maybe_torn {
                        let file = reader.file();
                        reader::classify_damage(
                            file,
                            reader.len(),
                            offset,
                            reason.clone(),
                            extent,
                            expected - 1,
                            self.limits,
                        )?
                    } else {
                        Err(reason.clone())
                    };
                    let dropped_bytes = reader.len() - offset;
                    self.push(match verdict {
                        Ok(()) => InspectItem::TornTail { path, offset, dropped_bytes, reason },
                        Err(reason) => InspectItem::Corrupt { path, offset, reason },
                    });
                    return Ok(());
                }
            }
        }
    }

    fn push(&mut self, item: InspectItem) {
        self.pending.push_back(Ok(item));
    }
}
