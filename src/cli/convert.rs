//! `qimg convert`: copy one or more images (concatenated) into a new image, qcow2 or raw,
//! optionally compressed, with qemu-img convert's flags.
//!
//! The source is walked in chunks; what reads as zeros is not written (the target starts out
//! zero) unless the target cannot guarantee zeros (`-n`, or a backing file), and what a `-B`
//! target's backing file already provides (data not allocated in the source's top layer) is not
//! copied. Data is scanned for zero runs of at least `-S` bytes, which are skipped too (for a
//! new qcow2 target in whole clusters, so that the host file has no holes inside the clusters
//! written); `-S 0` writes every byte, zeros included, as qemu-img does (`tests/convert.rs`
//! checks the resulting allocation against qemu-img's). `-m`
//! chunks are in flight at once; writes are issued in order unless `-W` allows any order (with
//! `-c`, only the order in which compressed clusters are placed is kept, and compression of
//! many clusters runs in parallel either way).

use super::create::{make, parse_options};
use super::fail;
use super::opts::{open, ImageArgs};
use super::progress::Progress;
use qimg::block::{chain_status, BlockDevice, Format, ZeroFlags};
use qimg::qcow2::Preallocation;
use qimg::size::{parse_size, SizeError};
use qimg::{Error, IoBuf, IoBufMut, Result};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

#[derive(clap::Args)]
pub struct Args {
    /// QEMU objects: secret,id=ID,data=TEXT|file=FILE[,format=raw|base64] (nothing uses a
    /// secret until encrypted images are supported); other object types are refused
    #[arg(long = "object", value_name = "OBJECT")]
    object: Vec<String>,
    /// Source format (probed if not given)
    #[arg(short = 'f', long = "source-format")]
    source_format: Option<String>,
    /// The image name is an option list (driver=qcow2,file.filename=NAME,...)
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// Target format (default raw)
    #[arg(short = 'O', long = "target-format", default_value = "raw")]
    target_format: String,
    /// Target options (as for create)
    #[arg(short = 'o', long = "target-options")]
    options: Vec<String>,
    /// Compress the target (qcow2 only)
    #[arg(short = 'c', long = "compress")]
    compress: bool,
    /// Show progress
    #[arg(short = 'p', long = "progress")]
    progress: bool,
    /// Requests in flight (default 8)
    #[arg(
        short = 'm',
        long = "parallel",
        default_value = "8",
        allow_hyphen_values = true
    )]
    parallel: String,
    /// Rate limit: bytes of data copied per second (suffixes allowed; 0: no limit)
    #[arg(short = 'r', long = "rate-limit", allow_hyphen_values = true)]
    rate: Option<String>,
    /// Allow out-of-order writes
    #[arg(short = 'W', long = "oob-writes")]
    oob: bool,
    /// Minimum run of zeros that is left sparse (default 4k; 0 writes every byte)
    #[arg(short = 'S', long = "sparse-size", allow_hyphen_values = true)]
    sparse: Option<String>,
    /// Do not create the target (it must exist and be large enough)
    #[arg(short = 'n', long = "no-create")]
    no_create: bool,
    /// The existing target (-n) reads zeros everywhere: zero areas of the source are not written
    #[arg(long = "target-is-zero")]
    target_is_zero: bool,
    /// Target cache mode (default unsafe)
    #[arg(short = 't', long = "target-cache", default_value = "unsafe")]
    target_cache: String,
    /// Source cache mode (default writeback)
    #[arg(short = 'T', long = "source-cache", default_value = "writeback")]
    source_cache: String,
    /// Backing file of the target (copy only what the source's top layer holds)
    #[arg(short = 'B', long = "backing")]
    backing: Option<String>,
    /// Format of the backing file
    #[arg(short = 'F', long = "backing-format")]
    backing_format: Option<String>,
    /// Quiet
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Read an internal snapshot of the source: its ID or name, or
    /// snapshot.id=ID[,snapshot.name=NAME]
    #[arg(short = 'l', value_name = "SNAPSHOT")]
    snapshot: Option<String>,
    /// Copy the persistent dirty bitmaps of the source (qcow2 to qcow2)
    #[arg(long = "bitmaps")]
    bitmaps: bool,
    /// With --bitmaps: leave out inconsistent bitmaps (with a warning) instead of failing
    #[arg(long = "skip-broken-bitmaps")]
    skip_broken_bitmaps: bool,
    /// Go on past read errors of the source: what cannot be read is written as zeros, with a
    /// warning for each sector (block status errors: the sector is read as data)
    #[arg(long = "salvage")]
    salvage: bool,
    /// Source file(s) and the target file (last)
    files: Vec<String>,
}

