//! The metadata service: namespace operations through Raft, linearizable
//! reads, cluster administration and the change stream.
//!
//! Writes from all clients are packed into batches ([`MAX_BATCH_OPS`] at
//! most, [`MAX_INFLIGHT_BATCHES`] in flight): one Raft entry, one replicated
//! append and one fsync per batch, so throughput grows with concurrency.

mod clone;
pub mod cluster;
pub mod data;
pub mod fsm;
#[cfg(test)]
mod fsm_tests;
pub mod keys;
pub mod read;
pub mod sched;
pub mod vm;
#[cfg(test)]
mod vm_tests;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fs_client::frame;
use fs_client::proto::*;
use fs_client::tls::Role;
use raft::{KvReadExt, RaftNode, RaftNodeError};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::metrics::Metrics;
use fsm::{enc, Command, OpResult};
use read::Capacity;

/// Most operations in one Raft entry.
pub const MAX_BATCH_OPS: usize = 1024;
/// Batches proposed and not yet applied, at most.
pub const MAX_INFLIGHT_BATCHES: usize = 1;
/// Operations waiting for a batch, at most; beyond it callers wait.
const OP_QUEUE: usize = 65_536;
/// How long a write may wait for commit before the client is told to retry.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a read may wait for the read index.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long adding a node may take (it must catch up first).
const ADD_NODE_TIMEOUT: Duration = Duration::from_secs(120);
/// Change records sent per read of the history.
const STREAM_CHUNK: usize = 256;
/// An idle change stream reports the applied index this often.
const STREAM_IDLE: Duration = Duration::from_secs(5);

/// Operations from one request, proposed together and answered together.
struct PendingOps {
    ops: Vec<(Option<RequestId>, MetaOp)>,
    reply: oneshot::Sender<Vec<OpResult>>,
}

/// The metadata service of one node. Cheap to clone.
#[derive(Clone)]
pub struct MetaService {
    raft: RaftNode,
    /// The cluster's chunk and block size are recorded (see [`init_root`]).
    initialized: Arc<std::sync::atomic::AtomicBool>,
    ops: mpsc::Sender<PendingOps>,
    data: cluster::DataManager,
    sched: sched::Scheduler,
    metrics: Arc<Metrics>,
}

/// `NotLeader`, with the leader this node knows of as a hint.
pub fn not_leader(raft: &RaftNode) -> WireError {
    WireError {
        code: ErrorCode::NotLeader,
        message: "not the leader".into(),
        leader: raft.leader().map(|(id, addr)| LeaderHint { id, addr }),
    }
}

pub fn raft_error(e: RaftNodeError) -> WireError {
    match e {
        RaftNodeError::NotLeader { leader_id, leader_addr } => WireError {
            code: ErrorCode::NotLeader,
            message: format!("not the leader; leader is {leader_id:?}"),
            leader: leader_id.map(|id| LeaderHint { id, addr: leader_addr.unwrap_or_default() }),
        },
        RaftNodeError::NoQuorum(m) => WireError::new(ErrorCode::Unavailable, format!("no quorum: {m}")),
        RaftNodeError::Membership(m) => WireError::new(ErrorCode::Busy, m),
        other => WireError::new(ErrorCode::Unavailable, other.to_string()),
    }
}

impl MetaService {
    /// Starts the service on a running Raft node. `chunk_bytes` is the
    /// chunk size a new cluster gets (an existing one keeps its own).
    pub fn start(
        raft: RaftNode,
        metrics: Arc<Metrics>,
        data_cfg: cluster::DataConfig,
        sched_cfg: sched::SchedConfig,
        chunk_bytes: u64,
    ) -> Self {
        let (tx, rx) = mpsc::channel(OP_QUEUE);
        let data = cluster::DataManager::start(raft.clone(), data_cfg);
        let sched = sched::Scheduler::start(raft.clone(), data.clone(), sched_cfg);
        tokio::spawn(batch_loop(raft.clone(), rx, metrics.clone(), data.clone()));
        tokio::spawn(init_root(raft.clone(), chunk_bytes));
        MetaService { raft, initialized: Arc::default(), ops: tx, data, sched, metrics }
    }

