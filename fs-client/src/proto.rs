//! The wire protocol between clients and Locus servers.
//!
//! Every request travels on its own QUIC bidirectional stream negotiated with
//! ALPN [`CLIENT_ALPN`]: one length-prefixed postcard frame holding an
//! [`Envelope`], answered by one frame holding a [`Response`] (or, for
//! [`Request::Subscribe`], a sequence of [`StreamItem`] frames). Errors carry
//! a stable numeric [`ErrorCode`]; clients branch on the code, never on the
//! message. Enums only ever grow at the end, so older peers keep decoding.

use std::fmt;

use serde::{Deserialize, Serialize};

/// ALPN of client connections. Bump on an incompatible change.
pub const CLIENT_ALPN: &[u8] = b"locus/1";
/// The protocol revision inside [`CLIENT_ALPN`].
pub const PROTOCOL_VERSION: u16 = 1;

/// Inode number. The root directory is [`ROOT_INO`].
pub type Ino = u64;
pub const ROOT_INO: Ino = 1;

/// Longest file name, in bytes.
pub const MAX_NAME_BYTES: usize = 255;
/// Longest symlink target, in bytes (PATH_MAX).
pub const MAX_SYMLINK_BYTES: usize = 4095;
/// Longest path resolved by the server.
pub const MAX_PATH_BYTES: usize = 4095;
/// Longest xattr name and value.
pub const MAX_XATTR_NAME_BYTES: usize = 255;
pub const MAX_XATTR_VALUE_BYTES: usize = 65_536;
/// Most xattrs on one inode.
pub const MAX_XATTRS_PER_INODE: usize = 1024;
/// Most hard links to one inode.
pub const MAX_LINKS: u32 = 65_000;
/// Most entries one readdir page returns.
pub const MAX_READDIR_PAGE: u32 = 4096;
/// Most symlinks followed while resolving one path.
pub const MAX_SYMLINK_FOLLOWS: u32 = 40;

/// rename(2) flags.
pub const RENAME_NOREPLACE: u32 = 1;
pub const RENAME_EXCHANGE: u32 = 2;
/// setxattr(2) flags.
pub const XATTR_CREATE: u32 = 1;
pub const XATTR_REPLACE: u32 = 2;

/// Seconds and nanoseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Timespec {
    pub secs: i64,
    pub nanos: u32,
}

impl Timespec {
    pub fn from_nanos(n: i128) -> Self {
        Timespec { secs: n.div_euclid(1_000_000_000) as i64, nanos: n.rem_euclid(1_000_000_000) as u32 }
    }
    pub fn as_nanos(&self) -> i128 {
        self.secs as i128 * 1_000_000_000 + self.nanos as i128
    }
    pub fn now() -> Self {
        let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        Timespec { secs: d.as_secs() as i64, nanos: d.subsec_nanos() }
    }
}

/// The type of an inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

impl FileKind {
    /// The `S_IFMT` bits of this kind.
    pub fn mode_bits(self) -> u32 {
        match self {
            FileKind::File => 0o100000,
            FileKind::Dir => 0o040000,
            FileKind::Symlink => 0o120000,
            FileKind::Fifo => 0o010000,
            FileKind::Socket => 0o140000,
            FileKind::CharDevice => 0o020000,
            FileKind::BlockDevice => 0o060000,
        }
    }

    /// The kind named by the `S_IFMT` bits of `mode`.
    pub fn from_mode(mode: u32) -> Option<FileKind> {
        Some(match mode & 0o170000 {
            0o100000 | 0 => FileKind::File,
            0o040000 => FileKind::Dir,
            0o120000 => FileKind::Symlink,
            0o010000 => FileKind::Fifo,
            0o140000 => FileKind::Socket,
            0o020000 => FileKind::CharDevice,
            0o060000 => FileKind::BlockDevice,
            _ => return None,
        })
    }

    pub fn letter(self) -> char {
        match self {
            FileKind::File => '-',
            FileKind::Dir => 'd',
            FileKind::Symlink => 'l',
            FileKind::Fifo => 'p',
            FileKind::Socket => 's',
            FileKind::CharDevice => 'c',
            FileKind::BlockDevice => 'b',
        }
    }
}

/// The attributes of an inode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attr {
    pub ino: Ino,
    pub kind: FileKind,
    /// Permission bits, including setuid, setgid and sticky (`mode & 0o7777`).
    pub perm: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// Space the file's data takes, in 512-byte units (`st_blocks`), kept
    /// by the metadata service at chunk granularity: each chunk allocated
    /// counts whole, up to the end of the file; holes count nothing. 0 for
    /// other kinds.
    pub blocks: u64,
    pub atime: Timespec,
    pub mtime: Timespec,
    pub ctime: Timespec,
    pub crtime: Timespec,
    pub rdev: u32,
    /// Bumped when an inode number is reused; lets NFS-style handles detect staleness.
    pub generation: u64,
}

impl Attr {
    /// `st_mode`: type and permission bits.
    pub fn mode(&self) -> u32 {
        self.kind.mode_bits() | (self.perm & 0o7777)
    }
}

/// A time to set: an explicit value or the server's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SetTime {
    Now,
    At(Timespec),
}

/// Which attributes a setattr changes; `None` leaves one alone.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetAttr {
    /// Permission bits (`mode & 0o7777`); the type bits are ignored.
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
    /// Set ctime explicitly (restore tools); otherwise any change sets it to now.
    pub ctime: Option<Timespec>,
}

