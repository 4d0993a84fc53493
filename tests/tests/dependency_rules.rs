//! The workspace's dependency rules, checked against `cargo metadata`.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

/// Package name -> names of its normal (non-dev) dependencies, transitively.
fn closure() -> BTreeMap<String, BTreeSet<String>> {
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1"])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .expect("run cargo metadata");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata json");
    let mut name_of = BTreeMap::new();
    for p in v["packages"].as_array().unwrap() {
        name_of.insert(p["id"].as_str().unwrap().to_string(), p["name"].as_str().unwrap().to_string());
    }
    let mut direct: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for n in v["resolve"]["nodes"].as_array().unwrap() {
        let id = n["id"].as_str().unwrap().to_string();
        let deps = n["deps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["dep_kinds"].as_array().unwrap().iter().any(|k| k["kind"].is_null()))
            .map(|d| d["pkg"].as_str().unwrap().to_string())
            .collect();
        direct.insert(id, deps);
    }
    let mut out = BTreeMap::new();
    for id in direct.keys() {
        let mut seen = BTreeSet::new();
        let mut stack = vec![id.clone()];
        while let Some(x) = stack.pop() {
            for d in &direct[&x] {
                if seen.insert(d.clone()) {
                    stack.push(d.clone());
                }
            }
        }
        out.insert(name_of[id].clone(), seen.iter().map(|i| name_of[i].clone()).collect());
    }
    out
}

const WORKSPACE: [&str; 7] = ["raft", "fs-server", "fs-client", "placement", "vmhost", "locus-tests", "locus-bench"];

#[test]
fn fs_client_never_pulls_in_the_server_or_rocksdb() {
    let c = closure();
    let deps = &c["fs-client"];
    for banned in ["fs-server", "rocksdb", "librocksdb-sys", "raft"] {
        assert!(!deps.contains(banned), "fs-client depends on {banned}");
    }
}

#[test]
fn raft_and_placement_depend_on_no_workspace_crate() {
    let c = closure();
    for krate in ["raft", "placement"] {
        for w in WORKSPACE {
            assert!(!c[krate].contains(w), "{krate} depends on {w}");
        }
    }
}

#[test]
fn placement_does_no_io() {
    let c = closure();
    for banned in ["tokio", "quinn", "rocksdb", "libc", "nix"] {
        assert!(!c["placement"].contains(banned), "placement depends on {banned}");
    }
}
