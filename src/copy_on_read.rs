//! Copy-on-read (qemu-io's `-C`, QEMU's `copy-on-read` option): what a read fetches from the
//! backing chain is also written into the top image, so that the next read finds it there.
//!
//! It serves images whose backing file is slow or about to go away (a remote base, a backing
//! file on a disk being retired): reading the guest's working set once pulls it into the
//! overlay. As in QEMU, a read is widened to whole (sub)clusters of the top image; every part
//! the top image does not define (its own block status says unallocated) is read through the
//! chain and written back unchanged — as a write of zeros (never deallocating) when it reads as
//! zeros, else as data. Parts the top image defines are read as they are. A failed copy fails
//! the read: the caller asked for the copy, so it is not silently skipped.
//!
//! It wraps an open image rather than living in the formats (a block-layer feature in QEMU
//! too), above every other wrapper, and needs a writable image.

use crate::block::{check_range, BlockDevice, BlockStatus, Format, ZeroFlags};
use crate::buf::{IoBuf, IoBufMut};
use crate::error::{Error, Result};
use crate::qcow2::{Preallocation, Qcow2};
use crate::storage::blkdebug::DebugEvent;
use crate::storage::IoFuture;
use std::sync::Arc;

/// At most this much is copied in one step (QEMU's bounce buffer limit).
const MAX_COPY: u64 = 16 << 20;

/// An image read with copy-on-read.
pub struct CopyOnRead {
    inner: Arc<dyn BlockDevice>,
    /// What a copy covers at least: the top image's subcluster (cluster without subclusters),
    /// 512 bytes for images without clusters.
    granularity: u64,
}

impl CopyOnRead {
    /// Wraps `inner`, which must be writable (QEMU's message otherwise).
    pub fn wrap(inner: Arc<dyn BlockDevice>) -> Result<Arc<dyn BlockDevice>> {
        if inner.read_only() {
            return Err(Error::arg("Can't use copy-on-read on read-only device"));
        }
        let granularity = inner
            .as_qcow2()
            .map_or(512, |q| q.geometry().subcluster_size());
        Ok(Arc::new(CopyOnRead { inner, granularity }))
    }

    async fn read_copying(&self, offset: u64, mut buf: IoBufMut) -> Result<IoBufMut> {
        let size = self.inner.size();
        check_range(offset, buf.len() as u64, size)?;
        let end = offset + buf.len() as u64;
        let g = self.granularity;
        let mut pos = offset / g * g;
        let stop = end.div_ceil(g).saturating_mul(g).min(size);
        while pos < stop {
            let st = self
                .inner
                .block_status(pos, (stop - pos).min(MAX_COPY))
                .await?;
            let n = st.len.clamp(1, stop - pos);
            // The part of the caller's request inside this extent.
            let (from, to) = (pos.max(offset), (pos + n).min(end));
            if st.allocated {
                if from < to {
                    let part = self
                        .inner
                        .read(from, IoBufMut::for_overwrite((to - from) as usize))
                        .await?;
                    let at = (from - offset) as usize;
                    buf[at..at + part.len()].copy_from_slice(&part);
                }
            } else {
                let data = self
                    .inner
                    .read(pos, IoBufMut::for_overwrite(n as usize))
                    .await?;
                if let Some(suspended) = self.inner.debug_event(DebugEvent::CorWrite) {
                    suspended.await;
                }
                if crate::buf::is_zero(&data) {
                    let flags = ZeroFlags {
                        may_unmap: false,
                        fast_only: false,
                    };
                    self.inner.write_zeroes(pos, n, flags).await?;
                } else {
                    self.inner.write(pos, IoBuf::copy_from(&data)).await?;
                }
                if from < to {
                    let at = (from - offset) as usize;
                    let src = (from - pos) as usize;
                    buf[at..at + (to - from) as usize]
                        .copy_from_slice(&data[src..src + (to - from) as usize]);
                }
            }
            pos += n;
        }
        Ok(buf)
    }
}

impl BlockDevice for CopyOnRead {
    fn format(&self) -> Format {
        self.inner.format()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn filename(&self) -> &str {
        self.inner.filename()
    }
    fn data_filename(&self) -> &str {
        self.inner.data_filename()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn read(&self, offset: u64, buf: IoBufMut) -> IoFuture<'_, Result<IoBufMut>> {
        Box::pin(self.read_copying(offset, buf))
    }
    fn write(&self, offset: u64, data: IoBuf) -> IoFuture<'_, Result<()>> {
        self.inner.write(offset, data)
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, Result<()>> {
        self.inner.write_zeroes(offset, len, flags)
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, Result<()>> {
        self.inner.discard(offset, len)
    }
    fn flush(&self) -> IoFuture<'_, Result<()>> {
        self.inner.flush()
    }
    fn close(&self) -> IoFuture<'_, Result<()>> {
        self.inner.close()
    }
    fn block_status(&self, offset: u64, max: u64) -> IoFuture<'_, Result<BlockStatus>> {
        self.inner.block_status(offset, max)
    }
    fn backing(&self) -> Option<Arc<dyn BlockDevice>> {
        self.inner.backing()
    }
    fn allocated_bytes(&self) -> Option<u64> {
        self.inner.allocated_bytes()
    }
    fn protocol(&self) -> &'static str {
        self.inner.protocol()
    }
    fn protocol_node(&self) -> bool {
        self.inner.protocol_node()
    }
    fn resize(&self, new_size: u64, prealloc: Preallocation) -> IoFuture<'_, Result<()>> {
        self.inner.resize(new_size, prealloc)
    }
    fn as_qcow2(&self) -> Option<&Qcow2> {
        self.inner.as_qcow2()
    }
    fn request_alignment(&self) -> u32 {
        self.inner.request_alignment()
    }
    fn debug_event(&self, event: DebugEvent) -> crate::storage::blkdebug::Suspension {
        self.inner.debug_event(event)
    }
    fn debug_handle(&self) -> Option<crate::storage::blkdebug::DebugHandle> {
        self.inner.debug_handle()
    }
}
