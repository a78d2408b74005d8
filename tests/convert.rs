//! `qimg convert` against `qemu-img convert`: the same sources and flags give targets with the
//! same content and the same allocation (what is left sparse, what is zero, what comes from the
//! backing file), and qemu-img check accepts every qcow2 target.

mod common;

use common::*;
use std::path::{Path, PathBuf};

const QIMG: &str = env!("CARGO_BIN_EXE_qimg");
const SIZE: u64 = 8 << 20;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Sources made by QEMU's tools: a raw file with data, written zeros, holes and unaligned
/// edges; a qcow2 image over a backing file, with zero clusters over backing data; a
/// compressed image.
struct Sources {
    raw: PathBuf,
    base: PathBuf,
    top: PathBuf,
    comp: PathBuf,
}

fn sources(dir: &Path) -> Sources {
    let raw = dir.join("src.raw");
    let mut data = vec![0u8; SIZE as usize];
    data[..1 << 20].copy_from_slice(&pattern(1, 1 << 20));
    // [1 MiB, 1 MiB + 64 KiB): zeros written as data (allocated in the file).
    let odd = (5 << 20) + 512;
    data[odd..odd + 4096].copy_from_slice(&pattern(2, 4096));
    let tail = SIZE as usize - 3000;
    data[tail..].copy_from_slice(&pattern(3, 3000));
    // A 4 KiB zero block inside data, and an 8 KiB one, to test -S granularity.
    data[(6 << 20)..(7 << 20)].copy_from_slice(&pattern(4, 1 << 20));
    data[(6 << 20) + 8192..(6 << 20) + 12288].fill(0);
    data[(6 << 20) + 65536..(6 << 20) + 65536 + 8192].fill(0);
    std::fs::write(&raw, &data).unwrap();
    // Punch [2 MiB, 4 MiB) so the file has a real hole (zeros that are not allocated).
    let o = run(
        "fallocate",
        &["-p", "-o", "2097152", "-l", "2097152", s(&raw)],
    );
    assert!(o.status.success(), "fallocate: {}", text(&o));

    let base = dir.join("base.qcow2");
    qemu_create(&base, "cluster_size=65536", SIZE, &[]);
    qemu_io(
        &base,
        "qcow2",
        &["write -P 0x11 0 3M".into(), "write -P 0x22 5M 1M".into()],
    );
    let top = dir.join("top.qcow2");
    qemu_create(
        &top,
        "cluster_size=65536",
        SIZE,
        &["-b", s(&base), "-F", "qcow2"],
    );
    qemu_io(
        &top,
        "qcow2",
        &[
            "write -P 0x33 64k 100k".into(),
            "write -z 1M 512k".into(),
            "write -P 0x44 7M 4k".into(),
        ],
    );
    let comp = dir.join("comp.qcow2");
    let o = run(
        "qemu-img",
        &["convert", "-c", "-O", "qcow2", s(&raw), s(&comp)],
    );
    assert!(o.status.success(), "{}", text(&o));
    Sources {
        raw,
        base,
        top,
        comp,
    }
}

