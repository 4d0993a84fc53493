//! A mount's life: checks before mounting, the daemon, the session, the
//! shutdown, and `locus umount`.
//!
//! Daemonizing starts the same binary again (`--daemon-child`) in a new
//! session rather than forking: the tokio runtime's threads do not survive
//! a fork. The child reports on its stdout whether the mount came up
//! (`ready`, or `error<TAB>exit<TAB>message`), so the parent exits with the
//! child's outcome; the child then logs to a file.
//!
//! The one shutdown path: the session ends (unmounted from outside, or by
//! us after SIGTERM/SIGINT), requests still running get a deadline to
//! finish, and every file with buffered data is flushed.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fuser::{MountOption, Session, SessionACL};
use tokio::signal::unix::{signal, SignalKind};

use super::fs::{LocusFs, Shared, MAX_READAHEAD_BYTES};
use super::{watch, MountArgs, MountError, UmountArgs};
use crate::chunk::ChunkClient;
use crate::client::MetaClient;
use crate::config::{default_data_dir, ClientConfig};
use crate::file::FileClient;
use crate::proto::*;

/// How long the first request to the cluster may take before the mount
/// gives up.
const PROBE_TIMEOUT: Duration = Duration::from_secs(15);
/// How long requests still running at the end may take.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
const FUSE_DEVICE: &str = "/dev/fuse";
const FUSERMOUNT: &str = "fusermount3";
/// The child's report on its stdout.
const READY: &str = "ready";

/// Mounts `args.dir` (as a daemon unless `--foreground`); returns once the
/// mount is up (daemon) or over (foreground).
pub async fn mount(args: MountArgs, config: Option<PathBuf>) -> Result<(), MountError> {
    let dir = absolute(&args.dir)?;
    let report = Report { to_parent: args.daemon_child };
    let outcome = async {
        check_mountpoint(&dir)?;
        check_fuse()?;
        let config = absolute(&config.unwrap_or_else(ClientConfig::default_path))?;
        if !config.exists() {
            return Err(MountError::Config(format!(
                "no client configuration at {} (start a cluster with `locus up`, or pass --config)",
                config.display()
            )));
        }
        Ok(config)
    }
    .await;
    let config = match outcome {
        Ok(c) => c,
        Err(e) => return Err(report.failed(e)),
    };
    if !args.foreground && !args.daemon_child {
        return daemonize(&args, &dir, &config);
    }
    serve(&args, &dir, &config, &report).await
}

/// Tells a daemonizing parent how mounting went (nothing in the foreground).
struct Report {
    to_parent: bool,
}

impl Report {
    fn ready(&self) {
        if !self.to_parent {
            return;
        }
        let mut out = std::io::stdout();
        let _ = writeln!(out, "{READY}");
        let _ = out.flush();
        // The parent is gone after this line; stdout must not point at a
        // closed pipe for the rest of our life.
        if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
            use std::os::fd::AsRawFd;
            let _ = nix::unistd::dup2(null.as_raw_fd(), 1);
        }
    }

    fn failed(&self, e: MountError) -> MountError {
        if self.to_parent {
            let mut out = std::io::stdout();
            let _ = writeln!(out, "error\t{}\t{}", e.exit_code(), e.to_string().replace('\n', " "));
            let _ = out.flush();
        }
        e
    }
}

