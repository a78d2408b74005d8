//! `check -r leaks|all` against `qemu-img check -r` on the same damaged images: the same
//! messages (per-cluster "Repairing ...", COPIED repairs, "need to rebuild refcount
//! structures"), the same summary and exit code, the same JSON (`leaks-fixed`,
//! `corruptions-fixed`), and afterwards both images check the same way.

mod common;

use common::*;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const QIMG: &str = env!("CARGO_BIN_EXE_qimg");

fn be64(p: &Path, off: u64) -> u64 {
    let mut f = std::fs::File::open(p).unwrap();
    f.seek(SeekFrom::Start(off)).unwrap();
    let mut b = [0u8; 8];
    f.read_exact(&mut b).unwrap();
    u64::from_be_bytes(b)
}

fn poke(p: &Path, off: u64, bytes: &[u8]) {
    let mut f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.seek(SeekFrom::Start(off)).unwrap();
    f.write_all(bytes).unwrap();
}

/// Sets the 16-bit refcount of cluster `c` (first refcount block).
fn set_refcount(p: &Path, c: u64, v: u16) {
    let reftable = be64(p, 48);
    let block = be64(p, reftable) & !0x1ff;
    poke(p, block + 2 * c, &v.to_be_bytes());
}

fn l1_entry_offset(p: &Path, i: u64) -> u64 {
    be64(p, 40) + 8 * i
}

/// Damaged images, each with what to run on it.
fn images(dir: &Path) -> Vec<(&'static str, PathBuf)> {
    let mut v = Vec::new();
    let mk = |name: &str| {
        let p = dir.join(format!("{name}.qcow2"));
        qemu_create(&p, "", 16 << 20, &[]);
        qemu_io(
            &p,
            "qcow2",
            &["write -P 1 0 256k".into(), "write -P 2 4M 64k".into()],
        );
        p
    };
    // A leak: the header cluster counted twice, and a COPIED flag missing on the L1 entry.
    let p = mk("leak_and_l1_copied");
    set_refcount(&p, 0, 2);
    let e = be64(&p, l1_entry_offset(&p, 0));
    poke(&p, l1_entry_offset(&p, 0), &(e & !(1 << 63)).to_be_bytes());
    v.push(("leak_and_l1_copied", p));
    // Refcounts lower than the references: data shared with a snapshot, counted once.
    let p = mk("shared_undercounted");
    let o = run("qemu-img", &["snapshot", "-c", "s1", p.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let l2 = be64(&p, l1_entry_offset(&p, 0)) & 0x00ff_ffff_ffff_fe00;
    for j in [0u64, 2] {
        let data = be64(&p, l2 + 8 * j) & 0x00ff_ffff_ffff_fe00;
        set_refcount(&p, data >> 16, 1);
    }
    v.push(("shared_undercounted", p));
    // A COPIED flag missing on a data cluster's L2 entry.
    let p = mk("l2_copied");
    let l2 = be64(&p, l1_entry_offset(&p, 0)) & 0x00ff_ffff_ffff_fe00;
    let x = be64(&p, l2 + 8);
    poke(&p, l2 + 8, &(x & !(1 << 63)).to_be_bytes());
    v.push(("l2_copied", p));
    // A data cluster with refcount 0: only a rebuild repairs that.
    let p = mk("zero_refcount");
    let l2 = be64(&p, l1_entry_offset(&p, 0)) & 0x00ff_ffff_ffff_fe00;
    let data = be64(&p, l2 + 16) & 0x00ff_ffff_ffff_fe00;
    set_refcount(&p, data >> 16, 0);
    v.push(("zero_refcount", p));
    v
}

fn normalized(o: &std::process::Output) -> String {
    format!(
        "exit {:?}\n{}{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
    .replace("qemu-img: ", "PROG: ")
    .replace("qimg: ", "PROG: ")
}

#[test]
fn repairs_match_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for (name, original) in images(dir.path()) {
        for mode in ["leaks", "all"] {
            for output in ["human", "json"] {
                let ours = dir
                    .path()
                    .join(format!("{name}-{mode}-{output}-qimg.qcow2"));
                let theirs = dir
                    .path()
                    .join(format!("{name}-{mode}-{output}-qemu.qcow2"));
                std::fs::copy(&original, &ours).unwrap();
                std::fs::copy(&original, &theirs).unwrap();
                let args = |p: &Path| {
                    vec![
                        "check".to_string(),
                        "-r".into(),
                        mode.into(),
                        format!("--output={output}"),
                        p.file_name().unwrap().to_str().unwrap().into(),
                    ]
                };
                let q = std::process::Command::new(QIMG)
                    .args(args(&ours))
                    .current_dir(dir.path())
                    .output()
                    .unwrap();
                let e = std::process::Command::new("qemu-img")
                    .args(args(&theirs))
                    .current_dir(dir.path())
                    .output()
                    .unwrap();
                let fname = |p: &Path| p.file_name().unwrap().to_str().unwrap().to_string();
                let (qn, en) = (
                    normalized(&q).replace(&fname(&ours), "IMG"),
                    normalized(&e).replace(&fname(&theirs), "IMG"),
                );
                if qn != en {
                    failures.push(format!(
                        "{name} -r {mode} --output={output}:\n--- qimg\n{qn}--- qemu-img\n{en}"
                    ));
                }
                // Afterwards both images check alike.
                let (qc, ec) = (
                    normalized(&run("qemu-img", &["check", ours.to_str().unwrap()]))
                        .replace(&fname(&ours), "IMG"),
                    normalized(&run("qemu-img", &["check", theirs.to_str().unwrap()]))
                        .replace(&fname(&theirs), "IMG"),
                );
                if qc != ec {
                    failures.push(format!(
                        "{name} after -r {mode}: qemu-img check differs:\n--- qimg's image\n{qc}--- qemu-img's image\n{ec}"
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
