//! Refcount rebuild: recomputes every refcount from the references and writes a complete new
//! refcount structure. Used to repair an image left dirty by lazy refcounts (or a crash with
//! them) before it is written.
//!
//! Crash safety: the new blocks and table are written past everything in use, including the old
//! refcount structures, and synced before the header is switched to them in one sector write.
//! A crash before the switch leaves the old (dirty, still repairable) structures in place; after
//! it, the old structures are merely unreferenced space.

use super::check::{Aborted, Walk};
use super::refcount::RefTable;
use super::Qcow2;
use crate::buf::IoBuf;
use crate::error::{Error, IoContext, Result};
use crate::format::be;
use crate::units::{HostCluster, HostOffset};

impl Qcow2 {
    /// Rebuilds the refcounts of an image opened read-write (`check -r`): everything cached is
    /// written first so that the walk sees the current tables.
    pub async fn repair_refcounts(&self) -> Result<()> {
        self.check_writable()?;
        let _f = self.flush_lock.lock().await;
        self.flush_locked().await?;
        self.rebuild_refcounts().await
    }

    pub(crate) async fn rebuild_refcounts(&self) -> Result<()> {
        self.rebuild_refcounts_at(self.rc.width).await
    }

    /// Rebuilds the refcounts with `width`-bit entries (a new width only from `amend`, which
    /// closes the handle afterwards: the header then names the new width).
    pub(crate) async fn rebuild_refcounts_at(
        &self,
        width: crate::format::RefcountWidth,
    ) -> Result<()> {
        let g = self.geo;
        let cs = g.cluster_size();
        let mut w = Walk::new(self).await?;
        if let Err(Aborted(e)) = w.count_data_and_tables().await {
            return Err(Error::corrupt(format!(
                "cannot rebuild refcounts of a damaged image: {e}"
            )));
        }
        // Entries that are corrupt but counted (a misaligned data offset counts the clusters
        // it touches, as QEMU counts them) leave nothing in use uncounted; tables not walked do.
        if w.uncounted {
            return Err(Error::corrupt(format!(
                "cannot rebuild refcounts: {}",
                w.report.messages.join("; ")
            )));
        }
        // Place the new structures past every used cluster, the old refcount structures and the
        // end of the file.
        let old = self.rc.table();
        let mut start = g.clusters_for(w.file_len).max(w.refs.len());
        start = start.max(g.host_cluster(old.offset).0 + u64::from(old.clusters));
        for &e in &old.entries {
            let off = e & !0x1ff;
            if off != 0 {
                start = start.max((off >> g.cluster_bits) + 1);
            }
        }
        let epb = width.entries_per_block(g.cluster_bits);
        if width.bits() != self.rc.width.bits() {
            // Every count must fit the new width (QEMU's message).
            for c in 0..w.refs.len() {
                let r = u64::from(w.refs.get(c));
                if r > width.max() {
                    return Err(Error::arg(format!(
                        "Cannot decrease refcount entry width to {} bits: Cluster at offset \
                         {:#x} has a refcount of {r}",
                        width.bits(),
                        c << g.cluster_bits
                    )));
                }
            }
        }
        let (mut nb, mut nt) = (1u64, 1u64);
        loop {
            let total = start + nb + nt;
            let nb2 = total.div_ceil(epb);
            let nt2 = (nb2 * 8).div_ceil(cs);
            if nb2 <= nb && nt2 <= nt {
                break;
            }
            nb = nb.max(nb2);
            nt = nt.max(nt2);
        }
        let total = start + nb + nt;
        w.refs.grow(total);
        for c in start..total {
            w.refs.set(c, 1);
            w.note_counted(c);
        }
        let mut entries = vec![0u64; (nt * cs / 8) as usize];
        for bi in 0..nb {
            let mut block = vec![0u8; cs as usize];
            for c in bi * epb..((bi + 1) * epb).min(total) {
                width.set(&mut block, (c % epb) as usize, u64::from(w.refs.get(c)))?;
            }
            let off = g.host_offset(HostCluster(start + bi));
            self.w
                .storage
                .write_at(IoBuf::copy_from(&block), off.0)
                .await
                .context(|| format!("writing rebuilt refcount block at {off}"))?;
            entries[bi as usize] = off.0;
        }
        let mut table = vec![0u8; (nt * cs) as usize];
        be::encode_u64_table(&entries, &mut table);
        let table_off = g.host_offset(HostCluster(start + nb));
        self.w
            .storage
            .write_at(IoBuf::copy_from(&table), table_off.0)
            .await
            .context(|| "writing rebuilt refcount table".to_string())?;
        self.w.barrier.sync_now().await?;
        self.hdr
            .update(&self.w, |h| {
                h.refcount_table_offset = table_off;
                h.refcount_table_clusters = nt as u32;
                h.refcount_order = width.order;
            })
            .await?;
        self.w.barrier.sync_now().await?;
        self.rc.clear_pending_frees();
        self.rc
            .replace_table(
                RefTable {
                    offset: table_off,
                    clusters: nt as u32,
                    entries,
                },
                total * cs,
            )
            .await;
        // The old blocks are gone; the new ones and the new table are the metadata now.
        self.w.overlap.clear_tables();
        self.w
            .overlap
            .set_fixed(super::overlap::Fixed::RefcountTable, table_off.0, nt * cs);
        for bi in 0..nb {
            self.w
                .overlap
                .mark_table(start + bi, super::overlap::TableKind::RefcountBlock);
        }
        for e in self.l1.entries() {
            let off = e & crate::format::table::OFFSET_MASK;
            if off != 0 {
                self.w
                    .overlap
                    .mark_table(off >> g.cluster_bits, super::overlap::TableKind::L2);
            }
        }
        tracing::info!(
            "refcounts rebuilt: new table at {} ({} blocks)",
            HostOffset(table_off.0),
            nb
        );
        Ok(())
    }
}
