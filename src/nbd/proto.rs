//! The NBD wire format: constants, and pure encoders and decoders of the messages qimg exchanges.
//!
//! Nothing here does I/O, so every decoder can be tested on arbitrary bytes: each one validates
//! lengths before it reads and returns a [`ProtoError`] instead of panicking. The handshake and
//! transmission modules only move bytes between the socket and these functions.
//!
//! Reference: the NBD protocol specification (`doc/proto.md` of the NetworkBlockDevice project)
//! and, for the `qemu:` metadata namespace, QEMU's `docs/interop/nbd.rst`. Both header styles are
//! implemented: compact (28-byte requests, simple or 20-byte structured replies) and extended
//! (`NBD_OPT_EXTENDED_HEADERS`: 32-byte requests and replies with 64-bit lengths).

use std::fmt;

/// `NBDMAGIC`, the first thing the server says.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation, and the prefix of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_RESIZE: u16 = 1 << 9;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;
pub const FLAG_BLOCK_STAT_PAYLOAD: u16 = 1 << 12;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

// Information types of NBD_OPT_INFO / NBD_OPT_GO.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Extended headers: the request's length is the size of a payload that follows (for
/// BLOCK_STATUS: the effect length and the context ids to answer for).
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// Structured replies.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

// Block status flags of `base:allocation`.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// Metadata context names.
pub const CTX_BASE_ALLOCATION: &str = "base:allocation";
pub const CTX_QEMU_ALLOCATION_DEPTH: &str = "qemu:allocation-depth";

/// Longest string (export name, description, context name, error message) the spec allows.
pub const MAX_STRING: usize = 4096;
/// The largest READ/WRITE payload we accept: the spec's interoperable maximum.
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// Size of a request header.
pub const REQUEST_LEN: usize = 28;
/// Size of a request header with extended headers.
pub const EXTENDED_REQUEST_LEN: usize = 32;
/// Size of an option request header.
pub const OPTION_HEADER_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Size of a reply chunk header with extended headers.
pub const EXTENDED_HEADER_LEN: usize = 32;
/// Size of a simple reply.
pub const SIMPLE_REPLY_LEN: usize = 16;

/// NBD error numbers (the only values allowed on the wire).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum NbdError {
    Perm = 1,
    Io = 5,
    NoMem = 12,
    Inval = 22,
    NoSpc = 28,
    Overflow = 75,
    NotSup = 95,
    Shutdown = 108,
}

impl NbdError {
    /// Maps a Linux errno to the NBD error that describes it best.
    pub fn from_errno(errno: i32) -> NbdError {
        match errno {
            1 | 13 | 30 => NbdError::Perm,    // EPERM, EACCES, EROFS
            12 => NbdError::NoMem,            // ENOMEM
            22 => NbdError::Inval,            // EINVAL
            27 | 28 | 122 => NbdError::NoSpc, // EFBIG, ENOSPC, EDQUOT
            75 => NbdError::Overflow,         // EOVERFLOW
            95 => NbdError::NotSup,           // EOPNOTSUPP
            108 => NbdError::Shutdown,        // ESHUTDOWN
            _ => NbdError::Io,
        }
    }

    pub fn code(self) -> u32 {
        self as u32
    }
}

impl fmt::Display for NbdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            NbdError::Perm => "EPERM",
            NbdError::Io => "EIO",
            NbdError::NoMem => "ENOMEM",
            NbdError::Inval => "EINVAL",
            NbdError::NoSpc => "ENOSPC",
            NbdError::Overflow => "EOVERFLOW",
            NbdError::NotSup => "ENOTSUP",
            NbdError::Shutdown => "ESHUTDOWN",
        };
        f.write_str(s)
    }
}

