//! The metadata cache: L2 table slices and refcount blocks, with ordered writeback.
//!
//! Each cached table is an [`Table`] behind an `Arc`. Holding the `Arc` pins it: the evictor
//! never drops a table someone else holds. Lookups take the index mutex for a hash lookup only;
//! table contents have their own short mutex, never held across I/O.
//!
//! # Write ordering
//! A modification records the [`Dep`]endencies it needs on disk before the table may be written:
//! another table written at some version (an L2 entry needs the refcount block that counts its
//! new cluster), or a sync after some barrier generation (data written before the entry that
//! points to it). Writeback snapshots contents, version and dependencies under one lock,
//! satisfies the dependencies (writing the other tables, then one fsync for all of them), and then
//! writes the snapshot. Modifications made meanwhile carry their own dependencies and stay dirty
//! for the next writeback. Dependencies only point from L1 to L2 to refcount blocks (frees are
//! deferred, see `refcount`), so writeback cannot cycle.
//!
//! # Replacement
//! CLOCK (second chance): a referenced bit set on every hit, a hand that clears it and evicts the
//! first clean, unpinned, unreferenced table. O(1) amortized, no list manipulation on hits. When
//! only dirty tables could go, a batch of them is written back together (sharing one fsync) and
//! evicted afterwards; the cache may run over its size meanwhile rather than block.

use super::barrier::Barrier;
use super::overlap::{Fixed, MetadataMap};
use crate::buf::{IoBuf, IoBufMut};
use crate::error::{Error, IoContext, Result};
use crate::storage::blkdebug::DebugEvent;
use crate::storage::StorageRef;
use crate::striped::StripedCounter;
use crate::units::{Geometry, HostOffset};
use futures_util::future::{try_join_all, BoxFuture};
use parking_lot::{Mutex, MutexGuard};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::Arc;

/// Something that must be on stable storage before a modification may be written.
#[derive(Clone)]
pub enum Dep {
    /// `table` written at `version` or later, and that write synced.
    Table { table: Arc<Table>, version: u64 },
    /// A sync completed after barrier generation `.0` (covers writes completed before it).
    Sync(u64),
}

impl Dep {
    /// Widens `self` to also cover `other` when both are about the same thing (the same table,
    /// or both syncs): the later version or generation covers the earlier. Returns whether it did.
    pub fn absorb(&mut self, other: &Dep) -> bool {
        match (self, other) {
            (Dep::Sync(g), Dep::Sync(n)) => {
                *g = (*g).max(*n);
                true
            }
            (
                Dep::Table { table, version },
                Dep::Table {
                    table: t,
                    version: n,
                },
            ) if Arc::ptr_eq(table, t) => {
                *version = (*version).max(*n);
                true
            }
            _ => false,
        }
    }

    /// Adds `d` to `deps`, merged into an entry it can be absorbed by.
    pub fn push_merged(deps: &mut Vec<Dep>, d: Dep) {
        if !deps.iter_mut().any(|old| old.absorb(&d)) {
            deps.push(d);
        }
    }

    pub fn satisfied(&self, barrier: &Barrier) -> bool {
        match self {
            Dep::Table { table, version } => {
                // Load the version before the generation: the writer stores them in the
                // opposite order, so the generation seen belongs to this version or a later one.
                table.written_version.load(SeqCst) >= *version
                    && barrier.is_durable(table.written_gen.load(SeqCst))
            }
            Dep::Sync(g) => barrier.is_durable(*g),
        }
    }
}

/// Mutable part of a cached table.
pub struct TableState {
    data: Box<[u8]>,
    version: u64,
    /// Dependencies of modifications not yet written, tagged with their version.
    deps: Vec<(u64, Dep)>,
}

