//! Option parsing shared by the commands: `-o key=value,...` lists (with QEMU's `,,` escape for a
//! literal comma), image opening with the common flags.

use qimg::block::{
    open_image, Aio, BlockDevice, CacheMode, Format, LockOptions, Locking, OpenOptions,
};
use qimg::block_options::{DetectZeroes, Discard};
use qimg::qcow2::Qcow2Options;
use qimg::size::{parse_size, SizeError};
use qimg::Result;
use std::path::Path;
use std::sync::Arc;

/// Splits `a=1,b=2` into pairs; `,,` is a literal comma; a bare `key` means `key=on`.
pub fn parse_kv_list(s: &str) -> Vec<(String, String)> {
    let mut items = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                items.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    if !cur.is_empty() {
        items.push(cur);
    }
    items
        .into_iter()
        .filter(|i| !i.is_empty())
        .map(|i| match i.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (i, "on".to_string()),
        })
        .collect()
}

/// Runtime options (`-o` lists): the qcow2 driver's, and the file driver's `locking`
/// (QEMU spells it `file.locking` below a format driver; both are taken). Unknown keys are
/// refused with QEMU's message.
pub fn runtime_options(lists: &[String]) -> Result<(Qcow2Options, Locking)> {
    let r = runtime_options_with_backing(lists)?;
    if let Some(f) = r.backing_format {
        return Err(qimg::Error::arg(format!(
            "Option 'backing.driver={}' is not supported here",
            f.name()
        )));
    }
    if r.discard.is_some() || r.detect_zeroes.is_some() {
        return Err(qimg::Error::arg(
            "Options 'discard' and 'detect-zeroes' are not supported here",
        ));
    }
    if r.raw_window.is_some() {
        return Err(qimg::Error::arg(
            "Options 'offset' and 'size' (of the raw format) are not supported here",
        ));
    }
    Ok((r.qcow2, r.locking))
}

/// What runtime option lists say.
pub struct Runtime {
    pub qcow2: Qcow2Options,
    pub locking: Locking,
    /// `backing.driver=FMT`: the backing file's format, instead of what the image names.
    pub backing_format: Option<Format>,
    /// The block layer's `discard=` and `detect-zeroes=` (see `qimg::block_options`).
    pub discard: Option<Discard>,
    pub detect_zeroes: Option<DetectZeroes>,
    /// The raw driver's `offset=` and `size=` (see `qimg::storage::window`).
    pub raw_window: Option<qimg::block::RawWindow>,
}

/// [`runtime_options`], with `backing.driver=`, `discard=` and `detect-zeroes=`.
pub fn runtime_options_with_backing(lists: &[String]) -> Result<Runtime> {
    let mut r = Runtime {
        qcow2: Qcow2Options::default(),
        locking: Locking::default(),
        backing_format: None,
        discard: None,
        detect_zeroes: None,
        raw_window: None,
    };
    for list in lists {
        for (k, v) in parse_kv_list(list) {
            if k == "backing.driver" {
                r.backing_format = Some(
                    Format::parse(&v)
                        .map_err(|_| qimg::Error::unsupported(format!("Unknown driver '{v}'")))?,
                );
            } else if k == "locking" || k == "file.locking" {
                r.locking = Locking::parse(&v)?;
            } else if k == "node-name" || k.ends_with(".node-name") {
                super::image_name::check_node_name(&v)?;
            } else if k == "discard" {
                r.discard = Some(Discard::parse(&v)?);
            } else if k == "detect-zeroes" {
                r.detect_zeroes = Some(DetectZeroes::parse(&v)?);
            } else if k == "offset" || k == "size" {
                let n = parse_opt_size(&v).map_err(|_| {
                    qimg::Error::arg(format!(
                        "Parameter '{k}' expects a non-negative number below 2^64\n\
                         Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, \
                         peta-\nand exabytes, respectively."
                    ))
                })?;
                let w = r.raw_window.get_or_insert_with(Default::default);
                if k == "offset" {
                    w.offset = n;
                    w.offset_text = Some(v);
                } else {
                    w.size = Some(n);
                    w.size_text = Some(v);
                }
            } else if !r.qcow2.set(&k, &v)? {
                // Every other runtime option taken here is the qcow2 driver's or the file's.
                return Err(qimg::Error::arg(format!(
                    "Block format 'qcow2' does not support the option '{k}'"
                )));
            }
        }
    }
    Ok(r)
}

