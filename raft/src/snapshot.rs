//! Snapshot files: the whole state machine key space at one log position.
//!
//! Layout: `MAGIC | version u32 | meta_len u32 | meta | records | END | blake3(all before)`
//! where a record is `key_len u32 | key | value_len u32 | value` and `END` is
//! a key length of `u32::MAX`. Every length is little endian. A file is only
//! trusted after its trailing checksum matches.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::types::SnapshotMeta;

const MAGIC: &[u8; 8] = b"LOCUSSNP";
const VERSION: u32 = 1;
const END: u32 = u32::MAX;
/// No key or value in a snapshot may be larger than this.
pub const MAX_RECORD_BYTES: u32 = 64 << 20;
const MAX_META_BYTES: u32 = 16 << 20;

/// An open snapshot file. Held open so a transfer can go on while a newer
/// snapshot replaces it on disk.
#[derive(Debug)]
pub struct SnapshotFile {
    pub path: PathBuf,
    pub file: File,
}

impl SnapshotFile {
    pub fn open(path: &Path) -> io::Result<Self> {
        Ok(SnapshotFile { path: path.to_path_buf(), file: File::open(path)? })
    }

    pub fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    pub fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// A fresh reader from the start of the file.
    pub fn reader(&self) -> io::Result<BufReader<File>> {
        let mut f = self.file.try_clone()?;
        f.seek(SeekFrom::Start(0))?;
        Ok(BufReader::with_capacity(1 << 20, f))
    }
}

/// Hashes everything written through it.
struct HashingWriter<W: Write> {
    inner: W,
    hasher: blake3::Hasher,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes a snapshot file record by record.
pub struct SnapshotWriter {
    out: HashingWriter<BufWriter<File>>,
    path: PathBuf,
    records: u64,
}

impl SnapshotWriter {
    pub fn create(path: &Path, meta: &SnapshotMeta) -> io::Result<Self> {
        let file = File::create(path)?;
        let mut out = HashingWriter { inner: BufWriter::with_capacity(1 << 20, file), hasher: blake3::Hasher::new() };
        let meta_bytes = postcard::to_allocvec(meta).map_err(io::Error::other)?;
        out.write_all(MAGIC)?;
        out.write_all(&VERSION.to_le_bytes())?;
        out.write_all(&(meta_bytes.len() as u32).to_le_bytes())?;
        out.write_all(&meta_bytes)?;
        Ok(SnapshotWriter { out, path: path.to_path_buf(), records: 0 })
    }

    pub fn record(&mut self, key: &[u8], value: &[u8]) -> io::Result<()> {
        if key.len() as u64 >= MAX_RECORD_BYTES as u64 || value.len() as u64 >= MAX_RECORD_BYTES as u64 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "snapshot record too large"));
        }
        self.out.write_all(&(key.len() as u32).to_le_bytes())?;
        self.out.write_all(key)?;
        self.out.write_all(&(value.len() as u32).to_le_bytes())?;
        self.out.write_all(value)?;
        self.records += 1;
        Ok(())
    }

    /// Writes the end marker and checksum and makes the file durable.
    pub fn finish(mut self) -> io::Result<(PathBuf, u64)> {
        self.out.write_all(&END.to_le_bytes())?;
        let hash = self.out.hasher.finalize();
        let mut inner = self.out.inner;
        inner.write_all(hash.as_bytes())?;
        let file = inner.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok((self.path, self.records))
    }
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("snapshot file: {msg}"))
}

/// Checks the whole file's checksum and returns its metadata.
pub fn verify(file: &SnapshotFile) -> io::Result<SnapshotMeta> {
    let len = file.len()?;
    if len < 8 + 4 + 4 + 4 + 32 {
        return Err(bad("too short"));
    }
    let mut r = file.reader()?;
    let mut hasher = blake3::Hasher::new();
    let mut remaining = len - 32;
    let mut buf = vec![0u8; 1 << 20];
    while remaining > 0 {
        let n = (remaining as usize).min(buf.len());
        r.read_exact(&mut buf[..n])?;
        hasher.update(&buf[..n]);
        remaining -= n as u64;
    }
    let mut want = [0u8; 32];
    r.read_exact(&mut want)?;
    if hasher.finalize().as_bytes() != &want {
        return Err(bad("checksum mismatch"));
    }
    let (meta, _) = open_records(file)?;
    Ok(meta)
}

/// Reads the header; returns the metadata and a reader positioned at the
/// first record. Call [`verify`] first for untrusted files.
pub fn open_records(file: &SnapshotFile) -> io::Result<(SnapshotMeta, RecordReader)> {
    let mut r = file.reader()?;
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)?;
    if &magic != MAGIC {
        return Err(bad("bad magic"));
    }
    let version = read_u32(&mut r)?;
    if version != VERSION {
        return Err(bad(&format!("unsupported version {version}")));
    }
    let meta_len = read_u32(&mut r)?;
    if meta_len > MAX_META_BYTES {
        return Err(bad("metadata too large"));
    }
    let mut meta = vec![0u8; meta_len as usize];
    r.read_exact(&mut meta)?;
    let meta: SnapshotMeta = postcard::from_bytes(&meta).map_err(|e| bad(&e.to_string()))?;
    Ok((meta, RecordReader { r, done: false }))
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

/// Iterates over the key-value records of a snapshot.
pub struct RecordReader {
    r: BufReader<File>,
    done: bool,
}

impl RecordReader {
    /// The next record, or `None` after the end marker.
    pub fn next_record(&mut self) -> io::Result<Option<(Vec<u8>, Vec<u8>)>> {
        if self.done {
            return Ok(None);
        }
        let klen = read_u32(&mut self.r)?;
        if klen == END {
            self.done = true;
            return Ok(None);
        }
        if klen >= MAX_RECORD_BYTES {
            return Err(bad("key too large"));
        }
        let mut k = vec![0u8; klen as usize];
        self.r.read_exact(&mut k)?;
        let vlen = read_u32(&mut self.r)?;
        if vlen >= MAX_RECORD_BYTES {
            return Err(bad("value too large"));
        }
        let mut v = vec![0u8; vlen as usize];
        self.r.read_exact(&mut v)?;
        Ok(Some((k, v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::StoredMembership;

    fn meta() -> SnapshotMeta {
        SnapshotMeta {
            last_log_id: Some(openraft::LogId::new(openraft::CommittedLeaderId::new(3, 1), 42)),
            last_membership: StoredMembership::default(),
            snapshot_id: "s1".into(),
        }
    }

    #[test]
    fn roundtrip_and_corruption_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let mut w = SnapshotWriter::create(&p, &meta()).unwrap();
        w.record(b"a", b"1").unwrap();
        w.record(b"bb", &[7u8; 5000]).unwrap();
        let (_, n) = w.finish().unwrap();
        assert_eq!(n, 2);
        let f = SnapshotFile::open(&p).unwrap();
        assert_eq!(verify(&f).unwrap(), meta());
        let (_, mut rr) = open_records(&f).unwrap();
        assert_eq!(rr.next_record().unwrap().unwrap(), (b"a".to_vec(), b"1".to_vec()));
        assert_eq!(rr.next_record().unwrap().unwrap().1.len(), 5000);
        assert!(rr.next_record().unwrap().is_none());

        // Flip one byte in the middle: the checksum must catch it.
        let mut bytes = std::fs::read(&p).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x40;
        std::fs::write(&p, &bytes).unwrap();
        let f = SnapshotFile::open(&p).unwrap();
        assert!(verify(&f).is_err());
    }
}
