//! Unit tests for VM placement: qualification, capacity, anti-affinity,
//! delay and relaxation, scoring, explanations.

use super::*;
use crate::FileField;

const CHUNK_BYTES: u64 = 64 << 20;

/// VM host `id` on machine `h{id}`; storage node `id` (if any) shares it.
fn host(id: u64, zone: &str, rack: &str) -> VmHost {
    VmHost {
        id,
        name: format!("h{id}"),
        topology: Topology::new(zone, rack, format!("h{id}")),
        vcpus: 8,
        mem_mb: 16_384,
        used_vcpus: 0,
        used_mem_mb: 0,
        healthy: true,
        cached_images: BTreeSet::new(),
        groups: BTreeMap::new(),
    }
}

fn node(id: u64, zone: &str, rack: &str) -> StorageNode {
    StorageNode { id, topology: Topology::new(zone, rack, format!("h{id}")), healthy: true }
}

/// A file whose chunk `i` has replicas on `chunks[i]`.
fn file(path: &str, chunks: &[&[u64]]) -> FileLayout {
    FileLayout {
        path: path.into(),
        chunks: chunks.iter().map(|r| ChunkLoc { bytes: CHUNK_BYTES, replicas: r.to_vec() }).collect(),
    }
}

fn vm(name: &str, datasets: &[&str], proximity: Level) -> VmRequest {
    VmRequest {
        name: name.into(),
        image: "/img".into(),
        datasets: datasets.iter().map(|d| d.to_string()).collect(),
        vcpus: 2,
        mem_mb: 4096,
        proximity,
        anti_affinity: None,
        priority: 0,
        policy: DelayPolicy::default(),
        waited_ms: 0,
    }
}

/// Three racks in one zone, one host and one storage node per rack
/// (ids 1, 2, 3), a fourth host in another zone. The image sits on node 3.
fn three_racks(files: Vec<FileLayout>) -> ClusterIndex {
    let mut all = vec![file("/img", &[&[3]])];
    all.extend(files);
    ClusterIndex::new(ClusterView {
        hosts: vec![host(1, "z", "r1"), host(2, "z", "r2"), host(3, "z", "r3"), host(4, "y", "r1")],
        storage: vec![node(1, "z", "r1"), node(2, "z", "r2"), node(3, "z", "r3")],
        files: all,
    })
    .expect("valid view")
}

fn placed(d: &VmDecision) -> (u64, Option<Level>) {
    match &d.outcome {
        VmOutcome::Placed { host, relaxed_to } => (*host, *relaxed_to),
        other => panic!("not placed: {other:?}"),
    }
}

fn note(d: &VmDecision, host: u64) -> &CandidateNote {
    d.candidates.iter().find(|n| n.host == host).expect("note for host")
}

/// Goal: a data set spread over two racks qualifies only the rack that can
/// read every portion; the others are rejected naming the missing chunk.
#[test]
fn spread_data_set_qualifies_only_racks_holding_all_portions() {
    // chunk 0 on nodes 1 (r1) and 2 (r2); chunk 1 on nodes 2 (r2) and 3 (r3).
    let index = three_racks(vec![file("/d", &[&[1, 2], &[2, 3]])]);
    let d = index.place(&vm("a", &["/d"], Level::Rack), Explain::Full).unwrap();
    assert_eq!(placed(&d), (2, None));
    assert_eq!(d.attempts[0].counts.qualified, 1);
    assert_eq!(d.attempts[0].counts.too_far, 3);
    let too_far = |host| note(&d, host).rejection.clone();
    assert_eq!(
        too_far(1),
        Some(VmRejection::TooFar {
            level: Level::Rack,
            portion: Portion { path: "/d".into(), chunk_index: 1 },
            missing_chunks: 1,
            missing_bytes: CHUNK_BYTES,
        })
    );
    assert!(matches!(too_far(3), Some(VmRejection::TooFar { portion: Portion { chunk_index: 0, .. }, .. })));
    // Host 2 reads everything locally; the note lists the holders, nearest first.
    let n2 = note(&d, 2);
    assert_eq!(n2.data.host_bytes, 2 * CHUNK_BYTES);
    assert_eq!(n2.holders[0], HolderNote { server: 2, distance: Level::Host, bytes: 2 * CHUNK_BYTES });
    assert_eq!(n2.holders.len(), 3);
    let n1 = note(&d, 1);
    assert_eq!((n1.data.host_bytes, n1.data.zone_bytes), (CHUNK_BYTES, CHUNK_BYTES));
}

