//! `locus up` / `locus down`: a whole local cluster on loopback, from one
//! data directory.
//!
//! Layout of the data directory:
//! - `certs/`: the cluster CA and every certificate;
//! - `meta-<i>/`: the Raft state of metadata node i;
//! - `logs/<service>.log`, `run/<service>.pid`;
//! - `client.toml`: the admin client configuration the CLI uses.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;

use crate::client::MetaClient;
use crate::config::{default_data_dir, ClientConfig};
use crate::proto::*;
use crate::tls;

/// How long `up` waits for the cluster to serve requests.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `down` waits for a graceful stop before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a VM host gets to stop its VMs and flush its mount.
const HOST_STOP_TIMEOUT: Duration = Duration::from_secs(45);

#[derive(Args, Debug, Clone)]
pub struct UpArgs {
    /// Where the cluster keeps everything (default ~/.locus).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Metadata nodes to run.
    #[arg(long, default_value_t = 3)]
    pub meta: u64,
    /// Chunk servers to run (each in its own rack, r1, r2, ...).
    #[arg(long, default_value_t = 3)]
    pub chunks: u64,
    /// VM hosts to run (host i in rack ri, on the machine of chunk server i).
    #[arg(long, default_value_t = 3)]
    pub hosts: u64,
    /// vCPUs each VM host offers.
    #[arg(long, default_value_t = 8)]
    pub host_vcpus: u32,
    /// Memory each VM host offers, MiB.
    #[arg(long, default_value_t = 8192)]
    pub host_memory_mib: u64,
    /// Loopback address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub ip: IpAddr,
    /// Metadata node i listens on UDP base+i, chunk server i on base+10+i;
    /// their metrics on TCP base+100+i and base+110+i.
    #[arg(long, default_value_t = 7100)]
    pub base_port: u16,
    /// The locus-server binary (default: next to this one, else $PATH).
    #[arg(long)]
    pub server_bin: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct DownArgs {
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

impl Default for UpArgs {
    fn default() -> Self {
        UpArgs {
            data_dir: None,
            meta: 3,
            chunks: 3,
            hosts: 3,
            host_vcpus: 8,
            host_memory_mib: 8192,
            ip: IpAddr::from([127, 0, 0, 1]),
            base_port: 7100,
            server_bin: None,
        }
    }
}

/// One process of the local cluster.
struct Service {
    name: String,
    bin: PathBuf,
    args: Vec<String>,
}

/// The binaries `up` starts.
const BINARIES: [&str; 2] = ["locus-server", "locus-vmhost"];

/// A workspace binary: next to this one, else on $PATH.
pub fn find_bin(name: &str, explicit: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p);
    }
    if let Ok(me) = std::env::current_exe() {
        let sib = me.with_file_name(name);
        if sib.exists() {
            return Ok(sib);
        }
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        let p = dir.join(name);
        if p.exists() {
            return Ok(p);
        }
    }
    bail!("{name} not found next to locus or on $PATH (build it with `cargo build --release`)")
}

fn pid_file(dir: &Path, name: &str) -> PathBuf {
    dir.join("run").join(format!("{name}.pid"))
}

/// The pid in a pid file, if that process is alive and is a Locus server.
fn running_pid(path: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(path).ok()?.trim().parse().ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let is_ours =
        cmdline.split(|&b| b == 0).next().is_some_and(|argv0| BINARIES.iter().any(|b| argv0.ends_with(b.as_bytes())));
    is_ours.then_some(pid)
}

