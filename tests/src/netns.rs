//! Network namespaces joined by a bridge, so tests can cut one host off.
//!
//! Each host gets a namespace with one veth into a bridge in the root
//! namespace; the bridge has an address too, so the test process reaches
//! every host. Cutting a host sets its bridge-side veth down: it can reach
//! no other host and no host can reach it. All names carry this process's
//! id; leftovers of dead test processes are removed at the next start.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;

use anyhow::{bail, Context};

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output().context("run ip (iproute2)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Whether this machine lets the test make namespaces (root, iproute2).
pub fn available() -> bool {
    nix::unistd::geteuid().is_root() && Command::new("ip").arg("-V").output().is_ok_and(|o| o.status.success())
}

/// Removes namespaces and links left by test processes that died.
fn reap_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix("lt") else {
            continue;
        };
        let Some((pid, _)) = rest.split_once('h') else {
            continue;
        };
        let Ok(pid) = pid.parse::<i32>() else {
            continue;
        };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let _ = ip(&["netns", "del", name]);
        let _ = ip(&["link", "del", &format!("lb{pid}")]);
    }
}

/// A set of hosts in namespaces on one bridge.
pub struct Net {
    pid: u32,
    subnet: u8,
    hosts: usize,
}

impl Net {
    /// Makes `hosts` namespaces `lt<pid>h<i>` with addresses 10.213.<s>.<i+1>.
    pub fn new(hosts: usize) -> anyhow::Result<Net> {
        reap_stale();
        let pid = std::process::id();
        // One subnet per test process.
        let subnet = (pid % 250) as u8 + 1;
        let net = Net { pid, subnet, hosts: 0 };
        let br = net.bridge();
        ip(&["link", "add", &br, "type", "bridge"])?;
        let mut net = net;
        ip(&["addr", "add", &format!("10.213.{subnet}.254/24"), "dev", &br])?;
        ip(&["link", "set", &br, "up"])?;
        for i in 0..hosts {
            let ns = net.ns(i);
            ip(&["netns", "add", &ns])?;
            net.hosts = i + 1;
            let (outer, inner) = (net.veth(i), format!("lv{}i{}", pid, i));
            ip(&["link", "add", &outer, "type", "veth", "peer", "name", &inner])?;
            ip(&["link", "set", &inner, "netns", &ns])?;
            ip(&["link", "set", &outer, "master", &br])?;
            ip(&["link", "set", &outer, "up"])?;
            ip(&["-n", &ns, "addr", "add", &format!("{}/24", net.addr(i)), "dev", &inner])?;
            ip(&["-n", &ns, "link", "set", &inner, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }

    fn bridge(&self) -> String {
        format!("lb{}", self.pid)
    }

    fn veth(&self, i: usize) -> String {
        format!("lv{}o{}", self.pid, i)
    }

    /// The namespace of host `i`.
    pub fn ns(&self, i: usize) -> String {
        format!("lt{}h{}", self.pid, i)
    }

    /// The bridge's address in the root namespace: servers listening on it
    /// are reachable from every host and from the root namespace.
    pub fn bridge_addr(&self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 213, self.subnet, 254))
    }

    /// The address of host `i`.
    pub fn addr(&self, i: usize) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 213, self.subnet, i as u8 + 1))
    }

    /// Cuts host `i` off from everything.
    pub fn cut(&self, i: usize) -> anyhow::Result<()> {
        ip(&["link", "set", &self.veth(i), "down"])
    }

    /// Reconnects host `i`.
    pub fn heal(&self, i: usize) -> anyhow::Result<()> {
        ip(&["link", "set", &self.veth(i), "up"])
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for i in 0..self.hosts {
            let _ = ip(&["link", "del", &self.veth(i)]);
            let _ = ip(&["netns", "del", &self.ns(i)]);
        }
        let _ = ip(&["link", "del", &self.bridge()]);
    }
}