    /// Whether the cluster's geometry is in the applied state. Until it
    /// is, nothing but status and pings is answered: a chunk server that
    /// registered earlier would format its store with another block size,
    /// and a file written earlier would be cut into other chunks.
    fn initialized(&self) -> bool {
        use std::sync::atomic::Ordering;
        if self.initialized.load(Ordering::Relaxed) {
            return true;
        }
        let set = self.raft.reader().with_latest(|kv| fsm::get_counter(kv, fsm::CHUNK_BYTES)).is_ok_and(|c| c != 0);
        if set {
            self.initialized.store(true, Ordering::Relaxed);
        }
        set
    }

    pub fn raft(&self) -> &RaftNode {
        &self.raft
    }

    /// Answers one request (not `Subscribe`, see [`Self::serve_subscription`]).
    pub async fn handle(&self, role: Role, request: Request) -> Response {
        let started = Instant::now();
        let label = match &request {
            Request::Op { op, .. } => op.name(),
            Request::Read(r) => read_name(r),
            Request::Admin(_) => "admin",
            Request::Subscribe { .. } => "subscribe",
            Request::Ping => "ping",
            Request::Ops(_) => "ops",
            Request::Reads(_) => "reads",
            Request::Server(_) => "server",
            Request::Vm(VmRequest::Op(_)) => "vm_op",
            Request::Vm(VmRequest::Read(_)) => "vm_read",
            Request::Host(_) => "host",
        };
        let resp = self.dispatch(role, request).await;
        self.metrics.observe(label, started.elapsed(), resp.as_ref().err().map(|e| e.code));
        resp
    }

    async fn dispatch(&self, role: Role, request: Request) -> Response {
        let exempt = matches!(request, Request::Ping | Request::Admin(AdminOp::Status));
        if !exempt && !self.initialized() {
            return Err(WireError::new(ErrorCode::Unavailable, "the cluster is initializing; retry shortly"));
        }
        match request {
            Request::Ping => Ok(Reply::Pong { node_id: self.raft.id() }),
            Request::Op { id, op } => self.write(Some(id), op).await.map(Reply::Op),
            Request::Read(r) => self.read(&r).await.map(Reply::Read),
            Request::Admin(op) => {
                if !matches!(op, AdminOp::Status) && !matches!(role, Role::Admin | Role::Node) {
                    return Err(WireError::new(
                        ErrorCode::Unauthorized,
                        format!("{op:?} needs an admin certificate; this one is {}", role.as_str()),
                    ));
                }
                self.admin(op).await.map(Reply::Admin)
            }
            Request::Subscribe { .. } => Err(WireError::new(ErrorCode::BadRequest, "subscribe needs its own stream")),
            Request::Ops(ops) => {
                if ops.len() > MAX_BATCH_ENTRIES {
                    return Err(WireError::new(ErrorCode::TooBig, format!("{} operations in one request", ops.len())));
                }
                // Redirect the whole batch rather than fail each entry.
                self.require_leader()?;
                Ok(Reply::Ops(self.write_many(ops).await))
            }
            Request::Server(msg) => {
                if role != Role::Node {
                    return Err(WireError::new(
                        ErrorCode::Unauthorized,
                        format!("chunk server messages need a node certificate; this one is {}", role.as_str()),
                    ));
                }
                self.data.handle(msg).await.map(Reply::Server)
            }
            Request::Vm(VmRequest::Op(op)) => {
                if role == Role::Node {
                    return Err(WireError::new(ErrorCode::Unauthorized, "VM changes come from clients"));
                }
                self.sched.client_op(op).await.map(Reply::Vm)
            }
            Request::Vm(VmRequest::Read(r)) => {
                self.read_barrier().await?;
                let root = self.sched.vm_root();
                let res = self.raft.reader().with_latest(|kv| vm::query(kv, &r, root));
                match res {
                    Ok(r) => r.map(Reply::Vm),
                    Err(e) => Err(WireError::new(ErrorCode::Io, e.to_string())),
                }
            }
            Request::Host(msg) => {
                if role != Role::Host {
                    return Err(WireError::new(
                        ErrorCode::Unauthorized,
                        format!("host agent messages need a host certificate; this one is {}", role.as_str()),
                    ));
                }
                self.sched.host_msg(msg).await.map(Reply::Host)
            }
            Request::Reads(reads) => {
                if reads.len() > MAX_BATCH_ENTRIES {
                    return Err(WireError::new(ErrorCode::TooBig, format!("{} reads in one request", reads.len())));
                }
                self.read_barrier().await?;
                Ok(Reply::Reads(self.query_many(&reads)))
            }
        }
    }