/// A directory entry as readdir returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub ino: Ino,
    pub kind: FileKind,
}

/// Who asks: the identity new inodes are owned by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

impl Caller {
    pub const ROOT: Caller = Caller { uid: 0, gid: 0 };
}

/// A chunk of file data, as the metadata service names it.
pub type ChunkId = u64;
/// A registered chunk server.
pub type ServerId = u64;

/// The chunk size of a cluster made without `--chunk-size`.
pub const DEFAULT_CHUNK_BYTES: u64 = 64 << 20;
/// Checksum block size inside chunks, for clusters made now: the page and
/// filesystem block size, so a 4 KiB write (a VM's usual) replaces whole
/// blocks, with no read-modify-write and one 4 KiB hash per replica. With
/// 16 KiB blocks each such write re-read, re-hashed and rewrote 16 KiB on
/// every replica: NBD 4 KiB random writes at QD16 went from 23,700 to
/// 35,500 IOPS, random reads and writes through FUSE rose too, and
/// sequential throughput stayed the same (blake3 is slower per byte on
/// 4 KiB inputs, but hashing is a small part of it).
pub const DEFAULT_BLOCK_BYTES: u64 = 4 << 10;
/// Checksum block size of clusters made before the block size was recorded
/// in the metadata: their chunk files keep it.
pub const LEGACY_BLOCK_BYTES: u64 = 64 << 10;
/// Most chunks one layout request covers.
pub const MAX_LAYOUT_CHUNKS: u64 = 1024;

pub use placement::{Level, Topology};

/// How many copies a file's chunks keep, and in distinct domains of which level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Goal {
    pub copies: u8,
    /// `Host`, `Rack` or `Zone`.
    pub level: Level,
}

impl Goal {
    pub const DEFAULT: Goal = Goal { copies: 3, level: Level::Host };
    /// Most copies a goal may ask for.
    pub const MAX_COPIES: u8 = 16;

    pub fn validate(&self) -> Result<(), WireError> {
        if self.copies == 0 || self.copies > Self::MAX_COPIES {
            return Err(WireError::new(
                ErrorCode::Invalid,
                format!("goal copies must be 1..={}, not {}", Self::MAX_COPIES, self.copies),
            ));
        }
        if self.level == Level::Any {
            return Err(WireError::new(ErrorCode::Invalid, "goal level must be host, rack or zone"));
        }
        Ok(())
    }
}

impl std::fmt::Display for Goal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} copies, distinct {}s", self.copies, self.level)
    }
}

/// Limits of a directory quota; `None` means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaLimits {
    pub max_bytes: Option<u64>,
    pub max_inodes: Option<u64>,
}

/// A directory quota with what is used under it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaUsage {
    pub limits: QuotaLimits,
    pub used_bytes: u64,
    pub used_inodes: u64,
}

/// One replica of a chunk: which server, where to reach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaInfo {
    pub server: ServerId,
    pub addr: String,
    pub topology: Topology,
}

/// Where chunk `index` of a file lives. The first replica is the head of
/// the write chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkLocation {
    pub index: u64,
    pub chunk: ChunkId,
    pub version: u64,
    pub replicas: Vec<ReplicaInfo>,
    /// Other files (clones, snapshots) share this chunk: a writer first
    /// asks for its own copy ([`MetaOp::CowChunk`]).
    pub shared: bool,
    /// A copy-on-write chunk not written yet: its content is this chunk at
    /// this version, which each replica server holds next to it. Writes
    /// carry it (the server copies locally first); a read that finds no
    /// replica of `chunk` reads the origin instead.
    pub origin: Option<(ChunkId, u64)>,
}

/// A file's size and the chunks of a range of it (absent indexes are holes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    pub attr: Attr,
    pub chunk_bytes: u64,
    pub chunks: Vec<ChunkLocation>,
    /// The file is part of a snapshot: clients must not write its chunks
    /// (the chunk servers do not know; the metadata refuses the rest).
    pub read_only: bool,
    /// A client's write lease on the file (see [`MetaOp::Lease`]), as
    /// stored: it binds until `expires`.
    pub lease: Option<Lease>,
}

/// An exclusive write lease on a file: until `expires` (the leader's
/// clock) only `holder` may write it. The metadata service refuses other
/// clients' size and allocation changes; clients check it before they
/// write chunks, and taking a lease raises every chunk's version so a
/// writer holding an older layout is refused and learns of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The holder's client id (as in its [`RequestId`]s).
    pub holder: u128,
    pub expires: Timespec,
}

impl Lease {
    /// Whether it forbids `client` to write at `now`.
    pub fn excludes(&self, client: u128, now: Timespec) -> bool {
        self.holder != client && self.expires > now
    }
}

/// Longest lease one [`MetaOp::Lease`] grants.
pub const MAX_LEASE_TTL_MS: u64 = 120_000;

