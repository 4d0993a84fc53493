//! `locus vm ...` and `locus host ...`: services, VMs and hosts.

use std::collections::BTreeMap;
use std::path::PathBuf;

use bytes::Bytes;
use clap::Subcommand;

use crate::cli::{print_json, CliError, CliResult};
use crate::client::MetaClient;
use crate::file::FileClient;
use crate::proto::*;
use crate::vm::*;

#[derive(Subcommand)]
pub enum VmCmd {
    /// Define or update a service from a TOML file (see the README).
    Apply { file: PathBuf },
    /// List VMs.
    Ls {
        /// Only this service's.
        #[arg(long)]
        service: Option<String>,
    },
    /// List services.
    Services,
    /// Show a VM: status, host, epoch, recent events.
    Show { vm: String },
    /// Why a VM runs where it runs: the placement explanation, host by host.
    Why { vm: String },
    /// Stop a VM, or every VM of a service (they keep their state).
    Stop { target: String },
    /// Start a stopped VM, or every VM of a service.
    Start { target: String },
    /// Remove a service and its VMs (their state in Locus stays).
    Rm { service: String },
    /// Checkpoint a running qemu VM: its memory and devices and a snapshot
    /// of its disk layer, taken at one instant, into Locus.
    Checkpoint {
        vm: String,
        /// How long to wait for the host to write it.
        #[arg(long, default_value_t = 300)]
        wait_s: u64,
    },
    /// Print a VM's console output, as its host copied it into Locus.
    Logs {
        vm: String,
        /// The workload's stderr (process driver) or qemu's messages.
        #[arg(long)]
        stderr: bool,
    },
}

#[derive(Subcommand)]
pub enum HostCmd {
    /// List VM hosts: labels, lease, capacity in use.
    Ls,
    /// Move every VM off a host and place no new ones there.
    Drain {
        /// Host id or name.
        host: String,
        /// Take the host back into service.
        #[arg(long)]
        undo: bool,
    },
}

async fn vm_call(c: &MetaClient, req: VmRequest, what: &str) -> CliResult<VmReply> {
    c.vm(req).await.map_err(|e| CliError::from_client(what, e))
}

async fn read(c: &MetaClient, r: VmRead, what: &str) -> CliResult<VmReply> {
    vm_call(c, VmRequest::Read(r), what).await
}

async fn hosts(c: &MetaClient) -> CliResult<Vec<HostInfo>> {
    match read(c, VmRead::Hosts, "hosts").await? {
        VmReply::Hosts(h) => Ok(h),
        other => Err(CliError::unexpected(&other)),
    }
}

async fn vms(c: &MetaClient, service: Option<String>) -> CliResult<Vec<VmInfo>> {
    match read(c, VmRead::Vms { service }, "vms").await? {
        VmReply::Vms(v) => Ok(v),
        other => Err(CliError::unexpected(&other)),
    }
}

/// The blake3 of a file in Locus, cached in an xattr with the size and
/// mtime it was computed for (so an unchanged image is not read again).
pub async fn image_hash(files: &FileClient, path: &str) -> CliResult<(String, u64)> {
    const XATTR: &[u8] = b"user.locus.blake3";
    let c = files.meta();
    let attr =
        c.resolve(path.as_bytes(), true).await.map_err(|e| CliError::from_client(&format!("image: {path}"), e))?;
    if attr.kind != FileKind::File {
        return Err(CliError::invalid(format!("image: {path} is not a regular file")));
    }
    let stamp = format!("{} {}.{:09}", attr.size, attr.mtime.secs, attr.mtime.nanos);
    if let Ok(ReadReply::Xattr(v)) = c.read(MetaRead::GetXattr { ino: attr.ino, name: XATTR.to_vec() }).await {
        let v = String::from_utf8_lossy(&v).into_owned();
        if let Some((hash, rest)) = v.split_once(' ') {
            if rest == stamp && hash.len() == 64 {
                return Ok((hash.to_string(), attr.size));
            }
        }
    }
    let mut hasher = blake3::Hasher::new();
    let mut off = 0u64;
    const PIECE: u64 = 8 << 20;
    while off < attr.size {
        let data = files
            .read(attr.ino, off, PIECE.min(attr.size - off))
            .await
            .map_err(|e| CliError::from_client(&format!("read {path}"), e))?;
        if data.is_empty() {
            break;
        }
        hasher.update(&data);
        off += data.len() as u64;
    }
    let hash = hasher.finalize().to_hex().to_string();
    let value = format!("{hash} {stamp}").into_bytes();
    // Best effort: without it the next apply hashes again.
    let _ = c.op(MetaOp::SetXattr { ino: attr.ino, name: XATTR.to_vec(), value, flags: 0 }).await;
    Ok((hash, attr.size))
}

