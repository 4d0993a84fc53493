//! [`ClusterIndex`]: a [`ClusterView`] digested once so decisions are cheap.
//!
//! Domains are interned to small integers per level. Each file is reduced
//! to, per level, the domains holding any of its chunks (with chunk and byte
//! counts) and the domains holding all of them; after that no decision looks
//! at a chunk again.

use serde::{Deserialize, Serialize};

use super::{ClusterView, FileLayout, VmRequest, HEADROOM_POINTS};
use crate::util::{BitSet, FastMap};
use crate::{PlacementError, Topology};

/// Indices into per-level tables (`Level::domain_index`).
pub(super) const HOST: usize = 0;
pub(super) const RACK: usize = 1;
pub(super) const ZONE: usize = 2;

/// A cluster view indexed for placement decisions.
///
/// Build it once per view with [`ClusterIndex::new`] (O(hosts + chunks ×
/// replicas)); then [`place`](ClusterIndex::place) decides without touching
/// chunks, and [`commit`](ClusterIndex::commit) records a placement so later
/// decisions see it. Health, topology and file layouts are fixed for an
/// index's lifetime: after a failure, mark it in the view and rebuild.
///
/// Serializes as its (updated) [`ClusterView`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "ClusterView", into = "ClusterView")]
pub struct ClusterIndex {
    /// Hosts and storage nodes sorted by id; host index = position here.
    pub(super) view: ClusterView,
    pub(super) hosts: HostTable,
    pub(super) files: Vec<FileIndex>,
    pub(super) file_by_path: FastMap<String, u32>,
    /// Per level, per domain: the hosts in it, by index.
    pub(super) hosts_in: [Vec<Vec<u32>>; 3],
    /// Per level: how many domains.
    pub(super) domain_counts: [usize; 3],
    /// Per rack: its zone. Per host domain: its rack.
    pub(super) rack_zone: Vec<u32>,
    pub(super) host_domain_rack: Vec<u32>,
    /// Per zone: its racks that have VM hosts.
    pub(super) racks_in_zone: Vec<Vec<u32>>,
    /// Storage nodes by index: id and domain per level.
    pub(super) nodes: Vec<NodeInfo>,
    /// Image path -> hosts that have it cached.
    pub(super) images: FastMap<String, BitSet>,
    /// Anti-affinity group -> hosts running one of its VMs.
    pub(super) groups: FastMap<String, GroupIndex>,
    pub(super) unhealthy_hosts: u32,
    /// Per rack: the least free vCPUs and memory of its hosts, and how many
    /// are unhealthy, so a rack that cannot make the top list is counted
    /// without visiting its hosts when all of them fit.
    pub(super) rack_min_free_vcpus: Vec<u32>,
    pub(super) rack_min_free_mem_mb: Vec<u64>,
    pub(super) rack_unhealthy: Vec<u32>,
}

/// Host state as columns, so the decision loop touches only what it reads.
#[derive(Debug, Clone, Default)]
pub(super) struct HostTable {
    pub(super) healthy: Vec<bool>,
    pub(super) free_vcpus: Vec<u32>,
    pub(super) free_mem_mb: Vec<u64>,
    pub(super) vcpus: Vec<u32>,
    pub(super) mem_mb: Vec<u64>,
    /// Domain id per level.
    pub(super) dom: Vec<[u32; 3]>,
    /// Headroom points per free vCPU and per free MB left after a placement:
    /// a multiplication in the decision loop instead of a division.
    pub(super) headroom_per_vcpu: Vec<f64>,
    pub(super) headroom_per_mem_mb: Vec<f64>,
}

#[derive(Debug, Clone)]
pub(super) struct NodeInfo {
    pub(super) id: u64,
    pub(super) dom: [u32; 3],
}

#[derive(Debug, Clone, Default)]
pub(super) struct GroupIndex {
    /// Hosts running a VM of the group.
    pub(super) members: BitSet,
    /// Rack -> VMs of the group in it.
    pub(super) per_rack: FastMap<u32, u32>,
}

#[derive(Debug, Clone)]
pub(super) struct FileIndex {
    pub(super) path: String,
    pub(super) chunks: u64,
    pub(super) bytes: u64,
    /// Bytes of chunks with no healthy replica.
    pub(super) lost_bytes: u64,
    pub(super) first_lost: Option<u64>,
    pub(super) levels: [LevelTable; 3],
    /// Node index -> bytes of this file it holds healthy replicas of.
    pub(super) holders: Vec<(u32, u64)>,
}

