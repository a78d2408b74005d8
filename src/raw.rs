//! The raw format: the virtual disk is the file, byte for byte. Used for raw images, raw backing
//! files and as the comparison baseline for the format's overhead.

use crate::block::{check_range, BlockDevice, BlockStatus, Format, OpenOptions, ZeroFlags};
use crate::buf::{IoBuf, IoBufMut};
use crate::error::{Error, IoContext, Result};
use crate::qcow2::Preallocation;
use crate::storage::blkdebug::DebugEvent;
use crate::storage::{IoFuture, StorageRef};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

pub struct Raw {
    storage: StorageRef,
    filename: String,
    /// Virtual size: the file's length (changed by `resize`).
    size: AtomicU64,
    read_only: bool,
    writethrough: bool,
    /// The format was guessed, not given: writes to the first sector are checked so that the
    /// image's user cannot make it probe as another format next time (see `write`).
    probed: bool,
    /// Serializes checked writes to the first sector (two writes that each look harmless could
    /// together build a header).
    first_sector: tokio::sync::Mutex<()>,
    /// QEMU's `driver=nbd` node itself: a protocol, no format (see `BlockDevice::protocol_node`).
    protocol_node: bool,
    /// The protocol driver named for a format-less open (`driver=file`, `host_device`).
    protocol_driver: Option<&'static str>,
    /// An fsync failed: as for qcow2 (see `qcow2::barrier`), writes made before it may be lost
    /// although a later fsync would succeed, so every later write and flush fails with `EIO`
    /// until the image is reopened.
    sync_failed: AtomicBool,
    /// Changes completed so far, and how many of them the last successful fsync covered: a
    /// flush with nothing new to cover does not reach the file (QEMU's rule; some files, such
    /// as character devices, refuse fsync altogether).
    write_gen: AtomicU64,
    flushed_gen: AtomicU64,
    /// QEMU's raw `size=`: the image is a fixed part of its file and cannot be resized.
    fixed_size: bool,
}

/// The bytes format probing looks at.
const PROBE_BYTES: u64 = 512;
/// A raw image's size is a whole number of these.
const SECTOR: u64 = 512;

impl Raw {
    pub async fn open(storage: StorageRef, filename: String, opts: &OpenOptions) -> Result<Raw> {
        let len = storage
            .len()
            .await
            .context(|| format!("Could not get the size of '{filename}'"))?;
        // Whole 512-byte sectors, as QEMU sizes a raw file: the end of an unaligned file reads as
        // zeros (a write there extends the file).
        let size = len.div_ceil(SECTOR) * SECTOR;
        Ok(Raw {
            storage,
            filename,
            size: AtomicU64::new(size),
            read_only: opts.read_only,
            writethrough: opts.cache.writethrough(),
            probed: opts.format.is_none(),
            first_sector: tokio::sync::Mutex::new(()),
            sync_failed: AtomicBool::new(false),
            write_gen: AtomicU64::new(0),
            flushed_gen: AtomicU64::new(0),
            protocol_node: opts.nbd.as_ref().is_some_and(|t| t.bare)
                || opts.protocol_driver.is_some(),
            protocol_driver: opts.protocol_driver,
            fixed_size: opts.raw_window.as_ref().is_some_and(|w| w.size.is_some()),
        })
    }

    /// Whether the format was probed rather than given (writes to block 0 are restricted).
    pub fn probed(&self) -> bool {
        self.probed
    }

    /// Refuses a write to the first sector of a probed image that would make the image probe as
    /// another format (QEMU's rule: a guest must not turn its raw disk into, say, a qcow2 image
    /// naming a host file as its backing file). The caller holds `first_sector`.
    async fn check_first_sector(&self, offset: u64, data: &IoBuf) -> Result<()> {
        let head_len = PROBE_BYTES.min(self.size()) as usize;
        let mut head = self
            .storage
            .read_at(IoBufMut::zeroed(head_len), 0)
            .await
            .context(|| format!("reading '{}' at 0", self.filename))?
            .to_vec();
        let end = (offset + data.len() as u64).min(head_len as u64) as usize;
        let start = offset as usize;
        head[start..end].copy_from_slice(&data[..end - start]);
        if crate::block::probe(&head) != Format::Raw {
            return Err(Error::NotPermitted(format!(
                "Operation not permitted: a write to the first sector of '{}' would change its \
                 probed format (specify the raw format explicitly to allow it)",
                self.filename
            )));
        }
        Ok(())
    }

