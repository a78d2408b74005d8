//! `qimg create`: new qcow2 or raw images.

use super::fail;
use super::opts::parse_kv_list;
use qimg::block::{open_image, resolve_backing_node, Format, OpenOptions};
use qimg::format::CompressionType;
use qimg::qcow2::{create_with_data_file, CreateOptions, Preallocation};
use qimg::size::{parse_bool, parse_size};
use qimg::storage::file::{FileOptions, FileStorage};
use qimg::storage::{Storage, StorageRef};
use qimg::{Error, Result};
use std::path::Path;
use std::sync::Arc;

#[derive(clap::Args)]
pub struct Args {
    /// QEMU objects: secret,id=ID,data=TEXT|file=FILE[,format=raw|base64] (nothing uses a
    /// secret until encrypted images are supported); other object types are refused
    #[arg(long = "object", value_name = "OBJECT")]
    object: Vec<String>,
    /// Image format (qcow2 or raw)
    #[arg(short = 'f', default_value = "raw")]
    format: String,
    /// Format options: cluster_size, compat, refcount_bits, lazy_refcounts, compression_type,
    /// preallocation, backing_file, backing_fmt, size
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Backing file
    #[arg(short = 'b')]
    backing: Option<String>,
    /// Backing file format
    #[arg(short = 'F')]
    backing_format: Option<String>,
    /// Do not open the backing file to check it or take its size
    #[arg(short = 'u')]
    unsafe_backing: bool,
    /// Quiet
    #[arg(short = 'q')]
    quiet: bool,
    /// File to create
    filename: String,
    /// Virtual size (k, M, G, T, P, E suffixes)
    size: Option<String>,
}

pub async fn run(a: Args) -> u8 {
    if let Err(e) = super::objects::define(&a.object) {
        return super::fail(e.to_string());
    }
    match create_image(&a).await {
        Ok(()) => 0,
        Err(e) => fail(format!("{}: {e}", a.filename)),
    }
}

pub(crate) fn bad_size() -> Error {
    Error::arg(
        "Invalid image size specified. You may use k, M, G, T, P or E suffixes for\nkilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.",
    )
}

/// Target options shared by `create` and `convert`.
pub(crate) struct Parsed {
    pub opts: CreateOptions,
    pub size: Option<u64>,
    pub compat_given: Option<&'static str>,
    /// Options given explicitly, which qemu-img's "Formatting" line shows even at their
    /// default values.
    pub given: Given,
}

#[derive(Clone, Copy, Default)]
pub(crate) struct Given {
    pub preallocation: bool,
    pub data_file_raw: bool,
    pub extent_size_hint: Option<u64>,
}

/// Parses `-o` lists for a new image of `format`.
pub(crate) fn parse_options(format: Format, lists: &[String], size: Option<u64>) -> Result<Parsed> {
    let mut o = CreateOptions::default();
    let mut size = size;
    let mut compat_given = None;
    let mut given = Given::default();
    for list in lists {
        for (k, v) in parse_kv_list(list) {
            match (format, k.as_str()) {
                (_, "size") => size = Some(parse_size(&v).map_err(|_| bad_size())?),
                (_, "preallocation") => {
                    o.preallocation = Preallocation::parse(&v)?;
                    given.preallocation = true;
                }
                (Format::Qcow2, "cluster_size") => {
                    o.cluster_size = parse_size(&v).map_err(|_| {
                        Error::arg(
                            "Parameter 'cluster_size' expects a non-negative number below 2^64",
                        )
                    })?
                }
                (Format::Qcow2, "compat") => {
                    o.version = match v.as_str() {
                        "0.10" | "v2" => 2,
                        "1.1" | "v3" => 3,
                        other => {
                            return Err(Error::arg(format!(
                                "Invalid compatibility level: '{other}'"
                            )))
                        }
                    };
                    compat_given = Some(if o.version == 2 { "0.10" } else { "1.1" });
                }
                (Format::Qcow2, "refcount_bits") => {
                    o.refcount_bits = v.parse().map_err(|_| {
                        Error::arg(
                            "Parameter 'refcount_bits' expects a non-negative number below 2^64",
                        )
                    })?
                }
                (Format::Qcow2, "lazy_refcounts") => o.lazy_refcounts = parse_bool(&k, &v)?,
                (Format::Qcow2, "compression_type") => {
                    o.compression = CompressionType::parse(&v).ok_or_else(|| {
                        Error::arg(format!(
                            "Parameter 'compression_type' does not accept value '{v}'"
                        ))
                    })?
                }
                (Format::Qcow2, "backing_file") => o.backing_file = Some(v),
                (Format::Qcow2, "backing_fmt") => o.backing_format = Some(v),
                (Format::Qcow2, "extended_l2") => o.extended_l2 = parse_bool(&k, &v)?,
                (Format::Qcow2, "data_file") => o.data_file = Some(v),
                (Format::Qcow2, "data_file_raw") => {
                    o.data_file_raw = parse_bool(&k, &v)?;
                    given.data_file_raw = true;
                }
                (Format::Qcow2, "encryption" | "encrypt.format") => {
                    return Err(Error::unsupported(format!(
                        "option '{k}' is not supported yet"
                    )))
                }
                (Format::Qcow2, "nocow") => {}
                // The file protocol's XFS extent size hint: 0 sets none (what qimg always does).
                (_, "extent_size_hint") => {
                    let hint = parse_size(&v).map_err(|_| {
                        Error::arg(
                            "Parameter 'extent_size_hint' expects a non-negative number below 2^64",
                        )
                    })?;
                    if hint != 0 {
                        return Err(Error::unsupported(
                            "extent_size_hint: only 0 (no extent size hint) is supported",
                        ));
                    }
                    given.extent_size_hint = Some(hint);
                }
                _ => return Err(Error::arg(format!("Invalid parameter '{k}'"))),
            }
        }
    }
    Ok(Parsed {
        opts: o,
        size,
        compat_given,
        given,
    })
}

