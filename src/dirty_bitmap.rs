//! An in-memory dirty bitmap: one bit per `granularity` bytes of a disk, set when those bytes
//! change.
//!
//! Writes mark it from many threads at once, so bits are set with atomic operations and no
//! lock; a word whose bits are already set is only read (the common case of a disk rewriting
//! the same areas costs no cache-line transfer). Storage is one chunk per cluster of the
//! on-disk bitmap data, allocated when a bit in it is first set: a clean bitmap of a terabyte
//! disk costs a few kilobytes, and a chunk maps one-to-one to a bitmap table entry when stored.
//! Bit `i` is bit `i % 64` of word `i / 64`, which serialized as little-endian words is bit
//! `i % 8` of byte `i / 8`: the qcow2 on-disk order.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;

pub struct DirtyBitmap {
    granularity_bits: u32,
    /// Bytes of disk covered.
    size: u64,
    /// Bits in use: `size / granularity`, rounded up.
    len: u64,
    /// Bits per chunk (a multiple of 64).
    chunk_bits: u64,
    chunks: Vec<OnceLock<Box<[AtomicU64]>>>,
    /// A bit changed since [`DirtyBitmap::take_changed`] last ran.
    changed: AtomicBool,
}

impl DirtyBitmap {
    /// A clean bitmap of a disk of `size` bytes, `chunk_bytes` of bits per chunk.
    pub fn new(size: u64, granularity_bits: u32, chunk_bytes: u64) -> DirtyBitmap {
        let len = size.div_ceil(1 << granularity_bits);
        let chunk_bits = (chunk_bytes * 8).max(64);
        let n = len.div_ceil(chunk_bits) as usize;
        DirtyBitmap {
            granularity_bits,
            size,
            len,
            chunk_bits,
            chunks: (0..n).map(|_| OnceLock::new()).collect(),
            changed: AtomicBool::new(false),
        }
    }

    pub fn granularity(&self) -> u64 {
        1 << self.granularity_bits
    }

    pub fn granularity_bits(&self) -> u32 {
        self.granularity_bits
    }

    /// Bytes of disk covered.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of chunks (bitmap table entries when stored).
    pub fn chunks(&self) -> usize {
        self.chunks.len()
    }

    fn chunk(&self, i: usize) -> &[AtomicU64] {
        self.chunks[i].get_or_init(|| {
            (0..self.chunk_bits / 64)
                .map(|_| AtomicU64::new(0))
                .collect()
        })
    }

