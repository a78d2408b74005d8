//! `qimg io`: a qemu-io compatible subset, for poking images the way QEMU's test suite does.
//!
//! Commands: `read`/`r`, `write`/`w`, `readv`, `writev`, `discard`/`d`, `flush`/`f`,
//! `aio_read`, `aio_write`, `aio_flush`, `length`/`l`, `alloc`/`a`, `map`, `truncate`/`t`,
//! `open`/`o`, `close`/`c`, `sleep`, `sigraise`, `abort`, `quit`/`q`.
//! Output lines, number parsing, error messages and the exit status (1 if any synchronous
//! command failed) follow qemu-io 10. Asynchronous requests run concurrently and report when
//! they complete. The image on the command line is optional, as in qemu-io: `open` opens one
//! later, and commands that need one say "no file open" until then.
//!
//! Without `-c`, commands are read from standard input, one per line, each preceded by qemu-io's
//! prompt (`<prog>> `, printed whether or not the input is a terminal, as qemu-io does: scripts
//! filter it out), until `quit` or the end of the input.

use super::opts::{open, ImageArgs};
use super::prog;
use qimg::block::{BlockDevice, ZeroFlags};
use qimg::{Error, IoBufMut};
use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

#[derive(clap::Args)]
// qemu-io takes the last of a repeated option (the iotests pass `-f` twice: their own and the test's).
#[command(args_override_self = true)]
pub struct Args {
    /// Image format (probed if not given)
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// The image name is an option list (driver=qcow2,file.filename=NAME,...)
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// Share the image with other users, writers included (read-only only)
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Open read-only
    #[arg(short = 'r', long = "read-only")]
    read_only: bool,
    /// Runtime options (l2-cache-size=..., cache-clean-interval=...)
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Host cache mode (writeback, writethrough, none, directsync, unsafe); qemu-io's default,
    /// writethrough: every write is flushed before it completes
    #[arg(short = 't', long = "cache")]
    cache: Option<String>,
    /// Bypass the host page cache (same as -t none)
    #[arg(short = 'n', long = "nocache")]
    nocache: bool,
    /// How file I/O is issued: threads or io_uring (native is refused)
    #[arg(short = 'i', long = "aio")]
    aio: Option<String>,
    /// Snapshot mode: writes go to a temporary overlay, dropped at exit; the image is untouched
    #[arg(short = 's', long = "snapshot")]
    snapshot: bool,
    /// Copy-on-read: what reads fetch from the backing chain is also written into the image
    #[arg(short = 'C', long = "copy-on-read")]
    copy_on_read: bool,
    /// Command to run (repeatable)
    #[arg(short = 'c', long = "cmd")]
    cmds: Vec<String>,
    /// The image (optional: the `open` command opens one later)
    filename: Option<String>,
}

/// Opens the image, or with `snapshot` (`-s`) a temporary overlay over it.
async fn open_image_args(a: &ImageArgs<'_>, snapshot: bool) -> qimg::Result<Dev> {
    if !snapshot {
        return open(a).await;
    }
    let (path, opts) = super::opts::open_options(a)?;
    super::opts::open_temporary_overlay(&path, &opts).await
}

/// qemu-io's cache mode when none is given (for the command line and `open`).
const DEFAULT_CACHE: &str = "writethrough";

/// Largest single request qemu-io accepts.
const MAX_REQUEST: u64 = 2147483136;

pub async fn run(a: Args) -> u8 {
    let cache = if a.nocache {
        Some("none".to_string())
    } else {
        Some(a.cache.clone().unwrap_or_else(|| DEFAULT_CACHE.to_string()))
    };
    let mut session = Session {
        img: None,
        params: None,
        aio: JoinSet::new(),
        failed: false,
    };
    if a.image_opts && a.format.is_some() {
        eprintln!("{}: --image-opts and -f are mutually exclusive", prog());
        return 1;
    }
    if let Some(filename) = &a.filename {
        let params = OpenParams {
            path: filename.clone(),
            format: a.format.clone(),
            image_opts: a.image_opts,
            read_only: a.read_only,
            cache: cache.clone(),
            runtime: a.options.clone(),
            force_share: a.force_share,
            aio: a.aio.clone(),
            snapshot: a.snapshot,
            copy_on_read: a.copy_on_read,
        };
        match params.open().await {
            Ok(i) => {
                session.img = Some(i);
                session.params = Some(params);
            }
            Err(e) if a.image_opts => {
                eprintln!("{}: can't open: {e}", prog());
                return 1;
            }
            Err(e) => {
                eprintln!("{}: can't open device {filename}: {e}", prog());
                return 1;
            }
        }
    }
    if a.cmds.is_empty() {
        session.interactive().await;
    }
    for c in &a.cmds {
        if !session.command(c).await {
            break;
        }
    }
    if !session.close().await {
        session.failed = true;
    }
    u8::from(session.failed)
}

