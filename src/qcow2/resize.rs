//! Resizing the virtual disk (QEMU's `qcow2_co_truncate`): growing, with or without
//! preallocation of the new area, and shrinking.
//!
//! Both directions refuse version 2 images with internal snapshots (only v3 records each
//! snapshot's disk size), sizes that are not a multiple of 512, and are serialized by
//! `resize_op`.
//!
//! **Growing.** A larger L1 table is a whole-table change: it runs with the resize lock held
//! exclusively, so no request is between looking at the old table and updating it. The new table
//! is written (with every pending L1 change already in it) and synced together with the refcounts
//! of its clusters before the header points to it; the old table is freed only after the header
//! switch is durable. A crash at any point leaves either the old or the new table in use,
//! complete. With preallocation (`metadata`, `falloc`, `full`), the clusters of the new area get
//! L2 tables and data clusters (reading zeros: fresh space past the end of the file, or zeroed),
//! `falloc` also reserves their space and `full` writes it; all of it is flushed before the
//! header's size changes, so a crash leaves the old size with some clusters past it allocated
//! (consistent, nothing leaked).
//!
//! An image whose backing file is longer than the image would show the backing file's data in
//! the new area, which the guest never saw there: as QEMU does, the new area is then made to
//! read zeros (zero clusters, or zero data in version 2 images) right after the size changes.
//! A crash in between leaves the new area showing the backing file; nothing the guest wrote is
//! affected, since the guest could not write there before the resize returned. Likewise the
//! part of the old last cluster past the old end (a size that was not cluster aligned) is made
//! to read zeros before the size changes, should it hold data (an image shrunk by another
//! program: QEMU leaves the old data there, and growing it again shows it).
//!
//! **Shrinking**, in QEMU's order, and every step durable before the next one starts:
//! 1. the in-memory size drops first (with the resize lock held exclusively, so no write is in
//!    flight): requests past the new end are refused from here on;
//! 2. the part of the new last cluster past the new end is zeroed if it holds data, so that
//!    nothing of the cut area can reappear when the image grows again (QEMU keeps it);
//! 3. every cluster past the new end is unmapped (L2 entries cleared) and freed, punched out of
//!    the file (QEMU's full discard, `QCOW2_DISCARD_ALWAYS`); flushed: the cleared entries are
//!    durable before any refcount drops (the usual deferred frees), then the refcounts;
//! 4. L1 entries past the new end are cleared and synced, then their L2 tables freed (the L1
//!    table keeps its size, as QEMU's does);
//! 5. refcount blocks that count nothing any more leave the refcount table (entries cleared and
//!    synced before the blocks' own clusters are freed);
//! 6. the file is truncated after its last cluster in use (a failure there is only a warning);
//! 7. the header's size is written and synced.
//!
//! The data is gone before the size changes, never after: a crash anywhere leaves an image
//! that `qemu-img check` accepts (leaked clusters at most), at the old size with part of the
//! cut area reading zeros, or at the new size; no data from the cut area can show again later.

use super::cache::{put_l2_entry, Dep};
use super::create::Preallocation;
use super::Qcow2;
use crate::block::ZeroFlags;
use crate::buf::{IoBuf, IoBufMut};
use crate::error::{Error, IoContext, Result};
use crate::format::be;
use crate::format::header::MAX_L1_BYTES;
use crate::format::table::{L1Entry, Mapping};
use crate::units::{GuestCluster, HostOffset};
use futures_util::future::try_join_all;
use std::sync::atomic::Ordering::Relaxed;

/// `EFBIG`: QEMU's error for an L1 table that would pass its limit.
const EFBIG: i32 = 27;

impl Qcow2 {
    /// Changes the virtual size to `new_size` bytes, in either direction (QEMU's
    /// `qcow2_co_truncate`). `prealloc` applies to the new area of a grown disk; shrinking
    /// refuses it.
    pub async fn resize(&self, new_size: u64, prealloc: Preallocation) -> Result<()> {
        self.check_writable()?;
        if new_size % 512 != 0 {
            return Err(Error::arg("The new size must be a multiple of 512"));
        }
        let _op = self.resize_op.lock().await;
        let old = self.virtual_size();
        if new_size != old {
            self.check_bitmaps_resizable(new_size)?;
        }
        if self.version() < 3 && !self.snapshots().is_empty() && new_size != old {
            // Version 2 snapshot entries need not record their disk size: a snapshot taken at
            // another size could not be told apart (QEMU's rule).
            return Err(Error::unsupported(
                "Can't resize a v2 image which has snapshots",
            ));
        }
        if new_size < old {
            if prealloc != Preallocation::Off {
                return Err(Error::arg(
                    "Preallocation can't be used for shrinking an image",
                ));
            }
            return self.shrink(old, new_size).await;
        }
        self.grow_to(old, new_size, prealloc).await
    }

