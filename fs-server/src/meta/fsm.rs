//! The namespace state machine: a deterministic function from a committed
//! [`Command`] to writes on the Raft key space and a reply per operation.
//!
//! No I/O and no clock: the leader stamps the time into the command, and
//! every replica reaches the same state from the same log. Each operation is
//! planned on a [`Work`] set (inodes and entries it reads and changes) and
//! only written if every check passes, so a failed operation changes nothing.

use std::collections::BTreeMap;

use fs_client::proto::*;
use raft::{KvError, KvRead, KvReadExt, StateMachineLogic, Txn};
use serde::{Deserialize, Serialize};

use super::clone;
use super::data;
use super::keys;

/// How long a reply stays available for a retried request.
pub const DEDUP_TTL_NS: i128 = 10 * 60 * 1_000_000_000;
/// Most commands' dedup records expired per command, to bound apply time.
const DEDUP_GC_PER_COMMAND: usize = 16;
/// Change records kept for subscribers by default, in log entries.
pub const CHANGE_RETAIN_ENTRIES: u64 = 100_000;
/// Trim the change history every this many entries.
const CHANGE_TRIM_EVERY: u64 = 1024;

/// What the leader proposes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Command {
    /// Namespace operations, applied in order.
    Batch { now: Timespec, ops: Vec<Proposal> },
    /// Creates the root directory if it does not exist yet, and fixes the
    /// cluster's chunk size the first time.
    Init { now: Timespec, chunk_bytes: u64 },
    /// Leader housekeeping: the server registry and replica changes.
    System { now: Timespec, ops: Vec<SystemOp> },
    /// VM desired state: services, hosts, VMs (see [`super::vm`]).
    Vm { now: Timespec, cmds: Vec<super::vm::VmCmd> },
    /// [`Command::Init`] that also fixes the checksum block size (clusters
    /// made since it is recorded; older ones read as
    /// [`LEGACY_BLOCK_BYTES`]). A new variant rather than a new field: the
    /// log of an older cluster must decode and apply as it did.
    InitBlocks { now: Timespec, chunk_bytes: u64, block_bytes: u64 },
}

/// One client operation as proposed by the leader.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Proposal {
    pub id: Option<RequestId>,
    pub op: MetaOp,
    /// Replicas the leader chose for chunks this operation may allocate
    /// (by chunk index). Placement needs live server state, which only the
    /// leader has; applying stays deterministic because the choice is in
    /// the log.
    pub placement: Vec<(u64, Vec<ServerId>)>,
}

impl Proposal {
    pub fn new(id: Option<RequestId>, op: MetaOp) -> Self {
        Proposal { id, op, placement: Vec::new() }
    }
}

/// Operations only the leader proposes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SystemOp {
    /// Adds or updates a chunk server; replies with its id.
    RegisterServer { id: Option<ServerId>, addr: String, topology: Topology },
    /// A new replica holds `chunk` at `version`; `drop` are replaced ones.
    AddReplica { chunk: ChunkId, version: u64, server: ServerId, drop: Vec<ServerId> },
    /// Forget one replica (dead server replaced, corrupt, stale).
    RemoveReplica { chunk: ChunkId, server: ServerId },
    /// Removes orphans whose hold lapsed (their holder died), at most
    /// [`MAX_REAP_PER_COMMAND`].
    ReapOrphans,
}

/// Most orphans one [`SystemOp::ReapOrphans`] removes.
pub const MAX_REAP_PER_COMMAND: usize = 256;

/// What a [`SystemOp`] returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SystemReply {
    Server(ServerId),
    Done,
    /// Nothing changed (the chunk moved on meanwhile).
    Skipped,
}

/// A chunk: its version, replicas (first is the write-chain head), files
/// referring to it and the goal its copies follow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRec {
    pub version: u64,
    pub replicas: Vec<ServerId>,
    pub refs: u32,
    pub goal: Goal,
    /// When the chunk was allocated (seconds, leader's clock): a replica
    /// missing from a server's report is judged lost only once the chunk is
    /// old enough for its first write to have landed.
    pub born_secs: i64,
    /// A copy-on-write chunk not known to be written yet: its content is
    /// this chunk's (which holds one reference for it). Its replicas make
    /// it from their copy of the origin on the first write; until then no
    /// replica has it, so repair and loss detection leave it alone.
    pub origin: Option<ChunkId>,
}

/// A registered chunk server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerRec {
    pub id: ServerId,
    pub addr: String,
    pub topology: Topology,
}

pub type OpResult = Result<OpReply, WireError>;

/// A stored inode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InodeRec {
    pub attr: Attr,
    /// The parent directory, for directories (the root is its own parent).
    pub parent: Ino,
    /// The target, for symlinks.
    pub target: Vec<u8>,
    pub xattrs: u32,
    /// Replication goal: of this file's chunks, or inherited by what is
    /// created in this directory.
    pub goal: Goal,
    /// The nearest directory above with a quota (0: none): where this
    /// inode's bytes and inode count are charged.
    pub qdir: Ino,
    /// This directory's quota, if it has one.
    pub quota: Option<QuotaUsage>,
    /// Part of a snapshot: data, attributes and entries never change
    /// (`ReadOnly`). Its entry in a writable directory may still be renamed
    /// or removed.
    pub immutable: bool,
    /// Chunk slots of this file that hold a chunk: kept by the commit of
    /// every operation that adds or drops one ([`Planned::settle`]), for
    /// `attr.blocks`.
    pub chunks: u64,
}

/// A stored directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DentryRec {
    pub ino: Ino,
    pub kind: FileKind,
}

/// A stored reply for at-most-once requests.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DedupRec {
    pub reply: OpResult,
}

/// The dedup records one command made, and when they expire.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DedupLog {
    pub expiry_ns: i128,
    pub ids: Vec<RequestId>,
}

/// Encodes a value for the store.
pub fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing plain data structures into a Vec cannot fail.
    postcard::to_allocvec(v).expect("postcard encodes plain data")
}

/// Decodes a stored value; a value that does not decode is a corrupt store.
pub fn dec<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Result<T, KvError> {
    postcard::from_bytes(b).map_err(|e| KvError(format!("corrupt record: {e}")))
}

pub fn load_inode(kv: &dyn KvRead, ino: Ino) -> Result<Option<InodeRec>, KvError> {
    kv.get(&keys::inode(ino))?.map(|b| dec(&b)).transpose()
}

pub fn load_dentry(kv: &dyn KvRead, parent: Ino, name: &[u8]) -> Result<Option<DentryRec>, KvError> {
    kv.get(&keys::dentry(parent, name))?.map(|b| dec(&b)).transpose()
}

pub fn get_counter(kv: &dyn KvRead, name: &str) -> Result<u64, KvError> {
    Ok(match kv.get(&keys::system(name))? {
        Some(b) => u64::from_be_bytes(b.as_slice().try_into().map_err(|_| KvError(format!("bad counter {name}")))?),
        None => 0,
    })
}

pub(super) fn set_counter(txn: &mut Txn<'_>, name: &str, v: u64) {
    txn.put(keys::system(name), v.to_be_bytes().to_vec());
}

pub const NEXT_INO: &str = "next_ino";
/// The index of the oldest dedup log not yet collected (where the next
/// collection starts).
pub const DEDUP_FLOOR: &str = "dedup_floor";
pub const NEXT_CHUNK: &str = "next_chunk";
pub const NEXT_SERVER: &str = "next_server";
pub const CHUNK_BYTES: &str = "chunk_bytes";
/// Counter: the cluster's checksum block size (0: [`LEGACY_BLOCK_BYTES`]).
pub const BLOCK_BYTES: &str = "block_bytes";
pub const INODE_COUNT: &str = "inodes";
pub const APPLIED: &str = "applied";
pub const CHANGE_FLOOR: &str = "change_floor";

