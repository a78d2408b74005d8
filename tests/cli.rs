//! The command line against the real qemu-img and qemu-io: the same images give the same output
//! (human and JSON) and the same exit codes, so that users and scripts can switch.

mod common;

use common::*;
use std::path::Path;
use std::process::Output;

const QIMG: &str = env!("CARGO_BIN_EXE_qimg");

fn qimg(args: &[&str]) -> Output {
    run(QIMG, args)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// stderr with the program name normalized.
fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr)
        .replace("qemu-img: ", "PROG: ")
        .replace("qimg: ", "PROG: ")
}

/// A set of images exercising most header and table features, made by QEMU.
fn images(dir: &Path) -> Vec<String> {
    let p = |n: &str| dir.join(n).to_str().unwrap().to_string();
    qemu_create(Path::new(&p("plain.qcow2")), "", 64 << 20, &[]);
    qemu_io(
        Path::new(&p("plain.qcow2")),
        "qcow2",
        &[
            "write -P 1 0 1M".into(),
            "write -z 2M 64k".into(),
            "write -P 2 3M 4k".into(),
            "discard 3M 64k".into(),
        ],
    );
    qemu_create(Path::new(&p("v2.qcow2")), "compat=0.10", 1 << 30, &[]);
    qemu_create(
        Path::new(&p("zstd.qcow2")),
        "compression_type=zstd,lazy_refcounts=on",
        1 << 20,
        &[],
    );
    qemu_create(
        Path::new(&p("small.qcow2")),
        "cluster_size=512,refcount_bits=1",
        3 << 20,
        &[],
    );
    qemu_io(
        Path::new(&p("small.qcow2")),
        "qcow2",
        &["write -P 3 1000 70000".into()],
    );
    qemu_create(
        Path::new(&p("top.qcow2")),
        "",
        64 << 20,
        &["-F", "qcow2", "-b", "plain.qcow2"],
    );
    qemu_io(
        Path::new(&p("top.qcow2")),
        "qcow2",
        &["write -P 9 65536 4096".into()],
    );
    qemu_create(Path::new(&p("snap.qcow2")), "", 16 << 20, &[]);
    qemu_io(
        Path::new(&p("snap.qcow2")),
        "qcow2",
        &["write -P 4 0 128k".into()],
    );
    let o = run("qemu-img", &["snapshot", "-c", "first", &p("snap.qcow2")]);
    assert!(o.status.success());
    qemu_create(
        Path::new(&p("prealloc.qcow2")),
        "preallocation=metadata",
        8 << 20,
        &[],
    );
    let raw = p("disk.raw");
    std::fs::write(&raw, pattern(3, 1 << 20)).unwrap();
    let comp = p("comp.qcow2");
    let o = run("qemu-img", &["convert", "-c", "-O", "qcow2", &raw, &comp]);
    assert!(o.status.success());
    [
        "plain", "v2", "zstd", "small", "top", "snap", "prealloc", "comp",
    ]
    .iter()
    .map(|n| p(&format!("{n}.qcow2")))
    .collect()
}

#[test]
fn info_matches_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    for img in images(dir.path()) {
        for fmt in ["human", "json"] {
            let a = run("qemu-img", &["info", "--output", fmt, &img]);
            let b = qimg(&["info", "--output", fmt, &img]);
            assert!(
                a.status.success() && b.status.success(),
                "{img}: {}",
                text(&b)
            );
            if fmt == "json" {
                let va: serde_json::Value = serde_json::from_slice(&a.stdout).unwrap();
                let vb: serde_json::Value = serde_json::from_slice(&b.stdout).unwrap();
                assert_eq!(va, vb, "info --output=json differs for {img}");
            } else {
                assert_eq!(stdout(&a), stdout(&b), "info differs for {img}");
            }
        }
    }
    // A raw image.
    let raw = dir.path().join("disk.raw");
    let a = run("qemu-img", &["info", "-f", "raw", raw.to_str().unwrap()]);
    let b = qimg(&["info", "-f", "raw", raw.to_str().unwrap()]);
    assert_eq!(stdout(&a), stdout(&b));
}

#[test]
fn check_matches_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let mut imgs = images(dir.path());
    // A leaky image and a corrupt one (refcount of a data cluster cleared).
    let leak = dir.path().join("leak.qcow2");
    qemu_create(&leak, "", 64 << 20, &[]);
    qemu_io(&leak, "qcow2", &["write -P 1 0 192k".into()]);
    let mut bytes = std::fs::read(&leak).unwrap();
    // Refcount block at cluster 2, 16-bit entries: mark clusters 9 and 10 used (past the data).
    bytes.resize(11 * 65536, 0);
    bytes[2 * 65536 + 18..2 * 65536 + 22].copy_from_slice(&[0, 1, 0, 1]);
    std::fs::write(&leak, &bytes).unwrap();
    let corrupt = dir.path().join("corrupt.qcow2");
    std::fs::copy(dir.path().join("plain.qcow2"), &corrupt).unwrap();
    let mut bytes = std::fs::read(&corrupt).unwrap();
    bytes[2 * 65536 + 10..2 * 65536 + 12].copy_from_slice(&[0, 0]);
    std::fs::write(&corrupt, &bytes).unwrap();
    imgs.push(leak.to_str().unwrap().into());
    imgs.push(corrupt.to_str().unwrap().into());
    for img in &imgs {
        for fmt in ["human", "json"] {
            let a = run("qemu-img", &["check", "--output", fmt, img]);
            let b = qimg(&["check", "--output", fmt, img]);
            assert_eq!(
                a.status.code(),
                b.status.code(),
                "exit code for {img}: {}",
                text(&b)
            );
            assert_eq!(stdout(&a), stdout(&b), "check stdout for {img}");
            assert_eq!(stderr(&a), stderr(&b), "check stderr for {img}");
        }
    }
    // Not qcow2: no checks for raw.
    let raw = dir.path().join("disk.raw");
    let b = qimg(&["check", "-f", "raw", raw.to_str().unwrap()]);
    assert_eq!(b.status.code(), Some(1));
}

#[test]
fn map_matches_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    for img in images(dir.path()) {
        for fmt in ["human", "json"] {
            let a = run("qemu-img", &["map", "--output", fmt, &img]);
            let b = qimg(&["map", "--output", fmt, &img]);
            assert_eq!(a.status.code(), b.status.code(), "map exit code for {img}");
            assert_eq!(
                stdout(&a),
                stdout(&b),
                "map --output={fmt} differs for {img}"
            );
        }
    }
}

