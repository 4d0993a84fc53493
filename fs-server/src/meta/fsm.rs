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
    Batch { now: Timespec, ops: Vec<(Option<RequestId>, MetaOp)> },
    /// Creates the root directory if it does not exist yet.
    Init { now: Timespec },
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

fn set_counter(txn: &mut Txn<'_>, name: &str, v: u64) {
    txn.put(keys::system(name), v.to_be_bytes().to_vec());
}

pub const NEXT_INO: &str = "next_ino";
pub const INODE_COUNT: &str = "inodes";
pub const APPLIED: &str = "applied";
pub const CHANGE_FLOOR: &str = "change_floor";

fn err(code: ErrorCode, msg: impl Into<String>) -> WireError {
    WireError::new(code, msg)
}

/// Outcome of planning one operation: a domain error, or a broken store.
enum Fail {
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

type Plan<T> = Result<T, Fail>;

/// The inodes, entries and xattrs one operation changes, written only when
/// the whole operation succeeds.
#[derive(Default)]
struct Planned {
    inodes: BTreeMap<Ino, Option<InodeRec>>,
    dentries: BTreeMap<(Ino, Vec<u8>), Option<DentryRec>>,
    xattrs: BTreeMap<(Ino, Vec<u8>), Option<Vec<u8>>>,
    /// Inodes whose xattrs all go (the inode is deleted).
    drop_xattrs: Vec<Ino>,
    next_ino: Option<u64>,
    inode_delta: i64,
}

/// Plans one operation over a read view.
struct Work<'k> {
    kv: &'k dyn KvRead,
    p: Planned,
}

impl<'k> Work<'k> {
    fn new(kv: &'k dyn KvRead) -> Self {
        Work { kv, p: Planned::default() }
    }

    fn inode(&mut self, ino: Ino) -> Plan<Option<InodeRec>> {
        if let Some(v) = self.p.inodes.get(&ino) {
            return Ok(v.clone());
        }
        Ok(load_inode(self.kv, ino)?)
    }

    fn must_inode(&mut self, ino: Ino) -> Plan<InodeRec> {
        self.inode(ino)?.ok_or_else(|| Fail::Op(err(ErrorCode::NotFound, format!("inode {ino} does not exist"))))
    }

    fn must_dir(&mut self, ino: Ino) -> Plan<InodeRec> {
        let rec = self.must_inode(ino)?;
        if rec.attr.kind != FileKind::Dir {
            return Err(Fail::Op(err(ErrorCode::NotDir, format!("inode {ino} is not a directory"))));
        }
        Ok(rec)
    }

