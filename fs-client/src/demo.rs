//! `locus demo`: the main job, end to end, on the local cluster of
//! `locus up` (started first if it is not running).
//!
//! 1. Upload a master image, a program and a data set (two copies, in two
//!    racks).
//! 2. Define a service of two VMs that must run in a rack holding the data.
//! 3. Show where each VM went and why.
//! 4. Watch the VMs work: each reads the data set through Locus and keeps a
//!    durable log of its progress in its own directory in Locus.
//! 5. Kill a machine (its VM host agent and chunk server, kill -9).
//! 6. Show its VM running again on a host that holds a surviving replica,
//!    every acknowledged line of its log intact, and the lost replica
//!    repaired.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Args;

use crate::chunk::ChunkClient;
use crate::client::MetaClient;
use crate::config::{default_data_dir, ClientConfig};
use crate::file::FileClient;
use crate::proto::*;
use crate::vm::*;

#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// The local cluster's data directory (default ~/.locus).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Leave the killed machine down at the end.
    #[arg(long)]
    pub leave_down: bool,
}

/// How long the demo waits for any one step.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

const SCRIPT: &str = r#"#!/bin/sh
# A data-set job: count the events in its data set (read through Locus),
# then keep a durable log of its progress in its own directory in Locus.
set -eu
events=$(wc -l < "$LOCUS_DATASET_0")
image=$(head -c 22 "$LOCUS_IMAGE")
state="$LOCUS_VM_DIR/state.log"
n=$(cat "$state" 2>/dev/null | wc -l)
echo "$LOCUS_HOSTNAME on $LOCUS_HOST_NAME: image '$image', $events events"
while true; do
  n=$((n + 1))
  echo "tick $n on $LOCUS_HOST_NAME: $events events" >> "$state"
  sync "$state"
  echo "load 0.5" > "$LOCUS_METRICS"
  sleep 0.5
done
"#;

fn say(step: &str) {
    println!("\n\x1b[1m== {step}\x1b[0m");
}

