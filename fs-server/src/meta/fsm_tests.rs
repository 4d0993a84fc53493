//! The namespace state machine against a model of POSIX directory trees.

use std::collections::BTreeMap;

use fs_client::proto::*;
use proptest::prelude::*;
use raft::{KvRead, MemKv, StateMachineLogic, Txn};

use super::fsm::{Command, Namespace, OpResult, Proposal, SystemOp, SystemReply};
use super::read;

/// Applies one command to the store and returns its results.
fn apply(kv: &mut MemKv, index: u64, cmd: &Command) -> Vec<OpResult> {
    let ns = Namespace::default();
    let bytes = postcard::to_allocvec(cmd).unwrap();
    let (reply, muts) = {
        let mut txn = Txn::new(&*kv);
        let reply = ns.apply(&mut txn, index, &bytes).unwrap();
        (reply, txn.into_mutations())
    };
    kv.commit(muts);
    postcard::from_bytes(&reply).unwrap()
}

struct Fs {
    kv: MemKv,
    index: u64,
    now: i64,
}

impl Fs {
    fn new() -> Self {
        let mut fs = Fs { kv: MemKv::new(), index: 0, now: 1_000 };
        fs.index += 1;
        apply(&mut fs.kv, fs.index, &Command::Init { now: Timespec { secs: fs.now, nanos: 0 }, chunk_bytes: 1 << 20 });
        fs
    }
    fn op_with_id(&mut self, id: Option<RequestId>, op: MetaOp) -> OpResult {
        self.proposal(Proposal::new(id, op))
    }
    fn proposal(&mut self, p: Proposal) -> OpResult {
        self.index += 1;
        self.now += 1;
        let cmd = Command::Batch { now: Timespec { secs: self.now, nanos: 0 }, ops: vec![p] };
        apply(&mut self.kv, self.index, &cmd).pop().unwrap()
    }
    fn system(&mut self, ops: Vec<SystemOp>) -> Vec<Result<SystemReply, WireError>> {
        self.index += 1;
        self.now += 1;
        let cmd = Command::System { now: Timespec { secs: self.now, nanos: 0 }, ops };
        let ns = Namespace::default();
        let bytes = postcard::to_allocvec(&cmd).unwrap();
        let (reply, muts) = {
            let mut txn = Txn::new(&self.kv);
            let reply = ns.apply(&mut txn, self.index, &bytes).unwrap();
            (reply, txn.into_mutations())
        };
        self.kv.commit(muts);
        postcard::from_bytes(&reply).unwrap()
    }
    /// Registers servers 1..=n in racks r1..rn.
    fn servers(&mut self, n: u64) {
        for i in 1..=n {
            let topology = Topology::new("z1", format!("r{i}"), format!("h{i}"));
            let r = self.system(vec![SystemOp::RegisterServer {
                id: None,
                addr: format!("127.0.0.1:{}", 9000 + i),
                topology,
            }]);
            assert_eq!(r, vec![Ok(SystemReply::Server(i))]);
        }
    }
    /// PrepareWrite with replicas [1,2,3] for every chunk index in range.
    fn prepare(&mut self, ino: Ino, offset: u64, len: u64) -> OpResult {
        self.prepare_with(ino, offset, len, false)
    }
    fn prepare_with(&mut self, ino: Ino, offset: u64, len: u64, extend: bool) -> OpResult {
        let cb = 1u64 << 20;
        let placement = if len == 0 {
            vec![]
        } else {
            (offset / cb..=(offset + len - 1) / cb).map(|i| (i, vec![1, 2, 3])).collect()
        };
        self.proposal(Proposal { id: None, op: MetaOp::PrepareWrite { ino, offset, len, extend }, placement })
    }
    fn op(&mut self, op: MetaOp) -> OpResult {
        self.op_with_id(None, op)
    }
    fn resolve(&self, path: &str) -> Result<Attr, WireError> {
        read::resolve(&self.kv, path.as_bytes(), false).unwrap().map(|r| r.attr)
    }
    fn read(&self, r: MetaRead) -> Result<ReadReply, WireError> {
        read::query(&self.kv, &r, read::Capacity::default()).unwrap()
    }
    fn list(&self, ino: Ino) -> Vec<DirEntry> {
        match self.read(MetaRead::ReadDir { ino, after: None, limit: MAX_READDIR_PAGE }).unwrap() {
            ReadReply::Entries { entries, .. } => entries,
            other => panic!("{other:?}"),
        }
    }
    /// (path, kind, nlink) for everything in the tree.
    fn tree(&self) -> BTreeMap<String, (FileKind, u32)> {
        let mut out = BTreeMap::new();
        let mut stack = vec![(String::new(), ROOT_INO)];
        while let Some((path, ino)) = stack.pop() {
            for e in self.list(ino) {
                let p = format!("{path}/{}", String::from_utf8_lossy(&e.name));
                let attr = match self.read(MetaRead::GetAttr { ino: e.ino }).unwrap() {
                    ReadReply::Attr(a) => a,
                    other => panic!("{other:?}"),
                };
                assert_eq!(attr.kind, e.kind, "entry kind matches inode kind at {p}");
                if e.kind == FileKind::Dir {
                    stack.push((p.clone(), e.ino));
                }
                out.insert(p, (attr.kind, attr.nlink));
            }
        }
        out
    }
}

fn mkdir(parent: Ino, name: &str) -> MetaOp {
    MetaOp::Mkdir { parent, name: name.into(), perm: 0o755, caller: Caller::ROOT }
}

fn create(parent: Ino, name: &str) -> MetaOp {
    MetaOp::Create { parent, name: name.into(), perm: 0o644, caller: Caller::ROOT, exclusive: true }
}

fn code(r: &OpResult) -> Option<ErrorCode> {
    r.as_ref().err().map(|e| e.code)
}

