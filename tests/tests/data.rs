//! The replicated data path with real chunk servers: chunk spanning,
//! failures, corruption, full disks and whole-cluster restarts.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fs_client::proto::*;
use locus_tests::files::{create, layout, pattern, read_all};
use locus_tests::{init_logging, phase, Cluster, ClusterOptions};
use rand::{Rng, SeedableRng};

const MIB: u64 = 1 << 20;

/// Goal: files span chunks; every read returns what was written, holes and
/// regions uncovered by extension read as zeros, truncation frees chunks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_span_chunks_and_read_back_exactly() {
    init_logging();
    let cluster = Cluster::start(ClusterOptions::default()).await.expect("cluster");
    let (c, f) = (cluster.client(), cluster.files());
    let ino = create(&c, ROOT_INO, "big").await;

    phase("write 5.5 MiB in uneven pieces across 1 MiB chunks; read it back whole and in random slices");
    let data = pattern(1, (5 * MIB + MIB / 2) as usize);
    let mut off = 0usize;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    while off < data.len() {
        let n = rng.gen_range(1..700_000).min(data.len() - off);
        f.write(ino, off as u64, Bytes::copy_from_slice(&data[off..off + n])).await.unwrap();
        off += n;
    }
    f.fsync(ino).await.unwrap();
    assert_eq!(c.getattr(ino).await.unwrap().size, data.len() as u64);
    assert!(read_all(&f, ino).await == data, "whole read differs");
    let fresh = cluster.files();
    for _ in 0..40 {
        let o = rng.gen_range(0..data.len());
        let n = rng.gen_range(1..3 * MIB as usize).min(data.len() - o);
        let got = fresh.read(ino, o as u64, n as u64).await.unwrap();
        assert!(got[..] == data[o..o + n], "slice at {o}+{n} differs");
    }
    let l = layout(&c, ino).await;
    assert_eq!(l.chunks.len(), 6);
    for ch in &l.chunks {
        let racks: BTreeSet<&str> = ch.replicas.iter().map(|r| r.topology.rack.as_str()).collect();
        assert_eq!(racks.len(), 3, "chunk {} replicas not in 3 racks", ch.chunk);
    }

    phase("overwrite across a chunk boundary; write past the end leaves a zero gap");
    let patch = pattern(2, 300_000);
    let at = (2 * MIB - 100_000) as usize;
    f.write(ino, at as u64, Bytes::from(patch.clone())).await.unwrap();
    let mut want = data.clone();
    want[at..at + patch.len()].copy_from_slice(&patch);
    let far = 9 * MIB + 1234;
    f.write(ino, far, Bytes::from_static(b"tail")).await.unwrap();
    f.flush(ino).await.unwrap();
    want.resize(far as usize, 0);
    want.extend_from_slice(b"tail");
    assert!(read_all(&fresh, ino).await == want, "after overwrite and extension");

    phase("truncate into the middle of a chunk, extend again: the cut bytes come back as zeros");
    let cut = 3 * MIB + 5;
    f.truncate(ino, cut).await.unwrap();
    assert_eq!(layout(&c, ino).await.chunks.len(), 4, "chunks past the end are gone");
    f.truncate(ino, 4 * MIB).await.unwrap();
    let mut want2 = want[..cut as usize].to_vec();
    want2.resize((4 * MIB) as usize, 0);
    assert!(read_all(&cluster.files(), ino).await == want2, "stale bytes reappeared after truncate + extend");
    f.truncate(ino, cut).await.unwrap();
    f.write(ino, 5 * MIB, Bytes::from_static(b"x")).await.unwrap();
    f.flush(ino).await.unwrap();
    let mut want3 = want[..cut as usize].to_vec();
    want3.resize((5 * MIB) as usize, 0);
    want3.push(b'x');
    assert!(read_all(&cluster.files(), ino).await == want3, "stale bytes reappeared after truncate + write past end");

    phase("unlink: the chunks leave the map and the servers delete their replicas");
    c.op(MetaOp::Unlink { parent: ROOT_INO, name: "big".into() }).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let files: usize = cluster.chunks.values().map(|n| n.chunk_files().len()).sum();
        if files == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{files} replica files left after unlink");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Goal: kill -9 a chunk server during a write load: writes go on, every
/// flushed byte reads back, and repair restores three copies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_a_chunk_server_during_writes() {
    init_logging();
    let opts = ClusterOptions { chunks: 4, ..Default::default() };
    let mut cluster = Cluster::start(opts).await.expect("cluster");
    let (c, f) = (cluster.client(), cluster.files());
    let ino = create(&c, ROOT_INO, "log").await;

    phase("append 256 KiB records with fsync; kill -9 server 2 after a few");
    let mut written = Vec::new();
    for i in 0..40u64 {
        if i == 8 {
            cluster.kill_chunk(2);
        }
        let rec = pattern(100 + i, 256 * 1024);
        f.write(ino, written.len() as u64, Bytes::from(rec.clone())).await.expect("write keeps working");
        f.fsync(ino).await.expect("fsync keeps working");
        written.extend_from_slice(&rec);
    }

    phase("every flushed byte reads back byte for byte");
    assert!(read_all(&cluster.files(), ino).await == written);

    phase("repair: every chunk gets back to three copies on live servers");
    cluster.wait_fully_replicated(Duration::from_secs(60)).await.expect("repair");
    let l = layout(&c, ino).await;
    for ch in &l.chunks {
        let servers: BTreeSet<u64> = ch.replicas.iter().map(|r| r.server).collect();
        assert_eq!(servers.len(), 3, "chunk {} has {:?}", ch.chunk, servers);
    }
    // Its chunks may all have been repaired already, or it may have held
    // none of them: it shows as down once it misses its heartbeats.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cluster.health().await.unwrap().servers.iter().any(|s| !s.alive) {
        assert!(Instant::now() < deadline, "the killed server never showed as down");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(read_all(&cluster.files(), ino).await == written);
}

