//! On-disk storage of chunk replicas for the chunk server.
//!
//! A [`ChunkStore`] owns one directory and keeps every chunk replica in it as
//! one sparse file with a per-block blake3 checksum table. Every read verifies
//! the blocks it touches; [`ChunkStore::scrub`] re-verifies everything at a
//! rate the caller bounds. The API is blocking and thread-safe (`&self`); the
//! server calls it from `spawn_blocking`.
//!
//! What it deliberately does not do: repair. A replica that fails a checksum is
//! reported (`Corrupt`) or quarantined; fetching a good copy from another
//! replica is the caller's job (`export` on the good side, `import` here).
//! It does not decide versions either: the caller says which version it
//! expects and the store refuses anything else.
//!
//! Start reading at [`ChunkStore::write`] (the read-modify-write path,
//! `modify`) and [`ChunkStore::read`].
//!
//! # Directory layout
//!
//! ```text
//! <dir>/lock                       flock()ed while a store has the directory open
//! <dir>/chunks/<xx>/<id>.v<ver>    one file per replica: <id> is 16 lowercase hex digits,
//!                                  <xx> the low byte of the id (2 hex digits), so
//!                                  sequential ids spread evenly over 256 directories;
//!                                  <ver> is the version in decimal
//! <dir>/tmp/                       files being built (creation, import); emptied by open
//! <dir>/quarantine/                replicas moved aside as corrupt, never read again
//! <dir>/versions.log              version journal: changes whose renames may not be durable yet
//! ```
//!
//! The version lives only in the file name, so a version change is one
//! `rename`: atomic across crashes. It is made durable by a record in the
//! version journal ([`super::versions`]; one fdatasync for a whole batch)
//! rather than by an fsync of the directory; `open` finishes any rename the
//! journal has and the directory lost. If a crash
//! leaves two versions of one chunk (an import renamed the new one in but did
//! not unlink the old one yet), `open` keeps the highest and deletes the rest.
//!
//! # Chunk file format (format version 1, all integers little-endian)
//!
//! ```text
//! offset 0, 4096 bytes: header
//!     0..8    magic "LOCUSCHK"
//!     8..12   format version (u32) = 1
//!    12..16   flags (u32), 0
//!    16..24   chunk id (u64), must match the file name
//!    24..32   chunk size in bytes (u64)
//!    32..40   block size in bytes (u64)
//!    40..72   blake3 of header bytes 0..40 followed by 72..4096 (the rest is zero)
//! offset 4096: checksum table, one 32-byte entry per block, padded to 4 KiB
//! offset data_off = 4096 + round_up(32 * blocks, 4096): data, block i at data_off + i * block_size
//! ```
//!
//! Later format versions must keep the magic, the format field and the
//! header checksum where they are: an intact header of an unknown format makes
//! `open` fail (a downgrade), while a header failing its checksum is damage.
//!
//! The file length is always `data_off + chunk_size`; the data region is
//! sparse, and so is the table: a page of it is allocated (never written
//! with zeros) when the first block it describes gets data, so a small
//! file's chunk costs its header, one table page and its data. A table
//! entry is `blake3(block data ‖ chunk id ‖ block index)`, so a block
//! written to the wrong place or the wrong file fails verification. An
//! all-zero entry means "never written": the block reads as zeros, is not
//! verified and normally has no space allocated. A block whose new content is
//! all zeros is stored the same way (entry cleared, hole punched), so zeroing
//! frees space and a VM image full of zeros stays sparse.
//!
//! All chunk files of a store share its chunk and block size. A file with an
//! intact header but another geometry makes `open` fail (configuration error:
//! quarantining would throw away the whole server's data).
//!
//! # Writes and crashes
//!
//! A write touches whole blocks: a partial block is read, verified (unless
//! never written), merged and rewritten. Per block the order is: allocate
//! (`fallocate`, so running out of space fails before any byte changes), data
//! `pwrite`, then one `pwrite` of the table entries; blocks becoming zero get
//! their entry cleared first and their space punched after. Nothing is durable
//! until [`ChunkStore::flush`] (fdatasync). A crash before that may leave a
//! block whose data and table entry do not match (torn pair): it reads as
//! `Corrupt` and the caller repairs it from another replica, as it would
//! real media damage. Overwriting a whole block heals it.
//!
//! A write that fails in process (ENOSPC, EIO) is repaired before the error is
//! returned: each touched block's entry is reset to match what is on disk,
//! preferring the previous content, so every block holds either its old or its
//! new content with a matching checksum. If a block matches neither (a data
//! write tore it) the replica is quarantined and the write returns `Corrupt`.
//! A failed fdatasync also quarantines the replica: after one, Linux may have
//! dropped the dirty pages, so the file can no longer be trusted.
//!
//! Creating a chunk builds its header in `tmp/` and renames it in, with no
//! sync: its first flush fdatasyncs the file and fsyncs its directory
//! (`FLAG_NEW`), so a small file's chunk costs no sync until the client asks
//! for durability (two syncs, about 6 ms, were on every new chunk's first
//! write). A crash before that flush leaves no file or one whose header fails
//! its checksum (quarantined at open): that replica is lost, never wrong.
//! Copies and imports still sync before they are listed. `delete` does
//! not fsync the directory: a deleted chunk may come back after a crash and
//! the caller's garbage collection deletes it again.
//!
//! # Export stream (format version 1)
//!
//! ```text
//! 48 bytes: "LOCUSEXP", format (u32) = 1, 0 (u32), chunk id, version, chunk size, block size (u64 each)
//! per block, in order: 0x00 (never written) | 0x01, block data, 32-byte table entry
//! 0x02, blake3 over the 48 header bytes and every block's tag and entry
//! ```
//!
//! Data is covered by the per-block entries (which bind the chunk id and block
//! index); the trailer covers the structure (tags, order, truncation).
//!
//! # Concurrency
//!
//! Each chunk in use has a `ChunkLocks` (created on demand, dropped when
//! idle): an `io` read-write lock (reads, export and scrub batches share it;
//! write, zero, version changes, delete take it exclusively, so a reader never
//! sees a half-written block and read-modify-writes never interleave), a
//! `gate` (writes hold it shared for their whole call; [`ChunkStore::lock_exclusive`]
//! holds it exclusively, blocking writes but not reads or export), and the
//! group-commit state of `flush`. Lock order: gate, io, then the short-lived
//! index, file-cache and flush mutexes. Do not write to a chunk from the
//! thread that holds its [`ChunkGuard`]: that deadlocks. A copy-on-write
//! copy ([`Missing::CopyFrom`]) holds the new chunk's gate and io lock and
//! then takes its origin's io lock shared; the origin always has the smaller
//! id (it was allocated first), so such pairs cannot form a cycle.
//!
//! # Copy-on-write
//!
//! A chunk shared by clones is never written in place: its writer gets a
//! new chunk whose first write names the old one as its origin. The store
//! then builds the new chunk from its own replica of the origin in `tmp/`:
//! the origin's written blocks are copied with `copy_file_range` (in the
//! kernel; shared extents on filesystems with reflinks), read back and
//! checked against the origin's table, given table entries for the new id,
//! and the file is fdatasynced and renamed in (and its directory synced)
//! before the write applies. A crash before the rename leaves only a temp
//! file; after it the copy is complete and durable.
//!
//! # Memory
//!
//! The index is a `HashMap<ChunkId, IndexEntry>` of 24-byte entries, about 52
//! bytes per chunk including the hash table's slack (see the
//! `index_heap_per_entry` test). A scrub pass also holds a sorted snapshot of
//! the ids (8 bytes per chunk). Open file descriptors are bounded by
//! `max_open_files`, plus those held by operations in flight.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use tracing::{debug, error, info, warn};

use super::cache::{BlockCache, CacheStats};
use super::versions::{self, Change, Journal};
use fs_client::sums::{block_sum, whole_blocks, ZERO_SUM};

// Offsets and lengths inside a chunk (at most MAX_CHUNK_SIZE) are cast to usize.
const _: () = assert!(usize::BITS >= 64);

/// Identifies a chunk cluster-wide.
pub type ChunkId = u64;

/// Smallest block size: the page size, so blocks can be punched and aligned.
pub const MIN_BLOCK_SIZE: u64 = 4096;
/// Largest block size: a partial write reads and rewrites a whole block.
pub const MAX_BLOCK_SIZE: u64 = 16 << 20;
/// Largest chunk size: bounds the checksum table (at most 32 MiB) and buffers.
pub const MAX_CHUNK_SIZE: u64 = 4 << 30;

const HEADER_SIZE: u64 = 4096;
const ALIGN: u64 = 4096;
const SUM_SIZE: u64 = 32;
const MAGIC: [u8; 8] = *b"LOCUSCHK";
const FORMAT_VERSION: u32 = 1;
const HDR_FIELDS_END: usize = 40;
const HDR_SUM_END: usize = 72;

/// Scrub and export read this much at a time under the chunk's io lock, so a
/// writer waits at most for one batch.
const BATCH_BYTES: u64 = 1 << 20;
/// Import re-checks free space after writing this much.
const IMPORT_SPACE_CHECK_BYTES: u64 = 8 << 20;
/// Buffer between export and its (possibly unbuffered) sink.
const EXPORT_BUFFER_BYTES: usize = 128 << 10;
/// Directory fsyncs `set_versions` runs at once.
const SYNC_THREADS: usize = 16;

const EXPORT_MAGIC: [u8; 8] = *b"LOCUSEXP";
const EXPORT_FORMAT: u32 = 1;
const EXPORT_HEADER_LEN: usize = 48;
const TAG_HOLE: u8 = 0;
const TAG_DATA: u8 = 1;
const TAG_END: u8 = 2;

const CHUNKS_DIR: &str = "chunks";
const TMP_DIR: &str = "tmp";
const QUARANTINE_DIR: &str = "quarantine";
const LOCK_FILE: &str = "lock";
const JOURNAL_FILE: &str = "versions.log";

/// Index flag: written since the last fdatasync started.
const FLAG_DIRTY: u8 = 1;
/// Index flag: created since the last flush started; the flush syncs the
/// chunk's directory too, making its name durable.
const FLAG_NEW: u8 = 2;

/// What a write or zero does to a chunk this store does not have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Missing {
    /// Fail with `NotFound`.
    Fail,
    /// Create it, empty, at the write's version.
    Create,
    /// Copy-on-write: make it from this store's replica of `origin`, which
    /// must be at exactly `version` (see [`ChunkStore::write_with`]).
    CopyFrom { origin: ChunkId, version: u64 },
}

/// Configuration of a [`ChunkStore`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreOptions {
    /// Bytes per chunk: a multiple of `block_size`, at most [`MAX_CHUNK_SIZE`].
    pub chunk_size: u64,
    /// Bytes per checksummed block: a power of two in [`MIN_BLOCK_SIZE`]..=[`MAX_BLOCK_SIZE`].
    pub block_size: u64,
    /// Open file descriptors kept cached (at least 1).
    pub max_open_files: usize,
    /// Writes that allocate space fail with `NoSpace` when the filesystem
    /// would have less than this many bytes available afterwards.
    pub reserved_bytes: u64,
    /// Bytes of verified blocks kept in memory for reads (0: none); see
    /// [`super::cache`].
    pub cache_bytes: u64,
    /// Write large aligned runs of data with `O_DIRECT` (see [`ChunkFile`]).
    pub direct_io: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            chunk_size: 64 << 20,
            block_size: 16 << 10,
            max_open_files: 1024,
            reserved_bytes: 256 << 20,
            cache_bytes: 256 << 20,
            direct_io: true,
        }
    }
}

/// Errors of the chunk store. `NotFound`, `VersionMismatch`, `OutOfRange`,
/// `Exists` and `BadInput` are the caller's; `Corrupt` means this replica (or
/// the block) is bad and must be repaired from another; `NoSpace` and `Io`
/// are this node's trouble.
#[derive(Debug, thiserror::Error)]
pub enum ChunkStoreError {
    #[error("chunk {} not found", Hex(*.0))]
    NotFound(ChunkId),
    /// Not here because this replica was set aside as corrupt: its data is
    /// lost here, not "never written" (which `NotFound` lets a reader
    /// assume when every replica says it).
    #[error("chunk {}: this replica was set aside as corrupt", Hex(*.0))]
    Quarantined(ChunkId),
    #[error("chunk {} is at version {have}, not {want}", Hex(*id))]
    VersionMismatch { id: ChunkId, have: u64, want: u64 },
    #[error("range {offset}+{len} is outside the {chunk_size}-byte chunk")]
    OutOfRange { offset: u64, len: u64, chunk_size: u64 },
    #[error("chunk {} block {block} is corrupt", Hex(*id))]
    Corrupt { id: ChunkId, block: u64 },
    #[error("not enough free space")]
    NoSpace,
    #[error("chunk already exists at that version")]
    Exists,
    #[error("bad input: {0}")]
    BadInput(String),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

type Result<T, E = ChunkStoreError> = std::result::Result<T, E>;

/// The chunks whose replicas are in the quarantine directory `dir` (file
/// names start with the chunk id in hex).
fn quarantined_ids(dir: &Path) -> std::collections::HashSet<ChunkId> {
    let Ok(entries) = fs::read_dir(dir) else { return Default::default() };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name();
            let hex = name.to_str()?.get(..16)?;
            ChunkId::from_str_radix(hex, 16).ok()
        })
        .collect()
}

/// Maps an OS error, turning "disk full" and "quota exceeded" into `NoSpace`.
fn io_err(context: impl Into<String>, source: io::Error) -> ChunkStoreError {
    match source.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => ChunkStoreError::NoSpace,
        _ => ChunkStoreError::Io { context: context.into(), source },
    }
}

/// Formats a chunk id the way file names and logs show it.
#[derive(Clone, Copy)]
struct Hex(u64);

impl fmt::Display for Hex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// What one scrub call did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScrubReport {
    /// Bytes read and verified (data blocks, table entries, headers).
    pub bytes_verified: u64,
    /// Chunks whose last block was verified in this call.
    pub chunks_verified: u64,
    /// Chunks found corrupt in this call; they have been quarantined.
    pub corrupt: Vec<ChunkId>,
    /// Errors that were not the replica's fault (the chunk was skipped).
    pub io_errors: u64,
    /// This call reached the end of a pass over every chunk; the next call starts a new one.
    pub pass_completed: bool,
}

// ---------------------------------------------------------------------------
// Geometry, header and checksums

#[derive(Clone, Copy, Debug)]
struct Geometry {
    chunk_size: u64,
    block_size: u64,
    n_blocks: u64,
    data_off: u64,
}

impl Geometry {
    fn new(chunk_size: u64, block_size: u64) -> Result<Geometry, String> {
        if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
            return Err(format!(
                "block size {block_size} is not a power of two in {MIN_BLOCK_SIZE}..={MAX_BLOCK_SIZE}"
            ));
        }
        if chunk_size == 0 || !chunk_size.is_multiple_of(block_size) || chunk_size > MAX_CHUNK_SIZE {
            return Err(format!(
                "chunk size {chunk_size} is not a non-zero multiple of the block size up to {MAX_CHUNK_SIZE}"
            ));
        }
        let n_blocks = chunk_size / block_size;
        let data_off = HEADER_SIZE + (n_blocks * SUM_SIZE).div_ceil(ALIGN) * ALIGN;
        Ok(Geometry { chunk_size, block_size, n_blocks, data_off })
    }

    fn bs(&self) -> usize {
        self.block_size as usize
    }

    fn block_off(&self, block: u64) -> u64 {
        self.data_off + block * self.block_size
    }

    fn sum_off(block: u64) -> u64 {
        HEADER_SIZE + block * SUM_SIZE
    }

    fn file_len(&self) -> u64 {
        self.data_off + self.chunk_size
    }

    /// Blocks `[first, end)` touched by a non-empty range already checked to be inside the chunk.
    fn blocks(&self, offset: u64, len: u64) -> (u64, u64) {
        (offset / self.block_size, (offset + len - 1) / self.block_size + 1)
    }
}

fn header_sum(hdr: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&hdr[..HDR_FIELDS_END]);
    h.update(&hdr[HDR_SUM_END..]);
    *h.finalize().as_bytes()
}

fn encode_header(id: ChunkId, geo: &Geometry) -> Vec<u8> {
    let mut hdr = vec![0u8; HEADER_SIZE as usize];
    hdr[0..8].copy_from_slice(&MAGIC);
    hdr[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    hdr[16..24].copy_from_slice(&id.to_le_bytes());
    hdr[24..32].copy_from_slice(&geo.chunk_size.to_le_bytes());
    hdr[32..40].copy_from_slice(&geo.block_size.to_le_bytes());
    let sum = header_sum(&hdr);
    hdr[HDR_FIELDS_END..HDR_SUM_END].copy_from_slice(&sum);
    hdr
}

enum HeaderProblem {
    /// Not a chunk file of ours, or damaged: quarantine it.
    Bad(String),
    /// An intact header this store cannot use (other chunk or block size,
    /// newer format): a configuration or downgrade error, not damage.
    Mismatch(String),
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn decode_header(hdr: &[u8], id: ChunkId, geo: &Geometry) -> Result<(), HeaderProblem> {
    if hdr.len() != HEADER_SIZE as usize {
        return Err(HeaderProblem::Bad("short header".into()));
    }
    if hdr[0..8] != MAGIC {
        return Err(HeaderProblem::Bad("bad magic".into()));
    }
    if hdr[HDR_FIELDS_END..HDR_SUM_END] != header_sum(hdr) {
        return Err(HeaderProblem::Bad("header checksum mismatch".into()));
    }
    let hdr_id = le_u64(hdr, 16);
    if hdr_id != id {
        return Err(HeaderProblem::Bad(format!("header names chunk {}", Hex(hdr_id))));
    }
    // The checksum holds, so these fields are what a server wrote, not damage.
    let (format, flags) = (le_u32(hdr, 8), le_u32(hdr, 12));
    if format != FORMAT_VERSION || flags != 0 {
        return Err(HeaderProblem::Mismatch(format!("format version {format} flags {flags:#x}")));
    }
    let (chunk_size, block_size) = (le_u64(hdr, 24), le_u64(hdr, 32));
    if chunk_size != geo.chunk_size || block_size != geo.block_size {
        return Err(HeaderProblem::Mismatch(format!("chunk size {chunk_size} block size {block_size}")));
    }
    Ok(())
}

/// Maximal runs `[start, end)` of indexes in `0..n` where `pred` holds.
fn runs(n: usize, pred: impl Fn(usize) -> bool) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < n {
        if pred(i) {
            let start = i;
            while i < n && pred(i) {
                i += 1;
            }
            out.push((start, i));
        } else {
            i += 1;
        }
    }
    out
}

// ---------------------------------------------------------------------------
// OS helpers

fn retry_eintr(mut f: impl FnMut() -> libc::c_int) -> io::Result<()> {
    loop {
        if f() == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn fallocate(file: &File, mode: libc::c_int, off: u64, len: u64) -> io::Result<()> {
    let bad = || io::Error::from(io::ErrorKind::InvalidInput);
    let off = libc::off_t::try_from(off).map_err(|_| bad())?;
    let len = libc::off_t::try_from(len).map_err(|_| bad())?;
    // SAFETY: the descriptor is owned by `file`, which outlives the call; fallocate touches no memory of ours.
    retry_eintr(|| unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) })
}

/// Bytes of a chunk file's start worth writing for a table of `sums`: the
/// header and the table pages up to the last written block's entry. The
/// rest of the table stays a hole (every entry "never written").
fn head_len(sums: &[[u8; 32]]) -> usize {
    let used = sums.iter().rposition(|s| *s != ZERO_SUM).map_or(0, |i| (i + 1) * SUM_SIZE as usize);
    HEADER_SIZE as usize + used.div_ceil(ALIGN as usize) * ALIGN as usize
}

fn punch_hole(file: &File, off: u64, len: u64) -> io::Result<()> {
    fallocate(file, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, off, len)
}

fn is_unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS))
}

/// Copies `len` bytes at `off` of `src` to the same offset of `dst`, in the
/// kernel (`copy_file_range`: no copy through user space, and a shared
/// extent where the filesystem has reflinks), else through a buffer.
fn copy_range(src: &File, dst: &File, off: u64, len: u64) -> io::Result<()> {
    let bad = || io::Error::from(io::ErrorKind::InvalidInput);
    let (mut off_in, mut off_out) =
        (libc::loff_t::try_from(off).map_err(|_| bad())?, libc::loff_t::try_from(off).map_err(|_| bad())?);
    let mut left = len;
    while left > 0 {
        let want = usize::try_from(left).unwrap_or(usize::MAX).min(1 << 30);
        // SAFETY: both descriptors are owned by the `File`s, which outlive the call; the offsets
        // are valid, writable loff_t values the kernel advances.
        let n = unsafe { libc::copy_file_range(src.as_raw_fd(), &mut off_in, dst.as_raw_fd(), &mut off_out, want, 0) };
        if n > 0 {
            left -= n as u64;
            continue;
        }
        let e = io::Error::last_os_error();
        if n < 0 && e.kind() == io::ErrorKind::Interrupted {
            continue;
        }
        let unsupported =
            n == 0 || matches!(e.raw_os_error(), Some(libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP));
        if !unsupported {
            return Err(e);
        }
        // Not possible here: copy the rest through a buffer.
        let done = len - left;
        let mut buf = vec![0u8; (left.min(BATCH_BYTES)) as usize];
        let mut at = off + done;
        while at < off + len {
            let k = ((off + len - at) as usize).min(buf.len());
            src.read_exact_at(&mut buf[..k], at)?;
            dst.write_all_at(&buf[..k], at)?;
            at += k as u64;
        }
        return Ok(());
    }
    Ok(())
}

/// (total, available to unprivileged users) bytes of the filesystem holding `file`.
fn statvfs(file: &File) -> io::Result<(u64, u64)> {
    // SAFETY: statvfs is plain old data; all-zero is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: the descriptor is valid for the call and `st` is a valid, writable statvfs.
    retry_eintr(|| unsafe { libc::fstatvfs(file.as_raw_fd(), &mut st) })?;
    let frsize = st.f_frsize as u64;
    Ok((st.f_blocks as u64 * frsize, st.f_bavail as u64 * frsize))
}

fn flock_exclusive(file: &File) -> io::Result<()> {
    // SAFETY: the descriptor is valid for the call; flock touches no memory of ours.
    retry_eintr(|| unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) })
}

fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_err(format!("fsync directory {}", dir.display()), e))
}

/// Allocated bytes of a file in 512-byte sectors (what st_blocks counts).
fn sectors_of(file: &File) -> Option<u32> {
    file.metadata().ok().map(|m| u32::try_from(m.blocks()).unwrap_or(u32::MAX))
}

// Lock helpers: a panic elsewhere must not make the store unusable, and the
// data these locks guard stays consistent at every await-free step.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read_lock<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write_lock<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

fn wait<'a, T>(cv: &Condvar, g: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    cv.wait(g).unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------
// In-memory index

/// What the store remembers per chunk; kept small (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct IndexEntry {
    version: u64,
    /// This incarnation of the chunk's file, for the block cache (see
    /// [`super::cache`]): new at every creation, import and open.
    gen: u64,
    /// Allocated size of the file in 512-byte sectors, for `used_bytes`.
    sectors: u32,
    flags: u8,
}

