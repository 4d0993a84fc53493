//! The NBD export with real processes: `locus nbd serve` over a test
//! cluster (3 metadata nodes, 3 chunk servers, 1 MiB chunks), used by the
//! real clients (qemu-img, qemu-io, nbdinfo, nbdcopy, fio) and by a raw
//! socket that breaks the rules.
//!
//! Every server process has a guard that kills it when the test ends,
//! also when it fails; the tests that stop it themselves check that
//! SIGTERM makes it flush and exit 0.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use fs_client::file::FileClient;
use fs_client::proto::*;
use locus_tests::files::{layout, pattern};
use locus_tests::mount::{fuse_available, Mount};
use locus_tests::{bin, init_logging, locus_cli, phase, Cluster, ClusterOptions};

const MIB: u64 = 1 << 20;
/// How long a client tool may run.
const TOOL_TIMEOUT_SECS: u32 = 120;
/// How long the server may take to print its URI, or to exit after SIGTERM.
const SERVER_TIMEOUT: Duration = Duration::from_secs(30);

/// A `locus nbd serve` process; killed on drop.
struct NbdServer {
    child: Option<Child>,
    uri: String,
    log: PathBuf,
}

impl NbdServer {
    /// Starts serving `file` and waits for the URI on stdout.
    fn start(config: &Path, file: &str, args: &[&str], log: PathBuf) -> NbdServer {
        Self::start_under(&[], config, file, args, log)
    }

