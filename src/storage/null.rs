//! QEMU's `null-co` driver as a storage: a device of a given size that discards writes and
//! reads zeros, with nothing behind it. Tests and benchmarks use it to measure an engine
//! without a disk (QEMU's iotests write 2 GiB to one as an external data file).

use super::{Extent, IoFuture, Storage};
use crate::buf::{IoBuf, IoBufMut};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// QEMU's default size of a `null-co` device (1 GiB).
pub const DEFAULT_SIZE: u64 = 1 << 30;

pub struct NullStorage {
    len: AtomicU64,
    /// Block status says the device reads zeros (QEMU's `read-zeroes`; reads return zeros
    /// either way: without it QEMU leaves the buffer as it was, any content being allowed).
    read_zeroes: bool,
}

impl NullStorage {
    pub fn new(len: u64, read_zeroes: bool) -> Self {
        NullStorage {
            len: AtomicU64::new(len),
            read_zeroes,
        }
    }
}

impl Storage for NullStorage {
    fn read_at(&self, mut buf: IoBufMut, _: u64) -> IoFuture<'_, io::Result<IoBufMut>> {
        buf.fill(0);
        Box::pin(async move { Ok(buf) })
    }
    fn write_at(&self, _: IoBuf, _: u64) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async { Ok(()) })
    }
    fn flush(&self) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async { Ok(()) })
    }
    fn len(&self) -> IoFuture<'_, io::Result<u64>> {
        let len = self.len.load(Relaxed);
        Box::pin(async move { Ok(len) })
    }
    fn set_len(&self, len: u64) -> IoFuture<'_, io::Result<()>> {
        self.len.store(len, Relaxed);
        Box::pin(async { Ok(()) })
    }
    fn write_zeroes(&self, _: u64, _: u64) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async { Ok(()) })
    }
    fn discard(&self, _: u64, _: u64) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async { Ok(()) })
    }
    fn allocate(&self, _: u64, _: u64) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async { Ok(()) })
    }
    fn allocated_bytes(&self) -> Option<u64> {
        Some(0)
    }
    fn extent_at(&self, _: u64, max: u64) -> IoFuture<'_, io::Result<Extent>> {
        let zero = self.read_zeroes;
        Box::pin(async move {
            Ok(Extent {
                len: max,
                data: false,
                zero,
            })
        })
    }
    fn hole_at(&self, _: u64, max: u64) -> IoFuture<'_, io::Result<(bool, u64)>> {
        Box::pin(async move { Ok((true, max)) })
    }
    fn protocol(&self) -> &'static str {
        "null-co"
    }
}
