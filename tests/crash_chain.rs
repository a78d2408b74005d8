//! Crash safety of `rebase` and `commit` on the power-loss simulator: the power goes before
//! every storage operation of the command (or a sample of them), keeping none, all, or a torn
//! subset of the unflushed writes. Then `qemu-img check` must find no corruption, and what the
//! guest reads must be what it read before the command:
//! - rebase: the header names the old or the new backing file, and the image reads the same
//!   through whichever it names;
//! - commit, power lost in the base: the overlay is untouched and still reads the same over the
//!   half-written base;
//! - commit, power lost in the overlay while it is emptied: the base (complete and flushed by
//!   then) reads as the overlay did, and so does the overlay over it.

mod common;

use common::*;
use qimg::block::{BlockDevice, CacheMode};
use qimg::chain::{commit, rebase, CommitOptions};
use qimg::qcow2::{create, CreateOptions, Qcow2, Qcow2Options};
use qimg::storage::crash::{CrashPolicy, CrashStorage};
use qimg::storage::memory::MemoryStorage;
use qimg::storage::StorageRef;
use qimg::IoBuf;
use std::path::Path;
use std::sync::Arc;

const SIZE: u64 = 2 << 20;
const CS: u64 = 4096;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn raw_device(data: &[u8]) -> Arc<dyn BlockDevice> {
    let mem: StorageRef = Arc::new(MemoryStorage::from_bytes(data));
    Arc::new(qimg::raw::Raw::with_storage(mem, data.len() as u64, true))
}

async fn new_qcow2(backing: Option<(&str, &str)>) -> MemoryStorage {
    let mem = Arc::new(MemoryStorage::new());
    let opts = CreateOptions {
        size: SIZE,
        cluster_size: CS,
        backing_file: backing.map(|b| b.0.to_string()),
        backing_format: backing.map(|b| b.1.to_string()),
        ..Default::default()
    };
    create(mem.clone(), &opts).await.unwrap();
    mem.snapshot()
}

async fn open_rw(storage: StorageRef, name: &str) -> Option<Arc<Qcow2>> {
    Qcow2::open(
        storage,
        name.into(),
        &Qcow2Options::default(),
        false,
        CacheMode::Writeback,
    )
    .await
    .ok()
    .map(Arc::new)
}

/// Writes `n` scattered pieces of a pattern into `img` and closes it.
async fn scatter(
    storage: MemoryStorage,
    backing: Option<Arc<dyn BlockDevice>>,
    seed: u64,
    n: usize,
) -> MemoryStorage {
    let shared = Arc::new(storage);
    let q = open_rw(shared.clone(), "w").await.unwrap();
    if let Some(b) = backing {
        q.set_backing(b);
    }
    let mut r = fastrand::Rng::with_seed(seed);
    for i in 0..n {
        let off = r.u64(0..SIZE / 512) * 512;
        let len = (r.u64(1..40) * 512).min(SIZE - off);
        q.write_at(
            off,
            IoBuf::copy_from(&pattern(seed * 100 + i as u64, len as usize)),
        )
        .await
        .unwrap();
    }
    q.close().await.unwrap();
    shared.snapshot()
}

/// The guest's view of `name` in `dir` through the chain its header names.
fn view(dir: &Path, name: &str) -> Vec<u8> {
    let out = dir.join("view.raw");
    let o = run(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            dir.join(name).to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "convert {name}: {}", text(&o));
    let v = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    v
}

fn check_ok(p: &Path, what: &str) -> Result<(), String> {
    let (code, corruptions, _leaks, out) = qemu_check(p);
    if corruptions > 0 || !(code == 0 || code == 3) {
        return Err(format!("{what}: qemu-img check rc={code}:\n{out}"));
    }
    Ok(())
}

const POLICIES: usize = 3;

fn policy(i: usize, k: u64) -> CrashPolicy {
    match i {
        0 => CrashPolicy::KeepNone,
        1 => CrashPolicy::KeepAll,
        _ => CrashPolicy::Random(k * 7919 + 13),
    }
}

