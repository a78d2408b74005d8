//! Images with an external data file, against QEMU:
//! - the same random requests (writes at byte, sector, subcluster and cluster alignment,
//!   write-zeroes with and without unmap, discards) through `qemu-io` on one image and
//!   `qimg io` on another, each with its own data file, with and without `data_file_raw`,
//!   extended L2 entries and a backing file: the disks read the same, every L2 entry is the
//!   same as QEMU's, qimg's image passes `qemu-img check`, and a raw data file reads as the disk;
//! - images QEMU wrote read back byte for byte, with the same `map`;
//! - images qimg made (every preallocation mode) are byte for byte QEMU's, and QEMU reads what
//!   qimg wrote; `info`, `check`, `amend`, `resize`, snapshots and compression as QEMU has them;
//! - the data file an image names is opened only as the open policy allows, as a plain local
//!   path (QEMU's CVE-2024-4467), never by metadata-only opens, never the image itself;
//! - hostile entries (compressed, or not at their guest offset) are corruption with QEMU's
//!   words, never a panic.

mod common;

use common::*;
use qimg::block::{open_image, FilePolicy, Format, OpenOptions};
use qimg::{Error, IoBufMut};
use std::path::{Path, PathBuf};

const SIZE: u64 = 4 << 20;

fn qimg() -> &'static str {
    env!("CARGO_BIN_EXE_qimg")
}

fn be64(d: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(d[at..at + 8].try_into().unwrap())
}

/// Every L2 entry of the image (both words with extended entries; 0 where there is no table).
fn l2_entries(p: &Path) -> Vec<(u64, u64)> {
    let d = std::fs::read(p).unwrap();
    let cb = u32::from_be_bytes(d[20..24].try_into().unwrap());
    let ext = be64(&d, 72) & (1 << 4) != 0;
    let es = if ext { 16 } else { 8 };
    let l1n = u32::from_be_bytes(d[36..40].try_into().unwrap()) as usize;
    let l1o = be64(&d, 40) as usize;
    let cs = 1usize << cb;
    let mut out = Vec::new();
    for i in 0..l1n {
        let l2 = (be64(&d, l1o + 8 * i) & 0x00ff_ffff_ffff_fe00) as usize;
        for j in 0..cs / es {
            if l2 == 0 {
                out.push((0, 0));
            } else {
                let bitmap = if ext { be64(&d, l2 + es * j + 8) } else { 0 };
                out.push((be64(&d, l2 + es * j), bitmap));
            }
        }
    }
    out
}

