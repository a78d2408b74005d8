//! Persistent dirty bitmaps: loaded at open, kept up to date by every write, stored at close.
//!
//! A backup tool reads only what changed since its last backup, and the bitmap is what tells it.
//! A bitmap that looks clean but misses a write is the one thing that must never happen: the
//! backup would silently lack data. So the format's rule is followed to the letter: a program
//! that has a bitmap open for writing marks it `in-use` on disk before the first write, and
//! clears the mark only when it stores the bitmap again; a crash leaves the mark, and every
//! program then treats the bitmap as inconsistent (unusable until removed).
//!
//! # Life cycle
//! - Open, read-write: the directory is read and validated as QEMU validates it; every bitmap
//!   not already `in-use` is loaded into memory (`dirty_bitmap::DirtyBitmap`) and a new
//!   directory with `in-use` set on all of them is written and switched to (durably) before the
//!   open returns. Bitmaps found `in-use` are inconsistent: kept as they are, never tracked.
//! - Writes, write-zeroes and discards mark the enabled bitmaps (`Qcow2::mark_dirty`), under
//!   the shared resize lock, before their data changes: a resize (which swaps in resized
//!   bitmaps under the exclusive lock) cannot lose a mark.
//! - Close: every bitmap whose bits changed since it was loaded gets new bitmap data clusters
//!   and a new table; then a new directory (`in-use` cleared) is written and the header switched
//!   to it, synced; only then are the replaced tables, data clusters and the old directory
//!   freed. A crash at any point leaves the old directory (bitmaps `in-use`: inconsistent) or
//!   the new one, with leaked clusters at most.
//! - Directory changes (`qimg bitmap`) change the bitmaps in memory; they reach the disk at
//!   close, as QEMU's do.
//!
//! Every directory is written to newly allocated clusters and switched to by the header write:
//! there is no in-place directory update that a crash could tear.

use super::Qcow2;
use crate::dirty_bitmap::DirtyBitmap;
use crate::error::{Error, IoContext, Result};
use crate::format::be;
use crate::format::bitmap::{self, flags, BitmapEntry, TABLE_ALL_ONES, TABLE_OFFSET_MASK};
use crate::format::header::{autoclear, BitmapsExtension, Extension};
use crate::units::HostOffset;
use arc_swap::ArcSwap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;

/// Most memory the bitmaps of one image may need when loaded for writing (their bits are
/// allocated as they are found set, but an image could set them all).
const MAX_LOADED_BYTES: u64 = 4 << 30;

/// What `info` shows of a bitmap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapInfo {
    pub name: String,
    pub granularity: u64,
    /// `in-use` as the directory on disk has it (set while a program has the image open for
    /// writing, and after a crash).
    pub in_use: bool,
    /// `auto`: the bitmap tracks writes.
    pub enabled: bool,
}

/// One bitmap as the engine keeps it.
struct Slot {
    /// The entry as the directory on disk has it (where the stored table is, the flags).
    entry: BitmapEntry,
    /// The bits, once loaded (read-write open, a read of its content) or created.
    bits: Option<Arc<DirtyBitmap>>,
    /// The stored table no longer holds `bits` (created, cleared or resized in this session).
    dirty: bool,
    /// Found `in-use` at open: its content cannot be trusted.
    inconsistent: bool,
    enabled: bool,
}

#[derive(Default)]
pub(crate) struct Bitmaps {
    slots: parking_lot::Mutex<Vec<Slot>>,
    /// Tables (offset, entries) whose clusters are freed after the next directory switch:
    /// removed bitmaps, replaced tables.
    dropped: parking_lot::Mutex<Vec<(HostOffset, u32)>>,
    /// The enabled, loaded bitmaps: what writes mark. Replaced whole on every change.
    tracking: ArcSwap<Vec<Arc<DirtyBitmap>>>,
    /// `tracking` is not empty: the one relaxed load a write pays when there are no bitmaps.
    any: AtomicBool,
    /// The directory was marked `in-use` at open: it must be stored at close.
    live: AtomicBool,
    /// Serializes directory changes.
    op: tokio::sync::Mutex<()>,
}

