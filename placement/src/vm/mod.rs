//! VM placement: where a VM runs, given where its data is.
//!
//! Inputs are a [`VmRequest`] and a [`ClusterView`]; the view is indexed once
//! into a [`ClusterIndex`] (O(chunks)), after which each decision costs
//! roughly O(hosts near the data + data domains), not O(chunks). Start at
//! [`ClusterIndex::place`]; the rules are on [`VmRequest`].

mod decide;
mod index;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{Level, PlacementError, StorageServer, Topology};

pub use index::ClusterIndex;

/// Most data set files one VM request may name.
pub const MAX_DATASETS_PER_VM: usize = 256;
/// Candidate notes kept by [`Explain::Summary`].
pub const SUMMARY_TOP_N: usize = 5;
/// Storage servers listed per candidate note, nearest first.
pub const MAX_HOLDERS_PER_NOTE: usize = 16;
/// Longest `retry_after_ms` a `Wait` asks for, so a long policy wait is
/// still re-checked often enough to catch a slot that frees up.
pub const MAX_RETRY_AFTER_MS: u64 = 5_000;

/// Score points for having all data set bytes on the host itself.
pub const DATA_POINTS: i64 = 1_000_000;
/// Score points for a host that has the master image cached: it can clone
/// at once instead of downloading.
pub const IMAGE_CACHED_POINTS: i64 = 200_000;
/// Score points for having all image bytes on the host (when not cached).
pub const IMAGE_LOCAL_POINTS: i64 = 100_000;
/// Score points for a host that stays entirely free after the placement;
/// spreads load over hosts of equal locality.
pub const HEADROOM_POINTS: i64 = 100_000;
/// Score points taken off per VM of the same anti-affinity group already in
/// the host's rack: the group is spread over racks when locality allows.
pub const GROUP_RACK_PENALTY_POINTS: i64 = 50_000;
/// Weight of a byte by where its nearest replica is, per mille of a byte on
/// the host itself. Remote bytes weigh nothing.
pub const RACK_WEIGHT_PERMILLE: i64 = 600;
pub const ZONE_WEIGHT_PERMILLE: i64 = 200;
pub const HOST_WEIGHT_PERMILLE: i64 = 1000;

/// A storage server as VM placement sees it: where, and whether its
/// replicas can be read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageNode {
    pub id: u64,
    pub topology: Topology,
    /// Replicas on an unhealthy node count as gone.
    pub healthy: bool,
}

impl From<&StorageServer> for StorageNode {
    fn from(s: &StorageServer) -> Self {
        StorageNode { id: s.id, topology: s.topology.clone(), healthy: s.healthy }
    }
}

/// One chunk of a file and the storage servers holding a replica of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkLoc {
    pub bytes: u64,
    pub replicas: Vec<u64>,
}

/// A file's chunks, in file order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileLayout {
    pub path: String,
    pub chunks: Vec<ChunkLoc>,
}

/// A machine that runs VMs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmHost {
    pub id: u64,
    pub name: String,
    pub topology: Topology,
    pub vcpus: u32,
    pub mem_mb: u64,
    pub used_vcpus: u32,
    pub used_mem_mb: u64,
    pub healthy: bool,
    /// Paths of master images in the host's local cache.
    pub cached_images: BTreeSet<String>,
    /// Anti-affinity group -> VMs of that group on this host.
    pub groups: BTreeMap<String, u32>,
}

impl VmHost {
    pub fn free_vcpus(&self) -> u32 {
        self.vcpus.saturating_sub(self.used_vcpus)
    }

    pub fn free_mem_mb(&self) -> u64 {
        self.mem_mb.saturating_sub(self.used_mem_mb)
    }
}

/// Everything a VM decision reads. Only files named by requests need to be
/// present in `files`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterView {
    pub hosts: Vec<VmHost>,
    pub storage: Vec<StorageNode>,
    pub files: Vec<FileLayout>,
}

