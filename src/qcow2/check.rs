//! Consistency check (what `qemu-img check` does without repair), and the reference walk that
//! the refcount rebuild (`repair`) shares.
//!
//! The walk counts every reference to every host cluster, in QEMU's order: header, active L1 and
//! its L2 tables and data clusters, snapshot L1 tables, the snapshot table, the refcount table,
//! the crypto header, bitmaps, and the refcount blocks last (so a block overlapping anything is
//! caught). The counts are then compared with the refcounts on disk: fewer stored than counted is
//! corruption (a cluster could be reused while in use), more is a leak (wasted space only). The
//! COPIED flags of the active tables are checked against the stored refcounts.
//!
//! Every message is QEMU's, word for word, so that scripts and people reading either tool's
//! output see the same thing. Everything is read from the file, not from caches.

use super::Qcow2;
use crate::buf::IoBufMut;
use crate::error::{Error, Result};
use crate::format::bitmap::{self, TABLE_OFFSET_MASK};
use crate::format::table::{
    compressed_shift, sub, COPIED, L1_RESERVED_MASK, L2_RESERVED_MASK, OFFSET_MASK,
};
use crate::format::{be, Extension};

/// Bits of a refcount table entry that must be zero.
const REFTABLE_RESERVED: u64 = 0x1ff;
/// L2 tables read ahead of the one being counted.
const L2_READ_AHEAD: usize = 4;
/// QEMU's cap on an L1 table (entries).
const MAX_L1_ENTRIES: u64 = 0x400000;

/// What a check found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    pub corruptions: u64,
    pub leaks: u64,
    pub check_errors: u64,
    pub total_clusters: u64,
    pub allocated_clusters: u64,
    pub fragmented_clusters: u64,
    pub compressed_clusters: u64,
    pub image_end_offset: u64,
    /// Repaired by this run (`check -r`).
    pub leaks_fixed: u64,
    pub corruptions_fixed: u64,
    /// Diagnostic lines, in the order QEMU prints them (to stderr).
    pub messages: Vec<String>,
}

impl CheckReport {
    /// qemu-img's exit status for this result.
    pub fn exit_code(&self) -> u8 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }
}

/// What a check may repair (qemu-img check `-r leaks` / `-r all`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fix {
    /// Refcounts higher than the references (wasted space only).
    pub leaks: bool,
    /// Refcounts lower than the references, and wrong COPIED flags (both can corrupt data on
    /// the next write), and broken refcount structures (by a rebuild).
    pub errors: bool,
}

impl Fix {
    pub const NONE: Fix = Fix {
        leaks: false,
        errors: false,
    };
    pub const LEAKS: Fix = Fix {
        leaks: true,
        errors: false,
    };
    pub const ALL: Fix = Fix {
        leaks: true,
        errors: true,
    };

    fn any(self) -> bool {
        self.leaks || self.errors
    }
}

/// Why a walk stopped early (QEMU: "Check failed: <strerror>").
#[derive(Debug)]
pub struct Aborted(pub Error);

/// Counted references per host cluster, in chunks allocated on first use: a hostile image can
/// make its file huge and sparse (a refcount table hundreds of gigabytes out), and the check's
/// memory must follow the clusters referenced, not the file's length.
pub(crate) struct ClusterCounts {
    chunks: Vec<Option<Box<[u32]>>>,
    len: u64,
}

const COUNT_CHUNK_BITS: u32 = 16;

impl ClusterCounts {
    fn new(len: u64) -> ClusterCounts {
        let mut c = ClusterCounts {
            chunks: Vec::new(),
            len: 0,
        };
        c.grow(len);
        c
    }

    /// Clusters covered: one past the highest cluster counted or set, at least the file's.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Covers clusters `0..len` (never shrinks).
    pub(crate) fn grow(&mut self, len: u64) {
        if len > self.len {
            self.len = len;
            let chunks = len.div_ceil(1 << COUNT_CHUNK_BITS) as usize;
            self.chunks.resize(chunks, None);
        }
    }

    #[inline]
    pub(crate) fn get(&self, c: u64) -> u32 {
        match self.chunks.get((c >> COUNT_CHUNK_BITS) as usize) {
            Some(Some(chunk)) => chunk[(c & ((1 << COUNT_CHUNK_BITS) - 1)) as usize],
            _ => 0,
        }
    }

    /// The count of cluster `c`, for changing in place (covering it first).
    #[inline]
    fn slot(&mut self, c: u64) -> &mut u32 {
        if c >= self.len {
            self.grow(c + 1);
        }
        let chunk = self.chunks[(c >> COUNT_CHUNK_BITS) as usize]
            .get_or_insert_with(|| vec![0; 1 << COUNT_CHUNK_BITS].into_boxed_slice());
        &mut chunk[(c & ((1 << COUNT_CHUNK_BITS) - 1)) as usize]
    }

