//! Refcounts and the cluster allocator.
//!
//! Owns the refcount table (in memory, rewritten whole when it grows), the refcount block cache,
//! and the rules for handing out host clusters:
//!
//! - Allocation sets refcounts in cached blocks and returns [`Dep`]s on those blocks: whoever
//!   links the clusters into an L2/L1 table records them, so the refcounts reach the disk (and a
//!   sync) before the pointer does. Nothing is written or synced per allocation.
//! - A multi-cluster request gets one contiguous extent.
//! - Frees are deferred ([`Refcounts::defer_free`]): a refcount is only decreased once the table
//!   that dropped the reference is durable and no request that looked up the old mapping is still
//!   running. So a cluster is never reused while an on-disk table, or an in-flight read, still
//!   points to it, and refcount blocks never depend on L2 tables (no dependency cycles).
//! - New refcount blocks and a grown refcount table are written and synced before anything
//!   points to them; these are rare events (one block covers 2 GiB at the default geometry).
//!
//! Clusters at or past `high_water` have never been used since the image was opened and lie past
//! the end of the file as it was then: they read as zeros, so a partial write into such a cluster
//! needs no zeroing of the rest.

use super::cache::{Dep, MetaCache, Table, Writer};
use super::header_store::HeaderStore;
use super::inflight::IoEpochs;
use super::overlap::Fixed;
use crate::buf::IoBuf;
use crate::error::{Error, IoContext, Result};
use crate::format::be;
use crate::format::header::{MAX_HOST_OFFSET, MAX_REFTABLE_BYTES};
use crate::format::RefcountWidth;
use crate::units::{Geometry, HostCluster, HostOffset};
use parking_lot::{Mutex, RwLock};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

/// The corruption an allocation meets when the refcounts call the header's cluster free (QEMU
/// allocates it and then refuses the write; callers that know what they allocate say so in
/// QEMU's words).
pub const HEADER_CLUSTER_FREE: &str = "Preventing invalid allocation at offset 0";

/// Reserved bits of a refcount table entry.
pub(crate) const REFTABLE_RESERVED: u64 = 0x1ff;

/// Queued frees that ask for a flush of their own, without waiting for the guest's: a guest that
/// discards (or overwrites compressed or shared clusters) and never flushes would otherwise grow
/// the file without bound. Whichever comes first: this many bytes, this many queued frees, or a
/// free this old when the next one is queued.
const FREE_SOON_BYTES: u64 = 32 << 20;
const FREE_SOON_COUNT: usize = 4096;
const FREE_SOON_AGE: std::time::Duration = std::time::Duration::from_secs(5);
/// Queued frees past which requests stop allocating until a flush has applied them (the
/// background flush may lag behind a fast writer on a slow disk): the file stays bounded
/// whatever the timing.
const FREE_HARD_BYTES: u64 = 2 * FREE_SOON_BYTES;
const FREE_HARD_COUNT: usize = 2 * FREE_SOON_COUNT;

/// The refcount table as held in memory.
#[derive(Clone, Debug)]
pub struct RefTable {
    pub offset: HostOffset,
    pub clusters: u32,
    pub entries: Vec<u64>,
}

/// A contiguous run of freshly allocated host clusters.
#[must_use = "an allocation must be linked into a table or freed"]
pub struct Allocation {
    pub start: HostCluster,
    pub count: u64,
    /// Refcount blocks that must be durable before anything points to these clusters.
    pub deps: Vec<Dep>,
    /// The clusters were never used since open and lie past the old end of file: they read as
    /// zeros without being written.
    pub fresh: bool,
}

/// A refcount decrease waiting for its precondition.
struct PendingFree {
    offset: HostOffset,
    len: u64,
    /// The table write that removed the reference; `None` if already durable.
    after: Option<Dep>,
    /// Pass the freed space down to the file (hole punch) when it reaches refcount 0.
    discard: bool,
}

#[derive(Default)]
struct FreeQueue {
    pending: Vec<PendingFree>,
    bytes: u64,
    /// When the oldest queued free was queued.
    since: Option<std::time::Instant>,
}

struct AllocState {
    /// No free cluster lies below this one.
    free_hint: u64,
    /// Clusters from here on were never used since open (see module docs).
    high_water: u64,
    /// Where the next compressed cluster can be packed: a byte offset inside a host cluster
    /// already holding compressed data (QEMU's `free_byte_offset`).
    byte_tail: Option<u64>,
}

