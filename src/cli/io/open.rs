//! qemu-io's `open` and `reopen`: their flags, and opening again with changed options.

use super::help::usage;
use super::{discard_option, OpenParams, Session, DEFAULT_CACHE};
use crate::cli::opts::ImageArgs;
use crate::cli::prog;

impl Session {
    /// `open [-rsCnU] [-i AIO] [-t CACHE] [-d DISCARD] [-o OPTIONS] PATH`, as qemu-io's (`-s`: a
    /// temporary overlay, `-C`: copy-on-read). `-k` (Linux AIO) is not implemented and is
    /// refused.
    pub(super) async fn open(&mut self, args: &[&str]) -> bool {
        if args.is_empty() {
            eprintln!("bad argument count 0 to open, expected at least 1 arguments");
            return false;
        }
        if self.img.is_some() {
            eprintln!("{}: file open already, try 'help close'", prog());
            return false;
        }
        let (mut read_only, mut force_share, mut snapshot) = (false, false, false);
        let mut copy_on_read = false;
        let (mut cache, mut aio): (Option<String>, Option<String>) =
            (Some(DEFAULT_CACHE.to_string()), None);
        let mut options = Vec::new();
        let mut discard = None;
        let mut paths = Vec::new();
        let mut i = 0;
        while i < args.len() {
            let a = args[i];
            i += 1;
            if a.len() < 2 || !a.starts_with('-') {
                paths.push(a);
                continue;
            }
            let mut chars = a[1..].chars();
            while let Some(c) = chars.next() {
                match c {
                    'r' => read_only = true,
                    'U' => force_share = true,
                    'n' => cache = Some("none".into()),
                    's' => snapshot = true,
                    'C' => copy_on_read = true,
                    'k' => {
                        eprintln!("open: -k (Linux AIO) is not supported");
                        return false;
                    }
                    't' | 'i' | 'o' | 'd' => {
                        let rest: String = chars.by_ref().collect();
                        let value = if !rest.is_empty() {
                            rest
                        } else if i < args.len() {
                            i += 1;
                            args[i - 1].to_string()
                        } else {
                            usage("open");
                            return false;
                        };
                        match c {
                            't' => cache = Some(value),
                            'i' => aio = Some(value),
                            'd' => match discard_option(&value) {
                                Some(o) => discard = Some(o),
                                None => return false,
                            },
                            _ => options.push(value),
                        }
                    }
                    other => {
                        eprintln!("open: invalid option -- '{other}'");
                        usage("open");
                        return false;
                    }
                }
            }
        }
        // Without a path the options name the file (`-o file.filename=...`), as with
        // --image-opts.
        let (path, image_opts, runtime) = match paths[..] {
            [path] => (path.to_string(), false, options),
            [] if !options.is_empty() => (options.join(","), true, Vec::new()),
            _ => {
                usage("open");
                return false;
            }
        };
        // The `-d` mode comes first: a `discard=` among the options wins, as in QEMU.
        let runtime = discard.into_iter().chain(runtime).collect();
        let params = OpenParams {
            path,
            format: None,
            image_opts,
            read_only,
            cache,
            runtime,
            force_share,
            aio,
            snapshot,
            copy_on_read,
            auto_read_only: false,
        };
        match params.open().await {
            Ok(img) => {
                self.img = Some(img);
                self.params = Some(params);
                true
            }
            Err(e) if image_opts => {
                eprintln!("{}: can't open: {e}", prog());
                false
            }
            Err(e) => {
                eprintln!("{}: can't open device {}: {e}", prog(), params.path);
                false
            }
        }
    }

