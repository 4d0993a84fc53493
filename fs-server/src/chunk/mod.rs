//! The chunk server (`locus-server chunk`): stores chunk replicas on local
//! disk ([`store`]) and serves them over QUIC ([`CHUNK_ALPN`]).
//!
//! - Registers with the metadata service (capacity, topology labels), keeps
//!   its server id in the data directory, heartbeats every second and
//!   carries out the work the leader returns (copy a chunk from another
//!   server, drop chunks, raise a version).
//! - Reports the chunks it holds after registering and periodically; the
//!   leader answers with what is stale or gone. Until the first report has
//!   been answered and carried out it serves no I/O (`Unavailable`).
//! - Fences itself: without a successful heartbeat for `fence_after`, it
//!   refuses all I/O, so a server the leader has declared dead (after a
//!   longer time) never serves data that may have moved on.
//! - Scrubs: re-reads everything at a bounded rate and reports corrupt
//!   replicas, which the leader replaces.
//! - Copy-on-write: a write or zero naming an `origin` for a chunk this
//!   server lacks first copies the local replica of the origin
//!   ([`store::Missing::CopyFrom`]), so a clone's first write moves no data
//!   over the network.
//! - Fencing: every write and zero of a chunk holds its barrier (shared)
//!   from the version check to the last replica's answer, and checks the
//!   version before forwarding; a version raise takes the barrier alone.
//!   Raised at the chain head first, a chunk then refuses every write made
//!   with an older layout, and no write accepted before reaches only part
//!   of the chain. A raise of a chunk this server lacks is remembered (in
//!   memory, bounded), so a late write cannot create it at the old version.

mod cache;
pub mod store;
mod versions;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use fs_client::chunk::{ChunkClient, ChunkError};
use fs_client::client::ClientError;
use fs_client::frame;
use fs_client::proto::*;
use fs_client::sums::{whole_blocks, BlockSums, MAX_SUMS};
use fs_client::tls::{self, Identity};
use fs_client::{ClientConfig, MetaClient};

use crate::metrics::{Metrics, OpLabels};
use store::{ChunkStore, ChunkStoreError, Missing, StoreOptions};

/// How long a request header may take to arrive.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The slowest replica transfer rate tolerated.
const MIN_COPY_BYTES_PER_SEC: u64 = 4 << 20;
/// Buffers in flight between the network and a blocking export/import.
const COPY_QUEUE: usize = 16;
/// Size of those buffers.
const COPY_BUF: usize = 1 << 20;
/// Version raises of absent chunks remembered at most (see [`Fences`]).
const MAX_FENCE_MARKS: usize = 1 << 20;
/// Reads up to this size are tried inline on the async thread when cached
/// (hashing 64 KiB takes tens of microseconds).
const INLINE_READ_BYTES: u64 = 64 << 10;
/// Local clients' connections served at once.
const MAX_LOCAL_CONNECTIONS: usize = 1024;
/// How often the files of fenced chunks are renamed to their new versions.
const SETTLE_EVERY: Duration = Duration::from_millis(500);

/// Settings of a chunk server.
#[derive(Debug, Clone)]
pub struct ChunkConfig {
    pub listen: SocketAddr,
    /// The address clients and peers dial (default: `listen`).
    pub advertise: String,
    pub data_dir: PathBuf,
    pub identity: Identity,
    pub meta: Vec<String>,
    pub topology: Topology,
    /// Capacity to announce (default: the filesystem's size).
    pub capacity_bytes: Option<u64>,
    pub heartbeat: Duration,
    /// Stop serving I/O after this long without a successful heartbeat.
    pub fence_after: Duration,
    pub report_every: Duration,
    pub scrub_bytes_per_sec: u64,
    /// Bytes of verified blocks kept for reads (0: none).
    pub read_cache_bytes: u64,
    pub metrics_listen: Option<SocketAddr>,
    /// Where to put the Unix socket local clients read through (`None`:
    /// no socket). See [`fs_client::local`].
    pub local_dir: Option<PathBuf>,
}

/// A running chunk server. Cheap to clone.
#[derive(Clone)]
struct Server {
    cfg: Arc<ChunkConfig>,
    store: Arc<ChunkStore>,
    meta: MetaClient,
    peers: ChunkClient,
    id: Arc<AtomicU64>,
    fenced: Arc<AtomicBool>,
    /// Whether the replicas found on disk at start have been reported and
    /// the metadata's answer carried out. Until then nothing is served: a
    /// replica that missed writes while this server was down would answer
    /// a reader holding the old layout with old data.
    checked: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    barriers: Arc<Barriers>,
    marks: Arc<Fences>,
    /// Client reads and writes served so far: the scrubber slows down
    /// while this moves.
    served: Arc<AtomicU64>,
    /// Our cluster, told to local clients ([`tls::cluster_fingerprint`]).
    cluster: [u8; 32],
}

/// Per-chunk barriers between chained writes (shared, held until the
/// whole chain answered) and version raises (exclusive). Entries live
/// while somebody holds or waits for them.
#[derive(Default)]
struct Barriers {
    map: std::sync::Mutex<HashMap<ChunkId, Arc<tokio::sync::RwLock<()>>>>,
}

/// Held only to be dropped.
enum BarrierHold {
    Shared { _guard: tokio::sync::OwnedRwLockReadGuard<()> },
    Exclusive { _guard: tokio::sync::OwnedRwLockWriteGuard<()> },
}

/// A held barrier; dropping it releases it (and the entry when idle).
struct Barrier<'a> {
    owner: &'a Barriers,
    chunk: ChunkId,
    lock: Arc<tokio::sync::RwLock<()>>,
    hold: Option<BarrierHold>,
}

impl Barriers {
    fn entry(&self, chunk: ChunkId) -> Arc<tokio::sync::RwLock<()>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).entry(chunk).or_default().clone()
    }

    async fn shared(&self, chunk: ChunkId) -> Barrier<'_> {
        let lock = self.entry(chunk);
        let hold = BarrierHold::Shared { _guard: lock.clone().read_owned().await };
        Barrier { owner: self, chunk, lock, hold: Some(hold) }
    }

    async fn exclusive(&self, chunk: ChunkId) -> Barrier<'_> {
        let lock = self.entry(chunk);
        let hold = BarrierHold::Exclusive { _guard: lock.clone().write_owned().await };
        Barrier { owner: self, chunk, lock, hold: Some(hold) }
    }
}

impl Drop for Barrier<'_> {
    fn drop(&mut self) {
        let mut map = self.owner.map.lock().unwrap_or_else(|p| p.into_inner());
        drop(self.hold.take());
        // The map's and ours: nobody else holds or waits for it.
        if Arc::strong_count(&self.lock) == 2 {
            map.remove(&self.chunk);
        }
    }
}