impl Bitmaps {
    fn retrack(&self, slots: &[Slot]) {
        let t: Vec<Arc<DirtyBitmap>> = slots
            .iter()
            .filter(|s| s.enabled && !s.inconsistent)
            .filter_map(|s| s.bits.clone())
            .collect();
        self.any.store(!t.is_empty(), Relaxed);
        self.tracking.store(Arc::new(t));
    }
}

/// QEMU's message for a bitmap that cannot be used.
fn inconsistent(name: &str) -> Error {
    Error::arg(format!(
        "Bitmap '{name}' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk"
    ))
}

fn not_found(name: &str) -> Error {
    Error::arg(format!("Dirty bitmap '{name}' not found"))
}

impl Qcow2 {
    /// Marks `[offset, offset+len)` dirty in every enabled bitmap. Call with the resize lock
    /// held (shared), before the data changes.
    #[inline]
    pub(crate) fn mark_dirty(&self, offset: u64, len: u64) {
        if self.bitmaps.any.load(Relaxed) {
            for b in self.bitmaps.tracking.load().iter() {
                b.mark(offset, len);
            }
        }
    }

    /// [`Qcow2::mark_dirty`] for paths that do not hold the resize lock (taken only when there
    /// are bitmaps to mark).
    pub(crate) async fn mark_dirty_locked(&self, offset: u64, len: u64) {
        if self.bitmaps.any.load(Relaxed) {
            let _resize = self.resize_lock.read().await;
            self.mark_dirty(offset, len);
        }
    }

    /// Reads and validates the bitmap directory (QEMU's checks). Empty when the image has no
    /// bitmaps, or when a program that does not know bitmaps wrote it (autoclear bit clear).
    async fn read_directory(&self) -> Result<Vec<BitmapEntry>> {
        let h = self.hdr.get();
        let Some(ext) = h.bitmaps() else {
            return Ok(Vec::new());
        };
        if h.autoclear_features & autoclear::BITMAPS == 0 {
            tracing::warn!(
                "warning: a program lacking bitmap support modified this file, so all bitmaps are now considered inconsistent\nSome clusters may be leaked, run 'qemu-img check -r' on the image file to fix."
            );
            return Ok(Vec::new());
        }
        // QEMU's checks and messages, in its order.
        if ext.nb_bitmaps > bitmap::MAX_BITMAPS {
            return Err(Error::invalid(format!(
                "bitmaps_ext: Image has {} bitmaps, exceeding the QEMU supported maximum of {}",
                ext.nb_bitmaps,
                bitmap::MAX_BITMAPS
            )));
        }
        if ext.nb_bitmaps == 0 {
            return Err(Error::invalid("found bitmaps extension with zero bitmaps"));
        }
        if !self.geo.is_aligned(ext.directory_offset.0) {
            return Err(Error::invalid(
                "bitmaps_ext: invalid bitmap directory offset",
            ));
        }
        if ext.directory_size > bitmap::MAX_DIRECTORY_BYTES {
            return Err(Error::invalid(format!(
                "bitmaps_ext: bitmap directory size ({}) exceeds the maximum supported size ({})",
                ext.directory_size,
                bitmap::MAX_DIRECTORY_BYTES
            )));
        }
        if ext.directory_size == 0 {
            return Err(Error::invalid("Requested bitmap directory size is zero"));
        }
        let buf = crate::storage::read_vec(
            &*self.w.storage,
            ext.directory_offset.0,
            ext.directory_size as usize,
        )
        .await
        .context(|| "Failed to read bitmap directory".to_string())?;
        let entries = bitmap::decode_directory(&buf, ext.nb_bitmaps, self.geo)?;
        let size = self.virtual_size();
        let mut names = std::collections::HashSet::new();
        for e in &entries {
            if !e.extra_data.is_empty() {
                return Err(Error::unsupported("Bitmap extra data is not supported"));
            }
            self.check_entry(e, size)?;
            if !names.insert(e.name.as_str()) {
                return Err(Error::invalid(format!("Bitmap already exists: {}", e.name)));
            }
        }
        Ok(entries)
    }

