//! Prometheus metrics of a server, served over HTTP at `/metrics`.

use std::net::SocketAddr;
use std::sync::atomic::AtomicI64;
use std::sync::Arc;
use std::time::Duration;

use fs_client::proto::ErrorCode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub op: String,
    pub result: String,
}

pub struct Metrics {
    registry: Registry,
    pub raft_term: Gauge,
    pub raft_commit_index: Gauge,
    pub raft_applied_index: Gauge,
    pub raft_last_log_index: Gauge,
    pub raft_apply_lag: Gauge,
    pub raft_is_leader: Gauge,
    pub requests: Family<ResultLabels, Counter>,
    pub latency: Family<OpLabels, Histogram>,
    pub batch_size: Histogram,
    pub gauges: Family<OpLabels, Gauge<i64, AtomicI64>>,
}

impl Metrics {
    pub fn new(role: &str) -> Arc<Self> {
        let mut registry = Registry::with_prefix("locus");
        let m = Metrics {
            raft_term: Gauge::default(),
            raft_commit_index: Gauge::default(),
            raft_applied_index: Gauge::default(),
            raft_last_log_index: Gauge::default(),
            raft_apply_lag: Gauge::default(),
            raft_is_leader: Gauge::default(),
            requests: Family::default(),
            latency: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.000_05, 2.0, 20))),
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            gauges: Family::default(),
            registry: Registry::default(),
        };
        if role == "meta" {
            registry.register("raft_term", "Current Raft term", m.raft_term.clone());
            registry.register("raft_commit_index", "Committed log index (leader's view)", m.raft_commit_index.clone());
            registry.register("raft_applied_index", "Last applied log index", m.raft_applied_index.clone());
            registry.register("raft_last_log_index", "Last log index", m.raft_last_log_index.clone());
            registry.register("raft_apply_lag", "Log entries not yet applied", m.raft_apply_lag.clone());
            registry.register("raft_is_leader", "1 on the leader", m.raft_is_leader.clone());
            registry.register("meta_batch_ops", "Operations per Raft entry", m.batch_size.clone());
        }
        registry.register("requests", "Requests by operation and result", m.requests.clone());
        registry.register("request_latency_seconds", "Request latency by operation", m.latency.clone());
        registry.register("state", "Role-specific gauges", m.gauges.clone());
        Arc::new(Metrics { registry, ..m })
    }

    pub fn observe(&self, op: &str, took: Duration, err: Option<ErrorCode>) {
        let result = match err {
            None => "ok".to_string(),
            Some(c) => format!("{c}"),
        };
        self.requests.get_or_create(&ResultLabels { op: op.to_string(), result }).inc();
        self.latency.get_or_create(&OpLabels { op: op.to_string() }).observe(took.as_secs_f64());
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }
}

/// Serves `/metrics` on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let m = metrics.clone();
            async move {
                (
                    [(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
                    m.render(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "metrics endpoint listening");
    axum::serve(listener, app).await
}
