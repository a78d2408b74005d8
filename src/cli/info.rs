//! `qimg info`: what qemu-img info prints, in human or JSON form.

use super::fail;
use super::opts::{open, ImageArgs};
use qimg::block::{BlockDevice, Format};
use qimg::format::header::incompat;
use qimg::format::snapshot::Snapshot;
use qimg::size::human_size;
use serde_json::{json, Value};
use std::sync::Arc;

#[derive(clap::Args)]
pub struct Args {
    /// QEMU objects: secret,id=ID,data=TEXT|file=FILE[,format=raw|base64] (nothing uses a
    /// secret until encrypted images are supported); other object types are refused
    #[arg(long = "object", value_name = "OBJECT")]
    object: Vec<String>,
    /// Image format (probed if not given)
    #[arg(short = 'f')]
    format: Option<String>,
    /// The image name is an option list (driver=qcow2,file.filename=NAME,...)
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// Output format: human or json
    #[arg(long = "output", default_value = "human")]
    output: String,
    /// Show the whole backing chain
    #[arg(long = "backing-chain")]
    backing_chain: bool,
    /// Ignored (qemu-img compatibility: images are always opened read-only here)
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    filename: String,
}

pub async fn run(a: Args) -> u8 {
    if let Err(e) = super::objects::define(&a.object) {
        return super::fail(e.to_string());
    }
    if a.output != "human" && a.output != "json" {
        return fail(format!(
            "--output expects 'human' or 'json' not '{}'",
            a.output
        ));
    }
    let img = match open(&ImageArgs {
        image_opts: a.image_opts,
        path: &a.filename,
        format: a.format.as_deref(),
        read_only: true,
        cache: None,
        runtime_opts: &[],
        no_backing: !a.backing_chain,
        batch: false,
        force_share: a.force_share,
        metadata_only: true,
        aio: None,
    })
    .await
    {
        Ok(i) => i,
        // qemu-img walks the chain by names and reports a loop on its own.
        Err(e @ qimg::Error::BackingLoop(_)) => return fail(e),
        Err(e) => return fail(format!("Could not open '{}': {e}", a.filename)),
    };
    let mut chain: Vec<Arc<dyn BlockDevice>> = vec![img.clone()];
    // Images opened only to be listed (see below), closed at the end.
    let mut listed: Vec<Arc<dyn BlockDevice>> = Vec::new();
    if a.backing_chain {
        loop {
            while let Some(b) = chain.last().and_then(|i| i.backing()) {
                chain.push(b);
            }
            // qemu-img lists the chain by the names in the images' headers: past a
            // `"backing": null` in a `json:` backing name, which kept a layer from being
            // opened below, the named file is listed too (and what it names, on).
            let Some(next) = chain.last().and_then(|i| cut_backing(i.as_ref())) else {
                break;
            };
            if chain.len() > 64 {
                break;
            }
            match open(&ImageArgs {
                image_opts: false,
                path: &next.0,
                format: next.1.as_deref(),
                read_only: true,
                cache: None,
                runtime_opts: &[],
                no_backing: false,
                batch: false,
                force_share: a.force_share,
                metadata_only: true,
                aio: None,
            })
            .await
            {
                Ok(i) => {
                    listed.push(i.clone());
                    chain.push(i);
                }
                Err(e) => {
                    for i in listed.iter().chain([&img]) {
                        let _ = i.close().await;
                    }
                    return fail(format!("Could not open '{}': {e}", next.0));
                }
            }
        }
    }
    if a.output == "json" {
        let infos: Vec<Value> = chain.iter().map(|i| info_json(i.as_ref())).collect();
        let v = if a.backing_chain {
            Value::Array(infos)
        } else {
            infos.into_iter().next().unwrap_or(Value::Null)
        };
        println!("{}", pretty(&v));
    } else {
        for (n, i) in chain.iter().enumerate() {
            if n > 0 {
                println!();
            }
            print!("{}", info_human(i.as_ref()));
        }
    }
    for i in listed.iter().rev().chain([&img]) {
        let _ = i.close().await;
    }
    0
}