pub async fn run(args: DemoArgs, config: Option<PathBuf>) -> anyhow::Result<()> {
    let dir = args.data_dir.clone().unwrap_or_else(default_data_dir);
    let cfg_path = config.unwrap_or_else(|| dir.join("client.toml"));
    let reachable = match ClientConfig::load(&cfg_path) {
        Ok(cfg) => match MetaClient::new(&cfg) {
            Ok(c) => matches!(
                tokio::time::timeout(Duration::from_secs(5), c.vm(VmRequest::Read(VmRead::Hosts))).await,
                Ok(Ok(VmReply::Hosts(h))) if h.iter().filter(|h| h.up).count() >= 2
            ),
            Err(_) => false,
        },
        Err(_) => false,
    };
    if !reachable {
        say("0. Starting a local cluster (locus up)");
        crate::up::up(crate::up::UpArgs { data_dir: Some(dir.clone()), ..Default::default() }, false).await?;
    }
    let cfg = ClientConfig::load(&cfg_path).context("load the client configuration")?;
    let meta = MetaClient::new(&cfg)?;
    let files = FileClient::new(meta.clone(), ChunkClient::for_config(&cfg)?, None);

    say("1. Upload a master image, a program and a data set");
    let root = mkdirs(&meta, "/demo").await?;
    for d in ["images", "apps", "data"] {
        mkdir(&meta, root, d).await?;
    }
    let data_dir = meta.resolve(b"/demo/data", true).await?;
    // Two copies in distinct racks: only two of the three racks hold it.
    meta.op(MetaOp::SetGoal { ino: data_dir.ino, goal: Goal { copies: 2, level: Level::Rack } }).await?;
    let mut image = b"LOCUS DEMO MASTER v1.0\n".to_vec();
    image.resize(8 << 20, 0);
    put(&files, "/demo/images/app.img", &image, 0o644).await?;
    put(&files, "/demo/apps/count.sh", SCRIPT.as_bytes(), 0o755).await?;
    let mut events = String::new();
    for i in 0..200_000u32 {
        events.push_str(&format!("{i},sensor-{},{}\n", i % 97, (i * 7919) % 1000));
    }
    put(&files, "/demo/data/events.csv", events.as_bytes(), 0o644).await?;
    println!("  /demo/images/app.img   8 MiB master image (3 copies)");
    println!("  /demo/apps/count.sh    the program the VMs run");
    println!("  /demo/data/events.csv  {} KiB data set, 2 copies in distinct racks:", events.len() / 1024);
    let holders = replica_hosts(&meta, "/demo/data/events.csv").await?;
    for (server, host) in &holders {
        println!("    chunk server {server} on {host}");
    }

    say("2. Define the service: 2 VMs, each in a rack that holds the data set");
    let toml = r#"name = "analytics"
driver = "process"
image = "/demo/images/app.img"
datasets = ["/demo/data/events.csv"]
vcpus = 2
memory_mib = 512
command = ["/bin/sh", "{mount}/demo/apps/count.sh"]

[placement]
proximity = "rack"

[instances]
min = 2
max = 4

[customize]
hostname = "analytics-{index}"
"#;
    println!("{}", toml.lines().map(|l| format!("  | {l}")).collect::<Vec<_>>().join("\n"));
    let def = ServiceDef::from_toml(toml).map_err(|e| anyhow::anyhow!("{}: {}", e.field, e.reason))?;
    let (hash, bytes) =
        crate::vmcli::image_hash(&files, &def.image).await.map_err(|e| anyhow::anyhow!("{}", e.message))?;
    meta.vm(VmRequest::Op(VmOp::Apply { def: Box::new(def), image_blake3: hash, image_bytes: bytes })).await?;
    let started = Instant::now();
    let running = wait_running(&meta, "analytics", 2, None).await?;
    println!("  both VMs running {:.1} s after apply", started.elapsed().as_secs_f64());

    say("3. Where each VM went, and why");
    let hosts = host_names(&meta).await?;
    for v in &running {
        let host = v.host.and_then(|h| hosts.get(&h)).cloned().unwrap_or_default();
        println!("  {} runs on {host}", v.id);
    }
    for v in &running {
        println!();
        if let Some(p) = &v.last_placement {
            crate::vmcli::print_why(v, p);
        }
    }

    say("4. The VMs work: they read the data set and log their progress durably in Locus");
    for v in &running {
        let path = state_log(&v.id);
        let deadline = Instant::now() + STEP_TIMEOUT;
        while read_text(&files, &path).await.map(|t| t.lines().count()).unwrap_or(0) < 5 {
            if Instant::now() > deadline {
                bail!("{} logged fewer than 5 lines in {STEP_TIMEOUT:?}", v.id);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let victim = running[0].clone();
    let log_path = state_log(&victim.id);
    let before = read_text(&files, &log_path).await?;
    for v in &running {
        let text = read_text(&files, &state_log(&v.id)).await?;
        println!("  {}: {} lines, last: {}", v.id, text.lines().count(), text.lines().last().unwrap_or("-"));
    }

    let victim_host = victim.host.context("the VM has no host")?;
    let host_name = hosts.get(&victim_host).cloned().unwrap_or_default();
    let machine = host_name.trim_start_matches("host-").to_string();
    say(&format!("5. Kill machine {machine}: kill -9 {host_name} (VM host agent) and chunk-{machine}"));
    let acked = before.lines().count();
    println!("  {} has {acked} acknowledged (fsynced) lines in {log_path}", victim.id);
    let killed_at = Instant::now();
    for name in [format!("host-{machine}"), format!("chunk-{machine}")] {
        kill9(&dir, &name)?;
        println!("  killed {name}");
    }

    say(&format!("6. {} runs again elsewhere, with its data", victim.id));
    let again = wait_running(&meta, "analytics", 2, Some((&victim.id, victim_host))).await?;
    let moved = again.iter().find(|v| v.id == victim.id).context("the VM is gone")?;
    let new_host = moved.host.and_then(|h| hosts.get(&h)).cloned().unwrap_or_default();
    println!(
        "  {} running on {new_host} {:.1} s after the kill (epoch {}, restarts {})",
        moved.id,
        killed_at.elapsed().as_secs_f64(),
        moved.epoch,
        moved.restarts
    );
    if let Some(p) = &moved.last_placement {
        crate::vmcli::print_why(moved, p);
    }
    // The new run logs from where the old one stopped.
    let deadline = Instant::now() + STEP_TIMEOUT;
    let mut after = read_text(&files, &log_path).await?;
    while after.lines().count() < acked + 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        after = read_text(&files, &log_path).await?;
    }
    let kept = after.lines().take(acked).eq(before.lines());
    let new_lines: Vec<&str> = after.lines().skip(acked).collect();
    if !kept {
        bail!("the log lost acknowledged lines: before {acked} lines, now {}", after.lines().count());
    }
    println!("  all {acked} acknowledged lines intact; {} new lines since, e.g.:", new_lines.len());
    for l in new_lines.iter().rev().take(2).rev() {
        println!("    {l}");
    }

    say("7. The lost copy of the data set is rebuilt (its VM's chunks first)");
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let h = match meta.read(MetaRead::Health).await? {
            ReadReply::Health(h) => h,
            other => bail!("unexpected reply {other:?}"),
        };
        let holders = replica_hosts(&meta, "/demo/data/events.csv").await?;
        let alive: Vec<u64> = h.servers.iter().filter(|s| s.alive).map(|s| s.id).collect();
        let good = holders.iter().filter(|(s, _)| alive.contains(s)).count();
        // Three-copy files cannot be whole again with two racks left; the
        // data set (two copies) can.
        if good >= 2 {
            println!(
                "  data set copies now on: {}",
                holders.iter().map(|(_, h)| h.as_str()).collect::<Vec<_>>().join(", ")
            );
            break;
        }
        if Instant::now() > deadline {
            println!(
                "  repair still running ({} chunks under-replicated); see `locus cluster health`",
                h.under_replicated
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    if !args.leave_down {
        say(&format!("8. Machine {machine} comes back (locus up restarts what is missing)"));
        crate::up::up(crate::up::UpArgs { data_dir: Some(dir.clone()), ..Default::default() }, false).await?;
    }
    println!("\nTry: locus vm ls; locus vm why {}; locus vm logs {}; locus host ls; locus down", victim.id, victim.id);
    Ok(())
}

async fn mkdir(meta: &MetaClient, parent: Ino, name: &str) -> anyhow::Result<Ino> {
    let op = MetaOp::Mkdir { parent, name: name.as_bytes().to_vec(), perm: 0o755, caller: Caller::ROOT };
    match meta.op_attr(op).await {
        Ok(a) => Ok(a.ino),
        Err(e) if e.code() == ErrorCode::Exists => Ok(meta.lookup(parent, name.as_bytes()).await?.ino),
        Err(e) => Err(e.into()),
    }
}

async fn mkdirs(meta: &MetaClient, path: &str) -> anyhow::Result<Ino> {
    let mut ino = ROOT_INO;
    for part in path.split('/').filter(|p| !p.is_empty()) {
        ino = mkdir(meta, ino, part).await?;
    }
    Ok(ino)
}

async fn put(files: &FileClient, path: &str, data: &[u8], perm: u32) -> anyhow::Result<()> {
    let meta = files.meta();
    let (parent, name) = path.rsplit_once('/').context("absolute path")?;
    let p = meta.resolve(parent.as_bytes(), true).await?;
    let op =
        MetaOp::Create { parent: p.ino, name: name.as_bytes().to_vec(), perm, caller: Caller::ROOT, exclusive: false };
    let a = meta.op_attr(op).await?;
    if a.size > 0 {
        files.truncate(a.ino, 0).await?;
    }
    let mut off = 0usize;
    while off < data.len() {
        let end = (off + (4 << 20)).min(data.len());
        files.write(a.ino, off as u64, Bytes::copy_from_slice(&data[off..end])).await?;
        off = end;
    }
    files.fsync(a.ino).await?;
    Ok(())
}

/// The progress log a demo VM keeps in its directory in Locus.
fn state_log(vm: &str) -> String {
    format!("{}/state.log", vm_dir(DEFAULT_VM_ROOT, "analytics", vm))
}

async fn read_text(files: &FileClient, path: &str) -> anyhow::Result<String> {
    let a = files.meta().resolve(path.as_bytes(), true).await.with_context(|| format!("resolve {path}"))?;
    files.invalidate(a.ino);
    let size = files.size(a.ino).await?;
    let data = files.read(a.ino, 0, size).await?;
    Ok(String::from_utf8_lossy(&data).into_owned())
}

async fn host_names(meta: &MetaClient) -> anyhow::Result<std::collections::BTreeMap<HostId, String>> {
    match meta.vm(VmRequest::Read(VmRead::Hosts)).await? {
        VmReply::Hosts(h) => Ok(h.into_iter().map(|h| (h.id, h.name)).collect()),
        other => bail!("unexpected reply {other:?}"),
    }
}

/// (chunk server, its host label) of each replica of a file's first chunk.
async fn replica_hosts(meta: &MetaClient, path: &str) -> anyhow::Result<Vec<(u64, String)>> {
    let a = meta.resolve(path.as_bytes(), true).await?;
    let layout = match meta.read(MetaRead::Layout { ino: a.ino, first: 0, count: 1 }).await? {
        ReadReply::Layout(l) => l,
        other => bail!("unexpected reply {other:?}"),
    };
    Ok(layout
        .chunks
        .first()
        .map(|c| c.replicas.iter().map(|r| (r.server, r.topology.host.clone())).collect())
        .unwrap_or_default())
}

/// Waits until `n` VMs of `service` run, none of them (when given) the VM
/// `moved.0` on host `moved.1`.
async fn wait_running(
    meta: &MetaClient,
    service: &str,
    n: usize,
    moved: Option<(&str, HostId)>,
) -> anyhow::Result<Vec<VmInfo>> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    let mut last = String::new();
    loop {
        if let VmReply::Vms(vms) = meta.vm(VmRequest::Read(VmRead::Vms { service: Some(service.into()) })).await? {
            let ok: Vec<VmInfo> = vms
                .iter()
                .filter(|v| v.status == VmStatus::Running)
                .filter(|v| moved.is_none_or(|(id, h)| v.id != id || v.host != Some(h)))
                .cloned()
                .collect();
            if ok.len() >= n {
                return Ok(ok);
            }
            let now: Vec<String> = vms.iter().map(|v| format!("{} {}", v.id, v.status)).collect();
            let now = now.join(", ");
            if now != last {
                println!("  ... {now}");
                last = now;
            }
        }
        if Instant::now() > deadline {
            bail!("VMs of {service} not running after {STEP_TIMEOUT:?}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn kill9(dir: &std::path::Path, name: &str) -> anyhow::Result<()> {
    let pid_file = dir.join("run").join(format!("{name}.pid"));
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .with_context(|| format!("read {}", pid_file.display()))?
        .trim()
        .parse()
        .with_context(|| format!("parse {}", pid_file.display()))?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL)
        .with_context(|| format!("kill {name} ({pid})"))?;
    Ok(())
}
