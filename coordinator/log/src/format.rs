//! The on-disk encoding: segment headers and record frames. Pure functions over byte slices, no
//! I/O, so every rule here is unit-tested without touching a file. The layout and the reasons for
//! it are described in the crate documentation.

use std::fmt;

use crate::Lsn;

/// First bytes of every segment file: lets `open` refuse a directory that holds something else.
pub(crate) const SEGMENT_MAGIC: [u8; 8] = *b"PLEDGLOG";
/// Bumped on any incompatible change; a reader refuses versions it does not know. Version 1
/// (frames without batches, checkpoints inside segments) was replaced by version 2 (batches
/// with their own checksum and a synced-through mark, checkpoints in their own files).
pub(crate) const FORMAT_VERSION: u16 = 2;
/// Header flag bit 0: the file is a checkpoint (`.ckpt`), not a segment.
pub(crate) const FLAG_CHECKPOINT_FILE: u16 = 1;
/// magic (8) + version (2) + flags (2) + first_lsn (8) + crc32c (4).
pub(crate) const SEGMENT_HEADER_BYTES: usize = 24;

/// Bytes of the `length` field at the start of a frame.
const FRAME_LENGTH_BYTES: usize = 4;
/// Bytes counted by `length` besides the payload: type (1) + lsn (8).
pub(crate) const FRAME_TYPE_LSN_BYTES: usize = 9;
/// Bytes of the crc32c trailer.
const FRAME_CRC_BYTES: usize = 4;
/// Everything in a frame except the payload.
pub(crate) const FRAME_OVERHEAD_BYTES: usize = FRAME_LENGTH_BYTES + FRAME_TYPE_LSN_BYTES + FRAME_CRC_BYTES;

/// The largest `max_record_bytes` the format can express: `length` is a u32 that also counts
/// type and lsn.
pub(crate) const MAX_RECORD_BYTES_LIMIT: usize = u32::MAX as usize - FRAME_TYPE_LSN_BYTES;

/// Record types at or above this value belong to the crate; `append` refuses them.
pub const FIRST_RESERVED_TYPE: u8 = 0xF0;
/// Reserved: last frame of a checkpoint file. Payload: record_count u64.
pub(crate) const TYPE_CHECKPOINT_END: u8 = 0xF1;

/// First bytes of every batch header: "PLBT".
pub(crate) const BATCH_MAGIC: u32 = u32::from_le_bytes(*b"PLBT");
/// magic (4) + body_bytes (4) + first_lsn (8) + synced_through (8) + body crc32c (4) +
/// header crc32c (4).
pub(crate) const BATCH_HEADER_BYTES: usize = 32;

/// Largest whole frame a reader configured with `max_record_bytes` accepts.
pub(crate) fn max_frame_bytes(max_record_bytes: usize) -> usize {
    max_record_bytes + FRAME_OVERHEAD_BYTES
}

/// A decoded segment header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SegmentHeader {
    /// A segment: the LSN of its first record. A checkpoint file: the LSN from which the
    /// segments continue it (it holds the state as of every record below).
    pub first_lsn: Lsn,
    pub checkpoint_file: bool,
}

/// Why a segment header could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    /// The file is shorter than a header.
    Short {
        /// Bytes present.
        len_bytes: u64,
    },
    /// The magic bytes are wrong: not a Pledge segment (or a torn header).
    BadMagic,
    /// The header's checksum does not match.
    CrcMismatch,
    /// Written by a newer (or unknown) format version.
    UnsupportedVersion(u16),
    /// Flag bits this version does not know are set.
    UnknownFlags(u16),
}

impl HeaderError {
    /// Could this header have been torn by a crash while the segment was being created? Only
    /// then may the last segment be discarded; an unknown version or flag is never a torn write.
    pub(crate) fn maybe_torn(self) -> bool {
        matches!(self, Self::Short { .. } | Self::BadMagic | Self::CrcMismatch)
    }
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Short { len_bytes } => {
                write!(f, "file of {len_bytes} bytes is shorter than a segment header ({SEGMENT_HEADER_BYTES} bytes)")
            }
            Self::BadMagic => f.write_str("bad magic (not a pledge log segment)"),
            Self::CrcMismatch => f.write_str("header crc mismatch"),
            Self::UnsupportedVersion(v) => write!(
                f,
                "format version {v} is not supported (this build reads version {FORMAT_VERSION}; a version 1 \
                 log is read by the build that wrote it: finish its in-doubt work there, then start this one \
                 with an empty directory)"
            ),
            Self::UnknownFlags(flags) => write!(f, "unknown header flags {flags:#06x}"),
        }
    }
}

