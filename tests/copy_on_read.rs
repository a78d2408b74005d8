//! Copy-on-read (`qimg io -C`) against qemu-io's: the same reads on two copies of an overlay
//! must copy the same ranges into the top image (identical maps of the top layer, identical
//! content, clean `qemu-img check`), with and without subclusters.

mod common;

use common::{qemu_create, run, text};
use std::path::Path;

const QIMG: &str = env!("CARGO_BIN_EXE_qimg");

fn io(prog: &str, extra: &[&str], img: &Path, cmds: &[&str]) -> String {
    let mut args: Vec<String> = Vec::new();
    let bin = if prog == "qemu-io" {
        "qemu-io"
    } else {
        args.push("io".into());
        QIMG
    };
    args.extend(extra.iter().map(|s| s.to_string()));
    for c in cmds {
        args.push("-c".into());
        args.push(c.to_string());
    }
    if !img.as_os_str().is_empty() {
        args.push(img.to_str().unwrap().into());
    }
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    text(&run(bin, &args))
        .lines()
        .filter(|l| !l.contains("ops/sec"))
        .map(|l| l.replace("qemu-io: ", "").replace("qimg: ", ""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top layer's allocation (what copy-on-read changes), as qemu-io's `map` prints it.
fn top_map(p: &Path) -> String {
    io("qemu-io", &["-f", "qcow2", "-r"], p, &["map"])
}

fn same_copies(top_opts: &str, base_writes: &[&str], top_writes: &[&str], reads: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    qemu_create(&base, "", 4 << 20, &[]);
    let out = io("qemu-io", &["-f", "qcow2"], &base, base_writes);
    assert!(!out.contains("failed"), "{out}");
    let mut tops = Vec::new();
    for name in ["qemu.qcow2", "qimg.qcow2"] {
        let top = dir.path().join(name);
        let opts = if top_opts.is_empty() {
            "backing_fmt=qcow2".to_string()
        } else {
            format!("backing_fmt=qcow2,{top_opts}")
        };
        qemu_create(&top, &opts, 4 << 20, &["-b", base.to_str().unwrap()]);
        if !top_writes.is_empty() {
            let out = io("qemu-io", &["-f", "qcow2"], &top, top_writes);
            assert!(!out.contains("failed"), "{out}");
        }
        tops.push(top);
    }
    let want = io("qemu-io", &["-f", "qcow2", "-C"], &tops[0], reads);
    let got = io("qimg", &["-f", "qcow2", "-C"], &tops[1], reads);
    assert_eq!(got, want, "{top_opts}: output");
    assert_eq!(
        top_map(&tops[1]),
        top_map(&tops[0]),
        "{top_opts}: what was copied"
    );
    assert!(
        !top_map(&tops[1])
            .lines()
            .all(|l| l.contains("not allocated")),
        "nothing was copied: the test proves nothing"
    );
    common::assert_same_disk(&tops[0], &tops[1]);
    common::qemu_check_clean(&tops[1]);
}

#[test]
fn reads_copy_what_qemu_io_copies() {
    let base = [
        "write -P 0x11 0 1M",
        "write -P 0x22 2M 64k",
        "write -z 3M 64k",
    ];
    let reads = [
        "read -P 0x11 1000 5000",
        "read 900k 300k",
        "read 2047k 128k",
        "read -P 0 3M 4k",
        "read 3900k 196k",
    ];
    same_copies("", &base, &["write -P 0x33 960k 8k"], &reads);
    same_copies("cluster_size=4k", &base, &["write -z 1M 8k"], &reads);
    same_copies(
        "extended_l2=on",
        &base,
        &["write -P 0xbb 28k 2k", "write -P 0xcc 34k 2k"],
        &["read 30k 4k", "read -P 0x11 100k 3k", "read 2050k 1k"],
    );
}

#[test]
fn copy_on_read_needs_a_writable_image() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    qemu_create(&img, "", 1 << 20, &[]);
    let want = io("qemu-io", &["-f", "qcow2", "-C", "-r"], &img, &[]);
    let got = io("qimg", &["-f", "qcow2", "-C", "-r"], &img, &[]);
    assert_eq!(got, want);
    assert!(
        got.contains("Can't use copy-on-read on read-only device"),
        "{got}"
    );
}

/// QEMU's `copy-on-read` filter driver (`open -o driver=copy-on-read,file.driver=qcow2`) does
/// what `-C` does; opened read-only it is refused with QEMU's message.
#[test]
fn the_copy_on_read_driver_copies_as_qemu_does() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    qemu_create(&base, "", 2 << 20, &[]);
    let out = io("qemu-io", &["-f", "qcow2"], &base, &["write -P 0x11 0 2M"]);
    assert!(!out.contains("failed"), "{out}");
    let mut tops = Vec::new();
    for (prog, name) in [("qemu-io", "qemu.qcow2"), ("qimg", "qimg.qcow2")] {
        let top = dir.path().join(name);
        qemu_create(
            &top,
            "backing_fmt=qcow2",
            2 << 20,
            &["-b", base.to_str().unwrap()],
        );
        let open = format!(
            "open -o driver=copy-on-read,file.driver=qcow2 {}",
            top.display()
        );
        let ro = format!(
            "open -r -o driver=copy-on-read,file.driver=qcow2 {}",
            top.display()
        );
        let out = io(prog, &[], Path::new(""), &[&ro])
            + &io(prog, &[], Path::new(""), &[&open, "read -P 0x11 70k 100k"]);
        tops.push((top, out.replace(name, "IMG")));
    }
    assert_eq!(tops[1].1, tops[0].1);
    assert!(
        tops[0].1.contains("Block node is read-only"),
        "{}",
        tops[0].1
    );
    assert_eq!(top_map(&tops[1].0), top_map(&tops[0].0));
    common::assert_same_disk(&tops[0].0, &tops[1].0);
}
