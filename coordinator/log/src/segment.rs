//! The log directory: file names, listing, creation, syncing and the directory lock. Shared by
//! recovery, the writer, the checkpointer and inspect.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::Lsn;
use crate::format::{self, SEGMENT_HEADER_BYTES, SegmentHeader};

const SEGMENT_SUFFIX: &str = ".seg";
const CHECKPOINT_SUFFIX: &str = ".ckpt";
/// A checkpoint is written under this suffix and renamed into place once synced.
const TMP_SUFFIX: &str = ".ckpt.tmp";
/// Digits in a file name: u64::MAX has 20, so names sort like their LSNs.
const NAME_DIGITS: usize = 20;

/// A segment or checkpoint file found in the log directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LogFile {
    /// A segment: its first record's LSN. A checkpoint: the LSN the segments continue from.
    pub lsn: Lsn,
    pub path: PathBuf,
}

pub(crate) fn segment_path(dir: &Path, first_lsn: Lsn) -> PathBuf {
    dir.join(format!("{first_lsn:0NAME_DIGITS$}{SEGMENT_SUFFIX}"))
}

pub(crate) fn checkpoint_path(dir: &Path, lsn: Lsn) -> PathBuf {
    dir.join(format!("{lsn:0NAME_DIGITS$}{CHECKPOINT_SUFFIX}"))
}

pub(crate) fn tmp_checkpoint_path(dir: &Path, lsn: Lsn) -> PathBuf {
    dir.join(format!("{lsn:0NAME_DIGITS$}{TMP_SUFFIX}"))
}

/// What `list_dir` found.
#[derive(Debug, Default)]
pub(crate) struct DirListing {
    /// Segments, oldest first.
    pub segments: Vec<LogFile>,
    /// Checkpoints, oldest first.
    pub checkpoints: Vec<LogFile>,
    /// Unfinished checkpoint files (`*.ckpt.tmp`).
    pub tmp_files: Vec<PathBuf>,
}

/// Lists the log's files. Files with other names are left alone (an operator may keep notes or
/// a lock file there); a name that merely looks like a log file but does not parse is too.
pub(crate) fn list_dir(dir: &Path) -> io::Result<DirListing> {
    let mut listing = DirListing::default();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let file = |stem: &str| parse_lsn(stem).map(|lsn| LogFile { lsn, path: entry.path() });
        if let Some(stem) = name.strip_suffix(TMP_SUFFIX) {
            if parse_lsn(stem).is_some() {
                listing.tmp_files.push(entry.path());
            }
        } else if let Some(f) = name.strip_suffix(SEGMENT_SUFFIX).and_then(file) {
            listing.segments.push(f);
        } else if let Some(f) = name.strip_suffix(CHECKPOINT_SUFFIX).and_then(file) {
            listing.checkpoints.push(f);
        }
    }
    listing.segments.sort_by_key(|s| s.lsn);
    listing.checkpoints.sort_by_key(|s| s.lsn);
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
    let header = format::encode_header(SegmentHeader { first_lsn, checkpoint_file: false });
    file.write_all_at(&header, 0)?;
    let header_end = SEGMENT_HEADER_BYTES as u64;
    write_zeros(&file, zeros, header_end, header_end + preallocate_bytes)?;
    file.sync_data()?;
    sync_dir(dir)?;
    Ok((file, path))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_like_lsns() {
        let dir = Path::new("/x");
        assert_eq!(segment_path(dir, 1), Path::new("/x/00000000000000000001.seg"));
        assert_eq!(checkpoint_path(dir, 7), Path::new("/x/00000000000000000007.ckpt"));
        assert_eq!(tmp_checkpoint_path(dir, 7), Path::new("/x/00000000000000000007.ckpt.tmp"));
        assert_eq!(parse_lsn("00000000000000000001"), Some(1));
        assert_eq!(parse_lsn(&format!("{}", u64::MAX)), Some(u64::MAX));
        assert_eq!(parse_lsn("0000000000000000001"), None);
        assert_eq!(parse_lsn("0000000000000000000a"), None);
        assert_eq!(parse_lsn("99999999999999999999"), None, "overflows u64");
    }

    #[test]
    fn listing_tells_segments_checkpoints_and_leftovers_apart() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "00000000000000000009.seg",
            "00000000000000000001.seg",
            "00000000000000000005.ckpt",
            "00000000000000000008.ckpt.tmp",
            "notes.txt",
            "0001.seg",
        ] {
            fs::write(dir.path().join(name), b"").unwrap();
        }
        let listing = list_dir(dir.path()).unwrap();
        assert_eq!(listing.segments.iter().map(|s| s.lsn).collect::<Vec<_>>(), vec![1, 9]);
        assert_eq!(listing.checkpoints.iter().map(|s| s.lsn).collect::<Vec<_>>(), vec![5]);
        assert_eq!(listing.tmp_files, vec![dir.path().join("00000000000000000008.ckpt.tmp")]);
    }
}
