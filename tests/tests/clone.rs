//! Clones and snapshots with real chunk servers: copy-on-write on the
//! first write, fencing of writers holding an old layout, read-only
//! snapshots, deep clone chains, directory trees, and space coming back.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fs_client::proto::*;
use locus_tests::files::{create, layout, pattern, read_all};
use locus_tests::{init_logging, locus_cli, phase, Cluster, ClusterOptions};
use rand::{Rng, SeedableRng};

const MIB: u64 = 1 << 20;

/// Waits until no chunk server holds a replica file any more.
async fn wait_no_replica_files(cluster: &Cluster) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let files: usize = cluster.chunks.values().map(|n| n.chunk_files().len()).sum();
        if files == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{files} replica files left after deleting everything");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A 3 MiB file `name` in the root holding `pattern(seed)`, synced.
async fn written_file(cluster: &Cluster, name: &str, seed: u64) -> (Ino, Vec<u8>) {
    let (c, f) = (cluster.client(), cluster.files());
    let ino = create(&c, ROOT_INO, name).await;
    let data = pattern(seed, (3 * MIB) as usize);
    f.write(ino, 0, Bytes::from(data.clone())).await.unwrap();
    f.fsync(ino).await.unwrap();
    (ino, data)
}

/// Reads a chunk at one version straight from every replica: all the same.
async fn replicas_agree(cluster: &Cluster, loc: &ChunkLocation, len: u64) -> Vec<u8> {
    let direct = fs_client::chunk::ChunkClient::new(&cluster.client_config("admin").identity()).unwrap();
    let mut first: Option<Vec<u8>> = None;
    for r in &loc.replicas {
        let got = direct.read(&r.addr, loc.chunk, loc.version, 0, len).await;
        let got = got.unwrap_or_else(|e| panic!("chunk {} v{} on server {}: {e}", loc.chunk, loc.version, r.server));
        match &first {
            None => first = Some(got.to_vec()),
            Some(f) => assert!(f[..] == got[..], "replicas of chunk {} differ", loc.chunk),
        }
    }
    first.unwrap_or_default()
}

/// Goal: a clone of a multi-chunk file takes 1,000 random 4 KiB writes;
/// the source stays byte for byte what it was, the clone has the writes,
/// and survives the source's deletion; deleting both frees every replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clone_a_file_and_write_into_the_clone() {
    init_logging();
    let cluster = Cluster::start(ClusterOptions::default()).await.expect("cluster");
    let (c, f) = (cluster.client(), cluster.files());
    let src = create(&c, ROOT_INO, "src").await;
    let data = pattern(1, (8 * MIB + 12_345) as usize);
    f.write(src, 0, Bytes::from(data.clone())).await.unwrap();
    f.fsync(src).await.unwrap();

    phase("clone the 9-chunk file: metadata only, every chunk shared and fenced");
    let t = Instant::now();
    let out = f.clone_inode(src, ROOT_INO, b"clone", false).await.expect("clone");
    eprintln!("clone of {} chunks took {:?}", out.chunks, t.elapsed());
    assert_eq!((out.chunks, out.fenced, out.inodes), (9, 9, 1));
    assert!(out.unfenced.is_empty(), "{:?}", out.unfenced);
    let dst = out.attr.ino;
    assert_eq!(c.getattr(dst).await.unwrap().size, data.len() as u64);
    let src_chunks: Vec<ChunkId> = layout(&c, src).await.chunks.iter().map(|l| l.chunk).collect();
    let l = layout(&c, dst).await;
    assert_eq!(l.chunks.iter().map(|l| l.chunk).collect::<Vec<_>>(), src_chunks);
    assert!(l.chunks.iter().all(|x| x.shared));
    assert!(read_all(&cluster.files(), dst).await == data, "the clone reads as the source");

    phase("1,000 random 4 KiB writes into the clone; the source is unchanged");
    let w = cluster.files();
    let mut want = data.clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    for i in 0..1000u64 {
        let off = rng.gen_range(0..(data.len() as u64 - 4096) / 4096) * 4096;
        let block = pattern(1000 + i, 4096);
        want[off as usize..off as usize + 4096].copy_from_slice(&block);
        w.write(dst, off, Bytes::from(block)).await.unwrap();
    }
    w.fsync(dst).await.unwrap();
    let fresh = cluster.files();
    assert!(read_all(&fresh, src).await == data, "the source changed");
    assert!(read_all(&fresh, dst).await == want, "the clone lacks its writes");
    let l = layout(&c, dst).await;
    assert!(l.chunks.iter().all(|x| !x.shared && x.origin.is_none()), "every copy done: {l:?}");
    let new_chunks: BTreeSet<ChunkId> = l.chunks.iter().map(|x| x.chunk).collect();
    assert!(src_chunks.iter().all(|c| !new_chunks.contains(c)), "every chunk was written, so copied");
    assert!(layout(&c, src).await.chunks.iter().all(|x| !x.shared), "the source owns its chunks again");
    for loc in &l.chunks {
        replicas_agree(&cluster, loc, MIB).await;
    }

    phase("delete the source: the clone reads back whole");
    c.op(MetaOp::Unlink { parent: ROOT_INO, name: "src".into() }).await.unwrap();
    assert!(read_all(&cluster.files(), dst).await == want);

    phase("delete the clone: every replica file goes away");
    c.op(MetaOp::Unlink { parent: ROOT_INO, name: "clone".into() }).await.unwrap();
    wait_no_replica_files(&cluster).await;
}

