//! The built-in scheduler: VM host leases, the service reconcile loop and
//! VM placement, run by the Raft leader.
//!
//! Like chunk-server liveness, host leases are not replicated: the leader
//! learns them from heartbeats, and a new leader gives every host one full
//! lease (plus grace) to check in before it may declare it failed. A host
//! agent counts its lease from when it *sent* the heartbeat and kills its
//! VMs when it runs out; the leader counts from when it *received* it and
//! adds a grace, so a host has always stopped its VMs before the leader
//! places them elsewhere (fencing).
//!
//! Each tick reads the VM state, computes commands with the pure
//! [`reconcile`] and [`place`], and proposes them through Raft. Hosts learn
//! their assignments from heartbeat replies, and are woken by the change
//! stream (`Change::Vm`) so a new assignment starts without waiting for the
//! next heartbeat.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fs_client::proto::*;
use fs_client::vm::*;
use placement::{
    ClusterIndex, ClusterView, DelayPolicy, Explain, FileLayout, StorageNode, VmHost, VmOutcome,
    VmRequest as PlacementRequest,
};
use raft::{KvRead, RaftNode};
use tokio::sync::Notify;

use super::cluster::DataManager;
use super::fsm::{enc, Command};
use super::raft_error;
use super::vm::{self, VmApplied, VmCmd, VmResult};

/// Settings of the scheduler.
#[derive(Debug, Clone)]
pub struct SchedConfig {
    /// A host's lease, from its last heartbeat.
    pub lease: Duration,
    /// Added by the leader before it declares a host failed.
    pub grace: Duration,
    /// Where VMs keep their writable state in the namespace.
    pub vm_root: String,
}

impl Default for SchedConfig {
    fn default() -> Self {
        SchedConfig {
            lease: Duration::from_millis(2_500),
            grace: Duration::from_millis(500),
            vm_root: DEFAULT_VM_ROOT.to_string(),
        }
    }
}

/// How often the scheduler looks at the VMs without being woken.
const TICK: Duration = Duration::from_millis(100);
/// VM commands per Raft entry at most.
const MAX_CMDS_PER_ENTRY: usize = 512;
/// VMs one heartbeat may report.
pub const MAX_REPORTED_VMS: usize = 10_000;
/// How long one proposal may take.
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
struct HostLive {
    last_seen: Instant,
    reports: HashMap<String, VmReport>,
    cached: BTreeSet<String>,
}

#[derive(Default)]
struct State {
    leader_since: Option<Instant>,
    hosts: HashMap<HostId, HostLive>,
    /// When each unplaced VM first waited (delay scheduling).
    waiting_since: HashMap<String, Instant>,
}

/// The leader's scheduler. Cheap to clone.
#[derive(Clone)]
pub struct Scheduler {
    raft: RaftNode,
    data: DataManager,
    cfg: SchedConfig,
    state: Arc<Mutex<State>>,
    wake: Arc<Notify>,
}

