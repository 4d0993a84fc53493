//! VM desired state in the Raft state machine: hosts, services and VMs.
//!
//! Pure, like the namespace: a [`VmCmd`] (with the leader's timestamp) in,
//! writes on a `Txn` and a reply out. Every check runs before the first
//! write, so a refused command (an invalid service definition, say) changes
//! nothing. Clients send [`VmOp`]s; the leader's scheduler
//! ([`super::sched`]) sends the rest: host registration and failure,
//! VM creation, placement, status and release.
//!
//! The rules the records keep:
//! - A VM has at most one host. It gets a new one only once the old one is
//!   known not to run it: the host reported it ended at its current epoch
//!   ([`VmCmd::Release`]), or the host's lease lapsed ([`VmCmd::HostDown`]),
//!   which its agent enforces by killing its VMs first.
//! - The epoch rises at every assignment and every restart: a host runs a
//!   VM at most once per epoch.

use std::collections::BTreeSet;

use fs_client::proto::*;
use fs_client::vm::*;
use raft::{KvError, KvRead, KvReadExt, Txn};
use serde::{Deserialize, Serialize};

use super::fsm::{dec, enc, err, get_counter, set_counter};
use super::read::resolve;

pub const HOST: u8 = b'H';
pub const SERVICE: u8 = b'G';
pub const VM: u8 = b'M';
const NEXT_HOST: &str = "next_host";

pub fn host_key(id: HostId) -> Vec<u8> {
    let mut k = vec![HOST];
    k.extend_from_slice(&id.to_be_bytes());
    k
}

pub fn service_key(name: &str) -> Vec<u8> {
    let mut k = vec![SERVICE];
    k.extend_from_slice(name.as_bytes());
    k
}

pub fn vm_key(id: &str) -> Vec<u8> {
    let mut k = vec![VM];
    k.extend_from_slice(id.as_bytes());
    k
}

/// VM state changes, as proposed (by clients through the leader, or by the
/// scheduler).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum VmCmd {
    Client(VmOp),
    RegisterHost {
        id: Option<HostId>,
        name: String,
        topology: Topology,
        vcpus: u32,
        mem_mb: u64,
    },
    /// The leader let the host's lease lapse: its VMs lose their host.
    HostDown {
        id: HostId,
        cause: String,
    },
    CreateVm {
        service: String,
        index: u32,
    },
    /// Marks a VM for removal (scale down).
    Retire {
        vm: String,
        reason: String,
    },
    Assign {
        vm: String,
        host: HostId,
        record: PlacementRecord,
    },
    SetStatus {
        vm: String,
        epoch: u64,
        status: VmStatus,
    },
    /// The host confirmed the VM ended at `epoch`: it leaves the host (and
    /// the map, if it is being removed).
    Release {
        vm: String,
        epoch: u64,
        reason: String,
    },
    /// The VM must leave its host (drain), to be placed again.
    Move {
        vm: String,
        reason: String,
    },
    /// A failed VM runs again on its host, at a new epoch.
    Restart {
        vm: String,
        reason: String,
    },
    SetDesired {
        service: String,
        desired: u32,
        reason: String,
    },
    /// A host wrote a checkpoint of a VM.
    CheckpointDone {
        vm: String,
        record: CheckpointRecord,
    },
}

/// What a [`VmCmd`] returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum VmApplied {
    Reply(VmReply),
    Host(HostId),
    /// Nothing to do (the record moved on meanwhile).
    Skipped,
}

pub type VmResult = Result<VmApplied, WireError>;

pub fn load_host(kv: &dyn KvRead, id: HostId) -> Result<Option<HostInfo>, KvError> {
    kv.get(&host_key(id))?.map(|b| dec(&b)).transpose()
}

pub fn load_service(kv: &dyn KvRead, name: &str) -> Result<Option<ServiceInfo>, KvError> {
    kv.get(&service_key(name))?.map(|b| dec(&b)).transpose()
}