    /// Marks the bytes `[offset, offset+len)` dirty (clipped to the disk).
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.size {
            return;
        }
        let end = (offset.saturating_add(len)).min(self.size);
        let first = offset >> self.granularity_bits;
        let last = (end - 1) >> self.granularity_bits;
        self.set_bits(first, last + 1);
    }

    /// Sets bits `[first, end)`.
    fn set_bits(&self, first: u64, end: u64) {
        let mut bit = first;
        while bit < end {
            let c = (bit / self.chunk_bits) as usize;
            let in_chunk = bit % self.chunk_bits;
            let n = (self.chunk_bits - in_chunk).min(end - bit);
            let words = self.chunk(c);
            let mut b = in_chunk;
            while b < in_chunk + n {
                let w = (b / 64) as usize;
                let lo = b % 64;
                let k = (64 - lo).min(in_chunk + n - b);
                let mask = if k == 64 {
                    u64::MAX
                } else {
                    ((1u64 << k) - 1) << lo
                };
                if words[w].load(Relaxed) & mask != mask {
                    words[w].fetch_or(mask, Relaxed);
                    self.changed.store(true, Relaxed);
                }
                b += k;
            }
            bit += n;
        }
    }

    /// Marks the whole disk dirty.
    pub fn mark_all(&self) {
        self.set_bits(0, self.len);
    }

    /// Clears every bit.
    pub fn clear(&self) {
        for c in &self.chunks {
            if let Some(words) = c.get() {
                for w in words.iter() {
                    if w.swap(0, Relaxed) != 0 {
                        self.changed.store(true, Relaxed);
                    }
                }
            }
        }
    }

    /// Whether the bit covering byte `offset` is set.
    pub fn is_dirty(&self, offset: u64) -> bool {
        if offset >= self.size {
            return false;
        }
        self.bit(offset >> self.granularity_bits)
    }

    fn bit(&self, bit: u64) -> bool {
        let c = (bit / self.chunk_bits) as usize;
        match self.chunks[c].get() {
            None => false,
            Some(words) => {
                let b = bit % self.chunk_bits;
                words[(b / 64) as usize].load(Relaxed) & (1 << (b % 64)) != 0
            }
        }
    }

    /// The run starting at byte `offset` (below the disk size): `(bytes, dirty)`, at most
    /// `max` bytes, and ending at a granularity boundary or the disk's end.
    pub fn extent(&self, offset: u64, max: u64) -> (u64, bool) {
        let end = offset.saturating_add(max).min(self.size);
        let dirty = self.is_dirty(offset);
        let mut bit = (offset >> self.granularity_bits) + 1;
        let last = end.div_ceil(1 << self.granularity_bits);
        while bit < last {
            let c = (bit / self.chunk_bits) as usize;
            let in_chunk = bit % self.chunk_bits;
            match self.chunks[c].get() {
                None if !dirty => {
                    bit += self.chunk_bits - in_chunk;
                    continue;
                }
                None => break,
                Some(words) => {
                    let w = words[(in_chunk / 64) as usize].load(Relaxed);
                    let w = if dirty { !w } else { w } >> (in_chunk % 64);
                    if w != 0 {
                        bit += u64::from(w.trailing_zeros());
                        break;
                    }
                    bit += 64 - in_chunk % 64;
                }
            }
        }
        let stop = (bit.min(last) << self.granularity_bits).min(end);
        (stop - offset, dirty)
    }

    /// Whether no bit is set.
    pub fn is_clean(&self) -> bool {
        self.chunks.iter().all(|c| {
            c.get()
                .is_none_or(|w| w.iter().all(|w| w.load(Relaxed) == 0))
        })
    }

    /// Chunk `i` as stored on disk (`chunk_bytes` long), or `None` when it is all zeros.
    pub fn chunk_bytes(&self, i: usize) -> Option<Vec<u8>> {
        let words = self.chunks[i].get()?;
        if words.iter().all(|w| w.load(Relaxed) == 0) {
            return None;
        }
        let mut out = Vec::with_capacity(words.len() * 8);
        for w in words.iter() {
            out.extend_from_slice(&w.load(Relaxed).to_le_bytes());
        }
        Some(out)
    }

    /// Sets chunk `i` from its on-disk bytes (bits past the disk's end are ignored).
    pub fn load_chunk(&self, i: usize, bytes: &[u8]) {
        let base = i as u64 * self.chunk_bits;
        for (k, b) in bytes.chunks(8).enumerate() {
            let mut word = [0u8; 8];
            word[..b.len()].copy_from_slice(b);
            let mut v = u64::from_le_bytes(word);
            let first = base + k as u64 * 64;
            if first >= self.len {
                break;
            }
            if self.len - first < 64 {
                v &= (1u64 << (self.len - first)) - 1;
            }
            if v != 0 {
                self.chunk(i)[k].fetch_or(v, Relaxed);
            }
        }
    }

    /// Sets every bit of chunk `i` (a table entry that says "all ones").
    pub fn fill_chunk(&self, i: usize) {
        let first = i as u64 * self.chunk_bits;
        self.set_bits(first, (first + self.chunk_bits).min(self.len));
    }

    /// Sets every bit that is set in `other` (any granularity: a dirty byte range of `other`
    /// marks the bits that cover it here).
    pub fn merge_from(&self, other: &DirtyBitmap) {
        let size = other.size.min(self.size);
        let mut pos = 0;
        while pos < size {
            let (n, dirty) = other.extent(pos, size - pos);
            if dirty {
                self.mark(pos, n);
            }
            pos += n;
        }
    }

    /// A copy for a disk of `size` bytes: bits past a smaller disk are dropped, a larger disk's
    /// new area is clean.
    pub fn resized(&self, size: u64) -> DirtyBitmap {
        let out = DirtyBitmap::new(size, self.granularity_bits, self.chunk_bits / 8);
        out.merge_from(self);
        out.changed.store(true, Relaxed);
        out
    }

    /// Whether a bit changed since the last call (or since the bitmap was loaded).
    pub fn take_changed(&self) -> bool {
        self.changed.swap(false, Relaxed)
    }

    /// Marks the bitmap as changed (it must be stored even if no bit moves).
    pub fn set_changed(&self) {
        self.changed.store(true, Relaxed);
    }
}

