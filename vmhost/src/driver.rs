//! What a VM is to the host agent, and the [`Driver`] trait every hypervisor
//! driver implements.
//!
//! A driver owns one run directory. Each VM it starts gets a subdirectory
//! named by the VM id holding the spec, the identity of the running process
//! and, once it ended, how it ended. Everything a driver knows is in that
//! directory, so a new driver instance (an agent restarted with the same run
//! directory) lists and controls the VMs an earlier instance started, without
//! disturbing them.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Longest VM id: ids name directories and appear in socket paths.
pub const MAX_VM_ID_LEN: usize = 64;
/// Longest VM name.
pub const MAX_VM_NAME_LEN: usize = 128;
/// Most vCPUs a spec may ask for.
pub const MAX_VCPUS: u32 = 512;
/// Most memory a spec may ask for (16 TiB).
pub const MAX_MEMORY_MIB: u64 = 16 * 1024 * 1024;

/// One VM as the host agent runs it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// Stable identity: `[A-Za-z0-9._-]`, at most [`MAX_VM_ID_LEN`] bytes,
    /// not starting with `.`. Names the VM's run directory.
    pub id: String,
    /// Human-readable name (the guest name for qemu).
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub kind: VmKind,
    /// Directory for this VM's logs (console, stderr), created if missing;
    /// `None`: the VM's run directory.
    pub log_dir: Option<PathBuf>,
}

/// What runs: a plain process or a qemu guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmKind {
    /// A command run as the VM's workload. `vcpus` and `memory_mib` are
    /// recorded but not enforced (that needs cgroups).
    Process {
        /// Program and arguments; a program without `/` is looked up in the
        /// workload's `PATH`.
        command: Vec<String>,
        /// The workload's environment on top of a minimal one (see
        /// [`crate::process`]); not inherited from the agent.
        env: BTreeMap<String, String>,
        /// Working directory; `None`: the VM's run directory.
        cwd: Option<PathBuf>,
    },
    /// A qemu-system-x86_64 guest booted from a kernel (and initrd).
    Qemu {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        /// The kernel command line.
        append: String,
        /// virtio disks, in order (`/dev/vda`, `/dev/vdb`, ...).
        disks: Vec<Disk>,
        /// More qemu arguments, appended as given. Arguments the driver
        /// manages itself (QMP, pidfile, serial, daemonize…) are refused.
        extra_args: Vec<String>,
        /// Resume from this checkpoint (see `QemuDriver::checkpoint`)
        /// instead of booting: the guest goes on where it was.
        #[serde(default)]
        restore_from: Option<PathBuf>,
    },
}

/// A virtio disk of a qemu guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    pub source: DiskSource,
    pub read_only: bool,
}

/// Where a disk's bytes come from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskSource {
    /// A local raw image file (or block device).
    Path(PathBuf),
    /// An NBD export as qemu spells it: `nbd://host:port/export`,
    /// `nbd+unix:///export?socket=/path`, or the older `nbd:host:port`.
    Nbd(String),
    /// A qcow2 overlay (writes land here) over a raw backing image that is
    /// only read, such as a VM's layer in Locus over the host's cached
    /// master. The backing path given here wins over the one recorded in
    /// the overlay, so any host can open the overlay on its own cache.
    Overlay { overlay: PathBuf, backing: PathBuf },
}

/// How a VM's process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitCode {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
    /// It ended while no driver instance was its parent (the agent that
    /// started it restarted since), so nobody could collect its status.
    Unknown,
}

impl fmt::Display for ExitCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitCode::Code(c) => write!(f, "exit code {c}"),
            ExitCode::Signal(s) => write!(f, "killed by signal {s}"),
            ExitCode::Unknown => f.write_str("exit code unknown: it ended while the agent was not its parent"),
        }
    }
}

/// A VM's state as its driver observes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    Running,
    Paused,
    /// The VM ended: the workload exited, the guest powered off, or it was
    /// stopped or killed.
    Stopped {
        exit_code: ExitCode,
    },
    /// The VM could not start, or ended in error (qemu failed, the guest
    /// kernel panicked); the reason says which.
    Failed(String),
}

impl VmState {
    /// True while the VM's process exists (running or paused).
    pub fn is_live(&self) -> bool {
        matches!(self, VmState::Running | VmState::Paused)
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmState::Running => f.write_str("running"),
            VmState::Paused => f.write_str("paused"),
            VmState::Stopped { exit_code } => write!(f, "stopped ({exit_code})"),
            VmState::Failed(reason) => write!(f, "failed: {reason}"),
        }
    }
}

