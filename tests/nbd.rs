//! `qimg serve` against real NBD clients: QEMU's (`qemu-img`, `qemu-io`) and libnbd's
//! (`nbdinfo`, `nbdcopy`). What the clients write must be in the image file afterwards (read back
//! by qemu-io and qimg, checked by `qemu-img check`), what they read must be the image's content,
//! and the maps must be those qemu-nbd gives for the same image.
//!
//! Needs qemu-img, qemu-io and qemu-nbd (qemu-utils) and nbdinfo, nbdcopy (libnbd-bin).

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const QIMG: &str = env!("CARGO_BIN_EXE_qimg");

/// Panics with an install hint if a client tool is missing.
fn need(tool: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{tool} is not installed: the NBD tests need it (apt-get install {})",
        match tool {
            "nbdinfo" | "nbdcopy" => "libnbd-bin",
            _ => "qemu-utils",
        }
    );
}

/// A running `qimg serve`.
struct Served {
    child: Option<Child>,
    uri: String,
}

impl Served {
    /// Starts `qimg serve ARGS` on a free port (or the socket in ARGS) and waits until it listens.
    fn start(args: &[&str]) -> Served {
        let mut cmd = Command::new(QIMG);
        // Persistent and shared, as the tests use one server for several clients, some at once.
        cmd.args(["serve", "--persistent", "--shared=16"]);
        if !args.contains(&"--socket") {
            cmd.args(["--bind", "127.0.0.1:0"]);
        }
        let mut child = cmd
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cannot start qimg serve");
        let mut line = String::new();
        let stdout = child.stdout.take().unwrap();
        let mut r = BufReader::new(stdout);
        r.read_line(&mut line).unwrap();
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = String::new();
            while r.read_line(&mut sink).is_ok_and(|n| n > 0) {
                sink.clear();
            }
        });
        let uri = line.trim().to_string();
        assert!(uri.starts_with("nbd"), "qimg serve did not start: {uri:?}");
        Served {
            child: Some(child),
            uri,
        }
    }

    /// The URI with an export name path.
    fn uri_for(&self, name: &str) -> String {
        format!("{}/{name}", self.uri)
    }

    /// SIGTERM, then the exit status (panics if the server does not exit within 30 s).
    fn stop(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let start = Instant::now();
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                panic!("qimg serve did not exit after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A running qemu-nbd (the reference server) on a free port.
struct QemuNbd {
    child: Child,
    uri: String,
}

impl QemuNbd {
    fn start(img: &Path, extra: &[&str]) -> QemuNbd {
        need("qemu-nbd");
        let port = free_port();
        let child = Command::new("qemu-nbd")
            .args(["-t", "-x", "", "-b", "127.0.0.1", "-p", &port.to_string()])
            .args(extra)
            .arg(img)
            .stdout(Stdio::null())
            .spawn()
            .expect("cannot start qemu-nbd");
        let uri = format!("nbd://127.0.0.1:{port}");
        // Wait until it accepts connections.
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "qemu-nbd did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        QemuNbd { child, uri }
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn ok(cmd: &str, args: &[&str]) -> String {
    let o = run(cmd, args);
    let t = text(&o);
    assert!(o.status.success(), "{cmd} {args:?} failed:\n{t}");
    t
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// qemu-io on an NBD URI (raw over NBD); panics on failure.
fn qemu_io_nbd(uri: &str, cmds: &[&str]) -> String {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.extend_from_slice(&["-c", c]);
    }
    args.push(uri);
    let t = ok("qemu-io", &args);
    assert!(!t.contains("failed"), "qemu-io {cmds:?}: {t}");
    t
}

/// An image with a backing chain and every kind of cluster, made by QEMU.
fn chain(dir: &Path) -> PathBuf {
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    qemu_create(&base, "", 64 << 20, &[]);
    qemu_io(
        &base,
        "qcow2",
        &[
            "write -P 1 0 1M".into(),
            "write -z 2M 64k".into(),
            "write -P 2 3M 4k".into(),
            "discard 3M 64k".into(),
            "write -c -P 5 8M 64k".into(),
            "write -P 6 20M 3M".into(),
        ],
    );
    qemu_create(&top, "", 64 << 20, &["-F", "qcow2", "-b", s(&base)]);
    qemu_io(
        &top,
        "qcow2",
        &[
            "write -P 9 65536 4096".into(),
            "write -z 8M 64k".into(),
            "write -z -u 2M 4k".into(),
            "write -P 10 21M 100k".into(),
        ],
    );
    top
}

#[test]
fn create_and_info() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    let srv = Served::start(&["--create", "10G", s(&img)]);
    let info = ok("qemu-img", &["info", &srv.uri]);
    assert!(info.contains("virtual size: 10 GiB"), "{info}");
    // The file name is an alias of the default export.
    let info = ok("qemu-img", &["info", &srv.uri_for("disk.qcow2")]);
    assert!(info.contains("virtual size: 10 GiB"), "{info}");
    assert!(srv.stop().success());
    let info = ok("qemu-img", &["info", s(&img)]);
    assert!(
        info.contains("file format: qcow2") && info.contains("10 GiB"),
        "{info}"
    );
    qemu_check_clean(&img);
    // --create on an existing image serves it unchanged.
    let srv = Served::start(&["--create", "1G", s(&img)]);
    let info = ok("qemu-img", &["info", &srv.uri]);
    assert!(info.contains("virtual size: 10 GiB"), "{info}");
    assert!(srv.stop().success());
}

/// The same qemu-io commands through `qimg serve` and directly on a copy: same content.
#[test]
fn qemu_io_writes_land_in_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let served = dir.path().join("served.qcow2");
    let reference = dir.path().join("reference.qcow2");
    qemu_create(&served, "", 32 << 20, &[]);
    qemu_create(&reference, "", 32 << 20, &[]);
    let cmds = [
        "write -P 0xab 0 1M",
        "write -P 0xcd 777 1000",
        "write -z 2M 1M",
        "write -P 0x11 3M 64k",
        "write -z -u 3M 64k",
        "aio_write -P 0x22 5M 128k",
        "aio_write -P 0x33 6M 4k",
        "aio_flush",
        "write -P 0x44 31M 1M",
        "writev -P 0x55 10M 4k 8k 512",
        "write -f -P 0x66 12M 64k",
        "discard 12M 64k",
        "flush",
        "read -P 0xab 0 777",
        "read -P 0xcd 777 1000",
        "read -P 0 2M 1M",
        "read -P 0x22 5M 128k",
        "read -P 0x44 31M 1M",
    ];
    // TRIM must really discard for the contents to match qemu-io's local discard.
    let srv = Served::start(&["-f", "qcow2", "--discard", "unmap", s(&served)]);
    qemu_io_nbd(&srv.uri, &cmds);
    assert!(srv.stop().success(), "qimg serve did not exit cleanly");
    let local: Vec<String> = cmds.iter().map(|c| c.to_string()).collect();
    qemu_io(&reference, "qcow2", &local);
    qemu_check_clean(&served);
    ok("qemu-img", &["compare", s(&served), s(&reference)]);
    // qimg reads it back too.
    let o = run(
        QIMG,
        &[
            "io",
            "-c",
            "read -P 0x44 31M 1M",
            "-c",
            "read -P 0xcd 777 1000",
            s(&served),
        ],
    );
    assert!(
        o.status.success() && !text(&o).contains("failed"),
        "{}",
        text(&o)
    );
}

#[test]
fn convert_compare_and_map_match_qemu_nbd() {
    need("nbdinfo");
    let dir = tempfile::tempdir().unwrap();
    let top = chain(dir.path());
    let srv = Served::start(&["-r", "-A", s(&top)]);
    let reference = QemuNbd::start(&top, &["-r", "-A"]);
    // Content.
    ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "qcow2", &srv.uri, s(&top)],
    );
    let out = dir.path().join("out.raw");
    ok(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &srv.uri, s(&out)],
    );
    ok(
        "qemu-img",
        &["compare", "-F", "qcow2", "-f", "raw", s(&out), s(&top)],
    );
    // Maps: qemu-img's view and both metadata contexts through libnbd.
    let ours = ok("qemu-img", &["map", "--output=json", "-f", "raw", &srv.uri]);
    let theirs = ok(
        "qemu-img",
        &["map", "--output=json", "-f", "raw", &reference.uri],
    );
    assert_eq!(ours, theirs);
    for ctx in ["--map", "--map=qemu:allocation-depth"] {
        let ours = ok("nbdinfo", &[ctx, &srv.uri]);
        let theirs = ok("nbdinfo", &[ctx, &reference.uri]);
        assert_eq!(ours, theirs, "nbdinfo {ctx}");
    }
    let ours = ok("nbdinfo", &["--map", "--totals", &srv.uri]);
    assert!(!ours.is_empty());
    drop(reference);
    assert!(srv.stop().success());
}