/// Goal: a snapshot is the file at that moment: read-only (EROFS), and a
/// writer holding the source's layout from before writes after it into
/// its own copies, never into the snapshot; every replica agrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_is_read_only_and_fences_stale_writers() {
    init_logging();
    let cluster = Cluster::start(ClusterOptions::default()).await.expect("cluster");
    let c = cluster.client();
    let (ino, before) = written_file(&cluster, "disk.img", 2).await;

    phase("a writer caches the layout (writes once), then the CLI takes a snapshot");
    let writer = cluster.files();
    writer.write_through(ino, 10, Bytes::from_static(b"first")).await.unwrap();
    let mut before = before;
    before[10..15].copy_from_slice(b"first");
    let cfg = cluster.write_cli_config("admin", None, 20_000);
    let (code, out, err) = locus_cli(&cfg, &["--json", "fs", "snapshot", "/disk.img", "/snap.img"], None);
    assert_eq!(code, 0, "snapshot failed: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json output");
    eprintln!("snapshot: {v}");
    assert_eq!(v["chunks_shared"], 3);
    assert!(v["elapsed_ms"].as_f64().unwrap() > 0.0);
    let snap = v["ino"].as_u64().unwrap();

    phase("the writer writes with its old layout: refused as stale, it copies and goes on");
    let after = pattern(3, (3 * MIB) as usize);
    writer.write(ino, 0, Bytes::from(after.clone())).await.unwrap();
    writer.fsync(ino).await.expect("the stale writer recovers");
    let fresh = cluster.files();
    assert!(read_all(&fresh, ino).await == after, "the source has the new data");
    assert!(read_all(&fresh, snap).await == before, "the snapshot changed");
    for loc in &layout(&c, snap).await.chunks {
        let got = replicas_agree(&cluster, loc, MIB).await;
        let at = (loc.index * MIB) as usize;
        assert!(got[..] == before[at..at + MIB as usize], "chunk {} of the snapshot", loc.index);
    }

    let src_chunks: BTreeSet<ChunkId> = layout(&c, ino).await.chunks.iter().map(|x| x.chunk).collect();
    let snap_layout = layout(&c, snap).await;
    assert!(snap_layout.read_only);
    assert!(snap_layout.chunks.iter().all(|x| !src_chunks.contains(&x.chunk) && !x.shared));

    phase("writes, truncation, attributes and entries of the snapshot: EROFS");
    let e = async {
        fresh.write(snap, 0, Bytes::from_static(b"x")).await?;
        fresh.flush(snap).await
    }
    .await
    .expect_err("a write to a snapshot");
    assert_eq!((e.code(), e.errno()), (ErrorCode::ReadOnly, libc::EROFS), "{e}");
    let e = fresh.truncate(snap, 1).await.expect_err("truncating a snapshot");
    assert_eq!(e.code(), ErrorCode::ReadOnly);
    let (code, _, err) = locus_cli(&cfg, &["fs", "chmod", "600", "/snap.img"], None);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("ReadOnly"), "{err}");
    assert!(read_all(&cluster.files(), snap).await == before);

    phase("remove the source, then the snapshot: every replica file goes");
    c.op(MetaOp::Unlink { parent: ROOT_INO, name: "disk.img".into() }).await.unwrap();
    assert!(read_all(&cluster.files(), snap).await == before, "the snapshot outlives its source");
    let (code, _, err) = locus_cli(&cfg, &["fs", "rm", "/snap.img"], None);
    assert_eq!(code, 0, "{err}");
    wait_no_replica_files(&cluster).await;
}

