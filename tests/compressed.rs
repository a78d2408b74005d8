//! Compressed images written by qimg: round trips against QEMU (deflate and zstd, all cluster
//! sizes), overwrites and discards of compressed clusters without leaks, and the sequential
//! write cache of compressed targets against a model (property test) and under power loss.

mod common;

use common::*;
use proptest::prelude::*;
use qimg::block::{CacheMode, ZeroFlags};
use qimg::format::CompressionType;
use qimg::qcow2::{create, CreateOptions, Qcow2, Qcow2Options};
use qimg::storage::crash::{CrashPolicy, CrashStorage};
use qimg::storage::memory::MemoryStorage;
use qimg::storage::StorageRef;
use qimg::{IoBuf, IoBufMut};
use std::sync::Arc;

const QIMG: &str = env!("CARGO_BIN_EXE_qimg");

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Mixed content: zeros, random data, text, repeated patterns.
fn mixed(len: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; len];
    let mut r = fastrand::Rng::with_seed(seed);
    let mut pos = 0;
    while pos < len {
        let n = (r.usize(1..40) * 4096).min(len - pos);
        match r.u8(0..4) {
            0 => {}
            1 => r.fill(&mut data[pos..pos + n]),
            2 => {
                for (i, b) in data[pos..pos + n].iter_mut().enumerate() {
                    *b = b"all work and no play makes jack a dull boy. "[i % 44];
                }
            }
            _ => data[pos..pos + n].fill(r.u8(..)),
        }
        pos += n;
    }
    data
}

#[test]
fn convert_c_round_trips_with_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let data = mixed(5 << 20, 1);
    std::fs::write(&raw, &data).unwrap();
    for ctype in ["zlib", "zstd"] {
        for cs in [512u64, 4096, 65536, 2 << 20] {
            let p = dir.path().join(format!("c_{ctype}_{cs}.qcow2"));
            let o = run(
                QIMG,
                &[
                    "convert",
                    "-c",
                    "-O",
                    "qcow2",
                    "-o",
                    &format!("compression_type={ctype},cluster_size={cs}"),
                    raw.to_str().unwrap(),
                    p.to_str().unwrap(),
                ],
            );
            assert!(o.status.success(), "{}", text(&o));
            qemu_check_clean(&p);
            qemu_compare_raw(&p, &raw);
            // QEMU agrees that clusters are compressed.
            let m = run("qemu-img", &["map", "--output=json", p.to_str().unwrap()]);
            assert!(String::from_utf8_lossy(&m.stdout).contains("\"compressed\": true"));
        }
    }
}

#[test]
fn overwrite_and_discard_compressed_clusters_without_leaks() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("o.qcow2");
    for ctype in ["zlib", "zstd"] {
        let o = run(
            QIMG,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("compression_type={ctype}"),
                p.to_str().unwrap(),
                "4M",
            ],
        );
        assert!(o.status.success());
        let o = run(
            QIMG,
            &[
                "io",
                "-c",
                "write -c -P 1 0 1M",
                "-c",
                "write -c -P 2 1M 1M",
                "-c",
                "write -P 3 4000 70000",
                "-c",
                "write -c -P 4 64k 128k",
                "-c",
                "discard 1M 512k",
                "-c",
                "write -z 1600k 64k",
                p.to_str().unwrap(),
            ],
        );
        assert!(o.status.success(), "{}", text(&o));
        qemu_check_clean(&p);
        let mut model = vec![0u8; 4 << 20];
        model[..1 << 20].fill(1);
        model[1 << 20..2 << 20].fill(2);
        model[4000..74000].fill(3);
        model[64 << 10..192 << 10].fill(4);
        model[1 << 20..(1 << 20) + (512 << 10)].fill(0);
        model[1600 << 10..1664 << 10].fill(0);
        let raw = dir.path().join("m.raw");
        std::fs::write(&raw, &model).unwrap();
        qemu_compare_raw(&p, &raw);
    }
}

async fn compressed_target(size: u64, cluster_bits: u32, ctype: CompressionType) -> MemoryStorage {
    let mem = Arc::new(MemoryStorage::new());
    let o = CreateOptions {
        size,
        cluster_size: 1 << cluster_bits,
        compression: ctype,
        ..Default::default()
    };
    create(mem.clone(), &o).await.unwrap();
    mem.snapshot()
}