struct Session {
    /// The open image (`None` before the first `open`, after `close`).
    img: Option<Arc<dyn BlockDevice>>,
    /// How it was opened (for `reopen`).
    params: Option<OpenParams>,
    aio: JoinSet<()>,
    failed: bool,
}

/// How the image was opened: what `reopen` changes and opens again.
#[derive(Clone)]
struct OpenParams {
    path: String,
    format: Option<String>,
    image_opts: bool,
    read_only: bool,
    cache: Option<String>,
    runtime: Vec<String>,
    force_share: bool,
    aio: Option<String>,
    snapshot: bool,
    /// `-C`: see `qimg::copy_on_read`.
    copy_on_read: bool,
}

impl OpenParams {
    async fn open(&self) -> qimg::Result<Dev> {
        let img = open_image_args(
            &ImageArgs {
                image_opts: self.image_opts,
                path: &self.path,
                format: self.format.as_deref(),
                read_only: self.read_only,
                cache: self.cache.as_deref(),
                runtime_opts: &self.runtime,
                no_backing: false,
                batch: false,
                force_share: self.force_share,
                metadata_only: false,
                aio: self.aio.as_deref(),
            },
            self.snapshot,
        )
        .await?;
        if !self.copy_on_read {
            return Ok(img);
        }
        match qimg::copy_on_read::CopyOnRead::wrap(img.clone()) {
            Ok(cor) => Ok(cor),
            Err(e) => {
                let _ = img.close().await;
                Err(e)
            }
        }
    }
}

type Dev = Arc<dyn BlockDevice>;

/// Commands that work on the open image (qemu-io answers "no file open" for them without one).
fn is_image_command(name: &str) -> bool {
    matches!(
        name,
        "read"
            | "r"
            | "readv"
            | "write"
            | "w"
            | "writev"
            | "aio_read"
            | "aio_write"
            | "aio_flush"
            | "discard"
            | "d"
            | "flush"
            | "f"
            | "length"
            | "l"
            | "alloc"
            | "a"
            | "map"
            | "truncate"
            | "reopen"
            | "t"
            | "info"
            | "i"
            | "break"
            | "remove_break"
            | "resume"
            | "wait_break"
    )
}

/// qemu-io's `info`: the format, its cluster size and where the VM state would start, and
/// the format specific information, as qemu-io prints them.
fn info(img: &Dev, args: &[&str]) -> bool {
    if !args.is_empty() {
        eprintln!(
            "bad argument count {} to info, expected 0 arguments",
            args.len()
        );
        return false;
    }
    println!("format name: {}", img.format().name());
    let (cluster, vm_state) = match img.as_qcow2() {
        Some(q) => {
            let g = q.geometry();
            // The VM state lives right after the guest disk's last L2 table's range.
            let per_l2 = g.cluster_size() * g.l2_entries();
            (g.cluster_size(), q.virtual_size().div_ceil(per_l2) * per_l2)
        }
        None => (0, 0),
    };
    println!("cluster size: {}", cvtstr(cluster as f64));
    println!("vm state offset: {}", cvtstr(vm_state as f64));
    if let Some(q) = img.as_qcow2() {
        print!("{}", super::info::format_specific(q));
    }
    true
}

/// qemu-io's breakpoint commands on the image's `blkdebug` node: `break EVENT TAG`,
/// `remove_break TAG`, `resume TAG`, `wait_break TAG`, with qemu-io's messages.
async fn breakpoint(img: &Dev, name: &str, args: &[&str]) -> bool {
    let want = if name == "break" { 2 } else { 1 };
    if args.len() != want {
        eprintln!(
            "bad argument count {} to {name}, expected {want} arguments",
            args.len()
        );
        return false;
    }
    let handle = img.debug_handle();
    let failed = |what: String, e: std::io::Error| {
        println!("{what}: {}", qimg::error::strerror(&e));
        false
    };
    let enotsup = || std::io::Error::from_raw_os_error(95);
    match (name, handle) {
        ("break", Some(h)) => {
            // QEMU prints the node's messages on standard output, in order with ours.
            h.set_reporter(|m| {
                println!("{m}");
                let _ = std::io::stdout().flush();
            });
            match h.break_at(args[0], args[1]) {
                Ok(()) => true,
                Err(e) => failed("Could not set breakpoint".into(), e),
            }
        }
        ("break", None) => failed("Could not set breakpoint".into(), enotsup()),
        ("remove_break", h) => {
            match h.map_or_else(|| Err(enotsup()), |h| h.remove_break(args[0])) {
                Ok(()) => true,
                Err(e) => failed(format!("Could not remove breakpoint {}", args[0]), e),
            }
        }
        ("resume", h) => match h.map_or_else(|| Err(enotsup()), |h| h.resume(args[0])) {
            Ok(()) => true,
            Err(e) => failed("Could not resume request".into(), e),
        },
        (_, Some(h)) => {
            h.wait_suspended(args[0]).await;
            true
        }
        // Nothing can ever be suspended (qemu-io would wait forever): refused.
        (_, None) => {
            println!("Could not wait for a breakpoint: the image has no blkdebug node");
            false
        }
    }
}

