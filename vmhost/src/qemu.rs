//! The qemu driver: each VM is a qemu-system-x86_64 process booting a
//! kernel (and initrd) with virtio disks from files or NBD exports.
//!
//! qemu runs in its own session with `-accel kvm` when [`probe_accel`] finds
//! KVM usable and `-accel tcg` otherwise, `-nodefaults -nographic`, the
//! serial console in `console.log`, its own messages in `qemu.log`,
//! `-no-reboot` (a guest reboot ends the VM), a pvpanic device with
//! `-action panic=exit-failure` (a guest kernel panic ends qemu with an
//! error, so the VM shows as failed), QMP on `qmp.sock` and a pidfile
//! `qemu.pid` in the VM's run directory.
//!
//! Pause and resume are QMP `stop` and `cont`; status is `query-status`.
//! Stop asks the guest to power off (`system_powerdown`, an ACPI power-button
//! press), waits the grace period, then QMP `quit`, then SIGKILL. A paused
//! guest cannot see the button, so stopping a paused VM goes to `quit` at
//! once rather than resuming a guest someone froze.
//!
//! After an agent restart a new driver finds each qemu by `instance.json`,
//! or by the pidfile if the agent died before writing it, and controls it
//! through its QMP socket.

use std::ffi::OsString;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::driver::{
    validate_common, Disk, DiskSource, Driver, DriverError, ExitCode, VmHandle, VmInfo, VmKind, VmLogs, VmSpec, VmState,
};
use crate::procfs;
use crate::qmp::{Qmp, QmpError, QMP_TIMEOUT};
use crate::rundir::{self, Instance, Observed, Prepared, RunDir, KILL_TIMEOUT, POLL_INTERVAL};

/// How long a new qemu may take to answer on QMP.
pub const QEMU_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `status` waits for a qemu whose QMP fails to finish exiting.
pub const EXITING_WAIT: Duration = Duration::from_secs(2);
/// How long qemu may take to exit after QMP `quit`.
pub const QUIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Least memory a guest may have.
pub const MIN_QEMU_MEMORY_MIB: u64 = 16;
/// Longest unix socket path (`sun_path` holds 108 bytes with the NUL).
pub const MAX_SOCKET_PATH: usize = 107;
/// How long writing a checkpoint may take.
pub const CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(300);

/// `s` as one word for /bin/sh.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Arguments the driver sets itself; a spec's `extra_args` may not hold them.
pub const MANAGED_ARGS: &[&str] = &[
    "-daemonize",
    "-pidfile",
    "-qmp",
    "-qmp-pretty",
    "-monitor",
    "-mon",
    "-serial",
    "-S",
    "-no-shutdown",
    "-accel",
    "-incoming",
];

const CONSOLE_LOG: &str = "console.log";
const QEMU_LOG: &str = "qemu.log";
const QMP_SOCKET: &str = "qmp.sock";
const PIDFILE: &str = "qemu.pid";
/// How much of the end of a log a failure reason is looked for in.
const LOG_TAIL_BYTES: u64 = 16 * 1024;

/// The accelerator qemu runs guests with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

/// KVM is usable when `/dev/kvm` opens read-write and the CPU has hardware
/// virtualization (vmx or svm); otherwise TCG.
pub fn probe_accel() -> Accel {
    let opens = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    accel_for(opens, &cpuinfo)
}

/// The decision of [`probe_accel`] from what it read.
pub fn accel_for(dev_kvm_opens: bool, cpuinfo: &str) -> Accel {
    let virt = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_ascii_whitespace().any(|f| f == "vmx" || f == "svm"));
    if dev_kvm_opens && virt {
        Accel::Kvm
    } else {
        Accel::Tcg
    }
}

/// Which qemu and how to accelerate it.
#[derive(Clone, Debug)]
pub struct QemuConfig {
    /// The qemu binary, looked up in `PATH` if it has no `/`.
    pub binary: PathBuf,
    /// `None`: [`probe_accel`] decides.
    pub accel: Option<Accel>,
}

impl Default for QemuConfig {
    fn default() -> Self {
        QemuConfig { binary: "qemu-system-x86_64".into(), accel: None }
    }
}

