//! The client side of the chunk-server protocol ([`CHUNK_ALPN`]): reads,
//! chained writes, flushes and replica exports. Used by the file client and
//! by chunk servers forwarding writes along a chain.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Mutex;

use crate::config::ClientConfig;
use crate::frame;
use crate::local::{Local, LocalSockets};
use crate::proto::*;
use crate::sums::BlockSums;
use crate::tls::{self, Identity, TlsError};

/// How long one chunk request may take.
pub const CHUNK_IO_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    /// The server answered with an error.
    #[error("{addr}: {error}")]
    Remote { addr: String, error: WireError },
    /// The server was not reachable or the stream broke.
    #[error("{addr}: {message}")]
    Transport { addr: String, message: String },
    /// The first server of a chain wrote, a later one (`addr`) failed.
    #[error("chain broke at {addr}: {error}")]
    ChainFailed { addr: String, error: WireError },
}

impl ChunkError {
    /// The server to blame for the failure, when it is a server's fault
    /// rather than the request's.
    pub fn failed_server(&self) -> Option<&str> {
        match self {
            ChunkError::Transport { addr, .. } => Some(addr),
            ChunkError::ChainFailed { addr, .. } => Some(addr),
            ChunkError::Remote { addr, error } if matches!(error.code, ErrorCode::Io | ErrorCode::Unavailable) => {
                Some(addr)
            }
            ChunkError::Remote { .. } => None,
        }
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            ChunkError::Remote { error, .. } | ChunkError::ChainFailed { error, .. } => error.code,
            ChunkError::Transport { .. } => ErrorCode::Unavailable,
        }
    }
}

/// Reads exactly `n` bytes from `recv`. A reply that fits in one of
/// quinn's chunks is that chunk, not copied; a longer one is copied once.
pub async fn read_bytes(recv: &mut quinn::RecvStream, n: usize) -> Result<Bytes, String> {
    let mut out = bytes::BytesMut::new();
    while out.len() < n {
        let got = out.len();
        let chunk = recv
            .read_chunk(n - got, true)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("stream ended after {got} of {n} bytes"))?;
        if got == 0 && chunk.bytes.len() == n {
            return Ok(chunk.bytes);
        }
        if out.capacity() == 0 {
            out.reserve(n);
        }
        out.extend_from_slice(&chunk.bytes);
    }
    Ok(out.freeze())
}

/// The reply frame of a chunk request: the reply, or the server's error.
async fn read_reply(addr: &str, recv: &mut quinn::RecvStream) -> Result<ChunkReply, ChunkError> {
    let resp: ChunkResponse = frame::read_frame(recv)
        .await
        .map_err(|e| ChunkError::Transport { addr: addr.to_string(), message: e.to_string() })?;
    resp.map_err(|error| ChunkError::Remote { addr: addr.to_string(), error })
}

/// A chained write under way (see [`ChunkClient::start_write`]): its
/// request frame leaves with the first bytes, so a small write is still
/// one datagram.
pub struct WriteStream {
    client: ChunkClient,
    addr: String,
    conn: quinn::Connection,
    header: Option<Bytes>,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

impl WriteStream {
    /// Sends the next bytes of the write (quinn sends from them, no copy).
    pub async fn push(&mut self, data: Bytes) -> Result<(), ChunkError> {
        let res = match self.header.take() {
            Some(h) => self.send.write_all_chunks(&mut [h, data]).await,
            None => self.send.write_chunk(data).await,
        };
        let res = res.map_err(|e| ChunkError::Transport { addr: self.addr.clone(), message: e.to_string() });
        self.client.after(&self.addr, &self.conn, &res).await;
        res
    }