/// Goal: a chunk server that stops answering without dying (SIGSTOP: a
/// hung process, a link that drops everything) is written around like a
/// dead one: no write or fsync hangs, every flushed byte reads back while
/// it is stopped and after it comes back, and once back its stale copies
/// are replaced until every chunk has three again.
/// Method: three servers, so every chunk has a copy on the stopped one;
/// 1 MiB chunks; 256 KiB records appended with fsync, each bounded by a
/// timeout; server 2 stopped after 8 records (it must show as down) and
/// resumed after the last; reads checked in both states.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_chunk_server_is_written_around() {
    init_logging();
    let mut cluster = Cluster::start(ClusterOptions::default()).await.expect("cluster");
    let (c, f) = (cluster.client(), cluster.files());
    let ino = create(&c, ROOT_INO, "log").await;
    // Longer than the transport's silence timeout (5 s) and a retry, far
    // shorter than a hang.
    let bound = Duration::from_secs(40);

    phase("append 256 KiB records with fsync; SIGSTOP server 2 after a few");
    let mut written = Vec::new();
    let mut stopped_at = None;
    for i in 0..24u64 {
        if i == 8 {
            cluster.pause_chunk(2);
            stopped_at = Some(Instant::now());
        }
        let rec = pattern(300 + i, 256 * 1024);
        let step = async {
            f.write(ino, written.len() as u64, Bytes::from(rec.clone())).await?;
            f.fsync(ino).await
        };
        match tokio::time::timeout(bound, step).await {
            Ok(r) => r.unwrap_or_else(|e| panic!("record {i}: {e}\n{}", cluster.logs_tail())),
            Err(_) => panic!("record {i} hung with server 2 stopped\n{}", cluster.logs_tail()),
        }
        written.extend_from_slice(&rec);
    }
    let stopped_for = stopped_at.expect("stopped").elapsed();
    assert!(stopped_for >= Duration::from_secs(2), "no write waited for the stopped server ({stopped_for:?})");

    phase("it shows as down; every flushed byte reads back meanwhile");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cluster.health().await.unwrap().servers.iter().any(|s| !s.alive) {
        assert!(Instant::now() < deadline, "the stopped server never showed as down");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let got = tokio::time::timeout(bound * 2, read_all(&cluster.files(), ino)).await.expect("reads hung");
    assert!(got == written, "a read while server 2 is stopped differs");

    phase("resumed: its stale copies are never served, and every chunk gets three copies again");
    cluster.resume_chunk(2);
    cluster.wait_fully_replicated(Duration::from_secs(90)).await.expect("repair");
    for ch in &layout(&c, ino).await.chunks {
        let servers: BTreeSet<u64> = ch.replicas.iter().map(|r| r.server).collect();
        assert_eq!(servers.len(), 3, "chunk {} has {:?}", ch.chunk, servers);
    }
    assert!(read_all(&cluster.files(), ino).await == written, "a read after the resume differs");
}

/// Goal: hole punches (NBD trim, `fallocate`) keep working through a kill
/// -9 of a chunk server, the repair copies that follow it (a chunk sealed
/// at a new version until the metadata lists the copy) and the server's
/// return with stale replicas, as writes do: none fails, and every file
/// reads as the model of its writes and punches says.
/// Method: three chunk servers (so the repair waits for the killed one's
/// return), 4 MiB chunks; four files of three chunks, each punched and
/// written at random by its own task for 14 s from the kill; the server
/// comes back after 5 s and gets its copies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn punches_ride_out_a_killed_server_and_its_repair() {
    init_logging();
    let opts = ClusterOptions { chunk_bytes: 4 * MIB, ..Default::default() };
    let mut cluster = Cluster::start(opts).await.expect("cluster");
    let (c, f) = (cluster.client(), cluster.files());
    let mut files = Vec::new();
    for k in 0..4u64 {
        let ino = create(&c, ROOT_INO, &format!("disk{k}")).await;
        let model = pattern(31 + k, (12 * MIB) as usize);
        f.write_through(ino, 0, Bytes::from(model.clone())).await.expect("fill");
        f.fsync(ino).await.expect("fsync");
        files.push((ino, model));
    }

    phase("kill -9 server 2; punch and write at random through the repair and the server's return");
    cluster.kill_chunk(2);
    let killed = Instant::now();
    let tasks: Vec<_> = files
        .into_iter()
        .enumerate()
        .map(|(k, (ino, mut model))| {
            let f = f.clone();
            tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(5 + k as u64);
                let (mut punches, mut ops) = (0, 0u64);
                while killed.elapsed() < Duration::from_secs(14) {
                    let off = rng.gen_range(0..model.len() - 1);
                    let len = rng.gen_range(1..200_000).min(model.len() - off);
                    if rng.gen_bool(0.8) {
                        f.punch(ino, off as u64, len as u64).await.unwrap_or_else(|e| panic!("punch {off}+{len}: {e}"));
                        model[off..off + len].fill(0);
                        punches += 1;
                    } else {
                        let data = pattern(1000 + ops, len);
                        f.write(ino, off as u64, Bytes::from(data.clone())).await.expect("write");
                        model[off..off + len].copy_from_slice(&data);
                    }
                    ops += 1;
                    if ops.is_multiple_of(8) {
                        f.fsync(ino).await.expect("fsync");
                    }
                }
                f.fsync(ino).await.expect("fsync");
                assert!(punches > 20, "only {punches} punches in the window");
                (ino, model)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(5)).await;
    cluster.restart_chunk(2).expect("restart server 2");
    let mut files = Vec::new();
    for t in tasks {
        files.push(t.await.expect("a punching task failed"));
    }
    for (ino, model) in &files {
        assert!(read_all(&cluster.files(), *ino).await == *model, "inode {ino} differs from its model");
    }

    phase("repair completes; the files still read as their models");
    cluster.wait_fully_replicated(Duration::from_secs(60)).await.expect("repair");
    for (ino, model) in &files {
        assert!(read_all(&cluster.files(), *ino).await == *model, "inode {ino} differs from its model after repair");
    }
}

