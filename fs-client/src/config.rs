//! The client configuration file: where the metadata servers are and which
//! certificate to present.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::tls::Identity;

/// Default request deadline, retries included.
pub const DEFAULT_TIMEOUT_MS: u64 = 30_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientConfig {
    /// Addresses (`host:port`) of metadata servers; any subset works, the
    /// client finds the leader.
    pub meta: Vec<String>,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// Where this client runs, so reads go to the nearest replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<crate::proto::Topology>,
    /// Read replicas on this host through their servers' local sockets
    /// (see [`crate::local`]).
    #[serde(default = "yes")]
    pub local_reads: bool,
    /// Where the local chunk servers' sockets are (default
    /// [`crate::local::DEFAULT_LOCAL_DIR`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_dir: Option<PathBuf>,
}

fn default_timeout() -> u64 {
    DEFAULT_TIMEOUT_MS
}

fn yes() -> bool {
    true
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

impl ClientConfig {
    pub fn identity(&self) -> Identity {
        Identity { ca: self.ca.clone(), cert: self.cert.clone(), key: self.key.clone() }
    }

    /// The local socket directory, if local reads are on.
    pub fn local_dir(&self) -> Option<PathBuf> {
        let dir = self.local_dir.clone().unwrap_or_else(|| PathBuf::from(crate::local::DEFAULT_LOCAL_DIR));
        self.local_reads.then_some(dir)
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        let mut cfg: ClientConfig =
            toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.into(), message: e.to_string() })?;
        // Relative certificate paths are relative to the file.
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [&mut cfg.ca, &mut cfg.cert, &mut cfg.key].into_iter().chain(cfg.local_dir.as_mut()) {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        let text = toml::to_string_pretty(self).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        std::fs::write(path, text).map_err(|source| ConfigError::Read { path: path.into(), source })
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.meta.is_empty() {
            return Err(ConfigError::Invalid("no metadata server addresses (`meta`)".into()));
        }
        if self.timeout_ms == 0 {
            return Err(ConfigError::Invalid("timeout_ms must be positive".into()));
        }
        Ok(())
    }

    /// Where the CLI looks when no `--config` is given: `$LOCUS_CONFIG`,
    /// else `~/.locus/client.toml` (what `locus up` writes by default).
    pub fn default_path() -> PathBuf {
        if let Some(p) = std::env::var_os("LOCUS_CONFIG") {
            return PathBuf::from(p);
        }
        default_data_dir().join("client.toml")
    }
}

/// `~/.locus`, the default data directory of `locus up`.
pub fn default_data_dir() -> PathBuf {
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(".")).join(".locus")
}
