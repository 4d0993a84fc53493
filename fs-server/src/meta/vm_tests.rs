//! The VM half of the state machine: refusals change nothing, a failed
//! host's VMs lose it, epochs rise at every new run.

use fs_client::proto::*;
use fs_client::vm::*;
use raft::{KvRead, MemKv, StateMachineLogic, Txn};

use super::fsm::{Command, Namespace, OpResult, Proposal};
use super::vm::{self, VmApplied, VmCmd, VmResult};

struct World {
    kv: MemKv,
    index: u64,
}

impl World {
    fn new() -> Self {
        let mut w = World { kv: MemKv::new(), index: 0 };
        w.raw(&Command::Init { now: Timespec { secs: 1, nanos: 0 }, chunk_bytes: 1 << 20 });
        let file = |name: &str| MetaOp::Create {
            parent: ROOT_INO,
            name: name.into(),
            perm: 0o644,
            caller: Caller::ROOT,
            exclusive: true,
        };
        let ops = vec![Proposal::new(None, file("img")), Proposal::new(None, file("data"))];
        let r: Vec<OpResult> = postcard::from_bytes(&w.raw(&Command::Batch { now: Timespec::default(), ops })).unwrap();
        assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
        w
    }

    fn raw(&mut self, cmd: &Command) -> Vec<u8> {
        self.index += 1;
        let bytes = postcard::to_allocvec(cmd).unwrap();
        let (reply, muts) = {
            let mut txn = Txn::new(&self.kv);
            let reply = Namespace::default().apply(&mut txn, self.index, &bytes).unwrap();
            (reply, txn.into_mutations())
        };
        self.kv.commit(muts);
        reply
    }

    fn cmd(&mut self, c: VmCmd) -> VmResult {
        let bytes = self.raw(&Command::Vm { now: Timespec { secs: self.index as i64, nanos: 0 }, cmds: vec![c] });
        let mut r: Vec<VmResult> = postcard::from_bytes(&bytes).unwrap();
        r.pop().unwrap()
    }

    fn vm(&self, id: &str) -> Option<VmInfo> {
        vm::load_vm(&self.kv, id).unwrap()
    }

    fn dump(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out = Vec::new();
        for tag in [vm::HOST, vm::SERVICE, vm::VM] {
            self.kv
                .scan(&[tag], &[tag + 1], &mut |k, v| {
                    out.push((k.to_vec(), v.to_vec()));
                    true
                })
                .unwrap();
        }
        out
    }
}

fn def() -> ServiceDef {
    ServiceDef::from_toml(
        "name = \"web\"\ndriver = \"process\"\nimage = \"/img\"\ndatasets = [\"/data\"]\ncommand = [\"true\"]\n",
    )
    .unwrap()
}

fn apply_op(d: ServiceDef) -> VmCmd {
    VmCmd::Client(VmOp::Apply { def: Box::new(d), image_blake3: "ab".repeat(32), image_bytes: 0 })
}

