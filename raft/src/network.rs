//! Raft RPCs over QUIC.
//!
//! Peers speak ALPN [`RAFT_ALPN`] on the endpoint the server already runs for
//! its clients; the server hands such connections to [`serve_peer`]. One RPC
//! per bidirectional stream: a length-prefixed postcard request, then the
//! response the same way. A snapshot travels as a header frame followed by
//! the snapshot file's raw bytes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::Future;
use openraft::error::{
    Fatal, NetworkError, RPCError, RaftError, RemoteError, ReplicationClosed, StreamingError, Timeout, Unreachable,
};
use openraft::network::RPCOption;
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse};
use openraft::{AnyError, OptionalSend, RPCTypes, RaftNetwork, RaftNetworkFactory};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Mutex;

use crate::snapshot::SnapshotFile;
use crate::types::{Node, NodeId, Raft, Snapshot, SnapshotMeta, TypeConfig, Vote};

/// The ALPN protocol id of Raft peer connections. Bump on incompatible change.
pub const RAFT_ALPN: &[u8] = b"locus-raft/1";
/// Largest request or response frame (an append of many batched commands).
const MAX_FRAME_BYTES: usize = 256 << 20;
/// Largest snapshot a node accepts.
const MAX_SNAPSHOT_BYTES: u64 = 1 << 40;
/// How long a peer may take to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a server waits for a request header.
const REQUEST_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The slowest snapshot transfer rate tolerated, for its timeout.
const MIN_SNAPSHOT_BYTES_PER_SEC: u64 = 8 << 20;

#[derive(Serialize, Deserialize)]
enum PeerRequest {
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    /// `len` raw bytes of snapshot file follow the frame.
    Snapshot {
        vote: Vote,
        meta: SnapshotMeta,
        len: u64,
    },
}

#[derive(Serialize, Deserialize)]
enum PeerResponse {
    Append(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    Snapshot(Result<SnapshotResponse<NodeId>, Fatal<NodeId>>),
    /// The request was refused before reaching Raft.
    Refused(String),
}

#[derive(Debug, thiserror::Error)]
enum FrameError {
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("stream: {0}")]
    Io(String),
    #[error("decode: {0}")]
    Decode(String),
}

async fn write_frame<T: Serialize>(send: &mut quinn::SendStream, msg: &T) -> Result<(), FrameError> {
    let body = postcard::to_allocvec(msg).map_err(|e| FrameError::Decode(e.to_string()))?;
    if body.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(body.len()));
    }
    send.write_all(&(body.len() as u32).to_le_bytes()).await.map_err(|e| FrameError::Io(e.to_string()))?;
    send.write_all(&body).await.map_err(|e| FrameError::Io(e.to_string()))
}

async fn read_frame<T: DeserializeOwned>(recv: &mut quinn::RecvStream) -> Result<T, FrameError> {
    let mut len = [0u8; 4];
    recv.read_exact(&mut len).await.map_err(|e| FrameError::Io(e.to_string()))?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await.map_err(|e| FrameError::Io(e.to_string()))?;
    postcard::from_bytes(&body).map_err(|e| FrameError::Decode(e.to_string()))
}

/// Dials peers. Cheap to clone; connections are cached per address.
#[derive(Clone)]
pub struct RaftTransport {
    node_id: NodeId,
    endpoint: quinn::Endpoint,
    /// Must offer ALPN [`RAFT_ALPN`] and present this node's certificate.
    client_config: quinn::ClientConfig,
    server_name: String,
    conns: Arc<Mutex<HashMap<String, quinn::Connection>>>,
    acks: LeaderAcks,
}

/// For each peer, the leader vote it last accepted in an `AppendEntries`
/// and when that request was *sent*: the ground of this node's read lease
/// (see [`crate::node::RaftNode::read_barrier`]). Counting from the send,
/// not the answer, keeps the lease short of the peer's own promise.
#[derive(Clone, Default)]
pub struct LeaderAcks(Arc<std::sync::Mutex<HashMap<NodeId, (Vote, std::time::Instant)>>>);

impl LeaderAcks {
    fn record(&self, peer: NodeId, vote: Vote, sent: std::time::Instant) {
        let mut acks = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let e = acks.entry(peer).or_insert((vote, sent));
        if e.0 != vote || e.1 < sent {
            *e = (vote, sent);
        }
    }

    /// Peers that accepted `vote` in a request sent after `since`.
    pub fn accepted_since(&self, vote: &Vote, since: std::time::Instant) -> Vec<NodeId> {
        let acks = self.0.lock().unwrap_or_else(|p| p.into_inner());
        acks.iter().filter(|(_, (v, t))| v == vote && *t >= since).map(|(id, _)| *id).collect()
    }
}