impl Scheduler {
    pub fn start(raft: RaftNode, data: DataManager, cfg: SchedConfig) -> Self {
        let s = Scheduler { raft, data, cfg, state: Arc::default(), wake: Arc::new(Notify::new()) };
        tokio::spawn(s.clone().run());
        s
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Proposes VM commands in one Raft entry; their results in order.
    pub async fn propose(&self, cmds: Vec<VmCmd>) -> Result<Vec<VmResult>, WireError> {
        let n = cmds.len();
        let cmd = Command::Vm { now: Timespec::now(), cmds };
        let bytes = match tokio::time::timeout(PROPOSE_TIMEOUT, self.raft.write(enc(&cmd))).await {
            Ok(r) => r.map_err(raft_error)?,
            Err(_) => return Err(WireError::new(ErrorCode::Timeout, "commit timed out")),
        };
        let results: Vec<VmResult> = postcard::from_bytes(&bytes)
            .map_err(|e| WireError::new(ErrorCode::Internal, format!("undecodable reply: {e}")))?;
        if results.len() != n {
            return Err(WireError::new(ErrorCode::Internal, format!("{} results for {n} commands", results.len())));
        }
        Ok(results)
    }

    /// A client's VM change (leader only).
    pub async fn client_op(&self, op: VmOp) -> Result<VmReply, WireError> {
        if !self.raft.is_leader() {
            return Err(super::not_leader(&self.raft));
        }
        let r = self.propose(vec![VmCmd::Client(op)]).await?.pop();
        self.wake.notify_one();
        match r {
            Some(Ok(VmApplied::Reply(r))) => Ok(r),
            Some(Ok(other)) => Err(WireError::new(ErrorCode::Internal, format!("unexpected result {other:?}"))),
            Some(Err(e)) => Err(e),
            None => Err(WireError::new(ErrorCode::Internal, "no result")),
        }
    }

    /// Handles a message from a host agent (leader only).
    pub async fn host_msg(&self, msg: HostMsg) -> Result<HostReply, WireError> {
        if !self.raft.is_leader() {
            return Err(super::not_leader(&self.raft));
        }
        let lease_ms = self.cfg.lease.as_millis() as u64;
        match msg {
            HostMsg::Register { id, name, topology, vcpus, mem_mb } => {
                if vcpus == 0 || mem_mb == 0 {
                    return Err(WireError::new(ErrorCode::Invalid, "a host needs vcpus and memory"));
                }
                let r = self.propose(vec![VmCmd::RegisterHost { id, name, topology, vcpus, mem_mb }]).await?;
                let id = match r.into_iter().next() {
                    Some(Ok(VmApplied::Host(id))) => id,
                    Some(Err(e)) => return Err(e),
                    other => return Err(WireError::new(ErrorCode::Internal, format!("registration gave {other:?}"))),
                };
                let mut st = self.state();
                let live = st.hosts.entry(id).or_insert_with(|| HostLive {
                    last_seen: Instant::now(),
                    reports: HashMap::new(),
                    cached: BTreeSet::new(),
                });
                live.last_seen = Instant::now();
                drop(st);
                self.wake.notify_one();
                tracing::info!(host = id, "VM host registered");
                Ok(HostReply::Registered { id, lease_ms })
            }
            HostMsg::Heartbeat { id, vms, cached_images } => {
                if vms.len() > MAX_REPORTED_VMS || cached_images.len() > MAX_REPORTED_VMS {
                    return Err(WireError::new(ErrorCode::TooBig, "heartbeat reports too many VMs or images"));
                }
                let reader = self.raft.reader().clone();
                let (host, assigned, services) = reader
                    .with_latest(|kv| -> Result<_, raft::KvError> {
                        let Some(h) = vm::load_host(kv, id)? else { return Ok((None, Vec::new(), Vec::new())) };
                        let mine: Vec<VmInfo> = vm::all_vms(kv)?.into_iter().filter(|v| v.host == Some(id)).collect();
                        let names: BTreeSet<&str> = mine.iter().map(|v| v.service.as_str()).collect();
                        let mut services = Vec::new();
                        for n in names {
                            services.extend(vm::load_service(kv, n)?);
                        }
                        Ok((Some(h), mine, services))
                    })
                    .map_err(|e| WireError::new(ErrorCode::Io, e.to_string()))?;
                let Some(host) = host else {
                    return Err(WireError::new(ErrorCode::NotFound, format!("host {id} is not registered")));
                };
                let now = Instant::now();
                {
                    let mut st = self.state();
                    let expired = match st.hosts.get(&id) {
                        Some(l) => now.duration_since(l.last_seen) >= self.cfg.lease + self.cfg.grace,
                        None => false,
                    };
                    if !host.up || expired {
                        // Declared failed (or about to be): its VMs are, or
                        // will be, placed elsewhere. It must stop them all.
                        return Ok(HostReply::LeaseLost);
                    }
                    let reports: HashMap<String, VmReport> = vms.into_iter().map(|r| (r.id.clone(), r)).collect();
                    let changed = st.hosts.get(&id).is_none_or(|l| {
                        l.reports.len() != reports.len()
                            || reports.iter().any(|(k, r)| l.reports.get(k).is_none_or(|o| o.state != r.state))
                    });
                    st.hosts
                        .insert(id, HostLive { last_seen: now, reports, cached: cached_images.into_iter().collect() });
                    if changed {
                        self.wake.notify_one();
                    }
                }
                let assignments = assigned
                    .iter()
                    .map(|v| Assignment {
                        vm: v.id.clone(),
                        service: v.service.clone(),
                        index: v.index,
                        epoch: v.epoch,
                        run: v.want_running && !v.moving && !v.removing,
                        // Only a checkpoint not written yet is asked for.
                        checkpoint: if v.checkpoints_wanted > v.last_checkpoint.as_ref().map_or(0, |c| c.n) {
                            v.checkpoints_wanted
                        } else {
                            0
                        },
                    })
                    .collect();
                let prefetch = services.iter().map(|s| (s.image_blake3.clone(), s.def.image.clone())).collect();
                Ok(HostReply::Lease { lease_ms, assignments, services, prefetch, vm_root: self.cfg.vm_root.clone() })
            }
        }
    }

    async fn run(self) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = self.wake.notified() => {}
            }
            if !self.raft.is_leader() {
                let mut st = self.state();
                if st.leader_since.is_some() {
                    *st = State::default();
                }
                continue;
            }
            {
                let mut st = self.state();
                if st.leader_since.is_none() {
                    st.leader_since = Some(Instant::now());
                    tracing::info!("scheduler active: hosts get one lease to check in");
                }
            }
            // A host failure makes work for the very next pass: go again at once.
            let mut passes = 0;
            while passes < 4 {
                passes += 1;
                match self.tick().await {
                    Ok(true) => continue,
                    Ok(false) => break,
                    Err(e) => {
                        tracing::debug!(error = %e, "scheduler pass failed");
                        break;
                    }
                }
            }
        }
    }

    /// One pass; true when it changed something that calls for another.
    async fn tick(&self) -> Result<bool, WireError> {
        let reader = self.raft.reader().clone();
        let (hosts, services, vms) = reader
            .with_latest(|kv| -> Result<_, raft::KvError> {
                Ok((vm::all_hosts(kv)?, vm::all_services(kv)?, vm::all_vms(kv)?))
            })
            .map_err(|e| WireError::new(ErrorCode::Io, e.to_string()))?;
        let now = Instant::now();
        let input = {
            let st = self.state();
            let horizon = self.cfg.lease + self.cfg.grace;
            let live: BTreeMap<HostId, LiveHost> = hosts
                .iter()
                .map(|h| {
                    let l = st.hosts.get(&h.id);
                    let alive = match l {
                        Some(l) => now.duration_since(l.last_seen) < horizon,
                        None => st.leader_since.is_some_and(|t| now.duration_since(t) < horizon),
                    };
                    let silent_ms = l.map(|l| now.duration_since(l.last_seen).as_millis() as u64);
                    let reports = l.map(|l| l.reports.clone()).unwrap_or_default();
                    let cached = l.map(|l| l.cached.clone()).unwrap_or_default();
                    (h.id, LiveHost { alive, silent_ms, reports, cached })
                })
                .collect();
            Input { hosts, live, services, vms, now: Timespec::now() }
        };
        let (services, vms) = (&input.services, &input.vms);
        let mut cmds = reconcile(&input);
        let downed: BTreeSet<HostId> = cmds
            .iter()
            .filter_map(|c| match c {
                VmCmd::HostDown { id, .. } => Some(*id),
                _ => None,
            })
            .collect();
        if !downed.is_empty() {
            // Their VMs are placed again next: repair their data first.
            let files: Vec<String> = vms
                .iter()
                .filter(|v| v.host.is_some_and(|h| downed.contains(&h)))
                .filter_map(|v| services.iter().find(|s| s.def.name == v.service))
                .flat_map(|s| std::iter::once(s.def.image.clone()).chain(s.def.datasets.iter().cloned()))
                .collect();
            let chunks = reader.with_latest(|kv| file_chunk_ids(kv, &files)).unwrap_or_default();
            self.data.prioritize(chunks);
            for h in &downed {
                tracing::warn!(host = h, "VM host lease lapsed: its VMs are placed again");
            }
        }
        let unplaced: Vec<&VmInfo> = vms
            .iter()
            .filter(|v| v.want_running && !v.removing && v.host.is_none())
            .filter(|v| services.iter().any(|s| s.def.name == v.service))
            .collect();
        if !unplaced.is_empty() {
            let waited: HashMap<String, u64> = {
                let mut st = self.state();
                let ids: BTreeSet<&str> = unplaced.iter().map(|v| v.id.as_str()).collect();
                st.waiting_since.retain(|k, _| ids.contains(k.as_str()));
                unplaced
                    .iter()
                    .map(|v| {
                        let t = *st.waiting_since.entry(v.id.clone()).or_insert(now);
                        (v.id.clone(), now.duration_since(t).as_millis() as u64)
                    })
                    .collect()
            };
            let view = self.view(&input, &unplaced, &downed, &reader);
            let placed = place(&input, &unplaced, &waited, view);
            cmds.extend(placed);
        }
        if cmds.is_empty() {
            return Ok(false);
        }
        let again = !downed.is_empty();
        while !cmds.is_empty() {
            let rest = cmds.split_off(cmds.len().min(MAX_CMDS_PER_ENTRY));
            for r in self.propose(cmds).await? {
                if let Err(e) = r {
                    tracing::debug!(error = %e.message, "scheduler command refused");
                }
            }
            cmds = rest;
        }
        Ok(again)
    }

    /// The cluster as placement sees it, with the layouts of the files the
    /// unplaced VMs need.
    fn view(
        &self,
        input: &Input,
        unplaced: &[&VmInfo],
        downed: &BTreeSet<HostId>,
        reader: &raft::KvReader,
    ) -> ClusterView {
        let mut paths = BTreeSet::new();
        for v in unplaced {
            if let Some(s) = input.services.iter().find(|s| s.def.name == v.service) {
                paths.insert(s.def.image.clone());
                paths.extend(s.def.datasets.iter().cloned());
            }
        }
        let files = reader.with_latest(|kv| file_layouts(kv, &paths)).unwrap_or_default();
        let storage: Vec<StorageNode> = self.data.storage_nodes();
        host_view(input, downed, storage, files)
    }

    /// Where VMs keep their state in the namespace.
    pub fn vm_root(&self) -> &str {
        &self.cfg.vm_root
    }
}

