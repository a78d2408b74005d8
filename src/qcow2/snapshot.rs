//! Internal snapshots: taking, reverting to, deleting and reading them.
//!
//! # Requests and snapshots
//! A snapshot copies or replaces the whole active L1 table, and changes refcounts and COPIED
//! flags across the whole tree. Like L1 growth, it is a whole-table change: it runs with the
//! resize lock held exclusively (requests hold it shared), so no request is between looking an
//! entry up and changing it while the tree is being shared, and then the flush lock, after a
//! flush, so that everything the guest wrote before is on disk and no background flush runs.
//! Requests wait meanwhile; they are not failed. A snapshot is rare and short next to what it
//! would cost to let requests run against a tree whose flags are changing under them.
//!
//! # Durability (each step synced before the next)
//! - Create: the L1 copy is written; the active tree gains a reference per cluster and loses its
//!   COPIED flags (`snapshot_refs`: in batches, refcounts first); then the new snapshot table is
//!   written and the header switched to it in one sector write. A crash before the switch leaves
//!   the image as it was plus leaked clusters.
//! - Apply: the snapshot's tree gains a reference per cluster; the active L1 table is overwritten
//!   with the snapshot's (one write, synced); the old tree loses its references and the COPIED
//!   flags are recomputed. A crash before the L1 write leaves the old disk, after it the
//!   snapshot's; either way with leaks at most (and flags that say "copy" where a write in place
//!   would do).
//! - Delete: the table without the snapshot is written and switched to first; only then does the
//!   snapshot's tree lose its references. A crash in between leaks the snapshot's clusters.
//!
//! QEMU's rules are kept where they show: IDs are the next number after the largest, names need
//! not be unique, a snapshot records the disk size, and the entries carry QEMU's 24 bytes of
//! extra data (VM state size, disk size, instruction count).

use super::overlap::Fixed;
use super::snapshot_refs::FreedRuns;
use super::Qcow2;
use crate::error::{Error, IoContext, Result};
use crate::format::be;
use crate::format::header::MAX_L1_BYTES;
use crate::format::snapshot::{encode_table, Snapshot, MAX_TABLE_BYTES};
use crate::format::table::COPIED;
use crate::storage::blkdebug::DebugEvent;
use crate::units::HostOffset;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

/// QEMU's limit on the number of snapshots.
const MAX_SNAPSHOTS: usize = 65536;
/// Longest snapshot name QEMU keeps (its buffer is 256 bytes with the terminator).
pub const MAX_NAME_BYTES: usize = 255;

/// What a new snapshot records besides the disk.
#[derive(Clone, Debug, Default)]
pub struct SnapshotInfo {
    pub name: String,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    pub icount: u64,
}

impl SnapshotInfo {
    /// A snapshot named `name`, dated now (as qemu-img records it: no VM clock, icount 0).
    pub fn now(name: &str) -> SnapshotInfo {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        SnapshotInfo {
            name: name.to_string(),
            date_sec: t.as_secs() as u32,
            // QEMU takes the time in microseconds.
            date_nsec: t.subsec_micros() * 1000,
            vm_clock_nsec: 0,
            icount: 0,
        }
    }
}

/// The entry with QEMU's 24 bytes of extra data (unknown extra data kept after them); fields an
/// older entry lacks get QEMU's defaults (the current disk size, no instruction count).
fn normalized(mut s: Snapshot, disk_size: u64) -> Snapshot {
    let disk = s.disk_size.unwrap_or(disk_size);
    let icount = s.icount.unwrap_or(u64::MAX);
    let mut extra = vec![0u8; 24];
    be::put_u64(&mut extra, 0, s.vm_state_size);
    be::put_u64(&mut extra, 8, disk);
    be::put_u64(&mut extra, 16, icount);
    if s.extra_data.len() > 24 {
        extra.extend_from_slice(&s.extra_data[24..]);
    }
    s.disk_size = Some(disk);
    s.icount = Some(icount);
    s.extra_data = extra;
    s
}

