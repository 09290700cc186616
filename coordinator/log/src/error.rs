use std::fmt;
use std::io;
use std::path::PathBuf;

use crate::Lsn;
use crate::format::{BatchHeaderError, FrameError, HeaderError};

/// Errors of a running log's API. I/O failures are absent on purpose: a failed write or sync
/// aborts the process (see the crate docs), so a caller never has to guess what reached the disk.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum LogError {
    /// The log was shut down, or its writer thread is gone.
    #[error("the log is closed")]
    Closed,
    /// The payload is larger than `LogConfig::max_record_bytes`.
    #[error("record of {payload_bytes} bytes exceeds max_record_bytes ({max_record_bytes})")]
    RecordTooLarge { payload_bytes: usize, max_record_bytes: usize },
    /// Types `0xF0..=0xFF` belong to the log itself (checkpoint markers).
    #[error("record type {0:#04x} is reserved for the log (0xf0..=0xff)")]
    ReservedType(u8),
    /// The writer thread panicked (a bug); records it had not synced are not durable.
    #[error("the log writer thread panicked")]
    WriterPanicked,
}

/// Why [`open`](crate::open) refused a log directory. `E` is the replay callback's error.
#[derive(Debug, thiserror::Error)]
pub enum OpenError<E> {
    /// A batch or record is damaged somewhere other than a torn tail. Nothing is repaired
    /// automatically: the operator decides (see `inspect`).
    #[error("corrupt record in {} at offset {offset}: {reason}", path.display())]
    Corrupt { path: PathBuf, offset: u64, reason: Corruption },
    /// A segment as a whole is unusable or does not fit its neighbours.
    #[error("corrupt segment {}: {reason}", path.display())]
    CorruptSegment { path: PathBuf, reason: Corruption },
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Another process (or another `Log` in this one) has the directory open.
    #[error("log directory {} is locked by another process", dir.display())]
    Locked { dir: PathBuf },
    #[error("invalid log configuration: {0}")]
    InvalidConfig(String),
    /// The replay callback returned an error; the log was not opened.
    #[error("replay callback failed at LSN {lsn}: {source}")]
    Replay {
        lsn: Lsn,
        #[source]
        source: E,
    },
}

impl<E> OpenError<E> {
    pub(crate) fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }
}

/// What exactly is wrong, for [`OpenError`] and [`InspectItem`](crate::InspectItem).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Corruption {
    CrcMismatch,
    /// The length field is 0..=8 or larger than `max_record_bytes + 9`.
    InvalidLength(u32),
    /// The frame runs past the end of a segment that is not the last one.
    Truncated {
        frame_bytes: usize,
        available_bytes: usize,
    },
    /// Frames must carry consecutive LSNs, within and across segments.
    LsnDiscontinuity {
        expected: Lsn,
        found: Lsn,
    },
    /// A reserved type this version does not know.
    UnknownReservedType(u8),
    /// A checkpoint marker where none may be, or with a malformed payload.
    BadCheckpointMarker(&'static str),
    /// A checkpoint file without its end marker. Checkpoints are renamed into place only once
    /// synced whole, so this is damage, not an interrupted write.
    IncompleteCheckpoint,
    /// The bytes at a batch boundary are not a batch header.
    BadBatchHeader(BatchHeaderError),
    /// A batch's body does not match its checksum.
    BatchCrcMismatch,
    /// A batch whose checksum holds but whose contents the writer cannot have produced.
    BadBatchContents(&'static str),
    BadHeader(HeaderError),
    /// The header's first LSN does not match the file name.
    NameMismatch {
        name_lsn: Lsn,
        header_lsn: Lsn,
    },
    /// The oldest segment does not start at LSN 1 and no checkpoint precedes it: segments
    /// are missing.
    MissingHistory {
        first_lsn: Lsn,
    },
    /// Damage at the end of the last segment that cannot be a torn write: a batch written
    /// after it (or the synced-through mark written once it was synced) follows, so the damaged
    /// records were synced and may have been acknowledged.
    SyncedBatchFollows {
        cause: Box<Corruption>,
        lsn: Lsn,
        offset: u64,
    },
    /// Damage at the end of the last segment that cannot be a torn write, because more data
    /// follows it than one batch can hold.
    TooMuchAfterDamage {
        cause: Box<Corruption>,
        nonzero_bytes: u64,
        limit_bytes: u64,
    },
}

impl From<FrameError> for Corruption {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::InvalidLength(length) => Self::InvalidLength(length),
            FrameError::Truncated { frame_bytes, available_bytes } => Self::Truncated { frame_bytes, available_bytes },
            FrameError::CrcMismatch => Self::CrcMismatch,
        }
    }
}

impl fmt::Display for Corruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::CrcMismatch => f.write_str("crc mismatch"),
            Self::InvalidLength(length) => write!(f, "invalid frame length {length}"),
            Self::Truncated { frame_bytes, available_bytes } => write!(
                f,
                "frame of {frame_bytes} bytes runs past the end of the segment ({available_bytes} bytes left)"
            ),
            Self::LsnDiscontinuity { expected, found } => write!(f, "expected LSN {expected}, found {found}"),
            Self::UnknownReservedType(t) => write!(f, "unknown reserved record type {t:#04x}"),
            Self::BadCheckpointMarker(what) => write!(f, "bad checkpoint marker: {what}"),
            Self::IncompleteCheckpoint => f.write_str("checkpoint file without its end marker"),
            Self::BadBatchHeader(e) => write!(f, "bad batch header: {e}"),
            Self::BatchCrcMismatch => f.write_str("batch crc mismatch"),
            Self::BadBatchContents(what) => write!(f, "bad batch contents: {what}"),
            Self::BadHeader(e) => write!(f, "bad segment header: {e}"),
            Self::NameMismatch { name_lsn, header_lsn } => {
                write!(f, "file name says first LSN {name_lsn}, header says {header_lsn}")
            }
            Self::MissingHistory { first_lsn } => {
                write!(f, "the log starts at LSN {first_lsn} without a checkpoint: older segments are missing")
            }
            Self::SyncedBatchFollows { cause, lsn, offset } => write!(
                f,
                "{cause}; a batch written after it was synced (first LSN {lsn}) follows at offset {offset}, so the \
                 damaged records were durable and may have been acknowledged: not a torn tail"
            ),
            Self::TooMuchAfterDamage { cause, nonzero_bytes, limit_bytes } => write!(
                f,
                "{cause}; {nonzero_bytes} bytes of data follow, more than one batch ({limit_bytes}), \
                 so this is not a torn tail"
            ),
        }
    }
}
