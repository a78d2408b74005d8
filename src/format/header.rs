//! The qcow2 header (cluster 0): fixed fields, feature bits, header extensions and the backing
//! file name.
//!
//! Decoding validates everything QEMU validates before it trusts a field (sizes, alignment,
//! overflow, its implementation caps) and returns an error naming the problem; it never panics on
//! any input. Unknown header fields (between the known ones and `header_length`) and unknown
//! header extensions are kept verbatim so that a header rewrite preserves them.

use crate::error::{Error, Result};
use crate::format::be;
use crate::units::{Geometry, HostOffset};

pub const MAGIC: [u8; 4] = *b"QFI\xfb";
/// Length of a version 2 header.
pub const V2_HEADER_LEN: u32 = 72;
/// Length of the version 3 header QEMU writes (fields through compression_type, padded).
pub const V3_HEADER_LEN: u32 = 112;
/// Minimum length of a version 3 header.
pub const V3_MIN_HEADER_LEN: u32 = 104;

pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;
/// QEMU's cap on the L1 table (bytes).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's cap on the refcount table (bytes).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
pub const MAX_SNAPSHOTS: u32 = 65536;
/// The fixed part of a snapshot table entry (what QEMU's bound on the table's offset counts).
const SNAPSHOT_HEADER_BYTES: u64 = 40;
pub const MAX_BACKING_NAME: u32 = 1023;
/// Largest host offset an L1/L2 entry can hold (bits 9..55).
pub const MAX_HOST_OFFSET: u64 = (1 << 56) - 1;

/// Incompatible feature bits.
pub mod incompat {
    pub const DIRTY: u64 = 1 << 0;
    pub const CORRUPT: u64 = 1 << 1;
    pub const DATA_FILE: u64 = 1 << 2;
    pub const COMPRESSION: u64 = 1 << 3;
    pub const EXTL2: u64 = 1 << 4;
    pub const KNOWN: u64 = DIRTY | CORRUPT | DATA_FILE | COMPRESSION | EXTL2;
}

/// Compatible feature bits.
pub mod compat {
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

/// Autoclear feature bits.
pub mod autoclear {
    pub const BITMAPS: u64 = 1 << 0;
    pub const DATA_FILE_RAW: u64 = 1 << 1;
}

/// Header extension magics.
pub mod ext {
    pub const END: u32 = 0;
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    pub const FEATURE_TABLE: u32 = 0x6803_f857;
    pub const BITMAPS: u32 = 0x2385_2875;
    pub const CRYPTO_HEADER: u32 = 0x0537_be77;
    pub const DATA_FILE: u32 = 0x4441_5441;
}

/// How compressed clusters are encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CompressionType {
    #[default]
    Deflate,
    Zstd,
}

impl CompressionType {
    pub fn from_byte(b: u8) -> Result<Self> {
        match b {
            0 => Ok(CompressionType::Deflate),
            1 => Ok(CompressionType::Zstd),
            other => Err(Error::unsupported(format!(
                "Unknown compression type '{other}'"
            ))),
        }
    }

    pub fn to_byte(self) -> u8 {
        match self {
            CompressionType::Deflate => 0,
            CompressionType::Zstd => 1,
        }
    }

    /// The name qemu-img uses.
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Deflate => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "zlib" => Some(CompressionType::Deflate),
            "zstd" => Some(CompressionType::Zstd),
            _ => None,
        }
    }
}

/// One entry of the feature name table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    pub bit: u8,
    pub name: String,
}

/// The bitmaps header extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BitmapsExtension {
    pub nb_bitmaps: u32,
    pub directory_size: u64,
    pub directory_offset: HostOffset,
}

/// A header extension.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Extension {
    BackingFormat(String),
    FeatureTable(Vec<FeatureName>),
    Bitmaps(BitmapsExtension),
    CryptoHeader {
        offset: HostOffset,
        length: u64,
    },
    DataFile(String),
    /// Anything else: kept verbatim.
    Unknown {
        magic: u32,
        data: Vec<u8>,
    },
}