/// Version raises of chunks this server did not have (allocated, never
/// written here): a write may not create such a chunk at an older version,
/// and a copy-on-write chunk whose origin is marked starts empty (the
/// origin was never written). In memory and bounded: after a restart a
/// late writer is caught only by the version of the other replicas.
#[derive(Default)]
struct Fences {
    map: std::sync::Mutex<HashMap<ChunkId, u64>>,
}

impl Fences {
    fn get(&self, chunk: ChunkId) -> Option<u64> {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).get(&chunk).copied()
    }

    fn raise(&self, chunk: ChunkId, to: u64) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_FENCE_MARKS && !map.contains_key(&chunk) {
            if let Some(old) = map.keys().next().copied() {
                map.remove(&old);
            }
        }
        let v = map.entry(chunk).or_insert(to);
        *v = (*v).max(to);
    }

    fn clear(&self, chunk: ChunkId) {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).remove(&chunk);
    }
}

fn wire(e: &ChunkStoreError) -> WireError {
    let code = match e {
        ChunkStoreError::NotFound(_) => ErrorCode::NotFound,
        // Data lost here: an I/O error, never "not found" (read as zeros).
        ChunkStoreError::Quarantined(_) => ErrorCode::Io,
        ChunkStoreError::VersionMismatch { .. } => ErrorCode::Stale,
        ChunkStoreError::OutOfRange { .. } | ChunkStoreError::BadInput(_) => ErrorCode::Invalid,
        ChunkStoreError::Corrupt { .. } => ErrorCode::Io,
        ChunkStoreError::NoSpace => ErrorCode::NoSpace,
        ChunkStoreError::Exists => ErrorCode::Exists,
        ChunkStoreError::Io { .. } => ErrorCode::Io,
    };
    WireError::new(code, e.to_string())
}

fn id_file(dir: &std::path::Path) -> PathBuf {
    dir.join("server_id")
}

/// Runs a chunk server until SIGTERM or SIGINT.
pub async fn run(cfg: ChunkConfig) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.data_dir).with_context(|| format!("create {}", cfg.data_dir.display()))?;
    let client_cfg = ClientConfig {
        meta: cfg.meta.clone(),
        ca: cfg.identity.ca.clone(),
        cert: cfg.identity.cert.clone(),
        key: cfg.identity.key.clone(),
        // Heartbeats must not hang: a short deadline, retried by the loops.
        timeout_ms: 2_000,
        topology: None,
        local_reads: false,
        local_dir: None,
    };
    let meta = MetaClient::new(&client_cfg).context("metadata client")?;
    let stored_id: Option<ServerId> =
        std::fs::read_to_string(id_file(&cfg.data_dir)).ok().and_then(|s| s.trim().parse().ok());

    // Register first: the cluster decides the chunk size the store uses.
    let (total, avail) = fs_stats(&cfg.data_dir);
    let capacity = cfg.capacity_bytes.unwrap_or(total);
    let (id, chunk_bytes, block_bytes) = loop {
        let msg = ServerMsg::Register {
            id: stored_id,
            addr: cfg.advertise.clone(),
            topology: cfg.topology.clone(),
            capacity_bytes: capacity,
            used_bytes: total.saturating_sub(avail),
        };
        match meta.server(msg).await {
            Ok(ServerReply::Registered { id, chunk_bytes, block_bytes }) => break (id, chunk_bytes, block_bytes),
            Ok(other) => tracing::warn!(?other, "unexpected registration reply"),
            Err(e) => tracing::info!(error = %e, "registration not accepted yet; retrying"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    std::fs::write(id_file(&cfg.data_dir), id.to_string()).context("save server id")?;
    let span = tracing::info_span!("chunk", server = id);
    let _enter = span.enter();

    let dir = cfg.data_dir.clone();
    // Keep some of the disk free for the filesystem itself: 5%, at most
    // 256 MiB (small test disks would otherwise be all reserve).
    let reserved_bytes = (fs_stats(&dir).0 / 20).min(StoreOptions::default().reserved_bytes);
    let opts = StoreOptions {
        chunk_size: chunk_bytes,
        block_size: block_bytes,
        reserved_bytes,
        cache_bytes: cfg.read_cache_bytes,
        ..Default::default()
    };
    let store = tokio::task::spawn_blocking(move || ChunkStore::open(&dir, opts))
        .await
        .context("open store")?
        .context("open chunk store")?;
    tracing::info!(chunks = store.len(), chunk_bytes, "chunk store open");

    let endpoint = crate::server::endpoint(&cfg.identity, cfg.listen, &[CHUNK_ALPN]).context("start QUIC endpoint")?;
    let peer_cfg = tls::client_config(&cfg.identity, CHUNK_ALPN).context("peer TLS")?;
    let peers = ChunkClient::with_endpoint(endpoint.clone(), peer_cfg);
    let metrics = Metrics::new("chunk");
    let srv = Server {
        cfg: Arc::new(cfg.clone()),
        store: Arc::new(store),
        meta,
        peers,
        id: Arc::new(AtomicU64::new(id)),
        fenced: Arc::new(AtomicBool::new(false)),
        checked: Arc::new(AtomicBool::new(false)),
        metrics: metrics.clone(),
        barriers: Arc::default(),
        marks: Arc::default(),
        served: Arc::default(),
        cluster: tls::cluster_fingerprint(&cfg.identity).context("read the cluster CA")?,
    };
    tokio::spawn(srv.clone().accept_loop(endpoint.clone()));
    let local = cfg.local_dir.as_ref().and_then(|dir| match bind_local(dir, &srv.cluster, &cfg.advertise) {
        Ok((listener, path)) => {
            tokio::spawn(srv.clone().local_loop(listener));
            tracing::info!(path = %path.display(), "serving local clients");
            // Which file is ours: a successor may have replaced it by the
            // time we stop.
            let ino = std::fs::metadata(&path).map(|m| std::os::unix::fs::MetadataExt::ino(&m)).ok();
            Some((path, ino))
        }
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "no local socket; local clients read over QUIC");
            None
        }
    });
    tokio::spawn(srv.clone().heartbeat_loop());
    tokio::spawn(srv.clone().report_loop());
    tokio::spawn(srv.clone().scrub_loop());
    tokio::spawn(srv.clone().settle_loop());
    if let Some(addr) = cfg.metrics_listen {
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(addr, metrics).await {
                tracing::error!(error = %e, "metrics endpoint failed");
            }
        });
    }
    tracing::info!(listen = %cfg.listen, advertise = %cfg.advertise, "chunk server running");
    crate::wait_for_stop().await;
    tracing::info!("stopping");
    endpoint.close(0u32.into(), b"shutting down");
    if let Some((path, ino)) = local {
        let now = std::fs::metadata(&path).map(|m| std::os::unix::fs::MetadataExt::ino(&m)).ok();
        if now.is_some() && now == ino {
            let _ = std::fs::remove_file(path);
        }
    }
    let store = srv.store.clone();
    let ids: Vec<ChunkId> = store.list().into_iter().map(|(c, _)| c).collect();
    // Best effort: what was written reaches the disk before we go.
    let last = move || {
        store.settle_names();
        store.flush(&ids)
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), tokio::task::spawn_blocking(last)).await;
    Ok(())
}