/// Malformed input from the peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProtoError {
    /// A magic number is wrong: the stream cannot be resynchronized.
    BadMagic(u64),
    /// The message is shorter than its fields say.
    Truncated,
    /// A length field exceeds what the message or the protocol allows.
    TooLong,
    /// A string is not UTF-8 or contains NUL.
    BadString,
    /// Trailing bytes after the last field.
    Trailing,
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtoError::BadMagic(m) => write!(f, "bad magic {m:#x}"),
            ProtoError::Truncated => f.write_str("message truncated"),
            ProtoError::TooLong => f.write_str("length field too large"),
            ProtoError::BadString => f.write_str("string is not valid UTF-8 or contains NUL"),
            ProtoError::Trailing => f.write_str("unexpected trailing data"),
        }
    }
}

impl std::error::Error for ProtoError {}

/// A cursor over a received message; every read checks the remaining length.
pub struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Cursor { buf }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if n > self.buf.len() {
            return Err(ProtoError::Truncated);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub fn u16(&mut self) -> Result<u16, ProtoError> {
        let b = self.bytes(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub fn u32(&mut self) -> Result<u32, ProtoError> {
        let b = self.bytes(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u64(&mut self) -> Result<u64, ProtoError> {
        let b = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// A string of `n` bytes (at most [`MAX_STRING`]).
    pub fn string(&mut self, n: usize) -> Result<String, ProtoError> {
        if n > MAX_STRING {
            return Err(ProtoError::TooLong);
        }
        let b = self.bytes(n)?;
        let s = std::str::from_utf8(b).map_err(|_| ProtoError::BadString)?;
        if s.contains('\0') {
            return Err(ProtoError::BadString);
        }
        Ok(s.to_string())
    }

    /// A string preceded by its 32-bit length.
    pub fn string32(&mut self) -> Result<String, ProtoError> {
        let n = self.u32()? as usize;
        if n > self.remaining() {
            return Err(ProtoError::Truncated);
        }
        self.string(n)
    }

    pub fn finish(&self) -> Result<(), ProtoError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::Trailing)
        }
    }
}

/// An option request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

impl OptionHeader {
    pub fn decode(b: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, ProtoError> {
        let mut c = Cursor::new(b);
        let magic = c.u64()?;
        if magic != IHAVEOPT {
            return Err(ProtoError::BadMagic(magic));
        }
        Ok(OptionHeader {
            option: c.u32()?,
            len: c.u32()?,
        })
    }

    pub fn encode(&self) -> [u8; OPTION_HEADER_LEN] {
        let mut b = [0u8; OPTION_HEADER_LEN];
        b[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..16].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// Name of an option, for logs.
pub fn option_name(opt: u32) -> &'static str {
    match opt {
        OPT_EXPORT_NAME => "EXPORT_NAME",
        OPT_ABORT => "ABORT",
        OPT_LIST => "LIST",
        4 => "PEEK_EXPORT",
        OPT_STARTTLS => "STARTTLS",
        OPT_INFO => "INFO",
        OPT_GO => "GO",
        OPT_STRUCTURED_REPLY => "STRUCTURED_REPLY",
        OPT_LIST_META_CONTEXT => "LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "SET_META_CONTEXT",
        OPT_EXTENDED_HEADERS => "EXTENDED_HEADERS",
        _ => "unknown",
    }
}

/// The payload of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub infos: Vec<u16>,
}

impl InfoRequest {
    pub fn decode(data: &[u8]) -> Result<InfoRequest, ProtoError> {
        let mut c = Cursor::new(data);
        let name = c.string32()?;
        let n = c.u16()? as usize;
        if n * 2 != c.remaining() {
            return Err(if n * 2 > c.remaining() {
                ProtoError::Truncated
            } else {
                ProtoError::Trailing
            });
        }
        let mut infos = Vec::with_capacity(n);
        for _ in 0..n {
            infos.push(c.u16()?);
        }
        Ok(InfoRequest { name, infos })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(self.name.len() as u32).to_be_bytes());
        v.extend_from_slice(self.name.as_bytes());
        v.extend_from_slice(&(self.infos.len() as u16).to_be_bytes());
        for i in &self.infos {
            v.extend_from_slice(&i.to_be_bytes());
        }
        v
    }
}

/// The payload of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub export: String,
    pub queries: Vec<String>,
}

impl MetaContextRequest {
    pub fn decode(data: &[u8]) -> Result<MetaContextRequest, ProtoError> {
        let mut c = Cursor::new(data);
        let export = c.string32()?;
        let n = c.u32()? as usize;
        // Each query takes at least its 4-byte length: bound the count before allocating.
        if n > c.remaining() / 4 {
            return Err(ProtoError::Truncated);
        }
        let mut queries = Vec::with_capacity(n);
        for _ in 0..n {
            queries.push(c.string32()?);
        }
        c.finish()?;
        Ok(MetaContextRequest { export, queries })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(self.export.len() as u32).to_be_bytes());
        v.extend_from_slice(self.export.as_bytes());
        v.extend_from_slice(&(self.queries.len() as u32).to_be_bytes());
        for q in &self.queries {
            v.extend_from_slice(&(q.len() as u32).to_be_bytes());
            v.extend_from_slice(q.as_bytes());
        }
        v
    }
}