    /// A raw device over any storage (tests, benchmarks).
    pub fn with_storage(storage: StorageRef, size: u64, read_only: bool) -> Raw {
        Raw {
            storage,
            filename: String::new(),
            size: AtomicU64::new(size),
            read_only,
            writethrough: false,
            probed: false,
            first_sector: tokio::sync::Mutex::new(()),
            sync_failed: AtomicBool::new(false),
            write_gen: AtomicU64::new(0),
            flushed_gen: AtomicU64::new(0),
            protocol_node: false,
            protocol_driver: None,
            fixed_size: false,
        }
    }

    fn writable(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if self.sync_failed.load(Relaxed) {
            return Err(Error::sync_failed());
        }
        check_range(offset, len, self.size())
    }

    async fn after_write(&self) -> Result<()> {
        self.write_gen.fetch_add(1, Relaxed);
        if self.writethrough {
            self.sync().await?;
        }
        Ok(())
    }

    /// Changes the file's length (QEMU's file driver truncate). Growing with `falloc` reserves
    /// the new area, with `full` writes zeros into it; `metadata` means nothing for a raw file
    /// and is refused, as QEMU refuses it.
    pub async fn resize(&self, new_size: u64, prealloc: Preallocation) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if self.fixed_size {
            return Err(Error::unsupported("Cannot resize fixed-size raw disks"));
        }
        if self.sync_failed.load(Relaxed) {
            return Err(Error::sync_failed());
        }
        let old = self.size();
        let grows = new_size > old;
        let resized = match prealloc {
            Preallocation::Metadata => {
                return Err(Error::unsupported(
                    "Unsupported preallocation mode: metadata",
                ))
            }
            Preallocation::Falloc if grows => self
                .storage
                .allocate(old, new_size - old)
                .await
                .context(|| "Could not preallocate new data".to_string()),
            Preallocation::Full if grows => match self.storage.set_len(new_size).await {
                Ok(()) => {
                    crate::qcow2::create::write_zeros(&self.storage, old, new_size - old).await
                }
                Err(e) => Err(Error::io("Could not resize file", e)),
            },
            _ => self
                .storage
                .set_len(new_size)
                .await
                .context(|| "Could not resize file".to_string()),
        };
        resized?;
        self.size.store(new_size, Relaxed);
        self.write_gen.fetch_add(1, Relaxed);
        self.sync().await
    }

    /// One fsync, unless every change is covered by one already; a failure poisons the image
    /// (`sync_failed`).
    async fn sync(&self) -> Result<()> {
        if self.sync_failed.load(Relaxed) {
            return Err(Error::sync_failed());
        }
        let gen = self.write_gen.load(Relaxed);
        if gen == self.flushed_gen.load(Relaxed) {
            return Ok(());
        }
        if let Err(e) = self.storage.flush().await {
            self.sync_failed.store(true, Relaxed);
            tracing::error!(
                "flushing '{}' failed ({e}): no more writes or flushes",
                self.filename
            );
            return Err(e).context(|| format!("flushing '{}'", self.filename));
        }
        self.flushed_gen.fetch_max(gen, Relaxed);
        Ok(())
    }
}

impl BlockDevice for Raw {
    fn format(&self) -> Format {
        Format::Raw
    }

    fn size(&self) -> u64 {
        self.size.load(Relaxed)
    }

    fn filename(&self) -> &str {
        &self.filename
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read(&self, offset: u64, buf: IoBufMut) -> IoFuture<'_, Result<IoBufMut>> {
        Box::pin(async move {
            check_range(offset, buf.len() as u64, self.size())?;
            // QEMU's raw driver announces its requests to a blkdebug node below it.
            if let Some(suspended) = self.storage.debug_event(DebugEvent::ReadAio) {
                suspended.await;
            }
            self.storage
                .read_at(buf, offset)
                .await
                .context(|| format!("reading '{}' at {offset}", self.filename))
        })
    }

