//! VMs on the wire: service definitions (what `locus vm apply` reads), the
//! VM and host records the metadata service keeps, and the messages between
//! host agents, the CLI and the scheduler.
//!
//! A service definition is validated here, in pure code, by the CLI before
//! it is sent and again by the metadata service before it is applied: an
//! invalid definition is refused with the field and the reason, and changes
//! nothing.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::proto::{Level, Timespec, Topology};

/// A VM host's id (its own numbering, apart from chunk servers).
pub type HostId = u64;

/// Longest service name: VM ids are `<service>-<index>`, and ids name
/// directories and sockets on the hosts.
pub const MAX_SERVICE_NAME: usize = 40;
/// Most instances one service may run.
pub const MAX_INSTANCES: u32 = 1000;
/// Most customization files and environment variables per service.
pub const MAX_CUSTOM_ENTRIES: usize = 256;
/// Largest customization file.
pub const MAX_CUSTOM_FILE_BYTES: usize = 64 * 1024;
/// Largest encoded service definition.
pub const MAX_DEF_BYTES: usize = 1 << 20;
/// Most vCPUs and memory one VM may ask for.
pub const MAX_VM_VCPUS: u32 = 512;
pub const MAX_VM_MEMORY_MIB: u64 = 16 * 1024 * 1024;
/// Longest wait a placement policy may ask for.
pub const MAX_PLACEMENT_WAIT_S: u64 = 3600;
/// Placement events kept per VM (oldest dropped).
pub const MAX_VM_EVENTS: usize = 16;
/// Where VMs keep their writable state in the namespace by default.
pub const DEFAULT_VM_ROOT: &str = "/vms";

/// Which driver runs a service's VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DriverKind {
    /// A command run as the VM's workload.
    Process,
    /// A qemu-system-x86_64 guest.
    Qemu,
}

impl DriverKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DriverKind::Process => "process",
            DriverKind::Qemu => "qemu",
        }
    }
}

/// A service: what `locus vm apply FILE.toml` defines.
///
/// ```toml
/// name = "web"
/// driver = "process"
/// image = "/images/app.img"
/// datasets = ["/data/web.db"]
/// vcpus = 1
/// memory_mib = 128
/// command = ["/bin/sh", "{mount}/apps/web.sh"]
///
/// [placement]
/// proximity = "rack"        # host | rack | zone | any
/// anti_affinity = "web"
/// max_wait_s = 5            # wait this long for a slot that close...
/// relax_to = "any"          # ...then widen up to this level
///
/// [instances]
/// min = 1
/// max = 4
/// initial = 2
///
/// [scale]
/// metric = "load"           # reported by the workload
/// add_above = 0.8
/// remove_below = 0.2
/// cooldown_s = 5
///
/// [customize]
/// hostname = "web-{index}"
/// env = { MODE = "prod" }
/// files = { "etc/app.conf" = "port=8080\n" }
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceDef {
    pub name: String,
    pub driver: DriverKind,
    /// Path in Locus of the master image, cached on each host and cloned
    /// copy-on-write for every VM.
    pub image: String,
    /// Paths in Locus of the data set files the VMs process.
    #[serde(default)]
    pub datasets: Vec<String>,
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    /// `process`: the workload's program and arguments. `{mount}`, `{vm_dir}`,
    /// `{disk}`, `{image}`, `{dataset0}`..., `{service}`, `{vm}`, `{index}`
    /// and `{hostname}` are replaced.
    #[serde(default)]
    pub command: Vec<String>,
    /// `qemu`: paths in Locus of the guest kernel and initrd, and its
    /// command line.
    #[serde(default)]
    pub kernel: Option<String>,
    #[serde(default)]
    pub initrd: Option<String>,
    #[serde(default)]
    pub append: String,
    #[serde(default)]
    pub placement: PlacementDef,
    #[serde(default)]
    pub instances: InstancesDef,
    #[serde(default)]
    pub scale: Option<ScaleDef>,
    #[serde(default)]
    pub customize: CustomizeDef,
}