/// Binds the local socket for `advertise` in `dir`, mode 0600. A file
/// left there by a server that died is replaced: whoever advertises this
/// address now is this server.
fn bind_local(
    dir: &std::path::Path,
    cluster: &[u8; 32],
    advertise: &str,
) -> std::io::Result<(tokio::net::UnixListener, PathBuf)> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    let path = fs_client::local::socket_path(dir, cluster, advertise);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = tokio::net::UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok((listener, path))
}

fn fs_stats(dir: &std::path::Path) -> (u64, u64) {
    nix::sys::statvfs::statvfs(dir)
        .map(|s| {
            let f = s.fragment_size().max(1);
            (s.blocks() * f, s.blocks_available() * f)
        })
        .unwrap_or((0, 0))
}

impl Server {
    async fn accept_loop(self, endpoint: quinn::Endpoint) {
        while let Some(incoming) = endpoint.accept().await {
            let srv = self.clone();
            tokio::spawn(async move {
                let conn = match tokio::time::timeout(REQUEST_TIMEOUT, incoming).await {
                    Ok(Ok(c)) => c,
                    _ => return,
                };
                if let Err(e) = tls::peer_identity(&conn) {
                    tracing::warn!(error = %e, "refusing peer");
                    conn.close(1u32.into(), b"certificate carries no role");
                    return;
                }
                while let Ok((send, recv)) = conn.accept_bi().await {
                    tokio::spawn(srv.clone().serve_stream(send, recv));
                }
            });
        }
    }

