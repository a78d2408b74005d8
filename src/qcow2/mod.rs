//! The qcow2 driver.
//!
//! Layout of this module (one concern per file, as in QEMU's `block/qcow2*.c`):
//! - `mod.rs`: the [`Qcow2`] handle, runtime options, open and the `BlockDevice` glue;
//! - `barrier`, `cache`, `l1`: durability generations and the ordered metadata cache;
//! - `refcount`: refcounts, the allocator and deferred frees;
//! - `inflight`: claims that serialize overlapping metadata changes, and I/O epochs that keep
//!   freed clusters from being reused under an in-flight request;
//! - `mapping`, `read`, `write`, `zero`, `flush`: the request paths;
//! - `overlap`: where metadata lives, so that no write lands on it;
//! - `create`, `check`, `repair`: whole-image operations.
//!
//! Concurrency: the handle is `Send + Sync` and every request is an `async fn` taking `&self`;
//! many run at once. No lock is held across I/O except the allocator's (metadata I/O only) and
//! per-table writeback serialization. See `docs/ARCHITECTURE.md` for the invariants.

pub mod amend;
mod backing_file;
mod barrier;
mod bitmaps;
pub mod cache;
pub mod check;
mod cleaner;
mod compress;
pub mod create;
pub mod data_file;
mod flush;
mod frees;
mod header_store;
mod inflight;
mod l1;
mod l2view;
mod mapping;
pub mod overlap;
mod read;
pub mod refcount;
mod repair;
mod resize;
mod seqcache;
pub mod snapshot;
mod snapshot_refs;
mod subcluster;
mod vm_state;
mod write;
mod zero;

use crate::block::{BlockDevice, BlockStatus, CacheMode, Format, ZeroFlags};
use crate::buf::{IoBuf, IoBufMut};
use crate::error::{Error, IoContext, Result};
use crate::format::header::{self, incompat, Header};
use crate::format::snapshot::{self as snapshot_format, Snapshot};
use crate::format::{be, CompressionType, RefcountWidth};
use crate::storage::{IoFuture, StorageRef};
use crate::units::{Geometry, HostOffset};
use barrier::{Barrier, Unwritable};
use cache::{MetaCache, Writer};
use header_store::HeaderStore;
use inflight::{Claims, IoEpochs};
use l1::L1Table;
use parking_lot::Mutex;
use refcount::{RefTable, Refcounts};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

pub use bitmaps::BitmapInfo;
pub use check::{CheckReport, Fix};
pub use create::{create, create_with_data_file, CreateOptions, Preallocation};

/// QEMU's upper bound for the default L2 cache (Linux).
const DEFAULT_L2_CACHE_MAX: u64 = 32 << 20;
const MIN_L2_CACHE_CLUSTERS: u64 = 2;
const MIN_REFCOUNT_CACHE_CLUSTERS: u64 = 4;
const DEFAULT_REFCOUNT_CACHE_MIN: u64 = 256 << 10;
/// QEMU's default `cache-clean-interval` (seconds).
pub const DEFAULT_CACHE_CLEAN_INTERVAL: u64 = 600;

/// Runtime options (qemu's `-o` / blockdev options of the qcow2 driver).
#[derive(Clone, Debug, Default)]
pub struct Qcow2Options {
    /// Bytes of L2 cache. Default: enough for the whole disk, up to 32 MiB.
    pub l2_cache_size: Option<u64>,
    /// Bytes per L2 cache entry (a slice of an L2 table): 512 up to the cluster size.
    pub l2_cache_entry_size: Option<u64>,
    /// Bytes of refcount block cache.
    pub refcount_cache_size: Option<u64>,
    /// L2 + refcount cache, split as QEMU does.
    pub cache_size: Option<u64>,
    /// Seconds after which unused cache entries are dropped (0 disables).
    pub cache_clean_interval: Option<u64>,
    /// Punch holes in the file for clusters freed by guest discards (default on).
    pub pass_discard_request: Option<bool>,
    /// Compressed target: every write is stored compressed, small sequential writes are
    /// gathered into whole clusters first.
    pub compress: Option<bool>,
    /// QEMU's `overlap-check` options: which structures writes are checked against (default:
    /// `cached`, every structure but the snapshots' L2 tables).
    pub overlap: overlap::OverlapOptions,
    /// QEMU's `pass-discard-snapshot` (default on): clusters freed by deleting a snapshot are
    /// discarded in the file.
    pub pass_discard_snapshot: Option<bool>,
    /// QEMU's `pass-discard-other` (default off): clusters freed otherwise (copied on write,
    /// old tables) are discarded in the file too.
    pub pass_discard_other: Option<bool>,
    /// Opened to be checked (QEMU's `BDRV_O_CHECK`): a dirty image is not repaired by a
    /// read-write open, so that `check -r` sees and reports what the crash left, and marks
    /// the image clean itself once repaired (`mark_clean`).
    pub for_check: bool,
    /// The external data file, opened by the caller (`crate::block::open_image` opens the one
    /// the user or the image names, as the open policy allows). Required for an image with a
    /// data file, refused for one without.
    pub data_file: Option<data_file::DataFile>,
    /// Open an image with a data file without it (metadata-only uses such as `info`): guest
    /// data reads and writes fail.
    pub without_data_file: bool,
    /// QEMU's `lazy-refcounts` runtime option: use lazy refcounts in this session or not,
    /// whatever the header's compatible bit says (default: what it says).
    pub lazy_refcounts: Option<bool>,
}