/// Everything needed to open an image from the command line.
pub struct ImageArgs<'a> {
    pub path: &'a str,
    pub format: Option<&'a str>,
    pub read_only: bool,
    pub cache: Option<&'a str>,
    pub runtime_opts: &'a [String],
    pub no_backing: bool,
    /// A batch job's image (see `OpenOptions::batch`).
    pub batch: bool,
    /// `-U`: share the image with writers (read-only opens only).
    pub force_share: bool,
    /// Only metadata is read (`info`): see `OpenOptions::metadata_only`.
    pub metadata_only: bool,
    /// `--aio` / `-i`: how file I/O is issued (QEMU's `aio=`: threads, io_uring; native refused).
    pub aio: Option<&'a str>,
    /// `--image-opts`: `path` is an option list (`driver=qcow2,file.filename=NAME,...`).
    pub image_opts: bool,
}

/// QEMU's `aio=` values. `native` (Linux AIO) is not implemented: refused, never replaced.
pub fn parse_aio(s: &str) -> Result<Aio> {
    match s {
        "native" => Err(qimg::Error::unsupported(
            "aio=native (Linux AIO) is not supported; use aio=threads or aio=io_uring",
        )),
        other => Aio::parse(other),
    }
}

pub async fn open(a: &ImageArgs<'_>) -> Result<Arc<dyn BlockDevice>> {
    let (path, opts) = open_options(a)?;
    open_with(&path, &opts).await
}

/// The file to open and the library's open options for the command line's flags and the
/// image name (`json:`, `file:`, `--image-opts`: see [`super::image_name`]).
pub fn open_options(a: &ImageArgs<'_>) -> Result<(String, OpenOptions)> {
    // Options that say which drivers to open (qemu-io's `open -o driver=qcow2,file.align=4k
    // NAME`) are read together with the name; the others are runtime options of the format.
    let pairs: Vec<(String, String)> = a
        .runtime_opts
        .iter()
        .flat_map(|l| parse_kv_list(l))
        .collect();
    let structural = |k: &str| {
        k == "driver" || k.starts_with("image.") || (k.starts_with("file.") && k != "file.locking")
    };
    let (spec, extra) = if !a.image_opts && pairs.iter().any(|(k, _)| structural(k)) {
        let spec = super::image_name::parse_with_options(a.path, pairs)?;
        (spec, Vec::new())
    } else {
        (
            super::image_name::parse(a.path, a.image_opts)?,
            a.runtime_opts.to_vec(),
        )
    };
    if a.image_opts && a.format.is_some() {
        return Err(qimg::Error::arg(
            "--image-opts and --format are mutually exclusive",
        ));
    }
    let opts = spec_options(&spec, a, a.format, extra)?;
    Ok((spec.path, opts))
}