pub(super) fn err(code: ErrorCode, msg: impl Into<String>) -> WireError {
    WireError::new(code, msg)
}

/// Outcome of planning one operation: a domain error, or a broken store.
pub(super) enum Fail {
    Op(WireError),
    Store(KvError),
}

impl From<KvError> for Fail {
    fn from(e: KvError) -> Self {
        Fail::Store(e)
    }
}

impl From<WireError> for Fail {
    fn from(e: WireError) -> Self {
        Fail::Op(e)
    }
}

pub(super) type Plan<T> = Result<T, Fail>;

/// What one operation changes, written only when the whole operation
/// succeeds.
#[derive(Default)]
pub(super) struct Planned {
    pub(super) inodes: BTreeMap<Ino, Option<InodeRec>>,
    pub(super) dentries: BTreeMap<(Ino, Vec<u8>), Option<DentryRec>>,
    pub(super) xattrs: BTreeMap<(Ino, Vec<u8>), Option<Vec<u8>>>,
    /// Inodes whose xattrs all go (the inode is deleted).
    pub(super) drop_xattrs: Vec<Ino>,
    pub(super) next_ino: Option<u64>,
    pub(super) inode_delta: i64,
    /// (file, chunk index) -> chunk id, `None` removes the entry.
    pub(super) file_chunks: BTreeMap<(Ino, u64), Option<ChunkId>>,
    pub(super) chunks: BTreeMap<ChunkId, Option<ChunkRec>>,
    pub(super) next_chunk: Option<u64>,
    pub(super) servers: BTreeMap<ServerId, ServerRec>,
    pub(super) next_server: Option<u64>,
    /// Write leases set (`None`: released).
    pub(super) leases: BTreeMap<Ino, Option<Lease>>,
    /// Holds on orphans set (`None`: dropped).
    pub(super) orphans: BTreeMap<Ino, Option<Lease>>,
}

/// What a [`MetaOp::KeepOpen`] keeps: files of `open` losing their last
/// link become orphans held by `hold`.
pub(super) struct Keep {
    pub(super) open: std::collections::BTreeSet<Ino>,
    pub(super) hold: Lease,
    pub(super) kept: Vec<Ino>,
}

/// Plans one operation over a read view.
pub(super) struct Work<'k> {
    pub(super) kv: &'k dyn KvRead,
    pub(super) p: Planned,
    pub(super) keep: Option<Keep>,
}

impl<'k> Work<'k> {
    pub(super) fn new(kv: &'k dyn KvRead) -> Self {
        Work { kv, p: Planned::default(), keep: None }
    }

    pub(super) fn orphan(&mut self, ino: Ino) -> Plan<Option<Lease>> {
        if let Some(v) = self.p.orphans.get(&ino) {
            return Ok(*v);
        }
        Ok(self.kv.get(&keys::orphan(ino))?.map(|b| dec(&b)).transpose()?)
    }

    pub(super) fn inode(&mut self, ino: Ino) -> Plan<Option<InodeRec>> {
        if let Some(v) = self.p.inodes.get(&ino) {
            return Ok(v.clone());
        }
        Ok(load_inode(self.kv, ino)?)
    }

    pub(super) fn must_inode(&mut self, ino: Ino) -> Plan<InodeRec> {
        self.inode(ino)?.ok_or_else(|| Fail::Op(err(ErrorCode::NotFound, format!("inode {ino} does not exist"))))
    }

    pub(super) fn must_dir(&mut self, ino: Ino) -> Plan<InodeRec> {
        let rec = self.must_inode(ino)?;
        if rec.attr.kind != FileKind::Dir {
            return Err(Fail::Op(err(ErrorCode::NotDir, format!("inode {ino} is not a directory"))));
        }
        Ok(rec)
    }

    pub(super) fn dentry(&mut self, parent: Ino, name: &[u8]) -> Plan<Option<DentryRec>> {
        if let Some(v) = self.p.dentries.get(&(parent, name.to_vec())) {
            return Ok(*v);
        }
        Ok(load_dentry(self.kv, parent, name)?)
    }

    fn xattr_exists(&mut self, ino: Ino, name: &[u8]) -> Plan<bool> {
        if let Some(v) = self.p.xattrs.get(&(ino, name.to_vec())) {
            return Ok(v.is_some());
        }
        Ok(self.kv.get(&keys::xattr(ino, name))?.is_some())
    }

    pub(super) fn put_inode(&mut self, rec: InodeRec) {
        self.p.inodes.insert(rec.attr.ino, Some(rec));
    }

    pub(super) fn delete_inode(&mut self, ino: Ino) {
        self.p.inodes.insert(ino, None);
        self.p.drop_xattrs.push(ino);
        self.p.inode_delta -= 1;
    }

    pub(super) fn put_dentry(&mut self, parent: Ino, name: &[u8], d: DentryRec) {
        self.p.dentries.insert((parent, name.to_vec()), Some(d));
    }

    pub(super) fn delete_dentry(&mut self, parent: Ino, name: &[u8]) {
        self.p.dentries.insert((parent, name.to_vec()), None);
    }

    pub(super) fn file_chunk(&mut self, ino: Ino, index: u64) -> Plan<Option<ChunkId>> {
        if let Some(v) = self.p.file_chunks.get(&(ino, index)) {
            return Ok(*v);
        }
        Ok(match self.kv.get(&keys::file_chunk(ino, index))? {
            Some(b) => Some(u64::from_be_bytes(
                b.as_slice().try_into().map_err(|_| KvError(format!("bad chunk entry of inode {ino}")))?,
            )),
            None => None,
        })
    }

    pub(super) fn chunk(&mut self, id: ChunkId) -> Plan<Option<ChunkRec>> {
        if let Some(v) = self.p.chunks.get(&id) {
            return Ok(v.clone());
        }
        Ok(self.kv.get(&keys::chunk(id))?.map(|b| dec(&b)).transpose()?)
    }

    /// Every (index, chunk) of a file, stored and planned.
    pub(super) fn all_file_chunks(&mut self, ino: Ino) -> Plan<BTreeMap<u64, ChunkId>> {
        let mut out = super::data::file_chunk_map(self.kv, ino)?;
        for ((i, idx), c) in self.p.file_chunks.range((ino, 0)..=(ino, u64::MAX)) {
            debug_assert_eq!(*i, ino);
            match c {
                Some(c) => out.insert(*idx, *c),
                None => out.remove(idx),
            };
        }
        Ok(out)
    }

    pub(super) fn lease(&mut self, ino: Ino) -> Plan<Option<Lease>> {
        if let Some(v) = self.p.leases.get(&ino) {
            return Ok(*v);
        }
        Ok(super::data::load_lease(self.kv, ino)?)
    }

    /// Refuses (`Busy`) a change to file `ino`'s data or size by `client`
    /// while another client's lease on it binds.
    pub(super) fn check_lease(&mut self, ino: Ino, client: Option<u128>, now: Timespec) -> Plan<()> {
        match self.lease(ino)? {
            Some(l) if l.excludes(client.unwrap_or(0), now) => Err(Fail::Op(err(
                ErrorCode::Busy,
                format!(
                    "inode {ino} is leased for writing by client {:032x} (an NBD export) for {} ms more",
                    l.holder,
                    (l.expires.as_nanos() - now.as_nanos()) / 1_000_000
                ),
            ))),
            _ => Ok(()),
        }
    }