/// Namespace changes. Each goes through Raft; the leader stamps the time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaOp {
    Mkdir {
        parent: Ino,
        name: Vec<u8>,
        perm: u32,
        caller: Caller,
    },
    /// Creates a regular file. With `exclusive` false an existing regular
    /// file is returned as it is (open with O_CREAT, without O_EXCL).
    Create {
        parent: Ino,
        name: Vec<u8>,
        perm: u32,
        caller: Caller,
        exclusive: bool,
    },
    /// Creates a FIFO, socket or device node (`mode` carries the type bits).
    Mknod {
        parent: Ino,
        name: Vec<u8>,
        mode: u32,
        rdev: u32,
        caller: Caller,
    },
    Symlink {
        parent: Ino,
        name: Vec<u8>,
        target: Vec<u8>,
        caller: Caller,
    },
    Link {
        ino: Ino,
        new_parent: Ino,
        new_name: Vec<u8>,
    },
    Unlink {
        parent: Ino,
        name: Vec<u8>,
    },
    Rmdir {
        parent: Ino,
        name: Vec<u8>,
    },
    Rename {
        parent: Ino,
        name: Vec<u8>,
        new_parent: Ino,
        new_name: Vec<u8>,
        flags: u32,
    },
    SetAttr {
        ino: Ino,
        set: SetAttr,
    },
    SetXattr {
        ino: Ino,
        name: Vec<u8>,
        value: Vec<u8>,
        flags: u32,
    },
    RemoveXattr {
        ino: Ino,
        name: Vec<u8>,
    },
    /// Makes chunks exist for `[offset, offset + len)` of a regular file and
    /// returns their locations. Checks the quota for the size the file
    /// would have; does not change the size (see `ExtendSize`), unless
    /// `extend` and the file is empty and gets all its chunks in this
    /// operation: then the size becomes `offset + len` (and mtime now), and
    /// the writer needs no `ExtendSize` after its data. Nothing old can
    /// show through (new chunks read as zeros until written), so a small
    /// file's first write costs two commits, not three.
    PrepareWrite {
        ino: Ino,
        offset: u64,
        len: u64,
        extend: bool,
    },
    /// Raises the size to `size` if it is smaller (quota-checked); sets mtime.
    ExtendSize {
        ino: Ino,
        size: u64,
    },
    /// A replica failed a write: drop it from the chunk and raise the
    /// chunk's version so the dropped copy is never served again.
    ReplicaFailed {
        ino: Ino,
        index: u64,
        chunk: ChunkId,
        version: u64,
        server: ServerId,
    },
    /// Sets the replication goal of one inode (directories pass it on to
    /// what is created in them; files apply it to their chunks).
    SetGoal {
        ino: Ino,
        goal: Goal,
    },
    /// Sets or clears (`limits` all `None`) a directory's quota.
    SetQuota {
        ino: Ino,
        limits: QuotaLimits,
    },
    /// Copies inode `src` (a whole directory tree, at most
    /// [`MAX_CLONE_INODES`] inodes and [`MAX_CLONE_CHUNKS`] chunks) to
    /// `name` in `parent`, sharing every chunk (copy-on-write). Copies keep
    /// the source's attributes and xattrs (not its quotas). With
    /// `snapshot` the copy is read-only (every change gets `ReadOnly`).
    /// Every shared chunk's version is raised; the caller pushes the new
    /// versions to the replicas ([`CloneReply::fences`]) so writers holding
    /// an older layout are refused and learn the chunk is shared.
    Clone {
        src: Ino,
        parent: Ino,
        name: Vec<u8>,
        snapshot: bool,
    },
    /// Gives chunk `index` of file `ino` its own copy before a write, if
    /// it is still `chunk` and shared: a new chunk on the same servers whose
    /// `origin` is the old one. Replies with the chunk's location.
    CowChunk {
        ino: Ino,
        index: u64,
        chunk: ChunkId,
    },
    /// A copy-on-write chunk has been written on every replica: forget its
    /// origin and release the origin's reference.
    CowDone {
        chunk: ChunkId,
    },
    /// Removes the read-only tree (a snapshot) `name` in `parent`, which
    /// unlink and rmdir cannot empty.
    DropSnapshot {
        parent: Ino,
        name: Vec<u8>,
    },
    /// Takes, renews (`ttl_ms` > 0, at most [`MAX_LEASE_TTL_MS`]) or
    /// releases (`ttl_ms` = 0) the calling client's write [`Lease`] on a
    /// regular file. Refused (`Busy`) while another client's lease binds.
    /// A lease taken afresh raises the version of every chunk of the file;
    /// the caller pushes the fences ([`LeaseReply::fences`]) before it
    /// writes or trusts anything it caches.
    Lease {
        ino: Ino,
        ttl_ms: u64,
    },
    /// `op` (an `Unlink` or a `Rename`), except that a regular file in
    /// `open` (files the caller has open, at most [`MAX_KEEP_OPEN`]) whose
    /// last link `op` removes is kept, with no name and `nlink` 0, as an
    /// orphan the caller holds for `ttl_ms` (at most [`MAX_LEASE_TTL_MS`]):
    /// it can still be read and written by inode, as POSIX wants of an open
    /// file. Replies [`OpReply::Orphans`] with the files kept.
    KeepOpen {
        open: Vec<Ino>,
        ttl_ms: u64,
        op: Box<MetaOp>,
    },
    /// Renews (`ttl_ms` > 0) the caller's hold on orphans, or releases it
    /// (`ttl_ms` = 0): a released orphan is removed. Orphans held by
    /// others, or gone, are left alone. At most [`MAX_KEEP_OPEN`].
    HoldOrphans {
        inos: Vec<Ino>,
        ttl_ms: u64,
    },
}