async fn serve(args: &MountArgs, dir: &Path, config: &Path, report: &Report) -> Result<(), MountError> {
    let (shared, session) = match start(args, dir, config).await {
        Ok(s) => s,
        Err(e) => return Err(report.failed(e)),
    };
    let notifier = session.notifier();
    shared.spawn_orphan_renewals();
    // As the kernel writes back dirty pages: files left unsynced for
    // SYNC_AGE are made durable on the chunk servers (and their state goes).
    shared.files.spawn_syncer(SYNC_EVERY, SYNC_AGE);
    if let Err(e) = watch::start(shared.clone(), notifier) {
        tracing::warn!(error = %e, "cannot follow changes; other mounts' changes show after the cache TTL");
    }
    let (done_tx, mut done) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("fuse-session".into())
        .spawn(move || {
            let _ = done_tx.send(session.run());
        })
        .map_err(|e| report.failed(MountError::Failed(format!("cannot start the session thread: {e}"))))?;
    tracing::info!(dir = %dir.display(), "mounted");
    let target = dir.to_path_buf();
    let ra = tokio::task::spawn_blocking(move || raise_readahead(&target));
    if tokio::time::timeout(Duration::from_secs(2), ra).await.is_err() {
        tracing::warn!("setting the mount's readahead timed out");
    }
    report.ready();
    // `locus umount` waits for this process (its final flush) by this file.
    let pid_file = pid_path(dir);
    let written = pid_file
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(&pid_file, std::process::id().to_string()));
    if let Err(e) = written {
        tracing::warn!(file = %pid_file.display(), error = %e, "cannot write the pid file; umount will not wait for the final flush");
    }

    let (mut term, mut int, _hup) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        // A daemon has no terminal to lose; in the foreground a hangup
        // ends the mount like SIGTERM would.
        signal(SignalKind::hangup()),
    ) {
        (Ok(t), Ok(i), Ok(h)) => (t, i, h),
        _ => return Err(MountError::Failed("cannot install signal handlers".into())),
    };
    let ended = tokio::select! {
        r = &mut done => Some(r),
        _ = term.recv() => None,
        _ = int.recv() => None,
    };
    let result = match ended {
        Some(r) => r,
        None => {
            tracing::info!("signalled: flushing and unmounting");
            shared.flush_dirty().await;
            if let Err(e) = unmount_dir(dir, false) {
                tracing::warn!(error = %e, "unmount failed; detaching lazily, the mount ends when its last user does");
                if let Err(e) = unmount_dir(dir, true) {
                    tracing::error!(error = %e, "lazy unmount failed too");
                }
            }
            tokio::select! {
                r = &mut done => r,
                _ = term.recv() => {
                    tracing::warn!("signalled again: exiting without waiting for the mount's users");
                    Ok(Ok(()))
                }
                _ = int.recv() => Ok(Ok(())),
            }
        }
    };
    if let Ok(Err(e)) = &result {
        tracing::warn!(error = %e, "FUSE session ended with an error");
    }
    if !shared.wait_idle(Instant::now() + DRAIN_TIMEOUT).await {
        tracing::warn!("requests still running after {DRAIN_TIMEOUT:?}; flushing anyway");
    }
    let failed = shared.flush_dirty().await;
    shared.release_orphans().await;
    let _ = std::fs::remove_file(pid_path(dir));
    tracing::info!(dir = %dir.display(), "unmounted");
    if failed > 0 {
        return Err(MountError::Failed(format!("{failed} files could not be flushed at unmount (see the log)")));
    }
    Ok(())
}

/// Connects to the cluster and mounts; the session is ready to run.
async fn start(
    args: &MountArgs,
    dir: &Path,
    config: &Path,
) -> Result<(std::sync::Arc<Shared>, Session<LocusFs>), MountError> {
    let cfg = ClientConfig::load(config).map_err(|e| MountError::Config(e.to_string()))?;
    let meta = MetaClient::new(&cfg).map_err(|e| MountError::Config(e.to_string()))?;
    let chunks = ChunkClient::for_config(&cfg).map_err(|e| MountError::Config(e.to_string()))?;
    let files = FileClient::new(meta.clone(), chunks, cfg.topology.clone());
    let unreachable =
        |why: String| MountError::Cluster(format!("cannot reach the cluster at {}: {why}", cfg.meta.join(", ")));
    match tokio::time::timeout(PROBE_TIMEOUT, meta.getattr(ROOT_INO)).await {
        Ok(Ok(a)) if a.kind == FileKind::Dir => {}
        Ok(Ok(a)) => return Err(unreachable(format!("its root is a {:?}, not a directory", a.kind))),
        Ok(Err(e)) if e.code() == ErrorCode::Unauthorized => return Err(MountError::Config(e.to_string())),
        Ok(Err(e)) => return Err(unreachable(e.to_string())),
        Err(_) => return Err(unreachable(format!("no answer within {PROBE_TIMEOUT:?}"))),
    }
    let shared = Shared::new(meta, files, tokio::runtime::Handle::current());
    let fs = LocusFs::new(shared.clone());
    let mut options = fuser::Config::default();
    options.mount_options = vec![
        MountOption::FSName("locus".into()),
        // As a kernel option (the type shows as fuse.locus); fusermount3
        // takes it too.
        MountOption::CUSTOM("subtype=locus".into()),
        // The kernel enforces permissions from our attributes.
        MountOption::DefaultPermissions,
    ];
    if args.read_only {
        options.mount_options.push(MountOption::RO);
    }
    options.acl = if args.others_allowed() { SessionACL::All } else { SessionACL::Owner };
    options.n_threads = Some(usize::from(args.threads));
    options.clone_fd = true;
    let target = dir.to_path_buf();
    let session = tokio::task::spawn_blocking(move || Session::new(fs, &target, &options))
        .await
        .map_err(|e| MountError::Failed(format!("mounting panicked: {e}")))?
        .map_err(|e| mount_failure(dir, e))?;
    Ok((shared, session))
}