/// Goal: a chain of 100 clones, each changed a little, reads exactly (the
/// chunk map is flat: the last clone names its chunks directly) and as fast
/// as the first file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_a_hundred_clones() {
    init_logging();
    let cluster = Cluster::start(ClusterOptions::default()).await.expect("cluster");
    let (c, f) = (cluster.client(), cluster.files());
    let base = create(&c, ROOT_INO, "c0").await;
    let mut want = pattern(4, (2 * MIB + 777) as usize);
    f.write(base, 0, Bytes::from(want.clone())).await.unwrap();
    f.fsync(base).await.unwrap();

    phase("clone the last clone 100 times, writing 4 KiB into each new one");
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut prev = base;
    let t = Instant::now();
    for i in 1..=100u64 {
        let out = f.clone_inode(prev, ROOT_INO, format!("c{i}").as_bytes(), false).await.expect("clone");
        assert!(out.unfenced.is_empty());
        let off = rng.gen_range(0..want.len() as u64 - 4096);
        let block = pattern(10_000 + i, 4096);
        want[off as usize..off as usize + 4096].copy_from_slice(&block);
        f.write(out.attr.ino, off, Bytes::from(block)).await.unwrap();
        f.flush(out.attr.ino).await.unwrap();
        prev = out.attr.ino;
    }
    eprintln!("100 clones and writes in {:?}", t.elapsed());

    phase("the last clone reads exactly, as fast as the first file");
    let fresh = cluster.files();
    let t = Instant::now();
    for _ in 0..5 {
        assert!(read_all(&fresh, prev).await == want, "the 100th clone differs");
    }
    let last = t.elapsed() / 5;
    let fresh = cluster.files();
    let t = Instant::now();
    for _ in 0..5 {
        read_all(&fresh, base).await;
    }
    let first = t.elapsed() / 5;
    eprintln!("read of 2 MiB: first file {first:?}, 100th clone {last:?}");
    assert!(last < first * 3 + Duration::from_millis(50), "deep clone reads slowly: {last:?} vs {first:?}");
    let l = layout(&c, prev).await;
    assert!(l.chunks.iter().all(|x| x.origin.is_none()));

    phase("delete all 101 files: every replica file goes");
    for i in 0..=100 {
        c.op(MetaOp::Unlink { parent: ROOT_INO, name: format!("c{i}").into() }).await.unwrap();
    }
    wait_no_replica_files(&cluster).await;
}