impl Qcow2Options {
    /// Parses one `key=value` runtime option. Returns false for keys that are not ours.
    pub fn set(&mut self, key: &str, value: &str) -> Result<bool> {
        let size = || {
            crate::size::parse_size(value)
                .map_err(|_| Error::arg(format!("Parameter '{key}' expects a size")))
        };
        match key {
            "l2-cache-size" => self.l2_cache_size = Some(size()?),
            "l2-cache-entry-size" => self.l2_cache_entry_size = Some(size()?),
            "refcount-cache-size" => self.refcount_cache_size = Some(size()?),
            "cache-size" => self.cache_size = Some(size()?),
            "cache-clean-interval" => {
                // QEMU reads it as an unsigned number the C way: "-1" is the largest one.
                let n = match value.strip_prefix('-') {
                    Some(neg) => neg.parse::<u64>().map(|n| n.wrapping_neg()),
                    None => value.parse::<u64>(),
                }
                .map_err(|_| {
                    Error::arg("Parameter 'cache-clean-interval' expects a number of seconds")
                })?;
                if n > u64::from(u32::MAX) {
                    return Err(Error::arg("Cache clean interval too big"));
                }
                self.cache_clean_interval = Some(n)
            }
            "pass-discard-request" => {
                self.pass_discard_request = Some(crate::size::parse_bool(key, value)?)
            }
            "compress" => self.compress = Some(crate::size::parse_bool(key, value)?),
            "lazy-refcounts" => self.lazy_refcounts = Some(crate::size::parse_bool(key, value)?),
            "pass-discard-snapshot" => {
                self.pass_discard_snapshot = Some(crate::size::parse_bool(key, value)?)
            }
            "pass-discard-other" => {
                self.pass_discard_other = Some(crate::size::parse_bool(key, value)?)
            }
            _ => return self.overlap.set(key, value),
        }
        Ok(true)
    }

    /// Resolves the cache sizes for an image: `(l2 bytes, l2 entry bytes, refcount bytes)`.
    fn cache_sizes(&self, g: Geometry, disk_size: u64) -> Result<(u64, u64, u64)> {
        let cs = g.cluster_size();
        let entry = self.l2_cache_entry_size.unwrap_or(cs);
        if !entry.is_power_of_two() || !(512..=cs).contains(&entry) {
            return Err(Error::arg(format!(
                "L2 cache entry size must be a power of two between 512 and the cluster size ({cs})"
            )));
        }
        let whole_disk = g.clusters_for(disk_size).div_ceil(g.l2_entries()).max(1) * cs;
        let min_l2 = MIN_L2_CACHE_CLUSTERS * cs;
        let min_rc = MIN_REFCOUNT_CACHE_CLUSTERS * cs;
        let (l2, rc) = match (
            self.cache_size,
            self.l2_cache_size,
            self.refcount_cache_size,
        ) {
            // QEMU's rules and messages.
            (Some(_), Some(_), Some(_)) => return Err(Error::arg(
                "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time",
            )),
            (Some(total), Some(l2), None) if l2 > total => {
                return Err(Error::arg("l2-cache-size may not exceed cache-size"))
            }
            (Some(total), None, Some(rc)) if rc > total => {
                return Err(Error::arg("refcount-cache-size may not exceed cache-size"))
            }
            (Some(total), Some(l2), None) => (l2, total - l2),
            (Some(total), None, Some(rc)) => (total - rc, rc),
            (Some(total), None, None) => {
                let l2 = whole_disk.min(total.saturating_sub(min_rc));
                (l2, total.saturating_sub(l2))
            }
            (_, l2, rc) => (
                l2.unwrap_or_else(|| whole_disk.min(DEFAULT_L2_CACHE_MAX)),
                rc.unwrap_or(DEFAULT_REFCOUNT_CACHE_MIN),
            ),
        };
        let (l2, rc) = (l2.max(min_l2), rc.max(min_rc));
        // QEMU counts cache entries in an int.
        if l2 / entry > i32::MAX as u64 {
            return Err(Error::arg("L2 cache size too big"));
        }
        if rc / cs > i32::MAX as u64 {
            return Err(Error::arg("Refcount cache size too big"));
        }
        Ok((l2, entry, rc))
    }
}

