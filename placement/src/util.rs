//! Small deterministic building blocks: a seedless hasher and a bit set.
//!
//! std's `RandomState` seeds every map from the OS, which is randomness this
//! crate promises not to use (and it is slower than needed for the integer
//! and short-label keys used here). Keys come from the cluster's own
//! configuration, not from untrusted peers, so hash flooding is no concern.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

/// The multiply-rotate hash used by rustc (FxHash): fast and seedless.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct FxHasher {
    hash: u64,
}

const FX_SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(FX_SEED);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w));
        }
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.hash
    }
}

pub(crate) type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;
pub(crate) type FastSet<K> = HashSet<K, BuildHasherDefault<FxHasher>>;

/// A growable set of small integers (host or domain indices).
#[derive(Debug, Default, Clone)]
pub(crate) struct BitSet {
    words: Vec<u64>,
}

impl BitSet {
    pub(crate) fn with_len(len: usize) -> Self {
        BitSet { words: vec![0; len.div_ceil(64)] }
    }

    pub(crate) fn insert(&mut self, i: usize) {
        let w = i / 64;
        if w >= self.words.len() {
            self.words.resize(w + 1, 0);
        }
        self.words[w] |= 1 << (i % 64);
    }

    #[inline]
    pub(crate) fn contains(&self, i: usize) -> bool {
        self.words.get(i / 64).is_some_and(|w| (w >> (i % 64)) & 1 == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitset_grows_and_answers() {
        let mut b = BitSet::with_len(10);
        b.insert(3);
        b.insert(200);
        assert!(b.contains(3) && b.contains(200));
        assert!(!b.contains(4) && !b.contains(10_000));
    }

    #[test]
    fn hasher_is_seedless() {
        let mut a = FxHasher::default();
        let mut b = FxHasher::default();
        a.write(b"zone-1/rack-17");
        b.write(b"zone-1/rack-17");
        assert_eq!(a.finish(), b.finish());
    }
}
