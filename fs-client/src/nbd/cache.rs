//! The export's read cache: whole blocks of the image in memory, shared by
//! every connection of the process.
//!
//! It is only used while the export holds the image's write lease (see
//! [`super::lease`]): then nothing but this process changes the image, so
//! a block stays true until this process writes it. Writes, trims and
//! write-zeroes drop the blocks they touch once they have landed (and
//! before they are sent).
//!
//! A read that missed fetches its blocks and then offers them
//! ([`BlockCache::fill`]). A write may land while the fetch is under way,
//! and the fetched bytes may be older than it; so every change takes a
//! sequence number when it has landed, the fill names the number it
//! started at, and a block overlapped by any later change is not kept. The changes remembered are
//! bounded: a fill older than the oldest one remembered keeps nothing.
//! [`BlockCache::clear`] works the same way for everything.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use bytes::Bytes;

/// Cached block size: 16 random 4 KiB reads of one block cost one fetch.
pub const CACHE_BLOCK_BYTES: u64 = 64 << 10;
/// Changes remembered for fills in flight.
const MAX_RECENT_CHANGES: usize = 4096;

/// Image blocks in memory, at most `capacity` bytes; oldest filled go first.
pub struct BlockCache {
    block: u64,
    max_blocks: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    blocks: HashMap<u64, Bytes>,
    /// Fill order, for eviction; may name blocks dropped since.
    order: VecDeque<u64>,
    /// Sequence number of the last change.
    seq: u64,
    /// Changes after `floor`: (seq, first block, last block).
    recent: VecDeque<(u64, u64, u64)>,
    /// A fill that started before this keeps nothing.
    floor: u64,
    hits: u64,
    misses: u64,
    /// Recent hits and lookups of blocks, halved every
    /// [`RECENT_WINDOW`] lookups: how well the cache does now.
    recent_hits: u64,
    recent_lookups: u64,
    /// Misses [`BlockCache::admit_miss`] turned away since it last let one in.
    refused: u64,
}

/// Block lookups after which the recent counts are halved.
const RECENT_WINDOW: u64 = 4096;
/// While the cache thrashes, one miss in this many still fills it (so a
/// new working set that fits can move in).
const ADMIT_ONE_IN: u64 = 8;

/// What [`BlockCache::lookup`] found.
pub struct Lookup {
    /// Per block of the range: its bytes if cached.
    pub blocks: Vec<Option<Bytes>>,
    /// Pass to [`BlockCache::fill`] with what was fetched.
    pub since: u64,
}

impl Inner {
    fn note_recent(&mut self, hits: u64, lookups: u64) {
        self.recent_hits += hits;
        self.recent_lookups += lookups;
        if self.recent_lookups >= RECENT_WINDOW {
            self.recent_hits /= 2;
            self.recent_lookups /= 2;
        }
    }
}

impl BlockCache {
    /// A cache of at most `capacity` bytes in blocks of `block` bytes.
    pub fn new(capacity: u64, block: u64) -> Self {
        let block = block.max(1);
        BlockCache { block, max_blocks: (capacity / block) as usize, inner: Mutex::default() }
    }

