//! FUSE mounts for tests: `locus mount` on a fresh directory, unmounted
//! when the guard drops (fusermount3 -u, then a lazy unmount), also when a
//! test fails.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::bin;

/// Whether FUSE can be used here; says so when it cannot (the caller then
/// passes without testing).
pub fn fuse_available() -> bool {
    if Path::new("/dev/fuse").exists() {
        return true;
    }
    eprintln!("skipping: /dev/fuse is missing");
    false
}

/// Whether `dir` (already resolved) is a mount point.
pub fn is_mounted(dir: &Path) -> bool {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let target = dir.to_string_lossy().replace(' ', "\\040");
    info.lines().any(|l| l.split(' ').nth(4) == Some(target.as_str()))
}

/// Polls `f` every 20 ms until it holds (true) or `timeout` passes (false).
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Unmounts `dir` if mounted: fusermount3 -u, else lazily.
pub fn unmount(dir: &Path) {
    if !is_mounted(dir) {
        return;
    }
    let ok = Command::new("fusermount3").arg("-u").arg(dir).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
    if !ok {
        eprintln!("{}: busy at teardown; unmounting lazily", dir.display());
        let lazy = Command::new("umount").arg("-l").arg(dir).status().is_ok_and(|s| s.success());
        if !lazy {
            let _ = Command::new("fusermount3").args(["-u", "-z"]).arg(dir).status();
        }
    }
    if !wait_until(Duration::from_secs(10), || !is_mounted(dir)) {
        eprintln!("{}: still mounted after unmounting", dir.display());
    }
}

/// A `locus mount` (daemonized) on a fresh directory; unmounted on drop.
pub struct Mount {
    pub dir: PathBuf,
    log_dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Mount {
    pub fn start(config: &Path, log_dir: &Path) -> Mount {
        Mount::start_with(config, log_dir, &[])
    }

    pub fn start_with(config: &Path, log_dir: &Path, extra: &[&str]) -> Mount {
        let tmp = tempfile::Builder::new().prefix("locus-mnt-").tempdir().expect("mount dir");
        let dir = tmp.path().canonicalize().expect("canonical mount dir");
        let out = locus_mount(config, &dir, log_dir, extra);
        // The guard exists before anything is asserted.
        let m = Mount { dir, log_dir: log_dir.to_path_buf(), _tmp: tmp };
        assert!(
            out.status.success(),
            "locus mount: {}\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            m.log()
        );
        assert!(is_mounted(&m.dir), "locus mount returned but {} is not mounted\n{}", m.dir.display(), m.log());
        m
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// The mount daemon's log.
    pub fn log(&self) -> String {
        let mut out = String::new();
        for e in fs::read_dir(&self.log_dir).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().contains(&*self.dir.file_name().unwrap_or_default().to_string_lossy()) {
                out.push_str(&format!("--- {}\n", e.path().display()));
                out.push_str(&fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
        out
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        unmount(&self.dir);
    }
}

/// Runs `locus mount DIR EXTRA...` (it daemonizes; logs in `log_dir`).
pub fn locus_mount(config: &Path, dir: &Path, log_dir: &Path, extra: &[&str]) -> Output {
    Command::new(bin("locus"))
        .arg("--config")
        .arg(config)
        .arg("mount")
        .arg(dir)
        .args(extra)
        .env("LOCUS_LOG_DIR", log_dir)
        .output()
        .expect("run locus mount")
}
