//! `qimg serve --tls-creds` with X.509 credentials in QEMU's layout, against QEMU's and libnbd's
//! TLS clients (qemu-io, qemu-img, nbdinfo), and what a client without TLS or without a
//! certificate gets: refused, never served in clear.
//!
//! Needs qemu-img, qemu-io (qemu-utils), nbdinfo (libnbd-bin) and openssl.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

const QIMG: &str = env!("CARGO_BIN_EXE_qimg");

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Makes a test CA in `d`, server credentials in `d/srv` and client credentials in `d/cli`
/// (QEMU's layouts).
fn make_certs(d: &Path) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/make-tls-certs.sh");
    std::fs::create_dir(d.join("srv")).unwrap();
    std::fs::create_dir(d.join("cli")).unwrap();
    let o = Command::new("bash")
        .arg(script)
        .current_dir(d)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
}

/// A server started with `--fork --pid-file`, stopped when dropped.
struct Forked(std::path::PathBuf);

impl Forked {
    /// Starts `program` (qemu-nbd, or qimg as `qimg serve`) with `args`.
    fn start(program: &str, args: &[&str], pid: &Path) -> Forked {
        let _ = std::fs::remove_file(pid);
        let mut all: Vec<&str> = if program == QIMG {
            vec!["serve"]
        } else {
            vec![]
        };
        all.extend_from_slice(args);
        all.extend_from_slice(&["--fork", "--pid-file", s(pid)]);
        let o = run(program, &all);
        assert!(o.status.success(), "{program} {all:?}: {}", text(&o));
        Forked(pid.to_path_buf())
    }
}

impl Drop for Forked {
    fn drop(&mut self) {
        if let Ok(p) = std::fs::read_to_string(&self.0) {
            let _ = Command::new("kill").arg(p.trim()).status();
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
}

#[test]
fn tls_clients_are_served_and_plain_ones_refused() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let img = dir.path().join("d.qcow2");
    qemu_create(&img, "", 64 << 20, &[]);
    let port = free_port().to_string();
    let pid = dir.path().join("pid");
    let object = format!(
        "tls-creds-x509,id=tls0,endpoint=server,dir={}",
        dir.path().join("srv").display()
    );
    let o = run(
        QIMG,
        &[
            "serve",
            "-f",
            "qcow2",
            "-t",
            "--object",
            &object,
            "--tls-creds",
            "tls0",
            "-b",
            "127.0.0.1",
            "-p",
            &port,
            "--fork",
            "--pid-file",
            s(&pid),
            s(&img),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let client = format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        dir.path().join("cli").display()
    );
    let opts = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},tls-creds=tls0"
    );
    let o = run(
        "qemu-io",
        &[
            "--object",
            &client,
            "--image-opts",
            &opts,
            "-c",
            "write -P 0x42 1M 64k",
            "-c",
            "read -P 0x42 1M 64k",
        ],
    );
    assert!(
        o.status.success() && !text(&o).contains("fail"),
        "{}",
        text(&o)
    );
    let o = run(
        "qemu-img",
        &["info", "--object", &client, "--image-opts", &opts],
    );
    assert!(text(&o).contains("virtual size: 64 MiB"), "{}", text(&o));
    let uri = format!(
        "nbds://127.0.0.1:{port}/?tls-certificates={}",
        dir.path().join("cli").display()
    );
    let o = run("nbdinfo", &[&uri]);
    assert!(text(&o).contains("with TLS"), "{}", text(&o));
    // Without TLS: refused before anything about the export is said.
    let o = run("qemu-img", &["info", &format!("nbd://127.0.0.1:{port}")]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("TLS negotiation required"),
        "{}",
        text(&o)
    );
    let o = run(QIMG, &["info", &format!("nbd://127.0.0.1:{port}")]);
    assert!(!o.status.success(), "{}", text(&o));
    // TLS without a client certificate: the server verifies peers (QEMU's default).
    let nocert = dir.path().join("nocert");
    std::fs::create_dir(&nocert).unwrap();
    std::fs::copy(
        dir.path().join("cli/ca-cert.pem"),
        nocert.join("ca-cert.pem"),
    )
    .unwrap();
    let o = run(
        "nbdinfo",
        &[&format!(
            "nbds://127.0.0.1:{port}/?tls-certificates={}",
            nocert.display()
        )],
    );
    assert!(!o.status.success(), "{}", text(&o));
    let p = std::fs::read_to_string(&pid).unwrap();
    let _ = Command::new("kill").arg(p.trim()).status();
    // The data written over TLS is in the image.
    std::thread::sleep(std::time::Duration::from_millis(300));
    qemu_io(&img, "qcow2", &["read -P 0x42 1M 64k".into()]);
    // Option errors, worded as qemu-nbd's.
    for (args, msg) in [
        (
            vec!["--tls-creds", "nope"],
            "Failed to get TLS creds: No TLS credentials with id 'nope'",
        ),
        (
            vec!["--object", &client, "--tls-creds", "tls0"],
            "Failed to get TLS creds: Expected TLS credentials for a server endpoint",
        ),
        (
            vec!["--object", "secret,id=s0,data=x", "--tls-creds", "s0"],
            "Failed to get TLS creds: Object with id 's0' is not TLS credentials",
        ),
        (
            vec!["--object", "memory-backend-ram,id=m0"],
            "not supported",
        ),
    ] {
        let mut a = vec!["serve", "-f", "qcow2"];
        a.extend(args);
        a.push(s(&img));
        let o = run(QIMG, &a);
        assert!(
            !o.status.success() && text(&o).contains(msg),
            "{a:?}: {}",
            text(&o)
        );
    }
}

