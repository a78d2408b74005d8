//! Crash safety of images with an external data file: guest data in a second file (guest
//! cluster `n` at byte `n * cluster_size` of it), metadata in the qcow2 file.
//!
//! Two files means two devices that lose power at the same instant but keep different subsets
//! of their unflushed writes: both are [`CrashStorage`]s behind one [`Power`] supply that counts
//! the operations of both files in one sequence, so "lose power before operation k" cuts both
//! at one point of the engine's history. Each crash point is tried with both files keeping all,
//! none, each one but not the other (metadata without its data, data without its metadata), and
//! independent random torn subsets. Every resulting pair must:
//! - pass `qemu-img check` (leaks only, see `check_after_crash`) with the crashed data file;
//! - read the same through QEMU as through qimg;
//! - keep every byte that was durable at the last successful flush (the same durable model as
//!   `crash.rs`);
//! - with `data_file_raw`, have a data file that is itself the guest disk in those bytes.
//!
//! The rule under test is that data in the data file is durable before any L2 entry that points
//! at it (the barrier flushes the data file with the image file, and an entry is written only
//! once the data it depends on is covered by a completed barrier). Broken, it shows where a
//! cluster's durable content must come from a write around a partial one: with a backing file,
//! copy-on-write puts the backing file's bytes into the data file, and an entry durable without
//! them shows zeros instead; a cluster made zero without unmapping keeps its old bytes in the
//! data file, and a partial write must zero the rest of it before the entry maps it again (the
//! deterministic prefix of every workload, see `stale_prefix`, crashed at every operation).
//! Losing the data file's flush altogether loses acknowledged writes in every scenario. (The
//! order of the two flushes inside one barrier is not what makes this hold: an entry that
//! depends on data is only written after a barrier completed, so both files have been flushed
//! whichever went first; the "metadata kept, data lost" policy stands for any such order.)
//!
//! Workloads cover standard and extended L2 entries, raw and non-raw data files, a backing
//! file, a small L2 cache (entries written back as they are evicted, mid-workload), writes,
//! write-zeroes with and without unmap, discards and flushes.

mod common;

use common::workload::{self, Op, Tracker};
use common::*;
use qimg::block::{BlockDevice, CacheMode};
use qimg::qcow2::data_file::DataFile;
use qimg::qcow2::{create_with_data_file, CreateOptions, Qcow2, Qcow2Options};
use qimg::storage::crash::{CrashPolicy, CrashStorage};
use qimg::storage::memory::MemoryStorage;
use qimg::storage::{IoFuture, Storage, StorageRef};
use qimg::{IoBuf, IoBufMut};
use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Clone, Debug)]
struct Scenario {
    name: &'static str,
    cluster_bits: u32,
    size: u64,
    /// `data_file_raw`: the data file is a raw image of the guest disk at all times.
    raw: bool,
    /// A raw backing file with a pattern (copy-on-write of partial clusters from it).
    backing: bool,
    /// Extended L2 entries (subclusters).
    extended_l2: bool,
    small_cache: bool,
    ops: Vec<Op>,
    /// The first `dense` ops get a crash before every storage operation; the rest a sample.
    dense: usize,
}

fn backing_data(s: &Scenario) -> Vec<u8> {
    workload::backing_data(s.backing, s.size)
}

fn backing_device(s: &Scenario) -> Arc<dyn BlockDevice> {
    workload::raw_device(&backing_data(s))
}

// ---------------------------------------------------------------------------------------------
// One power supply for both files.

/// What each file keeps of its unflushed operations when the power goes.
#[derive(Clone, Copy, Debug)]
struct Policies {
    image: CrashPolicy,
    data: CrashPolicy,
}

struct Supply {
    /// Operations on either file so far.
    ops: u64,
    armed: Option<(u64, Policies)>,
    /// (image file, data file) as the crash left them.
    lost: Option<(MemoryStorage, MemoryStorage)>,
}

