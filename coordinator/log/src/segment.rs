//! Segment files: names, listing, creation, and reading frames out of a segment's bytes.
//! Shared by recovery (which may repair a torn tail) and inspect (which never writes).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::Lsn;
use crate::error::Corruption;
use crate::format::{self, Frame, SEGMENT_HEADER_BYTES, SegmentHeader};

const SEGMENT_SUFFIX: &str = ".seg";
/// A checkpoint segment is written under this suffix and renamed into place once synced.
const TMP_SUFFIX: &str = ".seg.tmp";
/// Digits in a segment file name: u64::MAX has 20, so names sort like their LSNs.
const NAME_DIGITS: usize = 20;

/// A segment file found in the log directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SegmentFile {
    pub first_lsn: Lsn,
    pub path: PathBuf,
}

pub(crate) fn segment_path(dir: &Path, first_lsn: Lsn) -> PathBuf {
    dir.join(format!("{first_lsn:0NAME_DIGITS$}{SEGMENT_SUFFIX}"))
}

pub(crate) fn tmp_segment_path(dir: &Path, first_lsn: Lsn) -> PathBuf {
    dir.join(format!("{first_lsn:0NAME_DIGITS$}{TMP_SUFFIX}"))
}

/// What `list_dir` found.
#[derive(Debug, Default)]
pub(crate) struct DirListing {
    /// Segments, oldest first.
    pub segments: Vec<SegmentFile>,
    /// Unfinished checkpoint files (`*.seg.tmp`).
    pub tmp_files: Vec<PathBuf>,
}

/// Lists segment files. Files with other names are left alone (an operator may keep notes or a
/// lock file there); a name that merely looks like a segment but does not parse is ignored too.
pub(crate) fn list_dir(dir: &Path) -> io::Result<DirListing> {
    let mut listing = DirListing::default();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(stem) = name.strip_suffix(TMP_SUFFIX) {
            if parse_lsn(stem).is_some() {
                listing.tmp_files.push(entry.path());
            }
        } else if let Some(stem) = name.strip_suffix(SEGMENT_SUFFIX)
            && let Some(first_lsn) = parse_lsn(stem)
        {
            listing.segments.push(SegmentFile { first_lsn, path: entry.path() });
        }
    }
    listing.segments.sort_by_key(|s| s.first_lsn);
    Ok(listing)
}

fn parse_lsn(stem: &str) -> Option<Lsn> {
    (stem.len() == NAME_DIGITS && stem.bytes().all(|b| b.is_ascii_digit())).then(|| stem.parse().ok()).flatten()
}

/// Makes a directory's entries (created, renamed, deleted files) durable. On Linux an fsync of
/// a file does not persist its name; without this a crash can lose a whole new segment.
pub(crate) fn sync_dir(dir: &File) -> io::Result<()> {
    dir.sync_all()
}

/// Writes `zeros` repeatedly over `[from, to)`.
pub(crate) fn write_zeros(file: &File, zeros: &[u8], from: u64, to: u64) -> io::Result<()> {
    let mut pos = from;
    while pos < to {
        let n = (to - pos).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}

/// Creates a new, empty segment and makes it durable (file data and directory entry) before
/// anything is written into it: recovery relies on every segment but the last having a valid
/// header. `preallocate_bytes` of zeros follow the header (see `LogConfig`).
pub(crate) fn create_segment(
    dir_path: &Path,
    dir: &File,
    first_lsn: Lsn,
    zeros: &[u8],
    preallocate_bytes: u64,
) -> io::Result<(File, PathBuf)> {
    let path = segment_path(dir_path, first_lsn);
    let file = OpenOptions::new().write(true).create_new(true).open(&path)?;
    let header = format::encode_header(SegmentHeader { first_lsn, begins_with_checkpoint: false });
    file.write_all_at(&header, 0)?;
    let header_end = SEGMENT_HEADER_BYTES as u64;
    write_zeros(&file, zeros, header_end, header_end + preallocate_bytes)?;
    file.sync_data()?;
    sync_dir(dir)?;
    Ok((file, path))
}

/// One step of reading frames from a segment's bytes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step<'a> {
    Frame {
        offset: u64,
        frame: Frame<'a>,
    },
    /// The segment ends cleanly at `offset`: end of file, or only zeros follow (preallocated
    /// space that was never written).
    End {
        offset: u64,
    },
    /// The bytes at `offset` are not a valid frame and not a zero tail.
    Bad {
        offset: u64,
        reason: Corruption,
    },
}

