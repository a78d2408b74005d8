//! Helpers shared by the integration tests: QEMU's tools as oracles, an in-memory model of the
//! virtual disk, deterministic data patterns.

#![allow(dead_code)]

pub mod workload;

use std::path::Path;
use std::process::{Command, Output};

/// Runs a command and returns its output (panics if it cannot be started).
pub fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"))
}

/// Runs `cmd` with `argv[0]` = `name` (qimg named `qemu-img` prints qemu-img's message
/// prefixes, as the iotests' wrappers run it).
pub fn run_named(cmd: &str, name: &str, args: &[&str]) -> Output {
    use std::os::unix::process::CommandExt;
    Command::new(cmd)
        .arg0(name)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"))
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `qemu-img check`: panics unless the image is clean (no corruption, no leaks).
pub fn qemu_check_clean(p: &Path) {
    let o = run("qemu-img", &["check", p.to_str().unwrap()]);
    assert!(
        o.status.success(),
        "qemu-img check failed ({:?}):\n{}",
        o.status.code(),
        text(&o)
    );
}

/// `qemu-img check` result: (exit code, corruptions, leaks) from the JSON output.
pub fn qemu_check(p: &Path) -> (i32, u64, u64, String) {
    let o = run("qemu-img", &["check", "--output=json", p.to_str().unwrap()]);
    let code = o.status.code().unwrap_or(-1);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or(serde_json::Value::Null);
    let get = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    (code, get("corruptions"), get("leaks"), text(&o))
}

/// `qemu-img compare` of an image with a raw file: panics if they differ.
pub fn qemu_compare_raw(img: &Path, raw: &Path) {
    let o = run(
        "qemu-img",
        &[
            "compare",
            "-F",
            "raw",
            img.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "qemu-img compare: {}", text(&o));
}

/// Deterministic pseudo-random bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut r = fastrand::Rng::with_seed(seed);
    let mut v = vec![0u8; len];
    r.fill(&mut v);
    v
}

/// `qemu-img create` with options.
pub fn qemu_create(p: &Path, opts: &str, size: u64, extra: &[&str]) {
    let size = size.to_string();
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.push("-o");
        args.push(opts);
    }
    args.extend_from_slice(extra);
    args.push(p.to_str().unwrap());
    args.push(&size);
    let o = run("qemu-img", &args);
    assert!(o.status.success(), "qemu-img create: {}", text(&o));
}

/// Runs qemu-io commands on an image; panics on failure.
pub fn qemu_io(p: &Path, fmt: &str, cmds: &[String]) -> String {
    let mut args: Vec<&str> = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(p.to_str().unwrap());
    let o = run("qemu-io", &args);
    let t = text(&o);
    assert!(
        o.status.success() && !t.contains("failed"),
        "qemu-io {cmds:?}: {t}"
    );
    t
}

/// Opens a qcow2 image read-only with default options (as a checker reading it back would).
pub async fn open_read_only(
    storage: qimg::storage::StorageRef,
    name: &str,
) -> qimg::Result<qimg::Qcow2> {
    qimg::Qcow2::open(
        storage,
        name.into(),
        &qimg::qcow2::Qcow2Options::default(),
        true,
        qimg::CacheMode::Writeback,
    )
    .await
}

/// QEMU's check may find leaks and COPIED flags that disagree with a refcount, nothing else; a
/// COPIED flag set on a cluster whose refcount is above one is only acceptable where the extra
/// count is a leak (`reference=1`: no snapshot uses the cluster, so writing it in place is
/// safe). And QEMU's repair leaves the image clean.
pub fn check_after_crash(p: &Path, cs: u64) -> Result<(), String> {
    let o = run("qemu-img", &["check", p.to_str().unwrap()]);
    let out = text(&o);
    let fail = |why: &str| {
        Err(format!(
            "{why}; qemu-img check rc={:?}:\n{out}",
            o.status.code()
        ))
    };
    if !matches!(o.status.code(), Some(0 | 2 | 3)) {
        return fail("check failed");
    }
    // Clusters whose extra count is a leak of one reference (a set: a crash in a large tree
    // can leave hundreds of thousands of lines).
    let leaked: std::collections::HashSet<u64> = out
        .lines()
        .filter(|l| l.ends_with(" reference=1"))
        .filter_map(|l| {
            l.strip_prefix("Leaked cluster ")?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .collect();
    let leaked_once = |cluster: u64| leaked.contains(&cluster);
    for l in out.lines().filter(|l| l.starts_with("ERROR")) {
        let entry = l
            .split_once("l2_entry=")
            .or_else(|| l.split_once("l1_entry="))
            .and_then(|(_, rest)| u64::from_str_radix(rest.split(' ').next()?, 16).ok());
        let Some(entry) = entry.filter(|_| l.starts_with("ERROR OFLAG_COPIED")) else {
            return fail("an error other than a COPIED flag");
        };
        let copied = entry >> 63 == 1;
        let cluster = (entry & 0x00ff_ffff_ffff_fe00) / cs;
        if copied && !leaked_once(cluster) {
            return fail("COPIED set on a cluster that something else references");
        }
    }
    let repaired = p.with_extension("repaired");
    std::fs::copy(p, &repaired).map_err(|e| e.to_string())?;
    let o = run(
        "qemu-img",
        &["check", "-r", "all", repaired.to_str().unwrap()],
    );
    let o2 = run("qemu-img", &["check", repaired.to_str().unwrap()]);
    if !o2.status.success() {
        return Err(format!(
            "not clean after check -r all:\n{}\n{}",
            text(&o),
            text(&o2)
        ));
    }
    Ok(())
}

/// A two-worker runtime, as the crash tests drive the engine.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Opens a qcow2 image read-write with default options; `None` if it does not open (after a
/// simulated crash, say).
pub async fn open_rw(storage: qimg::storage::StorageRef) -> Option<std::sync::Arc<qimg::Qcow2>> {
    qimg::Qcow2::open(
        storage,
        "img.qcow2".into(),
        &qimg::qcow2::Qcow2Options::default(),
        false,
        qimg::CacheMode::Writeback,
    )
    .await
    .ok()
    .map(std::sync::Arc::new)
}

/// Runs `qimg io` with these commands on an image; panics on failure. Returns its output.
pub fn qimg_io(p: &Path, cmds: &[String]) -> String {
    let mut args = vec!["io".to_string()];
    for c in cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(p.to_str().unwrap().into());
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let o = run(env!("CARGO_BIN_EXE_qimg"), &args);
    let t = text(&o);
    assert!(o.status.success() && !t.contains("failed"), "qimg io: {t}");
    t
}

/// `qemu-img compare` of two images: panics if the disks differ.
pub fn assert_same_disk(a: &Path, b: &Path) {
    let o = run(
        "qemu-img",
        &["compare", a.to_str().unwrap(), b.to_str().unwrap()],
    );
    assert!(o.status.success(), "images differ: {}", text(&o));
}
