//! A private 3-member etcd cluster on loopback, for side-by-side runs.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

pub struct Etcd {
    pub endpoints: Vec<String>,
    children: Vec<Child>,
}

impl Etcd {
    /// Starts three members under `dir` with default (durable) settings.
    pub async fn start(dir: &Path) -> anyhow::Result<Etcd> {
        let bin = which("etcd").context("etcd not found: install the etcd-server package (scripts/install-deps.sh)")?;
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (locus_tests::free_port(), locus_tests::free_port())).collect();
        let cluster: Vec<String> =
            ports.iter().enumerate().map(|(i, (_, peer))| format!("e{i}=http://127.0.0.1:{peer}")).collect();
        let mut children = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let log = std::fs::File::create(dir.join(format!("etcd-{i}.log")))?;
            let child = Command::new(&bin)
                .args([
                    "--name",
                    &format!("e{i}"),
                    "--data-dir",
                    &dir.join(format!("etcd-{i}")).display().to_string(),
                    "--listen-client-urls",
                    &format!("http://127.0.0.1:{client}"),
                    "--advertise-client-urls",
                    &format!("http://127.0.0.1:{client}"),
                    "--listen-peer-urls",
                    &format!("http://127.0.0.1:{peer}"),
                    "--initial-advertise-peer-urls",
                    &format!("http://127.0.0.1:{peer}"),
                    "--initial-cluster",
                    &cluster.join(","),
                    "--initial-cluster-state",
                    "new",
                    "--quota-backend-bytes",
                    &(8u64 << 30).to_string(),
                ])
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("start etcd")?;
            children.push(child);
        }
        let etcd = Etcd { endpoints: ports.iter().map(|(c, _)| format!("http://127.0.0.1:{c}")).collect(), children };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut c) = etcd_client::Client::connect(&etcd.endpoints, None).await {
                if c.put("/ready", "1", None).await.is_ok() {
                    return Ok(etcd);
                }
            }
            if Instant::now() > deadline {
                bail!("etcd did not become ready; see {}", dir.display());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(name)).find(|p| p.exists())
}