/// Bytes per copy step (aligned to the target cluster size).
const CHUNK: u64 = 2 << 20;

/// Most requests in flight (`-m`, qemu-img's limit).
const MAX_PARALLEL: usize = 16;

/// Largest `-S` (qemu-img's limit).
const MAX_SPARSE: u64 = 16 << 20;

pub async fn run(a: Args) -> u8 {
    if let Err(e) = super::objects::define(&a.object) {
        return super::fail(e.to_string());
    }
    match convert(&a).await {
        Ok(()) => 0,
        Err(e) => fail(e),
    }
}

/// `-m`: requests in flight. Each holds a chunk buffer, so it is bounded as qemu-img bounds it
/// (same messages).
fn parse_parallel(s: &str) -> Result<usize> {
    match s.trim().parse::<i64>() {
        Ok(n) if (1..=MAX_PARALLEL as i64).contains(&n) => Ok(n as usize),
        Ok(_) => Err(Error::arg(format!(
            "Invalid number of coroutines specified. Must be between 1 and {MAX_PARALLEL}."
        ))),
        Err(_) => Err(Error::arg(format!(
            "Invalid number of coroutines specified: '{s}'."
        ))),
    }
}

/// `-S`: bytes, a multiple of 512 up to 16 MiB, validated as qemu-img validates it.
fn parse_sparse(s: &str) -> Result<u64> {
    let n = match parse_size(s) {
        Ok(n) if n <= i64::MAX as u64 => n,
        Err(SizeError::Invalid) if !s.trim_start().starts_with('-') => {
            return Err(Error::arg(format!(
                "Invalid buffer size for sparse output specified: '{s}'."
            )))
        }
        _ => {
            return Err(Error::arg(format!(
                "Invalid buffer size for sparse output specified. Must be between 0 and {}.",
                i64::MAX
            )))
        }
    };
    if n % 512 != 0 || n > MAX_SPARSE {
        return Err(Error::arg(format!(
            "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 \
             up to {MAX_SPARSE}. Select 0 to disable sparse detection (fully allocates output)."
        )));
    }
    Ok(n)
}

/// `--bitmaps`, before the target is created: the source can have bitmaps, and none that would
/// be copied is inconsistent (unless they are to be skipped). Bitmaps are visited in the order
/// qemu-img visits them (the reverse of the directory), so the same one is named first.
fn check_bitmaps(src: &dyn BlockDevice, skip_broken: bool) -> Result<()> {
    let Some(q) = src.as_qcow2() else {
        return Err(Error::arg("Source lacks bitmap support"));
    };
    if skip_broken {
        return Ok(());
    }
    if let Some(b) = q.bitmap_list().iter().rev().find(|b| b.in_use) {
        return Err(Error::arg(format!(
            "Cannot copy inconsistent bitmap '{}'\nTry --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it",
            b.name
        )));
    }
    Ok(())
}

/// `--bitmaps`, after the data: every consistent bitmap of the source is created in the target
/// (same name, granularity and state, in the source's order) with the source's bits. The copy's
/// own writes do not dirty them: they are created afterwards.
async fn copy_bitmaps(
    src: &dyn BlockDevice,
    dst: &dyn BlockDevice,
    skip_broken: bool,
) -> Result<()> {
    let (Some(sq), Some(dq)) = (src.as_qcow2(), dst.as_qcow2()) else {
        return Ok(());
    };
    let list = sq.bitmap_list();
    for b in list.iter().rev().filter(|b| b.in_use) {
        if skip_broken {
            eprintln!(
                "{}: warning: Skipping inconsistent bitmap '{}'",
                super::prog(),
                b.name
            );
        }
    }
    for b in list.iter().filter(|b| !b.in_use) {
        dq.bitmap_add(&b.name, Some(b.granularity), b.enabled)
            .await
            .map_err(|e| Error::arg(format!("Failed to create bitmap {}: {e}", b.name)))?;
        let populated = async {
            let bits = sq.bitmap_bits(&b.name).await?;
            dq.bitmap_merge(&b.name, &bits).await
        }
        .await;
        if let Err(e) = populated {
            let _ = dq.bitmap_remove(&b.name).await;
            return Err(Error::arg(format!(
                "Failed to populate bitmap {}: {e}",
                b.name
            )));
        }
    }
    Ok(())
}

