//! VM hosts for tests: real `locus-vmhost run` processes next to a
//! [`Cluster`], host `i` on the machine of chunk server `i` (same zone,
//! rack and host labels). Kill -9, SIGSTOP and restart them; on drop every
//! piece of a host goes: agent, fence guard, mount and VMs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use fs_client::proto::Topology;
use fs_client::vm::*;
use fs_client::MetaClient;

use crate::{bin, log_tail, Cluster};

/// One `locus-vmhost run` process.
pub struct HostNode {
    pub index: u64,
    pub name: String,
    pub state_dir: PathBuf,
    pub log: PathBuf,
    args: Vec<String>,
    /// Runs the agent (and so its guard, mount and VMs) in this namespace.
    netns: Option<String>,
    child: Option<Child>,
}

impl HostNode {
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let mut cmd = crate::command_in(self.netns.as_deref(), &bin("locus-vmhost"));
        cmd.args(&self.args)
            .env("LOCUS_LOG", "info")
            .env("LOCUS_LOG_DIR", self.state_dir.join("logs"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.child = Some(cmd.spawn().with_context(|| format!("spawn {}", self.name))?);
        Ok(())
    }

    /// SIGKILL the agent alone (its guard, mount and VMs live on, as when
    /// the agent crashes).
    pub fn kill_agent(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        if let Some(pid) = self.pid() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
        }
    }

    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill_agent();
        self.spawn()
    }

    /// Everything of this host goes: agent, VMs, mount, guard.
    pub fn destroy(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
        self.kill_agent();
        let dirs = vmhost::guard::HostDirs::new(&self.state_dir);
        dirs.guard_pid().signal(nix::sys::signal::Signal::SIGKILL);
        // Drop may run inside a test's runtime: fence from a thread of its own.
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                rt.block_on(vmhost::guard::fence_now(&dirs));
            }
        })
        .join();
    }
}

impl Drop for HostNode {
    fn drop(&mut self) {
        self.destroy();
    }
}

/// VM hosts of one cluster.
pub struct Hosts {
    pub nodes: BTreeMap<u64, HostNode>,
    client: MetaClient,
}

impl Hosts {
    /// Starts hosts `1..=n`, host i in rack ri on machine hi, and waits
    /// until each holds a lease.
    pub async fn start(cluster: &Cluster, n: u64) -> anyhow::Result<Hosts> {
        Self::start_with(cluster, n, 8, 8192).await
    }

    /// As [`Hosts::start`], each host offering `vcpus` and `memory_mib`.
    pub async fn start_with(cluster: &Cluster, n: u64, vcpus: u32, memory_mib: u64) -> anyhow::Result<Hosts> {
        let mut hosts = Hosts { nodes: BTreeMap::new(), client: cluster.client() };
        for i in 1..=n {
            hosts.add(cluster, i, vcpus, memory_mib, None)?;
        }
        hosts.wait_up(n as usize, Duration::from_secs(30)).await?;
        Ok(hosts)
    }

    /// No hosts yet; see [`Hosts::add`].
    pub fn none(cluster: &Cluster) -> Hosts {
        Hosts { nodes: BTreeMap::new(), client: cluster.client() }
    }

    /// Starts host `i` (rack ri, machine hi), in namespace `netns` if given.
    pub fn add(
        &mut self,
        cluster: &Cluster,
        i: u64,
        vcpus: u32,
        memory_mib: u64,
        netns: Option<String>,
    ) -> anyhow::Result<()> {
        {
            let name = format!("host-{i}");
            let state_dir = cluster.path().join(&name);
            std::fs::create_dir_all(&state_dir)?;
            let mut cfg = cluster.client_config("host");
            cfg.topology = Some(Topology::new("z1", format!("r{i}"), format!("h{i}")));
            let cfg_path = cluster.path().join(format!("{name}.toml"));
            cfg.save(&cfg_path)?;
            let args = vec![
                "run".to_string(),
                "--config".into(),
                cfg_path.display().to_string(),
                "--state-dir".into(),
                state_dir.display().to_string(),
                "--name".into(),
                name.clone(),
                "--zone".into(),
                "z1".into(),
                "--rack".into(),
                format!("r{i}"),
                "--host".into(),
                format!("h{i}"),
                "--vcpus".into(),
                vcpus.to_string(),
                "--memory-mib".into(),
                memory_mib.to_string(),
                "--heartbeat-ms".into(),
                "300".into(),
                "--locus-bin".into(),
                bin("locus").display().to_string(),
            ];
            let mut node = HostNode {
                index: i,
                name,
                log: cluster.path().join(format!("host-{i}.log")),
                state_dir,
                args,
                netns,
                child: None,
            };
            node.spawn()?;
            self.nodes.insert(i, node);
        }
        Ok(())
    }

    pub fn node(&mut self, i: u64) -> &mut HostNode {
        self.nodes.get_mut(&i).expect("host index")
    }

    /// The host index of a host id (by name).
    pub async fn index_of(&self, id: HostId) -> anyhow::Result<u64> {
        let hosts = self.list().await?;
        let h = hosts.iter().find(|h| h.id == id).context("no such host")?;
        h.name.strip_prefix("host-").and_then(|s| s.parse().ok()).context("host name")
    }

    pub async fn list(&self) -> anyhow::Result<Vec<HostInfo>> {
        match self.client.vm(VmRequest::Read(VmRead::Hosts)).await? {
            VmReply::Hosts(h) => Ok(h),
            other => bail!("unexpected reply {other:?}"),
        }
    }

    pub async fn wait_up(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(h) = self.list().await {
                if h.iter().filter(|h| h.up).count() >= n {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("{n} VM hosts not up after {timeout:?}\n{}", self.logs_tail());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn logs_tail(&self) -> String {
        let mut out = String::new();
        for n in self.nodes.values() {
            log_tail(&mut out, &n.name, &n.log);
        }
        out
    }
}

use fs_client::proto::VmRequest;

/// VMs of one service.
pub async fn vms(client: &MetaClient, service: &str) -> anyhow::Result<Vec<VmInfo>> {
    match client.vm(VmRequest::Read(VmRead::Vms { service: Some(service.into()) })).await? {
        VmReply::Vms(v) => Ok(v),
        other => bail!("unexpected reply {other:?}"),
    }
}

/// Waits until `pred` holds for the VMs of `service`; returns them.
pub async fn wait_vms(
    client: &MetaClient,
    service: &str,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&[VmInfo]) -> bool,
) -> anyhow::Result<Vec<VmInfo>> {
    let deadline = Instant::now() + timeout;
    loop {
        let v = vms(client, service).await.unwrap_or_default();
        if pred(&v) {
            return Ok(v);
        }
        if Instant::now() > deadline {
            let now: Vec<String> = v.iter().map(|v| format!("{} {} on {:?}", v.id, v.status, v.host)).collect();
            bail!("{what}: not after {timeout:?}; VMs: {}", now.join(", "));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Process groups of live processes whose environment names VM `vm`: one
/// per running copy of a process-driver VM.
pub fn vm_copies(vm: &str) -> Vec<i32> {
    let needle = format!("LOCUS_VM_ID={vm}\0");
    let mut groups = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else { return groups };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else { continue };
        if !env.windows(needle.len()).any(|w| w == needle.as_bytes()) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else { continue };
        let fields: Vec<&str> = after.split_whitespace().collect();
        if fields.first().is_some_and(|s| *s == "Z") {
            continue;
        }
        if let Some(pgrp) = fields.get(2).and_then(|s| s.parse().ok()) {
            if !groups.contains(&pgrp) {
                groups.push(pgrp);
            }
        }
    }
    groups
}
