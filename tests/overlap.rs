//! Overlap checks (QEMU's `overlap-check`): hostile images whose L2 entries point guest clusters
//! at the image's own metadata. A guest write there must be refused (EIO, as QEMU does), the
//! image marked corrupt, and the metadata left intact — with qimg as with qemu-io.

mod common;

use common::*;
use std::path::Path;

const QIMG: &str = env!("CARGO_BIN_EXE_qimg");
const CS: u64 = 65536;

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

struct Layout {
    l1: u64,
    reftable: u64,
    l2: u64,
    refblock: u64,
}

/// A 64 MiB image with data in guest clusters 0 and 1 (one L2 table).
fn image(p: &Path) -> Layout {
    qemu_create(p, "", 64 << 20, &[]);
    qemu_io(p, "qcow2", &["write -P 1 0 128k".into()]);
    let b = std::fs::read(p).unwrap();
    let l1 = be64(&b, 40);
    let reftable = be64(&b, 48);
    let l2 = be64(&b, l1 as usize) & 0x00ff_ffff_ffff_fe00;
    let refblock = be64(&b, reftable as usize);
    Layout {
        l1,
        reftable,
        l2,
        refblock,
    }
}

/// Points guest cluster 1's L2 entry at `target` (COPIED set: a plain in-place write).
fn point_cluster_1_at(p: &Path, lay: &Layout, target: u64) {
    let mut b = std::fs::read(p).unwrap();
    let at = lay.l2 as usize + 8;
    b[at..at + 8].copy_from_slice(&(target | 1 << 63).to_be_bytes());
    std::fs::write(p, b).unwrap();
}

/// Runs one qemu-io command on `p` with `tool`: qimg's `io` or QEMU's qemu-io, same arguments.
fn io_write(tool: &str, cmd: &str, p: &Path) -> std::process::Output {
    let args = ["-f", "qcow2", "-c", cmd, p.to_str().unwrap()];
    if tool == "qimg" {
        run(QIMG, &[&["io"][..], &args].concat())
    } else {
        run("qemu-io", &args)
    }
}

#[test]
fn guest_writes_onto_metadata_are_refused_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let probe = dir.path().join("probe.qcow2");
    let lay = image(&probe);
    let targets = [
        ("active L1 table", lay.l1),
        ("refcount table", lay.reftable),
        ("L2 table", lay.l2),
        ("refcount block", lay.refblock),
        // (An entry cannot name the header: host offset 0 means "unallocated" to both.)
    ];
    for (what, target) in targets {
        for tool in ["qimg", "qemu-io"] {
            let p = dir.path().join(format!("{tool}-{}.qcow2", target / CS));
            let lay = image(&p);
            point_cluster_1_at(&p, &lay, target);
            let before = std::fs::read(&p).unwrap();
            let out = io_write(tool, "write -P 7 64k 4k", &p);
            let t = text(&out);
            assert!(
                t.contains("write failed: Input/output error"),
                "{tool}, cluster on the {what}: {t}"
            );
            if tool == "qimg" {
                assert!(
                    t.contains("Preventing invalid write on metadata") && t.contains("overlaps"),
                    "qimg names the overlap: {t}"
                );
            }
            let after = std::fs::read(&p).unwrap();
            // Nothing but the header's corrupt bit (incompatible features, byte 79) changed.
            let changed: Vec<usize> = (0..before.len().min(after.len()))
                .filter(|&i| before[i] != after[i])
                .collect();
            assert!(
                changed.iter().all(|&i| (72..80).contains(&i)),
                "{tool}, cluster on the {what}: bytes changed at {:?}",
                &changed[..changed.len().min(8)]
            );
            assert_eq!(
                after[79] & 2,
                2,
                "{tool}, cluster on the {what}: image not marked corrupt"
            );
        }
    }
}

