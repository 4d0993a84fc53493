//! The behaviour every VM driver must have, checked against each driver.
//!
//! `suite` holds the checks, written once against the [`Driver`] trait; a
//! [`Fixture`] supplies each driver and the specs its checks need (a VM that
//! runs until stopped, one that fails, one that cannot start, bad specs);
//! `driver_suite!` makes one test per check and driver (`process::…`,
//! `qemu::…`). Driver-specific tests follow at the end.
//!
//! The qemu tests boot a real tiny Linux under TCG (or KVM when usable):
//! Debian's cloud kernel and a busybox initramfs built and cached by
//! `scripts/test-kernel.sh`. They are skipped, loudly, only when
//! qemu-system-x86_64 is not installed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use vmhost::{
    Disk, DiskSource, Driver, DriverError, ExitCode, ProcessDriver, QemuDriver, VmKind, VmLogs, VmSpec, VmState,
};

/// Long enough for a TCG guest to boot on two busy cores.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

macro_rules! phase {
    ($($arg:tt)*) => { tracing::info!("== {}", format!($($arg)*)) };
}

fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".parse().expect("filter")),
        )
        .with_test_writer()
        .try_init();
}

/// What the shared checks need to know about a driver.
trait Fixture: Sized + Send + Sync + 'static {
    type D: Driver + Clone + 'static;
    /// The driver's name, also the test module's.
    const NAME: &'static str;
    /// `None`: the driver cannot run here (said loudly); the test passes.
    fn new() -> Option<Self>;
    fn driver(&self, run_dir: &Path) -> Self::D;
    /// A VM that runs until stopped; prints `ready_marker` on its console
    /// once up and `stop_marker` when asked to stop gracefully.
    fn long_running(&self, id: &str) -> VmSpec;
    fn ready_marker(&self) -> &'static str;
    fn stop_marker(&self) -> &'static str;
    /// A VM whose workload fails soon after it starts.
    fn failing(&self, id: &str) -> VmSpec;
    /// Asserts how the failing VM ended.
    fn check_failed(&self, state: &VmState, logs: &VmLogs);
    /// A VM that cannot start at all; the failure must mention `unstartable_reason`.
    fn unstartable(&self, id: &str) -> VmSpec;
    fn unstartable_reason(&self) -> &'static str;
    /// Specs the driver must refuse, each with a word its error must contain.
    fn bad_specs(&self, dir: &Path) -> Vec<(VmSpec, &'static str)>;
}

/// A run directory and a driver on it; on drop, kills whatever VM is still
/// live there, so a failed test leaves no process behind.
struct Env<F: Fixture> {
    fixture: F,
    driver: F::D,
    dir: TempDir,
}

impl<F: Fixture> Env<F> {
    fn new() -> Option<Self> {
        init_logging();
        let fixture = F::new()?;
        let dir = tempfile::tempdir().expect("tempdir");
        let driver = fixture.driver(&dir.path().join("run"));
        Some(Env { fixture, driver, dir })
    }

    fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }
}

impl<F: Fixture> Drop for Env<F> {
    fn drop(&mut self) {
        let d = self.driver.clone();
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            rt.block_on(async {
                for vm in d.list().await.unwrap_or_default() {
                    if vm.pid.is_some() {
                        eprintln!("cleanup: killing vm {} left running", vm.id);
                        let _ = d.kill(&vm.id).await;
                    }
                }
            });
        })
        .join();
    }
}

fn spec(id: &str, kind: VmKind) -> VmSpec {
    VmSpec { id: id.into(), name: format!("test {id}"), vcpus: 1, memory_mib: 128, kind, log_dir: None }
}

