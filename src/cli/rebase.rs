//! `qimg rebase`: make an image name another backing file (or none) while the guest keeps
//! reading the same data, as `qemu-img rebase` does. The work is `qimg::chain`'s; this is the
//! command line: qemu-img's options, messages and checks, in its order.

use super::opts::{open_options, open_with, ImageArgs};
use super::progress::Progress;
use qimg::block::{BlockDevice, Format};
use std::sync::Arc;

#[derive(clap::Args)]
pub struct Args {
    /// Format of the image
    #[arg(short = 'f')]
    format: Option<String>,
    /// New backing file ('' for none: the image is flattened)
    #[arg(short = 'b')]
    backing: Option<String>,
    /// Format of the new backing file
    #[arg(short = 'F')]
    backing_format: Option<String>,
    /// Unsafe: change the header only (the old and the new backing file must read the same)
    #[arg(short = 'u')]
    unsafe_mode: bool,
    /// Write the copied clusters compressed
    #[arg(short = 'c')]
    compress: bool,
    /// Show progress
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet
    #[arg(short = 'q')]
    quiet: bool,
    /// Cache mode of the image
    #[arg(short = 't')]
    cache: Option<String>,
    /// Cache mode of the backing files
    #[arg(short = 'T')]
    src_cache: Option<String>,
    /// Open the backing files without taking QEMU's locks against writers
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// QEMU objects: secret,id=ID,data=TEXT|file=FILE[,format=raw|base64] (nothing uses a
    /// secret until encrypted images are supported); other object types are refused
    #[arg(long = "object")]
    object: Vec<String>,
    /// Treat the file name as an option string: not supported yet
    #[arg(long = "image-opts")]
    image_opts: bool,
    filenames: Vec<String>,
}

/// The drivers QEMU knows (`qemu-img --help`): an unsafe rebase may name any of them as the
/// backing format, as the image is not opened through it; a safe one needs one qimg opens.
const QEMU_DRIVERS: &[&str] = &[
    "blkdebug",
    "blklogwrites",
    "blkverify",
    "bochs",
    "cloop",
    "compress",
    "copy-before-write",
    "copy-on-read",
    "dmg",
    "file",
    "ftp",
    "ftps",
    "gluster",
    "host_cdrom",
    "host_device",
    "http",
    "https",
    "iscsi",
    "iser",
    "luks",
    "nbd",
    "nfs",
    "null-aio",
    "null-co",
    "nvme",
    "parallels",
    "preallocate",
    "qcow",
    "qcow2",
    "qed",
    "quorum",
    "raw",
    "rbd",
    "replication",
    "snapshot-access",
    "ssh",
    "throttle",
    "vdi",
    "vhdx",
    "vmdk",
    "vpc",
    "vvfat",
];

fn usage_error(msg: &str) -> u8 {
    eprintln!("{}: {msg}", super::prog());
    eprintln!("Try '{} rebase --help' for more info", super::prog());
    1
}

