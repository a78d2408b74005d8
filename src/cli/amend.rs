//! `qimg amend`: change an existing image's format options, as `qemu-img amend` does (same
//! options, order of the changes and messages). The work is `qimg::qcow2::amend`'s.

use super::opts::{open, parse_kv_list, ImageArgs};
use super::{fail, prog};
use qimg::block::BlockDevice;
use qimg::size::parse_size;
use std::sync::Arc;

#[derive(clap::Args)]
pub struct Args {
    /// Format of the image
    #[arg(short = 'f')]
    format: Option<String>,
    /// Options to change (compat, refcount_bits, lazy_refcounts, size, backing_file, backing_fmt)
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Cache mode
    #[arg(short = 't')]
    cache: Option<String>,
    /// Show progress (qemu-img's start and end lines; no steps in between)
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet
    #[arg(short = 'q')]
    quiet: bool,
    /// Allow changes that need it (encryption): not supported yet
    #[arg(long = "force")]
    force: bool,
    /// QEMU objects: secret,id=ID,data=TEXT|file=FILE[,format=raw|base64] (nothing uses a
    /// secret until encrypted images are supported); other object types are refused
    #[arg(long = "object")]
    object: Vec<String>,
    /// Treat the file name as an option string: not supported yet
    #[arg(long = "image-opts")]
    image_opts: bool,
    filenames: Vec<String>,
}

const HELP: &str = "Amend options for 'qcow2':
  backing_file=<str>     - File name of a base image
  backing_fmt=<str>      - Image format of the base image
  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])
  data_file=<str>        - File name of an external data file
  data_file_raw=<bool (on/off)> - The external data file must stay valid as a raw image
  lazy_refcounts=<bool (on/off)> - Postpone refcount updates
  refcount_bits=<num>    - Width of a reference count entry in bits
  size=<size>            - Virtual disk size
";

/// Options qemu-img accepts only when creating an image.
const CREATE_ONLY: &[&str] = &[
    "cluster_size",
    "preallocation",
    "compression_type",
    "extended_l2",
    "encryption",
    "nocow",
    "extent_size_hint",
];

#[derive(Default)]
struct Changes {
    version: Option<u32>,
    lazy: Option<bool>,
    refcount_bits: Option<u32>,
    size: Option<u64>,
    backing_file: Option<String>,
    backing_fmt: Option<String>,
    /// `data_file=`: the new name (`Some("")` removes it).
    data_file: Option<String>,
    data_file_raw: Option<bool>,
}

fn parse_changes(list: &[(String, String)]) -> Result<Changes, String> {
    let mut c = Changes::default();
    for (k, v) in list {
        match k.as_str() {
            "compat" => {
                c.version = Some(match v.as_str() {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => return Err(format!("Unknown compatibility level {v}")),
                })
            }
            "lazy_refcounts" => {
                c.lazy = Some(match v.as_str() {
                    "on" | "true" => true,
                    "off" | "false" => false,
                    _ => {
                        return Err("Parameter 'lazy_refcounts' expects 'on' or 'off'".into())
                    }
                })
            }
            "refcount_bits" => match v.parse::<u32>() {
                Ok(n) if n.is_power_of_two() && n <= 64 => c.refcount_bits = Some(n),
                _ => {
                    return Err(
                        "Refcount width must be a power of two and may not exceed 64 bits".into(),
                    )
                }
            },
            "size" => {
                c.size = Some(parse_size(v).map_err(|_| {
                    "Parameter 'size' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.".to_string()
                })?)
            }
            "backing_file" => c.backing_file = Some(v.clone()),
            "backing_fmt" => c.backing_fmt = Some(v.clone()),
            "data_file" => c.data_file = Some(v.clone()),
            "data_file_raw" => {
                c.data_file_raw = Some(match v.as_str() {
                    "on" | "true" => true,
                    "off" | "false" => false,
                    _ => return Err("Parameter 'data_file_raw' expects 'on' or 'off'".into()),
                })
            }
            k if CREATE_ONLY.contains(&k) => {
                return Err(format!(
                    "Invalid parameter '{k}'\nThis option is only supported for image creation"
                ))
            }
            k if k.starts_with("encrypt") => {
                return Err(format!(
                    "Invalid parameter '{k}'\nEncryption is not supported yet"
                ))
            }
            _ => return Err(format!("Invalid parameter '{k}'")),
        }
    }
    Ok(c)
}

