//! Owned, aligned I/O buffers.
//!
//! Storage backends run I/O on other threads (or in the kernel, with io_uring), so a buffer handed
//! to them must stay alive until the I/O completes even if the request future is dropped. Borrowed
//! slices cannot promise that; these owned buffers can. They are aligned to 4 KiB so that the same
//! buffer works with `O_DIRECT`.
//!
//! One guest request often maps to several host extents. [`IoBufMut::split_off`] cuts a buffer
//! into disjoint pieces that can be filled concurrently and [`IoBufMut::unsplit`] glues adjacent
//! pieces back without copying. [`IoBuf`] is the frozen, shareable form used for writes.
//!
//! Safety argument: every view holds an `Arc` to the allocation, so the memory outlives all views.
//! A mutable view is only created by allocation or by splitting another mutable view, so mutable
//! views of one allocation never overlap; shared views are only created from a mutable view that
//! is consumed (`freeze`) or from another shared view.

use std::alloc::{self, Layout};
use std::ops::{Deref, DerefMut, Range};
use std::ptr::NonNull;
use std::sync::Arc;

/// Alignment of every buffer: enough for `O_DIRECT` on 4Kn disks.
pub const BUF_ALIGN: usize = 4096;

struct Allocation {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the allocation is plain memory; access is coordinated by the views (see module docs).
unsafe impl Send for Allocation {}
unsafe impl Sync for Allocation {}

impl Allocation {
    fn zeroed(len: usize) -> Arc<Self> {
        let size = len.max(1);
        let layout = match Layout::from_size_align(size, BUF_ALIGN) {
            Ok(layout) => layout,
            // Only reachable for sizes near usize::MAX, which the callers bound long before.
            Err(_) => panic!("buffer size {len} overflows the address space"),
        };
        // SAFETY: layout has non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = match NonNull::new(raw) {
            Some(p) => p,
            None => alloc::handle_alloc_error(layout),
        };
        Arc::new(Allocation { ptr, layout })
    }
}

impl Allocation {
    /// An allocation of `len` bytes whose content is unspecified (but initialized): a recycled
    /// one when the pool has one of that size.
    ///
    /// Sizes up to the largest pool class are rounded up to a power of two (at most twice the
    /// memory, for a short-lived buffer): requests of odd sizes, such as the data runs between
    /// holes that convert copies, then reuse pooled memory too instead of faulting in and
    /// zeroing fresh pages every time.
    fn recycled(len: usize) -> Arc<Self> {
        if len == 0 {
            return Self::zeroed(0);
        }
        let rounded = len.max(1 << MIN_POOL_BITS).checked_next_power_of_two();
        if let Some(class) = rounded.and_then(pool_class) {
            if let Some(a) = POOL.lock()[class].pop() {
                return Arc::new(a);
            }
            return Self::zeroed(1 << (class as u32 + MIN_POOL_BITS));
        }
        Self::zeroed(len)
    }
}