/// `truncate [-m PREALLOC] SIZE`: changes the image's size, either way (qemu-io passes no
/// `--shrink`), preallocating a grown area as `-m` says.
async fn truncate(img: &Dev, args: &[&str]) -> bool {
    if args.is_empty() || args.len() > 3 {
        eprintln!(
            "bad argument count {} to truncate, expected between 1 and 3 arguments",
            args.len()
        );
        return false;
    }
    let mut size = None;
    let mut prealloc = qimg::qcow2::Preallocation::Off;
    let mut i = 0;
    while i < args.len() {
        if args[i] == "-m" && i + 1 < args.len() {
            let mode = args[i + 1];
            match qimg::qcow2::Preallocation::parse(mode) {
                Ok(p) => prealloc = p,
                Err(_) => {
                    eprintln!("{}: Invalid preallocation mode '{mode}'", prog());
                    return false;
                }
            }
            i += 2;
            continue;
        }
        let Some(n) = cvtnum(args[i]) else {
            return false;
        };
        size = Some(n);
        i += 1;
    }
    let Some(size) = size else {
        eprintln!(
            "bad argument count {} to truncate, expected between 1 and 3 arguments",
            args.len()
        );
        return false;
    };
    match img.resize(size, prealloc).await {
        Ok(()) => true,
        Err(e) => {
            eprintln!("{}: {e}", prog());
            false
        }
    }
}

/// `sleep MILLISECONDS`.
async fn sleep(args: &[&str]) -> bool {
    let [ms] = args[..] else {
        eprintln!(
            "bad argument count {} to sleep, expected 1 arguments",
            args.len()
        );
        return false;
    };
    let Some(ms) = cvtnum(ms) else {
        return false;
    };
    tokio::time::sleep(Duration::from_millis(ms)).await;
    true
}

/// `sigraise SIGNAL`: raises a signal against this process, after flushing what was printed
/// (the iotests use it with SIGKILL to leave an image as a killed process leaves it).
fn sigraise(args: &[&str]) -> bool {
    let [arg] = args[..] else {
        eprintln!(
            "bad argument count {} to sigraise, expected 1 arguments",
            args.len()
        );
        return false;
    };
    let Some(sig) = cvtnum(arg) else {
        return false;
    };
    let Ok(sig) = i32::try_from(sig)
        .map_err(|_| ())
        .and_then(|s| if s < 65 { Ok(s) } else { Err(()) })
    else {
        println!("signal argument '{arg}' is too large to be a valid signal");
        return false;
    };
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: raise() has no memory-safety preconditions; the signal's disposition decides what
    // happens next, as for qemu-io.
    unsafe {
        libc::raise(sig);
    }
    true
}

/// How much of `[offset, offset + len)`, from its start, this layer alone defines (data or
/// zeros) or leaves to its backing file: `(allocated, bytes)`, `bytes` 0 at or past the end.
async fn layer_allocation(img: &Dev, offset: u64, len: u64) -> qimg::Result<(bool, u64)> {
    let size = img.size();
    if offset >= size || len == 0 {
        return Ok((false, 0));
    }
    let len = len.min(size - offset);
    let st = img.block_status(offset, len).await?;
    Ok((st.allocated, st.len.clamp(1, len)))
}

/// `alloc OFFSET [COUNT]`: how many bytes of the range the image itself allocates (its backing
/// file's do not count), as qemu-io prints it.
async fn alloc(img: &Dev, args: &[&str]) -> bool {
    if args.is_empty() || args.len() > 2 {
        eprintln!(
            "bad argument count {} to alloc, expected between 1 and 2 arguments",
            args.len()
        );
        return false;
    }
    let Some(start) = cvtnum(args[0]) else {
        return false;
    };
    let mut count = 512;
    if let Some(c) = args.get(1) {
        let Some(c) = cvtnum(c) else { return false };
        count = c;
    }
    let (mut offset, mut remaining, mut sum) = (start, count, 0u64);
    while remaining > 0 {
        match layer_allocation(img, offset, remaining).await {
            Err(e) => {
                println!("is_allocated failed: {}", errno_text(&e));
                return false;
            }
            Ok((_, 0)) => {
                count -= remaining;
                remaining = 0;
            }
            Ok((allocated, n)) => {
                offset += n;
                remaining -= n;
                if allocated {
                    sum += n;
                }
            }
        }
    }
    println!(
        "{sum}/{count} bytes allocated at offset {}",
        cvtstr(start as f64)
    );
    true
}