/// What [`Driver::start`] returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmHandle {
    pub id: String,
    /// The VM's process (qemu for the qemu driver); also its process group.
    pub pid: u32,
    /// The VM's run directory.
    pub run_dir: PathBuf,
    /// False when the VM was already running and `start` left it alone.
    pub started: bool,
}

/// One VM found in a driver's run directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmInfo {
    pub id: String,
    pub name: String,
    /// The VM's process while it is live.
    pub pid: Option<u32>,
    /// Its state, or why it could not be read (e.g. QMP did not answer); a
    /// caller should ask [`Driver::status`] again before acting on an error.
    pub state: Result<VmState, String>,
    pub run_dir: PathBuf,
}

/// Where a VM's logs are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmLogs {
    /// The workload's stdout (process) or the guest's serial console (qemu).
    pub console: PathBuf,
    /// The workload's stderr (process) or qemu's own messages (qemu).
    pub stderr: PathBuf,
}

/// Errors of the VM drivers. Each names the VM (or the run directory).
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("vm {vm}: invalid spec: {reason}")]
    InvalidSpec { vm: String, reason: String },
    #[error("vm {vm}: not found")]
    NotFound { vm: String },
    #[error("vm {vm}: belongs to the {owner} driver, not {driver}")]
    WrongDriver { vm: String, driver: &'static str, owner: String },
    #[error("vm {vm}: the {driver} driver cannot {op}")]
    Unsupported { vm: String, driver: &'static str, op: &'static str },
    #[error("vm {vm}: cannot {op} while {state}")]
    InvalidState { vm: String, op: &'static str, state: VmState },
    #[error("vm {vm}: already running with a different spec")]
    SpecConflict { vm: String },
    #[error("vm {vm}: spawn {program}")]
    Spawn {
        vm: String,
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("vm {vm}: did not start: {reason}")]
    StartFailed { vm: String, reason: String },
    #[error("vm {vm}: {op} timed out after {timeout_ms} ms")]
    Timeout { vm: String, op: &'static str, timeout_ms: u64 },
    #[error("vm {vm}: {action} {}", path.display())]
    Io {
        vm: String,
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("read run directory {}", path.display())]
    RunDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("vm {vm}: corrupt state file {}: {reason}", path.display())]
    CorruptState { vm: String, path: PathBuf, reason: String },
    #[error("vm {vm}: send signal {signal}")]
    Signal {
        vm: String,
        signal: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("vm {vm}: qmp {command}")]
    Qmp {
        vm: String,
        command: &'static str,
        #[source]
        source: crate::qmp::QmpError,
    },
}

/// A hypervisor driver: starts, observes and ends the VMs of one kind under
/// one run directory.
///
/// Every call is idempotent where that makes sense (`start` of a running VM,
/// `stop` of a stopped one, `pause` of a paused one) and every wait inside a
/// call is bounded. Ids are validated on every call, so no call touches a
/// path outside the run directory.
pub trait Driver: Send + Sync {
    /// The driver's name: `process` or `qemu`.
    fn name(&self) -> &'static str;

    /// The directory holding one subdirectory per VM.
    fn run_dir(&self) -> &Path;

    /// Starts the VM. If it already runs (or is paused) with the same spec,
    /// returns its handle with `started: false` and leaves it alone; with a
    /// different spec, fails with [`DriverError::SpecConflict`]. A stopped or
    /// failed VM is started again.
    fn start(&self, spec: &VmSpec) -> impl Future<Output = Result<VmHandle, DriverError>> + Send;

    /// The VM's current state.
    fn status(&self, id: &str) -> impl Future<Output = Result<VmState, DriverError>> + Send;

    /// Asks the VM to end (SIGTERM, or an ACPI power-off for a guest), waits
    /// up to `grace`, then forces it. Returns the final state; a VM already
    /// ended just returns its state.
    fn stop(&self, id: &str, grace: Duration) -> impl Future<Output = Result<VmState, DriverError>> + Send;

    /// Kills the VM at once (SIGKILL to its process group): fencing. Returns
    /// once the process is gone, or fails with a timeout if the kernel has
    /// not ended it within a few seconds.
    fn kill(&self, id: &str) -> impl Future<Output = Result<VmState, DriverError>> + Send;

    /// Freezes the VM; its memory and disks stay as they are.
    fn pause(&self, id: &str) -> impl Future<Output = Result<(), DriverError>> + Send {
        let err = DriverError::Unsupported { vm: id.to_owned(), driver: self.name(), op: "pause" };
        async move { Err(err) }
    }

    /// Continues a paused VM.
    fn resume(&self, id: &str) -> impl Future<Output = Result<(), DriverError>> + Send {
        let err = DriverError::Unsupported { vm: id.to_owned(), driver: self.name(), op: "resume" };
        async move { Err(err) }
    }

    /// Every VM in the run directory that belongs to this driver, live or
    /// ended, sorted by id. A VM whose state cannot be read is listed with
    /// the error.
    fn list(&self) -> impl Future<Output = Result<Vec<VmInfo>, DriverError>> + Send;

    /// Where the VM's logs are.
    fn logs(&self, id: &str) -> Result<VmLogs, DriverError>;

    /// Deletes an ended VM's run directory (not a separate `log_dir`).
    fn remove(&self, id: &str) -> impl Future<Output = Result<(), DriverError>> + Send;
}

/// Checks a VM id: it names a directory, so it must be a plain file name.
pub fn validate_id(id: &str) -> Result<(), DriverError> {
    let bad = |reason: &str| Err(DriverError::InvalidSpec { vm: id.to_owned(), reason: reason.to_owned() });
    if id.is_empty() {
        return bad("id is empty");
    }
    if id.len() > MAX_VM_ID_LEN {
        return bad(&format!("id is longer than {MAX_VM_ID_LEN} bytes"));
    }
    if id.starts_with('.') {
        return bad("id starts with '.'");
    }
    if !id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
        return bad("id may only hold A-Z, a-z, 0-9, '.', '_' and '-'");
    }
    Ok(())
}