/// Counters for `--stats` and tests.
#[derive(Clone, Copy, Debug, Default)]
pub struct EngineStats {
    pub metadata_reads: u64,
    pub metadata_writes: u64,
    pub flushes: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub clusters_allocated: u64,
}

/// An open qcow2 image.
pub struct Qcow2 {
    pub(crate) geo: Geometry,
    /// The header's version (changed by `amend`): read with [`Qcow2::version`].
    version: std::sync::atomic::AtomicU32,
    pub(crate) compression: CompressionType,
    pub(crate) w: Writer,
    pub(crate) hdr: HeaderStore,
    pub(crate) l1: L1Table,
    pub(crate) l2: MetaCache,
    /// Entries per L2 cache entry (slice).
    pub(crate) slice_entries: u64,
    pub(crate) rc: Refcounts,
    /// Where guest data lives: the image file itself, or the external data file (`data_file`).
    pub(crate) data: StorageRef,
    /// The external data file's name as opened.
    data_name: Option<String>,
    /// Claims on guest clusters whose L2 entries a request is changing.
    pub(crate) claims: Claims,
    /// Claims on L1 indices whose L2 table is being allocated or copied.
    pub(crate) l2_claims: Claims,
    pub(crate) epochs: IoEpochs,
    /// Serializes flushes (and with them grace periods and free application).
    pub(crate) flush_lock: tokio::sync::Mutex<()>,
    /// Taken shared by requests, exclusive by whole-table changes (L1 growth and shrinking,
    /// the size change of a resize).
    pub(crate) resize_lock: tokio::sync::RwLock<()>,
    /// Serializes whole resize operations (growth, shrinking).
    pub(crate) resize_op: tokio::sync::Mutex<()>,
    /// Serializes the switch to lazy refcounts (setting the dirty bit).
    lazy_lock: tokio::sync::Mutex<()>,
    /// The `lazy-refcounts` runtime option, overriding the header's bit.
    lazy_override: Option<bool>,
    /// Orders compressed cluster allocation by submission.
    pub(crate) tickets: compress::Tickets,
    pub(crate) backing: OnceLock<Arc<dyn BlockDevice>>,
    pub(crate) size: AtomicU64,
    pub(crate) read_only: bool,
    pub(crate) pass_discard: bool,
    /// Discard clusters freed by deleting a snapshot (`pass-discard-snapshot`).
    pub(crate) pass_discard_snapshot: bool,
    /// Discard clusters freed otherwise: copy on write, replaced tables (`pass-discard-other`).
    pub(crate) pass_discard_other: bool,
    /// The corrupt bit was written to the header in this session (see `signal_corruption`).
    corrupt_bit_written: AtomicBool,
    /// The snapshot table (replaced whole when a snapshot is taken or deleted).
    pub(crate) snapshots: parking_lot::RwLock<Arc<Vec<Snapshot>>>,
    /// The sequential write cache of a compressed target.
    pub(crate) seq: Option<seqcache::SeqCache>,
    filename: String,
    pub(crate) closed: AtomicBool,
    background: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Persistent dirty bitmaps (`bitmaps`).
    pub(crate) bitmaps: bitmaps::Bitmaps,
    /// What the repair of a dirty image at open found and did, in QEMU's words (QEMU prints
    /// them while opening; the command line prints them from here).
    repair_messages: Mutex<Vec<String>>,
}

impl Qcow2 {
    /// Announces a step of guest data I/O (`read_aio`, `write_aio`) to the storage below, for
    /// `blkdebug` (QEMU announces it on the image file; a raw data file's own driver announces
    /// it on the data file too).
    pub(crate) async fn data_event(&self, event: crate::storage::blkdebug::DebugEvent) {
        if let Some(suspended) = self.w.storage.debug_event(event) {
            suspended.await;
        }
        if self.geo.external_data {
            if let Some(suspended) = self.data.debug_event(event) {
                suspended.await;
            }
        }
    }

