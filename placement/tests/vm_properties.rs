//! VM placement against its rules on small random clusters.
//!
//! Method: a brute-force solver written independently and plainly (every
//! host, every chunk, every replica, labels compared as strings) decides
//! which hosts qualify; the indexed, pruned fast path must agree with it.
//! Clusters have at most 6 hosts and 6 storage nodes on 2 zones × 2 racks ×
//! 3 machine labels, so collisions (several servers on one machine, one
//! rack label in two zones) are common. Seeds are fixed: runs are repeatable.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use placement::*;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{Config, RngSeed};

const ZONES: [&str; 2] = ["z0", "z1"];
const RACKS: [&str; 2] = ["r0", "r1"];
const MACHINES: [&str; 3] = ["m0", "m1", "m2"];
const NODES: u64 = 6;
const GROUPS: [&str; 2] = ["g", "h"];

fn config() -> Config {
    Config { cases: 256, rng_seed: RngSeed::Fixed(0x10c05), failure_persistence: None, ..Config::default() }
}

fn topology() -> impl Strategy<Value = Topology> {
    (0..2usize, 0..2usize, 0..3usize).prop_map(|(z, r, m)| Topology::new(ZONES[z], RACKS[r], MACHINES[m]))
}

fn host() -> impl Strategy<Value = VmHost> {
    (topology(), (1..=8u32, 0..=9u32), (1..=8u64, 0..=9u64), prop::bool::weighted(0.85), any::<bool>(), 0..4usize)
        .prop_map(|(topology, (vcpus, used_vcpus), (mem_gb, used_gb), healthy, cached, group)| {
            VmHost {
                id: 0,
                name: String::new(),
                topology,
                vcpus,
                mem_mb: mem_gb * 1024,
                // Sometimes above capacity: an overcommitted host must take nothing.
                used_vcpus,
                used_mem_mb: used_gb * 1024,
                healthy,
                cached_images: if cached { BTreeSet::from(["/img".to_string()]) } else { BTreeSet::new() },
                groups: GROUPS.get(group).map(|g| BTreeMap::from([(g.to_string(), 1)])).unwrap_or_default(),
            }
        })
}

/// Up to 4 chunks, each with up to 3 replicas (duplicates allowed).
fn chunks() -> impl Strategy<Value = Vec<ChunkLoc>> {
    prop::collection::vec(
        (1..=100u64, prop::collection::vec(0..NODES, 0..=3)).prop_map(|(bytes, replicas)| ChunkLoc { bytes, replicas }),
        0..=4,
    )
}

fn cluster() -> impl Strategy<Value = ClusterView> {
    (
        prop::collection::vec(host(), 1..=6),
        prop::collection::vec((topology(), prop::bool::weighted(0.85)), NODES as usize),
        chunks(),
        chunks(),
        chunks(),
    )
        .prop_map(|(mut hosts, nodes, img, d0, d1)| {
            for (i, h) in hosts.iter_mut().enumerate() {
                // Ids out of list order, so index order is not list order.
                h.id = 100 + (i as u64 * 5 + 3) % 11;
                h.name = format!("host{}", h.id);
            }
            let storage = nodes
                .into_iter()
                .enumerate()
                .map(|(i, (topology, healthy))| StorageNode { id: i as u64, topology, healthy })
                .collect();
            let files = [("/img", img), ("/d0", d0), ("/d1", d1)]
                .into_iter()
                .map(|(path, chunks)| FileLayout { path: path.into(), chunks })
                .collect();
            ClusterView { hosts, storage, files }
        })
}

fn request() -> impl Strategy<Value = VmRequest> {
    (0..4usize, 1..=4u32, 1..=4096u64, select(Level::ALL.to_vec()), 0..3usize, -2..=2i32).prop_map(
        |(sets, vcpus, mem_mb, proximity, group, priority)| VmRequest {
            name: String::new(),
            image: "/img".into(),
            datasets: [(1, "/d0"), (2, "/d1")]
                .into_iter()
                .filter(|(bit, _)| sets & bit != 0)
                .map(|(_, p)| p.to_string())
                .collect(),
            vcpus,
            mem_mb,
            proximity,
            anti_affinity: GROUPS.get(group).map(|g| g.to_string()),
            priority,
            policy: DelayPolicy::default(),
            waited_ms: 0,
        },
    )
}

fn requests() -> impl Strategy<Value = Vec<VmRequest>> {
    prop::collection::vec(request(), 1..=10).prop_map(|mut reqs| {
        for (i, r) in reqs.iter_mut().enumerate() {
            r.name = format!("vm{i}");
        }
        reqs
    })
}

// ---- The brute-force solver: the rules, written out plainly. ----

