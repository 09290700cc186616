//! Reading a log file batch by batch, with memory bounded by one batch (or a 1 MiB read-ahead,
//! whichever is larger), and the rule that tells
//! a torn tail (safe to cut off) from damage to something that may have been acknowledged.
//! Shared by recovery (which may repair a torn tail) and inspect (which never writes).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::Lsn;
use crate::error::Corruption;
use crate::format::{self, BATCH_HEADER_BYTES, BatchHeader, SEGMENT_HEADER_BYTES, SegmentHeader};

/// Bytes read at a time when checking that the rest of a file is zeros.
const ZERO_CHECK_CHUNK_BYTES: usize = 64 * 1024;
/// Bytes a reader fetches at a time: replaying a log of many small batches then costs a read
/// per this many bytes, not two per batch.
const READ_AHEAD_BYTES: usize = 1 << 20;

/// The bounds that decide what a batch may look like and how much a crash can tear.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub max_batch_bytes: usize,
    pub max_record_bytes: usize,
}

impl Limits {
    pub(crate) fn max_body_bytes(self) -> usize {
        format::max_batch_body_bytes(self.max_batch_bytes, self.max_record_bytes)
    }

    /// The most bytes a crash can leave unsynced at the end of the log: a mark (written
    /// without a sync of its own) and the batch written after it.
    pub(crate) fn max_torn_bytes(self) -> u64 {
        (2 * BATCH_HEADER_BYTES + self.max_body_bytes()) as u64
    }
}

/// A record read from a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ReadFrame {
    pub offset: u64,
    pub rtype: u8,
    pub lsn: Lsn,
    pub payload: Vec<u8>,
}

/// One step of reading a file.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// A batch whose header and body checksums hold, with its frames (none: a synced-through
    /// mark).
    Batch { offset: u64, header: BatchHeader, frames: Vec<ReadFrame> },
    /// The data ends cleanly at `offset`: end of file, or only zeros follow (preallocated
    /// space that was never written).
    End { offset: u64 },
    /// The bytes at `offset` are not a valid batch. `extent`: where the damaged batch ends,
    /// when its header is intact. `maybe_torn`: false when the damage cannot come from a write
    /// cut short (frames that do not parse inside a batch whose checksum holds).
    Bad { offset: u64, reason: Corruption, extent: Option<u64>, maybe_torn: bool },
}

/// Reads one file's batches front to back.
pub(crate) struct BatchReader {
    file: File,
    len: u64,
    offset: u64,
    limits: Limits,
    /// The file's bytes from `buf_at` on (at most a read-ahead, or one batch if larger).
    buf: Vec<u8>,
    buf_at: u64,
}

