//! An open image used as the file of another one (QEMU's `file.driver=qcow2`: a qcow2 image
//! whose guest disk holds another image).
//!
//! [`DeviceStorage`] presents the inner image's guest disk as storage; [`Nested`] is the outer
//! image, which closes the inner one after itself. The inner disk has a fixed size: writes past
//! its end fail (`ENOSPC`). QEMU maps such a write past the inner image's end and leaves the
//! size in its header behind (an image whose header understates it); qimg refuses instead.

use super::{IoFuture, Storage};
use crate::block::{BlockDevice, BlockStatus, Format, ZeroFlags};
use crate::buf::{IoBuf, IoBufMut};
use crate::error::{Error, Result};
use crate::qcow2::{Preallocation, Qcow2};
use std::io;
use std::sync::Arc;

/// The guest disk of an open image, as storage for another format.
pub struct DeviceStorage(pub Arc<dyn BlockDevice>);

fn to_io(e: Error) -> io::Error {
    match e {
        Error::Io { source, .. } => source,
        other => io::Error::other(other.to_string()),
    }
}

impl DeviceStorage {
    /// Fails with `ENOSPC` if `[offset, offset+len)` does not fit the inner disk.
    fn fits(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.0.size() => Ok(()),
            _ => Err(io::Error::from_raw_os_error(28)),
        }
    }
}

impl Storage for DeviceStorage {
    fn read_at(&self, mut buf: IoBufMut, offset: u64) -> IoFuture<'_, io::Result<IoBufMut>> {
        Box::pin(async move {
            let size = self.0.size();
            // Past the end reads as zeros (the storage contract).
            let n = size.saturating_sub(offset).min(buf.len() as u64) as usize;
            if n == 0 {
                buf.fill(0);
                return Ok(buf);
            }
            let tail = buf.split_off(n);
            let mut head = self.0.read(offset, buf).await.map_err(to_io)?;
            if !tail.is_empty() {
                let mut tail = tail;
                tail.fill(0);
                head.unsplit(tail);
            }
            Ok(head)
        })
    }

    fn write_at(&self, buf: IoBuf, offset: u64) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async move {
            self.fits(offset, buf.len() as u64)?;
            self.0.write(offset, buf).await.map_err(to_io)
        })
    }

    fn flush(&self) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async move { self.0.flush().await.map_err(to_io) })
    }

    fn len(&self) -> IoFuture<'_, io::Result<u64>> {
        let size = self.0.size();
        Box::pin(async move { Ok(size) })
    }

    fn set_len(&self, len: u64) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async move {
            // The inner disk keeps its size: a shorter "file" is fine (its end reads as
            // zeros once written so), a longer one does not fit.
            self.fits(0, len)
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async move {
            self.fits(offset, len)?;
            self.0
                .write_zeroes(offset, len, ZeroFlags::default())
                .await
                .map_err(to_io)
        })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async move {
            let size = self.0.size();
            let end = offset.saturating_add(len).min(size);
            if offset >= end {
                return Ok(());
            }
            self.0.discard(offset, end - offset).await.map_err(to_io)
        })
    }

    fn allocate(&self, offset: u64, len: u64) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async move { self.fits(offset, len) })
    }

    fn extent_at(&self, offset: u64, max: u64) -> IoFuture<'_, io::Result<super::Extent>> {
        Box::pin(async move {
            let max = max.min(self.0.size().saturating_sub(offset));
            if max == 0 {
                return Ok(super::Extent {
                    len: 0,
                    data: false,
                    zero: true,
                });
            }
            // What the whole chain says: holes stay holes through a window on the disk.
            let st = crate::block::chain_status(&self.0, offset, max)
                .await
                .map_err(to_io)?;
            Ok(super::Extent {
                len: st.len.clamp(1, max),
                data: st.data,
                zero: st.zero,
            })
        })
    }

    fn protocol(&self) -> &'static str {
        "file"
    }
}

/// An image opened on another image's disk: everything is the outer image's, and closing it
/// closes the inner one too.
pub struct Nested {
    pub outer: Arc<dyn BlockDevice>,
    pub inner: Arc<dyn BlockDevice>,
}

impl BlockDevice for Nested {
    fn format(&self) -> Format {
        self.outer.format()
    }
    fn size(&self) -> u64 {
        self.outer.size()
    }
    fn filename(&self) -> &str {
        self.outer.filename()
    }
    fn data_filename(&self) -> &str {
        self.outer.data_filename()
    }
    fn read_only(&self) -> bool {
        self.outer.read_only()
    }
    fn read(&self, offset: u64, buf: IoBufMut) -> IoFuture<'_, Result<IoBufMut>> {
        self.outer.read(offset, buf)
    }
    fn write(&self, offset: u64, data: IoBuf) -> IoFuture<'_, Result<()>> {
        self.outer.write(offset, data)
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, Result<()>> {
        self.outer.write_zeroes(offset, len, flags)
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, Result<()>> {
        self.outer.discard(offset, len)
    }
    fn flush(&self) -> IoFuture<'_, Result<()>> {
        self.outer.flush()
    }
    fn close(&self) -> IoFuture<'_, Result<()>> {
        Box::pin(async move {
            let outer = self.outer.close().await;
            let inner = self.inner.close().await;
            outer.and(inner)
        })
    }
    fn block_status(&self, offset: u64, max: u64) -> IoFuture<'_, Result<BlockStatus>> {
        self.outer.block_status(offset, max)
    }
    fn backing(&self) -> Option<Arc<dyn BlockDevice>> {
        self.outer.backing()
    }
    fn allocated_bytes(&self) -> Option<u64> {
        self.inner.allocated_bytes()
    }
    fn protocol(&self) -> &'static str {
        self.outer.protocol()
    }
    fn resize(&self, new_size: u64, prealloc: Preallocation) -> IoFuture<'_, Result<()>> {
        self.outer.resize(new_size, prealloc)
    }
    fn as_qcow2(&self) -> Option<&Qcow2> {
        self.outer.as_qcow2()
    }
    fn file_image(&self) -> Option<Arc<dyn BlockDevice>> {
        Some(self.inner.clone())
    }
    fn request_alignment(&self) -> u32 {
        self.outer.request_alignment()
    }
}