    /// Proposes operations through the batcher together; results in order.
    pub async fn write_many(&self, ops: Vec<(RequestId, MetaOp)>) -> Vec<OpResult> {
        let n = ops.len();
        self.propose_group(ops.into_iter().map(|(id, op)| (Some(id), op)).collect())
            .await
            .unwrap_or_else(|e| vec![Err(e); n])
    }

    async fn propose_group(&self, ops: Vec<(Option<RequestId>, MetaOp)>) -> Result<Vec<OpResult>, WireError> {
        let stopping = || WireError::new(ErrorCode::Unavailable, "metadata service stopping");
        let (tx, rx) = oneshot::channel();
        self.ops.send(PendingOps { ops, reply: tx }).await.map_err(|_| stopping())?;
        rx.await.map_err(|_| stopping())
    }

    /// Waits for the read index: reads after it are linearizable.
    async fn read_barrier(&self) -> Result<(), WireError> {
        match tokio::time::timeout(READ_TIMEOUT, self.raft.read_barrier()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(raft_error(e)),
            Err(_) => Err(WireError::new(ErrorCode::Unavailable, "read index timed out")),
        }
    }

    /// Answers reads from one point-in-time view (after a read barrier).
    fn query_many(&self, reads: &[MetaRead]) -> Vec<Result<ReadReply, WireError>> {
        if reads.iter().any(|r| matches!(r, MetaRead::Health | MetaRead::Now)) {
            return reads
                .iter()
                .map(|r| match r {
                    MetaRead::Health => Ok(ReadReply::Health(self.data.health())),
                    // The leader's clock (reads are answered by the leader),
                    // the one that stamps lease expiries.
                    MetaRead::Now => Ok(ReadReply::Now(Timespec::now())),
                    other => self
                        .query_many(std::slice::from_ref(other))
                        .pop()
                        .unwrap_or_else(|| Err(WireError::new(ErrorCode::Internal, "no result"))),
                })
                .collect();
        }
        let res = self.raft.reader().with_snapshot(|kv| -> Result<Vec<_>, raft::KvError> {
            if fsm::load_inode(kv, ROOT_INO)?.is_none() {
                let e = WireError::new(ErrorCode::Unavailable, "namespace not initialized yet");
                return Ok(reads.iter().map(|_| Err(e.clone())).collect());
            }
            reads.iter().map(|r| read::query(kv, r, self.capacity())).collect()
        });
        match res {
            Ok(v) => v,
            Err(e) => reads.iter().map(|_| Err(WireError::new(ErrorCode::Io, e.to_string()))).collect(),
        }
    }

    /// Proposes one operation through the batcher.
    pub async fn write(&self, id: Option<RequestId>, op: MetaOp) -> OpResult {
        self.propose_group(vec![(id, op)])
            .await?
            .pop()
            .unwrap_or_else(|| Err(WireError::new(ErrorCode::Internal, "no result")))
    }

    /// A linearizable read.
    pub async fn read(&self, r: &MetaRead) -> Result<ReadReply, WireError> {
        self.read_barrier().await?;
        self.query_many(std::slice::from_ref(r))
            .pop()
            .unwrap_or_else(|| Err(WireError::new(ErrorCode::Internal, "no result")))
    }

    fn capacity(&self) -> Capacity {
        let (total_bytes, free_bytes) = self.data.capacity();
        Capacity { total_bytes, free_bytes }
    }