/// The backing file (name, format) a qcow2 image names but that was not opened below it
/// (a `json:` backing name with `"backing": null` one layer up).
fn cut_backing(img: &dyn BlockDevice) -> Option<(String, Option<String>)> {
    let q = img.as_qcow2()?;
    if img.backing().is_some() {
        return None;
    }
    let name = q.backing_filename()?;
    let file = super::image_name::parse(img.filename(), false)
        .map(|spec| spec.path)
        .unwrap_or_else(|_| img.filename().to_string());
    let path = if name.starts_with("json:") {
        name
    } else {
        qimg::block::resolve_backing(std::path::Path::new(&file), &name)
            .ok()?
            .display()
            .to_string()
    };
    Some((path, q.backing_format()))
}

/// JSON with 4-space indentation, as qemu-img prints it (QEMU's own writer: empty arrays and
/// objects still open and close on separate lines, non-ASCII characters escaped).
pub fn pretty(v: &Value) -> String {
    let mut out = String::new();
    write_json(&mut out, v, 0);
    out
}

fn write_json(out: &mut String, v: &Value, level: usize) {
    let indent = |out: &mut String, level: usize| out.push_str(&"    ".repeat(level));
    match v {
        Value::Object(m) => {
            out.push('{');
            for (i, (k, v)) in m.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push('\n');
                indent(out, level + 1);
                write_string(out, k);
                out.push_str(": ");
                write_json(out, v, level + 1);
            }
            out.push('\n');
            indent(out, level);
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, v) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push('\n');
                indent(out, level + 1);
                write_json(out, v, level + 1);
            }
            out.push('\n');
            indent(out, level);
            out.push(']');
        }
        Value::String(s) => write_string(out, s),
        other => out.push_str(&other.to_string()),
    }
}

fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || (c as u32) >= 0x7f => {
                let mut buf = [0u16; 2];
                for u in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{:04X}", u));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// The file below the image's format: its name, or for a name made of options (`json:`,
/// QEMU's name for a raw image with `offset=`/`size=`) the file the options name.
fn file_path(img: &dyn BlockDevice) -> String {
    let name = img.filename();
    if name.starts_with("json:") {
        if let Ok(spec) = super::image_name::parse(name, false) {
            return spec.path;
        }
    }
    name.to_string()
}

fn file_length(img: &dyn BlockDevice) -> u64 {
    if img.protocol() != "file" {
        return img.size();
    }
    std::fs::metadata(file_path(img))
        .map(|m| m.len().next_multiple_of(512))
        .unwrap_or(0)
}

/// A quorum below an image, as QEMU describes it: a node of its own (format `quorum`) with a
/// child per file.
struct QuorumNode {
    name: String,
    len: u64,
    actual: u64,
    /// Path, length, bytes on the host; in QEMU's order (the last child first).
    children: Vec<(String, u64, u64)>,
}

fn quorum_node(img: &dyn BlockDevice) -> Option<QuorumNode> {
    use std::os::unix::fs::MetadataExt;
    if img.protocol() != "quorum" {
        return None;
    }
    let spec = super::image_name::parse(img.filename(), false)
        .ok()?
        .quorum?;
    let mut children: Vec<(String, u64, u64)> = spec
        .children
        .iter()
        .map(|p| {
            let (len, blocks) = std::fs::metadata(p)
                .map(|m| (m.len(), m.blocks()))
                .unwrap_or((0, 0));
            // Lengths in whole sectors, as QEMU reports a file's.
            (
                p.display().to_string(),
                len.next_multiple_of(512),
                blocks * 512,
            )
        })
        .collect();
    let len = children.first().map_or(0, |c| c.1);
    let actual = children.iter().map(|c| c.2).sum();
    children.reverse();
    Some(QuorumNode {
        name: spec.qemu_name(),
        len,
        actual,
        children,
    })
}

fn quorum_json(q: &QuorumNode, total: usize) -> Value {
    let children: Vec<Value> = q
        .children
        .iter()
        .enumerate()
        .map(|(i, (path, len, actual))| {
            json!({
                "name": format!("children.{}", total - 1 - i),
                "info": {
                    "children": [],
                    "virtual-size": len,
                    "filename": path,
                    "format": "file",
                    "actual-size": actual,
                    "format-specific": {"type": "file", "data": {}},
                    "dirty-flag": false,
                }
            })
        })
        .collect();
    json!({
        "name": "file",
        "info": {
            "children": children,
            "virtual-size": q.len,
            "filename": q.name,
            "format": "quorum",
            "actual-size": q.actual,
        }
    })
}

/// Where the backing file `name` is; `None` when that cannot be known (a relative name below
/// a quorum, which has no directory).
fn full_backing(img: &dyn BlockDevice, name: &str) -> Option<String> {
    if img.protocol() == "quorum" && !name.starts_with('/') && !name.starts_with("json:") {
        return None;
    }
    // The image's name may be a `blkdebug:` or `json:` one: the file is what counts.
    let file = super::image_name::parse(img.filename(), false)
        .map(|spec| spec.path)
        .unwrap_or_else(|_| img.filename().to_string());
    Some(
        qimg::block::resolve_backing(std::path::Path::new(&file), name)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| name.to_string()),
    )
}

