//! What an export reads and writes: the [`Backend`] trait, and
//! [`LocusFile`], a Locus file through the shared [`FileClient`].

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::cache::BlockCache;
use super::lease::LeaseKeeper;
use super::wire::{Extent, EINVAL, EIO, ENOSPC, EPERM, STATE_HOLE, STATE_ZERO};
use crate::client::ClientError;
use crate::file::FileClient;
use crate::proto::*;

/// A failed backend operation: the NBD error value and a message for the
/// client's user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct BackendError {
    pub errno: u32,
    pub message: String,
}

impl From<ClientError> for BackendError {
    fn from(e: ClientError) -> Self {
        let errno = match e.code() {
            // Busy: another client holds the image's write lease.
            ErrorCode::NotPermitted | ErrorCode::PermissionDenied | ErrorCode::Unauthorized | ErrorCode::Busy => EPERM,
            // The spec asks for EDQUOT and EFBIG to become ENOSPC.
            ErrorCode::NoSpace | ErrorCode::QuotaExceeded | ErrorCode::TooBig | ErrorCode::FileTooBig => ENOSPC,
            ErrorCode::Invalid | ErrorCode::Range => EINVAL,
            _ => EIO,
        };
        BackendError { errno, message: e.to_string() }
    }
}

pub type BackendResult<T> = Result<T, BackendError>;

/// The storage behind an export. Requests arrive concurrently; ranges are
/// already checked against the export size.
pub trait Backend: Send + Sync + 'static {
    /// Exactly `len` bytes at `offset` (shorter only past the backing
    /// data's end; the caller pads with zeros).
    fn read(&self, offset: u64, len: u32) -> impl Future<Output = BackendResult<Bytes>> + Send;
    /// The bytes `read` would give, if they are at hand without waiting
    /// (a cache hit); `None` otherwise.
    fn read_now(&self, _offset: u64, _len: u32) -> Option<Bytes> {
        None
    }
    /// With `fua`, durable before it returns.
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> impl Future<Output = BackendResult<()>> + Send;
    /// Makes every completed write durable.
    fn flush(&self) -> impl Future<Output = BackendResult<()>> + Send;
    /// A hint that the range is no longer needed.
    fn trim(&self, offset: u64, len: u32, fua: bool) -> impl Future<Output = BackendResult<()>> + Send;
    /// The range reads as zeros afterwards; with `no_hole` it stays allocated.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        no_hole: bool,
        fua: bool,
    ) -> impl Future<Output = BackendResult<()>> + Send;
    /// `base:allocation` extents from `offset`, covering at most `len` bytes.
    fn allocation(&self, offset: u64, len: u32) -> impl Future<Output = BackendResult<Vec<Extent>>> + Send;
    /// A connection ended: publish its writes (not necessarily durably).
    fn disconnected(&self) -> impl Future<Output = BackendResult<()>> + Send;
}

/// Zeros are written in pieces of this size (one shared buffer).
const ZERO_PIECE: usize = 1 << 20;
/// Layout requests one block status may make (each covers up to
/// `MAX_LAYOUT_CHUNKS` chunks); a longer range gets a shorter answer.
const MAX_LAYOUT_FETCHES: u64 = 4;

/// Reads at least this long that find nothing cached bypass the cache.
const STREAM_READ_BYTES: u32 = 256 << 10;

/// A Locus file as an export. All connections of a process share one, so
/// a flush on any connection covers the writes of all of them.
pub struct LocusFile {
    files: FileClient,
    ino: Ino,
    zeros: Bytes,
    /// The cluster's chunk size, learnt from the first layout (0: not yet).
    chunk_bytes: AtomicU64,
    /// Reads are cached while they can be trusted.
    cache: Option<(Arc<BlockCache>, CacheGuard)>,
}

/// What keeps an export's cached blocks true.
enum CacheGuard {
    /// The image's write lease, while it is held: only this export writes.
    Lease(Arc<LeaseKeeper>),
    /// A snapshot: nobody writes it, ever.
    Immutable,
}

impl LocusFile {
    pub fn new(files: FileClient, ino: Ino) -> Self {
        LocusFile { files, ino, zeros: Bytes::from(vec![0u8; ZERO_PIECE]), chunk_bytes: AtomicU64::new(0), cache: None }
    }

