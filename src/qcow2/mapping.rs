//! Guest-to-host lookup: decodes the L2 entries covering a guest range into runs of clusters that
//! are handled alike (contiguous data, zeros, unallocated, one compressed cluster).
//!
//! A lookup holds no lock while it waits for a table to load, and the table lock only while it
//! decodes entries. Callers that will use the host offsets hold an I/O epoch guard from before
//! the lookup (see `inflight`).

use super::Qcow2;
use crate::block::BlockStatus;
use crate::error::{IoContext, Result};
use crate::format::table::Mapping;
use crate::units::{GuestCluster, HostOffset};

/// How a run of guest bytes is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RunKind {
    /// Data at this host byte offset (corresponding to the run's first byte).
    Data { host: u64 },
    /// Reads as zeros; `prealloc` is the host byte offset kept for it, if any.
    Zero { prealloc: Option<u64> },
    /// Falls through to the backing file.
    Unallocated,
    /// Part of one compressed cluster.
    Compressed { host: HostOffset, sectors: u64 },
}

/// A run of guest bytes `[offset, offset + len)`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Run {
    pub offset: u64,
    pub len: u64,
    pub kind: RunKind,
}

impl Qcow2 {
    /// Bytes from `offset` to the end of its L2 slice, at most `max`.
    pub(crate) fn bytes_in_slice(&self, offset: u64, max: u64) -> u64 {
        let g = self.geo;
        let c = offset >> g.cluster_bits;
        let in_slice = (c & (g.l2_entries() - 1)) % self.slice_entries;
        let slice_end = (c + self.slice_entries - in_slice) << g.cluster_bits;
        (slice_end - offset).min(max)
    }

    /// Decodes the mapping of `[offset, offset+len)`, stopping at the end of the first L2 slice.
    /// The runs cover a non-empty prefix of the range.
    pub(crate) async fn lookup(&self, offset: u64, len: u64) -> Result<Vec<Run>> {
        match self.lookup_inner(offset, len).await {
            Ok(r) => Ok(r),
            Err(e) => Err(self.signal_corruption(e).await),
        }
    }

    async fn lookup_inner(&self, offset: u64, len: u64) -> Result<Vec<Run>> {
        let g = self.geo;
        let cs = g.cluster_size();
        let len = self.bytes_in_slice(offset, len);
        let end = offset + len;
        let first = GuestCluster(offset >> g.cluster_bits);
        let l1i = g.l1_index(first);
        let l2i = g.l2_index(first) as u64;
        let slice = l2i / self.slice_entries;
        let in_slice = (l2i % self.slice_entries) as usize;

        let l2 = match self.l1.get(l1i) {
            Some(e) => e.l2_offset(g, l1i)?,
            None => None,
        };
        let Some(l2) = l2 else {
            return Ok(vec![Run {
                offset,
                len,
                kind: RunKind::Unallocated,
            }]);
        };
        let table = self.l2.get(&self.w, self.slice_offset(l2, slice)).await?;
        let st = table.lock();
        let mut runs: Vec<Run> = Vec::new();
        let mut pos = offset;
        let mut i = in_slice;
        while pos < end {
            let in_cluster = pos & (cs - 1);
            let n = (cs - in_cluster).min(end - pos);
            let kind = match Mapping::decode(st.u64_at(i), g)? {
                Mapping::Unallocated => RunKind::Unallocated,
                Mapping::Zero { prealloc, .. } => RunKind::Zero {
                    prealloc: prealloc.map(|h| h.0 + in_cluster),
                },
                Mapping::Data { host, .. } => RunKind::Data {
                    host: host.0 + in_cluster,
                },
                Mapping::Compressed { host, sectors } => RunKind::Compressed { host, sectors },
            };
            match runs.last_mut() {
                Some(last) if continues(last, kind) => last.len += n,
                _ => runs.push(Run {
                    offset: pos,
                    len: n,
                    kind,
                }),
            }
            pos += n;
            i += 1;
        }
        Ok(runs)
    }

    /// What this layer says about the extent at `offset` (for map and NBD block status).
    pub(crate) async fn status_at(&self, offset: u64, max: u64) -> Result<BlockStatus> {
        let max = max.min(self.virtual_size().saturating_sub(offset));
        if max == 0 {
            return Ok(BlockStatus::default());
        }
        let runs = self.lookup(offset, max).await?;
        let r = runs[0];
        Ok(match r.kind {
            RunKind::Data { host } => {
                // A data cluster over a hole in the file reads as zeros (preallocated metadata).
                let (hole, n) = self
                    .w
                    .storage
                    .hole_at(host, r.len)
                    .await
                    .context(|| "querying file allocation".to_string())?;
                BlockStatus {
                    len: n.clamp(1, r.len),
                    data: true,
                    zero: hole,
                    compressed: false,
                    offset: Some(host),
                    allocated: true,
                }
            }
            RunKind::Zero { prealloc } => BlockStatus {
                len: r.len,
                data: false,
                zero: true,
                compressed: false,
                offset: prealloc,
                allocated: true,
            },
            RunKind::Compressed { .. } => BlockStatus {
                len: r.len,
                data: true,
                zero: false,
                compressed: true,
                offset: None,
                allocated: true,
            },
            RunKind::Unallocated => match self.backing.get() {
                Some(b) if offset < b.size() => BlockStatus {
                    len: r.len.min(b.size() - offset),
                    ..BlockStatus::default()
                },
                _ => BlockStatus {
                    len: r.len,
                    zero: true,
                    ..BlockStatus::default()
                },
            },
        })
    }
}

/// Whether a cluster of kind `next` extends run `last`.
fn continues(last: &Run, next: RunKind) -> bool {
    match (last.kind, next) {
        (RunKind::Data { host: a }, RunKind::Data { host: b }) => a + last.len == b,
        (RunKind::Zero { prealloc: None }, RunKind::Zero { prealloc: None }) => true,
        (RunKind::Zero { prealloc: Some(a) }, RunKind::Zero { prealloc: Some(b) }) => {
            a + last.len == b
        }
        (RunKind::Unallocated, RunKind::Unallocated) => true,
        _ => false,
    }
}