/// Raises the mount's readahead to [`MAX_READAHEAD_BYTES`] through its
/// backing device info in sysfs. The kernel starts a FUSE mount at its
/// default (128 KiB) whatever `max_readahead` the daemon asks for, so a
/// sequential reader would wait for one network round trip per 128 KiB.
/// Root only; best effort: without it reads work, only slower.
fn raise_readahead(dir: &Path) {
    use std::os::unix::fs::MetadataExt;
    let dev = match std::fs::metadata(dir) {
        Ok(m) => m.dev(),
        Err(e) => return tracing::debug!(error = %e, "cannot stat the mount point to set its readahead"),
    };
    let path = format!("/sys/class/bdi/{}:{}/read_ahead_kb", libc::major(dev), libc::minor(dev));
    let kb = MAX_READAHEAD_BYTES / 1024;
    match std::fs::write(&path, kb.to_string()) {
        Ok(()) => tracing::debug!(path, kb, "readahead set"),
        Err(e) => tracing::info!(path, error = %e, "cannot raise the mount's readahead; sequential reads are slower"),
    }
}

fn mount_failure(dir: &Path, e: std::io::Error) -> MountError {
    let d = dir.display();
    match e.raw_os_error() {
        Some(libc::EBUSY) => MountError::Mountpoint(format!("{d}: mount point busy (EBUSY)")),
        Some(libc::ENOENT) if !Path::new(FUSE_DEVICE).exists() => missing_device(),
        Some(libc::EPERM) | Some(libc::EACCES) => {
            MountError::Fuse(format!("{d}: not allowed to mount ({e}); mount as root or install fusermount3 (fuse3)"))
        }
        _ => MountError::Fuse(format!("{d}: mount failed: {e}")),
    }
}

fn missing_device() -> MountError {
    MountError::Fuse(format!(
        "{FUSE_DEVICE} is missing: load the fuse kernel module (`modprobe fuse`), or pass the device into the container"
    ))
}

/// Starts `locus mount --daemon-child` in a new session and waits for its
/// report.
fn daemonize(args: &MountArgs, dir: &Path, config: &Path) -> Result<(), MountError> {
    let log = log_path(dir);
    if let Some(parent) = log.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| MountError::Failed(format!("cannot create the log directory {}: {e}", parent.display())))?;
    }
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(|e| MountError::Failed(format!("cannot open the log {}: {e}", log.display())))?;
    let exe = std::env::current_exe().map_err(|e| MountError::Failed(format!("cannot find the locus binary: {e}")))?;
    let mut cmd = Command::new(exe);
    cmd.arg("--config")
        .arg(config)
        .arg("mount")
        .arg(dir)
        .arg("--threads")
        .arg(args.threads.to_string())
        .arg("--daemon-child")
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file);
    if args.allow_other {
        cmd.arg("--allow-other");
    }
    if args.owner_only {
        cmd.arg("--owner-only");
    }
    if args.read_only {
        cmd.arg("--read-only");
    }
    if std::env::var_os("LOCUS_LOG").is_none() {
        cmd.env("LOCUS_LOG", "info");
    }
    // A log file, not a terminal: no colour codes.
    cmd.env("NO_COLOR", "1");
    // SAFETY: setsid is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| nix::unistd::setsid().map(|_| ()).map_err(std::io::Error::from));
    }
    let mut child = cmd.spawn().map_err(|e| MountError::Failed(format!("cannot start the mount daemon: {e}")))?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = BufReader::new(out).read_line(&mut line);
    }
    let line = line.trim_end();
    if line == READY {
        return Ok(());
    }
    if let Some(rest) = line.strip_prefix("error\t") {
        let (exit, message) = rest.split_once('\t').unwrap_or(("1", rest));
        return Err(MountError::Daemon { exit: exit.parse().unwrap_or(1), message: message.to_string() });
    }
    let status = child.wait().map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
    Err(MountError::Failed(format!("the mount daemon stopped before mounting ({status}); see {}", log.display())))
}

