//! The run directory both drivers share the layout of, and the process
//! bookkeeping around it: spawning a VM's process in its own session,
//! recording who it is, collecting how it ended, signalling its group.
//!
//! ```text
//! RUN_DIR/<vm id>/
//!   spec.json      the driver's name and the VmSpec it was started with
//!   instance.json  pid, start time (/proc/PID/stat field 22) and boot id
//!   exit.json      how that instance ended (written by its parent)
//!   failed.json    why the last start failed
//!   lock           flock: one start at a time
//!   …              the driver's own files (logs, QMP socket, pidfile)
//! ```
//!
//! A pid alone is not an identity: once the VM's process ends the pid can be
//! reused. Every check compares the pid's start time and the boot id with
//! `instance.json` before believing or signalling a process.
//!
//! Exit codes: the process that spawned a VM is its parent and the only one
//! that can collect its status; a task of that process waits for it and
//! writes `exit.json`. After an agent restart the VM's parent is gone, so a
//! VM that ends then is recorded as [`ExitCode::Unknown`].

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::driver::{validate_id, DriverError, ExitCode, VmHandle, VmInfo, VmSpec, VmState};
use crate::procfs::{self, ProcStat};

/// How long `start` waits for another start of the same VM to finish.
pub(crate) const LOCK_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a reader waits for this process's reaper task to record the exit
/// of a child it saw end.
pub(crate) const REAPER_WAIT: Duration = Duration::from_secs(5);
/// How long SIGKILL may take to end a process (one stuck in uninterruptible
/// I/O, e.g. on a dead NBD server, can take this long or longer).
pub(crate) const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// Poll interval of the waits on a process's state.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(20);

const SPEC_FILE: &str = "spec.json";
const INSTANCE_FILE: &str = "instance.json";
const EXIT_FILE: &str = "exit.json";
const FAILED_FILE: &str = "failed.json";
const LOCK_FILE: &str = "lock";

#[derive(Serialize, Deserialize)]
struct SpecRecord {
    driver: String,
    spec: VmSpec,
}

/// Who the VM's process is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Instance {
    pub pid: u32,
    pub start_ticks: u64,
    pub boot_id: String,
    pub started_unix_ms: u64,
}

#[derive(Serialize, Deserialize)]
struct ExitRecord {
    pid: u32,
    start_ticks: u64,
    exit: ExitCode,
}

#[derive(Debug, Serialize, Deserialize)]
struct FailureRecord {
    reason: String,
}

/// What the run directory and `/proc` say about a VM.
#[derive(Debug)]
pub(crate) enum Observed {
    /// Its process exists.
    Live { instance: Instance },
    /// Its process ended.
    Ended { exit: ExitCode },
    /// Its last start failed.
    Failed(String),
    /// A start began but recorded no process (the agent died in between).
    Interrupted,
}

/// Exit statuses of the VMs this process spawned and has not reaped yet:
/// (pid, start time) -> set to true once `exit.json` is written. Shared by
/// every driver instance of the process, since the process is the parent.
static REAPERS: Mutex<BTreeMap<(u32, u64), watch::Receiver<bool>>> = Mutex::new(BTreeMap::new());

/// Result of the first half of a start.
pub(crate) enum Prepared {
    /// Live with the same spec: nothing to do.
    Running(VmHandle),
    /// Cleared for a new instance; the lock is held until this is dropped.
    Fresh(StartGuard),
}

pub(crate) struct StartGuard {
    pub vm_dir: PathBuf,
    _lock: Flock<File>,
}

#[derive(Clone, Debug)]
pub(crate) struct RunDir {
    root: PathBuf,
    driver: &'static str,
}

