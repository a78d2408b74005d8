//! Operations on backing chains: `rebase` (name another backing file, keeping what the guest
//! reads) and `commit` (write an overlay's data into a backing file).
//!
//! Both are written for crashes first:
//! - **rebase** copies, cluster by cluster, the old chain's content into the image wherever the
//!   image has nothing of its own and the old and the new chain read differently; only then
//!   does the header name the new file ([`Qcow2::change_backing_file`] flushes first). A crash
//!   before the header write leaves the old backing file named, with extra clusters that hold
//!   what it reads anyway; after it, everything the new file lacks is durable in the image.
//! - **commit** copies what the layers above the base hold into the base, flushes the base,
//!   and only then (when asked) empties the top image. A crash while copying leaves the top
//!   image untouched and shadowing every range written into the base; a crash while emptying
//!   leaves clusters in the top image that hold what the base now holds too.
//!
//! Whole clusters of the image (subclusters where it has them and does not compress) are
//! compared and copied in rebase, so that a compressed image gets whole compressed clusters and
//! a cluster that differs anywhere is copied whole (as `qemu-img rebase` does since QEMU 8.2).

use crate::block::{chain_status, BlockDevice, ZeroFlags};
use crate::buf::{IoBuf, IoBufMut};
use crate::error::{Error, Result};
use crate::qcow2::Qcow2;
use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, StreamExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest run of unallocated clusters that rebase compares at once (QEMU's buffer size:
/// it bounds the series of clusters written at once, and so which of them become data).
const REBASE_CHUNK: u64 = 2 << 20;

/// Reports progress: bytes of the virtual disk handled since the last call.
pub type ProgressFn<'a> = &'a (dyn Fn(u64) + Sync);

/// Rebases `img` (a qcow2 image opened read-write with its old backing chain) onto `new`
/// (`None`: no backing file), recording `new_name` and `new_format` in its header.
pub async fn rebase(
    img: &Arc<dyn BlockDevice>,
    new: Option<&Arc<dyn BlockDevice>>,
    new_name: Option<&str>,
    new_format: Option<&str>,
    compress: bool,
    progress: ProgressFn<'_>,
) -> Result<()> {
    let q = img
        .as_qcow2()
        .ok_or_else(|| Error::unsupported("Operation not supported"))?;
    copy_for_rebase(img, new, compress, progress).await?;
    q.change_backing_file(new_name, new_format).await
}

/// The data half of a safe rebase: writes into `img` the old chain's content of every cluster
/// that `img` does not allocate and where the old chain and `new` read differently.
///
/// The pieces are QEMU's, so that both tools leave the same clusters: the image is walked in
/// runs of unallocated clusters of at most [`REBASE_CHUNK`]; within a run, each maximal
/// series of differing clusters is one write of the old content, except that a series that
/// starts at or past the end of the old backing file (which reads zeros stored nowhere) is
/// written as zero clusters.
pub async fn copy_for_rebase(
    img: &Arc<dyn BlockDevice>,
    new: Option<&Arc<dyn BlockDevice>>,
    compress: bool,
    progress: ProgressFn<'_>,
) -> Result<()> {
    let q = img
        .as_qcow2()
        .ok_or_else(|| Error::unsupported("Operation not supported"))?;
    let size = img.size();
    // The unit compared and copied: a subcluster where the image has them (only what
    // differs gets allocated), a whole cluster when compressing (compressed clusters have no
    // subclusters), as qemu-img does.
    let cs = rebase_unit(q, compress);
    let old = img.backing();
    let old_end = old.as_ref().map_or(0, |o| o.size());
    let target = Target { img, q, compress };
    let between = match new {
        Some(n) => layers_above(old.as_ref(), n),
        None => None,
    };
    let mut off = 0u64;
    while off < size {
        let (mut n, allocated) = allocation_run(img, off, REBASE_CHUNK.min(size - off)).await?;
        if allocated {
            progress(n);
            off += n;
            continue;
        }
        if let Some(between) = &between {
            // The new backing file is in the old chain: only what the layers between them
            // hold can differ.
            let (m, differs) = allocated_above_base(between, off, n).await?;
            if !differs {
                progress(m);
                off += m;
                continue;
            }
            n = m;
        }
        // Whole clusters of the image, its last one possibly short.
        let from = off / cs * cs;
        let to = (off + n).next_multiple_of(cs).min(size);
        if zero_in_both(old.as_ref(), new, from, to - from).await? < to - from {
            let (was, will) = tokio::try_join!(
                read_or_zeros(old.as_ref(), from, to - from),
                read_or_zeros(new, from, to - from)
            )?;
            target
                .write_differing_clusters(from, &was, &will, old_end)
                .await?;
        }
        progress(to - off);
        off = to;
    }
    Ok(())
}

/// The granularity of a rebase's comparisons and writes.
fn rebase_unit(q: &Qcow2, compress: bool) -> u64 {
    if compress {
        q.cluster_size()
    } else {
        q.geometry().subcluster_size()
    }
}

/// When `new` is a file of the chain that starts at `old`: the layers from `old` down to
/// the one above `new`.
fn layers_above(
    old: Option<&Arc<dyn BlockDevice>>,
    new: &Arc<dyn BlockDevice>,
) -> Option<Vec<Arc<dyn BlockDevice>>> {
    let wanted = std::fs::canonicalize(new.filename()).ok()?;
    let mut layers = Vec::new();
    let mut layer = old.cloned();
    while let Some(l) = layer {
        if std::fs::canonicalize(l.filename()).ok().as_ref() == Some(&wanted) {
            return Some(layers);
        }
        layer = l.backing();
        layers.push(l);
    }
    None
}

/// Whether `img` itself allocates the extent at `off`, and for how many bytes (at most `max`).
/// Unlike a single block status, an unallocated run does not stop where the backing file ends.
async fn allocation_run(img: &Arc<dyn BlockDevice>, off: u64, max: u64) -> Result<(u64, bool)> {
    let first = img.block_status(off, max).await?;
    let mut len = first.len.max(1).min(max);
    while !first.allocated && len < max {
        let st = img.block_status(off + len, max - len).await?;
        if st.allocated {
            break;
        }
        len += st.len.max(1).min(max - len);
    }
    Ok((len, first.allocated))
}

/// How many bytes from `off` (at most `max`) read as zeros through both chains, known without
/// reading them (0 when the first extent of either may hold data).
async fn zero_in_both(
    old: Option<&Arc<dyn BlockDevice>>,
    new: Option<&Arc<dyn BlockDevice>>,
    off: u64,
    max: u64,
) -> Result<u64> {
    let mut len = max;
    for dev in [old, new].into_iter().flatten() {
        if off >= dev.size() {
            continue;
        }
        let st = chain_status(dev, off, max.min(dev.size() - off)).await?;
        if st.data || (st.present && !st.zero) {
            return Ok(0);
        }
        len = len.min(st.len.max(1));
    }
    Ok(len)
}

/// The content of `dev` at `[off, off+len)`: zeros past its end, or everywhere without it.
async fn read_or_zeros(dev: Option<&Arc<dyn BlockDevice>>, off: u64, len: u64) -> Result<IoBuf> {
    let inside = dev.map_or(0, |d| d.size().saturating_sub(off).min(len));
    let Some(dev) = dev.filter(|_| inside > 0) else {
        return Ok(IoBufMut::zeroed(len as usize).freeze());
    };
    // Pooled memory, not fresh zeroed pages: rebase reads two buffers per run of clusters.
    let mut out = IoBufMut::for_overwrite(len as usize);
    let mut tail = out.split_off(inside as usize);
    tail.fill(0);
    out = dev.read(off, out).await?;
    out.unsplit(tail);
    Ok(out.freeze())
}

/// The image being rebased, as the copy loop writes to it.
struct Target<'a> {
    img: &'a Arc<dyn BlockDevice>,
    q: &'a Qcow2,
    compress: bool,
}