fn default_vcpus() -> u32 {
    1
}

fn default_memory_mib() -> u64 {
    256
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlacementDef {
    /// Required distance to the data sets.
    #[serde(default = "default_proximity")]
    pub proximity: Level,
    /// VMs of one group never share a host.
    #[serde(default)]
    pub anti_affinity: Option<String>,
    #[serde(default)]
    pub priority: i32,
    /// How long a VM may wait for a slot at `proximity` before relaxing.
    #[serde(default)]
    pub max_wait_s: u64,
    /// The widest level a waiting VM may relax to (`proximity`: never).
    #[serde(default)]
    pub relax_to: Option<Level>,
}

fn default_proximity() -> Level {
    Level::Any
}

impl Default for PlacementDef {
    fn default() -> Self {
        PlacementDef { proximity: Level::Any, anti_affinity: None, priority: 0, max_wait_s: 0, relax_to: None }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstancesDef {
    #[serde(default = "one")]
    pub min: u32,
    #[serde(default = "one")]
    pub max: u32,
    /// How many to start with (default `min`).
    #[serde(default)]
    pub initial: Option<u32>,
}

fn one() -> u32 {
    1
}

impl Default for InstancesDef {
    fn default() -> Self {
        InstancesDef { min: 1, max: 1, initial: None }
    }
}

impl InstancesDef {
    pub fn initial(&self) -> u32 {
        self.initial.unwrap_or(self.min)
    }
}

/// When to add clones and when to remove them, on a metric the workload
/// reports (the mean over the service's running VMs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleDef {
    pub metric: String,
    pub add_above: f64,
    pub remove_below: f64,
    /// Least time between two scaling steps.
    #[serde(default = "default_cooldown_s")]
    pub cooldown_s: u64,
}

fn default_cooldown_s() -> u64 {
    10
}

/// How each clone is customized.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomizeDef {
    /// The VM's hostname; `{service}`, `{index}` and `{vm}` are replaced.
    /// Default `{vm}`.
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Files written into the VM's directory (`files/<path>`, and the
    /// cloud-init seed for qemu): relative path -> content.
    #[serde(default)]
    pub files: BTreeMap<String, String>,
}

/// A refused service definition: the field and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct DefError {
    pub field: String,
    pub reason: String,
}

fn def_err(field: impl Into<String>, reason: impl Into<String>) -> DefError {
    DefError { field: field.into(), reason: reason.into() }
}

/// A name made of `[a-z0-9-]`, starting with a letter.
fn check_dns_label(field: &str, v: &str, max: usize) -> Result<(), DefError> {
    if v.is_empty() {
        return Err(def_err(field, "is empty"));
    }
    if v.len() > max {
        return Err(def_err(field, format!("is longer than {max} characters")));
    }
    if !v.bytes().next().is_some_and(|b| b.is_ascii_lowercase()) {
        return Err(def_err(field, format!("{v:?} must start with a lowercase letter")));
    }
    if !v.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') || v.ends_with('-') {
        return Err(def_err(field, format!("{v:?} may hold only a-z, 0-9 and '-' (not at the end)")));
    }
    Ok(())
}

fn check_locus_path(field: &str, p: &str) -> Result<(), DefError> {
    if !p.starts_with('/') {
        return Err(def_err(field, format!("{p:?} is not an absolute path in Locus")));
    }
    if p.len() > 4096 {
        return Err(def_err(field, "is longer than 4096 bytes"));
    }
    if p.contains('\0') {
        return Err(def_err(field, "holds a NUL byte"));
    }
    if p.split('/').any(|c| c == "..") {
        return Err(def_err(field, format!("{p:?} holds '..'")));
    }
    Ok(())
}