/// A host as the leader sees it now.
#[derive(Debug, Clone, Default)]
pub struct LiveHost {
    pub alive: bool,
    /// Since its last heartbeat (None: none since this leader took over).
    pub silent_ms: Option<u64>,
    pub reports: HashMap<String, VmReport>,
    /// blake3 hashes of the images it has cached.
    pub cached: BTreeSet<String>,
}

/// What one reconcile pass reads.
#[derive(Debug, Clone)]
pub struct Input {
    pub hosts: Vec<HostInfo>,
    pub live: BTreeMap<HostId, LiveHost>,
    pub services: Vec<ServiceInfo>,
    pub vms: Vec<VmInfo>,
    pub now: Timespec,
}

fn secs_between(a: Timespec, b: Timespec) -> f64 {
    (b.as_nanos() - a.as_nanos()) as f64 / 1e9
}

/// The status a host's report implies for a VM at its epoch.
fn reported_status(v: &VmInfo, r: &ReportedState) -> VmStatus {
    let leaving = v.moving || v.removing || !v.want_running;
    match r {
        ReportedState::Preparing if leaving => VmStatus::Stopping,
        ReportedState::Preparing => VmStatus::Starting,
        ReportedState::Running | ReportedState::Paused if leaving => VmStatus::Stopping,
        ReportedState::Running | ReportedState::Paused => VmStatus::Running,
        ReportedState::Stopped { .. } if v.moving || v.removing => VmStatus::Stopping,
        ReportedState::Stopped { reason } => VmStatus::Stopped { reason: reason.clone() },
        ReportedState::Failed { reason } => VmStatus::Failed { reason: reason.clone() },
    }
}