    #[inline]
    pub(crate) fn set(&mut self, c: u64, v: u32) {
        if c >= self.len {
            self.grow(c + 1);
        }
        let chunk = self.chunks[(c >> COUNT_CHUNK_BITS) as usize]
            .get_or_insert_with(|| vec![0; 1 << COUNT_CHUNK_BITS].into_boxed_slice());
        chunk[(c & ((1 << COUNT_CHUNK_BITS) - 1)) as usize] = v;
    }
}

pub(crate) struct Walk<'a> {
    img: &'a Qcow2,
    pub file_len: u64,
    /// Counted references per host cluster.
    pub refs: ClusterCounts,
    /// Refcount blocks' ranges in which some reference was counted: the comparison skips the
    /// others without touching `refs` (a hostile image can make the file huge and sparse).
    counted_blocks: std::collections::HashSet<u64>,
    /// The block last added to `counted_blocks` (references come in runs: most of them would
    /// hash the same block again).
    last_counted_block: Option<u64>,
    refcount_max: u64,
    pub report: CheckReport,
    /// The refcount structures themselves are broken: only a rebuild repairs them.
    pub rebuild: bool,
    /// Some table was not walked (a snapshot's L1 table the snapshot table mislocates): the
    /// counts may miss references, so refcounts must not be rebuilt from them.
    pub uncounted: bool,
    /// Repair entries while walking (`-r all`): a misaligned preallocated cluster becomes a
    /// zero entry, queued in `entry_fixes` (L2 table offset, index, first word, bitmap).
    pub fix_errors: bool,
    pub entry_fixes: Vec<(u64, usize, u64, u64)>,
    /// COPIED flags checked during the walk (see `CopiedScan`).
    copied: Option<CopiedScan>,
}

/// The COPIED check done while the active tree is walked anyway, against the refcounts as stored
/// before any repair: the walk reads each L2 table once instead of twice. Its findings stand
/// when no repair changes a refcount and none of them is to be repaired; otherwise
/// `check_copied` reads the tables again.
struct CopiedScan {
    stored: std::sync::Arc<StoredRefcounts>,
    /// Clusters `stored` covers: references past them make the scan void.
    clusters: u64,
    messages: Vec<String>,
}