/// A lock conflict says only QEMU's words; other errors say what failed.
fn create_error(e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::WouldBlock {
        Error::Locked(e.to_string())
    } else {
        Error::io("Could not create image", e)
    }
}

/// Creates the image file (qcow2 or raw) with validated options.
pub(crate) async fn make(path: &str, format: Format, o: &CreateOptions) -> Result<()> {
    match format {
        Format::Qcow2 => {
            // qemu-img rounds a qcow2 image's size up to whole sectors (the "Formatting" line
            // shows the size asked for).
            let o = &CreateOptions {
                size: o.size.checked_next_multiple_of(512).unwrap_or(o.size),
                ..o.clone()
            };
            o.validate()?;
            // The data file first (QEMU's order): no image is left behind if it cannot be
            // made. Its name is used as given (relative to the working directory, as QEMU
            // resolves it when opening).
            let data = match &o.data_file {
                Some(name) => Some(Arc::new(
                    FileStorage::create(Path::new(name), FileOptions::default()).map_err(|e| {
                        if e.kind() == std::io::ErrorKind::WouldBlock {
                            Error::Locked(e.to_string())
                        } else {
                            Error::io(format!("Could not create '{name}'"), e)
                        }
                    })?,
                ) as StorageRef),
                None => None,
            };
            let s: StorageRef = Arc::new(
                FileStorage::create(Path::new(path), FileOptions::default())
                    .map_err(create_error)?,
            );
            create_with_data_file(s, data, o).await
        }
        Format::Raw => create_raw(path, o.size, o.preallocation).await,
    }
}

