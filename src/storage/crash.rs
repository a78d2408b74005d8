//! A power-loss simulator for crash-safety tests.
//!
//! It keeps two images: what reads see now, and what is durable (the state at the last
//! completed `flush`), plus the list of operations since that flush. A crash can be armed to
//! happen just before the N-th operation: the storage then captures the image a disk could hold
//! after losing power at that instant and fails every later operation with `EIO`. Which unflushed
//! operations survive is chosen by a [`CrashPolicy`]: all, none, or a random subset in which a
//! surviving write may also be torn at 512-byte sector granularity (disks persist sectors, not
//! requests, and reorder them).
//!
//! It also models Linux's failed writeback ([`CrashStorage::fail_flush`]): the fsync reports
//! `EIO`, the writes it was to persist are lost for good (a chosen subset reaches the disk, as in
//! a crash), yet reads keep seeing them (the page cache marked them clean) and the next fsync
//! succeeds. A program that counts that next fsync as covering the lost writes is caught.

use super::memory::MemoryStorage;
use super::{IoFuture, Storage};
use crate::buf::{IoBuf, IoBufMut};
use parking_lot::Mutex;
use std::io;

const SECTOR: u64 = 512;

#[derive(Clone, Debug)]
enum Op {
    Write { offset: u64, data: Vec<u8> },
    Zero { offset: u64, len: u64 },
    Discard { offset: u64, len: u64 },
    SetLen(u64),
}

/// Which unflushed operations survive a crash.
#[derive(Clone, Copy, Debug)]
pub enum CrashPolicy {
    KeepAll,
    KeepNone,
    /// A random subset (seeded), with torn writes.
    Random(u64),
}

struct State {
    current: MemoryStorage,
    durable: MemoryStorage,
    pending: Vec<Op>,
    ops: u64,
    crash_at: Option<(u64, CrashPolicy)>,
    captured: Option<MemoryStorage>,
    /// The flush (counted from 1) that fails, and which of its writes reach the disk.
    fail_flush: Option<(u64, CrashPolicy)>,
    flushes: u64,
}

/// Storage that can lose power.
pub struct CrashStorage {
    state: Mutex<State>,
}

fn dead() -> io::Error {
    io::Error::from_raw_os_error(5) // EIO: the device is gone
}

impl CrashStorage {
    /// Starts from `initial`, which counts as durable.
    pub fn new(initial: &MemoryStorage) -> Self {
        CrashStorage {
            state: Mutex::new(State {
                current: initial.snapshot(),
                durable: initial.snapshot(),
                pending: Vec::new(),
                ops: 0,
                crash_at: None,
                captured: None,
                fail_flush: None,
                flushes: 0,
            }),
        }
    }

    /// Loses power just before operation number `op` (counting from 1 after this call).
    pub fn arm(&self, op: u64, policy: CrashPolicy) {
        let mut st = self.state.lock();
        let at = st.ops + op;
        st.crash_at = Some((at, policy));
    }

    /// The `n`-th flush from now (counting from 1) fails with `EIO` as a failed writeback does
    /// on Linux: of the writes since the last flush, only those `policy` keeps become durable,
    /// the others are lost although reads still return them, and later flushes succeed.
    pub fn fail_flush(&self, n: u64, policy: CrashPolicy) {
        let mut st = self.state.lock();
        let at = st.flushes + n;
        st.fail_flush = Some((at, policy));
    }

    /// Operations performed so far.
    pub fn ops(&self) -> u64 {
        self.state.lock().ops
    }

    /// The image after the crash, once it happened.
    pub fn captured(&self) -> Option<MemoryStorage> {
        self.state.lock().captured.as_ref().map(|m| m.snapshot())
    }

    /// Loses power now.
    pub fn crash_now(&self, policy: CrashPolicy) -> MemoryStorage {
        let mut st = self.state.lock();
        let img = capture(&st, policy);
        st.captured = Some(img.snapshot());
        st.crash_at = None;
        img
    }

    /// The current (not necessarily durable) content.
    pub fn current(&self) -> MemoryStorage {
        self.state.lock().current.snapshot()
    }

    /// Counts an operation; returns false if the device is (now) dead.
    fn step(st: &mut State) -> bool {
        if st.captured.is_some() {
            return false;
        }
        st.ops += 1;
        if let Some((at, policy)) = st.crash_at {
            if st.ops >= at {
                let img = capture(st, policy);
                st.captured = Some(img);
                return false;
            }
        }
        true
    }

    fn record(&self, op: Op) -> io::Result<()> {
        let mut st = self.state.lock();
        if !Self::step(&mut st) {
            return Err(dead());
        }
        apply(&st.current, &op);
        st.pending.push(op);
        Ok(())
    }
}

fn apply(m: &MemoryStorage, op: &Op) {
    match op {
        Op::Write { offset, data } => m.write_sync(data, *offset),
        Op::Zero { offset, len } => m.zero_sync(*offset, *len),
        Op::Discard { offset, len } => m.discard_sync(*offset, *len),
        Op::SetLen(len) => m.set_len_sync(*len),
    }
}

