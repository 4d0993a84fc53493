//! Namespace queries over a consistent view of the applied state. Pure.

use fs_client::proto::*;
use raft::{KvError, KvRead, KvReadExt};

use super::fsm::{dec, get_counter, load_dentry, load_inode, DentryRec, InodeRec, INODE_COUNT};
use super::keys;

/// Capacity figures the query layer cannot know by itself (from chunk servers).
#[derive(Debug, Clone, Copy, Default)]
pub struct Capacity {
    pub total_bytes: u64,
    pub free_bytes: u64,
}

/// Inodes the namespace can hold, for `statfs`.
pub const MAX_INODES: u64 = 1 << 40;
pub const BLOCK_SIZE: u32 = 4096;

pub type ReadResult = Result<ReadReply, WireError>;

fn not_found(what: impl std::fmt::Display) -> WireError {
    WireError::new(ErrorCode::NotFound, format!("{what} does not exist"))
}

fn inode_or_err(kv: &dyn KvRead, ino: Ino) -> Result<Result<InodeRec, WireError>, KvError> {
    Ok(load_inode(kv, ino)?.ok_or_else(|| not_found(format!("inode {ino}"))))
}

macro_rules! tri {
    ($e:expr) => {
        match $e? {
            Ok(v) => v,
            Err(e) => return Ok(Err(e)),
        }
    };
}

/// Answers one read. `Err` means the store failed.
pub fn query(kv: &dyn KvRead, read: &MetaRead, cap: Capacity) -> Result<ReadResult, KvError> {
    Ok(Ok(match read {
        MetaRead::Lookup { parent, name } => {
            if let Err(e) = validate_name(name) {
                return Ok(Err(e));
            }
            let p = tri!(inode_or_err(kv, *parent));
            if p.attr.kind != FileKind::Dir {
                return Ok(Err(WireError::new(ErrorCode::NotDir, format!("inode {parent} is not a directory"))));
            }
            let Some(d) = load_dentry(kv, *parent, name)? else {
                return Ok(Err(not_found(format!("{:?}", String::from_utf8_lossy(name)))));
            };
            ReadReply::Attr(tri!(inode_or_err(kv, d.ino)).attr)
        }
        MetaRead::GetAttr { ino } => ReadReply::Attr(tri!(inode_or_err(kv, *ino)).attr),
        MetaRead::ReadDir { ino, after, limit } => {
            let dir = tri!(inode_or_err(kv, *ino));
            if dir.attr.kind != FileKind::Dir {
                return Ok(Err(WireError::new(ErrorCode::NotDir, format!("inode {ino} is not a directory"))));
            }
            let limit = (*limit).clamp(1, MAX_READDIR_PAGE) as usize;
            let prefix = keys::dir_prefix(*ino);
            let end = raft::kv::prefix_end(&prefix).expect("prefix has a non-0xFF byte");
            let start = match after {
                // Resume strictly after the last name returned: stable even
                // when entries are added or removed between pages.
                Some(name) => {
                    let mut k = keys::dentry(*ino, name);
                    k.push(0);
                    k
                }
                None => prefix.clone(),
            };
            let rows = kv.scan_collect(&start, &end, limit + 1)?;
            let more = rows.len() > limit;
            let mut entries = Vec::with_capacity(rows.len().min(limit));
            for (k, v) in rows.into_iter().take(limit) {
                let d: DentryRec = dec(&v)?;
                entries.push(DirEntry { name: k[prefix.len()..].to_vec(), ino: d.ino, kind: d.kind });
            }
            ReadReply::Entries { entries, more }
        }
        MetaRead::Readlink { ino } => {
            let rec = tri!(inode_or_err(kv, *ino));
            if rec.attr.kind != FileKind::Symlink {
                return Ok(Err(WireError::new(ErrorCode::Invalid, format!("inode {ino} is not a symlink"))));
            }
            ReadReply::Link(rec.target)
        }
        MetaRead::GetXattr { ino, name } => {
            tri!(inode_or_err(kv, *ino));
            match kv.get(&keys::xattr(*ino, name))? {
                Some(v) => ReadReply::Xattr(v),
                None => return Ok(Err(WireError::new(ErrorCode::NoData, "no such xattr"))),
            }
        }
        MetaRead::ListXattr { ino } => {
            tri!(inode_or_err(kv, *ino));
            let prefix = keys::xattr_prefix(*ino);
            let end = raft::kv::prefix_end(&prefix).expect("prefix has a non-0xFF byte");
            let names = kv
                .scan_collect(&prefix, &end, MAX_XATTRS_PER_INODE)?
                .into_iter()
                .map(|(k, _)| k[prefix.len()..].to_vec())
                .collect();
            ReadReply::XattrNames(names)
        }
        MetaRead::StatFs => {
            let used_inodes = get_counter(kv, INODE_COUNT)?;
            ReadReply::StatFs(StatFs {
                total_bytes: cap.total_bytes,
                free_bytes: cap.free_bytes,
                available_bytes: cap.free_bytes,
                total_inodes: MAX_INODES,
                free_inodes: MAX_INODES.saturating_sub(used_inodes),
                block_size: BLOCK_SIZE,
                max_name: MAX_NAME_BYTES as u32,
            })
        }
        MetaRead::Resolve { path, follow } => ReadReply::Attr(tri!(resolve(kv, path, *follow)).attr),
        MetaRead::Layout { ino, first, count } => {
            let rec = tri!(inode_or_err(kv, *ino));
            if rec.attr.kind != FileKind::File {
                return Ok(Err(WireError::new(ErrorCode::Invalid, format!("inode {ino} is not a regular file"))));
            }
            ReadReply::Layout(super::data::layout(kv, &rec, *first, *count)?)
        }
        MetaRead::GetGoal { ino } => ReadReply::Goal(tri!(inode_or_err(kv, *ino)).goal),
        MetaRead::GetQuota { ino } => {
            let rec = tri!(inode_or_err(kv, *ino));
            if rec.attr.kind != FileKind::Dir {
                return Ok(Err(WireError::new(ErrorCode::NotDir, format!("inode {ino} is not a directory"))));
            }
            ReadReply::Quota(rec.quota)
        }
        // Answered from the leader's live state, not the namespace.
        MetaRead::Health | MetaRead::Now => {
            return Ok(Err(WireError::new(ErrorCode::BadRequest, "answered by the service, not the state")))
        }
    }))
}

