//! QEMU's `blkdebug` driver in qimg, against QEMU's: the same configuration (rules keyed on the
//! qcow2 driver's steps, request limits) and the same commands through `qemu-io` and `qimg io`
//! on two copies of one image must print the same (errors included) and leave images that
//! read the same, map the same and get the same `qemu-img check` verdict.

mod common;

use common::{qemu_create, run, text};
use std::path::Path;

const QIMG: &str = env!("CARGO_BIN_EXE_qimg");

/// qemu-io's output without its timing lines and interactive prompts.
fn normalized(out: &str) -> String {
    out.lines()
        .filter(|l| !l.contains("ops/sec"))
        .map(|l| {
            let mut l = l;
            while let Some(rest) = l
                .strip_prefix("qemu-io> ")
                .or_else(|| l.strip_prefix("qimg> "))
            {
                l = rest;
            }
            l
        })
        .filter(|l| !l.is_empty())
        .map(|l| l.replace("qemu-io: ", "PROG: ").replace("qimg: ", "PROG: "))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs the commands through one qemu-io-like process (`qemu-io` or `qimg io`).
fn io(tool: &str, open: &[&str], cmds: &[&str]) -> String {
    let mut args: Vec<String> = Vec::new();
    let prog = if tool == "qemu-io" {
        "qemu-io"
    } else {
        args.push("io".into());
        QIMG
    };
    for c in cmds {
        args.push("-c".into());
        args.push(c.to_string());
    }
    args.extend(open.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    normalized(&text(&run(prog, &args)))
}

fn check(p: &Path) -> String {
    let o = run("qemu-img", &["check", p.to_str().unwrap()]);
    format!("{}\nexit {:?}", text(&o), o.status.code())
}

fn map(p: &Path) -> String {
    text(&run(
        "qemu-img",
        &["map", "--output=json", p.to_str().unwrap()],
    ))
}

/// Two copies of an image prepared by `setup` (qemu-io commands), for QEMU and for qimg.
fn pair(dir: &Path, create_opts: &str, setup: &[&str]) -> [std::path::PathBuf; 2] {
    let q = dir.join("qemu.qcow2");
    let m = dir.join("qimg.qcow2");
    qemu_create(&q, create_opts, 4 << 20, &[]);
    if !setup.is_empty() {
        let out = io("qemu-io", &["-f", "qcow2", q.to_str().unwrap()], setup);
        assert!(!out.contains("failed"), "setup: {out}");
    }
    std::fs::copy(&q, &m).unwrap();
    [q, m]
}

/// The same rules and commands through both tools; everything observable must agree.
fn same_behaviour(name: &str, config: &str, create_opts: &str, setup: &[&str], cmds: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("blkdebug.conf");
    std::fs::write(&conf, config).unwrap();
    let [q, m] = pair(dir.path(), create_opts, setup);
    let name_of = |p: &Path| format!("blkdebug:{}:{}", conf.display(), p.display());
    let want = io("qemu-io", &["-f", "qcow2", &name_of(&q)], cmds);
    let got = io("qimg", &["-f", "qcow2", &name_of(&m)], cmds);
    let strip = |s: &str, p: &Path| s.replace(&p.display().to_string(), "IMG");
    assert_eq!(strip(&got, &m), strip(&want, &q), "{name}: output");
    assert_eq!(
        strip(&check(&m), &m),
        strip(&check(&q), &q),
        "{name}: qemu-img check"
    );
    assert_eq!(map(&m), map(&q), "{name}: map");
    let cmp = run(
        "qemu-img",
        &["compare", q.to_str().unwrap(), m.to_str().unwrap()],
    );
    assert!(cmp.status.success(), "{name}: content: {}", text(&cmp));
}

#[test]
fn injected_errors_behave_as_in_qemu() {
    let data = ["write -P 0x11 0 128k", "write -P 0x22 1M 64k"];
    same_behaviour(
        "every read fails after the first data read",
        "[inject-error]\nevent = \"read_aio\"\n",
        "",
        &data,
        &["read -P 0x11 0 64k", "read -P 0x22 1M 4k"],
    );
    same_behaviour(
        "loading an L2 table fails",
        "[inject-error]\nevent = \"l2_load\"\n",
        "",
        &data,
        &["read -P 0x11 0 4k"],
    );
    same_behaviour(
        "the first data write fails once with ENOSPC",
        "[inject-error]\nevent = \"write_aio\"\nerrno = \"28\"\nonce = \"on\"\n",
        "",
        &data,
        &[
            "write -P 0x33 64k 4k",
            "write -P 0x44 2M 64k",
            "read -P 0x44 2M 64k",
        ],
    );
    same_behaviour(
        "a state machine: the second data write fails",
        "[set-state]\nevent = \"write_aio\"\nnew_state = \"2\"\n\n\
         [inject-error]\nevent = \"write_aio\"\nstate = \"2\"\nonce = \"on\"\n",
        "",
        &data,
        &["write -P 0x55 0 4k", "write -P 0x66 1M 4k"],
    );
    same_behaviour(
        "a sector filter",
        "[inject-error]\nevent = \"read_aio\"\nsector = \"0\"\n",
        "",
        &["write -P 0x11 0 4k"],
        &["read -P 0x11 0 4k", "read -P 0 1M 4k"],
    );
}

/// An error that stays armed also fails what closing the image writes: both tools say so (in
/// their own words: QEMU names its caches, qimg the flush that failed) and leave an image
/// `qemu-img check` accepts with the same verdict.
#[test]
fn an_armed_error_fails_the_close_in_both() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("blkdebug.conf");
    std::fs::write(
        &conf,
        "[set-state]\nevent = \"write_aio\"\nnew_state = \"2\"\n\n\
         [inject-error]\nevent = \"write_aio\"\nstate = \"2\"\n",
    )
    .unwrap();
    let [q, m] = pair(dir.path(), "", &["write -P 0x11 0 128k"]);
    let cmds = ["write -P 0x55 0 4k", "write -P 0x66 1M 4k"];
    let mut verdicts = Vec::new();
    for (tool, p) in [("qemu-io", &q), ("qimg", &m)] {
        let name = format!("blkdebug:{}:{}", conf.display(), p.display());
        let out = io(tool, &["-f", "qcow2", &name], &cmds);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[..2],
            [
                "wrote 4096/4096 bytes at offset 0",
                "write failed: Input/output error"
            ],
            "{tool}: {out}"
        );
        assert!(
            lines[2..].iter().any(|l| l.contains("Input/output error")),
            "{tool} reports no error at close: {out}"
        );
        verdicts.push(check(p).replace(&p.display().to_string(), "IMG"));
    }
    assert_eq!(verdicts[1], verdicts[0]);
}