pub fn load_vm(kv: &dyn KvRead, id: &str) -> Result<Option<VmInfo>, KvError> {
    kv.get(&vm_key(id))?.map(|b| dec(&b)).transpose()
}

fn scan_all<T: for<'de> Deserialize<'de>>(kv: &dyn KvRead, tag: u8) -> Result<Vec<T>, KvError> {
    let rows = kv.scan_collect(&[tag], &[tag + 1], usize::MAX)?;
    rows.iter().map(|(_, v)| dec::<T>(v)).collect()
}

pub fn all_hosts(kv: &dyn KvRead) -> Result<Vec<HostInfo>, KvError> {
    scan_all(kv, HOST)
}

pub fn all_services(kv: &dyn KvRead) -> Result<Vec<ServiceInfo>, KvError> {
    scan_all(kv, SERVICE)
}

pub fn all_vms(kv: &dyn KvRead) -> Result<Vec<VmInfo>, KvError> {
    scan_all(kv, VM)
}

/// The VMs of one service: their keys share the prefix `<service>-`.
pub fn service_vms(kv: &dyn KvRead, service: &str) -> Result<Vec<VmInfo>, KvError> {
    let start = vm_key(&format!("{service}-"));
    let mut end = start.clone();
    *end.last_mut().expect("non-empty") += 1;
    let rows = kv.scan_collect(&start, &end, usize::MAX)?;
    let vms: Vec<VmInfo> = rows.iter().map(|(_, v)| dec::<VmInfo>(v)).collect::<Result<_, _>>()?;
    // `web-1` and `web-db-1` share a prefix: keep only this service's.
    Ok(vms.into_iter().filter(|v| v.service == service).collect())
}

/// Answers a VM read from one view of the state.
pub fn query(kv: &dyn KvRead, read: &VmRead, vm_root: &str) -> Result<Result<VmReply, WireError>, KvError> {
    Ok(Ok(match read {
        VmRead::Services => VmReply::Services(all_services(kv)?),
        VmRead::Vms { service: None } => VmReply::Vms(all_vms(kv)?),
        VmRead::Vms { service: Some(s) } => VmReply::Vms(service_vms(kv, s)?),
        VmRead::Vm { id } => {
            let Some(vm) = load_vm(kv, id)? else {
                return Ok(Err(err(ErrorCode::NotFound, format!("no VM {id:?}"))));
            };
            let service = load_service(kv, &vm.service)?;
            let host = vm.host.map(|h| load_host(kv, h)).transpose()?.flatten();
            VmReply::Vm { vm: Box::new(vm), service: service.map(Box::new), host, vm_root: vm_root.to_string() }
        }
        VmRead::Hosts => VmReply::Hosts(all_hosts(kv)?),
    }))
}

/// Writes planned by one command, applied only if it succeeds.
#[derive(Default)]
struct Writes {
    hosts: Vec<HostInfo>,
    services: Vec<ServiceInfo>,
    deleted_services: Vec<String>,
    vms: Vec<VmInfo>,
    deleted_vms: Vec<VmInfo>,
    next_host: Option<u64>,
}

impl Writes {
    fn commit(self, txn: &mut Txn<'_>, changes: &mut Vec<Change>) {
        for h in self.hosts {
            txn.put(host_key(h.id), enc(&h));
        }
        for s in self.services {
            txn.put(service_key(&s.def.name), enc(&s));
        }
        for name in self.deleted_services {
            txn.delete(service_key(&name));
        }
        for v in self.vms {
            changes.push(Change::Vm { id: v.id.clone(), host: v.host });
            txn.put(vm_key(&v.id), enc(&v));
        }
        for v in self.deleted_vms {
            changes.push(Change::Vm { id: v.id.clone(), host: v.host });
            txn.delete(vm_key(&v.id));
        }
        if let Some(n) = self.next_host {
            set_counter(txn, NEXT_HOST, n);
        }
    }
}