    /// Ends the write (every byte was pushed) and waits for the chain's
    /// answer, as [`ChunkClient::write`] does.
    pub async fn finish(mut self) -> Result<(), ChunkError> {
        let addr = self.addr.clone();
        let client = self.client.clone();
        client
            .timed(&addr, async {
                if let Some(h) = self.header.take() {
                    // A write of no bytes: the request alone.
                    self.send
                        .write_chunk(h)
                        .await
                        .map_err(|e| ChunkError::Transport { addr: addr.clone(), message: e.to_string() })?;
                }
                let _ = self.send.finish();
                let res = read_reply(&addr, &mut self.recv).await;
                self.client.after(&addr, &self.conn, &res).await;
                chain_reply(&addr, res?)
            })
            .await
    }

    /// Gives the write up: the stream is reset, so the server never takes
    /// the bytes already sent for a whole write.
    pub fn abort(mut self) {
        let _ = self.send.reset(0u32.into());
    }
}

/// What a chained request's reply says of the chain.
fn chain_reply(head: &str, reply: ChunkReply) -> Result<(), ChunkError> {
    match reply {
        ChunkReply::Done => Ok(()),
        ChunkReply::ChainBroken { at, error } => Err(ChunkError::ChainFailed { addr: at, error }),
        other => Err(ChunkError::Transport { addr: head.into(), message: format!("unexpected reply {other:?}") }),
    }
}

/// Connections to chunk servers. Cheap to clone.
#[derive(Clone)]
pub struct ChunkClient {
    inner: Arc<Inner>,
}

struct Inner {
    endpoint: quinn::Endpoint,
    quic: quinn::ClientConfig,
    conns: Mutex<HashMap<String, quinn::Connection>>,
    /// One dial per server at a time: a burst of requests to a server not
    /// connected yet shares one handshake instead of starting hundreds.
    dialing: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Servers whose last dial failed, until when requests to them fail at
    /// once (readers go to other replicas instead of waiting out a connect
    /// timeout each).
    down: std::sync::Mutex<HashMap<String, std::time::Instant>>,
    /// Requests to servers on this host, through their local sockets.
    local: Option<LocalSockets>,
}

/// How long a server whose dial failed is skipped.
const DOWN_FOR: Duration = Duration::from_secs(2);

impl ChunkClient {
    pub fn new(identity: &Identity) -> Result<Self, TlsError> {
        let quic = tls::client_config(identity, CHUNK_ALPN)?;
        let bind: SocketAddr = "0.0.0.0:0".parse().expect("literal address");
        let endpoint = tls::bind_endpoint(bind, None).map_err(|e| TlsError::Config(format!("client socket: {e}")))?;
        Ok(Self::with_endpoint(endpoint, quic))
    }

    /// Uses an existing endpoint (a server's own) with a chunk-ALPN config.
    pub fn with_endpoint(endpoint: quinn::Endpoint, quic: quinn::ClientConfig) -> Self {
        let inner = Inner {
            endpoint,
            quic,
            conns: Mutex::default(),
            dialing: Mutex::default(),
            down: Default::default(),
            local: None,
        };
        ChunkClient { inner: Arc::new(inner) }
    }

    /// A client for `cfg`: its certificate, and local reads as it says.
    pub fn for_config(cfg: &ClientConfig) -> Result<Self, TlsError> {
        let mut c = Self::new(&cfg.identity())?;
        if let Some(dir) = cfg.local_dir() {
            let cluster = tls::cluster_fingerprint(&cfg.identity())?;
            let inner = Arc::get_mut(&mut c.inner).expect("a new client is not shared");
            inner.local = Some(LocalSockets::new(dir, cluster));
        }
        Ok(c)
    }

    /// Whether `addr` is a server on this host that local reads reach.
    pub fn is_local(&self, addr: &str) -> bool {
        self.inner.local.as_ref().is_some_and(|l| l.is_local(addr))
    }

    /// Reads answered through local sockets so far.
    pub fn local_reads(&self) -> u64 {
        self.inner.local.as_ref().map_or(0, |l| l.reads())
    }

    /// Writes answered through local sockets so far.
    pub fn local_writes(&self) -> u64 {
        self.inner.local.as_ref().map_or(0, |l| l.writes())
    }

