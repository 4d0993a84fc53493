//! [`MetaClient`]: requests to the metadata service, with leader discovery,
//! retries under one deadline, and at-most-once writes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, Mutex, Semaphore};

use crate::config::ClientConfig;
use crate::frame::{self, FrameError};
use crate::proto::*;
use crate::tls::{self, TlsError};

/// The longest one attempt may take before the client tries another server.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const BACKOFF_MIN: Duration = Duration::from_millis(20);
/// After this long without an answer, ask the other servers who leads: a
/// leader that died leaves its connection silent, not closed.
const LEADER_PROBE_AFTER: Duration = Duration::from_millis(300);
/// How often the probe asks again.
const LEADER_PROBE_EVERY: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error.
    #[error("{0}")]
    Remote(WireError),
    #[error("no metadata server answered within {timeout:?} (last error: {last})")]
    Unavailable { timeout: Duration, last: String },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("{0}")]
    Config(String),
    #[error("protocol: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The stable code of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            ClientError::Remote(e) => e.code,
            ClientError::Unavailable { .. } => ErrorCode::Unavailable,
            ClientError::Tls(_) | ClientError::Config(_) => ErrorCode::Invalid,
            ClientError::Protocol(_) => ErrorCode::Internal,
        }
    }

    pub fn errno(&self) -> i32 {
        self.code().errno()
    }
}

impl ClientError {
    /// The same error again, for each caller of a failed batch.
    fn duplicate(&self) -> ClientError {
        match self {
            ClientError::Remote(w) => ClientError::Remote(w.clone()),
            ClientError::Unavailable { timeout, last } => {
                ClientError::Unavailable { timeout: *timeout, last: last.clone() }
            }
            ClientError::Tls(e) => ClientError::Config(e.to_string()),
            ClientError::Config(m) => ClientError::Config(m.clone()),
            ClientError::Protocol(m) => ClientError::Protocol(m.clone()),
        }
    }
}

fn stopped() -> ClientError {
    ClientError::Protocol("client batcher stopped".into())
}

/// Drains queued requests into batches, [`CLIENT_INFLIGHT_BATCHES`] in
/// flight, each sent by `send`; ends when the client is dropped.
async fn batch_loop<T, F, Fut>(inner: Weak<Inner>, mut rx: mpsc::Receiver<T>, send: F)
where
    T: Send + 'static,
    F: Fn(MetaClient, Vec<T>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(CLIENT_INFLIGHT_BATCHES));
    while let Some(first) = rx.recv().await {
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH_ENTRIES {
            match rx.try_recv() {
                Ok(q) => batch.push(q),
                Err(_) => break,
            }
        }
        let Some(inner) = inner.upgrade() else { return };
        let sending = send(MetaClient { inner }, batch);
        tokio::spawn(async move {
            sending.await;
            drop(permit);
        });
    }
}

impl From<WireError> for ClientError {
    fn from(e: WireError) -> Self {
        ClientError::Remote(e)
    }
}

/// What one attempt against one server produced.
enum Attempt {
    Done(Response),
    /// Transport trouble: try elsewhere.
    Failed(String),
}

/// A metadata service client. Cheap to clone; share one per process.
#[derive(Clone)]
pub struct MetaClient {
    inner: Arc<Inner>,
}

/// An operation waiting for a batch.
struct QueuedOp {
    id: RequestId,
    op: MetaOp,
    reply: oneshot::Sender<Result<OpReply, ClientError>>,
}

/// A read waiting for a batch.
struct QueuedRead {
    read: MetaRead,
    reply: oneshot::Sender<Result<ReadReply, ClientError>>,
}

/// Batches a client has in flight at most; calls arriving meanwhile join the
/// next batch, so concurrent callers share requests.
const CLIENT_INFLIGHT_BATCHES: usize = 4;
/// Calls queued for batching at most; beyond it callers wait.
const CLIENT_QUEUE: usize = 16_384;

struct Inner {
    ops_queue: OnceLock<mpsc::Sender<QueuedOp>>,
    reads_queue: OnceLock<mpsc::Sender<QueuedRead>>,
    endpoint: quinn::Endpoint,
    quic: quinn::ClientConfig,
    servers: Vec<String>,
    /// Address believed to be the leader.
    leader: std::sync::Mutex<Option<String>>,
    next: AtomicUsize,
    conns: Mutex<HashMap<String, quinn::Connection>>,
    client_id: u128,
    seq: AtomicU64,
    timeout: Duration,
}

