//! Write-zeroes and discard: metadata-only operations on whole clusters.
//!
//! - Write-zeroes on whole clusters of a v3 image sets the ZERO flag, unallocated clusters
//!   included (with or without a backing file, as QEMU does: the range is then zero in this
//!   layer whatever a backing file attached later holds): keeping the host cluster (preallocated
//!   zero cluster) unless unmapping is allowed. Compressed clusters are always unmapped (a ZERO
//!   flag cannot sit on a compressed descriptor). Partial clusters and v2 images get real zeros
//!   written, except where this layer itself already reads as zeros (zeros read through from a
//!   backing file are written: they must not depend on it). A partly covered cluster whose rest
//!   reads as zeros is marked ZERO instead (QEMU's rule), decided under the cluster's claim
//!   (`ClusterOp::ZeroIfZero`).
//! - Discard works on whole clusters only, as QEMU's does: a discarded cluster reads as zeros on
//!   v3 images (ZERO flag) and on v2 images without a backing file; on a v2 image with a backing
//!   file it is left as it is (without a ZERO flag it would read the backing file's data instead
//!   of the guest's, which QEMU does not allow either). Freed clusters are punched out of the file (`pass-discard-request`, on by default).
//!
//! Both claim the clusters they change, like allocating writes, and free host clusters only after
//! the new entries are durable.

use super::cache::{put_l2_entry, Dep};
use super::Qcow2;
use crate::block::{check_range, ZeroFlags};
use crate::buf::IoBuf;
use crate::error::{Error, IoContext, Result};
use crate::format::table::{compressed_range, Mapping};
use crate::units::GuestCluster;

/// What a metadata-only operation does to each cluster.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum ClusterOp {
    Zero {
        unmap: bool,
    },
    /// A cluster a write-zeroes request covers only partly: marked ZERO if the rest of it already
    /// reads as zeros, decided from its own entry under the cluster claim (`backing_zero`: the
    /// backing file reads zeros in the rest, checked before: it does not change under us).
    ZeroIfZero {
        backing_zero: bool,
        /// The request may unmap: a preallocated zero cluster loses its host cluster (QEMU
        /// widens the request to the whole cluster and unmaps it).
        unmap: bool,
    },
    Discard,
    /// Drops the clusters whatever the guest then reads (the backing file's data shows
    /// through): emptying an overlay whose data was committed into its backing file.
    Deallocate,
    /// Drops the clusters past a shrunk disk's end and always punches their host space
    /// (QEMU's `QCOW2_DISCARD_ALWAYS` full discard in `qcow2_co_truncate`).
    Crop,
}

impl Qcow2 {
    /// Makes `[offset, offset+len)` read as zeros.
    pub(crate) async fn zero_plain(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.check_writable()?;
        check_range(offset, len, self.virtual_size())?;
        if len == 0 {
            return Ok(());
        }
        self.mark_dirty_locked(offset, len).await;
        if self.hdr.with(|h| h.data_file_raw()) {
            // The raw data file reads as the guest disk: the zeros go there first (QEMU's
            // order), whatever the entries become.
            self.data
                .write_zeroes(offset, len)
                .await
                .context(|| format!("zeroing {len} bytes at {offset:#x} in the data file"))?;
        }
        if self.geo.extended_l2 {
            self.zero_subclusters(offset, len, flags).await?;
            if self.w.writethrough {
                self.flush_plain().await?;
            }
            return Ok(());
        }
        let cs = self.geo.cluster_size();
        let end = offset + len;
        let size = self.virtual_size();
        // The last cluster of a disk whose size is not cluster aligned counts as whole.
        let astart = offset.next_multiple_of(cs);
        let aend = if end == size { end } else { end / cs * cs };
        if astart >= aend {
            return self.zero_partial(offset, len, flags).await;
        }
        if offset < astart {
            self.zero_partial(offset, astart - offset, flags).await?;
        }
        if self.version() >= 3 {
            self.cluster_op(
                astart,
                aend - astart,
                ClusterOp::Zero {
                    unmap: flags.may_unmap,
                },
            )
            .await?;
        } else {
            self.zero_partial(astart, aend - astart, flags).await?;
        }
        if aend < end {
            self.zero_partial(aend, end - aend, flags).await?;
        }
        if self.w.writethrough {
            self.flush_plain().await?;
        }
        Ok(())
    }

