//! File data in the namespace state machine: chunk allocation and layout,
//! sizes, replica bookkeeping, replication goals and directory quotas.
//!
//! Same rules as the rest of the state machine: pure, deterministic,
//! planned on a [`Work`] set and written only when the operation succeeds.
//! Placement is decided by the leader (it alone knows which servers are
//! alive and how full they are) and travels in the log with the operation.

use std::collections::{BTreeMap, BTreeSet};

use fs_client::proto::*;
use raft::KvError;

use super::fsm::{
    dec, err, get_counter, writable, ChunkRec, Fail, InodeRec, Plan, ServerRec, Work, BLOCK_BYTES, CHUNK_BYTES,
};
use super::keys;

/// Most inodes a new quota may have to count below its directory. Larger
/// trees get their quota before they fill up, or on subdirectories.
pub const MAX_QUOTA_WALK_INODES: usize = 100_000;
/// Longest chain of nested quotas followed; a longer one is a corrupt store.
const MAX_QUOTA_DEPTH: usize = 4096;
/// The largest file size.
pub const MAX_FILE_BYTES: u64 = 1 << 60;

/// The cluster's chunk size.
pub fn chunk_bytes(kv: &dyn raft::KvRead) -> Result<u64, KvError> {
    let c = get_counter(kv, CHUNK_BYTES)?;
    Ok(if c == 0 { DEFAULT_CHUNK_BYTES } else { c })
}

/// The cluster's checksum block size (what chunk servers format with).
pub fn block_bytes(kv: &dyn raft::KvRead) -> Result<u64, KvError> {
    let c = get_counter(kv, BLOCK_BYTES)?;
    Ok(if c == 0 { LEGACY_BLOCK_BYTES } else { c })
}

pub fn load_server(kv: &dyn raft::KvRead, id: ServerId) -> Result<Option<ServerRec>, KvError> {
    kv.get(&keys::server(id))?.map(|b| dec(&b)).transpose()
}

pub fn load_lease(kv: &dyn raft::KvRead, ino: Ino) -> Result<Option<Lease>, KvError> {
    kv.get(&keys::lease(ino))?.map(|b| dec(&b)).transpose()
}

pub fn load_chunk(kv: &dyn raft::KvRead, id: ChunkId) -> Result<Option<ChunkRec>, KvError> {
    kv.get(&keys::chunk(id))?.map(|b| dec(&b)).transpose()
}

/// The chunk id at `index` of file `ino`, if any.
pub fn load_file_chunk(kv: &dyn raft::KvRead, ino: Ino, index: u64) -> Result<Option<ChunkId>, KvError> {
    match kv.get(&keys::file_chunk(ino, index))? {
        Some(b) => Ok(Some(u64::from_be_bytes(
            b.as_slice().try_into().map_err(|_| KvError(format!("bad chunk entry of inode {ino}")))?,
        ))),
        None => Ok(None),
    }
}

/// A chunk's location with its servers' addresses. The origin of a
/// copy-on-write chunk is given at the origin's current version (a clone
/// or a repair may have raised it since the copy was made).
pub fn location(kv: &dyn raft::KvRead, index: u64, chunk: ChunkId, rec: &ChunkRec) -> Result<ChunkLocation, KvError> {
    let mut replicas = Vec::with_capacity(rec.replicas.len());
    for s in &rec.replicas {
        if let Some(srv) = load_server(kv, *s)? {
            replicas.push(ReplicaInfo { server: srv.id, addr: srv.addr, topology: srv.topology });
        }
    }
    let origin = match rec.origin {
        Some(o) => load_chunk(kv, o)?.map(|oc| (o, oc.version)),
        None => None,
    };
    Ok(ChunkLocation { index, chunk, version: rec.version, replicas, shared: rec.refs > 1, origin })
}

/// [`location`] seeing the operation's planned changes.
pub(super) fn planned_location(w: &mut Work<'_>, index: u64, chunk: ChunkId, rec: &ChunkRec) -> Plan<ChunkLocation> {
    let mut loc = location(w.kv, index, chunk, rec)?;
    loc.origin = match rec.origin {
        Some(o) => w.chunk(o)?.map(|oc| (o, oc.version)),
        None => None,
    };
    Ok(loc)
}