    /// [`Self::start`] under a wrapper command (`faketime -f +60s`).
    fn start_under(wrapper: &[&str], config: &Path, file: &str, args: &[&str], log: PathBuf) -> NbdServer {
        let log_file = std::fs::File::create(&log).expect("server log");
        let locus = bin("locus");
        let mut cmd = match wrapper.split_first() {
            Some((w, rest)) => {
                let mut c = Command::new(w);
                c.args(rest).arg(&locus);
                c
            }
            None => Command::new(&locus),
        };
        // A group of its own: a wrapper (faketime) forks the export, and
        // stopping the wrapper alone would leave the export running.
        let mut child = cmd
            .process_group(0)
            .arg("--config")
            .arg(config)
            .args(["nbd", "serve", file])
            .args(args)
            .env("LOCUS_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .expect("spawn locus nbd serve");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        // The guard exists before anything is asserted.
        let mut s = NbdServer { child: Some(child), uri: String::new(), log };
        let line = rx.recv_timeout(SERVER_TIMEOUT).unwrap_or_default();
        assert!(line.starts_with("nbd"), "no URI from locus nbd serve (got {line:?})\n{}", s.log());
        s.uri = line.trim().to_string();
        eprintln!("serving {file} at {}", s.uri);
        s
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The TCP address of the URI (`nbd://ADDR/name`).
    fn addr(&self) -> String {
        let rest = self.uri.strip_prefix("nbd://").expect("a TCP URI");
        rest.split('/').next().expect("address").to_string()
    }

    /// SIGTERM, then the exit status.
    fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("server running");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        let deadline = Instant::now() + SERVER_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
                let _ = child.wait();
                panic!("locus nbd serve did not exit within {SERVER_TIMEOUT:?} of SIGTERM\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let group = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
            let _ = c.wait();
        }
    }
}

fn require_tool(name: &str) {
    let found =
        Command::new("bash").arg("-c").arg(format!("command -v {name}")).output().is_ok_and(|o| o.status.success());
    assert!(found, "{name} is not installed: run scripts/install-deps.sh");
}

/// Runs a tool under a time limit.
fn tool(name: &str, args: &[&str]) -> Output {
    Command::new("timeout")
        .arg(TOOL_TIMEOUT_SECS.to_string())
        .arg(name)
        .args(args)
        // Tools may leave state files (fio) where they run: not in the tree.
        .current_dir(std::env::temp_dir())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {name}: {e}"))
}

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs a tool; panics with its output (and the server's log) when it fails.
fn tool_ok(server: &NbdServer, name: &str, args: &[&str]) -> String {
    let o = tool(name, args);
    assert!(o.status.success(), "`{name} {}` failed: {}\n--- server log\n{}", args.join(" "), text(&o), server.log());
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `qemu-io -f FORMAT -c CMD... TARGET`; panics when it fails.
fn qemu_io(server: &NbdServer, format: &str, cmds: &[&str], target: &str) -> String {
    let mut args = vec!["-f", format];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(target);
    tool_ok(server, "qemu-io", &args)
}

async fn start_cluster() -> (Cluster, PathBuf) {
    init_logging();
    for t in ["qemu-img", "qemu-io", "nbdinfo", "nbdcopy", "fio", "timeout"] {
        require_tool(t);
    }
    let cluster = Cluster::start(ClusterOptions::default()).await.expect("cluster");
    let config = cluster.write_cli_config("client", None, 20_000);
    (cluster, config)
}

/// `locus fs truncate PATH SIZE`: a sparse image.
fn make_image(config: &Path, path: &str, size: &str) {
    let (code, out, err) = locus_cli(config, &["fs", "truncate", path, size], None);
    assert_eq!(code, 0, "locus fs truncate {path} {size}: {out}{err}");
}

async fn file_ino(c: &Cluster, path: &str) -> Ino {
    c.client().resolve(path.as_bytes(), true).await.expect("resolve").ino
}

/// The whole file through a fresh file client (nothing cached).
async fn read_file(files: &FileClient, ino: Ino) -> Vec<u8> {
    files.invalidate(ino);
    let size = files.size(ino).await.expect("size");
    let mut out = Vec::with_capacity(size as usize);
    while (out.len() as u64) < size {
        let d = files.read(ino, out.len() as u64, 4 * MIB).await.expect("read");
        assert!(!d.is_empty(), "short file at {}", out.len());
        out.extend_from_slice(&d);
    }
    out
}

fn tmp_path(dir: &Path, name: &str) -> String {
    dir.join(name).to_string_lossy().into_owned()
}

/// Goal: qemu's tools and nbdinfo see a correct disk, a qcow2 image copies
/// into it exactly, and what qemu-io writes is what the file holds after
/// the server stops.
/// Method: a 64 MiB sparse image; qemu-img info, nbdinfo; qemu-img convert
/// -n of a qcow2 with scattered data, then qemu-img compare; qemu-io
/// pattern writes and verified reads; block status shows holes; SIGTERM,
/// exit 0, and the file read through Locus equals the expected image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_tools_copy_an_image_exactly() {
    let (cluster, config) = start_cluster().await;
    let work = tempfile::tempdir().expect("work dir");
    make_image(&config, "/disk.img", "64M");
    let mut server =
        NbdServer::start(&config, "/disk.img", &["--listen", "127.0.0.1:0"], cluster.path().join("nbd.log"));
    let uri = server.uri.clone();
    assert!(uri.ends_with("/disk.img"), "the default name is the file's: {uri}");

    phase("qemu-img info and nbdinfo: size, flush, FUA, multi-conn, base:allocation");
    let info = tool_ok(&server, "qemu-img", &["info", "--output=json", "-f", "raw", &uri]);
    let info: serde_json::Value = serde_json::from_str(&info).expect("qemu-img json");
    assert_eq!(info["virtual-size"], 64 * MIB, "{info}");
    let ni = tool_ok(&server, "nbdinfo", &["--json", &uri]);
    let ni: serde_json::Value = serde_json::from_str(&ni).expect("nbdinfo json");
    let e = &ni["exports"][0];
    assert_eq!(e["export-size"], 64 * MIB, "{ni}");
    for flag in ["can_flush", "can_fua", "can_multi_conn", "can_trim", "can_zero"] {
        assert_eq!(e[flag], true, "{flag}: {ni}");
    }
    assert_eq!(e["is_read_only"], false, "{ni}");
    assert!(
        e["contexts"].as_array().is_some_and(|c| c.iter().any(|x| x == "base:allocation")),
        "base:allocation listed: {ni}"
    );
    assert_eq!(e["block_size_maximum"], 32 * MIB, "{ni}");
    let plain = tool_ok(&server, "nbdinfo", &[&uri]);
    assert!(plain.contains("can_flush: true") && plain.contains("can_fua: true"), "{plain}");

    phase("a qcow2 with scattered data converts into the export and compares identical");
    let qcow = tmp_path(work.path(), "src.qcow2");
    tool_ok(&server, "qemu-img", &["create", "-q", "-f", "qcow2", &qcow, "64M"]);
    let scattered = [
        "write -q -P 0x11 0 1M",
        "write -q -P 0x22 5M 3M",
        "write -q -P 0x33 40M 64k",
        "write -q -P 0x44 1000000 4097",
        "write -q -P 0x55 63M 1M",
    ];
    qemu_io(&server, "qcow2", &scattered, &qcow);
    tool_ok(&server, "qemu-img", &["convert", "-n", "-f", "qcow2", "-O", "raw", &qcow, &uri]);
    let cmp = tool_ok(&server, "qemu-img", &["compare", "-f", "qcow2", "-F", "raw", &qcow, &uri]);
    assert!(cmp.contains("identical"), "{cmp}");

    phase("qemu-io writes patterns and reads them back verified (also across a chunk boundary)");
    let cmds = [
        "write -P 0xab 0 1M",
        "read -P 0xab 0 1M",
        "write -P 0xcd 10485000 2M",
        "read -P 0xcd 10485000 2M",
        "read -P 0x22 5M 3M",
        "flush",
    ];
    let out = qemu_io(&server, "raw", &cmds, &uri);
    assert!(!out.contains("Pattern verification failed"), "{out}");

    phase("discard and write-zeroes punch holes: the ranges read as zeros, their neighbours keep their bytes");
    let cmds = [
        "write -P 0x5a 20M 3M",
        "discard 20M 1M",
        "write -z 21M 512K",
        "write -z -u 22M 4096",
        "read -P 0 20M 1536K",
        "read -P 0x5a 22016K 512K",
        "read -P 0 22M 4096",
        "read -P 0x5a 22532K 1020K",
        "flush",
    ];
    let out = qemu_io(&server, "raw", &cmds, &uri);
    assert!(!out.contains("Pattern verification failed"), "{out}");

    phase("block status: untouched ranges are holes, written ones data");
    let map = tool_ok(&server, "nbdinfo", &["--map", &uri]);
    eprintln!("{map}");
    assert!(map.lines().any(|l| l.contains("hole")), "some range is a hole: {map}");
    assert!(map.lines().any(|l| l.contains("data")), "some range is data: {map}");
    let qmap = tool_ok(&server, "qemu-img", &["map", "--output=json", "-f", "raw", &uri]);
    let qmap: serde_json::Value = serde_json::from_str(&qmap).expect("qemu-img map json");
    let at = |off: u64| {
        qmap.as_array()
            .and_then(|a| {
                a.iter().find(|e| {
                    let s = e["start"].as_u64().unwrap_or(0);
                    s <= off && off < s + e["length"].as_u64().unwrap_or(0)
                })
            })
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(at(5 * MIB)["data"], true, "written data is data: {qmap}");
    assert_eq!(at(30 * MIB)["zero"], true, "an untouched MiB reads as zero: {qmap}");

    phase("SIGTERM: the server flushes and exits 0; the file holds exactly the expected image");
    assert!(server.stop().success(), "exit status\n{}", server.log());
    let expected = tmp_path(work.path(), "expected.raw");
    tool_ok(&server, "qemu-img", &["convert", "-f", "qcow2", "-O", "raw", &qcow, &expected]);
    let ops = [
        "write -q -P 0xab 0 1M",
        "write -q -P 0xcd 10485000 2M",
        "write -q -P 0x5a 20M 3M",
        "write -q -z 20M 1536K",
        "write -q -z 22M 4096",
    ];
    qemu_io(&server, "raw", &ops, &expected);
    let want = std::fs::read(&expected).expect("expected image");
    let files = cluster.files();
    let got = read_file(&files, file_ino(&cluster, "/disk.img").await).await;
    assert_eq!(got.len(), want.len());
    assert!(got == want, "the Locus file differs from the expected image");
}

/// Goal: nbdcopy moves a disk in and out unchanged, over several
/// connections, and fio's random 4 KiB writes at queue depth 16 verify.
/// Method: 32 MiB of random bytes copied in with nbdcopy, copied out,
/// compared byte for byte; fio randwrite with crc32c verification.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_and_fio_move_data_through_the_export() {
    let (cluster, config) = start_cluster().await;
    let work = tempfile::tempdir().expect("work dir");
    let (code, out, err) = locus_cli(&config, &["fs", "mkdir", "-p", "/vm"], None);
    assert_eq!(code, 0, "mkdir /vm: {out}{err}");
    make_image(&config, "/vm/disk.raw", "32M");
    // No read cache: the second verification must read the replicas (and
    // fail over), not memory.
    let mut server = NbdServer::start(
        &config,
        "/vm/disk.raw",
        &["--listen", "127.0.0.1:0", "--name", "vm disk", "--cache-mib", "0"],
        cluster.path().join("nbd.log"),
    );
    let uri = server.uri.clone();
    assert!(uri.ends_with("/vm%20disk"), "the name is escaped: {uri}");

    phase("nbdcopy in (4 connections, multi-conn) and out; bytes equal");
    let src = work.path().join("src.raw");
    let data = pattern(7, 32 * MIB as usize);
    std::fs::write(&src, &data).expect("source");
    let src = src.to_string_lossy().into_owned();
    let back = tmp_path(work.path(), "back.raw");
    tool_ok(&server, "nbdcopy", &["--connections=4", "--requests=16", &src, &uri]);
    tool_ok(&server, "nbdcopy", &[&uri, &back]);
    let got = std::fs::read(&back).expect("copied out");
    assert!(got == data, "nbdcopy round trip changed the data");

    phase("fio: random 4 KiB writes, queue depth 16, crc32c verification");
    let job = fio_randwrite(&server, &uri, "--do_verify=1");
    assert!(job["write"]["io_bytes"].as_u64().unwrap_or(0) >= 16 * MIB, "fio wrote 16 MiB: {job}");
    assert!(job["read"]["io_bytes"].as_u64().unwrap_or(0) >= 16 * MIB, "fio verified 16 MiB: {job}");

    phase("kill -9 a chunk server; fio verifies the same blocks again (reads fail over)");
    let mut cluster = cluster;
    cluster.kill_chunk(1);
    let job = fio_randwrite(&server, &uri, "--verify_only");
    assert!(job["read"]["io_bytes"].as_u64().unwrap_or(0) >= 16 * MIB, "fio re-verified 16 MiB: {job}");

    phase("SIGTERM: exit 0");
    assert!(server.stop().success(), "exit status\n{}", server.log());
}

/// Goal: QEMU itself boots with its disk on the Locus export
/// (`-drive file=nbd://...`), and what the guest writes lands in the file.
/// Method: the test guest writes a marker at the start of its disk and
/// powers off; the test reads the file back through the client library.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_boots_with_its_disk_on_the_export() {
    if !Path::new("/usr/bin/qemu-system-x86_64").exists() {
        eprintln!("SKIPPED: qemu-system-x86_64 is not installed");
        return;
    }
    let (kernel, initrd) = locus_tests::guest_kernel();
    let (cluster, config) = start_cluster().await;
    let (code, out, err) = locus_cli(&config, &["fs", "mkdir", "-p", "/vm"], None);
    assert_eq!(code, 0, "mkdir /vm: {out}{err}");
    make_image(&config, "/vm/boot.raw", "8M");
    let server = NbdServer::start(
        &config,
        "/vm/boot.raw",
        &["--listen", "127.0.0.1:0", "--name", "boot"],
        cluster.path().join("nbd.log"),
    );
    phase("qemu boots the guest with its only disk on the export");
    let run = tempfile::tempdir().expect("run dir");
    let driver = vmhost::QemuDriver::new(run.path());
    let spec = vmhost::VmSpec {
        id: "nbd-boot".into(),
        name: "nbd-boot".into(),
        vcpus: 1,
        memory_mib: 256,
        kind: vmhost::VmKind::Qemu {
            kernel,
            initrd: Some(initrd),
            append: "console=ttyS0 quiet locus.token=from-the-export".into(),
            disks: vec![vmhost::Disk { source: vmhost::DiskSource::Nbd(server.uri.clone()), read_only: false }],
            extra_args: vec![],
            restore_from: None,
        },
        log_dir: None,
    };
    use vmhost::Driver;
    driver.start(&spec).await.unwrap_or_else(|e| panic!("start: {e}\n{}", server.log()));
    let deadline = Instant::now() + Duration::from_secs(180);
    let state = loop {
        let s = driver.status("nbd-boot").await.expect("status");
        if !s.is_live() {
            break s;
        }
        assert!(Instant::now() < deadline, "the guest did not power off");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let console = std::fs::read_to_string(driver.logs("nbd-boot").expect("logs").console).unwrap_or_default();
    assert!(matches!(state, vmhost::VmState::Stopped { .. }), "{state:?}\n{console}");
    phase("the guest's write is in the Locus file");
    let files = cluster.files();
    let got = read_file(&files, file_ino(&cluster, "/vm/boot.raw").await).await;
    let want = b"LOCUS-DISK vda from-the-export\n";
    assert!(got.starts_with(want), "disk starts with {:?}\n{console}", String::from_utf8_lossy(&got[..64]));
}

/// fio's random 4 KiB writes at queue depth 16 over 16 MiB with crc32c
/// verification (`mode`: `--do_verify=1` writes then verifies,
/// `--verify_only` verifies an earlier run's blocks); the job's JSON, its
/// error checked.
fn fio_randwrite(server: &NbdServer, uri: &str, mode: &str) -> serde_json::Value {
    let out = tool_ok(
        server,
        "fio",
        &[
            "--name=randwrite",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--size=16M",
            "--iodepth=16",
            "--verify=crc32c",
            mode,
            "--verify_fatal=1",
            // No verify state file left in the working directory.
            "--verify_state_save=0",
            "--output-format=json",
        ],
    );
    let json_start = out.find('{').unwrap_or(0);
    let report: serde_json::Value = serde_json::from_str(&out[json_start..]).expect("fio json");
    let job = report["jobs"][0].clone();
    assert_eq!(job["error"], 0, "fio job error: {out}");
    job
}

/// A minimal NBD client over a raw socket, for what real clients never send.
struct Raw {
    s: TcpStream,
}

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const EPERM: u32 = 1;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const EOVERFLOW: u32 = 75;

impl Raw {
    fn connect(addr: &str) -> Raw {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        Raw { s }
    }

    fn greeting(&mut self) {
        let mut g = [0u8; 18];
        self.s.read_exact(&mut g).expect("greeting");
        assert_eq!(u64::from_be_bytes(g[..8].try_into().expect("8")), NBDMAGIC);
        assert_eq!(u64::from_be_bytes(g[8..16].try_into().expect("8")), IHAVEOPT);
    }

    /// Greeting, flags, NBD_OPT_GO with simple replies.
    fn handshake(addr: &str, name: &str) -> Raw {
        let mut r = Raw::connect(addr);
        r.greeting();
        r.s.write_all(&3u32.to_be_bytes()).expect("client flags");
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        r.option(OPT_GO, &data);
        loop {
            let mut h = [0u8; 20];
            r.s.read_exact(&mut h).expect("option reply");
            let kind = u32::from_be_bytes(h[12..16].try_into().expect("4"));
            let len = u32::from_be_bytes(h[16..20].try_into().expect("4"));
            let mut d = vec![0u8; len as usize];
            r.s.read_exact(&mut d).expect("option data");
            assert_eq!(kind & (1 << 31), 0, "GO refused: {}", String::from_utf8_lossy(&d));
            if kind == REP_ACK {
                return r;
            }
        }
    }

    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.s.write_all(&m).expect("option");
    }

    fn request(&mut self, kind: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) {
        let mut m = REQUEST_MAGIC.to_be_bytes().to_vec();
        m.extend_from_slice(&0u16.to_be_bytes());
        m.extend_from_slice(&kind.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        self.s.write_all(&m).expect("request");
        // A big payload in pieces: the server may answer before it has all.
        for piece in payload.chunks(1 << 20) {
            self.s.write_all(piece).expect("payload");
        }
    }

    /// A simple reply: (error, cookie).
    fn reply(&mut self) -> (u32, u64) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).expect("simple reply");
        assert_eq!(u32::from_be_bytes(h[..4].try_into().expect("4")), SIMPLE_REPLY_MAGIC);
        (u32::from_be_bytes(h[4..8].try_into().expect("4")), u64::from_be_bytes(h[8..16].try_into().expect("8")))
    }

