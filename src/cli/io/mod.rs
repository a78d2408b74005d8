//! `qimg io`: a qemu-io compatible subset, for poking images the way QEMU's test suite does.
//!
//! Commands: `read`/`r`, `write`/`w`, `readv`, `writev`, `discard`/`d`, `flush`/`f`,
//! `aio_read`, `aio_write`, `aio_flush`, `length`/`l`, `alloc`/`a`, `map`, `truncate`/`t`,
//! `open`/`o`, `close`/`c`, `reopen`, `info`/`i`, breakpoints, `sleep`, `sigraise`, `abort`,
//! `help`/`?`, `quit`/`q` (the table, with usage and help, is in `help`).
//! Output lines, number parsing, error messages and the exit status (1 if any synchronous
//! command failed) follow qemu-io 10. Asynchronous requests run concurrently and report when
//! they complete. The image on the command line is optional, as in qemu-io: `open` opens one
//! later, and commands that need one say "no file open" until then.
//!
//! Without `-c`, commands are read from standard input, one per line, each preceded by qemu-io's
//! prompt (`<prog>> `, printed whether or not the input is a terminal, as qemu-io does: scripts
//! filter it out), until `quit` or the end of the input; on a terminal with line editing,
//! history and completion of command names (`terminal`).

mod control;
mod help;
mod open;
mod report;
mod requests;
mod status;
mod terminal;

use super::opts::{open, ImageArgs};
use super::prog;
use control::{breakpoint, sigraise, sleep, truncate};
use qimg::block::BlockDevice;
use report::cvtstr;
pub use report::errno_text;
use status::{alloc, info, map};
use std::io::Write as _;
use std::sync::Arc;
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
    /// Discard mode: `unmap` (on, qemu-io's default: discards reach the image, zero writes may
    /// deallocate) or `ignore` (off: discards succeed and change nothing)
    #[arg(short = 'd', long = "discard")]
    discard: Option<String>,
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
    /// Misalign qemu-io's buffers in memory (for O_DIRECT tests): accepted, without effect on
    /// what is read or written or printed (qimg's own buffers are aligned as needed)
    #[arg(short = 'm', long = "misalign")]
    misalign: bool,
    /// Linux AIO (qemu-io -k): not implemented, refused (-i io_uring is)
    #[arg(short = 'k', long = "native-aio", hide = true)]
    native_aio: bool,
    /// QEMU trace events (qemu-io -T): refused (they would change the output; QIMG_LOG=debug
    /// logs)
    #[arg(short = 'T', long = "trace", hide = true)]
    trace: Option<String>,
    /// QEMU objects: secret,id=ID,data=TEXT|file=FILE[,format=raw|base64] (for encrypted
    /// images, which qimg cannot open yet); other object types are refused
    #[arg(long = "object", value_name = "OBJECT")]
    object: Vec<String>,
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

/// Prints the prompt and reads a line from standard input that is not a terminal (`None` at
/// its end). The read blocks on its own thread: asynchronous requests keep completing.
async fn read_plain_line(prompt: String) -> std::io::Result<Option<String>> {
    print!("{prompt}");
    let _ = std::io::stdout().flush();
    tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin()
            .read_line(&mut line)
            .map(|n| (n > 0).then_some(line))
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e)))
}

/// The runtime option `-d MODE` stands for (`open -d` too), or `None` after qemu-io's message
/// for a mode it does not know.
fn discard_option(mode: &str) -> Option<String> {
    match qimg::block_options::Discard::parse(mode) {
        Ok(_) => Some(format!("discard={mode}")),
        Err(_) => {
            eprintln!("{}: Invalid discard option: {mode}", prog());
            None
        }
    }
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
    let _ = a.misalign;
    let refused = if a.native_aio {
        Some("-k (Linux AIO) is not supported; use -i io_uring or -i threads".to_string())
    } else if a.trace.is_some() {
        Some("-T/--trace: QEMU's trace events are not supported (QIMG_LOG=debug logs)".into())
    } else {
        super::objects::define(&a.object)
            .err()
            .map(|e| e.to_string())
    };
    if let Some(msg) = refused {
        eprintln!("{}: {msg}", prog());
        return 1;
    }
    // `-d MODE` is the image's `discard=` option; one given with `-o` wins.
    let mut runtime = Vec::new();
    if let Some(mode) = &a.discard {
        match discard_option(mode) {
            Some(o) => runtime.push(o),
            None => return 1,
        }
    }
    runtime.extend(a.options.iter().cloned());
    if let Some(filename) = &a.filename {
        let params = OpenParams {
            path: filename.clone(),
            format: a.format.clone(),
            image_opts: a.image_opts,
            read_only: a.read_only,
            cache: cache.clone(),
            runtime,
            force_share: a.force_share,
            aio: a.aio.clone(),
            snapshot: a.snapshot,
            copy_on_read: a.copy_on_read,
            auto_read_only: false,
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
    /// QEMU's `auto-read-only`: a read-write open the file's permissions refuse opens read-only.
    auto_read_only: bool,
}

impl OpenParams {
    async fn open(&self) -> qimg::Result<Dev> {
        match self.open_as_given().await {
            Err(e) if self.auto_read_only && !self.read_only && refused_writing(&e) => {
                let ro = OpenParams {
                    read_only: true,
                    ..self.clone()
                };
                ro.open_as_given().await
            }
            r => r,
        }
    }

    async fn open_as_given(&self) -> qimg::Result<Dev> {
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

/// The file system or the file's permissions refused to open it for writing.
fn refused_writing(e: &qimg::Error) -> bool {
    matches!(e, qimg::Error::Io { source, .. }
        if matches!(source.raw_os_error(), Some(libc::EACCES | libc::EPERM | libc::EROFS)))
}

impl Session {
    /// Reads commands from standard input until `quit` or its end: with line editing on a
    /// terminal, plainly otherwise.
    async fn interactive(&mut self) {
        let mut terminal = terminal::Terminal::open();
        loop {
            let prompt = format!("{}> ", prog());
            let read = match &mut terminal {
                Some(t) => t.read_line(prompt).await,
                None => read_plain_line(prompt).await,
            };
            let line = match read {
                Ok(None) => break,
                Ok(Some(line)) => line,
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
            "help" | "?" => help::help(args),
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
                None if help::find(name).is_some_and(|c| c.needs_image) => {
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
}