impl TableState {
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// Starts a modification that needs `deps` on disk first; returns the bytes to change.
    pub fn modify(&mut self, deps: impl IntoIterator<Item = Dep>) -> &mut [u8] {
        // Before the change: no thread may use its copy of any table from here on (l2view).
        super::l2view::bump();
        self.version += 1;
        let v = self.version;
        for d in deps {
            self.add_dep(v, d);
        }
        &mut self.data
    }

    /// Records `d` for version `v`, merged with an entry for the same table (or the sync) when
    /// there is one: a later version of a table, or a sync after a later generation, covers the
    /// earlier. The merged entry takes the newest tag, so it is kept until a write covers it.
    /// Without merging, a table modified many times between writebacks (thousands of compressed
    /// clusters in one L2 slice under `cache=unsafe`) would collect one entry per change.
    fn add_dep(&mut self, v: u64, d: Dep) {
        for (tag, old) in self.deps.iter_mut() {
            if old.absorb(&d) {
                *tag = v;
                return;
            }
        }
        self.deps.push((v, d));
    }

    /// Big-endian u64 entry `i` (L1 chunks).
    #[inline]
    pub fn u64_at(&self, i: usize) -> u64 {
        let o = i * 8;
        u64::from_be_bytes(self.data[o..o + 8].try_into().unwrap_or([0; 8]))
    }

    /// L2 entry `i`: first word and subcluster bitmap (see [`l2_entry`]).
    #[inline]
    pub fn l2_at(&self, i: usize, g: Geometry) -> (u64, u64) {
        l2_entry(&self.data, i, g)
    }
}

/// L2 entry `i` of a slice: its first word and its subcluster bitmap (0 for standard entries).
#[inline]
pub fn l2_entry(data: &[u8], i: usize, g: Geometry) -> (u64, u64) {
    if g.extended_l2 {
        (word(data, 2 * i), word(data, 2 * i + 1))
    } else {
        (word(data, i), 0)
    }
}

/// Sets L2 entry `i` of a slice (the bitmap is ignored for standard entries).
#[inline]
pub fn put_l2_entry(data: &mut [u8], i: usize, g: Geometry, raw: u64, bitmap: u64) {
    if g.extended_l2 {
        put_u64(data, 2 * i, raw);
        put_u64(data, 2 * i + 1, bitmap);
    } else {
        put_u64(data, i, raw);
    }
}

fn word(data: &[u8], i: usize) -> u64 {
    data.get(i * 8..i * 8 + 8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_be_bytes)
}

/// Stores a big-endian u64 entry into a table being modified.
#[inline]
pub fn put_u64(data: &mut [u8], i: usize, v: u64) {
    data[i * 8..i * 8 + 8].copy_from_slice(&v.to_be_bytes());
}

/// One cached cluster (or L2 slice).
pub struct Table {
    offset: HostOffset,
    state: Mutex<TableState>,
    /// Version of the last completed write (or of the content loaded from disk).
    written_version: AtomicU64,
    /// Barrier generation when that write completed.
    written_gen: AtomicU64,
    /// Serializes writebacks of this table.
    writeback: tokio::sync::Mutex<()>,
    loaded: tokio::sync::OnceCell<()>,
    referenced: AtomicBool,
    /// Set when the cluster was freed: the table must never be written again.
    discarded: AtomicBool,
    /// A chunk of a fixed structure (the L1 table) rather than an L2 slice or refcount block:
    /// what its writes may overlap (see `overlap`).
    fixed: Option<Fixed>,
    /// What a write of this table announces to the storage (`blkdebug`'s `l2_update`,
    /// `refblock_update_part`, `l1_update`).
    write_event: DebugEvent,
}

impl Table {
    fn new(offset: HostOffset, data: Box<[u8]>) -> Self {
        Table {
            offset,
            state: Mutex::new(TableState {
                data,
                version: 0,
                deps: Vec::new(),
            }),
            written_version: AtomicU64::new(0),
            written_gen: AtomicU64::new(0),
            writeback: tokio::sync::Mutex::new(()),
            loaded: tokio::sync::OnceCell::new(),
            referenced: AtomicBool::new(true),
            fixed: None,
            discarded: AtomicBool::new(false),
            write_event: DebugEvent::None,
        }
    }

