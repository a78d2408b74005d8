//! Executes one transmission request against the image and builds its reply.
//!
//! Validation ([`Conn::check`]) is separate from execution so that the request loop can refuse a
//! request before allocating anything for it. Replies are built as lists of byte slices (headers
//! and the data buffers the engine filled) so the writer can send them with vectored writes,
//! without copying data.
//!
//! Structured READ replies describe all-zero 4 KiB blocks with `OFFSET_HOLE` chunks instead of
//! sending the zeros: the data was read anyway (for an unallocated range the engine only fills
//! memory), and the scan stops at the first non-zero word of real data, so it costs little and
//! saves the network and the client most of the work on sparse reads.

use super::export::{DetectZeroes, DiscardMode, Export};
use super::handshake::Negotiated;
use super::proto::*;
use super::status::{self, Context};
use crate::block::ZeroFlags;
use crate::buf::is_zero;
use crate::buf::IoBufMut;
use crate::error::Error;
use std::sync::Arc;

/// Granularity of hole detection in READ replies.
const HOLE_GRAIN: u64 = 4096;
/// Chain lookups a CACHE request may spend warming metadata.
const CACHE_LOOKUPS: usize = 64;

/// Bytes to put on the wire, in order.
pub enum Part {
    /// A header (with a small fixed payload) of at most [`SMALL_REPLY_MAX`] bytes, kept inline.
    Small([u8; SMALL_REPLY_MAX], u8),
    Bytes(Vec<u8>),
    /// `[start, end)` of the reply's data buffer.
    Data(usize, usize),
}

impl Part {
    fn small(b: &[u8]) -> Part {
        let mut a = [0u8; SMALL_REPLY_MAX];
        let n = b.len().min(SMALL_REPLY_MAX);
        a[..n].copy_from_slice(&b[..n]);
        Part::Small(a, n as u8)
    }
}

/// The complete reply to one request: parts to send in order, and the READ data buffer they may
/// point into (given back to the connection's buffer pool once the reply is written).
pub struct Reply {
    pub parts: Vec<Part>,
    pub buf: Option<IoBufMut>,
}

impl Reply {
    fn one(p: Part) -> Reply {
        Reply {
            parts: vec![p],
            buf: None,
        }
    }

    /// The bytes of one part.
    pub fn bytes<'a>(&'a self, p: &'a Part) -> &'a [u8] {
        match p {
            Part::Small(a, n) => &a[..*n as usize],
            Part::Bytes(v) => v,
            Part::Data(start, end) => match &self.buf {
                Some(b) => &b[*start..*end],
                None => &[],
            },
        }
    }

