//! Local chunk sockets: reads that skip the network when a replica is on
//! this host.
//!
//! Besides QUIC, a chunk server listens on a Unix socket,
//! `chunk-<address>.sock` in its local directory (default
//! [`DEFAULT_LOCAL_DIR`]). A client on the same host that looks in the same
//! directory reads through it instead: no encryption, no datagrams, one copy
//! each way. The server does exactly what it does for a QUIC read (version
//! check, every block's checksum, fencing); only the transport differs. This
//! is HDFS's short-circuit read, and what placing a VM next to its data
//! pays off with.
//!
//! Only reads go this way; writes go along the chain over QUIC. Trouble with
//! the transport (no socket, a refused or broken connection, a server that
//! does not answer within [`LOCAL_READ_TIMEOUT`]) makes the caller read over
//! QUIC instead. A server's errors (stale, corrupt, not found) are answers,
//! as over QUIC.
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
use crate::proto::{ChunkId, ChunkReply, ChunkRequest, ChunkResponse, LocalHello, WireError};

/// Where chunk servers put their local sockets unless configured otherwise.
pub const DEFAULT_LOCAL_DIR: &str = "/run/locus";
/// A local read not answered in this long goes over QUIC instead (as long
/// as QUIC waits for a silent peer).
pub const LOCAL_READ_TIMEOUT: Duration = crate::tls::IDLE_TIMEOUT;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Idle connections kept per server.
const MAX_IDLE_PER_SERVER: usize = 32;
/// A pooled connection idle this long is closed, not reused: the server
/// closes connections idle for [`SERVER_IDLE`].
const POOL_IDLE: Duration = Duration::from_secs(20);
/// How long a server keeps a connection that sends nothing.
pub const SERVER_IDLE: Duration = Duration::from_secs(60);
/// How long a server without a usable socket is not tried again.
const RETRY_AFTER: Duration = Duration::from_secs(2);

/// The socket of the chunk server advertising `addr`, in `dir`.
pub fn socket_path(dir: &Path, addr: &str) -> PathBuf {
    let name: String =
        addr.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '_' }).collect();
    dir.join(format!("chunk-{name}.sock"))
}

/// Connections to the chunk servers on this host.
pub struct LocalReads {
    dir: PathBuf,
    /// [`LOCAL_READ_TIMEOUT`], shorter in tests.
    timeout: Duration,
    idle: Mutex<HashMap<String, Vec<(UnixStream, Instant)>>>,
    /// Servers not to try before the given time.
    skip: Mutex<HashMap<String, Instant>>,
    served: AtomicU64,
}

/// Why a read did not go through the local socket.
type Transport = String;

impl LocalReads {
    pub fn new(dir: PathBuf) -> Self {
        LocalReads {
            dir,
            timeout: LOCAL_READ_TIMEOUT,
            idle: Mutex::default(),
            skip: Mutex::default(),
            served: AtomicU64::new(0),
        }
    }

    /// Reads answered through local sockets so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Whether `addr` looks like a server on this host (its socket exists).
    pub fn is_local(&self, addr: &str) -> bool {
        !self.skipped(addr) && socket_path(&self.dir, addr).exists()
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

    /// Reads through `addr`'s local socket: `None` if that cannot be done
    /// (read over QUIC instead), else the server's answer.
    pub async fn read(
        &self,
        addr: &str,
        chunk: ChunkId,
        version: u64,
        offset: u64,
        len: u64,
    ) -> Option<Result<Bytes, WireError>> {
        if self.skipped(addr) {
            return None;
        }
        let req = ChunkRequest::Read { chunk, version, offset, len };
        // A pooled connection the server has closed fails at once: then one
        // fresh connection is tried.
        for fresh in [false, true] {
            let conn = if fresh { self.connect(addr).await } else { self.pooled(addr).ok_or_else(String::new) };
            let mut conn = match conn {
                Ok(c) => c,
                Err(_) if !fresh => continue,
                Err(why) => {
                    self.avoid(addr, &why);
                    return None;
                }
            };
            match tokio::time::timeout(self.timeout, exchange(&mut conn, &req, len)).await {
                Ok(Ok(answer)) => {
                    self.give_back(addr, conn);
                    self.served.fetch_add(1, Ordering::Relaxed);
                    return Some(answer);
                }
                Ok(Err(why)) if !fresh => tracing::debug!(addr, why, "pooled local connection failed"),
                Ok(Err(why)) => {
                    self.avoid(addr, &why);
                    return None;
                }
                Err(_) => {
                    self.avoid(addr, "no answer in time");
                    return None;
                }
            }
        }
        None
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
        let path = socket_path(&self.dir, addr);
        let hello = async {
            let mut s = UnixStream::connect(&path).await.map_err(|e| format!("{}: {e}", path.display()))?;
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
        Ok(s)
    }
}

/// One read on a connection: the server's answer, or what broke.
async fn exchange(conn: &mut UnixStream, req: &ChunkRequest, len: u64) -> Result<Result<Bytes, WireError>, Transport> {
    frame::write_frame_io(conn, req, &[]).await.map_err(|e| e.to_string())?;
    let reply: ChunkResponse = frame::read_frame_io(conn).await.map_err(|e| e.to_string())?;
    let n = match reply {
        Err(e) => return Ok(Err(e)),
        Ok(ChunkReply::Data { len: n }) if n == len => n,
        Ok(other) => return Err(format!("unexpected reply {other:?}")),
    };
    // Straight into the answer's memory, which is never zeroed first.
    let mut buf = BytesMut::with_capacity(n as usize);
    while (buf.len() as u64) < n {
        let want = n - buf.len() as u64;
        let got = (&mut *conn).take(want).read_buf(&mut buf).await.map_err(|e| e.to_string())?;
        if got == 0 {
            return Err(format!("connection ended after {} of {n} bytes", buf.len()));
        }
    }
    Ok(Ok(buf.freeze()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    #[test]
    fn socket_names_carry_only_safe_characters() {
        let p = socket_path(Path::new("/run/locus"), "127.0.0.1:7101");
        assert_eq!(p, Path::new("/run/locus/chunk-127.0.0.1_7101.sock"));
        let p = socket_path(Path::new("/d"), "[::1]:7101/../x");
        assert_eq!(p, Path::new("/d/chunk-___1__7101_.._x.sock"));
    }

    const ADDR: &str = "127.0.0.1:7101";

    /// A server on `dir`'s socket for [`ADDR`] that says it is `says`,
    /// then answers each request with what `answer` gives (`None`: stays
    /// silent). Counts the connections it accepted.
    fn fake_server(
        dir: &Path,
        says: &str,
        answer: impl Fn(ChunkRequest) -> Option<(ChunkResponse, Vec<Bytes>)> + Send + Sync + 'static,
    ) -> Arc<AtomicU64> {
        let listener = UnixListener::bind(socket_path(dir, ADDR)).unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let (count, says, answer) = (accepted.clone(), says.to_string(), Arc::new(answer));
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::Relaxed);
                let (says, answer) = (says.clone(), answer.clone());
                tokio::spawn(async move {
                    let hello = LocalHello { addr: says, server: 7 };
                    frame::write_frame_io(&mut s, &hello, &[]).await.unwrap();
                    while let Ok(req) = frame::read_frame_io::<ChunkRequest>(&mut s).await {
                        match answer(req) {
                            Some((reply, data)) => frame::write_frame_io(&mut s, &reply, &data).await.unwrap(),
                            None => std::future::pending().await,
                        }
                    }
                });
            }
        });
        accepted
    }