/// QEMU's error for a snapshot that is not there (`ENOENT`).
fn not_found() -> Error {
    Error::io(
        "Can't find snapshot",
        std::io::Error::from_raw_os_error(2), // ENOENT
    )
}

fn table_len(snaps: &[Snapshot]) -> u64 {
    encode_table(snaps).len() as u64
}

impl Qcow2 {
    /// Internal snapshots share clusters between the active disk and the snapshot; data in an
    /// external data file has one fixed place per guest cluster and cannot be shared. QEMU
    /// refuses them (ENOTSUP), and so do we.
    fn refuse_snapshots_with_data_file(&self) -> Result<()> {
        if self.has_data_file() {
            return Err(Error::unsupported(
                "internal snapshots are not possible with an external data file",
            ));
        }
        Ok(())
    }

    /// The snapshot whose ID is `id_or_name`, or else the first whose name is (QEMU's lookup
    /// for applying and reading snapshots).
    pub fn find_snapshot(&self, id_or_name: &str) -> Option<Snapshot> {
        let snaps = self.snapshots();
        snaps
            .iter()
            .find(|s| s.id == id_or_name)
            .or_else(|| snaps.iter().find(|s| s.name == id_or_name))
            .cloned()
    }

    /// Takes an internal snapshot of the disk as it is now. Returns the new entry.
    pub async fn snapshot_create(&self, info: &SnapshotInfo) -> Result<Snapshot> {
        self.check_writable()?;
        self.refuse_snapshots_with_data_file()?;
        if info.name.len() > MAX_NAME_BYTES {
            return Err(Error::arg(format!(
                "Snapshot names are at most {MAX_NAME_BYTES} bytes long"
            )));
        }
        // A compressed target's cached clusters go out first (that takes the locks below).
        self.flush_seq_cache().await?;
        let _x = self.resize_lock.write().await;
        let _f = self.flush_lock.lock().await;
        self.flush_locked().await?;
        let r = self.create_quiesced(info).await;
        self.corruption_checked(r).await
    }

