//! Untrusted images: random damage to the metadata of valid images must never make qimg panic,
//! hang, or allocate without bound. Errors are fine; the process must survive every operation
//! (open read-only and read-write, read everything, map, check, write, flush, close).

mod common;

use common::*;
use qimg::block::{BlockDevice, CacheMode};
use qimg::qcow2::{Qcow2, Qcow2Options};
use qimg::storage::memory::MemoryStorage;
use qimg::storage::StorageRef;
use qimg::{IoBuf, IoBufMut};
use std::sync::Arc;
use std::time::Duration;

fn seed_images() -> Vec<Vec<u8>> {
    let dir = tempfile::tempdir().unwrap();
    let mut out = Vec::new();
    let p = dir.path().join("a.qcow2");
    qemu_create(&p, "cluster_size=4096", 4 << 20, &[]);
    qemu_io(
        &p,
        "qcow2",
        &["write -P 1 0 300k".into(), "write -z 1M 8k".into()],
    );
    let o = run("qemu-img", &["snapshot", "-c", "s", p.to_str().unwrap()]);
    assert!(o.status.success());
    qemu_io(&p, "qcow2", &["write -P 2 4k 8k".into()]);
    out.push(std::fs::read(&p).unwrap());
    let raw = dir.path().join("r.raw");
    std::fs::write(&raw, pattern(1, 256 << 10)).unwrap();
    let c = dir.path().join("c.qcow2");
    let o = run(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4096",
            raw.to_str().unwrap(),
            c.to_str().unwrap(),
        ],
    );
    assert!(o.status.success());
    out.push(std::fs::read(&c).unwrap());
    let v2 = dir.path().join("v2.qcow2");
    qemu_create(&v2, "cluster_size=512,compat=0.10", 1 << 20, &[]);
    qemu_io(&v2, "qcow2", &["write -P 3 0 100k".into()]);
    out.push(std::fs::read(&v2).unwrap());
    out
}

async fn exercise(bytes: Vec<u8>) {
    // Read-only: open, read all, map, check.
    let storage: StorageRef = Arc::new(MemoryStorage::from_bytes(&bytes));
    if let Ok(img) = open_read_only(storage, "h").await {
        let size = img.virtual_size().min(64 << 20);
        let _ = img.read_at(0, IoBufMut::zeroed(size as usize)).await;
        let mut off = 0;
        while off < size {
            match img.block_status(off, size - off).await {
                Ok(st) => off += st.len.max(1),
                Err(_) => break,
            }
        }
        let _ = img.check().await;
        let _ = img.close().await;
    }
    // Read-write: write, zero, discard, flush, close.
    let storage: StorageRef = Arc::new(MemoryStorage::from_bytes(&bytes));
    if let Ok(img) = Qcow2::open(
        storage,
        "h".into(),
        &Qcow2Options::default(),
        false,
        CacheMode::Writeback,
    )
    .await
    {
        let size = img.virtual_size();
        if size > 70_000 {
            let _ = img.write_at(5000, IoBuf::copy_from(&[7u8; 60_000])).await;
            let _ = img.discard_range(0, 65536).await;
            let _ = img
                .zero_range(
                    4096,
                    8192,
                    qimg::ZeroFlags {
                        may_unmap: true,
                        fast_only: false,
                    },
                )
                .await;
            let _ = img
                .write_at(size - 4096, IoBuf::copy_from(&[8u8; 4096]))
                .await;
        }
        let _ = img.flush().await;
        let _ = img.close().await;
    }
}

#[test]
fn damaged_metadata_never_panics_or_hangs() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let seeds = seed_images();
    let rounds: u64 = std::env::var("HOSTILE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    for round in 0..rounds {
        let mut r = fastrand::Rng::with_seed(round);
        let mut img = seeds[(round % seeds.len() as u64) as usize].clone();
        // Damage a few bytes of the metadata area (header, tables; first clusters).
        let meta = img.len().min(12 * 4096);
        for _ in 0..r.usize(1..8) {
            let pos = if r.bool() {
                r.usize(0..128)
            } else {
                r.usize(0..meta)
            };
            img[pos] = match r.u8(0..4) {
                0 => 0,
                1 => 0xff,
                2 => img[pos] ^ (1 << r.u8(0..8)),
                _ => r.u8(..),
            };
        }
        let done = rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(20), exercise(img)).await });
        assert!(
            done.is_ok(),
            "round {round}: operations on a damaged image hung"
        );
    }
}

/// Findings of the `image` fuzz target, replayed exactly as the fuzzer ran them
/// (`qimg::fuzzing::exercise_image`, the target's body). Each must finish quickly.
#[test]
fn fuzz_findings_finish_in_bounded_time() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/fuzz");
    let mut seen = 0;
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    for path in paths {
        let data = std::fs::read(&path).unwrap();
        let started = std::time::Instant::now();
        qimg::fuzzing::exercise_image(&data);
        let took = started.elapsed();
        eprintln!("{}: {took:?}", path.display());
        assert!(
            took < Duration::from_secs(3),
            "{}: took {took:?}",
            path.display()
        );
        seen += 1;
    }
    assert!(seen > 0, "no fuzz findings found in {}", dir.display());
    // Memory, too: the fuzzer's limit was 2 GiB; here every finding stays far below it.
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    assert!(peak_kib < 1 << 20, "peak RSS {peak_kib} KiB");
}

/// Runs `qimg check` in an address space of 1 GiB and returns its exit code and output.
fn check_in_one_gib(p: &std::path::Path) -> (Option<i32>, String) {
    let started = std::time::Instant::now();
    let o = std::process::Command::new("bash")
        .args([
            "-c",
            "ulimit -v 1048576 && exec \"$0\" check \"$1\"",
            env!("CARGO_BIN_EXE_qimg"),
            p.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(20), "check took {took:?}");
    (o.status.code(), text(&o))
}

/// `check`'s memory follows the clusters an image references, not its file length: a file made
/// huge and sparse (1 TiB of 1 KiB clusters: a billion clusters) is checked within 1 GiB of
/// address space, with the result qemu-img gives. Before, a per-cluster array of 4 GiB was
/// allocated up front.
#[test]
fn check_memory_follows_referenced_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let sparse = dir.path().join("sparse.qcow2");
    qemu_create(&sparse, "cluster_size=1024", 4 << 20, &[]);
    qemu_io(&sparse, "qcow2", &["write -P 7 0 64k".into()]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&sparse)
        .unwrap()
        .set_len(1 << 40)
        .unwrap();
    let (code, out) = check_in_one_gib(&sparse);
    assert_eq!(code, Some(0), "{out}");
    let q = run("qemu-img", &["check", sparse.to_str().unwrap()]);
    assert_eq!(out, text(&q));
}