    pub(super) fn alloc_chunk(&mut self) -> Plan<ChunkId> {
        let next = match self.p.next_chunk {
            Some(n) => n,
            None => get_counter(self.kv, NEXT_CHUNK)?.max(1),
        };
        self.p.next_chunk = Some(next + 1);
        Ok(next)
    }

    pub(super) fn alloc_ino(&mut self) -> Plan<Ino> {
        let next = match self.p.next_ino {
            Some(n) => n,
            None => get_counter(self.kv, NEXT_INO)?.max(ROOT_INO + 1),
        };
        self.p.next_ino = Some(next + 1);
        self.p.inode_delta += 1;
        Ok(next)
    }

    fn is_empty_dir(&mut self, ino: Ino) -> Plan<bool> {
        // Entries planned in this operation win over stored ones.
        for ((p, _), d) in self.p.dentries.range((ino, Vec::new())..) {
            if *p != ino {
                break;
            }
            if d.is_some() {
                return Ok(false);
            }
        }
        let prefix = keys::dir_prefix(ino);
        let end = raft::kv::prefix_end(&prefix).expect("prefix has a non-0xFF byte");
        let planned = &self.p.dentries;
        let mut nonempty = false;
        self.kv.scan(&prefix, &end, &mut |k, _| {
            let name = &k[prefix.len()..];
            if planned.get(&(ino, name.to_vec())) == Some(&None) {
                return true;
            }
            nonempty = true;
            false
        })?;
        Ok(!nonempty)
    }
}

impl Planned {
    /// Brings the chunk counts and `attr.blocks` of the inodes this plan
    /// touches up to date: an inode whose chunk slots change is loaded if
    /// the plan has not (so it is written too), and every file inode
    /// written gets its blocks from its chunks and size. The first step of
    /// [`Self::commit`], while the stored state is still the one planned
    /// against.
    fn settle(&mut self, kv: &dyn KvRead) -> Result<(), KvError> {
        use std::collections::btree_map::Entry;
        let mut delta: BTreeMap<Ino, i64> = BTreeMap::new();
        // Whether each inode is stored yet: a new one (a clone's copy) had
        // no entries, so its thousands need no reads.
        let mut stored: BTreeMap<Ino, bool> = BTreeMap::new();
        for (&(ino, index), c) in &self.file_chunks {
            if matches!(self.inodes.get(&ino), Some(None)) {
                // Deleted by this operation: nothing to count.
                continue;
            }
            let is_stored = match stored.entry(ino) {
                Entry::Occupied(e) => *e.get(),
                Entry::Vacant(e) => *e.insert(kv.get(&keys::inode(ino))?.is_some()),
            };
            let had = is_stored && super::data::load_file_chunk(kv, ino, index)?.is_some();
            let d = i64::from(c.is_some()) - i64::from(had);
            if d != 0 {
                *delta.entry(ino).or_default() += d;
            }
        }
        for (ino, d) in delta {
            let entry = match self.inodes.entry(ino) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => match load_inode(kv, ino)? {
                    Some(rec) => e.insert(Some(rec)),
                    None => continue,
                },
            };
            if let Some(rec) = entry {
                rec.chunks = rec.chunks.saturating_add_signed(d);
            }
        }
        let mut cb = None;
        for (&ino, rec) in self.inodes.iter_mut() {
            let Some(rec) = rec.as_mut().filter(|r| r.attr.kind == FileKind::File) else { continue };
            let cb = match cb {
                Some(cb) => cb,
                None => *cb.insert(super::data::chunk_bytes(kv)?),
            };
            let size = rec.attr.size;
            let last = size.checked_sub(1).and_then(|e| e.checked_div(cb));
            let last_present = match last {
                None => false,
                Some(last) => match self.file_chunks.get(&(ino, last)) {
                    Some(c) => c.is_some(),
                    None => super::data::load_file_chunk(kv, ino, last)?.is_some(),
                },
            };
            rec.attr.blocks = allocated_blocks(size, cb, rec.chunks, last_present);
        }
        Ok(())
    }

    /// Puts the settled `blocks` into an attribute this plan's reply carries.
    fn patch_reply(&self, reply: &mut OpReply) {
        let attr = match reply {
            OpReply::Attr(a) => a,
            OpReply::Layout(l) => &mut l.attr,
            OpReply::Cloned(c) => &mut c.attr,
            _ => return,
        };
        if let Some(Some(rec)) = self.inodes.get(&attr.ino) {
            attr.blocks = rec.attr.blocks;
        }
    }

    /// Settles the plan ([`Self::settle`]), puts the settled `blocks` into
    /// the attributes `reply` carries, then writes the plan and records the
    /// changes it makes.
    fn commit(
        mut self,
        txn: &mut Txn<'_>,
        changes: &mut Vec<Change>,
        reply: Option<&mut OpReply>,
    ) -> Result<(), KvError> {
        self.settle(&*txn)?;
        if let Some(r) = reply {
            self.patch_reply(r);
        }
        for ino in self.drop_xattrs {
            let p = keys::xattr_prefix(ino);
            let end = raft::kv::prefix_end(&p).expect("prefix has a non-0xFF byte");
            txn.delete_range(p, end);
        }
        for ((ino, name), v) in self.xattrs {
            match v {
                Some(v) => txn.put(keys::xattr(ino, &name), v),
                None => txn.delete(keys::xattr(ino, &name)),
            }
            changes.push(Change::XattrChanged { ino });
        }
        for (ino, rec) in self.inodes {
            match rec {
                Some(rec) => {
                    txn.put(keys::inode(ino), enc(&rec));
                    changes.push(Change::InodeSet(rec.attr));
                }
                None => {
                    txn.delete(keys::inode(ino));
                    changes.push(Change::InodeRemoved { ino });
                }
            }
        }
        for ((parent, name), d) in self.dentries {
            match d {
                Some(d) => {
                    txn.put(keys::dentry(parent, &name), enc(&d));
                    changes.push(Change::EntrySet { parent, name, ino: d.ino, kind: d.kind });
                }
                None => {
                    txn.delete(keys::dentry(parent, &name));
                    changes.push(Change::EntryRemoved { parent, name });
                }
            }
        }
        if let Some(n) = self.next_ino {
            set_counter(txn, NEXT_INO, n);
        }
        for ((ino, index), c) in self.file_chunks {
            match c {
                Some(c) => txn.put(keys::file_chunk(ino, index), c.to_be_bytes().to_vec()),
                None => txn.delete(keys::file_chunk(ino, index)),
            }
        }
        for (id, rec) in self.chunks {
            match rec {
                Some(rec) => txn.put(keys::chunk(id), enc(&rec)),
                None => txn.delete(keys::chunk(id)),
            }
        }
        if let Some(n) = self.next_chunk {
            set_counter(txn, NEXT_CHUNK, n);
        }
        for (id, rec) in self.servers {
            txn.put(keys::server(id), enc(&rec));
        }
        for (ino, l) in self.leases {
            match l {
                Some(l) => txn.put(keys::lease(ino), enc(&l)),
                None => txn.delete(keys::lease(ino)),
            }
        }
        for (ino, l) in self.orphans {
            match l {
                Some(l) => txn.put(keys::orphan(ino), enc(&l)),
                None => txn.delete(keys::orphan(ino)),
            }
        }
        if let Some(n) = self.next_server {
            set_counter(txn, NEXT_SERVER, n);
        }
        if self.inode_delta != 0 {
            let count = get_counter(txn, INODE_COUNT)? as i64 + self.inode_delta;
            set_counter(txn, INODE_COUNT, count.max(0) as u64);
        }
        Ok(())
    }
}

