//! A MooseFS 3.0 cluster on loopback for side-by-side runs: one master,
//! three chunkservers (distinct ports and directories), goal 3, mounted
//! with mfsmount. Everything lives in a temp dir and stops on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

pub struct MooseFs {
    dir: tempfile::TempDir,
    procs: Vec<Child>,
    pub mountpoint: PathBuf,
    mounted: bool,
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
                 MATOML_LISTEN_HOST = 127.0.0.1\nMATOML_LISTEN_PORT = {ml}\n\
                 MATOCS_LISTEN_HOST = 127.0.0.1\nMATOCS_LISTEN_PORT = {cs}\n\
                 MATOCL_LISTEN_HOST = 127.0.0.1\nMATOCL_LISTEN_PORT = {cl}\n",
                master.display(),
                root.join("mfsexports.cfg").display()
            ),
        )?;
        let mut m = MooseFs { dir, procs: Vec::new(), mountpoint: root.join("mnt"), mounted: false };
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
                     MASTER_HOST = 127.0.0.1\nMASTER_PORT = {cs}\n\
                     CSSERV_LISTEN_HOST = 127.0.0.1\nCSSERV_LISTEN_PORT = {}\n",
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
                .args(["-H", "127.0.0.1", "-P", &cl.to_string(), "-o", "mfsdelayedinit"])
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
        // Let the chunkservers register, then ask for three copies.
        std::thread::sleep(Duration::from_secs(4));
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
    }
}
