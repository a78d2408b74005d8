//! Micro-benchmarks of the hot paths: a guest-to-host lookup on cached metadata, a metadata cache
//! hit, refcount entry updates, and whole requests on an in-memory image (no disk noise).
//! Run with `cargo bench --bench hot_paths`.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use qimg::block::{BlockDevice, CacheMode};
use qimg::format::RefcountWidth;
use qimg::qcow2::{create, CreateOptions, Preallocation, Qcow2, Qcow2Options};
use qimg::storage::memory::MemoryStorage;
use qimg::storage::StorageRef;
use qimg::{IoBuf, IoBufMut};
use std::sync::Arc;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn image(rt: &tokio::runtime::Runtime, prealloc: Preallocation) -> Arc<Qcow2> {
    rt.block_on(async {
        let mem = Arc::new(MemoryStorage::new());
        let o = CreateOptions {
            size: 1 << 30,
            preallocation: prealloc,
            ..Default::default()
        };
        create(mem.clone(), &o).await.expect("create");
        let s: StorageRef = mem;
        Arc::new(
            Qcow2::open(
                s,
                "bench".into(),
                &Qcow2Options::default(),
                false,
                CacheMode::Writeback,
            )
            .await
            .expect("open"),
        )
    })
}

fn hot_paths(c: &mut Criterion) {
    let rt = runtime();
    let img = image(&rt, Preallocation::Metadata);
    // Warm the cache.
    rt.block_on(img.read_at(0, IoBufMut::zeroed(4096)))
        .expect("warm");

    c.bench_function("mapping lookup (block status, cached L2)", |b| {
        let mut off = 0u64;
        b.iter(|| {
            off = (off + 4096 * 7919) % (1 << 30);
            black_box(rt.block_on(img.block_status(off, 4096)).expect("status"));
        })
    });

    let mut buf = Some(IoBufMut::zeroed(4096));
    c.bench_function("4k read, cached metadata, memory storage", |b| {
        let mut off = 0u64;
        b.iter(|| {
            off = (off + 4096 * 7919) % (1 << 30);
            let r = rt
                .block_on(img.read_at(off, buf.take().expect("buffer")))
                .expect("read");
            buf = Some(r);
        })
    });

    let raw_mem: StorageRef = Arc::new(MemoryStorage::from_bytes(&vec![1u8; 64 << 20]));
    let raw = qimg::raw::Raw::with_storage(raw_mem, 64 << 20, false);
    let mut rbuf = Some(IoBufMut::zeroed(4096));
    c.bench_function("4k read, raw format, memory storage", |b| {
        let mut off = 0u64;
        b.iter(|| {
            off = (off + 4096 * 7919) % (64 << 20);
            let r = rt
                .block_on(raw.read(off, rbuf.take().expect("buffer")))
                .expect("read");
            rbuf = Some(r);
        })
    });

    let data = IoBuf::copy_from(&[7u8; 4096]);
    c.bench_function("4k in-place write, memory storage", |b| {
        let mut off = 0u64;
        b.iter(|| {
            off = (off + 4096 * 7919) % (1 << 30);
            rt.block_on(img.write_at(off, data.clone())).expect("write");
        })
    });

    let fresh = image(&rt, Preallocation::Off);
    c.bench_function("4k allocating write (new cluster), memory storage", |b| {
        let mut cluster = 0u64;
        b.iter(|| {
            cluster = (cluster + 1) % 16384;
            if cluster == 0 {
                rt.block_on(fresh.discard_range(0, 1 << 30)).expect("reset");
                rt.block_on(fresh.flush()).expect("flush");
            }
            rt.block_on(fresh.write_at(cluster << 16, data.clone()))
                .expect("write");
        })
    });

    let w = RefcountWidth::new(4);
    let mut block = vec![0u8; 65536];
    c.bench_function("refcount entry update (16-bit)", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i = (i + 7919) % 32768;
            let v = w.get(&block, i);
            w.set(&mut block, i, (v + 1) & 0xffff).expect("set");
        })
    });

    let w1 = RefcountWidth::new(0);
    let mut block1 = vec![0u8; 65536];
    c.bench_function("refcount entry update (1-bit)", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i = (i + 7919) % (65536 * 8);
            let v = w1.get(&block1, i);
            w1.set(&mut block1, i, v ^ 1).expect("set");
        })
    });
}

criterion_group!(benches, hot_paths);
criterion_main!(benches);