/// One source image at a position of the concatenated input.
struct Source {
    img: Arc<dyn BlockDevice>,
    start: u64,
}

async fn convert(a: &Args) -> Result<()> {
    if a.target_is_zero && !a.no_create {
        return Err(Error::arg("--target-is-zero requires use of -n flag"));
    }
    if a.skip_broken_bitmaps && !a.bitmaps {
        return Err(Error::arg(
            "Use of --skip-broken-bitmaps requires --bitmaps",
        ));
    }
    let (target, sources) = match a.files.split_last() {
        Some((t, s)) if !s.is_empty() => (t, s),
        _ => return Err(Error::arg("Must specify image file name")),
    };
    if a.bitmaps && sources.len() > 1 {
        return Err(Error::arg(
            "Copying bitmaps only possible with single source",
        ));
    }
    let snapshot = a
        .snapshot
        .as_deref()
        .map(super::opts::parse_snapshot_param)
        .transpose()?;
    if sources.len() > 1 && snapshot.is_some() {
        return Err(Error::arg("No support for concatenating multiple snapshot"));
    }
    let mut srcs = Vec::new();
    let mut total = 0u64;
    for s in sources {
        let img = open(&ImageArgs {
            image_opts: a.image_opts,
            path: s,
            format: a.source_format.as_deref(),
            read_only: true,
            cache: Some(&a.source_cache),
            runtime_opts: &[],
            no_backing: false,
            batch: false,
            force_share: a.force_share,
            metadata_only: false,
            aio: None,
        })
        .await
        .map_err(|e| Error::arg(format!("Could not open '{s}': {e}")))?;
        if let Some(sn) = &snapshot {
            super::opts::load_snapshot(&*img, sn)
                .await
                .map_err(|e| Error::arg(format!("Failed to load snapshot: {e}")))?;
        }
        srcs.push(Source {
            start: total,
            img: img.clone(),
        });
        total += img.size();
    }
    let parallel = parse_parallel(&a.parallel)?;
    let rate = a
        .rate
        .as_deref()
        .map(super::opts::parse_rate)
        .transpose()
        .map_err(Error::arg)?
        .filter(|&r| r > 0);
    let sparse = a.sparse.as_deref().map_or(Ok(4096), parse_sparse)?;
    let format = Format::parse(&a.target_format)?;
    if a.compress && format != Format::Qcow2 {
        return Err(Error::arg("Compression not supported for this file format"));
    }
    if a.backing.is_some() && format == Format::Raw {
        return Err(Error::arg(
            "Backing file not supported for file format 'raw'",
        ));
    }
    // Whether the target's clusters are all still to be allocated (a new qcow2 target without
    // preallocation).
    if a.bitmaps {
        check_bitmaps(&*srcs[0].img, a.skip_broken_bitmaps)?;
    }
    let mut fresh_clusters = false;
    // The target's backing file: `-B`, or `-o backing_file=` (the same thing for qemu-img: only
    // what the source's top layer holds is copied either way).
    let mut backing = a.backing.clone();
    if !a.no_create {
        let mut parsed = parse_options(format, &a.options, None)?;
        fresh_clusters = parsed.opts.preallocation == Preallocation::Off;
        parsed.opts.size = parsed.size.unwrap_or(total);
        backing = backing.or_else(|| parsed.opts.backing_file.clone());
        if let Some(b) = &backing {
            parsed.opts.backing_file = Some(b.clone());
            parsed.opts.backing_format = a
                .backing_format
                .clone()
                .or_else(|| parsed.opts.backing_format.clone());
            if parsed.opts.backing_format.is_none() {
                return Err(Error::arg(
                    "Use of backing file requires explicit backing format",
                ));
            }
        }
        make(target, format, &parsed.opts).await.map_err(|e| {
            Error::arg(format!(
                "{target}: error while converting {}: {e}",
                format.name()
            ))
        })?;
    }
    let dst = open(&ImageArgs {
        image_opts: false,
        path: target,
        format: Some(format.name()),
        read_only: false,
        cache: Some(&a.target_cache),
        runtime_opts: &[],
        no_backing: backing.is_none() && !a.no_create,
        batch: true,
        force_share: false,
        metadata_only: false,
        aio: None,
    })
    .await
    .map_err(|e| Error::arg(format!("Could not open '{target}': {e}")))?;
    if a.bitmaps && dst.as_qcow2().is_none_or(|q| q.version() < 3) {
        let _ = dst.close().await;
        return Err(Error::arg(format!(
            "Format driver '{}' does not support bitmaps",
            if format == Format::Qcow2 {
                "qcow2"
            } else {
                format.name()
            }
        )));
    }
    if dst.size() < total {
        let _ = dst.close().await;
        return Err(Error::arg(format!(
            "Target image size {} is smaller than the source ({total})",
            dst.size()
        )));
    }
    if a.target_is_zero && backing.is_some() {
        // (qemu-img says this too, but then exits 0 without converting.)
        let _ = dst.close().await;
        return Err(Error::arg(
            "Cannot use --target-is-zero when the destination image has a backing file",
        ));
    }
    // A fresh target without a backing file reads zeros everywhere; so does one the user says
    // reads zeros.
    let zero_init = (!a.no_create || a.target_is_zero) && backing.is_none();
    let cluster = dst.as_qcow2().map_or(512, |q| q.cluster_size());
    let chunk = CHUNK.max(cluster) / cluster * cluster;
    // A new qcow2 cluster is allocated whole: zero runs inside the data the source provides
    // are only left out in whole target clusters, so a cluster is not left with holes in the
    // host file. This is also what qemu-img's output looks like (its qcow2 driver fills the
    // rest of a newly allocated cluster); in clusters that already exist (preallocation, `-n`)
    // only the data is written, as there.
    let sparse = if sparse > 0 && format == Format::Qcow2 && fresh_clusters {
        sparse.div_ceil(cluster) * cluster
    } else {
        sparse
    };
    let progress = Progress::new(a.progress && !a.quiet, total);
    let salvage = a.salvage.then_some(Salvage { quiet: a.quiet });
    if let Some(salvage) = &salvage {
        // qemu-img walks the source's allocation once before copying (to size its progress)
        // and once while copying: a failed status query is reported in both walks.
        salvage.walk(&srcs).await;
    }
    let job = Arc::new(Job {
        srcs,
        dst: dst.clone(),
        total,
        chunk,
        sparse,
        zero_init,
        top_only: backing.is_some(),
        compress: a.compress,
        // Salvaging reports what it skips in the order of the disk.
        in_order: !a.oob || salvage.is_some(),
        salvage,
        next: AtomicU64::new(0),
        turn: tokio::sync::watch::channel(0).0,
        progress,
        rate,
        started: std::time::Instant::now(),
        issued: AtomicU64::new(0),
    });
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..parallel {
        let job = job.clone();
        tasks.spawn(async move { job.worker().await });
    }
    let mut result = Ok(());
    while let Some(r) = tasks.join_next().await {
        let r = r
            .map_err(|e| Error::arg(format!("copy task failed: {e}")))
            .and_then(|x| x);
        if result.is_ok() {
            if let Err(e) = r {
                result = Err(e);
                tasks.abort_all();
            }
        }
    }
    job.progress.finish();
    if let Err(e) = result {
        // What was written reaches the disk; the target stays consistent (QEMU leaves it too).
        let _ = dst.close().await;
        return Err(e);
    }
    if a.bitmaps {
        if let Err(e) = copy_bitmaps(&*job.srcs[0].img, &*dst, a.skip_broken_bitmaps).await {
            // The data is copied: it must reach the disk even though the bitmaps failed.
            let _ = dst.close().await;
            return Err(e);
        }
    }
    dst.close().await?;
    for s in &job.srcs {
        s.img.close().await?;
    }
    Ok(())
}