/// Makes a client certificate with `subject` (openssl's `-subj` syntax) signed by the test CA in
/// `dir`, in a new directory `dir/name` with the CA certificate (QEMU's client layout).
fn client_cert(dir: &Path, name: &str, subject: &str, extra: &[&str]) -> std::path::PathBuf {
    let out = dir.join(name);
    std::fs::create_dir(&out).unwrap();
    let key = out.join("client-key.pem");
    let csr = dir.join(format!("{name}.csr"));
    let o = Command::new("openssl")
        .args([
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            s(&key),
            "-out",
            s(&csr),
        ])
        .args(["-subj", subject])
        .args(extra)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let o = Command::new("openssl")
        .args([
            "x509",
            "-req",
            "-in",
            s(&csr),
            "-CA",
            "ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
        ])
        .args([
            "-CAcreateserial",
            "-days",
            "3650",
            "-extfile",
            "cli.ext",
            "-out",
        ])
        .arg(out.join("client-cert.pem"))
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    std::fs::copy(dir.join("ca-cert.pem"), out.join("ca-cert.pem")).unwrap();
    out
}

/// Starts `program` (qimg serve or qemu-nbd) in the background with TLS and `authz` (an
/// `--object` of an authorization type with id a0), runs `qemu-img info` as a TLS client with
/// the credentials in `cli`, stops the server; returns whether the client got in.
fn authz_admits(dir: &Path, program: &str, authz: &str, cli: &Path) -> bool {
    let img = dir.join("a.qcow2");
    if !img.exists() {
        qemu_create(&img, "", 1 << 20, &[]);
    }
    let port = free_port().to_string();
    let pid = dir.join("authz.pid");
    let _ = std::fs::remove_file(&pid);
    let creds = format!(
        "tls-creds-x509,id=tls0,endpoint=server,dir={}",
        dir.join("srv").display()
    );
    let mut args: Vec<&str> = if program == QIMG {
        vec!["serve"]
    } else {
        vec![]
    };
    args.extend_from_slice(&[
        "-t",
        "-f",
        "qcow2",
        "--object",
        &creds,
        "--object",
        authz,
        "--tls-creds",
        "tls0",
        "--tls-authz",
        "a0",
        "-b",
        "127.0.0.1",
        "-p",
        &port,
        "--fork",
        "--pid-file",
        s(&pid),
        s(&img),
    ]);
    let o = run(program, &args);
    assert!(o.status.success(), "{program}: {}", text(&o));
    let client = format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        cli.display()
    );
    let opts = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},tls-creds=tls0"
    );
    let o = run(
        "qemu-img",
        &["info", "--object", &client, "--image-opts", &opts],
    );
    let p = std::fs::read_to_string(&pid).unwrap();
    let _ = Command::new("kill").arg(p.trim()).status();
    // Gone, or a zombie waiting for init to reap it (it holds no lock any more).
    let stat = format!("/proc/{}/stat", p.trim());
    for _ in 0..250 {
        match std::fs::read_to_string(&stat) {
            Ok(st)
                if !st
                    .rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z')) =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            _ => break,
        }
    }
    o.status.success()
}

