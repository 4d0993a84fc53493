//! The Locus VM host agent (`locus-vmhost`): the agent that runs the VMs
//! the scheduler assigns to a host, its fence guard, the image cache, and
//! the VM drivers.
//!
//! - [`agent`]: registration, the lease (renewed by heartbeat; VMs are
//!   killed the moment it runs out), the reconcile loop, VM preparation
//!   (cached master, a copy-on-write layer in Locus, customization).
//! - [`plan`]: the reconcile decision, pure.
//! - [`guard`]: `locus-vmhost guard`, which fences the host's VMs when the
//!   lease runs out even if the agent is dead.
//! - [`cache`]: master images downloaded once, verified by blake3.
//! - [`mount`]: the host's Locus FUSE mount, through which VMs reach their
//!   program, disks and data sets.
//!
//! - [`driver`]: what a VM is ([`VmSpec`], [`VmState`]) and the [`Driver`]
//!   trait: start (idempotent), status, stop (graceful, then forced), kill
//!   (fencing), pause, resume, list, logs, remove.
//! - [`process`]: [`ProcessDriver`], a command as the VM's workload, in its
//!   own process group; pause is SIGSTOP.
//! - [`qemu`]: [`QemuDriver`], qemu-system-x86_64 guests (KVM when usable,
//!   TCG otherwise), controlled over [`qmp`].
//!
//! Every driver keeps all it knows in its run directory (see `rundir.rs`),
//! and identifies a VM's process by pid *and* start time: an agent restarted
//! with the same run directory lists and controls the VMs it started before,
//! without disturbing them, and never signals a process that merely reuses a
//! pid. Both drivers pass the same behaviour suite, `tests/drivers.rs`.
//!
//! Not here yet: memory checkpoints and live migration, the tree broadcast
//! of images and paused VMs.
//!
//! Start reading at [`Driver`], then [`plan`] and [`agent`].

pub mod agent;
pub mod cache;
pub mod daemon;
pub mod driver;
pub mod guard;
pub mod lease;
pub mod mount;
pub mod plan;
pub mod process;
mod procfs;
pub mod qemu;
pub mod qmp;
mod rundir;

pub use driver::{Disk, DiskSource, Driver, DriverError, ExitCode, VmHandle, VmInfo, VmKind, VmLogs, VmSpec, VmState};
pub use process::ProcessDriver;
pub use qemu::{Accel, QemuConfig, QemuDriver};