/// `~/.locus/logs/mount-<dir>.log`, or under `$LOCUS_LOG_DIR`.
pub fn log_path(dir: &Path) -> PathBuf {
    let base = std::env::var_os("LOCUS_LOG_DIR").map(PathBuf::from).unwrap_or_else(|| default_data_dir().join("logs"));
    base.join(format!("mount-{}.log", log_name(dir)))
}

/// `~/.locus/run/mount-<dir>.pid`: the running mount daemon's pid.
fn pid_path(dir: &Path) -> PathBuf {
    default_data_dir().join("run").join(format!("mount-{}.pid", log_name(dir)))
}

/// How often the mount looks for written files never fsynced...
const SYNC_EVERY: Duration = Duration::from_secs(5);
/// ...and how long after their last write-back it syncs them (Linux's
/// `dirty_expire_centisecs`).
const SYNC_AGE: Duration = Duration::from_secs(30);
/// How long `locus umount` waits for the daemon's final flush.
const UMOUNT_WAIT: Duration = Duration::from_secs(120);

/// The mount daemon of `dir`, if its pid file names a live `locus mount`.
fn daemon_pid(dir: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pid_path(dir)).ok()?.trim().parse().ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let words: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    words.iter().any(|w| *w == b"mount").then_some(pid)
}

/// A file name for a mount point: `/mnt/a b` becomes `mnt-a_b`.
fn log_name(dir: &Path) -> String {
    let s: String = dir
        .to_string_lossy()
        .trim_matches('/')
        .chars()
        .map(|c| match c {
            '/' => '-',
            c if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' => c,
            _ => '_',
        })
        .collect();
    if s.is_empty() {
        "root".into()
    } else {
        s
    }
}

/// `p` made absolute (not resolved: a dead mount point cannot be).
fn absolute(p: &Path) -> Result<PathBuf, MountError> {
    std::path::absolute(p).map_err(|e| MountError::Mountpoint(format!("{}: {e}", p.display())))
}

