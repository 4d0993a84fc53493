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
    /// Chunk size of a new cluster, in bytes (a power of two, 1 MiB to 1 GiB).
    #[arg(long)]
    pub chunk_bytes: Option<u64>,
    /// A chunk server silent for this long is declared dead (ms).
    #[arg(long)]
    pub dead_after_ms: Option<u64>,
    /// How often the chunk map is checked for missing copies (ms).
    #[arg(long)]
    pub scan_every_ms: Option<u64>,
    /// How long a VM host's lease lasts from its last heartbeat (ms); a host
    /// silent for this long plus a grace of a fifth is declared failed and
    /// its VMs are placed again.
    #[arg(long)]
    pub host_lease_ms: Option<u64>,
    /// Where VMs keep their writable state in the namespace.
    #[arg(long)]
    pub vm_root: Option<String>,
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
            chunk_bytes: over.chunk_bytes.or(self.chunk_bytes),
            dead_after_ms: over.dead_after_ms.or(self.dead_after_ms),
            scan_every_ms: over.scan_every_ms.or(self.scan_every_ms),
            host_lease_ms: over.host_lease_ms.or(self.host_lease_ms),
            vm_root: over.vm_root.or(self.vm_root),
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
        let chunk_bytes = self.chunk_bytes.unwrap_or(fs_client::proto::DEFAULT_CHUNK_BYTES);
        if !chunk_bytes.is_power_of_two() || !(1 << 20..=1 << 30).contains(&chunk_bytes) {
            return Err(ConfigError::Invalid {
                field: "chunk_bytes",
                reason: format!("{chunk_bytes} is not a power of two between 1 MiB and 1 GiB"),
            });
        }
        let dead_after_ms = self.dead_after_ms.unwrap_or(5_000);
        if !(500..=600_000).contains(&dead_after_ms) {
            return Err(ConfigError::Invalid { field: "dead_after_ms", reason: "must be 500..=600000".into() });
        }
        let host_lease_ms = self.host_lease_ms.unwrap_or(2_500);
        if !(500..=600_000).contains(&host_lease_ms) {
            return Err(ConfigError::Invalid { field: "host_lease_ms", reason: "must be 500..=600000".into() });
        }
        let vm_root = self.vm_root.clone().unwrap_or_else(|| fs_client::vm::DEFAULT_VM_ROOT.to_string());
        if !vm_root.starts_with('/') || vm_root.len() < 2 || vm_root.ends_with('/') || vm_root.contains("/../") {
            return Err(ConfigError::Invalid {
                field: "vm_root",
                reason: format!("{vm_root:?} is not an absolute path below /"),
            });
        }
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
            chunk_bytes,
            data: crate::meta::cluster::DataConfig {
                dead_after: std::time::Duration::from_millis(dead_after_ms),
                scan_every: std::time::Duration::from_millis(self.scan_every_ms.unwrap_or(10_000).max(100)),
                ..Default::default()
            },
            sched: crate::meta::sched::SchedConfig {
                lease: std::time::Duration::from_millis(host_lease_ms),
                grace: std::time::Duration::from_millis(host_lease_ms / 5),
                vm_root,
            },
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

/// Settings of `locus-server chunk`. Every field can come from the file or a flag.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct ChunkSettings {
    /// UDP address to serve QUIC on.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Address clients and peers dial, if not `listen`.
    #[arg(long)]
    pub advertise: Option<String>,
    /// Where chunk replicas are stored.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Directory with `ca.pem` and this server's certificate.
    #[arg(long)]
    pub certs: Option<PathBuf>,
    /// Name of this server's certificate in `certs` (default `chunk-1`).
    #[arg(long)]
    pub cert_name: Option<String>,
    /// Metadata servers, `ip:port,ip:port,...`.
    #[arg(long)]
    pub meta: Option<String>,
    /// Topology labels.
    #[arg(long)]
    pub zone: Option<String>,
    #[arg(long)]
    pub rack: Option<String>,
    #[arg(long)]
    pub host: Option<String>,
    /// Capacity to announce in bytes (default: the filesystem's size).
    #[arg(long)]
    pub capacity_bytes: Option<u64>,
    #[arg(long)]
    pub heartbeat_ms: Option<u64>,
    /// Refuse I/O after this long without an accepted heartbeat.
    #[arg(long)]
    pub fence_after_ms: Option<u64>,
    /// Report held chunks this often.
    #[arg(long)]
    pub report_every_ms: Option<u64>,
    /// Background verification rate (0 turns the scrubber off).
    #[arg(long)]
    pub scrub_mib_per_sec: Option<u64>,
    /// Memory for verified blocks served to repeated reads (default 256; 0 turns it off).
    #[arg(long)]
    pub read_cache_mib: Option<u64>,
    /// TCP address of the Prometheus endpoint.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Directory of the Unix socket local clients read through (default
    /// /run/locus).
    #[arg(long)]
    pub local_dir: Option<PathBuf>,
    /// Whether to serve local clients on a Unix socket (default true).
    #[arg(long)]
    pub local_socket: Option<bool>,
}

/// The largest block cache accepted (1 TiB): a bigger number is a typo.
const MAX_READ_CACHE_MIB: u64 = 1 << 20;