fn check_template(field: &str, t: &str, allowed: &[&str]) -> Result<(), DefError> {
    let mut rest = t;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            return Err(def_err(field, format!("{t:?} has an unclosed '{{'")));
        };
        let key = &rest[open + 1..open + close];
        let ok = allowed.contains(&key)
            || key.strip_prefix("dataset").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if !ok {
            return Err(def_err(field, format!("unknown placeholder {{{key}}} (known: {})", allowed.join(", "))));
        }
        rest = &rest[open + close + 1..];
    }
    Ok(())
}

/// Placeholders a process command may use.
pub const COMMAND_PLACEHOLDERS: &[&str] =
    &["mount", "vm_dir", "disk", "image", "service", "vm", "index", "hostname", "metrics"];
/// Placeholders a hostname may use.
pub const HOSTNAME_PLACEHOLDERS: &[&str] = &["service", "vm", "index"];

impl ServiceDef {
    /// Parses a TOML service definition; errors name the field.
    pub fn from_toml(text: &str) -> Result<ServiceDef, DefError> {
        let def: ServiceDef = toml::from_str(text).map_err(|e| {
            let field = e.span().map(|s| format!("line {}", line_of(text, s.start))).unwrap_or_else(|| "file".into());
            def_err(field, e.message().to_string())
        })?;
        def.validate()?;
        Ok(def)
    }

