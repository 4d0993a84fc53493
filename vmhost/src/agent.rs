//! The host agent (`locus-vmhost run`): registers the host, holds its lease,
//! and runs the VMs the leader assigns to it.
//!
//! Tasks, all in one process:
//! - **heartbeat**: every `heartbeat` (and at once when woken), sends what
//!   runs and gets back the lease and the assignments. The lease counts from
//!   the send; it is written to the lease file for the fence guard.
//! - **watchdog**: kills every VM the moment the lease runs out (the guard
//!   does too, also when this process is dead).
//! - **reconcile**: applies [`crate::plan::plan`] to the assignments and the
//!   drivers' view; starts (preparing the image cache, the VM's writable
//!   layer in Locus and its customization first), stops and removes VMs;
//!   copies console logs into Locus.
//! - **watch**: follows the change stream and wakes the heartbeat when a VM
//!   changes, so a new assignment starts within milliseconds.
//!
//! What this host remembers of its VMs (the epoch each runs at, how each
//! ended) is in `STATE_DIR/vms/`, so a restarted agent picks up where the
//! last one left off without disturbing running VMs.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use fs_client::chunk::ChunkClient;
use fs_client::file::FileClient;
use fs_client::proto::*;
use fs_client::vm::*;
use fs_client::{ClientConfig, MetaClient};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify, Semaphore};

use crate::cache::ImageCache;
use crate::daemon::spawn_detached;
use crate::driver::{Disk, DiskSource, Driver, ExitCode, VmKind, VmSpec, VmState};
use crate::guard::{Fenced, HostDirs};
use crate::lease::{boottime_ns, Lease};
use crate::mount::HostMount;
use crate::plan::{plan, Action, Local};
use crate::{ProcessDriver, QemuDriver};

/// VMs prepared and started at once, at most.
const MAX_PARALLEL_STARTS: usize = 16;
/// How long a VM gets to stop by itself before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// The share of the lease the host uses: it stops its VMs this much earlier
/// than the leader could declare it failed, whatever the clocks' drift.
const LEASE_USE_PERMILLE: u64 = 900;
/// Console bytes copied into Locus per VM and pass, at most.
const LOG_SYNC_BYTES: u64 = 4 << 20;
/// Largest metrics file read.
const MAX_METRICS_BYTES: u64 = 64 * 1024;

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Client configuration with a `host` certificate.
    pub client_config: PathBuf,
    pub state_dir: PathBuf,
    pub name: String,
    pub topology: Topology,
    pub vcpus: u32,
    pub mem_mb: u64,
    /// The `locus` binary (for the mount).
    pub locus_bin: PathBuf,
    /// This binary (for the guard).
    pub self_bin: PathBuf,
    pub heartbeat: Duration,
}

/// What the leader last said this host must run.
#[derive(Debug, Clone, PartialEq)]
struct Desired {
    assignments: Vec<Assignment>,
    services: BTreeMap<String, ServiceInfo>,
    vm_root: String,
    prefetch: Vec<(String, String)>,
}

/// What this host remembers of one VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Record {
    driver: DriverKind,
    epoch: u64,
    ended: Option<(u64, ReportedState)>,
    /// Where its logs go in Locus.
    vm_dir: String,
    /// The newest checkpoint written here.
    #[serde(default)]
    checkpoint: Option<CheckpointRecord>,
}

struct Agent {
    cfg: AgentConfig,
    dirs: HostDirs,
    meta: MetaClient,
    files: FileClient,
    process: ProcessDriver,
    qemu: QemuDriver,
    cache: ImageCache,
    mount: HostMount,
    host_id: AtomicU64,
    /// `CLOCK_BOOTTIME` ns until which VMs may run (0: no lease yet).
    lease_until: AtomicU64,
    /// The lease value the last fencing acted on.
    fenced_at: AtomicU64,
    registered: AtomicBool,
    desired: watch::Sender<Option<Desired>>,
    reports: Mutex<Vec<VmReport>>,
    busy: Mutex<BTreeSet<String>>,
    records: Mutex<BTreeMap<String, Record>>,
    /// Each log's file in Locus and the bytes already copied into it.
    log_offsets: Mutex<HashMap<PathBuf, (Ino, u64)>>,
    wake_heartbeat: Notify,
    wake_reconcile: Notify,
    starts: Semaphore,
    /// Clones of one image share its chunks' versions: one at a time here,
    /// so their version fences do not race each other.
    clones: tokio::sync::Mutex<()>,
}

fn host_file(dir: &Path) -> PathBuf {
    dir.join("host.json")
}

fn records_dir(dir: &Path) -> PathBuf {
    dir.join("vms")
}

