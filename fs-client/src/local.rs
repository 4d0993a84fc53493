//! Local chunk sockets: reads and writes that skip the network when a
//! replica is on this host.
//!
//! Besides QUIC, a chunk server listens on a Unix socket,
//! `chunk-<cluster>-<address>.sock` in its local directory (default
//! [`DEFAULT_LOCAL_DIR`]). A client on the same host that looks in the same
//! directory sends its reads of that server's replicas, and its writes whose
//! chain starts there, through the socket instead: no encryption, no
//! datagrams, one copy each way. The server does exactly what it does for
//! the same request over QUIC (version checks, every block's checksum,
//! fencing, passing a write on down its chain over QUIC); only the first
//! hop's transport differs. This is HDFS's short-circuit read, in the form
//! that keeps every check on the server, and what placing a VM next to its
//! data pays off with.
//!
//! On a connection the client sends one request (and a write's bytes) at a
//! time. Every answer starts with a tag byte: [`TAG_ALIVE`], sent each
//! second while the server works on a request, or [`TAG_REPLY`], followed
//! by the reply frame (and a read's bytes). A server silent for
//! [`SILENCE`] is taken for dead or stopped, as QUIC takes a peer silent
//! past its idle timeout.
//!
//! What the caller does ([`Local`]): no usable socket (none, refused, a
//! hello naming another address or another cluster) sends the request
//! over QUIC; a server that
//! went silent or broke the connection mid-request is a transport failure
//! of that server; the server's errors (stale, corrupt, not found) are
//! answers.
//!
//! Only root and the server's own user may connect: the socket is mode 0600
//! and the server checks the peer's credentials.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;

use crate::frame;
use crate::proto::{ChunkReply, ChunkRequest, ChunkResponse, LocalHello, WireError};

/// Where chunk servers put their local sockets unless configured otherwise.
pub const DEFAULT_LOCAL_DIR: &str = "/run/locus";
/// Sent by the server each [`ALIVE_EVERY`] while it works on a request.
pub const TAG_ALIVE: u8 = 0;
/// The reply frame follows.
pub const TAG_REPLY: u8 = 1;
pub const ALIVE_EVERY: Duration = Duration::from_secs(1);
/// A server this long without a byte is dead or stopped: as long as QUIC
/// waits for a silent peer.
pub const SILENCE: Duration = crate::tls::IDLE_TIMEOUT;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long one request may take, however busy the server says it is
/// (as long as a request over QUIC may take).
pub const CALL_TIMEOUT: Duration = crate::chunk::CHUNK_IO_TIMEOUT;
/// Idle connections kept per server.
const MAX_IDLE_PER_SERVER: usize = 32;
/// A pooled connection idle this long is closed, not reused: the server
/// closes connections idle for [`SERVER_IDLE`].
const POOL_IDLE: Duration = Duration::from_secs(20);
/// How long a server keeps a connection that sends nothing.
pub const SERVER_IDLE: Duration = Duration::from_secs(60);
/// How long a server without a usable socket is not tried again.
const RETRY_AFTER: Duration = Duration::from_secs(2);
/// A write's bytes are read by the server in pieces of at most this, each
/// passed on down the chain as it comes.
pub const WRITE_PIECE: usize = 256 << 10;

/// The socket of the chunk server of cluster `cluster` (its
/// [`crate::tls::cluster_fingerprint`]) advertising `addr`, in `dir`. The
/// cluster is in the name: two clusters in two network namespaces may both
/// have a server at 127.0.0.1:7111 and share the directory.
pub fn socket_path(dir: &Path, cluster: &[u8; 32], addr: &str) -> PathBuf {
    let name: String =
        addr.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '_' }).collect();
    let tag: String = cluster[..8].iter().map(|b| format!("{b:02x}")).collect();
    dir.join(format!("chunk-{tag}-{name}.sock"))
}

/// How a request through a local socket went.
#[derive(Debug)]
pub enum Local<T> {
    /// No usable socket for that server: send the request over QUIC.
    NotLocal,
    /// The server answered.
    Answer(Result<T, WireError>),
    /// The connection broke mid-request, or (`silent`) the server said
    /// nothing for [`SILENCE`] or did not finish in [`CALL_TIMEOUT`].
    Broken { why: String, silent: bool },
}

