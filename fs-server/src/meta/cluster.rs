//! The leader's management of chunk servers and their data.
//!
//! Liveness is not replicated: the leader learns it from heartbeats, and a
//! new leader starts by giving every server one detection period to check
//! in. Decisions that change the namespace (a replica added or dropped, a
//! server registered) go through Raft as [`SystemOp`]s; work for servers
//! (copy this chunk, drop that one, raise a version) rides on the replies to
//! their heartbeats.
//!
//! The repair loop scans the chunk map, finds chunks with fewer live copies
//! than their goal, and asks a well-placed server to copy each from a live
//! replica; the copy counts only once the leader commits it. Chunks a VM
//! needs can be put first with [`DataManager::prioritize`].

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fs_client::proto::*;
use placement::{place_replicas, ReplicaRequest, StorageServer};
use raft::{KvReadExt, RaftNode};

use super::data::{self, block_bytes, chunk_bytes, load_chunk, load_server};
use super::fsm::{dec, enc, ChunkRec, Command, Proposal, ServerRec, SystemOp, SystemReply};
use super::keys;
use super::raft_error;

/// Settings of the data management.
#[derive(Debug, Clone)]
pub struct DataConfig {
    /// A server silent for this long is dead: its replicas are replaced.
    pub dead_after: Duration,
    /// How often the whole chunk map is checked for missing copies.
    pub scan_every: Duration,
    /// Copies in flight at most, overall and per target server.
    pub max_repairs: usize,
    pub max_repairs_per_server: usize,
    /// A copy not reported done after this long is tried again.
    pub repair_timeout: Duration,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            dead_after: Duration::from_secs(5),
            scan_every: Duration::from_secs(10),
            max_repairs: 32,
            max_repairs_per_server: 4,
            repair_timeout: Duration::from_secs(120),
        }
    }
}

/// How often the repair loop wakes up.
const TICK: Duration = Duration::from_millis(500);
/// How often the leader looks for orphans whose hold lapsed.
const REAP_EVERY: Duration = Duration::from_secs(10);
/// Replica changes per Raft command at most.
const SYSTEM_OPS_PER_COMMAND: usize = 512;
/// Commands queued for one server at most (older ones are dropped; the
/// next scan or report recreates what still matters).
const MAX_PENDING_COMMANDS: usize = 10_000;
/// A chunk younger than this is not judged lost when a server's report
/// lacks it: its first write may not have landed yet.
const LOST_GRACE_SECS: i64 = 120;
/// Chunks a report page may list.
pub const MAX_REPORT_PAGE: usize = 65_536;

#[derive(Debug, Clone)]
struct Live {
    last_seen: Instant,
    capacity_bytes: u64,
    available_bytes: u64,
    used_bytes: u64,
    chunks: u64,
}

#[derive(Debug, Clone)]
struct Repair {
    target: ServerId,
    /// Seals its replica at the next version when the copy ends; it is
    /// rolled back if the copy fails.
    source: ServerId,
    started: Instant,
}

#[derive(Default)]
struct State {
    /// When this node last became leader (None: not leader).
    leader_since: Option<Instant>,
    live: HashMap<ServerId, Live>,
    pending: HashMap<ServerId, VecDeque<ServerCommand>>,
    repairs: HashMap<ChunkId, Repair>,
    /// Report pages received so far, per server.
    partial_reports: HashMap<ServerId, Vec<(ChunkId, u64)>>,
    /// Servers registered with this leader whose report it has not
    /// reconciled yet: never repair targets. A server back from the dead
    /// holds leftovers of the chunks being repaired; as a target its
    /// report would keep them (the copy replaces them), and once its
    /// report was answered it would serve them at their old versions.
    unreconciled: HashSet<ServerId>,
    /// When lapsed orphans were last looked for.
    last_reap: Option<Instant>,
    /// Chunks to repair first (VMs waiting for them).
    priority: BTreeSet<ChunkId>,
    corrupt_reported: u64,
    repairs_done: u64,
    last_scan: Option<Instant>,
    last_counts: (u64, u64, u64),
    /// Dead servers at the last scan: a change triggers a scan at once.
    last_dead: BTreeSet<ServerId>,
    /// `repairs_done` at the last scan: while chunks are under their goal,
    /// finished repairs trigger the next scan at once (waiting for
    /// `scan_every` held repair to a few copies per server per interval).
    scanned_done: u64,
}

