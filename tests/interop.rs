//! Interoperability with QEMU, both ways:
//! - images created and written by qemu-img/qemu-io (all cluster sizes, refcount widths, v2/v3,
//!   compressed with zlib and zstd, backing chains, internal snapshots) read back byte-exact by
//!   qimg;
//! - images created and written by qimg read back byte-exact by qemu-io and pass qemu-img check;
//! - writing with qimg to an image with internal snapshots keeps the snapshots intact (QEMU can
//!   still revert to them).

mod common;

use common::*;
use qimg::block::{open_image, BlockDevice, Format, OpenOptions, ZeroFlags};
use qimg::{IoBuf, IoBufMut};
use std::path::Path;
use std::sync::Arc;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn qcow2_opts() -> OpenOptions {
    OpenOptions {
        format: Some(Format::Qcow2),
        ..Default::default()
    }
}

async fn read_all(p: &Path) -> Vec<u8> {
    let img = open_image(
        p,
        &OpenOptions {
            read_only: true,
            probe: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let d = img
        .read(0, IoBufMut::zeroed(img.size() as usize))
        .await
        .unwrap();
    img.close().await.unwrap();
    d.to_vec()
}

/// Applies qemu-io style operations to a model of the disk.
fn apply(model: &mut [u8], cmds: &[String], cs: u64, v3: bool) {
    for c in cmds {
        let w: Vec<&str> = c.split(' ').collect();
        let num = |s: &str| qimg::size::parse_size(s).unwrap();
        match w[0] {
            "write" if w[1] == "-P" => {
                let p = u8::from_str_radix(w[2].trim_start_matches("0x"), 16).unwrap();
                let (o, l) = (num(w[3]) as usize, num(w[4]) as usize);
                model[o..o + l].fill(p);
            }
            "write" if w[1] == "-z" => {
                let i = if w[2] == "-u" { 3 } else { 2 };
                let (o, l) = (num(w[i]) as usize, num(w[i + 1]) as usize);
                model[o..o + l].fill(0);
            }
            "discard" => {
                let (o, l) = (num(w[1]), num(w[2]));
                let a = o.next_multiple_of(cs);
                let b = (o + l) / cs * cs;
                if a < b && v3 {
                    model[a as usize..b as usize].fill(0);
                }
            }
            _ => panic!("unknown command {c}"),
        }
    }
}

fn workload(cs: u64, size: u64) -> Vec<String> {
    let mut cmds = Vec::new();
    let mut r = fastrand::Rng::with_seed(cs ^ size);
    for i in 0..25 {
        let off = r.u64(0..size - 1) / 512 * 512;
        let len = (r.u64(1..=(3 * cs).min(size - off)) / 512).max(1) * 512;
        let len = len.min(size - off);
        match i % 6 {
            0..=3 => cmds.push(format!("write -P 0x{:x} {off} {len}", r.u8(1..=255))),
            4 => cmds.push(format!(
                "write -z {}{off} {len}",
                if r.bool() { "-u " } else { "" }
            )),
            _ => cmds.push(format!("discard {off} {len}")),
        }
    }
    cmds
}

#[test]
fn qemu_written_images_read_back_exactly() {
    let rt = rt();
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(u64, u32, &str)] = &[
        (512, 16, "1.1"),
        (512, 1, "1.1"),
        (4096, 64, "1.1"),
        (4096, 16, "0.10"),
        (65536, 16, "1.1"),
        (65536, 2, "1.1"),
        (65536, 16, "0.10"),
        (2 << 20, 8, "1.1"),
        (2 << 20, 32, "1.1"),
    ];
    for &(cs, rb, compat) in cases {
        let p = dir.path().join(format!("q{cs}_{rb}_{compat}.qcow2"));
        let size = (cs * 40).max(8 << 20);
        qemu_create(
            &p,
            &format!("cluster_size={cs},refcount_bits={rb},compat={compat}"),
            size,
            &[],
        );
        let cmds = workload(cs, size);
        qemu_io(&p, "qcow2", &cmds);
        let mut model = vec![0u8; size as usize];
        apply(&mut model, &cmds, cs, compat == "1.1");
        let got = rt.block_on(read_all(&p));
        assert!(
            got == model,
            "cluster {cs} refcount {rb} compat {compat}: content differs"
        );
    }
}

#[test]
fn compressed_images_from_qemu_convert() {
    let rt = rt();
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    // Zeros, random data, text, and repeated patterns.
    let mut data = vec![0u8; 6 << 20];
    data[1 << 20..2 << 20].copy_from_slice(&pattern(5, 1 << 20));
    for (i, b) in data[3 << 20..4 << 20].iter_mut().enumerate() {
        *b = b"the quick brown fox jumps over the lazy dog\n"[i % 44];
    }
    data[5 << 20..].fill(0x5a);
    std::fs::write(&raw, &data).unwrap();
    for (ctype, cs) in [
        ("zlib", 65536u64),
        ("zstd", 65536),
        ("zlib", 4096),
        ("zstd", 2 << 20),
        ("zlib", 512),
    ] {
        let p = dir.path().join(format!("c_{ctype}_{cs}.qcow2"));
        let o = run(
            "qemu-img",
            &[
                "convert",
                "-c",
                "-O",
                "qcow2",
                "-o",
                &format!("compression_type={ctype},cluster_size={cs}"),
                raw.to_str().unwrap(),
                p.to_str().unwrap(),
            ],
        );
        assert!(o.status.success(), "{}", text(&o));
        let got = rt.block_on(read_all(&p));
        assert!(got == data, "{ctype} {cs}: decompressed content differs");
        // Overwrite part of a compressed cluster and discard another: qimg must free the
        // compressed space correctly and QEMU must agree on the result.
        let bin = env!("CARGO_BIN_EXE_qimg");
        let o = run(
            bin,
            &[
                "io",
                "-c",
                "write -P 0x11 1049000 5000",
                "-c",
                "discard 2097152 2097152",
                "-c",
                "write -z 5242880 4096",
                p.to_str().unwrap(),
            ],
        );
        assert!(o.status.success(), "{}", text(&o));
        qemu_check_clean(&p);
        let mut model = data.clone();
        model[1049000..1054000].fill(0x11);
        model[2 << 20..4 << 20].fill(0);
        model[5 << 20..(5 << 20) + 4096].fill(0);
        let expect = dir.path().join("expect.raw");
        std::fs::write(&expect, &model).unwrap();
        qemu_compare_raw(&p, &expect);
    }
}

#[test]
fn backing_chains_both_ways() {
    let rt = rt();
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n);
    let size = 16u64 << 20;
    // raw <- qcow2 (4k clusters) <- qcow2 (64k clusters), relative names.
    std::fs::write(d("base.raw"), pattern(1, size as usize / 2)).unwrap();
    qemu_create(
        &d("mid.qcow2"),
        "cluster_size=4096",
        size,
        &["-F", "raw", "-b", "base.raw"],
    );
    qemu_io(
        &d("mid.qcow2"),
        "qcow2",
        &["write -P 0x22 1M 100k".into(), "write -z 3M 64k".into()],
    );
    qemu_create(
        &d("top.qcow2"),
        "",
        size,
        &["-F", "qcow2", "-b", "mid.qcow2"],
    );
    qemu_io(
        &d("top.qcow2"),
        "qcow2",
        &["write -P 0x33 1050k 10k".into(), "discard 0 128k".into()],
    );
    let mut model = vec![0u8; size as usize];
    model[..size as usize / 2].copy_from_slice(&pattern(1, size as usize / 2));
    model[1 << 20..(1 << 20) + 102400].fill(0x22);
    model[3 << 20..(3 << 20) + 65536].fill(0);
    model[1050 * 1024..1060 * 1024].fill(0x33);
    model[..128 << 10].fill(0);
    assert!(
        rt.block_on(read_all(&d("top.qcow2"))) == model,
        "chain read differs"
    );

    // qimg writes through the chain (COW from both lower layers); QEMU reads it back.
    rt.block_on(async {
        let img = open_image(&d("top.qcow2"), &qcow2_opts()).await.unwrap();
        img.write(1 << 20, IoBuf::copy_from(&[0x44; 3000]))
            .await
            .unwrap();
        img.write((6 << 20) + 7, IoBuf::copy_from(&[0x55; 70000]))
            .await
            .unwrap();
        img.write_zeroes(2 << 20, 65536, ZeroFlags::default())
            .await
            .unwrap();
        img.close().await.unwrap();
    });
    model[1 << 20..(1 << 20) + 3000].fill(0x44);
    model[(6 << 20) + 7..(6 << 20) + 7 + 70000].fill(0x55);
    model[2 << 20..(2 << 20) + 65536].fill(0);
    qemu_check_clean(&d("top.qcow2"));
    std::fs::write(d("expect.raw"), &model).unwrap();
    qemu_compare_raw(&d("top.qcow2"), &d("expect.raw"));
    // The lower layers were not touched.
    qemu_check_clean(&d("mid.qcow2"));
}

