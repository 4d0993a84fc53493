//! Chunk replica placement and read-replica ordering.
//!
//! Used by the metadata service when it allocates a chunk or repairs one.
//! Start at [`place_replicas`].

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

use crate::util::{FastMap, FastSet};
use crate::{Level, PlacementError, Topology};

/// Most replicas one chunk may have.
pub const MAX_COPIES: u8 = 16;

/// Space kept free on every storage server, in percent of its capacity, so a
/// server is never filled to the last byte (metadata, compaction, and writes
/// already in flight need room).
pub const SPACE_RESERVE_PERCENT: u64 = 1;

/// A chunk server as replica placement sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageServer {
    pub id: u64,
    pub topology: Topology,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub healthy: bool,
    /// Being emptied: keeps serving, takes no new replicas.
    pub draining: bool,
}

impl StorageServer {
    pub fn free_bytes(&self) -> u64 {
        self.capacity_bytes.saturating_sub(self.used_bytes)
    }

    /// Bytes that must stay free after a placement.
    pub fn reserve_bytes(&self) -> u64 {
        // u128: capacity times a percentage must not overflow for huge disks.
        (u128::from(self.capacity_bytes) * u128::from(SPACE_RESERVE_PERCENT) / 100) as u64
    }

    /// Free bytes needed to take a replica of `bytes`: the replica plus the reserve.
    pub fn bytes_needed(&self, bytes: u64) -> u64 {
        bytes.saturating_add(self.reserve_bytes())
    }

    fn has_room(&self, bytes: u64) -> bool {
        self.capacity_bytes > 0 && self.free_bytes() >= self.bytes_needed(bytes)
    }
}

/// What a chunk needs: how many replicas, spread at which level.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRequest {
    /// Replicas the chunk should have in total, `1..=MAX_COPIES`.
    pub copies: u8,
    /// No two replicas (counting `existing`) share a domain at this level:
    /// `Host`, `Rack` or `Zone`.
    pub spread: Level,
    /// Servers that already hold good replicas (repair).
    pub existing: Vec<u64>,
    /// Servers never to choose: failed, or holding a stale or corrupt copy.
    pub exclude: Vec<u64>,
    /// Space the replica needs.
    pub bytes: u64,
}

/// Where the new replicas go, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaPlan {
    /// New servers to write to, best first. At most `copies - existing.len()`.
    pub chosen: Vec<u64>,
    /// Set when fewer than wanted could be placed.
    pub shortfall: Option<Shortfall>,
    /// One entry per storage server, by id.
    pub candidates: Vec<ReplicaCandidate>,
}

/// Fewer replicas placed than wanted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shortfall {
    /// New replicas wanted: `copies - existing.len()`.
    pub wanted: u8,
    /// New replicas placed.
    pub placed: u8,
    pub reason: ShortfallReason,
}

/// The first constraint, in this order, that leaves fewer candidates than
/// wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShortfallReason {
    /// Too few servers that are healthy, not draining, not excluded and not
    /// already holding a replica.
    NotEnoughHealthyServers,
    /// Enough servers, but too few distinct domains at the spread level that
    /// do not already hold a replica.
    NotEnoughDomains { level: Level },
    /// Enough domains, but too few of them have a server with free space.
    NotEnoughSpace,
}