/// Resolves an absolute path, following symlinks in the middle (and at the
/// end with `follow`), with `..` going to the parent.
pub fn resolve(kv: &dyn KvRead, path: &[u8], follow: bool) -> Result<Result<InodeRec, WireError>, KvError> {
    if path.len() > MAX_PATH_BYTES {
        return Ok(Err(WireError::new(ErrorCode::NameTooLong, "path too long")));
    }
    if path.first() != Some(&b'/') {
        return Ok(Err(WireError::new(
            ErrorCode::Invalid,
            format!("path {:?} is not absolute", String::from_utf8_lossy(path)),
        )));
    }
    if path.contains(&0) {
        return Ok(Err(WireError::new(ErrorCode::Invalid, "path contains NUL")));
    }
    let mut follows = 0u32;
    // Components still to walk, last first.
    let mut todo: Vec<Vec<u8>> = components(path);
    let mut cur = tri!(inode_or_err(kv, ROOT_INO));
    while let Some(comp) = todo.pop() {
        if cur.attr.kind != FileKind::Dir {
            return Ok(Err(WireError::new(ErrorCode::NotDir, "a path component is not a directory")));
        }
        if comp == b".." {
            cur = tri!(inode_or_err(kv, cur.parent.max(ROOT_INO)));
            continue;
        }
        if comp.len() > MAX_NAME_BYTES {
            return Ok(Err(WireError::new(ErrorCode::NameTooLong, "path component too long")));
        }
        let Some(d) = load_dentry(kv, cur.attr.ino, &comp)? else {
            return Ok(Err(not_found(format!("{:?}", String::from_utf8_lossy(path)))));
        };
        let next = tri!(inode_or_err(kv, d.ino));
        let last = todo.is_empty();
        if next.attr.kind == FileKind::Symlink && (!last || follow) {
            follows += 1;
            if follows > MAX_SYMLINK_FOLLOWS {
                return Ok(Err(WireError::new(ErrorCode::Loop, "too many levels of symbolic links")));
            }
            // Both are last-first, so the link's first component pops next.
            todo.extend(components(&next.target));
            if next.target.first() == Some(&b'/') {
                cur = tri!(inode_or_err(kv, ROOT_INO));
            }
            continue;
        }
        cur = next;
    }
    Ok(Ok(cur))
}

/// Path components, last first, without empty ones and `.`.
fn components(path: &[u8]) -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> =
        path.split(|&b| b == b'/').filter(|c| !c.is_empty() && *c != b".").map(|c| c.to_vec()).collect();
    v.reverse();
    v
}