#[test]
fn create_prints_and_refuses_like_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    std::fs::write(p("b.raw"), vec![0u8; 1 << 20]).unwrap();
    let ok_cases: &[&[&str]] = &[
        &["-f", "qcow2"],
        &["-f", "qcow2", "-o", "compat=0.10"],
        &["-f", "qcow2", "-o", "preallocation=metadata"],
        &[
            "-f",
            "qcow2",
            "-o",
            "compression_type=zstd,lazy_refcounts=on",
        ],
        &["-f", "qcow2", "-o", "refcount_bits=1,cluster_size=512"],
        &["-f", "raw"],
        &["-f", "raw", "-o", "preallocation=full"],
    ];
    for (i, args) in ok_cases.iter().enumerate() {
        let (fa, fb) = (p(&format!("a{i}")), p(&format!("b{i}")));
        let mut a: Vec<&str> = vec!["create"];
        a.extend_from_slice(args);
        let mut b = a.clone();
        a.extend_from_slice(&[&fa, "1M"]);
        b.extend_from_slice(&[&fb, "1M"]);
        let oa = run("qemu-img", &a);
        let ob = qimg(&b);
        assert!(
            oa.status.success() && ob.status.success(),
            "{args:?}: {}",
            text(&ob)
        );
        assert_eq!(
            stdout(&oa).replace(&fa, "F"),
            stdout(&ob).replace(&fb, "F"),
            "{args:?}"
        );
        if args[1] == "qcow2" {
            qemu_check_clean(Path::new(&fb));
        }
    }
    // With a backing file and no size: the backing file's size.
    let o = qimg(&[
        "create",
        "-f",
        "qcow2",
        "-F",
        "raw",
        "-b",
        "b.raw",
        &p("top"),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(stdout(&o).contains("size=1048576 backing_file=b.raw backing_fmt=raw"));
    // Refusals: exit 1 with a message naming the problem.
    let bad: &[(&[&str], &str)] = &[
        (
            &["-f", "qcow2", "-o", "cluster_size=1000"],
            "Cluster size must be a power of two",
        ),
        (
            &["-f", "qcow2", "-o", "refcount_bits=3"],
            "Refcount width must be a power of two",
        ),
        (
            &["-f", "qcow2", "-o", "compat=0.10,lazy_refcounts=on"],
            "Lazy refcounts only supported",
        ),
        (&["-f", "qcow2", "-o", "foo=bar"], "Invalid parameter 'foo'"),
        (
            &["-f", "qcow2", "-b", "b.raw"],
            "Backing file specified without backing format",
        ),
        (
            &[
                "-f",
                "qcow2",
                "-o",
                "preallocation=metadata",
                "-F",
                "raw",
                "-b",
                "b.raw",
            ],
            "Backing file and preallocation",
        ),
        (
            &["-f", "qcow2", "-o", "preallocation=bogus"],
            "does not accept value 'bogus'",
        ),
    ];
    for (args, msg) in bad {
        let mut a: Vec<&str> = vec!["create"];
        a.extend_from_slice(args);
        let f = p("bad");
        a.extend_from_slice(&[&f, "1M"]);
        let o = qimg(&a);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        assert!(text(&o).contains(msg), "{args:?}: {}", text(&o));
    }
    let o = qimg(&["create", "-f", "qcow2", &p("nosize")]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("Image creation needs a size parameter"));
    let o = qimg(&["create", "-f", "qcow2", &p("badsize"), "12X"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("Invalid image size specified"));
}

#[test]
fn compare_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let imgs = images(dir.path());
    let plain = &imgs[0];
    let copy = dir.path().join("copy.raw");
    let o = run(
        "qemu-img",
        &["convert", "-O", "raw", plain, copy.to_str().unwrap()],
    );
    assert!(o.status.success());
    let o = qimg(&["compare", plain, copy.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(stdout(&o), "Images are identical.\n");
    qemu_io(&copy, "raw", &["write -P 7 4100 1".into()]);
    let o = qimg(&["compare", plain, copy.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stdout(&o), "Content mismatch at offset 4096!\n");
    let o = qimg(&["compare", plain, "/nonexistent/x"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn io_lines_match_qemu_io() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.qcow2");
    qemu_create(&a, "", 4 << 20, &[]);
    qemu_create(&b, "", 4 << 20, &[]);
    let cmds = [
        "write -P 0xab 0 64k",
        "read -P 0xab 0 4k",
        "read -P 0xcd 0 4k",
        "read -v 4090 20",
        "write -z 64k 64k",
        "write -z -u 128k 64k",
        "discard 0 64k",
        "read -P 0 0 64k",
        "writev -P 0x11 100 3 5",
        "readv -P 0x11 100 8",
        "read 5M 1",
        "flush",
        "length",
    ];
    let mut args = vec![];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    let mut qa = args.clone();
    qa.push(a.to_str().unwrap());
    let mut qb = vec!["io"];
    qb.extend(args);
    qb.push(b.to_str().unwrap());
    let oa = run("qemu-io", &qa);
    let ob = qimg(&qb);
    assert_eq!(oa.status.code(), ob.status.code());
    // Everything but the timing lines is identical.
    let strip = |s: String| {
        s.lines()
            .filter(|l| !l.contains(" ops; "))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(strip(stdout(&oa)), strip(stdout(&ob)));
}

/// Output into a pipe whose reader went away ends the command quietly (SIGPIPE, as for
/// qemu-img), never with a panic.
#[test]
fn closed_pipes_end_commands_without_a_panic() {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("p.qcow2");
    qemu_create(&img, "", 64 << 20, &[]);
    qemu_io(&img, "qcow2", &["write -P 3 0 8M".into()]);
    let raw = dir.path().join("out.raw");
    let cases: Vec<Vec<String>> = vec![
        vec![
            "io".into(),
            "-c".into(),
            "read -v 0 1M".into(),
            img.to_str().unwrap().into(),
        ],
        vec![
            "convert".into(),
            "-p".into(),
            "-O".into(),
            "raw".into(),
            img.to_str().unwrap().into(),
            raw.to_str().unwrap().into(),
        ],
        vec![
            "map".into(),
            "--output=json".into(),
            img.to_str().unwrap().into(),
        ],
    ];
    for args in cases {
        let mut child = Command::new(QIMG)
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = child.stdout.take().unwrap();
        let mut first = [0u8; 10];
        let _ = out.read(&mut first);
        drop(out);
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        let status = child.wait().unwrap();
        assert!(
            !err.contains("panicked") && status.code() != Some(101),
            "qimg {args:?} into a closed pipe: {status:?}\n{err}"
        );
    }
}

/// `compare -s` compares block status as qemu-img does (a zero cluster and an unallocated one
/// differ; so do an unallocated middle and an unallocated tail), and `-p` prints qemu-img's
/// progress lines. Both byte for byte against qemu-img.
#[test]
fn compare_strict_and_progress_match_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.qcow2");
    let c = dir.path().join("c.qcow2");
    for p in [&a, &b, &c] {
        qemu_create(p, "", 1 << 20, &[]);
    }
    qemu_io(&a, "qcow2", &["write -z 64k 64k".into()]);
    qemu_io(&b, "qcow2", &["write -P 0 128k 64k".into()]);
    let (a, b, c) = (
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        c.to_str().unwrap(),
    );
    let cases: Vec<Vec<&str>> = vec![
        vec!["-s", a, b],
        vec!["-s", b, a],
        vec!["-s", a, c],
        vec!["-s", a, a],
        vec![a, b],
        vec!["-p", a, b],
        vec!["-p", "-s", a, c],
        vec!["-p", "-q", a, b],
    ];
    for args in cases {
        let ours = qimg(&[&["compare"][..], &args].concat());
        let theirs = run("qemu-img", &[&["compare"][..], &args].concat());
        assert_eq!(
            (ours.status.code(), ours.stdout.clone()),
            (theirs.status.code(), theirs.stdout.clone()),
            "compare {args:?}: ours {:?}, qemu-img {:?}",
            stdout(&ours),
            String::from_utf8_lossy(&theirs.stdout)
        );
    }
}

/// qemu-io's sub-command flags do what qemu-io's do: `write -f` (FUA) completes durably,
/// `-p` (ignored by qemu-io for compatibility) and `-r` (buffer registration, a hint) change
/// nothing, `aio_write -i`/`aio_read -i` only report an invalid request and do no I/O.
#[test]
fn io_flags_match_qemu_io() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("f.qcow2");
    qemu_create(&img, "", 4 << 20, &[]);
    let p = img.to_str().unwrap();
    let cmds = [
        "write -P 1 0 64k",
        "write -f -P 2 64k 64k",
        "write -p -r -P 3 128k 4k",
        "writev -f -r -P 4 192k 4k 4k",
        "read -p -P 1 0 64k",
        "readv -r -P 2 64k 64k",
        "aio_write -i -P 5 0 4k",
        "aio_flush",
        "aio_read -i 0 4k",
        "aio_flush",
        "read -P 1 0 4k",
    ];
    let mut args = vec!["-f", "qcow2"];
    for c in &cmds {
        args.extend(["-c", c]);
    }
    args.push(p);
    let ours = qimg(&[&["io"][..], &args].concat());
    // qemu-io on its own copy, the same commands.
    let theirs_img = dir.path().join("g.qcow2");
    qemu_create(&theirs_img, "", 4 << 20, &[]);
    let mut targs = args.clone();
    *targs.last_mut().unwrap() = theirs_img.to_str().unwrap();
    let theirs = run("qemu-io", &targs);
    let strip = |s: String| -> Vec<String> {
        s.lines()
            .filter(|l| !l.contains("ops;"))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(
        strip(stdout(&ours)),
        strip(String::from_utf8_lossy(&theirs.stdout).into_owned()),
        "stderr: {}",
        stderr(&ours)
    );
    assert_eq!(ours.status.code(), theirs.status.code());
    let out = qemu_io(
        &img,
        "qcow2",
        &["read -P 4 192k 8k".into(), "read -P 3 128k 4k".into()],
    );
    assert!(!out.contains("verification failed"), "{out}");
}

/// Runs `prog` named `name` (argv[0], as QEMU's iotests run their wrappers) with `input` on
/// standard input.
fn run_named(prog: &str, name: &str, args: &[&str], input: &str) -> Output {
    use std::io::Write;
    use std::os::unix::process::CommandExt;
    let mut child = std::process::Command::new(prog)
        .arg0(name)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// Without `-c`, `qimg io` reads commands from standard input as qemu-io does: the same prompt
/// (the program's name, here `qemu-io` through argv[0]), outputs and exit codes, `quit` ends the
/// session, a failed command makes the exit status 1; messages carry the same prefix.
#[test]
fn io_reads_commands_from_stdin_like_qemu_io() {
    let dir = tempfile::tempdir().unwrap();
    let scripts = [
        "write -P 7 0 64k\nread -P 7 0 4k\nlength\nquit\nwrite 0 4k\n",
        "write 0 4k\nread -P 9 0 4k\nbogus\n\nflush\n",
        "read -P 0 1M 4k",
    ];
    for (i, script) in scripts.iter().enumerate() {
        let mut outs = Vec::new();
        for (prog, args) in [(QIMG, &["io"][..]), ("qemu-io", &[][..])] {
            let img = dir.path().join(format!("s{i}-{}.qcow2", outs.len()));
            qemu_create(&img, "", 4 << 20, &[]);
            let mut a = args.to_vec();
            a.extend(["-f", "qcow2", img.to_str().unwrap()]);
            let o = run_named(prog, "qemu-io", &a, script);
            let out: Vec<String> = stdout(&o)
                .lines()
                .filter(|l| !l.contains("ops;"))
                .map(str::to_string)
                .collect();
            outs.push((
                out,
                String::from_utf8_lossy(&o.stderr).into_owned(),
                o.status.code(),
            ));
            if prog == QIMG {
                // What the script wrote is in the image (the session ran, then closed it).
                if script.starts_with("write -P 7") {
                    let r = qemu_io(&img, "qcow2", &["read -P 7 0 64k".into()]);
                    assert!(!r.contains("failed"), "{r}");
                }
            }
        }
        assert_eq!(outs[0], outs[1], "script {i}: {script:?}");
    }
    // Message prefixes follow argv[0] too.
    let missing = dir.path().join("missing.qcow2");
    let ours = run_named(QIMG, "qemu-io", &["io", missing.to_str().unwrap()], "");
    let theirs = run_named("qemu-io", "qemu-io", &[missing.to_str().unwrap()], "");
    assert_eq!(
        String::from_utf8_lossy(&ours.stderr),
        String::from_utf8_lossy(&theirs.stderr)
    );
    assert_eq!(ours.status.code(), theirs.status.code());
}

/// The options QEMU's iotests always give qemu-io (`--cache writeback --aio threads -f qcow2`,
/// and `-f` once more from the test itself) are taken as qemu-io takes them: the last of a
/// repeated option wins. `--aio native` (Linux AIO) is not implemented and is refused, not
/// replaced by another engine.
#[test]
fn io_takes_qemu_ios_engine_and_repeated_options() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    qemu_create(&img, "", 1 << 20, &[]);
    let p = img.to_str().unwrap();
    for aio in ["threads", "io_uring"] {
        let o = qimg(&[
            "io",
            "--cache",
            "writeback",
            "--aio",
            aio,
            "-f",
            "qcow2",
            "-f",
            "qcow2",
            "-t",
            "none",
            "-t",
            "writeback",
            "-c",
            "write -P 3 0 4k",
            "-c",
            "read -P 3 0 4k",
            p,
        ]);
        assert!(o.status.success(), "{aio}: {}", stderr(&o));
        assert!(!stdout(&o).contains("fail"), "{}", stdout(&o));
    }
    let o = qimg(&["io", "-i", "native", "-n", "-c", "read 0 4k", p]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("aio=native (Linux AIO) is not supported"),
        "{}",
        stderr(&o)
    );
}

/// An image whose backing file cannot be opened fails to open with QEMU's message and nothing
/// else: the half-opened image is closed, not dropped (which logged "dropped without close()").
#[test]
fn failed_backing_open_reports_only_qemus_message() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    qemu_create(&base, "", 1 << 20, &[]);
    qemu_create(
        &top,
        "",
        1 << 20,
        &["-b", base.to_str().unwrap(), "-F", "qcow2"],
    );
    std::fs::remove_file(&base).unwrap();
    let t = top.to_str().unwrap();
    let ours = run_named(QIMG, "qemu-io", &["io", "-c", "read 0 4k", t], "");
    let theirs = run_named("qemu-io", "qemu-io", &["-c", "read 0 4k", t], "");
    assert_eq!(
        String::from_utf8_lossy(&ours.stderr),
        String::from_utf8_lossy(&theirs.stderr)
    );
    assert_eq!(ours.status.code(), theirs.status.code());
}

/// `open` and `close` in a qemu-io session, with and without an image on the command line: the
/// same standard output, standard error and exit status as qemu-io, for commands before any
/// open, a second open, closing, read-only opens refusing writes, usage errors and runtime
/// options. What the session wrote is in the image afterwards.
#[test]
fn io_open_and_close_like_qemu_io() {
    let dir = tempfile::tempdir().unwrap();
    let sessions: [&[&str]; 3] = [
        &[
            "read 0 1",
            "open -o l2-cache-size=1M IMG",
            "l",
            "write -P 5 0 4k",
            "open IMG",
            "close",
            "length",
            "open -r IMG",
            "write 0 1",
            "discard 0 4k",
            "close",
            "open",
            "open -x IMG",
            "open -U -r IMG",
            "read -P 5 0 4k",
        ],
        &["open -o bogus=1 IMG", "read 0 1"],
        &["close", "close", "open -n IMG", "read -P 0 0 4k"],
    ];
    for (i, cmds) in sessions.iter().enumerate() {
        let mut outs = Vec::new();
        for (prog, pre) in [(QIMG, &["io"][..]), ("qemu-io", &[][..])] {
            let img = dir.path().join(format!("o{i}-{}.qcow2", outs.len()));
            qemu_create(&img, "", 1 << 20, &[]);
            let p = img.to_str().unwrap();
            let mut args: Vec<String> = pre.iter().map(|s| s.to_string()).collect();
            for c in cmds.iter() {
                args.push("-c".into());
                args.push(c.replace("IMG", p));
            }
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            let o = run_named(prog, "qemu-io", &a, "");
            let out: Vec<String> = stdout(&o)
                .lines()
                .filter(|l| !l.contains("ops;"))
                .map(|l| l.replace(p, "IMG"))
                .collect();
            let err = String::from_utf8_lossy(&o.stderr).replace(p, "IMG");
            outs.push((out, err, o.status.code()));
            if i == 0 {
                let r = qemu_io(&img, "qcow2", &["read -P 5 0 4k".into()]);
                assert!(!r.contains("failed"), "{prog}: {r}");
            }
        }
        assert_eq!(outs[0], outs[1], "session {i}");
    }
}

/// Cache size options that contradict each other are refused at open with qemu-io's messages
/// (QEMU's iotest 103), and consistent ones open.
#[test]
fn io_cache_size_options_like_qemu_io() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("c.qcow2");
    qemu_create(&img, "", 1 << 20, &[]);
    let p = img.to_str().unwrap();
    for opts in [
        "cache-size=1.25M,l2-cache-size=1M,refcount-cache-size=0.25M",
        "cache-size=1M,l2-cache-size=2M",
        "cache-size=1M,refcount-cache-size=2M",
        "cache-size=0,l2-cache-size=0,refcount-cache-size=0",
        "l2-cache-entry-size=256",
        "l2-cache-entry-size=4242",
        "cache-size=1M,l2-cache-size=512k",
        "cache-size=1M,refcount-cache-size=256k",
    ] {
        let cmd = format!("open -o {opts} {p}");
        let ours = run_named(QIMG, "qemu-io", &["io", "-c", &cmd, "-c", "length"], "");
        let theirs = run_named("qemu-io", "qemu-io", &["-c", &cmd, "-c", "length"], "");
        assert_eq!(
            (
                stdout(&ours),
                String::from_utf8_lossy(&ours.stderr),
                ours.status.code()
            ),
            (
                stdout(&theirs),
                String::from_utf8_lossy(&theirs.stderr),
                theirs.status.code()
            ),
            "{opts}"
        );
    }
}

/// Concurrent asynchronous requests report in whole two-line blocks (iotest 035 sends 192
/// overlapping `aio_write`s on standard input; the line pairs of two completions must not
/// interleave).
#[test]
fn aio_reports_do_not_interleave() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    qemu_create(&img, "cluster_size=512", 6 << 30, &[]);
    let mut script = String::new();
    for i in 0..64 {
        for _ in 0..3 {
            script.push_str(&format!("aio_write {i}M 512\n"));
        }
    }
    for _ in 0..5 {
        let o = run_named(QIMG, "qemu-io", &["io", img.to_str().unwrap()], &script);
        assert!(o.status.success(), "{}", stderr(&o));
        let out = stdout(&o).replace("qemu-io> ", "");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2 * 192, "{out}");
        for pair in lines.chunks(2) {
            assert!(
                pair[0].starts_with("wrote 512/512 bytes at offset ")
                    && pair[1].starts_with("512 bytes, 1 ops;"),
                "{pair:?}"
            );
        }
    }
}

/// `alloc` and `map` report the image's own allocation (not its backing file's; zero clusters
/// count) exactly as qemu-io does, including past the end and on bad arguments.
#[test]
fn io_alloc_and_map_like_qemu_io() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("b.qcow2");
    let top = dir.path().join("t.qcow2");
    qemu_create(&base, "", 4 << 20, &[]);
    qemu_io(
        &base,
        "qcow2",
        &["write 0 64k".into(), "write 1M 128k".into()],
    );
    qemu_create(
        &top,
        "cluster_size=4096",
        4 << 20,
        &["-b", base.to_str().unwrap(), "-F", "qcow2"],
    );
    qemu_io(
        &top,
        "qcow2",
        &[
            "write 32k 64k".into(),
            "write -z 2M 64k".into(),
            "write 3M 1k".into(),
            "discard 40k 4k".into(),
        ],
    );
    let t = top.to_str().unwrap();
    let cmds = [
        "map",
        "alloc 0",
        "alloc 0 4M",
        "alloc 1M 64k",
        "alloc 512 1",
        "alloc 4M 1",
        "alloc 3M 8k",
        "alloc",
        "map 1",
        "alloc 100",
        "alloc 5M",
        "alloc x",
        "alloc 0 1 2",
        "alloc 36k 8k",
    ];
    let mut args = vec!["-r"];
    for c in &cmds {
        args.extend(["-c", c]);
    }
    args.push(t);
    let ours = run_named(QIMG, "qemu-io", &[&["io"][..], &args].concat(), "");
    let theirs = run_named("qemu-io", "qemu-io", &args, "");
    assert_eq!(stdout(&ours), stdout(&theirs));
    assert_eq!(
        String::from_utf8_lossy(&ours.stderr),
        String::from_utf8_lossy(&theirs.stderr)
    );
    assert_eq!(ours.status.code(), theirs.status.code());
}

/// `truncate`, `sleep` and `sigraise` as qemu-io runs them: growing an image (the new part
/// reads as zeros), argument errors, a read-only image refusing; then `sigraise 9` kills the
/// process mid-session as the iotests do, and the image it leaves passes `qemu-img check`
/// (leaks at most) with the flushed data in it.
#[test]
fn io_truncate_sleep_and_sigraise_like_qemu_io() {
    let dir = tempfile::tempdir().unwrap();
    let mut outs = Vec::new();
    for (prog, pre) in [(QIMG, &["io"][..]), ("qemu-io", &[][..])] {
        let img = dir.path().join(format!("t{}.qcow2", outs.len()));
        qemu_create(&img, "", 1 << 20, &[]);
        let p = img.to_str().unwrap();
        let mut result = Vec::new();
        for (ro, cmds) in [
            (
                false,
                &[
                    "truncate",
                    "truncate 2M",
                    "length",
                    "truncate -m off 3M",
                    "length",
                    "truncate -m bogus 4M",
                    "truncate x",
                    "sleep 10",
                    "sleep",
                    "sigraise",
                    "sigraise 999",
                    "write -P 7 2M 4k",
                ][..],
            ),
            (true, &["truncate 4M", "length"][..]),
        ] {
            let mut args: Vec<&str> = pre.to_vec();
            if ro {
                args.push("-r");
            }
            for c in cmds {
                args.extend(["-c", c]);
            }
            args.push(p);
            let o = run_named(prog, "qemu-io", &args, "");
            let out: Vec<String> = stdout(&o)
                .lines()
                .filter(|l| !l.contains("ops;"))
                .map(str::to_string)
                .collect();
            result.push((
                out,
                String::from_utf8_lossy(&o.stderr).into_owned(),
                o.status.code(),
            ));
        }
        let r = qemu_io(
            &img,
            "qcow2",
            &["read -P 7 2M 4k".into(), "read -P 0 2052k 1020k".into()],
        );
        assert!(!r.contains("failed"), "{prog}: {r}");
        qemu_check_clean(&img);
        outs.push(result);
    }
    assert_eq!(outs[0], outs[1]);

    // Killed by its own sigraise after a flushed write and an unflushed one.
    let img = dir.path().join("k.qcow2");
    qemu_create(&img, "", 4 << 20, &[]);
    let o = run_named(
        QIMG,
        "qemu-io",
        &[
            "io",
            "-c",
            "write -P 1 0 64k",
            "-c",
            "flush",
            "-c",
            "write -P 2 1M 64k",
            "-c",
            "sigraise 9",
            "-c",
            "write -P 3 2M 64k",
            img.to_str().unwrap(),
        ],
        "",
    );
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(o.status.signal(), Some(9), "{}", stderr(&o));
    assert!(!stdout(&o).contains("offset 2097152"), "ran past sigraise");
    let (code, _, _, out) = qemu_check(&img);
    assert!(code == 0 || code == 3, "{out}");
    let r = qemu_io(&img, "qcow2", &["read -P 1 0 64k".into()]);
    assert!(!r.contains("failed"), "{r}");
}

/// A raw file whose length is not a whole number of sectors: QEMU sizes it in whole 512-byte
/// sectors, the end reads as zeros, and a write there extends the file. qimg does the same, so
/// `info`, `map`, `convert` and reads agree (and an NBD export has qemu-nbd's size).
#[test]
fn unaligned_raw_files_are_sized_in_sectors_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("u.raw");
    let data = pattern(9, 1000);
    std::fs::write(&p, &data).unwrap();
    let ps = p.to_str().unwrap();
    for args in [
        &["info", "-f", "raw", "--output=json", ps][..],
        &["map", "-f", "raw", "--output=json", ps][..],
    ] {
        let ours = qimg(args);
        let theirs = run("qemu-img", args);
        let ours = stdout(&ours).replace(&*dir.path().to_string_lossy(), "DIR");
        let theirs =
            String::from_utf8_lossy(&theirs.stdout).replace(&*dir.path().to_string_lossy(), "DIR");
        if args[0] == "info" {
            // The allocation differs with the file system; the size must not.
            let v: serde_json::Value = serde_json::from_str(&ours).unwrap();
            let w: serde_json::Value = serde_json::from_str(&theirs).unwrap();
            assert_eq!(v["virtual-size"], w["virtual-size"]);
            assert_eq!(v["virtual-size"], 1024);
        } else {
            assert_eq!(ours, theirs, "{args:?}");
        }
    }
    let out = dir.path().join("out.raw");
    let o = qimg(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        ps,
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let got = std::fs::read(&out).unwrap();
    assert_eq!(got.len(), 1024);
    assert_eq!(&got[..1000], &data[..]);
    assert!(got[1000..].iter().all(|&b| b == 0));
    let o = qimg(&[
        "io",
        "-f",
        "raw",
        "-c",
        "read -P 0 1000 24",
        "-c",
        "write -P 7 1000 24",
        ps,
    ]);
    assert!(
        o.status.success() && !stdout(&o).contains("failed"),
        "{}",
        stdout(&o)
    );
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 1024);
}

