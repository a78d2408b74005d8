//! Durability barriers: which writes are known to be on stable storage.
//!
//! Every `fsync` gets a number. A write that completes while `started == g` is made durable by
//! any fsync numbered `> g`, i.e. one that started after the write completed. Dependencies are
//! expressed as "an fsync after generation g has completed" ([`Barrier::sync_after`]), which
//! lets many dependent writes share one fsync: concurrent callers queue on one mutex and find
//! their need already met by the fsync that ran before them.

use crate::error::{IoContext, Result};
use crate::storage::StorageRef;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

pub struct Barrier {
    storage: StorageRef,
    /// Number of the last fsync started.
    started: AtomicU64,
    /// Number of the last fsync completed successfully.
    completed: AtomicU64,
    lock: tokio::sync::Mutex<()>,
    /// Total fsyncs issued (statistics).
    pub count: AtomicU64,
}

impl Barrier {
    pub fn new(storage: StorageRef) -> Self {
        Barrier {
            storage,
            started: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            lock: tokio::sync::Mutex::new(()),
            count: AtomicU64::new(0),
        }
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
        let n = self.started.fetch_add(1, SeqCst) + 1;
        self.count.fetch_add(1, SeqCst);
        self.storage
            .flush()
            .await
            .context(|| "flushing the image file".to_string())?;
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
    use crate::storage::memory::MemoryStorage;
    use std::sync::Arc;

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
