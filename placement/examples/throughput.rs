//! Decisions per second at the benchmark's scale: 10,000 hosts, a million
//! chunks. `cargo run --release -p placement --example throughput`.
//!
//! A quick check while developing; the benchmark of record lives in bench/.
//! The cluster is synthetic but shaped like a real one: 5 zones × 50 racks ×
//! 40 hosts, a chunk server on every host, 10,000 files of 100 chunks, the
//! first replica on the writer's host, the others in other racks.

use std::time::Instant;

use placement::*;

const ZONES: u64 = 5;
const RACKS_PER_ZONE: u64 = 50;
const HOSTS_PER_RACK: u64 = 40;
const FILES: u64 = 10_000;
const CHUNKS_PER_FILE: u64 = 100;
const IMAGES: u64 = 20;
const DECISIONS: u64 = 20_000;

/// A fixed-seed generator: the example is repeatable.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

fn main() -> Result<(), PlacementError> {
    let mut rng = Lcg(42);
    let hosts_total = ZONES * RACKS_PER_ZONE * HOSTS_PER_RACK;
    let topology = |id: u64| {
        let rack = id / HOSTS_PER_RACK;
        Topology::new(format!("z{}", rack / RACKS_PER_ZONE), format!("r{rack}"), format!("h{id}"))
    };
    let mut hosts = Vec::new();
    let mut storage = Vec::new();
    for id in 0..hosts_total {
        let cached_images = (0..IMAGES).filter(|_| rng.below(10) < 3).map(|i| format!("/img/{i}")).collect();
        hosts.push(VmHost {
            id,
            name: format!("h{id}"),
            topology: topology(id),
            vcpus: 64,
            mem_mb: 256 * 1024,
            used_vcpus: rng.below(48) as u32,
            used_mem_mb: rng.below(192 * 1024),
            healthy: rng.below(100) != 0,
            cached_images,
            groups: Default::default(),
        });
        storage.push(StorageNode { id, topology: topology(id), healthy: true });
    }
    let mut files = Vec::new();
    for f in 0..FILES + IMAGES {
        let home = rng.below(hosts_total);
        let chunks = (0..CHUNKS_PER_FILE)
            .map(|_| {
                let far = |rng: &mut Lcg| (home + HOSTS_PER_RACK * (1 + rng.below(200))) % hosts_total;
                ChunkLoc { bytes: 64 << 20, replicas: vec![home, far(&mut rng), far(&mut rng)] }
            })
            .collect();
        let path = if f < FILES { format!("/data/{f}") } else { format!("/img/{}", f - FILES) };
        files.push(FileLayout { path, chunks });
    }
    let view = ClusterView { hosts, storage, files };

    let started = Instant::now();
    let mut index = ClusterIndex::new(view)?;
    println!("index: {} hosts, {} chunks, built in {:?}", hosts_total, FILES * CHUNKS_PER_FILE, started.elapsed());

    let requests: Vec<VmRequest> = (0..DECISIONS)
        .map(|i| VmRequest {
            name: format!("vm{i}"),
            image: format!("/img/{}", rng.below(IMAGES)),
            datasets: vec![format!("/data/{}", rng.below(FILES))],
            vcpus: 1 + rng.below(4) as u32,
            mem_mb: 1024 * (1 + rng.below(8)),
            proximity: Level::ALL[rng.below(4) as usize],
            anti_affinity: (rng.below(2) == 0).then(|| format!("g{}", rng.below(100))),
            priority: 0,
            policy: DelayPolicy { max_wait_ms: 0, relax_to: Level::Any },
            waited_ms: 0,
        })
        .collect();

    for level in Level::ALL {
        let reqs: Vec<&VmRequest> = requests.iter().filter(|r| r.proximity == level).collect();
        let started = Instant::now();
        let mut placed = 0;
        for r in &reqs {
            placed += usize::from(index.place(r, Explain::Summary)?.outcome.host().is_some());
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "place, proximity {level}: {:.0} decisions/s ({placed}/{} placed)",
            reqs.len() as f64 / secs,
            reqs.len()
        );
    }

    let started = Instant::now();
    let results = index.place_many(&requests, Explain::Summary);
    let secs = started.elapsed().as_secs_f64();
    let placed = results.iter().filter(|r| r.as_ref().is_ok_and(|d| d.outcome.host().is_some())).count();
    println!("place_many: {:.0} decisions/s ({placed}/{} placed)", requests.len() as f64 / secs, requests.len());

    let started = Instant::now();
    let why = index.place(&requests[0], Explain::Full)?;
    println!("one Full explanation: {} notes in {:?}", why.candidates.len(), started.elapsed());
    Ok(())
}