fn short(t: Timespec) -> String {
    let now = Timespec::now();
    let s = (now.as_nanos() - t.as_nanos()) / 1_000_000_000;
    match s {
        s if s < 0 => "now".into(),
        s if s < 120 => format!("{s}s ago"),
        s if s < 7200 => format!("{}m ago", s / 60),
        s => format!("{}h ago", s / 3600),
    }
}

fn host_label(hosts: &BTreeMap<HostId, HostInfo>, id: Option<HostId>) -> String {
    match id {
        None => "-".into(),
        Some(id) => hosts.get(&id).map(|h| format!("{} ({id})", h.name)).unwrap_or_else(|| format!("host {id}")),
    }
}

pub async fn vm(c: &MetaClient, files: &FileClient, cmd: VmCmd, json: bool) -> CliResult {
    match cmd {
        VmCmd::Apply { file } => {
            let text =
                std::fs::read_to_string(&file).map_err(|e| CliError::invalid(format!("{}: {e}", file.display())))?;
            let def = ServiceDef::from_toml(&text)
                .map_err(|e| CliError::invalid(format!("{}: {}: {}", file.display(), e.field, e.reason)))?;
            let (image_blake3, image_bytes) = image_hash(files, &def.image).await?;
            let name = def.name.clone();
            let r = vm_call(c, VmRequest::Op(VmOp::Apply { def: Box::new(def), image_blake3, image_bytes }), "apply")
                .await?;
            match r {
                VmReply::Applied { service, generation, changed } => {
                    if json {
                        print_json(
                            &serde_json::json!({"service": service, "generation": generation, "changed": changed}),
                        );
                    } else if changed {
                        println!("service {service} applied (generation {generation})");
                    } else {
                        println!("service {service} unchanged (generation {generation})");
                    }
                    Ok(())
                }
                other => Err(CliError::unexpected(&format!("{name}: {other:?}"))),
            }
        }
        VmCmd::Services => {
            let VmReply::Services(s) = read(c, VmRead::Services, "services").await? else {
                return Err(CliError::usage("unexpected reply"));
            };
            if json {
                print_json(&s);
                return Ok(());
            }
            println!(
                "{:<20} {:<8} {:>4} {:>9} {:<10} {:<30}",
                "service", "driver", "gen", "instances", "proximity", "image"
            );
            for s in s {
                let n = &s.def.instances;
                println!(
                    "{:<20} {:<8} {:>4} {:>9} {:<10} {:<30}",
                    s.def.name,
                    s.def.driver.as_str(),
                    s.generation,
                    format!("{} ({}-{})", s.desired, n.min, n.max),
                    s.def.placement.proximity.as_str(),
                    s.def.image
                );
            }
            Ok(())
        }
        VmCmd::Ls { service } => {
            let list = vms(c, service).await?;
            if json {
                print_json(&list);
                return Ok(());
            }
            let hosts: BTreeMap<HostId, HostInfo> = hosts(c).await?.into_iter().map(|h| (h.id, h)).collect();
            println!("{:<24} {:<12} {:<16} {:>5} {:>8} {:<10}", "vm", "status", "host", "epoch", "restarts", "since");
            for v in list {
                println!(
                    "{:<24} {:<12} {:<16} {:>5} {:>8} {:<10}",
                    v.id,
                    v.status.word(),
                    host_label(&hosts, v.host),
                    v.epoch,
                    v.restarts,
                    short(v.since)
                );
            }
            Ok(())
        }
        VmCmd::Show { vm } => {
            let r = read(c, VmRead::Vm { id: vm.clone() }, &vm).await?;
            let VmReply::Vm { vm: v, service, host, vm_root } = r else { return Err(CliError::unexpected(&r)) };
            if json {
                print_json(&serde_json::json!({"vm": v, "service": service, "host": host, "vm_root": vm_root}));
                return Ok(());
            }
            println!("vm:        {}", v.id);
            println!("service:   {} (instance {})", v.service, v.index);
            println!("status:    {} (since {})", v.status, short(v.since));
            println!(
                "wanted:    {}",
                if v.removing {
                    "removing"
                } else if v.want_running {
                    "running"
                } else {
                    "stopped"
                }
            );
            match &host {
                Some(h) => println!(
                    "host:      {} (id {}, {}/{}/{})",
                    h.name, h.id, h.topology.zone, h.topology.rack, h.topology.host
                ),
                None => println!("host:      -"),
            }
            println!("epoch:     {}  restarts: {}", v.epoch, v.restarts);
            println!("state:     {vm_root}/{}/{} in Locus", v.service, v.id);
            if let Some(p) = &v.last_placement {
                println!("placed:    {} ({})", short(p.at), p.cause);
            }
            if let Some(ck) = &v.last_checkpoint {
                println!("checkpoint: {} ({}): {} and {}", ck.n, short(ck.at), ck.memory, ck.disk);
            }
            println!("events:");
            for (t, e) in &v.events {
                println!("  {:<10} {e}", short(*t));
            }
            Ok(())
        }
        VmCmd::Why { vm } => {
            let r = read(c, VmRead::Vm { id: vm.clone() }, &vm).await?;
            let VmReply::Vm { vm: v, .. } = r else { return Err(CliError::unexpected(&r)) };
            let Some(p) = v.last_placement.clone() else {
                if json {
                    print_json(&serde_json::json!({"vm": v.id, "status": v.status, "placement": null}));
                } else {
                    println!("{} has not been placed: {}", v.id, v.status);
                }
                return Ok(());
            };
            if json {
                print_json(&p);
                return Ok(());
            }
            print_why(&v, &p);
            Ok(())
        }
        VmCmd::Stop { target } | VmCmd::Start { target } if target.is_empty() => {
            Err(CliError::usage("name a VM or a service"))
        }
        VmCmd::Stop { target } => set_running(c, target, false, json).await,
        VmCmd::Start { target } => set_running(c, target, true, json).await,
        VmCmd::Rm { service } => {
            vm_call(c, VmRequest::Op(VmOp::Remove { service: service.clone() }), &service).await?;
            if json {
                print_json(&serde_json::json!({"removed": service}));
            } else {
                println!("service {service} removed; its VMs stop and go (their state stays in Locus)");
            }
            Ok(())
        }
        VmCmd::Checkpoint { vm, wait_s } => {
            let r = vm_call(c, VmRequest::Op(VmOp::Checkpoint { vm: vm.clone() }), &vm).await?;
            let VmReply::Checkpoint { n } = r else { return Err(CliError::unexpected(&r)) };
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(wait_s);
            loop {
                let r = read(c, VmRead::Vm { id: vm.clone() }, &vm).await?;
                let VmReply::Vm { vm: v, .. } = r else { return Err(CliError::unexpected(&r)) };
                if let Some(ck) = v.last_checkpoint.filter(|ck| ck.n >= n) {
                    if json {
                        print_json(&ck);
                    } else {
                        println!(
                            "checkpoint {} of {vm}: memory {} ({} MiB), disk {}",
                            ck.n,
                            ck.memory,
                            ck.memory_bytes >> 20,
                            ck.disk
                        );
                    }
                    return Ok(());
                }
                if std::time::Instant::now() > deadline {
                    return Err(CliError {
                        exit: 3,
                        code: Some(ErrorCode::Timeout),
                        message: format!("checkpoint {n} of {vm} not written after {wait_s} s"),
                    });
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
        VmCmd::Logs { vm, stderr } => {
            let r = read(c, VmRead::Vm { id: vm.clone() }, &vm).await?;
            let VmReply::Vm { vm: v, vm_root, .. } = r else { return Err(CliError::unexpected(&r)) };
            let dir = format!("{}/logs", vm_dir(&vm_root, &v.service, &v.id));
            let kind = if stderr { "stderr" } else { "console" };
            let d = c.resolve(dir.as_bytes(), true).await.map_err(|e| CliError::from_client(&dir, e))?;
            let entries = c.readdir_all(d.ino).await.map_err(|e| CliError::from_client(&dir, e))?;
            // <host>-epoch<N>.<kind>.log: the newest epoch is the current run.
            let newest = entries
                .iter()
                .filter_map(|e| {
                    let name = String::from_utf8_lossy(&e.name).into_owned();
                    let stem = name.strip_suffix(&format!(".{kind}.log"))?.to_string();
                    let epoch: u64 = stem.rsplit_once("-epoch")?.1.parse().ok()?;
                    Some((epoch, name, e.ino))
                })
                .max();
            let Some((_, name, ino)) = newest else {
                return Err(CliError::not_found(format!("no {kind} log for {vm} in {dir} yet")));
            };
            let size = files.size(ino).await.map_err(|e| CliError::from_client(&name, e))?;
            let data: Bytes = files.read(ino, 0, size).await.map_err(|e| CliError::from_client(&name, e))?;
            use std::io::Write;
            let _ = std::io::stdout().write_all(&data);
            Ok(())
        }
    }
}

async fn set_running(c: &MetaClient, target: String, running: bool, json: bool) -> CliResult {
    vm_call(c, VmRequest::Op(VmOp::SetRunning { target: target.clone(), running }), &target).await?;
    if json {
        print_json(&serde_json::json!({"target": target, "running": running}));
    } else {
        println!("{target}: {}", if running { "start requested" } else { "stop requested" });
    }
    Ok(())
}

fn mib(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.1}G", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.0}M", b as f64 / (1u64 << 20) as f64)
    }
}

