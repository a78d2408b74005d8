//! The VM state area (`qimg io`'s `read -b`/`write -b`, `Qcow2::read_vm_state` and
//! `write_vm_state`) against qemu-io: what one program writes there the other reads back, at
//! every cluster size, with subclusters, in a backing chain, across the L1 table's growth and
//! internal snapshots; images stay clean for `qemu-img check`, and the disk is untouched.

mod common;

use common::*;
use std::path::Path;

const QIMG: &str = env!("CARGO_BIN_EXE_qimg");

/// Runs qemu-io commands through `tool` ("qemu-io" or qimg) on `img`; every command must succeed
/// (qemu-io reports pattern mismatches on standard output: they are failures too).
fn io(tool: &str, img: &Path, cmds: &[&str]) {
    let mut args: Vec<&str> = if tool == QIMG { vec!["io"] } else { vec![] };
    for c in cmds {
        args.extend_from_slice(&["-c", c]);
    }
    args.push(img.to_str().unwrap());
    let o = run(tool, &args);
    let out = text(&o);
    assert!(
        o.status.success() && !out.contains("failed") && !out.contains("Pattern verification"),
        "{tool} {cmds:?}: {out}"
    );
}

fn other(tool: &str) -> &str {
    if tool == QIMG {
        "qemu-io"
    } else {
        QIMG
    }
}

#[test]
fn what_one_writes_the_other_reads() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("cluster_size=512", 3u64 << 30),
        ("cluster_size=65536", 3 << 30),
        ("cluster_size=65536,extended_l2=on", 3 << 30),
        ("cluster_size=16384,extended_l2=on,refcount_bits=2", 1 << 30),
        ("cluster_size=2097152", 40 << 30),
    ];
    for (opts, far) in cases {
        for tool in [QIMG, "qemu-io"] {
            let p = dir.path().join("v.qcow2");
            let _ = std::fs::remove_file(&p);
            qemu_create(&p, opts, 64 << 20, &[]);
            io("qemu-io", &p, &["write -P 5 0 1M", "write -P 6 63M 1M"]);
            let far_w = format!("write -b -P 0x13 {far} 4k");
            let far_r = format!("read -b -P 0x13 {far} 4k");
            io(
                tool,
                &p,
                &[
                    "write -b -P 0x11 0 64k",
                    // Partial clusters and subclusters: the rest keeps what was there.
                    "write -b -P 0x12 1536 1024",
                    &far_w,
                    "read -b -P 0x11 0 1536",
                    "read -b -P 0x12 1536 1024",
                ],
            );
            qemu_check_clean(&p);
            io(
                other(tool),
                &p,
                &[
                    "read -b -P 0x11 0 1536",
                    "read -b -P 0x12 1536 1024",
                    "read -b -P 0x11 2560 62976",
                    &far_r,
                    "read -b -P 0 64k 64k",
                    "read -P 5 0 1M",
                    "read -P 0 1M 62M",
                    "read -P 6 63M 1M",
                ],
            );
            // A snapshot keeps the VM state as it was; reverting brings it back.
            let snap = |args: &[&str]| {
                let mut a = vec!["snapshot"];
                a.extend_from_slice(args);
                a.push(p.to_str().unwrap());
                let prog = if tool == QIMG { QIMG } else { "qemu-img" };
                let o = run(prog, &a);
                assert!(o.status.success(), "{prog} {a:?}: {}", text(&o));
            };
            snap(&["-c", "s1"]);
            io(
                tool,
                &p,
                &["write -b -P 0x21 0 4k", "write -b -P 0x22 8G 4k"],
            );
            qemu_check_clean(&p);
            io(
                other(tool),
                &p,
                &["read -b -P 0x21 0 4k", "read -b -P 0x22 8G 4k"],
            );
            snap(&["-a", "s1"]);
            qemu_check_clean(&p);
            io(
                other(tool),
                &p,
                &["read -b -P 0x11 0 1536", &far_r, "read -b -P 0 8G 4k"],
            );
            snap(&["-d", "s1"]);
            qemu_check_clean(&p);
            io(other(tool), &p, &["read -b -P 0x12 1536 1024", &far_r]);
        }
    }
}

/// An overlay's VM state reads the backing file where it has not written (QEMU's rule: the
/// area is guest address space like the disk), and writes there copy on write.
#[test]
fn an_overlay_reads_its_backing_file_below_its_vm_state() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    // The base is larger than the overlay: its disk reaches into the overlay's VM state area.
    qemu_create(&base, "", 1 << 30, &[]);
    io("qemu-io", &base, &["write -P 7 512M 1M"]);
    let mut seen = Vec::new();
    for tool in ["qemu-io", QIMG] {
        let _ = std::fs::remove_file(&top);
        qemu_create(
            &top,
            "",
            64 << 20,
            &["-b", base.to_str().unwrap(), "-F", "qcow2"],
        );
        io(
            tool,
            &top,
            &[
                "read -b -P 7 0 1M",
                "write -b -P 8 4096 512",
                "read -b -P 7 0 4096",
            ],
        );
        qemu_check_clean(&top);
        let r = run(
            "qemu-io",
            &["-c", "read -b -v 0 8192", top.to_str().unwrap()],
        );
        seen.push(
            text(&r)
                .lines()
                .filter(|l| !l.contains("ops;"))
                .collect::<Vec<_>>()
                .join("\n"),
        );
    }
    assert_eq!(seen[0], seen[1]);
}

/// Errors and refusals: qemu-io's messages, in the same order.
#[test]
fn refusals_like_qemu_io() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("e.qcow2");
    let raw = dir.path().join("e.raw");
    qemu_create(&p, "", 64 << 20, &[]);
    assert!(run(
        "qemu-img",
        &["create", "-q", "-f", "raw", raw.to_str().unwrap(), "1M"]
    )
    .status
    .success());
    let cmds = [
        "read -b 1 4k",
        "write -b 0 100",
        "write -b -z 0 512",
        "write -b -f 0 512",
        "read -b -r 0 512",
        "write -b -P 0x11 1P 4k",
        "read -b -P 0x11 1P 4k",
    ];
    for (img, fmt) in [(&p, "qcow2"), (&raw, "raw")] {
        let mut outs = Vec::new();
        for tool in ["qemu-io", QIMG] {
            let mut args: Vec<&str> = if tool == QIMG { vec!["io"] } else { vec![] };
            args.extend_from_slice(&["-f", fmt]);
            for c in cmds {
                args.extend_from_slice(&["-c", c]);
            }
            args.push(img.to_str().unwrap());
            let o = run(tool, &args);
            outs.push((
                o.status.code(),
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .filter(|l| !l.contains("ops;"))
                    .collect::<Vec<_>>()
                    .join("\n"),
            ));
        }
        assert_eq!(outs[0], outs[1], "{fmt}");
    }
    qemu_check_clean(&p);
}
