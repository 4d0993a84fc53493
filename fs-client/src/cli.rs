//! The `locus` command line.
//!
//! Exit codes a script can rely on:
//! - 0: success
//! - 1: the operation failed (the message and, with `--json`, the error code say why)
//! - 2: bad usage (unknown flag, malformed argument)
//! - 3: the cluster did not answer in time
//! - 4: configuration or certificate problem
//!
//! With `--json`, data goes to stdout as one JSON document and errors to
//! stderr as `{"error":{"code":"NotFound","errno":2,"message":"..."}}`.

use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use crate::chunk::ChunkClient;
use crate::client::{ClientError, MetaClient};
use crate::config::ClientConfig;
use crate::file::FileClient;
use crate::proto::*;
use crate::up;

#[derive(Parser)]
#[command(name = "locus", version, about = "Locus: a distributed filesystem with integrated VM placement")]
pub struct Cli {
    /// Client configuration (default: $LOCUS_CONFIG, else ~/.locus/client.toml).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Print data as JSON.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Work with files and directories.
    #[command(subcommand)]
    Fs(FsCmd),
    /// Inspect and change the metadata cluster.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Start a whole local cluster on loopback.
    Up(up::UpArgs),
    /// Stop the local cluster started by `locus up`.
    Down(up::DownArgs),
    /// Mount the filesystem on a directory with FUSE.
    Mount(crate::fuse::MountArgs),
    /// Unmount a FUSE mount.
    Umount(crate::fuse::UmountArgs),
    /// Export files as network block devices.
    #[command(subcommand)]
    Nbd(crate::nbd::NbdCmd),
    /// Services and their VMs: apply, ls, show, why, stop, start, rm, logs.
    #[command(subcommand)]
    Vm(crate::vmcli::VmCmd),
    /// VM hosts: ls, drain.
    #[command(subcommand)]
    Host(crate::vmcli::HostCmd),
    /// Walk through the main job on a local cluster (starts one if needed).
    Demo(crate::demo::DemoArgs),
}