fn check_mountpoint(dir: &Path) -> Result<(), MountError> {
    let d = dir.display();
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(MountError::Mountpoint(format!("{d}: mount point is not a directory"))),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            return Err(MountError::Mountpoint(format!(
                "{d}: a dead FUSE mount is there (transport endpoint is not connected); run `locus umount {d}` first"
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(MountError::Mountpoint(format!("{d}: mount point does not exist")))
        }
        Err(e) => return Err(MountError::Mountpoint(format!("{d}: {e}"))),
    }
    let real = dir.canonicalize().map_err(|e| MountError::Mountpoint(format!("{d}: {e}")))?;
    if is_mounted(&real) {
        return Err(MountError::Mountpoint(format!(
            "{d}: already mounted (mount point busy); unmount it first with `locus umount {d}`"
        )));
    }
    Ok(())
}

fn check_fuse() -> Result<(), MountError> {
    if !Path::new(FUSE_DEVICE).exists() {
        return Err(missing_device());
    }
    if !nix::unistd::geteuid().is_root() && find_in_path(FUSERMOUNT).is_none() {
        return Err(MountError::Fuse(format!(
            "{FUSERMOUNT} is not installed (package fuse3); mounting as a user needs it"
        )));
    }
    Ok(())
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

/// Whether `dir` (resolved) is a mount point, from /proc/self/mountinfo.
pub fn is_mounted(dir: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return false };
    let found = mount_points(&info).any(|m| Path::new(&m) == dir);
    found
}

/// The mount points listed in a mountinfo text (octal escapes undone).
fn mount_points(info: &str) -> impl Iterator<Item = String> + '_ {
    info.lines().filter_map(|l| l.split(' ').nth(4)).map(unescape)
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `locus umount DIR`.
pub fn umount(args: &UmountArgs) -> Result<(), MountError> {
    let dir = absolute(&args.dir)?;
    // A dead mount cannot be resolved; its path as given is what mountinfo shows.
    let real = dir.canonicalize().unwrap_or_else(|_| dir.clone());
    if !is_mounted(&real) {
        return Err(MountError::NotMounted(format!("{}: not mounted", dir.display())));
    }
    let daemon = daemon_pid(&real);
    unmount_dir(&real, args.lazy)?;
    // Like a kernel filesystem's umount: return once what was written is
    // synced, which the daemon does after the kernel lets go.
    if let (Some(pid), false) = (daemon, args.lazy) {
        let deadline = Instant::now() + UMOUNT_WAIT;
        while std::path::Path::new(&format!("/proc/{pid}")).exists() {
            if Instant::now() > deadline {
                eprintln!(
                    "locus: the mount daemon (pid {pid}) is still syncing after {UMOUNT_WAIT:?}; see {}",
                    log_path(&real).display()
                );
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

/// Unmounts: umount2 as root, fusermount3 otherwise.
fn unmount_dir(dir: &Path, lazy: bool) -> Result<(), MountError> {
    let d = dir.display();
    let busy = || {
        MountError::Busy(format!(
            "{d}: mount point busy (EBUSY): a process has a file open there or its working directory inside; \
             stop it (`fuser -vm {d}` lists them) or use `locus umount --lazy`"
        ))
    };
    if nix::unistd::geteuid().is_root() {
        let flags = if lazy { nix::mount::MntFlags::MNT_DETACH } else { nix::mount::MntFlags::empty() };
        return match nix::mount::umount2(dir, flags) {
            Ok(()) => Ok(()),
            Err(nix::errno::Errno::EBUSY) => Err(busy()),
            Err(nix::errno::Errno::EINVAL) => Err(MountError::NotMounted(format!("{d}: not mounted"))),
            Err(e) => Err(MountError::Failed(format!("{d}: unmount failed: {e}"))),
        };
    }
    let Some(fusermount) = find_in_path(FUSERMOUNT) else {
        return Err(MountError::Fuse(format!(
            "{FUSERMOUNT} is not installed (package fuse3); unmounting as a user needs it"
        )));
    };
    let mut cmd = Command::new(fusermount);
    cmd.arg("-u");
    if lazy {
        cmd.arg("-z");
    }
    let out =
        cmd.arg("--").arg(dir).output().map_err(|e| MountError::Failed(format!("cannot run {FUSERMOUNT}: {e}")))?;
    if out.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if err.contains("busy") {
        Err(busy())
    } else if err.contains("not found") || err.contains("not mounted") {
        Err(MountError::NotMounted(format!("{d}: not mounted")))
    } else {
        Err(MountError::Failed(format!("{d}: {FUSERMOUNT} -u failed: {err}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_is_parsed_with_escapes() {
        let info = "36 35 98:0 / / rw,relatime - ext4 /dev/root rw\n\
                    52 36 0:45 / /tmp/with\\040space rw,nosuid - fuse.locus locus rw\n";
        let points: Vec<String> = mount_points(info).collect();
        assert_eq!(points, vec!["/".to_string(), "/tmp/with space".to_string()]);
        assert_eq!(unescape("a\\134b"), "a\\b");
        assert_eq!(unescape("trailing\\04"), "trailing\\04", "a short escape is left alone");
    }

    #[test]
    fn log_names_are_flat() {
        assert_eq!(log_name(Path::new("/mnt/a b")), "mnt-a_b");
        assert_eq!(log_name(Path::new("/")), "root");
    }

    #[test]
    fn exit_codes() {
        assert_eq!(MountError::Mountpoint("x".into()).exit_code(), 4);
        assert_eq!(MountError::Cluster("x".into()).exit_code(), 4);
        assert_eq!(MountError::Busy("x".into()).exit_code(), 1);
        assert_eq!(MountError::Daemon { exit: 4, message: "x".into() }.exit_code(), 4);
    }
}
