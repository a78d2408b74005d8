//! The client side of the handshake, for `qimg serve --list` (qemu-nbd's `-L`): lists what
//! another NBD server exports, with each export's size, flags, block sizes and metadata contexts.
//!
//! The server is untrusted like any peer: every reply length is bounded before anything is
//! allocated, and a server that answers with something unexpected gets an error, never a panic.

use super::proto::*;
use std::io;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Longest option reply payload read (a `NBD_REP_SERVER` holds two strings of at most
/// [`MAX_STRING`] bytes).
const MAX_REPLY: u32 = 3 * MAX_STRING as u32;
/// Most exports or contexts listed.
const MAX_ITEMS: usize = 10_000;

/// What the handshake could learn about one export.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExportListing {
    pub name: String,
    pub description: String,
    /// `NBD_INFO_EXPORT`: size and transmission flags (none if `NBD_OPT_INFO` failed).
    pub size_flags: Option<(u64, u16)>,
    /// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum block size.
    pub block_sizes: Option<(u32, u32, u32)>,
    /// The metadata contexts the server lists for the export.
    pub contexts: Vec<String>,
}

/// What a server told a listing client.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listing {
    /// Extended headers (64-bit transactions) were negotiated.
    pub extended: bool,
    /// Structured replies (or extended headers) were negotiated.
    pub structured: bool,
    pub exports: Vec<ExportListing>,
}

pub(super) fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

pub(super) struct OptReply {
    pub(super) rtype: u32,
    pub(super) payload: Vec<u8>,
}

pub(super) async fn send_option<W: AsyncWrite + Unpin>(
    w: &mut W,
    option: u32,
    data: &[u8],
) -> io::Result<()> {
    let len = u32::try_from(data.len()).map_err(|_| bad("option too long"))?;
    let mut b = OptionHeader { option, len }.encode().to_vec();
    b.extend_from_slice(data);
    w.write_all(&b).await?;
    w.flush().await
}

pub(super) async fn read_reply<R: AsyncRead + Unpin>(
    r: &mut R,
    option: u32,
) -> io::Result<OptReply> {
    let mut h = [0u8; 20];
    r.read_exact(&mut h)
        .await
        .map_err(|e| read_failed("option reply", e))?;
    let mut c = Cursor::new(&h);
    let magic = c.u64().map_err(|e| bad(e.to_string()))?;
    let opt = c.u32().map_err(|e| bad(e.to_string()))?;
    let rtype = c.u32().map_err(|e| bad(e.to_string()))?;
    let len = c.u32().map_err(|e| bad(e.to_string()))?;
    if magic != OPT_REPLY_MAGIC {
        return Err(bad(format!("bad option reply magic {magic:#x}")));
    }
    if opt != option {
        return Err(bad(format!(
            "reply to option {opt} while waiting for option {option}"
        )));
    }
    if len > MAX_REPLY {
        return Err(bad(format!("option reply of {len} bytes is too long")));
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload)
        .await
        .map_err(|e| read_failed("option reply", e))?;
    Ok(OptReply { rtype, payload })
}

/// The server's message of an error reply, for errors.
pub(super) fn error_text(rep: &OptReply) -> String {
    String::from_utf8_lossy(&rep.payload).into_owned()
}

/// A failed read of `what` from the server, in QEMU's words: a connection that ends early is
/// "Unexpected end-of-file", one that ends inside TLS without TLS's own close is "not properly
/// terminated" (a server that refuses a client after the handshake just closes).
pub(super) fn read_failed(what: &str, e: io::Error) -> io::Error {
    let text = if e.kind() != io::ErrorKind::UnexpectedEof {
        crate::error::strerror(&e)
    } else if e.to_string().contains("close_notify") {
        "Cannot read from TLS channel: The TLS connection was non-properly terminated.".into()
    } else {
        "Unexpected end-of-file before all data were read".into()
    };
    io::Error::new(e.kind(), format!("Failed to read {what}: {text}"))
}

/// QEMU's name of an option (`nbd_opt_lookup`), as its messages print it.
pub(super) fn option_name(option: u32) -> &'static str {
    match option {
        OPT_EXPORT_NAME => "export name",
        OPT_ABORT => "abort",
        OPT_LIST => "list",
        4 => "peek export",
        OPT_STARTTLS => "starttls",
        OPT_INFO => "info",
        OPT_GO => "go",
        OPT_STRUCTURED_REPLY => "structured reply",
        OPT_LIST_META_CONTEXT => "list meta context",
        OPT_SET_META_CONTEXT => "set meta context",
        OPT_EXTENDED_HEADERS => "extended headers",
        _ => "<unknown>",
    }
}

