//! RocksDB storage for the Raft log, the vote and the state machine.
//!
//! One RocksDB instance with four column families shares one write-ahead log,
//! so one WAL sync makes everything written before it durable:
//! - `log`: entries by big-endian index;
//! - `raft`: vote, last purged log id, committed log id;
//! - `sm`: the domain's key space, written only through [`Txn`];
//! - `sm_meta`: last applied log id and membership, written in the same batch
//!   as the domain's writes so the two never disagree.
//!
//! Group commit: `append` writes entries without syncing and hands the flush
//! callback to one flusher thread, which syncs the WAL once for every callback
//! queued meanwhile. Under load, many appends share one fsync.

// openraft's trait methods return its `StorageError` (224 bytes); our helpers
// return the same type rather than box and unbox it at every call.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};

use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    AnyError, EntryPayload, ErrorSubject, ErrorVerb, LogState, OptionalSend, RaftLogReader, RaftSnapshotBuilder,
    StorageIOError,
};
use rocksdb::{ColumnFamilyDescriptor, Direction, IteratorMode, Options, ReadOptions, WriteBatch, WriteOptions, DB};
use tokio::sync::watch;

use crate::kv::{KvError, KvRead, Mutation, Txn};
use crate::snapshot::{self, SnapshotFile, SnapshotWriter};
use crate::types::{Entry, LogId, Reply, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig, Vote};
use crate::StateMachineLogic;

const CF_LOG: &str = "log";
const CF_RAFT: &str = "raft";
const CF_SM: &str = "sm";
const CF_SM_META: &str = "sm_meta";

const KEY_VOTE: &[u8] = b"vote";
const KEY_PURGED: &[u8] = b"last_purged";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_APPLIED: &[u8] = b"last_applied";
const KEY_MEMBERSHIP: &[u8] = b"membership";
/// Present while a snapshot install is under way; names the snapshot file so
/// an interrupted install is redone at the next open.
const KEY_INSTALLING: &[u8] = b"installing";

/// How many mutations go into one write batch while loading a snapshot.
const INSTALL_BATCH_RECORDS: usize = 10_000;
/// Block cache shared by the state machine's tables.
const BLOCK_CACHE_BYTES: usize = 64 << 20;
/// How many log entries one read returns at most (replication reads).
const MAX_LOG_READ_ENTRIES: u64 = 4096;

fn io_err(subject: ErrorSubject<u64>, verb: ErrorVerb, e: impl std::fmt::Display) -> StorageError {
    StorageError::IO { source: StorageIOError::new(subject, verb, AnyError::error(e.to_string())) }
}

fn read_err(e: impl std::fmt::Display) -> StorageError {
    io_err(ErrorSubject::Store, ErrorVerb::Read, e)
}

fn write_err(e: impl std::fmt::Display) -> StorageError {
    io_err(ErrorSubject::Store, ErrorVerb::Write, e)
}

fn sm_err(e: impl std::fmt::Display) -> StorageError {
    io_err(ErrorSubject::StateMachine, ErrorVerb::Write, e)
}

fn snap_err(e: impl std::fmt::Display) -> StorageError {
    io_err(ErrorSubject::Snapshot(None), ErrorVerb::Write, e)
}

/// Turns off RocksDB's per-thread perf counters for the calling thread.
/// They are on by default and cost a thread-local lookup on every key
/// comparison; call this at the start of every thread that uses the store.
pub fn disable_perf_counters_on_this_thread() {
    rocksdb::perf::set_perf_stats(rocksdb::perf::PerfStatsLevel::Disable);
}

/// Errors opening the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreOpenError {
    #[error("open rocksdb at {path}: {source}")]
    Db { path: PathBuf, source: rocksdb::Error },
    #[error("prepare directory {path}: {source}")]
    Dir { path: PathBuf, source: std::io::Error },
    #[error("resume interrupted snapshot install: {0}")]
    Resume(String),
}