/// The hold a [`MetaOp::KeepOpen`] or [`MetaOp::HoldOrphans`] of `client`
/// gives, checked.
fn orphan_hold(client: Option<u128>, count: usize, ttl_ms: u64, now: Timespec) -> Plan<Lease> {
    let Some(holder) = client else {
        return Err(Fail::Op(err(ErrorCode::Invalid, "holding orphans needs a client id")));
    };
    if count > MAX_KEEP_OPEN {
        return Err(Fail::Op(err(ErrorCode::TooBig, format!("at most {MAX_KEEP_OPEN} open files per request"))));
    }
    if ttl_ms > MAX_LEASE_TTL_MS {
        return Err(Fail::Op(err(ErrorCode::Invalid, format!("a hold lasts at most {MAX_LEASE_TTL_MS} ms"))));
    }
    Ok(Lease { holder, expires: Timespec::from_nanos(now.as_nanos() + ttl_ms as i128 * 1_000_000) })
}

pub(super) fn check_name(name: &[u8]) -> Plan<()> {
    validate_name(name).map_err(Fail::Op)
}

/// Refuses (`ReadOnly`) a change to an inode of a snapshot.
pub(super) fn writable(rec: &InodeRec) -> Plan<()> {
    if rec.immutable {
        return Err(Fail::Op(err(ErrorCode::ReadOnly, format!("inode {} is part of a snapshot", rec.attr.ino))));
    }
    Ok(())
}

/// `st_blocks` of a file of `size` bytes with `chunks` of its chunk slots
/// allocated, chunks of `chunk_bytes`; `last_present`: whether the slot
/// holding its last byte is one of them (it counts only up to the end).
pub fn allocated_blocks(size: u64, chunk_bytes: u64, chunks: u64, last_present: bool) -> u64 {
    if chunk_bytes == 0 {
        return size.div_ceil(512);
    }
    let tail = if last_present { (size - 1) % chunk_bytes + 1 } else { 0 };
    let full = chunks.saturating_sub(u64::from(last_present));
    full.saturating_mul(chunk_bytes).saturating_add(tail).min(size).div_ceil(512)
}

fn new_attr(ino: Ino, kind: FileKind, perm: u32, caller: Caller, gid: u32, now: Timespec, index: u64) -> Attr {
    Attr {
        ino,
        kind,
        perm: perm & 0o7777,
        nlink: if kind == FileKind::Dir { 2 } else { 1 },
        uid: caller.uid,
        gid,
        size: 0,
        blocks: 0,
        atime: now,
        mtime: now,
        ctime: now,
        crtime: now,
        rdev: 0,
        generation: index,
    }
}

/// The group of a new inode: the parent's when it is setgid (BSD semantics).
fn inherit_gid(parent: &InodeRec, caller: Caller) -> u32 {
    if parent.attr.perm & 0o2000 != 0 {
        parent.attr.gid
    } else {
        caller.gid
    }
}

pub(super) fn touch_dir(rec: &mut InodeRec, now: Timespec) {
    rec.attr.mtime = now;
    rec.attr.ctime = now;
}

/// When an operation happens: the leader's clock and the log index.
#[derive(Debug, Clone, Copy)]
pub(super) struct Stamp {
    pub(super) now: Timespec,
    pub(super) index: u64,
}

/// The namespace logic plugged into Raft.
#[derive(Debug, Clone)]
pub struct Namespace {
    /// Log entries of change history kept for subscribers. Only this node's
    /// change stream depends on it, so nodes may differ.
    pub change_retain: u64,
}

impl Default for Namespace {
    fn default() -> Self {
        Namespace { change_retain: CHANGE_RETAIN_ENTRIES }
    }
}

impl Namespace {
    fn make_node(
        w: &mut Work<'_>,
        parent: Ino,
        name: &[u8],
        kind: FileKind,
        perm: u32,
        caller: Caller,
        at: Stamp,
    ) -> Plan<Attr> {
        check_name(name)?;
        let mut p = w.must_dir(parent)?;
        writable(&p)?;
        if w.dentry(parent, name)?.is_some() {
            return Err(Fail::Op(err(ErrorCode::Exists, format!("{:?} exists", String::from_utf8_lossy(name)))));
        }
        if kind == FileKind::Dir && p.attr.nlink >= MAX_LINKS {
            return Err(Fail::Op(err(ErrorCode::TooManyLinks, "too many subdirectories")));
        }
        let ino = w.alloc_ino()?;
        let mut perm = perm & 0o7777;
        if kind == FileKind::Dir && p.attr.perm & 0o2000 != 0 {
            perm |= 0o2000;
        }
        let attr = new_attr(ino, kind, perm, caller, inherit_gid(&p, caller), at.now, at.index);
        let realm = data::realm_of(&p);
        let rec = InodeRec {
            attr: attr.clone(),
            parent: if kind == FileKind::Dir { parent } else { 0 },
            target: Vec::new(),
            xattrs: 0,
            goal: p.goal,
            qdir: realm,
            quota: None,
            immutable: false,
            chunks: 0,
        };
        w.put_inode(rec);
        w.put_dentry(parent, name, DentryRec { ino, kind });
        if kind == FileKind::Dir {
            p.attr.nlink += 1;
        }
        touch_dir(&mut p, at.now);
        w.put_inode(p);
        data::charge(w, realm, 0, 1, true)?;
        Ok(attr)
    }

    /// Deletes an inode whose last link went: its chunks and xattrs go,
    /// its quotas are credited.
    pub(super) fn remove_inode(w: &mut Work<'_>, rec: &InodeRec) -> Plan<()> {
        let bytes = if rec.attr.kind == FileKind::File { rec.attr.size } else { 0 };
        if rec.attr.kind == FileKind::File {
            data::drop_chunks(w, rec.attr.ino, 0)?;
            if w.lease(rec.attr.ino)?.is_some() {
                w.p.leases.insert(rec.attr.ino, None);
            }
            if w.orphan(rec.attr.ino)?.is_some() {
                w.p.orphans.insert(rec.attr.ino, None);
            }
        }
        // A directory with its own quota counted itself in the realm above.
        data::charge(w, rec.qdir, -(bytes as i64), -1, false)?;
        w.delete_inode(rec.attr.ino);
        Ok(())
    }

    /// Drops one link to `ino`; deletes the inode at zero.
    fn drop_link(w: &mut Work<'_>, ino: Ino, now: Timespec) -> Plan<()> {
        let mut rec = w.must_inode(ino)?;
        if rec.attr.kind == FileKind::Dir {
            return Self::remove_inode(w, &rec);
        }
        rec.attr.nlink = rec.attr.nlink.saturating_sub(1);
        let kept = w.keep.as_mut().filter(|k| rec.attr.kind == FileKind::File && k.open.contains(&ino));
        if let (0, Some(k)) = (rec.attr.nlink, kept) {
            // Open at the caller: it lives on, nameless, until released.
            k.kept.push(ino);
            let hold = k.hold;
            rec.attr.ctime = now;
            w.p.orphans.insert(ino, Some(hold));
            w.put_inode(rec);
        } else if rec.attr.nlink == 0 {
            Self::remove_inode(w, &rec)?;
        } else {
            rec.attr.ctime = now;
            w.put_inode(rec);
        }
        Ok(())
    }

