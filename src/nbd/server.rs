//! The listener: accepts clients on a TCP or Unix socket up to the connection limit, gives each
//! one its own task (handshake under a time limit, then transmission), and shuts down in order.
//!
//! Shutdown (`run`'s `shutdown` future resolving, e.g. on SIGTERM): stop accepting, tell every
//! connection to stop reading requests, let them answer what they already received (for at most
//! `drain_timeout`, after which connections that cannot deliver their replies are dropped), then
//! wait until every engine request has completed. The caller then flushes and closes the image.
//!
//! Without `persistent`, the server shuts down the same way when the last client leaves.
//!
//! A panic in a connection or request task is contained by tokio: that client loses its
//! connection, the server keeps serving the others.

use super::commands::Conn;
use super::export::Export;
use super::handshake::{handshake, handshake_after_tls};
use super::transmission::{self, End, Limits, ABANDON, RUNNING, STOP};
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

/// Read buffer of a connection: large enough to take in many pipelined small requests at once.
const READ_BUFFER: usize = 128 << 10;

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl Listen {
    /// The NBD URI clients use for `export` (qemu and libnbd syntax).
    pub fn uri(&self, export: &str) -> String {
        let path = if export.is_empty() {
            String::new()
        } else {
            format!("/{}", uri_escape(export))
        };
        match self {
            Listen::Tcp(a) => {
                let host = match a {
                    SocketAddr::V4(v4) => v4.ip().to_string(),
                    SocketAddr::V6(v6) => format!("[{}]", v6.ip()),
                };
                format!("nbd://{host}:{}{path}", a.port())
            }
            Listen::Unix(p) => {
                let path = if path.is_empty() {
                    "/".to_string()
                } else {
                    path
                };
                format!(
                    "nbd+unix://{path}?socket={}",
                    uri_escape(&p.to_string_lossy())
                )
            }
        }
    }
}

/// Which file a Unix socket is (device and inode), to remove only our own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketId(u64, u64);

impl Listen {
    /// The identity of the socket file of a Unix listener.
    pub fn socket_id(&self) -> Option<SocketId> {
        use std::os::unix::fs::MetadataExt;
        match self {
            Listen::Unix(p) => std::fs::symlink_metadata(p)
                .ok()
                .map(|m| SocketId(m.dev(), m.ino())),
            Listen::Tcp(_) => None,
        }
    }

    /// Removes the socket file of a Unix listener if it is still the one `id` names (after the
    /// server ended and the image was closed, so that a script that waits for the socket to go
    /// away may then use the image). A socket another server has bound at the same path since
    /// (a script that restarts a server does not wait for the old one to end) is left alone.
    pub fn remove_socket(&self, id: Option<SocketId>) {
        if let (Listen::Unix(p), Some(id)) = (self, id) {
            if self.socket_id() == Some(id) {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::Tcp(a) => write!(f, "{a}"),
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Percent-encodes everything but unreserved characters and `/`.
fn uri_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Server tuning.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Connections served at once (0: no limit). Further clients wait in the listen backlog.
    pub shared: usize,
    /// Time a client has to finish the handshake.
    pub handshake_timeout: Duration,
    /// Time connections get on shutdown to deliver the replies of the requests they received.
    pub drain_timeout: Duration,
    /// Per-connection limits on requests in flight.
    pub limits: Limits,
    /// Keep serving when the last client leaves. Without it the server shuts down once a
    /// client has connected and no client is left (qemu-nbd without `-t`).
    pub persistent: bool,
    /// Require TLS (`NBD_OPT_STARTTLS` before anything else): qemu-nbd's `--tls-creds`.
    pub tls: Option<super::tls::TlsServer>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            shared: 16,
            handshake_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
            limits: Limits::default(),
            persistent: true,
            tls: None,
        }
    }
}

/// Counts engine requests in flight across all connections, so that shutdown can wait for them.
#[derive(Clone, Default)]
pub struct Tracker(Arc<TrackerInner>);

#[derive(Default)]
struct TrackerInner {
    active: AtomicUsize,
    idle: Notify,
}

/// One tracked request; dropping it marks the request done.
pub struct Token(Arc<TrackerInner>);

impl Tracker {
    pub fn token(&self) -> Token {
        self.0.active.fetch_add(1, SeqCst);
        Token(self.0.clone())
    }

    pub fn active(&self) -> usize {
        self.0.active.load(SeqCst)
    }