/// Runs qemu guests as VMs. Cheap to clone; all state is in the run
/// directory.
#[derive(Clone, Debug)]
pub struct QemuDriver {
    run: RunDir,
    binary: PathBuf,
    accel: Accel,
}

impl QemuDriver {
    /// A driver with the default qemu and a KVM probe.
    pub fn new(run_dir: impl Into<PathBuf>) -> Self {
        Self::with_config(run_dir, QemuConfig::default())
    }

    pub fn with_config(run_dir: impl Into<PathBuf>, config: QemuConfig) -> Self {
        let accel = config.accel.unwrap_or_else(probe_accel);
        QemuDriver { run: RunDir::new(run_dir.into(), "qemu"), binary: config.binary, accel }
    }

    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// Checks a spec without starting anything: paths absolute and present,
    /// NBD URIs well-formed, no argument the driver manages.
    pub fn validate(spec: &VmSpec) -> Result<(), DriverError> {
        validate_common(spec)?;
        let bad = |reason: String| Err(DriverError::InvalidSpec { vm: spec.id.clone(), reason });
        let VmKind::Qemu { kernel, initrd, append, disks, extra_args, restore_from } = &spec.kind else {
            return bad("not a qemu spec (kind is process)".into());
        };
        if let Some(p) = restore_from {
            if !p.is_absolute() || !p.is_file() {
                return bad(format!("restore_from {} is not an absolute path to a checkpoint", p.display()));
            }
        }
        if spec.memory_mib < MIN_QEMU_MEMORY_MIB {
            return bad(format!("memory_mib is {}, a guest needs at least {MIN_QEMU_MEMORY_MIB}", spec.memory_mib));
        }
        let file = |what: &str, p: &Path| -> Result<(), DriverError> {
            if !p.is_absolute() {
                return bad(format!("{what} {} is not an absolute path", p.display()));
            }
            if !p.is_file() {
                return bad(format!("{what} {} does not exist or is not a file", p.display()));
            }
            Ok(())
        };
        file("kernel", kernel)?;
        if let Some(initrd) = initrd {
            file("initrd", initrd)?;
        }
        if append.chars().any(char::is_control) {
            return bad("append holds a control character".into());
        }
        for (i, disk) in disks.iter().enumerate() {
            match &disk.source {
                DiskSource::Path(p) => {
                    if !p.is_absolute() {
                        return bad(format!("disk {i}: {} is not an absolute path", p.display()));
                    }
                    if !p.exists() {
                        return bad(format!("disk {i}: {} does not exist", p.display()));
                    }
                }
                DiskSource::Overlay { overlay, backing } => {
                    for (what, p) in [("overlay", overlay), ("backing image", backing)] {
                        if !p.is_absolute() {
                            return bad(format!("disk {i}: {what} {} is not an absolute path", p.display()));
                        }
                        if !p.exists() {
                            return bad(format!("disk {i}: {what} {} does not exist", p.display()));
                        }
                    }
                }
                DiskSource::Nbd(uri) => {
                    let known = ["nbd://", "nbd+tcp://", "nbd+unix://", "nbd:"];
                    if !known.iter().any(|k| uri.starts_with(k)) || uri.chars().any(char::is_control) {
                        return bad(format!("disk {i}: {uri:?} is not an NBD URI (nbd://host:port/export, nbd+unix:///export?socket=PATH)"));
                    }
                }
            }
        }
        for a in extra_args {
            if MANAGED_ARGS.contains(&a.as_str()) || MANAGED_ARGS.iter().any(|m| a.starts_with(&format!("{m}="))) {
                return bad(format!("extra_args: {a} is set by the driver"));
            }
        }
        Ok(())
    }

    fn log_paths(&self, spec: &VmSpec) -> Result<VmLogs, DriverError> {
        let dir = match &spec.log_dir {
            Some(d) => d.clone(),
            None => self.run.vm_dir(&spec.id)?,
        };
        Ok(VmLogs { console: dir.join(CONSOLE_LOG), stderr: dir.join(QEMU_LOG) })
    }

    fn qmp_path(&self, id: &str) -> Result<PathBuf, DriverError> {
        Ok(self.run.vm_dir(id)?.join(QMP_SOCKET))
    }

