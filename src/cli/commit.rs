//! `qimg commit`: write the data an image (and the layers between it and the base) holds into
//! a backing file, as `qemu-img commit` does. The work (and its crash ordering) is
//! `qimg::chain::commit`'s; this is the command line: qemu-img's options and messages.

use super::opts::{open_options, open_with, ImageArgs};
use super::progress::Progress;
use qimg::chain::CommitOptions;

#[derive(clap::Args)]
pub struct Args {
    /// Format of the image
    #[arg(short = 'f')]
    format: Option<String>,
    /// Cache mode
    #[arg(short = 't')]
    cache: Option<String>,
    /// The backing file to commit into (default: the image's own); implies -d
    #[arg(short = 'b')]
    base: Option<String>,
    /// Rate limit in bytes per second (suffixes k, M, G ...)
    #[arg(short = 'r', allow_hyphen_values = true)]
    rate: Option<String>,
    /// Do not empty the image after the commit
    #[arg(short = 'd')]
    keep: bool,
    /// Show progress
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet
    #[arg(short = 'q')]
    quiet: bool,
    /// QEMU objects: secret,id=ID,data=TEXT|file=FILE[,format=raw|base64] (nothing uses a
    /// secret until encrypted images are supported); other object types are refused
    #[arg(long = "object")]
    object: Vec<String>,
    /// Treat the file name as an option string: not supported yet
    #[arg(long = "image-opts")]
    image_opts: bool,
    filenames: Vec<String>,
}

pub async fn run(a: Args) -> u8 {
    if let Err(e) = super::objects::define(&a.object) {
        return super::fail(e.to_string());
    }
    let [filename] = a.filenames.as_slice() else {
        eprintln!("{}: Expecting one image file name", super::prog());
        eprintln!("Try '{} commit --help' for more info", super::prog());
        return 1;
    };
    let rate = match a.rate.as_deref().map(super::opts::parse_rate).transpose() {
        Ok(r) => r.filter(|&r| r > 0),
        Err(msg) => return super::fail(msg),
    };
    if let Some(Err(e)) = a.cache.as_deref().map(qimg::block::CacheMode::parse) {
        return super::fail(e);
    }
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
    let depth = match base_depth(&args, a.base.as_deref()).await {
        Ok(d) => d,
        Err(msg) => return super::fail(msg),
    };
    let opened = match open_options(&args) {
        Ok((path, mut o)) => {
            o.writable_backing_depth = Some(depth);
            open_with(&path, &o).await
        }
        Err(e) => Err(e),
    };
    let top = match opened {
        Ok(i) => i,
        Err(e) => return super::fail(format!("Could not open '{filename}': {e}")),
    };
    // `-b` implies `-d`: emptying the image would expose the layers between it and the base.
    let empty_top = !a.keep && a.base.is_none();
    let progress = Progress::new(a.progress && !a.quiet, top.size());
    let opts = CommitOptions { empty_top, rate };
    let r = qimg::chain::commit(&top, depth, opts, &|n| progress.add(n)).await;
    let closed = top.close().await;
    // A failure at close after a job that succeeded (bitmaps that could not be stored, a
    // flush) is reported as qemu-img reports it.
    if let (Ok(()), Err(e)) = (&r, &closed) {
        let why = match e {
            qimg::Error::Io { source, .. } => qimg::error::strerror(source),
            e => e.to_string(),
        };
        return super::fail(format!("Error while closing the image: {why}"));
    }
    match r.and(closed) {
        Ok(()) => {
            progress.finish_before_message();
            progress.end_after_message();
            if !a.quiet {
                println!("Image committed.");
            }
            0
        }
        // A job's I/O error is reported by its errno alone, as QEMU's block jobs report it.
        Err(qimg::Error::Io { source, .. }) => super::fail(format!(
            "Block job failed: {}",
            qimg::error::strerror(&source)
        )),
        Err(e) => super::fail(format!("Block job failed: {e}")),
    }
}

/// How many layers below the image the base is: 1 without `-b`, else the layer the name
/// designates (see `qimg::chain::find_backing_depth`).
async fn base_depth(
    args: &ImageArgs<'_>,
    base: Option<&str>,
) -> std::result::Result<usize, String> {
    let filename = args.path;
    let probe = ImageArgs {
        read_only: true,
        metadata_only: true,
        ..*args
    };
    let img = match open_options(&probe) {
        Ok((path, o)) => open_with(&path, &o).await,
        Err(e) => Err(e),
    }
    .map_err(|e| format!("Could not open '{filename}': {e}"))?;
    let found = match base {
        None => img.backing().map(|_| 1),
        Some(name) => qimg::chain::find_backing_depth(&img, name),
    };
    if let Err(e) = img.close().await {
        tracing::warn!("{filename}: closing: {e}");
    }
    match (found, base) {
        (Some(d), _) => Ok(d),
        (None, None) => Err("Image does not have a backing file".into()),
        (None, Some(b)) => Err(format!(
            "Did not find '{b}' in the backing chain of '{filename}'"
        )),
    }
}