/// `map`: the image's own allocation, extent by extent (runs of the same state merged).
async fn map(img: &Dev, args: &[&str]) -> bool {
    if !args.is_empty() {
        eprintln!(
            "bad argument count {} to map, expected 0 arguments",
            args.len()
        );
        return false;
    }
    let size = img.size();
    let mut offset = 0;
    while offset < size {
        let mut run = 0;
        let mut first = None;
        loop {
            match layer_allocation(img, offset + run, size - offset - run).await {
                Err(e) => {
                    eprintln!(
                        "{}: Failed to get allocation status: {}",
                        prog(),
                        errno_text(&e)
                    );
                    return false;
                }
                Ok((_, 0)) => break,
                Ok((allocated, n)) if first.is_none_or(|f| f == allocated) => {
                    first = Some(allocated);
                    run += n;
                }
                Ok(_) => break,
            }
        }
        let Some(allocated) = first else {
            eprintln!("{}: Unexpected end of image", prog());
            return false;
        };
        println!(
            "{} ({run:#x}) bytes {} at offset {} ({offset:#x})",
            cvtstr(run as f64),
            if allocated {
                "    allocated"
            } else {
                "not allocated"
            },
            cvtstr(offset as f64),
        );
        offset += run;
    }
    true
}

/// Parsed flags of read/write style commands.
#[derive(Default)]
struct Flags {
    pattern: Option<u8>,
    pattern_off: Option<u64>,
    pattern_len: Option<u64>,
    machine: bool,
    quiet: bool,
    verbose: bool,
    zero: bool,
    unmap: bool,
    compress: bool,
    no_fallback: bool,
    /// `-f`: Force Unit Access: the write is durable when it completes.
    fua: bool,
    /// `-i` (aio): account the request as invalid instead of doing it.
    invalid: bool,
}

impl Session {
    /// Reads commands from standard input until `quit` or its end.
    async fn interactive(&mut self) {
        loop {
            print!("{}> ", prog());
            let _ = std::io::stdout().flush();
            // A blocking read on its own thread: asynchronous requests keep completing meanwhile.
            let read = tokio::task::spawn_blocking(|| {
                let mut line = String::new();
                std::io::stdin().read_line(&mut line).map(|n| (n, line))
            })
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
            let line = match read {
                Ok((0, _)) => break,
                Ok((_, line)) => line,
                Err(e) => {
                    eprintln!("{}: reading commands: {e}", prog());
                    self.failed = true;
                    break;
                }
            };
            if !self.command(line.trim_end_matches(['\n', '\r'])).await {
                break;
            }
        }
    }

    /// Runs one command line; returns false to stop (quit).
    async fn command(&mut self, line: &str) -> bool {
        let words: Vec<&str> = line.split(' ').filter(|w| !w.is_empty()).collect();
        let Some((&name, args)) = words.split_first() else {
            return true;
        };
        let ok = match name {
            "quit" | "q" => return false,
            "open" | "o" => self.open(args).await,
            "sleep" => sleep(args).await,
            "sigraise" => sigraise(args),
            // qemu-io's `abort`: ends the process as a crash would (the iotests use it to leave
            // an image the way a crashed process leaves it).
            "abort" => std::process::abort(),
            "close" | "c" if self.img.is_none() => {
                eprintln!("no file open, try 'help open'");
                false
            }
            "close" | "c" => self.close().await,
            "reopen" if self.img.is_some() => self.reopen(args).await,
            _ => match self.img.clone() {
                Some(img) => self.image_command(&img, name, args).await,
                None if is_image_command(name) => {
                    eprintln!("no file open, try 'help open'");
                    false
                }
                None => {
                    eprintln!("command \"{name}\" not found");
                    false
                }
            },
        };
        if !ok {
            self.failed = true;
        }
        let _ = std::io::stdout().flush();
        true
    }

    /// Runs a command that needs the open image; returns whether it succeeded.
    async fn image_command(&mut self, img: &Dev, name: &str, args: &[&str]) -> bool {
        // qemu-io takes the write permission before a writing command runs.
        let writes = matches!(
            name,
            "write" | "w" | "writev" | "aio_write" | "discard" | "d" | "truncate" | "t"
        );
        if writes && img.read_only() {
            eprintln!("{}: Block node is read-only", prog());
            return false;
        }
        match name {
            "read" | "r" => self.rw(img, name, "read", args, false).await,
            "readv" => self.rw(img, name, "readv", args, true).await,
            "write" | "w" => self.rw(img, name, "write", args, false).await,
            "writev" => self.rw(img, name, "writev", args, true).await,
            "aio_read" => self.aio(img, name, false, args),
            "aio_write" => self.aio(img, name, true, args),
            "discard" | "d" => self.discard(img, name, args).await,
            "alloc" | "a" => alloc(img, args).await,
            "map" => map(img, args).await,
            "truncate" | "t" => truncate(img, args).await,
            "flush" | "f" => {
                if !args.is_empty() {
                    eprintln!(
                        "bad argument count {} to flush, expected 0 arguments",
                        args.len()
                    );
                    false
                } else {
                    match img.flush().await {
                        Ok(()) => true,
                        Err(e) => {
                            println!("flush failed: {}", errno_text(&e));
                            false
                        }
                    }
                }
            }
            "aio_flush" => {
                self.drain().await;
                match img.flush().await {
                    Ok(()) => true,
                    Err(e) => {
                        println!("aio_flush failed: {}", errno_text(&e));
                        false
                    }
                }
            }
            "length" | "l" => {
                println!("{}", cvtstr(img.size() as f64));
                true
            }
            "break" | "remove_break" | "resume" | "wait_break" => breakpoint(img, name, args).await,
            "info" | "i" => info(img, args),
            other => {
                eprintln!("command \"{other}\" not found");
                false
            }
        }
    }

