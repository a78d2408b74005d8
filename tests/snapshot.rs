//! Internal snapshots against QEMU: the same random history of writes and snapshot operations is
//! played on two copies of an image, snapshot operations by `qimg snapshot` on one and by
//! `qemu-img snapshot` on the other, writes alternately by `qemu-io` and `qimg io` (the same tool
//! on both copies at each step, so each side also works on what the other program wrote). After
//! every snapshot operation both images must pass `qemu-img check` without a single leak, list
//! the same snapshots, and read the same — the active disk and every snapshot (`convert -l`, by
//! QEMU's convert on both). Geometries: small and large clusters, narrow and wide refcounts,
//! version 2 images, compressed and zero clusters.

mod common;

use common::*;
use std::path::Path;

const QIMG: &str = env!("CARGO_BIN_EXE_qimg");

fn ok(o: &std::process::Output, what: &str) {
    assert!(o.status.success(), "{what}: {}", text(o));
}

/// Every snapshot's ID and name, and the content of the active disk and every snapshot.
fn state(p: &Path) -> (Vec<(String, String)>, Vec<Vec<u8>>) {
    let o = run("qemu-img", &["info", "--output=json", p.to_str().unwrap()]);
    ok(&o, "info");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let snaps: Vec<(String, String)> = v["snapshots"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    (
                        s["id"].as_str().unwrap().to_string(),
                        s["name"].as_str().unwrap().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let raw = p.with_extension("raw");
    let mut views = Vec::new();
    for sel in std::iter::once(None).chain(snaps.iter().map(|s| Some(s.0.clone()))) {
        let mut args = vec!["convert", "-O", "raw"];
        let l;
        if let Some(id) = &sel {
            l = format!("snapshot.id={id}");
            args.extend(["-l", &l]);
        }
        args.extend([p.to_str().unwrap(), raw.to_str().unwrap()]);
        ok(&run("qemu-img", &args), "convert");
        views.push(std::fs::read(&raw).unwrap());
    }
    (snaps, views)
}

fn check_no_leaks(p: &Path, what: &str) {
    let (code, corruptions, leaks, out) = qemu_check(p);
    assert!(
        code == 0 && corruptions == 0 && leaks == 0,
        "{what}: qemu-img check rc={code}:\n{out}"
    );
}

/// One random history on one geometry.
fn history(create_opts: &str, size: u64, seed: u64, steps: usize) {
    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("ours.qcow2");
    let theirs = dir.path().join("theirs.qcow2");
    qemu_create(&ours, create_opts, size, &[]);
    std::fs::copy(&ours, &theirs).unwrap();
    let compat_v2 = create_opts.contains("compat=0.10");
    let mut r = fastrand::Rng::with_seed(seed);
    let mut names: Vec<String> = Vec::new();
    for step in 0..steps {
        let what = r.u32(0..10);
        if what < 5 {
            // Writes, by one tool on both copies.
            let mut cmds = Vec::new();
            for _ in 0..r.usize(1..5) {
                let off = r.u64(0..size / 512) * 512;
                let len = (r.u64(1..200) * 512).min(size - off);
                match r.u32(0..10) {
                    0..=5 => cmds.push(format!("write -P {} {off} {len}", r.u32(1..255))),
                    6 if !compat_v2 => cmds.push(format!("write -z {off} {len}")),
                    7 => cmds.push(format!("discard {off} {len}")),
                    _ => {
                        // Compressed writes are whole clusters, into unallocated ones only
                        // (QEMU refuses others): discard the cluster first.
                        let cs = cluster_size(create_opts);
                        let c = r.u64(0..size / cs) * cs;
                        cmds.push(format!("discard {c} {cs}"));
                        cmds.push(format!("write -c -P {} {c} {cs}", r.u32(1..255)));
                    }
                }
            }
            let by_qemu = r.bool();
            for p in [&ours, &theirs] {
                if by_qemu {
                    qemu_io(p, "qcow2", &cmds);
                } else {
                    let mut args = vec!["io", "-f", "qcow2"];
                    for c in &cmds {
                        args.extend(["-c", c.as_str()]);
                    }
                    args.push(p.to_str().unwrap());
                    let o = run(QIMG, &args);
                    ok(&o, &format!("qimg io {cmds:?}"));
                }
            }
            continue;
        }
        let (op, name) = match what {
            5..=6 => {
                let n = format!("s{step}");
                names.push(n.clone());
                ("-c", n)
            }
            7..=8 if !names.is_empty() => ("-a", names[r.usize(0..names.len())].clone()),
            _ if !names.is_empty() => {
                let n = names.remove(r.usize(0..names.len()));
                ("-d", n)
            }
            _ => continue,
        };
        let a = run(QIMG, &["snapshot", op, &name, ours.to_str().unwrap()]);
        let b = run(
            "qemu-img",
            &["snapshot", op, &name, theirs.to_str().unwrap()],
        );
        assert_eq!(
            a.status.success(),
            b.status.success(),
            "step {step}: qimg snapshot {op} {name}: {}\nqemu-img: {}",
            text(&a),
            text(&b)
        );
        if !a.status.success() {
            // Both refuse (a refcount at its maximum): with the same message, and ours without
            // the leak QEMU leaves (repaired on QEMU's copy so that the histories stay equal).
            let msg = |o: &std::process::Output| {
                let t = text(o);
                t.split_once(": ").map(|x| x.1.to_string()).unwrap_or(t)
            };
            assert_eq!(msg(&a), msg(&b), "step {step} {op} {name}");
            if op == "-c" {
                names.pop();
            }
            check_no_leaks(&ours, &format!("after a refused snapshot {op} {name}"));
            let o = run(
                "qemu-img",
                &["check", "-q", "-r", "leaks", theirs.to_str().unwrap()],
            );
            ok(&o, "qemu-img check -r leaks");
        }
        check_no_leaks(
            &ours,
            &format!("{create_opts} seed {seed} step {step} {op}"),
        );
        check_no_leaks(&theirs, "qemu's copy");
        let (sa, va) = state(&ours);
        let (sb, vb) = state(&theirs);
        assert_eq!(
            sa, sb,
            "snapshot lists differ after step {step} {op} {name}"
        );
        for (i, (x, y)) in va.iter().zip(&vb).enumerate() {
            assert!(
                x == y,
                "{create_opts} seed {seed}: view {i} (0 = active) differs after step {step} {op} {name}"
            );
        }
    }
    // QEMU's check on our result agrees with ours.
    let o = run(QIMG, &["check", ours.to_str().unwrap()]);
    ok(&o, "qimg check");
}

fn cluster_size(opts: &str) -> u64 {
    opts.split(',')
        .find_map(|kv| kv.strip_prefix("cluster_size="))
        .map(|v| match v {
            "512" => 512,
            "4k" => 4096,
            "64k" => 65536,
            "2M" => 2 << 20,
            other => other.parse().unwrap(),
        })
        .unwrap_or(65536)
}

#[test]
fn snapshots_match_qemu_default_geometry() {
    for seed in 0..3 {
        history("", 8 << 20, seed, 40);
    }
}

#[test]
fn snapshots_match_qemu_small_clusters_narrow_refcounts() {
    history("cluster_size=512,refcount_bits=2", 1 << 20, 11, 40);
    history("cluster_size=4k,refcount_bits=8", 4 << 20, 12, 40);
}

#[test]
fn snapshots_match_qemu_large_clusters_wide_refcounts() {
    history("cluster_size=2M,refcount_bits=64", 64 << 20, 21, 30);
}

#[test]
fn snapshots_match_qemu_version_2() {
    history("compat=0.10", 8 << 20, 31, 40);
}

#[test]
fn snapshots_match_qemu_many_l2_tables() {
    // Small clusters and a disk spanning many L2 tables: batches of the sharing walk, table
    // growth of the refcount structures as snapshots pile up.
    history("cluster_size=512", 16 << 20, 41, 30);
}

/// One-bit refcounts cannot count a second reference: the snapshot is refused, and (unlike
/// QEMU, which leaks the L1 copy) the image is left exactly as clean as it was.
#[test]
fn one_bit_refcounts_refuse_snapshots_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.qcow2");
    qemu_create(&p, "refcount_bits=1", 4 << 20, &[]);
    qemu_io(&p, "qcow2", &["write -P 7 0 1M".into()]);
    let before = std::fs::read(&p).unwrap();
    let o = run(QIMG, &["snapshot", "-c", "x", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains("Could not create snapshot 'x': Invalid argument"),
        "{}",
        text(&o)
    );
    check_no_leaks(&p, "after the refused snapshot");
    let (snaps, views) = state(&p);
    assert!(snaps.is_empty());
    let before_img = dir.path().join("before.qcow2");
    std::fs::write(&before_img, before).unwrap();
    assert!(views[0] == state(&before_img).1[0], "the disk changed");
}

#[test]
fn messages_match_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.qcow2");
    qemu_create(&p, "", 4 << 20, &[]);
    let raw = dir.path().join("r.raw");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    let ps = p.to_str().unwrap();
    ok(&run("qemu-img", &["snapshot", "-c", "one", ps]), "create");
    let cases: Vec<Vec<&str>> = vec![
        vec!["snapshot", "-l", ps],
        vec!["snapshot", ps],
        vec!["snapshot", "-a", "nope", ps],
        vec!["snapshot", "-d", "nope", ps],
        vec!["snapshot", "-d", "1", ps],
        vec!["snapshot", "-l", "-c", "x", ps],
        vec!["snapshot", "-U", "-c", "x", ps],
        vec!["snapshot", "-l", "-f", "raw", raw.to_str().unwrap()],
        vec!["snapshot", "-f", "raw", "-c", "x", raw.to_str().unwrap()],
        vec!["convert", "-l", "nope", "-O", "raw", ps, "/dev/null"],
        vec![
            "convert",
            "-l",
            "snapshot.id=1,snapshot.name=zz",
            "-O",
            "raw",
            ps,
            "/dev/null",
        ],
        vec!["convert", "-l", "one", "-O", "raw", ps, ps, "/dev/null"],
    ];
    for args in cases {
        let q = run("qemu-img", &args);
        // The same command line under the name qemu-img prints the same prefixes.
        let o = run_named(QIMG, "qemu-img", &args);
        let mask = |s: String| {
            // Snapshot dates differ by when each program ran the list; the rest must not.
            s.lines()
                .map(|l| {
                    if l.starts_with("1 ") {
                        l[..20].to_string()
                    } else {
                        l.to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(mask(text(&o)), mask(text(&q)), "output of {args:?} differs");
        assert_eq!(o.status.code(), q.status.code(), "exit code of {args:?}");
    }
}

/// `convert -l` reads a snapshot of an image QEMU wrote, by ID, by name, and by both.
#[test]
fn convert_reads_snapshots_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.qcow2");
    qemu_create(&p, "", 8 << 20, &[]);
    qemu_io(&p, "qcow2", &["write -P 1 0 2M".into()]);
    ok(
        &run(
            "qemu-img",
            &["snapshot", "-c", "first", p.to_str().unwrap()],
        ),
        "c",
    );
    qemu_io(&p, "qcow2", &["write -P 2 1M 2M".into()]);
    ok(
        &run(
            "qemu-img",
            &["snapshot", "-c", "second", p.to_str().unwrap()],
        ),
        "c",
    );
    qemu_io(&p, "qcow2", &["write -P 3 0 512k".into()]);
    for sel in [
        "1",
        "first",
        "2",
        "second",
        "snapshot.id=1",
        "snapshot.name=second",
        "snapshot.id=2,snapshot.name=second",
    ] {
        let a = dir.path().join("a.raw");
        let b = dir.path().join("b.raw");
        ok(
            &run(
                QIMG,
                &[
                    "convert",
                    "-l",
                    sel,
                    "-O",
                    "raw",
                    p.to_str().unwrap(),
                    a.to_str().unwrap(),
                ],
            ),
            "qimg convert -l",
        );
        ok(
            &run(
                "qemu-img",
                &[
                    "convert",
                    "-l",
                    sel,
                    "-O",
                    "raw",
                    p.to_str().unwrap(),
                    b.to_str().unwrap(),
                ],
            ),
            "qemu-img convert -l",
        );
        assert!(
            std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(),
            "-l {sel}"
        );
    }
}

/// `pass-discard-snapshot` (default on): the clusters a snapshot deletion frees are punched out
/// of the file, or with `off` left allocated — with `qimg snapshot -d` as with `qemu-img
/// snapshot -d`, both through `--image-opts`.
#[test]
fn pass_discard_snapshot_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let blocks = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).unwrap().blocks() * 512
    };
    for opt in ["on", "off"] {
        let mut sizes = Vec::new();
        for tool in [QIMG, "qemu-img"] {
            let p = dir.path().join(format!("pd-{opt}.qcow2"));
            let _ = std::fs::remove_file(&p);
            qemu_create(&p, "", 64 << 20, &[]);
            qemu_io(&p, "qcow2", &["write -P 1 0 8M".into()]);
            ok(
                &run("qemu-img", &["snapshot", "-c", "s", p.to_str().unwrap()]),
                "snapshot -c",
            );
            // Every cluster copied on write: the old ones are the snapshot's alone.
            qemu_io(&p, "qcow2", &["write -P 2 0 8M".into()]);
            let before = blocks(&p);
            let spec = format!(
                "driver=qcow2,pass-discard-snapshot={opt},file.filename={}",
                p.display()
            );
            ok(
                &run(tool, &["snapshot", "-d", "s", "--image-opts", &spec]),
                "snapshot -d",
            );
            check_no_leaks(&p, "after snapshot -d");
            sizes.push(before.saturating_sub(blocks(&p)));
        }
        let freed_mib = |b: u64| b >> 20;
        if opt == "on" {
            assert!(sizes.iter().all(|&b| freed_mib(b) >= 7), "{opt}: {sizes:?}");
        } else {
            assert!(sizes.iter().all(|&b| freed_mib(b) < 1), "{opt}: {sizes:?}");
        }
    }
}

/// `measure -l`: the numbers of a snapshot's content, as `qemu-img measure -l` gives them (by ID,
/// name, or QEMU's `snapshot.id=`/`snapshot.name=` form), and qemu-img's messages for a missing
/// snapshot, a bad parameter and a format without snapshots.
#[test]
fn measure_reads_snapshots_like_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.qcow2");
    let ps = p.to_str().unwrap();
    qemu_create(&p, "", 64 << 20, &[]);
    qemu_io(&p, "qcow2", &["write -P 1 0 8M".into()]);
    ok(&run(QIMG, &["snapshot", "-c", "small", ps]), "c");
    qemu_io(&p, "qcow2", &["write -P 2 8M 24M".into()]);
    ok(&run("qemu-img", &["snapshot", "-c", "large", ps]), "c");
    qemu_io(&p, "qcow2", &["discard 0 32M".into()]);
    let mut seen = std::collections::BTreeSet::new();
    for extra in [
        &["-l", "small"][..],
        &["-l", "1"],
        &["-l", "snapshot.name=large"],
        &["-l", "snapshot.id=2,snapshot.name=large"],
        &[],
        &["-l", "nope"],
        &["-l", "snapshot.id=1,snapshot.name=large"],
        &["-l", "snapshot.foo=1"],
        &["-f", "raw", "-l", "small"],
    ] {
        let mut args = vec!["measure", "-O", "qcow2", "--output=json"];
        args.extend_from_slice(extra);
        args.push(ps);
        let theirs = run("qemu-img", &args);
        let ours = run_named(QIMG, "qemu-img", &args);
        assert_eq!(
            (ours.status.code(), text(&ours)),
            (theirs.status.code(), text(&theirs)),
            "{extra:?}"
        );
        seen.insert(ours.stdout);
    }
    // The snapshots, the active disk and the failures differ from each other.
    assert_eq!(seen.len(), 4, "{seen:?}");
}

