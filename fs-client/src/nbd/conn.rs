//! One client connection: the handshake, then transmission with requests
//! served concurrently.
//!
//! Transmission has three parts: the reader (this task) reads request
//! headers and write payloads in order and decides about each
//! ([`super::request::decide`]); each accepted request runs as its own
//! task against the backend; one writer task sends the replies in the
//! order they finish. Up to [`MAX_IN_FLIGHT`] requests and
//! [`MAX_IN_FLIGHT_BYTES`] of payload are in flight per connection: the
//! reader waits for room before it reads more.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::backend::Backend;
use super::handshake::{ExportInfo, Negotiated, Negotiation, Step};
use super::request::{clip_extents, decide, Command, Decision};
use super::wire::*;

/// The whole handshake must finish within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Options one connection may send.
pub const MAX_OPTIONS: usize = 64;
/// Largest option data accepted; a bigger option closes the connection.
pub const MAX_OPTION_BYTES: u32 = 64 << 10;
/// Requests served at once per connection.
pub const MAX_IN_FLIGHT: usize = 64;
/// Read and write payload bytes in flight per connection (two largest requests).
pub const MAX_IN_FLIGHT_BYTES: usize = 64 << 20;
/// A write payload must arrive within this once its header has.
pub const PAYLOAD_TIMEOUT: Duration = Duration::from_secs(60);
/// A reply must be taken by the client within this.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(60);
const IO_BUFFER_BYTES: usize = 256 << 10;

/// Why a connection ended other than by the client's choice.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("handshake not finished in time")]
    HandshakeTimeout,
    #[error("client flags {0:#x} not understood")]
    ClientFlags(u32),
    #[error("bad magic in {0}")]
    BadMagic(&'static str),
    #[error("more than {MAX_OPTIONS} options")]
    TooManyOptions,
    #[error("option of {0} bytes exceeds the {MAX_OPTION_BYTES}-byte limit")]
    OptionTooLarge(u32),
    #[error("{0}")]
    Refused(String),
    #[error("client stalled for {0:?}")]
    Stalled(Duration),
}

/// A reply ready to send, with the room it holds until it is sent.
struct Reply {
    bufs: Vec<Bytes>,
    _slot: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

/// Serves one connection until the client leaves, a protocol violation,
/// or `shutdown` turns true (requests in flight are answered first).
pub async fn serve<S, B>(
    stream: S,
    export: Arc<ExportInfo>,
    backend: Arc<B>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), ConnError>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
    B: Backend,
{
    serve_with(stream, export, backend, shutdown, HANDSHAKE_TIMEOUT).await
}

async fn serve_with<S, B>(
    stream: S,
    export: Arc<ExportInfo>,
    backend: Arc<B>,
    mut shutdown: watch::Receiver<bool>,
    handshake_timeout: Duration,
) -> Result<(), ConnError>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
    B: Backend,
{
    let (r, w) = tokio::io::split(stream);
    let mut r = BufReader::with_capacity(IO_BUFFER_BYTES, r);
    let mut w = BufWriter::with_capacity(IO_BUFFER_BYTES, w);
    let negotiated = tokio::select! {
        res = tokio::time::timeout(handshake_timeout, handshake(&mut r, &mut w, &export)) => {
            res.map_err(|_| ConnError::HandshakeTimeout)??
        }
        _ = shutdown.wait_for(|s| *s) => return Ok(()),
    };
    let Some(neg) = negotiated else { return Ok(()) };
    transmission(r, w, neg, export, backend, shutdown).await
}

/// Option haggling; `None` when the client aborted or asked for an export
/// we do not have.
async fn handshake<R, W>(r: &mut R, w: &mut W, export: &ExportInfo) -> Result<Option<Negotiated>, ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    w.write_all(&greeting()).await?;
    w.flush().await?;
    let mut raw = [0u8; 4];
    r.read_exact(&mut raw).await?;
    let client = parse_client_flags(raw).ok_or(ConnError::ClientFlags(u32::from_be_bytes(raw)))?;
    let mut neg = Negotiation::new(export, client);
    let mut out = Vec::new();
    for _ in 0..MAX_OPTIONS {
        let mut raw = [0u8; 16];
        r.read_exact(&mut raw).await?;
        let h = parse_option_header(raw).ok_or(ConnError::BadMagic("option"))?;
        if h.len > MAX_OPTION_BYTES {
            return Err(ConnError::OptionTooLarge(h.len));
        }
        let mut data = vec![0u8; h.len as usize];
        r.read_exact(&mut data).await?;
        out.clear();
        let step = neg.option(h.option, &data, &mut out);
        w.write_all(&out).await?;
        w.flush().await?;
        match step {
            Step::Continue => {}
            Step::Close => return Ok(None),
            Step::Transmit(n) => return Ok(Some(n)),
        }
    }
    Err(ConnError::TooManyOptions)
}

