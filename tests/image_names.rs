//! Image names as QEMU's tools take them — `json:{...}`, `--image-opts` option lists and the
//! `file:` prefix — against qemu-img: the same output for the same name, options in the name
//! applied (a runtime option's effect, `backing: null`), and names that need a block driver
//! qimg does not have refused with an error, never opened some other way.

mod common;

use common::*;
use std::path::Path;

const QIMG: &str = env!("CARGO_BIN_EXE_qimg");

fn both(args: &[&str]) -> (std::process::Output, std::process::Output) {
    (run(QIMG, args), run("qemu-img", args))
}

fn same(args: &[&str]) {
    let (a, b) = both(args);
    assert!(b.status.success(), "qemu-img {args:?}: {}", text(&b));
    assert!(a.status.success(), "qimg {args:?}: {}", text(&a));
    assert_eq!(text(&a), text(&b), "{args:?}");
}

fn setup(dir: &Path) -> (String, String) {
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    qemu_create(&base, "", 4 << 20, &[]);
    qemu_io(&base, "qcow2", &["write -P 7 0 1M".into()]);
    qemu_create(
        &top,
        "",
        4 << 20,
        &["-b", base.to_str().unwrap(), "-F", "qcow2"],
    );
    qemu_io(&top, "qcow2", &["write -P 9 1M 64k".into()]);
    (
        base.to_str().unwrap().to_string(),
        top.to_str().unwrap().to_string(),
    )
}

#[test]
fn json_names_read_as_qemu_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let (_, top) = setup(dir.path());
    for name in [
        format!(r#"json:{{"driver":"qcow2","file":{{"driver":"file","filename":"{top}"}}}}"#),
        format!(r#"json:{{"driver":"qcow2","file.filename":"{top}"}}"#),
        format!("json:{{ 'driver': 'qcow2', 'file': {{ 'filename': '{top}' }} }}"),
    ] {
        same(&["info", &name]);
        same(&["info", "--backing-chain", &name]);
        same(&["map", "--output=json", &name]);
        same(&["compare", &name, &top]);
    }
    // `backing: null`: the overlay alone (its unallocated clusters read zeros).
    let alone =
        format!(r#"json:{{"driver":"qcow2","file":{{"filename":"{top}"}},"backing":null}}"#);
    same(&["map", "--output=json", &alone]);
    let raw = dir.path().join("alone.raw");
    let o = run(
        QIMG,
        &["convert", "-O", "raw", &alone, raw.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", text(&o));
    let data = std::fs::read(&raw).unwrap();
    assert!(data[..1 << 20].iter().all(|&x| x == 0), "backing file read");
    assert!(data[1 << 20..(1 << 20) + 65536].iter().all(|&x| x == 9));
}

#[test]
fn image_opts_as_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let (_, top) = setup(dir.path());
    let opts = format!("driver=qcow2,file.driver=file,file.filename={top}");
    same(&["info", "--image-opts", &opts]);
    same(&["info", "--backing-chain", "--image-opts", &opts]);
    same(&["check", "--image-opts", &opts]);
    same(&["map", "--image-opts", &opts]);
    same(&["compare", "--image-opts", &opts, &opts]);
    // A runtime option of the qcow2 driver is applied: an invalid value is refused by both.
    let bad = format!("{opts},l2-cache-size=bogus");
    let (a, b) = both(&["info", "--image-opts", &bad]);
    assert!(!a.status.success() && !b.status.success(), "{}", text(&a));
    // Writing commands take it too.
    let o = run(QIMG, &["resize", "--image-opts", &opts, "8M"]);
    assert!(o.status.success(), "{}", text(&o));
    qemu_check_clean(Path::new(&top));
    let o = run(QIMG, &["snapshot", "-c", "s", "--image-opts", &opts]);
    assert!(o.status.success(), "{}", text(&o));
    same(&["snapshot", "-l", "--image-opts", &opts]);
}

#[test]
fn file_prefix_as_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let a = format!("file:{d}/a:b.qcow2");
    let b = format!("file:{d}/c:d.qcow2");
    let o1 = run(QIMG, &["create", "-f", "qcow2", &a, "1M"]);
    let o2 = run("qemu-img", &["create", "-f", "qcow2", &b, "1M"]);
    assert_eq!(
        text(&o1).replace("a:b", "c:d"),
        text(&o2),
        "create file: prefix"
    );
    assert!(Path::new(&format!("{d}/a:b.qcow2")).exists());
    same(&["info", &a]);
    // Relative, with a colon before the first slash: QEMU names it ./NAME.
    let (x, y) = (
        std::process::Command::new(QIMG)
            .args(["info", "file:a:b.qcow2"])
            .current_dir(d)
            .output()
            .unwrap(),
        std::process::Command::new("qemu-img")
            .args(["info", "file:a:b.qcow2"])
            .current_dir(d)
            .output()
            .unwrap(),
    );
    assert!(x.status.success(), "{}", text(&x));
    assert_eq!(text(&x), text(&y));
}

#[test]
fn other_block_drivers_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_, top) = setup(dir.path());
    for name in [
        format!(
            r#"json:{{"driver":"qcow2","file":{{"driver":"ssh","path":"{top}","server":{{"host":"localhost"}}}}}}"#
        ),
        format!(
            r#"json:{{"driver":"qcow2","file":{{"filename":"{top}"}},"backing":{{"driver":"qcow2","file":{{"filename":"{top}"}}}}}}"#
        ),
        r#"json:{"driver":"qcow2""#.to_string(),
    ] {
        let o = run(QIMG, &["info", &name]);
        assert!(!o.status.success(), "{name}: accepted");
        assert!(text(&o).contains("Could not open"), "{name}: {}", text(&o));
    }
    for (opts, says) in [
        (
            format!("driver=throttle,file.filename={top}"),
            "'throttle' is not supported",
        ),
        // A quorum is read below a format only.
        (
            format!("driver=quorum,vote-threshold=1,children.0.filename={top}"),
            "file.driver=quorum",
        ),
    ] {
        let o = run(QIMG, &["info", "--image-opts", &opts]);
        assert!(!o.status.success());
        assert!(text(&o).contains(says), "{}", text(&o));
    }
}