    /// `reopen [(-r|-w)] [-c cache] [-o options]`: closes the image and opens it again with the
    /// changed options. Options are checked before the image is closed; if opening with them
    /// fails anyway, the image is opened again as it was.
    pub(super) async fn reopen(&mut self, args: &[&str]) -> bool {
        let Some(old) = self.params.clone() else {
            eprintln!("no file open, try 'help open'");
            return false;
        };
        let (mut ro, mut rw) = (false, false);
        let mut cache = None;
        let mut options = Vec::new();
        let mut i = 0;
        while i < args.len() {
            let a = args[i];
            i += 1;
            if a.len() < 2 || !a.starts_with('-') {
                usage("reopen");
                return false;
            }
            let mut chars = a[1..].chars();
            while let Some(c) = chars.next() {
                match c {
                    'r' => ro = true,
                    'w' => rw = true,
                    'c' | 'o' => {
                        let rest: String = chars.by_ref().collect();
                        let value = if !rest.is_empty() {
                            rest
                        } else if i < args.len() {
                            i += 1;
                            args[i - 1].to_string()
                        } else {
                            usage("reopen");
                            return false;
                        };
                        if c == 'c' {
                            cache = Some(value);
                        } else {
                            options.push(value);
                        }
                    }
                    other => {
                        eprintln!("reopen: invalid option -- '{other}'");
                        usage("reopen");
                        return false;
                    }
                }
            }
        }
        if ro && rw {
            eprintln!("{}: Only one -r/-w option may be given", prog());
            return false;
        }
        if old.snapshot {
            eprintln!(
                "{}: Cannot reopen a temporary snapshot overlay (-s): its writes would be lost",
                prog()
            );
            return false;
        }
        if let Some(c) = &cache {
            if qimg::block::CacheMode::parse(c).is_err() {
                eprintln!("{}: Invalid cache option: {c}", prog());
                return false;
            }
        }
        let node = match self.node_options(&old, &options, ro || rw, cache.is_some()) {
            Ok(n) => n,
            Err(msg) => {
                eprintln!("{}: {msg}", prog());
                return false;
            }
        };
        let mut new = old.clone();
        if ro || rw {
            new.read_only = ro;
        }
        if let Some(r) = node.read_only {
            new.read_only = r;
        }
        if let Some(a) = node.auto_read_only {
            new.auto_read_only = a;
        }
        if cache.is_some() {
            new.cache = cache;
        } else if node.direct.is_some() || node.no_flush.is_some() {
            match cache_with(new.cache.as_deref(), node.direct, node.no_flush) {
                Ok(c) => new.cache = Some(c.to_string()),
                Err(msg) => {
                    eprintln!("{}: {msg}", prog());
                    return false;
                }
            }
        }
        new.runtime = join_runtime(&old.runtime, &node.rest);
        // Refuse bad options while the image is still open.
        let check = ImageArgs {
            image_opts: new.image_opts,
            path: &new.path,
            format: new.format.as_deref(),
            read_only: new.read_only,
            cache: new.cache.as_deref(),
            runtime_opts: &new.runtime,
            no_backing: false,
            batch: false,
            force_share: new.force_share,
            metadata_only: false,
            aio: new.aio.as_deref(),
        };
        if let Err(e) = crate::cli::opts::open_options(&check) {
            eprintln!("{}: {e}", prog());
            return false;
        }
        if !self.close().await {
            return false;
        }
        match new.open().await {
            Ok(img) => {
                self.img = Some(img);
                self.params = Some(new);
                true
            }
            Err(e) => {
                eprintln!("{}: {e}", prog());
                if let Ok(img) = old.open().await {
                    self.img = Some(img);
                    self.params = Some(old);
                }
                false
            }
        }
    }
}

/// What a reopen's `-o` options say about the node itself (rather than its driver).
struct NodeOptions {
    read_only: Option<bool>,
    auto_read_only: Option<bool>,
    direct: Option<bool>,
    no_flush: Option<bool>,
    /// The driver's options, to be joined with the old ones.
    rest: Vec<String>,
}

impl Session {
    /// Takes the node's own options out of a reopen's `-o` lists, with QEMU's rules: `read-only`
    /// not beside `-r`/`-w`, the `cache.*` switches not beside `-c`, node names and drivers
    /// unchanged (repeating them is fine).
    fn node_options(
        &self,
        old: &OpenParams,
        options: &[String],
        rw_flag: bool,
        cache_flag: bool,
    ) -> Result<NodeOptions, String> {
        use crate::cli::opts::parse_kv_list;
        let mut n = NodeOptions {
            read_only: None,
            auto_read_only: None,
            direct: None,
            no_flush: None,
            rest: Vec::new(),
        };
        // What the image was opened with: its option lists, and its name with --image-opts.
        let mut before: Vec<(String, String)> =
            old.runtime.iter().flat_map(|l| parse_kv_list(l)).collect();
        if old.image_opts {
            before.extend(parse_kv_list(&old.path));
        }
        let was = |k: &str| {
            before
                .iter()
                .rev()
                .find(|(x, _)| x == k)
                .map(|(_, v)| v.clone())
        };
        let img = self.img.as_ref();
        for (k, v) in options.iter().flat_map(|l| parse_kv_list(l)) {
            let flag = || qimg::size::parse_bool(&k, &v).map_err(|e| e.to_string());
            match k.as_str() {
                "read-only" => {
                    let b = flag()?;
                    if rw_flag {
                        return Err("Cannot set both -r/-w and 'read-only'".into());
                    }
                    // qemu-io keeps its write permission over such a reopen: QEMU refuses it.
                    if b && !old.read_only {
                        let name = was("node-name").unwrap_or_else(|| old.path.clone());
                        return Err(format!(
                            "Read-only block node '{name}' cannot support read-write users"
                        ));
                    }
                    n.read_only = Some(b);
                }
                "auto-read-only" => n.auto_read_only = Some(flag()?),
                "cache.direct" | "cache.no-flush" => {
                    let b = flag()?;
                    if cache_flag {
                        return Err("Cannot set both -c and the cache options".into());
                    }
                    if k == "cache.direct" {
                        n.direct = Some(b);
                    } else {
                        n.no_flush = Some(b);
                    }
                }
                "node-name" | "file.node-name" | "backing.node-name" => {
                    if was(&k).as_deref() != Some(v.as_str()) {
                        return Err("Cannot change the option 'node-name'".into());
                    }
                }
                "driver" | "file.driver" | "backing.driver" => {
                    let now = img.and_then(|i| match k.as_str() {
                        "driver" if i.protocol_node() => Some(i.protocol().to_string()),
                        "driver" => Some(i.format().name().to_string()),
                        "file.driver" => Some(i.protocol().to_string()),
                        _ => i.backing().map(|b| b.format().name().to_string()),
                    });
                    if now.as_deref() != Some(v.as_str()) {
                        return Err("Cannot change the option 'driver'".into());
                    }
                }
                _ => n.rest.push(format!("{k}={}", v.replace(',', ",,"))),
            }
        }
        Ok(n)
    }
}