    /// Resolves when no request is in flight.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.0.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.active() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for Token {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// What `run` did.
#[derive(Clone, Copy, Debug, Default)]
pub struct ServeReport {
    pub connections: u64,
}

/// A bound NBD server for one export.
pub struct Server {
    export: Arc<Export>,
    listener: Listener,
    addr: Listen,
    cfg: Arc<ServerConfig>,
}

impl Server {
    /// Binds the socket (a stale Unix socket file is replaced). With TCP port 0 the kernel picks
    /// a port: [`Server::local_addr`] tells which.
    pub async fn bind(
        listen: &Listen,
        export: Arc<Export>,
        cfg: ServerConfig,
    ) -> io::Result<Server> {
        let (listener, addr) = match listen {
            Listen::Tcp(a) => {
                let l = TcpListener::bind(a).await?;
                let local = l.local_addr()?;
                (Listener::Tcp(l), Listen::Tcp(local))
            }
            Listen::Unix(p) => {
                use std::os::unix::fs::FileTypeExt;
                if let Ok(m) = std::fs::symlink_metadata(p) {
                    if m.file_type().is_socket() {
                        std::fs::remove_file(p)?;
                    } else {
                        return Err(io::Error::new(
                            io::ErrorKind::AlreadyExists,
                            format!("{} exists and is not a socket", p.display()),
                        ));
                    }
                }
                let l = UnixListener::bind(p)?;
                (Listener::Unix(l, p.clone()), Listen::Unix(p.clone()))
            }
        };
        Ok(Server {
            export,
            listener,
            addr,
            cfg: Arc::new(cfg),
        })
    }

    pub fn local_addr(&self) -> &Listen {
        &self.addr
    }

