//! `qimg serve` with qemu-nbd's command line, each behaviour checked against qemu-nbd doing the
//! same thing: `--fork` and `--pid-file`, the end of a non-persistent server when its last client
//! leaves, `--list` (our client against both servers, and qemu-nbd's client against ours),
//! `-s`, `--detect-zeroes`, `-A`, multi-conn with `-e`, and the options qimg refuses.
//!
//! Needs qemu-img, qemu-io, qemu-nbd (qemu-utils) and nbdinfo (libnbd-bin).

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const QIMG: &str = env!("CARGO_BIN_EXE_qimg");

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn sock_uri(sock: &Path) -> String {
    format!("nbd+unix:///?socket={}", sock.display())
}

/// Runs a server command line (`qemu-nbd ...` or `qimg serve ...`) that forks; returns its
/// exit status and output (the parent's, which must return as soon as the server listens).
fn start_forked(server: &str, args: &[&str]) -> std::process::Output {
    let mut cmd = if server == "qimg" {
        let mut c = Command::new(QIMG);
        c.arg("serve");
        c
    } else {
        Command::new(server)
    };
    cmd.args(args)
        .arg("--fork")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {server}: {e}"))
}

fn pid_alive(pid: i32) -> bool {
    // Signal 0 checks existence; a zombie (exited, not reaped by its reparented parent) has no
    // /proc/PID/fd entries left, so look at the state too.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    !status.is_empty()
        && !status
            .lines()
            .any(|l| l.starts_with("State:") && l.contains('Z'))
}

