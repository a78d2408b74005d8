//! A sparse file held in memory: pages that were never written (or were zeroed) take no space,
//! so a benchmark can run a 64 GiB image with only its used parts in RAM.

use super::{IoFuture, Storage};
use crate::buf::{IoBuf, IoBufMut};
use parking_lot::RwLock;
use std::collections::HashMap;
use std::io;

const PAGE_BITS: u32 = 16;
const PAGE: u64 = 1 << PAGE_BITS;

#[derive(Clone, Default)]
struct Sparse {
    pages: HashMap<u64, Box<[u8]>>,
    len: u64,
}

impl Sparse {
    fn read(&self, buf: &mut [u8], offset: u64) {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let in_page = (pos & (PAGE - 1)) as usize;
            let n = (PAGE as usize - in_page).min(buf.len() - done);
            let dst = &mut buf[done..done + n];
            match self.pages.get(&(pos >> PAGE_BITS)) {
                Some(p) if pos < self.len => {
                    dst.copy_from_slice(&p[in_page..in_page + n]);
                    // Bytes past the end of the file read as zeros even if the page has data.
                    let valid = self.len.saturating_sub(pos) as usize;
                    if valid < n {
                        dst[valid..].fill(0);
                    }
                }
                _ => dst.fill(0),
            }
            done += n;
        }
    }

    fn write(&mut self, data: &[u8], offset: u64) {
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let in_page = (pos & (PAGE - 1)) as usize;
            let n = (PAGE as usize - in_page).min(data.len() - done);
            let page = self
                .pages
                .entry(pos >> PAGE_BITS)
                .or_insert_with(|| vec![0u8; PAGE as usize].into_boxed_slice());
            page[in_page..in_page + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
        self.len = self.len.max(offset + data.len() as u64);
    }

    /// Zeroes a range without extending the file: partial pages are cleared, whole pages
    /// dropped (by walking the range or the map, whichever is smaller).
    fn zero(&mut self, offset: u64, len: u64) {
        let end = offset + len;
        let first_whole = offset.div_ceil(PAGE);
        let end_whole = end / PAGE;
        let clear = |pages: &mut HashMap<u64, Box<[u8]>>, from: u64, to: u64| {
            if let Some(p) = pages.get_mut(&(from >> PAGE_BITS)) {
                p[(from & (PAGE - 1)) as usize..=((to - 1) & (PAGE - 1)) as usize].fill(0);
            }
        };
        if first_whole > end_whole {
            // Inside a single page.
            if len > 0 {
                clear(&mut self.pages, offset, end);
            }
            return;
        }
        if offset < first_whole * PAGE {
            clear(&mut self.pages, offset, first_whole * PAGE);
        }
        if end_whole * PAGE < end {
            clear(&mut self.pages, end_whole * PAGE, end);
        }
        if end_whole - first_whole < self.pages.len() as u64 {
            for idx in first_whole..end_whole {
                self.pages.remove(&idx);
            }
        } else {
            self.pages
                .retain(|&idx, _| idx < first_whole || idx >= end_whole);
        }
    }

    fn set_len(&mut self, len: u64) {
        if len < self.len {
            // Drop the data past the new end so a later extension reads zeros.
            let tail = self.len - len;
            self.zero(len, tail);
        }
        self.len = len;
    }
}

/// A file in memory.
#[derive(Default)]
pub struct MemoryStorage {
    inner: RwLock<Sparse>,
}

impl MemoryStorage {
    pub fn new() -> Self {
        Self::default()
    }

    /// A memory file holding a copy of `data`.
    pub fn from_bytes(data: &[u8]) -> Self {
        let s = Self::new();
        s.write_sync(data, 0);
        s
    }

    /// The whole content (for tests; the file must fit in memory).
    pub fn to_vec(&self) -> Vec<u8> {
        let g = self.inner.read();
        let mut v = vec![0u8; g.len as usize];
        g.read(&mut v, 0);
        v
    }

    /// An independent copy.
    pub fn snapshot(&self) -> MemoryStorage {
        MemoryStorage {
            inner: RwLock::new(self.inner.read().clone()),
        }
    }

    pub fn len_sync(&self) -> u64 {
        self.inner.read().len
    }

    pub fn read_sync(&self, buf: &mut [u8], offset: u64) {
        self.inner.read().read(buf, offset)
    }