/// Whether `host` may run `req` with its data within `level`.
fn brute_qualifies(view: &ClusterView, req: &VmRequest, host: &VmHost, level: Level) -> bool {
    let fits = host.healthy
        && host.vcpus.saturating_sub(host.used_vcpus) >= req.vcpus
        && host.mem_mb.saturating_sub(host.used_mem_mb) >= req.mem_mb;
    let group_ok = match &req.anti_affinity {
        Some(g) => host.groups.get(g).copied().unwrap_or(0) == 0,
        None => true,
    };
    let data_near = level == Level::Any
        || req.datasets.iter().all(|path| {
            let file = view.files.iter().find(|f| &f.path == path).expect("file in view");
            file.chunks.iter().all(|chunk| {
                chunk.replicas.iter().any(|id| {
                    let node = view.storage.iter().find(|n| n.id == *id).expect("node in view");
                    node.healthy && node.topology.same_domain(&host.topology, level)
                })
            })
        });
    fits && group_ok && data_near
}

/// Ids of every host that qualifies, sorted.
fn brute_set(view: &ClusterView, req: &VmRequest, level: Level) -> Vec<u64> {
    let mut ids: Vec<u64> = view.hosts.iter().filter(|h| brute_qualifies(view, req, h, level)).map(|h| h.id).collect();
    ids.sort_unstable();
    ids
}

fn counts_from_notes(notes: &[CandidateNote]) -> RejectionCounts {
    let mut c = RejectionCounts::default();
    for n in notes {
        match &n.rejection {
            None => c.qualified += 1,
            Some(VmRejection::Unhealthy) => c.unhealthy += 1,
            Some(VmRejection::TooFar { .. }) => c.too_far += 1,
            Some(VmRejection::NoCpu { .. }) => c.no_cpu += 1,
            Some(VmRejection::NoMemory { .. }) => c.no_memory += 1,
            Some(VmRejection::AntiAffinity { .. }) => c.anti_affinity += 1,
        }
    }
    c
}