async fn transmission<R, W, B>(
    mut r: BufReader<R>,
    w: BufWriter<W>,
    neg: Negotiated,
    export: Arc<ExportInfo>,
    backend: Arc<B>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
    B: Backend,
{
    let (tx, rx) = mpsc::channel::<Reply>(MAX_IN_FLIGHT);
    let writer = tokio::spawn(write_replies(w, rx));
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let budget = Arc::new(Semaphore::new(MAX_IN_FLIGHT_BYTES));
    let mut tasks = JoinSet::new();
    let result: Result<(), ConnError> = loop {
        while tasks.try_join_next().is_some() {}
        let mut raw = [0u8; REQUEST_BYTES];
        let read = tokio::select! {
            r = r.read_exact(&mut raw) => r,
            _ = shutdown.wait_for(|s| *s) => break Ok(()),
            // The writer is gone: the client stopped taking replies.
            _ = tx.closed() => break Ok(()),
        };
        match read {
            Ok(_) => {}
            // The client went away without NBD_CMD_DISC.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e.into()),
        }
        let Some(req) = parse_request(&raw) else { break Err(ConnError::BadMagic("request")) };
        let (cmd, payload_len) = match decide(&req, export.size, export.read_only, &neg) {
            Decision::Disconnect => break Ok(()),
            Decision::Close(why) => break Err(ConnError::Refused(why)),
            Decision::Refuse { error, message, drain } => {
                tracing::debug!(cookie = req.cookie, kind = req.kind, error, %message, "request refused");
                if drain > 0 {
                    if let Err(e) = drain_payload(&mut r, drain).await {
                        break Err(e);
                    }
                }
                let Ok(slot) = slots.clone().acquire_owned().await else { break Ok(()) };
                let bufs = error_reply(neg.structured, req.cookie, error, &message);
                if tx.send(Reply { bufs, _slot: slot, _bytes: None }).await.is_err() {
                    break Ok(());
                }
                continue;
            }
            Decision::Serve(cmd) => match cmd {
                Command::Write { len, .. } => (cmd, len),
                _ => (cmd, 0),
            },
        };
        let Ok(slot) = slots.clone().acquire_owned().await else { break Ok(()) };
        // A read the backend has at hand (a cache hit) is answered here:
        // no task, and the reply follows the ones before it.
        if let Command::Read { offset, len, df } = cmd {
            if let Some(data) = (len > 0).then(|| backend.read_now(offset, len)).flatten() {
                let bufs = read_reply(req.cookie, offset, data, len, df, &neg);
                if tx.send(Reply { bufs, _slot: slot, _bytes: None }).await.is_err() {
                    break Ok(());
                }
                continue;
            }
        }
        let held = match cmd {
            Command::Read { len, .. } | Command::Write { len, .. } if len > 0 => {
                let Ok(p) = budget.clone().acquire_many_owned(len).await else { break Ok(()) };
                Some(p)
            }
            _ => None,
        };
        let payload = if payload_len > 0 {
            let mut buf = BytesMut::zeroed(payload_len as usize);
            match tokio::time::timeout(PAYLOAD_TIMEOUT, r.read_exact(&mut buf)).await {
                Ok(Ok(_)) => buf.freeze(),
                Ok(Err(e)) => break Err(e.into()),
                Err(_) => break Err(ConnError::Stalled(PAYLOAD_TIMEOUT)),
            }
        } else {
            Bytes::new()
        };
        let (backend, tx) = (backend.clone(), tx.clone());
        tasks.spawn(async move {
            // Boxed: a task's future is copied several times on its way into
            // the runtime, and `execute`'s (every backend call inside) is
            // large; spawning a small one that boxes it costs one copy.
            let bufs = Box::pin(execute(&*backend, cmd, payload, req.cookie, &neg)).await;
            // A send error means the connection is going away; nothing to tell.
            let _ = tx.send(Reply { bufs, _slot: slot, _bytes: held }).await;
        });
    };
    // Answer what is in flight, then close.
    while tasks.join_next().await.is_some() {}
    drop(tx);
    match writer.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "writing replies failed"),
        Err(e) => tracing::warn!(error = %e, "reply writer stopped"),
    }
    if let Err(e) = backend.disconnected().await {
        tracing::warn!(error = %e, "publishing writes at disconnect failed");
    }
    result
}

