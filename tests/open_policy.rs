//! What an image may make qimg open, and what a raw image's user may turn it into.
//!
//! An image is untrusted: a guest writes its raw disk, and whoever reads it next as an image
//! file must not find a qcow2 header there naming a host file as backing file. QEMU's rules:
//! the format is given, not guessed; where it was guessed as raw, writes that would change what
//! the first sector probes as are refused (EPERM). And an embedder decides which backing files
//! an image may name.

mod common;

use common::*;
use qimg::block::{open_image, FilePolicy, Format, OpenOptions};
use qimg::{Error, IoBuf, IoBufMut};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

const QIMG: &str = env!("CARGO_BIN_EXE_qimg");

/// A qcow2 header (v3, 64 KiB clusters, 1 MiB) naming `backing` as its backing file.
fn hostile_header(backing: &str) -> Vec<u8> {
    let mut h = vec![0u8; 512];
    h[0..4].copy_from_slice(b"QFI\xfb");
    h[4..8].copy_from_slice(&3u32.to_be_bytes());
    h[8..16].copy_from_slice(&200u64.to_be_bytes()); // backing file name offset
    h[16..20].copy_from_slice(&(backing.len() as u32).to_be_bytes());
    h[20..24].copy_from_slice(&16u32.to_be_bytes());
    h[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes());
    h[200..200 + backing.len()].copy_from_slice(backing.as_bytes());
    h
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

#[test]
fn a_probed_raw_image_refuses_to_become_qcow2() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("guest.raw");
    std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
    rt().block_on(async {
        let probed = OpenOptions {
            probe: true,
            ..Default::default()
        };
        let img = open_image(&p, &probed).await.unwrap();
        assert_eq!(img.format(), Format::Raw);
        // The whole header at once, and the magic written byte by byte after a harmless
        // first sector: both refused.
        let e = img
            .write(0, IoBuf::copy_from(&hostile_header("/etc/hostname")))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::NotPermitted(_)), "{e}");
        assert_eq!(e.errno(), 1);
        let mut h = hostile_header("/etc/hostname");
        h[0] = 0;
        img.write(0, IoBuf::copy_from(&h)).await.unwrap();
        let e = img.write(0, IoBuf::copy_from(b"Q")).await.unwrap_err();
        assert!(matches!(e, Error::NotPermitted(_)), "{e}");
        // Ordinary data in the first sector and anywhere else is fine.
        img.write(0, IoBuf::copy_from(&[0xab; 4096])).await.unwrap();
        img.write(512, IoBuf::copy_from(b"QFI\xfb")).await.unwrap();
        img.close().await.unwrap();

        // Given explicitly as raw, the first sector is the guest's to write.
        let given = OpenOptions {
            format: Some(Format::Raw),
            ..Default::default()
        };
        let img = open_image(&p, &given).await.unwrap();
        img.write(0, IoBuf::copy_from(b"QFI\xfb")).await.unwrap();
        let b = img.read(0, IoBufMut::zeroed(4)).await.unwrap();
        assert_eq!(&b[..], b"QFI\xfb");
        img.close().await.unwrap();
    });
}

#[test]
fn the_library_does_not_guess_formats_unless_asked() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.qcow2");
    qemu_create(&p, "", 1 << 20, &[]);
    rt().block_on(async {
        let e = match open_image(&p, &OpenOptions::default()).await {
            Ok(_) => panic!("an image opened without a format or leave to probe"),
            Err(e) => e,
        };
        assert!(e.to_string().contains("format was not specified"), "{e}");
    });
}

/// `qimg serve guest.raw` (probed): an NBD client writing a qcow2 header that names a host file
/// into block 0 is refused with EPERM, and the file stays a raw image.
#[test]
fn an_nbd_client_cannot_turn_a_probed_raw_export_into_qcow2() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("guest.raw");
    std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
    let hdr = dir.path().join("hdr.bin");
    std::fs::write(&hdr, hostile_header("/etc/hostname")).unwrap();
    let mut child = Command::new(QIMG)
        .args(["serve", "-t", "--bind", "127.0.0.1:0", p.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let uri = line.trim().to_string();
    assert!(
        uri.starts_with("nbd://"),
        "qimg serve did not start: {line}"
    );
    let o = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            &format!("write -s {} 0 512", hdr.display()),
            &uri,
        ],
    );
    let t = text(&o);
    assert!(t.contains("Operation not permitted"), "{t}");
    let o = run("qemu-io", &["-f", "raw", "-c", "write -P 7 0 4096", &uri]);
    assert!(
        o.status.success() && !text(&o).contains("failed"),
        "{}",
        text(&o)
    );
    let _ = child.kill();
    let _ = child.wait();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(err.contains("probing guessed raw"), "no warning: {err}");
    let o = run("qemu-img", &["info", "--output=json", p.to_str().unwrap()]);
    assert!(text(&o).contains("\"format\": \"raw\""), "{}", text(&o));
    assert_eq!(std::fs::read(&p).unwrap()[..4096], [7u8; 4096]);
}