    /// QEMU's constraints on a directory entry.
    fn check_entry(&self, e: &BitmapEntry, disk_size: u64) -> Result<()> {
        let cs = self.geo.cluster_size();
        let phys = u64::from(e.table_size) * cs;
        let bad = e.table_size == 0
            || e.table_offset.0 == 0
            || !self.geo.is_aligned(e.table_offset.0)
            || e.table_size > bitmap::MAX_TABLE_ENTRIES
            || !(bitmap::MIN_GRANULARITY_BITS..=bitmap::MAX_GRANULARITY_BITS)
                .contains(&e.granularity_bits)
            || e.flags & !flags::KNOWN != 0
            || e.name_bytes().len() > bitmap::MAX_NAME_BYTES
            || e.kind != bitmap::KIND_DIRTY_TRACKING
            || phys > bitmap::MAX_PHYS_BYTES
            || (!e.in_use() && disk_size > (phys * 8) << e.granularity_bits);
        if bad {
            return Err(Error::invalid(format!(
                "Bitmap '{}' doesn't satisfy the constraints",
                e.name
            )));
        }
        Ok(())
    }

    /// Reads a bitmap's table and data into memory.
    async fn load_bits(&self, e: &BitmapEntry) -> Result<DirtyBitmap> {
        let size = self.virtual_size();
        let cs = self.geo.cluster_size();
        let bits = DirtyBitmap::new(size, u32::from(e.granularity_bits), cs);
        if bitmap::table_entries(size, e.granularity_bits, self.geo) != u64::from(e.table_size) {
            return Err(Error::invalid(format!(
                "Could not read bitmap '{}' from image: Invalid argument",
                e.name
            )));
        }
        let table = self.read_bitmap_table(e).await?;
        for (i, &t) in table.iter().enumerate().take(bits.chunks()) {
            let off = t & TABLE_OFFSET_MASK;
            if off == 0 {
                if t & TABLE_ALL_ONES != 0 {
                    bits.fill_chunk(i);
                }
                continue;
            }
            let data = crate::storage::read_vec(&*self.w.storage, off, cs as usize)
                .await
                .context(|| format!("Could not read bitmap '{}'", e.name))?;
            bits.load_chunk(i, &data);
        }
        bits.take_changed();
        Ok(bits)
    }

    async fn read_bitmap_table(&self, e: &BitmapEntry) -> Result<Vec<u64>> {
        let raw = crate::storage::read_vec(
            &*self.w.storage,
            e.table_offset.0,
            e.table_size as usize * 8,
        )
        .await
        .context(|| format!("Could not read the table of bitmap '{}'", e.name))?;
        let table = be::decode_u64_table(&raw);
        let cs = self.geo.cluster_size();
        for &t in &table {
            let off = t & TABLE_OFFSET_MASK;
            if t & !TABLE_OFFSET_MASK & !TABLE_ALL_ONES != 0
                || (off != 0 && t & TABLE_ALL_ONES != 0)
                || off % cs != 0
            {
                return Err(Error::invalid(format!(
                    "Could not read bitmap_table table from image for bitmap '{}': Invalid argument",
                    e.name
                )));
            }
        }
        Ok(table)
    }

    /// Loads the directory at open. On a read-write open (`track`), loads every consistent
    /// bitmap and marks them all `in-use` on disk before returning.
    pub(crate) async fn open_bitmaps(&self, track: bool) -> Result<()> {
        let entries = self.read_directory().await?;
        if track {
            // Each bitmap is capped (512 MiB of bits); their number is not, beyond QEMU's 65535.
            let cs = self.geo.cluster_size();
            let total: u64 = entries
                .iter()
                .filter(|e| !e.in_use())
                .map(|e| u64::from(e.table_size) * cs)
                .sum();
            if total > MAX_LOADED_BYTES {
                return Err(Error::TooLarge(format!(
                    "The image's bitmaps would need {} MiB of memory (at most {} MiB)",
                    total >> 20,
                    MAX_LOADED_BYTES >> 20
                )));
            }
        }
        let mut slots = Vec::with_capacity(entries.len());
        for e in entries {
            let inconsistent = e.in_use();
            let bits = if track && !inconsistent {
                Some(Arc::new(self.load_bits(&e).await?))
            } else {
                None
            };
            slots.push(Slot {
                enabled: e.enabled(),
                entry: e,
                bits,
                dirty: false,
                inconsistent,
            });
        }
        let mark = track && slots.iter().any(|s| !s.inconsistent);
        if mark {
            let marked: Vec<BitmapEntry> = slots
                .iter()
                .map(|s| BitmapEntry {
                    flags: s.entry.flags | flags::IN_USE,
                    ..s.entry.clone()
                })
                .collect();
            self.switch_directory(&marked).await?;
            for (s, e) in slots.iter_mut().zip(marked) {
                s.entry = e;
            }
        }
        // Stored at close only if something was marked (or is changed later).
        self.bitmaps.live.store(mark, Relaxed);
        self.bitmaps.retrack(&slots);
        *self.bitmaps.slots.lock() = slots;
        Ok(())
    }