impl Extension {
    fn magic(&self) -> u32 {
        match self {
            Extension::BackingFormat(_) => ext::BACKING_FORMAT,
            Extension::FeatureTable(_) => ext::FEATURE_TABLE,
            Extension::Bitmaps(_) => ext::BITMAPS,
            Extension::CryptoHeader { .. } => ext::CRYPTO_HEADER,
            Extension::DataFile(_) => ext::DATA_FILE,
            Extension::Unknown { magic, .. } => *magic,
        }
    }

    fn encode_data(&self) -> Vec<u8> {
        match self {
            Extension::BackingFormat(s) | Extension::DataFile(s) => s.as_bytes().to_vec(),
            Extension::FeatureTable(entries) => {
                let mut out = Vec::with_capacity(entries.len() * 48);
                for e in entries {
                    let mut rec = [0u8; 48];
                    rec[0] = e.kind;
                    rec[1] = e.bit;
                    let name = e.name.as_bytes();
                    let n = name.len().min(46);
                    rec[2..2 + n].copy_from_slice(&name[..n]);
                    out.extend_from_slice(&rec);
                }
                out
            }
            Extension::Bitmaps(b) => {
                let mut out = vec![0u8; 24];
                be::put_u32(&mut out, 0, b.nb_bitmaps);
                be::put_u64(&mut out, 8, b.directory_size);
                be::put_u64(&mut out, 16, b.directory_offset.0);
                out
            }
            Extension::CryptoHeader { offset, length } => {
                let mut out = vec![0u8; 16];
                be::put_u64(&mut out, 0, offset.0);
                be::put_u64(&mut out, 8, *length);
                out
            }
            Extension::Unknown { data, .. } => data.clone(),
        }
    }
}

/// The decoded header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: HostOffset,
    pub refcount_table_offset: HostOffset,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: HostOffset,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: CompressionType,
    /// Raw bytes of header fields this implementation does not know (offsets 105 up to
    /// `header_length`), preserved on rewrite.
    pub unknown_fields: Vec<u8>,
    pub extensions: Vec<Extension>,
    pub backing_file: Option<String>,
}

impl Header {
    pub fn geometry(&self) -> Geometry {
        Geometry::with_l2(
            self.cluster_bits,
            self.incompatible_features & incompat::EXTL2 != 0,
        )
        .with_external_data(self.has_data_file())
    }

    /// Guest data lives in an external data file (incompatible feature bit 2).
    pub fn has_data_file(&self) -> bool {
        self.incompatible_features & incompat::DATA_FILE != 0
    }

    /// The data file is kept a valid raw image (autoclear bit 1, `data_file_raw`).
    pub fn data_file_raw(&self) -> bool {
        self.autoclear_features & autoclear::DATA_FILE_RAW != 0
    }

