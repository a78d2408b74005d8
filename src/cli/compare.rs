//! `qimg compare`: content equality of two images (exit 0 identical, 1 different, 2 error).

use super::opts::{open, ImageArgs};
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
    /// Show progress (accepted, ignored)
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
    let _ = a.progress;
    let open_one = |path: &str, fmt: Option<&str>| {
        let path = path.to_string();
        let fmt = fmt.map(str::to_string);
        let cache = a.cache.clone();
        async move {
            open(&ImageArgs {
                path: &path,
                format: fmt.as_deref(),
                read_only: true,
                cache: cache.as_deref(),
                runtime_opts: &[],
                no_backing: false,
                batch: false,
                force_share: a.force_share,
                metadata_only: false,
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
            eprintln!("qimg: {e}");
            return 2;
        }
    };
    let r = compare(&a1, &a2, a.strict).await;
    let _ = a1.close().await;
    let _ = a2.close().await;
    match r {
        Ok(Outcome::Identical) => {
            if !a.quiet {
                println!("Images are identical.");
            }
            0
        }
        Ok(Outcome::Mismatch(msg)) => {
            if !a.quiet {
                println!("{msg}");
            }
            1
        }
        Err(e) => {
            eprintln!("qimg: Error while reading: {e}");
            2
        }
    }
}

async fn compare(
    a: &Arc<dyn BlockDevice>,
    b: &Arc<dyn BlockDevice>,
    strict: bool,
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
        let n = CHUNK.min(common - off);
        // Both ranges known to read as zeros: nothing to read.
        if both_zero(a, b, off, n).await? {
            off += n;
            continue;
        }
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
    // The longer image must read as zeros past the shorter one.
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

async fn zero_through_chain(img: &Arc<dyn BlockDevice>, off: u64, n: u64) -> Result<bool> {
    let e = super::map::entry_at(img, off, n).await?;
    Ok(e.length >= n && e.zero && !e.data)
}

async fn both_zero(
    a: &Arc<dyn BlockDevice>,
    b: &Arc<dyn BlockDevice>,
    off: u64,
    n: u64,
) -> Result<bool> {
    Ok(zero_through_chain(a, off, n).await? && zero_through_chain(b, off, n).await?)
}