#[test]
fn qimg_written_images_read_back_by_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_qimg");
    for (cs, rb, compat, prealloc) in [
        (512u64, 16u32, "1.1", "off"),
        (4096, 1, "1.1", "metadata"),
        (65536, 16, "0.10", "off"),
        (65536, 64, "1.1", "falloc"),
        (2 << 20, 16, "1.1", "full"),
    ] {
        let p = dir.path().join(format!("w{cs}.qcow2"));
        let size = 24u64 << 20;
        let o = run(
            bin,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!(
                    "cluster_size={cs},refcount_bits={rb},compat={compat},preallocation={prealloc}"
                ),
                p.to_str().unwrap(),
                &size.to_string(),
            ],
        );
        assert!(o.status.success(), "{}", text(&o));
        qemu_check_clean(&p);
        let cmds = workload(cs, size);
        let mut args = vec!["io".to_string()];
        for c in &cmds {
            args.push("-c".into());
            args.push(c.clone());
        }
        args.push(p.to_str().unwrap().into());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = run(bin, &args);
        assert!(o.status.success(), "{}", text(&o));
        qemu_check_clean(&p);
        let mut model = vec![0u8; size as usize];
        apply(&mut model, &cmds, cs, compat == "1.1");
        let raw = dir.path().join("m.raw");
        std::fs::write(&raw, &model).unwrap();
        qemu_compare_raw(&p, &raw);
        // And qemu-io's own pattern checks on a few ranges.
        let writes: Vec<String> = cmds
            .iter()
            .filter(|c| c.starts_with("write -P"))
            .rev()
            .take(1)
            .map(|c| c.replacen("write", "read", 1))
            .collect();
        qemu_io(&p, "qcow2", &writes);
    }
}

