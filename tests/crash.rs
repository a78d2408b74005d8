//! Crash safety: run workloads on the power-loss simulator, lose power before every storage
//! operation (or a sample of them) keeping all, none, or a random torn subset of the unflushed
//! writes, and require of every resulting image:
//! - `qemu-img check` finds no corruption (leaked clusters are allowed);
//! - every byte that was durable at the last successful flush reads back unchanged.
//!
//! Workloads cover L2 table allocation, refcount block allocation, refcount table growth, L1
//! growth, COW of partial clusters, zero writes and discards, v2 and v3 images, narrow refcounts
//! and lazy refcounts. A second test kills a real `qimg io` process with SIGKILL.

mod common;

use common::workload::{self, Op, Tracker};
use common::*;
use qimg::block::{BlockDevice, CacheMode};
use qimg::qcow2::{create, CreateOptions, Qcow2, Qcow2Options};
use qimg::storage::crash::{CrashPolicy, CrashStorage};
use qimg::storage::memory::MemoryStorage;
use qimg::storage::StorageRef;
use qimg::IoBufMut;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;

#[derive(Clone, Debug)]
struct Scenario {
    name: &'static str,
    cluster_bits: u32,
    refcount_bits: u32,
    v3: bool,
    lazy: bool,
    size: u64,
    small_cache: bool,
    /// A raw backing file with a pattern (copy-on-write of partial clusters from it).
    backing: bool,
    /// Extended L2 entries (subclusters).
    extended_l2: bool,
    ops: Vec<Op>,
}

fn backing_data(s: &Scenario) -> Vec<u8> {
    workload::backing_data(s.backing, s.size)
}

fn backing_device(s: &Scenario) -> Arc<dyn BlockDevice> {
    workload::raw_device(&backing_data(s))
}

async fn fresh_image(s: &Scenario) -> MemoryStorage {
    let mem = Arc::new(MemoryStorage::new());
    let opts = CreateOptions {
        size: s.size,
        cluster_size: 1 << s.cluster_bits,
        version: if s.v3 { 3 } else { 2 },
        refcount_bits: s.refcount_bits,
        lazy_refcounts: s.lazy,
        backing_file: s.backing.then(|| "base.raw".to_string()),
        backing_format: s.backing.then(|| "raw".to_string()),
        extended_l2: s.extended_l2,
        ..Default::default()
    };
    create(mem.clone(), &opts).await.unwrap();
    mem.snapshot()
}

fn runtime_opts(s: &Scenario) -> Qcow2Options {
    let mut q = Qcow2Options::default();
    if s.small_cache {
        q.l2_cache_size = Some(2 << s.cluster_bits);
        q.refcount_cache_size = Some(4 << s.cluster_bits);
    }
    q
}

/// Runs the workload until it finishes or the storage dies.
async fn run_workload(storage: StorageRef, s: &Scenario) -> Tracker {
    let opened = Qcow2::open(
        storage,
        "crash".into(),
        &runtime_opts(s),
        false,
        CacheMode::Writeback,
    )
    .await;
    let backing = s.backing.then(|| backing_device(s));
    Tracker::run(backing_data(s), opened, backing, &s.ops).await
}

/// Checks one crashed image. Returns a description of the failure, if any.
async fn verify(s: &Scenario, img: &MemoryStorage, t: &Tracker, what: &str) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("crashed.qcow2");
    std::fs::write(&p, img.to_vec()).unwrap();
    if s.backing {
        std::fs::write(dir.path().join("base.raw"), backing_data(s)).unwrap();
    }
    if s.lazy {
        // A dirty image is repaired by the next read-write open, as QEMU does.
        let storage: StorageRef =
            Arc::new(qimg::storage::file::FileStorage::open(&p, Default::default()).unwrap());
        let q = Qcow2::open(
            storage,
            "x".into(),
            &Qcow2Options::default(),
            false,
            CacheMode::Writeback,
        )
        .await
        .map_err(|e| format!("{what}: repair open failed: {e}"))?;
        q.close()
            .await
            .map_err(|e| format!("{what}: close after repair: {e}"))?;
    }
    let (code, corruptions, _leaks, out) = qemu_check(&p);
    if corruptions > 0 || !(code == 0 || code == 3) {
        return Err(format!("{what}: qemu-img check rc={code}:\n{out}"));
    }
    let storage: StorageRef = Arc::new(MemoryStorage::from_bytes(&std::fs::read(&p).unwrap()));
    let q = open_read_only(storage, "x")
        .await
        .map_err(|e| format!("{what}: open failed: {e}"))?;
    if s.backing {
        q.set_backing(backing_device(s));
    }
    let size = q.virtual_size().min(t.durable.len() as u64);
    let data = q
        .read_at(0, IoBufMut::zeroed(size as usize))
        .await
        .map_err(|e| format!("{what}: read failed: {e}"))?;
    for i in 0..size as usize {
        let touched = t.touched.get(i).copied().unwrap_or(false);
        if !touched && data[i] != t.durable[i] {
            return Err(format!(
                "{what}: byte {i} was durable as {:#x} but reads {:#x}",
                t.durable[i], data[i]
            ));
        }
    }
    Ok(())
}