/// Most open files one [`MetaOp::KeepOpen`] or [`MetaOp::HoldOrphans`] names.
pub const MAX_KEEP_OPEN: usize = 4096;

impl MetaOp {
    pub fn name(&self) -> &'static str {
        match self {
            MetaOp::Mkdir { .. } => "mkdir",
            MetaOp::Create { .. } => "create",
            MetaOp::Mknod { .. } => "mknod",
            MetaOp::Symlink { .. } => "symlink",
            MetaOp::Link { .. } => "link",
            MetaOp::Unlink { .. } => "unlink",
            MetaOp::Rmdir { .. } => "rmdir",
            MetaOp::Rename { .. } => "rename",
            MetaOp::SetAttr { .. } => "setattr",
            MetaOp::SetXattr { .. } => "setxattr",
            MetaOp::RemoveXattr { .. } => "removexattr",
            MetaOp::PrepareWrite { .. } => "prepare_write",
            MetaOp::ExtendSize { .. } => "extend_size",
            MetaOp::ReplicaFailed { .. } => "replica_failed",
            MetaOp::SetGoal { .. } => "set_goal",
            MetaOp::SetQuota { .. } => "set_quota",
            MetaOp::Clone { snapshot: false, .. } => "clone",
            MetaOp::Clone { snapshot: true, .. } => "snapshot",
            MetaOp::CowChunk { .. } => "cow_chunk",
            MetaOp::CowDone { .. } => "cow_done",
            MetaOp::DropSnapshot { .. } => "drop_snapshot",
            MetaOp::Lease { ttl_ms: 0, .. } => "release_lease",
            MetaOp::Lease { .. } => "lease",
            MetaOp::KeepOpen { op, .. } => op.name(),
            MetaOp::HoldOrphans { .. } => "hold_orphans",
        }
    }
}

/// What a [`MetaOp`] returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpReply {
    /// The attributes of the created or changed inode.
    Attr(Attr),
    Done,
    Layout(Layout),
    Cloned(CloneReply),
    Leased(LeaseReply),
    /// The open files [`MetaOp::KeepOpen`] kept as orphans.
    Orphans(Vec<Ino>),
}

/// What [`MetaOp::Lease`] returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseReply {
    /// The lease now (`None` after a release).
    pub lease: Option<Lease>,
    /// Version raises to push (only when the lease was taken afresh).
    pub fences: Vec<ChunkFence>,
    /// Addresses of the servers the fences name.
    pub servers: Vec<(ServerId, String)>,
}

/// Most inodes one [`MetaOp::Clone`] (or [`MetaOp::DropSnapshot`]) covers.
pub const MAX_CLONE_INODES: u64 = 100_000;
/// Most chunk references one [`MetaOp::Clone`] copies (16 TiB of 64 MiB chunks).
pub const MAX_CLONE_CHUNKS: u64 = 262_144;

/// A chunk whose version a clone raised: every replica must move from
/// `from` to `to`, the write-chain head (`replicas[0]`) first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkFence {
    pub chunk: ChunkId,
    pub from: u64,
    pub to: u64,
    pub replicas: Vec<ServerId>,
    /// Set for a copy-on-write chunk not known to be written yet: a
    /// replica lacking it makes it from this origin (so that what the
    /// clone shares exists), after which the caller sends `CowDone`.
    pub origin: Option<(ChunkId, u64)>,
}

/// What [`MetaOp::Clone`] returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneReply {
    /// The new inode (the root of the copy, for a directory).
    pub attr: Attr,
    pub inodes: u64,
    /// Chunk references copied (each chunk now shared once more).
    pub chunks: u64,
    pub fences: Vec<ChunkFence>,
    /// Addresses of the servers the fences name.
    pub servers: Vec<(ServerId, String)>,
}

/// Namespace reads, linearizable (served by the leader after a read index).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaRead {
    Lookup {
        parent: Ino,
        name: Vec<u8>,
    },
    GetAttr {
        ino: Ino,
    },
    /// Entries after `after` (exclusive) in name order, at most `limit`.
    /// `.` and `..` are not included.
    ReadDir {
        ino: Ino,
        after: Option<Vec<u8>>,
        limit: u32,
    },
    Readlink {
        ino: Ino,
    },
    GetXattr {
        ino: Ino,
        name: Vec<u8>,
    },
    ListXattr {
        ino: Ino,
    },
    StatFs,
    /// Resolves an absolute path. Symlinks in the middle are followed; the
    /// last component is followed only when `follow` is set.
    Resolve {
        path: Vec<u8>,
        follow: bool,
    },
    /// Chunk locations of `count` chunks from index `first`.
    Layout {
        ino: Ino,
        first: u64,
        count: u64,
    },
    GetGoal {
        ino: Ino,
    },
    GetQuota {
        ino: Ino,
    },
    /// Chunk servers, capacity, replication state (leader's view).
    Health,
    /// The leader's clock: leases are judged by it, not by a client's own.
    Now,
}

/// Filesystem totals.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatFs {
    pub total_bytes: u64,
    pub free_bytes: u64,
    pub available_bytes: u64,
    pub total_inodes: u64,
    pub free_inodes: u64,
    pub block_size: u32,
    pub max_name: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReadReply {
    Attr(Attr),
    Entries { entries: Vec<DirEntry>, more: bool },
    Link(Vec<u8>),
    Xattr(Vec<u8>),
    XattrNames(Vec<Vec<u8>>),
    StatFs(StatFs),
    Layout(Layout),
    Goal(Goal),
    Quota(Option<QuotaUsage>),
    Health(ClusterHealth),
    Now(Timespec),
}

