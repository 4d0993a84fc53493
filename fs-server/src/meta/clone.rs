//! Clones and snapshots in the state machine: copy-on-write at chunk level.
//!
//! A clone copies metadata only. Every chunk entry of every copied file is
//! duplicated (`F/(new ino, index)` names the same chunk) and the chunk's
//! `refs` grows by one; a snapshot is a clone whose inodes are immutable.
//! In the same command every shared chunk moves to the next version, and
//! the reply lists those fences: the client that asked pushes them to the
//! replicas before it reports success, so a writer still holding the old
//! layout is refused (`Stale`), fetches the layout again and sees the chunk
//! shared. Writes by other clients that race with the command itself may or
//! may not be in the copy (crash-consistent, like pulling the power).
//!
//! A writer of a shared chunk first asks for its own copy ([`cow_chunk`]):
//! a new chunk on the same servers, whose `origin` is the old chunk. The
//! servers make it on the first write, each from its own replica of the
//! origin, so no data crosses the network. Once the first write landed on
//! every replica the client reports it ([`cow_done`]) and the origin's
//! reference is released. If that report is lost the origin stays
//! referenced: space leaks, data never breaks.
//!
//! The chunk map stays flat (a file's entries name chunks directly), so a
//! clone of a clone of a clone reads exactly like the original.

use std::collections::{BTreeMap, BTreeSet};

use fs_client::proto::*;
use raft::{KvError, KvReadExt};

use super::data::{self, chunk_bytes, layout_reply, must_file, planned_location, release_chunk};
use super::fsm::{
    check_name, dec, err, touch_dir, writable, ChunkRec, DentryRec, Fail, InodeRec, Namespace, Plan, Stamp, Work,
};
use super::keys;

/// Copies being built by one [`clone_tree`].
struct Copier {
    at: Stamp,
    snapshot: bool,
    /// Quota realm of the destination: everything copied is charged there.
    realm: Ino,
    /// Source inode -> its copy (hard links inside the tree stay links).
    copies: BTreeMap<Ino, Ino>,
    inodes: u64,
    chunks: u64,
    bytes: u64,
    /// Chunks whose version this command raised, with the old version.
    fenced: BTreeMap<ChunkId, u64>,
}

fn too_big(what: &str, limit: u64) -> Fail {
    Fail::Op(err(
        ErrorCode::TooBig,
        format!("the source has more than {limit} {what}; clone smaller trees (subdirectories) one by one"),
    ))
}

impl Copier {
    /// A copy of `rec` placed under directory `parent` (for directories).
    fn copy_inode(&mut self, w: &mut Work<'_>, rec: &InodeRec, parent: Ino) -> Plan<Ino> {
        self.inodes += 1;
        if self.inodes > MAX_CLONE_INODES {
            return Err(too_big("inodes", MAX_CLONE_INODES));
        }
        let ino = w.alloc_ino()?;
        let mut attr = rec.attr.clone();
        attr.ino = ino;
        attr.ctime = self.at.now;
        attr.crtime = self.at.now;
        attr.generation = self.at.index;
        if attr.kind != FileKind::Dir {
            // Links from outside the copied tree do not follow it.
            attr.nlink = 1;
        }
        let copy = InodeRec {
            attr,
            parent: if rec.attr.kind == FileKind::Dir { parent } else { 0 },
            target: rec.target.clone(),
            xattrs: rec.xattrs,
            goal: rec.goal,
            qdir: self.realm,
            quota: None,
            immutable: self.snapshot,
            // Counted as the copy's chunk slots are planned.
            chunks: 0,
        };
        let prefix = keys::xattr_prefix(rec.attr.ino);
        let end = raft::kv::prefix_end(&prefix).expect("prefix has a non-0xFF byte");
        for (k, v) in w.kv.scan_collect(&prefix, &end, MAX_XATTRS_PER_INODE)? {
            w.p.xattrs.insert((ino, k[prefix.len()..].to_vec()), Some(v));
        }
        if rec.attr.kind == FileKind::File {
            self.bytes += rec.attr.size;
            for (index, id) in w.all_file_chunks(rec.attr.ino)? {
                self.chunks += 1;
                if self.chunks > MAX_CLONE_CHUNKS {
                    return Err(too_big("chunks", MAX_CLONE_CHUNKS));
                }
                let mut c = w
                    .chunk(id)?
                    .ok_or_else(|| Fail::Store(KvError(format!("chunk {id} of inode {} is missing", rec.attr.ino))))?;
                c.refs = c.refs.saturating_add(1);
                if let std::collections::btree_map::Entry::Vacant(e) = self.fenced.entry(id) {
                    e.insert(c.version);
                    c.version += 1;
                }
                w.p.chunks.insert(id, Some(c));
                w.p.file_chunks.insert((ino, index), Some(id));
            }
        }
        self.copies.insert(rec.attr.ino, ino);
        w.put_inode(copy);
        Ok(ino)
    }
}