impl Drop for Allocation {
    fn drop(&mut self) {
        if let Some(class) = pool_class(self.layout.size()) {
            if self.layout.size() == 1usize << (class as u32 + MIN_POOL_BITS) {
                let mut pool = POOL.lock();
                if pool[class].len() < POOL_DEPTH[class] {
                    pool[class].push(Allocation {
                        ptr: self.ptr,
                        layout: self.layout,
                    });
                    return;
                }
            }
        }
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

// A small pool of I/O buffers of power-of-two sizes from 4 KiB to 4 MiB, so that hot paths
// (request buffers, copy chunks) do not page-fault freshly mapped memory on every request.
const MIN_POOL_BITS: u32 = 12;
const POOL_CLASSES: usize = 11; // 4 KiB ..= 4 MiB
const POOL_DEPTH: [usize; POOL_CLASSES] = [256, 256, 128, 128, 64, 32, 16, 16, 16, 16, 8];
static POOL: parking_lot::Mutex<[Vec<Allocation>; POOL_CLASSES]> =
    parking_lot::Mutex::new([const { Vec::new() }; POOL_CLASSES]);

fn pool_class(len: usize) -> Option<usize> {
    if !len.is_power_of_two() || len < 1 << MIN_POOL_BITS {
        return None;
    }
    let class = (len.trailing_zeros() - MIN_POOL_BITS) as usize;
    (class < POOL_CLASSES).then_some(class)
}

/// Whether every byte is zero (64 bytes at a time; stops at the first non-zero block).
pub fn is_zero(b: &[u8]) -> bool {
    let mut chunks = b.chunks_exact(64);
    for c in &mut chunks {
        if c.iter().fold(0u8, |a, &x| a | x) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&x| x == 0)
}

/// A mutable, uniquely owned view of (part of) an aligned allocation.
pub struct IoBufMut {
    alloc: Arc<Allocation>,
    start: usize,
    len: usize,
}

impl IoBufMut {
    /// A zero-filled buffer of `len` bytes.
    pub fn zeroed(len: usize) -> Self {
        IoBufMut {
            alloc: Allocation::zeroed(len),
            start: 0,
            len,
        }
    }

    /// A buffer of `len` bytes whose content is unspecified: for data about to be overwritten
    /// entirely (a read target). Reuses pooled memory when it can.
    pub fn for_overwrite(len: usize) -> Self {
        IoBufMut {
            alloc: Allocation::recycled(len),
            start: 0,
            len,
        }
    }

    /// A buffer holding a copy of `data`.
    pub fn copy_from(data: &[u8]) -> Self {
        let mut b = Self::for_overwrite(data.len());
        b.copy_from_slice(data);
        b
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Splits the buffer in two: `self` keeps `[0, at)`, the returned buffer holds `[at, len)`.
    /// `at` is clamped to the length.
    pub fn split_off(&mut self, at: usize) -> IoBufMut {
        let at = at.min(self.len);
        let tail = IoBufMut {
            alloc: self.alloc.clone(),
            start: self.start + at,
            len: self.len - at,
        };
        self.len = at;
        tail
    }

    /// Appends `other`, which must follow `self` directly in the same allocation to avoid a
    /// copy; otherwise the two are copied into a new buffer.
    pub fn unsplit(&mut self, other: IoBufMut) {
        if other.is_empty() {
            return;
        }
        if Arc::ptr_eq(&self.alloc, &other.alloc) && self.start + self.len == other.start {
            self.len += other.len;
            return;
        }
        let mut joined = IoBufMut::zeroed(self.len + other.len);
        joined[..self.len].copy_from_slice(self);
        joined[self.len..].copy_from_slice(&other);
        *self = joined;
    }

    /// Shortens the buffer to `len` bytes (no-op if already shorter).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Turns the buffer into a shareable, read-only one.
    pub fn freeze(self) -> IoBuf {
        IoBuf {
            alloc: self.alloc,
            start: self.start,
            len: self.len,
        }
    }
}

impl Deref for IoBufMut {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: [start, start+len) lies inside the allocation (all constructors keep that) and
        // no other mutable view overlaps it (module docs).
        unsafe { std::slice::from_raw_parts(self.alloc.ptr.as_ptr().add(self.start), self.len) }
    }
}

impl DerefMut for IoBufMut {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` proves this view is not borrowed elsewhere.
        unsafe { std::slice::from_raw_parts_mut(self.alloc.ptr.as_ptr().add(self.start), self.len) }
    }
}

impl std::fmt::Debug for IoBufMut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IoBufMut({} bytes)", self.len)
    }
}

/// A shared, read-only view of an aligned allocation. Cheap to clone and slice.
#[derive(Clone)]
pub struct IoBuf {
    alloc: Arc<Allocation>,
    start: usize,
    len: usize,
}

impl IoBuf {
    /// A buffer holding a copy of `data`.
    pub fn copy_from(data: &[u8]) -> Self {
        IoBufMut::copy_from(data).freeze()
    }

    /// A zero-filled buffer.
    pub fn zeroed(len: usize) -> Self {
        IoBufMut::zeroed(len).freeze()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Joins two views that lie back to back in the same allocation (no copy); `None` otherwise.
    pub fn try_join(&self, next: &IoBuf) -> Option<IoBuf> {
        (Arc::ptr_eq(&self.alloc, &next.alloc) && self.start + self.len == next.start).then(|| {
            IoBuf {
                alloc: self.alloc.clone(),
                start: self.start,
                len: self.len + next.len,
            }
        })
    }

    /// A sub-view. The range is clamped to the buffer.
    pub fn slice(&self, range: Range<usize>) -> IoBuf {
        let end = range.end.min(self.len);
        let start = range.start.min(end);
        IoBuf {
            alloc: self.alloc.clone(),
            start: self.start + start,
            len: end - start,
        }
    }
}

impl Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: inside the allocation; shared views are never written (module docs).
        unsafe { std::slice::from_raw_parts(self.alloc.ptr.as_ptr().add(self.start), self.len) }
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IoBuf({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_and_unsplit_without_copy() {
        let mut a = IoBufMut::zeroed(10000);
        let base = a.as_ptr() as usize;
        assert_eq!(base % BUF_ALIGN, 0);
        let mut b = a.split_off(4096);
        let c = b.split_off(1000);
        assert_eq!((a.len(), b.len(), c.len()), (4096, 1000, 4904));
        b.fill(7);
        a.unsplit(b);
        a.unsplit(c);
        assert_eq!(a.len(), 10000);
        assert_eq!(a.as_ptr() as usize, base);
        assert!(a[4096..5096].iter().all(|&x| x == 7));
        assert!(a[5096..].iter().all(|&x| x == 0));
    }

    #[test]
    fn unsplit_non_adjacent_copies() {
        let mut a = IoBufMut::copy_from(b"abc");
        let b = IoBufMut::copy_from(b"def");
        a.unsplit(b);
        assert_eq!(&a[..], b"abcdef");
    }

    #[test]
    fn pooled_buffers_are_reused() {
        let a = IoBufMut::for_overwrite(65536);
        let p = a.as_ptr() as usize;
        drop(a);
        let b = IoBufMut::for_overwrite(65536);
        // Likely the same memory (other tests may race for the pool); never smaller.
        assert_eq!(b.len(), 65536);
        let _ = p;
        let z = IoBufMut::zeroed(65536);
        assert!(z.iter().all(|&x| x == 0));
    }

    #[test]
    fn freeze_and_slice() {
        let b = IoBuf::copy_from(b"hello world");
        assert_eq!(&b.slice(6..11)[..], b"world");
        assert_eq!(&b.slice(6..100)[..], b"world");
        assert_eq!(b.slice(20..30).len(), 0);
        let z = IoBufMut::zeroed(0);
        assert!(z.is_empty());
    }
}
