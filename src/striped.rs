//! Counters split across cache lines, one stripe per thread (modulo the stripe count).
//!
//! A single atomic that every request increments is a cache line that both cores fight over on
//! every request; at millions of requests per second that costs more than the request's own
//! work. A striped counter is incremented on the caller's own stripe and summed only when read
//! (rarely: statistics, grace periods).

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Number of stripes: enough that threads of a small pool rarely share one.
pub const STRIPES: usize = 16;

/// One atomic alone on its cache line (128 bytes: adjacent-line prefetch pairs lines).
#[derive(Default)]
#[repr(align(128))]
pub struct Padded(pub AtomicU64);

/// The calling thread's stripe (fixed for the thread's life, assigned round-robin).
pub fn stripe() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static MINE: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    MINE.with(|m| {
        let s = m.get();
        if s != usize::MAX {
            return s;
        }
        let s = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
        m.set(s);
        s
    })
}

/// A monotonic statistics counter.
#[derive(Default)]
pub struct StripedCounter {
    stripes: [Padded; STRIPES],
}

impl StripedCounter {
    pub fn add(&self, n: u64) {
        self.stripes[stripe()].0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn incr(&self) {
        self.add(1);
    }

    /// The total (not a snapshot: concurrent increments may or may not be included).
    pub fn load(&self) -> u64 {
        self.stripes
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn sums_increments_from_many_threads() {
        let c = Arc::new(StripedCounter::default());
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        c.incr();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        c.add(5);
        assert_eq!(c.load(), 8005);
    }
}