/// Goal: a directory tree is cloned (CLI `fs clone`) and snapshotted in one
/// command each; the copies read like the source, writes stay in their
/// own tree, `rm -r` removes a snapshot, and deleting everything frees
/// every replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_clone_with_several_files() {
    init_logging();
    let cluster = Cluster::start(ClusterOptions::default()).await.expect("cluster");
    let (c, f) = (cluster.client(), cluster.files());
    let d = c
        .op_attr(MetaOp::Mkdir { parent: ROOT_INO, name: "d".into(), perm: 0o755, caller: Caller::ROOT })
        .await
        .unwrap()
        .ino;
    let sub = c
        .op_attr(MetaOp::Mkdir { parent: d, name: "sub".into(), perm: 0o755, caller: Caller::ROOT })
        .await
        .unwrap()
        .ino;
    let files = [(d, "a", 2 * MIB + 5), (d, "empty", 0), (sub, "b", MIB), (sub, "c", 100_000)];
    let mut contents = Vec::new();
    for (i, (p, name, len)) in files.iter().enumerate() {
        let ino = create(&c, *p, name).await;
        let data = pattern(20 + i as u64, *len as usize);
        f.write(ino, 0, Bytes::from(data.clone())).await.unwrap();
        f.fsync(ino).await.unwrap();
        contents.push((*p == d, name.to_string(), data));
    }
    c.op(MetaOp::Symlink { parent: d, name: "link".into(), target: "a".into(), caller: Caller::ROOT }).await.unwrap();

    phase("clone /d to /dc with the CLI: one command, every file shared");
    let cfg = cluster.write_cli_config("admin", None, 20_000);
    let (code, out, err) = locus_cli(&cfg, &["--json", "fs", "clone", "/d", "/dc"], None);
    assert_eq!(code, 0, "clone failed: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    eprintln!("clone: {v}");
    assert_eq!((v["inodes"].as_u64(), v["chunks_shared"].as_u64()), (Some(7), Some(5)));
    let fresh = cluster.files();
    for (top, name, data) in &contents {
        let path = if *top { format!("/dc/{name}") } else { format!("/dc/sub/{name}") };
        let a = c.resolve(path.as_bytes(), false).await.unwrap();
        assert!(read_all(&fresh, a.ino).await == *data, "{path} differs");
    }
    assert_eq!(c.resolve(b"/dc/link", false).await.unwrap().kind, FileKind::Symlink);

    phase("snapshot /d; write into /dc/a: /d/a and the snapshot keep the old bytes");
    let snap = f.clone_inode(d, ROOT_INO, b"ds", true).await.unwrap();
    assert_eq!(snap.inodes, 7);
    let dca = c.resolve(b"/dc/a", false).await.unwrap().ino;
    f.write_through(dca, MIB - 2, Bytes::from_static(b"across a chunk boundary")).await.unwrap();
    let fresh = cluster.files();
    let old = &contents[0].2;
    let mut new = old.clone();
    new[(MIB - 2) as usize..(MIB - 2) as usize + 23].copy_from_slice(b"across a chunk boundary");
    assert!(read_all(&fresh, dca).await == new);
    for p in [&b"/d/a"[..], b"/ds/a"] {
        let a = c.resolve(p, false).await.unwrap();
        assert!(read_all(&fresh, a.ino).await == *old, "{} changed", String::from_utf8_lossy(p));
    }
    let dsb = c.resolve(b"/ds/sub/b", false).await.unwrap();
    let e = c.op(MetaOp::Unlink { parent: c.resolve(b"/ds/sub", false).await.unwrap().ino, name: "b".into() }).await;
    assert_eq!(e.unwrap_err().code(), ErrorCode::ReadOnly);
    assert!(read_all(&fresh, dsb.ino).await == contents[2].2);

    phase("rm -r the snapshot, the clone and the source: every replica file goes");
    for p in ["/ds", "/dc", "/d"] {
        let (code, _, err) = locus_cli(&cfg, &["fs", "rm", "-r", p], None);
        assert_eq!(code, 0, "rm -r {p}: {err}");
    }
    assert!(c.readdir_all(ROOT_INO).await.unwrap().is_empty());
    wait_no_replica_files(&cluster).await;
}

