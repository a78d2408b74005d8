//! `qimg measure` and `qimg dd` against the real qemu-img: the same command lines give the same
//! stdout, stderr and exit code (qimg is run under the name `qemu-img`, so messages compare byte
//! for byte), and dd's output images have the same format, size, content and allocation.

mod common;

use common::*;
use proptest::prelude::*;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output};

const QIMG: &str = env!("CARGO_BIN_EXE_qimg");

/// qimg with argv[0] = "qemu-img", in `dir`.
fn qimg_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(QIMG)
        .arg0("qemu-img")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("cannot run qimg")
}

fn qemu_in(dir: &Path, args: &[&str]) -> Output {
    Command::new("qemu-img")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("cannot run qemu-img")
}

/// What a run shows a user or a script: stdout, stderr and the exit code.
fn shown(o: &Output) -> (String, String, Option<i32>) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
        o.status.code(),
    )
}

/// Runs `args` through both programs in `dir` and asserts the same output and exit code.
fn same(dir: &Path, args: &[&str]) -> (String, String, Option<i32>) {
    let a = shown(&qemu_in(dir, args));
    let b = shown(&qimg_in(dir, args));
    assert_eq!(a, b, "qemu-img {args:?} (left) vs qimg (right)");
    a
}

fn size_args(size: u64, opts: &str, target: &str) -> Vec<String> {
    let mut v = vec!["measure".to_string(), "-O".into(), target.into()];
    if !opts.is_empty() {
        v.push("-o".into());
        v.push(opts.into());
    }
    v.push("--size".into());
    v.push(size.to_string());
    v
}

fn same_owned(dir: &Path, args: &[String]) -> (String, String, Option<i32>) {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    same(dir, &a)
}

#[test]
fn measure_size_every_cluster_size_and_refcount_width() {
    let dir = tempfile::tempdir().unwrap();
    let mut ok = 0;
    for bits in 9..=21u32 {
        for order in 0..=6u32 {
            // A few sizes per combination, unaligned ones included.
            for size in [0u64, 1 << 30, (100 << 30) + 12345, 3 << 40] {
                let opts = format!("cluster_size={},refcount_bits={}", 1u64 << bits, 1 << order);
                let (out, _, code) = same_owned(dir.path(), &size_args(size, &opts, "qcow2"));
                if code == Some(0) {
                    assert!(out.starts_with("required size: "), "{out}");
                    ok += 1;
                }
            }
        }
    }
    // Some combinations are too large for small clusters: most are not.
    assert!(ok > 300, "only {ok} successful measurements");
}

#[test]
fn measure_size_preallocation_compat_and_formats() {
    let dir = tempfile::tempdir().unwrap();
    for prealloc in ["off", "metadata", "falloc", "full"] {
        for compat in ["0.10", "1.1"] {
            for size in [0u64, 512, 1000, 65536, 10 << 20, 2 << 40] {
                let opts = format!("preallocation={prealloc},compat={compat}");
                same_owned(dir.path(), &size_args(size, &opts, "qcow2"));
                let mut json = size_args(size, &opts, "qcow2");
                json.push("--output=json".into());
                same_owned(dir.path(), &json);
            }
        }
        for size in [0u64, 1000, 1 << 30, i64::MAX as u64] {
            let opts = format!("preallocation={prealloc}");
            same_owned(dir.path(), &size_args(size, &opts, "raw"));
        }
    }
    for opts in [
        "extended_l2=on",
        "extended_l2=on,cluster_size=16k",
        "extended_l2=on,cluster_size=2M,refcount_bits=64",
        "backing_file=x,backing_fmt=qcow2",
        "lazy_refcounts=on,compression_type=zstd",
        "size=5G",
    ] {
        same_owned(dir.path(), &size_args(1 << 30, opts, "qcow2"));
    }
    // The largest sizes: 2M clusters reach exabytes, and the L1 limit.
    for size in [4u64 << 50, 1 << 61, i64::MAX as u64] {
        same_owned(dir.path(), &size_args(size, "cluster_size=2M", "qcow2"));
    }
    // The default target is raw; --size is taken once more than once (the last wins).
    same(dir.path(), &["measure", "--size", "1G"]);
    same(dir.path(), &["measure", "--size", "1G", "--size", "3k"]);
    same(
        dir.path(),
        &[
            "measure",
            "--output",
            "json",
            "--target-format=qcow2",
            "--size=1G",
        ],
    );
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(96),
        max_shrink_iters: 50,
        .. ProptestConfig::default()
    })]

    #[test]
    fn measure_size_matches_qemu(
        bits in 9u32..=21,
        order in 0u32..=6,
        size in prop_oneof![0u64..(1 << 24), 0u64..(1 << 40), 0u64..(1 << 50)],
        prealloc in prop::sample::select(vec!["off", "metadata", "falloc", "full"]),
        v2 in any::<bool>(),
        extended_l2 in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = format!(
            "cluster_size={},preallocation={prealloc},extended_l2={}",
            1u64 << bits,
            if extended_l2 { "on" } else { "off" }
        );
        if v2 {
            opts += ",compat=0.10";
        } else {
            opts += &format!(",refcount_bits={}", 1 << order);
        }
        same_owned(dir.path(), &size_args(size, &opts, "qcow2"));
    }
}

