//! Images with extended L2 entries (subclusters), against QEMU:
//! - the same random requests (writes at subcluster, sector and byte alignment, write-zeroes
//!   with and without unmap, discards, compressed clusters) through `qemu-io` on one image and
//!   `qimg io` on another: the disks read the same, qimg's image passes `qemu-img check`, and
//!   without compressed clusters every L2 entry has the same subcluster bitmap as QEMU's;
//! - images QEMU wrote read back byte for byte, with the same map;
//! - images qimg made and wrote read back by QEMU;
//! - `qimg serve` reports the same `base:allocation` extents as qemu-nbd (subcluster sized);
//! - invalid entries are corruption with QEMU's message, never a panic.

mod common;

use common::*;
use std::path::Path;

const SIZE: u64 = 4 << 20;

fn qimg() -> &'static str {
    env!("CARGO_BIN_EXE_qimg")
}

fn be64(d: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(d[at..at + 8].try_into().unwrap())
}

/// What each guest cluster's extended entry says: `('-' | 'h' | 'c', bitmap)` (no host
/// cluster, a host cluster, compressed; the bitmap is 0 for compressed clusters and where
/// there is no L2 table).
fn entries(p: &Path) -> Vec<(char, u64)> {
    let d = std::fs::read(p).unwrap();
    let cb = u32::from_be_bytes(d[20..24].try_into().unwrap());
    let l1n = u32::from_be_bytes(d[36..40].try_into().unwrap()) as usize;
    let l1o = be64(&d, 40) as usize;
    let cs = 1usize << cb;
    let mut out = Vec::new();
    for i in 0..l1n {
        let l2 = (be64(&d, l1o + 8 * i) & 0x00ff_ffff_ffff_fe00) as usize;
        for j in 0..cs / 16 {
            if l2 == 0 {
                out.push(('-', 0));
                continue;
            }
            let raw = be64(&d, l2 + 16 * j);
            let bitmap = be64(&d, l2 + 16 * j + 8);
            out.push(if raw & (1 << 62) != 0 {
                ('c', 0)
            } else if raw & 0x00ff_ffff_ffff_fe00 != 0 {
                ('h', bitmap)
            } else {
                ('-', bitmap)
            });
        }
    }
    out
}

