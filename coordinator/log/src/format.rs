//! The on-disk encoding: segment headers and record frames. Pure functions over byte slices, no
//! I/O, so every rule here is unit-tested without touching a file. The layout and the reasons for
//! it are described in the crate documentation.

use std::fmt;

use crate::Lsn;

/// First bytes of every segment file: lets `open` refuse a directory that holds something else.
pub(crate) const SEGMENT_MAGIC: [u8; 8] = *b"PLEDGLOG";
/// Bumped on any incompatible change; a reader refuses versions it does not know.
pub(crate) const FORMAT_VERSION: u16 = 1;
/// Header flag bit 0: the segment's first frame is a `CheckpointBegin` marker.
pub(crate) const FLAG_BEGINS_WITH_CHECKPOINT: u16 = 1;
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
/// Reserved: first frame of a checkpoint segment. Payload: record_count u64.
pub(crate) const TYPE_CHECKPOINT_BEGIN: u8 = 0xF0;
/// Reserved: last frame of a checkpoint. Payload: begin_lsn u64, record_count u64.
pub(crate) const TYPE_CHECKPOINT_END: u8 = 0xF1;

/// Largest whole frame a reader configured with `max_record_bytes` accepts.
pub(crate) fn max_frame_bytes(max_record_bytes: usize) -> usize {
    max_record_bytes + FRAME_OVERHEAD_BYTES
}

/// A decoded segment header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SegmentHeader {
    pub first_lsn: Lsn,
    pub begins_with_checkpoint: bool,
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
            Self::UnsupportedVersion(v) => {
                write!(f, "format version {v} is not supported (this build reads version {FORMAT_VERSION})")
            }
            Self::UnknownFlags(flags) => write!(f, "unknown header flags {flags:#06x}"),
        }
    }
}

pub(crate) fn encode_header(header: SegmentHeader) -> [u8; SEGMENT_HEADER_BYTES] {
    let mut out = [0u8; SEGMENT_HEADER_BYTES];
    let flags = if header.begins_with_checkpoint { FLAG_BEGINS_WITH_CHECKPOINT } else { 0 };
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
    if flags & !FLAG_BEGINS_WITH_CHECKPOINT != 0 {
        return Err(HeaderError::UnknownFlags(flags));
    }
    Ok(SegmentHeader {
        first_lsn: read_u64(&bytes[12..20]),
        begins_with_checkpoint: flags & FLAG_BEGINS_WITH_CHECKPOINT != 0,
    })
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

/// Like [`decode_frame`], but skips the checksum (the expensive part) of any frame whose LSN is
/// not above `min_lsn_exclusive`. The torn-tail scan tries every byte offset and only cares
/// about frames that would prove later records exist.
pub(crate) fn decode_frame_above(data: &[u8], max_record_bytes: usize, min_lsn_exclusive: Lsn) -> Option<Frame<'_>> {
    let frame_bytes = frame_extent(data, max_record_bytes).ok()?;
    let lsn = read_u64(&data[FRAME_LENGTH_BYTES + 1..FRAME_LENGTH_BYTES + FRAME_TYPE_LSN_BYTES]);
    if lsn <= min_lsn_exclusive {
        return None;
    }
    verify_frame(&data[..frame_bytes]).ok()
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

/// Payload of a `CheckpointBegin` marker.
pub(crate) fn encode_checkpoint_begin(record_count: u64) -> [u8; 8] {
    record_count.to_le_bytes()
}

pub(crate) fn decode_checkpoint_begin(payload: &[u8]) -> Option<u64> {
    (payload.len() == 8).then(|| read_u64(payload))
}

/// Payload of a `CheckpointEnd` marker: the begin marker's LSN and the record count, so a reader
/// can check that the end belongs to the begin it saw and that no record is missing between.
pub(crate) fn encode_checkpoint_end(begin_lsn: Lsn, record_count: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&begin_lsn.to_le_bytes());
    out[8..].copy_from_slice(&record_count.to_le_bytes());
    out
}

pub(crate) fn decode_checkpoint_end(payload: &[u8]) -> Option<(Lsn, u64)> {
    (payload.len() == 16).then(|| (read_u64(&payload[..8]), read_u64(&payload[8..])))
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
    fn decode_frame_above_filters_on_lsn() {
        let mut buf = Vec::new();
        encode_frame(&mut buf, 1, 10, b"x");
        assert!(decode_frame_above(&buf, MAX, 9).is_some());
        assert!(decode_frame_above(&buf, MAX, 10).is_none());
        buf[13] ^= 1;
        assert!(decode_frame_above(&buf, MAX, 0).is_none(), "a bad crc never counts");
    }

    #[test]
    fn header_round_trip() {
        for begins_with_checkpoint in [false, true] {
            let header = SegmentHeader { first_lsn: 123_456, begins_with_checkpoint };
            let bytes = encode_header(header);
            assert_eq!(&bytes[0..8], b"PLEDGLOG");
            assert_eq!(decode_header(&bytes), Ok(header));
        }
    }

    #[test]
    fn header_errors() {
        let good = encode_header(SegmentHeader { first_lsn: 1, begins_with_checkpoint: false });
        assert_eq!(decode_header(&good[..10]), Err(HeaderError::Short { len_bytes: 10 }));
        let mut bad = good;
        bad[0] = b'X';
        assert_eq!(decode_header(&bad), Err(HeaderError::BadMagic));
        let mut bad = good;
        bad[15] ^= 0x40;
        assert_eq!(decode_header(&bad), Err(HeaderError::CrcMismatch));

        // A well-formed header from a future version is refused, not treated as torn.
        let mut future = good;
        future[8..10].copy_from_slice(&2u16.to_le_bytes());
        let crc = crc32c::crc32c(&future[0..20]);
        future[20..24].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode_header(&future), Err(HeaderError::UnsupportedVersion(2)));
        assert!(!HeaderError::UnsupportedVersion(2).maybe_torn());
    }

    #[test]
    fn checkpoint_marker_payloads() {
        assert_eq!(decode_checkpoint_begin(&encode_checkpoint_begin(17)), Some(17));
        assert_eq!(decode_checkpoint_end(&encode_checkpoint_end(5, 17)), Some((5, 17)));
        assert_eq!(decode_checkpoint_begin(b"short"), None);
        assert_eq!(decode_checkpoint_end(&[0; 15]), None);
    }
}
