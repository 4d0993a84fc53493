//! Conversions between the wire types and what the kernel wants: attributes,
//! times, file types and errors. Every conversion lives here, so the
//! filesystem code never builds a `FileAttr` by hand.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{Errno, FileAttr, FileType, INodeNo};

use crate::client::ClientError;
use crate::proto::{Attr, FileKind, SetTime, Timespec};

/// `st_blksize`: the I/O size tools like `cp` use. One FUSE write carries
/// at most this much (see `MAX_WRITE_BYTES` in `fs.rs`).
pub const BLKSIZE: u32 = 1 << 20;

pub fn file_type(kind: FileKind) -> FileType {
    match kind {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDevice => FileType::CharDevice,
        FileKind::BlockDevice => FileType::BlockDevice,
    }
}

/// A wire time as the kernel's `SystemTime`; times outside what
/// `SystemTime` holds become the epoch rather than a panic.
pub fn system_time(t: Timespec) -> SystemTime {
    let at = if t.secs >= 0 {
        UNIX_EPOCH.checked_add(Duration::new(t.secs as u64, t.nanos.min(999_999_999)))
    } else {
        UNIX_EPOCH
            .checked_sub(Duration::from_secs(t.secs.unsigned_abs()))
            .and_then(|s| s.checked_add(Duration::from_nanos(u64::from(t.nanos.min(999_999_999)))))
    };
    at.unwrap_or(UNIX_EPOCH)
}

/// A kernel time as a wire time (before the epoch becomes negative seconds).
pub fn timespec(t: SystemTime) -> Timespec {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timespec { secs: d.as_secs().min(i64::MAX as u64) as i64, nanos: d.subsec_nanos() },
        Err(e) => Timespec::from_nanos(-(e.duration().as_nanos() as i128)),
    }
}

pub fn set_time(t: fuser::TimeOrNow) -> SetTime {
    match t {
        fuser::TimeOrNow::Now => SetTime::Now,
        fuser::TimeOrNow::SpecificTime(t) => SetTime::At(timespec(t)),
    }
}

/// `st_blocks` as the kernel is told it: the metadata's count, but never 0
/// for a regular file with bytes in it. Data this mount has not sent yet
/// has no chunk, so no blocks, and GNU tar (`--sparse`) archives a file of
/// 0 blocks as all holes without reading it (ZFS had that bug with data
/// not yet synced). One block makes tools look with `SEEK_DATA`, which
/// sends the buffered data first and finds it.
fn st_blocks(a: &Attr) -> u64 {
    match a.kind {
        FileKind::File if a.size > 0 => a.blocks.max(1),
        _ => a.blocks,
    }
}

/// The kernel's view of an inode.
pub fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: st_blocks(a),
        atime: system_time(a.atime),
        mtime: system_time(a.mtime),
        ctime: system_time(a.ctime),
        crtime: system_time(a.crtime),
        kind: file_type(a.kind),
        perm: (a.perm & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: BLKSIZE,
        flags: 0,
    }
}

/// The errno a client error becomes.
pub fn errno(e: &ClientError) -> Errno {
    Errno::from_i32(e.errno())
}

pub fn errno_of(code: i32) -> Errno {
    Errno::from_i32(code)
}

/// Whether an error is the filesystem working as intended (ENOENT on a
/// lookup) rather than trouble worth a warning.
pub fn is_expected(e: &ClientError) -> bool {
    use crate::proto::ErrorCode::*;
    matches!(
        e.code(),
        NotFound
            | Exists
            | NotDir
            | IsDir
            | NotEmpty
            | Invalid
            | NameTooLong
            | PermissionDenied
            | NotPermitted
            | NoData
            | Range
            | TooBig
            | FileTooBig
            | Loop
            | CrossDevice
            | QuotaExceeded
            | NoSpace
            | NotSupported
            | TooManyLinks
            | ReadOnly
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_roundtrip_across_the_epoch() {
        for (secs, nanos) in [(0i64, 0u32), (1_700_000_000, 123_456_789), (-1, 500_000_000), (-86_400, 0)] {
            let t = Timespec { secs, nanos };
            assert_eq!(timespec(system_time(t)), t, "{secs}.{nanos}");
        }
    }

    #[test]
    fn extreme_times_do_not_panic() {
        let _ = system_time(Timespec { secs: i64::MAX, nanos: 999_999_999 });
        let _ = system_time(Timespec { secs: i64::MIN, nanos: 0 });
        let _ = system_time(Timespec { secs: 0, nanos: u32::MAX });
    }

    #[test]
    fn attributes_convert() {
        let a = Attr {
            ino: 7,
            kind: FileKind::File,
            perm: 0o104755,
            nlink: 2,
            uid: 1000,
            gid: 100,
            size: 1025,
            blocks: 3,
            atime: Timespec { secs: 1, nanos: 2 },
            mtime: Timespec { secs: 3, nanos: 4 },
            ctime: Timespec { secs: 5, nanos: 6 },
            crtime: Timespec::default(),
            rdev: 0,
            generation: 9,
        };
        let f = file_attr(&a);
        assert_eq!(f.ino, INodeNo(7));
        assert_eq!(f.blocks, 3);
        // Bytes not sent yet: never 0 blocks (tar --sparse would skip them).
        let unsent = Attr { blocks: 0, ..a.clone() };
        assert_eq!(file_attr(&unsent).blocks, 1);
        let empty = Attr { blocks: 0, size: 0, ..a.clone() };
        assert_eq!(file_attr(&empty).blocks, 0);
        assert_eq!(f.perm, 0o4755, "type bits stripped");
        assert_eq!(f.kind, FileType::RegularFile);
        assert_eq!(timespec(f.mtime), a.mtime);
    }
}
