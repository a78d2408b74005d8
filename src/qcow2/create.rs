//! Image creation, with metadata preallocation (seed 001).
//!
//! The whole layout is computed up front: header, refcount table, refcount blocks, L1 table,
//! then (preallocated) L2 tables and data clusters, each region contiguous. The tables are
//! generated in memory chunk by chunk and written as large sequential writes, concurrently, so a
//! 1 TiB `preallocation=metadata` image (128 MiB of L2 tables, 32 MiB of refcounts) takes a few
//! seconds, not minutes. The data region is contiguous: guest cluster N lives at a fixed host
//! offset, which keeps the image unfragmented.
//!
//! Every region is written before the header that makes it reachable, and the file is synced
//! before the header is written, so an interrupted create never leaves a valid-looking image
//! with garbage tables.

use crate::buf::IoBuf;
use crate::error::{Error, IoContext, Result};
use crate::format::header::{self, compat, incompat, CompressionType, Extension, Header};
use crate::format::table::COPIED;
use crate::format::{be, RefcountWidth};
use crate::storage::StorageRef;
use crate::units::{Geometry, HostOffset};
use futures_util::future::try_join_all;

/// Preallocation modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Preallocation {
    #[default]
    Off,
    /// Every cluster mapped; the file is sparse up to its full length.
    Metadata,
    /// Metadata, and the data space reserved with fallocate.
    Falloc,
    /// Metadata, and zeros written to the data space.
    Full,
}

impl Preallocation {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "off" => Ok(Preallocation::Off),
            "metadata" => Ok(Preallocation::Metadata),
            "falloc" => Ok(Preallocation::Falloc),
            "full" => Ok(Preallocation::Full),
            other => Err(Error::arg(format!(
                "Parameter 'preallocation' does not accept value '{other}'"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Preallocation::Off => "off",
            Preallocation::Metadata => "metadata",
            Preallocation::Falloc => "falloc",
            Preallocation::Full => "full",
        }
    }
}

/// Parameters of a new qcow2 image.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    pub size: u64,
    pub cluster_size: u64,
    /// 2 (compat=0.10) or 3 (compat=1.1).
    pub version: u32,
    pub refcount_bits: u32,
    pub lazy_refcounts: bool,
    pub compression: CompressionType,
    pub preallocation: Preallocation,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    /// Extended L2 entries (32 subclusters per cluster).
    pub extended_l2: bool,
    /// The external data file's name, as stored in the header (guest data then lives there:
    /// see `data_file`). [`create_with_data_file`] needs the file itself.
    pub data_file: Option<String>,
    /// Keep the data file a valid raw image (`data_file_raw`): implies metadata preallocation.
    pub data_file_raw: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_size: 65536,
            version: 3,
            refcount_bits: 16,
            lazy_refcounts: false,
            compression: CompressionType::Deflate,
            preallocation: Preallocation::Off,
            backing_file: None,
            backing_format: None,
            extended_l2: false,
            data_file: None,
            data_file_raw: false,
        }
    }
}