impl ClusterView {
    /// Records that the machine of VM host `host_id` failed: the host and
    /// every storage node with the same topology labels (the same machine)
    /// become unhealthy, so their replicas no longer count.
    ///
    /// Failover is then an ordinary batch: rebuild the [`ClusterIndex`] and
    /// pass the failed host's VMs to [`ClusterIndex::place_many`]. The score
    /// already prefers hosts near the surviving replicas and hosts with the
    /// master image cached.
    pub fn mark_host_failed(&mut self, host_id: u64) -> Result<(), PlacementError> {
        let host =
            self.hosts.iter_mut().find(|h| h.id == host_id).ok_or(PlacementError::UnknownHost { id: host_id })?;
        host.healthy = false;
        let machine = host.topology.clone();
        for node in &mut self.storage {
            if node.topology == machine {
                node.healthy = false;
            }
        }
        Ok(())
    }
}

/// How long a VM may wait for a slot at its required level, and how far its
/// requirement may then be relaxed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DelayPolicy {
    /// Wait at most this long (counted by the caller in
    /// [`VmRequest::waited_ms`]) for a qualifying slot.
    pub max_wait_ms: u64,
    /// Once the wait is over, widen one level at a time up to this level.
    /// A level at or below the request's proximity means never relax.
    pub relax_to: Level,
}

impl Default for DelayPolicy {
    /// No waiting, no relaxation.
    fn default() -> Self {
        DelayPolicy { max_wait_ms: 0, relax_to: Level::Host }
    }
}

/// A VM to place.
///
/// Rules:
/// - A host qualifies at level L iff every chunk of every data set has a
///   replica on a healthy storage node in the host's domain at L (at `Any`,
///   every host does). A data set spread over several servers therefore
///   pins the VM to domains that can read all of it.
/// - The image does not restrict qualification: it is fetched once into the
///   host's cache and cloned, so its distance costs start-up time only. It
///   adds score when cached on the host, less when its bytes are near.
/// - A host must be healthy, have the vCPUs and memory free, and run no VM
///   of the same anti-affinity group (hard).
/// - Among qualifying hosts the highest score wins, lowest id on a tie.
///   `priority` orders [`ClusterIndex::place_many`]; it does not preempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRequest {
    pub name: String,
    /// Path of the master image.
    pub image: String,
    /// Paths of the data set files.
    pub datasets: Vec<String>,
    pub vcpus: u32,
    pub mem_mb: u64,
    /// Required distance to the data sets.
    pub proximity: Level,
    pub anti_affinity: Option<String>,
    pub priority: i32,
    pub policy: DelayPolicy,
    /// How long this VM has waited so far. Time enters only here.
    pub waited_ms: u64,
}

/// How much explanation to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Explain {
    /// The best [`SUMMARY_TOP_N`] candidates plus rejection counts: cheap
    /// enough for the scheduler's hot path.
    Summary,
    /// A note for every host (for `locus vm why`).
    Full,
}

/// A placement decision and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDecision {
    pub vm: String,
    pub outcome: VmOutcome,
    /// Every level evaluated, required level first.
    pub attempts: Vec<Attempt>,
    /// Notes at the last level evaluated: chosen first, then qualifying
    /// hosts by score, then rejected ones by id.
    pub candidates: Vec<CandidateNote>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmOutcome {
    /// Run it on `host`. `relaxed_to` is set when the requirement was widened.
    Placed { host: u64, relaxed_to: Option<Level> },
    /// Nothing qualifies at the required level yet; ask again after
    /// `retry_after_ms` with `waited_ms` advanced.
    Wait { retry_after_ms: u64, reason: NoFit },
    /// Nothing qualifies at any level the policy allows.
    Unplaceable { reason: NoFit },
}

impl VmOutcome {
    pub fn host(&self) -> Option<u64> {
        match self {
            VmOutcome::Placed { host, .. } => Some(*host),
            _ => None,
        }
    }
}

/// One level evaluated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub level: Level,
    pub counts: RejectionCounts,
}

/// Why no host fits at `level`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoFit {
    pub level: Level,
    pub counts: RejectionCounts,
    /// A data set portion with no healthy replica anywhere, if any: then no
    /// host qualifies below `Any` until it is repaired.
    pub unavailable: Option<Portion>,
}