impl Target<'_> {
    /// Writes the old content of the clusters of `[off, off+len)` that differ between `was`
    /// and `will`, one write per series of consecutive differing clusters; a series that
    /// starts at or past `old_end` (the old backing file's size) as zero clusters. `off` is
    /// cluster aligned.
    async fn write_differing_clusters(
        &self,
        off: u64,
        was: &IoBuf,
        will: &IoBuf,
        old_end: u64,
    ) -> Result<()> {
        let cs = rebase_unit(self.q, self.compress) as usize;
        let len = was.len();
        let mut pos = 0usize;
        while pos < len {
            // The series of clusters from `pos` that all differ, or all agree.
            let differs = |at: usize| {
                let end = (at + cs).min(len);
                was[at..end] != will[at..end]
            };
            let kind = differs(pos);
            let mut end = (pos + cs).min(len);
            while end < len && differs(end) == kind {
                end = (end + cs).min(len);
            }
            if kind {
                let at = off + pos as u64;
                self.write(at, was.slice(pos..end), at >= old_end).await?;
            }
            pos = end;
        }
        Ok(())
    }

    async fn write(&self, at: u64, data: IoBuf, zero: bool) -> Result<()> {
        if zero {
            self.img
                .write_zeroes(at, data.len() as u64, ZeroFlags::default())
                .await
        } else if self.compress {
            self.q.write_compressed(at, data).await
        } else {
            self.img.write(at, data).await
        }
    }
}

