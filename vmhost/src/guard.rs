//! The fence guard (`locus-vmhost guard`): a small process per host, in its
//! own session, that kills the host's VMs the moment its lease runs out,
//! whether the agent is alive, hung or dead. The agent renews the lease
//! file only after the leader renewed the lease, and the leader declares a
//! host failed only after the lease plus a grace, so a VM the leader places
//! elsewhere is already dead here: it never runs twice against one disk.
//!
//! It also kills the host's Locus mount, so writes a fenced VM left in the
//! mount's buffer are dropped rather than landing after its successor
//! started. It exits when the lease file is removed (the agent stopped
//! cleanly) and when another guard took over.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::daemon::PidFile;
use crate::driver::Driver;
use crate::lease::{boottime_ns, LeaseFile};
use crate::{ProcessDriver, QemuDriver};

/// How often the guard looks at the lease.
pub const GUARD_POLL: Duration = Duration::from_millis(50);

/// Where a host's pieces live under its state directory.
#[derive(Debug, Clone)]
pub struct HostDirs {
    pub state: PathBuf,
}

impl HostDirs {
    pub fn new(state: impl Into<PathBuf>) -> Self {
        HostDirs { state: state.into() }
    }
    pub fn process_runs(&self) -> PathBuf {
        self.state.join("run").join("process")
    }
    pub fn qemu_runs(&self) -> PathBuf {
        self.state.join("run").join("qemu")
    }
    pub fn guard_pid(&self) -> PidFile {
        PidFile::new(self.state.join("guard.pid"))
    }
    pub fn mount_pid(&self) -> PidFile {
        PidFile::new(self.state.join("mount.pid"))
    }
    pub fn mount_dir(&self) -> PathBuf {
        self.state.join("mnt")
    }
    pub fn fenced_file(&self) -> PathBuf {
        self.state.join("fenced.json")
    }
    pub fn lease(&self) -> LeaseFile {
        LeaseFile::in_dir(&self.state)
    }
}

/// What the last fencing killed: the agent restarts these VMs (if still
/// assigned) instead of taking their end for the workload's own.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fenced {
    pub until_ns: u64,
    pub vms: Vec<String>,
}

impl Fenced {
    pub fn load(path: &Path) -> Fenced {
        std::fs::read(path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
    }

    /// Adds VMs killed by the fencing of the lease ending at `until_ns`.
    pub fn add(path: &Path, until_ns: u64, vms: Vec<String>) {
        let mut f = Fenced::load(path);
        f.until_ns = until_ns;
        f.vms.extend(vms);
        f.vms.sort();
        f.vms.dedup();
        f.save(path);
    }

    pub fn save(&self, path: &Path) {
        if let Ok(b) = serde_json::to_vec(self) {
            if let Err(e) = crate::daemon::write_atomic(path, &b) {
                tracing::warn!(error = %e, "cannot record the fenced VMs");
            }
        }
    }
}

/// Kills the host's mount and every live VM; returns the VMs killed.
///
/// The mount goes first: a VM blocked in an fsync on the mount waits
/// uninterruptibly for its writeback, which a cut-off mount never finishes;
/// killing the mount daemon aborts the connection, the VM's calls fail at
/// once and the SIGKILL takes effect.
pub async fn fence_now(dirs: &HostDirs) -> Vec<String> {
    crate::mount::kill(&dirs.mount_pid(), &dirs.mount_dir());
    let mut killed = Vec::new();
    let process = ProcessDriver::new(dirs.process_runs());
    let qemu = QemuDriver::new(dirs.qemu_runs());
    if let Ok(list) = process.list().await {
        for vm in list.into_iter().filter(|v| v.state.as_ref().is_ok_and(|s| s.is_live())) {
            match process.kill(&vm.id).await {
                Ok(_) => killed.push(vm.id),
                Err(e) => tracing::error!(vm = %vm.id, error = %e, "cannot kill VM while fencing"),
            }
        }
    }
    if let Ok(list) = qemu.list().await {
        for vm in list.into_iter().filter(|v| v.state.as_ref().is_ok_and(|s| s.is_live())) {
            match qemu.kill(&vm.id).await {
                Ok(_) => killed.push(vm.id),
                Err(e) => tracing::error!(vm = %vm.id, error = %e, "cannot kill VM while fencing"),
            }
        }
    }
    killed
}

/// The guard's loop.
pub async fn run(dirs: HostDirs) -> std::io::Result<()> {
    let me = std::process::id();
    dirs.guard_pid().record(me)?;
    let lease = dirs.lease();
    let mut fenced_until = 0u64;
    tracing::info!(state = %dirs.state.display(), "fence guard running");
    loop {
        tokio::time::sleep(GUARD_POLL).await;
        if dirs.guard_pid().alive() != Some(me) {
            tracing::info!("another guard took over");
            return Ok(());
        }
        let Some(l) = lease.read() else {
            tracing::info!("no lease file: the agent stopped; guard exits");
            dirs.guard_pid().remove();
            return Ok(());
        };
        if l.expired_at(boottime_ns()) && l.until_ns != fenced_until {
            let vms = fence_now(&dirs).await;
            fenced_until = l.until_ns;
            if !vms.is_empty() {
                tracing::warn!(vms = ?vms, "lease ran out: VMs killed (fenced)");
                Fenced::add(&dirs.fenced_file(), l.until_ns, vms);
            }
        }
    }
}
