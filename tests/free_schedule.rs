//! Frees are applied on a bounded schedule, not only at a guest flush: a guest that rewrites and
//! discards without ever flushing keeps its image bounded.

mod common;

use common::*;
use qimg::block::{open_image, Format, OpenOptions};
use qimg::{IoBuf, IoBufMut};

#[test]
fn discards_without_flushes_do_not_grow_the_image_without_bound() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.qcow2");
    qemu_create(&p, "", 64 << 20, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let rounds = 300u64;
    rt.block_on(async {
        let opts = OpenOptions {
            format: Some(Format::Qcow2),
            ..Default::default()
        };
        let img = open_image(&p, &opts).await.unwrap();
        for i in 0..rounds {
            let data = pattern(i, 1 << 20);
            img.write(0, IoBuf::copy_from(&data)).await.unwrap();
            let back = img.read(0, IoBufMut::zeroed(1 << 20)).await.unwrap();
            assert!(back[..] == data[..], "round {i}: read back differs");
            img.discard(0, 1 << 20).await.unwrap();
        }
        // Give the scheduler a moment for the last batch, then look at the file before any
        // flush of ours.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let len = std::fs::metadata(&p).unwrap().len();
        assert!(
            len < 96 << 20,
            "{rounds} MiB written and discarded without a flush left a {len}-byte file"
        );
        img.close().await.unwrap();
    });
    qemu_check_clean(&p);
}
