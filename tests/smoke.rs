use qimg::block::{open_image, BlockDevice, OpenOptions};
use qimg::qcow2::{create, CreateOptions};
use qimg::storage::file::{FileOptions, FileStorage};
use qimg::{IoBuf, IoBufMut};
use std::process::Command;
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_write_read_check() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.qcow2");
    let s = Arc::new(FileStorage::create(&p, FileOptions::default()).unwrap());
    create(s, &CreateOptions { size: 1 << 30, ..Default::default() }).await.unwrap();
    let out = Command::new("qemu-img").arg("check").arg(&p).output().unwrap();
    println!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success());
    let img = open_image(&p, &OpenOptions::default()).await.unwrap();
    img.write(4096, IoBuf::copy_from(&[0xab; 8192])).await.unwrap();
    img.write(1 << 29, IoBuf::copy_from(&[0xcd; 65536 * 3])).await.unwrap();
    let b = img.read(0, IoBufMut::zeroed(16384)).await.unwrap();
    assert!(b[..4096].iter().all(|&x| x == 0));
    assert!(b[4096..12288].iter().all(|&x| x == 0xab));
    img.close().await.unwrap();
    let out = Command::new("qemu-img").arg("check").arg(&p).output().unwrap();
    println!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success());
    let out = Command::new("qemu-io").args(["-c", "read -P 0xab 4096 8192", "-c", "read -P 0xcd 536870912 196608", "-c", "read -P 0 0 4096"]).arg(&p).output().unwrap();
    let so = String::from_utf8_lossy(&out.stdout);
    println!("{so}");
    assert!(!so.contains("fail"));
}
