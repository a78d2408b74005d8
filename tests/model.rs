//! Property test: random sequences of writes, write-zeroes, discards, flushes, reads and reopens
//! on random geometries, checked against an in-memory model of the disk; every final image must
//! pass `qemu-img check` with no errors and no leaks and equal the model per `qemu-img compare`.

mod common;

use common::*;
use proptest::prelude::*;
use qimg::block::{open_image, BlockDevice, Format, OpenOptions, ZeroFlags};
use qimg::format::CompressionType;
use qimg::qcow2::{create, CreateOptions, Qcow2Options};
use qimg::storage::file::{FileOptions, FileStorage};
use qimg::{IoBuf, IoBufMut};
use std::path::Path;
use std::sync::Arc;

#[derive(Debug, Clone, Copy)]
enum Backing {
    None,
    /// Raw backing file covering `1/den` of the disk... rounded to 512.
    Raw {
        den: u64,
    },
    Qcow2,
}

#[derive(Debug, Clone)]
struct Setup {
    cluster_bits: u32,
    refcount_bits: u32,
    v3: bool,
    lazy: bool,
    clusters: u64,
    shave: u64,
    backing: Backing,
    small_cache: bool,
    slices: bool,
}

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: u64, seed: u64 },
    Zero { off: u64, len: u64, unmap: bool },
    Discard { off: u64, len: u64 },
    Read { off: u64, len: u64 },
    Flush,
    Reopen,
}

fn setup() -> impl Strategy<Value = Setup> {
    (
        prop::sample::select(vec![9u32, 10, 12, 14, 16, 17, 21]),
        prop::sample::select(vec![1u32, 2, 4, 8, 16, 32, 64]),
        any::<bool>(),
        any::<bool>(),
        8u64..200,
        0u64..4,
        prop_oneof![
            3 => Just(Backing::None),
            2 => (1u64..3).prop_map(|den| Backing::Raw { den }),
            1 => Just(Backing::Qcow2),
        ],
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(
                cluster_bits,
                refcount_bits,
                v3,
                lazy,
                clusters,
                shave,
                backing,
                small_cache,
                slices,
            )| {
                Setup {
                    cluster_bits,
                    refcount_bits: if v3 { refcount_bits } else { 16 },
                    v3,
                    lazy: lazy && v3,
                    clusters: if cluster_bits >= 17 {
                        clusters.min(40)
                    } else {
                        clusters
                    },
                    shave,
                    backing,
                    small_cache,
                    slices: slices && cluster_bits >= 12,
                }
            },
        )
}

impl Setup {
    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }
    fn size(&self) -> u64 {
        self.clusters * self.cs() - self.shave * 512
    }
}

fn ops(size: u64, cs: u64) -> impl Strategy<Value = Vec<Op>> {
    let hot = (size / 3).min(4 * cs).max(1);
    let offset = prop_oneof![
        2 => 0..hot,
        1 => 0..size,
        1 => (0..size / cs).prop_map(move |c| c * cs),
    ];
    let len = prop_oneof![
        2 => 1..=3 * cs,
        1 => (1u64..=4).prop_map(move |n| n * cs),
        1 => 1u64..600,
    ];
    let op = (0u8..100, offset, len, any::<u64>(), any::<bool>()).prop_map(
        move |(kind, off, len, seed, flag)| {
            let off = off.min(size - 1);
            let len = len.min(size - off).max(1);
            match kind {
                0..=44 => Op::Write { off, len, seed },
                45..=57 => Op::Zero {
                    off,
                    len,
                    unmap: flag,
                },
                58..=67 => Op::Discard { off, len },
                68..=85 => Op::Read { off, len },
                86..=94 => Op::Flush,
                _ => Op::Reopen,
            }
        },
    );
    prop::collection::vec(op, 1..40)
}

struct World {
    dir: tempfile::TempDir,
    s: Setup,
    model: Vec<u8>,
}

impl World {
    fn img(&self) -> std::path::PathBuf {
        self.dir.path().join("top.qcow2")
    }

    fn open_opts(&self) -> OpenOptions {
        let mut q = Qcow2Options::default();
        if self.s.small_cache {
            q.l2_cache_size = Some(2 * self.s.cs());
            q.refcount_cache_size = Some(4 * self.s.cs());
        }
        if self.s.slices {
            q.l2_cache_entry_size = Some(self.s.cs() / 4);
        }
        OpenOptions {
            format: Some(Format::Qcow2),
            qcow2: q,
            ..Default::default()
        }
    }
}