    fn data_for(req: ChunkRequest) -> Option<(ChunkResponse, Vec<Bytes>)> {
        let ChunkRequest::Read { offset, len, .. } = req else { panic!("only reads expected") };
        let bytes: Vec<u8> = (offset..offset + len).map(|i| i as u8).collect();
        Some((Ok(ChunkReply::Data { len }), vec![Bytes::from(bytes)]))
    }

    use std::sync::Arc;

    #[tokio::test]
    async fn reads_come_back_whole_over_one_reused_connection() {
        let dir = tempfile::tempdir().unwrap();
        let accepted = fake_server(dir.path(), ADDR, data_for);
        let local = LocalReads::new(dir.path().into());
        assert!(local.is_local(ADDR));
        assert!(!local.is_local("127.0.0.1:7102"), "no socket, not local");
        for (off, len) in [(0u64, 3u64 << 20), (5, 4096), (1 << 20, 1)] {
            let got = local.read(ADDR, 1, 1, off, len).await.expect("served locally").expect("data");
            let want: Vec<u8> = (off..off + len).map(|i| i as u8).collect();
            assert_eq!(&got[..], &want[..]);
        }
        assert_eq!(local.served(), 3);
        assert_eq!(accepted.load(Ordering::Relaxed), 1, "the pooled connection is reused");
        assert!(local.read("127.0.0.1:7102", 1, 1, 0, 1).await.is_none(), "no socket: read over QUIC");
    }

    #[tokio::test]
    async fn server_errors_are_answers() {
        let dir = tempfile::tempdir().unwrap();
        fake_server(dir.path(), ADDR, |_| Some((Err(WireError::new(crate::proto::ErrorCode::Stale, "old")), vec![])));
        let local = LocalReads::new(dir.path().into());
        let e = local.read(ADDR, 1, 1, 0, 10).await.expect("answered").unwrap_err();
        assert_eq!(e.code, crate::proto::ErrorCode::Stale);
    }

    #[tokio::test]
    async fn a_socket_of_another_server_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let accepted = fake_server(dir.path(), "127.0.0.1:9999", data_for);
        let local = LocalReads::new(dir.path().into());
        assert!(local.read(ADDR, 1, 1, 0, 10).await.is_none());
        assert_eq!(accepted.load(Ordering::Relaxed), 1);
        // Not tried again at once.
        assert!(!local.is_local(ADDR));
        assert!(local.read(ADDR, 1, 1, 0, 10).await.is_none());
        assert_eq!(accepted.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_silent_server_or_a_dead_one_sends_the_read_elsewhere_in_time() {
        let dir = tempfile::tempdir().unwrap();
        fake_server(dir.path(), ADDR, |_| None);
        let mut local = LocalReads::new(dir.path().into());
        local.timeout = Duration::from_millis(300);
        let t = Instant::now();
        assert!(local.read(ADDR, 1, 1, 0, 10).await.is_none());
        assert!(t.elapsed() < Duration::from_secs(3));
        assert_eq!(local.served(), 0);

        // A socket file whose server is gone: refused at once.
        let dir = tempfile::tempdir().unwrap();
        drop(std::os::unix::net::UnixListener::bind(socket_path(dir.path(), ADDR)).unwrap());
        let local = LocalReads::new(dir.path().into());
        assert!(local.is_local(ADDR));
        assert!(local.read(ADDR, 1, 1, 0, 10).await.is_none());
        assert!(!local.is_local(ADDR), "refused: not tried again for a while");
    }
}
