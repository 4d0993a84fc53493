//! Helper processes of a host that must outlive the agent (the fence guard
//! and the Locus mount): started in their own session, known by a pid file
//! that records the start time too, so a reused pid is never mistaken for
//! them.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::procfs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct PidRecord {
    pid: u32,
    start_ticks: u64,
}

/// A pid file naming one helper process.
#[derive(Debug, Clone)]
pub struct PidFile {
    path: PathBuf,
}

impl PidFile {
    pub fn new(path: PathBuf) -> Self {
        PidFile { path }
    }

    /// The helper's pid while that very process lives.
    pub fn alive(&self) -> Option<u32> {
        let rec: PidRecord = serde_json::from_slice(&std::fs::read(&self.path).ok()?).ok()?;
        let stat = procfs::read_stat(rec.pid).ok()??;
        (stat.start_ticks == rec.start_ticks && !stat.has_ended()).then_some(rec.pid)
    }

    /// Records `pid` (which must be alive now).
    pub fn record(&self, pid: u32) -> io::Result<()> {
        let stat = procfs::read_stat(pid)?.ok_or_else(|| io::Error::other(format!("process {pid} is gone")))?;
        write_atomic(&self.path, &serde_json::to_vec(&PidRecord { pid, start_ticks: stat.start_ticks })?)
    }

    /// Sends `signal` to the helper if it lives; true if it did.
    pub fn signal(&self, signal: Signal) -> bool {
        match self.alive() {
            Some(pid) => kill(Pid::from_raw(pid as i32), signal).is_ok(),
            None => false,
        }
    }

    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Replaces `path` with `data` (a temporary file renamed over it, so a
/// reader sees the old or the new content). The temporary name is unique
/// to this process and call: the agent and the guard write some of the
/// same files.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp =
        path.with_file_name(format!(".{name}.{}.{}.tmp", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed)));
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Starts `cmd` in a new session with stdin from /dev/null and its output
/// appended to `log`, and records it in `pid_file`. The child is not
/// waited for: when the starter ends, init reaps it.
pub fn spawn_detached(mut cmd: Command, log: &Path, pid_file: &PidFile) -> io::Result<u32> {
    use std::os::unix::process::CommandExt;
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    cmd.stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out);
    // SAFETY: setsid(2) is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| nix::unistd::setsid().map(drop).map_err(io::Error::from));
    }
    let child = cmd.spawn()?;
    let pid = child.id();
    // Dropping a std Child neither kills nor waits for it.
    drop(child);
    pid_file.record(pid)?;
    Ok(pid)
}