/// Random qemu-io commands of every alignment.
fn commands(seed: u64, cs: u64) -> Vec<String> {
    let mut r = fastrand::Rng::with_seed(seed);
    let mut cmds = Vec::new();
    for _ in 0..50 {
        let gran = [1, 512, 4096, cs / 32, cs][r.usize(0..5)].max(1);
        let off = r.u64(0..SIZE / gran) * gran;
        let len = (r.u64(1..=3 * cs / gran + 1) * gran).min(SIZE - off);
        cmds.push(match r.u8(0..10) {
            0..=4 => format!("write -P {} {off} {len}", r.u8(1..255)),
            5 | 6 => format!("write -z {off} {len}"),
            7 | 8 => format!("write -z -u {off} {len}"),
            _ => format!("discard {off} {len}"),
        });
    }
    cmds
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn random_requests_match_qemu_io() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    qemu_create(&base, "", SIZE, &[]);
    qemu_io(&base, "qcow2", &[format!("write -P 0xaa 0 {SIZE}")]);
    let mut runs = 0;
    for (cs, ext, raw, backing) in [
        (65536u64, false, false, false),
        (65536, false, true, false),
        (65536, false, false, true),
        (131072, true, false, false),
        (131072, true, true, false),
        (65536, true, false, true),
        (4096, false, false, false),
    ] {
        for seed in [1u64, 2] {
            let what = format!("cluster size {cs}, extended {ext}, raw {raw}, backing {backing}");
            let mut imgs: Vec<(PathBuf, PathBuf)> = Vec::new();
            for side in ["qemu", "qimg"] {
                let img = dir.path().join(format!("{side}.qcow2"));
                let data = dir.path().join(format!("{side}.data"));
                let _ = std::fs::remove_file(&img);
                let mut opts = format!("cluster_size={cs},data_file={}", data.display());
                if ext {
                    opts += ",extended_l2=on";
                }
                if raw {
                    opts += ",data_file_raw=on";
                }
                if backing {
                    opts += &format!(",backing_file={},backing_fmt=qcow2", base.display());
                }
                qemu_create(&img, &opts, SIZE, &[]);
                imgs.push((img, data));
            }
            let cmds = commands(seed * 7919 + cs + ext as u64, cs);
            qemu_io(&imgs[0].0, "qcow2", &cmds);
            qimg_io(&imgs[1].0, &cmds);
            assert_same_disk(&imgs[0].0, &imgs[1].0);
            qemu_check_clean(&imgs[1].0);
            let (ea, eb) = (l2_entries(&imgs[0].0), l2_entries(&imgs[1].0));
            for (i, (x, y)) in ea.iter().zip(&eb).enumerate() {
                assert_eq!(
                    x, y,
                    "{what}, seed {seed}: L2 entry {i} (qemu-io vs qimg), commands {cmds:?}"
                );
            }
            if raw {
                // The raw data file reads as the disk, as QEMU's does.
                for (img, data) in &imgs {
                    let o = run("qemu-img", &["compare", "-F", "raw", s(img), s(data)]);
                    assert!(o.status.success(), "{what}: {}", text(&o));
                }
            }
            runs += 1;
        }
    }
    assert_eq!(runs, 14);
}

#[test]
fn qemu_written_images_read_back_exactly() {
    let dir = tempfile::tempdir().unwrap();
    for (cs, ext) in [(65536u64, false), (131072, true)] {
        let img = dir.path().join(format!("q{cs}.qcow2"));
        let data = dir.path().join(format!("q{cs}.data"));
        let mut opts = format!("cluster_size={cs},data_file={}", data.display());
        if ext {
            opts += ",extended_l2=on";
        }
        qemu_create(&img, &opts, SIZE, &[]);
        let mut cmds = commands(cs + 5, cs);
        // Guest cluster 0 allocated: its entry has offset 0 (with the COPIED flag).
        cmds.push("write -P 0x5a 1000 3000".into());
        qemu_io(&img, "qcow2", &cmds);
        let (ra, rb) = (dir.path().join("qemu.raw"), dir.path().join("qimg.raw"));
        let o = run("qemu-img", &["convert", "-O", "raw", s(&img), s(&ra)]);
        assert!(o.status.success(), "{}", text(&o));
        let o = run(qimg(), &["convert", "-O", "raw", s(&img), s(&rb)]);
        assert!(o.status.success(), "{}", text(&o));
        assert!(
            std::fs::read(&ra).unwrap() == std::fs::read(&rb).unwrap(),
            "cluster size {cs}: qimg reads another disk than QEMU"
        );
        for fmt in ["json", "human"] {
            let qm = run("qemu-img", &["map", "--output", fmt, s(&img)]);
            let im = run(qimg(), &["map", "--output", fmt, s(&img)]);
            assert_eq!(text(&qm), text(&im), "cluster size {cs}: map ({fmt})");
        }
        let o = run(qimg(), &["check", s(&img)]);
        assert!(o.status.success(), "qimg check: {}", text(&o));
        let q = run("qemu-img", &["check", s(&img)]);
        assert_eq!(text(&o), text(&q), "check output");
    }
}