/// Goal: the corners of fencing. A copy not written yet is made on every
/// replica when its file is cloned again (from the local origin), so later
/// copies of it find it; a chunk allocated but never written, fenced while
/// absent, cannot be created at its old version by a late writer, and the
/// snapshot keeps reading it as zeros.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_copies_and_never_written_chunks_are_fenced() {
    init_logging();
    let cluster = Cluster::start(ClusterOptions::default()).await.expect("cluster");
    let (c, f) = (cluster.client(), cluster.files());
    let src = create(&c, ROOT_INO, "f").await;
    let data = pattern(5, (2 * MIB) as usize);
    f.write(src, 0, Bytes::from(data.clone())).await.unwrap();
    f.fsync(src).await.unwrap();

    phase("clone f to g; g asks for a copy of chunk 0 and never writes it");
    let g = f.clone_inode(src, ROOT_INO, b"g", false).await.unwrap().attr.ino;
    let c0 = layout(&c, src).await.chunks[0].chunk;
    let pending = match c.op(MetaOp::CowChunk { ino: g, index: 0, chunk: c0 }).await.unwrap() {
        OpReply::Layout(l) => l.chunks[0].clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(pending.origin.map(|o| o.0), Some(c0));
    assert!(read_all(&cluster.files(), g).await == data, "an unwritten copy reads as its origin");

    phase("clone g to h: the fence makes the pending copy on every replica, then it is done");
    let h = f.clone_inode(g, ROOT_INO, b"h", false).await.unwrap();
    assert!(h.unfenced.is_empty(), "{:?}", h.unfenced);
    let l = layout(&c, h.attr.ino).await;
    assert_eq!(l.chunks[0].chunk, pending.chunk);
    assert_eq!(l.chunks[0].origin, None, "done after the fence made it");
    let got = replicas_agree(&cluster, &l.chunks[0], MIB).await;
    assert!(got[..] == data[..MIB as usize]);

    phase("write into h: its copy of the made chunk comes from it; f and g keep their bytes");
    f.write_through(h.attr.ino, 100, Bytes::from_static(b"hello")).await.unwrap();
    let mut want = data.clone();
    want[100..105].copy_from_slice(b"hello");
    let fresh = cluster.files();
    assert!(read_all(&fresh, h.attr.ino).await == want);
    assert!(read_all(&fresh, g).await == data);
    assert!(read_all(&fresh, src).await == data);

    phase("f gets chunk 5 allocated, never written; a writer caches its location");
    f.truncate(src, 6 * MIB).await.unwrap();
    c.op(MetaOp::PrepareWrite { ino: src, offset: 5 * MIB, len: 10, extend: false }).await.unwrap();
    let writer = cluster.files();
    assert!(writer.read(src, 5 * MIB, 10).await.unwrap()[..] == [0u8; 10]);

    phase("snapshot f; the writer writes chunk 5 with its old layout: refused, copies, goes on");
    let s = f.clone_inode(src, ROOT_INO, b"s", true).await.unwrap();
    assert!(s.unfenced.is_empty(), "{:?}", s.unfenced);
    writer.write_through(src, 5 * MIB, Bytes::from_static(b"late")).await.unwrap();
    let fresh = cluster.files();
    assert!(fresh.read(src, 5 * MIB, 4).await.unwrap()[..] == b"late"[..]);
    assert!(fresh.read(s.attr.ino, 5 * MIB, 4).await.unwrap()[..] == [0u8; 4], "the late write reached the snapshot");
    let sl = layout(&c, s.attr.ino).await;
    let c5 = sl.chunks.iter().find(|x| x.index == 5).unwrap();
    assert_ne!(layout(&c, src).await.chunks.iter().find(|x| x.index == 5).unwrap().chunk, c5.chunk);

    phase("delete everything: every replica file goes");
    for name in ["f", "g", "h", "s"] {
        c.op(MetaOp::Unlink { parent: ROOT_INO, name: name.into() }).await.unwrap();
    }
    wait_no_replica_files(&cluster).await;
}

