//! The process driver: a command run as the VM's workload. For quick starts
//! and fast tests; the workload reaches its disk and data sets through Locus
//! (a mount or the client library), not through the driver.
//!
//! The command runs in its own session and process group, with stdin from
//! `/dev/null`, stdout and stderr in `stdout.log` and `stderr.log`, the VM's
//! run directory as working directory unless the spec names one, and a
//! minimal environment: `PATH`, `HOME` (the run directory), `LOCUS_VM_ID`,
//! `LOCUS_VM_NAME`, `LOCUS_VM_VCPUS`, `LOCUS_VM_MEMORY_MIB`, then the spec's
//! `env` (which may override them). Nothing is inherited from the agent.
//!
//! Pause and resume are SIGSTOP and SIGCONT to the group; the VM counts as
//! paused once some process of the group is stopped and none runs (the
//! leader's own state is not enough: a shell blocked in `vfork` on a stopped
//! child shows as `D`). Stop is SIGTERM to the group (and SIGCONT, so a
//! paused workload sees it), then SIGKILL after the grace period, then
//! SIGKILL to whatever is left of the group. A process that leaves the group
//! (`setsid`) escapes the driver: containing it needs cgroups.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::driver::{validate_common, Driver, DriverError, VmHandle, VmInfo, VmKind, VmLogs, VmSpec, VmState};
use crate::rundir::{self, Observed, Prepared, RunDir, KILL_TIMEOUT};

/// `PATH` of a workload whose spec does not set one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How long SIGSTOP or SIGCONT may take to show in the group's states.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

const STDOUT_LOG: &str = "stdout.log";
const STDERR_LOG: &str = "stderr.log";

/// Runs commands as VMs. Cheap to clone; all state is in the run directory.
#[derive(Clone, Debug)]
pub struct ProcessDriver {
    run: RunDir,
}

impl ProcessDriver {
    /// A driver keeping its VMs under `run_dir` (created on the first start).
    pub fn new(run_dir: impl Into<PathBuf>) -> Self {
        ProcessDriver { run: RunDir::new(run_dir.into(), "process") }
    }

    /// Checks a spec without starting anything.
    pub fn validate(spec: &VmSpec) -> Result<(), DriverError> {
        validate_common(spec)?;
        let bad = |reason: String| Err(DriverError::InvalidSpec { vm: spec.id.clone(), reason });
        let VmKind::Process { command, env, cwd } = &spec.kind else {
            return bad("not a process spec (kind is qemu)".into());
        };
        match command.first() {
            None => return bad("command is empty".into()),
            Some(program) if program.is_empty() => return bad("command's program is an empty string".into()),
            _ => {}
        }
        if command.iter().any(|a| a.contains('\0')) {
            return bad("command holds a NUL byte".into());
        }
        for (k, v) in env {
            if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                return bad(format!("env variable {k:?} is not a valid name=value"));
            }
        }
        if let Some(cwd) = cwd {
            if !cwd.is_absolute() {
                return bad(format!("cwd {} is not absolute", cwd.display()));
            }
            if !cwd.is_dir() {
                return bad(format!("cwd {} is not a directory", cwd.display()));
            }
        }
        Ok(())
    }

    fn log_paths(&self, spec: &VmSpec) -> Result<VmLogs, DriverError> {
        let dir = match &spec.log_dir {
            Some(d) => d.clone(),
            None => self.run.vm_dir(&spec.id)?,
        };
        Ok(VmLogs { console: dir.join(STDOUT_LOG), stderr: dir.join(STDERR_LOG) })
    }

    async fn state_of(&self, id: &str) -> Result<(VmState, Option<u32>), DriverError> {
        self.run.load_spec(id)?;
        Ok(match self.run.observe(id).await? {
            Observed::Live { instance, .. } => {
                let paused = rundir::group_paused(id, &instance)?;
                (if paused { VmState::Paused } else { VmState::Running }, Some(instance.pid))
            }
            Observed::Ended { exit } => (VmState::Stopped { exit_code: exit }, None),
            Observed::Failed(reason) => (VmState::Failed(reason), None),
            Observed::Interrupted => {
                (VmState::Failed("a start was interrupted before its process was recorded".into()), None)
            }
        })
    }

    /// Sends SIGSTOP or SIGCONT and waits until the process shows it.
    async fn freeze(&self, id: &str, stop: bool) -> Result<(), DriverError> {
        let op = if stop { "pause" } else { "resume" };
        self.run.load_spec(id)?;
        let instance = match self.run.observe(id).await? {
            Observed::Live { instance, .. } => instance,
            _ => return Err(DriverError::InvalidState { vm: id.to_owned(), op, state: self.status(id).await? }),
        };
        let signal = if stop { Signal::SIGSTOP } else { Signal::SIGCONT };
        rundir::signal_group(id, &instance, signal)?;
        let shown = rundir::wait_until(PAUSE_TIMEOUT, || {
            if rundir::live_stat(id, &instance)?.is_none() {
                return Ok(true);
            }
            Ok(rundir::group_paused(id, &instance)? == stop)
        })
        .await?;
        if !shown {
            return Err(DriverError::Timeout { vm: id.to_owned(), op, timeout_ms: PAUSE_TIMEOUT.as_millis() as u64 });
        }
        if rundir::live_stat(id, &instance)?.is_none() {
            return Err(DriverError::InvalidState { vm: id.to_owned(), op, state: self.status(id).await? });
        }
        tracing::info!(vm = %id, "{op}d");
        Ok(())
    }

    /// SIGKILL and wait; shared by `kill` and the end of `stop`.
    async fn kill_and_wait(&self, id: &str, instance: &rundir::Instance) -> Result<VmState, DriverError> {
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
}