    /// Grows the virtual disk to `new_size` bytes (no preallocation); refuses to shrink.
    pub async fn grow(&self, new_size: u64) -> Result<()> {
        if new_size < self.virtual_size() {
            return Err(Error::arg(
                "Use resize to make an image smaller: growing cannot shrink it",
            ));
        }
        self.resize(new_size, Preallocation::Off).await
    }

    async fn grow_to(&self, old: u64, new_size: u64, prealloc: Preallocation) -> Result<()> {
        let g = self.geo;
        // A raw data file stays mapped 1:1 over the new area too (QEMU's rule).
        let prealloc = match prealloc {
            Preallocation::Off if self.hdr.with(|h| h.data_file_raw()) => Preallocation::Metadata,
            p => p,
        };
        let needed = g.l1_entries_for(new_size);
        if needed * 8 > MAX_L1_BYTES {
            return Err(Error::io(
                "Failed to grow the L1 table",
                std::io::Error::from_raw_os_error(EFBIG),
            ));
        }
        self.flush_seq_cache().await?;
        if new_size > old {
            self.clear_tail(old).await?;
        }
        {
            let _exclusive = self.resize_lock.write().await;
            if needed > self.l1.size() {
                self.grow_l1(needed).await?;
            }
        }
        if prealloc != Preallocation::Off && new_size > old {
            self.preallocate(old, new_size, prealloc).await?;
            // Everything the new area's entries need is durable before the size covers them.
            self.flush_plain().await?;
        } else if g.external_data && new_size > old {
            // The data file follows the virtual size exactly (QEMU truncates it so).
            self.size_data_file(new_size, Preallocation::Off, true)
                .await?;
        }
        {
            let _exclusive = self.resize_lock.write().await;
            self.hdr.update(&self.w, |h| h.size = new_size).await?;
            self.w.barrier.sync_now().await?;
            self.size.store(new_size, Relaxed);
            self.resize_bitmaps(new_size);
        }
        // After `falloc` or `full` preallocation the new area reads zeros already (data
        // clusters, as QEMU leaves them); otherwise zero clusters hide the backing file.
        let backing_shows = self.backing.get().is_some_and(|b| b.size() > old);
        let zeroed = matches!(prealloc, Preallocation::Falloc | Preallocation::Full);
        if backing_shows && new_size > old && !zeroed {
            self.zero_plain(old, new_size - old, ZeroFlags::default())
                .await?;
            self.flush_plain().await?;
        }
        Ok(())
    }

    pub(crate) async fn grow_l1(&self, entries: u64) -> Result<()> {
        let g = self.geo;
        let cs = g.cluster_size();
        // Everything pending in the old table (and what it depends on) goes to disk first, so
        // the copy below is the complete current table.
        {
            let _f = self.flush_lock.lock().await;
            let l1 = self.l1.dirty_chunks();
            try_join_all(l1.iter().map(|c| self.w.write_back(c))).await?;
        }
        let old_offset = self.l1.offset();
        let old_size = self.l1.size();
        let clusters = (entries * 8).div_ceil(cs);
        let alloc = self.rc.allocate(&self.w, &self.hdr, clusters).await?;
        let new_offset = g.host_offset(alloc.start);
        let mut bytes = vec![0u8; (clusters * cs) as usize];
        be::encode_u64_table(&self.l1.entries(), &mut bytes);
        if let Err(e) = self
            .w
            .storage
            .write_at(IoBuf::copy_from(&bytes), new_offset.0)
            .await
        {
            self.rc.release_unlinked(&self.w, alloc).await?;
            return Err(Error::io("writing the new L1 table", e));
        }
        // The new table's refcounts and content are durable before the header points to it.
        self.w.satisfy(&alloc.deps).await?;
        self.w.barrier.sync_now().await?;
        self.hdr
            .update(&self.w, |h| {
                h.l1_table_offset = new_offset;
                h.l1_size = entries as u32;
            })
            .await?;
        self.w.barrier.sync_now().await?;
        self.l1.replace(new_offset, entries, &bytes, cs);
        self.w
            .overlap
            .set_fixed(super::overlap::Fixed::ActiveL1, new_offset.0, entries * 8);
        let old_bytes = (old_size * 8).div_ceil(cs) * cs;
        if old_size > 0 {
            self.rc
                .defer_free(old_offset, old_bytes, None, self.pass_discard_other);
        }
        Ok(())
    }