impl CreateOptions {
    /// Checks the combination of options (QEMU's rules and messages).
    pub fn validate(&self) -> Result<()> {
        let cs = self.cluster_size;
        if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
            return Err(Error::arg(
                "Cluster size must be a power of two between 512 and 2048k",
            ));
        }
        if !self.refcount_bits.is_power_of_two() || self.refcount_bits > 64 {
            return Err(Error::arg(
                "Refcount width must be a power of two and may not exceed 64 bits",
            ));
        }
        if self.version < 3 {
            if self.refcount_bits != 16 {
                return Err(Error::arg(
                    "Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
                ));
            }
            if self.lazy_refcounts {
                return Err(Error::arg(
                    "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
                ));
            }
            if self.compression != CompressionType::Deflate {
                return Err(Error::arg(
                    "Non-zlib compression type is only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
                ));
            }
        }
        if self.extended_l2 {
            if self.version < 3 {
                return Err(Error::arg(
                    "Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)",
                ));
            }
            if cs < 16384 {
                return Err(Error::arg(
                    "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
                ));
            }
        }
        if self.data_file_raw && self.data_file.is_none() {
            return Err(Error::arg("data-file-raw requires data-file"));
        }
        if self.data_file_raw && self.backing_file.is_some() {
            return Err(Error::arg(
                "Backing file and data-file-raw cannot be used at the same time",
            ));
        }
        if self.data_file.is_some() && self.version < 3 {
            return Err(Error::arg(
                "External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)",
            ));
        }
        if self.size % 512 != 0 {
            return Err(Error::arg("Image size must be a multiple of 512 bytes"));
        }
        if self.backing_file.is_some()
            && self.preallocation != Preallocation::Off
            && !self.extended_l2
        {
            return Err(Error::arg(
                "Backing file and preallocation can only be used at the same time if extended_l2 is on",
            ));
        }
        if self.backing_file.is_some() && self.backing_format.is_none() {
            return Err(Error::arg("Backing file specified without backing format"));
        }
        let g = Geometry::with_l2(cs.trailing_zeros(), self.extended_l2);
        if g.l1_entries_for(self.size) * 8 > header::MAX_L1_BYTES {
            // qemu-img's words (its L1 table may not exceed 32 MiB either).
            return Err(Error::arg(
                "The image size is too large for file format 'qcow2' (try using a larger cluster size)",
            ));
        }
        Ok(())
    }
}

/// Where each region of a new image starts, in clusters.
#[derive(Debug, Clone, Copy)]
struct Layout {
    reftable: u64,
    reftable_clusters: u64,
    refblocks: u64,
    refblock_count: u64,
    l1: u64,
    l1_clusters: u64,
    l2: u64,
    l2_count: u64,
    data: u64,
    data_clusters: u64,
    /// Clusters in use (all regions).
    total: u64,
}

/// `prealloc`: every L2 table is allocated; with data clusters too unless the data lives in
/// an external data file (`g.external_data`).
fn layout(g: Geometry, width: RefcountWidth, size: u64, prealloc: bool) -> Layout {
    let cs = g.cluster_size();
    let l1_entries = g.l1_entries_for(size);
    // An empty disk has an empty L1 table: nothing allocated for it (as QEMU does).
    let l1_clusters = (l1_entries * 8).div_ceil(cs);
    let guest_clusters = g.clusters_for(size);
    let (l2_count, data_clusters) = match (prealloc, g.external_data) {
        (false, _) => (0, 0),
        (true, false) => (l1_entries, guest_clusters),
        (true, true) => (l1_entries, 0),
    };
    let epb = width.entries_per_block(g.cluster_bits);
    let fixed = 1 + l1_clusters + l2_count + data_clusters;
    // Refcount blocks and the table count themselves: iterate to the fixed point.
    let (mut rb, mut rt) = (1u64, 1u64);
    loop {
        let total = fixed + rb + rt;
        let nrb = total.div_ceil(epb);
        let nrt = (nrb * 8).div_ceil(cs);
        if nrb == rb && nrt == rt {
            break;
        }
        rb = nrb.max(rb);
        rt = nrt.max(rt);
    }
    let reftable = 1;
    let refblocks = reftable + rt;
    let l1 = refblocks + rb;
    let l2 = l1 + l1_clusters;
    let data = l2 + l2_count;
    Layout {
        reftable,
        reftable_clusters: rt,
        refblocks,
        refblock_count: rb,
        l1,
        l1_clusters,
        l2,
        l2_count,
        data,
        data_clusters,
        total: data + data_clusters,
    }
}

