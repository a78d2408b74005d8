//! A fault-injecting wrapper for failure tests (modelled on QEMU's `blkdebug`).
//!
//! Real disks fail: a write returns `EIO`, a file system runs out of space (`ENOSPC`), an
//! `fdatasync` reports that writeback failed. The engine must turn each of these into an error
//! for the request that met it, never a panic, and must never report durability it does not
//! have afterwards. To test that, [`FaultStorage`] wraps any [`Storage`] and fails chosen
//! operations: the N-th operation of one kind (reads, writes, flushes, length changes, zero
//! writes, discards, allocations are counted separately), or every operation of a kind from the
//! N-th on. Rules are set and cleared through a [`FaultHandle`] that the test keeps while the
//! engine owns the storage.
//!
//! A failed operation does not reach the wrapped storage: a failed write leaves the old content,
//! a failed flush makes nothing durable. The wrapped storage's later operations succeed again
//! unless a rule says otherwise, which is exactly the Linux behaviour the engine has to survive
//! (a failed writeback is reported once, the next `fdatasync` "succeeds").

use super::{IoFuture, Storage};
use crate::buf::{IoBuf, IoBufMut};
use parking_lot::Mutex;
use std::io;
use std::sync::Arc;

/// The kinds of storage operation, counted separately.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpKind {
    Read,
    Write,
    Flush,
    SetLen,
    WriteZeroes,
    Discard,
    Allocate,
}

impl OpKind {
    pub const ALL: [OpKind; 7] = [
        OpKind::Read,
        OpKind::Write,
        OpKind::Flush,
        OpKind::SetLen,
        OpKind::WriteZeroes,
        OpKind::Discard,
        OpKind::Allocate,
    ];

    fn index(self) -> usize {
        self as usize
    }
}

/// The error an injected fault returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultError {
    /// `EIO`: the device failed.
    Io,
    /// `ENOSPC`: the file system is full.
    NoSpace,
}

impl FaultError {
    pub fn errno(self) -> i32 {
        match self {
            FaultError::Io => 5,       // EIO
            FaultError::NoSpace => 28, // ENOSPC
        }
    }

    fn to_io(self) -> io::Error {
        io::Error::from_raw_os_error(self.errno())
    }
}

/// When a rule fires.
#[derive(Clone, Copy, Debug)]
struct Rule {
    /// The operation number (of this kind, counting from 1 since the storage was made) that fails.
    at: u64,
    /// Every later operation of the kind fails too.
    sticky: bool,
    error: FaultError,
}

#[derive(Default)]
struct State {
    /// Operations of each kind seen so far (failed ones included).
    counts: [u64; 7],
    rules: [Option<Rule>; 7],
    /// Faults injected so far, per kind.
    injected: [u64; 7],
}

/// The shared programming interface of a [`FaultStorage`]: keep it in the test, arm and disarm
/// faults while the engine runs.
#[derive(Clone, Default)]
pub struct FaultHandle {
    state: Arc<Mutex<State>>,
}

impl FaultHandle {
    /// Fails the `n`-th operation of `kind` from now (`n = 1`: the next one) with `error`. Later
    /// operations succeed. Replaces any rule for `kind`.
    pub fn fail_nth(&self, kind: OpKind, n: u64, error: FaultError) {
        self.arm(kind, n, false, error);
    }

    /// Fails the `n`-th operation of `kind` from now and every later one.
    pub fn fail_from(&self, kind: OpKind, n: u64, error: FaultError) {
        self.arm(kind, n, true, error);
    }

    fn arm(&self, kind: OpKind, n: u64, sticky: bool, error: FaultError) {
        let mut st = self.state.lock();
        let at = st.counts[kind.index()] + n.max(1);
        st.rules[kind.index()] = Some(Rule { at, sticky, error });
    }

    /// Removes the rule for `kind`.
    pub fn disarm(&self, kind: OpKind) {
        self.state.lock().rules[kind.index()] = None;
    }

    /// Removes every rule: from now on the storage behaves like the one it wraps.
    pub fn disarm_all(&self) {
        self.state.lock().rules = [None; 7];
    }

    /// Operations of `kind` seen so far (failed ones included).
    pub fn count(&self, kind: OpKind) -> u64 {
        self.state.lock().counts[kind.index()]
    }

    /// Faults injected so far into operations of `kind`.
    pub fn injected(&self, kind: OpKind) -> u64 {
        self.state.lock().injected[kind.index()]
    }

    /// Faults injected so far, all kinds.
    pub fn injected_total(&self) -> u64 {
        self.state.lock().injected.iter().sum()
    }

    /// Counts one operation of `kind`; the error to return if a rule says it fails.
    fn step(&self, kind: OpKind) -> Option<FaultError> {
        let mut st = self.state.lock();
        let i = kind.index();
        st.counts[i] += 1;
        let n = st.counts[i];
        let rule = st.rules[i]?;
        let fires = n == rule.at || (rule.sticky && n > rule.at);
        if !fires {
            return None;
        }
        if !rule.sticky {
            st.rules[i] = None;
        }
        st.injected[i] += 1;
        Some(rule.error)
    }

    fn check(&self, kind: OpKind) -> io::Result<()> {
        match self.step(kind) {
            Some(e) => Err(e.to_io()),
            None => Ok(()),
        }
    }
}