fn info_json(img: &dyn BlockDevice) -> Value {
    if img.protocol_node() {
        return json!({
            "children": [],
            "virtual-size": img.size(),
            "filename": img.filename(),
            "format": img.protocol(),
        });
    }
    let actual = img.allocated_bytes();
    // What qemu-img says of a protocol other than a file: name, size, driver.
    let file_child = if let Some(q) = quorum_node(img) {
        quorum_json(&q, q.children.len())
    } else if img.protocol() != "file" {
        json!({
            "name": "file",
            "info": {
                "children": [],
                "virtual-size": file_length(img),
                "filename": img.filename(),
                "format": img.protocol(),
            }
        })
    } else if let Some(inner) = img.file_image() {
        // The file is an image itself (a raw image with offset= or size=, another format).
        json!({"name": "file", "info": info_json(&*inner)})
    } else {
        json!({
        "name": "file",
        "info": {
            "children": [],
            "virtual-size": file_length(img),
            "filename": file_path(img),
            "format": "file",
            "actual-size": actual.unwrap_or(0),
            "format-specific": {"type": "file", "data": {}},
            "dirty-flag": false,
        }
        })
    };
    let mut m = serde_json::Map::new();
    m.insert("children".into(), json!([file_child]));
    if let Some(q) = img.as_qcow2() {
        let snaps = q.snapshots();
        if !snaps.is_empty() && !q.has_data_file() {
            m.insert(
                "snapshots".into(),
                Value::Array(snaps.iter().map(snapshot_json).collect()),
            );
        }
        if let Some(f) = q.backing_format() {
            m.insert("backing-filename-format".into(), json!(f));
        }
    }
    m.insert("virtual-size".into(), json!(img.size()));
    m.insert("filename".into(), json!(img.filename()));
    if let Some(q) = img.as_qcow2() {
        m.insert("cluster-size".into(), json!(q.cluster_size()));
    }
    m.insert("format".into(), json!(img.format().name()));
    if let Some(a) = actual {
        m.insert("actual-size".into(), json!(a));
    }
    if let Some(q) = img.as_qcow2() {
        let h = q.header();
        let mut data = serde_json::Map::new();
        data.insert(
            "compat".into(),
            json!(if h.version >= 3 { "1.1" } else { "0.10" }),
        );
        data.insert("compression-type".into(), json!(h.compression_type.name()));
        if h.version >= 3 {
            data.insert("lazy-refcounts".into(), json!(h.lazy_refcounts()));
            let bitmaps = q.bitmap_list();
            if !bitmaps.is_empty() {
                data.insert(
                    "bitmaps".into(),
                    bitmaps
                        .iter()
                        .map(|b| json!({"flags": bitmap_flags(b), "name": b.name, "granularity": b.granularity}))
                        .collect(),
                );
            }
        }
        data.insert("refcount-bits".into(), json!(h.refcount_bits()));
        if let Some(f) = h.data_file_name() {
            data.insert("data-file".into(), json!(f));
        }
        if h.has_data_file() {
            data.insert("data-file-raw".into(), json!(h.data_file_raw()));
        }
        if h.version >= 3 {
            data.insert("corrupt".into(), json!(h.is_corrupt()));
            data.insert(
                "extended-l2".into(),
                json!(h.incompatible_features & incompat::EXTL2 != 0),
            );
        }
        m.insert(
            "format-specific".into(),
            json!({"type": "qcow2", "data": Value::Object(data)}),
        );
        if let Some(b) = h.backing_file.as_deref() {
            if let Some(full) = full_backing(img, b) {
                m.insert("full-backing-filename".into(), json!(full));
            }
            m.insert("backing-filename".into(), json!(b));
        }
        m.insert("dirty-flag".into(), json!(h.is_dirty()));
    } else {
        if img.protocol() == "file" {
            m.insert("dirty-flag".into(), json!(false));
        }
    }
    Value::Object(m)
}