#[derive(Default)]
struct Index {
    map: HashMap<ChunkId, IndexEntry>,
    used_sectors: u64,
}

impl Index {
    fn get(&self, id: ChunkId) -> Option<IndexEntry> {
        self.map.get(&id).copied()
    }

    fn insert(&mut self, id: ChunkId, entry: IndexEntry) {
        if let Some(old) = self.map.insert(id, entry) {
            self.used_sectors -= u64::from(old.sectors);
        }
        self.used_sectors += u64::from(entry.sectors);
    }

    fn remove(&mut self, id: ChunkId) -> Option<IndexEntry> {
        let old = self.map.remove(&id)?;
        self.used_sectors -= u64::from(old.sectors);
        Some(old)
    }

    /// Estimated heap bytes of the hash table: hashbrown allocates a power of
    /// two of buckets (usable to 7/8), each an entry plus one control byte.
    fn heap_bytes(&self) -> usize {
        let cap = self.map.capacity();
        if cap == 0 {
            return 0;
        }
        let buckets = (cap * 8 / 7).next_power_of_two();
        buckets * (std::mem::size_of::<(ChunkId, IndexEntry)>() + 1)
    }
}

// ---------------------------------------------------------------------------
// Per-chunk locks

/// Writers share it; `lock_exclusive` takes it alone. Waiting exclusive
/// lockers stop new writers so an export is not starved. Hand-made instead of
/// an `RwLock` because `ChunkGuard` must release it without borrowing a guard.
#[derive(Default)]
struct Gate {
    state: Mutex<GateState>,
    cv: Condvar,
}

#[derive(Default)]
struct GateState {
    shared: u32,
    exclusive: bool,
    exclusive_waiting: u32,
}

impl Gate {
    fn shared(&self) -> SharedGate<'_> {
        let mut s = lock(&self.state);
        while s.exclusive || s.exclusive_waiting > 0 {
            s = wait(&self.cv, s);
        }
        s.shared += 1;
        SharedGate(self)
    }

    fn lock_exclusive(&self) {
        let mut s = lock(&self.state);
        s.exclusive_waiting += 1;
        while s.exclusive || s.shared > 0 {
            s = wait(&self.cv, s);
        }
        s.exclusive_waiting -= 1;
        s.exclusive = true;
    }

    fn unlock_exclusive(&self) {
        lock(&self.state).exclusive = false;
        self.cv.notify_all();
    }
}

struct SharedGate<'a>(&'a Gate);

impl Drop for SharedGate<'_> {
    fn drop(&mut self) {
        let mut s = lock(&self.0.state);
        s.shared -= 1;
        if s.shared == 0 {
            self.0.cv.notify_all();
        }
    }
}

#[derive(Default)]
struct FlushState {
    /// fdatasyncs started / completed on this chunk (they run one at a time).
    started: u64,
    completed: u64,
    in_progress: bool,
    /// A sync failed; every later flush of this chunk fails too.
    failed: Option<io::ErrorKind>,
}

#[derive(Default)]
struct ChunkLocks {
    gate: Gate,
    io: RwLock<()>,
    flush: Mutex<FlushState>,
    flush_cv: Condvar,
}

/// Locks of the chunks in use; an entry lives while someone holds a `LockRef`.
#[derive(Default)]
struct LockTable {
    map: Mutex<HashMap<ChunkId, Arc<ChunkLocks>>>,
}

impl LockTable {
    fn get(&self, id: ChunkId) -> LockRef<'_> {
        let locks = lock(&self.map).entry(id).or_default().clone();
        LockRef { table: self, id, locks }
    }
}

struct LockRef<'a> {
    table: &'a LockTable,
    id: ChunkId,
    locks: Arc<ChunkLocks>,
}

impl std::ops::Deref for LockRef<'_> {
    type Target = ChunkLocks;
    fn deref(&self) -> &ChunkLocks {
        &self.locks
    }
}

impl Drop for LockRef<'_> {
    fn drop(&mut self) {
        let mut map = lock(&self.table.map);
        // Ours and the table's: nobody else can clone it without the map lock we hold.
        if Arc::strong_count(&self.locks) == 2 {
            map.remove(&self.id);
        }
    }
}

/// Held by the caller of [`ChunkStore::lock_exclusive`]: writes and zeroes
/// of that chunk wait until it is dropped. Reads and export go on.
pub struct ChunkGuard<'a> {
    locks: LockRef<'a>,
}

impl Drop for ChunkGuard<'_> {
    fn drop(&mut self) {
        self.locks.gate.unlock_exclusive();
    }
}

// ---------------------------------------------------------------------------
// Open chunk files

/// Data runs at least this long go around the page cache when they are
/// [`DIRECT_ALIGN`]ed (see [`ChunkFile`]).
pub const DIRECT_MIN_BYTES: usize = 64 << 10;
/// The alignment `O_DIRECT` needs of memory, offsets and lengths: the
/// largest logical block size of a disk (data blocks are multiples of it).
pub const DIRECT_ALIGN: usize = 4096;

/// An open chunk file (it derefs to the `File`), and a second descriptor
/// of the same file with `O_DIRECT`, opened when first needed.
///
/// Large writes (a client streaming an image) go through the second one:
/// the bytes go from the server's buffer to the disk with no copy into the
/// page cache and no later write-back, so a flush finds little left to
/// sync, and a chunk server's memory is its own block cache rather than
/// gigabytes of dirty pages. Large reads too (a sequential reader, a repair
/// copy): filling and evicting the page cache cost more kernel time than
/// the disk read itself. Small writes, short reads (hot 4 KiB blocks stay
/// in the page cache) and the checksum table stay buffered. Linux keeps the
/// two coherent: a direct write flushes and drops the cached pages of its
/// range, a direct read writes back the dirty ones first. Where a
/// filesystem refuses `O_DIRECT` (EINVAL), the I/O goes through the page
/// cache.
pub(crate) struct ChunkFile {
    file: File,
    direct: std::sync::OnceLock<Option<File>>,
    use_direct: bool,
}

impl std::ops::Deref for ChunkFile {
    type Target = File;
    fn deref(&self) -> &File {
        &self.file
    }
}

impl ChunkFile {
    fn new(file: File, use_direct: bool) -> Arc<ChunkFile> {
        Arc::new(ChunkFile { file, direct: std::sync::OnceLock::new(), use_direct })
    }

    /// Writes data blocks at `off`: a long run whose memory, offset and
    /// length are aligned around the page cache, the rest through it.
    fn write_data(&self, data: &[u8], off: u64) -> io::Result<()> {
        if let Some(direct) = self.direct_for(data, off) {
            match direct.write_all_at(data, off) {
                // Alignment this disk does not take: write it buffered.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                done => return done,
            }
        }
        self.file.write_all_at(data, off)
    }

    /// Reads data blocks at `off` into `buf`: a long run whose memory,
    /// offset and length are aligned from the disk straight into `buf`
    /// (`O_DIRECT`), the rest through the page cache. Buffered, a
    /// sequential reader's gigabyte cost the server 1.5 s of kernel time
    /// filling and evicting the page cache; direct, 0.06 s. Linux writes
    /// back dirty cached pages of the range before a direct read, so it
    /// sees every earlier write.
    fn read_data(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        if let Some(direct) = self.direct_for(buf, off) {
            match direct.read_exact_at(buf, off) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                done => return done,
            }
        }
        self.file.read_exact_at(buf, off)
    }

    /// The `O_DIRECT` descriptor, if `mem` at file offset `off` is a run
    /// long and aligned enough to go around the page cache.
    fn direct_for(&self, mem: &[u8], off: u64) -> Option<&File> {
        let aligned = mem.len() >= DIRECT_MIN_BYTES
            && (mem.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN)
            && mem.len().is_multiple_of(DIRECT_ALIGN)
            && off.is_multiple_of(DIRECT_ALIGN as u64);
        aligned.then(|| self.direct()).flatten()
    }

    fn direct(&self) -> Option<&File> {
        if !self.use_direct {
            return None;
        }
        self.direct
            .get_or_init(|| {
                // The descriptor's magic link names this very inode, whatever
                // the file is called now.
                use std::os::unix::fs::OpenOptionsExt;
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
                    .map_err(|e| debug!(error = %e, "no O_DIRECT descriptor; I/O stays buffered"))
                    .ok()
            })
            .as_ref()
    }
}

/// `n` zero bytes whose memory is [`DIRECT_ALIGN`]ed, to be filled and
/// written with `O_DIRECT`: a buffer a little larger, sliced.
pub fn aligned_buffer(n: usize) -> AlignedBuf {
    let mut v = Vec::with_capacity(n + DIRECT_ALIGN - 1);
    let skip = (DIRECT_ALIGN - v.as_ptr() as usize % DIRECT_ALIGN) % DIRECT_ALIGN;
    v.resize(skip, 0);
    AlignedBuf { v, skip }
}

/// `n` zero bytes, [`DIRECT_ALIGN`]ed, to be read into with `O_DIRECT`.
fn aligned_zeroed(n: usize) -> AlignedBuf {
    let mut b = aligned_buffer(n);
    b.v.resize(b.skip + n, 0);
    b
}

/// See [`aligned_buffer`]: bytes appended to it start aligned.
pub struct AlignedBuf {
    v: Vec<u8>,
    skip: usize,
}

impl AlignedBuf {
    pub fn len(&self) -> usize {
        self.v.len() - self.skip
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn extend_from_slice(&mut self, data: &[u8]) {
        // Within the capacity reserved: the memory never moves.
        debug_assert!(self.v.len() + data.len() <= self.v.capacity());
        self.v.extend_from_slice(data);
    }

    pub fn freeze(self) -> bytes::Bytes {
        bytes::Bytes::from(self.v).slice(self.skip..)
    }

    fn as_slice(&self) -> &[u8] {
        &self.v[self.skip..]
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.v[self.skip..]
    }
}

// ---------------------------------------------------------------------------
// Open file cache

/// LRU of open chunk files. Handles are `Arc`s so an eviction never closes a
/// file under an operation in flight. Keyed by id: a version change renames
/// the same inode; import and delete remove the entry under the io lock.
struct FileCache {
    cap: usize,
    tick: u64,
    map: HashMap<ChunkId, (Arc<ChunkFile>, u64)>,
    lru: BTreeMap<u64, ChunkId>,
}

impl FileCache {
    fn new(cap: usize) -> FileCache {
        FileCache { cap, tick: 0, map: HashMap::new(), lru: BTreeMap::new() }
    }

    fn get(&mut self, id: ChunkId) -> Option<Arc<ChunkFile>> {
        let (file, tick) = self.map.get_mut(&id)?;
        self.lru.remove(tick);
        self.tick += 1;
        *tick = self.tick;
        self.lru.insert(self.tick, id);
        Some(file.clone())
    }

    fn insert(&mut self, id: ChunkId, file: Arc<ChunkFile>) {
        self.remove(id);
        while self.map.len() >= self.cap {
            let Some((_, victim)) = self.lru.pop_first() else { break };
            self.map.remove(&victim);
        }
        self.tick += 1;
        self.map.insert(id, (file, self.tick));
        self.lru.insert(self.tick, id);
    }

    fn remove(&mut self, id: ChunkId) {
        if let Some((_, tick)) = self.map.remove(&id) {
            self.lru.remove(&tick);
        }
    }

    fn len(&self) -> usize {
        self.map.len()
    }
}

#[derive(Default)]
struct ScrubState {
    /// Sorted ids of the pass in progress; empty between passes.
    pass: Vec<ChunkId>,
    pos: usize,
    /// Next block of `pass[pos]` to verify.
    block: u64,
    active: bool,
}

/// Switches that let tests reach the OS error paths that the normal checks avoid.
#[cfg(test)]
#[derive(Default)]
struct TestKnobs {
    skip_space_check: std::sync::atomic::AtomicBool,
    skip_fallocate: std::sync::atomic::AtomicBool,
    /// The data write this many writes from now fails with EIO (0: none).
    fail_data_write: AtomicU64,
    /// Checksum table writes fail with EIO.
    fail_table_write: std::sync::atomic::AtomicBool,
}

/// Blocks further apart than this (in table entries) than the part before
/// them start a new [`TableWindow`]: reading the entries between costs less
/// than another pair of syscalls up to about 4 KiB of table.
const TABLE_WINDOW_GAP: u64 = 128;

/// A stretch of a chunk's checksum table read once for several parts of a
/// write: what it held (`old`), what the parts made of it (`sums`), and
/// the entries changed.
struct TableWindow {
    b0: u64,
    old: Vec<[u8; 32]>,
    sums: Vec<[u8; 32]>,
    dirty: Option<(usize, usize)>,
    /// The chunk's generation in the block cache (see `super::cache`).
    gen: Option<u64>,
}

impl TableWindow {
    fn new(b0: u64, sums: Vec<[u8; 32]>, gen: Option<u64>) -> TableWindow {
        TableWindow { b0, old: sums.clone(), sums, dirty: None, gen }
    }

    fn covers(&self, b0: u64, b1: u64) -> bool {
        b0 >= self.b0 && b1 <= self.b0 + self.sums.len() as u64
    }

    fn get(&self, b0: u64, n: usize) -> &[[u8; 32]] {
        let i = (b0 - self.b0) as usize;
        &self.sums[i..i + n]
    }

    fn set(&mut self, b0: u64, new: &[[u8; 32]]) {
        let i = (b0 - self.b0) as usize;
        let j = i + new.len();
        let changed = self.sums[i..j] != *new;
        self.sums[i..j].copy_from_slice(new);
        if changed {
            self.dirty = Some(self.dirty.map_or((i, j), |(lo, hi)| (lo.min(i), hi.max(j))));
        }
    }
}

#[derive(Clone, Copy)]
enum Src<'a> {
    Data(&'a [u8]),
    /// Whole blocks of data with their sums, made by the writer.
    Summed(&'a [u8], &'a [[u8; 32]]),
    Zeros,
}

enum FileCheck {
    Good { sectors: u32 },
    Bad(String),
}

enum ScrubStep {
    Continue(u64),
    ChunkDone,
}

// ---------------------------------------------------------------------------
// The store

/// The chunk replicas of one directory. `Send + Sync`; share it by reference or `Arc`.
pub struct ChunkStore {
    dir: PathBuf,
    opts: StoreOptions,
    geo: Geometry,
    /// The store directory, for fstatvfs.
    root: File,
    /// Holds the flock that keeps a second store (or process) off the directory.
    _lock_file: File,
    index: RwLock<Index>,
    locks: LockTable,
    files: Mutex<FileCache>,
    /// [`StoreOptions::direct_io`].
    direct_io: bool,
    scrub_state: Mutex<ScrubState>,
    /// One block of zeros, to recognise all-zero blocks.
    zero_block: Vec<u8>,
    /// Makes temp and quarantine names unique.
    seq: AtomicU64,
    flush_syncs: AtomicU64,
    /// Makes version changes durable (see [`super::versions`]).
    journal: Journal,
    /// Chunks whose version a fence raised in the index only: each with the
    /// version its file is still named with. [`settle_names`](Self::settle_names)
    /// renames them later, off the fence's path (see [`set_versions`](Self::set_versions)).
    lagging: Mutex<HashMap<ChunkId, u64>>,
    /// Verified blocks for reads.
    cache: BlockCache,
    /// The next [`IndexEntry::gen`].
    next_gen: AtomicU64,
    /// Chunks whose replica was quarantined (from `quarantine/` at open,
    /// and since): a read of one not held again is `Quarantined`, not
    /// `NotFound`. Forgotten when the chunk is deleted.
    quarantined: Mutex<std::collections::HashSet<ChunkId>>,
    #[cfg(test)]
    knobs: TestKnobs,
}

impl ChunkStore {
    /// Opens (creating if needed) the store in `dir` and indexes its chunk
    /// files. Misnamed files and files with a bad header are quarantined;
    /// older versions of a chunk are deleted; leftovers in `tmp/` are removed.
    /// Fails if another store holds the directory or a chunk file has a
    /// different chunk or block size than `opts`.
    pub fn open(dir: &Path, opts: StoreOptions) -> Result<ChunkStore> {
        let geo = Geometry::new(opts.chunk_size, opts.block_size).map_err(ChunkStoreError::BadInput)?;
        let cache = BlockCache::new(opts.cache_bytes, geo.bs());
        if opts.max_open_files == 0 {
            return Err(ChunkStoreError::BadInput("max_open_files must be at least 1".into()));
        }
        for sub in [CHUNKS_DIR, TMP_DIR, QUARANTINE_DIR] {
            let p = dir.join(sub);
            fs::create_dir_all(&p).map_err(|e| io_err(format!("create {}", p.display()), e))?;
        }
        let lock_path = dir.join(LOCK_FILE);
        let lock_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|e| io_err(format!("open {}", lock_path.display()), e))?;
        flock_exclusive(&lock_file).map_err(|e| io_err(format!("lock {} (store in use?)", dir.display()), e))?;
        let root = File::open(dir).map_err(|e| io_err(format!("open {}", dir.display()), e))?;
        let journal_path = dir.join(JOURNAL_FILE);
        let (journal, replay) =
            Journal::open(&journal_path).map_err(|e| io_err(format!("open {}", journal_path.display()), e))?;
        // The journal's own name must survive a crash.
        root.sync_all().map_err(|e| io_err(format!("fsync directory {}", dir.display()), e))?;
        let store = ChunkStore {
            dir: dir.to_path_buf(),
            zero_block: vec![0; geo.bs()],
            files: Mutex::new(FileCache::new(opts.max_open_files)),
            direct_io: opts.direct_io,
            opts,
            geo,
            root,
            _lock_file: lock_file,
            index: RwLock::new(Index::default()),
            locks: LockTable::default(),
            scrub_state: Mutex::new(ScrubState::default()),
            seq: AtomicU64::new(0),
            flush_syncs: AtomicU64::new(0),
            journal,
            lagging: Mutex::default(),
            cache,
            next_gen: AtomicU64::new(1),
            quarantined: Mutex::new(quarantined_ids(&dir.join(QUARANTINE_DIR))),
            #[cfg(test)]
            knobs: TestKnobs::default(),
        };
        store.clean_tmp()?;
        store.create_subdirs()?;
        store.scan()?;
        store.replay_journal(&replay)?;
        info!(dir = %dir.display(), chunks = store.len(), used_bytes = store.used_bytes(), "chunk store open");
        Ok(store)
    }

    pub fn chunk_size(&self) -> u64 {
        self.geo.chunk_size
    }

    pub fn block_size(&self) -> u64 {
        self.geo.block_size
    }

    /// Every chunk and its version, in no particular order.
    pub fn list(&self) -> Vec<(ChunkId, u64)> {
        read_lock(&self.index).map.iter().map(|(&id, e)| (id, e.version)).collect()
    }

