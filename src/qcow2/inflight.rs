//! Coordination between concurrent requests.
//!
//! - [`Claims`]: a request that will change the L2 entries of some guest clusters (allocating
//!   write, zero write, discard) claims them first, atomically with looking at their mapping.
//!   Another request touching a claimed cluster waits for the claim to end and looks again. This
//!   makes overlapping writes behave as if serialized (no double allocation, no lost write) while
//!   the data I/O runs without any lock. The same type serializes L2 table allocation per L1
//!   index.
//! - [`IoEpochs`]: a host cluster may only be reused once no request that could still be using
//!   its old mapping is in flight. Every data request holds an [`IoGuard`] from before its
//!   mapping lookup until its I/O is done; freeing clusters waits for a grace period in which all
//!   guards older than the free have been dropped (the idea of RCU).

use crate::striped::{stripe, Padded, STRIPES};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use tokio::sync::Notify;

/// A one-shot event that can be awaited by many.
#[derive(Default, Debug)]
pub struct Event {
    done: AtomicBool,
    notify: Notify,
}

impl Event {
    pub fn set(&self) {
        self.done.store(true, SeqCst);
        self.notify.notify_waiters();
    }

    pub async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.done.load(SeqCst) {
                return;
            }
            notified.await;
        }
    }
}

struct ClaimEntry {
    end: u64,
    done: Arc<Event>,
}

/// Exclusive claims on ranges of keys (guest clusters, or L1 indices).
#[derive(Default)]
pub struct Claims {
    map: Mutex<BTreeMap<u64, ClaimEntry>>,
}

/// An active claim; dropping it releases the range and wakes waiters.
#[must_use = "dropping a claim releases it immediately"]
pub struct Claim<'a> {
    claims: &'a Claims,
    start: u64,
    done: Arc<Event>,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.claims.map.lock().remove(&self.start);
        self.done.set();
    }
}

impl Claims {
    /// Claims `[start, end)` if nothing in it is claimed; otherwise returns an event to wait for.
    pub fn try_claim(&self, start: u64, end: u64) -> Result<Claim<'_>, Arc<Event>> {
        debug_assert!(start < end);
        let mut map = self.map.lock();
        if let Some(conflict) = Self::conflict(&map, start, end) {
            return Err(conflict);
        }
        let done = Arc::new(Event::default());
        map.insert(
            start,
            ClaimEntry {
                end,
                done: done.clone(),
            },
        );
        Ok(Claim {
            claims: self,
            start,
            done,
        })
    }

    /// The event of a claim overlapping `[start, end)`, if any.
    pub fn conflicting(&self, start: u64, end: u64) -> Option<Arc<Event>> {
        Self::conflict(&self.map.lock(), start, end)
    }

    fn conflict(map: &BTreeMap<u64, ClaimEntry>, start: u64, end: u64) -> Option<Arc<Event>> {
        // The claim starting at or before `start` may extend into the range...
        if let Some((_, e)) = map.range(..=start).next_back() {
            if e.end > start {
                return Some(e.done.clone());
            }
        }
        // ...and any claim starting inside the range overlaps it.
        map.range(start..end).next().map(|(_, e)| e.done.clone())
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.map.lock().is_empty()
    }
}

/// Grace periods for host cluster reuse.
///
/// The counts of active guards are striped per thread (`crate::striped`): every read and write
/// enters and leaves, so one shared counter would be the hottest cache line of the engine. A
/// guard leaves on the stripe it entered, so each stripe's count is exact; only their sum means
/// anything, and only the grace period reads it.
#[derive(Default)]
pub struct IoEpochs {
    epoch: AtomicU64,
    active: [[Padded; STRIPES]; 2],
    drained: Notify,
}

/// Held by a request while it may use host offsets it looked up.
pub struct IoGuard<'a> {
    epochs: &'a IoEpochs,
    parity: usize,
    stripe: usize,
}

impl Drop for IoGuard<'_> {
    fn drop(&mut self) {
        self.epochs.leave(self.parity, self.stripe);
    }
}

impl IoEpochs {
    pub fn enter(&self) -> IoGuard<'_> {
        let stripe = stripe();
        loop {
            let e = self.epoch.load(SeqCst);
            let parity = (e & 1) as usize;
            self.active[parity][stripe].0.fetch_add(1, SeqCst);
            if self.epoch.load(SeqCst) == e {
                return IoGuard {
                    epochs: self,
                    parity,
                    stripe,
                };
            }
            // A grace period started meanwhile: register in the new epoch instead.
            self.leave(parity, stripe);
        }
    }

    fn leave(&self, parity: usize, stripe: usize) {
        // Only a guard of an epoch that a grace period is waiting for (its parity is no longer
        // the current one) needs to wake it, and only when its stripe empties. SeqCst on both
        // sides: either the waiter sees this decrement, or this load sees its epoch increment.
        if self.active[parity][stripe].0.fetch_sub(1, SeqCst) == 1
            && (self.epoch.load(SeqCst) & 1) as usize != parity
        {
            self.drained.notify_waiters();
        }
    }

    fn active_in(&self, parity: usize) -> u64 {
        self.active[parity].iter().map(|s| s.0.load(SeqCst)).sum()
    }

    /// Waits until every guard entered before this call has been dropped. Callers must not run
    /// two grace periods at once (the flush lock serializes them).
    pub async fn grace_period(&self) {
        let e = self.epoch.fetch_add(1, SeqCst);
        let parity = (e & 1) as usize;
        loop {
            let notified = self.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.active_in(parity) == 0 {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn claims_exclude_overlaps() {
        let c = Claims::default();
        let a = c.try_claim(10, 20).unwrap();
        assert!(c.try_claim(15, 16).is_err());
        assert!(c.try_claim(5, 11).is_err());
        assert!(c.try_claim(19, 30).is_err());
        let b = c.try_claim(20, 30).unwrap();
        let d = c.try_claim(0, 10).unwrap();
        let ev = c.conflicting(12, 13).unwrap();
        drop(a);
        ev.wait().await;
        assert!(c.try_claim(12, 13).is_ok());
        drop((b, d));
        assert!(c.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn grace_period_waits_for_older_guards_only() {
        let e = Arc::new(IoEpochs::default());
        let g = e.enter();
        let e2 = e.clone();
        let waiter = tokio::spawn(async move { e2.grace_period().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let newer = e.enter(); // entered after the grace period began: not waited for
        assert!(!waiter.is_finished());
        drop(g);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("grace period ended")
            .unwrap();
        drop(newer);
    }
}