/// An option reply: header and payload in one buffer.
pub fn option_reply(option: u32, rtype: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + payload.len());
    v.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&rtype.to_be_bytes());
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// `NBD_INFO_EXPORT` payload.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut v = Vec::with_capacity(12);
    v.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v
}

/// `NBD_INFO_NAME` / `NBD_INFO_DESCRIPTION` payload.
pub fn info_string(kind: u16, s: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(2 + s.len());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(truncate_str(s, MAX_STRING).as_bytes());
    v
}

/// `NBD_INFO_BLOCK_SIZE` payload.
pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(14);
    v.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    v.extend_from_slice(&min.to_be_bytes());
    v.extend_from_slice(&preferred.to_be_bytes());
    v.extend_from_slice(&max.to_be_bytes());
    v
}

/// `NBD_REP_SERVER` payload.
pub fn rep_server(name: &str, description: &str) -> Vec<u8> {
    let name = truncate_str(name, MAX_STRING);
    let mut v = Vec::with_capacity(4 + name.len() + description.len());
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(truncate_str(description, MAX_STRING).as_bytes());
    v
}

/// `NBD_REP_META_CONTEXT` payload.
pub fn rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + name.len());
    v.extend_from_slice(&id.to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A transmission request header (either style).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub cmd: u16,
    pub cookie: u64,
    pub offset: u64,
    /// The effect length; with extended headers and `CMD_FLAG_PAYLOAD_LEN`, the payload length.
    pub len: u64,
}

impl Request {
    pub fn decode(b: &[u8; REQUEST_LEN]) -> Result<Request, ProtoError> {
        let mut c = Cursor::new(b);
        let magic = c.u32()?;
        if magic != REQUEST_MAGIC {
            return Err(ProtoError::BadMagic(magic as u64));
        }
        Ok(Request {
            flags: c.u16()?,
            cmd: c.u16()?,
            cookie: c.u64()?,
            offset: c.u64()?,
            len: c.u32()? as u64,
        })
    }

    pub fn decode_extended(b: &[u8; EXTENDED_REQUEST_LEN]) -> Result<Request, ProtoError> {
        let mut c = Cursor::new(b);
        let magic = c.u32()?;
        if magic != EXTENDED_REQUEST_MAGIC {
            return Err(ProtoError::BadMagic(magic as u64));
        }
        Ok(Request {
            flags: c.u16()?,
            cmd: c.u16()?,
            cookie: c.u64()?,
            offset: c.u64()?,
            len: c.u64()?,
        })
    }