/// A chunk server as the leader sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerStatus {
    pub id: ServerId,
    pub addr: String,
    pub topology: Topology,
    pub alive: bool,
    /// Milliseconds since its last heartbeat (None: none since this leader took over).
    pub last_seen_ms: Option<u64>,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub available_bytes: u64,
    pub chunks: u64,
}

/// Replication health of the whole cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterHealth {
    pub servers: Vec<ServerStatus>,
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub chunks: u64,
    /// Chunks with fewer live copies than their goal.
    pub under_replicated: u64,
    /// Chunks with no live copy at all.
    pub lost: u64,
    /// Replicas reported corrupt and not yet replaced.
    pub corrupt: u64,
    pub repairs_in_flight: u64,
    pub repairs_done: u64,
    /// When the last full check of every chunk finished (ms ago).
    pub last_scan_ms: Option<u64>,
}

/// One member of the metadata cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    pub id: u64,
    pub addr: String,
    pub voter: bool,
    /// Last log index known replicated to it (leader's view).
    pub matched_index: Option<u64>,
    /// How far it trails the leader's log, in entries.
    pub lag: Option<u64>,
}

/// The cluster as the answering node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub node_id: u64,
    pub state: String,
    pub leader_id: Option<u64>,
    pub term: u64,
    pub last_log_index: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub snapshot_index: Option<u64>,
    pub members: Vec<MemberStatus>,
}

/// Cluster administration (role `admin` only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminOp {
    Status,
    /// Adds a metadata node: first as a learner, then as a voter once caught up.
    AddNode {
        id: u64,
        addr: String,
    },
    RemoveNode {
        id: u64,
    },
    /// Builds a Raft snapshot now.
    Snapshot,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminReply {
    Status(ClusterStatus),
    Done,
}

/// Identifies one logical request across retries, so the metadata service
/// applies it at most once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RequestId {
    pub client: u128,
    pub seq: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    Op {
        id: RequestId,
        op: MetaOp,
    },
    Read(MetaRead),
    Admin(AdminOp),
    /// Streams applied namespace changes from log index `from` (inclusive).
    Subscribe {
        from: u64,
    },
    /// Liveness probe; answered by any node without Raft.
    Ping,
    /// Several operations at once (a client coalescing concurrent calls);
    /// each is applied at most once, results come back in order.
    Ops(Vec<(RequestId, MetaOp)>),
    /// Several linearizable reads sharing one read-index round.
    Reads(Vec<MetaRead>),
    /// From a chunk server (role `node`), to the leader.
    Server(ServerMsg),
    /// VM management: services, VMs, hosts (served by the leader).
    Vm(VmRequest),
    /// From a VM host agent (role `host`), to the leader.
    Host(crate::vm::HostMsg),
}

/// A VM management request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum VmRequest {
    Op(crate::vm::VmOp),
    Read(crate::vm::VmRead),
}

/// What chunk servers tell the leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerMsg {
    /// Joins (`id` None: first start) or rejoins the cluster.
    Register { id: Option<ServerId>, addr: String, topology: Topology, capacity_bytes: u64, used_bytes: u64 },
    /// Every second; the reply carries work for the server.
    Heartbeat { id: ServerId, capacity_bytes: u64, available_bytes: u64, used_bytes: u64, chunks: u64 },
    /// The chunks it holds, in pages; `done` on the last page.
    Report { id: ServerId, chunks: Vec<(ChunkId, u64)>, done: bool },
    /// A replica failed its checksums (it has been quarantined).
    Corrupt { id: ServerId, chunk: ChunkId, version: u64 },
    /// A replication command finished.
    Replicated { id: ServerId, chunk: ChunkId, version: u64, ok: bool, error: Option<String> },
}

/// Work the leader gives a chunk server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerCommand {
    Delete {
        chunks: Vec<ChunkId>,
    },
    SetVersion {
        chunk: ChunkId,
        from: u64,
        to: u64,
    },
    /// Copy `chunk` at `version` from `source` (a chunk server address).
    Replicate {
        chunk: ChunkId,
        version: u64,
        source: String,
    },
}

/// Replies to [`ServerMsg`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerReply {
    Registered { id: ServerId, chunk_bytes: u64, block_bytes: u64 },
    Commands(Vec<ServerCommand>),
}

/// Most entries in one [`Request::Ops`] or [`Request::Reads`].
pub const MAX_BATCH_ENTRIES: usize = 1024;

/// Every request frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub version: u16,
    pub request: Request,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    Op(OpReply),
    Read(ReadReply),
    Admin(AdminReply),
    Pong { node_id: u64 },
    Ops(Vec<Result<OpReply, WireError>>),
    Reads(Vec<Result<ReadReply, WireError>>),
    Server(ServerReply),
    Vm(crate::vm::VmReply),
    Host(crate::vm::HostReply),
}

/// ALPN of chunk server connections. Bump on an incompatible change.
pub const CHUNK_ALPN: &[u8] = b"locus-chunk/1";
/// Largest data payload of one chunk read or write.
pub const MAX_IO_BYTES: u64 = 8 << 20;