    /// `req` through `addr`'s local socket, if it is on this host: `None`
    /// sends it over QUIC. A server gone silent is marked down, as one
    /// whose QUIC connection timed out.
    async fn via_local<T>(
        &self,
        addr: &str,
        call: impl std::future::Future<Output = Local<T>>,
    ) -> Option<Result<T, ChunkError>> {
        match call.await {
            Local::NotLocal => None,
            Local::Answer(a) => Some(a.map_err(|error| ChunkError::Remote { addr: addr.into(), error })),
            Local::Broken { why, silent } => {
                if silent {
                    self.mark_down(addr, true);
                }
                Some(Err(ChunkError::Transport { addr: addr.into(), message: why }))
            }
        }
    }

    /// Whether a dial to `addr` failed in the last [`DOWN_FOR`].
    pub fn is_down(&self, addr: &str) -> bool {
        let down = self.inner.down.lock().unwrap_or_else(|p| p.into_inner());
        down.get(addr).is_some_and(|until| std::time::Instant::now() < *until)
    }

    fn mark_down(&self, addr: &str, down: bool) {
        let mut d = self.inner.down.lock().unwrap_or_else(|p| p.into_inner());
        if down {
            d.insert(addr.to_string(), std::time::Instant::now() + DOWN_FOR);
        } else {
            d.remove(addr);
        }
    }

    async fn connection(&self, addr: &str) -> Result<quinn::Connection, ChunkError> {
        let transport = |m: String| ChunkError::Transport { addr: addr.to_string(), message: m };
        if let Some(c) = self.inner.conns.lock().await.get(addr) {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        if self.is_down(addr) {
            return Err(transport("unreachable (a connect failed just now)".into()));
        }
        let gate = self.inner.dialing.lock().await.entry(addr.to_string()).or_default().clone();
        let _dial = gate.lock().await;
        // Another request may have connected while this one waited, or
        // found the server down.
        if let Some(c) = self.inner.conns.lock().await.get(addr) {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        if self.is_down(addr) {
            return Err(transport("unreachable (a connect failed just now)".into()));
        }
        let sock: SocketAddr = addr.parse().map_err(|_| transport("not an ip:port address".into()))?;
        let connecting = self
            .inner
            .endpoint
            .connect_with(self.inner.quic.clone(), sock, tls::SERVER_NAME)
            .map_err(|e| transport(e.to_string()))?;
        let conn = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                self.mark_down(addr, true);
                return Err(transport(format!("connect: {e}")));
            }
            Err(_) => {
                self.mark_down(addr, true);
                return Err(transport("connect timed out".into()));
            }
        };
        self.mark_down(addr, false);
        self.inner.conns.lock().await.insert(addr.to_string(), conn.clone());
        Ok(conn)
    }

    async fn forget(&self, addr: &str) {
        self.inner.conns.lock().await.remove(addr);
    }

    /// Sends a request (and `data` after it), returns the reply header and
    /// the stream to read any data that follows.
    async fn exchange(
        &self,
        addr: &str,
        req: &ChunkRequest,
        data: Vec<Bytes>,
    ) -> Result<(ChunkReply, quinn::RecvStream), ChunkError> {
        let transport = |m: String| ChunkError::Transport { addr: addr.to_string(), message: m };
        let conn = self.connection(addr).await?;
        let res = async {
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| transport(e.to_string()))?;
            let written = if data.is_empty() {
                frame::write_frame(&mut send, req).await
            } else {
                // Handed over whole: quinn sends from these bytes, no copy.
                frame::write_frame_with(&mut send, req, data).await
            };
            written.map_err(|e| transport(e.to_string()))?;
            let _ = send.finish();
            read_reply(addr, &mut recv).await.map(|r| (r, recv))
        }
        .await;
        self.after(addr, &conn, &res).await;
        res
    }

    /// After a request to `addr` over `conn` ended: a broken transport
    /// forgets the connection.
    async fn after<T>(&self, addr: &str, conn: &quinn::Connection, res: &Result<T, ChunkError>) {
        if matches!(res, Err(ChunkError::Transport { .. })) {
            self.forget(addr).await;
            // The peer went silent (killed, stopped, cut off): retries
            // fail at once for a while instead of each waiting for a dial.
            if matches!(conn.close_reason(), Some(quinn::ConnectionError::TimedOut)) {
                self.mark_down(addr, true);
            }
        }
    }

