//! Locus servers.
//!
//! One binary, `locus-server`, runs one role per process:
//! - `meta`: the Raft-replicated metadata service ([`meta`]): namespace,
//!   linearizable reads, cluster membership and the change stream.
//! - `chunk`: a chunk server ([`chunk`]): replicas on local disk, served
//!   over QUIC, chained writes, scrubbing, repair copies.
//! - `init`: makes the cluster CA and the certificates
//!   ([`fs_client::tls::init_cluster_certs`]).
//!
//! Start reading at [`run_meta`]; the namespace rules are in [`meta::fsm`]
//! (pure: command in, writes and replies out), the queries in
//! [`meta::read`], the wire handling in [`server`].
//!
//! Not here: the wire types and the client (in `fs-client`, which this
//! crate depends on, never the reverse), consensus (the `raft` crate).

pub mod chunk;
pub mod config;
pub mod meta;
pub mod metrics;
pub mod server;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use fs_client::tls;
use raft::{RaftNode, RaftNodeConfig, RaftTransport};

use config::MetaConfig;
use meta::MetaService;
use metrics::Metrics;

/// How long a graceful stop may take before the process exits anyway.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(5);
/// How often Raft gauges are refreshed.
const METRICS_REFRESH: Duration = Duration::from_secs(1);

/// Runs a metadata node until SIGTERM or SIGINT.
pub async fn run_meta(cfg: MetaConfig) -> anyhow::Result<()> {
    let span = tracing::info_span!("meta", node = cfg.id);
    let _enter = span.enter();
    let endpoint = server::endpoint(&cfg.identity, cfg.listen, &[fs_client::proto::CLIENT_ALPN, raft::RAFT_ALPN])
        .context("start QUIC endpoint")?;
    let raft_client = tls::client_config(&cfg.identity, raft::RAFT_ALPN).context("raft client TLS")?;
    let transport = RaftTransport::new(cfg.id, endpoint.clone(), raft_client, tls::SERVER_NAME.to_string());
    let mut rcfg = RaftNodeConfig::new(cfg.id, cfg.data_dir.clone());
    rcfg.heartbeat_ms = cfg.heartbeat_ms;
    rcfg.election_timeout_min_ms = cfg.election_timeout_ms;
    rcfg.election_timeout_max_ms = cfg.election_timeout_max_ms;
    rcfg.snapshot_every_entries = cfg.snapshot_every;
    rcfg.keep_entries_after_snapshot = cfg.keep_logs;
    let node = RaftNode::start(rcfg, Arc::new(meta::fsm::Namespace { change_retain: cfg.change_history }), transport)
        .await
        .context("start raft")?;
    let metrics = Metrics::new("meta");
    let svc = MetaService::start(node.clone(), metrics.clone(), cfg.data.clone(), cfg.sched.clone(), cfg.chunk_bytes);
    tokio::spawn(server::accept_loop(endpoint.clone(), svc.clone()));
    if let Some(members) = &cfg.bootstrap {
        // Only the first member forms the cluster (openraft's advice); the
        // others, given the same list, wait to hear from it. Concurrent
        // initializations are allowed but a path far less travelled.
        match members.keys().next() {
            Some(&first) if first != cfg.id => {
                tracing::info!(first, "waiting for the first member to form the cluster");
            }
            _ => node.initialize(members.clone()).await.context("initialize cluster")?,
        }
    }
    if let Some(addr) = cfg.metrics_listen {
        let m = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(addr, m).await {
                tracing::error!(error = %e, "metrics endpoint failed");
            }
        });
    }
    tokio::spawn(refresh_raft_metrics(svc.clone(), metrics));
    tracing::info!(listen = %cfg.listen, data_dir = %cfg.data_dir.display(), "metadata node running");

    let died = tokio::select! {
        _ = wait_for_stop() => None,
        why = node.stopped() => Some(why),
    };
    if let Some(why) = died {
        // Crash-only: a restart rebuilds everything from the durable log.
        tracing::error!(reason = %why, "the Raft core stopped; exiting so that the node is restarted");
        endpoint.close(1u32.into(), b"raft stopped");
        anyhow::bail!("the Raft core stopped: {why}");
    }
    tracing::info!("stopping");
    let stop = async {
        endpoint.close(0u32.into(), b"shutting down");
        node.shutdown().await;
        endpoint.wait_idle().await;
    };
    if tokio::time::timeout(SHUTDOWN_DEADLINE, stop).await.is_err() {
        tracing::warn!("graceful stop took too long; exiting");
    }
    Ok(())
}

async fn refresh_raft_metrics(svc: MetaService, m: Arc<Metrics>) {
    loop {
        let s = svc.status();
        m.raft_term.set(s.term as i64);
        m.raft_commit_index.set(s.commit_index as i64);
        m.raft_applied_index.set(s.applied_index as i64);
        m.raft_last_log_index.set(s.last_log_index as i64);
        m.raft_apply_lag.set(s.last_log_index.saturating_sub(s.applied_index) as i64);
        m.raft_is_leader.set((s.leader_id == Some(s.node_id)) as i64);
        tokio::time::sleep(METRICS_REFRESH).await;
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn wait_for_stop() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        // Without signal handlers the process runs until killed.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
