//! `qimg bench`: qemu-img bench's workload and output, plus random offsets, simulated storage
//! latency (the image held in memory, a fixed delay per storage operation: seed 002's way of
//! measuring cache and CPU effects without disk noise) and per-request statistics.

use super::fail;
use qimg::block::{open_image, BlockDevice, CacheMode, Format, OpenOptions, ZeroFlags};
use qimg::qcow2::{Qcow2, Qcow2Options};
use qimg::size::parse_size;
use qimg::storage::counting::CountingStorage;
use qimg::storage::latency::LatencyStorage;
use qimg::storage::memory::MemoryStorage;
use qimg::storage::{Storage, StorageRef};
use qimg::{IoBuf, IoBufMut};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct Args {
    /// Image format (probed if not given)
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Cache mode (writeback, writethrough, none, directsync, unsafe)
    #[arg(short = 't', long = "cache", default_value = "writeback")]
    cache: String,
    /// Number of requests
    #[arg(short = 'c', long = "count", default_value = "75000")]
    count: String,
    /// Requests in flight
    #[arg(short = 'd', long = "depth", default_value = "64")]
    depth: String,
    /// Start offset
    #[arg(short = 'o', long = "offset", default_value = "0")]
    offset: String,
    /// Request size
    #[arg(short = 's', long = "buffer-size", default_value = "4096")]
    buffer_size: String,
    /// Offset increment between requests (default: the request size)
    #[arg(short = 'S', long = "step-size")]
    step: Option<String>,
    /// I/O engine: threads or io_uring
    #[arg(short = 'i', long = "aio")]
    aio: Option<String>,
    /// Write instead of read
    #[arg(short = 'w', long = "write")]
    write: bool,
    /// Byte written by write requests
    #[arg(long = "pattern")]
    pattern: Option<String>,
    /// Flush after this many requests
    #[arg(long = "flush-interval")]
    flush_interval: Option<String>,
    /// Do not wait for in-flight requests before a flush
    #[arg(long = "no-drain")]
    no_drain: bool,
    /// Quiet
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Open the image shared with writers (read benchmarks only)
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Uniformly random request offsets (aligned to the request size), from this seed
    #[arg(long = "random")]
    random: Option<u64>,
    /// Run on a copy of the image in memory, delaying every storage operation by N µs
    #[arg(long = "delay-us")]
    delay_us: Option<u64>,
    /// Print per-request statistics (metadata reads/writes, flushes, cache hits, allocations)
    #[arg(long = "stats")]
    stats: bool,
    /// Write zeroes instead of data (with -w)
    #[arg(long = "zeroes")]
    zeroes: bool,
    /// Runtime options (l2-cache-size=..., ...)
    #[arg(long = "opt", short = 'O')]
    options: Vec<String>,
    filename: String,
}

struct Plan {
    count: u64,
    depth: u64,
    offset: u64,
    size: u64,
    step: u64,
    flush_interval: Option<u64>,
}

fn num(s: &str, what: &str) -> Result<u64, u8> {
    parse_size(s).map_err(|_| fail(format!("Invalid {what} specified")))
}

pub async fn run(a: Args) -> u8 {
    let plan = match (|| -> Result<Plan, u8> {
        let size = num(&a.buffer_size, "buffer size")?;
        let count = num(&a.count, "request count")?;
        let depth = num(&a.depth, "queue depth")?;
        if size == 0 || size > 1 << 30 {
            return Err(fail("Invalid buffer size specified"));
        }
        if depth == 0 {
            return Err(fail("Invalid queue depth specified"));
        }
        Ok(Plan {
            count,
            depth,
            offset: num(&a.offset, "offset")?,
            size,
            step: match &a.step {
                Some(s) => num(s, "step size")?,
                None => size,
            },
            flush_interval: a
                .flush_interval
                .as_deref()
                .map(|s| num(s, "flush interval"))
                .transpose()?,
        })
    })() {
        Ok(p) => p,
        Err(code) => return code,
    };
    let pattern = match a.pattern.as_deref().map(parse_byte) {
        Some(None) => return fail("Invalid pattern byte specified"),
        Some(Some(p)) => p,
        None => 0,
    };
    let opened = if let Some(us) = a.delay_us {
        open_in_memory(&a, Duration::from_micros(us)).await
    } else {
        open_file(&a).await
    };
    let (img, counters) = match opened {
        Ok(x) => x,
        Err(e) => return fail(format!("Could not open '{}': {e}", a.filename)),
    };
    if !a.quiet {
        println!(
            "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})",
            plan.count,
            if a.write { "write" } else { "read" },
            plan.size,
            plan.depth,
            plan.offset,
            if a.random.is_some() { "random".to_string() } else { plan.step.to_string() }
        );
        if let Some(f) = plan.flush_interval {
            println!("Sending flush every {f} requests");
        }
    }
    let before = stats_of(&img, &counters);
    let start = Instant::now();
    let r = run_requests(&img, &plan, &a, pattern).await;
    let elapsed = start.elapsed();
    let after = stats_of(&img, &counters);
    if let Err(e) = r {
        let _ = img.close().await;
        return fail(format!("Failed request: {e}"));
    }
    println!("Run completed in {:.3} seconds.", elapsed.as_secs_f64());
    if a.stats {
        print_stats(&before, &after, plan.count, elapsed);
    }
    if let Err(e) = img.close().await {
        return fail(e);
    }
    0
}