    async fn drain(&mut self) {
        while self.aio.join_next().await.is_some() {}
    }

    /// `close`: waits for asynchronous requests, then closes the image (flushing it). Returns
    /// false if closing failed; closing nothing succeeds, as in qemu-io.
    async fn close(&mut self) -> bool {
        self.drain().await;
        let Some(img) = self.img.take() else {
            return true;
        };
        match img.close().await {
            Ok(()) => true,
            Err(e) => {
                eprintln!("{}: {e}", prog());
                false
            }
        }
    }

    /// `open [-rsCnU] [-i AIO] [-t CACHE] [-o OPTIONS] PATH`, as qemu-io's (`-s`: a temporary
    /// overlay, `-C`: copy-on-read). `-k` (Linux AIO) and `-d` (discard mode) are not
    /// implemented and are refused.
    async fn open(&mut self, args: &[&str]) -> bool {
        const USAGE: &str = "open [-rsCnkU] [-t cache] [-d discard] [-o options] [path] -- open the file specified by path";
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
                    'k' | 'd' => {
                        let what = match c {
                            'k' => "-k (Linux AIO)",
                            _ => "-d (discard modes)",
                        };
                        eprintln!("open: {what} is not supported");
                        return false;
                    }
                    't' | 'i' | 'o' => {
                        let rest: String = chars.by_ref().collect();
                        let value = if !rest.is_empty() {
                            rest
                        } else if i < args.len() {
                            i += 1;
                            args[i - 1].to_string()
                        } else {
                            println!("{USAGE}");
                            return false;
                        };
                        match c {
                            't' => cache = Some(value),
                            'i' => aio = Some(value),
                            _ => options.push(value),
                        }
                    }
                    other => {
                        eprintln!("open: invalid option -- '{other}'");
                        println!("{USAGE}");
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
                println!("{USAGE}");
                return false;
            }
        };
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
    async fn reopen(&mut self, args: &[&str]) -> bool {
        const USAGE: &str =
            "reopen [(-r|-w)] [-c cache] [-o options] -- reopens an image with new options";
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
                println!("{USAGE}");
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
                            println!("{USAGE}");
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
                        println!("{USAGE}");
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
        new.runtime.extend(options);
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
        if let Err(e) = super::opts::open_options(&check) {
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

    /// Parses flags; returns the flags and the positional arguments.
    fn parse<'a>(cmd: &str, args: &[&'a str], allowed: &str) -> Option<(Flags, Vec<&'a str>)> {
        let mut f = Flags::default();
        let mut pos = Vec::new();
        let mut i = 0;
        while i < args.len() {
            let a = args[i];
            if a.len() < 2 || !a.starts_with('-') || a.as_bytes()[1].is_ascii_digit() {
                pos.push(a);
                i += 1;
                continue;
            }
            let mut chars = a[1..].chars();
            while let Some(c) = chars.next() {
                if !allowed.contains(c) {
                    eprintln!("{cmd}: invalid option -- '{c}'");
                    return None;
                }
                let takes_arg = matches!(c, 'P' | 's' | 'l');
                let value = if takes_arg {
                    let rest: String = chars.by_ref().collect();
                    if !rest.is_empty() {
                        Some(rest)
                    } else if i + 1 < args.len() {
                        i += 1;
                        Some(args[i].to_string())
                    } else {
                        eprintln!("{cmd}: option requires an argument -- '{c}'");
                        return None;
                    }
                } else {
                    None
                };
                match (c, value) {
                    ('P', Some(v)) => match parse_pattern(&v) {
                        Some(p) => f.pattern = Some(p),
                        None => {
                            println!("{v} is not a valid pattern byte");
                            return None;
                        }
                    },
                    ('s', Some(v)) => f.pattern_off = Some(cvtnum(&v)?),
                    ('l', Some(v)) => f.pattern_len = Some(cvtnum(&v)?),
                    ('C', _) => f.machine = true,
                    ('q', _) => f.quiet = true,
                    ('v', _) => f.verbose = true,
                    ('z', _) => f.zero = true,
                    ('u', _) => f.unmap = true,
                    ('c', _) => f.compress = true,
                    ('n', _) => f.no_fallback = true,
                    ('b', _) => {
                        // The VM-state area is not implemented: ignoring -b
                        // would touch guest data instead.
                        eprintln!("{cmd}: -b (VM-state area) is not supported");
                        return None;
                    }
                    ('f', _) => f.fua = true,
                    ('i', _) => f.invalid = true,
                    // qemu-io: `-p` is "ignored for backwards compatibility"; `-r` registers the
                    // buffer with the block layer, a performance hint with no effect on what is
                    // read or written (our buffers need no registration).
                    ('p' | 'r', _) => {}
                    _ => {}
                }
            }
            i += 1;
        }
        Some((f, pos))
    }