    /// Whether `ancestor` is `ino` or one of its ancestors.
    pub(super) fn is_ancestor(w: &mut Work<'_>, ancestor: Ino, mut ino: Ino) -> Plan<bool> {
        // Depth is bounded by the number of directories; the walk ends at the root.
        for _ in 0..1_000_000 {
            if ino == ancestor {
                return Ok(true);
            }
            if ino == ROOT_INO {
                return Ok(false);
            }
            let rec = w.must_inode(ino)?;
            if rec.parent == ino || rec.parent == 0 {
                return Ok(false);
            }
            ino = rec.parent;
        }
        Err(Fail::Store(KvError("directory parent chain does not end".into())))
    }

    fn rename(
        w: &mut Work<'_>,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        flags: u32,
        now: Timespec,
    ) -> Plan<()> {
        check_name(name)?;
        check_name(new_name)?;
        if flags & !(RENAME_NOREPLACE | RENAME_EXCHANGE) != 0 {
            return Err(Fail::Op(err(ErrorCode::Invalid, format!("unknown rename flags {flags:#x}"))));
        }
        if flags & RENAME_NOREPLACE != 0 && flags & RENAME_EXCHANGE != 0 {
            return Err(Fail::Op(err(ErrorCode::Invalid, "RENAME_NOREPLACE and RENAME_EXCHANGE together")));
        }
        writable(&w.must_dir(parent)?)?;
        writable(&w.must_dir(new_parent)?)?;
        let src = w
            .dentry(parent, name)?
            .ok_or_else(|| err(ErrorCode::NotFound, format!("{:?} does not exist", String::from_utf8_lossy(name))))?;
        let dst = w.dentry(new_parent, new_name)?;

        if flags & RENAME_EXCHANGE != 0 {
            let dst = dst.ok_or_else(|| {
                err(ErrorCode::NotFound, format!("{:?} does not exist", String::from_utf8_lossy(new_name)))
            })?;
            if src.ino == dst.ino {
                return Ok(());
            }
            let (a, b) = (w.must_dir(parent)?, w.must_dir(new_parent)?);
            if data::realm_of(&a) != data::realm_of(&b) {
                return Err(Fail::Op(err(ErrorCode::CrossDevice, "exchanging entries across quota boundaries")));
            }
            if parent != new_parent {
                if src.kind == FileKind::Dir && Self::is_ancestor(w, src.ino, new_parent)? {
                    return Err(Fail::Op(err(ErrorCode::Invalid, "cannot move a directory into itself")));
                }
                if dst.kind == FileKind::Dir && Self::is_ancestor(w, dst.ino, parent)? {
                    return Err(Fail::Op(err(ErrorCode::Invalid, "cannot move a directory into itself")));
                }
            }
            w.put_dentry(parent, name, dst);
            w.put_dentry(new_parent, new_name, src);
            for (moved, from, to) in [(src, parent, new_parent), (dst, new_parent, parent)] {
                let mut rec = w.must_inode(moved.ino)?;
                if !rec.immutable {
                    rec.attr.ctime = now;
                }
                if moved.kind == FileKind::Dir && from != to {
                    rec.parent = to;
                    let mut f = w.must_inode(from)?;
                    f.attr.nlink = f.attr.nlink.saturating_sub(1);
                    w.put_inode(f);
                    let mut t = w.must_inode(to)?;
                    t.attr.nlink += 1;
                    w.put_inode(t);
                }
                w.put_inode(rec);
            }
            for d in [parent, new_parent] {
                let mut rec = w.must_inode(d)?;
                touch_dir(&mut rec, now);
                w.put_inode(rec);
            }
            return Ok(());
        }

        if let Some(dst) = dst {
            if flags & RENAME_NOREPLACE != 0 {
                return Err(Fail::Op(err(
                    ErrorCode::Exists,
                    format!("{:?} exists", String::from_utf8_lossy(new_name)),
                )));
            }
            if dst.ino == src.ino {
                // Two links to one inode: POSIX says do nothing.
                return Ok(());
            }
        }
        if src.kind == FileKind::Dir && Self::is_ancestor(w, src.ino, new_parent)? {
            return Err(Fail::Op(err(ErrorCode::Invalid, "cannot move a directory into its own subtree")));
        }
        if let Some(dst) = dst {
            match (src.kind == FileKind::Dir, dst.kind == FileKind::Dir) {
                (true, false) => {
                    return Err(Fail::Op(err(ErrorCode::NotDir, "cannot replace a non-directory with a directory")))
                }
                (false, true) => {
                    return Err(Fail::Op(err(ErrorCode::IsDir, "cannot replace a directory with a non-directory")))
                }
                (true, true) => {
                    if !w.is_empty_dir(dst.ino)? {
                        return Err(Fail::Op(err(ErrorCode::NotEmpty, "target directory is not empty")));
                    }
                    let mut np = w.must_inode(new_parent)?;
                    np.attr.nlink = np.attr.nlink.saturating_sub(1);
                    w.put_inode(np);
                    Self::drop_link(w, dst.ino, now)?;
                }
                (false, false) => Self::drop_link(w, dst.ino, now)?,
            }
        }
        // Quotas: the moved inode's charges follow it into the new realm.
        let (from_realm, to_realm) = (data::realm_of(&w.must_dir(parent)?), data::realm_of(&w.must_dir(new_parent)?));
        if from_realm != to_realm {
            let moved = w.must_inode(src.ino)?;
            let (bytes, inodes) = match (moved.attr.kind, moved.quota) {
                (_, Some(u)) => (u.used_bytes, u.used_inodes + 1),
                (FileKind::Dir, None) => {
                    return Err(Fail::Op(err(
                        ErrorCode::CrossDevice,
                        "renaming a directory across quota boundaries (copy it instead)",
                    )))
                }
                (FileKind::File, None) => (moved.attr.size, 1),
                (_, None) => (0, 1),
            };
            data::charge(w, moved.qdir, -(bytes as i64), -(inodes as i64), false)?;
            data::charge(w, to_realm, bytes as i64, inodes as i64, true)?;
            let mut moved = w.must_inode(src.ino)?;
            moved.qdir = to_realm;
            w.put_inode(moved);
        }
        w.delete_dentry(parent, name);
        w.put_dentry(new_parent, new_name, src);
        let mut rec = w.must_inode(src.ino)?;
        if !rec.immutable {
            rec.attr.ctime = now;
        }
        if src.kind == FileKind::Dir && parent != new_parent {
            let np = w.must_inode(new_parent)?;
            if np.attr.nlink >= MAX_LINKS {
                return Err(Fail::Op(err(ErrorCode::TooManyLinks, "too many subdirectories")));
            }
            rec.parent = new_parent;
            let mut p = w.must_inode(parent)?;
            p.attr.nlink = p.attr.nlink.saturating_sub(1);
            w.put_inode(p);
            let mut np = w.must_inode(new_parent)?;
            np.attr.nlink += 1;
            w.put_inode(np);
        }
        w.put_inode(rec);
        for d in [parent, new_parent] {
            let mut rec = w.must_inode(d)?;
            touch_dir(&mut rec, now);
            w.put_inode(rec);
        }
        Ok(())
    }

    fn check_xattr_name(name: &[u8]) -> Plan<()> {
        if name.is_empty() {
            return Err(Fail::Op(err(ErrorCode::Range, "empty xattr name")));
        }
        if name.len() > MAX_XATTR_NAME_BYTES {
            return Err(Fail::Op(err(ErrorCode::Range, "xattr name too long")));
        }
        if name.contains(&0) {
            return Err(Fail::Op(err(ErrorCode::Invalid, "xattr name contains NUL")));
        }
        let ok = [&b"user."[..], b"trusted.", b"security."].iter().any(|p| name.starts_with(p) && name.len() > p.len());
        if !ok {
            return Err(Fail::Op(err(
                ErrorCode::NotSupported,
                format!("xattr namespace of {:?} is not supported", String::from_utf8_lossy(name)),
            )));
        }
        Ok(())
    }