async fn create_image(a: &Args) -> Result<()> {
    let format = Format::parse(&a.format)?;
    let size = a
        .size
        .as_deref()
        .map(|s| parse_size(s).map_err(|_| bad_size()))
        .transpose()?;
    let Parsed {
        opts: mut o,
        mut size,
        compat_given,
        given,
    } = parse_options(format, &a.options, size)?;
    if let Some(b) = &a.backing {
        o.backing_file = Some(b.clone());
    }
    if let Some(f) = &a.backing_format {
        o.backing_format = Some(f.clone());
    }
    if format == Format::Raw && o.preallocation == Preallocation::Metadata {
        return Err(Error::arg("Unsupported preallocation mode 'metadata'"));
    }
    if o.backing_file.is_some() && format == Format::Raw {
        return Err(Error::arg(
            "Backing file not supported for file format 'raw'",
        ));
    }

    // `file:NAME` names the file NAME (the prefix stays in the "Formatting" line, as QEMU's).
    let target = super::image_name::strip_file_prefix(&a.filename);
    // Without a size, a backing file gives it.
    if let (Some(b), None) = (&o.backing_file, size) {
        if a.unsafe_backing {
            return Err(Error::arg(
                "Image creation needs a size parameter when the backing file is not opened (-u)",
            ));
        }
        let fmt = o.backing_format.as_deref().map(Format::parse).transpose()?;
        let resolver = super::opts::backing_resolver();
        let (path, node) = resolve_backing_node(Path::new(&target), b, Some(&resolver))?;
        let fmt = fmt.or(node.as_ref().and_then(|n| n.format));
        let opts = OpenOptions {
            format: fmt,
            probe: fmt.is_none(),
            read_only: true,
            no_backing: node.as_ref().is_some_and(|n| n.no_backing),
            blkdebug: node.and_then(|n| n.blkdebug),
            backing_resolver: Some(resolver),
            ..Default::default()
        };
        let img = open_image(&path, &opts)
            .await
            .map_err(|e| Error::arg(format!("{e}\nCould not open backing image.")))?;
        size = Some(img.size());
        img.close().await?;
    } else if let (Some(b), false) = (&o.backing_file, a.unsafe_backing) {
        // The backing file must at least be there.
        let resolver = super::opts::backing_resolver();
        let (path, _) = resolve_backing_node(Path::new(&target), b, Some(&resolver))?;
        if !path.exists() {
            return Err(Error::arg(format!(
                "Could not open backing file: Could not open '{}': No such file or directory",
                path.display()
            )));
        }
    }
    let size = size.ok_or_else(|| Error::arg("Image creation needs a size parameter"))?;
    o.size = size;

    if !a.quiet {
        println!(
            "Formatting '{}', {}",
            a.filename,
            describe(format, &o, compat_given, given)
        );
    }
    make(&target, format, &o).await
}

/// The `key=value` summary qemu-img prints when formatting.
pub(crate) fn describe(
    format: Format,
    o: &CreateOptions,
    compat: Option<&str>,
    given: Given,
) -> String {
    match format {
        Format::Raw => {
            let mut s = format!("fmt=raw size={}", o.size);
            if o.preallocation != Preallocation::Off || given.preallocation {
                s += &format!(" preallocation={}", o.preallocation.name());
            }
            if let Some(h) = given.extent_size_hint {
                s += &format!(" extent_size_hint={h}");
            }
            s
        }
        Format::Qcow2 => {
            let mut s = format!(
                "fmt=qcow2 cluster_size={} extended_l2={}",
                o.cluster_size,
                if o.extended_l2 { "on" } else { "off" }
            );
            if o.preallocation != Preallocation::Off || given.preallocation {
                s += &format!(" preallocation={}", o.preallocation.name());
            }
            s += &format!(" compression_type={} size={}", o.compression.name(), o.size);
            if let Some(c) = compat {
                s += &format!(" compat={c}");
            }
            // String values are printed as option syntax: a comma doubled (QEMU's escaping).
            let esc = |v: &str| v.replace(',', ",,");
            if let Some(b) = &o.backing_file {
                s += &format!(" backing_file={}", esc(b));
            }
            if let Some(f) = &o.backing_format {
                s += &format!(" backing_fmt={}", esc(f));
            }
            if let Some(f) = &o.data_file {
                s += &format!(" data_file={}", esc(f));
            }
            if o.data_file_raw || given.data_file_raw {
                s += &format!(
                    " data_file_raw={}",
                    if o.data_file_raw { "on" } else { "off" }
                );
            }
            s += &format!(
                " lazy_refcounts={} refcount_bits={}",
                if o.lazy_refcounts { "on" } else { "off" },
                o.refcount_bits
            );
            if let Some(h) = given.extent_size_hint {
                s += &format!(" extent_size_hint={h}");
            }
            s
        }
    }
}

async fn create_raw(path: &str, size: u64, prealloc: Preallocation) -> Result<()> {
    let s = FileStorage::create(Path::new(path), FileOptions::default()).map_err(create_error)?;
    let ctx = |e| Error::io("Could not resize the new image", e);
    match prealloc {
        Preallocation::Falloc if size > 0 => s.allocate(0, size).await.map_err(ctx)?,
        Preallocation::Full if size > 0 => {
            let zeros = qimg::IoBuf::zeroed(8 << 20);
            let mut off = 0;
            while off < size {
                let n = (size - off).min(8 << 20);
                s.write_at(zeros.slice(0..n as usize), off)
                    .await
                    .map_err(ctx)?;
                off += n;
            }
        }
        _ => {}
    }
    s.set_len(size).await.map_err(ctx)?;
    s.flush().await.map_err(ctx)?;
    Ok(())
}