#[test]
fn convert_into_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let top = chain(dir.path());
    let target = dir.path().join("target.qcow2");
    qemu_create(&target, "", 64 << 20, &[]);
    let srv = Served::start(&["--discard", "unmap", s(&target)]);
    ok(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "qcow2",
            "-O",
            "raw",
            s(&top),
            &srv.uri,
        ],
    );
    ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "qcow2", &srv.uri, s(&top)],
    );
    assert!(srv.stop().success());
    qemu_check_clean(&target);
    ok("qemu-img", &["compare", s(&target), s(&top)]);
}

#[test]
fn nbdcopy_both_ways() {
    need("nbdcopy");
    let dir = tempfile::tempdir().unwrap();
    let top = chain(dir.path());
    let srv = Served::start(&["-r", s(&top)]);
    let out = dir.path().join("out.raw");
    ok("nbdcopy", &[&srv.uri, s(&out)]);
    ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "qcow2", s(&out), s(&top)],
    );
    assert!(srv.stop().success());

    // Into a fresh image, over several connections (multi-conn).
    let target = dir.path().join("copy.qcow2");
    let srv = Served::start(&["--create", "64M", s(&target)]);
    ok(
        "nbdcopy",
        &["--connections=4", "--requests=16", s(&out), &srv.uri],
    );
    ok("nbdcopy", &["--flush", s(&out), &srv.uri]);
    assert!(srv.stop().success());
    qemu_check_clean(&target);
    ok("qemu-img", &["compare", "-F", "raw", s(&target), s(&out)]);
}