/// Write-zeroes marks clusters ZERO in this layer as qemu-io does: aligned ones always (with or
/// without unmap, with no backing file and no L2 table yet), partly covered ones when the rest of
/// the cluster reads as zeros; a partly covered data cluster gets zeros written. The same
/// commands through qemu-io and qimg io leave the same map.
#[test]
fn write_zeroes_mark_clusters_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let cmds = [
        "write -z -u 2M 2M",
        "write -z 6M 2M",
        "write -P 0x11 18M 4M",
        "write -z -u 18M 1M",
        "write -z 40M 64k",
        "write -z -u 10485761 2097150",
        "write -z 14680065 2097150",
        "write -z 19M 1k",
        "write -z 44M 512",
    ];
    let mut maps = Vec::new();
    for tool in ["qemu-io", QIMG] {
        let p = dir.path().join(format!("{}.qcow2", maps.len()));
        qemu_create(&p, "", 64 << 20, &[]);
        let mut args: Vec<&str> = if tool == QIMG { vec!["io"] } else { vec![] };
        args.extend_from_slice(&["-f", "qcow2"]);
        for c in &cmds {
            args.extend_from_slice(&["-c", c]);
        }
        args.push(p.to_str().unwrap());
        let o = run(tool, &args);
        assert!(o.status.success(), "{tool}: {}", text(&o));
        qemu_check_clean(&p);
        maps.push(guest_map(&p));
    }
    assert_eq!(maps[0], maps[1], "qemu-io vs qimg io");
}