/// Drops one reference to a chunk; at zero it leaves the chunk map (its
/// servers delete it when they next report) and releases its origin.
pub(super) fn release_chunk(w: &mut Work<'_>, id: ChunkId) -> Plan<()> {
    let mut next = Some(id);
    // Each step frees one chunk; origins always have smaller ids, so the
    // walk ends.
    while let Some(id) = next.take() {
        let Some(mut c) = w.chunk(id)? else { return Ok(()) };
        c.refs = c.refs.saturating_sub(1);
        if c.refs == 0 {
            w.p.chunks.insert(id, None);
            next = c.origin.filter(|o| *o < id);
        } else {
            w.p.chunks.insert(id, Some(c));
        }
    }
    Ok(())
}

/// Locations of chunks `first..first+count` of a file (holes left out).
pub fn layout(kv: &dyn raft::KvRead, rec: &InodeRec, first: u64, count: u64) -> Result<Layout, KvError> {
    let count = count.min(MAX_LAYOUT_CHUNKS);
    let start = keys::file_chunk(rec.attr.ino, first);
    let end = keys::file_chunk(rec.attr.ino, first.saturating_add(count));
    let mut chunks = Vec::new();
    let mut rows = Vec::new();
    kv.scan(&start, &end, &mut |k, v| {
        rows.push((k.to_vec(), v.to_vec()));
        true
    })?;
    for (k, v) in rows {
        let index = keys::file_chunk_index(&k).ok_or_else(|| KvError("bad chunk entry key".into()))?;
        let id = u64::from_be_bytes(v.as_slice().try_into().map_err(|_| KvError("bad chunk entry".into()))?);
        if let Some(c) = load_chunk(kv, id)? {
            chunks.push(location(kv, index, id, &c)?);
        }
    }
    Ok(Layout {
        attr: rec.attr.clone(),
        chunk_bytes: chunk_bytes(kv)?,
        chunks,
        read_only: rec.immutable,
        lease: load_lease(kv, rec.attr.ino)?,
    })
}

/// An operation's answer: the file's layout with `chunks`, as planned.
pub(super) fn layout_reply(w: &mut Work<'_>, rec: InodeRec, cb: u64, chunks: Vec<ChunkLocation>) -> Plan<OpReply> {
    let lease = w.lease(rec.attr.ino)?;
    Ok(OpReply::Layout(Layout { attr: rec.attr, chunk_bytes: cb, chunks, read_only: rec.immutable, lease }))
}

/// The directory whose quota new inodes in `parent` are charged to.
pub(super) fn realm_of(parent: &InodeRec) -> Ino {
    if parent.quota.is_some() {
        parent.attr.ino
    } else {
        parent.qdir
    }
}

/// Walks the quota chain from `qdir`, checking (with `check`, for growth)
/// and then applying the change in bytes and inodes to every quota on it.
pub(super) fn charge(w: &mut Work<'_>, qdir: Ino, bytes: i64, inodes: i64, check: bool) -> Plan<()> {
    if bytes == 0 && inodes == 0 {
        return Ok(());
    }
    if check {
        quota_check(w, qdir, bytes, inodes)?;
    }
    let mut q = qdir;
    for _ in 0..MAX_QUOTA_DEPTH {
        if q == 0 {
            return Ok(());
        }
        let mut rec = w.must_inode(q)?;
        let next = rec.qdir;
        if let Some(u) = rec.quota.as_mut() {
            u.used_bytes = (u.used_bytes as i128 + bytes as i128).max(0) as u64;
            u.used_inodes = (u.used_inodes as i128 + inodes as i128).max(0) as u64;
            w.put_inode(rec);
        }
        q = next;
    }
    Err(Fail::Store(KvError("quota chain does not end".into())))
}