/// Images made by QEMU with data, zeros, discards, a backing file, small clusters, compressed
/// clusters, metadata preallocation, bitmaps; and raw files.
fn input_images(dir: &Path) -> Vec<String> {
    let p = |n: &str| dir.join(n);
    let io = |n: &str, cmds: &[&str]| {
        qemu_io(
            &p(n),
            "qcow2",
            &cmds.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
        );
    };
    qemu_create(&p("base.qcow2"), "", 64 << 20, &[]);
    io(
        "base.qcow2",
        &[
            "write -P 1 0 1M",
            "write -z 2M 64k",
            "write -P 2 3M 4k",
            "discard 3M 64k",
            "write -P 3 10M 100k",
            "write -z 20M 1M",
            "write -P 4 40M 512",
        ],
    );
    qemu_create(
        &p("top.qcow2"),
        "",
        80 << 20,
        &["-F", "qcow2", "-b", "base.qcow2"],
    );
    io(
        "top.qcow2",
        &[
            "write -P 9 65536 4096",
            "write -z 10M 64k",
            "write -P 5 70M 1M",
        ],
    );
    qemu_create(
        &p("small.qcow2"),
        "cluster_size=512,refcount_bits=1",
        3 << 20,
        &[],
    );
    io(
        "small.qcow2",
        &[
            "write -P 3 1000 70000",
            "write -P 4 1M 512",
            "write -P 4 1100000 512",
        ],
    );
    qemu_create(
        &p("prealloc.qcow2"),
        "preallocation=metadata",
        16 << 20,
        &[],
    );
    io("prealloc.qcow2", &["write -P 7 1M 64k"]);
    qemu_create(&p("v2.qcow2"), "compat=0.10", 10 << 20, &[]);
    io("v2.qcow2", &["write -P 1 0 128k", "write -z 1M 64k"]);
    qemu_create(&p("bitmaps.qcow2"), "", 100 << 20, &[]);
    io("bitmaps.qcow2", &["write -P 1 0 1M"]);
    for (g, name) in [
        ("512", "b1"),
        ("64k", "a-rather-long-bitmap-name-0123456789"),
        ("2M", "b3"),
    ] {
        let o = run(
            "qemu-img",
            &[
                "bitmap",
                "--add",
                "-g",
                g,
                p("bitmaps.qcow2").to_str().unwrap(),
                name,
            ],
        );
        assert!(o.status.success(), "qemu-img bitmap: {}", text(&o));
    }
    let o = run(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            p("base.qcow2").to_str().unwrap(),
            p("comp.qcow2").to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let o = run(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            p("top.qcow2").to_str().unwrap(),
            p("sparse.raw").to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    // A raw file whose size is not a multiple of 512.
    let mut odd = vec![0u8; 1_000_001];
    odd[..1000].fill(1);
    std::fs::write(p("odd.raw"), &odd).unwrap();
    [
        "base.qcow2",
        "top.qcow2",
        "small.qcow2",
        "prealloc.qcow2",
        "v2.qcow2",
        "bitmaps.qcow2",
        "comp.qcow2",
        "sparse.raw",
        "odd.raw",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn measure_of_images_matches_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let images = input_images(d);
    let targets: &[&[&str]] = &[
        &["-O", "raw"],
        &["-O", "qcow2"],
        &["-O", "qcow2", "-o", "cluster_size=512"],
        &["-O", "qcow2", "-o", "cluster_size=4k,refcount_bits=1"],
        &["-O", "qcow2", "-o", "cluster_size=2M"],
        &["-O", "qcow2", "-o", "compat=0.10"],
        &["-O", "qcow2", "-o", "preallocation=full"],
        &["-O", "qcow2", "-o", "backing_file=x,backing_fmt=raw"],
        &["-O", "qcow2", "-o", "extended_l2=on,cluster_size=32k"],
        &["--output=json", "-O", "qcow2", "-o", "cluster_size=128k"],
        &["--output=json", "-O", "raw"],
    ];
    let mut bitmap_lines = 0;
    for img in &images {
        for t in targets {
            let mut args = vec!["measure"];
            args.extend_from_slice(t);
            args.push(img);
            let (out, _, code) = same(d, &args);
            assert_eq!(code, Some(0), "{args:?}");
            let zero = out.contains("bitmaps size: 0\n") || out.contains("\"bitmaps\": 0,");
            if out.contains("bitmaps") && !zero {
                bitmap_lines += 1;
            }
        }
        // The file itself as raw (its allocation), and -U.
        same(d, &["measure", "-O", "qcow2", "-f", "raw", img]);
        same(d, &["measure", "-U", "-O", "qcow2", img]);
    }
    // bitmaps.qcow2 reports its bitmaps for every v3 qcow2 target.
    assert_eq!(bitmap_lines, 8);
}

#[test]
fn measure_errors_match_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu_create(&d.join("a.qcow2"), "", 1 << 20, &[]);
    let cases: &[&[&str]] = &[
        &["measure"],
        &["measure", "-O", "qcow2"],
        &["measure", "--size", "1G", "a.qcow2"],
        &["measure", "a.qcow2", "a.qcow2"],
        &["measure", "--size", "1Gx"],
        &["measure", "--size", "-1"],
        &["measure", "--size", "9E"],
        &["measure", "--output=xml", "--size", "1G"],
        &["measure", "-f", "qcow2", "--size", "1G"],
        &["measure", "-O", "foo", "--size", "1G"],
        &["measure", "-O", "vmdk", "--size", "1G"],
        &["measure", "-O", "bochs", "--size", "1G"],
        &["measure", "-O", "qcow2", "nonexistent.img"],
        &["measure", "-O", "qcow2", ""],
        &["measure", "-f", "foo", "a.qcow2"],
        &["measure", "-O", "foo", "nonexistent.img"],
        &["measure", "-O", "qcow2", "-o", "foo=1", "--size", "1G"],
        &["measure", "-O", "qcow2", "-o", "help", "--size", "1G"],
        &[
            "measure",
            "-O",
            "raw",
            "-o",
            "cluster_size=4k",
            "--size",
            "1G",
        ],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=abc",
            "--size",
            "1G",
        ],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=3000",
            "--size",
            "1G",
        ],
        &["measure", "-O", "qcow2", "-o", "cluster_size=4M", "a.qcow2"],
        &["measure", "-O", "qcow2", "-o", "compat=2", "--size", "1G"],
        &["measure", "-O", "qcow2", "-o", "compat=v3", "--size", "1G"],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "refcount_bits=x",
            "--size",
            "1G",
        ],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "refcount_bits=3",
            "--size",
            "1G",
        ],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "refcount_bits=128",
            "--size",
            "1G",
        ],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "compat=0.10,refcount_bits=8",
            "--size",
            "1G",
        ],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "lazy_refcounts=maybe",
            "--size",
            "1G",
        ],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "preallocation=bad",
            "--size",
            "1G",
        ],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=4k",
            "--size",
            "1G",
        ],
        &["measure", "-O", "qcow2", "-o", "size=16E", "a.qcow2"],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=512",
            "--size",
            "1P",
        ],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=2M",
            "--size",
            "9223372036854775807",
        ],
    ];
    for args in cases {
        let (_, err, code) = same(d, args);
        assert_eq!(code, Some(1), "{args:?}");
        assert!(err.starts_with("qemu-img: "), "{args:?}: {err}");
    }
}