impl<T> Local<T> {
    /// The answer, if there is one, turned by `f`.
    fn map<U>(self, f: impl FnOnce(T) -> U) -> Local<U> {
        match self {
            Local::NotLocal => Local::NotLocal,
            Local::Answer(a) => Local::Answer(a.map(f)),
            Local::Broken { why, silent } => Local::Broken { why, silent },
        }
    }
}

/// Connections to the chunk servers on this host.
pub struct LocalSockets {
    dir: PathBuf,
    /// This client's cluster: a server of another is not used.
    cluster: [u8; 32],
    /// [`SILENCE`], shorter in tests.
    silence: Duration,
    /// [`CALL_TIMEOUT`], shorter in tests.
    deadline: Duration,
    idle: Mutex<HashMap<String, Vec<(UnixStream, Instant)>>>,
    /// Servers not to try before the given time.
    skip: Mutex<HashMap<String, Instant>>,
    reads: AtomicU64,
    writes: AtomicU64,
}

/// What broke on a connection.
type Transport = String;

/// How a request on a connection failed.
struct Failure {
    why: Transport,
    /// The server said nothing for too long (rather than closing or
    /// garbling the connection).
    silent: bool,
}

impl Failure {
    fn broken(why: impl ToString) -> Self {
        Failure { why: why.to_string(), silent: false }
    }
}

impl LocalSockets {
    pub fn new(dir: PathBuf, cluster: [u8; 32]) -> Self {
        LocalSockets {
            dir,
            cluster,
            silence: SILENCE,
            deadline: CALL_TIMEOUT,
            idle: Mutex::default(),
            skip: Mutex::default(),
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
        }
    }

    /// Reads answered through local sockets so far.
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// Writes answered through local sockets so far.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Whether `addr` looks like a server on this host (its socket exists).
    pub fn is_local(&self, addr: &str) -> bool {
        !self.skipped(addr) && socket_path(&self.dir, &self.cluster, addr).exists()
    }

    fn skipped(&self, addr: &str) -> bool {
        let skip = self.skip.lock().unwrap_or_else(|p| p.into_inner());
        skip.get(addr).is_some_and(|until| Instant::now() < *until)
    }

    fn avoid(&self, addr: &str, why: &str) {
        tracing::debug!(addr, why, "local chunk socket not used for a while");
        let mut skip = self.skip.lock().unwrap_or_else(|p| p.into_inner());
        skip.insert(addr.to_string(), Instant::now() + RETRY_AFTER);
    }

    /// A `Read` through `addr`'s local socket.
    pub async fn read(&self, addr: &str, req: &ChunkRequest) -> Local<Bytes> {
        let ChunkRequest::Read { len, .. } = req else {
            return Local::Answer(Err(WireError::new(crate::proto::ErrorCode::BadRequest, "not a read")));
        };
        let got = self.call(addr, req, &[], Some(*len)).await;
        if matches!(got, Local::Answer(Ok(_))) {
            self.reads.fetch_add(1, Ordering::Relaxed);
        }
        got.map(|(_, data)| data)
    }

    /// A chained `Write` or `WriteV` (`data` its bytes) whose chain starts
    /// at `addr`: the reply.
    pub async fn write(&self, addr: &str, req: &ChunkRequest, data: &[Bytes]) -> Local<ChunkReply> {
        // Bytes beyond what the request says would be read as the next
        // request on this connection.
        let owed = req.bytes_following();
        let have: u64 = data.iter().map(|d| d.len() as u64).sum();
        if owed != Some(have) {
            let why = format!("{have} bytes for a request that carries {owed:?}");
            return Local::Answer(Err(WireError::new(crate::proto::ErrorCode::BadRequest, why)));
        }
        let got = self.call(addr, req, data, None).await;
        if matches!(got, Local::Answer(Ok(_))) {
            self.writes.fetch_add(1, Ordering::Relaxed);
        }
        got.map(|(reply, _)| reply)
    }