    /// A table whose content is already known (not read from disk), clean.
    pub fn new_loaded(offset: HostOffset, data: Box<[u8]>) -> Self {
        let t = Table::new(offset, data);
        let _ = t.loaded.set(());
        t
    }

    /// A chunk of the active L1 table (its writes are checked as the L1 table's).
    pub fn new_l1_chunk(offset: HostOffset, data: Box<[u8]>) -> Self {
        let mut t = Table::new_loaded(offset, data);
        t.fixed = Some(Fixed::ActiveL1);
        t.write_event = DebugEvent::L1Update;
        t
    }

    pub fn offset(&self) -> HostOffset {
        self.offset
    }

    /// Locks the contents. Never hold the guard across an `.await`.
    pub fn lock(&self) -> MutexGuard<'_, TableState> {
        self.state.lock()
    }

    pub fn is_dirty(&self) -> bool {
        !self.discarded.load(Relaxed)
            && self.state.lock().version > self.written_version.load(SeqCst)
    }

    /// A dependency on the table's current content reaching the disk.
    pub fn dep_current(self: &Arc<Self>) -> Dep {
        let version = self.state.lock().version;
        Dep::Table {
            table: self.clone(),
            version,
        }
    }
}

/// What the cache needs to write tables back.
pub struct Writer {
    pub storage: StorageRef,
    pub barrier: Arc<Barrier>,
    /// Writethrough mode: callers write modified tables back before completing.
    pub writethrough: bool,
    /// Metadata writes issued (statistics).
    pub writes: AtomicU64,
    /// Where metadata lives: every metadata and data write is checked against it.
    pub overlap: MetadataMap,
}

impl Writer {
    /// Announces a step of the driver to a `blkdebug` node below (a no-op on other storage),
    /// waiting while a breakpoint holds it.
    pub async fn announce(&self, event: DebugEvent) {
        if let Some(suspended) = self.storage.debug_event(event) {
            suspended.await;
        }
    }

    /// Refuses a metadata write that would overwrite other metadata, and marks the image
    /// corrupt in memory at once (the caller's error path persists the corrupt bit).
    pub fn check_metadata_write(&self, offset: u64, len: u64, own: Option<Fixed>) -> Result<()> {
        match self.overlap.check_metadata(offset, len, own) {
            Ok(()) => Ok(()),
            Err(o) => {
                self.barrier.mark_corrupt();
                Err(Error::corrupt(o.message()))
            }
        }
    }

    /// Writes `t` back if dirty, after everything its modifications depend on.
    pub fn write_back<'a>(&'a self, t: &'a Arc<Table>) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let _serial = t.writeback.lock().await;
            let (snapshot, version, deps) = {
                let st = t.state.lock();
                if st.version <= t.written_version.load(SeqCst) || t.discarded.load(Relaxed) {
                    return Ok(());
                }
                let unsatisfied: Vec<Dep> = st
                    .deps
                    .iter()
                    .filter(|(_, d)| !d.satisfied(&self.barrier))
                    .map(|(_, d)| d.clone())
                    .collect();
                (IoBuf::copy_from(&st.data), st.version, unsatisfied)
            };
            self.satisfy(&deps).await?;
            if self.barrier.sync_failed() {
                // The table stays dirty; what was durable before the failure is unknown.
                return Err(crate::error::Error::sync_failed());
            }
            self.check_metadata_write(t.offset.0, snapshot.len() as u64, t.fixed)?;
            self.writes.fetch_add(1, Relaxed);
            if t.write_event != DebugEvent::None {
                if let Some(suspended) = self.storage.debug_event(t.write_event) {
                    suspended.await;
                }
            }
            self.storage
                .write_at(snapshot, t.offset.0)
                .await
                .context(|| format!("writing metadata at host offset {}", t.offset))?;
            let g = self.barrier.generation();
            t.written_gen.store(g, SeqCst);
            t.written_version.fetch_max(version, SeqCst);
            t.state.lock().deps.retain(|(v, _)| *v > version);
            Ok(())
        })
    }

    /// Makes every dependency in `deps` durable: writes the tables, then one sync.
    pub async fn satisfy(&self, deps: &[Dep]) -> Result<()> {
        let mut need: Option<u64> = None;
        let tables: Vec<&Arc<Table>> = deps
            .iter()
            .filter_map(|d| match d {
                Dep::Table { table, .. } => Some(table),
                Dep::Sync(_) => None,
            })
            .collect();
        try_join_all(tables.iter().map(|t| self.write_back(t))).await?;
        for d in deps {
            let g = match d {
                Dep::Table { table, .. } => table.written_gen.load(SeqCst),
                Dep::Sync(g) => *g,
            };
            if !self.barrier.is_durable(g) {
                need = Some(need.map_or(g, |n: u64| n.max(g)));
            }
        }
        if let Some(g) = need {
            self.barrier.sync_after(g).await?;
        }
        Ok(())
    }
}