    /// Caches reads in `cache` whenever `lease` is held.
    pub fn with_cache(mut self, cache: Arc<BlockCache>, lease: Arc<LeaseKeeper>) -> Self {
        self.cache = Some((cache, CacheGuard::Lease(lease)));
        self
    }

    /// Caches reads of a snapshot (its chunks never change), with no lease.
    pub fn with_snapshot_cache(mut self, cache: Arc<BlockCache>) -> Self {
        self.cache = Some((cache, CacheGuard::Immutable));
        self
    }

    /// The cache, if it can be trusted now.
    fn live_cache(&self) -> Option<&BlockCache> {
        let (cache, guard) = self.cache.as_ref()?;
        match guard {
            CacheGuard::Lease(l) if !l.valid() => None,
            _ => Some(cache),
        }
    }

    /// The cache's hit and miss counts, if it has one.
    pub fn cache_stats(&self) -> Option<(u64, u64, u64)> {
        self.cache.as_ref().map(|(c, _)| c.stats())
    }

    /// Runs a change of `[offset, offset + len)`, dropping the cached
    /// blocks it touches before and once it has landed (see [`super::cache`]).
    async fn changing<T>(&self, offset: u64, len: u64, change: impl Future<Output = T>) -> T {
        let Some((cache, _)) = &self.cache else { return change.await };
        cache.invalidate(offset, len);
        let out = change.await;
        cache.invalidate(offset, len);
        out
    }

    /// A read through the cache: hits from memory, the span of missing
    /// blocks in one fetch (then kept).
    async fn cached_read(&self, cache: &BlockCache, offset: u64, len: u32) -> BackendResult<Bytes> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        let bs = cache.block_bytes();
        let end = offset + u64::from(len);
        let (first, last) = (offset / bs, (end - 1) / bs);
        let found = cache.lookup(first, last);
        // A large read of nothing cached is a stream (a copy, a backup, a
        // guest's sequential scan): read it through, without pushing the
        // hot blocks out or copying it into and out of the cache.
        if len >= STREAM_READ_BYTES && found.blocks.iter().all(Option::is_none) {
            return Ok(self.files.read(self.ino, offset, u64::from(len)).await?);
        }
        let mut blocks = found.blocks;
        // A small read that misses while the cache thrashes: only its bytes.
        if u64::from(len) < bs && blocks.iter().any(Option::is_none) && !cache.admit_miss() {
            return Ok(self.files.read(self.ino, offset, u64::from(len)).await?);
        }
        let missing_first = blocks.iter().position(|b| b.is_none());
        let missing_last = blocks.iter().rposition(|b| b.is_none());
        if let (Some(a), Some(z)) = (missing_first, missing_last) {
            let from = (first + a as u64) * bs;
            let data = self.files.read(self.ino, from, (z - a + 1) as u64 * bs).await?;
            let mut fetched = Vec::with_capacity(z - a + 1);
            for (k, slot) in blocks[a..=z].iter_mut().enumerate() {
                let s = (k as u64 * bs) as usize;
                let piece =
                    if s < data.len() { data.slice(s..(s + bs as usize).min(data.len())) } else { Bytes::new() };
                if slot.is_none() {
                    *slot = Some(piece.clone());
                    fetched.push((first + a as u64 + k as u64, piece));
                }
            }
            cache.fill(found.since, fetched);
        }
        let blocks: Vec<Bytes> = blocks.into_iter().map(|b| b.expect("every block found or fetched")).collect();
        Ok(assemble(&blocks, first * bs, bs, offset, len))
    }

    pub fn files(&self) -> &FileClient {
        &self.files
    }

    pub fn ino(&self) -> Ino {
        self.ino
    }

    async fn layout(&self, first: u64, count: u64) -> BackendResult<Layout> {
        Ok(self.files.read_layout(self.ino, first, count).await?)
    }

    async fn zero_range(&self, offset: u64, len: u64) -> BackendResult<()> {
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = (end - pos).min(ZERO_PIECE as u64);
            self.files.write(self.ino, pos, self.zeros.slice(..n as usize)).await?;
            pos += n;
        }
        Ok(())
    }
}