fn capture(st: &State, policy: CrashPolicy) -> MemoryStorage {
    let img = st.durable.snapshot();
    let mut rng = match policy {
        CrashPolicy::Random(seed) => Some(fastrand::Rng::with_seed(seed)),
        _ => None,
    };
    for op in &st.pending {
        match (&policy, rng.as_mut()) {
            (CrashPolicy::KeepNone, _) => {}
            (CrashPolicy::KeepAll, _) => apply(&img, op),
            (CrashPolicy::Random(_), Some(rng)) => {
                if !rng.bool() {
                    continue;
                }
                match op {
                    Op::Write { offset, data } if rng.u8(..4) == 0 => {
                        // Torn write: only some of its sectors reach the disk.
                        let mut pos = 0u64;
                        while pos < data.len() as u64 {
                            let abs = offset + pos;
                            let n = (SECTOR - abs % SECTOR).min(data.len() as u64 - pos);
                            if rng.bool() {
                                img.write_sync(&data[pos as usize..(pos + n) as usize], abs);
                            }
                            pos += n;
                        }
                    }
                    _ => apply(&img, op),
                }
            }
            (CrashPolicy::Random(_), None) => unreachable!("rng exists for the random policy"),
        }
    }
    img
}

impl Storage for CrashStorage {
    fn hole_at(&self, offset: u64, max: u64) -> IoFuture<'_, io::Result<(bool, u64)>> {
        let r = self.state.lock().current.hole_at_sync(offset, max);
        Box::pin(async move { Ok(r) })
    }

    fn read_at(&self, mut buf: IoBufMut, offset: u64) -> IoFuture<'_, io::Result<IoBufMut>> {
        let r = {
            let mut st = self.state.lock();
            if Self::step(&mut st) {
                st.current.read_sync(&mut buf, offset);
                Ok(buf)
            } else {
                Err(dead())
            }
        };
        Box::pin(async move { r })
    }

    fn write_at(&self, buf: IoBuf, offset: u64) -> IoFuture<'_, io::Result<()>> {
        let r = self.record(Op::Write {
            offset,
            data: buf.to_vec(),
        });
        Box::pin(async move { r })
    }

    fn flush(&self) -> IoFuture<'_, io::Result<()>> {
        let r = {
            let mut st = self.state.lock();
            if Self::step(&mut st) {
                st.flushes += 1;
                match st.fail_flush {
                    Some((at, policy)) if at == st.flushes => {
                        st.durable = capture(&st, policy);
                        st.pending.clear();
                        Err(io::Error::from_raw_os_error(5))
                    }
                    _ => {
                        let pending = std::mem::take(&mut st.pending);
                        for op in &pending {
                            apply(&st.durable, op);
                        }
                        Ok(())
                    }
                }
            } else {
                Err(dead())
            }
        };
        Box::pin(async move { r })
    }

    fn len(&self) -> IoFuture<'_, io::Result<u64>> {
        let st = self.state.lock();
        let r = if st.captured.is_some() {
            Err(dead())
        } else {
            Ok(st.current.len_sync())
        };
        Box::pin(async move { r })
    }

    fn set_len(&self, len: u64) -> IoFuture<'_, io::Result<()>> {
        let r = self.record(Op::SetLen(len));
        Box::pin(async move { r })
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> IoFuture<'_, io::Result<()>> {
        let r = self.record(Op::Zero { offset, len });
        Box::pin(async move { r })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, io::Result<()>> {
        let r = self.record(Op::Discard { offset, len });
        Box::pin(async move { r })
    }

    fn allocate(&self, offset: u64, len: u64) -> IoFuture<'_, io::Result<()>> {
        // Allocation only matters for the length; model it as an extension.
        let r = {
            let st = self.state.lock();
            let cur = st.current.len_sync();
            drop(st);
            if offset + len > cur {
                self.record(Op::SetLen(offset + len))
            } else {
                self.record(Op::Zero { offset: 0, len: 0 })
            }
        };
        Box::pin(async move { r })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unflushed_writes_can_be_lost_flushed_ones_cannot() {
        let s = CrashStorage::new(&MemoryStorage::new());
        s.write_at(IoBuf::copy_from(b"durable"), 0).await.unwrap();
        s.flush().await.unwrap();
        s.write_at(IoBuf::copy_from(b"VOLATILE"), 0).await.unwrap();
        let none = s.crash_now(CrashPolicy::KeepNone);
        assert_eq!(&none.to_vec()[..7], b"durable");
        let all = s.crash_now(CrashPolicy::KeepAll);
        assert_eq!(&all.to_vec()[..8], b"VOLATILE");
    }

    #[tokio::test]
    async fn armed_crash_kills_the_device() {
        let s = CrashStorage::new(&MemoryStorage::new());
        s.arm(2, CrashPolicy::KeepAll);
        s.write_at(IoBuf::copy_from(b"a"), 0).await.unwrap();
        assert!(s.write_at(IoBuf::copy_from(b"b"), 1).await.is_err());
        assert!(s.flush().await.is_err());
        assert_eq!(s.captured().unwrap().to_vec(), b"a");
    }

    #[tokio::test]
    async fn random_policy_tears_at_sector_granularity() {
        let mut saw_torn = false;
        for seed in 0..200 {
            let s = CrashStorage::new(&MemoryStorage::from_bytes(&[0u8; 4096]));
            s.write_at(IoBuf::copy_from(&[1u8; 4096]), 0).await.unwrap();
            let img = s.crash_now(CrashPolicy::Random(seed)).to_vec();
            for sector in img.chunks(512) {
                assert!(sector.iter().all(|&b| b == sector[0]), "a sector is atomic");
            }
            let ones = img.chunks(512).filter(|s| s[0] == 1).count();
            saw_torn |= ones > 0 && ones < 8;
        }
        assert!(saw_torn);
    }
}
