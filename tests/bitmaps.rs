//! Persistent dirty bitmaps, against QEMU:
//! - bitmaps QEMU made are kept and updated by qimg's writes, write-zeroes and discards, and
//!   QEMU then reads exactly the written extents, rounded to the granularity, as dirty (through
//!   `qemu-nbd -B` and `nbdinfo --map`); disabled bitmaps do not change; `qemu-img check` is clean;
//! - bitmaps qimg made are read by QEMU, and `qimg serve -B` reports what `qemu-nbd -B` reports;
//! - `qimg bitmap` gives qemu-img's results and messages, `info` and `convert --bitmaps` too;
//! - a crash leaves the bitmaps `in-use` (inconsistent): refused by qimg as by QEMU, removable;
//! - resizing keeps the bitmaps usable by QEMU; applying a snapshot is refused, as by QEMU;
//! - the engine against a model: random writes, write-zeroes and discards, reopened;
//! - power loss at any storage operation of a session never leaves a bitmap that is not
//!   `in-use` and misses a write.
//!
//! Needs qemu-img, qemu-io, qemu-nbd (qemu-utils) and nbdinfo (libnbd-bin).

mod common;

use common::*;
use proptest::prelude::*;
use qimg::qcow2::{create, CreateOptions, Qcow2, Qcow2Options};
use qimg::storage::crash::{CrashPolicy, CrashStorage};
use qimg::storage::memory::MemoryStorage;
use qimg::{BlockDevice, CacheMode, IoBuf, ZeroFlags};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

const QIMG: &str = env!("CARGO_BIN_EXE_qimg");

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn qimg(args: &[&str]) -> std::process::Output {
    run(QIMG, args)
}

fn ok(o: std::process::Output) -> String {
    assert!(o.status.success(), "failed: {}", text(&o));
    text(&o)
}

/// The dirty extents `(start, length)` of bitmap `name` as a server reports them: `server` is
/// "qemu-nbd" or "qimg" (serve), run read-only with `-B name` on a Unix socket; the map is read
/// by nbdinfo.
fn dirty_map(server: &str, img: &Path, name: &str) -> Vec<(u64, u64)> {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let mut cmd = if server == "qimg" {
        let mut c = Command::new(QIMG);
        c.arg("serve");
        c
    } else {
        Command::new(server)
    };
    let o = cmd
        .args([
            "-r",
            "-f",
            "qcow2",
            "-t",
            "--fork",
            "-B",
            name,
            "-k",
            s(&sock),
        ])
        .arg("--pid-file")
        .arg(dir.path().join("pid"))
        .arg(img)
        .output()
        .unwrap();
    assert!(o.status.success(), "{server} -B {name}: {}", text(&o));
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let map = run(
        "nbdinfo",
        &[&format!("--map=qemu:dirty-bitmap:{name}"), &uri],
    );
    let pid = std::fs::read_to_string(dir.path().join("pid")).unwrap();
    let _ = Command::new("kill").arg(pid.trim()).status();
    let t = std::time::Instant::now();
    while sock.exists() && t.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(map.status.success(), "nbdinfo: {}", text(&map));
    String::from_utf8_lossy(&map.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3 && f[2] == "1").then(|| (f[0].parse().unwrap(), f[1].parse().unwrap()))
        })
        .collect()
}

/// The dirty extents a set of byte ranges gives at granularity `g` on a disk of `size` bytes.
fn model_map(ranges: &[(u64, u64)], g: u64, size: u64) -> Vec<(u64, u64)> {
    let mut dirty = vec![false; size.div_ceil(g) as usize];
    for &(off, len) in ranges {
        for i in off / g..(off + len).min(size).div_ceil(g) {
            dirty[i as usize] = true;
        }
    }
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (i, &d) in dirty.iter().enumerate() {
        if !d {
            continue;
        }
        let start = i as u64 * g;
        let len = g.min(size - start);
        match out.last_mut() {
            Some(last) if last.0 + last.1 == start => last.1 += len,
            _ => out.push((start, len)),
        }
    }
    out
}