struct Job {
    srcs: Vec<Source>,
    dst: Arc<dyn BlockDevice>,
    total: u64,
    chunk: u64,
    sparse: u64,
    zero_init: bool,
    top_only: bool,
    compress: bool,
    in_order: bool,
    /// `--salvage`: read errors become zeros and warnings.
    salvage: Option<Salvage>,
    next: AtomicU64,
    /// Index of the chunk whose writes may be issued (in-order mode).
    turn: tokio::sync::watch::Sender<u64>,
    progress: Progress,
    /// `-r`: bytes of data per second.
    rate: Option<u64>,
    started: std::time::Instant,
    /// Bytes of data read so far (what the rate limit counts, as qemu-img's).
    issued: AtomicU64,
}

/// What a piece of a chunk needs.
enum Piece {
    /// Reads as zeros in the source.
    Zeros { off: u64, len: u64 },
    /// Provided by the target's backing file.
    Backing,
    /// Data at `off` (read into `buf`).
    Data { off: u64, buf: IoBufMut },
}

impl Job {
    async fn worker(self: Arc<Self>) -> Result<()> {
        loop {
            let i = self.next.fetch_add(1, Relaxed);
            let off = i * self.chunk;
            if off >= self.total {
                // Let later chunks' writers through if we were the one holding the turn.
                return Ok(());
            }
            let len = self.chunk.min(self.total - off);
            let mut warnings = Vec::new();
            let pieces = self.read_chunk(off, len, &mut warnings).await?;
            self.pace(&pieces).await;
            if self.in_order {
                let mut rx = self.turn.subscribe();
                let _ = rx.wait_for(|&t| t >= i).await;
            }
            for w in warnings {
                eprintln!("{}: warning: {w}", super::prog());
            }
            // Writes are issued in order; compressed clusters only take their place in the
            // layout here and are compressed and written after the turn has passed on.
            let r = self.write_chunk(pieces).await;
            if self.in_order {
                self.turn.send_modify(|t| *t = (*t).max(i + 1));
            }
            let compressed = r?;
            futures_util::future::try_join_all(compressed).await?;
            self.progress.add(len);
        }
    }