pub struct Refcounts {
    geo: Geometry,
    pub width: RefcountWidth,
    entries_per_block: u64,
    table: RwLock<RefTable>,
    pub cache: MetaCache,
    alloc: tokio::sync::Mutex<AllocState>,
    frees: Mutex<FreeQueue>,
    /// The queue is past the hard limit (mirrors `frees`, read on the request path).
    frees_overdue: AtomicBool,
    /// Signalled when queued frees should be applied without waiting for a guest flush (see
    /// `FREE_SOON_*`); the image's free scheduler task waits on it and flushes.
    pub free_wanted: Arc<tokio::sync::Notify>,
    /// Lazy refcounts are active (dirty bit set): pointers need not wait for refcounts.
    pub lazy: AtomicBool,
    /// Clusters allocated (statistics).
    pub allocated: AtomicU64,
}

impl Refcounts {
    pub fn new(
        geo: Geometry,
        width: RefcountWidth,
        table: RefTable,
        cache: MetaCache,
        file_len: u64,
    ) -> Self {
        Refcounts {
            geo,
            width,
            entries_per_block: width.entries_per_block(geo.cluster_bits),
            table: RwLock::new(table),
            cache,
            alloc: tokio::sync::Mutex::new(AllocState {
                free_hint: 0,
                high_water: geo.clusters_for(file_len),
                byte_tail: None,
            }),
            frees: Mutex::new(FreeQueue::default()),
            frees_overdue: AtomicBool::new(false),
            free_wanted: Arc::new(tokio::sync::Notify::new()),
            lazy: AtomicBool::new(false),
            allocated: AtomicU64::new(0),
        }
    }

    pub fn entries_per_block(&self) -> u64 {
        self.entries_per_block
    }

    pub fn table(&self) -> RefTable {
        self.table.read().clone()
    }

    /// Offset of the refcount block covering cluster `c`, if allocated. Errors if the table entry
    /// is malformed.
    pub fn block_offset(&self, block_index: u64) -> Result<Option<HostOffset>> {
        let t = self.table.read();
        let Some(&e) = t.entries.get(block_index as usize) else {
            return Ok(None);
        };
        let off = e & !REFTABLE_RESERVED;
        if off == 0 {
            return Ok(None);
        }
        if !self.geo.is_aligned(off) || e & REFTABLE_RESERVED != 0 {
            return Err(Error::corrupt(format!(
                "Refblock offset {off:#x} unaligned (reftable index: {block_index:#x})"
            )));
        }
        Ok(Some(HostOffset(off)))
    }

    async fn block(&self, w: &Writer, block_index: u64) -> Result<Option<Arc<Table>>> {
        match self.block_offset(block_index)? {
            None => Ok(None),
            Some(off) => Ok(Some(self.cache.get(w, off).await?)),
        }
    }

    /// The refcount of host cluster `c`.
    pub async fn get(&self, w: &Writer, c: HostCluster) -> Result<u64> {
        let bi = c.0 / self.entries_per_block;
        match self.block(w, bi).await? {
            None => Ok(0),
            Some(t) => Ok(self
                .width
                .get(t.lock().data(), (c.0 % self.entries_per_block) as usize)),
        }
    }

    /// Allocates `count` contiguous clusters with refcount 1.
    pub async fn allocate(&self, w: &Writer, hdr: &HeaderStore, count: u64) -> Result<Allocation> {
        let mut st = self.alloc.lock().await;
        self.allocate_locked(w, hdr, &mut st, count).await
    }

    /// Allocates `len` bytes for a compressed cluster, packed after the previous one (possibly
    /// running into the next host cluster), as QEMU packs them. Every host cluster the bytes
    /// touch gains one reference. Returns the byte offset and the refcount dependencies.
    pub async fn allocate_bytes(
        &self,
        w: &Writer,
        hdr: &HeaderStore,
        len: u64,
    ) -> Result<(HostOffset, Vec<Dep>)> {
        let cs = self.geo.cluster_size();
        let mut st = self.alloc.lock().await;
        if let Some(tail) = st.byte_tail {
            let c = tail / cs;
            let room = cs - tail % cs;
            let extra = if len <= room {
                0
            } else {
                (len - room).div_ceil(cs)
            };
            let tail_ok = self.get(w, HostCluster(c)).await? < self.width.max();
            let mut next_free = tail_ok;
            if tail_ok && extra > 0 {
                for n in c + 1..=c + extra {
                    if self.get(w, HostCluster(n)).await? != 0 {
                        next_free = false;
                        break;
                    }
                }
                // Clusters without a refcount block: take the general path, which creates it.
                next_free = next_free && self.missing_blocks(c + 1, extra)?.is_empty();
            }
            if next_free {
                self.add(w, HostCluster(c), 1).await?;
                let mut deps = Vec::new();
                if let Some(t) = self.block(w, c / self.entries_per_block).await? {
                    deps.push(t.dep_current());
                }
                if extra > 0 {
                    deps.extend(self.set_range(w, c + 1, extra, 1).await?);
                    st.high_water = st.high_water.max(c + 1 + extra);
                    self.allocated.fetch_add(extra, Relaxed);
                }
                let end = tail + len;
                st.byte_tail = (end % cs != 0).then_some(end);
                let deps = if self.lazy.load(Relaxed) {
                    Vec::new()
                } else {
                    deps
                };
                return Ok((HostOffset(tail), deps));
            }
        }
        let a = self
            .allocate_locked(w, hdr, &mut st, len.div_ceil(cs))
            .await?;
        let start = a.start.0 * cs;
        let end = start + len;
        st.byte_tail = (end % cs != 0).then_some(end);
        Ok((HostOffset(start), a.deps))
    }

