//! The chunk store's version journal: makes version changes durable with one
//! fdatasync of a small append-only file instead of one directory fsync per
//! chunk directory touched.
//!
//! A chunk's version lives in its file name (see [`super::store`]), so a
//! version change is a `rename`. Without a journal, making a batch of renames
//! durable costs an fsync of every directory they touched: a clone of a
//! 10 GiB image fences 160 chunks spread over up to 160 of the store's 256
//! directories. With it, the renames are made, then one record per change is
//! appended here and the file fdatasynced once; the rename itself may still
//! be in the page cache when the call returns. A clone's fences go further:
//! the store records them here without a sync and renames the files later
//! (see `ChunkStore::set_versions`), so a record's `from` is the version the
//! file is named with, which may be older than the chunk's version before
//! the change.
//!
//! After a crash, [`ChunkStore::open`](super::store::ChunkStore::open) scans
//! the chunk files, then replays the journal: for each chunk, its **last**
//! record `(from, to)` is the last version change acknowledged; if the file
//! is still at `from` (the rename was lost) it is renamed to `to`. A file at
//! any other version was changed since by an operation that synced its own
//! directory (creation, import), so it is left alone. Then every directory
//! the journal names is fsynced and the journal is emptied. While running,
//! the journal is compacted the same way once it passes [`COMPACT_BYTES`].
//!
//! # Format (all integers little-endian)
//!
//! ```text
//! a sequence of 32-byte records:
//!     0..8    chunk id (u64)
//!     8..16   from version (u64)
//!    16..24   to version (u64)
//!    24..32   the first 8 bytes of blake3(bytes 0..24)
//! ```
//!
//! Replay stops at the first record whose check fails: an append torn by a
//! crash was never acknowledged, and nothing after it was written.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

pub use super::store::ChunkId;

/// Bytes per record.
pub const RECORD_BYTES: usize = 32;
/// The journal is compacted (directories synced, file emptied) past this size.
pub const COMPACT_BYTES: u64 = 1 << 20;
/// Largest journal replayed; a bigger file is not ours (or is damaged).
pub const MAX_JOURNAL_BYTES: u64 = 256 << 20;

/// One version change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Change {
    pub chunk: ChunkId,
    pub from: u64,
    pub to: u64,
}

/// Encodes one record.
pub fn encode(c: &Change) -> [u8; RECORD_BYTES] {
    let mut r = [0u8; RECORD_BYTES];
    r[0..8].copy_from_slice(&c.chunk.to_le_bytes());
    r[8..16].copy_from_slice(&c.from.to_le_bytes());
    r[16..24].copy_from_slice(&c.to.to_le_bytes());
    let sum = blake3::hash(&r[0..24]);
    r[24..32].copy_from_slice(&sum.as_bytes()[0..8]);
    r
}

/// Decodes the valid prefix of a journal: records up to the first one whose
/// check fails (or a partial record at the end). Returns them in order.
pub fn decode(bytes: &[u8]) -> Vec<Change> {
    let mut out = Vec::with_capacity(bytes.len() / RECORD_BYTES);
    for r in bytes.chunks_exact(RECORD_BYTES) {
        let sum = blake3::hash(&r[0..24]);
        if r[24..32] != sum.as_bytes()[0..8] {
            break;
        }
        let word = |i: usize| u64::from_le_bytes(r[i..i + 8].try_into().unwrap_or([0; 8]));
        out.push(Change { chunk: word(0), from: word(8), to: word(16) });
    }
    out
}

/// The last change of each chunk, in the order the journal has them.
pub fn last_per_chunk(changes: &[Change]) -> BTreeMap<ChunkId, Change> {
    changes.iter().map(|c| (c.chunk, *c)).collect()
}

/// The open journal. Appends are serialized; each is durable when it returns.
pub struct Journal {
    path: PathBuf,
    state: Mutex<State>,
}

struct State {
    file: File,
    len: u64,
    /// Directories (by the chunk id's low byte) renamed in since the last
    /// compaction: what a compaction must fsync.
    dirs: BTreeSet<u8>,
}

