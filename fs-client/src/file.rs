//! [`FileClient`]: reading and writing file data.
//!
//! Data moves directly between the client and chunk servers; the metadata
//! service only says where chunks live. Reads go to the nearest healthy
//! replica (by topology) and fall back to the others. Writes go to the
//! first replica of a chunk, which forwards them along the chain; a write
//! counts once every replica has it. When a replica fails a write, the
//! client reports it: the metadata service drops it and raises the chunk's
//! version, so the dropped copy is never served again, and the write goes on
//! with the survivors (repair restores the copy count later).
//!
//! Writes are buffered per file (bounded per file and in total) and sent in
//! large pieces, chunks in parallel; `flush` sends them and updates the
//! size, `fsync` also makes them durable on every replica.
//!
//! Sizes: the size is raised after data is written (`ExtendSize`). Bytes
//! past the end of a file may hold stale data after a truncation, so any
//! extension first zeroes the range between the old end and the new data.
//!
//! Clones and snapshots share chunks. Before writing a shared chunk the
//! client asks for its own copy (`CowChunk`); the first write to the copy
//! carries its origin, and each replica server makes the copy from its own
//! replica of the origin; after that write the client reports the copy
//! done (`CowDone`). A read of a copy no replica has yet reads the origin.
//! [`FileClient::clone_inode`] makes a clone and pushes its version fences.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::future::join_all;
use futures::StreamExt;
use tokio::sync::Mutex;

use crate::chunk::{ChunkClient, ChunkError};
use crate::client::{ClientError, MetaClient};
use crate::proto::*;
use crate::sparse::{seek_step, Seek, Step};
use crate::sums::{self, BlockSums};

/// Buffered bytes per file before they are sent. A send waits for its
/// slowest piece: with 16 MiB the chunk servers sat idle a tenth of an NBD
/// random-write run (32 MiB: 5% more IOPS; 64 MiB: no more than 32).
pub const MAX_BUFFER_PER_FILE: usize = 32 << 20;
/// Buffered bytes of all files at most.
pub const MAX_BUFFER_TOTAL: usize = 256 << 20;
/// How long a cached layout is trusted for reads.
const LAYOUT_TTL: Duration = Duration::from_secs(10);
/// Chunks fetched ahead of a read.
const LAYOUT_PREFETCH: u64 = 16;
/// Reads of one region of a chunk this large go to the same replica (among
/// equally near ones); the next region may go to another.
const READ_SPREAD_BYTES: u64 = 1 << 20;
/// Files whose state is kept at most (clean ones are dropped first).
const MAX_CACHED_FILES: usize = 4096;
/// Files the background syncer makes durable at once.
const SYNC_CONCURRENCY: usize = 16;
/// Retries of one piece after replica failures or stale layouts.
const MAX_PIECE_ATTEMPTS: usize = 6;
/// Attempts of one write or zeroing of a chunk ([`FileClient::on_chain`]);
/// with the backoff, about 10 s in all, longer than a repair copy holds a
/// chunk sealed.
const MAX_WRITE_ATTEMPTS: usize = 14;
/// Windows of the chunk map (each [`MAX_LAYOUT_CHUNKS`] chunks, 64 GiB
/// with 64 MiB chunks) one `lseek` looks through at most.
const MAX_SEEK_FETCHES: usize = 64;

fn io_err(msg: impl Into<String>) -> ClientError {
    ClientError::Remote(WireError::new(ErrorCode::Io, msg))
}

fn from_chunk(e: ChunkError) -> ClientError {
    match e {
        ChunkError::Remote { error, addr } => ClientError::Remote(WireError {
            code: error.code,
            message: format!("{addr}: {}", error.message),
            leader: None,
        }),
        ChunkError::ChainFailed { addr, error } => io_err(format!("chain broke at {addr}: {}", error.message)),
        ChunkError::Transport { addr, message } => io_err(format!("{addr}: {message}")),
    }
}

#[derive(Default)]
struct FileState {
    /// Last known size (after our own changes).
    size: Option<u64>,
    chunk_bytes: u64,
    locs: BTreeMap<u64, ChunkLocation>,
    /// Chunk indexes the last layout fetch found without a chunk (holes),
    /// so reading a sparse region does not ask again each time. Only for
    /// indexes not in `locs`, and trusted as long as `locs` is.
    holes: BTreeSet<u64>,
    fetched: Option<Instant>,
    /// Buffered writes: offset -> data, non-overlapping.
    buffer: BTreeMap<u64, Bytes>,
    buffered: usize,
    /// Highest end of data written but not yet recorded as the size.
    pending_size: u64,
    /// Chunks written since the last fsync, with their replica addresses.
    unsynced: HashMap<ChunkId, Vec<String>>,
    /// When `unsynced` last went from empty to not: the background syncer
    /// ([`FileClient::sync_settled`]) takes files settled that long.
    unsynced_since: Option<Instant>,
    /// A write-back failure not yet reported to the application.
    error: Option<WireError>,
    /// Part of a snapshot (as its layout says): never written.
    read_only: bool,
    /// The write lease on the file, as the last layout said.
    lease: Option<Lease>,
}

impl FileState {
    fn is_clean(&self) -> bool {
        self.buffer.is_empty() && self.unsynced.is_empty() && self.error.is_none() && self.pending_size == 0
    }
}

/// One file's state, and the writes taken while its buffer is being sent.
///
/// Sending a full buffer holds the state's lock for the whole round trip
/// to the chunk servers. Writes arriving meanwhile do not wait for it: they
/// are kept in `incoming` (up to [`MAX_BUFFER_PER_FILE`] bytes) and
/// acknowledged, and whoever takes the lock next merges them into the
/// buffer first ([`FileHandle::lock`]). They are newer than everything in
/// the buffer, so merging them in arrival order keeps the last write of
/// every byte on top; and they are sent after the send in flight, so they
/// land after it.
#[derive(Default)]
struct FileHandle {
    state: Arc<Mutex<FileState>>,
    incoming: std::sync::Mutex<Incoming>,
    /// Wakes writers waiting for the state when a send starts: they can
    /// be taken into `incoming` instead.
    send_started: tokio::sync::Notify,
    /// Another client changed the file: the cached layout and size are to
    /// be dropped by whoever takes the state next (it may be busy now).
    stale: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct Incoming {
    /// A send of the buffer is under way (its sender holds the state).
    sending: bool,
    /// Writes taken meanwhile, oldest first.
    writes: Vec<(u64, Bytes)>,
    bytes: usize,
}

impl FileHandle {
    /// The state, locked, with the writes taken during a send merged in.
    async fn lock(&self, total: &std::sync::atomic::AtomicUsize) -> tokio::sync::OwnedMutexGuard<FileState> {
        let mut st = self.state.clone().lock_owned().await;
        if self.stale.swap(false, std::sync::atomic::Ordering::AcqRel) {
            forget_layout(&mut st);
        }
        self.merge(&mut st, total);
        st
    }

    fn incoming(&self) -> std::sync::MutexGuard<'_, Incoming> {
        self.incoming.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn merge(&self, st: &mut FileState, total: &std::sync::atomic::AtomicUsize) {
        let writes = {
            let mut inc = self.incoming();
            inc.bytes = 0;
            std::mem::take(&mut inc.writes)
        };
        for (offset, data) in writes {
            insert_buffer(st, offset, data, total);
        }
    }

    /// Takes a write without the state's lock if a send holds it and there
    /// is room; `Err` gives the data back to be buffered the usual way.
    fn take_while_sending(&self, offset: u64, data: Bytes) -> Result<(), Bytes> {
        let mut inc = self.incoming();
        if !inc.sending || inc.bytes + data.len() > MAX_BUFFER_PER_FILE {
            return Err(data);
        }
        inc.bytes += data.len();
        inc.writes.push((offset, data));
        Ok(())
    }

    /// Whether anything is buffered, unsynced or pending (or the state is busy).
    fn is_dirty(&self) -> bool {
        let incoming = !self.incoming().writes.is_empty();
        incoming || self.state.try_lock().map(|s| !s.is_clean()).unwrap_or(true)
    }
}

/// Marks a file's buffer as being sent, until dropped (also when the send
/// is cancelled midway).
struct Sending<F: std::ops::Deref<Target = FileHandle>>(F);

impl<F: std::ops::Deref<Target = FileHandle>> Sending<F> {
    fn start(f: F) -> Sending<F> {
        f.incoming().sending = true;
        f.send_started.notify_waiters();
        Sending(f)
    }
}

impl<F: std::ops::Deref<Target = FileHandle>> Drop for Sending<F> {
    fn drop(&mut self) {
        self.0.incoming().sending = false;
    }
}

/// Reads and writes file data. Cheap to clone; share one per mount.
#[derive(Clone)]
pub struct FileClient {
    meta: MetaClient,
    chunks: ChunkClient,
    /// Where this client runs, for nearest-replica reads.
    topology: Option<Topology>,
    files: Arc<std::sync::Mutex<HashMap<Ino, Arc<FileHandle>>>>,
    buffered_total: Arc<std::sync::atomic::AtomicUsize>,
    /// Size of `files` at which the next scan for unused state runs.
    scan_at: Arc<std::sync::atomic::AtomicUsize>,
    /// The cluster's chunk size, once a layout has told it (0 before).
    chunk_bytes: Arc<std::sync::atomic::AtomicU64>,
}

/// One piece of an I/O: a range inside one chunk.
#[derive(Debug, Clone, Copy)]
struct Piece {
    index: u64,
    /// Offset inside the chunk.
    offset: u64,
    len: u64,
    /// Offset in the caller's buffer.
    at: u64,
}

fn pieces(offset: u64, len: u64, cb: u64) -> Vec<Piece> {
    pieces_of(offset, len, cb, MAX_IO_BYTES)
}

/// Writes go in smaller pieces than reads: several pieces in flight keep
/// every hop of the replica chain busy at once (each hop writes a piece to
/// disk once it has all of it).
const WRITE_PIECE_BYTES: u64 = 1 << 20;
/// Bytes of one send in flight at once ([`FileClient::write_segments`]).
/// Measured with `dd bs=1M` into the mount (1 GiB, 3 replicas): all 32
/// MiB at once 184 MB/s, 2 MiB 166, 4 MiB 245, 8 MiB 257, 16 MiB 225.
const WRITE_WINDOW_BYTES: u64 = 8 << 20;
/// Window permits are 4 KiB each; a piece takes at least one.
fn window_permits(bytes: u64) -> u32 {
    u32::try_from(bytes.div_ceil(4096).max(1)).unwrap_or(u32::MAX)
}

fn pieces_of(offset: u64, len: u64, cb: u64, limit: u64) -> Vec<Piece> {
    let mut out = Vec::new();
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let index = pos / cb;
        let in_chunk = pos % cb;
        let n = (cb - in_chunk).min(end - pos).min(limit);
        out.push(Piece { index, offset: in_chunk, len: n, at: pos - offset });
        pos += n;
    }
    out
}