/// The library's open options for one image of a name (`format`: the command line's `-f`,
/// `extra`: runtime option lists of the command line); an image that is another image's file
/// (`file.driver=qcow2`) gets its own, with the same flags.
fn spec_options(
    spec: &super::image_name::ImageSpec,
    a: &ImageArgs<'_>,
    format: Option<&str>,
    extra: Vec<String>,
) -> Result<OpenOptions> {
    let file_image = match &spec.inner {
        None => None,
        Some(inner) => Some(Box::new(qimg::block::NestedImage {
            path: inner.path.clone(),
            opts: spec_options(inner, a, None, Vec::new())?,
        })),
    };
    // An explicit -f wins over the name's driver, as with QEMU; `-f null-co` names the null
    // device the name describes (it has no format of its own).
    let format = format
        .filter(|f| !(*f == "null-co" && spec.null.is_some()))
        .or(spec.format.as_deref())
        .map(Format::parse)
        .transpose()?;
    let cache = a
        .cache
        .map(CacheMode::parse)
        .transpose()?
        .unwrap_or_default();
    let mut lists = spec.runtime.clone();
    lists.extend(extra);
    let Runtime {
        qcow2,
        locking,
        backing_format,
        discard,
        detect_zeroes,
        raw_window,
    } = runtime_options_with_backing(&lists)?;
    let opts = OpenOptions {
        format,
        probe: format.is_none(),
        read_only: a.read_only || spec.read_only,
        cache,
        qcow2,
        no_backing: a.no_backing || spec.no_backing,
        batch: a.batch,
        lock: LockOptions {
            locking,
            force_share: a.force_share,
        },
        metadata_only: a.metadata_only,
        aio: a.aio.map(parse_aio).transpose()?.unwrap_or_default(),
        backing_format,
        discard,
        detect_zeroes,
        nbd: spec.nbd.clone(),
        data_file: spec.data_file.clone(),
        null: spec.null,
        blkdebug: spec
            .blkdebug
            .as_deref()
            .map(qimg::storage::blkdebug::Config::from_options)
            .transpose()?,
        copy_on_read: spec.copy_on_read,
        blkdebug_above: spec
            .blkdebug_above
            .as_deref()
            .map(qimg::storage::blkdebug::Config::from_options)
            .transpose()?,
        file_image,
        protocol_driver: spec.protocol_driver,
        backing_resolver: Some(backing_resolver()),
        raw_window,
        quorum: spec.quorum.clone(),
        ..Default::default()
    };
    Ok(opts)
}

/// Reads the `json:{...}` backing file names QEMU writes into images, as QEMU reads them, but
/// only what stays on this machine: a file, read as `qcow2` or `raw`, with a `blkdebug` node
/// between them if named. A name read from an image never makes qimg connect anywhere or open
/// a device of QEMU's it has no business opening; other drivers and options are refused by
/// name.
pub fn backing_resolver() -> qimg::block::BackingResolver {
    qimg::block::BackingResolver(Arc::new(|name: &str| {
        let spec = super::image_name::parse(name, false)?;
        let refused = |what: &str| {
            qimg::Error::unsupported(format!(
                "Backing file '{name}' asks for {what}, which qimg does not open from a name \
                 found in an image (only a local file, read as qcow2 or raw, optionally \
                 through blkdebug)"
            ))
        };
        if spec.nbd.is_some() {
            return Err(refused("an NBD connection"));
        }
        if spec.null.is_some() {
            return Err(refused("a null-co device"));
        }
        if spec.quorum.is_some() {
            return Err(refused("a quorum"));
        }
        if spec.data_file.is_some() {
            return Err(refused("a data file"));
        }
        if spec.blkdebug_above.is_some() || spec.copy_on_read {
            return Err(refused("a filter or nested image"));
        }
        // A raw node between the format and the file is a window on the file (its `offset`
        // and `size`); any other image inside the file is refused.
        let raw_window = match spec.inner.as_deref() {
            None => None,
            Some(inner) => Some(raw_window_node(inner).ok_or_else(|| refused("a nested image"))?),
        };
        if let Some(d) = spec.protocol_driver.filter(|d| *d != "file") {
            return Err(refused(&format!("the '{d}' driver")));
        }
        if !spec.runtime.is_empty() {
            return Err(refused(&format!(
                "runtime options ({})",
                spec.runtime.join(",")
            )));
        }
        // A protocol node (`"driver": "file"`) is read as it is, never probed.
        let format = match spec.protocol_driver {
            Some(_) => Some(Format::Raw),
            None => spec.format.as_deref().map(Format::parse).transpose()?,
        };
        Ok(qimg::block::BackingNode {
            path: spec.path.into(),
            format,
            blkdebug: spec
                .blkdebug
                .as_deref()
                .map(qimg::storage::blkdebug::Config::from_options)
                .transpose()?,
            no_backing: spec.no_backing,
            raw_window,
        })
    }))
}