impl Journal {
    /// Opens (creating) the journal at `path` and returns it with the
    /// changes it holds (the valid prefix).
    pub fn open(path: &Path) -> io::Result<(Journal, Vec<Change>)> {
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        let len = file.metadata()?.len();
        if len > MAX_JOURNAL_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} is {len} bytes, more than a version journal ever holds ({MAX_JOURNAL_BYTES})",
                    path.display()
                ),
            ));
        }
        let mut bytes = vec![0u8; len as usize];
        file.read_exact_at(&mut bytes, 0)?;
        let changes = decode(&bytes);
        let dirs = changes.iter().map(|c| (c.chunk & 0xff) as u8).collect();
        let state = State { file, len: (changes.len() * RECORD_BYTES) as u64, dirs };
        Ok((Journal { path: path.to_path_buf(), state: Mutex::new(state) }, changes))
    }

    /// Records `changes` (whose renames are done) durably. If the journal
    /// has grown past [`COMPACT_BYTES`], `sync_dirs` is called with every
    /// directory renamed in since the last compaction instead, and the
    /// journal is emptied: the renames themselves are then durable.
    #[cfg(test)]
    pub fn append(
        &self,
        changes: &[Change],
        sync_dirs: impl FnOnce(&BTreeSet<u8>) -> io::Result<()>,
    ) -> io::Result<()> {
        self.append_with(changes, true, sync_dirs)
    }

    /// Records `changes` (whose renames are done), compacting instead past
    /// [`COMPACT_BYTES`] as `append` does. With `sync` the records are
    /// fdatasynced before this returns; without, they are only written (a
    /// later synced append or compaction carries them to disk), for changes
    /// the caller can afford to lose in a crash.
    pub fn append_with(
        &self,
        changes: &[Change],
        sync: bool,
        sync_dirs: impl FnOnce(&BTreeSet<u8>) -> io::Result<()>,
    ) -> io::Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut st = self.lock();
        st.dirs.extend(changes.iter().map(|c| (c.chunk & 0xff) as u8));
        let add = (changes.len() * RECORD_BYTES) as u64;
        if st.len + add > COMPACT_BYTES {
            return compact(&mut st, sync_dirs);
        }
        let mut buf = Vec::with_capacity(add as usize);
        for c in changes {
            buf.extend_from_slice(&encode(c));
        }
        let at = st.len;
        // A failed append leaves the length where it was: the next one
        // overwrites whatever part of this one reached the file.
        st.file.write_all_at(&buf, at)?;
        if sync {
            st.file.sync_data()?;
        }
        st.len = at + add;
        Ok(())
    }

    /// Syncs every directory named since the last compaction (through
    /// `sync_dirs`) and empties the journal.
    pub fn compact(&self, sync_dirs: impl FnOnce(&BTreeSet<u8>) -> io::Result<()>) -> io::Result<()> {
        compact(&mut self.lock(), sync_dirs)
    }

    /// Bytes of records held.
    #[cfg(test)]
    pub fn len(&self) -> u64 {
        self.lock().len
    }

    /// Whether the journal holds no record.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Where the journal lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn compact(st: &mut State, sync_dirs: impl FnOnce(&BTreeSet<u8>) -> io::Result<()>) -> io::Result<()> {
    if !st.dirs.is_empty() {
        sync_dirs(&st.dirs)?;
    }
    // Synced before anything new is written at offset 0: a journal whose
    // old tail survived behind new records would replay in the wrong order.
    st.file.set_len(0)?;
    st.file.sync_all()?;
    st.len = 0;
    st.dirs.clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(chunk: ChunkId, from: u64, to: u64) -> Change {
        Change { chunk, from, to }
    }

    /// Goal: records round-trip; replay stops at a torn or damaged record and
    /// ignores a partial one at the end.
    #[test]
    fn decode_stops_at_the_first_bad_record() {
        let mut bytes: Vec<u8> = [ch(1, 1, 2), ch(2, 7, 8), ch(1, 2, 3)].iter().flat_map(encode).collect();
        assert_eq!(decode(&bytes), vec![ch(1, 1, 2), ch(2, 7, 8), ch(1, 2, 3)]);
        bytes.extend_from_slice(&[0u8; 20]);
        assert_eq!(decode(&bytes).len(), 3, "a partial record is ignored");
        bytes[40] ^= 1;
        assert_eq!(decode(&bytes), vec![ch(1, 1, 2)], "a damaged record ends the replay");
        assert!(decode(&[0u8; 64]).is_empty(), "zeros are not records");
        let last = last_per_chunk(&[ch(1, 1, 2), ch(2, 7, 8), ch(1, 2, 1)]);
        assert_eq!(last.get(&1), Some(&ch(1, 2, 1)), "the last change of a chunk wins, even a move back");
    }

    /// Goal: appends survive a reopen; a compaction syncs the directories
    /// named and empties the journal.
    #[test]
    fn appends_reopen_and_compact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("versions.log");
        let (j, old) = Journal::open(&path).unwrap();
        assert!(old.is_empty() && j.is_empty());
        j.append(&[ch(0x101, 1, 2), ch(0x202, 3, 4)], |_| panic!("no compaction yet")).unwrap();
        j.append(&[ch(0x101, 2, 3)], |_| panic!("no compaction yet")).unwrap();
        drop(j);
        let (j, old) = Journal::open(&path).unwrap();
        assert_eq!(old, vec![ch(0x101, 1, 2), ch(0x202, 3, 4), ch(0x101, 2, 3)]);
        let mut synced = BTreeSet::new();
        j.compact(|d| {
            synced = d.clone();
            Ok(())
        })
        .unwrap();
        assert_eq!(synced, BTreeSet::from([1, 2]));
        assert!(j.is_empty());
        drop(j);
        assert!(Journal::open(&path).unwrap().1.is_empty());
    }

    /// Goal: the journal never grows past its compaction size; a failed
    /// directory sync fails the append and keeps the records.
    #[test]
    fn a_full_journal_compacts_instead_of_growing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("versions.log");
        let (j, _) = Journal::open(&path).unwrap();
        let per = (COMPACT_BYTES as usize / RECORD_BYTES) as u64;
        let batch: Vec<Change> = (0..per).map(|i| ch(i, 1, 2)).collect();
        j.append(&batch, |_| panic!("fits exactly")).unwrap();
        assert_eq!(j.len(), COMPACT_BYTES);
        let err = j.append(&[ch(7, 2, 3)], |_| Err(io::Error::other("disk gone"))).unwrap_err();
        assert_eq!(err.to_string(), "disk gone");
        assert_eq!(j.len(), COMPACT_BYTES, "nothing was dropped");
        let mut calls = 0;
        j.append(&[ch(7, 2, 3)], |d| {
            calls += 1;
            assert_eq!(d.len(), 256);
            Ok(())
        })
        .unwrap();
        assert_eq!((calls, j.len()), (1, 0));
        assert!(std::fs::metadata(&path).unwrap().len() == 0);
    }
}