/// Requests to a chunk server. Data follows `Write` raw, and precedes
/// nothing else; `Read` and `Export` answers are followed by raw data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChunkRequest {
    Read {
        chunk: ChunkId,
        version: u64,
        offset: u64,
        len: u64,
    },
    /// `len` bytes follow. The server writes them, forwards them to
    /// `chain[0]` with the rest of the chain, and answers once every
    /// server has them. `create` makes the chunk if this server lacks it;
    /// with `origin`, a missing chunk is first copied from the local
    /// replica of the origin (copy-on-write).
    Write {
        chunk: ChunkId,
        version: u64,
        offset: u64,
        len: u64,
        chain: Vec<String>,
        create: bool,
        origin: Option<(ChunkId, u64)>,
        /// The data's block sums, made by the writer (see [`crate::sums`]).
        sums: Option<crate::sums::BlockSums>,
    },
    /// Makes `[offset, offset + len)` read as zeros, along the chain like a write.
    Zero {
        chunk: ChunkId,
        version: u64,
        offset: u64,
        len: u64,
        chain: Vec<String>,
        origin: Option<(ChunkId, u64)>,
    },
    /// Makes earlier writes to these chunks durable on this server.
    Flush {
        chunks: Vec<ChunkId>,
    },
    SetVersion {
        chunk: ChunkId,
        from: u64,
        to: u64,
    },
    /// Streams a whole replica (for replication); writes wait meanwhile.
    Export {
        chunk: ChunkId,
        version: u64,
    },
    Status,
    /// Fences after a clone: raises many versions at once (writes in
    /// flight on each chunk finish first). A missing chunk with an origin
    /// is made from it; one without is remembered, so a late write cannot
    /// create it at an older version. Answered by [`ChunkReply::Versions`].
    SetVersions {
        changes: Vec<VersionChange>,
    },
    /// Many writes to one chunk in one request (a client's buffered random
    /// writes): `extents` are `(offset, len)` inside the chunk, sorted and
    /// not overlapping, at most [`MAX_WRITEV_EXTENTS`] and [`MAX_IO_BYTES`]
    /// in all (see [`check_extents`]); their bytes follow, concatenated in
    /// order. Along the chain and answered like [`ChunkRequest::Write`].
    WriteV {
        chunk: ChunkId,
        version: u64,
        extents: Vec<(u64, u64)>,
        chain: Vec<String>,
        create: bool,
        origin: Option<(ChunkId, u64)>,
        /// The extents' block sums, made by the writer (see [`crate::sums`]).
        sums: Option<crate::sums::BlockSums>,
    },
}

impl ChunkRequest {
    /// The bytes that follow this request on its stream (a write's data):
    /// `None` if a `WriteV`'s extents add up past `u64`.
    pub fn bytes_following(&self) -> Option<u64> {
        match self {
            ChunkRequest::Write { len, .. } => Some(*len),
            ChunkRequest::WriteV { extents, .. } => extents.iter().try_fold(0u64, |a, e| a.checked_add(e.1)),
            _ => Some(0),
        }
    }
}

/// Most extents in one [`ChunkRequest::WriteV`].
pub const MAX_WRITEV_EXTENTS: usize = 4096;

/// Checks the extents of a [`ChunkRequest::WriteV`] against a chunk of
/// `chunk_bytes`; returns the bytes they cover.
pub fn check_extents(extents: &[(u64, u64)], chunk_bytes: u64) -> Result<u64, WireError> {
    let bad = |m: String| Err(WireError::new(ErrorCode::BadRequest, m));
    if extents.is_empty() || extents.len() > MAX_WRITEV_EXTENTS {
        return bad(format!("{} extents in one write (1 to {MAX_WRITEV_EXTENTS})", extents.len()));
    }
    let mut total = 0u64;
    let mut end = 0u64;
    for (i, &(off, len)) in extents.iter().enumerate() {
        let e = off.checked_add(len).filter(|e| len > 0 && *e <= chunk_bytes);
        let Some(e) = e else {
            return bad(format!("extent {i} ({off}, {len}) is empty or outside the chunk of {chunk_bytes} bytes"));
        };
        if i > 0 && off < end {
            return bad(format!("extent {i} at {off} overlaps or precedes the one before (ending at {end})"));
        }
        end = e;
        total += len;
    }
    if total > MAX_IO_BYTES {
        return Err(WireError::new(ErrorCode::TooBig, format!("write of {total} bytes exceeds {MAX_IO_BYTES}")));
    }
    Ok(total)
}

/// One entry of [`ChunkRequest::SetVersions`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionChange {
    pub chunk: ChunkId,
    pub from: u64,
    pub to: u64,
    pub origin: Option<(ChunkId, u64)>,
}

/// Most entries in one [`ChunkRequest::SetVersions`].
pub const MAX_SET_VERSIONS: usize = 16_384;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChunkReply {
    Done,
    /// `len` bytes follow.
    Data {
        len: u64,
    },
    /// An export stream follows until the stream ends.
    Export,
    Status {
        id: Option<ServerId>,
        chunks: u64,
        used_bytes: u64,
        fenced: bool,
    },
    /// This server applied the write; the chain broke further down, at `at`.
    ChainBroken {
        at: String,
        error: WireError,
    },
    /// One result per [`ChunkRequest::SetVersions`] entry, in order.
    Versions(Vec<Result<(), WireError>>),
}

