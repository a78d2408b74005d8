//! qimg's tools as NBD clients (`nbd://`, `nbd+unix://`, `driver=nbd`), against qemu-nbd:
//! `info` and `map` print what qemu-img prints for the same export, `compare` and `convert`
//! read it, `io` and `convert -n` write into it, `x-dirty-bitmap` reads a bitmap as QEMU does;
//! and a hostile server gets an error, never a panic or a hang.
//!
//! Needs qemu-img, qemu-io and qemu-nbd (qemu-utils).

mod common;

use common::*;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

const QIMG: &str = env!("CARGO_BIN_EXE_qimg");

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// qemu-nbd on a Unix socket (or TCP port); killed on drop.
struct Server {
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for(p: &Path) {
    let t = Instant::now();
    while !p.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "server did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn qemu_nbd(args: &[&str]) -> Server {
    Server {
        child: Command::new("qemu-nbd").args(args).spawn().unwrap(),
    }
}

fn same(a: std::process::Output, b: std::process::Output, what: &str) {
    assert_eq!(
        (a.status.code(), text(&a)),
        (b.status.code(), text(&b).replace("qimg:", "qemu-img:")),
        "{what}"
    );
}

#[test]
fn info_map_compare_convert_match_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    qemu_create(&img, "", 32 << 20, &[]);
    qemu_io(
        &img,
        "qcow2",
        &[
            "write -P 0x11 0 1M".into(),
            "write -z 4M 1M".into(),
            "write -P 0x22 10M 4k".into(),
        ],
    );
    let sock = dir.path().join("s.sock");
    let _srv = qemu_nbd(&[
        "-r",
        "-f",
        "qcow2",
        "-t",
        "-x",
        "exp",
        "-k",
        s(&sock),
        s(&img),
    ]);
    wait_for(&sock);
    let uri = format!("nbd+unix:///exp?socket={}", sock.display());
    for args in [
        vec!["info", uri.as_str()],
        vec!["info", "--output=json", uri.as_str()],
        vec!["map", uri.as_str()],
        vec!["map", "--output=json", uri.as_str()],
    ] {
        let opts = format!(
            "driver=nbd,server.type=unix,server.path={},export=exp",
            sock.display()
        );
        same(
            run("qemu-img", &args),
            run(QIMG, &args),
            &format!("{args:?}"),
        );
        let mut io = args.clone();
        io.pop();
        io.extend(["--image-opts", opts.as_str()]);
        same(run("qemu-img", &io), run(QIMG, &io), &format!("{io:?}"));
    }
    let o = run(
        QIMG,
        &["compare", "-f", "raw", "-F", "qcow2", &uri, s(&img)],
    );
    assert!(o.status.success(), "{}", text(&o));
    let copy = dir.path().join("copy.qcow2");
    let o = run(
        QIMG,
        &["convert", "-f", "raw", "-O", "qcow2", &uri, s(&copy)],
    );
    assert!(o.status.success(), "{}", text(&o));
    qemu_compare(&img, &copy);
    qemu_check_clean(&copy);
    // A missing export: an error naming it, as QEMU's.
    let o = run(
        QIMG,
        &[
            "info",
            &format!("nbd+unix:///nope?socket={}", sock.display()),
        ],
    );
    assert!(!o.status.success());
    assert!(
        text(&o).contains("Requested export not available"),
        "{}",
        text(&o)
    );
}

fn qemu_compare(a: &Path, b: &Path) {
    let o = run("qemu-img", &["compare", s(a), s(b)]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn writes_over_tcp_reach_the_export() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    let want = dir.path().join("want.qcow2");
    qemu_create(&img, "", 16 << 20, &[]);
    qemu_create(&want, "", 16 << 20, &[]);
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let pid = dir.path().join("pid");
    let _srv = qemu_nbd(&[
        "-f",
        "qcow2",
        "-t",
        "-b",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "--pid-file",
        s(&pid),
        s(&img),
    ]);
    wait_for(&pid);
    let uri = format!("nbd://127.0.0.1:{port}");
    let cmds = [
        "write -P 0x5a 1M 70k",
        "write -z 2M 64k",
        "discard 3M 128k",
        "write -P 0x33 16773120 4096",
    ];
    let mut args = vec!["io", "-f", "raw"];
    for c in &cmds {
        args.extend(["-c", c]);
    }
    args.push(&uri);
    let o = run(QIMG, &args);
    assert!(
        o.status.success() && !text(&o).contains("fail"),
        "{}",
        text(&o)
    );
    qemu_io(&want, "qcow2", &cmds.map(String::from));
    let o = run(
        QIMG,
        &["compare", "-f", "raw", "-F", "qcow2", &uri, s(&want)],
    );
    assert!(o.status.success(), "{}", text(&o));
    // convert -n into the export.
    let src = dir.path().join("src.qcow2");
    qemu_create(&src, "", 16 << 20, &[]);
    qemu_io(&src, "qcow2", &["write -P 0x77 5M 3M".into()]);
    let o = run(QIMG, &["convert", "-n", "-O", "raw", s(&src), &uri]);
    assert!(o.status.success(), "{}", text(&o));
    let o = run(
        QIMG,
        &["compare", "-f", "raw", "-F", "qcow2", &uri, s(&src)],
    );
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn dirty_bitmap_reads_as_qemu_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    qemu_create(&img, "", 16 << 20, &[]);
    let o = run("qemu-img", &["bitmap", "--add", s(&img), "b0"]);
    assert!(o.status.success());
    qemu_io(
        &img,
        "qcow2",
        &["write 1M 4k".into(), "write 9M 200k".into()],
    );
    let sock = dir.path().join("s.sock");
    let _srv = qemu_nbd(&[
        "-r",
        "-f",
        "qcow2",
        "-t",
        "-B",
        "b0",
        "-k",
        s(&sock),
        s(&img),
    ]);
    wait_for(&sock);
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:b0",
        sock.display()
    );
    let args = ["map", "--output=json", "--image-opts", opts.as_str()];
    same(
        run("qemu-img", &args),
        run(QIMG, &args),
        "x-dirty-bitmap map",
    );
    let bad = format!(
        "driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:nope",
        sock.display()
    );
    let o = run(QIMG, &["map", "--image-opts", &bad]);
    assert!(!o.status.success());
}