/// Runs `attempt(k, policy)` for a sample of crash points `k` over the `total` operations of
/// the command, collecting failures.
fn everywhere(
    total: u64,
    max_points: u64,
    mut attempt: impl FnMut(u64, CrashPolicy) -> Result<(), String>,
) {
    assert!(total > 0, "the command did no storage operation");
    let step = (total / max_points).max(1);
    let mut failures = Vec::new();
    let mut k = 1;
    while k <= total + 1 && failures.len() < 4 {
        for i in 0..POLICIES {
            if let Err(e) = attempt(k, policy(i, k)) {
                failures.push(format!("crash before op {k}/{total} policy {i}: {e}"));
            }
        }
        k += step;
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn rebase_survives_power_loss_anywhere() {
    let rt = rt();
    let old = pattern(1, SIZE as usize);
    // The new backing file agrees with the old one except in a few places, and is shorter.
    let mut new = old[..(SIZE - 256 * 1024) as usize].to_vec();
    for (i, at) in [0u64, 300 << 10, 1100 << 10, 1500 << 10].iter().enumerate() {
        let at = *at as usize;
        new[at..at + 40_000].copy_from_slice(&pattern(50 + i as u64, 40_000));
    }
    let img = rt.block_on(async {
        let fresh = new_qcow2(Some(("old.raw", "raw"))).await;
        scatter(fresh, Some(raw_device(&old)), 7, 30).await
    });
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("old.raw"), &old).unwrap();
    std::fs::write(dir.path().join("new.raw"), &new).unwrap();
    std::fs::write(dir.path().join("img.qcow2"), img.to_vec()).unwrap();
    let before = view(dir.path(), "img.qcow2");

    let run_rebase = |cs: Arc<CrashStorage>| {
        rt.block_on(async {
            let Some(q) = open_rw(cs, "img.qcow2").await else {
                return;
            };
            q.set_backing(raw_device(&old));
            let dev: Arc<dyn BlockDevice> = q;
            let newdev = raw_device(&new);
            let _ = rebase(
                &dev,
                Some(&newdev),
                Some("new.raw"),
                Some("raw"),
                false,
                &|_| {},
            )
            .await;
        })
    };
    let dry = Arc::new(CrashStorage::new(&img));
    run_rebase(dry.clone());
    // The finished rebase names the new file and reads the same.
    std::fs::write(dir.path().join("img.qcow2"), dry.current().to_vec()).unwrap();
    check_ok(&dir.path().join("img.qcow2"), "finished").unwrap();
    assert!(
        view(dir.path(), "img.qcow2") == before,
        "the finished rebase changed the view"
    );
    let info = text(&run(
        "qemu-img",
        &["info", dir.path().join("img.qcow2").to_str().unwrap()],
    ));
    assert!(info.contains("backing file: new.raw"), "{info}");

    everywhere(dry.ops(), 60, |k, p| {
        let cs = Arc::new(CrashStorage::new(&img));
        cs.arm(k, p);
        run_rebase(cs.clone());
        let crashed = cs.captured().unwrap_or_else(|| cs.crash_now(p));
        let path = dir.path().join("img.qcow2");
        std::fs::write(&path, crashed.to_vec()).unwrap();
        check_ok(&path, "rebase")?;
        let info = text(&run("qemu-img", &["info", path.to_str().unwrap()]));
        if !info.contains("backing file: old.raw") && !info.contains("backing file: new.raw") {
            return Err(format!("names neither backing file:\n{info}"));
        }
        if view(dir.path(), "img.qcow2") != before {
            return Err("the guest's view changed".into());
        }
        Ok(())
    });
}

/// A base with data and an overlay with more, both qcow2.
fn commit_chain(rt: &tokio::runtime::Runtime) -> (MemoryStorage, MemoryStorage) {
    rt.block_on(async {
        let base = scatter(new_qcow2(None).await, None, 3, 20).await;
        let top = new_qcow2(Some(("base.qcow2", "qcow2"))).await;
        let base_dev = open_rw(Arc::new(base.snapshot()), "base").await.unwrap();
        let top = scatter(top, Some(base_dev), 4, 40).await;
        (base, top)
    })
}

/// Commits `top` into `base`, each on its own storage; errors (the simulated power loss) end it.
/// Returns whether the commit itself succeeded (closing the images comes after).
fn run_commit(rt: &tokio::runtime::Runtime, base: StorageRef, top: StorageRef) -> bool {
    rt.block_on(async {
        let (Some(b), Some(t)) = (
            open_rw(base, "base.qcow2").await,
            open_rw(top, "top.qcow2").await,
        ) else {
            return false;
        };
        t.set_backing(b.clone());
        let dev: Arc<dyn BlockDevice> = t.clone();
        let opts = CommitOptions {
            empty_top: true,
            rate: None,
        };
        if commit(&dev, 1, opts, &|_| {}).await.is_err() {
            return false;
        }
        let _ = t.close().await;
        let _ = b.close().await;
        true
    })
}

#[test]
fn commit_survives_power_loss_in_the_base() {
    let rt = rt();
    let (base, top) = commit_chain(&rt);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("base.qcow2"), base.to_vec()).unwrap();
    std::fs::write(dir.path().join("top.qcow2"), top.to_vec()).unwrap();
    let before = view(dir.path(), "top.qcow2");

    let dry = Arc::new(CrashStorage::new(&base));
    let dry_top = Arc::new(top.snapshot());
    run_commit(&rt, dry.clone(), dry_top.clone());
    // Finished: the base reads as the overlay did, the overlay is empty and reads the same.
    std::fs::write(dir.path().join("base.qcow2"), dry.current().to_vec()).unwrap();
    std::fs::write(dir.path().join("top.qcow2"), dry_top.to_vec()).unwrap();
    check_ok(&dir.path().join("base.qcow2"), "finished base").unwrap();
    check_ok(&dir.path().join("top.qcow2"), "finished top").unwrap();
    assert!(view(dir.path(), "base.qcow2") == before);
    assert!(view(dir.path(), "top.qcow2") == before);

    // Power lost in the base: the overlay never got to its turn.
    everywhere(dry.ops(), 60, |k, p| {
        let cs = Arc::new(CrashStorage::new(&base));
        cs.arm(k, p);
        let t = Arc::new(top.snapshot());
        let committed = run_commit(&rt, cs.clone(), t.clone());
        let crashed = cs.captured().unwrap_or_else(|| cs.crash_now(p));
        if !committed && t.to_vec() != top.to_vec() {
            return Err("the overlay changed although the commit failed".into());
        }
        std::fs::write(dir.path().join("base.qcow2"), crashed.to_vec()).unwrap();
        std::fs::write(dir.path().join("top.qcow2"), t.to_vec()).unwrap();
        check_ok(&dir.path().join("base.qcow2"), "base")?;
        check_ok(&dir.path().join("top.qcow2"), "top")?;
        if view(dir.path(), "top.qcow2") != before {
            return Err("the overlay's view changed".into());
        }
        Ok(())
    });
}