fn ino_of(r: OpResult) -> Ino {
    match r.unwrap() {
        OpReply::Attr(a) => a.ino,
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_names_are_refused_and_change_nothing() {
    let mut fs = Fs::new();
    let before = fs.kv.map.clone();
    let long = "x".repeat(256);
    for (name, want) in [
        ("", ErrorCode::Invalid),
        (".", ErrorCode::Invalid),
        ("..", ErrorCode::Invalid),
        ("a/b", ErrorCode::Invalid),
        ("a\0b", ErrorCode::Invalid),
        (long.as_str(), ErrorCode::NameTooLong),
    ] {
        assert_eq!(code(&fs.op(mkdir(ROOT_INO, name))), Some(want), "mkdir {name:?}");
        assert_eq!(code(&fs.op(create(ROOT_INO, name))), Some(want), "create {name:?}");
    }
    // Only bookkeeping keys (applied index, dedup GC) may differ.
    let data = |m: &std::collections::BTreeMap<Vec<u8>, Vec<u8>>| {
        m.iter()
            .filter(|(k, _)| matches!(k[0], b'I' | b'D' | b'X'))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(data(&before), data(&fs.kv.map));
    assert!(fs.list(ROOT_INO).is_empty());
}

#[test]
fn rename_refuses_moving_a_directory_into_its_subtree() {
    let mut fs = Fs::new();
    let a = ino_of(fs.op(mkdir(ROOT_INO, "a")));
    let b = ino_of(fs.op(mkdir(a, "b")));
    let r = fs.op(MetaOp::Rename { parent: ROOT_INO, name: "a".into(), new_parent: b, new_name: "a".into(), flags: 0 });
    assert_eq!(code(&r), Some(ErrorCode::Invalid));
    let r = fs.op(MetaOp::Rename { parent: ROOT_INO, name: "a".into(), new_parent: a, new_name: "x".into(), flags: 0 });
    assert_eq!(code(&r), Some(ErrorCode::Invalid));
    assert!(fs.resolve("/a/b").is_ok());
}

#[test]
fn rmdir_non_empty_and_unlink_dir() {
    let mut fs = Fs::new();
    let a = ino_of(fs.op(mkdir(ROOT_INO, "a")));
    fs.op(create(a, "f")).unwrap();
    assert_eq!(code(&fs.op(MetaOp::Rmdir { parent: ROOT_INO, name: "a".into() })), Some(ErrorCode::NotEmpty));
    assert_eq!(code(&fs.op(MetaOp::Unlink { parent: ROOT_INO, name: "a".into() })), Some(ErrorCode::IsDir));
    assert_eq!(code(&fs.op(MetaOp::Rmdir { parent: a, name: "f".into() })), Some(ErrorCode::NotDir));
    fs.op(MetaOp::Unlink { parent: a, name: "f".into() }).unwrap();
    fs.op(MetaOp::Rmdir { parent: ROOT_INO, name: "a".into() }).unwrap();
    assert_eq!(fs.resolve("/").unwrap().nlink, 2);
}

#[test]
fn hard_links_count_and_survive_unlink() {
    let mut fs = Fs::new();
    let f = ino_of(fs.op(create(ROOT_INO, "f")));
    fs.op(MetaOp::Link { ino: f, new_parent: ROOT_INO, new_name: "g".into() }).unwrap();
    assert_eq!(fs.resolve("/g").unwrap().nlink, 2);
    assert_eq!(
        code(&fs.op(MetaOp::Link { ino: ROOT_INO, new_parent: ROOT_INO, new_name: "d".into() })),
        Some(ErrorCode::NotPermitted)
    );
    fs.op(MetaOp::Unlink { parent: ROOT_INO, name: "f".into() }).unwrap();
    let g = fs.resolve("/g").unwrap();
    assert_eq!((g.ino, g.nlink), (f, 1));
    // Renaming one link onto another of the same inode does nothing.
    fs.op(MetaOp::Link { ino: f, new_parent: ROOT_INO, new_name: "h".into() }).unwrap();
    fs.op(MetaOp::Rename { parent: ROOT_INO, name: "g".into(), new_parent: ROOT_INO, new_name: "h".into(), flags: 0 })
        .unwrap();
    assert!(fs.resolve("/g").is_ok() && fs.resolve("/h").is_ok());
}

#[test]
fn retried_requests_apply_once() {
    let mut fs = Fs::new();
    let id = RequestId { client: 7, seq: 1 };
    let first = fs.op_with_id(Some(id), create(ROOT_INO, "once"));
    let again = fs.op_with_id(Some(id), create(ROOT_INO, "once"));
    assert!(first.is_ok());
    assert_eq!(first, again, "the retry gets the original reply, not EEXIST");
    let other = fs.op_with_id(Some(RequestId { client: 7, seq: 2 }), create(ROOT_INO, "once"));
    assert_eq!(code(&other), Some(ErrorCode::Exists));
}

#[test]
fn dedup_records_expire_after_their_ttl() {
    let mut fs = Fs::new();
    let id = RequestId { client: 3, seq: 1 };
    fs.op_with_id(Some(id), create(ROOT_INO, "f")).unwrap();
    assert!(fs.kv.map.keys().any(|k| k[0] == b'Q'));
    fs.now += (super::fsm::DEDUP_TTL_NS / 1_000_000_000) as i64 + 1;
    fs.op(create(ROOT_INO, "g")).unwrap();
    assert!(!fs.kv.map.keys().any(|k| k[0] == b'Q' || k[0] == b'q'), "expired records are dropped");
    // The next collection starts after the last log dropped, not at the
    // start of the keyspace (where the dropped ones linger as tombstones).
    let floor = super::fsm::get_counter(&fs.kv, super::fsm::DEDUP_FLOOR).unwrap();
    assert!(floor > 1, "the floor passed the dropped log");
    // Past the TTL a retry is a new request.
    assert_eq!(code(&fs.op_with_id(Some(id), create(ROOT_INO, "f"))), Some(ErrorCode::Exists));
}

#[test]
fn xattr_flags_and_limits() {
    let mut fs = Fs::new();
    let f = ino_of(fs.op(create(ROOT_INO, "f")));
    let set = |name: &str, v: &[u8], flags| MetaOp::SetXattr { ino: f, name: name.into(), value: v.to_vec(), flags };
    assert_eq!(code(&fs.op(set("user.a", b"1", XATTR_REPLACE))), Some(ErrorCode::NoData));
    fs.op(set("user.a", b"1", XATTR_CREATE)).unwrap();
    assert_eq!(code(&fs.op(set("user.a", b"2", XATTR_CREATE))), Some(ErrorCode::Exists));
    fs.op(set("user.a", b"2", XATTR_REPLACE)).unwrap();
    assert_eq!(fs.read(MetaRead::GetXattr { ino: f, name: "user.a".into() }).unwrap(), ReadReply::Xattr(b"2".to_vec()));
    assert_eq!(code(&fs.op(set("bogus.a", b"1", 0))), Some(ErrorCode::NotSupported));
    assert_eq!(code(&fs.op(set("user.big", &vec![0; MAX_XATTR_VALUE_BYTES + 1], 0))), Some(ErrorCode::TooBig));
    fs.op(MetaOp::RemoveXattr { ino: f, name: "user.a".into() }).unwrap();
    assert_eq!(code(&fs.op(MetaOp::RemoveXattr { ino: f, name: "user.a".into() })), Some(ErrorCode::NoData));
    // Deleting the file drops its xattrs.
    fs.op(set("user.b", b"x", 0)).unwrap();
    fs.op(MetaOp::Unlink { parent: ROOT_INO, name: "f".into() }).unwrap();
    assert!(!fs.kv.map.keys().any(|k| k[0] == b'X'));
}

#[test]
fn symlinks_resolve_with_loop_limit() {
    let mut fs = Fs::new();
    let d = ino_of(fs.op(mkdir(ROOT_INO, "d")));
    fs.op(create(d, "f")).unwrap();
    let sl = |parent, name: &str, target: &str| MetaOp::Symlink {
        parent,
        name: name.into(),
        target: target.into(),
        caller: Caller::ROOT,
    };
    fs.op(sl(ROOT_INO, "abs", "/d")).unwrap();
    fs.op(sl(ROOT_INO, "rel", "d/../d")).unwrap();
    fs.op(sl(ROOT_INO, "loop", "loop")).unwrap();
    assert_eq!(read::resolve(&fs.kv, b"/abs/f", false).unwrap().unwrap().attr.kind, FileKind::File);
    assert_eq!(read::resolve(&fs.kv, b"/rel/f", false).unwrap().unwrap().attr.kind, FileKind::File);
    assert_eq!(read::resolve(&fs.kv, b"/abs", false).unwrap().unwrap().attr.kind, FileKind::Symlink);
    assert_eq!(read::resolve(&fs.kv, b"/loop", true).unwrap().unwrap_err().code, ErrorCode::Loop);
    assert_eq!(code(&fs.op(sl(ROOT_INO, "e", ""))), Some(ErrorCode::NotFound));
}

#[test]
fn readdir_pages_resume_after_the_last_name() {
    let mut fs = Fs::new();
    for i in 0..25 {
        fs.op(create(ROOT_INO, &format!("f{i:02}"))).unwrap();
    }
    let mut after = None;
    let mut names = Vec::new();
    loop {
        let ReadReply::Entries { entries, more } =
            fs.read(MetaRead::ReadDir { ino: ROOT_INO, after: after.clone(), limit: 10 }).unwrap()
        else {
            panic!()
        };
        after = entries.last().map(|e| e.name.clone());
        names.extend(entries.into_iter().map(|e| e.name));
        // A concurrent change between pages must not disturb the others.
        let _ = fs.op(MetaOp::Unlink { parent: ROOT_INO, name: b"f24".to_vec() });
        if !more {
            break;
        }
    }
    assert_eq!(names.len(), 24, "f24 was removed before its page");
}

#[test]
fn changes_are_recorded_per_entry() {
    let mut fs = Fs::new();
    fs.op(mkdir(ROOT_INO, "d")).unwrap();
    let key = super::keys::change(fs.index);
    let changes: Vec<Change> = super::fsm::dec(&fs.kv.get(&key).unwrap().unwrap()).unwrap();
    assert!(changes.iter().any(|c| matches!(c, Change::EntrySet { parent: ROOT_INO, name, .. } if name == b"d")));
    assert!(changes.iter().any(|c| matches!(c, Change::InodeSet(a) if a.ino == ROOT_INO && a.nlink == 3)));
}

fn layout(r: OpResult) -> Layout {
    match r.unwrap() {
        OpReply::Layout(l) => l,
        other => panic!("{other:?}"),
    }
}

#[test]
fn chunks_are_allocated_with_the_leaders_placement_and_reused() {
    let mut fs = Fs::new();
    fs.servers(3);
    let f = ino_of(fs.op(create(ROOT_INO, "f")));
    let l = layout(fs.prepare(f, 0, 3 << 20));
    assert_eq!(l.chunks.len(), 3);
    assert!(l.chunks.iter().all(|c| c.version == 1 && c.replicas.len() == 3));
    assert_eq!(l.attr.size, 0, "prepare does not change the size");
    // Existing chunks come back as they are, without new placement.
    let again = layout(
        fs.proposal(Proposal::new(None, MetaOp::PrepareWrite { ino: f, offset: 1 << 20, len: 10, extend: false })),
    );
    assert_eq!(again.chunks[0].chunk, l.chunks[1].chunk);
    // A missing chunk without placement: retry.
    let r = fs.proposal(Proposal::new(None, MetaOp::PrepareWrite { ino: f, offset: 10 << 20, len: 10, extend: false }));
    assert_eq!(code(&r), Some(ErrorCode::Unavailable));
    // Directories have no data.
    assert_eq!(code(&fs.prepare(ROOT_INO, 0, 1)), Some(ErrorCode::IsDir));
}

/// Goal: a prepare with `extend` sets the size only when nothing old can
/// show through: the file is empty and every chunk is made by this prepare.
#[test]
fn a_first_write_to_an_empty_file_sets_its_size_with_the_chunks() {
    let mut fs = Fs::new();
    fs.servers(3);
    let d = ino_of(fs.op(mkdir(ROOT_INO, "d")));
    fs.op(MetaOp::SetQuota { ino: d, limits: QuotaLimits { max_bytes: Some(5000), max_inodes: None } }).unwrap();
    let f = ino_of(fs.op(create(d, "f")));
    let l = layout(fs.prepare_with(f, 10, 1014, true));
    assert_eq!((l.attr.size, l.chunks.len()), (1024, 1), "an empty file takes the size with its first chunk");
    assert!(l.attr.blocks > 0, "and its chunk counts");
    assert_eq!(fs.resolve("/d/f").unwrap().size, 1024);
    let quota = |fs: &Fs| match fs.read(MetaRead::GetQuota { ino: d }).unwrap() {
        ReadReply::Quota(Some(u)) => u.used_bytes,
        other => panic!("{other:?}"),
    };
    assert_eq!(quota(&fs), 1024, "the quota is charged as an ExtendSize would");
    // No longer empty: the next prepare leaves the size to ExtendSize.
    let l = layout(fs.prepare_with(f, 1024, 10, true));
    assert_eq!(l.attr.size, 1024);
    // Past the quota: refused, nothing changes.
    let g = ino_of(fs.op(create(d, "g")));
    assert_eq!(code(&fs.prepare_with(g, 0, 4000, true)), Some(ErrorCode::QuotaExceeded));
    assert_eq!(fs.resolve("/d/g").unwrap().size, 0);
    // A write that starts past the first chunk leaves the size alone
    // (the chunks before it are not made here).
    let h = ino_of(fs.op(create(ROOT_INO, "h")));
    assert_eq!(layout(fs.prepare_with(h, 1 << 20, 10, true)).attr.size, 0);
    // An empty file that still has chunks (made but never covered by its
    // size): they may hold bytes, so nothing is extended.
    let k = ino_of(fs.op(create(ROOT_INO, "k")));
    layout(fs.prepare(k, 0, 10));
    assert_eq!(layout(fs.prepare_with(k, 0, 3 << 20, true)).attr.size, 0);
    // Without `extend`, never.
    let m = ino_of(fs.op(create(ROOT_INO, "m")));
    assert_eq!(layout(fs.prepare(m, 0, 10)).attr.size, 0);
}

#[test]
fn size_extends_and_truncation_frees_chunks() {
    let mut fs = Fs::new();
    fs.servers(3);
    let f = ino_of(fs.op(create(ROOT_INO, "f")));
    layout(fs.prepare(f, 0, 5 << 20));
    let a = match fs.op(MetaOp::ExtendSize { ino: f, size: 5 << 20 }).unwrap() {
        OpReply::Attr(a) => a,
        other => panic!("{other:?}"),
    };
    assert_eq!(a.size, 5 << 20);
    // Extending never shrinks.
    fs.op(MetaOp::ExtendSize { ino: f, size: 1 }).unwrap();
    assert_eq!(fs.resolve("/f").unwrap().size, 5 << 20);
    // Truncate to 1.5 chunks keeps chunks 0 and 1, drops 2..4.
    fs.op(MetaOp::SetAttr { ino: f, set: SetAttr { size: Some(3 << 19), ..Default::default() } }).unwrap();
    let kept = super::data::file_chunk_map(&fs.kv, f).unwrap();
    assert_eq!(kept.keys().copied().collect::<Vec<_>>(), vec![0, 1]);
    let chunk_keys = fs.kv.map.keys().filter(|k| k[0] == b'K').count();
    assert_eq!(chunk_keys, 2, "dropped chunks leave the chunk map");
    // Unlinking frees the rest.
    fs.op(MetaOp::Unlink { parent: ROOT_INO, name: b"f".to_vec() }).unwrap();
    assert!(!fs.kv.map.keys().any(|k| k[0] == b'K' || k[0] == b'F'));
}

#[test]
fn a_failed_replica_is_dropped_and_the_version_raised() {
    let mut fs = Fs::new();
    fs.servers(3);
    let f = ino_of(fs.op(create(ROOT_INO, "f")));
    let c = layout(fs.prepare(f, 0, 10)).chunks.remove(0);
    let l = layout(fs.op(MetaOp::ReplicaFailed { ino: f, index: 0, chunk: c.chunk, version: 1, server: 2 }));
    assert_eq!(l.chunks[0].version, 2);
    assert_eq!(l.chunks[0].replicas.iter().map(|r| r.server).collect::<Vec<_>>(), vec![1, 3]);
    // A second report about the old version changes nothing.
    let l = layout(fs.op(MetaOp::ReplicaFailed { ino: f, index: 0, chunk: c.chunk, version: 1, server: 3 }));
    assert_eq!(l.chunks[0].version, 2);
    assert_eq!(l.chunks[0].replicas.len(), 2);
    // Repair adds a copy at the current version; a stale add is skipped.
    // The add raises the version: the source sealed its copy at the next one.
    assert_eq!(
        fs.system(vec![SystemOp::AddReplica { chunk: c.chunk, version: 2, server: 2, drop: vec![] }]),
        vec![Ok(SystemReply::Done)]
    );
    let l = match fs.read(MetaRead::Layout { ino: f, first: 0, count: 1 }).unwrap() {
        ReadReply::Layout(l) => l,
        other => panic!("{other:?}"),
    };
    assert_eq!(l.chunks[0].version, 3);
    assert_eq!(l.chunks[0].replicas.len(), 3);
    assert_eq!(
        fs.system(vec![SystemOp::AddReplica { chunk: c.chunk, version: 2, server: 4, drop: vec![] }]),
        vec![Ok(SystemReply::Skipped)]
    );
    // The last copy is never dropped by a failure report.
    fs.system(vec![
        SystemOp::RemoveReplica { chunk: c.chunk, server: 1 },
        SystemOp::RemoveReplica { chunk: c.chunk, server: 2 },
    ]);
    assert_eq!(
        code(&fs.op(MetaOp::ReplicaFailed { ino: f, index: 0, chunk: c.chunk, version: 3, server: 3 })),
        Some(ErrorCode::Io)
    );
}

#[test]
fn quotas_count_inodes_and_bytes_and_refuse_growth() {
    let mut fs = Fs::new();
    fs.servers(3);
    let d = ino_of(fs.op(mkdir(ROOT_INO, "d")));
    let pre = ino_of(fs.op(create(d, "existing")));
    fs.op(MetaOp::ExtendSize { ino: pre, size: 100 }).unwrap();
    fs.op(MetaOp::SetQuota { ino: d, limits: QuotaLimits { max_bytes: Some(1000), max_inodes: Some(3) } }).unwrap();
    let q = |fs: &Fs| match fs.read(MetaRead::GetQuota { ino: d }).unwrap() {
        ReadReply::Quota(Some(u)) => (u.used_bytes, u.used_inodes),
        other => panic!("{other:?}"),
    };
    assert_eq!(q(&fs), (100, 1), "a new quota counts what is already there");
    let f = ino_of(fs.op(create(d, "f")));
    assert_eq!(code(&fs.op(MetaOp::ExtendSize { ino: f, size: 901 })), Some(ErrorCode::QuotaExceeded));
    fs.op(MetaOp::ExtendSize { ino: f, size: 900 }).unwrap();
    assert_eq!(q(&fs), (1000, 2));
    assert_eq!(code(&fs.prepare(f, 900, 1)), Some(ErrorCode::QuotaExceeded), "prepare checks the would-be size");
    fs.op(create(d, "g")).unwrap();
    assert_eq!(code(&fs.op(create(d, "h"))), Some(ErrorCode::QuotaExceeded));
    // Moving a file out credits the quota; a directory without its own
    // quota cannot cross the boundary.
    fs.op(MetaOp::Rename { parent: d, name: b"f".to_vec(), new_parent: ROOT_INO, new_name: b"f".to_vec(), flags: 0 })
        .unwrap();
    assert_eq!(q(&fs), (100, 2));
    let sub = ino_of(fs.op(mkdir(ROOT_INO, "sub")));
    let r = fs.op(MetaOp::Rename {
        parent: ROOT_INO,
        name: b"sub".to_vec(),
        new_parent: d,
        new_name: b"sub".to_vec(),
        flags: 0,
    });
    assert_eq!(code(&r), Some(ErrorCode::CrossDevice));
    let _ = sub;
    // Truncate and unlink give bytes back.
    fs.op(MetaOp::SetAttr { ino: pre, set: SetAttr { size: Some(40), ..Default::default() } }).unwrap();
    assert_eq!(q(&fs), (40, 2));
    fs.op(MetaOp::Unlink { parent: d, name: b"existing".to_vec() }).unwrap();
    assert_eq!(q(&fs), (0, 1));
}

#[test]
fn goals_are_inherited_and_reach_chunks() {
    let mut fs = Fs::new();
    fs.servers(3);
    let d = ino_of(fs.op(mkdir(ROOT_INO, "d")));
    let two = Goal { copies: 2, level: Level::Rack };
    fs.op(MetaOp::SetGoal { ino: d, goal: two }).unwrap();
    let f = ino_of(fs.op(create(d, "f")));
    assert_eq!(fs.read(MetaRead::GetGoal { ino: f }).unwrap(), ReadReply::Goal(two));
    layout(fs.prepare(f, 0, 10));
    let one = Goal { copies: 1, level: Level::Host };
    fs.op(MetaOp::SetGoal { ino: f, goal: one }).unwrap();
    let c = super::data::file_chunk_map(&fs.kv, f).unwrap()[&0];
    assert_eq!(super::data::load_chunk(&fs.kv, c).unwrap().unwrap().goal, one);
    assert_eq!(
        code(&fs.op(MetaOp::SetGoal { ino: f, goal: Goal { copies: 0, level: Level::Host } })),
        Some(ErrorCode::Invalid)
    );
}

// ---------------------------------------------------------------------------
// Clones and snapshots

const CB: u64 = 1 << 20;

fn cloned(r: OpResult) -> CloneReply {
    match r.unwrap() {
        OpReply::Cloned(c) => c,
        other => panic!("{other:?}"),
    }
}

fn clone_op(src: Ino, parent: Ino, name: &str, snapshot: bool) -> MetaOp {
    MetaOp::Clone { src, parent, name: name.into(), snapshot }
}

impl Fs {
    fn chunk(&self, id: ChunkId) -> Option<super::fsm::ChunkRec> {
        super::data::load_chunk(&self.kv, id).unwrap()
    }
    fn chunks_of(&self, ino: Ino) -> Vec<ChunkId> {
        super::data::file_chunk_map(&self.kv, ino).unwrap().into_values().collect()
    }
    fn layout_of(&self, ino: Ino) -> Layout {
        match self.read(MetaRead::Layout { ino, first: 0, count: MAX_LAYOUT_CHUNKS }).unwrap() {
            ReadReply::Layout(l) => l,
            other => panic!("{other:?}"),
        }
    }
    /// A file of `chunks` chunks, its size set.
    fn file_with_chunks(&mut self, parent: Ino, name: &str, chunks: u64) -> Ino {
        let f = ino_of(self.op(create(parent, name)));
        let mut first = 0;
        while first < chunks {
            let n = (chunks - first).min(MAX_LAYOUT_CHUNKS);
            layout(self.prepare(f, first * CB, n * CB));
            first += n;
        }
        self.op(MetaOp::ExtendSize { ino: f, size: chunks * CB }).unwrap();
        f
    }
    /// Chunk and file-chunk records (what the data path owns).
    fn data_keys(&self) -> usize {
        self.kv.map.keys().filter(|k| k[0] == b'K' || k[0] == b'F').count()
    }
}

/// Goal: a clone shares every chunk (refs + 1), raises each chunk's version
/// once and lists the fences; the copy has the source's attributes.
#[test]
fn clone_shares_chunks_and_fences_their_versions() {
    let mut fs = Fs::new();
    fs.servers(3);
    let f = fs.file_with_chunks(ROOT_INO, "f", 3);
    fs.op(MetaOp::SetXattr { ino: f, name: "user.k".into(), value: b"v".to_vec(), flags: 0 }).unwrap();
    let before = fs.chunks_of(f);
    let r = cloned(fs.op(clone_op(f, ROOT_INO, "g", false)));
    let g = r.attr.ino;
    assert_ne!(g, f);
    assert_eq!((r.inodes, r.chunks), (1, 3));
    assert_eq!((r.attr.size, r.attr.nlink, r.attr.kind), (3 * CB, 1, FileKind::File));
    assert_eq!(fs.chunks_of(g), before, "the copy names the same chunks");
    for c in &before {
        let rec = fs.chunk(*c).unwrap();
        assert_eq!((rec.refs, rec.version), (2, 2));
    }
    assert_eq!(r.fences.len(), 3);
    assert!(r.fences.iter().all(|x| x.from == 1 && x.to == 2 && x.replicas == vec![1, 2, 3] && x.origin.is_none()));
    assert_eq!(r.servers.iter().map(|(id, _)| *id).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert!(fs.layout_of(f).chunks.iter().all(|c| c.shared && c.version == 2));
    assert_eq!(fs.read(MetaRead::GetXattr { ino: g, name: "user.k".into() }).unwrap(), ReadReply::Xattr(b"v".to_vec()));
    // Refused: an existing name, a bad name, a missing source.
    assert_eq!(code(&fs.op(clone_op(f, ROOT_INO, "g", false))), Some(ErrorCode::Exists));
    assert_eq!(code(&fs.op(clone_op(f, ROOT_INO, "a/b", false))), Some(ErrorCode::Invalid));
    assert_eq!(code(&fs.op(clone_op(999, ROOT_INO, "x", false))), Some(ErrorCode::NotFound));
    // A clone of a clone shares once more; each chunk is raised once more.
    let r2 = cloned(fs.op(clone_op(g, ROOT_INO, "h", false)));
    assert!(r2.fences.iter().all(|x| x.from == 2 && x.to == 3));
    assert!(before.iter().all(|c| fs.chunk(*c).unwrap().refs == 3));
}

/// Goal: a writer of a shared chunk gets a copy on the same servers whose
/// origin is the old chunk; the old chunk keeps its count until the copy is
/// done; asking twice or for an unshared chunk copies nothing.
#[test]
fn cow_chunk_and_cow_done_move_one_reference() {
    let mut fs = Fs::new();
    fs.servers(3);
    let f = fs.file_with_chunks(ROOT_INO, "f", 2);
    let g = cloned(fs.op(clone_op(f, ROOT_INO, "g", false))).attr.ino;
    let [c0, c1] = fs.chunks_of(f)[..] else { panic!() };
    let l = layout(fs.op(MetaOp::CowChunk { ino: g, index: 0, chunk: c0 }));
    let n = l.chunks[0].clone();
    assert_ne!(n.chunk, c0);
    assert!(n.chunk > c0, "a copy is newer than its origin");
    assert_eq!((n.version, n.shared, n.origin), (1, false, Some((c0, 2))));
    assert_eq!(n.replicas.iter().map(|r| r.server).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(fs.chunks_of(g), vec![n.chunk, c1]);
    assert_eq!(fs.chunk(c0).unwrap().refs, 2, "the copy's origin holds the reference the clone had");
    // Asked again with the old id (another writer): the same copy, no new one.
    let again = layout(fs.op(MetaOp::CowChunk { ino: g, index: 0, chunk: c0 }));
    assert_eq!(again.chunks[0].chunk, n.chunk);
    let next_before = fs.kv.map.keys().filter(|k| k[0] == b'K').count();
    // The copy is not shared: no copy of it.
    let same = layout(fs.op(MetaOp::CowChunk { ino: g, index: 0, chunk: n.chunk }));
    assert_eq!(same.chunks[0].chunk, n.chunk);
    assert_eq!(fs.kv.map.keys().filter(|k| k[0] == b'K').count(), next_before);
    assert_eq!(code(&fs.op(MetaOp::CowChunk { ino: g, index: 7, chunk: c0 })), Some(ErrorCode::NotFound));
    // Done: the origin's reference goes, the source's chunk is its own again.
    fs.op(MetaOp::CowDone { chunk: n.chunk }).unwrap();
    assert_eq!(fs.chunk(n.chunk).unwrap().origin, None);
    assert_eq!(fs.chunk(c0).unwrap().refs, 1);
    assert!(!fs.layout_of(f).chunks[0].shared);
    assert!(fs.layout_of(f).chunks[1].shared);
    // Idempotent, and harmless for unknown chunks.
    fs.op(MetaOp::CowDone { chunk: n.chunk }).unwrap();
    fs.op(MetaOp::CowDone { chunk: 12345 }).unwrap();
    assert_eq!(fs.chunk(c0).unwrap().refs, 1);
}

/// Goal: deleting the source leaves the clone whole; chunks leave the map
/// only with their last reference, a pending copy's origin included.
#[test]
fn unlink_frees_chunks_only_at_the_last_reference() {
    let mut fs = Fs::new();
    fs.servers(3);
    let f = fs.file_with_chunks(ROOT_INO, "f", 3);
    let g = cloned(fs.op(clone_op(f, ROOT_INO, "g", false))).attr.ino;
    let chunks = fs.chunks_of(f);
    // g copies chunk 0 and never reports it done; truncation drops chunk 2.
    let n = layout(fs.op(MetaOp::CowChunk { ino: g, index: 0, chunk: chunks[0] })).chunks[0].chunk;
    fs.op(MetaOp::SetAttr { ino: g, set: SetAttr { size: Some(2 * CB), ..Default::default() } }).unwrap();
    assert_eq!(fs.chunk(chunks[2]).unwrap().refs, 1);
    fs.op(MetaOp::Unlink { parent: ROOT_INO, name: "f".into() }).unwrap();
    assert!(fs.chunk(chunks[2]).is_none(), "chunk 2 had only the source");
    assert_eq!(fs.chunk(chunks[0]).unwrap().refs, 1, "held by the pending copy");
    assert_eq!(fs.chunk(chunks[1]).unwrap().refs, 1, "held by the clone");
    assert_eq!(fs.layout_of(g).chunks.len(), 2);
    // The last reference: the copy, then its origin, go.
    fs.op(MetaOp::Unlink { parent: ROOT_INO, name: "g".into() }).unwrap();
    assert!(fs.chunk(n).is_none() && fs.chunk(chunks[0]).is_none() && fs.chunk(chunks[1]).is_none());
    assert_eq!(fs.data_keys(), 0);
}

/// Goal: a snapshot's inodes never change: data, attributes, xattrs, goal
/// and links are refused with ReadOnly; its entry can still be removed.
#[test]
fn a_snapshot_is_read_only() {
    let mut fs = Fs::new();
    fs.servers(3);
    let f = fs.file_with_chunks(ROOT_INO, "f", 1);
    let s = cloned(fs.op(clone_op(f, ROOT_INO, "s", true))).attr.ino;
    let c0 = fs.chunks_of(s)[0];
    let ro = Some(ErrorCode::ReadOnly);
    assert_eq!(code(&fs.prepare(s, 0, 10)), ro);
    assert_eq!(code(&fs.op(MetaOp::ExtendSize { ino: s, size: 10 * CB })), ro);
    assert_eq!(code(&fs.op(MetaOp::SetAttr { ino: s, set: SetAttr { size: Some(1), ..Default::default() } })), ro);
    assert_eq!(code(&fs.op(MetaOp::SetAttr { ino: s, set: SetAttr { mode: Some(0o600), ..Default::default() } })), ro);
    assert_eq!(code(&fs.op(MetaOp::SetXattr { ino: s, name: "user.a".into(), value: vec![], flags: 0 })), ro);
    assert_eq!(code(&fs.op(MetaOp::SetGoal { ino: s, goal: Goal { copies: 1, level: Level::Host } })), ro);
    assert_eq!(code(&fs.op(MetaOp::CowChunk { ino: s, index: 0, chunk: c0 })), ro);
    assert_eq!(code(&fs.op(MetaOp::Link { ino: s, new_parent: ROOT_INO, new_name: "s2".into() })), ro);
    // The source stays writable; the snapshot's entry can be renamed and removed.
    layout(fs.prepare(f, 0, 10));
    let before = fs.resolve("/s").unwrap();
    fs.op(MetaOp::Rename { parent: ROOT_INO, name: "s".into(), new_parent: ROOT_INO, new_name: "t".into(), flags: 0 })
        .unwrap();
    assert_eq!(fs.resolve("/t").unwrap(), before, "renaming the entry leaves the inode as it was");
    assert_eq!(
        code(&fs.op(MetaOp::DropSnapshot { parent: ROOT_INO, name: "f".into() })),
        Some(ErrorCode::Invalid),
        "not a snapshot"
    );
    fs.op(MetaOp::Unlink { parent: ROOT_INO, name: "t".into() }).unwrap();
    assert_eq!(fs.chunk(c0).unwrap().refs, 1);
}

/// Goal: a directory tree is cloned in one command: structure, link counts
/// (hard links inside the tree stay links), symlinks; a snapshot directory
/// refuses entry changes; `DropSnapshot` removes it whole.
#[test]
fn directory_clone_and_snapshot() {
    let mut fs = Fs::new();
    fs.servers(3);
    let d = ino_of(fs.op(mkdir(ROOT_INO, "d")));
    let sub = ino_of(fs.op(mkdir(d, "sub")));
    let a = fs.file_with_chunks(d, "a", 2);
    fs.file_with_chunks(sub, "b", 1);
    fs.op(MetaOp::Link { ino: a, new_parent: sub, new_name: "a2".into() }).unwrap();
    fs.op(MetaOp::Link { ino: a, new_parent: ROOT_INO, new_name: "outside".into() }).unwrap();
    fs.op(MetaOp::Symlink { parent: d, name: "l".into(), target: "a".into(), caller: Caller::ROOT }).unwrap();
    let r = cloned(fs.op(clone_op(d, ROOT_INO, "c", false)));
    assert_eq!((r.inodes, r.chunks), (5, 3), "d, sub, a (once), b, l");
    let tree = fs.tree();
    let under = |p: &str| -> BTreeMap<String, (FileKind, u32)> {
        tree.iter().filter_map(|(k, v)| k.strip_prefix(p).map(|rest| (rest.to_string(), *v))).collect()
    };
    let mut want = under("/d/");
    // The source's file has a third link outside the tree; the copy does not.
    want.insert("a".into(), (FileKind::File, 2));
    want.insert("sub/a2".into(), (FileKind::File, 2));
    assert_eq!(under("/c/"), want);
    assert_eq!(fs.resolve("/c/a").unwrap().ino, fs.resolve("/c/sub/a2").unwrap().ino);
    assert_ne!(fs.resolve("/c/a").unwrap().ino, a);
    assert_eq!(fs.resolve("/").unwrap().nlink, 4, "root has d and c");
    assert_eq!(fs.chunk(fs.chunks_of(a)[0]).unwrap().refs, 2);
    assert_eq!(read::resolve(&fs.kv, b"/c/l", true).unwrap().unwrap().attr.ino, fs.resolve("/c/a").unwrap().ino);
    assert_eq!(code(&fs.op(clone_op(d, sub, "self", false))), Some(ErrorCode::Invalid), "into itself");
    // The clone is writable.
    fs.op(create(r.attr.ino, "new")).unwrap();

    let s = cloned(fs.op(clone_op(d, ROOT_INO, "snap", true))).attr.ino;
    let ssub = fs.resolve("/snap/sub").unwrap().ino;
    let ro = Some(ErrorCode::ReadOnly);
    assert_eq!(code(&fs.op(create(s, "x"))), ro);
    assert_eq!(code(&fs.op(mkdir(ssub, "x"))), ro);
    assert_eq!(code(&fs.op(MetaOp::Unlink { parent: s, name: "a".into() })), ro);
    assert_eq!(code(&fs.op(MetaOp::Rmdir { parent: s, name: "sub".into() })), ro);
    let mv = |p, n: &str, q, m: &str| MetaOp::Rename {
        parent: p,
        name: n.into(),
        new_parent: q,
        new_name: m.into(),
        flags: 0,
    };
    assert_eq!(code(&fs.op(mv(s, "a", s, "z"))), ro);
    assert_eq!(code(&fs.op(mv(ROOT_INO, "outside", ssub, "z"))), ro, "into a snapshot");
    assert_eq!(code(&fs.op(mv(ssub, "b", ROOT_INO, "z"))), ro, "out of a snapshot");
    assert_eq!(code(&fs.op(MetaOp::Rmdir { parent: ROOT_INO, name: "snap".into() })), Some(ErrorCode::NotEmpty));
    assert_eq!(fs.chunk(fs.chunks_of(a)[0]).unwrap().refs, 3);
    // Removing the snapshot gives every reference and inode back.
    let inodes = |fs: &Fs| match fs.read(MetaRead::StatFs).unwrap() {
        ReadReply::StatFs(s) => s.total_inodes - s.free_inodes,
        other => panic!("{other:?}"),
    };
    let n = inodes(&fs);
    fs.op(MetaOp::DropSnapshot { parent: ROOT_INO, name: "snap".into() }).unwrap();
    assert_eq!(inodes(&fs), n - 5);
    assert!(fs.resolve("/snap").is_err());
    assert_eq!(fs.chunk(fs.chunks_of(a)[0]).unwrap().refs, 2);
    assert_eq!(fs.resolve("/").unwrap().nlink, 4);
    // Deleting everything frees every chunk.
    for (p, n) in [(sub, "a2"), (sub, "b"), (d, "a"), (d, "l"), (ROOT_INO, "outside")] {
        fs.op(MetaOp::Unlink { parent: p, name: n.into() }).unwrap();
    }
    fs.op(MetaOp::Rmdir { parent: d, name: "sub".into() }).unwrap();
    fs.op(MetaOp::Rmdir { parent: ROOT_INO, name: "d".into() }).unwrap();
    let c = r.attr.ino;
    let csub = fs.resolve("/c/sub").unwrap().ino;
    for (p, n) in [(csub, "a2"), (csub, "b"), (c, "a"), (c, "l"), (c, "new")] {
        fs.op(MetaOp::Unlink { parent: p, name: n.into() }).unwrap();
    }
    fs.op(MetaOp::Rmdir { parent: c, name: "sub".into() }).unwrap();
    fs.op(MetaOp::Rmdir { parent: ROOT_INO, name: "c".into() }).unwrap();
    assert_eq!(fs.data_keys(), 0);
    assert_eq!(inodes(&fs), 1);
}

/// Goal: a clone of a file with a copy not yet written fences the copy
/// with its origin (so the replicas can make it), and charges quotas.
#[test]
fn clone_fences_pending_copies_with_their_origin_and_charges_quota() {
    let mut fs = Fs::new();
    fs.servers(3);
    let f = fs.file_with_chunks(ROOT_INO, "f", 1);
    let g = cloned(fs.op(clone_op(f, ROOT_INO, "g", false))).attr.ino;
    let c0 = fs.chunks_of(f)[0];
    let n = layout(fs.op(MetaOp::CowChunk { ino: g, index: 0, chunk: c0 })).chunks[0].chunk;
    let r = cloned(fs.op(clone_op(g, ROOT_INO, "h", false)));
    assert_eq!(r.fences.len(), 1);
    assert_eq!((r.fences[0].chunk, r.fences[0].from, r.fences[0].to), (n, 1, 2));
    assert_eq!(r.fences[0].origin, Some((c0, 2)));

    let q = ino_of(fs.op(mkdir(ROOT_INO, "q")));
    fs.op(MetaOp::SetQuota { ino: q, limits: QuotaLimits { max_bytes: Some(CB + CB / 2), max_inodes: None } }).unwrap();
    cloned(fs.op(clone_op(f, q, "one", false)));
    match fs.read(MetaRead::GetQuota { ino: q }).unwrap() {
        ReadReply::Quota(Some(u)) => assert_eq!((u.used_bytes, u.used_inodes), (CB, 1)),
        other => panic!("{other:?}"),
    }
    assert_eq!(code(&fs.op(clone_op(f, q, "two", false))), Some(ErrorCode::QuotaExceeded));
}

/// Goal: trees above the bounds are refused whole, changing nothing.
#[test]
fn clones_above_the_bounds_are_refused() {
    let mut fs = Fs::new();
    fs.servers(3);
    let d = ino_of(fs.op(mkdir(ROOT_INO, "big")));
    // Planted directly: MAX_CLONE_INODES files, so with the directory the
    // tree is one inode over.
    let base = 1_000_000u64;
    for i in 0..MAX_CLONE_INODES {
        let ino = base + i;
        let mut rec = super::fsm::load_inode(&fs.kv, d).unwrap().unwrap();
        rec.attr.ino = ino;
        rec.attr.kind = FileKind::File;
        rec.attr.nlink = 1;
        rec.parent = 0;
        fs.kv.map.insert(super::keys::inode(ino), super::fsm::enc(&rec));
        let de = super::fsm::DentryRec { ino, kind: FileKind::File };
        fs.kv.map.insert(super::keys::dentry(d, format!("f{i}").as_bytes()), super::fsm::enc(&de));
    }
    let before = fs.kv.map.clone();
    let data = |m: &BTreeMap<Vec<u8>, Vec<u8>>| {
        m.iter().filter(|(k, _)| matches!(k[0], b'I' | b'D' | b'X' | b'F' | b'K')).count()
    };
    let r = fs.op(clone_op(d, ROOT_INO, "copy", true));
    assert_eq!(code(&r), Some(ErrorCode::TooBig), "{r:?}");
    assert!(r.unwrap_err().message.contains("100000 inodes"));
    assert_eq!(data(&before), data(&fs.kv.map));
    assert!(fs.resolve("/copy").is_err());

    // Chunk references: one file naming one chunk MAX_CLONE_CHUNKS + 1 times.
    let f = fs.file_with_chunks(ROOT_INO, "f", 1);
    let c0 = fs.chunks_of(f)[0];
    for i in 1..=MAX_CLONE_CHUNKS {
        fs.kv.map.insert(super::keys::file_chunk(f, i), c0.to_be_bytes().to_vec());
    }
    let r = fs.op(clone_op(f, ROOT_INO, "g", false));
    assert_eq!(code(&r), Some(ErrorCode::TooBig), "{r:?}");
    assert_eq!(fs.chunk(c0).unwrap().refs, 1);
}

/// Cost of one clone command of a file with 16,384 chunks (1 TiB of 64 MiB
/// chunks): planning and applying it, measured on the in-memory store.
#[test]
fn clone_of_sixteen_thousand_chunks_costs_one_command() {
    let mut fs = Fs::new();
    fs.servers(3);
    let f = fs.file_with_chunks(ROOT_INO, "f", 16_384);
    let t = std::time::Instant::now();
    let r = cloned(fs.op(clone_op(f, ROOT_INO, "g", true)));
    let elapsed = t.elapsed();
    eprintln!("clone of 16384 chunks: {elapsed:?} (debug build, in-memory store)");
    assert_eq!((r.chunks, r.fences.len()), (16_384, 16_384));
    let bytes = postcard::to_allocvec(&r).unwrap().len();
    eprintln!("reply: {bytes} bytes");
    assert!(bytes < 1 << 20, "the reply stays small: {bytes} bytes");
    assert!(elapsed < std::time::Duration::from_secs(20));
}

// ---------------------------------------------------------------------------
// Model

#[derive(Debug, Clone)]
enum MNode {
    Dir { entries: BTreeMap<String, usize>, parent: usize },
    File { nlink: u32 },
    Link { nlink: u32 },
}

#[derive(Debug, Clone)]
struct Model {
    nodes: BTreeMap<usize, MNode>,
    next: usize,
}

const ROOT: usize = 0;

impl Model {
    fn new() -> Self {
        let mut nodes = BTreeMap::new();
        nodes.insert(ROOT, MNode::Dir { entries: BTreeMap::new(), parent: ROOT });
        Model { nodes, next: 1 }
    }
    fn entries(&self, d: usize) -> Option<&BTreeMap<String, usize>> {
        match self.nodes.get(&d)? {
            MNode::Dir { entries, .. } => Some(entries),
            _ => None,
        }
    }
    fn entries_mut(&mut self, d: usize) -> &mut BTreeMap<String, usize> {
        match self.nodes.get_mut(&d) {
            Some(MNode::Dir { entries, .. }) => entries,
            _ => panic!("not a dir"),
        }
    }
    fn is_dir(&self, n: usize) -> bool {
        matches!(self.nodes.get(&n), Some(MNode::Dir { .. }))
    }
    /// Resolves a path of directory names, not following links.
    fn dir(&self, path: &[&str]) -> Result<usize, ErrorCode> {
        let mut cur = ROOT;
        for c in path {
            let e = match self.nodes.get(&cur) {
                Some(MNode::Dir { entries, .. }) => entries,
                // Every symlink points at "t", which never exists: dangling.
                Some(MNode::Link { .. }) => return Err(ErrorCode::NotFound),
                _ => return Err(ErrorCode::NotDir),
            };
            cur = *e.get(*c).ok_or(ErrorCode::NotFound)?;
        }
        if !self.is_dir(cur) {
            return Err(ErrorCode::NotDir);
        }
        Ok(cur)
    }
    fn ancestors(&self, mut d: usize) -> Vec<usize> {
        let mut v = vec![d];
        while d != ROOT {
            d = match &self.nodes[&d] {
                MNode::Dir { parent, .. } => *parent,
                _ => unreachable!(),
            };
            v.push(d);
        }
        v
    }
    fn new_node(&mut self, n: MNode) -> usize {
        let id = self.next;
        self.next += 1;
        self.nodes.insert(id, n);
        id
    }
    fn drop_link(&mut self, n: usize) {
        match self.nodes.get_mut(&n) {
            Some(MNode::File { nlink }) | Some(MNode::Link { nlink }) if *nlink > 1 => *nlink -= 1,
            _ => {
                self.nodes.remove(&n);
            }
        }
    }
    fn apply(&mut self, op: &ModelOp) -> Result<(), ErrorCode> {
        match op {
            ModelOp::Mkdir(p, n) | ModelOp::Create(p, n) | ModelOp::Symlink(p, n) => {
                let d = self.dir(p)?;
                if self.entries(d).unwrap().contains_key(*n) {
                    return Err(ErrorCode::Exists);
                }
                let node = match op {
                    ModelOp::Mkdir(..) => MNode::Dir { entries: BTreeMap::new(), parent: d },
                    ModelOp::Create(..) => MNode::File { nlink: 1 },
                    _ => MNode::Link { nlink: 1 },
                };
                let id = self.new_node(node);
                self.entries_mut(d).insert(n.to_string(), id);
                Ok(())
            }
            ModelOp::Unlink(p, n) => {
                let d = self.dir(p)?;
                let t = *self.entries(d).unwrap().get(*n).ok_or(ErrorCode::NotFound)?;
                if self.is_dir(t) {
                    return Err(ErrorCode::IsDir);
                }
                self.entries_mut(d).remove(*n);
                self.drop_link(t);
                Ok(())
            }
            ModelOp::Rmdir(p, n) => {
                let d = self.dir(p)?;
                let t = *self.entries(d).unwrap().get(*n).ok_or(ErrorCode::NotFound)?;
                if !self.is_dir(t) {
                    return Err(ErrorCode::NotDir);
                }
                if !self.entries(t).unwrap().is_empty() {
                    return Err(ErrorCode::NotEmpty);
                }
                self.entries_mut(d).remove(*n);
                self.nodes.remove(&t);
                Ok(())
            }
            ModelOp::Link(p, n, p2, n2) => {
                let d = self.dir(p)?;
                let t = *self.entries(d).unwrap().get(*n).ok_or(ErrorCode::NotFound)?;
                if self.is_dir(t) {
                    return Err(ErrorCode::NotPermitted);
                }
                let d2 = self.dir(p2)?;
                if self.entries(d2).unwrap().contains_key(*n2) {
                    return Err(ErrorCode::Exists);
                }
                if let Some(MNode::File { nlink }) | Some(MNode::Link { nlink }) = self.nodes.get_mut(&t) {
                    *nlink += 1;
                }
                self.entries_mut(d2).insert(n2.to_string(), t);
                Ok(())
            }
            ModelOp::Rename(p, n, p2, n2, flags) => {
                let d = self.dir(p)?;
                let d2 = self.dir(p2)?;
                let s = *self.entries(d).unwrap().get(*n).ok_or(ErrorCode::NotFound)?;
                let t = self.entries(d2).unwrap().get(*n2).copied();
                if *flags == RENAME_EXCHANGE {
                    let t = t.ok_or(ErrorCode::NotFound)?;
                    if s == t {
                        return Ok(());
                    }
                    if d != d2 {
                        if self.is_dir(s) && self.ancestors(d2).contains(&s) {
                            return Err(ErrorCode::Invalid);
                        }
                        if self.is_dir(t) && self.ancestors(d).contains(&t) {
                            return Err(ErrorCode::Invalid);
                        }
                    }
                    self.entries_mut(d).insert(n.to_string(), t);
                    self.entries_mut(d2).insert(n2.to_string(), s);
                    for (x, to) in [(s, d2), (t, d)] {
                        if let Some(MNode::Dir { parent, .. }) = self.nodes.get_mut(&x) {
                            *parent = to;
                        }
                    }
                    return Ok(());
                }
                if let Some(t) = t {
                    if *flags == RENAME_NOREPLACE {
                        return Err(ErrorCode::Exists);
                    }
                    if s == t {
                        return Ok(());
                    }
                }
                if self.is_dir(s) && self.ancestors(d2).contains(&s) {
                    return Err(ErrorCode::Invalid);
                }
                if let Some(t) = t {
                    match (self.is_dir(s), self.is_dir(t)) {
                        (true, false) => return Err(ErrorCode::NotDir),
                        (false, true) => return Err(ErrorCode::IsDir),
                        (true, true) if !self.entries(t).unwrap().is_empty() => return Err(ErrorCode::NotEmpty),
                        _ => {}
                    }
                    self.drop_link(t);
                }
                self.entries_mut(d).remove(*n);
                self.entries_mut(d2).insert(n2.to_string(), s);
                if let Some(MNode::Dir { parent, .. }) = self.nodes.get_mut(&s) {
                    *parent = d2;
                }
                Ok(())
            }
        }
    }
    fn tree(&self) -> BTreeMap<String, (FileKind, u32)> {
        let mut out = BTreeMap::new();
        let mut stack = vec![(String::new(), ROOT)];
        while let Some((path, d)) = stack.pop() {
            for (name, &n) in self.entries(d).unwrap() {
                let p = format!("{path}/{name}");
                let v = match &self.nodes[&n] {
                    MNode::Dir { entries, .. } => {
                        stack.push((p.clone(), n));
                        let subdirs = entries.values().filter(|c| self.is_dir(**c)).count() as u32;
                        (FileKind::Dir, 2 + subdirs)
                    }
                    MNode::File { nlink } => (FileKind::File, *nlink),
                    MNode::Link { nlink } => (FileKind::Symlink, *nlink),
                };
                out.insert(p, v);
            }
        }
        out
    }
}

#[derive(Debug, Clone)]
enum ModelOp {
    Mkdir(Vec<&'static str>, &'static str),
    Create(Vec<&'static str>, &'static str),
    Symlink(Vec<&'static str>, &'static str),
    Unlink(Vec<&'static str>, &'static str),
    Rmdir(Vec<&'static str>, &'static str),
    Link(Vec<&'static str>, &'static str, Vec<&'static str>, &'static str),
    Rename(Vec<&'static str>, &'static str, Vec<&'static str>, &'static str, u32),
}

const NAMES: [&str; 3] = ["a", "b", "c"];

fn arb_dir() -> impl Strategy<Value = Vec<&'static str>> {
    prop::collection::vec(prop::sample::select(&NAMES[..]), 0..3)
}

fn arb_name() -> impl Strategy<Value = &'static str> {
    prop::sample::select(&NAMES[..])
}

fn arb_op() -> impl Strategy<Value = ModelOp> {
    prop_oneof![
        3 => (arb_dir(), arb_name()).prop_map(|(p, n)| ModelOp::Mkdir(p, n)),
        3 => (arb_dir(), arb_name()).prop_map(|(p, n)| ModelOp::Create(p, n)),
        1 => (arb_dir(), arb_name()).prop_map(|(p, n)| ModelOp::Symlink(p, n)),
        2 => (arb_dir(), arb_name()).prop_map(|(p, n)| ModelOp::Unlink(p, n)),
        2 => (arb_dir(), arb_name()).prop_map(|(p, n)| ModelOp::Rmdir(p, n)),
        1 => (arb_dir(), arb_name(), arb_dir(), arb_name()).prop_map(|(p, n, q, m)| ModelOp::Link(p, n, q, m)),
        4 => (arb_dir(), arb_name(), arb_dir(), arb_name(), prop::sample::select(&[0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE][..]))
            .prop_map(|(p, n, q, m, f)| ModelOp::Rename(p, n, q, m, f)),
    ]
}

fn path_of(dir: &[&str]) -> String {
    format!("/{}", dir.join("/"))
}

/// Runs the op on the state machine, resolving directories first as a client would.
fn run_fs(fs: &mut Fs, op: &ModelOp) -> Result<(), ErrorCode> {
    let dir = |fs: &Fs, d: &[&str]| -> Result<Ino, ErrorCode> {
        let a = fs.resolve(&path_of(d)).map_err(|e| e.code)?;
        if a.kind != FileKind::Dir {
            return Err(ErrorCode::NotDir);
        }
        Ok(a.ino)
    };
    let r = match op {
        ModelOp::Mkdir(p, n) => fs.op(mkdir(dir(fs, p)?, n)),
        ModelOp::Create(p, n) => fs.op(create(dir(fs, p)?, n)),
        ModelOp::Symlink(p, n) => fs.op(MetaOp::Symlink {
            parent: dir(fs, p)?,
            name: n.as_bytes().to_vec(),
            target: b"t".to_vec(),
            caller: Caller::ROOT,
        }),
        ModelOp::Unlink(p, n) => fs.op(MetaOp::Unlink { parent: dir(fs, p)?, name: n.as_bytes().to_vec() }),
        ModelOp::Rmdir(p, n) => fs.op(MetaOp::Rmdir { parent: dir(fs, p)?, name: n.as_bytes().to_vec() }),
        ModelOp::Link(p, n, q, m) => {
            let d = dir(fs, p)?;
            let t = match fs.read(MetaRead::Lookup { parent: d, name: n.as_bytes().to_vec() }) {
                Ok(ReadReply::Attr(a)) => a.ino,
                Ok(_) => unreachable!(),
                Err(e) => return Err(e.code),
            };
            fs.op(MetaOp::Link { ino: t, new_parent: dir(fs, q)?, new_name: m.as_bytes().to_vec() })
        }
        ModelOp::Rename(p, n, q, m, f) => {
            let (d, d2) = (dir(fs, p)?, dir(fs, q)?);
            fs.op(MetaOp::Rename {
                parent: d,
                name: n.as_bytes().to_vec(),
                new_parent: d2,
                new_name: m.as_bytes().to_vec(),
                flags: *f,
            })
        }
    };
    r.map(|_| ()).map_err(|e| e.code)
}

/// The model resolves the directory arguments first, in the same order.
fn run_model(m: &mut Model, op: &ModelOp) -> Result<(), ErrorCode> {
    match op {
        ModelOp::Link(p, n, q, _) => {
            let d = m.dir(p)?;
            m.entries(d).unwrap().get(*n).ok_or(ErrorCode::NotFound)?;
            m.dir(q)?;
        }
        ModelOp::Rename(p, _, q, _, _) => {
            m.dir(p)?;
            m.dir(q)?;
        }
        _ => {}
    }
    m.apply(op)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Any sequence of operations gives the model's results and the model's tree.
    #[test]
    fn state_machine_matches_model(ops in prop::collection::vec(arb_op(), 1..60)) {
        let mut fs = Fs::new();
        let mut model = Model::new();
        for op in &ops {
            let got = run_fs(&mut fs, op);
            let want = run_model(&mut model, op);
            prop_assert_eq!(got, want, "op {:?}", op);
        }
        prop_assert_eq!(fs.tree(), model.tree());
    }
}

/// Goal: a cluster made now records its checksum block size; one made by
/// the older `Init` reads as the legacy size its chunk files have; a later
/// init changes neither.
#[test]
fn block_size_is_fixed_at_creation() {
    let old = Fs::new();
    assert_eq!(super::data::block_bytes(&old.kv).unwrap(), LEGACY_BLOCK_BYTES);
    let mut kv = MemKv::new();
    let now = Timespec { secs: 1, nanos: 0 };
    apply(&mut kv, 1, &Command::InitBlocks { now, chunk_bytes: 1 << 20, block_bytes: 16 << 10 });
    assert_eq!(super::data::block_bytes(&kv).unwrap(), 16 << 10);
    assert_eq!(super::data::chunk_bytes(&kv).unwrap(), 1 << 20);
    apply(&mut kv, 2, &Command::InitBlocks { now, chunk_bytes: 2 << 20, block_bytes: 4 << 10 });
    assert_eq!((super::data::chunk_bytes(&kv).unwrap(), super::data::block_bytes(&kv).unwrap()), (1 << 20, 16 << 10));
}

fn leased(r: OpResult) -> LeaseReply {
    match r {
        Ok(OpReply::Leased(l)) => l,
        other => panic!("{other:?}"),
    }
}

/// Goal: a write lease keeps every other client from changing the file's
/// data or size until it lapses; taken afresh it fences every chunk once;
/// renewals fence nothing; a release or the file's removal drops it.
#[test]
fn a_write_lease_excludes_other_writers_until_it_lapses() {
    let mut fs = Fs::new();
    fs.servers(3);
    let f = fs.file_with_chunks(ROOT_INO, "img", 2);
    let a = |seq| Some(RequestId { client: 0xA, seq });
    let b = |seq| Some(RequestId { client: 0xB, seq });
    let lease = |ttl_ms| MetaOp::Lease { ino: f, ttl_ms };

    // Client A takes it for 10 s (the test clock moves 1 s per command).
    let r = leased(fs.op_with_id(a(1), lease(10_000)));
    let l = r.lease.expect("granted");
    assert_eq!(l.holder, 0xA);
    assert_eq!(r.fences.len(), 2, "every chunk fenced");
    assert!(r.fences.iter().all(|x| x.from == 1 && x.to == 2));
    assert_eq!(fs.layout_of(f).lease, Some(l), "layouts tell every client");
    assert!(fs.layout_of(f).chunks.iter().all(|c| c.version == 2));

    // B may not take it, nor change the size or allocate, nor copy-on-write.
    assert_eq!(code(&fs.op_with_id(b(1), lease(10_000))), Some(ErrorCode::Busy));
    let set = SetAttr { size: Some(1), ..Default::default() };
    assert_eq!(code(&fs.op_with_id(b(2), MetaOp::SetAttr { ino: f, set: set.clone() })), Some(ErrorCode::Busy));
    assert_eq!(code(&fs.op_with_id(b(3), MetaOp::ExtendSize { ino: f, size: 5 * CB })), Some(ErrorCode::Busy));
    let p = Proposal {
        id: b(4),
        op: MetaOp::PrepareWrite { ino: f, offset: 2 * CB, len: 1, extend: false },
        placement: vec![(2, vec![1, 2, 3])],
    };
    assert_eq!(code(&fs.proposal(p)), Some(ErrorCode::Busy));
    // Other changes (attributes, names) go on.
    fs.op_with_id(b(5), MetaOp::SetAttr { ino: f, set: SetAttr { mode: Some(0o600), ..Default::default() } }).unwrap();

    // A itself writes; its renewal fences nothing.
    fs.op_with_id(a(2), MetaOp::ExtendSize { ino: f, size: 2 * CB + 7 }).unwrap();
    let r = leased(fs.op_with_id(a(3), lease(10_000)));
    assert!(r.fences.is_empty(), "a renewal is not a new lease");

    // Once it lapses B writes again, and may take it (fencing afresh).
    for _ in 0..11 {
        fs.op(MetaOp::SetAttr { ino: ROOT_INO, set: SetAttr::default() }).unwrap();
    }
    fs.op_with_id(b(6), MetaOp::SetAttr { ino: f, set }).unwrap();
    let r = leased(fs.op_with_id(b(7), lease(5_000)));
    assert_eq!(r.lease.map(|l| l.holder), Some(0xB));
    assert!(r.fences.iter().all(|x| x.from == 2 && x.to == 3));
    assert_eq!(code(&fs.op_with_id(a(4), MetaOp::ExtendSize { ino: f, size: 9 })), Some(ErrorCode::Busy));

    // A release by a non-holder does nothing; the holder's frees it.
    leased(fs.op_with_id(a(5), lease(0)));
    assert!(fs.layout_of(f).lease.is_some());
    leased(fs.op_with_id(b(8), lease(0)));
    assert_eq!(fs.layout_of(f).lease, None);

    // Bounds and kinds: too long, no client id, a directory.
    assert_eq!(code(&fs.op_with_id(a(6), lease(MAX_LEASE_TTL_MS + 1))), Some(ErrorCode::Invalid));
    assert_eq!(code(&fs.op(lease(1_000))), Some(ErrorCode::Invalid));
    assert_eq!(code(&fs.op_with_id(a(7), MetaOp::Lease { ino: ROOT_INO, ttl_ms: 1_000 })), Some(ErrorCode::IsDir));

    // Removing the file drops its lease record.
    leased(fs.op_with_id(a(8), lease(10_000)));
    fs.op(MetaOp::Unlink { parent: ROOT_INO, name: b"img".to_vec() }).unwrap();
    assert!(!fs.kv.map.keys().any(|k| k[0] == b'L'), "no lease left for a removed file");
}

/// Goal: an unlink or rename that drops the last link of a file its
/// caller has open keeps the file as an orphan (nlink 0, readable by
/// inode, no name); the holder's release removes it, and so does the
/// leader's reaping once the hold lapsed; others cannot release it.
#[test]
fn open_files_losing_their_last_name_are_kept_until_released() {
    let mut fs = Fs::new();
    fs.servers(3);
    let f = fs.file_with_chunks(ROOT_INO, "f", 2);
    let g = fs.file_with_chunks(ROOT_INO, "g", 1);
    let id = |client, seq| Some(RequestId { client, seq });
    let unlink = |name: &str| MetaOp::Unlink { parent: ROOT_INO, name: name.as_bytes().to_vec() };
    let keep = |open: Vec<Ino>, op| MetaOp::KeepOpen { open, ttl_ms: 5_000, op: Box::new(op) };

    // Not open at the caller: removed as usual.
    assert_eq!(fs.op_with_id(id(1, 1), keep(vec![f], unlink("g"))).unwrap(), OpReply::Orphans(vec![]));
    assert!(fs.read(MetaRead::GetAttr { ino: g }).is_err());
    // Open: kept, nameless, with its chunks.
    assert_eq!(fs.op_with_id(id(1, 2), keep(vec![f], unlink("f"))).unwrap(), OpReply::Orphans(vec![f]));
    assert!(fs.resolve("/f").is_err());
    match fs.read(MetaRead::GetAttr { ino: f }).unwrap() {
        ReadReply::Attr(a) => assert_eq!((a.nlink, a.size), (0, 2 * CB)),
        other => panic!("{other:?}"),
    }
    assert_eq!(fs.layout_of(f).chunks.len(), 2);
    // No new name for it; only an unlink or a rename may keep.
    let link = MetaOp::Link { ino: f, new_parent: ROOT_INO, new_name: b"back".to_vec() };
    assert_eq!(code(&fs.op(link)), Some(ErrorCode::NotFound));
    assert_eq!(code(&fs.op_with_id(id(1, 3), keep(vec![f], mkdir(ROOT_INO, "d")))), Some(ErrorCode::Invalid));
    // Another client's release does nothing; the holder's removes it.
    let release = |inos| MetaOp::HoldOrphans { inos, ttl_ms: 0 };
    assert_eq!(fs.op_with_id(id(2, 1), release(vec![f])).unwrap(), OpReply::Orphans(vec![]));
    assert!(fs.read(MetaRead::GetAttr { ino: f }).is_ok());
    fs.op_with_id(id(1, 4), release(vec![f])).unwrap();
    assert!(fs.read(MetaRead::GetAttr { ino: f }).is_err());
    assert!(!fs.kv.map.keys().any(|k| k[0] == b'O' || k[0] == b'F'), "hold and chunk entries gone");

    // A rename over an open file keeps it; an unrenewed hold is reaped.
    let a = fs.file_with_chunks(ROOT_INO, "a", 1);
    let b = fs.file_with_chunks(ROOT_INO, "b", 1);
    let rename = MetaOp::Rename {
        parent: ROOT_INO,
        name: b"a".to_vec(),
        new_parent: ROOT_INO,
        new_name: b"b".to_vec(),
        flags: 0,
    };
    assert_eq!(fs.op_with_id(id(1, 5), keep(vec![a, b], rename)).unwrap(), OpReply::Orphans(vec![b]));
    let renew = MetaOp::HoldOrphans { inos: vec![b], ttl_ms: 5_000 };
    assert_eq!(fs.op_with_id(id(1, 6), renew).unwrap(), OpReply::Orphans(vec![b]));
    assert_eq!(fs.system(vec![SystemOp::ReapOrphans]), vec![Ok(SystemReply::Done)]);
    assert!(fs.read(MetaRead::GetAttr { ino: b }).is_ok(), "held: not reaped");
    for _ in 0..6 {
        fs.op(MetaOp::SetAttr { ino: ROOT_INO, set: SetAttr::default() }).unwrap();
    }
    fs.system(vec![SystemOp::ReapOrphans]);
    assert!(fs.read(MetaRead::GetAttr { ino: b }).is_err(), "lapsed: reaped");
    assert!(!fs.kv.map.keys().any(|k| k[0] == b'O'));
}

#[test]
fn blocks_count_allocated_chunks_up_to_the_end() {
    let mut fs = Fs::new();
    fs.servers(3);
    let f = ino_of(fs.op(create(ROOT_INO, "f")));
    let blocks = |fs: &Fs| fs.resolve("/f").unwrap().blocks;
    assert_eq!(blocks(&fs), 0, "empty");
    layout(fs.prepare(f, 0, 10));
    fs.op(MetaOp::ExtendSize { ino: f, size: 10 }).unwrap();
    assert_eq!(blocks(&fs), 1, "10 bytes in one chunk");
    // A chunk far out: the hole between counts nothing, the last chunk
    // only up to the end. The reply says so too.
    layout(fs.prepare(f, 5 * CB, 10));
    let a = match fs.op(MetaOp::ExtendSize { ino: f, size: 5 * CB + 10 }).unwrap() {
        OpReply::Attr(a) => a,
        other => panic!("{other:?}"),
    };
    assert_eq!(a.blocks, CB / 512 + 1);
    assert_eq!(blocks(&fs), CB / 512 + 1);
    // Cut below the far chunk: it goes, the first counts whole.
    fs.op(MetaOp::SetAttr { ino: f, set: SetAttr { size: Some(3 * CB), ..Default::default() } }).unwrap();
    assert_eq!(blocks(&fs), CB / 512);
    // Extending makes holes only.
    fs.op(MetaOp::SetAttr { ino: f, set: SetAttr { size: Some(40 * CB), ..Default::default() } }).unwrap();
    assert_eq!(blocks(&fs), CB / 512);
    // A clone shares the chunks and counts them too; the source keeps its count.
    let c = cloned(fs.op(clone_op(f, ROOT_INO, "c", false)));
    assert_eq!(c.attr.blocks, CB / 512, "the reply");
    assert_eq!(fs.resolve("/c").unwrap().blocks, CB / 512);
    assert_eq!(blocks(&fs), CB / 512);
    // Written through: the count follows the chunk map.
    let g = fs.file_with_chunks(ROOT_INO, "g", 3);
    assert_eq!(fs.resolve("/g").unwrap().blocks, 3 * CB / 512);
    fs.op(MetaOp::SetAttr { ino: g, set: SetAttr { size: Some(0), ..Default::default() } }).unwrap();
    assert_eq!(fs.resolve("/g").unwrap().blocks, 0);
    // Directories and symlinks take none.
    assert_eq!(fs.resolve("/").unwrap().blocks, 0);
}

#[test]
fn allocated_blocks_edges() {
    use super::fsm::allocated_blocks;
    assert_eq!(allocated_blocks(0, 64, 0, false), 0);
    assert_eq!(allocated_blocks(1, 64, 1, true), 1);
    assert_eq!(allocated_blocks(64 << 20, 1 << 20, 64, true), (64 << 20) / 512);
    // The last chunk absent: the others count whole.
    assert_eq!(allocated_blocks((3 << 20) + 5, 1 << 20, 2, false), (2 << 20) / 512);
    // More chunks than the size covers (never kept so): capped by the size.
    assert_eq!(allocated_blocks(1000, 1 << 20, 5, false), 2);
    // No chunk size known: the size.
    assert_eq!(allocated_blocks(1025, 0, 0, false), 3);
}