impl MetaClient {
    /// Sets up a client for `cfg`. No connection is made until the first request.
    pub fn new(cfg: &ClientConfig) -> Result<Self, ClientError> {
        cfg.validate().map_err(|e| ClientError::Config(e.to_string()))?;
        let quic = tls::client_config(&cfg.identity(), CLIENT_ALPN)?;
        let bind: SocketAddr = "0.0.0.0:0".parse().expect("literal address");
        let endpoint =
            crate::tls::bind_endpoint(bind, None).map_err(|e| ClientError::Config(format!("client socket: {e}")))?;
        Ok(MetaClient {
            inner: Arc::new(Inner {
                ops_queue: OnceLock::new(),
                reads_queue: OnceLock::new(),
                endpoint,
                quic,
                servers: cfg.meta.clone(),
                leader: std::sync::Mutex::new(None),
                next: AtomicUsize::new(0),
                conns: Mutex::new(HashMap::new()),
                client_id: rand::random(),
                seq: AtomicU64::new(1),
                timeout: cfg.timeout(),
            }),
        })
    }

    /// This client's id: its requests carry it, and a lease names it.
    pub fn client_id(&self) -> u128 {
        self.inner.client_id
    }

    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// Applies one namespace change, at most once even across retries.
    /// Concurrent calls on one client travel together in batches.
    pub async fn op(&self, op: MetaOp) -> Result<OpReply, ClientError> {
        let id = RequestId { client: self.inner.client_id, seq: self.inner.seq.fetch_add(1, Ordering::Relaxed) };
        let queue = self.inner.ops_queue.get_or_init(|| {
            let (tx, rx) = mpsc::channel(CLIENT_QUEUE);
            tokio::spawn(batch_loop(
                Arc::downgrade(&self.inner),
                rx,
                |c, batch| async move { c.send_ops(batch).await },
            ));
            tx
        });
        let (tx, rx) = oneshot::channel();
        queue.send(QueuedOp { id, op, reply: tx }).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// A linearizable read. Concurrent reads on one client share requests
    /// and one read-index round.
    pub async fn read(&self, read: MetaRead) -> Result<ReadReply, ClientError> {
        let queue =
            self.inner.reads_queue.get_or_init(|| {
                let (tx, rx) = mpsc::channel(CLIENT_QUEUE);
                tokio::spawn(batch_loop(Arc::downgrade(&self.inner), rx, |c, batch| async move {
                    c.send_reads(batch).await
                }));
                tx
            });
        let (tx, rx) = oneshot::channel();
        queue.send(QueuedRead { read, reply: tx }).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Sends a batch of operations; retries entries that failed for a
    /// retryable reason (with the same ids) until the deadline.
    async fn send_ops(&self, mut batch: Vec<QueuedOp>) {
        let deadline = Instant::now() + self.inner.timeout;
        let mut backoff = BACKOFF_MIN;
        loop {
            let request = if batch.len() == 1 {
                Request::Op { id: batch[0].id, op: batch[0].op.clone() }
            } else {
                Request::Ops(batch.iter().map(|q| (q.id, q.op.clone())).collect())
            };
            let results: Vec<Result<OpReply, WireError>> = match self.call_until(request, deadline).await {
                Ok(Reply::Op(r)) if batch.len() == 1 => vec![Ok(r)],
                Ok(Reply::Ops(r)) if r.len() == batch.len() => r,
                Ok(other) => {
                    let e = format!("unexpected reply {other:?}");
                    for q in batch {
                        let _ = q.reply.send(Err(ClientError::Protocol(e.clone())));
                    }
                    return;
                }
                Err(e) => {
                    for q in batch {
                        let _ = q.reply.send(Err(e.duplicate()));
                    }
                    return;
                }
            };
            let mut again = Vec::new();
            for (q, r) in batch.into_iter().zip(results) {
                match r {
                    Err(e) if e.code.is_retryable() && Instant::now() < deadline => again.push(q),
                    r => {
                        let _ = q.reply.send(r.map_err(ClientError::Remote));
                    }
                }
            }
            if again.is_empty() {
                return;
            }
            batch = again;
            tokio::time::sleep(backoff.min(deadline.saturating_duration_since(Instant::now()))).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    async fn send_reads(&self, batch: Vec<QueuedRead>) {
        let deadline = Instant::now() + self.inner.timeout;
        let request = if batch.len() == 1 {
            Request::Read(batch[0].read.clone())
        } else {
            Request::Reads(batch.iter().map(|q| q.read.clone()).collect())
        };
        let results: Vec<Result<ReadReply, ClientError>> = match self.call_until(request, deadline).await {
            Ok(Reply::Read(r)) if batch.len() == 1 => vec![Ok(r)],
            Ok(Reply::Reads(r)) if r.len() == batch.len() => {
                r.into_iter().map(|r| r.map_err(ClientError::Remote)).collect()
            }
            Ok(other) => {
                batch.iter().map(|_| Err(ClientError::Protocol(format!("unexpected reply {other:?}")))).collect()
            }
            Err(e) => batch.iter().map(|_| Err(e.duplicate())).collect(),
        };
        for (q, r) in batch.into_iter().zip(results) {
            let _ = q.reply.send(r);
        }
    }

    /// An administrative request, sent to the leader.
    pub async fn admin(&self, op: AdminOp) -> Result<AdminReply, ClientError> {
        match self.call(Request::Admin(op)).await? {
            Reply::Admin(r) => Ok(r),
            other => Err(ClientError::Protocol(format!("unexpected reply {other:?}"))),
        }
    }

    /// A chunk server's message to the leader.
    pub async fn server(&self, msg: ServerMsg) -> Result<ServerReply, ClientError> {
        match self.call(Request::Server(msg)).await? {
            Reply::Server(r) => Ok(r),
            other => Err(ClientError::Protocol(format!("unexpected reply {other:?}"))),
        }
    }

    /// A VM management request (services, VMs, hosts), sent to the leader.
    pub async fn vm(&self, req: VmRequest) -> Result<crate::vm::VmReply, ClientError> {
        match self.call(Request::Vm(req)).await? {
            Reply::Vm(r) => Ok(r),
            other => Err(ClientError::Protocol(format!("unexpected reply {other:?}"))),
        }
    }

    /// A VM host agent's message to the leader, retried (leader changes
    /// included) for at most `within`: a heartbeat that cannot get through
    /// soon is worthless, the next one is due and the lease counts from the
    /// send.
    pub async fn host(&self, msg: crate::vm::HostMsg, within: Duration) -> Result<crate::vm::HostReply, ClientError> {
        match self.call_until(Request::Host(msg), Instant::now() + within).await? {
            Reply::Host(r) => Ok(r),
            other => Err(ClientError::Protocol(format!("unexpected reply {other:?}"))),
        }
    }

    /// The status as one particular server sees it (no redirection).
    pub async fn status_of(&self, addr: &str) -> Result<ClusterStatus, ClientError> {
        let req = Envelope { version: PROTOCOL_VERSION, request: Request::Admin(AdminOp::Status) };
        match tokio::time::timeout(ATTEMPT_TIMEOUT, self.attempt(addr, &req)).await {
            Ok(Attempt::Done(Ok(Reply::Admin(AdminReply::Status(s))))) => Ok(s),
            Ok(Attempt::Done(Ok(other))) => Err(ClientError::Protocol(format!("unexpected reply {other:?}"))),
            Ok(Attempt::Done(Err(e))) => Err(ClientError::Remote(e)),
            Ok(Attempt::Failed(m)) => Err(ClientError::Unavailable { timeout: ATTEMPT_TIMEOUT, last: m }),
            Err(_) => Err(ClientError::Unavailable { timeout: ATTEMPT_TIMEOUT, last: format!("{addr}: timed out") }),
        }
    }

    /// The configured server addresses.
    pub fn servers(&self) -> &[String] {
        &self.inner.servers
    }

    fn pick(&self) -> String {
        if let Some(l) = self.inner.leader.lock().ok().and_then(|l| l.clone()) {
            return l;
        }
        let i = self.inner.next.fetch_add(1, Ordering::Relaxed);
        self.inner.servers[i % self.inner.servers.len()].clone()
    }

    fn set_leader(&self, addr: Option<String>) {
        if let Ok(mut l) = self.inner.leader.lock() {
            *l = addr;
        }
    }

    async fn call(&self, request: Request) -> Result<Reply, ClientError> {
        self.call_until(request, Instant::now() + self.inner.timeout).await
    }

    async fn call_until(&self, request: Request, deadline: Instant) -> Result<Reply, ClientError> {
        let env = Envelope { version: PROTOCOL_VERSION, request };
        let mut backoff = BACKOFF_MIN;
        let mut last = String::from("no attempt");
        loop {
            let addr = self.pick();
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::Unavailable { timeout: self.inner.timeout, last });
            }
            let attempt = tokio::time::timeout(left.min(ATTEMPT_TIMEOUT), self.attempt(&addr, &env));
            let outcome = tokio::select! {
                r = attempt => r,
                other = self.probe_leader_elsewhere(&addr) => {
                    // Requests carry ids, so sending it again elsewhere is safe.
                    last = format!("{addr}: silent; {other} leads now");
                    self.forget(&addr).await;
                    self.set_leader(Some(other));
                    continue;
                }
            };
            match outcome {
                Ok(Attempt::Done(Ok(reply))) => {
                    self.set_leader(Some(addr));
                    return Ok(reply);
                }
                Ok(Attempt::Done(Err(e))) if e.code == ErrorCode::NotLeader => {
                    last = format!("{addr}: {}", e.message);
                    match e.leader {
                        Some(h) if !h.addr.is_empty() && h.addr != addr => {
                            self.set_leader(Some(h.addr));
                            continue;
                        }
                        _ => self.set_leader(None),
                    }
                }
                Ok(Attempt::Done(Err(e))) if e.code.is_retryable() => {
                    last = format!("{addr}: {}", e.message);
                    self.set_leader(None);
                }
                Ok(Attempt::Done(Err(e))) => return Err(ClientError::Remote(e)),
                Ok(Attempt::Failed(m)) => {
                    last = format!("{addr}: {m}");
                    self.set_leader(None);
                    self.forget(&addr).await;
                }
                Err(_) => {
                    last = format!("{addr}: no answer within {:?}", left.min(ATTEMPT_TIMEOUT));
                    self.set_leader(None);
                    self.forget(&addr).await;
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            tokio::time::sleep(backoff.min(left)).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Resolves when another server reports a leader at an address other
    /// than `addr`; pends forever otherwise. Starts after [`LEADER_PROBE_AFTER`].
    async fn probe_leader_elsewhere(&self, addr: &str) -> String {
        tokio::time::sleep(LEADER_PROBE_AFTER).await;
        loop {
            for other in self.inner.servers.iter().filter(|s| s.as_str() != addr) {
                let req = Envelope { version: PROTOCOL_VERSION, request: Request::Admin(AdminOp::Status) };
                let probe = tokio::time::timeout(LEADER_PROBE_EVERY, self.attempt(other, &req)).await;
                if let Ok(Attempt::Done(Ok(Reply::Admin(AdminReply::Status(s))))) = probe {
                    let leader_addr =
                        s.leader_id.and_then(|l| s.members.iter().find(|m| m.id == l)).map(|m| m.addr.clone());
                    if let Some(l) = leader_addr {
                        if l != addr {
                            return l;
                        }
                    }
                }
            }
            tokio::time::sleep(LEADER_PROBE_EVERY).await;
        }
    }

    async fn forget(&self, addr: &str) {
        self.inner.conns.lock().await.remove(addr);
    }

    async fn connection(&self, addr: &str) -> Result<quinn::Connection, String> {
        // Never hold the cache lock while dialing: a dead server must not
        // delay requests to the live ones.
        if let Some(c) = self.inner.conns.lock().await.get(addr) {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        let sock: SocketAddr = match addr.parse() {
            Ok(s) => s,
            Err(_) => tokio::net::lookup_host(addr)
                .await
                .map_err(|e| format!("resolve: {e}"))?
                .next()
                .ok_or_else(|| "resolve: no address".to_string())?,
        };
        let connecting = self
            .inner
            .endpoint
            .connect_with(self.inner.quic.clone(), sock, tls::SERVER_NAME)
            .map_err(|e| e.to_string())?;
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| "connect: timed out".to_string())?
            .map_err(|e| format!("connect: {e}"))?;
        self.inner.conns.lock().await.insert(addr.to_string(), conn.clone());
        Ok(conn)
    }

    async fn attempt(&self, addr: &str, env: &Envelope) -> Attempt {
        let conn = match self.connection(addr).await {
            Ok(c) => c,
            Err(e) => return Attempt::Failed(e),
        };
        let (mut send, mut recv) = match conn.open_bi().await {
            Ok(s) => s,
            Err(e) => return Attempt::Failed(format!("open stream: {e}")),
        };
        if let Err(e) = frame::write_frame(&mut send, env).await {
            return Attempt::Failed(e.to_string());
        }
        let _ = send.finish();
        match frame::read_frame::<Response>(&mut recv).await {
            Ok(r) => Attempt::Done(r),
            Err(e) => Attempt::Failed(e.to_string()),
        }
    }

    /// Opens a change stream at `from` on any reachable server.
    pub async fn subscribe(&self, from: u64) -> Result<ChangeStream, ClientError> {
        let env = Envelope { version: PROTOCOL_VERSION, request: Request::Subscribe { from } };
        let mut last = String::new();
        let servers = self.inner.servers.clone();
        for addr in servers.iter().cycle().take(servers.len() * 2) {
            let conn = match self.connection(addr).await {
                Ok(c) => c,
                Err(e) => {
                    last = e;
                    continue;
                }
            };
            // Bounded like any request: a server at its stream limit, or one
            // that stopped reading, must not hold the subscriber forever.
            let open = async {
                let (mut send, recv) = conn.open_bi().await.map_err(|e| format!("open stream: {e}"))?;
                frame::write_frame(&mut send, &env).await.map_err(|e| e.to_string())?;
                let _ = send.finish();
                Ok::<_, String>(ChangeStream { recv, _send: send })
            };
            match tokio::time::timeout(ATTEMPT_TIMEOUT, open).await {
                Ok(Ok(stream)) => return Ok(stream),
                Ok(Err(e)) => last = format!("{addr}: {e}"),
                Err(_) => last = format!("{addr}: no answer within {ATTEMPT_TIMEOUT:?}"),
            }
            self.forget(addr).await;
        }
        Err(ClientError::Unavailable { timeout: CONNECT_TIMEOUT, last })
    }

    // ----- conveniences over `op` and `read`

    pub async fn lookup(&self, parent: Ino, name: &[u8]) -> Result<Attr, ClientError> {
        expect_attr(self.read(MetaRead::Lookup { parent, name: name.to_vec() }).await?)
    }

    pub async fn getattr(&self, ino: Ino) -> Result<Attr, ClientError> {
        expect_attr(self.read(MetaRead::GetAttr { ino }).await?)
    }

    /// Resolves an absolute path; `follow` follows a symlink in the last component.
    pub async fn resolve(&self, path: &[u8], follow: bool) -> Result<Attr, ClientError> {
        expect_attr(self.read(MetaRead::Resolve { path: path.to_vec(), follow }).await?)
    }

    /// Every entry of a directory, page by page.
    pub async fn readdir_all(&self, ino: Ino) -> Result<Vec<DirEntry>, ClientError> {
        let mut out = Vec::new();
        let mut after = None;
        loop {
            match self.read(MetaRead::ReadDir { ino, after: after.clone(), limit: MAX_READDIR_PAGE }).await? {
                ReadReply::Entries { entries, more } => {
                    after = entries.last().map(|e| e.name.clone());
                    out.extend(entries);
                    if !more || after.is_none() {
                        return Ok(out);
                    }
                }
                other => return Err(ClientError::Protocol(format!("unexpected reply {other:?}"))),
            }
        }
    }

    pub async fn op_attr(&self, op: MetaOp) -> Result<Attr, ClientError> {
        match self.op(op).await? {
            OpReply::Attr(a) => Ok(a),
            other => Err(ClientError::Protocol(format!("expected attributes, got {other:?}"))),
        }
    }
}

fn expect_attr(r: ReadReply) -> Result<Attr, ClientError> {
    match r {
        ReadReply::Attr(a) => Ok(a),
        other => Err(ClientError::Protocol(format!("expected attributes, got {other:?}"))),
    }
}

/// A change stream from one server. On error, resubscribe from the index
/// after the last one received.
pub struct ChangeStream {
    recv: quinn::RecvStream,
    _send: quinn::SendStream,
}

impl ChangeStream {
    /// The next item; `Ok(None)` when the server ended the stream.
    pub async fn next(&mut self) -> Result<Option<StreamItem>, ClientError> {
        match frame::read_frame::<StreamItem>(&mut self.recv).await {
            Ok(item) => Ok(Some(item)),
            Err(FrameError::Closed) => Ok(None),
            Err(e) => Err(ClientError::Protocol(e.to_string())),
        }
    }
}
