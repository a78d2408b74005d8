//! `qimg serve`: exports an image over NBD with qemu-nbd's command line, until SIGINT or SIGTERM
//! (or, without `-t`, until the last client leaves).
//!
//! Parsing, image creation/opening, daemonizing (`--fork`) and printing only; the server is
//! `qimg::nbd`. On a signal the server stops accepting, answers what it received, and the image is
//! flushed and closed, so a stopped server leaves a clean image.

use super::fail;
use qimg::block::Format;
use qimg::nbd::{DetectZeroes, DiscardMode, Export, ExportConfig, Listen, Server, ServerConfig};
use qimg::qcow2::{create, CreateOptions};
use qimg::size::{human_size, parse_size};
use qimg::storage::file::{FileOptions, FileStorage};
use qimg::storage::{Storage, StorageRef};
use qimg::{Error, Result};
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

const DEFAULT_ADDR: &str = "127.0.0.1";
const DEFAULT_PORT: u16 = 10809;

#[derive(clap::Args)]
pub struct Args {
    /// Image format (qcow2 or raw; probed if not given)
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// TCP address to listen on: ADDR:PORT, ADDR or :PORT [default: 127.0.0.1:10809]
    #[arg(short = 'b', long = "bind", conflicts_with = "socket")]
    bind: Option<String>,
    /// TCP port (overrides the port of --bind)
    #[arg(short = 'p', long = "port", conflicts_with = "socket")]
    port: Option<u16>,
    /// Listen on this Unix socket instead of TCP
    #[arg(short = 'k', long = "socket")]
    socket: Option<PathBuf>,
    /// Export name [default: "" (the default export), also reachable as the file name]
    #[arg(short = 'x', long = "export-name")]
    export_name: Option<String>,
    /// Export description shown to clients [default: none]
    #[arg(short = 'D', long = "description")]
    description: Option<String>,
    /// Export read-only
    #[arg(short = 'r', long = "read-only")]
    read_only: bool,
    /// Export internal snapshot SNAPSHOT (read-only): its ID or name, or
    /// snapshot.id=ID[,snapshot.name=NAME]
    #[arg(short = 'l', long = "load-snapshot", value_name = "SNAPSHOT")]
    load_snapshot: Option<String>,
    /// Serve a temporary overlay of FILE: writes go to the overlay and are dropped at exit
    #[arg(short = 's', long = "snapshot")]
    snapshot: bool,
    /// Clients served at once (0: no limit); more wait until one leaves. Above 1, clients are
    /// told they may use several connections at once (multi-conn)
    #[arg(short = 'e', long = "shared", default_value_t = 1)]
    shared: usize,
    /// Keep serving when the last client leaves (without it the server exits then, as qemu-nbd)
    #[arg(short = 't', long = "persistent")]
    persistent: bool,
    /// Fork off the server and exit once it accepts connections (errors before that are
    /// printed and make the exit status 1)
    #[arg(long = "fork")]
    pub fork: bool,
    /// Write the server's process ID to this file once it listens (removed when it stops)
    #[arg(long = "pid-file", value_name = "PATH")]
    pid_file: Option<PathBuf>,
    /// With --fork: keep the server's standard error (otherwise it goes to /dev/null once the
    /// server runs, as with qemu-nbd). Connection logs: QIMG_LOG=info
    #[arg(short = 'v', long = "verbose")]
    verbose: bool,
    /// Host cache mode (writeback, writethrough, none, directsync, unsafe) [default: writeback]
    #[arg(long = "cache")]
    cache: Option<String>,
    /// Bypass the host page cache: --cache=none
    #[arg(short = 'n', long = "nocache", conflicts_with = "cache")]
    nocache: bool,
    /// How file I/O is issued (threads, io_uring)
    #[arg(long = "aio")]
    aio: Option<String>,
    /// TRIM requests: ignore them, or unmap (discard) whole clusters
    #[arg(long = "discard", default_value = "ignore")]
    discard: String,
    /// Writes of zeros: write them (off), turn them into write-zeroes (on), or also deallocate
    /// (unmap, needs --discard=unmap)
    #[arg(long = "detect-zeroes", value_name = "MODE", default_value = "off")]
    detect_zeroes: String,
    /// Offer the qemu:allocation-depth metadata context (which layer of the chain holds data)
    #[arg(short = 'A', long = "allocation-depth")]
    allocation_depth: bool,
    /// FILE is an option list (driver=qcow2,file.filename=NAME,...)
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// Runtime options (l2-cache-size=..., cache-clean-interval=..., pass-discard-request=...);
    /// a plain number is qemu-nbd's -o OFFSET (see --offset)
    #[arg(short = 'o', value_name = "OPTIONS|OFFSET")]
    options: Vec<String>,
    /// Export the image's disk from this byte on (qemu-nbd's -o/--offset; decimal, 0x hex or
    /// 0 octal)
    #[arg(long = "offset", value_name = "OFFSET")]
    offset: Option<String>,
    /// Export persistent dirty bitmap NAME as metadata context qemu:dirty-bitmap:NAME
    /// (repeatable; looked up in the image, then down its backing chain)
    #[arg(short = 'B', long = "bitmap", value_name = "NAME")]
    bitmap: Vec<String>,
    /// QEMU objects: tls-creds-x509,id=ID,endpoint=server,dir=DIR[,verify-peer=on|off]
    /// (credentials for --tls-creds); authz-simple,id=ID,identity=DN, authz-list,id=ID,...,
    /// authz-listfile,id=ID,filename=FILE (for --tls-authz); other object types are refused
    #[arg(long = "object", value_name = "OBJECT")]
    object: Vec<String>,
    /// Require TLS with the credentials of object ID (clients must start TLS first)
    #[arg(long = "tls-creds", value_name = "ID")]
    tls_creds: Option<String>,
    /// Only TLS clients whose certificate's distinguished name the authorization object ID
    /// allows may connect (needs --tls-creds with verify-peer)
    #[arg(long = "tls-authz", value_name = "ID")]
    tls_authz: Option<String>,
    #[arg(long = "tls-hostname", hide = true)]
    tls_hostname: Option<String>,
    /// The kernel NBD client (qemu-nbd -c/-d): not supported (refused)
    #[arg(short = 'c', long = "connect", hide = true)]
    connect: Option<String>,
    #[arg(short = 'd', long = "disconnect", hide = true)]
    disconnect: bool,
    /// QEMU's tracing: not supported (refused)
    #[arg(short = 'T', long = "trace", hide = true)]
    trace: Option<String>,
    #[arg(long = "selinux-label", hide = true)]
    selinux_label: Option<String>,
    /// Create the image with this virtual size if FILE does not exist (qcow2, or raw with -f raw)
    #[arg(long = "create", value_name = "SIZE")]
    create: Option<String>,
    /// Compressed target (qcow2): store every write compressed, gathering small sequential
    /// writes (a backup stream) into whole clusters first
    #[arg(long = "compress")]
    compress: bool,
    /// Seconds a client gets to finish the NBD handshake
    #[arg(long = "handshake-limit", value_name = "SECONDS", default_value_t = 10)]
    handshake_limit: u64,
    /// List the exports of the NBD server at -k SOCKET or -b/-p instead of serving
    #[arg(short = 'L', long = "list")]
    list: bool,
    /// Image file
    filename: Option<String>,
}