/// The image file and the data file on one power supply. Every counted operation (those
/// `CrashStorage` counts: reads, writes, flushes, write-zeroes, discards, length changes) takes
/// the supply's lock, is numbered, and reaches its `CrashStorage` under the lock; a
/// `CrashStorage` applies an operation when it is called, not when its future is polled. So the
/// operations of both files form one sequence, and a crash armed at number k captures both
/// files between operation k-1 and operation k, whichever file either is on.
struct Power {
    image: CrashStorage,
    data: CrashStorage,
    supply: Mutex<Supply>,
}

impl Power {
    fn new(image: &MemoryStorage, data: &MemoryStorage) -> Arc<Power> {
        Arc::new(Power {
            image: CrashStorage::new(image),
            data: CrashStorage::new(data),
            supply: Mutex::new(Supply {
                ops: 0,
                armed: None,
                lost: None,
            }),
        })
    }

    fn supply(&self) -> MutexGuard<'_, Supply> {
        self.supply.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Loses power just before operation number `op` (counting from 1) on either file.
    fn arm(&self, op: u64, p: Policies) {
        let mut st = self.supply();
        st.armed = Some((st.ops + op, p));
    }

    fn ops(&self) -> u64 {
        self.supply().ops
    }

    /// Both files after the crash: the armed one if it happened, else one now with `p`.
    fn crashed(&self, p: Policies) -> (MemoryStorage, MemoryStorage) {
        let mut st = self.supply();
        if st.lost.is_none() {
            st.lost = Some(self.cut(p));
        }
        let (i, d) = st.lost.as_ref().expect("set above");
        (i.snapshot(), d.snapshot())
    }

    /// Captures both files (the supply's lock is held: no operation of either is in between)
    /// and kills both.
    fn cut(&self, p: Policies) -> (MemoryStorage, MemoryStorage) {
        (self.image.crash_now(p.image), self.data.crash_now(p.data))
    }

    fn side(self: &Arc<Self>, data: bool) -> StorageRef {
        Arc::new(Side {
            power: self.clone(),
            data,
        })
    }
}

/// One of the two files of a [`Power`].
struct Side {
    power: Arc<Power>,
    data: bool,
}

fn dead<'a, T: Send + 'a>() -> IoFuture<'a, io::Result<T>> {
    Box::pin(async { Err(io::Error::from_raw_os_error(5)) })
}

impl Side {
    fn inner(&self) -> &CrashStorage {
        if self.data {
            &self.power.data
        } else {
            &self.power.image
        }
    }

    /// Numbers one operation. `None`: the power is gone (perhaps just now). Otherwise the
    /// operation must be issued while the returned guard is held.
    fn gate(&self) -> Option<(MutexGuard<'_, Supply>, &CrashStorage)> {
        let mut st = self.power.supply();
        if st.lost.is_some() {
            return None;
        }
        st.ops += 1;
        if let Some((at, p)) = st.armed {
            if st.ops >= at {
                st.lost = Some(self.power.cut(p));
                return None;
            }
        }
        Some((st, self.inner()))
    }
}

impl Storage for Side {
    fn read_at(&self, buf: IoBufMut, offset: u64) -> IoFuture<'_, io::Result<IoBufMut>> {
        match self.gate() {
            Some((_on, s)) => s.read_at(buf, offset),
            None => dead(),
        }
    }
    fn write_at(&self, buf: IoBuf, offset: u64) -> IoFuture<'_, io::Result<()>> {
        match self.gate() {
            Some((_on, s)) => s.write_at(buf, offset),
            None => dead(),
        }
    }
    fn flush(&self) -> IoFuture<'_, io::Result<()>> {
        match self.gate() {
            Some((_on, s)) => s.flush(),
            None => dead(),
        }
    }
    fn len(&self) -> IoFuture<'_, io::Result<u64>> {
        // Not counted (nor by `CrashStorage`); fails once the power is gone.
        self.inner().len()
    }
    fn set_len(&self, len: u64) -> IoFuture<'_, io::Result<()>> {
        match self.gate() {
            Some((_on, s)) => s.set_len(len),
            None => dead(),
        }
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> IoFuture<'_, io::Result<()>> {
        match self.gate() {
            Some((_on, s)) => s.write_zeroes(offset, len),
            None => dead(),
        }
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, io::Result<()>> {
        match self.gate() {
            Some((_on, s)) => s.discard(offset, len),
            None => dead(),
        }
    }
    fn allocate(&self, offset: u64, len: u64) -> IoFuture<'_, io::Result<()>> {
        match self.gate() {
            Some((_on, s)) => s.allocate(offset, len),
            None => dead(),
        }
    }
    fn hole_at(&self, offset: u64, max: u64) -> IoFuture<'_, io::Result<(bool, u64)>> {
        self.inner().hole_at(offset, max)
    }
}

