//! Coherence between mounts: the metadata change stream turned into kernel
//! cache invalidations.
//!
//! The kernel trusts entries and attributes for [`TTL`](super::fs::TTL)
//! and keeps a file's pages until the next open (or, with
//! FUSE_AUTO_INVAL_DATA, until it sees a new mtime or size). Changes made
//! by other clients are pushed out of those caches as the stream reports
//! them, usually well within the TTL. The stream is resumed from the last
//! index after a disconnect; a stream that has to start over with a
//! snapshot only refreshes the file client (the kernel's own caches expire
//! within the TTL anyway). Our own changes come back too and invalidate
//! what is already fresh; telling them apart would need client ids on the
//! stream, and the cost is a re-read.
//!
//! Notifications are written to /dev/fuse by one thread of their own: a
//! notification can wait on a kernel lock held by a request in progress,
//! and that request is answered from the runtime, never from this thread.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::Duration;

use fuser::{INodeNo, Notifier};
use tokio::sync::mpsc;

use super::fs::Shared;
use crate::proto::*;

/// Invalidations queued for the notifier thread at most; the stream
/// reader waits when it is full.
const MAX_QUEUED_INVALIDATIONS: usize = 4096;
const RESUBSCRIBE_MIN: Duration = Duration::from_millis(100);
const RESUBSCRIBE_MAX: Duration = Duration::from_secs(5);

/// One kernel cache invalidation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inval {
    /// Attributes, and the cached pages too when `data`.
    Inode {
        ino: Ino,
        data: bool,
    },
    Entry {
        parent: Ino,
        name: Vec<u8>,
    },
}

/// What one change invalidates in the kernel. Pure, for tests.
pub fn invalidations(change: &Change) -> Vec<Inval> {
    match change {
        Change::InodeSet(a) => vec![Inval::Inode { ino: a.ino, data: a.kind == FileKind::File }],
        Change::InodeRemoved { ino } => vec![Inval::Inode { ino: *ino, data: true }],
        Change::EntrySet { parent, name, .. } | Change::EntryRemoved { parent, name } => {
            vec![Inval::Entry { parent: *parent, name: name.clone() }]
        }
        // The kernel caches no xattrs.
        Change::XattrChanged { .. } | Change::Vm { .. } => Vec::new(),
    }
}

/// An invalidation queued for the notifier thread; `done` hears when it
/// was written to the kernel.
#[derive(Debug)]
pub struct Notice {
    pub inval: Inval,
    pub done: Option<tokio::sync::oneshot::Sender<()>>,
}

/// Starts the notifier thread and the stream reader; both end when the
/// session's notifier stops working or the runtime shuts down.
pub fn start(shared: Arc<Shared>, notifier: Notifier) -> std::io::Result<()> {
    let (tx, rx) = mpsc::channel(MAX_QUEUED_INVALIDATIONS);
    std::thread::Builder::new().name("locus-notify".into()).spawn(move || notify_loop(notifier, rx))?;
    let _ = shared.notices.set(tx.clone());
    tokio::spawn(follow(shared, tx));
    Ok(())
}

fn notify_loop(notifier: Notifier, mut rx: mpsc::Receiver<Notice>) {
    while let Some(Notice { inval, done }) = rx.blocking_recv() {
        let r = match &inval {
            Inval::Inode { ino, data } => notifier.inval_inode(INodeNo(*ino), if *data { 0 } else { -1 }, 0),
            Inval::Entry { parent, name } => notifier.inval_entry(INodeNo(*parent), OsStr::from_bytes(name)),
        };
        match r {
            Ok(()) => {}
            // The session is gone (unmounted): nothing left to invalidate.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENODEV) | Some(libc::EBADF)) => return,
            Err(e) => tracing::debug!(?inval, error = %e, "invalidation not delivered"),
        }
        if let Some(done) = done {
            let _ = done.send(());
        }
    }
}