pub async fn run(a: Args) -> u8 {
    let pid_file = a.pid_file.clone();
    let code = match serve(a).await {
        Ok(code) => code,
        Err(e) => fail(e),
    };
    if let Some(p) = pid_file {
        // Only our own: a failed start must not remove another server's file.
        if std::fs::read_to_string(&p).is_ok_and(|s| s.trim() == std::process::id().to_string()) {
            let _ = std::fs::remove_file(p);
        }
    }
    code
}

/// The bitmaps of `-B`, each found in the image or else down its backing chain (qemu-nbd's
/// lookup), with qemu-nbd's messages for a missing or inconsistent one. Listed in qemu-nbd's
/// order (the last `-B` first), which gives the same context ids.
async fn export_bitmaps(
    img: &Arc<dyn qimg::BlockDevice>,
    names: &[String],
) -> Result<Vec<(String, Arc<qimg::dirty_bitmap::DirtyBitmap>)>> {
    let mut out = Vec::new();
    for name in names.iter().rev() {
        let mut layer = Some(img.clone());
        let mut found = None;
        while let Some(l) = layer {
            if let Some(q) = l.as_qcow2() {
                if q.bitmap_inconsistent(name).is_some() {
                    found = Some(q.bitmap_bits(name).await.map_err(|e| {
                        // The hint that follows QEMU's message is not printed by qemu-nbd.
                        let msg = e.to_string();
                        Error::arg(msg.lines().next().unwrap_or_default().to_string())
                    })?);
                    break;
                }
            }
            layer = l.backing();
        }
        let Some(bits) = found else {
            return Err(Error::arg(format!("Bitmap '{name}' is not found")));
        };
        out.push((name.clone(), bits));
    }
    Ok(out)
}

