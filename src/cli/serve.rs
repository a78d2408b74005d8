//! `qimg serve`: exports an image over NBD (qemu-nbd's job), until SIGINT or SIGTERM.
//!
//! Parsing, image creation/opening and printing only; the server is `qimg::nbd`. On a signal the
//! server stops accepting, answers what it received, and the image is flushed and closed, so a
//! stopped server leaves a clean image.

use super::fail;
use qimg::block::{open_image, CacheMode, Format, OpenOptions};
use qimg::nbd::{DiscardMode, Export, ExportConfig, Listen, Server, ServerConfig};
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
    /// Export description shown to clients [default: the file name]
    #[arg(short = 'D', long = "description")]
    description: Option<String>,
    /// Export read-only
    #[arg(short = 'r', long = "read-only")]
    read_only: bool,
    /// Export internal snapshot SNAPSHOT (read-only): its ID or name, or
    /// snapshot.id=ID[,snapshot.name=NAME]
    #[arg(short = 'l', long = "load-snapshot", value_name = "SNAPSHOT")]
    load_snapshot: Option<String>,
    /// Clients served at once (0: no limit); more wait until one leaves
    #[arg(short = 'e', long = "shared", default_value_t = 16)]
    shared: usize,
    /// Keep serving when clients disconnect (qemu-nbd's -t; qimg serve always does, until
    /// SIGINT/SIGTERM)
    #[arg(short = 't', long = "persistent")]
    persistent: bool,
    /// Host cache mode (writeback, writethrough, none, directsync, unsafe) [default: writeback]
    #[arg(long = "cache")]
    cache: Option<String>,
    /// How file I/O is issued (threads, io_uring)
    #[arg(long = "aio")]
    aio: Option<String>,
    /// TRIM requests: ignore them, or unmap (discard) whole clusters
    #[arg(long = "discard", default_value = "ignore")]
    discard: String,
    /// Runtime options (l2-cache-size=..., cache-clean-interval=..., pass-discard-request=...)
    #[arg(short = 'o')]
    options: Vec<String>,
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
    /// Image file
    filename: String,
}

pub async fn run(a: Args) -> u8 {
    match serve(a).await {
        Ok(code) => code,
        Err(e) => fail(e),
    }
}

async fn serve(a: Args) -> Result<u8> {
    let format = a.format.as_deref().map(Format::parse).transpose()?;
    let cache = a
        .cache
        .as_deref()
        .map(CacheMode::parse)
        .transpose()?
        .unwrap_or_default();
    let aio = a
        .aio
        .as_deref()
        .map(super::opts::parse_aio)
        .transpose()?
        .unwrap_or_default();
    let discard = DiscardMode::parse(&a.discard)?;
    let (mut qcow2, locking, backing_format) =
        super::opts::runtime_options_with_backing(&a.options)?;
    if a.compress {
        qcow2.compress = Some(true);
    }
    let listen = match &a.socket {
        Some(p) => Listen::Unix(p.clone()),
        None => Listen::Tcp(parse_bind(a.bind.as_deref(), a.port).await?),
    };

    let path = Path::new(&a.filename);
    if let Some(size) = &a.create {
        if !path.exists() {
            let size = parse_size(size).map_err(|_| {
                Error::arg(format!(
                    "Invalid size '{size}' for --create (k, M, G, T suffixes)"
                ))
            })?;
            create_image(path, format.unwrap_or(Format::Qcow2), size).await?;
            eprintln!(
                "Created '{}' ({}, {})",
                a.filename,
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
    // A snapshot is exported read-only (qemu-nbd's rule).
    let read_only = a.read_only || snapshot.is_some();
    let opts = OpenOptions {
        format,
        probe: format.is_none(),
        policy: Default::default(),
        read_only,
        cache,
        qcow2,
        no_backing: false,
        aio,
        batch: false,
        lock: qimg::block::LockOptions {
            locking,
            force_share: false,
        },
        metadata_only: false,
        writable_backing_depth: None,
        backing_format,
    };
    let img = open_image(path, &opts).await?;
    super::opts::warn_if_probed_raw(&*img, &opts);
    if let Some(sn) = &snapshot {
        if let Err(e) = super::opts::load_snapshot(&*img, sn).await {
            let _ = img.close().await;
            return Err(Error::arg(format!("Failed to load snapshot: {e}")));
        }
    }

    let (name, aliases) = match &a.export_name {
        Some(n) => (n.clone(), Vec::new()),
        None => {
            let mut aliases = vec![a.filename.clone()];
            if let Some(base) = path.file_name().and_then(|b| b.to_str()) {
                if base != a.filename {
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
            description: a.description.clone().unwrap_or_else(|| a.filename.clone()),
            read_only,
            discard,
            cache,
        },
    ));
    let cfg = ServerConfig {
        shared: a.shared,
        handshake_timeout: Duration::from_secs(a.handshake_limit.max(1)),
        ..ServerConfig::default()
    };
    let server = match Server::bind(&listen, export, cfg).await {
        Ok(s) => s,
        Err(e) => {
            let _ = img.close().await;
            return Err(Error::io(format!("Failed to listen on {listen}"), e));
        }
    };
    // Signal handlers first: a client may stop us as soon as it has read the address.
    let shutdown = shutdown_signal()?;

    let uri = server.local_addr().uri(&name);
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{uri}");
    let _ = writeln!(
        out,
        "Serving '{}' ({}, {}{}) at {uri}; stop with Ctrl-C or SIGTERM. Connect with:",
        a.filename,
        img.format().name(),
        human_size(img.size()),
        if read_only { ", read-only" } else { "" },
    );
    let _ = writeln!(out, "  qemu-img info {uri}");
    let _ = out.flush();
    drop(out);

    let report = server.run(shutdown).await;
    tracing::info!("nbd: served {} connection(s)", report.connections);
    img.close().await?;
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