    async fn allocate_locked(
        &self,
        w: &Writer,
        hdr: &HeaderStore,
        st: &mut AllocState,
        count: u64,
    ) -> Result<Allocation> {
        debug_assert!(count > 0);
        // Clusters wanted right after the run for the refcount blocks it needs.
        let mut room = 0;
        let start = loop {
            let start = self.find_free_run(w, st, count + room).await?;
            let needed = self.blocks_to_create(start, count)?;
            let Some(&last) = needed.last() else {
                break start;
            };
            if last >= self.table.read().entries.len() as u64 {
                self.grow_table(w, hdr, st, last + 1).await?;
                room = 0;
            } else if needed.len() as u64 > room {
                // Search again for a run with space for the blocks behind it.
                room = needed.len() as u64;
            } else {
                let at = start + count;
                self.create_blocks(w, &needed, at).await?;
                st.high_water = st.high_water.max(at + needed.len() as u64);
                room = 0;
            }
        };
        let deps = self.set_range(w, start, count, 1).await?;
        let fresh = start >= st.high_water;
        st.high_water = st.high_water.max(start + count);
        st.free_hint = start + count;
        self.allocated.fetch_add(count, Relaxed);
        Ok(Allocation {
            start: HostCluster(start),
            count,
            deps: if self.lazy.load(Relaxed) {
                Vec::new()
            } else {
                deps
            },
            fresh,
        })
    }

    /// Frees an allocation that was never linked anywhere (a failed request). The refcounts go
    /// back to 0 in the cache; nothing on disk points to the clusters.
    pub async fn release_unlinked(&self, w: &Writer, a: Allocation) -> Result<()> {
        let mut st = self.alloc.lock().await;
        for c in a.start.0..a.start.0 + a.count {
            self.add(w, HostCluster(c), -1).await?;
        }
        st.free_hint = st.free_hint.min(a.start.0);
        Ok(())
    }

    /// Undoes [`Refcounts::allocate_bytes`] for bytes that were never linked (a failed write).
    pub async fn release_bytes(&self, w: &Writer, offset: HostOffset, len: u64) -> Result<()> {
        let mut st = self.alloc.lock().await;
        let first = self.geo.host_cluster(offset).0;
        let last = (offset.0 + len.max(1) - 1) >> self.geo.cluster_bits;
        for c in first..=last {
            if self.add(w, HostCluster(c), -1).await? == 0 {
                st.free_hint = st.free_hint.min(c);
                if st
                    .byte_tail
                    .is_some_and(|t| t >> self.geo.cluster_bits == c)
                {
                    st.byte_tail = None;
                }
            }
        }
        Ok(())
    }

    /// Finds `count` consecutive clusters with refcount 0 at or after the hint. The header's
    /// cluster is never one of them: if the refcounts say it is free, the image is corrupt
    /// ([`HEADER_CLUSTER_FREE`]).
    async fn find_free_run(&self, w: &Writer, st: &AllocState, count: u64) -> Result<u64> {
        let epb = self.entries_per_block;
        // Cluster 0 is the header: it is looked at like any other, so that damaged refcounts
        // that call it free are noticed (below) rather than skipped.
        let mut start = st.free_hint;
        let mut c = start;
        while c < start + count {
            if (c + count) << self.geo.cluster_bits > MAX_HOST_OFFSET {
                return Err(Error::NoSpace(
                    "host offsets would exceed the 64 PB limit of the format".into(),
                ));
            }
            let bi = c / epb;
            match self.block(w, bi).await? {
                None => {
                    // No block: the whole range it would cover is free.
                    c = (bi + 1) * epb;
                }
                Some(t) => {
                    let g = t.lock();
                    let data = g.data();
                    let block_end = (bi + 1) * epb;
                    while c < block_end && c < start + count {
                        if self.width.get(data, (c % epb) as usize) != 0 {
                            start = c + 1;
                        }
                        c += 1;
                    }
                }
            }
        }
        if start == 0 {
            // Never handed out: QEMU would allocate it and catch the write afterwards.
            return Err(Error::Corrupt(HEADER_CLUSTER_FREE.into()));
        }
        Ok(start)
    }

