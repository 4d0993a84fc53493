//! The FUSE mount with real processes: `locus mount` over a test cluster
//! (3 metadata nodes, 3 chunk servers, 1 MiB chunks), used through the
//! kernel with std::fs, libc calls and ordinary tools.
//!
//! Every mount has a guard that unmounts it (fusermount3 -u, then a lazy
//! unmount) when the test ends, also when it fails. The tests need
//! /dev/fuse and the right to mount; without /dev/fuse they say so and pass.

use std::ffi::CString;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

use locus_tests::files::pattern;
use locus_tests::mount::{fuse_available, is_mounted, locus_mount, unmount, wait_until, Mount};
use locus_tests::{bin, init_logging, locus_cli, phase, Cluster, ClusterOptions};

const MIB: usize = 1 << 20;
/// How soon a change in one mount must show in another.
const COHERENCE: Duration = Duration::from_secs(2);

fn locus_umount(dir: &Path) -> Output {
    Command::new(bin("locus")).arg("umount").arg(dir).output().expect("run locus umount")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs a shell command; panics with its output when it fails.
fn sh(cmd: &str) -> String {
    let out = Command::new("bash").arg("-c").arg(cmd).output().expect("run bash");
    assert!(
        out.status.success(),
        "`{cmd}` failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn require_tool(name: &str) {
    let found =
        Command::new("bash").arg("-c").arg(format!("command -v {name}")).output().is_ok_and(|o| o.status.success());
    assert!(found, "{name} is not installed: run scripts/install-deps.sh");
}

fn errno_of(r: std::io::Result<impl Sized>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

fn cname(s: &str) -> CString {
    CString::new(s).expect("name without NUL")
}

fn check(r: libc::ssize_t) -> std::io::Result<usize> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

fn setxattr(p: &Path, name: &str, value: &[u8], flags: i32) -> std::io::Result<usize> {
    let (p, n) = (cpath(p), cname(name));
    // SAFETY: valid NUL-terminated strings and a buffer of the given length.
    let r = unsafe { libc::setxattr(p.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), flags) };
    check(r as libc::ssize_t)
}

/// getxattr(2) into a buffer of `size` bytes (0: ask for the size).
fn getxattr(p: &Path, name: &str, size: usize) -> std::io::Result<Vec<u8>> {
    let (p, n) = (cpath(p), cname(name));
    let mut buf = vec![0u8; size];
    // SAFETY: valid strings; the buffer holds `size` bytes.
    let r = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), size) };
    let n = check(r)?;
    if size == 0 {
        return Ok(vec![0u8; n]);
    }
    buf.truncate(n);
    Ok(buf)
}

fn listxattr(p: &Path, size: usize) -> std::io::Result<Vec<u8>> {
    let p = cpath(p);
    let mut buf = vec![0u8; size];
    // SAFETY: a valid string; the buffer holds `size` bytes.
    let r = unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), size) };
    let n = check(r)?;
    if size == 0 {
        return Ok(vec![0u8; n]);
    }
    buf.truncate(n);
    Ok(buf)
}

fn removexattr(p: &Path, name: &str) -> std::io::Result<usize> {
    let (p, n) = (cpath(p), cname(name));
    // SAFETY: valid NUL-terminated strings.
    let r = unsafe { libc::removexattr(p.as_ptr(), n.as_ptr()) };
    check(r as libc::ssize_t)
}

fn renameat2(from: &Path, to: &Path, flags: u32) -> std::io::Result<usize> {
    let (f, t) = (cpath(from), cpath(to));
    // SAFETY: valid NUL-terminated paths.
    let r = unsafe { libc::renameat2(libc::AT_FDCWD, f.as_ptr(), libc::AT_FDCWD, t.as_ptr(), flags) };
    check(r as libc::ssize_t)
}

async fn start_cluster() -> (Cluster, PathBuf, PathBuf) {
    init_logging();
    let cluster = Cluster::start(ClusterOptions::default()).await.expect("cluster");
    let config = cluster.write_cli_config("client", None, 20_000);
    let logs = cluster.path().join("mount-logs");
    (cluster, config, logs)
}

