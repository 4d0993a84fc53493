//! A MooseFS 3.0 cluster on this machine for side-by-side runs: one
//! master, three chunkservers (distinct ports and directories), goal 3,
//! mounted with mfsmount. Everything lives in a temp dir and stops on drop.
//!
//! MooseFS chunkservers refuse a master on a 127.x address, so the bench
//! makes a network interface of its own (a veth pair) with one private address
//! (traffic never leaves the machine) and removes it on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

pub struct MooseFs {
    dir: tempfile::TempDir,
    procs: Vec<Child>,
    pub mountpoint: PathBuf,
    mounted: bool,
    iface: Option<String>,
}

/// A local interface of the bench's own with a private address; (name, address).
fn dummy_interface() -> anyhow::Result<(String, String)> {
    let pid = std::process::id();
    let name = format!("lmfs{}", pid % 100_000);
    let addr = format!("10.214.{}.{}", (pid / 250) % 250 + 1, pid % 250 + 1);
    let ip = |args: &[&str]| -> anyhow::Result<()> {
        let out = Command::new("ip").args(args).output().context("run ip (iproute2)")?;
        if !out.status.success() {
            bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    };
    let _ = ip(&["link", "del", &name]);
    // No dummy driver on every kernel: a veth pair, one end addressed.
    ip(&["link", "add", &name, "type", "veth", "peer", "name", &format!("{name}p")])?;
    ip(&["addr", "add", &format!("{addr}/32"), "dev", &name])?;
    ip(&["link", "set", &name, "up"])?;
    ip(&["link", "set", &format!("{name}p"), "up"])?;
    Ok((name, addr))
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("write {}", path.display()))
}

impl MooseFs {
    /// Starts the cluster under `base` (on the disk to compare with) and mounts it.
    pub fn start(base: &Path) -> anyhow::Result<MooseFs> {
        for tool in ["mfsmaster", "mfschunkserver", "mfsmount", "mfssetgoal"] {
            if Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output()?.status.success() {
                continue;
            }
            bail!("{tool} not found: install moosefs-master, moosefs-chunkserver and moosefs-client");
        }
        let (iface, host) = dummy_interface().context("an interface for MooseFS (needs root)")?;
        let dir = tempfile::Builder::new().prefix("locus-bench-mfs-").tempdir_in(base)?;
        let root = dir.path().to_path_buf();
        let (ml, cs, cl) = (locus_tests::free_port(), locus_tests::free_port(), locus_tests::free_port());
        let master = root.join("master");
        std::fs::create_dir_all(&master)?;
        std::fs::copy("/var/lib/mfs/metadata.mfs.empty", master.join("metadata.mfs"))
            .context("copy /var/lib/mfs/metadata.mfs.empty (moosefs-master)")?;
        write(&root.join("mfsexports.cfg"), "*\t/\trw,alldirs,maproot=0\n")?;
        let master_cfg = root.join("mfsmaster.cfg");
        write(
            &master_cfg,
            &format!(
                "WORKING_USER = root\nWORKING_GROUP = root\nSYSLOG_IDENT = mfsmaster-bench\n\
                 DATA_PATH = {}\nEXPORTS_FILENAME = {}\n\
                 MATOML_LISTEN_HOST = {host}\nMATOML_LISTEN_PORT = {ml}\n\
                 MATOCS_LISTEN_HOST = {host}\nMATOCS_LISTEN_PORT = {cs}\n\
                 MATOCL_LISTEN_HOST = {host}\nMATOCL_LISTEN_PORT = {cl}\n",
                master.display(),
                root.join("mfsexports.cfg").display()
            ),
        )?;
        let mut m =
            MooseFs { dir, procs: Vec::new(), mountpoint: root.join("mnt"), mounted: false, iface: Some(iface) };
        m.spawn(Command::new("mfsmaster").arg("-f").arg("-c").arg(&master_cfg))?;
        for i in 1..=3 {
            let d = root.join(format!("cs{i}"));
            let hdd = d.join("hdd");
            std::fs::create_dir_all(&hdd)?;
            write(&d.join("mfshdd.cfg"), &format!("{}\n", hdd.display()))?;
            let cfg = d.join("mfschunkserver.cfg");
            write(
                &cfg,
                &format!(
                    "WORKING_USER = root\nWORKING_GROUP = root\nSYSLOG_IDENT = mfschunkserver-bench{i}\n\
                     DATA_PATH = {}\nHDD_CONF_FILENAME = {}\n\
                     MASTER_HOST = {host}\nMASTER_PORT = {cs}\n\
                     CSSERV_LISTEN_HOST = {host}\nCSSERV_LISTEN_PORT = {}\n",
                    d.display(),
                    d.join("mfshdd.cfg").display(),
                    locus_tests::free_port()
                ),
            )?;
            m.spawn(Command::new("mfschunkserver").arg("-f").arg("-c").arg(&cfg))?;
        }
        std::fs::create_dir_all(&m.mountpoint)?;
        // The master takes a moment to listen.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = Command::new("mfsmount")
                .arg(&m.mountpoint)
                .args(["-H", &host, "-P", &cl.to_string(), "-o", "mfsdelayedinit"])
                .output()?;
            if out.status.success() {
                m.mounted = true;
                break;
            }
            if Instant::now() > deadline {
                bail!("mfsmount failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        // Wait until the three chunkservers have registered their space
        // (writes get ENOSPC before), then ask for three copies.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let free = nix::sys::statvfs::statvfs(&m.mountpoint)
                .map(|v| v.blocks_available() * v.fragment_size())
                .unwrap_or(0);
            let servers = Command::new("mfscli")
                .args(["-H", &host, "-P", &ml.to_string(), "-SCS", "-s", "\t"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).lines().filter(|l| l.contains(host.as_str())).count())
                .unwrap_or(3);
            if free > 1 << 30 && servers >= 3 {
                break;
            }
            if Instant::now() > deadline {
                bail!("MooseFS: {servers} chunkservers registered, {free} bytes free after 60 s");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        std::thread::sleep(Duration::from_secs(2));
        let out = Command::new("mfssetgoal").args(["-r", "3"]).arg(&m.mountpoint).output()?;
        if !out.status.success() {
            bail!("mfssetgoal: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(m)
    }

    fn spawn(&mut self, cmd: &mut Command) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.dir.path().join(format!("proc-{}.log", self.procs.len())))?;
        let child = cmd.stdout(Stdio::from(log.try_clone()?)).stderr(Stdio::from(log)).spawn()?;
        self.procs.push(child);
        Ok(())
    }

    /// How many copies each chunk of `file` has (from mfscheckfile).
    pub fn copies(&self, file: &Path) -> String {
        Command::new("mfscheckfile")
            .arg(file)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().skip(1).collect::<Vec<_>>().join("; "))
            .unwrap_or_default()
    }
}

impl Drop for MooseFs {
    fn drop(&mut self) {
        if self.mounted {
            let ok = Command::new("umount").arg(&self.mountpoint).status().is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new("umount").arg("-l").arg(&self.mountpoint).status();
            }
        }
        for p in self.procs.iter_mut().rev() {
            // SIGTERM lets the master save its metadata quickly; then make sure.
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.id() as i32), nix::sys::signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for p in self.procs.iter_mut() {
            while Instant::now() < deadline && matches!(p.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = p.kill();
            let _ = p.wait();
        }
        if let Some(i) = self.iface.take() {
            let _ = Command::new("ip").args(["link", "del", &i]).status();
        }
    }
}