/// The `Format specific information` bitmaps block of `info` (human output).
fn info_bitmaps(prog: &str, img: &Path) -> String {
    let o = if prog == "qimg" {
        qimg(&["info", s(img)])
    } else {
        run("qemu-img", &["info", s(img)])
    };
    let t = ok(o);
    t.lines()
        .skip_while(|l| !l.starts_with("    bitmaps:"))
        .take_while(|l| l.starts_with("        ") || l.starts_with("    bitmaps:"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn qimg_writes_update_bitmaps_qemu_made() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    let size = 64u64 << 20;
    qemu_create(&img, "", size, &[]);
    ok(run("qemu-img", &["bitmap", "--add", s(&img), "b0"]));
    ok(run(
        "qemu-img",
        &["bitmap", "--add", "-g", "1M", s(&img), "b1"],
    ));
    ok(run(
        "qemu-img",
        &["bitmap", "--add", "-g", "4k", s(&img), "b4k"],
    ));
    ok(run(
        "qemu-img",
        &["bitmap", "--add", "--disable", s(&img), "off"],
    ));
    let ranges = [
        (1 << 20, 4096),
        ((8 << 20) + 100, 70 << 10),
        (16 << 20, 128 << 10),
        ((40 << 20) - 1, 2),
        (size - 512, 512),
    ];
    ok(qimg(&[
        "io",
        "-f",
        "qcow2",
        "-c",
        "write 1M 4k",
        "-c",
        "write -z 8388708 71680",
        "-c",
        "discard 16M 128k",
        "-c",
        "write 41943039 2",
        "-c",
        "write 67108352 512",
        s(&img),
    ]));
    qemu_check_clean(&img);
    assert_eq!(info_bitmaps("qimg", &img), info_bitmaps("qemu-img", &img));
    assert!(!info_bitmaps("qemu-img", &img).contains("in-use"));
    for (name, g) in [("b0", 64 << 10), ("b1", 1 << 20), ("b4k", 4096)] {
        assert_eq!(
            dirty_map("qemu-nbd", &img, name),
            model_map(&ranges, g, size),
            "bitmap {name}"
        );
    }
    assert!(dirty_map("qemu-nbd", &img, "off").is_empty());
    // A second session adds to what the first recorded.
    ok(qimg(&["io", "-f", "qcow2", "-c", "write 30M 1", s(&img)]));
    let mut more = ranges.to_vec();
    more.push((30 << 20, 1));
    assert_eq!(
        dirty_map("qemu-nbd", &img, "b0"),
        model_map(&more, 64 << 10, size)
    );
    qemu_check_clean(&img);
}

#[test]
fn qemu_reads_bitmaps_qimg_made() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    let size = 32u64 << 20;
    ok(qimg(&["create", "-q", "-f", "qcow2", s(&img), "32M"]));
    ok(qimg(&["bitmap", "--add", s(&img), "b0"]));
    ok(qimg(&["bitmap", "--add", "-g", "512", s(&img), "fine"]));
    ok(qimg(&["bitmap", "--add", "--disable", s(&img), "off"]));
    qemu_check_clean(&img);
    qemu_io(
        &img,
        "qcow2",
        &["write 3M 1M".into(), "write -z 20M 4097".into()],
    );
    qemu_check_clean(&img);
    let ranges = [(3 << 20, 1 << 20), (20 << 20, 4097)];
    for (name, g) in [("b0", 64 << 10), ("fine", 512)] {
        let want = model_map(&ranges, g, size);
        assert_eq!(dirty_map("qemu-nbd", &img, name), want, "{name} (qemu-nbd)");
        assert_eq!(dirty_map("qimg", &img, name), want, "{name} (qimg serve)");
    }
    assert!(dirty_map("qimg", &img, "off").is_empty());
    let ours = ok(qimg(&["info", "--output=json", s(&img)]));
    let theirs = ok(run("qemu-img", &["info", "--output=json", s(&img)]));
    let bitmaps = |t: &str| {
        let v: serde_json::Value = serde_json::from_str(t).unwrap();
        v["format-specific"]["data"]["bitmaps"].clone()
    };
    assert_eq!(bitmaps(&ours), bitmaps(&theirs));
    assert_eq!(bitmaps(&ours).as_array().map(Vec::len), Some(3));
}

/// Runs the same `bitmap` command lines with qemu-img and with qimg on two copies of an image;
/// exit statuses, messages and the resulting bitmaps must agree.
#[test]
fn bitmap_command_matches_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    qemu_create(&base, "", 16 << 20, &[]);
    ok(run("qemu-img", &["bitmap", "--add", s(&base), "src"]));
    qemu_io(&base, "qcow2", &["write 5M 64k".into()]);
    let steps: Vec<Vec<&str>> = vec![
        vec!["--add", "b0"],
        vec!["--add", "b0"],
        vec!["--add", "-g", "1000", "bad"],
        vec!["--add", "-g", "8k", "--disable", "b1"],
        vec!["--remove", "nope"],
        vec!["--clear", "nope"],
        vec!["--enable", "b1"],
        vec!["--disable", "b0"],
        vec!["--merge", "src", "-b", "BASE", "-F", "qcow2", "b0"],
        vec!["--merge", "missing", "-b", "BASE", "-F", "qcow2", "b0"],
        vec!["--clear", "--add", "new"],
        vec!["--add", "--merge", "b0", "copy"],
        vec!["--remove", "b1"],
        vec!["--add", ""],
        vec!["-g", "64k", "--remove", "x"],
        vec![],
    ];
    let imgs: Vec<_> = ["q", "ours"]
        .iter()
        .map(|n| {
            let p = dir.path().join(format!("{n}.qcow2"));
            qemu_create(&p, "", 16 << 20, &[]);
            p
        })
        .collect();
    for step in steps {
        let mut outs = Vec::new();
        for (prog, img) in [("qemu-img", &imgs[0]), (QIMG, &imgs[1])] {
            let mut args = vec!["bitmap", "-f", "qcow2"];
            let replaced: Vec<&str> = step
                .iter()
                .map(|a| if *a == "BASE" { s(&base) } else { a })
                .collect();
            let (name, opts) = match replaced.split_last() {
                Some((n, o)) => (Some(*n), o.to_vec()),
                None => (None, Vec::new()),
            };
            args.extend(opts);
            args.push(s(img));
            args.extend(name);
            let o = run(prog, &args);
            let msg = String::from_utf8_lossy(&o.stderr)
                .lines()
                .next()
                .unwrap_or_default()
                .replace("qemu-img: ", "")
                .replace("qimg: ", "");
            outs.push((o.status.code(), msg));
        }
        assert_eq!(outs[0], outs[1], "step {step:?}");
        assert_eq!(
            info_bitmaps("qimg", &imgs[1]),
            info_bitmaps("qemu-img", &imgs[0]),
            "after {step:?}"
        );
        qemu_check_clean(&imgs[1]);
    }
    assert_eq!(
        dirty_map("qemu-nbd", &imgs[1], "copy"),
        dirty_map("qemu-nbd", &imgs[0], "copy")
    );
    assert_eq!(
        dirty_map("qemu-nbd", &imgs[1], "copy"),
        vec![(5 << 20, 64 << 10)]
    );
}