/// Goal: the POSIX calls programs make work through the mount, with the
/// errors a local filesystem gives.
/// Method: one mount; std::fs and libc calls, each checked against what it
/// must have done; data spanning several 1 MiB chunks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posix_calls_behave_like_a_local_filesystem() {
    if !fuse_available() {
        return;
    }
    let (_cluster, config, logs) = start_cluster().await;
    let m = Mount::start(&config, &logs);

    phase("create, write, read back; append; truncate shorter and longer (zeros)");
    let f = m.path("a.txt");
    fs::write(&f, b"hello").expect("write");
    assert_eq!(fs::read(&f).expect("read"), b"hello");
    fs::OpenOptions::new().append(true).open(&f).and_then(|mut h| h.write_all(b" world")).expect("append");
    assert_eq!(fs::read(&f).expect("read"), b"hello world");
    let h = fs::OpenOptions::new().write(true).open(&f).expect("open");
    h.set_len(5).expect("truncate");
    assert_eq!(fs::read(&f).expect("read"), b"hello");
    h.set_len(8).expect("extend");
    assert_eq!(fs::read(&f).expect("read"), b"hello\0\0\0");
    drop(h);

    phase("a root mount is open to other users, and the kernel checks their permissions");
    let as_nobody = |script: &str| {
        std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c", script])
            .output()
            .expect("setpriv")
    };
    let read = as_nobody(&format!("cat {}", f.display()));
    assert!(read.status.success(), "another user reads a 0644 file: {}", String::from_utf8_lossy(&read.stderr));
    assert_eq!(read.stdout, b"hello\0\0\0");
    let write = as_nobody(&format!("echo x >> {}", f.display()));
    assert!(!write.status.success(), "another user must not write a 0644 root file");
    assert!(String::from_utf8_lossy(&write.stderr).contains("Permission denied"), "{write:?}");
    assert_eq!(fs::read(&f).expect("read"), b"hello\0\0\0");

    phase("3.5 MiB across chunks: whole, at offsets crossing chunk boundaries, overwrite in the middle");
    let big = m.path("big.bin");
    let mut data = pattern(1, 3 * MIB + MIB / 2);
    fs::write(&big, &data).expect("write big");
    assert_eq!(fs::metadata(&big).expect("stat").len(), data.len() as u64);
    assert!(fs::read(&big).expect("read big") == data, "big file reads back");
    let mut h = fs::OpenOptions::new().read(true).write(true).open(&big).expect("open big");
    let mut buf = vec![0u8; 4096];
    h.seek(SeekFrom::Start(MIB as u64 - 100)).and_then(|_| h.read_exact(&mut buf)).expect("read across boundary");
    assert!(buf[..] == data[MIB - 100..MIB - 100 + 4096]);
    let patch = pattern(2, 300_000);
    h.seek(SeekFrom::Start(2 * MIB as u64 - 1000)).and_then(|_| h.write_all(&patch)).expect("overwrite");
    data[2 * MIB - 1000..2 * MIB - 1000 + patch.len()].copy_from_slice(&patch);
    h.seek(SeekFrom::Start(2 * MIB as u64 - 1000)).and_then(|_| h.read_exact(&mut buf)).expect("read own write");
    assert!(buf[..] == patch[..4096], "a handle reads its own unflushed write");
    drop(h);
    assert!(fs::read(&big).expect("read big") == data, "overwrite landed");

    phase("fallocate: punch a hole across a chunk boundary (size kept), zero a range past the end (size grows)");
    let h = fs::OpenOptions::new().read(true).write(true).open(&big).expect("open big");
    let fd = std::os::fd::AsRawFd::as_raw_fd(&h);
    let (at, len) = (MIB - 5000, 20_000usize);
    // SAFETY: plain syscalls on an open descriptor.
    let r =
        unsafe { libc::fallocate(fd, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, at as i64, len as i64) };
    assert_eq!(r, 0, "punch hole: {}", std::io::Error::last_os_error());
    data[at..at + len].fill(0);
    assert_eq!(fs::metadata(&big).expect("stat").len(), data.len() as u64, "a punch keeps the size");
    let end = data.len();
    let r = unsafe { libc::fallocate(fd, libc::FALLOC_FL_ZERO_RANGE, (end - 100) as i64, 4196) };
    assert_eq!(r, 0, "zero range: {}", std::io::Error::last_os_error());
    data[end - 100..].fill(0);
    data.resize(end + 4096, 0);
    let r = unsafe { libc::fallocate(fd, libc::FALLOC_FL_COLLAPSE_RANGE, 0, 4096) };
    assert_eq!((r, std::io::Error::last_os_error().raw_os_error()), (-1, Some(libc::EOPNOTSUPP)));
    drop(h);
    assert_eq!(fs::metadata(&big).expect("stat").len(), data.len() as u64, "zero range past the end grows");
    assert!(fs::read(&big).expect("read big") == data, "punched and zeroed ranges read as zeros, the rest kept");

    phase("mkdir, readdir of 300 entries (each once), EEXIST, ENOTEMPTY, ENOENT");
    let d = m.path("dir");
    fs::create_dir(&d).expect("mkdir");
    assert_eq!(errno_of(fs::create_dir(&d)), Some(libc::EEXIST));
    for i in 0..300 {
        fs::write(d.join(format!("f{i:03}")), i.to_string()).expect("create in dir");
    }
    let mut names: Vec<String> = fs::read_dir(&d)
        .expect("readdir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let want: Vec<String> = (0..300).map(|i| format!("f{i:03}")).collect();
    assert_eq!(names, want);
    assert_eq!(errno_of(fs::remove_dir(&d)), Some(libc::ENOTEMPTY));
    assert_eq!(errno_of(fs::read(m.path("missing"))), Some(libc::ENOENT));
    assert_eq!(errno_of(fs::metadata(m.path("missing/x"))), Some(libc::ENOENT));
    assert_eq!(errno_of(fs::OpenOptions::new().write(true).create_new(true).open(&f)), Some(libc::EEXIST));
    assert_eq!(errno_of(fs::remove_file(&d)), Some(libc::EISDIR));
    assert_eq!(errno_of(fs::remove_dir(&f)), Some(libc::ENOTDIR));
    for i in 0..300 {
        fs::remove_file(d.join(format!("f{i:03}"))).expect("unlink");
    }
    fs::remove_dir(&d).expect("rmdir empty");
    assert!(!d.exists());

    phase("rename (plain, over a file, NOREPLACE, EXCHANGE), hard link, symlink, readlink");
    let b = m.path("b.txt");
    fs::rename(&f, &b).expect("rename");
    assert!(!f.exists() && fs::read(&b).expect("read renamed") == b"hello\0\0\0");
    fs::write(&f, b"other").expect("write");
    assert_eq!(errno_of(renameat2(&f, &b, libc::RENAME_NOREPLACE)), Some(libc::EEXIST));
    renameat2(&f, &b, libc::RENAME_EXCHANGE).expect("exchange");
    assert_eq!(fs::read(&b).expect("read"), b"other");
    assert_eq!(fs::read(&f).expect("read"), b"hello\0\0\0");
    fs::rename(&f, &b).expect("rename over");
    assert_eq!(fs::read(&b).expect("read"), b"hello\0\0\0");
    let l = m.path("hard");
    fs::hard_link(&b, &l).expect("link");
    assert_eq!(fs::metadata(&b).expect("stat").nlink(), 2);
    assert_eq!(fs::metadata(&l).expect("stat").ino(), fs::metadata(&b).expect("stat").ino());
    let s = m.path("sym");
    std::os::unix::fs::symlink("b.txt", &s).expect("symlink");
    assert_eq!(fs::read_link(&s).expect("readlink"), Path::new("b.txt"));
    assert!(fs::symlink_metadata(&s).expect("lstat").file_type().is_symlink());
    assert_eq!(fs::read(&s).expect("read through symlink"), b"hello\0\0\0");
    fs::remove_file(&l).expect("unlink link");
    assert_eq!(fs::metadata(&b).expect("stat").nlink(), 1);

    phase("chmod, chown, utimens (nanoseconds), mkfifo");
    fs::set_permissions(&b, fs::Permissions::from_mode(0o640)).expect("chmod");
    assert_eq!(fs::metadata(&b).expect("stat").mode() & 0o7777, 0o640);
    if nix::unistd::geteuid().is_root() {
        std::os::unix::fs::chown(&b, Some(1234), Some(5678)).expect("chown");
        let md = fs::metadata(&b).expect("stat");
        assert_eq!((md.uid(), md.gid()), (1234, 5678));
    }
    let t = SystemTime::UNIX_EPOCH + Duration::new(1_600_000_000, 123_456_789);
    fs::File::options()
        .write(true)
        .open(&b)
        .and_then(|h| h.set_times(fs::FileTimes::new().set_accessed(t).set_modified(t)))
        .expect("utimens");
    let md = fs::metadata(&b).expect("stat");
    assert_eq!((md.mtime(), md.mtime_nsec()), (1_600_000_000, 123_456_789));
    assert_eq!((md.atime(), md.atime_nsec()), (1_600_000_000, 123_456_789));
    let fifo = m.path("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).expect("mkfifo");
    assert!(fs::symlink_metadata(&fifo).expect("stat fifo").file_type().is_fifo());

    phase("xattrs: set, size probe, ERANGE, list, XATTR_CREATE/REPLACE, remove, ENODATA");
    setxattr(&b, "user.color", b"blue", 0).expect("setxattr");
    assert_eq!(getxattr(&b, "user.color", 0).expect("size probe").len(), 4);
    assert_eq!(getxattr(&b, "user.color", 64).expect("getxattr"), b"blue");
    assert_eq!(errno_of(getxattr(&b, "user.color", 2)), Some(libc::ERANGE));
    assert_eq!(errno_of(setxattr(&b, "user.color", b"red", libc::XATTR_CREATE)), Some(libc::EEXIST));
    assert_eq!(errno_of(setxattr(&b, "user.none", b"x", libc::XATTR_REPLACE)), Some(libc::ENODATA));
    setxattr(&b, "user.size", b"L", 0).expect("setxattr");
    let need = listxattr(&b, 0).expect("list size probe").len();
    let list = listxattr(&b, need).expect("listxattr");
    let mut names: Vec<&[u8]> = list.split(|c| *c == 0).filter(|n| !n.is_empty()).collect();
    names.sort();
    assert_eq!(names, vec![&b"user.color"[..], b"user.size"]);
    if need > 1 {
        assert_eq!(errno_of(listxattr(&b, need - 1)), Some(libc::ERANGE));
    }
    removexattr(&b, "user.color").expect("removexattr");
    assert_eq!(errno_of(getxattr(&b, "user.color", 64)), Some(libc::ENODATA));
    assert_eq!(errno_of(removexattr(&b, "user.color")), Some(libc::ENODATA));

    phase("security.capability: the mount remembers it is absent, yet a set or remove shows at once");
    // The kernel asks for it before every write; the mount caches it.
    assert_eq!(errno_of(getxattr(&b, "security.capability", 64)), Some(libc::ENODATA));
    // VFS_CAP_REVISION_2, CAP_NET_BIND_SERVICE permitted.
    let mut cap = Vec::new();
    for word in [0x0200_0000u32, 1 << 10, 0, 0, 0] {
        cap.extend_from_slice(&word.to_le_bytes());
    }
    setxattr(&b, "security.capability", &cap, 0).expect("set a file capability");
    assert_eq!(getxattr(&b, "security.capability", 64).expect("read the capability back"), cap);
    // A write by anyone drops the capability (the kernel removes it first).
    fs::OpenOptions::new().write(true).open(&b).and_then(|mut f| f.write_all(b"x")).expect("write");
    assert_eq!(errno_of(getxattr(&b, "security.capability", 64)), Some(libc::ENODATA), "a write kept the capability");
    setxattr(&b, "security.capability", &cap, 0).expect("set it again");
    removexattr(&b, "security.capability").expect("remove the capability");
    assert_eq!(errno_of(getxattr(&b, "security.capability", 64)), Some(libc::ENODATA));

    phase("statfs reports capacity; fsync succeeds");
    let st = nix::sys::statvfs::statvfs(&m.dir).expect("statvfs");
    assert!(st.blocks() > 0 && st.block_size() > 0, "no capacity reported: {st:?}");
    assert!(st.files() > 0);
    let h = fs::OpenOptions::new().write(true).open(&b).expect("open");
    h.sync_all().expect("fsync");
    drop(h);
    drop(m);
}

/// Goal: two mounts of one cluster see each other's changes within 2 s.
/// Method: make, change, rename and remove in one mount; poll the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_mounts_see_each_others_changes() {
    if !fuse_available() {
        return;
    }
    let (_cluster, config, logs) = start_cluster().await;
    let a = Mount::start(&config, &logs);
    let b = Mount::start(&config, &logs);

    let within = |what: &str, mut f: Box<dyn FnMut() -> bool + '_>| {
        let started = Instant::now();
        assert!(wait_until(COHERENCE, &mut f), "{what}: not seen within {COHERENCE:?}\n{}\n{}", a.log(), b.log());
        eprintln!("{what}: seen after {:?}", started.elapsed());
    };

    phase("B looks first (caches a miss); A creates the file; B sees it");
    assert!(!b.path("shared.txt").exists());
    fs::write(a.path("shared.txt"), b"one").expect("write in A");
    within("create in A, stat in B", Box::new(|| b.path("shared.txt").exists()));
    assert_eq!(fs::read(b.path("shared.txt")).expect("read in B"), b"one");

    phase("A rewrites it longer and closes; B reads the new contents (B had the old ones cached)");
    fs::write(a.path("shared.txt"), b"two, and longer").expect("rewrite in A");
    within("write in A, read in B", Box::new(|| fs::read(b.path("shared.txt")).is_ok_and(|d| d == b"two, and longer")));

    phase("A appends across a chunk boundary while B watches the size");
    let big = pattern(3, MIB + 4096);
    fs::OpenOptions::new().append(true).open(a.path("shared.txt")).and_then(|mut h| h.write_all(&big)).expect("append");
    let want = 15 + big.len() as u64;
    within("append in A, size in B", Box::new(|| fs::metadata(b.path("shared.txt")).is_ok_and(|m| m.len() == want)));
    let got = fs::read(b.path("shared.txt")).expect("read in B");
    assert!(got.len() as u64 == want && got[15..] == big[..], "B reads A's appended data");

    phase("B renames and makes a directory; A sees both");
    fs::rename(b.path("shared.txt"), b.path("moved.txt")).expect("rename in B");
    fs::create_dir(b.path("dir-from-b")).expect("mkdir in B");
    within("rename in B, lookup in A", Box::new(|| a.path("moved.txt").exists() && !a.path("shared.txt").exists()));
    within(
        "mkdir in B, readdir in A",
        Box::new(|| fs::read_dir(&a.dir).is_ok_and(|rd| rd.flatten().any(|e| e.file_name() == "dir-from-b"))),
    );

    phase("A removes both; B sees them gone");
    fs::remove_file(a.path("moved.txt")).expect("unlink in A");
    fs::remove_dir(a.path("dir-from-b")).expect("rmdir in A");
    within("removal in A, lookup in B", Box::new(|| !b.path("moved.txt").exists() && !b.path("dir-from-b").exists()));

    phase("chmod in A shows in B");
    fs::write(a.path("mode"), b"x").expect("write");
    within("create", Box::new(|| b.path("mode").exists()));
    fs::set_permissions(a.path("mode"), fs::Permissions::from_mode(0o600)).expect("chmod");
    within("chmod in A, stat in B", Box::new(|| fs::metadata(b.path("mode")).is_ok_and(|m| m.mode() & 0o777 == 0o600)));

    phase("close-to-open: B opens right after A's close and reads A's size and bytes, no waiting");
    // B keeps the file's attributes cached between rounds (it reads it each
    // time), so only the open's check can make B see the new size at once.
    for round in 0..60u64 {
        let data = pattern(round, 1000 + (round as usize * 7919) % 20_000);
        if round % 3 == 2 {
            // Shrink in place: a truncate B's cache knows nothing of.
            let f = fs::OpenOptions::new().write(true).open(a.path("c2o")).expect("open in A");
            f.set_len(data.len() as u64 / 2).expect("truncate in A");
        } else {
            fs::write(a.path("c2o"), &data).expect("write in A");
        }
        let want = if round % 3 == 2 { None } else { Some(data) };
        let mut f = fs::File::open(b.path("c2o")).expect("open in B");
        let size = f.metadata().expect("fstat in B").len();
        let mut got = Vec::new();
        f.read_to_end(&mut got).expect("read in B");
        let a_size = fs::metadata(a.path("c2o")).expect("stat in A").len();
        assert_eq!(size, a_size, "round {round}: B's open sees A's size\n{}", b.log());
        assert_eq!(got.len() as u64, a_size, "round {round}: B reads the whole file");
        if let Some(want) = want {
            assert!(got == want, "round {round}: B reads A's bytes");
        }
    }
}

