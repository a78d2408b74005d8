//! Writes to images with extended L2 entries (subclusters).
//!
//! An extended entry describes its cluster in 32 subclusters, each allocated (reads from the
//! host cluster), zero, or unallocated (reads from the backing file). What this buys is
//! copy-on-write at subcluster granularity: a 4 KiB write into a fresh 128 KiB cluster of an
//! overlay writes 4 KiB, not 128 KiB of which 124 KiB copied from the backing file.
//!
//! An allocating write handles each cluster of a request in one of three ways:
//! - the cluster is ours alone (COPIED): the data goes in place; subclusters the request only
//!   partly covers and that were not allocated get the rest of their current content (zeros or
//!   the backing file's) written around it; then the covered subclusters are marked allocated;
//! - the cluster has no host cluster: a new one is allocated and only the covered subclusters
//!   are written (completed as above); the others keep their state (zero or unallocated);
//! - the cluster is shared with a snapshot: a new cluster receives the current content of the
//!   subclusters from the first allocated or written one to the last, with the data on top,
//!   and those become allocated; the zero and unallocated subclusters outside that span stay
//!   as they are (QEMU's rule). A compressed cluster is copied whole.
//!
//! Write-zeroes works on whole subclusters where it can, as QEMU's does: a whole cluster gets
//! every zero bit (keeping its host cluster unless unmapping is allowed), part of a cluster the
//! zero bits of the subclusters covered (allocation bits cleared, the host cluster kept), a
//! partly covered subcluster its zero bit if the rest of it reads as zeros already; what is
//! left gets zeros written. A compressed cluster has no subclusters: when the request covers
//! one only partly, the request's whole subcluster-aligned part is written as zeros (QEMU's
//! fallback, which keeps the resulting entries identical to QEMU's). Discard works on whole
//! clusters: the entry loses its host cluster and reads as zeros (all zero bits) if it had data
//! or a backing file would show through; otherwise it is left as it is.
//!
//! The ordering rules are those of every allocating write (`write`): the data is durable
//! before the entry that points to it or marks it allocated, and an old cluster is freed only
//! once the entry that stops using it is durable. A crash before the entry is written leaves
//! the subclusters as they were: data written into unallocated subclusters is not read.

use super::cache::{put_l2_entry, Dep, Table};
use super::mapping::RunKind;
use super::write::{push_write, Op};
use super::zero::ClusterOp;
use super::Qcow2;
use crate::block::ZeroFlags;
use crate::buf::{IoBuf, IoBufMut};
use crate::error::Result;
use crate::format::table::{sub, Mapping};
use crate::units::{Geometry, GuestCluster, HostOffset};
use std::sync::Arc;

/// Whether an entry's bitmap is valid for its first word (the write path's check: compressed
/// entries are not looked at).
pub(super) fn valid_bitmap(m: Mapping, bitmap: u64) -> bool {
    match m {
        Mapping::Compressed { .. } => true,
        Mapping::Data { .. }
        | Mapping::Zero {
            prealloc: Some(_), ..
        } => (bitmap >> 32) & bitmap == 0,
        Mapping::Unallocated | Mapping::Zero { prealloc: None, .. } => bitmap & sub::ALL_ALLOC == 0,
    }
}

/// The subclusters `[first, end)` of the cluster at `gstart` that the guest byte range
/// `[from, to)` touches (`from < to`, both inside the cluster).
pub(super) fn touched(g: Geometry, gstart: u64, from: u64, to: u64) -> (u32, u32) {
    let sb = g.subcluster_bits();
    let first = ((from - gstart) >> sb) as u32;
    let end = ((to - gstart).div_ceil(g.subcluster_size())) as u32;
    (first, end)
}

/// Whether every subcluster the write `[offset, offset+len)` touches is allocated, for the
/// clusters from `first` whose bitmaps are given.
pub(super) fn covered_allocated(
    g: Geometry,
    first: GuestCluster,
    offset: u64,
    len: usize,
    bitmaps: &[u64],
) -> bool {
    let cs = g.cluster_size();
    let end = offset + len as u64;
    bitmaps.iter().enumerate().all(|(i, &b)| {
        let gstart = (first.0 + i as u64) << g.cluster_bits;
        let (a, z) = touched(g, gstart, offset.max(gstart), end.min(gstart + cs));
        let mask = sub::alloc_range(a, z);
        b & mask == mask
    })
}