    /// Writes `entries` as a new directory, switches the header to it (durably, with the
    /// `bitmaps` autoclear bit set, or drops the extension when there are none) and frees the
    /// old directory.
    async fn switch_directory(&self, entries: &[BitmapEntry]) -> Result<()> {
        let bytes = bitmap::encode_directory(entries);
        if bytes.len() as u64 > bitmap::MAX_DIRECTORY_BYTES {
            return Err(Error::TooLarge("Bitmap directory is too large".into()));
        }
        // A directory the autoclear bit disowns was written by us or QEMU, then left behind by
        // a program that does not know bitmaps: its clusters are leaks for `check` to repair.
        let old = self.hdr.with(|h| {
            h.bitmaps()
                .filter(|_| h.autoclear_features & autoclear::BITMAPS != 0)
        });
        let new_offset = if entries.is_empty() {
            HostOffset(0)
        } else {
            self.allocate_and_write(&bytes).await?
        };
        // The directory, the tables it names and their refcounts are durable before the header
        // points to them.
        self.rc.cache.write_back_all(&self.w).await?;
        self.w.barrier.sync_now().await?;
        let n = entries.len() as u32;
        let len = bytes.len() as u64;
        self.hdr
            .update(&self.w, |h| {
                h.extensions.retain(|e| !matches!(e, Extension::Bitmaps(_)));
                if n == 0 {
                    h.autoclear_features &= !autoclear::BITMAPS;
                } else {
                    h.extensions.push(Extension::Bitmaps(BitmapsExtension {
                        nb_bitmaps: n,
                        directory_size: len,
                        directory_offset: new_offset,
                    }));
                    h.autoclear_features |= autoclear::BITMAPS;
                }
            })
            .await?;
        self.w.barrier.sync_now().await?;
        if let Some(old) = old.filter(|o| o.directory_offset.0 != 0 && o.directory_size > 0) {
            self.free_table_clusters(old.directory_offset, old.directory_size)
                .await;
        }
        Ok(())
    }

    /// Frees a stored bitmap's data clusters and table (best effort: a failure leaks them).
    async fn free_bitmap_clusters(&self, table_offset: HostOffset, table_size: u32) {
        let e = BitmapEntry {
            table_offset,
            table_size,
            flags: 0,
            kind: bitmap::KIND_DIRTY_TRACKING,
            granularity_bits: 16,
            name: String::new(),
            raw_name: None,
            extra_data: Vec::new(),
        };
        match self.read_bitmap_table(&e).await {
            Ok(table) => {
                for t in table {
                    let off = t & TABLE_OFFSET_MASK;
                    if off != 0 {
                        self.free_table_clusters(HostOffset(off), self.geo.cluster_size())
                            .await;
                    }
                }
            }
            Err(err) => tracing::warn!("{}: could not free a bitmap's data: {err}", self.filename),
        }
        self.free_table_clusters(table_offset, u64::from(table_size) * 8)
            .await;
    }