#[test]
fn writing_images_with_internal_snapshots_keeps_snapshots() {
    let rt = rt();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.qcow2");
    let size = 8u64 << 20;
    qemu_create(&p, "cluster_size=65536", size, &[]);
    qemu_io(
        &p,
        "qcow2",
        &["write -P 0x1 0 1M".into(), "write -P 0x2 2M 300k".into()],
    );
    let o = run(
        "qemu-img",
        &["snapshot", "-c", "snap1", p.to_str().unwrap()],
    );
    assert!(o.status.success());
    // qimg overwrites shared clusters (partially and fully), zeroes and discards some.
    rt.block_on(async {
        let img: Arc<dyn BlockDevice> = open_image(&p, &qcow2_opts()).await.unwrap();
        img.write(4096, IoBuf::copy_from(&[0x9; 5000]))
            .await
            .unwrap();
        img.write(512 << 10, IoBuf::copy_from(&[0x8; 128 << 10]))
            .await
            .unwrap();
        img.write_zeroes(2 << 20, 65536, ZeroFlags::default())
            .await
            .unwrap();
        img.discard((2 << 20) + 65536, 65536).await.unwrap();
        img.close().await.unwrap();
    });
    qemu_check_clean(&p);
    let mut now = vec![0u8; size as usize];
    now[..1 << 20].fill(1);
    now[2 << 20..(2 << 20) + 300 * 1024].fill(2);
    let snap = now.clone();
    now[4096..4096 + 5000].fill(9);
    now[512 << 10..640 << 10].fill(8);
    now[2 << 20..(2 << 20) + 131072].fill(0);
    assert!(rt.block_on(read_all(&p)) == now, "current state differs");
    // Reverting to the snapshot with QEMU restores the old content exactly.
    let o = run(
        "qemu-img",
        &["snapshot", "-a", "snap1", p.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", text(&o));
    qemu_check_clean(&p);
    assert!(
        rt.block_on(read_all(&p)) == snap,
        "snapshot content was damaged"
    );
}

/// Both I/O engines (the thread pool, and io_uring where the kernel allows it) give the same
/// results; the thread pool is what runs where io_uring is refused.
#[test]
fn both_io_engines_write_and_read_the_same() {
    use qimg::block::{Aio, CacheMode};
    let rt = rt();
    let dir = tempfile::tempdir().unwrap();
    for (aio, cache) in [
        (Aio::Threads, CacheMode::Writeback),
        (Aio::Threads, CacheMode::None),
        (Aio::IoUring, CacheMode::Writeback),
        (Aio::IoUring, CacheMode::None),
    ] {
        let p = dir.path().join(format!("e_{aio:?}_{cache:?}.qcow2"));
        qemu_create(&p, "", 16 << 20, &[]);
        let opts = OpenOptions {
            aio,
            cache,
            ..qcow2_opts()
        };
        let r = rt.block_on(async {
            let img = match open_image(&p, &opts).await {
                Ok(i) => i,
                // io_uring unavailable here, or O_DIRECT unsupported by the file system: said
                // loudly, and a failure where CI requires io_uring (`QIMG_REQUIRE_URING=1`).
                Err(e @ (qimg::Error::Unsupported(_) | qimg::Error::Io { .. })) => {
                    assert!(
                        !(aio == Aio::IoUring
                            && std::env::var("QIMG_REQUIRE_URING").as_deref() == Ok("1")),
                        "{aio:?} {cache:?}: {e}, but QIMG_REQUIRE_URING=1"
                    );
                    eprintln!("SKIPPED: {aio:?} {cache:?} NOT tested here: {e}");
                    return None;
                }
                Err(e) => panic!("{aio:?} {cache:?}: {e}"),
            };
            for i in 0..64u64 {
                let data = pattern(i, 4096 + (i as usize % 3) * 1000);
                img.write(i * 200_000, IoBuf::copy_from(&data))
                    .await
                    .unwrap();
            }
            img.flush().await.unwrap();
            for i in 0..64u64 {
                let data = pattern(i, 4096 + (i as usize % 3) * 1000);
                let got = img
                    .read(i * 200_000, IoBufMut::zeroed(data.len()))
                    .await
                    .unwrap();
                assert!(got[..] == data[..], "{aio:?} {cache:?}: read back differs");
            }
            img.close().await.unwrap();
            Some(())
        });
        if r.is_some() {
            qemu_check_clean(&p);
            let writes: Vec<String> = (0..64u64)
                .step_by(9)
                .map(|i| format!("read {} {}", i * 200_000, 4096 + (i % 3) * 1000))
                .collect();
            qemu_io(&p, "qcow2", &writes);
        }
    }
}

/// A discard on a v2 image over a backing file keeps the guest's data, as QEMU does (iotest
/// 290): v2 has no ZERO flag, so dropping the cluster would show the backing file's data.
#[test]
fn v2_discard_over_a_backing_file_keeps_the_guests_data() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    qemu_create(&base, "", 1 << 20, &[]);
    qemu_io(&base, "qcow2", &["write -P 0xff 0 1M".into()]);
    for (name, tool) in [("qimg.qcow2", "qimg"), ("qemu.qcow2", "qemu-io")] {
        let top = dir.path().join(name);
        qemu_create(
            &top,
            "compat=0.10",
            1 << 20,
            &["-b", base.to_str().unwrap(), "-F", "qcow2"],
        );
        qemu_io(&top, "qcow2", &["write -P 1 0 256k".into()]);
        if tool == "qimg" {
            rt().block_on(async {
                let img = open_image(&top, &qcow2_opts()).await.unwrap();
                img.discard(0, 256 << 10).await.unwrap();
                let b = img.read(0, IoBufMut::zeroed(256 << 10)).await.unwrap();
                assert!(
                    b.iter().all(|&x| x == 1),
                    "discard exposed the backing file"
                );
                img.close().await.unwrap();
            });
        } else {
            qemu_io(&top, "qcow2", &["discard 0 256k".into()]);
        }
        qemu_io(&top, "qcow2", &["read -P 1 0 256k".into()]);
        qemu_check_clean(&top);
    }
}

/// Zeros written over a range that reads as zeros only because the backing file ends before it
/// (a partial cluster: no ZERO flag possible) are written into the overlay, as QEMU writes them
/// (iotest 154): they stay zeros when the backing file grows later, and both tools leave the
/// same map.
#[test]
fn zeros_past_a_short_backing_file_do_not_depend_on_it() {
    let dir = tempfile::tempdir().unwrap();
    let k = 128u64 << 10;
    let mut maps = Vec::new();
    for tool in ["qimg", "qemu-io"] {
        let base = dir.path().join(format!("{tool}.base"));
        let top = dir.path().join(format!("{tool}.qcow2"));
        qemu_create(&base, "cluster_size=512", k + 1024, &[]);
        qemu_create(
            &top,
            "cluster_size=4k",
            k + 2048,
            &["-b", base.to_str().unwrap(), "-F", "qcow2"],
        );
        qemu_io(&base, "qcow2", &[format!("write -P 1 {k} 512")]);
        let zero = vec![format!("write -z {} 512", k + 1024)];
        if tool == "qimg" {
            qimg_io(&top, &zero);
        } else {
            qemu_io(&top, "qcow2", &zero);
        }
        let o = run("qemu-img", &["map", "--output=json", top.to_str().unwrap()]);
        assert!(o.status.success(), "{}", text(&o));
        maps.push(String::from_utf8_lossy(&o.stdout).replace(|c: char| c.is_ascii_digit(), "#"));
        // The backing file grows and gets data where the overlay was zeroed.
        let o = run(
            "qemu-img",
            &["resize", "-q", base.to_str().unwrap(), "256k"],
        );
        assert!(o.status.success(), "{}", text(&o));
        qemu_io(&base, "qcow2", &[format!("write -P 2 {} 2048", k + 1024)]);
        qemu_io(
            &top,
            "qcow2",
            &[
                format!("read -P 1 {k} 512"),
                format!("read -P 0 {} 512", k + 512),
                format!("read -P 0 {} 512", k + 1024),
            ],
        );
        qemu_check_clean(&top);
    }
    assert_eq!(maps[0], maps[1], "qimg's map differs from QEMU's");
}