fn event(vm: &mut VmInfo, now: Timespec, text: impl Into<String>) {
    vm.events.push((now, text.into()));
    let extra = vm.events.len().saturating_sub(MAX_VM_EVENTS);
    vm.events.drain(..extra);
}

fn set_status(vm: &mut VmInfo, now: Timespec, status: VmStatus) {
    if vm.status != status {
        vm.status = status;
        vm.since = now;
    }
}

/// Applies one command; store failures propagate, refusals are replies.
pub fn apply(txn: &mut Txn<'_>, now: Timespec, cmd: &VmCmd, changes: &mut Vec<Change>) -> Result<VmResult, KvError> {
    let mut w = Writes::default();
    let r = plan(&*txn, now, cmd, &mut w)?;
    if r.is_ok() {
        w.commit(txn, changes);
    }
    Ok(r)
}

fn not_found(what: String) -> WireError {
    err(ErrorCode::NotFound, what)
}

/// Checks that `path` names a regular file; the error names `field`.
fn check_file(kv: &dyn KvRead, field: &str, path: &str) -> Result<Result<(), WireError>, KvError> {
    Ok(match resolve(kv, path.as_bytes(), true)? {
        Ok(rec) if rec.attr.kind == FileKind::File => Ok(()),
        Ok(_) => Err(err(ErrorCode::Invalid, format!("{field}: {path} is not a regular file"))),
        Err(e) => Err(err(e.code, format!("{field}: {path}: {}", e.message))),
    })
}