/// The same for partly covered clusters of an overlay: the backing file's data outside the
/// request decides (zeros there: the cluster is marked ZERO; data: zeros are written).
#[test]
fn partial_write_zeroes_over_a_backing_file_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let mut maps = Vec::new();
    for tool in ["qemu-io", QIMG] {
        let base = dir.path().join(format!("base{}.qcow2", maps.len()));
        let top = dir.path().join(format!("top{}.qcow2", maps.len()));
        qemu_create(&base, "", 8 << 20, &[]);
        qemu_io(&base, "qcow2", &["write -P 0x44 1M 4k".to_string()]);
        qemu_create(
            &top,
            "",
            8 << 20,
            &["-b", base.to_str().unwrap(), "-F", "qcow2"],
        );
        let mut args: Vec<&str> = if tool == QIMG { vec!["io"] } else { vec![] };
        args.extend_from_slice(&[
            "-f",
            "qcow2",
            "-c",
            "write -z 1056768 4096",
            "-c",
            "write -z 3153920 4096",
            "-c",
            "read -P 0x44 1M 4k",
            "-c",
            "read -P 0 1056768 4096",
            top.to_str().unwrap(),
        ]);
        let o = run(tool, &args);
        assert!(
            o.status.success() && !text(&o).contains("failed"),
            "{tool}: {}",
            text(&o)
        );
        qemu_check_clean(&top);
        maps.push(guest_map(&top));
    }
    assert_eq!(maps[0], maps[1], "qemu-io vs qimg io");
}