/// Goal: ordinary tools work on the mount and lose nothing.
/// Method: cp -a, tar and rsync a tree in and out and compare with diff -r;
/// git clone a local repository into the mount, commit there, git fsck;
/// sqlite3 builds a 10,000-row database and checks its integrity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordinary_tools_work_on_the_mount() {
    if !fuse_available() {
        return;
    }
    for tool in ["cp", "diff", "tar", "rsync", "git", "sqlite3"] {
        require_tool(tool);
    }
    let (cluster, config, logs) = start_cluster().await;
    let m = Mount::start(&config, &logs);
    let local = tempfile::Builder::new().prefix("locus-tools-").tempdir().expect("tempdir");
    let src = local.path().join("src");
    let mnt = m.dir.display().to_string();

    phase("a source tree: small and multi-chunk files, a subdirectory, a symlink, odd modes and old times");
    fs::create_dir_all(src.join("sub/deeper")).expect("mkdir");
    for (i, len) in [0usize, 1, 4095, 70_000, 2 * MIB + 17].iter().enumerate() {
        fs::write(src.join(format!("f{i}")), pattern(i as u64, *len)).expect("write");
    }
    fs::write(src.join("sub/deeper/note.txt"), b"deep\n").expect("write");
    fs::set_permissions(src.join("f1"), fs::Permissions::from_mode(0o600)).expect("chmod");
    std::os::unix::fs::symlink("f2", src.join("link")).expect("symlink");
    sh(&format!("touch -d '2021-03-04 05:06:07.123456789' {0}/f3 {0}/sub", src.display()));

    phase("cp -a in and back out: identical contents, modes and mtimes");
    sh(&format!("cp -a {} {mnt}/cp", src.display()));
    sh(&format!("diff -r {} {mnt}/cp", src.display()));
    let stat =
        |p: &str| sh(&format!("cd {p} && find . -exec stat -c '%n %a %Y %s %F' {{}} + | grep -v '^\\. ' | sort"));
    let want = sh(&format!("cd {} && find . -type f -exec stat -c '%n %a %y %s' {{}} + | sort", src.display()));
    let got = sh(&format!("cd {mnt}/cp && find . -type f -exec stat -c '%n %a %y %s' {{}} + | sort"));
    assert_eq!(got, want, "cp -a keeps modes, sizes and nanosecond mtimes");
    sh(&format!("cp -a {mnt}/cp {}/back", local.path().display()));
    sh(&format!("diff -r {} {}/back", src.display(), local.path().display()));
    assert_eq!(
        stat(&format!("{}/back", local.path().display()))
            .lines()
            .filter(|l| !l.contains("directory"))
            .collect::<Vec<_>>(),
        stat(&src.display().to_string()).lines().filter(|l| !l.contains("directory")).collect::<Vec<_>>()
    );

    phase("tar c into the mount, tar x inside it");
    sh(&format!("tar -C {} -cf {mnt}/tree.tar .", src.display()));
    sh(&format!("mkdir {mnt}/untar && tar -C {mnt}/untar -xf {mnt}/tree.tar"));
    sh(&format!("diff -r {} {mnt}/untar", src.display()));

    phase("rsync -a; a second run finds nothing to do (sizes and mtimes kept)");
    sh(&format!("rsync -a {}/ {mnt}/rs/", src.display()));
    sh(&format!("diff -r {} {mnt}/rs", src.display()));
    let again = sh(&format!("rsync -ai {}/ {mnt}/rs/", src.display()));
    assert_eq!(again.trim(), "", "second rsync changed things:\n{again}");

    phase("git: clone a local repository into the mount, commit there, fsck");
    let repo = local.path().join("repo");
    let git = "git -c user.name=test -c user.email=test@example.com -c init.defaultBranch=main";
    sh(&format!("mkdir {0} && cd {0} && {git} init -q", repo.display()));
    for i in 0..3 {
        fs::write(repo.join(format!("file{i}.txt")), format!("version {i}\n")).expect("write");
        fs::write(repo.join(format!("blob{i}")), pattern(10 + i, 200_000)).expect("write");
        sh(&format!("cd {} && git add -A && {git} commit -qm 'commit {i}'", repo.display()));
    }
    sh(&format!("{git} clone -q {} {mnt}/clone", repo.display()));
    sh(&format!("cd {mnt}/clone && git fsck --full --strict"));
    assert_eq!(sh(&format!("cd {mnt}/clone && git log --oneline | wc -l")).trim(), "3");
    sh(&format!("cd {mnt}/clone && echo more > new.txt && git add new.txt && {git} commit -qm 'in the mount'"));
    sh(&format!("cd {mnt}/clone && {git} gc -q && git fsck --full --strict && git status --porcelain"));
    assert_eq!(sh(&format!("cd {mnt}/clone && git log --oneline | wc -l")).trim(), "4");

    phase("sqlite3: 10,000 rows, then PRAGMA integrity_check says ok");
    let sql = "create table t(id integer primary key, v text); \
               with recursive c(x) as (select 1 union all select x + 1 from c where x < 10000) \
               insert into t(v) select 'row ' || x from c; \
               create index tv on t(v);";
    sh(&format!("sqlite3 {mnt}/db.sqlite \"{sql}\""));
    for i in 0..20 {
        sh(&format!("sqlite3 {mnt}/db.sqlite \"update t set v = 'changed {i}' where id = {};\"", i * 400 + 1));
    }
    assert_eq!(sh(&format!("sqlite3 {mnt}/db.sqlite 'pragma integrity_check;'")).trim(), "ok");
    assert_eq!(sh(&format!("sqlite3 {mnt}/db.sqlite 'select count(*) from t;'")).trim(), "10000");

    phase("after unmounting, the data is still there for a new mount");
    drop(m);
    let m2 = Mount::start(&config, &logs);
    sh(&format!("diff -r {} {}/cp", src.display(), m2.dir.display()));
    assert_eq!(sh(&format!("sqlite3 {}/db.sqlite 'pragma integrity_check;'", m2.dir.display())).trim(), "ok");
    drop(m2);
    drop(cluster);
}