    fn read(&mut self, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        self.request(CMD_READ, cookie, offset, len, &[]);
        assert_eq!(self.reply(), (0, cookie));
        let mut d = vec![0u8; len as usize];
        self.s.read_exact(&mut d).expect("read data");
        d
    }

    /// Whether the server closed the connection (EOF or reset).
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 64];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

/// Goal: hostile input gets an error reply or a closed connection, never
/// touches the file outside the request's rules, and never takes the
/// server down.
/// Method: raw sockets send bad client flags, bad request magic, an
/// oversize option, out-of-range and oversize reads and writes, and a
/// write claiming 1 GiB; then qemu-io reads the known data back, and the
/// file's size and bytes are checked through Locus after SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_get_errors_and_the_server_survives() {
    let (cluster, config) = start_cluster().await;
    let size = 8 * MIB;
    make_image(&config, "/disk.img", "8M");
    let files = cluster.files();
    let ino = file_ino(&cluster, "/disk.img").await;
    let known = pattern(3, size as usize);
    files.write(ino, 0, known.clone().into()).await.expect("write");
    files.fsync(ino).await.expect("fsync");
    let mut server =
        NbdServer::start(&config, "/disk.img", &["--listen", "127.0.0.1:0"], cluster.path().join("nbd.log"));
    let addr = server.addr();

    phase("bad client flags, bad option magic, an oversize option: the connection closes");
    let mut r = Raw::connect(&addr);
    r.greeting();
    r.s.write_all(&0xffff_ffffu32.to_be_bytes()).expect("flags");
    assert!(r.closed(), "unknown client flags close the connection");
    let mut r = Raw::connect(&addr);
    r.greeting();
    r.s.write_all(&1u32.to_be_bytes()).expect("flags");
    r.s.write_all(b"NOTMAGIC\0\0\0\x07\0\0\0\0").expect("garbage option");
    assert!(r.closed(), "a bad option magic closes the connection");
    let mut r = Raw::connect(&addr);
    r.greeting();
    r.s.write_all(&1u32.to_be_bytes()).expect("flags");
    let mut h = IHAVEOPT.to_be_bytes().to_vec();
    h.extend_from_slice(&OPT_GO.to_be_bytes());
    h.extend_from_slice(&(16u32 << 20).to_be_bytes());
    r.s.write_all(&h).expect("oversize option");
    assert!(r.closed(), "a 16 MiB option closes the connection");

    phase("bad request magic closes the connection");
    let mut r = Raw::handshake(&addr, "disk.img");
    r.s.write_all(&[0x42u8; 28]).expect("garbage request");
    assert!(r.closed(), "a bad request magic closes the connection");

    phase("out-of-range and oversize requests get errors; the connection goes on");
    let mut r = Raw::handshake(&addr, "");
    r.request(CMD_READ, 1, size - 10, 11, &[]);
    assert_eq!(r.reply(), (EINVAL, 1), "a read past the end");
    r.request(CMD_READ, 2, u64::MAX - 5, 100, &[]);
    assert_eq!(r.reply(), (EINVAL, 2), "a read at an offset that overflows");
    let junk = vec![0xeeu8; 8192];
    r.request(CMD_WRITE, 3, size - 4096, 8192, &junk);
    assert_eq!(r.reply(), (ENOSPC, 3), "a write straddling the end");
    r.request(CMD_WRITE, 4, size, 4096, &junk[..4096]);
    assert_eq!(r.reply(), (ENOSPC, 4), "a write past the end");
    r.request(CMD_READ, 5, 0, 64 << 20, &[]);
    assert_eq!(r.reply(), (EOVERFLOW, 5), "a 64 MiB read");
    let big = vec![0xeeu8; 40 << 20];
    r.request(CMD_WRITE, 6, 0, 40 << 20, &big);
    assert_eq!(r.reply(), (EOVERFLOW, 6), "a 40 MiB write (its payload is drained)");
    r.request(99, 7, 0, 0, &[]);
    assert_eq!(r.reply(), (EINVAL, 7), "an unknown command");
    let d = r.read(8, size - 4096, 4096);
    assert!(d[..] == known[(size - 4096) as usize..], "the last 4 KiB are untouched");
    r.request(CMD_DISC, 9, 0, 0, &[]);
    assert!(r.closed(), "disconnect closes");

    phase("a write claiming 1 GiB is not drained: the connection closes");
    let mut r = Raw::handshake(&addr, "disk.img");
    r.request(CMD_WRITE, 1, 0, 1 << 30, &[0xee; 4096]);
    assert!(r.closed(), "a 1 GiB write closes the connection");

    phase("the server is alive and a good client reads the known data");
    assert!(server.is_running(), "server died\n{}", server.log());
    let uri = server.uri.clone();
    let out = tool_ok(&server, "qemu-io", &["-f", "raw", "-r", "-c", &format!("read -v {} 16", size - 16), &uri]);
    let last16: String = known[(size - 16) as usize..].iter().map(|b| format!("{b:02x} ")).collect();
    assert!(out.contains(last16.trim()), "qemu-io reads the last 16 bytes: {out}");
    let mut r = Raw::handshake(&addr, "disk.img");
    assert!(r.read(1, 0, MIB as u32)[..] == known[..MIB as usize], "the first MiB is intact");

    phase("SIGTERM: exit 0; the file has its size and bytes unchanged");
    drop(r);
    assert!(server.stop().success(), "exit status\n{}", server.log());
    assert_eq!(files.size(ino).await.expect("size"), size);
    let got = read_file(&cluster.files(), ino).await;
    assert!(got == known, "the file changed");
}