    /// The image's format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version.load(Relaxed)
    }

    pub(crate) fn set_version_field(&self, v: u32) {
        self.version.store(v, Relaxed);
    }

    /// Opens a qcow2 image on `storage`. Backing files are attached by the caller
    /// ([`Qcow2::set_backing`]); `crate::block::open_image` does both.
    pub async fn open(
        storage: StorageRef,
        filename: String,
        opts: &Qcow2Options,
        read_only: bool,
        cache: CacheMode,
    ) -> Result<Qcow2> {
        let file_len = storage
            .len()
            .await
            .context(|| format!("Could not get the size of '{filename}'"))?;
        let head = crate::storage::read_vec(&*storage, 0, 512)
            .await
            .context(|| format!("Could not read '{filename}'"))?;
        if head[0..4] != header::MAGIC {
            // QEMU's words; the caller says which file it was opening.
            return Err(Error::invalid("Image is not in qcow2 format"));
        }
        let cluster_bits = be::u32(&head, 20);
        if !(header::MIN_CLUSTER_BITS..=header::MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(Error::invalid(format!(
                "Unsupported cluster size: 2^{cluster_bits}"
            )));
        }
        let cluster = crate::storage::read_vec(&*storage, 0, 1 << cluster_bits)
            .await
            .context(|| format!("Could not read the header of '{filename}'"))?;
        let h = Header::decode(&cluster)?;
        Self::refuse_unsupported(&h)?;
        // A repairing check may open a corrupt image to write to it (as QEMU's check does).
        if !read_only && h.is_corrupt() && !opts.for_check {
            return Err(Error::invalid(
                "qcow2: Image is corrupt; cannot be opened read/write",
            ));
        }
        if opts.lazy_refcounts == Some(true) && h.version < 3 {
            return Err(Error::arg(
                "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level",
            ));
        }
        let g = h.geometry();
        let cs = g.cluster_size();
        let external = Self::data_file_for(&h, opts)?;
        let data = external.clone().unwrap_or_else(|| storage.clone());
        let barrier = Arc::new(Barrier::with_data_file(storage.clone(), external));
        let w = Writer {
            storage: storage.clone(),
            barrier,
            writethrough: cache.writethrough(),
            writes: AtomicU64::new(0),
            overlap: overlap::MetadataMap::new(opts.overlap.resolve()?, g.cluster_bits),
        };

        let l1_bytes = u64::from(h.l1_size) * 8;
        let l1_data = crate::storage::read_vec(&*storage, h.l1_table_offset.0, l1_bytes as usize)
            .await
            .context(|| format!("Could not read the L1 table of '{filename}'"))?;
        let l1 = L1Table::new(h.l1_table_offset, u64::from(h.l1_size), &l1_data, cs);

        let rt_bytes = u64::from(h.refcount_table_clusters) * cs;
        let rt_data =
            crate::storage::read_vec(&*storage, h.refcount_table_offset.0, rt_bytes as usize)
                .await
                .context(|| format!("Could not read the refcount table of '{filename}'"))?;
        let reftable = RefTable {
            offset: h.refcount_table_offset,
            clusters: h.refcount_table_clusters,
            entries: be::decode_u64_table(&rt_data),
        };

        let snapshots = read_snapshots(&*storage, &h).await?;
        let (l2_bytes, entry_bytes, rc_bytes) = opts.cache_sizes(g, h.size)?;
        let l2 = MetaCache::new(
            cache::L2_TABLE,
            entry_bytes as usize,
            (l2_bytes / entry_bytes) as usize,
        );
        let rc_cache = MetaCache::new("refcount block", cs as usize, (rc_bytes / cs) as usize);
        let rc = Refcounts::new(
            g,
            RefcountWidth::new(h.refcount_order),
            reftable,
            rc_cache,
            file_len,
        );

        let img = Qcow2 {
            geo: g,
            version: std::sync::atomic::AtomicU32::new(h.version),
            compression: h.compression_type,
            slice_entries: entry_bytes / g.l2_entry_size(),
            w,
            l1,
            l2,
            rc,
            data,
            data_name: opts.data_file.as_ref().map(|d| d.name.clone()),
            claims: Claims::default(),
            l2_claims: Claims::default(),
            epochs: IoEpochs::default(),
            flush_lock: tokio::sync::Mutex::new(()),
            resize_lock: tokio::sync::RwLock::new(()),
            resize_op: tokio::sync::Mutex::new(()),
            lazy_lock: tokio::sync::Mutex::new(()),
            lazy_override: opts.lazy_refcounts,
            tickets: compress::Tickets::default(),
            backing: OnceLock::new(),
            size: AtomicU64::new(h.size),
            read_only,
            pass_discard: opts.pass_discard_request.unwrap_or(true),
            pass_discard_snapshot: opts.pass_discard_snapshot.unwrap_or(true),
            pass_discard_other: opts.pass_discard_other.unwrap_or(false),
            snapshots: parking_lot::RwLock::new(Arc::new(snapshots)),
            seq: (opts.compress == Some(true) && !read_only)
                .then(|| seqcache::SeqCache::new(g.cluster_size())),
            filename,
            closed: AtomicBool::new(false),
            corrupt_bit_written: AtomicBool::new(false),
            background: Mutex::new(Vec::new()),
            repair_messages: Mutex::new(Vec::new()),
            bitmaps: bitmaps::Bitmaps::default(),
            hdr: HeaderStore::new(h),
        };

        if !read_only {
            img.map_metadata(&img.hdr.with(|h| h.clone()));
            if img.w.overlap.checks_inactive_l2() {
                if let Err(e) = img.map_snapshot_tables().await {
                    // Nothing was changed on disk: the handle goes away.
                    img.closed.store(true, Relaxed);
                    return Err(e);
                }
            }
            img.prepare_for_writing(opts.for_check).await?;
        }
        if opts.for_check {
            // A broken directory must not keep `check` from running: it reports it.
            if let Err(e) = img.open_bitmaps(false).await {
                tracing::debug!("{}: bitmaps not loaded: {e}", img.filename);
            }
        } else if let Err(e) = img.open_bitmaps(!read_only).await {
            // Nothing was changed on disk before the failure; the handle goes away.
            img.closed.store(true, Relaxed);
            return Err(e);
        }
        Ok(img)
    }

    /// Marks the L2 tables of every snapshot for the overlap checks that cover them (QEMU's
    /// `overlap-check=all`, `overlap-check.inactive-l2=on`). QEMU reads the snapshots' L1 tables
    /// on every write it checks; here they are read once. A snapshot L1 table that cannot be
    /// read fails the open: its L2 tables could not be protected.
    async fn map_snapshot_tables(&self) -> Result<()> {
        for sn in self.snapshots().iter() {
            self.mark_inactive_l2_tables(&self.read_snapshot_l1(sn).await?);
        }
        Ok(())
    }

    /// Marks the L2 tables an L1 table (a snapshot's) names as inactive L2 tables.
    pub(crate) fn mark_inactive_l2_tables(&self, l1: &[u64]) {
        for e in l1 {
            let off = e & crate::format::table::OFFSET_MASK;
            if off != 0 {
                self.w
                    .overlap
                    .mark_inactive_l2(off >> self.geo.cluster_bits);
            }
        }
    }

    /// Records where the metadata lives (`overlap`), from the tables already in memory.
    /// Clusters that two structures claim are logged and remembered as conflicts.
    fn map_metadata(&self, h: &Header) {
        use overlap::Fixed;
        let m = &self.w.overlap;
        let cs = self.geo.cluster_size();
        m.set_fixed(Fixed::MainHeader, 0, cs);
        m.set_fixed(
            Fixed::ActiveL1,
            h.l1_table_offset.0,
            u64::from(h.l1_size) * 8,
        );
        m.set_fixed(
            Fixed::RefcountTable,
            h.refcount_table_offset.0,
            u64::from(h.refcount_table_clusters) * cs,
        );
        if h.nb_snapshots > 0 {
            let snaps = self.snapshots();
            let table: u64 = snaps
                .iter()
                .map(|s| {
                    (40 + s.extra_data.len() + s.id.len() + s.name.len()).next_multiple_of(8) as u64
                })
                .sum();
            m.set_fixed(Fixed::SnapshotTable, h.snapshots_offset.0, table);
            for s in snaps.iter() {
                m.set_fixed(
                    Fixed::InactiveL1,
                    s.l1_table_offset.0,
                    u64::from(s.l1_size) * 8,
                );
            }
        }
        let mut clashes = 0u64;
        for e in self.l1.entries() {
            let off = e & crate::format::table::OFFSET_MASK;
            if off != 0 && !m.mark_table(off >> self.geo.cluster_bits, overlap::TableKind::L2) {
                clashes += 1;
            }
        }
        for e in self.rc.table().entries {
            let off = e & !refcount::REFTABLE_RESERVED;
            if off != 0
                && !m.mark_table(
                    off >> self.geo.cluster_bits,
                    overlap::TableKind::RefcountBlock,
                )
            {
                clashes += 1;
            }
        }
        if clashes > 0 {
            tracing::warn!(
                "{}: {clashes} metadata cluster(s) claimed by two structures; writes to them are refused",
                self.filename
            );
        }
    }

    fn refuse_unsupported(h: &Header) -> Result<()> {
        if h.crypt_method != 0 {
            return Err(Error::unsupported(
                "Encrypted qcow2 images (AES or LUKS) are not supported yet",
            ));
        }
        Ok(())
    }

    /// The storage of the external data file the image needs (`None`: data in the image file),
    /// with QEMU's checks and messages.
    fn data_file_for(h: &Header, opts: &Qcow2Options) -> Result<Option<StorageRef>> {
        match (&opts.data_file, h.has_data_file()) {
            (Some(d), true) => {
                if opts.compress == Some(true) {
                    return Err(Error::unsupported(
                        "Compression is not supported with an external data file",
                    ));
                }
                Ok(Some(d.storage.clone()))
            }
            (None, true) if opts.without_data_file => Ok(Some(Arc::new(data_file::NoDataFile))),
            (None, true) => Err(Error::invalid("'data-file' is required for this image")),
            (Some(_), false) => Err(Error::invalid(
                "'data-file' can only be set for images with an external data file",
            )),
            (None, false) if h.data_file_raw() && !opts.without_data_file => {
                Err(Error::invalid("data-file-raw requires a data file"))
            }
            (None, false) => Ok(None),
        }
    }

    /// Whether guest data lives in an external data file.
    pub fn has_data_file(&self) -> bool {
        self.geo.external_data
    }

    /// The storage holding guest data: the image file, or its external data file.
    pub fn data_storage(&self) -> &StorageRef {
        &self.data
    }

    /// Read-write open: clear autoclear bits we do not maintain, repair a dirty image (unless
    /// the image is opened to be checked).
    async fn prepare_for_writing(&self, for_check: bool) -> Result<()> {
        use crate::format::header::{autoclear, Extension};
        let h = self.hdr.get();
        // Bitmaps we maintain (`bitmaps`), and a raw external data file (`data_file`); any other
        // autoclear feature we do not: clearing the bit tells other programs its data can no
        // longer be trusted. A bitmaps extension whose bit a program lacking bitmap support
        // cleared is stale: it is dropped.
        let keep = autoclear::BITMAPS | autoclear::DATA_FILE_RAW;
        let stale_bitmaps = h.bitmaps().is_some() && h.autoclear_features & autoclear::BITMAPS == 0;
        if h.version >= 3 && (h.autoclear_features & !keep != 0 || stale_bitmaps) {
            self.hdr
                .update(&self.w, |h| {
                    h.autoclear_features &= keep;
                    if h.autoclear_features & autoclear::BITMAPS == 0 {
                        h.extensions.retain(|e| !matches!(e, Extension::Bitmaps(_)));
                    }
                })
                .await?;
            self.w.barrier.sync_now().await?;
        }
        if h.is_dirty() && !for_check {
            // QEMU's repair at open: a check that fixes errors and leaks (refcounts set right one
            // by one, or rebuilt where the structure is broken).
            tracing::info!("{}: image is dirty, repairing refcounts", self.filename);
            let report = match self.check_with(check::Fix::ALL).await {
                Ok(r) if r.check_errors == 0 => r,
                Ok(_) => {
                    return Err(Error::corrupt(
                        "Could not repair dirty image: the check could not complete",
                    ))
                }
                Err((_, Error::Io { context, source })) => {
                    return Err(Error::io(
                        format!("Could not repair dirty image: {context}"),
                        source,
                    ))
                }
                Err((_, e)) => return Err(e),
            };
            *self.repair_messages.lock() = report.messages;
            self.mark_clean().await?;
        }
        Ok(())
    }

    /// Takes the messages of the repair of a dirty image at open (empty if there was none).
    pub fn take_repair_messages(&self) -> Vec<String> {
        std::mem::take(&mut *self.repair_messages.lock())
    }

    /// Clears the dirty bit (after the refcounts were rebuilt, or found right), durably.
    pub async fn mark_clean(&self) -> Result<()> {
        self.clear_incompatible(incompat::DIRTY).await
    }

    /// Clears the corrupt bit once a repair left nothing to report (QEMU's
    /// `qcow2_mark_consistent`, after its check fixed the image).
    pub async fn mark_consistent(&self) -> Result<()> {
        self.clear_incompatible(incompat::CORRUPT).await
    }

    /// Clears incompatible feature `bit` (if set) after a flush, durably.
    async fn clear_incompatible(&self, bit: u64) -> Result<()> {
        if self.hdr.get().incompatible_features & bit == 0 {
            return Ok(());
        }
        self.flush().await?;
        self.hdr
            .update(&self.w, |h| h.incompatible_features &= !bit)
            .await?;
        self.w.barrier.sync_now().await
    }

    /// Starts the background tasks of an image shared in an `Arc`: the cache cleaner
    /// (`cache-clean-interval`) and, for a compressed target, the writeback of its cache.
    pub fn start_background(self: &Arc<Self>, interval_secs: Option<u64>) {
        if let Some(t) = self.start_seq_writeback() {
            self.background.lock().push(t);
        }
        if let Some(t) = self.start_free_scheduler() {
            self.background.lock().push(t);
        }
        self.start_cache_cleaner(interval_secs);
    }

    /// Starts the periodic cache cleaner (`cache-clean-interval`, see `cleaner`). Needs the
    /// image in an `Arc`; runs on its own thread, whatever the embedder's executor.
    pub fn start_cache_cleaner(self: &Arc<Self>, interval_secs: Option<u64>) {
        let secs = interval_secs.unwrap_or(DEFAULT_CACHE_CLEAN_INTERVAL);
        if secs == 0 {
            return;
        }
        cleaner::register(self, Duration::from_secs(secs));
    }

    pub fn set_backing(&self, b: Arc<dyn BlockDevice>) {
        let _ = self.backing.set(b);
    }

    pub fn backing_device(&self) -> Option<&Arc<dyn BlockDevice>> {
        self.backing.get()
    }

    pub fn header(&self) -> Header {
        self.hdr.get()
    }

    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    pub fn cluster_size(&self) -> u64 {
        self.geo.cluster_size()
    }

    pub fn virtual_size(&self) -> u64 {
        self.size.load(Relaxed)
    }

    pub fn backing_filename(&self) -> Option<String> {
        self.hdr.with(|h| h.backing_file.clone())
    }

    pub fn backing_format(&self) -> Option<String> {
        self.hdr.with(|h| h.backing_format().map(str::to_string))
    }

    /// The internal snapshots, as the table is now.
    pub fn snapshots(&self) -> Arc<Vec<Snapshot>> {
        self.snapshots.read().clone()
    }

    pub fn storage(&self) -> &StorageRef {
        &self.w.storage
    }

    pub fn stats(&self) -> EngineStats {
        EngineStats {
            metadata_reads: self.l2.stats.misses.load() + self.rc.cache.stats.misses.load(),
            metadata_writes: self.w.writes.load(Relaxed),
            flushes: self.w.barrier.count.load(Relaxed),
            cache_hits: self.l2.stats.hits.load() + self.rc.cache.stats.hits.load(),
            cache_misses: self.l2.stats.misses.load() + self.rc.cache.stats.misses.load(),
            clusters_allocated: self.rc.allocated.load(Relaxed),
        }
    }

    /// Fails if the image may not be written.
    /// Refuses requests on a closed handle (its locks are gone: another program may own the
    /// image by now).
    #[inline]
    pub(crate) fn check_open(&self) -> Result<()> {
        if self.closed.load(Relaxed) {
            return Err(Error::io(
                format!(
                    "'{}' was closed; it accepts no more requests",
                    self.filename
                ),
                std::io::Error::from_raw_os_error(9), // EBADF
            ));
        }
        Ok(())
    }

    pub(crate) fn check_writable(&self) -> Result<()> {
        self.check_open()?;
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        // One relaxed load for both reasons (corruption, a failed flush): see `barrier`.
        match self.w.barrier.writable() {
            Ok(()) => Ok(()),
            Err(Unwritable::Corrupt) => Err(Error::corrupt(
                "the image was marked corrupt; writes are refused (run 'qemu-img check -r all')",
            )),
            Err(Unwritable::SyncFailed) => Err(Error::sync_failed()),
        }
    }

    /// Reacts to corrupt metadata found while serving a request: on a writable image, set the
    /// corrupt bit (as QEMU does) so that no program keeps writing to it; always return the error.
    pub(crate) async fn signal_corruption(&self, e: Error) -> Error {
        if let Error::Corrupt(msg) = &e {
            if self.read_only {
                tracing::error!("{}: {msg}", self.filename);
                return e;
            }
            // The in-memory mark may have been set already where the corruption was met (a
            // metadata write refused deep in the cache): the message and header bit follow once.
            self.w.barrier.mark_corrupt();
            if !self.corrupt_bit_written.swap(true, Relaxed) {
                tracing::error!(
                    "qcow2: Marking image as corrupt: {msg}; further corruption events will be suppressed"
                );
                if !self.w.barrier.sync_failed() && self.version() >= 3 {
                    let _ = self
                        .hdr
                        .update(&self.w, |h| h.incompatible_features |= incompat::CORRUPT)
                        .await;
                    let _ = self.w.barrier.sync_now().await;
                }
            }
        }
        e
    }

    /// Passes a request's result through [`Qcow2::signal_corruption`] when it reports corrupt
    /// metadata (met anywhere below: the allocator, a refcount block, an overlap check).
    pub(crate) async fn corruption_checked<T>(&self, r: Result<T>) -> Result<T> {
        match r {
            Err(e @ Error::Corrupt(_)) => Err(self.signal_corruption(e).await),
            r => r,
        }
    }

    /// With lazy refcounts, the first allocation sets the dirty bit (durably): from then on
    /// pointers need not wait for refcounts, and a crash is repaired at the next open.
    pub(crate) async fn enable_lazy_refcounts_if_configured(&self) -> Result<()> {
        let configured = self
            .lazy_override
            .unwrap_or_else(|| self.hdr.with(|h| h.lazy_refcounts()));
        if self.rc.lazy.load(Relaxed) || !configured {
            return Ok(());
        }
        let _l = self.lazy_lock.lock().await;
        if self.rc.lazy.load(Relaxed) {
            return Ok(());
        }
        self.hdr
            .update(&self.w, |h| h.incompatible_features |= incompat::DIRTY)
            .await?;
        self.w.barrier.sync_now().await?;
        self.rc.lazy.store(true, Relaxed);
        Ok(())
    }

    /// Bytes per L2 slice (cache entry).
    pub(crate) fn slice_bytes(&self) -> u64 {
        self.slice_entries * self.geo.l2_entry_size()
    }

    /// Host offset of L2 slice `slice` of the table at `l2`.
    pub(crate) fn slice_offset(&self, l2: HostOffset, slice: u64) -> HostOffset {
        HostOffset(l2.0 + slice * self.slice_bytes())
    }

    /// Flushes everything and releases the image. Idempotent.
    pub async fn close(&self) -> Result<()> {
        if self.closed.load(Relaxed) {
            return Ok(());
        }
        if !self.read_only && self.w.barrier.writable().is_ok() {
            self.flush_seq_cache().await?;
        }
        if self.closed.swap(true, Relaxed) {
            return Ok(());
        }
        {
            // A background flush holds the flush lock while it applies frees it has taken off
            // the queue: aborting it there would lose them (leaked clusters). Stop the tasks
            // between flushes.
            let _f = self.flush_lock.lock().await;
            for t in self.background.lock().drain(..) {
                t.abort();
            }
        }
        // Requests that changed data hold the resize lock shared until their data is written
        // (and the bitmaps marked): wait for them. Those still waiting for it see the handle
        // closed once they get it.
        let _quiesced = self.resize_lock.write().await;
        let mut bitmaps = Ok(());
        if !self.read_only && !self.w.barrier.is_corrupt() {
            // Bitmaps that cannot be stored stay `in-use` on disk: inconsistent, never wrong;
            // the data is flushed all the same.
            bitmaps = self.store_bitmaps().await;
            if let Err(e) = &bitmaps {
                tracing::warn!(
                    "Lost persistent bitmaps during inactivation of node '{}': {e}",
                    self.filename
                );
            }
            // After a failed flush this fails: closing must not report durability it lacks.
            if let Err(e) = self.flush_for_close().await {
                return Err(match e {
                    e @ Error::Corrupt(_) => self.signal_corruption(e).await,
                    e => e,
                });
            }
        }
        if let Some(b) = self.backing.get() {
            b.close().await?;
        }
        // Closed means others may have the image now, even while this handle lives on.
        self.w.storage.release_locks();
        if self.has_data_file() {
            self.data.release_locks();
        }
        bitmaps
    }
}