impl<'a> Walk<'a> {
    pub(crate) async fn new(img: &'a Qcow2) -> Result<Walk<'a>> {
        let file_len = img
            .w
            .storage
            .len()
            .await
            .map_err(|e| Error::io("getting the image length", e))?;
        let nb = img.geo.clusters_for(file_len);
        if nb > i32::MAX as u64 {
            return Err(Error::arg("image too large to check"));
        }
        let size_rounded = img.virtual_size() / 512 * 512;
        Ok(Walk {
            img,
            file_len,
            refs: ClusterCounts::new(nb),
            counted_blocks: Default::default(),
            last_counted_block: None,
            refcount_max: img.rc.width.max(),
            rebuild: false,
            uncounted: false,
            fix_errors: false,
            entry_fixes: Vec::new(),
            copied: None,
            report: CheckReport {
                total_clusters: img.geo.clusters_for(size_rounded),
                ..Default::default()
            },
        })
    }

    fn msg(&mut self, m: String) {
        self.report.messages.push(m);
    }

    fn corruption(&mut self, m: String) {
        self.report.corruptions += 1;
        self.msg(m);
    }

    /// Counts one reference to every cluster touched by `[offset, offset+size)`.
    pub(crate) fn inc(&mut self, offset: u64, size: u64) {
        if size == 0 {
            return;
        }
        let cs = self.img.geo.cluster_size();
        let end = offset.saturating_add(size);
        if end.saturating_sub(self.file_len) >= cs && end > self.file_len {
            self.corruption(format!(
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset {offset:#x} size {size:#x}"
            ));
            return;
        }
        let first = offset >> self.img.geo.cluster_bits;
        let last = (end - 1) >> self.img.geo.cluster_bits;
        let max = self.refcount_max.min(u64::from(u32::MAX)) as u32;
        for k in first..=last {
            let slot = self.refs.slot(k);
            let counted = *slot;
            if counted < max {
                *slot = counted + 1;
            } else {
                self.corruption(format!(
                    "ERROR: overflow cluster offset={:#x}",
                    k << self.img.geo.cluster_bits
                ));
                self.report.messages.push(
                    "Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing".into(),
                );
                continue;
            }
            let bi = k / self.img.rc.entries_per_block();
            if self.last_counted_block != Some(bi) {
                self.last_counted_block = Some(bi);
                self.counted_blocks.insert(bi);
            }
        }
    }

    /// The COPIED check of one active entry pointing to `off` (see `CopiedScan`).
    #[inline]
    fn scan_copied(
        &mut self,
        entry: u64,
        off: u64,
        data: bool,
        message: impl FnOnce(u64) -> String,
    ) {
        let img = self.img;
        let Some(scan) = &mut self.copied else {
            return;
        };
        // A data cluster in an external data file counts as referenced once (QEMU's rule).
        let rc = if img.geo.external_data && data {
            1
        } else {
            match scan.stored.get(img, off >> img.geo.cluster_bits) {
                Some(rc) => rc,
                None => return,
            }
        };
        if (rc == 1) != (entry >> 63 == 1) {
            scan.messages.push(message(rc));
        }
    }

    /// Whether a reference was counted in refcount block `bi`'s range.
    pub(crate) fn counted_in_block(&self, bi: u64) -> bool {
        self.counted_blocks.contains(&bi)
    }

    /// Records a reference set directly in `refs` (a rebuild's new structures).
    pub(crate) fn note_counted(&mut self, c: u64) {
        self.counted_blocks
            .insert(c / self.img.rc.entries_per_block());
    }

    async fn read(&self, offset: u64, len: usize) -> std::io::Result<IoBufMut> {
        self.img
            .w
            .storage
            .read_at(IoBufMut::for_overwrite(len), offset)
            .await
    }

    /// Counts an L1 table and everything below it.
    async fn l1(&mut self, offset: u64, size: u64, active: bool) -> Result<(), Aborted> {
        if size == 0 {
            return Ok(());
        }
        self.inc(offset, size * 8);
        let Ok(buf) = self.read(offset, (size * 8) as usize).await else {
            self.report.check_errors += 1;
            self.msg("ERROR: I/O error in check_refcounts_l1".into());
            return Err(Aborted(Error::io(
                "reading L1 table",
                std::io::Error::from_raw_os_error(5),
            )));
        };
        let cs = self.img.geo.cluster_size();
        // L2 tables are read a few ahead of the one being counted.
        let img = self.img;
        let entries: Vec<(usize, u64)> = (0..size as usize)
            .map(|i| (i, be::u64(&buf, i * 8)))
            .filter(|&(_, e)| e != 0)
            .collect();
        let mut pending = futures_util::stream::FuturesOrdered::new();
        let mut queued = 0;
        for &(i, e) in &entries {
            while queued < entries.len() && pending.len() < L2_READ_AHEAD {
                let off = entries[queued].1 & OFFSET_MASK;
                pending.push_back(
                    img.w
                        .storage
                        .read_at(IoBufMut::for_overwrite(cs as usize), off),
                );
                queued += 1;
            }
            let table = futures_util::stream::StreamExt::next(&mut pending)
                .await
                .unwrap_or_else(|| Err(std::io::Error::from_raw_os_error(5)));
            if e & L1_RESERVED_MASK != 0 {
                self.corruption(format!(
                    "ERROR found L1 entry with reserved bits set: {e:x}"
                ));
            }
            let l2 = e & OFFSET_MASK;
            if active {
                self.scan_copied(e, l2, false, |rc| {
                    format!(
                        "ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} refcount={rc}"
                    )
                });
            }
            self.inc(l2, cs);
            if l2 % cs != 0 {
                self.corruption(format!(
                    "ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry corrupted"
                ));
            }
            self.l2(table, l2, active)?;
        }
        Ok(())
    }

    /// Counts one L2 table (read by the caller) and what it references.
    fn l2(
        &mut self,
        table: std::io::Result<IoBufMut>,
        l2_offset: u64,
        active: bool,
    ) -> Result<(), Aborted> {
        let g = self.img.geo;
        let cs = g.cluster_size();
        let Ok(buf) = table else {
            self.report.check_errors += 1;
            self.msg("ERROR: I/O error in check_refcounts_l2".into());
            return Err(Aborted(Error::io(
                "reading L2 table",
                std::io::Error::from_raw_os_error(5),
            )));
        };
        let shift = compressed_shift(g);
        let es = g.l2_entry_size() as usize;
        let mut next_contiguous = 0u64;
        for i in 0..g.l2_entries() as usize {
            let mut e = be::u64(&buf, i * es);
            let bitmap = if g.extended_l2 {
                be::u64(&buf, i * es + 8)
            } else {
                0
            };
            if e & (1 << 62) != 0 && g.external_data {
                self.corruption(format!(
                    "ERROR compressed cluster {i} with data file, entry={}",
                    c_hex(e)
                ));
                continue;
            }
            if e & (1 << 62) != 0 {
                // Compressed.
                if e & (1 << 63) != 0 {
                    self.corruption(format!(
                        "ERROR: coffset={:#x}: copied flag must never be set for compressed clusters",
                        e & ((1u64 << shift) - 1)
                    ));
                    e &= !(1 << 63);
                }
                if bitmap != 0 {
                    // QEMU's check then leaves the cluster uncounted, and a rebuild would free
                    // data still read: it is counted here.
                    self.corruption(format!(
                        "ERROR compressed cluster {i} with non-zero subcluster allocation bitmap, entry={}",
                        c_hex(e)
                    ));
                }
                let coffset = e & ((1u64 << shift) - 1);
                let sectors = ((e >> shift) & ((1u64 << (g.cluster_bits - 8)) - 1)) + 1;
                let csize = sectors * 512 - (coffset & 511);
                self.inc(coffset, csize);
                if active {
                    self.report.allocated_clusters += 1;
                    self.report.compressed_clusters += 1;
                    self.report.fragmented_clusters += 1;
                }
                continue;
            }
            if e & L2_RESERVED_MASK != 0 {
                self.corruption(format!(
                    "ERROR found l2 entry with reserved bits set: {e:x}"
                ));
            }
            let off = e & OFFSET_MASK;
            // With subclusters, "preallocated" means no subcluster is allocated.
            let zero = if g.extended_l2 {
                bitmap & sub::ALL_ALLOC == 0
            } else {
                e & 1 != 0
            };
            // In a data file, offset 0 with COPIED is guest cluster 0's place (`Mapping`).
            let at_zero = g.external_data && e & COPIED != 0 && (g.extended_l2 || e & 1 == 0);
            if off == 0 && !at_zero {
                if bitmap & sub::ALL_ALLOC != 0 {
                    self.corruption(
                        "ERROR: Unallocated cluster has non-zero subcluster allocation map".into(),
                    );
                }
                continue; // unallocated or plain zero
            }
            if (bitmap >> 32) & bitmap != 0 {
                self.corruption(format!(
                    "ERROR offset={off:x}: Allocated cluster has corrupted subcluster allocation bitmap"
                ));
            }
            if active {
                self.scan_copied(e, off, true, |rc| {
                    format!("ERROR OFLAG_COPIED data cluster: l2_entry={e:x} refcount={rc}")
                });
            }
            if off % cs != 0 && zero && self.fix_errors {
                // QEMU's repair: the entry reads as zeros without a host cluster (allocated
                // subclusters, which there are none of here, would become zero ones).
                self.msg(format!(
                    "Repairing offset={off:x}: Preallocated cluster is not properly aligned; L2 entry corrupted."
                ));
                self.report.corruptions_fixed += 1;
                let fixed = if g.extended_l2 {
                    (0, (bitmap | (bitmap << 32)) & sub::ALL_ZERO)
                } else {
                    (crate::format::table::ZERO, 0)
                };
                self.entry_fixes.push((l2_offset, i, fixed.0, fixed.1));
                continue;
            }
            if off % cs != 0 {
                if zero {
                    self.corruption(format!(
                        "ERROR offset={off:x}: Preallocated cluster is not properly aligned; L2 entry corrupted."
                    ));
                } else {
                    self.corruption(format!(
                        "ERROR offset={off:x}: Data cluster is not properly aligned; L2 entry corrupted."
                    ));
                }
            }
            if active {
                self.report.allocated_clusters += 1;
                if next_contiguous != 0 && off != next_contiguous {
                    self.report.fragmented_clusters += 1;
                }
                next_contiguous = off + cs;
            }
            // Data in an external data file has no refcount in the image.
            if !g.external_data {
                self.inc(off, cs);
            }
        }
        Ok(())
    }

    /// Counts every reference except those of the refcount structures themselves.
    pub(crate) async fn count_data_and_tables(&mut self) -> Result<(), Aborted> {
        let img = self.img;
        let cs = img.geo.cluster_size();
        self.inc(0, cs);
        let h = img.hdr.get();
        self.l1(h.l1_table_offset.0, u64::from(h.l1_size), true)
            .await?;
        let snaps = img.snapshots();
        if img.geo.external_data && !snaps.is_empty() {
            self.corruption(format!(
                "ERROR {} snapshots in image with data file",
                snaps.len()
            ));
        }
        if h.version >= 3 {
            for (i, sn) in snaps.iter().enumerate() {
                if sn.extra_data.len() < 16 {
                    self.corruption(format!("ERROR snapshot table entry {i} is incomplete"));
                }
            }
        }
        for sn in snaps.iter() {
            if sn.l1_table_offset.0 % cs != 0 {
                self.corruption(format!(
                    "ERROR snapshot {} ({}) l1_offset={}: L1 table is not cluster aligned; snapshot table entry corrupted",
                    sn.id, sn.name, c_hex(sn.l1_table_offset.0)
                ));
                self.uncounted = true;
                continue;
            }
            if u64::from(sn.l1_size) > MAX_L1_ENTRIES {
                self.corruption(format!(
                    "ERROR snapshot {} ({}) l1_size={}: L1 table is too large; snapshot table entry corrupted",
                    sn.id, sn.name, c_hex(u64::from(sn.l1_size))
                ));
                self.uncounted = true;
                continue;
            }
            self.l1(sn.l1_table_offset.0, u64::from(sn.l1_size), false)
                .await?;
        }
        if !snaps.is_empty() {
            let table_len = crate::format::snapshot::encode_table(&snaps).len() as u64;
            // QEMU counts up to the end of the last name, without the final padding.
            let last = snaps.last().map_or(0, |s| {
                let rec = 40 + s.extra_data.len() + s.id.len() + s.name.len();
                (rec.next_multiple_of(8) - rec) as u64
            });
            self.inc(h.snapshots_offset.0, table_len - last);
        }
        for e in &h.extensions {
            if let Extension::CryptoHeader { offset, length } = e {
                self.inc(offset.0, *length);
            }
        }
        self.bitmaps(&h).await
    }

    async fn bitmaps(&mut self, h: &crate::format::Header) -> Result<(), Aborted> {
        let Some(ext) = h.bitmaps() else {
            return Ok(());
        };
        if h.autoclear_features & crate::format::header::autoclear::BITMAPS == 0
            || ext.nb_bitmaps == 0
        {
            return Ok(());
        }
        self.inc(ext.directory_offset.0, ext.directory_size);
        let bad = |s: &mut Self| {
            s.report.corruptions += 1;
            Err(Aborted(Error::arg("Invalid argument")))
        };
        if ext.directory_size > bitmap::MAX_DIRECTORY_BYTES {
            return bad(self);
        }
        let Ok(dir) = self
            .read(ext.directory_offset.0, ext.directory_size as usize)
            .await
        else {
            return bad(self);
        };
        let Ok(entries) = bitmap::decode_directory(&dir, ext.nb_bitmaps, self.img.geo) else {
            return bad(self);
        };
        let cs = self.img.geo.cluster_size();
        for b in entries {
            self.inc(b.table_offset.0, u64::from(b.table_size) * 8);
            let Ok(t) = self.read(b.table_offset.0, b.table_size as usize * 8).await else {
                return bad(self);
            };
            for e in be::decode_u64_table(&t) {
                let off = e & TABLE_OFFSET_MASK;
                if e & !TABLE_OFFSET_MASK & !1 != 0 || (off != 0 && e & 1 != 0) || off % cs != 0 {
                    return bad(self);
                }
                if off != 0 {
                    self.inc(off, cs);
                }
            }
        }
        Ok(())
    }

    /// Counts the refcount table and blocks (last, to catch overlaps).
    /// A corruption of the refcount structures themselves.
    fn structure_error(&mut self, m: String) {
        self.rebuild = true;
        self.corruption(m);
    }

    async fn refcount_structures(&mut self) {
        let img = self.img;
        let cs = img.geo.cluster_size();
        let t = img.rc.table();
        self.inc(t.offset.0, u64::from(t.clusters) * cs);
        for (i, &e) in t.entries.iter().enumerate() {
            let off = e & !REFTABLE_RESERVED;
            if e & REFTABLE_RESERVED != 0 {
                self.structure_error(format!(
                    "ERROR refcount table entry {i} has reserved bits set"
                ));
                continue;
            }
            if off % cs != 0 {
                self.structure_error(format!(
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
                ));
                continue;
            }
            let c = off >> img.geo.cluster_bits;
            if off != 0 && c >= self.refs.len() {
                self.structure_error(format!("ERROR refcount block {i} is outside image"));
                continue;
            }
            if off != 0 {
                self.inc(off, cs);
                let r = self.refs.get(c);
                if r != 1 {
                    self.structure_error(format!("ERROR refcount block {i} refcount={r}"));
                }
            }
        }
    }
}

/// The stored refcounts of clusters `0..n`, as QEMU's check sees them. Per refcount table entry:
/// `None` where the block is unusable (reported once as corruption of the image), `Some(None)`
/// where there is none or it holds only zeros, else the index of its content in `data`. Entries
/// naming the same block share one copy, and only blocks holding data inside the file are kept,
/// so memory follows the file's size whatever the table says.
struct StoredRefcounts {
    blocks: Vec<Option<Option<usize>>>,
    data: Vec<Vec<u8>>,
}

impl Qcow2 {
    /// Checks the image (see module docs). Errors only when the check itself cannot run.
    pub async fn check(&self) -> Result<CheckReport, (CheckReport, Error)> {
        self.check_with(Fix::NONE).await
    }

    /// Checks the image and repairs what `fix` allows, as QEMU's check does: refcounts that
    /// differ from the references are set to them one cluster at a time ("Repairing cluster"),
    /// broken refcount structures are rebuilt (errors only: a leaks-only repair refuses with
    /// "need to rebuild refcount structures"), and COPIED flags are set where the refcount is 1
    /// and cleared elsewhere. Everything goes through the caches and is flushed before the COPIED
    /// pass reads the refcounts back. Requests must not run meanwhile (the CLI holds the image
    /// alone).
    pub async fn check_with(&self, fix: Fix) -> Result<CheckReport, (CheckReport, Error)> {
        if fix.any() {
            if let Err(e) = self.check_writable() {
                return Err((CheckReport::default(), e));
            }
            let _f = self.flush_lock.lock().await;
            if let Err(e) = self.flush_locked().await {
                return Err((CheckReport::default(), e));
            }
        }
        let mut w = match Walk::new(self).await {
            Ok(w) => w,
            Err(e) => return Err((CheckReport::default(), e)),
        };
        w.fix_errors = fix.errors;
        let clusters = w.refs.len();
        w.copied = Some(CopiedScan {
            stored: std::sync::Arc::new(self.stored_refcounts(clusters).await),
            clusters,
            messages: Vec::new(),
        });
        if let Err(Aborted(e)) = w.count_data_and_tables().await {
            return Err((w.report, e));
        }
        for (l2, j, raw, bitmap) in std::mem::take(&mut w.entry_fixes) {
            if let Err(e) = self.set_l2_entry(l2, j, raw, Some(bitmap)).await {
                return Err((w.report, e));
            }
        }
        w.refcount_structures().await;
        // The refcounts read before the walk serve unless it counted references past them.
        let mut stored = match &w.copied {
            Some(c) if c.clusters >= w.refs.len() => c.stored.clone(),
            _ => std::sync::Arc::new(self.stored_refcounts(w.refs.len()).await),
        };
        let pre = w.report.clone();
        let mut highest = self.compare_refcounts(&mut w, &stored, Fix::NONE).await;
        if fix.any() && (w.rebuild || w.report.leaks > 0 || w.report.corruptions > 0) {
            if w.rebuild && fix.errors {
                w.msg("Rebuilding refcount structure".into());
                let old = self.refcount_structure_clusters();
                if let Err(e) = self.rebuild_refcounts().await {
                    return Err((w.report, e));
                }
                // The references are counted again against the new structures (QEMU prints
                // what that walk finds again): what it still finds was not repaired.
                let remaining = match Walk::new(self).await {
                    Ok(mut again) => {
                        if let Err(Aborted(e)) = again.count_data_and_tables().await {
                            return Err((w.report, e));
                        }
                        w.report.messages.append(&mut again.report.messages);
                        again.report.corruptions
                    }
                    Err(e) => return Err((w.report, e)),
                };
                // QEMU's rebuild counts the old structure in the new refcounts and then frees
                // it as leaks, saying so cluster by cluster; ours never counts it, but says the
                // same of every old cluster that is free now.
                let top = old.last().map_or(0, |&c| c + 1);
                let now = self.stored_refcounts(top).await;
                for c in old {
                    if now.get(self, c) == Some(0) {
                        w.msg(format!("Repairing cluster {c} refcount=1 reference=0"));
                    }
                }
                w.report.corruptions_fixed += w.report.corruptions.saturating_sub(remaining);
                w.report.leaks_fixed += w.report.leaks;
                w.report.corruptions = remaining;
                w.report.leaks = 0;
            } else if w.rebuild {
                w.msg("ERROR need to rebuild refcount structures".into());
                w.report.check_errors += 1;
                return Err((
                    w.report,
                    Error::corrupt("the refcount structures need to be rebuilt (-r all)"),
                ));
            } else {
                // Counts restart from before the comparison; its messages stay, as QEMU's do.
                let messages = std::mem::take(&mut w.report.messages);
                w.report = CheckReport { messages, ..pre };
                highest = self.compare_refcounts(&mut w, &stored, fix).await;
            }
            if let Err(e) = self.flush_locked_guarded().await {
                return Err((w.report, e));
            }
            stored = std::sync::Arc::new(self.stored_refcounts(w.refs.len()).await);
        }
        let scan = w.copied.take().filter(|c| c.clusters >= w.refs.len());
        let refcounts_changed = w.report.leaks_fixed + w.report.corruptions_fixed > 0 || w.rebuild;
        match scan {
            Some(scan)
                if !refcounts_changed
                    && (scan.messages.is_empty() || !self.copied_repair(&w, fix)) =>
            {
                w.report.corruptions += scan.messages.len() as u64;
                w.report.messages.extend(scan.messages);
            }
            _ => {
                if let Err(e) = self.check_copied(&mut w, &stored, fix).await {
                    return Err((w.report, e));
                }
            }
        }
        if fix.any() && w.report.corruptions_fixed > 0 {
            if let Err(e) = self.flush_locked_guarded().await {
                return Err((w.report, e));
            }
        }
        w.report.image_end_offset = (highest + 1) * self.geo.cluster_size();
        Ok(w.report)
    }

    /// The clusters of the refcount table and of the refcount blocks it points to (those at
    /// aligned offsets), sorted.
    fn refcount_structure_clusters(&self) -> Vec<u64> {
        let g = self.geo;
        let cs = g.cluster_size();
        let t = self.rc.table();
        let first = t.offset.0 / cs;
        let mut out: Vec<u64> = (first..first + u64::from(t.clusters)).collect();
        out.extend(
            t.entries
                .iter()
                .map(|&e| e & !REFTABLE_RESERVED)
                .filter(|&off| off != 0 && off % cs == 0)
                .map(|off| off / cs),
        );
        out.sort_unstable();
        out.dedup();
        out
    }

    async fn flush_locked_guarded(&self) -> Result<()> {
        let _f = self.flush_lock.lock().await;
        self.flush_locked().await
    }

    /// Compares stored refcounts with the counted references, repairing what `fix` allows.
    /// Returns the highest cluster in use.
    async fn compare_refcounts(&self, w: &mut Walk<'_>, stored: &StoredRefcounts, fix: Fix) -> u64 {
        let mut highest = 0u64;
        let mut announced = false;
        let epb = self.rc.entries_per_block() as usize;
        let mut i = 0usize;
        let clusters = w.refs.len() as usize;
        while i < clusters {
            // A file can be huge and sparse (a hostile image may name a refcount table hundreds
            // of gigabytes out): whole blocks with nothing stored and nothing counted are skipped
            // at memory speed instead of cluster by cluster.
            if i % epb == 0 {
                let end = (i + epb).min(clusters);
                if stored.block_is_zero(i / epb) && !w.counted_in_block((i / epb) as u64) {
                    i = end;
                    continue;
                }
            }
            let i = {
                let c = i;
                i += 1;
                c
            };
            let counted = u64::from(w.refs.get(i as u64));
            let Some(refcount) = stored.get(self, i as u64) else {
                if !announced {
                    announced = true;
                    let bi = i as u64 / self.rc.entries_per_block();
                    let off = self
                        .rc
                        .table()
                        .entries
                        .get(bi as usize)
                        .copied()
                        .unwrap_or(0);
                    w.msg(format!(
                        "qcow2: Image is corrupt: Refblock offset {} unaligned (reftable index: {}); further non-fatal corruption events will be suppressed",
                        c_hex(off & !REFTABLE_RESERVED),
                        c_hex(bi)
                    ));
                }
                w.report.check_errors += 1;
                w.msg(format!(
                    "Can't get refcount for cluster {i}: Input/output error"
                ));
                continue;
            };
            if refcount > 0 || counted > 0 {
                highest = i as u64;
            }
            if refcount == counted {
                continue;
            }
            let repair = if refcount == 0 {
                w.rebuild = true;
                false
            } else if refcount > counted {
                fix.leaks
            } else {
                fix.errors
            };
            if repair {
                w.msg(format!(
                    "Repairing cluster {i} refcount={refcount} reference={counted}"
                ));
                let delta = counted as i64 - refcount as i64;
                match self
                    .rc
                    .add(&self.w, crate::units::HostCluster(i as u64), delta)
                    .await
                {
                    Ok(_) if refcount > counted => {
                        w.report.leaks_fixed += 1;
                        continue;
                    }
                    Ok(_) => {
                        w.report.corruptions_fixed += 1;
                        continue;
                    }
                    Err(e) => w.msg(format!("ERROR fixing refcount of cluster {i}: {e}")),
                }
            } else if refcount < counted {
                w.msg(format!(
                    "ERROR cluster {i} refcount={refcount} reference={counted}"
                ));
            } else {
                w.msg(format!(
                    "Leaked cluster {i} refcount={refcount} reference={counted}"
                ));
            }
            if refcount < counted {
                w.report.corruptions += 1;
            } else {
                w.report.leaks += 1;
            }
        }
        highest
    }

    /// Whether wrong COPIED flags are repaired: with `-r all`, and with a leaks-only repair when
    /// the refcounts are known to be right by now (nothing left unrepaired), as QEMU's does: the
    /// flags then follow from them.
    fn copied_repair(&self, w: &Walk<'_>, fix: Fix) -> bool {
        fix.errors
            || (fix.leaks
                && w.report.check_errors == 0
                && w.report.corruptions == 0
                && w.report.leaks == 0)
    }

    /// COPIED flags of the active L1 and its L2 tables against the stored refcounts: set
    /// exactly where the refcount is 1. Repaired through the caches with `fix.errors`.
    async fn check_copied(
        &self,
        w: &mut Walk<'_>,
        stored: &StoredRefcounts,
        fix: Fix,
    ) -> Result<()> {
        const COPIED: u64 = 1 << 63;
        let repair = self.copied_repair(w, fix);
        let what = if repair { "Repairing" } else { "ERROR" };
        let cs = self.geo.cluster_size();
        let l1 = self.l1.entries();
        for (i, &e) in l1.iter().enumerate() {
            let l2 = e & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            let Some(rc) = stored.get(self, l2 >> self.geo.cluster_bits) else {
                continue;
            };
            if (rc == 1) != (e & COPIED != 0) {
                w.msg(format!(
                    "{what} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} refcount={rc}"
                ));
                if repair {
                    let fixed = if rc == 1 { e | COPIED } else { e & !COPIED };
                    self.l1
                        .set(i as u64, crate::format::table::L1Entry(fixed), Vec::new());
                    w.report.corruptions_fixed += 1;
                } else {
                    w.report.corruptions += 1;
                }
            }
            let buf = match self
                .w
                .storage
                .read_at(IoBufMut::for_overwrite(cs as usize), l2)
                .await
            {
                Ok(b) => b,
                Err(err) => {
                    w.report.check_errors += 1;
                    w.msg(format!(
                        "ERROR: Could not read L2 table: {}",
                        crate::error::strerror(&err)
                    ));
                    return Err(Error::io("reading L2 table", err));
                }
            };
            let mut copied_checks = Vec::new();
            let es = self.geo.l2_entry_size() as usize;
            for j in 0..self.geo.l2_entries() as usize {
                let x = be::u64(&buf, j * es);
                if x & (1 << 62) != 0 || x & OFFSET_MASK == 0 {
                    continue; // compressed, unallocated or plain zero
                }
                // Data in an external data file counts as referenced once (QEMU's rule).
                let rc = if self.geo.external_data {
                    1
                } else {
                    match stored.get(self, (x & OFFSET_MASK) >> self.geo.cluster_bits) {
                        Some(rc) => rc,
                        None => continue,
                    }
                };
                if (rc == 1) != (x & COPIED != 0) {
                    copied_checks.push(format!(
                        "{what} OFLAG_COPIED data cluster: l2_entry={x:x} refcount={rc}"
                    ));
                    if repair {
                        let fixed = if rc == 1 { x | COPIED } else { x & !COPIED };
                        self.set_l2_entry(l2, j, fixed, None).await?;
                    }
                }
            }
            if repair {
                w.report.corruptions_fixed += copied_checks.len() as u64;
            } else {
                w.report.corruptions += copied_checks.len() as u64;
            }
            w.report.messages.append(&mut copied_checks);
        }
        Ok(())
    }

    /// Rewrites entry `j` of the L2 table at host offset `l2` through the L2 cache (repair):
    /// its first word, and its bitmap when given (kept otherwise).
    async fn set_l2_entry(&self, l2: u64, j: usize, raw: u64, bitmap: Option<u64>) -> Result<()> {
        let slice_bytes = self.l2.entry_size();
        let per_slice = slice_bytes / self.geo.l2_entry_size() as usize;
        let slice_off = l2 + (j / per_slice * slice_bytes) as u64;
        let t = self
            .l2
            .get(&self.w, crate::units::HostOffset(slice_off))
            .await?;
        let mut st = t.lock();
        let bitmap = bitmap.unwrap_or_else(|| st.l2_at(j % per_slice, self.geo).1);
        let data = st.modify([]);
        super::cache::put_l2_entry(data, j % per_slice, self.geo, raw, bitmap);
        Ok(())
    }

    async fn stored_refcounts(&self, clusters: u64) -> StoredRefcounts {
        let cs = self.geo.cluster_size();
        let epb = self.rc.entries_per_block();
        let t = self.rc.table();
        // Blocks past the table's end hold no refcounts; `get` answers 0 for them.
        let nblocks = (clusters.div_ceil(epb) as usize).min(t.entries.len());
        let mut blocks = Vec::with_capacity(nblocks);
        let mut data = Vec::new();
        let mut seen: std::collections::HashMap<u64, Option<Option<usize>>> = Default::default();
        for &e in &t.entries[..nblocks] {
            let off = e & !REFTABLE_RESERVED;
            if off == 0 {
                blocks.push(Some(None));
                continue;
            }
            if off % cs != 0 {
                blocks.push(None);
                continue;
            }
            if let Some(&known) = seen.get(&off) {
                blocks.push(known);
                continue;
            }
            let read = self
                .w
                .storage
                .read_at(IoBufMut::for_overwrite(cs as usize), off)
                .await;
            let entry = match read {
                Err(_) => None,
                Ok(b) if b.iter().all(|&x| x == 0) => Some(None),
                Ok(b) => {
                    data.push(b.to_vec());
                    Some(Some(data.len() - 1))
                }
            };
            seen.insert(off, entry);
            blocks.push(entry);
        }
        StoredRefcounts { blocks, data }
    }
}

impl StoredRefcounts {
    /// Every refcount of block `bi` is known to be zero (no block, or a block of zeros).
    fn block_is_zero(&self, bi: usize) -> bool {
        match self.blocks.get(bi) {
            None | Some(Some(None)) => true,
            Some(None) => false,
            Some(Some(Some(i))) => self.data[*i].iter().all(|&x| x == 0),
        }
    }

    fn get(&self, img: &Qcow2, c: u64) -> Option<u64> {
        let epb = img.rc.entries_per_block();
        match self.blocks.get((c / epb) as usize) {
            None => Some(0),
            Some(None) => None,
            Some(Some(None)) => Some(0),
            Some(Some(Some(i))) => Some(img.rc.width.get(&self.data[*i], (c % epb) as usize)),
        }
    }
}

/// C's `%#x`: no `0x` prefix for zero.
pub(crate) fn c_hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}
