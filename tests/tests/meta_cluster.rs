//! Fault tests of the metadata cluster: real `locus-server meta` processes.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fs_client::proto::*;
use fs_client::{ClientError, MetaClient};
use locus_tests::{init_logging, locus_cli, phase, walk, MetaCluster, MetaOptions};

fn mkdir(parent: Ino, name: &str) -> MetaOp {
    MetaOp::Mkdir { parent, name: name.into(), perm: 0o755, caller: Caller::ROOT }
}

fn create(parent: Ino, name: &str) -> MetaOp {
    MetaOp::Create { parent, name: name.into(), perm: 0o644, caller: Caller::ROOT, exclusive: true }
}

/// Waits until at least `n` creates are acknowledged (20 s at most).
async fn wait_acks(acked: &Mutex<Vec<String>>, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while acked.lock().unwrap().len() < n {
        assert!(Instant::now() < deadline, "only {} of {n} creates acknowledged", acked.lock().unwrap().len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn code(e: &ClientError) -> ErrorCode {
    e.code()
}

/// Goal: a new leader serves soon after the old one's kill -9 (the target
/// is 3 s; the test allows 5 on a busy machine), every acknowledged create
/// survives, and none is applied twice.
/// Method: 8 writers create unique files (exclusive create, so a second
/// application would answer EEXIST) while the leader is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kill_under_write_load_loses_nothing() {
    init_logging();
    let mut cluster = MetaCluster::start(MetaOptions::default()).await.expect("cluster");
    let client = cluster.client();
    let dir = client.op_attr(mkdir(ROOT_INO, "load")).await.expect("mkdir").ino;

    phase("8 writers create files steadily; every acknowledged create is recorded");
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    // (issued, acknowledged) of every acknowledged create.
    let times: Arc<Mutex<Vec<(Instant, Instant)>>> = Arc::default();
    let mut writers = Vec::new();
    for w in 0..8 {
        let (client, stop, acked, failures, times) =
            (client.clone(), stop.clone(), acked.clone(), failures.clone(), times.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let name = format!("w{w}-{i}");
                let issued = Instant::now();
                match client.op(create(dir, &name)).await {
                    Ok(_) => {
                        acked.lock().unwrap().push(name);
                        times.lock().unwrap().push((issued, Instant::now()));
                    }
                    Err(e) => failures.lock().unwrap().push(format!("{name}: {e} ({})", code(&e))),
                }
                i += 1;
            }
        }));
    }
    // Writes flow before the kill.
    wait_acks(&acked, 200).await;

    phase("kill -9 the leader; a new leader must serve writes (target 3 s, bound 5 s)");
    let leader = cluster.wait_leader(None, Duration::from_secs(5)).await.expect("leader");
    cluster.kill(leader);
    // The process is gone: a create issued from now on can only be
    // acknowledged by a new leader.
    let killed_at = Instant::now();
    let new_leader = cluster.wait_leader(Some(leader), Duration::from_secs(10)).await.expect("new leader");
    eprintln!("new leader {new_leader} seen {:?} after the kill", killed_at.elapsed());
    let served_at = loop {
        let first = times.lock().unwrap().iter().filter(|(issued, _)| *issued > killed_at).map(|(_, done)| *done).min();
        if let Some(t) = first {
            break t;
        }
        assert!(killed_at.elapsed() < Duration::from_secs(10), "no write acknowledged 10 s after the kill");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let failover = served_at.duration_since(killed_at);
    eprintln!("old leader {leader}, new leader {new_leader}, writes served again after {failover:?}");
    // The target is 3 s (about 2 s on an idle machine); the bound leaves
    // room for a machine busy with other tests (3.2 s was seen), and still
    // fails a failover that waits on anything but the election.
    assert!(failover < Duration::from_secs(5), "failover took {failover:?}");

    // Writes flow through the new leader for a while.
    let before = acked.lock().unwrap().len();
    wait_acks(&acked, before + 200).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }

    phase("every acknowledged create exists, none failed with EEXIST");
    let failures = failures.lock().unwrap().clone();
    assert!(failures.iter().all(|f| !f.contains("Exists")), "a create was applied twice: {failures:?}");
    let names: HashSet<Vec<u8>> = client.readdir_all(dir).await.expect("readdir").into_iter().map(|e| e.name).collect();
    let acked = acked.lock().unwrap().clone();
    for a in &acked {
        assert!(names.contains(a.as_bytes()), "acknowledged {a} is missing");
    }
    eprintln!("{} creates acknowledged, {} present, {} failed", acked.len(), names.len(), failures.len());
    // Anything present beyond the acknowledged ones was in flight at the kill.
    assert!(names.len() - acked.len() <= 8 * 2, "too many unacknowledged creates present");

    phase("restart the old leader; it rejoins and catches up");
    cluster.restart(leader).unwrap();
    let target = cluster.status_of(new_leader).await.unwrap().last_log_index;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(s) = cluster.status_of(leader).await {
            if s.applied_index >= target {
                break;
            }
        }
        assert!(Instant::now() < deadline, "restarted node did not catch up\n{}", cluster.logs_tail());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Goal: state survives a restart of every node at once (kill -9 all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_every_node_keeps_state() {
    init_logging();
    let mut cluster = MetaCluster::start(MetaOptions::default()).await.expect("cluster");
    let client = cluster.client();
    phase("build a small tree with links, symlinks and xattrs");
    let a = client.op_attr(mkdir(ROOT_INO, "a")).await.unwrap().ino;
    let f = client.op_attr(create(a, "f")).await.unwrap().ino;
    client.op(MetaOp::Link { ino: f, new_parent: ROOT_INO, new_name: "hard".into() }).await.unwrap();
    client
        .op(MetaOp::Symlink { parent: ROOT_INO, name: "sym".into(), target: "a/f".into(), caller: Caller::ROOT })
        .await
        .unwrap();
    client.op(MetaOp::SetXattr { ino: f, name: "user.k".into(), value: "v".into(), flags: 0 }).await.unwrap();
    for i in 0..200 {
        client.op(create(a, &format!("n{i}"))).await.unwrap();
    }
    let before = walk(&client).await.unwrap();

    phase("kill -9 all three nodes, start them again: the same tree is served");
    for id in 1..=3 {
        cluster.kill(id);
    }
    for id in 1..=3 {
        cluster.restart(id).unwrap();
    }
    cluster.wait_ready(Duration::from_secs(30)).await.unwrap();
    let client = cluster.client();
    let after = walk(&client).await.unwrap();
    assert_eq!(before, after);
    let x = client.read(MetaRead::GetXattr { ino: f, name: "user.k".into() }).await.unwrap();
    assert_eq!(x, ReadReply::Xattr(b"v".to_vec()));
    assert_eq!(client.resolve(b"/sym", true).await.unwrap().ino, f);
}

/// Goal: a node that missed more than the retained log catches up by
/// receiving a snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_node_catches_up_by_snapshot() {
    init_logging();
    let opts = MetaOptions { snapshot_every: Some(200), keep_logs: Some(20), ..Default::default() };
    let mut cluster = MetaCluster::start(opts).await.expect("cluster");
    let leader = cluster.wait_leader(None, Duration::from_secs(5)).await.unwrap();
    let lagger = (1..=3).find(|&i| i != leader).unwrap();

    phase(&format!("stop node {lagger}; write 1500 entries; the leader snapshots and purges its log"));
    cluster.kill(lagger);
    let client = cluster.client();
    let d = client.op_attr(mkdir(ROOT_INO, "d")).await.unwrap().ino;
    for i in 0..1500 {
        client.op(create(d, &format!("f{i}"))).await.unwrap();
    }
    client.admin(AdminOp::Snapshot).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    phase(&format!("restart node {lagger}: it must install a snapshot and reach the leader's index"));
    cluster.restart(lagger).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let target = cluster.status_of(leader).await.unwrap().last_log_index;
    let status = loop {
        if let Ok(s) = cluster.status_of(lagger).await {
            if s.applied_index >= target {
                break s;
            }
        }
        assert!(Instant::now() < deadline, "lagging node did not catch up\n{}", cluster.logs_tail());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.snapshot_index.is_some(), "caught up without a snapshot: {status:?}");
    let log = std::fs::read_to_string(&cluster.nodes[&lagger].log).unwrap();
    assert!(log.contains("installed snapshot"), "node log shows no snapshot install");

    phase("the caught-up node serves the same namespace when it leads");
    for id in (1..=3).filter(|&i| i != lagger) {
        if cluster.leader().await == Some(id) {
            cluster.kill(id);
            cluster.restart(id).unwrap();
        }
    }
    cluster.wait_ready(Duration::from_secs(30)).await.unwrap();
    assert_eq!(client.readdir_all(d).await.unwrap().len(), 1500);
}