/// qemu-nbd options qimg does not implement: refused by name, never ignored.
fn refuse_unsupported(a: &Args) -> Result<()> {
    let refuse = |what: &str| Err(Error::unsupported(what.to_string()));
    if dev_offset(a)? != 0 && (a.allocation_depth || !a.bitmap.is_empty()) {
        return refuse("-o/--offset together with -A or -B is not supported");
    }
    if a.tls_hostname.is_some() && !a.list {
        return Err(Error::arg("--tls-hostname is only permitted with --list"));
    }
    if a.list && a.tls_authz.is_some() {
        return Err(Error::arg(
            "TLS authorization is incompatible with export list",
        ));
    }
    if a.connect.is_some() || a.disconnect {
        return refuse(
            "-c/-d: the kernel NBD client is not supported; serve on a socket (-k) and \
             connect it with nbd-client",
        );
    }
    if a.trace.is_some() {
        return refuse("-T/--trace: QEMU's trace events are not supported (QIMG_LOG=debug logs)");
    }
    if a.selinux_label.is_some() {
        return refuse("--selinux-label is not supported");
    }
    Ok(())
}

/// qemu-nbd's `-o OFFSET`/`--offset OFFSET` (the last one given), read as `strtoull` with
/// base 0 reads it.
fn dev_offset(a: &Args) -> Result<u64> {
    let given = a
        .options
        .iter()
        .filter(|o| is_offset(o))
        .chain(a.offset.iter())
        .last();
    let Some(text) = given else { return Ok(0) };
    let t = text.trim();
    let parsed = if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16)
    } else if t.len() > 1 && t.starts_with('0') {
        u64::from_str_radix(&t[1..], 8)
    } else {
        t.parse()
    };
    parsed.map_err(|_| Error::arg(format!("Invalid offset '{text}'")))
}

/// qemu-nbd's `-o` takes an offset; qimg's also takes runtime option lists, which always have
/// a `key=value`: a value without `=` is an offset (and must read as a number).
fn is_offset(o: &str) -> bool {
    !o.contains('=')
}

/// What `--tls-creds` asks for: nothing, a server's TLS, or (with `--list`) a client's.
enum TlsSetup {
    Plain,
    Server(qimg::nbd::tls::TlsServer),
    Client(qimg::nbd::tls::ClientCredentials),
}

/// The TLS setup `--object` and `--tls-creds ID`/`--tls-authz ID` ask for (QEMU's rules and
/// messages).
fn tls_setup(a: &Args) -> Result<TlsSetup> {
    super::objects::define(&a.object)?;
    let Some(id) = &a.tls_creds else {
        if a.tls_authz.is_some() {
            return Err(Error::arg(
                "--tls-authz is not permitted without --tls-creds",
            ));
        }
        return Ok(TlsSetup::Plain);
    };
    let creds = |e: Error| Error::arg(format!("Failed to get TLS creds: {e}"));
    if a.list {
        return super::objects::tls_client(id)
            .map(TlsSetup::Client)
            .map_err(creds);
    }
    let server = super::objects::tls_server(id).map_err(creds)?;
    let Some(authz_id) = &a.tls_authz else {
        return Ok(TlsSetup::Server(server));
    };
    // qemu-nbd looks the object up for each client (and refuses them all when it is missing);
    // a name that matches no object is refused here at once instead.
    server
        .with_authz(super::objects::authz(authz_id)?)
        .map(TlsSetup::Server)
}