#[test]
fn a_crash_leaves_bitmaps_in_use_and_they_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    qemu_create(&img, "", 16 << 20, &[]);
    ok(run("qemu-img", &["bitmap", "--add", s(&img), "b0"]));
    ok(run(
        "qemu-img",
        &["bitmap", "--add", "--disable", s(&img), "b1"],
    ));
    // qemu-io's abort: the process dies with the image open for writing.
    let o = qimg(&[
        "io",
        "-f",
        "qcow2",
        "-c",
        "write 0 64k",
        "-c",
        "abort",
        s(&img),
    ]);
    assert!(!o.status.success());
    let info = info_bitmaps("qemu-img", &img);
    assert_eq!(info.matches("in-use").count(), 2, "{info}");
    assert_eq!(info_bitmaps("qimg", &img), info);
    let (_, corruptions, _, t) = qemu_check(&img);
    assert_eq!(corruptions, 0, "{t}");
    // Refused by qimg as by QEMU.
    let dir2 = tempfile::tempdir().unwrap();
    let sock = dir2.path().join("s");
    let ours = qimg(&[
        "serve",
        "-r",
        "-f",
        "qcow2",
        "-B",
        "b0",
        "-k",
        s(&sock),
        s(&img),
    ]);
    assert!(!ours.status.success());
    assert!(
        text(&ours).contains("Bitmap 'b0' is inconsistent and cannot be used"),
        "{}",
        text(&ours)
    );
    for op in ["--clear", "--enable"] {
        let q = run("qemu-img", &["bitmap", op, "-f", "qcow2", s(&img), "b0"]);
        let o = qimg(&["bitmap", op, "-f", "qcow2", s(&img), "b0"]);
        assert_eq!(q.status.code(), o.status.code());
        assert_eq!(
            text(&q).replace("qemu-img:", ""),
            text(&o).replace("qimg:", "")
        );
    }
    // Still in use after qimg's rejected operations (nothing may have been stored over it).
    assert_eq!(info_bitmaps("qemu-img", &img).matches("in-use").count(), 2);
    ok(qimg(&["bitmap", "--remove", s(&img), "b0"]));
    ok(qimg(&["bitmap", "--remove", s(&img), "b1"]));
    assert_eq!(info_bitmaps("qemu-img", &img), "");
    ok(run("qemu-img", &["check", "-r", "leaks", s(&img)]));
    qemu_check_clean(&img);
}