    /// Refcount table indexes of the blocks that would cover `[start, start+count)` but do not
    /// exist (including indexes past the end of the table).
    fn missing_blocks(&self, start: u64, count: u64) -> Result<Vec<u64>> {
        let epb = self.entries_per_block;
        let mut missing = Vec::new();
        for bi in start / epb..=(start + count - 1) / epb {
            if self.block_offset(bi)?.is_none() {
                missing.push(bi);
            }
        }
        Ok(missing)
    }

    /// The blocks to create so that a run of `count` clusters at `start` is covered, together
    /// with the new blocks themselves placed right after the run: the fixed point of "k blocks
    /// after the run fall under these missing blocks". Empty if the run is covered already.
    ///
    /// The blocks go after the run, never inside it: a run at least as long as a block's range
    /// has no cluster of its own outside the run, and placing blocks inside the run would push
    /// the run past the block it just made, which then needs another block, without end.
    fn blocks_to_create(&self, start: u64, count: u64) -> Result<Vec<u64>> {
        let mut k = 0u64;
        loop {
            let needed = self.missing_blocks(start, count + k)?;
            if needed.len() as u64 <= k {
                return Ok(needed);
            }
            k = needed.len() as u64;
        }
    }

    /// Writes new refcount blocks for table indexes `needed` at clusters `at`, `at + 1`, ...
    /// (free clusters), counts each block's own cluster (in a new block or an existing one),
    /// makes all of it durable, and only then writes the table entries that point to them.
    async fn create_blocks(&self, w: &Writer, needed: &[u64], at: u64) -> Result<()> {
        let cs = self.geo.cluster_size() as usize;
        let epb = self.entries_per_block;
        let mut blocks: Vec<(u64, HostOffset, Box<[u8]>)> = needed
            .iter()
            .enumerate()
            .map(|(i, &bi)| {
                let off = self.geo.host_offset(HostCluster(at + i as u64));
                (bi, off, vec![0u8; cs].into_boxed_slice())
            })
            .collect();
        let mut touched = Vec::new();
        for c in at..at + needed.len() as u64 {
            let i = (c % epb) as usize;
            if let Some(b) = blocks.iter_mut().find(|b| b.0 == c / epb) {
                self.width.set(&mut b.2, i, 1)?;
                continue;
            }
            let t = self.block(w, c / epb).await?.ok_or_else(|| {
                Error::corrupt(format!(
                    "no refcount block counts new block at cluster {c:#x}"
                ))
            })?;
            {
                let mut g = t.lock();
                if self.width.get(g.data(), i) != 0 {
                    return Err(Error::corrupt(format!(
                        "new refcount block placed on host cluster {c:#x}, which is in use"
                    )));
                }
                self.width.set(g.modify([]), i, 1)?;
            }
            touched.push(t);
        }
        for (_, off, data) in &blocks {
            w.overlap.mark_table(
                self.geo.host_cluster(*off).0,
                super::overlap::TableKind::RefcountBlock,
            );
            w.storage
                .write_at(IoBuf::copy_from(data), off.0)
                .await
                .context(|| format!("writing new refcount block at {off}"))?;
        }
        for t in &touched {
            w.write_back(t).await?;
        }
        w.barrier.sync_now().await?;
        // The table entries go to disk only after the blocks they point to.
        let table_off = self.table.read().offset;
        for (bi, off, _) in &blocks {
            let mut entry = [0u8; 8];
            be::put_u64(&mut entry, 0, off.0);
            w.check_metadata_write(table_off.0 + bi * 8, 8, Some(Fixed::RefcountTable))?;
            w.storage
                .write_at(IoBuf::copy_from(&entry), table_off.0 + bi * 8)
                .await
                .context(|| "writing refcount table entry".to_string())?;
        }
        w.barrier.sync_now().await?;
        for (bi, off, data) in blocks.drain(..) {
            self.cache.insert_written(w, off, data).await?;
            self.table.write().entries[bi as usize] = off.0;
        }
        Ok(())
    }

