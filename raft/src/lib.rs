//! Domain-free Raft for Locus.
//!
//! This crate runs [openraft] with its log, vote and state machine in
//! RocksDB, and its RPCs over QUIC. It knows nothing of files or VMs: the
//! domain implements [`StateMachineLogic`], a deterministic function from a
//! committed command to writes on an ordered key-value space ([`kv::Txn`])
//! and a reply. Everything else (persistence, group commit, snapshots and
//! their transfer, membership, linearizable reads) is here.
//!
//! Start reading at [`node::RaftNode`]; storage is in [`storage`], the wire in
//! [`network`].
//!
//! What it deliberately does not do: own a QUIC endpoint or TLS setup (the
//! server passes in an endpoint and a client configuration, and hands over
//! connections that negotiated [`network::RAFT_ALPN`]), or know which
//! commands exist.

pub mod kv;
pub mod network;
pub mod node;
pub mod snapshot;
pub mod storage;
pub mod types;

pub use kv::{KvError, KvRead, KvReadExt, MemKv, Txn};
pub use network::{RaftTransport, RAFT_ALPN};
pub use node::{RaftNode, RaftNodeConfig, RaftNodeError};
pub use openraft::ServerState;
pub use storage::KvReader;
pub use types::{NodeId, RaftMetrics};

/// The domain's deterministic state machine.
///
/// `apply` must depend only on its inputs and on what it reads through the
/// transaction: every replica applies the same commands in the same order
/// and must reach the same state. Time, randomness and the like travel inside
/// the command.
pub trait StateMachineLogic: Send + Sync + 'static {
    /// Applies one committed command at log `index`; returns the reply for
    /// the proposer. An `Err` means the store failed and stops the node.
    fn apply(&self, txn: &mut Txn<'_>, index: u64, command: &[u8]) -> Result<Vec<u8>, KvError>;
}