fn chain(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let sub = dir.join("images");
    std::fs::create_dir_all(&sub).unwrap();
    let base = dir.join("outside.raw");
    std::fs::write(&base, vec![5u8; 1 << 20]).unwrap();
    let top = sub.join("top.qcow2");
    qemu_create(
        &top,
        "",
        1 << 20,
        &["-b", base.to_str().unwrap(), "-F", "raw"],
    );
    (top, sub)
}

#[test]
fn the_open_policy_decides_which_backing_files_an_image_may_open() {
    let dir = tempfile::tempdir().unwrap();
    let (top, sub) = chain(dir.path());
    let open = |policy: FilePolicy| {
        let top = top.clone();
        async move {
            let opts = OpenOptions {
                format: Some(Format::Qcow2),
                read_only: true,
                policy,
                ..Default::default()
            };
            open_image(&top, &opts).await
        }
    };
    let refused = |r: qimg::Result<std::sync::Arc<dyn qimg::block::BlockDevice>>| match r {
        Ok(_) => panic!("opened against the policy"),
        Err(e) => {
            assert!(matches!(e, Error::NotPermitted(_)), "{e}");
            e.to_string()
        }
    };
    rt().block_on(async {
        // The default is QEMU's: the backing file opens.
        let img = open(FilePolicy::default()).await.unwrap();
        let b = img.read(0, IoBufMut::zeroed(512)).await.unwrap();
        assert_eq!(b[0], 5);
        img.close().await.unwrap();

        let e = refused(
            open(FilePolicy {
                backing: false,
                ..Default::default()
            })
            .await,
        );
        assert!(e.contains("outside.raw"), "{e}");
        let e = refused(
            open(FilePolicy {
                allowed_dirs: Some(vec![sub.clone()]),
                ..Default::default()
            })
            .await,
        );
        assert!(e.contains("outside the allowed directories"), "{e}");
        refused(
            open(FilePolicy {
                allowed_formats: Some(vec![Format::Qcow2]),
                ..Default::default()
            })
            .await,
        );
        // Inside an allowed directory it opens.
        let img = open(FilePolicy {
            allowed_dirs: Some(vec![dir.path().to_path_buf()]),
            ..Default::default()
        })
        .await
        .unwrap();
        img.close().await.unwrap();
    });

    // A backing file that names a further file, and one whose format is not named.
    let mid = sub.join("mid.qcow2");
    qemu_create(
        &mid,
        "",
        1 << 20,
        &["-b", top.to_str().unwrap(), "-F", "qcow2"],
    );
    // QEMU no longer makes images without a backing format: hide the format extension's
    // magic (an unknown extension is skipped), as an old or hostile image would have it.
    let unnamed = sub.join("unnamed.qcow2");
    qemu_create(
        &unnamed,
        "",
        1 << 20,
        &["-b", top.to_str().unwrap(), "-F", "qcow2"],
    );
    let mut bytes = std::fs::read(&unnamed).unwrap();
    let at = bytes[..4096]
        .windows(4)
        .position(|w| w == [0xe2, 0x79, 0x2a, 0xca])
        .expect("backing format extension");
    bytes[at..at + 4].copy_from_slice(&[0x0b, 0xad, 0xf0, 0x0d]);
    std::fs::write(&unnamed, bytes).unwrap();
    rt().block_on(async {
        let open = |p: std::path::PathBuf, policy: FilePolicy| async move {
            let opts = OpenOptions {
                format: Some(Format::Qcow2),
                read_only: true,
                policy,
                ..Default::default()
            };
            open_image(&p, &opts).await
        };
        let e = refused(
            open(
                mid.clone(),
                FilePolicy {
                    nested_backing: false,
                    ..Default::default()
                },
            )
            .await,
        );
        assert!(e.contains("may not have a backing file"), "{e}");
        let e = refused(
            open(
                unnamed.clone(),
                FilePolicy {
                    probe_backing: false,
                    ..Default::default()
                },
            )
            .await,
        );
        assert!(e.contains("probing is not allowed"), "{e}");
        open(mid, FilePolicy::default())
            .await
            .unwrap()
            .close()
            .await
            .unwrap();
    });
}