/// Walks the frames of one segment, front to back.
pub(crate) struct FrameCursor<'a> {
    data: &'a [u8],
    offset: usize,
    max_record_bytes: usize,
}

impl<'a> FrameCursor<'a> {
    /// `data` is the whole segment file; reading starts after the header.
    pub(crate) fn new(data: &'a [u8], max_record_bytes: usize) -> Self {
        Self { data, offset: SEGMENT_HEADER_BYTES.min(data.len()), max_record_bytes }
    }

    /// The next step. After `End` or `Bad` the cursor does not move; callers stop there.
    pub(crate) fn step(&mut self) -> Step<'a> {
        let offset = self.offset as u64;
        let rest = &self.data[self.offset..];
        if rest.is_empty() {
            return Step::End { offset };
        }
        match format::decode_frame(rest, self.max_record_bytes) {
            Ok(frame) => {
                self.offset += frame.len_bytes;
                Step::Frame { offset, frame }
            }
            // A frame never starts with a zero length, so zeros here are the unwritten
            // remainder of a preallocated segment, not damage.
            Err(_) if is_all_zero(rest) => Step::End { offset },
            Err(e) => Step::Bad { offset, reason: e.into() },
        }
    }
}

fn is_all_zero(bytes: &[u8]) -> bool {
    bytes.iter().all(|&b| b == 0)
}

/// Limits that decide whether damage at the end of the log can be a torn write.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TailLimits {
    pub max_batch_bytes: usize,
    pub max_record_bytes: usize,
}

/// Decides whether the damage found at `bad_offset` in the LAST segment is a torn tail (the
/// unsynced end of the final batch, never acknowledged, safe to cut off) or corruption.
///
/// It is a torn tail only if nothing valid follows it:
/// - the non-zero bytes from `bad_offset` on are shorter than one batch plus one frame: the
///   writer never has more than one batch unsynced, and the batch stops growing once it reaches
///   `max_batch_bytes` (so it exceeds it by less than one frame). Trailing zeros do not count:
///   they are preallocated space that was never written;
/// - no byte offset after it starts a CRC-valid frame with an LSN above `last_good_lsn`. Such a
///   frame would be a record written after the damaged one, i.e. the damage hit data that had
///   been written before, possibly acknowledged. (A crash that persisted a batch's later pages
///   but not its earlier ones also lands here: we refuse rather than guess.)
///
/// Returns `Ok(())` for a torn tail; otherwise the corruption to report at `bad_offset`.
pub(crate) fn classify_damage(
    data: &[u8],
    bad_offset: u64,
    cause: Corruption,
    last_good_lsn: Lsn,
    limits: TailLimits,
) -> Result<(), Corruption> {
    let rest = &data[bad_offset as usize..];
    let nonzero_bytes = rest.iter().rposition(|&b| b != 0).map_or(0, |last| last + 1);
    let limit_bytes = limits.max_batch_bytes + format::max_frame_bytes(limits.max_record_bytes);
    if nonzero_bytes >= limit_bytes {
        return Err(Corruption::TooMuchAfterDamage {
            cause: Box::new(cause),
            nonzero_bytes: nonzero_bytes as u64,
            limit_bytes: limit_bytes as u64,
        });
    }
    // Offset 0 is the damaged frame itself. A frame that starts in the zero tail cannot be
    // valid (its length would be 0), so stopping at the last non-zero byte loses nothing.
    for start in 1..nonzero_bytes {
        if let Some(frame) = format::decode_frame_above(&rest[start..], limits.max_record_bytes, last_good_lsn) {
            return Err(Corruption::ValidRecordFollows {
                cause: Box::new(cause),
                lsn: frame.lsn,
                offset: bad_offset + start as u64,
            });
        }
    }
    Ok(())
}

/// How long `lock_dir` keeps trying before it reports the directory as locked.
const LOCK_WAIT_MS: u64 = 1000;
const LOCK_RETRY_INTERVAL_MS: u64 = 10;

