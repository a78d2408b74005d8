//! `qimg compare`: content equality of two images (exit 0 identical, 1 different, 2 error
//! opening, 3 error reading block status, 4 error reading data: qemu-img's codes).

use super::opts::{open, ImageArgs};
use super::progress::Progress;
use qimg::block::BlockDevice;
use qimg::IoBufMut;
use std::sync::Arc;

#[derive(clap::Args)]
pub struct Args {
    /// QEMU objects: secret,id=ID,data=TEXT|file=FILE[,format=raw|base64] (nothing uses a
    /// secret until encrypted images are supported); other object types are refused
    #[arg(long = "object", value_name = "OBJECT")]
    object: Vec<String>,
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
    if let Err(e) = super::objects::define(&a.object) {
        return super::fail(e.to_string());
    }
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
    let names = [a.filename1.as_str(), a.filename2.as_str()];
    // What qemu-img prints on standard output comes out at its exit when that is a pipe (its
    // stdout is fully buffered there), after any error: collected here, printed at the end.
    let mut out = String::new();
    let r = compare(&a1, &a2, names, a.strict, a.quiet, &mut out, &progress).await;
    if matches!(r, Ok(Outcome::Identical)) {
        progress.finish_before_message();
    }
    let _ = a1.close().await;
    let _ = a2.close().await;
    let flush_out = |out: &str| {
        if !out.is_empty() {
            print!("{out}");
        }
    };
    let r = match r {
        Ok(outcome) => outcome,
        Err(failure) => {
            eprintln!("{}: {}", super::prog(), failure.message);
            flush_out(&out);
            return failure.exit;
        }
    };
    flush_out(&out);
    match r {
        Outcome::Identical => {
            if !a.quiet {
                println!("Images are identical.");
            }
            progress.end_after_message();
            0
        }
        Outcome::Mismatch(msg) => {
            if !a.quiet {
                println!("{msg}");
            }
            progress.end_after_message();
            1
        }
    }
}

/// A comparison that could not finish: qemu-img's message and exit code (3: block status
/// failed, 4: a read failed).
struct Failure {
    exit: u8,
    message: String,
}

fn read_failure(off: u64, name: &str, e: qimg::Error) -> Failure {
    let why = match &e {
        qimg::Error::Io { source, .. } => qimg::error::strerror(source),
        other => other.to_string(),
    };
    Failure {
        exit: 4,
        message: format!("Error while reading offset {off} of {name}: {why}"),
    }
}

fn status_failure(name: &str) -> Failure {
    Failure {
        exit: 3,
        message: format!("Sector allocation test failed for {name}"),
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
    names: [&str; 2],
    strict: bool,
    quiet: bool,
    out: &mut String,
    progress: &Progress,
) -> std::result::Result<Outcome, Failure> {
    let (sa, sb) = (a.size(), b.size());
    if strict && sa != sb {
        return Ok(Outcome::Mismatch(
            "Strict mode: Image size mismatch!".into(),
        ));
    }
    let common = sa.min(sb);
    let mut off = 0;
    while off < common {
        let ea = super::map::entry_at(a, off, sa - off)
            .await
            .map_err(|_| status_failure(names[0]))?;
        let eb = super::map::entry_at(b, off, sb - off)
            .await
            .map_err(|_| status_failure(names[1]))?;
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
            let x = a
                .read(off, IoBufMut::zeroed(n as usize))
                .await
                .map_err(|e| read_failure(off, names[0], e))?;
            let y = b
                .read(off, IoBufMut::zeroed(n as usize))
                .await
                .map_err(|e| read_failure(off, names[1], e))?;
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
        out.push_str("Warning: Image size mismatch!\n");
    }
    let (longer, len, name) = if sa > sb {
        (a, sa, names[0])
    } else {
        (b, sb, names[1])
    };
    let mut off = common;
    while off < len {
        let n = CHUNK.min(len - off);
        let x = longer
            .read(off, IoBufMut::zeroed(n as usize))
            .await
            .map_err(|e| read_failure(off, name, e))?;
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