fn wait_gone(pid: i32, what: &str) {
    let t = Instant::now();
    while pid_alive(pid) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{what} (pid {pid}) still runs"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until a server that ends by itself has removed its socket (it does so last).
fn wait_socket_gone(sock: &Path, what: &str) {
    let t = Instant::now();
    while sock.exists() {
        assert!(t.elapsed() < Duration::from_secs(10), "{what} did not end");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn read_pid(p: &Path) -> i32 {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("pid file {}: {e}", p.display()))
        .trim()
        .parse()
        .unwrap()
}

fn kill(pid: i32) {
    let _ = Command::new("kill").arg(pid.to_string()).status();
}

/// Both servers: `--fork` returns once the socket accepts, the pid file names the server, one
/// client's visit ends a non-persistent server, which removes its socket; the write is in the
/// image and the image is clean.
#[test]
fn fork_pid_file_and_exit_after_the_last_client_like_qemu_nbd() {
    for server in ["qemu-nbd", "qimg"] {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("d.qcow2");
        qemu_create(&img, "", 16 << 20, &[]);
        let sock = dir.path().join("s.sock");
        let pid_file = dir.path().join("s.pid");
        let o = start_forked(
            server,
            &[
                "-f",
                "qcow2",
                "-k",
                s(&sock),
                &format!("--pid-file={}", s(&pid_file)),
                s(&img),
            ],
        );
        assert!(o.status.success(), "{server} --fork: {}", text(&o));
        assert!(
            sock.exists(),
            "{server}: socket missing after --fork returned"
        );
        let pid = read_pid(&pid_file);
        assert!(
            pid_alive(pid),
            "{server}: the pid file names no live process"
        );

        let o = run(
            "qemu-io",
            &["-f", "raw", "-c", "write -P 0x5a 1M 64k", &sock_uri(&sock)],
        );
        assert!(o.status.success(), "{server}: {}", text(&o));
        wait_gone(pid, server);
        assert!(!sock.exists(), "{server} left its socket behind");
        qemu_check_clean(&img);
        let o = run(
            "qemu-io",
            &["-f", "qcow2", "-c", "read -P 0x5a 1M 64k", s(&img)],
        );
        assert!(
            o.status.success() && !text(&o).contains("failed"),
            "{}",
            text(&o)
        );
    }
}

/// With `-t`, the server outlives its clients until it is signalled; our pid file goes with it.
#[test]
fn persistent_server_serves_clients_one_after_another() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    qemu_create(&img, "", 16 << 20, &[]);
    let sock = dir.path().join("s.sock");
    let pid_file = dir.path().join("s.pid");
    let o = start_forked(
        "qimg",
        &[
            "-t",
            "-f",
            "qcow2",
            "-k",
            s(&sock),
            "--pid-file",
            s(&pid_file),
            s(&img),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let pid = read_pid(&pid_file);
    for i in 0..3u8 {
        let cmd = format!("write -P {} {}M 4k", i + 1, i);
        let o = run("qemu-io", &["-f", "raw", "-c", &cmd, &sock_uri(&sock)]);
        assert!(o.status.success(), "client {i}: {}", text(&o));
        assert!(
            pid_alive(pid),
            "the persistent server ended after client {i}"
        );
    }
    kill(pid);
    wait_gone(pid, "qimg serve");
    assert!(!pid_file.exists(), "the pid file outlived the server");
    qemu_check_clean(&img);
}

/// A server that cannot start makes `--fork` fail with its message (as qemu-nbd's does).
#[test]
fn fork_reports_startup_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.qcow2");
    for server in ["qemu-nbd", "qimg"] {
        let sock = dir.path().join(format!("{server}.sock"));
        let o = start_forked(server, &["-f", "qcow2", "-k", s(&sock), s(&missing)]);
        assert_eq!(o.status.code(), Some(1), "{server}: {}", text(&o));
        assert!(
            text(&o).contains("No such file or directory"),
            "{server}: {}",
            text(&o)
        );
        if server == "qimg" {
            // (qemu-nbd binds before it opens the image, and leaves its socket behind.)
            assert!(!sock.exists(), "qimg left a socket behind");
        }
    }
}

/// `--list` prints the same lines whoever serves and whoever asks: qemu-nbd's client and ours,
/// against qemu-nbd and against qimg (extended headers, flags, block sizes, contexts).
#[test]
fn list_matches_qemu_nbd_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    qemu_create(&img, "", 4 << 20, &[]);
    let mut outputs = Vec::new();
    for server in ["qemu-nbd", "qimg"] {
        for (flags, desc) in [(&["-r", "-A"][..], None), (&[][..], Some("a disk"))] {
            let sock = dir.path().join(format!("{server}.sock"));
            let pid_file = dir.path().join(format!("{server}.pid"));
            let mut args: Vec<&str> = vec!["-t", "-f", "qcow2", "-k", s(&sock)];
            args.extend_from_slice(flags);
            if let Some(d) = desc {
                args.extend_from_slice(&["-D", d]);
            }
            let pid_arg = format!("--pid-file={}", s(&pid_file));
            args.push(&pid_arg);
            args.push(s(&img));
            let o = start_forked(server, &args);
            assert!(o.status.success(), "{server}: {}", text(&o));
            let theirs = run("qemu-nbd", &["--list", "-k", s(&sock)]);
            let ours = run(QIMG, &["serve", "--list", "-k", s(&sock)]);
            assert!(theirs.status.success(), "{}", text(&theirs));
            assert!(ours.status.success(), "{}", text(&ours));
            assert_eq!(
                text(&ours),
                text(&theirs),
                "qimg --list against {server} {flags:?}"
            );
            outputs.push((server, flags, text(&theirs)));
            let pid = read_pid(&pid_file);
            kill(pid);
            wait_gone(pid, server);
        }
    }
    // qemu-nbd's client sees the same export from both servers.
    assert_eq!(outputs[0].2, outputs[2].2, "read-only with -A");
    assert_eq!(outputs[1].2, outputs[3].2, "writable with a description");
    assert!(outputs[0].2.contains("transaction size: 64-bit"));
    assert!(outputs[0].2.contains("qemu:allocation-depth"));
    assert!(
        !outputs[1].2.contains("qemu:allocation-depth"),
        "-A not given"
    );
}

#[test]
fn list_errors() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("none.sock");
    let o = run(QIMG, &["serve", "--list", "-k", s(&sock)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("Failed to connect"), "{}", text(&o));
    let o = run(QIMG, &["serve", "--list", "-k", s(&sock), "file.img"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains("List mode is incompatible with a file name"),
        "{}",
        text(&o)
    );
}

/// `-s`: clients write into a temporary overlay; the image is untouched and no file is left in
/// the temporary directory.
#[test]
fn snapshot_mode_keeps_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    qemu_create(&img, "", 16 << 20, &[]);
    qemu_io(&img, "qcow2", &["write -P 0x11 0 1M".to_string()]);
    let sock = dir.path().join("s.sock");
    let o = Command::new(QIMG)
        .args([
            "serve",
            "-s",
            "-f",
            "qcow2",
            "-k",
            s(&sock),
            "--fork",
            s(&img),
        ])
        .env("TMPDIR", tmp.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let o = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x22 512k 1M",
            "-c",
            "read -P 0x11 0 512k",
            "-c",
            "read -P 0x22 512k 1M",
            &sock_uri(&sock),
        ],
    );
    assert!(
        o.status.success() && !text(&o).contains("failed"),
        "{}",
        text(&o)
    );
    wait_socket_gone(&sock, "qimg serve");
    let left: Vec<PathBuf> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
    let o = run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "read -P 0x11 0 1M",
            "-c",
            "read -P 0 1M 1M",
            s(&img),
        ],
    );
    assert!(
        o.status.success() && !text(&o).contains("failed"),
        "{}",
        text(&o)
    );
    qemu_check_clean(&img);
}