    async fn rw(
        &mut self,
        img: &Dev,
        cmd: &str,
        kind: &str,
        args: &[&str],
        vectored: bool,
    ) -> bool {
        let write = kind.starts_with('w');
        let allowed = match (write, vectored) {
            (false, false) => "CqvPslpb",
            (false, true) => "CqvPr",
            (true, false) => "CqzuPcnfpbr",
            (true, true) => "CqPfr",
        };
        let Some((f, pos)) = Self::parse(cmd, args, allowed) else {
            return false;
        };
        if pos.len() < 2 || (!vectored && pos.len() > 2) {
            eprintln!(
                "bad argument count {} to {kind}, expected at least 2 arguments",
                args.len()
            );
            return false;
        }
        let Some(offset) = cvtnum(pos[0]) else {
            return false;
        };
        let mut len = 0u64;
        for p in &pos[1..] {
            let Some(n) = cvtnum(p) else { return false };
            if vectored && n > MAX_REQUEST {
                println!("Argument '{p}' exceeds maximum size {MAX_REQUEST}");
                return false;
            }
            len += n;
        }
        if write {
            if f.zero && f.pattern.is_some() {
                println!("Only one of -z, -P, and -s can be specified at the same time");
                return false;
            }
            if f.unmap && !f.zero {
                println!("-u requires -z to be specified");
                return false;
            }
            if f.no_fallback && !f.zero {
                println!("-n requires -z to be specified");
                return false;
            }
            if len > MAX_REQUEST && !(f.zero && f.no_fallback) {
                println!(
                    "length cannot exceed {MAX_REQUEST} without -n, given {}",
                    pos[1]
                );
                return false;
            }
        } else if len > MAX_REQUEST {
            println!("length cannot exceed {MAX_REQUEST}, given {}", pos[1]);
            return false;
        }
        if f.compress && (offset % 512 != 0 || len % 512 != 0) {
            let (what, v) = if offset % 512 != 0 {
                ("offset", offset)
            } else {
                ("count", len)
            };
            println!("{v} is not a sector-aligned value for '{what}'");
            return false;
        }
        let start = Instant::now();
        let result = if write {
            Self::do_write(img, offset, len, &f).await.map(|_| None)
        } else {
            img.read(offset, IoBufMut::zeroed(len as usize))
                .await
                .map(Some)
        };
        let elapsed = start.elapsed();
        match result {
            Err(e) => {
                println!("{kind} failed: {}", errno_text(&e));
                false
            }
            Ok(data) => {
                let mut ok = true;
                if let Some(buf) = &data {
                    ok = verify(kind, buf, offset, &f);
                    if f.verbose && !f.quiet {
                        dump_buffer(buf, offset);
                    }
                }
                if !f.quiet {
                    print_report(
                        if write { "wrote" } else { "read" },
                        elapsed,
                        offset,
                        len,
                        f.machine,
                    );
                }
                ok
            }
        }
    }

    async fn do_write(img: &Dev, offset: u64, len: u64, f: &Flags) -> qimg::Result<()> {
        Self::write_once(img, offset, len, f).await?;
        if f.fua {
            // FUA: durable before the write is reported complete.
            img.flush().await?;
        }
        Ok(())
    }

    async fn write_once(img: &Dev, offset: u64, len: u64, f: &Flags) -> qimg::Result<()> {
        if f.compress {
            let mut buf = IoBufMut::zeroed(len as usize);
            buf.fill(f.pattern.unwrap_or(0xcd));
            return match img.as_qcow2() {
                Some(q) => q.write_compressed(offset, buf.freeze()).await,
                None => Err(qimg::Error::unsupported(
                    "compressed writes need a qcow2 image",
                )),
            };
        }
        if f.zero {
            let flags = ZeroFlags {
                may_unmap: f.unmap,
                fast_only: f.no_fallback,
            };
            return img.write_zeroes(offset, len, flags).await;
        }
        let byte = f.pattern.unwrap_or(0xcd);
        let mut buf = IoBufMut::zeroed(len as usize);
        buf.fill(byte);
        img.write(offset, buf.freeze()).await
    }

