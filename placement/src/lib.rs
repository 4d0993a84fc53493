//! Placement decisions for Locus: where chunk replicas go and where VMs run.
//!
//! Pure: inputs in, a decision and its explanation out. No I/O, no clock, no
//! randomness (maps use a seedless hasher), and no dependency on any other
//! crate of the workspace. The same input always yields the same decision,
//! whatever the order of hosts or servers in it, so a decision can be made
//! on the Raft leader and stored.
//!
//! # Two users
//! - **Replica placement** ([`place_replicas`]), for the metadata service
//!   when it allocates or repairs a chunk: replicas in distinct failure
//!   domains at a level (`host < rack < zone`), on healthy, non-draining
//!   servers with room, emptiest (by fraction) first. [`pick_read_replica`]
//!   orders replicas nearest-first for a reader.
//! - **VM placement** ([`ClusterIndex::place`], [`ClusterIndex::place_many`]),
//!   for the built-in scheduler: a host qualifies at a level when every chunk
//!   of the VM's data sets has a healthy replica within that level of it;
//!   qualifying hosts with capacity and no anti-affinity conflict are scored
//!   by data locality, cached image and headroom. Delay scheduling: a VM
//!   waits (bounded) for a qualifying slot, then its requirement is relaxed
//!   a level at a time as far as its policy allows.
//!
//! Every decision explains itself: per replica candidate a verdict; per VM
//! host a note (bytes at each distance, which servers hold the data,
//! capacity after, score or rejection reason), for all hosts with
//! [`Explain::Full`] or the best few plus counts with [`Explain::Summary`].
//!
//! # What it does not do
//! - It does not watch the cluster, time out waits or run anything: the
//!   caller passes `waited_ms`, retries after `Wait`, and applies decisions.
//! - It does not move existing replicas or VMs (no rebalancing, no
//!   preemption by priority).
//! - It does not track image downloads: a host's cache is what the view says.
//!
//! # Failover
//! When a host fails, mark it in the view ([`ClusterView::mark_host_failed`]:
//! the host and storage on the same machine become unhealthy, so their
//! replicas stop counting), rebuild the index and place its VMs again:
//!
//! ```
//! use placement::*;
//! # fn host(id: u64, rack: &str, cached: bool) -> VmHost {
//! #     VmHost { id, name: format!("h{id}"), topology: Topology::new("z", rack, format!("h{id}")),
//! #         vcpus: 8, mem_mb: 8192, used_vcpus: 0, used_mem_mb: 0, healthy: true,
//! #         cached_images: if cached { ["/img".to_string()].into() } else { Default::default() },
//! #         groups: Default::default() }
//! # }
//! # let node = |id: u64, rack: &str| StorageNode { id, topology: Topology::new("z", rack, format!("h{id}")), healthy: true };
//! // Hosts 1..=3 also run chunk servers 1..=3; the data set has replicas on 1 and 3.
//! let mut view = ClusterView {
//!     hosts: vec![host(1, "r1", true), host(2, "r2", false), host(3, "r2", true)],
//!     storage: vec![node(1, "r1"), node(2, "r2"), node(3, "r2")],
//!     files: vec![
//!         FileLayout { path: "/img".into(), chunks: vec![ChunkLoc { bytes: 64, replicas: vec![3] }] },
//!         FileLayout { path: "/data".into(), chunks: vec![ChunkLoc { bytes: 64, replicas: vec![1, 3] }] },
//!     ],
//! };
//! let vm = VmRequest {
//!     name: "db".into(), image: "/img".into(), datasets: vec!["/data".into()],
//!     vcpus: 2, mem_mb: 1024, proximity: Level::Rack, anti_affinity: None, priority: 0,
//!     policy: DelayPolicy::default(), waited_ms: 0,
//! };
//! let first = ClusterIndex::new(view.clone())?.place(&vm, Explain::Summary)?;
//! // Hosts 1 and 3 both hold the data and have the image cached: lowest id wins.
//! assert_eq!(first.outcome.host(), Some(1));
//!
//! view.mark_host_failed(1)?;
//! let mut index = ClusterIndex::new(view)?;
//! let again = index.place_many(&[vm], Explain::Summary);
//! // Host 3 holds the surviving replica and has the image cached.
//! assert_eq!(again[0].as_ref().map(|d| d.outcome.host()), Ok(Some(3)));
//! # Ok::<(), PlacementError>(())
//! ```
//!
//! # Where to start reading
//! [`topology`] (levels and distance), then [`replica`], then [`vm`]: its
//! types carry the rules, and `vm/decide.rs` holds the decision with its
//! hot-path design notes.

pub mod error;
pub mod replica;
pub mod topology;
mod util;
pub mod vm;

pub use error::{FileField, PlacementError};
pub use replica::{
    pick_read_replica, place_replicas, ReplicaCandidate, ReplicaPlan, ReplicaRejection, ReplicaRequest, ReplicaVerdict,
    Shortfall, ShortfallReason, StorageServer, MAX_COPIES, SPACE_RESERVE_PERCENT,
};
pub use topology::{Level, Topology};
pub use vm::{
    place_many, place_vm, Attempt, BytesAtDistance, CandidateNote, CapacityFit, ChunkLoc, ClusterIndex, ClusterView,
    DelayPolicy, Explain, FileLayout, HolderNote, ImageNote, NoFit, Portion, RejectionCounts, Score, StorageNode,
    VmDecision, VmHost, VmOutcome, VmRejection, VmRequest, MAX_DATASETS_PER_VM, MAX_HOLDERS_PER_NOTE,
    MAX_RETRY_AFTER_MS, SUMMARY_TOP_N,
};