    async fn serve_stream(self, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
        let req: ChunkRequest = match tokio::time::timeout(REQUEST_TIMEOUT, frame::read_frame(&mut recv)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                let resp: ChunkResponse = Err(WireError::new(ErrorCode::BadRequest, format!("bad request frame: {e}")));
                let _ = frame::write_frame(&mut send, &resp).await;
                let _ = send.finish();
                return;
            }
            Err(_) => return,
        };
        let started = Instant::now();
        let op = self.start(&req);
        let status = matches!(req, ChunkRequest::Status);
        let result = if let Some(refused) = self.refusal(status) {
            Err(refused)
        } else {
            match req {
                ChunkRequest::Read { chunk, version, offset, len } => {
                    match self.read(chunk, version, offset, len).await {
                        Ok(data) => {
                            let hdr: ChunkResponse = Ok(ChunkReply::Data { len: data.len() as u64 });
                            let _ = frame::write_frame_with(&mut send, &hdr, [data]).await;
                            let _ = send.finish();
                            self.metrics.observe(op, started.elapsed(), None);
                            return;
                        }
                        Err(e) => Err(e),
                    }
                }
                req @ (ChunkRequest::Write { .. } | ChunkRequest::WriteV { .. } | ChunkRequest::Zero { .. }) => {
                    self.chained(req, Incoming::Quic(&mut recv)).await
                }
                ChunkRequest::Flush { chunks } => {
                    let store = self.store.clone();
                    blocking(move || store.flush(&chunks)).await.map(|()| ChunkReply::Done)
                }
                ChunkRequest::SetVersion { chunk, from, to } => {
                    self.set_version(chunk, from, to).await.map(|()| ChunkReply::Done)
                }
                ChunkRequest::SetVersions { changes } => self.set_versions(changes).await,
                ChunkRequest::Export { chunk, version } => {
                    self.export(&mut send, chunk, version).await;
                    self.metrics.observe(op, started.elapsed(), None);
                    return;
                }
                ChunkRequest::Status => Ok(ChunkReply::Status {
                    id: Some(self.id.load(Ordering::Relaxed)),
                    chunks: self.store.len() as u64,
                    used_bytes: self.store.used_bytes(),
                    fenced: self.fenced.load(Ordering::Relaxed),
                }),
            }
        };
        self.metrics.observe(op, started.elapsed(), result.as_ref().err().map(|e| e.code));
        let _ = frame::write_frame(&mut send, &result).await;
        let _ = send.finish();
    }

    /// A request begins: its name in the metrics; client reads and writes
    /// are counted (the scrubber slows down while they come).
    fn start(&self, req: &ChunkRequest) -> &'static str {
        let op = match req {
            ChunkRequest::Read { .. } => "read",
            ChunkRequest::Write { .. } => "write",
            ChunkRequest::Zero { .. } => "zero",
            ChunkRequest::Flush { .. } => "flush",
            ChunkRequest::SetVersion { .. } => "set_version",
            ChunkRequest::Export { .. } => "export",
            ChunkRequest::Status => "status",
            ChunkRequest::SetVersions { .. } => "set_versions",
            ChunkRequest::WriteV { .. } => "writev",
        };
        if matches!(op, "read" | "write" | "writev") {
            self.served.fetch_add(1, Ordering::Relaxed);
        }
        op
    }

    /// `Write`, `WriteV` and `Zero`, whichever transport brought them (a
    /// write's bytes come from `from`).
    async fn chained(&self, req: ChunkRequest, from: Incoming<'_>) -> Result<ChunkReply, WireError> {
        match req {
            ChunkRequest::Write { chunk, version, offset, len, chain, create, origin, sums } => {
                let at = Place { chunk, version, offset, origin };
                self.write(from, at, vec![(offset, len)], chain, create, false, sums).await
            }
            ChunkRequest::WriteV { chunk, version, extents, chain, create, origin, sums } => {
                let at = Place { chunk, version, offset: extents.first().map_or(0, |e| e.0), origin };
                self.write(from, at, extents, chain, create, true, sums).await
            }
            ChunkRequest::Zero { chunk, version, offset, len, chain, origin } => {
                self.zero(Place { chunk, version, offset, origin }, len, chain).await
            }
            _ => Err(WireError::new(ErrorCode::BadRequest, "not a chained request")),
        }
    }

    /// Why I/O is not served now, if it is not (`Status` always is).
    fn refusal(&self, status: bool) -> Option<WireError> {
        if status {
            None
        } else if self.fenced.load(Ordering::Relaxed) {
            Some(WireError::new(ErrorCode::Unavailable, "fenced: lost contact with the metadata service"))
        } else if !self.checked.load(Ordering::Acquire) {
            Some(WireError::new(ErrorCode::Unavailable, "starting: replicas not yet checked with the metadata service"))
        } else {
            None
        }
    }

    /// Serves local clients on the Unix socket (see [`fs_client::local`]),
    /// at most [`MAX_LOCAL_CONNECTIONS`] at once: past that a connection is
    /// closed before its hello and the client goes over QUIC.
    async fn local_loop(self, listener: tokio::net::UnixListener) {
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_LOCAL_CONNECTIONS));
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        tracing::debug!("too many local connections; one refused");
                        continue;
                    };
                    let srv = self.clone();
                    tokio::spawn(async move {
                        srv.serve_local(stream).await;
                        drop(slot);
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting on the local socket failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// One local client's connection: requests one after another, each
    /// answered as over QUIC. While one is worked on the client hears
    /// [`TAG_ALIVE`](fs_client::local::TAG_ALIVE) every second, so it can
    /// tell a busy server from a stopped one.
    async fn serve_local(self, mut stream: tokio::net::UnixStream) {
        use fs_client::local::{ALIVE_EVERY, SERVER_IDLE, TAG_ALIVE, TAG_REPLY};
        use tokio::io::AsyncWriteExt;
        let me = nix::unistd::geteuid().as_raw();
        match stream.peer_cred() {
            Ok(c) if c.uid() == 0 || c.uid() == me => {}
            other => {
                let uid = other.map(|c| c.uid().to_string()).unwrap_or_else(|e| e.to_string());
                tracing::warn!(uid, "refusing a local client of another user");
                return;
            }
        }
        let hello = LocalHello {
            addr: self.cfg.advertise.clone(),
            server: self.id.load(Ordering::Relaxed),
            cluster: self.cluster,
        };
        if frame::write_frame_io(&mut stream, &hello, &[]).await.is_err() {
            return;
        }
        let (mut rd, mut wr) = stream.split();
        loop {
            let req: ChunkRequest = match tokio::time::timeout(SERVER_IDLE, frame::read_frame_io(&mut rd)).await {
                Ok(Ok(r)) => r,
                Ok(Err(frame::FrameError::Closed)) | Err(_) => return,
                Ok(Err(e)) => {
                    let resp: ChunkResponse =
                        Err(WireError::new(ErrorCode::BadRequest, format!("bad request frame: {e}")));
                    let _ = wr.write_all(&[TAG_REPLY]).await;
                    let _ = frame::write_frame_io(&mut wr, &resp, &[]).await;
                    return;
                }
            };
            let work = self.local_request(req, &mut rd);
            tokio::pin!(work);
            let mut alive = tokio::time::interval_at(tokio::time::Instant::now() + ALIVE_EVERY, ALIVE_EVERY);
            let (reply, data, in_step) = loop {
                tokio::select! {
                    done = &mut work => break done,
                    _ = alive.tick() => {
                        if wr.write_all(&[TAG_ALIVE]).await.is_err() {
                            return;
                        }
                    }
                }
            };
            let answer = async {
                wr.write_all(&[TAG_REPLY]).await.map_err(|e| frame::FrameError::Stream(e.to_string()))?;
                frame::write_frame_io(&mut wr, &reply, data.as_slice()).await
            };
            if !matches!(tokio::time::timeout(REQUEST_TIMEOUT, answer).await, Ok(Ok(()))) {
                return;
            }
            if !in_step {
                return;
            }
        }
    }

    /// A request from a local client: the reply, a read's bytes, and
    /// whether the connection is still in step (a refused write's bytes
    /// were all read, if it had any).
    async fn local_request(
        &self,
        req: ChunkRequest,
        rd: &mut tokio::net::unix::ReadHalf<'_>,
    ) -> (ChunkResponse, Option<Bytes>, bool) {
        let started = Instant::now();
        let op = self.start(&req);
        // A write's bytes follow its request: all of them must be taken,
        // even when it is refused.
        let owed = req.bytes_following().filter(|n| *n <= MAX_IO_BYTES);
        let mut taken = 0u64;
        let mut data = None;
        let result = if let Some(refused) = self.refusal(false) {
            Err(refused)
        } else {
            match req {
                ChunkRequest::Read { chunk, version, offset, len } => {
                    self.read(chunk, version, offset, len).await.map(|d| {
                        let len = d.len() as u64;
                        data = Some(d);
                        ChunkReply::Data { len }
                    })
                }
                req @ (ChunkRequest::Write { .. } | ChunkRequest::WriteV { .. } | ChunkRequest::Zero { .. }) => {
                    let from = Incoming::Local { conn: &mut *rd, taken: &mut taken, buf: bytes::BytesMut::new() };
                    self.chained(req, from).await
                }
                _ => Err(WireError::new(ErrorCode::BadRequest, "not served on the local socket")),
            }
        };
        self.metrics.observe(op, started.elapsed(), result.as_ref().err().map(|e| e.code));
        let in_step = match owed {
            Some(n) if n > taken && n <= MAX_IO_BYTES => drain(rd, n - taken).await,
            Some(n) => n == taken,
            None => false,
        };
        (result, data, in_step)
    }

    async fn read(&self, chunk: ChunkId, version: u64, offset: u64, len: u64) -> Result<Bytes, WireError> {
        if len > MAX_IO_BYTES {
            return Err(WireError::new(ErrorCode::TooBig, format!("read of {len} bytes exceeds {MAX_IO_BYTES}")));
        }
        // Most small reads of hot data are in the page cache: answer those
        // here (large ones would hold this thread hashing for too long).
        let inline =
            if len <= INLINE_READ_BYTES { self.store.try_read_cached(chunk, version, offset, len) } else { Ok(None) };
        let res = match inline {
            Ok(Some(d)) => Ok(d),
            Ok(None) => {
                let store = self.store.clone();
                tokio::task::spawn_blocking(move || store.read(chunk, version, offset, len))
                    .await
                    .map_err(|e| WireError::new(ErrorCode::Internal, e.to_string()))?
            }
            Err(e) => Err(e),
        };
        match res {
            Ok(d) => Ok(d),
            Err(e @ ChunkStoreError::Corrupt { .. }) => {
                self.corrupt(chunk, version).await;
                Err(wire(&e))
            }
            Err(e) => Err(wire(&e)),
        }
    }

    /// A replica failed its checksums: set it aside and tell the leader.
    async fn corrupt(&self, chunk: ChunkId, version: u64) {
        tracing::warn!(chunk, version, "corrupt replica; quarantined");
        let store = self.store.clone();
        let _ = tokio::task::spawn_blocking(move || store.quarantine(chunk)).await;
        let id = self.id.load(Ordering::Relaxed);
        if let Err(e) = self.meta.server(ServerMsg::Corrupt { id, chunk, version }).await {
            tracing::warn!(error = %e, "could not report a corrupt replica");
        }
    }

    /// What to do about `at.chunk` if this server lacks it, and whether a
    /// write at `at.version` may go on at all (checked before forwarding).
    fn admit(&self, at: &Place, create: bool) -> Result<Missing, WireError> {
        match self.store.version(at.chunk) {
            Some(v) if v == at.version => return Ok(Missing::Fail),
            Some(v) => {
                return Err(WireError::new(
                    ErrorCode::Stale,
                    format!("chunk {} is at version {v}, not {}", at.chunk, at.version),
                ))
            }
            None => {}
        }
        if let Some(mark) = self.marks.get(at.chunk).filter(|m| *m > at.version) {
            return Err(WireError::new(
                ErrorCode::Stale,
                format!("chunk {} was raised to version {mark}; {} is stale", at.chunk, at.version),
            ));
        }
        let Some((origin, origin_version)) = at.origin else {
            return Ok(if create { Missing::Create } else { Missing::Fail });
        };
        if self.store.version(origin).is_some() {
            return Ok(Missing::CopyFrom { origin, version: origin_version });
        }
        match self.marks.get(origin) {
            // The origin was never written here: the copy starts empty.
            Some(mark) if origin_version >= mark => Ok(Missing::Create),
            Some(mark) => Err(WireError::new(
                ErrorCode::Stale,
                format!("origin chunk {origin} was raised to version {mark}; {origin_version} is stale"),
            )),
            // Unavailable: the client drops this replica of the copy and
            // goes on with the others.
            None => Err(WireError::new(
                ErrorCode::Unavailable,
                format!("cannot copy chunk {}: this server has no replica of its origin {origin}", at.chunk),
            )),
        }
    }

    /// A write of one or more extents (`(offset, len)`) of one chunk: their
    /// bytes follow in the stream. Several (a `WriteV`) are checked by
    /// [`check_extents`]; one (a `Write`) only against [`MAX_IO_BYTES`],
    /// the store checks its range (and an empty one may create the chunk).
    /// Block sums the writer made are passed on down the chain and stored
    /// instead of hashing the blocks again, if they are of this store's
    /// block size; a count that does not match the extents is refused.
    #[allow(clippy::too_many_arguments)]
    async fn write(
        &self,
        recv: Incoming<'_>,
        at: Place,
        extents: Vec<(u64, u64)>,
        chain: Vec<String>,
        create: bool,
        vectored: bool,
        sums: Option<BlockSums>,
    ) -> Result<ChunkReply, WireError> {
        if let Some(s) = &sums {
            if s.sums.len() > MAX_SUMS {
                return Err(WireError::new(ErrorCode::TooBig, format!("more than {MAX_SUMS} block sums in one write")));
            }
            let bs = u64::from(s.block_bytes);
            if whole_blocks(&extents, bs) != Some(s.sums.len() as u64) {
                return Err(WireError::new(
                    ErrorCode::BadRequest,
                    format!("{} block sums of {bs} bytes do not fit the {} extents", s.sums.len(), extents.len()),
                ));
            }
        }
        let len = if vectored {
            check_extents(&extents, self.store.chunk_size())?
        } else {
            let len: u64 = extents.iter().map(|e| e.1).sum();
            if len > MAX_IO_BYTES {
                return Err(WireError::new(ErrorCode::TooBig, format!("write of {len} bytes exceeds {MAX_IO_BYTES}")));
            }
            len
        };
        // Refused before anything moves down the chain; checked again under
        // the barrier, which is not held while the bytes arrive (a stalled
        // client must not hold up version changes).
        self.admit(&at, create)?;
        let Place { chunk, version, offset, origin } = at;
        // Cut-through: the bytes go on down the chain as they arrive.
        let mut downstream = Downstream::Done;
        if let Some((head, rest)) = chain.split_first() {
            let (rest, sums) = (rest.to_vec(), sums.clone());
            let req = if vectored {
                ChunkRequest::WriteV { chunk, version, extents: extents.clone(), chain: rest, create, origin, sums }
            } else {
                ChunkRequest::Write { chunk, version, offset, len, chain: rest, create, origin, sums }
            };
            downstream = match self.peers.start_write(head, &req).await {
                Ok(w) => Downstream::Streaming(w),
                Err(e) => Downstream::Failed(e),
            };
        }
        // Extents too small to go around the page cache are written from
        // the pieces as they came: gathering them into one aligned buffer
        // cost a copy and a fresh 1 MiB allocation per request.
        let gather = extents.iter().any(|e| e.1 >= store::DIRECT_MIN_BYTES as u64);
        let data =
            match tokio::time::timeout(REQUEST_TIMEOUT, receive(recv, len as usize, &mut downstream, gather)).await {
                Ok(Ok(d)) => d,
                failed => {
                    // The next server must not take part of a write.
                    downstream.abort();
                    return Err(match failed {
                        Ok(Err(e)) => WireError::new(ErrorCode::BadRequest, format!("write data: {e}")),
                        _ => WireError::new(ErrorCode::Timeout, "write data did not arrive in time"),
                    });
                }
            };
        let _barrier = self.barriers.shared(chunk).await;
        let missing = self.admit(&Place { chunk, version, offset, origin }, create)?;
        let store = self.store.clone();
        let sums = sums.filter(|s| u64::from(s.block_bytes) == store.block_size()).map(|s| s.sums);
        let local = tokio::task::spawn_blocking(move || {
            store.write_extents(chunk, version, &extents, &data, sums.as_deref(), missing)
        });
        let (local, downstream) = tokio::join!(local, downstream.finish());
        let local = local.map_err(|e| WireError::new(ErrorCode::Internal, e.to_string()))?;
        local.map_err(|e| copy_error(&e, missing))?;
        if missing != Missing::Fail {
            self.marks.clear(chunk);
        }
        chain_outcome(downstream, &chain)
    }

    async fn zero(&self, at: Place, len: u64, chain: Vec<String>) -> Result<ChunkReply, WireError> {
        let _barrier = self.barriers.shared(at.chunk).await;
        // Zeroing a chunk never written here changes nothing, unless it is
        // a copy whose origin has data.
        let missing = match self.admit(&at, false)? {
            m @ Missing::CopyFrom { .. } => m,
            _ => Missing::Fail,
        };
        let store = self.store.clone();
        let Place { chunk, version, offset, origin } = at;
        let local = tokio::task::spawn_blocking(move || store.zero_with(chunk, version, offset, len, missing));
        let downstream = async {
            if chain.is_empty() {
                Ok(())
            } else {
                self.peers.zero(&chain, chunk, version, offset, len, origin).await
            }
        };
        let (local, downstream) = tokio::join!(local, downstream);
        let local = local.map_err(|e| WireError::new(ErrorCode::Internal, e.to_string()))?;
        match local {
            Ok(()) => {}
            // Never written here: reads as zeros already.
            Err(ChunkStoreError::NotFound(c)) if c == chunk => {}
            Err(e) => return Err(copy_error(&e, missing)),
        }
        chain_outcome(downstream, &chain)
    }

    /// Raises (or, for an abandoned repair seal, lowers) a chunk's version
    /// once the writes in flight on it are done. A raise of a chunk this
    /// server lacks is remembered.
    async fn set_version(&self, chunk: ChunkId, from: u64, to: u64) -> Result<(), WireError> {
        let _barrier = self.barriers.exclusive(chunk).await;
        let store = self.store.clone();
        match blocking(move || store.set_version(chunk, from, to)).await {
            Err(e) if e.code == ErrorCode::NotFound && to > from => {
                self.marks.raise(chunk, to);
                Err(e)
            }
            r => r,
        }
    }

    /// [`ChunkRequest::SetVersions`]: the fences of a clone. The barriers
    /// of every chunk named are taken (in id order, so two batches cannot
    /// deadlock), the versions raised, each directory synced once, and only
    /// then are writes let through again.
    async fn set_versions(&self, changes: Vec<VersionChange>) -> Result<ChunkReply, WireError> {
        if changes.len() > MAX_SET_VERSIONS {
            return Err(WireError::new(
                ErrorCode::TooBig,
                format!("{} version changes in one request (at most {MAX_SET_VERSIONS})", changes.len()),
            ));
        }
        let chunks: std::collections::BTreeSet<ChunkId> = changes.iter().map(|c| c.chunk).collect();
        let mut held = Vec::with_capacity(chunks.len());
        for chunk in chunks {
            held.push(self.barriers.exclusive(chunk).await);
        }
        let mut results: Vec<Result<(), WireError>> = Vec::with_capacity(changes.len());
        let mut raise = Vec::new();
        for (i, c) in changes.iter().enumerate() {
            results.push(Ok(()));
            if c.to <= c.from {
                results[i] = Err(WireError::new(ErrorCode::Invalid, format!("a fence raises: {} -> {}", c.from, c.to)));
                continue;
            }
            match self.store.version(c.chunk) {
                // Raised already (a later clone got here first).
                Some(v) if v >= c.to => {}
                Some(_) => raise.push((i, (c.chunk, c.from, c.to))),
                None => match c.origin {
                    None => self.marks.raise(c.chunk, c.to),
                    // A copy-on-write chunk not written here yet: make it
                    // now, so the chunk the clone shares exists.
                    Some(origin) => {
                        let at = Place { chunk: c.chunk, version: c.to, offset: 0, origin: Some(origin) };
                        results[i] = match self.admit(&at, false) {
                            Ok(missing) => {
                                let (store, chunk, to) = (self.store.clone(), c.chunk, c.to);
                                blocking(move || store.zero_with(chunk, to, 0, 0, missing)).await
                            }
                            Err(e) => Err(e),
                        };
                    }
                },
            }
        }
        if !raise.is_empty() {
            let store = self.store.clone();
            let list: Vec<(ChunkId, u64, u64)> = raise.iter().map(|(_, c)| *c).collect();
            // Not synced: a fence lost in a crash is raised again before
            // this server serves anything (the answer to its first report
            // lists replicas behind the chunk map), so the sync would only
            // add its milliseconds to every clone.
            let done = tokio::task::spawn_blocking(move || store.set_versions(&list, false))
                .await
                .map_err(|e| WireError::new(ErrorCode::Internal, e.to_string()))?;
            for ((i, _), r) in raise.iter().zip(done) {
                results[*i] = r.map_err(|e| wire(&e));
            }
        }
        drop(held);
        Ok(ChunkReply::Versions(results))
    }

    /// Streams a replica for a repair. Writes wait until the copy is
    /// complete, and then the replica is sealed: moved to the next version,
    /// so a write the copy would miss is refused as stale. The metadata
    /// service moves every replica to that version when it lists the copy
    /// (or moves this one back if the copy fails).
    async fn export(&self, send: &mut quinn::SendStream, chunk: ChunkId, version: u64) {
        match self.store.version(chunk) {
            Some(v) if v == version => {}
            Some(v) => {
                let resp: ChunkResponse =
                    Err(WireError::new(ErrorCode::Stale, format!("chunk {chunk} is at version {v}, not {version}")));
                let _ = frame::write_frame(send, &resp).await;
                let _ = send.finish();
                return;
            }
            None => {
                let resp: ChunkResponse = Err(WireError::new(ErrorCode::NotFound, format!("no chunk {chunk}")));
                let _ = frame::write_frame(send, &resp).await;
                let _ = send.finish();
                return;
            }
        }
        let hdr: ChunkResponse = Ok(ChunkReply::Export);
        if frame::write_frame(send, &hdr).await.is_err() {
            return;
        }
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(COPY_QUEUE);
        let store = self.store.clone();
        let producer = tokio::task::spawn_blocking(move || {
            let _guard = store.lock_exclusive(chunk);
            let mut w = ChannelWriter { tx, buf: Vec::with_capacity(COPY_BUF) };
            let r = store.export(chunk, version, &mut w);
            use std::io::Write;
            let flushed = w.flush();
            let r = r.and_then(|n| {
                flushed.map(|()| n).map_err(|e| ChunkStoreError::Io { context: "copy stream".into(), source: e })
            });
            r.and_then(|n| store.set_version(chunk, version, version + 1).map(|()| n))
        });
        while let Some(buf) = rx.recv().await {
            if send.write_all(&buf).await.is_err() {
                break;
            }
        }
        match producer.await {
            Ok(Ok(_)) => {
                let _ = send.finish();
            }
            Ok(Err(e)) => {
                tracing::warn!(chunk, error = %e, "export failed");
                let _ = send.reset(1u32.into());
                if matches!(e, ChunkStoreError::Corrupt { .. }) {
                    self.corrupt(chunk, version).await;
                }
            }
            Err(_) => {
                let _ = send.reset(1u32.into());
            }
        }
    }

    /// Copies a replica from `source` (a command from the leader).
    async fn replicate(&self, chunk: ChunkId, version: u64, source: String) {
        let res = self.pull(chunk, version, &source).await;
        let (ok, error) = match &res {
            Ok(()) => (true, None),
            Err(e) => (false, Some(e.clone())),
        };
        if let Some(e) = &error {
            tracing::warn!(chunk, %source, error = %e, "replication failed");
        } else {
            tracing::info!(chunk, version, %source, "replicated");
        }
        let id = self.id.load(Ordering::Relaxed);
        match self.meta.server(ServerMsg::Replicated { id, chunk, version, ok, error }).await {
            Ok(ServerReply::Commands(cmds)) => self.execute(cmds).await,
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not report a replication"),
        }
    }

    async fn pull(&self, chunk: ChunkId, version: u64, source: &str) -> Result<(), String> {
        let limit = Duration::from_secs(30 + self.store.chunk_size() / MIN_COPY_BYTES_PER_SEC);
        let work = async {
            let mut recv = self.peers.export(source, chunk, version).await.map_err(|e| e.to_string())?;
            let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(COPY_QUEUE);
            let store = self.store.clone();
            let consumer = tokio::task::spawn_blocking(move || {
                let mut r = ChannelReader { rx, cur: Vec::new(), pos: 0 };
                // The leader does not list this server for the chunk: a
                // local copy at the same version is a leftover, not data.
                if store.version(chunk) == Some(version) {
                    store.delete(chunk)?;
                }
                store.import(chunk, version, &mut r)
            });
            loop {
                let mut buf = vec![0u8; COPY_BUF];
                match recv.read(&mut buf).await {
                    Ok(Some(n)) => {
                        buf.truncate(n);
                        if tx.send(buf).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        drop(tx);
                        let _ = consumer.await;
                        return Err(format!("copy stream: {e}"));
                    }
                }
            }
            drop(tx);
            consumer.await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())
        };
        tokio::time::timeout(limit, work).await.map_err(|_| "copy timed out".to_string())?
    }

    /// Carries out the leader's commands. Boxed: a replication it starts
    /// reports back and may receive more commands.
    fn execute(
        &self,
        cmds: Vec<ServerCommand>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(self.execute_inner(cmds))
    }

    async fn execute_inner(&self, cmds: Vec<ServerCommand>) {
        for cmd in cmds {
            match cmd {
                ServerCommand::Delete { chunks } => {
                    let store = self.store.clone();
                    let n = chunks.len();
                    let r = blocking(move || {
                        for c in chunks {
                            store.delete(c)?;
                        }
                        Ok(())
                    })
                    .await;
                    match r {
                        Ok(()) => tracing::info!(chunks = n, "deleted chunks the leader no longer lists"),
                        Err(e) => tracing::warn!(error = %e, "delete failed"),
                    }
                }
                ServerCommand::SetVersion { chunk, from, to } => {
                    if let Err(e) = self.set_version(chunk, from, to).await {
                        tracing::warn!(chunk, error = %e, "version raise failed");
                    }
                }
                ServerCommand::Replicate { chunk, version, source } => {
                    let srv = self.clone();
                    tokio::spawn(async move { srv.replicate(chunk, version, source).await });
                }
            }
        }
    }

    fn stats(&self) -> (u64, u64, u64) {
        let (total, avail) = self.store.fs_stats().unwrap_or((0, 0));
        let used = self.store.used_bytes();
        let capacity = self.cfg.capacity_bytes.unwrap_or(total);
        // An announced capacity below the disk's caps what is available.
        let available = avail.min(capacity.saturating_sub(used));
        (capacity, available, used)
    }

    async fn heartbeat_loop(self) {
        let mut last_ok = Instant::now();
        loop {
            tokio::time::sleep(self.cfg.heartbeat).await;
            let (capacity_bytes, available_bytes, used_bytes) = self.stats();
            let cache = self.store.cache_stats();
            for (name, v) in [
                ("read_cache_hits", cache.hits),
                ("read_cache_misses", cache.misses),
                ("read_cache_bytes", cache.bytes),
            ] {
                self.metrics.gauges.get_or_create(&OpLabels { op: name.into() }).set(v as i64);
            }
            let msg = ServerMsg::Heartbeat {
                id: self.id.load(Ordering::Relaxed),
                capacity_bytes,
                available_bytes,
                used_bytes,
                chunks: self.store.len() as u64,
            };
            match self.meta.server(msg).await {
                Ok(ServerReply::Commands(cmds)) => {
                    last_ok = Instant::now();
                    if self.fenced.swap(false, Ordering::Relaxed) {
                        tracing::info!("metadata service reachable again; serving I/O");
                    }
                    self.execute(cmds).await;
                }
                Ok(other) => tracing::warn!(?other, "unexpected heartbeat reply"),
                Err(ClientError::Remote(e)) if e.code == ErrorCode::NotFound => {
                    tracing::warn!("the leader does not know this server; registering again");
                    self.reregister().await;
                }
                Err(e) => tracing::debug!(error = %e, "heartbeat failed"),
            }
            if last_ok.elapsed() > self.cfg.fence_after && !self.fenced.swap(true, Ordering::Relaxed) {
                tracing::warn!(after = ?self.cfg.fence_after, "no heartbeat accepted: fencing (refusing I/O)");
            }
        }
    }

    async fn reregister(&self) {
        let (capacity_bytes, available_bytes, used_bytes) = self.stats();
        let _ = available_bytes;
        let msg = ServerMsg::Register {
            id: Some(self.id.load(Ordering::Relaxed)),
            addr: self.cfg.advertise.clone(),
            topology: self.cfg.topology.clone(),
            capacity_bytes,
            used_bytes,
        };
        if let Ok(ServerReply::Registered { id, .. }) = self.meta.server(msg).await {
            self.id.store(id, Ordering::Relaxed);
            self.report().await;
        }
    }

    async fn report(&self) {
        let all = self.store.list();
        let id = self.id.load(Ordering::Relaxed);
        let pages: Vec<Vec<(ChunkId, u64)>> = if all.is_empty() {
            vec![Vec::new()]
        } else {
            all.chunks(crate::meta::cluster::MAX_REPORT_PAGE).map(|c| c.to_vec()).collect()
        };
        let n = pages.len();
        for (i, page) in pages.into_iter().enumerate() {
            match self.meta.server(ServerMsg::Report { id, chunks: page, done: i + 1 == n }).await {
                Ok(ServerReply::Commands(cmds)) => self.execute(cmds).await,
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "report failed; next round retries");
                    return;
                }
            }
        }
        if !self.checked.swap(true, Ordering::AcqRel) {
            tracing::info!(pages = n, "replicas checked with the metadata service; serving I/O");
        }
    }

    async fn report_loop(self) {
        loop {
            self.report().await;
            // Until the first report went through nothing is served: retry soon.
            let unchecked = !self.checked.load(Ordering::Acquire);
            let wait =
                if unchecked { self.cfg.report_every.min(Duration::from_secs(1)) } else { self.cfg.report_every };
            tokio::time::sleep(wait).await;
        }
    }

    /// Renames the chunk files whose fences moved only the index (see
    /// [`ChunkStore::set_versions`]), a little after the clone that asked.
    async fn settle_loop(self) {
        loop {
            tokio::time::sleep(SETTLE_EVERY).await;
            if self.store.lagging_names() == 0 {
                continue;
            }
            let store = self.store.clone();
            if let Ok(n) = tokio::task::spawn_blocking(move || store.settle_names()).await {
                tracing::debug!(renamed = n, "fenced chunk files renamed");
            }
        }
    }

    async fn scrub_loop(self) {
        if self.cfg.scrub_bytes_per_sec == 0 {
            return;
        }
        let mut seen = self.served.load(Ordering::Relaxed);
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let store = self.store.clone();
            // Clients come first: while they read or write, the scrubber
            // goes at a fraction of its rate (and still finishes its passes).
            let served = self.served.load(Ordering::Relaxed);
            let busy = served != seen;
            seen = served;
            let budget = scrub_budget(self.cfg.scrub_bytes_per_sec, busy);
            let Ok(report) = tokio::task::spawn_blocking(move || store.scrub(budget)).await else { continue };
            for chunk in report.corrupt {
                let version = self.store.version(chunk).unwrap_or(0);
                let id = self.id.load(Ordering::Relaxed);
                tracing::warn!(chunk, "scrub found a corrupt replica");
                if let Err(e) = self.meta.server(ServerMsg::Corrupt { id, chunk, version }).await {
                    tracing::warn!(error = %e, "could not report a corrupt replica");
                }
            }
        }
    }
}

