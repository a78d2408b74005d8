//! Crash safety of internal snapshots on the power-loss simulator: the power goes before a
//! sample of the storage operations of a snapshot create, apply or delete, keeping none, all, or
//! a torn subset of the unflushed writes. Then:
//! - nothing the guest wrote is lost: the active disk reads as before (apply: as before or as the
//!   snapshot), every listed snapshot reads as it did, and the snapshot list is the old or the
//!   new one;
//! - `qemu-img check` finds nothing worse than leaks and COPIED flags that disagree with a
//!   refcount in the safe direction (the format cannot change a refcount and a flag in one
//!   write; see `qcow2::snapshot_refs`), and `qemu-img check -r all` leaves it clean.

mod common;

use common::*;
use qimg::qcow2::snapshot::SnapshotInfo;
use qimg::qcow2::{create, CreateOptions, Preallocation, Qcow2};
use qimg::storage::crash::{CrashPolicy, CrashStorage};
use qimg::storage::memory::MemoryStorage;
use qimg::IoBuf;
use std::path::Path;
use std::sync::Arc;

/// An image of `size` bytes in `cs`-byte clusters: data, a snapshot "old", more data.
fn prepared(rt: &tokio::runtime::Runtime, size: u64, cs: u64, prealloc: bool) -> MemoryStorage {
    rt.block_on(async {
        let mem = Arc::new(MemoryStorage::new());
        let opts = CreateOptions {
            size,
            cluster_size: cs,
            preallocation: if prealloc {
                Preallocation::Metadata
            } else {
                Preallocation::Off
            },
            ..Default::default()
        };
        create(mem.clone(), &opts).await.unwrap();
        let q = open_rw(mem.clone()).await.unwrap();
        let mut r = fastrand::Rng::with_seed(size ^ cs);
        for round in 0..2 {
            for i in 0..30 {
                let off = r.u64(0..size / 512) * 512;
                let len = (r.u64(1..64) * 512).min(size - off);
                let data = pattern(round * 1000 + i, len as usize);
                q.write_at(off, IoBuf::copy_from(&data)).await.unwrap();
            }
            if round == 0 {
                q.snapshot_create(&SnapshotInfo::now("old")).await.unwrap();
            }
        }
        q.close().await.unwrap();
        mem.snapshot()
    })
}

/// Snapshot names and the content of the active disk and of every snapshot (by QEMU).
fn state(p: &Path) -> Result<(Vec<String>, Vec<Vec<u8>>), String> {
    let o = run("qemu-img", &["info", "--output=json", p.to_str().unwrap()]);
    if !o.status.success() {
        return Err(format!("info: {}", text(&o)));
    }
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).map_err(|e| e.to_string())?;
    let ids: Vec<(String, String)> = v["snapshots"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    (
                        s["id"].as_str().unwrap_or("").to_string(),
                        s["name"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let raw = p.with_extension("raw");
    let mut views = Vec::new();
    for sel in std::iter::once(None).chain(ids.iter().map(|s| Some(s.0.clone()))) {
        let mut args = vec!["convert", "-O", "raw"];
        let l;
        if let Some(id) = &sel {
            l = format!("snapshot.id={id}");
            args.extend(["-l", &l]);
        }
        args.extend([p.to_str().unwrap(), raw.to_str().unwrap()]);
        let o = run("qemu-img", &args);
        if !o.status.success() {
            return Err(format!("convert {sel:?}: {}", text(&o)));
        }
        views.push(std::fs::read(&raw).map_err(|e| e.to_string())?);
    }
    Ok((ids.into_iter().map(|x| x.1).collect(), views))
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Create,
    Apply,
    Delete,
}

async fn do_op(q: &Qcow2, op: Op) -> qimg::Result<()> {
    match op {
        Op::Create => q
            .snapshot_create(&SnapshotInfo::now("new"))
            .await
            .map(|_| ()),
        Op::Apply => q.snapshot_apply("old").await,
        Op::Delete => q.snapshot_delete("1").await,
    }
}

fn survives_power_loss(op: Op, size: u64, cluster: u64, prealloc: bool, points: u64) {
    let cs = cluster;
    let rt = rt();
    let img = prepared(&rt, size, cluster, prealloc);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    std::fs::write(&path, img.to_vec()).unwrap();
    let (names0, views0) = state(&path).unwrap();
    assert_eq!(names0, ["old"]);

    let run_op = |storage: Arc<CrashStorage>| {
        rt.block_on(async {
            let Some(q) = open_rw(storage).await else {
                return;
            };
            if do_op(&q, op).await.is_ok() {
                let _ = q.close().await;
            }
        })
    };
    let dry = Arc::new(CrashStorage::new(&img));
    run_op(dry.clone());
    std::fs::write(&path, dry.current().to_vec()).unwrap();
    qemu_check_clean(&path);
    let (names1, views1) = state(&path).unwrap();
    // The finished operation did what it says.
    match op {
        Op::Create => {
            assert_eq!(names1, ["old", "new"]);
            assert!(views1[0] == views0[0] && views1[2] == views0[0] && views1[1] == views0[1]);
        }
        Op::Apply => {
            assert_eq!(names1, ["old"]);
            assert!(views1[0] == views0[1] && views1[1] == views0[1]);
        }
        Op::Delete => {
            assert!(names1.is_empty());
            assert!(views1[0] == views0[0]);
        }
    }

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
                let (names, views) = state(&path)?;
                let expect_ok = match op {
                    Op::Create => {
                        views[0] == views0[0]
                            && views[1] == views0[1]
                            && (names == names0 || (names == names1 && views[2] == views0[0]))
                    }
                    Op::Apply => {
                        names == names0
                            && views[1] == views0[1]
                            && (views[0] == views0[0] || views[0] == views0[1])
                    }
                    Op::Delete => {
                        views[0] == views0[0]
                            && (names == names1 || (names == names0 && views[1] == views0[1]))
                    }
                };
                if expect_ok {
                    Ok(())
                } else {
                    Err(format!(
                        "the guest's data changed (snapshots now {names:?})"
                    ))
                }
            });
            if let Err(e) = verdict {
                failures.push(format!(
                    "{op:?}: crash before op {k}/{total} policy {i}: {e}"
                ));
            }
        }
        k += step;
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn create_survives_power_loss() {
    survives_power_loss(Op::Create, 2 << 20, 4096, false, 40);
}

#[test]
fn apply_survives_power_loss() {
    survives_power_loss(Op::Apply, 2 << 20, 4096, false, 40);
}

#[test]
fn delete_survives_power_loss() {
    survives_power_loss(Op::Delete, 2 << 20, 4096, false, 40);
}

/// Many L2 tables, preallocated: the sharing walk goes in several batches.
#[test]
fn create_survives_power_loss_across_batches() {
    survives_power_loss(Op::Create, 12 << 20, 512, true, 8);
}