pub type ChunkResponse = Result<ChunkReply, WireError>;

/// The first frame a chunk server writes on a local socket connection
/// ([`crate::local`]): which server this is, so a client never takes one
/// server's socket for another's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalHello {
    /// The address the server advertises (what layouts list).
    pub addr: String,
    pub server: ServerId,
    /// Its cluster ([`crate::tls::cluster_fingerprint`]).
    pub cluster: [u8; 32],
}

pub type Response = Result<Reply, WireError>;

/// Namespace changes, as the change stream delivers them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// An inode was created or its attributes changed.
    InodeSet(Attr),
    InodeRemoved {
        ino: Ino,
    },
    EntrySet {
        parent: Ino,
        name: Vec<u8>,
        ino: Ino,
        kind: FileKind,
    },
    EntryRemoved {
        parent: Ino,
        name: Vec<u8>,
    },
    XattrChanged {
        ino: Ino,
    },
    /// A VM's record changed (assignment, desired state, status).
    Vm {
        id: String,
        host: Option<u64>,
    },
}

/// Frames of a change stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamItem {
    /// The changes of one applied log entry.
    Changes {
        index: u64,
        changes: Vec<Change>,
    },
    /// The history before the requested index is gone: the full state
    /// follows as `Changes` at index `index`, then `SnapshotEnd`.
    SnapshotBegin {
        index: u64,
    },
    SnapshotEnd {
        index: u64,
    },
    /// Nothing new; `applied` is the server's applied index.
    Idle {
        applied: u64,
    },
    /// The stream cannot go on.
    Error(WireError),
}

/// Stable error codes. Never renumber; add at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "u16", from = "u16")]
pub enum ErrorCode {
    NotFound,
    Exists,
    NotDir,
    IsDir,
    NotEmpty,
    Invalid,
    NameTooLong,
    PermissionDenied,
    NotPermitted,
    NoData,
    Range,
    TooBig,
    Loop,
    CrossDevice,
    QuotaExceeded,
    NoSpace,
    NotSupported,
    Busy,
    Stale,
    TooManyLinks,
    Io,
    /// Ask the leader instead (see the hint).
    NotLeader,
    /// No quorum or the service is starting; retry later.
    Unavailable,
    Timeout,
    /// The peer's certificate does not allow this request.
    Unauthorized,
    /// Malformed request or unsupported protocol version.
    BadRequest,
    Internal,
    /// The inode is read-only (part of a snapshot).
    ReadOnly,
    /// A size or offset past the largest file (EFBIG; `TooBig` is for
    /// requests and values, E2BIG).
    FileTooBig,
    /// A code this build does not know (a newer server).
    Unknown(u16),
}

impl ErrorCode {
    pub fn as_u16(self) -> u16 {
        match self {
            ErrorCode::NotFound => 1,
            ErrorCode::Exists => 2,
            ErrorCode::NotDir => 3,
            ErrorCode::IsDir => 4,
            ErrorCode::NotEmpty => 5,
            ErrorCode::Invalid => 6,
            ErrorCode::NameTooLong => 7,
            ErrorCode::PermissionDenied => 8,
            ErrorCode::NotPermitted => 9,
            ErrorCode::NoData => 10,
            ErrorCode::Range => 11,
            ErrorCode::TooBig => 12,
            ErrorCode::Loop => 13,
            ErrorCode::CrossDevice => 14,
            ErrorCode::QuotaExceeded => 15,
            ErrorCode::NoSpace => 16,
            ErrorCode::NotSupported => 17,
            ErrorCode::Busy => 18,
            ErrorCode::Stale => 19,
            ErrorCode::TooManyLinks => 20,
            ErrorCode::Io => 21,
            ErrorCode::ReadOnly => 22,
            ErrorCode::FileTooBig => 23,
            ErrorCode::NotLeader => 100,
            ErrorCode::Unavailable => 101,
            ErrorCode::Timeout => 102,
            ErrorCode::Unauthorized => 103,
            ErrorCode::BadRequest => 104,
            ErrorCode::Internal => 105,
            ErrorCode::Unknown(c) => c,
        }
    }

    /// The errno a local filesystem returns for this error.
    pub fn errno(self) -> i32 {
        match self {
            ErrorCode::NotFound => libc::ENOENT,
            ErrorCode::Exists => libc::EEXIST,
            ErrorCode::NotDir => libc::ENOTDIR,
            ErrorCode::IsDir => libc::EISDIR,
            ErrorCode::NotEmpty => libc::ENOTEMPTY,
            ErrorCode::Invalid => libc::EINVAL,
            ErrorCode::NameTooLong => libc::ENAMETOOLONG,
            ErrorCode::PermissionDenied => libc::EACCES,
            ErrorCode::NotPermitted => libc::EPERM,
            ErrorCode::NoData => libc::ENODATA,
            ErrorCode::Range => libc::ERANGE,
            ErrorCode::TooBig => libc::E2BIG,
            ErrorCode::Loop => libc::ELOOP,
            ErrorCode::CrossDevice => libc::EXDEV,
            ErrorCode::QuotaExceeded => libc::EDQUOT,
            ErrorCode::NoSpace => libc::ENOSPC,
            ErrorCode::NotSupported => libc::EOPNOTSUPP,
            ErrorCode::Busy => libc::EBUSY,
            ErrorCode::Stale => libc::ESTALE,
            ErrorCode::TooManyLinks => libc::EMLINK,
            ErrorCode::Timeout => libc::ETIMEDOUT,
            ErrorCode::Unauthorized => libc::EACCES,
            ErrorCode::ReadOnly => libc::EROFS,
            ErrorCode::FileTooBig => libc::EFBIG,
            ErrorCode::Io
            | ErrorCode::NotLeader
            | ErrorCode::Unavailable
            | ErrorCode::BadRequest
            | ErrorCode::Internal
            | ErrorCode::Unknown(_) => libc::EIO,
        }
    }