/// The image file and data file `qimg create` makes, for `opts`.
fn qimg_create(dir: &Path, name: &str, opts: &str, size: &str) -> (PathBuf, PathBuf) {
    let img = dir.join(format!("{name}.qcow2"));
    let data = dir.join(format!("{name}.data"));
    let o = run(
        qimg(),
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={},{opts}", data.display()),
            s(&img),
            size,
        ],
    );
    assert!(o.status.success(), "qimg create {opts}: {}", text(&o));
    (img, data)
}

#[test]
fn qimg_made_images_are_qemus_and_work_in_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for prealloc in ["off", "metadata", "falloc", "full"] {
        for size in ["1000k", "64M"] {
            for extra in ["", ",data_file_raw=on", ",extended_l2=on"] {
                let opts = format!("preallocation={prealloc}{extra}");
                let (a, ad) = qimg_create(d, "a", &opts, size);
                let b = d.join("b.qcow2");
                let bd = d.join("b.data");
                let o = run(
                    "qemu-img",
                    &[
                        "create",
                        "-q",
                        "-f",
                        "qcow2",
                        "-o",
                        &format!("data_file={},{opts}", bd.display()),
                        s(&b),
                        size,
                    ],
                );
                assert!(o.status.success(), "{}", text(&o));
                // Identical but for the data file's name (a vs b).
                let (x, y) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
                assert_eq!(x.len(), y.len(), "{opts} {size}: image length");
                let differing = x.iter().zip(&y).filter(|(p, q)| p != q).count();
                assert_eq!(differing, 1, "{opts} {size}: image bytes");
                assert_eq!(
                    std::fs::metadata(&ad).unwrap().len(),
                    std::fs::metadata(&bd).unwrap().len(),
                    "{opts} {size}: data file length"
                );
                let info = |p: &Path, prog: &str| {
                    let o = run(prog, &["info", "--output=json", s(p)]);
                    let mut v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
                    v["format-specific"]["data"]["data-file"] = serde_json::Value::Null;
                    v["format-specific"]["data"].clone()
                };
                assert_eq!(info(&a, qimg()), info(&b, "qemu-img"), "{opts}: info");
            }
        }
    }
    // QEMU reads and checks what qimg wrote, and the data went to the data file.
    let (img, data) = qimg_create(d, "w", "data_file_raw=on", "4M");
    qimg_io(
        &img,
        &[
            "write -P 0x11 0 4096".into(),
            "write -P 0x22 100000 200000".into(),
            "write -z 1048576 65536".into(),
        ],
    );
    qemu_check_clean(&img);
    qemu_io(
        &img,
        "qcow2",
        &[
            "read -P 0x11 0 4096".into(),
            "read -P 0x22 100000 200000".into(),
            "read -P 0 1048576 65536".into(),
        ],
    );
    let raw = std::fs::read(&data).unwrap();
    assert!(raw[..4096].iter().all(|&b| b == 0x11));
    assert!(raw[100000..300000].iter().all(|&b| b == 0x22));
    assert!(
        std::fs::metadata(&img).unwrap().len() < 1 << 20,
        "data in the image file"
    );
    // Human info as QEMU prints it.
    let strip = |t: String| {
        t.lines()
            .filter(|l| !l.contains("disk size") && !l.contains("file length"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        strip(text(&run(qimg(), &["info", s(&img)]))),
        strip(text(&run("qemu-img", &["info", s(&img)])))
    );
}

/// `qimg` and `qemu-img` with the same arguments give the same output and exit code
/// (`{IMG}` stands for the image, which each gets a fresh copy of).
fn same_as_qemu(img: &Path, data: &Path, args: &[&str]) {
    let mut outs = Vec::new();
    for prog in [qimg(), "qemu-img"] {
        let dir = img.parent().unwrap();
        let copy = dir.join(format!("copy-{}.qcow2", outs.len()));
        let dcopy = dir.join(format!("copy-{}.data", outs.len()));
        std::fs::copy(img, &copy).unwrap();
        std::fs::copy(data, &dcopy).unwrap();
        let args: Vec<String> = args
            .iter()
            .map(|a| a.replace("{IMG}", s(&copy)).replace("{DATA}", s(&dcopy)))
            .collect();
        let args: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
        let o = run(prog, &args);
        let t = text(&o)
            .replace(s(&copy), "IMG")
            .replace(s(&dcopy), "DATA")
            .replace("qemu-img: ", "")
            .replace("qimg: ", "");
        outs.push((o.status.code(), t));
    }
    assert_eq!(outs[0], outs[1], "{args:?} (qimg, then qemu-img)");
}

#[test]
fn commands_behave_as_qemus() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (img, data) = qimg_create(d, "c", "", "4M");
    qimg_io(&img, &["write -P 1 0 1M".into()]);
    // Snapshots and compression are refused; the list is empty.
    same_as_qemu(&img, &data, &["snapshot", "-c", "s1", "{IMG}"]);
    same_as_qemu(&img, &data, &["snapshot", "-l", "{IMG}"]);
    same_as_qemu(&img, &data, &["snapshot", "-d", "s1", "{IMG}"]);
    // No downgrade, no raw bit on an existing image, the name only on data-file images.
    same_as_qemu(&img, &data, &["amend", "-o", "compat=0.10", "{IMG}"]);
    same_as_qemu(&img, &data, &["amend", "-o", "data_file_raw=on", "{IMG}"]);
    same_as_qemu(&img, &data, &["amend", "-o", "data_file=other", "{IMG}"]);
    same_as_qemu(&img, &data, &["info", "{IMG}"]);
    same_as_qemu(&img, &data, &["check", "{IMG}"]);
    // Growing and shrinking resize the data file too.
    for size in ["8M", "1M"] {
        let o = run(qimg(), &["resize", "--shrink", s(&img), size]);
        assert!(o.status.success(), "{}", text(&o));
        let want = qimg::size::parse_size(size).unwrap();
        assert_eq!(std::fs::metadata(&data).unwrap().len(), want);
        qemu_check_clean(&img);
    }
    qemu_io(&img, "qcow2", &["read -P 1 0 1M".into()]);
    // A raw data file grows mapped 1:1 (what it holds past the old end shows).
    let (rimg, rdata) = qimg_create(d, "r", "data_file_raw=on", "1M");
    let mut bytes = std::fs::read(&rdata).unwrap();
    bytes.extend(std::iter::repeat_n(0x77u8, 1 << 20));
    std::fs::write(&rdata, &bytes).unwrap();
    let o = run(qimg(), &["resize", s(&rimg), "2M"]);
    assert!(o.status.success(), "{}", text(&o));
    qemu_io(&rimg, "qcow2", &["read -P 0x77 1M 1M".into()]);
    qemu_check_clean(&rimg);
    // No backing file under a raw data file.
    let base = d.join("base.qcow2");
    qemu_create(&base, "", 1 << 20, &[]);
    let o = run(
        qimg(),
        &["rebase", "-u", "-b", s(&base), "-F", "qcow2", s(&rimg)],
    );
    assert!(!o.status.success());
    assert!(text(&o).contains("Invalid argument"), "{}", text(&o));
    // Compressed writes are refused.
    let o = run(qimg(), &["io", "-c", "write -c 0 64k", s(&img)]);
    assert!(text(&o).contains("Operation not supported"), "{}", text(&o));
    // Option checks at creation, in QEMU's words.
    for (opts, msg) in [
        ("data_file_raw=on", "data-file-raw requires data-file"),
        (
            "data_file=x.data,compat=0.10",
            "External data files are only supported with compatibility level 1.1",
        ),
    ] {
        let o = run(
            qimg(),
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                opts,
                s(&d.join("n.qcow2")),
                "1M",
            ],
        );
        assert!(
            !o.status.success() && text(&o).contains(msg),
            "{}",
            text(&o)
        );
    }
    // The name can be changed and removed; without one, the file must be given.
    let o = run(qimg(), &["amend", "-o", "data_file=", s(&img)]);
    assert!(o.status.success(), "{}", text(&o));
    let o = run(qimg(), &["io", "-c", "read 0 4k", s(&img)]);
    assert!(
        text(&o).contains("'data-file' is required for this image"),
        "{}",
        text(&o)
    );
    let opts = format!(
        "driver=qcow2,file.filename={},data-file.filename={}",
        s(&img),
        s(&data)
    );
    let o = run(
        qimg(),
        &["io", "--image-opts", "-c", "read -P 1 0 1M", &opts],
    );
    assert!(o.status.success(), "{}", text(&o));
    let o = run(
        qimg(),
        &[
            "amend",
            "--image-opts",
            "-o",
            &format!("data_file={}", s(&data)),
            &opts,
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    qemu_io(&img, "qcow2", &["read -P 1 0 1M".into()]);
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

fn qcow2_opts() -> OpenOptions {
    OpenOptions {
        format: Some(Format::Qcow2),
        ..Default::default()
    }
}

#[test]
fn the_data_file_is_opened_only_as_the_policy_allows() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (img, data) = qimg_create(d, "p", "", "1M");
    qimg_io(&img, &["write -P 9 0 64k".into()]);
    rt().block_on(async {
        // QEMU's behaviour by default: the named file is opened.
        let i = open_image(&img, &qcow2_opts()).await.unwrap();
        let b = i.read(0, IoBufMut::zeroed(4096)).await.unwrap();
        assert!(b.iter().all(|&x| x == 9));
        i.close().await.unwrap();

        // An embedder that forbids data files named by images.
        let strict = OpenOptions {
            policy: FilePolicy {
                data_file: false,
                ..Default::default()
            },
            ..qcow2_opts()
        };
        let e = open_image(&img, &strict).await.err().unwrap();
        assert!(matches!(e, Error::NotPermitted(_)), "{e}");
        // ... which may still give the data file itself.
        let given = OpenOptions {
            data_file: Some(qimg::block::DataFileSpec::Path(data.clone())),
            ..strict.clone()
        };
        open_image(&img, &given)
            .await
            .unwrap()
            .close()
            .await
            .unwrap();

        // Only inside the allowed directories.
        let elsewhere = tempfile::tempdir().unwrap();
        let fenced = OpenOptions {
            policy: FilePolicy {
                allowed_dirs: Some(vec![elsewhere.path().to_path_buf()]),
                ..Default::default()
            },
            ..qcow2_opts()
        };
        let e = open_image(&img, &fenced).await.err().unwrap();
        assert!(matches!(e, Error::NotPermitted(_)), "{e}");

        // A metadata-only open (info) does not open it at all: it may be missing.
        std::fs::rename(&data, d.join("moved")).unwrap();
        let meta = OpenOptions {
            metadata_only: true,
            read_only: true,
            ..qcow2_opts()
        };
        let i = open_image(&img, &meta).await.unwrap();
        assert!(i.read(0, IoBufMut::zeroed(512)).await.is_err());
        i.close().await.unwrap();
        let e = open_image(&img, &qcow2_opts()).await.err().unwrap();
        assert!(e.to_string().contains("No such file or directory"), "{e}");
    });
    let o = run(qimg(), &["info", s(&img)]);
    assert!(o.status.success(), "{}", text(&o));

    // A name is a plain path: never a protocol or json: name (QEMU 9.1+, CVE-2024-4467).
    for name in [
        "json:{\"driver\":\"file\",\"filename\":\"/etc/hostname\"}",
        "nbd://127.0.0.1:1/x",
    ] {
        let o = run(
            qimg(),
            &[
                "amend",
                "-o",
                &format!("data_file={}", name.replace(',', ",,")),
                s(&img),
            ],
        );
        // (The image cannot be opened for amend: its data file is gone. Use QEMU's way.)
        assert!(!o.status.success());
        let o = run(
            qimg(),
            &[
                "amend",
                "--image-opts",
                "-o",
                &format!("data_file={}", name.replace(',', ",,")),
                &format!(
                    "driver=qcow2,file.filename={},data-file.filename={}",
                    s(&img),
                    s(&d.join("moved"))
                ),
            ],
        );
        assert!(o.status.success(), "{}", text(&o));
        let o = run(qimg(), &["io", "-c", "read 0 512", s(&img)]);
        assert!(
            text(&o).contains(&format!("Could not open '{name}'")),
            "{name}: {}",
            text(&o)
        );
        let q = run("qemu-io", &["-c", "read 0 512", s(&img)]);
        assert!(!q.status.success());
    }

    // The image itself as its data file: refused (its metadata would be overwritten).
    let (selfimg, _) = qimg_create(d, "self", "", "1M");
    let o = run(
        qimg(),
        &[
            "amend",
            "-o",
            &format!("data_file={}", s(&selfimg)),
            s(&selfimg),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let o = run(qimg(), &["io", "-c", "write 0 64k", s(&selfimg)]);
    assert!(!o.status.success());
    assert!(text(&o).contains("is the image itself"), "{}", text(&o));
    qemu_check_clean(&selfimg);
}

/// Writes `entry` as L2 entry `index` of the image's first L2 table.
fn patch_l2(img: &Path, index: usize, entry: u64) {
    let mut d = std::fs::read(img).unwrap();
    let l1o = be64(&d, 40) as usize;
    let l2 = (be64(&d, l1o) & 0x00ff_ffff_ffff_fe00) as usize;
    d[l2 + 8 * index..l2 + 8 * index + 8].copy_from_slice(&entry.to_be_bytes());
    std::fs::write(img, d).unwrap();
}

#[test]
fn hostile_entries_are_corruption_with_qemus_words() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (entry, msg) in [
        (
            0x8000_0000_0001_0000u64,
            "External data file host cluster offset 0x10000 does not match guest cluster offset: 0, L2 index: 0)",
        ),
        (
            0x4000_0000_0003_0000,
            "Compressed cluster entry found in image with external data file (L2 offset: 0x40000, L2 index: 0)",
        ),
    ] {
        let (img, _) = qimg_create(d, "h", "", "1M");
        qimg_io(&img, &["write -P 3 0 64k".into()]);
        patch_l2(&img, 0, entry);
        let p = s(&img);
        for (prog, args) in [
            (qimg(), vec!["io", "-r", "-c", "read 0 4k", p]),
            ("qemu-io", vec!["-r", "-c", "read 0 4k", p]),
        ] {
            let o = run(prog, &args);
            assert!(text(&o).contains(msg), "{prog}: {}", text(&o));
        }
    }
}

#[test]
fn a_null_co_data_file_takes_writes_and_reads_zeros() {
    // QEMU's `null-co` driver as the data file (iotest 270 writes 2 GiB to one): the metadata
    // is real, the data goes nowhere.
    let dir = tempfile::tempdir().unwrap();
    let (img, _) = qimg_create(dir.path(), "n", "cluster_size=2M", "64M");
    let opts = format!(
        "driver=qcow2,file.filename={},data-file.driver=null-co,data-file.size=67108864",
        s(&img)
    );
    let o = run(
        qimg(),
        &[
            "io",
            "--image-opts",
            "-c",
            "write -P 7 768 8M",
            "-c",
            "read -P 0 768 8M",
            &opts,
        ],
    );
    assert!(
        o.status.success() && !text(&o).contains("failed"),
        "{}",
        text(&o)
    );
    qemu_check_clean(&img);
    let map = run(qimg(), &["map", "--output=json", "--image-opts", &opts]);
    assert!(text(&map).contains("\"data\": true"), "{}", text(&map));
}