/// The placement explanation as a table.
pub fn print_why(v: &VmInfo, p: &PlacementRecord) {
    let d = &p.decision;
    let name = |id: &u64| {
        d.candidates.iter().find(|c| c.host == *id).map(|c| format!("{} ({id})", c.name)).unwrap_or(id.to_string())
    };
    let outcome = match &d.outcome {
        placement::VmOutcome::Placed { host, relaxed_to: None } => format!("placed on {}", name(host)),
        placement::VmOutcome::Placed { host, relaxed_to: Some(l) } => {
            format!("placed on {} after relaxing to {l} level", name(host))
        }
        placement::VmOutcome::Wait { reason, .. } => format!("waiting: {reason}"),
        placement::VmOutcome::Unplaceable { reason } => format!("unplaceable: {reason}"),
    };
    println!("{}: {outcome} ({}, {})", v.id, p.cause, short(p.at));
    for a in &d.attempts {
        let c = &a.counts;
        println!(
            "  at {} level: {} qualified, {} too far from the data, {} unhealthy, {} short of cpu, {} short of memory, {} anti-affinity",
            a.level, c.qualified, c.too_far, c.unhealthy, c.no_cpu, c.no_memory, c.anti_affinity
        );
    }
    println!(
        "{:<3} {:<14} {:>8} {:>8} {:>8} {:>8} {:<7} {:<20} {:>6} {:>8} {:>9}  why not",
        "", "host", "on host", "in rack", "in zone", "remote", "image", "data on servers", "cpu", "mem MiB", "score"
    );
    for n in &d.candidates {
        let holders: Vec<String> =
            n.holders.iter().map(|h| format!("{}@{}:{}", h.server, h.distance, mib(h.bytes))).collect();
        let why = match &n.rejection {
            None => String::new(),
            Some(placement::VmRejection::Unhealthy) => "host down, draining or unreachable".into(),
            Some(placement::VmRejection::TooFar { level, portion, missing_chunks, missing_bytes }) => format!(
                "{} chunk {} (and {} more chunks, {}) not within {level}",
                portion.path,
                portion.chunk_index,
                missing_chunks.saturating_sub(1),
                mib(*missing_bytes)
            ),
            Some(placement::VmRejection::NoCpu { free_vcpus, needed_vcpus }) => {
                format!("{free_vcpus} vcpus free, needs {needed_vcpus}")
            }
            Some(placement::VmRejection::NoMemory { free_mem_mb, needed_mem_mb }) => {
                format!("{free_mem_mb} MiB free, needs {needed_mem_mb}")
            }
            Some(placement::VmRejection::AntiAffinity { group, count }) => {
                format!("{count} VM(s) of group {group} already there")
            }
        };
        println!(
            "{:<3} {:<14} {:>8} {:>8} {:>8} {:>8} {:<7} {:<20} {:>6} {:>8} {:>9}  {why}",
            if n.chosen { "->" } else { "" },
            format!("{} ({})", n.name, n.host),
            mib(n.data.host_bytes),
            mib(n.data.rack_bytes),
            mib(n.data.zone_bytes),
            mib(n.data.remote_bytes + n.data.unavailable_bytes),
            if n.image.cached { "cached" } else { "fetch" },
            if holders.is_empty() { "-".to_string() } else { holders.join(",") },
            n.fit.vcpus_after,
            n.fit.mem_mb_after,
            n.score.as_ref().map(|s| s.total.to_string()).unwrap_or_else(|| "-".into()),
        );
    }
}