#[test]
fn concurrent_clients() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("c.qcow2");
    let srv = Served::start(&["--create", "256M", s(&img)]);
    let uri = srv.uri.clone();
    let handles: Vec<_> = (0..6u64)
        .map(|k| {
            let uri = uri.clone();
            std::thread::spawn(move || {
                let base = (k * 32) << 20;
                let cmds: Vec<String> = (0..16u64)
                    .map(|i| {
                        format!(
                            "aio_write -P {} {} 256k",
                            (k * 16 + i) % 250 + 1,
                            base + i * (1 << 20)
                        )
                    })
                    .chain(std::iter::once("aio_flush".to_string()))
                    .collect();
                let refs: Vec<&str> = cmds.iter().map(|c| c.as_str()).collect();
                qemu_io_nbd(&uri, &refs);
            })
        })
        .collect();
    // A reader at the same time.
    let reader = {
        let uri = uri.clone();
        std::thread::spawn(move || {
            for _ in 0..5 {
                qemu_io_nbd(&uri, &["read 0 8M", "read 100M 8M"]);
            }
        })
    };
    for h in handles {
        h.join().unwrap();
    }
    reader.join().unwrap();
    // Everything is visible through the server, then in the file.
    let checks: Vec<String> = (0..6u64)
        .flat_map(|k| {
            (0..16u64).map(move |i| {
                format!(
                    "read -P {} {} 256k",
                    (k * 16 + i) % 250 + 1,
                    ((k * 32) << 20) + i * (1 << 20)
                )
            })
        })
        .collect();
    let refs: Vec<&str> = checks.iter().map(|c| c.as_str()).collect();
    qemu_io_nbd(&uri, &refs);
    assert!(srv.stop().success());
    qemu_check_clean(&img);
    qemu_io(&img, "qcow2", &checks);
}

