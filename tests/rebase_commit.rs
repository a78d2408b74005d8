//! `rebase` and `commit` against qemu-img: the same chain is built twice with QEMU's tools,
//! one copy gets `qemu-img CMD`, the other `qimg CMD`, and then everything a user can see must
//! agree: output and exit code, every image's allocation map (host offsets aside), every
//! image's backing file, every image's content, and `qemu-img check`. The guest's view of the
//! image must also be what it was before (rebase) or land in the base (commit).

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const QIMG: &str = env!("CARGO_BIN_EXE_qimg");

/// One image of a chain: name, size, create options, backing (name, format), qemu-io commands.
#[derive(Debug)]
struct Layer {
    name: &'static str,
    size: u64,
    opts: &'static str,
    backing: Option<(&'static str, &'static str)>,
    io: Vec<String>,
}

fn layer(name: &'static str, size: u64, backing: Option<&'static str>, io: &[&str]) -> Layer {
    Layer {
        name,
        size,
        opts: "",
        backing: backing.map(|b| (b, "qcow2")),
        io: io.iter().map(|s| s.to_string()).collect(),
    }
}

fn build(dir: &Path, layers: &[Layer]) {
    for l in layers {
        let path = dir.join(l.name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        let mut extra = Vec::new();
        if let Some((b, f)) = l.backing {
            extra = vec!["-b", b, "-F", f];
        }
        qemu_create(&path, l.opts, l.size, &extra);
        if !l.io.is_empty() {
            qemu_io(&path, "qcow2", &l.io);
        }
    }
}

/// What a user can see of the images after a command.
#[derive(Debug, PartialEq)]
struct Seen {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    images: Vec<ImageSeen>,
}

#[derive(Debug, PartialEq)]
struct ImageSeen {
    name: String,
    map: String,
    backing: String,
    content: Vec<u8>,
    check: String,
}

fn guest_view(path: &Path) -> Vec<u8> {
    let raw = path.with_extension("view.raw");
    let o = run(
        "qemu-img",
        &[
            "convert",
            "-U",
            "-O",
            "raw",
            path.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    assert!(
        o.status.success(),
        "convert {}: {}",
        path.display(),
        text(&o)
    );
    let data = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    data
}

/// `qemu-img map --output=json` without host offsets, adjacent extents of the same kind
/// merged: allocation order (and so where host runs break) may differ between the two tools.
/// One representation differs on purpose: where qemu-img compresses a cluster of zeros, qimg
/// writes a zero cluster (smaller, and read the same); compressed extents that read as zeros
/// (`content`) are shown as zero clusters.
fn map_without_offsets(path: &Path, content: &[u8]) -> String {
    let o = run(
        "qemu-img",
        &["map", "-U", "--output=json", path.to_str().unwrap()],
    );
    assert!(o.status.success(), "map: {}", text(&o));
    let extents: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).expect("map JSON");
    let kind = |e: &serde_json::Value| {
        ["depth", "present", "zero", "data", "compressed"].map(|k| e[k].to_string())
    };
    let info = run(
        "qemu-img",
        &["info", "-U", "--output=json", path.to_str().unwrap()],
    );
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("info JSON");
    let cs = info["cluster-size"].as_u64().unwrap_or(65536);
    let mut merged: Vec<(u64, u64, [String; 5])> = Vec::new();
    let mut push = |start: u64, len: u64, k: [String; 5]| match merged.last_mut() {
        Some(last) if last.2 == k && last.0 + last.1 == start => last.1 += len,
        _ => merged.push((start, len, k)),
    };
    for e in &extents {
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        let mut k = kind(e);
        if e["data"] == true {
            // Whether a data cluster also reads as zeros comes from holes in the host file:
            // where one tool writes zeros and the other leaves a hole. Not the format's business.
            k[2] = "false".into();
        }
        if e["compressed"] != true {
            push(start, len, k);
            continue;
        }
        // Compressed: cluster by cluster, those that read as zeros shown as zero clusters.
        let mut at = start;
        while at < start + len {
            let end = ((at / cs + 1) * cs).min(start + len);
            let zeros = content[at as usize..end as usize].iter().all(|&b| b == 0);
            let kk = if zeros {
                [
                    k[0].clone(),
                    "true".into(),
                    "true".into(),
                    "false".into(),
                    "false".into(),
                ]
            } else {
                k.clone()
            };
            push(at, end - at, kk);
            at = end;
        }
    }
    merged
        .iter()
        .map(|(start, len, k)| format!("{start}+{len} {}", k.join(" ")))
        .collect::<Vec<_>>()
        .join("\n")
}

fn backing_lines(path: &Path) -> String {
    let o = run("qemu-img", &["info", "-U", path.to_str().unwrap()]);
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| l.starts_with("backing file") || l.starts_with("virtual size"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn observe(dir: &Path, names: &[&str], o: &Output) -> Seen {
    let norm = |b: &[u8]| {
        String::from_utf8_lossy(b)
            .replace(dir.to_str().unwrap(), "DIR")
            .replace("qemu-img: ", "PROG: ")
            .replace("qimg: ", "PROG: ")
            .replace("Try 'qemu-img ", "Try 'PROG ")
            .replace("Try 'qimg ", "Try 'PROG ")
    };
    let images = names
        .iter()
        .map(|n| {
            let p = dir.join(n);
            let (code, corruptions, _leaks, out) = qemu_check(&p);
            assert_eq!(corruptions, 0, "{n}: {out}");
            let content = guest_view(&p);
            ImageSeen {
                name: n.to_string(),
                map: map_without_offsets(&p, &content),
                backing: backing_lines(&p).replace(dir.to_str().unwrap(), "DIR"),
                content,
                check: format!("{code}"),
            }
        })
        .collect();
    Seen {
        code: o.status.code(),
        stdout: norm(&o.stdout),
        stderr: norm(&o.stderr),
        images,
    }
}

fn run_in(dir: &Path, prog: &str, args: &[&str]) -> Output {
    Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"))
}

/// Builds the chain twice, runs the command with both tools, compares what is seen.
/// Returns what qimg left (and the directory it is in) for further checks.
fn differential(
    tag: &str,
    layers: &[Layer],
    args: &[&str],
    observe_names: &[&str],
) -> (Seen, PathBuf, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let (qd, md) = (tmp.path().join("qemu"), tmp.path().join("qimg"));
    for d in [&qd, &md] {
        std::fs::create_dir_all(d).unwrap();
        build(d, layers);
    }
    let qo = run_in(&qd, "qemu-img", args);
    let mo = run_in(&md, QIMG, args);
    let q = observe(&qd, observe_names, &qo);
    let m = observe(&md, observe_names, &mo);
    assert_eq!(
        (&m.code, &m.stdout, &m.stderr),
        (&q.code, &q.stdout, &q.stderr),
        "{tag}: output differs for {args:?}"
    );
    // One refusal differs on purpose: without -F, qemu-img copies the data and only then
    // fails to record the new backing file; qimg refuses before writing anything.
    let refused_late = args.contains(&"-b") && !args.contains(&"-F") && !args.contains(&"-u");
    for (mi, qi) in m.images.iter().zip(&q.images) {
        if !(refused_late && args[0] == "rebase" && mi.name == "top.qcow2") {
            assert_eq!(mi.map, qi.map, "{tag}: map of {} differs", mi.name);
        }
        assert_eq!(mi.backing, qi.backing, "{tag}: backing of {}", mi.name);
        assert!(mi.content == qi.content, "{tag}: content of {}", mi.name);
        assert_eq!(mi.check, qi.check, "{tag}: check of {}", mi.name);
    }
    (m, md, tmp)
}

const K: u64 = 1024;
const M: u64 = 1024 * 1024;

/// base (1 MiB) <- top (1 MiB) and a new base (512 KiB) that agrees in part.
fn rebase_chain() -> Vec<Layer> {
    vec![
        layer(
            "base.qcow2",
            M,
            None,
            &[
                "write -P 1 0 64k",
                "write -P 5 512k 64k",
                "write -P 7 900k 4k",
            ],
        ),
        layer(
            "new.qcow2",
            512 * K,
            None,
            &[
                "write -P 1 0 64k",
                "write -P 2 128k 64k",
                "write -P 3 300k 8k",
            ],
        ),
        layer("top.qcow2", M, Some("base.qcow2"), &["write -P 9 128k 4k"]),
    ]
}

fn rebase_case(tag: &str, layers: Vec<Layer>, args: &[&str]) {
    // The guest's view before, from a throwaway build.
    let tmp = tempfile::tempdir().unwrap();
    build(tmp.path(), &layers);
    let top_name = layers.last().unwrap().name;
    let before = guest_view(&tmp.path().join(top_name));
    let names: Vec<&str> = layers.iter().map(|l| l.name).collect();
    let (seen, _, _keep) = differential(tag, &layers, args, &names);
    let top = seen.images.iter().find(|i| i.name == top_name);
    if seen.code == Some(0) {
        assert!(
            top.unwrap().content == before,
            "{tag}: the guest's view changed"
        );
    }
}

#[test]
fn safe_rebase_onto_a_different_backing_file() {
    rebase_case(
        "safe",
        rebase_chain(),
        &["rebase", "-b", "new.qcow2", "-F", "qcow2", "top.qcow2"],
    );
}

#[test]
fn rebase_flattens_with_an_empty_backing_name() {
    rebase_case(
        "flatten",
        rebase_chain(),
        &["rebase", "-b", "", "top.qcow2"],
    );
}

#[test]
fn compressed_rebase_writes_compressed_clusters() {
    rebase_case(
        "compressed",
        rebase_chain(),
        &["rebase", "-c", "-b", "", "top.qcow2"],
    );
    rebase_case(
        "compressed-new",
        rebase_chain(),
        &[
            "rebase",
            "-c",
            "-b",
            "new.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
}

#[test]
fn rebase_copies_whole_clusters_of_the_overlay() {
    // Overlay clusters of 128 KiB over backing files of 64 KiB (iotest 024's last case), and
    // 4 KiB clusters over 64 KiB ones.
    for (tag, top_opts) in [("big", "cluster_size=128k"), ("small", "cluster_size=4k")] {
        let mut l = vec![
            layer("new.qcow2", 384 * K, None, &[]),
            layer(
                "base.qcow2",
                384 * K,
                Some("new.qcow2"),
                &["write -P 0x11 64k 64k", "write -P 0x22 256k 64k"],
            ),
            layer("top.qcow2", 384 * K, Some("base.qcow2"), &[]),
        ];
        l[2].opts = top_opts;
        rebase_case(
            tag,
            l,
            &["rebase", "-b", "new.qcow2", "-F", "qcow2", "top.qcow2"],
        );
    }
}

#[test]
fn rebase_of_an_image_without_backing_file_writes_zero_clusters() {
    // iotest 252: what the new backing file adds must read as zeros, stored as zero clusters.
    let l = vec![
        layer(
            "new.qcow2",
            384 * K,
            None,
            &[
                "write -P 0x11 0 64k",
                "write -P 0x11 128k 64k",
                "write -P 0x11 256k 64k",
            ],
        ),
        layer(
            "top.qcow2",
            384 * K,
            None,
            &["write -P 0x22 0 128k", "write -P 0x11 128k 128k"],
        ),
    ];
    rebase_case(
        "no-old",
        l,
        &["rebase", "-b", "new.qcow2", "-F", "qcow2", "top.qcow2"],
    );
}

#[test]
fn rebase_onto_a_shorter_and_a_longer_backing_file() {
    let l = vec![
        layer("base.qcow2", 256 * K, None, &["write -P 3 0 256k"]),
        layer("new.qcow2", 2 * M, None, &["write -P 4 128k 1M"]),
        layer("top.qcow2", M, Some("base.qcow2"), &["write -P 9 900k 64k"]),
    ];
    rebase_case(
        "sizes",
        l,
        &["rebase", "-b", "new.qcow2", "-F", "qcow2", "top.qcow2"],
    );
}

#[test]
fn rebase_of_a_v2_image() {
    let mut l = rebase_chain();
    l[2].opts = "compat=0.10";
    rebase_case(
        "v2",
        l,
        &["rebase", "-b", "new.qcow2", "-F", "qcow2", "top.qcow2"],
    );
    let mut l = rebase_chain();
    l[2].opts = "compat=0.10";
    rebase_case("v2-flatten", l, &["rebase", "-b", "", "top.qcow2"]);
}

#[test]
fn rebase_within_the_chain_and_in_a_subdirectory() {
    // The new backing file is the old one's own backing file.
    let l = vec![
        layer("new.qcow2", 5 * 64 * K, None, &["write -P 0x11 0 320k"]),
        layer(
            "base.qcow2",
            4 * 64 * K,
            Some("new.qcow2"),
            &["write -P 0x22 0 256k"],
        ),
        layer("top.qcow2", 5 * 64 * K, Some("base.qcow2"), &[]),
    ];
    rebase_case(
        "in-chain",
        l,
        &["rebase", "-b", "new.qcow2", "-F", "qcow2", "top.qcow2"],
    );
    // Relative names are relative to the image, not to the working directory.
    let l = vec![
        layer("sub/base.qcow2", M, None, &["write -P 0x11 0 128k"]),
        layer("sub/new.qcow2", M, None, &["write -P 0x22 64k 128k"]),
        layer("sub/top.qcow2", M, Some("base.qcow2"), &[]),
    ];
    rebase_case(
        "subdir",
        l,
        &["rebase", "-b", "new.qcow2", "-F", "qcow2", "sub/top.qcow2"],
    );
}

#[test]
fn unsafe_rebase_changes_the_header_only() {
    let (seen, dir, _keep) = differential(
        "unsafe",
        &rebase_chain(),
        &[
            "rebase",
            "-u",
            "-b",
            "new.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
        &["top.qcow2"],
    );
    assert_eq!(seen.code, Some(0));
    assert!(seen.images[0].backing.contains("backing file: new.qcow2"));
    // -u without -b drops the backing file; any QEMU driver name is recorded as given.
    differential(
        "unsafe2",
        &rebase_chain(),
        &["rebase", "-u", "top.qcow2"],
        &["top.qcow2"],
    );
    // A backing file that does not exist: only the header can be looked at.
    let (_, dir2, keep) = differential(
        "unsafe3",
        &rebase_chain(),
        &[
            "rebase",
            "-u",
            "-b",
            "/x/y",
            "-F",
            "host_device",
            "top.qcow2",
        ],
        &[],
    );
    let ours = backing_lines(&dir2.join("top.qcow2"));
    assert!(ours.contains("backing file: /x/y"), "{ours}");
    assert_eq!(ours, backing_lines(&keep.path().join("qemu/top.qcow2")));
    drop(dir);
}

#[test]
fn rebase_refuses_as_qemu_img_does() {
    let cases: &[&[&str]] = &[
        &["rebase", "top.qcow2"],
        &["rebase"],
        &[
            "rebase",
            "-b",
            "new.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "extra",
        ],
        &["rebase", "-b", "new.qcow2", "top.qcow2"],
        &["rebase", "-u", "-b", "new.qcow2", "top.qcow2"],
        &["rebase", "-b", "new.qcow2", "-F", "bogus", "top.qcow2"],
        &["rebase", "-b", "nonexist", "-F", "qcow2", "top.qcow2"],
        &[
            "rebase",
            "-b",
            "new.qcow2",
            "-F",
            "qcow2",
            "-t",
            "bogus",
            "top.qcow2",
        ],
        &[
            "rebase",
            "-b",
            "new.qcow2",
            "-F",
            "qcow2",
            "-f",
            "raw",
            "top.qcow2",
        ],
        &["rebase", "-c", "-f", "raw", "-b", "", "top.qcow2"],
        &["rebase", "-b", "top.qcow2", "-F", "qcow2", "top.qcow2"],
        &["rebase", "-b", "new.qcow2", "-F", "qcow2", "missing.qcow2"],
    ];
    for args in cases {
        let (seen, _, _keep) = differential(
            &format!("refusal {args:?}"),
            &rebase_chain(),
            args,
            &["top.qcow2", "base.qcow2", "new.qcow2"],
        );
        assert_ne!(seen.code, Some(0), "{args:?} succeeded");
    }
}

/// base (1 MiB) <- mid (1 MiB) <- top (2 MiB) with data, zeros and zero-data in each.
fn commit_chain(opts: &'static str) -> Vec<Layer> {
    let mut l = vec![
        layer("base.qcow2", M, None, &["write -P 1 0 256k"]),
        layer("mid.qcow2", M, Some("base.qcow2"), &["write -P 2 64k 64k"]),
        layer(
            "top.qcow2",
            2 * M,
            Some("mid.qcow2"),
            &[
                "write -z 128k 64k",
                "write -P 3 1536k 64k",
                "write -P 0 192k 64k",
                "write -P 4 1000k 100k",
            ],
        ),
    ];
    for x in &mut l {
        x.opts = opts;
    }
    l
}

fn commit_case(tag: &str, layers: Vec<Layer>, args: &[&str], into: &str) {
    let tmp = tempfile::tempdir().unwrap();
    build(tmp.path(), &layers);
    let top_name = layers.last().unwrap().name;
    let before = guest_view(&tmp.path().join(top_name));
    let names: Vec<&str> = layers.iter().map(|l| l.name).collect();
    let (seen, _, _keep) = differential(tag, &layers, args, &names);
    assert_eq!(seen.code, Some(0), "{tag}: {}", seen.stderr);
    let get = |n: &str| &seen.images.iter().find(|i| i.name == n).unwrap().content;
    assert!(get(top_name) == &before, "{tag}: the guest's view changed");
    // A base longer than the image keeps its tail.
    let base = get(into);
    assert!(
        base.len() >= before.len() && base[..before.len()] == before[..],
        "{tag}: the base does not read as the image did"
    );
}

#[test]
fn commit_into_the_backing_file_empties_the_image() {
    commit_case(
        "commit",
        commit_chain(""),
        &["commit", "top.qcow2"],
        "mid.qcow2",
    );
    commit_case(
        "commit-v2",
        commit_chain("compat=0.10"),
        &["commit", "top.qcow2"],
        "mid.qcow2",
    );
    commit_case(
        "commit-4k",
        commit_chain("cluster_size=4k"),
        &["commit", "-q", "top.qcow2"],
        "mid.qcow2",
    );
}

#[test]
fn commit_d_keeps_the_image() {
    commit_case(
        "keep",
        commit_chain(""),
        &["commit", "-d", "top.qcow2"],
        "mid.qcow2",
    );
}

#[test]
fn commit_into_an_indirect_base() {
    commit_case(
        "indirect",
        commit_chain(""),
        &["commit", "-b", "base.qcow2", "top.qcow2"],
        "base.qcow2",
    );
    // Relative to the image's directory, whatever the working directory.
    let l = vec![
        layer("sub/base.qcow2", M, None, &["write -P 1 0 256k"]),
        layer(
            "sub/mid.qcow2",
            M,
            Some("base.qcow2"),
            &["write -P 2 64k 64k"],
        ),
        layer(
            "sub/top.qcow2",
            M,
            Some("mid.qcow2"),
            &["write -P 3 512k 64k"],
        ),
    ];
    commit_case(
        "relative",
        l,
        &["commit", "-b", "base.qcow2", "sub/top.qcow2"],
        "sub/base.qcow2",
    );
}

#[test]
fn commit_with_a_rate_limit_takes_its_time() {
    let t = std::time::Instant::now();
    commit_case(
        "rate",
        commit_chain(""),
        &["commit", "-r", "1M", "top.qcow2"],
        "mid.qcow2",
    );
    // 0.3 MiB of data at 1 MiB/s, twice (qemu-img and qimg): well over 0.3 s for qimg alone.
    assert!(t.elapsed() > std::time::Duration::from_millis(300));
}

#[test]
fn commit_refuses_as_qemu_img_does() {
    let cases: &[&[&str]] = &[
        &["commit", "base.qcow2"],
        &["commit", "-b", "nope.qcow2", "top.qcow2"],
        &["commit", "-b", "top.qcow2", "top.qcow2"],
        &["commit", "-r", "-1", "top.qcow2"],
        &["commit", "-r", "abc", "top.qcow2"],
        &["commit", "-f", "raw", "top.qcow2"],
        &["commit", "-t", "bogus", "top.qcow2"],
        &["commit"],
        &["commit", "a", "b"],
        &["commit", "missing.qcow2"],
    ];
    for args in cases {
        let (seen, _, _keep) = differential(
            &format!("refusal {args:?}"),
            &commit_chain(""),
            args,
            &["top.qcow2", "mid.qcow2", "base.qcow2"],
        );
        assert_ne!(seen.code, Some(0), "{args:?} succeeded");
    }
}

/// Random chains (cluster sizes, sizes, writes, zeros, discards in every layer): both commands
/// agree with qemu-img on every image.
#[test]
fn random_chains_agree_with_qemu_img() {
    for seed in 0..12u64 {
        let mut r = fastrand::Rng::with_seed(seed);
        let names = ["base.qcow2", "mid.qcow2", "top.qcow2"];
        let mut layers = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let size = [M, 2 * M, 1536 * K][r.usize(..3)];
            let mut io = Vec::new();
            for _ in 0..r.usize(1..8) {
                let off = r.u64(0..size / 4096) * 4096;
                let len = (r.u64(1..64) * 4096).min(size - off);
                io.push(match r.u8(0..4) {
                    0 => format!("write -z {off} {len}"),
                    1 if i > 0 => format!("discard {off} {len}"),
                    _ => format!("write -P {} {off} {len}", r.u8(1..255)),
                });
            }
            let mut l = layer(name, size, (i > 0).then(|| names[i - 1]), &[]);
            l.io = io;
            l.opts = ["cluster_size=4k", "", "cluster_size=128k"][r.usize(..3)];
            layers.push(l);
        }
        let tag = format!("seed {seed} {layers:?}");
        let copy = || -> Vec<Layer> {
            layers
                .iter()
                .map(|l| Layer {
                    name: l.name,
                    size: l.size,
                    opts: l.opts,
                    backing: l.backing,
                    io: l.io.clone(),
                })
                .collect()
        };
        commit_case(
            &tag,
            copy(),
            &["commit", "-b", "base.qcow2", "top.qcow2"],
            "base.qcow2",
        );
        commit_case(&tag, copy(), &["commit", "top.qcow2"], "mid.qcow2");
        let rebase_onto = ["base.qcow2", ""][(seed % 2) as usize];
        let mut args = vec!["rebase", "-b", rebase_onto];
        if !rebase_onto.is_empty() {
            args.extend(["-F", "qcow2"]);
        }
        if seed % 3 == 0 {
            args.push("-c");
        }
        args.push("top.qcow2");
        rebase_case(&tag, copy(), &args);
    }
}