    pub fn len(&self) -> usize {
        self.parts.iter().map(|p| self.bytes(p).len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A refused or failed request: the NBD error and a message for the client's user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub err: NbdError,
    pub msg: String,
}

impl Refusal {
    fn new(err: NbdError, msg: impl Into<String>) -> Refusal {
        Refusal {
            err,
            msg: msg.into(),
        }
    }
}

/// One client connection in transmission phase.
pub struct Conn {
    pub export: Arc<Export>,
    pub neg: Negotiated,
}

impl Conn {
    pub fn new(export: Arc<Export>, mut neg: Negotiated) -> Conn {
        // Block status needs structured replies; a client that skipped them gets no contexts.
        if !neg.structured {
            neg.contexts.clear();
        }
        Conn { export, neg }
    }

    /// Whether `req` may be executed; the error the spec names if not. (`NBD_CMD_DISC` is
    /// handled by the request loop.)
    pub fn check(&self, req: &Request) -> Result<(), Refusal> {
        let structured = self.neg.structured;
        let name = command_name(req.cmd);
        if req.flags & CMD_FLAG_PAYLOAD_LEN != 0 && req.cmd == CMD_BLOCK_STATUS {
            // The request loop turns these into plain requests before checking them.
            return Err(Refusal::new(
                NbdError::Inval,
                "unexpected block status payload",
            ));
        }
        if !matches!(
            req.cmd,
            CMD_READ
                | CMD_WRITE
                | CMD_FLUSH
                | CMD_TRIM
                | CMD_CACHE
                | CMD_WRITE_ZEROES
                | CMD_BLOCK_STATUS
        ) {
            return Err(Refusal::new(
                NbdError::Inval,
                format!("unknown command {}", req.cmd),
            ));
        }
        let bad_flags = req.flags & !allowed_flags(req.cmd, structured, self.neg.extended);
        if bad_flags != 0 {
            return Err(Refusal::new(
                NbdError::Inval,
                format!("flags {bad_flags:#x} are not valid for {name}"),
            ));
        }
        let writes = matches!(req.cmd, CMD_WRITE | CMD_WRITE_ZEROES | CMD_TRIM);
        if writes && self.export.read_only {
            return Err(Refusal::new(NbdError::Perm, "the export is read-only"));
        }
        if req.cmd == CMD_FLUSH {
            return Ok(());
        }
        if req.len > MAX_PAYLOAD as u64 && matches!(req.cmd, CMD_READ | CMD_WRITE) {
            let err = if req.cmd == CMD_READ && structured {
                NbdError::Overflow
            } else {
                NbdError::Inval
            };
            return Err(Refusal::new(
                err,
                format!(
                    "{name} of {} bytes exceeds the maximum payload of {MAX_PAYLOAD}",
                    req.len
                ),
            ));
        }
        if req.cmd == CMD_BLOCK_STATUS {
            if self.neg.contexts.is_empty() {
                return Err(Refusal::new(
                    NbdError::Inval,
                    "no metadata context was negotiated",
                ));
            }
            if req.len == 0 {
                return Err(Refusal::new(NbdError::Inval, "block status of 0 bytes"));
            }
        }
        let size = self.export.size();
        let inside = req
            .offset
            .checked_add(req.len)
            .is_some_and(|end| end <= size);
        if !inside {
            let err = if matches!(req.cmd, CMD_WRITE | CMD_WRITE_ZEROES) {
                NbdError::NoSpc
            } else {
                NbdError::Inval
            };
            return Err(Refusal::new(
                err,
                format!(
                    "{name} at offset {} length {} is beyond the end of the export ({size} bytes)",
                    req.offset, req.len
                ),
            ));
        }
        Ok(())
    }

    /// The reply to a refused or failed request.
    pub fn error_reply(&self, req: &Request, r: &Refusal) -> Reply {
        tracing::debug!(
            "nbd: {} cookie {:#x} offset {} len {}: {}: {}",
            command_name(req.cmd),
            req.cookie,
            req.offset,
            req.len,
            r.err,
            r.msg
        );
        if self.neg.structured {
            Reply::one(Part::Bytes(error_chunk(self.to(req), r.err, &r.msg)))
        } else {
            Reply::one(Part::small(&simple_reply(req.cookie, r.err.code())))
        }
    }

    /// A success without data: a simple reply, or with extended headers (which have none) a
    /// final `NONE` chunk.
    fn ok_reply(&self, req: &Request) -> Reply {
        if self.neg.extended {
            Reply::one(Part::small(none_chunk(self.to(req)).as_bytes()))
        } else {
            Reply::one(Part::small(&simple_reply(req.cookie, 0)))
        }
    }

    /// Whom a structured reply chunk answers, in the negotiated header style.
    fn to(&self, req: &Request) -> ReplyTo {
        ReplyTo {
            cookie: req.cookie,
            offset: req.offset,
            extended: self.neg.extended,
        }
    }

    /// Turns an extended-header BLOCK_STATUS request with a payload (the effect length, then the
    /// ids of the contexts to answer for) into a plain request and its context filter.
    pub fn status_payload(
        &self,
        req: &Request,
        payload: &[u8],
    ) -> Result<(Request, Vec<u32>), Refusal> {
        let bad = |m: &str| Refusal::new(NbdError::Inval, m.to_string());
        if payload.len() < 8 || (payload.len() - 8) % 4 != 0 {
            return Err(bad("malformed block status payload"));
        }
        let mut c = Cursor::new(payload);
        let effect = c.u64().map_err(|e| bad(&e.to_string()))?;
        let mut ids = Vec::new();
        while c.remaining() > 0 {
            let id = c.u32().map_err(|e| bad(&e.to_string()))?;
            if !self.neg.contexts.iter().any(|(i, _)| *i == id) {
                return Err(bad(&format!("metadata context {id} was not negotiated")));
            }
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        if ids.is_empty() {
            return Err(bad("block status payload selects no context"));
        }
        let plain = Request {
            flags: req.flags & !CMD_FLAG_PAYLOAD_LEN,
            len: effect,
            ..*req
        };
        Ok((plain, ids))
    }

    /// Runs a checked request. `buf` is the data of a WRITE, or for a READ a buffer of the
    /// request's length to read into (any content; a new one is allocated without it).
    pub async fn execute(&self, req: Request, buf: Option<IoBufMut>) -> Reply {
        let r = match req.cmd {
            CMD_READ => return self.read(&req, buf).await,
            CMD_BLOCK_STATUS => return self.block_status(&req, None).await,
            CMD_WRITE => self.write(&req, buf).await,
            CMD_WRITE_ZEROES => self.write_zeroes(&req).await,
            CMD_TRIM => self.trim(&req).await,
            CMD_FLUSH => self.export.img.flush().await.map_err(|e| engine_error(&e)),
            CMD_CACHE => self.cache(&req).await,
            _ => Err(Refusal::new(NbdError::Inval, "unknown command")),
        };
        match r {
            Ok(()) => self.ok_reply(&req),
            Err(refusal) => self.error_reply(&req, &refusal),
        }
    }

    /// Makes a completed write durable if the client asked for FUA.
    async fn fua(&self, req: &Request) -> Result<(), Refusal> {
        if req.flags & CMD_FLAG_FUA != 0 && !self.export.writethrough {
            self.export
                .img
                .flush()
                .await
                .map_err(|e| engine_error(&e))?;
        }
        Ok(())
    }

    async fn write(&self, req: &Request, payload: Option<IoBufMut>) -> Result<(), Refusal> {
        let data = payload
            .ok_or_else(|| Refusal::new(NbdError::Inval, "write without data"))?
            .freeze();
        if self.export.detect_zeroes != DetectZeroes::Off && is_zero(&data) {
            let flags = ZeroFlags {
                may_unmap: self.export.detect_zeroes == DetectZeroes::Unmap
                    && self.export.discard == DiscardMode::Unmap,
                fast_only: false,
            };
            self.export
                .img
                .write_zeroes(req.offset, req.len, flags)
                .await
                .map_err(|e| engine_error(&e))?;
            return self.fua(req).await;
        }
        self.export
            .img
            .write(req.offset, data)
            .await
            .map_err(|e| engine_error(&e))?;
        self.fua(req).await
    }

    async fn write_zeroes(&self, req: &Request) -> Result<(), Refusal> {
        let fast = req.flags & CMD_FLAG_FAST_ZERO != 0;
        let flags = ZeroFlags {
            may_unmap: self.export.discard == DiscardMode::Unmap
                && req.flags & CMD_FLAG_NO_HOLE == 0,
            fast_only: fast,
        };
        match self
            .export
            .img
            .write_zeroes(req.offset, req.len, flags)
            .await
        {
            Ok(()) => self.fua(req).await,
            Err(Error::Unsupported(m)) if fast => Err(Refusal::new(NbdError::NotSup, m)),
            Err(e) => Err(engine_error(&e)),
        }
    }

    async fn trim(&self, req: &Request) -> Result<(), Refusal> {
        if self.export.discard == DiscardMode::Ignore {
            return Ok(());
        }
        self.export
            .img
            .discard(req.offset, req.len)
            .await
            .map_err(|e| engine_error(&e))?;
        self.fua(req).await
    }

    /// Loads the metadata of the range (a prefetch hint: data is not read).
    async fn cache(&self, req: &Request) -> Result<(), Refusal> {
        let img = &self.export.img;
        let end = req.offset + req.len;
        let mut pos = req.offset;
        for _ in 0..CACHE_LOOKUPS {
            if pos >= end {
                break;
            }
            let st = crate::block::chain_status(img, pos, end - pos)
                .await
                .map_err(|e| engine_error(&e))?;
            pos += st.len.max(1);
        }
        Ok(())
    }

    async fn read(&self, req: &Request, buf: Option<IoBufMut>) -> Reply {
        let buf = match buf {
            Some(b) if b.len() == req.len as usize => b,
            _ => IoBufMut::for_overwrite(req.len as usize),
        };
        let data = match self.export.img.read(req.offset, buf).await {
            Ok(b) => b,
            Err(e) => return self.error_reply(req, &engine_error(&e)),
        };
        let len = data.len();
        if !self.neg.structured {
            return Reply {
                parts: vec![
                    Part::small(&simple_reply(req.cookie, 0)),
                    Part::Data(0, len),
                ],
                buf: Some(data),
            };
        }
        if len == 0 {
            return Reply::one(Part::small(none_chunk(self.to(req)).as_bytes()));
        }
        let df = req.flags & CMD_FLAG_DF != 0;
        let runs = if df {
            vec![Run {
                zero: false,
                start: 0,
                len,
            }]
        } else {
            zero_runs(req.offset, &data)
        };
        let mut parts = Vec::with_capacity(runs.len() * 2);
        let last = runs.len() - 1;
        for (i, run) in runs.iter().enumerate() {
            let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
            let off = req.offset + run.start as u64;
            if run.zero {
                parts.push(Part::small(
                    offset_hole(self.to(req), flags, off, run.len as u32).as_bytes(),
                ));
            } else {
                parts.push(Part::small(
                    offset_data_header(self.to(req), flags, off, run.len as u32).as_bytes(),
                ));
                parts.push(Part::Data(run.start, run.start + run.len));
            }
        }
        Reply {
            parts,
            buf: Some(data),
        }
    }

    /// Block status in every negotiated context, or (`only`) in the contexts of these ids.
    pub async fn block_status(&self, req: &Request, only: Option<&[u32]>) -> Reply {
        let chosen: Vec<(u32, Context)> = self
            .neg
            .contexts
            .iter()
            .filter(|(id, _)| only.is_none_or(|ids| ids.contains(id)))
            .copied()
            .collect();
        let contexts: Vec<Context> = chosen
            .iter()
            .map(|(_, c)| *c)
            .filter(|c| c.from_chain())
            .collect();
        let req_one = req.flags & CMD_FLAG_REQ_ONE != 0;
        // Lengths beyond 32 bits (extended headers) are answered for a prefix, as the spec
        // allows: the client asks again for the rest.
        let len = req.len.min(u32::MAX as u64) as u32;
        let mut chain_lists = if contexts.is_empty() {
            Vec::new()
        } else {
            match status::extents(&self.export.img, &contexts, req.offset, len, req_one).await {
                Ok(l) => l,
                Err(e) => return self.error_reply(req, &engine_error(&e)),
            }
        }
        .into_iter();
        let lists: Vec<Vec<Extent>> = chosen
            .iter()
            .map(|(_, c)| match c {
                Context::Bitmap(i) => status::bitmap_extents(
                    &self.export.bitmaps[*i as usize],
                    req.offset,
                    len,
                    req_one,
                ),
                _ => chain_lists.next().unwrap_or_default(),
            })
            .collect();
        let n = lists.len();
        let to = self.to(req);
        let parts = chosen
            .iter()
            .zip(lists)
            .enumerate()
            .map(|(i, ((id, _), extents))| {
                let flags = if i + 1 == n { REPLY_FLAG_DONE } else { 0 };
                Part::Bytes(block_status_chunk(to, flags, *id, &extents))
            })
            .collect();
        Reply { parts, buf: None }
    }
}

/// The NBD error for an engine error. `ENOTSUP` is reserved for fast-zero refusals, which
/// `write_zeroes` maps itself.
fn engine_error(e: &Error) -> Refusal {
    let err = match NbdError::from_errno(e.errno()) {
        NbdError::NotSup => NbdError::Io,
        other => other,
    };
    tracing::warn!("nbd: request failed: {e}");
    Refusal::new(err, e.to_string())
}

/// A run of a READ reply: data or zeros, `[start, start + len)` within the buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    zero: bool,
    start: usize,
    len: usize,
}

/// Splits a read buffer (of the disk at `offset`) into data and zero runs at [`HOLE_GRAIN`]
/// granularity, aligned to the disk's offsets.
fn zero_runs(offset: u64, data: &[u8]) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    let mut start = 0usize;
    while start < data.len() {
        let abs = offset + start as u64;
        let end = ((abs / HOLE_GRAIN + 1) * HOLE_GRAIN - offset).min(data.len() as u64) as usize;
        let zero = is_zero(&data[start..end]);
        match runs.last_mut() {
            Some(r) if r.zero == zero => r.len += end - start,
            _ => runs.push(Run {
                zero,
                start,
                len: end - start,
            }),
        }
        start = end;
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_scan() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0u8; 4097]));
        let mut v = vec![0u8; 8192];
        v[8191] = 1;
        assert!(!is_zero(&v));
        v[8191] = 0;
        v[3] = 1;
        assert!(!is_zero(&v));
    }

    #[test]
    fn runs_are_aligned_to_disk_offsets() {
        let mut v = vec![0u8; 16384];
        v[5000] = 1; // second 4 KiB block (disk offset 4096..8192)
        let r = zero_runs(0, &v);
        assert_eq!(
            r,
            vec![
                Run {
                    zero: true,
                    start: 0,
                    len: 4096
                },
                Run {
                    zero: false,
                    start: 4096,
                    len: 4096
                },
                Run {
                    zero: true,
                    start: 8192,
                    len: 8192
                },
            ]
        );
        // Unaligned start: the first block is the piece up to the next 4 KiB boundary.
        let r = zero_runs(1000, &v[..4000]);
        assert_eq!(r.len(), 1);
        let r = zero_runs(1000, &v);
        assert_eq!(r[0].len, 3096);
        assert_eq!(r.iter().map(|r| r.len).sum::<usize>(), v.len());
        assert!(zero_runs(0, &[]).is_empty());
    }
}
