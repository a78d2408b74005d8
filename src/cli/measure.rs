//! `qimg measure`: how large a new image file must be, as qemu-img measure computes it.
//!
//! For qcow2 the fully allocated size is the whole layout of a preallocated image: the header
//! cluster, L2 tables for every guest cluster (rounded up to whole tables), the L1 table
//! (rounded up to whole clusters), the data, and the refcount blocks and table that count all
//! of that and themselves (found by iterating to a fixed point). The required size is the same
//! minus the data clusters that would not be written: with an input image, only the target
//! clusters that hold data somewhere in the input's backing chain (zeros and unallocated ranges
//! are not counted); with `--size`, none. QEMU's numbers are reproduced exactly, including its
//! over-estimates (metadata of the fully allocated file is always counted).

use super::fail;
use super::info::pretty;
use super::opts::{open, parse_kv_list, parse_opt_size, ImageArgs};
use qimg::block::{chain_status, BlockDevice, Format};
use qimg::format::bitmap;
use qimg::size::{parse_size, SizeError};
use qimg::{Error, IoBufMut};
use serde_json::{Map, Value};
use std::sync::Arc;

#[derive(clap::Args)]
pub struct Args {
    /// Output format: human or json
    #[arg(long = "output", default_value = "human")]
    output: String,
    /// Format of FILENAME (probed if not given)
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Format of the image to be created (raw or qcow2; default raw)
    #[arg(short = 'O', long = "target-format", default_value = "raw")]
    target_format: String,
    /// Creation options of the target format (as for create)
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Measure a new image of this virtual size
    #[arg(long = "size", allow_hyphen_values = true)]
    size: Vec<String>,
    /// Measure the content of an internal snapshot of FILENAME: its ID or name, or
    /// snapshot.id=ID[,snapshot.name=NAME]
    #[arg(short = 'l', long = "snapshot")]
    snapshot: Option<String>,
    /// Open FILENAME in shared mode
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// FILENAME is an image specification (not supported yet: refused)
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// QEMU objects: secret,id=ID,data=TEXT|file=FILE[,format=raw|base64] (nothing uses a
    /// secret until encrypted images are supported); other object types are refused
    #[arg(long = "object")]
    object: Vec<String>,
    /// Image to convert from
    filenames: Vec<String>,
}

/// What qemu-img measure prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measure {
    pub required: u64,
    pub fully_allocated: u64,
    pub bitmaps: Option<u64>,
}

pub async fn run(a: Args) -> u8 {
    if a.output != "human" && a.output != "json" {
        eprintln!(
            "{}: --output expects 'human' or 'json' not '{}'",
            super::prog(),
            a.output
        );
        eprintln!("Try '{} measure --help' for more info", super::prog());
        return 1;
    }
    let size = match a.size.last() {
        Some(s) => match parse_size(s) {
            Ok(n) => Some(n),
            Err(SizeError::Invalid) if !s.trim_start().starts_with('-') => {
                return fail(format!("Invalid image size specified: '{s}'."))
            }
            Err(_) => {
                return fail(format!(
                    "Invalid image size specified. Must be between 0 and {}.",
                    i64::MAX
                ))
            }
        },
        None => None,
    };
    if let Err(e) = super::objects::define(&a.object) {
        return fail(e.to_string());
    }
    let snapshot = match a.snapshot.as_deref().map(super::opts::parse_snapshot_param) {
        Some(Err(e)) => return fail(e.to_string()),
        Some(Ok(sn)) => Some(sn),
        None => None,
    };
    if a.filenames.len() > 1 {
        return fail("At most one filename argument is allowed.");
    }
    let filename = a.filenames.first();
    match (filename, size) {
        (Some(_), Some(_)) => return fail("--size N cannot be used together with a filename."),
        (None, None) => return fail("Either --size N or one filename must be specified."),
        (None, Some(_)) if a.format.is_some() || a.snapshot.is_some() || a.image_opts => {
            return fail("--image-opts, -f, and -l require a filename argument.")
        }
        _ => {}
    }
    let input = match filename {
        Some(f) if f.is_empty() => {
            return fail("Could not open '': The 'file' block driver requires a file name")
        }
        Some(f) => match open(&ImageArgs {
            image_opts: a.image_opts,
            path: f,
            format: a.format.as_deref(),
            read_only: true,
            cache: None,
            runtime_opts: &[],
            no_backing: false,
            batch: false,
            force_share: a.force_share,
            metadata_only: false,
            aio: None,
        })
        .await
        {
            Ok(i) => Some(i),
            Err(e) => return fail(format!("Could not open '{f}': {}", clean(&e))),
        },
        None => None,
    };
    if let (Some(i), Some(sn)) = (&input, &snapshot) {
        if let Err(e) = super::opts::load_snapshot(&**i, sn).await {
            let _ = i.close().await;
            return fail(format!("Failed to load snapshot: {e}"));
        }
    }
    let r = measure(&a.target_format, &a.options, size, input.as_ref()).await;
    if let Some(i) = &input {
        let _ = i.close().await;
    }
    let m = match r {
        Ok(m) => m,
        Err(msgs) => {
            for m in msgs {
                eprintln!("{}: {m}", super::prog());
            }
            return 1;
        }
    };
    if a.output == "json" {
        let mut o = Map::new();
        if let Some(b) = m.bitmaps {
            o.insert("bitmaps".into(), b.into());
        }
        o.insert("required".into(), m.required.into());
        o.insert("fully-allocated".into(), m.fully_allocated.into());
        println!("{}", pretty(&Value::Object(o)));
    } else {
        println!("required size: {}", m.required);
        println!("fully allocated size: {}", m.fully_allocated);
        if let Some(b) = m.bitmaps {
            println!("bitmaps size: {b}");
        }
    }
    0
}

