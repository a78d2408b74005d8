//! Block status for NBD: the `base:allocation` and `qemu:allocation-depth` metadata contexts,
//! computed from the backing chain with [`chain_status`], and `qemu:dirty-bitmap:NAME`, read
//! from a persistent dirty bitmap (qemu-nbd's `-B`: flag 1 where the bitmap is dirty).
//!
//! The flags follow what QEMU's server reports for the same image, so that `nbdinfo --map` and
//! `qemu-img map` give the same answers against qimg and qemu-nbd:
//!
//! | the deciding layer says | `base:allocation` | `qemu:allocation-depth` |
//! |---|---|---|
//! | data (layer `d`, 0 = top) | 0 | `d + 1` |
//! | data over a hole in the file (preallocated metadata) | ZERO | `d + 1` |
//! | zero cluster (layer `d`) | HOLE \| ZERO | `d + 1` |
//! | unallocated in every layer | HOLE \| ZERO | 0 |
//! | past the end of a shorter backing file `d` | HOLE \| ZERO | `d + 1` |
//!
//! (The last row is QEMU's rule: zeros synthesized beyond a backing file's end count as allocated
//! in that backing file.)
//!
//! A request is answered with a bounded amount of work: at most [`MAX_LOOKUPS`] chain lookups and
//! [`MAX_EXTENTS`] extents per context; the spec lets the server describe less than was asked and
//! clients continue from where the reply ends.

use super::proto::{Extent, STATE_HOLE, STATE_ZERO};
use crate::block::{chain_status, BlockDevice, ChainStatus};
use crate::dirty_bitmap::DirtyBitmap;
use crate::error::Result;
use std::sync::Arc;

/// Chain lookups per request (each may cost a metadata read and a `SEEK_DATA`).
pub const MAX_LOOKUPS: usize = 1024;
/// Extents per context in one reply.
pub const MAX_EXTENTS: usize = 16384;

/// A metadata context the server offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Context {
    /// `base:allocation`: HOLE and ZERO flags.
    Allocation,
    /// `qemu:allocation-depth`: which layer of the chain provides the data.
    Depth,
    /// `qemu:dirty-bitmap:NAME`: the export's bitmap of this index.
    Bitmap(u16),
}

/// Prefix of the dirty bitmap contexts.
pub const BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

impl Context {
    /// The name of a context; `bitmaps` are the export's bitmap names.
    pub fn name(self, bitmaps: &[String]) -> String {
        match self {
            Context::Allocation => super::proto::CTX_BASE_ALLOCATION.to_string(),
            Context::Depth => super::proto::CTX_QEMU_ALLOCATION_DEPTH.to_string(),
            Context::Bitmap(i) => format!(
                "{BITMAP_PREFIX}{}",
                bitmaps.get(i as usize).map_or("", String::as_str)
            ),
        }
    }

    /// Every context of an export with `bitmaps` (the depth context whether offered or not).
    pub fn all(bitmaps: &[String]) -> Vec<Context> {
        let mut v = vec![Context::Allocation, Context::Depth];
        v.extend((0..bitmaps.len().min(u16::MAX as usize)).map(|i| Context::Bitmap(i as u16)));
        v
    }

    /// The context a `NBD_OPT_SET_META_CONTEXT` query selects (exact names only).
    pub fn from_name(s: &str, bitmaps: &[String]) -> Option<Context> {
        Context::all(bitmaps)
            .into_iter()
            .find(|c| c.name(bitmaps) == s)
    }

    /// The contexts a `NBD_OPT_LIST_META_CONTEXT` query matches: exact names, or a namespace
    /// wildcard (`base:`, `qemu:`, and `qemu:dirty-bitmap:` for every bitmap). Unknown
    /// namespaces and leaf names match nothing.
    pub fn list_matches(query: &str, bitmaps: &[String]) -> Vec<Context> {
        let all = Context::all(bitmaps);
        match query {
            "base:" => vec![Context::Allocation],
            "qemu:" => all.into_iter().skip(1).collect(),
            BITMAP_PREFIX => all.into_iter().skip(2).collect(),
            q => Context::from_name(q, bitmaps).into_iter().collect(),
        }
    }