/// Refuses (EDQUOT) growth that would take any quota on the chain from
/// `qdir` past its limit.
pub(super) fn quota_check(w: &mut Work<'_>, qdir: Ino, bytes: i64, inodes: i64) -> Plan<()> {
    let mut q = qdir;
    for _ in 0..MAX_QUOTA_DEPTH {
        if q == 0 {
            return Ok(());
        }
        let rec = w.must_inode(q)?;
        if let Some(u) = rec.quota {
            if bytes > 0 {
                if let Some(max) = u.limits.max_bytes {
                    if u.used_bytes.saturating_add(bytes as u64) > max {
                        return Err(Fail::Op(err(
                            ErrorCode::QuotaExceeded,
                            format!("byte quota of directory inode {q} ({max} bytes) exceeded"),
                        )));
                    }
                }
            }
            if inodes > 0 {
                if let Some(max) = u.limits.max_inodes {
                    if u.used_inodes.saturating_add(inodes as u64) > max {
                        return Err(Fail::Op(err(
                            ErrorCode::QuotaExceeded,
                            format!("inode quota of directory inode {q} ({max} inodes) exceeded"),
                        )));
                    }
                }
            }
        }
        q = rec.qdir;
    }
    Err(Fail::Store(KvError("quota chain does not end".into())))
}

/// Drops the file's chunks from index `from` on; chunks nobody refers to
/// any more leave the chunk map (their servers delete them when they next
/// report).
pub(super) fn drop_chunks(w: &mut Work<'_>, ino: Ino, from: u64) -> Plan<()> {
    let chunks = w.all_file_chunks(ino)?;
    for (index, id) in chunks.range(from..) {
        w.p.file_chunks.insert((ino, *index), None);
        release_chunk(w, *id)?;
    }
    Ok(())
}

pub(super) fn must_file(w: &mut Work<'_>, ino: Ino) -> Plan<InodeRec> {
    let rec = w.must_inode(ino)?;
    match rec.attr.kind {
        FileKind::File => Ok(rec),
        FileKind::Dir => Err(Fail::Op(err(ErrorCode::IsDir, format!("inode {ino} is a directory")))),
        _ => Err(Fail::Op(err(ErrorCode::Invalid, format!("inode {ino} is not a regular file")))),
    }
}

/// [`MetaOp::PrepareWrite`].
pub(super) fn prepare_write(
    w: &mut Work<'_>,
    ino: Ino,
    offset: u64,
    len: u64,
    extend: bool,
    placement: &[(u64, Vec<ServerId>)],
    now: Timespec,
) -> Plan<OpReply> {
    let mut rec = must_file(w, ino)?;
    writable(&rec)?;
    let cb = chunk_bytes(w.kv)?;
    if len == 0 {
        return layout_reply(w, rec, cb, Vec::new());
    }
    let end = offset
        .checked_add(len)
        .filter(|e| *e <= MAX_FILE_BYTES)
        .ok_or_else(|| err(ErrorCode::FileTooBig, format!("a file may not exceed {MAX_FILE_BYTES} bytes")))?;
    let (first, last) = (offset / cb, (end - 1) / cb);
    if last - first + 1 > MAX_LAYOUT_CHUNKS {
        return Err(Fail::Op(err(ErrorCode::TooBig, format!("one write may span at most {MAX_LAYOUT_CHUNKS} chunks"))));
    }
    if end > rec.attr.size {
        quota_check(w, rec.qdir, (end - rec.attr.size) as i64, 0)?;
    }
    let mut chunks = Vec::new();
    // Whether every chunk of the file is made here (an empty file has
    // none: a truncate to 0 drops them all; checked, not assumed).
    let mut all_new = extend && first == 0 && rec.attr.size == 0 && rec.chunks == 0;
    for index in first..=last {
        let id = match w.file_chunk(ino, index)? {
            Some(id) => {
                all_new = false;
                id
            }
            None => {
                let Some((_, servers)) = placement.iter().find(|(i, _)| *i == index) else {
                    // The leader decided placement before this chunk was
                    // known to be missing; a retry decides again.
                    return Err(Fail::Op(err(ErrorCode::Unavailable, "no placement for a new chunk yet; retry")));
                };
                if servers.is_empty() {
                    return Err(Fail::Op(err(ErrorCode::NoSpace, "no live chunk server has room for a new chunk")));
                }
                for s in servers {
                    if load_server(w.kv, *s)?.is_none() {
                        return Err(Fail::Op(err(
                            ErrorCode::Unavailable,
                            format!("chunk server {s} is not registered"),
                        )));
                    }
                }
                let id = w.alloc_chunk()?;
                w.p.chunks.insert(
                    id,
                    Some(ChunkRec {
                        version: 1,
                        replicas: servers.clone(),
                        refs: 1,
                        goal: rec.goal,
                        born_secs: now.secs,
                        origin: None,
                    }),
                );
                w.p.file_chunks.insert((ino, index), Some(id));
                id
            }
        };
        let c = w.chunk(id)?.ok_or_else(|| Fail::Store(KvError(format!("chunk {id} of inode {ino} is missing"))))?;
        chunks.push(planned_location(w, index, id, &c)?);
    }
    if all_new {
        // As `ExtendSize` would after the data (see `MetaOp::PrepareWrite`).
        rec = record_write(w, rec, end, now)?;
    }
    layout_reply(w, rec, cb, chunks)
}

