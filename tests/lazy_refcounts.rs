//! Lazy refcounts as QEMU has them: once the dirty bit is set, a flush writes the tables but
//! not the data clusters' refcounts (a crash is repaired at the next open, so they need not be
//! durable); a new L2 table's refcount is written when the table is allocated; `close` writes
//! them all and clears the dirty bit. The `lazy-refcounts` runtime option overrides the
//! header's bit for one session. Checked against what QEMU's check reports after the same
//! sequence with `qemu-io` (killed after a flush).

mod common;

use common::*;
use std::path::Path;

fn qimg() -> &'static str {
    env!("CARGO_BIN_EXE_qimg")
}

/// `qemu-img check` of an image a killed program left, with the program's name taken out.
fn check_text(p: &Path) -> (Option<i32>, String) {
    let o = run("qemu-img", &["check", p.to_str().unwrap()]);
    (o.status.code(), text(&o))
}

/// Runs `cmds` then kills the program (SIGKILL, raised by itself).
fn killed(prog: &str, p: &Path, opts: Option<&str>, cmds: &[&str]) {
    let mut args: Vec<String> = Vec::new();
    if prog == qimg() {
        args.push("io".into());
    }
    // As QEMU's iotests run qemu-io (its own default is writethrough).
    args.push("-t".into());
    args.push("writeback".into());
    for c in cmds {
        args.push("-c".into());
        args.push(c.to_string());
    }
    args.push("-c".into());
    args.push("sigraise 9".into());
    match opts {
        Some(o) => {
            args.push("--image-opts".into());
            args.push(format!("driver=qcow2,file.filename={},{o}", p.display()));
        }
        None => args.push(p.to_str().unwrap().into()),
    }
    let args: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
    let o = run(prog, &args);
    assert_eq!(o.status.code(), None, "{prog} was not killed: {}", text(&o));
}

#[test]
fn a_killed_session_leaves_what_qemus_leaves() {
    let dir = tempfile::tempdir().unwrap();
    for (create, opts, cmds) in [
        // The header's bit: data refcounts stay in memory even across a flush.
        (
            "lazy_refcounts=on",
            None,
            &["write -P 0x5a 0 128k", "flush"][..],
        ),
        // Switched on for this session only.
        (
            "lazy_refcounts=off",
            Some("lazy-refcounts=on"),
            &["write -P 0x5a 0 512", "flush", "write -P 1 1M 64k"][..],
        ),
        // Switched off: refcounts are written as usual, the image stays clean.
        (
            "lazy_refcounts=on",
            Some("lazy-refcounts=off"),
            &["write -P 0x5a 0 512", "flush"][..],
        ),
    ] {
        let mut results = Vec::new();
        for prog in ["qemu-io", qimg()] {
            let p = dir.path().join("t.qcow2");
            let _ = std::fs::remove_file(&p);
            qemu_create(&p, create, 64 << 20, &[]);
            killed(prog, &p, opts, cmds);
            let dirty = std::fs::read(&p).unwrap()[79] & 1;
            results.push((dirty, check_text(&p)));
        }
        assert_eq!(
            results[0], results[1],
            "{create} {opts:?} {cmds:?}: qemu-io, qimg io"
        );
    }
}

#[test]
fn close_writes_the_refcounts_and_clears_the_dirty_bit() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.qcow2");
    qemu_create(&p, "lazy_refcounts=on", 64 << 20, &[]);
    let o = run(
        qimg(),
        &[
            "io",
            "-c",
            "write -P 7 0 1M",
            "-c",
            "flush",
            p.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(std::fs::read(&p).unwrap()[79] & 1, 0, "dirty bit left set");
    qemu_check_clean(&p);
    qemu_io(&p, "qcow2", &["read -P 7 0 1M".into()]);
    // Refused where QEMU refuses it.
    let v2 = dir.path().join("v2.qcow2");
    qemu_create(&v2, "compat=0.10", 1 << 20, &[]);
    let o = run(
        qimg(),
        &[
            "io",
            "--image-opts",
            "-c",
            "read 0 512",
            &format!(
                "driver=qcow2,file.filename={},lazy-refcounts=on",
                v2.display()
            ),
        ],
    );
    assert!(
        text(&o).contains("Lazy refcounts require a qcow2 image with at least qemu 1.1"),
        "{}",
        text(&o)
    );
}
