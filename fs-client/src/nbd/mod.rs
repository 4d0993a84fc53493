//! The NBD export: `locus nbd serve FILE` serves a Locus file as a network
//! block device to any NBD client (qemu, the kernel's nbd-client, libnbd's
//! nbdcopy/nbdinfo, fio).
//!
//! - [`wire`]: protocol constants and pure parsers/encoders. Start here.
//! - [`handshake`]: option haggling as a pure state machine.
//! - [`request`]: the pure decision about each request (limits, ranges,
//!   flags, read-only) before any payload is read.
//! - [`conn`]: one connection's I/O: handshake, then requests served
//!   concurrently with one writer for the replies.
//! - [`backend`]: the [`backend::Backend`] trait and [`backend::LocusFile`],
//!   the file through the shared [`FileClient`].
//! - [`server`]: listening (TCP or Unix socket), the connection limit and
//!   the shutdown.
//!
//! What it deliberately does not do: TLS (the option is refused; keep the
//! export on loopback or a trusted network, or use a Unix socket),
//! extended headers, resizing, or more than one export per process.
//! Trims and write-zeroes (unless `NO_HOLE`) punch holes: the range reads
//! as zeros and the replicas free its whole checksum blocks, with no data
//! sent. Writes are buffered by the file
//! client; a flush or FUA makes them durable on every replica.

pub mod backend;
pub mod cache;
pub mod conn;
pub mod handshake;
pub mod lease;
pub mod request;
pub mod server;
pub mod wire;

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};
use tokio::signal::unix::{signal, SignalKind};

use crate::file::FileClient;
use crate::proto::Ino;
use backend::LocusFile;
use cache::BlockCache;
use handshake::ExportInfo;
use lease::LeaseKeeper;
use server::{Listen, Listener};

/// The IANA port of NBD.
pub const DEFAULT_PORT: u16 = 10809;

#[derive(Subcommand, Debug, Clone)]
pub enum NbdCmd {
    /// Serve a Locus file as a network block device until SIGTERM/SIGINT.
    Serve(ServeArgs),
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// The Locus file to export; its size is the device size (create it
    /// with `locus fs truncate FILE SIZE`).
    pub file: PathBuf,
    /// Export name (default: the file's name). The empty name also
    /// reaches this export.
    #[arg(long)]
    pub name: Option<String>,
    /// TCP address to listen on (default 127.0.0.1:10809; port 0 picks one).
    #[arg(long, conflicts_with = "unix")]
    pub listen: Option<String>,
    /// Listen on a Unix socket at this path instead.
    #[arg(long)]
    pub unix: Option<PathBuf>,
    /// Refuse writes.
    #[arg(long)]
    pub read_only: bool,
    /// Let other clients write the file while it is served: no write
    /// lease, and no read cache. Without it a writable export holds the
    /// file's lease: other writers get EBUSY, a second export waits for
    /// it.
    #[arg(long, conflicts_with = "read_only")]
    pub shared: bool,
    /// How long to wait at start for another client's lease on the file
    /// to lapse (one whose export died), in seconds.
    #[arg(long, default_value_t = lease::ACQUIRE_WAIT.as_secs(), value_parser = clap::value_parser!(u64).range(0..=600))]
    pub lease_wait: u64,
    /// Read cache in MiB (used while the lease is held, or always for a
    /// `--read-only` export of a snapshot; 0: none).
    #[arg(long, default_value_t = DEFAULT_CACHE_MIB, value_parser = clap::value_parser!(u64).range(0..=65536))]
    pub cache_mib: u64,
}

/// Default read cache of a writable export.
pub const DEFAULT_CACHE_MIB: u64 = 256;

/// Why serving failed.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// Cannot listen where asked.
    #[error("{0}")]
    Listen(String),
    #[error("{0}")]
    Signals(String),
    /// The final flush failed: writes may not be durable.
    #[error("{0}")]
    Flush(String),
    /// The write lease could not be taken.
    #[error("{0}")]
    Lease(String),
}

/// The file to serve, resolved by the caller.
pub struct Target {
    pub ino: Ino,
    /// Its path, for the description.
    pub path: String,
    pub size: u64,
    /// Part of a snapshot (read-only for good).
    pub snapshot: bool,
}