    async fn create_quiesced(&self, info: &SnapshotInfo) -> Result<Snapshot> {
        let snaps = self.snapshots();
        if snaps.len() >= MAX_SNAPSHOTS {
            return Err(Error::TooLarge(format!(
                "An image can hold at most {MAX_SNAPSHOTS} snapshots"
            )));
        }
        let id = snaps
            .iter()
            .filter_map(|s| s.id.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;

        // The copy of the active L1 table (COPIED flags mean nothing in an inactive table).
        let entries: Vec<u64> = self.l1.entries().iter().map(|e| e & !COPIED).collect();
        if self.w.overlap.checks_inactive_l2() {
            self.mark_inactive_l2_tables(&entries);
        }
        let l1_size = entries.len() as u64;
        let l1_offset = if l1_size == 0 {
            HostOffset(0)
        } else {
            let mut bytes = vec![0u8; (l1_size * 8) as usize];
            be::encode_u64_table(&entries, &mut bytes);
            self.allocate_and_write(&bytes).await?
        };
        if let Err(e) = self.share_active_tree().await {
            self.free_table_clusters(l1_offset, l1_size * 8).await;
            return Err(e);
        }

        let size = self.virtual_size();
        let sn = Snapshot {
            l1_table_offset: l1_offset,
            l1_size: l1_size as u32,
            id: id.to_string(),
            name: info.name.clone(),
            date_sec: info.date_sec,
            date_nsec: info.date_nsec,
            vm_clock_nsec: info.vm_clock_nsec,
            vm_state_size: 0,
            disk_size: Some(size),
            icount: Some(info.icount),
            extra_data: Vec::new(),
        };
        let sn = normalized(sn, size);
        let mut next = snaps.as_ref().clone();
        next.push(sn.clone());
        // Until the header names the new table, the references added above are leaks.
        self.write_snapshot_table(next).await?;
        if l1_size > 0 {
            self.w
                .overlap
                .set_fixed(Fixed::InactiveL1, l1_offset.0, l1_size * 8);
        }
        self.rc.cache.write_back_all(&self.w).await?;
        self.w.barrier.sync_now().await?;
        Ok(sn)
    }

    /// Allocates clusters for a new table, writes `bytes` there and makes the allocation's
    /// refcounts durable-ordered (no sync). On failure the clusters are released.
    pub(crate) async fn allocate_and_write(&self, bytes: &[u8]) -> Result<HostOffset> {
        let clusters = (bytes.len() as u64).div_ceil(self.geo.cluster_size());
        let alloc = self.rc.allocate(&self.w, &self.hdr, clusters).await?;
        let off = self.geo.host_offset(alloc.start);
        let written = async {
            self.write_new_table(off, bytes, None).await?;
            self.w.satisfy(&alloc.deps).await
        }
        .await;
        if let Err(e) = written {
            self.rc.release_unlinked(&self.w, alloc).await?;
            return Err(e);
        }
        Ok(off)
    }

    /// Takes the reference of a table that was allocated but never linked anywhere (best
    /// effort: a failure leaves a leak).
    pub(crate) async fn free_table_clusters(&self, off: HostOffset, len: u64) {
        if len == 0 {
            return;
        }
        let g = self.geo;
        let first = g.host_cluster(off);
        let last = (off.0 + len - 1) >> g.cluster_bits;
        let (mut freed, mut done) = (FreedRuns::new(), 0);
        self.w.announce(DebugEvent::ClusterFree).await;
        match self
            .rc
            .add_run(
                &self.w,
                first,
                last - first.0 + 1,
                -1,
                &mut done,
                &mut freed,
            )
            .await
        {
            Ok(()) => self.release_freed(&freed, self.pass_discard_snapshot).await,
            Err(e) => tracing::warn!("{}: could not free clusters at {off}: {e}", self.filename),
        }
    }

    /// Writes a new snapshot table, switches the header to it (durably) and frees the old one.
    async fn write_snapshot_table(&self, snaps: Vec<Snapshot>) -> Result<()> {
        let g = self.geo;
        let size = self.virtual_size();
        let snaps: Vec<Snapshot> = snaps.into_iter().map(|s| normalized(s, size)).collect();
        let bytes = encode_table(&snaps);
        if bytes.len() as u64 > MAX_TABLE_BYTES {
            return Err(Error::TooLarge("Snapshot table too large".into()));
        }
        let (old_offset, old_count) = self.hdr.with(|h| (h.snapshots_offset, h.nb_snapshots));
        let old_len = if old_count == 0 {
            0
        } else {
            table_len(&self.snapshots())
        };
        let new_offset = if snaps.is_empty() {
            HostOffset(0)
        } else {
            self.allocate_and_write(&bytes).await?
        };
        // The table and its refcounts are durable before the header points to it.
        self.w.barrier.sync_now().await?;
        let n = snaps.len() as u32;
        self.hdr
            .update(&self.w, |h| {
                h.nb_snapshots = n;
                h.snapshots_offset = new_offset;
            })
            .await?;
        self.w.barrier.sync_now().await?;
        *self.snapshots.write() = Arc::new(snaps);
        self.w
            .overlap
            .set_fixed(Fixed::SnapshotTable, new_offset.0, bytes.len() as u64);
        if old_len > 0 {
            // The new table is in use: failing to free the old one leaks it, nothing more, and
            // the operation goes on (as QEMU's does, with its message).
            let mut freed = Vec::new();
            let mut done = 0;
            let first = g.host_cluster(old_offset);
            let last = (old_offset.0 + old_len - 1) >> g.cluster_bits;
            self.w.announce(DebugEvent::ClusterFree).await;
            let r = self
                .rc
                .add_run(
                    &self.w,
                    first,
                    last - first.0 + 1,
                    -1,
                    &mut done,
                    &mut freed,
                )
                .await;
            match r {
                Ok(()) => self.release_freed(&freed, self.pass_discard_snapshot).await,
                Err(Error::Io { source, .. }) => tracing::warn!(
                    "qcow2_free_clusters failed: {}",
                    crate::error::strerror(&source)
                ),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads a snapshot's L1 table, after QEMU's checks of its location and size.
    pub(crate) async fn read_snapshot_l1(&self, sn: &Snapshot) -> Result<Vec<u64>> {
        let bytes = u64::from(sn.l1_size) * 8;
        if bytes > MAX_L1_BYTES {
            return Err(Error::TooLarge("Snapshot L1 table too large".into()));
        }
        if !self.geo.is_aligned(sn.l1_table_offset.0) {
            return Err(Error::arg("Snapshot L1 table offset invalid"));
        }
        if bytes == 0 {
            return Ok(Vec::new());
        }
        let buf = crate::storage::read_vec(&*self.w.storage, sn.l1_table_offset.0, bytes as usize)
            .await
            .context(|| format!("reading the L1 table of snapshot '{}'", sn.name))?;
        Ok(be::decode_u64_table(&buf))
    }

    /// Reverts the disk to snapshot `id_or_name` (the snapshot stays).
    pub async fn snapshot_apply(&self, id_or_name: &str) -> Result<()> {
        self.check_writable()?;
        self.refuse_snapshots_with_data_file()?;
        let sn = self.find_snapshot(id_or_name).ok_or_else(not_found)?;
        if self.has_bitmaps() {
            // QEMU's rule (EBUSY): no write would record the change of content, and a backup
            // trusting the bitmaps would miss it.
            return Err(Error::io(
                "Device has active dirty bitmaps",
                std::io::Error::from_raw_os_error(16),
            ));
        }
        self.flush_seq_cache().await?;
        let _x = self.resize_lock.write().await;
        let r = self.apply_exclusive(&sn).await;
        self.corruption_checked(r).await
    }

    async fn apply_exclusive(&self, sn: &Snapshot) -> Result<()> {
        let g = self.geo;
        let sn_l1 = self.read_snapshot_l1(sn).await?;
        let disk_size = sn.disk_size.unwrap_or_else(|| self.virtual_size());
        let needed = (sn_l1.len() as u64).max(g.l1_entries_for(disk_size));
        if needed * 8 > MAX_L1_BYTES {
            return Err(Error::TooLarge("Snapshot L1 table too large".into()));
        }
        if needed > self.l1.size() {
            self.grow_l1(needed).await?;
        }
        let _f = self.flush_lock.lock().await;
        self.flush_locked().await?;

        let mut freed = FreedRuns::new();
        self.add_tree_refs(&sn_l1, 1, &mut freed).await?;
        self.rc.cache.write_back_all(&self.w).await?;
        self.w.barrier.sync_now().await?;

        // The switch: one write of the whole active table, synced.
        let old_l1 = self.l1.entries();
        let size = self.l1.size();
        let mut bytes = vec![0u8; (size * 8) as usize];
        be::encode_u64_table(&sn_l1, &mut bytes[..sn_l1.len() * 8]);
        let l1_off = self.l1.offset();
        let switched = async {
            self.write_new_table(l1_off, &bytes, Some(Fixed::ActiveL1))
                .await?;
            self.w.barrier.sync_now().await
        }
        .await;
        // On failure the old table may or may not be on disk now: the snapshot's references
        // stay (leaks at worst) rather than be guessed away.
        switched?;
        self.l1.replace(l1_off, size, &bytes, g.cluster_size());
        for &e in &sn_l1 {
            let off = e & crate::format::table::OFFSET_MASK;
            if off != 0 {
                self.w.overlap.mark_shared_table(off >> g.cluster_bits);
            }
        }
        if disk_size != self.virtual_size() {
            self.hdr.update(&self.w, |h| h.size = disk_size).await?;
            self.size.store(disk_size, Relaxed);
        }

        self.add_tree_refs(&old_l1, -1, &mut freed).await?;
        self.release_freed(&freed, self.pass_discard_snapshot).await;
        self.fix_copied_flags().await?;
        self.rc.cache.write_back_all(&self.w).await?;
        self.w.barrier.sync_now().await
    }

    /// Deletes the snapshot with ID `id`; its clusters that nothing else uses are freed.
    pub async fn snapshot_delete(&self, id: &str) -> Result<()> {
        self.check_writable()?;
        self.refuse_snapshots_with_data_file()?;
        let Some(sn) = self.snapshots().iter().find(|s| s.id == id).cloned() else {
            return Err(not_found());
        };
        self.flush_seq_cache().await?;
        let _x = self.resize_lock.write().await;
        let _f = self.flush_lock.lock().await;
        self.flush_locked().await?;
        let r = self.delete_quiesced(&sn).await;
        self.corruption_checked(r).await
    }

    async fn delete_quiesced(&self, sn: &Snapshot) -> Result<()> {
        let g = self.geo;
        let sn_l1 = self.read_snapshot_l1(sn).await?;
        let next: Vec<Snapshot> = self
            .snapshots()
            .iter()
            .filter(|s| s.id != sn.id)
            .cloned()
            .collect();
        self.write_snapshot_table(next).await?;
        if sn.l1_size > 0 {
            self.w
                .overlap
                .remove_fixed(Fixed::InactiveL1, sn.l1_table_offset.0);
        }
        // The snapshot is gone from the table: what fails from here leaves leaks, said as
        // QEMU says it.
        let released = async {
            let mut freed = FreedRuns::new();
            self.add_tree_refs(&sn_l1, -1, &mut freed).await?;
            if sn.l1_size > 0 {
                let mut done = 0;
                let n = (u64::from(sn.l1_size) * 8).div_ceil(g.cluster_size());
                self.w.announce(DebugEvent::ClusterFree).await;
                self.rc
                    .add_run(
                        &self.w,
                        g.host_cluster(sn.l1_table_offset),
                        n,
                        -1,
                        &mut done,
                        &mut freed,
                    )
                    .await?;
            }
            self.release_freed(&freed, self.pass_discard_snapshot).await;
            self.fix_copied_flags().await?;
            self.rc.cache.write_back_all(&self.w).await?;
            self.w.barrier.sync_now().await
        };
        released
            .await
            .map_err(|e| e.reworded(|| "Failed to free the cluster and L1 table".into()))
    }

    /// Makes a read-only image show a snapshot instead of the active disk (QEMU's temporary
    /// load, for `convert -l` and `qemu-nbd -l`): reads go through the snapshot's L1 table; the
    /// disk size stays the image's, as QEMU keeps it. The snapshot is the one with ID `id` and name `name`
    /// (whichever are given; QEMU's matching).
    pub async fn load_snapshot(&self, id: Option<&str>, name: Option<&str>) -> Result<()> {
        if !self.read_only {
            return Err(Error::arg(
                "a snapshot can only be loaded into an image opened read-only",
            ));
        }
        let sn = self
            .snapshots()
            .iter()
            .find(|s| {
                (id.is_some() || name.is_some())
                    && id.is_none_or(|i| s.id == i)
                    && name.is_none_or(|n| s.name == n)
            })
            .cloned()
            .ok_or_else(|| Error::arg("Can't find snapshot"))?;
        let l1 = self.read_snapshot_l1(&sn).await?;
        let mut bytes = vec![0u8; l1.len() * 8];
        be::encode_u64_table(&l1, &mut bytes);
        self.l1.replace(
            sn.l1_table_offset,
            l1.len() as u64,
            &bytes,
            self.geo.cluster_size(),
        );
        // The disk keeps its current size, as with QEMU (a snapshot of a smaller disk reads
        // unallocated past its end).
        Ok(())
    }
}
