//! `qimg compare`: content equality of two images (exit 0 identical, 1 different, 2 error).

use super::opts::{open, ImageArgs};
use super::progress::Progress;
use qimg::block::BlockDevice;
use qimg::{IoBufMut, Result};
use std::sync::Arc;

#[derive(clap::Args)]
pub struct Args {
    /// Format of the first image
    #[arg(short = 'f')]
    format1: Option<String>,
    /// Format of the second image
    #[arg(short = 'F')]
    format2: Option<String>,
    /// The image name is an option list (driver=qcow2,file.filename=NAME,...)
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// Strict mode: fail on different image sizes or allocation
    #[arg(short = 's')]
    strict: bool,
    /// Quiet
    #[arg(short = 'q')]
    quiet: bool,
    /// Cache mode
    #[arg(short = 'T')]
    cache: Option<String>,
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Show progress
    #[arg(short = 'p')]
    progress: bool,
    filename1: String,
    filename2: String,
}

const CHUNK: u64 = 1 << 20;

enum Outcome {
    Identical,
    Mismatch(String),
}

pub async fn run(a: Args) -> u8 {
    let image_opts = a.image_opts;
    let open_one = |path: &str, fmt: Option<&str>| {
        let path = path.to_string();
        let fmt = fmt.map(str::to_string);
        let cache = a.cache.clone();
        async move {
            open(&ImageArgs {
                image_opts,
                path: &path,
                format: fmt.as_deref(),
                read_only: true,
                cache: cache.as_deref(),
                runtime_opts: &[],
                no_backing: false,
                batch: false,
                force_share: a.force_share,
                metadata_only: false,
                aio: None,
            })
            .await
            .map_err(|e| format!("Could not open '{path}': {e}"))
        }
    };
    let (a1, a2) = match (
        open_one(&a.filename1, a.format1.as_deref()).await,
        open_one(&a.filename2, a.format2.as_deref()).await,
    ) {
        (Ok(x), Ok(y)) => (x, y),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("{}: {e}", super::prog());
            return 2;
        }
    };
    let progress = Progress::new(a.progress && !a.quiet, a1.size().min(a2.size()));
    let r = compare(&a1, &a2, a.strict, a.quiet, &progress).await;
    if matches!(r, Ok(Outcome::Identical)) {
        progress.finish_before_message();
    }
    let _ = a1.close().await;
    let _ = a2.close().await;
    match r {
        Ok(Outcome::Identical) => {
            if !a.quiet {
                println!("Images are identical.");
            }
            progress.end_after_message();
            0
        }
        Ok(Outcome::Mismatch(msg)) => {
            if !a.quiet {
                println!("{msg}");
            }
            progress.end_after_message();
            1
        }
        Err(e) => {
            eprintln!("{}: Error while reading: {e}", super::prog());
            2
        }
    }
}

/// The block status qemu-img's strict mode compares: allocated (anywhere in the chain), zero,
/// data, compressed, and whether the extent reaches the end of the image (QEMU's `EOF` flag is
/// part of the status it compares, so an unallocated tail differs from an unallocated middle).
fn strict_status(e: &super::map::MapEntry, size: u64) -> (bool, bool, bool, bool, bool) {
    (
        e.present,
        e.zero,
        e.data,
        e.compressed,
        e.start + e.length >= size,
    )
}

/// Walks the common part extent by extent, as qemu-img does: ranges that read as zeros in both
/// images are not read; strict mode fails at the first extent whose status differs.
async fn compare(
    a: &Arc<dyn BlockDevice>,
    b: &Arc<dyn BlockDevice>,
    strict: bool,
    quiet: bool,
    progress: &Progress,
) -> Result<Outcome> {
    let (sa, sb) = (a.size(), b.size());
    if strict && sa != sb {
        return Ok(Outcome::Mismatch(
            "Strict mode: Image size mismatch!".into(),
        ));
    }
    let common = sa.min(sb);
    let mut off = 0;
    while off < common {
        let (ea, eb) = tokio::try_join!(
            super::map::entry_at(a, off, sa - off),
            super::map::entry_at(b, off, sb - off)
        )?;
        let extent = ea.length.min(eb.length).min(common - off).max(1);
        if strict && strict_status(&ea, sa) != strict_status(&eb, sb) {
            return Ok(Outcome::Mismatch(format!(
                "Strict mode: Offset {off} block status mismatch!"
            )));
        }
        progress.add(extent);
        if ea.zero && !ea.data && eb.zero && !eb.data {
            off += extent;
            continue;
        }
        let end = off + extent;
        while off < end {
            let n = CHUNK.min(end - off);
            let (x, y) = tokio::try_join!(
                a.read(off, IoBufMut::zeroed(n as usize)),
                b.read(off, IoBufMut::zeroed(n as usize))
            )?;
            if let Some(i) = x.iter().zip(y.iter()).position(|(p, q)| p != q) {
                return Ok(Outcome::Mismatch(format!(
                    "Content mismatch at offset {}!",
                    off + first_sector(i as u64)
                )));
            }
            off += n;
        }
    }
    // The longer image must read as zeros past the shorter one.
    if sa != sb && !quiet {
        println!("Warning: Image size mismatch!");
    }
    let (longer, len) = if sa > sb { (a, sa) } else { (b, sb) };
    let mut off = common;
    while off < len {
        let n = CHUNK.min(len - off);
        let x = longer.read(off, IoBufMut::zeroed(n as usize)).await?;
        if let Some(i) = x.iter().position(|&p| p != 0) {
            return Ok(Outcome::Mismatch(format!(
                "Content mismatch at offset {}!",
                off + first_sector(i as u64)
            )));
        }
        off += n;
    }
    Ok(Outcome::Identical)
}

/// qemu-img reports mismatches at sector granularity.
fn first_sector(i: u64) -> u64 {
    i / 512 * 512
}