#[test]
fn limits_above_the_format_split_zero_writes_as_qemu_does() {
    let dir = tempfile::tempdir().unwrap();
    let [q, m] = pair(dir.path(), "", &["write -P 0x11 0 4M"]);
    for (opts, cmd) in [
        ("align=512,opt-write-zero=1M", "write -z 300k 2M"),
        (
            "align=4k,opt-write-zero=512k,max-write-zero=1M",
            "write -z -u 8k 3M",
        ),
        ("align=512,opt-discard=1M,max-discard=1M", "discard 100k 3M"),
        ("align=4k,max-transfer=64k", "write -P 0x22 1000 300k"),
    ] {
        let open = |p: &Path| {
            format!(
                "open -o driver=blkdebug,image.driver=qcow2,{opts} {}",
                p.display()
            )
        };
        let want = io("qemu-io", &[], &[&open(&q), cmd]);
        let got = io("qimg", &[], &[&open(&m), cmd]);
        assert_eq!(got, want, "{opts} {cmd}");
        assert_eq!(map(&m), map(&q), "{opts} {cmd}: map");
    }
    common::assert_same_disk(&q, &m);
    common::qemu_check_clean(&m);
}

#[test]
fn alignment_below_the_format_keeps_content() {
    let dir = tempfile::tempdir().unwrap();
    let [q, m] = pair(dir.path(), "cluster_size=4k", &[]);
    let cmds = [
        "write -P 0x11 0x200 0x400",
        "write -z 0x400 0x20000",
        "write -P 0x22 0x20200 0x600",
        "discard 0x1000 0x3000",
        "read -P 0x11 0x200 0x200",
    ];
    for p in [&q, &m] {
        let tool = if p == &q { "qemu-io" } else { "qimg" };
        let open = format!(
            "open -o driver=qcow2,file.align=4k blkdebug::{}",
            p.display()
        );
        let mut all = vec![open.as_str()];
        all.extend(cmds);
        let out = io(tool, &[], &all);
        assert!(!out.contains("failed"), "{tool}: {out}");
    }
    common::assert_same_disk(&q, &m);
    common::qemu_check_clean(&m);
}