/// One file at one level.
#[derive(Debug, Clone, Default)]
pub(super) struct LevelTable {
    /// Domains holding at least one chunk, sorted by domain.
    pub(super) entries: Vec<DomainBytes>,
    /// Domains holding every chunk, sorted.
    pub(super) full: Vec<u32>,
    /// Domains holding chunk 0, with the first chunk they lack (`None`: they
    /// hold all). Every other domain lacks chunk 0. At most one entry per
    /// replica of chunk 0, so "which portion is too far" costs nothing.
    pub(super) head: Vec<(u32, Option<u64>)>,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct DomainBytes {
    pub(super) domain: u32,
    pub(super) chunks: u64,
    pub(super) bytes: u64,
}

impl LevelTable {
    pub(super) fn get(&self, domain: u32) -> Option<&DomainBytes> {
        self.entries.binary_search_by_key(&domain, |e| e.domain).ok().map(|i| &self.entries[i])
    }

    /// First chunk index not held in `domain`, for a domain that lacks one.
    pub(super) fn first_missing(&self, domain: u32) -> u64 {
        self.head.iter().find(|(d, _)| *d == domain).and_then(|(_, missing)| *missing).unwrap_or(0)
    }
}

/// Hands out dense domain ids, hierarchically: a rack id stands for
/// (zone, rack), a host id for (zone, rack, host).
#[derive(Default)]
struct Interner {
    zones: FastMap<String, u32>,
    racks: FastMap<(u32, String), u32>,
    hosts: FastMap<(u32, String), u32>,
}

impl Interner {
    fn intern(&mut self, t: &Topology) -> [u32; 3] {
        fn id<K: std::hash::Hash + Eq>(map: &mut FastMap<K, u32>, key: K) -> u32 {
            let next = map.len() as u32;
            *map.entry(key).or_insert(next)
        }
        let zone = id(&mut self.zones, t.zone.clone());
        let rack = id(&mut self.racks, (zone, t.rack.clone()));
        let host = id(&mut self.hosts, (rack, t.host.clone()));
        [host, rack, zone]
    }
}

impl ClusterIndex {
    /// Indexes a view. Fails on duplicate ids or paths and on replicas that
    /// name storage nodes missing from the view (mark them unhealthy instead
    /// of removing them).
    pub fn new(mut view: ClusterView) -> Result<Self, PlacementError> {
        view.hosts.sort_by_key(|h| h.id);
        if let Some(w) = view.hosts.windows(2).find(|w| w[0].id == w[1].id) {
            return Err(PlacementError::DuplicateHost { id: w[0].id });
        }
        view.storage.sort_by_key(|n| n.id);
        if let Some(w) = view.storage.windows(2).find(|w| w[0].id == w[1].id) {
            return Err(PlacementError::DuplicateStorageServer { id: w[0].id });
        }

        let mut interner = Interner::default();
        let mut hosts = HostTable::default();
        for h in &view.hosts {
            hosts.healthy.push(h.healthy);
            hosts.free_vcpus.push(h.free_vcpus());
            hosts.free_mem_mb.push(h.free_mem_mb());
            hosts.vcpus.push(h.vcpus);
            hosts.mem_mb.push(h.mem_mb);
            hosts.dom.push(interner.intern(&h.topology));
            let half = HEADROOM_POINTS as f64 / 2.0;
            hosts.headroom_per_vcpu.push(if h.vcpus > 0 { half / f64::from(h.vcpus) } else { 0.0 });
            hosts.headroom_per_mem_mb.push(if h.mem_mb > 0 { half / h.mem_mb as f64 } else { 0.0 });
        }
        let nodes: Vec<NodeInfo> =
            view.storage.iter().map(|n| NodeInfo { id: n.id, dom: interner.intern(&n.topology) }).collect();
        let domain_counts = [interner.hosts.len(), interner.racks.len(), interner.zones.len()];
        let mut rack_zone = vec![0; domain_counts[RACK]];
        let mut host_domain_rack = vec![0; domain_counts[HOST]];
        for dom in hosts.dom.iter().chain(nodes.iter().map(|n| &n.dom)) {
            rack_zone[dom[RACK] as usize] = dom[ZONE];
            host_domain_rack[dom[HOST] as usize] = dom[RACK];
        }

        let mut hosts_in: [Vec<Vec<u32>>; 3] = Default::default();
        for (level, table) in hosts_in.iter_mut().enumerate() {
            *table = vec![Vec::new(); domain_counts[level]];
            for (i, dom) in hosts.dom.iter().enumerate() {
                table[dom[level] as usize].push(i as u32);
            }
        }

        let mut racks_in_zone = vec![Vec::new(); domain_counts[ZONE]];
        for (rack, members) in hosts_in[RACK].iter().enumerate() {
            if !members.is_empty() {
                racks_in_zone[rack_zone[rack] as usize].push(rack as u32);
            }
        }

        let node_index: FastMap<u64, u32> = view.storage.iter().enumerate().map(|(i, n)| (n.id, i as u32)).collect();
        let node_healthy: Vec<bool> = view.storage.iter().map(|n| n.healthy).collect();
        let mut files = Vec::with_capacity(view.files.len());
        let mut file_by_path = FastMap::default();
        for f in &view.files {
            if file_by_path.insert(f.path.clone(), files.len() as u32).is_some() {
                return Err(PlacementError::DuplicateFile { path: f.path.clone() });
            }
            files.push(index_file(f, &node_index, &node_healthy, &nodes)?);
        }

        let mut images: FastMap<String, BitSet> = FastMap::default();
        let mut groups: FastMap<String, GroupIndex> = FastMap::default();
        for (i, h) in view.hosts.iter().enumerate() {
            for image in &h.cached_images {
                images.entry(image.clone()).or_insert_with(|| BitSet::with_len(view.hosts.len())).insert(i);
            }
            for (group, &count) in &h.groups {
                if count > 0 {
                    let g = groups.entry(group.clone()).or_default();
                    g.members.insert(i);
                    let in_rack = g.per_rack.entry(hosts.dom[i][RACK]).or_insert(0);
                    *in_rack = in_rack.saturating_add(count);
                }
            }
        }
        let unhealthy_hosts = hosts.healthy.iter().filter(|h| !**h).count() as u32;
        let mut rack_min_free_vcpus = vec![u32::MAX; domain_counts[RACK]];
        let mut rack_min_free_mem_mb = vec![u64::MAX; domain_counts[RACK]];
        let mut rack_unhealthy = vec![0u32; domain_counts[RACK]];
        for (i, dom) in hosts.dom.iter().enumerate() {
            let r = dom[RACK] as usize;
            rack_min_free_vcpus[r] = rack_min_free_vcpus[r].min(hosts.free_vcpus[i]);
            rack_min_free_mem_mb[r] = rack_min_free_mem_mb[r].min(hosts.free_mem_mb[i]);
            rack_unhealthy[r] += u32::from(!hosts.healthy[i]);
        }

        Ok(ClusterIndex {
            view,
            hosts,
            files,
            file_by_path,
            hosts_in,
            domain_counts,
            rack_zone,
            host_domain_rack,
            racks_in_zone,
            nodes,
            images,
            groups,
            unhealthy_hosts,
            rack_min_free_vcpus,
            rack_min_free_mem_mb,
            rack_unhealthy,
        })
    }

