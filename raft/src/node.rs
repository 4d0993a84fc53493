//! [`RaftNode`]: one running Raft member and the handle the domain uses.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::{BasicNode, ChangeMembers, Config, ServerState, SnapshotPolicy};
use tokio::sync::{mpsc, oneshot, watch};

use crate::network::{serve_peer, LeaderAcks, RaftTransport};
use crate::storage::{self, KvReader, StoreOpenError};
use crate::types::{Command, NodeId, Raft, RaftMetrics};
use crate::StateMachineLogic;

/// Settings of one node.
#[derive(Debug, Clone)]
pub struct RaftNodeConfig {
    pub node_id: NodeId,
    pub data_dir: PathBuf,
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many applied entries.
    pub snapshot_every_entries: u64,
    /// Entries kept in the log behind a snapshot, so briefly lagging
    /// followers catch up from the log rather than a snapshot.
    pub keep_entries_after_snapshot: u64,
}

impl RaftNodeConfig {
    pub fn new(node_id: NodeId, data_dir: PathBuf) -> Self {
        RaftNodeConfig {
            node_id,
            data_dir,
            // openraft's leader lease is the maximum election timeout: a
            // follower refuses votes until it passes, so a narrow range
            // makes failover take one election round, not two.
            // A follower campaigns lease + timeout after the last heartbeat
            // (0.75-0.9 s); a second round, when the first candidate's log
            // was behind, still ends near 2 s.
            heartbeat_ms: 100,
            election_timeout_min_ms: 300,
            election_timeout_max_ms: 450,
            snapshot_every_entries: 20_000,
            keep_entries_after_snapshot: 2_000,
        }
    }
}

/// Errors of the node handle. `NotLeader` and `NoQuorum` are for the caller
/// to retry or redirect; the others mean this node is broken or stopping.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RaftNodeError {
    #[error("not the leader (leader: {leader_id:?} at {leader_addr:?})")]
    NotLeader { leader_id: Option<NodeId>, leader_addr: Option<String> },
    #[error("no quorum: {0}")]
    NoQuorum(String),
    #[error("membership change refused: {0}")]
    Membership(String),
    #[error("raft stopped: {0}")]
    Stopped(String),
    #[error("store: {0}")]
    Store(String),
    #[error("config: {0}")]
    Config(String),
}

impl From<StoreOpenError> for RaftNodeError {
    fn from(e: StoreOpenError) -> Self {
        RaftNodeError::Store(e.to_string())
    }
}

fn client_write_err(e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> RaftNodeError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            RaftNodeError::NotLeader { leader_id: f.leader_id, leader_addr: f.leader_node.map(|n| n.addr) }
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => RaftNodeError::Membership(c.to_string()),
        RaftError::Fatal(f) => RaftNodeError::Stopped(f.to_string()),
    }
}

/// How many read requests wait for one read-index round at most.
const READ_QUEUE: usize = 65_536;

/// A running Raft member. Cheap to clone.
#[derive(Clone)]
pub struct RaftNode {
    inner: Arc<Inner>,
}

struct Inner {
    id: NodeId,
    raft: Raft,
    reader: KvReader,
    applied: watch::Receiver<u64>,
    incoming_dir: PathBuf,
    reads: mpsc::Sender<oneshot::Sender<Result<(), RaftNodeError>>>,
    acks: LeaderAcks,
    /// How long a quorum's acceptance of this node's leadership lets it
    /// answer reads without asking again (see [`RaftNode::read_barrier`]).
    read_lease: Duration,
}