/// Goal: a chunk server acknowledges a clone's fences before they reach the
/// disk, and a crash that loses them is harmless: the server comes back at
/// the old versions, serves nothing until the metadata service answered
/// its report, and that answer raises them again, so a writer holding the
/// pre-clone layout is refused there and the clone keeps the old bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fence_lost_in_a_crash_is_raised_again_before_serving() {
    init_logging();
    let mut cluster = Cluster::start(ClusterOptions::default()).await.expect("cluster");
    let (c, f) = (cluster.client(), cluster.files());
    let (src, before) = written_file(&cluster, "src", 11).await;
    let old = layout(&c, src).await;

    phase("clone: every replica takes the fences (v1 -> v2)");
    let out = f.clone_inode(src, ROOT_INO, b"clone", false).await.expect("clone");
    assert!(out.unfenced.is_empty(), "{:?}", out.unfenced);
    let clone = out.attr.ino;

    phase("kill -9 chunk server 1 and undo its renames and journal, as a crash before the sync can");
    cluster.kill_chunk(1);
    let node = cluster.chunk(1);
    let mut at_v1 = 0;
    for p in node.chunk_files() {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        // The renames may not have been made yet (they follow the fence).
        if let Some(id) = name.strip_suffix(".v2") {
            std::fs::rename(&p, p.with_file_name(format!("{id}.v1"))).unwrap();
            at_v1 += 1;
        } else if name.ends_with(".v1") {
            at_v1 += 1;
        }
    }
    assert_eq!(at_v1, 3, "server 1 held the three fenced replicas");
    std::fs::write(node.data_dir.join("versions.log"), b"").unwrap();
    let addr = node.addr.to_string();
    cluster.restart_chunk(1).unwrap();

    phase("once it serves again, it is at v2: a pre-clone write (v1) is refused as stale");
    let direct = fs_client::chunk::ChunkClient::new(&cluster.client_config("admin").identity()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match direct.read(&addr, old.chunks[0].chunk, old.chunks[0].version + 1, 0, 16).await {
            Ok(_) => break,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "server 1 never served the fenced version: {e}\n{}",
                    cluster.logs_tail()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    for loc in &old.chunks {
        let e = direct
            .write(
                std::slice::from_ref(&addr),
                loc.chunk,
                loc.version,
                0,
                Bytes::from_static(b"stale"),
                false,
                None,
                None,
            )
            .await
            .expect_err("a write at the pre-clone version");
        assert_eq!(e.code(), ErrorCode::Stale, "{e}");
    }

    phase("the clone still reads as the source did, on every replica");
    assert!(read_all(&cluster.files(), clone).await == before);
    for loc in &layout(&c, clone).await.chunks {
        let got = replicas_agree(&cluster, loc, MIB).await;
        let at = (loc.index * MIB) as usize;
        assert!(got[..] == before[at..at + MIB as usize], "chunk {} of the clone", loc.index);
    }
}

/// Goal: a hole punched into a clone (NBD trim, fallocate) zeroes the
/// clone's bytes only: the shared chunks are copied first, the source keeps
/// its data, and ranges past the end or in holes change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_punch_into_a_clone_leaves_the_source_alone() {
    init_logging();
    let cluster = Cluster::start(ClusterOptions::default()).await.expect("cluster");
    let (c, f) = (cluster.client(), cluster.files());
    let (src, data) = written_file(&cluster, "src", 21).await;
    let clone = f.clone_inode(src, ROOT_INO, b"clone", false).await.expect("clone").attr.ino;

    phase("punch across the first chunk boundary of the clone, and past its end");
    let (at, len) = (MIB - 10_000, 50_000u64);
    f.punch(clone, at, len).await.expect("punch");
    f.punch(clone, 3 * MIB - 100, 10 * MIB).await.expect("punch past the end");
    f.fsync(clone).await.unwrap();
    let mut want = data.clone();
    want[at as usize..(at + len) as usize].fill(0);
    want[(3 * MIB - 100) as usize..].fill(0);
    let fresh = cluster.files();
    assert_eq!(c.getattr(clone).await.unwrap().size, 3 * MIB, "a punch keeps the size");
    assert!(read_all(&fresh, clone).await == want, "the clone reads zeros in the punched ranges");
    assert!(read_all(&fresh, src).await == data, "the source is unchanged");
    let src_chunks: BTreeSet<ChunkId> = layout(&c, src).await.chunks.iter().map(|x| x.chunk).collect();
    let l = layout(&c, clone).await;
    let copied: Vec<u64> = l.chunks.iter().filter(|x| !src_chunks.contains(&x.chunk)).map(|x| x.index).collect();
    assert_eq!(copied, vec![0, 1, 2], "the punched chunks got their own copies");
    for loc in &l.chunks {
        let got = replicas_agree(&cluster, loc, MIB).await;
        let at = (loc.index * MIB) as usize;
        assert!(got[..] == want[at..at + MIB as usize], "chunk {} of the clone", loc.index);
    }
}