/// Polls the VM's state until `done` holds.
async fn wait_state<D: Driver>(d: &D, id: &str, timeout: Duration, done: impl Fn(&VmState) -> bool) -> VmState {
    let deadline = Instant::now() + timeout;
    loop {
        let state = d.status(id).await.unwrap_or_else(|e| panic!("status of {id}: {e}"));
        if done(&state) {
            return state;
        }
        assert!(Instant::now() < deadline, "vm {id}: still {state} after {timeout:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until a log holds `needle`.
async fn wait_log(path: &Path, needle: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
        if text.contains(needle) {
            return;
        }
        assert!(Instant::now() < deadline, "{} lacks {needle:?} after {timeout:?}:\n{text}", path.display());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn read_log(path: &Path) -> String {
    std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
}

mod suite {
    use super::*;

    /// Goal: the whole life of a VM through one driver. Method: start, start
    /// again (same handle), start with another spec (refused), pause twice,
    /// resume, stop while paused, restart the stopped VM, stop it running,
    /// remove it.
    pub async fn lifecycle<F: Fixture>() {
        let Some(env) = Env::<F>::new() else { return };
        let (d, f) = (&env.driver, &env.fixture);
        let vm = f.long_running("life");

        phase!("start: the VM runs");
        let h = d.start(&vm).await.expect("start");
        assert!(h.started && h.pid > 0 && h.run_dir.starts_with(env.run_dir()), "{h:?}");
        assert_eq!(d.status("life").await.expect("status"), VmState::Running);

        phase!("start again: the same VM, left alone");
        let again = d.start(&vm).await.expect("second start");
        assert_eq!((again.started, again.pid), (false, h.pid));

        phase!("start with another spec while it runs: refused");
        let mut other = vm.clone();
        other.memory_mib += 64;
        let e = d.start(&other).await.expect_err("conflicting start");
        assert!(matches!(e, DriverError::SpecConflict { .. }), "{e}");

        phase!("pause (twice: idempotent), then resume");
        d.pause("life").await.expect("pause");
        assert_eq!(d.status("life").await.expect("status"), VmState::Paused);
        d.pause("life").await.expect("pause again");
        assert!(!d.start(&vm).await.expect("start while paused").started);
        d.resume("life").await.expect("resume");
        assert_eq!(d.status("life").await.expect("status"), VmState::Running);

        phase!("stop while paused: stopped, with a collected exit status");
        d.pause("life").await.expect("pause");
        let t = Instant::now();
        let end = d.stop("life", Duration::from_secs(5)).await.expect("stop");
        assert!(matches!(end, VmState::Stopped { exit_code } if exit_code != ExitCode::Unknown), "{end}");
        assert!(t.elapsed() < Duration::from_secs(20), "stop took {:?}", t.elapsed());
        assert_eq!(d.status("life").await.expect("status"), end);
        assert_eq!(d.stop("life", Duration::from_secs(1)).await.expect("stop again"), end);
        let e = d.pause("life").await.expect_err("pause a stopped VM");
        assert!(matches!(e, DriverError::InvalidState { op: "pause", .. }), "{e}");
        let listed = d.list().await.expect("list");
        assert_eq!(listed.len(), 1);
        assert_eq!((listed[0].id.as_str(), &listed[0].state, listed[0].pid), ("life", &Ok(end.clone()), None));
        let logs = d.logs("life").expect("logs");
        assert!(logs.console.exists() && logs.stderr.exists(), "{logs:?}");

        phase!("start the stopped VM again: a new process; stop it running");
        let h2 = d.start(&vm).await.expect("restart");
        assert!(h2.started && h2.pid != h.pid, "{h2:?}");
        let e = d.remove("life").await.expect_err("remove a live VM");
        assert!(matches!(e, DriverError::InvalidState { op: "remove", .. }), "{e}");
        let end = d.stop("life", Duration::from_secs(2)).await.expect("stop running");
        assert!(matches!(end, VmState::Stopped { .. }), "{end}");

        phase!("remove: gone from the run directory");
        d.remove("life").await.expect("remove");
        assert!(d.list().await.expect("list").is_empty());
        assert!(matches!(d.status("life").await, Err(DriverError::NotFound { .. })));
    }

    /// Goal: kill ends a VM at once, also from another driver instance on
    /// the same run directory. Method: start with one instance, list and
    /// kill with a second one, read the state from both.
    pub async fn kill_from_another_instance<F: Fixture>() {
        let Some(env) = Env::<F>::new() else { return };
        let (d, f) = (&env.driver, &env.fixture);
        let h = d.start(&f.long_running("victim")).await.expect("start");

        phase!("a second driver instance lists the VM");
        let d2 = f.driver(&env.run_dir());
        let listed = d2.list().await.expect("list");
        assert_eq!(listed.len(), 1);
        assert_eq!((listed[0].pid, &listed[0].state), (Some(h.pid), &Ok(VmState::Running)));

        phase!("it kills the VM: SIGKILL, at once");
        let t = Instant::now();
        let end = d2.kill("victim").await.expect("kill");
        assert!(t.elapsed() < Duration::from_secs(5), "kill took {:?}", t.elapsed());
        assert_eq!(end, VmState::Stopped { exit_code: ExitCode::Signal(9) });
        assert_eq!(d.status("victim").await.expect("status"), end);
        assert_eq!(d.kill("victim").await.expect("kill again"), end);
    }

    /// Goal: an agent restart neither loses nor disturbs running VMs.
    /// Method: a child process (this test binary, running this same test
    /// with `LOCUS_VMHOST_HELPER_DIR` set) starts the VM and exits; this process, a new driver instance on the
    /// same run directory, lists it, starts it again (no change), pauses,
    /// resumes and stops it gracefully. The exit status is unknown: the VM's
    /// parent is gone.
    pub async fn adopt_after_restart<F: Fixture>() {
        if let (Ok(dir), Ok(id)) = (std::env::var("LOCUS_VMHOST_HELPER_DIR"), std::env::var("LOCUS_VMHOST_HELPER_ID")) {
            // The child half: start the VM and exit.
            return helper_start::<F>(Path::new(&dir), &id).await;
        }
        let Some(env) = Env::<F>::new() else { return };
        let (d, f) = (&env.driver, &env.fixture);

        phase!("another process starts the VM and exits");
        let out = tokio::time::timeout(
            BOOT_TIMEOUT,
            tokio::process::Command::new(std::env::current_exe().expect("current exe"))
                .args([&format!("{}::adopt_after_restart", F::NAME), "--exact", "--nocapture"])
                .env("LOCUS_VMHOST_HELPER_DIR", env.run_dir())
                .env("LOCUS_VMHOST_HELPER_ID", "adopted")
                .output(),
        )
        .await
        .expect("helper timed out")
        .expect("run helper");
        assert!(
            out.status.success(),
            "helper failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );

        phase!("this process lists it, running");
        let listed = d.list().await.expect("list");
        assert_eq!(listed.len(), 1, "{listed:?}");
        let pid = listed[0].pid.expect("a live pid");
        assert_eq!(listed[0].state, Ok(VmState::Running));
        let logs = d.logs("adopted").expect("logs");
        wait_log(&logs.console, f.ready_marker(), BOOT_TIMEOUT).await;

        phase!("start with the same spec: left alone");
        let h = d.start(&f.long_running("adopted")).await.expect("start");
        assert_eq!((h.started, h.pid), (false, pid));

        phase!("pause, resume, stop gracefully");
        d.pause("adopted").await.expect("pause");
        assert_eq!(d.status("adopted").await.expect("status"), VmState::Paused);
        d.resume("adopted").await.expect("resume");
        assert_eq!(d.status("adopted").await.expect("status"), VmState::Running);
        let end = d.stop("adopted", Duration::from_secs(60)).await.expect("stop");
        assert_eq!(end, VmState::Stopped { exit_code: ExitCode::Unknown });
        wait_log(&logs.console, f.stop_marker(), Duration::from_secs(1)).await;
    }

    /// The child half of `adopt_after_restart`.
    pub async fn helper_start<F: Fixture>(run_dir: &Path, id: &str) {
        let f = F::new().expect("fixture");
        let h = f.driver(run_dir).start(&f.long_running(id)).await.expect("helper start");
        println!("started vm {id} as pid {}", h.pid);
    }

    /// Goal: a failing workload ends and says how. Method: start a VM whose
    /// workload fails, wait until it is no longer live, check its state.
    pub async fn failing_workload<F: Fixture>() {
        let Some(env) = Env::<F>::new() else { return };
        let (d, f) = (&env.driver, &env.fixture);
        d.start(&f.failing("bad")).await.expect("start");
        let end = wait_state(d, "bad", BOOT_TIMEOUT, |s| !s.is_live()).await;
        phase!("ended: {end}");
        f.check_failed(&end, &d.logs("bad").expect("logs"));
        let listed = d.list().await.expect("list");
        assert_eq!(listed[0].state, Ok(end));
    }

    /// Goal: a VM that cannot start fails with the cause, and shows as
    /// failed. Method: start one, read the error and the state.
    pub async fn unstartable<F: Fixture>() {
        let Some(env) = Env::<F>::new() else { return };
        let (d, f) = (&env.driver, &env.fixture);
        let e = d.start(&f.unstartable("nope")).await.expect_err("start must fail");
        let msg = e.to_string();
        phase!("start failed: {msg}");
        assert!(matches!(e, DriverError::Spawn { .. } | DriverError::StartFailed { .. }), "{e:?}");
        assert!(msg.contains("vm nope") && msg.contains(f.unstartable_reason()), "{msg}");
        let state = d.status("nope").await.expect("status");
        assert!(matches!(&state, VmState::Failed(r) if r.contains(f.unstartable_reason())), "{state}");
    }

    /// Goal: bad specs are refused with the field and reason, and leave
    /// nothing behind; unknown VMs are `NotFound`. Method: start each.
    pub async fn bad_specs<F: Fixture>() {
        let Some(env) = Env::<F>::new() else { return };
        let (d, f) = (&env.driver, &env.fixture);
        let mut bad = f.bad_specs(env.dir.path());
        let mut zero = f.long_running("zero-mem");
        zero.memory_mib = 0;
        bad.push((zero, "memory_mib is 0"));
        let mut zero = f.long_running("zero-cpu");
        zero.vcpus = 0;
        bad.push((zero, "vcpus is 0"));
        bad.push((f.long_running("a/b"), "id may only hold"));
        bad.push((f.long_running("../up"), "id starts with '.'"));
        for (spec, want) in bad {
            let e = d.start(&spec).await.expect_err("bad spec accepted");
            assert!(matches!(e, DriverError::InvalidSpec { .. }), "{e:?}");
            let msg = e.to_string();
            assert!(msg.contains(want) && msg.contains(&spec.id), "{msg:?} lacks {want:?}");
        }
        assert!(d.list().await.expect("list").is_empty());
        assert!(matches!(d.status("ghost").await, Err(DriverError::NotFound { .. })));
        assert!(matches!(d.stop("ghost", Duration::from_secs(1)).await, Err(DriverError::NotFound { .. })));
        assert!(matches!(d.kill("ghost").await, Err(DriverError::NotFound { .. })));
        assert!(matches!(d.logs("ghost"), Err(DriverError::NotFound { .. })));
        assert!(matches!(d.status("../etc").await, Err(DriverError::InvalidSpec { .. })));
    }
}

macro_rules! driver_suite {
    ($module:ident, $fixture:ty) => {
        mod $module {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn lifecycle() {
                suite::lifecycle::<$fixture>().await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn kill_from_another_instance() {
                suite::kill_from_another_instance::<$fixture>().await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn adopt_after_restart() {
                suite::adopt_after_restart::<$fixture>().await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn failing_workload() {
                suite::failing_workload::<$fixture>().await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn unstartable() {
                suite::unstartable::<$fixture>().await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn bad_specs() {
                suite::bad_specs::<$fixture>().await
            }
        }
    };
}

driver_suite!(process, ProcessFixture);
driver_suite!(qemu, QemuFixture);

// ---------------------------------------------------------------- process

struct ProcessFixture;

fn sh(id: &str, script: &str) -> VmSpec {
    spec(
        id,
        VmKind::Process { command: vec!["sh".into(), "-c".into(), script.into()], env: BTreeMap::new(), cwd: None },
    )
}

impl Fixture for ProcessFixture {
    type D = ProcessDriver;
    const NAME: &'static str = "process";

    fn new() -> Option<Self> {
        Some(ProcessFixture)
    }

    fn driver(&self, run_dir: &Path) -> ProcessDriver {
        ProcessDriver::new(run_dir)
    }

    fn long_running(&self, id: &str) -> VmSpec {
        sh(id, "trap 'echo stopping; exit 0' TERM; echo ready; while true; do sleep 1; done")
    }

    fn ready_marker(&self) -> &'static str {
        "ready"
    }

    fn stop_marker(&self) -> &'static str {
        "stopping"
    }

    fn failing(&self, id: &str) -> VmSpec {
        sh(id, "echo 'disk full' >&2; exit 3")
    }

    fn check_failed(&self, state: &VmState, logs: &VmLogs) {
        assert_eq!(*state, VmState::Stopped { exit_code: ExitCode::Code(3) });
        assert!(read_log(&logs.stderr).contains("disk full"));
    }

    fn unstartable(&self, id: &str) -> VmSpec {
        spec(id, VmKind::Process { command: vec!["/nonexistent/program".into()], env: BTreeMap::new(), cwd: None })
    }

    fn unstartable_reason(&self) -> &'static str {
        "/nonexistent/program"
    }

    fn bad_specs(&self, dir: &Path) -> Vec<(VmSpec, &'static str)> {
        let process = |command: Vec<String>, env: BTreeMap<String, String>, cwd: Option<PathBuf>| VmKind::Process {
            command,
            env,
            cwd,
        };
        let env = BTreeMap::from([("A=B".to_owned(), "x".to_owned())]);
        vec![
            (spec("empty", process(vec![], BTreeMap::new(), None)), "command is empty"),
            (spec("blank", process(vec![String::new()], BTreeMap::new(), None)), "empty string"),
            (spec("envname", process(vec!["true".into()], env, None)), "env variable"),
            (spec("nocwd", process(vec!["true".into()], BTreeMap::new(), Some(dir.join("missing")))), "cwd"),
            (spec("qemukind", qemu_kind(dir.join("vmlinuz"), None, "")), "not a process spec"),
        ]
    }
}

/// Goal: stop ends the workload's whole process group, not just its first
/// process. Method: a shell that leaves a background child, stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_stop_ends_the_whole_group() {
    let Some(env) = Env::<ProcessFixture>::new() else { return };
    let d = &env.driver;
    d.start(&sh("group", "sleep 1000 & echo $! > child.pid; echo ready; wait")).await.expect("start");
    wait_log(&d.logs("group").expect("logs").console, "ready", Duration::from_secs(10)).await;
    let child: u32 =
        std::fs::read_to_string(env.run_dir().join("group/child.pid")).expect("child.pid").trim().parse().expect("pid");
    let end = d.stop("group", Duration::from_secs(5)).await.expect("stop");
    assert_eq!(end, VmState::Stopped { exit_code: ExitCode::Signal(15) });
    let gone = Instant::now() + Duration::from_secs(5);
    while std::fs::read_to_string(format!("/proc/{child}/stat")).is_ok_and(|s| !s.contains(") Z ")) {
        assert!(Instant::now() < gone, "the workload's child {child} survived the stop");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Goal: the workload gets its own environment and working directory, not
/// the agent's, and a grace period ends in SIGKILL. Method: print them from
/// a workload that ignores SIGTERM, then stop it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_environment_and_forced_stop() {
    let Some(env) = Env::<ProcessFixture>::new() else { return };
    let d = &env.driver;
    let cwd = env.dir.path().to_owned();
    let mut vm = spec(
        "envy",
        VmKind::Process {
            command: vec![
                "sh".into(),
                "-c".into(),
                "trap '' TERM; echo \"$LOCUS_VM_ID $LOCUS_VM_MEMORY_MIB $FOO ${CARGO:-none} $(pwd)\"; echo ready; \
                 while true; do sleep 1; done"
                    .into(),
            ],
            env: BTreeMap::from([("FOO".to_owned(), "bar".to_owned())]),
            cwd: Some(cwd.clone()),
        },
    );
    vm.log_dir = Some(env.dir.path().join("logs"));
    d.start(&vm).await.expect("start");
    let logs = d.logs("envy").expect("logs");
    assert!(logs.console.starts_with(env.dir.path().join("logs")));
    wait_log(&logs.console, "ready", Duration::from_secs(10)).await;
    assert!(read_log(&logs.console).contains(&format!("envy 128 bar none {}", cwd.display())));
    let t = Instant::now();
    let end = d.stop("envy", Duration::from_millis(500)).await.expect("stop");
    assert_eq!(end, VmState::Stopped { exit_code: ExitCode::Signal(9) });
    assert!(t.elapsed() >= Duration::from_millis(500) && t.elapsed() < Duration::from_secs(10));
}

// ---------------------------------------------------------------- qemu

/// The tiny guest of `scripts/test-kernel.sh`.
struct Guest {
    kernel: PathBuf,
    initrd: PathBuf,
}

fn guest() -> &'static Guest {
    static GUEST: OnceLock<Guest> = OnceLock::new();
    GUEST.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/test-kernel.sh");
        let out = std::process::Command::new(&script).output().expect("run scripts/test-kernel.sh");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "test-kernel.sh failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        let field = |k: &str| -> PathBuf {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .unwrap_or_else(|| panic!("test-kernel.sh printed no {k}: {stdout}"))
                .into()
        };
        Guest { kernel: field("kernel="), initrd: field("initrd=") }
    })
}

fn qemu_kind(kernel: PathBuf, initrd: Option<PathBuf>, append: &str) -> VmKind {
    VmKind::Qemu { kernel, initrd, append: append.into(), disks: vec![], extra_args: vec![], restore_from: None }
}

fn qemu_installed() -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("qemu-system-x86_64").is_file()))
}

