//! Errors for requests and cluster views that cannot be decided on at all.
//!
//! "No host fits" is not an error: it is a decision (`Wait` or
//! `Unplaceable`) with an explanation. Errors are for malformed input.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::replica::MAX_COPIES;
use crate::vm::MAX_DATASETS_PER_VM;
use crate::Level;

/// Which field of a VM request named a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileField {
    Image,
    Datasets,
}

impl fmt::Display for FileField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FileField::Image => "image",
            FileField::Datasets => "datasets",
        })
    }
}

/// Malformed placement input. Every message names the field at fault;
/// [`PlacementError::code`] gives a stable code for the wire and the CLI.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum PlacementError {
    #[error("copies must be between 1 and {max}, got {copies}", max = MAX_COPIES)]
    InvalidCopies { copies: u8 },
    #[error("spread must be host, rack or zone, got {level}")]
    InvalidSpread { level: Level },
    #[error("existing names storage server {id}, which is not in the server list")]
    UnknownExistingServer { id: u64 },
    #[error("existing names storage server {id} twice")]
    DuplicateExisting { id: u64 },
    #[error("storage server id {id} appears twice")]
    DuplicateStorageServer { id: u64 },
    #[error("vm host id {id} appears twice")]
    DuplicateHost { id: u64 },
    #[error("file {path} appears twice in the cluster view")]
    DuplicateFile { path: String },
    #[error("file {path} chunk {chunk_index}: replica on unknown storage server {server}")]
    UnknownReplicaServer { path: String, chunk_index: u64, server: u64 },
    #[error("vm {vm}: vcpus must be at least 1")]
    ZeroVcpus { vm: String },
    #[error("vm {vm}: mem_mb must be at least 1")]
    ZeroMemory { vm: String },
    #[error("vm {vm}: {field} names {path}, which is not in the cluster view")]
    UnknownFile { vm: String, field: FileField, path: String },
    #[error("vm {vm}: datasets lists {count} files, at most {max} allowed", max = MAX_DATASETS_PER_VM)]
    TooManyDatasets { vm: String, count: usize },
    #[error("unknown vm host {id}")]
    UnknownHost { id: u64 },
    #[error("vm {vm}: host {host} is unhealthy")]
    HostUnhealthy { vm: String, host: u64 },
    #[error("vm {vm}: host {host} lacks capacity ({vcpus} vcpus, {mem_mb} MB needed)")]
    NoCapacity { vm: String, host: u64, vcpus: u32, mem_mb: u64 },
    #[error("vm {vm}: host {host} already runs a vm of anti-affinity group {group}")]
    AntiAffinityConflict { vm: String, host: u64, group: String },
    #[error("unknown level {text:?}: expected host, rack, zone or any")]
    UnknownLevel { text: String },
}

impl PlacementError {
    /// A stable identifier, so callers never parse messages.
    pub fn code(&self) -> &'static str {
        match self {
            PlacementError::InvalidCopies { .. } => "invalid_copies",
            PlacementError::InvalidSpread { .. } => "invalid_spread",
            PlacementError::UnknownExistingServer { .. } => "unknown_existing_server",
            PlacementError::DuplicateExisting { .. } => "duplicate_existing",
            PlacementError::DuplicateStorageServer { .. } => "duplicate_storage_server",
            PlacementError::DuplicateHost { .. } => "duplicate_host",
            PlacementError::DuplicateFile { .. } => "duplicate_file",
            PlacementError::UnknownReplicaServer { .. } => "unknown_replica_server",
            PlacementError::ZeroVcpus { .. } => "zero_vcpus",
            PlacementError::ZeroMemory { .. } => "zero_memory",
            PlacementError::UnknownFile { .. } => "unknown_file",
            PlacementError::TooManyDatasets { .. } => "too_many_datasets",
            PlacementError::UnknownHost { .. } => "unknown_host",
            PlacementError::HostUnhealthy { .. } => "host_unhealthy",
            PlacementError::NoCapacity { .. } => "no_capacity",
            PlacementError::AntiAffinityConflict { .. } => "anti_affinity_conflict",
            PlacementError::UnknownLevel { .. } => "unknown_level",
        }
    }
}