/// The header of a new image.
fn new_header(o: &CreateOptions, g: Geometry, l: &Layout) -> Header {
    let mut extensions = Vec::new();
    if let Some(f) = &o.backing_format {
        extensions.push(Extension::BackingFormat(f.clone()));
    }
    if let Some(f) = &o.data_file {
        extensions.push(Extension::DataFile(f.clone()));
    }
    if o.version >= 3 {
        extensions.push(Extension::FeatureTable(Header::default_feature_table()));
    }
    let mut incompatible = 0;
    if o.compression != CompressionType::Deflate {
        incompatible |= incompat::COMPRESSION;
    }
    if o.extended_l2 {
        incompatible |= incompat::EXTL2;
    }
    if o.data_file.is_some() {
        incompatible |= incompat::DATA_FILE;
    }
    Header {
        version: o.version,
        cluster_bits: g.cluster_bits,
        size: o.size,
        crypt_method: 0,
        l1_size: g.l1_entries_for(o.size) as u32,
        l1_table_offset: g.host_offset(crate::units::HostCluster(l.l1)),
        refcount_table_offset: g.host_offset(crate::units::HostCluster(l.reftable)),
        refcount_table_clusters: l.reftable_clusters as u32,
        nb_snapshots: 0,
        snapshots_offset: HostOffset(0),
        incompatible_features: incompatible,
        compatible_features: if o.lazy_refcounts {
            compat::LAZY_REFCOUNTS
        } else {
            0
        },
        autoclear_features: if o.data_file_raw {
            header::autoclear::DATA_FILE_RAW
        } else {
            0
        },
        refcount_order: o.refcount_bits.trailing_zeros(),
        header_length: if o.version >= 3 {
            header::V3_HEADER_LEN
        } else {
            header::V2_HEADER_LEN
        },
        compression_type: o.compression,
        unknown_fields: if o.version >= 3 {
            vec![0; 7]
        } else {
            Vec::new()
        },
        extensions,
        backing_file: o.backing_file.clone(),
    }
}

/// Chunk size of the generated table writes.
const CHUNK: u64 = 8 << 20;

/// Creates a qcow2 image on `storage` (which should be empty).
pub async fn create(storage: StorageRef, o: &CreateOptions) -> Result<()> {
    create_with_data_file(storage, None, o).await
}