/// `reopen -r|-w|-c|-o`: the same command sequences give qemu-io's lines (read-only refusals
/// after `reopen -r`, writes after `reopen -w`, qemu-io's messages for bad arguments), and the
/// image written after a reopen is clean.
#[test]
fn reopen_like_qemu_io() {
    let dir = tempfile::tempdir().unwrap();
    let sequences: [(&[&str], &[&str]); 6] = [
        (
            &["-r"],
            &[
                "write 0 64k",
                "reopen -w",
                "write -P 5 0 64k",
                "read -P 5 0 64k",
            ],
        ),
        (&["-r"], &["reopen -w", "reopen -r", "write 0 64k"]),
        (
            &[],
            &["reopen -r", "write 0 64k", "reopen -w", "write 0 64k"],
        ),
        (
            &[],
            &[
                "reopen -c none",
                "write -P 6 0 4k",
                "reopen -c writeback",
                "read -P 6 0 4k",
            ],
        ),
        (&[], &["reopen -r -w"]),
        (&[], &["reopen -c bogus"]),
    ];
    for (flags, cmds) in sequences {
        let mut outs = Vec::new();
        for tool in ["qemu-io", QIMG] {
            let p = dir.path().join(format!("r{}.qcow2", outs.len()));
            qemu_create(&p, "", 4 << 20, &[]);
            let mut args: Vec<&str> = if tool == QIMG { vec!["io"] } else { vec![] };
            args.extend_from_slice(&["-f", "qcow2"]);
            args.extend_from_slice(flags);
            for c in cmds {
                args.extend_from_slice(&["-c", c]);
            }
            args.push(p.to_str().unwrap());
            let o = run(tool, &args);
            qemu_check_clean(&p);
            let lines: Vec<String> = text(&o)
                .replace("qimg:", "qemu-io:")
                .lines()
                .filter(|l| !l.contains(" ops; "))
                .map(str::to_string)
                .collect();
            let mut sorted = lines.clone();
            // stdout and stderr interleave differently through pipes; compare the line sets.
            sorted.sort();
            outs.push((o.status.code(), sorted));
        }
        assert_eq!(outs[0], outs[1], "{flags:?} {cmds:?}");
    }
}

