//! Reference counting of whole L2 trees, for internal snapshots.
//!
//! A snapshot is a copy of the active L1 table that shares everything below it. qcow2 counts a
//! cluster once per L1 table it is reached from (a data cluster under an L2 table that three L1
//! tables share has refcount 3), which is how QEMU counts and checks it. So taking a snapshot,
//! reverting to one and deleting one each add one to, or take one from, every cluster of a tree;
//! then the COPIED flags of the active tree must say again which clusters have exactly one
//! reference, since only those may be written in place.
//!
//! These passes run on a quiesced image (see `snapshot`): no request runs and everything cached
//! was flushed, so the L2 tables on disk are current. They are read and rewritten directly, a
//! whole table per I/O with several in flight, instead of one cache slice at a time through the
//! L2 cache (which would also evict everything the guest had cached); the cached copies of the
//! tables rewritten are dropped. Refcounts go through the refcount cache, in runs of adjacent
//! clusters (`Refcounts::add_run`): a preallocated terabyte is a handful of runs, not millions of
//! separate updates.
//!
//! # Ordering
//! COPIED on a cluster whose on-disk refcount is above one would let the next write overwrite a
//! cluster a snapshot still reads, so sharing the active tree ([`Qcow2::share_active_tree`])
//! works in batches of tables: the batch's refcount increases are written and synced, and only
//! then are the batch's COPIED flags cleared. Between batches the image is consistent apart from
//! leaks (the extra references belong to a snapshot that no table names yet). Inside a batch, a
//! crash can leave COPIED set on clusters whose refcount is 2 without a second reference: that
//! cannot lose data (nothing else uses those clusters), but QEMU's check reports it, and the
//! format has no way to change a refcount and a flag in one write (QEMU has the same window).
//! Dropping references ([`Qcow2::add_tree_refs`] with -1) leaves the reverse window: refcount 1
//! with COPIED clear until [`Qcow2::fix_copied_flags`] runs, which costs at most a needless copy.

use super::Qcow2;
use crate::buf::{IoBuf, IoBufMut};
use crate::error::{IoContext, Result};
use crate::format::be;
use crate::format::table::{compressed_range, L1Entry, Mapping, COPIED};
use crate::units::{HostCluster, HostOffset};
use futures_util::future::try_join_all;
use futures_util::stream::{self, Stream, StreamExt, TryStreamExt};

/// L2 tables read ahead of the one being processed.
const READ_AHEAD: usize = 8;
/// L2 tables shared per durability step when the active tree is shared: at most this many
/// bytes of them, and at most this many tables (a sync per batch; a terabyte of 64 KiB clusters
/// is 32 batches).
const SHARE_BATCH_BYTES: u64 = 16 << 20;
const SHARE_BATCH_TABLES: u64 = 256;

/// Host clusters whose refcount dropped to zero, as `(first cluster, count)` runs.
pub(crate) type FreedRuns = Vec<(u64, u64)>;

/// An L2 table of an L1 table: its L1 index and where it is.
type TableRef = (u64, HostOffset);

fn push_run(runs: &mut Vec<(u64, u64)>, first: u64, count: u64) {
    match runs.last_mut() {
        Some((s, n)) if *s + *n == first => *n += count,
        _ => runs.push((first, count)),
    }
}

impl Qcow2 {
    /// The L2 tables an L1 table points to, in L1 order.
    pub(crate) fn l2_tables(&self, l1: &[u64]) -> Result<Vec<TableRef>> {
        let mut out = Vec::new();
        for (i, &e) in l1.iter().enumerate() {
            if let Some(off) = L1Entry(e).l2_offset(self.geo, i as u64)? {
                out.push((i as u64, off));
            }
        }
        Ok(out)
    }

