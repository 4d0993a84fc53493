//! VM placement and VM hosts, end to end with real processes: metadata
//! nodes, chunk servers, `locus-vmhost` agents (with their fence guards and
//! Locus mounts) and their VMs; QEMU for the qemu driver.
//!
//! The workload of the process-driver tests is a shell script stored in
//! Locus; it reads its data set and disk through the host's mount, appends
//! a numbered tick to a file in its own directory in Locus and fsyncs it
//! (so every tick read back before a failure is an acknowledged write), and
//! reports the load it finds in `/t/load`.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fs_client::file::FileClient;
use fs_client::proto::*;
use fs_client::vm::*;
use fs_client::MetaClient;
use locus_tests::hosts::{vm_copies, vms, wait_vms, Hosts};
use locus_tests::*;

const APP: &str = r#"#!/bin/sh
set -eu
d="$LOCUS_VM_DIR"
echo "start $LOCUS_VM_ID epoch $LOCUS_VM_EPOCH on $LOCUS_HOST_NAME" >> "$d/starts"
sync "$d/starts"
cat "$LOCUS_DATASET_0" > "$d/seen-dataset"
head -c 16 "$LOCUS_DISK" > "$d/seen-disk"
sync "$d/seen-dataset" "$d/seen-disk"
n=$(cat "$d/ticks" 2>/dev/null | wc -l)
while true; do
  n=$((n + 1))
  echo "$n $LOCUS_HOST_NAME" >> "$d/ticks"
  sync "$d/ticks"
  load=$(cat "$LOCUS_MOUNT/t/load" 2>/dev/null || echo 0.5)
  echo "load $load" > "$LOCUS_METRICS"
  sleep 0.2
done
"#;

const RUNNING_TIMEOUT: Duration = Duration::from_secs(60);

async fn mkdir(c: &MetaClient, parent: Ino, name: &str) -> Ino {
    c.op_attr(MetaOp::Mkdir { parent, name: name.into(), perm: 0o755, caller: Caller::ROOT }).await.expect("mkdir").ino
}

async fn read_text(files: &FileClient, path: &str) -> Option<String> {
    let a = files.meta().resolve(path.as_bytes(), true).await.ok()?;
    files.invalidate(a.ino);
    let d = files::read_all(files, a.ino).await;
    Some(String::from_utf8_lossy(&d).into_owned())
}

/// A cluster with 3 chunk servers and 3 VM hosts, `/t` holding the app, an
/// image and a data set with `goal` copies at rack level.
struct World {
    // Fields drop in this order: the hosts (agents, guards, VMs) must be
    // gone before the cluster removes the directory they write in.
    hosts: Hosts,
    cluster: Cluster,
    files: FileClient,
    image: Vec<u8>,
    dataset: Vec<u8>,
}

impl World {
    async fn start(dataset_copies: u8) -> World {
        init_logging();
        phase("start 3 metadata nodes, 3 chunk servers (racks r1-r3), 3 VM hosts on the same machines");
        let cluster = Cluster::start(ClusterOptions::default()).await.expect("cluster");
        let hosts = Hosts::start(&cluster, 3).await.expect("hosts");
        let files = cluster.files();
        let c = cluster.client();
        let t = mkdir(&c, ROOT_INO, "t").await;
        let data = mkdir(&c, t, "data").await;
        c.op(MetaOp::SetGoal { ino: data, goal: Goal { copies: dataset_copies, level: Level::Rack } })
            .await
            .expect("goal");
        let image = files::pattern(1, 300 << 10);
        let dataset = files::pattern(2, 200 << 10);
        files::put(&files, "/t/app.sh", APP.as_bytes(), 0o755).await;
        files::put(&files, "/t/image", &image, 0o644).await;
        files::put(&files, "/t/data/set", &dataset, 0o644).await;
        files::put(&files, "/t/load", b"0.5\n", 0o644).await;
        World { cluster, hosts, files, image, dataset }
    }

    fn client(&self) -> MetaClient {
        self.cluster.client()
    }

    fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let cfg = self.cluster.write_cli_config("admin", None, 20_000);
        locus_cli(&cfg, args, None)
    }

    fn apply(&self, toml: &str) -> (i32, String, String) {
        let path = self.cluster.path().join(format!("svc-{}.toml", rand::random::<u32>()));
        std::fs::write(&path, toml).expect("write definition");
        self.cli(&["vm", "apply", path.to_str().expect("utf-8 path")])
    }

    /// The host labels (`hN`) holding the data set's replicas.
    async fn dataset_hosts(&self) -> Vec<String> {
        let a = self.client().resolve(b"/t/data/set", true).await.expect("resolve");
        let l = files::layout(&self.client(), a.ino).await;
        l.chunks[0].replicas.iter().map(|r| r.topology.host.clone()).collect()
    }

    async fn host_label(&self, id: HostId) -> String {
        let list = self.hosts.list().await.expect("hosts");
        list.iter().find(|h| h.id == id).map(|h| h.topology.host.clone()).expect("host")
    }

    fn diagnostics(&self) -> String {
        format!("{}\n{}", self.cluster.logs_tail(), self.hosts.logs_tail())
    }
}

fn service(name: &str, proximity: &str, extra: &str) -> String {
    format!(
        r#"name = "{name}"
driver = "process"
image = "/t/image"
datasets = ["/t/data/set"]
vcpus = 1
memory_mib = 64
command = ["/bin/sh", "{{mount}}/t/app.sh"]
[placement]
proximity = "{proximity}"
[customize]
hostname = "{name}-node-{{index}}"
files = {{ "etc/app.conf" = "mode=test\n" }}
{extra}
"#
    )
}

async fn ticks(w: &World, vm: &VmInfo) -> String {
    read_text(&w.files, &format!("{}/ticks", vm_dir(DEFAULT_VM_ROOT, &vm.service, &vm.id))).await.unwrap_or_default()
}

async fn wait_ticks(w: &World, vm: &VmInfo, at_least: usize) -> String {
    let path = format!("{}/ticks", vm_dir(DEFAULT_VM_ROOT, &vm.service, &vm.id));
    wait_lines(&w.files, &path, at_least, || w.diagnostics()).await
}

/// Waits until the file at `path` has `at_least` lines; returns its text.
async fn wait_lines(files: &FileClient, path: &str, at_least: usize, diag: impl Fn() -> String) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let t = read_text(files, path).await.unwrap_or_default();
        if t.lines().count() >= at_least {
            return t;
        }
        assert!(Instant::now() < deadline, "{path}: {} lines, wanted {at_least}\n{}", t.lines().count(), diag());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Samples the running copies of `vm` every few ms; remembers the most seen at once.
struct CopySampler {
    max: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    task: std::thread::JoinHandle<()>,
}