    /// Makes `[from, end of its cluster)` (past the virtual disk's end) read as zeros where the
    /// image itself holds data there that is not zero. Nothing to do for a cluster aligned
    /// `from`, or where the cluster is unallocated or a zero cluster (a backing file showing
    /// through is the grow path's business).
    async fn clear_tail(&self, from: u64) -> Result<()> {
        let cs = self.geo.cluster_size();
        let len = from.next_multiple_of(cs) - from;
        if len == 0 {
            return Ok(());
        }
        let nonzero = {
            let _guard = self.epochs.enter();
            let run = self.lookup_first(from, len).await?;
            if !matches!(
                run.kind,
                super::mapping::RunKind::Data { .. } | super::mapping::RunKind::Compressed { .. }
            ) {
                return Ok(());
            }
            let n = run.len.min(len) as usize;
            let buf = self.read_run(run, IoBufMut::zeroed(n)).await?;
            buf.iter().any(|&b| b != 0)
        };
        if nonzero {
            self.write_unchecked(from, IoBuf::zeroed(len as usize))
                .await?;
        }
        Ok(())
    }

    /// Shrinks the disk from `old` to `new_size` bytes (see the module docs for the order).
    async fn shrink(&self, old: u64, new_size: u64) -> Result<()> {
        self.flush_seq_cache().await?;
        let saved = self.saved_bitmaps();
        {
            let _exclusive = self.resize_lock.write().await;
            self.size.store(new_size, Relaxed);
            self.resize_bitmaps(new_size);
        }
        if let Some(seq) = &self.seq {
            // Cached clusters past the new end must not be read back after a later growth.
            seq.forget_from(new_size / self.geo.cluster_size());
        }
        match self.shrink_steps(old, new_size).await {
            Ok(()) => Ok(()),
            Err(e) => {
                // The header still says `old` (it is written last): so does memory. What was
                // cut already reads as zeros.
                if self.hdr.with(|h| h.size) == old {
                    let _exclusive = self.resize_lock.write().await;
                    self.size.store(old, Relaxed);
                    // The cut area may read differently now: dirty (in the enabled bitmaps),
                    // not lost; the disabled ones come back as they were.
                    self.restore_bitmaps(saved);
                    self.mark_dirty(new_size, old - new_size);
                }
                Err(e)
            }
        }
    }

    async fn shrink_steps(&self, old: u64, new_size: u64) -> Result<()> {
        let g = self.geo;
        let cs = g.cluster_size();
        let cut = new_size.next_multiple_of(cs);
        self.clear_tail(new_size).await?;
        // One L2 table's range at a time: a long crop queues a free per cluster, and the queue
        // is applied (flushed) between pieces when it passes its limits.
        let table_span = g.l2_entries() * cs;
        let mut pos = cut;
        while pos < old {
            let end = ((pos / table_span + 1) * table_span).min(old);
            self.crop(pos, end - pos)
                .await
                .map_err(|e| with_context(e, "Failed to discard cropped clusters"))?;
            pos = end;
        }
        // The cleared entries are durable before the frees apply (first flush), and the
        // dropped refcounts reach the disk (second).
        self.flush_plain().await?;
        self.flush_plain().await?;
        self.shrink_l1(g.l1_entries_for(new_size))
            .await
            .map_err(|e| with_context(e, "Failed to reduce the number of L2 tables"))?;
        {
            let _f = self.flush_lock.lock().await;
            self.flush_locked().await?;
            let r = self.rc.drop_unused_blocks(&self.w).await;
            self.corruption_checked(r)
                .await
                .map_err(|e| with_context(e, "Failed to discard unused refblocks"))?;
            self.flush_locked().await?;
        }
        match self.rc.truncate_unused_tail(&self.w).await {
            Ok(_) => {}
            Err(e @ Error::Corrupt(_)) => return Err(self.signal_corruption(e).await),
            // As QEMU: the image is fine, only longer than it needs to be.
            Err(e) => tracing::warn!("{e}"),
        }
        self.hdr.update(&self.w, |h| h.size = new_size).await?;
        self.w.barrier.sync_now().await?;
        if g.external_data {
            // Past the new end the data file holds nothing any more (QEMU truncates it too).
            self.size_data_file(new_size, Preallocation::Off, true)
                .await?;
        }
        Ok(())
    }