    /// The compact encoding (`len` must fit 32 bits).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.cmd.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&(self.len as u32).to_be_bytes());
        b
    }

    pub fn encode_extended(&self) -> [u8; EXTENDED_REQUEST_LEN] {
        let mut b = [0u8; EXTENDED_REQUEST_LEN];
        b[0..4].copy_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.cmd.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..32].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// Name of a command, for logs.
pub fn command_name(cmd: u16) -> &'static str {
    match cmd {
        CMD_READ => "READ",
        CMD_WRITE => "WRITE",
        CMD_DISC => "DISC",
        CMD_FLUSH => "FLUSH",
        CMD_TRIM => "TRIM",
        CMD_CACHE => "CACHE",
        CMD_WRITE_ZEROES => "WRITE_ZEROES",
        CMD_BLOCK_STATUS => "BLOCK_STATUS",
        _ => "unknown",
    }
}

/// The command flags that are valid on `cmd` (FUA is valid on every command).
pub fn allowed_flags(cmd: u16, structured: bool, extended: bool) -> u16 {
    CMD_FLAG_FUA
        | match cmd {
            CMD_READ if structured => CMD_FLAG_DF,
            CMD_WRITE if extended => CMD_FLAG_PAYLOAD_LEN,
            CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS if extended => CMD_FLAG_REQ_ONE | CMD_FLAG_PAYLOAD_LEN,
            CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            _ => 0,
        }
}

/// A simple reply (16 bytes; READ data follows it on success).
pub fn simple_reply(cookie: u64, error: u32) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// The request a structured reply chunk answers, and the header style to answer in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplyTo {
    pub cookie: u64,
    /// The request's offset (echoed in extended headers).
    pub offset: u64,
    pub extended: bool,
}

/// Longest reply built inline: an extended header and a 12-byte fixed payload.
pub const SMALL_REPLY_MAX: usize = 48;

/// A reply header (with a small fixed payload) built without allocating.
#[derive(Clone, Copy, Debug)]
pub struct SmallReply {
    buf: [u8; SMALL_REPLY_MAX],
    len: usize,
}