/// Takes an exclusive advisory lock on `dir/LOCK` so two processes never append to one log
/// (their LSNs and writes would interleave into garbage). The lock lives as long as the
/// returned file: the writer thread owns it. `Ok(None)`: someone else holds it.
///
/// A lock that is still held is retried for up to `LOCK_WAIT_MS`. flock belongs to the open
/// file description, and a child process forked by any thread of this process shares our
/// descriptors until its exec closes them; so right after a log is shut down, a reopen can
/// find the lock held for a moment by such a child. (Seen in this crate's own tests, which
/// spawn a child while other tests reopen logs.)
pub(crate) fn lock_dir(dir: &Path) -> io::Result<Option<File>> {
    use std::os::fd::AsRawFd;
    let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(dir.join("LOCK"))?;
    let mut waited_ms = 0;
    loop {
        // SAFETY: flock only reads the descriptor number; `file` keeps it open for the call.
        // (`File::try_lock` would do, but needs Rust 1.89 and the workspace supports 1.88.)
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(Some(file));
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) if waited_ms < LOCK_WAIT_MS => {
                std::thread::sleep(std::time::Duration::from_millis(LOCK_RETRY_INTERVAL_MS));
                waited_ms += LOCK_RETRY_INTERVAL_MS;
            }
            Some(libc::EWOULDBLOCK) => return Ok(None),
            _ => return Err(err),
        }
    }
}

/// What a valid frame turned out to be, once reserved types are interpreted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FrameKind {
    /// An ordinary record, for the replay callback.
    Record,
    CheckpointBegin {
        record_count: u64,
    },
    CheckpointEnd {
        begin_lsn: Lsn,
        record_count: u64,
    },
}

/// Checks that checkpoint markers sit where the writer puts them: a checkpoint segment starts
/// with `CheckpointBegin`, holds exactly the announced number of records, then `CheckpointEnd`
/// naming that begin; markers appear nowhere else. One tracker per segment.
pub(crate) struct MarkerTracker {
    begins_with_checkpoint: bool,
    seen_first_frame: bool,
    /// (begin LSN, announced count, records seen) while inside a checkpoint.
    open: Option<(Lsn, u64, u64)>,
}

impl MarkerTracker {
    pub(crate) fn new(header: SegmentHeader) -> Self {
        Self { begins_with_checkpoint: header.begins_with_checkpoint, seen_first_frame: false, open: None }
    }

    pub(crate) fn observe(&mut self, frame: &Frame<'_>) -> Result<FrameKind, Corruption> {
        let first = !self.seen_first_frame;
        self.seen_first_frame = true;
        if first && self.begins_with_checkpoint && frame.rtype != format::TYPE_CHECKPOINT_BEGIN {
            return Err(Corruption::BadCheckpointMarker("checkpoint segment does not start with a begin marker"));
        }
        match frame.rtype {
            format::TYPE_CHECKPOINT_BEGIN => {
                if !(first && self.begins_with_checkpoint) {
                    return Err(Corruption::BadCheckpointMarker(
                        "begin marker outside the start of a checkpoint segment",
                    ));
                }
                let record_count = format::decode_checkpoint_begin(frame.payload)
                    .ok_or(Corruption::BadCheckpointMarker("malformed begin marker payload"))?;
                self.open = Some((frame.lsn, record_count, 0));
                Ok(FrameKind::CheckpointBegin { record_count })
            }
            format::TYPE_CHECKPOINT_END => {
                let (begin_lsn, record_count) = format::decode_checkpoint_end(frame.payload)
                    .ok_or(Corruption::BadCheckpointMarker("malformed end marker payload"))?;
                match self.open.take() {
                    Some((open_lsn, announced, seen))
                        if open_lsn == begin_lsn && announced == record_count && seen == record_count =>
                    {
                        Ok(FrameKind::CheckpointEnd { begin_lsn, record_count })
                    }
                    Some(_) => Err(Corruption::BadCheckpointMarker("end marker does not match its begin marker")),
                    None => Err(Corruption::BadCheckpointMarker("end marker without a begin marker")),
                }
            }
            t if t >= format::FIRST_RESERVED_TYPE => Err(Corruption::UnknownReservedType(t)),
            _ => {
                if let Some((_, _, seen)) = &mut self.open {
                    *seen += 1;
                }
                Ok(FrameKind::Record)
            }
        }
    }