    /// The external data file's name, as stored in the header extension.
    pub fn data_file_name(&self) -> Option<&str> {
        self.extensions.iter().find_map(|e| match e {
            Extension::DataFile(s) => Some(s.as_str()),
            _ => None,
        })
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    pub fn is_dirty(&self) -> bool {
        self.incompatible_features & incompat::DIRTY != 0
    }

    pub fn is_corrupt(&self) -> bool {
        self.incompatible_features & incompat::CORRUPT != 0
    }

    pub fn lazy_refcounts(&self) -> bool {
        self.compatible_features & compat::LAZY_REFCOUNTS != 0
    }

    pub fn backing_format(&self) -> Option<&str> {
        self.extensions.iter().rev().find_map(|e| match e {
            Extension::BackingFormat(s) => Some(s.as_str()),
            _ => None,
        })
    }

    pub fn bitmaps(&self) -> Option<BitmapsExtension> {
        self.extensions.iter().find_map(|e| match e {
            Extension::Bitmaps(b) => Some(*b),
            _ => None,
        })
    }

    /// The feature name table (the last one, when an image has several, as QEMU reads it).
    pub fn feature_table(&self) -> &[FeatureName] {
        self.extensions
            .iter()
            .rev()
            .find_map(|e| match e {
                Extension::FeatureTable(t) => Some(t.as_slice()),
                _ => None,
            })
            .unwrap_or(&[])
    }

    pub fn set_backing_format(&mut self, fmt: Option<&str>) {
        self.extensions
            .retain(|e| !matches!(e, Extension::BackingFormat(_)));
        if let Some(f) = fmt {
            self.extensions
                .insert(0, Extension::BackingFormat(f.to_string()));
        }
    }

    /// Decodes and validates the header from the first bytes of the file. `buf` should hold the
    /// whole first cluster (or the whole file if shorter); `file_len` is the length of the file.
    pub fn decode(buf: &[u8]) -> Result<Header> {
        if buf.len() < V2_HEADER_LEN as usize || buf[0..4] != MAGIC {
            return Err(Error::invalid("Image is not in qcow2 format"));
        }
        let version = be::u32(buf, 4);
        if version != 2 && version != 3 {
            return Err(Error::unsupported(format!(
                "Unsupported qcow2 version {version}"
            )));
        }
        let backing_file_offset = be::u64(buf, 8);
        let backing_file_size = be::u32(buf, 16);
        let cluster_bits = be::u32(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(Error::invalid(format!(
                "Unsupported cluster size: 2^{cluster_bits}"
            )));
        }
        let cluster_size = 1u64 << cluster_bits;

        let mut h = Header {
            version,
            cluster_bits,
            size: be::u64(buf, 24),
            crypt_method: be::u32(buf, 32),
            l1_size: be::u32(buf, 36),
            l1_table_offset: HostOffset(be::u64(buf, 40)),
            refcount_table_offset: HostOffset(be::u64(buf, 48)),
            refcount_table_clusters: be::u32(buf, 56),
            nb_snapshots: be::u32(buf, 60),
            snapshots_offset: HostOffset(be::u64(buf, 64)),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: CompressionType::Deflate,
            unknown_fields: Vec::new(),
            extensions: Vec::new(),
            backing_file: None,
        };

        if version == 3 {
            if buf.len() < V3_MIN_HEADER_LEN as usize {
                return Err(Error::invalid("qcow2 header too short"));
            }
            h.incompatible_features = be::u64(buf, 72);
            h.compatible_features = be::u64(buf, 80);
            h.autoclear_features = be::u64(buf, 88);
            h.refcount_order = be::u32(buf, 96);
            h.header_length = be::u32(buf, 100);
            if h.header_length < V3_MIN_HEADER_LEN {
                return Err(Error::invalid("qcow2 header too short"));
            }
            if u64::from(h.header_length) > cluster_size || h.header_length as usize > buf.len() {
                return Err(Error::invalid("qcow2 header exceeds cluster size"));
            }
            if h.header_length % 8 != 0 {
                return Err(Error::invalid(format!(
                    "qcow2 header length {} is not a multiple of 8",
                    h.header_length
                )));
            }
            if h.header_length > 104 {
                h.compression_type = CompressionType::from_byte(buf[104])?;
                h.unknown_fields = buf[105..h.header_length as usize].to_vec();
            }
        }

        if h.refcount_order > 6 {
            return Err(Error::invalid(
                "Reference count entry width too large; may not exceed 64 bits",
            ));
        }
        if h.crypt_method > 2 {
            return Err(Error::invalid(format!(
                "Unsupported encryption method: {}",
                h.crypt_method
            )));
        }

        // Compression type and its feature bit must agree.
        let has_bit = h.incompatible_features & incompat::COMPRESSION != 0;
        match (has_bit, h.compression_type) {
            (true, CompressionType::Deflate) => return Err(Error::invalid(
                "Compression type incompatible feature bit is set, but compression type is zlib",
            )),
            (false, CompressionType::Zstd) => return Err(Error::invalid(
                "Compression type incompatible feature bit must be set for non-zlib compression",
            )),
            _ => {}
        }

        // QEMU's order of checks, so that a damaged header gets QEMU's message.
        if backing_file_offset > cluster_size {
            return Err(Error::invalid("Invalid backing file offset"));
        }
        // Extensions run from the end of the header to the backing file name (or the cluster end).
        let ext_start = u64::from(h.header_length);
        let ext_end = if backing_file_offset != 0 {
            backing_file_offset.min(cluster_size)
        } else {
            cluster_size
        }
        .min(buf.len() as u64);
        h.extensions = decode_extensions(buf, ext_start, ext_end)?;

        // Unknown incompatible features: refuse, naming them from the feature table.
        let unknown = h.incompatible_features & !incompat::KNOWN;
        if unknown != 0 {
            return Err(Error::unsupported(format!(
                "Unsupported qcow2 feature(s): {}",
                describe_features(unknown, 0, h.feature_table())
            )));
        }

        if backing_file_offset != 0 {
            if u64::from(backing_file_size)
                > u64::from(MAX_BACKING_NAME).min(cluster_size - backing_file_offset)
            {
                return Err(Error::invalid("Backing file name too long"));
            }
            if backing_file_offset + u64::from(backing_file_size) > buf.len() as u64 {
                return Err(Error::invalid("Invalid backing file offset"));
            }
            let start = backing_file_offset as usize;
            let bytes = &buf[start..start + backing_file_size as usize];
            let name = String::from_utf8(bytes.to_vec())
                .map_err(|_| Error::invalid("Backing file name is not valid UTF-8"))?;
            h.backing_file = Some(name);
        }

        let g = h.geometry();
        if g.extended_l2 && g.subcluster_size() < 512 {
            return Err(Error::invalid(format!(
                "Unsupported subcluster size: {}",
                g.subcluster_size()
            )));
        }

        // Tables, in QEMU's order: the refcount table, the snapshot table, the L1 table.
        if h.refcount_table_clusters == 0 {
            return Err(Error::invalid(
                "Image does not contain a reference count table",
            ));
        }
        if u64::from(h.refcount_table_clusters) * cluster_size
            > MAX_REFTABLE_BYTES.max(cluster_size)
        {
            return Err(Error::invalid("Reference count table too large"));
        }
        validate_table(
            g,
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters) * cluster_size,
            "Reference count table",
        )?;
        // Only the count and the offset here (an entry's size varies); even an empty table's
        // offset must be aligned, as QEMU requires.
        if h.nb_snapshots > MAX_SNAPSHOTS {
            return Err(Error::invalid("Snapshot table too large"));
        }
        validate_table(
            g,
            h.snapshots_offset,
            u64::from(h.nb_snapshots) * SNAPSHOT_HEADER_BYTES,
            "Snapshot table",
        )?;
        let l1_needed = g.l1_entries_for(h.size);
        if u64::from(h.l1_size) * 8 > MAX_L1_BYTES {
            return Err(Error::invalid("Active L1 table too large"));
        }
        validate_table(
            g,
            h.l1_table_offset,
            u64::from(h.l1_size) * 8,
            "Active L1 table",
        )?;
        if l1_needed > i32::MAX as u64 {
            return Err(Error::invalid("Image is too big"));
        }
        if u64::from(h.l1_size) < l1_needed {
            return Err(Error::invalid("L1 table is too small"));
        }
        if h.size > i64::MAX as u64 {
            return Err(Error::invalid("Image is too big"));
        }
        Ok(h)
    }