/// Reads and drops `len` payload bytes of a refused write.
async fn drain_payload<R: AsyncRead + Unpin>(r: &mut R, len: u32) -> Result<(), ConnError> {
    let mut left = u64::from(len);
    let mut sink = tokio::io::sink();
    let mut limited = r.take(left);
    let copy = tokio::io::copy(&mut limited, &mut sink);
    match tokio::time::timeout(PAYLOAD_TIMEOUT, copy).await {
        Ok(Ok(n)) => left -= n,
        Ok(Err(e)) => return Err(e.into()),
        Err(_) => return Err(ConnError::Stalled(PAYLOAD_TIMEOUT)),
    }
    if left > 0 {
        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
    }
    Ok(())
}

async fn write_replies<W: AsyncWrite + Unpin>(
    mut w: BufWriter<W>,
    mut rx: mpsc::Receiver<Reply>,
) -> std::io::Result<()> {
    while let Some(reply) = rx.recv().await {
        let send = async {
            for b in &reply.bufs {
                w.write_all(b).await?;
            }
            if rx.is_empty() {
                w.flush().await?;
            }
            Ok::<_, std::io::Error>(())
        };
        match tokio::time::timeout(REPLY_TIMEOUT, send).await {
            Ok(r) => r?,
            Err(_) => return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "client stopped taking replies")),
        }
    }
    let close = async {
        w.flush().await?;
        w.shutdown().await
    };
    tokio::time::timeout(REPLY_TIMEOUT, close)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "client stopped taking replies")))
}

fn error_reply(structured: bool, cookie: u64, error: u32, message: &str) -> Vec<Bytes> {
    if structured {
        vec![error_chunk(cookie, error, message)]
    } else {
        vec![simple_reply(cookie, error)]
    }
}