/// Everything but placement: failed hosts, status from reports, VMs that
/// leave their host, drains and the instance count of each service
/// (scale rules included). Pure.
pub fn reconcile(input: &Input) -> Vec<VmCmd> {
    let mut cmds = Vec::new();
    let mut down = BTreeSet::new();
    for h in &input.hosts {
        let live = input.live.get(&h.id);
        if h.up && !live.is_some_and(|l| l.alive) {
            let cause = match live.and_then(|l| l.silent_ms) {
                Some(ms) => format!("no heartbeat for {ms} ms"),
                None => "no heartbeat since the leader took over".to_string(),
            };
            cmds.push(VmCmd::HostDown { id: h.id, cause });
            down.insert(h.id);
        }
    }
    let hosts: BTreeMap<HostId, &HostInfo> = input.hosts.iter().map(|h| (h.id, h)).collect();
    let services: BTreeMap<&str, &ServiceInfo> = input.services.iter().map(|s| (s.def.name.as_str(), s)).collect();
    for v in &input.vms {
        if v.host.is_some_and(|h| down.contains(&h)) {
            continue;
        }
        if !services.contains_key(v.service.as_str()) && !v.removing {
            cmds.push(VmCmd::Retire { vm: v.id.clone(), reason: "its service is gone".into() });
            continue;
        }
        let Some(h) = v.host else {
            if v.removing {
                cmds.push(VmCmd::Release { vm: v.id.clone(), epoch: v.epoch, reason: "removed".into() });
            }
            continue;
        };
        let report =
            input.live.get(&h).and_then(|l| l.reports.get(&v.id)).filter(|r| r.epoch == v.epoch).map(|r| &r.state);
        let ended = matches!(report, Some(ReportedState::Stopped { .. } | ReportedState::Failed { .. }));
        if (v.moving || v.removing) && ended {
            let reason = if v.removing { "removed" } else { "moved" };
            cmds.push(VmCmd::Release { vm: v.id.clone(), epoch: v.epoch, reason: reason.into() });
            continue;
        }
        if hosts.get(&h).is_some_and(|h| h.draining) && v.want_running && !v.moving && !v.removing {
            cmds.push(VmCmd::Move { vm: v.id.clone(), reason: format!("host {h} is draining") });
            continue;
        }
        if let Some(r) = report {
            let status = reported_status(v, r);
            if status != v.status {
                cmds.push(VmCmd::SetStatus { vm: v.id.clone(), epoch: v.epoch, status });
            }
        }
        let checkpoint = input.live.get(&h).and_then(|l| l.reports.get(&v.id)).and_then(|r| r.checkpoint.as_ref());
        if let Some(c) = checkpoint {
            if v.last_checkpoint.as_ref().is_none_or(|l| l.n < c.n) {
                cmds.push(VmCmd::CheckpointDone { vm: v.id.clone(), record: c.clone() });
            }
        }
    }
    for s in &input.services {
        let active: Vec<&VmInfo> =
            input.vms.iter().filter(|v| v.service == s.def.name && !v.removing).collect::<Vec<_>>();
        let mut desired = s.desired;
        if let Some(rule) = &s.def.scale {
            let values: Vec<f64> = active
                .iter()
                .filter(|v| v.status == VmStatus::Running)
                .filter_map(|v| {
                    let h = v.host?;
                    let r = input.live.get(&h)?.reports.get(&v.id)?;
                    r.metrics.get(&rule.metric).copied().filter(|x| x.is_finite())
                })
                .collect();
            let cooled = secs_between(s.last_scale, input.now) >= rule.cooldown_s as f64;
            // Only once every wanted instance is there and reporting.
            if cooled && !values.is_empty() && values.len() as u32 >= desired.min(active.len() as u32) {
                let mean = values.iter().sum::<f64>() / values.len() as f64;
                let n = &s.def.instances;
                let (to, why) = if mean > rule.add_above && desired < n.max {
                    (desired + 1, format!("{} {mean:.2} above {}", rule.metric, rule.add_above))
                } else if mean < rule.remove_below && desired > n.min {
                    (desired - 1, format!("{} {mean:.2} below {}", rule.metric, rule.remove_below))
                } else {
                    (desired, String::new())
                };
                if to != desired {
                    cmds.push(VmCmd::SetDesired { service: s.def.name.clone(), desired: to, reason: why });
                    desired = to;
                }
            }
        }
        let have = active.len() as u32;
        if have < desired {
            for k in 0..desired - have {
                cmds.push(VmCmd::CreateVm { service: s.def.name.clone(), index: s.next_index + k });
            }
        } else if have > desired {
            // The newest go first.
            let mut newest: Vec<&&VmInfo> = active.iter().collect();
            newest.sort_by_key(|v| std::cmp::Reverse(v.index));
            for v in newest.into_iter().take((have - desired) as usize) {
                cmds.push(VmCmd::Retire { vm: v.id.clone(), reason: format!("scaled down to {desired}") });
            }
        }
    }
    cmds
}