/// `[offset, offset + len)` out of consecutive cache blocks of `bs` bytes,
/// the first starting at `start` (a block shorter than `bs` ends at the
/// data's end: zeros after it).
fn assemble(blocks: &[Bytes], start: u64, bs: u64, offset: u64, len: u32) -> Bytes {
    let end = offset + u64::from(len);
    // One block holding the whole range: a slice, no copy.
    if let [b] = blocks {
        let s = (offset - start) as usize;
        if s + len as usize <= b.len() {
            return b.slice(s..s + len as usize);
        }
    }
    let mut out = BytesMut::with_capacity(len as usize);
    for (k, b) in blocks.iter().enumerate() {
        let at = start + k as u64 * bs;
        let s = offset.max(at) - at;
        let e = end.min(at + bs) - at;
        let have = (b.len() as u64).clamp(s, e);
        out.extend_from_slice(&b[s as usize..have as usize]);
        // Past the data's end: zeros.
        out.resize(out.len() + (e - have) as usize, 0);
    }
    out.freeze()
}

impl Backend for LocusFile {
    fn read_now(&self, offset: u64, len: u32) -> Option<Bytes> {
        let cache = self.live_cache()?;
        let bs = cache.block_bytes();
        let (first, last) = (offset / bs, (offset + u64::from(len) - 1) / bs);
        let blocks = cache.lookup_all(first, last)?;
        Some(assemble(&blocks, first * bs, bs, offset, len))
    }