// ---------------------------------------------------------------------------------------------
// Workload.

const DATA_NAME: &str = "data.raw";
const IMAGE_NAME: &str = "crashed.qcow2";

/// A new image and its data file; the image names the data file by its absolute path in `dir`
/// (where `verify` puts the crashed copies for QEMU).
async fn fresh_image(s: &Scenario, dir: &Path) -> (MemoryStorage, MemoryStorage) {
    let img = Arc::new(MemoryStorage::new());
    let data = Arc::new(MemoryStorage::new());
    let opts = CreateOptions {
        size: s.size,
        cluster_size: 1 << s.cluster_bits,
        backing_file: s.backing.then(|| "base.raw".to_string()),
        backing_format: s.backing.then(|| "raw".to_string()),
        extended_l2: s.extended_l2,
        data_file: Some(dir.join(DATA_NAME).to_str().unwrap().to_string()),
        data_file_raw: s.raw,
        ..Default::default()
    };
    create_with_data_file(img.clone(), Some(data.clone()), &opts)
        .await
        .unwrap_or_else(|e| panic!("{}: creating the image: {e}", s.name));
    (img.snapshot(), data.snapshot())
}

fn runtime_opts(s: &Scenario, data: StorageRef) -> Qcow2Options {
    let mut q = Qcow2Options {
        data_file: Some(DataFile {
            storage: data,
            name: DATA_NAME.into(),
        }),
        ..Default::default()
    };
    if s.small_cache {
        q.l2_cache_size = Some(2 << s.cluster_bits);
        q.refcount_cache_size = Some(4 << s.cluster_bits);
    }
    q
}

/// Runs the workload until it finishes or the power goes.
async fn run_workload(power: &Arc<Power>, s: &Scenario) -> Tracker {
    let opened = Qcow2::open(
        power.side(false),
        "crash".into(),
        &runtime_opts(s, power.side(true)),
        false,
        CacheMode::Writeback,
    )
    .await;
    let backing = s.backing.then(|| backing_device(s));
    Tracker::run(backing_data(s), opened, backing, &s.ops).await
}

// ---------------------------------------------------------------------------------------------
// Verification.

/// A crash scenario's verifier: a directory for QEMU's copies, and QEMU's verdicts on the file
/// pairs seen so far (many crash points leave identical files).
struct Verifier {
    dir: tempfile::TempDir,
    qemu_verdicts: HashMap<u64, Result<(), String>>,
}

/// A key for the verdict cache (not a defence against anything): a multiply-rotate mix of the
/// files' 8-byte words.
fn files_hash(img: &[u8], data: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut mix = |w: u64| h = (h ^ w).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29);
    for file in [img, data] {
        mix(file.len() as u64);
        for w in file.chunks(8) {
            let mut b = [0u8; 8];
            b[..w.len()].copy_from_slice(w);
            mix(u64::from_le_bytes(b));
        }
    }
    h
}

/// The first byte of `got` that was durable but is not.
fn first_lost(got: &[u8], t: &Tracker) -> Option<usize> {
    got.iter()
        .zip(&t.durable)
        .zip(&t.touched)
        .position(|((g, d), touched)| !touched && g != d)
}