/// Bytes the scrubber may read in the next second: its configured rate,
/// or an eighth of it (at least one MiB) while clients are served.
fn scrub_budget(rate: u64, busy: bool) -> u64 {
    if busy {
        (rate / SCRUB_BUSY_DIVISOR).max(1 << 20).min(rate)
    } else {
        rate
    }
}

/// How much slower the scrubber goes while clients read or write.
const SCRUB_BUSY_DIVISOR: u64 = 8;

/// A local write's error. A copy-on-write copy that failed on a bad block
/// of the origin is this replica's trouble (`Unavailable`): the client
/// drops it from the new chunk and goes on with the others (scrub finds and
/// replaces the origin's bad block on its own).
fn copy_error(e: &ChunkStoreError, missing: Missing) -> WireError {
    match (e, missing) {
        (ChunkStoreError::Corrupt { id, .. }, Missing::CopyFrom { origin, .. }) if *id == origin => {
            WireError::new(ErrorCode::Unavailable, format!("copy-on-write failed: {e}"))
        }
        _ => wire(e),
    }
}

/// Where a write or zero goes: chunk, version, offset, and the origin of a
/// copy-on-write chunk.
struct Place {
    chunk: ChunkId,
    version: u64,
    offset: u64,
    origin: Option<(ChunkId, u64)>,
}