pub async fn up(args: UpArgs, json: bool) -> anyhow::Result<()> {
    let dir = args.data_dir.clone().unwrap_or_else(default_data_dir);
    if args.meta == 0 || args.meta > 9 {
        bail!("--meta must be between 1 and 9");
    }
    if args.chunks > 9 {
        bail!("--chunks must be between 0 and 9");
    }
    if args.hosts > 9 {
        bail!("--hosts must be between 0 and 9");
    }
    if args.base_port < 1024 || args.base_port > 65000 {
        bail!("--base-port must be between 1024 and 65000");
    }
    for sub in ["certs", "logs", "run"] {
        std::fs::create_dir_all(dir.join(sub)).with_context(|| format!("create {}", dir.join(sub).display()))?;
    }
    let dir = dir.canonicalize().with_context(|| format!("resolve {}", dir.display()))?;
    let certs = dir.join("certs");
    tls::init_cluster_certs(&certs, args.meta, args.chunks, &[args.ip]).context("create certificates")?;
    let server = find_bin("locus-server", args.server_bin.clone())?;
    let vmhost = if args.hosts > 0 { Some(find_bin("locus-vmhost", None)?) } else { None };

    let addr = |i: u64| format!("{}:{}", args.ip, args.base_port as u64 + i);
    let members: Vec<String> = (1..=args.meta).map(|i| format!("{i}={}", addr(i))).collect();
    let mut services = Vec::new();
    for i in 1..=args.meta {
        services.push(Service {
            name: format!("meta-{i}"),
            bin: server.clone(),
            args: vec![
                "meta".into(),
                "--id".into(),
                i.to_string(),
                "--listen".into(),
                addr(i),
                "--data-dir".into(),
                dir.join(format!("meta-{i}")).display().to_string(),
                "--certs".into(),
                certs.display().to_string(),
                "--metrics-listen".into(),
                format!("{}:{}", args.ip, args.base_port as u64 + 100 + i),
                "--bootstrap".into(),
                members.join(","),
            ],
        });
    }

    let meta_addrs: Vec<String> = (1..=args.meta).map(addr).collect();
    // The chunk servers' sockets for local reads: in the cluster's own
    // directory, so it needs no rights to /run and goes with the cluster.
    let local_dir = dir.join("run");
    for i in 1..=args.chunks {
        services.push(Service {
            name: format!("chunk-{i}"),
            bin: server.clone(),
            args: vec![
                "chunk".into(),
                "--listen".into(),
                format!("{}:{}", args.ip, args.base_port as u64 + 10 + i),
                "--data-dir".into(),
                dir.join(format!("chunk-{i}")).display().to_string(),
                "--certs".into(),
                certs.display().to_string(),
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
                "--metrics-listen".into(),
                format!("{}:{}", args.ip, args.base_port as u64 + 110 + i),
                "--local-dir".into(),
                local_dir.display().to_string(),
            ],
        });
    }

    let meta_list: Vec<String> = (1..=args.meta).map(addr).collect();
    for i in 1..=args.hosts {
        let Some(bin) = &vmhost else { break };
        let name = format!("host-{i}");
        let topology = Topology::new("z1", format!("r{i}"), format!("h{i}"));
        let cfg = ClientConfig {
            meta: meta_list.clone(),
            ca: certs.join("ca.pem"),
            cert: certs.join("host.pem"),
            key: certs.join("host.key"),
            timeout_ms: crate::config::DEFAULT_TIMEOUT_MS,
            topology: Some(topology.clone()),
            local_reads: true,
            local_dir: Some(local_dir.clone()),
        };
        let cfg_path = dir.join(format!("{name}.toml"));
        cfg.save(&cfg_path).with_context(|| format!("write {}", cfg_path.display()))?;
        services.push(Service {
            name: name.clone(),
            bin: bin.clone(),
            args: vec![
                "run".into(),
                "--config".into(),
                cfg_path.display().to_string(),
                "--state-dir".into(),
                dir.join(&name).display().to_string(),
                "--name".into(),
                name.clone(),
                "--zone".into(),
                topology.zone.clone(),
                "--rack".into(),
                topology.rack.clone(),
                "--host".into(),
                topology.host.clone(),
                "--vcpus".into(),
                args.host_vcpus.to_string(),
                "--memory-mib".into(),
                args.host_memory_mib.to_string(),
            ],
        });
    }

    let mut started = Vec::new();
    for s in &services {
        let pidf = pid_file(&dir, &s.name);
        if let Some(pid) = running_pid(&pidf) {
            tracing::info!(service = %s.name, pid, "already running");
            continue;
        }
        let log_path = dir.join("logs").join(format!("{}.log", s.name));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("open {}", log_path.display()))?;
        let mut cmd = Command::new(&s.bin);
        cmd.args(&s.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group: a Ctrl-C in this terminal does not stop it.
            .process_group(0);
        use std::os::unix::process::CommandExt;
        let child = cmd.spawn().with_context(|| format!("start {} ({})", s.name, s.bin.display()))?;
        std::fs::write(&pidf, child.id().to_string()).with_context(|| format!("write {}", pidf.display()))?;
        started.push(s.name.clone());
    }

    let client_cfg = ClientConfig {
        meta: (1..=args.meta).map(addr).collect(),
        ca: certs.join("ca.pem"),
        cert: certs.join("admin.pem"),
        key: certs.join("admin.key"),
        timeout_ms: crate::config::DEFAULT_TIMEOUT_MS,
        topology: None,
        local_reads: true,
        local_dir: Some(local_dir.clone()),
    };
    let cfg_path = dir.join("client.toml");
    client_cfg.save(&cfg_path).context("write client.toml")?;

    // Ready when a linearizable read succeeds (a leader exists, the root is
    // made), every chunk server has checked in and every VM host holds a
    // lease.
    let client = MetaClient::new(&client_cfg)?;
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let ready = match client.read(MetaRead::Health).await {
            Ok(ReadReply::Health(h)) => {
                let up = h.servers.iter().filter(|s| s.alive).count() as u64;
                if up < args.chunks {
                    Err(format!("{up} of {} chunk servers up", args.chunks))
                } else if args.hosts == 0 {
                    Ok(())
                } else {
                    match client.vm(VmRequest::Read(crate::vm::VmRead::Hosts)).await {
                        Ok(crate::vm::VmReply::Hosts(hs)) => {
                            let up = hs.iter().filter(|h| h.up).count() as u64;
                            if up >= args.hosts {
                                Ok(())
                            } else {
                                Err(format!("{up} of {} VM hosts up", args.hosts))
                            }
                        }
                        Ok(other) => Err(format!("unexpected reply {other:?}")),
                        Err(e) => Err(e.to_string()),
                    }
                }
            }
            Ok(other) => Err(format!("unexpected reply {other:?}")),
            Err(e) => Err(e.to_string()),
        };
        match ready {
            Ok(()) => break,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "cluster not ready yet")
            }
            Err(e) => {
                bail!("cluster did not become ready within {READY_TIMEOUT:?}: {e}; see {}", dir.join("logs").display())
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    if json {
        let v = serde_json::json!({
            "data_dir": dir,
            "config": cfg_path,
            "meta": client_cfg.meta,
            "started": started,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "Locus is up: {} metadata nodes on {}, {} chunk servers, {} VM hosts",
            args.meta,
            client_cfg.meta.join(", "),
            args.chunks,
            args.hosts
        );
        println!("  data:    {}", dir.display());
        println!("  logs:    {}", dir.join("logs").display());
        println!("  metrics: http://{}:{}/metrics (node 1)", args.ip, args.base_port + 101);
        println!();
        if cfg_path != ClientConfig::default_path() {
            println!("  export LOCUS_CONFIG={}", cfg_path.display());
        }
        println!("  locus cluster status");
        println!("  locus fs mkdir /vm && locus fs put ./disk.img /vm/disk.img && locus fs locate /vm/disk.img");
        println!("  locus cluster health");
        println!("  locus host ls && locus vm apply service.toml && locus vm ls && locus vm why web-1");
        println!("  locus demo                           # the main job, end to end");
        println!(
            "  locus down{}",
            if args.data_dir.is_some() { format!(" --data-dir {}", dir.display()) } else { String::new() }
        );
    }
    Ok(())
}

pub fn down(args: DownArgs) -> anyhow::Result<()> {
    let dir = args.data_dir.unwrap_or_else(default_data_dir);
    let run = dir.join("run");
    let Ok(rd) = std::fs::read_dir(&run) else {
        println!("nothing running in {}", dir.display());
        return Ok(());
    };
    let mut files: Vec<PathBuf> =
        rd.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "pid")).collect();
    files.sort();
    // VM hosts first: they stop their VMs and flush their mounts, which
    // needs the servers still up.
    let (hosts, servers): (Vec<PathBuf>, Vec<PathBuf>) =
        files.into_iter().partition(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("host-")));
    let mut stopped = stop_all(&hosts, HOST_STOP_TIMEOUT);
    stopped += stop_all(&servers, STOP_TIMEOUT);
    println!("stopped {stopped} processes");
    Ok(())
}

/// SIGTERM to each, then SIGKILL to what is left after `timeout`.
fn stop_all(pid_files: &[PathBuf], timeout: Duration) -> usize {
    let mut pids = Vec::new();
    for path in pid_files {
        if let Some(pid) = running_pid(path) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
            pids.push((pid, path.clone()));
        } else {
            let _ = std::fs::remove_file(path);
        }
    }
    let deadline = Instant::now() + timeout;
    for (pid, path) in &pids {
        while Instant::now() < deadline && running_pid(path).is_some() && alive(*pid) {
            std::thread::sleep(Duration::from_millis(50));
        }
        if alive(*pid) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), nix::sys::signal::Signal::SIGKILL);
        }
        let _ = std::fs::remove_file(path);
    }
    pids.len()
}

fn alive(pid: i32) -> bool {
    // A zombie still answers kill(0); look at its state.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s.split_whitespace().nth(2).is_none_or(|st| st != "Z"),
        Err(_) => false,
    }
}