    /// Replaces the refcount table by a larger one holding at least `min_entries`, placed past
    /// every used cluster together with the new blocks needed to count it.
    async fn grow_table(
        &self,
        w: &Writer,
        hdr: &HeaderStore,
        st: &mut AllocState,
        min_entries: u64,
    ) -> Result<()> {
        let cs = self.geo.cluster_size();
        let epb = self.entries_per_block;
        let old = self.table();
        let mut entries_wanted = min_entries.max(old.entries.len() as u64 * 2);
        let region = st.high_water.max(1);
        let (new_clusters, new_blocks) = loop {
            let clusters = (entries_wanted * 8).div_ceil(cs);
            let mut blocks = Vec::new();
            loop {
                let end = region + blocks.len() as u64 + clusters;
                let needed: Vec<u64> = (region / epb..=(end - 1) / epb)
                    .filter(|&bi| old.entries.get(bi as usize).is_none_or(|&e| e == 0))
                    .collect();
                if needed.len() == blocks.len() {
                    break;
                }
                blocks = needed;
            }
            let max_index = blocks.last().copied().unwrap_or(0);
            if max_index < clusters * cs / 8 {
                break (clusters, blocks);
            }
            entries_wanted = max_index + 1;
        };
        if new_clusters * cs > MAX_REFTABLE_BYTES.max(cs) {
            return Err(Error::NoSpace(
                "the refcount table would exceed its 8 MiB limit".into(),
            ));
        }
        let table_start = region + new_blocks.len() as u64;
        let end = table_start + new_clusters;

        // New blocks, each counting the new clusters in its range.
        let mut entries = old.entries.clone();
        entries.resize((new_clusters * cs / 8) as usize, 0);
        for (i, &bi) in new_blocks.iter().enumerate() {
            let at = region + i as u64;
            let mut data = vec![0u8; cs as usize];
            for c in region.max(bi * epb)..end.min((bi + 1) * epb) {
                self.width.set(&mut data, (c % epb) as usize, 1)?;
            }
            let off = self.geo.host_offset(HostCluster(at));
            w.overlap
                .mark_table(at, super::overlap::TableKind::RefcountBlock);
            w.storage
                .write_at(IoBuf::copy_from(&data), off.0)
                .await
                .context(|| format!("writing new refcount block at {off}"))?;
            entries[bi as usize] = off.0;
            self.cache.discard(off);
        }
        // Clusters of the new region that fall under existing blocks.
        let mut touched = Vec::new();
        for c in region..end {
            let bi = c / epb;
            if !new_blocks.contains(&bi) {
                let t = self.block(w, bi).await?.ok_or_else(|| {
                    Error::corrupt("refcount block vanished while growing the table")
                })?;
                {
                    let mut g = t.lock();
                    let data = g.modify([]);
                    self.width.set(data, (c % epb) as usize, 1)?;
                }
                touched.push(t);
            }
        }
        for t in &touched {
            w.write_back(t).await?;
        }
        let mut table_bytes = vec![0u8; (new_clusters * cs) as usize];
        be::encode_u64_table(&entries, &mut table_bytes);
        let table_off = self.geo.host_offset(HostCluster(table_start));
        w.storage
            .write_at(IoBuf::copy_from(&table_bytes), table_off.0)
            .await
            .context(|| "writing the new refcount table".to_string())?;
        w.barrier.sync_now().await?;
        hdr.update(w, |h| {
            h.refcount_table_offset = table_off;
            h.refcount_table_clusters = new_clusters as u32;
        })
        .await?;
        w.barrier.sync_now().await?;
        *self.table.write() = RefTable {
            offset: table_off,
            clusters: new_clusters as u32,
            entries,
        };
        w.overlap
            .set_fixed(Fixed::RefcountTable, table_off.0, new_clusters * cs);
        st.high_water = st.high_water.max(end);
        // The old table is unreferenced now that the header is durable.
        for c in 0..u64::from(old.clusters) {
            let oc = self.geo.host_cluster(old.offset).0 + c;
            self.add(w, HostCluster(oc), -1).await?;
            st.free_hint = st.free_hint.min(oc);
        }
        tracing::debug!(
            "refcount table grown to {} clusters at {}",
            new_clusters,
            table_off
        );
        Ok(())
    }

    /// Sets the refcount of `[start, start+count)` (all currently 0) to `value`; returns the
    /// dependencies on the modified blocks.
    async fn set_range(&self, w: &Writer, start: u64, count: u64, value: u64) -> Result<Vec<Dep>> {
        let epb = self.entries_per_block;
        let mut deps = Vec::new();
        let mut c = start;
        while c < start + count {
            let bi = c / epb;
            let t = self
                .block(w, bi)
                .await?
                .ok_or_else(|| Error::corrupt("allocating in a range without refcount block"))?;
            let end = ((bi + 1) * epb).min(start + count);
            {
                let mut g = t.lock();
                let data = g.modify([]);
                for x in c..end {
                    let i = (x % epb) as usize;
                    if self.width.get(data, i) != 0 {
                        return Err(Error::corrupt(format!(
                            "allocator picked host cluster {x:#x}, which is in use"
                        )));
                    }
                    self.width.set(data, i, value)?;
                }
            }
            deps.push(t.dep_current());
            c = end;
        }
        Ok(deps)
    }

