//! The lease file: how long this host may run its VMs, shared between the
//! agent (which renews it) and the fence guard (which kills the VMs when it
//! runs out, also when the agent is dead or hung).
//!
//! Times are `CLOCK_BOOTTIME` nanoseconds: monotonic, counting suspend, and
//! the same for every process on the machine.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Nanoseconds of `CLOCK_BOOTTIME`.
pub fn boottime_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if rc != 0 {
        // Cannot happen for CLOCK_BOOTTIME on Linux; a zero reads as "expired".
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// What the lease file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// VMs may run until this `CLOCK_BOOTTIME` instant.
    pub until_ns: u64,
    /// The agent that wrote it.
    pub agent_pid: u32,
}

impl Lease {
    pub fn expired_at(&self, now_ns: u64) -> bool {
        now_ns >= self.until_ns
    }
}

/// `STATE_DIR/lease`.
#[derive(Debug, Clone)]
pub struct LeaseFile {
    path: PathBuf,
}

impl LeaseFile {
    pub fn in_dir(state_dir: &Path) -> Self {
        LeaseFile { path: state_dir.join("lease") }
    }

    /// Replaces the lease (write a temporary file, rename over): a reader
    /// sees the old lease or the new one, never a torn one. No fsync: the
    /// lease means nothing after a reboot.
    pub fn write(&self, lease: Lease) -> io::Result<()> {
        crate::daemon::write_atomic(&self.path, &serde_json::to_vec(&lease)?)
    }

    /// The current lease; `None` when there is none (the agent stopped
    /// cleanly, or never ran). An unreadable file reads as an expired lease.
    pub fn read(&self) -> Option<Lease> {
        match std::fs::read(&self.path) {
            Ok(b) => Some(serde_json::from_slice(&b).unwrap_or(Lease { until_ns: 0, agent_pid: 0 })),
            Err(_) => None,
        }
    }

    pub fn remove(&self) -> io::Result<()> {
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_round_trip_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let f = LeaseFile::in_dir(dir.path());
        assert_eq!(f.read(), None);
        let now = boottime_ns();
        assert!(now > 0);
        let l = Lease { until_ns: now + 1_000_000_000, agent_pid: 7 };
        f.write(l).unwrap();
        assert_eq!(f.read(), Some(l));
        assert!(!l.expired_at(now) && l.expired_at(now + 2_000_000_000));
        std::fs::write(dir.path().join("lease"), b"garbage").unwrap();
        assert!(f.read().unwrap().expired_at(now));
        f.remove().unwrap();
        assert_eq!(f.read(), None);
    }
}