    /// Writes a bitmap's data clusters and table; returns the table's location.
    async fn write_bitmap(&self, bits: &DirtyBitmap) -> Result<(HostOffset, u32)> {
        let cs = self.geo.cluster_size();
        let n = bits.chunks();
        let mut table = vec![0u64; n.max(1)];
        let mut allocated: Vec<HostOffset> = Vec::new();
        let r = async {
            for (i, t) in table.iter_mut().enumerate().take(n) {
                if let Some(bytes) = bits.chunk_bytes(i) {
                    debug_assert_eq!(bytes.len() as u64, cs);
                    let off = self.allocate_and_write(&bytes).await?;
                    allocated.push(off);
                    *t = off.0;
                }
            }
            let mut raw = vec![0u8; table.len() * 8];
            be::encode_u64_table(&table, &mut raw);
            self.allocate_and_write(&raw).await
        }
        .await;
        match r {
            Ok(off) => Ok((off, table.len() as u32)),
            Err(e) => {
                for off in allocated {
                    self.free_table_clusters(off, cs).await;
                }
                Err(e)
            }
        }
    }

    /// Stores the bitmaps at close (see the module docs for the order of the steps). On
    /// failure every loaded bitmap counts as changed, so that a later store rewrites it (the
    /// disk still has them `in-use`).
    pub(crate) async fn store_bitmaps(&self) -> Result<()> {
        if !self.bitmaps.live.load(Relaxed) {
            return Ok(());
        }
        let _op = self.bitmaps.op.lock().await;
        let r = self.store_bitmaps_locked().await;
        if r.is_err() {
            for s in self.bitmaps.slots.lock().iter_mut() {
                if s.bits.is_some() {
                    s.dirty = true;
                }
            }
        }
        r
    }

    /// After a failure past [`Qcow2::store_bitmaps`] with the handle still in use: the bitmaps
    /// go back to `in-use` on disk before any further write.
    pub(crate) async fn remark_bitmaps_in_use(&self) -> Result<()> {
        let _op = self.bitmaps.op.lock().await;
        let entries: Vec<BitmapEntry> = {
            let slots = self.bitmaps.slots.lock();
            if slots.iter().all(|s| s.inconsistent) {
                return Ok(());
            }
            slots
                .iter()
                .map(|s| BitmapEntry {
                    flags: s.entry.flags | flags::IN_USE,
                    ..s.entry.clone()
                })
                .collect()
        };
        self.switch_directory(&entries).await?;
        let mut slots = self.bitmaps.slots.lock();
        for (s, e) in slots.iter_mut().zip(entries) {
            s.entry = e;
        }
        self.bitmaps.live.store(true, Relaxed);
        Ok(())
    }

    async fn store_bitmaps_locked(&self) -> Result<()> {
        let work: Vec<(usize, Arc<DirtyBitmap>)> = {
            let slots = self.bitmaps.slots.lock();
            slots
                .iter()
                .enumerate()
                .filter_map(|(i, s)| s.bits.clone().map(|b| (i, b)))
                .collect()
        };
        let mut written: Vec<(usize, HostOffset, u32)> = Vec::new();
        for (i, bits) in work {
            let (rewrite, name) = {
                let slots = self.bitmaps.slots.lock();
                let s = &slots[i];
                (s.dirty || s.entry.table_offset.0 == 0, s.entry.name.clone())
            };
            if rewrite | bits.take_changed() {
                // Which bitmap could not be written, in QEMU's words.
                let (off, n) = self.write_bitmap(&bits).await.map_err(|e| {
                    e.reworded(|| format!("Failed to write bitmap '{name}' to file"))
                })?;
                written.push((i, off, n));
            }
        }
        let (entries, replaced) = {
            let slots = self.bitmaps.slots.lock();
            let mut replaced = Vec::new();
            let mut entries: Vec<BitmapEntry> = slots.iter().map(|s| s.entry.clone()).collect();
            for &(i, off, n) in &written {
                let e = &mut entries[i];
                if e.table_offset.0 != 0 {
                    replaced.push((e.table_offset, e.table_size));
                }
                e.table_offset = off;
                e.table_size = n;
            }
            for (e, s) in entries.iter_mut().zip(slots.iter()) {
                if !s.inconsistent {
                    e.flags &= !(flags::IN_USE | flags::AUTO);
                    if s.enabled {
                        e.flags |= flags::AUTO;
                    }
                }
            }
            (entries, replaced)
        };
        self.switch_directory(&entries)
            .await
            .map_err(|e| e.reworded(|| "Failed to update bitmap extension".into()))?;
        {
            let mut slots = self.bitmaps.slots.lock();
            for (s, e) in slots.iter_mut().zip(entries) {
                s.entry = e;
                s.dirty = false;
            }
        }
        self.bitmaps.live.store(false, Relaxed);
        let dropped: Vec<(HostOffset, u32)> = self
            .bitmaps
            .dropped
            .lock()
            .drain(..)
            .chain(replaced)
            .collect();
        for (off, n) in dropped {
            self.free_bitmap_clusters(off, n).await;
        }
        Ok(())
    }