    pub fn len(&self) -> usize {
        read_lock(&self.index).map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn version(&self, id: ChunkId) -> Option<u64> {
        self.entry(id).map(|e| e.version)
    }

    /// Reads `len` bytes at `offset` of chunk `id`, which must be at exactly
    /// `version`. Never-written ranges read as zeros. Every touched block is
    /// verified; a mismatch or a media error is `Corrupt` with its block.
    pub fn read(&self, id: ChunkId, version: u64, offset: u64, len: u64) -> Result<Bytes> {
        // A read that may wait never declines; were it to, say so rather
        // than answer with no bytes.
        self.read_with(id, version, offset, len, Wait::Yes)?
            .ok_or_else(|| io_err(format!("read of chunk {}", Hex(id)), io::ErrorKind::WouldBlock.into()))
    }

    /// [`read`](Self::read) if it can be done without waiting: the chunk's
    /// lock free, its file open and every byte in the page cache
    /// (`preadv2` with `RWF_NOWAIT`). `Ok(None)` when it would wait; the
    /// caller then reads on a blocking thread. Lets an async server answer
    /// cached reads inline, without a hand-off to another thread and back.
    pub fn try_read_cached(&self, id: ChunkId, version: u64, offset: u64, len: u64) -> Result<Option<Bytes>> {
        self.read_with(id, version, offset, len, Wait::No)
    }

    /// The body of both reads; `None` only with [`Wait::No`], where it
    /// would have waited.
    fn read_with(&self, id: ChunkId, version: u64, offset: u64, len: u64, wait: Wait) -> Result<Option<Bytes>> {
        self.check_range(offset, len)?;
        let locks = self.locks.get(id);
        let _io = match wait {
            Wait::Yes => read_lock(&locks.io),
            Wait::No => match locks.io.try_read() {
                Ok(g) => g,
                Err(_) => return Ok(None),
            },
        };
        let entry = self.checked_entry(id, version)?;
        if len == 0 {
            return Ok(Some(Bytes::new()));
        }
        let (b0, b1) = self.geo.blocks(offset, len);
        let head = (offset - b0 * self.geo.block_size) as usize;
        if let Some(hit) = self.cache.read(entry.gen, b0, head, len as usize) {
            return Ok(Some(Bytes::from(hit)));
        }
        let file = match wait {
            Wait::Yes => self.file(id, version)?,
            Wait::No => match lock(&self.files).get(id) {
                Some(f) => f,
                None => return Ok(None),
            },
        };
        let n = (b1 - b0) as usize;
        let mut sums = vec![ZERO_SUM; n];
        let mut buf = aligned_zeroed(n * self.geo.bs());
        if !self.fill_table(&file, id, b0, &mut sums, wait)?
            || !self.fill_verified(&file, id, b0, &sums, buf.as_mut_slice(), wait)?
        {
            return Ok(None);
        }
        self.cache.fill(entry.gen, b0, buf.as_slice(), |i| sums[i] != ZERO_SUM);
        Ok(Some(buf.freeze().slice(head..head + len as usize)))
    }

    /// Writes `data` at `offset` of chunk `id` at exactly `version`. With
    /// `create`, a missing chunk is created at `version` first. Not durable
    /// until [`flush`](Self::flush).
    pub fn write(&self, id: ChunkId, version: u64, offset: u64, data: &[u8], create: bool) -> Result<()> {
        let missing = if create { Missing::Create } else { Missing::Fail };
        self.modify(id, version, offset, data.len() as u64, Src::Data(data), missing)
    }

    /// [`write`](Self::write), saying what to do if the chunk is missing.
    /// With [`Missing::CopyFrom`] the chunk is first made a copy of the
    /// local replica of its origin: the origin's written blocks are copied
    /// in the kernel, read back and checked against the origin's
    /// checksums, given checksums bound to the new id, and the file is
    /// synced and renamed in before the write applies, so the copy is
    /// never torn and survives a crash. An origin that is missing or at
    /// another version fails the write (`NotFound`, `VersionMismatch`); a
    /// block failing its check is `Corrupt` (naming the origin). The copy
    /// must have a larger id than its origin (it was allocated later),
    /// which orders the two chunks' locks.
    pub fn write_with(&self, id: ChunkId, version: u64, offset: u64, data: &[u8], missing: Missing) -> Result<()> {
        self.modify(id, version, offset, data.len() as u64, Src::Data(data), missing)
    }

    /// [`write_with`](Self::write_with) of several extents (`(offset,
    /// len)`, in offset order, not overlapping) whose bytes follow one
    /// another in the pieces of `data`, under one hold of the chunk's lock
    /// and with their checksum entries read and written together where
    /// they are near.
    /// After a failed data write the extents before it stay written; after
    /// a failed checksum-table write each block touched holds its old or
    /// its new content, with a matching entry, as after a failed single
    /// write.
    pub fn write_extents<D: AsRef<[u8]>>(
        &self,
        id: ChunkId,
        version: u64,
        extents: &[(u64, u64)],
        data: &[D],
        sums: Option<&[[u8; 32]]>,
        missing: Missing,
    ) -> Result<()> {
        let total: u64 = extents.iter().map(|e| e.1).sum();
        let have: usize = data.iter().map(|d| d.as_ref().len()).sum();
        if total != have as u64 {
            return Err(ChunkStoreError::BadInput(format!("extents of {total} bytes, {have} bytes of data")));
        }
        let bsz = self.geo.block_size;
        if let Some(sums) = sums {
            match whole_blocks(extents, bsz) {
                None => return Err(ChunkStoreError::BadInput("block sums for extents not of whole blocks".into())),
                Some(blocks) if blocks != sums.len() as u64 => {
                    return Err(ChunkStoreError::BadInput(format!("{} block sums for {blocks} blocks", sums.len())))
                }
                Some(_) => {}
            }
        }
        if extents.windows(2).any(|w| w[0].0.saturating_add(w[0].1) > w[1].0) {
            return Err(ChunkStoreError::BadInput("extents overlap or are out of order".into()));
        }
        // `data` is the extents' bytes one after the other, in pieces as
        // they arrived: an extent inside one piece is a slice of it, one
        // across pieces is copied.
        enum At {
            Piece(usize, usize),
            Copied(usize),
        }
        let mut copies: Vec<Vec<u8>> = Vec::new();
        let mut places = Vec::with_capacity(extents.len());
        let (mut piece, mut at) = (0usize, 0usize);
        for &(_, len) in extents {
            let len = len as usize;
            while piece < data.len() && at == data[piece].as_ref().len() {
                (piece, at) = (piece + 1, 0);
            }
            if piece < data.len() && data[piece].as_ref().len() - at >= len {
                places.push(At::Piece(piece, at));
                at += len;
                continue;
            }
            let mut copy = Vec::with_capacity(len);
            while copy.len() < len {
                let d = data[piece].as_ref();
                let take = (len - copy.len()).min(d.len() - at);
                copy.extend_from_slice(&d[at..at + take]);
                at += take;
                if at == d.len() {
                    (piece, at) = (piece + 1, 0);
                }
            }
            places.push(At::Copied(copies.len()));
            copies.push(copy);
        }
        let mut first_sum = 0usize;
        let parts: Vec<(u64, u64, Src<'_>)> = extents
            .iter()
            .zip(&places)
            .map(|(&(offset, len), place)| {
                let bytes = match *place {
                    At::Piece(i, at) => &data[i].as_ref()[at..at + len as usize],
                    At::Copied(i) => &copies[i][..],
                };
                let src = match sums {
                    Some(sums) => {
                        let n = (len / bsz) as usize;
                        first_sum += n;
                        Src::Summed(bytes, &sums[first_sum - n..first_sum])
                    }
                    None => Src::Data(bytes),
                };
                (offset, len, src)
            })
            .collect();
        self.modify_many(id, version, &parts, missing)
    }

    /// Makes a range read as zeros. Whole blocks become never-written and
    /// their space is freed; partial blocks are rewritten.
    pub fn zero(&self, id: ChunkId, version: u64, offset: u64, len: u64) -> Result<()> {
        self.modify(id, version, offset, len, Src::Zeros, Missing::Fail)
    }

    /// [`zero`](Self::zero) with [`Missing`] as for [`write_with`](Self::write_with).
    pub fn zero_with(&self, id: ChunkId, version: u64, offset: u64, len: u64, missing: Missing) -> Result<()> {
        self.modify(id, version, offset, len, Src::Zeros, missing)
    }

    /// Makes every completed write to these chunks durable. Concurrent
    /// flushes of one chunk share fdatasyncs (group commit), and a chunk not
    /// written since its last sync costs nothing. All ids are flushed; the
    /// first error is returned. A failed fdatasync quarantines the replica.
    pub fn flush(&self, ids: &[ChunkId]) -> Result<()> {
        let mut first_err = None;
        for &id in ids {
            if let Err(e) = self.flush_one(id) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Changes the version of chunk `id` from `from` to `to` atomically and
    /// durably (rename, then a record in the version journal). Succeeds if
    /// it is already at `to` (and then journals it again, so a retry after an
    /// error is durable); `VersionMismatch` if it is at neither.
    pub fn set_version(&self, id: ChunkId, from: u64, to: u64) -> Result<()> {
        match self.change_version(id, from, to, false)? {
            Some(change) => self.journal_changes(&[change], true),
            // At `to` already, maybe by a change not yet durable (a fence, or
            // a first try whose sync failed): make it durable now.
            None => {
                let named = self.named_version(id, to);
                if named != to {
                    self.journal_changes(&[Change { chunk: id, from: named, to }], true)
                } else {
                    fsync_dir(&self.chunk_dir(id))
                }
            }
        }
    }

    /// Many [`set_version`](Self::set_version)s: every change first, then
    /// one journal append for them all, and with `durable` one fdatasync (a
    /// clone's fences would cost one sync, not one per chunk directory).
    ///
    /// Without `durable` the changes are fences: the index moves at once (a
    /// write or read at the old version is refused from then on) but the
    /// files keep their names until [`settle_names`](Self::settle_names)
    /// renames them, so a clone of a written image does not wait for one
    /// rename per chunk. A crash may undo them (the chunks come back at
    /// their old versions): for a caller that will be told again, as a
    /// chunk server is by the answer to its first report. One result per
    /// change, in order.
    pub fn set_versions(&self, changes: &[(ChunkId, u64, u64)], durable: bool) -> Vec<Result<()>> {
        let mut results = Vec::with_capacity(changes.len());
        let mut done = Vec::with_capacity(changes.len());
        for &(id, from, to) in changes {
            let r = self.change_version(id, from, to, !durable).map(|change| {
                if let Some(c) = change {
                    done.push((results.len(), c));
                }
            });
            results.push(r);
        }
        let journaled: Vec<Change> = done.iter().map(|(_, c)| *c).collect();
        if let Err(e) = self.journal_changes(&journaled, durable) {
            let kind = match &e {
                ChunkStoreError::Io { source, .. } => source.kind(),
                _ => io::ErrorKind::Other,
            };
            for (i, _) in done {
                results[i] = Err(ChunkStoreError::Io {
                    context: "version journal".into(),
                    source: io::Error::new(kind, e.to_string()),
                });
            }
        }
        results
    }

    /// Renames the files of the chunks a fence moved (see
    /// [`set_versions`](Self::set_versions)) to their versions. Not synced:
    /// their journal records stay until a compaction syncs the directories.
    /// Returns how many it renamed; a failed rename is logged and tried
    /// again next time.
    pub fn settle_names(&self) -> usize {
        let ids: Vec<ChunkId> = lock(&self.lagging).keys().copied().collect();
        let mut renamed = 0;
        for id in ids {
            let locks = self.locks.get(id);
            let _io = write_lock(&locks.io);
            let Some(named) = lock(&self.lagging).get(&id).copied() else { continue };
            let Some(entry) = self.entry(id) else {
                lock(&self.lagging).remove(&id);
                continue;
            };
            match self.rename_file(id, named, entry.version) {
                Ok(()) => renamed += 1,
                Err(e) => warn!(chunk = %Hex(id), error = %e, "cannot rename a fenced chunk"),
            }
        }
        renamed
    }

    /// Chunks whose file name lags their version.
    pub fn lagging_names(&self) -> usize {
        lock(&self.lagging).len()
    }

    /// Appends `changes` (renamed already) to the version journal, synced
    /// if `durable`.
    fn journal_changes(&self, changes: &[Change], durable: bool) -> Result<()> {
        self.journal
            .append_with(changes, durable, |dirs| {
                // A compaction drops the records: every name must be right first.
                self.settle_names();
                let lagging = self.lagging_names();
                if lagging > 0 {
                    return Err(io::Error::other(format!(
                        "{lagging} fenced chunk files could not be renamed; their journal records are kept"
                    )));
                }
                self.sync_chunk_dirs(dirs)
            })
            .map_err(|e| io_err(format!("append to {}", self.journal.path().display()), e))
    }

    /// Fsyncs the chunk directories named by their byte, several at once: the
    /// filesystem commits concurrent ones together.
    fn sync_chunk_dirs(&self, dirs: &BTreeSet<u8>) -> io::Result<()> {
        let dirs: Vec<PathBuf> = dirs.iter().map(|b| self.chunk_dir(u64::from(*b))).collect();
        let workers = dirs.len().clamp(1, SYNC_THREADS);
        let next = AtomicU64::new(0);
        let failed: Mutex<Option<io::Error>> = Mutex::default();
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(|| loop {
                    let k = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some(dir) = dirs.get(k) else { return };
                    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
                        let e = io::Error::new(e.kind(), format!("fsync directory {}: {e}", dir.display()));
                        lock(&failed).get_or_insert(e);
                    }
                });
            }
        });
        failed.into_inner().unwrap_or_else(|p| p.into_inner()).map_or(Ok(()), Err)
    }

    /// Finishes the version changes a crash may have left half done (see
    /// [`super::versions`]): a chunk still at the `from` of its last journaled
    /// change is renamed to its `to`; then every directory the journal names
    /// is synced and the journal emptied.
    fn replay_journal(&self, changes: &[Change]) -> Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut redone = 0;
        for c in versions::last_per_chunk(changes).into_values() {
            if c.from != c.to && self.version(c.chunk) == Some(c.from) {
                self.change_version(c.chunk, c.from, c.to, false)?;
                redone += 1;
            }
        }
        info!(records = changes.len(), redone, "version journal replayed");
        self.journal
            .compact(|dirs| self.sync_chunk_dirs(dirs))
            .map_err(|e| io_err(format!("compact {}", self.journal.path().display()), e))
    }

    /// The version change of [`set_version`](Self::set_version), without
    /// the journal record: returns that record (the file's name before and
    /// the new version), or `None` if the chunk is at `to` already. With
    /// `lazy` only the index moves and the file keeps its name (recorded in
    /// `lagging`); otherwise the file is renamed.
    fn change_version(&self, id: ChunkId, from: u64, to: u64, lazy: bool) -> Result<Option<Change>> {
        let locks = self.locks.get(id);
        let _io = write_lock(&locks.io);
        let entry = self.entry(id).ok_or(ChunkStoreError::NotFound(id))?;
        if entry.version == to {
            return Ok(None);
        }
        if entry.version != from {
            return Err(ChunkStoreError::VersionMismatch { id, have: entry.version, want: from });
        }
        let named = self.named_version(id, from);
        // Only a raise is left lazy: a file's name is then never above its
        // version, so no install or creation can take the name it still has.
        if lazy && to > named {
            lock(&self.lagging).insert(id, named);
        } else {
            self.rename_file(id, named, to)?;
        }
        write_lock(&self.index).insert(id, IndexEntry { version: to, ..entry });
        debug!(chunk = %Hex(id), from, to, lazy, "version changed");
        Ok(Some(Change { chunk: id, from: named, to }))
    }

    /// Renames chunk `id`'s file from version `named` to `to`, which is
    /// then its name: nothing lags any more. Call with its io lock held
    /// exclusively.
    fn rename_file(&self, id: ChunkId, named: u64, to: u64) -> Result<()> {
        let (old, new) = (self.chunk_path(id, named), self.chunk_path(id, to));
        fs::rename(&old, &new).map_err(|e| io_err(format!("rename {}", old.display()), e))?;
        self.forget_name(id);
        Ok(())
    }

    /// The version chunk `id`'s file is named with, for a chunk the index
    /// has at `version`: the same unless a fence's rename is still to do.
    fn named_version(&self, id: ChunkId, version: u64) -> u64 {
        lock(&self.lagging).get(&id).copied().unwrap_or(version)
    }

    /// The file of chunk `id`, listed at `version`.
    fn file_path(&self, id: ChunkId, version: u64) -> PathBuf {
        self.chunk_path(id, self.named_version(id, version))
    }

    /// Forgets chunk `id`'s lagging name, once its file is gone or replaced.
    fn forget_name(&self, id: ChunkId) {
        lock(&self.lagging).remove(&id);
    }

    /// Deletes chunk `id`; a missing chunk is not an error.
    pub fn delete(&self, id: ChunkId) -> Result<()> {
        let locks = self.locks.get(id);
        let _io = write_lock(&locks.io);
        // The chunk is gone from the file system's view: no longer "lost
        // here" either.
        lock(&self.quarantined).remove(&id);
        let Some(entry) = self.entry(id) else { return Ok(()) };
        lock(&self.files).remove(id);
        let path = self.file_path(id, entry.version);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => warn!(chunk = %Hex(id), "chunk file already gone"),
            Err(e) => return Err(io_err(format!("delete {}", path.display()), e)),
        }
        self.forget_name(id);
        write_lock(&self.index).remove(id);
        debug!(chunk = %Hex(id), version = entry.version, "chunk deleted");
        Ok(())
    }

    /// Builds a complete replica of chunk `id` at `version` from a stream
    /// made by [`export`](Self::export), verifying every block, in a temp
    /// file that is fdatasynced and renamed into place. An older local version
    /// is replaced; the same version is `Exists`, a newer one `VersionMismatch`.
    /// A damaged stream is `BadInput` and changes nothing. Reads exactly the
    /// stream's bytes and never past its end; pass a buffered reader.
    pub fn import(&self, id: ChunkId, version: u64, src: &mut dyn Read) -> Result<()> {
        self.check_can_install(id, version)?;
        let tmp = self.tmp_path(id, version);
        let result = self.import_to(id, version, src, &tmp).and_then(|file| self.install(id, version, &tmp, file));
        match result {
            Ok(()) => drop(lock(&self.quarantined).remove(&id)),
            Err(_) => drop(fs::remove_file(&tmp)),
        }
        result
    }

    /// Streams chunk `id` at `version` in the export format, verifying every
    /// block it reads. Returns the number of bytes written to `out`. Hold
    /// [`lock_exclusive`](Self::lock_exclusive) meanwhile if no write may slip past the copy.
    pub fn export(&self, id: ChunkId, version: u64, out: &mut dyn Write) -> Result<u64> {
        {
            let locks = self.locks.get(id);
            let _io = read_lock(&locks.io);
            self.checked_entry(id, version)?;
        }
        let g = self.geo;
        let mut header = [0u8; EXPORT_HEADER_LEN];
        header[0..8].copy_from_slice(&EXPORT_MAGIC);
        header[8..12].copy_from_slice(&EXPORT_FORMAT.to_le_bytes());
        header[16..24].copy_from_slice(&id.to_le_bytes());
        header[24..32].copy_from_slice(&version.to_le_bytes());
        header[32..40].copy_from_slice(&g.chunk_size.to_le_bytes());
        header[40..48].copy_from_slice(&g.block_size.to_le_bytes());
        let mut structure = blake3::Hasher::new();
        structure.update(&header);

        let mut out = io::BufWriter::with_capacity(EXPORT_BUFFER_BYTES, out);
        let mut written = 0u64;
        let mut emit = |out: &mut io::BufWriter<&mut dyn Write>, bytes: &[u8]| -> Result<()> {
            out.write_all(bytes).map_err(|e| io_err("write export stream", e))?;
            written += bytes.len() as u64;
            Ok(())
        };
        emit(&mut out, &header)?;
        let per_batch = (BATCH_BYTES / g.block_size).max(1);
        let bs = g.bs();
        // Aligned: whole runs of written blocks go around the page cache.
        let mut buf = aligned_zeroed(per_batch as usize * bs);
        let buf = buf.as_mut_slice();
        let mut b = 0;
        while b < g.n_blocks {
            let n = per_batch.min(g.n_blocks - b) as usize;
            let sums = {
                let locks = self.locks.get(id);
                let _io = read_lock(&locks.io);
                self.checked_entry(id, version)?;
                let file = self.file(id, version)?;
                let sums = self.read_table(&file, id, b, n)?;
                self.read_verified(&file, id, b, &sums, &mut buf[..n * bs])?;
                sums
            };
            for (i, sum) in sums.iter().enumerate() {
                if *sum == ZERO_SUM {
                    emit(&mut out, &[TAG_HOLE])?;
                    structure.update(&[TAG_HOLE]);
                } else {
                    emit(&mut out, &[TAG_DATA])?;
                    emit(&mut out, &buf[i * bs..(i + 1) * bs])?;
                    emit(&mut out, sum)?;
                    structure.update(&[TAG_DATA]);
                    structure.update(sum);
                }
            }
            b += n as u64;
        }
        emit(&mut out, &[TAG_END])?;
        emit(&mut out, structure.finalize().as_bytes())?;
        out.flush().map_err(|e| io_err("write export stream", e))?;
        Ok(written)
    }

    /// Blocks writes and zeroes of chunk `id` until the guard is dropped
    /// (waiting for those in flight). The chunk need not exist. Do not write
    /// to the chunk from the thread holding the guard.
    pub fn lock_exclusive(&self, id: ChunkId) -> ChunkGuard<'_> {
        let locks = self.locks.get(id);
        locks.gate.lock_exclusive();
        ChunkGuard { locks }
    }

    /// Verifies up to about `budget_bytes` (at least one block), continuing
    /// the round-robin pass where the previous call stopped. Corrupt replicas
    /// are quarantined and reported. Chunks created during a pass are
    /// verified in the next one.
    pub fn scrub(&self, budget_bytes: u64) -> ScrubReport {
        let mut st = lock(&self.scrub_state);
        let mut report = ScrubReport::default();
        if !st.active {
            let mut ids: Vec<ChunkId> = read_lock(&self.index).map.keys().copied().collect();
            ids.sort_unstable();
            *st = ScrubState { pass: ids, pos: 0, block: 0, active: true };
        }
        let mut budget = budget_bytes.max(1);
        loop {
            let Some(&id) = st.pass.get(st.pos) else {
                report.pass_completed = true;
                *st = ScrubState::default();
                break;
            };
            if budget == 0 {
                break;
            }
            match self.scrub_step(id, st.block, &mut budget, &mut report) {
                ScrubStep::Continue(next) => st.block = next,
                ScrubStep::ChunkDone => {
                    st.pos += 1;
                    st.block = 0;
                }
            }
        }
        report
    }

    /// Moves the replica of chunk `id` into `quarantine/` (another replica
    /// proved it bad). `NotFound` if it is not here (e.g. scrub got there first).
    pub fn quarantine(&self, id: ChunkId) -> Result<()> {
        let locks = self.locks.get(id);
        let _io = write_lock(&locks.io);
        let entry = self.entry(id).ok_or(ChunkStoreError::NotFound(id))?;
        self.quarantine_locked(id, entry, "requested by caller")
    }

    /// Disk space taken by the chunk files (allocated blocks, not file
    /// lengths); quarantined files are not counted.
    pub fn used_bytes(&self) -> u64 {
        read_lock(&self.index).used_sectors * 512
    }

    /// (total, available) bytes of the filesystem holding the store.
    pub fn fs_stats(&self) -> Result<(u64, u64)> {
        statvfs(&self.root).map_err(|e| io_err("statvfs store directory", e))
    }

    /// fdatasyncs issued by `flush` since open (for tests and metrics).
    pub fn flush_syncs(&self) -> u64 {
        self.flush_syncs.load(Ordering::Relaxed)
    }

    /// Estimated heap bytes of the in-memory index (for metrics).
    pub fn index_heap_bytes(&self) -> usize {
        read_lock(&self.index).heap_bytes()
    }

    /// Chunk files held open by the cache (at most `max_open_files`).
    pub fn open_files(&self) -> usize {
        lock(&self.files).len()
    }
}

// Internals: paths, index and file access.
impl ChunkStore {
    fn chunk_dir(&self, id: ChunkId) -> PathBuf {
        self.dir.join(CHUNKS_DIR).join(format!("{:02x}", id & 0xff))
    }

    fn chunk_path(&self, id: ChunkId, version: u64) -> PathBuf {
        self.chunk_dir(id).join(chunk_file_name(id, version))
    }

    fn tmp_path(&self, id: ChunkId, version: u64) -> PathBuf {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        self.dir.join(TMP_DIR).join(format!("{}.{n}", chunk_file_name(id, version)))
    }

    fn quarantine_path(&self, name: &str) -> PathBuf {
        let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        self.dir.join(QUARANTINE_DIR).join(format!("{name}.{secs}.{n}"))
    }

    fn entry(&self, id: ChunkId) -> Option<IndexEntry> {
        read_lock(&self.index).get(id)
    }

    /// The index entry of a chunk file just made, imported or found at
    /// open: a new generation, so the block cache holds nothing of it.
    fn new_entry(&self, version: u64, sectors: u32) -> IndexEntry {
        IndexEntry { version, gen: self.next_gen.fetch_add(1, Ordering::Relaxed), sectors, flags: 0 }
    }

    /// Hits and misses of the block cache, and the bytes it holds.
    pub fn cache_stats(&self) -> CacheStats {
        self.cache.stats()
    }

    fn checked_entry(&self, id: ChunkId, version: u64) -> Result<IndexEntry> {
        match self.entry(id) {
            None if lock(&self.quarantined).contains(&id) => Err(ChunkStoreError::Quarantined(id)),
            None => Err(ChunkStoreError::NotFound(id)),
            Some(e) if e.version != version => {
                Err(ChunkStoreError::VersionMismatch { id, have: e.version, want: version })
            }
            Some(e) => Ok(e),
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.geo.chunk_size => Ok(()),
            _ => Err(ChunkStoreError::OutOfRange { offset, len, chunk_size: self.geo.chunk_size }),
        }
    }