/// A backing format qimg does not know: the image does not open (QEMU's message), unless
/// `backing.driver=` names the format, as with QEMU.
#[test]
fn backing_driver_overrides_the_named_format() {
    let dir = tempfile::tempdir().unwrap();
    let (_, top) = setup(dir.path());
    // Rename the backing format extension's payload "qcow2" to "foo".
    let mut d = std::fs::read(&top).unwrap();
    let ext = 0xE279_2ACAu32.to_be_bytes();
    let at = d
        .windows(4)
        .position(|w| w == ext)
        .expect("backing format extension");
    d[at + 4..at + 8].copy_from_slice(&3u32.to_be_bytes());
    d[at + 8..at + 16].copy_from_slice(b"foo\0\0\0\0\0");
    std::fs::write(&top, &d).unwrap();
    let (a, b) = both(&["map", "--output=json", &top]);
    assert!(!a.status.success() && !b.status.success());
    assert_eq!(
        text(&a).replace("qimg:", "qemu-img:"),
        text(&b),
        "unknown backing format"
    );
    let opts = format!("driver=qcow2,file.filename={top},backing.driver=qcow2");
    same(&["map", "--output=json", "--image-opts", &opts]);
    same(&["compare", "--image-opts", &opts, &opts]);
}

/// QEMU's `compress` filter (`driver=compress,file.driver=qcow2,...`): unaligned writes through
/// it leave every cluster they touch compressed, in qimg as in qemu-io; the same content and
/// the same count of compressed clusters.
#[test]
fn the_compress_filter_stores_every_written_cluster_compressed() {
    let dir = tempfile::tempdir().unwrap();
    let mut results = Vec::new();
    for (prog, name) in [("qemu-io", "q.qcow2"), (QIMG, "m.qcow2")] {
        let img = dir.path().join(name);
        qemu_create(&img, "cluster_size=64k", 2 << 20, &[]);
        let opts = format!(
            "driver=compress,file.driver=qcow2,file.file.driver=file,file.file.filename={}",
            img.display()
        );
        let mut args = if prog == QIMG { vec!["io"] } else { vec![] };
        args.extend([
            "--image-opts",
            "-c",
            "write -P 0xbb 0 229376",
            "-c",
            "write -P 0xcc 278528 229376",
            &opts,
        ]);
        let o = run(prog, &args);
        assert!(
            o.status.success() && !text(&o).contains("failed"),
            "{prog}: {}",
            text(&o)
        );
        let check = run(
            "qemu-img",
            &["check", "--output=json", img.to_str().unwrap()],
        );
        let v: serde_json::Value = serde_json::from_slice(&check.stdout).unwrap();
        assert_eq!(v["check-errors"], 0, "{prog}: {}", text(&check));
        results.push((img, v["compressed-clusters"].clone()));
    }
    assert_eq!(results[0].1, 8, "QEMU's count");
    assert_eq!(results[1].1, results[0].1);
    assert_same_disk(&results[0].0, &results[1].0);
    let o = run(
        QIMG,
        &[
            "io",
            "--image-opts",
            "-c",
            "read 0 512",
            "driver=compress,file.driver=raw,file.filename=x",
        ],
    );
    assert!(
        text(&o).contains("Compression is not supported for underlying format: raw"),
        "{}",
        text(&o)
    );
}

