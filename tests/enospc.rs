//! A real full disk: a small tmpfs that the test mounts (it needs root, as CI has). Where the
//! mount is refused the tests fail and say why; `QIMG_SKIP_MOUNT_TESTS=1` skips them, loudly.
//!
//! What a full disk must leave behind: the request that meets ENOSPC fails with it (no panic),
//! and the image, copied off the full file system, passes `qemu-img check` without corruption
//! with every write acknowledged by a successful flush intact.

mod common;

use common::*;
use qimg::block::{open_image, Format, OpenOptions};
use qimg::{IoBuf, IoBufMut};
use std::path::PathBuf;
use std::process::Command;

const QIMG: &str = env!("CARGO_BIN_EXE_qimg");

/// A mounted tmpfs of `size` bytes, unmounted on drop.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(size: u64) -> Option<SmallFs> {
        let dir = tempfile::tempdir().unwrap();
        let o = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output();
        let err = match o {
            Ok(o) if o.status.success() => return Some(SmallFs { dir }),
            Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
            Err(e) => e.to_string(),
        };
        if std::env::var("QIMG_SKIP_MOUNT_TESTS").as_deref() == Ok("1") {
            eprintln!("SKIPPED (QIMG_SKIP_MOUNT_TESTS=1): cannot mount a tmpfs: {err}");
            return None;
        }
        panic!(
            "cannot mount a small tmpfs for the ENOSPC tests ({err}); run as root, or set \
             QIMG_SKIP_MOUNT_TESTS=1 to skip them knowingly"
        );
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

fn is_enospc(e: &qimg::Error) -> bool {
    e.errno() == 28
}

/// Writes 256 KiB chunks into a 64 MiB image on a 4 MiB file system, flushing after every
/// fourth, until the disk is full; then checks what is on disk.
#[test]
fn full_disk_fails_requests_and_keeps_flushed_writes() {
    let Some(fs) = SmallFs::mount(4 << 20) else {
        return;
    };
    let img_path = fs.path("full.qcow2");
    let o = run(
        QIMG,
        &["create", "-f", "qcow2", img_path.to_str().unwrap(), "64M"],
    );
    assert!(o.status.success(), "{}", text(&o));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    const CHUNK: usize = 256 << 10;
    let (flushed, saw_enospc) = rt.block_on(async {
        let opts = OpenOptions {
            format: Some(Format::Qcow2),
            ..Default::default()
        };
        let img = open_image(&img_path, &opts).await.expect("open");
        let mut flushed = 0usize; // chunks acknowledged by a successful flush
        let mut saw_enospc = false;
        for i in 0..64 {
            let r = img
                .write(
                    (i * CHUNK) as u64,
                    IoBuf::copy_from(&pattern(i as u64, CHUNK)),
                )
                .await;
            let written = i + 1;
            match r {
                Ok(()) => {}
                Err(e) => {
                    assert!(is_enospc(&e), "write {i}: {e}");
                    saw_enospc = true;
                    break;
                }
            }
            if written % 4 == 0 {
                match img.flush().await {
                    Ok(()) => flushed = written,
                    Err(e) => {
                        assert!(is_enospc(&e), "flush after write {i}: {e}");
                        saw_enospc = true;
                        break;
                    }
                }
            }
        }
        // After the failure: more requests fail cleanly, close may fail; nothing panics.
        let _ = img.write(0, IoBuf::copy_from(&[9u8; 4096])).await;
        let _ = img.flush().await;
        let _ = img.close().await;
        (flushed, saw_enospc)
    });
    assert!(
        saw_enospc,
        "a 64 MiB write stream never filled a 4 MiB file system"
    );
    assert!(flushed > 0, "nothing was flushed before the disk was full");
    // Reopen on good storage: a copy off the full file system.
    let good = tempfile::tempdir().unwrap();
    let copy = good.path().join("copy.qcow2");
    std::fs::copy(&img_path, &copy).unwrap();
    let (code, corruptions, _leaks, out) = qemu_check(&copy);
    assert!(
        corruptions == 0 && (code == 0 || code == 3),
        "qemu-img check rc={code}:\n{out}"
    );
    let data = rt.block_on(async {
        let opts = OpenOptions {
            format: Some(Format::Qcow2),
            read_only: true,
            ..Default::default()
        };
        let img = open_image(&copy, &opts).await.unwrap();
        let d = img
            .read(0, IoBufMut::zeroed(flushed * CHUNK))
            .await
            .unwrap();
        img.close().await.unwrap();
        d
    });
    for i in 0..flushed {
        // Chunk 0 may hold the 4 KiB written after the failure if that write succeeded.
        let skip = if i == 0 { 4096 } else { 0 };
        assert!(
            data[i * CHUNK + skip..(i + 1) * CHUNK] == pattern(i as u64, CHUNK)[skip..],
            "flushed chunk {i} does not read back"
        );
    }
}

/// The command line on a full disk: a clear error, no panic, and the source untouched.
#[test]
fn convert_onto_a_full_disk_reports_enospc() {
    let Some(fs) = SmallFs::mount(2 << 20) else {
        return;
    };
    let src_dir = tempfile::tempdir().unwrap();
    let src = src_dir.path().join("src.raw");
    std::fs::write(&src, pattern(7, 8 << 20)).unwrap();
    for fmt in ["qcow2", "raw"] {
        let dst = fs.path(&format!("dst.{fmt}"));
        let o = run(
            QIMG,
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                fmt,
                src.to_str().unwrap(),
                dst.to_str().unwrap(),
            ],
        );
        let t = text(&o);
        assert_eq!(o.status.code(), Some(1), "{fmt}: {t}");
        assert!(t.contains("No space left on device"), "{fmt}: {t}");
        assert!(!t.contains("panicked"), "{fmt}: {t}");
        let _ = std::fs::remove_file(&dst);
    }
}
