//! Block checksums, computed where a write starts.
//!
//! Chunk servers keep a blake3 sum per block of every replica and check it
//! on every read. A client writing whole blocks computes their sums once
//! and sends them with the data ([`BlockSums`]); each replica stores them
//! instead of hashing the same bytes again (three hashes per block become
//! one). A sum made at the source also covers the data's trip through the
//! chain and each server's memory: a block damaged after it left the
//! client fails its check at the first read instead of being stored with a
//! sum of the damage.

use serde::{Deserialize, Serialize};

use crate::proto::ChunkId;

/// Bytes in one checksum.
pub const SUM_BYTES: usize = 32;

/// The sum a never-written (all zeros) block has: none. A block of data
/// never gets it (see [`block_sum`]).
pub const ZERO_SUM: [u8; SUM_BYTES] = [0; SUM_BYTES];

/// Most sums in one request: a write of at most 16 MiB in 4 KiB blocks.
pub const MAX_SUMS: usize = 4096;

/// The sums of the whole blocks a write carries, in order: every extent
/// of the write starts and ends on a `block_bytes` boundary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockSums {
    pub block_bytes: u32,
    pub sums: Vec<[u8; SUM_BYTES]>,
}

/// The checksum of block `block` of chunk `id` holding `data`: keyed by
/// both, so a block written at the wrong place fails its check.
pub fn block_sum(id: ChunkId, block: u64, data: &[u8]) -> [u8; SUM_BYTES] {
    // Data first keeps blake3's SIMD path aligned on the bulk of the input.
    let mut h = blake3::Hasher::new();
    h.update(data);
    h.update(&id.to_le_bytes());
    h.update(&block.to_le_bytes());
    let mut sum = *h.finalize().as_bytes();
    if sum == ZERO_SUM {
        sum[31] = 1;
    }
    sum
}

/// Whether every byte of `data` is zero.
pub fn is_zero(data: &[u8]) -> bool {
    let mut words = data.chunks_exact(16);
    words.all(|w| u128::from_ne_bytes(w.try_into().unwrap_or([1; 16])) == 0)
        && words.remainder().iter().all(|&b| b == 0)
}

/// How many blocks of `block_bytes` `extents` (`(offset, len)`) cover, if
/// every one of them starts and ends on a block boundary; `None` if one
/// does not (or the block size is 0).
pub fn whole_blocks(extents: &[(u64, u64)], block_bytes: u64) -> Option<u64> {
    let whole = |v: u64| block_bytes != 0 && v.is_multiple_of(block_bytes);
    extents.iter().all(|&(o, l)| whole(o) && whole(l)).then(|| extents.iter().map(|e| e.1 / block_bytes).sum())
}

/// The sums of `extents` (`(offset, len)` in chunk `id`, their bytes one
/// after another in `data`) in blocks of `block_bytes`, all-zero blocks as
/// [`ZERO_SUM`]; `None` unless every extent is whole blocks.
pub fn extent_sums(id: ChunkId, extents: &[(u64, u64)], data: &[u8], block_bytes: u64) -> Option<BlockSums> {
    if extents.iter().map(|e| e.1).sum::<u64>() != data.len() as u64 {
        return None;
    }
    let mut at = 0usize;
    let pieces: Vec<&[u8]> = extents
        .iter()
        .map(|&(_, len)| {
            let piece = &data[at..at + len as usize];
            at += len as usize;
            piece
        })
        .collect();
    piece_sums(id, extents, &pieces, block_bytes)
}

/// [`extent_sums`] with each extent's bytes apart: `pieces[i]` holds
/// `extents[i]`'s.
pub fn piece_sums<D: AsRef<[u8]>>(
    id: ChunkId,
    extents: &[(u64, u64)],
    pieces: &[D],
    block_bytes: u64,
) -> Option<BlockSums> {
    let block_bytes_u32 = u32::try_from(block_bytes).ok()?;
    let blocks = whole_blocks(extents, block_bytes)?;
    if blocks == 0 || blocks > MAX_SUMS as u64 || pieces.len() != extents.len() {
        return None;
    }
    if extents.iter().zip(pieces).any(|(e, p)| e.1 != p.as_ref().len() as u64) {
        return None;
    }
    let bs = block_bytes as usize;
    let mut sums = Vec::with_capacity(blocks as usize);
    for (&(offset, _), piece) in extents.iter().zip(pieces) {
        let first = offset / block_bytes;
        for (i, block) in piece.as_ref().chunks_exact(bs).enumerate() {
            sums.push(if is_zero(block) { ZERO_SUM } else { block_sum(id, first + i as u64, block) });
        }
    }
    Some(BlockSums { block_bytes: block_bytes_u32, sums })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_cover_whole_blocks_only() {
        let data: Vec<u8> = (0..3 * 4096).map(|i| (i % 251) as u8).collect();
        let s = extent_sums(7, &[(0, 4096), (8192, 8192)], &data, 4096).expect("whole blocks");
        assert_eq!(s.sums.len(), 3);
        assert_eq!(s.sums[0], block_sum(7, 0, &data[..4096]));
        assert_eq!(s.sums[1], block_sum(7, 2, &data[4096..8192]));
        assert_eq!(s.sums[2], block_sum(7, 3, &data[8192..]));
        assert_ne!(s.sums[1], block_sum(8, 2, &data[4096..8192]), "keyed by chunk");
        assert!(extent_sums(7, &[(1, 4096)], &data[..4096], 4096).is_none(), "unaligned start");
        assert!(extent_sums(7, &[(0, 100)], &data[..100], 4096).is_none(), "partial block");
        assert!(extent_sums(7, &[(0, 4096)], &data[..100], 4096).is_none(), "short data");
        let zeros = vec![0u8; 4096];
        assert_eq!(extent_sums(7, &[(0, 4096)], &zeros, 4096).unwrap().sums, vec![ZERO_SUM]);
        assert!(is_zero(&zeros[..13]) && !is_zero(&data[1..20]));
        assert_eq!(whole_blocks(&[(0, 4096), (8192, 8192)], 4096), Some(3));
        assert_eq!(whole_blocks(&[(0, 4096), (8192, 100)], 4096), None);
        assert_eq!(whole_blocks(&[(0, 4096)], 0), None);
    }
}
