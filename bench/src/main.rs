//! `locus-bench`: benchmarks of Locus, run side by side with peers.
//!
//! `locus-bench meta`: creates, stats, renames and readdir pages per second
//! with p50/p99 latency, at 1 and 64 concurrent clients, against a 3-node
//! Locus metadata cluster and a 3-member etcd 3.4 cluster, both durable
//! (fsync on commit), on this machine's loopback.

mod clone;
mod data;
mod etcd;
mod load;
mod moosefs;
mod nbd;
mod vm;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use fs_client::proto::*;
use load::Stats;
use rand::Rng;

#[derive(Parser)]
#[command(name = "locus-bench")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Metadata operations: Locus vs etcd.
    Meta {
        /// Seconds per phase.
        #[arg(long, default_value_t = 10)]
        secs: u64,
        /// Concurrency levels.
        #[arg(long, value_delimiter = ',', default_value = "1,64")]
        clients: Vec<usize>,
        /// Skip the etcd side.
        #[arg(long)]
        no_etcd: bool,
        /// Phases to run (create always runs first: the others use its files).
        #[arg(long, value_delimiter = ',', default_value = "create,stat,readdir,rename")]
        ops: Vec<String>,
        /// Write the results as JSON here.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// The data path: local disk vs Locus (FUSE and library) vs MooseFS.
    Data {
        /// MiB written and read per sequential pass (also the random-I/O file size).
        #[arg(long, default_value_t = 1024)]
        size_mib: u64,
        /// Seconds per random-I/O phase.
        #[arg(long, default_value_t = 10)]
        secs: u64,
        /// Files in the small-file phase.
        #[arg(long, default_value_t = 2000)]
        small_files: usize,
        /// Targets: local, lib, locus, moosefs.
        #[arg(long, value_delimiter = ',', default_value = "local,lib,locus,moosefs")]
        targets: Vec<String>,
        /// No local sockets: Locus reads go over QUIC, as for a client on
        /// a machine without a replica.
        #[arg(long)]
        no_local_reads: bool,
        /// Write the results as JSON here.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// Clone and snapshot times of sparse and fully written disk images.
    Clone {
        /// Clones (and snapshots) timed per image.
        #[arg(long, default_value_t = 20)]
        runs: usize,
        /// Sizes of the sparse images, GiB.
        #[arg(long, value_delimiter = ',', default_value = "1,100")]
        sparse_gib: Vec<u64>,
        /// Size of the fully written image, MiB (0 skips it).
        #[arg(long, default_value_t = 10240)]
        full_mib: u64,
        /// Skip the clone of 1 TiB of allocated, never-written chunks.
        #[arg(long)]
        no_allocated: bool,
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// The NBD export under fio's nbd engine vs nbdkit on a local file.
    Nbd {
        /// Image size, MiB.
        #[arg(long, default_value_t = 512)]
        size_mib: u64,
        /// Seconds per random-I/O phase.
        #[arg(long, default_value_t = 10)]
        secs: u64,
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// VM placement decisions per second (the placement crate, in process).
    Placement {
        /// Cluster sizes, hosts.
        #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
        hosts: Vec<u64>,
        #[arg(long, default_value_t = 1_000_000)]
        chunks: u64,
        /// Decisions timed per cluster size.
        #[arg(long, default_value_t = 20_000)]
        decisions: usize,
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// VM hosts on a local cluster: apply to running, 100 clones, failover.
    Vm {
        #[arg(long, default_value_t = 5)]
        runs: usize,
        #[arg(long, default_value_t = 100)]
        clones: u32,
        /// Skip the qemu driver.
        #[arg(long)]
        no_qemu: bool,
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// Chunk server memory per million chunks (the store's index).
    ChunkMemory {
        #[arg(long, default_value_t = 200_000)]
        chunks: u64,
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
}

fn save(out: Option<std::path::PathBuf>, rows: &[data::Row]) -> anyhow::Result<()> {
    if let Some(p) = out {
        std::fs::write(&p, serde_json::to_vec_pretty(rows)?)?;
        eprintln!("results written to {}", p.display());
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("LOCUS_LOG").unwrap_or_else(|_| "warn".into()))
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.cmd {
        Cmd::Meta { secs, clients, no_etcd, ops, out } => {
            rt.block_on(meta(Duration::from_secs(secs), clients, no_etcd, ops, out))
        }
        Cmd::Data { size_mib, secs, small_files, targets, no_local_reads, out } => {
            let s = data::Settings { size_mib, secs, small_files, targets, local_reads: !no_local_reads };
            let rows = rt.block_on(data::run(s))?;
            save(out, &rows)
        }
        Cmd::Clone { runs, sparse_gib, full_mib, no_allocated, out } => {
            let s = clone::Settings { runs: runs.max(1), sparse_gib, full_mib, allocated_tib: !no_allocated };
            save(out, &rt.block_on(clone::run(s))?)
        }
        Cmd::Nbd { size_mib, secs, out } => save(out, &rt.block_on(nbd::run(size_mib, secs))?),
        Cmd::Placement { hosts, chunks, decisions, out } => save(out, &vm::placement(&hosts, chunks, decisions)?),
        Cmd::Vm { runs, clones, no_qemu, out } => save(out, &rt.block_on(vm::vm(runs.max(2), clones, !no_qemu))?),
        Cmd::ChunkMemory { chunks, out } => save(out, &data::chunk_memory(chunks)?),
    }
}

const VALUE_BYTES: usize = 120;

async fn meta(
    d: Duration,
    levels: Vec<usize>,
    no_etcd: bool,
    phases: Vec<String>,
    out: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    let want = |p: &str| phases.iter().any(|x| x == p);
    let mut results: Vec<Stats> = Vec::new();
    println!("{}", Stats::header());

    eprintln!("starting a 3-node Locus metadata cluster (release binaries, durable commits)");
    let cluster = locus_tests::MetaCluster::start(locus_tests::MetaOptions::default()).await?;
    let client = cluster.client();
    for &c in &levels {
        let dir = client
            .op_attr(MetaOp::Mkdir {
                parent: ROOT_INO,
                name: format!("c{c}").into(),
                perm: 0o755,
                caller: Caller::ROOT,
            })
            .await?
            .ino;
        let created: Arc<Vec<AtomicU64>> = Arc::new((0..c).map(|_| AtomicU64::new(0)).collect());

        let (cl, cr) = (client.clone(), created.clone());
        let s = load::run("locus", "create", c, d, move |w, i| {
            let (cl, cr) = (cl.clone(), cr.clone());
            async move {
                let name = format!("w{w}-{i}");
                let r = cl
                    .op(MetaOp::Create {
                        parent: dir,
                        name: name.into(),
                        perm: 0o644,
                        caller: Caller::ROOT,
                        exclusive: true,
                    })
                    .await;
                cr[w].fetch_add(1, Ordering::Relaxed);
                Some(r.map(|_| ()).map_err(|e| e.to_string()))
            }
        })
        .await;
        println!("{}", s.row());
        results.push(s);

        if want("stat") {
            let (cl, cr) = (client.clone(), created.clone());
            let s = load::run("locus", "stat", c, d, move |_, _| {
                let (cl, cr) = (cl.clone(), cr.clone());
                async move {
                    let (w, i) = pick(&cr);
                    let r = cl.read(MetaRead::Lookup { parent: dir, name: format!("w{w}-{i}").into() }).await;
                    Some(r.map(|_| ()).map_err(|e| e.to_string()))
                }
            })
            .await;
            println!("{}", s.row());
            results.push(s);
        }

        if want("readdir") {
            let (cl, cr) = (client.clone(), created.clone());
            let s = load::run("locus", "readdir", c, d, move |_, _| {
                let (cl, cr) = (cl.clone(), cr.clone());
                async move {
                    let (w, i) = pick(&cr);
                    let r = cl
                        .read(MetaRead::ReadDir { ino: dir, after: Some(format!("w{w}-{i}").into()), limit: 100 })
                        .await;
                    Some(r.map(|_| ()).map_err(|e| e.to_string()))
                }
            })
            .await;
            println!("{}", s.row());
            results.push(s);
        }

        if want("rename") {
            let (cl, cr) = (client.clone(), created.clone());
            let s = load::run("locus", "rename", c, d, move |w, i| {
                let (cl, cr) = (cl.clone(), cr.clone());
                async move {
                    if i >= cr[w].load(Ordering::Relaxed) {
                        return None;
                    }
                    let r = cl
                        .op(MetaOp::Rename {
                            parent: dir,
                            name: format!("w{w}-{i}").into(),
                            new_parent: dir,
                            new_name: format!("w{w}-{i}.r").into(),
                            flags: 0,
                        })
                        .await;
                    Some(r.map(|_| ()).map_err(|e| e.to_string()))
                }
            })
            .await;
            println!("{}", s.row());
            results.push(s);
        }
    }
    drop(cluster);

    if !no_etcd {
        eprintln!("starting a 3-member etcd cluster (default durable settings)");
        let tmp = tempfile::Builder::new().prefix("locus-bench-etcd-").tempdir()?;
        let etcd = etcd::Etcd::start(tmp.path()).await?;
        let ec = etcd_client::Client::connect(&etcd.endpoints, None).await?;
        let value = vec![b'v'; VALUE_BYTES];
        for &c in &levels {
            let created: Arc<Vec<AtomicU64>> = Arc::new((0..c).map(|_| AtomicU64::new(0)).collect());
            let (cl, cr, v) = (ec.clone(), created.clone(), value.clone());
            let s = load::run("etcd", "create", c, d, move |w, i| {
                let (mut cl, cr, v) = (cl.clone(), cr.clone(), v.clone());
                async move {
                    use etcd_client::{Compare, CompareOp, Txn, TxnOp};
                    let key = format!("/c{c}/w{w}-{i}");
                    let txn = Txn::new()
                        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                        .and_then([TxnOp::put(key, v, None)]);
                    let r = cl.txn(txn).await;
                    cr[w].fetch_add(1, Ordering::Relaxed);
                    Some(match r {
                        Ok(t) if t.succeeded() => Ok(()),
                        Ok(_) => Err("exists".into()),
                        Err(e) => Err(e.to_string()),
                    })
                }
            })
            .await;
            println!("{}", s.row());
            results.push(s);

            if want("stat") {
                let (cl, cr) = (ec.clone(), created.clone());
                let s = load::run("etcd", "stat", c, d, move |_, _| {
                    let (mut cl, cr) = (cl.clone(), cr.clone());
                    async move {
                        let (w, i) = pick(&cr);
                        let r = cl.get(format!("/c{c}/w{w}-{i}"), None).await;
                        Some(r.map(|_| ()).map_err(|e| e.to_string()))
                    }
                })
                .await;
                println!("{}", s.row());
                results.push(s);
            }

            if want("readdir") {
                let (cl, cr) = (ec.clone(), created.clone());
                let s = load::run("etcd", "readdir", c, d, move |_, _| {
                    let (mut cl, cr) = (cl.clone(), cr.clone());
                    async move {
                        let (w, i) = pick(&cr);
                        let opts = etcd_client::GetOptions::new().with_range(format!("/c{c}0")).with_limit(100);
                        let r = cl.get(format!("/c{c}/w{w}-{i}\0"), Some(opts)).await;
                        Some(r.map(|_| ()).map_err(|e| e.to_string()))
                    }
                })
                .await;
                println!("{}", s.row());
                results.push(s);
            }

            if want("rename") {
                let (cl, cr, v) = (ec.clone(), created.clone(), value.clone());
                let s = load::run("etcd", "rename", c, d, move |w, i| {
                    let (mut cl, cr, v) = (cl.clone(), cr.clone(), v.clone());
                    async move {
                        use etcd_client::{Compare, CompareOp, Txn, TxnOp};
                        if i >= cr[w].load(Ordering::Relaxed) {
                            return None;
                        }
                        let (src, dst) = (format!("/c{c}/w{w}-{i}"), format!("/c{c}/w{w}-{i}.r"));
                        let txn = Txn::new()
                            .when([
                                Compare::create_revision(src.clone(), CompareOp::Greater, 0),
                                Compare::create_revision(dst.clone(), CompareOp::Equal, 0),
                            ])
                            .and_then([TxnOp::delete(src, None), TxnOp::put(dst, v, None)]);
                        Some(match cl.txn(txn).await {
                            Ok(t) if t.succeeded() => Ok(()),
                            Ok(_) => Err("conflict".into()),
                            Err(e) => Err(e.to_string()),
                        })
                    }
                })
                .await;
                println!("{}", s.row());
                results.push(s);
            }
        }
        drop(etcd);
    }

    println!();
    for &c in &levels {
        let get = |sys: &str, op: &str| {
            results.iter().find(|s| s.system == sys && s.op == op && s.clients == c).map(|s| s.ops_per_sec)
        };
        for op in ["create", "stat", "readdir", "rename"] {
            if let (Some(l), Some(e)) = (get("locus", op), get("etcd", op)) {
                println!("{c:>3} clients  {op:<8} locus/etcd = {:.2}x", l / e);
            }
        }
    }
    if let Some(p) = out {
        std::fs::write(&p, serde_json::to_string_pretty(&results)?)?;
        eprintln!("results written to {}", p.display());
    }
    Ok(())
}

/// A random (worker, index) among the files created so far.
fn pick(created: &[AtomicU64]) -> (usize, u64) {
    let mut rng = rand::thread_rng();
    loop {
        let w = rng.gen_range(0..created.len());
        let n = created[w].load(Ordering::Relaxed);
        if n > 0 {
            return (w, rng.gen_range(0..n));
        }
    }
}