    /// True while a checkpoint has begun but not ended.
    pub(crate) fn inside_checkpoint(&self) -> bool {
        self.open.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: TailLimits = TailLimits { max_batch_bytes: 256, max_record_bytes: 64 };

    fn segment_with(frames: &[(u8, Lsn, &[u8])]) -> Vec<u8> {
        let mut data = format::encode_header(SegmentHeader { first_lsn: 1, begins_with_checkpoint: false }).to_vec();
        for (rtype, lsn, payload) in frames {
            format::encode_frame(&mut data, *rtype, *lsn, payload);
        }
        data
    }

    #[test]
    fn names_sort_like_lsns() {
        let dir = Path::new("/x");
        assert_eq!(segment_path(dir, 1), Path::new("/x/00000000000000000001.seg"));
        assert_eq!(parse_lsn("00000000000000000001"), Some(1));
        assert_eq!(parse_lsn(&format!("{}", u64::MAX)), Some(u64::MAX));
        assert_eq!(parse_lsn("0000000000000000001"), None);
        assert_eq!(parse_lsn("0000000000000000000a"), None);
        assert_eq!(parse_lsn("99999999999999999999"), None, "overflows u64");
    }

    #[test]
    fn cursor_reads_frames_then_stops_at_zero_tail() {
        let mut data = segment_with(&[(1, 1, b"a"), (1, 2, b"bb")]);
        let end = data.len() as u64;
        data.resize(data.len() + 100, 0);
        let mut cursor = FrameCursor::new(&data, 64);
        assert!(matches!(cursor.step(), Step::Frame { offset: 24, frame } if frame.lsn == 1));
        assert!(matches!(cursor.step(), Step::Frame { frame, .. } if frame.lsn == 2 && frame.payload == b"bb"));
        assert_eq!(cursor.step(), Step::End { offset: end });
        assert_eq!(cursor.step(), Step::End { offset: end }, "cursor stays put");
    }

    #[test]
    fn cursor_reports_bad_frame_at_its_offset() {
        let mut data = segment_with(&[(1, 1, b"a"), (1, 2, b"bb")]);
        let second = 24 + 18;
        data[second + 14] ^= 0xFF;
        let mut cursor = FrameCursor::new(&data, 64);
        cursor.step();
        assert_eq!(cursor.step(), Step::Bad { offset: second as u64, reason: Corruption::CrcMismatch });
    }

    #[test]
    fn torn_tail_is_accepted_but_not_when_a_later_record_is_valid() {
        let data = segment_with(&[(1, 1, b"one"), (1, 2, b"two"), (1, 3, b"three")]);
        let second = 24 + 20;
        let third = second + 20;
        // The third frame cut short: torn.
        let cut = &data[..data.len() - 3];
        let cause = Corruption::Truncated { frame_bytes: 22, available_bytes: 19 };
        assert_eq!(classify_damage(cut, third as u64, cause, 2, LIMITS), Ok(()));
        // The second frame damaged but the third intact: not torn, and the reason names LSN 3.
        let mut damaged = data.clone();
        damaged[second + 14] ^= 1;
        let err = classify_damage(&damaged, second as u64, Corruption::CrcMismatch, 1, LIMITS).unwrap_err();
        assert!(
            matches!(err, Corruption::ValidRecordFollows { lsn: 3, offset, .. } if offset == second as u64 + 20),
            "{err:?}"
        );
        // A valid frame whose LSN is not above the last good one proves nothing.
        assert_eq!(classify_damage(&damaged, second as u64, Corruption::CrcMismatch, 3, LIMITS), Ok(()));
    }

    #[test]
    fn damage_followed_by_more_than_a_batch_is_corruption() {
        let mut data = segment_with(&[(1, 1, b"one")]);
        let bad = data.len() as u64;
        let limit = LIMITS.max_batch_bytes + format::max_frame_bytes(LIMITS.max_record_bytes);
        data.extend(std::iter::repeat_n(0xEEu8, limit - 1));
        assert_eq!(classify_damage(&data, bad, Corruption::CrcMismatch, 1, LIMITS), Ok(()));
        data.push(0xEE);
        assert!(matches!(
            classify_damage(&data, bad, Corruption::CrcMismatch, 1, LIMITS),
            Err(Corruption::TooMuchAfterDamage { .. })
        ));
        // Trailing zeros (preallocated space) do not count toward the limit.
        data.pop();
        data.extend(std::iter::repeat_n(0u8, 10 * limit));
        assert_eq!(classify_damage(&data, bad, Corruption::CrcMismatch, 1, LIMITS), Ok(()));
    }
}
