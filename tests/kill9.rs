//! `kill -9` in the middle of the long image commands: `snapshot -c`, `snapshot -d`, `commit`
//! and `rebase` are started on images big enough to take a while and killed after a random
//! delay within their measured run time. The page cache keeps every write the process made, so
//! this is the crash a process (not the machine) has. Afterwards QEMU's check finds nothing worse
//! than leaks (and, for snapshots, COPIED flags on clusters whose extra count is a leak: see
//! `tests/crash_snapshot.rs`), and the guest reads what it read before.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const QIMG: &str = env!("CARGO_BIN_EXE_qimg");
const KILLS: u64 = 4;

/// Runs `qimg args` and kills it with SIGKILL after `delay`. Returns whether it finished first.
fn run_killed(args: &[&str], delay: Duration) -> bool {
    let mut child = Command::new(QIMG).args(args).spawn().unwrap();
    let start = Instant::now();
    while start.elapsed() < delay {
        if child.try_wait().unwrap().is_some() {
            return true;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let _ = child.kill(); // SIGKILL
    let status = child.wait().unwrap();
    for a in args.iter().filter(|a| a.ends_with(".qcow2")) {
        wait_unlocked(Path::new(a));
    }
    status.success()
}

/// Waits until no process holds the image's locks any more. A killed process's io_uring is
/// torn down by the kernel after the process is gone, and the file (with its OFD locks) lives
/// until then: for a moment QEMU's tools are refused as if the process still ran.
fn wait_unlocked(p: &Path) {
    let start = Instant::now();
    loop {
        let probe = run("qemu-io", &["-r", "-c", "length", p.to_str().unwrap()]);
        if !text(&probe).contains("lock") || start.elapsed() > Duration::from_secs(10) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A sparse copy (the images are mostly holes).
fn copy(from: &Path, to: &Path) {
    let o = run(
        "cp",
        &[
            "--sparse=always",
            from.to_str().unwrap(),
            to.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "cp: {}", text(&o));
}

fn timed(args: &[&str]) -> Duration {
    let t = Instant::now();
    let o = run(QIMG, args);
    assert!(o.status.success(), "{args:?}: {}", text(&o));
    t.elapsed()
}

fn same_content(a: &Path, b: &Path) -> bool {
    run(
        "qemu-img",
        &["compare", "-q", a.to_str().unwrap(), b.to_str().unwrap()],
    )
    .status
    .success()
}

/// A preallocated image with data, so that sharing or dropping its tree takes a while.
fn big_image(p: &Path) {
    qemu_create(p, "preallocation=metadata,cluster_size=4k", 1 << 30, &[]);
    qemu_io(
        p,
        "qcow2",
        &["write -P 3 0 8M".into(), "write -P 4 512M 8M".into()],
    );
}

#[test]
fn snapshots_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let orig = d.join("orig.qcow2");
    big_image(&orig);
    let work = d.join("work.qcow2");
    copy(&orig, &work);
    let w = work.to_str().unwrap();
    let create = timed(&["snapshot", "-c", "s", w]);
    let delete = timed(&["snapshot", "-d", "s", w]);
    let mut r = fastrand::Rng::with_seed(9);
    let mut failures = Vec::new();
    for i in 0..KILLS {
        // Create, killed.
        copy(&orig, &work);
        let delay = Duration::from_micros(r.u64(0..create.as_micros() as u64 + 1));
        run_killed(&["snapshot", "-c", "s", w], delay);
        if let Err(e) = check_after_crash(&work, 4096) {
            failures.push(format!("create killed after {delay:?} (#{i}): {e}"));
        }
        if !same_content(&orig, &work) {
            failures.push(format!("create killed after {delay:?}: the disk changed"));
        }
        // Delete of a snapshot that shares everything, killed.
        copy(&orig, &work);
        assert!(run(QIMG, &["snapshot", "-c", "s", w]).status.success());
        qemu_io(&work, "qcow2", &["write -P 5 4M 8M".into()]);
        let snap_before = d.join("snap.raw");
        let o = run(
            "qemu-img",
            &[
                "convert",
                "-l",
                "s",
                "-O",
                "raw",
                w,
                snap_before.to_str().unwrap(),
            ],
        );
        assert!(o.status.success());
        let active_before = d.join("active.qcow2");
        copy(&work, &active_before);
        let delay = Duration::from_micros(r.u64(0..delete.as_micros() as u64 + 1));
        run_killed(&["snapshot", "-d", "s", w], delay);
        if let Err(e) = check_after_crash(&work, 4096) {
            failures.push(format!("delete killed after {delay:?} (#{i}): {e}"));
        }
        if !same_content(&active_before, &work) {
            failures.push(format!("delete killed after {delay:?}: the disk changed"));
        }
        let listed = text(&run("qemu-img", &["snapshot", "-l", w]));
        if listed.contains(" s ") {
            let now = d.join("snap-now.raw");
            let o = run(
                "qemu-img",
                &["convert", "-l", "s", "-O", "raw", w, now.to_str().unwrap()],
            );
            if !o.status.success()
                || std::fs::read(&now).unwrap() != std::fs::read(&snap_before).unwrap()
            {
                failures.push(format!(
                    "delete killed after {delay:?}: the snapshot changed"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn commit_and_rebase_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.qcow2");
    qemu_create(&base, "", 256 << 20, &[]);
    qemu_io(&base, "qcow2", &["write -P 1 0 32M".into()]);
    let other = d.join("other.qcow2");
    copy(&base, &other);
    qemu_io(&other, "qcow2", &["write -P 2 16M 32M".into()]);
    let top0 = d.join("top0.qcow2");
    qemu_create(
        &top0,
        "",
        256 << 20,
        &["-b", base.to_str().unwrap(), "-F", "qcow2"],
    );
    let o = run(
        "qemu-img",
        &[
            "bench",
            "-q",
            "-w",
            "-t",
            "none",
            "--pattern",
            "9",
            "-c",
            "2048",
            "-s",
            "64k",
            "-S",
            "256k",
            top0.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let view0 = d.join("view0.raw");
    assert!(run(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            top0.to_str().unwrap(),
            view0.to_str().unwrap()
        ]
    )
    .status
    .success());
    let base0 = d.join("base0.qcow2");
    copy(&base, &base0);
    let top = d.join("top.qcow2");
    let t = top.to_str().unwrap();
    let reset = || {
        copy(&base0, &base);
        copy(&top0, &top);
    };
    let view_ok = |what: &str| -> Result<(), String> {
        let v = d.join("view.raw");
        let o = run(
            "qemu-img",
            &["convert", "-O", "raw", t, v.to_str().unwrap()],
        );
        if !o.status.success() {
            return Err(format!("{what}: convert: {}", text(&o)));
        }
        if std::fs::read(&v).unwrap() != std::fs::read(&view0).unwrap() {
            return Err(format!("{what}: the guest's view changed"));
        }
        Ok(())
    };
    let check_ok = |p: &Path, what: &str| -> Result<(), String> {
        let (code, corruptions, _, out) = qemu_check(p);
        if corruptions > 0 || !(code == 0 || code == 3) {
            return Err(format!("{what}: qemu-img check rc={code}:\n{out}"));
        }
        Ok(())
    };
    reset();
    let commit = timed(&["commit", "-q", t]);
    reset();
    let rebase = timed(&[
        "rebase",
        "-q",
        "-b",
        other.to_str().unwrap(),
        "-F",
        "qcow2",
        t,
    ]);
    let mut r = fastrand::Rng::with_seed(99);
    let mut failures = Vec::new();
    for i in 0..KILLS {
        reset();
        let delay = Duration::from_micros(r.u64(0..commit.as_micros() as u64 + 1));
        run_killed(&["commit", "-q", t], delay);
        let what = format!("commit killed after {delay:?} (#{i})");
        for e in [
            check_ok(&base, &what),
            check_ok(&top, &what),
            view_ok(&what),
        ] {
            if let Err(e) = e {
                failures.push(e);
            }
        }
        reset();
        let delay = Duration::from_micros(r.u64(0..rebase.as_micros() as u64 + 1));
        run_killed(
            &[
                "rebase",
                "-q",
                "-b",
                other.to_str().unwrap(),
                "-F",
                "qcow2",
                t,
            ],
            delay,
        );
        let what = format!("rebase killed after {delay:?} (#{i})");
        for e in [check_ok(&top, &what), view_ok(&what)] {
            if let Err(e) = e {
                failures.push(e);
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
