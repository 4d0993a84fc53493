//! `locus`: the Locus command line.

use std::process::ExitCode;

use clap::Parser;
use fs_client::cli::{self, Cli};

// As in the servers: the data path allocates a buffer or two per request,
// and glibc's malloc was a tenth of an NBD export's CPU under 4 KiB I/O.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    fs_client::alloc::tune_allocator();
    let cli = Cli::parse();
    // fuser's one session warning is its own unmount at the end failing
    // with EINVAL: the mount unmounts itself first (`fuse::mount`), so it
    // is printed at every unmount and means nothing.
    let default_filter = "warn,fuser::session=error";
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LOCUS_LOG").unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let json = cli.json;
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("locus: cannot start runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            e.print(json);
            ExitCode::from(e.exit)
        }
    }
}