/// Goal: mount and umount fail clearly (exit code 4 for a mount that
/// cannot start, the problem named), and a signalled mount flushes and
/// goes away.
/// Method: mount on a missing directory, a file, a mounted directory and
/// with an unreachable cluster; umount a directory a process sits in;
/// SIGTERM a foreground mount while a file is open with unflushed data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mount_errors_are_clear_and_sigterm_unmounts() {
    if !fuse_available() {
        return;
    }
    let (cluster, config, logs) = start_cluster().await;
    let scratch = tempfile::Builder::new().prefix("locus-mnterr-").tempdir().expect("tempdir");
    let base = scratch.path().canonicalize().expect("canonical");

    phase("a missing directory, a file: exit 4, the problem named");
    let out = locus_mount(&config, &base.join("missing"), &logs, &[]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("does not exist"), "{}", stderr(&out));
    fs::write(base.join("file"), b"x").expect("write");
    let out = locus_mount(&config, &base.join("file"), &logs, &[]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("not a directory"), "{}", stderr(&out));

    phase("an unreachable cluster: exit 4, names the cluster");
    let dead = cluster.write_cli_config("client", Some(vec!["127.0.0.1:9".into()]), 1_000);
    fs::create_dir(base.join("m0")).expect("mkdir");
    let out = locus_mount(&dead, &base.join("m0"), &logs, &[]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("cannot reach the cluster"), "{}", stderr(&out));
    assert!(!is_mounted(&base.join("m0")));

    phase("an already mounted directory: exit 4, 'already mounted'");
    let m = Mount::start(&config, &logs);
    let out = locus_mount(&config, &m.dir, &logs, &[]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("already mounted"), "{}", stderr(&out));

    phase("umount while a process has its cwd inside: fails naming EBUSY; succeeds once it is gone");
    let mut sleeper = Command::new("sleep").arg("60").current_dir(&m.dir).spawn().expect("spawn sleep");
    let out = locus_umount(&m.dir);
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("EBUSY"), "{}", stderr(&out));
    assert!(is_mounted(&m.dir));
    let out = locus_umount(&m.dir);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!is_mounted(&m.dir));
    let out = locus_umount(&m.dir);
    assert!(stderr(&out).contains("not mounted"), "{}", stderr(&out));
    drop(m);

    phase("SIGTERM to a foreground mount with a file open and unflushed: data flushed, mount gone, exit 0");
    let dir = base.join("fg");
    fs::create_dir(&dir).expect("mkdir");
    let mut child = ForegroundMount::spawn(&config, &dir);
    assert!(wait_until(Duration::from_secs(20), || is_mounted(&dir)), "foreground mount did not come up");
    let data = pattern(9, MIB / 2 + 3);
    let mut open = fs::File::create(dir.join("held.bin")).expect("create");
    open.write_all(&data).expect("write");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.pid()), nix::sys::signal::Signal::SIGTERM).expect("kill");
    // Busy (the file is open): detached lazily, served until it is closed.
    assert!(wait_until(Duration::from_secs(10), || !is_mounted(&dir)), "mount still attached after SIGTERM");
    drop(open);
    let status = child.wait(Duration::from_secs(30));
    assert_eq!(status, Some(0), "mount process did not exit cleanly after SIGTERM");
    let (code, out, err) = locus_cli(&config, &["fs", "stat", "/held.bin", "--json"], None);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("\"size\": {}", data.len())), "size after SIGTERM: {out}");
    let fetched = base.join("fetched");
    let (code, _, err) =
        locus_cli(&config, &["fs", "get", "/held.bin", &fetched.display().to_string(), "--quiet"], None);
    assert_eq!(code, 0, "{err}");
    assert!(fs::read(&fetched).expect("read fetched") == data, "data written before SIGTERM survived");
}