    /// Sleeps until the chunk's data fits the rate limit (`-r`).
    async fn pace(&self, pieces: &[Piece]) {
        let Some(rate) = self.rate else { return };
        let n: u64 = pieces
            .iter()
            .map(|p| match p {
                Piece::Data { buf, .. } => buf.len() as u64,
                _ => 0,
            })
            .sum();
        let issued = self.issued.fetch_add(n, Relaxed) + n;
        let due = std::time::Duration::from_secs_f64(issued as f64 / rate as f64);
        if let Some(wait) = due.checked_sub(self.started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }

    /// The source covering `off` and the offset inside it.
    fn source_at(&self, off: u64) -> (&Source, u64) {
        let i = self
            .srcs
            .partition_point(|s| s.start <= off)
            .saturating_sub(1);
        (&self.srcs[i], off - self.srcs[i].start)
    }

    /// Reads what the chunk needs; with `--salvage`, what could not be read is in `warnings`.
    async fn read_chunk(
        &self,
        off: u64,
        len: u64,
        warnings: &mut Vec<String>,
    ) -> Result<Vec<Piece>> {
        let mut pieces = Vec::new();
        let mut pos = off;
        while pos < off + len {
            let (src, local) = self.source_at(pos);
            let max = (off + len - pos).min(src.img.size() - local);
            let st = match &self.salvage {
                None => chain_status(&src.img, local, max)
                    .await
                    .map_err(|e| read_err(pos, e))?,
                Some(s) => s.status(&src.img, local, max, warnings).await,
            };
            let n = st.len.clamp(1, max);
            if self.top_only && st.depth > 0 {
                pieces.push(Piece::Backing);
            } else if !st.data && (st.zero || !st.present) && self.sparse > 0 {
                pieces.push(Piece::Zeros { off: pos, len: n });
            } else {
                // Data, or (`-S 0`: the target is fully allocated) zeros written as data.
                let read = src
                    .img
                    .read(local, IoBufMut::for_overwrite(n as usize))
                    .await;
                let buf = match (read, &self.salvage) {
                    (Ok(buf), _) => buf,
                    (Err(e), None) => return Err(read_err(pos, e)),
                    (Err(_), Some(s)) => s.read_by_sector(&src.img, local, n, warnings).await,
                };
                pieces.push(Piece::Data { off: pos, buf });
            }
            pos += n;
        }
        Ok(pieces)
    }

    /// Issues the chunk's writes; returns the compressed writes still to be awaited.
    async fn write_chunk(&self, pieces: Vec<Piece>) -> Result<Vec<Pending<'_>>> {
        let mut pending = Vec::new();
        for p in pieces {
            match p {
                Piece::Backing => {}
                Piece::Zeros { off, len } => self.zeros(off, len).await?,
                Piece::Data { off, buf } => {
                    if self.compress {
                        pending.extend(self.write_compressed(off, buf.freeze()).await?);
                    } else {
                        self.write_sparse(off, buf.freeze()).await?;
                    }
                }
            }
        }
        Ok(pending)
    }