    fn plan(w: &mut Work<'_>, prop: &Proposal, now: Timespec, index: u64) -> Plan<OpReply> {
        let op = &prop.op;
        let client = prop.id.map(|id| id.client);
        match op {
            MetaOp::Mkdir { parent, name, perm, caller } => {
                Self::make_node(w, *parent, name, FileKind::Dir, *perm, *caller, Stamp { now, index })
                    .map(OpReply::Attr)
            }
            MetaOp::Create { parent, name, perm, caller, exclusive } => {
                check_name(name)?;
                if let Some(existing) = {
                    w.must_dir(*parent)?;
                    w.dentry(*parent, name)?
                } {
                    if *exclusive {
                        return Err(Fail::Op(err(
                            ErrorCode::Exists,
                            format!("{:?} exists", String::from_utf8_lossy(name)),
                        )));
                    }
                    return match existing.kind {
                        FileKind::File => Ok(OpReply::Attr(w.must_inode(existing.ino)?.attr)),
                        FileKind::Dir => Err(Fail::Op(err(ErrorCode::IsDir, "a directory has that name"))),
                        _ => Err(Fail::Op(err(ErrorCode::Exists, "a special file has that name"))),
                    };
                }
                Self::make_node(w, *parent, name, FileKind::File, *perm, *caller, Stamp { now, index })
                    .map(OpReply::Attr)
            }
            MetaOp::Mknod { parent, name, mode, rdev, caller } => {
                let kind = FileKind::from_mode(*mode)
                    .ok_or_else(|| err(ErrorCode::Invalid, format!("unknown file type in mode {mode:#o}")))?;
                if kind == FileKind::Dir || kind == FileKind::Symlink {
                    return Err(Fail::Op(err(ErrorCode::Invalid, "mknod cannot make directories or symlinks")));
                }
                let attr = Self::make_node(w, *parent, name, kind, *mode, *caller, Stamp { now, index })?;
                let mut rec = w.must_inode(attr.ino)?;
                rec.attr.rdev = if matches!(kind, FileKind::CharDevice | FileKind::BlockDevice) { *rdev } else { 0 };
                let attr = rec.attr.clone();
                w.put_inode(rec);
                Ok(OpReply::Attr(attr))
            }
            MetaOp::Symlink { parent, name, target, caller } => {
                if target.is_empty() {
                    return Err(Fail::Op(err(ErrorCode::NotFound, "empty symlink target")));
                }
                if target.len() > MAX_SYMLINK_BYTES {
                    return Err(Fail::Op(err(ErrorCode::NameTooLong, "symlink target too long")));
                }
                if target.contains(&0) {
                    return Err(Fail::Op(err(ErrorCode::Invalid, "symlink target contains NUL")));
                }
                let attr = Self::make_node(w, *parent, name, FileKind::Symlink, 0o777, *caller, Stamp { now, index })?;
                let mut rec = w.must_inode(attr.ino)?;
                rec.target = target.clone();
                rec.attr.size = target.len() as u64;
                let attr = rec.attr.clone();
                w.put_inode(rec);
                Ok(OpReply::Attr(attr))
            }
            MetaOp::Link { ino, new_parent, new_name } => {
                check_name(new_name)?;
                let mut rec = w.must_inode(*ino)?;
                if rec.attr.kind == FileKind::Dir {
                    return Err(Fail::Op(err(ErrorCode::NotPermitted, "cannot hard-link a directory")));
                }
                if rec.attr.nlink == 0 {
                    return Err(Fail::Op(err(ErrorCode::NotFound, format!("inode {ino} has no name left"))));
                }
                writable(&rec)?;
                if rec.attr.nlink >= MAX_LINKS {
                    return Err(Fail::Op(err(ErrorCode::TooManyLinks, "too many links")));
                }
                let mut p = w.must_dir(*new_parent)?;
                writable(&p)?;
                if w.dentry(*new_parent, new_name)?.is_some() {
                    return Err(Fail::Op(err(
                        ErrorCode::Exists,
                        format!("{:?} exists", String::from_utf8_lossy(new_name)),
                    )));
                }
                rec.attr.nlink += 1;
                rec.attr.ctime = now;
                w.put_dentry(*new_parent, new_name, DentryRec { ino: *ino, kind: rec.attr.kind });
                let attr = rec.attr.clone();
                w.put_inode(rec);
                touch_dir(&mut p, now);
                w.put_inode(p);
                Ok(OpReply::Attr(attr))
            }
            MetaOp::Unlink { parent, name } => {
                check_name(name)?;
                writable(&w.must_dir(*parent)?)?;
                let d = w.dentry(*parent, name)?.ok_or_else(|| {
                    err(ErrorCode::NotFound, format!("{:?} does not exist", String::from_utf8_lossy(name)))
                })?;
                if d.kind == FileKind::Dir {
                    return Err(Fail::Op(err(ErrorCode::IsDir, "is a directory (use rmdir)")));
                }
                w.delete_dentry(*parent, name);
                Self::drop_link(w, d.ino, now)?;
                // Reloaded: dropping the link may have credited this directory's quota.
                let mut p = w.must_dir(*parent)?;
                touch_dir(&mut p, now);
                w.put_inode(p);
                Ok(OpReply::Done)
            }
            MetaOp::Rmdir { parent, name } => {
                check_name(name)?;
                let mut p = w.must_dir(*parent)?;
                writable(&p)?;
                let d = w.dentry(*parent, name)?.ok_or_else(|| {
                    err(ErrorCode::NotFound, format!("{:?} does not exist", String::from_utf8_lossy(name)))
                })?;
                if d.kind != FileKind::Dir {
                    return Err(Fail::Op(err(ErrorCode::NotDir, "not a directory")));
                }
                if !w.is_empty_dir(d.ino)? {
                    return Err(Fail::Op(err(ErrorCode::NotEmpty, "directory is not empty")));
                }
                w.delete_dentry(*parent, name);
                p.attr.nlink = p.attr.nlink.saturating_sub(1);
                touch_dir(&mut p, now);
                w.put_inode(p);
                let gone = w.must_inode(d.ino)?;
                Self::remove_inode(w, &gone)?;
                Ok(OpReply::Done)
            }
            MetaOp::Rename { parent, name, new_parent, new_name, flags } => {
                Self::rename(w, *parent, name, *new_parent, new_name, *flags, now)?;
                Ok(OpReply::Done)
            }
            MetaOp::SetAttr { ino, set } => {
                let mut rec = w.must_inode(*ino)?;
                writable(&rec)?;
                if let Some(mode) = set.mode {
                    rec.attr.perm = mode & 0o7777;
                }
                if let Some(uid) = set.uid {
                    rec.attr.uid = uid;
                }
                if let Some(gid) = set.gid {
                    rec.attr.gid = gid;
                }
                if let Some(size) = set.size {
                    w.check_lease(*ino, client, now)?;
                    match rec.attr.kind {
                        FileKind::File => {}
                        FileKind::Dir => return Err(Fail::Op(err(ErrorCode::IsDir, "cannot truncate a directory"))),
                        _ => return Err(Fail::Op(err(ErrorCode::Invalid, "cannot truncate a special file"))),
                    }
                    if size != rec.attr.size {
                        data::resize(w, &rec, size)?;
                        rec.attr.size = size;
                    }
                    // Like Linux's local filesystems: a truncate (and an
                    // open with O_TRUNC) sets mtime even when the size
                    // stays; an mtime given as well wins below.
                    rec.attr.mtime = now;
                }
                let pick = |t: SetTime| match t {
                    SetTime::Now => now,
                    SetTime::At(t) => t,
                };
                if let Some(t) = set.atime {
                    rec.attr.atime = pick(t);
                }
                if let Some(t) = set.mtime {
                    rec.attr.mtime = pick(t);
                }
                rec.attr.ctime = set.ctime.unwrap_or(now);
                let attr = rec.attr.clone();
                w.put_inode(rec);
                Ok(OpReply::Attr(attr))
            }
            MetaOp::SetXattr { ino, name, value, flags } => {
                Self::check_xattr_name(name)?;
                if value.len() > MAX_XATTR_VALUE_BYTES {
                    return Err(Fail::Op(err(ErrorCode::TooBig, "xattr value too large")));
                }
                if flags & !(XATTR_CREATE | XATTR_REPLACE) != 0 {
                    return Err(Fail::Op(err(ErrorCode::Invalid, format!("unknown xattr flags {flags:#x}"))));
                }
                let mut rec = w.must_inode(*ino)?;
                writable(&rec)?;
                let exists = w.xattr_exists(*ino, name)?;
                if exists && flags & XATTR_CREATE != 0 {
                    return Err(Fail::Op(err(ErrorCode::Exists, "xattr exists")));
                }
                if !exists && flags & XATTR_REPLACE != 0 {
                    return Err(Fail::Op(err(ErrorCode::NoData, "no such xattr")));
                }
                if !exists {
                    if rec.xattrs as usize >= MAX_XATTRS_PER_INODE {
                        return Err(Fail::Op(err(ErrorCode::NoSpace, "too many xattrs on this inode")));
                    }
                    rec.xattrs += 1;
                }
                rec.attr.ctime = now;
                w.p.xattrs.insert((*ino, name.clone()), Some(value.clone()));
                w.put_inode(rec);
                Ok(OpReply::Done)
            }
            MetaOp::RemoveXattr { ino, name } => {
                Self::check_xattr_name(name)?;
                let mut rec = w.must_inode(*ino)?;
                writable(&rec)?;
                if !w.xattr_exists(*ino, name)? {
                    return Err(Fail::Op(err(ErrorCode::NoData, "no such xattr")));
                }
                rec.xattrs = rec.xattrs.saturating_sub(1);
                rec.attr.ctime = now;
                w.p.xattrs.insert((*ino, name.clone()), None);
                w.put_inode(rec);
                Ok(OpReply::Done)
            }
            MetaOp::PrepareWrite { ino, offset, len, extend } => {
                w.check_lease(*ino, client, now)?;
                data::prepare_write(w, *ino, *offset, *len, *extend, &prop.placement, now)
            }
            MetaOp::ExtendSize { ino, size } => {
                w.check_lease(*ino, client, now)?;
                data::extend_size(w, *ino, *size, now)
            }
            MetaOp::ReplicaFailed { ino, index, chunk, version, server } => {
                data::replica_failed(w, *ino, *index, *chunk, *version, *server)
            }
            MetaOp::SetGoal { ino, goal } => data::set_goal(w, *ino, *goal, now),
            MetaOp::SetQuota { ino, limits } => data::set_quota(w, *ino, *limits, now),
            MetaOp::Clone { src, parent, name, snapshot } => {
                clone::clone_tree(w, *src, *parent, name, *snapshot, Stamp { now, index }).map(OpReply::Cloned)
            }
            MetaOp::CowChunk { ino, index, chunk } => {
                w.check_lease(*ino, client, now)?;
                clone::cow_chunk(w, *ino, *index, *chunk, now)
            }
            MetaOp::CowDone { chunk } => clone::cow_done(w, *chunk),
            MetaOp::DropSnapshot { parent, name } => clone::drop_snapshot(w, *parent, name, now),
            MetaOp::Lease { ino, ttl_ms } => data::lease(w, *ino, client, *ttl_ms, now),
            MetaOp::KeepOpen { open, ttl_ms, op: inner } => {
                if !matches!(**inner, MetaOp::Unlink { .. } | MetaOp::Rename { .. }) {
                    return Err(Fail::Op(err(ErrorCode::Invalid, "only an unlink or a rename keeps open files")));
                }
                let hold = orphan_hold(client, open.len(), *ttl_ms, now)?;
                w.keep = Some(Keep { open: open.iter().copied().collect(), hold, kept: Vec::new() });
                let inner = Proposal { id: prop.id, op: (**inner).clone(), placement: Vec::new() };
                Self::plan(w, &inner, now, index)?;
                Ok(OpReply::Orphans(w.keep.take().map(|k| k.kept).unwrap_or_default()))
            }
            MetaOp::HoldOrphans { inos, ttl_ms } => {
                let hold = orphan_hold(client, inos.len(), (*ttl_ms).max(1), now)?;
                let mut kept = Vec::new();
                for &ino in inos {
                    match w.orphan(ino)? {
                        Some(o) if o.holder == hold.holder => {}
                        _ => continue,
                    }
                    if *ttl_ms == 0 {
                        Self::drop_orphan(w, ino)?;
                    } else {
                        w.p.orphans.insert(ino, Some(hold));
                        kept.push(ino);
                    }
                }
                Ok(OpReply::Orphans(kept))
            }
        }
    }

