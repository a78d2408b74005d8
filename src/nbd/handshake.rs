//! The fixed newstyle handshake: greeting, client flags, then option haggling until the client
//! picks the export (`NBD_OPT_GO` / `NBD_OPT_EXPORT_NAME`) or leaves.
//!
//! Everything the client sends here is bounded before it is read: an option's data is read into
//! memory only up to [`MAX_OPTION_LEN`] (longer ones are skipped in small pieces and refused), a
//! connection may send at most [`MAX_OPTIONS`] options, and the caller puts a time limit on the
//! whole exchange. Malformed options get the error reply the spec names and haggling continues;
//! only a broken framing (bad magic, unknown client flags) or a refused `NBD_OPT_EXPORT_NAME`,
//! which cannot carry an error, ends the connection.

use super::export::Export;
use super::proto::*;
use super::status::Context;
use std::io;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Longest option data read into memory.
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// Options per connection.
pub const MAX_OPTIONS: usize = 4096;

/// What the client and the server agreed on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Negotiated {
    /// Structured replies (also set with extended headers, which imply them).
    pub structured: bool,
    /// Extended headers: 32-byte requests and replies, 64-bit lengths.
    pub extended: bool,
    /// Selected metadata contexts with the ids given to the client.
    pub contexts: Vec<(u32, Context)>,
}

/// How the handshake ended without entering transmission.
#[derive(Debug)]
pub enum HandshakeEnd {
    /// The client sent `NBD_OPT_ABORT` or hung up between options.
    ClientLeft,
    /// The client broke the protocol in a way that forbids going on.
    Violation(String),
    Io(io::Error),
}

impl From<io::Error> for HandshakeEnd {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            HandshakeEnd::ClientLeft
        } else {
            HandshakeEnd::Io(e)
        }
    }
}

impl std::fmt::Display for HandshakeEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandshakeEnd::ClientLeft => f.write_str("client left during the handshake"),
            HandshakeEnd::Violation(m) => write!(f, "protocol violation: {m}"),
            HandshakeEnd::Io(e) => write!(f, "I/O error: {e}"),
        }
    }
}

/// Runs the server side of the handshake. On success the connection is in transmission phase.
pub async fn handshake<R, W>(
    r: &mut R,
    w: &mut W,
    export: &Export,
) -> Result<Negotiated, HandshakeEnd>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&NBDMAGIC.to_be_bytes());
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    w.write_all(&greeting).await?;
    w.flush().await?;

    let client_flags = r.read_u32().await?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(HandshakeEnd::Violation(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
    haggle(r, w, export, no_zeroes, false).await
}

/// The option haggling after `NBD_OPT_STARTTLS` and the TLS handshake (see `tls`): the
/// greeting and the client flags came before.
pub async fn handshake_after_tls<R, W>(
    r: &mut R,
    w: &mut W,
    export: &Export,
    no_zeroes: bool,
) -> Result<Negotiated, HandshakeEnd>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    haggle(r, w, export, no_zeroes, true).await
}

async fn haggle<R, W>(
    r: &mut R,
    w: &mut W,
    export: &Export,
    no_zeroes: bool,
    tls: bool,
) -> Result<Negotiated, HandshakeEnd>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut h = Haggle {
        export,
        neg: Negotiated::default(),
        out: Vec::new(),
        tls,
    };
    for _ in 0..MAX_OPTIONS {
        let mut hb = [0u8; OPTION_HEADER_LEN];
        r.read_exact(&mut hb).await?;
        let hdr = OptionHeader::decode(&hb)
            .map_err(|e| HandshakeEnd::Violation(format!("option header: {e}")))?;
        tracing::debug!(
            "nbd: option {} ({}), {} bytes",
            option_name(hdr.option),
            hdr.option,
            hdr.len
        );
        if hdr.len > MAX_OPTION_LEN {
            if hdr.option == OPT_EXPORT_NAME {
                return Err(HandshakeEnd::Violation(format!(
                    "export name of {} bytes",
                    hdr.len
                )));
            }
            skip(r, hdr.len as u64).await?;
            let (rtype, msg) = if is_known(hdr.option) {
                (REP_ERR_TOO_BIG, "option data too long")
            } else {
                (REP_ERR_UNSUP, "unknown option")
            };
            h.error(hdr.option, rtype, msg);
            h.send(w).await?;
            continue;
        }
        let mut data = vec![0u8; hdr.len as usize];
        r.read_exact(&mut data).await?;
        match h.option(hdr.option, &data) {
            Step::Continue => h.send(w).await?,
            Step::Abort => {
                // The client may already be gone: a failed reply does not matter.
                let _ = h.send(w).await;
                return Err(HandshakeEnd::ClientLeft);
            }
            Step::Go => {
                h.send(w).await?;
                return Ok(h.neg);
            }
            Step::ExportName(ok) => {
                if !ok {
                    return Err(HandshakeEnd::Violation(
                        "NBD_OPT_EXPORT_NAME for an unknown export".into(),
                    ));
                }
                let mut b = Vec::with_capacity(134);
                b.extend_from_slice(&export.size().to_be_bytes());
                b.extend_from_slice(&export.transmission_flags(&h.neg).to_be_bytes());
                if !no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                w.write_all(&b).await?;
                w.flush().await?;
                return Ok(h.neg);
            }
        }
    }
    Err(HandshakeEnd::Violation(format!(
        "more than {MAX_OPTIONS} options"
    )))
}