    /// Every check that needs no cluster state.
    pub fn validate(&self) -> Result<(), DefError> {
        check_dns_label("name", &self.name, MAX_SERVICE_NAME)?;
        check_locus_path("image", &self.image)?;
        if self.datasets.len() > placement::MAX_DATASETS_PER_VM {
            return Err(def_err("datasets", format!("more than {} files", placement::MAX_DATASETS_PER_VM)));
        }
        for (i, d) in self.datasets.iter().enumerate() {
            check_locus_path(&format!("datasets[{i}]"), d)?;
        }
        if self.vcpus == 0 || self.vcpus > MAX_VM_VCPUS {
            return Err(def_err("vcpus", format!("is {}, must be 1 to {MAX_VM_VCPUS}", self.vcpus)));
        }
        if self.memory_mib == 0 || self.memory_mib > MAX_VM_MEMORY_MIB {
            return Err(def_err("memory_mib", format!("is {}, must be 1 to {MAX_VM_MEMORY_MIB}", self.memory_mib)));
        }
        match self.driver {
            DriverKind::Process => {
                let Some(program) = self.command.first() else {
                    return Err(def_err("command", "is empty: the process driver needs a program to run"));
                };
                if program.is_empty() {
                    return Err(def_err("command[0]", "is an empty string"));
                }
                for (i, a) in self.command.iter().enumerate() {
                    if a.contains('\0') {
                        return Err(def_err(format!("command[{i}]"), "holds a NUL byte"));
                    }
                    check_template(&format!("command[{i}]"), a, COMMAND_PLACEHOLDERS)?;
                }
                if self.kernel.is_some() || self.initrd.is_some() {
                    return Err(def_err("kernel", "only the qemu driver boots a kernel"));
                }
            }
            DriverKind::Qemu => {
                let Some(k) = &self.kernel else {
                    return Err(def_err("kernel", "is missing: the qemu driver boots a kernel stored in Locus"));
                };
                check_locus_path("kernel", k)?;
                if let Some(i) = &self.initrd {
                    check_locus_path("initrd", i)?;
                }
                if !self.command.is_empty() {
                    return Err(def_err("command", "only the process driver runs a command"));
                }
                if self.append.contains('\0') || self.append.len() > 4096 {
                    return Err(def_err("append", "must be at most 4096 bytes without NUL"));
                }
            }
        }
        let p = &self.placement;
        if let Some(g) = &p.anti_affinity {
            check_dns_label("placement.anti_affinity", g, 64)?;
        }
        if p.max_wait_s > MAX_PLACEMENT_WAIT_S {
            return Err(def_err("placement.max_wait_s", format!("is more than {MAX_PLACEMENT_WAIT_S}")));
        }
        if let Some(r) = p.relax_to {
            if r < p.proximity {
                return Err(def_err(
                    "placement.relax_to",
                    format!("{r} is narrower than proximity {}: relaxing only widens", p.proximity),
                ));
            }
        }
        let n = &self.instances;
        if n.max == 0 || n.max > MAX_INSTANCES {
            return Err(def_err("instances.max", format!("is {}, must be 1 to {MAX_INSTANCES}", n.max)));
        }
        if n.min > n.max {
            return Err(def_err("instances.min", format!("{} is more than max {}", n.min, n.max)));
        }
        if let Some(i) = n.initial {
            if i < n.min || i > n.max {
                return Err(def_err(
                    "instances.initial",
                    format!("{i} is not between min {} and max {}", n.min, n.max),
                ));
            }
        }
        if let Some(s) = &self.scale {
            if s.metric.is_empty()
                || s.metric.len() > 64
                || !s.metric.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
            {
                return Err(def_err("scale.metric", format!("{:?} must be 1-64 of A-Z a-z 0-9 _ .", s.metric)));
            }
            if !s.add_above.is_finite() || !s.remove_below.is_finite() {
                return Err(def_err("scale", "thresholds must be finite numbers"));
            }
            if s.remove_below >= s.add_above {
                return Err(def_err(
                    "scale.remove_below",
                    format!("{} is not below add_above {}: the rule would flap", s.remove_below, s.add_above),
                ));
            }
            if s.cooldown_s > 86_400 {
                return Err(def_err("scale.cooldown_s", "is more than a day"));
            }
        }
        let c = &self.customize;
        if let Some(h) = &c.hostname {
            if h.is_empty() || h.len() > 63 || !h.bytes().all(|b| b.is_ascii_alphanumeric() || b"-{}_".contains(&b)) {
                return Err(def_err("customize.hostname", format!("{h:?} is not a valid hostname template")));
            }
            check_template("customize.hostname", h, HOSTNAME_PLACEHOLDERS)?;
        }
        if c.env.len() > MAX_CUSTOM_ENTRIES {
            return Err(def_err("customize.env", format!("more than {MAX_CUSTOM_ENTRIES} variables")));
        }
        for (k, v) in &c.env {
            let valid = !k.is_empty()
                && !k.bytes().next().is_some_and(|b| b.is_ascii_digit())
                && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !valid {
                return Err(def_err(format!("customize.env.{k}"), "is not a valid variable name"));
            }
            if k.starts_with("LOCUS_") {
                return Err(def_err(format!("customize.env.{k}"), "LOCUS_ variables are set by the host agent"));
            }
            if v.contains('\0') {
                return Err(def_err(format!("customize.env.{k}"), "holds a NUL byte"));
            }
        }
        if c.files.len() > MAX_CUSTOM_ENTRIES {
            return Err(def_err("customize.files", format!("more than {MAX_CUSTOM_ENTRIES} files")));
        }
        for (path, content) in &c.files {
            let field = format!("customize.files.{path:?}");
            let parts_ok = path.split('/').all(|p| !p.is_empty() && p != "." && p != "..");
            if path.is_empty() || path.starts_with('/') || !parts_ok || path.contains('\0') || path.len() > 255 {
                return Err(def_err(field, "must be a relative path without '.', '..' or empty parts"));
            }
            if content.len() > MAX_CUSTOM_FILE_BYTES {
                return Err(def_err(field, format!("is larger than {MAX_CUSTOM_FILE_BYTES} bytes")));
            }
        }
        Ok(())
    }

    /// The id of instance `index`.
    pub fn vm_id(&self, index: u32) -> String {
        vm_id(&self.name, index)
    }

    /// The hostname of instance `index`.
    pub fn hostname(&self, index: u32) -> String {
        let t = self.customize.hostname.as_deref().unwrap_or("{vm}");
        t.replace("{service}", &self.name).replace("{index}", &index.to_string()).replace("{vm}", &self.vm_id(index))
    }
}