fn parse_byte(s: &str) -> Option<u8> {
    let v = if let Some(h) = s.strip_prefix("0x") {
        u64::from_str_radix(h, 16).ok()?
    } else {
        s.parse().ok()?
    };
    u8::try_from(v).ok()
}

async fn open_file(
    a: &Args,
) -> qimg::Result<(
    Arc<dyn BlockDevice>,
    Option<Arc<qimg::storage::counting::Counters>>,
)> {
    let (qcow2, locking) = super::opts::runtime_options(&a.options)?;
    let format = a.format.as_deref().map(Format::parse).transpose()?;
    let opts = OpenOptions {
        format,
        probe: format.is_none(),
        policy: Default::default(),
        read_only: !a.write,
        cache: CacheMode::parse(&a.cache)?,
        qcow2,
        no_backing: false,
        aio: a
            .aio
            .as_deref()
            .map(super::opts::parse_aio)
            .transpose()?
            .unwrap_or_default(),
        batch: false,
        lock: qimg::block::LockOptions {
            locking,
            force_share: a.force_share,
        },
        metadata_only: false,
        writable_backing_depth: None,
        backing_format: None,
        discard: None,
        detect_zeroes: None,
        nbd: qimg::nbd::remote::Target::parse(&a.filename).transpose()?,
        data_file: None,
        null: None,
        blkdebug: None,
        blkdebug_above: None,
        copy_on_read: false,
        file_image: None,
        protocol_driver: None,
        backing_resolver: Some(super::opts::backing_resolver()),
        raw_window: None,
        quorum: None,
    };
    Ok((open_image(Path::new(&a.filename), &opts).await?, None))
}

/// Loads the image into memory (only its allocated parts) behind a latency wrapper.
async fn open_in_memory(
    a: &Args,
    delay: Duration,
) -> qimg::Result<(
    Arc<dyn BlockDevice>,
    Option<Arc<qimg::storage::counting::Counters>>,
)> {
    let file = qimg::storage::file::FileStorage::open(Path::new(&a.filename), Default::default())
        .map_err(|e| qimg::Error::io("opening", e))?;
    let mem = MemoryStorage::new();
    let len = file.len().await.map_err(|e| qimg::Error::io("sizing", e))?;
    let mut off = 0;
    while off < len {
        let (hole, n) = file
            .hole_at(off, (len - off).min(64 << 20))
            .await
            .map_err(|e| qimg::Error::io("mapping", e))?;
        if !hole {
            let mut pos = off;
            while pos < off + n {
                let k = (off + n - pos).min(8 << 20);
                let b = file
                    .read_at(IoBufMut::zeroed(k as usize), pos)
                    .await
                    .map_err(|e| qimg::Error::io("loading", e))?;
                mem.write_sync(&b, pos);
                pos += k;
            }
        }
        off += n.max(1);
    }
    mem.set_len_sync(len);
    let counting = CountingStorage::new(LatencyStorage::new(mem, delay));
    let counters = counting.counters();
    let storage: StorageRef = Arc::new(counting);
    let mut qcow2 = Qcow2Options::default();
    for list in &a.options {
        for (k, v) in super::opts::parse_kv_list(list) {
            qcow2.set(&k, &v)?;
        }
    }
    let img: Arc<dyn BlockDevice> = Arc::new(
        Qcow2::open(
            storage,
            a.filename.clone(),
            &qcow2,
            !a.write,
            CacheMode::parse(&a.cache)?,
        )
        .await?,
    );
    Ok((img, Some(counters)))
}

#[derive(Default, Clone, Copy)]
struct Snap {
    engine: Option<qimg::qcow2::EngineStats>,
    storage: Option<qimg::storage::counting::CountSnapshot>,
}

