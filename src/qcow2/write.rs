//! The write path.
//!
//! A request is cut at L2 slice boundaries. For each piece:
//! 1. get the L2 slice for writing (allocating the L2 table, or copying a shared one, first);
//! 2. under the slice lock, decode the entries: if every cluster is a data cluster owned by this
//!    image alone (COPIED) and nobody holds a claim on them, write in place: no metadata at all;
//! 3. otherwise claim the clusters (waiting for any overlapping claim), allocate one contiguous
//!    extent for all clusters that need a new one, and write the data without any lock held:
//!    whole clusters straight from the caller's buffer; partial clusters merged with their old
//!    content (backing file, shared cluster, compressed cluster), or, when the old content is
//!    zeros, next to a zeroed rest (nothing to zero if the cluster is fresh past the end of file);
//! 4. point the L2 entries at the new clusters, recording that the refcounts and the data must be
//!    durable before the entries are written; queue the old clusters for freeing after the new
//!    entries are durable.

use super::cache::{put_u64, Dep, Table};
use super::data_file::NewClusters;
use super::inflight::{Claim, Event};
use super::Qcow2;
use crate::block::check_range;
use crate::buf::{IoBuf, IoBufMut};
use crate::error::{Error, IoContext, Result};
use crate::format::table::{compressed_range, L1Entry, Mapping};
use crate::units::{GuestCluster, HostOffset};
use futures_util::future::try_join_all;
use std::sync::Arc;

/// Where the old content of a cluster that gets a new host cluster comes from.
#[derive(Clone, Copy, Debug)]
enum Source {
    Zeros,
    Backing,
    Cluster(HostOffset),
    Compressed(HostOffset, u64),
}

/// What to do with one cluster of an allocating write.
#[derive(Clone, Copy, Debug)]
enum Action {
    /// Write in place, no metadata change.
    InPlace(HostOffset),
    /// A preallocated zero cluster owned by us: write there, zero the rest, then clear ZERO.
    Prealloc(HostOffset),
    /// Needs a new cluster (assigned later).
    New(Source),
}

enum Plan<'a> {
    InPlace(Vec<(u64, IoBuf)>),
    Wait(Arc<Event>),
    /// `bitmaps`: the subcluster bitmaps of `old` (empty without extended L2 entries).
    Alloc {
        claim: Claim<'a>,
        old: Vec<Mapping>,
        bitmaps: Vec<u64>,
    },
}

/// One storage operation of a write.
pub(super) enum Op {
    Write(u64, IoBuf),
    Zero(u64, u64),
}

impl Qcow2 {
    /// Writes `data` at guest `offset`.
    pub(crate) async fn write_plain(&self, offset: u64, data: IoBuf) -> Result<()> {
        self.check_writable()?;
        check_range(offset, data.len() as u64, self.virtual_size())?;
        self.write_unchecked(offset, data).await
    }