    async fn discard(&mut self, img: &Dev, cmd: &str, args: &[&str]) -> bool {
        let Some((f, pos)) = Self::parse(cmd, args, "Cq") else {
            return false;
        };
        if pos.len() != 2 {
            eprintln!(
                "bad argument count {} to discard, expected 2 arguments",
                args.len()
            );
            return false;
        }
        let (Some(offset), Some(len)) = (cvtnum(pos[0]), cvtnum(pos[1])) else {
            return false;
        };
        if len > MAX_REQUEST {
            println!("length cannot exceed {MAX_REQUEST}, given {}", pos[1]);
            return false;
        }
        let start = Instant::now();
        match img.discard(offset, len).await {
            Err(e) => {
                println!("discard failed: {}", errno_text(&e));
                false
            }
            Ok(()) => {
                if !f.quiet {
                    print_report("discard", start.elapsed(), offset, len, f.machine);
                }
                true
            }
        }
    }

    /// Starts an asynchronous request; its report is printed when it completes.
    fn aio(&mut self, img: &Dev, cmd: &str, write: bool, args: &[&str]) -> bool {
        let allowed = if write { "CfiqruzP" } else { "CiqrvP" };
        let Some((f, pos)) = Self::parse(cmd, args, allowed) else {
            return false;
        };
        if f.invalid {
            // qemu-io only counts such a request in its statistics; it does no I/O.
            println!(
                "injecting invalid {} request",
                if write { "write" } else { "read" }
            );
            return true;
        }
        if pos.len() < 2 {
            eprintln!(
                "bad argument count {} to {cmd}, expected at least 2 arguments",
                args.len()
            );
            return false;
        }
        let Some(offset) = cvtnum(pos[0]) else {
            return false;
        };
        let mut len = 0;
        for p in &pos[1..] {
            let Some(n) = cvtnum(p) else { return false };
            len += n;
        }
        if write && f.zero && pos.len() > 2 {
            println!("-z supports only a single length parameter");
            return false;
        }
        if f.unmap && !f.zero {
            println!("-u requires -z to be specified");
            return false;
        }
        let img = img.clone();
        self.aio.spawn(async move {
            let start = Instant::now();
            if write {
                let r = if f.zero {
                    img.write_zeroes(
                        offset,
                        len,
                        ZeroFlags {
                            may_unmap: f.unmap,
                            fast_only: false,
                        },
                    )
                    .await
                } else {
                    let mut b = IoBufMut::zeroed(len as usize);
                    b.fill(f.pattern.unwrap_or(0xcd));
                    img.write(offset, b.freeze()).await
                };
                let r = match r {
                    Ok(()) if f.fua => img.flush().await,
                    r => r,
                };
                match r {
                    Ok(()) if !f.quiet => {
                        print_report("wrote", start.elapsed(), offset, len, f.machine)
                    }
                    Ok(()) => {}
                    Err(e) => println!("aio_write failed: {}", errno_text(&e)),
                }
            } else {
                let read = img.read(offset, IoBufMut::zeroed(len as usize)).await;
                // Everything this completion prints comes out together (the lock is reentrant).
                let _out = std::io::stdout().lock();
                match read {
                    Ok(buf) => {
                        if let Some(p) = f.pattern {
                            if buf.iter().any(|&b| b != p) {
                                println!(
                                    "Pattern verification failed at offset {offset}, {len} bytes"
                                );
                            }
                        }
                        if f.verbose && !f.quiet {
                            dump_buffer(&buf, offset);
                        }
                        if !f.quiet {
                            print_report("read", start.elapsed(), offset, len, f.machine);
                        }
                    }
                    Err(e) => println!("readv failed: {}", errno_text(&e)),
                }
            }
            let _ = std::io::stdout().flush();
        });
        true
    }
}

/// `read -P` verification; prints qemu-io's message and returns false on mismatch.
fn verify(kind: &str, buf: &[u8], offset: u64, f: &Flags) -> bool {
    let Some(p) = f.pattern else { return true };
    let start = f.pattern_off.unwrap_or(0);
    let count = f
        .pattern_len
        .unwrap_or(buf.len() as u64 - start.min(buf.len() as u64));
    if start + count > buf.len() as u64 {
        println!("pattern verification range exceeds end of read data");
        return false;
    }
    let range = &buf[start as usize..(start + count) as usize];
    if range.iter().any(|&b| b != p) {
        if kind == "readv" {
            println!(
                "Pattern verification failed at offset {offset}, {} bytes",
                buf.len()
            );
        } else {
            println!(
                "Pattern verification failed at offset {}, {count} bytes",
                offset + start
            );
        }
        return false;
    }
    true
}

fn parse_pattern(v: &str) -> Option<u8> {
    let n = if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        i64::from_str_radix(h, 16).ok()?
    } else if v.len() > 1 && v.starts_with('0') {
        i64::from_str_radix(&v[1..], 8).ok()?
    } else {
        v.parse::<i64>().ok()?
    };
    u8::try_from(n).ok()
}

/// qemu-io's number parser (qemu_strtosz), with its error messages.
fn cvtnum(s: &str) -> Option<u64> {
    let hex_with_suffix = (s.starts_with("0x") || s.starts_with("0X"))
        && s[2..].chars().any(|c| !c.is_ascii_hexdigit());
    match qimg::size::parse_size(s) {
        Ok(v) if !hex_with_suffix => Some(v),
        Err(qimg::size::SizeError::TooLarge) => {
            println!("Parsing error: argument too large -- {s}");
            None
        }
        _ => {
            println!(
                "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {s}"
            );
            None
        }
    }
}