fn compress_opts() -> Qcow2Options {
    Qcow2Options {
        compress: Some(true),
        ..Default::default()
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// Continue the stream (sequential) by `len` bytes.
    Next(u64, u64),
    /// A write anywhere.
    At(u64, u64, u64),
    Zero(u64, u64),
    Read(u64, u64),
    Flush,
    Reopen,
}

fn ops(size: u64) -> impl Strategy<Value = Vec<Op>> {
    let op =
        (0u8..100, 0..size, 1u64..20_000, any::<u64>()).prop_map(move |(k, off, len, seed)| {
            let len = len.min(size - off).max(1);
            match k {
                0..=59 => Op::Next(len.min(9000), seed),
                60..=69 => Op::At(off, len, seed),
                70..=74 => Op::Zero(off, len),
                75..=89 => Op::Read(off, len),
                90..=96 => Op::Flush,
                _ => Op::Reopen,
            }
        });
    prop::collection::vec(op, 1..80)
}

async fn run_stream(bits: u32, zstd: bool, ops: Vec<Op>) {
    let size = 2u64 << 20;
    let ctype = if zstd {
        CompressionType::Zstd
    } else {
        CompressionType::Deflate
    };
    let mem = Arc::new(compressed_target(size, bits, ctype).await);
    let open = |m: Arc<MemoryStorage>| async move {
        let s: StorageRef = m;
        let img = Arc::new(
            Qcow2::open(s, "c".into(), &compress_opts(), false, CacheMode::Writeback)
                .await
                .unwrap(),
        );
        img.start_background(None);
        img
    };
    let mut img = open(mem.clone()).await;
    let mut model = vec![0u8; size as usize];
    let mut cursor = 0u64;
    for op in ops {
        match op {
            Op::Next(len, seed) => {
                let len = len.min(size - cursor);
                if len == 0 {
                    cursor = 0;
                    continue;
                }
                let d = pattern(seed, len as usize);
                img.write_at(cursor, IoBuf::copy_from(&d)).await.unwrap();
                model[cursor as usize..(cursor + len) as usize].copy_from_slice(&d);
                cursor += len;
            }
            Op::At(off, len, seed) => {
                let d = pattern(seed, len as usize);
                img.write_at(off, IoBuf::copy_from(&d)).await.unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&d);
            }
            Op::Zero(off, len) => {
                img.zero_range(off, len, ZeroFlags::default())
                    .await
                    .unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            Op::Read(off, len) => {
                let got = img
                    .read_at(off, IoBufMut::zeroed(len as usize))
                    .await
                    .unwrap();
                assert!(
                    got[..] == model[off as usize..(off + len) as usize],
                    "read at {off}+{len}"
                );
            }
            Op::Flush => img.flush().await.unwrap(),
            Op::Reopen => {
                img.close().await.unwrap();
                img = open(mem.clone()).await;
            }
        }
    }
    let all = img
        .read_at(0, IoBufMut::zeroed(size as usize))
        .await
        .unwrap();
    assert!(all[..] == model[..], "final content differs");
    img.close().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.qcow2");
    std::fs::write(&p, mem.to_vec()).unwrap();
    qemu_check_clean(&p);
    let raw = dir.path().join("m.raw");
    std::fs::write(&raw, &model).unwrap();
    qemu_compare_raw(&p, &raw);
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(24),
        max_shrink_iters: 100,
        .. ProptestConfig::default()
    })]

    #[test]
    fn sequential_cache_matches_model(
        bits in prop::sample::select(vec![12u32, 16, 17]),
        zstd in any::<bool>(),
        ops in ops(2 << 20),
    ) {
        rt().block_on(run_stream(bits, zstd, ops));
    }
}

/// Power loss while streaming into a compressed target: no corruption, and everything written
/// before the last successful flush (including a partly filled cluster) is intact.
#[test]
fn sequential_cache_survives_power_loss() {
    let rt = rt();
    rt.block_on(async {
        let size = 1u64 << 20;
        let base = compressed_target(size, 16, CompressionType::Deflate).await;
        let stream: Vec<(u64, Vec<u8>)> = (0..60u64).map(|i| (i * 5000, mixed(5000, i))).collect();
        let run = |s: Arc<CrashStorage>| {
            let stream = stream.clone();
            async move {
                let st: StorageRef = s;
                let img = Qcow2::open(
                    st,
                    "c".into(),
                    &compress_opts(),
                    false,
                    CacheMode::Writeback,
                )
                .await;
                let Ok(img) = img else {
                    return (vec![0u8; size as usize], vec![false; size as usize]);
                };
                let mut model = vec![0u8; size as usize];
                let mut durable = model.clone();
                let mut touched = vec![false; size as usize];
                for (i, (off, d)) in stream.iter().enumerate() {
                    touched[*off as usize..*off as usize + d.len()].fill(true);
                    if img.write_at(*off, IoBuf::copy_from(d)).await.is_err() {
                        break;
                    }
                    model[*off as usize..*off as usize + d.len()].copy_from_slice(d);
                    if i % 7 == 6 {
                        if img.flush().await.is_err() {
                            break;
                        }
                        durable = model.clone();
                        touched.fill(false);
                    }
                }
                let _ = img.close().await;
                (durable, touched)
            }
        };
        // Dry run for the number of storage operations.
        let dry = Arc::new(CrashStorage::new(&base));
        run(dry.clone()).await;
        let total = dry.ops();
        let step = (total / 80).max(1);
        let mut k = 1;
        while k <= total {
            for policy in [CrashPolicy::KeepNone, CrashPolicy::Random(k)] {
                let cs = Arc::new(CrashStorage::new(&base));
                cs.arm(k, policy);
                let (durable, touched) = run(cs.clone()).await;
                let img = cs.captured().unwrap_or_else(|| cs.crash_now(policy));
                let dir = tempfile::tempdir().unwrap();
                let p = dir.path().join("x.qcow2");
                std::fs::write(&p, img.to_vec()).unwrap();
                let (code, corruptions, _, out) = qemu_check(&p);
                assert!(
                    corruptions == 0 && (code == 0 || code == 3),
                    "crash at {k}: {out}"
                );
                let st: StorageRef = Arc::new(img);
                let q = open_read_only(st, "x").await.unwrap();
                let got = q.read_at(0, IoBufMut::zeroed(size as usize)).await.unwrap();
                for i in 0..size as usize {
                    assert!(
                        touched[i] || got[i] == durable[i],
                        "crash at {k}: byte {i} lost ({} != {})",
                        got[i],
                        durable[i]
                    );
                }
            }
            k += step;
        }
    });
}
