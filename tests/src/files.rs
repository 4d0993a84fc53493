//! Small helpers the data tests share: files through the client library
//! and reproducible contents.

use fs_client::file::FileClient;
use fs_client::proto::*;
use fs_client::MetaClient;
use rand::{RngCore, SeedableRng};

const READ_PIECE: u64 = 4 << 20;

/// Creates (or opens) a regular file; panics on failure.
pub async fn create(c: &MetaClient, parent: Ino, name: &str) -> Ino {
    c.op_attr(MetaOp::Create { parent, name: name.into(), perm: 0o644, caller: Caller::ROOT, exclusive: false })
        .await
        .expect("create")
        .ino
}

/// Writes `data` as the whole file at `path` (created if missing, its
/// parent must exist) and fsyncs it; panics on failure.
pub async fn put(files: &FileClient, path: &str, data: &[u8], perm: u32) -> Ino {
    let c = files.meta();
    let (parent, name) = path.rsplit_once('/').expect("absolute path");
    let p = c.resolve(if parent.is_empty() { b"/" } else { parent.as_bytes() }, true).await.expect("parent");
    let a = c
        .op_attr(MetaOp::Create { parent: p.ino, name: name.into(), perm, caller: Caller::ROOT, exclusive: false })
        .await
        .expect("create");
    if a.size > 0 {
        files.truncate(a.ino, 0).await.expect("truncate");
    }
    files.write(a.ino, 0, bytes::Bytes::copy_from_slice(data)).await.expect("write");
    files.fsync(a.ino).await.expect("fsync");
    a.ino
}

/// `len` pseudo-random bytes, the same for the same seed.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    v
}

/// The whole file, read in 4 MiB pieces until a read comes back empty.
pub async fn read_all(f: &FileClient, ino: Ino) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let d = f.read(ino, out.len() as u64, READ_PIECE).await.expect("read");
        if d.is_empty() {
            return out;
        }
        out.extend_from_slice(&d);
    }
}

/// Every chunk location of a file (up to the layout page limit).
pub async fn layout(c: &MetaClient, ino: Ino) -> Layout {
    match c.read(MetaRead::Layout { ino, first: 0, count: MAX_LAYOUT_CHUNKS }).await.expect("layout") {
        ReadReply::Layout(l) => l,
        other => panic!("{other:?}"),
    }
}
