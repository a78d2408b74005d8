//! Resizing qcow2 images against qemu-img: `resize --shrink` on several geometries (cluster
//! sizes from 512 B to 2 MiB, refcount widths from 1 to 64 bits, compressed and zero clusters,
//! internal snapshots), growth with each preallocation mode, and qemu-img's refusals.
//!
//! Each case starts from one image written by qemu-io and resized by both programs:
//! - both results pass `qemu-img check` with no leak, and read the same, which is the original's
//!   data up to the new end;
//! - qimg's file is no longer than qemu-img's (unused refcount blocks are dropped and the file
//!   is truncated after its last cluster in use, as QEMU does);
//! - grown again, qimg's image reads zeros past the old end (nothing of the cut data shows).

mod common;

use common::*;
use std::path::Path;

const QIMG: &str = env!("CARGO_BIN_EXE_qimg");

fn qimg(args: &[&str]) -> std::process::Output {
    run(QIMG, args)
}

fn ok(o: std::process::Output, what: &str) -> String {
    assert!(o.status.success(), "{what}: {}", text(&o));
    text(&o)
}

fn raw_of(p: &Path, extra: &[&str]) -> Vec<u8> {
    let raw = p.with_extension(format!("raw{}", extra.len()));
    let mut args = vec!["convert", "-O", "raw"];
    args.extend_from_slice(extra);
    args.extend([p.to_str().unwrap(), raw.to_str().unwrap()]);
    ok(run("qemu-img", &args), "qemu-img convert");
    let v = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    v
}

/// qemu-io commands writing data, zeros, compressed clusters and discards over `size` bytes.
fn history(seed: u64, size: u64, cs: u64) -> Vec<String> {
    let mut r = fastrand::Rng::with_seed(seed);
    let mut cmds = Vec::new();
    for i in 0..60 {
        let off = r.u64(0..size / 512) * 512;
        let len = (r.u64(1..(4 * cs / 512).max(2)) * 512).min(size - off);
        cmds.push(match i % 6 {
            0..=2 => format!("write -P {} {off} {len}", i + 1),
            3 => format!("write -z {off} {len}"),
            4 => format!("discard {off} {len}"),
            _ => {
                // Compressed writes take whole unallocated clusters.
                let c = r.u64(0..size / cs) * cs;
                if c + cs <= size {
                    format!("write -c -P {} {c} {cs}", i + 1)
                } else {
                    format!("write -P {} {off} {len}", i + 1)
                }
            }
        });
    }
    cmds
}