    /// Whether retrying the same request later may succeed.
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorCode::NotLeader | ErrorCode::Unavailable | ErrorCode::Timeout)
    }
}

impl From<ErrorCode> for u16 {
    fn from(c: ErrorCode) -> u16 {
        c.as_u16()
    }
}

impl From<u16> for ErrorCode {
    fn from(c: u16) -> ErrorCode {
        const KNOWN: [ErrorCode; 29] = [
            ErrorCode::NotFound,
            ErrorCode::Exists,
            ErrorCode::NotDir,
            ErrorCode::IsDir,
            ErrorCode::NotEmpty,
            ErrorCode::Invalid,
            ErrorCode::NameTooLong,
            ErrorCode::PermissionDenied,
            ErrorCode::NotPermitted,
            ErrorCode::NoData,
            ErrorCode::Range,
            ErrorCode::TooBig,
            ErrorCode::Loop,
            ErrorCode::CrossDevice,
            ErrorCode::QuotaExceeded,
            ErrorCode::NoSpace,
            ErrorCode::NotSupported,
            ErrorCode::Busy,
            ErrorCode::Stale,
            ErrorCode::TooManyLinks,
            ErrorCode::Io,
            ErrorCode::NotLeader,
            ErrorCode::Unavailable,
            ErrorCode::Timeout,
            ErrorCode::Unauthorized,
            ErrorCode::BadRequest,
            ErrorCode::Internal,
            ErrorCode::ReadOnly,
            ErrorCode::FileTooBig,
        ];
        KNOWN.into_iter().find(|k| k.as_u16() == c).unwrap_or(ErrorCode::Unknown(c))
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorCode::Unknown(c) => write!(f, "error {c}"),
            other => write!(f, "{other:?}"),
        }
    }
}

/// Where the leader is, for a `NotLeader` error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderHint {
    pub id: u64,
    pub addr: String,
}

/// An error as it crosses the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct WireError {
    pub code: ErrorCode,
    pub message: String,
    pub leader: Option<LeaderHint>,
}

impl WireError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        WireError { code, message: message.into(), leader: None }
    }
}

/// Checks a file name: not empty, not `.` or `..`, no `/` or NUL, at most
/// [`MAX_NAME_BYTES`].
pub fn validate_name(name: &[u8]) -> Result<(), WireError> {
    let show = || String::from_utf8_lossy(name).into_owned();
    if name.is_empty() {
        return Err(WireError::new(ErrorCode::Invalid, "empty file name"));
    }
    if name == b"." || name == b".." {
        return Err(WireError::new(ErrorCode::Invalid, format!("file name {:?} is reserved", show())));
    }
    if name.contains(&b'/') {
        return Err(WireError::new(ErrorCode::Invalid, format!("file name {:?} contains '/'", show())));
    }
    if name.contains(&0) {
        return Err(WireError::new(ErrorCode::Invalid, format!("file name {:?} contains NUL", show())));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(WireError::new(
            ErrorCode::NameTooLong,
            format!("file name of {} bytes exceeds {MAX_NAME_BYTES}", name.len()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_roundtrip_and_are_stable() {
        for c in 0..200u16 {
            let code = ErrorCode::from(c);
            assert_eq!(code.as_u16(), c);
        }
        assert_eq!(ErrorCode::NotFound.as_u16(), 1);
        assert_eq!(ErrorCode::NotLeader.as_u16(), 100);
        assert_eq!(ErrorCode::FileTooBig.as_u16(), 23);
        assert_eq!(ErrorCode::FileTooBig.errno(), libc::EFBIG);
        let e = WireError::new(ErrorCode::NotEmpty, "x");
        let b = postcard::to_allocvec(&e).unwrap();
        let back: WireError = postcard::from_bytes(&b).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name(b"ok").is_ok());
        assert_eq!(validate_name(b"").unwrap_err().code, ErrorCode::Invalid);
        assert_eq!(validate_name(b".").unwrap_err().code, ErrorCode::Invalid);
        assert_eq!(validate_name(b"..").unwrap_err().code, ErrorCode::Invalid);
        assert_eq!(validate_name(b"a/b").unwrap_err().code, ErrorCode::Invalid);
        assert_eq!(validate_name(b"a\0b").unwrap_err().code, ErrorCode::Invalid);
        assert_eq!(validate_name(&[b'x'; 256]).unwrap_err().code, ErrorCode::NameTooLong);
        assert!(validate_name(&[b'x'; 255]).is_ok());
        assert!(validate_name(&[0xff, 0xfe]).is_ok(), "names are bytes, not UTF-8");
    }

    #[test]
    fn timespec_nanos_roundtrip() {
        for n in [-1_500_000_000i128, 0, 1, 1_999_999_999] {
            assert_eq!(Timespec::from_nanos(n).as_nanos(), n);
        }
    }
}