fn plan(kv: &dyn KvRead, now: Timespec, cmd: &VmCmd, w: &mut Writes) -> Result<VmResult, KvError> {
    match cmd {
        VmCmd::Client(op) => plan_client(kv, now, op, w),
        VmCmd::RegisterHost { id, name, topology, vcpus, mem_mb } => {
            if name.is_empty() || name.len() > 128 {
                return Ok(Err(err(ErrorCode::Invalid, "a host needs a name of 1 to 128 bytes")));
            }
            let next = get_counter(kv, NEXT_HOST)?.max(1);
            let id = id.unwrap_or(next);
            let old = load_host(kv, id)?;
            w.hosts.push(HostInfo {
                id,
                name: name.clone(),
                topology: topology.clone(),
                vcpus: *vcpus,
                mem_mb: *mem_mb,
                draining: old.as_ref().is_some_and(|h| h.draining),
                up: true,
                registered: now,
            });
            w.next_host = Some(next.max(id + 1));
            Ok(Ok(VmApplied::Host(id)))
        }
        VmCmd::HostDown { id, cause } => {
            let Some(mut host) = load_host(kv, *id)? else { return Ok(Ok(VmApplied::Skipped)) };
            if !host.up {
                return Ok(Ok(VmApplied::Skipped));
            }
            host.up = false;
            w.hosts.push(host);
            for mut vm in all_vms(kv)? {
                if vm.host != Some(*id) {
                    continue;
                }
                vm.host = None;
                vm.moving = false;
                if vm.removing {
                    w.deleted_vms.push(vm);
                    continue;
                }
                event(&mut vm, now, format!("host {id} failed: {cause}"));
                if vm.want_running {
                    vm.restarts += 1;
                    set_status(&mut vm, now, VmStatus::Pending);
                } else {
                    set_status(&mut vm, now, VmStatus::Stopped { reason: format!("host {id} failed") });
                }
                w.vms.push(vm);
            }
            Ok(Ok(VmApplied::Reply(VmReply::Done)))
        }
        VmCmd::CreateVm { service, index } => {
            let Some(mut svc) = load_service(kv, service)? else { return Ok(Ok(VmApplied::Skipped)) };
            let id = vm_id(service, *index);
            if load_vm(kv, &id)?.is_some() {
                return Ok(Ok(VmApplied::Skipped));
            }
            svc.next_index = svc.next_index.max(index + 1);
            let mut vm = VmInfo {
                id,
                service: service.clone(),
                index: *index,
                want_running: true,
                removing: false,
                moving: false,
                host: None,
                epoch: 0,
                status: VmStatus::Pending,
                since: now,
                restarts: 0,
                last_placement: None,
                events: Vec::new(),
                checkpoints_wanted: 0,
                last_checkpoint: None,
            };
            event(&mut vm, now, format!("created (service generation {})", svc.generation));
            w.vms.push(vm);
            w.services.push(svc);
            Ok(Ok(VmApplied::Reply(VmReply::Done)))
        }
        VmCmd::Retire { vm, reason } => {
            let Some(mut v) = load_vm(kv, vm)? else { return Ok(Ok(VmApplied::Skipped)) };
            retire(&mut v, now, reason, w);
            Ok(Ok(VmApplied::Reply(VmReply::Done)))
        }
        VmCmd::Assign { vm, host, record } => {
            let Some(mut v) = load_vm(kv, vm)? else { return Ok(Ok(VmApplied::Skipped)) };
            let Some(h) = load_host(kv, *host)? else { return Ok(Ok(VmApplied::Skipped)) };
            if v.host.is_some() || !v.want_running || v.removing || !h.up || h.draining {
                return Ok(Ok(VmApplied::Skipped));
            }
            v.host = Some(*host);
            v.epoch += 1;
            v.last_placement = Some(record.clone());
            let text = format!("placed on host {} ({}) at epoch {}: {}", h.id, h.name, v.epoch, record.cause);
            event(&mut v, now, text);
            set_status(&mut v, now, VmStatus::Starting);
            w.vms.push(v);
            Ok(Ok(VmApplied::Reply(VmReply::Done)))
        }
        VmCmd::SetStatus { vm, epoch, status } => {
            let Some(mut v) = load_vm(kv, vm)? else { return Ok(Ok(VmApplied::Skipped)) };
            if v.epoch != *epoch || v.status == *status {
                return Ok(Ok(VmApplied::Skipped));
            }
            if matches!(status, VmStatus::Failed { .. } | VmStatus::Stopped { .. }) {
                event(&mut v, now, status.to_string());
            }
            set_status(&mut v, now, status.clone());
            w.vms.push(v);
            Ok(Ok(VmApplied::Reply(VmReply::Done)))
        }
        VmCmd::Release { vm, epoch, reason } => {
            let Some(mut v) = load_vm(kv, vm)? else { return Ok(Ok(VmApplied::Skipped)) };
            if v.epoch != *epoch {
                return Ok(Ok(VmApplied::Skipped));
            }
            let from = v.host.take();
            v.moving = false;
            if v.removing {
                w.deleted_vms.push(v);
                return Ok(Ok(VmApplied::Reply(VmReply::Done)));
            }
            if let Some(h) = from {
                event(&mut v, now, format!("left host {h}: {reason}"));
            }
            let status = if v.want_running { VmStatus::Pending } else { VmStatus::Stopped { reason: reason.clone() } };
            set_status(&mut v, now, status);
            w.vms.push(v);
            Ok(Ok(VmApplied::Reply(VmReply::Done)))
        }
        VmCmd::Move { vm, reason } => {
            let Some(mut v) = load_vm(kv, vm)? else { return Ok(Ok(VmApplied::Skipped)) };
            if v.host.is_none() || v.moving {
                return Ok(Ok(VmApplied::Skipped));
            }
            v.moving = true;
            event(&mut v, now, format!("moving: {reason}"));
            set_status(&mut v, now, VmStatus::Stopping);
            w.vms.push(v);
            Ok(Ok(VmApplied::Reply(VmReply::Done)))
        }
        VmCmd::Restart { vm, reason } => {
            let Some(mut v) = load_vm(kv, vm)? else { return Ok(Ok(VmApplied::Skipped)) };
            if v.host.is_none() || !v.want_running || v.removing || v.moving {
                return Ok(Ok(VmApplied::Skipped));
            }
            v.epoch += 1;
            v.restarts += 1;
            let text = format!("restarted at epoch {}: {reason}", v.epoch);
            event(&mut v, now, text);
            set_status(&mut v, now, VmStatus::Starting);
            w.vms.push(v);
            Ok(Ok(VmApplied::Reply(VmReply::Done)))
        }
        VmCmd::CheckpointDone { vm, record } => {
            let Some(mut v) = load_vm(kv, vm)? else { return Ok(Ok(VmApplied::Skipped)) };
            if v.last_checkpoint.as_ref().is_some_and(|c| c.n >= record.n) {
                return Ok(Ok(VmApplied::Skipped));
            }
            event(&mut v, now, format!("checkpoint {} written: {} and {}", record.n, record.memory, record.disk));
            v.last_checkpoint = Some(record.clone());
            w.vms.push(v);
            Ok(Ok(VmApplied::Reply(VmReply::Done)))
        }
        VmCmd::SetDesired { service, desired, reason } => {
            let Some(mut svc) = load_service(kv, service)? else { return Ok(Ok(VmApplied::Skipped)) };
            let n = (*desired).clamp(svc.def.instances.min, svc.def.instances.max);
            if n == svc.desired {
                return Ok(Ok(VmApplied::Skipped));
            }
            tracing::debug!(service, from = svc.desired, to = n, reason, "scale");
            svc.desired = n;
            svc.last_scale = now;
            w.services.push(svc);
            Ok(Ok(VmApplied::Reply(VmReply::Done)))
        }
    }
}