fn qemu_io_tolerant(p: &Path, cmds: &[String]) {
    // Compressed writes to allocated clusters fail with QEMU; that is fine here.
    let mut args: Vec<&str> = vec!["-f", "qcow2"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(p.to_str().unwrap());
    run("qemu-io", &args);
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

fn shrink_case(opts: &str, size: u64, cs: u64, new_sizes: &[u64], seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let orig = dir.path().join("orig.qcow2");
    qemu_create(&orig, opts, size, &[]);
    qemu_io_tolerant(&orig, &history(seed, size, cs));
    qemu_check_clean(&orig);
    let data = raw_of(&orig, &[]);
    for &n in new_sizes {
        let a = dir.path().join("a.qcow2");
        let b = dir.path().join("b.qcow2");
        std::fs::copy(&orig, &a).unwrap();
        std::fs::copy(&orig, &b).unwrap();
        let ns = n.to_string();
        ok(
            qimg(&["resize", "--shrink", a.to_str().unwrap(), &ns]),
            "qimg resize",
        );
        ok(
            run(
                "qemu-img",
                &["resize", "--shrink", b.to_str().unwrap(), &ns],
            ),
            "qemu-img resize",
        );
        qemu_check_clean(&a);
        let va = raw_of(&a, &[]);
        assert_eq!(va.len() as u64, n, "{opts} -> {n}: size");
        assert!(va == data[..n as usize], "{opts} -> {n}: data differs");
        assert!(
            raw_of(&b, &[]) == va,
            "{opts} -> {n}: differs from qemu-img's"
        );
        assert!(
            file_len(&a) <= file_len(&b),
            "{opts} -> {n}: file {} bytes, qemu-img's {}",
            file_len(&a),
            file_len(&b)
        );
        // Grown back, the cut area reads zeros (QEMU may show old data in the last cluster).
        ok(
            qimg(&["resize", a.to_str().unwrap(), &size.to_string()]),
            "qimg grow",
        );
        qemu_check_clean(&a);
        let grown = raw_of(&a, &[]);
        assert!(grown[..n as usize] == data[..n as usize]);
        assert!(
            grown[n as usize..].iter().all(|&x| x == 0),
            "{opts} -> {n} -> {size}: cut data shows again"
        );
        // And the image stays usable by QEMU.
        qemu_io(&a, "qcow2", &[format!("write -P 9 {} 4096", size - 4096)]);
        qemu_check_clean(&a);
    }
}

#[test]
fn shrink_small_clusters_wide_refcounts() {
    // 512-byte clusters with 64-bit refcounts: a refcount block covers 32 KiB, so a shrink
    // leaves many refcount blocks counting nothing.
    shrink_case(
        "cluster_size=512,refcount_bits=64",
        4 << 20,
        512,
        &[3 << 20, (1 << 20) + 512, 65536, 512],
        1,
    );
}

#[test]
fn shrink_default_geometry() {
    shrink_case(
        "",
        64 << 20,
        65536,
        &[(48 << 20) + 1536, 32 << 20, 4 << 20, 1 << 20],
        2,
    );
}

#[test]
fn shrink_narrow_refcounts_and_v2() {
    shrink_case(
        "cluster_size=4096,refcount_bits=1",
        8 << 20,
        4096,
        &[(5 << 20) + 4096 + 512, 1 << 20],
        3,
    );
    shrink_case(
        "compat=0.10,cluster_size=4096",
        8 << 20,
        4096,
        &[(3 << 20) + 512],
        4,
    );
}

#[test]
fn shrink_large_clusters() {
    shrink_case(
        "cluster_size=2M",
        64 << 20,
        2 << 20,
        &[(40 << 20) + 4096, 2 << 20],
        5,
    );
}

/// A v3 image with an internal snapshot: the snapshot keeps its size and data, the shrunk disk
/// its own, nothing leaks; applying the snapshot brings back its size and data.
#[test]
fn shrink_with_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.qcow2");
    let size = 16u64 << 20;
    qemu_create(&p, "cluster_size=4096", size, &[]);
    qemu_io_tolerant(&p, &history(7, size, 4096));
    let before = raw_of(&p, &[]);
    ok(
        run("qemu-img", &["snapshot", "-c", "s1", p.to_str().unwrap()]),
        "snapshot -c",
    );
    qemu_io_tolerant(&p, &history(8, size, 4096));
    let after = raw_of(&p, &[]);
    let n = (5u64 << 20) + 512;
    ok(
        qimg(&["resize", "--shrink", p.to_str().unwrap(), &n.to_string()]),
        "qimg resize",
    );
    qemu_check_clean(&p);
    assert!(raw_of(&p, &[]) == after[..n as usize]);
    // QEMU reads a snapshot at the disk's current size.
    assert!(
        raw_of(&p, &["-l", "s1"]) == before[..n as usize],
        "snapshot changed"
    );
    ok(
        qimg(&["snapshot", "-a", "s1", p.to_str().unwrap()]),
        "snapshot -a",
    );
    qemu_check_clean(&p);
    assert!(
        raw_of(&p, &[]) == before,
        "applied snapshot reads differently"
    );
}

/// A v2 image with a snapshot cannot be resized (QEMU's rule), in either direction.
#[test]
fn v2_with_snapshot_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("v2.qcow2");
    qemu_create(&p, "compat=0.10", 1 << 20, &[]);
    ok(
        run("qemu-img", &["snapshot", "-c", "s", p.to_str().unwrap()]),
        "snapshot -c",
    );
    for size in ["512K", "2M"] {
        let mut args = vec!["resize"];
        if size == "512K" {
            args.push("--shrink");
        }
        args.extend([p.to_str().unwrap(), size]);
        let a = qimg(&args);
        let b = run("qemu-img", &args);
        assert_eq!(a.status.code(), b.status.code());
        assert_eq!(
            text(&a).replace("qimg", "qemu-img"),
            text(&b),
            "resize {size}"
        );
    }
}