/// How one cluster of an allocating write is written.
#[derive(Clone, Copy, Debug)]
enum Way {
    /// Our own cluster: in place, then mark the touched subclusters allocated.
    InPlace(HostOffset),
    /// A new cluster for the touched subclusters only.
    Fresh,
    /// A new cluster with the current content of subclusters `[a, z)` (which include the
    /// touched ones and every allocated one).
    Copy(u32, u32),
}

impl Qcow2 {
    /// The allocating write of one L2 slice's piece of a request, on an image with
    /// subclusters (see the module docs). The caller holds the claim on the clusters.
    pub(super) async fn allocating_write_ext(
        &self,
        slice: &Arc<Table>,
        first: GuestCluster,
        offset: u64,
        data: &IoBuf,
        old: &[Mapping],
        bitmaps: &[u64],
    ) -> Result<()> {
        let g = self.geo;
        let cs = g.cluster_size();
        let end = offset + data.len() as u64;
        if let Err(e) = self
            .w
            .check_metadata_write(slice.offset().0, self.slice_bytes(), None)
        {
            return Err(self.signal_corruption(e).await);
        }
        self.enable_lazy_refcounts_if_configured().await?;
        let ways: Vec<Way> = old
            .iter()
            .enumerate()
            .map(|(i, m)| match *m {
                Mapping::Data { host, copied: true } => Way::InPlace(host),
                Mapping::Unallocated | Mapping::Zero { prealloc: None, .. } => Way::Fresh,
                Mapping::Compressed { .. } => Way::Copy(0, 32),
                _ => {
                    let gstart = (first.0 + i as u64) << g.cluster_bits;
                    let (a, z) = touched(g, gstart, offset.max(gstart), end.min(gstart + cs));
                    let allocated = (bitmaps[i] & sub::ALL_ALLOC) as u32;
                    if allocated == 0 {
                        Way::Copy(a, z)
                    } else {
                        let first_alloc = allocated.trailing_zeros();
                        let last_alloc = 31 - allocated.leading_zeros();
                        Way::Copy(a.min(first_alloc), z.max(last_alloc + 1))
                    }
                }
            })
            .collect();
        let need: Vec<bool> = ways.iter().map(|w| !matches!(w, Way::InPlace(_))).collect();
        let new = self.place_new_clusters(first, &need).await?;
        let alloc = new.alloc;
        let hosts: Vec<HostOffset> = ways
            .iter()
            .zip(new.hosts)
            .map(|(w, new)| match w {
                Way::InPlace(h) => *h,
                _ => new,
            })
            .collect();

        let written = self
            .write_subclusters(first, offset, end, data, &ways, &hosts, bitmaps)
            .await;
        if let Err(e) = written {
            if let Some(a) = alloc {
                self.rc.release_unlinked(&self.w, a).await?;
            }
            return Err(e);
        }
        let data_gen = self.w.barrier.generation();

        let base = self.index_in_slice(first);
        let mut deps = alloc.as_ref().map(|a| a.deps.clone()).unwrap_or_default();
        deps.push(Dep::Sync(data_gen));
        let version = {
            let mut st = slice.lock();
            let mut changes = Vec::new();
            for (i, w) in ways.iter().enumerate() {
                let gstart = (first.0 + i as u64) << g.cluster_bits;
                let (a, z) = touched(g, gstart, offset.max(gstart), end.min(gstart + cs));
                let (alloc_bits, zero_bits) = (sub::alloc_range(a, z), sub::zero_range(a, z));
                let (raw, bitmap) = st.l2_at(base + i, g);
                let new_bitmap = match *w {
                    Way::InPlace(_) => (bitmap | alloc_bits) & !zero_bits,
                    Way::Fresh => alloc_bits | (bitmap & sub::ALL_ZERO & !zero_bits),
                    // A compressed cluster's bitmap means nothing (and should be zero).
                    Way::Copy(..) if matches!(old[i], Mapping::Compressed { .. }) => sub::ALL_ALLOC,
                    Way::Copy(a, z) => (bitmap | sub::alloc_range(a, z)) & !sub::zero_range(a, z),
                };
                let new_raw = Mapping::Data {
                    host: hosts[i],
                    copied: true,
                }
                .encode(g);
                if (new_raw, new_bitmap) != (raw, bitmap) {
                    changes.push((i, new_raw, new_bitmap));
                }
            }
            if changes.is_empty() {
                None
            } else {
                let entries = st.modify(deps);
                for (i, raw, bitmap) in changes {
                    put_l2_entry(entries, base + i, g, raw, bitmap);
                }
                Some(st.version())
            }
        };
        // The clusters a copy replaced are free once the new entries are durable.
        for (w, m) in ways.iter().zip(old) {
            if !matches!(w, Way::Copy(..)) {
                continue;
            }
            let after = version.map(|version| Dep::Table {
                table: slice.clone(),
                version,
            });
            self.free_replaced(*m, after);
        }
        Ok(())
    }