#[test]
fn bad_configurations_are_refused_as_qemu_refuses_them() {
    let dir = tempfile::tempdir().unwrap();
    let [q, _] = pair(dir.path(), "", &[]);
    let img = q.display();
    for (name, want) in [
        (
            format!("blkdebug:{}/none.conf:{img}", dir.path().display()),
            "Could not read blkdebug config file",
        ),
        (
            format!("blkdebug:{img}"),
            "blkdebug requires both config file and image path",
        ),
    ] {
        let o = run(QIMG, &["io", "-f", "qcow2", "-c", "read 0 512", &name]);
        let t = text(&o);
        assert!(t.contains(want), "{name}: {t}");
        let o = run("qemu-io", &["-f", "qcow2", "-c", "read 0 512", &name]);
        assert!(text(&o).contains(want), "QEMU says otherwise: {}", text(&o));
    }
    let o = run(
        QIMG,
        &[
            "io",
            "-c",
            &format!("open -o driver=blkdebug,image.driver=qcow2,align=3 {img}"),
        ],
    );
    assert!(
        text(&o).contains("Cannot meet constraints with align 3"),
        "{}",
        text(&o)
    );
}

/// `convert --salvage` through a source whose reads and block status fail at chosen sectors:
/// the same warnings in the same order as qemu-img, and the same target (zeros where nothing
/// could be read).
#[test]
fn convert_salvage_reports_and_skips_what_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.qcow2");
    qemu_create(&src, "", 8 << 20, &[]);
    let out = io(
        "qemu-io",
        &["-f", "qcow2", src.to_str().unwrap()],
        &["write -P 42 0 8M"],
    );
    assert!(!out.contains("failed"), "{out}");
    let mut rules = Vec::new();
    for (kind, off) in [
        ("block-status", (2 << 20) + 8192),
        ("block-status", (5 << 20) + 512),
        ("read", (4 << 20) - 65536),
        ("read", (5 << 20) + 512),
        ("read", 6 << 20),
        ("read", (6 << 20) + 1536),
    ] {
        rules.push(format!(
            "{{'event':'none','iotype':'{kind}','errno':5,'sector':{}}}",
            off / 512
        ));
    }
    let source = format!(
        "json:{{'driver':'blkdebug','image':{{'driver':'qcow2','file':{{'driver':'file',\
         'filename':'{}'}}}},'inject-error':[{}]}}",
        src.display(),
        rules.join(",")
    );
    let mut outputs = Vec::new();
    for (prog, target) in [("qemu-img", "want.qcow2"), (QIMG, "got.qcow2")] {
        let target = dir.path().join(target);
        let o = run(
            prog,
            &[
                "convert",
                "--salvage",
                "-O",
                "qcow2",
                &source,
                target.to_str().unwrap(),
            ],
        );
        assert!(o.status.success(), "{prog}: {}", text(&o));
        let warnings: Vec<String> = String::from_utf8_lossy(&o.stderr)
            .lines()
            .map(|l| l.split_once(": ").map_or(l, |(_, rest)| rest).to_string())
            .collect();
        outputs.push((warnings, target));
    }
    assert!(
        outputs[0].0.len() >= 6,
        "qemu-img warned: {:?}",
        outputs[0].0
    );
    assert_eq!(outputs[1].0, outputs[0].0, "warnings");
    common::assert_same_disk(&outputs[0].1, &outputs[1].1);
    common::qemu_check_clean(&outputs[1].1);
}