/// `--detect-zeroes=unmap --discard=unmap`: writes of zeros deallocate as with qemu-nbd (the
/// same writes through both servers leave the same map); `on` without unmap keeps allocation.
#[test]
fn detect_zeroes_like_qemu_nbd() {
    for mode in ["on", "unmap"] {
        let dir = tempfile::tempdir().unwrap();
        let mut maps = Vec::new();
        for server in ["qemu-nbd", "qimg"] {
            let img = dir.path().join(format!("{server}.qcow2"));
            qemu_create(&img, "", 8 << 20, &[]);
            qemu_io(&img, "qcow2", &["write -P 0x33 0 4M".to_string()]);
            let sock = dir.path().join(format!("{server}.sock"));
            let o = start_forked(
                server,
                &[
                    "-f",
                    "qcow2",
                    "--discard=unmap",
                    &format!("--detect-zeroes={mode}"),
                    "-k",
                    s(&sock),
                    s(&img),
                ],
            );
            assert!(o.status.success(), "{server}: {}", text(&o));
            let o = run(
                "qemu-io",
                &[
                    "-f",
                    "raw",
                    "-c",
                    "write -P 0 1M 1M",
                    "-c",
                    "write -P 0 5M 1M",
                    &sock_uri(&sock),
                ],
            );
            assert!(o.status.success(), "{}", text(&o));
            wait_socket_gone(&sock, server);
            qemu_check_clean(&img);
            let m = run(
                "qemu-img",
                &["map", "--output=json", "-f", "qcow2", s(&img)],
            );
            let map: serde_json::Value = serde_json::from_slice(&m.stdout).unwrap();
            // Offsets differ between the engines' allocators; compare the guest's view.
            let view: Vec<(u64, u64, bool, bool)> = map
                .as_array()
                .unwrap()
                .iter()
                .map(|e| {
                    (
                        e["start"].as_u64().unwrap(),
                        e["length"].as_u64().unwrap(),
                        e["data"].as_bool().unwrap(),
                        e["zero"].as_bool().unwrap(),
                    )
                })
                .collect();
            maps.push(view);
        }
        assert_eq!(maps[0], maps[1], "detect-zeroes={mode}: qemu-nbd vs qimg");
    }
}

/// Multi-conn is offered only where a second client can be served at once.
#[test]
fn multi_conn_follows_shared() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    qemu_create(&img, "", 1 << 20, &[]);
    for (shared, want) in [("1", "false"), ("2", "true")] {
        let sock = dir.path().join(format!("{shared}.sock"));
        let o = start_forked(
            "qimg",
            &["-r", "-e", shared, "-f", "qcow2", "-k", s(&sock), s(&img)],
        );
        assert!(o.status.success(), "{}", text(&o));
        let o = run("nbdinfo", &[&sock_uri(&sock)]);
        assert!(
            text(&o).contains(&format!("can_multi_conn: {want}")),
            "-e {shared}: {}",
            text(&o)
        );
    }
}

/// qemu-nbd options qimg does not implement are refused by name, never ignored.
#[test]
fn unsupported_options_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    qemu_create(&img, "", 1 << 20, &[]);
    let sock = dir.path().join("s.sock");
    let cases: [(&[&str], &str); 5] = [
        (&["--object", "memory-backend-ram,id=m0"], "--object memory-backend-ram"),
        (&["-c", "/dev/nbd0"], "kernel NBD client"),
        (&["-o", "4M"], "Invalid offset '4M'"),
        (&["--offset", "0x200", "-A"], "--offset together with -A"),
        (
            &["--detect-zeroes=unmap"],
            "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap",
        ),
    ];
    for (extra, want) in cases {
        let mut args = vec!["serve", "-f", "qcow2", "-k", s(&sock)];
        args.extend_from_slice(extra);
        args.push(s(&img));
        let o = run(QIMG, &args);
        assert_eq!(o.status.code(), Some(1), "{extra:?}: {}", text(&o));
        assert!(text(&o).contains(want), "{extra:?}: {}", text(&o));
        assert!(!sock.exists(), "{extra:?}: the server started");
    }
}