/// Goal: bytes flipped in a replica file are caught on read; the reader
/// gets correct data from another replica; the bad copy is replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_replica_is_bypassed_and_replaced() {
    init_logging();
    let cluster = Cluster::start(ClusterOptions { chunks: 4, ..Default::default() }).await.expect("cluster");
    let (c, f) = (cluster.client(), cluster.files());
    let ino = create(&c, ROOT_INO, "precious").await;
    let data = pattern(3, (2 * MIB) as usize);
    f.write_through(ino, 0, Bytes::from(data.clone())).await.unwrap();
    f.fsync(ino).await.unwrap();

    phase("flip bytes in the data of chunk 0 on the replica a reader tries first");
    let l = layout(&c, ino).await;
    let ch = l.chunks.iter().find(|c| c.index == 0).unwrap().clone();
    let first = ch.replicas[0].server;
    flip_replica_bytes(&cluster, &ch.replicas[0].addr, ch.chunk, 0xA5);

    phase("a fresh reader gets the right bytes anyway");
    assert!(read_all(&cluster.files(), ino).await == data, "corruption reached the reader");

    phase("the corrupt copy is dropped and replaced: three good copies, each one right");
    let deadline = Instant::now() + Duration::from_secs(60);
    let ch0 = loop {
        let l = layout(&c, ino).await;
        let ch0 = l.chunks.iter().find(|c| c.index == 0).unwrap().clone();
        // A repair copy raises the version; the bad server may hold one of
        // the new copies (its bad file was quarantined).
        if ch0.replicas.len() == 3 && ch0.version > ch.version {
            break ch0;
        }
        assert!(Instant::now() < deadline, "bad replica not replaced: {ch0:?}\n{}", cluster.logs_tail());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    cluster.wait_fully_replicated(Duration::from_secs(60)).await.unwrap();
    assert!(cluster.health().await.unwrap().corrupt >= 1);
    let direct = fs_client::chunk::ChunkClient::new(&cluster.client_config("admin").identity()).unwrap();
    for r in &ch0.replicas {
        // A survivor learns the raised version from the leader's push, which
        // may land just after the layout shows it (readers skip it meanwhile).
        let got = loop {
            match direct.read(&r.addr, ch0.chunk, ch0.version, 0, MIB).await {
                Ok(got) => break got,
                Err(e) if Instant::now() < deadline => {
                    tracing::info!(server = r.server, error = %e, "replica not at the new version yet");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("replica on server {} (first was {first}): {e}", r.server),
            }
        };
        assert!(got[..] == data[..MIB as usize], "replica on server {} differs", r.server);
    }
    assert!(read_all(&cluster.files(), ino).await == data);
}

/// Goal: a client on a chunk server's host reads (and starts chained
/// writes) through the server's local socket and gets the same bytes; a
/// refused write is an answer, not a broken server; with local sockets off
/// nothing goes that way; a server killed (its socket file left behind) or
/// stopped is read around.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_reads_skip_the_network_and_fall_back() {
    use fs_client::chunk::ChunkClient;
    use fs_client::file::FileClient;
    init_logging();
    let mut cluster = Cluster::start(ClusterOptions::default()).await.expect("cluster");
    let c = cluster.client();
    let ino = create(&c, ROOT_INO, "local").await;
    let data = pattern(11, (3 * MIB + 5000) as usize);
    let f = cluster.files();
    f.write_through(ino, 0, Bytes::from(data.clone())).await.unwrap();
    f.fsync(ino).await.unwrap();
    let cfg = cluster.client_config("admin");
    let reader = |chunks: &ChunkClient| FileClient::new(c.clone(), chunks.clone(), None);

    phase("a reader on this host reads through the local sockets");
    let chunks = ChunkClient::for_config(&cfg).unwrap();
    assert!(read_all(&reader(&chunks), ino).await == data, "local reads differ");
    assert!(chunks.local_reads() >= 4, "only {} reads went local", chunks.local_reads());

    phase("with local reads off, none goes that way");
    let off = ChunkClient::for_config(&fs_client::ClientConfig { local_reads: false, ..cfg.clone() }).unwrap();
    assert!(read_all(&reader(&off), ino).await == data);
    assert_eq!(off.local_reads(), 0);

    phase("writes whose chain starts on this host go through its socket; a refused one is an answer");
    let chunks = ChunkClient::for_config(&cfg).unwrap();
    let writer = reader(&chunks);
    let ino2 = create(&c, ROOT_INO, "local-written").await;
    writer.write_through(ino2, 0, Bytes::from(data.clone())).await.unwrap();
    writer.fsync(ino2).await.unwrap();
    assert!(chunks.local_writes() >= 4, "only {} writes went local", chunks.local_writes());
    assert!(read_all(&reader(&off), ino2).await == data, "local writes differ over QUIC");
    let ch = layout(&c, ino2).await.chunks[0].clone();
    let chain: Vec<String> = ch.replicas.iter().map(|r| r.addr.clone()).collect();
    let junk = Bytes::from(vec![0xEEu8; 300_000]);
    let err = chunks.write(&chain, ch.chunk, ch.version + 1, 0, junk, false, None, None).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::Stale, "{err}");
    assert!(!chunks.is_down(&chain[0]), "a refused write is not a broken server");
    assert!(read_all(&reader(&off), ino2).await == data, "a refused write changed data");
    let before = chunks.local_writes();
    writer.write_through(ino2, 0, Bytes::from(data[..4096].to_vec())).await.unwrap();
    assert!(chunks.local_writes() > before, "the socket still works after a refusal");

    phase("a vectored write of small extents through the socket lands whole on every replica");
    let extents = vec![(0u64, 4096u64), (70_000, 4096), (200_000, 10)];
    let pieces: Vec<Bytes> =
        extents.iter().enumerate().map(|(i, (_, l))| Bytes::from(vec![0xA0 + i as u8; *l as usize])).collect();
    let before = chunks.local_writes();
    chunks.writev(&chain, ch.chunk, ch.version, extents.clone(), pieces.clone(), false, None, None).await.unwrap();
    assert!(chunks.local_writes() > before, "the vectored write did not go local");
    let mut want = data[..MIB as usize].to_vec();
    for ((off, len), piece) in extents.iter().zip(&pieces) {
        want[*off as usize..(*off + *len) as usize].copy_from_slice(piece);
    }
    let direct = ChunkClient::new(&cfg.identity()).unwrap();
    for addr in &chain {
        let got = direct.read(addr, ch.chunk, ch.version, 0, MIB).await.unwrap();
        assert!(got[..] == want[..], "replica at {addr} differs after a local vectored write");
    }

    phase("kill -9 one server (its socket file stays) and stop another: reads come from the third");
    let gone = cluster.chunk(1).addr.to_string();
    cluster.kill_chunk(1);
    let fingerprint = fs_client::tls::cluster_fingerprint(&cfg.identity()).unwrap();
    assert!(fs_client::local::socket_path(&cluster.local_dir(), &fingerprint, &gone).exists());
    cluster.pause_chunk(2);
    let chunks = ChunkClient::for_config(&cfg).unwrap();
    let t = Instant::now();
    let got = tokio::time::timeout(Duration::from_secs(60), read_all(&reader(&chunks), ino)).await;
    cluster.resume_chunk(2);
    assert!(got.expect("reads around a dead and a stopped server finish") == data);
    assert!(chunks.local_reads() >= 4, "only {} reads went local", chunks.local_reads());
    tracing::info!(took = ?t.elapsed(), "read around a dead and a stopped server");
}