/// Opens (creating if needed) the store in `dir` and returns the log store
/// and the state machine store that openraft drives.
pub fn open(dir: &Path, logic: Arc<dyn StateMachineLogic>) -> Result<(LogStore, StateMachineStore), StoreOpenError> {
    let db_path = dir.join("db");
    let snap_dir = dir.join("snapshots");
    for d in [dir, &snap_dir, &snap_dir.join("incoming")] {
        std::fs::create_dir_all(d).map_err(|source| StoreOpenError::Dir { path: d.to_path_buf(), source })?;
    }
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.increase_parallelism(2);
    opts.set_max_background_jobs(2);
    opts.set_max_total_wal_size(256 << 20);
    opts.set_keep_log_file_num(4);
    // The state machine is read by point lookups that often miss (a name
    // not taken yet, a request not seen yet): bloom filters answer those
    // without touching data blocks.
    let cache = rocksdb::Cache::new_lru_cache(BLOCK_CACHE_BYTES)
        .map_err(|source| StoreOpenError::Db { path: db_path.clone(), source })?;
    let mut table = rocksdb::BlockBasedOptions::default();
    table.set_bloom_filter(10.0, false);
    table.set_block_cache(&cache);
    table.set_cache_index_and_filter_blocks(true);
    let mut sm_opts = Options::default();
    sm_opts.set_block_based_table_factory(&table);
    sm_opts.set_memtable_whole_key_filtering(true);
    sm_opts.set_memtable_prefix_bloom_ratio(0.1);
    let cfs = [
        ColumnFamilyDescriptor::new(CF_LOG, Options::default()),
        ColumnFamilyDescriptor::new(CF_RAFT, Options::default()),
        ColumnFamilyDescriptor::new(CF_SM, sm_opts),
        ColumnFamilyDescriptor::new(CF_SM_META, Options::default()),
    ];
    let db = DB::open_cf_descriptors(&opts, &db_path, cfs)
        .map_err(|source| StoreOpenError::Db { path: db_path.clone(), source })?;
    let db = Arc::new(db);

    // Leftovers of transfers that never finished.
    if let Ok(rd) = std::fs::read_dir(snap_dir.join("incoming")) {
        for e in rd.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }

    let current = Arc::new(Mutex::new(latest_snapshot_file(&snap_dir)));
    let applied = last_applied(&db).map_err(|e| StoreOpenError::Resume(e.to_string()))?;
    let (applied_tx, _) = watch::channel(applied.map(|l| l.index).unwrap_or(0));
    let mut sm = StateMachineStore { db: db.clone(), logic, snap_dir, current, applied_tx: Arc::new(applied_tx) };
    if let Some(path) = sm.installing_marker().map_err(|e| StoreOpenError::Resume(e.to_string()))? {
        tracing::warn!(path = %path.display(), "redoing an interrupted snapshot install");
        sm.load_snapshot_file(&path).map_err(|e| StoreOpenError::Resume(e.to_string()))?;
    }

    let flusher = Flusher::start(db.clone());
    Ok((LogStore { db, flusher: Arc::new(flusher) }, sm))
}

fn cf<'a>(db: &'a DB, name: &str) -> &'a rocksdb::ColumnFamily {
    // The column families are created at open; a missing one is a bug.
    db.cf_handle(name).expect("column family created at open")
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, StorageError> {
    postcard::from_bytes(bytes).map_err(read_err)
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, StorageError> {
    postcard::to_allocvec(v).map_err(write_err)
}

fn last_applied(db: &DB) -> Result<Option<LogId>, StorageError> {
    match db.get_cf(cf(db, CF_SM_META), KEY_APPLIED).map_err(read_err)? {
        Some(b) => decode(&b),
        None => Ok(None),
    }
}

fn snapshot_files(snap_dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(snap_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".snap"))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    v.sort();
    v.into_iter().map(|(_, p)| p).collect()
}

