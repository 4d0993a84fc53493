//! The export's write lease on its image (see [`crate::proto::MetaOp::Lease`]).
//!
//! A writable export takes the lease before it prints its URI and renews
//! it every [`RENEW_EVERY`]. While it holds it, no other client writes the
//! image: the metadata service refuses their allocations and size changes,
//! their file clients refuse to write chunks, and taking the lease raised
//! every chunk's version, so a writer with an older layout is refused by
//! the chunk servers. That is what lets the export cache reads.
//!
//! The lease is trusted until [`LEASE_TTL`] less [`CLOCK_MARGIN`] after
//! the renewal that last succeeded was *sent*. A renewal that finds the
//! lease taken afresh (it had lapsed at the leader: another client may
//! have written meanwhile) clears the cache first. A renewal refused
//! because another client holds it loses the lease for good: the cache
//! is cleared and no longer used, and this export's writes are refused
//! by the new holder's fences.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::cache::BlockCache;
use crate::client::ClientError;
use crate::file::FileClient;
use crate::proto::{ErrorCode, Ino};

/// How long one grant lasts.
pub const LEASE_TTL: Duration = Duration::from_secs(10);
/// How often the lease is renewed.
pub const RENEW_EVERY: Duration = Duration::from_millis(2500);
/// Trusted for this much less than granted: the leader's clock and ours
/// may disagree a little.
const CLOCK_MARGIN: Duration = Duration::from_secs(1);
/// At start, how long to wait by default for another client's lease to
/// lapse (one whose export was killed): a little over one grant.
pub const ACQUIRE_WAIT: Duration = Duration::from_secs(12);

pub struct LeaseKeeper {
    files: FileClient,
    ino: Ino,
    cache: Option<Arc<BlockCache>>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Trusted until then.
    valid_until: Option<Instant>,
    /// Another client took it: never trusted again.
    lost: bool,
}

impl LeaseKeeper {
    /// Takes the lease on `ino`, waiting up to `wait` while another client
    /// holds it (its export may have died without giving it back).
    pub async fn acquire(
        files: FileClient,
        ino: Ino,
        cache: Option<Arc<BlockCache>>,
        wait: Duration,
    ) -> Result<Arc<LeaseKeeper>, ClientError> {
        let keeper = Arc::new(LeaseKeeper { files, ino, cache, state: Mutex::default() });
        let deadline = Instant::now() + wait;
        let mut said = false;
        loop {
            match keeper.renew_once().await {
                Ok(()) => return Ok(keeper),
                Err(e) if e.code() == ErrorCode::Busy && Instant::now() < deadline => {
                    if !said {
                        tracing::warn!(ino, error = %e, "the image is leased to another client; waiting for it to lapse");
                        said = true;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the lease is held now (as far as this process can tell).
    pub fn valid(&self) -> bool {
        let s = self.state();
        !s.lost && s.valid_until.is_some_and(|t| Instant::now() < t)
    }

    /// One renewal (or the first grant).
    async fn renew_once(&self) -> Result<(), ClientError> {
        let sent = Instant::now();
        match self.files.lease(self.ino, LEASE_TTL).await {
            Ok(l) => {
                if l.fenced > 0 || !self.valid() {
                    // Taken afresh: others may have written since we last
                    // held it.
                    if let Some(c) = &self.cache {
                        c.clear();
                    }
                }
                for u in &l.unfenced {
                    tracing::warn!(chunk = u.chunk, server = u.server, error = %u.error, "replica not fenced");
                }
                let mut s = self.state();
                if !s.lost {
                    s.valid_until = Some(sent + LEASE_TTL - CLOCK_MARGIN);
                }
                Ok(())
            }
            Err(e) => {
                if e.code() == ErrorCode::Busy {
                    let mut s = self.state();
                    if s.valid_until.is_some() && !s.lost {
                        tracing::error!(ino = self.ino, error = %e, "lost the image's lease to another client");
                    }
                    s.lost = s.valid_until.is_some();
                    s.valid_until = None;
                }
                if let Some(c) = &self.cache {
                    if !self.valid() {
                        c.clear();
                    }
                }
                Err(e)
            }
        }
    }

    /// Renews every [`RENEW_EVERY`] until the lease is lost or the task is
    /// aborted.
    pub fn spawn_renewals(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(RENEW_EVERY).await;
                if let Err(e) = me.renew_once().await {
                    if me.state().lost {
                        return;
                    }
                    tracing::warn!(ino = me.ino, error = %e, "lease renewal failed; retrying");
                }
            }
        })
    }

    /// Gives the lease back (best effort: it lapses anyway).
    pub async fn release(&self) {
        self.state().valid_until = None;
        if let Err(e) = self.files.lease(self.ino, Duration::ZERO).await {
            tracing::debug!(ino = self.ino, error = %e, "lease release failed; it will lapse");
        }
    }
}