/// Goal: when every replica of a chunk is corrupt, reads of it fail with
/// an I/O error, then and after the replicas were set aside: never zeros,
/// never wrong bytes. The file's other chunks still read back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_corrupt_everywhere_is_an_error_not_zeros() {
    init_logging();
    let cluster = Cluster::start(ClusterOptions::default()).await.expect("cluster");
    let (c, f) = (cluster.client(), cluster.files());
    let ino = create(&c, ROOT_INO, "doomed").await;
    let data = pattern(13, (2 * MIB) as usize);
    f.write_through(ino, 0, Bytes::from(data.clone())).await.unwrap();
    f.fsync(ino).await.unwrap();

    phase("flip bytes in chunk 0 on every replica");
    let ch = layout(&c, ino).await.chunks.iter().find(|c| c.index == 0).unwrap().clone();
    for r in &ch.replicas {
        flip_replica_bytes(&cluster, &r.addr, ch.chunk, 0x5A);
    }

    phase("reads of chunk 0 fail, now and once every replica was set aside; chunk 1 still reads");
    let held = |addr: &str| {
        let node = cluster.chunks.values().find(|n| n.addr.to_string() == addr).expect("server");
        let name = format!("{:016x}", ch.chunk);
        node.chunk_files().iter().any(|p| p.file_name().is_some_and(|f| f.to_string_lossy().starts_with(&name)))
    };
    for round in 0..3 {
        let reader = cluster.files();
        match reader.read(ino, MIB - 500, 200).await {
            Ok(got) => panic!("round {round}: a chunk corrupt everywhere read as {} bytes: {:?}", got.len(), &got[..8]),
            Err(e) => tracing::info!(round, error = %e, "read refused as it should be"),
        }
        let got = reader.read(ino, MIB, MIB).await.unwrap();
        assert!(got[..] == data[MIB as usize..], "round {round}: chunk 1 differs");
        if round == 0 {
            // The failed read had every server set its copy aside.
            let gone =
                locus_tests::mount::wait_until(Duration::from_secs(10), || ch.replicas.iter().all(|r| !held(&r.addr)));
            assert!(gone, "replicas not set aside after a failed read");
        }
    }
}

/// Flips 100 bytes near the end of the data of chunk `chunk`'s replica on
/// the server at `addr` (with `xor`), behind the server's back.
fn flip_replica_bytes(cluster: &Cluster, addr: &str, chunk: ChunkId, xor: u8) {
    let node = cluster.chunks.values().find(|n| n.addr.to_string() == addr).expect("server");
    let file = node
        .chunk_files()
        .into_iter()
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(&format!("{chunk:016x}")))
        .expect("replica file");
    let mut bytes = std::fs::read(&file).unwrap();
    let n = bytes.len();
    for b in &mut bytes[n - 1000..n - 900] {
        *b ^= xor;
    }
    std::fs::write(&file, &bytes).unwrap();
}

