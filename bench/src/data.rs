//! `locus-bench data`: the data path, side by side with the local disk
//! (the limit) and MooseFS 3.0 (goal 3), all on this machine.
//!
//! Through a mount (local directory, Locus FUSE, MooseFS FUSE): sequential
//! write and read with 1 MiB and 4 MiB blocks, 4 KiB random read and write
//! at 1 and 16 threads, small-file create and stat. Through the Locus
//! client library: the same sequential and random workloads. Page caches
//! are dropped between writing and reading, so reads come from the servers.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use fs_client::proto::*;
use locus_tests::files::pattern;
use rand::{Rng, SeedableRng};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub target: String,
    pub workload: String,
    pub value: f64,
    pub unit: &'static str,
}

impl Row {
    fn print(&self) {
        println!("{:<14} {:<34} {:>12.1} {}", self.target, self.workload, self.value, self.unit);
    }
}

pub struct Settings {
    pub size_mib: u64,
    pub secs: u64,
    pub small_files: usize,
    pub targets: Vec<String>,
    /// Whether Locus clients read replicas through the servers' local
    /// sockets (all three are on this machine) or over QUIC.
    pub local_reads: bool,
}

const MIB: u64 = 1 << 20;

fn drop_caches() {
    // Root only; without it reads may come from the page cache (noted in the output).
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

/// Sequential write of `size` bytes in `bs` blocks, fsync included: MB/s.
fn seq_write(path: &Path, size: u64, bs: usize) -> anyhow::Result<f64> {
    let buf = pattern(bs as u64, bs);
    let mut f = OpenOptions::new().create(true).write(true).truncate(true).open(path)?;
    let t = Instant::now();
    let mut done = 0u64;
    while done < size {
        std::io::Write::write_all(&mut f, &buf)?;
        done += bs as u64;
    }
    f.sync_all()?;
    drop(f);
    Ok(size as f64 / MIB as f64 / t.elapsed().as_secs_f64())
}

fn seq_read(path: &Path, bs: usize) -> anyhow::Result<f64> {
    drop_caches();
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; bs];
    let t = Instant::now();
    let mut total = 0u64;
    loop {
        let n = std::io::Read::read(&mut f, &mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    Ok(total as f64 / MIB as f64 / t.elapsed().as_secs_f64())
}

/// 4 KiB random reads or writes over `path` for `secs`, `threads` at once: IOPS.
fn random_io(path: &Path, size: u64, secs: u64, threads: usize, write: bool) -> anyhow::Result<f64> {
    drop_caches();
    let f = Arc::new(OpenOptions::new().read(true).write(write).open(path)?);
    let blocks = size / 4096;
    let deadline = Instant::now() + Duration::from_secs(secs);
    let t = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let f = f.clone();
            std::thread::spawn(move || -> std::io::Result<u64> {
                let mut rng = rand::rngs::StdRng::seed_from_u64(i as u64);
                let mut buf = vec![0u8; 4096];
                let mut n = 0;
                while Instant::now() < deadline {
                    let off = rng.gen_range(0..blocks) * 4096;
                    if write {
                        buf[0] = n as u8;
                        f.write_all_at(&buf, off)?;
                    } else {
                        f.read_exact_at(&mut buf, off)?;
                    }
                    n += 1;
                }
                Ok(n)
            })
        })
        .collect();
    let mut ops = 0;
    for h in handles {
        ops += h.join().map_err(|_| anyhow::anyhow!("io thread panicked"))??;
    }
    if write {
        f.sync_all()?;
    }
    Ok(ops as f64 / t.elapsed().as_secs_f64())
}

fn small_files(dir: &Path, n: usize) -> anyhow::Result<(f64, f64)> {
    let d = dir.join("small");
    std::fs::create_dir_all(&d)?;
    let data = pattern(5, 1024);
    let t = Instant::now();
    for i in 0..n {
        std::fs::write(d.join(format!("f{i}")), &data)?;
    }
    let creates = n as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for i in 0..n {
        std::fs::metadata(d.join(format!("f{i}")))?;
    }
    let stats = n as f64 / t.elapsed().as_secs_f64();
    Ok((creates, stats))
}