async fn serve(a: Args) -> Result<u8> {
    refuse_unsupported(&a)?;
    let tls = tls_setup(&a)?;
    if a.list {
        if a.filename.is_some() {
            return Err(Error::arg("List mode is incompatible with a file name"));
        }
        if a.export_name.is_some()
            || a.description.is_some()
            || dev_offset(&a)? != 0
            || a.format.is_some()
            || a.load_snapshot.is_some()
            || !a.bitmap.is_empty()
            || a.allocation_depth
            || a.aio.is_some()
            || a.cache.is_some()
        {
            return Err(Error::arg(
                "List mode is incompatible with per-device settings",
            ));
        }
        let TlsSetup::Client(dir) = tls else {
            return list(&a, None).await;
        };
        return list(&a, Some(dir)).await;
    }
    let tls = match tls {
        TlsSetup::Server(s) => Some(s),
        _ => None,
    };
    let Some(filename) = a.filename.clone() else {
        return Err(Error::arg(format!(
            "Invalid number of arguments\nTry `{} --help' for more information.",
            super::prog()
        )));
    };
    let cache = if a.nocache {
        Some("none")
    } else {
        a.cache.as_deref()
    };
    let discard = DiscardMode::parse(&a.discard)?;
    let detect_zeroes = DetectZeroes::parse(&a.detect_zeroes)?;
    if detect_zeroes == DetectZeroes::Unmap && discard != DiscardMode::Unmap {
        return Err(Error::arg(
            "setting detect-zeroes to unmap is not allowed without setting discard operation \
             to unmap",
        ));
    }
    let listen = match &a.socket {
        Some(p) => Listen::Unix(p.clone()),
        None => Listen::Tcp(parse_bind(a.bind.as_deref(), a.port).await?),
    };

    if let Some(size) = &a.create {
        let path = Path::new(&filename);
        if a.image_opts {
            return Err(Error::arg(
                "--create and --image-opts are mutually exclusive",
            ));
        }
        if !path.exists() {
            let format = a.format.as_deref().map(Format::parse).transpose()?;
            let size = parse_size(size).map_err(|_| {
                Error::arg(format!(
                    "Invalid size '{size}' for --create (k, M, G, T suffixes)"
                ))
            })?;
            create_image(path, format.unwrap_or(Format::Qcow2), size).await?;
            eprintln!(
                "Created '{}' ({}, {})",
                filename,
                format.unwrap_or(Format::Qcow2).name(),
                human_size(size)
            );
        }
    }

    let snapshot = a
        .load_snapshot
        .as_deref()
        .map(super::opts::parse_snapshot_param)
        .transpose()?;
    if snapshot.is_some() && a.snapshot {
        return Err(Error::arg("-s and -l are mutually exclusive"));
    }
    // A snapshot is exported read-only (qemu-nbd's rule).
    let read_only = a.read_only || snapshot.is_some();
    // `-o` lists that are not an offset are runtime options.
    let runtime: Vec<String> = a
        .options
        .iter()
        .filter(|o| !is_offset(o))
        .cloned()
        .collect();
    let image_args = super::opts::ImageArgs {
        path: &filename,
        format: a.format.as_deref(),
        read_only,
        cache,
        runtime_opts: &runtime,
        no_backing: false,
        batch: false,
        force_share: false,
        metadata_only: false,
        aio: a.aio.as_deref(),
        image_opts: a.image_opts,
    };
    let (path, mut opts) = super::opts::open_options(&image_args)?;
    if a.compress {
        opts.qcow2.compress = Some(true);
    }
    let img = if a.snapshot {
        super::opts::open_temporary_overlay(&path, &opts).await?
    } else {
        super::opts::open_with(&path, &opts).await?
    };
    if let Some(sn) = &snapshot {
        if let Err(e) = super::opts::load_snapshot(&*img, sn).await {
            let _ = img.close().await;
            return Err(Error::arg(format!("Failed to load snapshot: {e}")));
        }
    }

    // `--offset`: QEMU puts a raw node with that offset over the image; here a window on its
    // disk, read as raw, which closes the image with itself.
    let img = match dev_offset(&a)? {
        0 => img,
        offset => match window_on(img.clone(), offset, read_only).await {
            Ok(w) => w,
            Err(e) => {
                let _ = img.close().await;
                return Err(e);
            }
        },
    };
    let bitmaps = match export_bitmaps(&img, &a.bitmap).await {
        Ok(b) => b,
        Err(e) => {
            let _ = img.close().await;
            return Err(e);
        }
    };
    let (name, aliases) = match &a.export_name {
        Some(n) => (n.clone(), Vec::new()),
        None => {
            let mut aliases = vec![path.clone()];
            if let Some(base) = Path::new(&path).file_name().and_then(|b| b.to_str()) {
                if base != path {
                    aliases.push(base.to_string());
                }
            }
            (String::new(), aliases)
        }
    };
    let export = Arc::new(Export::new(
        img.clone(),
        ExportConfig {
            name: name.clone(),
            aliases,
            description: a.description.clone().unwrap_or_default(),
            read_only,
            discard,
            cache: opts.cache,
            detect_zeroes,
            allocation_depth: a.allocation_depth,
            multi_conn: a.shared != 1,
            bitmaps,
        },
    ));
    let cfg = ServerConfig {
        shared: a.shared,
        handshake_timeout: Duration::from_secs(a.handshake_limit.max(1)),
        persistent: a.persistent,
        tls,
        ..ServerConfig::default()
    };
    let server = match Server::bind(&listen, export, cfg).await {
        Ok(s) => s,
        Err(e) => {
            let _ = img.close().await;
            return Err(Error::io(format!("Failed to listen on {listen}"), e));
        }
    };
    let socket_id = listen.socket_id();
    // Signal handlers first: a client may stop us as soon as it has read the address.
    let shutdown = match shutdown_signal() {
        Ok(s) => s,
        Err(e) => {
            let _ = img.close().await;
            listen.remove_socket(socket_id);
            return Err(e);
        }
    };
    if let Some(p) = &a.pid_file {
        if let Err(e) = std::fs::write(p, format!("{}\n", std::process::id())) {
            let _ = img.close().await;
            listen.remove_socket(socket_id);
            return Err(Error::io(
                format!("Failed to write pid file '{}'", p.display()),
                e,
            ));
        }
    }

    if a.fork {
        super::daemon::ready(a.verbose);
    } else {
        let uri = server.local_addr().uri(&name);
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{uri}");
        let _ = writeln!(
            out,
            "Serving '{}' ({}, {}{}) at {uri}; stop with Ctrl-C or SIGTERM{}. Connect with:",
            path,
            img.format().name(),
            human_size(img.size()),
            if read_only { ", read-only" } else { "" },
            if a.persistent {
                ""
            } else {
                " (ends when the last client leaves: -t keeps serving)"
            },
        );
        let _ = writeln!(out, "  qemu-img info {uri}");
        let _ = out.flush();
    }

    let report = server.run(shutdown).await;
    tracing::info!("nbd: served {} connection(s)", report.connections);
    let closed = img.close().await;
    // Only now: a client that waits for the socket to disappear may then open the image.
    listen.remove_socket(socket_id);
    closed?;
    Ok(0)
}