/// Goal: a replica that missed writes while its server was down is never
/// served, and is dropped when the server comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_replica_is_never_served() {
    init_logging();
    let mut cluster = Cluster::start(ClusterOptions::default()).await.expect("cluster");
    let (c, f) = (cluster.client(), cluster.files());
    let ino = create(&c, ROOT_INO, "f").await;
    f.write_through(ino, 0, Bytes::from(vec![1u8; MIB as usize])).await.unwrap();
    let v1 = layout(&c, ino).await.chunks[0].version;

    phase("stop server 3, overwrite the chunk (the write drops server 3 and raises the version)");
    cluster.kill_chunk(3);
    f.write_through(ino, 0, Bytes::from(vec![2u8; MIB as usize])).await.unwrap();
    let l = layout(&c, ino).await;
    assert!(l.chunks[0].version > v1, "version raised");
    let s3 = cluster.chunks[&3].addr.to_string();
    assert!(!l.chunks[0].replicas.iter().any(|r| r.addr == s3));

    phase("server 3 returns with the old copy: it must not be served, and it gets deleted or replaced");
    cluster.restart_chunk(3).unwrap();
    cluster.wait_chunks_alive(3, Duration::from_secs(20)).await.unwrap();
    let chunks = fs_client::chunk::ChunkClient::new(&cluster.client_config("admin").identity()).unwrap();
    let stale = chunks.read(&s3, l.chunks[0].chunk, v1, 0, 10).await;
    assert!(stale.is_err(), "the stale copy was served");
    let cur = l.chunks[0].clone();
    let r = chunks.read(&s3, cur.chunk, cur.version, 0, 10).await;
    assert!(r.is_err() || r.unwrap()[..] == [2u8; 10], "server 3 served wrong data at the current version");
    assert!(read_all(&cluster.files(), ino).await == vec![2u8; MIB as usize]);
    cluster.wait_fully_replicated(Duration::from_secs(60)).await.unwrap();
}

/// Goal: stop and restart the whole cluster: every flushed byte is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_cluster_restart_keeps_flushed_bytes() {
    init_logging();
    let mut cluster = Cluster::start(ClusterOptions::default()).await.expect("cluster");
    let (c, f) = (cluster.client(), cluster.files());
    let mut files = Vec::new();
    for i in 0..5u64 {
        let ino = create(&c, ROOT_INO, &format!("f{i}")).await;
        let data = pattern(10 + i, (MIB + i * 77_777) as usize);
        f.write(ino, 0, Bytes::from(data.clone())).await.unwrap();
        f.fsync(ino).await.unwrap();
        files.push((ino, data));
    }

    phase("kill -9 every meta node and chunk server, start them all again");
    for i in 1..=3 {
        cluster.kill_chunk(i);
        cluster.meta.kill(i);
    }
    for i in 1..=3 {
        cluster.meta.restart(i).unwrap();
        cluster.restart_chunk(i).unwrap();
    }
    cluster.meta.wait_ready(Duration::from_secs(30)).await.unwrap();
    cluster.wait_chunks_alive(3, Duration::from_secs(30)).await.unwrap();

    phase("all files read back exactly");
    let f = cluster.files();
    for (ino, data) in &files {
        assert!(read_all(&f, *ino).await == *data, "inode {ino} differs after restart");
    }
}

/// Goal: a chunk server whose disk fills gives ENOSPC or hands the write to
/// other servers, never corruption: what was acknowledged reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disks_give_enospc_not_corruption() {
    init_logging();
    if !nix::unistd::geteuid().is_root() {
        panic!("this test mounts small tmpfs disks and needs root");
    }
    let disks = locus_tests::TmpfsDisks::new(3, 24 << 20).expect("tmpfs disks");
    let opts = ClusterOptions { chunk_dirs: Some(disks.dirs()), ..Default::default() };
    let cluster = Cluster::start(opts).await.expect("cluster");
    let (c, f) = (cluster.client(), cluster.files());

    phase("fill the disks through many files until the cluster says no space");
    let mut kept: Vec<(Ino, Vec<u8>)> = Vec::new();
    let mut enospc = false;
    for i in 0..200u64 {
        let ino = create(&c, ROOT_INO, &format!("fill{i}")).await;
        let data = pattern(1000 + i, (MIB / 2) as usize);
        let r = async {
            f.write(ino, 0, Bytes::from(data.clone())).await?;
            f.fsync(ino).await
        }
        .await;
        match r {
            Ok(()) => kept.push((ino, data)),
            Err(e) => {
                assert!(
                    matches!(e.code(), ErrorCode::NoSpace | ErrorCode::Io | ErrorCode::QuotaExceeded),
                    "unexpected error on a full disk: {e}"
                );
                enospc = true;
                break;
            }
        }
    }
    assert!(enospc, "24 MiB disks never filled");
    assert!(!kept.is_empty());

    phase("everything acknowledged before the disks filled reads back exactly");
    let fresh = cluster.files();
    for (ino, data) in &kept {
        assert!(read_all(&fresh, *ino).await == *data, "inode {ino} corrupted by the full disk");
    }
    drop(cluster);
    drop(disks);
}

/// Goal: bytes cut off by a truncate never come back, whatever mix of
/// buffered writes below and past the end follows, and a read sees the
/// size that buffered writes past the end give (found by fsx).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gaps_left_by_buffered_writes_read_as_zeros() {
    init_logging();
    let cluster = Cluster::start(ClusterOptions::default()).await.expect("cluster");
    let (c, f) = (cluster.client(), cluster.files());
    let ino = create(&c, ROOT_INO, "gaps").await;

    phase("64 KiB of X, truncate to 4 KiB, then one byte at 0 and one at 32 KiB in one flush");
    f.write(ino, 0, Bytes::from(vec![b'X'; 65536])).await.unwrap();
    f.fsync(ino).await.unwrap();
    f.truncate(ino, 4096).await.unwrap();
    f.write(ino, 0, Bytes::from_static(b"a")).await.unwrap();
    f.write(ino, 32768, Bytes::from_static(b"b")).await.unwrap();
    f.flush(ino).await.unwrap();
    let mut want = vec![b'X'; 4096];
    want[0] = b'a';
    want.resize(32768, 0);
    want.push(b'b');
    assert!(read_all(&cluster.files(), ino).await == want, "truncated bytes came back");

    phase("both writes past the end: the gap between them reads as zeros");
    f.truncate(ino, 4096).await.unwrap();
    f.write(ino, 8192, Bytes::from_static(b"c")).await.unwrap();
    f.write(ino, 32768, Bytes::from_static(b"d")).await.unwrap();
    f.flush(ino).await.unwrap();
    let mut want = want[..4096].to_vec();
    want.resize(8192, 0);
    want.push(b'c');
    want.resize(32768, 0);
    want.push(b'd');
    assert!(read_all(&cluster.files(), ino).await == want, "gap between writes past the end not zero");

    phase("a buffered write past the end: a read of the gap, before any flush, gets zeros of full length");
    let g = create(&c, ROOT_INO, "gap2").await;
    f.write(g, 8192, Bytes::from(vec![b'b'; 4096])).await.unwrap();
    let got = f.read(g, 0, 4096).await.unwrap();
    assert_eq!(got.len(), 4096, "short read inside the file");
    assert!(got.iter().all(|b| *b == 0));
    assert_eq!(f.size(g).await.unwrap(), 12288);
}