    pub fn block_bytes(&self) -> u64 {
        self.block
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cached blocks `first..=last`.
    pub fn lookup(&self, first: u64, last: u64) -> Lookup {
        let mut g = self.lock();
        let blocks: Vec<Option<Bytes>> = (first..=last).map(|b| g.blocks.get(&b).cloned()).collect();
        let found = blocks.iter().filter(|b| b.is_some()).count() as u64;
        g.hits += found;
        g.misses += blocks.len() as u64 - found;
        g.note_recent(found, blocks.len() as u64);
        Lookup { blocks, since: g.seq }
    }

    /// Whether a small read that missed should fetch whole blocks and keep
    /// them. Not while the cache is full and more than a tenth of lookups
    /// miss (a working set larger than the cache): every fill would push out
    /// a block about as likely to be read as the new one, and cost a whole
    /// block's read for a few KiB. Then only one miss in [`ADMIT_ONE_IN`]
    /// fills it.
    pub fn admit_miss(&self) -> bool {
        let mut g = self.lock();
        let full = g.blocks.len() >= self.max_blocks;
        let thrashing = full && g.recent_hits * 10 < g.recent_lookups * 9;
        if !thrashing {
            return true;
        }
        g.refused += 1;
        if g.refused >= ADMIT_ONE_IN {
            g.refused = 0;
            return true;
        }
        false
    }

    /// Blocks `first..=last` if every one is cached (a hit; a miss counts
    /// nothing: the read goes on through [`BlockCache::lookup`]).
    pub fn lookup_all(&self, first: u64, last: u64) -> Option<Vec<Bytes>> {
        let mut g = self.lock();
        let blocks: Option<Vec<Bytes>> = (first..=last).map(|b| g.blocks.get(&b).cloned()).collect();
        if let Some(b) = &blocks {
            g.hits += b.len() as u64;
            let n = b.len() as u64;
            g.note_recent(n, n);
        }
        blocks
    }

    /// Keeps fetched blocks (index, bytes) that no change since `since`
    /// touched.
    pub fn fill(&self, since: u64, fetched: impl IntoIterator<Item = (u64, Bytes)>) {
        if self.max_blocks == 0 {
            return;
        }
        let mut g = self.lock();
        if since < g.floor {
            return;
        }
        for (index, data) in fetched {
            let touched =
                g.recent.iter().rev().take_while(|(s, _, _)| *s > since).any(|(_, a, b)| *a <= index && index <= *b);
            if touched {
                continue;
            }
            if g.blocks.insert(index, data).is_none() {
                g.order.push_back(index);
            }
            while g.blocks.len() > self.max_blocks {
                match g.order.pop_front() {
                    Some(old) => {
                        g.blocks.remove(&old);
                    }
                    None => break,
                }
            }
            if g.order.len() > 2 * self.max_blocks + 16 {
                // Drop names of blocks no longer cached (keep the order).
                let Inner { blocks, order, .. } = &mut *g;
                let mut seen = std::collections::HashSet::new();
                order.retain(|b| blocks.contains_key(b) && seen.insert(*b));
            }
        }
    }

    /// The bytes `[offset, offset + len)` change: their blocks go, and
    /// fills under way keep none of them.
    pub fn invalidate(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / self.block;
        let last = (offset + len - 1) / self.block;
        let mut g = self.lock();
        g.seq += 1;
        let seq = g.seq;
        g.recent.push_back((seq, first, last));
        while g.recent.len() > MAX_RECENT_CHANGES {
            if let Some((s, _, _)) = g.recent.pop_front() {
                g.floor = g.floor.max(s);
            }
        }
        if last - first < 64 {
            for b in first..=last {
                g.blocks.remove(&b);
            }
        } else {
            g.blocks.retain(|b, _| *b < first || *b > last);
        }
    }

    /// Everything goes, and fills under way keep nothing.
    pub fn clear(&self) {
        let mut g = self.lock();
        g.seq += 1;
        g.floor = g.seq;
        g.recent.clear();
        g.blocks.clear();
        g.order.clear();
    }

    /// (cached bytes, hits, misses) so far.
    pub fn stats(&self) -> (u64, u64, u64) {
        let g = self.lock();
        (g.blocks.values().map(|b| b.len() as u64).sum(), g.hits, g.misses)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_thrashing_cache_admits_few_misses() {
        let c = BlockCache::new(4 * 4, 4);
        // Not full: every miss fills.
        assert!((0..20).all(|_| c.admit_miss()));
        c.fill(c.lookup(0, 3).since, (0..4).map(|i| (i, block(i as u8))));
        // Full, and nearly every lookup misses: one in eight.
        for b in 10..200 {
            let _ = c.lookup(b, b);
        }
        let admitted = (0..80).filter(|_| c.admit_miss()).count();
        assert_eq!(admitted, 80 / ADMIT_ONE_IN as usize);
        // Once lookups hit again, misses fill again.
        for _ in 0..2000 {
            let _ = c.lookup(0, 3);
        }
        assert!((0..20).all(|_| c.admit_miss()));
    }

    fn block(v: u8) -> Bytes {
        Bytes::from(vec![v; 4])
    }

    #[test]
    fn a_fill_keeps_blocks_no_later_change_touched() {
        let c = BlockCache::new(1 << 20, 4);
        let l = c.lookup(0, 3);
        assert!(l.blocks.iter().all(|b| b.is_none()));
        // A write to block 2 lands while the fetch is under way.
        c.invalidate(8, 1);
        c.fill(l.since, (0..4).map(|i| (i, block(i as u8))));
        let after = c.lookup(0, 3);
        assert_eq!(after.blocks[0].as_deref(), Some(&[0u8; 4][..]));
        assert!(after.blocks[2].is_none(), "block 2 may be older than the write");
        assert!(after.blocks[3].is_some());
        // A fill that starts after the write keeps it.
        c.fill(after.since, [(2, block(9))]);
        assert_eq!(c.lookup(2, 2).blocks[0].as_deref(), Some(&[9u8; 4][..]));
    }

    #[test]
    fn clear_drops_everything_and_fills_under_way() {
        let c = BlockCache::new(1 << 20, 4);
        let l = c.lookup(0, 0);
        c.fill(l.since, [(0, block(1))]);
        let l = c.lookup(1, 1);
        c.clear();
        c.fill(l.since, [(1, block(2))]);
        let now = c.lookup(0, 1);
        assert!(now.blocks.iter().all(|b| b.is_none()));
    }

    #[test]
    fn fills_older_than_the_changes_remembered_keep_nothing() {
        let c = BlockCache::new(1 << 20, 4);
        let l = c.lookup(0, 0);
        for i in 0..(MAX_RECENT_CHANGES as u64 + 1) {
            c.invalidate(4 * (1000 + i), 1);
        }
        c.fill(l.since, [(0, block(1))]);
        assert!(c.lookup(0, 0).blocks[0].is_none());
    }

    #[test]
    fn capacity_bounds_the_blocks_and_a_zero_cache_keeps_none() {
        let c = BlockCache::new(16, 4);
        for round in 0..3u64 {
            for i in 0..10u64 {
                let l = c.lookup(i, i);
                c.fill(l.since, [(i, block((i + round) as u8))]);
                c.invalidate(4 * ((i + 3) % 10), 1);
            }
        }
        assert!(c.stats().0 <= 16);
        let z = BlockCache::new(0, 4);
        let l = z.lookup(0, 0);
        z.fill(l.since, [(0, block(1))]);
        assert_eq!(z.stats().0, 0);
    }

    proptest! {
        /// Against a model image: whatever interleaving of lookups, fills
        /// (with bytes read at their start) and writes, a cached block is
        /// always the image's current block.
        #[test]
        fn cached_blocks_are_never_older_than_the_image(
            ops in proptest::collection::vec((0u8..4, 0u64..8, 0u8..255), 1..200),
        ) {
            let c = BlockCache::new(6 * 4, 4);
            let mut image = [0u8; 8];
            // Fetches under way: (since, block, bytes read at the start).
            let mut pending: Vec<(u64, u64, u8)> = Vec::new();
            for (kind, b, v) in ops {
                match kind {
                    0 => {
                        let l = c.lookup(b, b);
                        pending.push((l.since, b, image[b as usize]));
                    }
                    1 => {
                        if let Some((since, b, bytes)) = pending.pop() {
                            c.fill(since, [(b, block(bytes))]);
                        }
                    }
                    2 => {
                        // The write lands, then its blocks are dropped.
                        image[b as usize] = v;
                        c.invalidate(4 * b, 4);
                    }
                    _ => {
                        if v % 16 == 0 {
                            c.clear();
                        }
                    }
                }
                for i in 0..8u64 {
                    if let Some(got) = &c.lookup(i, i).blocks[0] {
                        prop_assert_eq!(got[0], image[i as usize], "block {}", i);
                    }
                }
            }
        }
    }
}