/// Entries of directory `dir` as stored, at most `limit` (then one more, so
/// the caller sees the bound crossed).
fn entries(w: &Work<'_>, dir: Ino, limit: u64) -> Plan<Vec<(Vec<u8>, DentryRec)>> {
    let prefix = keys::dir_prefix(dir);
    let end = raft::kv::prefix_end(&prefix).expect("prefix has a non-0xFF byte");
    let rows = w.kv.scan_collect(&prefix, &end, limit.saturating_add(1) as usize)?;
    rows.into_iter().map(|(k, v)| Ok((k[prefix.len()..].to_vec(), dec::<DentryRec>(&v)?))).collect()
}

/// [`MetaOp::Clone`]: copies `src` (a whole tree) to `name` in `parent`.
pub(super) fn clone_tree(
    w: &mut Work<'_>,
    src: Ino,
    parent: Ino,
    name: &[u8],
    snapshot: bool,
    at: Stamp,
) -> Plan<CloneReply> {
    check_name(name)?;
    let src_rec = w.must_inode(src)?;
    let p = w.must_dir(parent)?;
    writable(&p)?;
    if w.dentry(parent, name)?.is_some() {
        return Err(Fail::Op(err(ErrorCode::Exists, format!("{:?} exists", String::from_utf8_lossy(name)))));
    }
    let is_dir = src_rec.attr.kind == FileKind::Dir;
    if is_dir {
        if Namespace::is_ancestor(w, src, parent)? {
            return Err(Fail::Op(err(ErrorCode::Invalid, "cannot clone a directory into itself")));
        }
        if p.attr.nlink >= MAX_LINKS {
            return Err(Fail::Op(err(ErrorCode::TooManyLinks, "too many subdirectories")));
        }
    }
    let mut c = Copier {
        at,
        snapshot,
        realm: data::realm_of(&p),
        copies: BTreeMap::new(),
        inodes: 0,
        chunks: 0,
        bytes: 0,
        fenced: BTreeMap::new(),
    };
    let root = c.copy_inode(w, &src_rec, parent)?;
    let mut todo = if is_dir { vec![(src, root)] } else { Vec::new() };
    while let Some((old_dir, new_dir)) = todo.pop() {
        for (entry, d) in entries(w, old_dir, MAX_CLONE_INODES - c.inodes.min(MAX_CLONE_INODES))? {
            let copy = match c.copies.get(&d.ino) {
                // Another link to a file already copied.
                Some(&copy) if d.kind != FileKind::Dir => {
                    let mut rec = w.must_inode(copy)?;
                    rec.attr.nlink += 1;
                    w.put_inode(rec);
                    copy
                }
                _ => {
                    let rec = w.must_inode(d.ino)?;
                    let copy = c.copy_inode(w, &rec, new_dir)?;
                    if d.kind == FileKind::Dir {
                        todo.push((d.ino, copy));
                    }
                    copy
                }
            };
            w.put_dentry(new_dir, &entry, DentryRec { ino: copy, kind: d.kind });
        }
    }
    w.put_dentry(parent, name, DentryRec { ino: root, kind: src_rec.attr.kind });
    let mut p = w.must_dir(parent)?;
    if is_dir {
        p.attr.nlink += 1;
    }
    touch_dir(&mut p, at.now);
    w.put_inode(p);
    data::charge(w, c.realm, c.bytes as i64, c.inodes as i64, true)?;

    let (fences, servers) = data::fences_of(w, &c.fenced)?;
    let attr = w.must_inode(root)?.attr;
    Ok(CloneReply { attr, inodes: c.inodes, chunks: c.chunks, fences, servers })
}

