//! QEMU's generic block-layer options that sit above any format: `discard=` (whether discard
//! requests reach the image, and whether write-zeroes may deallocate) and `detect-zeroes=`
//! (writes whose data is all zeros become write-zeroes requests).
//!
//! They wrap an open image rather than living in each format, as in QEMU, where they belong to
//! the block node and not to the driver: the format code never sees them.

use crate::block::{BlockDevice, BlockStatus, Format, ZeroFlags};
use crate::buf::{is_zero, IoBuf, IoBufMut};
use crate::error::{Error, Result};
use crate::qcow2::Preallocation;
use crate::qcow2::Qcow2;
use crate::storage::IoFuture;
use std::sync::Arc;

/// `discard=`: what discard requests do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Discard {
    /// Discards are ignored (succeed, change nothing); write-zeroes never deallocates.
    Ignore,
    /// Discards reach the image; write-zeroes may deallocate.
    Unmap,
}

/// `detect-zeroes=`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DetectZeroes {
    Off,
    /// A write of zeros becomes a write-zeroes request.
    On,
    /// As `On`, and it may deallocate (with `discard=unmap` only).
    Unmap,
}

impl Discard {
    /// QEMU's spellings and message.
    pub fn parse(s: &str) -> Result<Discard> {
        match s {
            "ignore" | "off" => Ok(Discard::Ignore),
            "unmap" | "on" => Ok(Discard::Unmap),
            _ => Err(Error::arg("Invalid discard option")),
        }
    }
}

impl DetectZeroes {
    /// QEMU's spellings and message.
    pub fn parse(s: &str) -> Result<DetectZeroes> {
        match s {
            "off" => Ok(DetectZeroes::Off),
            "on" => Ok(DetectZeroes::On),
            "unmap" => Ok(DetectZeroes::Unmap),
            other => Err(Error::arg(format!("invalid parameter value: {other}"))),
        }
    }
}

/// An image with block-layer options applied.
pub struct WithOptions {
    inner: Arc<dyn BlockDevice>,
    discard: Discard,
    detect_zeroes: DetectZeroes,
}

impl WithOptions {
    /// Wraps `inner`; refuses `detect-zeroes=unmap` without `discard=unmap` (QEMU's rule).
    pub fn wrap(
        inner: Arc<dyn BlockDevice>,
        discard: Discard,
        detect_zeroes: DetectZeroes,
    ) -> Result<Arc<dyn BlockDevice>> {
        if detect_zeroes == DetectZeroes::Unmap && discard != Discard::Unmap {
            return Err(Error::arg(
                "setting detect-zeroes to unmap is not allowed without setting discard operation \
                 to unmap",
            ));
        }
        Ok(Arc::new(WithOptions {
            inner,
            discard,
            detect_zeroes,
        }))
    }
}

impl BlockDevice for WithOptions {
    fn format(&self) -> Format {
        self.inner.format()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn filename(&self) -> &str {
        self.inner.filename()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn read(&self, offset: u64, buf: IoBufMut) -> IoFuture<'_, Result<IoBufMut>> {
        self.inner.read(offset, buf)
    }
    fn write(&self, offset: u64, data: IoBuf) -> IoFuture<'_, Result<()>> {
        if self.detect_zeroes != DetectZeroes::Off && !data.is_empty() && is_zero(&data) {
            let flags = ZeroFlags {
                may_unmap: self.detect_zeroes == DetectZeroes::Unmap,
                fast_only: false,
            };
            return self.inner.write_zeroes(offset, data.len() as u64, flags);
        }
        self.inner.write(offset, data)
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, Result<()>> {
        let flags = ZeroFlags {
            may_unmap: flags.may_unmap && self.discard == Discard::Unmap,
            ..flags
        };
        self.inner.write_zeroes(offset, len, flags)
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, Result<()>> {
        match self.discard {
            Discard::Unmap => self.inner.discard(offset, len),
            Discard::Ignore => {
                let size = self.inner.size();
                Box::pin(async move { crate::block::check_range(offset, len, size) })
            }
        }
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
    fn data_filename(&self) -> &str {
        self.inner.data_filename()
    }
    fn debug_event(
        &self,
        event: crate::storage::blkdebug::DebugEvent,
    ) -> crate::storage::blkdebug::Suspension {
        self.inner.debug_event(event)
    }
    fn debug_handle(&self) -> Option<crate::storage::blkdebug::DebugHandle> {
        self.inner.debug_handle()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_and_rule() {
        assert_eq!(Discard::parse("on").unwrap(), Discard::Unmap);
        assert_eq!(Discard::parse("ignore").unwrap(), Discard::Ignore);
        assert!(Discard::parse("x").is_err());
        assert_eq!(DetectZeroes::parse("unmap").unwrap(), DetectZeroes::Unmap);
        assert!(DetectZeroes::parse("yes").is_err());
        assert!(is_zero(&[0u8; 200]));
        let mut b = [0u8; 200];
        b[199] = 1;
        assert!(!is_zero(&b));
    }
}