/// The host half of the placement view: capacity used by the VMs each host
/// holds, its cached images and anti-affinity groups. Pure.
pub fn host_view(
    input: &Input,
    downed: &BTreeSet<HostId>,
    storage: Vec<StorageNode>,
    files: Vec<FileLayout>,
) -> ClusterView {
    let services: BTreeMap<&str, &ServiceInfo> = input.services.iter().map(|s| (s.def.name.as_str(), s)).collect();
    let hosts = input
        .hosts
        .iter()
        .map(|h| {
            let live = input.live.get(&h.id);
            let mut used_vcpus = 0u32;
            let mut used_mem_mb = 0u64;
            let mut groups: BTreeMap<String, u32> = BTreeMap::new();
            for v in input.vms.iter().filter(|v| v.host == Some(h.id)) {
                let Some(s) = services.get(v.service.as_str()) else { continue };
                used_vcpus = used_vcpus.saturating_add(s.def.vcpus);
                used_mem_mb = used_mem_mb.saturating_add(s.def.memory_mib);
                if let Some(g) = &s.def.placement.anti_affinity {
                    *groups.entry(g.clone()).or_default() += 1;
                }
            }
            let cached_images = live
                .map(|l| {
                    input
                        .services
                        .iter()
                        .filter(|s| l.cached.contains(&s.image_blake3))
                        .map(|s| s.def.image.clone())
                        .collect()
                })
                .unwrap_or_default();
            VmHost {
                id: h.id,
                name: h.name.clone(),
                topology: h.topology.clone(),
                vcpus: h.vcpus,
                mem_mb: h.mem_mb,
                used_vcpus,
                used_mem_mb,
                healthy: h.up && !h.draining && live.is_some_and(|l| l.alive) && !downed.contains(&h.id),
                cached_images,
                groups,
            }
        })
        .collect();
    ClusterView { hosts, storage, files }
}