/// One storage server's part in a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaCandidate {
    pub server: u64,
    pub free_bytes: u64,
    pub verdict: ReplicaVerdict,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaVerdict {
    /// A new replica goes here.
    Chosen,
    /// Listed in `existing`.
    HoldsReplica,
    /// Would have qualified, but enough replicas were chosen from servers
    /// with more free space.
    NotNeeded,
    Rejected {
        reason: ReplicaRejection,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaRejection {
    Excluded,
    Unhealthy,
    Draining,
    NoSpace {
        free_bytes: u64,
        needed_bytes: u64,
    },
    /// Its domain at the spread level already holds a replica on `by`.
    DomainUsed {
        by: u64,
    },
}

/// Chooses servers for the replicas a chunk still needs.
///
/// Candidates are healthy, not draining, not excluded, not holding a replica
/// already, with room for `bytes` plus [`SPACE_RESERVE_PERCENT`]. Among them
/// the one with the highest free-space fraction goes first (lowest id on a
/// tie), then the best of a domain not yet used, and so on; that greedy order
/// places as many replicas as the distinct usable domains allow. Cost:
/// O(servers × copies).
pub fn place_replicas(request: &ReplicaRequest, servers: &[StorageServer]) -> Result<ReplicaPlan, PlacementError> {
    if request.copies == 0 || request.copies > MAX_COPIES {
        return Err(PlacementError::InvalidCopies { copies: request.copies });
    }
    if request.spread == Level::Any {
        return Err(PlacementError::InvalidSpread { level: request.spread });
    }
    let mut by_id: FastMap<u64, usize> = FastMap::default();
    by_id.reserve(servers.len());
    for (i, s) in servers.iter().enumerate() {
        if by_id.insert(s.id, i).is_some() {
            return Err(PlacementError::DuplicateStorageServer { id: s.id });
        }
    }
    let mut holds = vec![false; servers.len()];
    for &id in &request.existing {
        let &i = by_id.get(&id).ok_or(PlacementError::UnknownExistingServer { id })?;
        if std::mem::replace(&mut holds[i], true) {
            return Err(PlacementError::DuplicateExisting { id });
        }
    }
    let excluded: FastSet<u64> = request.exclude.iter().copied().collect();

    // Intern each server's domain once, so the selection rounds compare integers.
    let mut domain_ids: FastMap<(&str, &str, &str), usize> = FastMap::default();
    let domain_of: Vec<usize> = servers
        .iter()
        .map(|s| {
            let next = domain_ids.len();
            *domain_ids.entry(s.topology.domain_key(request.spread)).or_insert(next)
        })
        .collect();
    // Which server's replica occupies each domain: existing ones first.
    let mut occupant: Vec<Option<u64>> = vec![None; domain_ids.len()];
    for &id in &request.existing {
        let d = domain_of[by_id[&id]];
        occupant[d].get_or_insert(id);
    }

    let verdicts: Vec<Option<ReplicaVerdict>> = servers
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let reason = if holds[i] {
                return Some(ReplicaVerdict::HoldsReplica);
            } else if excluded.contains(&s.id) {
                ReplicaRejection::Excluded
            } else if !s.healthy {
                ReplicaRejection::Unhealthy
            } else if s.draining {
                ReplicaRejection::Draining
            } else if !s.has_room(request.bytes) {
                ReplicaRejection::NoSpace { free_bytes: s.free_bytes(), needed_bytes: s.bytes_needed(request.bytes) }
            } else {
                return None; // eligible; decided below
            };
            Some(ReplicaVerdict::Rejected { reason })
        })
        .collect();
    let eligible: Vec<usize> = (0..servers.len()).filter(|&i| verdicts[i].is_none()).collect();

    // At most MAX_COPIES, so the narrowing cannot truncate.
    let wanted = usize::from(request.copies).saturating_sub(request.existing.len()) as u8;
    let mut chosen_idx: Vec<usize> = Vec::with_capacity(usize::from(wanted));
    while chosen_idx.len() < usize::from(wanted) {
        let best = eligible
            .iter()
            .copied()
            .filter(|&i| occupant[domain_of[i]].is_none())
            .min_by(|&a, &b| better_server(&servers[a], &servers[b]));
        let Some(i) = best else { break };
        occupant[domain_of[i]] = Some(servers[i].id);
        chosen_idx.push(i);
    }

    let shortfall = (chosen_idx.len() < usize::from(wanted)).then(|| {
        let usable: Vec<usize> = (0..servers.len())
            .filter(|&i| {
                let s = &servers[i];
                !holds[i] && !excluded.contains(&s.id) && s.healthy && !s.draining
            })
            .collect();
        // Domains free of existing replicas that some usable server sits in.
        let mut existing_domains = vec![false; domain_ids.len()];
        for &id in &request.existing {
            existing_domains[domain_of[by_id[&id]]] = true;
        }
        let usable_domains: FastSet<usize> =
            usable.iter().map(|&i| domain_of[i]).filter(|&d| !existing_domains[d]).collect();
        let reason = if usable.len() < usize::from(wanted) {
            ShortfallReason::NotEnoughHealthyServers
        } else if usable_domains.len() < usize::from(wanted) {
            ShortfallReason::NotEnoughDomains { level: request.spread }
        } else {
            ShortfallReason::NotEnoughSpace
        };
        Shortfall { wanted, placed: chosen_idx.len() as u8, reason }
    });

    let mut is_chosen = vec![false; servers.len()];
    for &i in &chosen_idx {
        is_chosen[i] = true;
    }
    let mut candidates: Vec<ReplicaCandidate> = servers
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let verdict = match &verdicts[i] {
                Some(v) => v.clone(),
                None if is_chosen[i] => ReplicaVerdict::Chosen,
                None => match occupant[domain_of[i]] {
                    Some(by) => ReplicaVerdict::Rejected { reason: ReplicaRejection::DomainUsed { by } },
                    None => ReplicaVerdict::NotNeeded,
                },
            };
            ReplicaCandidate { server: s.id, free_bytes: s.free_bytes(), verdict }
        })
        .collect();
    candidates.sort_by_key(|c| c.server);

    Ok(ReplicaPlan { chosen: chosen_idx.iter().map(|&i| servers[i].id).collect(), shortfall, candidates })
}

