//! Key layout of the metadata state machine. Integers are big endian so the
//! key order is the numeric order.
//!
//! | prefix | key                         | value                      |
//! |--------|-----------------------------|----------------------------|
//! | `I`    | ino                         | [`InodeRec`]               |
//! | `D`    | parent ino, name            | [`DentryRec`]              |
//! | `X`    | ino, name                   | xattr value                |
//! | `S`    | name                        | system counters            |
//! | `Q`    | client id, seq              | [`DedupRec`]: stored reply |
//! | `q`    | log index                   | [`DedupLog`]: ids to expire |
//! | `E`    | log index                   | `Vec<Change>`              |
//! | `F`    | ino, chunk index            | chunk id (8 bytes)         |
//! | `K`    | chunk id                    | [`ChunkRec`]               |
//! | `V`    | server id                   | [`ServerRec`]              |
//! | `L`    | ino                         | [`Lease`]                  |
//! | `O`    | ino                         | [`Lease`]: an orphan's hold |
//!
//! [`InodeRec`]: super::fsm::InodeRec
//! [`DentryRec`]: super::fsm::DentryRec
//! [`DedupRec`]: super::fsm::DedupRec
//! [`DedupLog`]: super::fsm::DedupLog
//! [`ChunkRec`]: super::fsm::ChunkRec
//! [`ServerRec`]: super::fsm::ServerRec
//! [`Lease`]: fs_client::proto::Lease

use fs_client::proto::{Ino, RequestId};

pub const INODE: u8 = b'I';
pub const DENTRY: u8 = b'D';
pub const XATTR: u8 = b'X';
pub const SYSTEM: u8 = b'S';
pub const DEDUP: u8 = b'Q';
pub const DEDUP_EXPIRY: u8 = b'q';
pub const CHANGE: u8 = b'E';
pub const FILE_CHUNK: u8 = b'F';
pub const CHUNK: u8 = b'K';
pub const SERVER: u8 = b'V';
pub const LEASE: u8 = b'L';
pub const ORPHAN: u8 = b'O';

fn tag_u64(tag: u8, v: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(17);
    k.push(tag);
    k.extend_from_slice(&v.to_be_bytes());
    k
}

/// The number of a [`tag_u64`] key with tag `tag`.
fn u64_of_tag(tag: u8, k: &[u8]) -> Option<u64> {
    match k {
        [t, rest @ ..] if *t == tag => rest.try_into().ok().map(u64::from_be_bytes),
        _ => None,
    }
}

/// Chunk `index` of file `ino`.
pub fn file_chunk(ino: Ino, index: u64) -> Vec<u8> {
    let mut k = tag_u64(FILE_CHUNK, ino);
    k.extend_from_slice(&index.to_be_bytes());
    k
}

/// The prefix of every chunk entry of file `ino`.
pub fn file_chunks(ino: Ino) -> Vec<u8> {
    tag_u64(FILE_CHUNK, ino)
}

/// The chunk index inside a file-chunk key.
pub fn file_chunk_index(k: &[u8]) -> Option<u64> {
    (k.len() == 17 && k[0] == FILE_CHUNK).then(|| u64::from_be_bytes(k[9..17].try_into().expect("8 bytes")))
}

pub fn chunk(id: u64) -> Vec<u8> {
    tag_u64(CHUNK, id)
}

pub fn chunk_id(k: &[u8]) -> Option<u64> {
    u64_of_tag(CHUNK, k)
}

pub fn server(id: u64) -> Vec<u8> {
    tag_u64(SERVER, id)
}

/// The write lease on file `ino`.
pub fn lease(ino: Ino) -> Vec<u8> {
    tag_u64(LEASE, ino)
}

/// The hold on orphan `ino` (open somewhere, no name left).
pub fn orphan(ino: Ino) -> Vec<u8> {
    tag_u64(ORPHAN, ino)
}

pub fn orphan_ino(k: &[u8]) -> Option<Ino> {
    u64_of_tag(ORPHAN, k)
}

pub fn inode(ino: Ino) -> Vec<u8> {
    tag_u64(INODE, ino)
}

pub fn inode_from_key(k: &[u8]) -> Option<Ino> {
    u64_of_tag(INODE, k)
}

pub fn dentry(parent: Ino, name: &[u8]) -> Vec<u8> {
    let mut k = dir_prefix(parent);
    k.extend_from_slice(name);
    k
}

/// The prefix of every entry of directory `parent`.
pub fn dir_prefix(parent: Ino) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + 32);
    k.push(DENTRY);
    k.extend_from_slice(&parent.to_be_bytes());
    k
}

/// (parent, name) of a dentry key.
pub fn dentry_from_key(k: &[u8]) -> Option<(Ino, &[u8])> {
    (k.len() > 9 && k[0] == DENTRY).then(|| (u64::from_be_bytes(k[1..9].try_into().expect("8 bytes")), &k[9..]))
}

pub fn xattr(ino: Ino, name: &[u8]) -> Vec<u8> {
    let mut k = xattr_prefix(ino);
    k.extend_from_slice(name);
    k
}

pub fn xattr_prefix(ino: Ino) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + 16);
    k.push(XATTR);
    k.extend_from_slice(&ino.to_be_bytes());
    k
}

pub fn system(name: &str) -> Vec<u8> {
    let mut k = vec![SYSTEM];
    k.extend_from_slice(name.as_bytes());
    k
}

pub fn dedup(id: &RequestId) -> Vec<u8> {
    let mut k = Vec::with_capacity(25);
    k.push(DEDUP);
    k.extend_from_slice(&id.client.to_be_bytes());
    k.extend_from_slice(&id.seq.to_be_bytes());
    k
}

/// The dedup records one command created, by its log index.
pub fn dedup_log(index: u64) -> Vec<u8> {
    tag_u64(DEDUP_EXPIRY, index)
}

/// The command index of a [`dedup_log`] key.
pub fn dedup_log_index(k: &[u8]) -> Option<u64> {
    u64_of_tag(DEDUP_EXPIRY, k)
}

pub fn change(index: u64) -> Vec<u8> {
    tag_u64(CHANGE, index)
}

pub fn change_index(k: &[u8]) -> Option<u64> {
    u64_of_tag(CHANGE, k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_numerically_and_parse_back() {
        assert!(inode(2) < inode(256));
        assert_eq!(inode_from_key(&inode(77)), Some(77));
        assert_eq!(dentry_from_key(&dentry(5, b"x")), Some((5, &b"x"[..])));
        assert!(dentry(1, b"zzz") < dentry(2, b""));
        assert!(dedup_log(2) < dedup_log(256));
        assert!(dedup(&RequestId { client: 1, seq: 9 }) < dedup(&RequestId { client: 2, seq: 0 }));
        assert_eq!(change_index(&change(42)), Some(42));
        assert_eq!(dedup_log_index(&dedup_log(9)), Some(9));
        assert_eq!((chunk_id(&inode(3)), chunk_id(&chunk(3)[..5])), (None, None), "another tag, or short");
        assert_eq!(file_chunk_index(&file_chunk(7, 300)), Some(300));
        assert!(file_chunk(7, u64::MAX) < file_chunk(8, 0));
        assert_eq!(chunk_id(&chunk(99)), Some(99));
    }
}