impl std::fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyBitmap")
            .field("size", &self.size)
            .field("granularity", &self.granularity())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn marks_and_reports_runs() {
        let b = DirtyBitmap::new(10 << 20, 16, 512);
        assert!(b.is_clean());
        b.mark(3 << 20, 1 << 20);
        assert_eq!(b.extent(0, 10 << 20), (3 << 20, false));
        assert_eq!(b.extent(3 << 20, 10 << 20), (1 << 20, true));
        assert_eq!(b.extent(4 << 20, 10 << 20), (6 << 20, false));
        // A byte marks the whole granule.
        b.mark((5 << 20) + 1, 1);
        assert_eq!(b.extent(5 << 20, 1 << 20), (64 << 10, true));
        assert!(b.take_changed());
        b.mark(3 << 20, 4096);
        assert!(!b.take_changed(), "setting set bits is no change");
    }

    #[test]
    fn chunks_round_trip_in_disk_order() {
        let b = DirtyBitmap::new(1 << 30, 9, 512);
        b.mark(0, 512);
        b.mark(9 * 512, 512);
        let bytes = b.chunk_bytes(0).unwrap();
        assert_eq!(bytes[0], 1);
        assert_eq!(bytes[1], 2);
        assert!(b.chunk_bytes(1).is_none());
        let c = DirtyBitmap::new(1 << 30, 9, 512);
        c.load_chunk(0, &bytes);
        assert_eq!(c.chunk_bytes(0).unwrap(), bytes);
    }

    #[test]
    fn fill_stops_at_the_disk_end() {
        let b = DirtyBitmap::new(100 * 512, 9, 512);
        b.fill_chunk(0);
        assert_eq!(b.extent(0, u64::MAX), (100 * 512, true));
        let bytes = b.chunk_bytes(0).unwrap();
        assert_eq!(bytes[12], 0x0f);
        assert_eq!(bytes[13], 0);
    }

    #[test]
    fn resize_keeps_bits_and_merge_converts_granularity() {
        let b = DirtyBitmap::new(8 << 20, 16, 512);
        b.mark(1 << 20, 4096);
        b.mark(7 << 20, 4096);
        let small = b.resized(4 << 20);
        assert_eq!(small.extent(0, u64::MAX), (1 << 20, false));
        assert_eq!(small.extent(1 << 20, u64::MAX), (64 << 10, true));
        assert!(!small.extent((1 << 20) + (64 << 10), u64::MAX).1);
        let coarse = DirtyBitmap::new(8 << 20, 19, 512);
        coarse.merge_from(&b);
        assert_eq!(coarse.extent(1 << 20, u64::MAX), (512 << 10, true));
    }

    proptest! {
        /// The bitmap against a model: a set of dirty granules.
        #[test]
        fn matches_a_model(
            gran in 9u32..18,
            ops in proptest::collection::vec((0u64..(4 << 20), 1u64..(300 << 10), any::<bool>()), 1..40),
        ) {
            let size = 4u64 << 20;
            let b = DirtyBitmap::new(size, gran, 512);
            let g = 1u64 << gran;
            let mut model = vec![false; size.div_ceil(g) as usize];
            for (off, len, clear) in ops {
                if clear && off % 7 == 0 {
                    b.clear();
                    model.iter_mut().for_each(|m| *m = false);
                    continue;
                }
                b.mark(off, len);
                let end = (off + len).min(size);
                for i in off / g..end.div_ceil(g) {
                    model[i as usize] = true;
                }
            }
            let mut pos = 0;
            while pos < size {
                let (n, dirty) = b.extent(pos, size - pos);
                prop_assert!(n > 0);
                let mut p = pos;
                while p < pos + n {
                    prop_assert_eq!(model[(p / g) as usize], dirty, "at {}", p);
                    p = (p / g + 1) * g;
                }
                pos += n;
            }
        }
    }
}