/// Checks what every driver needs of a spec: id, name, vCPUs, memory.
pub fn validate_common(spec: &VmSpec) -> Result<(), DriverError> {
    validate_id(&spec.id)?;
    let bad = |reason: String| Err(DriverError::InvalidSpec { vm: spec.id.clone(), reason });
    if spec.name.is_empty() {
        return bad("name is empty".into());
    }
    if spec.name.len() > MAX_VM_NAME_LEN {
        return bad(format!("name is longer than {MAX_VM_NAME_LEN} bytes"));
    }
    if spec.name.chars().any(char::is_control) {
        return bad("name holds a control character".into());
    }
    if spec.vcpus == 0 || spec.vcpus > MAX_VCPUS {
        return bad(format!("vcpus is {}, must be 1 to {MAX_VCPUS}", spec.vcpus));
    }
    if spec.memory_mib == 0 || spec.memory_mib > MAX_MEMORY_MIB {
        return bad(format!("memory_mib is {}, must be 1 to {MAX_MEMORY_MIB}", spec.memory_mib));
    }
    if let Some(dir) = &spec.log_dir {
        if !dir.is_absolute() {
            return bad(format!("log_dir {} is not absolute", dir.display()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        VmSpec {
            id: "vm-1".into(),
            name: "web".into(),
            vcpus: 1,
            memory_mib: 64,
            kind: VmKind::Process { command: vec!["true".into()], env: BTreeMap::new(), cwd: None },
            log_dir: None,
        }
    }

    #[test]
    fn ids_are_plain_file_names() {
        for ok in ["a", "vm-1", "web_2.blue", &"x".repeat(MAX_VM_ID_LEN)] {
            assert!(validate_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", ".hidden", "a/b", "a b", "é", &"x".repeat(MAX_VM_ID_LEN + 1)] {
            assert!(matches!(validate_id(bad), Err(DriverError::InvalidSpec { .. })), "{bad:?}");
        }
    }

    #[test]
    fn common_checks_name_the_field() {
        let mut s = spec();
        s.memory_mib = 0;
        let e = validate_common(&s).unwrap_err().to_string();
        assert!(e.contains("vm vm-1") && e.contains("memory_mib is 0"), "{e}");
        let mut s = spec();
        s.vcpus = 0;
        assert!(validate_common(&s).unwrap_err().to_string().contains("vcpus is 0"));
        let mut s = spec();
        s.name = String::new();
        assert!(validate_common(&s).unwrap_err().to_string().contains("name is empty"));
        let mut s = spec();
        s.log_dir = Some("relative".into());
        assert!(validate_common(&s).unwrap_err().to_string().contains("not absolute"));
        assert!(validate_common(&spec()).is_ok());
    }

    #[test]
    fn states_read_well() {
        assert_eq!(VmState::Stopped { exit_code: ExitCode::Code(3) }.to_string(), "stopped (exit code 3)");
        assert!(VmState::Stopped { exit_code: ExitCode::Unknown }.to_string().contains("unknown"));
        assert_eq!(VmState::Failed("boom".into()).to_string(), "failed: boom");
        assert!(VmState::Paused.is_live() && !VmState::Failed(String::new()).is_live());
    }
}