/// Where a write stands with the rest of its chain.
enum Downstream {
    /// No chain, or nothing more to send.
    Done,
    Streaming(fs_client::chunk::WriteStream),
    /// The next server could not be reached or broke off midway; this
    /// server still takes the write and reports the break.
    Failed(ChunkError),
}

impl Downstream {
    async fn push(&mut self, data: &Bytes) {
        if let Downstream::Streaming(w) = self {
            if let Err(e) = w.push(data.clone()).await {
                *self = Downstream::Failed(e);
            }
        }
    }

    async fn finish(self) -> Result<(), ChunkError> {
        match self {
            Downstream::Done => Ok(()),
            Downstream::Streaming(w) => w.finish().await,
            Downstream::Failed(e) => Err(e),
        }
    }

    fn abort(self) {
        if let Downstream::Streaming(w) = self {
            w.abort();
        }
    }
}

/// Reads and drops `n` bytes (a refused write's): whether they came.
async fn drain(conn: &mut (impl tokio::io::AsyncRead + Unpin), n: u64) -> bool {
    use tokio::io::AsyncReadExt;
    let mut sink = (&mut *conn).take(n);
    let copied = tokio::time::timeout(REQUEST_TIMEOUT, tokio::io::copy(&mut sink, &mut tokio::io::sink())).await;
    matches!(copied, Ok(Ok(k)) if k == n)
}