    /// Whether the context is answered from the backing chain (not from a bitmap).
    pub fn from_chain(self) -> bool {
        !matches!(self, Context::Bitmap(_))
    }

    /// The status flags of one chain extent in this context. `past_backing_end`: the extent is
    /// unallocated down to a layer whose backing file is shorter than the extent's offset.
    pub fn flags(self, st: &ChainStatus, past_backing_end: bool) -> u32 {
        match self {
            Context::Allocation => {
                // Where no layer defines the content it reads as zeros.
                let zero = st.zero || (!st.present && !st.data);
                (if st.data { 0 } else { STATE_HOLE }) | (if zero { STATE_ZERO } else { 0 })
            }
            Context::Depth => {
                let depth = if st.present {
                    st.depth + 1
                } else if past_backing_end {
                    st.depth + 2
                } else {
                    0
                };
                depth.min(u32::MAX as u64) as u32
            }
            Context::Bitmap(_) => 0,
        }
    }
}

/// Describes `[offset, offset + len)` (`len` ≥ 1) in a dirty bitmap context: flag 1
/// (`NBD_STATE_DIRTY`) where the bitmap is dirty, runs clipped to the range, at most
/// [`MAX_EXTENTS`] of them (one with `req_one`).
pub fn bitmap_extents(bits: &DirtyBitmap, offset: u64, len: u32, req_one: bool) -> Vec<Extent> {
    let end = offset + u64::from(len);
    let mut out: Vec<Extent> = Vec::new();
    let mut pos = offset;
    while pos < end {
        if pos >= bits.size() {
            // Past the bitmap (an export rounded up): clean.
            push_extent(&mut out, (end - pos) as u32, 0);
            break;
        }
        let (n, dirty) = bits.extent(pos, end - pos);
        let n = n.max(1);
        let full = (req_one && !out.is_empty()) || out.len() >= MAX_EXTENTS;
        match out.last_mut() {
            Some(last) if last.flags == u32::from(dirty) => last.len += n as u32,
            Some(_) if full => break,
            _ => out.push(Extent {
                len: n as u32,
                flags: u32::from(dirty),
            }),
        }
        pos += n;
        if req_one && out.len() == 1 && pos < end && bits.is_dirty(pos) != dirty {
            break;
        }
    }
    out
}

fn push_extent(out: &mut Vec<Extent>, len: u32, flags: u32) {
    match out.last_mut() {
        Some(last) if last.flags == flags => last.len += len,
        _ => out.push(Extent { len, flags }),
    }
}

/// Describes `[offset, offset + len)` (`len` ≥ 1, inside the disk) in each of `contexts`.
/// Consecutive lookups with equal flags are merged. With `req_one` every list has exactly one
/// extent. Every list covers a non-empty prefix of the range.
pub async fn extents(
    img: &Arc<dyn BlockDevice>,
    contexts: &[Context],
    offset: u64,
    len: u32,
    req_one: bool,
) -> Result<Vec<Vec<Extent>>> {
    let mut lists: Vec<Vec<Extent>> = vec![Vec::new(); contexts.len()];
    // A context whose list is full (or, with req_one, whose single extent ended) stops growing.
    let mut done = vec![false; contexts.len()];
    let end = offset + len as u64;
    let mut pos = offset;
    let mut lookups = 0;
    while pos < end && lookups < MAX_LOOKUPS && done.iter().any(|d| !d) {
        let st = chain_status(img, pos, end - pos).await?;
        lookups += 1;
        let n = st.len.clamp(1, end - pos);
        // Unallocated zeros decided by a layer that has a backing file: the backing file ends
        // before this extent (otherwise the layer would have deferred to it).
        let past_backing_end = !st.present && st.zero && has_backing(img, st.depth);
        for (i, ctx) in contexts.iter().enumerate() {
            if done[i] {
                continue;
            }
            let flags = ctx.flags(&st, past_backing_end);
            let list = &mut lists[i];
            let full = req_one || list.len() >= MAX_EXTENTS;
            match list.last_mut() {
                // Lengths fit: the whole range is at most u32::MAX bytes.
                Some(last) if last.flags == flags => last.len += n as u32,
                Some(_) if full => done[i] = true,
                _ => list.push(Extent {
                    len: n as u32,
                    flags,
                }),
            }
        }
        pos += n;
    }
    Ok(lists)
}