impl BatchReader {
    /// Opens `path` and decodes its header. `Err(Ok(e))`: the header is bad (the file is
    /// returned too, so a caller can judge a torn one); `Err(Err(io))`: it could not be read.
    pub(crate) fn open(path: &Path, limits: Limits) -> io::Result<(BatchReader, Result<SegmentHeader, Corruption>)> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        let mut header = vec![0u8; SEGMENT_HEADER_BYTES.min(len as usize)];
        file.read_exact_at(&mut header, 0)?;
        let decoded = format::decode_header(&header).map_err(Corruption::BadHeader);
        let reader = BatchReader { file, len, offset: SEGMENT_HEADER_BYTES as u64, limits, buf: Vec::new(), buf_at: 0 };
        Ok((reader, decoded))
    }

    /// `n` bytes of the file at `at` (the caller keeps `at + n` within the file), from the
    /// read-ahead buffer, refilled when they are not all in it.
    fn read(&mut self, at: u64, n: usize) -> io::Result<&[u8]> {
        let buf_end = self.buf_at + self.buf.len() as u64;
        if at < self.buf_at || at + n as u64 > buf_end {
            let want = n.max(READ_AHEAD_BYTES).min((self.len - at) as usize);
            self.buf.resize(want, 0);
            self.file.read_exact_at(&mut self.buf, at)?;
            self.buf_at = at;
        }
        let from = (at - self.buf_at) as usize;
        Ok(&self.buf[from..from + n])
    }

    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// The next step. After `End` or `Bad` the reader does not move; callers stop there.
    pub(crate) fn step(&mut self) -> io::Result<Step> {
        let offset = self.offset;
        if offset >= self.len {
            return Ok(Step::End { offset: self.len.min(offset) });
        }
        let available = self.len - offset;
        let bad = |reason, extent, maybe_torn| Ok(Step::Bad { offset, reason, extent, maybe_torn });
        let mut header = [0u8; BATCH_HEADER_BYTES];
        let n = (available as usize).min(BATCH_HEADER_BYTES);
        header[..n].copy_from_slice(self.read(offset, n)?);
        if header[..n].iter().all(|&b| b == 0) && zeros_from(&self.file, offset, self.len)? {
            // A batch never starts with zeros (its magic), so this is unwritten space.
            return Ok(Step::End { offset });
        }
        if n < BATCH_HEADER_BYTES {
            let reason = Corruption::Truncated { frame_bytes: BATCH_HEADER_BYTES, available_bytes: n };
            return bad(reason, None, true);
        }
        let header = match format::decode_batch_header(&header, self.limits.max_body_bytes()) {
            Ok(h) => h,
            Err(e) => return bad(Corruption::BadBatchHeader(e), None, true),
        };
        let end = offset + (BATCH_HEADER_BYTES as u64) + header.body_bytes as u64;
        if end > self.len {
            let reason = Corruption::Truncated {
                frame_bytes: BATCH_HEADER_BYTES + header.body_bytes as usize,
                available_bytes: available as usize,
            };
            return bad(reason, None, true);
        }
        let max_record_bytes = self.limits.max_record_bytes;
        let body = self.read(offset + BATCH_HEADER_BYTES as u64, header.body_bytes as usize)?;
        if crc32c::crc32c(body) != header.body_crc {
            return bad(Corruption::BatchCrcMismatch, Some(end), true);
        }
        if header.synced_through >= header.first_lsn {
            return bad(Corruption::BadBatchContents("a batch vouches for its own records"), Some(end), false);
        }
        // The checksum holds, so the writer wrote exactly these bytes: anything wrong inside
        // is not a torn write.
        let mut frames = Vec::new();
        let mut at = 0usize;
        while at < body.len() {
            let frame_offset = offset + (BATCH_HEADER_BYTES + at) as u64;
            let frame = match format::decode_frame(&body[at..], max_record_bytes) {
                Ok(f) => f,
                Err(e) => {
                    return Ok(Step::Bad {
                        offset: frame_offset,
                        reason: e.into(),
                        extent: Some(end),
                        maybe_torn: false,
                    });
                }
            };
            let expected = header.first_lsn + frames.len() as u64;
            if frame.lsn != expected {
                let reason = Corruption::LsnDiscontinuity { expected, found: frame.lsn };
                return Ok(Step::Bad { offset: frame_offset, reason, extent: Some(end), maybe_torn: false });
            }
            frames.push(ReadFrame {
                offset: frame_offset,
                rtype: frame.rtype,
                lsn: frame.lsn,
                payload: frame.payload.to_vec(),
            });
            at += frame.len_bytes;
        }
        self.offset = end;
        Ok(Step::Batch { offset, header, frames })
    }
}

