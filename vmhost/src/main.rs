//! `locus-vmhost`: the Locus VM host agent (`run`) and its fence guard
//! (`guard`, started by the agent).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use fs_client::proto::Topology;
use vmhost::agent::{self, AgentConfig};
use vmhost::guard::{self, HostDirs};

#[derive(Parser)]
#[command(name = "locus-vmhost", version, about = "Locus VM host agent")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent: register, hold the lease, run the assigned VMs.
    Run(RunArgs),
    /// Kill the host's VMs when its lease runs out (started by `run`).
    Guard {
        #[arg(long)]
        state_dir: PathBuf,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Client configuration with a host certificate.
    #[arg(long)]
    config: PathBuf,
    /// Where the agent keeps its state (run directories, image cache, mount).
    #[arg(long)]
    state_dir: PathBuf,
    /// The host's name (default: the machine's hostname).
    #[arg(long)]
    name: Option<String>,
    #[arg(long, default_value = "z1")]
    zone: String,
    #[arg(long, default_value = "r1")]
    rack: String,
    /// Host label for placement (default: the name). A chunk server with the
    /// same zone, rack and host labels is on the same machine.
    #[arg(long)]
    host: Option<String>,
    /// vCPUs offered to VMs (default: 4 per core).
    #[arg(long)]
    vcpus: Option<u32>,
    /// Memory offered to VMs, MiB (default: the machine's).
    #[arg(long)]
    memory_mib: Option<u64>,
    /// The `locus` binary (default: next to this one, else $PATH).
    #[arg(long)]
    locus_bin: Option<PathBuf>,
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(50..=10_000))]
    heartbeat_ms: u64,
}

fn machine_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| t.lines().find(|l| l.starts_with("MemTotal:")).map(str::to_string))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|kib| kib / 1024)
        .unwrap_or(4096)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("LOCUS_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("locus-vmhost: cannot start runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = match cli.cmd {
        Cmd::Guard { state_dir } => rt.block_on(guard::run(HostDirs::new(state_dir))).map_err(anyhow::Error::from),
        Cmd::Run(a) => {
            let name = a.name.unwrap_or_else(|| {
                nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "host".into())
            });
            let locus_bin = match fs_client::up::find_bin("locus", a.locus_bin) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("locus-vmhost: {e} (or pass --locus-bin)");
                    return ExitCode::from(4);
                }
            };
            let self_bin = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("locus-vmhost"));
            let cores = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
            let cfg = AgentConfig {
                client_config: a.config,
                state_dir: a.state_dir,
                topology: Topology::new(a.zone, a.rack, a.host.unwrap_or_else(|| name.clone())),
                name,
                vcpus: a.vcpus.unwrap_or(cores * 4),
                mem_mb: a.memory_mib.unwrap_or_else(machine_memory_mib),
                locus_bin,
                self_bin,
                heartbeat: Duration::from_millis(a.heartbeat_ms),
            };
            rt.block_on(agent::run(cfg))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("locus-vmhost: {e:#}");
            ExitCode::from(1)
        }
    }
}
