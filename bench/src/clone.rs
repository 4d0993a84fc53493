//! `locus-bench clone`: how long an instant clone and a snapshot take, for
//! sparse and fully written disk images, against a cluster with 64 MiB
//! chunks (3 meta nodes, 3 chunk servers, goal 3), all on this machine.
//!
//! Each figure is the median (and the slowest) of `runs` calls of
//! `FileClient::clone_inode`: the one metadata command that shares every
//! chunk, plus the version fences pushed to every replica, as `locus fs
//! clone` and `locus fs snapshot` do. Also measured: the first 4 KiB write
//! into a fresh clone of a fully written image (the chunk is copied on its
//! servers before the write applies), and a clone of 1 TiB of allocated,
//! never-written chunks (16,384 chunk references: the metadata-bound case).

use std::time::{Duration, Instant};

use bytes::Bytes;
use fs_client::file::FileClient;
use fs_client::proto::*;
use rand::{RngCore, SeedableRng};

use crate::data::Row;

pub struct Settings {
    pub runs: usize,
    /// Sizes of the sparse images, GiB.
    pub sparse_gib: Vec<u64>,
    /// Size of the fully written image, MiB (0: skip).
    pub full_mib: u64,
    /// Also clone 1 TiB of allocated, never-written chunks.
    pub allocated_tib: bool,
}

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const CHUNK: u64 = 64 * MIB;

fn push(rows: &mut Vec<Row>, workload: String, value: f64, unit: &'static str) {
    let r = Row { target: "locus".into(), workload, value, unit };
    println!("{:<14} {:<58} {:>10.2} {}", r.target, r.workload, r.value, r.unit);
    rows.push(r);
}

/// (median, max) in milliseconds.
fn summary(mut d: Vec<Duration>) -> (f64, f64) {
    d.sort();
    let ms = |x: Duration| x.as_secs_f64() * 1000.0;
    (ms(d[d.len() / 2]), ms(*d.last().unwrap_or(&Duration::ZERO)))
}

async fn create(f: &FileClient, name: &str) -> anyhow::Result<Ino> {
    let op = MetaOp::Create { parent: ROOT_INO, name: name.into(), perm: 0o644, caller: Caller::ROOT, exclusive: true };
    Ok(f.meta().op_attr(op).await?.ino)
}

/// Clones (or snapshots) `src` `runs` times; reports median and max.
async fn time_clones(
    f: &FileClient,
    src: Ino,
    label: &str,
    snapshot: bool,
    runs: usize,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let kind = if snapshot { "snapshot" } else { "clone" };
    let mut times = Vec::with_capacity(runs);
    let (mut metadata, mut fences) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    let mut chunks = 0;
    for i in 0..runs {
        let name = format!("{label}-{kind}-{i}");
        let t = Instant::now();
        let out = f.clone_inode(src, ROOT_INO, name.as_bytes(), snapshot).await?;
        times.push(t.elapsed());
        metadata.push(out.metadata);
        fences.push(out.fences);
        anyhow::ensure!(out.unfenced.is_empty(), "{} replicas not fenced", out.unfenced.len());
        chunks = out.chunks;
    }
    let (p50, max) = summary(times);
    push(rows, format!("{kind} {label} ({chunks} chunks) p50"), p50, "ms");
    push(rows, format!("{kind} {label} ({chunks} chunks) max"), max, "ms");
    // Where the time goes: the metadata command, then the fences.
    push(rows, format!("{kind} {label}: metadata command p50"), summary(metadata).0, "ms");
    push(rows, format!("{kind} {label}: fence push p50"), summary(fences).0, "ms");
    Ok(())
}

/// A sparse image: `size` bytes, 4 KiB written in 8 places (each sent on
/// its own: one buffered flush would allocate every chunk between them).
async fn sparse_image(f: &FileClient, name: &str, size: u64) -> anyhow::Result<Ino> {
    let ino = create(f, name).await?;
    f.truncate(ino, size).await?;
    for i in 0..8u64 {
        let off = (size / 8 * i) / 4096 * 4096;
        f.write_through(ino, off, Bytes::from(vec![i as u8 + 1; 4096])).await?;
    }
    f.fsync(ino).await?;
    Ok(ino)
}

pub async fn run(s: Settings) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    eprintln!("starting Locus: 3 meta nodes, 3 chunk servers, 64 MiB chunks, goal 3");
    let opts = locus_tests::ClusterOptions { chunk_bytes: CHUNK, ..Default::default() };
    let cluster = locus_tests::Cluster::start(opts).await?;
    let f = cluster.files();
    println!("{:<14} {:<58} {:>10}", "target", "workload", "value");

    for &gib in &s.sparse_gib {
        let label = format!("{gib} GiB sparse");
        let ino = sparse_image(&f, &format!("sparse-{gib}g"), gib * GIB).await?;
        time_clones(&f, ino, &label, false, s.runs, &mut rows).await?;
        time_clones(&f, ino, &label, true, s.runs, &mut rows).await?;
    }

    if s.full_mib > 0 {
        let label = if s.full_mib.is_multiple_of(1024) {
            format!("{} GiB written", s.full_mib / 1024)
        } else {
            format!("{} MiB written", s.full_mib)
        };
        let ino = create(&f, "full").await?;
        let mut buf = vec![0u8; (8 * MIB) as usize];
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let t = Instant::now();
        let mut off = 0;
        while off < s.full_mib * MIB {
            rng.fill_bytes(&mut buf);
            f.write(ino, off, Bytes::copy_from_slice(&buf)).await?;
            off += buf.len() as u64;
        }
        f.fsync(ino).await?;
        eprintln!("wrote {label} in {:?}", t.elapsed());
        time_clones(&f, ino, &label, false, s.runs, &mut rows).await?;
        time_clones(&f, ino, &label, true, s.runs, &mut rows).await?;

        // The first write into a fresh clone copies a 64 MiB chunk on each
        // of its servers (in parallel) before it applies.
        let mut first = Vec::new();
        let mut later = Vec::new();
        for i in 0..s.runs.min(10) {
            let w = cluster.files();
            let c = w.clone_inode(ino, ROOT_INO, format!("cow-{i}").as_bytes(), false).await?.attr.ino;
            let at = (i as u64 % (s.full_mib / 64).max(1)) * CHUNK + 4096;
            let t = Instant::now();
            w.write_through(c, at, Bytes::from(vec![7u8; 4096])).await?;
            first.push(t.elapsed());
            let t = Instant::now();
            w.write_through(c, at + 8192, Bytes::from(vec![8u8; 4096])).await?;
            later.push(t.elapsed());
        }
        let (p50, _) = summary(first);
        push(&mut rows, "first 4 KiB write into a clone (64 MiB copied) p50".into(), p50, "ms");
        let (p50, _) = summary(later);
        push(&mut rows, "second 4 KiB write into that chunk p50".into(), p50, "ms");
    }

    if s.allocated_tib {
        // 16,384 chunks in the map, none written: the clone's cost is the
        // metadata command and 3 x 16,384 fences.
        let ino = create(&f, "allocated").await?;
        // Placement counts what one request allocates against free space:
        // spans small enough to fit this machine's disk.
        let span = 64 * CHUNK;
        let mut off = 0;
        while off < 1 << 40 {
            f.meta().op(MetaOp::PrepareWrite { ino, offset: off, len: span, extend: false }).await?;
            off += span;
        }
        f.truncate(ino, 1 << 40).await?;
        time_clones(&f, ino, "1 TiB allocated", false, s.runs.min(5), &mut rows).await?;
    }
    drop(cluster);
    Ok(rows)
}