/// A handle dropped without [`Qcow2::close`] cannot flush (that needs I/O, and drop cannot wait
/// for it): writes acknowledged since the last flush may be lost. Say so loudly.
impl Drop for Qcow2 {
    fn drop(&mut self) {
        if !self.read_only && !self.closed.load(Relaxed) {
            tracing::error!(
                "{}: image handle dropped without close(): writes since the last flush may be lost",
                self.filename
            );
        }
    }
}

async fn read_snapshots(
    storage: &dyn crate::storage::Storage,
    h: &Header,
) -> Result<Vec<Snapshot>> {
    if h.nb_snapshots == 0 {
        return Ok(Vec::new());
    }
    let mut want = 64 << 10;
    loop {
        let buf = crate::storage::read_vec(storage, h.snapshots_offset.0, want)
            .await
            .context(|| "Could not read the snapshot table".to_string())?;
        match snapshot_format::decode_table(&buf, h.nb_snapshots, h.geometry())? {
            snapshot_format::Decoded::Complete(s) => return Ok(s),
            snapshot_format::Decoded::NeedBytes(n) => {
                if n <= want {
                    return Err(Error::invalid("Snapshot table could not be decoded"));
                }
                want = n.next_multiple_of(64 << 10);
            }
        }
    }
}

impl BlockDevice for Qcow2 {
    fn format(&self) -> Format {
        Format::Qcow2
    }