/// Where VM `vm` of `service` keeps its state in the namespace.
pub fn vm_dir(vm_root: &str, service: &str, vm: &str) -> String {
    format!("{vm_root}/{service}/{vm}")
}

/// The id of instance `index` of `service`.
pub fn vm_id(service: &str, index: u32) -> String {
    format!("{service}-{index}")
}

fn line_of(text: &str, byte: usize) -> usize {
    text.as_bytes()[..byte.min(text.len())].iter().filter(|&&b| b == b'\n').count() + 1
}

/// What the metadata service keeps of a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    pub id: HostId,
    pub name: String,
    pub topology: Topology,
    pub vcpus: u32,
    pub mem_mb: u64,
    /// No new VMs; its VMs move elsewhere.
    pub draining: bool,
    /// The leader holds a live lease for it.
    pub up: bool,
    pub registered: Timespec,
}

/// How a VM is doing, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmStatus {
    /// Not placed yet.
    Pending,
    /// Waiting for a slot at its required distance (delay scheduling).
    Waiting {
        reason: String,
    },
    /// No host fits at any level its policy allows.
    Unplaceable {
        reason: String,
    },
    /// Placed; the host has not reported it running yet.
    Starting,
    Running,
    /// Leaving its host (stop, drain, removal); placed again, if still
    /// wanted, once the host reports it gone.
    Stopping,
    Stopped {
        reason: String,
    },
    Failed {
        reason: String,
    },
}

impl fmt::Display for VmStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmStatus::Pending => f.write_str("pending"),
            VmStatus::Waiting { reason } => write!(f, "waiting: {reason}"),
            VmStatus::Unplaceable { reason } => write!(f, "unplaceable: {reason}"),
            VmStatus::Starting => f.write_str("starting"),
            VmStatus::Running => f.write_str("running"),
            VmStatus::Stopping => f.write_str("stopping"),
            VmStatus::Stopped { reason } => write!(f, "stopped: {reason}"),
            VmStatus::Failed { reason } => write!(f, "failed: {reason}"),
        }
    }
}

impl VmStatus {
    pub fn word(&self) -> &'static str {
        match self {
            VmStatus::Pending => "pending",
            VmStatus::Waiting { .. } => "waiting",
            VmStatus::Unplaceable { .. } => "unplaceable",
            VmStatus::Starting => "starting",
            VmStatus::Running => "running",
            VmStatus::Stopping => "stopping",
            VmStatus::Stopped { .. } => "stopped",
            VmStatus::Failed { .. } => "failed",
        }
    }
}

/// A recorded placement decision: when, where, and the explanation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementRecord {
    pub at: Timespec,
    /// Why it was (re)placed: "new", "host 2 failed", "drain", ...
    pub cause: String,
    pub decision: placement::VmDecision,
}

/// What the metadata service keeps of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    pub id: String,
    pub service: String,
    pub index: u32,
    /// The user wants it running.
    pub want_running: bool,
    /// Being removed (scale down or `vm rm`): deleted once off its host.
    pub removing: bool,
    /// Leaving its host (drain): placed again once the host reports it
    /// stopped.
    pub moving: bool,
    /// The host that runs it (or last ran it and has not confirmed it gone).
    pub host: Option<HostId>,
    /// Raised at every assignment: a host runs the VM only at the epoch it
    /// was given.
    pub epoch: u64,
    pub status: VmStatus,
    pub since: Timespec,
    /// Times it was placed again after its host failed.
    pub restarts: u32,
    pub last_placement: Option<PlacementRecord>,
    /// Recent events, oldest first, at most [`MAX_VM_EVENTS`].
    pub events: Vec<(Timespec, String)>,
    /// Checkpoints asked for so far (`locus vm checkpoint`).
    pub checkpoints_wanted: u64,
    /// The newest checkpoint its host wrote.
    pub last_checkpoint: Option<CheckpointRecord>,
}