fn metrics_file(dir: &Path, vm: &str) -> PathBuf {
    dir.join("metrics").join(vm)
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    let client_cfg = ClientConfig::load(&cfg.client_config).context("load the client configuration")?;
    let meta = MetaClient::new(&client_cfg).context("set up the metadata client")?;
    let chunks = ChunkClient::for_config(&client_cfg).context("set up the chunk client")?;
    let files = FileClient::new(meta.clone(), chunks, Some(cfg.topology.clone()));
    for d in ["run", "cache", "vms", "metrics", "logs"] {
        std::fs::create_dir_all(cfg.state_dir.join(d))
            .with_context(|| format!("create {}", cfg.state_dir.join(d).display()))?;
    }
    let dirs = HostDirs::new(&cfg.state_dir);
    let records = load_records(&cfg.state_dir);
    let host_id: Option<HostId> = std::fs::read(host_file(&cfg.state_dir))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v.get("id")?.as_u64());
    let agent = Arc::new(Agent {
        dirs: dirs.clone(),
        process: ProcessDriver::new(dirs.process_runs()),
        qemu: QemuDriver::new(dirs.qemu_runs()),
        cache: ImageCache::new(cfg.state_dir.join("cache"), files.clone()),
        mount: HostMount::new(&cfg.state_dir, cfg.locus_bin.clone(), cfg.client_config.clone()),
        meta,
        files,
        host_id: AtomicU64::new(host_id.unwrap_or(0)),
        lease_until: AtomicU64::new(0),
        fenced_at: AtomicU64::new(0),
        registered: AtomicBool::new(false),
        desired: watch::channel(None).0,
        reports: Mutex::new(Vec::new()),
        busy: Mutex::new(BTreeSet::new()),
        records: Mutex::new(records),
        log_offsets: Mutex::new(HashMap::new()),
        wake_heartbeat: Notify::new(),
        wake_reconcile: Notify::new(),
        starts: Semaphore::new(MAX_PARALLEL_STARTS),
        clones: tokio::sync::Mutex::new(()),
        cfg,
    });
    // A lease left by an agent that died keeps counting: the VMs it covers
    // run on only if this agent renews it in time.
    if let Some(l) = dirs.lease().read() {
        agent.lease_until.store(l.until_ns, Ordering::SeqCst);
    } else {
        dirs.lease().write(Lease { until_ns: 0, agent_pid: std::process::id() }).context("write the lease file")?;
    }
    agent.ensure_guard().context("start the fence guard")?;
    tracing::info!(name = %agent.cfg.name, state = %agent.cfg.state_dir.display(), "host agent starting");

    let tasks = [
        tokio::spawn(agent.clone().heartbeat_loop()),
        tokio::spawn(agent.clone().watchdog_loop()),
        tokio::spawn(agent.clone().reconcile_loop()),
        tokio::spawn(agent.clone().watch_loop()),
    ];
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("stopping: VMs stop, the mount flushes, the lease is given up");
    for t in &tasks {
        t.abort();
    }
    agent.shutdown().await;
    Ok(())
}

fn load_records(dir: &Path) -> BTreeMap<String, Record> {
    let mut out = BTreeMap::new();
    let Ok(rd) = std::fs::read_dir(records_dir(dir)) else { return out };
    for e in rd.flatten() {
        let Some(id) = e.file_name().to_str().and_then(|n| n.strip_suffix(".json")).map(str::to_string) else {
            continue;
        };
        if let Some(r) = std::fs::read(e.path()).ok().and_then(|b| serde_json::from_slice::<Record>(&b).ok()) {
            out.insert(id, r);
        }
    }
    out
}

fn state_of_end(s: &VmState) -> Option<ReportedState> {
    match s {
        VmState::Running | VmState::Paused => None,
        VmState::Stopped { exit_code: ExitCode::Code(0) } => {
            Some(ReportedState::Stopped { reason: "exited with code 0".into() })
        }
        VmState::Stopped { exit_code: ExitCode::Unknown } => Some(ReportedState::Stopped { reason: s.to_string() }),
        VmState::Stopped { exit_code } => Some(ReportedState::Failed { reason: exit_code.to_string() }),
        VmState::Failed(r) => Some(ReportedState::Failed { reason: r.clone() }),
    }
}

