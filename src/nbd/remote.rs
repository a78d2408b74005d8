//! An NBD export as storage: qimg's tools open `nbd://`, `nbd+unix://` and QEMU's `driver=nbd`
//! names through it (`qimg info`, `map`, `convert`, `compare`, `io`), with any format on top.
//!
//! One connection, one request at a time (a mutex around the stream): the tools that use it
//! copy or inspect, and a simple client is easier to trust against an untrusted server than a
//! pipelined one. Every reply is checked against the request it answers (cookie, offsets inside
//! the request, lengths bounded before allocation); anything unexpected is an error, never a
//! panic. Block status is asked in `base:allocation`, or in the context QEMU's
//! `x-dirty-bitmap=` names, read the way QEMU reads it there: a dirty extent comes back as a
//! hole that does not read as zeros, so `map` shows dirty areas as absent.

use super::client::{bad, greet, option_error, read_reply, send_option, simple_option};
use super::proto::*;
use crate::buf::{IoBuf, IoBufMut};
use crate::storage::{IoFuture, Storage};
use std::io;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Where the server is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    Unix(String),
    Tcp { host: String, port: u16 },
}

/// What to connect to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub address: Address,
    pub export: String,
    /// QEMU's `x-dirty-bitmap`: the metadata context block status reads instead of
    /// `base:allocation`.
    pub status_context: Option<String>,
    /// Opened as QEMU's `driver=nbd` node itself, no format driver above it (`info` then
    /// says format `nbd`, with no child node).
    pub bare: bool,
    /// TLS (QEMU's `tls-creds=`): started right after the greeting, before any other option.
    pub tls: Option<super::tls::TlsClient>,
}

/// QEMU's default NBD port.
pub const DEFAULT_PORT: u16 = 10809;

impl Target {
    /// Parses QEMU's NBD names: `nbd://HOST[:PORT]/EXPORT`, `nbd+tcp://...`,
    /// `nbd+unix:///EXPORT?socket=PATH`, and the legacy `nbd:unix:PATH[:exportname=NAME]`,
    /// `nbd:HOST:PORT[:exportname=NAME]`. `None` if `name` is not an NBD name.
    pub fn parse(name: &str) -> Option<crate::Result<Target>> {
        let err = |m: &str| Some(Err(crate::Error::arg(m.to_string())));
        if let Some(rest) = name
            .strip_prefix("nbd+unix://")
            .map(|r| (r, true))
            .or_else(|| name.strip_prefix("nbd+tcp://").map(|r| (r, false)))
            .or_else(|| name.strip_prefix("nbd://").map(|r| (r, false)))
        {
            let (rest, unix) = rest;
            let (main, query) = rest.split_once('?').unwrap_or((rest, ""));
            let (authority, path) = main.split_once('/').unwrap_or((main, ""));
            let export = percent_decode(path);
            if unix {
                if !authority.is_empty() {
                    return err("NBD URI with a Unix socket must not name a host");
                }
                let socket = query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("socket="))
                    .map(percent_decode);
                let Some(socket) = socket else {
                    return err("NBD URI with a Unix socket needs ?socket=PATH");
                };
                return Some(Ok(Target {
                    address: Address::Unix(socket),
                    export,
                    status_context: None,
                    bare: false,
                    tls: None,
                }));
            }
            if !query.is_empty() {
                return err("NBD URI over TCP takes no query");
            }
            let (host, port) = match authority.rsplit_once(':') {
                Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
                    match p.parse() {
                        Ok(p) => (h, p),
                        Err(_) => return err("Invalid port in the NBD URI"),
                    }
                }
                _ => (authority, DEFAULT_PORT),
            };
            let host = host.trim_start_matches('[').trim_end_matches(']');
            return Some(Ok(Target {
                address: Address::Tcp {
                    host: if host.is_empty() { "localhost" } else { host }.to_string(),
                    port,
                },
                export,
                status_context: None,
                bare: false,
                tls: None,
            }));
        }
        let rest = name.strip_prefix("nbd:")?;
        let (rest, export) = match rest.split_once(":exportname=") {
            Some((r, e)) => (r, e.to_string()),
            None => (rest, String::new()),
        };
        let address = if let Some(path) = rest.strip_prefix("unix:") {
            Address::Unix(path.to_string())
        } else {
            let (host, port) = match rest.rsplit_once(':') {
                Some((h, p)) => match p.parse() {
                    Ok(p) => (h.to_string(), p),
                    Err(_) => return err("Invalid port in the NBD name"),
                },
                None => (rest.to_string(), DEFAULT_PORT),
            };
            Address::Tcp { host, port }
        };
        Some(Ok(Target {
            address,
            export,
            status_context: None,
            bare: false,
            tls: None,
        }))
    }
}

