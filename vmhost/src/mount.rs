//! The host's Locus mount: one FUSE mount (`locus mount --foreground`, a
//! helper process in its own session) through which the VMs reach their
//! program, disks and data sets. It outlives an agent restart, like the
//! VMs; fencing kills it, so no buffered write of a fenced VM lands later.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::daemon::{spawn_detached, PidFile};

/// How long a new mount may take to appear.
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a clean unmount may take (buffered data is flushed).
pub const UNMOUNT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mount {dir}: {reason}")]
    Failed { dir: String, reason: String },
    #[error("mount {dir}: {action}")]
    Io {
        dir: String,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// The mount of one host. Cheap to clone; clones share one lock, so
/// concurrent VM starts mount once.
#[derive(Debug, Clone)]
pub struct HostMount {
    dir: PathBuf,
    pid: PidFile,
    log: PathBuf,
    locus_bin: PathBuf,
    config: PathBuf,
    lock: std::sync::Arc<tokio::sync::Mutex<()>>,
}

impl HostMount {
    pub fn new(state_dir: &Path, locus_bin: PathBuf, config: PathBuf) -> Self {
        HostMount {
            dir: state_dir.join("mnt"),
            pid: PidFile::new(state_dir.join("mount.pid")),
            log: state_dir.join("logs").join("mount.log"),
            locus_bin,
            config,
            lock: Default::default(),
        }
    }

    /// Where Locus is mounted.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A path in Locus, as seen through the mount.
    pub fn path(&self, locus_path: &str) -> PathBuf {
        self.dir.join(locus_path.trim_start_matches('/'))
    }

    /// True when the mount is there and answers.
    pub fn healthy(&self) -> bool {
        self.pid.alive().is_some() && is_mount_point(&self.dir) && std::fs::metadata(&self.dir).is_ok()
    }

    /// Mounts, unless a healthy mount is there already; a dead or stale one
    /// is cleared first.
    pub async fn ensure(&self) -> Result<(), MountError> {
        if self.healthy() {
            return Ok(());
        }
        let _one_at_a_time = self.lock.lock().await;
        if self.healthy() {
            return Ok(());
        }
        let dir = self.dir.display().to_string();
        kill(&self.pid, &self.dir);
        std::fs::create_dir_all(&self.dir).map_err(|source| MountError::Io {
            dir: dir.clone(),
            action: "create the mount point",
            source,
        })?;
        let mut cmd = Command::new(&self.locus_bin);
        cmd.arg("--config").arg(&self.config).arg("mount").arg(&self.dir).arg("--foreground");
        if std::env::var_os("LOCUS_LOG").is_none() {
            cmd.env("LOCUS_LOG", "info");
        }
        cmd.env("NO_COLOR", "1");
        spawn_detached(cmd, &self.log, &self.pid).map_err(|source| MountError::Io {
            dir: dir.clone(),
            action: "start locus mount",
            source,
        })?;
        let deadline = Instant::now() + MOUNT_TIMEOUT;
        while Instant::now() < deadline {
            if self.healthy() {
                tracing::info!(dir = %dir, "Locus mounted");
                return Ok(());
            }
            if self.pid.alive().is_none() {
                return Err(MountError::Failed {
                    dir,
                    reason: format!("locus mount ended; see {}", self.log.display()),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        kill(&self.pid, &self.dir);
        Err(MountError::Failed { dir, reason: format!("not mounted after {MOUNT_TIMEOUT:?}") })
    }

    /// Unmounts cleanly: buffered data is flushed first.
    pub async fn unmount(&self) {
        if self.pid.signal(Signal::SIGTERM) {
            let deadline = Instant::now() + UNMOUNT_TIMEOUT;
            while self.pid.alive().is_some() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        kill(&self.pid, &self.dir);
    }
}

/// SIGKILL the mount process and detach the mount point.
pub fn kill(pid: &PidFile, dir: &Path) {
    pid.signal(Signal::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(5);
    while pid.alive().is_some() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    if is_mount_point(dir) {
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg("-z")
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        if is_mount_point(dir) {
            // SAFETY: umount2 takes a NUL-terminated path that outlives the call.
            let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap_or_default();
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
    pid.remove();
}

/// Whether `dir` is a mount point, from /proc/self/mountinfo (a stat of a
/// dead FUSE mount would fail or hang).
pub fn is_mount_point(dir: &Path) -> bool {
    fs_client::fuse::mount::is_mounted(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_found() {
        assert!(is_mount_point(Path::new("/proc")));
        assert!(!is_mount_point(Path::new("/definitely/not/mounted")));
    }
}