/// A checkpoint of a qemu VM: its memory and devices, and a snapshot of its
/// disk layer taken at the same instant (the guest paused between), both
/// in Locus next to the VM's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    pub n: u64,
    pub epoch: u64,
    pub at: Timespec,
    /// Locus paths.
    pub memory: String,
    pub disk: String,
    pub memory_bytes: u64,
}

/// What the metadata service keeps of a service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceInfo {
    pub def: ServiceDef,
    /// Raised by every apply of a changed definition.
    pub generation: u64,
    /// blake3 (hex) and size of the master image when it was applied.
    pub image_blake3: String,
    pub image_bytes: u64,
    /// Instances wanted now (scale rules move it between min and max).
    pub desired: u32,
    pub next_index: u32,
    pub created: Timespec,
    pub last_scale: Timespec,
}

/// VM changes a client asks for (role client or admin).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum VmOp {
    /// Creates or updates a service.
    Apply { def: Box<ServiceDef>, image_blake3: String, image_bytes: u64 },
    /// Starts or stops a VM (`target` = VM id) or all of a service's VMs
    /// (`target` = service name).
    SetRunning { target: String, running: bool },
    /// Removes a service and its VMs.
    Remove { service: String },
    /// Drains a host (no new VMs, its VMs move) or undrains it.
    Drain { host: HostId, drain: bool },
    /// Asks the host of a running qemu VM for a checkpoint; replies
    /// `Checkpoint { n }`, the number the checkpoint will carry.
    Checkpoint { vm: String },
}

/// VM reads (served by the leader).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmRead {
    Services,
    /// VMs, of one service or all.
    Vms {
        service: Option<String>,
    },
    Vm {
        id: String,
    },
    Hosts,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum VmReply {
    Done,
    Applied {
        service: String,
        generation: u64,
        changed: bool,
    },
    Services(Vec<ServiceInfo>),
    Vms(Vec<VmInfo>),
    /// One VM, its service and host, and where VMs keep their state.
    Vm {
        vm: Box<VmInfo>,
        service: Option<Box<ServiceInfo>>,
        host: Option<HostInfo>,
        vm_root: String,
    },
    Hosts(Vec<HostInfo>),
    Checkpoint {
        n: u64,
    },
}

/// What a host agent tells the leader (role host).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum HostMsg {
    /// Joins (`id` None: first start) or rejoins.
    Register { id: Option<HostId>, name: String, topology: Topology, vcpus: u32, mem_mb: u64 },
    /// Renews the lease; reports what runs. Sent every few hundred ms.
    Heartbeat { id: HostId, vms: Vec<VmReport>, cached_images: Vec<String> },
}

/// One VM as the host's driver sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmReport {
    pub id: String,
    pub epoch: u64,
    pub state: ReportedState,
    /// Metrics the workload reported (for scale rules).
    pub metrics: BTreeMap<String, f64>,
    /// The newest checkpoint written at this epoch.
    pub checkpoint: Option<CheckpointRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportedState {
    /// Being prepared (image download, clone, customization).
    Preparing,
    Running,
    Paused,
    Stopped {
        reason: String,
    },
    Failed {
        reason: String,
    },
}

/// A VM a host must run (or stop).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub vm: String,
    pub service: String,
    pub index: u32,
    pub epoch: u64,
    /// False: stop it (and report it stopped) but keep its state.
    pub run: bool,
    /// Checkpoints asked for: write one when this exceeds the newest.
    pub checkpoint: u64,
}

