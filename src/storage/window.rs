//! A window of a file: QEMU's raw driver with `offset=` and `size=` (an image stored at an
//! offset inside a larger file, a partition, a disk inside an archive).
//!
//! Byte 0 of the window is byte `offset` of the file. With a `size`, the window is fixed: reads
//! past its end read zeros (the storage contract) and never reach the file behind it, writes
//! past it fail with `ENOSPC` (QEMU's answer), and its length cannot change ("Cannot resize
//! fixed-size raw disks"). Without one, it ends where the file ends and grows with it.

use super::{Extent, IoFuture, Storage, StorageRef};
use crate::buf::{IoBuf, IoBufMut};
use std::io;

pub struct Window {
    inner: StorageRef,
    offset: u64,
    size: Option<u64>,
}

fn enospc() -> io::Error {
    io::Error::from_raw_os_error(28)
}

impl Window {
    /// The window `[offset, offset + size)` of `inner` (to its end without `size`), checked
    /// against the file's length now, with QEMU's messages.
    pub async fn new(inner: StorageRef, offset: u64, size: Option<u64>) -> crate::Result<Window> {
        let len = inner
            .len()
            .await
            .map_err(|e| crate::Error::io("Could not get the size of the file", e))?;
        if offset > len {
            return Err(crate::Error::arg(format!(
                "Offset ({offset}) cannot be greater than size of the containing file ({len})"
            )));
        }
        if let Some(size) = size {
            if len - offset < size {
                return Err(crate::Error::arg(format!(
                    "The sum of offset ({offset}) and size ({size}) has to be smaller or equal \
                     to the  actual size of the containing file ({len})"
                )));
            }
            if size % 512 != 0 {
                return Err(crate::Error::arg("Specified size is not multiple of 512"));
            }
        }
        Ok(Window {
            inner,
            offset,
            size,
        })
    }

    /// `[offset, offset+len)` in the file, if it lies inside a fixed window.
    fn place(&self, offset: u64, len: u64) -> io::Result<u64> {
        let end = offset.checked_add(len).ok_or_else(enospc)?;
        match self.size {
            Some(size) if end > size => Err(enospc()),
            _ => self.offset.checked_add(offset).ok_or_else(enospc),
        }
    }

    /// How much of `[offset, offset+len)` lies inside the window.
    fn inside(&self, offset: u64, len: u64) -> u64 {
        match self.size {
            Some(size) => size.saturating_sub(offset).min(len),
            None => len,
        }
    }
}

impl Storage for Window {
    fn read_at(&self, mut buf: IoBufMut, offset: u64) -> IoFuture<'_, io::Result<IoBufMut>> {
        Box::pin(async move {
            let n = self.inside(offset, buf.len() as u64) as usize;
            if n == 0 {
                buf.fill(0);
                return Ok(buf);
            }
            let mut tail = buf.split_off(n);
            let mut head = self
                .inner
                .read_at(buf, self.place(offset, n as u64)?)
                .await?;
            if !tail.is_empty() {
                tail.fill(0);
                head.unsplit(tail);
            }
            Ok(head)
        })
    }

    fn write_at(&self, buf: IoBuf, offset: u64) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async move {
            let at = self.place(offset, buf.len() as u64)?;
            self.inner.write_at(buf, at).await
        })
    }

    fn flush(&self) -> IoFuture<'_, io::Result<()>> {
        self.inner.flush()
    }

    fn len(&self) -> IoFuture<'_, io::Result<u64>> {
        Box::pin(async move {
            match self.size {
                Some(size) => Ok(size),
                None => Ok(self.inner.len().await?.saturating_sub(self.offset)),
            }
        })
    }

    fn set_len(&self, len: u64) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async move {
            if self.size.is_some() {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "Cannot resize fixed-size raw disks",
                ));
            }
            let end = self.offset.checked_add(len).ok_or_else(enospc)?;
            self.inner.set_len(end).await
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async move {
            let at = self.place(offset, len)?;
            self.inner.write_zeroes(at, len).await
        })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async move {
            let len = self.inside(offset, len);
            if len == 0 {
                return Ok(());
            }
            let at = self.place(offset, len)?;
            self.inner.discard(at, len).await
        })
    }

    fn allocate(&self, offset: u64, len: u64) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async move {
            let at = self.place(offset, len)?;
            self.inner.allocate(at, len).await
        })
    }

    fn allocated_bytes(&self) -> Option<u64> {
        self.inner.allocated_bytes()
    }

    fn hole_at(&self, offset: u64, max: u64) -> IoFuture<'_, io::Result<(bool, u64)>> {
        Box::pin(async move {
            let max = self.inside(offset, max);
            if max == 0 {
                return Ok((true, 0));
            }
            self.inner.hole_at(self.place(offset, max)?, max).await
        })
    }

    fn extent_at(&self, offset: u64, max: u64) -> IoFuture<'_, io::Result<Extent>> {
        Box::pin(async move {
            let max = self.inside(offset, max);
            if max == 0 {
                return Ok(Extent {
                    len: 0,
                    data: false,
                    zero: true,
                });
            }
            let e = self.inner.extent_at(self.place(offset, max)?, max).await?;
            Ok(Extent {
                len: e.len.min(max),
                ..e
            })
        })
    }

    fn release_locks(&self) {
        self.inner.release_locks()
    }

    fn debug_event(&self, event: super::blkdebug::DebugEvent) -> super::blkdebug::Suspension {
        self.inner.debug_event(event)
    }

    fn debug_handle(&self) -> Option<super::blkdebug::DebugHandle> {
        self.inner.debug_handle()
    }

    fn protocol(&self) -> &'static str {
        self.inner.protocol()
    }
}