/// An error reply to `option` as QEMU's client reports it: what the error code means for that
/// option, a hint where QEMU gives one, and the server's own message on a line of its own.
pub(super) fn option_error(option: u32, rep: &OptReply) -> io::Error {
    use io::ErrorKind as K;
    let name = option_name(option);
    let (kind, mut text) = match rep.rtype {
        REP_ERR_POLICY => (
            K::PermissionDenied,
            format!("Denied by server for option {option} ({name})"),
        ),
        REP_ERR_INVALID => (
            K::InvalidInput,
            format!("Invalid parameters for option {option} ({name})"),
        ),
        REP_ERR_PLATFORM => (
            K::Unsupported,
            format!("Server lacks support for option {option} ({name})"),
        ),
        REP_ERR_TLS_REQD => (
            K::PermissionDenied,
            format!(
                "TLS negotiation required before option {option} ({name})\n\
                 Did you forget a valid tls-creds?"
            ),
        ),
        REP_ERR_UNKNOWN => (K::NotFound, "Requested export not available".to_string()),
        REP_ERR_SHUTDOWN => (
            K::ConnectionAborted,
            format!("Server shutting down before option {option} ({name})"),
        ),
        REP_ERR_BLOCK_SIZE_REQD => (
            K::Unsupported,
            format!("Server requires INFO_BLOCK_SIZE for option {option} ({name})"),
        ),
        _ => (
            K::Other,
            format!("Unknown error code when asking for option {option} ({name})"),
        ),
    };
    let msg = error_text(rep);
    if !msg.is_empty() {
        text.push_str("\nserver reported: ");
        text.push_str(&msg);
    }
    io::Error::new(kind, text)
}

/// Sends an option without data and tells whether the server acknowledged it (an error reply
/// means no; anything else is a protocol error).
pub(super) async fn simple_option<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    option: u32,
) -> io::Result<bool> {
    send_option(s, option, &[]).await?;
    let rep = read_reply(s, option).await?;
    match rep.rtype {
        REP_ACK => Ok(true),
        t if t & REP_FLAG_ERROR != 0 => Ok(false),
        t => Err(bad(format!("unexpected reply type {t} to option {option}"))),
    }
}

/// The start of a client's handshake: the server's greeting checked (fixed newstyle), the
/// client's flags sent (`NO_ZEROES` when offered).
pub(super) async fn greet<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> io::Result<()> {
    let mut h = [0u8; 18];
    s.read_exact(&mut h).await?;
    let mut c = Cursor::new(&h);
    let (magic, opt_magic, flags) = (
        c.u64().map_err(|e| bad(e.to_string()))?,
        c.u64().map_err(|e| bad(e.to_string()))?,
        c.u16().map_err(|e| bad(e.to_string()))?,
    );
    if magic != NBDMAGIC || opt_magic != IHAVEOPT {
        return Err(bad("not an NBD newstyle server"));
    }
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(bad(
            "the server does not support fixed newstyle negotiation",
        ));
    }
    let mut cflags = FLAG_C_FIXED_NEWSTYLE;
    if flags & FLAG_NO_ZEROES != 0 {
        cflags |= FLAG_C_NO_ZEROES;
    }
    s.write_all(&cflags.to_be_bytes()).await
}

/// Lists the exports of the server at the other end of `s`, as `qemu-nbd --list` does: newstyle
/// handshake, extended headers (else structured replies) if the server has them, `NBD_OPT_LIST`,
/// then `NBD_OPT_INFO` and `NBD_OPT_LIST_META_CONTEXT` for each export, and `NBD_OPT_ABORT`.
pub async fn list_exports<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> io::Result<Listing> {
    greet(s).await?;
    list_greeted(s).await
}

/// [`list_exports`] over TLS: the greeting in clear, `NBD_OPT_STARTTLS`, then the listing over
/// the encrypted stream.
pub async fn list_exports_tls<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    tls: &super::tls::TlsClient,
) -> io::Result<Listing> {
    greet(&mut s).await?;
    let mut t = tls.start(s).await?;
    list_greeted(&mut t).await
}

