//! `locus up` and `locus down`: the whole local cluster from one command,
//! with its processes started together, as a user runs it.

use std::net::{TcpListener, UdpSocket};
use std::path::Path;
use std::process::Command;

use fs_client::proto::DEFAULT_BLOCK_BYTES;
use locus_tests::{bin, init_logging, locus_cli, phase};

/// A base port whose offsets `locus up` uses (UDP base+1..3 and base+11..13,
/// TCP base+101..103 and base+111..113) are all free now.
fn free_base() -> u16 {
    for _ in 0..200 {
        let base = 20_000 + rand::random::<u16>() % 40_000;
        let udp = (1..=3).chain(11..=13).all(|o| UdpSocket::bind(("127.0.0.1", base + o)).is_ok());
        let tcp = (101..=103).chain(111..=113).all(|o| TcpListener::bind(("127.0.0.1", base + o)).is_ok());
        if udp && tcp {
            return base;
        }
    }
    panic!("no free port range for locus up");
}

/// Stops the cluster however the test ends.
struct Down<'a>(&'a Path);

impl Drop for Down<'_> {
    fn drop(&mut self) {
        let _ = Command::new(bin("locus")).arg("down").arg("--data-dir").arg(self.0).output();
    }
}

/// The checksum block size in a chunk file's header (bytes 32..40).
fn block_size_of(chunk_file: &Path) -> u64 {
    let bytes = std::fs::read(chunk_file).expect("read chunk file");
    u64::from_le_bytes(bytes[32..40].try_into().expect("8 bytes"))
}

/// Goal: a cluster started in one go (metadata nodes and chunk servers at
/// once) gets its chunk and block size before anything uses them: chunk
/// servers format their stores with the cluster's block size, not one from
/// before it was recorded. (They raced: a registration that came first
/// created the root, the sizes were never recorded, and every `locus up`
/// ran with legacy 64 KiB checksum blocks: a 4 KiB write rewrote 64 KiB
/// on every replica.) `locus down` stops every process.
#[test]
fn locus_up_starts_a_cluster_with_the_recorded_geometry() {
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("cluster");
    let base = free_base();
    phase(&format!("locus up on base port {base}"));
    let out = Command::new(bin("locus"))
        .args(["up", "--hosts", "0", "--base-port", &base.to_string(), "--data-dir"])
        .arg(&data)
        .output()
        .expect("run locus up");
    let _down = Down(&data);
    assert!(
        out.status.success(),
        "locus up: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    phase("a file written now lands in chunks with the recorded block size");
    let config = data.join("client.toml");
    let local = dir.path().join("f");
    std::fs::write(&local, vec![7u8; 100_000]).expect("write local file");
    let (code, out, err) = locus_cli(&config, &["fs", "put", &local.to_string_lossy(), "/f"], None);
    assert_eq!(code, 0, "{out}{err}");
    let mut files = Vec::new();
    for i in 1..=3 {
        let chunks = data.join(format!("chunk-{i}")).join("chunks");
        for sub in std::fs::read_dir(&chunks).expect("chunk dirs") {
            for f in std::fs::read_dir(sub.expect("entry").path()).expect("chunk dir") {
                files.push(f.expect("entry").path());
            }
        }
    }
    assert_eq!(files.len(), 3, "one replica of the file's chunk on each server: {files:?}");
    for f in &files {
        assert_eq!(block_size_of(f), DEFAULT_BLOCK_BYTES, "{}", f.display());
    }
    let (code, out, err) = locus_cli(&config, &["fs", "cat", "/f"], None);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.len(), 100_000);

    phase("locus down stops every process of the cluster");
    let out = Command::new(bin("locus")).arg("down").arg("--data-dir").arg(&data).output().expect("locus down");
    assert!(out.status.success(), "locus down: {}", String::from_utf8_lossy(&out.stderr));
    let left = Command::new("pgrep").args(["-f", &data.to_string_lossy()]).output().expect("pgrep");
    assert!(left.stdout.is_empty(), "processes left: {}", String::from_utf8_lossy(&left.stdout));
}