impl FileClient {
    pub fn new(meta: MetaClient, chunks: ChunkClient, topology: Option<Topology>) -> Self {
        FileClient {
            meta,
            chunks,
            topology,
            files: Arc::default(),
            buffered_total: Arc::default(),
            scan_at: Arc::default(),
            chunk_bytes: Arc::default(),
        }
    }

    pub fn meta(&self) -> &MetaClient {
        &self.meta
    }

    fn file(&self, ino: Ino) -> Arc<FileHandle> {
        use std::sync::atomic::Ordering::Relaxed;
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        if files.len() >= self.scan_at.load(Relaxed).max(MAX_CACHED_FILES) && !files.contains_key(&ino) {
            // Drop state of files nobody is using; dirty ones stay. The
            // next scan waits for the map to double: with many dirty files
            // a scan per new file would make creating files quadratic.
            files.retain(|_, f| Arc::strong_count(f) > 1 || f.is_dirty());
            self.scan_at.store(files.len() * 2, Relaxed);
        }
        files.entry(ino).or_default().clone()
    }

    /// Forgets cached sizes and layouts of a file (another client changed it).
    pub fn invalidate(&self, ino: Ino) {
        let f = self.files.lock().unwrap_or_else(|p| p.into_inner()).get(&ino).cloned();
        if let Some(f) = f {
            // Applied by the next `FileHandle::lock`, which every use of the
            // layout goes through: never lost when the state is busy (a
            // send in flight).
            f.stale.store(true, std::sync::atomic::Ordering::Release);
        }
    }

    /// The layout of chunks `first..first + count` of `ino` as the
    /// metadata has it now (not the cache).
    pub async fn read_layout(&self, ino: Ino, first: u64, count: u64) -> Result<Layout, ClientError> {
        match self.meta.read(MetaRead::Layout { ino, first, count }).await? {
            ReadReply::Layout(l) => Ok(l),
            other => Err(ClientError::Protocol(format!("unexpected reply {other:?}"))),
        }
    }

    async fn fetch_layout(&self, st: &mut FileState, ino: Ino, first: u64, count: u64) -> Result<(), ClientError> {
        let l = self.read_layout(ino, first, count).await?;
        self.chunk_bytes.store(l.chunk_bytes, std::sync::atomic::Ordering::Relaxed);
        absorb(st, l, Some((first, count)));
        Ok(())
    }

