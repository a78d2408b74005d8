//! Concurrency: many requests in flight on one image must behave as if serialized (QEMU iotests
//! 011 and 046 cover the same ground): no lost write, no torn cluster, no double allocation, and a
//! read racing an allocating write sees the old or the new content, never a mix or garbage.
//! Storage latency is simulated so that requests really overlap.

mod common;

use common::*;
use futures_util::future::join_all;
use qimg::block::{BlockDevice, CacheMode, ZeroFlags};
use qimg::qcow2::{create, CreateOptions, Qcow2, Qcow2Options};
use qimg::storage::latency::LatencyStorage;
use qimg::storage::memory::MemoryStorage;
use qimg::storage::StorageRef;
use qimg::{IoBuf, IoBufMut};
use std::sync::Arc;
use std::time::Duration;

struct Setup {
    mem: Arc<MemoryStorage>,
    img: Arc<Qcow2>,
    backing: Option<Vec<u8>>,
}

async fn setup(cluster_bits: u32, size: u64, with_backing: bool, small_cache: bool) -> Setup {
    let mem = Arc::new(MemoryStorage::new());
    let opts = CreateOptions {
        size,
        cluster_size: 1 << cluster_bits,
        backing_file: with_backing.then(|| "base.raw".into()),
        backing_format: with_backing.then(|| "raw".into()),
        ..Default::default()
    };
    create(mem.clone(), &opts).await.unwrap();
    let slow: StorageRef = Arc::new(LatencyStorage::new(mem.clone(), Duration::from_micros(40)));
    let mut q = Qcow2Options::default();
    if small_cache {
        q.l2_cache_size = Some(2 << cluster_bits);
    }
    let img = Arc::new(
        Qcow2::open(slow, "c".into(), &q, false, CacheMode::Writeback)
            .await
            .unwrap(),
    );
    let backing = with_backing.then(|| pattern(77, size as usize));
    if let Some(b) = &backing {
        let bm: StorageRef = Arc::new(MemoryStorage::from_bytes(b));
        img.set_backing(Arc::new(qimg::raw::Raw::with_storage(bm, size, true)));
    }
    Setup { mem, img, backing }
}