/// The name QEMU gives a raw image with `offset=`/`size=` over the file `filename`: its options
/// as JSON, values as the user wrote them, keys in the order QEMU's dictionaries list them
/// (by the bucket their hash falls in).
pub fn qemu_name(w: &crate::block::RawWindow, filename: &str) -> String {
    let text = |n: u64, t: &Option<String>| t.clone().unwrap_or_else(|| n.to_string());
    let quote = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| format!("\"{s}\""));
    let file = format!(
        "{{{}}}",
        qdict_order(vec![
            ("driver", quote("file")),
            ("filename", quote(filename)),
        ])
    );
    let mut entries = vec![("driver", quote("raw")), ("file", file)];
    if w.offset != 0 || w.offset_text.is_some() {
        entries.push(("offset", quote(&text(w.offset, &w.offset_text))));
    }
    if let Some(size) = w.size {
        entries.push(("size", quote(&text(size, &w.size_text))));
    }
    format!("json:{{{}}}", qdict_order(entries))
}

/// `"key": value` pairs joined in QEMU's dictionary order: its hash table's buckets in order,
/// the later of two keys in one bucket first.
fn qdict_order(mut entries: Vec<(&str, String)>) -> String {
    let bucket = |k: &str| {
        let mut v = 0x238F_13AFu32.wrapping_mul(k.len() as u32);
        for (i, c) in k.bytes().enumerate() {
            v = v.wrapping_add(u32::from(c) << ((i * 5) % 24));
        }
        1_103_515_243u32.wrapping_mul(v).wrapping_add(12345) % 512
    };
    let n = entries.len();
    let mut keyed: Vec<(u32, usize, (&str, String))> = entries
        .drain(..)
        .enumerate()
        .map(|(i, e)| (bucket(e.0), n - i, e))
        .collect();
    keyed.sort_by_key(|(b, later, _)| (*b, *later));
    keyed
        .into_iter()
        .map(|(_, _, (k, v))| format!("\"{k}\": {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::memory::MemoryStorage;
    use std::sync::Arc;

    #[tokio::test]
    async fn a_fixed_window_keeps_to_its_bytes() {
        let file: StorageRef = Arc::new(MemoryStorage::new());
        file.write_at(IoBuf::copy_from(&[7u8; 8192]), 0)
            .await
            .unwrap();
        let w = Window::new(file.clone(), 1024, Some(2048)).await.unwrap();
        assert_eq!(w.len().await.unwrap(), 2048);
        w.write_at(IoBuf::copy_from(&[1u8; 512]), 1536)
            .await
            .unwrap();
        let e = w
            .write_at(IoBuf::copy_from(&[1u8; 512]), 1800)
            .await
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(28));
        // The read past the window's end reads zeros, not the file behind it.
        let b = w.read_at(IoBufMut::zeroed(1024), 1536).await.unwrap();
        assert!(b[..512].iter().all(|&x| x == 1) && b[512..].iter().all(|&x| x == 0));
        let f = file.read_at(IoBufMut::zeroed(8192), 0).await.unwrap();
        assert!(f[..2560].iter().all(|&x| x == 7));
        assert!(f[2560..3072].iter().all(|&x| x == 1));
        assert!(f[3072..].iter().all(|&x| x == 7));
        assert!(w.set_len(4096).await.is_err());
        assert!(Window::new(file.clone(), 9000, None).await.is_err());
        assert!(Window::new(file.clone(), 4096, Some(8192)).await.is_err());
        assert!(Window::new(file.clone(), 0, Some(1000)).await.is_err());
        // Without a size the window ends with the file and grows with it.
        let open = Window::new(file.clone(), 4096, None).await.unwrap();
        assert_eq!(open.len().await.unwrap(), 4096);
        open.set_len(8192).await.unwrap();
        assert_eq!(file.len().await.unwrap(), 12288);
    }

    #[test]
    fn names_as_qemu_gives_them() {
        let w = crate::block::RawWindow {
            offset: 4096,
            size: Some(1 << 20),
            offset_text: Some("4096".into()),
            size_text: Some("1M".into()),
        };
        assert_eq!(
            qemu_name(&w, "/tmp/r.raw"),
            r#"json:{"offset": "4096", "driver": "raw", "size": "1M", "file": {"driver": "file", "filename": "/tmp/r.raw"}}"#
        );
    }
}