fn retire(v: &mut VmInfo, now: Timespec, reason: &str, w: &mut Writes) {
    if v.removing {
        return;
    }
    v.removing = true;
    v.want_running = false;
    if v.host.is_none() {
        w.deleted_vms.push(v.clone());
        return;
    }
    event(v, now, format!("removing: {reason}"));
    set_status(v, now, VmStatus::Stopping);
    w.vms.push(v.clone());
}

fn plan_client(kv: &dyn KvRead, now: Timespec, op: &VmOp, w: &mut Writes) -> Result<VmResult, KvError> {
    match op {
        VmOp::Apply { def, image_blake3, image_bytes } => {
            if let Err(e) = def.validate() {
                return Ok(Err(err(ErrorCode::Invalid, e.to_string())));
            }
            if image_blake3.len() != 64 || !image_blake3.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Ok(Err(err(ErrorCode::Invalid, "image_blake3: not a blake3 hash in hex")));
            }
            if postcard::to_allocvec(def).map(|b| b.len()).unwrap_or(usize::MAX) > MAX_DEF_BYTES {
                return Ok(Err(err(ErrorCode::TooBig, format!("the definition is larger than {MAX_DEF_BYTES} bytes"))));
            }
            let mut files = vec![("image".to_string(), def.image.clone())];
            files.extend(def.datasets.iter().enumerate().map(|(i, d)| (format!("datasets[{i}]"), d.clone())));
            files.extend(def.kernel.iter().map(|k| ("kernel".to_string(), k.clone())));
            files.extend(def.initrd.iter().map(|k| ("initrd".to_string(), k.clone())));
            for (field, path) in &files {
                if let Err(e) = check_file(kv, field, path)? {
                    return Ok(Err(e));
                }
            }
            let mut distinct = BTreeSet::new();
            for d in &def.datasets {
                if !distinct.insert(d) {
                    return Ok(Err(err(ErrorCode::Invalid, format!("datasets: {d} is listed twice"))));
                }
            }
            let name = def.name.clone();
            let svc = match load_service(kv, &name)? {
                Some(old) if old.def == **def && old.image_blake3 == *image_blake3 => {
                    return Ok(Ok(VmApplied::Reply(VmReply::Applied {
                        service: name,
                        generation: old.generation,
                        changed: false,
                    })));
                }
                Some(old) => {
                    let n = &def.instances;
                    let desired = if old.def.instances != *n { n.initial() } else { old.desired.clamp(n.min, n.max) };
                    ServiceInfo {
                        def: (**def).clone(),
                        generation: old.generation + 1,
                        image_blake3: image_blake3.clone(),
                        image_bytes: *image_bytes,
                        desired,
                        next_index: old.next_index,
                        created: old.created,
                        last_scale: now,
                    }
                }
                None => ServiceInfo {
                    def: (**def).clone(),
                    generation: 1,
                    image_blake3: image_blake3.clone(),
                    image_bytes: *image_bytes,
                    desired: def.instances.initial(),
                    next_index: 1,
                    created: now,
                    last_scale: now,
                },
            };
            let generation = svc.generation;
            w.services.push(svc);
            Ok(Ok(VmApplied::Reply(VmReply::Applied { service: name, generation, changed: true })))
        }
        VmOp::SetRunning { target, running } => {
            let vms = match load_vm(kv, target)? {
                Some(v) => vec![v],
                None if load_service(kv, target)?.is_some() => service_vms(kv, target)?,
                None => return Ok(Err(not_found(format!("no VM or service named {target:?}")))),
            };
            for mut v in vms {
                // Starting a VM that ended by itself (or failed) runs it again.
                let ended = matches!(v.status, VmStatus::Stopped { .. } | VmStatus::Failed { .. });
                if v.removing || (v.want_running == *running && !(*running && ended)) {
                    continue;
                }
                v.want_running = *running;
                if *running {
                    // A new run: the host starts it again at a new epoch.
                    if v.host.is_some() {
                        v.epoch += 1;
                        set_status(&mut v, now, VmStatus::Starting);
                    } else {
                        set_status(&mut v, now, VmStatus::Pending);
                    }
                    event(&mut v, now, "start requested");
                } else {
                    if v.host.is_some() {
                        set_status(&mut v, now, VmStatus::Stopping);
                    } else {
                        set_status(&mut v, now, VmStatus::Stopped { reason: "stopped by request".into() });
                    }
                    event(&mut v, now, "stop requested");
                }
                w.vms.push(v);
            }
            Ok(Ok(VmApplied::Reply(VmReply::Done)))
        }
        VmOp::Remove { service } => {
            if load_service(kv, service)?.is_none() {
                return Ok(Err(not_found(format!("no service named {service:?}"))));
            }
            for mut v in service_vms(kv, service)? {
                retire(&mut v, now, "service removed", w);
            }
            w.deleted_services.push(service.clone());
            Ok(Ok(VmApplied::Reply(VmReply::Done)))
        }
        VmOp::Checkpoint { vm } => {
            let Some(mut v) = load_vm(kv, vm)? else {
                return Ok(Err(not_found(format!("no VM {vm:?}"))));
            };
            let qemu = load_service(kv, &v.service)?.is_some_and(|s| s.def.driver == DriverKind::Qemu);
            if !qemu {
                return Ok(Err(err(ErrorCode::NotSupported, format!("{vm}: only qemu VMs have checkpoints"))));
            }
            if v.host.is_none() || v.status != VmStatus::Running {
                return Ok(Err(err(ErrorCode::Invalid, format!("{vm} is not running ({})", v.status))));
            }
            v.checkpoints_wanted = v.checkpoints_wanted.max(v.last_checkpoint.as_ref().map_or(0, |c| c.n)) + 1;
            let n = v.checkpoints_wanted;
            event(&mut v, now, format!("checkpoint {n} requested"));
            w.vms.push(v);
            Ok(Ok(VmApplied::Reply(VmReply::Checkpoint { n })))
        }
        VmOp::Drain { host, drain } => {
            let Some(mut h) = load_host(kv, *host)? else {
                return Ok(Err(not_found(format!("no host {host}"))));
            };
            h.draining = *drain;
            w.hosts.push(h);
            Ok(Ok(VmApplied::Reply(VmReply::Done)))
        }
    }
}