struct QemuFixture {
    guest: &'static Guest,
}

impl QemuFixture {
    fn guest_spec(&self, id: &str, append: &str, disks: Vec<Disk>) -> VmSpec {
        let mut kind = qemu_kind(self.guest.kernel.clone(), Some(self.guest.initrd.clone()), append);
        if let VmKind::Qemu { disks: d, .. } = &mut kind {
            *d = disks;
        }
        spec(id, kind)
    }
}

impl Fixture for QemuFixture {
    type D = QemuDriver;
    const NAME: &'static str = "qemu";

    fn new() -> Option<Self> {
        if !qemu_installed() {
            eprintln!(
                "\n\n!!!!!!!! SKIPPED: qemu-system-x86_64 is not installed; the qemu driver is NOT tested. \
                 Run scripts/install-deps.sh. !!!!!!!!\n"
            );
            return None;
        }
        Some(QemuFixture { guest: guest() })
    }

    fn driver(&self, run_dir: &Path) -> QemuDriver {
        QemuDriver::new(run_dir)
    }

    fn long_running(&self, id: &str) -> VmSpec {
        self.guest_spec(id, "console=ttyS0 quiet locus.sleep=3600", vec![])
    }

    fn ready_marker(&self) -> &'static str {
        "LOCUS-GUEST-UP"
    }

    fn stop_marker(&self) -> &'static str {
        "LOCUS-GUEST-POWERDOWN"
    }

    fn failing(&self, id: &str) -> VmSpec {
        self.guest_spec(id, "console=ttyS0 quiet locus.end=panic", vec![])
    }

    fn check_failed(&self, state: &VmState, logs: &VmLogs) {
        assert!(matches!(state, VmState::Failed(r) if r.contains("Kernel panic")), "{state}");
        assert!(read_log(&logs.console).contains("LOCUS-GUEST-END panic"));
    }

    fn unstartable(&self, id: &str) -> VmSpec {
        // Nothing listens on port 1: qemu cannot open the disk and exits.
        let disk = Disk { source: DiskSource::Nbd("nbd://127.0.0.1:1/none".into()), read_only: false };
        self.guest_spec(id, "console=ttyS0", vec![disk])
    }

    fn unstartable_reason(&self) -> &'static str {
        "127.0.0.1:1"
    }

    fn bad_specs(&self, dir: &Path) -> Vec<(VmSpec, &'static str)> {
        let with = |id: &str, f: &dyn Fn(&mut VmSpec)| {
            let mut s = self.long_running(id);
            f(&mut s);
            s
        };
        let disk = |p: PathBuf| vec![Disk { source: DiskSource::Path(p), read_only: false }];
        vec![
            (spec("nokernel", qemu_kind(dir.join("missing-vmlinuz"), None, "")), "kernel"),
            (with("noinitrd", &|s| set_qemu(s, |_, i, _| *i = Some(dir.join("missing-initrd")))), "initrd"),
            (with("nodisk", &|s| set_qemu(s, |_, _, d| *d = disk(dir.join("missing.img")))), "does not exist"),
            (with("reldisk", &|s| set_qemu(s, |_, _, d| *d = disk("rel.img".into()))), "not an absolute path"),
            (with("managed", &|s| set_qemu(s, |e, _, _| *e = vec!["-daemonize".into()])), "set by the driver"),
            (with("tiny", &|s| s.memory_mib = 4), "at least 16"),
            (sh("proc", "true"), "not a qemu spec"),
        ]
    }
}

