//! The storage layer: asynchronous positioned I/O on an image file (or something standing in for
//! one).
//!
//! Everything above this layer (the qcow2 and raw drivers) sees only [`Storage`]: owned-buffer
//! reads and writes at byte offsets, `flush` (a durability barrier: `fdatasync`), length changes,
//! and the space operations (`write_zeroes`, `discard`, `allocate`). Backends:
//!
//! - [`file::FileStorage`]: a real file, I/O on a pool of worker threads (`pread`/`pwrite`),
//!   optionally `O_DIRECT`;
//! - [`memory::MemoryStorage`]: a file held in memory (tests, benchmarks);
//! - [`null::NullStorage`]: QEMU's `null-co`: writes discarded, reads zeros;
//! - wrappers: [`counting::CountingStorage`] (counts operations), [`latency::LatencyStorage`]
//!   (adds a fixed delay to every operation, for measurements without disk noise),
//!   [`crash::CrashStorage`] (records unflushed writes and can "lose power"),
//!   [`fault::FaultStorage`] (fails chosen operations with `EIO` or `ENOSPC`, for failure tests)
//!   [`blkdebug::Blkdebug`] (QEMU's `blkdebug`: fails requests after chosen steps of the
//!   format driver, imposes request limits), [`window::Window`] (QEMU's raw `offset=`/`size=`:
//!   a part of a file) and [`quorum::Quorum`] (QEMU's `quorum`: several copies of one disk,
//!   written together, reads voted on).
//!
//! [`lock`] takes QEMU's image locks on a file when it is opened (`FileOptions::lock`).
//!
//! Contract every backend keeps: a read past the end of the file returns zeros for the missing
//! part; a write past the end extends the file; `flush` makes every write that completed before
//! it was called durable.

pub mod blkdebug;
pub mod counting;
pub mod crash;
pub mod device;
pub mod fault;
pub mod file;
pub mod latency;
pub mod lock;
pub mod memory;
pub mod null;
mod pool;
pub mod quorum;
pub mod uring;
pub mod window;

use crate::buf::{IoBuf, IoBufMut};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;

/// A boxed, `Send` future: what the storage trait returns.
pub type IoFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Asynchronous positioned I/O. Shared between tasks (`&self` everywhere).
#[allow(clippy::len_without_is_empty)] // a file's emptiness is not a question anyone asks here
pub trait Storage: Send + Sync + 'static {
    /// Fills `buf` from `offset`. Bytes past the end of the file read as zeros.
    fn read_at(&self, buf: IoBufMut, offset: u64) -> IoFuture<'_, io::Result<IoBufMut>>;

    /// Writes all of `buf` at `offset`, extending the file if needed.
    fn write_at(&self, buf: IoBuf, offset: u64) -> IoFuture<'_, io::Result<()>>;

    /// Makes all completed writes durable.
    fn flush(&self) -> IoFuture<'_, io::Result<()>>;

    /// Current length in bytes.
    fn len(&self) -> IoFuture<'_, io::Result<u64>>;

    /// Truncates or extends (sparsely) to `len` bytes.
    fn set_len(&self, len: u64) -> IoFuture<'_, io::Result<()>>;

    /// Makes `[offset, offset+len)` read as zeros (possibly deallocating it), extending the
    /// file if the range ends past it.
    fn write_zeroes(&self, offset: u64, len: u64) -> IoFuture<'_, io::Result<()>>;

    /// Tells the storage the range is no longer needed. Afterwards the range reads as zeros or
    /// as its old content. A backend that cannot discard does nothing.
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, io::Result<()>>;

    /// Reserves space for the range (like `fallocate`), extending the file if needed. The
    /// content is unchanged (new space reads as zeros).
    fn allocate(&self, offset: u64, len: u64) -> IoFuture<'_, io::Result<()>>;

    /// Bytes actually allocated on the host (what `du` shows), if known.
    fn allocated_bytes(&self) -> Option<u64> {
        None
    }

    /// Whether `offset` lies in a hole (unallocated, reads as zeros), and for how many bytes
    /// (at most `max`) that stays true. Backends that cannot tell report data.
    fn hole_at(&self, offset: u64, max: u64) -> IoFuture<'_, io::Result<(bool, u64)>> {
        let _ = offset;
        Box::pin(async move { Ok((false, max)) })
    }

    /// What the extent at `offset` holds (at most `max` bytes): data, reads as zeros, or
    /// neither (a hole whose content this storage does not know, such as an NBD extent that
    /// is a hole without reading as zeros). The default asks [`Storage::hole_at`].
    fn extent_at(&self, offset: u64, max: u64) -> IoFuture<'_, io::Result<Extent>> {
        Box::pin(async move {
            let (hole, len) = self.hole_at(offset, max).await?;
            Ok(Extent {
                len,
                data: !hole,
                zero: hole,
            })
        })
    }

    /// Drops the image locks taken when the file was opened (the image was closed; the handle
    /// may live on). Storage without locks has nothing to do.
    fn release_locks(&self) {}

    /// The format driver above announces a step of its work (QEMU's `BLKDBG_EVENT`): only a
    /// [`blkdebug::Blkdebug`] node acts on it.
    fn debug_event(&self, event: blkdebug::DebugEvent) -> blkdebug::Suspension {
        let _ = event;
        None
    }

    /// The `blkdebug` node's breakpoint control, if this storage is one.
    fn debug_handle(&self) -> Option<blkdebug::DebugHandle> {
        None
    }

    /// QEMU's name of the protocol (`file`, `nbd`), for `info`.
    fn protocol(&self) -> &'static str {
        "file"
    }
}