/// Messages and exit codes of refused resizes, as qemu-img's.
#[test]
fn refusals_match_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("r.qcow2");
    qemu_create(&p, "", 1 << 20, &[]);
    let cases: &[&[&str]] = &[
        &["512K"],
        &["-1M"],
        &["0"],
        &["--preallocation=metadata", "512K"],
        &["--preallocation=bogus", "2M"],
        &["--shrink", "--preallocation=full", "-512K"],
        &["1000"],
        &["x"],
        &["+9E"],
    ];
    for c in cases {
        let mut args = vec!["resize", p.to_str().unwrap()];
        args.splice(1..1, c[..c.len() - 1].iter().copied());
        args.push(c[c.len() - 1]);
        let a = qimg(&args);
        let b = run("qemu-img", &args);
        assert_eq!(a.status.code(), b.status.code(), "{c:?}: {}", text(&a));
        assert_eq!(
            text(&a).replace("qimg", "qemu-img"),
            text(&b),
            "resize {c:?}"
        );
    }
    qemu_check_clean(&p);
}

/// Growth with each preallocation mode: the new area reads zeros, is allocated as qemu-img
/// allocates it (same map apart from host offsets), and the image is clean.
#[test]
fn grow_with_preallocation() {
    let dir = tempfile::tempdir().unwrap();
    for mode in ["off", "metadata", "falloc", "full"] {
        for (opts, old, new) in [
            ("cluster_size=65536", 1u64 << 20, (5u64 << 20) + 512),
            ("cluster_size=4096", (1 << 20) + 1536, 3 << 20),
        ] {
            let a = dir.path().join("a.qcow2");
            let b = dir.path().join("b.qcow2");
            qemu_create(&a, opts, old, &[]);
            qemu_io(&a, "qcow2", &[format!("write -P 3 0 {old}")]);
            std::fs::copy(&a, &b).unwrap();
            let pm = format!("--preallocation={mode}");
            let ns = new.to_string();
            ok(
                qimg(&["resize", &pm, a.to_str().unwrap(), &ns]),
                "qimg resize",
            );
            ok(
                run("qemu-img", &["resize", &pm, b.to_str().unwrap(), &ns]),
                "qemu-img resize",
            );
            qemu_check_clean(&a);
            let va = raw_of(&a, &[]);
            assert!(va[..old as usize].iter().all(|&x| x == 3));
            assert!(va[old as usize..].iter().all(|&x| x == 0), "{mode} {opts}");
            let map = |p: &Path| {
                let o = ok(
                    run("qemu-img", &["map", "--output=json", p.to_str().unwrap()]),
                    "map",
                );
                let v: serde_json::Value = serde_json::from_str(&o).unwrap();
                // Where data is allocated; not whether it reads zeros (QEMU writes the last
                // cluster of a metadata preallocation, qimg leaves it sparse: both read zeros).
                let mut runs: Vec<(u64, u64, bool)> = Vec::new();
                for e in v.as_array().unwrap() {
                    let (start, len) =
                        (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
                    let data = e["data"].as_bool().unwrap();
                    match runs.last_mut() {
                        Some(r) if r.2 == data && r.0 + r.1 == start => r.1 += len,
                        _ => runs.push((start, len, data)),
                    }
                }
                runs
            };
            assert_eq!(
                map(&a),
                map(&b),
                "{mode} {opts}: map differs from qemu-img's"
            );
        }
    }
}