pub async fn host(c: &MetaClient, cmd: HostCmd, json: bool) -> CliResult {
    match cmd {
        HostCmd::Ls => {
            let list = hosts(c).await?;
            let all = vms(c, None).await?;
            if json {
                print_json(&list);
                return Ok(());
            }
            println!(
                "{:>4}  {:<12} {:<14} {:<6} {:<9} {:>5}",
                "id", "name", "zone/rack/host", "lease", "draining", "vms"
            );
            for h in list {
                let n = all.iter().filter(|v| v.host == Some(h.id)).count();
                println!(
                    "{:>4}  {:<12} {:<14} {:<6} {:<9} {:>5}",
                    h.id,
                    h.name,
                    h.topology.to_string(),
                    if h.up { "up" } else { "LOST" },
                    if h.draining { "yes" } else { "no" },
                    n
                );
            }
            Ok(())
        }
        HostCmd::Drain { host, undo } => {
            let list = hosts(c).await?;
            let Some(h) = list.iter().find(|h| h.name == host || h.id.to_string() == host) else {
                return Err(CliError::not_found(format!("no host {host:?} (see `locus host ls`)")));
            };
            vm_call(c, VmRequest::Op(VmOp::Drain { host: h.id, drain: !undo }), &host).await?;
            if json {
                print_json(&serde_json::json!({"host": h.id, "draining": !undo}));
            } else if undo {
                println!("host {} ({}) takes VMs again", h.name, h.id);
            } else {
                println!("host {} ({}) draining: its VMs move to other hosts", h.name, h.id);
            }
            Ok(())
        }
    }
}