    /// Issues the data writes of [`Qcow2::allocating_write_ext`].
    #[allow(clippy::too_many_arguments)]
    async fn write_subclusters(
        &self,
        first: GuestCluster,
        offset: u64,
        end: u64,
        data: &IoBuf,
        ways: &[Way],
        hosts: &[HostOffset],
        bitmaps: &[u64],
    ) -> Result<()> {
        let g = self.geo;
        let cs = g.cluster_size();
        let unit = g.subcluster_size();
        let mut writes: Vec<(u64, IoBuf)> = Vec::new();
        let mut pos = 0usize;
        for (i, w) in ways.iter().enumerate() {
            let gstart = (first.0 + i as u64) << g.cluster_bits;
            let from = offset.max(gstart);
            let to = end.min(gstart + cs);
            let part = data.slice(pos..pos + (to - from) as usize);
            pos += (to - from) as usize;
            let host = hosts[i].0;
            if let Way::Copy(a, z) = *w {
                let start = gstart + u64::from(a) * unit;
                let stop = gstart + u64::from(z) * unit;
                let mut buf = self.read_guest_clamped(start, stop - start).await?;
                buf[(from - start) as usize..(to - start) as usize].copy_from_slice(&part);
                push_write(&mut writes, host + (start - gstart), buf.freeze());
                continue;
            }
            // Complete the partly written subclusters at both ends with what they read now,
            // unless they are allocated already (then the rest of them is in place).
            let allocated = |sc: u64| match w {
                Way::InPlace(_) => bitmaps[i] & (1 << sc) != 0,
                _ => false,
            };
            let head_start = from & !(unit - 1);
            let tail_end = to.next_multiple_of(unit).min(gstart + cs);
            let head_sc = (head_start - gstart) / unit;
            let tail_sc = (tail_end - 1 - gstart) / unit;
            let head = if from > head_start && !allocated(head_sc) {
                head_start
            } else {
                from
            };
            let tail = if tail_end > to && !allocated(tail_sc) {
                tail_end
            } else {
                to
            };
            if head == from && tail == to {
                push_write(&mut writes, host + (from - gstart), part);
                continue;
            }
            let mut buf = IoBufMut::for_overwrite((tail - head) as usize);
            if head < from {
                let fill = self.read_guest_clamped(head, from - head).await?;
                buf[..(from - head) as usize].copy_from_slice(&fill);
            }
            buf[(from - head) as usize..(to - head) as usize].copy_from_slice(&part);
            if to < tail {
                let fill = self.read_guest_clamped(to, tail - to).await?;
                buf[(to - head) as usize..].copy_from_slice(&fill);
            }
            push_write(&mut writes, host + (head - gstart), buf.freeze());
        }
        self.run_ops(writes.into_iter().map(|(h, b)| Op::Write(h, b)).collect())
            .await
    }

    /// What the guest reads at `[offset, offset+len)` now, zeros past the disk's end (the last
    /// cluster may reach past it). The VM state area, further on, has no such end.
    async fn read_guest_clamped(&self, offset: u64, len: u64) -> Result<IoBufMut> {
        let size = if offset >= self.vm_state_offset() {
            u64::MAX
        } else {
            self.virtual_size()
        };
        let inside = size.saturating_sub(offset).min(len);
        let mut buf = if inside > 0 {
            self.read_unchecked(offset, IoBufMut::for_overwrite(inside as usize))
                .await?
        } else {
            IoBufMut::zeroed(0)
        };
        if inside < len {
            buf.unsplit(IoBufMut::zeroed((len - inside) as usize));
        }
        Ok(buf)
    }
}