    /// The view, with every committed placement applied; hosts and storage
    /// nodes sorted by id.
    pub fn view(&self) -> &ClusterView {
        &self.view
    }

    pub fn into_view(self) -> ClusterView {
        self.view
    }

    pub(super) fn host_index(&self, id: u64) -> Result<usize, PlacementError> {
        self.view.hosts.binary_search_by_key(&id, |h| h.id).map_err(|_| PlacementError::UnknownHost { id })
    }

    /// Records that `request` now runs on `host`: its vCPUs, memory and
    /// anti-affinity group count are added, so later decisions see them.
    /// Refuses what a decision would never choose (unhealthy host, no
    /// capacity, group conflict), so usage never exceeds capacity.
    pub fn commit(&mut self, request: &VmRequest, host: u64) -> Result<(), PlacementError> {
        let i = self.host_index(host)?;
        let vm = || request.name.clone();
        if !self.hosts.healthy[i] {
            return Err(PlacementError::HostUnhealthy { vm: vm(), host });
        }
        if self.hosts.free_vcpus[i] < request.vcpus || self.hosts.free_mem_mb[i] < request.mem_mb {
            return Err(PlacementError::NoCapacity { vm: vm(), host, vcpus: request.vcpus, mem_mb: request.mem_mb });
        }
        if let Some(group) = &request.anti_affinity {
            if self.view.hosts[i].groups.get(group).is_some_and(|&c| c > 0) {
                return Err(PlacementError::AntiAffinityConflict { vm: vm(), host, group: group.clone() });
            }
        }

        self.hosts.free_vcpus[i] -= request.vcpus;
        self.hosts.free_mem_mb[i] -= request.mem_mb;
        let r = self.hosts.dom[i][RACK] as usize;
        self.rack_min_free_vcpus[r] = self.rack_min_free_vcpus[r].min(self.hosts.free_vcpus[i]);
        self.rack_min_free_mem_mb[r] = self.rack_min_free_mem_mb[r].min(self.hosts.free_mem_mb[i]);
        let h = &mut self.view.hosts[i];
        // Saturating: usage above capacity in the input is tolerated, and
        // free space was checked above, so this cannot actually saturate.
        h.used_vcpus = h.used_vcpus.saturating_add(request.vcpus);
        h.used_mem_mb = h.used_mem_mb.saturating_add(request.mem_mb);
        if let Some(group) = &request.anti_affinity {
            *h.groups.entry(group.clone()).or_insert(0) += 1;
            let g = self.groups.entry(group.clone()).or_default();
            g.members.insert(i);
            *g.per_rack.entry(self.hosts.dom[i][RACK]).or_insert(0) += 1;
        }
        Ok(())
    }
}

impl TryFrom<ClusterView> for ClusterIndex {
    type Error = PlacementError;