/// Goal: a read-only export refuses every write with EPERM and changes
/// nothing; it is reachable over a Unix socket.
/// Method: serve --read-only --unix; nbdinfo says read-only; qemu-io's
/// write fails; a raw WRITE gets EPERM; the data reads back unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_export_refuses_writes() {
    let (cluster, config) = start_cluster().await;
    make_image(&config, "/ro.img", "4M");
    let files = cluster.files();
    let ino = file_ino(&cluster, "/ro.img").await;
    let known = pattern(5, 4 * MIB as usize);
    files.write(ino, 0, known.clone().into()).await.expect("write");
    files.fsync(ino).await.expect("fsync");
    let sock = cluster.path().join("nbd.sock");
    let sock_s = sock.to_string_lossy().into_owned();
    let mut server =
        NbdServer::start(&config, "/ro.img", &["--unix", &sock_s, "--read-only"], cluster.path().join("nbd.log"));
    let uri = server.uri.clone();
    assert_eq!(uri, format!("nbd+unix:///ro.img?socket={sock_s}"));

    phase("nbdinfo: read-only, no trim or zero");
    let ni = tool_ok(&server, "nbdinfo", &["--json", &uri]);
    let ni: serde_json::Value = serde_json::from_str(&ni).expect("nbdinfo json");
    let e = &ni["exports"][0];
    assert_eq!(e["is_read_only"], true, "{ni}");
    assert_eq!(e["can_trim"], false, "{ni}");
    assert_eq!(e["export-size"], 4 * MIB, "{ni}");

    phase("qemu-io cannot write; a raw WRITE gets EPERM; reads work");
    let o = tool("qemu-io", &["-f", "raw", "-c", "write -P 0x99 0 4k", &uri]);
    let all = text(&o);
    assert!(!o.status.success() || all.contains("read-only") || all.contains("ermission"), "{all}");
    let out = tool_ok(&server, "qemu-io", &["-f", "raw", "-r", "-c", "read -v 0 16", &uri]);
    let first16: String = known[..16].iter().map(|b| format!("{b:02x} ")).collect();
    assert!(out.contains(first16.trim()), "{out}");
    // A raw client over TCP cannot reach a Unix socket export; use a TCP
    // read-only server for the raw write.
    let mut tcp = NbdServer::start(
        &config,
        "/ro.img",
        &["--listen", "127.0.0.1:0", "--read-only"],
        cluster.path().join("nbd-tcp.log"),
    );
    let mut r = Raw::handshake(&tcp.addr(), "ro.img");
    r.request(CMD_WRITE, 1, 0, 4096, &[0x99; 4096]);
    assert_eq!(r.reply(), (EPERM, 1));
    assert!(r.read(2, 0, 4096)[..] == known[..4096]);
    drop(r);

    phase("the CLI refuses a missing file, a directory and a port in use (exit 1)");
    for (args, what) in [
        (vec!["nbd", "serve", "/missing.img", "--listen", "127.0.0.1:0"], "NotFound"),
        (vec!["nbd", "serve", "/", "--listen", "127.0.0.1:0"], "not a regular file"),
        (vec!["nbd", "serve", "/ro.img", "--listen", tcp.addr().as_str()], "cannot listen"),
    ] {
        let (code, out, err) = locus_cli(&config, &args, None);
        assert_eq!(code, 1, "{args:?}: {out}{err}");
        assert!(err.contains(what), "{args:?}: {err}");
    }

    phase("SIGTERM both: exit 0, the socket file is gone, the data unchanged");
    assert!(server.stop().success(), "exit status\n{}", server.log());
    assert!(tcp.stop().success(), "exit status\n{}", tcp.log());
    assert!(!sock.exists(), "the socket file is removed at exit");
    let got = read_file(&cluster.files(), ino).await;
    assert!(got == known, "a read-only export changed the file");
}