proptest! {
    #![proptest_config(config())]

    /// Goal: at every level, the fast path qualifies exactly the hosts the
    /// brute force does, places on one of them when there is one (the best
    /// scored, lowest id on a tie), and Summary agrees with Full.
    #[test]
    fn single_decisions_match_brute_force(view in cluster(), req in request()) {
        let index = ClusterIndex::new(view.clone()).expect("valid view");
        for level in Level::ALL {
            let mut req = req.clone();
            req.proximity = level;
            let expected = brute_set(&view, &req, level);
            let full = index.place(&req, Explain::Full).expect("valid request");
            let summary = index.place(&req, Explain::Summary).expect("valid request");

            let mut qualified: Vec<u64> =
                full.candidates.iter().filter(|n| n.rejection.is_none()).map(|n| n.host).collect();
            qualified.sort_unstable();
            prop_assert_eq!(&qualified, &expected);
            prop_assert_eq!(full.candidates.len(), view.hosts.len());
            prop_assert_eq!(&counts_from_notes(&full.candidates), &full.attempts[0].counts);
            prop_assert_eq!(&summary.outcome, &full.outcome);
            prop_assert_eq!(&summary.attempts, &full.attempts);
            // Summary's qualifying notes are Full's best ones, in order.
            let top = |d: &VmDecision| -> Vec<CandidateNote> {
                d.candidates.iter().filter(|n| n.rejection.is_none()).cloned().collect()
            };
            let summary_top = top(&summary);
            prop_assert_eq!(&summary_top[..], &top(&full)[..summary_top.len()]);
            prop_assert_eq!(summary_top.len(), expected.len().min(SUMMARY_TOP_N));

            match &full.outcome {
                VmOutcome::Placed { host, relaxed_to } => {
                    prop_assert!(expected.contains(host));
                    prop_assert_eq!(*relaxed_to, None);
                    let best = full
                        .candidates
                        .iter()
                        .filter_map(|n| n.score.as_ref().map(|s| (s.total, Reverse(n.host))))
                        .max()
                        .map(|(_, Reverse(id))| id);
                    prop_assert_eq!(Some(*host), best);
                }
                VmOutcome::Unplaceable { reason } => {
                    prop_assert!(expected.is_empty());
                    prop_assert_eq!(reason.level, level);
                }
                VmOutcome::Wait { .. } => prop_assert!(false, "no wait without a policy"),
            }
        }
    }

    /// Goal: delay scheduling. With a wait left, an unsatisfied VM waits;
    /// without, it is placed at the first level (one at a time, up to
    /// relax_to) where the brute force finds a host.
    #[test]
    fn relaxation_stops_at_first_satisfiable_level(
        view in cluster(),
        mut req in request(),
        relax_to in select(Level::ALL.to_vec()),
    ) {
        let index = ClusterIndex::new(view.clone()).expect("valid view");
        req.policy = DelayPolicy { max_wait_ms: 1_000, relax_to };
        req.waited_ms = 999;
        let satisfied = !brute_set(&view, &req, req.proximity).is_empty();
        let d = index.place(&req, Explain::Summary).expect("valid request");
        prop_assert_eq!(satisfied, matches!(d.outcome, VmOutcome::Placed { relaxed_to: None, .. }));
        if !satisfied {
            let waits = matches!(d.outcome, VmOutcome::Wait { retry_after_ms: 1, .. });
            prop_assert!(waits, "{:?}", d.outcome);
        }

        req.waited_ms = 1_000;
        let d = index.place(&req, Explain::Summary).expect("valid request");
        let first = Level::ALL
            .into_iter()
            .filter(|&l| l == req.proximity || (l > req.proximity && l <= relax_to))
            .find(|&l| !brute_set(&view, &req, l).is_empty());
        match (first, &d.outcome) {
            (Some(level), VmOutcome::Placed { host, relaxed_to }) => {
                prop_assert!(brute_set(&view, &req, level).contains(host));
                prop_assert_eq!(*relaxed_to, (level != req.proximity).then_some(level));
                prop_assert_eq!(d.attempts.last().map(|a| a.level), Some(level));
            }
            (None, VmOutcome::Unplaceable { reason }) => {
                prop_assert_eq!(reason.level, req.proximity.max(relax_to));
            }
            (first, outcome) => prop_assert!(false, "expected level {:?}, got {:?}", first, outcome),
        }
    }

    /// Goal: a satisfiable requirement is always met. Construct one: a
    /// healthy, empty, big-enough host and a storage node within the
    /// required level of it holding a replica of every data set chunk.
    #[test]
    fn satisfiable_requirement_is_met(
        mut view in cluster(),
        mut req in request(),
        target in any::<prop::sample::Index>(),
    ) {
        let t = target.index(view.hosts.len());
        let host = &mut view.hosts[t];
        host.healthy = true;
        host.used_vcpus = 0;
        host.used_mem_mb = 0;
        host.vcpus = host.vcpus.max(req.vcpus);
        host.mem_mb = host.mem_mb.max(req.mem_mb);
        host.groups.clear();
        let near = &host.topology;
        let topology = match req.proximity {
            Level::Host => near.clone(),
            Level::Rack => Topology::new(&near.zone, &near.rack, "elsewhere"),
            Level::Zone => Topology::new(&near.zone, "other-rack", "elsewhere"),
            Level::Any => Topology::new("far", "far", "far"),
        };
        view.storage.push(StorageNode { id: 99, topology, healthy: true });
        for f in view.files.iter_mut().filter(|f| req.datasets.contains(&f.path)) {
            for c in &mut f.chunks {
                c.replicas.push(99);
            }
        }
        req.policy = DelayPolicy { max_wait_ms: 0, relax_to: Level::Any };
        let d = place_vm(&req, &view, Explain::Summary).expect("valid");
        match d.outcome {
            VmOutcome::Placed { host, relaxed_to: None } => {
                prop_assert!(brute_set(&view, &req, req.proximity).contains(&host));
            }
            other => prop_assert!(false, "not placed at the required level: {:?}", other),
        }
    }

    /// Goal: across a batch, no host ever exceeds its capacity and no host
    /// gets a second VM of an anti-affinity group; the index's view records
    /// exactly the placements made.
    #[test]
    fn capacity_and_anti_affinity_hold_across_place_many(view in cluster(), reqs in requests()) {
        let mut index = ClusterIndex::new(view.clone()).expect("valid view");
        let results = index.place_many(&reqs, Explain::Summary);
        let mut added: BTreeMap<u64, (u32, u64, Vec<String>)> = BTreeMap::new();
        let mut last_priority = i32::MAX;
        for result in results {
            let d = result.expect("valid request");
            let req = reqs.iter().find(|r| r.name == d.vm).expect("known vm");
            prop_assert!(req.priority <= last_priority, "priority order");
            last_priority = req.priority;
            if let Some(host) = d.outcome.host() {
                let a = added.entry(host).or_default();
                a.0 += req.vcpus;
                a.1 += req.mem_mb;
                a.2.extend(req.anti_affinity.clone());
            }
        }
        for before in &view.hosts {
            let after = index.view().hosts.iter().find(|h| h.id == before.id).expect("host kept");
            let (vcpus, mem_mb, groups) = added.get(&before.id).cloned().unwrap_or_default();
            prop_assert!(vcpus <= before.vcpus.saturating_sub(before.used_vcpus));
            prop_assert!(mem_mb <= before.mem_mb.saturating_sub(before.used_mem_mb));
            prop_assert_eq!(after.used_vcpus, before.used_vcpus + vcpus);
            prop_assert_eq!(after.used_mem_mb, before.used_mem_mb + mem_mb);
            for g in &groups {
                prop_assert_eq!(groups.iter().filter(|x| *x == g).count(), 1, "two of {} on {}", g, before.id);
                prop_assert!(!before.groups.contains_key(g), "group {} joined host {}", g, before.id);
            }
        }
    }

    /// Goal: the decision depends on the cluster, not on list order.
    #[test]
    fn decisions_ignore_input_order(view in cluster(), req in request(), seed in any::<u64>()) {
        let mut shuffled = view.clone();
        let mut state = seed | 1;
        let mut next = move |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        for i in (1..shuffled.hosts.len()).rev() {
            let j = next(i + 1);
            shuffled.hosts.swap(i, j);
        }
        shuffled.storage.reverse();
        shuffled.files.rotate_left(1);
        let a = place_vm(&req, &view, Explain::Full).expect("valid");
        let b = place_vm(&req, &shuffled, Explain::Full).expect("valid");
        prop_assert_eq!(a, b);
    }
}