    /// The bitmaps, in directory order.
    pub fn bitmap_list(&self) -> Vec<BitmapInfo> {
        self.bitmaps
            .slots
            .lock()
            .iter()
            .map(|s| BitmapInfo {
                name: s.entry.name.clone(),
                granularity: 1 << s.entry.granularity_bits,
                in_use: s.entry.in_use(),
                enabled: s.enabled,
            })
            .collect()
    }

    /// A bitmap's bits (loaded from disk on first use when the image is read-only). Fails for
    /// an inconsistent bitmap.
    pub async fn bitmap_bits(&self, name: &str) -> Result<Arc<DirtyBitmap>> {
        let _op = self.bitmaps.op.lock().await;
        let entry = {
            let slots = self.bitmaps.slots.lock();
            let s = slots
                .iter()
                .find(|s| s.entry.name == name)
                .ok_or_else(|| not_found(name))?;
            if s.inconsistent {
                return Err(inconsistent(name));
            }
            if let Some(b) = &s.bits {
                return Ok(b.clone());
            }
            s.entry.clone()
        };
        let bits = Arc::new(self.load_bits(&entry).await?);
        // Kept for writing; a read-only image loads again on the next use rather than keep
        // every bitmap it was asked for (a hostile image could have many large ones).
        if !self.read_only {
            if let Some(s) = self
                .bitmaps
                .slots
                .lock()
                .iter_mut()
                .find(|s| s.entry.name == name)
            {
                s.bits = Some(bits.clone());
            }
        }
        Ok(bits)
    }

    /// Whether `name` is a bitmap that cannot be used (found `in-use`).
    pub fn bitmap_inconsistent(&self, name: &str) -> Option<bool> {
        self.bitmaps
            .slots
            .lock()
            .iter()
            .find(|s| s.entry.name == name)
            .map(|s| s.inconsistent)
    }