    /// Sends `req` and `data`; the reply, and `expect` bytes after it if
    /// the reply is `Data`.
    async fn call(
        &self,
        addr: &str,
        req: &ChunkRequest,
        data: &[Bytes],
        expect: Option<u64>,
    ) -> Local<(ChunkReply, Bytes)> {
        if self.skipped(addr) {
            return Local::NotLocal;
        }
        // A pooled connection the server has closed fails at once: then one
        // fresh connection is tried.
        for fresh in [false, true] {
            let conn = if fresh { self.connect(addr).await } else { self.pooled(addr).ok_or_else(String::new) };
            let mut conn = match conn {
                Ok(c) => c,
                Err(_) if !fresh => continue,
                Err(why) => {
                    self.avoid(addr, &why);
                    return Local::NotLocal;
                }
            };
            let call = exchange(&mut conn, req, data, expect, self.silence);
            let done = tokio::time::timeout(self.deadline, call)
                .await
                .unwrap_or_else(|_| Err(Failure { why: format!("no answer in {:?}", self.deadline), silent: true }));
            match done {
                Ok(answer) => {
                    // A refused write's bytes were read by the server too:
                    // the connection is in step either way.
                    self.give_back(addr, conn);
                    return Local::Answer(answer);
                }
                // Closed while pooled (the server's idle limit, a restart):
                // a fresh connection decides. A silent server is not
                // waited for twice.
                Err(f) if !fresh && !f.silent => tracing::debug!(addr, why = f.why, "pooled local connection failed"),
                Err(f) => {
                    self.avoid(addr, &f.why);
                    return Local::Broken { why: f.why, silent: f.silent };
                }
            }
        }
        Local::NotLocal
    }

    fn pooled(&self, addr: &str) -> Option<UnixStream> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let conns = idle.get_mut(addr)?;
        while let Some((c, since)) = conns.pop() {
            if since.elapsed() < POOL_IDLE {
                return Some(c);
            }
        }
        None
    }

    fn give_back(&self, addr: &str, conn: UnixStream) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let conns = idle.entry(addr.to_string()).or_default();
        if conns.len() < MAX_IDLE_PER_SERVER {
            conns.push((conn, Instant::now()));
        }
    }

    async fn connect(&self, addr: &str) -> Result<UnixStream, Transport> {
        let path = socket_path(&self.dir, &self.cluster, addr);
        let hello = async {
            let mut s = UnixStream::connect(&path).await.map_err(|e| format!("{}: {e}", path.display()))?;
            // Only root or our own user may stand in for a server: anyone
            // else able to put a socket there could forge reads.
            let me = nix::unistd::geteuid().as_raw();
            match s.peer_cred() {
                Ok(c) if c.uid() == 0 || c.uid() == me => {}
                Ok(c) => return Err(format!("{} is served by user {}, not root or us", path.display(), c.uid())),
                Err(e) => return Err(format!("{}: peer credentials: {e}", path.display())),
            }
            let hello: LocalHello =
                frame::read_frame_io(&mut s).await.map_err(|e| format!("{}: hello: {e}", path.display()))?;
            Ok::<_, Transport>((s, hello))
        };
        let (s, hello) = tokio::time::timeout(CONNECT_TIMEOUT, hello)
            .await
            .map_err(|_| format!("{}: no hello in time", path.display()))??;
        if hello.addr != addr {
            return Err(format!("{} is server {} at {}, not {addr}", path.display(), hello.server, hello.addr));
        }
        if hello.cluster != self.cluster {
            return Err(format!("{} is server {} of another cluster", path.display(), hello.server));
        }
        Ok(s)
    }
}

