//! Replica placement and read ordering against their rules on small random
//! clusters, with a brute-force count of how many replicas can be placed.
//! Seeds are fixed: runs are repeatable.

use std::collections::BTreeSet;

use placement::*;
use proptest::prelude::*;
use proptest::sample::{select, subsequence};
use proptest::test_runner::{Config, RngSeed};

const KB: u64 = 1000;

fn config() -> Config {
    Config { cases: 256, rng_seed: RngSeed::Fixed(0x5eed), failure_persistence: None, ..Config::default() }
}

fn topology() -> impl Strategy<Value = Topology> {
    (0..3usize, 0..2usize, 0..3usize)
        .prop_map(|(z, r, h)| Topology::new(format!("z{z}"), format!("r{r}"), format!("h{h}")))
}

fn servers() -> impl Strategy<Value = Vec<StorageServer>> {
    prop::collection::vec(
        (
            topology(),
            1..=100u64,
            // Round percentages often, so free fractions tie and the id tie-break matters.
            prop_oneof![Just(0u64), Just(50), 0..=100u64],
            prop::bool::weighted(0.85),
            prop::bool::weighted(0.1),
        ),
        1..=12,
    )
    .prop_map(|raw| {
        raw.into_iter()
            .enumerate()
            .map(|(i, (topology, capacity, used_pct, healthy, draining))| StorageServer {
                id: (i as u64 * 7 + 2) % 13,
                topology,
                capacity_bytes: capacity * KB,
                used_bytes: capacity * KB * used_pct / 100,
                healthy,
                draining,
            })
            .collect()
    })
}

fn case() -> impl Strategy<Value = (Vec<StorageServer>, ReplicaRequest)> {
    servers().prop_flat_map(|servers| {
        let ids: Vec<u64> = servers.iter().map(|s| s.id).collect();
        let n = ids.len();
        (
            Just(servers),
            1..=5u8,
            select(vec![Level::Host, Level::Rack, Level::Zone]),
            subsequence(ids.clone(), 0..=n.min(3)),
            subsequence(ids, 0..=n.min(3)),
            0..=50 * KB,
        )
            .prop_map(|(servers, copies, spread, existing, exclude, bytes)| {
                (servers, ReplicaRequest { copies, spread, existing, exclude, bytes })
            })
    })
}

fn eligible(s: &StorageServer, req: &ReplicaRequest) -> bool {
    s.healthy
        && !s.draining
        && !req.exclude.contains(&s.id)
        && !req.existing.contains(&s.id)
        && s.capacity_bytes > 0
        && s.capacity_bytes - s.used_bytes >= req.bytes + s.capacity_bytes * SPACE_RESERVE_PERCENT / 100
}

fn domain(s: &StorageServer, level: Level) -> Vec<&str> {
    let t = &s.topology;
    match level {
        Level::Host => vec![&t.zone, &t.rack, &t.host],
        Level::Rack => vec![&t.zone, &t.rack],
        _ => vec![&t.zone],
    }
}

proptest! {
    #![proptest_config(config())]

    /// Goal: chosen servers are eligible, never share a domain with each
    /// other or an existing replica, and as many are placed as the brute
    /// force says distinct free domains allow; the shortfall says so.
    #[test]
    fn replicas_spread_fit_and_place_as_many_as_possible((servers, req) in case()) {
        let plan = place_replicas(&req, &servers).expect("valid request");
        let by_id = |id: u64| servers.iter().find(|s| s.id == id).expect("known server");
        let wanted = usize::from(req.copies).saturating_sub(req.existing.len());

        let mut used: BTreeSet<Vec<&str>> =
            req.existing.iter().map(|&id| domain(by_id(id), req.spread)).collect();
        for &id in &plan.chosen {
            let s = by_id(id);
            prop_assert!(eligible(s, &req), "server {} not eligible", id);
            prop_assert!(used.insert(domain(s, req.spread)), "domain of {} used twice", id);
        }

        // Brute force: distinct domains among eligible servers, minus the existing ones.
        let existing_domains: BTreeSet<Vec<&str>> =
            req.existing.iter().map(|&id| domain(by_id(id), req.spread)).collect();
        let free_domains: BTreeSet<Vec<&str>> = servers
            .iter()
            .filter(|s| eligible(s, &req))
            .map(|s| domain(s, req.spread))
            .filter(|d| !existing_domains.contains(d))
            .collect();
        prop_assert_eq!(plan.chosen.len(), wanted.min(free_domains.len()));
        prop_assert_eq!(plan.shortfall.is_some(), plan.chosen.len() < wanted);
        if let Some(s) = &plan.shortfall {
            prop_assert_eq!((usize::from(s.wanted), usize::from(s.placed)), (wanted, plan.chosen.len()));
        }

        // The first choice is the emptiest eligible server (by fraction, then id).
        let fraction = |s: &StorageServer| (s.capacity_bytes - s.used_bytes) as f64 / s.capacity_bytes as f64;
        let first = servers
            .iter()
            .filter(|s| eligible(s, &req) && !existing_domains.contains(&domain(s, req.spread)))
            .max_by(|a, b| fraction(a).total_cmp(&fraction(b)).then(b.id.cmp(&a.id)))
            .map(|s| s.id)
            .filter(|_| wanted > 0);
        prop_assert_eq!(plan.chosen.first().copied(), first);

        // One verdict per server, by id, consistent with the choice.
        let ids: Vec<u64> = plan.candidates.iter().map(|c| c.server).collect();
        let mut sorted: Vec<u64> = servers.iter().map(|s| s.id).collect();
        sorted.sort_unstable();
        prop_assert_eq!(ids, sorted);
        for c in &plan.candidates {
            prop_assert_eq!(c.verdict == ReplicaVerdict::Chosen, plan.chosen.contains(&c.server));
        }

        // Input order does not matter.
        let mut reversed = servers.clone();
        reversed.reverse();
        prop_assert_eq!(place_replicas(&req, &reversed).expect("valid request"), plan);
    }

    /// Goal: read order is a permutation, nearest first; within a distance
    /// the ascending ids rotated by the spread (spread 0: ascending).
    #[test]
    fn read_order_is_nearest_first(
        client in topology(),
        replicas in prop::collection::btree_map(0..50u64, topology(), 0..8),
        spread in 0..20u64,
    ) {
        let replicas: Vec<(u64, Topology)> = replicas.into_iter().rev().collect();
        let order = pick_read_replica(&client, &replicas, spread);
        let distance = |id: u64| {
            let t = &replicas.iter().find(|(r, _)| *r == id).expect("listed").1;
            client.distance(t)
        };
        prop_assert_eq!(order.len(), replicas.len());
        prop_assert!(order.windows(2).all(|w| distance(w[0]) <= distance(w[1])));
        for class in order.chunk_by(|a, b| distance(*a) == distance(*b)) {
            let mut ascending = class.to_vec();
            ascending.sort_unstable();
            ascending.rotate_left((spread % class.len() as u64) as usize);
            prop_assert_eq!(class, &ascending[..]);
        }
        prop_assert_eq!(pick_read_replica(&client, &replicas, 0).windows(2).all(|w| {
            (distance(w[0]), w[0]) < (distance(w[1]), w[1])
        }), true);
    }
}
