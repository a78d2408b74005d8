//! Guest-to-host lookup: decodes the L2 entries covering a guest range into runs of clusters that
//! are handled alike (contiguous data, zeros, unallocated, one compressed cluster).
//!
//! A lookup holds no lock while it waits for a table to load, and the table lock only while it
//! decodes entries. The cached-read fast path decodes from the thread's own copy of the slice
//! when it has a current one (`l2view`), touching no shared lock at all. Callers that will use the host offsets hold an I/O epoch guard from before
//! the lookup (see `inflight`).

use super::cache::l2_entry;
use super::Qcow2;
use crate::block::BlockStatus;
use crate::error::Error;
use crate::error::{IoContext, Result};
use crate::format::table::{Mapping, Subcluster};
use crate::units::{GuestCluster, HostOffset};

/// How a run of guest bytes is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RunKind {
    /// Data at this host byte offset (corresponding to the run's first byte).
    Data { host: u64 },
    /// Reads as zeros; `prealloc` is the host byte offset kept for it, if any.
    Zero { prealloc: Option<u64> },
    /// Falls through to the backing file. `host`: the host byte offset an extended L2 entry
    /// keeps for it (a preallocated subcluster that is not allocated), if any.
    Unallocated { host: Option<u64> },
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
                kind: RunKind::Unallocated { host: None },
            });
        };
        let table = self.l2.get(&self.w, table_off).await?;
        let st = table.lock();
        self.first_run(st.data(), table_off, offset, offset + len)
    }

    async fn lookup_inner(&self, offset: u64, len: u64) -> Result<Vec<Run>> {
        let len = self.bytes_in_slice(offset, len);
        let end = offset + len;
        let Some(table_off) = self.slice_of(offset)? else {
            return Ok(vec![Run {
                offset,
                len,
                kind: RunKind::Unallocated { host: None },
            }]);
        };
        let table = self.l2.get(&self.w, table_off).await?;
        let st = table.lock();
        let mut runs = Vec::new();
        let mut pos = offset;
        while pos < end {
            let run = self.first_run(st.data(), table_off, pos, end)?;
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
    /// in the same slice as `offset`). `slice` is the slice's host offset (for messages).
    fn first_run(&self, entries: &[u8], slice: HostOffset, offset: u64, end: u64) -> Result<Run> {
        let g = self.geo;
        let cs = g.cluster_size();
        let unit = g.subcluster_size();
        let mut i = self.index_in_slice(GuestCluster(offset >> g.cluster_bits));
        let mut run: Option<Run> = None;
        let mut pos = offset;
        while pos < end {
            let in_cluster = pos & (cs - 1);
            let cluster_end = (pos - in_cluster + cs).min(end);
            let (raw, bitmap) = l2_entry(entries, i, g);
            let m = Mapping::decode(raw, g).map_err(|e| self.bad_entry(slice, i, raw, e))?;
            if g.external_data {
                self.check_external_entry(m, GuestCluster(pos >> g.cluster_bits), slice, i)?;
            }
            if !g.extended_l2 || matches!(m, Mapping::Compressed { .. }) {
                let kind = match m {
                    Mapping::Unallocated => RunKind::Unallocated { host: None },
                    Mapping::Zero { prealloc, .. } => RunKind::Zero {
                        prealloc: prealloc.map(|h| h.0 + in_cluster),
                    },
                    Mapping::Data { host, .. } => RunKind::Data {
                        host: host.0 + in_cluster,
                    },
                    Mapping::Compressed { host, sectors } => RunKind::Compressed { host, sectors },
                };
                if !extend(&mut run, pos, cluster_end - pos, kind) {
                    break;
                }
                pos = cluster_end;
            } else {
                let host = m.host_cluster().map_or(0, |h| h.0);
                while pos < cluster_end {
                    let at = pos & (cs - 1);
                    let n = (unit - (pos & (unit - 1))).min(cluster_end - pos);
                    let sc = (at / unit) as u32;
                    let kind = match Subcluster::of(m, bitmap, sc) {
                        None => return Err(self.invalid_entry(slice, i, true)),
                        Some(Subcluster::Data) => RunKind::Data { host: host + at },
                        Some(Subcluster::Zero { allocated }) => RunKind::Zero {
                            prealloc: allocated.then_some(host + at),
                        },
                        Some(Subcluster::Unallocated { allocated }) => RunKind::Unallocated {
                            host: allocated.then_some(host + at),
                        },
                        Some(Subcluster::Compressed) => unreachable!("handled above"),
                    };
                    if !extend(&mut run, pos, n, kind) {
                        return run.ok_or_else(|| Error::arg("empty lookup"));
                    }
                    pos += n;
                }
            }
            i += 1;
        }
        run.ok_or_else(|| Error::arg("empty lookup"))
    }

    /// The corruption error for an extended L2 entry whose bitmap is invalid (QEMU's words:
    /// its read path's message has two spaces where its write path's has one).
    pub(crate) fn invalid_entry(&self, slice: HostOffset, i: usize, read: bool) -> Error {
        let (table, index) = self.l2_position(slice, i);
        Error::corrupt(format!(
            "Invalid cluster entry found {}(L2 offset: {}, L2 index: {})",
            if read { " " } else { "" },
            super::check::c_hex(table),
            super::check::c_hex(index)
        ))
    }

    /// The first run of `[offset, offset+len)` if it can be had without I/O (its L2 slice is
    /// cached, or there is no L2 table): the allocation-free path of cached reads.
    pub(crate) fn lookup_first_cached(&self, offset: u64, len: u64) -> Result<Option<Run>> {
        let len = self.bytes_in_slice(offset, len);
        match self.slice_of(offset)? {
            None => Ok(Some(Run {
                offset,
                len,
                kind: RunKind::Unallocated { host: None },
            })),
            Some(table_off) => self
                .l2
                .with_loaded_or_copy(table_off, |entries| {
                    self.first_run(entries, table_off, offset, offset + len)
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
                // QEMU does not look into an external data file for that: neither do we.
                let (hole, n) = if self.geo.external_data {
                    (false, r.len)
                } else {
                    self.data
                        .hole_at(host, r.len)
                        .await
                        .context(|| "querying file allocation".to_string())?
                };
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
            RunKind::Unallocated { host } => match self.backing.get() {
                Some(b) if offset < b.size() => BlockStatus {
                    len: r.len.min(b.size() - offset),
                    ..BlockStatus::default()
                },
                _ => BlockStatus {
                    len: r.len,
                    zero: true,
                    offset: host,
                    ..BlockStatus::default()
                },
            },
        })
    }
}

impl Qcow2 {
    /// The L2 table offset and the index in it of entry `i` of the slice at `slice`.
    pub(super) fn l2_position(&self, slice: HostOffset, i: usize) -> (u64, u64) {
        let slice_no = slice_index_of(self, slice);
        let index = slice_no * self.slice_entries + i as u64;
        (slice.0 - slice_no * self.slice_bytes(), index)
    }

    /// An entry that does not decode (a misaligned offset), in QEMU's words.
    pub(crate) fn bad_entry(&self, slice: HostOffset, i: usize, raw: u64, e: Error) -> Error {
        let off = raw & crate::format::table::OFFSET_MASK;
        if raw & crate::format::table::COMPRESSED != 0 || self.geo.is_aligned(off) {
            return e;
        }
        let (table, index) = self.l2_position(slice, i);
        Error::corrupt(format!(
            "Cluster allocation offset {off:#x} unaligned (L2 offset: {}, L2 index: {})",
            super::check::c_hex(table),
            super::check::c_hex(index)
        ))
    }
}

/// Extends `run` by `n` bytes of `kind` at `pos` (starting it if there is none); false if
/// `kind` does not continue it.
fn extend(run: &mut Option<Run>, pos: u64, n: u64, kind: RunKind) -> bool {
    match run.as_mut() {
        None => {
            *run = Some(Run {
                offset: pos,
                len: n,
                kind,
            });
            true
        }
        Some(r) if continues(r, kind) => {
            r.len += n;
            true
        }
        Some(_) => false,
    }
}

/// Which slice of its L2 table the slice at `slice` is (slices are aligned to their size
/// inside a cluster-aligned table).
fn slice_index_of(img: &Qcow2, slice: HostOffset) -> u64 {
    let in_table = slice.0 & (img.geo.cluster_size() - 1);
    in_table / img.slice_bytes()
}

/// Whether a cluster of kind `next` extends run `last`.
fn continues(last: &Run, next: RunKind) -> bool {
    match (last.kind, next) {
        (RunKind::Data { host: a }, RunKind::Data { host: b }) => a + last.len == b,
        (RunKind::Zero { prealloc: None }, RunKind::Zero { prealloc: None }) => true,
        (RunKind::Zero { prealloc: Some(a) }, RunKind::Zero { prealloc: Some(b) }) => {
            a + last.len == b
        }
        (RunKind::Unallocated { host: None }, RunKind::Unallocated { host: None }) => true,
        (RunKind::Unallocated { host: Some(a) }, RunKind::Unallocated { host: Some(b) }) => {
            a + last.len == b
        }
        _ => false,
    }
}