/// Storage that fails the operations its [`FaultHandle`] says to fail, and passes everything
/// else to the storage it wraps.
pub struct FaultStorage<S> {
    inner: S,
    handle: FaultHandle,
}

impl<S: Storage> FaultStorage<S> {
    /// Wraps `inner` with no fault armed.
    pub fn new(inner: S) -> Self {
        FaultStorage {
            inner,
            handle: FaultHandle::default(),
        }
    }

    /// The handle that arms and disarms faults (shared: clones program the same storage).
    pub fn handle(&self) -> FaultHandle {
        self.handle.clone()
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }
}

impl<S: Storage> Storage for FaultStorage<S> {
    fn read_at(&self, buf: IoBufMut, offset: u64) -> IoFuture<'_, io::Result<IoBufMut>> {
        let r = self.handle.check(OpKind::Read);
        Box::pin(async move {
            r?;
            self.inner.read_at(buf, offset).await
        })
    }
    fn write_at(&self, buf: IoBuf, offset: u64) -> IoFuture<'_, io::Result<()>> {
        let r = self.handle.check(OpKind::Write);
        Box::pin(async move {
            r?;
            self.inner.write_at(buf, offset).await
        })
    }
    fn flush(&self) -> IoFuture<'_, io::Result<()>> {
        let r = self.handle.check(OpKind::Flush);
        Box::pin(async move {
            r?;
            self.inner.flush().await
        })
    }
    fn len(&self) -> IoFuture<'_, io::Result<u64>> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> IoFuture<'_, io::Result<()>> {
        let r = self.handle.check(OpKind::SetLen);
        Box::pin(async move {
            r?;
            self.inner.set_len(len).await
        })
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> IoFuture<'_, io::Result<()>> {
        let r = self.handle.check(OpKind::WriteZeroes);
        Box::pin(async move {
            r?;
            self.inner.write_zeroes(offset, len).await
        })
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, io::Result<()>> {
        let r = self.handle.check(OpKind::Discard);
        Box::pin(async move {
            r?;
            self.inner.discard(offset, len).await
        })
    }
    fn allocate(&self, offset: u64, len: u64) -> IoFuture<'_, io::Result<()>> {
        let r = self.handle.check(OpKind::Allocate);
        Box::pin(async move {
            r?;
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

    fn errno<T>(r: io::Result<T>) -> Option<i32> {
        r.err().and_then(|e| e.raw_os_error())
    }

    #[tokio::test]
    async fn fails_the_nth_operation_of_one_kind_only() {
        let s = FaultStorage::new(MemoryStorage::new());
        let h = s.handle();
        h.fail_nth(OpKind::Write, 2, FaultError::NoSpace);
        s.write_at(IoBuf::copy_from(&[1; 512]), 0).await.unwrap();
        // Other kinds are counted apart: flushes and reads do not move the write count.
        s.flush().await.unwrap();
        s.read_at(IoBufMut::zeroed(512), 0).await.unwrap();
        let r = s.write_at(IoBuf::copy_from(&[2; 512]), 0).await;
        assert_eq!(errno(r), Some(28));
        // The failed write did not reach the storage; the next one succeeds.
        assert_eq!(s.inner().to_vec()[0], 1);
        s.write_at(IoBuf::copy_from(&[3; 512]), 0).await.unwrap();
        assert_eq!(s.inner().to_vec()[0], 3);
        assert_eq!(h.count(OpKind::Write), 3);
        assert_eq!(h.injected(OpKind::Write), 1);
        assert_eq!(h.injected_total(), 1);
    }

    #[tokio::test]
    async fn sticky_rule_fails_everything_until_disarmed() {
        let s = FaultStorage::new(MemoryStorage::new());
        let h = s.handle();
        h.fail_from(OpKind::Flush, 1, FaultError::Io);
        for _ in 0..3 {
            assert_eq!(errno(s.flush().await), Some(5));
        }
        // Other kinds are unaffected.
        s.set_len(4096).await.unwrap();
        s.discard(0, 512).await.unwrap();
        h.disarm(OpKind::Flush);
        s.flush().await.unwrap();
        assert_eq!(h.injected(OpKind::Flush), 3);
    }

    #[tokio::test]
    async fn every_kind_can_fail() {
        let s = FaultStorage::new(MemoryStorage::new());
        let h = s.handle();
        for k in OpKind::ALL {
            h.fail_nth(k, 1, FaultError::Io);
        }
        assert_eq!(errno(s.read_at(IoBufMut::zeroed(8), 0).await), Some(5));
        assert_eq!(errno(s.write_at(IoBuf::copy_from(&[1]), 0).await), Some(5));
        assert_eq!(errno(s.flush().await), Some(5));
        assert_eq!(errno(s.set_len(10).await), Some(5));
        assert_eq!(errno(s.write_zeroes(0, 10).await), Some(5));
        assert_eq!(errno(s.discard(0, 10).await), Some(5));
        assert_eq!(errno(s.allocate(0, 10).await), Some(5));
        assert_eq!(
            s.inner().len_sync(),
            0,
            "no failed operation reached the storage"
        );
        h.fail_nth(OpKind::Write, 1, FaultError::Io);
        h.disarm_all();
        s.write_at(IoBuf::copy_from(&[1]), 0).await.unwrap();
    }
}