impl Target {
    /// The name QEMU gives the export (`nbd+unix:///EXPORT?socket=PATH`,
    /// `nbd://HOST:PORT/EXPORT`; no slash before an empty export name).
    pub fn canonical_name(&self) -> String {
        let export = if self.export.is_empty() {
            String::new()
        } else {
            format!("/{}", self.export)
        };
        match &self.address {
            Address::Unix(p) => format!("nbd+unix://{export}?socket={p}"),
            Address::Tcp { host, port } => format!("nbd://{host}:{port}{export}"),
        }
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where a request's reply goes.
enum Sink<'a> {
    None,
    Data(&'a mut [u8]),
    Extents(&'a mut Vec<(u32, u32)>),
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

struct Conn {
    stream: Box<dyn Stream>,
    cookie: u64,
}

/// A connected export.
pub struct NbdStorage {
    conn: tokio::sync::Mutex<Conn>,
    size: u64,
    flags: u16,
    structured: bool,
    /// Id of the negotiated block status context.
    context: Option<u32>,
    /// Largest request the server takes.
    max_request: u32,
}

/// The NBD errors as errnos (the protocol's values are Linux's).
fn nbd_error(code: u32, msg: &str) -> io::Error {
    let errno = match code {
        1 | 5 | 12 | 22 | 28 | 75 | 95 | 108 => code as i32,
        _ => 5,
    };
    let e = io::Error::from_raw_os_error(errno);
    if msg.is_empty() {
        e
    } else {
        io::Error::new(e.kind(), format!("{msg} ({e})"))
    }
}

impl NbdStorage {
    /// Connects and negotiates (fixed newstyle, structured replies, the block status context,
    /// `NBD_OPT_GO`).
    pub async fn connect(t: &Target) -> io::Result<NbdStorage> {
        // QEMU's words for a server that cannot be reached.
        let unreachable = |at: String| {
            move |e: io::Error| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "Failed to connect to '{at}': {}",
                        crate::error::strerror(&e)
                    ),
                )
            }
        };
        let stream: Box<dyn Stream> = match &t.address {
            Address::Unix(p) => Box::new(
                tokio::net::UnixStream::connect(p)
                    .await
                    .map_err(unreachable(p.clone()))?,
            ),
            Address::Tcp { host, port } => {
                let s = tokio::net::TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(unreachable(format!("{host}:{port}")))?;
                let _ = s.set_nodelay(true);
                Box::new(s)
            }
        };
        let mut stream = stream;
        greet(&mut stream).await?;
        if let Some(tls) = &t.tls {
            stream = Box::new(tls.start(stream).await?);
        }
        let mut conn = Conn { stream, cookie: 0 };
        let s = &mut conn.stream;
        let structured = simple_option(s, OPT_STRUCTURED_REPLY).await?;
        let mut context = None;
        if structured {
            let want = t
                .status_context
                .clone()
                .unwrap_or_else(|| CTX_BASE_ALLOCATION.to_string());
            let req = MetaContextRequest {
                export: t.export.clone(),
                queries: vec![want.clone()],
            };
            send_option(s, OPT_SET_META_CONTEXT, &req.encode()).await?;
            loop {
                let rep = read_reply(s, OPT_SET_META_CONTEXT).await?;
                match rep.rtype {
                    REP_ACK => break,
                    REP_META_CONTEXT => {
                        let mut c = Cursor::new(&rep.payload);
                        let id = c.u32().map_err(|e| bad(e.to_string()))?;
                        let name = c.bytes(c.remaining()).map_err(|e| bad(e.to_string()))?;
                        if name == want.as_bytes() {
                            context = Some(id);
                        }
                    }
                    t if t & REP_FLAG_ERROR != 0 => break,
                    t => {
                        return Err(bad(format!(
                            "unexpected reply type {t} to SET_META_CONTEXT"
                        )))
                    }
                }
            }
            if context.is_none() && t.status_context.is_some() {
                return Err(bad(format!("requested x-dirty-bitmap {want} not found")));
            }
        } else if t.status_context.is_some() {
            return Err(bad(
                "x-dirty-bitmap needs structured replies, which the server lacks",
            ));
        }
        let req = InfoRequest {
            name: t.export.clone(),
            infos: vec![INFO_BLOCK_SIZE],
        };
        send_option(s, OPT_GO, &req.encode()).await?;
        let mut export = None;
        let mut max_request = MAX_PAYLOAD;
        loop {
            let rep = read_reply(s, OPT_GO).await?;
            match rep.rtype {
                REP_ACK => break,
                REP_INFO => {
                    let mut c = Cursor::new(&rep.payload);
                    match c.u16().map_err(|e| bad(e.to_string()))? {
                        INFO_EXPORT => {
                            let size = c.u64().map_err(|e| bad(e.to_string()))?;
                            let flags = c.u16().map_err(|e| bad(e.to_string()))?;
                            export = Some((size, flags));
                        }
                        INFO_BLOCK_SIZE => {
                            let _min = c.u32().map_err(|e| bad(e.to_string()))?;
                            let _pref = c.u32().map_err(|e| bad(e.to_string()))?;
                            let max = c.u32().map_err(|e| bad(e.to_string()))?;
                            max_request = max.clamp(4096, MAX_PAYLOAD);
                        }
                        _ => {}
                    }
                }
                t if t & REP_FLAG_ERROR != 0 => return Err(option_error(OPT_GO, &rep)),
                t => return Err(bad(format!("unexpected reply type {t} to NBD_OPT_GO"))),
            }
        }
        let Some((size, flags)) = export else {
            return Err(bad("the server did not say how large the export is"));
        };
        Ok(NbdStorage {
            conn: tokio::sync::Mutex::new(conn),
            size,
            flags,
            structured,
            context,
            max_request: max_request / 512 * 512,
        })
    }

    pub fn read_only(&self) -> bool {
        self.flags & FLAG_READ_ONLY != 0
    }

    /// Sends one request and reads its replies. `data` is the payload of a write; `sink`
    /// receives the bytes of a read (a buffer as long as the request) or the extents of a
    /// block status.
    async fn request(
        &self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: Option<&[u8]>,
        sink: Sink<'_>,
    ) -> io::Result<()> {
        let (mut buf, extents) = match sink {
            Sink::None => (None, None),
            Sink::Data(b) => (Some(b), None),
            Sink::Extents(e) => (None, Some(e)),
        };
        let mut conn = self.conn.lock().await;
        conn.cookie += 1;
        let cookie = conn.cookie;
        let req = Request {
            flags,
            cmd,
            cookie,
            offset,
            len: u64::from(len),
        };
        let s = &mut conn.stream;
        s.write_all(&req.encode()).await?;
        if let Some(d) = data {
            s.write_all(d).await?;
        }
        s.flush().await?;
        let mut magic = [0u8; 4];
        s.read_exact(&mut magic).await?;
        match u32::from_be_bytes(magic) {
            SIMPLE_REPLY_MAGIC => {
                let mut rest = [0u8; 12];
                s.read_exact(&mut rest).await?;
                let err = u32::from_be_bytes(rest[0..4].try_into().unwrap_or_default());
                let got = u64::from_be_bytes(rest[4..12].try_into().unwrap_or_default());
                if got != cookie {
                    return Err(bad("reply to an unknown request"));
                }
                if err != 0 {
                    return Err(nbd_error(err, ""));
                }
                if let Some(b) = buf.as_deref_mut() {
                    if self.structured {
                        return Err(bad("simple reply to a structured read"));
                    }
                    s.read_exact(b).await?;
                }
                Ok(())
            }
            STRUCTURED_REPLY_MAGIC => {
                let mut extents = extents;
                let mut first = Some(u32::from_be_bytes(magic));
                let mut error: Option<io::Error> = None;
                loop {
                    if first.take().is_none() {
                        s.read_exact(&mut magic).await?;
                        if u32::from_be_bytes(magic) != STRUCTURED_REPLY_MAGIC {
                            return Err(bad("bad reply magic"));
                        }
                    }
                    let mut h = [0u8; 16];
                    s.read_exact(&mut h).await?;
                    let rflags = u16::from_be_bytes([h[0], h[1]]);
                    let rtype = u16::from_be_bytes([h[2], h[3]]);
                    let got = u64::from_be_bytes(h[4..12].try_into().unwrap_or_default());
                    let plen = u32::from_be_bytes(h[12..16].try_into().unwrap_or_default());
                    if got != cookie {
                        return Err(bad("reply to an unknown request"));
                    }
                    if plen > len.max(64 << 10).saturating_add(4096) {
                        return Err(bad(format!("reply chunk of {plen} bytes is too long")));
                    }
                    match rtype {
                        REPLY_TYPE_NONE => {}
                        REPLY_TYPE_OFFSET_DATA => {
                            let mut o = [0u8; 8];
                            s.read_exact(&mut o).await?;
                            let at = u64::from_be_bytes(o);
                            let n = plen.checked_sub(8).ok_or_else(|| bad("short data chunk"))?;
                            let b = buf.as_deref_mut().ok_or_else(|| bad("data for no read"))?;
                            let start = at
                                .checked_sub(offset)
                                .ok_or_else(|| bad("data chunk before the request"))?;
                            let end = start + u64::from(n);
                            if end > b.len() as u64 {
                                return Err(bad("data chunk past the request"));
                            }
                            s.read_exact(&mut b[start as usize..end as usize]).await?;
                        }
                        REPLY_TYPE_OFFSET_HOLE => {
                            let mut p = [0u8; 12];
                            if plen != 12 {
                                return Err(bad("bad hole chunk"));
                            }
                            s.read_exact(&mut p).await?;
                            let at = u64::from_be_bytes(p[0..8].try_into().unwrap_or_default());
                            let n = u32::from_be_bytes(p[8..12].try_into().unwrap_or_default());
                            let b = buf.as_deref_mut().ok_or_else(|| bad("hole for no read"))?;
                            let start = at
                                .checked_sub(offset)
                                .ok_or_else(|| bad("hole before the request"))?;
                            let end = start + u64::from(n);
                            if end > b.len() as u64 {
                                return Err(bad("hole chunk past the request"));
                            }
                            b[start as usize..end as usize].fill(0);
                        }
                        REPLY_TYPE_BLOCK_STATUS => {
                            let mut p = vec![0u8; plen as usize];
                            s.read_exact(&mut p).await?;
                            if plen < 12 || (plen - 4) % 8 != 0 {
                                return Err(bad("bad block status chunk"));
                            }
                            let id = u32::from_be_bytes(p[0..4].try_into().unwrap_or_default());
                            if Some(id) == self.context {
                                if let Some(list) = extents.as_deref_mut() {
                                    for e in p[4..].chunks_exact(8) {
                                        list.push((
                                            u32::from_be_bytes(
                                                e[0..4].try_into().unwrap_or_default(),
                                            ),
                                            u32::from_be_bytes(
                                                e[4..8].try_into().unwrap_or_default(),
                                            ),
                                        ));
                                    }
                                }
                            }
                        }
                        t if t & (1 << 15) != 0 => {
                            let mut p = vec![0u8; plen as usize];
                            s.read_exact(&mut p).await?;
                            if plen < 6 {
                                return Err(bad("bad error chunk"));
                            }
                            let code = u32::from_be_bytes(p[0..4].try_into().unwrap_or_default());
                            let mlen = u16::from_be_bytes([p[4], p[5]]) as usize;
                            let msg = p
                                .get(6..6 + mlen)
                                .map(String::from_utf8_lossy)
                                .unwrap_or_default();
                            error.get_or_insert_with(|| nbd_error(code, &msg));
                        }
                        t => {
                            // Unknown non-error chunks are skipped (the spec's rule).
                            let mut p = vec![0u8; plen as usize];
                            s.read_exact(&mut p).await?;
                            tracing::debug!("nbd: skipped reply chunk of type {t}");
                        }
                    }
                    if rflags & REPLY_FLAG_DONE != 0 {
                        break;
                    }
                }
                match error {
                    Some(e) => Err(e),
                    None => Ok(()),
                }
            }
            m => Err(bad(format!("bad reply magic {m:#x}"))),
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(io::Error::from_raw_os_error(22));
        }
        Ok(())
    }

    async fn read_into(&self, mut buf: IoBufMut, offset: u64) -> io::Result<IoBufMut> {
        let end = (offset + buf.len() as u64).min(self.size);
        if offset < end {
            let mut pos = 0usize;
            let total = (end - offset) as usize;
            while pos < total {
                let n = (total - pos).min(self.max_request as usize);
                self.request(
                    CMD_READ,
                    0,
                    offset + pos as u64,
                    n as u32,
                    None,
                    Sink::Data(&mut buf[pos..pos + n]),
                )
                .await?;
                pos += n;
            }
        }
        let from = end.saturating_sub(offset) as usize;
        buf[from..].fill(0);
        Ok(buf)
    }

    async fn write_from(&self, data: IoBuf, offset: u64) -> io::Result<()> {
        self.check_range(offset, data.len() as u64)?;
        let mut pos = 0usize;
        while pos < data.len() {
            let n = (data.len() - pos).min(self.max_request as usize);
            self.request(
                CMD_WRITE,
                0,
                offset + pos as u64,
                n as u32,
                Some(&data[pos..pos + n]),
                Sink::None,
            )
            .await?;
            pos += n;
        }
        Ok(())
    }

    async fn ranged(&self, cmd: u16, flags: u16, offset: u64, len: u64) -> io::Result<()> {
        self.check_range(offset, len)?;
        let mut pos = 0u64;
        while pos < len {
            let n = (len - pos).min(1 << 30);
            self.request(cmd, flags, offset + pos, n as u32, None, Sink::None)
                .await?;
            pos += n;
        }
        Ok(())
    }

    async fn zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.flags & FLAG_SEND_WRITE_ZEROES != 0 {
            return self
                .ranged(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, offset, len)
                .await;
        }
        let mut pos = 0u64;
        while pos < len {
            let n = (len - pos).min(1 << 20);
            self.write_from(IoBuf::zeroed(n as usize), offset + pos)
                .await?;
            pos += n;
        }
        Ok(())
    }