/// `--tls-authz`: the identities qimg computes from client certificates are the ones qemu-nbd
/// computes (each expected name is checked against qemu-nbd first), and qimg admits and refuses
/// exactly as qemu-nbd does with `authz-simple`, `authz-list` (exact and glob rules) and
/// `authz-listfile`.
#[test]
fn tls_authz_admits_whom_qemu_nbd_admits() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_certs(d);
    let cases: [(&str, &[&str], &str); 4] = [
        (
            "/C=GB/ST=London/O=Example Org, Ltd/CN=client one",
            &[],
            "C=GB,ST=London,O=Example Org\\, Ltd,CN=client one",
        ),
        (
            "/CN= lead /OU=#hash/emailAddress=a@b.c/DC=example/UID=u1",
            &[],
            "CN=\\ lead\\ ,OU=\\#hash,EMAIL=a@b.c,DC=example,UID=u1",
        ),
        (
            "/O=X+CN=y/OU=a;b<c>d\"e\\\\f=g",
            &["-multivalue-rdn"],
            "CN=y+O=X,OU=a\\;b\\<c\\>d\\\"e\\\\f=g",
        ),
        (
            "/CN=Zoë/title=T/GN=G/SN=S/serialNumber=7",
            &["-utf8"],
            "CN=Zoë,title=T,givenName=G,surName=S,serialNumber=7",
        ),
    ];
    // QEMU's option syntax doubles commas inside a value.
    let simple = |id: &str| format!("authz-simple,id=a0,identity={}", id.replace(',', ",,"));
    for (i, (subject, extra, name)) in cases.iter().enumerate() {
        let cli = client_cert(d, &format!("c{i}"), subject, extra);
        for program in ["qemu-nbd", QIMG] {
            assert!(
                authz_admits(d, program, &simple(name), &cli),
                "{program} refused {name}"
            );
            let other = simple(&format!("{name}x"));
            assert!(
                !authz_admits(d, program, &other, &cli),
                "{program} admitted {name}x"
            );
        }
    }
    let cli = d.join("cli"); // CN=client
    let list_file = d.join("authz.json");
    std::fs::write(
        &list_file,
        r#"{"policy": "deny", "rules": [{"match": "CN=cl*", "policy": "allow", "format": "glob"}]}"#,
    )
    .unwrap();
    let objects = [
        ("authz-list,id=a0,policy=deny,rules.0.match=CN=cl*,rules.0.policy=allow,rules.0.format=glob", true),
        ("authz-list,id=a0,policy=allow,rules.0.match=CN=client,rules.0.policy=deny", false),
        ("authz-list,id=a0,policy=deny,rules.0.match=CN=cl*,rules.0.policy=allow", false),
    ];
    for (object, admitted) in &objects {
        for program in ["qemu-nbd", QIMG] {
            assert_eq!(
                authz_admits(d, program, object, &cli),
                *admitted,
                "{program} {object}"
            );
        }
    }
    // authz-listfile (QEMU's build here has none): the file is read again for each client
    // unless refresh=off.
    for refresh in ["on", "off"] {
        let allow = r#"{"policy": "deny", "rules": [{"match": "CN=cl*", "policy": "allow", "format": "glob"}]}"#;
        std::fs::write(&list_file, allow).unwrap();
        let object = format!(
            "authz-listfile,id=a0,filename={},refresh={refresh}",
            list_file.display()
        );
        assert!(authz_admits(d, QIMG, &object, &cli), "{object}");
    }
    // Refusals at start, with qemu-nbd's words where it has them.
    let img = d.join("a.qcow2");
    let creds = format!(
        "tls-creds-x509,id=tls0,endpoint=server,dir={}",
        d.join("srv").display()
    );
    let nopeer = format!("{creds},verify-peer=off");
    for (args, msg) in [
        (
            vec!["--tls-authz", "a0"],
            "--tls-authz is not permitted without --tls-creds",
        ),
        (
            vec![
                "--object",
                &creds,
                "--tls-creds",
                "tls0",
                "--tls-authz",
                "a0",
            ],
            "No authorization object with id 'a0'",
        ),
        (
            vec![
                "--object",
                &nopeer,
                "--object",
                "authz-simple,id=a0,identity=x",
                "--tls-creds",
                "tls0",
                "--tls-authz",
                "a0",
            ],
            "verify-peer",
        ),
        (
            vec!["--object", "authz-pam,id=a0,service=x"],
            "not supported",
        ),
    ] {
        let mut a = vec!["serve", "-f", "qcow2"];
        a.extend(args);
        a.push(s(&img));
        let o = run(QIMG, &a);
        assert!(
            !o.status.success() && text(&o).contains(msg),
            "{a:?}: {}",
            text(&o)
        );
    }
}

