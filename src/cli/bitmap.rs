//! `qimg bitmap`: add, remove, clear, enable, disable and merge persistent dirty bitmaps, as
//! `qemu-img bitmap` does: the actions run in command-line order on one bitmap, the first that
//! fails stops the rest, and what ran before it stays done (the image is closed, and its
//! bitmaps stored, either way). The work is `qimg::qcow2`'s (`Qcow2::bitmap_*`).

use super::opts::{open, ImageArgs};
use super::{fail, prog};
use qimg::BlockDevice;
use std::sync::Arc;

#[derive(clap::Args)]
pub struct Args {
    /// Add BITMAP (clean, enabled)
    #[arg(long)]
    add: bool,
    /// Remove BITMAP (also an inconsistent one)
    #[arg(long)]
    remove: bool,
    /// Clear every bit of BITMAP
    #[arg(long)]
    clear: bool,
    /// Make BITMAP track writes
    #[arg(long)]
    enable: bool,
    /// Stop BITMAP tracking writes
    #[arg(long)]
    disable: bool,
    /// Set in BITMAP every bit set in bitmap SOURCE (of FILE, or of -b's file)
    #[arg(long, value_name = "SOURCE")]
    merge: Option<String>,
    /// Granularity of a new bitmap (bytes per bit; default: the cluster size within 4k..64k)
    #[arg(short = 'g', long = "granularity", value_name = "SIZE")]
    granularity: Option<String>,
    /// The image that holds --merge's SOURCE bitmap
    #[arg(short = 'b', long = "source-file", value_name = "SOURCE_FILE")]
    source_file: Option<String>,
    /// Format of the -b image
    #[arg(short = 'F', long = "source-format", value_name = "FMT")]
    source_format: Option<String>,
    /// Format of the image
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Treat FILE as an option list (driver=qcow2,file.filename=...)
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// QEMU objects: secret,id=ID,data=TEXT|file=FILE[,format=raw|base64] (nothing uses a
    /// secret until encrypted images are supported); other object types are refused
    #[arg(long = "object")]
    object: Vec<String>,
    /// FILE BITMAP
    args: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Add,
    Remove,
    Clear,
    Enable,
    Disable,
    Merge,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Add => "add",
            Op::Remove => "remove",
            Op::Clear => "clear",
            Op::Enable => "enable",
            Op::Disable => "disable",
            Op::Merge => "merge",
        }
    }

    fn parse(arg: &str) -> Option<Op> {
        let flag = arg.split('=').next().unwrap_or(arg);
        Some(match flag {
            "--add" => Op::Add,
            "--remove" => Op::Remove,
            "--clear" => Op::Clear,
            "--enable" => Op::Enable,
            "--disable" => Op::Disable,
            "--merge" => Op::Merge,
            _ => return None,
        })
    }
}

/// The actions in the order the command line gives them (clap keeps no order between flags).
fn ordered_ops() -> Vec<Op> {
    let args: Vec<String> = std::env::args().collect();
    let start = args.iter().position(|a| a == "bitmap").map_or(0, |i| i + 1);
    let mut ops = Vec::new();
    for a in &args[start..] {
        if a == "--" {
            break;
        }
        if let Some(op) = Op::parse(a) {
            if !ops.contains(&op) {
                ops.push(op);
            }
        }
    }
    ops
}

fn usage(msg: &str) -> u8 {
    eprintln!("{}: {msg}", prog());
    eprintln!("Try '{} --help' for more information", prog());
    1
}