/// Whether every byte of `file` from `from` to `len` is zero (read in bounded chunks).
fn zeros_from(file: &File, from: u64, len: u64) -> io::Result<bool> {
    let mut buf = vec![0u8; ZERO_CHECK_CHUNK_BYTES];
    let mut at = from;
    while at < len {
        let n = ((len - at) as usize).min(buf.len());
        file.read_exact_at(&mut buf[..n], at)?;
        if buf[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
        at += n as u64;
    }
    Ok(true)
}

/// Decides whether damage found at `bad_offset` in the LAST segment is a torn tail (the end of
/// the final batch, which a crash cut short before its sync returned: never acknowledged, safe
/// to cut off) or damage to something that may have been acknowledged.
///
/// Every batch header says through which LSN the log was synced before it was written (a
/// later batch's, or the synced-through mark an idle writer leaves). So a valid header after
/// the damage whose `synced_through` is above `last_good_lsn` proves the damaged records were
/// synced, and may have been acknowledged: corruption, never a torn write. A header that
/// vouches for nothing beyond `last_good_lsn` proves nothing (a lost unsynced mark followed by
/// an unsynced batch is an ordinary crash). It is a torn tail only if:
/// - the bytes from `bad_offset` up to the last non-zero byte fit in what a crash can leave
///   unsynced (a mark and a batch; trailing zeros are preallocated space and do not count), and
/// - no offset after the damaged batch (after its declared `extent` when its header is intact)
///   starts a valid batch header that vouches for a record above `last_good_lsn`.
///
/// Reads at most one batch's worth of bytes plus the zero check.
pub(crate) fn classify_damage(
    file: &File,
    len: u64,
    bad_offset: u64,
    cause: Corruption,
    extent: Option<u64>,
    last_good_lsn: Lsn,
    limits: Limits,
) -> io::Result<Result<(), Corruption>> {
    let limit = limits.max_torn_bytes();
    let window = (len - bad_offset).min(limit + 1);
    let mut data = vec![0u8; window as usize];
    file.read_exact_at(&mut data, bad_offset)?;
    let span = data.iter().rposition(|&b| b != 0).map_or(0, |i| i as u64 + 1);
    if span > limit || !zeros_from(file, bad_offset + window, len)? {
        let nonzero_bytes = if span > limit { span } else { len - bad_offset };
        return Ok(Err(Corruption::TooMuchAfterDamage { cause: Box::new(cause), nonzero_bytes, limit_bytes: limit }));
    }
    let start = extent.map_or(1, |end| end - bad_offset) as usize;
    let magic = format::BATCH_MAGIC.to_le_bytes();
    // To the end of what was read, not of the non-zero bytes: a header may end in zeros.
    for at in start..data.len().saturating_sub(BATCH_HEADER_BYTES - 1) {
        if data[at..at + 4] != magic {
            continue;
        }
        if let Ok(h) = format::decode_batch_header(&data[at..at + BATCH_HEADER_BYTES], limits.max_body_bytes())
            && h.synced_through > last_good_lsn
        {
            return Ok(Err(Corruption::SyncedBatchFollows {
                cause: Box::new(cause),
                lsn: h.first_lsn,
                offset: bad_offset + at as u64,
            }));
        }
    }
    Ok(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const LIMITS: Limits = Limits { max_batch_bytes: 256, max_record_bytes: 64 };

    /// A segment file of `batches`, each a list of (lsn, payload).
    fn segment(batches: &[&[(Lsn, &[u8])]]) -> (tempfile::NamedTempFile, Vec<u64>) {
        let mut data = format::encode_header(SegmentHeader { first_lsn: 1, checkpoint_file: false }).to_vec();
        let mut offsets = Vec::new();
        let mut synced = 0;
        for batch in batches {
            let mut body = Vec::new();
            for (lsn, payload) in *batch {
                format::encode_frame(&mut body, 1, *lsn, payload);
            }
            let first = batch.first().map_or(synced + 1, |(lsn, _)| *lsn);
            offsets.push(data.len() as u64);
            data.extend_from_slice(&format::encode_batch_header(first, synced, &body));
            data.extend_from_slice(&body);
            synced = batch.last().map_or(synced, |(lsn, _)| *lsn);
        }
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(&data).unwrap();
        (file, offsets)
    }

    fn steps(path: &Path) -> Vec<Step> {
        let (mut reader, header) = BatchReader::open(path, LIMITS).unwrap();
        header.unwrap();
        let mut out = Vec::new();
        loop {
            let step = reader.step().unwrap();
            let last = !matches!(step, Step::Batch { .. });
            out.push(step);
            if last {
                return out;
            }
        }
    }

    fn damage(path: &Path, offset: u64) {
        let file = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
        let mut b = [0u8];
        file.read_exact_at(&mut b, offset).unwrap();
        file.write_all_at(&[b[0] ^ 0x5A], offset).unwrap();
    }

    fn classify(path: &Path, step: &Step, last_good_lsn: Lsn) -> Result<(), Corruption> {
        let Step::Bad { offset, reason, extent, .. } = step else { panic!("not damage: {step:?}") };
        let file = File::open(path).unwrap();
        let len = file.metadata().unwrap().len();
        classify_damage(&file, len, *offset, reason.clone(), *extent, last_good_lsn, LIMITS).unwrap()
    }

    #[test]
    fn batches_read_back_with_their_frames_and_marks() {
        let (file, offsets) = segment(&[&[(1, b"a"), (2, b"bb")], &[], &[(3, b"c")]]);
        let s = steps(file.path());
        assert!(
            matches!(&s[0], Step::Batch { offset, frames, header } if *offset == offsets[0] && frames.len() == 2 && header.synced_through == 0)
        );
        assert!(matches!(&s[1], Step::Batch { frames, header, .. } if frames.is_empty() && header.synced_through == 2));
        assert!(matches!(&s[2], Step::Batch { frames, .. } if frames[0].lsn == 3 && frames[0].payload == b"c"));
        assert!(matches!(s[3], Step::End { .. }));
    }

    #[test]
    fn damage_to_a_batch_a_mark_vouches_for_is_never_a_torn_tail() {
        // The last records, then the mark the writer leaves after their sync.
        let (file, offsets) = segment(&[&[(1, b"one")], &[(2, b"two"), (3, b"three")], &[]]);
        damage(file.path(), offsets[1] + 40);
        let s = steps(file.path());
        let err = classify(file.path(), s.last().unwrap(), 1).unwrap_err();
        assert!(
            matches!(err, Corruption::SyncedBatchFollows { lsn: 4, offset, .. } if offset == offsets[2]),
            "{err:?}"
        );
    }

    #[test]
    fn an_unsynced_batch_cut_anywhere_is_a_torn_tail() {
        // Without a mark after it: the last batch was never acknowledged. Damage to its first
        // pages with later ones intact (they reached the disk first) is still torn.
        let (file, offsets) = segment(&[&[(1, b"one")], &[(2, b"two"), (3, b"three"), (4, b"four")]]);
        damage(file.path(), offsets[1] + 40);
        let s = steps(file.path());
        assert!(matches!(s.last().unwrap(), Step::Bad { reason: Corruption::BatchCrcMismatch, maybe_torn: true, .. }));
        assert_eq!(classify(file.path(), s.last().unwrap(), 1), Ok(()));
        // Its header torn too.
        damage(file.path(), offsets[1] + 2);
        let s = steps(file.path());
        assert!(matches!(s.last().unwrap(), Step::Bad { reason: Corruption::BadBatchHeader(_), .. }));
        assert_eq!(classify(file.path(), s.last().unwrap(), 1), Ok(()));
    }

    /// Found in review: a mark lost in a power loss (written, never synced) followed by a
    /// batch whose sync had not returned: the batch's header vouches only for what came before
    /// the mark, so this is a torn tail, not corruption.
    #[test]
    fn a_lost_mark_followed_by_an_unsynced_batch_is_a_torn_tail() {
        let (file, offsets) = segment(&[&[(1, b"one")], &[], &[(2, b"two")]]);
        file.as_file().write_all_at(&[0u8; BATCH_HEADER_BYTES], offsets[1]).unwrap();
        let s = steps(file.path());
        assert!(matches!(s.last().unwrap(), Step::Bad { offset, .. } if *offset == offsets[1]));
        assert_eq!(classify(file.path(), s.last().unwrap(), 1), Ok(()));
    }

    /// Found in review: a mark whose header ends in zero bytes (its CRC's high byte) must still
    /// be seen, or damage to the batch it vouches for would be cut off as torn.
    #[test]
    fn a_mark_ending_in_zeros_still_vouches() {
        // A mark's bytes depend only on its LSNs: try batch sizes until one ends in a zero.
        let payloads: Vec<(Lsn, &[u8])> = (2..600).map(|lsn| (lsn, &b"r"[..])).collect();
        for n in 1..payloads.len() {
            let (file, offsets) = segment(&[&[(1, b"one")], &payloads[..n], &[]]);
            let len = file.as_file().metadata().unwrap().len();
            let mut last = [0u8];
            file.as_file().read_exact_at(&mut last, len - 1).unwrap();
            if last[0] != 0 {
                continue;
            }
            damage(file.path(), offsets[1] + 40);
            let s = steps(file.path());
            let verdict = classify(file.path(), s.last().unwrap(), 1);
            assert!(matches!(verdict, Err(Corruption::SyncedBatchFollows { .. })), "{verdict:?}");
            return;
        }
        panic!("no mark ending in a zero byte among the tries");
    }

    #[test]
    fn a_damaged_batch_followed_by_more_than_a_batch_is_corruption() {
        let (file, offsets) = segment(&[&[(1, b"one")]]);
        let garbage = vec![0xEEu8; LIMITS.max_torn_bytes() as usize];
        file.as_file().write_all_at(&garbage, offsets[0] + 10).unwrap();
        let s = steps(file.path());
        assert!(matches!(classify(file.path(), s.last().unwrap(), 0), Err(Corruption::TooMuchAfterDamage { .. })));
    }

    #[test]
    fn zeros_end_the_data_but_zeros_then_data_do_not() {
        let (file, _) = segment(&[&[(1, b"one")]]);
        let len = file.as_file().metadata().unwrap().len();
        file.as_file().set_len(len + 4096).unwrap();
        assert!(matches!(steps(file.path()).last().unwrap(), Step::End { offset } if *offset == len));
        file.as_file().write_all_at(b"x", len + 100).unwrap();
        assert!(matches!(steps(file.path()).last().unwrap(), Step::Bad { offset, .. } if *offset == len));
    }
}