/// Goal: a cut-off minority accepts no writes; after healing, one history.
/// Method: nodes in network namespaces; the leader's link is cut; a CLI run
/// inside its namespace tries to write through it and must fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_minority_accepts_no_writes() {
    init_logging();
    if !locus_tests::netns::available() {
        panic!("this test needs root and iproute2 to make network namespaces");
    }
    let net = locus_tests::netns::Net::new(3).expect("namespaces");
    let port = locus_tests::free_port();
    let addrs: Vec<std::net::SocketAddr> = (0..3).map(|i| std::net::SocketAddr::new(net.addr(i), port)).collect();
    let opts = MetaOptions {
        addrs: Some(addrs.clone()),
        netns: Some((0..3).map(|i| net.ns(i)).collect()),
        ..Default::default()
    };
    let cluster = MetaCluster::start(opts).await.expect("cluster");
    let client = cluster.client();
    client.op(mkdir(ROOT_INO, "before")).await.unwrap();
    let old = cluster.wait_leader(None, Duration::from_secs(5)).await.unwrap();
    let idx = (old - 1) as usize;

    phase(&format!("cut node {old} (the leader) off; the other two elect a leader and take writes"));
    net.cut(idx).unwrap();
    let majority_write = async {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match client.op(mkdir(ROOT_INO, "majority")).await {
                Ok(_) => return,
                Err(e) if Instant::now() < deadline => eprintln!("majority write not yet: {e}"),
                Err(e) => panic!("majority side took no write: {e}"),
            }
        }
    };
    majority_write.await;

    phase(&format!("a client inside node {old}'s namespace writes through it: refused"));
    let cfg = cluster.write_cli_config("admin", Some(vec![addrs[idx].to_string()]), 4000);
    let (code, _out, err) = locus_cli(&cfg, &["fs", "mkdir", "/minority"], Some(&net.ns(idx)));
    assert_ne!(code, 0, "the minority accepted a write: {err}");
    eprintln!("minority write refused (exit {code}): {}", err.trim());

    phase("a read through the cut-off old leader is refused, never answered from its stale state");
    let (code, out, err) = locus_cli(&cfg, &["fs", "ls", "/"], Some(&net.ns(idx)));
    assert!(code != 0 || out.contains("majority"), "stale read from the old leader: {out}");
    eprintln!("minority read refused (exit {code}): {}", err.trim());

    phase("heal: one history remains, with the majority's write and without the minority's");
    net.heal(idx).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let leader_log = loop {
        let mut applied = BTreeSet::new();
        for id in 1..=3 {
            if let Ok(s) = cluster.status_of(id).await {
                applied.insert(s.applied_index);
            }
        }
        if applied.len() == 1 {
            break applied;
        }
        assert!(Instant::now() < deadline, "nodes did not converge: {applied:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("all nodes at applied index {leader_log:?}");
    let names: Vec<String> = client
        .readdir_all(ROOT_INO)
        .await
        .unwrap()
        .into_iter()
        .map(|e| String::from_utf8_lossy(&e.name).into_owned())
        .collect();
    assert!(names.contains(&"before".into()) && names.contains(&"majority".into()), "{names:?}");
    assert!(!names.contains(&"minority".into()), "the minority's write survived: {names:?}");
    drop(cluster);
    drop(net);
}

/// Goal: concurrent renames and creates keep the namespace a tree, with no
/// entry lost or duplicated.
/// Method: 6 clients create uniquely named files and move them and some
/// directories around at random among shared directories; every
/// acknowledged operation updates a model of where each file must be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_renames_keep_a_tree() {
    init_logging();
    let cluster = MetaCluster::start(MetaOptions::default()).await.expect("cluster");
    let client = cluster.client();
    let mut dirs = Vec::new();
    for i in 0..4 {
        dirs.push(client.op_attr(mkdir(ROOT_INO, &format!("d{i}"))).await.unwrap().ino);
    }
    // Subdirectories that get moved between the top directories.
    let mut movable = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        movable.push(client.op_attr(mkdir(*d, &format!("m{i}"))).await.unwrap().ino);
    }

    phase("6 clients: create files, move them between directories, move directories");
    // file name -> directory it must be in, per the acknowledged operations.
    let model: Arc<Mutex<BTreeMap<String, Ino>>> = Arc::default();
    let mut tasks = Vec::new();
    for w in 0..6u64 {
        let (client, model) = (cluster.client(), model.clone());
        let all: Vec<Ino> = dirs.iter().chain(movable.iter()).copied().collect();
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(w);
            use rand::{Rng, SeedableRng};
            let mut mine: Vec<(String, Ino)> = Vec::new();
            for i in 0..150 {
                let roll = rng.gen_range(0..10);
                if roll < 4 || mine.is_empty() {
                    let d = all[rng.gen_range(0..all.len())];
                    let name = format!("f{w}-{i}");
                    client.op(create(d, &name)).await.expect("create");
                    model.lock().unwrap().insert(name.clone(), d);
                    mine.push((name, d));
                } else if roll < 8 {
                    let k = rng.gen_range(0..mine.len());
                    let to = all[rng.gen_range(0..all.len())];
                    let (name, from) = mine[k].clone();
                    let r = client
                        .op(MetaOp::Rename {
                            parent: from,
                            name: name.clone().into(),
                            new_parent: to,
                            new_name: name.clone().into(),
                            flags: 0,
                        })
                        .await;
                    r.expect("rename of my own file");
                    model.lock().unwrap().insert(name.clone(), to);
                    mine[k].1 = to;
                } else {
                    // Move a movable directory under another top directory (or
                    // try into another movable one: may be refused as a cycle).
                    let m = rng.gen_range(0..4);
                    let name = format!("m{m}");
                    let to = all[rng.gen_range(0..all.len())];
                    for from in all.iter() {
                        let r = client
                            .op(MetaOp::Rename {
                                parent: *from,
                                name: name.clone().into(),
                                new_parent: to,
                                new_name: name.clone().into(),
                                flags: 0,
                            })
                            .await;
                        match r {
                            Ok(_) => break,
                            Err(e)
                                if matches!(
                                    e.code(),
                                    ErrorCode::NotFound | ErrorCode::Invalid | ErrorCode::NotEmpty
                                ) => {}
                            Err(e) => panic!("unexpected rename error: {e}"),
                        }
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }

    phase("the namespace is a tree and every file is exactly where the model says");
    let tree = walk(&client).await.expect("walk: the namespace must be a tree");
    let model = model.lock().unwrap().clone();
    let mut found: BTreeMap<String, Vec<(String, Ino)>> = BTreeMap::new();
    for (path, attr) in &tree {
        let name = path.rsplit('/').next().unwrap().to_string();
        if name.starts_with('f') {
            let parent_path = &path[..path.len() - name.len() - 1];
            let parent_ino = if parent_path.is_empty() { ROOT_INO } else { tree[parent_path].ino };
            found.entry(name).or_default().push((path.clone(), parent_ino));
        }
        if attr.kind == FileKind::Dir {
            let subdirs = tree
                .iter()
                .filter(|(p, a)| a.kind == FileKind::Dir && p.rsplit_once('/').map(|x| x.0) == Some(path.as_str()))
                .count() as u32;
            assert_eq!(attr.nlink, 2 + subdirs, "nlink of {path}");
        }
    }
    assert_eq!(found.len(), model.len(), "files lost or invented");
    for (name, dir) in &model {
        let at = &found[name];
        assert_eq!(at.len(), 1, "{name} appears {} times: {at:?}", at.len());
        assert_eq!(at[0].1, *dir, "{name} is in the wrong directory");
    }
    // All 4 movable directories are still reachable exactly once.
    let movable_found = tree.iter().filter(|(p, _)| p.rsplit('/').next().unwrap().starts_with('m')).count();
    assert_eq!(movable_found, 4);
}

/// Goal: bad names are refused with a clear error and change nothing; a
/// client without a certificate of this cluster gets nothing; a client
/// certificate cannot administer the cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_and_bad_certificates_are_refused() {
    init_logging();
    let cluster = MetaCluster::start(MetaOptions::default()).await.expect("cluster");
    let client = cluster.client();
    client.op(mkdir(ROOT_INO, "keep")).await.unwrap();
    let before = walk(&client).await.unwrap();

    phase("bad names through the library: Invalid or NameTooLong, nothing changes");
    let long = "n".repeat(256);
    for (name, want) in [
        ("", ErrorCode::Invalid),
        (".", ErrorCode::Invalid),
        ("..", ErrorCode::Invalid),
        ("a/b", ErrorCode::Invalid),
        ("a\0b", ErrorCode::Invalid),
        (&long[..], ErrorCode::NameTooLong),
    ] {
        let e = client.op(mkdir(ROOT_INO, name)).await.unwrap_err();
        assert_eq!(e.code(), want, "mkdir {name:?}");
        let e = client.op(create(ROOT_INO, name)).await.unwrap_err();
        assert_eq!(e.code(), want, "create {name:?}");
    }
    assert_eq!(walk(&client).await.unwrap(), before);

    phase("bad input through the CLI: exit 1 with a message naming the problem");
    let cfg = cluster.write_cli_config("admin", None, 10_000);
    let (code, _, err) = locus_cli(&cfg, &["fs", "mkdir", &format!("/{long}")], None);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("exceeds 255"), "{err}");
    let (code, _, err) = locus_cli(&cfg, &["fs", "rm", "/keep"], None);
    assert_eq!(code, 1);
    assert!(err.contains("is a directory"), "{err}");
    let (code, _, err) = locus_cli(&cfg, &["--json", "fs", "stat", "/nope"], None);
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(err.trim()).expect("json error");
    assert_eq!(v["error"]["code"], "NotFound");
    assert_eq!(v["error"]["errno"], libc::ENOENT);
    let (code, _, _) = locus_cli(&cfg, &["fs", "chmod", "99x", "/keep"], None);
    assert_eq!(code, 2, "a malformed mode is a usage error");
    assert_eq!(walk(&client).await.unwrap(), before);

    phase("a certificate from another CA: refused at the handshake");
    let other = tempfile::tempdir().unwrap();
    fs_client::tls::init_cluster_certs(other.path(), 1, 0, &["127.0.0.1".parse().unwrap()]).unwrap();
    let mut cfg = cluster.client_config("admin");
    cfg.cert = other.path().join("admin.pem");
    cfg.key = other.path().join("admin.key");
    cfg.timeout_ms = 3000;
    let stranger = MetaClient::new(&cfg).unwrap();
    let e = stranger.read(MetaRead::StatFs).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::Unavailable, "{e}");

    phase("a client certificate may read and write but not administer");
    let plain = MetaClient::new(&cluster.client_config("client")).unwrap();
    plain.read(MetaRead::StatFs).await.unwrap();
    let e = plain.admin(AdminOp::RemoveNode { id: 1 }).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::Unauthorized);
}