    /// Removes orphan `ino`: its hold goes, and the inode too unless a
    /// link came back.
    fn drop_orphan(w: &mut Work<'_>, ino: Ino) -> Plan<()> {
        w.p.orphans.insert(ino, None);
        match w.inode(ino)? {
            Some(rec) if rec.attr.nlink == 0 => Self::remove_inode(w, &rec),
            _ => Ok(()),
        }
    }

    fn plan_system(w: &mut Work<'_>, op: &SystemOp, now: Timespec) -> Plan<SystemReply> {
        match op {
            SystemOp::ReapOrphans => {
                let start = vec![keys::ORPHAN];
                let end = vec![keys::ORPHAN + 1];
                let mut lapsed = Vec::new();
                w.kv.scan(&start, &end, &mut |k, v| {
                    if let (Some(ino), Ok(l)) = (keys::orphan_ino(k), dec::<Lease>(v)) {
                        if l.expires <= now {
                            lapsed.push(ino);
                        }
                    }
                    lapsed.len() < MAX_REAP_PER_COMMAND
                })?;
                for ino in lapsed {
                    Self::drop_orphan(w, ino)?;
                }
                Ok(SystemReply::Done)
            }
            SystemOp::RegisterServer { id, addr, topology } => {
                if addr.is_empty() {
                    return Err(Fail::Op(err(ErrorCode::Invalid, "a chunk server needs an address")));
                }
                let next = get_counter(w.kv, NEXT_SERVER)?.max(1);
                let id = id.unwrap_or(next);
                w.p.servers.insert(id, ServerRec { id, addr: addr.clone(), topology: topology.clone() });
                w.p.next_server = Some(next.max(id + 1));
                Ok(SystemReply::Server(id))
            }
            SystemOp::AddReplica { chunk, version, server, drop } => {
                let Some(mut c) = w.chunk(*chunk)? else { return Ok(SystemReply::Skipped) };
                if c.version != *version {
                    return Ok(SystemReply::Skipped);
                }
                if !c.replicas.contains(server) {
                    c.replicas.push(*server);
                }
                c.replicas.retain(|s| !drop.contains(s) || s == server);
                // The copy's source sealed its replica at the next version
                // when the copy ended: writes that missed the new replica
                // were refused, and from now on every replica is there.
                c.version += 1;
                w.p.chunks.insert(*chunk, Some(c));
                Ok(SystemReply::Done)
            }
            SystemOp::RemoveReplica { chunk, server } => {
                let Some(mut c) = w.chunk(*chunk)? else { return Ok(SystemReply::Skipped) };
                // The last copy stays listed even when suspect: it is all there is.
                if !c.replicas.contains(server) || c.replicas.len() == 1 {
                    return Ok(SystemReply::Skipped);
                }
                c.replicas.retain(|s| s != server);
                w.p.chunks.insert(*chunk, Some(c));
                Ok(SystemReply::Done)
            }
        }
    }