    /// [`Qcow2::write_plain`] without the range check: resizing writes into the last cluster
    /// past the virtual disk's end (`resize::clear_tail`), which the mapping covers.
    pub(crate) async fn write_unchecked(&self, offset: u64, data: IoBuf) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.apply_frees_if_overdue().await?;
        {
            let _resize = self.resize_lock.read().await;
            // `close` may have run while this request waited for the lock.
            self.check_open()?;
            self.mark_dirty(offset, data.len() as u64);
            let mut pos = 0usize;
            while pos < data.len() {
                let off = offset + pos as u64;
                let n = self.bytes_in_slice(off, (data.len() - pos) as u64) as usize;
                let r = self.write_segment(off, data.slice(pos..pos + n)).await;
                self.corruption_checked(r).await?;
                pos += n;
            }
        }
        if self.w.writethrough {
            self.flush_plain().await?;
        }
        Ok(())
    }

    /// Writes a piece of a request that lies within one L2 slice.
    async fn write_segment(&self, offset: u64, data: IoBuf) -> Result<()> {
        let g = self.geo;
        let first = GuestCluster(offset >> g.cluster_bits);
        let last = (offset + data.len() as u64 - 1) >> g.cluster_bits;
        let n = (last - first.0 + 1) as usize;
        loop {
            let slice = self.l2_slice_for_write(first).await?;
            let guard = self.epochs.enter();
            match self.plan(&slice, first, n, offset, &data)? {
                Plan::Wait(ev) => {
                    drop(guard);
                    ev.wait().await;
                }
                Plan::InPlace(writes) => {
                    self.run_ops(writes.into_iter().map(|(h, b)| Op::Write(h, b)).collect())
                        .await?;
                    return Ok(());
                }
                Plan::Alloc {
                    claim,
                    old,
                    bitmaps,
                } => {
                    let r = if g.extended_l2 {
                        self.allocating_write_ext(&slice, first, offset, &data, &old, &bitmaps)
                            .await
                    } else {
                        self.allocating_write(&slice, first, offset, &data, &old)
                            .await
                    };
                    drop(claim);
                    return r;
                }
            }
        }
    }

    /// Looks at the entries under the slice lock and decides how to write.
    fn plan<'a>(
        &'a self,
        slice: &Arc<Table>,
        first: GuestCluster,
        n: usize,
        offset: u64,
        data: &IoBuf,
    ) -> Result<Plan<'a>> {
        let g = self.geo;
        let cs = g.cluster_size();
        let base = self.index_in_slice(first);
        let st = slice.lock();
        let mut old = Vec::with_capacity(n);
        let mut bitmaps = Vec::new();
        for i in 0..n {
            let (raw, bitmap) = st.l2_at(base + i, g);
            let m = Mapping::decode(raw, g)
                .map_err(|e| self.bad_entry(slice.offset(), base + i, raw, e))?;
            if g.external_data {
                self.check_external_entry(m, first + i as u64, slice.offset(), base + i)?;
            }
            if g.extended_l2 {
                if !super::subcluster::valid_bitmap(m, bitmap) {
                    return Err(self.invalid_entry(slice.offset(), base + i, false));
                }
                bitmaps.push(bitmap);
            }
            old.push(m);
        }
        let all_in_place = old
            .iter()
            .all(|m| matches!(m, Mapping::Data { copied: true, .. }))
            && (!g.extended_l2
                || super::subcluster::covered_allocated(g, first, offset, data.len(), &bitmaps));
        if all_in_place {
            if let Some(ev) = self.claims.conflicting(first.0, first.0 + n as u64) {
                return Ok(Plan::Wait(ev));
            }
            let mut writes: Vec<(u64, IoBuf)> = Vec::new();
            let mut pos = 0usize;
            for (i, m) in old.iter().enumerate() {
                let Mapping::Data { host, .. } = m else {
                    unreachable!("checked above")
                };
                let gstart = (first.0 + i as u64) << g.cluster_bits;
                let from = offset.max(gstart);
                let to = (offset + data.len() as u64).min(gstart + cs);
                let part = data.slice(pos..pos + (to - from) as usize);
                push_write(&mut writes, host.0 + (from - gstart), part);
                pos += (to - from) as usize;
            }
            return Ok(Plan::InPlace(writes));
        }
        match self.claims.try_claim(first.0, first.0 + n as u64) {
            Err(ev) => Ok(Plan::Wait(ev)),
            Ok(claim) => Ok(Plan::Alloc {
                claim,
                old,
                bitmaps,
            }),
        }
    }

    /// Index of a guest cluster's entry inside its L2 slice.
    pub(crate) fn index_in_slice(&self, c: GuestCluster) -> usize {
        (self.geo.l2_index(c) as u64 % self.slice_entries) as usize
    }

    async fn allocating_write(
        &self,
        slice: &Arc<Table>,
        first: GuestCluster,
        offset: u64,
        data: &IoBuf,
        old: &[Mapping],
    ) -> Result<()> {
        let g = self.geo;
        let end = offset + data.len() as u64;
        // The slice will be written back with new entries: refuse now, at the request, if that
        // write would land on other metadata (a hostile L1 entry), rather than at the flush.
        let slice_bytes = self.slice_bytes();
        if let Err(e) = self
            .w
            .check_metadata_write(slice.offset().0, slice_bytes, None)
        {
            return Err(self.signal_corruption(e).await);
        }
        self.enable_lazy_refcounts_if_configured().await?;

        let actions: Vec<Action> = old
            .iter()
            .enumerate()
            .map(|(i, m)| match *m {
                Mapping::Data { host, copied: true } => Action::InPlace(host),
                Mapping::Zero {
                    prealloc: Some(h),
                    copied: true,
                } => Action::Prealloc(h),
                Mapping::Zero { .. } => Action::New(Source::Zeros),
                Mapping::Unallocated => {
                    let gstart = (first.0 + i as u64) << g.cluster_bits;
                    match self.backing.get() {
                        Some(b) if gstart < b.size() => Action::New(Source::Backing),
                        _ => Action::New(Source::Zeros),
                    }
                }
                Mapping::Data {
                    host,
                    copied: false,
                } => Action::New(Source::Cluster(host)),
                Mapping::Compressed { host, sectors } => {
                    Action::New(Source::Compressed(host, sectors))
                }
            })
            .collect();
        let need: Vec<bool> = actions
            .iter()
            .map(|a| matches!(a, Action::New(_)))
            .collect();
        let new = self.place_new_clusters(first, &need).await?;

        match self
            .write_clusters(first, offset, end, data, &actions, &new)
            .await
        {
            Ok(()) => {}
            Err(e) => {
                if let Some(a) = new.alloc {
                    self.rc.release_unlinked(&self.w, a).await?;
                }
                return Err(e);
            }
        }
        let data_gen = self.w.barrier.generation();

        // Link the new clusters. The claim guarantees nobody changed these entries meanwhile.
        let base = self.index_in_slice(first);
        let mut deps = new
            .alloc
            .as_ref()
            .map(|a| a.deps.clone())
            .unwrap_or_default();
        deps.push(Dep::Sync(data_gen));
        let version = {
            let mut st = slice.lock();
            let entries = st.modify(deps);
            for (i, a) in actions.iter().enumerate() {
                let host = match a {
                    Action::InPlace(_) => continue,
                    Action::Prealloc(h) => *h,
                    Action::New(_) => new.hosts[i],
                };
                put_u64(
                    entries,
                    base + i,
                    Mapping::Data { host, copied: true }.encode(g),
                );
            }
            st.version()
        };
        // The old clusters are free once the new entries are durable.
        for (a, m) in actions.iter().zip(old) {
            if !matches!(a, Action::New(_)) {
                continue;
            }
            let after = Some(Dep::Table {
                table: slice.clone(),
                version,
            });
            self.free_replaced(*m, after);
        }
        Ok(())
    }

    /// Queues the host space of `old`, which a new cluster replaced, for freeing once `after`
    /// (the entry that stopped using it) is durable.
    pub(super) fn free_replaced(&self, old: Mapping, after: Option<Dep>) {
        if self.geo.external_data {
            // A data cluster's place is fixed there: the new cluster is the old one.
            return;
        }
        match old {
            Mapping::Data { host, .. }
            | Mapping::Zero {
                prealloc: Some(host),
                ..
            } => self.rc.defer_free(
                host,
                self.geo.cluster_size(),
                after,
                self.pass_discard_other,
            ),
            Mapping::Compressed { host, sectors } => {
                let (start, len) = compressed_range(host, sectors);
                self.rc
                    .defer_free(start, len, after, self.pass_discard_other);
            }
            _ => {}
        }
    }

    /// Issues the data writes of an allocating write (see module docs, step 3).
    async fn write_clusters(
        &self,
        first: GuestCluster,
        offset: u64,
        end: u64,
        data: &IoBuf,
        actions: &[Action],
        new: &NewClusters,
    ) -> Result<()> {
        let g = self.geo;
        let cs = g.cluster_size();
        let fresh = new.fresh();
        let mut writes: Vec<(u64, IoBuf)> = Vec::new();
        let mut ops: Vec<Op> = Vec::new();
        let mut pos = 0usize;
        for (i, a) in actions.iter().enumerate() {
            let gstart = (first.0 + i as u64) << g.cluster_bits;
            let from = offset.max(gstart);
            let to = end.min(gstart + cs);
            let (head, tail) = (from - gstart, gstart + cs - to);
            let part = data.slice(pos..pos + (to - from) as usize);
            pos += (to - from) as usize;
            let host = match a {
                Action::InPlace(h) | Action::Prealloc(h) => h.0,
                Action::New(_) => new.hosts[i].0,
            };
            let whole = head == 0 && tail == 0;
            match a {
                Action::InPlace(_) => push_write(&mut writes, host + head, part),
                Action::New(_) if whole => push_write(&mut writes, host, part),
                Action::Prealloc(_) | Action::New(Source::Zeros) => {
                    push_write(&mut writes, host + head, part);
                    let untouched_is_zero = fresh && matches!(a, Action::New(_));
                    if !untouched_is_zero {
                        if head > 0 {
                            ops.push(Op::Zero(host, head));
                        }
                        if tail > 0 {
                            ops.push(Op::Zero(host + cs - tail, tail));
                        }
                    }
                }
                Action::New(src) => {
                    // Copy-on-write: old content with the new data on top, as one write.
                    let mut cluster = self.read_cow_source(*src, gstart).await?;
                    cluster[head as usize..(cs - tail) as usize].copy_from_slice(&part);
                    push_write(&mut writes, host, cluster.freeze());
                }
            }
        }
        ops.extend(writes.into_iter().map(|(h, b)| Op::Write(h, b)));
        self.run_ops(ops).await
    }

    async fn read_cow_source(&self, src: Source, guest: u64) -> Result<IoBufMut> {
        let cs = self.geo.cluster_size() as usize;
        match src {
            Source::Zeros => Ok(IoBufMut::zeroed(cs)),
            Source::Backing => self.read_backing(guest, IoBufMut::for_overwrite(cs)).await,
            Source::Cluster(h) => self
                .data
                .read_at(IoBufMut::for_overwrite(cs), h.0)
                .await
                .context(|| format!("reading cluster at {h} for copy-on-write")),
            Source::Compressed(h, sectors) => self.read_compressed(h, sectors).await,
        }
    }

    pub(super) async fn run_ops(&self, ops: Vec<Op>) -> Result<()> {
        // No guest data lands on metadata (a hostile L2 entry may point anywhere): see `overlap`.
        // (An external data file holds no metadata.)
        for op in ops.iter().filter(|_| !self.geo.external_data) {
            let (h, n) = match op {
                Op::Write(h, b) => (*h, b.len() as u64),
                Op::Zero(h, n) => (*h, *n),
            };
            if let Err(o) = self.w.overlap.check_data(h, n) {
                return Err(self.signal_corruption(Error::corrupt(o.message())).await);
            }
        }
        if !ops.is_empty() {
            self.data_event(crate::storage::blkdebug::DebugEvent::WriteAio)
                .await;
        }
        let storage = &self.data;
        let run = |op: Op| async move {
            match op {
                Op::Write(h, b) => storage
                    .write_at(b, h)
                    .await
                    .context(|| format!("writing data at host offset {h:#x}")),
                Op::Zero(h, n) => storage
                    .write_zeroes(h, n)
                    .await
                    .context(|| format!("zeroing host range {h:#x}+{n:#x}")),
            }
        };
        if ops.len() == 1 {
            let op = ops.into_iter().next().unwrap_or(Op::Zero(0, 0));
            return run(op).await;
        }
        try_join_all(ops.into_iter().map(run)).await?;
        Ok(())
    }

    /// The L2 slice holding guest cluster `c`, with an L2 table this image owns alone:
    /// allocates the table if there is none and copies it if it is shared with a snapshot.
    pub(crate) async fn l2_slice_for_write(&self, c: GuestCluster) -> Result<Arc<Table>> {
        let g = self.geo;
        let l1i = g.l1_index(c);
        let slice = g.l2_index(c) as u64 / self.slice_entries;
        loop {
            let e = self.l1.get(l1i).ok_or_else(|| {
                Error::corrupt(format!("L1 index {l1i} beyond the L1 table while writing"))
            })?;
            let l2 = match e.l2_offset(g, l1i) {
                Ok(l2) => l2,
                Err(err) => return Err(self.signal_corruption(err).await),
            };
            if let (Some(off), true) = (l2, e.copied()) {
                return self.l2.get(&self.w, self.slice_offset(off, slice)).await;
            }
            let claim = match self.l2_claims.try_claim(l1i, l1i + 1) {
                Err(ev) => {
                    ev.wait().await;
                    continue;
                }
                Ok(claim) => claim,
            };
            if self.l1.get(l1i) != Some(e) {
                continue; // someone else finished first
            }
            self.new_l2_table(l1i, l2).await?;
            drop(claim);
        }
    }

    /// Allocates an L2 table for L1 entry `l1i`: empty, or a copy of the shared table `old`.
    async fn new_l2_table(&self, l1i: u64, old: Option<HostOffset>) -> Result<()> {
        let cs = self.geo.cluster_size();
        self.enable_lazy_refcounts_if_configured().await?;
        let alloc = match self.rc.allocate(&self.w, &self.hdr, 1).await {
            Err(Error::Corrupt(m)) if m == super::refcount::HEADER_CLUSTER_FREE => {
                return Err(Error::Corrupt(
                    "Preventing invalid allocation of L2 table at offset 0".into(),
                ))
            }
            r => r?,
        };
        if self.rc.lazy.load(std::sync::atomic::Ordering::Relaxed) {
            // Lazy refcounts leave data clusters' refcounts for later, not a new table's:
            // like QEMU, write the refcount blocks now (whatever else they count).
            self.rc.cache.write_back_all(&self.w).await?;
        }
        let at = self.geo.host_offset(alloc.start);
        self.w
            .overlap
            .mark_table(alloc.start.0, super::overlap::TableKind::L2);
        let content = match old {
            None => vec![0u8; cs as usize],
            Some(off) => self
                .w
                .storage
                .read_at(IoBufMut::for_overwrite(cs as usize), off.0)
                .await
                .context(|| format!("reading shared L2 table at {off}"))?
                .to_vec(),
        };
        // The table's content reaches the file before the L1 entry that points to it.
        let written = match old {
            None => self.w.storage.write_zeroes(at.0, cs).await,
            Some(_) => {
                self.w
                    .storage
                    .write_at(IoBuf::copy_from(&content), at.0)
                    .await
            }
        };
        if let Err(e) = written {
            self.rc.release_unlinked(&self.w, alloc).await?;
            return Err(Error::io(format!("writing new L2 table at {at}"), e));
        }
        let gen = self.w.barrier.generation();
        let slice_bytes = self.slice_bytes() as usize;
        for (k, chunk) in content.chunks(slice_bytes).enumerate() {
            let off = self.slice_offset(at, k as u64);
            self.l2
                .insert_written(&self.w, off, chunk.to_vec().into_boxed_slice())
                .await?;
        }
        let mut deps = alloc.deps;
        deps.push(Dep::Sync(gen));
        self.l1.set(l1i, L1Entry::new(at, true), deps);
        if let Some(old) = old {
            let after = Some(self.l1.dep_on_entry(l1i));
            self.rc.defer_free(old, cs, after, self.pass_discard_other);
        }
        Ok(())
    }
}

/// Appends a write, merging it into the previous one when both are contiguous on the host and
/// in memory (one request over several fresh clusters becomes one write).
pub(super) fn push_write(writes: &mut Vec<(u64, IoBuf)>, host: u64, buf: IoBuf) {
    if let Some((h, b)) = writes.last_mut() {
        if *h + b.len() as u64 == host {
            if let Some(joined) = b.try_join(&buf) {
                *b = joined;
                return;
            }
        }
    }
    writes.push((host, buf));
}