/// `qemu-img map` of an image as (start, length, depth, present, zero, data) runs, adjacent
/// equal runs merged (host offsets differ between tools and are left out).
fn allocation(p: &Path, fmt: &str) -> Vec<(u64, u64, u64, bool, bool, bool)> {
    let o = run("qemu-img", &["map", "--output=json", "-f", fmt, s(p)]);
    assert!(o.status.success(), "qemu-img map: {}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let mut runs: Vec<(u64, u64, u64, bool, bool, bool)> = Vec::new();
    for e in v.as_array().unwrap() {
        let u = |k: &str| e[k].as_u64().unwrap_or(0);
        let b = |k: &str| e[k].as_bool().unwrap_or(false);
        let r = (
            u("start"),
            u("length"),
            u("depth"),
            b("present"),
            b("zero"),
            b("data"),
        );
        match runs.last_mut() {
            Some(l) if l.0 + l.1 == r.0 && (l.2, l.3, l.4, l.5) == (r.2, r.3, r.4, r.5) => {
                l.1 += r.1
            }
            _ => runs.push(r),
        }
    }
    runs
}

/// Runs both tools with the same arguments into `<name>.qimg` and `<name>.qemu` and checks that
/// the targets agree. `prepare` makes a target beforehand (for `-n`).
fn same_as_qemu(
    dir: &Path,
    name: &str,
    args: &[&str],
    srcs: &[&Path],
    prepare: Option<&dyn Fn(&Path)>,
) {
    let fmt = args
        .windows(2)
        .find(|w| w[0] == "-O")
        .map_or("raw", |w| w[1]);
    let mut outs = Vec::new();
    for tool in [QIMG, "qemu-img"] {
        let out = dir.join(format!(
            "{name}.{}",
            if tool == QIMG { "qimg" } else { "qemu" }
        ));
        let _ = std::fs::remove_file(&out);
        if let Some(p) = prepare {
            p(&out);
        }
        let mut a: Vec<&str> = vec!["convert"];
        a.extend_from_slice(args);
        a.extend(srcs.iter().map(|p| s(p)));
        a.push(s(&out));
        let o = run(tool, &a);
        assert!(
            o.status.success(),
            "{name}: {tool} convert {a:?}: {}",
            text(&o)
        );
        outs.push(out);
    }
    let (ours, theirs) = (&outs[0], &outs[1]);
    if fmt == "qcow2" {
        qemu_check_clean(ours);
    }
    let o = run(
        "qemu-img",
        &["compare", "-f", fmt, "-F", fmt, s(ours), s(theirs)],
    );
    assert!(o.status.success(), "{name}: content differs: {}", text(&o));
    assert_eq!(
        allocation(ours, fmt),
        allocation(theirs, fmt),
        "{name}: allocation differs from qemu-img's"
    );
}

#[test]
fn convert_matches_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = sources(d);
    let raw: &[&Path] = &[&src.raw];
    let top: &[&Path] = &[&src.top];
    let base_opt = format!("backing_file={}", s(&src.base));
    let cases: &[(&str, &[&str], &[&Path])] = &[
        ("raw-to-qcow2", &["-O", "qcow2"], raw),
        ("raw-to-raw", &["-O", "raw"], raw),
        ("sparse-0", &["-O", "qcow2", "-S", "0"], raw),
        ("sparse-64k", &["-O", "qcow2", "-S", "64k"], raw),
        (
            "small-clusters-unordered",
            &["-O", "qcow2", "-o", "cluster_size=4096", "-W", "-m", "3"],
            raw,
        ),
        ("flatten", &["-O", "qcow2"], top),
        ("flatten-to-raw", &["-f", "qcow2", "-O", "raw"], top),
        (
            "top-only",
            &["-O", "qcow2", "-B", s(&src.base), "-F", "qcow2"],
            top,
        ),
        // The same through -o (iotest 019's spellings).
        (
            "top-only-options",
            &["-O", "qcow2", "-o", &base_opt, "-o", "backing_fmt=qcow2"],
            top,
        ),
        (
            "top-only-B-with-backing-fmt-option",
            &["-O", "qcow2", "-B", s(&src.base), "-o", "backing_fmt=qcow2"],
            top,
        ),
        ("decompress", &["-O", "raw"], &[&src.comp]),
        ("recompress-to-qcow2", &["-O", "qcow2"], &[&src.comp]),
        ("concatenated", &["-O", "qcow2"], &[&src.raw, &src.top]),
        ("compressed", &["-c", "-O", "qcow2"], raw),
        (
            "compressed-zstd-from-backing-chain",
            &["-c", "-O", "qcow2", "-o", "compression_type=zstd"],
            top,
        ),
        (
            "big-clusters",
            &["-O", "qcow2", "-o", "cluster_size=2M"],
            raw,
        ),
        (
            "preallocated-metadata",
            &["-O", "qcow2", "-o", "preallocation=metadata"],
            raw,
        ),
        (
            "preallocated-falloc-raw",
            &["-O", "raw", "-o", "preallocation=falloc"],
            raw,
        ),
    ];
    for (name, args, srcs) in cases {
        same_as_qemu(d, name, args, srcs, None);
    }
}

#[test]
fn convert_into_existing_target_overwrites_everything() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = sources(d);
    // -n: the target exists, full of other data; zeros in the source must be written.
    let junk = |p: &Path| {
        qemu_create(p, "", SIZE, &[]);
        qemu_io(p, "qcow2", &["write -P 0xee 0 8M".into()]);
    };
    same_as_qemu(
        d,
        "no-create",
        &["-n", "-O", "qcow2"],
        &[&src.raw],
        Some(&junk),
    );
    same_as_qemu(
        d,
        "no-create-top",
        &["-n", "-O", "qcow2"],
        &[&src.top],
        Some(&junk),
    );
}