/// A `locus mount --foreground` child; killed and unmounted on drop.
struct ForegroundMount {
    child: Option<Child>,
    dir: PathBuf,
}

impl ForegroundMount {
    fn spawn(config: &Path, dir: &Path) -> ForegroundMount {
        let child = Command::new(bin("locus"))
            .arg("--config")
            .arg(config)
            .args(["mount", "--foreground"])
            .arg(dir)
            .env("LOCUS_LOG", "info")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn locus mount --foreground");
        ForegroundMount { child: Some(child), dir: dir.to_path_buf() }
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    /// The exit code, once it exits within `timeout`.
    fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(s)) = child.try_wait() {
                self.child = None;
                return s.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ForegroundMount {
    fn drop(&mut self) {
        unmount(&self.dir);
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One step of [`random_operations_match_a_model`].
#[derive(Debug, Clone, Copy)]
enum FsxOp {
    Write { off: u64, len: usize, seed: u8 },
    Read { off: u64, len: usize },
    MapWrite { off: u64, len: usize, byte: u8 },
    MapRead { off: u64, len: usize },
    Truncate { size: u64 },
    Fallocate { mode: i32, off: u64, len: u64 },
    Copy { src: u64, dst: u64, len: usize },
    Fsync,
    Reopen,
    Check,
}

/// An fsx-style exerciser: random operations on one file, each checked
/// against an in-memory model of its bytes and size.
struct Fsx {
    path: PathBuf,
    /// The same file through another mount, compared at every check.
    other: PathBuf,
    file: fs::File,
    model: Vec<u8>,
    log: Vec<String>,
}

impl Fsx {
    fn fail(&self, what: String) -> ! {
        let tail: Vec<&String> = self.log.iter().rev().take(25).collect();
        panic!("{what}\nlast operations, newest first:\n{tail:#?}");
    }

    fn set_size(&mut self, n: u64) {
        self.model.resize(n as usize, 0);
    }

    fn compare(&self, got: &[u8], off: u64, what: &str) {
        let want = &self.model[(off as usize).min(self.model.len())..(off as usize + got.len()).min(self.model.len())];
        if got != want {
            let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(want.len().min(got.len()));
            let differ = got.iter().zip(want).filter(|(a, b)| a != b).count();
            let last = got.iter().zip(want).rposition(|(a, b)| a != b).unwrap_or(at);
            let zeros = got[at..=last.min(got.len().saturating_sub(1))].iter().all(|&b| b == 0);
            self.fail(format!(
                "{what}: {} bytes at {off} differ from the model from byte {} to byte {} ({differ} bytes differ; \
                 what was read there is {}all zeros)",
                got.len(),
                off + at as u64,
                off + last as u64,
                if zeros { "" } else { "not " }
            ));
        }
    }

    fn check_whole(&self, f: &fs::File, what: &str) {
        let size = f.metadata().expect("fstat").len();
        if size != self.model.len() as u64 {
            self.fail(format!("{what}: size {size}, the model has {}", self.model.len()));
        }
        let mut got = vec![0u8; self.model.len()];
        std::os::unix::fs::FileExt::read_exact_at(f, &mut got, 0).expect("read whole file");
        self.compare(&got, 0, what);
    }

    fn map(&self, off: u64, len: usize, write: bool) -> (*mut libc::c_void, usize, usize) {
        use std::os::fd::AsRawFd;
        let page = 4096u64;
        let start = off / page * page;
        let span = (off + len as u64 - start) as usize;
        let prot = if write { libc::PROT_READ | libc::PROT_WRITE } else { libc::PROT_READ };
        // SAFETY: a fresh shared mapping of our own open file, inside its size.
        let p = unsafe {
            libc::mmap(std::ptr::null_mut(), span, prot, libc::MAP_SHARED, self.file.as_raw_fd(), start as i64)
        };
        if p == libc::MAP_FAILED {
            self.fail(format!("mmap {start}+{span}: {}", std::io::Error::last_os_error()));
        }
        (p, span, (off - start) as usize)
    }

    fn apply(&mut self, op: FsxOp) {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::FileExt;
        self.log.push(format!("{op:?}"));
        match op {
            FsxOp::Write { off, len, seed } => {
                let data: Vec<u8> = (0..len).map(|i| seed.wrapping_add((i * 31 % 251) as u8)).collect();
                self.file.write_all_at(&data, off).expect("pwrite");
                if off + len as u64 > self.model.len() as u64 {
                    self.set_size(off + len as u64);
                }
                self.model[off as usize..off as usize + len].copy_from_slice(&data);
            }
            FsxOp::Read { off, len } => {
                let mut got = vec![0u8; len];
                let n = self.file.read_at(&mut got, off).expect("pread");
                let want = self.model.len().saturating_sub(off as usize).min(len);
                if n != want {
                    self.fail(format!("pread {off}+{len} returned {n} bytes, the model has {want}"));
                }
                self.compare(&got[..n], off, "pread");
            }
            FsxOp::MapWrite { off, len, byte } => {
                let (p, span, at) = self.map(off, len, true);
                // SAFETY: inside the mapping made above, unmapped right after.
                unsafe {
                    std::ptr::write_bytes((p as *mut u8).add(at), byte, len);
                    assert_eq!(libc::msync(p, span, libc::MS_SYNC), 0, "msync");
                    libc::munmap(p, span);
                }
                self.model[off as usize..off as usize + len].fill(byte);
            }
            FsxOp::MapRead { off, len } => {
                let (p, span, at) = self.map(off, len, false);
                // SAFETY: inside the mapping made above, unmapped right after.
                let got = unsafe { std::slice::from_raw_parts((p as *const u8).add(at), len).to_vec() };
                unsafe { libc::munmap(p, span) };
                self.compare(&got, off, "mapped read");
            }
            FsxOp::Truncate { size } => {
                self.file.set_len(size).expect("ftruncate");
                self.set_size(size);
            }
            FsxOp::Fallocate { mode, off, len } => {
                // SAFETY: plain syscall on our own descriptor.
                let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off as i64, len as i64) };
                if r != 0 {
                    self.fail(format!("fallocate mode {mode:#x}: {}", std::io::Error::last_os_error()));
                }
                let end = off + len;
                let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
                if !keep && end > self.model.len() as u64 {
                    self.set_size(end);
                }
                if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0 {
                    let e = (end as usize).min(self.model.len());
                    if (off as usize) < e {
                        self.model[off as usize..e].fill(0);
                    }
                }
            }
            FsxOp::Copy { src, dst, len } => {
                let (mut s, mut d) = (src as i64, dst as i64);
                let fd = self.file.as_raw_fd();
                // SAFETY: plain syscall on our own descriptor and locals.
                let n = unsafe { libc::copy_file_range(fd, &mut s, fd, &mut d, len, 0) };
                if n != len as isize {
                    self.fail(format!("copy_file_range copied {n} of {len}: {}", std::io::Error::last_os_error()));
                }
                let data = self.model[src as usize..src as usize + len].to_vec();
                if dst + len as u64 > self.model.len() as u64 {
                    self.set_size(dst + len as u64);
                }
                self.model[dst as usize..dst as usize + len].copy_from_slice(&data);
            }
            FsxOp::Fsync => self.file.sync_all().expect("fsync"),
            FsxOp::Reopen => {
                self.file = fs::OpenOptions::new().read(true).write(true).open(&self.path).expect("reopen");
            }
            FsxOp::Check => {
                self.check_whole(&self.file, "this mount");
                let other = fs::File::open(&self.other).expect("open through the other mount");
                self.check_whole(&other, "the other mount");
            }
        }
        let size = self.file.metadata().expect("fstat").len();
        if size != self.model.len() as u64 {
            self.fail(format!("after {op:?}: size {size}, the model has {}", self.model.len()));
        }
    }
}

/// Goal: random reads, writes, mapped writes, truncates, hole punches,
/// zeroing, allocation and copies give the bytes and sizes a local
/// filesystem gives, around a chunk boundary, and another mount sees the
/// same file after each close (fsx-style).
/// Method: 1,200 seeded random operations on one file of a 1 MiB-chunk
/// cluster, in a window across the first chunk boundary, each checked
/// against an in-memory model; at every check the whole file is compared
/// through both mounts (the file is reopened first, for close-to-open).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_operations_match_a_model() {
    use rand::{Rng, SeedableRng};
    if !fuse_available() {
        return;
    }
    let (_cluster, config, logs) = start_cluster().await;
    let a = Mount::start(&config, &logs);
    let b = Mount::start(&config, &logs);
    let path = a.path("fsx.bin");
    let file = fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).expect("create");
    let mut fsx = Fsx { path, other: b.path("fsx.bin"), file, model: Vec::new(), log: Vec::new() };
    let mut rng = rand::rngs::StdRng::seed_from_u64(20261201);
    // A window of 512 KiB across the 1 MiB chunk boundary.
    let base = MIB as u64 - 256 * 1024;
    let window = 512 * 1024u64;
    for n in 0..1200 {
        let off = base + rng.gen_range(0..window);
        let len = rng.gen_range(1..48 * 1024usize);
        let size = fsx.model.len() as u64;
        let inside = |rng: &mut rand::rngs::StdRng, len: usize| -> Option<(u64, usize)> {
            (size > 0).then(|| {
                let o = rng.gen_range(base.min(size - 1)..size);
                (o, len.min((size - o) as usize))
            })
        };
        let op = match rng.gen_range(0..20) {
            0..=4 => FsxOp::Write { off, len, seed: rng.gen() },
            5..=7 => match inside(&mut rng, len) {
                Some((off, len)) => FsxOp::Read { off, len },
                None => continue,
            },
            8 => match inside(&mut rng, len) {
                Some((off, len)) => FsxOp::MapWrite { off, len, byte: rng.gen() },
                None => continue,
            },
            9 => match inside(&mut rng, len) {
                Some((off, len)) => FsxOp::MapRead { off, len },
                None => continue,
            },
            10 | 11 => FsxOp::Truncate { size: if rng.gen_ratio(1, 10) { 0 } else { base + rng.gen_range(0..window) } },
            12 => {
                FsxOp::Fallocate { mode: libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, off, len: len as u64 }
            }
            13 => FsxOp::Fallocate { mode: libc::FALLOC_FL_ZERO_RANGE, off, len: len as u64 },
            14 => FsxOp::Fallocate { mode: 0, off, len: len as u64 },
            15 => {
                let Some((src, len)) = inside(&mut rng, len) else { continue };
                let dst = base + rng.gen_range(0..window);
                if src < dst + len as u64 && dst < src + len as u64 {
                    continue;
                }
                FsxOp::Copy { src, dst, len }
            }
            16 => FsxOp::Fsync,
            17 => FsxOp::Reopen,
            _ => {
                if n % 2 == 0 {
                    continue;
                }
                // Close first: the other mount is promised what was closed.
                fsx.apply(FsxOp::Reopen);
                FsxOp::Check
            }
        };
        fsx.apply(op);
    }
    fsx.apply(FsxOp::Reopen);
    fsx.apply(FsxOp::Check);
    eprintln!("{} operations; final size {}", fsx.log.len(), fsx.model.len());
}