/// The window a raw node of a backing file name gives (`{"driver": "raw", "offset": ...,
/// "size": ..., "file": {"driver": "file", ...}}`): `None` if the node is anything else or
/// has other options.
fn raw_window_node(inner: &super::image_name::ImageSpec) -> Option<qimg::block::RawWindow> {
    let plain = inner.format.as_deref() == Some("raw")
        && inner.inner.is_none()
        && inner.nbd.is_none()
        && inner.null.is_none()
        && inner.quorum.is_none()
        && inner.data_file.is_none()
        && inner.blkdebug.is_none()
        && inner.blkdebug_above.is_none()
        && !inner.copy_on_read
        && inner.protocol_driver.is_none()
        && inner
            .runtime
            .iter()
            .flat_map(|o| parse_kv_list(o))
            .all(|(k, _)| k == "offset" || k == "size");
    if !plain {
        return None;
    }
    runtime_options_with_backing(&inner.runtime)
        .ok()
        .map(|r| r.raw_window.unwrap_or_default())
}

/// Opens an image with options from [`open_options`] (possibly adjusted).
pub async fn open_with(path: &str, opts: &OpenOptions) -> Result<Arc<dyn BlockDevice>> {
    let img = open_image(Path::new(path), opts).await?;
    if let Some(q) = img.as_qcow2() {
        // A dirty image was repaired while opening: say what was found, as QEMU does.
        for m in q.take_repair_messages() {
            eprintln!("{m}");
        }
    }
    warn_if_probed_raw(&*img, opts);
    Ok(img)
}

/// QEMU's warning for a writable image whose format was guessed as raw (its first sector is
/// then write-protected against changes of format).
pub fn warn_if_probed_raw(img: &dyn BlockDevice, opts: &OpenOptions) {
    if opts.format.is_none() && !opts.read_only && img.format() == Format::Raw {
        eprintln!(
            "WARNING: Image format was not specified for '{}' and probing guessed raw.\n         \
             Automatically detecting the format is dangerous for raw images, write operations \
             on block 0 will be restricted.\n         Specify the 'raw' format explicitly to \
             remove the restrictions.",
            img.filename()
        );
    }
}

/// Which snapshot `-l` names (`convert -l`, `serve -l`).
pub enum SnapshotParam {
    /// An ID, or else a name.
    IdOrName(String),
    /// `snapshot.id=` and/or `snapshot.name=`: all given must match.
    Exact {
        id: Option<String>,
        name: Option<String>,
    },
}

pub fn parse_snapshot_param(s: &str) -> qimg::Result<SnapshotParam> {
    if !s.starts_with("snapshot.") {
        return Ok(SnapshotParam::IdOrName(s.to_string()));
    }
    let (mut id, mut name) = (None, None);
    for (k, v) in parse_kv_list(s) {
        match k.as_str() {
            "snapshot.id" => id = Some(v),
            "snapshot.name" => name = Some(v),
            _ => {
                eprintln!("{}: Invalid parameter '{k}'", super::prog());
                return Err(qimg::Error::arg(format!(
                    "Failed in parsing snapshot param '{s}'"
                )));
            }
        }
    }
    Ok(SnapshotParam::Exact { id, name })
}

/// Makes a source read snapshot `sn` instead of its active disk (QEMU's temporary load).
pub async fn load_snapshot(img: &dyn BlockDevice, sn: &SnapshotParam) -> qimg::Result<()> {
    let Some(q) = img.as_qcow2() else {
        return Err(qimg::Error::unsupported(format!(
            "Block format '{}' used by device '' does not support temporarily loading internal \
             snapshots",
            img.format().name()
        )));
    };
    match sn {
        SnapshotParam::IdOrName(x) => match q.load_snapshot(Some(x), None).await {
            Ok(()) => Ok(()),
            Err(_) => q.load_snapshot(None, Some(x)).await,
        },
        SnapshotParam::Exact { id, name } => q.load_snapshot(id.as_deref(), name.as_deref()).await,
    }
}

/// qemu-img's `-r`: a size (suffixes allowed) between 0 and `i64::MAX`.
pub fn parse_rate(s: &str) -> std::result::Result<u64, String> {
    let out_of_range = || {
        format!(
            "Invalid rate limit specified. Must be between 0 and {}.",
            i64::MAX
        )
    };
    if let Some(rest) = s.strip_prefix('-') {
        if parse_opt_size(rest).is_ok() {
            return Err(out_of_range());
        }
    }
    match parse_opt_size(s) {
        Ok(n) if n <= i64::MAX as u64 => Ok(n),
        Ok(_) | Err(true) => Err(out_of_range()),
        Err(false) => Err(format!("Invalid rate limit specified: '{s}'.")),
    }
}