pub async fn run(a: Args) -> u8 {
    if let Err(e) = super::objects::define(&a.object) {
        return fail(e.to_string());
    }
    let any = a.add || a.remove || a.clear || a.enable || a.disable || a.merge.is_some();
    if !any {
        return usage(
            "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge",
        );
    }
    let granularity = match &a.granularity {
        None => None,
        Some(g) => match qimg::size::parse_size(g) {
            Ok(v) => Some(v),
            Err(_) => return fail(format!("Invalid granularity specified: '{g}'.")),
        },
    };
    if granularity.is_some() && !a.add {
        return usage("granularity only supported with --add");
    }
    if a.source_format.is_some() && a.source_file.is_none() {
        return usage("-F only supported with -b");
    }
    if a.source_file.is_some() && a.merge.is_none() {
        return usage("Merge bitmap source file only supported with --merge");
    }
    let [filename, name] = a.args.as_slice() else {
        return usage("Expecting filename and bitmap name");
    };
    let mut ops = ordered_ops();
    // Flags clap saw but the scan did not (an unusual spelling): run them last, in a fixed order.
    for (set, op) in [
        (a.add, Op::Add),
        (a.remove, Op::Remove),
        (a.clear, Op::Clear),
        (a.enable, Op::Enable),
        (a.disable, Op::Disable),
        (a.merge.is_some(), Op::Merge),
    ] {
        if set && !ops.contains(&op) {
            ops.push(op);
        }
    }

    let img = match open(&ImageArgs {
        image_opts: a.image_opts,
        path: filename,
        format: a.format.as_deref(),
        read_only: false,
        cache: None,
        runtime_opts: &[],
        no_backing: true,
        batch: false,
        force_share: false,
        metadata_only: false,
        aio: None,
    })
    .await
    {
        Ok(i) => i,
        Err(e) => return fail(format!("Could not open '{filename}': {e}")),
    };
    let source = match &a.source_file {
        None => None,
        Some(src) => match open(&ImageArgs {
            image_opts: false,
            path: src,
            format: a.source_format.as_deref(),
            read_only: true,
            cache: None,
            runtime_opts: &[],
            no_backing: true,
            batch: false,
            force_share: false,
            metadata_only: false,
            aio: None,
        })
        .await
        {
            Ok(i) => Some(i),
            Err(e) => {
                let _ = img.close().await;
                return fail(format!("Could not open '{src}': {e}"));
            }
        },
    };
    let mut code = 0;
    for op in ops {
        let r = run_op(op, &img, source.as_ref(), name, granularity, &a).await;
        if let Err(e) = r {
            code = fail(format!(
                "Operation {} on bitmap {name} failed: {e}",
                op.name()
            ));
            break;
        }
    }
    if let Some(s) = source {
        let _ = s.close().await;
    }
    if let Err(e) = img.close().await {
        return fail(format!("Error while closing the image: {e}"));
    }
    code
}

async fn run_op(
    op: Op,
    img: &Arc<dyn BlockDevice>,
    source: Option<&Arc<dyn BlockDevice>>,
    name: &str,
    granularity: Option<u64>,
    a: &Args,
) -> qimg::Result<()> {
    let Some(q) = img.as_qcow2() else {
        return Err(qimg::Error::unsupported(format!(
            "Can't store persistent bitmaps to {}: Operation not supported",
            img.format().name()
        )));
    };
    match op {
        Op::Add => q.bitmap_add(name, granularity, true).await,
        Op::Remove => q.bitmap_remove(name).await,
        Op::Clear => q.bitmap_clear(name).await,
        Op::Enable => q.bitmap_set_enabled(name, true).await,
        Op::Disable => q.bitmap_set_enabled(name, false).await,
        Op::Merge => {
            let src_name = a.merge.as_deref().unwrap_or_default();
            let src_img = source.unwrap_or(img);
            let Some(sq) = src_img.as_qcow2() else {
                return Err(qimg::Error::arg(format!(
                    "Dirty bitmap '{src_name}' not found"
                )));
            };
            if q.bitmap_inconsistent(name).is_none() {
                return Err(qimg::Error::arg(format!("Dirty bitmap '{name}' not found")));
            }
            let bits = sq.bitmap_bits(src_name).await?;
            q.bitmap_merge(name, &bits).await
        }
    }
}