/// Goal: a file that is open keeps working after its last name goes, as
/// on a local filesystem (unlink, or a rename over it): reads and writes
/// through the open descriptor, fstat shows nlink 0; and the file is
/// freed when the last descriptor closes (its inode is gone, its chunks
/// with it). A truncate sets mtime even when the size stays.
/// Method: one mount; a 2 MiB file (two chunks) opened twice, unlinked,
/// read, written and fsynced through one descriptor, read through the
/// other; closed; the inode is asked for by number. The same for a file
/// replaced by a rename. Then truncate(2) and O_TRUNC of an empty file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_files_outlive_their_names() {
    if !fuse_available() {
        return;
    }
    let (cluster, config, logs) = start_cluster().await;
    let m = Mount::start(&config, &logs);
    use std::os::unix::fs::FileExt;

    phase("unlink while open twice: read, write, fsync through the descriptors");
    let p = m.path("tmp.bin");
    let data = pattern(21, 2 * MIB);
    fs::write(&p, &data).expect("write");
    let rw = fs::OpenOptions::new().read(true).write(true).open(&p).expect("open rw");
    let ro = fs::File::open(&p).expect("open ro");
    let ino = rw.metadata().expect("fstat").ino();
    fs::remove_file(&p).expect("unlink");
    assert!(!p.exists(), "the name is gone");
    assert_eq!(rw.metadata().expect("fstat").nlink(), 0);
    let mut buf = vec![0u8; 4096];
    rw.read_exact_at(&mut buf, MIB as u64 - 100).expect("read after unlink");
    assert!(buf[..] == data[MIB - 100..MIB - 100 + 4096]);
    rw.write_all_at(b"still here", 5).expect("write after unlink");
    rw.sync_all().expect("fsync after unlink");
    let mut head = [0u8; 15];
    ro.read_exact_at(&mut head, 0).expect("read through the other descriptor");
    let want: Vec<u8> = data[..5].iter().chain(b"still here").copied().collect();
    assert_eq!(&head[..], &want[..]);
    let client = cluster.client();
    assert!(client.getattr(ino).await.is_ok(), "kept while open");
    drop(rw);
    assert!(client.getattr(ino).await.is_ok(), "kept while the other descriptor is open");
    drop(ro);
    assert!(freed(&client, ino).await, "inode {ino} freed after the last close\n{}", m.log());

    phase("a rename over an open file: the old contents stay readable through it");
    let (a, b) = (m.path("a"), m.path("b"));
    fs::write(&a, b"new contents").expect("write a");
    fs::write(&b, b"old contents").expect("write b");
    let old = fs::File::open(&b).expect("open b");
    let old_ino = old.metadata().expect("fstat").ino();
    fs::rename(&a, &b).expect("rename over");
    assert_eq!(fs::read(&b).expect("read b"), b"new contents");
    let mut got = [0u8; 12];
    old.read_exact_at(&mut got, 0).expect("read the replaced file");
    assert_eq!(&got, b"old contents");
    assert_eq!(old.metadata().expect("fstat").nlink(), 0);
    drop(old);
    assert!(freed(&client, old_ino).await, "the replaced inode is freed after its last close");

    phase("truncate(2) to the same size, and O_TRUNC of an empty file, set mtime");
    let t = m.path("t");
    fs::write(&t, b"").expect("create");
    let m0 = fs::metadata(&t).expect("stat");
    let before = m0.mtime() * 1_000_000_000 + m0.mtime_nsec();
    std::thread::sleep(Duration::from_millis(20));
    fs::OpenOptions::new().write(true).truncate(true).open(&t).expect("O_TRUNC");
    let after = fs::metadata(&t).expect("stat");
    assert!(after.mtime() * 1_000_000_000 + after.mtime_nsec() > before, "O_TRUNC of an empty file sets mtime");

    phase("locus umount returns once the daemon has synced and exited");
    for i in 0..20 {
        fs::write(m.path(&format!("last{i}")), b"unsynced until the unmount").expect("write");
    }
    let out = locus_umount(&m.dir);
    assert!(out.status.success(), "locus umount: {}", stderr(&out));
    let running = Command::new("pgrep").arg("-f").arg(format!("mount {}", m.dir.display())).output().expect("pgrep");
    assert!(
        running.stdout.is_empty(),
        "the mount daemon outlived locus umount: {}",
        String::from_utf8_lossy(&running.stdout)
    );
    assert!(m.log().contains("unmounted"), "{}", m.log());
}