    /// `(hole, len)`, with QEMU's reading of a dirty bitmap context (see the module docs).
    async fn status(&self, offset: u64, max: u64) -> io::Result<(u32, u64)> {
        if self.context.is_none() || offset >= self.size {
            return Ok((0, max));
        }
        let len = max
            .min(self.size - offset)
            .min(u32::MAX as u64 / 512 * 512)
            .max(1) as u32;
        let mut extents = Vec::new();
        self.request(
            CMD_BLOCK_STATUS,
            CMD_FLAG_REQ_ONE,
            offset,
            len,
            None,
            Sink::Extents(&mut extents),
        )
        .await?;
        match extents.first() {
            Some(&(n, flags)) if n > 0 => Ok((flags, u64::from(n).min(max))),
            _ => Err(bad("empty block status reply")),
        }
    }

    /// The block status flags (`STATE_HOLE`, `STATE_ZERO`) of the extent at `offset`.
    pub async fn extent(&self, offset: u64, max: u64) -> io::Result<(u32, u64)> {
        self.status(offset, max).await
    }
}

impl Drop for NbdStorage {
    /// Says goodbye (`NBD_CMD_DISC`) if the connection is idle; otherwise the server sees the
    /// connection close, which it must handle anyway.
    fn drop(&mut self) {
        if let Ok(mut conn) = self.conn.try_lock() {
            let req = Request {
                flags: 0,
                cmd: CMD_DISC,
                cookie: 0,
                offset: 0,
                len: 0,
            };
            let b = req.encode();
            let waker = futures_util::task::noop_waker();
            let mut cx = std::task::Context::from_waker(&waker);
            let _ = std::pin::Pin::new(&mut conn.stream).poll_write(&mut cx, &b);
        }
    }
}

