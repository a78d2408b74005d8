//! `qimg resize`: grow a qcow2 image (or change the length of a raw one).

use super::fail;
use super::opts::{open, ImageArgs};
use qimg::size::parse_size;

#[derive(clap::Args)]
pub struct Args {
    #[arg(short = 'f')]
    format: Option<String>,
    /// Allow shrinking (raw images only)
    #[arg(long = "shrink")]
    shrink: bool,
    /// Quiet
    #[arg(short = 'q')]
    quiet: bool,
    filename: String,
    /// New size, or +SIZE / -SIZE relative to the current one
    #[arg(allow_hyphen_values = true)]
    size: String,
}

pub async fn run(a: Args) -> u8 {
    let img = match open(&ImageArgs {
        path: &a.filename,
        format: a.format.as_deref(),
        read_only: false,
        cache: None,
        runtime_opts: &[],
        // With its backing file, as qemu-img opens it: growing over a longer backing file
        // must zero the new area, and only the open backing file tells its length.
        no_backing: false,
        batch: false,
        force_share: false,
        metadata_only: false,
        aio: None,
    })
    .await
    {
        Ok(i) => i,
        Err(e) => return fail(format!("Could not open '{}': {e}", a.filename)),
    };
    let cur = img.size();
    let (sign, num) = match a.size.as_bytes().first() {
        Some(b'+') => (1i8, &a.size[1..]),
        Some(b'-') => (-1, &a.size[1..]),
        _ => (0, a.size.as_str()),
    };
    let Ok(n) = parse_size(num) else {
        let _ = img.close().await;
        return fail(format!("Invalid image size specified: '{}'.", a.size));
    };
    let new = match sign {
        1 => cur.saturating_add(n),
        -1 => cur.saturating_sub(n),
        _ => n,
    };
    let r = match img.as_qcow2() {
        Some(q) => q.grow(new).await,
        None => {
            if new < cur && !a.shrink {
                Err(qimg::Error::arg(
                    "Use the --shrink option to perform a shrink operation.",
                ))
            } else {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&a.filename)
                    .and_then(|f| f.set_len(new))
                    .map_err(|e| qimg::Error::io("resizing", e))
            }
        }
    };
    let close = img.close().await;
    match r.and(close) {
        Ok(()) => {
            if !a.quiet {
                println!("Image resized.");
            }
            0
        }
        Err(e) => fail(e),
    }
}