    /// Adds `delta` to the refcount of cluster `c` in the cache. Returns the new refcount.
    pub(crate) async fn add(&self, w: &Writer, c: HostCluster, delta: i64) -> Result<u64> {
        let epb = self.entries_per_block;
        let t = self.block(w, c.0 / epb).await?.ok_or_else(|| {
            Error::corrupt(format!(
                "refcount of host cluster {:#x} changed but it has no refcount block",
                c.0
            ))
        })?;
        let mut g = t.lock();
        let i = (c.0 % epb) as usize;
        let old = self.width.get(g.data(), i);
        let new = old.checked_add_signed(delta).ok_or_else(|| {
            Error::corrupt(format!(
                "refcount of host cluster {:#x} would drop below zero",
                c.0
            ))
        })?;
        let data = g.modify([]);
        self.width.set(data, i, new)?;
        if new == 0 {
            // A free cluster holds no metadata (see `overlap`).
            w.overlap.unmark(c.0);
        }
        Ok(new)
    }

    /// Adds `delta` to the refcounts of the `count` clusters from `start`, taking each refcount
    /// block's lock once (whole-tree updates of snapshots touch millions of clusters, mostly in
    /// long runs). A block's part of the run is changed all or nothing: on an overflow or a
    /// refcount that would drop below zero, the error comes before that part changes, and the
    /// parts already changed stay changed (`done` tells how many clusters, for the caller to
    /// undo). Clusters whose refcount drops to zero become allocatable and are appended to
    /// `freed` as `(first, count)` runs.
    pub(crate) async fn add_run(
        &self,
        w: &Writer,
        start: HostCluster,
        count: u64,
        delta: i64,
        done: &mut u64,
        freed: &mut Vec<(u64, u64)>,
    ) -> Result<()> {
        let epb = self.entries_per_block;
        let end = start.0 + count;
        let mut c = start.0;
        let mut st = self.alloc.lock().await;
        while c < end {
            let bi = c / epb;
            let t = self.block(w, bi).await?.ok_or_else(|| {
                Error::corrupt(format!(
                    "refcount of host cluster {c:#x} changed but it has no refcount block"
                ))
            })?;
            let seg_end = ((bi + 1) * epb).min(end);
            {
                let mut g = t.lock();
                let max = self.width.max();
                for x in c..seg_end {
                    let old = self.width.get(g.data(), (x % epb) as usize);
                    match old.checked_add_signed(delta) {
                        Some(n) if n <= max => {}
                        Some(_) => {
                            return Err(Error::arg(format!(
                                "the refcount of host cluster {x:#x} would exceed {max}, the \
                                 largest {}-bit refcount",
                                self.width.bits()
                            )))
                        }
                        None => {
                            return Err(Error::corrupt(format!(
                                "refcount of host cluster {x:#x} would drop below zero"
                            )))
                        }
                    }
                }
                let data = g.modify([]);
                for x in c..seg_end {
                    let i = (x % epb) as usize;
                    let new = self.width.get(data, i).wrapping_add_signed(delta);
                    self.width.set(data, i, new)?;
                    if new == 0 {
                        w.overlap.unmark(x);
                        match freed.last_mut() {
                            Some((s, n)) if *s + *n == x => *n += 1,
                            _ => freed.push((x, 1)),
                        }
                        st.free_hint = st.free_hint.min(x);
                        if st
                            .byte_tail
                            .is_some_and(|b| b >> self.geo.cluster_bits == x)
                        {
                            st.byte_tail = None;
                        }
                    }
                }
            }
            *done += seg_end - c;
            c = seg_end;
        }
        Ok(())
    }

    /// Appends the refcounts of the `count` clusters from `start` to `out` (one block lock per
    /// block; clusters without a refcount block count 0).
    pub(crate) async fn get_run(
        &self,
        w: &Writer,
        start: HostCluster,
        count: u64,
        out: &mut Vec<u64>,
    ) -> Result<()> {
        let epb = self.entries_per_block;
        let end = start.0 + count;
        let mut c = start.0;
        while c < end {
            let bi = c / epb;
            let seg_end = ((bi + 1) * epb).min(end);
            match self.block(w, bi).await? {
                Some(t) => {
                    let g = t.lock();
                    out.extend((c..seg_end).map(|x| self.width.get(g.data(), (x % epb) as usize)));
                }
                None => out.extend((c..seg_end).map(|_| 0)),
            }
            c = seg_end;
        }
        Ok(())
    }