impl Storage for NbdStorage {
    fn read_at(&self, buf: IoBufMut, offset: u64) -> IoFuture<'_, io::Result<IoBufMut>> {
        Box::pin(self.read_into(buf, offset))
    }

    fn write_at(&self, buf: IoBuf, offset: u64) -> IoFuture<'_, io::Result<()>> {
        Box::pin(self.write_from(buf, offset))
    }

    fn flush(&self) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async move {
            if self.flags & FLAG_SEND_FLUSH != 0 {
                self.request(CMD_FLUSH, 0, 0, 0, None, Sink::None).await?;
            }
            Ok(())
        })
    }

    fn len(&self) -> IoFuture<'_, io::Result<u64>> {
        let n = self.size;
        Box::pin(async move { Ok(n) })
    }

    fn set_len(&self, len: u64) -> IoFuture<'_, io::Result<()>> {
        let same = len == self.size;
        Box::pin(async move {
            if same {
                Ok(())
            } else {
                Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "an NBD export cannot be resized",
                ))
            }
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> IoFuture<'_, io::Result<()>> {
        Box::pin(self.zeroes(offset, len))
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async move {
            if self.flags & FLAG_SEND_TRIM != 0 {
                self.ranged(CMD_TRIM, 0, offset, len).await?;
            }
            Ok(())
        })
    }

    fn protocol(&self) -> &'static str {
        "nbd"
    }

    fn allocate(&self, _offset: u64, _len: u64) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async { Ok(()) })
    }

    fn hole_at(&self, offset: u64, max: u64) -> IoFuture<'_, io::Result<(bool, u64)>> {
        Box::pin(async move {
            let (flags, n) = self.status(offset, max).await?;
            Ok((flags & STATE_HOLE != 0 && flags & STATE_ZERO != 0, n))
        })
    }

    fn extent_at(&self, offset: u64, max: u64) -> IoFuture<'_, io::Result<crate::storage::Extent>> {
        Box::pin(async move {
            let (flags, len) = self.status(offset, max).await?;
            Ok(crate::storage::Extent {
                len,
                data: flags & STATE_HOLE == 0,
                zero: flags & STATE_ZERO != 0,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let t = |s: &str| Target::parse(s).unwrap().unwrap();
        assert_eq!(
            t("nbd+unix:///exp?socket=/tmp/s.sock"),
            Target {
                address: Address::Unix("/tmp/s.sock".into()),
                export: "exp".into(),
                status_context: None,
                bare: false,
                tls: None,
            }
        );
        assert_eq!(
            t("nbd://example.com:1234/a%20b").address,
            Address::Tcp {
                host: "example.com".into(),
                port: 1234
            }
        );
        assert_eq!(t("nbd://example.com:1234/a%20b").export, "a b");
        assert_eq!(
            t("nbd://h").address,
            Address::Tcp {
                host: "h".into(),
                port: DEFAULT_PORT
            }
        );
        assert_eq!(t("nbd:unix:/s:exportname=e").export, "e");
        assert_eq!(t("nbd:unix:/s").address, Address::Unix("/s".into()));
        assert_eq!(
            t("nbd:localhost:10810").address,
            Address::Tcp {
                host: "localhost".into(),
                port: 10810
            }
        );
        assert!(Target::parse("file.qcow2").is_none());
        assert!(Target::parse("nbd+unix:///e").unwrap().is_err());
        assert!(Target::parse("nbd://h:port/e").unwrap().is_err());
    }
}
