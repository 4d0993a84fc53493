//! The Locus VM host agent (`locus-vmhost`): so far, the VM drivers.
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
//! Not here yet (issue 5): the agent itself (registration, lease and fencing,
//! the reconcile loop against the metadata service), the image cache and
//! copy-on-write clones, disks served from Locus, checkpoints.
//!
//! Start reading at [`Driver`].

pub mod driver;
pub mod process;
mod procfs;
pub mod qemu;
pub mod qmp;
mod rundir;

pub use driver::{Disk, DiskSource, Driver, DriverError, ExitCode, VmHandle, VmInfo, VmKind, VmLogs, VmSpec, VmState};
pub use process::ProcessDriver;
pub use qemu::{Accel, QemuConfig, QemuDriver};