/// [`MetaOp::ExtendSize`].
pub(super) fn extend_size(w: &mut Work<'_>, ino: Ino, size: u64, now: Timespec) -> Plan<OpReply> {
    let rec = must_file(w, ino)?;
    writable(&rec)?;
    if size > MAX_FILE_BYTES {
        return Err(Fail::Op(err(ErrorCode::FileTooBig, format!("a file may not exceed {MAX_FILE_BYTES} bytes"))));
    }
    Ok(OpReply::Attr(record_write(w, rec, size, now)?.attr))
}

/// Data was written up to `size`: the size grows to it (the quota charged
/// for the growth) and mtime and ctime become `now`, even when the size
/// stays. Returns the inode as stored.
fn record_write(w: &mut Work<'_>, mut rec: InodeRec, size: u64, now: Timespec) -> Plan<InodeRec> {
    if size > rec.attr.size {
        charge(w, rec.qdir, (size - rec.attr.size) as i64, 0, true)?;
        rec = w.must_inode(rec.attr.ino)?;
        rec.attr.size = size;
    }
    rec.attr.mtime = now;
    rec.attr.ctime = now;
    w.put_inode(rec.clone());
    Ok(rec)
}

/// A size change through setattr: chunks past a smaller size go; quotas
/// follow. The caller then stores the new size.
pub(super) fn resize(w: &mut Work<'_>, rec: &InodeRec, size: u64) -> Plan<()> {
    if size > MAX_FILE_BYTES {
        return Err(Fail::Op(err(ErrorCode::FileTooBig, format!("a file may not exceed {MAX_FILE_BYTES} bytes"))));
    }
    let old = rec.attr.size;
    if size < old {
        let cb = chunk_bytes(w.kv)?;
        drop_chunks(w, rec.attr.ino, size.div_ceil(cb))?;
        charge(w, rec.qdir, -((old - size) as i64), 0, false)?;
    } else if size > old {
        charge(w, rec.qdir, (size - old) as i64, 0, true)?;
    }
    Ok(())
}

/// [`MetaOp::ReplicaFailed`].
pub(super) fn replica_failed(
    w: &mut Work<'_>,
    ino: Ino,
    index: u64,
    chunk: ChunkId,
    version: u64,
    server: ServerId,
) -> Plan<OpReply> {
    let rec = must_file(w, ino)?;
    let cb = chunk_bytes(w.kv)?;
    let Some(id) = w.file_chunk(ino, index)? else {
        return layout_reply(w, rec, cb, Vec::new());
    };
    let mut c = w.chunk(id)?.ok_or_else(|| Fail::Store(KvError(format!("chunk {id} of inode {ino} is missing"))))?;
    if id == chunk && c.version == version && c.replicas.contains(&server) {
        if c.replicas.len() == 1 {
            return Err(Fail::Op(err(ErrorCode::Io, format!("the only replica of chunk {chunk} failed"))));
        }
        c.replicas.retain(|s| *s != server);
        // Survivors move to the new version; the dropped copy keeps the
        // old one and is refused from now on.
        c.version += 1;
        w.p.chunks.insert(id, Some(c.clone()));
    }
    let loc = planned_location(w, index, id, &c)?;
    layout_reply(w, rec, cb, vec![loc])
}

