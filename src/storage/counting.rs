//! A wrapper that counts storage operations (for `--stats`, tests of "how many flushes did this
//! take", and metadata-I/O assertions).

use super::{IoFuture, Storage};
use crate::buf::{IoBuf, IoBufMut};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

/// Operation counters. All counters are monotonic.
#[derive(Debug, Default)]
pub struct Counters {
    pub reads: AtomicU64,
    pub read_bytes: AtomicU64,
    pub writes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub flushes: AtomicU64,
    pub zero_writes: AtomicU64,
    pub discards: AtomicU64,
    pub other: AtomicU64,
}

/// A plain copy of the counters at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CountSnapshot {
    pub reads: u64,
    pub read_bytes: u64,
    pub writes: u64,
    pub write_bytes: u64,
    pub flushes: u64,
    pub zero_writes: u64,
    pub discards: u64,
    pub other: u64,
}

impl Counters {
    pub fn snapshot(&self) -> CountSnapshot {
        CountSnapshot {
            reads: self.reads.load(Relaxed),
            read_bytes: self.read_bytes.load(Relaxed),
            writes: self.writes.load(Relaxed),
            write_bytes: self.write_bytes.load(Relaxed),
            flushes: self.flushes.load(Relaxed),
            zero_writes: self.zero_writes.load(Relaxed),
            discards: self.discards.load(Relaxed),
            other: self.other.load(Relaxed),
        }
    }
}

impl std::ops::Sub for CountSnapshot {
    type Output = CountSnapshot;
    fn sub(self, o: CountSnapshot) -> CountSnapshot {
        CountSnapshot {
            reads: self.reads - o.reads,
            read_bytes: self.read_bytes - o.read_bytes,
            writes: self.writes - o.writes,
            write_bytes: self.write_bytes - o.write_bytes,
            flushes: self.flushes - o.flushes,
            zero_writes: self.zero_writes - o.zero_writes,
            discards: self.discards - o.discards,
            other: self.other - o.other,
        }
    }
}

/// Counts every operation passed to the inner storage.
pub struct CountingStorage<S> {
    inner: S,
    counters: Arc<Counters>,
}

impl<S: Storage> CountingStorage<S> {
    pub fn new(inner: S) -> Self {
        CountingStorage {
            inner,
            counters: Arc::default(),
        }
    }

    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }
}

impl<S: Storage> Storage for CountingStorage<S> {
    fn read_at(&self, buf: IoBufMut, offset: u64) -> IoFuture<'_, io::Result<IoBufMut>> {
        self.counters.reads.fetch_add(1, Relaxed);
        self.counters
            .read_bytes
            .fetch_add(buf.len() as u64, Relaxed);
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: IoBuf, offset: u64) -> IoFuture<'_, io::Result<()>> {
        self.counters.writes.fetch_add(1, Relaxed);
        self.counters
            .write_bytes
            .fetch_add(buf.len() as u64, Relaxed);
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> IoFuture<'_, io::Result<()>> {
        self.counters.flushes.fetch_add(1, Relaxed);
        self.inner.flush()
    }
    fn len(&self) -> IoFuture<'_, io::Result<u64>> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> IoFuture<'_, io::Result<()>> {
        self.counters.other.fetch_add(1, Relaxed);
        self.inner.set_len(len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> IoFuture<'_, io::Result<()>> {
        self.counters.zero_writes.fetch_add(1, Relaxed);
        self.inner.write_zeroes(offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, io::Result<()>> {
        self.counters.discards.fetch_add(1, Relaxed);
        self.inner.discard(offset, len)
    }
    fn allocate(&self, offset: u64, len: u64) -> IoFuture<'_, io::Result<()>> {
        self.counters.other.fetch_add(1, Relaxed);
        self.inner.allocate(offset, len)
    }
    fn allocated_bytes(&self) -> Option<u64> {
        self.inner.allocated_bytes()
    }
    fn hole_at(&self, offset: u64, max: u64) -> IoFuture<'_, io::Result<(bool, u64)>> {
        self.inner.hole_at(offset, max)
    }
}