impl Verifier {
    fn new(s: &Scenario) -> Verifier {
        let dir = tempfile::tempdir().unwrap();
        if s.backing {
            std::fs::write(dir.path().join("base.raw"), backing_data(s)).unwrap();
        }
        Verifier {
            dir,
            qemu_verdicts: HashMap::new(),
        }
    }

    /// Checks one crashed pair of files. Returns a description of the failure, if any.
    async fn verify(
        &mut self,
        s: &Scenario,
        img: &MemoryStorage,
        data: &MemoryStorage,
        t: &Tracker,
        what: &str,
    ) -> Result<(), String> {
        let (img, data) = (img.to_vec(), data.to_vec());
        // What qimg reads.
        let mut opts = runtime_opts(s, Arc::new(MemoryStorage::from_bytes(&data)));
        opts.l2_cache_size = None;
        opts.refcount_cache_size = None;
        let q = Qcow2::open(
            Arc::new(MemoryStorage::from_bytes(&img)),
            "crashed".into(),
            &opts,
            true,
            CacheMode::Writeback,
        )
        .await
        .map_err(|e| format!("{what}: open failed: {e}"))?;
        if s.backing {
            q.set_backing(backing_device(s));
        }
        if q.virtual_size() != s.size {
            return Err(format!(
                "{what}: virtual size {} instead of {}",
                q.virtual_size(),
                s.size
            ));
        }
        let view = q
            .read_at(0, IoBufMut::zeroed(s.size as usize))
            .await
            .map_err(|e| format!("{what}: read failed: {e}"))?;
        let view: &[u8] = &view;
        if let Some(i) = first_lost(view, t) {
            return Err(format!(
                "{what}: byte {i} (cluster {}) was durable as {:#x} but reads {:#x}",
                i >> s.cluster_bits,
                t.durable[i],
                view[i]
            ));
        }
        if s.raw {
            // The data file alone is the guest disk.
            let mut raw = data.clone();
            raw.resize(s.size as usize, 0);
            if let Some(i) = first_lost(&raw, t) {
                return Err(format!(
                    "{what}: data_file_raw: byte {i} (cluster {}) was durable as {:#x} but the \
                     data file holds {:#x}",
                    i >> s.cluster_bits,
                    t.durable[i],
                    raw[i]
                ));
            }
        }
        // QEMU's verdict: the image is consistent and reads as qimg reads it.
        let key = files_hash(&img, &data);
        let verdict = match self.qemu_verdicts.get(&key) {
            Some(v) => v.clone(),
            None => {
                let v = self.qemu_verdict(s, &img, &data, view);
                self.qemu_verdicts.insert(key, v.clone());
                v
            }
        };
        verdict.map_err(|e| format!("{what}: {e}"))
    }

    fn qemu_verdict(
        &self,
        s: &Scenario,
        img: &[u8],
        data: &[u8],
        view: &[u8],
    ) -> Result<(), String> {
        let dir = self.dir.path();
        let p = dir.join(IMAGE_NAME);
        let view_path = dir.join("qimg-view.raw");
        std::fs::write(&p, img).unwrap();
        std::fs::write(dir.join(DATA_NAME), data).unwrap();
        std::fs::write(&view_path, view).unwrap();
        // Compare first: the repair in `check_after_crash` works on a copy of the image that
        // shares the data file.
        let o = run(
            "qemu-img",
            &[
                "compare",
                "-f",
                "qcow2",
                "-F",
                "raw",
                p.to_str().unwrap(),
                view_path.to_str().unwrap(),
            ],
        );
        if !o.status.success() {
            return Err(format!(
                "QEMU reads the crashed image differently from qimg (rc={:?}):\n{}",
                o.status.code(),
                text(&o)
            ));
        }
        check_after_crash(&p, 1 << s.cluster_bits)
    }
}