pub async fn run(a: Args) -> u8 {
    if let Err(e) = super::objects::define(&a.object) {
        return super::fail(e.to_string());
    }
    let [filename] = a.filenames.as_slice() else {
        return usage_error("Expecting one image file name");
    };
    if !a.unsafe_mode && a.backing.is_none() {
        return usage_error("Must specify backing file (-b) or use unsafe mode (-u)");
    }
    for cache in [&a.cache, &a.src_cache].into_iter().flatten() {
        if let Err(e) = qimg::block::CacheMode::parse(cache) {
            return super::fail(e);
        }
    }
    if let Some(f) = a.backing_format.as_deref() {
        if !QEMU_DRIVERS.contains(&f) {
            return super::fail(format!("Invalid format name: '{f}'"));
        }
    }
    let new_format = a.backing_format.as_deref();
    // Compressed writes need a format that has them.
    if a.compress && a.format.as_deref().is_some_and(|f| f != "qcow2") {
        return super::fail("Compression not supported for this file format");
    }
    // `-u` without `-b` drops the backing file, as `-b ''` does.
    let new_name = a.backing.clone().filter(|b| !b.is_empty());
    if new_name.is_some() && new_format.is_none() {
        // qemu-img finds this out after copying; refusing first leaves the image untouched.
        return super::fail(format!(
            "Could not change the backing file to '{}': backing format must be specified",
            new_name.as_deref().unwrap_or_default()
        ));
    }
    let args = ImageArgs {
        image_opts: a.image_opts,
        path: filename,
        format: a.format.as_deref(),
        read_only: false,
        cache: a.cache.as_deref(),
        runtime_opts: &[],
        no_backing: a.unsafe_mode,
        batch: true,
        force_share: false,
        metadata_only: false,
        aio: None,
    };
    let img = match open_options(&args) {
        Ok((path, o)) => open_with(&path, &o).await,
        Err(e) => Err(e),
    };
    let img = match img {
        Ok(i) => i,
        Err(e) => return super::fail(format!("Could not open '{filename}': {e}")),
    };
    let r = rebase(&img, &a, new_name.as_deref(), new_format).await;
    let closed = img.close().await.map_err(|e| e.to_string());
    match r.and(closed) {
        Ok(()) => 0,
        Err(msg) => super::fail(msg),
    }
}

async fn rebase(
    img: &Arc<dyn BlockDevice>,
    a: &Args,
    new_name: Option<&str>,
    new_format: Option<&str>,
) -> std::result::Result<(), String> {
    let change_err = |e: &dyn std::fmt::Display| {
        format!(
            "Could not change the backing file to '{}': {e}",
            new_name.unwrap_or_default()
        )
    };
    let Some(q) = img.as_qcow2() else {
        if a.compress {
            return Err("Compression not supported for this file format".into());
        }
        return Err(change_err(&"Operation not supported"));
    };
    // `-c -u`: nothing is written in unsafe mode, so there is nothing to compress (qemu-img
    // accepts the combination too).
    if !a.unsafe_mode {
        let new = match new_name {
            None => None,
            Some(name) => Some(open_new_backing(img, a, name, new_format).await?),
        };
        let progress = Progress::new(a.progress && !a.quiet, img.size());
        let copied =
            qimg::chain::copy_for_rebase(img, new.as_ref(), a.compress, &|n| progress.add(n)).await;
        if let Some(n) = &new {
            if let Err(e) = n.close().await {
                tracing::warn!("{}: closing: {e}", n.filename());
            }
        }
        copied.map_err(|e| format!("Error while writing to the image: {e}"))?;
        progress.finish_before_message();
        progress.end_after_message();
    }
    q.change_backing_file(new_name, new_format)
        .await
        .map_err(|e| change_err(&e))
}

/// Opens the new backing file as the image will: relative to the image's directory.
async fn open_new_backing(
    img: &Arc<dyn BlockDevice>,
    a: &Args,
    name: &str,
    format: Option<&str>,
) -> std::result::Result<Arc<dyn BlockDevice>, String> {
    let fail = |e: &dyn std::fmt::Display| format!("Could not open new backing file '{name}': {e}");
    if let Some(f) = format {
        Format::parse(f).map_err(|e| fail(&e))?;
    }
    let path = qimg::block::resolve_backing(std::path::Path::new(img.filename()), name)
        .map_err(|e| fail(&e))?;
    let path = path.to_string_lossy().into_owned();
    let args = ImageArgs {
        image_opts: false,
        path: &path,
        format,
        read_only: true,
        cache: a.src_cache.as_deref(),
        runtime_opts: &[],
        no_backing: false,
        batch: true,
        force_share: a.force_share,
        metadata_only: false,
        aio: None,
    };
    let (path, opts) = open_options(&args).map_err(|e| fail(&e))?;
    open_with(&path, &opts).await.map_err(|e| fail(&e))
}