    /// Encodes the header, its extensions and the backing file name. The result is at most one
    /// cluster; an error says so if it would not fit. The feature name table is optional and is
    /// left out when it does not fit (as QEMU does with 512-byte clusters).
    pub fn encode(&self) -> Result<Vec<u8>> {
        match self.encode_all() {
            Err(e)
                if self
                    .extensions
                    .iter()
                    .any(|x| matches!(x, Extension::FeatureTable(_))) =>
            {
                let mut slim = self.clone();
                slim.extensions
                    .retain(|x| !matches!(x, Extension::FeatureTable(_)));
                slim.encode_all().map_err(|_| e)
            }
            r => r,
        }
    }

    fn encode_all(&self) -> Result<Vec<u8>> {
        let cluster_size = self.cluster_size() as usize;
        let mut out = vec![0u8; self.header_length as usize];
        out[0..4].copy_from_slice(&MAGIC);
        be::put_u32(&mut out, 4, self.version);
        // backing_file_offset/size are filled in below
        be::put_u32(&mut out, 20, self.cluster_bits);
        be::put_u64(&mut out, 24, self.size);
        be::put_u32(&mut out, 32, self.crypt_method);
        be::put_u32(&mut out, 36, self.l1_size);
        be::put_u64(&mut out, 40, self.l1_table_offset.0);
        be::put_u64(&mut out, 48, self.refcount_table_offset.0);
        be::put_u32(&mut out, 56, self.refcount_table_clusters);
        be::put_u32(&mut out, 60, self.nb_snapshots);
        be::put_u64(&mut out, 64, self.snapshots_offset.0);
        if self.version >= 3 {
            be::put_u64(&mut out, 72, self.incompatible_features);
            be::put_u64(&mut out, 80, self.compatible_features);
            be::put_u64(&mut out, 88, self.autoclear_features);
            be::put_u32(&mut out, 96, self.refcount_order);
            be::put_u32(&mut out, 100, self.header_length);
            if self.header_length > 104 {
                out[104] = self.compression_type.to_byte();
                let n = self
                    .unknown_fields
                    .len()
                    .min(self.header_length as usize - 105);
                out[105..105 + n].copy_from_slice(&self.unknown_fields[..n]);
            }
        }
        for e in &self.extensions {
            let data = e.encode_data();
            let mut rec = vec![0u8; 8 + data.len().next_multiple_of(8)];
            be::put_u32(&mut rec, 0, e.magic());
            be::put_u32(&mut rec, 4, data.len() as u32);
            rec[8..8 + data.len()].copy_from_slice(&data);
            out.extend_from_slice(&rec);
        }
        out.extend_from_slice(&[0u8; 8]); // end of extensions
        if let Some(name) = &self.backing_file {
            if name.len() > MAX_BACKING_NAME as usize {
                return Err(Error::arg("Backing file name too long"));
            }
            let off = out.len();
            be::put_u64(&mut out, 8, off as u64);
            be::put_u32(&mut out, 16, name.len() as u32);
            out.extend_from_slice(name.as_bytes());
        }
        if out.len() > cluster_size {
            return Err(Error::arg(format!(
                "qcow2 header (with extensions and backing file name) needs {} bytes, more than one cluster ({cluster_size})",
                out.len()
            )));
        }
        Ok(out)
    }