    async fn admin(&self, op: AdminOp) -> Result<AdminReply, WireError> {
        match op {
            AdminOp::Status => Ok(AdminReply::Status(self.status())),
            AdminOp::AddNode { id, addr } => {
                self.require_leader()?;
                if addr.parse::<std::net::SocketAddr>().is_err() {
                    return Err(WireError::new(ErrorCode::Invalid, format!("{addr:?} is not an ip:port address")));
                }
                let voters = self.voters();
                if voters.contains(&id) {
                    return Err(WireError::new(ErrorCode::Exists, format!("node {id} is already a voter")));
                }
                let add = async {
                    self.raft.add_learner(id, addr).await?;
                    let mut v = self.voters();
                    v.insert(id);
                    self.raft.change_voters(v).await
                };
                match tokio::time::timeout(ADD_NODE_TIMEOUT, add).await {
                    Ok(r) => r.map_err(raft_error)?,
                    Err(_) => return Err(WireError::new(ErrorCode::Timeout, "the new node did not catch up in time")),
                }
                Ok(AdminReply::Done)
            }
            AdminOp::RemoveNode { id } => {
                self.require_leader()?;
                let mut v = self.voters();
                if !v.remove(&id) {
                    return Err(WireError::new(ErrorCode::NotFound, format!("node {id} is not a voter")));
                }
                if v.is_empty() {
                    return Err(WireError::new(ErrorCode::Invalid, "cannot remove the last voter"));
                }
                self.raft.change_voters(v).await.map_err(raft_error)?;
                Ok(AdminReply::Done)
            }
            AdminOp::Snapshot => {
                self.raft.trigger_snapshot().await.map_err(raft_error)?;
                Ok(AdminReply::Done)
            }
        }
    }

    fn require_leader(&self) -> Result<(), WireError> {
        if self.raft.is_leader() {
            return Ok(());
        }
        Err(not_leader(&self.raft))
    }

    fn voters(&self) -> BTreeSet<u64> {
        self.raft.metrics().membership_config.membership().voter_ids().collect()
    }

    /// The cluster as this node sees it.
    pub fn status(&self) -> ClusterStatus {
        let m = self.raft.metrics();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let last_log = m.last_log_index.unwrap_or(0);
        let applied = m.last_applied.map(|l| l.index).unwrap_or(0);
        let matched = |id: u64| -> Option<u64> {
            if id == m.id {
                return Some(last_log);
            }
            m.replication.as_ref()?.get(&id).map(|l| l.map(|l| l.index).unwrap_or(0))
        };
        let is_leader = m.state == raft::ServerState::Leader;
        let commit_index = if is_leader {
            // The highest index a majority of voters holds.
            let mut v: Vec<u64> = voters.iter().map(|&id| matched(id).unwrap_or(0)).collect();
            v.sort_unstable_by(|a, b| b.cmp(a));
            v.get(voters.len() / 2).copied().unwrap_or(0)
        } else {
            applied
        };
        let members = membership
            .nodes()
            .map(|(id, node)| {
                let mi = if is_leader { matched(*id) } else { None };
                MemberStatus {
                    id: *id,
                    addr: node.addr.clone(),
                    voter: voters.contains(id),
                    matched_index: mi,
                    lag: mi.map(|x| last_log.saturating_sub(x)),
                }
            })
            .collect();
        ClusterStatus {
            node_id: m.id,
            state: format!("{:?}", m.state),
            leader_id: m.current_leader,
            term: m.current_term,
            last_log_index: last_log,
            commit_index,
            applied_index: applied,
            snapshot_index: m.snapshot.map(|s| s.index),
            members,
        }
    }

    /// Streams changes from `from` on `send` until the client goes away.
    pub async fn serve_subscription(&self, mut send: quinn::SendStream, from: u64) {
        if let Err(e) = self.stream_changes(&mut send, from).await {
            tracing::debug!(error = %e, "change stream ended");
        }
        let _ = send.finish();
    }