pub(crate) fn encode_header(header: SegmentHeader) -> [u8; SEGMENT_HEADER_BYTES] {
    let mut out = [0u8; SEGMENT_HEADER_BYTES];
    let flags = if header.checkpoint_file { FLAG_CHECKPOINT_FILE } else { 0 };
    out[0..8].copy_from_slice(&SEGMENT_MAGIC);
    out[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    out[10..12].copy_from_slice(&flags.to_le_bytes());
    out[12..20].copy_from_slice(&header.first_lsn.to_le_bytes());
    let crc = crc32c::crc32c(&out[0..20]);
    out[20..24].copy_from_slice(&crc.to_le_bytes());
    out
}

pub(crate) fn decode_header(data: &[u8]) -> Result<SegmentHeader, HeaderError> {
    let Some(bytes) = data.get(..SEGMENT_HEADER_BYTES) else {
        return Err(HeaderError::Short { len_bytes: data.len() as u64 });
    };
    if bytes[0..8] != SEGMENT_MAGIC {
        return Err(HeaderError::BadMagic);
    }
    if crc32c::crc32c(&bytes[0..20]) != read_u32(&bytes[20..24]) {
        return Err(HeaderError::CrcMismatch);
    }
    // Version and flags are checked only after the crc, so a random bit flip reads as
    // corruption rather than as a confusing "unsupported version".
    let version = u16::from_le_bytes([bytes[8], bytes[9]]);
    if version != FORMAT_VERSION {
        return Err(HeaderError::UnsupportedVersion(version));
    }
    let flags = u16::from_le_bytes([bytes[10], bytes[11]]);
    if flags & !FLAG_CHECKPOINT_FILE != 0 {
        return Err(HeaderError::UnknownFlags(flags));
    }
    Ok(SegmentHeader { first_lsn: read_u64(&bytes[12..20]), checkpoint_file: flags & FLAG_CHECKPOINT_FILE != 0 })
}

/// A decoded batch header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BatchHeader {
    /// Bytes of frames that follow the header (0: a synced-through mark).
    pub body_bytes: u32,
    /// LSN of the batch's first frame (of a mark: the next LSN).
    pub first_lsn: Lsn,
    /// Every record up to this LSN was synced before this batch was written (so it may have
    /// been acknowledged, and damage to it is never a torn write).
    pub synced_through: Lsn,
    pub body_crc: u32,
}

/// Why bytes at a batch boundary are not a valid batch header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchHeaderError {
    BadMagic,
    CrcMismatch,
    /// `body_bytes` is larger than any batch the writer makes.
    TooLarge(u32),
}

impl fmt::Display for BatchHeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadMagic => f.write_str("bad magic"),
            Self::CrcMismatch => f.write_str("header crc mismatch"),
            Self::TooLarge(n) => write!(f, "body of {n} bytes is larger than any batch"),
        }
    }
}

/// The header of a batch whose body is `body` (already encoded frames).
pub(crate) fn encode_batch_header(first_lsn: Lsn, synced_through: Lsn, body: &[u8]) -> [u8; BATCH_HEADER_BYTES] {
    let mut out = [0u8; BATCH_HEADER_BYTES];
    out[0..4].copy_from_slice(&BATCH_MAGIC.to_le_bytes());
    out[4..8].copy_from_slice(&(body.len() as u32).to_le_bytes());
    out[8..16].copy_from_slice(&first_lsn.to_le_bytes());
    out[16..24].copy_from_slice(&synced_through.to_le_bytes());
    out[24..28].copy_from_slice(&crc32c::crc32c(body).to_le_bytes());
    let crc = crc32c::crc32c(&out[0..28]);
    out[28..32].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Decodes a batch header; `max_body_bytes` is the largest body the writer can produce.
pub(crate) fn decode_batch_header(bytes: &[u8], max_body_bytes: usize) -> Result<BatchHeader, BatchHeaderError> {
    let bytes = &bytes[..BATCH_HEADER_BYTES];
    if read_u32(&bytes[0..4]) != BATCH_MAGIC {
        return Err(BatchHeaderError::BadMagic);
    }
    if crc32c::crc32c(&bytes[0..28]) != read_u32(&bytes[28..32]) {
        return Err(BatchHeaderError::CrcMismatch);
    }
    let body_bytes = read_u32(&bytes[4..8]);
    if body_bytes as usize > max_body_bytes {
        return Err(BatchHeaderError::TooLarge(body_bytes));
    }
    Ok(BatchHeader {
        body_bytes,
        first_lsn: read_u64(&bytes[8..16]),
        synced_through: read_u64(&bytes[16..24]),
        body_crc: read_u32(&bytes[24..28]),
    })
}

/// The largest batch body a writer configured with these bounds produces: it stops taking
/// records once the body reaches `max_batch_bytes`, so it exceeds that by less than one frame.
pub(crate) fn max_batch_body_bytes(max_batch_bytes: usize, max_record_bytes: usize) -> usize {
    max_batch_bytes + max_frame_bytes(max_record_bytes)
}

/// Appends one frame to `buf`. The caller has checked `payload.len() <= max_record_bytes`, which
/// config validation keeps below [`MAX_RECORD_BYTES_LIMIT`].
pub(crate) fn encode_frame(buf: &mut Vec<u8>, rtype: u8, lsn: Lsn, payload: &[u8]) {
    debug_assert!(payload.len() <= MAX_RECORD_BYTES_LIMIT);
    let start = buf.len();
    let length = (FRAME_TYPE_LSN_BYTES + payload.len()) as u32;
    buf.reserve(FRAME_OVERHEAD_BYTES + payload.len());
    buf.extend_from_slice(&length.to_le_bytes());
    buf.push(rtype);
    buf.extend_from_slice(&lsn.to_le_bytes());
    buf.extend_from_slice(payload);
    let crc = crc32c::crc32c(&buf[start..]);
    buf.extend_from_slice(&crc.to_le_bytes());
}

/// A frame that passed its checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Frame<'a> {
    pub rtype: u8,
    pub lsn: Lsn,
    pub payload: &'a [u8],
    /// Whole frame, length field to crc.
    pub len_bytes: usize,
}

