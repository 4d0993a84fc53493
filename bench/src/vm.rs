//! `locus-bench placement` and `locus-bench vm`.
//!
//! `placement`: the `placement` crate alone, in process: decisions per
//! second for VM requests (an image and two data sets each, proximity rack,
//! zone or any) on synthetic clusters of 1,000 and 10,000 hosts, each with a
//! chunk server on the same machine, and a million chunks of three replicas
//! in distinct racks. Reported: the index build, single decisions with a
//! summary explanation, and batches of 100 committed placements.
//!
//! `vm`: a real local cluster (3 meta nodes, 3 chunk servers, 3 VM hosts):
//! time from `vm apply` to the first VM running (process and qemu drivers),
//! time to start 100 clones of a cached master (process driver), and
//! failover time after kill -9 of a host agent (its VMs running again
//! elsewhere), for one VM and for a third of the 100.

use std::time::{Duration, Instant};

use fs_client::file::FileClient;
use fs_client::proto::*;
use fs_client::vm::*;
use fs_client::MetaClient;
use locus_tests::files::put;
use locus_tests::hosts::{vms, wait_vms, Hosts};
use locus_tests::{Cluster, ClusterOptions};
use placement::{
    ChunkLoc, ClusterIndex, ClusterView, DelayPolicy, Explain, FileLayout, StorageNode, Topology, VmHost,
    VmRequest as PRequest,
};
use rand::{Rng, SeedableRng};

use crate::data::Row;

fn push(rows: &mut Vec<Row>, target: &str, workload: String, value: f64, unit: &'static str) {
    let r = Row { target: target.into(), workload, value, unit };
    println!("{:<14} {:<58} {:>12.1} {}", r.target, r.workload, r.value, r.unit);
    rows.push(r);
}

/// A synthetic cluster: `hosts` machines (40 per rack, 10 racks per zone),
/// each a VM host and a chunk server; `chunks` chunks in files of 100.
/// File `f` lives in home rack `f % racks`: every chunk has a replica there,
/// one in another rack of the same zone and one anywhere (rack-aware
/// writers, as the metadata service places them).
fn synthetic(hosts: u64, chunks: u64, seed: u64) -> ClusterView {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let topo = |i: u64| Topology::new(format!("z{}", i / 400), format!("r{}", i / 40), format!("h{i}"));
    let vm_hosts = (0..hosts)
        .map(|i| VmHost {
            id: i,
            name: format!("h{i}"),
            topology: topo(i),
            vcpus: 64,
            mem_mb: 256 * 1024,
            used_vcpus: rng.gen_range(0..32),
            used_mem_mb: rng.gen_range(0..64 * 1024),
            healthy: rng.gen_range(0..100) > 0,
            cached_images: Default::default(),
            groups: Default::default(),
        })
        .collect();
    let storage = (0..hosts).map(|i| StorageNode { id: i, topology: topo(i), healthy: true }).collect();
    let racks = hosts.div_ceil(40);
    let in_rack = |r: u64, rng: &mut rand::rngs::StdRng| (r * 40 + rng.gen_range(0..40)).min(hosts - 1);
    let files = (0..chunks / 100)
        .map(|f| {
            let home = f % racks;
            let zone_first = home / 10 * 10;
            FileLayout {
                path: format!("/data/f{f}"),
                chunks: (0..100)
                    .map(|_| {
                        let mut other = zone_first + rng.gen_range(0..10);
                        if other == home || other >= racks {
                            other = if home == zone_first { home + 1 } else { zone_first };
                        }
                        let far = rng.gen_range(0..racks);
                        let mut rs = vec![in_rack(home, &mut rng)];
                        for r in [other.min(racks - 1), far] {
                            let h = in_rack(r, &mut rng);
                            if !rs.contains(&h) {
                                rs.push(h);
                            }
                        }
                        ChunkLoc { bytes: 64 << 20, replicas: rs }
                    })
                    .collect(),
            }
        })
        .collect();
    ClusterView { hosts: vm_hosts, storage, files }
}

/// Requests whose image and two data sets share a home rack; proximity
/// `level`, or the mix 60% rack, 30% zone, 10% any when `None`.
fn requests(n: usize, files: u64, racks: u64, level: Option<placement::Level>, seed: u64) -> Vec<PRequest> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let per_rack = (files / racks).max(1);
    (0..n)
        .map(|i| {
            let rack = rng.gen_range(0..racks.min(files));
            let mut file = || format!("/data/f{}", (rack + racks * rng.gen_range(0..per_rack)).min(files - 1));
            let (image, datasets) = (file(), vec![file(), file()]);
            let proximity = level.unwrap_or(match rng.gen_range(0..10) {
                0..=5 => placement::Level::Rack,
                6..=8 => placement::Level::Zone,
                _ => placement::Level::Any,
            });
            PRequest {
                name: format!("vm-{i}"),
                image,
                datasets,
                vcpus: rng.gen_range(1..=4),
                mem_mb: rng.gen_range(1..=8) * 512,
                proximity,
                anti_affinity: None,
                priority: 0,
                policy: DelayPolicy::default(),
                waited_ms: 0,
            }
        })
        .collect()
}