    async fn stream_changes(&self, send: &mut quinn::SendStream, from: u64) -> Result<(), frame::FrameError> {
        let mut next = from.max(1);
        let mut applied_rx = self.raft.applied_watch();
        let reader = self.raft.reader().clone();
        loop {
            let floor = reader
                .with_latest(|kv| fsm::get_counter(kv, fsm::CHANGE_FLOOR))
                .map_err(|e| frame::FrameError::Stream(e.to_string()))?;
            if next <= floor {
                next = self.send_snapshot(send).await? + 1;
                continue;
            }
            // Read the applied index before the scan: the state machine
            // writes an entry before it announces it, so the scan sees every
            // entry up to `applied`. Read after, it could name entries
            // applied since the scan, and skipping to it would lose them.
            let applied = *applied_rx.borrow_and_update();
            let start = keys::change(next);
            let end = raft::kv::prefix_end(&[keys::CHANGE]).expect("non-0xFF prefix");
            let rows = reader
                .with_latest(|kv| kv.scan_collect(&start, &end, STREAM_CHUNK))
                .map_err(|e| frame::FrameError::Stream(e.to_string()))?;
            if !rows.is_empty() {
                for (k, v) in rows {
                    let Some(index) = keys::change_index(&k) else {
                        continue;
                    };
                    let changes: Vec<Change> = fsm::dec(&v).map_err(|e| frame::FrameError::Decode(e.to_string()))?;
                    frame::write_frame(send, &StreamItem::Changes { index, changes }).await?;
                    next = index + 1;
                }
                continue;
            }
            if applied >= next {
                // Entries without changes: nothing to send, move on.
                next = applied + 1;
                continue;
            }
            match tokio::time::timeout(STREAM_IDLE, applied_rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Ok(()),
                Err(_) => frame::write_frame(send, &StreamItem::Idle { applied }).await?,
            }
        }
    }

    /// Sends the whole namespace as one snapshot; returns its index.
    async fn send_snapshot(&self, send: &mut quinn::SendStream) -> Result<u64, frame::FrameError> {
        // Collect from one point-in-time view, then send without holding it.
        let (index, batches) = self
            .raft
            .reader()
            .with_snapshot(|kv| -> Result<(u64, Vec<Vec<Change>>), raft::KvError> {
                let index = fsm::get_counter(kv, fsm::APPLIED)?;
                let mut batches = Vec::new();
                let mut cur = Vec::new();
                let mut err = None;
                for prefix in [keys::INODE, keys::DENTRY] {
                    kv.scan(&[prefix], &[prefix + 1], &mut |k, v| {
                        let change = if prefix == keys::INODE {
                            fsm::dec::<fsm::InodeRec>(v).map(|r| Change::InodeSet(r.attr))
                        } else {
                            fsm::dec::<fsm::DentryRec>(v).and_then(|d| {
                                let (parent, name) =
                                    keys::dentry_from_key(k).ok_or_else(|| raft::KvError("bad dentry key".into()))?;
                                Ok(Change::EntrySet { parent, name: name.to_vec(), ino: d.ino, kind: d.kind })
                            })
                        };
                        match change {
                            Ok(c) => cur.push(c),
                            Err(e) => {
                                err = Some(e);
                                return false;
                            }
                        }
                        if cur.len() >= STREAM_CHUNK {
                            batches.push(std::mem::take(&mut cur));
                        }
                        true
                    })?;
                }
                if let Some(e) = err {
                    return Err(e);
                }
                if !cur.is_empty() {
                    batches.push(cur);
                }
                Ok((index, batches))
            })
            .map_err(|e| frame::FrameError::Stream(e.to_string()))?;
        frame::write_frame(send, &StreamItem::SnapshotBegin { index }).await?;
        for changes in batches {
            frame::write_frame(send, &StreamItem::Changes { index, changes }).await?;
        }
        frame::write_frame(send, &StreamItem::SnapshotEnd { index }).await?;
        Ok(index)
    }
}

fn read_name(r: &MetaRead) -> &'static str {
    match r {
        MetaRead::Lookup { .. } => "lookup",
        MetaRead::GetAttr { .. } => "getattr",
        MetaRead::ReadDir { .. } => "readdir",
        MetaRead::Readlink { .. } => "readlink",
        MetaRead::GetXattr { .. } => "getxattr",
        MetaRead::ListXattr { .. } => "listxattr",
        MetaRead::StatFs => "statfs",
        MetaRead::Resolve { .. } => "resolve",
        MetaRead::Layout { .. } => "layout",
        MetaRead::GetGoal { .. } => "get_goal",
        MetaRead::GetQuota { .. } => "get_quota",
        MetaRead::Health => "health",
        MetaRead::Now => "now",
    }
}