#[test]
fn resize_keeps_bitmaps_usable() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    qemu_create(&img, "", 16 << 20, &[]);
    ok(run(
        "qemu-img",
        &["bitmap", "--add", "-g", "4k", s(&img), "b0"],
    ));
    ok(qimg(&[
        "io",
        "-f",
        "qcow2",
        "-c",
        "write 1M 4k",
        "-c",
        "write 15M 4k",
        s(&img),
    ]));
    ok(qimg(&["resize", "-f", "qcow2", s(&img), "1G"]));
    ok(qimg(&["io", "-f", "qcow2", "-c", "write 900M 4k", s(&img)]));
    qemu_check_clean(&img);
    assert_eq!(
        dirty_map("qemu-nbd", &img, "b0"),
        vec![(1 << 20, 4096), (15 << 20, 4096), (900 << 20, 4096)]
    );
    ok(qimg(&["resize", "-f", "qcow2", "--shrink", s(&img), "8M"]));
    qemu_check_clean(&img);
    assert_eq!(dirty_map("qemu-nbd", &img, "b0"), vec![(1 << 20, 4096)]);
    // QEMU can go on using it.
    ok(run("qemu-img", &["bitmap", "--clear", s(&img), "b0"]));
    assert!(dirty_map("qimg", &img, "b0").is_empty());
}

#[test]
fn snapshots_with_bitmaps_as_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    qemu_create(&img, "", 16 << 20, &[]);
    ok(qimg(&["bitmap", "--add", s(&img), "b0"]));
    ok(qimg(&["snapshot", "-c", "s1", s(&img)]));
    let ours = qimg(&["snapshot", "-a", "s1", s(&img)]);
    let theirs = run("qemu-img", &["snapshot", "-a", "s1", s(&img)]);
    assert_eq!(ours.status.code(), theirs.status.code());
    assert_eq!(
        text(&ours).replace("qimg:", ""),
        text(&theirs).replace("qemu-img:", "")
    );
    ok(qimg(&["snapshot", "-d", "s1", s(&img)]));
    qemu_check_clean(&img);
    assert_eq!(info_bitmaps("qimg", &img), info_bitmaps("qemu-img", &img));
}

