//! Test fixtures that run the real Locus binaries.
//!
//! [`MetaCluster`] starts `locus-server meta` processes on free loopback
//! ports in a temporary directory, and can kill (-9), pause (SIGSTOP),
//! resume and restart them. [`netns::Net`] puts nodes in network namespaces
//! so a test can cut their links. Everything is torn down on drop, also when
//! a test fails.
//!
//! The binaries are found next to the test executable's `deps/` directory
//! (`target/<profile>/`), or in `$LOCUS_BIN_DIR`; build them first with
//! `cargo build --bins`.

pub mod files;
pub mod hosts;
pub mod mount;
pub mod netns;

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use fs_client::proto::*;
use fs_client::{ClientConfig, MetaClient};

/// The directory with the workspace binaries.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("LOCUS_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// The path of a workspace binary; panics with instructions when missing.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(p.exists(), "{} not found: run `cargo build --bins` first (or set LOCUS_BIN_DIR)", p.display());
    p
}

/// A command running `program`, inside network namespace `netns` if given.
pub fn command_in(netns: Option<&str>, program: &Path) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// A free UDP port on 127.0.0.1 (also free for TCP at the time of asking).
pub fn free_port() -> u16 {
    loop {
        let u = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
        let port = u.local_addr().expect("addr").port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// The tiny guest of `scripts/test-kernel.sh` (kernel, initrd), built once
/// and cached under ~/.cache/locus/guest.
pub fn guest_kernel() -> (PathBuf, PathBuf) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/test-kernel.sh");
    let out = Command::new(&script).output().expect("run scripts/test-kernel.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "test-kernel.sh failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let field = |k: &str| -> PathBuf {
        stdout.lines().find_map(|l| l.strip_prefix(k)).unwrap_or_else(|| panic!("no {k} in {stdout}")).into()
    };
    (field("kernel="), field("initrd="))
}

/// Logs a phase of a scenario: what happens next and what must hold.
pub fn phase(msg: &str) {
    eprintln!("\n=== {msg}");
}

/// Sets up logging for a test binary once.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LOCUS_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// One `locus-server meta` process.
pub struct MetaNode {
    pub id: u64,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    args: Vec<String>,
    /// Runs the process inside this network namespace.
    netns: Option<String>,
    child: Option<Child>,
}

impl MetaNode {
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let mut cmd = command_in(self.netns.as_deref(), &bin("locus-server"));
        cmd.args(&self.args)
            .env("LOCUS_LOG", "info,openraft=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.child = Some(cmd.spawn().with_context(|| format!("spawn meta node {}", self.id))?);
        Ok(())
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        if let Some(pid) = self.pid() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for MetaNode {
    fn drop(&mut self) {
        // SIGKILL also ends a process stopped with SIGSTOP.
        self.kill();
    }
}

impl Drop for MetaCluster {
    fn drop(&mut self) {
        for n in self.nodes.values_mut() {
            n.kill();
        }
        if std::env::var_os("LOCUS_KEEP_TEST_DIR").is_some() {
            let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"));
            eprintln!("keeping test directory {}", dir.keep().display());
        }
    }
}

/// Options for a test cluster.
#[derive(Debug, Clone)]
pub struct MetaOptions {
    pub nodes: u64,
    pub snapshot_every: Option<u64>,
    pub keep_logs: Option<u64>,
    pub change_history: Option<u64>,
    /// Node addresses (one per node) instead of free loopback ports.
    pub addrs: Option<Vec<SocketAddr>>,
    /// Network namespaces to run the nodes in (one per node).
    pub netns: Option<Vec<String>>,
    /// More `locus-server meta` flags.
    pub extra_args: Vec<String>,
}

impl Default for MetaOptions {
    fn default() -> Self {
        MetaOptions {
            nodes: 3,
            snapshot_every: None,
            keep_logs: None,
            change_history: None,
            addrs: None,
            netns: None,
            extra_args: Vec::new(),
        }
    }
}

/// A metadata cluster of real processes.
pub struct MetaCluster {
    pub dir: tempfile::TempDir,
    pub certs: PathBuf,
    pub nodes: BTreeMap<u64, MetaNode>,
}

impl MetaCluster {
    /// Starts `opts.nodes` nodes and waits until the namespace serves reads.
    pub async fn start(opts: MetaOptions) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("locus-test-").tempdir()?;
        let certs = dir.path().join("certs");
        let ips: Vec<std::net::IpAddr> = match &opts.addrs {
            Some(a) => a.iter().map(|a| a.ip()).chain(["127.0.0.1".parse()?]).collect(),
            None => vec!["127.0.0.1".parse()?],
        };
        fs_client::tls::init_cluster_certs(&certs, opts.nodes + 2, 6, &ips)?;
        let addrs: Vec<SocketAddr> = match &opts.addrs {
            Some(a) => a.clone(),
            None => (0..opts.nodes).map(|_| SocketAddr::from(([127, 0, 0, 1], free_port()))).collect(),
        };
        let members: Vec<String> = addrs.iter().enumerate().map(|(i, a)| format!("{}={a}", i + 1)).collect();
        let mut nodes = BTreeMap::new();
        for (i, addr) in addrs.iter().enumerate() {
            let id = i as u64 + 1;
            let data_dir = dir.path().join(format!("meta-{id}"));
            let mut args = vec![
                "meta".to_string(),
                "--id".into(),
                id.to_string(),
                "--listen".into(),
                addr.to_string(),
                "--data-dir".into(),
                data_dir.display().to_string(),
                "--certs".into(),
                certs.display().to_string(),
                "--bootstrap".into(),
                members.join(","),
            ];
            if let Some(n) = opts.snapshot_every {
                args.extend(["--snapshot-every".into(), n.to_string()]);
            }
            if let Some(n) = opts.keep_logs {
                args.extend(["--keep-logs".into(), n.to_string()]);
            }
            if let Some(n) = opts.change_history {
                args.extend(["--change-history".into(), n.to_string()]);
            }
            args.extend(opts.extra_args.iter().cloned());
            let mut node = MetaNode {
                id,
                addr: *addr,
                data_dir,
                log: dir.path().join(format!("meta-{id}.log")),
                args,
                netns: opts.netns.as_ref().map(|n| n[i].clone()),
                child: None,
            };
            node.spawn()?;
            nodes.insert(id, node);
        }
        let cluster = MetaCluster { dir, certs, nodes };
        cluster.wait_ready(Duration::from_secs(30)).await?;
        Ok(cluster)
    }

    /// A client configuration for certificate `name` (admin, client, host).
    pub fn client_config(&self, name: &str) -> ClientConfig {
        ClientConfig {
            meta: self.nodes.values().map(|n| n.addr.to_string()).collect(),
            ca: self.certs.join("ca.pem"),
            cert: self.certs.join(format!("{name}.pem")),
            key: self.certs.join(format!("{name}.key")),
            timeout_ms: 20_000,
            topology: None,
            local_reads: true,
            local_dir: Some(self.local_dir()),
        }
    }

    /// Where this cluster's chunk servers put their local sockets.
    pub fn local_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    /// An admin client.
    pub fn client(&self) -> MetaClient {
        MetaClient::new(&self.client_config("admin")).expect("client")
    }

    /// Writes a client.toml for the `locus` CLI and returns its path.
    pub fn write_cli_config(&self, name: &str, meta: Option<Vec<String>>, timeout_ms: u64) -> PathBuf {
        let mut cfg = self.client_config(name);
        if let Some(m) = meta {
            cfg.meta = m;
        }
        cfg.timeout_ms = timeout_ms;
        let p = self.dir.path().join(format!("{name}-{}.toml", rand::random::<u32>()));
        cfg.save(&p).expect("save client config");
        p
    }

    /// Waits until a linearizable read succeeds.
    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let client = self.client();
        let deadline = Instant::now() + timeout;
        loop {
            match client.read(MetaRead::StatFs).await {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    bail!("cluster not ready after {timeout:?}: {e}\n{}", self.logs_tail())
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// The current leader as the reachable nodes report it.
    pub async fn leader(&self) -> Option<u64> {
        let client = self.client();
        for n in self.nodes.values().filter(|n| n.is_running()) {
            if let Ok(s) = client.status_of(&n.addr.to_string()).await {
                if s.leader_id.is_some() && s.state == "Leader" {
                    return s.leader_id;
                }
            }
        }
        None
    }

    /// Waits for a leader other than `not`.
    pub async fn wait_leader(&self, not: Option<u64>, timeout: Duration) -> anyhow::Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.leader().await {
                if Some(l) != not {
                    return Ok(l);
                }
            }
            if Instant::now() > deadline {
                bail!("no new leader within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn node(&mut self, id: u64) -> &mut MetaNode {
        self.nodes.get_mut(&id).expect("node id")
    }

    pub fn kill(&mut self, id: u64) {
        self.node(id).kill();
    }

    pub fn pause(&mut self, id: u64) {
        self.node(id).signal(nix::sys::signal::Signal::SIGSTOP);
    }

    pub fn resume(&mut self, id: u64) {
        self.node(id).signal(nix::sys::signal::Signal::SIGCONT);
    }

    /// Starts a killed node again with the same data.
    pub fn restart(&mut self, id: u64) -> anyhow::Result<()> {
        let n = self.node(id);
        n.kill();
        n.spawn()
    }

    /// Status as node `id` reports it.
    pub async fn status_of(&self, id: u64) -> anyhow::Result<ClusterStatus> {
        let addr = self.nodes[&id].addr.to_string();
        Ok(self.client().status_of(&addr).await?)
    }

    /// The last lines of every node's log, for failure messages.
    pub fn logs_tail(&self) -> String {
        let mut out = String::new();
        for n in self.nodes.values() {
            log_tail(&mut out, &format!("node {}", n.id), &n.log);
        }
        out
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Appends a process log's panics (each with the 8 lines after it) and its
/// last 30 lines to `out`, under a title.
pub(crate) fn log_tail(out: &mut String, who: &str, log: &Path) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    for (i, _) in lines.iter().enumerate().filter(|(_, l)| l.contains("panicked at")).take(3) {
        out.push_str(&format!("--- {who} log: panic at line {}\n", i + 1));
        for l in &lines[i..(i + 9).min(lines.len())] {
            out.push_str(l);
            out.push('\n');
        }
    }
    out.push_str(&format!("--- {who} log (last 30 lines)\n"));
    for l in &lines[lines.len().saturating_sub(30)..] {
        out.push_str(l);
        out.push('\n');
    }
}

/// Runs the `locus` CLI with `args` and returns (exit code, stdout, stderr).
pub fn locus_cli(config: &Path, args: &[&str], netns: Option<&str>) -> (i32, String, String) {
    let out = command_in(netns, &bin("locus")).arg("--config").arg(config).args(args).output().expect("run locus");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Walks the whole namespace from the root; returns every path with its
/// attributes. Fails on a directory reached twice (a cycle or a second link).
pub async fn walk(client: &MetaClient) -> anyhow::Result<BTreeMap<String, Attr>> {
    let mut out = BTreeMap::new();
    let mut seen_dirs = std::collections::HashSet::new();
    let mut stack = vec![("/".to_string(), ROOT_INO)];
    while let Some((path, ino)) = stack.pop() {
        if !seen_dirs.insert(ino) {
            bail!("directory inode {ino} reached twice (at {path})");
        }
        for e in client.readdir_all(ino).await? {
            let name = String::from_utf8_lossy(&e.name).into_owned();
            let p = if path == "/" { format!("/{name}") } else { format!("{path}/{name}") };
            let attr = client.getattr(e.ino).await?;
            if e.kind == FileKind::Dir {
                stack.push((p.clone(), e.ino));
            }
            out.insert(p, attr);
        }
    }
    Ok(out)
}

/// One `locus-server chunk` process.
pub struct ChunkNode {
    pub index: u64,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

impl ChunkNode {
    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let mut cmd = Command::new(bin("locus-server"));
        cmd.args(&self.args).env("LOCUS_LOG", "info").stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        self.child = Some(cmd.spawn().with_context(|| format!("spawn chunk server {}", self.index))?);
        Ok(())
    }

    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        if let Some(pid) = self.pid() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
        }
    }

    /// The chunk replica files this server holds.
    pub fn chunk_files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![self.data_dir.join("chunks")];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push(p);
                }
            }
        }
        out.sort();
        out
    }
}

impl Drop for ChunkNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Options for a whole test cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub meta: MetaOptions,
    pub chunks: u64,
    /// Chunk size (tests use small chunks so files span several).
    pub chunk_bytes: u64,
    pub dead_after_ms: u64,
    pub scan_every_ms: u64,
    pub report_every_ms: u64,
    /// Capacity each chunk server announces.
    pub capacity_bytes: Option<u64>,
    /// Data directories to use instead of ones in the temp dir (per server).
    pub chunk_dirs: Option<Vec<PathBuf>>,
    /// The address every server listens on (default 127.0.0.1), e.g. a
    /// bridge address that hosts in network namespaces reach too.
    pub ip: Option<std::net::IpAddr>,
    /// Whether chunk servers serve local reads on Unix sockets (in the
    /// cluster's `run/`). Off whenever `ip` is set: a client in another
    /// network namespace stands for another machine, and a Unix socket
    /// would reach across the namespaces (and across any cut link).
    pub local_sockets: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            meta: MetaOptions::default(),
            chunks: 3,
            chunk_bytes: 1 << 20,
            dead_after_ms: 3_000,
            scan_every_ms: 1_000,
            report_every_ms: 3_000,
            capacity_bytes: None,
            chunk_dirs: None,
            ip: None,
            local_sockets: true,
        }
    }
}