/// Where a write's bytes come from.
enum Incoming<'a> {
    Quic(&'a mut quinn::RecvStream),
    /// A local client's connection (see [`fs_client::local`]), the bytes
    /// taken from it so far, and the memory they are read into: one
    /// buffer for the whole write, cut into pieces as they come (a buffer
    /// per read would each keep a whole allocation however few bytes the
    /// read brought).
    Local {
        conn: &'a mut (dyn tokio::io::AsyncRead + Unpin + Send),
        taken: &'a mut u64,
        buf: bytes::BytesMut,
    },
}

impl Incoming<'_> {
    /// The next bytes of a write, at most `max`.
    async fn next(&mut self, max: usize) -> Result<Bytes, String> {
        match self {
            Incoming::Quic(recv) => Ok(recv
                .read_chunk(max, true)
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| "stream ended".to_string())?
                .bytes),
            Incoming::Local { conn, taken, buf } => {
                use tokio::io::AsyncReadExt;
                if buf.capacity() == 0 {
                    // The first call asks for the whole write.
                    buf.reserve(max);
                }
                let want = max.min(fs_client::local::WRITE_PIECE).min(buf.capacity() - buf.len());
                let n = (&mut **conn).take(want as u64).read_buf(buf).await.map_err(|e| e.to_string())?;
                if n == 0 {
                    return Err("connection ended".into());
                }
                **taken += n as u64;
                Ok(buf.split().freeze())
            }
        }
    }
}