    /// Increases the refcount of an already used cluster (for sharing). Returns the dependency
    /// to record in the table that gains the reference.
    pub async fn increment(&self, w: &Writer, c: HostCluster) -> Result<Option<Dep>> {
        let _st = self.alloc.lock().await;
        self.add(w, c, 1).await?;
        let t = self.block(w, c.0 / self.entries_per_block).await?;
        Ok(t.filter(|_| !self.lazy.load(Relaxed))
            .map(|t| t.dep_current()))
    }

    /// Queues a refcount decrease for every cluster overlapped by `[offset, offset+len)`, to be
    /// applied once `after` is durable (see module docs).
    pub fn defer_free(&self, offset: HostOffset, len: u64, after: Option<Dep>, discard: bool) {
        let soon = {
            let mut q = self.frees.lock();
            q.pending.push(PendingFree {
                offset,
                len,
                after,
                discard,
            });
            q.bytes += len;
            if q.bytes >= FREE_HARD_BYTES || q.pending.len() >= FREE_HARD_COUNT {
                self.frees_overdue.store(true, Relaxed);
            }
            let since = *q.since.get_or_insert_with(std::time::Instant::now);
            q.bytes >= FREE_SOON_BYTES
                || q.pending.len() >= FREE_SOON_COUNT
                || since.elapsed() >= FREE_SOON_AGE
        };
        if soon {
            self.free_wanted.notify_one();
        }
    }

    /// Whether queued frees are past the hard limit: the caller should flush (which applies
    /// them) before allocating more. One relaxed load.
    #[inline]
    pub fn frees_overdue(&self) -> bool {
        self.frees_overdue.load(Relaxed)
    }

    pub fn has_pending_frees(&self) -> bool {
        !self.frees.lock().pending.is_empty()
    }

    /// Applies the queued frees whose precondition is durable. Returns the host clusters whose
    /// refcount dropped to zero (so that the caller can forget cached metadata there).
    pub async fn apply_frees(&self, w: &Writer, epochs: &IoEpochs) -> Result<Vec<HostCluster>> {
        let ready: Vec<PendingFree> = {
            let mut q = self.frees.lock();
            let (ready, wait): (Vec<_>, Vec<_>) = q
                .pending
                .drain(..)
                .partition(|f| f.after.as_ref().is_none_or(|d| d.satisfied(&w.barrier)));
            q.bytes = wait.iter().map(|f| f.len).sum();
            q.since = if wait.is_empty() {
                None
            } else {
                Some(std::time::Instant::now())
            };
            q.pending = wait;
            self.frees_overdue.store(
                q.bytes >= FREE_HARD_BYTES || q.pending.len() >= FREE_HARD_COUNT,
                Relaxed,
            );
            ready
        };
        if ready.is_empty() {
            return Ok(Vec::new());
        }
        // Requests that looked up the old mappings may still be reading or writing there.
        epochs.grace_period().await;
        w.announce(crate::storage::blkdebug::DebugEvent::ClusterFree)
            .await;
        let mut st = self.alloc.lock().await;
        let mut zeroed = Vec::new();
        // Adjacent clusters are discarded in one call (emptying an image frees thousands).
        // Nobody can allocate before the allocator lock is released, after the last one.
        let cs = self.geo.cluster_size();
        let mut punch: Option<(u64, u64)> = None;
        for f in ready {
            let first = self.geo.host_cluster(f.offset).0;
            let last = (f.offset.0 + f.len.max(1) - 1) >> self.geo.cluster_bits;
            for c in first..=last {
                let hc = HostCluster(c);
                if f.discard && self.get(w, hc).await? == 1 {
                    let off = self.geo.host_offset(hc).0;
                    punch = match punch {
                        Some((start, end)) if end == off => Some((start, end + cs)),
                        Some(range) => {
                            discard_range(w, range).await?;
                            Some((off, off + cs))
                        }
                        None => Some((off, off + cs)),
                    };
                }
                if self.add(w, hc, -1).await? == 0 {
                    st.free_hint = st.free_hint.min(c);
                    zeroed.push(hc);
                    if st
                        .byte_tail
                        .is_some_and(|t| t >> self.geo.cluster_bits == c)
                    {
                        st.byte_tail = None; // its cluster is free for anyone now
                    }
                }
            }
        }
        if let Some(range) = punch {
            discard_range(w, range).await?;
        }
        Ok(zeroed)
    }