#[test]
fn convert_bitmaps_matches_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.qcow2");
    qemu_create(&src, "", 16 << 20, &[]);
    for args in [
        vec!["--add", "a"],
        vec!["--add", "-g", "1M", "--disable", "b"],
        vec!["--add", "c"],
    ] {
        let mut v = vec!["bitmap"];
        v.extend(args);
        v.push(s(&src));
        let name = v.remove(v.len() - 2);
        v.push(name);
        ok(run("qemu-img", &v));
    }
    qemu_io(&src, "qcow2", &["write 2M 100k".into()]);
    let ours = dir.path().join("ours.qcow2");
    let theirs = dir.path().join("theirs.qcow2");
    ok(qimg(&[
        "convert",
        "--bitmaps",
        "-O",
        "qcow2",
        s(&src),
        s(&ours),
    ]));
    ok(run(
        "qemu-img",
        &["convert", "--bitmaps", "-O", "qcow2", s(&src), s(&theirs)],
    ));
    qemu_check_clean(&ours);
    assert_eq!(
        info_bitmaps("qemu-img", &ours),
        info_bitmaps("qemu-img", &theirs)
    );
    for b in ["a", "b", "c"] {
        assert_eq!(
            dirty_map("qemu-nbd", &ours, b),
            dirty_map("qemu-nbd", &theirs, b),
            "{b}"
        );
    }
    // Refusals, worded as qemu-img's.
    let raw = dir.path().join("t.raw");
    let o = qimg(&["convert", "--bitmaps", "-O", "raw", s(&src), s(&raw)]);
    assert!(text(&o).contains("Format driver 'raw' does not support bitmaps"));
    let o = qimg(&[
        "convert",
        "--skip-broken-bitmaps",
        "-O",
        "qcow2",
        s(&src),
        s(&raw),
    ]);
    assert!(text(&o).contains("Use of --skip-broken-bitmaps requires --bitmaps"));
    let _ = qimg(&["io", "-f", "qcow2", "-c", "abort", s(&src)]);
    let o = qimg(&[
        "convert",
        "--bitmaps",
        "-O",
        "qcow2",
        s(&src),
        s(&dir.path().join("x")),
    ]);
    assert!(
        text(&o).contains("Cannot copy inconsistent bitmap 'c'"),
        "{}",
        text(&o)
    );
    let skipped = dir.path().join("skipped.qcow2");
    let o = qimg(&[
        "convert",
        "--bitmaps",
        "--skip-broken-bitmaps",
        "-O",
        "qcow2",
        s(&src),
        s(&skipped),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(text(&o).matches("Skipping inconsistent bitmap").count(), 3);
    assert_eq!(info_bitmaps("qemu-img", &skipped), "");
}

async fn open(mem: &Arc<MemoryStorage>, read_only: bool) -> qimg::Result<Qcow2> {
    Qcow2::open(
        mem.clone(),
        "mem".into(),
        &Qcow2Options::default(),
        read_only,
        CacheMode::Writeback,
    )
    .await
}

#[derive(Clone, Debug)]
enum Op {
    Write(u64, u64),
    Zero(u64, u64),
    Discard(u64, u64),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let size = 8u64 << 20;
    let range = (0..size - 1).prop_flat_map(move |off| (Just(off), 1..(size - off).min(300 << 10)));
    prop_oneof![
        range.clone().prop_map(|(o, l)| Op::Write(o, l)),
        range.clone().prop_map(|(o, l)| Op::Zero(o, l)),
        range.prop_map(|(o, l)| Op::Discard(o, l)),
        Just(Op::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// The engine against a model of the dirty set: every write, write-zeroes and discard marks
    /// its whole range (as QEMU's block layer does), across reopens, in every granularity.
    #[test]
    fn engine_matches_a_model(gran_bits in 9u32..18, ops in proptest::collection::vec(op(), 1..24)) {
        let size = 8u64 << 20;
        let g = 1u64 << gran_bits;
        let rt = rt();
        rt.block_on(async {
            let mem = Arc::new(MemoryStorage::new());
            create(mem.clone(), &CreateOptions { size, ..Default::default() }).await.unwrap();
            let mut q = open(&mem, false).await.unwrap();
            q.bitmap_add("b", Some(g), true).await.unwrap();
            q.bitmap_add("off", None, false).await.unwrap();
            let mut ranges = Vec::new();
            for op in ops {
                match op {
                    Op::Write(o, l) => {
                        q.write_at(o, IoBuf::copy_from(&pattern(o, l as usize))).await.unwrap();
                        ranges.push((o, l));
                    }
                    Op::Zero(o, l) => {
                        q.write_zeroes(o, l, ZeroFlags::default()).await.unwrap();
                        ranges.push((o, l));
                    }
                    Op::Discard(o, l) => {
                        BlockDevice::discard(&q, o, l).await.unwrap();
                        ranges.push((o, l));
                    }
                    Op::Reopen => {
                        q.close().await.unwrap();
                        q = open(&mem, false).await.unwrap();
                    }
                }
            }
            q.close().await.unwrap();
            let q = open(&mem, true).await.unwrap();
            let bits = q.bitmap_bits("b").await.unwrap();
            let mut got = Vec::new();
            let mut pos = 0;
            while pos < size {
                let (n, dirty) = bits.extent(pos, size - pos);
                if dirty {
                    got.push((pos, n));
                }
                pos += n;
            }
            assert_eq!(got, model_map(&ranges, g, size));
            assert!(q.bitmap_bits("off").await.unwrap().is_clean());
            q.close().await.unwrap();
        });
    }
}

/// Power loss before every storage operation of a session that opens an image with bitmaps,
/// writes, and closes it. Whatever survives, a bitmap that is not `in-use` holds every write
/// acknowledged before the close that stored it; in-use bitmaps are left alone; the image opens.
#[test]
fn power_loss_never_leaves_a_clean_bitmap_missing_a_write() {
    let rt = rt();
    let size = 4u64 << 20;
    let initial = rt.block_on(async {
        let mem = Arc::new(MemoryStorage::new());
        create(
            mem.clone(),
            &CreateOptions {
                size,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let q = open(&mem, false).await.unwrap();
        q.bitmap_add("b", Some(65536), true).await.unwrap();
        q.write_at(0, IoBuf::copy_from(&[1u8; 4096])).await.unwrap();
        q.close().await.unwrap();
        mem.snapshot()
    });
    let session = |storage: Arc<CrashStorage>| async move {
        let q = Qcow2::open(
            storage,
            "crash".into(),
            &Qcow2Options::default(),
            false,
            CacheMode::Writeback,
        )
        .await?;
        q.write_at(1 << 20, IoBuf::copy_from(&[2u8; 4096])).await?;
        q.write_zeroes(3 << 20, 65536, ZeroFlags::default()).await?;
        q.close().await
    };
    // How many operations a whole session takes.
    let total = rt.block_on(async {
        let c = Arc::new(CrashStorage::new(&initial));
        session(c.clone()).await.unwrap();
        c.ops()
    });
    assert!(total > 5);
    for at in 1..=total + 1 {
        for policy in [
            CrashPolicy::KeepNone,
            CrashPolicy::KeepAll,
            CrashPolicy::Random(at),
        ] {
            let after = rt.block_on(async {
                let c = Arc::new(CrashStorage::new(&initial));
                c.arm(at, policy);
                let _ = session(c.clone()).await;
                c.captured().unwrap_or_else(|| c.crash_now(policy))
            });
            rt.block_on(async {
                let mem = Arc::new(after);
                let q = open(&mem, true)
                    .await
                    .unwrap_or_else(|e| panic!("crash at {at} ({policy:?}): open: {e}"));
                let info = q.bitmap_list();
                assert_eq!(info.len(), 1, "crash at {at}");
                if !info[0].in_use {
                    let bits = q.bitmap_bits("b").await.unwrap();
                    assert!(bits.is_dirty(0), "crash at {at}: the first session's write");
                    // Stored clean by this session's close: its writes are in it.
                    let second = bits.is_dirty(1 << 20);
                    if second || bits.is_dirty(3 << 20) {
                        assert!(
                            second && bits.is_dirty(3 << 20),
                            "crash at {at}: torn bitmap"
                        );
                    } else {
                        // The old directory: the session cannot have written anything.
                        let buf = q
                            .read_at(1 << 20, qimg::IoBufMut::zeroed(4096))
                            .await
                            .unwrap();
                        assert!(
                            buf.iter().all(|&b| b == 0),
                            "crash at {at} ({policy:?}): a write the clean bitmap misses"
                        );
                    }
                }
                q.close().await.unwrap();
            });
        }
    }
}

/// The README's incremental backup example, run as written (the `sh` block of its section), with
/// this build's qimg first on PATH.
#[test]
fn readme_incremental_backup_example_works() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme
        .split("### Incremental backups: dirty bitmaps")
        .nth(1)
        .expect("the README's incremental backup section");
    let script = section
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("its sh block");
    let dir = tempfile::tempdir().unwrap();
    let bin = Path::new(QIMG).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let o = Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .current_dir(dir.path())
        .env("PATH", path)
        .output()
        .unwrap();
    let out = text(&o);
    assert!(o.status.success(), "README example failed:\n{out}");
    assert!(out.contains("Images are identical."), "{out}");
    let dirty = std::fs::read_to_string(dir.path().join("dirty.txt")).unwrap();
    assert_eq!(dirty, "4194304 1048576\n314572800 65536\n");
    qemu_check_clean(&dir.path().join("disk.qcow2"));
}

/// `amend` with bitmaps: a new refcount width keeps them (stored, not `in-use`, usable by
/// QEMU); a downgrade to compat=0.10, which cannot hold them, is refused.
#[test]
fn amend_keeps_bitmaps_or_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    qemu_create(&img, "", 64 << 20, &[]);
    ok(run("qemu-img", &["bitmap", "--add", s(&img), "b0"]));
    ok(qimg(&["io", "-f", "qcow2", "-c", "write 1M 64k", s(&img)]));
    ok(qimg(&["amend", "-o", "refcount_bits=64", s(&img)]));
    qemu_check_clean(&img);
    assert!(!info_bitmaps("qemu-img", &img).contains("in-use"));
    assert_eq!(dirty_map("qemu-nbd", &img, "b0"), vec![(1 << 20, 64 << 10)]);
    ok(qimg(&["amend", "-o", "refcount_bits=16", s(&img)]));
    let o = qimg(&["amend", "-o", "compat=0.10", s(&img)]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("persistent dirty bitmaps"),
        "{}",
        text(&o)
    );
    qemu_check_clean(&img);
    assert_eq!(dirty_map("qemu-nbd", &img, "b0"), vec![(1 << 20, 64 << 10)]);
}

/// A server killed with SIGKILL while it writes: its bitmaps stay `in-use` (QEMU and qimg both
/// see them as inconsistent), the image has nothing worse than leaks.
#[test]
fn kill9_of_a_writing_server_leaves_bitmaps_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    qemu_create(&img, "", 64 << 20, &[]);
    ok(run("qemu-img", &["bitmap", "--add", s(&img), "b0"]));
    let sock = dir.path().join("s.sock");
    let pid = dir.path().join("pid");
    ok(qimg(&[
        "serve",
        "-t",
        "-f",
        "qcow2",
        "--fork",
        "--pid-file",
        s(&pid),
        "-k",
        s(&sock),
        s(&img),
    ]));
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let o = run(
        "qemu-io",
        &["-f", "raw", "-c", "write 2M 1M", "-c", "flush", &uri],
    );
    assert!(o.status.success(), "{}", text(&o));
    let p = std::fs::read_to_string(&pid).unwrap();
    assert!(Command::new("kill")
        .args(["-9", p.trim()])
        .status()
        .unwrap()
        .success());
    let t = std::time::Instant::now();
    while std::path::Path::new(&format!("/proc/{}", p.trim())).exists()
        && t.elapsed() < std::time::Duration::from_secs(10)
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(info_bitmaps("qemu-img", &img).contains("in-use"));
    assert_eq!(info_bitmaps("qimg", &img), info_bitmaps("qemu-img", &img));
    let (_, corruptions, _, t) = qemu_check(&img);
    assert_eq!(corruptions, 0, "{t}");
    let o = qimg(&["bitmap", "--clear", s(&img), "b0"]);
    assert!(
        text(&o).contains("is inconsistent and cannot be used"),
        "{}",
        text(&o)
    );
    // The written data survived (it was flushed).
    let o = run(
        "qemu-io",
        &["-f", "qcow2", "-r", "-c", "read -P 0xcd 2M 1M", s(&img)],
    );
    assert!(
        o.status.success() && !text(&o).contains("fail"),
        "{}",
        text(&o)
    );
}

/// Regressions from review: failures and races around storing bitmaps.
mod failures {
    use super::*;
    use qimg::qcow2::Preallocation;
    use qimg::storage::fault::{FaultError, FaultStorage, OpKind};
    use qimg::storage::latency::LatencyStorage;
    use qimg::IoBufMut;
    use std::time::Duration;

    async fn base(size: u64) -> Arc<MemoryStorage> {
        let mem = Arc::new(MemoryStorage::new());
        create(
            mem.clone(),
            &CreateOptions {
                size,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let q = open(&mem, false).await.unwrap();
        q.bitmap_add("b", Some(65536), true).await.unwrap();
        q.close().await.unwrap();
        mem
    }

    /// What the disk holds now: (bitmap in use, dirty at `at`, byte at `at`).
    async fn after(mem: &Arc<MemoryStorage>, name: &str, at: u64) -> (bool, bool, u8) {
        let copy = Arc::new(MemoryStorage::from_bytes(&mem.to_vec()));
        let q = open(&copy, true).await.unwrap();
        let info = q.bitmap_list();
        let b = info.iter().find(|b| b.name == name).unwrap();
        let dirty = if b.in_use {
            false
        } else {
            q.bitmap_bits(name).await.unwrap().is_dirty(at)
        };
        let buf = q.read_at(at, IoBufMut::zeroed(512)).await.unwrap();
        let byte = buf[0];
        q.close().await.unwrap();
        (b.in_use, dirty, byte)
    }

    #[test]
    fn a_failed_store_at_close_still_flushes_the_data() {
        rt().block_on(async {
            let mem = base(8 << 20).await;
            let fs = Arc::new(FaultStorage::new(mem.clone()));
            let h = fs.handle();
            let q = Qcow2::open(
                fs,
                "f".into(),
                &Qcow2Options::default(),
                false,
                CacheMode::Writeback,
            )
            .await
            .unwrap();
            q.write_at(0, IoBuf::copy_from(&[0x5a; 65536]))
                .await
                .unwrap();
            let next = h.count(OpKind::Write) + 1;
            h.fail_nth(OpKind::Write, next, FaultError::NoSpace);
            assert!(q.close().await.is_err());
            let (in_use, _, byte) = after(&mem, "b", 0).await;
            assert!(in_use, "an unstored bitmap stays in-use");
            assert_eq!(byte, 0x5a, "the data was flushed all the same");
        });
    }

    #[test]
    fn close_waits_for_writes_in_flight() {
        rt().block_on(async {
            let mem = base(64 << 20).await;
            let lat = Arc::new(LatencyStorage::new(mem.clone(), Duration::from_millis(20)));
            let q = Arc::new(
                Qcow2::open(
                    lat,
                    "lat".into(),
                    &Qcow2Options::default(),
                    false,
                    CacheMode::Writeback,
                )
                .await
                .unwrap(),
            );
            let (q1, q2, q3) = (q.clone(), q.clone(), q.clone());
            let a = tokio::spawn(async move { q1.resize(1 << 30, Preallocation::Off).await });
            let b = tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                q2.write_at(32 << 20, IoBuf::copy_from(&[7u8; 4096])).await
            });
            let c = tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                q3.close().await
            });
            let _ = a.await.unwrap();
            let wrote = b.await.unwrap().is_ok();
            c.await.unwrap().unwrap();
            let (in_use, dirty, byte) = after(&mem, "b", 32 << 20).await;
            assert!(!in_use);
            if byte == 7 {
                assert!(
                    dirty,
                    "a write that reached the disk is in the clean bitmap"
                );
            }
            assert_eq!(byte == 7, wrote);
        });
    }

    #[test]
    fn a_failed_amend_leaves_no_clean_bitmap_behind() {
        for k in 1..6 {
            rt().block_on(async {
                let mem = base(8 << 20).await;
                let fs = Arc::new(FaultStorage::new(mem.clone()));
                let h = fs.handle();
                let q = Qcow2::open(
                    fs,
                    "f".into(),
                    &Qcow2Options::default(),
                    false,
                    CacheMode::Writeback,
                )
                .await
                .unwrap();
                q.write_at(1 << 20, IoBuf::copy_from(&[0x5a; 4096]))
                    .await
                    .unwrap();
                q.flush().await.unwrap();
                h.fail_nth(OpKind::Write, k, FaultError::NoSpace);
                let amended = q.change_refcount_width(8).await;
                h.disarm_all();
                if amended.is_err() {
                    let _ = q.write_at(2 << 20, IoBuf::copy_from(&[0x66; 4096])).await;
                    let _ = q.close().await;
                }
                for (at, byte) in [(1u64 << 20, 0x5a), (2 << 20, 0x66)] {
                    let (in_use, dirty, got) = after(&mem, "b", at).await;
                    if !in_use && got == byte {
                        assert!(dirty, "k={k}: clean bitmap misses the write at {at}");
                    }
                }
            });
        }
    }

    #[test]
    fn a_failed_shrink_keeps_disabled_bitmaps() {
        for k in 1..6 {
            rt().block_on(async {
                let mem = Arc::new(MemoryStorage::new());
                create(
                    mem.clone(),
                    &CreateOptions {
                        size: 8 << 20,
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
                {
                    let q = open(&mem, false).await.unwrap();
                    q.bitmap_add("frozen", Some(65536), true).await.unwrap();
                    q.write_at(6 << 20, IoBuf::copy_from(&[3u8; 65536]))
                        .await
                        .unwrap();
                    q.bitmap_set_enabled("frozen", false).await.unwrap();
                    q.close().await.unwrap();
                }
                let fs = Arc::new(FaultStorage::new(mem.clone()));
                let h = fs.handle();
                let q = Qcow2::open(
                    fs,
                    "f".into(),
                    &Qcow2Options::default(),
                    false,
                    CacheMode::Writeback,
                )
                .await
                .unwrap();
                h.fail_nth(OpKind::Write, k, FaultError::NoSpace);
                let shrunk = q.resize(4 << 20, Preallocation::Off).await;
                h.disarm_all();
                let _ = q.close().await;
                let copy = Arc::new(MemoryStorage::from_bytes(&mem.to_vec()));
                let q2 = open(&copy, true).await.unwrap();
                if shrunk.is_err() && q2.size() == 8 << 20 && !q2.bitmap_list()[0].in_use {
                    let bits = q2.bitmap_bits("frozen").await.unwrap();
                    assert!(
                        bits.is_dirty(6 << 20),
                        "k={k}: the frozen bitmap lost its bits"
                    );
                }
                q2.close().await.unwrap();
            });
        }
    }
}