/// [`MetaOp::SetGoal`].
pub(super) fn set_goal(w: &mut Work<'_>, ino: Ino, goal: Goal, now: Timespec) -> Plan<OpReply> {
    goal.validate()?;
    let mut rec = w.must_inode(ino)?;
    writable(&rec)?;
    rec.goal = goal;
    rec.attr.ctime = now;
    if rec.attr.kind == FileKind::File {
        for (_, id) in w.all_file_chunks(ino)? {
            if let Some(mut c) = w.chunk(id)? {
                c.goal = goal;
                w.p.chunks.insert(id, Some(c));
            }
        }
    }
    let attr = rec.attr.clone();
    w.put_inode(rec);
    Ok(OpReply::Attr(attr))
}

/// [`MetaOp::SetQuota`].
pub(super) fn set_quota(w: &mut Work<'_>, ino: Ino, limits: QuotaLimits, now: Timespec) -> Plan<OpReply> {
    let mut rec = w.must_dir(ino)?;
    writable(&rec)?;
    rec.attr.ctime = now;
    if limits.max_bytes.is_none() && limits.max_inodes.is_none() {
        // Inodes below keep pointing here; the chain simply skips a
        // directory without a quota.
        rec.quota = None;
        w.put_inode(rec);
        return Ok(OpReply::Done);
    }
    if let Some(u) = rec.quota.as_mut() {
        u.limits = limits;
        w.put_inode(rec);
        return Ok(OpReply::Done);
    }
    // A new quota: count what is below and move it into this realm.
    let outer = rec.qdir;
    let (mut bytes, mut inodes) = (0u64, 0u64);
    let mut seen = BTreeSet::new();
    let mut todo = vec![ino];
    while let Some(dir) = todo.pop() {
        let prefix = keys::dir_prefix(dir);
        let end = raft::kv::prefix_end(&prefix).expect("prefix has a non-0xFF byte");
        let mut children = Vec::new();
        w.kv.scan(&prefix, &end, &mut |_, v| {
            children.push(v.to_vec());
            true
        })?;
        for v in children {
            let d: super::fsm::DentryRec = dec(&v)?;
            if !seen.insert(d.ino) {
                continue;
            }
            if seen.len() > MAX_QUOTA_WALK_INODES {
                return Err(Fail::Op(err(
                    ErrorCode::TooBig,
                    format!(
                        "more than {MAX_QUOTA_WALK_INODES} inodes below; set the quota on a smaller tree, or before filling it"
                    ),
                )));
            }
            let mut child = w.must_inode(d.ino)?;
            inodes += 1;
            if child.qdir == outer {
                child.qdir = ino;
            }
            match (&child.quota, child.attr.kind) {
                // A nested quota already counts its tree.
                (Some(u), _) => {
                    bytes += u.used_bytes;
                    inodes += u.used_inodes;
                }
                (None, FileKind::Dir) => todo.push(d.ino),
                (None, FileKind::File) => bytes += child.attr.size,
                _ => {}
            }
            w.put_inode(child);
        }
    }
    let mut rec = w.must_inode(ino)?;
    rec.quota = Some(QuotaUsage { limits, used_bytes: bytes, used_inodes: inodes });
    w.put_inode(rec);
    Ok(OpReply::Done)
}

/// The quota usage of a directory, for `locus fs quota get`.
pub fn quota_of(rec: &InodeRec) -> Option<QuotaUsage> {
    rec.quota
}