/// The block layer's `discard=` and `detect-zeroes=` options (in `--image-opts` lists): the same
/// writes and discards through qemu-io and qimg io leave the same map, and bad values get
/// qemu-io's messages.
#[test]
fn discard_and_detect_zeroes_options_like_qemu_io() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &[&str]); 4] = [
        (
            "discard=unmap,detect-zeroes=unmap",
            &["write -P 1 0 1M", "write -P 0 0 128k", "write -P 0 300k 8k"],
        ),
        (
            "detect-zeroes=on",
            &["write -P 1 0 1M", "write -P 0 0 128k", "write -P 0 1M 64k"],
        ),
        ("discard=ignore", &["write -P 1 0 1M", "discard 0 512k"]),
        ("discard=unmap", &["write -P 1 0 1M", "discard 0 512k"]),
    ];
    for (opts, cmds) in cases {
        let mut seen = Vec::new();
        for tool in ["qemu-io", QIMG] {
            let p = dir.path().join(format!("d{}.qcow2", seen.len()));
            qemu_create(&p, "", 4 << 20, &[]);
            let spec = format!("driver=qcow2,file.filename={},{opts}", p.display());
            let mut args: Vec<&str> = if tool == QIMG { vec!["io"] } else { vec![] };
            args.extend_from_slice(&["--image-opts", &spec]);
            for c in cmds {
                args.extend_from_slice(&["-c", c]);
            }
            let o = run(tool, &args);
            assert!(o.status.success(), "{tool} {opts}: {}", text(&o));
            qemu_check_clean(&p);
            seen.push(guest_map(&p));
        }
        assert_eq!(seen[0], seen[1], "{opts}");
    }
    let p = dir.path().join("e.qcow2");
    qemu_create(&p, "", 1 << 20, &[]);
    for bad in [
        "detect-zeroes=maybe",
        "discard=bad",
        "detect-zeroes=unmap,discard=ignore",
    ] {
        let spec = format!("driver=qcow2,file.filename={},{bad}", p.display());
        let theirs = run("qemu-io", &["--image-opts", &spec, "-c", "write 0 4k"]);
        let ours = qimg(&["io", "--image-opts", &spec, "-c", "write 0 4k"]);
        assert_eq!(ours.status.code(), theirs.status.code(), "{bad}");
        assert_eq!(
            stderr(&ours),
            String::from_utf8_lossy(&theirs.stderr).replace("qemu-io:", "PROG:"),
            "{bad}"
        );
    }
}

/// `-d MODE` (and `open -d MODE`): with `ignore`, discards change nothing and zero writes keep
/// their clusters even with `-u`; with `unmap` (qemu-io's default) both deallocate. Maps and
/// messages are qemu-io's.
#[test]
fn discard_mode_flag_like_qemu_io() {
    let dir = tempfile::tempdir().unwrap();
    for mode in ["ignore", "off", "unmap", "on"] {
        for open_cmd in [false, true] {
            let mut seen = Vec::new();
            for tool in ["qemu-io", QIMG] {
                let p = dir.path().join(format!("m{}.qcow2", seen.len()));
                qemu_create(&p, "", 4 << 20, &[]);
                let path = p.to_str().unwrap();
                assert!(run("qemu-io", &["-c", "write 0 256k", path])
                    .status
                    .success());
                let open = format!("open -d {mode} {path}");
                let mut args: Vec<&str> = if tool == QIMG { vec!["io"] } else { vec![] };
                if open_cmd {
                    args.extend_from_slice(&["-c", &open]);
                } else {
                    args.extend_from_slice(&["-d", mode, path]);
                }
                args.extend_from_slice(&[
                    "-c",
                    "discard 0 64k",
                    "-c",
                    "write -z -u 64k 64k",
                    "-c",
                    "aio_write -z -u 128k 64k",
                    "-c",
                    "aio_flush",
                ]);
                let o = run(tool, &args);
                assert!(o.status.success(), "{tool} {mode}: {}", text(&o));
                qemu_check_clean(&p);
                seen.push(guest_map(&p));
            }
            assert_eq!(seen[0], seen[1], "-d {mode} (open: {open_cmd})");
        }
    }
    let p = dir.path().join("e.qcow2");
    qemu_create(&p, "", 1 << 20, &[]);
    let path = p.to_str().unwrap();
    let open = format!("open -d bad {path}");
    for args in [&["-d", "bad", path][..], &["-c", &open][..]] {
        let theirs = run("qemu-io", args);
        let ours = qimg(&[&["io"][..], args].concat());
        assert_eq!(ours.status.code(), theirs.status.code(), "{args:?}");
        assert_eq!(
            stderr(&ours),
            String::from_utf8_lossy(&theirs.stderr).replace("qemu-io:", "PROG:"),
            "{args:?}"
        );
    }
}

/// `write -s FILE`: the file's bytes, repeated to the request's length (also compressed), and
/// qemu-io's messages for an empty or missing file and for conflicting data flags.
#[test]
fn io_write_from_file_like_qemu_io() {
    let dir = tempfile::tempdir().unwrap();
    let short = dir.path().join("short");
    std::fs::write(&short, b"hello, world!").unwrap();
    let long = dir.path().join("long");
    std::fs::write(
        &long,
        (0..100_000u32)
            .map(|i| (i * 7 + i / 251) as u8)
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    let empty = dir.path().join("empty");
    std::fs::write(&empty, b"").unwrap();
    let (short, long, empty) = (
        short.to_str().unwrap(),
        long.to_str().unwrap(),
        empty.to_str().unwrap(),
    );
    let missing = dir.path().join("missing");
    let missing = missing.to_str().unwrap();
    let cmds = [
        format!("write -s {short} 0 1000"),
        format!("write -s {long} 4k 64k"),
        format!("write -c -s {long} 128k 64k"),
        format!("write -s {empty} 0 1"),
        format!("write -s {missing} 0 1"),
        format!("write -s {short} -P 1 0 1"),
        format!("write -z -s {short} 0 1"),
    ];
    let mut seen = Vec::new();
    for tool in ["qemu-io", QIMG] {
        let p = dir.path().join(format!("w{}.qcow2", seen.len()));
        qemu_create(&p, "", 1 << 20, &[]);
        let mut args: Vec<&str> = if tool == QIMG { vec!["io"] } else { vec![] };
        for c in &cmds {
            args.extend_from_slice(&["-c", c]);
        }
        args.push(p.to_str().unwrap());
        let o = run(tool, &args);
        qemu_check_clean(&p);
        let raw = dir.path().join(format!("w{}.raw", seen.len()));
        let c = run(
            "qemu-img",
            &[
                "convert",
                "-O",
                "raw",
                p.to_str().unwrap(),
                raw.to_str().unwrap(),
            ],
        );
        assert!(c.status.success());
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        seen.push((
            o.status.code(),
            stdout(&o)
                .lines()
                .filter(|l| !l.contains(" ops; "))
                .collect::<Vec<_>>()
                .join("\n"),
            err,
            std::fs::read(&raw).unwrap(),
        ));
    }
    // The lines with timings are left out.
    assert_eq!(seen[0].0, seen[1].0);
    assert_eq!(seen[0].1, seen[1].1);
    assert_eq!(seen[0].2, seen[1].2);
    assert!(seen[1].2.contains("file is empty"), "{}", seen[1].2);
    assert!(seen[0].3 == seen[1].3, "the images' contents differ");
    assert_eq!(&seen[1].3[..13], b"hello, world!");
    assert_eq!(&seen[1].3[13..26], b"hello, world!");
}

/// `help`: qemu-io's list with the commands qimg has (qemu-io's zoned-device commands are not
/// among them), and for each command, by name and short name, qemu-io's usage line; an unknown
/// command or too many arguments fail as in qemu-io.
#[test]
fn io_help_like_qemu_io() {
    let theirs = run("qemu-io", &["-c", "help"]);
    let ours = qimg(&["io", "-c", "help"]);
    assert!(ours.status.success());
    let keep = |l: &&str| !l.starts_with("zone_");
    let theirs_list: Vec<&str> = std::str::from_utf8(&theirs.stdout)
        .unwrap()
        .lines()
        .filter(keep)
        .collect();
    let ours_text = stdout(&ours);
    let ours_list: Vec<&str> = ours_text.lines().collect();
    assert_eq!(ours_list, theirs_list);
    let names: Vec<&str> = ours_list
        .iter()
        .filter_map(|l| l.split_once(' ').map(|(n, _)| n))
        .filter(|n| !n.is_empty() && *n != "Use")
        .collect();
    assert!(names.len() > 20, "{names:?}");
    for name in names.iter().copied().chain([
        "r", "w", "o", "c", "a", "d", "f", "l", "i", "t", "q", "?", "nosuch",
    ]) {
        let c = format!("help {name}");
        let theirs = run("qemu-io", &["-c", &c]);
        let ours = qimg(&["io", "-c", &c]);
        assert_eq!(ours.status.code(), theirs.status.code(), "{c}");
        let first = |o: &Output| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        };
        assert_eq!(first(&ours), first(&theirs), "{c}");
    }
    let theirs = run("qemu-io", &["-c", "help a b"]);
    let ours = qimg(&["io", "-c", "help a b"]);
    assert_eq!(ours.status.code(), theirs.status.code());
    assert_eq!(ours.stderr, theirs.stderr);
}