    fn try_from(view: ClusterView) -> Result<Self, Self::Error> {
        ClusterIndex::new(view)
    }
}

impl From<ClusterIndex> for ClusterView {
    fn from(index: ClusterIndex) -> Self {
        index.view
    }
}

/// Reduces one file to per-level domain tables over healthy replicas.
fn index_file(
    file: &FileLayout,
    node_index: &FastMap<u64, u32>,
    node_healthy: &[bool],
    nodes: &[NodeInfo],
) -> Result<FileIndex, PlacementError> {
    let mut acc: [FastMap<u32, (u64, u64)>; 3] = Default::default();
    let mut head: [Vec<(u32, Option<u64>)>; 3] = Default::default();
    let mut holders: FastMap<u32, u64> = FastMap::default();
    let (mut bytes, mut lost_bytes, mut first_lost) = (0u64, 0u64, None);
    // Per-chunk scratch: distinct healthy nodes and their distinct domains.
    let mut held: Vec<u32> = Vec::new();
    let mut doms: [Vec<u32>; 3] = Default::default();

    for (ci, chunk) in file.chunks.iter().enumerate() {
        let ci = ci as u64;
        held.clear();
        doms.iter_mut().for_each(Vec::clear);
        for &server in &chunk.replicas {
            let &n = node_index.get(&server).ok_or_else(|| PlacementError::UnknownReplicaServer {
                path: file.path.clone(),
                chunk_index: ci,
                server,
            })?;
            if !node_healthy[n as usize] || held.contains(&n) {
                continue;
            }
            held.push(n);
            for (level, ds) in doms.iter_mut().enumerate() {
                let d = nodes[n as usize].dom[level];
                if !ds.contains(&d) {
                    ds.push(d);
                }
            }
        }
        bytes = bytes.saturating_add(chunk.bytes);
        if held.is_empty() {
            lost_bytes = lost_bytes.saturating_add(chunk.bytes);
            first_lost.get_or_insert(ci);
        }
        for &n in &held {
            let b = holders.entry(n).or_insert(0);
            *b = b.saturating_add(chunk.bytes);
        }
        for level in 0..3 {
            for &d in &doms[level] {
                let e = acc[level].entry(d).or_insert((0, 0));
                e.0 += 1;
                e.1 = e.1.saturating_add(chunk.bytes);
            }
            if ci == 0 {
                head[level] = doms[level].iter().map(|&d| (d, None)).collect();
            } else {
                for (d, missing) in &mut head[level] {
                    if missing.is_none() && !doms[level].contains(d) {
                        *missing = Some(ci);
                    }
                }
            }
        }
    }

    let chunks = file.chunks.len() as u64;
    let mut levels: [LevelTable; 3] = Default::default();
    for (level, table) in levels.iter_mut().enumerate() {
        let mut entries: Vec<DomainBytes> =
            acc[level].iter().map(|(&domain, &(c, b))| DomainBytes { domain, chunks: c, bytes: b }).collect();
        entries.sort_unstable_by_key(|e| e.domain);
        table.full = entries.iter().filter(|e| e.chunks == chunks).map(|e| e.domain).collect();
        table.entries = entries;
        table.head = std::mem::take(&mut head[level]);
    }
    let mut holders: Vec<(u32, u64)> = holders.into_iter().collect();
    holders.sort_unstable();

    Ok(FileIndex { path: file.path.clone(), chunks, bytes, lost_bytes, first_lost, levels, holders })
}