impl RunDir {
    pub fn new(root: PathBuf, driver: &'static str) -> Self {
        RunDir { root, driver }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The VM's directory; the id is checked so it cannot leave the root.
    pub fn vm_dir(&self, id: &str) -> Result<PathBuf, DriverError> {
        validate_id(id)?;
        Ok(self.root.join(id))
    }

    /// The spec the VM was last started with; `NotFound` if there is none,
    /// `WrongDriver` if another driver started it.
    pub fn load_spec(&self, id: &str) -> Result<VmSpec, DriverError> {
        let dir = self.vm_dir(id)?;
        let rec: SpecRecord =
            read_json(id, &dir.join(SPEC_FILE))?.ok_or_else(|| DriverError::NotFound { vm: id.to_owned() })?;
        if rec.driver != self.driver {
            return Err(DriverError::WrongDriver { vm: id.to_owned(), driver: self.driver, owner: rec.driver });
        }
        if rec.spec.id != id {
            return Err(DriverError::CorruptState {
                vm: id.to_owned(),
                path: dir.join(SPEC_FILE),
                reason: format!("holds the spec of vm {}", rec.spec.id),
            });
        }
        Ok(rec.spec)
    }

    /// Every VM of this driver in the run directory, with the state
    /// `state_of` reads (an error is listed, not returned).
    pub async fn list<F, Fut>(&self, state_of: F) -> Result<Vec<VmInfo>, DriverError>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = Result<(VmState, Option<u32>), DriverError>>,
    {
        let mut out = Vec::new();
        for id in self.ids()? {
            let run_dir = self.vm_dir(&id)?;
            let name = self.load_spec(&id).map(|s| s.name).unwrap_or_default();
            let (state, pid) = match state_of(id.clone()).await {
                Ok((state, pid)) => (Ok(state), pid),
                Err(e) => (Err(e.to_string()), None),
            };
            out.push(VmInfo { id, name, pid, state, run_dir });
        }
        Ok(out)
    }

    /// Ids of the VMs of this driver in the run directory, sorted.
    pub fn ids(&self) -> Result<Vec<String>, DriverError> {
        let entries = match std::fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(DriverError::RunDir { path: self.root.clone(), source }),
        };
        let mut ids = Vec::new();
        for entry in entries.flatten() {
            let Ok(id) = entry.file_name().into_string() else { continue };
            if validate_id(&id).is_err() || !entry.path().join(SPEC_FILE).is_file() {
                continue;
            }
            match self.load_spec(&id) {
                Err(DriverError::WrongDriver { .. }) => continue,
                // A VM whose spec is unreadable is still listed (its state
                // says why), so it is neither forgotten nor re-adopted blindly.
                _ => ids.push(id),
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// The recorded instance, if any.
    pub fn instance(&self, id: &str) -> Result<Option<Instance>, DriverError> {
        read_json(id, &self.vm_dir(id)?.join(INSTANCE_FILE))
    }

    /// Records an instance found another way (the qemu pidfile).
    pub fn record_instance(&self, id: &str, instance: &Instance) -> Result<(), DriverError> {
        write_json_atomic(id, &self.vm_dir(id)?.join(INSTANCE_FILE), instance)
    }

    /// Looks at the VM: live process, or how it ended.
    pub async fn observe(&self, id: &str) -> Result<Observed, DriverError> {
        let dir = self.vm_dir(id)?;
        let instance: Option<Instance> = read_json(id, &dir.join(INSTANCE_FILE))?;
        if let Some(instance) = &instance {
            if live_stat(id, instance)?.is_some() {
                return Ok(Observed::Live { instance: instance.clone() });
            }
        }
        if let Some(failure) = read_json::<FailureRecord>(id, &dir.join(FAILED_FILE))? {
            return Ok(Observed::Failed(failure.reason));
        }
        match instance {
            Some(instance) => Ok(Observed::Ended { exit: self.exit_of(id, &dir, &instance).await? }),
            None => Ok(Observed::Interrupted),
        }
    }

    /// How an ended instance exited: from `exit.json`, after waiting for this
    /// process's reaper if it is the parent; otherwise unknown.
    async fn exit_of(&self, id: &str, dir: &Path, instance: &Instance) -> Result<ExitCode, DriverError> {
        let read = || -> Result<Option<ExitCode>, DriverError> {
            let rec: Option<ExitRecord> = read_json(id, &dir.join(EXIT_FILE))?;
            Ok(rec.filter(|r| r.pid == instance.pid && r.start_ticks == instance.start_ticks).map(|r| r.exit))
        };
        if let Some(exit) = read()? {
            return Ok(exit);
        }
        let pending = REAPERS.lock().unwrap_or_else(PoisonError::into_inner).get(&instance.key()).cloned();
        if let Some(mut done) = pending {
            // Err: the reaper task is gone (its runtime shut down).
            let _ = tokio::time::timeout(REAPER_WAIT, done.wait_for(|d| *d)).await;
        }
        Ok(read()?.unwrap_or(ExitCode::Unknown))
    }

    /// First half of a start, under the VM's lock: if the VM is live with the
    /// same spec, its handle; with another spec, `SpecConflict`; otherwise
    /// the old records are cleared and the new spec is written.
    pub async fn prepare_start(&self, spec: &VmSpec) -> Result<Prepared, DriverError> {
        let id = spec.id.as_str();
        let dir = self.vm_dir(id)?;
        std::fs::create_dir_all(&dir).map_err(|source| DriverError::Io {
            vm: id.to_owned(),
            action: "create run directory",
            path: dir.clone(),
            source,
        })?;
        let lock = lock(id, &dir.join(LOCK_FILE), LOCK_TIMEOUT).await?;
        if dir.join(SPEC_FILE).exists() {
            let current = self.load_spec(id)?;
            if let Observed::Live { instance, .. } = self.observe(id).await? {
                if current != *spec {
                    return Err(DriverError::SpecConflict { vm: id.to_owned() });
                }
                return Ok(Prepared::Running(VmHandle {
                    id: id.to_owned(),
                    pid: instance.pid,
                    run_dir: dir,
                    started: false,
                }));
            }
        }
        for name in [INSTANCE_FILE, EXIT_FILE, FAILED_FILE] {
            remove_if_exists(id, &dir.join(name))?;
        }
        write_json_atomic(
            id,
            &dir.join(SPEC_FILE),
            &SpecRecord { driver: self.driver.to_owned(), spec: spec.clone() },
        )?;
        Ok(Prepared::Fresh(StartGuard { vm_dir: dir, _lock: lock }))
    }

    /// Records why a start failed; the VM then shows as failed.
    pub fn record_failure(&self, id: &str, reason: &str) -> Result<(), DriverError> {
        write_json_atomic(id, &self.vm_dir(id)?.join(FAILED_FILE), &FailureRecord { reason: reason.to_owned() })
    }

    /// Spawns the VM's process in a new session (so its group is its own and
    /// a signal to the agent's terminal or group never reaches it), records
    /// it, and leaves a task that collects its exit status.
    pub fn spawn(&self, id: &str, mut cmd: tokio::process::Command, program: &str) -> Result<Instance, DriverError> {
        let dir = self.vm_dir(id)?;
        cmd.kill_on_drop(false);
        // SAFETY: the closure runs in the child between fork and exec and
        // only calls setsid(2), which is async-signal-safe, and builds an
        // io::Error from an errno without allocating.
        unsafe {
            cmd.pre_exec(|| nix::unistd::setsid().map(drop).map_err(io::Error::from));
        }
        let mut child = cmd.spawn().map_err(|source| DriverError::Spawn {
            vm: id.to_owned(),
            program: program.to_owned(),
            source,
        })?;
        // The child is ours and not yet waited for, so its /proc entry stays
        // (as a zombie at worst) until the reaper below runs.
        let Some(pid) = child.id() else {
            return Err(DriverError::StartFailed { vm: id.to_owned(), reason: "the process vanished at once".into() });
        };
        let stat = match procfs::read_stat(pid) {
            Ok(Some(stat)) => Ok(stat),
            Ok(None) => Err(io::Error::new(io::ErrorKind::NotFound, "no /proc entry")),
            Err(e) => Err(e),
        }
        .map_err(|source| {
            let _ = child.start_kill();
            DriverError::Io { vm: id.to_owned(), action: "read", path: format!("/proc/{pid}/stat").into(), source }
        })?;
        let instance = Instance {
            pid,
            start_ticks: stat.start_ticks,
            boot_id: procfs::boot_id().to_owned(),
            started_unix_ms: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
        };
        if let Err(e) = write_json_atomic(id, &dir.join(INSTANCE_FILE), &instance) {
            // Unrecorded, nobody could ever find it again: end it.
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            return Err(e);
        }
        let (done_tx, done_rx) = watch::channel(false);
        let key = instance.key();
        REAPERS.lock().unwrap_or_else(PoisonError::into_inner).insert(key, done_rx);
        let vm = id.to_owned();
        tokio::spawn(async move {
            let exit = match child.wait().await {
                Ok(status) => match (status.code(), status.signal()) {
                    (Some(code), _) => ExitCode::Code(code),
                    (None, Some(sig)) => ExitCode::Signal(sig),
                    (None, None) => ExitCode::Unknown,
                },
                Err(e) => {
                    tracing::warn!(vm = %vm, error = %e, "cannot collect the exit status");
                    ExitCode::Unknown
                }
            };
            tracing::info!(vm = %vm, pid, exit = %exit, "vm process ended");
            let rec = ExitRecord { pid: key.0, start_ticks: key.1, exit };
            if let Err(e) = write_json_atomic(&vm, &dir.join(EXIT_FILE), &rec) {
                tracing::warn!(vm = %vm, error = %e, "cannot record the exit status");
            }
            let _ = done_tx.send(true);
            REAPERS.lock().unwrap_or_else(PoisonError::into_inner).remove(&key);
        });
        Ok(instance)
    }

    /// Deletes an ended VM's directory, under its lock.
    pub async fn remove(&self, id: &str) -> Result<(), DriverError> {
        let dir = self.vm_dir(id)?;
        match self.load_spec(id) {
            // A corrupt spec must not make the VM impossible to clean up.
            Ok(_) | Err(DriverError::CorruptState { .. }) => {}
            Err(e) => return Err(e),
        }
        let _lock = lock(id, &dir.join(LOCK_FILE), LOCK_TIMEOUT).await?;
        if let Observed::Live { instance, .. } = self.observe(id).await? {
            // For the message only: the qemu driver's pause is not a SIGSTOP.
            let paused = group_paused(id, &instance).unwrap_or(false);
            let state = if paused { crate::VmState::Paused } else { crate::VmState::Running };
            return Err(DriverError::InvalidState { vm: id.to_owned(), op: "remove", state });
        }
        std::fs::remove_dir_all(&dir).map_err(|source| DriverError::Io {
            vm: id.to_owned(),
            action: "remove",
            path: dir.clone(),
            source,
        })
    }
}

impl Instance {
    fn key(&self) -> (u32, u64) {
        (self.pid, self.start_ticks)
    }
}

/// The process's stat if it is still this instance and has not ended.
pub(crate) fn live_stat(id: &str, instance: &Instance) -> Result<Option<ProcStat>, DriverError> {
    if instance.boot_id != procfs::boot_id() {
        return Ok(None);
    }
    let stat = procfs::read_stat(instance.pid).map_err(|source| DriverError::Io {
        vm: id.to_owned(),
        action: "read",
        path: format!("/proc/{}/stat", instance.pid).into(),
        source,
    })?;
    Ok(stat.filter(|s| s.start_ticks == instance.start_ticks && !s.has_ended()))
}

/// Whether the instance's process group is paused (see
/// [`procfs::group_is_paused`]).
pub(crate) fn group_paused(id: &str, instance: &Instance) -> Result<bool, DriverError> {
    let members = procfs::group_members(instance.pid as i32).map_err(|source| DriverError::Io {
        vm: id.to_owned(),
        action: "read",
        path: "/proc".into(),
        source,
    })?;
    Ok(procfs::group_is_paused(&members))
}

/// Sends `signal` to the instance's process group if the instance still
/// lives; false if it had ended.
pub(crate) fn signal_group(id: &str, instance: &Instance, signal: Signal) -> Result<bool, DriverError> {
    if live_stat(id, instance)?.is_none() {
        return Ok(false);
    }
    match killpg(Pid::from_raw(instance.pid as i32), signal) {
        Ok(()) => Ok(true),
        Err(Errno::ESRCH) => Ok(false),
        Err(source) => Err(DriverError::Signal { vm: id.to_owned(), signal: signal.as_str(), source }),
    }
}

/// After the leader ended: SIGKILL whatever else of its group is left (a
/// workload's children). The group id stays reserved while any member
/// lives, so this reaches only the VM's own processes.
pub(crate) fn sweep_group(instance: &Instance) {
    let _ = killpg(Pid::from_raw(instance.pid as i32), Signal::SIGKILL);
}

/// Waits until the instance has ended; false if it still lives at the
/// deadline.
pub(crate) async fn wait_ended(id: &str, instance: &Instance, timeout: Duration) -> Result<bool, DriverError> {
    wait_until(timeout, || Ok(live_stat(id, instance)?.is_none())).await
}

/// Polls `done` until it returns true or the timeout passes.
pub(crate) async fn wait_until(
    timeout: Duration,
    mut done: impl FnMut() -> Result<bool, DriverError>,
) -> Result<bool, DriverError> {
    let deadline = Instant::now() + timeout;
    loop {
        if done()? {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Takes the VM's lock file, polling so the wait is bounded.
async fn lock(id: &str, path: &Path, timeout: Duration) -> Result<Flock<File>, DriverError> {
    let io_err = |source| DriverError::Io { vm: id.to_owned(), action: "lock", path: path.to_owned(), source };
    let deadline = Instant::now() + timeout;
    let mut file = File::options().create(true).truncate(false).write(true).open(path).map_err(io_err)?;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((f, Errno::EWOULDBLOCK)) => file = f,
            Err((_, errno)) => return Err(io_err(io::Error::from(errno))),
        }
        if Instant::now() >= deadline {
            return Err(DriverError::Timeout { vm: id.to_owned(), op: "lock", timeout_ms: timeout.as_millis() as u64 });
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Reads a JSON record; `None` if the file does not exist.
fn read_json<T: DeserializeOwned>(id: &str, path: &Path) -> Result<Option<T>, DriverError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(DriverError::Io { vm: id.to_owned(), action: "read", path: path.to_owned(), source })
        }
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|e| DriverError::CorruptState {
        vm: id.to_owned(),
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// Writes a JSON record so a reader sees the old or the new one, never a
/// part, also across a crash: temp file, fsync, rename, fsync directory.
fn write_json_atomic<T: Serialize>(id: &str, path: &Path, value: &T) -> Result<(), DriverError> {
    let io_err =
        |action, path: &Path, source| DriverError::Io { vm: id.to_owned(), action, path: path.to_owned(), source };
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| io_err("encode", path, io::Error::other(e)))?;
    let tmp = path.with_extension("json.tmp");
    let file = File::create(&tmp).map_err(|e| io_err("create", &tmp, e))?;
    io::Write::write_all(&mut &file, &bytes).map_err(|e| io_err("write", &tmp, e))?;
    file.sync_all().map_err(|e| io_err("sync", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_err("rename", &tmp, e))?;
    if let Some(dir) = path.parent() {
        File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_err("sync", dir, e))?;
    }
    Ok(())
}

fn remove_if_exists(id: &str, path: &Path) -> Result<(), DriverError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(DriverError::Io { vm: id.to_owned(), action: "remove", path: path.to_owned(), source: e })
        }
        _ => Ok(()),
    }
}

/// Opens a fresh log file; the previous one is kept as `NAME.1`.
pub(crate) fn rotate_and_create(id: &str, path: &Path) -> Result<File, DriverError> {
    let io_err = |action, source| DriverError::Io { vm: id.to_owned(), action, path: path.to_owned(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io_err("create log directory", e))?;
    }
    if path.exists() {
        let mut old = path.as_os_str().to_owned();
        old.push(".1");
        std::fs::rename(path, &old).map_err(|e| io_err("rotate", e))?;
    }
    File::create(path).map_err(|e| io_err("create", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_records_round_trip_and_corruption_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.json");
        let rec = FailureRecord { reason: "boom".into() };
        write_json_atomic("vm", &path, &rec).unwrap();
        let back: FailureRecord = read_json("vm", &path).unwrap().unwrap();
        assert_eq!(back.reason, "boom");
        assert!(read_json::<FailureRecord>("vm", &dir.path().join("none.json")).unwrap().is_none());
        std::fs::write(&path, b"{not json").unwrap();
        let e = read_json::<FailureRecord>("vm", &path).unwrap_err();
        assert!(matches!(e, DriverError::CorruptState { .. }), "{e}");
    }

    #[test]
    fn a_reused_pid_is_not_the_instance() {
        let me = procfs::read_stat(std::process::id()).unwrap().unwrap();
        let inst = |ticks, boot: &str| Instance {
            pid: std::process::id(),
            start_ticks: ticks,
            boot_id: boot.to_owned(),
            started_unix_ms: 0,
        };
        assert!(live_stat("vm", &inst(me.start_ticks, procfs::boot_id())).unwrap().is_some());
        assert!(live_stat("vm", &inst(me.start_ticks + 1, procfs::boot_id())).unwrap().is_none());
        assert!(live_stat("vm", &inst(me.start_ticks, "another-boot")).unwrap().is_none());
    }

    #[tokio::test]
    async fn the_lock_is_exclusive_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        let held = lock("vm", &path, Duration::from_secs(1)).await.unwrap();
        let e = lock("vm", &path, Duration::from_millis(100)).await.unwrap_err();
        assert!(matches!(e, DriverError::Timeout { op: "lock", .. }), "{e}");
        drop(held);
        lock("vm", &path, Duration::from_secs(1)).await.unwrap();
    }
}