    /// The open file of a chunk known to be at `version`. Call with its io lock held.
    fn file(&self, id: ChunkId, version: u64) -> Result<Arc<ChunkFile>> {
        if let Some(f) = lock(&self.files).get(id) {
            return Ok(f);
        }
        let path = self.file_path(id, version);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| io_err(format!("open {}", path.display()), e))?;
        let file = ChunkFile::new(file, self.direct_io);
        lock(&self.files).insert(id, file.clone());
        Ok(file)
    }

    fn read_table(&self, file: &File, id: ChunkId, b0: u64, n: usize) -> Result<Vec<[u8; 32]>> {
        let mut sums = vec![ZERO_SUM; n];
        self.fill_table(file, id, b0, &mut sums, Wait::Yes)?;
        Ok(sums)
    }

    /// Fills `sums` with the table entries of blocks `b0..`; false if that
    /// would have waited (only with [`Wait::No`]).
    fn fill_table(&self, file: &File, id: ChunkId, b0: u64, sums: &mut [[u8; 32]], wait: Wait) -> Result<bool> {
        pread(file, sums.as_flattened_mut(), Geometry::sum_off(b0), wait)
            .map_err(|e| read_error(id, b0, "read checksum table", e))
    }

    /// Fills `buf` with blocks `b0..` whose table entries are `sums`,
    /// verifying each written block and zero-filling the others.
    fn read_verified(&self, file: &ChunkFile, id: ChunkId, b0: u64, sums: &[[u8; 32]], buf: &mut [u8]) -> Result<()> {
        self.fill_verified(file, id, b0, sums, buf, Wait::Yes).map(|_| ())
    }

    /// [`read_verified`](Self::read_verified); false if the data would have
    /// had to wait for the disk (only with [`Wait::No`]; nothing verified).
    fn fill_verified(
        &self,
        file: &ChunkFile,
        id: ChunkId,
        b0: u64,
        sums: &[[u8; 32]],
        buf: &mut [u8],
        wait: Wait,
    ) -> Result<bool> {
        let bs = self.geo.bs();
        for (s, e) in runs(sums.len(), |i| sums[i] != ZERO_SUM) {
            let block = b0 + s as u64;
            let (run, off) = (&mut buf[s * bs..e * bs], self.geo.block_off(block));
            let done = match wait {
                Wait::Yes => file.read_data(run, off).map(|()| true),
                Wait::No => pread(file, run, off, wait),
            }
            .map_err(|err| read_error(id, block, "read chunk data", err))?;
            if !done {
                return Ok(false);
            }
        }
        for (i, sum) in sums.iter().enumerate() {
            let data = &mut buf[i * bs..(i + 1) * bs];
            if *sum == ZERO_SUM {
                data.fill(0);
            } else if block_sum(id, b0 + i as u64, data) != *sum {
                return Err(ChunkStoreError::Corrupt { id, block: b0 + i as u64 });
            }
        }
        Ok(true)
    }

    fn check_space(&self, need: u64) -> Result<()> {
        #[cfg(test)]
        if self.knobs.skip_space_check.load(Ordering::Relaxed) {
            return Ok(());
        }
        let (_, avail) = self.fs_stats()?;
        if avail < need.saturating_add(self.opts.reserved_bytes) {
            debug!(avail, need, reserved = self.opts.reserved_bytes, "refusing write: filesystem nearly full");
            return Err(ChunkStoreError::NoSpace);
        }
        Ok(())
    }

    /// Records a change to a chunk's file: its allocated size and that it needs a sync.
    fn note_modified(&self, id: ChunkId, file: &File) {
        let sectors = sectors_of(file);
        let mut index = write_lock(&self.index);
        if let Some(mut e) = index.get(id) {
            e.sectors = sectors.unwrap_or(e.sectors);
            e.flags |= FLAG_DIRTY;
            index.insert(id, e);
        }
    }

    /// Moves a chunk's file to `quarantine/` and forgets it. Call with its io lock held exclusively.
    fn quarantine_locked(&self, id: ChunkId, entry: IndexEntry, why: &str) -> Result<()> {
        lock(&self.quarantined).insert(id);
        lock(&self.files).remove(id);
        let path = self.file_path(id, entry.version);
        let dest = self.quarantine_path(&chunk_file_name(id, entry.version));
        fs::rename(&path, &dest).map_err(|e| io_err(format!("quarantine {}", path.display()), e))?;
        self.forget_name(id);
        write_lock(&self.index).remove(id);
        warn!(chunk = %Hex(id), version = entry.version, to = %dest.display(), why, "chunk replica quarantined");
        // Best effort: if it fails the replica may reappear after a crash and is caught again.
        if let Err(e) = fsync_dir(&self.chunk_dir(id)) {
            warn!(chunk = %Hex(id), error = %e, "fsync after quarantine failed");
        }
        Ok(())
    }
}

fn chunk_file_name(id: ChunkId, version: u64) -> String {
    format!("{id:016x}.v{version}")
}

/// Parses `<16 hex>.v<decimal>` exactly as `chunk_file_name` writes it.
fn parse_chunk_file_name(name: &str) -> Option<(ChunkId, u64)> {
    let (id, version) = name.split_once(".v")?;
    if id.len() != 16 {
        return None;
    }
    let id = u64::from_str_radix(id, 16).ok()?;
    let version = version.parse().ok()?;
    (chunk_file_name(id, version) == name).then_some((id, version))
}

/// Whether a read may wait for the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wait {
    Yes,
    /// Only from the page cache (`preadv2` with `RWF_NOWAIT`).
    No,
}

/// Fills `buf` from `off`. With [`Wait::No`] only if the page cache holds
/// all of it: `Ok(false)` if the read would wait, came up short or failed
/// (the caller then reads the ordinary way, which reports what went wrong).
fn pread(file: &File, buf: &mut [u8], off: u64, wait: Wait) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    if wait == Wait::Yes {
        return file.read_exact_at(buf, off).map(|()| true);
    }
    let Ok(off) = i64::try_from(off) else { return Ok(false) };
    let iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: one iovec over `buf`, which lives and is exclusively borrowed
    // for the call; the fd is open for as long as `file` is.
    let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, off, libc::RWF_NOWAIT) };
    Ok(n >= 0 && n as usize == buf.len())
}

/// A failed read of a replica: a short file or a media error means the replica
/// is bad at that place (`Corrupt`), anything else is an I/O error.
fn read_error(id: ChunkId, block: u64, context: &str, e: io::Error) -> ChunkStoreError {
    if e.kind() == io::ErrorKind::UnexpectedEof || e.raw_os_error() == Some(libc::EIO) {
        ChunkStoreError::Corrupt { id, block }
    } else {
        io_err(format!("{context} of chunk {}", Hex(id)), e)
    }
}

// Internals: the write path.
impl ChunkStore {
    /// Write or zero `len` bytes at `offset`: see "Writes and crashes" in the module docs.
    fn modify(&self, id: ChunkId, version: u64, offset: u64, len: u64, src: Src<'_>, missing: Missing) -> Result<()> {
        self.modify_many(id, version, &[(offset, len, src)], missing)
    }

    /// Applies `parts` (`(offset, len, source)`, in offset order, not
    /// overlapping; neighbours may share a block) to chunk `id` under one
    /// hold of its lock. Nearby parts share one read and one write of their
    /// stretch of the checksum table ([`TableWindow`]), and the index is
    /// told once: a batch of 4 KiB random writes costs two syscalls per
    /// part instead of four. Each part's data is written before the table
    /// entries that describe it, as for a single write; a failure part way
    /// leaves the parts before it applied and the failed one's blocks with
    /// their old or new content (see `recover_failed_write`).
    fn modify_many(&self, id: ChunkId, version: u64, parts: &[(u64, u64, Src<'_>)], missing: Missing) -> Result<()> {
        for &(offset, len, _) in parts {
            self.check_range(offset, len)?;
        }
        let locks = self.locks.get(id);
        let _gate = locks.gate.shared();
        let _io = write_lock(&locks.io);
        let total: u64 = parts.iter().map(|p| p.1).sum();
        let file = match (self.entry(id), missing) {
            (Some(e), _) if e.version == version => self.file(id, version)?,
            (Some(e), _) => return Err(ChunkStoreError::VersionMismatch { id, have: e.version, want: version }),
            // A replica set aside here is not made again from nothing: an
            // empty one at the same version would read as zeros where the
            // lost data was (a writer holding a layout from before the
            // report). A repair copy (`import`) may bring it back.
            (None, Missing::Create | Missing::CopyFrom { .. }) if lock(&self.quarantined).contains(&id) => {
                return Err(ChunkStoreError::Quarantined(id))
            }
            (None, Missing::Create) => {
                // Refuse before creating, so a write that cannot fit leaves no empty chunk behind.
                self.check_space(self.geo.data_off + total.div_ceil(self.geo.block_size) * self.geo.block_size)?;
                self.create_chunk(id, version)?
            }
            (None, Missing::CopyFrom { origin, version: origin_version }) => {
                self.copy_chunk(id, version, origin, origin_version)?
            }
            (None, Missing::Fail) => return Err(ChunkStoreError::NotFound(id)),
        };
        let gen = self.entry(id).map(|e| e.gen);
        let mut result = Ok(());
        let mut window: Option<TableWindow> = None;
        for (i, &(offset, len, src)) in parts.iter().enumerate() {
            if len == 0 {
                continue;
            }
            let (b0, b1) = self.geo.blocks(offset, len);
            if window.as_ref().is_none_or(|w| !w.covers(b0, b1)) {
                if let Some(mut w) = window.take() {
                    if let Err(e) = self.write_window(&file, id, &mut w) {
                        result = Err(e);
                        break;
                    }
                }
                // This part and the ones after it whose blocks are near.
                let mut end = b1;
                for &(o, l, _) in &parts[i + 1..] {
                    let (nb0, nb1) = self.geo.blocks(o, l.max(1));
                    if nb0 > end + TABLE_WINDOW_GAP {
                        break;
                    }
                    end = nb1;
                }
                match self.read_table(&file, id, b0, (end - b0) as usize) {
                    Ok(sums) => window = Some(TableWindow::new(b0, sums, gen)),
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            let Some(w) = window.as_mut() else { break };
            if let Err(e) = self.modify_part(&file, id, gen, offset, len, src, w) {
                // The parts before this one are on disk: their entries too
                // (already, if this part's data write failed).
                result = match self.write_window(&file, id, w) {
                    Err(table) => Err(table),
                    Ok(()) => Err(e),
                };
                window = None;
                break;
            }
        }
        if let (Ok(()), Some(mut w)) = (&result, window.take()) {
            result = self.write_window(&file, id, &mut w);
        }
        if total > 0 {
            self.note_modified(id, &file);
        }
        result
    }

    /// Writes the entries a window changed since it was read or last
    /// written; on failure makes each of their blocks' entries match its
    /// content (see `recover_failed_write`). Either way the file's table
    /// is then what the window holds.
    fn write_window(&self, file: &File, id: ChunkId, w: &mut TableWindow) -> Result<()> {
        let Some((lo, hi)) = w.dirty.take() else { return Ok(()) };
        // Only the entries that changed, runs in the same or neighbouring
        // table pages written together: the unchanged entries between may
        // sit in pages that are still holes, which a write of zeros would
        // allocate (and could fail for want of space).
        let page_of = |i: usize| Geometry::sum_off(w.b0 + i as u64) / ALIGN;
        let mut writes: Vec<(usize, usize)> = Vec::new();
        for (s, e) in runs(hi - lo, |i| w.sums[lo + i] != w.old[lo + i]) {
            let (s, e) = (lo + s, lo + e);
            match writes.last_mut() {
                Some(last) if page_of(s) <= page_of(last.1 - 1) + 1 => last.1 = e,
                _ => writes.push((s, e)),
            }
        }
        for (k, &(s, e)) in writes.iter().enumerate() {
            let written = file.write_all_at(w.sums[s..e].as_flattened(), Geometry::sum_off(w.b0 + s as u64));
            #[cfg(test)]
            let written = match self.knobs.fail_table_write.load(Ordering::Relaxed) {
                true => Err(io::Error::from_raw_os_error(libc::EIO)),
                false => written,
            };
            if let Err(err) = written {
                let mut err = io_err(format!("write checksum table of chunk {}", Hex(id)), err);
                // The runs before this one are written; this one and the
                // rest are not: their blocks' entries are made to match.
                for &(s, e) in &writes[k..] {
                    err = self.recover_failed_write(file, id, w.b0 + s as u64, &w.old[s..e], &w.sums[s..e], err);
                    if matches!(err, ChunkStoreError::Corrupt { .. }) {
                        break;
                    }
                }
                // Blocks cached by the parts may now read otherwise.
                if let Some(g) = w.gen {
                    self.cache.forget(g, w.b0 + lo as u64, w.b0 + hi as u64);
                }
                // The window is not used again.
                w.old[lo..hi].copy_from_slice(&w.sums[lo..hi]);
                return Err(err);
            }
        }
        w.old[lo..hi].copy_from_slice(&w.sums[lo..hi]);
        Ok(())
    }

    /// One part of [`modify_many`](Self::modify_many): its data written,
    /// its blocks' new entries in `w` (written by the caller).
    #[allow(clippy::too_many_arguments)]
    fn modify_part(
        &self,
        file: &ChunkFile,
        id: ChunkId,
        gen: Option<u64>,
        offset: u64,
        len: u64,
        src: Src<'_>,
        w: &mut TableWindow,
    ) -> Result<()> {
        let g = self.geo;
        let bs = g.bs();
        let (b0, b1) = g.blocks(offset, len);
        let n = (b1 - b0) as usize;
        let old = w.get(b0, n).to_vec();
        let head = (offset - b0 * g.block_size) as usize;
        let end = head + len as usize;
        let content: Cow<'_, [u8]> = match src {
            Src::Data(d) | Src::Summed(d, _) if head == 0 && end == n * bs => Cow::Borrowed(d),
            _ => {
                let mut buf = vec![0u8; n * bs];
                // Partial first and last blocks keep their bytes outside the range.
                if head != 0 {
                    self.load_block(file, id, gen, b0, &old[0], &mut buf[..bs])?;
                }
                let tail_partial = !end.is_multiple_of(bs);
                let tail_is_loaded_head = n == 1 && head != 0;
                if tail_partial && !tail_is_loaded_head {
                    self.load_block(file, id, gen, b1 - 1, &old[n - 1], &mut buf[(n - 1) * bs..])?;
                }
                match src {
                    Src::Data(d) | Src::Summed(d, _) => buf[head..end].copy_from_slice(d),
                    Src::Zeros => buf[head..end].fill(0),
                }
                Cow::Owned(buf)
            }
        };
        // The writer's sums stand for its blocks of data (a block of zeros
        // is never-written whatever it says; one it calls zeros that is not
        // is hashed here).
        let given = match src {
            Src::Summed(_, sums) if sums.len() == n => Some(sums),
            _ => None,
        };
        let new: Vec<[u8; 32]> = (0..n)
            .map(|i| {
                let data = &content[i * bs..(i + 1) * bs];
                if data == &self.zero_block[..] {
                    ZERO_SUM
                } else {
                    match given {
                        Some(sums) if sums[i] != ZERO_SUM => sums[i],
                        _ => block_sum(id, b0 + i as u64, data),
                    }
                }
            })
            .collect();

        // Data is rewritten even if its checksum is unchanged: the blocks on
        // disk were not read (whole-block overwrite) and may be the corrupt
        // copy this write is meant to heal.
        let is_data = |i: usize| new[i] != ZERO_SUM;
        // Before any byte changes, with the lock held exclusively, so no
        // read can put the old blocks back (see `super::cache`); the new
        // ones go in once they are written.
        if let Some(g) = gen {
            self.cache.forget(g, b0, b1);
        }
        let allocate = runs(n, |i| is_data(i) && old[i] == ZERO_SUM);
        if !allocate.is_empty() {
            let blocks: usize = allocate.iter().map(|(s, e)| e - s).sum();
            self.check_space(blocks as u64 * g.block_size)?;
            self.preallocate(file, b0, &allocate)?;
        }
        for (s, e) in runs(n, is_data) {
            let written = file.write_data(&content[s * bs..e * bs], g.block_off(b0 + s as u64));
            #[cfg(test)]
            let written = match self
                .knobs
                .fail_data_write
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            {
                Ok(1) => Err(io::Error::from_raw_os_error(libc::EIO)),
                _ => written,
            };
            if let Err(err) = written {
                let err = io_err(format!("write chunk {}", Hex(id)), err);
                // The parts before this one first, so that the file's table
                // has `old` for this part's blocks (a block it shares with
                // the part before has that part's entry) ...
                let table = self.write_window(file, id, w);
                if let Err(quarantined @ ChunkStoreError::Corrupt { .. }) = table {
                    return Err(quarantined);
                }
                // ... which the recovery compares the blocks with (after a
                // failed table write too: those entries were made to match).
                let err = self.recover_failed_write(file, id, b0, &old, &new, err);
                return Err(match (table, err) {
                    (_, quarantined @ ChunkStoreError::Corrupt { .. }) => quarantined,
                    (Err(table), _) => table,
                    (Ok(()), err) => err,
                });
            }
        }
        w.set(b0, &new);
        // Freed now, not when the window is written: a later part of the
        // batch may write into the same block again (a punch deferred to
        // then destroyed that data; fsx found it).
        for (s, e) in runs(n, |i| new[i] == ZERO_SUM && old[i] != ZERO_SUM) {
            if let Err(err) = punch_hole(file, g.block_off(b0 + s as u64), (e - s) as u64 * g.block_size) {
                if !is_unsupported(&err) {
                    warn!(chunk = %Hex(id), error = %err, "punching a zeroed range failed; space not freed");
                }
                break;
            }
        }
        if let Some(g) = gen {
            // A block only partly written is what the next partial write of
            // it reads back (its sum was just computed from it). A block
            // written whole is not kept: the next write of it needs nothing
            // of it, a read finds it in the page cache, and copying every
            // small write into the cache cost random writes a sixth of a
            // server's CPU.
            let partial = |i: usize| (i == 0 && head != 0) || (i == n - 1 && !end.is_multiple_of(bs));
            self.cache.fill(g, b0, &content, |i| is_data(i) && partial(i));
        }
        Ok(())
    }

    /// Reads and verifies one block into `buf` (from the block cache when
    /// it holds it); a never-written block is zeros.
    fn load_block(
        &self,
        file: &File,
        id: ChunkId,
        gen: Option<u64>,
        block: u64,
        sum: &[u8; 32],
        buf: &mut [u8],
    ) -> Result<()> {
        if *sum == ZERO_SUM {
            buf.fill(0);
            return Ok(());
        }
        if gen.is_some_and(|g| self.cache.copy_block(g, block, buf)) {
            return Ok(());
        }
        file.read_exact_at(buf, self.geo.block_off(block)).map_err(|e| read_error(id, block, "read chunk data", e))?;
        if block_sum(id, block, buf) != *sum {
            return Err(ChunkStoreError::Corrupt { id, block });
        }
        Ok(())
    }

    /// Allocates the never-written blocks a write is about to fill, so that
    /// running out of space fails here, before any data or checksum changes.
    fn preallocate(&self, file: &File, b0: u64, runs: &[(usize, usize)]) -> Result<()> {
        #[cfg(test)]
        if self.knobs.skip_fallocate.load(Ordering::Relaxed) {
            return Ok(());
        }
        let g = self.geo;
        // Their checksum entries first: a new chunk's table is a hole (4 KiB
        // blocks make it 512 KiB per 64 MiB chunk, which every small file
        // would pay), allocated a page at a time as blocks get data, so an
        // entry is never written where the filesystem has no room. Never
        // given back on failure: other entries may share the pages, and an
        // allocated hole still reads as "never written".
        for &(s, e) in runs {
            let (from, to) = (Geometry::sum_off(b0 + s as u64), Geometry::sum_off(b0 + e as u64));
            match fallocate(file, libc::FALLOC_FL_KEEP_SIZE, from, to - from) {
                Ok(()) => {}
                Err(e) if is_unsupported(&e) => return Ok(()),
                Err(e) => return Err(io_err("allocate checksum table", e)),
            }
        }
        let span = |&(s, e): &(usize, usize)| (g.block_off(b0 + s as u64), (e - s) as u64 * g.block_size);
        for (i, run) in runs.iter().enumerate() {
            let (off, len) = span(run);
            match fallocate(file, 0, off, len) {
                Ok(()) => {}
                // The filesystem cannot preallocate: the write itself finds out, and is repaired if it fails.
                Err(e) if is_unsupported(&e) => return Ok(()),
                Err(e) => {
                    // These blocks are never-written, so giving their space back loses nothing.
                    for done in &runs[..=i] {
                        let (off, len) = span(done);
                        let _ = punch_hole(file, off, len);
                    }
                    return Err(io_err("allocate chunk space", e));
                }
            }
        }
        Ok(())
    }

    /// After a data or table write failed part way, makes every touched
    /// block's table entry match what is on disk, preferring the old content.
    /// Returns `err`, or `Corrupt` (with the replica quarantined) if a block
    /// matches neither its old nor its new content.
    fn recover_failed_write(
        &self,
        file: &File,
        id: ChunkId,
        b0: u64,
        old: &[[u8; 32]],
        new: &[[u8; 32]],
        err: ChunkStoreError,
    ) -> ChunkStoreError {
        let g = self.geo;
        let mut buf = vec![0u8; g.bs()];
        let current = self.read_table(file, id, b0, old.len()).ok();
        let mut damaged = None;
        for i in 0..old.len() {
            let block = b0 + i as u64;
            let want = if old[i] == ZERO_SUM {
                // Whatever reached the data region, the block reads as it did: zeros.
                Some(ZERO_SUM)
            } else {
                match file.read_exact_at(&mut buf, g.block_off(block)) {
                    Ok(()) => {
                        let sum = block_sum(id, block, &buf);
                        if sum == old[i] {
                            Some(old[i])
                        } else if new[i] == ZERO_SUM || sum == new[i] {
                            Some(new[i])
                        } else {
                            None
                        }
                    }
                    Err(_) => None,
                }
            };
            let Some(want) = want else {
                damaged = Some(block);
                break;
            };
            if current.as_ref().map(|c| c[i]) != Some(want)
                && file.write_all_at(&want, Geometry::sum_off(block)).is_err()
            {
                damaged = Some(block);
                break;
            }
        }
        let Some(block) = damaged else {
            // Blocks that stayed never-written may have data allocated now: give it back.
            for (s, e) in runs(old.len(), |i| old[i] == ZERO_SUM && new[i] != ZERO_SUM) {
                let _ = punch_hole(file, g.block_off(b0 + s as u64), (e - s) as u64 * g.block_size);
            }
            warn!(chunk = %Hex(id), error = %err, "write failed; touched blocks keep old or new content");
            self.note_modified(id, file);
            return err;
        };
        error!(chunk = %Hex(id), block, error = %err, "write failed and left a block matching neither old nor new content");
        if let Some(entry) = self.entry(id) {
            if let Err(e) = self.quarantine_locked(id, entry, "torn by a failed write") {
                error!(chunk = %Hex(id), error = %e, "could not quarantine damaged replica");
            }
        }
        ChunkStoreError::Corrupt { id, block }
    }

    /// Creates chunk `id` at `version`: header (the table a hole, every
    /// entry "never written") built in `tmp/`, renamed in. Call with its io
    /// lock held exclusively.
    fn create_chunk(&self, id: ChunkId, version: u64) -> Result<Arc<ChunkFile>> {
        let g = self.geo;
        self.check_space(HEADER_SIZE)?;
        let tmp = self.tmp_path(id, version);
        let build = || -> Result<File> {
            let ctx = |what: &str| format!("{what} new chunk file {}", tmp.display());
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&tmp)
                .map_err(|e| io_err(ctx("create"), e))?;
            f.set_len(g.file_len()).map_err(|e| io_err(ctx("size"), e))?;
            // The table stays a hole (all entries "never written"): its pages
            // are allocated as blocks get data (`preallocate`).
            f.write_all_at(&encode_header(id, &g), 0).map_err(|e| io_err(ctx("write header of"), e))?;
            Ok(f)
        };
        // Not synced here: the first flush makes the file and its name
        // durable (`FLAG_NEW`), as a local filesystem makes a new file
        // durable at fsync. A crash before that leaves no file, or one
        // whose header fails its checksum (quarantined at open): the
        // replica is lost, never wrong, and nothing flushed was in it.
        let file = self.publish(id, version, &tmp, build(), false)?;
        debug!(chunk = %Hex(id), version, "chunk created");
        Ok(file)
    }
}

impl ChunkStore {
    /// Renames a synced temp file built for chunk `id` into place, makes the
    /// rename durable and lists the chunk; on any failure the file is gone.
    fn publish(
        &self,
        id: ChunkId,
        version: u64,
        tmp: &Path,
        built: Result<File>,
        durable: bool,
    ) -> Result<Arc<ChunkFile>> {
        let path = self.chunk_path(id, version);
        let file = built.and_then(|f| {
            fs::rename(tmp, &path).map_err(|e| io_err(format!("rename into {}", path.display()), e))?;
            Ok(f)
        });
        let file = match file {
            Ok(f) => f,
            Err(e) => {
                let _ = fs::remove_file(tmp);
                return Err(e);
            }
        };
        if durable {
            if let Err(e) = fsync_dir(&self.chunk_dir(id)) {
                let _ = fs::remove_file(&path);
                return Err(e);
            }
        }
        let sectors = sectors_of(&file).unwrap_or(0);
        let mut entry = self.new_entry(version, sectors);
        if !durable {
            entry.flags |= FLAG_DIRTY | FLAG_NEW;
        }
        write_lock(&self.index).insert(id, entry);
        let file = ChunkFile::new(file, self.direct_io);
        lock(&self.files).insert(id, file.clone());
        Ok(file)
    }
}

// Internals: copy-on-write.
impl ChunkStore {
    /// Makes chunk `id` at `version` a copy of chunk `origin` at
    /// `origin_version` (see [`ChunkStore::write_with`]). Call with the io
    /// lock of `id` held exclusively; takes the origin's io lock shared
    /// (a copy is always newer than its origin, so locks go from larger to
    /// smaller ids and cannot form a cycle).
    fn copy_chunk(&self, id: ChunkId, version: u64, origin: ChunkId, origin_version: u64) -> Result<Arc<ChunkFile>> {
        if origin >= id {
            return Err(ChunkStoreError::BadInput(format!(
                "chunk {} cannot be a copy of chunk {}: a copy is newer than its origin",
                Hex(id),
                Hex(origin)
            )));
        }
        let g = self.geo;
        let bs = g.bs();
        let olocks = self.locks.get(origin);
        let _oio = read_lock(&olocks.io);
        self.checked_entry(origin, origin_version)?;
        let src = self.file(origin, origin_version)?;
        let old = self.read_table(&src, origin, 0, g.n_blocks as usize)?;
        let written = old.iter().filter(|s| **s != ZERO_SUM).count() as u64;
        self.check_space(g.data_off + written * g.block_size)?;
        let tmp = self.tmp_path(id, version);
        let build = || -> Result<File> {
            let ctx = |what: &str| format!("{what} copy file {}", tmp.display());
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&tmp)
                .map_err(|e| io_err(ctx("create"), e))?;
            f.set_len(g.file_len()).map_err(|e| io_err(ctx("size"), e))?;
            let written_runs = runs(old.len(), |i| old[i] != ZERO_SUM);
            for &(s, e) in &written_runs {
                copy_range(&src, &f, g.block_off(s as u64), (e - s) as u64 * g.block_size)
                    .map_err(|e| io_err(ctx("copy into"), e))?;
            }
            // Read the copy back: every block must match the origin's
            // checksum (a torn copy or a bad origin block is caught here),
            // then gets its checksum bound to the new id.
            let mut new = vec![ZERO_SUM; old.len()];
            let per_batch = ((BATCH_BYTES / g.block_size).max(1)) as usize;
            let mut buf = vec![0u8; per_batch * bs];
            for &(s, e) in &written_runs {
                let mut b = s;
                while b < e {
                    let k = per_batch.min(e - b);
                    let data = &mut buf[..k * bs];
                    f.read_exact_at(data, g.block_off(b as u64)).map_err(|e| io_err(ctx("read back"), e))?;
                    for i in 0..k {
                        let block = (b + i) as u64;
                        let d = &data[i * bs..(i + 1) * bs];
                        if block_sum(origin, block, d) != old[b + i] {
                            return Err(ChunkStoreError::Corrupt { id: origin, block });
                        }
                        new[b + i] = block_sum(id, block, d);
                    }
                    b += k;
                }
            }
            let mut head = vec![0u8; g.data_off as usize];
            head[..HEADER_SIZE as usize].copy_from_slice(&encode_header(id, &g));
            head[HEADER_SIZE as usize..HEADER_SIZE as usize + new.len() * SUM_SIZE as usize]
                .copy_from_slice(new.as_flattened());
            f.write_all_at(&head[..head_len(&new)], 0).map_err(|e| io_err(ctx("write header of"), e))?;
            f.sync_data().map_err(|e| io_err(ctx("sync"), e))?;
            Ok(f)
        };
        let file = self.publish(id, version, &tmp, build(), true)?;
        debug!(chunk = %Hex(id), version, origin = %Hex(origin), origin_version, blocks = written, "chunk copied from its origin");
        Ok(file)
    }
}

// Internals: flush, import, scrub.
impl ChunkStore {
    /// Group commit: a flush needs one fdatasync that starts after it was
    /// called (or the one in progress if nothing was written since it
    /// started). Whoever finds no sync running starts one for everybody waiting.
    fn flush_one(&self, id: ChunkId) -> Result<()> {
        let locks = self.locks.get(id);
        let (file, version) = {
            let _io = read_lock(&locks.io);
            let entry = self.entry(id).ok_or(ChunkStoreError::NotFound(id))?;
            (self.file(id, entry.version)?, entry.version)
        };
        let mut st = lock(&locks.flush);
        let dirty = self.entry(id).is_some_and(|e| e.flags & FLAG_DIRTY != 0);
        let need = match (st.in_progress, dirty) {
            (false, false) => return Ok(()),
            (true, false) => st.started,
            (_, true) => st.started + 1,
        };
        loop {
            if let Some(kind) = st.failed {
                return Err(ChunkStoreError::Io {
                    context: format!("fdatasync of chunk {} failed earlier", Hex(id)),
                    source: kind.into(),
                });
            }
            if st.completed >= need {
                return Ok(());
            }
            if !st.in_progress {
                st.in_progress = true;
                st.started += 1;
                let seq = st.started;
                // Cleared before the sync starts: a write finishing later sets it again.
                // In place, under one lock: a fence or an import may change
                // the entry meanwhile (flushes take no chunk lock).
                let new = {
                    let mut index = write_lock(&self.index);
                    match index.get(id) {
                        Some(mut e) => {
                            let new = e.flags & FLAG_NEW != 0;
                            e.flags &= !(FLAG_DIRTY | FLAG_NEW);
                            index.insert(id, e);
                            new
                        }
                        None => false,
                    }
                };
                drop(st);
                // A new chunk's name becomes durable with its first flush.
                let result = file.sync_data().and_then(|()| match new {
                    true => File::open(self.chunk_dir(id)).and_then(|d| d.sync_all()),
                    false => Ok(()),
                });
                self.flush_syncs.fetch_add(1, Ordering::Relaxed);
                st = lock(&locks.flush);
                st.in_progress = false;
                st.completed = seq;
                if let Err(e) = &result {
                    st.failed = Some(e.kind());
                }
                locks.flush_cv.notify_all();
                if let Err(e) = result {
                    drop(st);
                    error!(chunk = %Hex(id), error = %e, "fdatasync failed; the replica can no longer be trusted");
                    let _io = write_lock(&locks.io);
                    if let Some(entry) = self.entry(id).filter(|e| e.version == version) {
                        if let Err(qe) = self.quarantine_locked(id, entry, "fdatasync failed") {
                            error!(chunk = %Hex(id), error = %qe, "could not quarantine replica");
                        }
                    }
                    return Err(io_err(format!("fdatasync chunk {}", Hex(id)), e));
                }
                continue;
            }
            st = wait(&locks.flush_cv, st);
        }
    }