/// Runs one accepted request against the backend; returns its reply.
async fn execute<B: Backend>(backend: &B, cmd: Command, payload: Bytes, cookie: u64, neg: &Negotiated) -> Vec<Bytes> {
    let ok = || vec![simple_reply(cookie, 0)];
    let result = match cmd {
        Command::Read { offset, len, df } => {
            if len == 0 {
                return if neg.structured { vec![none_chunk(cookie)] } else { ok() };
            }
            match backend.read(offset, len).await {
                Ok(data) => return read_reply(cookie, offset, data, len, df, neg),
                Err(e) => Err(e),
            }
        }
        Command::Write { offset, fua, .. } => {
            if payload.is_empty() {
                Ok(())
            } else {
                backend.write(offset, payload, fua).await
            }
        }
        Command::Flush => backend.flush().await,
        Command::Trim { offset, len, fua } => backend.trim(offset, len, fua).await,
        Command::WriteZeroes { offset, len, fua, no_hole } => {
            if len == 0 {
                Ok(())
            } else {
                backend.write_zeroes(offset, len, no_hole, fua).await
            }
        }
        Command::BlockStatus { offset, len, req_one } => match backend.allocation(offset, len).await {
            Ok(extents) => {
                let id = neg.base_allocation.unwrap_or_default();
                return vec![block_status_chunk(cookie, id, &clip_extents(&extents, len, req_one))];
            }
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => ok(),
        Err(e) => {
            tracing::warn!(cookie, ?cmd, error = %e, "request failed");
            error_reply(neg.structured, cookie, e.errno, &e.message)
        }
    }
}

/// `data` cut or padded with zeros to `len` bytes (reads past the end of
/// the backing data, e.g. after someone shrank the file).
/// The reply to a read that got `data`.
fn read_reply(cookie: u64, offset: u64, data: Bytes, len: u32, df: bool, neg: &Negotiated) -> Vec<Bytes> {
    let data = exact_len(data, len as usize);
    if neg.structured {
        read_reply_chunks(cookie, &read_contents(offset, &data, df))
    } else {
        vec![simple_reply(cookie, 0), data]
    }
}

fn exact_len(data: Bytes, len: usize) -> Bytes {
    if data.len() == len {
        return data;
    }
    if data.len() > len {
        return data.slice(..len);
    }
    let mut b = BytesMut::with_capacity(len);
    b.extend_from_slice(&data);
    b.resize(len, 0);
    b.freeze()
}

#[cfg(test)]
mod tests {
    //! The connection loop against an in-memory backend, over an in-memory
    //! pipe, with a minimal client written from the spec.

    use super::*;
    use crate::nbd::backend::BackendResult;
    use crate::nbd::handshake::BASE_ALLOCATION_ID;
    use std::sync::Mutex;
    use tokio::io::DuplexStream;

    #[derive(Default)]
    struct Mem {
        data: Mutex<Vec<u8>>,
        flushes: Mutex<u32>,
    }

    impl Mem {
        fn with_size(n: usize) -> Self {
            Mem { data: Mutex::new(vec![0u8; n]), flushes: Mutex::new(0) }
        }
        fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
            self.data.lock().unwrap_or_else(|p| p.into_inner())
        }
    }

    impl Backend for Mem {
        async fn read(&self, offset: u64, len: u32) -> BackendResult<Bytes> {
            // Yield so concurrent requests interleave.
            tokio::task::yield_now().await;
            let d = self.lock();
            Ok(Bytes::copy_from_slice(&d[offset as usize..(offset + u64::from(len)) as usize]))
        }
        async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> BackendResult<()> {
            self.lock()[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
            Ok(())
        }
        async fn flush(&self) -> BackendResult<()> {
            *self.flushes.lock().unwrap_or_else(|p| p.into_inner()) += 1;
            Ok(())
        }
        async fn trim(&self, _offset: u64, _len: u32, _fua: bool) -> BackendResult<()> {
            Ok(())
        }
        async fn write_zeroes(&self, offset: u64, len: u32, _no_hole: bool, _fua: bool) -> BackendResult<()> {
            self.lock()[offset as usize..(offset + u64::from(len)) as usize].fill(0);
            Ok(())
        }
        async fn allocation(&self, offset: u64, len: u32) -> BackendResult<Vec<Extent>> {
            // 4 KiB blocks of zeros are holes.
            let d = self.lock();
            let mut out: Vec<Extent> = Vec::new();
            let mut pos = offset as usize;
            let end = pos + len as usize;
            while pos < end {
                let n = (4096 - pos % 4096).min(end - pos);
                let flags = if d[pos..pos + n].iter().all(|b| *b == 0) { STATE_HOLE | STATE_ZERO } else { 0 };
                match out.last_mut() {
                    Some(e) if e.flags == flags => e.len += n as u32,
                    _ => out.push(Extent { len: n as u32, flags }),
                }
                pos += n;
            }
            Ok(out)
        }
        async fn disconnected(&self) -> BackendResult<()> {
            Ok(())
        }
    }

    const SIZE: usize = 1 << 20;

    /// The server side of a test connection.
    type Served = tokio::task::JoinHandle<Result<(), ConnError>>;

    fn start(read_only: bool) -> (DuplexStream, Arc<Mem>, watch::Sender<bool>, Served) {
        let (client, server) = tokio::io::duplex(1 << 16);
        let export =
            Arc::new(ExportInfo { name: "disk".into(), description: String::new(), size: SIZE as u64, read_only });
        let mem = Arc::new(Mem::with_size(SIZE));
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(serve(server, export, mem.clone(), stop_rx));
        (client, mem, stop_tx, task)
    }

    async fn option(c: &mut DuplexStream, opt: u32, data: &[u8]) {
        c.write_all(&IHAVEOPT.to_be_bytes()).await.expect("write");
        c.write_all(&opt.to_be_bytes()).await.expect("write");
        c.write_all(&(data.len() as u32).to_be_bytes()).await.expect("write");
        c.write_all(data).await.expect("write");
    }

    /// Reads one option reply: (type, data).
    async fn option_reply(c: &mut DuplexStream) -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        c.read_exact(&mut h).await.expect("reply header");
        assert_eq!(&h[..8], &OPTION_REPLY_MAGIC.to_be_bytes());
        let kind = u32::from_be_bytes(h[12..16].try_into().expect("4"));
        let len = u32::from_be_bytes(h[16..20].try_into().expect("4"));
        let mut d = vec![0u8; len as usize];
        c.read_exact(&mut d).await.expect("reply data");
        (kind, d)
    }

    /// Greeting, flags, structured replies and base:allocation, then GO.
    async fn negotiate(c: &mut DuplexStream, structured: bool) -> u16 {
        let mut g = [0u8; 18];
        c.read_exact(&mut g).await.expect("greeting");
        assert_eq!(g, greeting());
        c.write_all(&3u32.to_be_bytes()).await.expect("flags");
        if structured {
            option(c, OPT_STRUCTURED_REPLY, &[]).await;
            assert_eq!(option_reply(c).await.0, REP_ACK);
            let mut q = 4u32.to_be_bytes().to_vec();
            q.extend_from_slice(b"disk");
            q.extend_from_slice(&1u32.to_be_bytes());
            q.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
            q.extend_from_slice(BASE_ALLOCATION.as_bytes());
            option(c, OPT_SET_META_CONTEXT, &q).await;
            let (kind, d) = option_reply(c).await;
            assert_eq!(kind, REP_META_CONTEXT);
            assert_eq!(u32::from_be_bytes(d[..4].try_into().expect("4")), BASE_ALLOCATION_ID);
            assert_eq!(option_reply(c).await.0, REP_ACK);
        }
        let mut go = 4u32.to_be_bytes().to_vec();
        go.extend_from_slice(b"disk");
        go.extend_from_slice(&0u16.to_be_bytes());
        option(c, OPT_GO, &go).await;
        let mut flags = 0;
        loop {
            let (kind, d) = option_reply(c).await;
            if kind == REP_ACK {
                return flags;
            }
            assert_eq!(kind, REP_INFO);
            if u16::from_be_bytes([d[0], d[1]]) == INFO_EXPORT {
                flags = u16::from_be_bytes([d[10], d[11]]);
            }
        }
    }

    async fn send(c: &mut DuplexStream, kind: u16, flags: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) {
        c.write_all(&encode_request(&Request { flags, kind, cookie, offset, len })).await.expect("request");
        c.write_all(payload).await.expect("payload");
    }

    /// One structured chunk: (flags, type, cookie, payload).
    async fn chunk(c: &mut DuplexStream) -> (u16, u16, u64, Vec<u8>) {
        let mut h = [0u8; 20];
        c.read_exact(&mut h).await.expect("chunk header");
        assert_eq!(u32::from_be_bytes(h[..4].try_into().expect("4")), STRUCTURED_REPLY_MAGIC);
        let len = u32::from_be_bytes(h[16..20].try_into().expect("4"));
        let mut d = vec![0u8; len as usize];
        c.read_exact(&mut d).await.expect("chunk payload");
        (
            u16::from_be_bytes([h[4], h[5]]),
            u16::from_be_bytes([h[6], h[7]]),
            u64::from_be_bytes(h[8..16].try_into().expect("8")),
            d,
        )
    }

    async fn simple(c: &mut DuplexStream) -> (u32, u64) {
        let mut h = [0u8; 16];
        c.read_exact(&mut h).await.expect("simple reply");
        assert_eq!(u32::from_be_bytes(h[..4].try_into().expect("4")), SIMPLE_REPLY_MAGIC);
        (u32::from_be_bytes(h[4..8].try_into().expect("4")), u64::from_be_bytes(h[8..16].try_into().expect("8")))
    }

    #[tokio::test]
    async fn simple_replies_write_read_flush_and_disconnect() {
        let (mut c, mem, _stop, task) = start(false);
        let flags = negotiate(&mut c, false).await;
        assert_eq!(flags & TFLAG_SEND_DF, 0);
        send(&mut c, CMD_WRITE, CMD_FLAG_FUA, 1, 4096, 5, b"hello").await;
        assert_eq!(simple(&mut c).await, (0, 1));
        send(&mut c, CMD_READ, 0, 2, 4094, 8, &[]).await;
        assert_eq!(simple(&mut c).await, (0, 2));
        let mut d = [0u8; 8];
        c.read_exact(&mut d).await.expect("data");
        assert_eq!(&d, b"\0\0hello\0");
        send(&mut c, CMD_FLUSH, 0, 3, 0, 0, &[]).await;
        assert_eq!(simple(&mut c).await, (0, 3));
        assert_eq!(*mem.flushes.lock().expect("lock"), 1);
        // Out of range: an error and no payload.
        send(&mut c, CMD_READ, 0, 4, SIZE as u64, 1, &[]).await;
        assert_eq!(simple(&mut c).await, (EINVAL, 4));
        send(&mut c, CMD_DISC, 0, 5, 0, 0, &[]).await;
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).await.expect("read to close");
        assert!(rest.is_empty(), "no reply to a disconnect");
        task.await.expect("join").expect("clean end");
    }

    #[tokio::test]
    async fn structured_reads_have_holes_and_block_status_reports_them() {
        let (mut c, mem, _stop, task) = start(false);
        negotiate(&mut c, true).await;
        mem.lock()[8192..8192 + 3].copy_from_slice(b"abc");
        send(&mut c, CMD_READ, 0, 7, 0, 16384, &[]).await;
        let mut got = vec![0u8; 16384];
        let mut covered = 0;
        loop {
            let (flags, kind, cookie, d) = chunk(&mut c).await;
            assert_eq!(cookie, 7);
            let off = u64::from_be_bytes(d[..8].try_into().expect("8")) as usize;
            match kind {
                REPLY_TYPE_OFFSET_DATA => {
                    got[off..off + d.len() - 8].copy_from_slice(&d[8..]);
                    covered += d.len() - 8;
                }
                REPLY_TYPE_OFFSET_HOLE => covered += u32::from_be_bytes(d[8..12].try_into().expect("4")) as usize,
                other => panic!("chunk type {other}"),
            }
            if flags & REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        assert_eq!(covered, 16384);
        assert_eq!(&got[8192..8195], b"abc");

        send(&mut c, CMD_BLOCK_STATUS, 0, 8, 0, 16384, &[]).await;
        let (flags, kind, _, d) = chunk(&mut c).await;
        assert_eq!((flags, kind), (REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS));
        assert_eq!(u32::from_be_bytes(d[..4].try_into().expect("4")), BASE_ALLOCATION_ID);
        let ext: Vec<(u32, u32)> = d[4..]
            .chunks(8)
            .map(|e| {
                (u32::from_be_bytes(e[..4].try_into().expect("4")), u32::from_be_bytes(e[4..].try_into().expect("4")))
            })
            .collect();
        assert_eq!(ext, vec![(8192, 3), (4096, 0), (4096, 3)]);

        send(&mut c, CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 9, 0, 16384, &[]).await;
        let (_, _, _, d) = chunk(&mut c).await;
        assert_eq!(d.len(), 4 + 8, "one extent with REQ_ONE");

        // Errors are structured, with a message.
        send(&mut c, CMD_READ, 0, 10, 0, MAX_BLOCK_PLUS_ONE, &[]).await;
        let (flags, kind, cookie, d) = chunk(&mut c).await;
        assert_eq!((flags, kind, cookie), (REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 10));
        assert_eq!(u32::from_be_bytes(d[..4].try_into().expect("4")), EOVERFLOW);
        drop(c);
        task.await.expect("join").expect("clean end");
    }

    const MAX_BLOCK_PLUS_ONE: u32 = crate::nbd::handshake::MAX_BLOCK + 1;

    #[tokio::test]
    async fn refused_writes_drain_their_payload_and_the_connection_goes_on() {
        let (mut c, mem, _stop, task) = start(true);
        let flags = negotiate(&mut c, false).await;
        assert_ne!(flags & TFLAG_READ_ONLY, 0);
        let payload = vec![0xabu8; 1000];
        send(&mut c, CMD_WRITE, 0, 1, 0, 1000, &payload).await;
        assert_eq!(simple(&mut c).await, (EPERM, 1));
        send(&mut c, CMD_TRIM, 0, 2, 0, 1000, &[]).await;
        assert_eq!(simple(&mut c).await, (EPERM, 2));
        send(&mut c, CMD_READ, 0, 3, 0, 4, &[]).await;
        assert_eq!(simple(&mut c).await, (0, 3));
        let mut d = [1u8; 4];
        c.read_exact(&mut d).await.expect("data");
        assert_eq!(d, [0; 4]);
        assert!(mem.lock().iter().all(|b| *b == 0), "nothing written");
        drop(c);
        task.await.expect("join").expect("clean end");
    }

    #[tokio::test]
    async fn bad_magic_and_huge_writes_close_the_connection() {
        let (mut c, _mem, _stop, task) = start(false);
        negotiate(&mut c, false).await;
        c.write_all(&[0xffu8; REQUEST_BYTES]).await.expect("garbage");
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).await.expect("closed");
        assert!(matches!(task.await.expect("join"), Err(ConnError::BadMagic(_))));

        let (mut c, _mem, _stop, task) = start(false);
        negotiate(&mut c, false).await;
        send(&mut c, CMD_WRITE, 0, 1, 0, u32::MAX, &[]).await;
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).await.expect("closed");
        assert!(matches!(task.await.expect("join"), Err(ConnError::Refused(_))));
    }

    #[tokio::test]
    async fn handshake_refuses_bad_flags_options_and_abort_closes() {
        let (mut c, _mem, _stop, task) = start(false);
        let mut g = [0u8; 18];
        c.read_exact(&mut g).await.expect("greeting");
        c.write_all(&0x80u32.to_be_bytes()).await.expect("flags");
        assert!(matches!(task.await.expect("join"), Err(ConnError::ClientFlags(0x80))));

        let (mut c, _mem, _stop, task) = start(false);
        c.read_exact(&mut g).await.expect("greeting");
        c.write_all(&1u32.to_be_bytes()).await.expect("flags");
        option(&mut c, 77, b"??").await;
        assert_eq!(option_reply(&mut c).await.0, REP_ERR_UNSUP);
        c.write_all(&IHAVEOPT.to_be_bytes()).await.expect("magic");
        c.write_all(&OPT_GO.to_be_bytes()).await.expect("opt");
        c.write_all(&(MAX_OPTION_BYTES + 1).to_be_bytes()).await.expect("len");
        assert!(matches!(task.await.expect("join"), Err(ConnError::OptionTooLarge(_))));

        let (mut c, _mem, _stop, task) = start(false);
        c.read_exact(&mut g).await.expect("greeting");
        c.write_all(&1u32.to_be_bytes()).await.expect("flags");
        option(&mut c, OPT_ABORT, &[]).await;
        assert_eq!(option_reply(&mut c).await.0, REP_ACK);
        task.await.expect("join").expect("abort is clean");
    }

    #[tokio::test]
    async fn pipelined_requests_all_get_answers() {
        let (mut c, mem, _stop, task) = start(false);
        negotiate(&mut c, false).await;
        let n = 200u64;
        let (mut rd, mut wr) = tokio::io::split(c);
        let sender = tokio::spawn(async move {
            for i in 0..n {
                let payload = vec![i as u8; 512];
                wr.write_all(&encode_request(&Request {
                    flags: 0,
                    kind: CMD_WRITE,
                    cookie: i,
                    offset: i * 512,
                    len: 512,
                }))
                .await
                .expect("req");
                wr.write_all(&payload).await.expect("payload");
            }
            wr
        });
        let mut seen = std::collections::HashSet::new();
        for _ in 0..n {
            let mut h = [0u8; 16];
            rd.read_exact(&mut h).await.expect("reply");
            assert_eq!(u32::from_be_bytes(h[4..8].try_into().expect("4")), 0);
            seen.insert(u64::from_be_bytes(h[8..16].try_into().expect("8")));
        }
        assert_eq!(seen.len(), n as usize);
        let wr = sender.await.expect("sender");
        let c = rd.unsplit(wr);
        drop(c);
        task.await.expect("join").expect("clean");
        let d = mem.lock();
        for i in 0..n as usize {
            assert!(d[i * 512..(i + 1) * 512].iter().all(|b| *b == i as u8));
        }
    }

    #[tokio::test]
    async fn a_silent_client_times_out_in_the_handshake() {
        let (client, server) = tokio::io::duplex(1 << 16);
        let export =
            Arc::new(ExportInfo { name: "disk".into(), description: String::new(), size: 0, read_only: false });
        let (_stop, stop_rx) = watch::channel(false);
        let r = serve_with(server, export, Arc::new(Mem::default()), stop_rx, Duration::from_millis(50)).await;
        assert!(matches!(r, Err(ConnError::HandshakeTimeout)), "{r:?}");
        drop(client);
    }

    #[tokio::test]
    async fn shutdown_ends_an_idle_connection() {
        let (mut c, _mem, stop, task) = start(false);
        negotiate(&mut c, false).await;
        stop.send(true).expect("signal");
        task.await.expect("join").expect("clean");
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).await.expect("closed");
    }
}