fn latest_snapshot_file(snap_dir: &Path) -> Option<PathBuf> {
    snapshot_files(snap_dir).pop()
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

fn sync_write_opts() -> WriteOptions {
    let mut w = WriteOptions::default();
    w.set_sync(true);
    w
}

// ---------------------------------------------------------------------------
// Group commit

/// The thread that syncs the WAL for a batch of appends. It holds the
/// database: dropping the flusher stops it and waits, so the database is
/// never still open on a detached thread when the process exits (RocksDB's
/// static teardown then crashes).
struct Flusher {
    tx: Mutex<Option<mpsc::Sender<LogFlushed<TypeConfig>>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Flusher {
    fn start(db: Arc<DB>) -> Self {
        let (tx, rx) = mpsc::channel::<LogFlushed<TypeConfig>>();
        let thread = std::thread::Builder::new()
            .name("raft-wal-flush".into())
            .spawn(move || {
                disable_perf_counters_on_this_thread();
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    while let Ok(more) = rx.try_recv() {
                        batch.push(more);
                    }
                    let res = db.flush_wal(true);
                    for cb in batch {
                        let r = res.clone().map_err(|e| std::io::Error::other(e.to_string()));
                        cb.log_io_completed(r);
                    }
                }
            })
            .expect("spawn flusher thread");
        Flusher { tx: Mutex::new(Some(tx)), thread: Some(thread) }
    }

    fn submit(&self, cb: LogFlushed<TypeConfig>) -> Result<(), StorageError> {
        let tx = self.tx.lock().map_err(|_| write_err("flusher lock poisoned"))?;
        let tx = tx.as_ref().ok_or_else(|| write_err("flusher thread stopped"))?;
        tx.send(cb).map_err(|_| write_err("flusher thread stopped"))
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop; then wait for it.
        drop(self.tx.get_mut().unwrap_or_else(|p| p.into_inner()).take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------
// Log store

/// The Raft log and vote.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    flusher: Arc<Flusher>,
}

impl LogStore {
    fn get_meta<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StorageError> {
        match self.db.get_cf(cf(&self.db, CF_RAFT), key).map_err(read_err)? {
            Some(b) => Ok(Some(decode(&b)?)),
            None => Ok(None),
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(s) => *s,
            Bound::Excluded(s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(e) => Some(e.saturating_add(1)),
            Bound::Excluded(e) => Some(*e),
            Bound::Unbounded => None,
        };
        let mut out = Vec::new();
        let it =
            self.db.iterator_cf(cf(&self.db, CF_LOG), IteratorMode::From(&start.to_be_bytes(), Direction::Forward));
        for item in it {
            let (k, v) = item.map_err(read_err)?;
            let idx = u64::from_be_bytes(k.as_ref().try_into().map_err(read_err)?);
            if end.is_some_and(|e| idx >= e) {
                break;
            }
            out.push(decode::<Entry>(&v)?);
        }
        Ok(out)
    }

    async fn limited_get_log_entries(&mut self, start: u64, end: u64) -> Result<Vec<Entry>, StorageError> {
        let end = end.min(start.saturating_add(MAX_LOG_READ_ENTRIES));
        self.try_get_log_entries(start..end).await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged: Option<LogId> = self.get_meta(KEY_PURGED)?;
        let mut it = self.db.iterator_cf(cf(&self.db, CF_LOG), IteratorMode::End);
        let last = match it.next() {
            Some(item) => {
                let (_, v) = item.map_err(read_err)?;
                Some(decode::<Entry>(&v)?.log_id)
            }
            None => last_purged,
        };
        Ok(LogState { last_purged_log_id: last_purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.db
            .put_cf_opt(cf(&self.db, CF_RAFT), KEY_VOTE, encode(vote)?, &sync_write_opts())
            .map_err(|e| io_err(ErrorSubject::Vote, ErrorVerb::Write, e))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.get_meta(KEY_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not synced: it only lets a restarted node re-apply sooner; the
        // next WAL sync makes it durable with everything else.
        self.db.put_cf(cf(&self.db, CF_RAFT), KEY_COMMITTED, encode(&committed)?).map_err(write_err)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.get_meta::<Option<LogId>>(KEY_COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = WriteBatch::default();
        let log_cf = cf(&self.db, CF_LOG);
        for e in entries {
            batch.put_cf(log_cf, e.log_id.index.to_be_bytes(), encode(&e)?);
        }
        self.db.write_opt(batch, &WriteOptions::default()).map_err(write_err)?;
        self.flusher.submit(callback)
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let log_cf = cf(&self.db, CF_LOG);
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(log_cf, log_id.index.to_be_bytes(), u64::MAX.to_be_bytes());
        batch.delete_cf(log_cf, u64::MAX.to_be_bytes());
        self.db.write_opt(batch, &WriteOptions::default()).map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        batch.put_cf(cf(&self.db, CF_RAFT), KEY_PURGED, encode(&log_id)?);
        batch.delete_range_cf(cf(&self.db, CF_LOG), 0u64.to_be_bytes(), (log_id.index + 1).to_be_bytes());
        self.db.write_opt(batch, &WriteOptions::default()).map_err(write_err)
    }
}

// ---------------------------------------------------------------------------
// State machine

/// Reads of the state machine's key space straight from the database.
pub struct DbView<'a> {
    db: &'a DB,
    snapshot: Option<&'a rocksdb::Snapshot<'a>>,
}

impl DbView<'_> {
    fn read_opts(&self) -> ReadOptions {
        let mut ro = ReadOptions::default();
        if let Some(s) = self.snapshot {
            ro.set_snapshot(s);
        }
        ro
    }
}

impl KvRead for DbView<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        self.db.get_cf_opt(cf(self.db, CF_SM), key, &self.read_opts()).map_err(|e| KvError(e.to_string()))
    }

    fn scan(&self, start: &[u8], end: &[u8], visit: &mut dyn FnMut(&[u8], &[u8]) -> bool) -> Result<(), KvError> {
        if start >= end {
            return Ok(());
        }
        let mut ro = self.read_opts();
        ro.set_iterate_upper_bound(end.to_vec());
        let mut it = self.db.raw_iterator_cf_opt(cf(self.db, CF_SM), ro);
        it.seek(start);
        while it.valid() {
            let (Some(k), Some(v)) = (it.key(), it.value()) else {
                break;
            };
            if !visit(k, v) {
                return Ok(());
            }
            it.next();
        }
        it.status().map_err(|e| KvError(e.to_string()))
    }
}

/// A cheap handle for queries against the applied state.
#[derive(Clone)]
pub struct KvReader {
    db: Arc<DB>,
}

impl KvReader {
    /// Runs `f` against one consistent point-in-time view.
    pub fn with_snapshot<R>(&self, f: impl FnOnce(&dyn KvRead) -> R) -> R {
        let snap = self.db.snapshot();
        let view = DbView { db: &self.db, snapshot: Some(&snap) };
        f(&view)
    }

    /// Runs `f` against the latest state (each read sees whole batches).
    pub fn with_latest<R>(&self, f: impl FnOnce(&dyn KvRead) -> R) -> R {
        let view = DbView { db: &self.db, snapshot: None };
        f(&view)
    }

    /// The last applied log index.
    pub fn applied_index(&self) -> Result<u64, KvError> {
        last_applied(&self.db).map(|l| l.map(|l| l.index).unwrap_or(0)).map_err(|e| KvError(e.to_string()))
    }
}

/// The domain's state machine, persisted in RocksDB.
pub struct StateMachineStore {
    db: Arc<DB>,
    logic: Arc<dyn StateMachineLogic>,
    snap_dir: PathBuf,
    current: Arc<Mutex<Option<PathBuf>>>,
    applied_tx: Arc<watch::Sender<u64>>,
}

impl StateMachineStore {
    pub fn reader(&self) -> KvReader {
        KvReader { db: self.db.clone() }
    }

    /// Follows the last applied index.
    pub fn applied_watch(&self) -> watch::Receiver<u64> {
        self.applied_tx.subscribe()
    }

    fn installing_marker(&self) -> Result<Option<PathBuf>, StorageError> {
        Ok(self
            .db
            .get_cf(cf(&self.db, CF_SM_META), KEY_INSTALLING)
            .map_err(read_err)?
            .map(|b| PathBuf::from(String::from_utf8_lossy(&b).into_owned())))
    }

    fn membership(&self) -> Result<StoredMembership, StorageError> {
        match self.db.get_cf(cf(&self.db, CF_SM_META), KEY_MEMBERSHIP).map_err(read_err)? {
            Some(b) => decode(&b),
            None => Ok(StoredMembership::default()),
        }
    }

    /// Replaces the whole state machine with the records of a snapshot file
    /// (already verified and in its final place). Blocking.
    fn load_snapshot_file(&mut self, path: &Path) -> Result<SnapshotMeta, StorageError> {
        let file = SnapshotFile::open(path).map_err(snap_err)?;
        let (meta, mut records) = snapshot::open_records(&file).map_err(snap_err)?;
        let db = &self.db;
        let meta_cf = cf(db, CF_SM_META);
        let sm_cf = cf(db, CF_SM);
        db.put_cf_opt(meta_cf, KEY_INSTALLING, path.to_string_lossy().as_bytes(), &sync_write_opts())
            .map_err(sm_err)?;
        // Clear the key space: everything from the empty key to past the
        // greatest key present.
        let last_key = db.iterator_cf(sm_cf, IteratorMode::End).next().transpose().map_err(sm_err)?;
        if let Some((k, _)) = last_key {
            let mut end = k.to_vec();
            end.push(0);
            let mut b = WriteBatch::default();
            b.delete_range_cf(sm_cf, Vec::<u8>::new(), end);
            db.write_opt(b, &WriteOptions::default()).map_err(sm_err)?;
        }
        let mut batch = WriteBatch::default();
        let mut n = 0usize;
        while let Some((k, v)) = records.next_record().map_err(snap_err)? {
            batch.put_cf(sm_cf, k, v);
            n += 1;
            if n.is_multiple_of(INSTALL_BATCH_RECORDS) {
                db.write_opt(std::mem::take(&mut batch), &WriteOptions::default()).map_err(sm_err)?;
            }
        }
        batch.put_cf(meta_cf, KEY_APPLIED, encode(&meta.last_log_id)?);
        batch.put_cf(meta_cf, KEY_MEMBERSHIP, encode(&meta.last_membership)?);
        batch.delete_cf(meta_cf, KEY_INSTALLING);
        db.write_opt(batch, &sync_write_opts()).map_err(sm_err)?;
        self.applied_tx.send_replace(meta.last_log_id.map(|l| l.index).unwrap_or(0));
        tracing::info!(records = n, last_log_id = ?meta.last_log_id, "installed snapshot");
        Ok(meta)
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        Ok((last_applied(&self.db)?, self.membership()?))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Reply>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let db = self.db.clone();
        let base = DbView { db: &db, snapshot: None };
        let mut txn = Txn::new(&base);
        let mut replies = Vec::new();
        let mut last: Option<LogId> = None;
        let mut membership: Option<StoredMembership> = None;
        for e in entries {
            last = Some(e.log_id);
            match e.payload {
                EntryPayload::Blank => replies.push(Reply::default()),
                EntryPayload::Normal(cmd) => {
                    let r = self
                        .logic
                        .apply(&mut txn, e.log_id.index, &cmd.0)
                        .map_err(|err| io_err(ErrorSubject::Apply(e.log_id), ErrorVerb::Write, err))?;
                    replies.push(Reply(r));
                }
                EntryPayload::Membership(m) => {
                    membership = Some(StoredMembership::new(Some(e.log_id), m));
                    replies.push(Reply::default());
                }
            }
        }
        let Some(last) = last else { return Ok(replies) };
        let mut batch = WriteBatch::default();
        let sm_cf = cf(&db, CF_SM);
        for m in txn.into_mutations() {
            match m {
                Mutation::Put(k, v) => batch.put_cf(sm_cf, k, v),
                Mutation::Delete(k) => batch.delete_cf(sm_cf, k),
                Mutation::DeleteRange(s, e) => batch.delete_range_cf(sm_cf, s, e),
            }
        }
        let meta_cf = cf(&db, CF_SM_META);
        batch.put_cf(meta_cf, KEY_APPLIED, encode(&Some(last))?);
        if let Some(m) = membership {
            batch.put_cf(meta_cf, KEY_MEMBERSHIP, encode(&m)?);
        }
        // Not synced: the log holds every applied entry until a snapshot,
        // and building a snapshot syncs first.
        db.write_opt(batch, &WriteOptions::default()).map_err(sm_err)?;
        self.applied_tx.send_replace(last.index);
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder { db: self.db.clone(), snap_dir: self.snap_dir.clone(), current: self.current.clone() }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotFile>, StorageError> {
        let path = incoming_path(&self.snap_dir);
        let file = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&path).map_err(snap_err)?;
        Ok(Box::new(SnapshotFile { path, file }))
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: Box<SnapshotFile>) -> Result<(), StorageError> {
        let got = snapshot::verify(&snapshot).map_err(snap_err)?;
        if &got != meta {
            return Err(snap_err(format!(
                "snapshot file describes {:?}, expected {:?}",
                got.last_log_id, meta.last_log_id
            )));
        }
        let final_path = self.snap_dir.join(format!("{}.snap", sanitize(&meta.snapshot_id)));
        if snapshot.path != final_path {
            std::fs::rename(&snapshot.path, &final_path).map_err(snap_err)?;
            sync_dir(&self.snap_dir).map_err(snap_err)?;
        }
        self.load_snapshot_file(&final_path)?;
        set_current(&self.current, &self.snap_dir, final_path);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let path = self.current.lock().map_err(|_| read_err("snapshot lock poisoned"))?.clone();
        let Some(path) = path else { return Ok(None) };
        let file = SnapshotFile::open(&path).map_err(snap_err)?;
        let (meta, _) = snapshot::open_records(&file).map_err(snap_err)?;
        Ok(Some(Snapshot { meta, snapshot: Box::new(file) }))
    }
}

fn sanitize(id: &str) -> String {
    id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect()
}

fn incoming_path(snap_dir: &Path) -> PathBuf {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    snap_dir.join("incoming").join(format!("{nanos}-{}.part", rand_suffix()))
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id() as u64);
    h.finish()
}

/// Makes `path` the current snapshot and deletes the older ones.
fn set_current(current: &Mutex<Option<PathBuf>>, snap_dir: &Path, path: PathBuf) {
    if let Ok(mut c) = current.lock() {
        *c = Some(path.clone());
    }
    for old in snapshot_files(snap_dir) {
        if old != path {
            let _ = std::fs::remove_file(old);
        }
    }
}

/// Builds snapshot files from a point-in-time view of the state machine.
pub struct SnapshotBuilder {
    db: Arc<DB>,
    snap_dir: PathBuf,
    current: Arc<Mutex<Option<PathBuf>>>,
}

impl SnapshotBuilder {
    fn build_blocking(&self) -> Result<Snapshot, StorageError> {
        let db = &self.db;
        // The log may be purged up to this snapshot once it exists, so the
        // state machine it describes must be durable first.
        db.flush_wal(true).map_err(snap_err)?;
        let snap = db.snapshot();
        let mut ro = ReadOptions::default();
        ro.set_snapshot(&snap);
        let meta_cf = cf(db, CF_SM_META);
        let last_log_id: Option<LogId> = match db.get_cf_opt(meta_cf, KEY_APPLIED, &ro).map_err(read_err)? {
            Some(b) => decode(&b)?,
            None => None,
        };
        let mut ro2 = ReadOptions::default();
        ro2.set_snapshot(&snap);
        let last_membership: StoredMembership = match db.get_cf_opt(meta_cf, KEY_MEMBERSHIP, &ro2).map_err(read_err)? {
            Some(b) => decode(&b)?,
            None => StoredMembership::default(),
        };
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let snapshot_id = match last_log_id {
            Some(l) => format!("{}-{}-{}-{nanos}", l.leader_id.term, l.leader_id.node_id, l.index),
            None => format!("0-0-0-{nanos}"),
        };
        let meta = SnapshotMeta { last_log_id, last_membership, snapshot_id: snapshot_id.clone() };
        let tmp = incoming_path(&self.snap_dir);
        let mut w = SnapshotWriter::create(&tmp, &meta).map_err(snap_err)?;
        let mut ro3 = ReadOptions::default();
        ro3.set_snapshot(&snap);
        let mut it = db.raw_iterator_cf_opt(cf(db, CF_SM), ro3);
        it.seek_to_first();
        while it.valid() {
            if let (Some(k), Some(v)) = (it.key(), it.value()) {
                w.record(k, v).map_err(snap_err)?;
            }
            it.next();
        }
        it.status().map_err(read_err)?;
        let (_, records) = w.finish().map_err(snap_err)?;
        let final_path = self.snap_dir.join(format!("{}.snap", sanitize(&snapshot_id)));
        std::fs::rename(&tmp, &final_path).map_err(snap_err)?;
        sync_dir(&self.snap_dir).map_err(snap_err)?;
        set_current(&self.current, &self.snap_dir, final_path.clone());
        tracing::info!(records, last_log_id = ?meta.last_log_id, "built snapshot");
        let file = SnapshotFile::open(&final_path).map_err(snap_err)?;
        Ok(Snapshot { meta, snapshot: Box::new(file) })
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let me =
            SnapshotBuilder { db: self.db.clone(), snap_dir: self.snap_dir.clone(), current: self.current.clone() };
        tokio::task::spawn_blocking(move || me.build_blocking())
            .await
            .map_err(|e| snap_err(format!("snapshot task: {e}")))?
    }
}