/// Chunks of a file as stored, index to id.
pub fn file_chunk_map(kv: &dyn raft::KvRead, ino: Ino) -> Result<BTreeMap<u64, ChunkId>, KvError> {
    let prefix = keys::file_chunks(ino);
    let end = raft::kv::prefix_end(&prefix).expect("prefix has a non-0xFF byte");
    let mut out = BTreeMap::new();
    let mut bad = false;
    kv.scan(&prefix, &end, &mut |k, v| {
        match (keys::file_chunk_index(k), <[u8; 8]>::try_from(v)) {
            (Some(i), Ok(b)) => {
                out.insert(i, u64::from_be_bytes(b));
            }
            _ => bad = true,
        }
        true
    })?;
    if bad {
        return Err(KvError(format!("bad chunk entry of inode {ino}")));
    }
    Ok(out)
}

/// Version raises for the caller to push, and the addresses of the
/// servers they name.
pub(super) type Fences = (Vec<ChunkFence>, Vec<(ServerId, String)>);

/// The [`Fences`] of `fenced` (chunk -> version before the raise).
pub(super) fn fences_of(w: &mut Work<'_>, fenced: &BTreeMap<ChunkId, u64>) -> Plan<Fences> {
    let mut fences = Vec::with_capacity(fenced.len());
    let mut servers = BTreeSet::new();
    for (&chunk, &from) in fenced {
        let rec = w.chunk(chunk)?.ok_or_else(|| Fail::Store(KvError(format!("chunk {chunk} is missing"))))?;
        let origin = match rec.origin {
            Some(o) => w.chunk(o)?.map(|oc| (o, oc.version)),
            None => None,
        };
        servers.extend(rec.replicas.iter().copied());
        fences.push(ChunkFence { chunk, from, to: rec.version, replicas: rec.replicas, origin });
    }
    let mut addrs = Vec::with_capacity(servers.len());
    for s in servers {
        if let Some(srv) = load_server(w.kv, s)? {
            addrs.push((s, srv.addr));
        }
    }
    Ok((fences, addrs))
}

/// [`MetaOp::Lease`]: takes, renews or releases `client`'s write lease on
/// file `ino`. Taken afresh (no lease, another's that lapsed, or this
/// client's own that lapsed), it raises every chunk's version: writes
/// from anyone holding an older layout are refused from the moment the
/// caller has pushed the fences.
pub(super) fn lease(w: &mut Work<'_>, ino: Ino, client: Option<u128>, ttl_ms: u64, now: Timespec) -> Plan<OpReply> {
    let Some(client) = client else {
        return Err(Fail::Op(err(ErrorCode::Invalid, "a lease needs a client id")));
    };
    if ttl_ms > MAX_LEASE_TTL_MS {
        return Err(Fail::Op(err(
            ErrorCode::Invalid,
            format!("a lease lasts at most {MAX_LEASE_TTL_MS} ms, not {ttl_ms}"),
        )));
    }
    let rec = must_file(w, ino)?;
    let current = w.lease(ino)?;
    if ttl_ms == 0 {
        if current.is_some_and(|l| l.holder == client) {
            w.p.leases.insert(ino, None);
        }
        return Ok(OpReply::Leased(LeaseReply { lease: None, fences: Vec::new(), servers: Vec::new() }));
    }
    writable(&rec)?;
    w.check_lease(ino, Some(client), now)?;
    let afresh = current.is_none_or(|l| l.holder != client || l.expires <= now);
    let lease = Lease { holder: client, expires: Timespec::from_nanos(now.as_nanos() + ttl_ms as i128 * 1_000_000) };
    w.p.leases.insert(ino, Some(lease));
    let mut fenced = BTreeMap::new();
    if afresh {
        for (_, id) in w.all_file_chunks(ino)? {
            if fenced.contains_key(&id) {
                continue;
            }
            let mut c =
                w.chunk(id)?.ok_or_else(|| Fail::Store(KvError(format!("chunk {id} of inode {ino} is missing"))))?;
            fenced.insert(id, c.version);
            c.version += 1;
            w.p.chunks.insert(id, Some(c));
        }
    }
    let (fences, servers) = fences_of(w, &fenced)?;
    Ok(OpReply::Leased(LeaseReply { lease: Some(lease), fences, servers }))
}