    async fn qmp(&self, id: &str, command: &'static str) -> Result<Qmp, DriverError> {
        Qmp::connect(&self.qmp_path(id)?, QMP_TIMEOUT).await.map_err(|source| DriverError::Qmp {
            vm: id.to_owned(),
            command,
            source,
        })
    }

    /// Runs one QMP command on a fresh connection.
    async fn qmp_execute(&self, id: &str, command: &'static str) -> Result<(), DriverError> {
        let mut qmp = self.qmp(id, command).await?;
        qmp.execute(command, None).await.map_err(|source| DriverError::Qmp { vm: id.to_owned(), command, source })?;
        Ok(())
    }

    async fn query_status(&self, id: &str) -> Result<VmState, DriverError> {
        let mut qmp = self.qmp(id, "query-status").await?;
        let st = qmp.query_status().await.map_err(|source| DriverError::Qmp {
            vm: id.to_owned(),
            command: "query-status",
            source,
        })?;
        Ok(match st.status.as_str() {
            "running" => VmState::Running,
            "guest-panicked" => VmState::Failed("the guest kernel panicked".into()),
            "internal-error" => VmState::Failed("qemu hit an internal error".into()),
            "io-error" => VmState::Failed("the guest stopped on a disk I/O error".into()),
            "shutdown" => VmState::Running, // powering off: qemu exits next
            _ if st.running => VmState::Running,
            _ => VmState::Paused,
        })
    }

    /// Finds the instance: `instance.json`, else the pidfile of a qemu
    /// whose command line names this VM's QMP socket (the agent died between
    /// spawning qemu and recording it).
    fn adopt(&self, id: &str) -> Result<(), DriverError> {
        if self.run.instance(id)?.is_some() {
            return Ok(());
        }
        let dir = self.run.vm_dir(id)?;
        let Ok(text) = std::fs::read_to_string(dir.join(PIDFILE)) else { return Ok(()) };
        let Ok(pid) = text.trim().parse::<u32>() else { return Ok(()) };
        let sock = self.qmp_path(id)?;
        let ours = procfs::read_cmdline(pid)
            .map(|args| args.iter().any(|a| a.contains(&*escape(sock.as_os_str().to_string_lossy().as_ref()))))
            .unwrap_or(false);
        let Ok(Some(stat)) = procfs::read_stat(pid) else { return Ok(()) };
        if !ours || stat.has_ended() {
            return Ok(());
        }
        let instance =
            Instance { pid, start_ticks: stat.start_ticks, boot_id: procfs::boot_id().to_owned(), started_unix_ms: 0 };
        tracing::info!(vm = %id, pid, "adopted from the pidfile");
        self.run.record_instance(id, &instance)
    }