    /// The feature name table QEMU writes into new images.
    pub fn default_feature_table() -> Vec<FeatureName> {
        let f = |kind: u8, bit: u8, name: &str| FeatureName {
            kind,
            bit,
            name: name.to_string(),
        };
        vec![
            f(0, 0, "dirty bit"),
            f(0, 1, "corrupt bit"),
            f(0, 2, "external data file"),
            f(0, 3, "compression type"),
            f(0, 4, "extended L2 entries"),
            f(1, 0, "lazy refcounts"),
            f(2, 0, "bitmaps"),
            f(2, 1, "raw external data"),
        ]
    }
}

/// Table offsets must be cluster aligned, and the table must not overflow the host offset range.
fn validate_table(g: Geometry, offset: HostOffset, bytes: u64, what: &str) -> Result<()> {
    if !g.is_aligned(offset.0)
        || offset
            .0
            .checked_add(bytes)
            .is_none_or(|end| end > i64::MAX as u64)
    {
        return Err(Error::invalid(format!("{what} offset invalid")));
    }
    Ok(())
}

fn decode_extensions(buf: &[u8], start: u64, end: u64) -> Result<Vec<Extension>> {
    let mut exts = Vec::new();
    let mut off = start;
    let mut seen = Vec::new();
    while off < end {
        // An extension's own header reaching past the end is too large too (QEMU's rule).
        if off + 8 > end {
            return Err(Error::invalid("Header extension too large"));
        }
        let o = off as usize;
        let magic = be::u32(buf, o);
        let len = u64::from(be::u32(buf, o + 4));
        off += 8;
        if len > end - off {
            return Err(Error::invalid("Header extension too large"));
        }
        if magic == ext::END {
            return Ok(exts);
        }
        let data = &buf[off as usize..(off + len) as usize];
        // QEMU reads a repeated backing format extension as the last one wins (older tools
        // could add one beside the other); any other repeated extension is refused.
        if magic != 0
            && seen.contains(&magic)
            && magic != ext::FEATURE_TABLE
            && magic != ext::BACKING_FORMAT
        {
            return Err(Error::invalid(format!(
                "Header extension {magic:#x} appears more than once"
            )));
        }
        seen.push(magic);
        let e = match magic {
            ext::BACKING_FORMAT => {
                if len > 15 {
                    return Err(Error::invalid(format!(
                        "ERROR: ext_backing_format: len={len} too large (>=16)"
                    )));
                }
                Extension::BackingFormat(utf8(data, "backing format")?)
            }
            ext::FEATURE_TABLE => {
                // Records of 48 bytes, a short last one zero-padded; a name ends at its first
                // NUL (QEMU reads the table the same way).
                let mut padded = data.to_vec();
                padded.resize(data.len().next_multiple_of(48), 0);
                Extension::FeatureTable(
                    padded
                        .chunks_exact(48)
                        .map(|rec| {
                            let name = &rec[2..];
                            let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(46)];
                            FeatureName {
                                kind: rec[0],
                                bit: rec[1],
                                name: String::from_utf8_lossy(name).into_owned(),
                            }
                        })
                        .collect(),
                )
            }
            ext::BITMAPS => {
                if len != 24 {
                    return Err(Error::invalid("bitmaps_ext: Invalid extension length"));
                }
                Extension::Bitmaps(BitmapsExtension {
                    nb_bitmaps: be::u32(data, 0),
                    directory_size: be::u64(data, 8),
                    directory_offset: HostOffset(be::u64(data, 16)),
                })
            }
            ext::CRYPTO_HEADER => {
                if len != 16 {
                    return Err(Error::invalid(format!(
                        "Unable to read CRYPTO header extension: length {len}"
                    )));
                }
                Extension::CryptoHeader {
                    offset: HostOffset(be::u64(data, 0)),
                    length: be::u64(data, 8),
                }
            }
            ext::DATA_FILE => Extension::DataFile(utf8(data, "data file name")?),
            _ => Extension::Unknown {
                magic,
                data: data.to_vec(),
            },
        };
        exts.push(e);
        off += len.next_multiple_of(8);
    }
    Ok(exts)
}