    /// Clears the L1 entries from `keep` on (their L2 tables map nothing any more, after the
    /// crop), durably, and then frees the tables.
    async fn shrink_l1(&self, keep: u64) -> Result<()> {
        let g = self.geo;
        let mut tables = Vec::new();
        {
            let _exclusive = self.resize_lock.write().await;
            for i in keep..self.l1.size() {
                let Some(e) = self.l1.get(i) else { break };
                let table = match e.l2_offset(g, i) {
                    Ok(t) => t,
                    Err(err) => return Err(self.signal_corruption(err).await),
                };
                if let Some(t) = table {
                    self.l1.set(i, L1Entry::UNALLOCATED, Vec::new());
                    tables.push(t);
                }
            }
        }
        if tables.is_empty() {
            return Ok(());
        }
        {
            let _f = self.flush_lock.lock().await;
            let chunks = self.l1.dirty_chunks();
            try_join_all(chunks.iter().map(|c| self.w.write_back(c))).await?;
            self.w.barrier.sync_now().await?;
        }
        for t in tables {
            self.rc.defer_free(t, g.cluster_size(), None, true);
        }
        self.flush_plain().await
    }

    /// Allocates the clusters of the new area `[old, new)` (QEMU's `preallocate_co` and the
    /// falloc/full path of `qcow2_co_truncate`): every cluster gets an L2 table and a data
    /// cluster reading zeros (`metadata` keeps the data clusters there are); `falloc` reserves
    /// the clusters' space, `full` writes zeros into it. The part of the old last cluster before
    /// `old` keeps what it reads: a data cluster stays as it is (`clear_tail` zeroed what lies
    /// past `old`), and where the cluster reads something else than zeros (compressed, or the
    /// backing file's data) it is made a data cluster by writing zeros past `old`
    /// (copy-on-write).
    async fn preallocate(&self, old: u64, new: u64, mode: Preallocation) -> Result<()> {
        let g = self.geo;
        let cs = g.cluster_size();
        let mut c = old / cs;
        let end = new.div_ceil(cs);
        if old % cs != 0 {
            let run = self.lookup_first(old, cs - old % cs).await?;
            let cstart = c * cs;
            let backing_shows = self.backing.get().is_some_and(|b| cstart < b.size());
            use super::mapping::RunKind;
            let copy = match run.kind {
                RunKind::Data { .. } => {
                    c += 1;
                    false
                }
                RunKind::Compressed { .. } => true,
                RunKind::Unallocated { .. } => backing_shows,
                RunKind::Zero { .. } => false,
            };
            if copy {
                let until = ((c + 1) * cs).min(new);
                self.write_unchecked(old, IoBuf::zeroed((until - old) as usize))
                    .await?;
                c += 1;
            }
        }
        self.enable_lazy_refcounts_if_configured().await?;
        let _resize = self.resize_lock.read().await;
        let mut file_end = 0;
        while c < end {
            let n = (self.bytes_in_slice(c * cs, (end - c) * cs) / cs).max(1);
            let r = self.preallocate_slice(GuestCluster(c), n, mode).await;
            file_end = file_end.max(self.corruption_checked(r).await?);
            c += n;
        }
        if g.external_data {
            let unit = g.subcluster_size();
            return self
                .size_data_file(new.next_multiple_of(unit), mode, false)
                .await;
        }
        // Data clusters past the end of the file read as zeros, but the file covers them, as
        // with QEMU (metadata mode leaves them sparse).
        let len = self
            .w
            .storage
            .len()
            .await
            .context(|| "Failed to inquire current file length".to_string())?;
        if file_end > len {
            self.w
                .storage
                .set_len(file_end)
                .await
                .context(|| "Failed to resize underlying file".to_string())?;
        }
        Ok(())
    }