impl Driver for ProcessDriver {
    fn name(&self) -> &'static str {
        "process"
    }

    fn run_dir(&self) -> &Path {
        self.run.root()
    }

    async fn start(&self, spec: &VmSpec) -> Result<VmHandle, DriverError> {
        Self::validate(spec)?;
        let VmKind::Process { command, env, cwd } = &spec.kind else {
            return Err(DriverError::InvalidSpec { vm: spec.id.clone(), reason: "not a process spec".into() });
        };
        let guard = match self.run.prepare_start(spec).await? {
            Prepared::Running(handle) => return Ok(handle),
            Prepared::Fresh(guard) => guard,
        };
        let logs = self.log_paths(spec)?;
        let stdout = rundir::rotate_and_create(&spec.id, &logs.console)?;
        let stderr = rundir::rotate_and_create(&spec.id, &logs.stderr)?;

        let mut cmd = tokio::process::Command::new(&command[0]);
        cmd.args(&command[1..])
            .env_clear()
            .env("PATH", DEFAULT_PATH)
            .env("HOME", &guard.vm_dir)
            .env("LOCUS_VM_ID", &spec.id)
            .env("LOCUS_VM_NAME", &spec.name)
            .env("LOCUS_VM_VCPUS", spec.vcpus.to_string())
            .env("LOCUS_VM_MEMORY_MIB", spec.memory_mib.to_string())
            .envs(env)
            .current_dir(cwd.as_deref().unwrap_or(&guard.vm_dir))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        let instance = match self.run.spawn(&spec.id, cmd, &command[0]) {
            Ok(instance) => instance,
            Err(e) => {
                self.run.record_failure(&spec.id, &e.to_string())?;
                return Err(e);
            }
        };
        tracing::info!(vm = %spec.id, pid = instance.pid, "started");
        Ok(VmHandle { id: spec.id.clone(), pid: instance.pid, run_dir: guard.vm_dir.clone(), started: true })
    }

    async fn status(&self, id: &str) -> Result<VmState, DriverError> {
        Ok(self.state_of(id).await?.0)
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<VmState, DriverError> {
        self.run.load_spec(id)?;
        let instance = match self.run.observe(id).await? {
            Observed::Live { instance, .. } => instance,
            _ => return self.status(id).await,
        };
        tracing::info!(vm = %id, grace_ms = grace.as_millis() as u64, "stopping");
        if rundir::signal_group(id, &instance, Signal::SIGTERM)? {
            rundir::signal_group(id, &instance, Signal::SIGCONT)?;
            if rundir::wait_ended(id, &instance, grace).await? {
                rundir::sweep_group(&instance);
                return self.status(id).await;
            }
            tracing::info!(vm = %id, "did not end within its grace period: killing");
        }
        self.kill_and_wait(id, &instance).await
    }

    async fn kill(&self, id: &str) -> Result<VmState, DriverError> {
        self.run.load_spec(id)?;
        match self.run.observe(id).await? {
            Observed::Live { instance, .. } => {
                tracing::info!(vm = %id, "killing");
                self.kill_and_wait(id, &instance).await
            }
            _ => self.status(id).await,
        }
    }

    async fn pause(&self, id: &str) -> Result<(), DriverError> {
        self.freeze(id, true).await
    }

    async fn resume(&self, id: &str) -> Result<(), DriverError> {
        self.freeze(id, false).await
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