    fn check_can_install(&self, id: ChunkId, version: u64) -> Result<()> {
        match self.entry(id) {
            Some(e) if e.version == version => Err(ChunkStoreError::Exists),
            Some(e) if e.version > version => {
                Err(ChunkStoreError::VersionMismatch { id, have: e.version, want: version })
            }
            _ => Ok(()),
        }
    }

    /// Reads and verifies an export stream into a new file at `tmp`, synced.
    fn import_to(&self, id: ChunkId, version: u64, src: &mut dyn Read, tmp: &Path) -> Result<File> {
        let g = self.geo;
        let bad = |what: String| ChunkStoreError::BadInput(format!("import stream: {what}"));
        let mut read = |buf: &mut [u8]| -> Result<()> {
            src.read_exact(buf).map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => bad("ends early".into()),
                _ => io_err("read import stream", e),
            })
        };
        let mut header = [0u8; EXPORT_HEADER_LEN];
        read(&mut header)?;
        if header[0..8] != EXPORT_MAGIC || le_u32(&header, 8) != EXPORT_FORMAT || le_u32(&header, 12) != 0 {
            return Err(bad("not an export stream of a known format".into()));
        }
        let (h_id, h_version) = (le_u64(&header, 16), le_u64(&header, 24));
        if h_id != id || h_version != version {
            return Err(bad(format!("holds chunk {} version {h_version}", Hex(h_id))));
        }
        let (h_chunk, h_block) = (le_u64(&header, 32), le_u64(&header, 40));
        if h_chunk != g.chunk_size || h_block != g.block_size {
            return Err(bad(format!("chunk size {h_chunk} block size {h_block} differ from this store's")));
        }
        let mut structure = blake3::Hasher::new();
        structure.update(&header);

        self.check_space(g.data_off)?;
        let ctx = |what: &str| format!("{what} import file {}", tmp.display());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(tmp)
            .map_err(|e| io_err(ctx("create"), e))?;
        file.set_len(g.file_len()).map_err(|e| io_err(ctx("size"), e))?;
        let bs = g.bs();
        let mut sums = vec![ZERO_SUM; g.n_blocks as usize];
        let mut block = vec![0u8; bs];
        let mut unchecked_bytes = u64::MAX; // check space before the first data block
        for b in 0..g.n_blocks {
            let mut tag = [0u8; 1];
            read(&mut tag)?;
            structure.update(&tag);
            match tag[0] {
                TAG_HOLE => continue,
                TAG_DATA => {}
                t => return Err(bad(format!("unknown tag {t} at block {b}"))),
            }
            let mut sum = ZERO_SUM;
            read(&mut block)?;
            read(&mut sum)?;
            if sum == ZERO_SUM || block_sum(id, b, &block) != sum {
                return Err(bad(format!("block {b} fails its checksum")));
            }
            structure.update(&sum);
            if unchecked_bytes >= IMPORT_SPACE_CHECK_BYTES {
                self.check_space(IMPORT_SPACE_CHECK_BYTES.min((g.n_blocks - b) * g.block_size))?;
                unchecked_bytes = 0;
            }
            file.write_all_at(&block, g.block_off(b)).map_err(|e| io_err(ctx("write"), e))?;
            unchecked_bytes += g.block_size;
            sums[b as usize] = sum;
        }
        let mut trailer = [0u8; 1 + 32];
        read(&mut trailer)?;
        if trailer[0] != TAG_END || trailer[1..] != *structure.finalize().as_bytes() {
            return Err(bad("trailer does not match the stream".into()));
        }
        let mut head = vec![0u8; g.data_off as usize];
        head[..HEADER_SIZE as usize].copy_from_slice(&encode_header(id, &g));
        head[HEADER_SIZE as usize..HEADER_SIZE as usize + sums.len() * SUM_SIZE as usize]
            .copy_from_slice(sums.as_flattened());
        file.write_all_at(&head[..head_len(&sums)], 0).map_err(|e| io_err(ctx("write header of"), e))?;
        file.sync_data().map_err(|e| io_err(ctx("sync"), e))?;
        Ok(file)
    }

    /// Renames a verified, synced import file into place, replacing an older version.
    fn install(&self, id: ChunkId, version: u64, tmp: &Path, file: File) -> Result<()> {
        let locks = self.locks.get(id);
        let _io = write_lock(&locks.io);
        self.check_can_install(id, version)?;
        let path = self.chunk_path(id, version);
        fs::rename(tmp, &path).map_err(|e| io_err(format!("rename into {}", path.display()), e))?;
        let old = self.entry(id);
        if let Some(old) = old {
            lock(&self.files).remove(id);
            let old_path = self.file_path(id, old.version);
            self.forget_name(id);
            // If this fails both versions stay on disk; the next open keeps the newer.
            if let Err(e) = fs::remove_file(&old_path) {
                warn!(chunk = %Hex(id), error = %e, "could not delete replaced version");
            }
        }
        let sectors = sectors_of(&file).unwrap_or(0);
        write_lock(&self.index).insert(id, self.new_entry(version, sectors));
        lock(&self.files).insert(id, ChunkFile::new(file, self.direct_io));
        // A sync failure of the replica this one replaces does not concern it.
        lock(&locks.flush).failed = None;
        info!(chunk = %Hex(id), version, replaced = ?old.map(|e| e.version), "chunk imported");
        fsync_dir(&self.chunk_dir(id))
    }

    /// Verifies one batch of a chunk from `block`; quarantines it if corrupt.
    fn scrub_step(&self, id: ChunkId, block: u64, budget: &mut u64, report: &mut ScrubReport) -> ScrubStep {
        let g = self.geo;
        let batch = (BATCH_BYTES / g.block_size).max(1);
        let n = (*budget / (g.block_size + SUM_SIZE)).clamp(1, batch).min(g.n_blocks - block) as usize;
        let mut cost = 0u64;
        let (result, version) = {
            let locks = self.locks.get(id);
            let _io = read_lock(&locks.io);
            let Some(entry) = self.entry(id) else { return ScrubStep::ChunkDone };
            let result = self.file(id, entry.version).and_then(|file| {
                if block == 0 {
                    cost += HEADER_SIZE;
                    self.verify_header(&file, id)?;
                }
                let sums = self.read_table(&file, id, block, n)?;
                cost += n as u64 * SUM_SIZE;
                // Blocks never written read as zeros without the disk:
                // nothing to verify, and no buffer to fill (a sparse image
                // of 64 MiB chunks had every server zeroing gigabytes a
                // second here).
                for (s, e) in runs(sums.len(), |i| sums[i] != ZERO_SUM) {
                    let mut buf = aligned_zeroed((e - s) * g.bs());
                    self.read_verified(&file, id, block + s as u64, &sums[s..e], buf.as_mut_slice())?;
                    cost += (e - s) as u64 * g.block_size;
                }
                Ok(())
            });
            (result, entry.version)
        };
        *budget = budget.saturating_sub(cost);
        report.bytes_verified += cost;
        match result {
            Ok(()) if block + n as u64 >= g.n_blocks => {
                report.chunks_verified += 1;
                ScrubStep::ChunkDone
            }
            Ok(()) => ScrubStep::Continue(block + n as u64),
            Err(ChunkStoreError::Corrupt { block: bad, .. }) => {
                match self.scrub_quarantine(id, version, bad) {
                    Ok(true) => report.corrupt.push(id),
                    Ok(false) => {}
                    Err(e) => {
                        error!(chunk = %Hex(id), error = %e, "could not quarantine corrupt replica");
                        report.io_errors += 1;
                    }
                }
                ScrubStep::ChunkDone
            }
            Err(e) => {
                warn!(chunk = %Hex(id), error = %e, "scrub skipped chunk");
                report.io_errors += 1;
                ScrubStep::ChunkDone
            }
        }
    }

    fn verify_header(&self, file: &File, id: ChunkId) -> Result<()> {
        let mut hdr = vec![0u8; HEADER_SIZE as usize];
        file.read_exact_at(&mut hdr, 0).map_err(|e| read_error(id, 0, "read header", e))?;
        decode_header(&hdr, id, &self.geo).map_err(|_| ChunkStoreError::Corrupt { id, block: 0 })
    }

    /// Quarantines a chunk the scrubber found bad, unless a write healed the
    /// block (or replaced the chunk) between the check and taking the lock.
    /// Returns whether the chunk was quarantined.
    fn scrub_quarantine(&self, id: ChunkId, version: u64, block: u64) -> Result<bool> {
        let locks = self.locks.get(id);
        let _io = write_lock(&locks.io);
        let Some(entry) = self.entry(id).filter(|e| e.version == version) else { return Ok(false) };
        let file = self.file(id, version)?;
        let recheck = self.verify_header(&file, id).and_then(|()| {
            let sums = self.read_table(&file, id, block, 1)?;
            self.load_block(&file, id, None, block, &sums[0], &mut vec![0u8; self.geo.bs()])
        });
        match recheck {
            Err(ChunkStoreError::Corrupt { .. }) => {}
            Ok(()) => return Ok(false),
            Err(e) => return Err(e),
        }
        error!(chunk = %Hex(id), block, "scrub found a corrupt block");
        self.quarantine_locked(id, entry, "scrub found a corrupt block")?;
        Ok(true)
    }
}

// Internals: opening a store.
impl ChunkStore {
    /// Removes leftovers of creations and imports a crash interrupted.
    fn clean_tmp(&self) -> Result<()> {
        let tmp = self.dir.join(TMP_DIR);
        let entries = fs::read_dir(&tmp).map_err(|e| io_err(format!("list {}", tmp.display()), e))?;
        for entry in entries {
            let entry = entry.map_err(|e| io_err(format!("list {}", tmp.display()), e))?;
            let path = entry.path();
            let removed = match entry.file_type() {
                Ok(t) if t.is_dir() => fs::remove_dir_all(&path),
                _ => fs::remove_file(&path),
            };
            match removed {
                Ok(()) => debug!(path = %path.display(), "removed leftover temp file"),
                Err(e) => warn!(path = %path.display(), error = %e, "could not remove leftover temp file"),
            }
        }
        Ok(())
    }