    /// Applies one operation; returns its result. Store failures propagate.
    fn apply_op(
        txn: &mut Txn<'_>,
        op: &Proposal,
        now: Timespec,
        index: u64,
        changes: &mut Vec<Change>,
    ) -> Result<OpResult, KvError> {
        let (outcome, planned) = {
            let mut w = Work::new(&*txn);
            let outcome = Self::plan(&mut w, op, now, index);
            (outcome, w.p)
        };
        match outcome {
            Ok(mut reply) => {
                planned.commit(txn, changes, Some(&mut reply))?;
                Ok(Ok(reply))
            }
            Err(Fail::Op(e)) => Ok(Err(e)),
            Err(Fail::Store(e)) => Err(e),
        }
    }

    fn ensure_root(txn: &mut Txn<'_>, now: Timespec, changes: &mut Vec<Change>) -> Result<(), KvError> {
        if load_inode(txn, ROOT_INO)?.is_some() {
            return Ok(());
        }
        let mut attr = new_attr(ROOT_INO, FileKind::Dir, 0o755, Caller::ROOT, 0, now, 0);
        attr.nlink = 2;
        let rec = InodeRec {
            attr: attr.clone(),
            parent: ROOT_INO,
            target: Vec::new(),
            xattrs: 0,
            goal: Goal::DEFAULT,
            qdir: 0,
            quota: None,
            immutable: false,
            chunks: 0,
        };
        txn.put(keys::inode(ROOT_INO), enc(&rec));
        set_counter(txn, INODE_COUNT, get_counter(txn, INODE_COUNT)? + 1);
        if get_counter(txn, NEXT_INO)? <= ROOT_INO {
            set_counter(txn, NEXT_INO, ROOT_INO + 1);
        }
        changes.push(Change::InodeSet(attr));
        Ok(())
    }

    fn gc_dedup(txn: &mut Txn<'_>, now: Timespec) -> Result<(), KvError> {
        // From where the last collection stopped, not from the start of the
        // keyspace: the logs deleted before are tombstones until RocksDB
        // compacts them, and a scan walks every one (with a scan from the
        // start, each command's apply slowed down as the service aged).
        let floor = get_counter(txn, DEDUP_FLOOR)?;
        let start = keys::dedup_log(floor);
        let end = vec![keys::DEDUP_EXPIRY + 1];
        let mut next = floor;
        // Oldest commands first; stop at the first that has not expired.
        for (k, v) in txn.scan_collect(&start, &end, DEDUP_GC_PER_COMMAND)? {
            let log: DedupLog = dec(&v)?;
            if log.expiry_ns > now.as_nanos() {
                break;
            }
            for id in &log.ids {
                txn.delete(keys::dedup(id));
            }
            next = keys::dedup_log_index(&k).map_or(next, |i| i + 1);
            txn.delete(k);
        }
        if next != floor {
            set_counter(txn, DEDUP_FLOOR, next);
        }
        Ok(())
    }
}

impl StateMachineLogic for Namespace {
    fn apply(&self, txn: &mut Txn<'_>, index: u64, command: &[u8]) -> Result<Vec<u8>, KvError> {
        let cmd: Command = match postcard::from_bytes(command) {
            Ok(c) => c,
            Err(e) => {
                // A command this build cannot decode was proposed by a newer
                // leader; refusing it deterministically keeps replicas equal.
                let r: Vec<OpResult> = vec![Err(err(ErrorCode::BadRequest, format!("undecodable command: {e}")))];
                return Ok(enc(&r));
            }
        };
        let mut changes = Vec::new();
        let now = match &cmd {
            Command::Batch { now, .. }
            | Command::Init { now, .. }
            | Command::InitBlocks { now, .. }
            | Command::System { now, .. }
            | Command::Vm { now, .. } => *now,
        };
        Self::ensure_root(txn, now, &mut changes)?;
        if let Command::Init { chunk_bytes, .. } | Command::InitBlocks { chunk_bytes, .. } = &cmd {
            if get_counter(txn, CHUNK_BYTES)? == 0 && *chunk_bytes > 0 {
                set_counter(txn, CHUNK_BYTES, *chunk_bytes);
                if let Command::InitBlocks { block_bytes, .. } = &cmd {
                    set_counter(txn, BLOCK_BYTES, *block_bytes);
                }
            }
        }
        if let Command::System { ops, .. } = &cmd {
            let mut replies: Vec<Result<SystemReply, WireError>> = Vec::with_capacity(ops.len());
            for op in ops {
                let (outcome, planned) = {
                    let mut w = Work::new(&*txn);
                    let outcome = Self::plan_system(&mut w, op, now);
                    (outcome, w.p)
                };
                replies.push(match outcome {
                    Ok(r) => {
                        planned.commit(txn, &mut changes, None)?;
                        Ok(r)
                    }
                    Err(Fail::Op(e)) => Err(e),
                    Err(Fail::Store(e)) => return Err(e),
                });
            }
            set_counter(txn, APPLIED, index);
            return Ok(enc(&replies));
        }
        if let Command::Vm { cmds, .. } = &cmd {
            let mut replies = Vec::with_capacity(cmds.len());
            for c in cmds {
                replies.push(super::vm::apply(txn, now, c, &mut changes)?);
            }
            if !changes.is_empty() {
                txn.put(keys::change(index), enc(&changes));
            }
            set_counter(txn, APPLIED, index);
            return Ok(enc(&replies));
        }
        let mut results: Vec<OpResult> = Vec::new();
        let mut ids = Vec::new();
        if let Command::Batch { ops, .. } = &cmd {
            Self::gc_dedup(txn, now)?;
            for op in ops {
                let id = &op.id;
                if let Some(id) = id {
                    if let Some(b) = txn.get(&keys::dedup(id))? {
                        let rec: DedupRec = dec(&b)?;
                        results.push(rec.reply);
                        continue;
                    }
                }
                let r = Self::apply_op(txn, op, now, index, &mut changes)?;
                if let Some(id) = id {
                    txn.put(keys::dedup(id), enc(&DedupRec { reply: r.clone() }));
                    ids.push(*id);
                }
                results.push(r);
            }
        }
        if !ids.is_empty() {
            txn.put(keys::dedup_log(index), enc(&DedupLog { expiry_ns: now.as_nanos() + DEDUP_TTL_NS, ids }));
        }
        if !changes.is_empty() {
            txn.put(keys::change(index), enc(&changes));
        }
        let trim_every = CHANGE_TRIM_EVERY.min(self.change_retain.max(1));
        if index.is_multiple_of(trim_every) && index > self.change_retain {
            let floor = index - self.change_retain;
            txn.delete_range(keys::change(0), keys::change(floor));
            set_counter(txn, CHANGE_FLOOR, floor);
        }
        set_counter(txn, APPLIED, index);
        Ok(enc(&results))
    }
}
