//! `locus-bench nbd`: the NBD export under fio's nbd engine, side by side
//! with nbdkit serving a plain local file (the no-distribution limit).
//!
//! - Locus: 3 meta nodes, 3 chunk servers (64 MiB chunks, goal 3) on
//!   loopback; `locus nbd serve` of a file on a unix socket, first as it
//!   runs by default ("locus nbd": it holds the image's write lease and
//!   caches reads, 256 MiB, which here holds the whole image, as the page
//!   cache does for nbdkit), then with `--cache-mib 0` ("locus nocache":
//!   every read from a replica).
//! - nbdkit: the `file` plugin on a local file of the same size, unix socket.
//!
//! Per target, in order: sequential write of the whole image (1 MiB, QD 4;
//! it also fills the image so later reads are not holes), sequential read,
//! then 4 KiB random read and write at queue depth 1 and 16, each for
//! `secs`. Neither side flushes during the random phases; both end with a
//! flush (fio's `end_fsync`) in the write phases. Every job starts after a
//! `sync`, so none pays for the write-back of the one before, and every
//! target with an empty page cache (`drop_caches`).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use locus_tests::{bin, Cluster, ClusterOptions};

use crate::data::Row;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_socket(p: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !p.exists() {
        anyhow::ensure!(Instant::now() < deadline, "{} did not appear", p.display());
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// One fio job; returns (IOPS, MB/s) of its read or write side.
fn fio(uri: &str, rw: &str, bs: &str, depth: u32, size_mib: u64, secs: Option<u64>) -> anyhow::Result<(f64, f64)> {
    // Each job starts with no dirty pages left by the one before: the
    // kernel writing those back meanwhile (for nbdkit's file or the chunk
    // servers' replicas) made the same job swing from 45k to 87k IOPS.
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    let mut cmd = Command::new("fio");
    cmd.args([
        "--name=bench",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        &format!("--rw={rw}"),
        &format!("--bs={bs}"),
        &format!("--iodepth={depth}"),
        &format!("--size={size_mib}M"),
        "--output-format=json",
        "--randrepeat=0",
    ]);
    if let Some(s) = secs {
        cmd.args(["--time_based", &format!("--runtime={s}")]);
    }
    if rw.contains("write") {
        cmd.arg("--end_fsync=1");
    }
    let out = cmd.output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(out.status.success(), "fio {rw}: {}{}", text, String::from_utf8_lossy(&out.stderr));
    let start = text.find('{').unwrap_or(0);
    let v: serde_json::Value = serde_json::from_str(&text[start..])?;
    let side = if rw.contains("write") { "write" } else { "read" };
    let job = &v["jobs"][0][side];
    Ok((job["iops"].as_f64().unwrap_or(0.0), job["bw_bytes"].as_f64().unwrap_or(0.0) / 1e6))
}

/// Starts a target from an empty page cache. A page cache full of the
/// files of earlier runs made page-cache writes slow: nbdkit's 4 KiB
/// random writes at QD16 ran at 30-47k IOPS, and at 68-86k right after a
/// drop. Best effort (it needs root).
fn drop_caches() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    if let Err(e) = std::fs::write("/proc/sys/vm/drop_caches", "3") {
        eprintln!("cannot drop the page cache ({e}); numbers depend on what it holds");
    }
}

fn suite(target: &str, uri: &str, size_mib: u64, secs: u64, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    drop_caches();
    let mut push = |workload: String, value: f64, unit: &'static str| {
        let r = Row { target: target.into(), workload, value, unit };
        println!("{:<14} {:<40} {:>12.1} {}", r.target, r.workload, r.value, r.unit);
        rows.push(r);
    };
    let (_, mbs) = fio(uri, "write", "1M", 4, size_mib, None)?;
    push("seq write 1 MiB QD4".into(), mbs, "MB/s");
    let (_, mbs) = fio(uri, "read", "1M", 4, size_mib, None)?;
    push("seq read 1 MiB QD4".into(), mbs, "MB/s");
    for depth in [1, 16] {
        let (iops, _) = fio(uri, "randread", "4k", depth, size_mib, Some(secs))?;
        push(format!("4 KiB randread QD{depth}"), iops, "IOPS");
        let (iops, _) = fio(uri, "randwrite", "4k", depth, size_mib, Some(secs))?;
        push(format!("4 KiB randwrite QD{depth}"), iops, "IOPS");
    }
    Ok(())
}

pub async fn run(size_mib: u64, secs: u64) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    let work = tempfile::tempdir()?;

    // nbdkit on a local file: the limit.
    let local = work.path().join("local.raw");
    std::fs::File::create(&local)?.set_len(size_mib << 20)?;
    let sock = work.path().join("nbdkit.sock");
    let child = Command::new("nbdkit")
        .args(["-f", "--exit-with-parent", "-U"])
        .arg(&sock)
        .arg("file")
        .arg(&local)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| anyhow::anyhow!("nbdkit (package nbdkit): {e}"))?;
    let nbdkit = Killed(child);
    wait_socket(&sock)?;
    suite("nbdkit file", &format!("nbd+unix:///?socket={}", sock.display()), size_mib, secs, &mut rows)?;
    drop(nbdkit);

    // Locus: the export of a file with three replicas.
    let cluster = Cluster::start(ClusterOptions { chunk_bytes: 64 << 20, ..Default::default() }).await?;
    let cfg = cluster.write_cli_config("admin", None, 30_000);
    let locus = |args: &[&str]| -> anyhow::Result<()> {
        let out = Command::new(bin("locus")).arg("--config").arg(&cfg).args(args).output()?;
        anyhow::ensure!(out.status.success(), "locus {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    };
    locus(&["fs", "truncate", "/disk.raw", &format!("{size_mib}M")])?;
    // The export as it runs by default (holding the image's lease, reads
    // cached), then without its read cache: the replicas' own speed.
    for (target, sock, extra) in
        [("locus nbd", "locus.sock", &[][..]), ("locus nocache", "locus-nocache.sock", &["--cache-mib", "0"][..])]
    {
        let sock = work.path().join(sock);
        let child = Command::new(bin("locus"))
            .arg("--config")
            .arg(&cfg)
            .args(["nbd", "serve", "/disk.raw", "--unix"])
            .arg(&sock)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let mut server = Killed(child);
        wait_socket(&sock)?;
        suite(target, &format!("nbd+unix:///?socket={}", sock.display()), size_mib, secs, &mut rows)?;
        // SIGTERM: the export flushes and gives the lease back.
        let _ = Command::new("kill").arg(server.0.id().to_string()).status();
        let _ = server.0.wait();
    }
    Ok(rows)
}