/// Goal: a vectored write (`WriteV`, what buffered random writes become)
/// lands every extent on every replica; a malformed one (overlapping or
/// out-of-order extents, an extent past the chunk) is refused whole, before
/// any byte changes, on the real chunk servers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vectored_writes_land_whole_or_not_at_all() {
    init_logging();
    let cluster = Cluster::start(ClusterOptions::default()).await.expect("cluster");
    let (c, f) = (cluster.client(), cluster.files());
    let ino = create(&c, ROOT_INO, "v").await;
    let mut want = pattern(3, MIB as usize);
    f.write_through(ino, 0, Bytes::from(want.clone())).await.unwrap();
    let loc = layout(&c, ino).await.chunks[0].clone();
    let chain: Vec<String> = loc.replicas.iter().map(|r| r.addr.clone()).collect();
    let chunks = fs_client::chunk::ChunkClient::new(&cluster.client_config("admin").identity()).unwrap();

    phase("malformed extents are refused and change nothing");
    let chunk_bytes = layout(&c, ino).await.chunk_bytes;
    for bad in [vec![(0u64, 8u64), (4, 8)], vec![(100, 8), (0, 8)], vec![(0, 8), (chunk_bytes - 4, 8)]] {
        let n: u64 = bad.iter().map(|e| e.1).sum();
        let data = Bytes::from(vec![0xEE; n as usize]);
        let r = chunks.writev(&chain, loc.chunk, loc.version, bad.clone(), vec![data], false, None, None).await;
        assert_eq!(r.expect_err("a malformed write was accepted").code(), ErrorCode::BadRequest, "{bad:?}");
    }
    for r in &loc.replicas {
        let got = chunks.read(&r.addr, loc.chunk, loc.version, 0, MIB).await.unwrap();
        assert!(got[..] == want[..], "server {} changed by a refused write", r.server);
    }

    phase("a good one lands on every replica");
    let extents = vec![(0u64, 4u64), (4096, 8), (MIB - 3, 3)];
    let data = Bytes::from_static(b"AAAABBBBBBBBCCC");
    // Handed over in pieces that do not follow the extents: the bytes go
    // one after another all the same.
    let pieces = vec![data.slice(..6), data.slice(6..)];
    chunks.writev(&chain, loc.chunk, loc.version, extents.clone(), pieces, false, None, None).await.unwrap();
    land(&mut want, &extents, &data);
    assert_replicas(&chunks, &loc, &want, "the vectored write").await;

    phase("whole blocks with the writer's sums: every replica stores them, and its reads check them");
    let extents = vec![(8192u64, 4096u64), (65536, 8192)];
    let data = Bytes::from(pattern(4, 12288));
    let sums = fs_client::sums::extent_sums(loc.chunk, &extents, &data, 4096).expect("whole blocks");
    let short = fs_client::sums::BlockSums { block_bytes: 4096, sums: sums.sums[1..].to_vec() };
    let r = chunks
        .writev(&chain, loc.chunk, loc.version, extents.clone(), vec![data.clone()], false, None, Some(short))
        .await;
    assert_eq!(r.expect_err("sums that do not fit were taken").code(), ErrorCode::BadRequest);
    chunks
        .writev(&chain, loc.chunk, loc.version, extents.clone(), vec![data.clone()], false, None, Some(sums))
        .await
        .unwrap();
    land(&mut want, &extents, &data);
    assert_replicas(&chunks, &loc, &want, "the summed write").await;
}

/// Puts the bytes of a vectored write (`data`, the extents' bytes in
/// order) into `want`.
fn land(want: &mut [u8], extents: &[(u64, u64)], data: &[u8]) {
    let mut at = 0;
    for &(off, len) in extents {
        want[off as usize..(off + len) as usize].copy_from_slice(&data[at..at + len as usize]);
        at += len as usize;
    }
}

/// Asserts that every replica of `loc` holds `want` in its first MiB.
async fn assert_replicas(chunks: &fs_client::chunk::ChunkClient, loc: &ChunkLocation, want: &[u8], what: &str) {
    for r in &loc.replicas {
        let got = chunks.read(&r.addr, loc.chunk, loc.version, 0, MIB).await.unwrap();
        assert!(got[..] == want[..], "server {} does not have {what}", r.server);
    }
}

