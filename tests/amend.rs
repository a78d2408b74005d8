//! `qimg amend` against `qemu-img amend`: the same option strings on copies of the same images
//! (version 3 with a backing file, zero clusters and a snapshot; version 2; preallocated), then
//! the same exit code and messages, the same content (active disk and snapshot), the same
//! version, refcount width, lazy refcounts and size, and `qemu-img check` clean on ours. And
//! the version downgrade and the refcount width change on the power-loss simulator.

mod common;

use common::*;
use qimg::block::CacheMode;
use qimg::qcow2::{Qcow2, Qcow2Options};
use qimg::storage::crash::{CrashPolicy, CrashStorage};
use qimg::storage::memory::MemoryStorage;
use std::path::Path;

use std::sync::Arc;

const QIMG: &str = env!("CARGO_BIN_EXE_qimg");

fn info_fields(p: &Path) -> String {
    let o = run("qemu-img", &["info", p.to_str().unwrap()]);
    text(&o)
        .lines()
        .filter(|l| {
            [
                "compat",
                "lazy refcounts",
                "refcount bits",
                "virtual size",
                "backing file",
            ]
            .iter()
            .any(|k| l.trim_start().starts_with(k))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn raw_view(p: &Path, snapshot: Option<&str>) -> Vec<u8> {
    let out = p.with_extension("view");
    let mut args = vec!["convert", "-O", "raw"];
    if let Some(s) = snapshot {
        args.extend(["-l", s]);
    }
    args.extend([p.to_str().unwrap(), out.to_str().unwrap()]);
    let o = run("qemu-img", &args);
    assert!(o.status.success(), "{}", text(&o));
    std::fs::read(out).unwrap()
}

/// The images amended: (file name, whether it has snapshot "s").
fn images(d: &Path) -> Vec<(std::path::PathBuf, bool)> {
    let base = d.join("base.qcow2");
    qemu_create(&base, "", 4 << 20, &[]);
    qemu_io(&base, "qcow2", &["write -P 5 0 4M".into()]);
    let v3 = d.join("v3.qcow2");
    qemu_create(
        &v3,
        "",
        4 << 20,
        &["-b", base.to_str().unwrap(), "-F", "qcow2"],
    );
    qemu_io(
        &v3,
        "qcow2",
        &[
            "write -P 1 0 1M".into(),
            "write -z 1M 512k".into(),
            "write -z -u 2M 256k".into(),
            "write -P 2 3M 64k".into(),
            "write -z 3M 64k".into(),
        ],
    );
    assert!(
        run("qemu-img", &["snapshot", "-c", "s", v3.to_str().unwrap()])
            .status
            .success()
    );
    qemu_io(
        &v3,
        "qcow2",
        &["write -z 0 64k".into(), "write -P 3 128k 64k".into()],
    );
    let v2 = d.join("v2.qcow2");
    qemu_create(&v2, "compat=0.10,cluster_size=4k", 4 << 20, &[]);
    qemu_io(&v2, "qcow2", &["write -P 9 0 3M".into()]);
    let pre = d.join("pre.qcow2");
    qemu_create(
        &pre,
        "preallocation=metadata,cluster_size=512",
        2 << 20,
        &[],
    );
    qemu_io(
        &pre,
        "qcow2",
        &["write -P 7 4k 100k".into(), "write -z 512k 64k".into()],
    );
    // Version 2 with a snapshot: resizable only after an upgrade in the same amend.
    let v2s = d.join("v2s.qcow2");
    qemu_create(&v2s, "compat=0.10", 4 << 20, &[]);
    qemu_io(&v2s, "qcow2", &["write -P 4 1M 1M".into()]);
    assert!(
        run("qemu-img", &["snapshot", "-c", "s", v2s.to_str().unwrap()])
            .status
            .success()
    );
    qemu_io(&v2s, "qcow2", &["write -P 6 1536k 1M".into()]);
    vec![(v3, true), (v2, false), (pre, false), (v2s, true)]
}

#[test]
fn amend_matches_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let options = [
        "compat=0.10",
        "compat=1.1",
        "compat=v3",
        "compat=0.42",
        "lazy_refcounts=on",
        "lazy_refcounts=off",
        "compat=1.1,lazy_refcounts=on",
        "compat=0.10,lazy_refcounts=on",
        "refcount_bits=1",
        "refcount_bits=2",
        "refcount_bits=8",
        "refcount_bits=64",
        "refcount_bits=3",
        "refcount_bits=8,compat=0.10",
        "refcount_bits=16,compat=0.10",
        "compat=1.1,refcount_bits=8,lazy_refcounts=on",
        "size=8M",
        "size=2M",
        "size=3584k",
        "compat=1.1,size=8M",
        "compat=0.10,size=2M",
        "backing_file=base.qcow2",
        "backing_fmt=qcow2",
        "foo=1",
        "cluster_size=4k",
    ];
    for (img, has_snapshot) in images(d) {
        let backing_opt = format!(
            "backing_file={},backing_fmt=qcow2",
            d.join("base.qcow2").to_str().unwrap()
        );
        for o in options.iter().copied().chain([backing_opt.as_str()]) {
            let a = d.join("a.qcow2");
            let b = d.join("b.qcow2");
            std::fs::copy(&img, &a).unwrap();
            std::fs::copy(&img, &b).unwrap();
            let ours = run(QIMG, &["amend", "-o", o, a.to_str().unwrap()]);
            let theirs = run("qemu-img", &["amend", "-o", o, b.to_str().unwrap()]);
            let what = format!("{} -o {o}", img.display());
            assert_eq!(
                ours.status.code(),
                theirs.status.code(),
                "{what}: exit codes; ours: {}; qemu-img: {}",
                text(&ours),
                text(&theirs)
            );
            assert_eq!(
                text(&ours).replace("qimg:", "qemu-img:"),
                text(&theirs),
                "{what}: messages"
            );
            qemu_check_clean(&a);
            assert_eq!(info_fields(&a), info_fields(&b), "{what}: info");
            assert!(raw_view(&a, None) == raw_view(&b, None), "{what}: content");
            if has_snapshot {
                // Compared with the snapshot before the amend, not with qemu-img's result: its
                // downgrade zeroes a preallocated zero cluster that the snapshot reads as data
                // (the active disk zeroed it after the snapshot), and the snapshot loses it.
                // (QEMU reads a snapshot at the disk's current size.)
                let theirs = raw_view(&b, Some("s"));
                let expected = if o.contains("compat=0.10") {
                    let mut before = raw_view(&img, Some("s"));
                    before.resize(theirs.len(), 0);
                    before
                } else {
                    theirs
                };
                assert!(
                    raw_view(&a, Some("s")) == expected,
                    "{what}: snapshot content"
                );
            }
        }
    }
}

/// Downgrading and changing the refcount width survive a power loss anywhere: the image passes
/// `qemu-img check` (leaks at most) and reads as before, at the old or the new version/width.
#[test]
fn amend_survives_power_loss() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (img, _) = images(d).remove(0);
    let bytes = std::fs::read(&img).unwrap();
    let before = raw_view(&img, None);
    let before_snap = raw_view(&img, Some("s"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let backing = d.join("base.qcow2");
    for op in ["downgrade", "refcount width"] {
        let run_op = |storage: Arc<CrashStorage>| {
            rt.block_on(async {
                let Ok(q) = Qcow2::open(
                    storage,
                    "img".into(),
                    &Qcow2Options::default(),
                    false,
                    CacheMode::Writeback,
                )
                .await
                else {
                    return;
                };
                let r = match op {
                    "downgrade" => q.set_version(2).await,
                    _ => q.change_refcount_width(8).await,
                };
                if r.is_ok() {
                    let _ = q.close().await;
                }
            })
        };
        let initial = MemoryStorage::from_bytes(&bytes);
        let dry = Arc::new(CrashStorage::new(&initial));
        run_op(dry.clone());
        let total = dry.ops();
        assert!(total > 0);
        let path = d.join("v3.qcow2");
        let mut failures = Vec::new();
        let step = (total / 30).max(1);
        let mut k = 1;
        while k <= total + 1 && failures.len() < 4 {
            for p in [
                CrashPolicy::KeepNone,
                CrashPolicy::KeepAll,
                CrashPolicy::Random(k * 31 + 7),
            ] {
                let st = Arc::new(CrashStorage::new(&initial));
                st.arm(k, p);
                run_op(st.clone());
                let crashed = st.captured().unwrap_or_else(|| st.crash_now(p));
                std::fs::write(&path, crashed.to_vec()).unwrap();
                let (code, corruptions, _, out) = qemu_check(&path);
                if corruptions > 0 || !(code == 0 || code == 3) {
                    failures.push(format!("{op}, crash before op {k}/{total} {p:?}: {out}"));
                    continue;
                }
                if raw_view(&path, None) != before || raw_view(&path, Some("s")) != before_snap {
                    failures.push(format!(
                        "{op}, crash before op {k}/{total} {p:?}: data changed"
                    ));
                }
            }
            k += step;
        }
        std::fs::write(&path, &bytes).unwrap();
        assert!(failures.is_empty(), "{}", failures.join("\n"));
        let _ = &backing;
    }
}

/// `-p`: qemu-img's progress lines (0% before, 100% after), byte for byte on a pipe where
/// qemu-img shows no steps in between (a downgrade shows its internal steps: there only the
/// first and last lines are compared); `-q` silences them.
#[test]
fn progress_lines_as_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.qcow2"), dir.path().join("b.qcow2"));
    for opts in ["lazy_refcounts=on", "compat=0.10"] {
        qemu_create(&a, "", 1 << 20, &[]);
        std::fs::copy(&a, &b).unwrap();
        let ours = run(QIMG, &["amend", "-p", "-o", opts, a.to_str().unwrap()]);
        let theirs = run(
            "qemu-img",
            &["amend", "-p", "-o", opts, b.to_str().unwrap()],
        );
        assert!(ours.status.success(), "{}", text(&ours));
        if opts.starts_with("compat") {
            let ends = |o: &[u8]| {
                let t = String::from_utf8_lossy(o).to_string();
                let parts: Vec<String> = t.split('\r').map(str::to_string).collect();
                (
                    parts[0].clone(),
                    parts[parts.len() - 2].clone(),
                    parts[parts.len() - 1].clone(),
                )
            };
            assert_eq!(ends(&ours.stdout), ends(&theirs.stdout), "{opts}");
        } else {
            assert_eq!(ours.stdout, theirs.stdout, "{opts}");
        }
        let quiet = run(
            QIMG,
            &["amend", "-p", "-q", "-o", "compat=1.1", a.to_str().unwrap()],
        );
        assert!(
            quiet.status.success() && quiet.stdout.is_empty(),
            "{}",
            text(&quiet)
        );
    }
}
