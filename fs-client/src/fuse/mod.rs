//! The FUSE mount: `locus mount DIR` and `locus umount DIR`.
//!
//! - [`fs`]: [`fs::LocusFs`], the `fuser::Filesystem` over the metadata
//!   client (namespace) and the file client (data). Start reading here.
//! - [`dir`]: directory streams with stable offsets.
//! - [`watch`]: the metadata change stream turned into kernel cache
//!   invalidations, so two mounts see each other's changes quickly.
//! - [`attr`]: conversions between wire types and the kernel's.
//! - [`mount`]: checks before mounting, the session's life (daemon,
//!   signals, flushing at the end) and unmounting.
//!
//! What it deliberately does not do: cache data itself (the kernel's page
//! cache and the file client's write buffer are the caches), ask the
//! kernel for a writeback cache (writes reach the file client as they are
//! made, so a close makes them visible to other mounts), or keep an
//! unlinked file readable while it is open: once its last name is gone the
//! metadata service drops the inode, and reads and writes through handles
//! still open fail with ENOENT.

pub mod attr;
pub mod dir;
pub mod fs;
pub mod mount;
pub mod watch;

use std::path::PathBuf;

use clap::Args;

pub use mount::{mount, umount};

/// FUSE request threads by default: requests are handed to the runtime at
/// once, so a few threads keep up with the kernel.
pub const DEFAULT_THREADS: u16 = 4;

#[derive(Args, Debug, Clone)]
pub struct MountArgs {
    /// Directory to mount on; it must exist and not be a mount point already.
    pub dir: PathBuf,
    /// Stay in the foreground and log to stderr (default: run as a daemon
    /// logging to ~/.locus/logs/mount-<dir>.log, or $LOCUS_LOG_DIR).
    #[arg(short, long)]
    pub foreground: bool,
    /// Threads reading requests from the kernel.
    #[arg(long, default_value_t = DEFAULT_THREADS, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub threads: u16,
    /// Let users other than the one mounting use the mount, as a local
    /// filesystem does (the kernel checks permissions). The default when
    /// root mounts; non-root users need `user_allow_other` in
    /// /etc/fuse.conf.
    #[arg(long, conflicts_with = "owner_only")]
    pub allow_other: bool,
    /// Only the user who mounts may use the mount (the default for
    /// non-root users).
    #[arg(long)]
    pub owner_only: bool,
    /// Mount read-only, as `mount -o ro` does: the kernel refuses every
    /// change with EROFS and the mount writes nothing to the cluster (for
    /// inspecting or recovering data another client may still be writing).
    #[arg(short, long)]
    pub read_only: bool,
    /// Set by a daemonizing `locus mount` on the process it starts: report
    /// the outcome of mounting on stdout.
    #[arg(long, hide = true)]
    pub daemon_child: bool,
}

impl MountArgs {
    /// Whether other users may use the mount: asked for, or root mounting
    /// without `--owner-only`.
    pub fn others_allowed(&self) -> bool {
        self.allow_other || (!self.owner_only && nix::unistd::geteuid().is_root())
    }
}

#[derive(Args, Debug, Clone)]
pub struct UmountArgs {
    /// The mount point.
    pub dir: PathBuf,
    /// Detach now even if busy; the mount goes away when the last user does.
    #[arg(short, long)]
    pub lazy: bool,
}

/// Why mounting or unmounting failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// The mount point is missing, not a directory, or already mounted.
    #[error("{0}")]
    Mountpoint(String),
    /// FUSE is not available (/dev/fuse, fusermount3) or the kernel refused.
    #[error("{0}")]
    Fuse(String),
    #[error("{0}")]
    Config(String),
    /// The cluster did not answer.
    #[error("{0}")]
    Cluster(String),
    /// umount: something still uses the mount.
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    NotMounted(String),
    /// The daemon process failed before mounting, with this exit code.
    #[error("{message}")]
    Daemon { exit: u8, message: String },
    #[error("{0}")]
    Failed(String),
}

impl MountError {
    /// The `locus` exit code: 4 for anything that stops a mount from
    /// starting (the environment or the cluster), 1 for the rest.
    pub fn exit_code(&self) -> u8 {
        match self {
            MountError::Mountpoint(_) | MountError::Fuse(_) | MountError::Config(_) | MountError::Cluster(_) => 4,
            MountError::Daemon { exit, .. } => *exit,
            MountError::Busy(_) | MountError::NotMounted(_) | MountError::Failed(_) => 1,
        }
    }
}