/// Why the bytes at some offset are not a valid frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FrameError {
    /// `length` is below 9 or above `max_record_bytes + 9`.
    InvalidLength(u32),
    /// The frame (or its length field) runs past the end of the data.
    Truncated {
        frame_bytes: usize,
        available_bytes: usize,
    },
    CrcMismatch,
}

/// Reads the length field and checks that a whole frame of that length fits in `data`.
/// Returns the whole frame's length in bytes.
fn frame_extent(data: &[u8], max_record_bytes: usize) -> Result<usize, FrameError> {
    let Some(length_bytes) = data.get(..FRAME_LENGTH_BYTES) else {
        return Err(FrameError::Truncated { frame_bytes: FRAME_LENGTH_BYTES, available_bytes: data.len() });
    };
    let length = read_u32(length_bytes);
    let length_usize = length as usize;
    if length_usize < FRAME_TYPE_LSN_BYTES || length_usize > max_record_bytes + FRAME_TYPE_LSN_BYTES {
        return Err(FrameError::InvalidLength(length));
    }
    let frame_bytes = FRAME_LENGTH_BYTES + length_usize + FRAME_CRC_BYTES;
    if data.len() < frame_bytes {
        return Err(FrameError::Truncated { frame_bytes, available_bytes: data.len() });
    }
    Ok(frame_bytes)
}

/// Decodes the frame at the start of `data`.
pub(crate) fn decode_frame(data: &[u8], max_record_bytes: usize) -> Result<Frame<'_>, FrameError> {
    let frame_bytes = frame_extent(data, max_record_bytes)?;
    verify_frame(&data[..frame_bytes])
}

/// `frame` is exactly one frame's bytes with a plausible length.
fn verify_frame(frame: &[u8]) -> Result<Frame<'_>, FrameError> {
    let crc_at = frame.len() - FRAME_CRC_BYTES;
    if crc32c::crc32c(&frame[..crc_at]) != read_u32(&frame[crc_at..]) {
        return Err(FrameError::CrcMismatch);
    }
    Ok(Frame {
        rtype: frame[FRAME_LENGTH_BYTES],
        lsn: read_u64(&frame[FRAME_LENGTH_BYTES + 1..FRAME_LENGTH_BYTES + FRAME_TYPE_LSN_BYTES]),
        payload: &frame[FRAME_LENGTH_BYTES + FRAME_TYPE_LSN_BYTES..crc_at],
        len_bytes: frame.len(),
    })
}

/// Payload of a `CheckpointEnd` marker: the record count, so a reader can check that no record
/// of the checkpoint is missing.
pub(crate) fn encode_checkpoint_end(record_count: u64) -> [u8; 8] {
    record_count.to_le_bytes()
}

pub(crate) fn decode_checkpoint_end(payload: &[u8]) -> Option<u64> {
    (payload.len() == 8).then(|| read_u64(payload))
}

fn read_u32(bytes: &[u8]) -> u32 {
    u32::from_le_bytes(bytes.try_into().expect("caller passes exactly 4 bytes"))
}

