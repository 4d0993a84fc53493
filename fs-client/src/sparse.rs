//! Where a file's data and holes are, at chunk granularity: the answers
//! to `lseek(SEEK_DATA | SEEK_HOLE)`.
//!
//! A file is a sequence of chunks, and a chunk slot with no chunk
//! allocated reads as zeros without taking space: a hole. A chunk that
//! exists is data as a whole (its unwritten blocks too), which the
//! calls allow: a filesystem may report any hole as data, never data as a
//! hole. The end of the file is a hole.

use std::collections::BTreeSet;

/// What to look for from an offset on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seek {
    /// `SEEK_DATA`: the first byte at or after it that is data.
    Data,
    /// `SEEK_HOLE`: the first byte at or after it in a hole.
    Hole,
}

/// One step of a search over a window of the chunk map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The answer: this offset.
    At(u64),
    /// No data at or after the offset (`ENXIO`), or the offset is at or
    /// past the end of the file.
    Nothing,
    /// Not decided inside the known part: look again from this chunk index.
    From(u64),
}

/// Searches from `offset` in a file of `size` bytes, chunks of
/// `chunk_bytes`, whose chunk indexes in `present` exist, the map being
/// known for the indexes `from..known_end` (`from` at most
/// `offset / chunk_bytes`' index: the search starts at `offset`).
pub fn seek_step(
    what: Seek,
    offset: u64,
    size: u64,
    chunk_bytes: u64,
    present: &BTreeSet<u64>,
    known_end: u64,
) -> Step {
    if offset >= size {
        return Step::Nothing;
    }
    if chunk_bytes == 0 {
        // Nothing known of the chunks: all data, a hole at the end.
        return Step::At(if what == Seek::Data { offset } else { size });
    }
    let last = (size - 1) / chunk_bytes;
    let mut index = offset / chunk_bytes;
    while index < known_end.min(last + 1) {
        if present.contains(&index) == (what == Seek::Data) {
            return Step::At(offset.max(index * chunk_bytes));
        }
        index += 1;
    }
    if index > last {
        // Past the last chunk: no more data, and the end is a hole.
        return match what {
            Seek::Data => Step::Nothing,
            Seek::Hole => Step::At(size),
        };
    }
    Step::From(index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set(v: &[u64]) -> BTreeSet<u64> {
        v.iter().copied().collect()
    }

    #[test]
    fn data_and_holes_by_chunk() {
        // Chunks of 10 bytes; 0 and 2 present, 1 and 3 holes; 35 bytes.
        let p = set(&[0, 2]);
        let s = |what, off| seek_step(what, off, 35, 10, &p, 100);
        assert_eq!(s(Seek::Data, 3), Step::At(3));
        assert_eq!(s(Seek::Data, 12), Step::At(20));
        assert_eq!(s(Seek::Data, 31), Step::Nothing, "the last chunk is a hole");
        assert_eq!(s(Seek::Hole, 3), Step::At(10));
        assert_eq!(s(Seek::Hole, 12), Step::At(12));
        assert_eq!(s(Seek::Hole, 25), Step::At(30));
        assert_eq!(s(Seek::Hole, 35), Step::Nothing, "at the end");
        // All data: the hole is the end.
        assert_eq!(seek_step(Seek::Hole, 0, 35, 10, &set(&[0, 1, 2, 3]), 100), Step::At(35));
    }

    #[test]
    fn an_unknown_rest_asks_again() {
        let p = set(&[5]);
        assert_eq!(seek_step(Seek::Data, 0, 1000, 10, &p, 4), Step::From(4));
        assert_eq!(seek_step(Seek::Data, 0, 1000, 10, &p, 6), Step::At(50));
        assert_eq!(seek_step(Seek::Hole, 50, 1000, 10, &p, 6), Step::From(6));
    }

    proptest! {
        /// Against a byte-by-byte model: never a hole reported where
        /// there is data, never data skipped.
        #[test]
        fn answers_match_a_byte_model(present in proptest::collection::btree_set(0u64..12, 0..12),
                                      size in 1u64..120, offset in 0u64..130, cb in 1u64..15) {
            let is_data = |b: u64| b < size && present.contains(&(b / cb));
            let data = seek_step(Seek::Data, offset, size, cb, &present, u64::MAX);
            let hole = seek_step(Seek::Hole, offset, size, cb, &present, u64::MAX);
            if offset >= size {
                prop_assert_eq!(data, Step::Nothing);
                prop_assert_eq!(hole, Step::Nothing);
            } else {
                let want_data = (offset..size).find(|&b| is_data(b));
                let want_hole = (offset..size).find(|&b| !is_data(b)).unwrap_or(size);
                prop_assert_eq!(data, want_data.map_or(Step::Nothing, Step::At));
                prop_assert_eq!(hole, Step::At(want_hole));
            }
        }
    }
}