/// A format over a format (`driver=qcow2,file.driver=qcow2`): a qcow2 image stored in the guest
/// disk of another reads as qemu-io reads it, takes writes to its allocated clusters, and a
/// write that needs more room than the inner disk has fails (`ENOSPC`: qimg does not grow an
/// image past its size; QEMU maps the write past the inner image's end and leaves its header's
/// size behind). Both images pass `qemu-img check` afterwards.
#[test]
fn a_format_over_a_format_reads_as_qemu_io_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let payload = dir.path().join("payload.qcow2");
    qemu_create(&payload, "", 4 << 20, &[]);
    qemu_io(
        &payload,
        "qcow2",
        &["write -P 7 0 64k".into(), "write -P 8 1M 4k".into()],
    );
    let container = dir.path().join("container.qcow2");
    let o = run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            payload.to_str().unwrap(),
            container.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let copy = dir.path().join("copy.qcow2");
    std::fs::copy(&container, &copy).unwrap();
    let open = |p: &Path| {
        format!(
            "open -o driver=qcow2,file.driver=qcow2,file.file.filename={}",
            p.display()
        )
    };
    let reads = [
        "read -P 7 0 64k",
        "read -P 8 1M 4k",
        "read -P 0 2M 64k",
        "map",
    ];
    let strip = |o: &std::process::Output| -> String {
        text(o)
            .lines()
            .filter(|l| !l.contains("ops/sec"))
            .map(|l| l.replace("qemu-io: ", "").replace("qimg: ", ""))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let mut outs = Vec::new();
    for (prog, p) in [("qemu-io", &container), (QIMG, &copy)] {
        let mut args: Vec<String> = if prog == QIMG {
            vec!["io".into()]
        } else {
            vec![]
        };
        for c in std::iter::once(open(p)).chain(reads.iter().map(|s| s.to_string())) {
            args.push("-c".into());
            args.push(c);
        }
        let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        outs.push(strip(&run(prog, &args)));
    }
    assert_eq!(outs[1], outs[0]);
    assert!(!outs[0].contains("failed"), "{}", outs[0]);
    // In place: the payload's cluster at 0 exists; a new cluster needs room the disk lacks.
    let o = run(
        QIMG,
        &[
            "io",
            "-c",
            &open(&copy),
            "-c",
            "write -P 9 0 4k",
            "-c",
            "write -P 9 2M 64k",
            "-c",
            "read -P 9 0 4k",
        ],
    );
    let t = strip(&o);
    assert!(t.contains("wrote 4096/4096 bytes at offset 0"), "{t}");
    assert!(t.contains("write failed: No space left on device"), "{t}");
    assert!(t.contains("read 4096/4096 bytes at offset 0"), "{t}");
    qemu_check_clean(&copy);
    let o = run(
        "qemu-io",
        &[
            "-c",
            &open(&copy),
            "-c",
            "read -P 9 0 4k",
            "-c",
            "read -P 8 1M 4k",
        ],
    );
    assert!(!text(&o).contains("failed"), "{}", text(&o));
}