/// Random qemu-io commands: first compressed clusters (QEMU only compresses into clusters
/// that hold nothing), then writes, zeroes and discards of every alignment.
fn commands(seed: u64, cs: u64, compressed: bool) -> Vec<String> {
    let mut r = fastrand::Rng::with_seed(seed);
    let mut cmds = Vec::new();
    if compressed {
        let mut clusters: Vec<u64> = (0..SIZE / cs).collect();
        r.shuffle(&mut clusters);
        for c in clusters.into_iter().take(6) {
            cmds.push(format!("write -c -P {} {} {cs}", r.u8(1..255), c * cs));
        }
    }
    for _ in 0..50 {
        let gran = [1, 512, cs / 32, cs / 32, cs][r.usize(0..5)];
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

#[test]
fn random_requests_match_qemu_io() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    qemu_create(&base, "", SIZE, &[]);
    qemu_io(&base, "qcow2", &[format!("write -P 0xaa 0 {SIZE}")]);
    let mut runs = 0;
    for (cs, backing) in [
        (65536u64, false),
        (65536, true),
        (131072, false),
        (131072, true),
        (2 << 20, false),
        (2 << 20, true),
        (16384, false),
    ] {
        for (seed, compressed) in [(1u64, false), (2, false), (3, true)] {
            let what = format!("cluster size {cs}, backing {backing}, seed {seed}");
            let (a, b) = (dir.path().join("a.qcow2"), dir.path().join("b.qcow2"));
            let mut opts = format!("extended_l2=on,cluster_size={cs}");
            if backing {
                opts += &format!(",backing_file={},backing_fmt=qcow2", base.display());
            }
            for p in [&a, &b] {
                let _ = std::fs::remove_file(p);
                qemu_create(p, &opts, SIZE, &[]);
            }
            let cmds = commands(seed * 1000 + cs + backing as u64, cs, compressed);
            qemu_io(&a, "qcow2", &cmds);
            qimg_io(&b, &cmds);
            assert_same_disk(&a, &b);
            qemu_check_clean(&b);
            if !compressed {
                // (With compressed clusters, which compress to different sizes, QEMU and qimg
                // place data differently, and qimg writes no zeros where the disk reads zeros
                // already: the bitmaps may then differ while the content does not.)
                let (ea, eb) = (entries(&a), entries(&b));
                for (i, (x, y)) in ea.iter().zip(&eb).enumerate() {
                    assert_eq!(
                        x, y,
                        "{what}: entry {i} (qemu-io vs qimg), commands {cmds:?}"
                    );
                }
            }
            runs += 1;
        }
    }
    assert_eq!(runs, 21);
}

#[test]
fn qemu_written_images_read_back_exactly() {
    let dir = tempfile::tempdir().unwrap();
    for cs in [16384u64, 65536, 2 << 20] {
        let img = dir.path().join(format!("q{cs}.qcow2"));
        qemu_create(
            &img,
            &format!("extended_l2=on,cluster_size={cs}"),
            SIZE,
            &[],
        );
        let mut cmds = commands(cs, cs, true);
        cmds.push("write -P 0x5a 1000 3000".into());
        qemu_io(&img, "qcow2", &cmds);
        let (ra, rb) = (dir.path().join("qemu.raw"), dir.path().join("qimg.raw"));
        let p = img.to_str().unwrap();
        let o = run(
            "qemu-img",
            &["convert", "-O", "raw", p, ra.to_str().unwrap()],
        );
        assert!(o.status.success(), "{}", text(&o));
        let o = run(qimg(), &["convert", "-O", "raw", p, rb.to_str().unwrap()]);
        assert!(o.status.success(), "{}", text(&o));
        assert!(
            std::fs::read(&ra).unwrap() == std::fs::read(&rb).unwrap(),
            "cluster size {cs}: qimg reads another disk than QEMU"
        );
        let qm = run("qemu-img", &["map", "--output=json", p]);
        let im = run(qimg(), &["map", "--output=json", p]);
        assert_eq!(text(&qm), text(&im), "cluster size {cs}: map");
        let o = run(qimg(), &["check", p]);
        assert!(o.status.success(), "qimg check: {}", text(&o));
    }
}

#[test]
fn qimg_made_images_work_in_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("i.qcow2");
    let p = img.to_str().unwrap();
    let o = run(
        qimg(),
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=128k",
            p,
            "8M",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let info = run("qemu-img", &["info", p]);
    assert!(text(&info).contains("extended l2: true"), "{}", text(&info));
    let cmds = [
        "write -P 0x11 4096 4096".to_string(),
        "write -P 0x22 135168 1000".to_string(),
        "write -z 8192 8192".to_string(),
        "write -P 0x33 1048576 300000".to_string(),
    ];
    qimg_io(&img, &cmds);
    qemu_check_clean(&img);
    qemu_io(
        &img,
        "qcow2",
        &[
            "read -P 0 0 4096".into(),
            "read -P 0x11 4096 4096".into(),
            "read -P 0 8192 8192".into(),
            "read -P 0x22 135168 1000".into(),
            "read -P 0x33 1048576 300000".into(),
        ],
    );
    let e = entries(&img);
    // 4k subclusters: cluster 0 has subcluster 1 allocated and 2-3 zero; cluster 1 has
    // subcluster 1 (the 1000 bytes at 132 KiB, completed with zeros) allocated.
    assert_eq!(e[0], ('h', 0b10 | (0b1100 << 32)));
    assert_eq!(e[1], ('h', 0b10));

    // Preallocation with a backing file is allowed with subclusters (QEMU's rule), and the
    // preallocated clusters read the backing file.
    let top = dir.path().join("top.qcow2");
    let o = run(
        qimg(),
        &[
            "create",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            p,
            "-o",
            "extended_l2=on,cluster_size=128k,preallocation=metadata",
            top.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_same_disk(&img, &top);
    qemu_check_clean(&top);
    // And the options QEMU refuses are refused with its words.
    let o = run(
        qimg(),
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=8k",
            p,
            "1M",
        ],
    );
    assert!(
        text(&o).contains(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
        ),
        "{}",
        text(&o)
    );
}

#[test]
fn invalid_entries_are_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("bad.qcow2");
    let p = img.to_str().unwrap();
    qemu_create(&img, "extended_l2=on", 1 << 20, &[]);
    // Cluster 4 first, so that the L2 table exists; then corrupt entry 1: an allocated
    // subcluster without a host cluster.
    qemu_io(&img, "qcow2", &["write -P 1 256k 1k".into()]);
    let l2 = entries_l2_offset(&img);
    let mut d = std::fs::read(&img).unwrap();
    d[l2 + 16 + 15] = 1;
    std::fs::write(&img, &d).unwrap();
    let o = run(qimg(), &["io", "-c", "read 64k 1k", p]);
    let t = text(&o);
    assert!(
        t.contains("Invalid cluster entry found  (L2 offset: 0x40000, L2 index: 0x1)"),
        "{t}"
    );
    assert!(t.contains("read failed: Input/output error"), "{t}");
    let o = run(qimg(), &["check", p]);
    assert!(
        text(&o).contains("ERROR: Unallocated cluster has non-zero subcluster allocation map"),
        "{}",
        text(&o)
    );
    // Allocated and zero at once, in a cluster with data.
    qemu_create(&img, "extended_l2=on", 1 << 20, &[]);
    qemu_io(&img, "qcow2", &["write -P 1 0 64k".into()]);
    let mut d = std::fs::read(&img).unwrap();
    d[l2 + 11] = 1; // zero bit of subcluster 0, which is allocated
    std::fs::write(&img, &d).unwrap();
    // Read-only first (the read-write open would mark the image corrupt), then a write.
    for args in [
        ["io", "-r", "-c", "read 0 1k"],
        ["io", "-c", "write 0 1k", ""],
    ] {
        let mut args: Vec<&str> = args.into_iter().filter(|a| !a.is_empty()).collect();
        args.push(p);
        let o = run(qimg(), &args);
        assert!(
            text(&o).contains("Invalid cluster entry found"),
            "{}",
            text(&o)
        );
    }
    let o = run("qemu-img", &["check", p]);
    assert!(
        text(&o).contains("Allocated cluster has corrupted subcluster allocation bitmap"),
        "{}",
        text(&o)
    );
}

/// The first L2 table's offset (what QEMU's first write allocates).
fn entries_l2_offset(p: &Path) -> usize {
    let d = std::fs::read(p).unwrap();
    let l1o = be64(&d, 40) as usize;
    (be64(&d, l1o) & 0x00ff_ffff_ffff_fe00) as usize
}

/// `base:allocation` of an image as a server reports it to nbdinfo: `server` is "qemu-nbd" or
/// qimg (serve), read-only on a Unix socket.
fn nbd_map(server: &str, img: &Path) -> String {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let pid = dir.path().join("pid");
    let mut cmd = std::process::Command::new(server);
    if server == qimg() {
        cmd.arg("serve");
    }
    let o = cmd
        .args(["-r", "-f", "qcow2", "-t", "--fork", "-k"])
        .arg(&sock)
        .arg("--pid-file")
        .arg(&pid)
        .arg(img)
        .output()
        .unwrap();
    assert!(o.status.success(), "{server}: {}", text(&o));
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let map = run("nbdinfo", &["--map", &uri]);
    let pid = std::fs::read_to_string(&pid).unwrap();
    let _ = std::process::Command::new("kill").arg(pid.trim()).status();
    let t = std::time::Instant::now();
    while sock.exists() && t.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(map.status.success(), "nbdinfo: {}", text(&map));
    String::from_utf8_lossy(&map.stdout).into_owned()
}

#[test]
fn nbd_block_status_has_subcluster_granularity() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("s.qcow2");
    qemu_create(&img, "extended_l2=on,cluster_size=128k", SIZE, &[]);
    // Data in subclusters 1 and 5 of cluster 0, zeros in 8-9, data across clusters 2-3.
    qemu_io(
        &img,
        "qcow2",
        &[
            "write -P 1 4k 4k".into(),
            "write -P 2 20k 1k".into(),
            "write -z 32k 8k".into(),
            "write -P 3 300k 100k".into(),
        ],
    );
    let ours = nbd_map(qimg(), &img);
    assert_eq!(ours, nbd_map("qemu-nbd", &img), "qimg serve vs qemu-nbd");
    // Not one extent per cluster: the first data extent is one subcluster.
    assert!(
        ours.lines()
            .any(|l| l.split_whitespace().take(2).eq(["4096", "4096"])),
        "{ours}"
    );
}