fn read_u64(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes.try_into().expect("caller passes exactly 8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1024;

    #[test]
    fn frame_round_trip_and_layout() {
        let mut buf = Vec::new();
        encode_frame(&mut buf, 7, 42, b"hello");
        assert_eq!(buf.len(), FRAME_OVERHEAD_BYTES + 5);
        // length counts type + lsn + payload
        assert_eq!(&buf[0..4], &14u32.to_le_bytes());
        assert_eq!(buf[4], 7);
        assert_eq!(&buf[5..13], &42u64.to_le_bytes());
        let frame = decode_frame(&buf, MAX).unwrap();
        assert_eq!((frame.rtype, frame.lsn, frame.payload, frame.len_bytes), (7, 42, &b"hello"[..], buf.len()));
    }

    #[test]
    fn empty_payload_is_a_valid_frame() {
        let mut buf = Vec::new();
        encode_frame(&mut buf, 1, 1, b"");
        assert_eq!(decode_frame(&buf, MAX).unwrap().payload, b"");
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let mut buf = Vec::new();
        encode_frame(&mut buf, 3, 9, b"payload bytes");
        for byte in 0..buf.len() {
            for bit in 0..8 {
                let mut damaged = buf.clone();
                damaged[byte] ^= 1 << bit;
                assert!(decode_frame(&damaged, MAX).is_err(), "flip of byte {byte} bit {bit} went unnoticed");
            }
        }
    }

    #[test]
    fn lengths_outside_bounds_are_invalid() {
        for length in [0u32, 8, (MAX + FRAME_TYPE_LSN_BYTES + 1) as u32, u32::MAX] {
            let mut data = length.to_le_bytes().to_vec();
            data.resize(64, 0xAB);
            assert_eq!(decode_frame(&data, MAX), Err(FrameError::InvalidLength(length)));
        }
    }

    #[test]
    fn largest_allowed_record_decodes() {
        let mut buf = Vec::new();
        encode_frame(&mut buf, 1, 1, &vec![5u8; MAX]);
        assert_eq!(decode_frame(&buf, MAX).unwrap().payload.len(), MAX);
        // ...and a reader configured with a smaller bound calls it invalid, not truncated.
        assert!(matches!(decode_frame(&buf, MAX - 1), Err(FrameError::InvalidLength(_))));
    }

    #[test]
    fn truncated_frame_is_reported_as_truncated() {
        let mut buf = Vec::new();
        encode_frame(&mut buf, 1, 1, b"abcdef");
        for cut in 0..buf.len() {
            assert!(matches!(decode_frame(&buf[..cut], MAX), Err(FrameError::Truncated { .. })), "cut at {cut}");
        }
    }

    #[test]
    fn header_round_trip() {
        for checkpoint_file in [false, true] {
            let header = SegmentHeader { first_lsn: 123_456, checkpoint_file };
            let bytes = encode_header(header);
            assert_eq!(&bytes[0..8], b"PLEDGLOG");
            assert_eq!(decode_header(&bytes), Ok(header));
        }
    }

    #[test]
    fn header_errors() {
        let good = encode_header(SegmentHeader { first_lsn: 1, checkpoint_file: false });
        assert_eq!(decode_header(&good[..10]), Err(HeaderError::Short { len_bytes: 10 }));
        let mut bad = good;
        bad[0] = b'X';
        assert_eq!(decode_header(&bad), Err(HeaderError::BadMagic));
        let mut bad = good;
        bad[15] ^= 0x40;
        assert_eq!(decode_header(&bad), Err(HeaderError::CrcMismatch));

        // A well-formed header from a future version is refused, not treated as torn.
        let mut future = good;
        future[8..10].copy_from_slice(&3u16.to_le_bytes());
        let crc = crc32c::crc32c(&future[0..20]);
        future[20..24].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode_header(&future), Err(HeaderError::UnsupportedVersion(3)));
        assert!(!HeaderError::UnsupportedVersion(3).maybe_torn());
    }

    #[test]
    fn checkpoint_marker_payload() {
        assert_eq!(decode_checkpoint_end(&encode_checkpoint_end(17)), Some(17));
        assert_eq!(decode_checkpoint_end(&[0; 15]), None);
    }

    #[test]
    fn batch_header_round_trip_and_every_bit_flip_is_detected() {
        let mut body = Vec::new();
        encode_frame(&mut body, 1, 5, b"x");
        let header = encode_batch_header(5, 4, &body);
        let decoded = decode_batch_header(&header, 1024).unwrap();
        assert_eq!(
            decoded,
            BatchHeader {
                body_bytes: body.len() as u32,
                first_lsn: 5,
                synced_through: 4,
                body_crc: crc32c::crc32c(&body)
            }
        );
        for byte in 0..BATCH_HEADER_BYTES {
            for bit in 0..8 {
                let mut damaged = header;
                damaged[byte] ^= 1 << bit;
                assert!(decode_batch_header(&damaged, 1024).is_err(), "flip of byte {byte} bit {bit}");
            }
        }
        assert_eq!(decode_batch_header(&header, body.len() - 1), Err(BatchHeaderError::TooLarge(body.len() as u32)));
        assert_eq!(decode_batch_header(&[0; 32], 1024), Err(BatchHeaderError::BadMagic));
    }
}