/// A bigger cluster than the brute force would enjoy: 8 to 40 hosts over 3
/// zones × 4 racks, so top lists fill and racks get pruned.
fn wide_cluster() -> impl Strategy<Value = ClusterView> {
    let place = (0..3usize, 0..4usize, 0..4usize)
        .prop_map(|(z, r, m)| Topology::new(format!("z{z}"), format!("r{r}"), format!("m{m}")));
    let chunk =
        (1..=100u64, prop::collection::vec(0..12u64, 1..=3)).prop_map(|(bytes, replicas)| ChunkLoc { bytes, replicas });
    (
        prop::collection::vec((place.clone(), 0..=8u32, 0..=8u64, any::<bool>(), 0..6usize), 8..=40),
        prop::collection::vec(place, 12),
        prop::collection::vec(chunk.clone(), 1..=3),
        prop::collection::vec(chunk, 1..=8),
    )
        .prop_map(|(hosts, nodes, img, data)| ClusterView {
            hosts: hosts
                .into_iter()
                .enumerate()
                .map(|(i, (topology, used_vcpus, used_gb, cached, group))| VmHost {
                    id: i as u64,
                    name: format!("host{i}"),
                    topology,
                    vcpus: 8,
                    mem_mb: 8 * 1024,
                    used_vcpus,
                    used_mem_mb: used_gb * 1024,
                    healthy: i % 7 != 3,
                    cached_images: if cached { BTreeSet::from(["/img".to_string()]) } else { BTreeSet::new() },
                    groups: GROUPS.get(group).map(|g| BTreeMap::from([(g.to_string(), 1)])).unwrap_or_default(),
                })
                .collect(),
            storage: nodes
                .into_iter()
                .enumerate()
                .map(|(i, topology)| StorageNode { id: i as u64, topology, healthy: true })
                .collect(),
            files: vec![
                FileLayout { path: "/img".into(), chunks: img },
                FileLayout { path: "/d0".into(), chunks: data },
                FileLayout { path: "/d1".into(), chunks: Vec::new() },
            ],
        })
}

proptest! {
    #![proptest_config(config())]

    /// Goal: skipping racks whose score bound cannot reach the top list
    /// never changes the outcome. Full notes score every host without
    /// pruning; the chosen host and Summary's top list must be their best.
    #[test]
    fn pruning_never_changes_the_choice(view in wide_cluster(), req in request()) {
        let index = ClusterIndex::new(view).expect("valid view");
        let full = index.place(&req, Explain::Full).expect("valid request");
        let summary = index.place(&req, Explain::Summary).expect("valid request");
        let mut ranked: Vec<(i64, Reverse<u64>)> = full
            .candidates
            .iter()
            .filter_map(|n| n.score.as_ref().map(|s| (s.total, Reverse(n.host))))
            .collect();
        ranked.sort_unstable_by(|a, b| b.cmp(a));
        let best: Vec<u64> = ranked.iter().take(SUMMARY_TOP_N).map(|(_, Reverse(id))| *id).collect();
        let summary_top: Vec<u64> =
            summary.candidates.iter().filter(|n| n.rejection.is_none()).map(|n| n.host).collect();
        prop_assert_eq!(&summary_top, &best);
        prop_assert_eq!(full.outcome.host(), best.first().copied());
        prop_assert_eq!(&summary.outcome, &full.outcome);
    }
}