/// How `commit` ends.
#[derive(Clone, Copy, Debug, Default)]
pub struct CommitOptions {
    /// Empty the top image once its data is durable in the base (qemu-img's default when
    /// committing into the image's own backing file).
    pub empty_top: bool,
    /// Bytes per second copied at most (`None`: unlimited).
    pub rate: Option<u64>,
}

/// Commits `top` into the backing file `depth` layers below it (1: its own backing file),
/// which must have been opened read-write (`OpenOptions::writable_backing_depth`).
///
/// Everything allocated above the base is copied: data as `top` reads it, zero clusters as
/// write-zeroes, and a layer shorter than the image counts as allocated zeros past its end
/// (as in QEMU). A base smaller than `top` grows first.
pub async fn commit(
    top: &Arc<dyn BlockDevice>,
    depth: usize,
    opts: CommitOptions,
    progress: ProgressFn<'_>,
) -> Result<()> {
    let mut layers = vec![top.clone()];
    while layers.len() <= depth {
        let Some(next) = layers.last().and_then(|l| l.backing()) else {
            return Err(Error::arg(format!(
                "the backing chain has fewer than {depth} layers below the image"
            )));
        };
        layers.push(next);
    }
    let base = layers.pop().ok_or_else(|| Error::arg("no base"))?;
    if base.read_only() {
        return Err(Error::ReadOnly);
    }
    let size = top.size();
    if base.size() < size {
        match base.as_qcow2() {
            Some(q) => q.grow(size).await?,
            None => {
                return Err(Error::unsupported(
                    "committing into a raw base smaller than the image is not supported yet",
                ))
            }
        }
    }
    let mut copier = Copier {
        top,
        base: &base,
        rate: opts.rate.filter(|&r| r > 0),
        started: Instant::now(),
        issued: 0,
        inflight: FuturesUnordered::new(),
    };
    let granularity = base.as_qcow2().map_or(MAX_GRANULARITY, |q| {
        q.cluster_size().clamp(4096, MAX_GRANULARITY)
    });
    for (from, to) in dirty_chunks(&layers, size, granularity).await? {
        let mut off = from * granularity;
        let end = (to * granularity).min(size);
        while off < end {
            let batch_end = (off + COMMIT_BATCH).min(end);
            let done = copier.copy_batch(off, batch_end, granularity).await?;
            progress(done - off);
            off = done;
        }
    }
    copier.finish().await?;
    // The base holds the data durably before the image lets go of it.
    base.flush().await?;
    if opts.empty_top {
        if let Some(q) = top.as_qcow2() {
            q.deallocate_all().await?;
        }
    }
    Ok(())
}

/// Dirty-chunk size when the base has no cluster size (QEMU's default bitmap granularity).
const MAX_GRANULARITY: u64 = 64 * 1024;
/// Chunks taken at once (QEMU's mirror buffer).
const COMMIT_BATCH: u64 = 16 << 20;
/// Largest data copy issued at once.
const MAX_COPY: u64 = 1 << 20;
/// Copies in flight at once.
const MAX_IN_FLIGHT: usize = 16;

/// The runs of `granularity`-sized chunks (as chunk indices, end exclusive) that hold
/// anything in a layer above the base: what commit must copy. Like QEMU's commit job, whole
/// chunks are copied, so that the base gets the same clusters whichever tool commits.
async fn dirty_chunks(
    layers: &[Arc<dyn BlockDevice>],
    size: u64,
    granularity: u64,
) -> Result<Vec<(u64, u64)>> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut off = 0;
    while off < size {
        let (len, allocated) = allocated_above_base(layers, off, size - off).await?;
        if allocated {
            let (from, to) = (off / granularity, (off + len).div_ceil(granularity));
            match runs.last_mut() {
                Some(last) if last.1 >= from => last.1 = last.1.max(to),
                _ => runs.push((from, to)),
            }
        }
        off += len;
    }
    Ok(runs)
}

/// Whether a layer above the base defines the extent at `off` (at most `max` bytes), and
/// how long that answer holds.
async fn allocated_above_base(
    layers: &[Arc<dyn BlockDevice>],
    off: u64,
    max: u64,
) -> Result<(u64, bool)> {
    let mut max = max;
    for layer in layers {
        if off >= layer.size() {
            // Past the end of a shorter layer the image reads zeros: allocated there.
            return Ok((max, true));
        }
        let st = layer.block_status(off, max.min(layer.size() - off)).await?;
        let n = st.len.max(1).min(max);
        if st.allocated {
            return Ok((n, true));
        }
        max = n;
    }
    Ok((max, false))
}

