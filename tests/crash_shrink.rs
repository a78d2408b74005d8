//! Crash safety of shrinking on the power-loss simulator: the power goes before a sample of the
//! storage operations of a shrink (crop, L1 entries, refcount blocks dropped, file truncated,
//! header), keeping none, all, or a torn subset of the unflushed writes. Then:
//! - `qemu-img check` finds nothing worse than leaks, and `check -r all` leaves it clean;
//! - the disk is at the old size or the new one, reads as before up to the new end, and past it
//!   (old size only) each sector reads as before or as zeros: nothing else can appear.

mod common;

use common::*;
use qimg::qcow2::{create, CreateOptions, Preallocation};
use qimg::storage::crash::{CrashPolicy, CrashStorage};
use qimg::storage::memory::MemoryStorage;
use qimg::IoBuf;
use std::path::Path;
use std::sync::Arc;

fn prepared(rt: &tokio::runtime::Runtime, size: u64, cs: u64, refcount_bits: u32) -> MemoryStorage {
    rt.block_on(async {
        let mem = Arc::new(MemoryStorage::new());
        let opts = CreateOptions {
            size,
            cluster_size: cs,
            refcount_bits,
            preallocation: Preallocation::Off,
            ..Default::default()
        };
        create(mem.clone(), &opts).await.unwrap();
        let q = open_rw(mem.clone()).await.unwrap();
        let mut r = fastrand::Rng::with_seed(size ^ cs);
        for i in 0..80 {
            let off = r.u64(0..size / 512) * 512;
            let len = (r.u64(1..64) * 512).min(size - off);
            q.write_at(off, IoBuf::copy_from(&pattern(i, len as usize)))
                .await
                .unwrap();
        }
        q.close().await.unwrap();
        mem.snapshot()
    })
}

fn view(p: &Path) -> Result<Vec<u8>, String> {
    let raw = p.with_extension("raw");
    let o = run(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            p.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    if !o.status.success() {
        return Err(format!("convert: {}", text(&o)));
    }
    std::fs::read(&raw).map_err(|e| e.to_string())
}

fn survives_power_loss(size: u64, cs: u64, refcount_bits: u32, new_size: u64, points: u64) {
    let rt = rt();
    let img = prepared(&rt, size, cs, refcount_bits);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    std::fs::write(&path, img.to_vec()).unwrap();
    let before = view(&path).unwrap();

    let run_op = |storage: Arc<CrashStorage>| {
        rt.block_on(async {
            let Some(q) = open_rw(storage).await else {
                return;
            };
            if q.resize(new_size, Preallocation::Off).await.is_ok() {
                let _ = q.close().await;
            }
        })
    };
    let dry = Arc::new(CrashStorage::new(&img));
    run_op(dry.clone());
    std::fs::write(&path, dry.current().to_vec()).unwrap();
    qemu_check_clean(&path);
    assert!(view(&path).unwrap() == before[..new_size as usize]);
    assert!(
        (dry.current().to_vec().len() as u64) < img.to_vec().len() as u64,
        "the file did not get shorter"
    );

    let total = dry.ops();
    let step = (total / points).max(1);
    let mut failures = Vec::new();
    let mut k = 1;
    while k <= total + 1 && failures.len() < 4 {
        for (i, p) in [
            CrashPolicy::KeepNone,
            CrashPolicy::KeepAll,
            CrashPolicy::Random(k * 7919 + 13),
        ]
        .into_iter()
        .enumerate()
        {
            let st = Arc::new(CrashStorage::new(&img));
            st.arm(k, p);
            run_op(st.clone());
            let crashed = st.captured().unwrap_or_else(|| st.crash_now(p));
            std::fs::write(&path, crashed.to_vec()).unwrap();
            let verdict = check_after_crash(&path, cs).and_then(|()| {
                let v = view(&path)?;
                let n = new_size as usize;
                if v.len() != n && v.len() != before.len() {
                    return Err(format!("size {}", v.len()));
                }
                if v[..n] != before[..n] {
                    return Err("data before the new end changed".into());
                }
                let tail_ok = v[n..]
                    .chunks(512)
                    .zip(before[n..].chunks(512))
                    .all(|(a, b)| a == b || a.iter().all(|&x| x == 0));
                if !tail_ok {
                    return Err("the cut area reads something it never held".into());
                }
                Ok(())
            });
            if let Err(e) = verdict {
                failures.push(format!("crash before op {k}/{total} policy {i}: {e}"));
            }
        }
        k += step;
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// 512-byte clusters with 64-bit refcounts: refcount blocks are dropped from the table.
#[test]
fn shrink_survives_power_loss_small_clusters() {
    survives_power_loss(2 << 20, 512, 64, (256 << 10) + 1024, 40);
}

/// Default clusters, an unaligned new end (the new last cluster's tail is zeroed).
#[test]
fn shrink_survives_power_loss_unaligned() {
    survives_power_loss(8 << 20, 65536, 16, (3 << 20) + 4608, 40);
}
