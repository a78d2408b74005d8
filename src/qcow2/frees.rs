//! The free scheduler: queued frees are applied on a bounded schedule, not only when the guest
//! flushes.
//!
//! A freed cluster may be reused only once the table that dropped its reference is durable (and
//! no request still uses the old mapping), so frees wait for a flush (`refcount::defer_free`).
//! A guest that discards or rewrites and never flushes would then grow the file without bound.
//! When the queue passes a size, a count or an age (`refcount::FREE_SOON_*`), this task runs an
//! ordinary flush on the image's behalf: same ordering rules, same code path, at most one flush
//! per batch of frees. It holds only a weak reference: it never keeps a dropped image alive, and
//! `close` stops it (between flushes: a flush that took frees off the queue must finish them).
//!
//! A background flush can lag behind a fast writer on a slow disk, so there is also a hard limit
//! (`refcount::FREE_HARD_*`, twice the soft one): past it, the next write, write-zeroes or
//! discard flushes itself before allocating (`apply_frees_if_overdue`, one relaxed load when not
//! needed). The file stays bounded whatever the timing.

use super::Qcow2;
use std::sync::{Arc, Weak};

impl Qcow2 {
    /// Backpressure: when queued frees pass the hard limit (the background flush lags behind a
    /// fast writer), the request flushes itself, which applies them, before allocating more.
    pub(crate) async fn apply_frees_if_overdue(&self) -> crate::Result<()> {
        if self.rc.frees_overdue() {
            self.flush_plain().await?;
        }
        Ok(())
    }

    /// Starts the task that flushes when queued frees ask for it (writable images only).
    pub(crate) fn start_free_scheduler(self: &Arc<Self>) -> Option<tokio::task::JoinHandle<()>> {
        if self.read_only {
            return None;
        }
        let wanted = self.rc.free_wanted.clone();
        let weak: Weak<Qcow2> = Arc::downgrade(self);
        Some(tokio::spawn(async move {
            loop {
                wanted.notified().await;
                let Some(img) = weak.upgrade() else { return };
                if let Err(e) = img.flush_plain().await {
                    // The next guest flush reports it (and a failed sync poisons the image).
                    tracing::warn!("{}: flush to apply queued frees failed: {e}", img.filename);
                }
            }
        }))
    }
}