struct Index {
    map: HashMap<u64, usize>,
    slots: Vec<Arc<Table>>,
    hand: usize,
}

impl Index {
    fn remove_slot(&mut self, i: usize) -> Arc<Table> {
        super::l2view::bump();
        let t = self.slots.swap_remove(i);
        self.map.remove(&t.offset.0);
        if let Some(moved) = self.slots.get(i) {
            self.map.insert(moved.offset.0, i);
        }
        if self.hand >= self.slots.len() {
            self.hand = 0;
        }
        t
    }

    /// CLOCK sweep: evicts one clean, unpinned, unreferenced table. Collects dirty candidates
    /// seen on the way into `dirty`.
    fn evict_one(&mut self, dirty: &mut Vec<Arc<Table>>) -> bool {
        let n = self.slots.len();
        for _ in 0..2 * n {
            if self.slots.is_empty() {
                return false;
            }
            let i = self.hand % self.slots.len();
            let t = &self.slots[i];
            self.hand = i + 1;
            if Arc::strong_count(t) > 1 {
                continue; // pinned
            }
            if t.referenced.swap(false, Relaxed) {
                continue;
            }
            if t.is_dirty() {
                if dirty.len() < 64 && !dirty.iter().any(|d| Arc::ptr_eq(d, t)) {
                    dirty.push(t.clone());
                }
                continue;
            }
            self.remove_slot(i);
            return true;
        }
        false
    }
}

/// Cache statistics (monotonic counters).
#[derive(Default)]
pub struct CacheStats {
    pub hits: StripedCounter,
    pub misses: StripedCounter,
    pub evictions: StripedCounter,
}

/// A cache of same-sized tables (L2 slices or refcount blocks).
/// The name of the L2 table cache (`MetaCache::new`'s `what`).
pub const L2_TABLE: &str = "L2 table";

pub struct MetaCache {
    what: &'static str,
    entry_size: usize,
    capacity: usize,
    index: Mutex<Index>,
    pub stats: CacheStats,
}

impl Drop for MetaCache {
    fn drop(&mut self) {
        // Another cache may be created at this address: no copy of ours may look like its.
        super::l2view::bump();
    }
}

impl MetaCache {
    pub fn new(what: &'static str, entry_size: usize, capacity: usize) -> Self {
        super::l2view::bump();
        MetaCache {
            what,
            entry_size,
            capacity: capacity.max(2),
            index: Mutex::new(Index {
                map: HashMap::new(),
                slots: Vec::new(),
                hand: 0,
            }),
            stats: CacheStats::default(),
        }
    }