/// Goal: writes that arrive while the file's buffer is being sent are taken
/// at once and land after the send, newest on top: 16 writers each rewrite
/// their own 4 KiB blocks of one file several times (far more than a
/// buffer's worth), and the file ends with every block's last version, read
/// through the writing client and through a fresh one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_during_a_send_land_in_order() {
    init_logging();
    let cluster = Cluster::start(ClusterOptions::default()).await.expect("cluster");
    let (c, f) = (cluster.client(), cluster.files());
    let ino = create(&c, ROOT_INO, "busy").await;
    const WRITERS: u64 = 16;
    // 32 MiB of blocks (two buffers' worth), written 3 times.
    const BLOCKS: u64 = 8192;
    const ROUNDS: u64 = 3;
    let block = |idx: u64, round: u64| -> Bytes {
        let mut b = vec![0u8; 4096];
        for (i, x) in b.iter_mut().enumerate() {
            *x = (idx.wrapping_mul(31) ^ round.wrapping_mul(131) ^ i as u64) as u8;
        }
        b[..16].copy_from_slice(&[idx.to_le_bytes(), round.to_le_bytes()].concat());
        Bytes::from(b)
    };
    let tasks = (0..WRITERS).map(|w| {
        let f = f.clone();
        tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(w);
            for round in 0..ROUNDS {
                let mut mine: Vec<u64> = (0..BLOCKS).filter(|b| b % WRITERS == w).collect();
                // A different order each round, so blocks meet the sends at
                // different points.
                for i in (1..mine.len()).rev() {
                    mine.swap(i, rng.gen_range(0..=i));
                }
                for idx in mine {
                    f.write(ino, idx * 4096, block(idx, round)).await.expect("write");
                }
            }
        })
    });
    for t in futures::future::join_all(tasks).await {
        t.expect("writer");
    }
    f.fsync(ino).await.expect("fsync");
    let want: Vec<u8> = (0..BLOCKS).flat_map(|idx| block(idx, ROUNDS - 1).to_vec()).collect();
    assert_eq!(f.size(ino).await.unwrap(), BLOCKS * 4096);
    assert!(read_all(&f, ino).await == want, "the writing client reads the last versions");
    assert!(read_all(&cluster.files(), ino).await == want, "a fresh client reads the last versions");
}

/// Goal: a write-back that fails after the writer moved on (a full buffer is
/// sent in the background) is reported to the application: by a later
/// write or by the flush, never swallowed. A directory quota makes the
/// cluster refuse the sends; what it took stays within the quota, and the
/// file reads back as a prefix of what was written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_background_write_back_failure_is_reported() {
    init_logging();
    let cluster = Cluster::start(ClusterOptions::default()).await.expect("cluster");
    let (c, f) = (cluster.client(), cluster.files());
    let dir = c
        .op_attr(MetaOp::Mkdir { parent: ROOT_INO, name: "capped".into(), perm: 0o755, caller: Caller::ROOT })
        .await
        .expect("mkdir")
        .ino;
    const QUOTA: u64 = 6 * MIB;
    let limits = QuotaLimits { max_bytes: Some(QUOTA), max_inodes: None };
    c.op(MetaOp::SetQuota { ino: dir, limits }).await.expect("set quota");
    let ino = create(&c, dir, "big").await;
    let data = pattern(77, (64 * MIB) as usize);

    // The file's layout known, a full buffer goes in the background.
    assert_eq!(f.size(ino).await.expect("size"), 0);
    phase("write 64 MiB in 1 MiB writes past a 6 MiB quota");
    let mut failed_at = None;
    for (i, piece) in data.chunks(MIB as usize).enumerate() {
        if let Err(e) = f.write(ino, i as u64 * MIB, Bytes::copy_from_slice(piece)).await {
            assert_eq!(e.code(), ErrorCode::QuotaExceeded, "the refusal reaches a later write: {e}");
            failed_at = Some(i);
            break;
        }
    }
    // 64 MiB is four buffers: a refused send is reported before the end.
    let i = failed_at.expect("no write reported the refused write-back");
    assert!(i >= 16, "writes are buffered: the first refusal comes after a buffer (at {i})");
    let flushed = f.fsync(ino).await.map_err(|e| e.code());
    assert_eq!(flushed, Err(ErrorCode::QuotaExceeded), "the fsync reports it too: the data was not stored");

    phase("what the cluster took is within the quota and a prefix of the data");
    let fresh = cluster.files();
    let size = fresh.size(ino).await.expect("size");
    assert!(size <= QUOTA, "{size} bytes stored past a {QUOTA}-byte quota");
    let got = read_all(&fresh, ino).await;
    assert!(got == data[..got.len()], "the stored bytes are what was written");
}