#[test]
fn refused_definitions_write_nothing() {
    let mut w = World::new();
    assert!(w.cmd(apply_op(def())).is_ok());
    let before = w.dump();
    let mut bad = def();
    bad.vcpus = 0;
    let e = w.cmd(apply_op(bad)).unwrap_err();
    assert!(e.message.contains("vcpus"), "{e:?}");
    let mut missing = def();
    missing.datasets = vec!["/nope".into()];
    let e = w.cmd(apply_op(missing)).unwrap_err();
    assert!(e.message.contains("datasets[0]") && e.code == ErrorCode::NotFound, "{e:?}");
    let e = w
        .cmd(VmCmd::Client(VmOp::Apply { def: Box::new(def()), image_blake3: "xyz".into(), image_bytes: 0 }))
        .unwrap_err();
    assert!(e.message.contains("image_blake3"), "{e:?}");
    assert_eq!(w.dump(), before, "a refused apply wrote something");
    // The same definition again changes nothing either.
    match w.cmd(apply_op(def())) {
        Ok(VmApplied::Reply(VmReply::Applied { changed: false, generation: 1, .. })) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(w.dump(), before);
}

fn host(w: &mut World) -> HostId {
    let topology = Topology::new("z1", "r1", "h1");
    match w.cmd(VmCmd::RegisterHost { id: None, name: "host-1".into(), topology, vcpus: 4, mem_mb: 4096 }) {
        Ok(VmApplied::Host(id)) => id,
        other => panic!("{other:?}"),
    }
}

fn record() -> PlacementRecord {
    PlacementRecord {
        at: Timespec::default(),
        cause: "test".into(),
        decision: placement::VmDecision {
            vm: "web-1".into(),
            outcome: placement::VmOutcome::Placed { host: 1, relaxed_to: None },
            attempts: vec![],
            candidates: vec![],
        },
    }
}

#[test]
fn a_failed_host_s_vms_lose_it_and_each_new_run_raises_the_epoch() {
    let mut w = World::new();
    w.cmd(apply_op(def())).unwrap();
    let h = host(&mut w);
    w.cmd(VmCmd::CreateVm { service: "web".into(), index: 1 }).unwrap();
    w.cmd(VmCmd::Assign { vm: "web-1".into(), host: h, record: record() }).unwrap();
    let v = w.vm("web-1").unwrap();
    assert_eq!((v.host, v.epoch, v.status.clone()), (Some(h), 1, VmStatus::Starting));
    // A second assignment while it has a host is skipped.
    assert_eq!(w.cmd(VmCmd::Assign { vm: "web-1".into(), host: h, record: record() }), Ok(VmApplied::Skipped));

    w.cmd(VmCmd::HostDown { id: h, cause: "silent".into() }).unwrap();
    let v = w.vm("web-1").unwrap();
    assert_eq!((v.host, v.restarts, v.status.clone()), (None, 1, VmStatus::Pending));
    assert!(v.events.last().unwrap().1.contains("failed"));
    // A down host gets no VMs until it registers again.
    assert_eq!(w.cmd(VmCmd::Assign { vm: "web-1".into(), host: h, record: record() }), Ok(VmApplied::Skipped));
    w.cmd(VmCmd::RegisterHost {
        id: Some(h),
        name: "host-1".into(),
        topology: Topology::new("z1", "r1", "h1"),
        vcpus: 4,
        mem_mb: 4096,
    })
    .unwrap();
    w.cmd(VmCmd::Assign { vm: "web-1".into(), host: h, record: record() }).unwrap();
    assert_eq!(w.vm("web-1").unwrap().epoch, 2);

    // It fails by itself; `vm start` runs it again at a new epoch.
    let failed = VmStatus::Failed { reason: "exit code 1".into() };
    w.cmd(VmCmd::SetStatus { vm: "web-1".into(), epoch: 2, status: failed.clone() }).unwrap();
    // A report for an old epoch is ignored.
    assert_eq!(
        w.cmd(VmCmd::SetStatus { vm: "web-1".into(), epoch: 1, status: VmStatus::Running }),
        Ok(VmApplied::Skipped)
    );
    w.cmd(VmCmd::Client(VmOp::SetRunning { target: "web".into(), running: true })).unwrap();
    let v = w.vm("web-1").unwrap();
    assert_eq!((v.epoch, v.status), (3, VmStatus::Starting));

    // Removing the service retires its VMs; released, they go.
    w.cmd(VmCmd::Client(VmOp::Remove { service: "web".into() })).unwrap();
    assert!(w.vm("web-1").unwrap().removing);
    w.cmd(VmCmd::Release { vm: "web-1".into(), epoch: 3, reason: "removed".into() }).unwrap();
    assert!(w.vm("web-1").is_none());
    assert!(vm::load_service(&w.kv, "web").unwrap().is_none());
}

#[test]
fn unknown_targets_are_not_found() {
    let mut w = World::new();
    let e = w.cmd(VmCmd::Client(VmOp::SetRunning { target: "nope".into(), running: false })).unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound);
    let e = w.cmd(VmCmd::Client(VmOp::Remove { service: "nope".into() })).unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound);
    let e = w.cmd(VmCmd::Client(VmOp::Drain { host: 9, drain: true })).unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound);
}