impl fmt::Display for NoFit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.counts;
        write!(f, "no host fits at {} level ({} hosts", self.level, c.total())?;
        for (n, what) in [
            (c.unhealthy, "unhealthy"),
            (c.too_far, "too far from the data"),
            (c.no_cpu, "short of vcpus"),
            (c.no_memory, "short of memory"),
            (c.anti_affinity, "holding its anti-affinity group"),
        ] {
            if n > 0 {
                write!(f, "; {n} {what}")?;
            }
        }
        f.write_str(")")?;
        if let Some(p) = &self.unavailable {
            write!(f, "; {} chunk {} has no healthy replica", p.path, p.chunk_index)?;
        }
        Ok(())
    }
}

/// Hosts by outcome at one level. Each host counts once, under the first
/// reason in field order (unhealthy before too far, and so on).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectionCounts {
    pub qualified: u32,
    pub unhealthy: u32,
    pub too_far: u32,
    pub no_cpu: u32,
    pub no_memory: u32,
    pub anti_affinity: u32,
}

impl RejectionCounts {
    pub fn total(&self) -> u32 {
        self.qualified + self.unhealthy + self.too_far + self.no_cpu + self.no_memory + self.anti_affinity
    }
}

/// A chunk of a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Portion {
    pub path: String,
    pub chunk_index: u64,
}

/// One host, seen at one level.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CandidateNote {
    pub host: u64,
    pub name: String,
    pub level: Level,
    pub chosen: bool,
    /// Data set bytes by the distance of their nearest healthy replica.
    pub data: BytesAtDistance,
    pub image: ImageNote,
    /// Storage servers holding data set portions, nearest first, at most
    /// [`MAX_HOLDERS_PER_NOTE`].
    pub holders: Vec<HolderNote>,
    pub fit: CapacityFit,
    /// Set for qualifying hosts.
    pub score: Option<Score>,
    /// Set for rejected hosts.
    pub rejection: Option<VmRejection>,
}

/// Bytes by the distance of their nearest healthy replica; every byte is in
/// exactly one field.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BytesAtDistance {
    pub host_bytes: u64,
    pub rack_bytes: u64,
    pub zone_bytes: u64,
    pub remote_bytes: u64,
    /// No healthy replica anywhere.
    pub unavailable_bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageNote {
    pub cached: bool,
    pub bytes: BytesAtDistance,
}

/// A storage server holding part of the VM's data sets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HolderNote {
    pub server: u64,
    pub distance: Level,
    /// Data set bytes it holds a healthy replica of.
    pub bytes: u64,
}

/// Capacity left after the placement; negative means short by that much.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapacityFit {
    pub vcpus_after: i64,
    pub mem_mb_after: i64,
}

/// A qualifying host's score, by part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Score {
    pub data: i64,
    pub image: i64,
    pub headroom: i64,
    pub group_penalty: i64,
    /// `data + image + headroom - group_penalty`.
    pub total: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmRejection {
    Unhealthy,
    /// `portion` is the first chunk, in request order, with no healthy
    /// replica within `level`; `missing_*` count all such chunks of its file.
    TooFar {
        level: Level,
        portion: Portion,
        missing_chunks: u64,
        missing_bytes: u64,
    },
    NoCpu {
        free_vcpus: u32,
        needed_vcpus: u32,
    },
    NoMemory {
        free_mem_mb: u64,
        needed_mem_mb: u64,
    },
    AntiAffinity {
        group: String,
        count: u32,
    },
}

/// Places one VM on a view, indexing the view first. For many decisions on
/// one view, build a [`ClusterIndex`] once instead.
pub fn place_vm(request: &VmRequest, view: &ClusterView, explain: Explain) -> Result<VmDecision, PlacementError> {
    ClusterIndex::new(view.clone())?.place(request, explain)
}

/// Places `requests` in priority order on a view; see
/// [`ClusterIndex::place_many`]. The outer error is for a malformed view, the
/// inner ones for malformed requests.
pub fn place_many(
    requests: &[VmRequest],
    view: &ClusterView,
    explain: Explain,
) -> Result<Vec<Result<VmDecision, PlacementError>>, PlacementError> {
    Ok(ClusterIndex::new(view.clone())?.place_many(requests, explain))
}

#[cfg(test)]
mod tests;