/// Writes to clusters that hold no metadata go through, and `overlap-check=none` is QEMU's
/// opt-out (the write then happens, as it would with QEMU).
#[test]
fn overlap_check_none_is_the_opt_out() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("n.qcow2");
    let lay = image(&p);
    // Aim at a cluster past the end that nothing uses: allowed either way.
    point_cluster_1_at(&p, &lay, 100 * CS);
    let o = run(
        QIMG,
        &[
            "io",
            "-f",
            "qcow2",
            "-c",
            "write -P 7 64k 4k",
            p.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    // Now at the refcount table, with checks off: the write goes through (and damages it, as
    // it would with QEMU).
    let q = dir.path().join("m.qcow2");
    let lay = image(&q);
    point_cluster_1_at(&q, &lay, lay.reftable);
    let o = run(
        QIMG,
        &[
            "io",
            "-f",
            "qcow2",
            "-o",
            "overlap-check=none",
            "-c",
            "write -P 7 64k 4k",
            q.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let b = std::fs::read(&q).unwrap();
    assert_eq!(
        b[lay.reftable as usize], 7,
        "overlap-check=none must not check"
    );
}

/// An L1 entry that names the refcount table as an L2 table: a write that must update that
/// "L2 table" is refused at the request (the table write would overwrite the refcount table),
/// as qemu-io refuses it, and the image is marked corrupt.
#[test]
fn metadata_writes_onto_other_metadata_are_refused_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    for tool in ["qimg", "qemu-io"] {
        let p = dir.path().join(format!("{tool}.qcow2"));
        let lay = image(&p);
        let mut b = std::fs::read(&p).unwrap();
        let at = lay.l1 as usize;
        b[at..at + 8].copy_from_slice(&(lay.reftable | 1 << 63).to_be_bytes());
        std::fs::write(&p, &b).unwrap();
        let out = io_write(tool, "write -P 7 320k 4k", &p);
        let t = text(&out);
        assert!(
            t.contains("write failed: Input/output error"),
            "{tool}: {t}"
        );
        let after = std::fs::read(&p).unwrap();
        assert_eq!(after[79] & 2, 2, "{tool}: image not marked corrupt");
        let rt = lay.reftable as usize;
        assert_eq!(
            &after[rt..rt + 4096],
            &b[rt..rt + 4096],
            "{tool}: the refcount table changed"
        );
    }
}

/// QEMU's iotest 305: a refcount table entry that is not cluster aligned is met when an
/// allocation needs that block; the write fails with EIO and the image is marked corrupt, with
/// QEMU's message — qimg as qemu-io.
#[test]
fn unaligned_refcount_table_entry_marks_the_image_corrupt_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    for tool in ["qimg", "qemu-io"] {
        let p = dir.path().join(format!("{tool}.qcow2"));
        qemu_create(&p, "refcount_bits=64,cluster_size=1k", 1 << 20, &[]);
        qemu_io(&p, "qcow2", &["write 0 124k".into()]);
        qemu_io(&p, "qcow2", &["discard 121k 1k".into()]);
        qemu_io(&p, "qcow2", &["discard 123k 1k".into()]);
        let mut b = std::fs::read(&p).unwrap();
        let rt = be64(&b, 48) as usize;
        b[rt + 14] = 0x06;
        std::fs::write(&p, &b).unwrap();
        let out = io_write(tool, "write 121k 3k", &p);
        let t = text(&out);
        assert!(
            t.contains("write failed: Input/output error"),
            "{tool}: {t}"
        );
        assert!(
            t.contains(
                "qcow2: Marking image as corrupt: Refblock offset 0x20600 unaligned (reftable \
                 index: 0x1); further corruption events will be suppressed"
            ),
            "{tool}: {t}"
        );
        let after = std::fs::read(&p).unwrap();
        assert_eq!(after[79] & 2, 2, "{tool}: image not marked corrupt");
    }
}

/// The L2 tables of snapshots are checked with `overlap-check=all` or
/// `overlap-check.inactive-l2=on` and not by default (`cached`), and a per-structure switch
/// overrides its template — as qemu-io does, with the structure named in qimg's message.
#[test]
fn snapshot_l2_tables_are_checked_as_the_options_say_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("", false),
        ("overlap-check=all", true),
        ("overlap-check.inactive-l2=on", true),
        ("overlap-check=all,overlap-check.inactive-l2=off", false),
        (
            "overlap-check.template=none,overlap-check.inactive-l2=on",
            true,
        ),
    ];
    for (i, (opts, refused)) in cases.iter().enumerate() {
        for tool in ["qimg", "qemu-io"] {
            let p = dir.path().join(format!("{tool}-{i}.qcow2"));
            let lay = image(&p);
            let snap = run("qemu-img", &["snapshot", "-c", "s", p.to_str().unwrap()]);
            assert!(snap.status.success(), "{}", text(&snap));
            // The first write copies the shared L2 table: the old one is the snapshot's alone.
            qemu_io(&p, "qcow2", &["write -P 2 0 4k".into()]);
            let mut b = std::fs::read(&p).unwrap();
            let new_l2 = be64(&b, lay.l1 as usize) & 0x00ff_ffff_ffff_fe00;
            assert_ne!(new_l2, lay.l2);
            let at = new_l2 as usize + 8;
            b[at..at + 8].copy_from_slice(&(lay.l2 | 1 << 63).to_be_bytes());
            std::fs::write(&p, b).unwrap();
            let open = if opts.is_empty() {
                format!("open {}", p.display())
            } else {
                format!("open -o {opts} {}", p.display())
            };
            let args = ["-c", open.as_str(), "-c", "write -P 7 64k 4k"];
            let out = if tool == "qimg" {
                run(QIMG, &[&["io"][..], &args].concat())
            } else {
                run("qemu-io", &args)
            };
            let t = text(&out);
            assert_eq!(
                t.contains("write failed: Input/output error"),
                *refused,
                "{tool} with '{opts}': {t}"
            );
            if tool == "qimg" && *refused {
                assert!(t.contains("overlaps with inactive L2 table"), "{t}");
            }
        }
    }
}