/// Every mount-level workload against the directory `dir`.
fn mount_suite(target: &str, dir: &Path, s: &Settings, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let size = s.size_mib * MIB;
    let mut push = |workload: &str, value: f64, unit: &'static str| {
        let r = Row { target: target.into(), workload: workload.into(), value, unit };
        r.print();
        rows.push(r);
    };
    let file = dir.join("seq.bin");
    for bs in [MIB as usize, 4 * MIB as usize] {
        let label = bs / MIB as usize;
        push(&format!("seq write {label} MiB blocks"), seq_write(&file, size, bs)?, "MB/s");
        push(&format!("seq read {label} MiB blocks"), seq_read(&file, bs)?, "MB/s");
    }
    for threads in [1, 16] {
        push(&format!("rand read 4 KiB x{threads}"), random_io(&file, size, s.secs, threads, false)?, "IOPS");
    }
    for threads in [1, 16] {
        push(&format!("rand write 4 KiB x{threads}"), random_io(&file, size, s.secs, threads, true)?, "IOPS");
    }
    std::fs::remove_file(&file)?;
    let (c, st) = small_files(dir, s.small_files)?;
    push("small files create (1 KiB)", c, "files/s");
    push("small files stat", st, "files/s");
    Ok(())
}

/// The same workloads through the client library, no FUSE.
async fn library_suite(cluster: &locus_tests::Cluster, s: &Settings, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let size = s.size_mib * MIB;
    let mut push = |workload: &str, value: f64, unit: &'static str| {
        let r = Row { target: "locus lib".into(), workload: workload.into(), value, unit };
        r.print();
        rows.push(r);
    };
    let c = cluster.client();
    for bs in [MIB, 4 * MIB] {
        let name = format!("lib-seq-{bs}");
        let ino = c
            .op_attr(MetaOp::Create {
                parent: ROOT_INO,
                name: name.into(),
                perm: 0o644,
                caller: Caller::ROOT,
                exclusive: true,
            })
            .await?
            .ino;
        let f = cluster.files();
        let buf = Bytes::from(pattern(bs, bs as usize));
        let t = Instant::now();
        let mut off = 0;
        while off < size {
            f.write(ino, off, buf.clone()).await?;
            off += bs;
        }
        f.fsync(ino).await?;
        push(
            &format!("seq write {} MiB blocks", bs / MIB),
            size as f64 / MIB as f64 / t.elapsed().as_secs_f64(),
            "MB/s",
        );
        // From the disk, as the other targets read: the servers' page
        // cache would otherwise hold whatever the write left there.
        drop_caches();
        let f = cluster.files();
        let t = Instant::now();
        let mut off = 0;
        while off < size {
            // A few reads in flight, as a reader with read-ahead has.
            let reads: Vec<_> = (0..4).map(|i| f.read(ino, off + i * bs, bs)).collect();
            for r in futures::future::join_all(reads).await {
                r?;
            }
            off += 4 * bs;
        }
        push(
            &format!("seq read {} MiB blocks", bs / MIB),
            size as f64 / MIB as f64 / t.elapsed().as_secs_f64(),
            "MB/s",
        );
        if bs == MIB {
            for (threads, write) in [(1, false), (16, false), (1, true), (16, true)] {
                // Random reads from the disk, as on the other targets (the
                // sequential read above may have left the file cached).
                drop_caches();
                let iops = lib_random(cluster, ino, size, s.secs, threads, write).await?;
                let kind = if write { "rand write 4 KiB (write-through)" } else { "rand read 4 KiB" };
                push(&format!("{kind} x{threads}"), iops, "IOPS");
            }
        }
    }
    Ok(())
}

async fn lib_random(
    cluster: &locus_tests::Cluster,
    ino: Ino,
    size: u64,
    secs: u64,
    threads: usize,
    write: bool,
) -> anyhow::Result<f64> {
    let f = cluster.files();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let t = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..threads {
        let f = f.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(100 + i as u64);
            let buf = Bytes::from(vec![7u8; 4096]);
            let mut n = 0u64;
            while Instant::now() < deadline {
                let off = rng.gen_range(0..size / 4096) * 4096;
                if write {
                    f.write_through(ino, off, buf.clone()).await?;
                } else {
                    f.read(ino, off, 4096).await?;
                }
                n += 1;
            }
            Ok::<u64, fs_client::ClientError>(n)
        }));
    }
    let mut ops = 0;
    for t in tasks {
        ops += t.await??;
    }
    if write {
        f.fsync(ino).await?;
    }
    Ok(ops as f64 / t.elapsed().as_secs_f64())
}

