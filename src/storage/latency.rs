//! A wrapper that delays every operation by a fixed time (seed 002: measure cache and CPU
//! effects without disk noise by keeping the image in memory and adding a constant latency).
//!
//! tokio's timer has millisecond resolution, far too coarse for 100 µs latencies, so delays are
//! served by one dedicated timer thread that sleeps on a condition variable with a 1 ns timer
//! slack and wakes requests in deadline order.

use super::{IoFuture, Storage};
use crate::buf::{IoBuf, IoBufMut};
use parking_lot::{Condvar, Mutex};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

struct Pending {
    deadline: Instant,
    seq: u64,
    wake: oneshot::Sender<()>,
}

impl PartialEq for Pending {
    fn eq(&self, o: &Self) -> bool {
        (self.deadline, self.seq) == (o.deadline, o.seq)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Pending {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.deadline, self.seq).cmp(&(o.deadline, o.seq))
    }
}

#[derive(Default)]
struct TimerState {
    heap: BinaryHeap<Reverse<Pending>>,
    seq: u64,
}

/// A high-resolution timer shared by all latency wrappers.
struct PreciseTimer {
    state: Mutex<TimerState>,
    wake: Condvar,
}

impl PreciseTimer {
    fn global() -> &'static Arc<PreciseTimer> {
        static TIMER: OnceLock<Arc<PreciseTimer>> = OnceLock::new();
        TIMER.get_or_init(|| {
            let t = Arc::new(PreciseTimer {
                state: Mutex::new(TimerState::default()),
                wake: Condvar::new(),
            });
            let t2 = t.clone();
            std::thread::Builder::new()
                .name("qimg-timer".into())
                .spawn(move || t2.run())
                .expect("cannot start the latency timer thread");
            t
        })
    }

    fn run(&self) {
        let _ = rustix::thread::set_current_timer_slack(std::num::NonZeroU64::new(1));
        let mut st = self.state.lock();
        loop {
            let now = Instant::now();
            while st.heap.peek().is_some_and(|Reverse(p)| p.deadline <= now) {
                if let Some(Reverse(p)) = st.heap.pop() {
                    let _ = p.wake.send(());
                }
            }
            match st.heap.peek() {
                Some(Reverse(p)) => {
                    let deadline = p.deadline;
                    self.wake.wait_until(&mut st, deadline);
                }
                None => self.wake.wait(&mut st),
            }
        }
    }

    async fn sleep(&self, d: Duration) {
        let (tx, rx) = oneshot::channel();
        {
            let mut st = self.state.lock();
            st.seq += 1;
            let seq = st.seq;
            st.heap.push(Reverse(Pending {
                deadline: Instant::now() + d,
                seq,
                wake: tx,
            }));
        }
        self.wake.notify_one();
        let _ = rx.await;
    }
}

/// Delays every operation of the inner storage by `delay`.
pub struct LatencyStorage<S> {
    inner: S,
    delay: Duration,
}

impl<S: Storage> LatencyStorage<S> {
    pub fn new(inner: S, delay: Duration) -> Self {
        LatencyStorage { inner, delay }
    }

    async fn wait(&self) {
        if !self.delay.is_zero() {
            PreciseTimer::global().sleep(self.delay).await;
        }
    }
}

impl<S: Storage> Storage for LatencyStorage<S> {
    fn read_at(&self, buf: IoBufMut, offset: u64) -> IoFuture<'_, io::Result<IoBufMut>> {
        Box::pin(async move {
            self.wait().await;
            self.inner.read_at(buf, offset).await
        })
    }
    fn write_at(&self, buf: IoBuf, offset: u64) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async move {
            self.wait().await;
            self.inner.write_at(buf, offset).await
        })
    }
    fn flush(&self) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async move {
            self.wait().await;
            self.inner.flush().await
        })
    }
    fn len(&self) -> IoFuture<'_, io::Result<u64>> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async move {
            self.wait().await;
            self.inner.set_len(len).await
        })
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async move {
            self.wait().await;
            self.inner.write_zeroes(offset, len).await
        })
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async move {
            self.wait().await;
            self.inner.discard(offset, len).await
        })
    }
    fn allocate(&self, offset: u64, len: u64) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async move {
            self.wait().await;
            self.inner.allocate(offset, len).await
        })
    }
    fn allocated_bytes(&self) -> Option<u64> {
        self.inner.allocated_bytes()
    }
    fn hole_at(&self, offset: u64, max: u64) -> IoFuture<'_, io::Result<(bool, u64)>> {
        self.inner.hole_at(offset, max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::memory::MemoryStorage;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn delays_are_applied_and_concurrent() {
        let s = Arc::new(LatencyStorage::new(
            MemoryStorage::new(),
            Duration::from_micros(2000),
        ));
        let start = Instant::now();
        s.write_at(IoBuf::copy_from(b"x"), 0).await.unwrap();
        let one = start.elapsed();
        assert!(one >= Duration::from_micros(2000), "{one:?}");
        // 50 concurrent operations overlap: far less than 50 delays in total.
        let start = Instant::now();
        let futs = (0..50).map(|i| s.read_at(IoBufMut::zeroed(1), i));
        futures_util::future::join_all(futs).await;
        assert!(
            start.elapsed() < Duration::from_millis(50),
            "{:?}",
            start.elapsed()
        );
    }
}