    async fn state_of(&self, id: &str) -> Result<(VmState, Option<u32>), DriverError> {
        let spec = self.run.load_spec(id)?;
        self.adopt(id)?;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let instance = match self.run.observe(id).await? {
                Observed::Live { instance } => instance,
                Observed::Ended { exit } => return Ok((self.ended_state(&spec, exit), None)),
                Observed::Failed(reason) => return Ok((VmState::Failed(reason), None)),
                Observed::Interrupted => {
                    return Ok((VmState::Failed("a start was interrupted before qemu was recorded".into()), None))
                }
            };
            match self.query_status(id).await {
                Ok(state) => return Ok((state, Some(instance.pid))),
                // qemu closes QMP while it exits: if it is exiting, report
                // how it ended rather than the broken connection.
                Err(e) => {
                    if attempts > 1 || !rundir::wait_ended(id, &instance, EXITING_WAIT).await? {
                        return Err(e);
                    }
                }
            }
        }
    }

    /// qemu exits 0 when the guest powers off or on `quit`; anything else is
    /// a failure, explained from qemu's messages or the console.
    fn ended_state(&self, spec: &VmSpec, exit: ExitCode) -> VmState {
        match exit {
            ExitCode::Code(code) if code != 0 => VmState::Failed(self.failure_reason(spec, code)),
            exit => VmState::Stopped { exit_code: exit },
        }
    }

    fn failure_reason(&self, spec: &VmSpec, code: i32) -> String {
        let Ok(logs) = self.log_paths(spec) else { return format!("qemu exited with code {code}") };
        let console = tail(&logs.console);
        if let Some(panic) = console.lines().find(|l| l.contains("Kernel panic")) {
            let panic = panic.find("Kernel panic").map_or(panic, |i| &panic[i..]);
            return format!("the guest kernel panicked: {}", panic.trim());
        }
        let qemu = tail(&logs.stderr);
        let last: Vec<&str> = qemu.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        match last.len() {
            0 => format!("qemu exited with code {code}"),
            n => format!("qemu exited with code {code}: {}", last[n.saturating_sub(3)..].join(" / ")),
        }
    }

    /// The qemu command line for a spec.
    pub fn command_line(&self, spec: &VmSpec, vm_dir: &Path, logs: &VmLogs) -> Result<Vec<OsString>, DriverError> {
        let VmKind::Qemu { kernel, initrd, append, disks, extra_args, restore_from } = &spec.kind else {
            return Err(DriverError::InvalidSpec { vm: spec.id.clone(), reason: "not a qemu spec".into() });
        };
        fn opt(args: &mut Vec<OsString>, name: &str, value: impl Into<OsString>) {
            args.push(name.into());
            args.push(value.into());
        }
        let path = |p: &Path| escape(&p.to_string_lossy());
        let mut args: Vec<OsString> = Vec::new();
        opt(&mut args, "-name", format!("guest={},debug-threads=on", escape(&spec.name)));
        match self.accel {
            Accel::Kvm => {
                opt(&mut args, "-accel", "kvm");
                opt(&mut args, "-cpu", "host");
            }
            Accel::Tcg => opt(&mut args, "-accel", "tcg"),
        }
        opt(&mut args, "-smp", spec.vcpus.to_string());
        opt(&mut args, "-m", format!("{}M", spec.memory_mib));
        args.extend(["-nodefaults", "-nographic", "-no-reboot"].map(OsString::from));
        opt(&mut args, "-chardev", format!("file,id=console,path={}", path(&logs.console)));
        opt(&mut args, "-serial", "chardev:console");
        let qmp = path(&vm_dir.join(QMP_SOCKET));
        opt(&mut args, "-chardev", format!("socket,id=qmp,path={qmp},server=on,wait=off"));
        opt(&mut args, "-mon", "chardev=qmp,mode=control");
        opt(&mut args, "-pidfile", vm_dir.join(PIDFILE));
        opt(&mut args, "-device", "pvpanic");
        opt(&mut args, "-action", "panic=exit-failure");
        opt(&mut args, "-kernel", kernel);
        if let Some(initrd) = initrd {
            opt(&mut args, "-initrd", initrd);
        }
        opt(&mut args, "-append", append);
        for Disk { source, read_only } in disks {
            let ro = if *read_only { ",readonly=on" } else { "" };
            let drive = match source {
                DiskSource::Path(p) => format!("file={},format=raw,if=virtio{ro}", path(p)),
                DiskSource::Nbd(uri) => format!("file={},format=raw,if=virtio{ro}", escape(uri)),
                DiskSource::Overlay { overlay, backing } => format!(
                    "file={},format=qcow2,if=virtio,backing.driver=raw,backing.file.filename={}{ro}",
                    path(overlay),
                    path(backing)
                ),
            };
            opt(&mut args, "-drive", drive);
        }
        if let Some(p) = restore_from {
            opt(&mut args, "-incoming", format!("exec:cat {}", shell_quote(&p.to_string_lossy())));
        }
        args.extend(extra_args.iter().map(OsString::from));
        Ok(args)
    }

    /// Waits until a fresh qemu answers on QMP; on failure it is ended and
    /// the reason recorded.
    async fn await_qmp(&self, spec: &VmSpec, instance: &Instance) -> Result<(), DriverError> {
        let id = spec.id.as_str();
        let sock = self.qmp_path(id)?;
        let deadline = tokio::time::Instant::now() + QEMU_START_TIMEOUT;
        let reason = loop {
            if rundir::live_stat(id, instance)?.is_none() {
                // Ended during startup: its exit status and messages say why.
                break match self.run.observe(id).await? {
                    // It ran and the guest powered off already: not a failure.
                    Observed::Ended { exit: ExitCode::Code(0) } => return Ok(()),
                    Observed::Ended { exit: ExitCode::Code(code) } => self.failure_reason(spec, code),
                    Observed::Ended { exit } => format!("qemu ended during startup ({exit})"),
                    other => format!("qemu ended during startup ({other:?})"),
                };
            }
            if sock.exists() {
                match Qmp::connect(&sock, QMP_TIMEOUT).await {
                    Ok(mut qmp) => match qmp.query_status().await {
                        Ok(_) => return Ok(()),
                        Err(e) => tracing::debug!(vm = %id, error = %e, "qmp not ready"),
                    },
                    Err(QmpError::Connect { .. }) => {}
                    Err(e) => tracing::debug!(vm = %id, error = %e, "qmp not ready"),
                }
            }
            if tokio::time::Instant::now() >= deadline {
                rundir::signal_group(id, instance, Signal::SIGKILL)?;
                rundir::wait_ended(id, instance, KILL_TIMEOUT).await?;
                break format!("qemu did not answer on QMP within {} s", QEMU_START_TIMEOUT.as_secs());
            }
            tokio::time::sleep(POLL_INTERVAL * 5).await;
        };
        self.run.record_failure(id, &reason)?;
        Err(DriverError::StartFailed { vm: id.to_owned(), reason })
    }

    /// The live instance, or `None` if the VM has ended.
    async fn live_instance(&self, id: &str) -> Result<Option<Instance>, DriverError> {
        self.run.load_spec(id)?;
        self.adopt(id)?;
        Ok(match self.run.observe(id).await? {
            Observed::Live { instance, .. } => Some(instance),
            _ => None,
        })
    }

    async fn kill_and_wait(&self, id: &str, instance: &Instance) -> Result<VmState, DriverError> {
        rundir::signal_group(id, instance, Signal::SIGKILL)?;
        if !rundir::wait_ended(id, instance, KILL_TIMEOUT).await? {
            return Err(DriverError::Timeout {
                vm: id.to_owned(),
                op: "kill",
                timeout_ms: KILL_TIMEOUT.as_millis() as u64,
            });
        }
        rundir::sweep_group(instance);
        self.status(id).await
    }

    /// Saves the guest's whole state (memory and devices; its disks stay
    /// where they are) to `path`, with the guest paused meanwhile so disks
    /// and memory agree; then it runs on if it was running. Start a VM with
    /// `restore_from: Some(path)` (and the same disks) to resume it there.
    /// Returns the checkpoint's size.
    pub async fn checkpoint(&self, id: &str, path: &Path) -> Result<u64, DriverError> {
        self.checkpoint_with(id, path, || async { Ok(()) }).await
    }

    /// [`Self::checkpoint`], running `while_paused` once the state is saved
    /// and before the guest runs on (to snapshot its disks at the same
    /// instant, say). Its error fails the checkpoint; the guest runs on.
    pub async fn checkpoint_with<F, Fut>(&self, id: &str, path: &Path, while_paused: F) -> Result<u64, DriverError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<(), String>>,
    {
        let op = "checkpoint";
        if self.live_instance(id).await?.is_none() {
            return Err(DriverError::InvalidState { vm: id.to_owned(), op, state: self.status(id).await? });
        }
        let was_running = self.query_status(id).await? == VmState::Running;
        let qerr = |command: &'static str| move |source| DriverError::Qmp { vm: id.to_owned(), command, source };
        let mut qmp = self.qmp(id, "migrate").await?;
        qmp.execute("stop", None).await.map_err(qerr("stop"))?;
        let tmp = path.with_extension("part");
        let uri = format!("exec:cat > {}", shell_quote(&tmp.to_string_lossy()));
        qmp.execute("migrate", Some(serde_json::json!({ "uri": uri }))).await.map_err(qerr("migrate"))?;
        let deadline = tokio::time::Instant::now() + CHECKPOINT_TIMEOUT;
        let outcome = loop {
            let v = qmp.execute("query-migrate", None).await.map_err(qerr("query-migrate"))?;
            match v.get("status").and_then(serde_json::Value::as_str) {
                Some("completed") => break Ok(()),
                Some("failed") | Some("cancelled") => {
                    let why = v.get("error-desc").and_then(serde_json::Value::as_str).unwrap_or("migration failed");
                    break Err(why.to_string());
                }
                _ if tokio::time::Instant::now() > deadline => {
                    let _ = qmp.execute("migrate_cancel", None).await;
                    break Err(format!("not done after {CHECKPOINT_TIMEOUT:?}"));
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let outcome = match outcome {
            Ok(()) => while_paused().await,
            Err(e) => Err(e),
        };
        if was_running {
            qmp.execute("cont", None).await.map_err(qerr("cont"))?;
        }
        if let Err(reason) = outcome {
            let _ = std::fs::remove_file(&tmp);
            return Err(DriverError::StartFailed { vm: id.to_owned(), reason: format!("checkpoint: {reason}") });
        }
        let io = |action, source| DriverError::Io { vm: id.to_owned(), action, path: path.to_owned(), source };
        std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| io("sync", e))?;
        std::fs::rename(&tmp, path).map_err(|e| io("rename", e))?;
        let size = std::fs::metadata(path).map_err(|e| io("stat", e))?.len();
        tracing::info!(vm = %id, bytes = size, path = %path.display(), "checkpoint written");
        Ok(size)
    }

    /// A guest restored from a checkpoint comes up paused, as it was when
    /// saved: wait for the state to load, then let it run.
    async fn resume_restored(&self, id: &str) -> Result<(), DriverError> {
        let command = "query-status";
        let mut qmp = self.qmp(id, command).await?;
        let deadline = tokio::time::Instant::now() + CHECKPOINT_TIMEOUT;
        loop {
            let st =
                qmp.query_status().await.map_err(|source| DriverError::Qmp { vm: id.to_owned(), command, source })?;
            match st.status.as_str() {
                "inmigrate" | "prelaunch" if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                "inmigrate" | "prelaunch" => {
                    return Err(DriverError::Timeout {
                        vm: id.to_owned(),
                        op: "restore",
                        timeout_ms: CHECKPOINT_TIMEOUT.as_millis() as u64,
                    })
                }
                "running" => return Ok(()),
                _ => {
                    qmp.execute("cont", None).await.map_err(|source| DriverError::Qmp {
                        vm: id.to_owned(),
                        command: "cont",
                        source,
                    })?;
                    tracing::info!(vm = %id, "restored from its checkpoint and running");
                    return Ok(());
                }
            }
        }
    }

    async fn pause_or_resume(&self, id: &str, pause: bool) -> Result<(), DriverError> {
        let (op, command, want) =
            if pause { ("pause", "stop", VmState::Paused) } else { ("resume", "cont", VmState::Running) };
        if self.live_instance(id).await?.is_none() {
            return Err(DriverError::InvalidState { vm: id.to_owned(), op, state: self.status(id).await? });
        }
        self.qmp_execute(id, command).await?;
        let state = self.query_status(id).await?;
        if state != want {
            return Err(DriverError::InvalidState { vm: id.to_owned(), op, state });
        }
        tracing::info!(vm = %id, "{op}d");
        Ok(())
    }
}

impl Driver for QemuDriver {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn run_dir(&self) -> &Path {
        self.run.root()
    }

    async fn start(&self, spec: &VmSpec) -> Result<VmHandle, DriverError> {
        Self::validate(spec)?;
        let sock = self.qmp_path(&spec.id)?;
        if sock.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(DriverError::InvalidSpec {
                vm: spec.id.clone(),
                reason: format!(
                    "QMP socket path {} is longer than {MAX_SOCKET_PATH} bytes: use a shorter run directory",
                    sock.display()
                ),
            });
        }
        self.adopt(&spec.id)?;
        let guard = match self.run.prepare_start(spec).await? {
            Prepared::Running(handle) => return Ok(handle),
            Prepared::Fresh(guard) => guard,
        };
        for stale in [QMP_SOCKET, PIDFILE] {
            let _ = std::fs::remove_file(guard.vm_dir.join(stale));
        }
        let logs = self.log_paths(spec)?;
        // qemu opens the console file itself; rotate it and start it empty.
        drop(rundir::rotate_and_create(&spec.id, &logs.console)?);
        let qemu_log = rundir::rotate_and_create(&spec.id, &logs.stderr)?;
        let qemu_log2 = qemu_log.try_clone().map_err(|source| DriverError::Io {
            vm: spec.id.clone(),
            action: "open",
            path: logs.stderr.clone(),
            source,
        })?;

        let args = self.command_line(spec, &guard.vm_dir, &logs)?;
        let mut cmd = tokio::process::Command::new(&self.binary);
        cmd.args(&args).current_dir(&guard.vm_dir).stdin(Stdio::null()).stdout(qemu_log).stderr(qemu_log2);
        let program = self.binary.to_string_lossy().into_owned();
        let instance = match self.run.spawn(&spec.id, cmd, &program) {
            Ok(instance) => instance,
            Err(e) => {
                self.run.record_failure(&spec.id, &e.to_string())?;
                return Err(e);
            }
        };
        tracing::info!(vm = %spec.id, pid = instance.pid, accel = ?self.accel, "qemu started");
        self.await_qmp(spec, &instance).await?;
        if matches!(&spec.kind, VmKind::Qemu { restore_from: Some(_), .. }) {
            self.resume_restored(&spec.id).await?;
        }
        if let Ok(text) = std::fs::read_to_string(guard.vm_dir.join(PIDFILE)) {
            if text.trim() != instance.pid.to_string() {
                tracing::warn!(vm = %spec.id, pidfile = text.trim(), pid = instance.pid, "pidfile names another pid");
            }
        }
        Ok(VmHandle { id: spec.id.clone(), pid: instance.pid, run_dir: guard.vm_dir.clone(), started: true })
    }

    async fn status(&self, id: &str) -> Result<VmState, DriverError> {
        Ok(self.state_of(id).await?.0)
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<VmState, DriverError> {
        let Some(instance) = self.live_instance(id).await? else { return self.status(id).await };
        tracing::info!(vm = %id, grace_ms = grace.as_millis() as u64, "stopping");
        // Each step's failure (QMP not answering) moves on to the next,
        // harder one.
        if matches!(self.query_status(id).await, Ok(VmState::Running)) {
            match self.qmp_execute(id, "system_powerdown").await {
                Ok(()) => {
                    if rundir::wait_ended(id, &instance, grace).await? {
                        return self.status(id).await;
                    }
                    tracing::info!(vm = %id, "the guest did not power off within its grace period: quitting qemu");
                }
                Err(e) => tracing::warn!(vm = %id, error = %e, "system_powerdown failed"),
            }
        }
        match self.qmp_execute(id, "quit").await {
            // qemu may close the socket before it answers `quit`.
            Ok(()) | Err(DriverError::Qmp { source: QmpError::Closed, .. }) => {
                if rundir::wait_ended(id, &instance, QUIT_TIMEOUT).await? {
                    return self.status(id).await;
                }
                tracing::warn!(vm = %id, "qemu did not exit after quit: killing");
            }
            Err(e) => tracing::warn!(vm = %id, error = %e, "quit failed: killing"),
        }
        self.kill_and_wait(id, &instance).await
    }

    async fn kill(&self, id: &str) -> Result<VmState, DriverError> {
        match self.live_instance(id).await? {
            Some(instance) => {
                tracing::info!(vm = %id, "killing");
                self.kill_and_wait(id, &instance).await
            }
            None => self.status(id).await,
        }
    }

    async fn pause(&self, id: &str) -> Result<(), DriverError> {
        self.pause_or_resume(id, true).await
    }

    async fn resume(&self, id: &str) -> Result<(), DriverError> {
        self.pause_or_resume(id, false).await
    }

    async fn list(&self) -> Result<Vec<VmInfo>, DriverError> {
        self.run.list(|id| async move { self.state_of(&id).await }).await
    }

    fn logs(&self, id: &str) -> Result<VmLogs, DriverError> {
        self.log_paths(&self.run.load_spec(id)?)
    }

    async fn remove(&self, id: &str) -> Result<(), DriverError> {
        self.run.remove(id).await
    }
}

/// Escapes a value inside a qemu option list, where `,` separates options.
fn escape(value: &str) -> String {
    value.replace(',', ",,")
}

/// The last [`LOG_TAIL_BYTES`] of a file, lossy; empty if unreadable.
fn tail(path: &Path) -> String {
    let Ok(mut f) = std::fs::File::open(path) else { return String::new() };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)));
    let mut buf = Vec::new();
    let _ = f.take(LOG_TAIL_BYTES).read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn kvm_needs_the_device_and_the_cpu_flag() {
        let intel = "processor\t: 0\nflags\t\t: fpu vme vmx sse\n";
        let amd = "flags\t\t: fpu svm\n";
        let none = "flags\t\t: fpu vme sse hypervisor\n";
        assert_eq!(accel_for(true, intel), Accel::Kvm);
        assert_eq!(accel_for(true, amd), Accel::Kvm);
        assert_eq!(accel_for(true, none), Accel::Tcg);
        assert_eq!(accel_for(false, intel), Accel::Tcg);
        // "vmx" as part of another flag does not count.
        assert_eq!(accel_for(true, "flags : vmx_ept\n"), Accel::Tcg);
    }

    fn spec(kernel: PathBuf, disks: Vec<Disk>, extra: Vec<String>) -> VmSpec {
        VmSpec {
            id: "g1".into(),
            name: "guest,one".into(),
            vcpus: 2,
            memory_mib: 128,
            kind: VmKind::Qemu {
                kernel,
                initrd: None,
                append: "console=ttyS0".into(),
                disks,
                extra_args: extra,
                restore_from: None,
            },
            log_dir: None,
        }
    }

    #[test]
    fn command_line_escapes_commas_and_marks_read_only_disks() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinuz");
        std::fs::write(&kernel, b"k").unwrap();
        let disk = dir.path().join("a,b.img");
        std::fs::write(&disk, b"").unwrap();
        let disks = vec![
            Disk { source: DiskSource::Path(disk), read_only: false },
            Disk { source: DiskSource::Nbd("nbd+unix:///data?socket=/run/x.sock".into()), read_only: true },
        ];
        let s = spec(kernel, disks, vec!["-machine".into(), "q35".into()]);
        QemuDriver::validate(&s).unwrap();
        let d = QemuDriver::with_config(dir.path(), QemuConfig { binary: "qemu".into(), accel: Some(Accel::Tcg) });
        let vm_dir = dir.path().join("g1");
        let logs = d.log_paths(&s).unwrap();
        let args: Vec<String> =
            d.command_line(&s, &vm_dir, &logs).unwrap().into_iter().map(|a| a.into_string().unwrap()).collect();
        let joined = args.join(" ");
        assert!(joined.contains("-name guest=guest,,one,debug-threads=on"), "{joined}");
        assert!(joined.contains("-accel tcg -smp 2 -m 128M -nodefaults -nographic"), "{joined}");
        assert!(joined.contains("a,,b.img,format=raw,if=virtio "), "{joined}");
        assert!(
            joined.contains("file=nbd+unix:///data?socket=/run/x.sock,format=raw,if=virtio,readonly=on"),
            "{joined}"
        );
        assert!(joined.contains("-no-reboot") && joined.contains("-action panic=exit-failure"), "{joined}");
        assert!(joined.ends_with("-machine q35"), "{joined}");
    }

    #[test]
    fn specs_are_refused_with_the_field_and_reason() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinuz");
        std::fs::write(&kernel, b"k").unwrap();
        let check = |s: VmSpec, want: &str| {
            let e = QemuDriver::validate(&s).unwrap_err().to_string();
            assert!(e.contains(want), "{e} lacks {want}");
        };
        check(spec(dir.path().join("missing"), vec![], vec![]), "kernel");
        check(spec("vmlinuz".into(), vec![], vec![]), "not an absolute path");
        check(spec(kernel.clone(), vec![], vec!["-qmp".into()]), "-qmp is set by the driver");
        check(spec(kernel.clone(), vec![], vec!["-accel=kvm".into()]), "set by the driver");
        let nbd = vec![Disk { source: DiskSource::Nbd("http://x".into()), read_only: false }];
        check(spec(kernel.clone(), nbd, vec![]), "not an NBD URI");
        let mut s = spec(kernel.clone(), vec![], vec![]);
        s.memory_mib = 8;
        check(s, "at least 16");
        let mut s = spec(kernel, vec![], vec![]);
        s.kind = VmKind::Process { command: vec!["x".into()], env: BTreeMap::new(), cwd: None };
        check(s, "not a qemu spec");
    }
}