/// Runs the chosen targets; prints a table; returns the rows.
pub async fn run(s: Settings) -> anyhow::Result<Vec<Row>> {
    let want = |t: &str| s.targets.iter().any(|x| x == t);
    let base = std::env::temp_dir();
    let mut rows = Vec::new();
    println!("{:<14} {:<34} {:>12}", "target", "workload", "value");
    if want("local") {
        let dir = tempfile::Builder::new().prefix("locus-bench-local-").tempdir_in(&base)?;
        mount_suite("local disk", dir.path(), &s, &mut rows)?;
    }
    if want("locus") || want("lib") {
        let how = if s.local_reads { "local reads" } else { "every read over QUIC" };
        eprintln!("starting Locus: 3 meta nodes, 3 chunk servers, 64 MiB chunks, goal 3, {how}");
        let opts =
            locus_tests::ClusterOptions { chunk_bytes: 64 * MIB, local_sockets: s.local_reads, ..Default::default() };
        let cluster = locus_tests::Cluster::start(opts).await?;
        if want("lib") {
            library_suite(&cluster, &s, &mut rows).await?;
        }
        if want("locus") {
            let config = cluster.write_cli_config("client", None, 30_000);
            let mnt = tempfile::Builder::new().prefix("locus-bench-mnt-").tempdir()?;
            let out = std::process::Command::new(locus_tests::bin("locus"))
                .arg("--config")
                .arg(&config)
                .arg("mount")
                .arg(mnt.path())
                .output()
                .context("run locus mount")?;
            anyhow::ensure!(out.status.success(), "locus mount: {}", String::from_utf8_lossy(&out.stderr));
            let _guard = Unmount(mnt.path().to_path_buf());
            mount_suite("locus fuse", mnt.path(), &s, &mut rows)?;
            let rss = cluster.chunks.values().filter_map(|n| n.pid()).map(rss_kib).sum::<u64>() / 3;
            let r = Row {
                target: "locus".into(),
                workload: "chunk server RSS (mean)".into(),
                value: rss as f64 / 1024.0,
                unit: "MiB",
            };
            r.print();
            rows.push(r);
        }
    }
    if want("moosefs") {
        eprintln!("starting MooseFS 3.0: master + 3 chunkservers, goal 3, mfsmount");
        let m = crate::moosefs::MooseFs::start(&base)?;
        mount_suite("moosefs", &m.mountpoint, &s, &mut rows)?;
        let probe = m.mountpoint.join("probe.bin");
        seq_write(&probe, 4 * MIB, MIB as usize)?;
        std::thread::sleep(Duration::from_secs(2));
        eprintln!("moosefs copies of a probe file: {}", m.copies(&probe));
    }
    Ok(rows)
}

struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let ok = std::process::Command::new(locus_tests::bin("locus"))
            .arg("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Chunk server memory per million chunks: the store's index, measured by
/// creating `n` small chunks in a store and reading the process RSS and the
/// index's own accounting, then reopening the store (index rebuilt from disk).
pub fn chunk_memory(n: u64) -> anyhow::Result<Vec<Row>> {
    use fs_server::chunk::store::{ChunkStore, StoreOptions};
    let dir = tempfile::Builder::new().prefix("locus-bench-chunks-").tempdir()?;
    let opts = StoreOptions { chunk_size: 64 << 10, block_size: 64 << 10, reserved_bytes: 0, ..Default::default() };
    let me = std::process::id() as i32;
    let before = rss_kib(me);
    let data = vec![1u8; 512];
    let mut rows = Vec::new();
    let heap = {
        let store = ChunkStore::open(dir.path(), opts.clone())?;
        let t = Instant::now();
        for id in 1..=n {
            store.write(id, 1, 0, &data, true)?;
        }
        eprintln!("created {n} chunks in {:?}", t.elapsed());
        store.index_heap_bytes()
    };
    let t = Instant::now();
    let store = ChunkStore::open(dir.path(), opts)?;
    let reopen = t.elapsed();
    let after = rss_kib(me);
    anyhow::ensure!(store.len() as u64 == n, "reopened store lists {} chunks, not {n}", store.len());
    let per_million = |bytes: f64| bytes * 1_000_000.0 / n as f64 / MIB as f64;
    for (w, v, u) in [
        ("index heap per million chunks", per_million(store.index_heap_bytes() as f64), "MiB"),
        ("index heap at creation, per million", per_million(heap as f64), "MiB"),
        ("process RSS growth per million chunks", per_million((after.saturating_sub(before) * 1024) as f64), "MiB"),
        ("reopen (index rebuild) per million chunks", reopen.as_secs_f64() * 1_000_000.0 / n as f64, "s"),
    ] {
        let r = Row { target: "chunk store".into(), workload: w.into(), value: v, unit: u };
        r.print();
        rows.push(r);
    }
    Ok(rows)
}