async fn crash_everywhere(s: Scenario, max_points: u64) {
    let base = fresh_image(&s).await;
    // Dry run: how many storage operations does the workload take?
    let dry = Arc::new(CrashStorage::new(&base));
    run_workload(dry.clone(), &s).await;
    let total = dry.ops();
    let step = (total / max_points).max(1);
    let mut failures = Vec::new();
    let mut points = 0;
    let mut k = 1;
    while k <= total + 1 {
        for (pi, policy) in [
            CrashPolicy::KeepNone,
            CrashPolicy::KeepAll,
            CrashPolicy::Random(k * 7919 + 13),
            CrashPolicy::Random(k * 104729 + 7),
            CrashPolicy::Random(k * 1299709 + 3),
        ]
        .into_iter()
        .enumerate()
        {
            let cs = Arc::new(CrashStorage::new(&base));
            cs.arm(k, policy);
            let t = run_workload(cs.clone(), &s).await;
            let img = cs.captured().unwrap_or_else(|| cs.crash_now(policy));
            points += 1;
            let what = format!("{} crash before op {k}/{total} policy {pi}", s.name);
            if let Err(e) = verify(&s, &img, &t, &what).await {
                failures.push(e);
                if failures.len() > 3 {
                    break;
                }
            }
        }
        k += step;
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(points > 0);
}

fn mixed_ops(cs: u64, size: u64, n: usize, seed: u64) -> Vec<Op> {
    let mut r = fastrand::Rng::with_seed(seed);
    let mut ops = Vec::new();
    for i in 0..n {
        let off = r.u64(0..size - 1);
        let len = r.u64(1..=(3 * cs).min(size - off));
        ops.push(workload::random_op(
            &mut r,
            off,
            len,
            seed * 1000 + i as u64,
        ));
    }
    ops
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn crash_default_geometry() {
    let s = Scenario {
        name: "64k",
        cluster_bits: 16,
        refcount_bits: 16,
        v3: true,
        lazy: false,
        size: 4 << 20,
        small_cache: false,
        backing: false,
        extended_l2: false,
        ops: mixed_ops(65536, 4 << 20, 40, 1),
    };
    rt().block_on(crash_everywhere(s, 1000));
}

#[test]
fn crash_small_clusters_table_growth() {
    // 512-byte clusters with 16-bit refcounts: a refcount block covers 128 KiB and the first
    // refcount table 8 MiB, so this workload allocates many L2 tables and refcount blocks,
    // grows the refcount table, and grows the L1 table twice.
    let mut ops = Vec::new();
    let mut seed = 10;
    for round in 0..3u64 {
        for i in 0..6u64 {
            let off = (round * 6 + i) * 600_000 % ((3 << 20) - 300_000);
            ops.push(Op::Write {
                off,
                len: 300_000,
                seed,
            });
            seed += 1;
            if i % 3 == 2 {
                ops.push(Op::Flush);
            }
        }
        ops.push(Op::Grow((4 + round * 4) << 20));
    }
    ops.push(Op::Write {
        off: 11 << 20,
        len: 600_000,
        seed: 99,
    });
    ops.push(Op::Discard {
        off: 0,
        len: 1 << 20,
    });
    ops.push(Op::Flush);
    let s = Scenario {
        name: "512b",
        cluster_bits: 9,
        refcount_bits: 16,
        v3: true,
        lazy: false,
        size: 3 << 20,
        small_cache: true,
        backing: false,
        extended_l2: false,
        ops,
    };
    rt().block_on(crash_everywhere(s, 150));
}

#[test]
fn crash_v2_narrow_refcounts_small_cache() {
    let s = Scenario {
        name: "v2",
        cluster_bits: 12,
        refcount_bits: 16,
        v3: false,
        lazy: false,
        size: 2 << 20,
        small_cache: true,
        backing: false,
        extended_l2: false,
        ops: mixed_ops(4096, 2 << 20, 60, 2),
    };
    rt().block_on(crash_everywhere(s, 120));
    let s = Scenario {
        name: "1bit",
        cluster_bits: 12,
        refcount_bits: 1,
        v3: true,
        lazy: false,
        size: 2 << 20,
        small_cache: true,
        backing: false,
        extended_l2: false,
        ops: mixed_ops(4096, 2 << 20, 60, 3),
    };
    rt().block_on(crash_everywhere(s, 120));
}

/// Wide refcounts on 512-byte clusters: a refcount block covers 32 KiB (64-bit) or 64 KiB
/// (32-bit) and the first refcount table 2 or 4 MiB, so runs longer than a block's range need
/// new blocks mid-run and the table grows once or twice. Power fails everywhere in between.
#[test]
fn crash_wide_refcounts_through_block_creation_and_table_growth() {
    for (refcount_bits, seed) in [(64u32, 20u64), (32, 21)] {
        let size = 8u64 << 20;
        let mut r = fastrand::Rng::with_seed(seed);
        let mut ops = Vec::new();
        let mut off = 0;
        while off < 6 << 20 {
            let len = r.u64(20_000..200_000);
            ops.push(Op::Write {
                off,
                len,
                seed: off,
            });
            off += len + r.u64(0..3) * 512;
            match r.u8(0..8) {
                0 => ops.push(Op::Flush),
                1 => ops.push(Op::Discard {
                    off: r.u64(0..off) / 512 * 512,
                    len: r.u64(512..100_000),
                }),
                _ => {}
            }
        }
        ops.push(Op::Flush);
        let s = Scenario {
            name: if refcount_bits == 64 {
                "64bit"
            } else {
                "32bit"
            },
            cluster_bits: 9,
            refcount_bits,
            v3: true,
            lazy: false,
            size,
            small_cache: true,
            backing: false,
            extended_l2: false,
            ops,
        };
        rt().block_on(crash_everywhere(s, 40));
    }
}

#[test]
fn crash_lazy_refcounts() {
    let s = Scenario {
        name: "lazy",
        cluster_bits: 16,
        refcount_bits: 16,
        v3: true,
        lazy: true,
        size: 4 << 20,
        small_cache: false,
        backing: false,
        extended_l2: false,
        ops: mixed_ops(65536, 4 << 20, 30, 4),
    };
    rt().block_on(crash_everywhere(s, 60));
}

#[test]
fn crash_cow_from_backing_file() {
    // Partial writes over a backing file: the copied-on-write cluster must be durable before
    // the L2 entry that points to it, or untouched bytes of the cluster would be lost.
    let s = Scenario {
        name: "cow",
        cluster_bits: 16,
        refcount_bits: 16,
        v3: true,
        lazy: false,
        size: 2 << 20,
        small_cache: false,
        backing: true,
        extended_l2: false,
        ops: mixed_ops(65536, 2 << 20, 30, 5)
            .into_iter()
            .map(|op| match op {
                Op::Write { off, len, seed } => Op::Write {
                    off,
                    len: len.min(3000),
                    seed,
                },
                other => other,
            })
            .collect(),
    };
    rt().block_on(crash_everywhere(s, 1000));
}

/// Writes at subcluster, sector and byte granularity on images with subclusters: a subcluster
/// marked allocated before its data (and its copied-on-write neighbourhood) is durable would
/// read garbage; zero and unallocated subclusters must keep reading what they did.
#[test]
fn crash_subclusters() {
    for (name, bits, backing, seed) in [
        ("subclusters 128k", 17, false, 11),
        ("subclusters 64k over a backing file", 16, true, 12),
        ("subclusters 64k in place over a backing file", 16, true, 13),
    ] {
        // The last: a small disk whose clusters get allocated early, then written in
        // subclusters that still read the backing file (in-place allocation).
        let size = if seed == 13 { 512 << 10 } else { 2u64 << 20 };
        let sc = (1u64 << bits) / 32;
        let mut r = fastrand::Rng::with_seed(seed);
        let ops_random: Vec<Op> = mixed_ops(1 << bits, size, 30, seed)
            .into_iter()
            .map(|op| match op {
                // Mostly small writes: a subcluster or two, unaligned half of the time.
                Op::Write { off, seed, .. } => {
                    let off = if r.bool() { off / sc * sc } else { off };
                    Op::Write {
                        off,
                        len: r.u64(1..=2 * sc).min(size - off),
                        seed,
                    }
                }
                other => other,
            })
            .collect();
        let ops = if seed == 13 {
            // Deterministic too: each flush interval has only in-place allocations, whose
            // entries must not become durable before their data.
            let mut ops = vec![
                Op::Write {
                    off: 0,
                    len: 1000,
                    seed: 1,
                },
                Op::Flush,
            ];
            for k in 1..8u64 {
                ops.push(Op::Write {
                    off: k * 3 * sc + 100,
                    len: 300,
                    seed: 100 + k,
                });
                ops.push(Op::Flush);
            }
            ops.extend(ops_random);
            ops
        } else {
            ops_random
        };
        let s = Scenario {
            name,
            cluster_bits: bits,
            refcount_bits: 16,
            v3: true,
            lazy: false,
            size,
            small_cache: false,
            backing,
            extended_l2: true,
            ops,
        };
        rt().block_on(crash_everywhere(s, 600));
    }
}

/// A real process killed with SIGKILL mid-stream: the image must pass qemu-img check (leaks
/// allowed) and keep every write that a completed flush covered.
#[test]
fn kill_9_writer_process() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("k.qcow2");
    let bin = env!("CARGO_BIN_EXE_qimg");
    let o = run(
        bin,
        &["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "256M"],
    );
    assert!(o.status.success());
    // write k, flush, write k+1, flush, ... : when "wrote" of write k+1 is printed, the flush
    // after write k has completed.
    let n = 3000u64;
    let mut args = vec!["io".to_string()];
    for k in 0..n {
        let off = (k * 193 % 4000) * 65536 + (k % 7) * 512;
        args.push("-c".into());
        args.push(format!("write -P {} {off} 70000", k % 250 + 1));
        args.push("-c".into());
        args.push("flush".into());
    }
    args.push(p.to_str().unwrap().into());
    for kill_after in [5usize, 60, 200] {
        let _ = std::fs::copy(&p, dir.path().join("base.qcow2"));
        let mut child = Command::new(bin)
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let mut done = 0usize;
        while let Some(Ok(l)) = lines.next() {
            if l.starts_with("wrote") {
                done += 1;
                if done >= kill_after {
                    break;
                }
            }
        }
        let still_running = child.try_wait().unwrap().is_none();
        assert!(
            still_running,
            "the writer finished before it could be killed"
        );
        child.kill().unwrap();
        let _ = child.wait();
        // The image lock goes away with the killed process's last file reference, and the
        // kernel drops those held by an io_uring instance asynchronously, a moment after the
        // process is reaped: wait for it (bounded) rather than race it.
        let mut tries = 0;
        let (code, corruptions, _, out) = loop {
            let r = qemu_check(&p);
            tries += 1;
            if !r.3.contains("Failed to get") || tries >= 100 {
                break r;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        assert!(
            corruptions == 0 && (code == 0 || code == 3),
            "after kill -9: rc={code}\n{out}"
        );
        // Writes 0..done-1 were each followed by a completed flush (except maybe the last):
        // the newest write to each byte among them must be there.
        let durable = done.saturating_sub(1) as u64;
        let mut expect = std::collections::BTreeMap::new();
        for k in 0..durable {
            let off = (k * 193 % 4000) * 65536 + (k % 7) * 512;
            expect.insert(k, (off, k % 250 + 1));
        }
        let img = std::fs::read(&p).unwrap();
        let rt = rt();
        let ok = rt.block_on(async {
            let storage: StorageRef = Arc::new(MemoryStorage::from_bytes(&img));
            let q = open_read_only(storage, "k").await.unwrap();
            // Check each durable write that no later write (durable or not) overlaps.
            for (k, (off, pat)) in &expect {
                let later_overlap = expect
                    .range(k + 1..)
                    .any(|(_, (o2, _))| *o2 < off + 70000 && off < &(o2 + 70000));
                let also_pending = (durable..n).any(|j| {
                    let o2 = (j * 193 % 4000) * 65536 + (j % 7) * 512;
                    o2 < off + 70000 && *off < o2 + 70000
                });
                if later_overlap || also_pending {
                    continue;
                }
                let b = q.read_at(*off, IoBufMut::zeroed(70000)).await.unwrap();
                if b.iter().any(|&x| x != *pat as u8) {
                    return Err(format!("durable write {k} at {off} lost"));
                }
            }
            Ok(())
        });
        ok.unwrap();
        let _ = run(
            "cp",
            &[
                dir.path().join("base.qcow2").to_str().unwrap(),
                p.to_str().unwrap(),
            ],
        );
    }
}