/// The cache mode `mode` (qemu-io's default when none) with QEMU's `cache.direct` and
/// `cache.no-flush` switched as given; whether writes are durable on completion stays.
fn cache_with(
    mode: Option<&str>,
    direct: Option<bool>,
    no_flush: Option<bool>,
) -> Result<&'static str, String> {
    let m =
        qimg::block::CacheMode::parse(mode.unwrap_or(DEFAULT_CACHE)).map_err(|e| e.to_string())?;
    let direct = direct.unwrap_or(m.direct());
    let no_flush = no_flush.unwrap_or(m.no_flush());
    Ok(match (m.writethrough(), direct, no_flush) {
        (_, true, true) => {
            return Err(
                "cache.direct=on with cache.no-flush=on is not supported (no cache mode of \
                 qimg bypasses the page cache without flushing)"
                    .into(),
            )
        }
        (_, false, true) => "unsafe",
        (true, true, false) => "directsync",
        (false, true, false) => "none",
        (true, false, false) => "writethrough",
        (false, false, false) => "writeback",
    })
}

/// The options a reopen opens with: the new ones, and the old ones they do not name, with
/// QEMU's qcow2 rules: a new overlap template replaces every old overlap option, a new
/// `cache-size` the old `l2-cache-size` and `refcount-cache-size`, and an old `cache-size` does
/// not survive next to cache options unless it is given again.
fn join_runtime(old: &[String], new: &[String]) -> Vec<String> {
    use crate::cli::opts::parse_kv_list;
    let new: Vec<(String, String)> = new.iter().flat_map(|l| parse_kv_list(l)).collect();
    let has = |list: &[(String, String)], k: &str| list.iter().any(|(x, _)| x == k);
    let new_template = has(&new, "overlap-check") || has(&new, "overlap-check.template");
    let new_total = has(&new, "cache-size");
    let mut joined = new.clone();
    for (k, v) in old.iter().flat_map(|l| parse_kv_list(l)) {
        let replaced = has(&new, &k)
            || (new_template && k.starts_with("overlap-check"))
            || (new_total && (k == "l2-cache-size" || k == "refcount-cache-size"));
        if !replaced {
            joined.push((k, v));
        }
    }
    let any_cache = ["cache-size", "l2-cache-size", "refcount-cache-size"]
        .iter()
        .any(|k| has(&joined, k));
    if any_cache && !new_total {
        joined.retain(|(k, _)| k != "cache-size");
    }
    joined
        .into_iter()
        .map(|(k, v)| format!("{k}={}", v.replace(',', ",,")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::join_runtime;

    #[test]
    fn reopen_joins_options_like_qemu() {
        let j = |old: &[&str], new: &[&str]| {
            let o: Vec<String> = old.iter().map(|s| s.to_string()).collect();
            let n: Vec<String> = new.iter().map(|s| s.to_string()).collect();
            join_runtime(&o, &n).join(",")
        };
        assert_eq!(j(&["a=1,b=2"], &["b=3"]), "b=3,a=1");
        assert_eq!(
            j(
                &["overlap-check.main-header=off,x=1"],
                &["overlap-check=all"]
            ),
            "overlap-check=all,x=1"
        );
        assert_eq!(
            j(
                &["l2-cache-size=1M,refcount-cache-size=1M"],
                &["cache-size=4M"]
            ),
            "cache-size=4M"
        );
        assert_eq!(
            j(
                &["cache-size=1M,l2-cache-size=512k"],
                &["refcount-cache-size=128k"]
            ),
            "refcount-cache-size=128k,l2-cache-size=512k"
        );
        assert_eq!(j(&["file.filename=a,,b"], &[]), "file.filename=a,,b");
    }
}