/// Names the change stream's next item sets in the root directory (none
/// for `Idle`). Fails at `deadline` (a stream that skipped changes only
/// idles), at the end of the stream, and on snapshot markers.
async fn root_names(stream: &mut fs_client::client::ChangeStream, deadline: tokio::time::Instant) -> Vec<String> {
    match tokio::time::timeout_at(deadline, stream.next()).await.expect("stream stalled or skipped changes").unwrap() {
        Some(StreamItem::Changes { changes, .. }) => changes
            .into_iter()
            .filter_map(|c| match c {
                Change::EntrySet { parent: ROOT_INO, name, .. } => Some(String::from_utf8(name).unwrap()),
                _ => None,
            })
            .collect(),
        Some(StreamItem::Idle { .. }) => Vec::new(),
        other => panic!("unexpected {other:?}"),
    }
}

/// Goal: the change stream delivers every applied change in order, resumes
/// from where it stopped, and starts with a snapshot when history is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_stream_resumes_and_falls_back_to_snapshot() {
    init_logging();
    let opts = MetaOptions { change_history: Some(50), ..Default::default() };
    let cluster = MetaCluster::start(opts).await.expect("cluster");
    let client = cluster.client();

    phase("subscribe from 1, make 20 directories, see each EntrySet in order");
    let mut stream = client.subscribe(1).await.unwrap();
    for i in 0..20 {
        client.op(mkdir(ROOT_INO, &format!("s{i:02}"))).await.unwrap();
    }
    // Each phase has a deadline, so a stream that only sends Idle (one
    // that skipped changes) fails the test instead of hanging it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    let mut last_index = 0;
    while seen.len() < 20 {
        match tokio::time::timeout_at(deadline, stream.next())
            .await
            .expect("stream stalled or skipped changes")
            .unwrap()
        {
            Some(StreamItem::Changes { index, changes }) => {
                assert!(index > last_index, "indexes go forward");
                last_index = index;
                for c in changes {
                    if let Change::EntrySet { parent: ROOT_INO, name, .. } = c {
                        seen.push(String::from_utf8(name).unwrap());
                    }
                }
            }
            Some(_) => {}
            None => panic!("stream ended"),
        }
    }
    let want: Vec<String> = (0..20).map(|i| format!("s{i:02}")).collect();
    assert_eq!(seen, want);
    drop(stream);

    phase("disconnected: 10 more changes; resuming from the next index gets exactly those");
    for i in 20..30 {
        client.op(mkdir(ROOT_INO, &format!("s{i:02}"))).await.unwrap();
    }
    let mut stream = client.subscribe(last_index + 1).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut resumed = Vec::new();
    while resumed.len() < 10 {
        resumed.extend(root_names(&mut stream, deadline).await);
    }
    let want: Vec<String> = (20..30).map(|i| format!("s{i:02}")).collect();
    assert_eq!(resumed, want);
    drop(stream);

    phase("push history past retention (50 entries); subscribing from 1 starts with a snapshot");
    for i in 0..120 {
        client.op(create(ROOT_INO, &format!("x{i}"))).await.unwrap();
    }
    let mut stream = client.subscribe(1).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let first = tokio::time::timeout_at(deadline, stream.next()).await.expect("no snapshot").unwrap();
    let Some(StreamItem::SnapshotBegin { index }) = first else { panic!("expected a snapshot, got {first:?}") };
    let mut entries = HashSet::new();
    loop {
        match tokio::time::timeout_at(deadline, stream.next()).await.expect("snapshot stalled").unwrap() {
            Some(StreamItem::Changes { changes, .. }) => {
                for c in changes {
                    if let Change::EntrySet { parent: ROOT_INO, name, .. } = c {
                        entries.insert(String::from_utf8(name).unwrap());
                    }
                }
            }
            Some(StreamItem::SnapshotEnd { index: end }) => {
                assert_eq!(end, index);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // A follower may serve the stream a moment behind the last acknowledged
    // write: the rest must follow as ordinary changes after the snapshot.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while entries.len() < 30 + 120 {
        match tokio::time::timeout_at(deadline, stream.next())
            .await
            .expect("stream stalled or skipped changes")
            .unwrap()
        {
            Some(StreamItem::Changes { index: i, changes }) => {
                assert!(i > index, "changes after the snapshot come after its index");
                for c in changes {
                    if let Change::EntrySet { parent: ROOT_INO, name, .. } = c {
                        entries.insert(String::from_utf8(name).unwrap());
                    }
                }
            }
            Some(StreamItem::Idle { .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(entries.len(), 30 + 120, "snapshot plus later changes hold the whole root directory");

    phase("changes made while the stream runs all arrive: none is skipped between a scan and a wake-up");
    let writer = {
        let client = client.clone();
        tokio::spawn(async move {
            for i in 0..200 {
                client.op(mkdir(ROOT_INO, &format!("w{i:03}"))).await.unwrap();
            }
        })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut live = BTreeSet::new();
    while live.len() < 200 {
        live.extend(root_names(&mut stream, deadline).await);
    }
    writer.await.unwrap();
}

/// Goal: a leader that stops without dying (SIGSTOP: a hung process) is
/// replaced as a dead one is, and once it runs again it never answers
/// from the state it had: its read lease lapsed while it was stopped.
/// Method: stop the leader; a create through the usual client must be
/// acknowledged (by a new leader); resume it and, at once, read the new
/// name through a client that knows only the old leader's address (it
/// answers or sends the client on, never "not found").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_leader_is_replaced_and_never_answers_stale() {
    init_logging();
    let mut cluster = MetaCluster::start(MetaOptions::default()).await.expect("cluster");
    let client = cluster.client();
    let dir = client.op_attr(mkdir(ROOT_INO, "d")).await.expect("mkdir").ino;
    // Reads through the leader-to-be-stopped are served under its lease.
    client.lookup(ROOT_INO, b"d").await.expect("lookup");

    phase("SIGSTOP the leader; a create must still be acknowledged");
    let leader = cluster.wait_leader(None, Duration::from_secs(5)).await.expect("leader");
    let old_addr = cluster.node(leader).addr.to_string();
    cluster.pause(leader);
    let created = match tokio::time::timeout(Duration::from_secs(30), client.op_attr(create(dir, "during"))).await {
        Ok(r) => r.expect("create with the leader stopped"),
        Err(_) => panic!("a create hung with the leader stopped\n{}", cluster.logs_tail()),
    };

    phase("resume it; reads through it see the new name");
    cluster.resume(leader);
    let mut cfg = cluster.client_config("admin");
    cfg.meta = vec![old_addr];
    let via_old = MetaClient::new(&cfg).expect("client");
    let until = Instant::now() + Duration::from_secs(3);
    let mut reads = 0;
    while Instant::now() < until {
        match via_old.lookup(dir, b"during").await {
            Ok(a) => assert_eq!(a.ino, created.ino),
            Err(e) => panic!("read {reads} through the resumed old leader: {e}\n{}", cluster.logs_tail()),
        }
        reads += 1;
    }
    assert!(reads > 0);

    phase("a write through it lands, and it catches up");
    via_old.op_attr(create(dir, "after")).await.expect("create through the old leader's address");
    client.lookup(dir, b"after").await.expect("the write is visible everywhere");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now_leader = cluster.wait_leader(None, Duration::from_secs(5)).await.expect("leader");
        let target = cluster.status_of(now_leader).await.unwrap().last_log_index;
        if let Ok(s) = cluster.status_of(leader).await {
            if s.applied_index >= target {
                break;
            }
        }
        assert!(Instant::now() < deadline, "the resumed node did not catch up\n{}", cluster.logs_tail());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