/// A size option value as QEMU's option parser takes it (up to 2^64 - 1): `Err(true)` when it
/// is a number out of that range, `Err(false)` when it is not a size at all.
pub fn parse_opt_size(v: &str) -> Result<u64, bool> {
    match parse_size(v) {
        Ok(n) => Ok(n),
        Err(SizeError::Invalid) => Err(false),
        // parse_size stops at i64::MAX; options go up to u64::MAX.
        Err(SizeError::TooLarge) => {
            let t = v.trim();
            let (num, mult) = match t.char_indices().last() {
                Some((i, c)) if c.is_ascii_alphabetic() && !t.starts_with("0x") => {
                    let shift = match c.to_ascii_lowercase() {
                        'k' => 10,
                        'm' => 20,
                        'g' => 30,
                        't' => 40,
                        'p' => 50,
                        'e' => 60,
                        _ => 0,
                    };
                    (&t[..i], 1u128 << shift)
                }
                _ => (t, 1),
            };
            let n = match num.strip_prefix("0x").or_else(|| num.strip_prefix("0X")) {
                Some(h) => u128::from_str_radix(h, 16).map_err(|_| true)? * mult,
                None => match num.parse::<u128>() {
                    Ok(n) => n * mult,
                    Err(_) => (num.parse::<f64>().map_err(|_| false)? * mult as f64) as u128,
                },
            };
            u64::try_from(n).map_err(|_| true)
        }
    }
}

/// qemu-io's and qemu-nbd's `-s`: the image is opened read-only as the backing file of a new
/// temporary qcow2 overlay, and every write goes to the overlay. The overlay lives in `$TMPDIR`
/// (else `/var/tmp`, as QEMU's) and is unlinked as soon as it is open, so that nothing is left
/// behind however the process ends.
pub async fn open_temporary_overlay(
    path: &str,
    opts: &OpenOptions,
) -> Result<Arc<dyn BlockDevice>> {
    use qimg::storage::file::{FileOptions, FileStorage};
    let base_opts = OpenOptions {
        read_only: true,
        ..opts.clone()
    };
    let base = open_with(path, &base_opts).await?;
    let (format, size) = (base.format(), base.size());
    base.close().await?;
    let abs = std::fs::canonicalize(path)
        .map_err(|e| qimg::Error::io(format!("Could not open '{path}'"), e))?;

    let dir = std::env::var_os("TMPDIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/var/tmp".into());
    let mut tmp = None;
    for _ in 0..16 {
        let p = dir.join(format!(
            "qimg-snapshot.{}.{:08x}.qcow2",
            std::process::id(),
            fastrand::u32(..)
        ));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&p)
        {
            Ok(_) => {
                tmp = Some(p);
                break;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(qimg::Error::io(
                    format!("Could not create temporary overlay in '{}'", dir.display()),
                    e,
                ))
            }
        }
    }
    let tmp = tmp.ok_or_else(|| {
        qimg::Error::arg(format!(
            "Could not create temporary overlay in '{}'",
            dir.display()
        ))
    })?;
    let result = async {
        let storage = FileStorage::create(&tmp, FileOptions::default())
            .map_err(|e| qimg::Error::io("Could not create temporary overlay", e))?;
        let o = qimg::qcow2::CreateOptions {
            size,
            backing_file: Some(abs.to_string_lossy().into_owned()),
            backing_format: Some(format.name().to_string()),
            ..Default::default()
        };
        qimg::qcow2::create(Arc::new(storage), &o).await?;
        let overlay_opts = OpenOptions {
            format: Some(Format::Qcow2),
            probe: false,
            read_only: false,
            backing_format: None,
            ..opts.clone()
        };
        open_image(&tmp, &overlay_opts).await
    }
    .await;
    let _ = std::fs::remove_file(&tmp);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_lists() {
        assert_eq!(
            parse_kv_list("a=1,b=x,,y,c"),
            vec![
                ("a".into(), "1".into()),
                ("b".into(), "x,y".into()),
                ("c".into(), "on".into())
            ]
        );
        assert!(parse_kv_list("").is_empty());
    }
}