/// Creates a qcow2 image on `storage`, with its guest data in `data` when `o.data_file` names
/// an external data file (`data` is then sized, and preallocated as asked).
pub async fn create_with_data_file(
    storage: StorageRef,
    data: Option<StorageRef>,
    o: &CreateOptions,
) -> Result<()> {
    o.validate()?;
    let data = match (&o.data_file, data) {
        (Some(_), Some(d)) => Some(d),
        (None, None) => None,
        _ => {
            return Err(Error::arg(
                "An external data file needs both its name and the file itself",
            ))
        }
    };
    let g = Geometry::with_l2(o.cluster_size.trailing_zeros(), o.extended_l2)
        .with_external_data(data.is_some());
    let cs = g.cluster_size();
    let width = RefcountWidth::new(o.refcount_bits.trailing_zeros());
    // A raw data file is mapped 1:1 from the start (QEMU forces metadata preallocation).
    let mode = match o.preallocation {
        Preallocation::Off if o.data_file_raw => Preallocation::Metadata,
        m => m,
    };
    let prealloc = mode != Preallocation::Off;
    let l = layout(g, width, o.size, prealloc);
    let h = new_header(o, g, &l);
    let header_bytes = h.encode()?;

    storage
        .set_len(0)
        .await
        .context(|| "truncating the new image".to_string())?;

    // Refcount table: one entry per refcount block.
    let mut rt = vec![0u8; (l.reftable_clusters * cs) as usize];
    for i in 0..l.refblock_count {
        be::put_u64(&mut rt, (i * 8) as usize, (l.refblocks + i) * cs);
    }
    write_all(&storage, l.reftable * cs, IoBuf::copy_from(&rt)).await?;

    // Refcount blocks: every cluster in [0, total) has refcount 1.
    let epb = width.entries_per_block(g.cluster_bits);
    write_generated(
        &storage,
        l.refblocks * cs,
        l.refblock_count * cs,
        |chunk_off, buf| {
            let first_block = (chunk_off - l.refblocks * cs) / cs;
            for (bi, block) in buf.chunks_mut(cs as usize).enumerate() {
                let base = (first_block + bi as u64) * epb;
                let used = l.total.saturating_sub(base).min(epb);
                fill_refcounts(width, block, used as usize);
            }
        },
    )
    .await?;

    // L1 table (its exact size, as QEMU writes it).
    if l.l1_clusters > 0 {
        let l1_len = u64::from(h.l1_size) * 8;
        let mut l1 = vec![0u8; l1_len as usize];
        if prealloc {
            for i in 0..l.l2_count {
                be::put_u64(&mut l1, (i * 8) as usize, ((l.l2 + i) * cs) | COPIED);
            }
        }
        write_all(&storage, l.l1 * cs, IoBuf::copy_from(&l1)).await?;
    }

    // L2 tables: guest cluster c maps to data cluster `data + c`. With subclusters, none is
    // allocated (an empty bitmap): the cluster is reserved and reads as before (QEMU's way,
    // which is what lets preallocation go with a backing file).
    if prealloc {
        let guest_clusters = g.clusters_for(o.size);
        // In the image: guest cluster c at data cluster `data + c`; in a data file: at c.
        let base = if data.is_some() { 0 } else { l.data };
        let es = g.l2_entry_size();
        write_generated(&storage, l.l2 * cs, l.l2_count * cs, |chunk_off, buf| {
            let first_entry = (chunk_off - l.l2 * cs) / es;
            for (k, e) in buf.chunks_exact_mut(es as usize).enumerate() {
                let c = first_entry + k as u64;
                if c < guest_clusters {
                    e[..8].copy_from_slice(&(((base + c) * cs) | COPIED).to_be_bytes());
                }
            }
        })
        .await?;
    }

    if let Some(d) = &data {
        size_data_file(d, mode, o.size, g).await?;
        d.flush()
            .await
            .context(|| "flushing the new data file".to_string())?;
        if prealloc {
            storage
                .set_len(l.total * cs)
                .await
                .context(|| "extending the new image".to_string())?;
        }
    } else if prealloc {
        let data_start = l.data * cs;
        let data_len = l.data_clusters * cs;
        match o.preallocation {
            Preallocation::Falloc => {
                if let Err(e) = storage.allocate(data_start, data_len).await {
                    return Err(Error::io("Could not preallocate data for the new file", e));
                }
            }
            Preallocation::Full => write_zeros(&storage, data_start, data_len).await?,
            _ => {}
        }
        storage
            .set_len(l.total * cs)
            .await
            .context(|| "extending the new image".to_string())?;
    }

    // Everything the header points to is durable before the header is written.
    storage
        .flush()
        .await
        .context(|| "flushing the new image".to_string())?;
    let mut hb = header_bytes;
    hb.resize(hb.len().next_multiple_of(512), 0);
    storage
        .write_at(IoBuf::copy_from(&hb), 0)
        .await
        .context(|| "writing the qcow2 header".to_string())?;
    storage
        .flush()
        .await
        .context(|| "flushing the new image".to_string())?;
    Ok(())
}

/// Gives a new external data file its size: the virtual size, or with preallocation the
/// whole last cluster, allocated (`falloc`) or written (`full`) as asked.
async fn size_data_file(d: &StorageRef, mode: Preallocation, size: u64, g: Geometry) -> Result<()> {
    let ctx = |e| Error::io("Could not resize the data file", e);
    // QEMU's preallocation reaches the end of the last allocation unit (cluster, or
    // subcluster with extended L2 entries).
    let end = match mode {
        Preallocation::Off => size,
        _ => size.next_multiple_of(g.subcluster_size()),
    };
    d.set_len(0).await.map_err(ctx)?;
    match mode {
        Preallocation::Falloc if end > 0 => {
            if let Err(e) = d.allocate(0, end).await {
                return Err(Error::io("Could not preallocate data for the new file", e));
            }
        }
        Preallocation::Full => write_zeros(d, 0, end).await?,
        _ => {}
    }
    d.set_len(end).await.map_err(ctx)
}

async fn write_all(storage: &StorageRef, off: u64, buf: IoBuf) -> Result<()> {
    storage
        .write_at(buf, off)
        .await
        .context(|| format!("writing image metadata at {off:#x}"))
}

