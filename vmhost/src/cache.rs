//! The host's image cache: master images downloaded once from Locus into a
//! local directory, named and verified by their blake3 hash. Every VM of a
//! service is a copy-on-write clone of its cached master; the master itself
//! is never written.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fs_client::file::FileClient;
use tokio::sync::Mutex;

/// Bytes read from Locus per request while downloading.
const PIECE: u64 = 8 << 20;
/// Pieces in flight while downloading.
const PIECES_IN_FLIGHT: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("image {path}: {source}")]
    Locus {
        path: String,
        #[source]
        source: fs_client::ClientError,
    },
    #[error("image {path}: {action} {}: {source}", local.display())]
    Local {
        path: String,
        action: &'static str,
        local: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("image {path}: blake3 is {got}, the service expects {want}: the image changed since `vm apply`")]
    Mismatch { path: String, want: String, got: String },
    #[error("image hash {0:?} is not a blake3 hex digest")]
    BadHash(String),
}

/// One host's cache. Cheap to clone.
#[derive(Clone)]
pub struct ImageCache {
    dir: PathBuf,
    files: FileClient,
    /// One download per image at a time.
    locks: Arc<std::sync::Mutex<HashMap<String, Arc<Mutex<()>>>>>,
}

impl ImageCache {
    pub fn new(dir: PathBuf, files: FileClient) -> Self {
        ImageCache { dir, files, locks: Arc::default() }
    }

    /// The local path of a cached image.
    pub fn path(&self, blake3: &str) -> PathBuf {
        self.dir.join(format!("{blake3}.img"))
    }

    /// Hashes of the cached images.
    pub fn cached(&self) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else { return Vec::new() };
        let mut out: Vec<String> = rd
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".img").map(str::to_string))
            .filter(|h| valid_hash(h))
            .collect();
        out.sort();
        out
    }

    /// The cached copy of `path`, downloading it first if needed.
    pub async fn ensure(&self, blake3: &str, path: &str) -> Result<PathBuf, CacheError> {
        if !valid_hash(blake3) {
            return Err(CacheError::BadHash(blake3.to_string()));
        }
        let local = self.path(blake3);
        if local.exists() {
            return Ok(local);
        }
        let lock = {
            let mut l = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            l.entry(blake3.to_string()).or_default().clone()
        };
        let _held = lock.lock().await;
        if local.exists() {
            return Ok(local);
        }
        self.download(blake3, path, &local).await?;
        Ok(local)
    }

    async fn download(&self, want: &str, path: &str, local: &Path) -> Result<(), CacheError> {
        let lerr = |action, source| CacheError::Local { path: path.into(), action, local: local.into(), source };
        let rerr = |source| CacheError::Locus { path: path.into(), source };
        std::fs::create_dir_all(&self.dir).map_err(|e| lerr("create the cache directory", e))?;
        let started = std::time::Instant::now();
        let attr = self.files.meta().resolve(path.as_bytes(), true).await.map_err(rerr)?;
        let size = self.files.size(attr.ino).await.map_err(rerr)?;
        let tmp = local.with_extension(format!("part{}", std::process::id()));
        let mut out = std::fs::File::create(&tmp).map_err(|e| lerr("create", e))?;
        let mut hasher = blake3::Hasher::new();
        let mut off = 0u64;
        let result: Result<(), CacheError> = async {
            while off < size {
                // Several pieces in flight, written in order.
                let mut reads = Vec::new();
                let mut o = off;
                while o < size && reads.len() < PIECES_IN_FLIGHT {
                    let len = PIECE.min(size - o);
                    reads.push(self.files.read(attr.ino, o, len));
                    o += len;
                }
                for data in futures::future::join_all(reads).await {
                    let data = data.map_err(rerr)?;
                    if data.is_empty() {
                        return Err(lerr("read", std::io::Error::other("short read from Locus")));
                    }
                    hasher.update(&data);
                    out.write_all(&data).map_err(|e| lerr("write", e))?;
                    off += data.len() as u64;
                }
            }
            let got = hasher.finalize().to_hex().to_string();
            if got != want {
                return Err(CacheError::Mismatch { path: path.into(), want: want.into(), got });
            }
            out.sync_all().map_err(|e| lerr("sync", e))?;
            Ok(())
        }
        .await;
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        // Read-only: a VM's writes go to its own layer, never here.
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o444));
        std::fs::rename(&tmp, local).map_err(|e| lerr("rename", e))?;
        tracing::info!(image = path, bytes = size, ms = started.elapsed().as_millis() as u64, "image cached");
        Ok(())
    }
}

fn valid_hash(h: &str) -> bool {
    h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}
