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

#[test]
fn tls_clients_are_served_and_plain_ones_refused() {
    let dir = tempfile::tempdir().unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/make-tls-certs.sh");
    std::fs::create_dir(dir.path().join("srv")).unwrap();
    std::fs::create_dir(dir.path().join("cli")).unwrap();
    let o = Command::new("bash")
        .arg(script)
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
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
            "No TLS credentials with id 'nope'",
        ),
        (
            vec!["--object", &client, "--tls-creds", "tls0"],
            "Expecting TLS credentials with a server endpoint",
        ),
        (vec!["--object", "secret,id=s0,data=x"], "not supported"),
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