/// Goal: a read-only mount (`--read-only`, for inspection and recovery)
/// reads everything and refuses every change with EROFS, as `mount -o ro`
/// does, while still seeing other mounts' changes.
/// Method: a writable mount makes a file, a directory and a symlink; a
/// read-only mount of the same cluster reads them and tries each kind of
/// change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_mount_refuses_every_change() {
    if !fuse_available() {
        return;
    }
    let (_cluster, config, logs) = start_cluster().await;
    let w = Mount::start(&config, &logs);
    let r = Mount::start_with(&config, &logs, &["--read-only"]);
    let data = pattern(9, 300_000);
    fs::write(w.path("f"), &data).expect("write");
    fs::create_dir(w.path("d")).expect("mkdir");
    std::os::unix::fs::symlink("f", w.path("l")).expect("symlink");

    phase("it reads what the other mount wrote");
    assert!(fs::read(r.path("f")).expect("read") == data);
    assert_eq!(fs::read_link(r.path("l")).expect("readlink"), Path::new("f"));
    let mounts = fs::read_to_string("/proc/mounts").expect("/proc/mounts");
    let line = mounts.lines().find(|l| l.contains(&*r.dir.to_string_lossy())).expect("listed in /proc/mounts");
    assert!(line.split_whitespace().nth(3).is_some_and(|o| o.split(',').any(|x| x == "ro")), "{line}");

    phase("every change is EROFS");
    let rofs = Some(libc::EROFS);
    assert_eq!(errno_of(fs::OpenOptions::new().write(true).open(r.path("f"))), rofs, "open for writing");
    assert_eq!(errno_of(fs::write(r.path("new"), b"x")), rofs, "create");
    assert_eq!(errno_of(fs::create_dir(r.path("d2"))), rofs, "mkdir");
    assert_eq!(errno_of(fs::remove_file(r.path("f"))), rofs, "unlink");
    assert_eq!(errno_of(fs::remove_dir(r.path("d"))), rofs, "rmdir");
    assert_eq!(errno_of(fs::rename(r.path("f"), r.path("g"))), rofs, "rename");
    assert_eq!(errno_of(fs::hard_link(r.path("f"), r.path("h"))), rofs, "link");
    assert_eq!(errno_of(std::os::unix::fs::symlink("f", r.path("l2"))), rofs, "symlink");
    assert_eq!(errno_of(fs::set_permissions(r.path("f"), fs::Permissions::from_mode(0o600))), rofs, "chmod");
    assert_eq!(errno_of(setxattr(&r.path("f"), "user.k", b"v", 0)), rofs, "setxattr");
    let f = fs::File::open(r.path("f")).expect("open for reading");
    assert_eq!(errno_of(f.set_len(1)), Some(libc::EINVAL), "ftruncate of a read-only descriptor");
    drop(f);
    assert_eq!(fs::read(w.path("f")).expect("read").len(), data.len(), "nothing changed");

    phase("the other mount's changes still show");
    fs::write(w.path("f"), b"changed").expect("rewrite");
    let seen = wait_until(Duration::from_secs(5), || fs::read(r.path("f")).is_ok_and(|d| d == b"changed"));
    assert!(seen, "the read-only mount never saw the rewrite\n{}", r.log());
}