/// Closes the image and runs qemu-img check on it: no corruption, no leaks.
async fn close_and_check(s: Setup) {
    s.img.close().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.qcow2");
    std::fs::write(&p, s.mem.to_vec()).unwrap();
    if let Some(b) = &s.backing {
        std::fs::write(dir.path().join("base.raw"), b).unwrap();
    }
    qemu_check_clean(&p);
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

/// iotest 046 style: concurrent allocating writes to disjoint pieces of the same clusters (with
/// and without a backing file, so partial clusters need copy-on-write) all survive.
#[test]
fn disjoint_writes_into_the_same_clusters() {
    rt().block_on(async {
        for (bits, backing) in [(16u32, false), (16, true), (12, true), (9, false)] {
            let cs = 1u64 << bits;
            let size = 64 * cs;
            let s = setup(bits, size, backing, bits == 9).await;
            let mut model = s.backing.clone().unwrap_or_else(|| vec![0; size as usize]);
            let mut r = fastrand::Rng::with_seed(u64::from(bits));
            for round in 0..20u64 {
                // Cut 4 clusters into 16 random disjoint pieces and write them all at once.
                let base = r.u64(0..60) * cs;
                let mut cuts: Vec<u64> = (0..15).map(|_| r.u64(1..4 * cs)).collect();
                cuts.push(0);
                cuts.push(4 * cs);
                cuts.sort_unstable();
                cuts.dedup();
                let futs = cuts.windows(2).enumerate().map(|(i, w)| {
                    let data = pattern(round * 100 + i as u64, (w[1] - w[0]) as usize);
                    let img = s.img.clone();
                    let off = base + w[0];
                    async move {
                        img.write_at(off, IoBuf::copy_from(&data)).await.unwrap();
                        (off, data)
                    }
                });
                for (off, data) in join_all(futs).await {
                    model[off as usize..off as usize + data.len()].copy_from_slice(&data);
                }
            }
            let all = s
                .img
                .read_at(0, IoBufMut::zeroed(size as usize))
                .await
                .unwrap();
            assert!(
                all[..] == model[..],
                "lost a write (cluster bits {bits}, backing {backing})"
            );
            close_and_check(s).await;
        }
    });
}

/// Several writers race to allocate the same cluster with the same range: the result is one of
/// them entirely (never a mix or zeros) and nothing is allocated twice (qemu-img check: no leak).
#[test]
fn racing_allocations_of_one_cluster() {
    rt().block_on(async {
        let s = setup(16, 64 << 20, false, false).await;
        for round in 0..40u64 {
            let off = round * 65536 + (round % 5) * 4096;
            let len = 4096 + (round % 3) * 70000;
            let writers = (0..8u64).map(|k| {
                let img = s.img.clone();
                let data = pattern(round * 10 + k, len as usize);
                async move {
                    img.write_at(off, IoBuf::copy_from(&data)).await.unwrap();
                    data
                }
            });
            let candidates = join_all(writers).await;
            let got = s
                .img
                .read_at(off, IoBufMut::zeroed(len as usize))
                .await
                .unwrap();
            assert!(
                candidates.iter().any(|c| c[..] == got[..]),
                "round {round}: content is not any single writer's data"
            );
        }
        close_and_check(s).await;
    });
}

/// Readers racing allocating writes (and zero writes) see old or new data, whole.
#[test]
fn reads_racing_allocating_writes() {
    rt().block_on(async {
        let s = setup(16, 32 << 20, true, true).await;
        let old = s.backing.clone().unwrap();
        for round in 0..30u64 {
            let off = round * 3 * 65536 + 1000;
            let len = 100_000usize;
            let new = pattern(round + 500, len);
            let w = {
                let img = s.img.clone();
                let new = new.clone();
                tokio::spawn(
                    async move { img.write_at(off, IoBuf::copy_from(&new)).await.unwrap() },
                )
            };
            let readers = (0..6).map(|_| {
                let img = s.img.clone();
                tokio::spawn(async move { img.read_at(off, IoBufMut::zeroed(len)).await.unwrap() })
            });
            for r in join_all(readers).await {
                let got = r.unwrap();
                let was_old = got[..] == old[off as usize..off as usize + len];
                // A read that spans several clusters may see some clusters before and some after
                // the write; each cluster's part must be whole.
                if !was_old && got[..] != new[..] {
                    let mut pos = 0usize;
                    while pos < len {
                        let abs = off as usize + pos;
                        let n = (65536 - abs % 65536).min(len - pos);
                        let part = &got[pos..pos + n];
                        assert!(
                            part == &old[abs..abs + n] || part == &new[pos..pos + n],
                            "round {round}: torn read at {abs}"
                        );
                        pos += n;
                    }
                }
            }
            w.await.unwrap();
            // Zeroes racing reads.
            let z = {
                let img = s.img.clone();
                tokio::spawn(async move {
                    img.zero_range(off, len as u64, ZeroFlags::default())
                        .await
                        .unwrap()
                })
            };
            let r = s.img.read_at(off, IoBufMut::zeroed(len)).await.unwrap();
            z.await.unwrap();
            let mut pos = 0usize;
            while pos < len {
                let abs = off as usize + pos;
                let n = (65536 - abs % 65536).min(len - pos);
                let part = &r[pos..pos + n];
                assert!(part == &new[pos..pos + n] || part.iter().all(|&b| b == 0));
                pos += n;
            }
        }
        close_and_check(s).await;
    });
}

/// A mixed storm: writes, zero writes, discards, flushes and reads from many tasks on disjoint
/// regions, then a final comparison with the model.
#[test]
fn mixed_storm_on_disjoint_regions() {
    rt().block_on(async {
        let cs = 4096u64;
        let s = setup(12, 16 << 20, false, true).await;
        let regions = 16u64;
        let region = (16 << 20) / regions;
        let tasks = (0..regions).map(|t| {
            let img = s.img.clone();
            async move {
                let mut r = fastrand::Rng::with_seed(t);
                let mut model = vec![0u8; region as usize];
                for i in 0..60u64 {
                    let off = r.u64(0..region - 1);
                    let len = r.u64(1..=(3 * cs).min(region - off));
                    let abs = t * region + off;
                    match r.u8(0..10) {
                        0..=5 => {
                            let d = pattern(t * 1000 + i, len as usize);
                            img.write_at(abs, IoBuf::copy_from(&d)).await.unwrap();
                            model[off as usize..(off + len) as usize].copy_from_slice(&d);
                        }
                        6 => {
                            img.zero_range(
                                abs,
                                len,
                                ZeroFlags {
                                    may_unmap: r.bool(),
                                    fast_only: false,
                                },
                            )
                            .await
                            .unwrap();
                            model[off as usize..(off + len) as usize].fill(0);
                        }
                        7 => {
                            img.discard_range(abs, len).await.unwrap();
                            let a = abs.next_multiple_of(cs);
                            let b = (abs + len) / cs * cs;
                            if a < b {
                                model[(a - t * region) as usize..(b - t * region) as usize].fill(0);
                            }
                        }
                        8 => img.flush().await.unwrap(),
                        _ => {
                            let got = img
                                .read_at(abs, IoBufMut::zeroed(len as usize))
                                .await
                                .unwrap();
                            assert!(got[..] == model[off as usize..(off + len) as usize]);
                        }
                    }
                }
                model
            }
        });
        let models = join_all(tasks).await;
        let all = s.img.read_at(0, IoBufMut::zeroed(16 << 20)).await.unwrap();
        for (t, m) in models.iter().enumerate() {
            let a = t * region as usize;
            assert!(all[a..a + region as usize] == m[..], "region {t} differs");
        }
        close_and_check(s).await;
    });
}

#[test]
fn handle_and_futures_are_send_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    fn assert_send<T: Send>(_: &T) {}
    assert_send_sync::<Qcow2>();
    assert_send_sync::<Arc<dyn BlockDevice>>();
    rt().block_on(async {
        let s = setup(16, 1 << 20, false, false).await;
        let f = s.img.write_at(0, IoBuf::copy_from(b"x"));
        assert_send(&f);
        f.await.unwrap();
        let f = s.img.read_at(0, IoBufMut::zeroed(1));
        assert_send(&f);
        f.await.unwrap();
        close_and_check(s).await;
    });
}