/// Goal: when no single rack holds every portion, nothing qualifies at rack
/// level; the VM waits, then relaxes to zone, never beyond its policy.
#[test]
fn delay_then_relax_one_level_at_a_time() {
    let index = three_racks(vec![file("/d", &[&[1], &[2]])]);
    let mut req = vm("a", &["/d"], Level::Rack);
    req.policy = DelayPolicy { max_wait_ms: 30_000, relax_to: Level::Zone };

    req.waited_ms = 1_000;
    let d = index.place(&req, Explain::Summary).unwrap();
    match &d.outcome {
        VmOutcome::Wait { retry_after_ms, reason } => {
            assert_eq!(*retry_after_ms, MAX_RETRY_AFTER_MS);
            assert_eq!(reason.level, Level::Rack);
            assert_eq!(reason.counts.too_far, 4);
        }
        other => panic!("expected wait, got {other:?}"),
    }
    req.waited_ms = 28_000;
    let d = index.place(&req, Explain::Summary).unwrap();
    assert!(matches!(d.outcome, VmOutcome::Wait { retry_after_ms: 2_000, .. }));

    req.waited_ms = 30_000;
    let d = index.place(&req, Explain::Summary).unwrap();
    // Zone z: hosts 1 and 2 each hold half on the host, host 1 wins by id.
    assert_eq!(placed(&d), (1, Some(Level::Zone)));
    assert_eq!(d.attempts.iter().map(|a| a.level).collect::<Vec<_>>(), [Level::Rack, Level::Zone]);

    // A policy that stops at rack level leaves it unplaceable, with reasons.
    req.policy.relax_to = Level::Rack;
    let d = index.place(&req, Explain::Summary).unwrap();
    match &d.outcome {
        VmOutcome::Unplaceable { reason } => {
            assert_eq!(reason.level, Level::Rack);
            assert!(reason.to_string().contains("4 too far from the data"), "{reason}");
        }
        other => panic!("expected unplaceable, got {other:?}"),
    }
    // Summary still explains a few hosts, each with its too-far portion.
    assert_eq!(d.candidates.len(), 4);
    assert!(d.candidates.iter().all(|n| matches!(n.rejection, Some(VmRejection::TooFar { .. }))));
}

/// Goal: host-local data beats rack-local, which beats zone-local; a cached
/// image outweighs image bytes nearby.
#[test]
fn score_prefers_nearer_data_then_cached_image() {
    let mut view = ClusterView {
        hosts: vec![host(1, "z", "r1"), host(2, "z", "r1"), host(3, "z", "r2")],
        storage: vec![node(2, "z", "r1"), node(9, "z", "r2")],
        files: vec![file("/img", &[&[9]]), file("/d", &[&[2]])],
    };
    let req = vm("a", &["/d"], Level::Zone);
    let d = place_vm(&req, &view, Explain::Full).unwrap();
    assert_eq!(placed(&d), (2, None));
    let order: Vec<u64> = d.candidates.iter().map(|n| n.host).collect();
    assert_eq!(order, [2, 1, 3]);
    // Rack-local host 1 beats host 3 even though host 3 has the image in its rack.
    assert!(note(&d, 1).score.as_ref().unwrap().total > note(&d, 3).score.as_ref().unwrap().total);

    view.hosts[0].cached_images.insert("/img".into());
    view.hosts[2].cached_images.insert("/img".into());
    let d = place_vm(&req, &view, Explain::Full).unwrap();
    assert_eq!(placed(&d), (2, None), "host-local data still wins");
    let s1 = note(&d, 1).score.clone().unwrap();
    assert_eq!(s1.image, IMAGE_CACHED_POINTS);
    assert_eq!(s1.data, DATA_POINTS * RACK_WEIGHT_PERMILLE / 1000);
}

/// Goal: capacity is a hard limit, and place_many sees earlier placements.
#[test]
fn capacity_is_never_exceeded() {
    let mut index = three_racks(vec![file("/d", &[&[1, 2, 3]])]);
    let mut reqs: Vec<VmRequest> = (0..20).map(|i| vm(&format!("vm{i:02}"), &["/d"], Level::Zone)).collect();
    reqs[0].mem_mb = 20_000; // fits nowhere
    let results = index.place_many(&reqs, Explain::Summary);
    let placed_count = results.iter().filter(|r| r.as_ref().unwrap().outcome.host().is_some()).count();
    // Three hosts in zone z with 8 vcpus each take 4 VMs of 2 vcpus apiece.
    assert_eq!(placed_count, 12);
    for h in &index.view().hosts {
        assert!(h.used_vcpus <= h.vcpus && h.used_mem_mb <= h.mem_mb, "{h:?}");
    }
    let first = results[0].as_ref().unwrap();
    assert_eq!(first.vm, "vm00");
    match &first.outcome {
        VmOutcome::Unplaceable { reason } => assert_eq!(reason.counts.no_memory, 3),
        other => panic!("{other:?}"),
    }
    let last = results[19].as_ref().unwrap();
    let counts = &last.attempts[0].counts;
    assert_eq!((counts.no_cpu, counts.too_far), (3, 1));
}

