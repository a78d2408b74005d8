//! `qimg dd`: copy an image into a new one, dd style (`bs=`, `count=`, `skip=`, `if=`, `of=`), as
//! qemu-img dd does it.
//!
//! qemu-img's semantics are kept, quirks included: the output is created with the output
//! format's default options and a size of `min(count*bs, input size) - skip*bs` (so `count`
//! counts from the start of the input, not from `skip`); a `skip` past that end is only warned
//! about and gives an empty output (exit status 0); every byte is written, zeros included (no
//! sparse detection: a qcow2 output has every cluster allocated).

use super::create::make;
use super::fail;
use super::measure::{clean, disk_len};
use super::opts::{open, ImageArgs};
use qimg::block::{BlockDevice, Format};
use qimg::error::strerror;
use qimg::qcow2::CreateOptions;
use qimg::size::{parse_size, SizeError};
use qimg::{Error, IoBufMut};
use std::sync::Arc;

#[derive(clap::Args)]
pub struct Args {
    /// Input format (probed if not given)
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Output format (raw or qcow2; default raw)
    #[arg(short = 'O', long = "output-format", default_value = "raw")]
    output_format: String,
    /// Open the input in shared mode
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The input is an image specification (not supported yet: refused)
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// QEMU objects: secret,id=ID,data=TEXT|file=FILE[,format=raw|base64] (nothing uses a
    /// secret until encrypted images are supported); other object types are refused
    #[arg(long = "object")]
    object: Vec<String>,
    /// Operands: bs=BYTES count=BLOCKS skip=BLOCKS if=INPUT of=OUTPUT
    operands: Vec<String>,
}

/// The parsed operands.
#[derive(Debug, PartialEq, Eq)]
struct Operands {
    bs: u64,
    count: Option<u64>,
    skip: Option<u64>,
    input: Option<String>,
    output: Option<String>,
}

/// Bytes per read/write (the content written is the same whatever the step).
const STEP: u64 = 1 << 20;

pub async fn run(a: Args) -> u8 {
    if let Err(e) = super::objects::define(&a.object) {
        return fail(e.to_string());
    }
    let ops = match parse_operands(&a.operands) {
        Ok(o) => o,
        Err(m) => return fail(m),
    };
    let (Some(input), Some(output)) = (&ops.input, &ops.output) else {
        return fail("Must specify both input and output files");
    };
    if input.is_empty() {
        return fail("Could not open '': The 'file' block driver requires a file name");
    }
    let src = match open(&ImageArgs {
        image_opts: a.image_opts,
        path: input,
        format: a.format.as_deref(),
        read_only: true,
        cache: None,
        runtime_opts: &[],
        no_backing: false,
        batch: false,
        force_share: a.force_share,
        metadata_only: false,
        aio: None,
    })
    .await
    {
        Ok(i) => i,
        Err(e) => return fail(format!("Could not open '{input}': {}", clean(&e))),
    };
    let r = copy(&a, &ops, &src, input, output).await;
    let _ = src.close().await;
    match r {
        Ok(()) => 0,
        Err(m) => fail(m),
    }
}