/// The disk of `img` from byte `offset` on, as a raw image (qemu-nbd's `--offset`).
async fn window_on(
    img: Arc<dyn qimg::BlockDevice>,
    offset: u64,
    read_only: bool,
) -> Result<Arc<dyn qimg::BlockDevice>> {
    use qimg::storage::device::{DeviceStorage, Nested};
    use qimg::storage::Storage;
    let disk: qimg::storage::StorageRef = Arc::new(DeviceStorage(img.clone()));
    let window = qimg::storage::window::Window::new(disk, offset, None).await?;
    let size = window
        .len()
        .await
        .map_err(|e| Error::io("Could not get the size of the image", e))?;
    let raw = qimg::raw::Raw::with_storage(Arc::new(window), size, read_only);
    Ok(Arc::new(Nested {
        outer: Arc::new(raw),
        inner: img,
    }))
}

/// `--list`: what the server at `-k` or `-b`/`-p` exports, printed as `qemu-nbd --list` does.
/// With `tls` (client credentials), over TLS: the server's certificate must name
/// `--tls-hostname`, or else the host connected to; on a unix socket without `--tls-hostname`
/// it is refused, as QEMU refuses it ("No hostname for certificate validation").
async fn list(a: &Args, tls: Option<qimg::nbd::tls::ClientCredentials>) -> Result<u8> {
    use qimg::nbd::client::{flag_names, list_exports, list_exports_tls};
    let client = |host: Option<String>| -> Result<Option<qimg::nbd::tls::TlsClient>> {
        let Some(creds) = &tls else { return Ok(None) };
        let name = a.tls_hostname.clone().or(host);
        qimg::nbd::tls::TlsClient::new(creds, name.as_deref()).map(Some)
    };
    let listing = match &a.socket {
        Some(p) => {
            let tls = client(None)?;
            let mut s = tokio::net::UnixStream::connect(p)
                .await
                .map_err(|e| Error::io(format!("Failed to connect to '{}'", p.display()), e))?;
            match &tls {
                Some(t) => list_exports_tls(s, t).await,
                None => list_exports(&mut s).await,
            }
        }
        None => {
            let addr = parse_bind(a.bind.as_deref(), a.port).await?;
            let tls = client(Some(
                a.bind.clone().unwrap_or_else(|| addr.ip().to_string()),
            ))?;
            let mut s = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| Error::io(format!("Failed to connect to '{addr}'"), e))?;
            match &tls {
                Some(t) => list_exports_tls(s, t).await,
                None => list_exports(&mut s).await,
            }
        }
    };
    // The errors say what failed, as qemu-nbd's do.
    let listing = listing.map_err(|e| Error::io(String::new(), e))?;
    let mut out = String::new();
    use std::fmt::Write as _;
    let _ = writeln!(out, "exports available: {}", listing.exports.len());
    for e in &listing.exports {
        let _ = writeln!(out, " export: '{}'", e.name);
        if !e.description.is_empty() {
            let _ = writeln!(out, "  description: {}", e.description);
        }
        if let Some((size, flags)) = e.size_flags {
            let _ = writeln!(out, "  size:  {size}");
            let names: String = flag_names(flags).iter().map(|n| format!(" {n}")).collect();
            let _ = writeln!(out, "  flags: {flags:#x} ({names} )");
        }
        if let Some((min, opt, max)) = e.block_sizes {
            let _ = writeln!(out, "  min block: {min}");
            let _ = writeln!(out, "  opt block: {opt}");
            let _ = writeln!(out, "  max block: {max}");
        }
        let _ = writeln!(
            out,
            "  transaction size: {}",
            if listing.extended { "64-bit" } else { "32-bit" }
        );
        if !e.contexts.is_empty() {
            let _ = writeln!(out, "  available meta contexts: {}", e.contexts.len());
            for c in &e.contexts {
                let _ = writeln!(out, "   {c}");
            }
        }
    }
    print!("{out}");
    Ok(0)
}