/// Goal: anti-affinity is hard (never two of a group on a host) and spreads
/// over racks when locality is equal.
#[test]
fn anti_affinity_holds() {
    let view = ClusterView {
        hosts: vec![host(1, "z", "r1"), host(2, "z", "r1"), host(3, "z", "r2")],
        storage: vec![node(1, "z", "r1")],
        files: vec![file("/img", &[&[1]])],
    };
    let mut reqs: Vec<VmRequest> = (0..4).map(|i| vm(&format!("vm{i}"), &[], Level::Any)).collect();
    for r in &mut reqs {
        r.anti_affinity = Some("web".into());
    }
    let results = place_many(&reqs, &view, Explain::Summary).unwrap();
    let hosts: Vec<Option<u64>> = results.iter().map(|r| r.as_ref().unwrap().outcome.host()).collect();
    // Host 1 first (image local), then rack r2 before host 2 in r1's rack.
    assert_eq!(hosts, [Some(1), Some(3), Some(2), None]);
    match &results[3].as_ref().unwrap().outcome {
        VmOutcome::Unplaceable { reason } => assert_eq!(reason.counts.anti_affinity, 3),
        other => panic!("{other:?}"),
    }
    let mut index = ClusterIndex::new(view).unwrap();
    index.commit(&reqs[0], 2).unwrap();
    assert_eq!(
        index.commit(&reqs[1], 2).unwrap_err(),
        PlacementError::AntiAffinityConflict { vm: "vm1".into(), host: 2, group: "web".into() }
    );
}