/// Serves `target` until SIGTERM or SIGINT, then makes every write durable.
/// The URI goes to stdout once the socket listens (as JSON with `json`).
pub async fn serve(args: &ServeArgs, target: Target, files: FileClient, json: bool) -> Result<(), NbdError> {
    let name = args.name.clone().unwrap_or_else(|| default_name(&target.path));
    let export = Arc::new(ExportInfo {
        name: name.clone(),
        description: format!("Locus file {}", target.path),
        size: target.size,
        read_only: args.read_only,
    });
    let at = match (&args.unix, &args.listen) {
        (Some(p), _) => Listen::Unix(p.clone()),
        (None, Some(a)) => Listen::Tcp(a.clone()),
        (None, None) => Listen::Tcp(format!("127.0.0.1:{DEFAULT_PORT}")),
    };
    // Signals first: a signal right after the URI is printed must not kill us.
    let (mut term, mut int) = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(t), Ok(i)) => (t, i),
        _ => return Err(NbdError::Signals("cannot install signal handlers".into())),
    };
    let listener = Listener::bind(&at).await?;
    // The lease before the URI: a client that connects finds the image
    // fenced against other writers.
    let lease = if args.read_only || args.shared {
        None
    } else {
        let cache =
            (args.cache_mib > 0).then(|| Arc::new(BlockCache::new(args.cache_mib << 20, cache::CACHE_BLOCK_BYTES)));
        let keeper =
            LeaseKeeper::acquire(files.clone(), target.ino, cache.clone(), Duration::from_secs(args.lease_wait))
                .await
                .map_err(|e| {
                    NbdError::Lease(format!(
                        "{}: cannot take the write lease: {e} (another export or writer holds it; \
                 serve it --read-only, or --shared to allow other writers)",
                        target.path
                    ))
                })?;
        Some((keeper.clone(), keeper.spawn_renewals(), cache))
    };
    let uri = listener.uri(&name);
    {
        let mut out = std::io::stdout().lock();
        let line = if json {
            serde_json::json!({"uri": uri, "export": name, "size": target.size, "read_only": args.read_only})
                .to_string()
        } else {
            uri.clone()
        };
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
    tracing::info!(%uri, path = %target.path, size = target.size, read_only = args.read_only, "serving");
    let mut backend = LocusFile::new(files.clone(), target.ino);
    if let Some((keeper, _, Some(cache))) = &lease {
        backend = backend.with_cache(cache.clone(), keeper.clone());
    } else if args.read_only && args.cache_mib > 0 && target.snapshot {
        // A snapshot never changes: its blocks can be kept with no lease.
        backend =
            backend.with_snapshot_cache(Arc::new(BlockCache::new(args.cache_mib << 20, cache::CACHE_BLOCK_BYTES)));
    }
    let backend = Arc::new(backend);
    let snapshot_cache = lease.is_none().then(|| backend.clone());
    let (stop_tx, stop_rx) = tokio::sync::mpsc::channel(2);
    let signals = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            if stop_tx.send(()).await.is_err() {
                return;
            }
        }
    });
    server::run(listener, export, backend, stop_rx).await;
    signals.abort();
    let flushed = files.fsync(target.ino).await;
    if let Some((bytes, hits, misses)) = snapshot_cache.and_then(|b| b.cache_stats()) {
        tracing::info!(cached_bytes = bytes, hits, misses, "read cache (snapshot)");
    }
    if let Some((keeper, renewals, cache)) = lease {
        renewals.abort();
        keeper.release().await;
        if let Some((bytes, hits, misses)) = cache.map(|c| c.stats()) {
            tracing::info!(cached_bytes = bytes, hits, misses, "read cache");
        }
    }
    flushed.map_err(|e| NbdError::Flush(format!("{}: final flush failed: {e}", target.path)))?;
    tracing::info!(path = %target.path, "stopped; every write is durable");
    Ok(())
}

/// The last component of a path.
fn default_name(path: &str) -> String {
    path.trim_end_matches('/').rsplit('/').next().unwrap_or_default().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names_are_the_file_name() {
        assert_eq!(default_name("/vm/disk.img"), "disk.img");
        assert_eq!(default_name("/disk"), "disk");
    }
}