    async fn read(&self, offset: u64, len: u32) -> BackendResult<Bytes> {
        match self.live_cache() {
            Some(cache) => self.cached_read(cache, offset, len).await,
            None => {
                if let Some((cache, _)) = &self.cache {
                    // Not held now: what is cached may be out of date.
                    cache.clear();
                }
                Ok(self.files.read(self.ino, offset, u64::from(len)).await?)
            }
        }
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> BackendResult<()> {
        let len = data.len() as u64;
        self.changing(offset, len, self.files.write(self.ino, offset, data)).await?;
        if fua {
            self.files.fsync(self.ino).await?;
        }
        Ok(())
    }

    async fn flush(&self) -> BackendResult<()> {
        Ok(self.files.fsync(self.ino).await?)
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> BackendResult<()> {
        // A write-zeroes that may punch: the range reads as zeros afterwards
        // (the spec allows anything) and its blocks are freed.
        self.write_zeroes(offset, len, false, fua).await
    }

    async fn write_zeroes(&self, offset: u64, len: u32, no_hole: bool, fua: bool) -> BackendResult<()> {
        let n = u64::from(len);
        if no_hole {
            // Asked to keep the space allocated: real zeros.
            self.changing(offset, n, self.zero_range(offset, n)).await?;
        } else {
            self.changing(offset, n, async { Ok::<_, BackendError>(self.files.punch(self.ino, offset, n).await?) })
                .await?;
        }
        if fua {
            self.files.fsync(self.ino).await?;
        }
        Ok(())
    }

    async fn allocation(&self, offset: u64, len: u32) -> BackendResult<Vec<Extent>> {
        // Buffered writes get their chunks when sent: send them first, or
        // their ranges would look like holes.
        self.files.flush(self.ino).await?;
        let mut cb = self.chunk_bytes.load(Ordering::Relaxed);
        if cb == 0 {
            cb = self.layout(0, 0).await?.chunk_bytes;
            self.chunk_bytes.store(cb, Ordering::Relaxed);
        }
        if cb == 0 || len == 0 {
            return Ok(vec![Extent { len, flags: 0 }]);
        }
        let end = offset + u64::from(len);
        let first = offset / cb;
        let last = (end - 1) / cb;
        let mut present = BTreeSet::new();
        let mut known_end = first;
        let mut size = 0;
        for _ in 0..MAX_LAYOUT_FETCHES {
            if known_end > last {
                break;
            }
            let count = (last - known_end + 1).min(MAX_LAYOUT_CHUNKS);
            let l = self.layout(known_end, count).await?;
            if l.chunk_bytes != cb {
                // Not the chunk size we knew: learn it and claim nothing now.
                self.chunk_bytes.store(l.chunk_bytes, Ordering::Relaxed);
                return Ok(vec![Extent { len, flags: 0 }]);
            }
            size = l.attr.size;
            present.extend(l.chunks.iter().map(|c| c.index));
            known_end += count;
        }
        Ok(allocation_extents(offset, len, cb, &present, known_end, size))
    }

    async fn disconnected(&self) -> BackendResult<()> {
        Ok(self.files.flush(self.ino).await?)
    }
}

/// `base:allocation` extents of `[offset, offset + len)` for a file of
/// `file_size` bytes in chunks of `chunk_bytes`, where the chunk indexes in
/// `present` exist and the layout is known below index `known_end`. An
/// absent chunk, and anything past the end of the file, is a hole that
/// reads as zeros. Stops where the layout is unknown.
pub fn allocation_extents(
    offset: u64,
    len: u32,
    chunk_bytes: u64,
    present: &BTreeSet<u64>,
    known_end: u64,
    file_size: u64,
) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    if chunk_bytes == 0 {
        return vec![Extent { len, flags: 0 }];
    }
    let end = offset.saturating_add(u64::from(len));
    let mut pos = offset;
    while pos < end {
        let index = pos / chunk_bytes;
        if index >= known_end {
            break;
        }
        let chunk_end = (index + 1).saturating_mul(chunk_bytes).min(end);
        let (seg_end, flags) = if pos >= file_size {
            (chunk_end, STATE_HOLE | STATE_ZERO)
        } else if present.contains(&index) {
            (chunk_end.min(file_size), 0)
        } else {
            (chunk_end, STATE_HOLE | STATE_ZERO)
        };
        let n = (seg_end - pos) as u32;
        match out.last_mut() {
            Some(e) if e.flags == flags => e.len += n,
            _ => out.push(Extent { len: n, flags }),
        }
        pos = seg_end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HZ: u32 = STATE_HOLE | STATE_ZERO;

    #[test]
    fn absent_chunks_are_holes_and_neighbours_merge() {
        let present: BTreeSet<u64> = [1, 2, 4].into();
        let e = allocation_extents(0, 6 * 100, 100, &present, 6, 600);
        let got: Vec<(u32, u32)> = e.iter().map(|e| (e.len, e.flags)).collect();
        assert_eq!(got, vec![(100, HZ), (200, 0), (100, HZ), (100, 0), (100, HZ)]);
    }

    #[test]
    fn unaligned_ranges_and_the_end_of_the_file() {
        let present: BTreeSet<u64> = [0, 1].into();
        // The file ends inside chunk 1: its tail reads as zeros.
        let e = allocation_extents(50, 200, 100, &present, 3, 150);
        let got: Vec<(u32, u32)> = e.iter().map(|e| (e.len, e.flags)).collect();
        assert_eq!(got, vec![(100, 0), (100, HZ)]);
    }

    #[test]
    fn unknown_layout_stops_the_answer() {
        let present: BTreeSet<u64> = [0].into();
        let e = allocation_extents(0, 1000, 100, &present, 2, 1000);
        assert_eq!(e.iter().map(|e| e.len).sum::<u32>(), 200);
    }

    proptest! {
        /// Extents are never empty, never overlap the next one's state,
        /// and cover exactly the known part of the range.
        #[test]
        fn extents_cover_the_known_range(offset in 0u64..10_000, len in 0u32..10_000, cb in 1u64..3000,
                                         bits: u16, size in 0u64..30_000, known in 0u64..20) {
            let present: BTreeSet<u64> = (0..16).filter(|i| bits & (1 << i) != 0).collect();
            let e = allocation_extents(offset, len, cb, &present, known, size);
            let total: u64 = e.iter().map(|x| u64::from(x.len)).sum();
            let known_bytes = (known * cb).saturating_sub(offset).min(u64::from(len));
            prop_assert_eq!(total, known_bytes);
            prop_assert!(e.iter().all(|x| x.len > 0));
            prop_assert!(e.windows(2).all(|w| w[0].flags != w[1].flags));
        }
    }
}