/// Reads served from a thread's private copy of a hot L2 slice (`l2view`) must see every change
/// made since: writes that allocate, zero writes, discards, made on the same thread and on others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_slice_copies_never_serve_stale_mappings() {
    let s = setup(16, 64 << 20, false, false).await;
    let img = s.img.clone();
    let cs = 64usize << 10;
    let first_byte = |off: u64| {
        let img = img.clone();
        async move { img.read(off, IoBufMut::zeroed(4096)).await.unwrap()[0] }
    };
    img.write_at(0, IoBuf::copy_from(&vec![1u8; cs]))
        .await
        .unwrap();
    let mut model = [0u8; 9];
    model[0] = 1;
    for round in 0..60u8 {
        let i = round as usize % 8 + 1;
        let c = (i * cs) as u64;
        // Settle: this task reads the slice again and again (its thread makes a copy).
        for _ in 0..4 {
            assert_eq!(first_byte(0).await, 1);
            assert_eq!(
                first_byte(c).await,
                model[i],
                "round {round}: before the change"
            );
        }
        let v = round.wrapping_add(2);
        match round % 4 {
            0 | 1 => img
                .write_at(c, IoBuf::copy_from(&vec![v; cs]))
                .await
                .unwrap(),
            2 => img
                .write_zeroes(c, cs as u64, ZeroFlags::default())
                .await
                .unwrap(),
            _ => img.discard(c, cs as u64).await.unwrap(),
        }
        model[i] = if round % 4 < 2 { v } else { 0 };
        assert_eq!(
            first_byte(c).await,
            model[i],
            "round {round}: same task after the change"
        );
        // Another task (likely on the other thread) sees it too.
        let other = tokio::spawn({
            let img = img.clone();
            async move { img.read(c, IoBufMut::zeroed(4096)).await.unwrap()[0] }
        });
        assert_eq!(
            other.await.unwrap(),
            model[i],
            "round {round}: another task"
        );
    }
    close_and_check(s).await;
}