    /// Adds a persistent bitmap (clean). `granularity` defaults to QEMU's: the cluster size,
    /// at least 4 KiB.
    pub async fn bitmap_add(
        &self,
        name: &str,
        granularity: Option<u64>,
        enabled: bool,
    ) -> Result<()> {
        self.check_writable()?;
        if self.version() < 3 {
            return Err(Error::unsupported(
                "Cannot store dirty bitmaps in qcow2 v2 files",
            ));
        }
        let _op = self.bitmaps.op.lock().await;
        if name.is_empty() {
            return Err(Error::arg("Bitmap name cannot be empty"));
        }
        let gran = granularity.unwrap_or(self.geo.cluster_size().clamp(4096, 65536));
        if !gran.is_power_of_two() || gran < 512 {
            return Err(Error::arg(
                "Granularity must be power of 2 and at least 512",
            ));
        }
        let gbits = gran.trailing_zeros() as u8;
        if gbits > bitmap::MAX_GRANULARITY_BITS {
            return Err(Error::arg(format!(
                "Granularity exceeds maximum ({} bytes)",
                1u64 << bitmap::MAX_GRANULARITY_BITS
            )));
        }
        if name.len() > bitmap::MAX_NAME_BYTES {
            return Err(Error::arg(format!(
                "Name length exceeds maximum ({} characters)",
                bitmap::MAX_NAME_BYTES
            )));
        }
        let size = self.virtual_size();
        if size == 0 {
            return Err(Error::arg(
                "A disk of size 0 cannot have persistent bitmaps",
            ));
        }
        let entries = bitmap::table_entries(size, gbits, self.geo);
        if entries * self.geo.cluster_size() > bitmap::MAX_PHYS_BYTES {
            return Err(Error::arg(
                "Too much space will be occupied by the bitmap. Use larger granularity",
            ));
        }
        let mut slots = self.bitmaps.slots.lock();
        let cs = self.geo.cluster_size();
        let loaded: u64 = slots
            .iter()
            .filter(|s| !s.inconsistent)
            .map(|s| bitmap::table_entries(size, s.entry.granularity_bits, self.geo) * cs)
            .sum();
        if loaded + entries * cs > MAX_LOADED_BYTES {
            return Err(Error::arg(format!(
                "The image's bitmaps would need more than {} MiB of memory",
                MAX_LOADED_BYTES >> 20
            )));
        }
        if slots.iter().any(|s| s.entry.name == name) {
            return Err(Error::arg(format!("Bitmap already exists: {name}")));
        }
        if slots.len() >= bitmap::MAX_BITMAPS as usize {
            return Err(Error::arg(
                "Maximum number of persistent bitmaps is already reached",
            ));
        }
        let entry = BitmapEntry {
            table_offset: HostOffset(0),
            table_size: 0,
            flags: flags::IN_USE | if enabled { flags::AUTO } else { 0 },
            kind: bitmap::KIND_DIRTY_TRACKING,
            granularity_bits: gbits,
            name: name.to_string(),
            raw_name: None,
            extra_data: Vec::new(),
        };
        let dir: u64 = slots
            .iter()
            .map(|s| s.entry.encoded_len() as u64)
            .sum::<u64>()
            + entry.encoded_len() as u64;
        if dir > bitmap::MAX_DIRECTORY_BYTES {
            return Err(Error::arg("Not enough space in the bitmap directory"));
        }
        let bits = DirtyBitmap::new(size, u32::from(gbits), self.geo.cluster_size());
        slots.push(Slot {
            entry,
            bits: Some(Arc::new(bits)),
            dirty: true,
            inconsistent: false,
            enabled,
        });
        self.bitmaps.live.store(true, Relaxed);
        self.bitmaps.retrack(&slots);
        Ok(())
    }

    /// Runs `f` on the slot named `name` (writable images only); the change is stored at close.
    async fn change_bitmap(
        &self,
        name: &str,
        f: impl FnOnce(&mut Slot) -> Result<()>,
    ) -> Result<()> {
        self.check_writable()?;
        let _op = self.bitmaps.op.lock().await;
        let mut slots = self.bitmaps.slots.lock();
        let s = slots
            .iter_mut()
            .find(|s| s.entry.name == name)
            .ok_or_else(|| not_found(name))?;
        f(s)?;
        self.bitmaps.live.store(true, Relaxed);
        self.bitmaps.retrack(&slots);
        Ok(())
    }

    /// Removes a bitmap (inconsistent ones too: that is how they are got rid of).
    pub async fn bitmap_remove(&self, name: &str) -> Result<()> {
        self.check_writable()?;
        let _op = self.bitmaps.op.lock().await;
        let mut slots = self.bitmaps.slots.lock();
        let i = slots
            .iter()
            .position(|s| s.entry.name == name)
            .ok_or_else(|| not_found(name))?;
        let s = slots.remove(i);
        if s.entry.table_offset.0 != 0 {
            self.bitmaps
                .dropped
                .lock()
                .push((s.entry.table_offset, s.entry.table_size));
        }
        self.bitmaps.live.store(true, Relaxed);
        self.bitmaps.retrack(&slots);
        Ok(())
    }

    /// Clears every bit of a bitmap.
    pub async fn bitmap_clear(&self, name: &str) -> Result<()> {
        self.change_bitmap(name, |s| {
            if s.inconsistent {
                return Err(inconsistent(name));
            }
            if let Some(b) = &s.bits {
                b.clear();
                b.set_changed();
            }
            Ok(())
        })
        .await
    }