/// An error's text without Rust's " (os error N)" suffix (QEMU prints strerror only).
pub(super) fn clean(e: &Error) -> String {
    let s = e.to_string();
    let mut out = String::new();
    let mut rest = s.as_str();
    while let Some(i) = rest.find(" (os error ") {
        out.push_str(&rest[..i]);
        match rest[i..].find(')') {
            Some(j) => rest = &rest[i + j + 1..],
            None => {
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// Formats QEMU knows that have no size measurement (its message for them).
const NO_MEASURE: &[&str] = &[
    "vmdk",
    "vdi",
    "vpc",
    "vhdx",
    "qed",
    "parallels",
    "qcow",
    "file",
    "host_device",
    "host_cdrom",
    "nbd",
    "ssh",
    "nfs",
    "gluster",
    "rbd",
    "iscsi",
    "null-co",
    "null-aio",
    "blkdebug",
    "blkverify",
];
/// Formats QEMU knows that cannot create images at all.
const NO_CREATE: &[&str] = &[
    "bochs",
    "cloop",
    "dmg",
    "vvfat",
    "copy-on-read",
    "throttle",
    "quorum",
    "replication",
    "compress",
    "snapshot-access",
    "preallocate",
    "http",
    "https",
    "ftp",
    "ftps",
];

/// The creation options of a target format: name and type (as QEMU's option lists type them).
#[derive(Clone, Copy, PartialEq, Eq)]
enum OptType {
    Size,
    Number,
    Bool,
    Str,
}

fn option_type(format: Format, key: &str) -> Option<OptType> {
    use OptType::*;
    // The file protocol's creation options are accepted with every format.
    let file = match key {
        "size" | "extent_size_hint" => Some(Size),
        "preallocation" => Some(Str),
        "nocow" => Some(Bool),
        _ => None,
    };
    if file.is_some() || format == Format::Raw {
        return file;
    }
    match key {
        "compat"
        | "backing_file"
        | "backing_fmt"
        | "data_file"
        | "encrypt.format"
        | "encrypt.key-secret"
        | "encrypt.cipher-alg"
        | "encrypt.cipher-mode"
        | "encrypt.ivgen-alg"
        | "encrypt.ivgen-hash-alg"
        | "encrypt.hash-alg"
        | "compression_type" => Some(Str),
        "data_file_raw" | "encryption" | "extended_l2" | "lazy_refcounts" => Some(Bool),
        "cluster_size" => Some(Size),
        "refcount_bits" | "encrypt.iter-time" => Some(Number),
        _ => None,
    }
}

/// `-o` values after QEMU's typed parsing (sizes and numbers as u64, booleans).
#[derive(Default)]
struct Opts {
    values: Vec<(String, String)>,
}

impl Opts {
    fn get(&self, k: &str) -> Option<&str> {
        self.values
            .iter()
            .rev()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }
    fn size(&self, k: &str) -> Option<u64> {
        self.get(k).map(|v| parse_opt_size(v).unwrap_or(0))
    }
    fn flag(&self, k: &str) -> bool {
        self.get(k).is_some_and(|v| v == "on")
    }
}

/// Parses and type-checks the `-o` lists; the messages QEMU prints when they are bad.
fn parse_opts(format: Format, lists: &[String]) -> Result<Opts, Vec<String>> {
    let invalid = |m: String| {
        vec![
            m,
            format!("Invalid options for file format '{}'", format.name()),
        ]
    };
    let mut o = Opts::default();
    for list in lists {
        for (k, v) in parse_kv_list(list) {
            let Some(t) = option_type(format, &k) else {
                return Err(invalid(format!("Invalid parameter '{k}'")));
            };
            let v = match t {
                OptType::Size => {
                    if parse_opt_size(&v) == Err(true) {
                        return Err(invalid(format!(
                            "Value '{v}' is out of range for parameter '{k}'"
                        )));
                    }
                    if parse_opt_size(&v).is_err() {
                        return Err(invalid(format!(
                            "Parameter '{k}' expects a non-negative number below 2^64\n\
                             Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, \
                             tera-, peta-\nand exabytes, respectively."
                        )));
                    }
                    v
                }
                OptType::Number => match parse_number(&v) {
                    Some(n) => n.to_string(),
                    None => return Err(invalid(format!("Parameter '{k}' expects a number"))),
                },
                OptType::Bool => match v.as_str() {
                    "on" | "yes" | "true" | "y" => "on".into(),
                    "off" | "no" | "false" | "n" => "off".into(),
                    _ => return Err(invalid(format!("Parameter '{k}' expects 'on' or 'off'"))),
                },
                OptType::Str => v,
            };
            o.values.push((k, v));
        }
    }
    Ok(o)
}

/// A NUMBER option: an unsigned integer, decimal, octal (`0...`) or hex (`0x...`).
fn parse_number(v: &str) -> Option<u64> {
    let s = v.trim_start();
    if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()
    } else if s.len() > 1 && s.starts_with('0') {
        u64::from_str_radix(&s[1..], 8).ok()
    } else {
        s.parse().ok()
    }
}

/// The measurement for `target` (a format name) with `-o` lists, of `--size` or an input image.
async fn measure(
    target: &str,
    lists: &[String],
    size: Option<u64>,
    input: Option<&Arc<dyn BlockDevice>>,
) -> Result<Measure, Vec<String>> {
    let one = |m: String| vec![m];
    let format = match target {
        "qcow2" => Format::Qcow2,
        "raw" => Format::Raw,
        "luks" => {
            return Err(one(
                "measuring for the luks format is not supported yet".into()
            ))
        }
        f if NO_MEASURE.contains(&f) => {
            return Err(one(format!(
                "Block driver '{f}' does not support size measurement"
            )))
        }
        f if NO_CREATE.contains(&f) => {
            return Err(one(format!(
                "Format driver '{f}' does not support image creation"
            )))
        }
        f => return Err(one(format!("Unknown file format '{f}'"))),
    };
    let mut opts = parse_opts(format, lists)?;
    if let Some(s) = size {
        opts.values.push(("size".into(), s.to_string()));
    }
    match format {
        Format::Raw => {
            let required = match input {
                Some(i) => disk_len(i.as_ref()),
                None => opts.size("size").unwrap_or(0).wrapping_add(511) & !511,
            };
            Ok(Measure {
                required,
                fully_allocated: required,
                bitmaps: None,
            })
        }
        Format::Qcow2 => measure_qcow2(&opts, input).await.map_err(one),
    }
}

async fn measure_qcow2(o: &Opts, input: Option<&Arc<dyn BlockDevice>>) -> Result<Measure, String> {
    let extended_l2 = o.flag("extended_l2");
    let cs = o.size("cluster_size").unwrap_or(65536);
    if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
        return Err("Cluster size must be a power of two between 512 and 2048k".into());
    }
    if extended_l2 && cs < 16384 {
        return Err(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
                .into(),
        );
    }
    let version = match o.get("compat") {
        None => 3,
        Some("0.10") => 2,
        Some("1.1") => 3,
        Some(other) => return Err(format!("Invalid compatibility level: '{other}'")),
    };
    let refcount_bits = match o.get("refcount_bits") {
        None => 16,
        Some(v) => v.parse::<u64>().unwrap_or(0),
    };
    if !refcount_bits.is_power_of_two() || refcount_bits > 64 {
        return Err("Refcount width must be a power of two and may not exceed 64 bits".into());
    }
    if version < 3 && refcount_bits != 16 {
        return Err("Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)".into());
    }
    let full_data = match o.get("preallocation") {
        None | Some("off") | Some("metadata") => false,
        Some("falloc") | Some("full") => true,
        Some(other) => return Err(format!("invalid parameter value: {other}")),
    };
    let has_backing = o.get("backing_file").is_some();
    if o.get("encrypt.format") == Some("luks") {
        return Err("measuring images with encrypt.format=luks is not supported yet".into());
    }
    let l2e: u64 = if extended_l2 { 16 } else { 8 };
    let mut virtual_size = round_up(o.size("size").unwrap_or(0), cs);
    let l2_tables = (virtual_size / cs).div_ceil(cs / l2e);
    if l2_tables.wrapping_mul(8) > 32 << 20 {
        return Err("The image size is too large (try using a larger cluster size)".into());
    }
    let mut required = 0;
    let mut bitmaps = None;
    if let Some(img) = input {
        let ssize = disk_len(img.as_ref());
        virtual_size = round_up(ssize, cs);
        required = if has_backing {
            // The new image's backing file may share nothing with the input: all of it counts.
            virtual_size
        } else {
            allocated_clusters(img, cs)
                .await
                .map_err(|e| format!("Unable to get block status: {}", clean(&e)))?
        };
        if version >= 3 {
            bitmaps = input_bitmaps_size(img.as_ref(), cs)
                .await
                .map_err(|e| clean(&e))?;
        }
    }
    if full_data {
        required = virtual_size;
    }
    let fully_allocated = prealloc_size(
        virtual_size,
        cs,
        refcount_bits.trailing_zeros(),
        extended_l2,
    );
    Ok(Measure {
        required: fully_allocated
            .wrapping_sub(virtual_size)
            .wrapping_add(required),
        fully_allocated,
        bitmaps,
    })
}

/// The length of an image as QEMU's block layer sees it: whole sectors (a raw file of 1000001
/// bytes is a 1000448-byte disk whose last bytes read as zeros).
pub(super) fn disk_len(img: &dyn BlockDevice) -> u64 {
    img.size().next_multiple_of(512)
}

fn round_up(v: u64, to: u64) -> u64 {
    v.wrapping_add(to - 1) & !(to - 1)
}

/// Bytes of the target clusters (of `cs` bytes) that hold data anywhere in the input's chain:
/// ranges that read as zeros, or that no layer allocates, are not counted.
async fn allocated_clusters(img: &Arc<dyn BlockDevice>, cs: u64) -> qimg::Result<u64> {
    let size = img.size();
    let mut required = 0u64;
    let mut off = 0u64;
    while off < size {
        let st = chain_status(img, off, size - off).await?;
        let n = st.len.clamp(1, size - off);
        if st.present && st.data && !st.zero {
            // The whole target clusters this data touches; go on after the last one.
            let end = round_up(off + n, cs);
            required += end - off / cs * cs;
            off = end;
        } else {
            off += n;
        }
    }
    Ok(required)
}

/// The space the persistent bitmaps of a qcow2 (v3) input need in a new qcow2 image of cluster
/// size `cs`, every bitmap fully allocated: its data clusters, its table, and the directory.
/// `None` when the input cannot have persistent bitmaps (not qcow2 v3), as QEMU then prints no
/// bitmaps line.
async fn input_bitmaps_size(img: &dyn BlockDevice, cs: u64) -> qimg::Result<Option<u64>> {
    let Some(q) = img.as_qcow2() else {
        return Ok(None);
    };
    let h = q.header();
    if h.version < 3 {
        return Ok(None);
    }
    let mut total = 0u64;
    // Bitmaps are only loaded when the autoclear bit says the extension is consistent.
    const AUTOCLEAR_BITMAPS: u64 = 1;
    let ext = match h.bitmaps() {
        Some(e) if h.autoclear_features & AUTOCLEAR_BITMAPS != 0 => e,
        _ => return Ok(Some(0)),
    };
    if ext.directory_size > bitmap::MAX_DIRECTORY_BYTES {
        return Err(Error::invalid("Bitmap directory is too large"));
    }
    let buf = q
        .storage()
        .read_at(
            IoBufMut::zeroed(ext.directory_size as usize),
            ext.directory_offset.0,
        )
        .await
        .map_err(|e| Error::io("Could not read the bitmap directory", e))?;
    let entries = bitmap::decode_directory(&buf, ext.nb_bitmaps, q.geometry())?;
    let len = disk_len(img);
    let mut dir = 0u64;
    for b in entries {
        let granularity = 1u64 << b.granularity_bits.min(63);
        let bytes = len.div_ceil(granularity).div_ceil(8);
        let clusters = bytes.div_ceil(cs);
        total += clusters * cs + round_up(clusters * 8, cs);
        dir += (24 + b.name.len() as u64).next_multiple_of(8);
    }
    Ok(Some(total + round_up(dir, cs)))
}

/// The size of a qcow2 image of `size` bytes (cluster aligned) with every cluster allocated:
/// header, L2 tables, L1 table, refcount structures and data.
pub fn prealloc_size(size: u64, cs: u64, refcount_order: u32, extended_l2: bool) -> u64 {
    let l2e: u64 = if extended_l2 { 16 } else { 8 };
    let aligned = round_up(size, cs);
    let mut meta = cs; // the header cluster
    let l2_entries = round_up(aligned / cs, cs / l2e);
    meta += l2_entries * l2e;
    let l1_entries = round_up(l2_entries * l2e / cs, cs / 8);
    meta += l1_entries * 8;
    meta += refcount_metadata_size((meta + aligned) / cs, cs, refcount_order);
    meta + aligned
}

/// Bytes of refcount blocks and table needed to count `clusters` clusters plus themselves.
pub fn refcount_metadata_size(clusters: u64, cs: u64, refcount_order: u32) -> u64 {
    let per_block = (cs * 8) >> refcount_order;
    let per_table_cluster = cs / 8;
    let (mut blocks, mut table) = (0u64, 0u64);
    loop {
        let nb = (clusters + blocks + table).div_ceil(per_block);
        let nt = nb.div_ceil(per_table_cluster);
        if (nb, nt) == (blocks, table) {
            return (blocks + table) * cs;
        }
        (blocks, table) = (nb, nt);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iotest_190_numbers() {
        // 2 TiB, 64k clusters: required (no data) and fully allocated, as in 190.out.
        let fa = prealloc_size(2 << 40, 65536, 4, false);
        assert_eq!(fa, 2199359062016);
        assert_eq!(fa - (2 << 40), 335806464);
        let fa = prealloc_size(2 << 40, 2 << 20, 4, false);
        assert_eq!(fa, 2199042129920);
        assert_eq!(prealloc_size(10 << 20, 65536, 4, false), 10813440);
    }

    #[test]
    fn empty_image_is_three_clusters() {
        assert_eq!(prealloc_size(0, 65536, 4, false), 3 * 65536);
    }

    #[test]
    fn numbers_and_errors_text() {
        assert_eq!(parse_number("010"), Some(8));
        assert_eq!(parse_number("0x10"), Some(16));
        assert_eq!(parse_number("x"), None);
        let e = Error::arg("Could not open 'x': No such file or directory (os error 2)");
        assert_eq!(clean(&e), "Could not open 'x': No such file or directory");
    }
}