pub fn placement(hosts: &[u64], chunks: u64, decisions: usize) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for &h in hosts {
        let label = format!("{h} hosts, {}k chunks", chunks / 1000);
        let view = synthetic(h, chunks, 7);
        let racks = h.div_ceil(40);
        let t = Instant::now();
        let mut index = ClusterIndex::new(view)?;
        push(&mut rows, "placement", format!("index build ({label})"), t.elapsed().as_secs_f64() * 1000.0, "ms");
        let mixes = [
            (None, "mix 60% rack/30% zone/10% any"),
            (Some(placement::Level::Rack), "rack"),
            (Some(placement::Level::Zone), "zone"),
            (Some(placement::Level::Any), "any"),
        ];
        for (level, name) in mixes {
            let reqs = requests(decisions, chunks / 100, racks, level, 11);
            let t = Instant::now();
            let mut placed = 0;
            for r in &reqs {
                if index.place(r, Explain::Summary)?.outcome.host().is_some() {
                    placed += 1;
                }
            }
            let secs = t.elapsed().as_secs_f64();
            push(&mut rows, "placement", format!("decisions/s, {name} ({label})"), reqs.len() as f64 / secs, "/s");
            push(
                &mut rows,
                "placement",
                format!("placed, {name} ({label})"),
                placed as f64 * 100.0 / reqs.len() as f64,
                "%",
            );
        }
        let reqs = requests(decisions, chunks / 100, racks, None, 13);
        let t = Instant::now();
        let mut n = 0;
        for batch in reqs.chunks(100) {
            n += index.place_many(batch, Explain::Summary).len();
        }
        let secs = t.elapsed().as_secs_f64();
        push(
            &mut rows,
            "placement",
            format!("committed decisions/s, mix, batches of 100 ({label})"),
            n as f64 / secs,
            "/s",
        );
    }
    Ok(rows)
}

const APP: &str = "#!/bin/sh\nexec sleep 3600\n";

fn def(name: &str, instances: u32, extra: &str) -> anyhow::Result<ServiceDef> {
    let text = format!(
        "name = \"{name}\"\ndriver = \"process\"\nimage = \"/b/image\"\nvcpus = 1\nmemory_mib = 16\n\
         command = [\"/bin/sh\", \"{{mount}}/b/app.sh\"]\n[instances]\nmin = {instances}\nmax = {instances}\n{extra}"
    );
    ServiceDef::from_toml(&text).map_err(|e| anyhow::anyhow!("{}: {}", e.field, e.reason))
}

/// Applies a definition as `locus vm apply` does: the image's hash comes
/// from its `user.locus.blake3` xattr, computed once (before any timing).
async fn apply(c: &MetaClient, files: &FileClient, def: ServiceDef) -> anyhow::Result<()> {
    let (hash, bytes) = image_hash(files, &def.image).await?;
    c.vm(VmRequest::Op(VmOp::Apply { def: Box::new(def), image_blake3: hash, image_bytes: bytes })).await?;
    Ok(())
}

async fn image_hash(files: &FileClient, path: &str) -> anyhow::Result<(String, u64)> {
    fs_client::vmcli::image_hash(files, path).await.map_err(|e| anyhow::anyhow!("{}", e.message))
}

fn all_running(n: usize) -> impl Fn(&[VmInfo]) -> bool {
    move |v: &[VmInfo]| v.len() == n && v.iter().all(|v| v.status == VmStatus::Running)
}

const WAIT: Duration = Duration::from_secs(120);