/// A snapshot whose L1 table offset is invalid (iotest 080's damage): `amend -o compat=0.10`,
/// `snapshot -a` and `snapshot -d` fail with qemu-img's exit codes and lines — the snapshot's
/// own error first where QEMU reports it on its own line, then the operation's.
#[test]
fn damaged_snapshot_tables_are_reported_like_qemu_img() {
    use std::io::{Read, Seek, SeekFrom, Write};
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    qemu_create(&base, "", 64 << 20, &[]);
    qemu_io(&base, "qcow2", &["write 0 512".into()]);
    ok(
        &run(
            "qemu-img",
            &["snapshot", "-c", "test", base.to_str().unwrap()],
        ),
        "c",
    );
    // The first snapshot table entry's L1 table offset, made unaligned.
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&base)
        .unwrap();
    let mut h = [0u8; 72];
    f.read_exact(&mut h).unwrap();
    let table = u64::from_be_bytes(h[64..72].try_into().unwrap());
    f.seek(SeekFrom::Start(table)).unwrap();
    f.write_all(&0x40_0200u64.to_be_bytes()).unwrap();
    drop(f);
    for args in [
        &["amend", "-o", "compat=0.10"][..],
        &["snapshot", "-a", "test"],
        &["snapshot", "-d", "test"],
    ] {
        let mut outs = Vec::new();
        for tool in [QIMG, "qemu-img"] {
            let img = dir.path().join("img.qcow2");
            std::fs::copy(&base, &img).unwrap();
            let mut all = args.to_vec();
            all.push(img.to_str().unwrap());
            let o = run_named(tool, "qemu-img", &all);
            outs.push((o.status.code(), text(&o)));
        }
        assert_eq!(outs[0], outs[1], "{args:?}");
        assert!(
            outs[0].1.contains("Snapshot L1 table offset invalid"),
            "{args:?}"
        );
    }
}
