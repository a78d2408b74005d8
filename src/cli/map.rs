//! `qimg map`: the allocation map of an image and its backing chain, as qemu-img map prints it.

use super::fail;
use super::opts::{open, ImageArgs};
use qimg::block::{chain_status, BlockDevice};
use qimg::Result;
use std::sync::Arc;

#[derive(clap::Args)]
pub struct Args {
    /// QEMU objects: secret,id=ID,data=TEXT|file=FILE[,format=raw|base64] (nothing uses a
    /// secret until encrypted images are supported); other object types are refused
    #[arg(long = "object", value_name = "OBJECT")]
    object: Vec<String>,
    #[arg(short = 'f')]
    format: Option<String>,
    /// The image name is an option list (driver=qcow2,file.filename=NAME,...)
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// Output format: human or json
    #[arg(long = "output", default_value = "human")]
    output: String,
    /// Start offset
    #[arg(long = "start-offset")]
    start: Option<String>,
    /// Length to map
    #[arg(long = "max-length")]
    max_length: Option<String>,
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    filename: String,
}

/// One line of the map.
#[derive(Clone, Debug, PartialEq)]
pub struct MapEntry {
    pub start: u64,
    pub length: u64,
    pub depth: u64,
    pub present: bool,
    pub zero: bool,
    pub data: bool,
    pub compressed: bool,
    pub offset: Option<u64>,
    pub filename: String,
}

impl MapEntry {
    fn extends(&self, n: &MapEntry) -> bool {
        self.start + self.length == n.start
            && self.depth == n.depth
            && self.present == n.present
            && self.zero == n.zero
            && self.data == n.data
            && self.compressed == n.compressed
            && self.filename == n.filename
            && match (self.offset, n.offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a + self.length == b,
                _ => false,
            }
    }

    fn json(&self) -> String {
        let mut s = format!(
            "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
            self.start, self.length, self.depth, self.present, self.zero, self.data, self.compressed
        );
        if let Some(o) = self.offset {
            s += &format!(", \"offset\": {o}");
        }
        s.push('}');
        s
    }
}

/// The map line for the extent at `offset`.
pub async fn entry_at(img: &Arc<dyn BlockDevice>, offset: u64, max: u64) -> Result<MapEntry> {
    let c = chain_status(img, offset, max).await?;
    Ok(MapEntry {
        start: c.offset,
        length: c.len,
        depth: c.depth,
        present: c.present,
        zero: c.zero,
        data: c.data,
        compressed: c.compressed,
        offset: c.host_offset,
        filename: c.filename,
    })
}

/// The merged map of `[start, end)`.
pub async fn map(img: &Arc<dyn BlockDevice>, start: u64, end: u64) -> Result<Vec<MapEntry>> {
    let mut out: Vec<MapEntry> = Vec::new();
    let mut off = start;
    while off < end {
        let e = entry_at(img, off, end - off).await?;
        off += e.length;
        match out.last_mut() {
            Some(last) if last.extends(&e) => last.length += e.length,
            _ => out.push(e),
        }
    }
    Ok(out)
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
        no_backing: false,
        batch: false,
        force_share: a.force_share,
        metadata_only: false,
        aio: None,
    })
    .await
    {
        Ok(i) => i,
        Err(e) => return fail(format!("Could not open '{}': {e}", a.filename)),
    };
    let parse = |s: &Option<String>, what: &str| -> std::result::Result<Option<u64>, u8> {
        s.as_deref()
            .map(|v| {
                qimg::size::parse_size(v).map_err(|_| fail(format!("Invalid {what} specified")))
            })
            .transpose()
    };
    let (start, max_len) = match (
        parse(&a.start, "start offset"),
        parse(&a.max_length, "max length"),
    ) {
        (Ok(s), Ok(m)) => (s.unwrap_or(0), m),
        (Err(c), _) | (_, Err(c)) => return c,
    };
    let size = img.size();
    let end = max_len.map_or(size, |m| start.saturating_add(m).min(size));
    let entries = match map(&img, start.min(size), end).await {
        Ok(e) => e,
        Err(e) => return fail(e),
    };
    let code = if a.output == "json" {
        let lines: Vec<String> = entries.iter().map(MapEntry::json).collect();
        println!("[{}]", lines.join(",\n"));
        0
    } else {
        let mut code = 0;
        println!("{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to");
        for e in &entries {
            if e.data && e.offset.is_none() {
                code = fail("File contains external, encrypted or compressed clusters.");
                break;
            }
            if e.data && !e.zero {
                println!(
                    "{:<16}{:<16}{:<16}{}",
                    hex(e.start),
                    hex(e.length),
                    hex(e.offset.unwrap_or(0)),
                    e.filename
                );
            }
        }
        code
    };
    let _ = img.close().await;
    code
}

/// C's `%#x`: `0x` prefix except for zero.
fn hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}