    /// Preallocates the clusters `[first, first + n)`, all in one L2 slice. Returns the end of
    /// the host clusters allocated (0 if none was needed).
    async fn preallocate_slice(
        &self,
        first: GuestCluster,
        n: u64,
        mode: Preallocation,
    ) -> Result<u64> {
        let g = self.geo;
        let cs = g.cluster_size();
        loop {
            let slice = self.l2_slice_for_write(first).await?;
            let claim = match self.claims.try_claim(first.0, first.0 + n) {
                Err(ev) => {
                    ev.wait().await;
                    continue;
                }
                Ok(c) => c,
            };
            let base = self.index_in_slice(first);
            // With subclusters, `metadata` keeps the bitmaps: its clusters have none allocated
            // and read as before (as in QEMU).
            let (old, bitmaps): (Vec<Mapping>, Vec<u64>) = {
                let st = slice.lock();
                let mut old = Vec::with_capacity(n as usize);
                let mut bitmaps = Vec::with_capacity(n as usize);
                for i in 0..n as usize {
                    let (raw, bitmap) = st.l2_at(base + i, g);
                    old.push(Mapping::decode(raw, g)?);
                    bitmaps.push(bitmap);
                }
                (old, bitmaps)
            };
            // `metadata` keeps data clusters (QEMU's `preallocate_co`); `falloc` and `full`
            // give every cluster of the new area a new, zeroed one (QEMU links one contiguous
            // allocation over the whole area), so all of it reads zeros afterwards.
            let replace_all = matches!(mode, Preallocation::Falloc | Preallocation::Full);
            let need: Vec<usize> = (0..n as usize)
                .filter(|&i| replace_all || !matches!(old[i], Mapping::Data { .. }))
                .collect();
            if need.is_empty() {
                return Ok(0);
            }
            if g.external_data {
                // Each cluster at its own place in the data file, whose space and content are
                // the data file's (`size_data_file`, after all slices): QEMU's `preallocate_co`
                // keeps what a raw data file already holds there.
                let mut st = slice.lock();
                let entries = st.modify(Vec::new());
                for &i in &need {
                    let host = g.host_offset(crate::units::HostCluster(first.0 + i as u64));
                    let bitmap = if replace_all {
                        crate::format::table::sub::ALL_ALLOC
                    } else {
                        bitmaps[i]
                    };
                    let m = Mapping::Data { host, copied: true };
                    put_l2_entry(entries, base + i, g, m.encode(g), bitmap);
                }
                drop(st);
                drop(claim);
                return Ok(0);
            }
            let alloc = self
                .rc
                .allocate(&self.w, &self.hdr, need.len() as u64)
                .await?;
            let host = g.host_offset(alloc.start).0;
            let len = alloc.count * cs;
            let prepared = self.prepare_space(host, len, alloc.fresh, mode).await;
            if let Err(e) = prepared {
                self.rc.release_unlinked(&self.w, alloc).await?;
                return Err(e);
            }
            let mut deps = alloc.deps;
            deps.push(Dep::Sync(self.w.barrier.generation()));
            let version = {
                let mut st = slice.lock();
                let entries = st.modify(deps);
                for (k, &i) in need.iter().enumerate() {
                    let m = Mapping::Data {
                        host: HostOffset(host + k as u64 * cs),
                        copied: true,
                    };
                    // `falloc` and `full` clusters are zeroed: every subcluster reads them.
                    let bitmap = if replace_all {
                        crate::format::table::sub::ALL_ALLOC
                    } else {
                        bitmaps[i]
                    };
                    put_l2_entry(entries, base + i, g, m.encode(g), bitmap);
                }
                st.version()
            };
            for &i in &need {
                let new = Mapping::Data {
                    host: HostOffset(host),
                    copied: true,
                };
                if let Some((start, flen)) = super::zero::freed_range(old[i], new, cs) {
                    let after = Some(Dep::Table {
                        table: slice.clone(),
                        version,
                    });
                    self.rc
                        .defer_free(start, flen, after, self.pass_discard_other);
                }
            }
            drop(claim);
            return Ok(host + len);
        }
    }

    /// Makes freshly allocated host space read zeros, and reserves (`falloc`) or writes
    /// (`full`) it.
    async fn prepare_space(
        &self,
        host: u64,
        len: u64,
        fresh: bool,
        mode: Preallocation,
    ) -> Result<()> {
        if let Err(o) = self.w.overlap.check_data(host, len) {
            return Err(self.signal_corruption(Error::corrupt(o.message())).await);
        }
        let storage = &self.w.storage;
        match mode {
            Preallocation::Off => Ok(()),
            Preallocation::Metadata | Preallocation::Falloc => {
                if !fresh {
                    storage
                        .write_zeroes(host, len)
                        .await
                        .context(|| format!("zeroing host range {host:#x}+{len:#x}"))?;
                }
                if mode == Preallocation::Falloc {
                    storage
                        .allocate(host, len)
                        .await
                        .context(|| "Failed to resize underlying file".to_string())?;
                }
                Ok(())
            }
            Preallocation::Full => super::create::write_zeros(storage, host, len).await,
        }
    }
}

/// Prefixes an I/O error's context as QEMU prefixes the step that failed ("Failed to discard
/// cropped clusters: ..."); other errors keep their own words.
fn with_context(e: Error, what: &str) -> Error {
    match e {
        Error::Io { context, source } => Error::io(format!("{what}: {context}"), source),
        e => e,
    }
}
