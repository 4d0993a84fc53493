//! Server configuration: a TOML file, overridden by command-line flags.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use fs_client::tls::Identity;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("missing setting `{0}` (give it in the config file or as --{1})")]
    Missing(&'static str, &'static str),
    #[error("invalid `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
}

/// Settings of `locus-server meta`. Every field can come from the file or a flag.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct MetaSettings {
    /// Raft node id (unique, positive).
    #[arg(long)]
    pub id: Option<u64>,
    /// UDP address to serve QUIC on (clients and Raft peers).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Where this node keeps its Raft log and state.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Directory with `ca.pem` and `node-<id>.pem/.key`.
    #[arg(long)]
    pub certs: Option<PathBuf>,
    /// TCP address of the Prometheus endpoint.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Forms a new cluster with these members: `1=ip:port,2=ip:port,...`.
    /// Ignored when the node already belongs to a cluster.
    #[arg(long)]
    pub bootstrap: Option<String>,
    #[arg(long)]
    pub heartbeat_ms: Option<u64>,
    /// The minimum election timeout; the maximum is 10/7 of it.
    #[arg(long)]
    pub election_timeout_ms: Option<u64>,
    /// Build a Raft snapshot after this many log entries.
    #[arg(long)]
    pub snapshot_every: Option<u64>,
    /// Log entries kept behind a snapshot.
    #[arg(long)]
    pub keep_logs: Option<u64>,
    /// Log entries of change history kept for change-stream subscribers;
    /// older subscribers get a snapshot first.
    #[arg(long)]
    pub change_history: Option<u64>,
}

impl MetaSettings {
    /// Fields set in `over` replace those of `self`.
    pub fn merge(self, over: MetaSettings) -> MetaSettings {
        MetaSettings {
            id: over.id.or(self.id),
            listen: over.listen.or(self.listen),
            data_dir: over.data_dir.or(self.data_dir),
            certs: over.certs.or(self.certs),
            metrics_listen: over.metrics_listen.or(self.metrics_listen),
            bootstrap: over.bootstrap.or(self.bootstrap),
            heartbeat_ms: over.heartbeat_ms.or(self.heartbeat_ms),
            election_timeout_ms: over.election_timeout_ms.or(self.election_timeout_ms),
            snapshot_every: over.snapshot_every.or(self.snapshot_every),
            keep_logs: over.keep_logs.or(self.keep_logs),
            change_history: over.change_history.or(self.change_history),
        }
    }

    pub fn load(path: &Path) -> Result<MetaSettings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.into(), message: e.to_string() })
    }

    pub fn resolve(self) -> Result<MetaConfig, ConfigError> {
        let id = self.id.ok_or(ConfigError::Missing("id", "id"))?;
        if id == 0 {
            return Err(ConfigError::Invalid { field: "id", reason: "must be positive".into() });
        }
        let listen = self.listen.ok_or(ConfigError::Missing("listen", "listen"))?;
        let data_dir = self.data_dir.ok_or(ConfigError::Missing("data_dir", "data-dir"))?;
        let certs = self.certs.ok_or(ConfigError::Missing("certs", "certs"))?;
        let bootstrap = match &self.bootstrap {
            Some(s) => Some(parse_members(s)?),
            None => None,
        };
        if let Some(b) = &bootstrap {
            if !b.contains_key(&id) {
                return Err(ConfigError::Invalid {
                    field: "bootstrap",
                    reason: format!("does not include this node ({id})"),
                });
            }
        }
        let heartbeat_ms = self.heartbeat_ms.unwrap_or(200);
        let election_timeout_ms = self.election_timeout_ms.unwrap_or(700);
        if election_timeout_ms < heartbeat_ms * 3 {
            return Err(ConfigError::Invalid {
                field: "election_timeout_ms",
                reason: format!("{election_timeout_ms} must be at least 3x heartbeat_ms ({heartbeat_ms})"),
            });
        }
        let election_timeout_max_ms = election_timeout_ms + election_timeout_ms * 3 / 7;
        Ok(MetaConfig {
            id,
            listen,
            identity: Identity::in_dir(&certs, &format!("node-{id}")),
            data_dir,
            metrics_listen: self.metrics_listen,
            bootstrap,
            heartbeat_ms,
            election_timeout_ms,
            election_timeout_max_ms,
            snapshot_every: self.snapshot_every.unwrap_or(20_000),
            keep_logs: self.keep_logs.unwrap_or(2_000),
            change_history: self.change_history.unwrap_or(crate::meta::fsm::CHANGE_RETAIN_ENTRIES).max(1),
        })
    }
}

/// `1=ip:port,2=ip:port` into a member map.
pub fn parse_members(s: &str) -> Result<BTreeMap<u64, String>, ConfigError> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part.split_once('=').ok_or_else(|| ConfigError::Invalid {
            field: "bootstrap",
            reason: format!("{part:?} is not id=ip:port"),
        })?;
        let id: u64 = id
            .trim()
            .parse()
            .map_err(|_| ConfigError::Invalid { field: "bootstrap", reason: format!("{id:?} is not a node id") })?;
        let addr = addr.trim();
        addr.parse::<SocketAddr>()
            .map_err(|_| ConfigError::Invalid { field: "bootstrap", reason: format!("{addr:?} is not ip:port") })?;
        if out.insert(id, addr.to_string()).is_some() {
            return Err(ConfigError::Invalid { field: "bootstrap", reason: format!("node {id} listed twice") });
        }
    }
    if out.is_empty() {
        return Err(ConfigError::Invalid { field: "bootstrap", reason: "no members".into() });
    }
    Ok(out)
}

/// A complete, checked configuration of a metadata node.
#[derive(Debug, Clone)]
pub struct MetaConfig {
    pub id: u64,
    pub listen: SocketAddr,
    pub identity: Identity,
    pub data_dir: PathBuf,
    pub metrics_listen: Option<SocketAddr>,
    pub bootstrap: Option<BTreeMap<u64, String>>,
    pub heartbeat_ms: u64,
    pub election_timeout_ms: u64,
    pub election_timeout_max_ms: u64,
    pub snapshot_every: u64,
    pub keep_logs: u64,
    pub change_history: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_parse_and_errors_name_the_problem() {
        let m = parse_members("1=127.0.0.1:1, 2=127.0.0.1:2").unwrap();
        assert_eq!(m.len(), 2);
        assert!(parse_members("1=nohost").unwrap_err().to_string().contains("nohost"));
        assert!(parse_members("x=127.0.0.1:1").unwrap_err().to_string().contains("x"));
        assert!(parse_members("1=127.0.0.1:1,1=127.0.0.1:2").unwrap_err().to_string().contains("twice"));
    }

    #[test]
    fn missing_fields_are_named() {
        let e = MetaSettings::default().resolve().unwrap_err();
        assert!(e.to_string().contains("`id`"));
        let s = MetaSettings { id: Some(1), ..Default::default() };
        assert!(s.resolve().unwrap_err().to_string().contains("listen"));
    }
}