/// The listing after the greeting (and TLS, if any).
async fn list_greeted<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> io::Result<Listing> {
    let mut listing = Listing::default();
    if simple_option(s, OPT_EXTENDED_HEADERS).await? {
        listing.extended = true;
        listing.structured = true;
    } else {
        listing.structured = simple_option(s, OPT_STRUCTURED_REPLY).await?;
    }

    send_option(s, OPT_LIST, &[]).await?;
    loop {
        let rep = read_reply(s, OPT_LIST).await?;
        match rep.rtype {
            REP_ACK => break,
            REP_SERVER => {
                let mut c = Cursor::new(&rep.payload);
                let name = c.string32().map_err(|e| bad(e.to_string()))?;
                let rest = c.bytes(c.remaining()).map_err(|e| bad(e.to_string()))?;
                if listing.exports.len() >= MAX_ITEMS {
                    return Err(bad("too many exports"));
                }
                listing.exports.push(ExportListing {
                    name,
                    description: String::from_utf8_lossy(rest).into_owned(),
                    ..Default::default()
                });
            }
            t if t & REP_FLAG_ERROR != 0 => return Err(option_error(OPT_LIST, &rep)),
            t => return Err(bad(format!("unexpected reply type {t} to NBD_OPT_LIST"))),
        }
    }

    for e in &mut listing.exports {
        let req = InfoRequest {
            name: e.name.clone(),
            infos: vec![INFO_BLOCK_SIZE],
        };
        send_option(s, OPT_INFO, &req.encode()).await?;
        loop {
            let rep = read_reply(s, OPT_INFO).await?;
            match rep.rtype {
                REP_ACK => break,
                REP_INFO => {
                    let mut c = Cursor::new(&rep.payload);
                    let kind = c.u16().map_err(|e| bad(e.to_string()))?;
                    match kind {
                        INFO_EXPORT => {
                            let size = c.u64().map_err(|e| bad(e.to_string()))?;
                            let flags = c.u16().map_err(|e| bad(e.to_string()))?;
                            e.size_flags = Some((size, flags));
                        }
                        INFO_BLOCK_SIZE => {
                            let min = c.u32().map_err(|e| bad(e.to_string()))?;
                            let opt = c.u32().map_err(|e| bad(e.to_string()))?;
                            let max = c.u32().map_err(|e| bad(e.to_string()))?;
                            e.block_sizes = Some((min, opt, max));
                        }
                        _ => {}
                    }
                }
                t if t & REP_FLAG_ERROR != 0 => return Err(option_error(OPT_INFO, &rep)),
                t => return Err(bad(format!("unexpected reply type {t} to NBD_OPT_INFO"))),
            }
        }
        if !listing.structured {
            continue;
        }
        let req = MetaContextRequest {
            export: e.name.clone(),
            queries: Vec::new(),
        };
        send_option(s, OPT_LIST_META_CONTEXT, &req.encode()).await?;
        loop {
            let rep = read_reply(s, OPT_LIST_META_CONTEXT).await?;
            match rep.rtype {
                REP_ACK => break,
                REP_META_CONTEXT => {
                    let mut c = Cursor::new(&rep.payload);
                    let _id = c.u32().map_err(|e| bad(e.to_string()))?;
                    let name = c.bytes(c.remaining()).map_err(|e| bad(e.to_string()))?;
                    if e.contexts.len() >= MAX_ITEMS {
                        return Err(bad("too many metadata contexts"));
                    }
                    e.contexts.push(String::from_utf8_lossy(name).into_owned());
                }
                // A server without metadata contexts: nothing to list.
                t if t & REP_FLAG_ERROR != 0 => break,
                t => {
                    return Err(bad(format!(
                        "unexpected reply type {t} to NBD_OPT_LIST_META_CONTEXT"
                    )))
                }
            }
        }
    }
    // NBD_OPT_ABORT: the server may or may not answer before it closes.
    let _ = send_option(s, OPT_ABORT, &[]).await;
    Ok(listing)
}

/// Names of the transmission flags, as `qemu-nbd --list` prints them (bit order).
pub fn flag_names(flags: u16) -> Vec<&'static str> {
    const NAMES: [(u16, &str); 12] = [
        (FLAG_READ_ONLY, "readonly"),
        (FLAG_SEND_FLUSH, "flush"),
        (FLAG_SEND_FUA, "fua"),
        (FLAG_ROTATIONAL, "rotational"),
        (FLAG_SEND_TRIM, "trim"),
        (FLAG_SEND_WRITE_ZEROES, "zeroes"),
        (FLAG_SEND_DF, "df"),
        (FLAG_CAN_MULTI_CONN, "multi"),
        (FLAG_SEND_RESIZE, "resize"),
        (FLAG_SEND_CACHE, "cache"),
        (FLAG_SEND_FAST_ZERO, "fast-zero"),
        (FLAG_BLOCK_STAT_PAYLOAD, "block-status-payload"),
    ];
    NAMES
        .iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, n)| *n)
        .collect()
}
