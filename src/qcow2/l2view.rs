//! Per-thread read-only copies of hot L2 slices: cached reads that touch no shared cache line.
//!
//! A cached lookup through [`MetaCache`](super::cache::MetaCache) takes the cache's index mutex
//! and the slice's state mutex. Both are writes to memory every core shares, and with a few hot
//! slices (a 1 GiB image has two) the cores spend more time passing those lines back and forth
//! than decoding entries. A thread that keeps reading the same slices while nothing changes
//! keeps its own copy of each and reads that instead.
//!
//! Validity is one process-wide counter, the *content epoch*, bumped before any change that
//! could make a copy stale: every table modification (`TableState::modify`, which L1 chunks use
//! too), every table inserted into or removed from a cache, L1 replacement, and cache creation
//! and teardown. A copy tagged with the current epoch is exactly the table as it is now (the
//! bump precedes the change, under the table's lock), so using it is the same as having looked
//! the entries up at that instant. The counter is only read on the hot path, so while nothing
//! changes its line stays shared by all cores. Under a write load the epoch moves all the time
//! and no copy is made: a thread only copies a slice when the epoch has not moved since its
//! previous lookup. Host offsets found through a copy are protected exactly like those found
//! through the cache: the caller holds an I/O epoch guard from before the lookup (`inflight`).
//!
//! Memory: at most [`SLOTS`] copies of at most [`MAX_SLICE`] bytes per thread.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

/// Copies kept per thread (direct mapped).
const SLOTS: usize = 16;
/// Largest slice copied (bigger slices always take the shared path).
pub const MAX_SLICE: usize = 64 << 10;

static CONTENT_EPOCH: AtomicU64 = AtomicU64::new(0);

/// The current content epoch.
#[inline]
pub fn epoch() -> u64 {
    CONTENT_EPOCH.load(SeqCst)
}

/// Invalidates every copy in every thread. Call before making the change.
#[inline]
pub fn bump() {
    CONTENT_EPOCH.fetch_add(1, SeqCst);
}

struct Copy {
    cache: usize,
    offset: u64,
    epoch: u64,
    data: Box<[u8]>,
}

#[derive(Default)]
struct Views {
    slots: Vec<Option<Copy>>,
    /// The epoch at this thread's previous shared-path lookup.
    last_epoch: Option<u64>,
}

thread_local! {
    static VIEWS: RefCell<Views> = RefCell::new(Views::default());
}

fn slot_of(cache: usize, offset: u64) -> usize {
    let h = (cache as u64 ^ offset.rotate_right(12)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (h >> 60) as usize % SLOTS
}

/// Runs `f` on this thread's copy of the slice at `offset` of `cache` if it is current.
pub fn with_copy<R>(cache: usize, offset: u64, now: u64, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
    VIEWS.with(|v| {
        let v = v.borrow();
        match v.slots.get(slot_of(cache, offset)) {
            Some(Some(c)) if c.cache == cache && c.offset == offset && c.epoch == now => {
                Some(f(&c.data))
            }
            _ => None,
        }
    })
}

/// Notes a shared-path lookup at epoch `now`; true if the epoch has not moved since this
/// thread's previous one (then a copy is worth making).
pub fn settled(now: u64) -> bool {
    VIEWS.with(|v| {
        let mut v = v.borrow_mut();
        let same = v.last_epoch == Some(now);
        v.last_epoch = Some(now);
        same
    })
}

/// Keeps a copy of `data`, the slice at `offset` of `cache` as of epoch `now` (read under the
/// slice's lock after `now` was loaded).
pub fn keep(cache: usize, offset: u64, now: u64, data: &[u8]) {
    if data.len() > MAX_SLICE {
        return;
    }
    VIEWS.with(|v| {
        let mut v = v.borrow_mut();
        if v.slots.is_empty() {
            v.slots.resize_with(SLOTS, || None);
        }
        let slot = &mut v.slots[slot_of(cache, offset)];
        match slot {
            Some(c) if c.data.len() == data.len() => {
                c.data.copy_from_slice(data);
                c.cache = cache;
                c.offset = offset;
                c.epoch = now;
            }
            _ => {
                *slot = Some(Copy {
                    cache,
                    offset,
                    epoch: now,
                    data: data.into(),
                })
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_are_used_only_at_their_epoch() {
        let now = epoch();
        keep(1, 4096, now, &[7u8; 64]);
        assert_eq!(with_copy(1, 4096, now, |d| d[0]), Some(7));
        assert_eq!(with_copy(2, 4096, now, |d| d[0]), None, "another cache");
        assert_eq!(with_copy(1, 8192, now, |d| d[0]), None, "another slice");
        bump();
        assert_eq!(
            with_copy(1, 4096, epoch(), |d| d[0]),
            None,
            "stale after a change"
        );
        keep(1, 4096, now, &vec![0u8; MAX_SLICE + 1]);
        assert_eq!(
            with_copy(1, 4096, now, |d| d.len()),
            Some(64),
            "big slices not kept"
        );
    }

    #[test]
    fn copies_are_only_made_once_the_epoch_settles() {
        // Epochs passed explicitly: other tests may bump the global one concurrently.
        let now = epoch();
        settled(now + 100);
        assert!(!settled(now), "the epoch moved since the previous lookup");
        assert!(settled(now), "unchanged since the previous lookup");
        assert!(!settled(now + 1));
    }
}