#[test]
fn read_only_export() {
    need("nbdinfo");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("ro.qcow2");
    qemu_create(&img, "", 16 << 20, &[]);
    qemu_io(&img, "qcow2", &["write -P 7 0 64k".into()]);
    let srv = Served::start(&["--read-only", s(&img)]);
    let t = ok(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 7 0 64k", &srv.uri],
    );
    assert!(!t.contains("failed"), "{t}");
    let info = ok("nbdinfo", &[&srv.uri]);
    assert!(info.contains("is_read_only: true"), "{info}");
    // QEMU refuses to open a read-only export for writing.
    let o = run("qemu-io", &["-f", "raw", "-c", "write -P 1 0 4k", &srv.uri]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(srv.stop().success());
    qemu_io(&img, "qcow2", &["read -P 7 0 64k".into()]);
}

#[test]
fn unix_socket_and_export_names() {
    need("nbdinfo");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("u.qcow2");
    let sock = dir.path().join("nbd.sock");
    qemu_create(&img, "", 8 << 20, &[]);
    let srv = Served::start(&[
        "--socket",
        s(&sock),
        "-x",
        "vm1",
        "-D",
        "test disk",
        s(&img),
    ]);
    assert_eq!(
        srv.uri,
        format!("nbd+unix:///vm1?socket={}", sock.display())
    );
    let info = ok("qemu-img", &["info", &srv.uri]);
    assert!(info.contains("virtual size: 8 MiB"), "{info}");
    let list = ok(
        "nbdinfo",
        &["--list", &format!("nbd+unix:///?socket={}", sock.display())],
    );
    assert!(list.contains("vm1") && list.contains("test disk"), "{list}");
    // The default export does not exist when a name is given.
    let o = run(
        "qemu-img",
        &["info", &format!("nbd+unix:///?socket={}", sock.display())],
    );
    assert!(!o.status.success());
    assert!(srv.stop().success());
    assert!(!sock.exists(), "the socket file is removed on exit");
}

#[test]
fn discard_modes() {
    let dir = tempfile::tempdir().unwrap();
    for (mode, expect_data) in [("ignore", true), ("unmap", false)] {
        let img = dir.path().join(format!("{mode}.qcow2"));
        qemu_create(&img, "", 16 << 20, &[]);
        let srv = Served::start(&["--discard", mode, s(&img)]);
        qemu_io_nbd(&srv.uri, &["write -P 3 0 1M", "discard 0 1M", "flush"]);
        assert!(srv.stop().success());
        qemu_check_clean(&img);
        let map = ok("qemu-img", &["map", "--output=json", s(&img)]);
        let has_data = map.contains("\"data\": true");
        assert_eq!(has_data, expect_data, "--discard {mode}: {map}");
    }
}

#[test]
fn graceful_shutdown_leaves_a_clean_image() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("g.qcow2");
    let srv = Served::start(&["--create", "1G", s(&img)]);
    // Allocating writes all over the disk: many dirty L2 tables in the server's cache.
    let cmds: Vec<String> = (0..64u64)
        .map(|i| format!("aio_write -P {} {} 64k", i + 1, i * (16 << 20)))
        .collect();
    let refs: Vec<&str> = cmds.iter().map(|c| c.as_str()).collect();
    qemu_io_nbd(&srv.uri, &refs);
    let status = srv.stop();
    assert!(status.success(), "exit status {status:?}");
    qemu_check_clean(&img);
    let checks: Vec<String> = (0..64u64)
        .map(|i| format!("read -P {} {} 64k", i + 1, i * (16 << 20)))
        .collect();
    qemu_io(&img, "qcow2", &checks);
}

/// `serve -l` exports an internal snapshot, read-only, as `qemu-nbd -l` does: what a client
/// reads is what `qemu-img convert -l` reads, and writes are refused.
#[test]
fn serves_an_internal_snapshot_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("s.qcow2");
    let p = img.to_str().unwrap();
    assert!(run_ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p, "4M"]
    ));
    assert!(run_ok("qemu-io", &["-c", "write -P 1 0 1M", p]));
    assert!(run_ok("qemu-img", &["snapshot", "-c", "before", p]));
    assert!(run_ok("qemu-io", &["-c", "write -P 2 0 2M", p]));
    let want = dir.path().join("want.raw");
    assert!(run_ok(
        "qemu-img",
        &[
            "convert",
            "-l",
            "before",
            "-O",
            "raw",
            p,
            want.to_str().unwrap()
        ]
    ));
    for sel in ["before", "1", "snapshot.name=before"] {
        let served = Served::start(&["-f", "qcow2", "-l", sel, p]);
        let got = dir.path().join("got.raw");
        assert!(run_ok(
            "qemu-img",
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                "raw",
                &served.uri,
                got.to_str().unwrap()
            ]
        ));
        assert!(
            std::fs::read(&got).unwrap() == std::fs::read(&want).unwrap(),
            "-l {sel}: the export does not read as the snapshot"
        );
        let w = Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write 0 4k", &served.uri])
            .output()
            .unwrap();
        assert!(!w.status.success(), "-l {sel}: a write was accepted");
        assert!(served.stop().success());
    }
    // The active disk was not touched.
    assert!(run_ok("qemu-io", &["-c", "read -P 2 0 2M", p]));
}

fn run_ok(cmd: &str, args: &[&str]) -> bool {
    let o = Command::new(cmd).args(args).output().unwrap();
    if !o.status.success() {
        eprintln!(
            "{cmd} {args:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    o.status.success()
}