/// Packs queued operations into Raft entries.
async fn batch_loop(
    raft: RaftNode,
    mut rx: mpsc::Receiver<PendingOps>,
    metrics: Arc<Metrics>,
    data: cluster::DataManager,
) {
    let slots = Arc::new(Semaphore::new(MAX_INFLIGHT_BATCHES));
    while let Some(first) = rx.recv().await {
        // Wait for a slot first: operations arriving meanwhile join this batch.
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut count = first.ops.len();
        let mut batch = vec![first];
        while count < MAX_BATCH_OPS {
            match rx.try_recv() {
                Ok(p) => {
                    count += p.ops.len();
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        metrics.batch_size.observe(count as f64);
        let (raft, data) = (raft.clone(), data.clone());
        tokio::spawn(async move {
            propose(&raft, &data, batch, count).await;
            drop(permit);
        });
    }
}

async fn propose(raft: &RaftNode, data: &cluster::DataManager, batch: Vec<PendingOps>, count: usize) {
    let mut ops = Vec::with_capacity(count);
    for p in &batch {
        ops.extend(p.ops.iter().map(|(id, op)| fsm::Proposal::new(*id, op.clone())));
    }
    data.place(&mut ops);
    let cmd = Command::Batch { now: Timespec::now(), ops };
    let outcome = match tokio::time::timeout(WRITE_TIMEOUT, raft.write(enc(&cmd))).await {
        Ok(Ok(bytes)) => match postcard::from_bytes::<Vec<OpResult>>(&bytes) {
            Ok(results) if results.len() == count => Ok(results),
            Ok(results) => {
                Err(WireError::new(ErrorCode::Internal, format!("{} results for {count} operations", results.len())))
            }
            Err(e) => Err(WireError::new(ErrorCode::Internal, format!("undecodable reply: {e}"))),
        },
        Ok(Err(e)) => Err(raft_error(e)),
        // The entry may still commit; the client retries with the same
        // request id and gets the stored result.
        Err(_) => Err(WireError::new(ErrorCode::Timeout, "commit timed out")),
    };
    match outcome {
        Ok(results) => {
            let mut results = results.into_iter();
            for p in batch {
                let mine: Vec<OpResult> = results.by_ref().take(p.ops.len()).collect();
                let _ = p.reply.send(mine);
            }
        }
        Err(e) => {
            for p in batch {
                let _ = p.reply.send(vec![Err(e.clone()); p.ops.len()]);
            }
        }
    }
}

/// Records the cluster's chunk and block size (and creates the root) once
/// this node leads a cluster that has none. A cluster that got chunk
/// servers or chunks before either was recorded (registration could win
/// that race before requests waited for it) keeps the sizes they were
/// made with: the defaults of the time.
async fn init_root(raft: RaftNode, chunk_bytes: u64) {
    loop {
        let geometry = raft.reader().with_latest(|kv| {
            let recorded = fsm::get_counter(kv, fsm::CHUNK_BYTES)? != 0;
            let in_use = !kv.scan_collect(&[keys::SERVER], &[keys::SERVER + 1], 1)?.is_empty()
                || !kv.scan_collect(&[keys::CHUNK], &[keys::CHUNK + 1], 1)?.is_empty();
            Ok::<_, raft::KvError>((recorded, in_use))
        });
        let (recorded, in_use) = match geometry {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the cluster's geometry");
                (false, true)
            }
        };
        if recorded {
            return;
        }
        if raft.is_leader() {
            let (chunk_bytes, block_bytes) =
                if in_use { (DEFAULT_CHUNK_BYTES, LEGACY_BLOCK_BYTES) } else { (chunk_bytes, DEFAULT_BLOCK_BYTES) };
            let cmd = Command::InitBlocks { now: Timespec::now(), chunk_bytes, block_bytes };
            if let Err(e) = raft.write(enc(&cmd)).await {
                tracing::debug!(error = %e, "root init not committed yet");
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