    fn size(&self) -> u64 {
        self.virtual_size()
    }

    fn filename(&self) -> &str {
        &self.filename
    }

    fn data_filename(&self) -> &str {
        self.data_name.as_deref().unwrap_or(&self.filename)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read(&self, offset: u64, buf: IoBufMut) -> IoFuture<'_, Result<IoBufMut>> {
        Box::pin(self.read_at(offset, buf))
    }

    fn write(&self, offset: u64, data: IoBuf) -> IoFuture<'_, Result<()>> {
        Box::pin(self.write_at(offset, data))
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, Result<()>> {
        Box::pin(self.zero_range(offset, len, flags))
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, Result<()>> {
        Box::pin(self.discard_range(offset, len))
    }

    fn flush(&self) -> IoFuture<'_, Result<()>> {
        Box::pin(Qcow2::flush(self))
    }

    fn close(&self) -> IoFuture<'_, Result<()>> {
        Box::pin(Qcow2::close(self))
    }

    fn block_status(&self, offset: u64, max: u64) -> IoFuture<'_, Result<BlockStatus>> {
        Box::pin(self.status_at(offset, max))
    }

    fn backing(&self) -> Option<Arc<dyn BlockDevice>> {
        self.backing.get().cloned()
    }

    fn allocated_bytes(&self) -> Option<u64> {
        self.w.storage.allocated_bytes()
    }

    fn protocol(&self) -> &'static str {
        self.w.storage.protocol()
    }
    fn debug_handle(&self) -> Option<crate::storage::blkdebug::DebugHandle> {
        self.w.storage.debug_handle()
    }

    fn resize(&self, new_size: u64, prealloc: Preallocation) -> IoFuture<'_, Result<()>> {
        Box::pin(Qcow2::resize(self, new_size, prealloc))
    }

    fn as_qcow2(&self) -> Option<&Qcow2> {
        Some(self)
    }
}