async fn copy(
    a: &Args,
    ops: &Operands,
    src: &Arc<dyn BlockDevice>,
    input: &str,
    output: &str,
) -> Result<(), String> {
    let format = match a.output_format.as_str() {
        "qcow2" => Format::Qcow2,
        "raw" => Format::Raw,
        f if KNOWN_TO_QEMU.contains(&f) => {
            return Err(format!("output format '{f}' is not supported yet"))
        }
        _ => return Err("Unknown file format".into()),
    };
    let bs = ops.bs;
    let in_len = src.size();
    let mut size = disk_len(src.as_ref());
    if let Some(c) = ops.count {
        if c <= i64::MAX as u64 / bs && c * bs < size {
            size = c * bs;
        }
    }
    // A skip past the end gives an empty output (and a warning below).
    let skip_past_end = ops
        .skip
        .is_some_and(|s| s > i64::MAX as u64 / bs || size < s * bs);
    let out_size = if skip_past_end {
        0
    } else {
        size - ops.skip.unwrap_or(0) * bs
    };
    // Both formats take their size in whole sectors: a partial last sector is zeros.
    let o = CreateOptions {
        size: out_size.next_multiple_of(512),
        ..Default::default()
    };
    make(output, format, &o).await.map_err(|e| {
        let e = match e {
            Error::Io { source, .. } => {
                format!("Could not create '{output}': {}", strerror(&source))
            }
            e => clean(&e),
        };
        format!("{output}: error while creating output image: {e}")
    })?;
    let dst = open(&ImageArgs {
        image_opts: false,
        path: output,
        format: Some(format.name()),
        read_only: false,
        cache: None,
        runtime_opts: &[],
        no_backing: true,
        batch: true,
        force_share: false,
        metadata_only: false,
        aio: None,
    })
    .await
    .map_err(|e| format!("Could not open '{output}': {}", clean(&e)))?;
    let r = async {
        let mut in_pos = if skip_past_end {
            eprintln!(
                "{}: {input}: cannot skip to specified offset",
                super::prog()
            );
            size
        } else {
            ops.skip.unwrap_or(0) * bs
        };
        let mut out_pos = 0u64;
        while in_pos < size {
            let n = (size - in_pos).min(STEP);
            let mut buf = read_padded(src, in_pos, n, in_len)
                .await
                .map_err(|e| format!("error while reading from input image file: {}", clean(&e)))?;
            if format == Format::Qcow2 && in_pos + n == size && dst.size() > out_pos + n {
                // The last write of a partial sector is padded with zeros to the end of the
                // sector (content unchanged: the new image reads zeros there), so that its
                // cluster is written up to the end of the disk as QEMU's cluster allocation
                // writes it.
                let mut padded = IoBufMut::zeroed(dst.size().saturating_sub(out_pos) as usize);
                padded[..n as usize].copy_from_slice(&buf);
                buf = padded;
            }
            dst.write(out_pos, buf.freeze())
                .await
                .map_err(|e| format!("error while writing to output image file: {}", clean(&e)))?;
            in_pos += n;
            out_pos += n;
        }
        dst.flush()
            .await
            .map_err(|e| format!("error while writing to output image file: {}", clean(&e)))
    }
    .await;
    let closed = dst.close().await;
    r?;
    closed.map_err(|e| clean(&e))
}

/// Reads `n` bytes at `off`; what lies past the stored length `len` (the rest of a partial last
/// sector) reads as zeros.
async fn read_padded(
    src: &Arc<dyn BlockDevice>,
    off: u64,
    n: u64,
    len: u64,
) -> qimg::Result<IoBufMut> {
    let stored = len.saturating_sub(off).min(n);
    if stored == n {
        return src.read(off, IoBufMut::for_overwrite(n as usize)).await;
    }
    let mut b = IoBufMut::zeroed(n as usize);
    if stored > 0 {
        let part = src
            .read(off, IoBufMut::for_overwrite(stored as usize))
            .await?;
        b[..stored as usize].copy_from_slice(&part);
    }
    Ok(b)
}

/// Output formats QEMU can create that qimg cannot (refused as not supported, not unknown).
const KNOWN_TO_QEMU: &[&str] = &[
    "vmdk",
    "vdi",
    "vpc",
    "vhdx",
    "qed",
    "parallels",
    "qcow",
    "luks",
];

/// Parses the operands in order (a later one overrides an earlier one); the first bad one
/// gives qemu-img's message.
fn parse_operands(args: &[String]) -> Result<Operands, String> {
    let mut o = Operands {
        bs: 512,
        count: None,
        skip: None,
        input: None,
        output: None,
    };
    for arg in args {
        let Some((k, v)) = arg.split_once('=') else {
            return Err(format!("unrecognized operand {arg}"));
        };
        match k {
            "bs" => o.bs = parse_bs(v)?,
            "count" => o.count = Some(parse_blocks("count", v)?),
            "skip" => o.skip = Some(parse_blocks("skip", v)?),
            "if" => o.input = Some(v.to_string()),
            "of" => o.output = Some(v.to_string()),
            _ => return Err(format!("unrecognized operand {k}")),
        }
    }
    Ok(o)
}