/// qemu-io's breakpoints (`break`, `wait_break`, `resume`): a write held at `write_aio` holds
/// back the writes that touch its cluster until it is resumed, in qimg as in QEMU; the
/// messages come in the same order and the image ends the same.
#[test]
fn breakpoints_hold_a_request_until_resumed() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let [q, m] = pair(dir.path(), "", &["write -P 1 0 128k"]);
    let script = "break write_aio A\n\
                  aio_write -P 10 0x18000 0x2000\n\
                  wait_break A\n\
                  aio_write -P 11 0x12000 0x2000\n\
                  aio_write -P 12 0x1a000 0x2000\n\
                  resume A\n\
                  aio_flush\n\
                  resume B\n\
                  break no_such_event C\n\
                  read -P 10 0x18000 0x2000\n\
                  read -P 11 0x12000 0x2000\n\
                  read -P 12 0x1a000 0x2000\n";
    let mut outs = Vec::new();
    for (prog, img) in [("qemu-io", &q), ("qimg", &m)] {
        let name = format!("blkdebug::{}", img.display());
        let mut cmd = if prog == "qemu-io" {
            std::process::Command::new("qemu-io")
        } else {
            let mut c = std::process::Command::new(QIMG);
            c.arg("io");
            c
        };
        let mut child = cmd
            .args(["-f", "qcow2", &name])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        let o = child.wait_with_output().unwrap();
        let out = normalized(&text(&o));
        let lines: Vec<String> = out.lines().map(|l| l.to_string()).collect();
        let at = |s: &str| {
            lines
                .iter()
                .position(|l| l == s)
                .unwrap_or_else(|| panic!("{prog}: no {s:?} in {out}"))
        };
        let (suspended, resuming) = (
            at("blkdebug: Suspended request 'A'"),
            at("blkdebug: Resuming request 'A'"),
        );
        assert!(suspended < resuming, "{prog}: {out}");
        let wrote: Vec<usize> = (0..lines.len())
            .filter(|&i| lines[i].starts_with("wrote "))
            .collect();
        assert_eq!(wrote.len(), 3, "{prog}: {out}");
        assert!(
            wrote.iter().all(|&i| i > resuming),
            "{prog}: a write completed before the held one was resumed: {out}"
        );
        let mut sorted = lines.clone();
        sorted.sort();
        outs.push(sorted);
    }
    assert_eq!(outs[1], outs[0], "the same messages");
    common::assert_same_disk(&q, &m);
    common::qemu_check_clean(&m);
}

/// `cluster_free`: an error armed when a snapshot's clusters are freed. `snapshot -d` fails
/// after the snapshot left the table, with qemu-img's messages, and both tools leave the same
/// leaks (and nothing worse), which `check -r leaks` repairs the same way (iotest 217).
#[test]
fn a_failed_free_in_snapshot_delete_leaks_as_in_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("blkdebug.conf");
    std::fs::write(
        &conf,
        "[inject-error]\nevent = \"cluster_free\"\nerrno = \"5\"\n",
    )
    .unwrap();
    let [q, m] = pair(dir.path(), "", &["write -P 0x11 0 64k"]);
    let mut seen = Vec::new();
    for (tool, p) in [("qemu-img", &q), (QIMG, &m)] {
        let o = run(tool, &["snapshot", "-c", "foo", p.to_str().unwrap()]);
        assert!(o.status.success(), "{tool}: {}", text(&o));
        let name = format!("blkdebug:{}:{}", conf.display(), p.display());
        // Named as qemu-img, for the same message prefix.
        let o = common::run_named(tool, "qemu-img", &["snapshot", "-d", "foo", &name]);
        let list = run("qemu-img", &["snapshot", "-l", p.to_str().unwrap()]);
        let fix = run("qemu-img", &["check", "-r", "leaks", p.to_str().unwrap()]);
        let strip = |s: String| s.replace(&p.display().to_string(), "IMG");
        seen.push((
            o.status.code(),
            strip(text(&o)),
            text(&list),
            check(p),
            strip(text(&fix)),
        ));
    }
    assert!(
        seen[0]
            .1
            .contains("Failed to free the cluster and L1 table"),
        "{}",
        seen[0].1
    );
    assert_eq!(seen[1], seen[0]);
    let cmp = run(
        "qemu-img",
        &["compare", q.to_str().unwrap(), m.to_str().unwrap()],
    );
    assert!(cmp.status.success(), "{}", text(&cmp));
}
