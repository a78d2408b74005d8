//! Flush: the point where everything written before becomes durable, in dependency order.
//!
//! 1. dirty refcount blocks are written (they depend on nothing; not with lazy refcounts, see
//!    `flush_plain`);
//! 2. dirty L2 slices are written: their dependencies (refcount blocks, data) are covered by one
//!    sync issued before the first of them;
//! 3. dirty L1 chunks likewise, after the L2 tables they point to;
//! 4. a final sync makes all of it, and all data written before, durable;
//! 5. queued frees whose tables are now durable are applied (after a grace period for in-flight
//!    requests); their refcount blocks become dirty and go out with the next flush.
//!
//! In the steady state of allocating writes this is two syncs per flush, however many requests
//! allocated since the last one.

use super::Qcow2;
use crate::error::{Error, Result};
use futures_util::future::try_join_all;

impl Qcow2 {
    /// Makes every completed write durable.
    ///
    /// After a failed fsync this fails with `EIO` until the image is reopened, whatever the
    /// storage would say now (`barrier`: poisoning).
    pub async fn flush(&self) -> Result<()> {
        self.check_open()?;
        if self.read_only {
            return Ok(());
        }
        self.check_not_failed()?;
        let r = match self.flush_seq_cache().await {
            Ok(()) => self.flush_plain().await,
            Err(e) => Err(e),
        };
        match r {
            // A metadata write refused as overlapping (see `overlap`): mark the image corrupt.
            Err(e @ Error::Corrupt(_)) => Err(self.signal_corruption(e).await),
            r => r,
        }
    }

    /// Flush without writing out a compressed target's cache (the cache's own writes use it).
    pub(crate) async fn flush_plain(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let _f = self.flush_lock.lock().await;
        // With lazy refcounts the image is dirty: its refcounts need not be durable (a crash
        // is repaired at the next open), and QEMU does not write them at a flush either. They
        // go out when a table is evicted, and all of them before the dirty bit is cleared
        // (`flush_for_close`, amend).
        let refcounts = !self.rc.lazy.load(std::sync::atomic::Ordering::Relaxed);
        self.flush_locked_with(refcounts).await
    }

    /// Fails once an fsync failed: no metadata is written back to such an image.
    fn check_not_failed(&self) -> Result<()> {
        if self.w.barrier.sync_failed() {
            return Err(Error::sync_failed());
        }
        Ok(())
    }

    /// Flushes everything, refcount blocks included.
    pub(crate) async fn flush_locked(&self) -> Result<()> {
        self.flush_locked_with(true).await
    }

    /// Flushes the L2 and L1 tables and the data, and the refcount blocks with `refcounts`.
    async fn flush_locked_with(&self, refcounts: bool) -> Result<()> {
        self.check_not_failed()?;
        if refcounts {
            self.rc.cache.write_back_all(&self.w).await?;
        }
        self.l2.write_back_all(&self.w).await?;
        let l1 = self.l1.dirty_chunks();
        try_join_all(l1.iter().map(|c| self.w.write_back(c))).await?;
        self.w.barrier.sync_now().await?;
        let zeroed = self.rc.apply_frees(&self.w, &self.epochs).await?;
        for c in zeroed {
            // A freed cluster may have held an L2 table: forget any cached slices of it.
            let base = self.geo.host_offset(c);
            let slices = self.geo.l2_entries() / self.slice_entries;
            for k in 0..slices {
                self.l2.discard(self.slice_offset(base, k));
            }
            self.rc.cache.discard(base);
        }
        Ok(())
    }

    /// Flushes until nothing is dirty or queued, then clears the dirty bit of lazy refcounts.
    pub(crate) async fn flush_for_close(&self) -> Result<()> {
        let _f = self.flush_lock.lock().await;
        for _ in 0..4 {
            self.flush_locked().await?;
            let clean = !self.rc.has_pending_frees()
                && self.rc.cache.dirty_tables().is_empty()
                && self.l2.dirty_tables().is_empty()
                && self.l1.dirty_chunks().is_empty();
            if clean {
                break;
            }
        }
        if self.rc.lazy.load(std::sync::atomic::Ordering::Relaxed) {
            // Refcounts are accurate again (all written and synced above).
            self.hdr
                .update(&self.w, |h| {
                    h.incompatible_features &= !crate::format::header::incompat::DIRTY
                })
                .await?;
            self.w.barrier.sync_now().await?;
            self.rc
                .lazy
                .store(false, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }
}