/// Placement of the unplaced VMs, in priority order, on one view. Pure.
pub fn place(input: &Input, unplaced: &[&VmInfo], waited_ms: &HashMap<String, u64>, view: ClusterView) -> Vec<VmCmd> {
    let services: BTreeMap<&str, &ServiceInfo> = input.services.iter().map(|s| (s.def.name.as_str(), s)).collect();
    let mut requests = Vec::new();
    let mut vms = Vec::new();
    for v in unplaced {
        let Some(s) = services.get(v.service.as_str()) else { continue };
        let p = &s.def.placement;
        requests.push(PlacementRequest {
            name: v.id.clone(),
            image: s.def.image.clone(),
            datasets: s.def.datasets.clone(),
            vcpus: s.def.vcpus,
            mem_mb: s.def.memory_mib,
            proximity: p.proximity,
            anti_affinity: p.anti_affinity.clone(),
            priority: p.priority,
            policy: DelayPolicy { max_wait_ms: p.max_wait_s * 1000, relax_to: p.relax_to.unwrap_or(p.proximity) },
            waited_ms: waited_ms.get(&v.id).copied().unwrap_or(0),
        });
        vms.push(*v);
    }
    let mut cmds = Vec::new();
    let status = |v: &VmInfo, status: VmStatus, cmds: &mut Vec<VmCmd>| {
        if v.status != status {
            cmds.push(VmCmd::SetStatus { vm: v.id.clone(), epoch: v.epoch, status });
        }
    };
    let mut index = match ClusterIndex::new(view) {
        Ok(i) => i,
        Err(e) => {
            for v in vms {
                status(v, VmStatus::Unplaceable { reason: format!("cluster view: {e}") }, &mut cmds);
            }
            return cmds;
        }
    };
    // place_many answers in its own order (priority, then name): sort the
    // same way so results line up with requests, errors included.
    requests.sort_by(|a, b| b.priority.cmp(&a.priority).then_with(|| a.name.cmp(&b.name)));
    let by_name: HashMap<&str, &VmInfo> = vms.iter().map(|v| (v.id.as_str(), *v)).collect();
    for (req, result) in requests.iter().zip(index.place_many(&requests, Explain::Summary)) {
        let Some(v) = by_name.get(req.name.as_str()) else { continue };
        match result {
            Ok(decision) => match &decision.outcome {
                VmOutcome::Placed { host, .. } => {
                    let cause = v.events.last().map(|(_, t)| t.clone()).unwrap_or_else(|| "first placement".into());
                    let record = PlacementRecord { at: input.now, cause, decision: decision.clone() };
                    cmds.push(VmCmd::Assign { vm: v.id.clone(), host: *host, record });
                }
                VmOutcome::Wait { reason, .. } => {
                    status(v, VmStatus::Waiting { reason: reason.to_string() }, &mut cmds);
                }
                VmOutcome::Unplaceable { reason } => {
                    status(v, VmStatus::Unplaceable { reason: reason.to_string() }, &mut cmds);
                }
            },
            Err(e) => status(v, VmStatus::Unplaceable { reason: e.to_string() }, &mut cmds),
        }
    }
    cmds
}

/// Chunk layouts of files by path; paths that do not name a regular file
/// are left out (placement then refuses the VMs naming them).
fn file_layouts(kv: &dyn KvRead, paths: &BTreeSet<String>) -> Result<Vec<FileLayout>, raft::KvError> {
    let cb = super::data::chunk_bytes(kv)?;
    let mut out = Vec::new();
    for p in paths {
        let Ok(rec) = super::read::resolve(kv, p.as_bytes(), true)? else { continue };
        if rec.attr.kind != FileKind::File {
            continue;
        }
        let size = rec.attr.size;
        let mut chunks = Vec::new();
        for (index, id) in super::data::file_chunk_map(kv, rec.attr.ino)? {
            let start = index.saturating_mul(cb);
            if start >= size {
                continue;
            }
            let bytes = cb.min(size - start);
            let Some(c) = super::data::load_chunk(kv, id)? else { continue };
            // An unwritten copy-on-write chunk lives on its origin's servers.
            let replicas = match c.origin {
                Some(o) if c.replicas.is_empty() => {
                    super::data::load_chunk(kv, o)?.map(|o| o.replicas).unwrap_or_default()
                }
                _ => c.replicas,
            };
            chunks.push(placement::ChunkLoc { bytes, replicas });
        }
        out.push(FileLayout { path: p.clone(), chunks });
    }
    Ok(out)
}