    /// Zeroes part of a cluster (or, on v2, any range). On v3, a cluster whose rest (what the
    /// request does not cover) reads as zeros is marked ZERO instead (QEMU's rule); otherwise
    /// zero buffers are written where the range does not already read as zeros.
    async fn zero_partial(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        if self.version() >= 3 {
            let cs = self.geo.cluster_size();
            let mut pos = offset;
            let end = offset + len;
            while pos < end {
                let cstart = pos / cs * cs;
                let cend = (cstart + cs).min(self.virtual_size());
                let n = cend.min(end) - pos;
                // Only what the request leaves of the cluster matters (it zeroes the rest).
                let backing_zero = self.backing_reads_zero(cstart, pos - cstart).await?
                    && self.backing_reads_zero(pos + n, cend - (pos + n)).await?;
                let marked = self
                    .cluster_op(
                        cstart,
                        cend - cstart,
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
            return Ok(());
        }
        self.write_zero_buffers(offset, len, flags).await
    }

    /// Whether the backing chain reads zeros in all of `[offset, offset+len)` (true without a
    /// backing file, past its end, and for an empty range).
    pub(super) async fn backing_reads_zero(&self, offset: u64, len: u64) -> Result<bool> {
        if len == 0 {
            return Ok(true);
        }
        let Some(b) = self.backing.get() else {
            return Ok(self.backing_filename().is_none());
        };
        let end = (offset + len).min(b.size());
        let mut pos = offset;
        while pos < end {
            let st = crate::block::chain_status(b, pos, end - pos).await?;
            if !(st.zero || (!st.present && !st.data)) {
                return Ok(false);
            }
            pos += st.len.max(1);
        }
        Ok(true)
    }

    /// Writes zero buffers where `[offset, offset+len)` does not already read as zeros by this
    /// layer's own entries. Zeros that come from a backing file (unallocated here, a hole or the
    /// end of the backing file there) are written all the same, as QEMU writes them: the range
    /// must read as zeros whatever backing file the image has later (a rebase, a backing file
    /// that grows).
    pub(super) async fn write_zero_buffers(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> Result<()> {
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let st = self.status_at(pos, end - pos).await?;
            let n = st.len.max(1).min(end - pos);
            let own_zero = st.allocated || self.backing_filename().is_none();
            let reads_zero = st.zero && !st.data && own_zero;
            if !reads_zero {
                if flags.fast_only {
                    return Err(Error::unsupported("zeroing this range needs a data write"));
                }
                // One zero buffer, reused for every chunk of the range.
                const CHUNK: u64 = 1 << 20;
                let zeros = IoBuf::zeroed(n.min(CHUNK) as usize);
                let mut done = 0;
                while done < n {
                    let k = (n - done).min(CHUNK);
                    self.write_plain(pos + done, zeros.slice(0..k as usize))
                        .await?;
                    done += k;
                }
            }
            pos += n;
        }
        Ok(())
    }

    /// Discards whole clusters in `[offset, offset+len)` (partial clusters are left alone).
    pub(crate) async fn discard_plain(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        check_range(offset, len, self.virtual_size())?;
        // The whole range, as QEMU marks it: what a discard leaves may read differently.
        self.mark_dirty_locked(offset, len).await;
        let cs = self.geo.cluster_size();
        let end = offset + len;
        let astart = offset.next_multiple_of(cs);
        let aend = if end == self.virtual_size() {
            end
        } else {
            end / cs * cs
        };
        if astart < aend {
            self.cluster_op(astart, aend - astart, ClusterOp::Discard)
                .await?;
        }
        if self.w.writethrough {
            self.flush_plain().await?;
        }
        Ok(())
    }

    /// Drops every cluster of the image (QEMU's `make_empty`): afterwards every read falls
    /// through to the backing file. Used by `commit` once the data is durable in the backing
    /// file; the freed clusters are punched out like discarded ones.
    pub async fn deallocate_all(&self) -> Result<()> {
        self.check_writable()?;
        let size = self.virtual_size();
        if size > 0 {
            self.cluster_op(0, size, ClusterOp::Deallocate).await?;
        }
        self.flush_plain().await
    }

    /// Unmaps every cluster of `[offset, offset+len)` (cluster aligned, past the end of a disk
    /// being shrunk: no range check) and frees their host clusters, punched out of the file
    /// whatever `pass-discard-request` says.
    pub(crate) async fn crop(&self, offset: u64, len: u64) -> Result<()> {
        self.cluster_op(offset, len, ClusterOp::Crop).await?;
        Ok(())
    }

    /// Applies `op` to whole clusters, one L2 slice at a time. Returns false if `op` could not
    /// decide a cluster (`ZeroIfZero` on a cluster that may hold data): that slice is unchanged.
    pub(super) async fn cluster_op(&self, offset: u64, len: u64, op: ClusterOp) -> Result<bool> {
        self.apply_frees_if_overdue().await?;
        let r = self.cluster_op_unchecked(offset, len, op).await;
        self.corruption_checked(r).await
    }

    async fn cluster_op_unchecked(&self, offset: u64, len: u64, op: ClusterOp) -> Result<bool> {
        let _resize = self.resize_lock.read().await;
        // `close` may have run while this request waited for the lock.
        self.check_open()?;
        let mut pos = offset;
        let end = offset + len;
        let mut all = true;
        while pos < end {
            let n = self.bytes_in_slice(pos, end - pos);
            all &= self.cluster_op_in_slice(pos, n, op).await?;
            pos += n;
        }
        Ok(all)
    }

    async fn cluster_op_in_slice(&self, offset: u64, len: u64, op: ClusterOp) -> Result<bool> {
        let g = self.geo;
        let cs = g.cluster_size();
        let first = GuestCluster(offset >> g.cluster_bits);
        // (Only subcluster operations start inside a cluster.)
        let n = (((offset + len - 1) >> g.cluster_bits) - first.0 + 1) as usize;
        // Named in the header counts even when the chain was not opened (`info`-style opens):
        // what the guest reads through the chain must not change.
        let has_backing = self.backing.get().is_some() || self.backing_filename().is_some();

        // Without an L2 table every cluster is unallocated and reads as zeros unless a backing
        // file shows through: only write-zeroes (which marks clusters ZERO) needs a table.
        let l1e = self.l1.get(g.l1_index(first));
        let has_table = l1e.is_some_and(|e| e.0 & crate::format::table::OFFSET_MASK != 0);
        if !has_table {
            let needed = match op {
                ClusterOp::Zero { .. } | ClusterOp::ZeroIfZero { .. } => true,
                ClusterOp::Discard => has_backing && self.version() >= 3,
                ClusterOp::Deallocate | ClusterOp::Crop => false,
            };
            if !needed {
                return Ok(true);
            }
        }
        loop {
            let slice = self.l2_slice_for_write(first).await?;
            let claim = match self.claims.try_claim(first.0, first.0 + n as u64) {
                Err(ev) => {
                    ev.wait().await;
                    continue;
                }
                Ok(c) => c,
            };
            let base = self.index_in_slice(first);
            let mut frees = Vec::new();
            let mut undecided = false;
            let decided = (|| -> Result<Option<u64>> {
                let mut st = slice.lock();
                let mut changes = Vec::new();
                for i in 0..n {
                    let (raw, bitmap) = st.l2_at(base + i, g);
                    let old = Mapping::decode(raw, g)?;
                    let new = if g.extended_l2 {
                        let gstart = (first.0 + i as u64) << g.cluster_bits;
                        let from = offset.max(gstart);
                        let to = (offset + len).min(gstart + cs);
                        let (a, z) = super::subcluster::touched(g, gstart, from, to);
                        super::subcluster::new_entry(old, raw, bitmap, (a, z), op, has_backing)
                            .map(|(r, b)| (r, b, Mapping::decode(r, g)))
                    } else {
                        self.new_mapping(old, op, has_backing)
                            .map(|m| (m.encode(g), 0, Ok(m)))
                    };
                    let Some((new_raw, new_bitmap, new)) = new else {
                        undecided = true;
                        return Ok(None);
                    };
                    if (new_raw, new_bitmap) != (raw, bitmap) {
                        changes.push((i, new_raw, new_bitmap));
                        if let Some(free) = freed_range(old, new?, cs) {
                            frees.push(free);
                        }
                    }
                }
                if changes.is_empty() {
                    return Ok(None);
                }
                let entries = st.modify([]);
                for (i, raw, bitmap) in changes {
                    put_l2_entry(entries, base + i, g, raw, bitmap);
                }
                Ok(Some(st.version()))
            })();
            let version = match decided {
                Ok(v) => v,
                Err(e) => {
                    drop(claim);
                    return Err(self.signal_corruption(e).await);
                }
            };
            let discard = match op {
                ClusterOp::Discard | ClusterOp::Deallocate => self.pass_discard,
                ClusterOp::Crop => true,
                // QEMU passes an unmapping write-zeroes down to a data file as it does a
                // discard.
                ClusterOp::Zero { unmap } | ClusterOp::ZeroIfZero { unmap, .. } => {
                    unmap && g.external_data && self.pass_discard
                }
            };
            if g.external_data {
                // No refcounts to drop; the space goes back under the claim (see
                // `discard_external`).
                if discard && version.is_some() {
                    self.discard_external(&frees).await;
                }
                return Ok(!undecided);
            }
            drop(claim);
            if let Some(version) = version {
                for (start, len) in frees {
                    let after = Some(Dep::Table {
                        table: slice.clone(),
                        version,
                    });
                    self.rc.defer_free(start, len, after, discard);
                }
            }
            return Ok(!undecided);
        }
    }

    /// The entry `op` makes of `old`; `None` when `op` cannot decide (see `ZeroIfZero`).
    fn new_mapping(&self, old: Mapping, op: ClusterOp, has_backing: bool) -> Option<Mapping> {
        let v3 = self.version() >= 3;
        Some(match op {
            ClusterOp::ZeroIfZero {
                backing_zero,
                unmap,
            } => match old {
                Mapping::Zero {
                    prealloc: Some(_), ..
                } if unmap => Mapping::Zero {
                    prealloc: None,
                    copied: false,
                },
                Mapping::Zero { .. } => old,
                Mapping::Unallocated if !has_backing || backing_zero => Mapping::Zero {
                    prealloc: None,
                    copied: false,
                },
                _ => return None,
            },
            ClusterOp::Zero { unmap } => match old {
                Mapping::Compressed { .. } => Mapping::Zero {
                    prealloc: None,
                    copied: false,
                },
                Mapping::Data { host, copied } if !unmap => Mapping::Zero {
                    prealloc: Some(host),
                    copied,
                },
                Mapping::Zero {
                    prealloc: Some(host),
                    copied,
                } if !unmap => Mapping::Zero {
                    prealloc: Some(host),
                    copied,
                },
                _ => Mapping::Zero {
                    prealloc: None,
                    copied: false,
                },
            },
            ClusterOp::Deallocate | ClusterOp::Crop => Mapping::Unallocated,
            ClusterOp::Discard => {
                // v2 has no ZERO flag: dropping the cluster would expose the backing file's
                // data where the guest wrote its own. QEMU keeps the data then; so do we.
                if !v3 && has_backing {
                    return Some(old);
                }
                let allocated = !matches!(
                    old,
                    Mapping::Unallocated | Mapping::Zero { prealloc: None, .. }
                );
                if !(allocated || has_backing && old == Mapping::Unallocated && v3) {
                    return Some(old); // already reads as it should
                }
                if v3 {
                    Mapping::Zero {
                        prealloc: None,
                        copied: false,
                    }
                } else {
                    Mapping::Unallocated
                }
            }
        })
    }
}

/// The host byte range that `old` held and `new` no longer holds.
pub(super) fn freed_range(
    old: Mapping,
    new: Mapping,
    cs: u64,
) -> Option<(crate::units::HostOffset, u64)> {
    match old {
        Mapping::Compressed { host, sectors } => Some(compressed_range(host, sectors)),
        Mapping::Data { host, .. }
        | Mapping::Zero {
            prealloc: Some(host),
            ..
        } if new.host_cluster() != Some(host) => Some((host, cs)),
        _ => None,
    }
}