    pub fn write_sync(&self, data: &[u8], offset: u64) {
        self.inner.write().write(data, offset)
    }

    pub fn zero_sync(&self, offset: u64, len: u64) {
        let mut g = self.inner.write();
        let end = offset + len;
        g.zero(offset, len);
        if end > g.len {
            g.len = end;
        }
    }

    pub fn discard_sync(&self, offset: u64, len: u64) {
        let mut g = self.inner.write();
        let end = (offset + len).min(g.len);
        if end > offset {
            g.zero(offset, end - offset);
        }
    }

    pub fn set_len_sync(&self, len: u64) {
        self.inner.write().set_len(len)
    }

    /// See [`Storage::hole_at`]: pages never written (or zeroed whole) are holes.
    pub fn hole_at_sync(&self, offset: u64, max: u64) -> (bool, u64) {
        let g = self.inner.read();
        let hole = |pos: u64| pos >= g.len || !g.pages.contains_key(&(pos >> PAGE_BITS));
        let first = hole(offset);
        let mut pos = offset;
        while pos < offset + max && hole(pos) == first {
            pos = ((pos >> PAGE_BITS) + 1) << PAGE_BITS;
        }
        (first, (pos - offset).min(max))
    }

    /// Bytes held in memory (allocated pages).
    pub fn resident_bytes(&self) -> u64 {
        self.inner.read().pages.len() as u64 * PAGE
    }
}

impl Storage for MemoryStorage {
    fn read_at(&self, mut buf: IoBufMut, offset: u64) -> IoFuture<'_, io::Result<IoBufMut>> {
        self.read_sync(&mut buf, offset);
        Box::pin(async move { Ok(buf) })
    }

    fn write_at(&self, buf: IoBuf, offset: u64) -> IoFuture<'_, io::Result<()>> {
        self.write_sync(&buf, offset);
        Box::pin(async { Ok(()) })
    }

    fn flush(&self) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async { Ok(()) })
    }

    fn len(&self) -> IoFuture<'_, io::Result<u64>> {
        let len = self.len_sync();
        Box::pin(async move { Ok(len) })
    }

    fn set_len(&self, len: u64) -> IoFuture<'_, io::Result<()>> {
        self.set_len_sync(len);
        Box::pin(async { Ok(()) })
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> IoFuture<'_, io::Result<()>> {
        self.zero_sync(offset, len);
        Box::pin(async { Ok(()) })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, io::Result<()>> {
        self.discard_sync(offset, len);
        Box::pin(async { Ok(()) })
    }

    fn allocate(&self, offset: u64, len: u64) -> IoFuture<'_, io::Result<()>> {
        let mut g = self.inner.write();
        g.len = g.len.max(offset + len);
        Box::pin(async { Ok(()) })
    }

    fn allocated_bytes(&self) -> Option<u64> {
        Some(self.resident_bytes())
    }

    fn hole_at(&self, offset: u64, max: u64) -> IoFuture<'_, io::Result<(bool, u64)>> {
        let r = self.hole_at_sync(offset, max);
        Box::pin(async move { Ok(r) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_contract() {
        let m = MemoryStorage::new();
        m.write_sync(b"abc", PAGE - 1);
        assert_eq!(m.len_sync(), PAGE + 2);
        let mut b = [9u8; 5];
        m.read_sync(&mut b, PAGE - 2);
        assert_eq!(&b, b"\0abc\0");
        m.zero_sync(PAGE, 1);
        m.read_sync(&mut b, PAGE - 2);
        assert_eq!(&b, b"\0a\0c\0");
        m.set_len_sync(PAGE);
        m.set_len_sync(PAGE + 10);
        m.read_sync(&mut b, PAGE - 2);
        assert_eq!(&b, b"\0a\0\0\0");
        m.write_sync(b"x", 1 << 40); // huge sparse file, two pages resident
        assert_eq!(m.resident_bytes(), 3 * PAGE);
        m.discard_sync(0, 1 << 41);
        assert_eq!(m.len_sync(), (1 << 40) + 1);
        assert!(m.resident_bytes() <= PAGE);
        let mut one = [9u8; 1];
        m.read_sync(&mut one, 1 << 40);
        assert_eq!(one[0], 0);
    }
}