pub async fn run(a: Args) -> u8 {
    if a.force {
        return fail("--force is not supported by amend yet");
    }
    if let Err(e) = super::objects::define(&a.object) {
        return fail(e.to_string());
    }
    if a.options.is_empty() {
        eprintln!("{}: Must specify options (-o)", prog());
        eprintln!("Try '{} amend --help' for more info", prog());
        return 1;
    }
    if a.options
        .iter()
        .any(|o| o.split(',').any(|x| x == "help" || x == "?"))
    {
        print!("{HELP}");
        return 0;
    }
    let [filename] = a.filenames.as_slice() else {
        eprintln!("{}: Expecting one image file name", prog());
        eprintln!("Try '{} amend --help' for more info", prog());
        return 1;
    };
    let joined = a.options.join(",");
    if joined.is_empty() {
        return fail("Invalid option list: ");
    }
    let changes = match parse_changes(&parse_kv_list(&joined)) {
        Ok(c) => c,
        Err(msg) => return fail(msg),
    };
    let args = ImageArgs {
        image_opts: a.image_opts,
        path: filename,
        format: a.format.as_deref(),
        read_only: false,
        cache: a.cache.as_deref(),
        runtime_opts: &[],
        no_backing: false,
        batch: true,
        force_share: false,
        metadata_only: false,
        aio: None,
    };
    let mut img = match open(&args).await {
        Ok(i) => i,
        Err(e) => return fail(format!("Could not open '{filename}': {e}")),
    };
    // qemu-img prints 0% before and 100% after the changes, failed or not, and ends the
    // progress output after any error message.
    let progress = super::progress::Progress::new(a.progress && !a.quiet, 10000);
    let r = amend(&args, &mut img, &changes, &progress).await;
    let closed = img.close().await;
    progress.finish_repeating_before_message();
    let code = match r.and(closed.map_err(|e| e.to_string())) {
        Ok(()) => 0,
        Err(msg) => fail(msg),
    };
    progress.end_after_message();
    code
}

/// The changes in qemu-img's order: upgrade, refcount width, backing file, lazy refcounts, size,
/// downgrade last.
async fn amend(
    args: &ImageArgs<'_>,
    img: &mut Arc<dyn BlockDevice>,
    c: &Changes,
    progress: &super::progress::Progress,
) -> Result<(), String> {
    let Some(q) = img.as_qcow2() else {
        return Err(format!(
            "Format driver '{}' does not support option amendment",
            img.format().name()
        ));
    };
    let h = q.header();
    let old_version = h.version;
    let version = c.version.unwrap_or(old_version);
    if c.lazy == Some(true) && version < 3 {
        return Err(
            "Lazy refcounts only supported with compatibility level 1.1 and above (use \
                    compat=1.1 or greater)"
                .into(),
        );
    }
    if c.refcount_bits.is_some_and(|b| b != 16) && version < 3 {
        return Err(
            "Refcount widths other than 16 bits require compatibility level 1.1 or \
                    above (use compat=1.1 or greater)"
                .into(),
        );
    }
    // Naming the backing file (or format) at all means naming both as they are (QEMU's rule:
    // an option left out counts as "none").
    let backing_changes = (c.backing_file.is_some() || c.backing_fmt.is_some())
        && (c.backing_file.as_deref() != h.backing_file.as_deref()
            || c.backing_fmt.as_deref() != h.backing_format());
    if backing_changes {
        return Err("Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.".into());
    }
    let e = |e: qimg::Error| e.to_string();
    if version > old_version {
        q.set_version(version).await.map_err(e)?;
    }
    if let Some(bits) = c.refcount_bits {
        if bits != q.header().refcount_bits() {
            q.change_refcount_width(bits).await.map_err(e)?;
            // The handle is closed now: go on with a new one.
            *img = open(args)
                .await
                .map_err(|err| format!("Could not reopen '{}': {err}", args.path))?;
        }
    }
    let Some(q) = img.as_qcow2() else {
        return Err("the image changed format".into());
    };
    // The raw bit, then the name (QEMU's order).
    if let Some(on) = c.data_file_raw {
        q.set_data_file_raw(on).await.map_err(e)?;
    }
    if let Some(name) = &c.data_file {
        q.set_data_file_name(Some(name.as_str()).filter(|n| !n.is_empty()))
            .await
            .map_err(e)?;
    }
    if let Some(on) = c.lazy {
        if on != q.header().lazy_refcounts() {
            q.set_lazy_refcounts(on).await.map_err(e)?;
        }
    }
    if let Some(size) = c.size {
        if size != q.virtual_size() {
            // As QEMU's amend: growing or shrinking, without preallocation.
            q.resize(size, qimg::qcow2::Preallocation::Off)
                .await
                .map_err(e)?;
        }
    }
    if version < old_version {
        q.set_version_with_progress(version, &|done, total| progress.set_fraction(done, total))
            .await
            .map_err(|err| {
                // A snapshot whose L1 table cannot be read stops the expansion of zero
                // clusters: QEMU reports the snapshot's error on its own line, then the
                // downgrade's, by errno.
                let text = err.to_string();
                if text.starts_with("Snapshot L1 table") {
                    let errno = std::io::Error::from_raw_os_error(err.errno());
                    format!(
                        "{text}\n{}: Failed to turn zero into data clusters: {}",
                        super::prog(),
                        qimg::error::strerror(&errno)
                    )
                } else {
                    text
                }
            })?;
    }
    Ok(())
}