    pub fn entry_size(&self) -> usize {
        self.entry_size
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.index.lock().slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The table at `offset`, loaded from disk if not cached.
    pub async fn get(&self, w: &Writer, offset: HostOffset) -> Result<Arc<Table>> {
        let t = self.lookup_or_insert(w, offset, None).await?;
        t.loaded
            .get_or_try_init(|| async {
                let event = if self.what == L2_TABLE {
                    DebugEvent::L2Load
                } else {
                    DebugEvent::RefblockLoad
                };
                if let Some(suspended) = w.storage.debug_event(event) {
                    suspended.await;
                }
                let buf = w
                    .storage
                    .read_at(IoBufMut::for_overwrite(self.entry_size), offset.0)
                    .await
                    .context(|| format!("reading {} at host offset {offset}", self.what))?;
                t.state.lock().data.copy_from_slice(&buf);
                Ok::<(), crate::error::Error>(())
            })
            .await?;
        Ok(t)
    }

    /// Runs `f` on a cached, loaded table without taking a reference to it (no I/O, no
    /// allocation): the hit path of lookups. `None` if the table is not cached.
    pub fn with_loaded<R>(
        &self,
        offset: HostOffset,
        f: impl FnOnce(&TableState) -> R,
    ) -> Option<R> {
        let idx = self.index.lock();
        let &i = idx.map.get(&offset.0)?;
        let t = &idx.slots[i];
        if !t.loaded.initialized() {
            return None;
        }
        // Load first: a store on every hit would pull the line exclusive on every core.
        if !t.referenced.load(Relaxed) {
            t.referenced.store(true, Relaxed);
        }
        self.stats.hits.incr();
        // Lock order: index, then table state (as the evictor does).
        let st = t.state.lock();
        Some(f(&st))
    }

    /// Like [`with_loaded`](Self::with_loaded), but served from this thread's copy of the table
    /// when it has a current one, and making one when the metadata has settled (`l2view`).
    pub fn with_loaded_or_copy<R>(&self, offset: HostOffset, f: impl Fn(&[u8]) -> R) -> Option<R> {
        let id = self as *const MetaCache as usize;
        let now = super::l2view::epoch();
        if let Some(r) = super::l2view::with_copy(id, offset.0, now, &f) {
            return Some(r);
        }
        let settled = super::l2view::settled(now);
        self.with_loaded(offset, |st| {
            if settled {
                super::l2view::keep(id, offset.0, now, st.data());
            }
            f(st.data())
        })
    }

    /// Installs a table whose on-disk content is already `data` (a freshly written table).
    /// Replaces any stale entry for the same offset.
    pub async fn insert_written(
        &self,
        w: &Writer,
        offset: HostOffset,
        data: Box<[u8]>,
    ) -> Result<Arc<Table>> {
        self.discard(offset);
        self.lookup_or_insert(w, offset, Some(data)).await
    }

    /// Looks up only (no load, no insert): the table if cached.
    pub fn peek(&self, offset: HostOffset) -> Option<Arc<Table>> {
        let idx = self.index.lock();
        idx.map.get(&offset.0).map(|&i| idx.slots[i].clone())
    }

    async fn lookup_or_insert(
        &self,
        w: &Writer,
        offset: HostOffset,
        data: Option<Box<[u8]>>,
    ) -> Result<Arc<Table>> {
        let (t, dirty) = {
            let mut idx = self.index.lock();
            if let Some(&i) = idx.map.get(&offset.0) {
                let t = idx.slots[i].clone();
                t.referenced.store(true, Relaxed);
                self.stats.hits.incr();
                return Ok(t);
            }
            self.stats.misses.incr();
            let mut dirty = Vec::new();
            while idx.slots.len() >= self.capacity && idx.evict_one(&mut dirty) {
                self.stats.evictions.incr();
            }
            let initialized = data.is_some();
            let mut t = Table::new(
                offset,
                data.unwrap_or_else(|| vec![0u8; self.entry_size].into_boxed_slice()),
            );
            t.write_event = if self.what == L2_TABLE {
                DebugEvent::L2Update
            } else {
                DebugEvent::RefblockUpdatePart
            };
            let t = Arc::new(t);
            if initialized {
                let _ = t.loaded.set(());
            }
            super::l2view::bump();
            let i = idx.slots.len();
            idx.slots.push(t.clone());
            idx.map.insert(offset.0, i);
            let over = idx.slots.len() > self.capacity;
            (t, if over { dirty } else { Vec::new() })
        };
        if !dirty.is_empty() {
            // Only dirty tables could have been evicted: write a batch back (their dependencies
            // share one sync) so they can go next time.
            try_join_all(dirty.iter().map(|d| w.write_back(d))).await?;
            drop(dirty);
            let mut idx = self.index.lock();
            let mut none = Vec::new();
            while idx.slots.len() > self.capacity && idx.evict_one(&mut none) {
                self.stats.evictions.incr();
            }
        }
        Ok(t)
    }

    /// Forgets the table at `offset` (its cluster was freed): it will never be written back.
    pub fn discard(&self, offset: HostOffset) {
        let mut idx = self.index.lock();
        if let Some(&i) = idx.map.get(&offset.0) {
            let t = idx.remove_slot(i);
            t.discarded.store(true, Relaxed);
        }
    }

    /// All dirty tables.
    pub fn dirty_tables(&self) -> Vec<Arc<Table>> {
        let idx = self.index.lock();
        idx.slots.iter().filter(|t| t.is_dirty()).cloned().collect()
    }

    /// Writes back every dirty table (concurrently; dependencies share syncs).
    pub async fn write_back_all(&self, w: &Writer) -> Result<()> {
        let dirty = self.dirty_tables();
        try_join_all(dirty.iter().map(|t| w.write_back(t))).await?;
        Ok(())
    }

    /// Drops clean tables not used since the previous call (`cache-clean-interval`).
    pub fn clean_unused(&self) {
        let mut idx = self.index.lock();
        let mut i = 0;
        while i < idx.slots.len() {
            let t = &idx.slots[i];
            let idle = Arc::strong_count(t) == 1 && !t.referenced.swap(false, Relaxed);
            if idle && !t.is_dirty() {
                idx.remove_slot(i);
            } else {
                i += 1;
            }
        }
    }

    /// Drops every clean, unpinned table (used after metadata was rewritten underneath).
    pub fn clear_clean(&self) {
        let mut idx = self.index.lock();
        let mut i = 0;
        while i < idx.slots.len() {
            let t = &idx.slots[i];
            if Arc::strong_count(t) == 1 && !t.is_dirty() {
                idx.remove_slot(i);
            } else {
                i += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::counting::CountingStorage;
    use crate::storage::crash::{CrashPolicy, CrashStorage};
    use crate::storage::memory::MemoryStorage;

    fn writer(s: StorageRef) -> Writer {
        Writer {
            barrier: Arc::new(Barrier::new(s.clone())),
            storage: s,
            writethrough: false,
            writes: AtomicU64::new(0),
            overlap: MetadataMap::new(super::super::overlap::OverlapCheck::CACHED, 16),
        }
    }

    #[tokio::test]
    async fn repeated_dependencies_merge_and_still_order_writes() {
        let mem = MemoryStorage::new();
        let crash = Arc::new(CrashStorage::new(&mem));
        let w = writer(crash.clone());
        let rc = MetaCache::new("refcount block", 512, 4);
        let l2 = MetaCache::new("L2 table", 512, 4);
        let a = rc.get(&w, HostOffset(512)).await.unwrap();
        let b = rc.get(&w, HostOffset(1024)).await.unwrap();
        let table = l2.get(&w, HostOffset(2048)).await.unwrap();
        for i in 0..1024u64 {
            let block = if i % 2 == 0 { &a } else { &b };
            block.lock().modify([])[(i / 2 % 512) as usize] = 1;
            let deps = [block.dep_current(), Dep::Sync(w.barrier.generation())];
            put_u64(table.lock().modify(deps), (i % 64) as usize, i + 1);
        }
        // One entry per table and one sync, not one per modification.
        assert_eq!(table.lock().deps.len(), 3);
        w.write_back(&table).await.unwrap();
        // Both blocks at their latest versions were synced before the L2 table was written.
        let img = crash.crash_now(CrashPolicy::KeepNone).to_vec();
        assert!(img[512..1024].iter().all(|&x| x == 1));
        assert!(img[1024..1536].iter().all(|&x| x == 1));
        assert!(!a.is_dirty() && !b.is_dirty() && !table.is_dirty());
    }

    #[tokio::test]
    async fn dependent_table_is_written_and_synced_first() {
        let mem = MemoryStorage::new();
        let crash = Arc::new(CrashStorage::new(&mem));
        let w = writer(crash.clone());
        let rc = MetaCache::new("refcount block", 512, 4);
        let l2 = MetaCache::new("L2 table", 512, 4);
        let block = rc.get(&w, HostOffset(512)).await.unwrap();
        let table = l2.get(&w, HostOffset(1024)).await.unwrap();
        block.lock().modify([])[0] = 1;
        let dep = block.dep_current();
        put_u64(table.lock().modify([dep]), 0, 0xabcd);
        w.write_back(&table).await.unwrap();
        // Losing every unflushed write now must keep the refcount block: it was synced before
        // the L2 table was written.
        let img = crash.crash_now(CrashPolicy::KeepNone).to_vec();
        assert_eq!(img[512], 1);
        assert!(!block.is_dirty());
        assert!(!table.is_dirty());
    }

    #[tokio::test]
    async fn eviction_keeps_pinned_and_writes_back_dirty() {
        let s: StorageRef = Arc::new(CountingStorage::new(MemoryStorage::new()));
        let w = writer(s.clone());
        let c = MetaCache::new("L2 table", 512, 2);
        let pinned = c.get(&w, HostOffset(0)).await.unwrap();
        let t1 = c.get(&w, HostOffset(512)).await.unwrap();
        t1.lock().modify([])[0] = 7;
        drop(t1);
        for i in 2..10u64 {
            let t = c.get(&w, HostOffset(i * 512)).await.unwrap();
            drop(t);
        }
        assert!(c.len() <= 3, "cache grew to {}", c.len());
        assert!(c.peek(HostOffset(0)).is_some(), "pinned table evicted");
        let mut b = [0u8; 1];
        let data = s.read_at(IoBufMut::zeroed(1), 512).await.unwrap();
        b.copy_from_slice(&data);
        assert_eq!(b[0], 7, "dirty table written back before eviction");
        drop(pinned);
    }

    #[tokio::test]
    async fn concurrent_misses_share_one_load() {
        let s = Arc::new(CountingStorage::new(MemoryStorage::new()));
        let counters = s.counters();
        let w = writer(s);
        let c = MetaCache::new("L2 table", 512, 8);
        let futs = (0..10).map(|_| c.get(&w, HostOffset(4096)));
        let tables = futures_util::future::try_join_all(futs).await.unwrap();
        assert!(tables.iter().all(|t| Arc::ptr_eq(t, &tables[0])));
        assert_eq!(counters.snapshot().reads, 1);
    }

    #[tokio::test]
    async fn discarded_table_is_never_written() {
        let s = Arc::new(CountingStorage::new(MemoryStorage::new()));
        let counters = s.counters();
        let w = writer(s);
        let c = MetaCache::new("L2 table", 512, 8);
        let t = c.get(&w, HostOffset(4096)).await.unwrap();
        t.lock().modify([])[0] = 1;
        c.discard(HostOffset(4096));
        w.write_back(&t).await.unwrap();
        c.write_back_all(&w).await.unwrap();
        assert_eq!(counters.snapshot().writes, 0);
    }
}