fn is_known(opt: u32) -> bool {
    matches!(
        opt,
        OPT_EXPORT_NAME
            | OPT_ABORT
            | OPT_LIST
            | OPT_INFO
            | OPT_GO
            | OPT_STRUCTURED_REPLY
            | OPT_EXTENDED_HEADERS
            | OPT_LIST_META_CONTEXT
            | OPT_SET_META_CONTEXT
    )
}

/// Reads and drops `n` bytes through a small buffer.
async fn skip<R: AsyncRead + Unpin>(r: &mut R, mut n: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 64 << 10];
    while n > 0 {
        let k = n.min(buf.len() as u64) as usize;
        r.read_exact(&mut buf[..k]).await?;
        n -= k as u64;
    }
    Ok(())
}

enum Step {
    Continue,
    Abort,
    Go,
    /// `NBD_OPT_EXPORT_NAME`: whether the name was found.
    ExportName(bool),
}

/// Option haggling state: what was negotiated so far and the replies to send.
struct Haggle<'a> {
    export: &'a Export,
    neg: Negotiated,
    out: Vec<u8>,
    /// The connection is encrypted already.
    tls: bool,
}

impl Haggle<'_> {
    fn reply(&mut self, opt: u32, rtype: u32, payload: &[u8]) {
        self.out
            .extend_from_slice(&option_reply(opt, rtype, payload));
    }

    fn error(&mut self, opt: u32, rtype: u32, msg: &str) {
        tracing::debug!("nbd: option {} refused: {msg}", option_name(opt));
        self.reply(opt, rtype, msg.as_bytes());
    }

    async fn send<W: AsyncWrite + Unpin>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(&self.out).await?;
        w.flush().await?;
        self.out.clear();
        Ok(())
    }

    fn option(&mut self, opt: u32, data: &[u8]) -> Step {
        match opt {
            OPT_EXPORT_NAME => {
                let ok = std::str::from_utf8(data).is_ok_and(|n| self.export.matches(n));
                Step::ExportName(ok)
            }
            OPT_ABORT => {
                self.reply(opt, REP_ACK, &[]);
                Step::Abort
            }
            OPT_LIST => {
                if !data.is_empty() {
                    self.error(opt, REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
                } else {
                    let e = self.export;
                    self.reply(opt, REP_SERVER, &rep_server(&e.name, &e.description));
                    self.reply(opt, REP_ACK, &[]);
                }
                Step::Continue
            }
            OPT_INFO | OPT_GO => self.info(opt, data),
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    self.error(
                        opt,
                        REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    );
                } else if self.neg.extended {
                    self.error(opt, REP_ERR_INVALID, "extended headers already negotiated");
                } else {
                    self.neg.structured = true;
                    self.reply(opt, REP_ACK, &[]);
                }
                Step::Continue
            }
            OPT_EXTENDED_HEADERS => {
                if !data.is_empty() {
                    self.error(
                        opt,
                        REP_ERR_INVALID,
                        "NBD_OPT_EXTENDED_HEADERS takes no data",
                    );
                } else if self.neg.extended {
                    self.error(opt, REP_ERR_INVALID, "extended headers already negotiated");
                } else {
                    self.neg.extended = true;
                    self.neg.structured = true;
                    self.reply(opt, REP_ACK, &[]);
                }
                Step::Continue
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                self.meta_context(opt, data);
                Step::Continue
            }
            OPT_STARTTLS => {
                if self.tls {
                    self.error(opt, REP_ERR_INVALID, "TLS is already active");
                } else {
                    self.error(opt, REP_ERR_POLICY, "TLS not configured");
                }
                Step::Continue
            }
            _ => {
                self.error(opt, REP_ERR_UNSUP, "option not supported");
                Step::Continue
            }
        }
    }

    fn info(&mut self, opt: u32, data: &[u8]) -> Step {
        let req = match InfoRequest::decode(data) {
            Ok(r) => r,
            Err(e) => {
                self.error(opt, REP_ERR_INVALID, &format!("malformed request: {e}"));
                return Step::Continue;
            }
        };
        let e = self.export;
        if !e.matches(&req.name) {
            let msg = format!("export '{}' not present", truncate_str(&req.name, 256));
            self.error(opt, REP_ERR_UNKNOWN, &msg);
            return Step::Continue;
        }
        let flags = e.transmission_flags(&self.neg);
        self.reply(opt, REP_INFO, &info_export(e.size(), flags));
        // Block sizes are always sent: clients that did not ask may ignore them.
        let (min, pref, max) = e.block_sizes();
        self.reply(opt, REP_INFO, &info_block_size(min, pref, max));
        if req.infos.contains(&INFO_NAME) {
            self.reply(opt, REP_INFO, &info_string(INFO_NAME, &e.name));
        }
        if req.infos.contains(&INFO_DESCRIPTION) && !e.description.is_empty() {
            self.reply(
                opt,
                REP_INFO,
                &info_string(INFO_DESCRIPTION, &e.description),
            );
        }
        self.reply(opt, REP_ACK, &[]);
        if opt == OPT_GO {
            Step::Go
        } else {
            Step::Continue
        }
    }

    fn meta_context(&mut self, opt: u32, data: &[u8]) {
        let set = opt == OPT_SET_META_CONTEXT;
        if set {
            // A SET replaces the selection even when it fails.
            self.neg.contexts.clear();
        }
        if !self.neg.structured {
            self.error(
                opt,
                REP_ERR_INVALID,
                "structured replies must be negotiated first",
            );
            return;
        }
        let req = match MetaContextRequest::decode(data) {
            Ok(r) => r,
            Err(e) => {
                self.error(opt, REP_ERR_INVALID, &format!("malformed request: {e}"));
                return;
            }
        };
        if !self.export.matches(&req.export) {
            let msg = format!("export '{}' not present", truncate_str(&req.export, 256));
            self.error(opt, REP_ERR_UNKNOWN, &msg);
            return;
        }
        let mut chosen: Vec<Context> = Vec::new();
        if set {
            for q in &req.queries {
                let names = &self.export.bitmap_names;
                if let Some(c) = Context::from_name(q, names).filter(|c| self.export.offers(*c)) {
                    if !chosen.contains(&c) {
                        chosen.push(c);
                    }
                }
            }
        } else if req.queries.is_empty() {
            chosen = Context::all(&self.export.bitmap_names)
                .into_iter()
                .filter(|c| self.export.offers(*c))
                .collect();
        } else {
            for q in &req.queries {
                for c in Context::list_matches(q, &self.export.bitmap_names) {
                    if self.export.offers(c) && !chosen.contains(&c) {
                        chosen.push(c);
                    }
                }
            }
        }
        for c in chosen {
            // Ids are stable per context (listing reports 0, as the spec asks).
            let id = if set { context_id(c) } else { 0 };
            let name = c.name(&self.export.bitmap_names);
            self.reply(opt, REP_META_CONTEXT, &rep_meta_context(id, &name));
            if set {
                self.neg.contexts.push((id, c));
            }
        }
        self.reply(opt, REP_ACK, &[]);
    }
}

/// The id a context gets in `NBD_OPT_SET_META_CONTEXT` replies.
pub fn context_id(c: Context) -> u32 {
    match c {
        Context::Allocation => 1,
        Context::Depth => 2,
        Context::Bitmap(i) => 3 + u32::from(i),
    }
}
