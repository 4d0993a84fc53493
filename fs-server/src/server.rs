//! The QUIC endpoint of a server and the dispatch of its connections.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fs_client::frame;
use fs_client::proto::*;
use fs_client::tls::{self, Identity, Role};

use crate::meta::MetaService;

/// Open connections one server accepts at most.
pub const MAX_CONNECTIONS: usize = 4096;
/// How long a handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send its request frame.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("bind {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

/// Binds a QUIC endpoint offering the protocols `alpns`.
pub fn endpoint(id: &Identity, listen: SocketAddr, alpns: &[&[u8]]) -> Result<quinn::Endpoint, ServerError> {
    let cfg = tls::server_config(id, alpns)?;
    tls::bind_endpoint(listen, Some(cfg)).map_err(|source| ServerError::Bind { addr: listen, source })
}

/// Accepts connections until the endpoint closes.
pub async fn accept_loop(endpoint: quinn::Endpoint, meta: MetaService) {
    let open = Arc::new(AtomicUsize::new(0));
    while let Some(incoming) = endpoint.accept().await {
        if open.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
            tracing::warn!(remote = %incoming.remote_address(), "refusing connection: too many open");
            incoming.refuse();
            continue;
        }
        let meta = meta.clone();
        let open = open.clone();
        open.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            serve_connection(incoming, meta).await;
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

async fn serve_connection(incoming: quinn::Incoming, meta: MetaService) {
    let remote = incoming.remote_address();
    let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::info!(%remote, error = %e, "handshake failed");
            return;
        }
        Err(_) => {
            tracing::info!(%remote, "handshake timed out");
            return;
        }
    };
    let (role, name) = match tls::peer_identity(&conn) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(%remote, error = %e, "refusing peer");
            conn.close(1u32.into(), b"certificate carries no role");
            return;
        }
    };
    let alpn = tls::alpn(&conn).unwrap_or_default();
    if alpn == raft::RAFT_ALPN {
        if role != Role::Node {
            tracing::warn!(%remote, %name, "refusing raft connection from a non-node certificate");
            conn.close(2u32.into(), b"raft needs a node certificate");
            return;
        }
        meta.raft().serve_peer(conn).await;
        return;
    }
    tracing::debug!(%remote, %name, role = role.as_str(), "client connected");
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(_) => return,
        };
        let meta = meta.clone();
        tokio::spawn(serve_stream(meta, role, send, recv));
    }
}

async fn serve_stream(meta: MetaService, role: Role, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let env: Envelope = match tokio::time::timeout(REQUEST_TIMEOUT, frame::read_frame(&mut recv)).await {
        Ok(Ok(e)) => e,
        Ok(Err(e)) => {
            let resp: Response = Err(WireError::new(ErrorCode::BadRequest, format!("bad request frame: {e}")));
            let _ = frame::write_frame(&mut send, &resp).await;
            let _ = send.finish();
            return;
        }
        Err(_) => return,
    };
    if env.version != PROTOCOL_VERSION {
        let resp: Response = Err(WireError::new(
            ErrorCode::BadRequest,
            format!("protocol version {} not supported (server speaks {PROTOCOL_VERSION})", env.version),
        ));
        let _ = frame::write_frame(&mut send, &resp).await;
        let _ = send.finish();
        return;
    }
    if let Request::Subscribe { from } = env.request {
        meta.serve_subscription(send, from).await;
        return;
    }
    let resp = meta.handle(role, env.request).await;
    if let Err(e) = frame::write_frame(&mut send, &resp).await {
        tracing::debug!(error = %e, "reply not delivered");
    }
    let _ = send.finish();
}
