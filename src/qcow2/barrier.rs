//! Durability barriers: which writes are known to be on stable storage.
//!
//! Every `fsync` gets a number. A write that completes while `started == g` is made durable by
//! any fsync numbered `> g`, i.e. one that started after the write completed. Dependencies are
//! expressed as "an fsync after generation g has completed" ([`Barrier::sync_after`]), which
//! lets many dependent writes share one fsync: concurrent callers queue on one mutex and find
//! their need already met by the fsync that ran before them.
//!
//! # Failure (poisoning)
//! A failed fsync poisons the image for the rest of the session. Linux reports a failed
//! writeback once and marks the pages clean: the next fsync "succeeds" although the data (or
//! metadata) written before the failed one may never reach the disk. Counting that later fsync
//! as covering those writes would let the metadata cache treat lost tables as durable and write
//! pointers to them. So after a failure no fsync is issued again, `completed` never moves, every
//! later sync (and, through [`Barrier::writable`], every write) fails with `EIO` until the image
//! is reopened. The image's corruption flag lives in the same word, so a request checks both with
//! one relaxed load.

use crate::error::{Error, IoContext, Result};
use crate::storage::StorageRef;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed, Ordering::SeqCst};

/// Corruption was found in this session (the corrupt bit is set): writes are refused.
const CORRUPT: u8 = 1;
/// An fsync failed in this session: flushes and writes fail with `EIO`.
const SYNC_FAILED: u8 = 2;

pub struct Barrier {
    storage: StorageRef,
    /// An external data file, flushed before `storage`: data must be durable before the
    /// metadata that points at it (`data_file`).
    data: Option<StorageRef>,
    /// Number of the last fsync started.
    started: AtomicU64,
    /// Number of the last fsync completed successfully.
    completed: AtomicU64,
    lock: tokio::sync::Mutex<()>,
    /// Total fsyncs issued (statistics).
    pub count: AtomicU64,
    /// `CORRUPT` | `SYNC_FAILED`.
    health: AtomicU8,
}

/// Why a write is refused on an image whose health word is not clear.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unwritable {
    Corrupt,
    SyncFailed,
}

impl Barrier {
    pub fn new(storage: StorageRef) -> Self {
        Self::with_data_file(storage, None)
    }

    /// A barrier over the image file and an external data file.
    pub fn with_data_file(storage: StorageRef, data: Option<StorageRef>) -> Self {
        Barrier {
            storage,
            data,
            started: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            lock: tokio::sync::Mutex::new(()),
            count: AtomicU64::new(0),
            health: AtomicU8::new(0),
        }
    }

    /// Whether the image may be written: one relaxed load (the request hot path).
    #[inline]
    pub fn writable(&self) -> std::result::Result<(), Unwritable> {
        let h = self.health.load(Relaxed);
        if h == 0 {
            Ok(())
        } else if h & SYNC_FAILED != 0 {
            Err(Unwritable::SyncFailed)
        } else {
            Err(Unwritable::Corrupt)
        }
    }

    /// Whether an fsync failed in this session.
    pub fn sync_failed(&self) -> bool {
        self.health.load(Relaxed) & SYNC_FAILED != 0
    }

    pub fn is_corrupt(&self) -> bool {
        self.health.load(Relaxed) & CORRUPT != 0
    }

    /// Marks the image corrupt; returns whether it already was.
    pub fn mark_corrupt(&self) -> bool {
        self.health.fetch_or(CORRUPT, Relaxed) & CORRUPT != 0
    }

    /// The generation to record for a write that has just completed.
    pub fn generation(&self) -> u64 {
        self.started.load(SeqCst)
    }

    /// Whether writes completed at generation `g` are durable.
    pub fn is_durable(&self, g: u64) -> bool {
        self.completed.load(SeqCst) > g
    }

    /// Ensures writes completed at generation `g` are durable, issuing an fsync if needed.
    pub async fn sync_after(&self, g: u64) -> Result<()> {
        if self.is_durable(g) {
            return Ok(());
        }
        let _l = self.lock.lock().await;
        if self.is_durable(g) {
            return Ok(());
        }
        if self.sync_failed() {
            return Err(Error::sync_failed());
        }
        let n = self.started.fetch_add(1, SeqCst) + 1;
        self.count.fetch_add(1, SeqCst);
        let data = match &self.data {
            Some(d) => d.flush().await.map_err(|e| (e, "the data file")),
            None => Ok(()),
        };
        let flushed = match data {
            Ok(()) => self
                .storage
                .flush()
                .await
                .map_err(|e| (e, "the image file")),
            Err(e) => Err(e),
        };
        if let Err((e, what)) = flushed {
            // Under the lock: no later fsync can start before the poison is visible.
            self.health.fetch_or(SYNC_FAILED, SeqCst);
            tracing::error!("flushing {what} failed ({e}): no more writes or flushes");
            return Err(e).context(|| format!("flushing {what}"));
        }
        self.completed.fetch_max(n, SeqCst);
        Ok(())
    }

    /// A full barrier: everything completed before this call becomes durable.
    pub async fn sync_now(&self) -> Result<()> {
        self.sync_after(self.generation()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::counting::CountingStorage;
    use crate::storage::fault::{FaultError, FaultStorage, OpKind};
    use crate::storage::memory::MemoryStorage;
    use std::sync::Arc;

    #[tokio::test]
    async fn a_failed_sync_is_never_covered_by_a_later_one() {
        let s = Arc::new(FaultStorage::new(MemoryStorage::new()));
        let faults = s.handle();
        let b = Barrier::new(s.clone());
        b.sync_now().await.unwrap();
        let g = b.generation();
        faults.fail_nth(OpKind::Flush, 1, FaultError::Io);
        assert!(b.sync_after(g).await.is_err());
        // The storage's next fsync would succeed (as Linux's does after a failed writeback),
        // but the writes of generation g may be lost: they must never count as durable.
        let e = b
            .sync_after(g)
            .await
            .expect_err("a sync after a failed sync succeeded");
        assert_eq!(e.errno(), 5);
        assert!(!b.is_durable(g));
        assert_eq!(b.writable(), Err(Unwritable::SyncFailed));
        assert_eq!(
            faults.count(OpKind::Flush),
            2,
            "no fsync issued after the failure"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn coalesces_concurrent_syncs() {
        let s = Arc::new(CountingStorage::new(MemoryStorage::new()));
        let counters = s.counters();
        let b = Arc::new(Barrier::new(s));
        let g = b.generation();
        assert!(!b.is_durable(g));
        let futs = (0..20).map(|_| {
            let b = b.clone();
            async move { b.sync_after(g).await.unwrap() }
        });
        futures_util::future::join_all(futs).await;
        assert!(b.is_durable(g));
        assert_eq!(counters.snapshot().flushes, 1);
        // A write completing now needs a new sync.
        let g2 = b.generation();
        assert!(!b.is_durable(g2));
        b.sync_after(g2).await.unwrap();
        assert_eq!(counters.snapshot().flushes, 2);
    }
}