fn set_qemu(s: &mut VmSpec, f: impl Fn(&mut Vec<String>, &mut Option<PathBuf>, &mut Vec<Disk>)) {
    if let VmKind::Qemu { extra_args, initrd, disks, .. } = &mut s.kind {
        f(extra_args, initrd, disks);
    }
}

/// Goal: a real guest boots, writes its disk, really freezes when paused,
/// and its power-off ends the VM cleanly. Method: boot the test guest with a
/// writable and a read-only raw image; once it wrote its marker, pause it
/// for longer than it still sleeps, check it did not get further, resume,
/// wait for its power-off; read the marker back from the image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_guest_boots_writes_its_disk_and_pauses() {
    let Some(env) = Env::<QemuFixture>::new() else { return };
    let (d, f) = (&env.driver, &env.fixture);
    let rw = env.dir.path().join("rw.img");
    let ro = env.dir.path().join("ro.img");
    for img in [&rw, &ro] {
        std::fs::write(img, vec![0u8; 1 << 20]).expect("image");
    }
    let token = format!("t{}", std::process::id());
    let disks = vec![
        Disk { source: DiskSource::Path(rw.clone()), read_only: false },
        Disk { source: DiskSource::Path(ro.clone()), read_only: true },
    ];
    let vm = f.guest_spec("guest", &format!("console=ttyS0 quiet locus.sleep=5 locus.token={token}"), disks);

    phase!("boot ({:?}); the guest writes its disks", d.accel());
    let t = Instant::now();
    d.start(&vm).await.expect("start");
    let logs = d.logs("guest").expect("logs");
    wait_log(&logs.console, "LOCUS-GUEST-UP", BOOT_TIMEOUT).await;
    wait_log(&logs.console, "LOCUS-DISK-WRITTEN vda", BOOT_TIMEOUT).await;
    // The guest tries the read-only disk next; it must fail.
    wait_log(&logs.console, "LOCUS-DISK-WRITE-FAILED vdb", BOOT_TIMEOUT).await;
    let pause_at = t.elapsed();
    phase!("booted and tried its disks in {pause_at:?}; pause for 8 s (it sleeps 5 s)");

    d.pause("guest").await.expect("pause");
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(d.status("guest").await.expect("status"), VmState::Paused);
    let console = read_log(&logs.console);
    assert!(!console.contains("LOCUS-GUEST-END"), "the guest ran on while paused:\n{console}");

    phase!("resume: the guest finishes its sleep and powers off");
    d.resume("guest").await.expect("resume");
    let end = wait_state(d, "guest", BOOT_TIMEOUT, |s| !s.is_live()).await;
    assert_eq!(end, VmState::Stopped { exit_code: ExitCode::Code(0) });
    assert!(read_log(&logs.console).contains("LOCUS-GUEST-END poweroff"));
    phase!("whole run {:?}", t.elapsed());

    phase!("the image holds the guest's marker; the read-only one is untouched");
    let written = std::fs::read(&rw).expect("read image");
    let want = format!("LOCUS-DISK vda {token}\n");
    assert_eq!(String::from_utf8_lossy(&written[..want.len()]), want);
    assert!(std::fs::read(&ro).expect("read image").iter().all(|b| *b == 0));
}