/// The leader's answer to a host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum HostReply {
    Registered {
        id: HostId,
        lease_ms: u64,
    },
    /// The lease is renewed for `lease_ms` from when the heartbeat was
    /// sent; run exactly `assignments` (anything else is stopped), and
    /// cache the listed images.
    Lease {
        lease_ms: u64,
        assignments: Vec<Assignment>,
        services: Vec<ServiceInfo>,
        prefetch: Vec<(String, String)>,
        /// Where VMs keep their state in the namespace.
        vm_root: String,
    },
    /// The lease lapsed (the host was declared dead): stop every VM now and
    /// register again.
    LeaseLost,
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "web"
driver = "process"
image = "/images/app.img"
datasets = ["/data/a"]
command = ["/bin/sh", "{mount}/apps/web.sh", "{dataset0}"]
[placement]
proximity = "rack"
relax_to = "any"
max_wait_s = 5
[instances]
min = 1
max = 4
initial = 2
[scale]
metric = "load"
add_above = 0.8
remove_below = 0.2
[customize]
hostname = "web-{index}"
env = { MODE = "prod" }
files = { "etc/app.conf" = "port=8080\n" }
"#;

    #[test]
    fn a_good_definition_parses() {
        let d = ServiceDef::from_toml(GOOD).unwrap();
        assert_eq!(d.instances.initial(), 2);
        assert_eq!(d.placement.proximity, Level::Rack);
        assert_eq!(d.hostname(3), "web-3");
        assert_eq!(d.vm_id(3), "web-3");
        assert_eq!(d.scale.as_ref().unwrap().cooldown_s, 10);
    }

    fn refused(edit: impl FnOnce(&mut ServiceDef)) -> DefError {
        let mut d = ServiceDef::from_toml(GOOD).unwrap();
        edit(&mut d);
        d.validate().unwrap_err()
    }

    #[test]
    fn bad_definitions_name_the_field() {
        assert_eq!(refused(|d| d.name = "Web".into()).field, "name");
        assert_eq!(refused(|d| d.name = "x".repeat(41)).field, "name");
        assert_eq!(refused(|d| d.image = "images/a".into()).field, "image");
        assert_eq!(refused(|d| d.datasets = vec!["/a/../b".into()]).field, "datasets[0]");
        assert_eq!(refused(|d| d.vcpus = 0).field, "vcpus");
        assert_eq!(refused(|d| d.memory_mib = 0).field, "memory_mib");
        assert_eq!(refused(|d| d.command.clear()).field, "command");
        assert_eq!(refused(|d| d.command.push("{nope}".into())).field, "command[3]");
        assert_eq!(refused(|d| d.instances.min = 5).field, "instances.min");
        assert_eq!(refused(|d| d.instances.initial = Some(9)).field, "instances.initial");
        assert_eq!(refused(|d| d.instances.max = 0).field, "instances.max");
        assert_eq!(refused(|d| d.placement.relax_to = Some(Level::Host)).field, "placement.relax_to");
        assert_eq!(refused(|d| d.scale.as_mut().unwrap().remove_below = 0.9).field, "scale.remove_below");
        assert_eq!(refused(|d| d.scale.as_mut().unwrap().add_above = f64::NAN).field, "scale");
        assert_eq!(refused(|d| d.customize.hostname = Some("a b".into())).field, "customize.hostname");
        assert!(refused(|d| {
            d.customize.env.insert("LOCUS_X".into(), "1".into());
        })
        .field
        .starts_with("customize.env"));
        assert!(refused(|d| {
            d.customize.files.insert("../etc/passwd".into(), String::new());
        })
        .field
        .starts_with("customize.files"));
        assert_eq!(
            refused(|d| {
                d.driver = DriverKind::Qemu;
                d.command.clear();
            })
            .field,
            "kernel"
        );
    }

    #[test]
    fn toml_errors_name_the_line() {
        let e = ServiceDef::from_toml("name = \"a\"\ndriver = \"vmware\"\nimage = \"/i\"\n").unwrap_err();
        assert_eq!(e.field, "line 2", "{e}");
        let e = ServiceDef::from_toml("name = \"a\"\ndriver = \"process\"\nimage = \"/i\"\ncolour = 1\n").unwrap_err();
        assert!(e.reason.contains("colour"), "{e}");
    }
}