/// `lseek(fd, offset, whence)`: the offset, or the errno.
fn seek(f: &fs::File, offset: u64, whence: i32) -> Result<u64, i32> {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on an open descriptor.
    let r = unsafe { libc::lseek(f.as_raw_fd(), offset as libc::off_t, whence) };
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(r as u64)
    }
}

/// Goal: sparse files look sparse, as tools that copy or back up disk
/// images expect: `st_blocks` counts allocated chunks only, and
/// `SEEK_DATA`/`SEEK_HOLE` find them (at chunk granularity: 1 MiB here).
/// Method: data in chunks 0 and 5 of a 12 MiB file; stat, lseek, and
/// `cp --sparse=auto` out of the mount (it skips the holes it is told).
/// Sizes past the largest file fail with EFBIG.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparse_files_show_their_holes() {
    if !fuse_available() {
        return;
    }
    let (_cluster, config, logs) = start_cluster().await;
    let m = Mount::start(&config, &logs);
    use std::os::unix::fs::FileExt;

    phase("stat counts the allocated chunks, not the size");
    let p = m.path("disk.img");
    let f = fs::OpenOptions::new().read(true).write(true).create_new(true).open(&p).expect("create");
    f.write_all_at(&pattern(1, 4096), 0).expect("write chunk 0");
    f.write_all_at(&pattern(2, 4096), 5 * MIB as u64 + 100).expect("write chunk 5");
    f.set_len(12 * MIB as u64).expect("extend");
    f.sync_all().expect("fsync");
    drop(f);
    let want = 2 * MIB as u64 / 512;
    let mut blocks = 0;
    let settled = wait_until(Duration::from_secs(5), || {
        blocks = fs::metadata(&p).map(|s| s.blocks()).unwrap_or(0);
        blocks == want
    });
    assert!(settled, "st_blocks {blocks}, want {want} (two 1 MiB chunks)\n{}", m.log());
    assert_eq!(fs::metadata(&p).expect("stat").len(), 12 * MIB as u64);

    phase("SEEK_DATA and SEEK_HOLE find the chunks");
    let f = fs::File::open(&p).expect("open");
    let (data, hole) = (libc::SEEK_DATA, libc::SEEK_HOLE);
    let mib = MIB as u64;
    assert_eq!(seek(&f, 0, data), Ok(0));
    assert_eq!(seek(&f, 100, hole), Ok(mib));
    assert_eq!(seek(&f, mib, data), Ok(5 * mib));
    assert_eq!(seek(&f, 5 * mib + 7, data), Ok(5 * mib + 7));
    assert_eq!(seek(&f, 5 * mib, hole), Ok(6 * mib));
    assert_eq!(seek(&f, 6 * mib, data), Err(libc::ENXIO), "no data after the last chunk");
    assert_eq!(seek(&f, 7 * mib, hole), Ok(7 * mib));
    assert_eq!(seek(&f, 12 * mib, hole), Err(libc::ENXIO), "at the end");
    drop(f);

    let out_dir_for_tar = tempfile::tempdir().expect("tempdir");
    phase("writes not yet sent count as data");
    let q = m.path("fresh");
    let g = fs::OpenOptions::new().read(true).write(true).create_new(true).open(&q).expect("create");
    g.write_all_at(b"buffered", 3 * mib + 5).expect("write");
    assert_eq!(seek(&g, 0, data), Ok(3 * mib));
    assert_eq!(seek(&g, 0, hole), Ok(0));
    drop(g);

    phase("tar --sparse archives data this mount has not sent yet");
    let t = m.path("unsent");
    let h = fs::OpenOptions::new().read(true).write(true).create_new(true).open(&t).expect("create");
    h.write_all_at(&pattern(3, 8192), 4096).expect("write");
    assert!(fs::metadata(&t).expect("stat").blocks() > 0, "0 blocks: tar would take it for all holes");
    let arch = out_dir_for_tar.path().join("a.tar");
    let out = Command::new("tar")
        .arg("--sparse")
        .arg("-cf")
        .arg(&arch)
        .arg("-C")
        .arg(&m.dir)
        .arg("unsent")
        .output()
        .expect("tar");
    assert!(out.status.success(), "tar: {}", stderr(&out));
    drop(h);
    let x = out_dir_for_tar.path().join("x");
    fs::create_dir(&x).expect("mkdir");
    let out = Command::new("tar").arg("-xf").arg(&arch).arg("-C").arg(&x).output().expect("untar");
    assert!(out.status.success(), "untar: {}", stderr(&out));
    assert!(fs::read(x.join("unsent")).expect("read") == fs::read(&t).expect("read"), "tar lost the unsent data");

    phase("a size past the largest file is EFBIG, as on a local filesystem");
    let big = fs::OpenOptions::new().write(true).open(&q).expect("open");
    assert_eq!(errno_of(big.set_len((1 << 60) + 1)), Some(libc::EFBIG));
    assert_eq!(errno_of(big.write_all_at(b"x", 1 << 60)), Some(libc::EFBIG));
    assert_eq!(big.metadata().expect("fstat").len(), 3 * mib + 13, "unchanged");
    drop(big);

    phase("cp copies the data and leaves the holes where the mount says they are");
    let out_dir = tempfile::tempdir().expect("tempdir");
    let copy = out_dir.path().join("disk.img");
    let out = Command::new("cp").arg("--sparse=auto").arg(&p).arg(&copy).output().expect("cp");
    assert!(out.status.success(), "cp: {}", stderr(&out));
    assert!(fs::read(&copy).expect("read copy") == fs::read(&p).expect("read"), "the copy differs");
    let copied = fs::metadata(&copy).expect("stat copy").blocks();
    // `auto` makes holes only where the source reports them (zeros read
    // are written): a copy of the whole size would take 24,576 blocks.
    assert!(copied <= want + 64, "the copy takes {copied} blocks, more than the {want} of the data");
}

/// Whether inode `ino` is gone (NotFound) within 10 s.
async fn freed(client: &fs_client::client::MetaClient, ino: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match client.getattr(ino).await {
            Err(e) if e.code() == fs_client::proto::ErrorCode::NotFound => return true,
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    false
}