    fn dentry(&mut self, parent: Ino, name: &[u8]) -> Plan<Option<DentryRec>> {
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

    fn put_inode(&mut self, rec: InodeRec) {
        self.p.inodes.insert(rec.attr.ino, Some(rec));
    }

    fn delete_inode(&mut self, ino: Ino) {
        self.p.inodes.insert(ino, None);
        self.p.drop_xattrs.push(ino);
        self.p.inode_delta -= 1;
    }

    fn put_dentry(&mut self, parent: Ino, name: &[u8], d: DentryRec) {
        self.p.dentries.insert((parent, name.to_vec()), Some(d));
    }

    fn delete_dentry(&mut self, parent: Ino, name: &[u8]) {
        self.p.dentries.insert((parent, name.to_vec()), None);
    }

    fn alloc_ino(&mut self) -> Plan<Ino> {
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
    /// Writes the plan and records the changes it makes.
    fn commit(self, txn: &mut Txn<'_>, changes: &mut Vec<Change>) -> Result<(), KvError> {
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
        if self.inode_delta != 0 {
            let count = get_counter(txn, INODE_COUNT)? as i64 + self.inode_delta;
            set_counter(txn, INODE_COUNT, count.max(0) as u64);
        }
        Ok(())
    }
}

fn check_name(name: &[u8]) -> Plan<()> {
    validate_name(name).map_err(Fail::Op)
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

fn touch_dir(rec: &mut InodeRec, now: Timespec) {
    rec.attr.mtime = now;
    rec.attr.ctime = now;
}

/// When an operation happens: the leader's clock and the log index.
#[derive(Debug, Clone, Copy)]
struct Stamp {
    now: Timespec,
    index: u64,
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
        let rec = InodeRec {
            attr: attr.clone(),
            parent: if kind == FileKind::Dir { parent } else { 0 },
            target: Vec::new(),
            xattrs: 0,
        };
        w.put_inode(rec);
        w.put_dentry(parent, name, DentryRec { ino, kind });
        if kind == FileKind::Dir {
            p.attr.nlink += 1;
        }
        touch_dir(&mut p, at.now);
        w.put_inode(p);
        Ok(attr)
    }

    /// Drops one link to `ino`; deletes the inode at zero.
    fn drop_link(w: &mut Work<'_>, ino: Ino, now: Timespec) -> Plan<()> {
        let mut rec = w.must_inode(ino)?;
        if rec.attr.kind == FileKind::Dir {
            w.delete_inode(ino);
            return Ok(());
        }
        rec.attr.nlink = rec.attr.nlink.saturating_sub(1);
        if rec.attr.nlink == 0 {
            w.delete_inode(ino);
        } else {
            rec.attr.ctime = now;
            w.put_inode(rec);
        }
        Ok(())
    }

    /// Whether `ancestor` is `ino` or one of its ancestors.
    fn is_ancestor(w: &mut Work<'_>, ancestor: Ino, mut ino: Ino) -> Plan<bool> {
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
        w.must_dir(parent)?;
        w.must_dir(new_parent)?;
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
                rec.attr.ctime = now;
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
        w.delete_dentry(parent, name);
        w.put_dentry(new_parent, new_name, src);
        let mut rec = w.must_inode(src.ino)?;
        rec.attr.ctime = now;
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

    fn plan(w: &mut Work<'_>, op: &MetaOp, now: Timespec, index: u64) -> Plan<OpReply> {
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
                if rec.attr.nlink >= MAX_LINKS {
                    return Err(Fail::Op(err(ErrorCode::TooManyLinks, "too many links")));
                }
                let mut p = w.must_dir(*new_parent)?;
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
                let mut p = w.must_dir(*parent)?;
                let d = w.dentry(*parent, name)?.ok_or_else(|| {
                    err(ErrorCode::NotFound, format!("{:?} does not exist", String::from_utf8_lossy(name)))
                })?;
                if d.kind == FileKind::Dir {
                    return Err(Fail::Op(err(ErrorCode::IsDir, "is a directory (use rmdir)")));
                }
                w.delete_dentry(*parent, name);
                Self::drop_link(w, d.ino, now)?;
                touch_dir(&mut p, now);
                w.put_inode(p);
                Ok(OpReply::Done)
            }
            MetaOp::Rmdir { parent, name } => {
                check_name(name)?;
                let mut p = w.must_dir(*parent)?;
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
                w.delete_inode(d.ino);
                p.attr.nlink = p.attr.nlink.saturating_sub(1);
                touch_dir(&mut p, now);
                w.put_inode(p);
                Ok(OpReply::Done)
            }
            MetaOp::Rename { parent, name, new_parent, new_name, flags } => {
                Self::rename(w, *parent, name, *new_parent, new_name, *flags, now)?;
                Ok(OpReply::Done)
            }
            MetaOp::SetAttr { ino, set } => {
                let mut rec = w.must_inode(*ino)?;
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
                    match rec.attr.kind {
                        FileKind::File => {}
                        FileKind::Dir => return Err(Fail::Op(err(ErrorCode::IsDir, "cannot truncate a directory"))),
                        _ => return Err(Fail::Op(err(ErrorCode::Invalid, "cannot truncate a special file"))),
                    }
                    if size > i64::MAX as u64 {
                        return Err(Fail::Op(err(ErrorCode::TooBig, "size too large")));
                    }
                    if size != rec.attr.size {
                        rec.attr.size = size;
                        rec.attr.mtime = now;
                    }
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
                if !w.xattr_exists(*ino, name)? {
                    return Err(Fail::Op(err(ErrorCode::NoData, "no such xattr")));
                }
                rec.xattrs = rec.xattrs.saturating_sub(1);
                rec.attr.ctime = now;
                w.p.xattrs.insert((*ino, name.clone()), None);
                w.put_inode(rec);
                Ok(OpReply::Done)
            }
        }
    }

    /// Applies one operation; returns its result. Store failures propagate.
    fn apply_op(
        txn: &mut Txn<'_>,
        op: &MetaOp,
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
            Ok(reply) => {
                planned.commit(txn, changes)?;
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
        let rec = InodeRec { attr: attr.clone(), parent: ROOT_INO, target: Vec::new(), xattrs: 0 };
        txn.put(keys::inode(ROOT_INO), enc(&rec));
        set_counter(txn, INODE_COUNT, get_counter(txn, INODE_COUNT)? + 1);
        if get_counter(txn, NEXT_INO)? <= ROOT_INO {
            set_counter(txn, NEXT_INO, ROOT_INO + 1);
        }
        changes.push(Change::InodeSet(attr));
        Ok(())
    }

    fn gc_dedup(txn: &mut Txn<'_>, now: Timespec) -> Result<(), KvError> {
        let start = vec![keys::DEDUP_EXPIRY];
        let end = vec![keys::DEDUP_EXPIRY + 1];
        // Oldest commands first; stop at the first that has not expired.
        for (k, v) in txn.scan_collect(&start, &end, DEDUP_GC_PER_COMMAND)? {
            let log: DedupLog = dec(&v)?;
            if log.expiry_ns > now.as_nanos() {
                break;
            }
            for id in &log.ids {
                txn.delete(keys::dedup(id));
            }
            txn.delete(k);
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
            Command::Batch { now, .. } | Command::Init { now } => *now,
        };
        Self::ensure_root(txn, now, &mut changes)?;
        let mut results: Vec<OpResult> = Vec::new();
        let mut ids = Vec::new();
        if let Command::Batch { ops, .. } = &cmd {
            Self::gc_dedup(txn, now)?;
            for (id, op) in ops {
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