    async fn zeros(&self, off: u64, len: u64) -> Result<()> {
        if self.zero_init {
            return Ok(());
        }
        self.dst
            .write_zeroes(
                off,
                len,
                ZeroFlags {
                    may_unmap: true,
                    fast_only: false,
                },
            )
            .await
            .map_err(|e| write_err(off, e))
    }

    /// Writes data, leaving runs of at least `sparse` zero bytes out (or zeroing them).
    async fn write_sparse(&self, off: u64, data: IoBuf) -> Result<()> {
        if self.sparse == 0 {
            return self
                .dst
                .write(off, data)
                .await
                .map_err(|e| write_err(off, e));
        }
        let g = self.sparse as usize;
        let mut run_start = 0usize;
        let mut run_zero: Option<bool> = None;
        let mut pos = 0usize;
        while pos < data.len() {
            // Blocks aligned to the sparse size in the target's address space.
            let abs = off as usize + pos;
            let end = ((abs / g + 1) * g - off as usize).min(data.len());
            let zero = data[pos..end].iter().all(|&b| b == 0);
            match run_zero {
                Some(z) if z == zero => {}
                Some(z) => {
                    self.emit(off, &data, run_start, pos, z).await?;
                    run_start = pos;
                }
                None => {}
            }
            run_zero = Some(zero);
            pos = end;
        }
        if let Some(z) = run_zero {
            self.emit(off, &data, run_start, data.len(), z).await?;
        }
        Ok(())
    }

    async fn emit(&self, off: u64, data: &IoBuf, from: usize, to: usize, zero: bool) -> Result<()> {
        let at = off + from as u64;
        if zero {
            self.zeros(at, (to - from) as u64).await
        } else {
            self.dst
                .write(at, data.slice(from..to))
                .await
                .map_err(|e| write_err(at, e))
        }
    }

    /// Compressed target: whole clusters (the source chunk is cluster aligned), zeros skipped.
    /// Returns the compressed writes (their place in the layout already taken).
    async fn write_compressed(&self, off: u64, data: IoBuf) -> Result<Vec<Pending<'_>>> {
        let q = self
            .dst
            .as_qcow2()
            .ok_or_else(|| Error::arg("Compression not supported for this file format"))?;
        let cs = q.cluster_size() as usize;
        let mut futs: Vec<Pending<'_>> = Vec::new();
        // Runs of whole, non-zero clusters go out as one compressed request each.
        let mut run: Option<(usize, usize)> = None;
        let mut pos = 0usize;
        while pos <= data.len() {
            let end = if pos == data.len() {
                pos
            } else {
                ((off as usize + pos) / cs * cs + cs - off as usize).min(data.len())
            };
            let part = data.slice(pos..end);
            let at = off + pos as u64;
            let whole =
                part.len() == cs || (end > pos && at + part.len() as u64 == q.virtual_size());
            let zero = end > pos && part.iter().all(|&b| b == 0);
            let extends = end > pos && whole && !zero;
            if !extends {
                if let Some((from, to)) = run.take() {
                    let at = off + from as u64;
                    // The place in the layout is taken by this call, in order.
                    let w = q.write_compressed(at, data.slice(from..to));
                    futs.push(Box::pin(
                        async move { w.await.map_err(|e| write_err(at, e)) },
                    ));
                }
            }
            if end == pos {
                break;
            }
            if extends {
                run = Some(run.map_or((pos, end), |(from, _)| (from, end)));
            } else if zero {
                if !self.zero_init {
                    self.zeros(at, part.len() as u64).await?;
                }
            } else {
                // A partial cluster (a source ends mid-cluster): written uncompressed.
                self.dst
                    .write(at, part)
                    .await
                    .map_err(|e| write_err(at, e))?;
            }
            pos = end;
        }
        Ok(futs)
    }
}

