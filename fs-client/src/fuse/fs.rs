//! [`LocusFs`]: the `fuser::Filesystem` over [`MetaClient`] (namespace) and
//! [`FileClient`] (data).
//!
//! Every kernel request is handed to the mount's tokio runtime and answered
//! from that task; a FUSE thread never waits on the network. Inode numbers
//! are the metadata service's own (the root is 1 on both sides), so the
//! mount keeps no inode table: the kernel's lookup counts need no state
//! here, and `forget` has nothing to do.
//!
//! What the mount does keep: open file and directory handles, which inodes
//! have writers here (their size may be ahead of the service's until a
//! flush), and the parent of directories it has seen (for `..`).

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::future::Future;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use fuser::{
    AccessFlags, CopyFileRangeFlags, Errno, FileHandle, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    IoctlFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, PollEvents, PollFlags, PollNotifier, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyIoctl,
    ReplyLseek, ReplyOpen, ReplyPoll, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use futures::future::join_all;
use tokio::runtime::Handle;
use tokio::sync::mpsc;

use super::attr::{errno, errno_of, file_attr, file_type, is_expected, set_time, timespec};
use super::dir::{DirStream, Slot};
use super::watch::{Inval, Notice};
use crate::client::{ClientError, MetaClient};
use crate::file::FileClient;
use crate::proto::*;
use crate::sparse::Seek;

/// How long the kernel may trust an entry or attributes without asking.
pub const TTL: Duration = Duration::from_secs(1);
/// Largest write the kernel sends in one request.
pub const MAX_WRITE_BYTES: u32 = 1 << 20;
/// Readahead the mount asks for (the kernel may allow less).
pub const MAX_READAHEAD_BYTES: u32 = 8 << 20;
/// Background requests (readahead, async reads, releases) the kernel keeps
/// in flight: network round trips overlap only if many are.
const MAX_BACKGROUND: u16 = 64;
/// Directory parents remembered for `..`; the map starts over when full.
const MAX_DIR_PARENTS: usize = 65_536;
/// Entries whose attributes one readdirplus step fetches together.
const READDIRPLUS_BATCH: usize = 64;
/// How often shutdown checks whether requests are still running.
const IDLE_POLL: Duration = Duration::from_millis(20);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Inserts into a map that starts over when it holds `max` other keys
/// (the caches here are hints: losing them costs a round trip).
fn insert_bounded<V>(map: &Mutex<HashMap<Ino, V>>, max: usize, key: Ino, value: V) {
    let mut m = lock(map);
    if m.len() >= max && !m.contains_key(&key) {
        m.clear();
    }
    m.insert(key, value);
}

/// An open file.
struct OpenFile {
    ino: Ino,
    writable: bool,
    /// O_SYNC / O_DSYNC: every write is made durable before it is answered.
    sync: bool,
}

/// State shared by the filesystem, the change watcher and shutdown.
pub struct Shared {
    pub(crate) meta: MetaClient,
    pub(crate) files: FileClient,
    rt: Handle,
    next_fh: AtomicU64,
    open: Mutex<HashMap<u64, OpenFile>>,
    dirs: Mutex<HashMap<u64, Arc<tokio::sync::Mutex<DirStream>>>>,
    /// Open writable handles per inode.
    writers: Mutex<HashMap<Ino, u32>>,
    /// Parent of each directory seen, for `..`.
    parents: Mutex<HashMap<Ino, Ino>>,
    /// Requests being served.
    inflight: AtomicUsize,
    /// `security.capability` per inode (`None`: absent), for [`TTL`]. The
    /// kernel asks for it before every write to a file (to drop
    /// capabilities on change): without this, each write waits for a
    /// metadata round trip first.
    caps: Mutex<HashMap<Ino, CachedCap>>,
    /// What the kernel was last told of each regular file, so an open can
    /// tell whether its cached attributes are stale (close-to-open
    /// consistency), and the change stream which changes it has already.
    /// Starts over when full.
    told: Mutex<HashMap<Ino, Attr>>,
    /// The attributes each regular file had at its last open here: an
    /// open that finds others drops the file client's cached layout.
    /// Starts over when full.
    opened: Mutex<HashMap<Ino, Attr>>,
    /// The notifier thread's queue, once the change watcher runs.
    pub(crate) notices: OnceLock<mpsc::Sender<Notice>>,
    /// Files open here that lost their last name (unlinked or renamed
    /// over): orphans this mount holds until their last handle closes.
    orphans: Mutex<HashSet<Ino>>,
}

/// How long the cluster keeps an orphan whose mount stopped renewing (ms).
pub const ORPHAN_TTL_MS: u64 = 60_000;
/// How often the mount renews its orphans.
pub const ORPHAN_RENEW: Duration = Duration::from_secs(15);

/// Regular files whose reported attributes are remembered.
const MAX_TOLD: usize = 65_536;
/// How long an open waits for the kernel to drop stale attributes.
const OPEN_INVAL_TIMEOUT: Duration = Duration::from_secs(1);

/// An inode's `security.capability` (`None`: absent) and when it was read.
type CachedCap = (Option<Vec<u8>>, Instant);

/// The extended attribute the kernel reads before every write.
const CAPABILITY_XATTR: &[u8] = b"security.capability";
/// Inodes whose capability is remembered; the cache starts over when full.
const MAX_CACHED_CAPS: usize = 65_536;

impl Shared {
    pub fn new(meta: MetaClient, files: FileClient, rt: Handle) -> Arc<Self> {
        Arc::new(Shared {
            meta,
            files,
            rt,
            next_fh: AtomicU64::new(1),
            open: Mutex::default(),
            dirs: Mutex::default(),
            writers: Mutex::default(),
            parents: Mutex::default(),
            inflight: AtomicUsize::new(0),
            caps: Mutex::default(),
            told: Mutex::default(),
            opened: Mutex::default(),
            notices: OnceLock::new(),
            orphans: Mutex::default(),
        })
    }

    /// Regular files open here (at most [`MAX_KEEP_OPEN`]).
    fn open_files(&self) -> Vec<Ino> {
        let set: HashSet<Ino> = lock(&self.open).values().map(|f| f.ino).collect();
        set.into_iter().take(MAX_KEEP_OPEN).collect()
    }

    /// `op` (an unlink or a rename), keeping files open here that lose
    /// their last name as orphans of this mount.
    async fn removing(&self, op: MetaOp) -> Result<(), ClientError> {
        let open = self.open_files();
        if open.is_empty() {
            return self.meta.op(op).await.map(|_| ());
        }
        match self.meta.op(MetaOp::KeepOpen { open, ttl_ms: ORPHAN_TTL_MS, op: Box::new(op) }).await? {
            OpReply::Orphans(kept) => {
                let mut o = lock(&self.orphans);
                o.extend(kept.iter().copied());
                drop(o);
                // A handle may have closed meanwhile.
                for ino in kept {
                    self.release_orphan_if_closed(ino);
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Lets the cluster remove orphan `ino` once no handle here has it open.
    fn release_orphan_if_closed(&self, ino: Ino) {
        if lock(&self.open).values().any(|f| f.ino == ino) || !lock(&self.orphans).remove(&ino) {
            return;
        }
        let (meta, files) = (self.meta.clone(), self.files.clone());
        self.rt.spawn(async move {
            files.forget(ino);
            if let Err(e) = meta.op(MetaOp::HoldOrphans { inos: vec![ino], ttl_ms: 0 }).await {
                tracing::warn!(ino, error = %e, "cannot release an unlinked file; it goes when its hold lapses");
            }
        });
    }

    /// Renews this mount's orphans every [`ORPHAN_RENEW`], until the mount ends.
    pub fn spawn_orphan_renewals(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        self.rt.spawn(async move {
            loop {
                tokio::time::sleep(ORPHAN_RENEW).await;
                let Some(s) = me.upgrade() else { return };
                let held: Vec<Ino> = lock(&s.orphans).iter().copied().take(MAX_KEEP_OPEN).collect();
                if held.is_empty() {
                    continue;
                }
                let op = MetaOp::HoldOrphans { inos: held, ttl_ms: ORPHAN_TTL_MS };
                if let Err(e) = s.meta.op(op).await {
                    tracing::warn!(error = %e, "cannot renew the hold on unlinked open files");
                }
            }
        });
    }

    /// At unmount: every orphan held here goes.
    pub async fn release_orphans(&self) {
        let held: Vec<Ino> = lock(&self.orphans).drain().take(MAX_KEEP_OPEN).collect();
        if !held.is_empty() {
            let _ = self.meta.op(MetaOp::HoldOrphans { inos: held, ttl_ms: 0 }).await;
        }
    }

    /// `a` as the kernel gets it, remembered for [`Shared::revalidate`].
    fn kernel_attr(&self, a: &Attr) -> fuser::FileAttr {
        if a.kind == FileKind::File {
            insert_bounded(&self.told, MAX_TOLD, a.ino, a.clone());
        }
        file_attr(a)
    }

    /// Whether the kernel was last told exactly `a`: a change the stream
    /// reports that the kernel already has (this mount's own, coming back)
    /// needs no invalidation. Another mount's change of a file's bytes or
    /// attributes changes its ctime or something else here.
    pub(crate) fn kernel_has(&self, a: &Attr) -> bool {
        a.kind == FileKind::File && lock(&self.told).get(&a.ino) == Some(a)
    }

    /// Close-to-open consistency: the change stream tells other mounts'
    /// changes a moment after they commit, so an open just after another
    /// mount's close could still see the old size. An open with no writer
    /// here reads the inode's attributes from the service (a linearizable
    /// read) and, when they are not what the kernel was told, has the
    /// kernel drop its copy before the open returns; the kernel drops the
    /// file's pages at every open anyway.
    async fn revalidate(&self, ino: Ino) -> Result<(), ClientError> {
        let a = self.meta.getattr(ino).await?;
        if a.kind != FileKind::File {
            return Ok(());
        }
        // The layout the file client keeps goes if the file changed since
        // the last open here, whatever the kernel was told: a lookup just
        // before this open may have told it another mount's change before
        // the change stream brought that change (the stream then skips it
        // as known), and reads would go on with a layout from before it (a
        // chunk it allocated read as a hole; fsx through two mounts).
        if lock(&self.opened).get(&ino) != Some(&a) {
            self.files.invalidate(ino);
            insert_bounded(&self.opened, MAX_TOLD, ino, a.clone());
        }
        if self.kernel_has(&a) {
            return Ok(());
        }
        tracing::debug!(ino, size = a.size, "attributes changed since the kernel got them; invalidating at open");
        let Some(tx) = self.notices.get() else { return Ok(()) };
        let (done, delivered) = tokio::sync::oneshot::channel();
        let notice = Notice { inval: Inval::Inode { ino, data: false }, done: Some(done) };
        if tx.send(notice).await.is_ok() {
            // Bounded: a notifier stuck on a page lock must not hang opens.
            let _ = tokio::time::timeout(OPEN_INVAL_TIMEOUT, delivered).await;
        }
        lock(&self.told).remove(&ino);
        Ok(())
    }

    /// The remembered capability of `ino`, if fresh: `Some(None)` = absent.
    fn cached_cap(&self, ino: Ino) -> Option<Option<Vec<u8>>> {
        let caps = lock(&self.caps);
        caps.get(&ino).filter(|(_, at)| at.elapsed() < TTL).map(|(v, _)| v.clone())
    }

    fn remember_cap(&self, ino: Ino, value: Option<Vec<u8>>) {
        insert_bounded(&self.caps, MAX_CACHED_CAPS, ino, (value, Instant::now()));
    }

    /// Forgets what is cached of `ino`'s extended attributes (it changed,
    /// here or on another mount).
    pub(crate) fn forget_xattrs(&self, ino: Ino) {
        lock(&self.caps).remove(&ino);
    }

    /// Remembers that directory `ino` lives in `parent`.
    pub(crate) fn note_parent(&self, ino: Ino, parent: Ino) {
        insert_bounded(&self.parents, MAX_DIR_PARENTS, ino, parent);
    }

    fn parent_of(&self, ino: Ino) -> Ino {
        if ino == ROOT_INO {
            return ROOT_INO;
        }
        lock(&self.parents).get(&ino).copied().unwrap_or(ino)
    }

    /// Waits until no request is being served, or the deadline passes.
    /// Returns whether it got idle.
    pub async fn wait_idle(&self, deadline: Instant) -> bool {
        while self.inflight.load(Ordering::Acquire) > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(IDLE_POLL).await;
        }
        true
    }

    /// Flushes every file with buffered data; returns how many failed.
    pub async fn flush_dirty(&self) -> usize {
        let dirty = self.files.dirty_files();
        let flushes = dirty.iter().map(|&ino| async move { (ino, self.files.fsync(ino).await) });
        let mut failed = 0;
        for (ino, r) in join_all(flushes).await {
            if let Err(e) = r {
                tracing::error!(ino, error = %e, "flushing at unmount failed; data written to this file may be lost");
                failed += 1;
            }
        }
        failed
    }

    /// Attributes as the kernel should see them: a file with writers here
    /// may have buffered data beyond the service's size.
    fn has_writers(&self, ino: Ino) -> bool {
        lock(&self.writers).contains_key(&ino)
    }

    async fn local_view(&self, mut a: Attr) -> Attr {
        if a.kind == FileKind::File && self.has_writers(a.ino) {
            if let Ok(size) = self.files.size(a.ino).await {
                a.size = a.size.max(size);
            }
        }
        a
    }

    fn add_handle(&self, ino: Ino, flags: i32) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let writable = OpenFlags(flags).acc_mode() != OpenAccMode::O_RDONLY;
        let sync = flags & (libc::O_SYNC | libc::O_DSYNC) != 0;
        lock(&self.open).insert(fh, OpenFile { ino, writable, sync });
        if writable {
            *lock(&self.writers).entry(ino).or_default() += 1;
        }
        fh
    }

    fn handle(&self, fh: u64) -> Option<(Ino, bool, bool)> {
        lock(&self.open).get(&fh).map(|f| (f.ino, f.writable, f.sync))
    }

    fn drop_writer(&self, ino: Ino) {
        let mut w = lock(&self.writers);
        if let Some(n) = w.get_mut(&ino) {
            *n -= 1;
            if *n == 0 {
                w.remove(&ino);
            }
        }
    }
}

/// Logs a failed request at a level fitting its cause; returns its errno.
fn fail(op: &'static str, ino: Ino, e: &ClientError) -> Errno {
    if is_expected(e) {
        tracing::debug!(op, ino, error = %e, "request failed");
    } else {
        tracing::warn!(op, ino, error = %e, "request failed");
    }
    errno(e)
}

fn unexpected(op: &'static str, reply: &ReadReply) -> Errno {
    tracing::warn!(op, ?reply, "unexpected reply");
    errno_of(libc::EIO)
}

/// The filesystem the FUSE session runs.
pub struct LocusFs {
    shared: Arc<Shared>,
}

impl LocusFs {
    pub fn new(shared: Arc<Shared>) -> Self {
        LocusFs { shared }
    }

    /// Serves one request on the runtime; `f` gets the shared state.
    fn spawn<F, Fut>(&self, f: F)
    where
        F: FnOnce(Arc<Shared>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let s = self.shared.clone();
        s.inflight.fetch_add(1, Ordering::AcqRel);
        let fut = f(s.clone());
        self.shared.rt.spawn(async move {
            fut.await;
            s.inflight.fetch_sub(1, Ordering::AcqRel);
        });
    }

    fn entry_op(&self, op_name: &'static str, parent: Ino, op: MetaOp, reply: ReplyEntry) {
        self.spawn(move |s| async move {
            match s.meta.op_attr(op).await {
                Ok(a) => {
                    if a.kind == FileKind::Dir {
                        s.note_parent(a.ino, parent);
                    }
                    reply.entry(&TTL, &s.kernel_attr(&a), Generation(a.generation))
                }
                Err(e) => reply.error(fail(op_name, parent, &e)),
            }
        });
    }

    /// [`Self::empty_op`] for an unlink or a rename: files open here
    /// that lose their last name are kept ([`Shared::removing`]).
    fn removing_op(&self, op_name: &'static str, ino: Ino, op: MetaOp, reply: ReplyEmpty) {
        self.spawn(move |s| async move {
            match s.removing(op).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(fail(op_name, ino, &e)),
            }
        });
    }

    fn empty_op(&self, op_name: &'static str, ino: Ino, op: MetaOp, reply: ReplyEmpty) {
        self.spawn(move |s| async move {
            match s.meta.op(op).await {
                Ok(_) => reply.ok(),
                Err(e) => reply.error(fail(op_name, ino, &e)),
            }
        });
    }
}

fn caller(req: &Request) -> Caller {
    Caller { uid: req.uid(), gid: req.gid() }
}

fn name_of(name: &OsStr) -> Vec<u8> {
    name.as_bytes().to_vec()
}

/// `mode` with the umask applied. The kernel applies it already unless it
/// was asked not to (FUSE_DONT_MASK); applying it twice changes nothing.
fn masked(mode: u32, umask: u32) -> u32 {
    mode & 0o7777 & !umask
}

impl Filesystem for LocusFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(max) = config.set_max_write(MAX_WRITE_BYTES) {
            let _ = config.set_max_write(max);
        }
        if let Err(max) = config.set_max_readahead(MAX_READAHEAD_BYTES) {
            let _ = config.set_max_readahead(max);
        }
        let _ = config.set_max_background(MAX_BACKGROUND);
        let _ = config.set_congestion_threshold(MAX_BACKGROUND * 3 / 4);
        // Wanted if the kernel has them; none is required. Not
        // FUSE_WRITEBACK_CACHE: the file client buffers, and the kernel
        // stays write-through so other mounts see data at close. (Tried:
        // with it the kernel trusts its own size and mtime of every regular
        // file it has cached, dirty or not, so a mount never saw another
        // mount's rewrite of a file it had read.)
        for cap in [
            InitFlags::FUSE_ASYNC_READ,
            InitFlags::FUSE_BIG_WRITES,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_AUTO_INVAL_DATA,
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
        ] {
            if let Err(missing) = config.add_capabilities(cap) {
                tracing::debug!(?missing, "kernel lacks a FUSE capability");
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = name_of(name);
        self.spawn(move |s| async move {
            match s.meta.lookup(parent.0, &name).await {
                Ok(a) => {
                    if a.kind == FileKind::Dir {
                        s.note_parent(a.ino, parent.0);
                    }
                    let a = s.local_view(a).await;
                    reply.entry(&TTL, &s.kernel_attr(&a), Generation(a.generation))
                }
                Err(e) => reply.error(fail("lookup", parent.0, &e)),
            }
        });
    }

    fn forget(&self, _req: &Request, _ino: INodeNo, _nlookup: u64) {
        // Nothing is kept per looked-up inode (see the module docs); the
        // file client bounds its own cache.
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.spawn(move |s| async move {
            match s.meta.getattr(ino.0).await {
                Ok(a) => {
                    let a = s.local_view(a).await;
                    reply.attr(&TTL, &s.kernel_attr(&a))
                }
                Err(e) => reply.error(fail("getattr", ino.0, &e)),
            }
        });
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let ino = ino.0;
        let set = SetAttr {
            mode: mode.map(|m| m & 0o7777),
            uid,
            gid,
            size: None,
            atime: atime.map(set_time),
            mtime: mtime.map(set_time),
            ctime: ctime.map(timespec),
        };
        self.spawn(move |s| async move {
            // Buffered writes go first: sending them later would stamp a
            // new mtime over the one set here (cp -a, tar, rsync).
            if s.has_writers(ino) {
                if let Err(e) = s.files.flush(ino).await {
                    return reply.error(fail("setattr", ino, &e));
                }
            }
            let mut attr = None;
            if let Some(size) = size {
                // Through the file client: it flushes buffered writes first
                // and zeroes what an extension uncovers.
                match s.files.truncate(ino, size).await {
                    Ok(a) => attr = Some(a),
                    Err(e) => return reply.error(fail("truncate", ino, &e)),
                }
            }
            if set != SetAttr::default() {
                match s.meta.op_attr(MetaOp::SetAttr { ino, set }).await {
                    Ok(a) => attr = Some(a),
                    Err(e) => return reply.error(fail("setattr", ino, &e)),
                }
            }
            let a = match attr {
                Some(a) => a,
                None => match s.meta.getattr(ino).await {
                    Ok(a) => a,
                    Err(e) => return reply.error(fail("setattr", ino, &e)),
                },
            };
            let a = s.local_view(a).await;
            reply.attr(&TTL, &s.kernel_attr(&a))
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.spawn(move |s| async move {
            match s.meta.read(MetaRead::Readlink { ino: ino.0 }).await {
                Ok(ReadReply::Link(target)) => reply.data(&target),
                Ok(other) => reply.error(unexpected("readlink", &other)),
                Err(e) => reply.error(fail("readlink", ino.0, &e)),
            }
        });
    }

    fn mknod(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, rdev: u32, reply: ReplyEntry) {
        let (name, caller, perm) = (name_of(name), caller(req), masked(mode, umask));
        let op = match FileKind::from_mode(mode) {
            Some(FileKind::File) => MetaOp::Create { parent: parent.0, name, perm, caller, exclusive: true },
            Some(_) => MetaOp::Mknod { parent: parent.0, name, mode: (mode & 0o170000) | perm, rdev, caller },
            None => return reply.error(Errno::EINVAL),
        };
        self.entry_op("mknod", parent.0, op, reply);
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let op =
            MetaOp::Mkdir { parent: parent.0, name: name_of(name), perm: masked(mode, umask), caller: caller(req) };
        self.entry_op("mkdir", parent.0, op, reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.removing_op("unlink", parent.0, MetaOp::Unlink { parent: parent.0, name: name_of(name) }, reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.empty_op("rmdir", parent.0, MetaOp::Rmdir { parent: parent.0, name: name_of(name) }, reply);
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let op = MetaOp::Symlink {
            parent: parent.0,
            name: name_of(link_name),
            target: target.as_os_str().as_bytes().to_vec(),
            caller: caller(req),
        };
        self.entry_op("symlink", parent.0, op, reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let known = RenameFlags::RENAME_NOREPLACE | RenameFlags::RENAME_EXCHANGE;
        if !known.contains(flags) {
            // RENAME_WHITEOUT: only for overlay filesystems.
            return reply.error(Errno::EINVAL);
        }
        let mut wire = 0;
        if flags.contains(RenameFlags::RENAME_NOREPLACE) {
            wire |= RENAME_NOREPLACE;
        }
        if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            wire |= RENAME_EXCHANGE;
        }
        let op = MetaOp::Rename {
            parent: parent.0,
            name: name_of(name),
            new_parent: newparent.0,
            new_name: name_of(newname),
            flags: wire,
        };
        self.removing_op("rename", parent.0, op, reply);
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        let op = MetaOp::Link { ino: ino.0, new_parent: newparent.0, new_name: name_of(newname) };
        self.entry_op("link", newparent.0, op, reply);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        // No FOPEN_KEEP_CACHE: the kernel drops its page cache of the file
        // at every open, so an open sees what other mounts wrote and closed.
        // A writer here knows better than the service (it may have
        // buffered data): nothing to check.
        if self.shared.has_writers(ino.0) {
            let fh = self.shared.add_handle(ino.0, flags.0);
            return reply.opened(FileHandle(fh), FopenFlags::empty());
        }
        self.spawn(move |s| async move {
            match s.revalidate(ino.0).await {
                Ok(()) => {}
                // Removed meanwhile (another mount's unlink, not yet seen).
                Err(e) if e.code() == ErrorCode::NotFound => return reply.error(fail("open", ino.0, &e)),
                // The service is unreachable: open on what the kernel has
                // (the change stream catches up later), rather than fail.
                Err(e) => tracing::warn!(ino = ino.0, error = %e, "cannot check attributes at open"),
            }
            let fh = s.add_handle(ino.0, flags.0);
            reply.opened(FileHandle(fh), FopenFlags::empty())
        });
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.spawn(move |s| async move {
            match s.files.read(ino.0, offset, u64::from(size)).await {
                Ok(data) => reply.data(&data),
                Err(e) => reply.error(fail("read", ino.0, &e)),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let len = data.len() as u32;
        let data = Bytes::copy_from_slice(data);
        let sync = self.shared.handle(fh.0).map(|(_, _, sync)| sync).unwrap_or(false)
            || flags.0 & (libc::O_SYNC | libc::O_DSYNC) != 0;
        self.spawn(move |s| async move {
            if let Err(e) = s.files.write(ino.0, offset, data).await {
                return reply.error(fail("write", ino.0, &e));
            }
            if sync {
                if let Err(e) = s.files.fsync(ino.0).await {
                    return reply.error(fail("write", ino.0, &e));
                }
            }
            reply.written(len)
        });
    }

    fn flush(&self, _req: &Request, ino: INodeNo, fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        // Called at every close(): send what this handle buffered so the
        // close reports write errors and other mounts see the data.
        if !self.shared.handle(fh.0).is_some_and(|(_, writable, _)| writable) {
            return reply.ok();
        }
        self.spawn(move |s| async move {
            match s.files.flush(ino.0).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(fail("flush", ino.0, &e)),
            }
        });
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let Some(f) = lock(&self.shared.open).remove(&fh.0) else { return reply.ok() };
        if !f.writable {
            self.shared.release_orphan_if_closed(f.ino);
            return reply.ok();
        }
        self.spawn(move |s| async move {
            // A writable mapping may have written since the last flush.
            let r = s.files.flush(f.ino).await;
            // Only now: until the data is sent, the local size is the true one.
            s.drop_writer(f.ino);
            s.release_orphan_if_closed(f.ino);
            match r {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(fail("release", ino.0, &e)),
            }
        });
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        self.spawn(move |s| async move {
            match s.files.fsync(ino.0).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(fail("fsync", ino.0, &e)),
            }
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let s = &self.shared;
        let fh = s.next_fh.fetch_add(1, Ordering::Relaxed);
        let stream = DirStream::new(ino.0, s.parent_of(ino.0));
        lock(&s.dirs).insert(fh, Arc::new(tokio::sync::Mutex::new(stream)));
        reply.opened(FileHandle(fh), FopenFlags::empty());
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let Some(stream) = lock(&self.shared.dirs).get(&fh.0).cloned() else { return reply.error(Errno::EBADF) };
        self.spawn(move |s| async move {
            let mut st = stream.lock().await;
            if offset == 0 {
                st.reset();
            }
            let mut pos = offset;
            let mut added = 0usize;
            loop {
                let full = match st.at(pos) {
                    Slot::Dot => reply.add(INodeNo(st.ino), pos + 1, fuser::FileType::Directory, "."),
                    Slot::DotDot => reply.add(INodeNo(st.parent), pos + 1, fuser::FileType::Directory, ".."),
                    Slot::Entry(e) => {
                        if e.kind == FileKind::Dir {
                            s.note_parent(e.ino, ino.0);
                        }
                        reply.add(INodeNo(e.ino), pos + 1, file_type(e.kind), OsStr::from_bytes(&e.name))
                    }
                    Slot::NeedMore => {
                        if let Err(err) = fetch_page(&s, &mut st).await {
                            if added == 0 {
                                return reply.error(err);
                            }
                            break;
                        }
                        continue;
                    }
                    Slot::End => break,
                    Slot::Gone => return reply.error(Errno::EINVAL),
                };
                if full {
                    break;
                }
                added += 1;
                pos += 1;
            }
            reply.ok()
        });
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        let Some(stream) = lock(&self.shared.dirs).get(&fh.0).cloned() else { return reply.error(Errno::EBADF) };
        self.spawn(move |s| async move {
            let mut st = stream.lock().await;
            if offset == 0 {
                st.reset();
            }
            let mut pos = offset;
            let mut added = 0usize;
            // `.` and `..` carry the directory's own attributes: the kernel
            // makes no entries for them.
            let mut dir_attr: Option<Attr> = None;
            'outer: loop {
                // Collect a batch of positions, fetching pages as needed.
                let mut batch: Vec<(u64, Option<DirEntry>)> = Vec::new();
                let mut end = false;
                while batch.len() < READDIRPLUS_BATCH {
                    match st.at(pos + batch.len() as u64) {
                        Slot::Dot | Slot::DotDot => batch.push((pos + batch.len() as u64, None)),
                        Slot::Entry(e) => batch.push((pos + batch.len() as u64, Some(e.clone()))),
                        Slot::NeedMore => {
                            if let Err(err) = fetch_page(&s, &mut st).await {
                                if added == 0 && batch.is_empty() {
                                    return reply.error(err);
                                }
                                end = true;
                                break;
                            }
                        }
                        Slot::End => {
                            end = true;
                            break;
                        }
                        Slot::Gone => return reply.error(Errno::EINVAL),
                    }
                }
                if batch.iter().any(|(_, e)| e.is_none()) && dir_attr.is_none() {
                    match s.meta.getattr(st.ino).await {
                        Ok(a) => dir_attr = Some(a),
                        Err(e) => return reply.error(fail("readdirplus", st.ino, &e)),
                    }
                }
                let attrs = join_all(batch.iter().map(|(_, e)| {
                    let s = s.clone();
                    let ino = e.as_ref().map(|e| e.ino);
                    async move {
                        match ino {
                            Some(ino) => Some(match s.meta.getattr(ino).await {
                                Ok(a) => Ok(s.local_view(a).await),
                                Err(e) => Err(e),
                            }),
                            None => None,
                        }
                    }
                }))
                .await;
                for ((p, e), a) in batch.into_iter().zip(attrs) {
                    let full = match (e, a) {
                        (None, _) => {
                            let Some(d) = dir_attr.as_ref() else { break 'outer };
                            let (name, ino) = if p == 0 { (".", st.ino) } else { ("..", st.parent) };
                            let mut fa = file_attr(d);
                            fa.ino = INodeNo(ino);
                            reply.add(INodeNo(ino), p + 1, name, &TTL, &fa, Generation(d.generation))
                        }
                        (Some(e), Some(Ok(a))) => {
                            if a.kind == FileKind::Dir {
                                s.note_parent(a.ino, ino.0);
                            }
                            reply.add(
                                INodeNo(e.ino),
                                p + 1,
                                OsStr::from_bytes(&e.name),
                                &TTL,
                                &s.kernel_attr(&a),
                                Generation(a.generation),
                            )
                        }
                        // Removed since it was listed: skip it.
                        (Some(_), Some(Err(err))) if err.code() == ErrorCode::NotFound => false,
                        (Some(_), Some(Err(err))) => {
                            if added == 0 {
                                return reply.error(fail("readdirplus", ino.0, &err));
                            }
                            break 'outer;
                        }
                        (Some(_), None) => break 'outer,
                    };
                    if full {
                        break 'outer;
                    }
                    added += 1;
                    pos = p + 1;
                }
                if end {
                    break;
                }
            }
            reply.ok()
        });
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        lock(&self.shared.dirs).remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        // Namespace changes are durable (replicated) when they are answered.
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.spawn(move |s| async move {
            match s.meta.read(MetaRead::StatFs).await {
                Ok(ReadReply::StatFs(st)) => {
                    let bsize = if st.block_size == 0 { 4096 } else { st.block_size };
                    let b = u64::from(bsize);
                    reply.statfs(
                        st.total_bytes / b,
                        st.free_bytes / b,
                        st.available_bytes / b,
                        st.total_inodes,
                        st.free_inodes,
                        bsize,
                        st.max_name,
                        bsize,
                    )
                }
                Ok(other) => reply.error(unexpected("statfs", &other)),
                Err(e) => reply.error(fail("statfs", ROOT_INO, &e)),
            }
        });
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let op = MetaOp::SetXattr { ino: ino.0, name: name_of(name), value: value.to_vec(), flags: flags as u32 };
        self.shared.forget_xattrs(ino.0);
        self.empty_op("setxattr", ino.0, op, reply);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let name = name_of(name);
        let is_cap = name == CAPABILITY_XATTR;
        if is_cap {
            match self.shared.cached_cap(ino.0) {
                Some(Some(v)) => return reply_sized(reply, &v, size),
                Some(None) => return reply.error(Errno::NO_XATTR),
                None => {}
            }
        }
        self.spawn(move |s| async move {
            match s.meta.read(MetaRead::GetXattr { ino: ino.0, name }).await {
                Ok(ReadReply::Xattr(v)) => {
                    if is_cap {
                        s.remember_cap(ino.0, Some(v.clone()));
                    }
                    reply_sized(reply, &v, size)
                }
                Ok(other) => reply.error(unexpected("getxattr", &other)),
                Err(e) => {
                    let errno = fail("getxattr", ino.0, &e);
                    if is_cap && errno == Errno::NO_XATTR {
                        s.remember_cap(ino.0, None);
                    }
                    reply.error(errno)
                }
            }
        });
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.spawn(move |s| async move {
            match s.meta.read(MetaRead::ListXattr { ino: ino.0 }).await {
                Ok(ReadReply::XattrNames(names)) => {
                    let mut buf = Vec::new();
                    for n in names {
                        buf.extend_from_slice(&n);
                        buf.push(0);
                    }
                    reply_sized(reply, &buf, size)
                }
                Ok(other) => reply.error(unexpected("listxattr", &other)),
                Err(e) => reply.error(fail("listxattr", ino.0, &e)),
            }
        });
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.shared.forget_xattrs(ino.0);
        self.empty_op("removexattr", ino.0, MetaOp::RemoveXattr { ino: ino.0, name: name_of(name) }, reply);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Mounted with default_permissions: the kernel checks from our
        // attributes and does not ask; answer yes if it ever does.
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let exclusive = flags & libc::O_EXCL != 0;
        let op = MetaOp::Create {
            parent: parent.0,
            name: name_of(name),
            perm: masked(mode, umask),
            caller: caller(req),
            exclusive,
        };
        self.spawn(move |s| async move {
            let mut a = match s.meta.op_attr(op).await {
                Ok(a) => a,
                Err(e) => return reply.error(fail("create", parent.0, &e)),
            };
            // Without O_EXCL another client may have made it first: then
            // this is an open of that file, and O_TRUNC applies.
            if flags & libc::O_TRUNC != 0 && a.size > 0 {
                match s.files.truncate(a.ino, 0).await {
                    Ok(t) => a = t,
                    Err(e) => return reply.error(fail("create", a.ino, &e)),
                }
            }
            if crate::file::is_pristine(&a) {
                // Made just now (or never touched): no extended attributes
                // for the kernel to ask about, and a layout known without
                // asking.
                s.remember_cap(a.ino, None);
                s.files.created(&a).await;
            }
            let fh = s.add_handle(a.ino, flags);
            reply.created(&TTL, &s.kernel_attr(&a), Generation(a.generation), FileHandle(fh), FopenFlags::empty())
        });
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        const ZERO: i32 = libc::FALLOC_FL_ZERO_RANGE;
        const ZERO_KEEP: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        // Space is not reserved ahead (chunks are allocated as they are
        // written): plain allocation is the size part callers rely on. A
        // punched or zeroed range reads as zeros, its blocks freed.
        let (zero, grow) = match mode {
            0 => (false, true),
            libc::FALLOC_FL_KEEP_SIZE => return reply.ok(),
            PUNCH | ZERO_KEEP => (true, false),
            ZERO => (true, true),
            _ => return reply.error(Errno::from_i32(libc::EOPNOTSUPP)),
        };
        let Some(end) = offset.checked_add(length) else { return reply.error(Errno::from_i32(libc::EFBIG)) };
        self.spawn(move |s| async move {
            if zero {
                if let Err(e) = s.files.punch(ino.0, offset, length).await {
                    return reply.error(fail("fallocate", ino.0, &e));
                }
                // The data changed: so do mtime and ctime, as on a local
                // filesystem.
                let set = SetAttr { mtime: Some(set_time(TimeOrNow::Now)), ..Default::default() };
                if let Err(e) = s.meta.op_attr(MetaOp::SetAttr { ino: ino.0, set }).await {
                    return reply.error(fail("fallocate", ino.0, &e));
                }
            }
            if grow {
                let size = match s.files.size(ino.0).await {
                    Ok(n) => n,
                    Err(e) => return reply.error(fail("fallocate", ino.0, &e)),
                };
                if end > size {
                    if let Err(e) = s.files.truncate(ino.0, end).await {
                        return reply.error(fail("fallocate", ino.0, &e));
                    }
                }
            }
            reply.ok()
        });
    }

    fn lseek(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: i64, whence: i32, reply: ReplyLseek) {
        // The kernel asks only for SEEK_DATA and SEEK_HOLE; holes are
        // unallocated chunks (see `crate::sparse`).
        let what = match whence {
            libc::SEEK_DATA => Seek::Data,
            libc::SEEK_HOLE => Seek::Hole,
            _ => return reply.error(Errno::EINVAL),
        };
        let Ok(offset) = u64::try_from(offset) else { return reply.error(Errno::ENXIO) };
        self.spawn(move |s| async move {
            match s.files.seek(ino.0, offset, what).await {
                Ok(Some(at)) => match i64::try_from(at) {
                    Ok(at) => reply.offset(at),
                    Err(_) => reply.error(Errno::EOVERFLOW),
                },
                Ok(None) => reply.error(Errno::ENXIO),
                Err(e) => reply.error(fail("lseek", ino.0, &e)),
            }
        });
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        // The kernel falls back to reads and writes (and stops asking).
        reply.error(Errno::ENOSYS);
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }

    fn poll(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _ph: PollNotifier,
        _events: PollEvents,
        _flags: PollFlags,
        reply: ReplyPoll,
    ) {
        // Regular files are always ready; the kernel stops asking.
        reply.error(Errno::ENOSYS);
    }
}

/// Answers a getxattr/listxattr: the size when asked for it (`size` 0),
/// ERANGE when the caller's buffer is too small.
fn reply_sized(reply: ReplyXattr, value: &[u8], size: u32) {
    if size == 0 {
        reply.size(value.len() as u32)
    } else if value.len() > size as usize {
        reply.error(Errno::ERANGE)
    } else {
        reply.data(value)
    }
}

/// Fetches the next page of a directory stream.
async fn fetch_page(s: &Shared, st: &mut DirStream) -> Result<(), Errno> {
    match s.meta.read(st.next_page()).await {
        Ok(ReadReply::Entries { entries, more }) => {
            st.absorb(entries, more);
            Ok(())
        }
        Ok(other) => Err(unexpected("readdir", &other)),
        Err(e) => Err(fail("readdir", st.ino, &e)),
    }
}