impl CopySampler {
    fn start(vm: &str) -> CopySampler {
        let (max, stop) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
        let (m, s, vm) = (max.clone(), stop.clone(), vm.to_string());
        let task = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let n = vm_copies(&vm).len();
                m.fetch_max(n, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        CopySampler { max, stop, task }
    }

    fn finish(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.join();
        self.max.load(Ordering::Relaxed)
    }
}

/// Goal: a VM runs on the host that holds its data set, reads its program,
/// disk and data set from Locus, gets its customization, and `vm why`
/// explains the choice. Method: a data set with one copy (so one host
/// holds it) and `proximity = "host"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_runs_next_to_its_data_and_reads_it_from_locus() {
    let w = World::start(1).await;
    let holder = w.dataset_hosts().await;
    assert_eq!(holder.len(), 1);
    phase(&format!("apply a service whose VM must run on the host holding the data set ({})", holder[0]));
    let (code, out, err) = w.apply(&service("near", "host", ""));
    assert_eq!(code, 0, "{out}{err}");
    let v = wait_vms(&w.client(), "near", RUNNING_TIMEOUT, "near-1 running", |v| {
        v.len() == 1 && v[0].status == VmStatus::Running
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", w.diagnostics()));
    let vm = &v[0];
    assert_eq!(w.host_label(vm.host.expect("host")).await, holder[0], "placed away from its data");

    phase("the workload read its data set and its disk (a clone of the image) through Locus");
    wait_ticks(&w, vm, 2).await;
    let dir = vm_dir(DEFAULT_VM_ROOT, "near", "near-1");
    let seen = read_text(&w.files, &format!("{dir}/seen-dataset")).await.expect("seen-dataset");
    assert_eq!(seen.as_bytes(), String::from_utf8_lossy(&w.dataset).as_bytes(), "data set read back wrong");
    let disk = w.files.meta().resolve(format!("{dir}/disk").as_bytes(), true).await.expect("disk");
    assert_eq!(files::read_all(&w.files, disk.ino).await, w.image, "the VM's disk is not a copy of the image");
    let conf = read_text(&w.files, &format!("{dir}/files/etc/app.conf")).await.expect("customized file");
    assert_eq!(conf, "mode=test\n");
    let hostname = read_text(&w.files, &format!("{dir}/hostname")).await.expect("hostname");
    assert_eq!(hostname.trim(), "near-node-1");

    phase("`locus vm why` explains the choice host by host; `vm ls`, `vm show`, `host ls` answer");
    let (code, why, err) = w.cli(&["vm", "why", "near-1"]);
    assert_eq!(code, 0, "{err}");
    assert!(why.contains("->") && why.contains("not within host"), "{why}");
    let (code, ls, _) = w.cli(&["vm", "ls"]);
    assert!(code == 0 && ls.contains("near-1") && ls.contains("running"), "{ls}");
    let (code, show, _) = w.cli(&["--json", "vm", "show", "near-1"]);
    assert_eq!(code, 0);
    let j: serde_json::Value = serde_json::from_str(&show).expect("json");
    assert_eq!(j["vm"]["epoch"], 1);
    let (code, hosts, _) = w.cli(&["host", "ls"]);
    assert!(code == 0 && hosts.contains("host-3"), "{hosts}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, logs, _) = w.cli(&["vm", "logs", "near-1"]);
        if code == 0 && logs.is_empty() {
            // The script prints nothing on stdout: an empty log is right.
            break;
        }
        assert!(Instant::now() < deadline, "vm logs: {code} {logs}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The failover scenario, for a host that dies (`kill`) or hangs (SIGSTOP
/// of its agent: the fence guard must kill its VMs).
async fn failover(hang: bool) {
    let mut w = World::start(2).await;
    let (code, out, err) = w.apply(&service("fo", "rack", ""));
    assert_eq!(code, 0, "{out}{err}");
    let v = wait_vms(&w.client(), "fo", RUNNING_TIMEOUT, "fo-1 running", |v| {
        v.len() == 1 && v[0].status == VmStatus::Running
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", w.diagnostics()));
    let first = v[0].clone();
    let first_host = first.host.expect("host");
    let holders = w.dataset_hosts().await;
    assert!(holders.contains(&w.host_label(first_host).await), "not in a rack holding the data");
    let acked = wait_ticks(&w, &first, 5).await;
    let sampler = CopySampler::start("fo-1");
    let index = w.hosts.index_of(first_host).await.expect("index");
    let started = Instant::now();
    if hang {
        phase(&format!("SIGSTOP the agent of host-{index}: its guard must kill fo-1 before it runs elsewhere"));
        w.hosts.node(index).signal(nix::sys::signal::Signal::SIGSTOP);
    } else {
        phase(&format!("kill -9 the agent of host-{index}: fo-1 must run elsewhere, once, with its ticks"));
        w.hosts.node(index).kill_agent();
    }
    let v = wait_vms(&w.client(), "fo", Duration::from_secs(30), "fo-1 running on another host", |v| {
        v.len() == 1 && v[0].status == VmStatus::Running && v[0].host.is_some_and(|h| h != first_host)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", w.diagnostics()));
    let took = started.elapsed();
    eprintln!("failover took {took:?}");
    assert!(took < Duration::from_secs(10), "failover took {took:?}");
    let second = v[0].clone();
    assert_eq!(second.restarts, 1);
    assert!(holders.contains(&w.host_label(second.host.expect("host")).await), "moved away from the data");
    assert!(second.last_placement.as_ref().is_some_and(|p| p.cause.contains("failed")), "{second:?}");

    phase("every acknowledged tick is there, and the new run goes on from them");
    let after = wait_ticks(&w, &second, acked.lines().count() + 3).await;
    assert!(after.starts_with(&acked), "acknowledged ticks lost:\nbefore:\n{acked}\nafter:\n{after}");
    let n: Vec<u64> = after.lines().filter_map(|l| l.split(' ').next()?.parse().ok()).collect();
    assert!(n.windows(2).all(|p| p[1] > p[0]), "ticks out of order: {n:?}");
    if hang {
        phase("the hung agent wakes up: it was fenced, and fo-1 does not come back there");
        w.hosts.node(index).signal(nix::sys::signal::Signal::SIGCONT);
        // It is up again only once it learned it was fenced and registered anew.
        w.hosts.wait_up(3, Duration::from_secs(20)).await.expect("host back");
        let v = vms(&w.client(), "fo").await.expect("vms");
        assert_eq!(v[0].host, second.host, "fo-1 moved again");
    }
    let max = sampler.finish();
    assert_eq!(max, 1, "fo-1 ran {max} times at once");
    assert_eq!(vm_copies("fo-1").len(), 1);
}

/// Goal: kill -9 a VM host with a running VM: it runs again on another
/// host holding its data within 10 s, with every acknowledged write, never
/// twice at once. Method: sample the VM's processes every 5 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_host_s_vm_runs_again_elsewhere_once_with_its_writes() {
    failover(false).await;
}

/// Goal: a host whose agent hangs is fenced by its guard before its VM is
/// placed elsewhere; when the agent wakes it does not take the VM back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_host_is_fenced_before_its_vm_runs_elsewhere() {
    failover(true).await;
}

/// Goal: the agent survives its own restart without disturbing its VMs.
/// Method: kill -9 the agent and start it again at once; the VM's process
/// and epoch stay the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_restart_leaves_running_vms_alone() {
    let mut w = World::start(3).await;
    let (code, out, err) = w.apply(&service("keep", "any", ""));
    assert_eq!(code, 0, "{out}{err}");
    let v = wait_vms(&w.client(), "keep", RUNNING_TIMEOUT, "keep-1 running", |v| {
        v.len() == 1 && v[0].status == VmStatus::Running
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", w.diagnostics()));
    let copies = vm_copies("keep-1");
    assert_eq!(copies.len(), 1);
    let index = w.hosts.index_of(v[0].host.expect("host")).await.expect("index");
    phase(&format!("kill -9 the agent of host-{index} and start it again"));
    w.hosts.node(index).restart().expect("restart");
    let log = w.hosts.node(index).log.clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_to_string(&log).unwrap_or_default().matches("registered").count() < 2 {
        assert!(Instant::now() < deadline, "the restarted agent did not register\n{}", w.diagnostics());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Several reconcile passes of the new agent while the VM goes on ticking.
    let before = ticks(&w, &v[0]).await.lines().count();
    wait_ticks(&w, &v[0], before + 8).await;
    let after = vms(&w.client(), "keep").await.expect("vms");
    assert_eq!(after[0].epoch, v[0].epoch, "the VM was restarted: {:?}", after[0]);
    assert_eq!(after[0].status, VmStatus::Running);
    assert_eq!(vm_copies("keep-1"), copies, "the VM's process changed");
    let before = ticks(&w, &v[0]).await.lines().count();
    wait_ticks(&w, &v[0], before + 3).await;
}

/// Goal: scale rules add clones when the workload's load is high and remove
/// them when it is low, within min and max.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_rules_add_and_remove_clones() {
    let w = World::start(3).await;
    let extra = "[instances]\nmin = 1\nmax = 3\n[scale]\nmetric = \"load\"\nadd_above = 0.8\nremove_below = 0.2\ncooldown_s = 1\n";
    let (code, out, err) = w.apply(&service("sc", "any", extra));
    assert_eq!(code, 0, "{out}{err}");
    let running =
        |n: usize| move |v: &[VmInfo]| v.iter().filter(|v| v.status == VmStatus::Running).count() == n && v.len() == n;
    wait_vms(&w.client(), "sc", RUNNING_TIMEOUT, "1 VM", running(1))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", w.diagnostics()));
    let first = vm_copies("sc-1");
    phase("the load goes to 0.95: clones are added up to max = 3, sc-1 undisturbed");
    files::put(&w.files, "/t/load", b"0.95\n", 0o644).await;
    let v = wait_vms(&w.client(), "sc", RUNNING_TIMEOUT, "3 VMs", running(3))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", w.diagnostics()));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(vms(&w.client(), "sc").await.expect("vms").len(), 3, "grew past max");
    assert_eq!(vm_copies("sc-1"), first, "adding clones disturbed the running one");
    // The clones share the image's chunks until they write (copy-on-write).
    assert!(v.iter().all(|v| v.service == "sc"));
    phase("the load goes to 0.05: clones are removed down to min = 1");
    files::put(&w.files, "/t/load", b"0.05\n", 0o644).await;
    let v = wait_vms(&w.client(), "sc", RUNNING_TIMEOUT, "1 VM", running(1))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", w.diagnostics()));
    assert_eq!(v[0].id, "sc-1", "the oldest stays");
    let deadline = Instant::now() + Duration::from_secs(20);
    while vm_copies("sc-2").len() + vm_copies("sc-3").len() > 0 {
        assert!(Instant::now() < deadline, "removed clones still run");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Goal: an invalid service definition is refused with the field and the
/// reason, and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_definitions_are_refused_and_change_nothing() {
    let w = World::start(3).await;
    let good = service("inv", "any", "");
    let (code, out, err) = w.apply(&good);
    assert_eq!(code, 0, "{out}{err}");
    wait_vms(&w.client(), "inv", RUNNING_TIMEOUT, "inv-1 running", |v| {
        v.len() == 1 && v[0].status == VmStatus::Running
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", w.diagnostics()));
    let services = |c: MetaClient| async move {
        match c.vm(VmRequest::Read(VmRead::Services)).await.expect("services") {
            VmReply::Services(s) => s,
            other => panic!("{other:?}"),
        }
    };
    let before = services(w.client()).await;
    let cases: Vec<(String, &str)> = vec![
        (good.replace("vcpus = 1", "vcpus = 0"), "vcpus"),
        (good.replace("memory_mib = 64", "memory_mib = 64\ncolour = \"red\""), "colour"),
        (good.replace("/t/image", "/t/no-such-image"), "image"),
        (good.replace("\"/t/data/set\"", "\"/t/data/none\""), "datasets[0]"),
        (good.replace("proximity = \"any\"", "proximity = \"galaxy\""), "line"),
        (good.replace("{mount}", "{nowhere}"), "command[1]"),
        ("this is not toml".to_string(), "line 1"),
    ];
    for (text, field) in cases {
        let (code, out, err) = w.apply(&text);
        assert_eq!(code, 1, "accepted:\n{text}\n{out}");
        assert!(err.contains(field), "the error does not name {field}: {err}");
    }
    assert_eq!(services(w.client()).await, before, "a refused definition changed the service");
    let v = vms(&w.client(), "inv").await.expect("vms");
    assert!(v.len() == 1 && v[0].epoch == 1 && v[0].status == VmStatus::Running, "{v:?}");
    phase("unknown names get NotFound");
    let (code, _, err) = w.cli(&["vm", "show", "nope-1"]);
    assert!(code == 1 && err.contains("NotFound"), "{err}");
    let (code, _, err) = w.cli(&["host", "drain", "no-such-host"]);
    assert!(code == 1 && err.contains("no host"), "{err}");
}

/// Goal: stop and start keep the VM's state; a drained host's VMs move to
/// other hosts, never running twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_start_and_drain() {
    let w = World::start(3).await;
    let (code, out, err) = w.apply(&service("ss", "any", ""));
    assert_eq!(code, 0, "{out}{err}");
    let v = wait_vms(&w.client(), "ss", RUNNING_TIMEOUT, "ss-1 running", |v| {
        v.len() == 1 && v[0].status == VmStatus::Running
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", w.diagnostics()));
    let t = wait_ticks(&w, &v[0], 3).await;
    phase("vm stop: the process ends, the VM is recorded stopped");
    let (code, _, err) = w.cli(&["vm", "stop", "ss"]);
    assert_eq!(code, 0, "{err}");
    wait_vms(&w.client(), "ss", Duration::from_secs(30), "ss-1 stopped", |v| {
        matches!(v[0].status, VmStatus::Stopped { .. })
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", w.diagnostics()));
    assert!(vm_copies("ss-1").is_empty(), "a stopped VM still runs");
    phase("vm start: it runs again at a new epoch and keeps its ticks");
    let (code, _, err) = w.cli(&["vm", "start", "ss-1"]);
    assert_eq!(code, 0, "{err}");
    let v = wait_vms(&w.client(), "ss", RUNNING_TIMEOUT, "ss-1 running again", |v| {
        v[0].status == VmStatus::Running && v[0].epoch == 2
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", w.diagnostics()));
    let after = wait_ticks(&w, &v[0], t.lines().count() + 2).await;
    assert!(after.starts_with(&t));
    phase("drain its host: it moves, once");
    let sampler = CopySampler::start("ss-1");
    let from = v[0].host.expect("host");
    let (code, _, err) = w.cli(&["host", "drain", &from.to_string()]);
    assert_eq!(code, 0, "{err}");
    wait_vms(&w.client(), "ss", RUNNING_TIMEOUT, "ss-1 moved", |v| {
        v[0].status == VmStatus::Running && v[0].host.is_some_and(|h| h != from)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", w.diagnostics()));
    assert_eq!(sampler.finish(), 1, "ran twice during the move");
    let (_, hosts, _) = w.cli(&["host", "ls"]);
    assert!(hosts.contains("yes"), "{hosts}");
}

/// Goal: a real QEMU guest boots from a kernel, initrd and image stored in
/// Locus (its disk a qcow2 layer in Locus over the host's cached master),
/// writes to its disks, and the writes read back through Locus while the
/// master stays untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qemu_vm_boots_from_locus_and_its_writes_read_back() {
    if !Path::new("/usr/bin/qemu-system-x86_64").exists() {
        eprintln!("SKIPPED: qemu-system-x86_64 is not installed");
        return;
    }
    let guest = guest_kernel();
    let w = World::start(3).await;
    phase("upload the guest kernel and initrd, a raw master image and a raw data disk");
    let kernel = std::fs::read(&guest.0).expect("kernel");
    let initrd = std::fs::read(&guest.1).expect("initrd");
    files::put(&w.files, "/t/vmlinuz", &kernel, 0o644).await;
    files::put(&w.files, "/t/initrd", &initrd, 0o644).await;
    let master = files::pattern(3, 4 << 20);
    files::put(&w.files, "/t/master.raw", &master, 0o644).await;
    files::put(&w.files, "/t/data/disk.raw", &vec![0u8; 1 << 20], 0o644).await;
    let def = r#"name = "guest"
driver = "qemu"
image = "/t/master.raw"
datasets = ["/t/data/disk.raw"]
kernel = "/t/vmlinuz"
initrd = "/t/initrd"
append = "console=ttyS0 panic=-1 locus.token=fromlocus locus.sleep=8"
vcpus = 1
memory_mib = 256
[customize]
hostname = "guest-{index}"
"#;
    let (code, out, err) = w.apply(def);
    assert_eq!(code, 0, "{out}{err}");
    phase("it runs: a checkpoint saves its memory and a snapshot of its disk layer into Locus");
    wait_vms(&w.client(), "guest", Duration::from_secs(120), "guest-1 running", |v| {
        v.len() == 1 && v[0].status == VmStatus::Running
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", w.diagnostics()));
    let (code, out, err) = w.cli(&["--json", "vm", "checkpoint", "guest-1", "--wait-s", "120"]);
    assert_eq!(code, 0, "checkpoint: {out}{err}\n{}", w.diagnostics());
    let ck: CheckpointRecord = serde_json::from_str(&out).expect("checkpoint json");
    assert_eq!(ck.n, 1);
    let mem = w.files.meta().resolve(ck.memory.as_bytes(), true).await.expect("memory file in Locus");
    assert!(mem.size > 1 << 20 && mem.size == ck.memory_bytes, "{mem:?}");
    let snap = w.files.meta().resolve(ck.disk.as_bytes(), true).await.expect("disk snapshot in Locus");
    assert_eq!(&w.files.read(snap.ino, 0, 4).await.expect("snapshot")[..], b"QFI\xfb");
    let (code, _, err) = w.cli(&["vm", "checkpoint", "no-such-vm"]);
    assert!(code == 1 && err.contains("NotFound"), "{err}");

    phase("the guest runs on after the checkpoint, writes its marker to every disk and powers off");
    let v = wait_vms(&w.client(), "guest", Duration::from_secs(180), "guest-1 ended", |v| {
        v.len() == 1 && matches!(v[0].status, VmStatus::Stopped { .. } | VmStatus::Failed { .. })
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", w.diagnostics()));
    assert!(matches!(v[0].status, VmStatus::Stopped { .. }), "{:?}", v[0].status);
    let disk = w.files.meta().resolve(b"/t/data/disk.raw", true).await.expect("disk");
    w.files.invalidate(disk.ino);
    let data = w.files.read(disk.ino, 0, 64).await.expect("read");
    let text = String::from_utf8_lossy(&data);
    assert!(text.starts_with("LOCUS-DISK vdb fromlocus"), "the guest's write is not there: {text:?}");
    let m = w.files.meta().resolve(b"/t/master.raw", true).await.expect("master");
    w.files.invalidate(m.ino);
    assert_eq!(files::read_all(&w.files, m.ino).await, master, "the master image changed");
    let overlay = w.files.meta().resolve(b"/vms/guest/guest-1/disk.qcow2", true).await.expect("overlay in Locus");
    let head = w.files.read(overlay.ino, 0, 4).await.expect("overlay");
    assert_eq!(&head[..], b"QFI\xfb", "the VM's layer is not a qcow2 image");
    assert!(overlay.size > 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, logs, _) = w.cli(&["vm", "logs", "guest-1"]);
        if logs.contains("LOCUS-DISK-WRITTEN vda") {
            break;
        }
        assert!(Instant::now() < deadline, "console log in Locus lacks the guest's output:\n{logs}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Goal: a host that is only cut off from the network (alive, its agent
/// running) stops its VMs before they run elsewhere, and does not take them
/// back when the link returns. Method: every server listens on a bridge
/// address; host 1 runs in its own network namespace on that bridge, and
/// the test sets its link down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_host_stops_its_vms_before_they_run_elsewhere() {
    if !netns::available() {
        eprintln!("SKIPPED: needs root and iproute2 for network namespaces");
        return;
    }
    init_logging();
    let net = netns::Net::new(1).expect("namespaces");
    phase("a cluster on the bridge address; host-1 alone, in its own namespace");
    let opts = ClusterOptions { ip: Some(net.bridge_addr()), ..Default::default() };
    let cluster = Cluster::start(opts).await.expect("cluster");
    let mut hosts = Hosts::none(&cluster);
    hosts.add(&cluster, 1, 8, 8192, Some(net.ns(0))).expect("host-1");
    hosts.wait_up(1, Duration::from_secs(30)).await.unwrap_or_else(|e| panic!("{e}"));
    let files = cluster.files();
    let c = cluster.client();
    let t = mkdir(&c, ROOT_INO, "t").await;
    mkdir(&c, t, "data").await;
    files::put(&files, "/t/app.sh", APP.as_bytes(), 0o755).await;
    files::put(&files, "/t/image", &files::pattern(1, 64 << 10), 0o644).await;
    files::put(&files, "/t/data/set", &files::pattern(2, 64 << 10), 0o644).await;
    let path = cluster.path().join("cut.toml");
    std::fs::write(&path, service("cut", "any", "")).expect("definition");
    let cfg = cluster.write_cli_config("admin", None, 20_000);
    let (code, out, err) = locus_cli(&cfg, &["vm", "apply", path.to_str().expect("path")], None);
    assert_eq!(code, 0, "{out}{err}");
    let diag = |hosts: &Hosts| format!("{}\n{}", cluster.logs_tail(), hosts.logs_tail());
    let v = wait_vms(&c, "cut", RUNNING_TIMEOUT, "cut-1 running on host-1", |v| {
        v.len() == 1 && v[0].status == VmStatus::Running
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", diag(&hosts)));
    let first = v[0].host.expect("host");
    hosts.add(&cluster, 2, 8, 8192, None).expect("host-2");
    hosts.wait_up(2, Duration::from_secs(30)).await.unwrap_or_else(|e| panic!("{e}"));
    let before = read_text(&files, "/vms/cut/cut-1/ticks").await.unwrap_or_default();

    phase("cut host-1 off: cut-1 must be killed there before it runs on host-2");
    let sampler = CopySampler::start("cut-1");
    let started = Instant::now();
    net.cut(0).expect("cut");
    let v = wait_vms(&c, "cut", Duration::from_secs(30), "cut-1 running on host-2", |v| {
        v.len() == 1 && v[0].status == VmStatus::Running && v[0].host.is_some_and(|h| h != first)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", diag(&hosts)));
    eprintln!("failover of a cut-off host took {:?}", started.elapsed());
    let after = wait_lines(&files, "/vms/cut/cut-1/ticks", before.lines().count() + 3, || diag(&hosts)).await;
    assert!(after.starts_with(&before), "acknowledged ticks lost");

    phase("heal the link: host-1 learns it lost its lease and runs nothing");
    net.heal(0).expect("heal");
    hosts.wait_up(2, Duration::from_secs(30)).await.unwrap_or_else(|e| panic!("{e}\n{}", diag(&hosts)));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let now = vms(&c, "cut").await.expect("vms");
    assert_eq!(now[0].host, v[0].host, "cut-1 moved back");
    assert_eq!(sampler.finish(), 1, "cut-1 ran twice at once");
    assert_eq!(vm_copies("cut-1").len(), 1);
}