impl RaftTransport {
    pub fn new(
        node_id: NodeId,
        endpoint: quinn::Endpoint,
        client_config: quinn::ClientConfig,
        server_name: String,
    ) -> Self {
        RaftTransport {
            node_id,
            endpoint,
            client_config,
            server_name,
            conns: Arc::default(),
            acks: LeaderAcks::default(),
        }
    }

    /// What the peers accepted of this node's leadership (shared).
    pub fn acks(&self) -> LeaderAcks {
        self.acks.clone()
    }

    async fn connection(&self, addr: &str) -> Result<quinn::Connection, Unreachable> {
        // Never hold the cache lock while dialing: a dead peer must not
        // delay RPCs to the live ones.
        if let Some(c) = self.conns.lock().await.get(addr) {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        let sock: SocketAddr = match addr.parse() {
            Ok(s) => s,
            Err(_) => tokio::net::lookup_host(addr)
                .await
                .map_err(|e| Unreachable::new(&e))?
                .next()
                .ok_or_else(|| Unreachable::from(AnyError::error(format!("{addr}: no address"))))?,
        };
        let connecting = self
            .endpoint
            .connect_with(self.client_config.clone(), sock, &self.server_name)
            .map_err(|e| Unreachable::new(&e))?;
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| Unreachable::from(AnyError::error(format!("connect to {addr}: timed out"))))?
            .map_err(|e| Unreachable::new(&e))?;
        self.conns.lock().await.insert(addr.to_string(), conn.clone());
        Ok(conn)
    }

    async fn forget(&self, addr: &str) {
        self.conns.lock().await.remove(addr);
    }
}

impl RaftNetworkFactory<TypeConfig> for RaftTransport {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> PeerClient {
        PeerClient { target, addr: node.addr.clone(), transport: self.clone() }
    }
}

/// The RPC client for one peer.
pub struct PeerClient {
    target: NodeId,
    addr: String,
    transport: RaftTransport,
}

/// Why one call failed, before it is mapped to openraft's error types.
enum CallError {
    Unreachable(Unreachable),
    Network(String),
    Timeout(Duration),
}

impl PeerClient {
    async fn call(&self, req: &PeerRequest, ttl: Duration) -> Result<PeerResponse, CallError> {
        let fut = async {
            let conn = self.transport.connection(&self.addr).await.map_err(CallError::Unreachable)?;
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| CallError::Network(e.to_string()))?;
            write_frame(&mut send, req).await.map_err(|e| CallError::Network(e.to_string()))?;
            send.finish().map_err(|e| CallError::Network(e.to_string()))?;
            read_frame::<PeerResponse>(&mut recv).await.map_err(|e| CallError::Network(e.to_string()))
        };
        let res = match tokio::time::timeout(ttl, fut).await {
            Ok(r) => r,
            Err(_) => Err(CallError::Timeout(ttl)),
        };
        // A timeout may mean the peer died without closing: dial afresh next time.
        if res.is_err() {
            self.transport.forget(&self.addr).await;
        }
        res
    }

    fn rpc_err<E: std::error::Error>(&self, action: RPCTypes, e: CallError) -> RPCError<NodeId, Node, E> {
        match e {
            CallError::Unreachable(u) => RPCError::Unreachable(u),
            CallError::Network(m) => RPCError::Network(NetworkError::from(AnyError::error(m))),
            CallError::Timeout(timeout) => {
                RPCError::Timeout(Timeout { action, id: self.transport.node_id, target: self.target, timeout })
            }
        }
    }

    fn unexpected<E: std::error::Error>(&self, what: &str) -> RPCError<NodeId, Node, E> {
        RPCError::Network(NetworkError::from(AnyError::error(format!("peer {}: {what}", self.target))))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        let (vote, sent) = (rpc.vote, std::time::Instant::now());
        match self.call(&PeerRequest::Append(rpc), option.hard_ttl()).await {
            Ok(PeerResponse::Append(Ok(r))) => {
                // Anything but a higher vote means the peer took us as its leader.
                if !matches!(r, AppendEntriesResponse::HigherVote(_)) {
                    self.transport.acks.record(self.target, vote, sent);
                }
                Ok(r)
            }
            Ok(PeerResponse::Append(Err(e))) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
            Ok(PeerResponse::Refused(m)) => Err(self.unexpected(&format!("refused: {m}"))),
            Ok(_) => Err(self.unexpected("mismatched response")),
            Err(e) => Err(self.rpc_err(RPCTypes::AppendEntries, e)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        match self.call(&PeerRequest::Vote(rpc), option.hard_ttl()).await {
            Ok(PeerResponse::Vote(Ok(r))) => Ok(r),
            Ok(PeerResponse::Vote(Err(e))) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
            Ok(PeerResponse::Refused(m)) => Err(self.unexpected(&format!("refused: {m}"))),
            Ok(_) => Err(self.unexpected("mismatched response")),
            Err(e) => Err(self.rpc_err(RPCTypes::Vote, e)),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        let net = |m: String| StreamingError::Network(NetworkError::from(AnyError::error(m)));
        let len = snapshot.snapshot.len().map_err(|e| net(e.to_string()))?;
        let ttl = option.hard_ttl().max(Duration::from_secs(10 + len / MIN_SNAPSHOT_BYTES_PER_SEC));
        let file = snapshot.snapshot.file.try_clone().map_err(|e| net(e.to_string()))?;
        let header = PeerRequest::Snapshot { vote, meta: snapshot.meta.clone(), len };
        let send_all = async {
            let conn = self.transport.connection(&self.addr).await.map_err(StreamingError::Unreachable)?;
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| net(e.to_string()))?;
            write_frame(&mut send, &header).await.map_err(|e| net(e.to_string()))?;
            let mut f = tokio::fs::File::from_std(file);
            use tokio::io::AsyncSeekExt;
            f.seek(std::io::SeekFrom::Start(0)).await.map_err(|e| net(e.to_string()))?;
            let mut limited = f.take(len);
            let copied = tokio::io::copy(&mut limited, &mut send).await.map_err(|e| net(e.to_string()))?;
            if copied != len {
                return Err(net(format!("snapshot file shrank: sent {copied} of {len} bytes")));
            }
            send.flush().await.map_err(|e| net(e.to_string()))?;
            send.finish().map_err(|e| net(e.to_string()))?;
            match read_frame::<PeerResponse>(&mut recv).await.map_err(|e| net(e.to_string()))? {
                PeerResponse::Snapshot(Ok(r)) => Ok(r),
                PeerResponse::Snapshot(Err(e)) => Err(StreamingError::RemoteError(RemoteError::new(self.target, e))),
                PeerResponse::Refused(m) => Err(net(format!("refused: {m}"))),
                _ => Err(net("mismatched response".into())),
            }
        };
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            r = tokio::time::timeout(ttl, send_all) => match r {
                Ok(r) => r,
                Err(_) => Err(StreamingError::Timeout(Timeout {
                    action: RPCTypes::InstallSnapshot,
                    id: self.transport.node_id,
                    target: self.target,
                    timeout: ttl,
                })),
            },
        }
    }
}