    fn write(&self, offset: u64, data: IoBuf) -> IoFuture<'_, Result<()>> {
        Box::pin(async move {
            self.writable(offset, data.len() as u64)?;
            let _guard = if self.probed && offset < PROBE_BYTES && !data.is_empty() {
                let g = self.first_sector.lock().await;
                self.check_first_sector(offset, &data).await?;
                Some(g)
            } else {
                None
            };
            if let Some(suspended) = self.storage.debug_event(DebugEvent::WriteAio) {
                suspended.await;
            }
            self.storage
                .write_at(data, offset)
                .await
                .context(|| format!("writing '{}' at {offset}", self.filename))?;
            self.after_write().await
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, Result<()>> {
        Box::pin(async move {
            self.writable(offset, len)?;
            let _ = flags;
            self.storage
                .write_zeroes(offset, len)
                .await
                .context(|| format!("zeroing '{}' at {offset}", self.filename))?;
            self.after_write().await
        })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, Result<()>> {
        Box::pin(async move {
            self.writable(offset, len)?;
            self.storage
                .discard(offset, len)
                .await
                .context(|| format!("discarding in '{}' at {offset}", self.filename))?;
            self.write_gen.fetch_add(1, Relaxed);
            Ok(())
        })
    }

    fn flush(&self) -> IoFuture<'_, Result<()>> {
        Box::pin(async move {
            if self.read_only {
                return Ok(());
            }
            self.sync().await
        })
    }

    fn close(&self) -> IoFuture<'_, Result<()>> {
        Box::pin(async move {
            self.flush().await?;
            self.storage.release_locks();
            Ok(())
        })
    }

    fn block_status(&self, offset: u64, max: u64) -> IoFuture<'_, Result<BlockStatus>> {
        Box::pin(async move {
            let max = max.min(self.size().saturating_sub(offset));
            let e = self
                .storage
                .extent_at(offset, max)
                .await
                .context(|| format!("querying allocation of '{}'", self.filename))?;
            Ok(BlockStatus {
                len: e.len.max(1).min(max.max(1)),
                data: e.data,
                zero: e.zero,
                compressed: false,
                offset: Some(offset),
                allocated: true,
            })
        })
    }

    fn backing(&self) -> Option<Arc<dyn BlockDevice>> {
        None
    }

    fn allocated_bytes(&self) -> Option<u64> {
        self.storage.allocated_bytes()
    }

    fn protocol(&self) -> &'static str {
        self.protocol_driver
            .unwrap_or_else(|| self.storage.protocol())
    }
    fn debug_handle(&self) -> Option<crate::storage::blkdebug::DebugHandle> {
        self.storage.debug_handle()
    }

    fn protocol_node(&self) -> bool {
        self.protocol_node
    }

    fn resize(&self, new_size: u64, prealloc: Preallocation) -> IoFuture<'_, Result<()>> {
        Box::pin(Raw::resize(self, new_size, prealloc))
    }

    fn request_alignment(&self) -> u32 {
        if self.probed {
            SECTOR as u32
        } else {
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::fault::{FaultError, FaultStorage, OpKind};
    use crate::storage::memory::MemoryStorage;

    #[tokio::test]
    async fn a_failed_flush_fails_every_later_write_and_flush() {
        let s = Arc::new(FaultStorage::new(MemoryStorage::from_bytes(&[0u8; 8192])));
        let faults = s.handle();
        let raw = Raw::with_storage(s.clone(), 8192, false);
        raw.write(0, IoBuf::copy_from(&[1u8; 512])).await.unwrap();
        faults.fail_nth(OpKind::Flush, 1, FaultError::Io);
        assert!(raw.flush().await.is_err());
        let flushes = faults.count(OpKind::Flush);
        // The storage would sync again; the image must not count that as durability.
        assert_eq!(raw.flush().await.map_err(|e| e.errno()), Err(5));
        let w = raw.write(512, IoBuf::copy_from(&[2u8; 512])).await;
        assert_eq!(w.map_err(|e| e.errno()), Err(5));
        assert_eq!(
            faults.count(OpKind::Flush),
            flushes,
            "no fsync after the failure"
        );
        let r = raw.read(0, IoBufMut::zeroed(512)).await.unwrap();
        assert_eq!(&r[..], &[1u8; 512][..], "reads still work");
    }

    #[tokio::test]
    async fn flushes_reach_the_file_only_with_something_to_cover() {
        let s = Arc::new(FaultStorage::new(MemoryStorage::from_bytes(&[0u8; 8192])));
        let faults = s.handle();
        let raw = Raw::with_storage(s.clone(), 8192, false);
        raw.flush().await.unwrap();
        assert_eq!(faults.count(OpKind::Flush), 0);
        raw.write(0, IoBuf::copy_from(&[1u8; 512])).await.unwrap();
        raw.flush().await.unwrap();
        raw.flush().await.unwrap();
        assert_eq!(faults.count(OpKind::Flush), 1);
        raw.discard(0, 512).await.unwrap();
        raw.close().await.unwrap();
        assert_eq!(faults.count(OpKind::Flush), 2);
    }
}