/// Goal: an fsync does not fail because chunks written since the last one
/// left the file meanwhile (another client truncated or deleted it): there
/// is nothing of them left to make durable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_fsync_skips_chunks_that_left_the_file() {
    init_logging();
    let cluster = Cluster::start(ClusterOptions::default()).await.expect("cluster");
    let c = cluster.client();
    let (writer, other) = (cluster.files(), cluster.files());
    let cut = create(&c, ROOT_INO, "cut").await;
    let gone = create(&c, ROOT_INO, "gone").await;
    let kept = create(&c, ROOT_INO, "kept").await;

    phase("write three files, sent to the chunk servers but not synced");
    let mut chunks = Vec::new();
    for ino in [cut, gone, kept] {
        writer.write(ino, 0, Bytes::from(pattern(ino, (2 * MIB) as usize))).await.expect("write");
        writer.flush(ino).await.expect("flush");
        chunks.push(layout(&c, ino).await.chunks[0].chunk);
    }

    phase("another client truncates one and deletes another; their chunks are collected");
    other.truncate(cut, 0).await.expect("truncate");
    c.op(MetaOp::Unlink { parent: ROOT_INO, name: b"gone".to_vec() }).await.expect("unlink");
    let held = |chunk: u64| {
        let prefix = format!("{chunk:016x}");
        cluster.chunks.values().any(|n| {
            n.chunk_files().iter().any(|p| p.file_name().is_some_and(|f| f.to_string_lossy().starts_with(&prefix)))
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while held(chunks[0]) || held(chunks[1]) {
        assert!(Instant::now() < deadline, "chunks not collected\n{}", cluster.logs_tail());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(held(chunks[2]), "the kept file's chunk is still there");

    phase("the writer's fsyncs succeed, and the kept file reads back");
    writer.fsync(cut).await.expect("fsync of the truncated file");
    writer.fsync(gone).await.expect("fsync of the deleted file");
    writer.fsync(kept).await.expect("fsync of the kept file");
    assert!(read_all(&cluster.files(), kept).await == pattern(kept, (2 * MIB) as usize));
}

/// Goal: a write past the end zeroes the gap from the end the metadata
/// holds now, not from the end this client last saw: bytes another client
/// truncated away never come back, and data another client appended is
/// never zeroed (found by a two-mount exerciser).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_past_the_end_uses_the_current_end() {
    init_logging();
    let cluster = Cluster::start(ClusterOptions::default()).await.expect("cluster");
    let c = cluster.client();
    let (a, b) = (cluster.files(), cluster.files());
    let ino = create(&c, ROOT_INO, "shared").await;
    let old = pattern(1, MIB as usize);
    a.write(ino, 0, Bytes::from(old.clone())).await.expect("write");
    a.flush(ino).await.expect("flush");

    phase("b cuts the file to 100 KiB; a, still caching 1 MiB, writes at 900 KiB");
    b.truncate(ino, 100 << 10).await.expect("truncate");
    a.write(ino, 900 << 10, Bytes::from_static(b"after the cut")).await.expect("write");
    a.flush(ino).await.expect("flush");
    let got = read_all(&cluster.files(), ino).await;
    assert_eq!(got.len(), (900 << 10) + 13);
    assert!(got[..100 << 10] == old[..100 << 10], "the kept bytes are intact");
    let back = got[100 << 10..900 << 10].iter().position(|&x| x != 0);
    assert_eq!(back.map(|i| i + (100 << 10)), None, "bytes the truncate cut came back");
    assert_eq!(&got[900 << 10..], b"after the cut");

    phase("b appends up to 2 MiB; a, caching the old end, writes at 3 MiB");
    b.write(ino, got.len() as u64, Bytes::from(pattern(2, (2 * MIB) as usize - got.len()))).await.expect("append");
    b.flush(ino).await.expect("flush");
    let before = read_all(&cluster.files(), ino).await;
    assert_eq!(before.len() as u64, 2 * MIB);
    a.write(ino, 3 * MIB, Bytes::from_static(b"far")).await.expect("write");
    a.flush(ino).await.expect("flush");
    let got = read_all(&cluster.files(), ino).await;
    assert!(got[..(2 * MIB) as usize] == before[..], "the other client's data was zeroed");
    assert!(got[(2 * MIB) as usize..(3 * MIB) as usize].iter().all(|&x| x == 0));
    assert_eq!(&got[(3 * MIB) as usize..], b"far");
}

/// Goal: files written but never fsynced are made durable by the
/// background syncer once settled, and their state is then let go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_files_are_synced_in_the_background() {
    init_logging();
    let cluster = Cluster::start(ClusterOptions::default()).await.expect("cluster");
    let (c, f) = (cluster.client(), cluster.files());
    let mut inos = Vec::new();
    for i in 0..3 {
        let ino = create(&c, ROOT_INO, &format!("f{i}")).await;
        f.write(ino, 0, Bytes::from(pattern(ino, 100_000))).await.expect("write");
        inos.push(ino);
    }
    // Written back but not synced; one file still has its data buffered.
    f.flush(inos[0]).await.expect("flush");
    f.flush(inos[1]).await.expect("flush");
    assert_eq!(f.sync_settled(Duration::from_secs(60)).await, 0, "nothing has settled that long");
    assert_eq!(f.sync_settled(Duration::ZERO).await, 2, "the two written-back files are synced");
    let dirty = f.dirty_files();
    assert!(!dirty.contains(&inos[0]) && !dirty.contains(&inos[1]), "synced files are clean: {dirty:?}");
    assert!(dirty.contains(&inos[2]), "a file with buffered data is left to its writer");
    assert_eq!(f.sync_settled(Duration::ZERO).await, 0);
    f.flush(inos[2]).await.expect("flush");
    for ino in inos {
        assert!(read_all(&cluster.files(), ino).await == pattern(ino, 100_000));
    }
}

/// Goal: repair goes on as copies finish, not a few copies per server
/// per scan interval (a restarted server took minutes to be refilled).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_does_not_wait_for_the_scan_interval() {
    init_logging();
    let opts = ClusterOptions { chunks: 4, scan_every_ms: 120_000, ..Default::default() };
    let mut cluster = Cluster::start(opts).await.expect("cluster");
    let (c, f) = (cluster.client(), cluster.files());
    let ino = create(&c, ROOT_INO, "many-chunks").await;
    let data = pattern(9, (40 * MIB) as usize);
    f.write_through(ino, 0, Bytes::from(data.clone())).await.expect("write");
    f.fsync(ino).await.expect("fsync");
    let dead = cluster.chunks[&2].addr.to_string();
    let on_2 = layout(&c, ino).await.chunks.iter().filter(|ch| ch.replicas.iter().any(|r| r.addr == dead)).count();
    assert!(on_2 > 12, "enough chunks on server 2 to need several rounds of repair ({on_2})");

    phase("kill server 2: its chunks are copied again well within one scan interval");
    cluster.kill_chunk(2);
    cluster.wait_fully_replicated(Duration::from_secs(45)).await.expect("repair");
    for ch in layout(&c, ino).await.chunks {
        // The dead copy may still be listed until the cleanup commits.
        let live = ch.replicas.iter().filter(|r| r.addr != dead).count();
        assert_eq!(live, 3, "chunk {}: {:?}", ch.chunk, ch.replicas);
    }
    assert!(read_all(&cluster.files(), ino).await == data);
}