async fn build(s: Setup) -> World {
    let dir = tempfile::tempdir().unwrap();
    let size = s.size();
    let mut backing = vec![0u8; size as usize];
    let mut opts = CreateOptions {
        size,
        cluster_size: s.cs(),
        version: if s.v3 { 3 } else { 2 },
        refcount_bits: s.refcount_bits,
        lazy_refcounts: s.lazy,
        compression: CompressionType::Deflate,
        ..Default::default()
    };
    match s.backing {
        Backing::None => {}
        Backing::Raw { den } => {
            let blen = (size / den) / 512 * 512;
            let data = pattern(size ^ 0xbacc, blen as usize);
            std::fs::write(dir.path().join("base.raw"), &data).unwrap();
            backing[..blen as usize].copy_from_slice(&data);
            opts.backing_file = Some("base.raw".into());
            opts.backing_format = Some("raw".into());
        }
        Backing::Qcow2 => {
            let base = dir.path().join("base.qcow2");
            qemu_create(&base, "cluster_size=65536", size, &[]);
            let mut cmds = Vec::new();
            let mut off = 0u64;
            let mut k = 1u8;
            while off < size {
                let len = (size - off).min(70_000);
                cmds.push(format!("write -P {k} {off} {len}"));
                backing[off as usize..(off + len) as usize].fill(k);
                off += len + 150_000;
                k = k.wrapping_add(1).max(1);
            }
            qemu_io(&base, "qcow2", &cmds);
            opts.backing_file = Some("base.qcow2".into());
            opts.backing_format = Some("qcow2".into());
        }
    }
    let storage =
        FileStorage::create(&dir.path().join("top.qcow2"), FileOptions::default()).unwrap();
    create(Arc::new(storage), &opts).await.unwrap();
    World {
        dir,
        s,
        model: backing,
    }
}

async fn run_case(s: Setup, ops: Vec<Op>) {
    let mut w = build(s.clone()).await;
    let cs = s.cs();
    let size = s.size();
    let v3 = s.v3;
    let mut img: Arc<dyn BlockDevice> = open_image(&w.img(), &w.open_opts()).await.unwrap();
    for op in ops {
        match op {
            Op::Write { off, len, seed } => {
                let data = pattern(seed, len as usize);
                img.write(off, IoBuf::copy_from(&data)).await.unwrap();
                w.model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            Op::Zero { off, len, unmap } => {
                let flags = ZeroFlags {
                    may_unmap: unmap,
                    fast_only: false,
                };
                img.write_zeroes(off, len, flags).await.unwrap();
                w.model[off as usize..(off + len) as usize].fill(0);
            }
            Op::Discard { off, len } => {
                img.discard(off, len).await.unwrap();
                let end = off + len;
                let astart = off.next_multiple_of(cs);
                let aend = if end == size { end } else { end / cs * cs };
                if astart < aend {
                    let r = astart as usize..aend as usize;
                    // v2 with a backing file: nothing changes (no ZERO flag, and the backing
                    // file's data must not show through).
                    if v3 || matches!(w.s.backing, Backing::None) {
                        w.model[r].fill(0);
                    }
                }
            }
            Op::Read { off, len } => {
                let b = img.read(off, IoBufMut::zeroed(len as usize)).await.unwrap();
                assert!(
                    b[..] == w.model[off as usize..(off + len) as usize],
                    "read mismatch at {off}+{len}"
                );
            }
            Op::Flush => img.flush().await.unwrap(),
            Op::Reopen => {
                img.close().await.unwrap();
                img = open_image(&w.img(), &w.open_opts()).await.unwrap();
            }
        }
    }
    let all = img.read(0, IoBufMut::zeroed(size as usize)).await.unwrap();
    assert!(
        all[..] == w.model[..],
        "final content differs from the model"
    );
    img.close().await.unwrap();
    drop(img);
    qemu_check_clean(&w.img());
    let raw = w.dir.path().join("model.raw");
    std::fs::write(&raw, &w.model).unwrap();
    qemu_compare_raw(&w.img(), &raw);
    let _ = Path::new(".");
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48),
        max_shrink_iters: 200,
        .. ProptestConfig::default()
    })]

    #[test]
    fn random_operations_match_model((s, ops) in setup().prop_flat_map(|s| {
        let size = s.size();
        let cs = s.cs();
        (Just(s), ops(size, cs))
    })) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(run_case(s, ops));
    }
}