fn stats_of(
    img: &Arc<dyn BlockDevice>,
    c: &Option<Arc<qimg::storage::counting::Counters>>,
) -> Snap {
    Snap {
        engine: img.as_qcow2().map(|q| q.stats()),
        storage: c.as_ref().map(|c| c.snapshot()),
    }
}

fn print_stats(b: &Snap, a: &Snap, count: u64, elapsed: Duration) {
    let n = count.max(1) as f64;
    println!(
        "Requests per second: {:.0}",
        count as f64 / elapsed.as_secs_f64()
    );
    if let (Some(x), Some(y)) = (b.engine, a.engine) {
        let hits = y.cache_hits - x.cache_hits;
        let misses = y.cache_misses - x.cache_misses;
        println!(
            "Per request: metadata reads {:.4}, metadata writes {:.4}, flushes {:.4}, allocations {:.4}",
            (y.metadata_reads - x.metadata_reads) as f64 / n,
            (y.metadata_writes - x.metadata_writes) as f64 / n,
            (y.flushes - x.flushes) as f64 / n,
            (y.clusters_allocated - x.clusters_allocated) as f64 / n
        );
        println!(
            "Metadata cache hit ratio: {:.4} ({} hits, {} misses)",
            if hits + misses == 0 {
                1.0
            } else {
                hits as f64 / (hits + misses) as f64
            },
            hits,
            misses
        );
    }
    if let (Some(x), Some(y)) = (b.storage, a.storage) {
        let d = y - x;
        println!(
            "Storage operations per request: reads {:.4}, writes {:.4}, flushes {:.4}, zero writes {:.4}",
            d.reads as f64 / n,
            d.writes as f64 / n,
            d.flushes as f64 / n,
            d.zero_writes as f64 / n
        );
    }
}

async fn run_requests(
    img: &Arc<dyn BlockDevice>,
    plan: &Plan,
    a: &Args,
    pattern: u8,
) -> qimg::Result<()> {
    let disk = img.size();
    if plan.size > disk {
        return Err(qimg::Error::arg("request size larger than the image"));
    }
    let next = Arc::new(AtomicU64::new(0));
    let gate = Arc::new(tokio::sync::RwLock::new(()));
    let data = {
        let mut b = IoBufMut::zeroed(plan.size as usize);
        b.fill(pattern);
        b.freeze()
    };
    let slots = disk / plan.size;
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..plan.depth.min(plan.count.max(1)) {
        let img = img.clone();
        let next = next.clone();
        let gate = gate.clone();
        let data: IoBuf = data.clone();
        let (count, size, step, start) = (plan.count, plan.size, plan.step, plan.offset);
        let flush_every = plan.flush_interval;
        let (write, zeroes, no_drain, random) = (a.write, a.zeroes, a.no_drain, a.random);
        tasks.spawn(async move {
            let mut rng = random.map(|s| fastrand::Rng::with_seed(s.wrapping_add(w * 0x9e37_79b9)));
            // One buffer per worker, reused for every read.
            let mut buf = Some(IoBufMut::zeroed(size as usize));
            loop {
                let i = next.fetch_add(1, Relaxed);
                if i >= count {
                    return Ok::<(), qimg::Error>(());
                }
                let off = match rng.as_mut() {
                    Some(r) => r.u64(0..slots.max(1)) * size,
                    None => {
                        let o = (start + i * step) % disk;
                        if o + size > disk {
                            0
                        } else {
                            o
                        }
                    }
                };
                {
                    // Requests only synchronize with flushes when there are flushes to drain for.
                    let _g = if no_drain || flush_every.is_none() {
                        None
                    } else {
                        Some(gate.read().await)
                    };
                    if write {
                        if zeroes {
                            img.write_zeroes(off, size, ZeroFlags::default()).await?;
                        } else {
                            img.write(off, data.clone()).await?;
                        }
                    } else {
                        let b = buf
                            .take()
                            .unwrap_or_else(|| IoBufMut::zeroed(size as usize));
                        buf = Some(img.read(off, b).await?);
                    }
                }
                if let Some(f) = flush_every {
                    if f > 0 && (i + 1) % f == 0 {
                        let _g = if no_drain {
                            None
                        } else {
                            Some(gate.write().await)
                        };
                        img.flush().await?;
                    }
                }
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.map_err(|e| qimg::Error::arg(format!("benchmark task failed: {e}")))??;
    }
    // Like qemu-img bench, the final flush happens at close, outside the measured time.
    Ok(())
}