impl SmallReply {
    fn put(&mut self, b: &[u8]) {
        self.buf[self.len..self.len + b.len()].copy_from_slice(b);
        self.len += b.len();
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// A structured reply chunk header; `len` is the payload length that follows.
pub fn chunk_header(to: ReplyTo, flags: u16, rtype: u16, len: u64) -> SmallReply {
    let mut b = SmallReply {
        buf: [0; SMALL_REPLY_MAX],
        len: 0,
    };
    if to.extended {
        b.put(&EXTENDED_REPLY_MAGIC.to_be_bytes());
        b.put(&flags.to_be_bytes());
        b.put(&rtype.to_be_bytes());
        b.put(&to.cookie.to_be_bytes());
        b.put(&to.offset.to_be_bytes());
        b.put(&len.to_be_bytes());
    } else {
        b.put(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        b.put(&flags.to_be_bytes());
        b.put(&rtype.to_be_bytes());
        b.put(&to.cookie.to_be_bytes());
        b.put(&(len as u32).to_be_bytes());
    }
    b
}

/// Header of an `OFFSET_DATA` chunk carrying `data_len` bytes at `offset` (the data follows).
pub fn offset_data_header(to: ReplyTo, flags: u16, offset: u64, data_len: u32) -> SmallReply {
    let mut b = chunk_header(to, flags, REPLY_TYPE_OFFSET_DATA, data_len as u64 + 8);
    b.put(&offset.to_be_bytes());
    b
}

/// A complete `OFFSET_HOLE` chunk.
pub fn offset_hole(to: ReplyTo, flags: u16, offset: u64, len: u32) -> SmallReply {
    let mut b = chunk_header(to, flags, REPLY_TYPE_OFFSET_HOLE, 12);
    b.put(&offset.to_be_bytes());
    b.put(&len.to_be_bytes());
    b
}

/// A complete `NONE` chunk (always final).
pub fn none_chunk(to: ReplyTo) -> SmallReply {
    chunk_header(to, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0)
}

/// A complete final `ERROR` chunk with a message for humans.
pub fn error_chunk(to: ReplyTo, err: NbdError, msg: &str) -> Vec<u8> {
    let msg = truncate_str(msg, 1024);
    let h = chunk_header(to, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 6 + msg.len() as u64);
    let mut v = Vec::with_capacity(h.as_bytes().len() + 6 + msg.len());
    v.extend_from_slice(h.as_bytes());
    v.extend_from_slice(&err.code().to_be_bytes());
    v.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    v.extend_from_slice(msg.as_bytes());
    v
}

/// One extent of a block status reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub len: u32,
    pub flags: u32,
}

/// A complete block status chunk for one context: `BLOCK_STATUS` (32-bit descriptors), or with
/// extended headers `BLOCK_STATUS_EXT` (a descriptor count and 64-bit descriptors).
pub fn block_status_chunk(to: ReplyTo, flags: u16, context: u32, extents: &[Extent]) -> Vec<u8> {
    let (rtype, payload) = if to.extended {
        (REPLY_TYPE_BLOCK_STATUS_EXT, 8 + 16 * extents.len())
    } else {
        (REPLY_TYPE_BLOCK_STATUS, 4 + 8 * extents.len())
    };
    let h = chunk_header(to, flags, rtype, payload as u64);
    let mut v = Vec::with_capacity(h.as_bytes().len() + payload);
    v.extend_from_slice(h.as_bytes());
    v.extend_from_slice(&context.to_be_bytes());
    if to.extended {
        v.extend_from_slice(&(extents.len() as u32).to_be_bytes());
        for e in extents {
            v.extend_from_slice(&(e.len as u64).to_be_bytes());
            v.extend_from_slice(&(e.flags as u64).to_be_bytes());
        }
    } else {
        for e in extents {
            v.extend_from_slice(&e.len.to_be_bytes());
            v.extend_from_slice(&e.flags.to_be_bytes());
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_roundtrip_and_bad_magic() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            cmd: CMD_WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            len: 4096,
        };
        let b = r.encode();
        assert_eq!(Request::decode(&b), Ok(r));
        let mut bad = b;
        bad[0] ^= 0xff;
        assert!(matches!(
            Request::decode(&bad),
            Err(ProtoError::BadMagic(_))
        ));
    }

    #[test]
    fn option_header() {
        let h = OptionHeader {
            option: OPT_GO,
            len: 7,
        };
        assert_eq!(OptionHeader::decode(&h.encode()), Ok(h));
        let mut b = h.encode();
        b[3] = 0;
        assert!(OptionHeader::decode(&b).is_err());
    }

    #[test]
    fn info_request_validation() {
        let r = InfoRequest {
            name: "disk".into(),
            infos: vec![INFO_BLOCK_SIZE, INFO_NAME],
        };
        assert_eq!(InfoRequest::decode(&r.encode()), Ok(r.clone()));
        let enc = r.encode();
        // Truncations at every length fail cleanly.
        for n in 0..enc.len() {
            assert!(InfoRequest::decode(&enc[..n]).is_err(), "len {n}");
        }
        // Trailing bytes.
        let mut t = enc.clone();
        t.push(0);
        assert_eq!(InfoRequest::decode(&t), Err(ProtoError::Trailing));
        // Name length pointing far past the end.
        let mut huge = enc;
        huge[0..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(InfoRequest::decode(&huge), Err(ProtoError::Truncated));
    }

    #[test]
    fn strings_are_checked() {
        let mut v = Vec::new();
        v.extend_from_slice(&3u32.to_be_bytes());
        v.extend_from_slice(b"a\0b");
        v.extend_from_slice(&0u16.to_be_bytes());
        assert_eq!(InfoRequest::decode(&v), Err(ProtoError::BadString));
        v[4..7].copy_from_slice(&[0xff, 0xfe, 0xfd]);
        assert_eq!(InfoRequest::decode(&v), Err(ProtoError::BadString));
        let long = vec![b'a'; MAX_STRING + 1];
        let mut v = Vec::new();
        v.extend_from_slice(&(long.len() as u32).to_be_bytes());
        v.extend_from_slice(&long);
        v.extend_from_slice(&0u16.to_be_bytes());
        assert_eq!(InfoRequest::decode(&v), Err(ProtoError::TooLong));
    }

    #[test]
    fn meta_context_request_validation() {
        let r = MetaContextRequest {
            export: String::new(),
            queries: vec!["base:allocation".into(), "qemu:".into()],
        };
        assert_eq!(MetaContextRequest::decode(&r.encode()), Ok(r.clone()));
        let enc = r.encode();
        for n in 0..enc.len() {
            assert!(MetaContextRequest::decode(&enc[..n]).is_err(), "len {n}");
        }
        // A query count far larger than the data: refused before any allocation.
        let mut v = Vec::new();
        v.extend_from_slice(&0u32.to_be_bytes());
        v.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(MetaContextRequest::decode(&v), Err(ProtoError::Truncated));
    }

    #[test]
    fn decoders_never_panic_on_random_input() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..20000 {
            let n = rng.usize(0..64);
            let v: Vec<u8> = (0..n).map(|_| rng.u8(..)).collect();
            let _ = InfoRequest::decode(&v);
            let _ = MetaContextRequest::decode(&v);
            if v.len() >= REQUEST_LEN {
                let mut b = [0u8; REQUEST_LEN];
                b.copy_from_slice(&v[..REQUEST_LEN]);
                let _ = Request::decode(&b);
            }
            if v.len() >= EXTENDED_REQUEST_LEN {
                let mut b = [0u8; EXTENDED_REQUEST_LEN];
                b.copy_from_slice(&v[..EXTENDED_REQUEST_LEN]);
                let _ = Request::decode_extended(&b);
            }
        }
    }

    #[test]
    fn reply_encodings() {
        let to = ReplyTo {
            cookie: 1,
            offset: 4096,
            extended: false,
        };
        let s = simple_reply(9, 22);
        assert_eq!(&s[0..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(u32::from_be_bytes([s[4], s[5], s[6], s[7]]), 22);
        let h = offset_hole(to, REPLY_FLAG_DONE, 4096, 512);
        let h = h.as_bytes();
        assert_eq!(h.len(), 32);
        assert_eq!(u16::from_be_bytes([h[6], h[7]]), REPLY_TYPE_OFFSET_HOLE);
        assert_eq!(u32::from_be_bytes([h[16], h[17], h[18], h[19]]), 12);
        let d = offset_data_header(to, 0, 0, 100);
        let d = d.as_bytes();
        assert_eq!(u32::from_be_bytes([d[16], d[17], d[18], d[19]]), 108);
        let e = error_chunk(to, NbdError::Inval, "bad");
        assert_eq!(e.len(), CHUNK_HEADER_LEN + 6 + 3);
        assert_eq!(u32::from_be_bytes([e[16], e[17], e[18], e[19]]), 9);
        let ext = [Extent { len: 512, flags: 3 }, Extent { len: 512, flags: 0 }];
        let b = block_status_chunk(to, REPLY_FLAG_DONE, 1, &ext);
        assert_eq!(b.len(), CHUNK_HEADER_LEN + 4 + 16);
        let long = "é".repeat(3000);
        assert!(error_chunk(to, NbdError::Io, &long).len() <= CHUNK_HEADER_LEN + 6 + 1024);
    }

    fn be64(b: &[u8]) -> u64 {
        u64::from_be_bytes(b[..8].try_into().unwrap())
    }

    #[test]
    fn extended_encodings() {
        let r = Request {
            flags: CMD_FLAG_PAYLOAD_LEN,
            cmd: CMD_BLOCK_STATUS,
            cookie: 7,
            offset: 1 << 40,
            len: 5 << 32,
        };
        assert_eq!(Request::decode_extended(&r.encode_extended()), Ok(r));
        let mut bad = r.encode_extended();
        bad[0] ^= 1;
        assert!(Request::decode_extended(&bad).is_err());

        let to = ReplyTo {
            cookie: 7,
            offset: 1 << 40,
            extended: true,
        };
        let n = none_chunk(to);
        let n = n.as_bytes();
        assert_eq!(n.len(), EXTENDED_HEADER_LEN);
        assert_eq!(&n[0..4], &EXTENDED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(u16::from_be_bytes([n[4], n[5]]), REPLY_FLAG_DONE);
        assert_eq!(be64(&n[8..]), 7);
        assert_eq!(be64(&n[16..]), 1 << 40);
        assert_eq!(be64(&n[24..]), 0);
        let h = offset_hole(to, 0, 8192, 512);
        let h = h.as_bytes();
        assert_eq!(h.len(), EXTENDED_HEADER_LEN + 12);
        assert_eq!(be64(&h[24..]), 12);
        assert_eq!(be64(&h[32..]), 8192);
        let d = offset_data_header(to, 0, 8192, 100);
        assert_eq!(be64(&d.as_bytes()[24..]), 108);
        let e = error_chunk(to, NbdError::Inval, "bad");
        assert_eq!(e.len(), EXTENDED_HEADER_LEN + 6 + 3);
        let ext = [
            Extent { len: 512, flags: 3 },
            Extent {
                len: 1024,
                flags: 0,
            },
        ];
        let b = block_status_chunk(to, REPLY_FLAG_DONE, 2, &ext);
        assert_eq!(
            u16::from_be_bytes([b[6], b[7]]),
            REPLY_TYPE_BLOCK_STATUS_EXT
        );
        assert_eq!(be64(&b[24..]), 8 + 32);
        assert_eq!(b.len(), EXTENDED_HEADER_LEN + 8 + 32);
        assert_eq!(&b[32..40], &[0, 0, 0, 2, 0, 0, 0, 2]);
        assert_eq!(be64(&b[40..]), 512);
        assert_eq!(be64(&b[48..]), 3);
        assert_eq!(be64(&b[56..]), 1024);
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(NbdError::from_errno(1), NbdError::Perm);
        assert_eq!(NbdError::from_errno(122), NbdError::NoSpc);
        assert_eq!(NbdError::from_errno(27), NbdError::NoSpc);
        assert_eq!(NbdError::from_errno(95), NbdError::NotSup);
        assert_eq!(NbdError::from_errno(30), NbdError::Perm);
        assert_eq!(NbdError::from_errno(2), NbdError::Io);
        assert_eq!(NbdError::from_errno(-1), NbdError::Io);
    }

    #[test]
    fn flags_per_command() {
        assert_eq!(allowed_flags(CMD_READ, false, false), CMD_FLAG_FUA);
        assert_eq!(
            allowed_flags(CMD_READ, true, false),
            CMD_FLAG_FUA | CMD_FLAG_DF
        );
        assert_ne!(
            allowed_flags(CMD_WRITE_ZEROES, false, false) & CMD_FLAG_FAST_ZERO,
            0
        );
        assert_ne!(
            allowed_flags(CMD_BLOCK_STATUS, true, false) & CMD_FLAG_REQ_ONE,
            0
        );
        assert_eq!(allowed_flags(CMD_WRITE, true, false) & CMD_FLAG_NO_HOLE, 0);
        assert_eq!(
            allowed_flags(CMD_BLOCK_STATUS, true, false) & CMD_FLAG_PAYLOAD_LEN,
            0
        );
        assert_ne!(
            allowed_flags(CMD_BLOCK_STATUS, true, true) & CMD_FLAG_PAYLOAD_LEN,
            0
        );
    }
}