/// A fake server: a valid handshake, then `reply` for the first request.
fn hostile(
    reply: Vec<u8>,
) -> (
    tempfile::TempDir,
    std::path::PathBuf,
    std::thread::JoinHandle<()>,
) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("h.sock");
    let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let t = std::thread::spawn(move || {
        let Ok((mut c, _)) = l.accept() else { return };
        let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
        let mut hello = Vec::new();
        hello.extend_from_slice(b"NBDMAGIC");
        hello.extend_from_slice(b"IHAVEOPT");
        hello.extend_from_slice(&3u16.to_be_bytes());
        let _ = c.write_all(&hello);
        let mut flags = [0u8; 4];
        if c.read_exact(&mut flags).is_err() {
            return;
        }
        loop {
            let mut h = [0u8; 16];
            if c.read_exact(&mut h).is_err() {
                return;
            }
            let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
            let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let mut data = vec![0u8; len as usize];
            let _ = c.read_exact(&mut data);
            let rep = |rtype: u32, payload: &[u8]| {
                let mut v = Vec::new();
                v.extend_from_slice(&0x3e889045565a9u64.to_be_bytes());
                v.extend_from_slice(&opt.to_be_bytes());
                v.extend_from_slice(&rtype.to_be_bytes());
                v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
                v.extend_from_slice(payload);
                v
            };
            match opt {
                7 => {
                    // GO: 1 MiB, flags HAS_FLAGS | READ_ONLY.
                    let mut info = vec![0u8, 0];
                    info.extend_from_slice(&(1u64 << 20).to_be_bytes());
                    info.extend_from_slice(&3u16.to_be_bytes());
                    let _ = c.write_all(&rep(3, &info));
                    let _ = c.write_all(&rep(1, &[]));
                    break;
                }
                // Everything else refused (no structured replies, no contexts).
                _ => {
                    let _ = c.write_all(&rep(0x8000_0001, &[]));
                }
            }
        }
        let mut req = [0u8; 28];
        if c.read_exact(&mut req).is_ok() {
            let _ = c.write_all(&reply);
        }
        let mut sink = [0u8; 4096];
        while matches!(c.read(&mut sink), Ok(n) if n > 0) {}
    });
    (dir, sock, t)
}

#[test]
fn a_hostile_server_gets_errors_not_panics() {
    let cookie_mismatch = {
        let mut v = Vec::new();
        v.extend_from_slice(&0x6744_6698u32.to_be_bytes());
        v.extend_from_slice(&0u32.to_be_bytes());
        v.extend_from_slice(&999u64.to_be_bytes());
        v
    };
    let bad_magic = vec![0xffu8; 32];
    let short = vec![0x67u8, 0x44];
    let io_error = {
        let mut v = Vec::new();
        v.extend_from_slice(&0x6744_6698u32.to_be_bytes());
        v.extend_from_slice(&5u32.to_be_bytes());
        v.extend_from_slice(&1u64.to_be_bytes());
        v
    };
    for (what, reply) in [
        ("wrong cookie", cookie_mismatch),
        ("bad magic", bad_magic),
        ("truncated", short),
        ("EIO", io_error),
    ] {
        let (_dir, sock, t) = hostile(reply);
        let uri = format!("nbd+unix:///?socket={}", sock.display());
        let start = Instant::now();
        let o = run(QIMG, &["io", "-f", "raw", "-r", "-c", "read 0 4k", &uri]);
        assert!(start.elapsed() < Duration::from_secs(20), "{what}: hung");
        let out = text(&o);
        assert!(!out.contains("panicked"), "{what}: {out}");
        assert!(
            !o.status.success() || out.contains("failed"),
            "{what}: the read must fail: {out}"
        );
        let _ = t.join();
    }
}