/// Metadata nodes plus chunk servers, each chunk server in its own rack.
pub struct Cluster {
    pub meta: MetaCluster,
    pub chunks: BTreeMap<u64, ChunkNode>,
}

impl Cluster {
    pub async fn start(mut opts: ClusterOptions) -> anyhow::Result<Cluster> {
        opts.meta.extra_args.extend([
            "--chunk-bytes".into(),
            opts.chunk_bytes.to_string(),
            "--dead-after-ms".into(),
            opts.dead_after_ms.to_string(),
            "--scan-every-ms".into(),
            opts.scan_every_ms.to_string(),
        ]);
        let ip = opts.ip.unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]));
        if opts.ip.is_some() && opts.meta.addrs.is_none() {
            opts.meta.addrs = Some((0..opts.meta.nodes).map(|_| SocketAddr::new(ip, free_port())).collect());
        }
        let meta = MetaCluster::start(opts.meta.clone()).await?;
        let meta_addrs: Vec<String> = meta.nodes.values().map(|n| n.addr.to_string()).collect();
        let mut chunks = BTreeMap::new();
        for i in 1..=opts.chunks {
            let addr = SocketAddr::new(ip, free_port());
            let data_dir = match &opts.chunk_dirs {
                Some(d) => d[(i - 1) as usize].clone(),
                None => meta.path().join(format!("chunk-{i}")),
            };
            let mut args = vec![
                "chunk".to_string(),
                "--listen".into(),
                addr.to_string(),
                "--data-dir".into(),
                data_dir.display().to_string(),
                "--certs".into(),
                meta.certs.display().to_string(),
                "--cert-name".into(),
                format!("chunk-{i}"),
                "--meta".into(),
                meta_addrs.join(","),
                "--zone".into(),
                "z1".into(),
                "--rack".into(),
                format!("r{i}"),
                "--host".into(),
                format!("h{i}"),
                "--heartbeat-ms".into(),
                "500".into(),
                "--fence-after-ms".into(),
                (opts.dead_after_ms * 2 / 3).max(1000).to_string(),
                "--report-every-ms".into(),
                opts.report_every_ms.to_string(),
            ];
            if let Some(c) = opts.capacity_bytes {
                args.extend(["--capacity-bytes".into(), c.to_string()]);
            }
            if opts.local_sockets && opts.ip.is_none() {
                args.extend(["--local-dir".into(), meta.local_dir().display().to_string()]);
            } else {
                args.extend(["--local-socket".into(), "false".into()]);
            }
            let mut node = ChunkNode {
                index: i,
                addr,
                data_dir,
                log: meta.path().join(format!("chunk-{i}.log")),
                args,
                child: None,
            };
            node.spawn()?;
            chunks.insert(i, node);
        }
        let cluster = Cluster { meta, chunks };
        cluster.wait_chunks_alive(opts.chunks as usize, Duration::from_secs(30)).await?;
        Ok(cluster)
    }

    pub fn client(&self) -> MetaClient {
        self.meta.client()
    }

    /// A file client with the admin certificate.
    pub fn files(&self) -> fs_client::file::FileClient {
        let cfg = self.meta.client_config("admin");
        let chunks = fs_client::chunk::ChunkClient::for_config(&cfg).expect("chunk client");
        fs_client::file::FileClient::new(self.client(), chunks, None)
    }

    pub fn client_config(&self, name: &str) -> ClientConfig {
        self.meta.client_config(name)
    }

    pub fn write_cli_config(&self, name: &str, meta: Option<Vec<String>>, timeout_ms: u64) -> PathBuf {
        self.meta.write_cli_config(name, meta, timeout_ms)
    }

    pub async fn health(&self) -> anyhow::Result<ClusterHealth> {
        match self.client().read(MetaRead::Health).await? {
            ReadReply::Health(h) => Ok(h),
            other => bail!("unexpected reply {other:?}"),
        }
    }

    /// Waits until `n` chunk servers are alive at the leader.
    pub async fn wait_chunks_alive(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(h) = self.health().await {
                if h.servers.iter().filter(|s| s.alive).count() >= n {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("{n} chunk servers not alive after {timeout:?}\n{}", self.logs_tail());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until no chunk is under-replicated or lost (after a full scan).
    pub async fn wait_fully_replicated(&self, timeout: Duration) -> anyhow::Result<ClusterHealth> {
        let deadline = Instant::now() + timeout;
        let start = Instant::now();
        loop {
            if let Ok(h) = self.health().await {
                let scanned_since = h.last_scan_ms.is_some_and(|ms| Duration::from_millis(ms) < start.elapsed());
                if scanned_since && h.under_replicated == 0 && h.lost == 0 && h.repairs_in_flight == 0 {
                    return Ok(h);
                }
                if Instant::now() > deadline {
                    bail!("not fully replicated after {timeout:?}: {h:?}\n{}", self.logs_tail());
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn chunk(&mut self, i: u64) -> &mut ChunkNode {
        self.chunks.get_mut(&i).expect("chunk server index")
    }

    pub fn kill_chunk(&mut self, i: u64) {
        self.chunk(i).kill();
    }

    pub fn restart_chunk(&mut self, i: u64) -> anyhow::Result<()> {
        let n = self.chunk(i);
        n.kill();
        n.spawn()
    }

    pub fn pause_chunk(&mut self, i: u64) {
        self.chunk(i).signal(nix::sys::signal::Signal::SIGSTOP);
    }

    pub fn resume_chunk(&mut self, i: u64) {
        self.chunk(i).signal(nix::sys::signal::Signal::SIGCONT);
    }

    pub fn logs_tail(&self) -> String {
        let mut out = self.meta.logs_tail();
        for n in self.chunks.values() {
            log_tail(&mut out, &format!("chunk server {}", n.index), &n.log);
        }
        out
    }

    pub fn path(&self) -> &Path {
        self.meta.path()
    }

    /// Where the chunk servers put their local sockets.
    pub fn local_dir(&self) -> PathBuf {
        self.meta.local_dir()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in self.chunks.values_mut() {
            n.kill();
        }
    }
}

/// Small tmpfs mounts standing in for disks that fill up. Unmounted on drop.
pub struct TmpfsDisks {
    dir: tempfile::TempDir,
    mounts: Vec<PathBuf>,
}

impl TmpfsDisks {
    /// `n` tmpfs filesystems of `bytes` each (needs root).
    pub fn new(n: usize, bytes: u64) -> anyhow::Result<TmpfsDisks> {
        let dir = tempfile::Builder::new().prefix("locus-disks-").tempdir()?;
        let mut disks = TmpfsDisks { dir, mounts: Vec::new() };
        for i in 0..n {
            let m = disks.dir.path().join(format!("disk{i}"));
            std::fs::create_dir_all(&m)?;
            let out = Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
                .arg(&m)
                .output()
                .context("run mount")?;
            if !out.status.success() {
                bail!("mount tmpfs at {}: {}", m.display(), String::from_utf8_lossy(&out.stderr));
            }
            disks.mounts.push(m);
        }
        Ok(disks)
    }

    pub fn dirs(&self) -> Vec<PathBuf> {
        self.mounts.iter().map(|m| m.join("data")).collect()
    }
}

impl Drop for TmpfsDisks {
    fn drop(&mut self) {
        for m in &self.mounts {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
    }
}