/// On a terminal, `qimg io` edits lines: Tab completes a command name, the up arrow brings back
/// the previous line, Ctrl-D ends the session (exit 0, the image closed cleanly). Run on a
/// pseudo-terminal.
#[test]
fn io_edits_lines_on_a_terminal() {
    use std::io::{Read, Write};
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::sync::{Arc, Mutex};
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.qcow2");
    qemu_create(&p, "", 1 << 20, &[]);
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two new descriptors into the given integers; the null pointers
    // ask for no name and default terminal settings.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened and are owned by nothing else.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let mut child = std::process::Command::new(QIMG)
        .args(["io", p.to_str().unwrap()])
        .env("TERM", "xterm")
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave)
        .spawn()
        .unwrap();
    let mut input = std::fs::File::from(master);
    let mut reader = input.try_clone().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen2.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    // Waits until the output holds `n` occurrences of `what`.
    let wait_for = |what: &str, n: usize| {
        let start = std::time::Instant::now();
        loop {
            let text = String::from_utf8_lossy(&seen.lock().unwrap()).to_string();
            if text.matches(what).count() >= n {
                return text;
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(10),
                "waiting for {n} x {what:?} in {text:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    wait_for("qimg> ", 1);
    input.write_all(b"leng\t\r").unwrap();
    wait_for("1 MiB", 1);
    input.write_all(b"\x1b[A\r").unwrap();
    wait_for("1 MiB", 2);
    input.write_all(b"write -P 7 0 4k\r").unwrap();
    wait_for("wrote 4096/4096 bytes at offset 0", 1);
    wait_for("qimg> ", 4);
    input.write_all(b"\x04").unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    let out = String::from_utf8_lossy(&seen.lock().unwrap()).to_string();
    assert!(out.contains("length"), "{out:?}");
    qemu_check_clean(&p);
    let r = run("qemu-io", &["-c", "read -P 7 0 4k", p.to_str().unwrap()]);
    assert!(stdout(&r).contains("read 4096/4096"), "{}", text(&r));
}

/// Format-less protocol nodes (`driver=file`, `host_device`, `host_cdrom`) and the file types
/// QEMU's protocol drivers accept: a directory is refused (read-only: by type; read-write: by
/// the open), a device is a `host_device`; `info` names the protocol as QEMU does.
#[test]
fn protocol_drivers_and_file_types_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    qemu_create(&img, "", 1 << 20, &[]);
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let (img, sub) = (img.to_str().unwrap(), sub.to_str().unwrap());
    let cases: Vec<Vec<String>> = vec![
        vec![
            "-c".into(),
            format!("open -r -o driver=file,filename={img}"),
            "-c".into(),
            "info".into(),
            "-c".into(),
            "length".into(),
        ],
        vec![
            "-c".into(),
            format!("open -r -o driver=file,filename={sub}"),
        ],
        vec!["-c".into(), format!("open -o driver=file,filename={sub}")],
        vec![
            "-c".into(),
            "open -r -o driver=file,filename=/dev/null".into(),
        ],
        vec![
            "-c".into(),
            format!("open -r -o driver=host_device,filename={sub}"),
        ],
        vec![
            "-c".into(),
            format!("open -r -o driver=host_cdrom,filename={img}"),
        ],
        vec![
            "-c".into(),
            "open -o driver=host_device,filename=/dev/null,locking=off".into(),
            "-c".into(),
            "info".into(),
        ],
        vec![
            "-f".into(),
            "raw".into(),
            "-c".into(),
            "length".into(),
            "/dev/null".into(),
        ],
        vec![
            "-r".into(),
            "-f".into(),
            "raw".into(),
            "-c".into(),
            "length".into(),
            sub.into(),
        ],
    ];
    for args in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let theirs = run("qemu-io", &args);
        let ours = qimg(&[&["io"][..], &args].concat());
        assert_eq!(
            ours.status.code(),
            theirs.status.code(),
            "{args:?}: {}",
            text(&ours)
        );
        assert_eq!(stdout(&ours), stdout(&theirs), "{args:?}");
        assert_eq!(
            stderr(&ours),
            String::from_utf8_lossy(&theirs.stderr).replace("qemu-io:", "PROG:"),
            "{args:?}"
        );
    }
    let theirs = run("qemu-img", &["info", sub]);
    let ours = qimg(&["info", sub]);
    assert_eq!(ours.status.code(), theirs.status.code());
    assert_eq!(stderr(&ours), stderr(&theirs));
}

/// `reopen` with the node's own options, as qemu-io: node names and drivers may be repeated but
/// not changed, `read-only` not beside `-r`/`-w`, `cache.*` not beside `-c`, flags must be
/// on/off; `read-only=on` and `cache.direct=on` take effect (a write then fails / still works).
#[test]
fn reopen_node_options_like_qemu_io() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("b.qcow2");
    let img = dir.path().join("t.qcow2");
    qemu_create(&base, "", 1 << 20, &[]);
    qemu_create(
        &img,
        "",
        1 << 20,
        &["-b", base.to_str().unwrap(), "-F", "qcow2"],
    );
    let p = img.to_str().unwrap();
    let open_named = format!("open -o node-name=foo,file.node-name=bar {p}");
    let cases: Vec<Vec<String>> = vec![
        vec!["reopen -o node-name=foo".into()],
        vec!["reopen -o file.node-name=foo".into()],
        vec!["reopen -o backing.node-name=foo".into()],
        vec!["reopen -o driver=raw".into()],
        vec!["reopen -o file.driver=qcow2".into()],
        vec!["reopen -o backing.driver=file".into()],
        vec!["reopen -o driver=qcow2,file.driver=file,backing.driver=qcow2".into()],
        vec!["reopen -r -o read-only=on".into()],
        vec!["reopen -c none -o cache.direct=on".into()],
        vec!["reopen -o read-only=foo".into()],
        vec!["reopen -o cache.no-flush=bar".into()],
        vec!["reopen -o auto-read-only=qux".into()],
        vec!["reopen -o node-name=0bad".into()],
        vec!["reopen -o read-only=on".into(), "write 0 512".into()],
        vec![
            "reopen -o cache.direct=on".into(),
            "write -P 3 0 4k".into(),
            "read -P 3 0 4k".into(),
        ],
    ];
    for cmds in cases {
        for with_names in [false, true] {
            let mut args: Vec<String> = Vec::new();
            if with_names {
                args.extend(["-c".into(), open_named.clone()]);
                args.extend([
                    "-c".into(),
                    "reopen -o node-name=foo,file.node-name=bar".into(),
                ]);
                args.extend(["-c".into(), "reopen".into()]);
            }
            for c in &cmds {
                args.extend(["-c".into(), c.clone()]);
            }
            if !with_names {
                args.push(p.into());
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let theirs = run("qemu-io", &args);
            let ours = qimg(&[&["io"][..], &args].concat());
            let lines = |o: &Output| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .filter(|l| !l.contains("ops;"))
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            assert_eq!(
                ours.status.code(),
                theirs.status.code(),
                "{args:?}: {}",
                text(&ours)
            );
            assert_eq!(lines(&ours), lines(&theirs), "{args:?}");
            // QEMU names an unnamed node '#blockNNN'.
            let node = |t: String| match t.split_once("node '") {
                Some((a, b)) => format!("{a}node '...'{}", b.split_once('\'').map_or("", |x| x.1)),
                None => t,
            };
            assert_eq!(
                node(stderr(&ours)),
                node(String::from_utf8_lossy(&theirs.stderr).replace("qemu-io:", "PROG:")),
                "{args:?}"
            );
        }
    }
}