/// `serve --list` over TLS, as `qemu-nbd --list`: the same listing from a TLS server (qemu-nbd or
/// qimg), client credentials in QEMU's layout; QEMU's refusals of server credentials and of
/// `--tls-authz` in list mode.
#[test]
fn list_over_tls_like_qemu_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_certs(d);
    let img = d.join("l.qcow2");
    qemu_create(&img, "", 3 << 20, &[]);
    let server_creds = format!(
        "tls-creds-x509,id=tls0,endpoint=server,dir={}",
        d.join("srv").display()
    );
    let client_creds = format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        d.join("cli").display()
    );
    for server in ["qemu-nbd", QIMG] {
        let port = free_port().to_string();
        let pid = d.join("l.pid");
        let _ = std::fs::remove_file(&pid);
        let mut args: Vec<&str> = if server == QIMG {
            vec!["serve"]
        } else {
            vec![]
        };
        args.extend_from_slice(&[
            "-t",
            "-f",
            "qcow2",
            "-x",
            "disk",
            "-D",
            "a disk",
            "--object",
            &server_creds,
            "--tls-creds",
            "tls0",
            "-b",
            "127.0.0.1",
            "-p",
            &port,
            "--fork",
            "--pid-file",
            s(&pid),
            s(&img),
        ]);
        let o = run(server, &args);
        assert!(o.status.success(), "{server}: {}", text(&o));
        let list = |tool: &str, tls: bool| {
            let mut args: Vec<&str> = if tool == QIMG { vec!["serve"] } else { vec![] };
            args.extend_from_slice(&["-L", "-b", "127.0.0.1", "-p", &port]);
            if tls {
                args.extend_from_slice(&["--object", &client_creds, "--tls-creds", "tls0"]);
            }
            run(tool, &args)
        };
        let theirs = list("qemu-nbd", true);
        let ours = list(QIMG, true);
        assert!(theirs.status.success(), "{}", text(&theirs));
        assert!(ours.status.success(), "{}", text(&ours));
        assert_eq!(ours.stdout, theirs.stdout, "server {server}");
        assert!(String::from_utf8_lossy(&ours.stdout).contains("export: 'disk'"));
        // Without TLS the server says nothing about its exports.
        let plain = list(QIMG, false);
        assert!(!plain.status.success(), "{}", text(&plain));
        let p = std::fs::read_to_string(&pid).unwrap();
        let _ = Command::new("kill").arg(p.trim()).status();
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    for (extra, msg) in [
        (
            vec!["--object", &server_creds, "--tls-creds", "tls0"],
            "Failed to get TLS creds: Expected TLS credentials for a client endpoint",
        ),
        (
            vec![
                "--object",
                &client_creds,
                "--tls-creds",
                "tls0",
                "--tls-authz",
                "a0",
            ],
            "TLS authorization is incompatible with export list",
        ),
    ] {
        let mut args = vec!["serve", "-L", "-b", "127.0.0.1", "-p", "1"];
        args.extend(extra);
        let o = run(QIMG, &args);
        assert!(
            !o.status.success() && text(&o).contains(msg),
            "{args:?}: {}",
            text(&o)
        );
    }
}