/// `convert --salvage`: qemu-img's way through a source that cannot be read everywhere.
struct Salvage {
    quiet: bool,
}

const SECTOR: u64 = 512;

impl Salvage {
    /// The chain's status at `off` (at most `max` bytes). A failed query is retried on a
    /// quarter of the range until it covers one sector; that sector is then reported and
    /// taken as data (to be read), as qemu-img does.
    async fn status(
        &self,
        img: &Arc<dyn BlockDevice>,
        off: u64,
        max: u64,
        warnings: &mut Vec<String>,
    ) -> qimg::block::ChainStatus {
        let mut sectors = max.div_ceil(SECTOR);
        loop {
            let len = (sectors * SECTOR).min(max);
            match chain_status(img, off, len).await {
                Ok(st) => return st,
                Err(e) if sectors <= 1 => {
                    if !self.quiet {
                        warnings.push(format!(
                            "error while reading block status at offset {off}: {}",
                            strerror(&e)
                        ));
                    }
                    return qimg::block::ChainStatus {
                        offset: off,
                        len: SECTOR.min(max),
                        depth: 0,
                        present: true,
                        zero: false,
                        data: true,
                        compressed: false,
                        host_offset: None,
                        filename: String::new(),
                    };
                }
                Err(_) => sectors = sectors.div_ceil(4),
            }
        }
    }

    /// Reads `[off, off+len)` sector by sector after a failed read: sectors that fail read as
    /// zeros, each with a warning.
    async fn read_by_sector(
        &self,
        img: &Arc<dyn BlockDevice>,
        off: u64,
        len: u64,
        warnings: &mut Vec<String>,
    ) -> IoBufMut {
        let mut out = IoBufMut::zeroed(len as usize);
        let mut at = 0;
        while at < len {
            let n = SECTOR.min(len - at);
            match img
                .read(off + at, IoBufMut::for_overwrite(n as usize))
                .await
            {
                Ok(b) => out[at as usize..(at + n) as usize].copy_from_slice(&b),
                Err(e) => {
                    if !self.quiet {
                        warnings.push(format!(
                            "error while reading offset {}: {}",
                            off + at,
                            strerror(&e)
                        ));
                    }
                }
            }
            at += n;
        }
        out
    }

    /// qemu-img's first walk over the sources' allocation: only its warnings remain.
    async fn walk(&self, srcs: &[Source]) {
        for src in srcs {
            let size = src.img.size();
            let mut off = 0;
            while off < size {
                let mut warnings = Vec::new();
                let st = self.status(&src.img, off, size - off, &mut warnings).await;
                for w in warnings {
                    eprintln!("{}: warning: {w}", super::prog());
                }
                off += st.len.clamp(1, size - off);
            }
        }
    }
}

/// The C library's text for an error from the storage, as qemu-img prints it.
fn strerror(e: &Error) -> String {
    match e {
        Error::Io { source, .. } => qimg::error::strerror(source),
        other => other.to_string(),
    }
}

/// A compressed write whose place in the layout is taken.
type Pending<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send + 'a>>;

fn read_err(off: u64, e: Error) -> Error {
    Error::arg(format!("error while reading at byte {off}: {e}"))
}

fn write_err(off: u64, e: Error) -> Error {
    Error::arg(format!("error while writing at byte {off}: {e}"))
}