/// Backing file names in QEMU's `json:{...}` form, which QEMU writes into images: read as QEMU
/// reads them (the same info, map, content and errors, with `backing: null` and a `blkdebug`
/// node), written by `qimg create -b` as qemu-img writes them, committed into; and a name that
/// asks for a network connection refused without connecting.
#[test]
fn json_backing_names_as_qemu_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = |n: &str| d.join(n).to_str().unwrap().to_string();
    // base0 <- base1 <- top, top naming base1 in JSON.
    qemu_create(Path::new(&p("base0")), "", 4 << 20, &[]);
    qemu_io(Path::new(&p("base0")), "qcow2", &["write -P 1 0 1M".into()]);
    qemu_create(
        Path::new(&p("base1")),
        "",
        4 << 20,
        &["-b", &p("base0"), "-F", "qcow2"],
    );
    qemu_io(
        Path::new(&p("base1")),
        "qcow2",
        &["write -P 2 1M 1M".into()],
    );
    let names = [
        format!(
            r#"json:{{"driver":"qcow2","file":{{"driver":"file","filename":"{}"}}}}"#,
            p("base1")
        ),
        format!(
            "json:{{'driver': 'qcow2', 'file': {{ 'filename': '{}' }}, 'backing': null}}",
            p("base1")
        ),
        format!(
            r#"json:{{"driver":"qcow2","file.filename":"{}"}}"#,
            p("base1")
        ),
    ];
    for (i, json) in names.iter().enumerate() {
        let (ours, theirs) = (p(&format!("q{i}")), p(&format!("e{i}")));
        // Created by both tools: the same summary line (commas doubled), the same header.
        let (a, b) = (
            run(
                QIMG,
                &["create", "-f", "qcow2", "-b", json, "-F", "qcow2", &ours],
            ),
            run(
                "qemu-img",
                &["create", "-f", "qcow2", "-b", json, "-F", "qcow2", &theirs],
            ),
        );
        assert!(b.status.success(), "{}", text(&b));
        assert_eq!(
            text(&a).replace(&ours, "X"),
            text(&b).replace(&theirs, "X"),
            "{json}"
        );
        for img in [&ours, &theirs] {
            qemu_io(Path::new(img), "qcow2", &["write -P 3 3M 64k".into()]);
        }
        for img in [&ours, &theirs] {
            same(&["info", img]);
            // Listed by the images' own names, past a `backing: null` (which reads honour).
            same(&["info", "--backing-chain", img]);
            same(&["info", "--backing-chain", "--output=json", img]);
            same(&["map", "--output=json", img]);
            let raw = p("ours.raw");
            let o = run(QIMG, &["convert", "-O", "raw", img, &raw]);
            assert!(o.status.success(), "{}", text(&o));
            let o = run("qemu-img", &["compare", "-f", "raw", &raw, img]);
            assert!(o.status.success(), "{json}: {}", text(&o));
        }
        // `backing: null` hides base0's data.
        let o = run(QIMG, &["convert", "-O", "raw", &ours, &p("ours.raw")]);
        assert!(o.status.success(), "{}", text(&o));
        let data = std::fs::read(p("ours.raw")).unwrap();
        assert_eq!(data[0], if i == 1 { 0 } else { 1 }, "{json}");
        assert_eq!(data[1 << 20], 2);
    }
    // A blkdebug node in the name: its injected errors reach the reads and the commit.
    let debug = |rule: &str| {
        format!(
            "json:{{'driver': 'qcow2', 'file': {{ 'driver': 'blkdebug', 'inject-error': [{rule}], \
             'image': {{ 'driver': 'file', 'filename': '{}' }}}}}}",
            p("base1")
        )
    };
    let read_error = debug("{ 'event': 'read_aio', 'errno': 5 }");
    let top = p("debug-read");
    let o = run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            &read_error,
            "-F",
            "qcow2",
            &top,
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let cmds = ["-c", "read -P 2 1M 64k", "-c", "read 3M 64k"];
    let mut args = vec!["-f", "qcow2"];
    args.extend_from_slice(&cmds);
    args.push(&top);
    let theirs = run("qemu-io", &args);
    let mut ours_args = vec!["io"];
    ours_args.extend_from_slice(&args);
    let ours = run(QIMG, &ours_args);
    let strip = |s: String| {
        s.lines()
            .filter(|l| !l.contains("ops/sec"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(strip(text(&ours)), strip(text(&theirs)));
    assert!(
        text(&ours).contains("read failed: Input/output error"),
        "{}",
        text(&ours)
    );
    for (tool, name) in [(QIMG, "c-ours"), ("qemu-img", "c-theirs")] {
        let top = p(name);
        let full = debug("{ 'event': 'write_aio', 'errno': 28, 'once': true }");
        let o = run(
            "qemu-img",
            &["create", "-f", "qcow2", "-b", &full, "-F", "qcow2", &top],
        );
        assert!(o.status.success(), "{}", text(&o));
        qemu_io(Path::new(&top), "qcow2", &["write -P 4 0 64k".into()]);
        let o = run(tool, &["commit", &top]);
        assert!(!o.status.success());
        assert!(
            text(&o).ends_with("Block job failed: No space left on device\n"),
            "{tool}: {}",
            text(&o)
        );
    }
    // A name that asks for a connection: refused, and nothing connects.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let remotes = [
        format!(
            r#"json:{{"driver":"raw","file":{{"driver":"nbd","host":"127.0.0.1","port":"{port}"}}}}"#
        ),
        format!(r#"json:{{"driver":"nbd","host":"127.0.0.1","port":"{port}"}}"#),
    ];
    for remote in &remotes {
        let top = p("remote");
        let _ = std::fs::remove_file(&top);
        let o = run(
            QIMG,
            &[
                "create", "-f", "qcow2", "-u", "-b", remote, "-F", "raw", &top, "4M",
            ],
        );
        assert!(o.status.success(), "{}", text(&o));
        for args in [
            vec!["info", "--backing-chain", top.as_str()],
            vec!["convert", "-O", "raw", top.as_str(), "/dev/null"],
        ] {
            let o = run(QIMG, &args);
            assert!(!o.status.success(), "{args:?}");
            let t = text(&o);
            assert!(
                t.contains("'nbd'") || t.contains("an NBD connection"),
                "{t}"
            );
        }
    }
    assert!(
        listener.accept().is_err(),
        "qimg connected to a server named by an image"
    );
}

/// The raw driver's `offset=` and `size=` (an image inside a larger file), against QEMU: the
/// same `info` (QEMU names such an image by its options), the same refusals of impossible
/// windows, the same bytes in the file after the same writes (ENOSPC past a fixed end, nothing
/// outside the window touched), fixed-size resizes refused; and a qcow2 image stored at an
/// offset inside a container file, used through `file.driver=raw,file.offset=`.
#[test]
fn raw_offset_and_size_as_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = |n: &str| d.join(n).to_str().unwrap().to_string();
    let container = p("container.raw");
    std::fs::write(&container, pattern(11, 4 << 20)).unwrap();
    // Both programs with argv[0] as QEMU's, on their own copy of the container.
    let both = |tool: &str, args: &[&str], file: &str| {
        let mut outs = Vec::new();
        for (ours, name) in [(true, "ours.raw"), (false, "theirs.raw")] {
            std::fs::copy(file, p(name)).unwrap();
            let args: Vec<String> = args.iter().map(|a| a.replace("FILE", &p(name))).collect();
            let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
            let o = if ours {
                if tool == "qemu-io" {
                    args.insert(0, "io");
                }
                run_named(QIMG, tool, &args)
            } else {
                run(tool, &args)
            };
            let out = text(&o).replace(&p(name), "FILE");
            let out: Vec<&str> = out.lines().filter(|l| !l.contains("ops/sec")).collect();
            outs.push((
                o.status.code(),
                out.join("\n"),
                std::fs::read(p(name)).unwrap(),
            ));
        }
        assert_eq!(outs[0].0, outs[1].0, "{args:?}: {}", outs[0].1);
        assert_eq!(outs[0].1, outs[1].1, "{args:?}");
        assert!(outs[0].2 == outs[1].2, "{args:?}: the files differ");
        outs.remove(0)
    };
    for opts in [
        "offset=4096,size=1048576",
        "offset=100",
        "offset=1M",
        "size=1M",
        "offset=0",
        "offset=8M",
        "offset=1M,size=4M",
        "size=1000",
        "size=x",
    ] {
        let name = format!("driver=raw,{opts},file.filename=FILE");
        for output in ["human", "json"] {
            both(
                "qemu-img",
                &["info", &format!("--output={output}"), "--image-opts", &name],
                &container,
            );
        }
    }
    let window = "driver=raw,offset=1M,size=1M,file.filename=FILE";
    let (_, out, _) = both(
        "qemu-io",
        &[
            "-c",
            "write -P 9 1020k 4k",
            "-c",
            "write 1M 4k",
            "-c",
            "read -P 9 1020k 4k",
            "-c",
            "discard 0 64k",
            "-c",
            "map",
            "--image-opts",
            window,
        ],
        &container,
    );
    assert!(out.contains("write failed"), "{out}");
    both(
        "qemu-img",
        &["resize", "--image-opts", window, "2M"],
        &container,
    );
    both(
        "qemu-img",
        &[
            "resize",
            "--image-opts",
            "driver=raw,offset=1M,file.filename=FILE",
            "5M",
        ],
        &container,
    );
    // A qcow2 image at 1 MiB inside a container, 2 MiB of room after it.
    let img = p("inner.qcow2");
    qemu_create(Path::new(&img), "", 8 << 20, &[]);
    qemu_io(Path::new(&img), "qcow2", &["write -P 3 0 1M".into()]);
    let mut bytes = vec![0u8; 1 << 20];
    bytes.extend(std::fs::read(&img).unwrap());
    let room = bytes.len() - (1 << 20) + (2 << 20);
    bytes.extend(vec![0u8; 4 << 20]);
    let boxed = p("boxed.raw");
    std::fs::write(&boxed, &bytes).unwrap();
    let name = format!(
        "driver=qcow2,file.driver=raw,file.offset=1M,file.size={room},file.file.filename=FILE"
    );
    both("qemu-img", &["info", "--image-opts", &name], &boxed);
    both(
        "qemu-img",
        &["info", "--output=json", "--image-opts", &name],
        &boxed,
    );
    let (_, out, _) = both(
        "qemu-io",
        &[
            "-c",
            "read -P 3 0 1M",
            "-c",
            "write -P 4 2M 1M",
            "-c",
            "read -P 4 2M 1M",
            "-c",
            "write -P 5 5M 3M",
            "--image-opts",
            &name,
        ],
        &boxed,
    );
    assert!(out.contains("No space left on device"), "{out}");
}

/// A backing file named in JSON with a raw node between format and file (the image lies in
/// part of a larger file, `"file": {"driver": "raw", "offset": ..., "size": ...}`): read as
/// qemu-img reads it, and committed into within its window; a raw node with other options is
/// refused. And iotest qemu-img-close-errors' situation: a base whose window is too small for
/// its bitmaps once the commit's data is in. The data is committed, the bitmaps stay `in-use`
/// (never stored wrong), and the failure at close is reported and fails the command.
#[test]
fn json_backing_names_with_a_raw_window() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = |n: &str| d.join(n).to_str().unwrap().to_string();
    let windowed = |file: &str, offset: u64, size: u64| {
        format!(
            r#"json:{{"driver":"qcow2","file":{{"driver":"raw","offset":{offset},"size":{size},"file":{{"driver":"file","filename":"{file}"}}}}}}"#
        )
    };
    // A qcow2 image stored 1 MiB into a container, with junk before it.
    let inner = p("inner.qcow2");
    qemu_create(Path::new(&inner), "", 8 << 20, &[]);
    qemu_io(Path::new(&inner), "qcow2", &["write -P 5 0 1M".into()]);
    let mut bytes = pattern(3, 1 << 20);
    bytes.extend(std::fs::read(&inner).unwrap());
    bytes.resize((1 << 20) + (4 << 20), 0);
    let container = p("container");
    std::fs::write(&container, &bytes).unwrap();
    let base = windowed(&container, 1 << 20, 4 << 20);
    let top = p("top.qcow2");
    let o = run(
        "qemu-img",
        &["create", "-f", "qcow2", "-b", &base, "-F", "qcow2", &top],
    );
    assert!(o.status.success(), "{}", text(&o));
    qemu_io(Path::new(&top), "qcow2", &["write -P 6 1M 64k".into()]);
    // QEMU prints the window's JSON numbers as numbers; qimg keeps option values as text and
    // quotes them (the one difference, compared apart).
    let unquoted = |s: String| {
        let re = ["\"1048576\"", "\"4194304\""];
        re.iter().fold(s, |s, q| s.replace(q, q.trim_matches('"')))
    };
    let (a, b) = both(&["info", "--backing-chain", &top]);
    assert!(a.status.success() && b.status.success(), "{}", text(&a));
    assert_eq!(unquoted(text(&a)), text(&b));
    same(&["map", "--output=json", &top]);
    let (a, b) = both(&["compare", &top, &inner]);
    assert_eq!((a.status.code(), text(&a)), (b.status.code(), text(&b)));
    let o = run(QIMG, &["commit", &top]);
    assert!(o.status.success(), "{}", text(&o));
    // Inside the window only: the junk before it is untouched.
    let after = std::fs::read(&container).unwrap();
    assert!(
        after[..1 << 20] == bytes[..1 << 20],
        "commit wrote before the window"
    );
    qemu_io(
        Path::new(&base),
        "qcow2",
        &["read -P 5 0 1M".into(), "read -P 6 1M 64k".into()],
    );
    let o = run("qemu-img", &["check", &base]);
    assert!(o.status.success(), "{}", text(&o));
    // A raw node with an option qimg does not read is refused, by name.
    let other = format!(
        r#"json:{{"driver":"qcow2","file":{{"driver":"raw","size":4194304,"skip":1,"file":{{"driver":"file","filename":"{container}"}}}}}}"#
    );
    let odd = p("odd.qcow2");
    let o = run(
        QIMG,
        &[
            "create", "-f", "qcow2", "-u", "-b", &other, "-F", "qcow2", &odd, "8M",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let o = run(QIMG, &["info", "--backing-chain", &odd]);
    assert!(!o.status.success());
    assert!(text(&o).contains("a nested image"), "{}", text(&o));

    // The close-errors case: six enabled bitmaps in a base of 1 GiB whose file is cut to a
    // window just larger than the data committed into it (2028 of 2030 clusters after the
    // commit): storing six dirtied bitmaps then needs clusters the window does not have.
    let base_file = p("base.qcow2");
    qemu_create(Path::new(&base_file), "", 1 << 30, &[]);
    for i in 1..=6 {
        let o = run(
            QIMG,
            &["bitmap", "--add", &base_file, &format!("stale-{i}")],
        );
        assert!(o.status.success(), "{}", text(&o));
    }
    let window = 2030u64 << 16;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&base_file)
        .unwrap();
    f.set_len(window).unwrap();
    let base = windowed(&base_file, 0, window);
    let top = p("full-top.qcow2");
    let o = run(
        "qemu-img",
        &["create", "-f", "qcow2", "-b", &base, "-F", "qcow2", &top],
    );
    assert!(o.status.success(), "{}", text(&o));
    qemu_io(Path::new(&top), "qcow2", &["write -P 0xcd 0 126M".into()]);
    let o = run_named(QIMG, "qemu-img", &["commit", "-d", &top]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        t.contains("Lost persistent bitmaps during inactivation of node '")
            && t.contains("Failed to write bitmap 'stale-"),
        "{t}"
    );
    assert!(
        t.ends_with("qemu-img: Error while closing the image: No space left on device\n"),
        "{t}"
    );
    // The data is in, the bitmaps are marked inconsistent, the image has leaks at most.
    qemu_io(Path::new(&base), "qcow2", &["read -P 0xcd 0 126M".into()]);
    let o = run("qemu-img", &["info", &base]);
    assert!(text(&o).contains("in-use"), "{}", text(&o));
    let o = run("qemu-img", &["check", &base]);
    assert!(matches!(o.status.code(), Some(0 | 3)), "{}", text(&o));
}

/// A format over QEMU's `quorum` (`file.driver=quorum`, children given as files): the same
/// `info` as qemu-img (the quorum as a node of its own), writes reaching every child, reads
/// voted on as QEMU votes (a child outvoted, a vote below the threshold failing with EIO, as
/// qemu-io fails it), a relative backing file name refused as QEMU refuses it, and QEMU's checks
/// of the options.
#[test]
fn quorum_as_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = |n: &str| d.join(n).to_str().unwrap().to_string();
    let quorum = |files: &[String], threshold: usize| {
        let children: Vec<String> = files
            .iter()
            .map(|f| format!("{{'driver':'file','filename':'{f}'}}"))
            .collect();
        format!(
            "json:{{'driver':'qcow2','file':{{'driver':'quorum','vote-threshold':{threshold},\
             'children':[{}]}}}}",
            children.join(",")
        )
    };
    let io_both = |name: &str, cmds: &[&str]| {
        let mut args = Vec::new();
        for c in cmds {
            args.push("-c");
            args.push(c);
        }
        args.push(name);
        let theirs = run("qemu-io", &args);
        let mut ours_args = vec!["io"];
        ours_args.extend_from_slice(&args);
        let ours = run_named(QIMG, "qemu-io", &ours_args);
        // qimg names a child that disagrees or fails on stderr (QEMU sends a QMP event,
        // which qemu-io does not print): compared apart.
        let strip = |s: String| {
            s.lines()
                .filter(|l| !l.contains("ops/sec") && !l.starts_with("quorum: "))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(
            (ours.status.code(), strip(text(&ours))),
            (theirs.status.code(), strip(text(&theirs))),
            "{cmds:?}"
        );
        text(&ours)
    };
    let a = p("a.qcow2");
    qemu_create(Path::new(&a), "", 4 << 20, &[]);
    for n in ["b.qcow2", "c.qcow2"] {
        std::fs::copy(&a, p(n)).unwrap();
    }
    let files = [a.clone(), p("b.qcow2"), p("c.qcow2")];
    let q = quorum(&files, 2);
    same(&["info", &q]);
    same(&["info", "--output=json", &q]);
    // Written by qimg through the quorum: every child has it.
    let o = run(QIMG, &["io", "-c", "write -P 7 0 64k", &q]);
    assert!(o.status.success(), "{}", text(&o));
    for f in &files {
        qemu_io(Path::new(f), "qcow2", &["read -P 7 0 64k".into()]);
        qemu_check_clean(Path::new(f));
    }
    // One child's data changed behind the quorum's back: outvoted (2 of 3 agree).
    let host = {
        let o = run("qemu-img", &["map", "--output=json", &files[2]]);
        let t = text(&o);
        let at = t.find("\"offset\": ").expect("a mapped cluster") + "\"offset\": ".len();
        t[at..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    let o = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            &format!("write -P 9 {host} 4k"),
            &files[2],
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let out = io_both(&q, &["read -P 7 0 64k"]);
    assert!(
        out.contains("quorum: ") && out.contains("c.qcow2 differs from the other children"),
        "{out}"
    );
    // Two children only, disagreeing, with a threshold of 2: the read fails.
    let two = quorum(&files[1..], 2);
    let out = io_both(&two, &["read -P 7 0 4k"]);
    assert!(out.contains("read failed: Input/output error"), "{out}");
    // QEMU's checks of the options.
    io_both(&quorum(&files[..2], 3), &["read 0 4k"]);
    io_both(&quorum(&files[..2], 0), &["read 0 4k"]);
    // A relative backing file name cannot be found below a quorum.
    let base = p("base.qcow2");
    qemu_create(Path::new(&base), "", 4 << 20, &[]);
    let top = p("top.qcow2");
    qemu_create(
        Path::new(&top),
        "",
        4 << 20,
        &["-b", "base.qcow2", "-F", "qcow2"],
    );
    let out = io_both(&quorum(std::slice::from_ref(&top), 1), &["read 0 4k"]);
    assert!(out.contains("Cannot generate a base directory"), "{out}");
    same(&["info", &quorum(&[top], 1)]);
}