/// qimg's tools as TLS clients of NBD servers (`--object tls-creds-x509,endpoint=client` and
/// `driver=nbd,...,tls-creds=ID`), next to qemu-img against the same qemu-nbd and qimg TLS
/// servers: the same output, exit code and messages, successes and refusals alike (wrong host
/// name, unknown authority, no host name on a unix socket, no TLS on either side, wrong
/// objects). Data written over TLS by `qimg io` is read back by qemu-io and `qimg convert`.
#[test]
fn qimg_tools_are_tls_clients_like_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_certs(d);
    // A second authority, which the servers' certificates do not chain to.
    std::fs::create_dir(d.join("other")).unwrap();
    make_certs(&d.join("other"));
    let img = d.join("t.qcow2");
    qemu_create(&img, "", 64 << 20, &[]);
    // The servers do not check client certificates here: the clients' own checks are the
    // subject, and a server that drops a client whose certificate it refuses races the
    // client's report of the server's certificate (a rustls server refuses during the
    // handshake, a GnuTLS one after it).
    let server_creds = format!(
        "tls-creds-x509,id=tls0,endpoint=server,dir={},verify-peer=off",
        d.join("srv").display()
    );
    let client = |dir: &str| {
        format!(
            "tls-creds-x509,id=tls0,endpoint=client,dir={}",
            d.join(dir).display()
        )
    };
    let sock = d.join("nbd.sock");
    for server in ["qemu-nbd", QIMG] {
        let port = free_port().to_string();
        let tcp = Forked::start(
            server,
            &[
                "-t",
                "-f",
                "qcow2",
                "--object",
                &server_creds,
                "--tls-creds",
                "tls0",
                "-b",
                "127.0.0.1",
                "-p",
                &port,
                "--shared",
                "4",
                s(&img),
            ],
            &d.join("tcp.pid"),
        );
        // Both tools, the same command; the outputs must agree.
        let same = |args: &[&str], ok: bool| {
            let ours = run_as_qemu_img(args);
            let theirs = run("qemu-img", args);
            assert_eq!(
                (ours.status.code(), text(&ours)),
                (theirs.status.code(), text(&theirs)),
                "{server}: {args:?}"
            );
            assert_eq!(
                ours.status.success(),
                ok,
                "{server}: {args:?}: {}",
                text(&ours)
            );
        };
        let tcp_opts =
            |extra: &str| format!("driver=nbd,host=127.0.0.1,port={port},tls-creds=tls0{extra}");
        let cli = client("cli");
        for (creds, opts, ok) in [
            (cli.clone(), tcp_opts(""), true),
            (
                cli.clone(),
                format!("driver=nbd,host=localhost,port={port},tls-creds=tls0"),
                true,
            ),
            (cli.clone(), tcp_opts(",tls-hostname=localhost"), true),
            (cli.clone(), tcp_opts(",tls-hostname=elsewhere"), false),
            (client("other/cli"), tcp_opts(""), false),
            (server_creds.clone(), tcp_opts(""), false),
            ("secret,id=tls0,data=x".into(), tcp_opts(""), false),
            (cli.clone(), tcp_opts("").replace("tls0", "tls1"), false),
        ] {
            same(&["info", "--object", &creds, "--image-opts", &opts], ok);
        }
        // No TLS on the client's side.
        same(&["info", &format!("nbd://127.0.0.1:{port}")], false);
        // I/O over TLS: qimg io writes, qemu-io and qimg convert read.
        let opts = tcp_opts("");
        let o = run(
            QIMG,
            &[
                "io",
                "--object",
                &cli,
                "--image-opts",
                &opts,
                "-c",
                "write -P 0x5a 1M 192k",
            ],
        );
        assert!(o.status.success(), "{}", text(&o));
        let o = run(
            "qemu-io",
            &[
                "--object",
                &cli,
                "--image-opts",
                &opts,
                "-c",
                "read -P 0x5a 1M 192k",
            ],
        );
        assert!(
            o.status.success() && !text(&o).contains("fail"),
            "{}",
            text(&o)
        );
        let raw = d.join("copy.raw");
        let o = run(
            QIMG,
            &[
                "convert",
                "--object",
                &cli,
                "--image-opts",
                &opts,
                "-O",
                "raw",
                s(&raw),
            ],
        );
        assert!(o.status.success(), "{}", text(&o));
        // The server holds the image open: compare through a forced share.
        let o = run(
            "qemu-img",
            &[
                "compare",
                "-U",
                "-f",
                "raw",
                "-F",
                "qcow2",
                s(&raw),
                s(&img),
            ],
        );
        assert!(o.status.success(), "{}", text(&o));
        drop(tcp);
        // A unix socket: a certificate cannot be checked without a host name.
        let unix = Forked::start(
            server,
            &[
                "-t",
                "-f",
                "qcow2",
                "--object",
                &server_creds,
                "--tls-creds",
                "tls0",
                "-k",
                s(&sock),
                s(&img),
            ],
            &d.join("unix.pid"),
        );
        let unix_opts = format!("driver=nbd,path={},tls-creds=tls0", sock.display());
        same(
            &["info", "--object", &cli, "--image-opts", &unix_opts],
            false,
        );
        let named = format!("{unix_opts},tls-hostname=localhost");
        same(&["info", "--object", &cli, "--image-opts", &named], true);
        drop(unix);
    }
    // A TLS client of a server without TLS.
    for server in ["qemu-nbd", QIMG] {
        let port = free_port().to_string();
        let _plain = Forked::start(
            server,
            &["-t", "-f", "qcow2", "-b", "127.0.0.1", "-p", &port, s(&img)],
            &d.join("plain.pid"),
        );
        let opts = format!("driver=nbd,host=127.0.0.1,port={port},tls-creds=tls0");
        let args = ["info", "--object", &client("cli"), "--image-opts", &opts];
        let ours = run_as_qemu_img(&args);
        let theirs = run("qemu-img", &args);
        assert_eq!(text(&ours), text(&theirs), "{server}");
        assert!(!ours.status.success());
    }
    // Credentials that cannot be read are reported when the object is defined.
    let missing = "tls-creds-x509,id=tls0,endpoint=client,dir=/nonexistent";
    let args = [
        "info",
        "--object",
        missing,
        "--image-opts",
        "driver=nbd,host=x,tls-creds=tls0",
    ];
    let ours = run_as_qemu_img(&args);
    let theirs = run("qemu-img", &args);
    assert_eq!(text(&ours), text(&theirs));
    assert_eq!(ours.status.code(), theirs.status.code());
}

/// qimg run with `argv[0]` = `qemu-img`, so that its messages carry qemu-img's prefix.
fn run_as_qemu_img(args: &[&str]) -> std::process::Output {
    run_named(QIMG, "qemu-img", args)
}
