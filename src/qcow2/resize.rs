//! Growing the virtual disk, and with it the L1 table.
//!
//! A larger L1 table is a whole-table change: it runs with the resize lock held exclusively, so
//! no request is between looking at the old table and updating it. The new table is written
//! (with every pending L1 change already in it) and synced together with the refcounts of its
//! clusters before the header points to it; the old table is freed only after the header switch
//! is durable. A crash at any point leaves either the old or the new table in use, complete.
//!
//! An image whose backing file is longer than the image would show the backing file's data in
//! the new area, which the guest never saw there: as QEMU does, the new area is then made to
//! read zeros (zero clusters, or zero data in version 2 images) right after the size changes.
//! A crash in between leaves the new area showing the backing file; nothing the guest wrote is
//! affected, since the guest could not write there before the resize returned.

use super::Qcow2;
use crate::block::ZeroFlags;
use crate::buf::IoBuf;
use crate::error::{Error, Result};
use crate::format::be;
use crate::format::header::MAX_L1_BYTES;
use futures_util::future::try_join_all;

impl Qcow2 {
    /// Grows the virtual disk to `new_size` bytes (shrinking is not supported).
    pub async fn grow(&self, new_size: u64) -> Result<()> {
        self.check_writable()?;
        if new_size % 512 != 0 {
            return Err(Error::arg("Image size must be a multiple of 512 bytes"));
        }
        let old_size = self.virtual_size();
        if new_size < old_size {
            return Err(Error::unsupported(
                "shrinking a qcow2 image is not supported yet",
            ));
        }
        if self.version < 3 && !self.snapshots().is_empty() && new_size != old_size {
            // Version 2 snapshot entries need not record their disk size: a snapshot taken at
            // another size could not be told apart (QEMU's rule).
            return Err(Error::unsupported(
                "Can't resize a v2 image which has snapshots",
            ));
        }
        let _exclusive = self.resize_lock.write().await;
        let g = self.geo;
        let needed = g.l1_entries_for(new_size);
        if needed * 8 > MAX_L1_BYTES {
            return Err(Error::arg(
                "The image size is too large for file format 'qcow2' (try using a larger cluster size)",
            ));
        }
        let old_entries = self.l1.size();
        if needed > old_entries {
            self.grow_l1(needed).await?;
        }
        self.hdr.update(&self.w, |h| h.size = new_size).await?;
        self.w.barrier.sync_now().await?;
        self.size
            .store(new_size, std::sync::atomic::Ordering::Relaxed);
        drop(_exclusive);
        let backing_shows = self.backing.get().is_some_and(|b| b.size() > old_size);
        if backing_shows && new_size > old_size {
            self.zero_plain(old_size, new_size - old_size, ZeroFlags::default())
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
            self.rc.defer_free(old_offset, old_bytes, None, false);
        }
        Ok(())
    }
}