    /// Reads whole L2 tables, in order, a few ahead.
    pub(crate) fn read_tables<'a>(
        &'a self,
        tables: &'a [TableRef],
    ) -> impl Stream<Item = Result<(u64, HostOffset, IoBufMut)>> + 'a {
        let cs = self.geo.cluster_size() as usize;
        stream::iter(tables.iter().copied())
            .map(move |(i, off)| async move {
                let buf = self
                    .w
                    .storage
                    .read_at(IoBufMut::for_overwrite(cs), off.0)
                    .await
                    .context(|| format!("reading L2 table at host offset {off}"))?;
                Ok((i, off, buf))
            })
            .buffered(READ_AHEAD)
    }

    /// The host cluster runs one L2 table holds references to, in entry order (adjacent
    /// clusters merged; a compressed cluster counts every host cluster its bytes touch).
    fn referenced_runs(&self, table: &[u8], runs: &mut Vec<(u64, u64)>) -> Result<()> {
        let g = self.geo;
        let es = g.l2_entry_size() as usize;
        for i in 0..table.len() / es {
            match Mapping::decode(be::u64(table, i * es), g)? {
                Mapping::Data { host, .. }
                | Mapping::Zero {
                    prealloc: Some(host),
                    ..
                } => push_run(runs, g.host_cluster(host).0, 1),
                Mapping::Compressed { host, sectors } => {
                    let (start, len) = compressed_range(host, sectors);
                    let first = start.0 >> g.cluster_bits;
                    let last = (start.0 + len - 1) >> g.cluster_bits;
                    push_run(runs, first, last - first + 1);
                }
                Mapping::Zero { prealloc: None, .. } | Mapping::Unallocated => {}
            }
        }
        Ok(())
    }

    /// Adds `delta` to everything one L2 table references, then to the table itself. Stops once
    /// `done` reaches `stop`.
    async fn add_table_refs(
        &self,
        off: HostOffset,
        table: &[u8],
        delta: i64,
        stop: u64,
        done: &mut u64,
        freed: &mut FreedRuns,
    ) -> Result<()> {
        let mut runs = Vec::new();
        self.referenced_runs(table, &mut runs)?;
        runs.push((self.geo.host_cluster(off).0, 1));
        for (first, count) in runs {
            let count = count.min(stop.saturating_sub(*done));
            if count == 0 {
                return Ok(());
            }
            self.rc
                .add_run(&self.w, HostCluster(first), count, delta, done, freed)
                .await?;
        }
        Ok(())
    }

    /// Adds `delta` (one or minus one) to the refcount of every cluster reached from the L1
    /// table `l1`: its L2 tables and everything they reference. An increase that fails (a
    /// refcount at its maximum, an unreadable table) is undone before the error is returned.
    pub(crate) async fn add_tree_refs(
        &self,
        l1: &[u64],
        delta: i64,
        freed: &mut FreedRuns,
    ) -> Result<()> {
        let tables = self.l2_tables(l1)?;
        let mut done = 0;
        let r = self
            .add_refs_until(&tables, delta, u64::MAX, &mut done, freed)
            .await;
        if let Err(e) = r {
            if delta > 0 {
                self.undo_increase(&tables, done).await;
            }
            return Err(e);
        }
        Ok(())
    }

    async fn add_refs_until(
        &self,
        tables: &[TableRef],
        delta: i64,
        stop: u64,
        done: &mut u64,
        freed: &mut FreedRuns,
    ) -> Result<()> {
        let mut reads = std::pin::pin!(self.read_tables(tables));
        while let Some((_, off, data)) = reads.try_next().await? {
            if *done >= stop {
                break;
            }
            self.add_table_refs(off, &data, delta, stop, done, freed)
                .await?;
        }
        Ok(())
    }

    /// Takes back the first `done` cluster references an increase over `tables` made (the walk
    /// is deterministic, so the same order reaches the same clusters). Best effort: if this
    /// fails too, the extra references stay as leaks.
    async fn undo_increase(&self, tables: &[TableRef], done: u64) {
        let mut undone = 0;
        let mut freed = Vec::new();
        if let Err(e) = self
            .add_refs_until(tables, -1, done, &mut undone, &mut freed)
            .await
        {
            tracing::warn!(
                "{}: could not take back snapshot references after a failure ({e}); the image \
                 may have leaked clusters",
                self.filename
            );
        }
    }

    /// Writes a whole L2 table in place and drops its cached slices (they are stale now).
    pub(crate) async fn rewrite_l2_table(&self, off: HostOffset, data: IoBufMut) -> Result<()> {
        let cs = self.geo.cluster_size();
        self.w.check_metadata_write(off.0, cs, None)?;
        self.w
            .storage
            .write_at(data.freeze(), off.0)
            .await
            .context(|| format!("writing L2 table at host offset {off}"))?;
        self.forget_cached_table(off);
        Ok(())
    }

    /// Drops every cached slice of the L2 table at `off`.
    pub(crate) fn forget_cached_table(&self, off: HostOffset) {
        let slices = self.geo.l2_entries() / self.slice_entries;
        for k in 0..slices {
            self.l2.discard(self.slice_offset(off, k));
        }
    }

    /// Writes the changed L1 chunks (no sync).
    async fn write_l1_chunks(&self) -> Result<()> {
        let chunks = self.l1.dirty_chunks();
        try_join_all(chunks.iter().map(|c| self.w.write_back(c))).await?;
        Ok(())
    }

    /// Shares every cluster of the active tree with a new snapshot: one more reference each,
    /// and COPIED cleared everywhere (see the module docs for the batches). On failure the
    /// references added are taken back and the COPIED flags recomputed.
    pub(crate) async fn share_active_tree(&self) -> Result<()> {
        let l1 = self.l1.entries();
        let tables = self.l2_tables(&l1)?;
        let per_batch =
            (SHARE_BATCH_BYTES / self.geo.cluster_size()).clamp(1, SHARE_BATCH_TABLES) as usize;
        let mut done = 0;
        let r: Result<()> = async {
            let mut freed = Vec::new();
            for batch in tables.chunks(per_batch) {
                let data: Vec<_> = self.read_tables(batch).try_collect().await?;
                for (_, off, d) in &data {
                    self.add_table_refs(*off, d, 1, u64::MAX, &mut done, &mut freed)
                        .await?;
                }
                // The increases are durable before any flag stops saying "one reference".
                self.rc.cache.write_back_all(&self.w).await?;
                self.w.barrier.sync_now().await?;
                let mut writes = Vec::new();
                for (i, off, mut d) in data {
                    let mut changed = false;
                    let es = self.geo.l2_entry_size() as usize;
                    for k in 0..d.len() / es {
                        let e = be::u64(&d, k * es);
                        if e & COPIED != 0 {
                            be::put_u64(&mut d, k * es, e & !COPIED);
                            changed = true;
                        }
                    }
                    if changed {
                        writes.push(self.rewrite_l2_table(off, d));
                    }
                    let e = l1[i as usize];
                    if e & COPIED != 0 {
                        self.l1.set(i, L1Entry(e & !COPIED), Vec::new());
                    }
                }
                try_join_all(writes).await?;
                self.write_l1_chunks().await?;
            }
            self.w.barrier.sync_now().await
        }
        .await;
        if let Err(e) = r {
            self.undo_increase(&tables, done).await;
            if let Err(e2) = self.fix_copied_flags().await {
                tracing::warn!(
                    "{}: could not restore COPIED flags after a failed snapshot ({e2})",
                    self.filename
                );
            }
            return Err(e);
        }
        Ok(())
    }

    /// Recomputes the COPIED flag of every entry of the active tree from the refcounts (set
    /// exactly where the refcount is one), rewriting only the tables that change; syncs.
    pub(crate) async fn fix_copied_flags(&self) -> Result<()> {
        let g = self.geo;
        let l1 = self.l1.entries();
        let tables = self.l2_tables(&l1)?;
        let mut reads = std::pin::pin!(self.read_tables(&tables));
        let mut runs = Vec::new();
        let mut refs = Vec::new();
        while let Some((i, off, mut d)) = reads.try_next().await? {
            runs.clear();
            refs.clear();
            let es = g.l2_entry_size() as usize;
            let n = d.len() / es;
            for k in 0..n {
                if let Some(host) = Mapping::decode(be::u64(&d, k * es), g)?.host_cluster() {
                    push_run(&mut runs, g.host_cluster(host).0, 1);
                }
            }
            for &(first, count) in &runs {
                self.rc
                    .get_run(&self.w, HostCluster(first), count, &mut refs)
                    .await?;
            }
            let mut next = refs.iter();
            let mut changed = false;
            for k in 0..n {
                let e = be::u64(&d, k * es);
                let single = match Mapping::decode(e, g)?.host_cluster() {
                    Some(_) => next.next() == Some(&1),
                    None => false,
                };
                let want = if single { e | COPIED } else { e & !COPIED };
                if want != e {
                    be::put_u64(&mut d, k * es, want);
                    changed = true;
                }
            }
            if changed {
                self.rewrite_l2_table(off, d).await?;
            }
            let single = self.rc.get(&self.w, g.host_cluster(off)).await? == 1;
            let e = l1[i as usize];
            let want = if single { e | COPIED } else { e & !COPIED };
            if want != e {
                self.l1.set(i, L1Entry(want), Vec::new());
            }
        }
        self.write_l1_chunks().await?;
        self.w.barrier.sync_now().await
    }

    /// After references were dropped: forgets cached tables in the clusters that became free and,
    /// with `discard` (the `pass-discard-*` option for why they were freed), punches them out
    /// of the file.
    pub(crate) async fn release_freed(&self, freed: &FreedRuns, discard: bool) {
        let g = self.geo;
        for &(first, count) in freed {
            for c in first..first + count {
                let base = g.host_offset(HostCluster(c));
                self.forget_cached_table(base);
                self.rc.cache.discard(base);
            }
            if discard {
                let off = g.host_offset(HostCluster(first)).0;
                let len = count * g.cluster_size();
                if let Err(e) = self.w.storage.discard(off, len).await {
                    // The clusters are free either way; only the space stays allocated.
                    tracing::debug!("{}: discarding freed clusters: {e}", self.filename);
                }
            }
        }
    }

    /// Writes `bytes` at `off` as a table the caller has allocated (no sync).
    pub(crate) async fn write_new_table(
        &self,
        off: HostOffset,
        bytes: &[u8],
        kind: Option<super::overlap::Fixed>,
    ) -> Result<()> {
        self.w
            .check_metadata_write(off.0, bytes.len() as u64, kind)?;
        self.w
            .storage
            .write_at(IoBuf::copy_from(bytes), off.0)
            .await
            .context(|| format!("writing metadata at host offset {off}"))
    }
}