/// Serves Raft RPCs arriving on one peer connection until it closes.
pub async fn serve_peer(raft: Raft, conn: quinn::Connection, incoming_dir: PathBuf) {
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(_) => return,
        };
        let raft = raft.clone();
        let dir = incoming_dir.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_stream(raft, send, recv, dir).await {
                tracing::debug!(error = %e, "raft peer stream ended with an error");
            }
        });
    }
}

async fn serve_stream(
    raft: Raft,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    incoming_dir: PathBuf,
) -> Result<(), String> {
    let req: PeerRequest = tokio::time::timeout(REQUEST_HEADER_TIMEOUT, read_frame(&mut recv))
        .await
        .map_err(|_| "request header timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let resp = match req {
        PeerRequest::Append(r) => PeerResponse::Append(raft.append_entries(r).await),
        PeerRequest::Vote(r) => PeerResponse::Vote(raft.vote(r).await),
        PeerRequest::Snapshot { vote, meta, len } => match receive_snapshot(&mut recv, len, &incoming_dir).await {
            Ok(file) => {
                let snap = Snapshot { meta, snapshot: Box::new(file) };
                PeerResponse::Snapshot(raft.install_full_snapshot(vote, snap).await)
            }
            Err(e) => PeerResponse::Refused(e),
        },
    };
    write_frame(&mut send, &resp).await.map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())?;
    Ok(())
}

async fn receive_snapshot(
    recv: &mut quinn::RecvStream,
    len: u64,
    dir: &std::path::Path,
) -> Result<SnapshotFile, String> {
    if len > MAX_SNAPSHOT_BYTES {
        return Err(format!("snapshot of {len} bytes exceeds the limit"));
    }
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let path = dir.join(format!("recv-{nanos}.part"));
    let ttl = Duration::from_secs(10 + len / MIN_SNAPSHOT_BYTES_PER_SEC);
    let write = async {
        let mut f = tokio::fs::File::create(&path).await.map_err(|e| e.to_string())?;
        let mut limited = recv.take(len);
        let n = tokio::io::copy(&mut limited, &mut f).await.map_err(|e| e.to_string())?;
        if n != len {
            return Err(format!("snapshot stream ended after {n} of {len} bytes"));
        }
        f.sync_all().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(())
    };
    let res = match tokio::time::timeout(ttl, write).await {
        Ok(r) => r,
        Err(_) => Err("snapshot transfer timed out".to_string()),
    };
    if let Err(e) = res {
        let _ = std::fs::remove_file(&path);
        return Err(e);
    }
    SnapshotFile::open(&path).map_err(|e| e.to_string())
}
