//! Changing an existing image's format options (`qemu-img amend`): the version, lazy refcounts
//! and the refcount width.
//!
//! - Upgrading to version 3 rewrites the header (QEMU's 112-byte header with its feature table).
//! - Downgrading to version 2 first turns every zero cluster, in the active tree and in every
//!   snapshot, into something version 2 can say: a preallocated zero cluster gets zeros written
//!   into it and becomes a data cluster; a plain one becomes unallocated without a backing file
//!   (it reads zeros anyway) and a newly allocated cluster of zeros with one. A preallocated
//!   zero cluster that another table references as data (a snapshot taken before the zeroing)
//!   is treated like a plain one, and this table's references to it are dropped afterwards:
//!   QEMU zeroes it in place, and the snapshot loses that data. Per table, the
//!   zeros and the new clusters' refcounts are durable before the table that points to them is
//!   rewritten, so a crash leaves a valid version 3 image whose zero clusters are partly
//!   expanded (and possibly a leaked cluster). The header switch to version 2 comes last.
//! - A new refcount width is written as a complete new refcount structure past everything in
//!   use, synced, and switched to in one header write (the refcount rebuild of `repair`, at the
//!   new width): a crash leaves the old structure or the new one. The handle cannot go on with
//!   the old width in memory, so it is closed afterwards; the caller reopens the image.
//!
//! All of this runs on a quiesced image, as snapshots do (`snapshot`).

use super::Qcow2;
use crate::error::{Error, IoContext, Result};
use crate::format::be;
use crate::format::header::{compat, incompat, Extension, Header};
use crate::format::table::{Mapping, COPIED, OFFSET_MASK, ZERO};
use crate::format::RefcountWidth;
use crate::units::HostCluster;
use futures_util::stream::TryStreamExt;

impl Qcow2 {
    /// Rewrites the header as version `version` (2 or 3); a downgrade expands zero clusters
    /// first. QEMU's conditions and messages.
    pub async fn set_version(&self, version: u32) -> Result<()> {
        self.set_version_with_progress(version, &|_, _| {}).await
    }