/// `--image-opts`: the input named by an option list, with qemu-img's results.
#[test]
fn image_opts_as_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu_create(&d.join("a.qcow2"), "", 4 << 20, &[]);
    qemu_io(&d.join("a.qcow2"), "qcow2", &["write -P 3 1M 1M".into()]);
    let spec = "driver=qcow2,file.filename=a.qcow2";
    let m = ["measure", "-O", "qcow2", "--image-opts", spec];
    let (a, b) = (qimg_in(d, &m), qemu_in(d, &m));
    assert!(a.status.success(), "{}", text(&a));
    assert_eq!(a.stdout, b.stdout);
    let ifs = format!("if={spec}");
    for (tool, out) in [("qimg", "b.img"), ("qemu-img", "c.img")] {
        let of = format!("of={out}");
        let args = ["dd", "--image-opts", &ifs, &of, "bs=1M", "count=3"];
        let o = if tool == "qimg" {
            qimg_in(d, &args)
        } else {
            qemu_in(d, &args)
        };
        assert!(o.status.success(), "{tool}: {}", text(&o));
    }
    assert_eq!(
        std::fs::read(d.join("b.img")).unwrap(),
        std::fs::read(d.join("c.img")).unwrap()
    );
}

/// What is not implemented is refused with a message, never accepted and ignored.
#[test]
fn unsupported_options_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu_create(&d.join("a.qcow2"), "", 1 << 20, &[]);
    let cases: &[&[&str]] = &[
        &["measure", "--object", "iothread,id=t0", "--size", "1G"],
        &["measure", "-O", "luks", "--size", "1G"],
        &["dd", "--object", "iothread,id=t0", "if=a.qcow2", "of=b.img"],
        &["dd", "-O", "vmdk", "if=a.qcow2", "of=b.img"],
    ];
    for args in cases {
        let o = qimg_in(d, args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        assert!(o.stdout.is_empty(), "{args:?}");
        assert!(err.contains("not supported"), "{args:?}: {err}");
    }
    assert!(!d.join("b.img").exists(), "a refused dd created its output");
}

