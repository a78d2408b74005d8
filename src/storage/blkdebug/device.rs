//! A `blkdebug` node above an open image (`driver=blkdebug,image.driver=qcow2`): guest
//! requests meet its limits and rules before they reach the image.

use super::{Below, Blkdebug, Config, DebugEvent, DebugHandle, IoType, Suspension};
use crate::block::{check_range, BlockDevice, BlockStatus, Format, ZeroFlags};
use crate::buf::{IoBuf, IoBufMut};
use crate::qcow2::{Preallocation, Qcow2};
use crate::storage::IoFuture;
use crate::{Error, Result};
use std::io;
use std::sync::Arc;

/// An open image below a `blkdebug` node (`driver=blkdebug,image.driver=qcow2`).
pub struct DeviceBelow(pub Arc<dyn BlockDevice>);

/// The engine's error as an I/O error that [`from_io`] turns back into it.
fn to_io(e: Error) -> io::Error {
    match e {
        Error::Io { source, .. } => source,
        other => io::Error::other(other),
    }
}

fn from_io(e: io::Error, what: &str) -> Error {
    if e.get_ref().is_some_and(|i| i.is::<Error>()) {
        if let Some(inner) = e.into_inner() {
            if let Ok(err) = inner.downcast::<Error>() {
                return *err;
            }
        }
        return Error::arg(format!("{what} failed"));
    }
    Error::io(what.to_string(), e)
}

impl Below for DeviceBelow {
    fn read(&self, buf: IoBufMut, offset: u64) -> IoFuture<'_, io::Result<IoBufMut>> {
        Box::pin(async move { self.0.read(offset, buf).await.map_err(to_io) })
    }
    fn write(&self, buf: IoBuf, offset: u64) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async move { self.0.write(offset, buf).await.map_err(to_io) })
    }
    fn zero(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async move { self.0.write_zeroes(offset, len, flags).await.map_err(to_io) })
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async move { self.0.discard(offset, len).await.map_err(to_io) })
    }
    fn flush(&self) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async move { self.0.flush().await.map_err(to_io) })
    }
}

/// A `blkdebug` node above an open image: guest requests meet its limits (split, aligned,
/// small write-zeroes written as zeros) and its rules before they reach the image.
pub struct BlkdebugDevice {
    node: Blkdebug<DeviceBelow>,
}

impl BlkdebugDevice {
    /// The node over `image`, as the device to use in its place.
    pub fn wrap(image: Arc<dyn BlockDevice>, cfg: Config) -> Arc<dyn BlockDevice> {
        Arc::new(BlkdebugDevice {
            node: Blkdebug::new(DeviceBelow(image), cfg),
        })
    }

    fn image(&self) -> &Arc<dyn BlockDevice> {
        &self.node.inner.0
    }
}

impl BlockDevice for BlkdebugDevice {
    fn format(&self) -> Format {
        self.image().format()
    }
    fn size(&self) -> u64 {
        self.image().size()
    }
    fn filename(&self) -> &str {
        self.image().filename()
    }
    fn data_filename(&self) -> &str {
        self.image().data_filename()
    }
    fn read_only(&self) -> bool {
        self.image().read_only()
    }
    fn read(&self, offset: u64, buf: IoBufMut) -> IoFuture<'_, Result<IoBufMut>> {
        Box::pin(async move {
            check_range(offset, buf.len() as u64, self.size())?;
            self.node
                .read_padded(buf, offset)
                .await
                .map_err(|e| from_io(e, "read"))
        })
    }
    fn write(&self, offset: u64, data: IoBuf) -> IoFuture<'_, Result<()>> {
        Box::pin(async move {
            check_range(offset, data.len() as u64, self.size())?;
            self.node
                .write_req(data, offset)
                .await
                .map_err(|e| from_io(e, "write"))
        })
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, Result<()>> {
        Box::pin(async move {
            check_range(offset, len, self.size())?;
            self.node
                .zero_req(offset, len, flags)
                .await
                .map_err(|e| from_io(e, "write zeroes"))
        })
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, Result<()>> {
        Box::pin(async move {
            check_range(offset, len, self.size())?;
            self.node
                .discard_req(offset, len)
                .await
                .map_err(|e| from_io(e, "discard"))
        })
    }
    fn flush(&self) -> IoFuture<'_, Result<()>> {
        Box::pin(async move { self.node.flush_req().await.map_err(|e| from_io(e, "flush")) })
    }
    fn close(&self) -> IoFuture<'_, Result<()>> {
        self.image().close()
    }
    fn block_status(&self, offset: u64, max: u64) -> IoFuture<'_, Result<BlockStatus>> {
        Box::pin(async move {
            self.node
                .check(IoType::BlockStatus, offset, max)
                .map_err(|e| from_io(e, "block status"))?;
            self.image().block_status(offset, max).await
        })
    }
    fn backing(&self) -> Option<Arc<dyn BlockDevice>> {
        self.image().backing()
    }
    fn allocated_bytes(&self) -> Option<u64> {
        self.image().allocated_bytes()
    }
    fn protocol(&self) -> &'static str {
        self.image().protocol()
    }
    fn resize(&self, new_size: u64, prealloc: Preallocation) -> IoFuture<'_, Result<()>> {
        self.image().resize(new_size, prealloc)
    }
    /// The image's metadata (snapshots, bitmaps, `info`): what the node passes through
    /// unchanged in QEMU too.
    fn as_qcow2(&self) -> Option<&Qcow2> {
        self.image().as_qcow2()
    }
    fn request_alignment(&self) -> u32 {
        let align = u32::try_from(self.node.align()).unwrap_or(u32::MAX);
        align.max(self.image().request_alignment())
    }
    fn debug_event(&self, event: DebugEvent) -> Suspension {
        self.node.event(event)
    }
    fn debug_handle(&self) -> Option<DebugHandle> {
        Some(self.node.handle())
    }
}
