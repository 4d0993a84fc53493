//! The listener: accepts connections on TCP or a Unix socket, serves each
//! in its own task, and shuts down in one place.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;
use tracing::Instrument;

use super::backend::Backend;
use super::conn::{self, ConnError};
use super::handshake::ExportInfo;
use super::NbdError;

/// Connections served at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 128;
/// How long connections get to answer their requests in flight at shutdown.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause after a failed accept (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Where to listen.
#[derive(Debug, Clone)]
pub enum Listen {
    Tcp(String),
    Unix(PathBuf),
}

pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    pub async fn bind(at: &Listen) -> Result<Listener, NbdError> {
        match at {
            Listen::Tcp(addr) => {
                let l = TcpListener::bind(addr.as_str())
                    .await
                    .map_err(|e| NbdError::Listen(format!("cannot listen on {addr}: {e}")))?;
                Ok(Listener::Tcp(l))
            }
            Listen::Unix(path) => {
                remove_stale_socket(path)?;
                let l = UnixListener::bind(path)
                    .map_err(|e| NbdError::Listen(format!("cannot listen on {}: {e}", path.display())))?;
                Ok(Listener::Unix(l, path.clone()))
            }
        }
    }

    /// The NBD URI of export `name` here (RFC-style, as libnbd and qemu take it).
    pub fn uri(&self, name: &str) -> String {
        match self {
            Listener::Tcp(l) => match l.local_addr() {
                Ok(a) => tcp_uri(a, name),
                Err(_) => format!("nbd:///{}", escape(name)),
            },
            Listener::Unix(_, path) => unix_uri(path, name),
        }
    }
}

fn tcp_uri(a: SocketAddr, name: &str) -> String {
    format!("nbd://{a}/{}", escape(name))
}

fn unix_uri(path: &Path, name: &str) -> String {
    format!("nbd+unix:///{}?socket={}", escape(name), escape_path(&path.to_string_lossy()))
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// As [`escape`], keeping `/` (a socket path in a query).
fn escape_path(s: &str) -> String {
    s.split('/').map(escape).collect::<Vec<_>>().join("/")
}

/// A socket file left by a process that died is removed; one that answers
/// is in use.
fn remove_stale_socket(path: &Path) -> Result<(), NbdError> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else { return Ok(()) };
    if !meta.file_type().is_socket() {
        return Err(NbdError::Listen(format!("{} exists and is not a socket", path.display())));
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(NbdError::Listen(format!("{} is in use by another server", path.display())));
    }
    std::fs::remove_file(path).map_err(|e| NbdError::Listen(format!("cannot remove stale {}: {e}", path.display())))
}

/// Serves until the first message on `stop` (or its closing), then stops
/// accepting, lets connections answer what they have in flight (for
/// [`DRAIN_TIMEOUT`], or until a second message), and returns.
pub async fn run<B: Backend>(
    listener: Listener,
    export: Arc<ExportInfo>,
    backend: Arc<B>,
    mut stop: mpsc::Receiver<()>,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut conns = JoinSet::new();
    let mut next_id = 0u64;
    loop {
        while conns.try_join_next().is_some() {}
        let accepted = tokio::select! {
            _ = stop.recv() => break,
            a = accept(&listener) => a,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "too many connections ({MAX_CONNECTIONS}); closing the new one");
            continue;
        };
        next_id += 1;
        let span = tracing::info_span!("nbd", conn = next_id, %peer);
        let (export, backend, stop) = (export.clone(), backend.clone(), stop_rx.clone());
        conns.spawn(
            async move {
                tracing::debug!("connected");
                let result = match stream {
                    Stream::Tcp(s) => conn::serve(s, export, backend, stop).await,
                    Stream::Unix(s) => conn::serve(s, export, backend, stop).await,
                };
                match result {
                    Ok(()) => tracing::debug!("disconnected"),
                    // Someone else's bad input: worth a line, not an alarm.
                    Err(e @ (ConnError::Io(_) | ConnError::Stalled(_))) => {
                        tracing::debug!(error = %e, "connection lost")
                    }
                    Err(e) => tracing::info!(error = %e, "connection closed"),
                }
                drop(slot);
            }
            .instrument(span),
        );
    }
    while conns.try_join_next().is_some() {}
    tracing::info!(connections = conns.len(), "shutting down: answering requests in flight");
    let _ = stop_tx.send(true);
    let drained = async { while conns.join_next().await.is_some() {} };
    tokio::select! {
        _ = drained => {}
        _ = tokio::time::sleep(DRAIN_TIMEOUT) => tracing::warn!("connections still busy after {DRAIN_TIMEOUT:?}; closing them"),
        _ = stop.recv() => tracing::warn!("signalled again: closing connections now"),
    }
    conns.shutdown().await;
    if let Listener::Unix(_, path) = &listener {
        let _ = std::fs::remove_file(path);
    }
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(l: &Listener) -> std::io::Result<(Stream, String)> {
    match l {
        Listener::Tcp(l) => {
            let (s, peer) = l.accept().await?;
            // Replies are small and latency-bound: send them at once.
            s.set_nodelay(true)?;
            Ok((Stream::Tcp(s), peer.to_string()))
        }
        Listener::Unix(l, _) => {
            let (s, _) = l.accept().await?;
            Ok((Stream::Unix(s), "unix".into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_escape_names_and_paths() {
        let a: SocketAddr = "127.0.0.1:10809".parse().expect("addr");
        assert_eq!(tcp_uri(a, "disk.img"), "nbd://127.0.0.1:10809/disk.img");
        assert_eq!(tcp_uri(a, "a b/c"), "nbd://127.0.0.1:10809/a%20b%2Fc");
        let a6: SocketAddr = "[::1]:99".parse().expect("addr");
        assert_eq!(tcp_uri(a6, ""), "nbd://[::1]:99/");
        assert_eq!(unix_uri(Path::new("/run/x y.sock"), "d"), "nbd+unix:///d?socket=/run/x%20y.sock");
    }

    #[test]
    fn a_regular_file_is_not_taken_for_a_stale_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("file");
        std::fs::write(&f, b"x").expect("write");
        assert!(remove_stale_socket(&f).is_err());
        assert!(f.exists());
        assert!(remove_stale_socket(&dir.path().join("absent")).is_ok());
    }
}