/// The entry a metadata-only operation makes of `(raw, bitmap)` (decoded first word `old`)
/// whose subclusters `[a, z)` the operation covers; `None` when it cannot decide (the caller
/// then writes zeros).
pub(super) fn new_entry(
    old: Mapping,
    raw: u64,
    bitmap: u64,
    (a, z): (u32, u32),
    op: ClusterOp,
    has_backing: bool,
) -> Option<(u64, u64)> {
    let whole = (a, z) == (0, 32);
    let compressed = matches!(old, Mapping::Compressed { .. });
    let host = old.host_cluster().is_some();
    let (alloc_bits, zero_bits) = (sub::alloc_range(a, z), sub::zero_range(a, z));
    Some(match op {
        ClusterOp::Zero { unmap } if whole => {
            if host && !unmap {
                (raw, sub::ALL_ZERO)
            } else {
                (0, sub::ALL_ZERO)
            }
        }
        ClusterOp::Zero { .. } => {
            if compressed {
                return None;
            }
            (raw, (bitmap & !alloc_bits) | zero_bits)
        }
        ClusterOp::ZeroIfZero { backing_zero, .. } => {
            if compressed || bitmap & alloc_bits != 0 {
                return None;
            }
            if bitmap & zero_bits == zero_bits {
                (raw, bitmap)
            } else if !has_backing || backing_zero {
                (raw, bitmap | zero_bits)
            } else {
                return None;
            }
        }
        ClusterOp::Discard => {
            if host || compressed || has_backing {
                (0, sub::ALL_ZERO)
            } else {
                (raw, bitmap)
            }
        }
        ClusterOp::Deallocate | ClusterOp::Crop => (0, 0),
    })
}

impl Qcow2 {
    /// Write-zeroes on an image with subclusters (see the module docs).
    pub(super) async fn zero_subclusters(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> Result<()> {
        let g = self.geo;
        let cs = g.cluster_size();
        let unit = g.subcluster_size();
        let size = self.virtual_size();
        let end = offset + len;
        // The last subcluster of a disk whose size is not subcluster aligned counts as whole.
        let astart = offset.next_multiple_of(unit);
        let aend = if end == size { end } else { end / unit * unit };
        if astart >= aend {
            return self.zero_partial_subclusters(offset, end, flags).await;
        }
        self.zero_partial_subclusters(offset, astart, flags).await?;
        let partly_compressed = |at: u64| async move {
            let r = self.lookup_first(at, 1).await?;
            Ok::<bool, crate::error::Error>(matches!(r.kind, RunKind::Compressed { .. }))
        };
        let head_partial = astart % cs != 0 && partly_compressed(astart).await?;
        let tail_partial =
            aend % cs != 0 && aend - aend % cs > astart && partly_compressed(aend - 1).await?;
        let same_cluster_partial = astart % cs != 0 || aend % cs != 0;
        let fallback = head_partial
            || tail_partial
            || (same_cluster_partial
                && astart / cs == (aend - 1) / cs
                && partly_compressed(astart).await?);
        let done = !fallback
            && self
                .cluster_op(
                    astart,
                    aend - astart,
                    ClusterOp::Zero {
                        unmap: flags.may_unmap,
                    },
                )
                .await?;
        if !done {
            self.write_zero_buffers(astart, aend - astart, flags)
                .await?;
        }
        self.zero_partial_subclusters(aend, end, flags).await
    }

    /// Zeroes `[from, to)`, which covers no subcluster whole: each subcluster touched gets its
    /// zero bit if the rest of it reads as zeros, zeros written otherwise.
    async fn zero_partial_subclusters(&self, from: u64, to: u64, flags: ZeroFlags) -> Result<()> {
        let unit = self.geo.subcluster_size();
        let size = self.virtual_size();
        let mut pos = from;
        while pos < to {
            let sc_start = pos / unit * unit;
            let sc_end = (sc_start + unit).min(size);
            let n = sc_end.min(to) - pos;
            let backing_zero = self.backing_reads_zero(sc_start, pos - sc_start).await?
                && self.backing_reads_zero(pos + n, sc_end - (pos + n)).await?;
            let marked = self
                .cluster_op(
                    sc_start,
                    sc_end - sc_start,
                    ClusterOp::ZeroIfZero {
                        backing_zero,
                        unmap: flags.may_unmap,
                    },
                )
                .await?;
            if !marked {
                self.write_zero_buffers(pos, n, flags).await?;
            }
            pos += n;
        }
        Ok(())
    }
}
