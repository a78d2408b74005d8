//! The active L1 table, always fully in memory.
//!
//! The table is split into chunks (4 KiB, or one cluster if smaller) that are cache [`Table`]s
//! of their own, never evicted. That gives L1 entries the same ordered writeback as L2 entries:
//! an L1 entry that points to a new L2 table carries a dependency on that table's content (and
//! refcount) being durable, and only the chunks that changed are written.
//!
//! Lookups are on the hot path of every request, so they take no lock at all: entries are also
//! kept in an array of atomics (updated together with the chunk, under the chunk's lock), and the
//! whole structure is replaced (growth) by swapping an `Arc` (`arc-swap`), which readers load
//! without writing to any shared cache line.

use super::cache::{put_u64, Dep, Table};
use crate::format::table::L1Entry;
use crate::units::HostOffset;
use arc_swap::ArcSwap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

struct Inner {
    offset: HostOffset,
    size: u64,
    chunk_entries: usize,
    chunks: Vec<Arc<Table>>,
    /// The entries, readable without locks.
    entries: Box<[AtomicU64]>,
}

pub struct L1Table {
    inner: ArcSwap<Inner>,
}

impl L1Table {
    /// Builds the table from its on-disk bytes (`bytes.len() >= size * 8`).
    pub fn new(offset: HostOffset, size: u64, bytes: &[u8], cluster_size: u64) -> Self {
        L1Table {
            inner: ArcSwap::from_pointee(Self::build(offset, size, bytes, cluster_size)),
        }
    }

    fn build(offset: HostOffset, size: u64, bytes: &[u8], cluster_size: u64) -> Inner {
        let chunk_bytes = cluster_size.min(4096) as usize;
        let chunk_entries = chunk_bytes / 8;
        let total = (size as usize * 8).div_ceil(chunk_bytes) * chunk_bytes;
        let mut padded = bytes[..(size as usize * 8).min(bytes.len())].to_vec();
        padded.resize(total, 0);
        let chunks = padded
            .chunks(chunk_bytes)
            .enumerate()
            .map(|(i, c)| {
                Arc::new(Table::new_l1_chunk(
                    HostOffset(offset.0 + (i * chunk_bytes) as u64),
                    c.to_vec().into_boxed_slice(),
                ))
            })
            .collect();
        let entries = padded
            .chunks_exact(8)
            .take(size as usize)
            .map(|e| AtomicU64::new(crate::format::be::u64(e, 0)))
            .collect();
        Inner {
            offset,
            size,
            chunk_entries,
            chunks,
            entries,
        }
    }

    pub fn size(&self) -> u64 {
        self.inner.load().size
    }

    pub fn offset(&self) -> HostOffset {
        self.inner.load().offset
    }

    /// Entry `i`, or `None` past the end of the table.
    pub fn get(&self, i: u64) -> Option<L1Entry> {
        let inner = self.inner.load();
        let e = inner.entries.get(i as usize)?;
        Some(L1Entry(e.load(Ordering::Acquire)))
    }

    /// Sets entry `i` (which must exist), to be written once `deps` are durable.
    pub fn set(&self, i: u64, e: L1Entry, deps: Vec<Dep>) {
        let inner = self.inner.load();
        let ce = inner.chunk_entries;
        let chunk = &inner.chunks[i as usize / ce];
        let mut st = chunk.lock();
        let data = st.modify(deps);
        put_u64(data, i as usize % ce, e.0);
        inner.entries[i as usize].store(e.0, Ordering::Release);
    }

    /// A dependency on entry `i` reaching the disk in its current state.
    pub fn dep_on_entry(&self, i: u64) -> Dep {
        let inner = self.inner.load();
        inner.chunks[i as usize / inner.chunk_entries].dep_current()
    }

    /// The chunks with unwritten changes.
    pub fn dirty_chunks(&self) -> Vec<Arc<Table>> {
        self.inner
            .load()
            .chunks
            .iter()
            .filter(|c| c.is_dirty())
            .cloned()
            .collect()
    }

    /// All entries (for check and snapshot code).
    pub fn entries(&self) -> Vec<u64> {
        let inner = self.inner.load();
        inner
            .entries
            .iter()
            .map(|e| e.load(Ordering::Acquire))
            .collect()
    }

    /// Replaces the table by one already written at `offset` with `bytes` (growth). Callers
    /// hold the resize lock exclusively, so no `set` runs concurrently.
    pub fn replace(&self, offset: HostOffset, size: u64, bytes: &[u8], cluster_size: u64) {
        super::l2view::bump();
        self.inner
            .store(Arc::new(Self::build(offset, size, bytes, cluster_size)));
    }
}