    /// Enables (tracks writes) or disables a bitmap.
    pub async fn bitmap_set_enabled(&self, name: &str, enabled: bool) -> Result<()> {
        self.change_bitmap(name, |s| {
            if s.inconsistent {
                return Err(inconsistent(name));
            }
            s.enabled = enabled;
            Ok(())
        })
        .await
    }

    /// Sets in bitmap `name` every bit set in `source` (granularities may differ, sizes not).
    pub async fn bitmap_merge(&self, name: &str, source: &DirtyBitmap) -> Result<()> {
        self.change_bitmap(name, |s| {
            if s.inconsistent {
                return Err(inconsistent(name));
            }
            if let Some(b) = &s.bits {
                if b.size() != source.size() {
                    return Err(Error::arg(format!(
                        "Bitmaps are of different sizes (destination size is {}, source size is {}) and can't be merged",
                        b.size(),
                        source.size()
                    )));
                }
                b.merge_from(source);
            }
            Ok(())
        })
        .await
    }

    /// Whether the image has bitmaps (applying a snapshot is then refused, as QEMU refuses
    /// it: no write would record the change of content).
    pub fn has_bitmaps(&self) -> bool {
        !self.bitmaps.slots.lock().is_empty()
    }

    /// Refuses a resize when a bitmap could not follow it (QEMU's rule: every bitmap must be
    /// loaded and consistent).
    pub(crate) fn check_bitmaps_resizable(&self, new_size: u64) -> Result<()> {
        let slots = self.bitmaps.slots.lock();
        if !slots.is_empty() && new_size == 0 {
            return Err(Error::arg(
                "A disk of size 0 cannot have persistent bitmaps",
            ));
        }
        let cs = self.geo.cluster_size();
        let mut total = 0;
        for s in slots.iter() {
            let phys = bitmap::table_entries(new_size, s.entry.granularity_bits, self.geo) * cs;
            if phys > bitmap::MAX_PHYS_BYTES {
                return Err(Error::arg(format!(
                    "Bitmap '{}' would be too large for the new size (granularity {})",
                    s.entry.name,
                    1u64 << s.entry.granularity_bits
                )));
            }
            total += phys;
        }
        if total > MAX_LOADED_BYTES {
            return Err(Error::arg(format!(
                "The image's bitmaps would need more than {} MiB of memory at the new size",
                MAX_LOADED_BYTES >> 20
            )));
        }
        for s in slots.iter() {
            if s.inconsistent {
                return Err(inconsistent(&s.entry.name));
            }
            if s.bits.is_none() {
                return Err(Error::unsupported(
                    "Cannot resize qcow2 with persistent bitmaps that were not loaded into memory",
                ));
            }
        }
        Ok(())
    }

    /// The loaded bitmaps, to be put back by [`Qcow2::restore_bitmaps`] if a shrink fails.
    pub(crate) fn saved_bitmaps(&self) -> Vec<Option<Arc<DirtyBitmap>>> {
        self.bitmaps
            .slots
            .lock()
            .iter()
            .map(|s| s.bits.clone())
            .collect()
    }

    /// Puts back bitmaps saved before a failed shrink, with every bit set since (in the
    /// resized copies) merged in. Call with the resize lock held exclusively.
    pub(crate) fn restore_bitmaps(&self, saved: Vec<Option<Arc<DirtyBitmap>>>) {
        let mut slots = self.bitmaps.slots.lock();
        for (s, old) in slots.iter_mut().zip(saved) {
            if let (Some(old), Some(now)) = (old, &s.bits) {
                old.merge_from(now);
                old.set_changed();
                s.bits = Some(old);
            }
        }
        self.bitmaps.retrack(&slots);
    }

    /// Resizes the loaded bitmaps to the new disk size. Call with the resize lock held
    /// exclusively (no write can mark the old bitmaps meanwhile).
    pub(crate) fn resize_bitmaps(&self, size: u64) {
        let mut slots = self.bitmaps.slots.lock();
        for s in slots.iter_mut() {
            if let Some(b) = &s.bits {
                if b.size() != size {
                    s.bits = Some(Arc::new(b.resized(size)));
                    s.dirty = true;
                }
            }
        }
        self.bitmaps.retrack(&slots);
    }
}