/// The leader's chunk-server tracker and repair worker. Cheap to clone.
#[derive(Clone)]
pub struct DataManager {
    raft: RaftNode,
    cfg: DataConfig,
    state: Arc<Mutex<State>>,
}

impl DataManager {
    pub fn start(raft: RaftNode, cfg: DataConfig) -> Self {
        let dm = DataManager { raft, cfg, state: Arc::default() };
        tokio::spawn(dm.clone().run());
        dm
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock would be a bug elsewhere; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Repair these chunks before others.
    pub fn prioritize(&self, chunks: impl IntoIterator<Item = ChunkId>) {
        self.state().priority.extend(chunks);
    }

    fn registered(&self) -> Vec<ServerRec> {
        self.raft
            .reader()
            .with_latest(|kv| -> Result<Vec<ServerRec>, raft::KvError> {
                let rows = kv.scan_collect(&[keys::SERVER], &[keys::SERVER + 1], usize::MAX)?;
                rows.iter().map(|(_, v)| dec::<ServerRec>(v)).collect()
            })
            .unwrap_or_default()
    }

    fn is_alive(&self, st: &State, id: ServerId, now: Instant) -> bool {
        match st.live.get(&id) {
            Some(l) => now.duration_since(l.last_seen) < self.cfg.dead_after,
            // Unheard of since this leader took over: alive during the
            // first detection period, dead after it.
            None => st.leader_since.is_some_and(|t| now.duration_since(t) < self.cfg.dead_after),
        }
    }

    /// Live servers as placement sees them.
    fn placement_view(&self) -> Vec<StorageServer> {
        let now = Instant::now();
        let regs = self.registered();
        let st = self.state();
        regs.into_iter()
            .filter_map(|r| {
                let l = st.live.get(&r.id)?;
                Some(StorageServer {
                    id: r.id,
                    topology: r.topology,
                    capacity_bytes: l.capacity_bytes,
                    used_bytes: l.capacity_bytes.saturating_sub(l.available_bytes),
                    healthy: now.duration_since(l.last_seen) < self.cfg.dead_after,
                    draining: false,
                })
            })
            .collect()
    }

    /// Every registered chunk server as VM placement sees it: where, and
    /// whether its replicas can be read now.
    pub fn storage_nodes(&self) -> Vec<placement::StorageNode> {
        let now = Instant::now();
        let regs = self.registered();
        let st = self.state();
        regs.into_iter()
            .map(|r| placement::StorageNode {
                id: r.id,
                healthy: self.is_alive(&st, r.id, now) && st.live.contains_key(&r.id),
                topology: r.topology,
            })
            .collect()
    }

    /// Total and available bytes of the live servers.
    pub fn capacity(&self) -> (u64, u64) {
        let now = Instant::now();
        let st = self.state();
        st.live
            .values()
            .filter(|l| now.duration_since(l.last_seen) < self.cfg.dead_after)
            .fold((0, 0), |(t, a), l| (t + l.capacity_bytes, a + l.available_bytes))
    }

    /// Chooses replicas for the chunks that `ops` may allocate.
    pub fn place(&self, ops: &mut [Proposal]) {
        if !ops.iter().any(|p| matches!(p.op, MetaOp::PrepareWrite { .. })) {
            return;
        }
        let mut servers = self.placement_view();
        let reader = self.raft.reader().clone();
        for p in ops.iter_mut() {
            let MetaOp::PrepareWrite { ino, offset, len, .. } = p.op else { continue };
            if len == 0 {
                continue;
            }
            let lookup = reader.with_latest(|kv| -> Result<_, raft::KvError> {
                let cb = chunk_bytes(kv)?;
                let goal = super::fsm::load_inode(kv, ino)?.map(|r| r.goal).unwrap_or(Goal::DEFAULT);
                let end = offset.saturating_add(len).min(data::MAX_FILE_BYTES);
                let (first, last) = (offset / cb, end.saturating_sub(1) / cb);
                let mut missing = Vec::new();
                for index in first..=last.min(first + MAX_LAYOUT_CHUNKS - 1) {
                    if data::load_file_chunk(kv, ino, index)?.is_none() {
                        missing.push(index);
                    }
                }
                Ok((cb, goal, missing))
            });
            let Ok((cb, goal, missing)) = lookup else { continue };
            for index in missing {
                let req = ReplicaRequest {
                    copies: goal.copies,
                    spread: goal.level,
                    existing: Vec::new(),
                    exclude: Vec::new(),
                    bytes: cb,
                };
                let chosen = place_replicas(&req, &servers).map(|plan| plan.chosen).unwrap_or_default();
                // Later choices in this batch see the space these take.
                for s in servers.iter_mut().filter(|s| chosen.contains(&s.id)) {
                    s.used_bytes = s.used_bytes.saturating_add(cb);
                }
                p.placement.push((index, chosen));
            }
        }
    }

    /// Handles a message from a chunk server (leader only).
    pub async fn handle(&self, msg: ServerMsg) -> Result<ServerReply, WireError> {
        if !self.raft.is_leader() {
            return Err(super::not_leader(&self.raft));
        }
        match msg {
            ServerMsg::Register { id, addr, topology, capacity_bytes, used_bytes } => {
                if addr.parse::<std::net::SocketAddr>().is_err() {
                    return Err(WireError::new(ErrorCode::Invalid, format!("{addr:?} is not an ip:port address")));
                }
                let reply = self.system(vec![SystemOp::RegisterServer { id, addr, topology }]).await?;
                let id = match reply.first() {
                    Some(Ok(SystemReply::Server(id))) => *id,
                    Some(Err(e)) => return Err(e.clone()),
                    _ => return Err(WireError::new(ErrorCode::Internal, "registration gave no id")),
                };
                let mut st = self.state();
                st.unreconciled.insert(id);
                st.live.insert(
                    id,
                    Live {
                        last_seen: Instant::now(),
                        capacity_bytes,
                        available_bytes: capacity_bytes.saturating_sub(used_bytes),
                        used_bytes,
                        chunks: 0,
                    },
                );
                drop(st);
                let geometry =
                    self.raft.reader().with_latest(|kv| Ok::<_, raft::KvError>((chunk_bytes(kv)?, block_bytes(kv)?)));
                let (cb, bb) = geometry.map_err(|e| WireError::new(ErrorCode::Internal, e.to_string()))?;
                tracing::info!(server = id, "chunk server registered");
                Ok(ServerReply::Registered { id, chunk_bytes: cb, block_bytes: bb })
            }
            ServerMsg::Heartbeat { id, capacity_bytes, available_bytes, used_bytes, chunks } => {
                let known = self.raft.reader().with_latest(|kv| load_server(kv, id)).ok().flatten().is_some();
                if !known {
                    return Err(WireError::new(ErrorCode::NotFound, format!("chunk server {id} is not registered")));
                }
                let mut st = self.state();
                st.live.insert(
                    id,
                    Live { last_seen: Instant::now(), capacity_bytes, available_bytes, used_bytes, chunks },
                );
                let cmds: Vec<ServerCommand> = st.pending.remove(&id).map(Vec::from).unwrap_or_default();
                Ok(ServerReply::Commands(cmds))
            }
            ServerMsg::Report { id, chunks, done } => {
                if chunks.len() > MAX_REPORT_PAGE {
                    return Err(WireError::new(ErrorCode::TooBig, "report page too large"));
                }
                let all = {
                    let mut st = self.state();
                    let acc = st.partial_reports.entry(id).or_default();
                    acc.extend(chunks);
                    if !done {
                        return Ok(ServerReply::Commands(Vec::new()));
                    }
                    st.partial_reports.remove(&id).unwrap_or_default()
                };
                let cmds = self.reconcile(id, all).await;
                self.state().unreconciled.remove(&id);
                Ok(ServerReply::Commands(cmds))
            }
            ServerMsg::Corrupt { id, chunk, version } => {
                tracing::warn!(server = id, chunk, version, "replica reported corrupt");
                self.state().corrupt_reported += 1;
                self.system(vec![SystemOp::RemoveReplica { chunk, server: id }]).await?;
                Ok(ServerReply::Commands(Vec::new()))
            }
            ServerMsg::Replicated { id, chunk, version, ok, error } => {
                // The repair stays listed until its outcome is committed, so
                // a report meanwhile does not undo the source's seal.
                let repair = self.state().repairs.get(&chunk).filter(|r| r.target == id).cloned();
                if !ok {
                    tracing::warn!(server = id, chunk, error = ?error, "replication failed");
                    if let Some(r) = repair {
                        let mut st = self.state();
                        st.repairs.remove(&chunk);
                        self.unseal(&mut st, chunk, version, r.source);
                    }
                    return Ok(ServerReply::Commands(Vec::new()));
                }
                if repair.is_none() {
                    // Not ours (any more): the copy is stale for us.
                    return Ok(ServerReply::Commands(vec![ServerCommand::Delete { chunks: vec![chunk] }]));
                }
                let drop = self.dead_replicas(chunk);
                let r = self.system(vec![SystemOp::AddReplica { chunk, version, server: id, drop }]).await;
                self.state().repairs.remove(&chunk);
                let r = r?;
                if matches!(r.first(), Some(Ok(SystemReply::Done))) {
                    // Every replica moves to the version the source sealed at.
                    let raise = ServerCommand::SetVersion { chunk, from: version, to: version + 1 };
                    let replicas = self
                        .raft
                        .reader()
                        .with_latest(|kv| load_chunk(kv, chunk))
                        .ok()
                        .flatten()
                        .map(|c| c.replicas)
                        .unwrap_or_default();
                    let mut st = self.state();
                    for s in replicas.into_iter().filter(|s| *s != id) {
                        self.queue(&mut st, s, raise.clone());
                    }
                    st.repairs_done += 1;
                    st.priority.remove(&chunk);
                    Ok(ServerReply::Commands(vec![raise]))
                } else {
                    // The chunk changed or went meanwhile: drop the copy.
                    Ok(ServerReply::Commands(vec![ServerCommand::Delete { chunks: vec![chunk] }]))
                }
            }
        }
    }

    /// Takes back a source's seal after a failed copy.
    fn unseal(&self, st: &mut State, chunk: ChunkId, version: u64, source: ServerId) {
        self.queue(st, source, ServerCommand::SetVersion { chunk, from: version + 1, to: version });
    }

    fn dead_replicas(&self, chunk: ChunkId) -> Vec<ServerId> {
        let rec = self.raft.reader().with_latest(|kv| load_chunk(kv, chunk)).ok().flatten();
        let now = Instant::now();
        let st = self.state();
        rec.map(|r| r.replicas.into_iter().filter(|s| !self.is_alive(&st, *s, now)).collect()).unwrap_or_default()
    }

    /// Compares what a server holds with the chunk map; returns what it
    /// must do, and drops from the map the copies it lost.
    async fn reconcile(&self, server: ServerId, held: Vec<(ChunkId, u64)>) -> Vec<ServerCommand> {
        let reader = self.raft.reader().clone();
        let (in_repair, repairing): (HashSet<ChunkId>, HashSet<ChunkId>) = {
            let st = self.state();
            (
                st.repairs.iter().filter(|(_, r)| r.target == server).map(|(c, _)| *c).collect(),
                st.repairs.keys().copied().collect(),
            )
        };
        let now_secs = Timespec::now().secs;
        let mut delete = Vec::new();
        let mut cmds = Vec::new();
        let held_set: HashSet<ChunkId> = held.iter().map(|(c, _)| *c).collect();
        let result = reader.with_snapshot(|kv| -> Result<Vec<ChunkId>, raft::KvError> {
            for (chunk, version) in &held {
                match load_chunk(kv, *chunk)? {
                    None => delete.push(*chunk),
                    Some(rec) if !rec.replicas.contains(&server) => {
                        if !in_repair.contains(chunk) {
                            delete.push(*chunk);
                        }
                    }
                    Some(rec) if *version < rec.version => {
                        // Listed but behind: it missed a version raise.
                        cmds.push(ServerCommand::SetVersion { chunk: *chunk, from: *version, to: rec.version });
                    }
                    Some(rec) if *version > rec.version && !repairing.contains(chunk) => {
                        // Ahead: the seal of a copy that was abandoned. No
                        // write was ever made at a version the map lacks.
                        cmds.push(ServerCommand::SetVersion { chunk: *chunk, from: *version, to: rec.version });
                    }
                    Some(_) => {}
                }
            }
            // Chunks the map says it has but it does not: lost copies.
            let mut lost = Vec::new();
            kv.scan(&[keys::CHUNK], &[keys::CHUNK + 1], &mut |k, v| {
                if let (Some(id), Ok(rec)) = (keys::chunk_id(k), dec::<ChunkRec>(v)) {
                    // A copy-on-write chunk not written yet exists nowhere.
                    if rec.replicas.contains(&server)
                        && rec.origin.is_none()
                        && !held_set.contains(&id)
                        && now_secs.saturating_sub(rec.born_secs) > LOST_GRACE_SECS
                    {
                        lost.push(id);
                    }
                }
                true
            })?;
            Ok(lost)
        });
        match result {
            Ok(lost) if !lost.is_empty() => {
                tracing::warn!(server, lost = lost.len(), "server lost replicas");
                let ops: Vec<SystemOp> =
                    lost.into_iter().map(|chunk| SystemOp::RemoveReplica { chunk, server }).collect();
                for part in ops.chunks(SYSTEM_OPS_PER_COMMAND) {
                    if let Err(e) = self.system(part.to_vec()).await {
                        tracing::warn!(error = %e, "could not drop lost replicas");
                    }
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "reconcile read failed"),
        }
        if !delete.is_empty() {
            tracing::info!(server, chunks = delete.len(), "server holds chunks that are gone or stale");
            cmds.push(ServerCommand::Delete { chunks: delete });
        }
        cmds
    }

    /// Proposes system operations; returns their replies.
    pub async fn system(&self, ops: Vec<SystemOp>) -> Result<Vec<Result<SystemReply, WireError>>, WireError> {
        let cmd = Command::System { now: Timespec::now(), ops };
        let bytes = self.raft.write(enc(&cmd)).await.map_err(raft_error)?;
        postcard::from_bytes(&bytes).map_err(|e| WireError::new(ErrorCode::Internal, format!("undecodable reply: {e}")))
    }

    fn queue(&self, st: &mut State, server: ServerId, cmd: ServerCommand) {
        let q = st.pending.entry(server).or_default();
        if q.len() >= MAX_PENDING_COMMANDS {
            q.pop_front();
        }
        q.push_back(cmd);
    }

    /// Cluster health as the leader sees it.
    pub fn health(&self) -> ClusterHealth {
        let now = Instant::now();
        let regs = self.registered();
        let st = self.state();
        let mut h = ClusterHealth::default();
        for r in regs {
            let l = st.live.get(&r.id);
            let alive = self.is_alive(&st, r.id, now) && l.is_some();
            if let (true, Some(l)) = (alive, l) {
                h.total_bytes += l.capacity_bytes;
                h.available_bytes += l.available_bytes;
            }
            h.servers.push(ServerStatus {
                id: r.id,
                addr: r.addr,
                topology: r.topology,
                alive,
                last_seen_ms: l.map(|l| now.duration_since(l.last_seen).as_millis() as u64),
                capacity_bytes: l.map(|l| l.capacity_bytes).unwrap_or(0),
                used_bytes: l.map(|l| l.used_bytes).unwrap_or(0),
                available_bytes: l.map(|l| l.available_bytes).unwrap_or(0),
                chunks: l.map(|l| l.chunks).unwrap_or(0),
            });
        }
        let (chunks, under, lost) = st.last_counts;
        h.chunks = chunks;
        h.under_replicated = under;
        h.lost = lost;
        h.corrupt = st.corrupt_reported;
        h.repairs_in_flight = st.repairs.len() as u64;
        h.repairs_done = st.repairs_done;
        h.last_scan_ms = st.last_scan.map(|t| now.duration_since(t).as_millis() as u64);
        h
    }

    async fn run(self) {
        loop {
            tokio::time::sleep(TICK).await;
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
                }
            }
            if let Err(e) = self.tick().await {
                tracing::warn!(error = %e, "repair pass failed");
            }
            let reap_due = {
                let mut st = self.state();
                let due = st.last_reap.is_none_or(|t| t.elapsed() >= REAP_EVERY);
                if due {
                    st.last_reap = Some(Instant::now());
                }
                due
            };
            if reap_due {
                self.reap_orphans().await;
            }
        }
    }

