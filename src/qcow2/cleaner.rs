//! The cache cleaner (`cache-clean-interval`): drops cached tables nobody used during the
//! interval, so that an idle image gives its memory back.
//!
//! It runs on one process-wide thread rather than as a task of the embedder's executor: a timer
//! task would tie the library to a tokio runtime with timers enabled (and panic without one), and
//! cleaning is a short synchronous pass over the caches anyway. The thread holds only weak
//! references; an image leaves its list when it is closed or dropped.

use super::Qcow2;
use parking_lot::{Condvar, Mutex};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

struct Entry {
    img: Weak<Qcow2>,
    every: Duration,
    next: Instant,
}

struct Cleaner {
    list: Mutex<Vec<Entry>>,
    changed: Condvar,
}

fn cleaner() -> Option<&'static Cleaner> {
    static CLEANER: OnceLock<Option<&'static Cleaner>> = OnceLock::new();
    *CLEANER.get_or_init(|| {
        let c: &'static Cleaner = Box::leak(Box::new(Cleaner {
            list: Mutex::new(Vec::new()),
            changed: Condvar::new(),
        }));
        match std::thread::Builder::new()
            .name("qimg-cache-cleaner".into())
            .spawn(move || c.run())
        {
            Ok(_) => Some(c),
            Err(e) => {
                tracing::warn!(
                    "cannot start the cache cleaner thread ({e}); caches are not cleaned"
                );
                None
            }
        }
    })
}

impl Cleaner {
    fn run(&self) {
        let mut list = self.list.lock();
        loop {
            list.retain(|e| e.img.upgrade().is_some_and(|img| !img.closed.load(Relaxed)));
            let now = Instant::now();
            for e in list.iter_mut().filter(|e| e.next <= now) {
                if let Some(img) = e.img.upgrade() {
                    img.l2.clean_unused();
                    img.rc.cache.clean_unused();
                }
                e.next = now + e.every;
            }
            match list.iter().map(|e| e.next).min() {
                Some(next) => {
                    let _ = self
                        .changed
                        .wait_for(&mut list, next.saturating_duration_since(now));
                }
                None => self.changed.wait(&mut list),
            }
        }
    }
}

/// Cleans `img`'s caches every `every` until it is closed or dropped. Returns false if the
/// cleaner thread could not be started (logged).
pub(crate) fn register(img: &Arc<Qcow2>, every: Duration) -> bool {
    let Some(c) = cleaner() else {
        return false;
    };
    c.list.lock().push(Entry {
        img: Arc::downgrade(img),
        every,
        next: Instant::now() + every,
    });
    c.changed.notify_one();
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::CacheMode;
    use crate::buf::{IoBuf, IoBufMut};
    use crate::qcow2::{create, CreateOptions, Qcow2Options};
    use crate::storage::memory::MemoryStorage;

    /// Tables unused for two intervals leave the cache, with no timer of the runtime involved.
    #[test]
    fn idle_tables_leave_the_cache() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let mem = Arc::new(MemoryStorage::new());
            let o = CreateOptions {
                size: 64 << 20,
                cluster_size: 4096,
                ..Default::default()
            };
            create(mem.clone(), &o).await.unwrap();
            let img = Arc::new(
                Qcow2::open(
                    mem,
                    "c".into(),
                    &Qcow2Options::default(),
                    false,
                    CacheMode::Writeback,
                )
                .await
                .unwrap(),
            );
            for i in 0..8u64 {
                img.write_at(i << 21, IoBuf::copy_from(&[1u8; 4096]))
                    .await
                    .unwrap();
            }
            img.flush().await.unwrap();
            let _ = img.read_at(0, IoBufMut::zeroed(4096)).await.unwrap();
            assert!(img.l2.len() >= 8);
            assert!(register(&img, Duration::from_millis(20)));
            let deadline = Instant::now() + Duration::from_secs(5);
            while !img.l2.is_empty() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            assert!(img.l2.is_empty(), "{} tables still cached", img.l2.len());
            img.close().await.unwrap();
        });
    }
}