/// Reads a write's `n` bytes, passing each piece down the chain as it
/// arrives. With `gather` (some extent is long enough to go around the page
/// cache, [`store::DIRECT_MIN_BYTES`]) they are gathered into aligned
/// memory; without, they are the pieces as they came, not copied.
async fn receive(
    mut recv: Incoming<'_>,
    n: usize,
    downstream: &mut Downstream,
    gather: bool,
) -> Result<Vec<Bytes>, String> {
    let mut out: Option<store::AlignedBuf> = None;
    let mut pieces = Vec::new();
    let mut got = 0;
    while got < n {
        let bytes = recv.next(n - got).await.map_err(|e| format!("{e} after {got} of {n} bytes"))?;
        downstream.push(&bytes).await;
        got += bytes.len();
        if gather {
            out.get_or_insert_with(|| store::aligned_buffer(n)).extend_from_slice(&bytes);
        } else {
            pieces.push(bytes);
        }
    }
    Ok(match out {
        Some(buf) => vec![buf.freeze()],
        None => pieces,
    })
}

/// The reply to a chained write or zero, from the downstream outcome.
fn chain_outcome(downstream: Result<(), ChunkError>, chain: &[String]) -> Result<ChunkReply, WireError> {
    match downstream {
        Ok(()) => Ok(ChunkReply::Done),
        Err(ChunkError::ChainFailed { addr, error }) => Ok(ChunkReply::ChainBroken { at: addr, error }),
        Err(ChunkError::Remote { addr, error }) => Ok(ChunkReply::ChainBroken { at: addr, error }),
        Err(ChunkError::Transport { message, .. }) => Ok(ChunkReply::ChainBroken {
            at: chain.first().cloned().unwrap_or_default(),
            error: WireError::new(ErrorCode::Unavailable, message),
        }),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ChunkStoreError> + Send + 'static,
) -> Result<T, WireError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| WireError::new(ErrorCode::Internal, e.to_string()))?
        .map_err(|e| wire(&e))
}

/// A `Write` that hands buffers to an async task.
struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
    buf: Vec<u8>,
}

impl std::io::Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= COPY_BUF {
            self.flush()?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let out = std::mem::replace(&mut self.buf, Vec::with_capacity(COPY_BUF));
        self.tx.blocking_send(out).map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "receiver gone"))
    }
}

/// A `Read` fed by an async task.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos >= self.cur.len() {
            match self.rx.blocking_recv() {
                Some(b) => {
                    self.cur = b;
                    self.pos = 0;
                }
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.cur.len() - self.pos);
        out[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scrubber_slows_down_while_clients_are_served() {
        let rate = 16 << 20;
        assert_eq!(scrub_budget(rate, false), rate);
        assert_eq!(scrub_budget(rate, true), 2 << 20);
        // Never below a MiB a second, never above the configured rate.
        assert_eq!(scrub_budget(4 << 20, true), 1 << 20);
        assert_eq!(scrub_budget(512 << 10, true), 512 << 10);
    }
}