#[test]
fn commit_survives_power_loss_in_the_overlay() {
    let rt = rt();
    let (base, top) = commit_chain(&rt);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("base.qcow2"), base.to_vec()).unwrap();
    std::fs::write(dir.path().join("top.qcow2"), top.to_vec()).unwrap();
    let before = view(dir.path(), "top.qcow2");

    let dry = Arc::new(CrashStorage::new(&top));
    run_commit(&rt, Arc::new(base.snapshot()), dry.clone());
    // Power lost in the overlay: the base is complete (it was flushed before the overlay was
    // touched, and the simulated power loss is only the overlay's).
    everywhere(dry.ops(), 60, |k, p| {
        let cs = Arc::new(CrashStorage::new(&top));
        cs.arm(k, p);
        let b = Arc::new(base.snapshot());
        run_commit(&rt, b.clone(), cs.clone());
        let crashed = cs.captured().unwrap_or_else(|| cs.crash_now(p));
        std::fs::write(dir.path().join("base.qcow2"), b.to_vec()).unwrap();
        std::fs::write(dir.path().join("top.qcow2"), crashed.to_vec()).unwrap();
        check_ok(&dir.path().join("base.qcow2"), "base")?;
        check_ok(&dir.path().join("top.qcow2"), "top")?;
        if view(dir.path(), "top.qcow2") != before {
            return Err("the overlay's view changed".into());
        }
        Ok(())
    });
}
