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
        let mut new = old.clone();
        if ro || rw {
            new.read_only = ro;
        }
        if cache.is_some() {
            new.cache = cache;
        }
        new.runtime = join_runtime(&old.runtime, &options);
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