/// A bitmap's flags by qemu-img's names, in its order.
fn bitmap_flags(b: &qimg::qcow2::BitmapInfo) -> Vec<&'static str> {
    let mut f = Vec::new();
    if b.in_use {
        f.push("in-use");
    }
    if b.enabled {
        f.push("auto");
    }
    f
}

fn snapshot_json(s: &Snapshot) -> Value {
    let mut m = serde_json::Map::new();
    if let Some(ic) = s.icount.filter(|&i| i != u64::MAX) {
        m.insert("icount".into(), json!(ic));
    }
    m.insert(
        "vm-clock-nsec".into(),
        json!(s.vm_clock_nsec % 1_000_000_000),
    );
    m.insert("name".into(), json!(s.name));
    m.insert("date-sec".into(), json!(s.date_sec));
    m.insert("date-nsec".into(), json!(s.date_nsec));
    m.insert(
        "vm-clock-sec".into(),
        json!(s.vm_clock_nsec / 1_000_000_000),
    );
    m.insert("id".into(), json!(s.id));
    m.insert("vm-state-size".into(), json!(s.vm_state_size));
    Value::Object(m)
}

fn info_human(img: &dyn BlockDevice) -> String {
    info_human_node(img, "")
}

/// [`info_human`] for the node at `node` (`""` for the image, `/file` for its file's, ...).
fn info_human_node(img: &dyn BlockDevice, node: &str) -> String {
    let mut s = String::new();
    let disk_size = match img.allocated_bytes() {
        Some(a) => human_size(a),
        None => "unavailable".to_string(),
    };
    s += &format!("image: {}\n", img.filename());
    if img.protocol_node() {
        s += &format!("file format: {}\n", img.protocol());
        s += &format!(
            "virtual size: {} ({} bytes)\n",
            human_size(img.size()),
            img.size()
        );
        s += &format!("disk size: {disk_size}\n");
        return s;
    }
    s += &format!("file format: {}\n", img.format().name());
    s += &format!(
        "virtual size: {} ({} bytes)\n",
        human_size(img.size()),
        img.size()
    );
    s += &format!("disk size: {disk_size}\n");
    if let Some(q) = img.as_qcow2() {
        let h = q.header();
        s += &format!("cluster_size: {}\n", q.cluster_size());
        if let Some(b) = h.backing_file.as_deref() {
            match full_backing(img, b) {
                None => s += &format!("backing file: {b} (cannot determine actual path)\n"),
                Some(full) if full != b => {
                    s += &format!("backing file: {b} (actual path: {full})\n")
                }
                Some(_) => s += &format!("backing file: {b}\n"),
            }
            if let Some(f) = h.backing_format() {
                s += &format!("backing file format: {f}\n");
            }
        }
        if !q.snapshots().is_empty() && !q.has_data_file() {
            s += "Snapshot list:\n";
            s += &snapshot_table(&q.snapshots());
        }
        s += &format_specific(q);
    }
    s += &format!("Child node '{node}/file':\n");
    if let Some(q) = quorum_node(img) {
        s += &format!("    image: {}\n", q.name);
        s += "    file format: quorum\n";
        s += &format!(
            "    virtual size: {} ({} bytes)\n",
            human_size(q.len),
            q.len
        );
        s += &format!("    disk size: {}\n", human_size(q.actual));
        let n = q.children.len();
        for (i, (path, len, actual)) in q.children.iter().enumerate() {
            s += &format!("    Child node '{node}/file/children.{}':\n", n - 1 - i);
            s += &format!("        filename: {path}\n");
            s += "        protocol type: file\n";
            s += &format!("        file length: {} ({len} bytes)\n", human_size(*len));
            s += &format!("        disk size: {}\n", human_size(*actual));
        }
        return s;
    }
    if let Some(inner) = img.file_image() {
        // The file is an image itself: its own description, indented.
        for line in info_human_node(&*inner, &format!("{node}/file")).lines() {
            s += &format!("    {line}\n");
        }
        return s;
    }
    let flen = file_length(img);
    s += &format!("    filename: {}\n", file_path(img));
    s += &format!("    protocol type: {}\n", img.protocol());
    s += &format!("    file length: {} ({flen} bytes)\n", human_size(flen));
    s += &format!("    disk size: {disk_size}\n");
    let _ = Format::Raw;
    s
}

