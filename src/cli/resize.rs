//! `qimg resize`: change an image's virtual size, as `qemu-img resize` does: grow (optionally
//! preallocating the new area) or, with `--shrink`, shrink. Checks and messages in qemu-img's
//! order: the preallocation mode and the size are parsed before the image is opened; then
//! "must be positive", preallocation only for growing, `--shrink` required to shrink; then the
//! block layer's size limit and the format driver's own checks.

use super::opts::{open, parse_opt_size, ImageArgs};
use super::{fail, prog};
use qimg::qcow2::Preallocation;

/// QEMU's `BDRV_MAX_LENGTH`: the largest size the block layer takes (2^63 - 2^30).
const BDRV_MAX_LENGTH: i64 = i64::MAX - ((1 << 30) - 1);

#[derive(clap::Args)]
pub struct Args {
    /// QEMU objects: secret,id=ID,data=TEXT|file=FILE[,format=raw|base64] (nothing uses a
    /// secret until encrypted images are supported); other object types are refused
    #[arg(long = "object", value_name = "OBJECT")]
    object: Vec<String>,
    #[arg(short = 'f')]
    format: Option<String>,
    /// The image name is an option list (driver=qcow2,file.filename=NAME,...)
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// Allow shrinking the image (data past the new end is lost)
    #[arg(long = "shrink")]
    shrink: bool,
    /// Preallocation of the grown area: off, metadata (qcow2), falloc, full
    #[arg(long = "preallocation")]
    preallocation: Option<String>,
    /// Quiet
    #[arg(short = 'q')]
    quiet: bool,
    filename: String,
    /// New size, or +SIZE / -SIZE relative to the current one
    #[arg(allow_hyphen_values = true)]
    size: String,
}

pub async fn run(a: Args) -> u8 {
    if let Err(e) = super::objects::define(&a.object) {
        return super::fail(e.to_string());
    }
    let prealloc = match a.preallocation.as_deref() {
        None => Preallocation::Off,
        Some(m) => match Preallocation::parse(m) {
            Ok(p) => p,
            Err(_) => return fail(format!("Invalid preallocation mode '{m}'")),
        },
    };
    let (relative, num) = match a.size.as_bytes().first() {
        Some(b'+') => (1i64, &a.size[1..]),
        Some(b'-') => (-1, &a.size[1..]),
        _ => (0, a.size.as_str()),
    };
    let n = match parse_opt_size(num) {
        Ok(n) => n,
        Err(true) => {
            return fail(format!(
                "Value '{num}' is out of range for parameter 'size'"
            ))
        }
        Err(false) => {
            return fail(
                "Parameter 'size' expects a non-negative number below 2^64\n\
                 Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
                 and exabytes, respectively.",
            )
        }
    };
    let img = match open(&ImageArgs {
        image_opts: a.image_opts,
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
    // qemu-img's arithmetic: 64-bit signed, wrapping (a size past 2^63 is "not positive"),
    // from the length its block layer sees: whole sectors (a raw file of 1000 bytes is 1024).
    let current = img.size().next_multiple_of(512) as i64;
    let total = if relative != 0 {
        current.wrapping_add((n as i64).wrapping_mul(relative))
    } else {
        n as i64
    };
    let r = if total <= 0 {
        Err("New image size must be positive".to_string())
    } else if total <= current && prealloc != Preallocation::Off {
        Err("Preallocation can only be used for growing images".to_string())
    } else if total < current && !a.shrink {
        Err(format!(
            "Use the --shrink option to perform a shrink operation.\n\
             {}: warning: Shrinking an image will delete all data beyond the shrunken image's \
             end. Before performing such an operation, make sure there is no important data there.",
            prog()
        ))
    } else if total > BDRV_MAX_LENGTH {
        Err(format!(
            "offset({total}) exceeds maximum({BDRV_MAX_LENGTH})"
        ))
    } else {
        img.resize(total as u64, prealloc)
            .await
            .map_err(|e| e.to_string())
    };
    let close = img.close().await.map_err(|e| e.to_string());
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