    /// [`Qcow2::set_version`], reporting the progress of a downgrade's zero-cluster expansion
    /// as (L1 entries done, L1 entries in all), over the active and the snapshots' tables, as
    /// QEMU counts it.
    pub async fn set_version_with_progress(
        &self,
        version: u32,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<()> {
        self.check_writable()?;
        let h = self.hdr.get();
        if version == h.version {
            return Ok(());
        }
        if version == 3 {
            // Version 3 behaviour (zero flags) only once the header says so; a downgrade below
            // switches to version 2 behaviour first, which is valid in either.
            let r = self
                .hdr_update_synced(|h| {
                    h.version = 3;
                    h.header_length = 112;
                    if !h
                        .extensions
                        .iter()
                        .any(|e| matches!(e, Extension::FeatureTable(_)))
                    {
                        // After the backing format, where QEMU puts it.
                        let at = h
                            .extensions
                            .iter()
                            .position(|e| !matches!(e, Extension::BackingFormat(_)))
                            .unwrap_or(h.extensions.len());
                        h.extensions
                            .insert(at, Extension::FeatureTable(Header::default_feature_table()));
                    }
                })
                .await;
            if r.is_ok() {
                self.set_version_field(3);
            }
            return r;
        }
        if version != 2 {
            return Err(Error::arg(format!("Unknown compatibility level {version}")));
        }
        if h.refcount_order != 4 {
            return Err(Error::arg("compat=0.10 requires refcount_bits=16"));
        }
        if h.has_data_file() {
            return Err(Error::arg("Cannot downgrade an image with a data file"));
        }
        let bad = h.incompatible_features & !incompat::DIRTY;
        if bad != 0 {
            return Err(Error::arg(format!(
                "Cannot downgrade an image with incompatible features {bad:#x} set"
            )));
        }
        if self
            .snapshots()
            .iter()
            .any(|s| s.disk_size.is_some_and(|d| d != self.virtual_size()))
        {
            return Err(Error::arg("Internal snapshots prevent downgrade of image"));
        }
        if self.has_bitmaps() {
            // QEMU downgrades anyway and leaves a bitmaps extension no version 2 reader may
            // trust: the bitmaps are lost and their clusters leak. Refused instead.
            return Err(Error::unsupported(
                "Cannot downgrade an image with persistent dirty bitmaps (compat=0.10 cannot hold them); remove them first with 'qimg bitmap --remove'",
            ));
        }
        self.flush_seq_cache().await?;
        let _x = self.resize_lock.write().await;
        let _f = self.flush_lock.lock().await;
        self.flush_locked().await?;
        let r = self.expand_zero_clusters(progress).await;
        self.corruption_checked(r).await?;
        drop(_f);
        // Lazy refcounts end here (a version 2 image has no dirty bit): everything is flushed.
        self.mark_clean_locked().await?;
        self.set_version_field(2);
        self.hdr_update_synced(|h| {
            h.version = 2;
            h.header_length = 72;
            h.incompatible_features = 0;
            h.compatible_features = 0;
            h.autoclear_features = 0;
            h.extensions
                .retain(|e| !matches!(e, Extension::FeatureTable(_)));
        })
        .await
    }

    /// Changes the external data file name stored in the header (`None` removes it: the image
    /// then opens only with the data file given explicitly). QEMU's rules and messages.
    pub async fn set_data_file_name(&self, name: Option<&str>) -> Result<()> {
        self.check_writable()?;
        if !self.has_data_file() {
            return Err(Error::arg(
                "data-file can only be set for images that use an external data file",
            ));
        }
        let name = name.map(str::to_string);
        self.hdr_update_synced(|h| {
            h.extensions
                .retain(|e| !matches!(e, Extension::DataFile(_)));
            if let Some(name) = name {
                // After the backing format, where QEMU puts it.
                let at = h
                    .extensions
                    .iter()
                    .position(|e| !matches!(e, Extension::BackingFormat(_)))
                    .unwrap_or(h.extensions.len());
                h.extensions.insert(at, Extension::DataFile(name));
            }
        })
        .await
    }

    /// Clears `data_file_raw` (`on` only when it is set already: whether an existing data file
    /// reads as the guest disk cannot be known, so QEMU refuses to set it, and so do we).
    pub async fn set_data_file_raw(&self, on: bool) -> Result<()> {
        self.check_writable()?;
        let raw = self.hdr.with(|h| h.data_file_raw());
        match (on, raw) {
            (true, true) | (false, false) => Ok(()),
            (true, false) => Err(Error::arg("data-file-raw cannot be set on existing images")),
            (false, true) => {
                self.hdr_update_synced(|h| {
                    h.autoclear_features &= !crate::format::header::autoclear::DATA_FILE_RAW
                })
                .await
            }
        }
    }

    async fn hdr_update_synced(&self, change: impl FnOnce(&mut Header)) -> Result<()> {
        self.hdr.update(&self.w, change).await?;
        self.w.barrier.sync_now().await
    }

    /// Clears the dirty bit (callers hold the resize lock: nothing is being written).
    async fn mark_clean_locked(&self) -> Result<()> {
        if !self.hdr.get().is_dirty() {
            return Ok(());
        }
        {
            let _f = self.flush_lock.lock().await;
            self.flush_locked().await?;
        }
        self.hdr_update_synced(|h| h.incompatible_features &= !incompat::DIRTY)
            .await?;
        self.rc
            .lazy
            .store(false, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Turns lazy refcounts on or off (off: the image is flushed and marked clean first).
    pub async fn set_lazy_refcounts(&self, on: bool) -> Result<()> {
        self.check_writable()?;
        if self.hdr.get().version < 3 && on {
            return Err(Error::arg(
                "Lazy refcounts only supported with compatibility level 1.1 and above (use \
                 compat=1.1 or greater)",
            ));
        }
        if !on {
            let _x = self.resize_lock.write().await;
            self.mark_clean_locked().await?;
        }
        self.hdr_update_synced(|h| {
            if on {
                h.compatible_features |= compat::LAZY_REFCOUNTS;
            } else {
                h.compatible_features &= !compat::LAZY_REFCOUNTS;
            }
        })
        .await
    }

    /// Rewrites the refcount structure with `bits`-bit refcounts. The handle is closed
    /// afterwards (see the module docs): reopen the image to go on.
    pub async fn change_refcount_width(&self, bits: u32) -> Result<()> {
        self.check_writable()?;
        if !bits.is_power_of_two() || bits > 64 {
            return Err(Error::arg(
                "Refcount width must be a power of two and may not exceed 64 bits",
            ));
        }
        if self.hdr.get().version < 3 && bits != 16 {
            return Err(Error::arg(
                "Refcount widths other than 16 bits require compatibility level 1.1 or above \
                 (use compat=1.1 or greater)",
            ));
        }
        let width = RefcountWidth::new(bits.trailing_zeros());
        if width.bits() == self.rc.width.bits() {
            return Ok(());
        }
        self.flush_seq_cache().await?;
        let _x = self.resize_lock.write().await;
        // The handle is not closed the usual way afterwards: the bitmaps are stored first (the
        // rebuild then counts their clusters), with no request running.
        self.store_bitmaps().await?;
        let rebuilt = async {
            {
                let _f = self.flush_lock.lock().await;
                self.flush_locked().await?;
            }
            let r = self.rebuild_refcounts_at(width).await;
            self.corruption_checked(r).await
        }
        .await;
        if let Err(e) = rebuilt {
            // The handle stays usable: its bitmaps must be `in-use` on disk again.
            if let Err(m) = self.remark_bitmaps_in_use().await {
                tracing::warn!(
                    "{}: bitmaps left stored after a failed amend: {m}",
                    self.filename
                );
                self.w.barrier.mark_corrupt();
            }
            return Err(e);
        }
        // The in-memory allocator still counts in the old width: nothing may use it now.
        self.closed
            .store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(b) = self.backing.get() {
            b.close().await?;
        }
        self.w.storage.release_locks();
        Ok(())
    }

    /// Expands every zero cluster of every tree (see the module docs). Quiesced.
    async fn expand_zero_clusters(&self, progress: &(dyn Fn(u64, u64) + Sync)) -> Result<()> {
        let g = self.geo;
        let cs = g.cluster_size();
        let has_backing = self.backing.get().is_some() || self.backing_filename().is_some();
        let mut l1s = vec![self.l1.entries()];
        for sn in self.snapshots().iter() {
            l1s.push(self.read_snapshot_l1(sn).await?);
        }
        let total: u64 = l1s.iter().map(|l1| l1.len() as u64).sum();
        let mut base = 0u64;
        for l1 in &l1s {
            let tables = self.l2_tables(l1)?;
            let mut reads = std::pin::pin!(self.read_tables(&tables));
            while let Some((i, off, mut d)) = reads.try_next().await? {
                // The entries before this table had none to expand.
                progress(base + i, total);
                let n = d.len() / 8;
                let zero_entries: Vec<usize> = (0..n)
                    .filter(|&k| {
                        let e = be::u64(&d, k * 8);
                        e & ZERO != 0
                            && !matches!(Mapping::decode(e, g), Ok(Mapping::Compressed { .. }))
                    })
                    .collect();
                if zero_entries.is_empty() {
                    progress(base + i + 1, total);
                    continue;
                }
                let table_refs = self.rc.get(&self.w, g.host_cluster(off)).await?;
                // Clusters this table stops referencing (a preallocated zero cluster that
                // something else references too), and how many references it held.
                let mut moved_from = Vec::new();
                for k in zero_entries {
                    let e = be::u64(&d, k * 8);
                    let mut host = e & OFFSET_MASK;
                    if host != 0 {
                        let refs = self
                            .rc
                            .get(&self.w, HostCluster(host >> g.cluster_bits))
                            .await?;
                        if refs > table_refs {
                            // Shared with another table (a snapshot reading data there):
                            // zeroing it in place would change what that snapshot reads.
                            // (QEMU zeroes it in place, which loses the snapshot's data.)
                            moved_from.push(host >> g.cluster_bits);
                            host = 0;
                        }
                    }
                    let new = if host == 0 && !has_backing {
                        0
                    } else {
                        let host = if host == 0 {
                            let a = self.rc.allocate(&self.w, &self.hdr, 1).await?;
                            let c = a.start;
                            if table_refs > 1 {
                                // Every tree sharing this table references the new cluster.
                                let (mut done, mut freed) = (0, Vec::new());
                                self.rc
                                    .add_run(
                                        &self.w,
                                        c,
                                        1,
                                        table_refs as i64 - 1,
                                        &mut done,
                                        &mut freed,
                                    )
                                    .await?;
                            }
                            g.host_offset(c).0
                        } else {
                            host
                        };
                        self.w.check_metadata_write(host, cs, None)?;
                        self.w
                            .storage
                            .write_zeroes(host, cs)
                            .await
                            .context(|| format!("writing zeros to host cluster {host:#x}"))?;
                        let single = self
                            .rc
                            .get(&self.w, HostCluster(host >> g.cluster_bits))
                            .await?
                            == 1;
                        host | if single { COPIED } else { 0 }
                    };
                    be::put_u64(&mut d, k * 8, new);
                }
                // The zeros and the new clusters' refcounts are durable before the table says
                // "data" instead of "zero".
                self.rc.cache.write_back_all(&self.w).await?;
                self.w.barrier.sync_now().await?;
                self.rewrite_l2_table(off, d).await?;
                if !moved_from.is_empty() {
                    // The old references go only once the table without them is durable.
                    self.w.barrier.sync_now().await?;
                    let mut freed = Vec::new();
                    for c in moved_from {
                        let mut done = 0;
                        self.rc
                            .add_run(
                                &self.w,
                                HostCluster(c),
                                1,
                                -(table_refs as i64),
                                &mut done,
                                &mut freed,
                            )
                            .await?;
                    }
                    self.release_freed(&freed, self.pass_discard_other).await;
                }
                progress(base + i + 1, total);
            }
            base += l1.len() as u64;
            progress(base, total);
        }
        self.w.barrier.sync_now().await
    }
}