/// What the whole chain of `top` reads at `off` (at most `max` bytes): (length, holds data,
/// reads as zeros).
async fn chain_extent(top: &Arc<dyn BlockDevice>, off: u64, max: u64) -> Result<(u64, bool, bool)> {
    let mut layer = top.clone();
    let mut max = max;
    loop {
        if off >= layer.size() {
            return Ok((max, false, true));
        }
        let st = layer.block_status(off, max.min(layer.size() - off)).await?;
        max = st.len.max(1).min(max);
        if st.is_final() {
            return Ok((max, st.data, st.zero && !st.data));
        }
        match layer.backing() {
            Some(next) => layer = next,
            None => return Ok((max, false, true)),
        }
    }
}

/// Copies dirty chunks from `top` (read through its whole chain) into `base`.
struct Copier<'a> {
    top: &'a Arc<dyn BlockDevice>,
    base: &'a Arc<dyn BlockDevice>,
    rate: Option<u64>,
    started: Instant,
    /// Bytes of data copies issued so far (what the rate limit counts).
    issued: u64,
    /// Pieces being copied: several at once, as the engine serves concurrent requests (and as
    /// QEMU's commit job keeps up to 16 in flight); pieces never overlap.
    inflight: FuturesUnordered<BoxFuture<'static, Result<()>>>,
}

impl Copier<'_> {
    /// Issues the copies of the dirty chunks of `[off, end)` (`off` chunk aligned), returns
    /// where it stopped (`end`, or further when the last piece was a whole chunk past a
    /// partial one).
    ///
    /// The pieces are QEMU's: an extent of the chain that holds data is copied (at most
    /// [`MAX_COPY`] at once); one that reads as zeros becomes write-zeroes only when it covers
    /// whole chunks that are also whole clusters of the base, and is copied as data otherwise.
    async fn copy_batch(&mut self, mut off: u64, end: u64, granularity: u64) -> Result<u64> {
        let size = self.top.size();
        let align = self.base.as_qcow2().map_or(1, |q| q.cluster_size());
        while off < end {
            let (len, data, zero) = chain_extent(self.top, off, end - off).await?;
            let mut io = if data { len.min(MAX_COPY) } else { len };
            io -= io % granularity;
            let mut as_zeros = false;
            if io < granularity {
                io = granularity;
            } else if !data && zero {
                as_zeros = off % align == 0 && io % align == 0;
            }
            let io = io.min(size - off);
            let (top, base) = (self.top.clone(), self.base.clone());
            let piece: BoxFuture<'static, Result<()>> = if as_zeros {
                let unmap = ZeroFlags {
                    may_unmap: true,
                    fast_only: false,
                };
                Box::pin(async move { base.write_zeroes(off, io, unmap).await })
            } else {
                self.pace(io).await;
                Box::pin(async move {
                    let buf = top.read(off, IoBufMut::for_overwrite(io as usize)).await?;
                    base.write(off, buf.freeze()).await
                })
            };
            while self.inflight.len() >= MAX_IN_FLIGHT {
                self.next_done().await?;
            }
            self.inflight.push(piece);
            off += io;
        }
        Ok(off)
    }

    /// Sleeps until `len` more bytes of copying fit the rate limit.
    async fn pace(&mut self, len: u64) {
        self.issued += len;
        if let Some(rate) = self.rate {
            let due = Duration::from_secs_f64(self.issued as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(self.started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }

    async fn next_done(&mut self) -> Result<()> {
        match self.inflight.next().await {
            Some(r) => r,
            None => Ok(()),
        }
    }

    /// Waits for every piece in flight.
    async fn finish(&mut self) -> Result<()> {
        while !self.inflight.is_empty() {
            self.next_done().await?;
        }
        Ok(())
    }
}

/// The depth below `img` (1: its backing file) of the backing file that `name` designates,
/// compared as QEMU does: a relative name is resolved against the directory of each image
/// that names a backing file, and both sides are canonicalized.
pub fn find_backing_depth(img: &Arc<dyn BlockDevice>, name: &str) -> Option<usize> {
    let mut layer = img.clone();
    let mut depth = 0;
    while let Some(next) = layer.backing() {
        depth += 1;
        let wanted = canonical_beside(layer.filename(), name);
        if wanted.is_some() && wanted == std::fs::canonicalize(next.filename()).ok() {
            return Some(depth);
        }
        layer = next;
    }
    None
}

/// `name` resolved against the directory of `image` (unless absolute), canonicalized.
fn canonical_beside(image: &str, name: &str) -> Option<PathBuf> {
    let p = Path::new(name);
    let full = if p.is_absolute() {
        p.to_path_buf()
    } else {
        Path::new(image)
            .parent()
            .map_or_else(|| p.to_path_buf(), |d| d.join(p))
    };
    std::fs::canonicalize(full).ok()
}