/// Reads the change stream forever, resubscribing after errors.
async fn follow(shared: Arc<Shared>, tx: mpsc::Sender<Notice>) {
    let mut backoff = RESUBSCRIBE_MIN;
    // Start at the present: the kernel has cached nothing older.
    let mut next = loop {
        match shared.meta.admin(AdminOp::Status).await {
            Ok(AdminReply::Status(s)) => break s.applied_index + 1,
            Ok(other) => tracing::warn!(?other, "unexpected status reply"),
            Err(e) => tracing::warn!(error = %e, "cannot learn where the change stream stands; retrying"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(RESUBSCRIBE_MAX);
    };
    loop {
        match shared.meta.subscribe(next).await {
            Ok(mut stream) => {
                tracing::debug!(from = next, "following the change stream");
                let mut in_snapshot = false;
                loop {
                    match stream.next().await {
                        Ok(Some(StreamItem::Changes { index, changes })) => {
                            backoff = RESUBSCRIBE_MIN;
                            for c in &changes {
                                if !apply(&shared, &tx, c, in_snapshot).await {
                                    return;
                                }
                            }
                            if !in_snapshot {
                                next = index + 1;
                            }
                        }
                        Ok(Some(StreamItem::SnapshotBegin { index })) => {
                            tracing::info!(index, "change history is gone; refreshing from a snapshot");
                            in_snapshot = true;
                        }
                        Ok(Some(StreamItem::SnapshotEnd { index })) => {
                            in_snapshot = false;
                            next = index + 1;
                        }
                        Ok(Some(StreamItem::Idle { .. })) => backoff = RESUBSCRIBE_MIN,
                        Ok(Some(StreamItem::Error(e))) => {
                            tracing::warn!(error = %e, "change stream failed");
                            break;
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::debug!(error = %e, "change stream broke");
                            break;
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot subscribe to changes; retrying"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(RESUBSCRIBE_MAX);
    }
}

/// Applies one change; false when the notifier thread is gone.
async fn apply(shared: &Shared, tx: &mpsc::Sender<Notice>, change: &Change, in_snapshot: bool) -> bool {
    match change {
        // This mount's own change coming back: the kernel and the file
        // client have it already.
        Change::InodeSet(a) if shared.kernel_has(a) => return true,
        Change::InodeSet(a) => shared.files.invalidate(a.ino),
        Change::InodeRemoved { ino } => {
            shared.files.invalidate(*ino);
            shared.forget_xattrs(*ino);
        }
        Change::XattrChanged { ino } => shared.forget_xattrs(*ino),
        Change::EntrySet { parent, ino, kind: FileKind::Dir, .. } => shared.note_parent(*ino, *parent),
        _ => {}
    }
    if in_snapshot {
        return true;
    }
    for inval in invalidations(change) {
        if tx.send(Notice { inval, done: None }).await.is_err() {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(ino: Ino, kind: FileKind) -> Attr {
        Attr {
            ino,
            kind,
            perm: 0o644,
            nlink: 1,
            uid: 0,
            gid: 0,
            size: 0,
            blocks: 0,
            atime: Timespec::default(),
            mtime: Timespec::default(),
            ctime: Timespec::default(),
            crtime: Timespec::default(),
            rdev: 0,
            generation: 0,
        }
    }

    #[test]
    fn changes_map_to_invalidations() {
        assert_eq!(
            invalidations(&Change::InodeSet(attr(5, FileKind::File))),
            vec![Inval::Inode { ino: 5, data: true }]
        );
        assert_eq!(
            invalidations(&Change::InodeSet(attr(6, FileKind::Dir))),
            vec![Inval::Inode { ino: 6, data: false }],
            "directories have no pages to drop"
        );
        assert_eq!(
            invalidations(&Change::EntryRemoved { parent: 1, name: b"x".to_vec() }),
            vec![Inval::Entry { parent: 1, name: b"x".to_vec() }]
        );
        assert_eq!(
            invalidations(&Change::EntrySet { parent: 2, name: b"y".to_vec(), ino: 9, kind: FileKind::File }),
            vec![Inval::Entry { parent: 2, name: b"y".to_vec() }]
        );
        assert!(invalidations(&Change::XattrChanged { ino: 5 }).is_empty());
    }
}