    /// Where the chunks `wanted` are now, from the metadata (not the cache):
    /// those of them still in the file. `None` if the file is gone.
    async fn current_locations(
        &self,
        ino: Ino,
        wanted: &HashSet<ChunkId>,
    ) -> Result<Option<Vec<ChunkLocation>>, ClientError> {
        let mut out = Vec::new();
        let mut first = 0;
        loop {
            let l = match self.read_layout(ino, first, MAX_LAYOUT_CHUNKS).await {
                Ok(l) => l,
                Err(e) if e.code() == ErrorCode::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            out.extend(l.chunks.into_iter().filter(|c| wanted.contains(&c.chunk)));
            first += MAX_LAYOUT_CHUNKS;
            if l.chunk_bytes == 0 || first.saturating_mul(l.chunk_bytes) >= l.attr.size || out.len() == wanted.len() {
                return Ok(Some(out));
            }
        }
    }

    /// A file this client has just created, never changed since: its layout
    /// is known without asking (size 0, no chunks, not in a snapshot), so
    /// its first write-back does not read it first. Nothing is known
    /// before some layout has told the cluster's chunk size.
    pub async fn created(&self, a: &Attr) {
        let cb = self.chunk_bytes.load(std::sync::atomic::Ordering::Relaxed);
        if cb == 0 || a.kind != FileKind::File || !is_pristine(a) {
            return;
        }
        let f = self.file(a.ino);
        let mut st = f.lock(&self.buffered_total).await;
        if st.size.is_none() {
            st.size = Some(0);
            st.chunk_bytes = cb;
            st.read_only = false;
            st.fetched = Some(Instant::now());
            st.locs.clear();
            st.holes.clear();
        }
    }

    /// The file's size as this client knows it (its own buffered writes included).
    pub async fn size(&self, ino: Ino) -> Result<u64, ClientError> {
        let f = self.file(ino);
        let mut st = f.lock(&self.buffered_total).await;
        if st.size.is_none() || st.fetched.is_none_or(|t| t.elapsed() > LAYOUT_TTL) {
            self.fetch_layout(&mut st, ino, 0, 1).await?;
        }
        Ok(st.size.unwrap_or(0).max(st.pending_size).max(buffer_end(&st)))
    }

    /// Reads up to `len` bytes at `offset`; shorter at the end of the file.
    pub async fn read(&self, ino: Ino, offset: u64, len: u64) -> Result<Bytes, ClientError> {
        let f = self.file(ino);
        let mut st = f.lock(&self.buffered_total).await;
        if let Some(e) = st.error.clone() {
            return Err(ClientError::Remote(e));
        }
        // Read our own buffered writes: send them first if they overlap, or
        // if they extend the file (the gap they leave must read as zeros,
        // and sending is what zeroes it).
        let overlaps = buffer_overlaps(&st, offset, offset.saturating_add(len));
        if overlaps || buffer_end(&st) > st.size.unwrap_or(0).max(st.pending_size) {
            self.send_buffer(&mut st, &f, ino).await?;
            self.record_size(&mut st, ino).await?;
        }
        let mut fetched_now = false;
        if st.chunk_bytes == 0 || st.size.is_none() || st.fetched.is_none_or(|t| t.elapsed() > LAYOUT_TTL) {
            st.locs.clear();
            st.holes.clear();
            let cb = if st.chunk_bytes == 0 { DEFAULT_CHUNK_BYTES } else { st.chunk_bytes };
            self.fetch_layout(&mut st, ino, offset / cb, LAYOUT_PREFETCH).await?;
            fetched_now = true;
        }
        // A read reaching past the end we know asks again: another client
        // may have written more.
        if !fetched_now && offset.saturating_add(len) > st.size.unwrap_or(0).max(st.pending_size) {
            let cb = st.chunk_bytes.max(1);
            self.fetch_layout(&mut st, ino, offset / cb, LAYOUT_PREFETCH).await?;
        }
        let size = st.size.unwrap_or(0).max(st.pending_size);
        if offset >= size || len == 0 {
            return Ok(Bytes::new());
        }
        let len = len.min(size - offset);
        let cb = st.chunk_bytes;
        let ps = pieces(offset, len, cb);
        let missing: Vec<u64> =
            ps.iter().map(|p| p.index).filter(|i| !st.locs.contains_key(i) && !st.holes.contains(i)).collect();
        if let (Some(first), Some(last)) = (missing.first(), missing.last()) {
            // Unknown indexes may be holes; one fetch tells.
            self.fetch_layout(&mut st, ino, *first, (last - first + 1).max(LAYOUT_PREFETCH)).await?;
        }
        let locs: Vec<Option<ChunkLocation>> = ps.iter().map(|p| st.locs.get(&p.index).cloned()).collect();
        drop(st);
        let reads = ps.iter().zip(locs).map(|(p, loc)| self.read_piece(ino, *p, loc));
        let mut results = join_all(reads).await;
        if results.len() == 1 {
            // One piece: its bytes as they came, not copied again.
            return results.pop().unwrap_or_else(|| Ok(Bytes::new()));
        }
        let mut out = BytesMut::with_capacity(len as usize);
        for r in results {
            out.extend_from_slice(&r?);
        }
        Ok(out.freeze())
    }

    async fn read_piece(&self, ino: Ino, p: Piece, loc: Option<ChunkLocation>) -> Result<Bytes, ClientError> {
        let Some(mut loc) = loc else { return Ok(Bytes::from(vec![0u8; p.len as usize])) };
        let mut last = String::from("no replicas");
        for attempt in 0..MAX_PIECE_ATTEMPTS {
            let order = self.nearest_first(&loc, p.offset);
            let mut stale = false;
            let mut not_found = 0;
            for addr in &order {
                let mut res = self.chunks.read(addr, loc.chunk, loc.version, p.offset, p.len).await;
                if let (Err(e), Some((origin, origin_version))) = (&res, loc.origin) {
                    if e.code() == ErrorCode::NotFound {
                        // A copy-on-write chunk not written here yet: it is
                        // still its origin.
                        res = self.chunks.read(addr, origin, origin_version, p.offset, p.len).await;
                    }
                }
                match res {
                    Ok(b) => return Ok(b),
                    Err(e) => {
                        if e.code() == ErrorCode::Stale || e.code() == ErrorCode::NotFound {
                            stale = true;
                        }
                        if e.code() == ErrorCode::NotFound {
                            not_found += 1;
                        }
                        tracing::debug!(chunk = loc.chunk, %addr, error = %e, "replica read failed; trying the next");
                        last = e.to_string();
                    }
                }
            }
            if not_found == order.len() && attempt > 0 {
                // Allocated but never written (the writer failed first):
                // it reads as zeros, like a hole.
                return Ok(Bytes::from(vec![0u8; p.len as usize]));
            }
            // Every replica failed or disagreed on the version: ask again
            // where the chunk lives.
            let fresh = self.read_layout(ino, p.index, 1).await?;
            let f = self.file(ino);
            absorb(&mut *f.lock(&self.buffered_total).await, fresh.clone(), Some((p.index, 1)));
            match fresh.chunks.into_iter().find(|c| c.index == p.index) {
                Some(c) if c.chunk != loc.chunk || c.version != loc.version || stale => loc = c,
                Some(c) => {
                    loc = c;
                    if attempt > 0 {
                        tokio::time::sleep(Duration::from_millis(100 << attempt.min(4))).await;
                    }
                }
                None => return Ok(Bytes::from(vec![0u8; p.len as usize])),
            }
        }
        Err(io_err(format!("chunk {} unreadable on every replica: {last}", loc.chunk)))
    }

    /// Replicas nearest first; those whose server could not be reached just
    /// now go last. Equally near replicas share the reads by region of
    /// [`READ_SPREAD_BYTES`]: each region is read from one of them.
    fn nearest_first(&self, loc: &ChunkLocation, offset: u64) -> Vec<String> {
        let spread = (loc.chunk ^ (offset / READ_SPREAD_BYTES)).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
        let mut order: Vec<String> = match &self.topology {
            None => {
                let mut all: Vec<String> = loc.replicas.iter().map(|r| r.addr.clone()).collect();
                if !all.is_empty() {
                    let k = (spread % all.len() as u64) as usize;
                    all.rotate_left(k);
                }
                all
            }
            Some(me) => {
                let pairs: Vec<(u64, Topology)> = loc.replicas.iter().map(|r| (r.server, r.topology.clone())).collect();
                placement::pick_read_replica(me, &pairs, spread)
                    .into_iter()
                    .filter_map(|id| loc.replicas.iter().find(|r| r.server == id).map(|r| r.addr.clone()))
                    .collect()
            }
        };
        // A replica on this host is nearest of all (read through its
        // server's local socket).
        order.sort_by_key(|a| (self.chunks.is_down(a), !self.chunks.is_local(a)));
        order
    }

    /// Buffers a write; it is sent when the buffer fills, on `flush` or
    /// `fsync`. An earlier write-back failure is reported here.
    pub async fn write(&self, ino: Ino, offset: u64, mut data: Bytes) -> Result<(), ClientError> {
        if data.is_empty() {
            return Ok(());
        }
        offset.checked_add(data.len() as u64).filter(|e| *e <= 1 << 60).ok_or_else(|| {
            ClientError::Remote(WireError::new(ErrorCode::FileTooBig, "write past the largest file size"))
        })?;
        let f = self.file(ino);
        // While the file's buffer is being sent the write is taken without
        // waiting; a writer already waiting for the state is woken when a
        // send starts, to be taken too.
        let mut st = loop {
            let started = f.send_started.notified();
            tokio::pin!(started);
            started.as_mut().enable();
            match f.take_while_sending(offset, data) {
                Ok(()) => return Ok(()),
                Err(d) => data = d,
            }
            tokio::select! {
                st = f.lock(&self.buffered_total) => break st,
                () = &mut started => {}
            }
        };
        if let Some(e) = st.error.take() {
            return Err(ClientError::Remote(e));
        }
        if st.read_only {
            return Err(read_only(ino));
        }
        self.check_lease(st.lease.as_ref(), ino)?;
        insert_buffer(&mut st, offset, data, &self.buffered_total);
        let over_total = self.buffered_total.load(std::sync::atomic::Ordering::Relaxed) > MAX_BUFFER_TOTAL;
        if st.buffered >= MAX_BUFFER_PER_FILE || over_total {
            if st.size.is_some() && !st.read_only {
                // The writer goes on while the buffer is sent: its next
                // writes fill `incoming`, so the chain never waits for the
                // application (a FUSE write or a single-threaded writer
                // would otherwise stop and wait for every send).
                self.send_in_background(st, f, ino);
            } else {
                self.send_buffer(&mut st, &f, ino).await?;
            }
        }
        Ok(())
    }

    /// Sends a full buffer from a task of its own, holding the file's
    /// state (and so its place in the order of writes) until it is done.
    /// A failure is kept in the state and reported by the next write,
    /// read, flush or fsync of the file; data the cluster did not refuse
    /// stays buffered for them to send again.
    fn send_in_background(&self, mut st: tokio::sync::OwnedMutexGuard<FileState>, f: Arc<FileHandle>, ino: Ino) {
        let sending = Sending::start(f.clone());
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(e) = this.send_marked(&mut st, &f, ino, Some(sending)).await {
                st.error = Some(WireError::new(e.code(), e.to_string()));
            }
        });
    }

    /// Writes `data` at `offset` now, without buffering.
    pub async fn write_through(&self, ino: Ino, offset: u64, data: Bytes) -> Result<(), ClientError> {
        self.write(ino, offset, data).await?;
        self.flush(ino).await
    }

    /// Sends buffered writes and records the new size.
    pub async fn flush(&self, ino: Ino) -> Result<(), ClientError> {
        let f = self.file(ino);
        let mut st = f.lock(&self.buffered_total).await;
        if let Some(e) = st.error.take() {
            return Err(ClientError::Remote(e));
        }
        self.send_buffer(&mut st, &f, ino).await?;
        self.record_size(&mut st, ino).await
    }

    /// `flush`, then makes everything written durable on every replica.
    pub async fn fsync(&self, ino: Ino) -> Result<(), ClientError> {
        self.flush(ino).await?;
        let f = self.file(ino);
        let mut st = f.lock(&self.buffered_total).await;
        let unsynced: Vec<(ChunkId, Vec<String>)> = st.unsynced.drain().collect();
        let since = st.unsynced_since.take();
        drop(st);
        let res = self.sync_chunks(ino, &unsynced).await;
        if res.is_err() {
            // Not made durable: the next fsync tries them again.
            let mut st = f.lock(&self.buffered_total).await;
            for (chunk, addrs) in unsynced {
                st.unsynced.entry(chunk).or_insert(addrs);
            }
            if let Some(t) = since {
                st.unsynced_since = Some(st.unsynced_since.map_or(t, |u| u.min(t)));
            }
        }
        res
    }

    /// Flushes `unsynced` chunks on their servers (the body of `fsync`).
    async fn sync_chunks(&self, ino: Ino, unsynced: &[(ChunkId, Vec<String>)]) -> Result<(), ClientError> {
        let mut by_server: HashMap<String, Vec<ChunkId>> = HashMap::new();
        for (chunk, addrs) in unsynced {
            for a in addrs {
                by_server.entry(a.clone()).or_default().push(*chunk);
            }
        }
        let flushes = by_server.into_iter().map(|(addr, chunks)| async move {
            let r = self.chunks.flush(&addr, chunks.clone()).await;
            (addr, chunks, r)
        });
        // A replica that cannot flush (its server died) is dropped, as a
        // failed write would drop it: the version rises, so its copy is
        // never served again, and the survivors hold the data durably. Only
        // a chunk left with no replica that flushed fails the fsync.
        //
        // A server may also no longer have a chunk written since the last
        // fsync: the chunk left the file (truncated, punched, replaced by a
        // copy-on-write copy, the file deleted) or left the server (repair
        // moved the replica, the server dropped a stale copy). Nothing of
        // it is to be made durable there; the layout tells which.
        let mut failed: Vec<(String, Vec<ChunkId>, ChunkError)> = Vec::new();
        let mut flushed: HashSet<(String, ChunkId)> = HashSet::new();
        for (addr, chunks, r) in join_all(flushes).await {
            match r {
                Ok(_) => flushed.extend(chunks.into_iter().map(|c| (addr.clone(), c))),
                Err(e @ ChunkError::Transport { .. }) => failed.push((addr, chunks, e)),
                Err(e @ ChunkError::Remote { .. }) if is_not_found(&e) => failed.push((addr, chunks, e)),
                Err(e) => return Err(from_chunk(e)),
            }
        }
        if failed.is_empty() {
            return Ok(());
        }
        let wanted: HashSet<ChunkId> = failed.iter().flat_map(|(_, c, _)| c.iter().copied()).collect();
        let Some(locs) = self.current_locations(ino, &wanted).await? else {
            // The file is gone, and its chunks with it.
            return Ok(());
        };
        for (addr, chunks, e) in failed {
            for chunk in &chunks {
                let Some(loc) = locs.iter().find(|l| l.chunk == *chunk) else { continue };
                let Some(server) = loc.replicas.iter().find(|r| r.addr == addr).map(|r| r.server) else {
                    continue;
                };
                if is_not_found(&e) {
                    // The server answered for the whole batch: find out
                    // whether this chunk is the one it lacks.
                    match self.chunks.flush(&addr, vec![*chunk]).await {
                        Ok(()) => {
                            flushed.insert((addr.clone(), *chunk));
                            continue;
                        }
                        Err(e) if is_not_found(&e) || matches!(e, ChunkError::Transport { .. }) => {}
                        Err(e) => return Err(from_chunk(e)),
                    }
                }
                let survivor =
                    loc.replicas.iter().any(|r| r.addr != addr && flushed.contains(&(r.addr.clone(), *chunk)));
                if !survivor {
                    return Err(from_chunk(clone_chunk_err(&e)));
                }
                tracing::warn!(chunk, server, error = %e, "replica failed a flush; dropping it");
                // As for a failed write: the survivors learn the new
                // version at once, or every use of the chunk would fail
                // against them until the leader's next push.
                self.recover(ino, loc.index, loc.clone(), &flush_failure(&addr, &e)).await?;
                self.invalidate(ino);
            }
        }
        Ok(())
    }

    /// Sets the size (truncate or extend), zeroing what an extension uncovers.
    pub async fn truncate(&self, ino: Ino, size: u64) -> Result<Attr, ClientError> {
        self.flush(ino).await?;
        let f = self.file(ino);
        let mut st = f.lock(&self.buffered_total).await;
        self.fetch_layout(&mut st, ino, 0, 0).await?;
        let old = st.size.unwrap_or(0);
        if size > old {
            self.zero_gap(&mut st, ino, old, size).await?;
        }
        let attr =
            self.meta.op_attr(MetaOp::SetAttr { ino, set: SetAttr { size: Some(size), ..Default::default() } }).await?;
        st.size = Some(attr.size);
        st.pending_size = 0;
        // Chunks past the end went away; forget their locations.
        let cb = st.chunk_bytes.max(1);
        st.locs.retain(|i, _| *i < size.div_ceil(cb));
        // Nor flush them: their servers may have deleted them already.
        let kept: HashSet<ChunkId> = st.locs.values().map(|l| l.chunk).collect();
        st.unsynced.retain(|c, _| kept.contains(c));
        Ok(attr)
    }

    /// Writes buffered data to the chunk servers.
    async fn send_buffer(&self, st: &mut FileState, f: &FileHandle, ino: Ino) -> Result<(), ClientError> {
        if st.buffer.is_empty() {
            return Ok(());
        }
        // Writes may go on meanwhile, unless this may be a snapshot (not
        // known before the first layout): those must be refused, not taken.
        let sending = (st.size.is_some() && !st.read_only).then(|| Sending::start(f));
        self.send_marked(st, f, ino, sending).await
    }

    /// [`Self::send_buffer`] once the send is marked (`sending`), so that
    /// writes meanwhile go to `incoming`.
    async fn send_marked<F: std::ops::Deref<Target = FileHandle>>(
        &self,
        st: &mut FileState,
        f: &FileHandle,
        ino: Ino,
        sending: Option<Sending<F>>,
    ) -> Result<(), ClientError> {
        if st.buffer.is_empty() {
            drop(sending);
            f.merge(st, &self.buffered_total);
            return Ok(());
        }
        // The buffer stays until the chunk servers have it: a caller that
        // gives up midway (a cancelled request) loses nothing acknowledged.
        let segments: Vec<(u64, Bytes)> = st.buffer.iter().map(|(o, d)| (*o, d.clone())).collect();
        let res = self.write_segments(st, ino, &segments).await;
        drop(sending);
        // Refused writes (a snapshot, another client's lease) must not land
        // later, once a retry would be let through: they go with the error.
        let refused = res.as_ref().is_err_and(|e| matches!(e.code(), ErrorCode::ReadOnly | ErrorCode::Busy));
        match &res {
            Ok(()) => self.drop_buffer(st),
            Err(e) if refused => {
                tracing::warn!(ino, error = %e, "write-back refused; the buffered writes are dropped");
                self.drop_buffer(st);
            }
            Err(e) => tracing::warn!(ino, error = %e, "write-back failed; the data stays buffered"),
        }
        // What arrived meanwhile is newer than what was sent.
        f.merge(st, &self.buffered_total);
        res
    }

    fn drop_buffer(&self, st: &mut FileState) {
        st.buffer.clear();
        self.buffered_total.fetch_sub(st.buffered, std::sync::atomic::Ordering::Relaxed);
        st.buffered = 0;
    }

    async fn write_segments(&self, st: &mut FileState, ino: Ino, segments: &[(u64, Bytes)]) -> Result<(), ClientError> {
        let lo = segments.first().map(|(o, _)| *o).unwrap_or(0);
        let hi = segments.last().map(|(o, d)| o + d.len() as u64).unwrap_or(0);
        if st.size.is_none() || st.chunk_bytes == 0 {
            self.fetch_layout(st, ino, 0, 0).await?;
        }
        // The chunk servers would take the writes: refuse here.
        self.check_writable(st, ino).await?;
        // Allocate (and learn) every chunk the writes touch, in one request
        // per span of chunks.
        let cb = st.chunk_bytes;
        let needed: Vec<u64> = segments
            .iter()
            .flat_map(|(o, d)| pieces(*o, d.len() as u64, cb).into_iter().map(|p| p.index))
            .filter(|i| !st.locs.contains_key(i))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        // One request per run of consecutive chunks, not one over the whole
        // span: writes at both ends of a sparse file must not allocate every
        // chunk between them.
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for i in needed {
            match runs.last_mut() {
                Some((s, e)) if *e + 1 == i && i - *s < MAX_LAYOUT_CHUNKS => *e = i,
                _ => runs.push((i, i)),
            }
        }
        // A prepare answers with the layout as it is now (size included).
        let refreshed = !runs.is_empty();
        // The first write to an empty file (a small file being written):
        // the prepare that makes all its chunks sets its size too, and no
        // `ExtendSize` follows the data (the metadata checks it is empty).
        let extend = matches!(runs.as_slice(), [(0, _)]) && st.size == Some(0) && st.pending_size == 0;
        // Sent together: concurrent operations of one client travel in one
        // batch (one Raft commit).
        let prepares = runs.into_iter().map(|(span_start, span_end)| {
            // The written bytes inside this span: the quota check sees the
            // real end, not the end of the last chunk.
            let o = lo.max(span_start * cb);
            let e = hi.min((span_end + 1) * cb);
            self.meta.op(MetaOp::PrepareWrite { ino, offset: o, len: e.saturating_sub(o), extend })
        });
        for r in join_all(prepares).await {
            match r? {
                OpReply::Layout(layout) => {
                    self.chunk_bytes.store(layout.chunk_bytes, std::sync::atomic::Ordering::Relaxed);
                    absorb(st, layout, None)
                }
                other => return Err(ClientError::Protocol(format!("unexpected reply {other:?}"))),
            }
        }
        let extended = extend && st.size.is_some_and(|s| s >= hi);
        // Data past the current end: zero every gap the segments leave
        // between the old end and their last byte (the tail of the old end's
        // chunk may still hold bytes a truncate cut off).
        //
        // The end as the metadata has it now, not as cached: another client
        // may have cut the file (its old bytes must be zeroed, even under a
        // write this client thinks is inside the file) or extended it (its
        // data must not be). One read per send, unless a prepare just
        // answered with the size.
        if !refreshed {
            self.fetch_layout(st, ino, lo / cb.max(1), 1).await?;
            // The layout may carry a lease (and chunk versions past its
            // fences) taken since the checks above.
            self.check_writable(st, ino).await?;
        }
        let size = st.size.unwrap_or(0).max(st.pending_size);
        if hi > size {
            let mut cursor = size;
            let mut gaps = Vec::new();
            for (o, d) in segments {
                let end = o + d.len() as u64;
                if end <= cursor {
                    continue;
                }
                if *o > cursor {
                    gaps.push((cursor, *o));
                }
                cursor = cursor.max(end);
            }
            for (from, to) in gaps {
                self.zero_gap(st, ino, from, to).await?;
            }
        }
        // Chunks shared with clones or snapshots: get our own copies first,
        // once per chunk (the pieces below would each ask otherwise).
        let shared: Vec<ChunkLocation> = segments
            .iter()
            .flat_map(|(o, d)| pieces(*o, d.len() as u64, cb).into_iter().map(|p| p.index))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter_map(|i| st.locs.get(&i).filter(|l| l.shared).cloned())
            .collect();
        for r in join_all(shared.iter().map(|l| self.cow(ino, l))).await {
            let loc = r?;
            st.locs.insert(loc.index, loc);
        }
        // At most WRITE_WINDOW_BYTES in flight, taken in order: sent all at
        // once, a buffer's pieces shared the links evenly and all arrived
        // at the end, so every replica wrote its whole share to disk at
        // once while the network and the CPUs idled. In a window they
        // finish one after another and the disks write while the rest
        // moves.
        let total = window_permits(WRITE_WINDOW_BYTES);
        let window = tokio::sync::Semaphore::new(total as usize);
        let mut jobs = Vec::new();
        for group in group_pieces(gather(segments, cb, WRITE_PIECE_BYTES), WRITE_PIECE_BYTES) {
            let index = group[0].0.index;
            let loc = st.locs.get(&index).cloned().ok_or_else(|| io_err("chunk not allocated"))?;
            let bytes: u64 = group.iter().map(|(p, _)| p.len).sum();
            let window = &window;
            // Boxed: `join_all` moves each job's whole state when it
            // completes, and a piece's is large (its retries, the chain
            // write, the recovery); a tenth of an NBD export's CPU went to
            // those copies under 4 KiB random writes.
            jobs.push(Box::pin(async move {
                // The semaphore is never closed.
                let _turn = window.acquire_many(window_permits(bytes).min(total)).await;
                self.write_piece(ino, index, loc, group).await
            }));
        }
        let results = join_all(jobs).await;
        let mut first_err = None;
        let mut copied = BTreeMap::new();
        for r in results {
            match r {
                Ok(loc) => {
                    st.unsynced_since.get_or_insert_with(Instant::now);
                    st.unsynced.insert(loc.chunk, loc.replicas.iter().map(|r| r.addr.clone()).collect());
                    if loc.origin.is_some() {
                        copied.insert(loc.chunk, loc.index);
                    }
                    st.locs.insert(loc.index, loc);
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        self.cow_done(st, copied).await;
        if let Some(e) = first_err {
            return Err(e);
        }
        if !extended {
            st.pending_size = st.pending_size.max(hi);
        }
        Ok(())
    }

    /// Gets chunk `loc.index` of `ino` a copy of its own if it is shared
    /// (another writer may have made it already); returns where it is.
    async fn cow(&self, ino: Ino, loc: &ChunkLocation) -> Result<ChunkLocation, ClientError> {
        let mut loc = loc.clone();
        // The file may have moved on to another shared chunk meanwhile.
        for _ in 0..MAX_PIECE_ATTEMPTS {
            if !loc.shared {
                return Ok(loc);
            }
            let op = MetaOp::CowChunk { ino, index: loc.index, chunk: loc.chunk };
            loc = match self.meta.op(op).await? {
                OpReply::Layout(l) => l
                    .chunks
                    .into_iter()
                    .find(|c| c.index == loc.index)
                    .ok_or_else(|| io_err(format!("chunk {} of inode {ino} vanished", loc.index)))?,
                other => return Err(ClientError::Protocol(format!("unexpected reply {other:?}"))),
            };
        }
        Err(io_err(format!("chunk {} of inode {ino} stays shared", loc.index)))
    }

    /// Copies written on every replica: their origins are no longer
    /// needed. Best effort: a lost report only keeps the origin's space.
    async fn cow_done(&self, st: &mut FileState, copied: BTreeMap<ChunkId, u64>) {
        let done = copied
            .iter()
            .map(|(&chunk, &index)| async move { (index, chunk, self.meta.op(MetaOp::CowDone { chunk }).await) });
        for (index, chunk, r) in join_all(done).await {
            match r {
                Ok(_) => {
                    if let Some(l) = st.locs.get_mut(&index).filter(|l| l.chunk == chunk) {
                        l.origin = None;
                    }
                }
                Err(e) => tracing::debug!(chunk, error = %e, "copy-on-write completion not recorded"),
            }
        }
    }

    /// Writes pieces of one chunk along its chain (one request, however
    /// many); on a replica failure, reports it, brings the survivors to the
    /// new version and goes on with them.
    async fn write_piece(
        &self,
        ino: Ino,
        index: u64,
        loc: ChunkLocation,
        group: Vec<(Piece, Bytes)>,
    ) -> Result<ChunkLocation, ClientError> {
        let extents: Vec<(u64, u64)> = group.iter().map(|(p, _)| (p.offset, p.len)).collect();
        // Each extent's bytes as they are: sent one after another, not
        // copied into one buffer first.
        let data: Vec<Bytes> = group.into_iter().map(|(_, b)| b).collect();
        let op = |chain: Vec<String>, loc: ChunkLocation| {
            let (extents, data) = (&extents, &data);
            async move {
                let (chunk, version, origin) = (loc.chunk, loc.version, loc.origin);
                let sums = write_sums(chunk, extents, data).await;
                if let ([(offset, _)], [one]) = (extents.as_slice(), data.as_slice()) {
                    self.chunks.write(&chain, chunk, version, *offset, one.clone(), true, origin, sums).await
                } else {
                    self.chunks.writev(&chain, chunk, version, extents.clone(), data.clone(), true, origin, sums).await
                }
            }
        };
        Ok(self.on_chain(ino, index, loc, "write to", op).await?.0)
    }

    /// Runs `op` on the replica chain of chunk `index` until it succeeds:
    /// a shared chunk is copied first; after a failure the broken replica
    /// is dropped or the layout refreshed ([`Self::recover`]), and while the
    /// version stays the same (a replica sealed for a repair copy, or a
    /// version raise on its way) it backs off, for about 10 s in all.
    /// Returns the location it succeeded at and what `op` returned.
    async fn on_chain<T, F, Fut>(
        &self,
        ino: Ino,
        index: u64,
        mut loc: ChunkLocation,
        what: &str,
        mut op: F,
    ) -> Result<(ChunkLocation, T), ClientError>
    where
        F: FnMut(Vec<String>, ChunkLocation) -> Fut,
        Fut: std::future::Future<Output = Result<T, ChunkError>>,
    {
        let mut last = String::new();
        for attempt in 0..MAX_WRITE_ATTEMPTS {
            if loc.shared {
                // A clone or snapshot shares it now (we learnt on a retry).
                loc = self.cow(ino, &loc).await?;
            }
            let chain: Vec<String> = loc.replicas.iter().map(|r| r.addr.clone()).collect();
            if chain.is_empty() {
                return Err(io_err(format!("chunk {} has no replicas", loc.chunk)));
            }
            match op(chain, loc.clone()).await {
                Ok(t) => return Ok((loc, t)),
                Err(e) => {
                    last = e.to_string();
                    let before = loc.version;
                    loc = self.recover(ino, index, loc, &e).await?;
                    if loc.version == before {
                        tokio::time::sleep(Duration::from_millis(20 << attempt.min(5))).await;
                    }
                }
            }
        }
        Err(io_err(format!("{what} chunk {} failed: {last}", loc.chunk)))
    }

    /// After a failed chain operation: a broken replica is dropped (and the
    /// survivors moved to the new version); a stale layout is refreshed.
    async fn recover(
        &self,
        ino: Ino,
        index: u64,
        loc: ChunkLocation,
        e: &ChunkError,
    ) -> Result<ChunkLocation, ClientError> {
        if let ChunkError::Remote { error, .. } = e {
            match error.code {
                ErrorCode::Stale | ErrorCode::NotFound | ErrorCode::Unavailable => {}
                // The request itself is wrong (out of space, quota, bad range).
                _ => return Err(from_chunk(clone_chunk_err(e))),
            }
        }
        let failed = e.failed_server().and_then(|a| loc.replicas.iter().find(|r| r.addr == a)).map(|r| r.server);
        let layout = match failed {
            Some(server) => {
                tracing::warn!(chunk = loc.chunk, server, error = %e, "replica failed a write; dropping it");
                let op = MetaOp::ReplicaFailed { ino, index, chunk: loc.chunk, version: loc.version, server };
                match self.meta.op(op).await? {
                    OpReply::Layout(l) => l,
                    other => return Err(ClientError::Protocol(format!("unexpected reply {other:?}"))),
                }
            }
            None => self.read_layout(ino, index, 1).await?,
        };
        // A lease taken since the layout was fetched is what fenced us.
        self.check_lease(layout.lease.as_ref(), ino)?;
        let new = layout
            .chunks
            .into_iter()
            .find(|c| c.index == index)
            .ok_or_else(|| io_err(format!("chunk {index} of inode {ino} vanished")))?;
        if new.chunk == loc.chunk && new.version > loc.version {
            // The metadata service raised the version; tell the survivors
            // now rather than wait for their next heartbeat.
            let bumps =
                new.replicas.iter().map(|r| self.chunks.set_version(&r.addr, new.chunk, loc.version, new.version));
            for r in join_all(bumps).await {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "version raise not delivered; the leader will retry");
                }
            }
        }
        Ok(new)
    }

    /// Zeroes `[from, to)` where old data may linger: the tail of the chunk
    /// that held the end of the file.
    async fn zero_gap(&self, st: &mut FileState, ino: Ino, from: u64, to: u64) -> Result<(), ClientError> {
        if st.read_only {
            return Err(read_only(ino));
        }
        let cb = st.chunk_bytes;
        if cb == 0 || from >= to || from.is_multiple_of(cb) {
            return Ok(());
        }
        let index = from / cb;
        if !st.locs.contains_key(&index) {
            self.fetch_layout(st, ino, index, 1).await?;
        }
        let end = to.min((index + 1) * cb);
        self.zero_in_chunk(st, ino, index, from % cb, end - from).await
    }

    /// Makes `len` bytes at `off` inside chunk `index` read as zeros on
    /// every replica (whole checksum blocks are freed there). A hole, or a
    /// chunk never written, is left alone; a shared chunk is copied first.
    async fn zero_in_chunk(
        &self,
        st: &mut FileState,
        ino: Ino,
        index: u64,
        off: u64,
        len: u64,
    ) -> Result<(), ClientError> {
        let Some(loc) = st.locs.get(&index).cloned() else { return Ok(()) };
        self.check_lease_fresh(st, ino).await?;
        let op = |chain: Vec<String>, loc: ChunkLocation| async move {
            match self.chunks.zero(&chain, loc.chunk, loc.version, off, len, loc.origin).await {
                Ok(()) => Ok(true),
                // Never written on this server: nothing to zero.
                Err(ChunkError::Remote { error, .. }) if error.code == ErrorCode::NotFound => Ok(false),
                Err(e) => Err(e),
            }
        };
        let (loc, zeroed) = self.on_chain(ino, index, loc, "zero a range of", op).await?;
        if zeroed {
            // Like a write, durable only once flushed: the next fsync (or a
            // FUA) must cover this chunk too.
            st.unsynced_since.get_or_insert_with(Instant::now);
            st.unsynced.insert(loc.chunk, loc.replicas.iter().map(|r| r.addr.clone()).collect());
            let copied = loc.origin.map(|_| (loc.chunk, index));
            st.locs.insert(index, loc);
            self.cow_done(st, copied.into_iter().collect()).await;
        }
        Ok(())
    }

    /// Makes `[offset, offset + len)` read as zeros without writing data,
    /// and gives the space of whole checksum blocks back on every replica
    /// (a hole punch: NBD trim and write-zeroes, `fallocate` with
    /// `FALLOC_FL_PUNCH_HOLE` or `FALLOC_FL_ZERO_RANGE`). The size does not
    /// change: past the end there is nothing to punch. Buffered writes to
    /// the range are sent first, so none lands on the zeros later.
    pub async fn punch(&self, ino: Ino, offset: u64, len: u64) -> Result<(), ClientError> {
        let f = self.file(ino);
        let mut st = f.lock(&self.buffered_total).await;
        if let Some(e) = st.error.clone() {
            return Err(ClientError::Remote(e));
        }
        if st.read_only {
            return Err(read_only(ino));
        }
        let end = offset.saturating_add(len);
        if buffer_overlaps(&st, offset, end) {
            self.send_buffer(&mut st, &f, ino).await?;
            self.record_size(&mut st, ino).await?;
        }
        if st.chunk_bytes == 0 {
            self.fetch_layout(&mut st, ino, 0, 1).await?;
        }
        let cb = st.chunk_bytes.max(1);
        // A fresh layout of the range: which chunks exist, and at which
        // version, as of now.
        let (first, last) = (offset / cb, end.saturating_sub(1) / cb);
        let mut at = first;
        while at <= last && len > 0 {
            let count = (last - at + 1).min(MAX_LAYOUT_CHUNKS);
            self.fetch_layout(&mut st, ino, at, count).await?;
            at += count;
        }
        let size = st.size.unwrap_or(0).max(st.pending_size);
        let end = end.min(size);
        if offset >= end {
            return Ok(());
        }
        for p in pieces_of(offset, end - offset, cb, cb) {
            self.zero_in_chunk(&mut st, ino, p.index, p.offset, p.len).await?;
        }
        Ok(())
    }

    /// Records written data in the file's size.
    async fn record_size(&self, st: &mut FileState, ino: Ino) -> Result<(), ClientError> {
        if st.pending_size == 0 {
            return Ok(());
        }
        let attr = self.meta.op_attr(MetaOp::ExtendSize { ino, size: st.pending_size }).await?;
        st.size = Some(attr.size);
        st.pending_size = 0;
        Ok(())
    }

    /// `lseek(SEEK_DATA | SEEK_HOLE)` from `offset`, at chunk granularity
    /// (see [`crate::sparse`]): `None` where the call fails with `ENXIO`
    /// (no data after `offset`, or `offset` at or past the end). Buffered
    /// writes are sent first: their chunks are made then. A search that
    /// finds nothing in [`MAX_SEEK_FETCHES`] windows of the chunk map
    /// answers as if the rest were data.
    pub async fn seek(&self, ino: Ino, offset: u64, what: Seek) -> Result<Option<u64>, ClientError> {
        self.flush(ino).await?;
        let layout = |first: u64| self.read_layout(ino, first, MAX_LAYOUT_CHUNKS);
        // The cluster's chunk size, if known, to begin at the offset's chunk.
        let cb = self.chunk_bytes.load(std::sync::atomic::Ordering::Relaxed);
        let mut first = offset.checked_div(cb).unwrap_or(0);
        let mut l = layout(first).await?;
        if l.chunk_bytes != 0 && first != offset / l.chunk_bytes {
            first = offset / l.chunk_bytes;
            l = layout(first).await?;
        }
        for _ in 0..MAX_SEEK_FETCHES {
            let present: BTreeSet<u64> = l.chunks.iter().map(|c| c.index).collect();
            let known_end = first.saturating_add(MAX_LAYOUT_CHUNKS);
            match seek_step(what, offset, l.attr.size, l.chunk_bytes, &present, known_end) {
                Step::At(at) => return Ok(Some(at)),
                Step::Nothing => return Ok(None),
                Step::From(index) => first = index,
            }
            l = layout(first).await?;
        }
        let size = l.attr.size;
        Ok(match what {
            _ if offset >= size => None,
            Seek::Data => Some(offset.max(first.saturating_mul(l.chunk_bytes)).min(size)),
            Seek::Hole => Some(size),
        })
    }

    /// Drops the cached state of a file (after unlink, or when asked).
    pub fn forget(&self, ino: Ino) {
        let f = self.files.lock().unwrap_or_else(|p| p.into_inner()).remove(&ino);
        if let Some(f) = f {
            if let Ok(s) = f.state.try_lock() {
                self.buffered_total.fetch_sub(s.buffered, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    /// Makes durable the files whose writes all reached the chunk servers
    /// at least `age` ago but were never fsynced, as a kernel writes back
    /// dirty pages after a while: a crash of the chunk servers then loses
    /// at most that much, and the files' state can be dropped (a mount
    /// writing many files would otherwise keep every one). A failure is
    /// kept for the file's next write or fsync to report. Returns how many
    /// files were synced.
    pub async fn sync_settled(&self, age: Duration) -> usize {
        let settled: Vec<Ino> = {
            let files = self.files.lock().unwrap_or_else(|p| p.into_inner());
            files
                .iter()
                .filter(|(_, f)| {
                    f.incoming().writes.is_empty()
                        && f.state.try_lock().is_ok_and(|s| {
                            s.buffer.is_empty()
                                && s.pending_size == 0
                                && s.error.is_none()
                                && s.unsynced_since.is_some_and(|t| t.elapsed() >= age)
                        })
                })
                .map(|(i, _)| *i)
                .collect()
        };
        let n = settled.len();
        let syncs = futures::stream::iter(settled)
            .map(|ino| async move {
                if let Err(e) = self.fsync(ino).await {
                    tracing::warn!(ino, error = %e, "background sync failed; the next fsync reports it");
                    let f = self.file(ino);
                    let mut st = f.lock(&self.buffered_total).await;
                    st.error.get_or_insert(WireError::new(e.code(), e.to_string()));
                }
            })
            .buffer_unordered(SYNC_CONCURRENCY);
        syncs.collect::<Vec<()>>().await;
        n
    }

    /// Runs [`Self::sync_settled`] every `every`, for files settled `age`,
    /// for as long as the runtime lives.
    pub fn spawn_syncer(&self, every: Duration, age: Duration) {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let n = me.sync_settled(age).await;
                if n > 0 {
                    tracing::debug!(files = n, "settled files synced");
                }
            }
        });
    }

    /// Inodes with buffered or unsynced data.
    pub fn dirty_files(&self) -> HashSet<Ino> {
        let files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        files.iter().filter(|(_, f)| f.is_dirty()).map(|(i, _)| *i).collect()
    }

    /// Refuses (`Busy`) to write file `ino` while another client's lease
    /// on it binds.
    fn check_lease(&self, lease: Option<&Lease>, ino: Ino) -> Result<(), ClientError> {
        match lease {
            Some(l) if l.excludes(self.meta.client_id(), Timespec::now()) => Err(leased(ino)),
            _ => Ok(()),
        }
    }

    /// Refuses writes the chunk servers would take but must not: to a
    /// snapshot, or under another client's lease (as the cached layout says).
    async fn check_writable(&self, st: &mut FileState, ino: Ino) -> Result<(), ClientError> {
        if st.read_only {
            return Err(read_only(ino));
        }
        self.check_lease_fresh(st, ino).await
    }

    /// [`Self::check_lease`] before chunks are written, by the leader's
    /// clock: another client's lease that looks lapsed in the cached layout
    /// may have been renewed since (renewals fence nothing), so the layout
    /// is read again; and whether it still binds is asked of the leader,
    /// which stamped its expiry, so a client whose clock runs ahead never
    /// writes under a live lease (nor one whose clock lags waits past it).
    async fn check_lease_fresh(&self, st: &mut FileState, ino: Ino) -> Result<(), ClientError> {
        let me = self.meta.client_id();
        if st.lease.is_none_or(|l| l.holder == me) {
            return Ok(());
        }
        if st.lease.is_some_and(|l| !l.excludes(me, Timespec::now())) {
            self.fetch_layout(st, ino, 0, 0).await?;
        }
        let Some(lease) = st.lease.filter(|l| l.holder != me) else { return Ok(()) };
        let now = match self.meta.read(MetaRead::Now).await? {
            ReadReply::Now(t) => t,
            other => return Err(ClientError::Protocol(format!("unexpected reply {other:?}"))),
        };
        match lease.excludes(me, now) {
            true => Err(leased(ino)),
            false => Ok(()),
        }
    }

    /// Takes or renews (`ttl` > 0) or releases (`ttl` = 0) this client's
    /// write lease on `ino` (see [`MetaOp::Lease`]). A lease taken afresh
    /// comes with fences, pushed here before this returns: from then on a
    /// writer holding an older layout is refused by the chunk servers.
    /// Replicas that could not be told are in [`Leased::unfenced`].
    pub async fn lease(&self, ino: Ino, ttl: Duration) -> Result<Leased, ClientError> {
        let op = MetaOp::Lease { ino, ttl_ms: ttl.as_millis().min(u64::MAX as u128) as u64 };
        let reply = match self.meta.op(op).await? {
            OpReply::Leased(r) => r,
            other => return Err(ClientError::Protocol(format!("unexpected reply {other:?}"))),
        };
        let fenced = reply.fences.len() as u64;
        let unfenced = self.fence(&reply.fences, &reply.servers).await;
        if fenced > 0 {
            self.invalidate(ino);
        }
        Ok(Leased { lease: reply.lease, fenced, unfenced })
    }

    /// Pushes version fences and reports the copies they made; returns the
    /// replicas that could not be told.
    async fn fence(&self, fences: &[ChunkFence], servers: &[(ServerId, String)]) -> Vec<Unfenced> {
        let unfenced = self.push_fences(fences, servers).await;
        // Copies not written before are now made on every replica that took
        // its fence: where all did, the origin is no longer needed.
        let failed: HashSet<ChunkId> = unfenced.iter().map(|u| u.chunk).collect();
        let made = fences.iter().filter(|f| f.origin.is_some() && !failed.contains(&f.chunk));
        let done = made.map(|f| self.meta.op(MetaOp::CowDone { chunk: f.chunk }));
        for r in join_all(done).await {
            if let Err(e) = r {
                tracing::debug!(error = %e, "copy-on-write completion not recorded");
            }
        }
        unfenced
    }

    /// Clones (or, with `snapshot`, snapshots) inode `src` (a file or a
    /// whole directory tree) to `name` in `parent`: one metadata command
    /// that shares every chunk, then the version fences pushed to every
    /// replica, chain heads first, so that from the moment this returns a
    /// writer holding an older layout of the source is refused, learns the
    /// chunk is shared and writes to a copy. Writes racing with the call
    /// itself may or may not be in the clone (crash-consistent). This
    /// client's own buffered writes go first.
    ///
    /// Replicas that could not be told are listed in
    /// [`CloneOutcome::unfenced`]; until they catch up (the leader moves
    /// them on when they next report), a stale writer might still reach
    /// them.
    pub async fn clone_inode(
        &self,
        src: Ino,
        parent: Ino,
        name: &[u8],
        snapshot: bool,
    ) -> Result<CloneOutcome, ClientError> {
        for ino in self.dirty_files() {
            self.flush(ino).await?;
        }
        let op = MetaOp::Clone { src, parent, name: name.to_vec(), snapshot };
        let started = Instant::now();
        let reply = match self.meta.op(op).await? {
            OpReply::Cloned(r) => r,
            other => return Err(ClientError::Protocol(format!("unexpected reply {other:?}"))),
        };
        let metadata = started.elapsed();
        let unfenced = self.fence(&reply.fences, &reply.servers).await;
        let fences = started.elapsed() - metadata;
        self.invalidate(src);
        Ok(CloneOutcome {
            attr: reply.attr,
            inodes: reply.inodes,
            chunks: reply.chunks,
            fenced: reply.fences.len() as u64,
            unfenced,
            metadata,
            fences,
        })
    }

    /// Pushes fences: first to each chunk's write-chain head
    /// (which then refuses older writes before forwarding them), then to
    /// the other replicas; one request per server and batch, servers in
    /// parallel. Returns the replicas that could not be told.
    async fn push_fences(&self, fences: &[ChunkFence], servers: &[(ServerId, String)]) -> Vec<Unfenced> {
        let addrs: HashMap<ServerId, &str> = servers.iter().map(|(id, a)| (*id, a.as_str())).collect();
        let mut failed = Vec::new();
        for heads in [true, false] {
            let mut by_server: BTreeMap<ServerId, Vec<VersionChange>> = BTreeMap::new();
            for f in fences {
                let targets =
                    if heads { &f.replicas[..f.replicas.len().min(1)] } else { f.replicas.get(1..).unwrap_or(&[]) };
                for s in targets {
                    let change = VersionChange { chunk: f.chunk, from: f.from, to: f.to, origin: f.origin };
                    by_server.entry(*s).or_default().push(change);
                }
            }
            let jobs = by_server.into_iter().map(|(server, changes)| {
                let addr = addrs.get(&server).copied();
                async move {
                    let Some(addr) = addr else {
                        return changes
                            .iter()
                            .map(|c| Unfenced { server, chunk: c.chunk, error: "server not registered".into() })
                            .collect();
                    };
                    let mut out = Vec::new();
                    for part in changes.chunks(MAX_SET_VERSIONS) {
                        out.extend(self.fence_batch(server, addr, part).await);
                    }
                    out
                }
            });
            failed.extend(join_all(jobs).await.into_iter().flatten());
        }
        failed
    }

    /// One batch of fences to one server, retried while it is unreachable.
    async fn fence_batch(&self, server: ServerId, addr: &str, part: &[VersionChange]) -> Vec<Unfenced> {
        let mut attempt = 0;
        loop {
            match self.chunks.set_versions(addr, part.to_vec()).await {
                Ok(results) => {
                    return part
                        .iter()
                        .zip(results)
                        .filter_map(|(c, r)| r.err().map(|e| Unfenced { server, chunk: c.chunk, error: e.message }))
                        .collect()
                }
                Err(e) if attempt + 1 < FENCE_ATTEMPTS && e.code() != ErrorCode::TooBig => {
                    attempt += 1;
                    tracing::debug!(%addr, error = %e, "fence push failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                }
                Err(e) => {
                    let msg = e.to_string();
                    return part.iter().map(|c| Unfenced { server, chunk: c.chunk, error: msg.clone() }).collect();
                }
            }
        }
    }
}

/// Tries per batch of fences to one server.
const FENCE_ATTEMPTS: u32 = 4;

/// What [`FileClient::lease`] did.
#[derive(Debug, Clone)]
pub struct Leased {
    /// The lease now (`None` after a release).
    pub lease: Option<Lease>,
    /// Chunks whose version the lease raised.
    pub fenced: u64,
    pub unfenced: Vec<Unfenced>,
}

/// What [`FileClient::clone_inode`] made.
#[derive(Debug, Clone)]
pub struct CloneOutcome {
    /// The new inode (the root of the copy for a directory).
    pub attr: Attr,
    pub inodes: u64,
    /// Chunk references shared with the source.
    pub chunks: u64,
    /// Chunks whose version was raised.
    pub fenced: u64,
    pub unfenced: Vec<Unfenced>,
    /// Time in the metadata command (commit included).
    pub metadata: Duration,
    /// Time pushing the fences to the replicas.
    pub fences: Duration,
}

/// A replica a clone's fence did not reach.
#[derive(Debug, Clone)]
pub struct Unfenced {
    pub server: ServerId,
    pub chunk: ChunkId,
    pub error: String,
}

fn read_only(ino: Ino) -> ClientError {
    ClientError::Remote(WireError::new(ErrorCode::ReadOnly, format!("inode {ino} is part of a snapshot")))
}

/// A failed flush as `recover` takes it: the replica at `addr` failed.
fn flush_failure(addr: &str, e: &ChunkError) -> ChunkError {
    match e {
        ChunkError::Transport { .. } => clone_chunk_err(e),
        _ => ChunkError::Transport { addr: addr.into(), message: format!("flush failed: {e}") },
    }
}

/// A chunk server's answer that it has no such chunk.
fn is_not_found(e: &ChunkError) -> bool {
    matches!(e, ChunkError::Remote { error, .. } if error.code == ErrorCode::NotFound)
}

fn clone_chunk_err(e: &ChunkError) -> ChunkError {
    match e {
        ChunkError::Remote { addr, error } => ChunkError::Remote { addr: addr.clone(), error: error.clone() },
        ChunkError::Transport { addr, message } => {
            ChunkError::Transport { addr: addr.clone(), message: message.clone() }
        }
        ChunkError::ChainFailed { addr, error } => ChunkError::ChainFailed { addr: addr.clone(), error: error.clone() },
    }
}

/// `Busy`: another client holds the file's write lease.
fn leased(ino: Ino) -> ClientError {
    ClientError::Remote(WireError::new(
        ErrorCode::Busy,
        format!("inode {ino} is leased for writing by another client (an NBD export)"),
    ))
}

/// Never changed since it was made: empty, with no chunks and no extended
/// attributes (setting one changes the ctime). A snapshot's copy of such a
/// file passes too; its first write-back is refused all the same.
pub fn is_pristine(a: &Attr) -> bool {
    a.size == 0 && a.mtime == a.crtime && a.ctime == a.crtime
}

/// Writes up to this long have their block sums made on the task at hand;
/// longer ones on the blocking pool (about 20 us of hashing per 64 KiB).
const INLINE_SUM_BYTES: usize = 64 << 10;

/// The block sums of a write to chunk `chunk`, made here once so that no
/// replica hashes the blocks again (see [`crate::sums`]); `None` unless
/// every extent is whole blocks of the default size (servers with other
/// blocks hash themselves).
async fn write_sums(chunk: ChunkId, extents: &[(u64, u64)], data: &[Bytes]) -> Option<BlockSums> {
    if data.iter().map(Bytes::len).sum::<usize>() <= INLINE_SUM_BYTES {
        return sums::piece_sums(chunk, extents, data, DEFAULT_BLOCK_BYTES);
    }
    let (extents, data) = (extents.to_vec(), data.to_vec());
    tokio::task::spawn_blocking(move || sums::piece_sums(chunk, &extents, &data, DEFAULT_BLOCK_BYTES))
        .await
        .ok()
        .flatten()
}

/// Drops what is cached of a file's layout (and its size, unless writes
/// of ours are pending): the next use asks the metadata service.
fn forget_layout(s: &mut FileState) {
    s.fetched = None;
    s.locs.clear();
    s.holes.clear();
    if s.buffer.is_empty() && s.pending_size == 0 {
        s.size = None;
    }
}

/// Takes a layout into the file state. `range` marks the indexes the
/// layout fully describes (absent ones there are holes).
fn absorb(st: &mut FileState, l: Layout, range: Option<(u64, u64)>) {
    st.chunk_bytes = l.chunk_bytes;
    st.read_only = l.read_only;
    st.lease = l.lease;
    st.size = Some(l.attr.size);
    st.fetched = Some(Instant::now());
    if let Some((first, count)) = range {
        // The server answers at most MAX_LAYOUT_CHUNKS indexes, and only
        // those inside the file can hold data.
        let end = first.saturating_add(count.min(MAX_LAYOUT_CHUNKS));
        st.locs.retain(|i, _| *i < first || *i >= end);
        st.holes.retain(|i| *i < first || *i >= end);
        let in_file = l.attr.size.div_ceil(l.chunk_bytes.max(1));
        st.holes.extend(first..end.min(in_file));
    }
    for c in l.chunks {
        st.holes.remove(&c.index);
        st.locs.insert(c.index, c);
    }
}

/// Whether a buffered write overlaps `[offset, end)`. Segments do not
/// overlap each other, so only the last one starting before `end` can.
fn buffer_overlaps(st: &FileState, offset: u64, end: u64) -> bool {
    st.buffer.range(..end).next_back().is_some_and(|(o, d)| o + d.len() as u64 > offset)
}

fn buffer_end(st: &FileState) -> u64 {
    st.buffer.iter().next_back().map(|(o, d)| o + d.len() as u64).unwrap_or(0)
}

/// Adds a write to the buffer, replacing overlapped bytes. Adjacent
/// writes stay separate segments (no copy here); [`gather`] runs them
/// together when they are sent.
fn insert_buffer(st: &mut FileState, offset: u64, data: Bytes, total: &std::sync::atomic::AtomicUsize) {
    let end = offset + data.len() as u64;
    // Segments do not overlap: only the last one starting before `offset`
    // (if it reaches past it) and those starting inside the write overlap it.
    let before = st.buffer.range(..offset).next_back().filter(|(o, d)| **o + d.len() as u64 > offset);
    let overlapping: Vec<u64> = before.into_iter().chain(st.buffer.range(offset..end)).map(|(o, _)| *o).collect();
    let mut removed = 0usize;
    for o in overlapping {
        let d = st.buffer.remove(&o).expect("key just listed");
        removed += d.len();
        let d_end = o + d.len() as u64;
        if o < offset {
            let keep = d.slice(..(offset - o) as usize);
            removed -= keep.len();
            st.buffer.insert(o, keep);
        }
        if d_end > end {
            let keep = d.slice((end - o) as usize..);
            removed -= keep.len();
            st.buffer.insert(end, keep);
        }
    }
    let added = data.len();
    st.buffer.insert(offset, data);
    st.buffered = st.buffered + added - removed;
    total.fetch_add(added, std::sync::atomic::Ordering::Relaxed);
    total.fetch_sub(removed, std::sync::atomic::Ordering::Relaxed);
}

/// Write pieces (from [`gather`]: sorted, not overlapping) grouped into
/// requests: consecutive pieces of one chunk go together while they total
/// at most `limit` bytes and [`MAX_WRITEV_EXTENTS`] pieces, so buffered
/// random writes cost one request per chunk and `limit`, not one each.
fn group_pieces(pieces: Vec<(Piece, Bytes)>, limit: u64) -> Vec<Vec<(Piece, Bytes)>> {
    let mut groups: Vec<Vec<(Piece, Bytes)>> = Vec::new();
    let mut bytes = 0u64;
    for (p, b) in pieces {
        match groups.last_mut() {
            Some(g) if g[0].0.index == p.index && g.len() < MAX_WRITEV_EXTENTS && bytes + p.len <= limit => {
                bytes += p.len;
                g.push((p, b));
            }
            _ => {
                bytes = p.len;
                groups.push(vec![(p, b)]);
            }
        }
    }
    groups
}

/// Buffered segments (sorted, not overlapping) as write pieces: runs of
/// adjacent segments cut at chunk boundaries and every `limit` bytes. A
/// piece inside one segment is a slice of it; one spanning several gets
/// their bytes copied once.
fn gather(segments: &[(u64, Bytes)], cb: u64, limit: u64) -> Vec<(Piece, Bytes)> {
    let seg_end = |i: usize| segments[i].0 + segments[i].1.len() as u64;
    let mut out = Vec::new();
    let mut i = 0;
    while i < segments.len() {
        let start = segments[i].0;
        let mut j = i;
        while j + 1 < segments.len() && segments[j + 1].0 == seg_end(j) {
            j += 1;
        }
        let mut k = i;
        for p in pieces_of(start, seg_end(j) - start, cb, limit) {
            let (a, b) = (start + p.at, start + p.at + p.len);
            while seg_end(k) <= a {
                k += 1;
            }
            let (o, d) = &segments[k];
            let bytes = if seg_end(k) >= b {
                d.slice((a - o) as usize..(b - o) as usize)
            } else {
                let mut m = BytesMut::with_capacity(p.len as usize);
                let mut pos = a;
                let mut kk = k;
                while pos < b {
                    let (o, d) = &segments[kk];
                    let upto = b.min(seg_end(kk));
                    m.extend_from_slice(&d[(pos - o) as usize..(upto - o) as usize]);
                    pos = upto;
                    kk += 1;
                }
                m.freeze()
            };
            out.push((p, bytes));
        }
        i = j + 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_split_at_chunk_and_io_limits() {
        let p = pieces(100, 300, 256);
        assert_eq!(p.len(), 2);
        assert_eq!((p[0].index, p[0].offset, p[0].len, p[0].at), (0, 100, 156, 0));
        assert_eq!((p[1].index, p[1].offset, p[1].len, p[1].at), (1, 0, 144, 156));
        let big = pieces(0, 3 * MAX_IO_BYTES, 64 << 20);
        assert_eq!(big.len(), 3);
    }

    /// Goal: a file takes writes without its lock only while a send holds
    /// it, up to a buffer's worth; the mark goes when the send ends (or is
    /// dropped), and merging puts the newer writes on top of the buffer.
    #[tokio::test]
    async fn writes_during_a_send_are_taken_and_merged_newest_on_top() {
        let total = std::sync::atomic::AtomicUsize::new(0);
        let f = FileHandle::default();
        assert!(f.take_while_sending(0, Bytes::from_static(b"x")).is_err(), "no send: the usual way");
        {
            let mut st = f.lock(&total).await;
            insert_buffer(&mut st, 0, Bytes::from_static(b"aaaa"), &total);
            let sending = Sending::start(&f);
            assert!(f.take_while_sending(1, Bytes::from_static(b"bb")).is_ok());
            assert!(f.take_while_sending(2, Bytes::from_static(b"c")).is_ok());
            assert!(f.is_dirty());
            let big = Bytes::from(vec![0u8; MAX_BUFFER_PER_FILE]);
            assert!(f.take_while_sending(8, big).is_err(), "over a buffer's worth: wait");
            drop(sending);
            assert!(f.take_while_sending(3, Bytes::from_static(b"d")).is_err(), "the send is over");
        }
        let st = f.lock(&total).await;
        let flat: Vec<u8> = st.buffer.values().flat_map(|d| d.to_vec()).collect();
        assert_eq!(flat, b"abca");
        assert_eq!(st.buffered, 4);
        assert_eq!(total.load(std::sync::atomic::Ordering::Relaxed), 4);
    }

    #[test]
    fn buffer_overlaps_replace_and_adjacent_writes_gather() {
        let total = std::sync::atomic::AtomicUsize::new(0);
        let mut st = FileState::default();
        insert_buffer(&mut st, 0, Bytes::from_static(b"aaaa"), &total);
        insert_buffer(&mut st, 4, Bytes::from_static(b"bbbb"), &total);
        insert_buffer(&mut st, 2, Bytes::from_static(b"XX"), &total);
        let flat: Vec<u8> = st.buffer.values().flat_map(|d| d.to_vec()).collect();
        assert_eq!(flat, b"aaXXbbbb");
        assert_eq!(st.buffered, 8);
        assert_eq!(total.load(std::sync::atomic::Ordering::Relaxed), 8);
        // A write covering several segments and parts of two others.
        insert_buffer(&mut st, 1, Bytes::from_static(b"YYYYYY"), &total);
        let flat: Vec<u8> = st.buffer.values().flat_map(|d| d.to_vec()).collect();
        assert_eq!(flat, b"aYYYYYYb");
        assert_eq!(st.buffered, 8);
        insert_buffer(&mut st, 20, Bytes::from_static(b"z"), &total);
        assert_eq!(st.buffered, 9);
        assert_eq!(total.load(std::sync::atomic::Ordering::Relaxed), 9);
        assert_eq!(buffer_end(&st), 21);
        // Sent: the adjacent segments run together, cut at the chunk
        // boundary (6) and the piece limit (4); the lone byte stays alone.
        let segs: Vec<(u64, Bytes)> = st.buffer.iter().map(|(o, d)| (*o, d.clone())).collect();
        let got: Vec<(u64, u64, Vec<u8>)> =
            gather(&segs, 6, 4).into_iter().map(|(p, b)| (p.index, p.offset, b.to_vec())).collect();
        assert_eq!(
            got,
            vec![(0, 0, b"aYYY".to_vec()), (0, 4, b"YY".to_vec()), (1, 0, b"Yb".to_vec()), (3, 2, b"z".to_vec()),]
        );
    }

    /// Goal: small pieces of one chunk share a request up to the byte
    /// limit; a new chunk or a full group starts another; every piece is
    /// kept, in order.
    #[test]
    fn group_pieces_by_chunk_and_limit() {
        let segs: Vec<(u64, Bytes)> =
            [0u64, 10, 20, 30, 95, 105].iter().map(|o| (*o, Bytes::from(vec![*o as u8; 4]))).collect();
        let groups = group_pieces(gather(&segs, 100, 1000), 8);
        let shape: Vec<Vec<(u64, u64)>> =
            groups.iter().map(|g| g.iter().map(|(p, _)| (p.index, p.offset)).collect()).collect();
        assert_eq!(shape, vec![vec![(0, 0), (0, 10)], vec![(0, 20), (0, 30)], vec![(0, 95)], vec![(1, 5)]]);
        for g in &groups {
            let extents: Vec<(u64, u64)> = g.iter().map(|(p, _)| (p.offset, p.len)).collect();
            assert!(check_extents(&extents, 100).is_ok(), "{extents:?}");
        }
    }

    /// Goal: a write's extents are refused when empty, overlapping, out of
    /// order, outside the chunk, too many or too large.
    #[test]
    fn check_extents_refuses_bad_shapes() {
        assert_eq!(check_extents(&[(0, 4), (8, 4)], 16).unwrap(), 8);
        for bad in
            [vec![], vec![(0, 0)], vec![(0, 8), (4, 4)], vec![(8, 4), (0, 4)], vec![(12, 8)], vec![(u64::MAX, 2)]]
        {
            assert_eq!(check_extents(&bad, 16).unwrap_err().code, ErrorCode::BadRequest, "{bad:?}");
        }
        let many: Vec<(u64, u64)> = (0..=MAX_WRITEV_EXTENTS as u64).map(|i| (i * 2, 1)).collect();
        assert!(check_extents(&many, 1 << 30).is_err());
        assert_eq!(check_extents(&[(0, MAX_IO_BYTES + 1)], 1 << 30).unwrap_err().code, ErrorCode::TooBig);
    }

    #[test]
    fn gather_slices_a_piece_inside_one_segment() {
        let big = Bytes::from(vec![5u8; 10]);
        let segs = vec![(0u64, big.clone())];
        let got = gather(&segs, 1 << 20, 4);
        assert_eq!(got.len(), 3);
        // The same memory, not a copy.
        assert_eq!(got[1].1.as_ptr(), big[4..].as_ptr());
    }
}