/// Whether layer `depth` of the chain (0 = `img`) has a backing file.
fn has_backing(img: &Arc<dyn BlockDevice>, depth: u64) -> bool {
    let mut layer = img.clone();
    for _ in 0..depth {
        match layer.backing() {
            Some(b) => layer = b,
            None => return false,
        }
    }
    layer.backing().is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(present: bool, depth: u64, data: bool, zero: bool) -> ChainStatus {
        ChainStatus {
            offset: 0,
            len: 512,
            depth,
            present,
            zero,
            data,
            compressed: false,
            host_offset: None,
            filename: String::new(),
        }
    }

    #[test]
    fn allocation_flags_match_qemu() {
        let a = Context::Allocation;
        assert_eq!(a.flags(&st(true, 0, true, false), false), 0);
        assert_eq!(a.flags(&st(true, 0, true, true), false), STATE_ZERO);
        assert_eq!(
            a.flags(&st(true, 1, false, true), false),
            STATE_HOLE | STATE_ZERO
        );
        assert_eq!(
            a.flags(&st(false, 0, false, true), true),
            STATE_HOLE | STATE_ZERO
        );
        assert_eq!(
            a.flags(&st(false, 2, false, false), false),
            STATE_HOLE | STATE_ZERO
        );
    }

    #[test]
    fn depth_flags() {
        let d = Context::Depth;
        assert_eq!(d.flags(&st(true, 0, true, false), false), 1);
        assert_eq!(d.flags(&st(true, 2, false, true), false), 3);
        assert_eq!(d.flags(&st(false, 1, false, true), false), 0);
        assert_eq!(d.flags(&st(false, 0, false, true), true), 2);
    }

    #[test]
    fn context_names() {
        let none: &[String] = &[];
        assert_eq!(
            Context::from_name("base:allocation", none),
            Some(Context::Allocation)
        );
        assert_eq!(
            Context::from_name("qemu:allocation-depth", none),
            Some(Context::Depth)
        );
        assert_eq!(Context::from_name("base:", none), None);
        assert_eq!(
            Context::list_matches("base:", none),
            vec![Context::Allocation]
        );
        assert_eq!(Context::list_matches("qemu:", none), vec![Context::Depth]);
        assert!(Context::list_matches("qemu:dirty-bitmap:x", none).is_empty());
        assert!(Context::list_matches("nonsense", none).is_empty());
        let two = ["a".to_string(), "b".to_string()];
        assert_eq!(
            Context::from_name("qemu:dirty-bitmap:b", &two),
            Some(Context::Bitmap(1))
        );
        assert_eq!(
            Context::list_matches("qemu:dirty-bitmap:", &two),
            vec![Context::Bitmap(0), Context::Bitmap(1)]
        );
        assert_eq!(Context::list_matches("qemu:", &two).len(), 3);
    }

    #[test]
    fn bitmap_extents_are_clipped_and_merged() {
        let b = DirtyBitmap::new(1 << 20, 16, 512);
        b.mark(100 << 10, 1);
        let e = bitmap_extents(&b, 0, 1 << 20, false);
        assert_eq!(
            e.iter().map(|e| (e.len, e.flags)).collect::<Vec<_>>(),
            vec![(64 << 10, 0), (64 << 10, 1), (896 << 10, 0)]
        );
        let e = bitmap_extents(&b, 70 << 10, 4096, false);
        assert_eq!((e[0].len, e[0].flags), (4096, 1));
        let e = bitmap_extents(&b, 0, 1 << 20, true);
        assert_eq!(e.len(), 1);
        assert_eq!((e[0].len, e[0].flags), (64 << 10, 0));
    }
}