/// `--target-is-zero -n`: the user says the target reads zeros, so zero areas of the source are
/// not written: into a fresh target the result matches qemu-img's in content and allocation;
/// into a target that holds data, both tools leave that data where the source is zero.
#[test]
fn target_is_zero_skips_zeros_as_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = sources(d);
    let fresh = |p: &Path| qemu_create(p, "", SIZE, &[]);
    let junk = |p: &Path| {
        qemu_create(p, "", SIZE, &[]);
        qemu_io(p, "qcow2", &["write -P 0xee 0 8M".into()]);
    };
    for (name, srcp) in [("raw", &src.raw), ("top", &src.top)] {
        same_as_qemu(
            d,
            &format!("tiz-fresh-{name}"),
            &["-n", "--target-is-zero", "-O", "qcow2"],
            &[srcp],
            Some(&fresh),
        );
        same_as_qemu(
            d,
            &format!("tiz-junk-{name}"),
            &["-n", "--target-is-zero", "-O", "qcow2"],
            &[srcp],
            Some(&junk),
        );
    }
    // Without -n it is refused, as by qemu-img.
    let out = d.join("tiz.qcow2");
    for tool in [QIMG, "qemu-img"] {
        let o = run(
            tool,
            &[
                "convert",
                "--target-is-zero",
                "-O",
                "qcow2",
                s(&src.raw),
                s(&out),
            ],
        );
        assert_eq!(o.status.code(), Some(1), "{tool}: {}", text(&o));
        assert!(text(&o).contains("--target-is-zero requires use of -n flag"));
    }
    // With a backing file for the target it is refused (qemu-img prints the same error but
    // exits 0 without converting).
    junk(&out);
    let o = run(
        QIMG,
        &[
            "convert",
            "-n",
            "--target-is-zero",
            "-B",
            s(&src.base),
            "-O",
            "qcow2",
            s(&src.top),
            s(&out),
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o)
        .contains("Cannot use --target-is-zero when the destination image has a backing file"));
}

/// `-r RATE` limits the data copied per second (a lower bound on the time taken: the limit
/// works), and bad rates are refused as qemu-img refuses them.
#[test]
fn rate_limit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("r.qcow2");
    qemu_create(&src, "", 16 << 20, &[]);
    qemu_io(&src, "qcow2", &["write -P 1 0 3M".into()]);
    let out = d.join("r-out.qcow2");
    let t = std::time::Instant::now();
    let o = run(
        QIMG,
        &["convert", "-r", "1M", "-O", "qcow2", s(&src), s(&out)],
    );
    assert!(o.status.success(), "{}", text(&o));
    // 3 MiB at 1 MiB/s: the last chunk may go at 2 s.
    assert!(
        t.elapsed() >= std::time::Duration::from_millis(1900),
        "{:?}",
        t.elapsed()
    );
    qemu_check_clean(&out);
    let o = run("qemu-img", &["compare", s(&src), s(&out)]);
    assert!(o.status.success(), "{}", text(&o));
    for bad in ["x", "-1", "9223372036854775808", "18446744073709551616"] {
        refused_like_qemu_img(d, "-r", bad);
    }
}

/// `qimg convert FLAG VALUE` fails as `qemu-img convert FLAG VALUE` does (exit code 1, same
/// message), and creates no target.
fn refused_like_qemu_img(dir: &Path, flag: &str, value: &str) {
    let src = dir.join("s.raw");
    std::fs::write(&src, vec![1u8; 65536]).unwrap();
    let out = dir.join("o.qcow2");
    let msg = |tool: &str| {
        let o = run(
            tool,
            &["convert", flag, value, "-O", "qcow2", s(&src), s(&out)],
        );
        assert_eq!(
            o.status.code(),
            Some(1),
            "{tool} {flag} {value}: {}",
            text(&o)
        );
        String::from_utf8_lossy(&o.stderr)
            .replace("qemu-img: ", "")
            .replace("qimg: ", "")
    };
    assert_eq!(msg(QIMG), msg("qemu-img"), "{flag} {value}");
    assert!(!out.exists(), "{flag} {value}: no target is created");
}

#[test]
fn bad_sparse_sizes_and_parallelism_are_refused_as_qemu_img_refuses_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for bad in [
        "1000",
        "32M",
        "9223372036854775807",
        "9223372036854775808",
        "18446744073709551616",
        "-1",
        "x",
    ] {
        refused_like_qemu_img(d, "-S", bad);
    }
    // -m bounds the memory held by requests in flight.
    for bad in ["0", "17", "1000000", "-1", "x"] {
        refused_like_qemu_img(d, "-m", bad);
    }
    let (src, out) = (d.join("s.raw"), d.join("o.qcow2"));
    let o = run(
        QIMG,
        &["convert", "-m", "16", "-O", "qcow2", s(&src), s(&out)],
    );
    assert!(o.status.success(), "{}", text(&o));
    qemu_compare_raw(&out, &src);
}