pub async fn vm(runs: usize, clones: u32, qemu: bool) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    let cluster = Cluster::start(ClusterOptions { chunk_bytes: 64 << 20, ..Default::default() }).await?;
    let mut hosts = Hosts::start_with(&cluster, 3, 64, 64 * 1024).await?;
    let files = cluster.files();
    let c = cluster.client();
    c.op(MetaOp::Mkdir { parent: ROOT_INO, name: b"b".to_vec(), perm: 0o755, caller: Caller::ROOT }).await?;
    let image: Vec<u8> = (0..(64u32 << 20)).map(|i| (i % 251) as u8).collect();
    put(&files, "/b/image", &image, 0o644).await;
    put(&files, "/b/app.sh", APP.as_bytes(), 0o755).await;

    // apply -> first VM running, process driver. The first run also fills
    // the image caches of the hosts it lands on.
    image_hash(&files, "/b/image").await?;
    let mut firsts = Vec::new();
    for i in 0..runs {
        let name = format!("one{i}");
        let t = Instant::now();
        apply(&c, &files, def(&name, 1, "")?).await?;
        wait_vms(&c, &name, WAIT, "first VM", all_running(1)).await?;
        firsts.push(t.elapsed());
        c.vm(VmRequest::Op(VmOp::Remove { service: name })).await?;
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    push(
        &mut rows,
        "locus",
        "vm apply -> first VM running, process, first (image download)".into(),
        ms(firsts[0]),
        "ms",
    );
    let mut rest = firsts[1..].to_vec();
    rest.sort();
    if let Some(m) = rest.get(rest.len() / 2) {
        push(&mut rows, "locus", "vm apply -> first VM running, process, cached p50".into(), ms(*m), "ms");
    }

    // Warm every host's cache, then start the clones.
    apply(&c, &files, def("warm", 3, "[placement]\nanti_affinity = \"warm\"\n")?).await?;
    wait_vms(&c, "warm", WAIT, "warm-up", all_running(3)).await?;
    c.vm(VmRequest::Op(VmOp::Remove { service: "warm".into() })).await?;
    wait_vms(&c, "warm", WAIT, "warm-up removed", |v| v.is_empty()).await?;
    let t = Instant::now();
    apply(&c, &files, def("many", clones, "")?).await?;
    wait_vms(&c, "many", WAIT, "clones", all_running(clones as usize)).await?;
    push(&mut rows, "locus", format!("{clones} clones of a cached master running (process)"), ms(t.elapsed()), "ms");

    // Failover: kill -9 the agent of the host with the most clones.
    let v = vms(&c, "many").await?;
    let mut per_host: std::collections::BTreeMap<HostId, usize> = Default::default();
    for x in &v {
        *per_host.entry(x.host.unwrap_or(0)).or_default() += 1;
    }
    let (&victim, &n) = per_host.iter().max_by_key(|(_, n)| **n).ok_or_else(|| anyhow::anyhow!("no VMs"))?;
    let index = hosts.index_of(victim).await?;
    let t = Instant::now();
    hosts.node(index).kill_agent();
    wait_vms(&c, "many", WAIT, "failover", |v| {
        v.len() == clones as usize && v.iter().all(|v| v.status == VmStatus::Running && v.host != Some(victim))
    })
    .await?;
    push(&mut rows, "locus", format!("failover: {n} VMs of a killed host running elsewhere"), ms(t.elapsed()), "ms");
    c.vm(VmRequest::Op(VmOp::Remove { service: "many".into() })).await?;
    wait_vms(&c, "many", WAIT, "clones removed", |v| v.is_empty()).await?;
    hosts.node(index).destroy();
    hosts.node(index).restart()?;
    hosts.wait_up(3, Duration::from_secs(30)).await?;

    // Failover of one VM, several times.
    let mut times = Vec::new();
    for i in 0..runs.min(3) {
        let name = format!("fo{i}");
        apply(&c, &files, def(&name, 1, "")?).await?;
        let v = wait_vms(&c, &name, WAIT, "fo running", all_running(1)).await?;
        let h = v[0].host.unwrap_or(0);
        let index = hosts.index_of(h).await?;
        let t = Instant::now();
        hosts.node(index).kill_agent();
        wait_vms(&c, &name, WAIT, "fo moved", |v| all_running(1)(v) && v[0].host != Some(h)).await?;
        times.push(t.elapsed());
        c.vm(VmRequest::Op(VmOp::Remove { service: name })).await?;
        hosts.node(index).destroy();
        hosts.node(index).restart()?;
        hosts.wait_up(3, Duration::from_secs(30)).await?;
    }
    times.sort();
    push(
        &mut rows,
        "locus",
        "failover of one VM after kill -9 of its host, p50".into(),
        ms(times[times.len() / 2]),
        "ms",
    );
    push(
        &mut rows,
        "locus",
        "failover of one VM after kill -9 of its host, max".into(),
        ms(*times.last().unwrap_or(&Duration::ZERO)),
        "ms",
    );

    if qemu {
        let out =
            std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/test-kernel.sh")).output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let field = |k: &str| text.lines().find_map(|l| l.strip_prefix(k)).map(str::to_string);
        if let (Some(k), Some(i)) = (field("kernel="), field("initrd=")) {
            put(&files, "/b/vmlinuz", &std::fs::read(k)?, 0o644).await;
            put(&files, "/b/initrd", &std::fs::read(i)?, 0o644).await;
            let mut times = Vec::new();
            for r in 0..runs.min(3) {
                let name = format!("q{r}");
                let text = format!(
                    "name = \"{name}\"\ndriver = \"qemu\"\nimage = \"/b/image\"\nkernel = \"/b/vmlinuz\"\n\
                     initrd = \"/b/initrd\"\nappend = \"console=ttyS0 locus.sleep=30\"\nmemory_mib = 256\n"
                );
                let d = ServiceDef::from_toml(&text).map_err(|e| anyhow::anyhow!("{e}"))?;
                let t = Instant::now();
                apply(&c, &files, d).await?;
                wait_vms(&c, &name, WAIT, "qemu VM", all_running(1)).await?;
                times.push(t.elapsed());
                c.vm(VmRequest::Op(VmOp::Remove { service: name })).await?;
            }
            times.sort();
            push(
                &mut rows,
                "locus",
                "vm apply -> first VM running, qemu (TCG) p50".into(),
                ms(times[times.len() / 2]),
                "ms",
            );
        }
    }
    Ok(rows)
}