    /// Serves until `shutdown` resolves, then shuts down gracefully (see the module docs).
    pub async fn run<F: Future<Output = ()>>(self, shutdown: F) -> ServeReport {
        let (stop_tx, stop_rx) = watch::channel(RUNNING);
        let slots = Arc::new(Semaphore::new(if self.cfg.shared == 0 {
            Semaphore::MAX_PERMITS
        } else {
            self.cfg.shared
        }));
        let tracker = Tracker::default();
        let mut conns: JoinSet<()> = JoinSet::new();
        let mut report = ServeReport::default();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                Some(res) = conns.join_next() => {
                    if let Err(e) = res {
                        tracing::error!("nbd: connection task failed: {e}");
                    }
                    if conns.is_empty() && !self.cfg.persistent {
                        tracing::info!("nbd: last client left and not persistent");
                        break;
                    }
                }
                (slot, accepted) = accept(&self.listener, &slots) => match accepted {
                    Ok((stream, peer)) => {
                        report.connections += 1;
                        let id = report.connections;
                        tracing::info!("nbd: connection {id} from {peer}");
                        let ctx = ConnCtx {
                            id,
                            export: self.export.clone(),
                            cfg: self.cfg.clone(),
                            stop: stop_rx.clone(),
                            tracker: tracker.clone(),
                            _slot: slot,
                        };
                        match (stream, self.cfg.tls.clone()) {
                            (Stream::Tcp(s), Some(tls)) => {
                                let _ = s.set_nodelay(true);
                                conns.spawn(tls_connection(ctx, s, tls));
                            }
                            (Stream::Unix(s), Some(tls)) => {
                                conns.spawn(tls_connection(ctx, s, tls));
                            }
                            (Stream::Tcp(s), None) => {
                                // Replies are batched already; Nagle would only delay them.
                                let _ = s.set_nodelay(true);
                                let (r, w) = s.into_split();
                                conns.spawn(connection(ctx, r, w, None));
                            }
                            (Stream::Unix(s), None) => {
                                let (r, w) = s.into_split();
                                conns.spawn(connection(ctx, r, w, None));
                            }
                        }
                    }
                    Err(e) => {
                        // Typically EMFILE: back off instead of spinning.
                        tracing::warn!("nbd: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }

        tracing::info!("nbd: shutting down");
        // A Unix socket file stays until the caller has closed the image (see
        // `Listen::remove_socket`): once it is gone, the image is free for others.
        drop(self.listener);
        let _ = stop_tx.send(STOP);
        let drained = tokio::time::timeout(self.cfg.drain_timeout, async {
            while conns.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                "nbd: {} connection(s) could not deliver their replies within {:?}; dropping the replies",
                conns.len(),
                self.cfg.drain_timeout
            );
            // Connections stop writing but still run their requests to completion.
            let _ = stop_tx.send(ABANDON);
            while conns.join_next().await.is_some() {}
        }
        // Request tasks are never cancelled: wait for the engine to finish them.
        tracker.wait_idle().await;
        report
    }
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

/// Takes a connection slot, then accepts a client. Both steps are cancel-safe.
async fn accept(
    listener: &Listener,
    slots: &Arc<Semaphore>,
) -> (Option<OwnedSemaphorePermit>, io::Result<(Stream, String)>) {
    let slot = slots.clone().acquire_owned().await.ok();
    let accepted = match listener {
        Listener::Tcp(l) => l
            .accept()
            .await
            .map(|(s, a)| (Stream::Tcp(s), a.to_string())),
        Listener::Unix(l, p) => l
            .accept()
            .await
            .map(|(s, _)| (Stream::Unix(s), format!("unix:{}", p.display()))),
    };
    (slot, accepted)
}

/// What a connection task needs.
struct ConnCtx {
    id: u64,
    export: Arc<Export>,
    cfg: Arc<ServerConfig>,
    stop: watch::Receiver<u8>,
    tracker: Tracker,
    /// Released when the connection ends.
    _slot: Option<OwnedSemaphorePermit>,
}

/// A connection that must negotiate TLS first: the part of the handshake before TLS and the
/// TLS handshake, within the handshake time limit, then the rest as any connection.
async fn tls_connection<S>(mut ctx: ConnCtx, s: S, tls: super::tls::TlsServer)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let id = ctx.id;
    let accepted = tokio::select! {
        res = tokio::time::timeout(ctx.cfg.handshake_timeout, tls.accept(s)) => match res {
            Ok(Ok(a)) => a,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                // Said as qemu-nbd says it: a refused client is worth the operator's attention.
                tracing::warn!("nbd: connection {id}: option negotiation failed: {e}");
                return;
            }
            Ok(Err(e)) => {
                tracing::info!("nbd: connection {id}: TLS: {e}");
                return;
            }
            Err(_) => {
                tracing::info!(
                    "nbd: connection {id}: TLS not negotiated within {:?}",
                    ctx.cfg.handshake_timeout
                );
                return;
            }
        },
        _ = ctx.stop.wait_for(|level| *level >= STOP) => return,
    };
    let (stream, no_zeroes) = accepted;
    let (r, w) = tokio::io::split(stream);
    connection(ctx, r, w, Some(no_zeroes)).await
}

/// Serves one connection: handshake (`after_tls`: the rest of it over an encrypted stream,
/// with the client's `NO_ZEROES` choice), then transmission.
async fn connection<R, W>(mut ctx: ConnCtx, r: R, mut w: W, after_tls: Option<bool>)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let id = ctx.id;
    let mut r = BufReader::with_capacity(READ_BUFFER, r);
    let haggled = async {
        match after_tls {
            Some(nz) => handshake_after_tls(&mut r, &mut w, &ctx.export, nz).await,
            None => handshake(&mut r, &mut w, &ctx.export).await,
        }
    };
    let neg = tokio::select! {
        res = tokio::time::timeout(
            ctx.cfg.handshake_timeout,
            haggled,
        ) => match res {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                tracing::info!("nbd: connection {id}: {e}");
                return;
            }
            Err(_) => {
                tracing::info!(
                    "nbd: connection {id}: handshake not finished within {:?}",
                    ctx.cfg.handshake_timeout
                );
                return;
            }
        },
        _ = ctx.stop.wait_for(|level| *level >= STOP) => return,
    };
    tracing::info!(
        "nbd: connection {id}: transmission (structured replies: {}, contexts: {:?})",
        neg.structured,
        neg.contexts
    );
    let conn = Arc::new(Conn::new(ctx.export.clone(), neg));
    let end = transmission::serve(
        conn,
        r,
        w,
        ctx.cfg.limits,
        ctx.stop.clone(),
        ctx.tracker.clone(),
    )
    .await;
    match end {
        End::Disconnect => tracing::info!("nbd: connection {id}: client disconnected"),
        end => tracing::info!("nbd: connection {id}: closed ({end:?})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        let t = Listen::Tcp("127.0.0.1:10809".parse().unwrap());
        assert_eq!(t.uri(""), "nbd://127.0.0.1:10809");
        assert_eq!(t.uri("disk a"), "nbd://127.0.0.1:10809/disk%20a");
        let t6 = Listen::Tcp("[::1]:5000".parse().unwrap());
        assert_eq!(t6.uri(""), "nbd://[::1]:5000");
        let u = Listen::Unix("/tmp/s.sock".into());
        assert_eq!(u.uri(""), "nbd+unix:///?socket=/tmp/s.sock");
        assert_eq!(u.uri("x"), "nbd+unix:///x?socket=/tmp/s.sock");
    }

    #[tokio::test]
    async fn tracker_waits_for_tokens() {
        let t = Tracker::default();
        t.wait_idle().await;
        let tok = t.token();
        let t2 = t.clone();
        let h = tokio::spawn(async move { t2.wait_idle().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!h.is_finished());
        drop(tok);
        h.await.unwrap();
    }
}