    /// Starts a chained `Write` or `WriteV` to `head` whose bytes are
    /// handed over as they come ([`WriteStream::push`]): a chunk server
    /// passes a write on down its chain while the bytes still arrive
    /// (cut-through), so every hop of the chain is busy at once instead of
    /// each waiting for the one before to have the whole piece.
    pub async fn start_write(&self, head: &str, req: &ChunkRequest) -> Result<WriteStream, ChunkError> {
        let transport = |m: String| ChunkError::Transport { addr: head.to_string(), message: m };
        let header = Bytes::from(frame::encode(req).map_err(|e| transport(e.to_string()))?);
        let opened = tokio::time::timeout(CONNECT_TIMEOUT, async {
            let conn = self.connection(head).await?;
            let res = conn.open_bi().await.map_err(|e| transport(e.to_string()));
            self.after(head, &conn, &res).await;
            res.map(|(send, recv)| (conn, send, recv))
        })
        .await
        .map_err(|_| transport("timed out opening a stream".into()))??;
        let (conn, send, recv) = opened;
        Ok(WriteStream { client: self.clone(), addr: head.to_string(), conn, header: Some(header), send, recv })
    }

    async fn timed<T>(
        &self,
        addr: &str,
        fut: impl std::future::Future<Output = Result<T, ChunkError>>,
    ) -> Result<T, ChunkError> {
        match tokio::time::timeout(CHUNK_IO_TIMEOUT, fut).await {
            Ok(r) => r,
            Err(_) => {
                self.forget(addr).await;
                Err(ChunkError::Transport { addr: addr.to_string(), message: "timed out".into() })
            }
        }
    }

