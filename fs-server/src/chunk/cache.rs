//! The chunk store's cache of verified blocks.
//!
//! Every read checks the blake3 sum of each block it touches (a 4 KiB read
//! of a 16 KiB block, in a cluster made before blocks were 4 KiB, reads
//! and hashes four times the bytes it returns). For data read again and
//! again (a VM's hot blocks) that hashing and copying out of the page
//! cache is most of a chunk server's work. The
//! cache keeps blocks that passed their check, so a hit costs one copy:
//! like BlueStore's buffer cache, the sum is checked when a block comes off
//! the file, not on every read of the memory that holds it.
//!
//! Keys are `(generation, block)`. A generation names one incarnation of a
//! chunk file in the store's index (a creation, an import, a scan at open)
//! and is never reused, so a chunk deleted, quarantined or replaced can
//! never be served from the cache again: its blocks become unreachable and
//! age out. A write or zeroing forgets the blocks it covers, with the
//! chunk's lock held exclusively, before it changes a byte, and puts the
//! new blocks in (a small write's) once they are written; reads insert
//! only with the lock held shared, so no read can put back a block older
//! than a write that finished. A partial-block write takes the block's old
//! bytes from the cache when it can. A version change keeps the generation
//! (the bytes are the same); the version is checked against the index
//! before the cache.
//!
//! The policy is quick_cache's (S3-FIFO like: a scan does not flush the hot
//! set), bounded in bytes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use quick_cache::sync::Cache;
use quick_cache::Weighter;

/// Reads of at most this many blocks fill the cache; longer ones are
/// streams (copies, sequential readers) that would only push the hot set out.
pub const MAX_FILL_BLOCKS: usize = 4;

/// Bookkeeping bytes charged per cached block on top of its data.
const ENTRY_OVERHEAD: u64 = 64;

type Key = (u64, u64);

#[derive(Clone)]
struct BlockWeight;

impl Weighter<Key, Arc<[u8]>> for BlockWeight {
    fn weight(&self, _key: &Key, block: &Arc<[u8]>) -> u64 {
        block.len() as u64 + ENTRY_OVERHEAD
    }
}

/// Verified blocks, at most `capacity` bytes; a capacity of 0 caches nothing.
pub struct BlockCache {
    cache: Option<Cache<Key, Arc<[u8]>, BlockWeight>>,
    block: usize,
    hits: AtomicU64,
    misses: AtomicU64,
}

/// Lookups answered and not answered since the store opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub bytes: u64,
}

impl BlockCache {
    pub fn new(capacity: u64, block: usize) -> BlockCache {
        let per_block = block as u64 + ENTRY_OVERHEAD;
        let cache = (capacity >= per_block).then(|| {
            let items = (capacity / per_block).max(1) as usize;
            Cache::with_weighter(items, capacity, BlockWeight)
        });
        BlockCache { cache, block, hits: AtomicU64::new(0), misses: AtomicU64::new(0) }
    }

    /// The `len` bytes starting `head` bytes into block `b0` of generation
    /// `gen`, if every block they span is cached. Call with the chunk's
    /// lock held (shared or exclusive).
    pub fn read(&self, gen: u64, b0: u64, head: usize, len: usize) -> Option<Vec<u8>> {
        let cache = self.cache.as_ref()?;
        let mut out = Vec::with_capacity(len);
        let mut block = b0;
        let mut skip = head;
        while out.len() < len {
            let Some(data) = cache.get(&(gen, block)) else {
                self.misses.fetch_add(1, Ordering::Relaxed);
                return None;
            };
            let take = (data.len() - skip).min(len - out.len());
            out.extend_from_slice(&data[skip..skip + take]);
            skip = 0;
            block += 1;
        }
        self.hits.fetch_add(1, Ordering::Relaxed);
        Some(out)
    }

    /// Copies block `block` of generation `gen` into `out` (one block
    /// long) if it is cached. Call with the chunk's lock held.
    pub fn copy_block(&self, gen: u64, block: u64, out: &mut [u8]) -> bool {
        let Some(data) = self.cache.as_ref().and_then(|c| c.get(&(gen, block))) else { return false };
        if data.len() != out.len() {
            return false;
        }
        out.copy_from_slice(&data);
        true
    }

    /// Caches the verified blocks `data` (whole blocks from `b0` on) of
    /// generation `gen`; `keep(i)` says whether the `i`th is worth it (a
    /// never-written block reads as zeros for free). Call with the chunk's
    /// lock held shared, right after the check.
    pub fn fill(&self, gen: u64, b0: u64, data: &[u8], keep: impl Fn(usize) -> bool) {
        let Some(cache) = &self.cache else { return };
        if data.len() > MAX_FILL_BLOCKS * self.block {
            return;
        }
        for (i, block) in data.chunks_exact(self.block).enumerate() {
            if keep(i) {
                cache.insert((gen, b0 + i as u64), Arc::from(block));
            }
        }
    }

    /// Forgets blocks `b0..b1` of generation `gen`. Call with the chunk's
    /// lock held exclusively, before the blocks change.
    pub fn forget(&self, gen: u64, b0: u64, b1: u64) {
        let Some(cache) = &self.cache else { return };
        if cache.is_empty() {
            return;
        }
        for block in b0..b1 {
            cache.remove(&(gen, block));
        }
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            bytes: self.cache.as_ref().map_or(0, |c| c.weight()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Goal: a read is answered only when every block it spans is cached,
    /// from the right offsets; forgetting or another generation misses; a
    /// zero capacity caches nothing; the capacity bounds the bytes held.
    #[test]
    fn reads_span_blocks_and_forget_misses() {
        let c = BlockCache::new(1 << 20, 4);
        c.fill(7, 10, b"abcdefgh", |_| true);
        assert_eq!(c.read(7, 10, 1, 6).as_deref(), Some(&b"bcdefg"[..]));
        assert_eq!(c.read(7, 11, 0, 4).as_deref(), Some(&b"efgh"[..]));
        assert_eq!(c.read(7, 11, 2, 3), None, "block 12 is not cached");
        assert_eq!(c.read(8, 10, 0, 4), None, "another generation");
        c.forget(7, 11, 12);
        assert_eq!(c.read(7, 10, 0, 8), None);
        assert_eq!(c.read(7, 10, 0, 4).as_deref(), Some(&b"abcd"[..]));
        c.fill(7, 20, b"zzzzyyyy", |i| i == 1);
        assert_eq!((c.read(7, 20, 0, 1), c.read(7, 21, 0, 4).as_deref()), (None, Some(&b"yyyy"[..])));
        let s = c.stats();
        assert_eq!((s.hits, s.misses), (4, 4));

        let none = BlockCache::new(0, 4);
        none.fill(1, 0, b"abcd", |_| true);
        assert_eq!(none.read(1, 0, 0, 4), None);

        let small = BlockCache::new(10 * (1024 + ENTRY_OVERHEAD), 1024);
        for gen in 0..100 {
            small.fill(gen, 0, &[gen as u8; 1024], |_| true);
        }
        assert!(small.stats().bytes <= 10 * (1024 + ENTRY_OVERHEAD), "{:?}", small.stats());
        let long = vec![1u8; (MAX_FILL_BLOCKS + 1) * 4];
        c.fill(9, 0, &long, |_| true);
        assert_eq!(c.read(9, 0, 0, 4), None, "a long read does not fill");
    }
}