/// Goal: unhealthy hosts and replicas on unhealthy nodes never count.
#[test]
fn health_of_hosts_and_replicas() {
    let mut view = ClusterView {
        hosts: vec![host(1, "z", "r1"), host(2, "z", "r2")],
        storage: vec![node(1, "z", "r1"), node(2, "z", "r2")],
        files: vec![file("/img", &[&[1]]), file("/d", &[&[1, 2]])],
    };
    let req = vm("a", &["/d"], Level::Host);
    assert_eq!(placed(&place_vm(&req, &view, Explain::Summary).unwrap()), (1, None));
    view.mark_host_failed(1).unwrap();
    assert!(!view.storage[0].healthy);
    let d = place_vm(&req, &view, Explain::Full).unwrap();
    assert_eq!(placed(&d), (2, None));
    assert_eq!(note(&d, 1).rejection, Some(VmRejection::Unhealthy));
    assert_eq!(d.attempts[0].counts.unhealthy, 1);

    // Every replica gone: the portion is reported unavailable.
    view.storage[1].healthy = false;
    let d = place_vm(&req, &view, Explain::Summary).unwrap();
    match &d.outcome {
        VmOutcome::Unplaceable { reason } => {
            assert_eq!(reason.unavailable, Some(Portion { path: "/d".into(), chunk_index: 0 }));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(view.clone().mark_host_failed(7), Err(PlacementError::UnknownHost { id: 7 }));
}

/// Goal: Summary and Full agree on the outcome and the counts, and Full's
/// per-host reasons add up to the counts.
#[test]
fn summary_and_full_agree() {
    let mut index = three_racks(vec![file("/d", &[&[1, 2], &[2, 3], &[2]])]);
    let mut busy = vm("busy", &[], Level::Any);
    busy.vcpus = 7;
    index.commit(&busy, 2).unwrap();
    let req = vm("a", &["/d"], Level::Zone);
    let summary = index.place(&req, Explain::Summary).unwrap();
    let full = index.place(&req, Explain::Full).unwrap();
    assert_eq!(summary.outcome, full.outcome);
    assert_eq!(summary.attempts, full.attempts);
    assert_eq!(full.candidates.len(), 4);
    let mut counts = RejectionCounts::default();
    for n in &full.candidates {
        match &n.rejection {
            None => counts.qualified += 1,
            Some(VmRejection::Unhealthy) => counts.unhealthy += 1,
            Some(VmRejection::TooFar { .. }) => counts.too_far += 1,
            Some(VmRejection::NoCpu { .. }) => counts.no_cpu += 1,
            Some(VmRejection::NoMemory { .. }) => counts.no_memory += 1,
            Some(VmRejection::AntiAffinity { .. }) => counts.anti_affinity += 1,
        }
    }
    assert_eq!(counts, full.attempts[0].counts);
    assert_eq!(note(&full, 2).fit, CapacityFit { vcpus_after: -1, mem_mb_after: 16_384 - 2 * 4096 });
    assert!(full.candidates[0].chosen);
    assert_eq!(summary.candidates[0], full.candidates[0]);
}

/// Goal: malformed requests and views fail with errors naming the field.
#[test]
fn invalid_input_is_named() {
    let index = three_racks(vec![]);
    let mut req = vm("a", &[], Level::Any);
    req.vcpus = 0;
    assert_eq!(index.place(&req, Explain::Summary).unwrap_err(), PlacementError::ZeroVcpus { vm: "a".into() });
    req.vcpus = 1;
    req.mem_mb = 0;
    assert_eq!(index.place(&req, Explain::Summary).unwrap_err().code(), "zero_memory");
    req.mem_mb = 1;
    req.datasets = vec!["/nope".into()];
    let err = index.place(&req, Explain::Summary).unwrap_err();
    assert_eq!(err.to_string(), "vm a: datasets names /nope, which is not in the cluster view");
    req.datasets.clear();
    req.image = "/other".into();
    assert!(matches!(
        index.place(&req, Explain::Summary),
        Err(PlacementError::UnknownFile { field: FileField::Image, .. })
    ));

    let view = ClusterView { hosts: vec![host(1, "z", "r"), host(1, "z", "r")], ..Default::default() };
    assert_eq!(ClusterIndex::new(view).unwrap_err(), PlacementError::DuplicateHost { id: 1 });
    let view = ClusterView { files: vec![file("/f", &[&[5]])], ..Default::default() };
    assert_eq!(
        ClusterIndex::new(view).unwrap_err(),
        PlacementError::UnknownReplicaServer { path: "/f".into(), chunk_index: 0, server: 5 }
    );
}

/// Goal: place_many goes by priority, then name, so the important VM gets
/// the only local slot.
#[test]
fn place_many_orders_by_priority() {
    let view = ClusterView {
        hosts: vec![host(1, "z", "r1"), host(2, "z", "r2")],
        storage: vec![node(1, "z", "r1")],
        files: vec![file("/img", &[&[1]]), file("/d", &[&[1]])],
    };
    let mut low = vm("a-low", &["/d"], Level::Host);
    low.vcpus = 8;
    let mut high = low.clone();
    high.name = "z-high".into();
    high.priority = 10;
    let results = place_many(&[low, high], &view, Explain::Summary).unwrap();
    let got: Vec<(String, Option<u64>)> =
        results.iter().map(|r| r.as_ref().map(|d| (d.vm.clone(), d.outcome.host())).unwrap()).collect();
    assert_eq!(got, [("z-high".to_string(), Some(1)), ("a-low".to_string(), None)]);
}

/// Goal: the decision does not depend on the order of hosts, nodes or files
/// in the view.
#[test]
fn input_order_does_not_matter() {
    let view = ClusterView {
        hosts: vec![host(1, "z", "r1"), host(2, "z", "r1"), host(3, "z", "r2")],
        storage: vec![node(7, "z", "r1"), node(8, "z", "r2")],
        files: vec![file("/img", &[&[8]]), file("/d", &[&[7], &[8]])],
    };
    let req = vm("a", &["/d"], Level::Zone);
    let a = place_vm(&req, &view, Explain::Full).unwrap();
    let mut reversed = view.clone();
    reversed.hosts.reverse();
    reversed.storage.reverse();
    reversed.files.reverse();
    assert_eq!(a, place_vm(&req, &reversed, Explain::Full).unwrap());
}

/// Goal: decisions and the index survive a JSON round trip (they are stored
/// in Raft and printed by the CLI).
#[test]
fn serde_round_trip() {
    let index = three_racks(vec![file("/d", &[&[1, 2]])]);
    let d = index.place(&vm("a", &["/d"], Level::Rack), Explain::Full).unwrap();
    let json = serde_json::to_string(&d).unwrap();
    assert_eq!(serde_json::from_str::<VmDecision>(&json).unwrap(), d);
    let json = serde_json::to_string(&index).unwrap();
    let back: ClusterIndex = serde_json::from_str(&json).unwrap();
    assert_eq!(back.view(), index.view());
    assert!(json.contains("\"zone\""));
}