/// Writes `[start, start+len)` in chunks filled by `fill(chunk_offset, buf)`, a few chunks in
/// flight at a time: large sequential writes with bounded memory.
async fn write_generated(
    storage: &StorageRef,
    start: u64,
    len: u64,
    fill: impl Fn(u64, &mut [u8]),
) -> Result<()> {
    const IN_FLIGHT: u64 = 4;
    let mut off = start;
    while off < start + len {
        let mut batch = Vec::new();
        while off < start + len && (batch.len() as u64) < IN_FLIGHT {
            let n = CHUNK.min(start + len - off);
            let mut buf = crate::buf::IoBufMut::zeroed(n as usize);
            fill(off, &mut buf);
            batch.push((off, buf.freeze()));
            off += n;
        }
        try_join_all(batch.into_iter().map(|(o, b)| write_all(storage, o, b))).await?;
    }
    Ok(())
}

/// Sets the first `used` entries of a refcount block to 1.
fn fill_refcounts(width: RefcountWidth, block: &mut [u8], used: usize) {
    match width.bits() {
        // Fast paths for whole-byte widths: the pattern of a refcount of 1.
        8 => block[..used].fill(1),
        16 => block[..used * 2]
            .chunks_exact_mut(2)
            .for_each(|e| e.copy_from_slice(&[0, 1])),
        _ => {
            for i in 0..used {
                // Cannot fail: 1 fits every width.
                let _ = width.set(block, i, 1);
            }
        }
    }
}

pub(crate) async fn write_zeros(storage: &StorageRef, start: u64, len: u64) -> Result<()> {
    let zeros = IoBuf::zeroed(CHUNK as usize);
    let mut off = start;
    while off < start + len {
        let n = CHUNK.min(start + len - off);
        storage
            .write_at(zeros.slice(0..n as usize), off)
            .await
            .context(|| format!("writing zeros at {off:#x}"))?;
        off += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_covers_itself() {
        for bits in [9u32, 12, 16, 21] {
            for order in 0..=6 {
                for size in [0u64, 1 << 20, 1 << 30, 100 << 30] {
                    let g = Geometry::new(bits);
                    if g.l1_entries_for(size) * 8 > header::MAX_L1_BYTES {
                        continue;
                    }
                    let w = RefcountWidth::new(order);
                    for prealloc in [false, true] {
                        if prealloc && size > (1 << 30) && bits < 12 {
                            continue;
                        }
                        let l = layout(g, w, size, prealloc);
                        let epb = w.entries_per_block(bits);
                        assert!(l.refblock_count * epb >= l.total, "{bits} {order} {size}");
                        assert!(l.reftable_clusters * g.cluster_size() / 8 >= l.refblock_count);
                    }
                }
            }
        }
    }

    #[test]
    fn layout_matches_qemu_for_default_image() {
        let l = layout(Geometry::new(16), RefcountWidth::new(4), 1 << 30, false);
        assert_eq!((l.reftable, l.refblocks, l.l1), (1, 2, 3));
    }

    #[test]
    fn option_rules() {
        let ok = CreateOptions {
            size: 1 << 30,
            ..Default::default()
        };
        assert!(ok.validate().is_ok());
        let bad = |f: &dyn Fn(&mut CreateOptions)| {
            let mut o = ok.clone();
            f(&mut o);
            o.validate().unwrap_err().to_string()
        };
        assert!(bad(&|o| o.cluster_size = 1000).contains("power of two"));
        assert!(bad(&|o| o.refcount_bits = 3).contains("Refcount width"));
        assert!(bad(&|o| {
            o.version = 2;
            o.lazy_refcounts = true
        })
        .contains("Lazy refcounts"));
        assert!(bad(&|o| o.size = 1000).contains("multiple of 512"));
        assert!(bad(&|o| {
            o.backing_file = Some("b".into());
            o.backing_format = Some("raw".into());
            o.preallocation = Preallocation::Metadata;
        })
        .contains("preallocation"));
        assert!(bad(&|o| o.backing_file = Some("b".into())).contains("without backing format"));
    }
}