impl ChunkSettings {
    pub fn merge(self, over: ChunkSettings) -> ChunkSettings {
        ChunkSettings {
            listen: over.listen.or(self.listen),
            advertise: over.advertise.or(self.advertise),
            data_dir: over.data_dir.or(self.data_dir),
            certs: over.certs.or(self.certs),
            cert_name: over.cert_name.or(self.cert_name),
            meta: over.meta.or(self.meta),
            zone: over.zone.or(self.zone),
            rack: over.rack.or(self.rack),
            host: over.host.or(self.host),
            capacity_bytes: over.capacity_bytes.or(self.capacity_bytes),
            heartbeat_ms: over.heartbeat_ms.or(self.heartbeat_ms),
            fence_after_ms: over.fence_after_ms.or(self.fence_after_ms),
            report_every_ms: over.report_every_ms.or(self.report_every_ms),
            scrub_mib_per_sec: over.scrub_mib_per_sec.or(self.scrub_mib_per_sec),
            read_cache_mib: over.read_cache_mib.or(self.read_cache_mib),
            metrics_listen: over.metrics_listen.or(self.metrics_listen),
            local_dir: over.local_dir.or(self.local_dir),
            local_socket: over.local_socket.or(self.local_socket),
        }
    }

    pub fn load(path: &Path) -> Result<ChunkSettings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.into(), message: e.to_string() })
    }

    pub fn resolve(self) -> Result<crate::chunk::ChunkConfig, ConfigError> {
        use std::time::Duration;
        let listen = self.listen.ok_or(ConfigError::Missing("listen", "listen"))?;
        let data_dir = self.data_dir.ok_or(ConfigError::Missing("data_dir", "data-dir"))?;
        let certs = self.certs.ok_or(ConfigError::Missing("certs", "certs"))?;
        let meta: Vec<String> = self
            .meta
            .ok_or(ConfigError::Missing("meta", "meta"))?
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        for m in &meta {
            m.parse::<SocketAddr>()
                .map_err(|_| ConfigError::Invalid { field: "meta", reason: format!("{m:?} is not ip:port") })?;
        }
        if meta.is_empty() {
            return Err(ConfigError::Invalid { field: "meta", reason: "no addresses".into() });
        }
        let advertise = self.advertise.unwrap_or_else(|| listen.to_string());
        advertise.parse::<SocketAddr>().map_err(|_| ConfigError::Invalid {
            field: "advertise",
            reason: format!("{advertise:?} is not ip:port"),
        })?;
        let host = self.host.unwrap_or_else(|| {
            nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "localhost".into())
        });
        let label = |field: &'static str, v: &str| -> Result<(), ConfigError> {
            if v.is_empty() || v.len() > 64 || !v.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                return Err(ConfigError::Invalid { field, reason: format!("{v:?} must be 1-64 of [A-Za-z0-9-_.]") });
            }
            Ok(())
        };
        let zone = self.zone.unwrap_or_else(|| "z1".into());
        let rack = self.rack.unwrap_or_else(|| "r1".into());
        label("zone", &zone)?;
        label("rack", &rack)?;
        label("host", &host)?;
        let heartbeat_ms = self.heartbeat_ms.unwrap_or(1_000).clamp(50, 60_000);
        let fence_after_ms = self.fence_after_ms.unwrap_or(3_000);
        if fence_after_ms < heartbeat_ms * 2 {
            return Err(ConfigError::Invalid {
                field: "fence_after_ms",
                reason: format!("{fence_after_ms} must be at least twice heartbeat_ms ({heartbeat_ms})"),
            });
        }
        let read_cache_mib =
            self.read_cache_mib.unwrap_or(crate::chunk::store::StoreOptions::default().cache_bytes >> 20);
        if read_cache_mib > MAX_READ_CACHE_MIB {
            return Err(ConfigError::Invalid {
                field: "read_cache_mib",
                reason: format!("{read_cache_mib} is more than {MAX_READ_CACHE_MIB}"),
            });
        }
        let name = self.cert_name.unwrap_or_else(|| "chunk-1".into());
        Ok(crate::chunk::ChunkConfig {
            listen,
            advertise,
            data_dir,
            identity: Identity::in_dir(&certs, &name),
            meta,
            topology: fs_client::proto::Topology::new(&zone, &rack, &host),
            capacity_bytes: self.capacity_bytes,
            heartbeat: Duration::from_millis(heartbeat_ms),
            fence_after: Duration::from_millis(fence_after_ms),
            report_every: Duration::from_millis(self.report_every_ms.unwrap_or(60_000).max(100)),
            scrub_bytes_per_sec: self.scrub_mib_per_sec.unwrap_or(16) << 20,
            read_cache_bytes: read_cache_mib << 20,
            metrics_listen: self.metrics_listen,
            local_dir: self
                .local_socket
                .unwrap_or(true)
                .then(|| self.local_dir.unwrap_or_else(|| fs_client::local::DEFAULT_LOCAL_DIR.into())),
        })
    }
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
    pub chunk_bytes: u64,
    pub data: crate::meta::cluster::DataConfig,
    pub sched: crate::meta::sched::SchedConfig,
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