/// `Less` when `a` should be chosen before `b`: higher free fraction, then
/// lower id. Cross-multiplied in u128 so no float rounding decides a tie.
fn better_server(a: &StorageServer, b: &StorageServer) -> Ordering {
    let fa = u128::from(a.free_bytes()) * u128::from(b.capacity_bytes);
    let fb = u128::from(b.free_bytes()) * u128::from(a.capacity_bytes);
    fb.cmp(&fa).then(a.id.cmp(&b.id))
}

/// Orders replicas nearest to `client` first: same host, same rack, same
/// zone, then the rest. Within a distance the ids go ascending, rotated
/// left by `spread` (modulo their number): readers pass a value that
/// differs from one region of data to the next, so equally near replicas
/// share the reads, and one region always goes to the same replica (whose
/// cache then holds it). `spread` 0 is plain ascending order.
pub fn pick_read_replica(client: &Topology, replicas: &[(u64, Topology)], spread: u64) -> Vec<u64> {
    let mut order: Vec<(Level, u64)> = replicas.iter().map(|(id, t)| (client.distance(t), *id)).collect();
    order.sort_unstable();
    let mut out = Vec::with_capacity(order.len());
    for class in order.chunk_by(|a, b| a.0 == b.0) {
        let k = (spread % class.len() as u64) as usize;
        out.extend(class[k..].iter().chain(&class[..k]).map(|(_, id)| *id));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const GB: u64 = 1 << 30;

    fn server(id: u64, zone: &str, rack: &str, used_gb: u64) -> StorageServer {
        StorageServer {
            id,
            topology: Topology::new(zone, rack, format!("h{id}")),
            capacity_bytes: 100 * GB,
            used_bytes: used_gb * GB,
            healthy: true,
            draining: false,
        }
    }

    fn request(copies: u8, spread: Level) -> ReplicaRequest {
        ReplicaRequest { copies, spread, existing: vec![], exclude: vec![], bytes: GB }
    }

    fn verdict(plan: &ReplicaPlan, id: u64) -> &ReplicaVerdict {
        &plan.candidates.iter().find(|c| c.server == id).expect("candidate listed").verdict
    }

    /// Goal: replicas land in distinct racks, emptiest first.
    #[test]
    fn distinct_racks_emptiest_first() {
        let servers = [
            server(1, "z", "r1", 50),
            server(2, "z", "r1", 10), // emptiest, rack r1
            server(3, "z", "r2", 30),
            server(4, "z", "r3", 60),
            server(5, "z", "r2", 20),
        ];
        let plan = place_replicas(&request(3, Level::Rack), &servers).unwrap();
        assert_eq!(plan.chosen, vec![2, 5, 4]);
        assert_eq!(plan.shortfall, None);
        assert_eq!(verdict(&plan, 1), &ReplicaVerdict::Rejected { reason: ReplicaRejection::DomainUsed { by: 2 } });
    }

    /// Goal: equal free fractions are broken by id, so the plan is deterministic.
    #[test]
    fn ties_break_by_lowest_id() {
        let servers = [server(9, "z", "r1", 0), server(3, "z", "r2", 0), server(5, "z", "r3", 0)];
        let plan = place_replicas(&request(2, Level::Rack), &servers).unwrap();
        assert_eq!(plan.chosen, vec![3, 5]);
        assert_eq!(verdict(&plan, 9), &ReplicaVerdict::NotNeeded);
    }

    /// Goal: the free fraction decides, not free bytes: an empty 10 GB disk
    /// goes before a half-full 100 GB one with more bytes free.
    #[test]
    fn balances_by_fraction_not_bytes() {
        let mut small = server(1, "z", "r1", 0);
        small.capacity_bytes = 10 * GB; // 100% free, 10 GB
        let big = server(2, "z", "r2", 50); // 50% free, 50 GB
        let plan = place_replicas(&request(1, Level::Rack), &[big, small]).unwrap();
        assert_eq!(plan.chosen, vec![1]);
    }

    /// Goal: unhealthy, draining, excluded and full servers are skipped, each
    /// with its reason.
    #[test]
    fn rejections_carry_reasons() {
        let mut sick = server(1, "z", "r1", 0);
        sick.healthy = false;
        let mut draining = server(2, "z", "r2", 0);
        draining.draining = true;
        let full = server(3, "z", "r3", 99); // 1 GB free, reserve 1 GB + 1 GB needed
        let excluded = server(4, "z", "r4", 0);
        let ok = server(5, "z", "r5", 0);
        let mut req = request(1, Level::Rack);
        req.exclude = vec![4];
        let plan = place_replicas(&req, &[sick, draining, full, excluded, ok]).unwrap();
        assert_eq!(plan.chosen, vec![5]);
        let reason = |id| match verdict(&plan, id) {
            ReplicaVerdict::Rejected { reason } => reason.clone(),
            other => panic!("server {id}: {other:?}"),
        };
        assert_eq!(reason(1), ReplicaRejection::Unhealthy);
        assert_eq!(reason(2), ReplicaRejection::Draining);
        assert_eq!(reason(3), ReplicaRejection::NoSpace { free_bytes: GB, needed_bytes: GB + GB });
        assert_eq!(reason(4), ReplicaRejection::Excluded);
    }

    /// Goal: a repair adds only the missing replicas, away from the domains
    /// the surviving ones occupy.
    #[test]
    fn repair_avoids_existing_domains() {
        let servers = [
            server(1, "z1", "r1", 0),
            server(2, "z1", "r2", 0),
            server(3, "z2", "r3", 0),
            server(4, "z2", "r4", 90),
            server(5, "z3", "r5", 50),
        ];
        let mut req = request(3, Level::Zone);
        req.existing = vec![1];
        req.exclude = vec![3]; // held a corrupt copy
        let plan = place_replicas(&req, &servers).unwrap();
        assert_eq!(plan.chosen, vec![5, 4]);
        assert_eq!(verdict(&plan, 1), &ReplicaVerdict::HoldsReplica);
        assert_eq!(verdict(&plan, 2), &ReplicaVerdict::Rejected { reason: ReplicaRejection::DomainUsed { by: 1 } });
        req.existing = vec![1, 3, 5];
        let plan = place_replicas(&req, &servers).unwrap();
        assert!(plan.chosen.is_empty() && plan.shortfall.is_none());
    }

    /// Goal: each shortfall names the constraint that ran out first.
    #[test]
    fn shortfall_reasons() {
        let mut sick = server(3, "z", "r3", 0);
        sick.healthy = false;
        let servers = [server(1, "z", "r1", 0), server(2, "z", "r1", 0), sick];
        let plan = place_replicas(&request(3, Level::Rack), &servers).unwrap();
        assert_eq!(plan.chosen, vec![1]);
        assert_eq!(
            plan.shortfall,
            Some(Shortfall { wanted: 3, placed: 1, reason: ShortfallReason::NotEnoughHealthyServers })
        );

        let servers = [server(1, "z", "r1", 0), server(2, "z", "r1", 0), server(3, "z", "r2", 0)];
        let plan = place_replicas(&request(3, Level::Rack), &servers).unwrap();
        assert_eq!(plan.chosen.len(), 2);
        assert_eq!(plan.shortfall.map(|s| s.reason), Some(ShortfallReason::NotEnoughDomains { level: Level::Rack }));

        let servers = [server(1, "z", "r1", 99), server(2, "z", "r2", 0), server(3, "z", "r3", 99)];
        let plan = place_replicas(&request(3, Level::Rack), &servers).unwrap();
        assert_eq!(plan.chosen, vec![2]);
        assert_eq!(plan.shortfall.map(|s| s.reason), Some(ShortfallReason::NotEnoughSpace));
    }

    #[test]
    fn invalid_requests_name_the_field() {
        let servers = [server(1, "z", "r1", 0)];
        let err = place_replicas(&request(0, Level::Host), &servers).unwrap_err();
        assert_eq!(err, PlacementError::InvalidCopies { copies: 0 });
        assert!(err.to_string().contains("copies"));
        let err = place_replicas(&request(17, Level::Host), &servers).unwrap_err();
        assert_eq!(err.code(), "invalid_copies");
        let err = place_replicas(&request(1, Level::Any), &servers).unwrap_err();
        assert!(err.to_string().contains("spread"));
        let mut req = request(2, Level::Host);
        req.existing = vec![7];
        assert_eq!(place_replicas(&req, &servers).unwrap_err(), PlacementError::UnknownExistingServer { id: 7 });
        let dup = [server(1, "z", "r1", 0), server(1, "z", "r2", 0)];
        assert_eq!(
            place_replicas(&request(1, Level::Host), &dup).unwrap_err(),
            PlacementError::DuplicateStorageServer { id: 1 }
        );
    }

    /// Goal: reads go to the nearest replica; ids, rotated by the spread, break ties.
    #[test]
    fn read_replicas_nearest_first() {
        let client = Topology::new("z1", "r1", "h1");
        let replicas = [
            (7, Topology::new("z2", "r1", "h1")),
            (5, Topology::new("z1", "r2", "h9")),
            (4, Topology::new("z1", "r1", "h2")),
            (2, Topology::new("z1", "r1", "h3")),
            (9, Topology::new("z1", "r1", "h1")),
        ];
        assert_eq!(pick_read_replica(&client, &replicas, 0), vec![9, 2, 4, 5, 7]);
        // The spread rotates each distance's ids: the rack's two hosts swap,
        // the lone replicas of other distances stay.
        assert_eq!(pick_read_replica(&client, &replicas, 1), vec![9, 4, 2, 5, 7]);
        assert_eq!(pick_read_replica(&client, &replicas, 2), vec![9, 2, 4, 5, 7]);
    }
}