async fn crash_everywhere(s: Scenario, max_points: u64) {
    let mut v = Verifier::new(&s);
    let (base_img, base_data) = fresh_image(&s, v.dir.path()).await;
    // Dry run: how many operations does the workload take, and does it end as modelled?
    let dry = Power::new(&base_img, &base_data);
    let t = run_workload(&dry, &s).await;
    let total = dry.ops();
    let all = Policies {
        image: CrashPolicy::KeepAll,
        data: CrashPolicy::KeepAll,
    };
    let (img, data) = dry.crashed(all);
    let what = format!("{}: no crash ({total} operations)", s.name);
    if let Err(e) = v.verify(&s, &img, &data, &t, &what).await {
        panic!("{e}");
    }
    assert_eq!(t.durable, t.model, "{what}: the workload ends with a flush");

    // Crash points 1..=total+1 (the last: after the workload): all of those in the dense
    // prefix, then evenly spread ones up to `max_points` in all.
    let prefix = Scenario {
        ops: s.ops[..s.dense].to_vec(),
        ..s.clone()
    };
    let dry = Power::new(&base_img, &base_data);
    run_workload(&dry, &prefix).await;
    let dense = dry.ops();
    let mut crash_points: Vec<u64> = (1..=dense).collect();
    let rest = (total + 1).saturating_sub(dense);
    let n = rest.min(max_points.saturating_sub(dense).max(2));
    crash_points.extend((0..n).map(|i| dense + 1 + i * (rest - 1) / (n - 1).max(1)));
    crash_points.dedup();
    let mut failures = Vec::new();
    let mut points = 0;
    for k in crash_points {
        let seed = |m: u64| CrashPolicy::Random(k * m + 13);
        for (pi, p) in [
            (CrashPolicy::KeepNone, CrashPolicy::KeepNone),
            (CrashPolicy::KeepAll, CrashPolicy::KeepAll),
            // Metadata without its data, and data without its metadata.
            (CrashPolicy::KeepAll, CrashPolicy::KeepNone),
            (CrashPolicy::KeepNone, CrashPolicy::KeepAll),
            (seed(7919), seed(104729)),
            (seed(1299709), seed(15485863)),
        ]
        .into_iter()
        .enumerate()
        {
            let p = Policies {
                image: p.0,
                data: p.1,
            };
            let power = Power::new(&base_img, &base_data);
            power.arm(k, p);
            let t = run_workload(&power, &s).await;
            let (img, data) = power.crashed(p);
            points += 1;
            let what = format!(
                "{}: crash before op {k}/{total}, policies {pi} {p:?}",
                s.name
            );
            if let Err(e) = v.verify(&s, &img, &data, &t, &what).await {
                failures.push(e);
            }
        }
        if failures.len() > 3 {
            break;
        }
    }
    eprintln!(
        "{}: {total} operations, {points} crashes, {} distinct file pairs",
        s.name,
        v.qemu_verdicts.len()
    );
    assert!(
        failures.is_empty(),
        "{} failures (of {points} crashes):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Random writes (half of them small: within a subcluster or two, or a few sectors), write
/// zeroes with and without unmap, discards and flushes; ends with a flush.
fn mixed_ops(cluster_bits: u32, size: u64, n: usize, seed: u64) -> Vec<Op> {
    let cs = 1u64 << cluster_bits;
    let small = (cs / 32).max(512);
    let mut r = fastrand::Rng::with_seed(seed);
    let mut ops = Vec::new();
    for i in 0..n {
        let off = r.u64(0..size - 1);
        let off = if r.bool() { off / small * small } else { off };
        let len = if r.bool() {
            r.u64(1..=2 * small)
        } else {
            r.u64(1..=3 * cs)
        }
        .min(size - off);
        ops.push(workload::random_op(
            &mut r,
            off,
            len,
            seed * 1000 + i as u64,
        ));
    }
    ops.push(Op::Flush);
    ops
}

/// Stale data under zero clusters: clusters are written and flushed, then made zero without
/// unmapping (the data file keeps the old bytes), unmapped or discarded, and flushed; then
/// partially written. What such a write leaves of its cluster must read as zeros, so the zeros
/// written around it must be durable in the data file before the entry that maps the cluster:
/// otherwise the old bytes come back (without a backing file, the only way a lost write around
/// a partial one shows).
fn stale_prefix(cluster_bits: u32) -> Vec<Op> {
    let cs = 1u64 << cluster_bits;
    let sc = (cs / 32).max(512);
    vec![
        Op::Write {
            off: 0,
            len: 6 * cs,
            seed: 900,
        },
        Op::Flush,
        Op::Zero {
            off: cs,
            len: 2 * cs,
            unmap: false,
        },
        Op::Zero {
            off: 3 * cs,
            len: cs,
            unmap: true,
        },
        Op::Discard {
            off: 4 * cs,
            len: cs,
        },
        Op::Flush,
        Op::Write {
            off: cs + 3 * sc + 100,
            len: 700,
            seed: 901,
        },
        Op::Write {
            off: 2 * cs + cs / 2,
            len: sc,
            seed: 902,
        },
        Op::Write {
            off: 3 * cs + 5 * sc,
            len: 300,
            seed: 903,
        },
        Op::Write {
            off: 4 * cs + 100,
            len: 1000,
            seed: 904,
        },
        Op::Flush,
    ]
}

fn scenario(name: &'static str, cluster_bits: u32, seed: u64) -> Scenario {
    let size = 1 << 20;
    let ops = stale_prefix(cluster_bits);
    let dense = ops.len();
    let mut ops = ops;
    ops.extend(mixed_ops(cluster_bits, size, 40, seed));
    Scenario {
        name,
        cluster_bits,
        size,
        raw: false,
        backing: false,
        extended_l2: false,
        small_cache: false,
        ops,
        dense,
    }
}

/// Crash points per scenario (each tried with six policy pairs).
const POINTS: u64 = 80;

#[test]
fn crash_data_file() {
    let s = scenario("data file", 16, 1);
    rt().block_on(crash_everywhere(s, POINTS));
}

#[test]
fn crash_data_file_small_clusters_small_cache() {
    // 1 KiB clusters: an L2 table covers 128 KiB, so the workload allocates several, and the
    // cache holds two of them: entries are written back as they are evicted, mid-workload.
    let s = Scenario {
        small_cache: true,
        ..scenario("data file, 1k clusters, small cache", 10, 2)
    };
    rt().block_on(crash_everywhere(s, POINTS));
}

#[test]
fn crash_data_file_raw() {
    let s = Scenario {
        raw: true,
        ..scenario("data_file_raw", 16, 3)
    };
    rt().block_on(crash_everywhere(s, POINTS));
}

/// Partial writes over a backing file: the cluster copied into the data file must be durable
/// before the L2 entry that points at it.
#[test]
fn crash_data_file_cow_from_backing_file() {
    let s = Scenario {
        backing: true,
        ..scenario("data file over a backing file", 16, 4)
    };
    rt().block_on(crash_everywhere(s, POINTS));
}

#[test]
fn crash_data_file_subclusters() {
    let s = Scenario {
        extended_l2: true,
        ..scenario("data file, subclusters", 16, 5)
    };
    rt().block_on(crash_everywhere(s, POINTS));
}

/// Subclusters over a backing file: a subcluster's allocated bit must not be durable before
/// its data (and the backing file's bytes copied around a partial write) in the data file.
#[test]
fn crash_data_file_subclusters_cow_from_backing_file() {
    let s = Scenario {
        extended_l2: true,
        backing: true,
        ..scenario("data file, subclusters over a backing file", 16, 6)
    };
    rt().block_on(crash_everywhere(s, POINTS));
}

#[test]
fn crash_data_file_raw_subclusters() {
    let s = Scenario {
        extended_l2: true,
        raw: true,
        ..scenario("data_file_raw, subclusters", 16, 7)
    };
    rt().block_on(crash_everywhere(s, POINTS));
}