/// The output images of both programs: same format and virtual size, same content, same
/// allocation (qemu-img map without host offsets).
fn same_images(d: &Path, a: &str, b: &str) {
    let info = |f: &str| {
        let o = run(
            "qemu-img",
            &["info", "--output=json", d.join(f).to_str().unwrap()],
        );
        assert!(o.status.success(), "{}", text(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        (v["format"].clone(), v["virtual-size"].clone())
    };
    assert_eq!(info(a), info(b), "{a} vs {b}");
    let o = run(
        "qemu-img",
        &[
            "compare",
            d.join(a).to_str().unwrap(),
            d.join(b).to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{a} vs {b}: {}", text(&o));
    let map = |f: &str| {
        let o = run(
            "qemu-img",
            &["map", "--output=json", d.join(f).to_str().unwrap()],
        );
        assert!(o.status.success(), "{}", text(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let mut e = e.clone();
                e.as_object_mut().unwrap().remove("offset");
                e
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(map(a), map(b), "allocation of {a} vs {b}");
}

#[test]
fn dd_matches_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    input_images(d);
    let cases: &[&[&str]] = &[
        &["if=base.qcow2"],
        &["if=base.qcow2", "-O", "qcow2"],
        &["if=base.qcow2", "bs=1M", "count=3", "skip=2", "-O", "qcow2"],
        &["if=base.qcow2", "bs=64k", "count=100000"],
        &["if=base.qcow2", "bs=1999", "count=600", "-O", "qcow2"],
        &["if=base.qcow2", "bs=5", "count=1", "-O", "qcow2"],
        &["if=base.qcow2", "bs=5", "count=1"],
        &["if=base.qcow2", "bs=1.5k", "count=3"],
        &["if=base.qcow2", "bs=0x10", "count=010"],
        &["if=base.qcow2", "count=0", "-O", "qcow2"],
        &["if=base.qcow2", "bs=4k", "skip=5000000", "-O", "qcow2"],
        &[
            "if=base.qcow2",
            "bs=4k",
            "count=10",
            "skip=9223372036854775807",
        ],
        &["if=base.qcow2", "bs=512", "bs=4k", "count=1", "count=2"],
        &[
            "if=top.qcow2",
            "-O",
            "qcow2",
            "bs=64k",
            "count=1200",
            "skip=3",
        ],
        &["if=small.qcow2", "-O", "qcow2", "bs=1999"],
        &[
            "if=comp.qcow2",
            "-f",
            "qcow2",
            "bs=1M",
            "count=12",
            "-O",
            "qcow2",
        ],
        &["if=sparse.raw", "-f", "raw", "bs=1M", "count=12"],
        &["if=odd.raw", "-O", "qcow2"],
        &[
            "if=odd.raw",
            "-f",
            "raw",
            "bs=999",
            "skip=1000",
            "-O",
            "qcow2",
        ],
        &["if=odd.raw", "-f", "raw", "bs=1000", "count=1001"],
        &["if=odd.raw", "-U", "--output-format=raw", "-f", "raw"],
        &["-f", "qcow2", "-O", "qcow2", "if=prealloc.qcow2", "bs=64k"],
    ];
    for (n, case) in cases.iter().enumerate() {
        let a = format!("qemu-{n}.img");
        let b = format!("qimg-{n}.img");
        let mut args = vec!["dd"];
        args.extend_from_slice(case);
        let out_a = format!("of={a}");
        let out_b = format!("of={b}");
        let ra = shown(&qemu_in(d, &[&args[..], &[out_a.as_str()]].concat()));
        let rb = shown(&qimg_in(d, &[&args[..], &[out_b.as_str()]].concat()));
        assert_eq!(ra, rb, "{case:?}");
        assert_eq!(ra.2, Some(0), "{case:?}: {}", ra.1);
        same_images(d, &a, &b);
    }
}

#[test]
fn dd_errors_match_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu_create(&d.join("a.qcow2"), "", 1 << 20, &[]);
    let cases: &[&[&str]] = &[
        &["dd"],
        &["dd", "if=a.qcow2"],
        &["dd", "of=x.img"],
        &["dd", "if=a.qcow2", "of=x.img", "bs=0"],
        &["dd", "if=a.qcow2", "of=x.img", "bs=-1"],
        &["dd", "if=a.qcow2", "of=x.img", "bs=2G"],
        &["dd", "if=a.qcow2", "of=x.img", "bs=9E"],
        &["dd", "if=a.qcow2", "of=x.img", "bs=1x"],
        &["dd", "if=a.qcow2", "of=x.img", "bs="],
        &["dd", "if=a.qcow2", "of=x.img", "bs=5 "],
        &["dd", "if=a.qcow2", "of=x.img", "count=-1"],
        &["dd", "if=a.qcow2", "of=x.img", "count=1k"],
        &["dd", "if=a.qcow2", "of=x.img", "count=0x"],
        &["dd", "if=a.qcow2", "of=x.img", "count=08"],
        &["dd", "if=a.qcow2", "of=x.img", "count=99999999999999999999"],
        &["dd", "if=a.qcow2", "of=x.img", "skip=x"],
        &["dd", "if=a.qcow2", "of=x.img", "skip="],
        &["dd", "if=a.qcow2", "of=x.img", "foo=1"],
        &["dd", "if=a.qcow2", "of=x.img", "foo"],
        &["dd", "=1", "if=a.qcow2", "of=x.img"],
        &["dd", "if=nonexistent", "of=x.img"],
        &["dd", "if=", "of=x.img"],
        &["dd", "-f", "foo", "if=a.qcow2", "of=x.img"],
        &["dd", "-O", "foo", "if=a.qcow2", "of=x.img"],
        &["dd", "if=a.qcow2", "of=/nonexistent-dir/x.img"],
    ];
    for args in cases {
        let (_, err, code) = same(d, args);
        assert_eq!(code, Some(1), "{args:?}");
        assert!(err.starts_with("qemu-img: "), "{args:?}: {err}");
        let _ = std::fs::remove_file(d.join("x.img"));
    }
}