/// The snapshot table of `qemu-img info` / `qemu-img snapshot -l`.
pub fn snapshot_table(snaps: &[Snapshot]) -> String {
    let mut s = format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}\n",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    );
    for sn in snaps {
        let secs = sn.vm_clock_nsec / 1_000_000_000;
        let clock = format!(
            "{:04}:{:02}:{:02}.{:03}",
            secs / 3600,
            (secs / 60) % 60,
            secs % 60,
            (sn.vm_clock_nsec / 1_000_000) % 1000
        );
        let icount = match sn.icount {
            Some(i) if i != u64::MAX => i.to_string(),
            _ => String::new(),
        };
        s += &format!(
            "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}\n",
            sn.id,
            sn.name,
            human_size(sn.vm_state_size),
            format_date(sn.date_sec),
            clock,
            icount
        );
    }
    s
}

/// `YYYY-MM-DD HH:MM:SS` in local time, as QEMU prints snapshot dates.
fn format_date(secs: u32) -> String {
    // Civil-from-days (UTC; the test machines run in UTC).
    let days = i64::from(secs) / 86400;
    let rem = i64::from(secs) % 86400;
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// The "Format specific information" section of a qcow2 image (`info`, qemu-io's `info`).
pub fn format_specific(q: &qimg::qcow2::Qcow2) -> String {
    let h = q.header();
    let mut s = String::new();
    s += "Format specific information:\n";
    s += &format!(
        "    compat: {}\n",
        if h.version >= 3 { "1.1" } else { "0.10" }
    );
    s += &format!("    compression type: {}\n", h.compression_type.name());
    if h.version >= 3 {
        s += &format!("    lazy refcounts: {}\n", h.lazy_refcounts());
        let bitmaps = q.bitmap_list();
        if !bitmaps.is_empty() {
            s += "    bitmaps:\n";
            for (i, b) in bitmaps.iter().enumerate() {
                s += &format!("        [{i}]:\n            flags:\n");
                for (k, f) in bitmap_flags(b).iter().enumerate() {
                    s += &format!("                [{k}]: {f}\n");
                }
                s += &format!(
                    "            name: {}\n            granularity: {}\n",
                    b.name, b.granularity
                );
            }
        }
    }
    s += &format!("    refcount bits: {}\n", h.refcount_bits());
    if let Some(f) = h.data_file_name() {
        s += &format!("    data file: {f}\n");
    }
    if h.has_data_file() {
        s += &format!("    data file raw: {}\n", h.data_file_raw());
    }
    if h.version >= 3 {
        s += &format!("    corrupt: {}\n", h.is_corrupt());
        s += &format!(
            "    extended l2: {}\n",
            h.incompatible_features & incompat::EXTL2 != 0
        );
    }
    s
}