/// The two report lines after each request.
fn print_report(op: &str, t: Duration, offset: u64, count: u64, machine: bool) {
    let secs = t.as_secs_f64().max(1e-9);
    if machine {
        println!(
            "{count},1,{},{:.3},{:.3}",
            timestr(t, true),
            count as f64 / secs,
            1.0 / secs
        );
        return;
    }
    // One write: reports of concurrent requests must not interleave line by line.
    print!(
        "{op} {count}/{count} bytes at offset {offset}\n{}, 1 ops; {} ({}/sec and {:.4} ops/sec)\n",
        cvtstr(count as f64),
        timestr(t, false),
        cvtstr(count as f64 / secs),
        1.0 / secs
    );
}

/// qemu-io's human size (`64 KiB`, `1.500 KiB`, `40 bytes`).
fn cvtstr(v: f64) -> String {
    const UNITS: [(f64, &str); 6] = [
        ((1u64 << 60) as f64, "EiB"),
        ((1u64 << 50) as f64, "PiB"),
        ((1u64 << 40) as f64, "TiB"),
        ((1u64 << 30) as f64, "GiB"),
        ((1u64 << 20) as f64, "MiB"),
        ((1u64 << 10) as f64, "KiB"),
    ];
    let (s, suffix) = match UNITS.iter().find(|(u, _)| v >= *u) {
        Some((u, name)) => (format!("{:.3}", v / u), format!(" {name}")),
        None => (format!("{v:.6}"), " bytes".to_string()),
    };
    match s.find(".000") {
        Some(i) if s[i..].chars().skip(1).all(|c| c == '0') => format!("{}{suffix}", &s[..i]),
        _ => format!("{s}{suffix}"),
    }
}

/// qemu-io's elapsed time (`00.01 sec`, or `H:MM:SS.ss`).
fn timestr(t: Duration, always_hms: bool) -> String {
    let secs = t.as_secs();
    let frac = f64::from(t.subsec_nanos()) / 1e9;
    if secs == 0 && !always_hms {
        return format!("{frac:05.2} sec");
    }
    format!(
        "{}:{:02}:{:05.2}",
        secs / 3600,
        (secs / 60) % 60,
        (secs % 60) as f64 + frac
    )
}

/// `read -v`: 16 bytes per line, offset, hex, printable characters.
fn dump_buffer(buf: &[u8], offset: u64) {
    let mut out = String::new();
    for (i, line) in buf.chunks(16).enumerate() {
        out += &format!("{:08x}:  ", offset + i as u64 * 16);
        for b in line {
            out += &format!("{b:02x} ");
        }
        out.push(' ');
        for &b in line {
            out.push(if b.is_ascii_alphanumeric() {
                b as char
            } else {
                '.'
            });
        }
        out.push('\n');
    }
    print!("{out}");
}

/// The strerror text of an error, as qemu-io prints after "read failed: ".
pub fn errno_text(e: &Error) -> String {
    match e {
        Error::OutOfRange { .. } => "Input/output error".into(),
        Error::ReadOnly => "Block node is read-only".into(),
        other => qimg::error::strerror(&std::io::Error::from_raw_os_error(other.errno())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_like_qemu_io() {
        assert_eq!(cvtstr(0.0), "0 bytes");
        assert_eq!(cvtstr(40.0), "40 bytes");
        assert_eq!(cvtstr(511.5), "511.500000 bytes");
        assert_eq!(cvtstr(1024.0), "1 KiB");
        assert_eq!(cvtstr(1025.0), "1.001 KiB");
        assert_eq!(cvtstr(1536.0), "1.500 KiB");
        assert_eq!(cvtstr(65535.0), "63.999 KiB");
        assert_eq!(cvtstr(65536.0), "64 KiB");
        assert_eq!(cvtstr(100000.0), "97.656 KiB");
        assert_eq!(cvtstr(1048576.0), "1 MiB");
        assert_eq!(cvtstr(1073741824.0), "1 GiB");
    }

    #[test]
    fn times_like_qemu_io() {
        assert_eq!(timestr(Duration::from_millis(10), false), "00.01 sec");
        assert_eq!(timestr(Duration::from_millis(1500), false), "0:00:01.50");
        assert_eq!(timestr(Duration::from_millis(61250), false), "0:01:01.25");
    }

    #[test]
    fn patterns() {
        assert_eq!(parse_pattern("0xab"), Some(0xab));
        assert_eq!(parse_pattern("0101"), Some(65));
        assert_eq!(parse_pattern("65"), Some(65));
        assert_eq!(parse_pattern("256"), None);
        assert_eq!(parse_pattern("xyz"), None);
    }
}