/// A server started on the socket path of one that has not ended yet (a script that restarts a
/// server does not wait for the old one, as the iotests' `_make_test_img`): the old server, once
/// it has closed its image, must not remove the new server's socket.
#[test]
fn a_restarted_server_keeps_its_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let a_img = dir.path().join("a.qcow2");
    let b_img = dir.path().join("b.qcow2");
    qemu_create(&a_img, "", 64 << 20, &[]);
    qemu_create(&b_img, "", 64 << 20, &[]);
    let a_pid = dir.path().join("a.pid");
    let b_pid = dir.path().join("b.pid");
    let pid_arg = format!("--pid-file={}", s(&a_pid));
    let o = start_forked(
        "qimg",
        &["-t", "-f", "qcow2", "-k", s(&sock), &pid_arg, s(&a_img)],
    );
    assert!(o.status.success(), "{}", text(&o));
    let a = read_pid(&a_pid);
    // B takes over the path while A still runs; then A ends.
    let pid_arg = format!("--pid-file={}", s(&b_pid));
    let o = start_forked(
        "qimg",
        &["-t", "-f", "qcow2", "-k", s(&sock), &pid_arg, s(&b_img)],
    );
    assert!(o.status.success(), "{}", text(&o));
    kill(a);
    wait_gone(a, "the old server");
    assert!(sock.exists(), "the old server removed the new one's socket");
    let o = run(
        "qemu-io",
        &["-f", "raw", "-c", "write 0 4k", &sock_uri(&sock)],
    );
    assert!(o.status.success(), "{}", text(&o));
    let b = read_pid(&b_pid);
    kill(b);
    wait_gone(b, "the new server");
    assert!(!sock.exists(), "the last server leaves no socket behind");
    qemu_check_clean(&a_img);
    qemu_check_clean(&b_img);
}

/// `-o OFFSET`/`--offset OFFSET`: the image's disk from that byte on, as qemu-nbd exports it —
/// the same size, block status map (holes stay holes) and content, writes landing at the offset
/// in the image; QEMU's refusals of bad and too-large offsets and of an offset in list mode.
#[test]
fn offset_exports_part_of_the_image_like_qemu_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.qcow2");
    qemu_create(&base, "", 64 << 20, &[]);
    qemu_io(
        &base,
        "qcow2",
        &["write -P 1 0 1M".into(), "write -P 2 8M 1M".into()],
    );
    let sock = d.join("s.sock");
    let pid = d.join("s.pid");
    let mut seen = Vec::new();
    for server in ["qemu-nbd", "qimg"] {
        let img = d.join(format!("{server}.qcow2"));
        std::fs::copy(&base, &img).unwrap();
        let pid_arg = format!("--pid-file={}", s(&pid));
        let o = start_forked(
            server,
            &[
                "-f",
                "qcow2",
                "-o",
                "0x400000",
                "-k",
                s(&sock),
                "-t",
                &pid_arg,
                s(&img),
            ],
        );
        assert!(o.status.success(), "{server}: {}", text(&o));
        let p = read_pid(&pid);
        let uri = sock_uri(&sock);
        let map = run("nbdinfo", &["--map", &uri]);
        let size = run("nbdinfo", &["--size", &uri]);
        let io = run(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "read -P 2 4M 1M",
                "-c",
                "write -P 3 0 64k",
                &uri,
            ],
        );
        assert!(!text(&io).contains("fail"), "{server}: {}", text(&io));
        kill(p);
        wait_gone(p, server);
        // The write at the export's start is at 4 MiB in the image.
        let o = run(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "read -P 3 4M 64k",
                "-c",
                "read -P 1 0 1M",
                s(&img),
            ],
        );
        assert!(!text(&o).contains("fail"), "{server}: {}", text(&o));
        seen.push((map.stdout, size.stdout));
    }
    assert_eq!(seen[0], seen[1]);
    assert_eq!(String::from_utf8_lossy(&seen[1].1).trim(), "62914560");
    assert!(String::from_utf8_lossy(&seen[1].0).contains("hole,zero"));
    for args in [
        &[
            "-f",
            "qcow2",
            "--offset",
            "0x8000000",
            "-k",
            s(&sock),
            s(&base),
        ][..],
        &["-o", "12z", s(&base)],
        &["-L", "-o", "5", "-k", s(&sock)],
    ] {
        let theirs = run("qemu-nbd", args);
        let mut ours_args = vec!["serve"];
        ours_args.extend_from_slice(args);
        let ours = run(QIMG, &ours_args);
        assert_eq!(ours.status.code(), theirs.status.code(), "{args:?}");
        assert_eq!(
            text(&ours).replacen("qimg:", "qemu-nbd:", 1),
            text(&theirs),
            "{args:?}"
        );
    }
}