    /// Reads `len` bytes at `offset` of a chunk replica.
    pub async fn read(
        &self,
        addr: &str,
        chunk: ChunkId,
        version: u64,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, ChunkError> {
        if len > MAX_IO_BYTES {
            return Err(ChunkError::Remote {
                addr: addr.into(),
                error: WireError::new(ErrorCode::TooBig, format!("read of {len} bytes exceeds {MAX_IO_BYTES}")),
            });
        }
        let req = ChunkRequest::Read { chunk, version, offset, len };
        if let Some(local) = &self.inner.local {
            if let Some(answer) = self.via_local(addr, local.read(addr, &req)).await {
                return answer;
            }
        }
        self.timed(addr, async {
            let (reply, mut recv) = self.exchange(addr, &req, Vec::new()).await?;
            let n = match reply {
                ChunkReply::Data { len: n } if n == len => n,
                other => {
                    return Err(ChunkError::Transport {
                        addr: addr.into(),
                        message: format!("unexpected reply {other:?}"),
                    })
                }
            };
            read_bytes(&mut recv, n as usize).await.map_err(|e| ChunkError::Transport { addr: addr.into(), message: e })
        })
        .await
    }

    /// Writes `data` at `offset` on every server of `chain` (the first one
    /// forwards to the rest); returns once all have it. A server lacking a
    /// copy-on-write chunk makes it from `origin` first.
    #[allow(clippy::too_many_arguments)]
    pub async fn write(
        &self,
        chain: &[String],
        chunk: ChunkId,
        version: u64,
        offset: u64,
        data: Bytes,
        create: bool,
        origin: Option<(ChunkId, u64)>,
        sums: Option<BlockSums>,
    ) -> Result<(), ChunkError> {
        let Some((head, rest)) = chain.split_first() else { return Ok(()) };
        let len = data.len() as u64;
        let req = ChunkRequest::Write { chunk, version, offset, len, chain: rest.to_vec(), create, origin, sums };
        self.chained(head, req, vec![data]).await
    }

    /// Writes several extents of one chunk (`(offset, len)`, sorted, not
    /// overlapping; `data` is their bytes in order) on every server of
    /// `chain`, in one request.
    #[allow(clippy::too_many_arguments)]
    pub async fn writev(
        &self,
        chain: &[String],
        chunk: ChunkId,
        version: u64,
        extents: Vec<(u64, u64)>,
        data: Vec<Bytes>,
        create: bool,
        origin: Option<(ChunkId, u64)>,
        sums: Option<BlockSums>,
    ) -> Result<(), ChunkError> {
        let Some((head, rest)) = chain.split_first() else { return Ok(()) };
        let req = ChunkRequest::WriteV { chunk, version, extents, chain: rest.to_vec(), create, origin, sums };
        self.chained(head, req, data).await
    }

    /// Makes a range read as zeros on every server of `chain`.
    pub async fn zero(
        &self,
        chain: &[String],
        chunk: ChunkId,
        version: u64,
        offset: u64,
        len: u64,
        origin: Option<(ChunkId, u64)>,
    ) -> Result<(), ChunkError> {
        let Some((head, rest)) = chain.split_first() else { return Ok(()) };
        let req = ChunkRequest::Zero { chunk, version, offset, len, chain: rest.to_vec(), origin };
        self.chained(head, req, Vec::new()).await
    }

    async fn chained(&self, head: &str, req: ChunkRequest, data: Vec<Bytes>) -> Result<(), ChunkError> {
        if let Some(local) = &self.inner.local {
            if let Some(answer) = self.via_local(head, local.write(head, &req, &data)).await {
                return chain_reply(head, answer?);
            }
        }
        self.timed(head, async { chain_reply(head, self.exchange(head, &req, data).await?.0) }).await
    }

    /// Makes earlier writes to `chunks` durable on one server.
    pub async fn flush(&self, addr: &str, chunks: Vec<ChunkId>) -> Result<(), ChunkError> {
        self.simple(addr, ChunkRequest::Flush { chunks }).await
    }

    pub async fn set_version(&self, addr: &str, chunk: ChunkId, from: u64, to: u64) -> Result<(), ChunkError> {
        self.simple(addr, ChunkRequest::SetVersion { chunk, from, to }).await
    }

    /// Raises many versions on one server (fences after a clone); one
    /// result per change.
    pub async fn set_versions(
        &self,
        addr: &str,
        changes: Vec<VersionChange>,
    ) -> Result<Vec<Result<(), WireError>>, ChunkError> {
        let n = changes.len();
        self.timed(addr, async {
            match self.exchange(addr, &ChunkRequest::SetVersions { changes }, Vec::new()).await?.0 {
                ChunkReply::Versions(r) if r.len() == n => Ok(r),
                other => {
                    Err(ChunkError::Transport { addr: addr.into(), message: format!("unexpected reply {other:?}") })
                }
            }
        })
        .await
    }

    async fn simple(&self, addr: &str, req: ChunkRequest) -> Result<(), ChunkError> {
        self.timed(addr, async {
            match self.exchange(addr, &req, Vec::new()).await?.0 {
                ChunkReply::Done => Ok(()),
                other => {
                    Err(ChunkError::Transport { addr: addr.into(), message: format!("unexpected reply {other:?}") })
                }
            }
        })
        .await
    }

    /// Opens an export stream of a whole replica (no timeout: the caller
    /// bounds the transfer).
    pub async fn export(&self, addr: &str, chunk: ChunkId, version: u64) -> Result<quinn::RecvStream, ChunkError> {
        match self.exchange(addr, &ChunkRequest::Export { chunk, version }, Vec::new()).await? {
            (ChunkReply::Export, recv) => Ok(recv),
            (other, _) => {
                Err(ChunkError::Transport { addr: addr.into(), message: format!("unexpected reply {other:?}") })
            }
        }
    }

    pub async fn status(&self, addr: &str) -> Result<ChunkReply, ChunkError> {
        self.timed(addr, async { Ok(self.exchange(addr, &ChunkRequest::Status, Vec::new()).await?.0) }).await
    }
}