    /// Creates the 256 chunk subdirectories up front, so creating a chunk
    /// never has to make (and fsync) a directory.
    fn create_subdirs(&self) -> Result<()> {
        let chunks = self.dir.join(CHUNKS_DIR);
        let mut created = false;
        for byte in 0..=255u8 {
            let sub = chunks.join(format!("{byte:02x}"));
            match fs::create_dir(&sub) {
                Ok(()) => created = true,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err(format!("create {}", sub.display()), e)),
            }
        }
        if created {
            fsync_dir(&chunks)?;
            fsync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Builds the index from the chunk files (see `open`).
    fn scan(&self) -> Result<()> {
        let chunks = self.dir.join(CHUNKS_DIR);
        let mut index = Index::default();
        let mut changed_dirs = BTreeSet::new();
        let list = |dir: &Path| -> Result<Vec<fs::DirEntry>> {
            let ctx = || format!("list {}", dir.display());
            let entries = fs::read_dir(dir).map_err(|e| io_err(ctx(), e))?;
            entries.map(|e| e.map_err(|e| io_err(ctx(), e))).collect()
        };
        for sub in list(&chunks)? {
            let sub_path = sub.path();
            let is_dir = sub.file_type().is_ok_and(|t| t.is_dir());
            let sub_name = sub.file_name();
            let byte = sub_name.to_str().filter(|n| n.len() == 2).and_then(|n| u8::from_str_radix(n, 16).ok());
            let Some(byte) = byte.filter(|b| is_dir && sub_name.to_str() == Some(&format!("{b:02x}"))) else {
                if is_dir {
                    warn!(path = %sub_path.display(), "ignoring unexpected directory");
                } else {
                    self.quarantine_stray(&sub_path, "unexpected file name");
                    changed_dirs.insert(chunks.clone());
                }
                continue;
            };
            for file in list(&sub_path)? {
                let path = file.path();
                let parsed = file.file_name().to_str().and_then(parse_chunk_file_name);
                let Some((id, version)) = parsed.filter(|(id, _)| (id & 0xff) as u8 == byte) else {
                    if file.file_type().is_ok_and(|t| t.is_dir()) {
                        warn!(path = %path.display(), "ignoring unexpected directory");
                    } else {
                        self.quarantine_stray(&path, "unexpected file name");
                        changed_dirs.insert(sub_path.clone());
                    }
                    continue;
                };
                let sectors = match self.check_file(&path, id)? {
                    FileCheck::Good { sectors } => sectors,
                    FileCheck::Bad(why) => {
                        self.quarantine_stray(&path, &why);
                        changed_dirs.insert(sub_path.clone());
                        continue;
                    }
                };
                let stale = match index.get(id) {
                    Some(kept) if kept.version > version => version,
                    other => {
                        index.insert(id, self.new_entry(version, sectors));
                        match other {
                            Some(kept) => kept.version,
                            None => continue,
                        }
                    }
                };
                // A crash between an import's rename and its unlink of the old version.
                let stale_path = self.chunk_path(id, stale);
                info!(chunk = %Hex(id), stale_version = stale, "deleting superseded version");
                fs::remove_file(&stale_path).map_err(|e| io_err(format!("delete {}", stale_path.display()), e))?;
                changed_dirs.insert(sub_path.clone());
            }
        }
        for dir in changed_dirs {
            fsync_dir(&dir)?;
        }
        fsync_dir(&self.dir.join(QUARANTINE_DIR))?;
        *write_lock(&self.index) = index;
        Ok(())
    }

    /// Checks a chunk file's header and length. A configuration mismatch
    /// (valid header, other geometry) is an error; damage is `Bad`.
    fn check_file(&self, path: &Path, id: ChunkId) -> Result<FileCheck> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) => return Ok(FileCheck::Bad(format!("cannot open: {e}"))),
        };
        let meta = match file.metadata() {
            Ok(m) if m.is_file() => m,
            Ok(_) => return Ok(FileCheck::Bad("not a regular file".into())),
            Err(e) => return Ok(FileCheck::Bad(format!("cannot stat: {e}"))),
        };
        let mut hdr = vec![0u8; HEADER_SIZE as usize];
        if let Err(e) = file.read_exact_at(&mut hdr, 0) {
            return Ok(FileCheck::Bad(format!("cannot read header: {e}")));
        }
        match decode_header(&hdr, id, &self.geo) {
            Ok(()) => {}
            Err(HeaderProblem::Bad(why)) => return Ok(FileCheck::Bad(why)),
            Err(HeaderProblem::Mismatch(what)) => {
                return Err(ChunkStoreError::BadInput(format!(
                    "{} has {what}; this store reads format {FORMAT_VERSION} with chunk size {} block size {}",
                    path.display(),
                    self.geo.chunk_size,
                    self.geo.block_size
                )))
            }
        }
        if meta.len() != self.geo.file_len() {
            return Ok(FileCheck::Bad(format!("length {} instead of {}", meta.len(), self.geo.file_len())));
        }
        Ok(FileCheck::Good { sectors: u32::try_from(meta.blocks()).unwrap_or(u32::MAX) })
    }

    /// Moves a file found while scanning into `quarantine/`; logs, never fails.
    fn quarantine_stray(&self, path: &Path, why: &str) {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let dest = self.quarantine_path(&name);
        match fs::rename(path, &dest) {
            Ok(()) => warn!(path = %path.display(), to = %dest.display(), why, "file quarantined"),
            Err(e) => error!(path = %path.display(), error = %e, why, "could not quarantine file"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Barrier;
    use std::time::Duration;

    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * 1024;

    /// 16 blocks of 4 KiB: small enough to cover every alignment quickly.
    fn tiny() -> StoreOptions {
        StoreOptions {
            chunk_size: 64 * KIB,
            block_size: 4 * KIB,
            max_open_files: 8,
            reserved_bytes: 0,
            cache_bytes: MIB,
            direct_io: true,
        }
    }

    /// Goal: a small file's chunk takes the disk space of its header, one
    /// table page and its data, not the whole table (512 KiB for a 64 MiB
    /// chunk of 4 KiB blocks, all zeros, which each replica of every small
    /// file used to write); blocks written far apart allocate their table
    /// pages, and everything verifies after a reopen.
    #[test]
    fn a_small_chunk_allocates_only_the_table_it_uses() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let opts = StoreOptions { chunk_size: 64 * MIB, ..small_4k() };
        let store = ChunkStore::open(dir.path(), opts.clone()).unwrap();
        store.write(4, 1, 0, &pattern(1, 1000), true).unwrap();
        let allocated = |store: &ChunkStore| fs::metadata(store.file_path(4, 1)).unwrap().blocks() * 512;
        assert!(allocated(&store) <= 16 * KIB, "{} bytes allocated for a 1,000-byte chunk", allocated(&store));
        // Far apart: its own table page.
        store.write(4, 1, 60 * MIB, &pattern(2, 5000), false).unwrap();
        assert!(allocated(&store) <= 32 * KIB, "{} bytes allocated", allocated(&store));
        drop(store);
        let store = ChunkStore::open(dir.path(), opts).unwrap();
        assert_eq!(store.read(4, 1, 0, 1000).unwrap(), pattern(1, 1000));
        assert_eq!(store.read(4, 1, 60 * MIB, 5000).unwrap(), pattern(2, 5000));
        assert_eq!(store.read(4, 1, 30 * MIB, 100).unwrap(), vec![0u8; 100]);
        let r = store.scrub(u64::MAX);
        assert!(r.corrupt.is_empty() && r.io_errors == 0, "{r:?}");
        // Zeroing across the whole chunk writes only the entries that change:
        // the table pages between stay holes.
        store.zero(4, 1, 0, 62 * MIB).unwrap();
        assert!(allocated(&store) <= 32 * KIB, "{} bytes allocated after zeroing", allocated(&store));
        assert_eq!(store.read(4, 1, 60 * MIB, 5000).unwrap(), vec![0u8; 5000]);
        let r = store.scrub(u64::MAX);
        assert!(r.corrupt.is_empty() && r.io_errors == 0, "{r:?}");
    }

    /// Goal: a write of many extents (some sharing a block with the one
    /// before, some far apart, some zeros) leaves the chunk as the same
    /// writes one by one would: same bytes, a table every block matches
    /// (a full scrub and a reopen find nothing wrong).
    #[test]
    fn write_extents_equals_the_writes_one_by_one() {
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let opts = small_4k();
        let bs = opts.block_size;
        let (batch, single) =
            (ChunkStore::open(d1.path(), opts.clone()).unwrap(), ChunkStore::open(d2.path(), opts.clone()).unwrap());
        let base = pattern(1, MIB as usize);
        for s in [&batch, &single] {
            s.write(3, 1, 0, &base[..MIB as usize / 2], true).unwrap();
        }
        let mut model = base[..MIB as usize / 2].to_vec();
        model.resize(MIB as usize, 0);
        // In order, not overlapping: shared blocks, whole blocks, a zero
        // block over data, runs far apart (separate table windows).
        let extents: Vec<(u64, u64)> = vec![
            (100, 50),
            (150, 4000),
            (bs * 3, bs),
            (bs * 4, 10),
            (bs * 4 + 20, bs * 2),
            (bs * 40, bs),
            (bs * 200, 3 * bs + 7),
            (MIB - 5, 5),
        ];
        let mut data = Vec::new();
        for (i, &(off, len)) in extents.iter().enumerate() {
            let part = if off == bs * 40 { vec![0u8; len as usize] } else { pattern(10 + i as u64, len as usize) };
            model[off as usize..(off + len) as usize].copy_from_slice(&part);
            single.write(3, 1, off, &part, false).unwrap();
            data.extend_from_slice(&part);
        }
        batch.write_extents(3, 1, &extents, &[&data[..7], &data[7..5000], &data[5000..]], None, Missing::Fail).unwrap();
        // A part that leaves a block all zeros (freed), then one writing into
        // the same block again: the second part's bytes must survive.
        let half = (bs / 2) as usize;
        for s in [&batch, &single] {
            s.write(3, 1, bs * 150, &pattern(7, half), false).unwrap();
        }
        model[(bs * 150) as usize..(bs * 150) as usize + half].copy_from_slice(&pattern(7, half));
        let tail = pattern(8, 100);
        let ext = [(bs * 150, bs / 2), (bs * 150 + bs / 2, 100)];
        batch.write_extents(3, 1, &ext, &[&vec![0u8; half][..], &tail[..]], None, Missing::Fail).unwrap();
        single.write(3, 1, bs * 150, &vec![0u8; half], false).unwrap();
        single.write(3, 1, bs * 150 + bs / 2, &tail, false).unwrap();
        model[(bs * 150) as usize..(bs * 150) as usize + half].fill(0);
        model[(bs * 150) as usize + half..(bs * 150) as usize + half + 100].copy_from_slice(&tail);
        for s in [&batch, &single] {
            assert_eq!(s.read(3, 1, 0, MIB).unwrap(), model);
            let r = s.scrub(u64::MAX);
            assert!(r.corrupt.is_empty() && r.io_errors == 0, "{r:?}");
        }
        assert_eq!(batch.used_bytes(), single.used_bytes(), "the zeroed block's space is freed in both");
        drop(batch);
        let batch = ChunkStore::open(d1.path(), opts).unwrap();
        assert_eq!(batch.read(3, 1, 0, MIB).unwrap(), model);
        // Bad shapes are refused before anything changes.
        assert!(matches!(
            batch.write_extents(3, 1, &[(0, 4), (2, 4)], &[[1; 8]], None, Missing::Fail),
            Err(ChunkStoreError::BadInput(_))
        ));
        assert!(matches!(
            batch.write_extents(3, 1, &[(0, 4)], &[[1; 5]], None, Missing::Fail),
            Err(ChunkStoreError::BadInput(_))
        ));
        assert_eq!(batch.read(3, 1, 0, MIB).unwrap(), model);
    }

    /// Goal: the writer's block sums are stored as made (a read and a scrub
    /// check them, as after a write hashed here); a block it calls zeros
    /// that is not, or one of zeros it gives a sum, is judged here by its
    /// bytes; sums that do not fit the extents are refused before anything
    /// changes.
    #[test]
    fn a_writers_block_sums_are_stored_as_made() {
        let dir = tempfile::tempdir().unwrap();
        let opts = small_4k();
        let bs = opts.block_size;
        let store = ChunkStore::open(dir.path(), opts).unwrap();
        store.write(3, 1, 0, &pattern(1, 8 * bs as usize), true).unwrap();
        let extents = [(0, bs), (2 * bs, 2 * bs), (6 * bs, bs)];
        let mut data = pattern(2, 4 * bs as usize);
        data[3 * bs as usize..].fill(0);
        let mut sums = fs_client::sums::extent_sums(3, &extents, &data, bs).expect("whole blocks").sums;
        assert_eq!(sums[3], ZERO_SUM);
        // A lie each way: block 2 "zeros" (it holds data), block 6 (zeros)
        // with a sum.
        sums[1] = ZERO_SUM;
        sums[3] = [9; 32];
        store.write_extents(3, 1, &extents, &[&data[..]], Some(&sums), Missing::Fail).unwrap();
        let mut model = pattern(1, 8 * bs as usize);
        model[..bs as usize].copy_from_slice(&data[..bs as usize]);
        model[2 * bs as usize..4 * bs as usize].copy_from_slice(&data[bs as usize..3 * bs as usize]);
        model[6 * bs as usize..7 * bs as usize].fill(0);
        assert_eq!(store.read(3, 1, 0, 8 * bs).unwrap(), model);
        let r = store.scrub(u64::MAX);
        assert!(r.corrupt.is_empty() && r.io_errors == 0, "{r:?}");
        let bad_count = store.write_extents(3, 1, &extents, &[&data[..]], Some(&sums[1..]), Missing::Fail);
        assert!(matches!(bad_count, Err(ChunkStoreError::BadInput(_))), "{bad_count:?}");
        let unaligned =
            store.write_extents(3, 1, &[(10, bs)], &[&data[..bs as usize]], Some(&sums[..1]), Missing::Fail);
        assert!(matches!(unaligned, Err(ChunkStoreError::BadInput(_))), "{unaligned:?}");
        assert_eq!(store.read(3, 1, 0, 8 * bs).unwrap(), model);
    }

    /// Goal: a failed checksum-table write leaves the blocks as they were,
    /// the block cache included (it held the new bytes of a partial write),
    /// and nothing reads as corrupt.
    #[test]
    fn a_failed_table_write_leaves_the_blocks_as_they_were() {
        let dir = tempfile::tempdir().unwrap();
        let opts = small_4k();
        let bs = opts.block_size;
        let store = ChunkStore::open(dir.path(), opts).unwrap();
        store.write(3, 1, 0, &pattern(1, bs as usize), true).unwrap();
        // A part of a never-written block (kept in the block cache as a
        // partial write) whose table write fails: the block stays
        // never-written, in the cache too.
        store.knobs.fail_table_write.store(true, Ordering::Relaxed);
        assert!(store.write(3, 1, 4 * bs + 10, &[7; 100], false).is_err());
        store.knobs.fail_table_write.store(false, Ordering::Relaxed);
        assert_eq!(store.read(3, 1, 4 * bs, bs).unwrap(), vec![0u8; bs as usize]);
        let r = store.scrub(u64::MAX);
        assert!(r.corrupt.is_empty() && r.io_errors == 0, "{r:?}");
    }

    /// Goal: when a data write fails part way through a batch, the extents
    /// before it are written with matching checksums, the failed one's
    /// blocks hold old or new content with matching checksums (here new,
    /// including a block it shares with the extent before), the extents
    /// after it are not applied, and nothing reads as corrupt.
    #[test]
    fn a_failed_extent_keeps_the_batch_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let opts = small_4k();
        let bs = opts.block_size;
        let store = ChunkStore::open(dir.path(), opts).unwrap();
        let base = pattern(1, MIB as usize);
        store.write(3, 1, 0, &base, true).unwrap();
        // The second extent writes the first half of block 1, the third
        // (whose data write fails) the second half and block 2.
        let extents = vec![(10, 100), (bs, bs / 2), (bs + bs / 2, bs + bs / 2), (bs * 8, bs)];
        let parts: Vec<Vec<u8>> = (0..4).map(|i| pattern(20 + i, extents[i as usize].1 as usize)).collect();
        store.knobs.fail_data_write.store(3, Ordering::Relaxed);
        let err = store.write_extents(3, 1, &extents, &parts, None, Missing::Fail).unwrap_err();
        assert!(matches!(err, ChunkStoreError::Io { .. }), "{err}");
        let mut want = base.clone();
        for (i, &(off, len)) in extents[..2].iter().enumerate() {
            want[off as usize..(off + len) as usize].copy_from_slice(&parts[i]);
        }
        // The failed write did reach the disk (the knob fails it after):
        // its blocks keep the new content, one of them shared with the
        // extent before, whose entry was written first.
        let (off, len) = extents[2];
        want[off as usize..(off + len) as usize].copy_from_slice(&parts[2]);
        assert_eq!(store.read(3, 1, 0, MIB).unwrap(), want, "extents up to the failed one applied, the rest untouched");
        let r = store.scrub(u64::MAX);
        assert!(r.corrupt.is_empty() && r.io_errors == 0, "{r:?}");
    }

    /// 16 blocks of 64 KiB.
    fn small() -> StoreOptions {
        StoreOptions {
            chunk_size: MIB,
            block_size: 64 * KIB,
            max_open_files: 8,
            reserved_bytes: 0,
            cache_bytes: MIB,
            direct_io: true,
        }
    }

    /// [`small`] with the 4 KiB blocks of clusters made now.
    fn small_4k() -> StoreOptions {
        StoreOptions { block_size: 4 * KIB, ..small() }
    }

    /// Deterministic pseudo-random bytes (xorshift), never all zero for long.
    fn pattern(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    fn chunk_file(dir: &Path, id: ChunkId, version: u64) -> PathBuf {
        dir.join(CHUNKS_DIR).join(format!("{:02x}", id & 0xff)).join(chunk_file_name(id, version))
    }

    fn flip_byte(path: &Path, offset: u64) {
        let f = OpenOptions::new().read(true).write(true).open(path).unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, offset).unwrap();
        b[0] ^= 0x40;
        f.write_all_at(&b, offset).unwrap();
    }

    fn count_files(dir: &Path) -> usize {
        fs::read_dir(dir).unwrap().count()
    }

    fn data_off(o: &StoreOptions) -> u64 {
        Geometry::new(o.chunk_size, o.block_size).unwrap().data_off
    }

    /// Goal: the store is shareable across threads.
    #[test]
    fn store_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<ChunkStore>();
    }

    /// Goal: bad options are refused, not stored.
    #[test]
    fn options_are_validated() {
        let dir = tempfile::tempdir().unwrap();
        for (cs, bs) in [(MIB, 3000), (MIB, 2 * KIB), (MIB + 4 * KIB, 64 * KIB), (0, 4 * KIB), (8 << 30, 64 * KIB)] {
            let opts = StoreOptions { chunk_size: cs, block_size: bs, ..tiny() };
            assert!(matches!(ChunkStore::open(dir.path(), opts), Err(ChunkStoreError::BadInput(_))), "{cs}/{bs}");
        }
        let opts = StoreOptions { max_open_files: 0, ..tiny() };
        assert!(matches!(ChunkStore::open(dir.path(), opts), Err(ChunkStoreError::BadInput(_))));
    }

    /// Goal: a second store cannot open a directory in use.
    #[test]
    fn directory_is_locked() {
        let dir = tempfile::tempdir().unwrap();
        let _a = ChunkStore::open(dir.path(), tiny()).unwrap();
        assert!(matches!(ChunkStore::open(dir.path(), tiny()), Err(ChunkStoreError::Io { .. })));
    }

    /// Goal: every offset/length around block boundaries round-trips.
    /// Method: write random bytes at each combination, compare with a model after each write.
    #[test]
    fn roundtrip_every_alignment() {
        let dir = tempfile::tempdir().unwrap();
        let opts = tiny();
        let cs = opts.chunk_size;
        let store = ChunkStore::open(dir.path(), opts).unwrap();
        let mut model = vec![0u8; cs as usize];
        let offsets = [0, 1, 100, 4095, 4096, 4097, 8191, 8192, 12287, cs - 4097, cs - 4096, cs - 1];
        let lens = [0, 1, 2, 4095, 4096, 4097, 8191, 8192, 8193, 12289, 30000];
        let mut seed = 1;
        for &off in &offsets {
            for &len in &lens {
                let len = len.min(cs - off);
                seed += 1;
                let data = pattern(seed, len as usize);
                store.write(7, 1, off, &data, true).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
                assert_eq!(store.read(7, 1, off, len).unwrap(), data, "off {off} len {len}");
                // Reads at other alignments over the same area, and the whole chunk.
                let (ro, rl) = (off.saturating_sub(3), (len + 7).min(cs - off.saturating_sub(3)));
                assert_eq!(store.read(7, 1, ro, rl).unwrap(), model[ro as usize..(ro + rl) as usize]);
            }
        }
        assert_eq!(store.read(7, 1, 0, cs).unwrap(), model);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Write { off: u64, len: u64, seed: u64 },
        Zero { off: u64, len: u64 },
        Read { off: u64, len: u64 },
        Reopen,
    }

    fn range(cs: u64) -> impl Strategy<Value = (u64, u64)> {
        let off = prop_oneof![
            0..cs,
            (0..16u64, prop_oneof![Just(0u64), Just(1), Just(4095), 0..4096u64]).prop_map(|(b, d)| b * 4096 + d)
        ];
        let len = prop_oneof![Just(0u64), 1..16u64, Just(4096), 4090..4200u64, 0..=cs];
        (off, len).prop_map(move |(o, l)| {
            let o = o.min(cs);
            (o, l.min(cs - o))
        })
    }

    fn op(cs: u64) -> impl Strategy<Value = Op> {
        prop_oneof![
            5 => (range(cs), any::<u64>()).prop_map(|((off, len), seed)| Op::Write { off, len, seed }),
            2 => range(cs).prop_map(|(off, len)| Op::Zero { off, len }),
            2 => range(cs).prop_map(|(off, len)| Op::Read { off, len }),
            1 => Just(Op::Reopen),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// Goal: write/zero/read agree with a byte-vector model at random
        /// alignments, across reopens of the store; scrub finds nothing wrong.
        #[test]
        fn model_roundtrip(ops in proptest::collection::vec(op(64 * KIB), 1..24)) {
            let dir = tempfile::tempdir().unwrap();
            let opts = tiny();
            let cs = opts.chunk_size;
            let mut store = ChunkStore::open(dir.path(), opts.clone()).unwrap();
            let mut model: Option<Vec<u8>> = None;
            for op in ops {
                match op {
                    Op::Write { off, len, seed } => {
                        let data = pattern(seed, len as usize);
                        store.write(3, 9, off, &data, true).unwrap();
                        model.get_or_insert_with(|| vec![0; cs as usize])[off as usize..(off + len) as usize]
                            .copy_from_slice(&data);
                    }
                    Op::Zero { off, len } => match &mut model {
                        Some(m) => {
                            store.zero(3, 9, off, len).unwrap();
                            m[off as usize..(off + len) as usize].fill(0);
                        }
                        None => prop_assert!(matches!(store.zero(3, 9, off, len), Err(ChunkStoreError::NotFound(3)))),
                    },
                    Op::Read { off, len } => match &model {
                        Some(m) => prop_assert_eq!(store.read(3, 9, off, len).unwrap(), &m[off as usize..(off + len) as usize]),
                        None => prop_assert!(matches!(store.read(3, 9, off, len), Err(ChunkStoreError::NotFound(3)))),
                    },
                    Op::Reopen => {
                        drop(store);
                        store = ChunkStore::open(dir.path(), opts.clone()).unwrap();
                    }
                }
            }
            if let Some(m) = &model {
                prop_assert_eq!(&store.read(3, 9, 0, cs).unwrap(), m);
                // Zeroed blocks are holes again: allocation never exceeds what the data needs.
                let nonzero_blocks = m.chunks(4096).filter(|b| b.iter().any(|&x| x != 0)).count() as u64;
                // Slack: ext4 counts extent-tree blocks of a fragmented file in st_blocks.
                let bound = data_off(&opts) + nonzero_blocks * 4096 + 2 * 4096;
                prop_assert!(store.used_bytes() <= bound, "used {} > {}", store.used_bytes(), bound);
            }
            let report = store.scrub(u64::MAX);
            prop_assert!(report.corrupt.is_empty() && report.pass_completed && report.io_errors == 0);
        }
    }

    /// Goal: holes and unwritten tails read as zeros; ranges outside the chunk are refused.
    #[test]
    fn holes_and_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), small()).unwrap();
        let data = pattern(5, 1000);
        store.write(1, 1, 300 * KIB + 17, &data, true).unwrap();
        assert_eq!(store.read(1, 1, 0, 300 * KIB + 17).unwrap(), vec![0; (300 * KIB + 17) as usize]);
        assert_eq!(store.read(1, 1, 300 * KIB + 17, 1000).unwrap(), data);
        assert_eq!(
            store.read(1, 1, 300 * KIB + 1017, MIB - 300 * KIB - 1017).unwrap(),
            vec![0; (MIB - 300 * KIB - 1017) as usize]
        );
        assert!(store.read(1, 1, MIB, 0).unwrap().is_empty());
        for (off, len) in [(MIB, 1), (MIB - 1, 2), (u64::MAX, 2), (2 * MIB, 0)] {
            assert!(matches!(store.read(1, 1, off, len), Err(ChunkStoreError::OutOfRange { .. })), "{off}+{len}");
        }
        assert!(matches!(store.write(1, 1, MIB - 1, &[1, 2], false), Err(ChunkStoreError::OutOfRange { .. })));
        assert!(matches!(store.zero(1, 1, MIB - 1, 2), Err(ChunkStoreError::OutOfRange { .. })));
        assert!(matches!(store.read(2, 1, 0, 1), Err(ChunkStoreError::NotFound(2))));
        assert!(matches!(store.write(2, 1, 0, &[1], false), Err(ChunkStoreError::NotFound(2))));
        // Only the written block and the header/table take space.
        assert_eq!(store.used_bytes(), on_disk(dir.path()));
        assert!(store.used_bytes() <= data_off(&small()) + 64 * KIB + 8 * KIB);
    }

    /// `n` bytes of `pattern(seed)` in memory aligned for `O_DIRECT`.
    fn aligned(seed: u64, n: usize) -> bytes::Bytes {
        let mut b = aligned_buffer(n);
        b.extend_from_slice(&pattern(seed, n));
        let b = b.freeze();
        assert!((b.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN));
        b
    }

    /// Goal: large aligned writes go around the page cache and stay
    /// coherent with buffered writes and reads of the same blocks, across a
    /// version change (a rename) and an import that replaces the file; a
    /// reopened store reads them back. The direct descriptor must name the
    /// chunk's current file: one left on a replaced file would lose writes.
    #[test]
    fn large_aligned_writes_go_direct_and_stay_coherent() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), small()).unwrap();
        let mut model = vec![0u8; MIB as usize];
        let put = |store: &ChunkStore, version: u64, off: u64, data: &[u8], model: &mut Vec<u8>| {
            store.write(7, version, off, data, true).unwrap();
            model[off as usize..off as usize + data.len()].copy_from_slice(data);
            assert_eq!(store.read(7, version, 0, MIB).unwrap(), *model, "after a write at {off}");
        };
        let big = aligned(1, 512 * KIB as usize);
        put(&store, 1, 0, &big, &mut model);
        // A buffered write inside what went direct, then a direct one over both.
        put(&store, 1, 100 * KIB + 3, &pattern(2, 5000), &mut model);
        let direct = lock(&store.files).get(7).unwrap().direct.get().map(Option::is_some);
        assert_eq!(direct, Some(true), "the large write opened an O_DIRECT descriptor");
        put(&store, 1, 64 * KIB, &aligned(3, 256 * KIB as usize), &mut model);
        // Not aligned in memory: buffered, still right.
        put(&store, 1, 128 * KIB, &pattern(4, 128 * KIB as usize), &mut model);
        store.set_version(7, 1, 2).unwrap();
        put(&store, 2, 512 * KIB, &aligned(5, 512 * KIB as usize), &mut model);
        store.flush(&[7]).unwrap();
        // An import replaces the file (a new inode): later direct writes land in it.
        let other_dir = tempfile::tempdir().unwrap();
        let other = ChunkStore::open(other_dir.path(), small()).unwrap();
        other.write(7, 3, 0, &model, true).unwrap();
        let mut exported = Vec::new();
        other.export(7, 3, &mut exported).unwrap();
        store.import(7, 3, &mut exported.as_slice()).unwrap();
        put(&store, 3, 0, &aligned(6, 192 * KIB as usize), &mut model);
        store.flush(&[7]).unwrap();
        drop(store);
        let store = ChunkStore::open(dir.path(), small()).unwrap();
        assert_eq!(store.read(7, 3, 0, MIB).unwrap(), model, "after reopening");
        assert_eq!(store.scrub(u64::MAX).corrupt, Vec::<ChunkId>::new());
    }

    /// Goal: a long read goes around the page cache and still sees writes
    /// that are only in it (dirty, not yet written back), whole or partial
    /// blocks; short reads stay buffered.
    #[test]
    fn large_reads_go_direct_and_see_buffered_writes() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), small()).unwrap();
        let mut model = vec![0u8; MIB as usize];
        for (i, off) in [0u64, 70 * KIB + 1, 300 * KIB, MIB - 5000].into_iter().enumerate() {
            let data = pattern(i as u64 + 1, 5000);
            store.write(8, 1, off, &data, true).unwrap();
            model[off as usize..off as usize + data.len()].copy_from_slice(&data);
        }
        let direct = || lock(&store.files).get(8).unwrap().direct.get().map(Option::is_some);
        assert_eq!(store.read(8, 1, 0, 4096).unwrap(), model[..4096], "a short read");
        assert_eq!(direct(), None, "a short read stays buffered");
        assert_eq!(store.read(8, 1, 0, MIB).unwrap(), model, "the whole chunk");
        assert_eq!(direct(), Some(true), "the long read opened the O_DIRECT descriptor");
        // Unaligned ends inside the blocks read.
        let (a, b) = (70 * KIB as usize + 7, 900 * KIB as usize + 3);
        assert_eq!(store.read(8, 1, a as u64, (b - a) as u64).unwrap(), model[a..b]);
    }

    /// Goal: versions must match exactly; set_version is atomic and durable
    /// across reopen; after a "crash" with two versions on disk the highest wins.
    #[test]
    fn versions() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), small()).unwrap();
        let data = pattern(1, 5000);
        store.write(10, 3, 0, &data, true).unwrap();
        let mismatch = |r: Result<()>| matches!(r, Err(ChunkStoreError::VersionMismatch { id: 10, have: 3, want: 4 }));
        assert!(matches!(store.read(10, 4, 0, 1), Err(ChunkStoreError::VersionMismatch { id: 10, have: 3, want: 4 })));
        assert!(mismatch(store.write(10, 4, 0, &[1], false)));
        assert!(mismatch(store.write(10, 4, 0, &[1], true)));
        assert!(mismatch(store.zero(10, 4, 0, 1)));
        assert!(matches!(store.set_version(10, 4, 5), Err(ChunkStoreError::VersionMismatch { have: 3, want: 4, .. })));
        assert!(matches!(store.set_version(11, 1, 2), Err(ChunkStoreError::NotFound(11))));
        store.set_version(10, 3, 4).unwrap();
        store.set_version(10, 3, 4).unwrap(); // idempotent
        assert_eq!(store.version(10), Some(4));
        assert_eq!(store.read(10, 4, 0, 5000).unwrap(), data);
        assert!(chunk_file(dir.path(), 10, 4).exists() && !chunk_file(dir.path(), 10, 3).exists());
        drop(store);

        let store = ChunkStore::open(dir.path(), small()).unwrap();
        assert_eq!(store.list(), vec![(10, 4)]);
        assert_eq!(store.read(10, 4, 0, 5000).unwrap(), data);
        drop(store);

        // A crash between an import's rename and its unlink leaves two versions.
        fs::copy(chunk_file(dir.path(), 10, 4), chunk_file(dir.path(), 10, 7)).unwrap();
        fs::copy(chunk_file(dir.path(), 10, 4), chunk_file(dir.path(), 10, 2)).unwrap();
        let store = ChunkStore::open(dir.path(), small()).unwrap();
        assert_eq!(store.list(), vec![(10, 7)]);
        assert_eq!(store.read(10, 7, 0, 5000).unwrap(), data);
        assert!(!chunk_file(dir.path(), 10, 4).exists() && !chunk_file(dir.path(), 10, 2).exists());
        assert_eq!(store.len(), 1);
    }

    /// Goal: a flipped data byte is reported with its block, the other blocks
    /// still read, scrub quarantines the replica; a whole-block overwrite heals a block.
    #[test]
    fn data_corruption_is_detected_and_scrubbed() {
        let dir = tempfile::tempdir().unwrap();
        let opts = small();
        let store = ChunkStore::open(dir.path(), opts.clone()).unwrap();
        let data = pattern(9, MIB as usize);
        store.write(5, 1, 0, &data, true).unwrap();
        store.write(6, 1, 0, &data, true).unwrap();
        store.flush(&[5, 6]).unwrap();
        let path = chunk_file(dir.path(), 5, 1);
        flip_byte(&path, data_off(&opts) + 3 * 64 * KIB + 1234);

        assert!(matches!(store.read(5, 1, 3 * 64 * KIB + 10, 1), Err(ChunkStoreError::Corrupt { id: 5, block: 3 })));
        assert!(matches!(store.read(5, 1, 0, MIB), Err(ChunkStoreError::Corrupt { id: 5, block: 3 })));
        assert_eq!(
            store.read(5, 1, 4 * 64 * KIB, 64 * KIB).unwrap(),
            &data[4 * 64 * KIB as usize..5 * 64 * KIB as usize]
        );
        // A partial write must not silently merge with the corrupt block.
        assert!(matches!(store.write(5, 1, 3 * 64 * KIB, &[1], false), Err(ChunkStoreError::Corrupt { block: 3, .. })));

        // Scrub with a small budget: several calls, then the pass completes.
        let mut corrupt = Vec::new();
        let mut calls = 0;
        loop {
            let r = store.scrub(300 * KIB);
            assert!(r.bytes_verified <= 300 * KIB + 64 * KIB + 4096 + 4096, "{r:?}");
            corrupt.extend(r.corrupt);
            calls += 1;
            if r.pass_completed {
                break;
            }
            assert!(calls < 100);
        }
        assert!(calls > 2);
        assert_eq!(corrupt, vec![5]);
        // Set aside, not "never written": a reader must not take it for zeros.
        assert!(matches!(store.read(5, 1, 0, 1), Err(ChunkStoreError::Quarantined(5))));
        assert!(!path.exists());
        assert_eq!(count_files(&dir.path().join(QUARANTINE_DIR)), 1);
        assert_eq!(store.list(), vec![(6, 1)]);

        // A whole-block overwrite replaces a corrupt block (no read of the old one).
        flip_byte(&chunk_file(dir.path(), 6, 1), data_off(&opts) + 10);
        assert!(matches!(store.read(6, 1, 0, 1), Err(ChunkStoreError::Corrupt { block: 0, .. })));
        store.write(6, 1, 0, &data[..64 * KIB as usize], false).unwrap();
        assert_eq!(store.read(6, 1, 0, MIB).unwrap(), data);
        // So does zeroing it.
        flip_byte(&chunk_file(dir.path(), 6, 1), data_off(&opts) + 64 * KIB + 10);
        store.zero(6, 1, 64 * KIB, 64 * KIB).unwrap();
        assert_eq!(store.read(6, 1, 64 * KIB, 64 * KIB).unwrap(), vec![0; 64 * KIB as usize]);
        let r = store.scrub(u64::MAX);
        assert!(r.corrupt.is_empty() && r.pass_completed, "{r:?}");

        // quarantine() on demand, and NotFound once gone.
        store.quarantine(6).unwrap();
        assert!(matches!(store.quarantine(6), Err(ChunkStoreError::NotFound(6))));
        assert!(store.is_empty() && store.used_bytes() == 0);
        assert_eq!(count_files(&dir.path().join(QUARANTINE_DIR)), 2);

        // Still known as set aside after a restart; forgotten once deleted
        // (garbage collected), and a new replica is served again.
        drop(store);
        let store = ChunkStore::open(dir.path(), opts.clone()).unwrap();
        assert!(matches!(store.read(5, 1, 0, 1), Err(ChunkStoreError::Quarantined(5))));
        assert!(matches!(store.read(6, 1, 0, 1), Err(ChunkStoreError::Quarantined(6))));
        // Not made again empty by a write (it would read as zeros elsewhere).
        assert!(matches!(store.write(6, 1, 0, &data[..10], true), Err(ChunkStoreError::Quarantined(6))));
        store.delete(5).unwrap();
        assert!(matches!(store.read(5, 1, 0, 1), Err(ChunkStoreError::NotFound(5))));
        store.write(5, 2, 0, &data, true).unwrap();
        assert_eq!(store.read(5, 2, 0, MIB).unwrap(), data);
    }

    /// Goal: the inline (page-cache only) read returns what the ordinary
    /// read returns, holes as zeros, checks the same checksums, and checks
    /// the version; it only declines (None) when it would have to wait.
    #[test]
    fn cached_reads_match_ordinary_reads_and_check_sums() {
        let dir = tempfile::tempdir().unwrap();
        // Without the block cache, which would answer the second read.
        let opts = StoreOptions { cache_bytes: 0, ..small() };
        let store = ChunkStore::open(dir.path(), opts.clone()).unwrap();
        let data = pattern(3, 3 * 64 * KIB as usize);
        store.write(8, 1, 64 * KIB, &data, true).unwrap();
        for (off, len) in [(0, 4 * KIB), (64 * KIB, 4 * KIB), (60 * KIB, 8 * KIB), (100 * KIB, 64 * KIB), (0, 0)] {
            let want = store.read(8, 1, off, len).unwrap();
            // Just written, so in the page cache: answered inline.
            let got = store.try_read_cached(8, 1, off, len).unwrap().expect("cached");
            assert_eq!(got, want, "{off}+{len}");
        }
        assert!(matches!(store.try_read_cached(8, 2, 0, 1), Err(ChunkStoreError::VersionMismatch { .. })));
        assert!(matches!(store.try_read_cached(9, 1, 0, 1), Err(ChunkStoreError::NotFound(9))));
        assert!(matches!(store.try_read_cached(8, 1, MIB, 1), Err(ChunkStoreError::OutOfRange { .. })));
        store.flush(&[8]).unwrap();
        flip_byte(&chunk_file(dir.path(), 8, 1), data_off(&opts) + 2 * 64 * KIB + 7);
        match store.try_read_cached(8, 1, 2 * 64 * KIB, 10) {
            Err(ChunkStoreError::Corrupt { id: 8, block: 2 }) | Ok(None) => {}
            other => panic!("a flipped byte must not be served: {other:?}"),
        }
        assert!(matches!(store.read(8, 1, 2 * 64 * KIB, 10), Err(ChunkStoreError::Corrupt { id: 8, block: 2 })));
    }

    /// Goal: the block cache serves what was verified and nothing older than
    /// the last change: a byte flipped on disk after a read is not seen
    /// (the cached copy passed its check; the scrubber still finds the
    /// damage), a write or zeroing is seen at once, a chunk deleted and made
    /// again at the same id and version reads its new bytes, a fence keeps
    /// the cache, and long reads do not fill it.
    #[test]
    fn block_cache_serves_verified_bytes_and_forgets_changes() {
        let dir = tempfile::tempdir().unwrap();
        let opts = small();
        let store = ChunkStore::open(dir.path(), opts.clone()).unwrap();
        let data = pattern(5, 4 * 64 * KIB as usize);
        store.write(8, 1, 0, &data, true).unwrap();
        store.flush(&[8]).unwrap();
        assert_eq!(store.read(8, 1, 4 * KIB, 4 * KIB).unwrap(), &data[4 * KIB as usize..8 * KIB as usize]);
        let hits = store.cache_stats().hits;
        flip_byte(&chunk_file(dir.path(), 8, 1), data_off(&opts) + 5 * KIB);
        assert_eq!(store.read(8, 1, 5 * KIB, 16).unwrap(), &data[5 * KIB as usize..5 * KIB as usize + 16]);
        assert_eq!(store.cache_stats().hits, hits + 1, "answered from the cache");
        assert_eq!(store.try_read_cached(8, 1, 0, 64 * KIB).unwrap().unwrap(), &data[..64 * KIB as usize]);
        assert_eq!(store.scrub(u64::MAX).corrupt, vec![8], "the damage on disk is still found");
        assert!(store.is_empty(), "and the replica quarantined");

        store.write(9, 1, 0, &data, true).unwrap();
        assert_eq!(store.read(9, 1, 0, 100).unwrap(), &data[..100]);
        store.write(9, 1, 10, b"new bytes", false).unwrap();
        let hits = store.cache_stats().hits;
        assert_eq!(&store.read(9, 1, 0, 100).unwrap()[10..19], b"new bytes");
        assert_eq!(store.cache_stats().hits, hits + 1, "a small write leaves its blocks cached");
        // A partial write takes the old bytes of its block from the cache: a
        // byte damaged on disk since is not copied into the new block.
        store.flush(&[9]).unwrap();
        flip_byte(&chunk_file(dir.path(), 9, 1), data_off(&opts) + 30);
        store.write(9, 1, 20, b"more", false).unwrap();
        let mut want = data[..64 * KIB as usize].to_vec();
        want[10..19].copy_from_slice(b"new bytes");
        want[20..24].copy_from_slice(b"more");
        store.flush(&[9]).unwrap();
        assert_eq!(store.read(9, 1, 0, 64 * KIB).unwrap(), want);
        assert!(store.scrub(u64::MAX).corrupt.is_empty(), "the write healed the damaged block");
        store.zero(9, 1, 0, 64 * KIB).unwrap();
        assert_eq!(store.read(9, 1, 0, 100).unwrap(), vec![0; 100]);
        assert_eq!(store.read(9, 1, 64 * KIB, 8).unwrap(), &data[64 * KIB as usize..64 * KIB as usize + 8]);
        assert!(store.set_versions(&[(9, 1, 2)], false)[0].is_ok());
        let hits = store.cache_stats().hits;
        assert_eq!(store.read(9, 2, 64 * KIB, 8).unwrap(), &data[64 * KIB as usize..64 * KIB as usize + 8]);
        assert_eq!(store.cache_stats().hits, hits + 1, "a fence keeps the cached blocks");
        assert!(matches!(store.read(9, 1, 64 * KIB, 8), Err(ChunkStoreError::VersionMismatch { .. })));
        store.delete(9).unwrap();
        store.write(9, 2, 64 * KIB, b"again", true).unwrap();
        assert_eq!(&store.read(9, 2, 64 * KIB, 8).unwrap()[..], *b"again\0\0\0");

        let misses = store.cache_stats().misses;
        let long = pattern(6, (crate::chunk::cache::MAX_FILL_BLOCKS + 1) * 64 * KIB as usize);
        store.write(10, 1, 0, &long, true).unwrap();
        for _ in 0..2 {
            assert_eq!(store.read(10, 1, 0, long.len() as u64).unwrap(), long);
        }
        assert_eq!(store.cache_stats().misses, misses + 2, "a long read neither fills nor hits");
    }

    /// Goal: a torn checksum table entry (crash between data and table write)
    /// reads as Corrupt, like media damage.
    #[test]
    fn torn_table_entry_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), small()).unwrap();
        store.write(1, 1, 0, &pattern(1, 200 * KIB as usize), true).unwrap();
        flip_byte(&chunk_file(dir.path(), 1, 1), HEADER_SIZE + 2 * SUM_SIZE + 5);
        assert!(matches!(store.read(1, 1, 0, MIB), Err(ChunkStoreError::Corrupt { id: 1, block: 2 })));
    }

    /// Goal: at open, damaged headers, misnamed files and truncated files are
    /// quarantined and the rest is indexed; another geometry is a hard error.
    #[test]
    fn open_quarantines_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), small()).unwrap();
        for id in 1..=4 {
            store.write(id, 1, 0, &pattern(id, 1000), true).unwrap();
        }
        drop(store);
        flip_byte(&chunk_file(dir.path(), 1, 1), 20); // header field (chunk id)
        flip_byte(&chunk_file(dir.path(), 2, 1), 1000); // reserved header byte, covered by the checksum
        let f = OpenOptions::new().write(true).open(chunk_file(dir.path(), 3, 1)).unwrap();
        f.set_len(100 * KIB).unwrap();
        drop(f);
        fs::write(dir.path().join("chunks/04/garbage"), b"x").unwrap();
        fs::write(dir.path().join("chunks/04/0000000000000004.v01"), b"x").unwrap(); // not canonical
        fs::copy(chunk_file(dir.path(), 4, 1), dir.path().join("chunks/05/0000000000000004.v9")).unwrap(); // wrong subdir
        fs::write(dir.path().join("chunks/stray"), b"x").unwrap();
        fs::write(dir.path().join("tmp/leftover"), b"x").unwrap();

        let store = ChunkStore::open(dir.path(), small()).unwrap();
        assert_eq!(store.list(), vec![(4, 1)]);
        assert_eq!(store.read(4, 1, 0, 1000).unwrap(), pattern(4, 1000));
        assert_eq!(count_files(&dir.path().join(QUARANTINE_DIR)), 7);
        assert_eq!(count_files(&dir.path().join(TMP_DIR)), 0);
        drop(store);

        let other = small_4k();
        assert!(matches!(ChunkStore::open(dir.path(), other), Err(ChunkStoreError::BadInput(_))));

        // An intact header of a newer format (a downgrade) is refused, not quarantined.
        let path = chunk_file(dir.path(), 4, 1);
        let f = OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let mut hdr = vec![0u8; HEADER_SIZE as usize];
        f.read_exact_at(&mut hdr, 0).unwrap();
        hdr[8..12].copy_from_slice(&2u32.to_le_bytes());
        let sum = header_sum(&hdr);
        hdr[HDR_FIELDS_END..HDR_SUM_END].copy_from_slice(&sum);
        f.write_all_at(&hdr, 0).unwrap();
        assert!(matches!(ChunkStore::open(dir.path(), small()), Err(ChunkStoreError::BadInput(_))));
        assert!(path.exists());
    }

    /// Goal: export -> import into another store reproduces the chunk (holes
    /// included), damaged streams are refused and leave nothing behind, and
    /// versions are respected.
    #[test]
    fn export_import() {
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = ChunkStore::open(da.path(), small()).unwrap();
        let b = ChunkStore::open(db.path(), small()).unwrap();
        a.write(42, 5, 100, &pattern(1, 70_000), true).unwrap();
        a.write(42, 5, 600 * KIB, &pattern(2, 10), false).unwrap();
        let want = a.read(42, 5, 0, MIB).unwrap();

        let mut stream = Vec::new();
        let n = a.export(42, 5, &mut stream).unwrap();
        assert_eq!(n, stream.len() as u64);
        // 3 data blocks, 13 holes.
        assert_eq!(n, 48 + 3 * (1 + 64 * KIB + 32) + 13 + 33);
        assert!(matches!(a.export(42, 4, &mut Vec::new()), Err(ChunkStoreError::VersionMismatch { .. })));

        // Damaged streams: a data byte, a tag, a checksum, the trailer, truncation, wrong id.
        let data_at = 48 + 1 + 500;
        let hole_tag_at = 48 + 2 * (1 + 64 * KIB as usize + 32);
        assert_eq!(stream[hole_tag_at], TAG_HOLE);
        for (what, damaged) in [
            ("data", flip(&stream, data_at)),
            ("tag", flip(&stream, hole_tag_at)),
            ("tag to data", {
                let mut s = stream.clone();
                s[hole_tag_at] = TAG_DATA;
                s
            }),
            ("checksum", flip(&stream, 48 + 1 + 64 * KIB as usize + 3)),
            ("trailer", flip(&stream, stream.len() - 1)),
            ("truncated", stream[..stream.len() - 40].to_vec()),
            ("header", flip(&stream, 17)),
        ] {
            let r = b.import(42, 5, &mut &damaged[..]);
            assert!(matches!(r, Err(ChunkStoreError::BadInput(_))), "{what}: {r:?}");
            assert!(b.is_empty());
            assert_eq!(count_files(&db.path().join(TMP_DIR)), 0);
        }
        assert!(matches!(b.import(43, 5, &mut &stream[..]), Err(ChunkStoreError::BadInput(_))));

        b.import(42, 5, &mut &stream[..]).unwrap();
        assert_eq!(b.read(42, 5, 0, MIB).unwrap(), want);
        assert_eq!(b.used_bytes(), a.used_bytes());
        assert!(matches!(b.import(42, 5, &mut &stream[..]), Err(ChunkStoreError::Exists)));
        assert!(b.scrub(u64::MAX).corrupt.is_empty());

        // A newer version replaces the local one; an older one is refused.
        a.write(42, 5, 0, &pattern(3, 64 * KIB as usize), false).unwrap();
        a.set_version(42, 5, 6).unwrap();
        let mut newer = Vec::new();
        a.export(42, 6, &mut newer).unwrap();
        b.import(42, 6, &mut &newer[..]).unwrap();
        assert_eq!(b.list(), vec![(42, 6)]);
        assert_eq!(b.read(42, 6, 0, MIB).unwrap(), a.read(42, 6, 0, MIB).unwrap());
        assert!(!chunk_file(db.path(), 42, 5).exists());
        assert!(matches!(b.import(42, 5, &mut &stream[..]), Err(ChunkStoreError::VersionMismatch { have: 6, .. })));
        drop(b);
        let b = ChunkStore::open(db.path(), small()).unwrap();
        assert_eq!(b.read(42, 6, 0, MIB).unwrap(), a.read(42, 6, 0, MIB).unwrap());

        // Export refuses to ship a corrupt replica.
        flip_byte(&chunk_file(da.path(), 42, 6), data_off(&small()) + 5);
        assert!(matches!(a.export(42, 6, &mut Vec::new()), Err(ChunkStoreError::Corrupt { block: 0, .. })));
    }

    fn flip(s: &[u8], at: usize) -> Vec<u8> {
        let mut s = s.to_vec();
        s[at] ^= 1;
        s
    }

    /// Goal: 8 threads writing overlapping, unaligned ranges of one chunk (and
    /// 2 reading it) never corrupt a block or see one half-written.
    /// Method: each thread writes its own byte value; at the end every byte
    /// must hold the value of some thread that wrote it (or 0), and all checksums verify.
    #[test]
    fn concurrent_writers_one_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let opts = StoreOptions { chunk_size: 256 * KIB, block_size: 4 * KIB, ..tiny() };
        let cs = opts.chunk_size;
        let store = ChunkStore::open(dir.path(), opts).unwrap();
        store.write(1, 1, 0, &[], true).unwrap();
        let done = AtomicBool::new(false);
        let ranges: Vec<Vec<(u64, u64)>> = std::thread::scope(|s| {
            for r in 0..2u64 {
                let (store, done) = (&store, &done);
                s.spawn(move || {
                    let mut x = r + 1;
                    while !done.load(Ordering::Relaxed) {
                        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        let off = (x >> 33) % cs;
                        let len = ((x >> 7) % 20_000).min(cs - off);
                        store.read(1, 1, off, len).expect("concurrent read");
                    }
                });
            }
            let writers: Vec<_> = (0..8u64)
                .map(|t| {
                    let store = &store;
                    s.spawn(move || {
                        let mut x = t * 7919 + 3;
                        let mut mine = Vec::new();
                        for _ in 0..150 {
                            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                            let off = (x >> 33) % cs;
                            let len = ((x >> 11) % 20_000 + 1).min(cs - off);
                            store.write(1, 1, off, &vec![t as u8 + 1; len as usize], false).expect("write");
                            mine.push((off, len));
                        }
                        mine
                    })
                })
                .collect();
            let out = writers.into_iter().map(|h| h.join().unwrap()).collect();
            done.store(true, Ordering::Relaxed);
            out
        });
        let content = store.read(1, 1, 0, cs).unwrap();
        for (i, &byte) in content.iter().enumerate() {
            let i = i as u64;
            let writers: Vec<u8> =
                (0..8).filter(|&t| ranges[t].iter().any(|&(o, l)| o <= i && i < o + l)).map(|t| t as u8 + 1).collect();
            if writers.is_empty() {
                assert_eq!(byte, 0, "byte {i}");
            } else {
                assert!(writers.contains(&byte), "byte {i} = {byte}, written by {writers:?}");
            }
        }
        assert!(store.scrub(u64::MAX).corrupt.is_empty());
    }

    /// Goal: lock_exclusive holds writes back but not reads; dropping it lets them through.
    #[test]
    fn exclusive_lock_blocks_writes() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), small()).unwrap();
        store.write(1, 1, 0, &[1; 100], true).unwrap();
        let written = AtomicBool::new(false);
        std::thread::scope(|s| {
            let guard = store.lock_exclusive(1);
            let h = s.spawn(|| {
                store.write(1, 1, 0, &[2; 100], false).unwrap();
                written.store(true, Ordering::SeqCst);
            });
            std::thread::sleep(Duration::from_millis(200));
            assert!(!written.load(Ordering::SeqCst));
            assert_eq!(store.read(1, 1, 0, 100).unwrap(), vec![1; 100]);
            assert!(store.export(1, 1, &mut Vec::new()).is_ok());
            // Other chunks are not held back.
            store.write(2, 1, 0, &[3; 10], true).unwrap();
            drop(guard);
            h.join().unwrap();
        });
        assert!(written.load(Ordering::SeqCst));
        assert_eq!(store.read(1, 1, 0, 100).unwrap(), vec![2; 100]);
        // Idle chunks leave no lock state behind.
        assert!(lock(&store.locks.map).is_empty());
    }

    /// Goal: concurrent flushes of one chunk share fdatasyncs, and a clean
    /// chunk costs none. Method: 8 threads each write then flush 10 times.
    #[test]
    fn flush_coalesces() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), small()).unwrap();
        store.write(1, 1, 0, &[1], true).unwrap();
        store.flush(&[1]).unwrap();
        assert_eq!(store.flush_syncs(), 1);
        store.flush(&[1]).unwrap();
        assert_eq!(store.flush_syncs(), 1, "nothing written since the last sync");

        let (threads, rounds) = (8u64, 10);
        let barrier = Barrier::new(threads as usize);
        std::thread::scope(|s| {
            for t in 0..threads {
                let (store, barrier) = (&store, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    for r in 0..rounds {
                        store.write(1, 1, t * 64 * KIB, &[r as u8 + 1; 10], false).unwrap();
                        store.flush(&[1]).unwrap();
                    }
                });
            }
        });
        let syncs = store.flush_syncs() - 1;
        let calls = threads * rounds;
        println!("flush coalescing: {calls} flush calls, {syncs} fdatasyncs");
        assert!(syncs < calls, "{syncs} syncs for {calls} flushes");
        assert!(matches!(store.flush(&[1, 99]), Err(ChunkStoreError::NotFound(99))));
    }

    /// Goal: the open-file cache stays bounded and reopens files on demand.
    #[test]
    fn open_file_cache_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let opts = StoreOptions { max_open_files: 3, ..small() };
        let store = ChunkStore::open(dir.path(), opts).unwrap();
        for round in 0..3u64 {
            for id in 0..10u64 {
                store.write(id, 1, round * 10, &pattern(id + round, 10), true).unwrap();
                assert!(store.open_files() <= 3);
            }
        }
        for id in 0..10u64 {
            assert_eq!(store.read(id, 1, 20, 10).unwrap(), pattern(id + 2, 10));
        }
        assert!(store.open_files() <= 3);
    }

    /// Allocated bytes of the chunk files, by walking the directory.
    fn on_disk(dir: &Path) -> u64 {
        let mut total = 0;
        for sub in fs::read_dir(dir.join(CHUNKS_DIR)).unwrap() {
            for f in fs::read_dir(sub.unwrap().path()).unwrap() {
                total += f.unwrap().metadata().unwrap().blocks() * 512;
            }
        }
        total
    }

    /// Goal: used_bytes follows writes, zeroes and deletes without rescanning.
    /// Method: compare with st_blocks after each step, and with the ideal
    /// sizes (within 8 KiB of filesystem metadata such as extent blocks).
    #[test]
    fn used_bytes_is_tracked() {
        let dir = tempfile::tempdir().unwrap();
        let opts = small();
        let head = data_off(&opts);
        let store = ChunkStore::open(dir.path(), opts.clone()).unwrap();
        let check = |store: &ChunkStore, ideal: u64| {
            let used = store.used_bytes();
            assert_eq!(used, on_disk(dir.path()));
            assert!(used.abs_diff(ideal) <= 8 * KIB, "used {used}, ideal {ideal}");
        };
        check(&store, 0);
        store.write(1, 1, 0, &pattern(1, 256 * KIB as usize), true).unwrap();
        check(&store, head + 256 * KIB);
        store.write(2, 1, 0, &[], true).unwrap();
        check(&store, 2 * head + 256 * KIB);
        store.zero(1, 1, 64 * KIB, 128 * KIB).unwrap();
        check(&store, 2 * head + 128 * KIB);
        // Writing zeros keeps the chunk sparse.
        store.write(1, 1, 0, &vec![0; 64 * KIB as usize], false).unwrap();
        check(&store, 2 * head + 64 * KIB);
        store.delete(2).unwrap();
        store.delete(2).unwrap();
        check(&store, head + 64 * KIB);
        drop(store);
        let store = ChunkStore::open(dir.path(), opts).unwrap();
        check(&store, head + 64 * KIB);
        let (total, avail) = store.fs_stats().unwrap();
        assert!(total > 0 && avail <= total);
    }

    /// Goal: the index stays well under 100 bytes per chunk at a million chunks.
    #[test]
    fn index_heap_per_entry() {
        let mut index = Index::default();
        for i in 0..1_000_000u64 {
            index
                .insert(i.wrapping_mul(0x9E37_79B9_7F4A_7C15), IndexEntry { version: i, gen: i, sectors: 8, flags: 0 });
        }
        let per_entry = index.heap_bytes() as f64 / 1e6;
        println!(
            "index: {} entries, capacity {}, {} heap bytes, {per_entry:.1} bytes per chunk",
            index.map.len(),
            index.map.capacity(),
            index.heap_bytes()
        );
        assert!(per_entry < 100.0, "{per_entry} bytes per entry");
    }

    /// A tmpfs of `size` mounted on a temp dir for the life of the guard.
    struct Tmpfs {
        dir: tempfile::TempDir,
    }

    impl Tmpfs {
        fn mount(size: &str) -> Option<Tmpfs> {
            let dir = tempfile::tempdir().ok()?;
            let status = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir.path())
                .stderr(std::process::Stdio::null())
                .status();
            match status {
                Ok(s) if s.success() => Some(Tmpfs { dir }),
                _ => None,
            }
        }
    }

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let ok = std::process::Command::new("umount").arg(self.dir.path()).status().is_ok_and(|s| s.success());
            if !ok {
                let _ = std::process::Command::new("umount").arg("-l").arg(self.dir.path()).status();
            }
        }
    }

    /// Goal: on a full filesystem writes fail with NoSpace, earlier data still
    /// reads back, and no block is left with a mismatched checksum — through
    /// the free-space check, through fallocate's ENOSPC, and through a data
    /// write that hits ENOSPC part way. Method: a 2 MiB tmpfs.
    #[test]
    fn no_space() {
        let Some(fs_guard) = Tmpfs::mount("2m") else {
            eprintln!("SKIPPED no_space: cannot mount a tmpfs here (needs root)");
            return;
        };
        let dir = fs_guard.dir.path().join("store");
        let opts = small();
        let bsz = 64 * KIB as usize;
        let store = ChunkStore::open(&dir, opts.clone()).unwrap();
        let (total, _) = store.fs_stats().unwrap();
        assert_eq!(total, 2 * MIB);

        // Phase 1: chunk A fills half the filesystem.
        let a = pattern(1, MIB as usize);
        store.write(1, 1, 0, &a, true).unwrap();
        store.flush(&[1]).unwrap();

        // Phase 2: chunk B block by block until the space check refuses.
        let mut b = vec![0u8; MIB as usize];
        let mut filled = 0;
        loop {
            let block = pattern(100 + filled as u64, bsz);
            match store.write(2, 1, (filled * bsz) as u64, &block, true) {
                Ok(()) => b[filled * bsz..(filled + 1) * bsz].copy_from_slice(&block),
                Err(ChunkStoreError::NoSpace) => break,
                Err(e) => panic!("{e}"),
            }
            filled += 1;
            assert!(filled < 16, "the filesystem never filled up");
        }
        assert!(filled > 4);
        let check = |store: &ChunkStore, b: &[u8]| {
            assert_eq!(store.read(1, 1, 0, MIB).unwrap(), a);
            assert_eq!(store.read(2, 1, 0, MIB).unwrap(), b);
            let r = store.scrub(u64::MAX);
            assert!(r.corrupt.is_empty() && r.io_errors == 0, "{r:?}");
        };
        check(&store, &b);
        // Overwriting allocated blocks needs no space and still works.
        let redo = pattern(7, bsz);
        store.write(2, 1, 0, &redo, false).unwrap();
        b[..bsz].copy_from_slice(&redo);

        // Phase 3: without the space check, fallocate reports ENOSPC before anything changes.
        store.knobs.skip_space_check.store(true, Ordering::Relaxed);
        let big = pattern(8, MIB as usize - filled * bsz);
        assert!(matches!(store.write(2, 1, (filled * bsz) as u64, &big, false), Err(ChunkStoreError::NoSpace)));
        check(&store, &b);

        // Phase 4: without fallocate either, the data write itself hits ENOSPC
        // part way; the write is rolled back to old content per block.
        store.knobs.skip_fallocate.store(true, Ordering::Relaxed);
        let used = store.used_bytes();
        assert!(matches!(store.write(2, 1, (filled * bsz) as u64, &big, false), Err(ChunkStoreError::NoSpace)));
        check(&store, &b);
        assert_eq!(store.used_bytes(), used, "space of rolled-back blocks is given back");
        // A failed write spanning an allocated block keeps the new content there.
        let span_start = (filled - 1) * bsz;
        let span = pattern(9, MIB as usize - span_start);
        assert!(matches!(store.write(2, 1, span_start as u64, &span, false), Err(ChunkStoreError::NoSpace)));
        let got = store.read(2, 1, 0, MIB).unwrap();
        assert_eq!(got[..span_start], b[..span_start]);
        let last = &got[span_start..span_start + bsz];
        assert!(last == &span[..bsz] || last == &b[span_start..span_start + bsz]);
        b[span_start..span_start + bsz].copy_from_slice(last);
        check(&store, &b);
        drop(store);

        // Phase 5: reserved_bytes refuses allocating writes early; overwrites and zeroes still work.
        let opts = StoreOptions { reserved_bytes: 4 * MIB, ..opts };
        let store = ChunkStore::open(&dir, opts).unwrap();
        check(&store, &b);
        assert!(matches!(store.write(3, 1, 0, &[1], true), Err(ChunkStoreError::NoSpace)));
        assert_eq!(count_files(&dir.join(TMP_DIR)), 0);
        assert!(matches!(store.write(2, 1, (15 * bsz) as u64, &[1], false), Err(ChunkStoreError::NoSpace)));
        store.write(2, 1, 10, &[5; 10], false).unwrap();
        b[10..20].fill(5);
        store.zero(2, 1, bsz as u64, bsz as u64).unwrap();
        b[bsz..2 * bsz].fill(0);
        check(&store, &b);
        drop(store);
        drop(fs_guard);
    }

    /// Goal: a copy-on-write chunk made on the first write holds the
    /// origin's bytes with its own checksums (it survives a reopen and a
    /// full scrub), takes the write on top, and leaves the origin as it was;
    /// holes stay holes.
    #[test]
    fn copy_from_origin_then_write() {
        let dir = tempfile::tempdir().unwrap();
        let opts = small();
        let bs = opts.block_size as usize;
        let store = ChunkStore::open(dir.path(), opts.clone()).unwrap();
        let mut origin = vec![0u8; MIB as usize];
        // Blocks 0..3 and 9 written; the rest never.
        for (off, len, seed) in [(0, 3 * bs, 1), (9 * bs, bs, 2)] {
            let d = pattern(seed, len);
            store.write(5, 2, off as u64, &d, true).unwrap();
            origin[off..off + len].copy_from_slice(&d);
        }
        let used_origin = store.used_bytes();
        let patch = pattern(3, 100);
        let missing = Missing::CopyFrom { origin: 5, version: 2 };
        store.write_with(9, 1, 70_000, &patch, missing).unwrap();
        let mut copy = origin.clone();
        copy[70_000..70_100].copy_from_slice(&patch);
        assert_eq!(store.read(9, 1, 0, MIB).unwrap(), copy);
        assert_eq!(store.read(5, 2, 0, MIB).unwrap(), origin, "the origin is untouched");
        // Holes of the origin stay holes in the copy: about as much space as the origin.
        assert!(store.used_bytes() <= 2 * used_origin + 2 * opts.block_size, "{} vs {used_origin}", store.used_bytes());
        // Once made, the origin is not consulted again (even if it goes).
        store.delete(5).unwrap();
        store.write_with(9, 1, 0, &[7], missing).unwrap();
        copy[0] = 7;
        drop(store);
        let store = ChunkStore::open(dir.path(), opts).unwrap();
        assert_eq!(store.read(9, 1, 0, MIB).unwrap(), copy);
        let report = store.scrub(u64::MAX);
        assert!(report.corrupt.is_empty() && report.pass_completed, "{report:?}");
        assert_eq!(count_files(&dir.path().join(TMP_DIR)), 0);
    }

    /// Goal: a copy refuses a missing or stale origin and an origin that is
    /// not older, and a bad origin block fails the copy without leaving
    /// anything behind; zeroing a copy also copies first.
    #[test]
    fn copy_from_origin_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), small()).unwrap();
        let d = pattern(4, 200 * KIB as usize);
        store.write(3, 1, 0, &d, true).unwrap();
        let from = |origin, version| Missing::CopyFrom { origin, version };
        assert!(matches!(store.write_with(8, 1, 0, &[1], from(4, 1)), Err(ChunkStoreError::NotFound(4))));
        assert!(matches!(
            store.write_with(8, 1, 0, &[1], from(3, 2)),
            Err(ChunkStoreError::VersionMismatch { id: 3, have: 1, want: 2 })
        ));
        assert!(matches!(store.write_with(2, 1, 0, &[1], from(3, 1)), Err(ChunkStoreError::BadInput(_))));
        assert!(store.version(8).is_none() && store.version(2).is_none());
        // Zero with an origin: the copy has the origin's other bytes.
        store.zero_with(8, 1, 10, 20, from(3, 1)).unwrap();
        let mut want = d.clone();
        want[10..30].fill(0);
        assert_eq!(store.read(8, 1, 0, d.len() as u64).unwrap(), want);
        // A damaged origin block: Corrupt, naming the origin; no copy made.
        let path = chunk_file(dir.path(), 3, 1);
        flip_byte(&path, data_off(&small()) + 64 * KIB + 5);
        assert!(matches!(
            store.write_with(12, 1, 0, &[1], from(3, 1)),
            Err(ChunkStoreError::Corrupt { id: 3, block: 1 })
        ));
        assert!(store.version(12).is_none());
        assert_eq!(count_files(&dir.path().join(TMP_DIR)), 0);
    }

    /// Goal: many writers to a copy not made yet: one makes it, every write
    /// lands (the copy is made once, under the chunk's lock).
    #[test]
    fn concurrent_first_writes_make_one_copy() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(ChunkStore::open(dir.path(), small()).unwrap());
        let base = pattern(6, MIB as usize);
        store.write(1, 1, 0, &base, true).unwrap();
        let threads: Vec<_> = (0..8u64)
            .map(|i| {
                let store = store.clone();
                std::thread::spawn(move || {
                    let d = vec![i as u8 + 1; 1000];
                    store.write_with(2, 1, i * 100_000, &d, Missing::CopyFrom { origin: 1, version: 1 }).unwrap();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mut want = base;
        for i in 0..8usize {
            want[i * 100_000..i * 100_000 + 1000].fill(i as u8 + 1);
        }
        assert_eq!(store.read(2, 1, 0, MIB).unwrap(), want);
    }

    /// Goal: a batch of version changes: each as set_version would, one
    /// result per change.
    #[test]
    fn set_versions_in_a_batch() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), tiny()).unwrap();
        for id in 1..=3 {
            store.write(id, 1, 0, &[id as u8], true).unwrap();
        }
        let r = store.set_versions(&[(1, 1, 2), (2, 5, 6), (3, 1, 3), (4, 1, 2), (3, 1, 3)], true);
        assert!(r[0].is_ok() && r[2].is_ok() && r[4].is_ok(), "{r:?}");
        assert!(matches!(r[1], Err(ChunkStoreError::VersionMismatch { id: 2, .. })));
        assert!(matches!(r[3], Err(ChunkStoreError::NotFound(4))));
        assert_eq!((store.version(1), store.version(2), store.version(3)), (Some(2), Some(1), Some(3)));
        drop(store);
        let store = ChunkStore::open(dir.path(), tiny()).unwrap();
        assert_eq!(store.read(3, 3, 0, 1).unwrap(), vec![3]);
    }

    /// Goal: a version change is durable through the journal alone: a
    /// rename a crash lost (the file back at its old name) is redone by
    /// `open`, including a move back to an older version, and the journal
    /// is empty afterwards.
    #[test]
    fn open_redoes_version_renames_a_crash_lost() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), tiny()).unwrap();
        store.write(1, 1, 0, b"one", true).unwrap();
        store.write(2, 1, 0, b"two", true).unwrap();
        store.write(3, 4, 0, b"three", true).unwrap();
        assert!(store.set_versions(&[(1, 1, 2), (2, 1, 5)], false).iter().all(|r| r.is_ok()));
        store.set_version(3, 4, 5).unwrap();
        store.set_version(3, 5, 4).unwrap();
        assert_eq!(store.settle_names(), 2);
        assert!(!store.journal.is_empty());
        let path1 = store.chunk_path(1, 2);
        let path3 = store.chunk_path(3, 4);
        drop(store);
        // What a crash before the directories reached the disk can leave.
        fs::rename(&path1, path1.with_extension("v1")).unwrap();
        fs::rename(&path3, path3.with_extension("v5")).unwrap();
        let store = ChunkStore::open(dir.path(), tiny()).unwrap();
        assert_eq!((store.version(1), store.version(2), store.version(3)), (Some(2), Some(5), Some(4)));
        assert_eq!(store.read(1, 2, 0, 3).unwrap()[..], *b"one");
        assert_eq!(store.read(3, 4, 0, 5).unwrap()[..], *b"three");
        assert!(store.journal.is_empty(), "replayed and emptied");
        assert_eq!(fs::metadata(dir.path().join(JOURNAL_FILE)).unwrap().len(), 0);
    }

    /// Goal: a fence (a version change without `durable`) moves the index
    /// at once and leaves the rename for later: the old version is refused
    /// and the new one served before the file is renamed; two fences in a
    /// row, a reopen before the rename (the journal redoes it), a durable
    /// change, a delete and a quarantine of a chunk whose name lags all
    /// find the file; a compaction renames what lags before it drops records.
    #[test]
    fn a_fence_renames_later_and_every_path_finds_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), tiny()).unwrap();
        for id in 1..=5 {
            store.write(id, 1, 0, &[id as u8; 3], true).unwrap();
        }
        let all: Vec<(ChunkId, u64, u64)> = (1..=5).map(|id| (id, 1, 2)).collect();
        assert!(store.set_versions(&all, false).iter().all(|r| r.is_ok()));
        assert!(store.chunk_path(1, 1).exists() && !store.chunk_path(1, 2).exists(), "rename left for later");
        assert_eq!(store.lagging_names(), 5);
        assert!(matches!(store.read(1, 1, 0, 3), Err(ChunkStoreError::VersionMismatch { .. })));
        assert!(matches!(store.write(1, 1, 0, b"x", false), Err(ChunkStoreError::VersionMismatch { .. })));
        assert_eq!(store.read(1, 2, 0, 3).unwrap()[..], [1; 3]);
        store.write(2, 2, 1, b"w", true).unwrap();
        assert!(store.set_versions(&[(1, 2, 3)], false)[0].is_ok());
        store.set_version(3, 2, 4).unwrap();
        assert!(store.chunk_path(3, 4).exists() && !store.chunk_path(3, 1).exists());
        store.delete(4).unwrap();
        assert!(!store.chunk_path(4, 1).exists());
        store.quarantine(5).unwrap();
        assert!(!store.chunk_path(5, 1).exists());
        assert_eq!(store.lagging_names(), 2, "chunks 1 and 2");
        // A crash of the process: the journal's records are in the page cache.
        drop(store);
        let store = ChunkStore::open(dir.path(), tiny()).unwrap();
        assert_eq!((store.version(1), store.version(2), store.version(3)), (Some(3), Some(2), Some(4)));
        assert_eq!(store.read(1, 3, 0, 3).unwrap()[..], [1; 3]);
        assert_eq!(store.read(2, 2, 0, 3).unwrap()[..], [2, b'w', 2]);
        assert!(store.chunk_path(1, 3).exists() && store.chunk_path(2, 2).exists());
        assert_eq!((store.version(4), store.version(5)), (None, None));
        // Fences until the journal compacts: nothing lags after it.
        let mut v = 3;
        for _ in 0..=(versions::COMPACT_BYTES as usize / versions::RECORD_BYTES) {
            assert!(store.set_versions(&[(1, v, v + 1)], false)[0].is_ok());
            v += 1;
        }
        assert_eq!(store.lagging_names(), 0, "the compaction renamed first");
        assert!(store.chunk_path(1, v).exists());
        assert_eq!(store.read(1, v, 0, 3).unwrap()[..], [1; 3]);
        assert!(store.set_versions(&[(1, v, v + 1)], false)[0].is_ok());
        assert_eq!(store.settle_names(), 1);
        assert!(store.chunk_path(1, v + 1).exists() && !store.chunk_path(1, v).exists());
    }

    /// Goal: a damaged journal tail is not replayed, and the store opens.
    #[test]
    fn open_ignores_a_torn_journal_tail() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), tiny()).unwrap();
        store.write(1, 1, 0, b"one", true).unwrap();
        store.set_version(1, 1, 2).unwrap();
        drop(store);
        let mut log = OpenOptions::new().append(true).open(dir.path().join(JOURNAL_FILE)).unwrap();
        let mut torn = versions::encode(&Change { chunk: 1, from: 2, to: 9 });
        torn[31] ^= 0xff;
        log.write_all(&torn).unwrap();
        log.write_all(&[7u8; 13]).unwrap();
        drop(log);
        let store = ChunkStore::open(dir.path(), tiny()).unwrap();
        assert_eq!(store.version(1), Some(2));
        assert_eq!(store.read(1, 2, 0, 3).unwrap()[..], *b"one");
    }
}