/// Goal: a disk given as an NBD URI reaches the guest (Locus exports VM
/// disks over NBD). Method: serve a raw image with qemu-nbd on a unix
/// socket, boot a guest on it, read its marker back from the image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_disk_over_nbd() {
    let Some(env) = Env::<QemuFixture>::new() else { return };
    let (d, f) = (&env.driver, &env.fixture);
    let img = env.dir.path().join("nbd.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).expect("image");
    let sock = env.dir.path().join("nbd.sock");

    phase!("serve the image with qemu-nbd (from qemu-utils)");
    let mut server = tokio::process::Command::new("qemu-nbd")
        .args(["--format=raw", "--export-name=disk", "--persistent"])
        .arg(format!("--socket={}", sock.display()))
        .arg(&img)
        .kill_on_drop(true)
        .spawn()
        .expect("run qemu-nbd (install qemu-utils: scripts/install-deps.sh)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "qemu-nbd did not create {}", sock.display());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    phase!("boot a guest on the export; it writes its marker and powers off");
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    let vm = f.guest_spec(
        "nbd",
        "console=ttyS0 quiet locus.token=over-nbd",
        vec![Disk { source: DiskSource::Nbd(uri), read_only: false }],
    );
    d.start(&vm).await.expect("start");
    let end = wait_state(d, "nbd", BOOT_TIMEOUT, |s| !s.is_live()).await;
    assert_eq!(
        end,
        VmState::Stopped { exit_code: ExitCode::Code(0) },
        "{}",
        read_log(&d.logs("nbd").expect("logs").stderr)
    );
    let _ = server.kill().await;

    let want = "LOCUS-DISK vda over-nbd\n";
    let written = std::fs::read(&img).expect("read image");
    assert_eq!(String::from_utf8_lossy(&written[..want.len()]), want);
}

/// Goal: a checkpoint saves a running guest's state and a new qemu resumes
/// it where it was (recovery: the state can be pulled and resumed
/// elsewhere). Method: the guest sleeps 6 s after boot; checkpoint it 1 s
/// into the sleep, kill it, start a second VM from the checkpoint: it
/// finishes the same run (prints the end of it) without booting again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_checkpoint_and_resume_elsewhere() {
    let Some(env) = Env::<QemuFixture>::new() else { return };
    let (d, f) = (&env.driver, &env.fixture);
    let disk = env.dir.path().join("ck.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("image");
    let disks = || vec![Disk { source: DiskSource::Path(disk.clone()), read_only: false }];
    let vm = f.guest_spec("ck", "console=ttyS0 quiet locus.sleep=6 locus.token=ck", disks());
    d.start(&vm).await.expect("start");
    let logs = d.logs("ck").expect("logs");
    wait_log(&logs.console, "LOCUS-DISK-WRITTEN vda", BOOT_TIMEOUT).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    phase!("checkpoint the running guest; it runs on");
    let state = env.dir.path().join("ck.state");
    let bytes = d.checkpoint("ck", &state).await.expect("checkpoint");
    assert!(bytes > 1 << 20, "checkpoint of {bytes} bytes");
    assert_eq!(d.status("ck").await.expect("status"), VmState::Running);
    d.kill("ck").await.expect("kill");
    assert!(!read_log(&logs.console).contains("LOCUS-GUEST-END"), "ended before the checkpoint was used");

    phase!("a new VM from the checkpoint resumes the sleep and powers off, without booting");
    let mut again = f.guest_spec("ck2", "console=ttyS0 quiet locus.sleep=6 locus.token=ck", disks());
    if let VmKind::Qemu { restore_from, .. } = &mut again.kind {
        *restore_from = Some(state.clone());
    }
    d.start(&again).await.expect("start from the checkpoint");
    let end = wait_state(d, "ck2", BOOT_TIMEOUT, |s| !s.is_live()).await;
    let console = read_log(&d.logs("ck2").expect("logs").console);
    assert_eq!(end, VmState::Stopped { exit_code: ExitCode::Code(0) }, "{console}");
    assert!(console.contains("LOCUS-GUEST-END poweroff"), "the resumed guest did not finish its run:\n{console}");
    assert!(!console.contains("LOCUS-GUEST-UP"), "the guest booted again instead of resuming:\n{console}");

    phase!("a missing checkpoint is refused");
    let mut bad = f.guest_spec("ck3", "console=ttyS0", disks());
    if let VmKind::Qemu { restore_from, .. } = &mut bad.kind {
        *restore_from = Some(env.dir.path().join("none.state"));
    }
    assert!(matches!(d.start(&bad).await, Err(DriverError::InvalidSpec { .. })));
}