#[derive(Subcommand)]
pub enum FsCmd {
    /// Create directories.
    Mkdir {
        /// Create missing parents; no error if the directory exists.
        #[arg(short, long)]
        parents: bool,
        /// Permission bits, octal.
        #[arg(short, long, default_value = "755")]
        mode: String,
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// List a directory (or show a file).
    Ls {
        /// Long format: type, mode, links, owner, size, mtime.
        #[arg(short, long)]
        long: bool,
        #[arg(default_value = "/")]
        path: PathBuf,
    },
    /// Show an inode's attributes (does not follow a final symlink).
    Stat { path: PathBuf },
    /// Rename or move; into DST when DST is a directory.
    Mv {
        src: PathBuf,
        dst: PathBuf,
        /// Fail if the destination exists.
        #[arg(short = 'n', long)]
        no_clobber: bool,
    },
    /// Remove files, or directories with -r / -d.
    Rm {
        /// Remove directories and their contents.
        #[arg(short, long)]
        recursive: bool,
        /// Remove empty directories.
        #[arg(short, long)]
        dir: bool,
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Make a hard link, or a symbolic link with -s.
    Ln {
        #[arg(short, long)]
        symbolic: bool,
        target: PathBuf,
        link: PathBuf,
    },
    /// Create empty files or update their times.
    Touch {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Change permission bits (octal).
    Chmod { mode: String, path: PathBuf },
    /// Change owner: UID or UID:GID (numeric).
    Chown { owner: String, path: PathBuf },
    /// Extended attributes.
    #[command(subcommand)]
    Xattr(XattrCmd),
    /// Copy a local file into Locus (made durable before it returns).
    Put {
        local: PathBuf,
        remote: PathBuf,
        /// No progress bar.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Copy a file out of Locus.
    Get {
        remote: PathBuf,
        local: PathBuf,
        #[arg(short, long)]
        quiet: bool,
    },
    /// Write a file's contents to stdout.
    Cat { path: PathBuf },
    /// Set a file's size (sizes take K, M, G, T suffixes), creating it if
    /// missing: `truncate /vm/disk.img 10G` makes a sparse disk image.
    Truncate {
        path: PathBuf,
        size: String,
        /// Fail if the file does not exist instead of creating it.
        #[arg(short = 'c', long)]
        no_create: bool,
    },
    /// Show each chunk of a file: id, version, replicas and where they are.
    Locate { path: PathBuf },
    /// Replication goal: copies and the failure-domain level they spread over.
    #[command(subcommand)]
    Goal(GoalCmd),
    /// Directory quotas on bytes and inodes.
    #[command(subcommand)]
    Quota(QuotaCmd),
    /// Read-only point-in-time copy of a file or directory tree (metadata
    /// only, chunks shared copy-on-write); into DST when DST is a directory.
    /// `rm -r` removes a snapshot.
    Snapshot { src: PathBuf, dst: PathBuf },
    /// Writable instant copy of a file or directory tree (metadata only,
    /// chunks shared copy-on-write); into DST when DST is a directory.
    Clone { src: PathBuf, dst: PathBuf },
}

#[derive(Subcommand)]
pub enum XattrCmd {
    Get {
        path: PathBuf,
        name: String,
    },
    Set {
        path: PathBuf,
        name: String,
        value: String,
        /// Fail if it exists.
        #[arg(long, conflicts_with = "replace")]
        create: bool,
        /// Fail if it does not exist.
        #[arg(long)]
        replace: bool,
    },
    Rm {
        path: PathBuf,
        name: String,
    },
    Ls {
        path: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum GoalCmd {
    Get {
        path: PathBuf,
    },
    /// GOAL is COPIES or COPIES:LEVEL (level host, rack or zone), e.g. 3 or 2:rack.
    Set {
        path: PathBuf,
        goal: String,
        /// Also everything below a directory.
        #[arg(short, long)]
        recursive: bool,
    },
}

#[derive(Subcommand)]
pub enum QuotaCmd {
    Get {
        path: PathBuf,
    },
    /// Set limits (sizes take K, M, G, T suffixes, powers of 1024).
    Set {
        path: PathBuf,
        #[arg(long)]
        bytes: Option<String>,
        #[arg(long)]
        inodes: Option<u64>,
    },
    /// Remove the quota.
    Clear {
        path: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum ClusterCmd {
    /// Members, leader, term, commit and applied index, lag.
    Status,
    /// Add a metadata node (start it first, without --bootstrap).
    AddNode(NodeArgs),
    /// Remove a metadata node from the voters.
    RemoveNode {
        #[arg(long)]
        id: u64,
    },
    /// Build a Raft snapshot on the leader now.
    Snapshot,
    /// Chunk servers, capacity, under-replicated and lost chunks, repairs.
    Health,
}

#[derive(Args)]
pub struct NodeArgs {
    #[arg(long)]
    pub id: u64,
    /// Its QUIC address, ip:port.
    #[arg(long)]
    pub addr: String,
}

/// A failure with the exit code it maps to.
#[derive(Debug)]
pub struct CliError {
    pub exit: u8,
    pub code: Option<ErrorCode>,
    pub message: String,
}

impl CliError {
    /// A reply of the wrong kind: a server bug, not the user's.
    pub(crate) fn unexpected(reply: &impl std::fmt::Debug) -> Self {
        CliError { exit: 1, code: Some(ErrorCode::Internal), message: format!("unexpected reply {reply:?}") }
    }
    pub(crate) fn usage(msg: impl Into<String>) -> Self {
        CliError { exit: 2, code: Some(ErrorCode::Invalid), message: msg.into() }
    }
    /// Bad input (a refused definition, say): the operation failed.
    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        CliError { exit: 1, code: Some(ErrorCode::Invalid), message: msg.into() }
    }
    pub(crate) fn not_found(msg: impl Into<String>) -> Self {
        CliError { exit: 1, code: Some(ErrorCode::NotFound), message: msg.into() }
    }
    fn config(msg: impl Into<String>) -> Self {
        CliError { exit: 4, code: None, message: msg.into() }
    }
    pub(crate) fn from_client(context: &str, e: ClientError) -> Self {
        let exit = match &e {
            ClientError::Unavailable { .. } => 3,
            ClientError::Tls(_) | ClientError::Config(_) => 4,
            ClientError::Remote(w) if w.code == ErrorCode::Unauthorized => 4,
            ClientError::Remote(w) if matches!(w.code, ErrorCode::Unavailable | ErrorCode::Timeout) => 3,
            _ => 1,
        };
        let message = if context.is_empty() { e.to_string() } else { format!("{context}: {e}") };
        CliError { exit, code: Some(e.code()), message }
    }
    fn from_mount(e: crate::fuse::MountError) -> Self {
        CliError { exit: e.exit_code(), code: None, message: e.to_string() }
    }
    pub fn print(&self, json: bool) {
        if json {
            let v = serde_json::json!({"error": {
                "code": self.code.map(|c| c.to_string()),
                "errno": self.code.map(|c| c.errno()),
                "message": self.message,
            }});
            eprintln!("{v}");
        } else {
            match self.code {
                Some(c) if self.exit == 1 => eprintln!("locus: {} ({c})", self.message),
                _ => eprintln!("locus: {}", self.message),
            }
        }
    }
}

pub(crate) type CliResult<T = ()> = Result<T, CliError>;

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> CliResult {
    let json = cli.json;
    match cli.cmd {
        Cmd::Up(args) => {
            up::up(args, json).await.map_err(|e| CliError { exit: 1, code: None, message: format!("{e:#}") })
        }
        Cmd::Down(args) => up::down(args).map_err(|e| CliError { exit: 1, code: None, message: format!("{e:#}") }),
        Cmd::Mount(args) => crate::fuse::mount(args, cli.config).await.map_err(CliError::from_mount),
        Cmd::Umount(args) => crate::fuse::umount(&args).map_err(CliError::from_mount),
        Cmd::Fs(cmd) => {
            let (client, cfg) = connect_with_config(cli.config)?;
            match cmd {
                FsCmd::Snapshot { src, dst } => clone_cmd(&file_client(&client, &cfg)?, &src, &dst, true, json).await,
                FsCmd::Clone { src, dst } => clone_cmd(&file_client(&client, &cfg)?, &src, &dst, false, json).await,
                FsCmd::Put { .. } | FsCmd::Get { .. } | FsCmd::Cat { .. } | FsCmd::Truncate { .. } => {
                    let files = file_client(&client, &cfg)?;
                    data(&files, cmd, json).await
                }
                cmd => fs(&client, cmd, json).await,
            }
        }
        Cmd::Cluster(cmd) => {
            let client = connect(cli.config)?;
            cluster(&client, cmd, json).await
        }
        Cmd::Vm(cmd) => {
            let (client, cfg) = connect_with_config(cli.config)?;
            let files = file_client(&client, &cfg)?;
            crate::vmcli::vm(&client, &files, cmd, json).await
        }
        Cmd::Host(cmd) => {
            let client = connect(cli.config)?;
            crate::vmcli::host(&client, cmd, json).await
        }
        Cmd::Demo(args) => crate::demo::run(args, cli.config).await.map_err(|e| CliError {
            exit: 1,
            code: None,
            message: format!("{e:#}"),
        }),
        Cmd::Nbd(crate::nbd::NbdCmd::Serve(args)) => {
            let (client, cfg) = connect_with_config(cli.config)?;
            let files = file_client(&client, &cfg)?;
            nbd_serve(&files, &args, json).await
        }
    }
}

/// `locus nbd serve`: resolves the file, then serves it in the foreground.
async fn nbd_serve(files: &FileClient, args: &crate::nbd::ServeArgs, json: bool) -> CliResult {
    let path = abs(&args.file);
    let attr = files.meta().resolve(&path, true).await.map_err(|e| CliError::from_client(&show(&path), e))?;
    if attr.kind != FileKind::File {
        return Err(CliError {
            exit: 1,
            code: Some(ErrorCode::IsDir),
            message: format!("{}: not a regular file", show(&path)),
        });
    }
    let size = files.size(attr.ino).await.map_err(|e| CliError::from_client(&show(&path), e))?;
    let layout = MetaRead::Layout { ino: attr.ino, first: 0, count: 0 };
    let snapshot = match files.meta().read(layout).await.map_err(|e| CliError::from_client(&show(&path), e))? {
        ReadReply::Layout(l) => l.read_only,
        _ => false,
    };
    let target = crate::nbd::Target { ino: attr.ino, path: show(&path), size, snapshot };
    crate::nbd::serve(args, target, files.clone(), json).await.map_err(|e| CliError {
        exit: 1,
        code: matches!(e, crate::nbd::NbdError::Flush(_)).then_some(ErrorCode::Io),
        message: e.to_string(),
    })
}

fn connect(config: Option<PathBuf>) -> CliResult<MetaClient> {
    connect_with_config(config).map(|(c, _)| c)
}

pub(crate) fn connect_with_config(config: Option<PathBuf>) -> CliResult<(MetaClient, ClientConfig)> {
    let path = config.unwrap_or_else(ClientConfig::default_path);
    if !path.exists() {
        return Err(CliError::config(format!(
            "no client configuration at {} (start a cluster with `locus up`, or pass --config)",
            path.display()
        )));
    }
    let cfg = ClientConfig::load(&path).map_err(|e| CliError::config(e.to_string()))?;
    let client = MetaClient::new(&cfg).map_err(|e| CliError::from_client("", e))?;
    Ok((client, cfg))
}

pub(crate) fn file_client(meta: &MetaClient, cfg: &ClientConfig) -> CliResult<FileClient> {
    let chunks = ChunkClient::for_config(cfg).map_err(|e| CliError::config(e.to_string()))?;
    Ok(FileClient::new(meta.clone(), chunks, cfg.topology.clone()))
}

/// How much `put`, `get` and `cat` move per request.
const COPY_PIECE: u64 = 4 << 20;

/// Granule of zero detection in `put` and `get`: runs of zeros shorter
/// than this are copied as data.
const ZERO_GRANULE: usize = 64 << 10;

/// The runs of `buf` that hold a non-zero byte, at [`ZERO_GRANULE`]
/// granularity: `(offset in buf, bytes)`, in order, adjacent granules merged.
fn nonzero_runs(buf: &[u8]) -> Vec<(usize, &[u8])> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, g) in buf.chunks(ZERO_GRANULE).enumerate() {
        if g.iter().all(|b| *b == 0) {
            continue;
        }
        let (start, end) = (i * ZERO_GRANULE, i * ZERO_GRANULE + g.len());
        match runs.last_mut() {
            Some((_, e)) if *e == start => *e = end,
            _ => runs.push((start, end)),
        }
    }
    runs.into_iter().map(|(s, e)| (s, &buf[s..e])).collect()
}

/// Reads until `buf` is full or the end: a short read from a pipe or a
/// network filesystem would otherwise shift the zero granules.
fn read_full(file: &mut impl std::io::Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn progress(total: u64, quiet: bool, what: &str) -> indicatif::ProgressBar {
    if quiet || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(total);
    let style =
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> ");
    pb.set_style(style);
    pb.set_message(what.to_string());
    pb
}

fn local_err(path: &std::path::Path, e: std::io::Error) -> CliError {
    CliError { exit: 1, code: Some(ErrorCode::Io), message: format!("{}: {e}", path.display()) }
}

async fn data(f: &FileClient, cmd: FsCmd, json: bool) -> CliResult {
    let c = f.meta();
    match cmd {
        FsCmd::Put { local, remote, quiet } => {
            let mut file = std::fs::File::open(&local).map_err(|e| local_err(&local, e))?;
            let total = file.metadata().map_err(|e| local_err(&local, e))?.len();
            let path = abs(&remote);
            let (parent, name) = split(&path)?;
            let pino = parent_ino(c, &parent).await?;
            let attr = c
                .op_attr(MetaOp::Create { parent: pino, name, perm: 0o644, caller: caller(), exclusive: false })
                .await
                .map_err(|e| CliError::from_client(&show(&path), e))?;
            if attr.size > 0 {
                f.truncate(attr.ino, 0).await.map_err(|e| CliError::from_client(&show(&path), e))?;
            }
            let pb = progress(total, quiet || json, "put");
            let mut off = 0u64;
            let mut buf = vec![0u8; COPY_PIECE as usize];
            loop {
                let n = read_full(&mut file, &mut buf).map_err(|e| local_err(&local, e))?;
                if n == 0 {
                    break;
                }
                // Zeros are not sent: the new file reads as zeros there, and
                // a sparse disk image stays sparse (its unwritten chunks are
                // never allocated).
                for (at, run) in nonzero_runs(&buf[..n]) {
                    f.write(attr.ino, off + at as u64, bytes::Bytes::copy_from_slice(run))
                        .await
                        .map_err(|e| CliError::from_client(&show(&path), e))?;
                }
                off += n as u64;
                pb.set_position(off);
            }
            // Sends what is buffered first.
            f.truncate(attr.ino, off).await.map_err(|e| CliError::from_client(&show(&path), e))?;
            f.fsync(attr.ino).await.map_err(|e| CliError::from_client(&show(&path), e))?;
            pb.finish_and_clear();
            if json {
                print_json(&serde_json::json!({"path": show(&path), "bytes": off}));
            }
            Ok(())
        }
        FsCmd::Get { remote, local, quiet } => {
            use std::io::Write;
            let path = abs(&remote);
            let attr = c.resolve(&path, true).await.map_err(|e| CliError::from_client(&show(&path), e))?;
            if attr.kind != FileKind::File {
                return Err(CliError {
                    exit: 1,
                    code: Some(ErrorCode::IsDir),
                    message: format!("{}: not a regular file", show(&path)),
                });
            }
            use std::io::{Seek, SeekFrom};
            let mut out = std::fs::File::create(&local).map_err(|e| local_err(&local, e))?;
            // Holes only in a regular file: a pipe cannot seek, and a device
            // keeps its old bytes where nothing is written.
            let sparse = out.metadata().map_err(|e| local_err(&local, e))?.file_type().is_file();
            let pb = progress(attr.size, quiet || json, "get");
            let mut off = 0u64;
            loop {
                let data =
                    f.read(attr.ino, off, COPY_PIECE).await.map_err(|e| CliError::from_client(&show(&path), e))?;
                if data.is_empty() {
                    break;
                }
                if sparse {
                    // Runs of zeros become holes, as `cp --sparse` makes
                    // them; the length is set at the end.
                    let mut at = 0;
                    for (start, run) in nonzero_runs(&data) {
                        out.seek(SeekFrom::Current((start - at) as i64)).map_err(|e| local_err(&local, e))?;
                        out.write_all(run).map_err(|e| local_err(&local, e))?;
                        at = start + run.len();
                    }
                    out.seek(SeekFrom::Current((data.len() - at) as i64)).map_err(|e| local_err(&local, e))?;
                } else {
                    out.write_all(&data).map_err(|e| local_err(&local, e))?;
                }
                off += data.len() as u64;
                pb.set_position(off);
            }
            if sparse {
                out.set_len(off).map_err(|e| local_err(&local, e))?;
            }
            match out.sync_all() {
                // A pipe or terminal cannot be synced: nothing to make durable.
                Err(e) if !sparse && e.kind() == std::io::ErrorKind::InvalidInput => {}
                r => r.map_err(|e| local_err(&local, e))?,
            }
            pb.finish_and_clear();
            if json {
                print_json(&serde_json::json!({"path": show(&path), "bytes": off}));
            }
            Ok(())
        }
        FsCmd::Cat { path } => {
            use std::io::Write;
            let path = abs(&path);
            let attr = c.resolve(&path, true).await.map_err(|e| CliError::from_client(&show(&path), e))?;
            if attr.kind != FileKind::File {
                return Err(CliError {
                    exit: 1,
                    code: Some(ErrorCode::IsDir),
                    message: format!("{}: not a regular file", show(&path)),
                });
            }
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            let mut off = 0u64;
            loop {
                let data =
                    f.read(attr.ino, off, COPY_PIECE).await.map_err(|e| CliError::from_client(&show(&path), e))?;
                if data.is_empty() {
                    break;
                }
                if out.write_all(&data).is_err() {
                    // The reader went away (a pipe closed): stop quietly.
                    return Ok(());
                }
                off += data.len() as u64;
            }
            let _ = out.flush();
            Ok(())
        }
        FsCmd::Truncate { path, size, no_create } => {
            let bytes = parse_size(&size).ok_or_else(|| {
                CliError::usage(format!("size {size:?} is not a number with an optional K/M/G/T suffix"))
            })?;
            let path = abs(&path);
            let attr = match c.resolve(&path, true).await {
                Ok(a) => a,
                Err(ClientError::Remote(w)) if w.code == ErrorCode::NotFound && !no_create => {
                    let (parent, name) = split(&path)?;
                    let pino = parent_ino(c, &parent).await?;
                    c.op_attr(MetaOp::Create { parent: pino, name, perm: 0o644, caller: caller(), exclusive: false })
                        .await
                        .map_err(|e| CliError::from_client(&show(&path), e))?
                }
                Err(e) => return Err(CliError::from_client(&show(&path), e)),
            };
            if attr.kind != FileKind::File {
                return Err(CliError {
                    exit: 1,
                    code: Some(ErrorCode::IsDir),
                    message: format!("{}: not a regular file", show(&path)),
                });
            }
            let a = f.truncate(attr.ino, bytes).await.map_err(|e| CliError::from_client(&show(&path), e))?;
            if json {
                print_json(&serde_json::json!({"path": show(&path), "size": a.size}));
            }
            Ok(())
        }
        _ => Err(CliError::usage("not a data command")),
    }
}

/// `locus fs snapshot` and `locus fs clone`.
async fn clone_cmd(
    f: &FileClient,
    src: &std::path::Path,
    dst: &std::path::Path,
    snapshot: bool,
    json: bool,
) -> CliResult {
    let c = f.meta();
    let (src, dst) = (abs(src), abs(dst));
    let started = std::time::Instant::now();
    let a = c.resolve(&src, true).await.map_err(|e| CliError::from_client(&show(&src), e))?;
    let (pino, name) = match c.resolve(&dst, true).await {
        Ok(d) if d.kind == FileKind::Dir => (d.ino, split(&src)?.1),
        _ => {
            let (dp, dn) = split(&dst)?;
            (parent_ino(c, &dp).await?, dn)
        }
    };
    let what = format!("{} -> {}", show(&src), show(&dst));
    let out = f.clone_inode(a.ino, pino, &name, snapshot).await.map_err(|e| CliError::from_client(&what, e))?;
    let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
    if json {
        print_json(&serde_json::json!({
            "src": show(&src),
            "dst": show(&dst),
            "snapshot": snapshot,
            "ino": out.attr.ino,
            "kind": format!("{:?}", out.attr.kind),
            "inodes": out.inodes,
            "chunks_shared": out.chunks,
            "chunks_fenced": out.fenced,
            "unfenced_replicas": out.unfenced.len(),
            "elapsed_ms": elapsed_ms,
        }));
    } else {
        println!(
            "{what}: {} inode {} ({} inodes, {} chunks shared) in {elapsed_ms:.1} ms",
            if snapshot { "snapshot" } else { "clone" },
            out.attr.ino,
            out.inodes,
            out.chunks
        );
    }
    if let Some(u) = out.unfenced.first() {
        return Err(CliError {
            exit: 1,
            code: Some(ErrorCode::Unavailable),
            message: format!(
                "{what}: made, but {} chunk replicas did not take the version raise (first: chunk {} on server {}: {}); \
                 a writer holding an old layout may still reach them until those servers catch up",
                out.unfenced.len(),
                u.chunk,
                u.server,
                u.error
            ),
        });
    }
    Ok(())
}

pub(crate) fn print_json<T: Serialize>(v: &T) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("locus: cannot encode output: {e}"),
    }
}

/// A path inside Locus as bytes, always absolute.
fn abs(p: &std::path::Path) -> Vec<u8> {
    let b = p.as_os_str().as_bytes();
    if b.first() == Some(&b'/') {
        b.to_vec()
    } else {
        let mut v = b"/".to_vec();
        v.extend_from_slice(b);
        v
    }
}

fn show(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

/// (parent path, last name) of an absolute path.
fn split(path: &[u8]) -> CliResult<(Vec<u8>, Vec<u8>)> {
    let trimmed: &[u8] = {
        let mut t = path;
        while t.len() > 1 && t.last() == Some(&b'/') {
            t = &t[..t.len() - 1];
        }
        t
    };
    let pos = trimmed.iter().rposition(|&b| b == b'/').unwrap_or(0);
    let name = trimmed[pos + 1..].to_vec();
    if name.is_empty() {
        return Err(CliError::usage(format!("{}: names no file (the root?)", show(path))));
    }
    let parent = if pos == 0 { b"/".to_vec() } else { trimmed[..pos].to_vec() };
    Ok((parent, name))
}

fn parse_mode(s: &str) -> CliResult<u32> {
    u32::from_str_radix(s, 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| CliError::usage(format!("mode {s:?} is not an octal number up to 7777")))
}

fn caller() -> Caller {
    // The CLI acts as the invoking user.
    Caller { uid: nix::unistd::getuid().as_raw(), gid: nix::unistd::getgid().as_raw() }
}

async fn parent_ino(c: &MetaClient, parent: &[u8]) -> CliResult<Ino> {
    let a = c.resolve(parent, true).await.map_err(|e| CliError::from_client(&show(parent), e))?;
    if a.kind != FileKind::Dir {
        return Err(CliError {
            exit: 1,
            code: Some(ErrorCode::NotDir),
            message: format!("{}: not a directory", show(parent)),
        });
    }
    Ok(a.ino)
}

fn fmt_time(t: Timespec) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::new(t.secs.max(0) as u64, t.nanos))
        .to_string()
}

fn mode_string(a: &Attr) -> String {
    let mut s = String::new();
    s.push(a.kind.letter());
    let p = a.perm;
    let bits = [
        (0o400, 'r'),
        (0o200, 'w'),
        (0o100, 'x'),
        (0o040, 'r'),
        (0o020, 'w'),
        (0o010, 'x'),
        (0o004, 'r'),
        (0o002, 'w'),
        (0o001, 'x'),
    ];
    for (i, (bit, ch)) in bits.iter().enumerate() {
        let mut c = if p & bit != 0 { *ch } else { '-' };
        if i == 2 && p & 0o4000 != 0 {
            c = if c == 'x' { 's' } else { 'S' };
        }
        if i == 5 && p & 0o2000 != 0 {
            c = if c == 'x' { 's' } else { 'S' };
        }
        if i == 8 && p & 0o1000 != 0 {
            c = if c == 'x' { 't' } else { 'T' };
        }
        s.push(c);
    }
    s
}

async fn fs(c: &MetaClient, cmd: FsCmd, json: bool) -> CliResult {
    match cmd {
        FsCmd::Mkdir { parents, mode, paths } => {
            let perm = parse_mode(&mode)?;
            for p in paths {
                let path = abs(&p);
                if parents {
                    mkdir_p(c, &path, perm).await?;
                } else {
                    let (parent, name) = split(&path)?;
                    let pino = parent_ino(c, &parent).await?;
                    c.op(MetaOp::Mkdir { parent: pino, name, perm, caller: caller() })
                        .await
                        .map_err(|e| CliError::from_client(&show(&path), e))?;
                }
            }
            Ok(())
        }
        FsCmd::Ls { long, path } => {
            let path = abs(&path);
            let a = c.resolve(&path, true).await.map_err(|e| CliError::from_client(&show(&path), e))?;
            let entries = if a.kind == FileKind::Dir {
                c.readdir_all(a.ino).await.map_err(|e| CliError::from_client(&show(&path), e))?
            } else {
                vec![DirEntry { name: split(&path).map(|(_, n)| n).unwrap_or_default(), ino: a.ino, kind: a.kind }]
            };
            if !long && !json {
                for e in &entries {
                    println!("{}", show(&e.name));
                }
                return Ok(());
            }
            let mut rows = Vec::new();
            for e in &entries {
                match c.getattr(e.ino).await {
                    Ok(attr) => rows.push((e.name.clone(), attr)),
                    // Removed since the listing: skip it, as ls does.
                    Err(ClientError::Remote(w)) if w.code == ErrorCode::NotFound => {}
                    Err(err) => return Err(CliError::from_client(&show(&e.name), err)),
                }
            }
            if json {
                let v: Vec<_> = rows.iter().map(|(n, a)| serde_json::json!({"name": show(n), "attr": a})).collect();
                print_json(&v);
            } else {
                for (n, a) in rows {
                    println!(
                        "{} {:>3} {:>5} {:>5} {:>12} {} {}",
                        mode_string(&a),
                        a.nlink,
                        a.uid,
                        a.gid,
                        a.size,
                        fmt_time(a.mtime),
                        show(&n)
                    );
                }
            }
            Ok(())
        }
        FsCmd::Stat { path } => {
            let path = abs(&path);
            let a = c.resolve(&path, false).await.map_err(|e| CliError::from_client(&show(&path), e))?;
            if json {
                print_json(&a);
            } else {
                println!("  File: {}", show(&path));
                println!("  Type: {:?}  Inode: {}  Links: {}", a.kind, a.ino, a.nlink);
                println!("  Size: {}", a.size);
                println!("Access: ({:04o}/{})  Uid: {}  Gid: {}", a.perm, mode_string(&a), a.uid, a.gid);
                println!("Access: {}", fmt_time(a.atime));
                println!("Modify: {}", fmt_time(a.mtime));
                println!("Change: {}", fmt_time(a.ctime));
                println!(" Birth: {}", fmt_time(a.crtime));
            }
            Ok(())
        }
        FsCmd::Mv { src, dst, no_clobber } => {
            let (src, dst) = (abs(&src), abs(&dst));
            let (sp, sn) = split(&src)?;
            let spino = parent_ino(c, &sp).await?;
            let (dpino, dn) = match c.resolve(&dst, true).await {
                Ok(a) if a.kind == FileKind::Dir => (a.ino, sn.clone()),
                _ => {
                    let (dp, dn) = split(&dst)?;
                    (parent_ino(c, &dp).await?, dn)
                }
            };
            let flags = if no_clobber { RENAME_NOREPLACE } else { 0 };
            c.op(MetaOp::Rename { parent: spino, name: sn, new_parent: dpino, new_name: dn, flags })
                .await
                .map_err(|e| CliError::from_client(&format!("{} -> {}", show(&src), show(&dst)), e))?;
            Ok(())
        }
        FsCmd::Rm { recursive, dir, paths } => {
            for p in paths {
                let path = abs(&p);
                let a = c.resolve(&path, false).await.map_err(|e| CliError::from_client(&show(&path), e))?;
                let (parent, name) = split(&path)?;
                let pino = parent_ino(c, &parent).await?;
                if a.kind == FileKind::Dir {
                    if recursive {
                        // A snapshot cannot be emptied entry by entry: it goes whole.
                        match c.op(MetaOp::DropSnapshot { parent: pino, name: name.clone() }).await {
                            Ok(_) => continue,
                            Err(ClientError::Remote(w)) if w.code == ErrorCode::Invalid => {}
                            Err(e) => return Err(CliError::from_client(&show(&path), e)),
                        }
                        remove_tree(c, a.ino).await?;
                    } else if !dir {
                        return Err(CliError {
                            exit: 1,
                            code: Some(ErrorCode::IsDir),
                            message: format!("{}: is a directory (use -r or -d)", show(&path)),
                        });
                    }
                    c.op(MetaOp::Rmdir { parent: pino, name })
                        .await
                        .map_err(|e| CliError::from_client(&show(&path), e))?;
                } else {
                    c.op(MetaOp::Unlink { parent: pino, name })
                        .await
                        .map_err(|e| CliError::from_client(&show(&path), e))?;
                }
            }
            Ok(())
        }
        FsCmd::Ln { symbolic, target, link } => {
            let link = abs(&link);
            let (lp, ln) = split(&link)?;
            let lpino = parent_ino(c, &lp).await?;
            if symbolic {
                let target = target.as_os_str().as_bytes().to_vec();
                c.op(MetaOp::Symlink { parent: lpino, name: ln, target, caller: caller() })
                    .await
                    .map_err(|e| CliError::from_client(&show(&link), e))?;
            } else {
                let t = abs(&target);
                let a = c.resolve(&t, false).await.map_err(|e| CliError::from_client(&show(&t), e))?;
                c.op(MetaOp::Link { ino: a.ino, new_parent: lpino, new_name: ln })
                    .await
                    .map_err(|e| CliError::from_client(&show(&link), e))?;
            }
            Ok(())
        }
        FsCmd::Touch { paths } => {
            for p in paths {
                let path = abs(&p);
                match c.resolve(&path, true).await {
                    Ok(a) => {
                        let set =
                            SetAttr { atime: Some(SetTime::Now), mtime: Some(SetTime::Now), ..Default::default() };
                        c.op(MetaOp::SetAttr { ino: a.ino, set })
                            .await
                            .map_err(|e| CliError::from_client(&show(&path), e))?;
                    }
                    Err(ClientError::Remote(w)) if w.code == ErrorCode::NotFound => {
                        let (parent, name) = split(&path)?;
                        let pino = parent_ino(c, &parent).await?;
                        c.op(MetaOp::Create { parent: pino, name, perm: 0o644, caller: caller(), exclusive: false })
                            .await
                            .map_err(|e| CliError::from_client(&show(&path), e))?;
                    }
                    Err(e) => return Err(CliError::from_client(&show(&path), e)),
                }
            }
            Ok(())
        }
        FsCmd::Chmod { mode, path } => {
            let perm = parse_mode(&mode)?;
            let path = abs(&path);
            let a = c.resolve(&path, true).await.map_err(|e| CliError::from_client(&show(&path), e))?;
            let set = SetAttr { mode: Some(perm), ..Default::default() };
            c.op(MetaOp::SetAttr { ino: a.ino, set }).await.map_err(|e| CliError::from_client(&show(&path), e))?;
            Ok(())
        }
        FsCmd::Chown { owner, path } => {
            let (u, g) = match owner.split_once(':') {
                Some((u, g)) => (u, Some(g)),
                None => (owner.as_str(), None),
            };
            let uid: u32 = u.parse().map_err(|_| CliError::usage(format!("uid {u:?} is not a number")))?;
            let gid: Option<u32> = match g {
                Some(g) => Some(g.parse().map_err(|_| CliError::usage(format!("gid {g:?} is not a number")))?),
                None => None,
            };
            let path = abs(&path);
            let a = c.resolve(&path, true).await.map_err(|e| CliError::from_client(&show(&path), e))?;
            let set = SetAttr { uid: Some(uid), gid, ..Default::default() };
            c.op(MetaOp::SetAttr { ino: a.ino, set }).await.map_err(|e| CliError::from_client(&show(&path), e))?;
            Ok(())
        }
        FsCmd::Xattr(x) => xattr(c, x, json).await,
        FsCmd::Locate { path } => {
            let path = abs(&path);
            let attr = c.resolve(&path, true).await.map_err(|e| CliError::from_client(&show(&path), e))?;
            let mut chunks = Vec::new();
            let mut first = 0;
            let cb = loop {
                match c.read(MetaRead::Layout { ino: attr.ino, first, count: MAX_LAYOUT_CHUNKS }).await {
                    Ok(ReadReply::Layout(l)) => {
                        let cb = l.chunk_bytes;
                        chunks.extend(l.chunks);
                        first += MAX_LAYOUT_CHUNKS;
                        if first * cb >= attr.size.max(1) {
                            break cb;
                        }
                    }
                    Ok(other) => return Err(CliError::unexpected(&other)),
                    Err(e) => return Err(CliError::from_client(&show(&path), e)),
                }
            };
            if json {
                print_json(
                    &serde_json::json!({"path": show(&path), "size": attr.size, "chunk_bytes": cb, "chunks": chunks}),
                );
            } else {
                println!("{}: {} bytes, {} chunks of {} bytes", show(&path), attr.size, chunks.len(), cb);
                for ch in &chunks {
                    let reps: Vec<String> = ch
                        .replicas
                        .iter()
                        .map(|r| {
                            format!(
                                "{}@{} ({}/{}/{})",
                                r.server, r.addr, r.topology.zone, r.topology.rack, r.topology.host
                            )
                        })
                        .collect();
                    println!("  chunk {:>6}  id {:>8}  v{:<4} {}", ch.index, ch.chunk, ch.version, reps.join(", "));
                }
            }
            Ok(())
        }
        FsCmd::Goal(GoalCmd::Get { path }) => {
            let path = abs(&path);
            let attr = c.resolve(&path, true).await.map_err(|e| CliError::from_client(&show(&path), e))?;
            match c.read(MetaRead::GetGoal { ino: attr.ino }).await {
                Ok(ReadReply::Goal(g)) => {
                    if json {
                        print_json(&g);
                    } else {
                        println!("{}: {g}", show(&path));
                    }
                    Ok(())
                }
                Ok(other) => Err(CliError::unexpected(&other)),
                Err(e) => Err(CliError::from_client(&show(&path), e)),
            }
        }
        FsCmd::Goal(GoalCmd::Set { path, goal, recursive }) => {
            let goal = parse_goal(&goal)?;
            let path = abs(&path);
            let attr = c.resolve(&path, true).await.map_err(|e| CliError::from_client(&show(&path), e))?;
            let mut todo = vec![(attr.ino, attr.kind)];
            let mut n = 0u64;
            while let Some((ino, kind)) = todo.pop() {
                c.op(MetaOp::SetGoal { ino, goal }).await.map_err(|e| CliError::from_client(&show(&path), e))?;
                n += 1;
                if recursive && kind == FileKind::Dir {
                    let entries = c.readdir_all(ino).await.map_err(|e| CliError::from_client(&show(&path), e))?;
                    todo.extend(
                        entries
                            .into_iter()
                            .filter(|e| matches!(e.kind, FileKind::Dir | FileKind::File))
                            .map(|e| (e.ino, e.kind)),
                    );
                }
            }
            if !json {
                println!("{}: {goal} ({n} inodes)", show(&path));
            }
            Ok(())
        }
        FsCmd::Quota(q) => quota(c, q, json).await,
        FsCmd::Snapshot { .. } | FsCmd::Clone { .. } => Err(CliError::usage("a clone needs a file client")),
        FsCmd::Put { .. } | FsCmd::Get { .. } | FsCmd::Cat { .. } | FsCmd::Truncate { .. } => {
            Err(CliError::usage("a data command needs a file client"))
        }
    }
}

async fn xattr(c: &MetaClient, cmd: XattrCmd, json: bool) -> CliResult {
    let resolve = |p: PathBuf| async move {
        let path = abs(&p);
        c.resolve(&path, true).await.map(|a| a.ino).map_err(|e| CliError::from_client(&show(&path), e))
    };
    match cmd {
        XattrCmd::Get { path, name } => {
            let ino = resolve(path).await?;
            match c.read(MetaRead::GetXattr { ino, name: name.clone().into_bytes() }).await {
                Ok(ReadReply::Xattr(v)) => {
                    if json {
                        print_json(&serde_json::json!({"name": name, "value": show(&v)}));
                    } else {
                        println!("{}", show(&v));
                    }
                    Ok(())
                }
                Ok(other) => Err(CliError::unexpected(&other)),
                Err(e) => Err(CliError::from_client(&name, e)),
            }
        }
        XattrCmd::Set { path, name, value, create, replace } => {
            let ino = resolve(path).await?;
            let flags = if create {
                XATTR_CREATE
            } else if replace {
                XATTR_REPLACE
            } else {
                0
            };
            c.op(MetaOp::SetXattr { ino, name: name.clone().into_bytes(), value: value.into_bytes(), flags })
                .await
                .map_err(|e| CliError::from_client(&name, e))?;
            Ok(())
        }
        XattrCmd::Rm { path, name } => {
            let ino = resolve(path).await?;
            c.op(MetaOp::RemoveXattr { ino, name: name.clone().into_bytes() })
                .await
                .map_err(|e| CliError::from_client(&name, e))?;
            Ok(())
        }
        XattrCmd::Ls { path } => {
            let ino = resolve(path).await?;
            match c.read(MetaRead::ListXattr { ino }).await {
                Ok(ReadReply::XattrNames(names)) => {
                    let names: Vec<String> = names.iter().map(|n| show(n)).collect();
                    if json {
                        print_json(&names);
                    } else {
                        for n in names {
                            println!("{n}");
                        }
                    }
                    Ok(())
                }
                Ok(other) => Err(CliError::unexpected(&other)),
                Err(e) => Err(CliError::from_client("", e)),
            }
        }
    }
}

fn parse_goal(s: &str) -> CliResult<Goal> {
    let (copies, level) = match s.split_once(':') {
        Some((c, l)) => (c, l),
        None => (s, "host"),
    };
    let copies: u8 = copies.parse().map_err(|_| CliError::usage(format!("goal copies {copies:?} is not a number")))?;
    let level: Level =
        level.parse().map_err(|_| CliError::usage(format!("goal level {level:?} is not host, rack or zone")))?;
    let g = Goal { copies, level };
    g.validate().map_err(|e| CliError::usage(e.message))?;
    Ok(g)
}

/// `10G`, `512M`, `4096`: bytes, with powers of 1024.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.chars().last()?.to_ascii_uppercase() {
        'K' => (&s[..s.len() - 1], 1u64 << 10),
        'M' => (&s[..s.len() - 1], 1 << 20),
        'G' => (&s[..s.len() - 1], 1 << 30),
        'T' => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    num.trim().parse::<u64>().ok()?.checked_mul(mult)
}

async fn quota(c: &MetaClient, cmd: QuotaCmd, json: bool) -> CliResult {
    let resolve_dir = |p: PathBuf| async move {
        let path = abs(&p);
        let a = c.resolve(&path, true).await.map_err(|e| CliError::from_client(&show(&path), e))?;
        Ok::<_, CliError>((path, a.ino))
    };
    match cmd {
        QuotaCmd::Get { path } => {
            let (path, ino) = resolve_dir(path).await?;
            match c.read(MetaRead::GetQuota { ino }).await {
                Ok(ReadReply::Quota(q)) => {
                    if json {
                        print_json(&q);
                    } else {
                        match q {
                            None => println!("{}: no quota", show(&path)),
                            Some(u) => {
                                let lim =
                                    |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_else(|| "unlimited".into());
                                println!(
                                    "{}: bytes {} of {}, inodes {} of {}",
                                    show(&path),
                                    u.used_bytes,
                                    lim(u.limits.max_bytes),
                                    u.used_inodes,
                                    lim(u.limits.max_inodes)
                                );
                            }
                        }
                    }
                    Ok(())
                }
                Ok(other) => Err(CliError::unexpected(&other)),
                Err(e) => Err(CliError::from_client(&show(&path), e)),
            }
        }
        QuotaCmd::Set { path, bytes, inodes } => {
            let max_bytes = match bytes {
                Some(b) => Some(parse_size(&b).ok_or_else(|| {
                    CliError::usage(format!("size {b:?} is not a number with an optional K/M/G/T suffix"))
                })?),
                None => None,
            };
            if max_bytes.is_none() && inodes.is_none() {
                return Err(CliError::usage("give --bytes, --inodes or both (or use `quota clear`)"));
            }
            let (path, ino) = resolve_dir(path).await?;
            c.op(MetaOp::SetQuota { ino, limits: QuotaLimits { max_bytes, max_inodes: inodes } })
                .await
                .map_err(|e| CliError::from_client(&show(&path), e))?;
            Ok(())
        }
        QuotaCmd::Clear { path } => {
            let (path, ino) = resolve_dir(path).await?;
            c.op(MetaOp::SetQuota { ino, limits: QuotaLimits::default() })
                .await
                .map_err(|e| CliError::from_client(&show(&path), e))?;
            Ok(())
        }
    }
}

async fn mkdir_p(c: &MetaClient, path: &[u8], perm: u32) -> CliResult {
    let mut ino = ROOT_INO;
    let mut so_far = Vec::new();
    for comp in path.split(|&b| b == b'/').filter(|c| !c.is_empty() && *c != b".") {
        so_far.push(b'/');
        so_far.extend_from_slice(comp);
        let made = c.op(MetaOp::Mkdir { parent: ino, name: comp.to_vec(), perm, caller: caller() }).await;
        ino = match made {
            Ok(OpReply::Attr(a)) => a.ino,
            Ok(other) => return Err(CliError::unexpected(&other)),
            Err(ClientError::Remote(w)) if w.code == ErrorCode::Exists => {
                let a = c.resolve(&so_far, true).await.map_err(|e| CliError::from_client(&show(&so_far), e))?;
                if a.kind != FileKind::Dir {
                    return Err(CliError {
                        exit: 1,
                        code: Some(ErrorCode::NotDir),
                        message: format!("{}: exists and is not a directory", show(&so_far)),
                    });
                }
                a.ino
            }
            Err(e) => return Err(CliError::from_client(&show(&so_far), e)),
        };
    }
    Ok(())
}

/// Removes everything below directory `ino` (not the directory itself).
async fn remove_tree(c: &MetaClient, ino: Ino) -> CliResult {
    let entries = c.readdir_all(ino).await.map_err(|e| CliError::from_client("", e))?;
    for e in entries {
        if e.kind == FileKind::Dir {
            // A snapshot below goes whole (its entries cannot be removed).
            match c.op(MetaOp::DropSnapshot { parent: ino, name: e.name.clone() }).await {
                Ok(_) => continue,
                Err(ClientError::Remote(w)) if w.code == ErrorCode::Invalid => {}
                Err(err) => return Err(CliError::from_client(&show(&e.name), err)),
            }
            Box::pin(remove_tree(c, e.ino)).await?;
            c.op(MetaOp::Rmdir { parent: ino, name: e.name.clone() })
                .await
                .map_err(|err| CliError::from_client(&show(&e.name), err))?;
        } else {
            c.op(MetaOp::Unlink { parent: ino, name: e.name.clone() })
                .await
                .map_err(|err| CliError::from_client(&show(&e.name), err))?;
        }
    }
    Ok(())
}

async fn cluster(c: &MetaClient, cmd: ClusterCmd, json: bool) -> CliResult {
    match cmd {
        ClusterCmd::Status => {
            let leader_view = match c.admin(AdminOp::Status).await.map_err(|e| CliError::from_client("", e))? {
                AdminReply::Status(s) => s,
                other => return Err(CliError::unexpected(&other)),
            };
            // Each member's own view gives its applied index.
            let mut nodes = Vec::new();
            for m in &leader_view.members {
                nodes.push((m.clone(), c.status_of(&m.addr).await.ok()));
            }
            if json {
                let v = serde_json::json!({
                    "leader_id": leader_view.leader_id,
                    "term": leader_view.term,
                    "commit_index": if leader_view.leader_id == Some(leader_view.node_id) { Some(leader_view.commit_index) } else { None },
                    "last_log_index": leader_view.last_log_index,
                    "members": nodes.iter().map(|(m, s)| serde_json::json!({
                        "id": m.id,
                        "addr": m.addr,
                        "voter": m.voter,
                        "reachable": s.is_some(),
                        "state": s.as_ref().map(|s| s.state.clone()),
                        "applied_index": s.as_ref().map(|s| s.applied_index),
                        "matched_index": m.matched_index,
                        "lag": m.lag,
                    })).collect::<Vec<_>>(),
                });
                print_json(&v);
            } else {
                println!(
                    "leader: {}   term: {}   commit index: {}",
                    leader_view.leader_id.map(|l| l.to_string()).unwrap_or_else(|| "none".into()),
                    leader_view.term,
                    leader_view.commit_index
                );
                println!(
                    "{:>4}  {:<22} {:<8} {:<10} {:>10} {:>10} {:>6}",
                    "id", "address", "role", "state", "applied", "matched", "lag"
                );
                for (m, s) in nodes {
                    println!(
                        "{:>4}  {:<22} {:<8} {:<10} {:>10} {:>10} {:>6}",
                        m.id,
                        m.addr,
                        if m.voter { "voter" } else { "learner" },
                        s.as_ref().map(|s| s.state.as_str()).unwrap_or("unreachable"),
                        s.as_ref().map(|s| s.applied_index.to_string()).unwrap_or_else(|| "-".into()),
                        m.matched_index.map(|x| x.to_string()).unwrap_or_else(|| "-".into()),
                        m.lag.map(|x| x.to_string()).unwrap_or_else(|| "-".into()),
                    );
                }
            }
            Ok(())
        }
        ClusterCmd::AddNode(a) => {
            c.admin(AdminOp::AddNode { id: a.id, addr: a.addr.clone() })
                .await
                .map_err(|e| CliError::from_client(&format!("add node {}", a.id), e))?;
            if !json {
                println!("node {} at {} is a voter", a.id, a.addr);
            }
            Ok(())
        }
        ClusterCmd::RemoveNode { id } => {
            c.admin(AdminOp::RemoveNode { id })
                .await
                .map_err(|e| CliError::from_client(&format!("remove node {id}"), e))?;
            if !json {
                println!("node {id} removed");
            }
            Ok(())
        }
        ClusterCmd::Health => {
            let h = match c.read(MetaRead::Health).await {
                Ok(ReadReply::Health(h)) => h,
                Ok(other) => return Err(CliError::unexpected(&other)),
                Err(e) => return Err(CliError::from_client("health", e)),
            };
            if json {
                print_json(&h);
            } else {
                let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
                println!(
                    "capacity {:.1} GiB, available {:.1} GiB; chunks {}, under-replicated {}, lost {}, corrupt reports {}; repairs in flight {}, done {}",
                    gib(h.total_bytes), gib(h.available_bytes), h.chunks, h.under_replicated, h.lost, h.corrupt, h.repairs_in_flight, h.repairs_done
                );
                println!(
                    "{:>4}  {:<22} {:<20} {:<6} {:>10} {:>10} {:>8}",
                    "id", "address", "zone/rack/host", "state", "used GiB", "avail GiB", "chunks"
                );
                for s in &h.servers {
                    println!(
                        "{:>4}  {:<22} {:<20} {:<6} {:>10.2} {:>10.2} {:>8}",
                        s.id,
                        s.addr,
                        s.topology.to_string(),
                        if s.alive { "up" } else { "DOWN" },
                        gib(s.used_bytes),
                        gib(s.available_bytes),
                        s.chunks
                    );
                }
            }
            Ok(())
        }
        ClusterCmd::Snapshot => {
            c.admin(AdminOp::Snapshot).await.map_err(|e| CliError::from_client("snapshot", e))?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Goal: zero detection finds exactly the granules holding a non-zero
    /// byte, merges neighbours, and keeps a short tail.
    #[test]
    fn nonzero_runs_skip_zero_granules() {
        let g = ZERO_GRANULE;
        let mut buf = vec![0u8; 5 * g + 10];
        assert!(nonzero_runs(&buf).is_empty());
        buf[g + 1] = 1;
        buf[2 * g + g - 1] = 2;
        buf[5 * g + 9] = 3;
        let runs: Vec<(usize, usize)> = nonzero_runs(&buf).iter().map(|(s, r)| (*s, r.len())).collect();
        assert_eq!(runs, vec![(g, 2 * g), (5 * g, 10)]);
        let mut from = std::io::Cursor::new(vec![7u8; 3 * g]);
        let mut into = vec![0u8; 2 * g];
        assert_eq!(read_full(&mut from, &mut into).unwrap(), 2 * g);
        assert_eq!(read_full(&mut from, &mut into).unwrap(), g);
    }
}