/// The chunk ids of files by path (for repair priority).
fn file_chunk_ids(kv: &dyn KvRead, paths: &[String]) -> Result<Vec<ChunkId>, raft::KvError> {
    let mut out = Vec::new();
    for p in paths {
        let Ok(rec) = super::read::resolve(kv, p.as_bytes(), true)? else { continue };
        out.extend(super::data::file_chunk_map(kv, rec.attr.ino)?.into_values());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(name: &str) -> ServiceDef {
        ServiceDef::from_toml(&format!(
            "name = \"{name}\"\ndriver = \"process\"\nimage = \"/img\"\ncommand = [\"sleep\", \"100\"]\n\
             [instances]\nmin = 1\nmax = 3\n[scale]\nmetric = \"load\"\nadd_above = 0.8\nremove_below = 0.2\ncooldown_s = 0\n"
        ))
        .unwrap()
    }

    fn service(name: &str, desired: u32) -> ServiceInfo {
        ServiceInfo {
            def: def(name),
            generation: 1,
            image_blake3: "00".repeat(32),
            image_bytes: 1,
            desired,
            next_index: 1,
            created: Timespec::default(),
            last_scale: Timespec::default(),
        }
    }

    fn host(id: HostId) -> HostInfo {
        HostInfo {
            id,
            name: format!("h{id}"),
            topology: Topology::new("z1", format!("r{id}"), format!("h{id}")),
            vcpus: 4,
            mem_mb: 4096,
            draining: false,
            up: true,
            registered: Timespec::default(),
        }
    }

    fn vm(service: &str, index: u32, host: Option<HostId>, status: VmStatus) -> VmInfo {
        VmInfo {
            id: vm_id(service, index),
            service: service.into(),
            index,
            want_running: true,
            removing: false,
            moving: false,
            host,
            epoch: 1,
            status,
            since: Timespec::default(),
            restarts: 0,
            last_placement: None,
            events: Vec::new(),
            checkpoints_wanted: 0,
            last_checkpoint: None,
        }
    }

    fn live(alive: bool, reports: Vec<(&str, ReportedState, f64)>) -> LiveHost {
        LiveHost {
            alive,
            silent_ms: Some(if alive { 100 } else { 9000 }),
            reports: reports
                .into_iter()
                .map(|(id, state, load)| {
                    (
                        id.to_string(),
                        VmReport {
                            id: id.into(),
                            epoch: 1,
                            state,
                            metrics: [("load".to_string(), load)].into(),
                            checkpoint: None,
                        },
                    )
                })
                .collect(),
            cached: BTreeSet::new(),
        }
    }

    fn input(hosts: Vec<(HostInfo, LiveHost)>, services: Vec<ServiceInfo>, vms: Vec<VmInfo>) -> Input {
        Input {
            live: hosts.iter().map(|(h, l)| (h.id, l.clone())).collect(),
            hosts: hosts.into_iter().map(|(h, _)| h).collect(),
            services,
            vms,
            now: Timespec { secs: 1000, nanos: 0 },
        }
    }

    #[test]
    fn a_silent_host_is_declared_down_and_its_vms_are_left_for_placement() {
        let i = input(
            vec![(host(1), live(false, vec![])), (host(2), live(true, vec![]))],
            vec![service("web", 1)],
            vec![vm("web", 1, Some(1), VmStatus::Running)],
        );
        let cmds = reconcile(&i);
        assert!(matches!(&cmds[..], [VmCmd::HostDown { id: 1, cause }] if cause.contains("9000 ms")), "{cmds:?}");
    }

    #[test]
    fn a_new_service_gets_its_instances_and_extra_ones_retire_newest_first() {
        let i = input(vec![(host(1), live(true, vec![]))], vec![service("web", 2)], vec![]);
        assert_eq!(
            reconcile(&i),
            vec![
                VmCmd::CreateVm { service: "web".into(), index: 1 },
                VmCmd::CreateVm { service: "web".into(), index: 2 }
            ]
        );
        let i = input(
            vec![(host(1), live(true, vec![]))],
            vec![service("web", 1)],
            vec![vm("web", 1, None, VmStatus::Pending), vm("web", 2, None, VmStatus::Pending)],
        );
        assert!(matches!(&reconcile(&i)[..], [VmCmd::Retire { vm, .. }] if vm == "web-2"));
    }

    #[test]
    fn scale_rules_follow_the_mean_metric() {
        let running = vec![vm("web", 1, Some(1), VmStatus::Running)];
        let hot = input(
            vec![(host(1), live(true, vec![("web-1", ReportedState::Running, 0.95)]))],
            vec![service("web", 1)],
            running.clone(),
        );
        let cmds = reconcile(&hot);
        assert!(matches!(&cmds[0], VmCmd::SetDesired { desired: 2, .. }), "{cmds:?}");
        assert!(matches!(&cmds[1], VmCmd::CreateVm { index: 1, .. }), "{cmds:?}");
        let cold = input(
            vec![(host(1), live(true, vec![("web-1", ReportedState::Running, 0.1)]))],
            vec![service("web", 1)],
            running,
        );
        // Already at min: nothing to remove.
        assert!(reconcile(&cold).is_empty(), "{:?}", reconcile(&cold));
    }

    #[test]
    fn a_moving_vm_is_released_only_once_its_host_reports_it_ended() {
        let mut v = vm("web", 1, Some(1), VmStatus::Stopping);
        v.moving = true;
        let still = input(
            vec![(host(1), live(true, vec![("web-1", ReportedState::Running, 0.5)]))],
            vec![service("web", 1)],
            vec![v.clone()],
        );
        assert!(!reconcile(&still).iter().any(|c| matches!(c, VmCmd::Release { .. })));
        let gone = input(
            vec![(host(1), live(true, vec![("web-1", ReportedState::Stopped { reason: "stopped".into() }, 0.5)]))],
            vec![service("web", 1)],
            vec![v],
        );
        assert!(matches!(&reconcile(&gone)[..], [VmCmd::Release { vm, epoch: 1, .. }] if vm == "web-1"));
    }

    #[test]
    fn a_draining_host_moves_its_vms() {
        let mut h = host(1);
        h.draining = true;
        let i = input(
            vec![(h, live(true, vec![("web-1", ReportedState::Running, 0.5)]))],
            vec![service("web", 1)],
            vec![vm("web", 1, Some(1), VmStatus::Running)],
        );
        assert!(matches!(&reconcile(&i)[..], [VmCmd::Move { .. }]));
    }

    #[test]
    fn reports_become_statuses() {
        let i = input(
            vec![(host(1), live(true, vec![("web-1", ReportedState::Running, 0.5)]))],
            vec![service("web", 1)],
            vec![vm("web", 1, Some(1), VmStatus::Starting)],
        );
        assert!(matches!(&reconcile(&i)[..], [VmCmd::SetStatus { status: VmStatus::Running, .. }]));
    }

    #[test]
    fn placement_prefers_the_host_next_to_the_data_and_records_why() {
        let i = input(
            vec![(host(1), live(true, vec![])), (host(2), live(true, vec![]))],
            vec![service("web", 1)],
            vec![vm("web", 1, None, VmStatus::Pending)],
        );
        let storage = vec![
            StorageNode { id: 1, topology: host(1).topology, healthy: true },
            StorageNode { id: 2, topology: host(2).topology, healthy: true },
        ];
        let files = vec![FileLayout {
            path: "/img".into(),
            chunks: vec![placement::ChunkLoc { bytes: 64 << 20, replicas: vec![2] }],
        }];
        let view = host_view(&i, &BTreeSet::new(), storage, files);
        let unplaced: Vec<&VmInfo> = i.vms.iter().collect();
        let cmds = place(&i, &unplaced, &HashMap::new(), view);
        match &cmds[..] {
            [VmCmd::Assign { vm, host: 2, record }] => {
                assert_eq!(vm, "web-1");
                assert_eq!(record.cause, "first placement");
                assert!(!record.decision.candidates.is_empty());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn no_host_means_a_recorded_reason_not_a_panic() {
        let i = input(vec![], vec![service("web", 1)], vec![vm("web", 1, None, VmStatus::Pending)]);
        let view = host_view(&i, &BTreeSet::new(), vec![], vec![]);
        let unplaced: Vec<&VmInfo> = i.vms.iter().collect();
        let cmds = place(&i, &unplaced, &HashMap::new(), view);
        assert!(
            matches!(
                &cmds[..],
                [VmCmd::SetStatus { status: VmStatus::Unplaceable { .. } | VmStatus::Waiting { .. }, .. }]
            ),
            "{cmds:?}"
        );
    }
}
