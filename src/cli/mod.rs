//! Command-line front end. One module per command; each parses its arguments, calls the
//! library, and prints what qemu-img (or qemu-io) would print. No engine logic lives here.

mod amend;
mod bench;
mod bitmap;
mod check;
mod commit;
mod compare;
mod convert;
mod create;
mod daemon;
mod dd;
mod image_name;
mod info;
mod io;
mod map;
mod measure;
mod objects;
mod opts;
mod progress;
mod rebase;
mod resize;
mod serve;
mod snapshot;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "qimg",
    version,
    about = "qcow2 disk image engine: create, inspect, check, compare and poke disk images",
    disable_help_subcommand = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a new disk image
    Create(create::Args),
    /// Show information about an image
    Info(info::Args),
    /// Show the allocation map of an image
    Map(map::Args),
    /// Check an image for consistency
    Check(check::Args),
    /// Compare the content of two images
    Compare(compare::Args),
    /// Run qemu-io style commands on an image
    Io(io::Args),
    /// Change the virtual size of an image (grow, or shrink with --shrink)
    Resize(resize::Args),
    /// Run a simple I/O benchmark (qemu-img bench)
    Bench(bench::Args),
    /// Export an image over NBD (qemu-nbd's command line)
    Serve(Box<serve::Args>),
    /// Copy images into a new one, converting the format, optionally compressed
    Convert(convert::Args),
    /// Change the backing file of an image, keeping what the guest reads
    Rebase(rebase::Args),
    /// Write an image's data into its backing file
    Commit(commit::Args),
    /// Compute the file size a new image needs (qemu-img measure)
    Measure(measure::Args),
    /// Copy an image into a new one, dd style (qemu-img dd)
    Dd(dd::Args),
    /// List, create, apply or delete internal snapshots
    Snapshot(snapshot::Args),
    /// Change an image's format options (version, refcount width, lazy refcounts, size)
    Amend(amend::Args),
    /// Add, remove, clear, enable, disable or merge persistent dirty bitmaps
    Bitmap(bitmap::Args),
}

pub fn main() -> ExitCode {
    init_logging();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 1 } else { 0 });
        }
    };
    match &cli.cmd {
        Command::Serve(a) if a.fork => {
            if let Some(code) = daemon::fork() {
                return ExitCode::from(code);
            }
        }
        Command::Serve(_) => {}
        _ => restore_sigpipe(),
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("qimg")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{}: cannot start the runtime: {e}", prog());
            return ExitCode::from(1);
        }
    };
    let code = rt.block_on(async move {
        match cli.cmd {
            Command::Create(a) => create::run(a).await,
            Command::Info(a) => info::run(a).await,
            Command::Map(a) => map::run(a).await,
            Command::Check(a) => check::run(a).await,
            Command::Compare(a) => compare::run(a).await,
            Command::Io(a) => io::run(a).await,
            Command::Resize(a) => resize::run(a).await,
            Command::Bench(a) => bench::run(a).await,
            Command::Serve(a) => serve::run(*a).await,
            Command::Convert(a) => convert::run(a).await,
            Command::Rebase(a) => rebase::run(a).await,
            Command::Commit(a) => commit::run(a).await,
            Command::Measure(a) => measure::run(a).await,
            Command::Dd(a) => dd::run(a).await,
            Command::Snapshot(a) => snapshot::run(a).await,
            Command::Amend(a) => amend::run(a).await,
            Command::Bitmap(a) => bitmap::run(a).await,
        }
    });
    ExitCode::from(code)
}

/// Output to a closed pipe (`qimg io -c 'read -v ...' img | head`) ends the process quietly, as it
/// ends qemu-img: by SIGPIPE. Rust ignores SIGPIPE and turns the write error into a panic in
/// `print!`; the default disposition is restored for every command but `serve`, whose sockets
/// must see EPIPE as an error rather than die of a client that hung up (its own console output
/// ignores write errors).
fn restore_sigpipe() {
    // SAFETY: setting a signal's disposition to its default before any other thread exists
    // (the runtime is not built yet) has no memory-safety preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Diagnostics from the library go to stderr, warnings and errors only unless `QIMG_LOG` says
/// otherwise (`QIMG_LOG=debug`).
fn init_logging() {
    let level = match std::env::var("QIMG_LOG").as_deref() {
        Ok("trace") => tracing::Level::TRACE,
        Ok("debug") => tracing::Level::DEBUG,
        Ok("info") => tracing::Level::INFO,
        Ok("error") => tracing::Level::ERROR,
        _ => tracing::Level::WARN,
    };
    // Plain lines as QEMU's tools print them ("qcow2: Marking image as corrupt: ..."); levels
    // and colours only when asked for a log or on a terminal.
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .without_time()
        .with_target(false)
        .with_level(std::env::var_os("QIMG_LOG").is_some())
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// The name messages are prefixed with: the basename of `argv[0]`, as QEMU's tools do. Run as
/// `qimg` it is `qimg`; run through a link or `exec -a` named `qemu-img`/`qemu-io`, scripts see the
/// prefix they expect (`qemu-io: can't open device ...`).
pub fn prog() -> &'static str {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        std::env::args_os()
            .next()
            .as_deref()
            .map(std::path::Path::new)
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "qimg".into())
    })
}

/// Prints `<prog>: msg` to stderr and returns exit status 1.
pub fn fail(msg: impl std::fmt::Display) -> u8 {
    eprintln!("{}: {msg}", prog());
    1
}