impl RaftNode {
    /// Opens the store in `cfg.data_dir` and starts the Raft core.
    pub async fn start(
        cfg: RaftNodeConfig,
        logic: Arc<dyn StateMachineLogic>,
        transport: RaftTransport,
    ) -> Result<Self, RaftNodeError> {
        let (log_store, sm) = storage::open(&cfg.data_dir, logic)?;
        let acks = transport.acks();
        // Well inside the time a follower that heard from this leader
        // refuses to vote for another (openraft's leader lease is the
        // election timeout's upper bound, and no follower even starts an
        // election before its lower bound).
        let read_lease = Duration::from_millis(cfg.election_timeout_min_ms / 2);
        let reader = sm.reader();
        let applied = sm.applied_watch();
        let config = Config {
            cluster_name: "locus".into(),
            heartbeat_interval: cfg.heartbeat_ms,
            election_timeout_min: cfg.election_timeout_min_ms,
            election_timeout_max: cfg.election_timeout_max_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.snapshot_every_entries),
            max_in_snapshot_log_to_keep: cfg.keep_entries_after_snapshot,
            // openraft 0.9 gives an AppendEntries RPC one heartbeat interval:
            // keep each append small enough to fit in it during catch-up.
            max_payload_entries: 32,
            install_snapshot_timeout: 10_000,
            ..Default::default()
        };
        let config = Arc::new(config.validate().map_err(|e| RaftNodeError::Config(e.to_string()))?);
        let raft = Raft::new(cfg.node_id, config, transport, log_store, sm)
            .await
            .map_err(|e| RaftNodeError::Stopped(e.to_string()))?;
        let (reads_tx, reads_rx) = mpsc::channel(READ_QUEUE);
        tokio::spawn(read_index_loop(raft.clone(), reads_rx));
        Ok(RaftNode {
            inner: Arc::new(Inner {
                id: cfg.node_id,
                raft,
                reader,
                applied,
                incoming_dir: cfg.data_dir.join("snapshots").join("incoming"),
                reads: reads_tx,
                acks,
                read_lease,
            }),
        })
    }

    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// The openraft handle, for what this wrapper does not cover.
    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    /// Forms a new cluster of `members` (id to address). Does nothing when
    /// this node already belongs to an initialized cluster.
    pub async fn initialize(&self, members: BTreeMap<NodeId, String>) -> Result<(), RaftNodeError> {
        let nodes: BTreeMap<NodeId, BasicNode> =
            members.into_iter().map(|(id, addr)| (id, BasicNode { addr })).collect();
        match self.inner.raft.initialize(nodes).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
            Err(RaftError::APIError(e)) => Err(RaftNodeError::Config(e.to_string())),
            Err(RaftError::Fatal(f)) => Err(RaftNodeError::Stopped(f.to_string())),
        }
    }

    /// Proposes `command`; returns the domain's reply once it is committed
    /// and applied here.
    pub async fn write(&self, command: Vec<u8>) -> Result<Vec<u8>, RaftNodeError> {
        let resp = self.inner.raft.client_write(Command(command)).await.map_err(client_write_err)?;
        Ok(resp.data.0)
    }

    /// Waits until this node is the leader of a quorum and has applied
    /// everything committed before the call: reads after it are
    /// linearizable. Concurrent callers share one round of heartbeats.
    ///
    /// A leader that a quorum accepted (in `AppendEntries` sent within the
    /// last [`Inner::read_lease`], half the election timeout's lower
    /// bound) and that has applied an entry of its own term answers at
    /// once: no other leader can have been elected meanwhile, since each
    /// of those peers refuses votes for the election timeout after it
    /// heard from this one, and everything acknowledged to any client is
    /// applied here. Otherwise it confirms with a round of heartbeats.
    pub async fn read_barrier(&self) -> Result<(), RaftNodeError> {
        if self.holds_read_lease() {
            return Ok(());
        }
        let (tx, rx) = oneshot::channel();
        self.inner.reads.send(tx).await.map_err(|_| RaftNodeError::Stopped("read-index loop stopped".into()))?;
        rx.await.map_err(|_| RaftNodeError::Stopped("read-index loop stopped".into()))?
    }

    /// Whether this node is the leader under a lease (see [`Self::read_barrier`]).
    fn holds_read_lease(&self) -> bool {
        let now = std::time::Instant::now();
        let Some(since) = now.checked_sub(self.inner.read_lease) else { return false };
        let m = self.metrics();
        if m.state != ServerState::Leader || m.current_leader != Some(self.inner.id) {
            return false;
        }
        // Entries of earlier terms are applied once one of this term is.
        if m.last_applied.is_none_or(|l| l.leader_id.term != m.current_term) {
            return false;
        }
        let membership = m.membership_config.membership();
        let configs = membership.get_joint_config();
        if configs.len() != 1 {
            return false;
        }
        let voters = &configs[0];
        let mut accepted = self.inner.acks.accepted_since(&m.vote, since);
        accepted.push(self.inner.id);
        let votes = voters.iter().filter(|v| accepted.contains(v)).count();
        votes > voters.len() / 2
    }

    /// Reads of the applied state.
    pub fn reader(&self) -> &KvReader {
        &self.inner.reader
    }

    /// Follows the last applied index.
    pub fn applied_watch(&self) -> watch::Receiver<u64> {
        self.inner.applied.clone()
    }

    pub fn metrics(&self) -> RaftMetrics {
        self.inner.raft.metrics().borrow().clone()
    }

    /// Resolves when the Raft core has stopped (a shutdown, or a fatal
    /// error such as a panic inside it), with why. A node whose core is
    /// gone answers nothing ever again; its process should exit so that
    /// its supervisor starts it afresh from its durable state.
    pub async fn stopped(&self) -> String {
        let mut m = self.inner.raft.metrics();
        loop {
            if let Err(e) = &m.borrow_and_update().running_state {
                return e.to_string();
            }
            // The core owns the sender: a closed channel is a core gone.
            if m.changed().await.is_err() {
                return "the Raft core stopped".into();
            }
        }
    }

    /// The current leader and its address, as this node knows them.
    pub fn leader(&self) -> Option<(NodeId, String)> {
        let m = self.metrics();
        let id = m.current_leader?;
        let addr = m.membership_config.membership().get_node(&id).map(|n| n.addr.clone()).unwrap_or_default();
        Some((id, addr))
    }

    pub fn is_leader(&self) -> bool {
        self.metrics().state == ServerState::Leader
    }

    /// Adds a non-voting member and waits until it has caught up.
    pub async fn add_learner(&self, id: NodeId, addr: String) -> Result<(), RaftNodeError> {
        self.inner.raft.add_learner(id, BasicNode { addr }, true).await.map_err(client_write_err)?;
        Ok(())
    }

    /// Makes `voters` the voting members; nodes left out are removed.
    pub async fn change_voters(&self, voters: BTreeSet<NodeId>) -> Result<(), RaftNodeError> {
        self.inner
            .raft
            .change_membership(ChangeMembers::ReplaceAllVoters(voters), false)
            .await
            .map_err(client_write_err)?;
        Ok(())
    }

    /// Builds a snapshot now (the log behind it is purged as usual).
    pub async fn trigger_snapshot(&self) -> Result<(), RaftNodeError> {
        self.inner.raft.trigger().snapshot().await.map_err(|e| RaftNodeError::Stopped(e.to_string()))
    }

    /// Serves a peer connection (ALPN `RAFT_ALPN`) until it closes.
    pub async fn serve_peer(&self, conn: quinn::Connection) {
        serve_peer(self.inner.raft.clone(), conn, self.inner.incoming_dir.clone()).await
    }

    /// Waits until this node has applied `index`, or `timeout` passes.
    pub async fn wait_applied(&self, index: u64, timeout: Duration) -> bool {
        let mut w = self.inner.applied.clone();
        tokio::time::timeout(timeout, w.wait_for(|&a| a >= index)).await.is_ok_and(|r| r.is_ok())
    }

    pub async fn shutdown(&self) {
        let _ = self.inner.raft.shutdown().await;
    }
}

/// Serves read barriers in rounds: every request waiting when a round starts
/// is answered by that round, so a round always begins after its requests.
async fn read_index_loop(raft: Raft, mut rx: mpsc::Receiver<oneshot::Sender<Result<(), RaftNodeError>>>) {
    while let Some(first) = rx.recv().await {
        let mut waiting = vec![first];
        while let Ok(more) = rx.try_recv() {
            waiting.push(more);
        }
        let res = match raft.ensure_linearizable().await {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(f))) => {
                Err(RaftNodeError::NotLeader { leader_id: f.leader_id, leader_addr: f.leader_node.map(|n| n.addr) })
            }
            Err(RaftError::APIError(openraft::error::CheckIsLeaderError::QuorumNotEnough(q))) => {
                Err(RaftNodeError::NoQuorum(q.to_string()))
            }
            Err(RaftError::Fatal(f)) => Err(RaftNodeError::Stopped(f.to_string())),
        };
        for w in waiting {
            let _ = w.send(res.clone());
        }
    }
}