    /// Removes the refcount blocks that count no cluster but (perhaps) their own from the
    /// refcount table (QEMU's `qcow2_shrink_reftable`, after a shrink freed their range). The
    /// table entries are cleared on disk and synced first; only then does each block's own
    /// cluster lose its reference (in the block that counts it, written by a later flush), so a
    /// crash in between leaks the block at worst. The table keeps its size, as QEMU's does.
    /// Callers flush first (no block is dirty) and hold the flush lock.
    pub async fn drop_unused_blocks(&self, w: &Writer) -> Result<()> {
        let mut st = self.alloc.lock().await;
        let epb = self.entries_per_block;
        let entries = self.table.read().entries.clone();
        let mut dropped = Vec::new();
        for bi in 0..entries.len() as u64 {
            let Some(off) = self.block_offset(bi)? else {
                continue;
            };
            let t = self.cache.get(w, off).await?;
            let own = self.geo.host_cluster(off).0;
            let unused = {
                let g = t.lock();
                if own / epb == bi {
                    // A block inside its own range counts itself: ignore that one entry.
                    let mut copy = g.data().to_vec();
                    self.width.set(&mut copy, (own % epb) as usize, 0)?;
                    copy.iter().all(|&b| b == 0)
                } else {
                    g.data().iter().all(|&b| b == 0)
                }
            };
            if unused {
                dropped.push((bi, off));
            }
        }
        if dropped.is_empty() {
            return Ok(());
        }
        let table_off = self.table.read().offset;
        for &(bi, _) in &dropped {
            let at = table_off.0 + bi * 8;
            w.check_metadata_write(at, 8, Some(Fixed::RefcountTable))?;
            w.storage
                .write_at(IoBuf::copy_from(&[0u8; 8]), at)
                .await
                .context(|| "writing refcount table entry".to_string())?;
        }
        w.barrier.sync_now().await?;
        for &(bi, off) in &dropped {
            self.table.write().entries[bi as usize] = 0;
            // Never written again: the cluster is free from here on.
            self.cache.discard(off);
            let own = self.geo.host_cluster(off);
            if own.0 / epb == bi {
                w.overlap.unmark(own.0);
            } else {
                self.add(w, own, -1).await?;
            }
            st.free_hint = st.free_hint.min(own.0);
            if st
                .byte_tail
                .is_some_and(|t| t >> self.geo.cluster_bits == own.0)
            {
                st.byte_tail = None;
            }
        }
        tracing::debug!("{} unused refcount block(s) dropped", dropped.len());
        Ok(())
    }

    /// Truncates the file after its last cluster in use, when there is free space past it
    /// (QEMU's `qcow2_get_last_cluster` and truncation at the end of a shrink). The allocator
    /// lock is held throughout, so no cluster past the new end can be handed out meanwhile.
    /// Callers flush first, so that every refcount on disk agrees that nothing past the new end
    /// is in use. Returns the new length if the file was truncated.
    pub async fn truncate_unused_tail(&self, w: &Writer) -> Result<Option<u64>> {
        let _st = self.alloc.lock().await;
        let file_len = w
            .storage
            .len()
            .await
            .context(|| "Failed to inquire current file length".to_string())?;
        let clusters = self.geo.clusters_for(file_len);
        let epb = self.entries_per_block;
        let mut last = None;
        let mut c = clusters;
        'scan: while c > 0 {
            let bi = (c - 1) / epb;
            match self.block(w, bi).await? {
                // No block: nothing in its whole range is in use.
                None => c = bi * epb,
                Some(t) => {
                    let g = t.lock();
                    while c > bi * epb {
                        c -= 1;
                        if self.width.get(g.data(), (c % epb) as usize) != 0 {
                            last = Some(c);
                            break 'scan;
                        }
                    }
                }
            }
        }
        let Some(last) = last else {
            return Err(Error::corrupt(
                "There are no references in the refcount table.",
            ));
        };
        let end = (last + 1) << self.geo.cluster_bits;
        if end >= file_len {
            return Ok(None);
        }
        w.storage
            .set_len(end)
            .await
            .context(|| "Failed to truncate the tail of the image".to_string())?;
        Ok(Some(end))
    }

    /// Drops every queued free (after a refcount rebuild made them moot).
    pub fn clear_pending_frees(&self) {
        *self.frees.lock() = FreeQueue::default();
        self.frees_overdue.store(false, Relaxed);
    }

    /// Installs a refcount table rebuilt from scratch (repair): resets the allocator hints.
    pub async fn replace_table(&self, table: RefTable, file_len: u64) {
        let mut st = self.alloc.lock().await;
        *self.table.write() = table;
        self.cache.clear_clean();
        st.free_hint = 0;
        st.byte_tail = None;
        st.high_water = st.high_water.max(self.geo.clusters_for(file_len));
    }
}

/// Punches `[start, end)` of the image file out.
async fn discard_range(w: &Writer, (start, end): (u64, u64)) -> Result<()> {
    w.storage
        .discard(start, end - start)
        .await
        .context(|| format!("discarding host clusters at {start:#x}..{end:#x}"))
}