/// Goal: a sparse disk image stays sparse through `locus fs put` and `locus
/// fs get`: put allocates only the chunks that hold data, block status
/// shows the rest as holes, the size survives trailing zeros, and get
/// writes the same bytes into a local file with holes where the zeros were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_and_get_keep_a_sparse_image_sparse() {
    use std::os::unix::fs::MetadataExt;
    let (cluster, config) = start_cluster().await;
    let work = tempfile::tempdir().expect("work dir");
    let src = work.path().join("sparse.raw");
    let size = 64 * MIB;
    let mut image = vec![0u8; size as usize];
    // Data in chunks 10 and 11 (1 MiB chunks here), one byte in chunk 40,
    // and zeros to the end, which only the size records.
    image[(10 * MIB + 5) as usize..(11 * MIB + 77) as usize].fill(0xab);
    image[(40 * MIB + 123) as usize] = 1;
    std::fs::write(&src, &image).expect("write image");

    phase("put: only the chunks with data are allocated");
    let (code, out, err) = locus_cli(&config, &["fs", "put", &src.to_string_lossy(), "/sparse.raw", "--quiet"], None);
    assert_eq!(code, 0, "put: {out}{err}");
    let ino = file_ino(&cluster, "/sparse.raw").await;
    let l = layout(&cluster.client(), ino).await;
    assert_eq!(l.attr.size, size, "the size survives trailing zeros");
    let mut indexes: Vec<u64> = l.chunks.iter().map(|c| c.index).collect();
    indexes.sort_unstable();
    assert_eq!(indexes, vec![10, 11, 40], "allocated chunks");
    assert!(read_file(&cluster.files(), ino).await == image, "the file reads back as the image");

    phase("block status through an export: holes where nothing was written");
    let server = NbdServer::start(&config, "/sparse.raw", &["--listen", "127.0.0.1:0"], work.path().join("server.log"));
    let map = tool_ok(&server, "nbdinfo", &["--map", &server.uri]);
    assert!(map.lines().any(|l| l.contains("hole")), "{map}");
    drop(server);

    phase("get: the same bytes, with holes");
    let dst = work.path().join("back.raw");
    let (code, out, err) = locus_cli(&config, &["fs", "get", "/sparse.raw", &dst.to_string_lossy(), "--quiet"], None);
    assert_eq!(code, 0, "get: {out}{err}");
    assert!(std::fs::read(&dst).expect("read back") == image, "get returns the image");
    let allocated = std::fs::metadata(&dst).expect("stat").blocks() * 512;
    assert!(allocated < 8 * MIB, "{allocated} bytes allocated for 2 MiB of data");

    phase("get into a pipe: every byte, zeros included");
    let out = Command::new(bin("locus"))
        .arg("--config")
        .arg(&config)
        .args(["fs", "get", "/sparse.raw", "/dev/stdout", "--quiet"])
        .stdin(Stdio::null())
        .output()
        .expect("run locus fs get");
    assert!(out.status.success(), "get to a pipe: {}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout == image, "{} bytes through the pipe", out.stdout.len());
}