    /// Removes orphans whose holders stopped renewing (a mount that died
    /// with unlinked files open).
    async fn reap_orphans(&self) {
        let now = Timespec::now();
        let lapsed = self.raft.reader().with_latest(|kv| {
            let mut any = false;
            kv.scan(&[keys::ORPHAN], &[keys::ORPHAN + 1], &mut |_, v| {
                any = dec::<Lease>(v).is_ok_and(|l| l.expires <= now);
                !any
            })?;
            Ok::<_, raft::KvError>(any)
        });
        if lapsed.unwrap_or(false) {
            if let Err(e) = self.system(vec![SystemOp::ReapOrphans]).await {
                tracing::warn!(error = %e, "could not remove lapsed orphans");
            }
        }
    }

    async fn tick(&self) -> Result<(), WireError> {
        let now = Instant::now();
        let regs = self.registered();
        let dead: BTreeSet<ServerId> = {
            let mut st = self.state();
            let expired: Vec<(ChunkId, ServerId)> = st
                .repairs
                .iter()
                .filter(|(_, r)| now.duration_since(r.started) >= self.cfg.repair_timeout)
                .map(|(c, r)| (*c, r.source))
                .collect();
            for (chunk, source) in expired {
                st.repairs.remove(&chunk);
                let version =
                    self.raft.reader().with_latest(|kv| load_chunk(kv, chunk)).ok().flatten().map(|c| c.version);
                if let Some(v) = version {
                    self.unseal(&mut st, chunk, v, source);
                }
            }
            regs.iter().map(|r| r.id).filter(|id| !self.is_alive(&st, *id, now)).collect()
        };
        let due = {
            let st = self.state();
            dead != st.last_dead
                || !st.priority.is_empty()
                || (st.last_counts.1 > 0 && st.repairs_done != st.scanned_done)
                || st.last_scan.is_none_or(|t| now.duration_since(t) >= self.cfg.scan_every)
        };
        if !due {
            return Ok(());
        }
        let addrs: HashMap<ServerId, String> = regs.iter().map(|r| (r.id, r.addr.clone())).collect();
        let servers = self.placement_view();
        let reader = self.raft.reader().clone();
        // One pass over the chunk map: count, and pick what to repair.
        let mut wanted: Vec<(bool, ChunkId, ChunkRec)> = Vec::new();
        let mut cleanup: Vec<SystemOp> = Vec::new();
        let (mut total, mut under, mut lost) = (0u64, 0u64, 0u64);
        let priority = self.state().priority.clone();
        let scan = reader.with_snapshot(|kv| {
            kv.scan(&[keys::CHUNK], &[keys::CHUNK + 1], &mut |k, v| {
                let (Some(id), Ok(rec)) = (keys::chunk_id(k), dec::<ChunkRec>(v)) else { return true };
                total += 1;
                if rec.origin.is_some() {
                    // Copy-on-write, not written yet: no replica holds it to
                    // copy from; its writer makes it on every replica.
                    return true;
                }
                let live: Vec<ServerId> = rec.replicas.iter().copied().filter(|s| !dead.contains(s)).collect();
                if live.is_empty() {
                    lost += 1;
                } else if live.len() < rec.goal.copies as usize {
                    under += 1;
                    wanted.push((priority.contains(&id), id, rec));
                } else if live.len() < rec.replicas.len() {
                    // Enough live copies: forget the dead ones.
                    for s in rec.replicas.iter().filter(|s| dead.contains(s)) {
                        cleanup.push(SystemOp::RemoveReplica { chunk: id, server: *s });
                    }
                } else if live.len() > rec.goal.copies as usize {
                    // Over the goal (it was lowered): drop the extra copies.
                    for s in &live[rec.goal.copies as usize..] {
                        cleanup.push(SystemOp::RemoveReplica { chunk: id, server: *s });
                    }
                }
                true
            })
        });
        if let Err(e) = scan {
            return Err(WireError::new(ErrorCode::Io, e.to_string()));
        }
        // Priority chunks first, then in chunk order.
        wanted.sort_by_key(|(p, id, _)| (!*p, *id));
        let cb = reader.with_latest(chunk_bytes).unwrap_or(DEFAULT_CHUNK_BYTES);
        {
            let mut st = self.state();
            st.last_scan = Some(now);
            st.scanned_done = st.repairs_done;
            st.last_counts = (total, under, lost);
            st.last_dead = dead.clone();
            let mut per_target: HashMap<ServerId, usize> = HashMap::new();
            for r in st.repairs.values() {
                *per_target.entry(r.target).or_default() += 1;
            }
            for (_, id, rec) in wanted {
                if st.repairs.len() >= self.cfg.max_repairs {
                    break;
                }
                if st.repairs.contains_key(&id) {
                    continue;
                }
                let live: Vec<ServerId> = rec.replicas.iter().copied().filter(|s| !dead.contains(s)).collect();
                let Some(&source_id) = live.first() else { continue };
                let Some(source) = addrs.get(&source_id).cloned() else { continue };
                let busy: Vec<ServerId> = per_target
                    .iter()
                    .filter(|(_, n)| **n >= self.cfg.max_repairs_per_server)
                    .map(|(s, _)| *s)
                    .collect();
                let req = ReplicaRequest {
                    copies: (live.len() + 1).min(Goal::MAX_COPIES as usize) as u8,
                    spread: rec.goal.level,
                    existing: live.clone(),
                    exclude: rec.replicas.iter().copied().chain(busy).chain(st.unreconciled.iter().copied()).collect(),
                    bytes: cb,
                };
                let Ok(plan) = place_replicas(&req, &servers) else { continue };
                let Some(&target) = plan.chosen.first() else { continue };
                st.repairs.insert(id, Repair { target, source: source_id, started: now });
                *per_target.entry(target).or_default() += 1;
                self.queue(&mut st, target, ServerCommand::Replicate { chunk: id, version: rec.version, source });
            }
        }
        for part in cleanup.chunks(SYSTEM_OPS_PER_COMMAND) {
            self.system(part.to_vec()).await?;
        }
        Ok(())
    }
}
