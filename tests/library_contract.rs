//! The library's contract with an embedder: opening works on any tokio runtime (timers or not)
//! or fails with an error elsewhere, never a panic; a closed handle refuses every request.

mod common;

use common::*;
use qimg::block::{open_image, Format, OpenOptions};
use qimg::{IoBuf, IoBufMut};
use std::path::Path;

fn opts() -> OpenOptions {
    OpenOptions {
        format: Some(Format::Qcow2),
        ..Default::default()
    }
}

async fn write_read_close(p: &Path) {
    let img = open_image(p, &opts()).await.expect("open");
    img.write(0, IoBuf::copy_from(&[3u8; 4096])).await.unwrap();
    img.flush().await.unwrap();
    let b = img.read(0, IoBufMut::zeroed(4096)).await.unwrap();
    assert!(b.iter().all(|&x| x == 3));
    img.close().await.unwrap();
}

#[test]
fn opening_outside_a_tokio_runtime_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.qcow2");
    qemu_create(&p, "", 1 << 20, &[]);
    let r = futures_util::FutureExt::now_or_never(open_image(&p, &opts()));
    let err = match r {
        Some(Err(e)) => e.to_string(),
        Some(Ok(_)) => panic!("opened outside a tokio runtime"),
        None => panic!("open did not fail at once outside a runtime"),
    };
    assert!(err.contains("tokio runtime"), "{err}");
}

#[test]
fn a_runtime_without_timers_is_enough() {
    // A panic in a background task would not fail the requests: count panics anywhere.
    static PANICS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        default(info);
    }));
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.qcow2");
    qemu_create(&p, "", 1 << 20, &[]);
    for multi in [false, true] {
        let rt = if multi {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .build()
        } else {
            tokio::runtime::Builder::new_current_thread().build()
        }
        .unwrap();
        rt.block_on(write_read_close(&p));
        drop(rt);
    }
    assert_eq!(
        PANICS.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "something panicked"
    );
    qemu_check_clean(&p);
}

#[test]
fn a_closed_handle_refuses_requests() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.qcow2");
    qemu_create(&p, "", 1 << 20, &[]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let img = open_image(&p, &opts()).await.unwrap();
        img.write(0, IoBuf::copy_from(&[1u8; 512])).await.unwrap();
        img.close().await.unwrap();
        let errs = [
            img.write(0, IoBuf::copy_from(&[2u8; 512])).await.err(),
            img.read(0, IoBufMut::zeroed(512)).await.err(),
            img.flush().await.err(),
            img.write_zeroes(0, 512, Default::default()).await.err(),
            img.discard(0, 65536).await.err(),
        ];
        for (i, e) in errs.iter().enumerate() {
            let e = e
                .as_ref()
                .unwrap_or_else(|| panic!("request {i} accepted after close"));
            assert_eq!(e.errno(), 9, "request {i}: {e}");
        }
    });
    // The write after close never happened.
    let out = qemu_io(&p, "qcow2", &["read -P 1 0 512".into()]);
    assert!(!out.contains("verification failed"), "{out}");
}
