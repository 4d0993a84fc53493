//! `locus-server`: runs one Locus server role.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

// Servers allocate many small, short-lived buffers (frames, records, keys).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use fs_server::config::{ChunkSettings, MetaSettings};

#[derive(Parser)]
#[command(name = "locus-server", version, about = "Locus servers: metadata, chunk storage, controllers")]
struct Cli {
    /// Log filter (tracing syntax), e.g. `info` or `fs_server=debug`.
    #[arg(long, global = true, env = "LOCUS_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create the cluster CA and certificates (existing ones are kept).
    Init {
        /// Where to write the certificates.
        #[arg(long)]
        dir: PathBuf,
        /// Metadata nodes to make certificates for (node-1 .. node-N).
        #[arg(long, default_value_t = 3)]
        nodes: u64,
        /// Chunk servers to make certificates for (chunk-1 .. chunk-N).
        #[arg(long, default_value_t = 3)]
        chunks: u64,
        /// IP addresses the node certificates are valid for.
        #[arg(long, value_delimiter = ',', default_value = "127.0.0.1")]
        ips: Vec<IpAddr>,
    },
    /// Run a metadata node.
    Meta {
        /// TOML file with the settings below; flags override it.
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        settings: MetaSettings,
    },
    /// Run a chunk server.
    Chunk {
        /// TOML file with the settings below; flags override it.
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        settings: ChunkSettings,
    },
}

fn main() -> ExitCode {
    fs_client::alloc::tune_allocator();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match run(cli.cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("locus-server: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Init { dir, nodes, chunks, ips } => {
            let made = fs_client::tls::init_cluster_certs(&dir, nodes, chunks, &ips)?;
            if made.is_empty() {
                println!("certificates in {} are complete; nothing to do", dir.display());
            } else {
                println!("created in {}: {}", dir.display(), made.join(", "));
            }
            Ok(())
        }
        Cmd::Meta { config, settings } => {
            let base = match config {
                Some(p) => MetaSettings::load(&p)?,
                None => MetaSettings::default(),
            };
            let cfg = base.merge(settings).resolve()?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .on_thread_start(raft::storage::disable_perf_counters_on_this_thread)
                .build()?;
            rt.block_on(fs_server::run_meta(cfg))
        }
        Cmd::Chunk { config, settings } => {
            let base = match config {
                Some(p) => ChunkSettings::load(&p)?,
                None => ChunkSettings::default(),
            };
            let cfg = base.merge(settings).resolve()?;
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(fs_server::chunk::run(cfg))
        }
    }
}