/// Replaces `{key}` placeholders.
fn substitute(template: &str, vars: &BTreeMap<&str, String>) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        match rest[open..].find('}') {
            Some(close) => {
                let key = &rest[open + 1..open + close];
                match vars.get(key) {
                    Some(v) => out.push_str(v),
                    None => out.push_str(&rest[open..open + close + 1]),
                }
                rest = &rest[open + close + 1..];
            }
            None => {
                out.push_str(&rest[open..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

fn read_metrics(path: &Path) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let Ok(f) = std::fs::File::open(path) else { return out };
    use std::io::Read;
    let mut text = String::new();
    if f.take(MAX_METRICS_BYTES).read_to_string(&mut text).is_err() {
        return out;
    }
    for line in text.lines() {
        let mut it = line.split_whitespace();
        if let (Some(k), Some(v), None) = (it.next(), it.next(), it.next()) {
            if let Ok(x) = v.parse::<f64>() {
                if x.is_finite() && k.len() <= 64 {
                    out.insert(k.to_string(), x);
                }
            }
        }
    }
    out
}

impl Agent {
    fn id(&self) -> HostId {
        self.host_id.load(Ordering::SeqCst)
    }

    fn lease_valid(&self) -> bool {
        let until = self.lease_until.load(Ordering::SeqCst);
        until != 0 && boottime_ns() < until
    }

    fn ensure_guard(&self) -> std::io::Result<()> {
        if self.dirs.guard_pid().alive().is_some() {
            return Ok(());
        }
        let mut cmd = std::process::Command::new(&self.cfg.self_bin);
        cmd.arg("guard").arg("--state-dir").arg(&self.cfg.state_dir);
        if std::env::var_os("LOCUS_LOG").is_none() {
            cmd.env("LOCUS_LOG", "info");
        }
        spawn_detached(cmd, &self.cfg.state_dir.join("logs").join("guard.log"), &self.dirs.guard_pid())?;
        Ok(())
    }

    async fn register(&self) -> Result<(), fs_client::ClientError> {
        let id = self.id();
        let msg = HostMsg::Register {
            id: (id != 0).then_some(id),
            name: self.cfg.name.clone(),
            topology: self.cfg.topology.clone(),
            vcpus: self.cfg.vcpus,
            mem_mb: self.cfg.mem_mb,
        };
        match self.meta.host(msg, Duration::from_secs(5)).await? {
            HostReply::Registered { id, .. } => {
                self.host_id.store(id, Ordering::SeqCst);
                let _ = std::fs::write(host_file(&self.cfg.state_dir), serde_json::json!({ "id": id }).to_string());
                self.registered.store(true, Ordering::SeqCst);
                tracing::info!(host = id, "registered");
                Ok(())
            }
            other => Err(fs_client::ClientError::Protocol(format!("unexpected reply {other:?}"))),
        }
    }

    async fn heartbeat_loop(self: Arc<Self>) {
        let mut last_error: Option<Instant> = None;
        loop {
            if !self.registered.load(Ordering::SeqCst) {
                if let Err(e) = self.register().await {
                    if last_error.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                        tracing::warn!(error = %e, "cannot register yet");
                        last_error = Some(Instant::now());
                    }
                    tokio::time::sleep(self.cfg.heartbeat).await;
                    continue;
                }
            }
            let vms = self.reports.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let msg = HostMsg::Heartbeat { id: self.id(), vms, cached_images: self.cache.cached() };
            let sent = boottime_ns();
            // The lease counts from the send, so a slow answer still renews
            // it: wait up to a second (or two heartbeats) for one.
            let within = (self.cfg.heartbeat * 2).max(Duration::from_secs(1));
            match self.meta.host(msg, within).await {
                Ok(HostReply::Lease { lease_ms, assignments, services, prefetch, vm_root }) => {
                    let until = sent + lease_ms * 1_000_000 * LEASE_USE_PERMILLE / 1000;
                    if let Err(e) = self.dirs.lease().write(Lease { until_ns: until, agent_pid: std::process::id() }) {
                        // Without the file the guard would fence us: do not run VMs on it.
                        tracing::error!(error = %e, "cannot write the lease file");
                    } else {
                        self.lease_until.store(until, Ordering::SeqCst);
                    }
                    let services = services.into_iter().map(|s| (s.def.name.clone(), s)).collect();
                    let d = Desired { assignments, services, vm_root, prefetch };
                    self.desired.send_if_modified(|cur| {
                        if cur.as_ref() == Some(&d) {
                            return false;
                        }
                        *cur = Some(d);
                        true
                    });
                    last_error = None;
                }
                Ok(HostReply::LeaseLost) => {
                    tracing::warn!("the leader declared this host failed: fencing, then registering again");
                    self.fence("lease lost").await;
                    self.registered.store(false, Ordering::SeqCst);
                    continue;
                }
                Ok(other) => tracing::warn!(reply = ?other, "unexpected heartbeat reply"),
                Err(e) => {
                    if e.code() == ErrorCode::NotFound {
                        // The cluster forgot us (a new cluster on old state).
                        self.registered.store(false, Ordering::SeqCst);
                        self.host_id.store(0, Ordering::SeqCst);
                    }
                    if last_error.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                        tracing::warn!(error = %e, "heartbeat failed");
                        last_error = Some(Instant::now());
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.cfg.heartbeat) => {}
                _ = self.wake_heartbeat.notified() => {}
            }
        }
    }

    async fn watchdog_loop(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_millis(25)).await;
            let until = self.lease_until.load(Ordering::SeqCst);
            if until != 0 && boottime_ns() >= until && self.fenced_at.load(Ordering::SeqCst) != until {
                self.fence("lease ran out").await;
            }
        }
    }

    /// Kills every VM and the mount now (idempotent per lease).
    async fn fence(&self, why: &str) {
        let until = self.lease_until.load(Ordering::SeqCst);
        self.fenced_at.store(until, Ordering::SeqCst);
        let vms = crate::guard::fence_now(&self.dirs).await;
        if !vms.is_empty() {
            tracing::warn!(vms = ?vms, why, "fenced: VMs killed");
            Fenced::add(&self.dirs.fenced_file(), until, vms);
        }
        self.wake_reconcile.notify_one();
    }

    async fn watch_loop(self: Arc<Self>) {
        loop {
            let from = match self.meta.admin(AdminOp::Status).await {
                Ok(AdminReply::Status(s)) => s.applied_index + 1,
                _ => {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let mut stream = match self.meta.subscribe(from).await {
                Ok(s) => s,
                Err(_) => {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            while let Ok(Some(item)) = stream.next().await {
                if let StreamItem::Changes { changes, .. } = item {
                    if changes.iter().any(|c| matches!(c, Change::Vm { .. })) {
                        self.wake_heartbeat.notify_one();
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// What the drivers and the records say of every VM here.
    async fn local_view(&self) -> BTreeMap<String, Local> {
        let mut out: BTreeMap<String, Local> = BTreeMap::new();
        let fenced = Fenced::load(&self.dirs.fenced_file());
        let mut listed = Vec::new();
        if let Ok(l) = self.process.list().await {
            listed.extend(l);
        }
        if let Ok(l) = self.qemu.list().await {
            listed.extend(l);
        }
        let records = self.records.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for info in listed {
            let entry = out.entry(info.id.clone()).or_default();
            match &info.state {
                Ok(s) => {
                    entry.live = s.is_live();
                    entry.paused = *s == VmState::Paused;
                    entry.driver_end = state_of_end(s);
                }
                // Unreadable now (e.g. QMP slow): count it as live, look again later.
                Err(_) => entry.live = true,
            }
        }
        for (id, r) in &records {
            let entry = out.entry(id.clone()).or_default();
            entry.epoch = Some(r.epoch);
            entry.ended = r.ended.clone();
        }
        for id in &fenced.vms {
            if let Some(e) = out.get_mut(id) {
                e.fenced = true;
            }
        }
        out
    }

    fn save_record(&self, vm: &str, rec: Option<Record>) {
        let path = records_dir(&self.cfg.state_dir).join(format!("{vm}.json"));
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        match rec {
            Some(r) => {
                if let Ok(b) = serde_json::to_vec(&r) {
                    if let Err(e) = crate::daemon::write_atomic(&path, &b) {
                        tracing::warn!(vm, error = %e, "cannot save the VM record");
                    }
                }
                records.insert(vm.to_string(), r);
            }
            None => {
                let _ = std::fs::remove_file(&path);
                records.remove(vm);
            }
        }
    }

    fn clear_fenced(&self, vm: &str) {
        let path = self.dirs.fenced_file();
        let mut f = Fenced::load(&path);
        if f.vms.iter().any(|v| v == vm) {
            f.vms.retain(|v| v != vm);
            f.save(&path);
        }
    }

    async fn reconcile_loop(self: Arc<Self>) {
        let mut rx = self.desired.subscribe();
        loop {
            tokio::select! {
                _ = rx.changed() => {}
                _ = self.wake_reconcile.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            let Some(desired) = rx.borrow_and_update().clone() else { continue };
            if !self.lease_valid() {
                // No lease, no VMs: the watchdog fenced them; wait for one.
                continue;
            }
            self.reconcile_once(&desired).await;
        }
    }

    async fn reconcile_once(self: &Arc<Self>, desired: &Desired) {
        for (hash, path) in &desired.prefetch {
            if !self.cache.path(hash).exists() {
                let (me, hash, path) = (self.clone(), hash.clone(), path.clone());
                tokio::spawn(async move {
                    if let Err(e) = me.cache.ensure(&hash, &path).await {
                        tracing::warn!(error = %e, "prefetch failed");
                    }
                });
            }
        }
        let local = self.local_view().await;
        let busy = self.busy.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let (actions, report) = plan(&desired.assignments, &local, &busy);
        let records = self.records.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let reports: Vec<VmReport> = report
            .into_iter()
            .map(|(id, epoch, state)| {
                let metrics = if state == ReportedState::Running {
                    read_metrics(&metrics_file(&self.cfg.state_dir, &id))
                } else {
                    BTreeMap::new()
                };
                let checkpoint = records.get(&id).and_then(|r| r.checkpoint.clone()).filter(|c| c.epoch == epoch);
                VmReport { id, epoch, state, metrics, checkpoint }
            })
            .collect();
        // Checkpoints asked for, of running qemu VMs nobody is working on.
        for a in &desired.assignments {
            let Some(r) = records.get(&a.vm) else { continue };
            let done = r.checkpoint.as_ref().map_or(0, |c| c.n);
            let live = local.get(&a.vm).is_some_and(|l| l.live);
            if r.driver == DriverKind::Qemu && a.checkpoint > done && live && !busy.contains(&a.vm) {
                self.set_busy(&a.vm, true);
                let (me, a, r) = (self.clone(), a.clone(), r.clone());
                tokio::spawn(async move {
                    match me.checkpoint_vm(&a, &r).await {
                        Ok(c) => {
                            let mut r = r;
                            r.checkpoint = Some(c);
                            me.save_record(&a.vm, Some(r));
                        }
                        Err(e) => tracing::warn!(vm = %a.vm, error = %format!("{e:#}"), "checkpoint failed"),
                    }
                    me.set_busy(&a.vm, false);
                    me.wake_reconcile.notify_one();
                });
            }
        }
        let changed = {
            let mut cur = self.reports.lock().unwrap_or_else(|p| p.into_inner());
            let changed = cur.len() != reports.len()
                || cur.iter().zip(&reports).any(|(a, b)| a.id != b.id || a.epoch != b.epoch || a.state != b.state);
            *cur = reports;
            changed
        };
        if changed {
            self.wake_heartbeat.notify_one();
        }
        for action in actions {
            self.act(action, desired).await;
        }
        self.sync_logs().await;
    }

    fn set_busy(&self, vm: &str, on: bool) {
        let mut b = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if on {
            b.insert(vm.to_string());
        } else {
            b.remove(vm);
        }
    }

    async fn act(self: &Arc<Self>, action: Action, desired: &Desired) {
        match action {
            Action::Adopt { vm, epoch } => {
                let rec = self.records.lock().unwrap_or_else(|p| p.into_inner()).get(&vm).cloned();
                if let Some(mut r) = rec {
                    r.epoch = epoch;
                    r.ended = None;
                    self.save_record(&vm, Some(r));
                } else if let Some(a) = desired.assignments.iter().find(|a| a.vm == vm) {
                    let driver = desired.services.get(&a.service).map(|s| s.def.driver).unwrap_or(DriverKind::Process);
                    let vm_dir = vm_dir(&desired.vm_root, &a.service, &a.vm);
                    self.save_record(&vm, Some(Record { driver, epoch, ended: None, vm_dir, checkpoint: None }));
                }
            }
            Action::RecordEnd { vm, epoch, state } => {
                let rec = self.records.lock().unwrap_or_else(|p| p.into_inner()).get(&vm).cloned();
                if let Some(mut r) = rec {
                    tracing::info!(vm = %vm, epoch, state = ?state, "VM ended by itself");
                    r.ended = Some((epoch, state));
                    self.save_record(&vm, Some(r));
                }
            }
            Action::Start(a) => {
                let Some(svc) = desired.services.get(&a.service).cloned() else {
                    tracing::warn!(vm = %a.vm, "assignment without its service definition");
                    return;
                };
                self.set_busy(&a.vm, true);
                let me = self.clone();
                let vm_root = desired.vm_root.clone();
                tokio::spawn(async move {
                    let _permit = me.starts.acquire().await;
                    let started = Instant::now();
                    let vm_dir = vm_dir(&vm_root, &a.service, &a.vm);
                    match me.start_vm(&a, &svc, &vm_dir).await {
                        Ok(()) => {
                            tracing::info!(vm = %a.vm, epoch = a.epoch, ms = started.elapsed().as_millis() as u64, "VM started");
                            me.save_record(
                                &a.vm,
                                Some(Record {
                                    driver: svc.def.driver,
                                    epoch: a.epoch,
                                    ended: None,
                                    vm_dir,
                                    checkpoint: None,
                                }),
                            );
                            me.clear_fenced(&a.vm);
                        }
                        Err(e) => {
                            let reason = format!("{e:#}");
                            tracing::warn!(vm = %a.vm, error = %reason, "VM did not start");
                            me.save_record(
                                &a.vm,
                                Some(Record {
                                    driver: svc.def.driver,
                                    epoch: a.epoch,
                                    ended: Some((a.epoch, ReportedState::Failed { reason })),
                                    vm_dir,
                                    checkpoint: None,
                                }),
                            );
                        }
                    }
                    me.set_busy(&a.vm, false);
                    me.wake_reconcile.notify_one();
                });
            }
            Action::Stop { vm } => {
                self.set_busy(&vm, true);
                let me = self.clone();
                tokio::spawn(async move {
                    me.stop_vm(&vm).await;
                    me.set_busy(&vm, false);
                    me.wake_reconcile.notify_one();
                });
            }
            Action::Remove { vm } => {
                self.set_busy(&vm, true);
                let me = self.clone();
                tokio::spawn(async move {
                    me.stop_vm(&vm).await;
                    let _ = me.process.remove(&vm).await;
                    let _ = me.qemu.remove(&vm).await;
                    let _ = std::fs::remove_file(metrics_file(&me.cfg.state_dir, &vm));
                    me.save_record(&vm, None);
                    me.clear_fenced(&vm);
                    tracing::info!(vm = %vm, "VM removed from this host");
                    me.set_busy(&vm, false);
                    me.wake_reconcile.notify_one();
                });
            }
        }
    }

    async fn stop_vm(&self, vm: &str) {
        for r in [self.process.stop(vm, STOP_GRACE).await, self.qemu.stop(vm, STOP_GRACE).await] {
            match r {
                Ok(state) => tracing::info!(vm, state = %state, "VM stopped"),
                Err(crate::DriverError::NotFound { .. } | crate::DriverError::WrongDriver { .. }) => {}
                Err(e) => tracing::warn!(vm, error = %e, "stop failed"),
            }
        }
    }

    /// Prepares a VM (image cache, its writable layer in Locus, its
    /// customization) and starts it.
    async fn start_vm(&self, a: &Assignment, svc: &ServiceInfo, vm_dir: &str) -> anyhow::Result<()> {
        let def = &svc.def;
        self.mount.ensure().await?;
        let image = self.cache.ensure(&svc.image_blake3, &def.image).await?;
        let dir = self.mount.path(vm_dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {vm_dir} in Locus"))?;
        let hostname = def.hostname(a.index);
        self.customize(def, a, &dir, &hostname).await?;
        let datasets: Vec<PathBuf> = def.datasets.iter().map(|d| self.mount.path(d)).collect();
        let kind = match def.driver {
            DriverKind::Process => {
                let disk = dir.join("disk");
                if !disk.exists() {
                    self.clone_in_locus(&def.image, vm_dir, "disk").await?;
                }
                let metrics = metrics_file(&self.cfg.state_dir, &a.vm);
                let mut vars: BTreeMap<&str, String> = BTreeMap::new();
                vars.insert("mount", self.mount.dir().display().to_string());
                vars.insert("vm_dir", dir.display().to_string());
                vars.insert("disk", disk.display().to_string());
                vars.insert("image", image.display().to_string());
                vars.insert("service", def.name.clone());
                vars.insert("vm", a.vm.clone());
                vars.insert("index", a.index.to_string());
                vars.insert("hostname", hostname.clone());
                vars.insert("metrics", metrics.display().to_string());
                let ds: Vec<String> = datasets.iter().map(|p| p.display().to_string()).collect();
                let keys: Vec<String> = (0..ds.len()).map(|i| format!("dataset{i}")).collect();
                for (k, v) in keys.iter().zip(&ds) {
                    vars.insert(k.as_str(), v.clone());
                }
                let command = def.command.iter().map(|c| substitute(c, &vars)).collect();
                let mut env = def.customize.env.clone();
                env.insert("LOCUS_MOUNT".into(), vars["mount"].clone());
                env.insert("LOCUS_VM_DIR".into(), vars["vm_dir"].clone());
                env.insert("LOCUS_DISK".into(), vars["disk"].clone());
                env.insert("LOCUS_IMAGE".into(), vars["image"].clone());
                env.insert("LOCUS_METRICS".into(), vars["metrics"].clone());
                env.insert("LOCUS_HOSTNAME".into(), hostname.clone());
                env.insert("LOCUS_SERVICE".into(), def.name.clone());
                env.insert("LOCUS_INDEX".into(), a.index.to_string());
                env.insert("LOCUS_VM_EPOCH".into(), a.epoch.to_string());
                env.insert("LOCUS_HOST_NAME".into(), self.cfg.name.clone());
                env.insert("LOCUS_DATASETS".into(), ds.join(":"));
                for (i, d) in ds.iter().enumerate() {
                    env.insert(format!("LOCUS_DATASET_{i}"), d.clone());
                }
                VmKind::Process { command, env, cwd: None }
            }
            DriverKind::Qemu => {
                let overlay = dir.join("disk.qcow2");
                if !overlay.exists() {
                    make_overlay(&image, &overlay, svc.image_bytes).await?;
                }
                let kernel = self.mount.path(def.kernel.as_deref().unwrap_or_default());
                let initrd = def.initrd.as_deref().map(|i| self.mount.path(i));
                let mut disks =
                    vec![Disk { source: DiskSource::Overlay { overlay, backing: image }, read_only: false }];
                disks.extend(datasets.into_iter().map(|p| Disk { source: DiskSource::Path(p), read_only: false }));
                let seed = dir.join("seed.iso");
                if seed.exists() {
                    disks.push(Disk { source: DiskSource::Path(seed), read_only: true });
                }
                VmKind::Qemu {
                    kernel,
                    initrd,
                    append: def.append.clone(),
                    disks,
                    extra_args: Vec::new(),
                    restore_from: None,
                }
            }
        };
        let spec = VmSpec {
            id: a.vm.clone(),
            name: hostname,
            vcpus: def.vcpus,
            memory_mib: def.memory_mib,
            kind,
            log_dir: None,
        };
        match def.driver {
            DriverKind::Process => self.process.start(&spec).await?,
            DriverKind::Qemu => self.qemu.start(&spec).await?,
        };
        Ok(())
    }

    /// Writes the service's customization into the VM's directory once,
    /// when the VM is first prepared (later runs keep what the VM changed).
    async fn customize(&self, def: &ServiceDef, a: &Assignment, dir: &Path, hostname: &str) -> anyhow::Result<()> {
        let marker = dir.join(".customized");
        if marker.exists() {
            return Ok(());
        }
        let files = dir.join("files");
        for (rel, content) in &def.customize.files {
            let p = files.join(rel);
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
            }
            std::fs::write(&p, content).with_context(|| format!("write {}", p.display()))?;
        }
        std::fs::write(dir.join("hostname"), format!("{hostname}\n")).context("write the hostname")?;
        if def.driver == DriverKind::Qemu {
            make_seed(def, a, dir, hostname).await?;
        }
        std::fs::write(&marker, b"").context("mark the VM customized")?;
        Ok(())
    }

    /// A copy-on-write clone in Locus (metadata only; chunks are copied by
    /// the chunk servers on the first write to each).
    async fn clone_in_locus(&self, src: &str, parent: &str, name: &str) -> anyhow::Result<()> {
        let meta = self.files.meta();
        let s = meta.resolve(src.as_bytes(), true).await.with_context(|| format!("resolve {src}"))?;
        let p = meta.resolve(parent.as_bytes(), true).await.with_context(|| format!("resolve {parent}"))?;
        let _one_at_a_time = self.clones.lock().await;
        let out = self
            .files
            .clone_inode(s.ino, p.ino, name.as_bytes(), false)
            .await
            .with_context(|| format!("clone {src} to {parent}/{name}"))?;
        if !out.unfenced.is_empty() {
            tracing::warn!(chunks = out.unfenced.len(), "clone: some replicas missed their fence");
        }
        Ok(())
    }

    /// Writes checkpoint `a.checkpoint` of a qemu VM into Locus: its memory
    /// and devices (`checkpoints/<n>.state`) and, while it is paused, a
    /// snapshot of its disk layer (`checkpoints/<n>.disk.qcow2`).
    async fn checkpoint_vm(&self, a: &Assignment, r: &Record) -> anyhow::Result<CheckpointRecord> {
        let n = a.checkpoint;
        let dir = format!("{}/checkpoints", r.vm_dir);
        std::fs::create_dir_all(self.mount.path(&dir)).with_context(|| format!("create {dir}"))?;
        let memory = format!("{dir}/{n}.state");
        let disk_name = format!("{n}.disk.qcow2");
        let disk = format!("{dir}/{disk_name}");
        let layer = format!("{}/disk.qcow2", r.vm_dir);
        let started = Instant::now();
        let bytes = self
            .qemu
            .checkpoint_with(&a.vm, &self.mount.path(&memory), || async {
                let meta = self.files.meta();
                let src = meta.resolve(layer.as_bytes(), true).await.map_err(|e| format!("{layer}: {e}"))?;
                let parent = meta.resolve(dir.as_bytes(), true).await.map_err(|e| format!("{dir}: {e}"))?;
                self.files
                    .clone_inode(src.ino, parent.ino, disk_name.as_bytes(), true)
                    .await
                    .map(|_| ())
                    .map_err(|e| format!("snapshot {layer}: {e}"))
            })
            .await?;
        tracing::info!(vm = %a.vm, n, bytes, ms = started.elapsed().as_millis() as u64, "checkpoint written");
        Ok(CheckpointRecord { n, epoch: a.epoch, at: Timespec::now(), memory, disk, memory_bytes: bytes })
    }

    /// Copies new console output of each VM into Locus, next to its layer.
    async fn sync_logs(&self) {
        let records = self.records.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let host = self.cfg.name.clone();
        for (vm, r) in records {
            let logs = match r.driver {
                DriverKind::Process => self.process.logs(&vm),
                DriverKind::Qemu => self.qemu.logs(&vm),
            };
            let Ok(logs) = logs else { continue };
            for (local, kind) in [(&logs.console, "console"), (&logs.stderr, "stderr")] {
                let name = format!("{host}-epoch{}.{kind}.log", r.epoch);
                if let Err(e) = self.sync_one(local, &format!("{}/logs", r.vm_dir), &name).await {
                    tracing::debug!(vm = %vm, error = %e, "log copy failed");
                }
            }
        }
    }

    async fn sync_one(&self, local: &Path, dir: &str, name: &str) -> anyhow::Result<()> {
        let Ok(len) = std::fs::metadata(local).map(|m| m.len()) else { return Ok(()) };
        let key = PathBuf::from(format!("{dir}/{name}"));
        let known = self.log_offsets.lock().unwrap_or_else(|p| p.into_inner()).get(&key).copied();
        if known.is_some_and(|(_, copied)| copied == len) {
            return Ok(());
        }
        // The Locus file is found (or made) once; later passes only write.
        let (ino, copied) = match known {
            Some(k) => k,
            None => {
                let file = self.log_file(dir, name).await?;
                (file.ino, file.size)
            }
        };
        let from = copied.min(len);
        if from >= len {
            self.log_offsets.lock().unwrap_or_else(|p| p.into_inner()).insert(key, (ino, len));
            return Ok(());
        }
        let n = (len - from).min(LOG_SYNC_BYTES);
        let mut buf = vec![0u8; n as usize];
        {
            use std::io::{Read, Seek};
            let mut f = std::fs::File::open(local)?;
            f.seek(std::io::SeekFrom::Start(from))?;
            f.read_exact(&mut buf)?;
        }
        self.files.write(ino, from, Bytes::from(buf)).await?;
        self.files.flush(ino).await?;
        self.log_offsets.lock().unwrap_or_else(|p| p.into_inner()).insert(key, (ino, from + n));
        Ok(())
    }

    /// The log file `name` in `dir` (its `logs` directory made if missing).
    async fn log_file(&self, dir: &str, name: &str) -> anyhow::Result<Attr> {
        let meta = self.files.meta();
        let parent = match meta.resolve(dir.as_bytes(), true).await {
            Ok(a) => a.ino,
            Err(_) => {
                let up = meta.resolve(dir.rsplit_once('/').map(|(p, _)| p).unwrap_or("/").as_bytes(), true).await?;
                let op = MetaOp::Mkdir { parent: up.ino, name: b"logs".to_vec(), perm: 0o755, caller: Caller::ROOT };
                match meta.op_attr(op).await {
                    Ok(a) => a.ino,
                    Err(_) => meta.resolve(dir.as_bytes(), true).await?.ino,
                }
            }
        };
        let op = MetaOp::Create {
            parent,
            name: name.as_bytes().to_vec(),
            perm: 0o644,
            caller: Caller::ROOT,
            exclusive: false,
        };
        Ok(meta.op_attr(op).await?)
    }

    /// Clean stop: VMs stop (gracefully), logs are copied, the mount flushes
    /// and goes, the lease file goes (the guard exits).
    async fn shutdown(&self) {
        let ids: Vec<String> = self.records.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect();
        let stops = ids.iter().map(|vm| self.stop_vm(vm));
        futures::future::join_all(stops).await;
        self.sync_logs().await;
        self.mount.unmount().await;
        if let Err(e) = self.dirs.lease().remove() {
            tracing::warn!(error = %e, "cannot remove the lease file");
        }
        tracing::info!("host agent stopped");
    }
}

/// A qcow2 overlay over the cached master, made without copying it.
async fn make_overlay(backing: &Path, overlay: &Path, size: u64) -> anyhow::Result<()> {
    let tmp = overlay.with_extension("qcow2.tmp");
    let out = tokio::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-u", "-b"])
        .arg(backing)
        .arg(&tmp)
        .arg(size.max(512).to_string())
        .output()
        .await
        .context("run qemu-img")?;
    if !out.status.success() {
        bail!("qemu-img create: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    std::fs::rename(&tmp, overlay).with_context(|| format!("rename {}", tmp.display()))?;
    Ok(())
}

/// A cloud-init NoCloud seed (ISO 9660, volume `cidata`) with the
/// hostname, the environment and the files of the service definition.
async fn make_seed(def: &ServiceDef, a: &Assignment, dir: &Path, hostname: &str) -> anyhow::Result<()> {
    let scratch = tempfile::tempdir().context("make a scratch directory")?;
    let meta = format!("instance-id: {}\nlocal-hostname: {hostname}\n", a.vm);
    let mut user = format!("#cloud-config\nhostname: {hostname}\n");
    if !def.customize.files.is_empty() || !def.customize.env.is_empty() {
        user.push_str("write_files:\n");
        let mut files: Vec<(String, String)> =
            def.customize.files.iter().map(|(p, c)| (format!("/etc/locus/files/{p}"), c.clone())).collect();
        if !def.customize.env.is_empty() {
            let env: String = def.customize.env.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
            files.push(("/etc/locus/env".into(), env));
        }
        for (path, content) in files {
            user.push_str(&format!("  - path: {}\n    content: {}\n", json_str(&path), json_str(&content)));
        }
    }
    std::fs::write(scratch.path().join("meta-data"), meta)?;
    std::fs::write(scratch.path().join("user-data"), user)?;
    let iso = scratch.path().join("seed.iso");
    let out = tokio::process::Command::new("genisoimage")
        .args(["-quiet", "-output"])
        .arg(&iso)
        .args(["-volid", "cidata", "-joliet", "-rock"])
        .arg(scratch.path().join("user-data"))
        .arg(scratch.path().join("meta-data"))
        .output()
        .await
        .context("run genisoimage (package genisoimage)")?;
    if !out.status.success() {
        bail!("genisoimage: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    std::fs::copy(&iso, dir.join("seed.iso")).context("copy the seed into Locus")?;
    Ok(())
}

/// A YAML-safe scalar (JSON strings are YAML).
fn json_str(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_replaced_and_unknown_ones_kept() {
        let vars: BTreeMap<&str, String> = [("mount", "/m".to_string()), ("vm", "web-1".to_string())].into();
        assert_eq!(substitute("{mount}/apps/{vm}.sh", &vars), "/m/apps/web-1.sh");
        assert_eq!(substitute("{nope} {", &vars), "{nope} {");
    }

    #[test]
    fn metrics_files_are_read_leniently() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m");
        std::fs::write(&p, "load 0.75\nbad line here\nqps nan\nx 3\n").unwrap();
        let m = read_metrics(&p);
        assert_eq!(m.get("load"), Some(&0.75));
        assert_eq!(m.get("x"), Some(&3.0));
        assert_eq!(m.len(), 2);
        assert!(read_metrics(&dir.path().join("missing")).is_empty());
    }
}