/// Goal: a writable export holds its image's write lease, so that it may
/// cache reads: while it serves, other writers are refused (a library
/// client whose layout predates the lease, a truncate, a second export),
/// and what is read through the cache is always what was last written;
/// after a kill -9 a new export takes the lease over once it lapses and
/// finds every flushed write; after SIGTERM the lease is given back at once.
/// Method: 16 MiB image, 1 MiB written by the library before the export
/// starts; refused writes and their errors; qemu-io rounds that read a
/// region (filling the cache), write into it across block boundaries and
/// verify; fio random writes with crc32c verification over a cached
/// image; kill -9, a new export, verified reads; SIGTERM, a library write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_leases_its_image_and_its_cache_stays_true() {
    let (cluster, config) = start_cluster().await;
    make_image(&config, "/disk.img", "16M");
    let files = cluster.files();
    let ino = file_ino(&cluster, "/disk.img").await;
    let first = pattern(3, MIB as usize);
    files.write(ino, 0, first.clone().into()).await.expect("write");
    files.fsync(ino).await.expect("fsync");
    let server = NbdServer::start(&config, "/disk.img", &["--listen", "127.0.0.1:0"], cluster.path().join("nbd.log"));
    let uri = server.uri.clone();

    phase("other writers are refused while the export holds the lease");
    files.write(ino, 4096, vec![0xEE; 4096].into()).await.expect("buffered");
    let e = files.fsync(ino).await.expect_err("a write under another client's lease");
    assert_eq!(e.code(), ErrorCode::Busy, "{e}");
    let (code, out, err) = locus_cli(&config, &["fs", "truncate", "/disk.img", "32M"], None);
    assert_ne!(code, 0, "truncate under a lease: {out}{err}");
    assert!(err.contains("leased"), "{err}");
    let second = ["nbd", "serve", "/disk.img", "--listen", "127.0.0.1:0", "--lease-wait", "0"];
    let (code, out, err) = locus_cli(&config, &second, None);
    assert_eq!(code, 1, "a second export: {out}{err}");
    assert!(err.contains("cannot take the write lease"), "{err}");
    // Nothing of the refused write reached the image.
    let out = qemu_io(&server, "raw", &["read -v 4096 16"], &uri);
    let expect: String = first[4096..4112].iter().map(|b| format!("{b:02x} ")).collect();
    assert!(out.contains(expect.trim()), "{out}");

    phase("reads through the cache see each write: read a region, write into it, verify");
    for round in 0..12u64 {
        let v = 0x20 + round;
        // Unaligned, across 64 KiB cache blocks.
        let (off, len) = (round * 200_000 + 512, 70_000 + round * 1000);
        let cmds = [
            format!("read {} {}", off - 512, 256 * 1024),
            format!("write -P {v} {off} {len}"),
            format!("read -P {v} {off} {len}"),
        ];
        let cmds: Vec<&str> = cmds.iter().map(|c| c.as_str()).collect();
        let out = qemu_io(&server, "raw", &cmds, &uri);
        assert!(!out.contains("Pattern verification failed"), "round {round}: {out}");
    }
    qemu_io(&server, "raw", &["read 0 16M"], &uri);
    let job = fio_randwrite(&server, &uri, "--do_verify=1");
    assert!(job["read"]["io_bytes"].as_u64().unwrap_or(0) >= 16 * MIB, "fio verified 16 MiB: {job}");

    phase("past the expiry a client saw, the renewed lease still refuses it");
    // A client with the current layout (versions and lease); renewals
    // raise no versions, so only the lease keeps it out once the expiry
    // it knows has passed.
    let other = cluster.files();
    other.read(ino, 0, 10).await.expect("read: learn the layout");
    // Until the expiry it saw has passed (a later look sees a later one).
    let seen = layout(&cluster.client(), ino).await.lease.expect("the export's lease").expires;
    let deadline = Instant::now() + Duration::from_secs(15);
    while Timespec::now() <= seen {
        assert!(Instant::now() < deadline, "the lease's expiry {seen:?} never passed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    other.write(ino, 8192, vec![0xDD; 4096].into()).await.expect("buffered");
    let e = other.fsync(ino).await.expect_err("a write under a renewed lease");
    assert_eq!(e.code(), ErrorCode::Busy, "{e}");
    let now = cluster.files().read(ino, 8192, 4096).await.expect("read");
    assert!(now.iter().any(|b| *b != 0xDD), "the refused write reached the chunks");

    phase("a client whose clock runs a minute ahead is refused too: the leader's clock judges");
    // A --shared export takes no lease; under faketime every lease looks
    // lapsed to it, so only the leader's clock keeps its writes out.
    require_tool("faketime");
    let skewed = NbdServer::start_under(
        &["faketime", "-f", "+60s"],
        &config,
        "/disk.img",
        &["--listen", "127.0.0.1:0", "--shared"],
        cluster.path().join("nbd-skewed.log"),
    );
    let skewed_uri = skewed.uri.clone();
    let o = tool("qemu-io", &["-f", "raw", "-c", "write -P 0xCC 12288 4096", "-c", "flush", &skewed_uri]);
    eprintln!("skewed client: {}", text(&o));
    drop(skewed);
    let now = cluster.files().read(ino, 12288, 4096).await.expect("read");
    assert!(now.iter().any(|b| *b != 0xCC), "a client with a fast clock wrote under the live lease");

    phase("kill -9 the export; a new one waits for the lease to lapse and finds every flushed write");
    qemu_io(&server, "raw", &["write -P 0x77 2M 1M", "flush"], &uri);
    drop(server);
    let killed = Instant::now();
    let mut server =
        NbdServer::start(&config, "/disk.img", &["--listen", "127.0.0.1:0"], cluster.path().join("nbd2.log"));
    let waited = killed.elapsed();
    assert!(waited > Duration::from_secs(4), "the new export waited for the lease ({waited:?})");
    let out = qemu_io(&server, "raw", &["read -P 0x77 2M 1M"], &server.uri.clone());
    assert!(!out.contains("Pattern verification failed"), "{out}");

    phase("SIGTERM gives the lease back: the library writes at once; its refused write stays refused");
    assert!(server.stop().success(), "exit status\n{}", server.log());
    files.fsync(ino).await.expect("nothing left to send");
    let at = files.read(ino, 4096, 4096).await.expect("read");
    assert!(at.iter().any(|b| *b != 0xEE), "the write refused under the lease landed later");
    files.write(ino, 0, first.clone().into()).await.expect("write");
    files.fsync(ino).await.expect("a write once the lease is released");
    assert!(read_file(&files, ino).await[..MIB as usize] == first[..]);
}

/// Goal: a read-only export caches the blocks of a snapshot (they never
/// change) and nothing of a writable file (another client may write it).
/// Method: a snapshot of an image served --read-only: qemu-io reads the
/// same region three times, the exporter's log counts cache hits, and the
/// bytes are the image's at the snapshot. The image itself served
/// --read-only: a write through the library between two reads is seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_export_caches_a_snapshot_and_nothing_else() {
    let (cluster, config) = start_cluster().await;
    make_image(&config, "/base.img", "4M");
    let files = cluster.files();
    let ino = file_ino(&cluster, "/base.img").await;
    files.write(ino, 0, vec![0x11u8; 1 << 20].into()).await.expect("write");
    files.fsync(ino).await.expect("fsync");
    let (code, out, err) = locus_cli(&config, &["fs", "snapshot", "/base.img", "/base@1"], None);
    assert_eq!(code, 0, "{out}{err}");
    files.write(ino, 0, vec![0x22u8; 4096].into()).await.expect("write after the snapshot");
    files.fsync(ino).await.expect("fsync");

    phase("the snapshot, read three times: the bytes at the snapshot, served from the cache");
    let mut snap = NbdServer::start(
        &config,
        "/base@1",
        &["--listen", "127.0.0.1:0", "--read-only"],
        cluster.path().join("nbd-snap.log"),
    );
    let uri = snap.uri.clone();
    for _ in 0..3 {
        let out = tool_ok(&snap, "qemu-io", &["-f", "raw", "-r", "-c", "read -P 0x11 0 64k", &uri]);
        assert!(!out.contains("Pattern verification failed"), "{out}");
    }
    assert!(snap.stop().success(), "exit status\n{}", snap.log());
    let log = snap.log();
    let line = log.lines().find(|l| l.contains("read cache (snapshot)")).unwrap_or_else(|| panic!("no cache\n{log}"));
    // Without the terminal colours tracing may put around field names.
    let mut plain = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            chars.by_ref().find(|c| *c == 'm');
        } else {
            plain.push(c);
        }
    }
    let hits: u64 = plain
        .split_whitespace()
        .find_map(|w| w.strip_prefix("hits="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(hits >= 2, "the second and third reads come from the cache: {line}");

    phase("the writable image served --read-only sees a write made meanwhile");
    let mut ro = NbdServer::start(
        &config,
        "/base.img",
        &["--listen", "127.0.0.1:0", "--read-only"],
        cluster.path().join("nbd-ro.log"),
    );
    let uri = ro.uri.clone();
    let out = tool_ok(&ro, "qemu-io", &["-f", "raw", "-r", "-c", "read -P 0x22 0 4k", &uri]);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    files.write(ino, 0, vec![0x33u8; 4096].into()).await.expect("write while served");
    files.fsync(ino).await.expect("fsync");
    let out = tool_ok(&ro, "qemu-io", &["-f", "raw", "-r", "-c", "read -P 0x33 0 4k", &uri]);
    assert!(!out.contains("Pattern verification failed"), "a read-only export served a stale block: {out}");
    assert!(ro.stop().success(), "exit status\n{}", ro.log());
    assert!(!ro.log().contains("read cache"), "{}", ro.log());
}

/// `qemu-io` output that reports a failed command (its exit status stays 0).
fn qemu_io_failed(out: &str) -> bool {
    out.contains("verification failed") || out.contains("error") || out.contains("Error")
}

/// Goal: a qcow2 overlay whose backing file is also in Locus works through
/// the mount and through NBD exports, as a VM host uses it.
/// Method: a raw base with two patterns and a qcow2 overlay on it (backing
/// named by its path on the mount), both made and written with qemu's tools through the
/// mount; each read checked by pattern, the base untouched, `qemu-img
/// check` clean. Then the overlay and the base exported (the base read
/// only; the overlay's file extended first, as an export cannot grow), the
/// overlay's backing renamed to the base's export (`rebase
/// -u` through the export) and the chain opened from its URI: reads
/// through it and a write into the overlay, read back through the mount
/// (backing renamed back) once the export stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qcow2_chain_stored_in_locus_works_through_fuse_and_nbd() {
    let (_cluster, config) = start_cluster().await;
    if !fuse_available() {
        return;
    }
    let work = tempfile::tempdir().expect("tempdir");
    let m = Mount::start(&config, &work.path().join("mount-logs"));
    let none = NbdServer { child: None, uri: String::new(), log: work.path().join("none.log") };
    let (base, overlay) = (tmp_path(&m.dir, "base.raw"), tmp_path(&m.dir, "overlay.qcow2"));

    phase("through the mount: a raw base, a qcow2 overlay on it, writes into each");
    tool_ok(&none, "qemu-img", &["create", "-q", "-f", "raw", &base, "16M"]);
    qemu_io(&none, "raw", &["write -P 0x11 0 4M", "write -P 0x22 8M 1M"], &base);
    // Named by its path on the mount, as a VM host's images name their
    // bases (every host mounts at the same place); qemu cannot resolve a
    // relative name against an NBD node.
    tool_ok(&none, "qemu-img", &["create", "-q", "-f", "qcow2", "-F", "raw", "-b", &base, &overlay]);
    qemu_io(&none, "qcow2", &["write -P 0x33 1M 64k"], &overlay);
    let reads = ["read -P 0x11 0 1M", "read -P 0x33 1M 64k", "read -P 0x22 8M 1M", "read -P 0 12M 1M"];
    let out = qemu_io(&none, "qcow2", &reads, &overlay);
    assert!(!qemu_io_failed(&out), "reads through the chain on the mount: {out}");
    let out = qemu_io(&none, "raw", &["read -P 0x11 1M 64k"], &base);
    assert!(!qemu_io_failed(&out), "the base changed under the overlay: {out}");
    let info = tool_ok(&none, "qemu-img", &["info", "--backing-chain", &overlay]);
    assert!(info.contains("base.raw"), "{info}");
    let check = tool_ok(&none, "qemu-img", &["check", "-f", "qcow2", &overlay]);
    assert!(check.contains("No errors"), "{check}");

    phase("through NBD: the overlay names the base's export, and the chain reads and writes");
    // An export's size is fixed, and a qcow2 grows as it allocates: room
    // past its end first (it takes the free clusters there).
    std::fs::OpenOptions::new().write(true).open(&overlay).expect("open").set_len(64 * MIB).expect("extend");
    let base_sock = tmp_path(work.path(), "base.sock");
    let overlay_sock = tmp_path(work.path(), "overlay.sock");
    let base_srv =
        NbdServer::start(&config, "/base.raw", &["--unix", &base_sock, "--read-only"], work.path().join("base.log"));
    let mut overlay_srv =
        NbdServer::start(&config, "/overlay.qcow2", &["--unix", &overlay_sock], work.path().join("overlay.log"));
    // Through the export: only the overlay's header changes (-u).
    tool_ok(
        &overlay_srv,
        "qemu-img",
        &["rebase", "-u", "-f", "qcow2", "-F", "raw", "-b", &base_srv.uri, &overlay_srv.uri],
    );
    let cmds = ["read -P 0x33 1M 64k", "read -P 0x22 8M 1M", "write -P 0x44 2M 64k", "read -P 0x44 2M 64k"];
    let out = qemu_io(&overlay_srv, "qcow2", &cmds, &overlay_srv.uri);
    assert!(!qemu_io_failed(&out), "through the exports: {out}\n--- base export\n{}", base_srv.log());
    assert!(overlay_srv.stop().success(), "{}", overlay_srv.log());

    phase("what went in through NBD reads back through the mount");
    tool_ok(&none, "qemu-img", &["rebase", "-u", "-f", "qcow2", "-F", "raw", "-b", &base, &overlay]);
    let out = qemu_io(&none, "qcow2", &["read -P 0x44 2M 64k", "read -P 0x11 0 1M"], &overlay);
    assert!(!qemu_io_failed(&out), "{out}");
    let check = tool_ok(&none, "qemu-img", &["check", "-f", "qcow2", &overlay]);
    assert!(check.contains("No errors"), "{check}");
}