/// qemu-io's `-m` (no effect on output), `--object secret,...` (defined, unused, as in QEMU) and
/// its refusals; `-k` and `-T` are refused with a message (they are not implemented).
#[test]
fn io_misalign_and_secret_objects_like_qemu_io() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    qemu_create(&img, "", 1 << 20, &[]);
    let secret_file = dir.path().join("key");
    std::fs::write(&secret_file, "hunter2").unwrap();
    let p = img.to_str().unwrap();
    let with_file = format!("secret,id=s1,file={}", secret_file.display());
    let cases: Vec<Vec<&str>> = vec![
        vec!["-m", "-c", "write -P 5 0 4k", "-c", "read -P 5 0 4k", p],
        vec!["--object", "secret,id=s0,data=abc", "-c", "length", p],
        vec![
            "--object",
            &with_file,
            "--object",
            "secret,id=s2,data=YQ==,format=base64",
            "-c",
            "length",
            p,
        ],
        vec!["--object", "secret,id=s0", "-c", "length", p],
        vec!["--object", "secret,data=abc", "-c", "length", p],
    ];
    for args in cases {
        let theirs = run("qemu-io", &args);
        let ours = qimg(&[&["io"][..], &args].concat());
        let lines = |o: &Output| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| !l.contains("ops;"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(
            ours.status.code(),
            theirs.status.code(),
            "{args:?}: {}",
            text(&ours)
        );
        assert_eq!(lines(&ours), lines(&theirs), "{args:?}");
        assert_eq!(
            stderr(&ours),
            String::from_utf8_lossy(&theirs.stderr).replace("qemu-io:", "PROG:"),
            "{args:?}"
        );
    }
    for args in [
        vec!["-k", "-c", "length", p],
        vec!["-T", "qcow2_*", "-c", "length", p],
        vec!["--object", "iothread,id=t0", "-c", "length", p],
    ] {
        let ours = qimg(&[&["io"][..], &args].concat());
        assert_eq!(ours.status.code(), Some(1), "{args:?}");
        assert!(
            stdout(&ours).is_empty() && stderr(&ours).contains("not supported"),
            "{args:?}: {}",
            text(&ours)
        );
    }
}

/// Every image command takes `--object secret,...` as qemu-img does (a secret nothing uses
/// changes nothing), and refuses other object types and malformed secrets.
#[test]
fn image_commands_take_secret_objects_like_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        dir.path().join("a.qcow2"),
        dir.path().join("b.qcow2"),
        dir.path().join("c.qcow2"),
    );
    let (a, b, c) = (
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        c.to_str().unwrap(),
    );
    let o = "--object";
    let sec = "secret,id=s0,data=x";
    let commands: Vec<Vec<&str>> = vec![
        vec!["info", o, sec, a],
        vec!["check", o, sec, a],
        vec!["map", o, sec, a],
        vec!["compare", o, sec, a, b],
        vec!["measure", o, sec, "--size", "1G"],
        vec!["snapshot", o, sec, "-l", a],
        vec!["resize", o, sec, a, "2M"],
        vec!["amend", o, sec, "-o", "lazy_refcounts=on", a],
        vec!["bitmap", o, sec, "--add", a, "b0"],
        vec!["create", o, sec, "-q", "-f", "qcow2", c, "1M"],
        vec!["convert", o, sec, "-O", "qcow2", a, c],
        vec!["info", o, "secret,id=s0", a],
        vec!["info", o, "iothread,id=t0", a],
    ];
    // Each run on fresh images: some commands change them.
    let fresh = || {
        for p in [a, b, c] {
            let _ = std::fs::remove_file(p);
        }
        qemu_create(Path::new(a), "", 1 << 20, &[]);
        qemu_create(Path::new(b), "", 1 << 20, &[]);
    };
    for args in commands {
        fresh();
        let theirs = run("qemu-img", &args);
        fresh();
        let ours = qimg(&args);
        assert_eq!(
            ours.status.code(),
            theirs.status.code(),
            "{args:?}: {}",
            text(&ours)
        );
        if theirs.status.success() {
            assert_eq!(
                stdout(&ours),
                String::from_utf8_lossy(&theirs.stdout),
                "{args:?}"
            );
        }
    }
}

/// An image's map as the guest sees it (`qemu-img map`, host offsets left out: the engines'
/// allocators place clusters differently).
fn guest_map(p: &Path) -> Vec<String> {
    let m = run("qemu-img", &["map", "--output=json", p.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&m.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{} {} depth={} present={} zero={} data={}",
                e["start"], e["length"], e["depth"], e["present"], e["zero"], e["data"]
            )
        })
        .collect()
}

/// qemu-io's `info`: format, cluster size, VM state offset and the format specific
/// information, the same as qemu-io's for qcow2 images of several kinds and for raw.
#[test]
fn io_info_like_qemu_io() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("a.qcow2", "qcow2", "", 64u64 << 20),
        (
            "b.qcow2",
            "qcow2",
            "cluster_size=16k,extended_l2=on,lazy_refcounts=on",
            3 << 30,
        ),
        (
            "c.qcow2",
            "qcow2",
            "compat=0.10,refcount_bits=16",
            100 << 20,
        ),
        ("d.raw", "raw", "", 1 << 20),
    ];
    for (name, fmt, opts, size) in cases {
        let p = dir.path().join(name);
        let mut args = vec!["create".to_string(), "-q".into(), "-f".into(), fmt.into()];
        if !opts.is_empty() {
            args.extend(["-o".into(), opts.into()]);
        }
        args.extend([p.to_str().unwrap().into(), size.to_string()]);
        let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        assert!(run("qemu-img", &args).status.success());
        if name == "b.qcow2" {
            assert!(
                run("qemu-img", &["bitmap", "--add", p.to_str().unwrap(), "b0"])
                    .status
                    .success()
            );
        }
        let args = ["-f", fmt, "-c", "info", "-c", "i", p.to_str().unwrap()];
        let ours = run_named(QIMG, "qemu-io", &[&["io"][..], &args].concat(), "");
        let theirs = run_named("qemu-io", "qemu-io", &args, "");
        assert_eq!(stdout(&ours), stdout(&theirs), "{name}");
        assert!(stdout(&ours).contains("vm state offset"), "{name}");
        assert_eq!(ours.status.code(), theirs.status.code(), "{name}");
    }
}
