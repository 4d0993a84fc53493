//! The Locus client side.
//!
//! - [`proto`]: the wire protocol every server speaks (servers depend on
//!   this crate for it; this crate never depends on a server).
//! - [`tls`]: the cluster CA, certificates and QUIC TLS settings.
//! - [`client`]: [`client::MetaClient`], requests with leader discovery,
//!   retries and at-most-once writes.
//! - [`cli`]: the `locus` command line; [`up`] runs a local cluster.
//! - [`fuse`]: the FUSE mount (`locus mount`).
//! - [`nbd`]: the NBD export (`locus nbd serve`).
//! - [`chunk`]: requests to chunk servers; [`local`] reads replicas on
//!   this host through their servers' Unix sockets.
//! - [`vm`]: service definitions and the VM messages; [`vmcli`] is
//!   `locus vm` / `locus host`, [`demo`] is `locus demo`.
//!
//! Start reading at [`client::MetaClient`].

pub mod alloc;
pub mod chunk;
pub mod cli;
pub mod client;
pub mod config;
pub mod demo;
pub mod file;
pub mod frame;
pub mod fuse;
pub mod local;
pub mod nbd;
pub mod proto;
pub mod sparse;
pub mod sums;
pub mod tls;
pub mod up;
pub mod vm;
pub mod vmcli;

pub use client::{ClientError, MetaClient};
pub use config::ClientConfig;