fn utf8(data: &[u8], what: &str) -> Result<String> {
    String::from_utf8(data.to_vec())
        .map_err(|_| Error::invalid(format!("{what} is not valid UTF-8")))
}

/// Lists the set bits of `mask` by name (from the table) or as "Unknown ... feature".
pub fn describe_features(mask: u64, kind: u8, table: &[FeatureName]) -> String {
    // As QEMU words it: the table's names in table order (up to its first empty name), then
    // whatever bits it does not name, together.
    let mut parts = Vec::new();
    let mut left = mask;
    for f in table.iter().take_while(|f| !f.name.is_empty()) {
        if f.kind == kind && f.bit < 64 && left & (1u64 << f.bit) != 0 {
            parts.push(f.name.clone());
            left &= !(1u64 << f.bit);
        }
    }
    if left != 0 {
        parts.push(format!(
            "Unknown {} feature: {left:x}",
            ["incompatible", "compatible", "autoclear"][kind.min(2) as usize]
        ));
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            version: 3,
            cluster_bits: 16,
            size: 1 << 30,
            crypt_method: 0,
            l1_size: 2,
            l1_table_offset: HostOffset(0x30000),
            refcount_table_offset: HostOffset(0x10000),
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: HostOffset(0),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V3_HEADER_LEN,
            compression_type: CompressionType::Deflate,
            unknown_fields: vec![0; 7],
            extensions: vec![
                Extension::BackingFormat("raw".into()),
                Extension::FeatureTable(Header::default_feature_table()),
                Extension::Unknown {
                    magic: 0x1234_5678,
                    data: vec![1, 2, 3],
                },
            ],
            backing_file: Some("base.raw".into()),
        }
    }

    fn cluster(h: &Header) -> Vec<u8> {
        let mut buf = h.encode().unwrap();
        buf.resize(h.cluster_size() as usize, 0);
        buf
    }

    #[test]
    fn round_trip() {
        let h = sample();
        let buf = cluster(&h);
        let d = Header::decode(&buf).unwrap();
        assert_eq!(d, h);
        assert_eq!(d.backing_format(), Some("raw"));
    }

    #[test]
    fn matches_qemu_layout() {
        // QEMU puts the backing file name right after the end-of-extensions marker at 0x210
        // for this header (see qemu-img create -F raw -b base.raw).
        let mut h = sample();
        h.extensions.pop();
        let buf = h.encode().unwrap();
        assert_eq!(be::u64(&buf, 8), 0x210);
        assert_eq!(be::u32(&buf, 16), 8);
    }

    #[test]
    fn v2_round_trip() {
        let mut h = sample();
        h.version = 2;
        h.header_length = V2_HEADER_LEN;
        h.unknown_fields.clear();
        h.extensions.clear();
        let buf = cluster(&h);
        assert_eq!(Header::decode(&buf).unwrap(), h);
    }

    #[test]
    fn rejects_bad_headers() {
        let good = cluster(&sample());
        let check = |patch: &dyn Fn(&mut Vec<u8>), needle: &str| {
            let mut b = good.clone();
            patch(&mut b);
            let err = Header::decode(&b).unwrap_err().to_string();
            assert!(err.contains(needle), "{err:?} should contain {needle:?}");
        };
        check(&|b| b[0] = b'X', "not in qcow2 format");
        check(&|b| be::put_u32(b, 4, 4), "Unsupported qcow2 version 4");
        check(&|b| be::put_u32(b, 20, 8), "Unsupported cluster size");
        check(&|b| be::put_u32(b, 20, 22), "Unsupported cluster size");
        check(&|b| be::put_u32(b, 36, 1), "L1 table is too small");
        check(
            &|b| be::put_u32(b, 36, 5 << 20),
            "Active L1 table too large",
        );
        check(
            &|b| be::put_u64(b, 40, 0x30001),
            "Active L1 table offset invalid",
        );
        check(
            &|b| be::put_u32(b, 56, 0),
            "does not contain a reference count table",
        );
        check(
            &|b| be::put_u32(b, 56, 1000),
            "Reference count table too large",
        );
        check(&|b| be::put_u32(b, 96, 7), "may not exceed 64 bits");
        check(&|b| be::put_u32(b, 32, 3), "Unsupported encryption method");
        check(
            &|b| be::put_u64(b, 72, 1 << 20),
            "Unknown incompatible feature: 100000",
        );
        check(&|b| be::put_u64(b, 72, 1 << 3), "compression type is zlib");
        check(&|b| b[104] = 1, "must be set for non-zlib");
        check(&|b| b[104] = 9, "Unknown compression type");
        check(&|b| be::put_u32(b, 16, 5000), "Backing file name too long");
        check(
            &|b| be::put_u64(b, 8, u64::MAX),
            "Invalid backing file offset",
        );
        check(
            &|b| be::put_u64(b, 64, 0x1234),
            "Snapshot table offset invalid",
        );
        check(&|b| be::put_u32(b, 100, 100), "header too short");
        check(
            &|b| be::put_u32(b, 0x74, 0xffff),
            "Header extension too large",
        );
        check(&|b| be::put_u32(b, 60, 70000), "Snapshot table too large");
    }

    #[test]
    fn names_unknown_features_from_table() {
        let mut h = sample();
        if let Extension::FeatureTable(t) = &mut h.extensions[1] {
            t.push(FeatureName {
                kind: 0,
                bit: 9,
                name: "future thing".into(),
            });
        }
        let mut b = cluster(&h);
        be::put_u64(&mut b, 72, 1 << 9);
        let err = Header::decode(&b).unwrap_err().to_string();
        assert!(err.contains("future thing"), "{err}");
    }

    #[test]
    fn truncated_input_never_panics() {
        let good = cluster(&sample());
        for len in 0..600 {
            let _ = Header::decode(&good[..len]);
        }
        // Random garbage after a valid magic.
        let mut rng = 12345u64;
        for _ in 0..2000 {
            let mut b = good.clone();
            for _ in 0..8 {
                rng = rng
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let pos = (rng >> 33) as usize % 700;
                b[pos] = (rng >> 20) as u8;
            }
            let _ = Header::decode(&b);
        }
    }
}