/// One request on a connection: the server's answer (with a read's bytes),
/// or what broke. The server may stay silent at most `silence` at a time.
async fn exchange(
    conn: &mut UnixStream,
    req: &ChunkRequest,
    data: &[Bytes],
    expect: Option<u64>,
    silence: Duration,
) -> Result<Result<(ChunkReply, Bytes), WireError>, Failure> {
    let quiet = |what: &str| Failure { why: format!("the server was silent for {silence:?} ({what})"), silent: true };
    // The request goes out while the server's tags are read: a server
    // slow to take a write (its chain is stalled) still says it is alive.
    {
        let (mut rd, mut wr) = conn.split();
        let send = frame::write_frame_io(&mut wr, req, data);
        tokio::pin!(send);
        let mut sent = false;
        loop {
            tokio::select! {
                done = &mut send, if !sent => {
                    done.map_err(Failure::broken)?;
                    sent = true;
                }
                tag = tokio::time::timeout(silence, rd.read_u8()) => {
                    match tag.map_err(|_| quiet("working on the request"))?.map_err(Failure::broken)? {
                        TAG_ALIVE => {}
                        TAG_REPLY if sent => break,
                        TAG_REPLY => return Err(Failure::broken("a reply before the whole request was sent")),
                        other => return Err(Failure::broken(format!("unexpected tag {other}"))),
                    }
                }
            }
        }
    }
    let reply: ChunkResponse = tokio::time::timeout(silence, frame::read_frame_io(conn))
        .await
        .map_err(|_| quiet("in the reply"))?
        .map_err(Failure::broken)?;
    let reply = match reply {
        Err(e) => return Ok(Err(e)),
        Ok(r) => r,
    };
    let n = match (&reply, expect) {
        (ChunkReply::Data { len }, Some(want)) if *len == want => want,
        (_, None) => return Ok(Ok((reply, Bytes::new()))),
        (other, _) => return Err(Failure::broken(format!("unexpected reply {other:?}"))),
    };
    // Straight into the answer's memory, which is never zeroed first.
    let mut buf = BytesMut::with_capacity(n as usize);
    while (buf.len() as u64) < n {
        let want = n - buf.len() as u64;
        let got = tokio::time::timeout(silence, (&mut *conn).take(want).read_buf(&mut buf))
            .await
            .map_err(|_| quiet("in the data"))?
            .map_err(Failure::broken)?;
        if got == 0 {
            return Err(Failure::broken(format!("connection ended after {} of {n} bytes", buf.len())));
        }
    }
    Ok(Ok((reply, buf.freeze())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::io::AsyncWriteExt;
    use tokio::net::UnixListener;

    #[test]
    fn socket_names_carry_only_safe_characters() {
        let cluster = [0xab; 32];
        let p = socket_path(Path::new("/run/locus"), &cluster, "127.0.0.1:7101");
        assert_eq!(p, Path::new("/run/locus/chunk-abababababababab-127.0.0.1_7101.sock"));
        let p = socket_path(Path::new("/d"), &cluster, "[::1]:7101/../x");
        assert_eq!(p, Path::new("/d/chunk-abababababababab-___1__7101_.._x.sock"));
        assert_ne!(socket_path(Path::new("/d"), &[1; 32], "a"), socket_path(Path::new("/d"), &[2; 32], "a"));
    }

    const ADDR: &str = "127.0.0.1:7101";
    const CLUSTER: [u8; 32] = [3; 32];

    /// What a fake server does with a request: ticks to send first (one
    /// every 100 ms), then the reply and its data (`None`: silence).
    type Script = (u32, Option<(ChunkResponse, Vec<Bytes>)>);

    /// A server on `dir`'s socket for [`ADDR`] of [`CLUSTER`] that says it
    /// is `says` of cluster `of` and answers as `answer` scripts (reading a
    /// write's bytes first). Counts the connections it accepted.
    fn fake_server_of(
        dir: &Path,
        says: &str,
        of: [u8; 32],
        answer: impl Fn(ChunkRequest) -> Script + Send + Sync + 'static,
    ) -> Arc<AtomicU64> {
        let listener = UnixListener::bind(socket_path(dir, &CLUSTER, ADDR)).unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let (count, says, answer) = (accepted.clone(), says.to_string(), Arc::new(answer));
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::Relaxed);
                let (says, answer) = (says.clone(), answer.clone());
                tokio::spawn(async move {
                    let hello = LocalHello { addr: says, server: 7, cluster: of };
                    frame::write_frame_io(&mut s, &hello, &[]).await.unwrap();
                    while let Ok(req) = frame::read_frame_io::<ChunkRequest>(&mut s).await {
                        let owed = if let ChunkRequest::Write { len, .. } = req { len } else { 0 };
                        // Busy before taking a write's bytes, as a server
                        // whose chain is stalled.
                        let (ticks, reply) = answer(req);
                        for _ in 0..ticks {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            s.write_all(&[TAG_ALIVE]).await.unwrap();
                        }
                        let mut sink = vec![0u8; owed as usize];
                        s.read_exact(&mut sink).await.unwrap();
                        let Some((reply, data)) = reply else { return std::future::pending().await };
                        s.write_all(&[TAG_REPLY]).await.unwrap();
                        frame::write_frame_io(&mut s, &reply, &data).await.unwrap();
                    }
                });
            }
        });
        accepted
    }

    fn fake_server(
        dir: &Path,
        says: &str,
        answer: impl Fn(ChunkRequest) -> Script + Send + Sync + 'static,
    ) -> Arc<AtomicU64> {
        fake_server_of(dir, says, CLUSTER, answer)
    }

    /// A client that gives a server up after 300 ms of silence.
    fn impatient(dir: &Path) -> LocalSockets {
        let mut local = LocalSockets::new(dir.into(), CLUSTER);
        local.silence = Duration::from_millis(300);
        local
    }

    fn data_for(req: ChunkRequest) -> Script {
        match req {
            ChunkRequest::Read { offset, len, .. } => {
                let bytes: Vec<u8> = (offset..offset + len).map(|i| i as u8).collect();
                (0, Some((Ok(ChunkReply::Data { len }), vec![Bytes::from(bytes)])))
            }
            _ => (0, Some((Ok(ChunkReply::Done), vec![]))),
        }
    }

    fn read(offset: u64, len: u64) -> ChunkRequest {
        ChunkRequest::Read { chunk: 1, version: 1, offset, len }
    }

    fn answer<T: std::fmt::Debug>(got: Local<T>) -> Result<T, WireError> {
        match got {
            Local::Answer(a) => a,
            other => panic!("expected an answer, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn reads_and_writes_are_answered_over_one_reused_connection() {
        let dir = tempfile::tempdir().unwrap();
        let accepted = fake_server(dir.path(), ADDR, data_for);
        let local = LocalSockets::new(dir.path().into(), CLUSTER);
        assert!(local.is_local(ADDR));
        assert!(!local.is_local("127.0.0.1:7102"), "no socket, not local");
        for (off, len) in [(0u64, 3u64 << 20), (5, 4096), (1 << 20, 1)] {
            let got = answer(local.read(ADDR, &read(off, len)).await).expect("data");
            let want: Vec<u8> = (off..off + len).map(|i| i as u8).collect();
            assert_eq!(&got[..], &want[..]);
        }
        let write = ChunkRequest::Write {
            chunk: 1,
            version: 1,
            offset: 0,
            len: 2 << 20,
            chain: vec![],
            create: true,
            origin: None,
            sums: None,
        };
        let bytes = [Bytes::from(vec![7u8; 1 << 20]), Bytes::from(vec![8u8; 1 << 20])];
        assert_eq!(answer(local.write(ADDR, &write, &bytes).await).unwrap(), ChunkReply::Done);
        assert_eq!((local.reads(), local.writes()), (3, 1));
        assert_eq!(accepted.load(Ordering::Relaxed), 1, "the pooled connection is reused");
        assert!(matches!(local.read("127.0.0.1:7102", &read(0, 1)).await, Local::NotLocal));
    }

    fn write(len: u64) -> ChunkRequest {
        ChunkRequest::Write {
            chunk: 1,
            version: 1,
            offset: 0,
            len,
            chain: vec![],
            create: true,
            origin: None,
            sums: None,
        }
    }

    #[tokio::test]
    async fn a_write_not_carrying_its_length_is_refused_here() {
        let dir = tempfile::tempdir().unwrap();
        let accepted = fake_server(dir.path(), ADDR, data_for);
        let local = LocalSockets::new(dir.path().into(), CLUSTER);
        let e = answer(local.write(ADDR, &write(10), &[Bytes::from_static(b"short")]).await).unwrap_err();
        assert_eq!(e.code, crate::proto::ErrorCode::BadRequest);
        assert_eq!(accepted.load(Ordering::Relaxed), 0, "nothing sent");
    }

    #[tokio::test]
    async fn a_server_slow_to_take_a_write_is_waited_for_while_it_ticks_but_not_forever() {
        let dir = tempfile::tempdir().unwrap();
        // 1.5 s before it reads the bytes, saying it is alive.
        fake_server(dir.path(), ADDR, |req| (15, data_for(req).1));
        let local = impatient(dir.path());
        let bytes = [Bytes::from(vec![5u8; 1 << 20])];
        assert_eq!(answer(local.write(ADDR, &write(1 << 20), &bytes).await).unwrap(), ChunkReply::Done);

        let dir = tempfile::tempdir().unwrap();
        // Ticks for 3 s, then silence: the call's deadline ends it first.
        fake_server(dir.path(), ADDR, |_| (30, None));
        let mut local = impatient(dir.path());
        local.deadline = Duration::from_millis(700);
        let t = Instant::now();
        assert!(matches!(local.read(ADDR, &read(0, 10)).await, Local::Broken { silent: true, .. }));
        assert!(t.elapsed() < Duration::from_millis(1500), "waited {:?}", t.elapsed());
    }

    #[tokio::test]
    async fn server_errors_are_answers() {
        let dir = tempfile::tempdir().unwrap();
        let stale = || Some((Err(WireError::new(crate::proto::ErrorCode::Stale, "old")), vec![]));
        fake_server(dir.path(), ADDR, move |_| (0, stale()));
        let local = LocalSockets::new(dir.path().into(), CLUSTER);
        let e = answer(local.read(ADDR, &read(0, 10)).await).unwrap_err();
        assert_eq!(e.code, crate::proto::ErrorCode::Stale);
    }

    #[tokio::test]
    async fn a_socket_of_another_server_or_cluster_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let accepted = fake_server(dir.path(), "127.0.0.1:9999", data_for);
        let local = LocalSockets::new(dir.path().into(), CLUSTER);
        assert!(matches!(local.read(ADDR, &read(0, 10)).await, Local::NotLocal));
        assert_eq!(accepted.load(Ordering::Relaxed), 1);
        // Not tried again at once.
        assert!(!local.is_local(ADDR));
        assert!(matches!(local.read(ADDR, &read(0, 10)).await, Local::NotLocal));
        assert_eq!(accepted.load(Ordering::Relaxed), 1);

        // Another cluster's server at the same address: its socket has
        // another name, and one under our name that says it is of another
        // cluster is not used.
        let dir = tempfile::tempdir().unwrap();
        let accepted = fake_server(dir.path(), ADDR, data_for);
        let other = LocalSockets::new(dir.path().into(), [4; 32]);
        assert!(!other.is_local(ADDR));
        assert!(matches!(other.read(ADDR, &read(0, 10)).await, Local::NotLocal));
        assert_eq!(accepted.load(Ordering::Relaxed), 0);
        let dir = tempfile::tempdir().unwrap();
        let accepted = fake_server_of(dir.path(), ADDR, [4; 32], data_for);
        let local = LocalSockets::new(dir.path().into(), CLUSTER);
        assert!(matches!(local.read(ADDR, &read(0, 10)).await, Local::NotLocal));
        assert_eq!(accepted.load(Ordering::Relaxed), 1);
        assert_eq!(local.reads(), 0);
    }

    #[tokio::test]
    async fn a_busy_server_is_waited_for_and_a_silent_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        // Works for 600 ms, saying so every 100 ms; then answers.
        fake_server(dir.path(), ADDR, |req| (6, data_for(req).1));
        let local = impatient(dir.path());
        assert_eq!(answer(local.read(ADDR, &read(0, 10)).await).unwrap().len(), 10);

        let dir = tempfile::tempdir().unwrap();
        fake_server(dir.path(), ADDR, |_| (1, None));
        let local = impatient(dir.path());
        let t = Instant::now();
        assert!(matches!(local.read(ADDR, &read(0, 10)).await, Local::Broken { silent: true, .. }));
        assert!(t.elapsed() < Duration::from_secs(3));
        assert_eq!(local.reads(), 0);
        assert!(!local.is_local(ADDR), "not tried again for a while");

        // A server that answers once and then stops: the pooled connection
        // goes silent, and that is the answer (no second wait on a fresh one).
        let dir = tempfile::tempdir().unwrap();
        let asked = Arc::new(AtomicU64::new(0));
        let count = asked.clone();
        let accepted = fake_server(dir.path(), ADDR, move |req| {
            if count.fetch_add(1, Ordering::Relaxed) == 0 {
                data_for(req)
            } else {
                (0, None)
            }
        });
        let local = impatient(dir.path());
        assert_eq!(answer(local.read(ADDR, &read(0, 10)).await).unwrap().len(), 10);
        let t = Instant::now();
        assert!(matches!(local.read(ADDR, &read(0, 10)).await, Local::Broken { silent: true, .. }));
        assert!(t.elapsed() < Duration::from_millis(600), "waited {:?}", t.elapsed());
        assert_eq!(accepted.load(Ordering::Relaxed), 1);

        // A socket file whose server is gone: refused at once.
        let dir = tempfile::tempdir().unwrap();
        drop(std::os::unix::net::UnixListener::bind(socket_path(dir.path(), &CLUSTER, ADDR)).unwrap());
        let local = LocalSockets::new(dir.path().into(), CLUSTER);
        assert!(local.is_local(ADDR));
        assert!(matches!(local.read(ADDR, &read(0, 10)).await, Local::NotLocal));
        assert!(!local.is_local(ADDR), "refused: not tried again for a while");
    }
}