/// [`MetaOp::CowChunk`].
pub(super) fn cow_chunk(w: &mut Work<'_>, ino: Ino, index: u64, chunk: ChunkId, now: Timespec) -> Plan<OpReply> {
    let rec = must_file(w, ino)?;
    writable(&rec)?;
    let cb = chunk_bytes(w.kv)?;
    let Some(cur) = w.file_chunk(ino, index)? else {
        return Err(Fail::Op(err(ErrorCode::NotFound, format!("inode {ino} has no chunk at index {index}"))));
    };
    let c = w.chunk(cur)?.ok_or_else(|| Fail::Store(KvError(format!("chunk {cur} of inode {ino} is missing"))))?;
    let loc = if cur == chunk && c.refs > 1 {
        let id = w.alloc_chunk()?;
        // Same servers: each makes the copy from its own replica.
        let copy = ChunkRec {
            version: 1,
            replicas: c.replicas.clone(),
            refs: 1,
            goal: rec.goal,
            born_secs: now.secs,
            origin: Some(cur),
        };
        // The file's reference to the old chunk becomes the copy's origin
        // reference: the old chunk's count stays.
        w.p.chunks.insert(id, Some(copy.clone()));
        w.p.file_chunks.insert((ino, index), Some(id));
        planned_location(w, index, id, &copy)?
    } else {
        // Copied already (by another writer), or no longer shared.
        planned_location(w, index, cur, &c)?
    };
    layout_reply(w, rec, cb, vec![loc])
}

/// [`MetaOp::CowDone`]. Idempotent.
pub(super) fn cow_done(w: &mut Work<'_>, chunk: ChunkId) -> Plan<OpReply> {
    let Some(mut c) = w.chunk(chunk)? else { return Ok(OpReply::Done) };
    let Some(origin) = c.origin.take() else { return Ok(OpReply::Done) };
    w.p.chunks.insert(chunk, Some(c));
    release_chunk(w, origin)?;
    Ok(OpReply::Done)
}

/// [`MetaOp::DropSnapshot`].
pub(super) fn drop_snapshot(w: &mut Work<'_>, parent: Ino, name: &[u8], now: Timespec) -> Plan<OpReply> {
    check_name(name)?;
    writable(&w.must_dir(parent)?)?;
    let d = w.dentry(parent, name)?.ok_or_else(|| {
        Fail::Op(err(ErrorCode::NotFound, format!("{:?} does not exist", String::from_utf8_lossy(name))))
    })?;
    let root = w.must_inode(d.ino)?;
    if !root.immutable {
        return Err(Fail::Op(err(
            ErrorCode::Invalid,
            format!("{:?} is not a snapshot (use unlink or rmdir)", String::from_utf8_lossy(name)),
        )));
    }
    // Links into a snapshot are refused, so every inode below is only there.
    let mut gone = BTreeSet::from([d.ino]);
    let mut todo = if d.kind == FileKind::Dir { vec![d.ino] } else { Vec::new() };
    while let Some(dir) = todo.pop() {
        let budget = MAX_CLONE_INODES.saturating_sub(gone.len() as u64);
        for (entry, e) in entries(w, dir, budget)? {
            w.delete_dentry(dir, &entry);
            if gone.insert(e.ino) && e.kind == FileKind::Dir {
                todo.push(e.ino);
            }
            if gone.len() as u64 > MAX_CLONE_INODES {
                return Err(too_big("inodes", MAX_CLONE_INODES));
            }
        }
    }
    w.delete_dentry(parent, name);
    for ino in gone {
        let rec = w.must_inode(ino)?;
        Namespace::remove_inode(w, &rec)?;
    }
    let mut p = w.must_dir(parent)?;
    if d.kind == FileKind::Dir {
        p.attr.nlink = p.attr.nlink.saturating_sub(1);
    }
    touch_dir(&mut p, now);
    w.put_inode(p);
    Ok(OpReply::Done)
}
