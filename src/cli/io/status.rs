//! qemu-io's commands that describe the open image: `info`, `alloc`, `map`.

use super::report::{cvtnum, cvtstr, errno_text};
use super::Dev;
use crate::cli::prog;

/// qemu-io's `info`: the format, its cluster size and where the VM state would start, and
/// the format specific information, as qemu-io prints them.
pub(super) fn info(img: &Dev, args: &[&str]) -> bool {
    if !args.is_empty() {
        eprintln!(
            "bad argument count {} to info, expected 0 arguments",
            args.len()
        );
        return false;
    }
    // A protocol opened without a format is named by its driver (`file`, `nbd`), and twice:
    // QEMU prints a driver's format name and then its protocol name, which such drivers both
    // have.
    if img.protocol_node() {
        println!("format name: {}", img.protocol());
        println!("format name: {}", img.protocol());
        if img.protocol() == "null-co" {
            // The driver has no block driver information: qemu-io's `info` fails there.
            return false;
        }
    } else {
        println!("format name: {}", img.format().name());
    }
    let (cluster, vm_state) = match img.as_qcow2() {
        Some(q) => {
            let g = q.geometry();
            // The VM state lives right after the guest disk's last L2 table's range.
            let per_l2 = g.cluster_size() * g.l2_entries();
            (g.cluster_size(), q.virtual_size().div_ceil(per_l2) * per_l2)
        }
        None => (0, 0),
    };
    println!("cluster size: {}", cvtstr(cluster as f64));
    println!("vm state offset: {}", cvtstr(vm_state as f64));
    if let Some(q) = img.as_qcow2() {
        print!("{}", crate::cli::info::format_specific(q));
    }
    true
}

/// How much of `[offset, offset + len)`, from its start, this layer alone defines (data or
/// zeros) or leaves to its backing file: `(allocated, bytes)`, `bytes` 0 at or past the end.
async fn layer_allocation(img: &Dev, offset: u64, len: u64) -> qimg::Result<(bool, u64)> {
    let size = img.size();
    if offset >= size || len == 0 {
        return Ok((false, 0));
    }
    let len = len.min(size - offset);
    let st = img.block_status(offset, len).await?;
    Ok((st.allocated, st.len.clamp(1, len)))
}

/// `alloc OFFSET [COUNT]`: how many bytes of the range the image itself allocates (its backing
/// file's do not count), as qemu-io prints it.
pub(super) async fn alloc(img: &Dev, args: &[&str]) -> bool {
    if args.is_empty() || args.len() > 2 {
        eprintln!(
            "bad argument count {} to alloc, expected between 1 and 2 arguments",
            args.len()
        );
        return false;
    }
    let Some(start) = cvtnum(args[0]) else {
        return false;
    };
    let mut count = 512;
    if let Some(c) = args.get(1) {
        let Some(c) = cvtnum(c) else { return false };
        count = c;
    }
    let (mut offset, mut remaining, mut sum) = (start, count, 0u64);
    while remaining > 0 {
        match layer_allocation(img, offset, remaining).await {
            Err(e) => {
                println!("is_allocated failed: {}", errno_text(&e));
                return false;
            }
            Ok((_, 0)) => {
                count -= remaining;
                remaining = 0;
            }
            Ok((allocated, n)) => {
                offset += n;
                remaining -= n;
                if allocated {
                    sum += n;
                }
            }
        }
    }
    println!(
        "{sum}/{count} bytes allocated at offset {}",
        cvtstr(start as f64)
    );
    true
}

/// `map`: the image's own allocation, extent by extent (runs of the same state merged).
pub(super) async fn map(img: &Dev, args: &[&str]) -> bool {
    if !args.is_empty() {
        eprintln!(
            "bad argument count {} to map, expected 0 arguments",
            args.len()
        );
        return false;
    }
    let size = img.size();
    let mut offset = 0;
    while offset < size {
        let mut run = 0;
        let mut first = None;
        loop {
            match layer_allocation(img, offset + run, size - offset - run).await {
                Err(e) => {
                    eprintln!(
                        "{}: Failed to get allocation status: {}",
                        prog(),
                        errno_text(&e)
                    );
                    return false;
                }
                Ok((_, 0)) => break,
                Ok((allocated, n)) if first.is_none_or(|f| f == allocated) => {
                    first = Some(allocated);
                    run += n;
                }
                Ok(_) => break,
            }
        }
        let Some(allocated) = first else {
            eprintln!("{}: Unexpected end of image", prog());
            return false;
        };
        println!(
            "{} ({run:#x}) bytes {} at offset {} ({offset:#x})",
            cvtstr(run as f64),
            if allocated {
                "    allocated"
            } else {
                "not allocated"
            },
            cvtstr(offset as f64),
        );
        offset += run;
    }
    true
}