/// Resolves on the first SIGINT or SIGTERM.
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let ctx = |e| Error::io("Cannot install signal handlers", e);
    let mut int = signal(SignalKind::interrupt()).map_err(ctx)?;
    let mut term = signal(SignalKind::terminate()).map_err(ctx)?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}

/// `ADDR:PORT`, `ADDR`, `:PORT` or a host name with a port.
async fn parse_bind(bind: Option<&str>, port: Option<u16>) -> Result<SocketAddr> {
    let s = bind.unwrap_or(DEFAULT_ADDR);
    let bad = || Error::arg(format!("Invalid --bind address '{s}' (expected ADDR:PORT)"));
    let mut addr = if let Ok(a) = s.parse::<SocketAddr>() {
        a
    } else if let Ok(ip) = s.trim_matches(['[', ']']).parse::<IpAddr>() {
        SocketAddr::new(ip, DEFAULT_PORT)
    } else if let Some(p) = s.strip_prefix(':') {
        let p = p.parse::<u16>().map_err(|_| bad())?;
        SocketAddr::new(DEFAULT_ADDR.parse().map_err(|_| bad())?, p)
    } else {
        let target = if s.contains(':') {
            s.to_string()
        } else {
            format!("{s}:{DEFAULT_PORT}")
        };
        tokio::net::lookup_host(target)
            .await
            .map_err(|_| bad())?
            .next()
            .ok_or_else(bad)?
    };
    if let Some(p) = port {
        addr.set_port(p);
    }
    Ok(addr)
}

/// Creates a fresh image; refuses to touch a file that appeared in the meantime.
async fn create_image(path: &Path, format: Format, size: u64) -> Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| Error::io(format!("Could not create '{}'", path.display()), e))?;
    let storage = FileStorage::create(path, FileOptions::default())
        .map_err(|e| Error::io("Could not create image", e))?;
    match format {
        Format::Qcow2 => {
            let o = CreateOptions {
                size,
                ..CreateOptions::default()
            };
            o.validate()?;
            let s: StorageRef = Arc::new(storage);
            create(s, &o).await
        }
        Format::Raw => {
            let ctx = |e| Error::io("Could not size the new image", e);
            storage.set_len(size).await.map_err(ctx)?;
            storage.flush().await.map_err(ctx)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bind_addresses() {
        let cases: [(Option<&str>, Option<u16>, &str); 5] = [
            (None, None, "127.0.0.1:10809"),
            (Some("0.0.0.0:1234"), None, "0.0.0.0:1234"),
            (Some("::1"), None, "[::1]:10809"),
            (Some(":99"), None, "127.0.0.1:99"),
            (Some("127.0.0.1"), Some(5), "127.0.0.1:5"),
        ];
        for (bind, port, want) in cases {
            let got = parse_bind(bind, port).await.unwrap();
            assert_eq!(
                got,
                want.parse::<SocketAddr>().unwrap(),
                "{bind:?} {port:?}"
            );
        }
        assert!(parse_bind(Some(":x"), None).await.is_err());
    }
}