/// `bs=`: a size with the usual suffixes, 1 to INT_MAX.
fn parse_bs(v: &str) -> Result<u64, String> {
    let range = || format!("Invalid bs specified. Must be between 1 and {}.", i32::MAX);
    if v.ends_with(|c: char| c.is_whitespace()) {
        return Err(format!("Invalid bs specified: '{v}'."));
    }
    match parse_size(v) {
        Ok(n) if (1..=i32::MAX as u64).contains(&n) => Ok(n),
        Ok(_) | Err(SizeError::TooLarge) => Err(range()),
        Err(SizeError::Invalid) if v.trim_start().starts_with('-') => Err(range()),
        Err(SizeError::Invalid) => Err(format!("Invalid bs specified: '{v}'.")),
    }
}

/// `count=` and `skip=`: a plain integer as C's strtoll reads it with base 0 (decimal, `0x` hex,
/// leading-zero octal; leading blanks and a sign allowed; nothing after the digits), 0 to
/// INT64_MAX.
fn parse_blocks(name: &str, v: &str) -> Result<u64, String> {
    let invalid = || format!("Invalid {name} specified: '{v}'.");
    let range = || {
        format!(
            "Invalid {name} specified. Must be between 0 and {}.",
            i64::MAX
        )
    };
    let s = v.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let (neg, s) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let (radix, digits) = if let Some(h) = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .filter(|h| h.starts_with(|c: char| c.is_ascii_hexdigit()))
    {
        (16, h)
    } else if s.len() > 1 && s.starts_with('0') {
        (8, &s[1..])
    } else {
        (10, s)
    };
    if digits.is_empty() && radix != 8 {
        return Err(invalid());
    }
    if !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(invalid());
    }
    let n = if digits.is_empty() {
        0
    } else {
        match u64::from_str_radix(digits, radix) {
            Ok(n) if n <= i64::MAX as u64 => n,
            _ => return Err(range()),
        }
    };
    if neg && n != 0 {
        return Err(range());
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_counts_as_strtoll_reads_them() {
        assert_eq!(parse_blocks("count", "010"), Ok(8));
        assert_eq!(parse_blocks("count", "0x10"), Ok(16));
        assert_eq!(parse_blocks("count", " +5"), Ok(5));
        assert_eq!(parse_blocks("count", "-0"), Ok(0));
        assert_eq!(parse_blocks("count", "0"), Ok(0));
        for bad in ["", "0x", "08", "5 ", "1k", "1.0", "x"] {
            assert_eq!(
                parse_blocks("count", bad),
                Err(format!("Invalid count specified: '{bad}'.")),
                "{bad:?}"
            );
        }
        for range in ["-1", "99999999999999999999"] {
            assert!(parse_blocks("skip", range)
                .unwrap_err()
                .contains("Must be between 0"));
        }
    }

    #[test]
    fn block_sizes() {
        assert_eq!(parse_bs("1.5k"), Ok(1536));
        assert_eq!(parse_bs("0x10"), Ok(16));
        assert!(parse_bs("0").unwrap_err().contains("between 1 and"));
        assert!(parse_bs("-1").unwrap_err().contains("between 1 and"));
        assert!(parse_bs("2G").unwrap_err().contains("between 1 and"));
        assert_eq!(parse_bs("1x"), Err("Invalid bs specified: '1x'.".into()));
    }

    #[test]
    fn operands() {
        let o = |v: &[&str]| parse_operands(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(o(&["foo"]), Err("unrecognized operand foo".into()));
        assert_eq!(o(&["foo=1"]), Err("unrecognized operand foo".into()));
        assert_eq!(o(&["=1"]), Err("unrecognized operand ".into()));
        let p = o(&["if=a", "of=b", "bs=1k", "bs=2k", "count=3"]).unwrap();
        assert_eq!((p.bs, p.count, p.skip), (2048, Some(3), None));
    }
}
