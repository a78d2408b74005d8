//! Image locking against QEMU's tools, both ways, and qimg against qimg.
//!
//! While an image is held (by qemu-nbd, qemu-io, qemu-storage-daemon, `qimg serve`, or the qimg
//! library in this process), every contender command is run twice: as qimg and as its QEMU
//! counterpart. Each pair must agree: both open the image or both are refused, and when refused
//! with the same message (program name aside). So qimg refuses exactly where QEMU refuses, with
//! QEMU's words, and QEMU refuses where a qimg user holds the image.

mod common;

use common::*;
use qimg::block::{open_image, BlockDevice, Format, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::time::{Duration, Instant};

const QIMG: &str = env!("CARGO_BIN_EXE_qimg");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until the server on `port` greets a client. A listening socket is not enough: qemu-nbd
/// listens before it opens its image, and the kernel accepts connections into the backlog
/// meanwhile; the NBD greeting comes only once the image is open (and locked).
fn wait_listening(port: u16, what: &str, child: &mut Child) {
    use std::io::Read;
    let start = Instant::now();
    loop {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut magic = [0u8; 8];
            if s.read_exact(&mut magic).is_ok() && &magic == b"NBDMAGIC" {
                return;
            }
        }
        if let Some(s) = child.try_wait().unwrap() {
            panic!("{what} exited ({s}) instead of serving");
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{what} did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Something holding the image open.
enum Holder {
    Process {
        child: Child,
        _stdin: Option<ChildStdin>,
    },
    Library {
        rt: tokio::runtime::Runtime,
        img: std::sync::Arc<dyn BlockDevice>,
    },
}

impl Holder {
    fn server(program: &str, args: &[String], port: u16) -> Holder {
        let mut child = Command::new(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        wait_listening(port, program, &mut child);
        Holder::Process {
            child,
            _stdin: None,
        }
    }

    /// qemu-io in interactive mode keeps the image open until its input ends.
    fn qemu_io(img: &Path, read_only: bool) -> Holder {
        let mut cmd = Command::new("qemu-io");
        if read_only {
            cmd.arg("-r");
        }
        let mut child = cmd
            .args(["-f", "qcow2"])
            .arg(img)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start qemu-io");
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "read 0 512").unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(
            line.contains("read 512/512"),
            "qemu-io did not open: {line}"
        );
        Holder::Process {
            child,
            _stdin: Some(stdin),
        }
    }

    fn library(img: &Path, read_only: bool) -> Holder {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let opts = OpenOptions {
            format: Some(Format::Qcow2),
            read_only,
            ..Default::default()
        };
        let img = rt.block_on(open_image(img, &opts)).unwrap();
        Holder::Library { rt, img }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        match self {
            Holder::Process { child, .. } => {
                let _ = child.kill();
                let _ = child.wait();
            }
            Holder::Library { rt, img } => rt.block_on(img.close()).unwrap(),
        }
    }
}

/// A named way to hold the image.
type HolderFactory<'a> = (&'static str, Box<dyn Fn() -> Holder + 'a>);

fn holders(img: &Path) -> Vec<HolderFactory<'_>> {
    let s = img.to_str().unwrap().to_string();
    let qemu_nbd = move |ro: bool| {
        let s = s.clone();
        move || {
            let port = free_port();
            let mut args = vec![
                "-t".to_string(),
                "-f".into(),
                "qcow2".into(),
                "-b".into(),
                "127.0.0.1".into(),
                "-p".into(),
                port.to_string(),
            ];
            if ro {
                args.push("-r".into());
            }
            args.push(s.clone());
            Holder::server("qemu-nbd", &args, port)
        }
    };
    let s2 = img.to_str().unwrap().to_string();
    let qimg_serve = move |ro: bool| {
        let s = s2.clone();
        move || {
            let port = free_port();
            let mut args = vec![
                "serve".to_string(),
                "-t".into(),
                "-f".into(),
                "qcow2".into(),
                "--bind".into(),
                format!("127.0.0.1:{port}"),
            ];
            if ro {
                args.push("-r".into());
            }
            args.push(s.clone());
            Holder::server(QIMG, &args, port)
        }
    };
    let s3 = img.to_str().unwrap().to_string();
    let qsd = move || {
        let port = free_port();
        let args = vec![
            "--blockdev".to_string(),
            format!("driver=file,filename={s3},node-name=f"),
            "--blockdev".into(),
            "driver=qcow2,file=f,node-name=q".into(),
            "--nbd-server".into(),
            format!("addr.type=inet,addr.host=127.0.0.1,addr.port={port}"),
            "--export".into(),
            "type=nbd,id=e,node-name=q,writable=on".into(),
        ];
        Holder::server("qemu-storage-daemon", &args, port)
    };
    vec![
        ("qemu-nbd", Box::new(qemu_nbd(false))),
        ("qemu-nbd -r", Box::new(qemu_nbd(true))),
        ("qemu-io", Box::new(move || Holder::qemu_io(img, false))),
        ("qemu-io -r", Box::new(move || Holder::qemu_io(img, true))),
        ("qemu-storage-daemon", Box::new(qsd)),
        ("qimg serve", Box::new(qimg_serve(false))),
        ("qimg serve -r", Box::new(qimg_serve(true))),
        (
            "qimg library read-write",
            Box::new(move || Holder::library(img, false)),
        ),
        (
            "qimg library read-only",
            Box::new(move || Holder::library(img, true)),
        ),
    ]
}

/// Contenders: (qimg arguments, QEMU program, its arguments). `IMG` stands for the image,
/// `OTHER` for a second image.
const CONTENDERS: &[(&[&str], &str, &[&str])] = &[
    (
        &["io", "-c", "read 0 512", "IMG"],
        "qemu-io",
        &["-c", "read 0 512", "IMG"],
    ),
    (
        &["io", "-r", "-c", "read 0 512", "IMG"],
        "qemu-io",
        &["-r", "-c", "read 0 512", "IMG"],
    ),
    (
        &["io", "-U", "-r", "-c", "read 0 512", "IMG"],
        "qemu-io",
        &["-U", "-r", "-c", "read 0 512", "IMG"],
    ),
    (
        &["io", "-U", "-c", "read 0 512", "IMG"],
        "qemu-io",
        &["-U", "-c", "read 0 512", "IMG"],
    ),
    (&["info", "IMG"], "qemu-img", &["info", "IMG"]),
    (&["info", "-U", "IMG"], "qemu-img", &["info", "-U", "IMG"]),
    (&["check", "IMG"], "qemu-img", &["check", "IMG"]),
    (&["check", "-U", "IMG"], "qemu-img", &["check", "-U", "IMG"]),
    (
        &["check", "-r", "leaks", "IMG"],
        "qemu-img",
        &["check", "-r", "leaks", "IMG"],
    ),
    (&["map", "IMG"], "qemu-img", &["map", "IMG"]),
    (&["map", "-U", "IMG"], "qemu-img", &["map", "-U", "IMG"]),
    (
        &["compare", "IMG", "OTHER"],
        "qemu-img",
        &["compare", "IMG", "OTHER"],
    ),
    (
        &["compare", "-U", "IMG", "OTHER"],
        "qemu-img",
        &["compare", "-U", "IMG", "OTHER"],
    ),
    (
        &["resize", "IMG", "+1M"],
        "qemu-img",
        &["resize", "IMG", "+1M"],
    ),
    (
        &["convert", "-O", "qcow2", "OTHER", "IMG"],
        "qemu-img",
        &["convert", "-O", "qcow2", "OTHER", "IMG"],
    ),
    (
        &["create", "-f", "qcow2", "IMG", "1M"],
        "qemu-img",
        &["create", "-f", "qcow2", "IMG", "1M"],
    ),
];

fn subst(args: &[&str], img: &Path, other: &Path) -> Vec<String> {
    args.iter()
        .map(|a| match *a {
            "IMG" => img.to_str().unwrap().to_string(),
            "OTHER" => other.to_str().unwrap().to_string(),
            a => a.to_string(),
        })
        .collect()
}

/// The first line of stderr about locks, with the program name dropped.
fn lock_message(o: &Output) -> Option<String> {
    let err = String::from_utf8_lossy(&o.stderr);
    let mut lines = err.lines();
    let first = lines.find(|l| l.contains("lock"))?;
    let msg = first.split_once(": ").map_or(first, |(_, m)| m);
    Some(format!("{msg} / {}", lines.next().unwrap_or("")))
}

fn fresh(dir: &Path) -> (PathBuf, PathBuf) {
    let img = dir.join("img.qcow2");
    let other = dir.join("other.qcow2");
    for p in [&img, &other] {
        let _ = std::fs::remove_file(p);
        qemu_create(p, "", 64 << 20, &[]);
    }
    (img, other)
}

#[test]
fn qimg_and_qemu_refuse_each_other_as_qemu_refuses_itself() {
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let mut refusals = 0;
    let mut admissions = 0;
    let (img, _) = fresh(dir.path());
    let names: Vec<&str> = holders(&img).iter().map(|h| h.0).collect();
    for (hi, hname) in names.iter().enumerate() {
        for (ours, prog, theirs) in CONTENDERS {
            // Each side gets a fresh image: some contenders change it.
            let outcome = |program: &str, args: &[&str]| {
                let (img, other) = fresh(dir.path());
                let hs = holders(&img);
                let holder = (hs[hi].1)();
                let args = subst(args, &img, &other);
                let o = run(
                    program,
                    &args.iter().map(String::as_str).collect::<Vec<_>>(),
                );
                drop(holder);
                o
            };
            let q = outcome(QIMG, ours);
            let e = outcome(prog, theirs);
            let (qm, em) = (lock_message(&q), lock_message(&e));
            let (qs, es) = (q.status.success(), e.status.success());
            // qemu-img compare/check exit non-zero for other reasons too; what must match is
            // whether the open was refused, and how.
            let q_refused = qm.is_some();
            let e_refused = em.is_some();
            if e_refused {
                refusals += 1;
            } else {
                admissions += 1;
            }
            if q_refused != e_refused || qm != em || (!e_refused && qs != es) {
                failures.push(format!(
                    "holder {hname}: qimg {ours:?} -> {qs} {qm:?}\n  {prog} {theirs:?} -> {es} {em:?}\n  qimg stderr: {}\n  {prog} stderr: {}",
                    String::from_utf8_lossy(&q.stderr),
                    String::from_utf8_lossy(&e.stderr)
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // The matrix must exercise both outcomes many times, or it proves nothing.
    assert!(
        refusals > 30 && admissions > 30,
        "refused {refusals}, admitted {admissions}"
    );
}

#[test]
fn locking_off_takes_and_honours_no_locks() {
    let dir = tempfile::tempdir().unwrap();
    let (img, _) = fresh(dir.path());
    let s = img.to_str().unwrap();
    let holder = Holder::qemu_io(&img, false);
    let o = run(QIMG, &["io", "-o", "locking=off", "-c", "read 0 512", s]);
    assert!(o.status.success(), "{}", text(&o));
    let o = run(
        QIMG,
        &["io", "-o", "file.locking=on", "-c", "read 0 512", s],
    );
    assert!(
        !o.status.success(),
        "locking=on must honour the holder's locks"
    );
    let o = run(QIMG, &["io", "-o", "locking=maybe", "-c", "read 0 512", s]);
    assert!(text(&o).contains("locking"), "{}", text(&o));
    drop(holder);
}

/// `qimg convert s s` used to empty the source; now the target's lock is refused.
#[test]
fn convert_onto_its_own_source_is_refused_and_the_source_survives() {
    let dir = tempfile::tempdir().unwrap();
    let (img, _) = fresh(dir.path());
    qemu_io(&img, "qcow2", &["write -P 7 0 1M".into()]);
    let s = img.to_str().unwrap();
    let o = run(QIMG, &["convert", "-O", "qcow2", s, s]);
    assert!(!o.status.success(), "convert s s succeeded: {}", text(&o));
    assert!(
        text(&o).contains("Failed to get \"write\" lock"),
        "{}",
        text(&o)
    );
    qemu_io(&img, "qcow2", &["read -P 7 0 1M".into()]);
    qemu_check_clean(&img);
    let raw = dir.path().join("s.raw");
    std::fs::write(&raw, vec![1u8; 4096]).unwrap();
    let r = raw.to_str().unwrap();
    let o = run(QIMG, &["convert", "-f", "raw", "-O", "raw", r, r]);
    assert!(
        !o.status.success(),
        "convert s s (raw) succeeded: {}",
        text(&o)
    );
    assert_eq!(std::fs::read(&raw).unwrap(), vec![1u8; 4096]);
}

/// A writer's backing files are held as readers: nobody may write to them meanwhile.
#[test]
fn backing_files_are_locked_for_readers() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    qemu_create(&base, "", 64 << 20, &[]);
    qemu_create(
        &top,
        "",
        64 << 20,
        &["-b", base.to_str().unwrap(), "-F", "qcow2"],
    );
    let holder = Holder::library(&top, false);
    let b = base.to_str().unwrap();
    let o = run("qemu-io", &["-c", "write 0 512", b]);
    assert!(
        text(&o).contains("Failed to get \"write\" lock"),
        "a writer got into a backing file in use: {}",
        text(&o)
    );
    let o = run("qemu-io", &["-r", "-c", "read 0 512", b]);
    assert!(o.status.success(), "{}", text(&o));
    drop(holder);
    let o = run("qemu-io", &["-c", "write 0 512", b]);
    assert!(o.status.success(), "{}", text(&o));
}