/// An extent of storage (see [`Storage::extent_at`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    pub data: bool,
    pub zero: bool,
}

/// Shared handle to a storage backend.
pub type StorageRef = Arc<dyn Storage>;

/// Forwarding impl so wrappers can hold any storage, including shared handles.
impl<S: Storage + ?Sized> Storage for Arc<S> {
    fn read_at(&self, buf: IoBufMut, offset: u64) -> IoFuture<'_, io::Result<IoBufMut>> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: IoBuf, offset: u64) -> IoFuture<'_, io::Result<()>> {
        (**self).write_at(buf, offset)
    }
    fn flush(&self) -> IoFuture<'_, io::Result<()>> {
        (**self).flush()
    }
    fn len(&self) -> IoFuture<'_, io::Result<u64>> {
        (**self).len()
    }
    fn set_len(&self, len: u64) -> IoFuture<'_, io::Result<()>> {
        (**self).set_len(len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> IoFuture<'_, io::Result<()>> {
        (**self).write_zeroes(offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, io::Result<()>> {
        (**self).discard(offset, len)
    }
    fn allocate(&self, offset: u64, len: u64) -> IoFuture<'_, io::Result<()>> {
        (**self).allocate(offset, len)
    }
    fn allocated_bytes(&self) -> Option<u64> {
        (**self).allocated_bytes()
    }
    fn hole_at(&self, offset: u64, max: u64) -> IoFuture<'_, io::Result<(bool, u64)>> {
        (**self).hole_at(offset, max)
    }
    fn extent_at(&self, offset: u64, max: u64) -> IoFuture<'_, io::Result<Extent>> {
        (**self).extent_at(offset, max)
    }
    fn release_locks(&self) {
        (**self).release_locks()
    }
    fn protocol(&self) -> &'static str {
        (**self).protocol()
    }
    fn debug_event(&self, event: blkdebug::DebugEvent) -> blkdebug::Suspension {
        (**self).debug_event(event)
    }
    fn debug_handle(&self) -> Option<blkdebug::DebugHandle> {
        (**self).debug_handle()
    }
}

/// Convenience: read `len` bytes at `offset` into a fresh buffer.
pub async fn read_vec(s: &dyn Storage, offset: u64, len: usize) -> io::Result<IoBufMut> {
    s.read_at(IoBufMut::for_overwrite(len), offset).await
}
