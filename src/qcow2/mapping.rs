//! Guest-to-host lookup: decodes the L2 entries covering a guest range into runs of clusters that
//! are handled alike (contiguous data, zeros, unallocated, one compressed cluster).
//!
//! A lookup holds no lock while it waits for a table to load, and the table lock only while it
//! decodes entries. The cached-read fast path decodes from the thread's own copy of the slice
//! when it has a current one (`l2view`), touching no shared lock at all. Callers that will use the host offsets hold an I/O epoch guard from before
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

/// Big-endian entry `i` of a table's bytes (0 past the end: callers stay inside the slice).
#[inline]
fn be_u64_at(entries: &[u8], i: usize) -> u64 {
    entries
        .get(i * 8..i * 8 + 8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_be_bytes)
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

    /// The first run of `[offset, offset+len)` (what block status needs: decoding the rest of
    /// the slice would make walking an image extent by extent quadratic).
    pub(crate) async fn lookup_first(&self, offset: u64, len: u64) -> Result<Run> {
        let r = self.lookup_first_inner(offset, len).await;
        match r {
            Ok(r) => Ok(r),
            Err(e) => Err(self.signal_corruption(e).await),
        }
    }

    async fn lookup_first_inner(&self, offset: u64, len: u64) -> Result<Run> {
        let len = self.bytes_in_slice(offset, len);
        let Some(table_off) = self.slice_of(offset)? else {
            return Ok(Run {
                offset,
                len,
                kind: RunKind::Unallocated,
            });
        };
        let table = self.l2.get(&self.w, table_off).await?;
        let st = table.lock();
        self.first_run(st.data(), offset, offset + len)
    }

    async fn lookup_inner(&self, offset: u64, len: u64) -> Result<Vec<Run>> {
        let len = self.bytes_in_slice(offset, len);
        let end = offset + len;
        let Some(table_off) = self.slice_of(offset)? else {
            return Ok(vec![Run {
                offset,
                len,
                kind: RunKind::Unallocated,
            }]);
        };
        let table = self.l2.get(&self.w, table_off).await?;
        let st = table.lock();
        let mut runs = Vec::new();
        let mut pos = offset;
        while pos < end {
            let run = self.first_run(st.data(), pos, end)?;
            pos += run.len;
            runs.push(run);
        }
        Ok(runs)
    }

    /// The offset of the L2 slice holding `offset`, `None` if no L2 table is allocated there.
    fn slice_of(&self, offset: u64) -> Result<Option<HostOffset>> {
        let g = self.geo;
        let first = GuestCluster(offset >> g.cluster_bits);
        let l1i = g.l1_index(first);
        let l2 = match self.l1.get(l1i) {
            Some(e) => e.l2_offset(g, l1i)?,
            None => None,
        };
        let slice = g.l2_index(first) as u64 / self.slice_entries;
        Ok(l2.map(|l2| self.slice_offset(l2, slice)))
    }

    /// The run starting at `offset`, as long as the entries allow (up to `end`, which must lie
    /// in the same slice as `offset`).
    fn first_run(&self, entries: &[u8], offset: u64, end: u64) -> Result<Run> {
        let g = self.geo;
        let cs = g.cluster_size();
        let mut i = self.index_in_slice(GuestCluster(offset >> g.cluster_bits));
        let mut run: Option<Run> = None;
        let mut pos = offset;
        while pos < end {
            let in_cluster = pos & (cs - 1);
            let n = (cs - in_cluster).min(end - pos);
            let kind = match Mapping::decode(be_u64_at(entries, i), g)? {
                Mapping::Unallocated => RunKind::Unallocated,
                Mapping::Zero { prealloc, .. } => RunKind::Zero {
                    prealloc: prealloc.map(|h| h.0 + in_cluster),
                },
                Mapping::Data { host, .. } => RunKind::Data {
                    host: host.0 + in_cluster,
                },
                Mapping::Compressed { host, sectors } => RunKind::Compressed { host, sectors },
            };
            match run.as_mut() {
                None => {
                    run = Some(Run {
                        offset: pos,
                        len: n,
                        kind,
                    })
                }
                Some(r) if continues(r, kind) => r.len += n,
                Some(_) => break,
            }
            pos += n;
            i += 1;
        }
        run.ok_or_else(|| crate::error::Error::arg("empty lookup"))
    }

    /// The first run of `[offset, offset+len)` if it can be had without I/O (its L2 slice is
    /// cached, or there is no L2 table): the allocation-free path of cached reads.
    pub(crate) fn lookup_first_cached(&self, offset: u64, len: u64) -> Result<Option<Run>> {
        let len = self.bytes_in_slice(offset, len);
        match self.slice_of(offset)? {
            None => Ok(Some(Run {
                offset,
                len,
                kind: RunKind::Unallocated,
            })),
            Some(table_off) => self
                .l2
                .with_loaded_or_copy(table_off, |entries| {
                    self.first_run(entries, offset, offset + len)
                })
                .transpose(),
        }
    }

    /// What this layer says about the extent at `offset` (for map and NBD block status).
    pub(crate) async fn status_at(&self, offset: u64, max: u64) -> Result<BlockStatus> {
        let max = max.min(self.virtual_size().saturating_sub(offset));
        if max == 0 {
            return Ok(BlockStatus::default());
        }
        let r = self.lookup_first(offset, max).await?;
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
