//! `qimg serve` against a raw NBD client written here from the specification: protocol
//! conformance details the real clients do not exercise, malformed and adversarial input (the
//! server must answer with the error the spec names, keep the connection where it can, never
//! crash, never grow without bound, never corrupt the image), and durability when the server is
//! killed (every write acknowledged before a FLUSH reply must survive SIGKILL).
//!
//! The wire format is encoded here independently of `qimg::nbd::proto`, so that a mistake there
//! cannot hide itself.

mod common;

use common::*;
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const QIMG: &str = env!("CARGO_BIN_EXE_qimg");

// Wire constants (NBD protocol specification).
const NBDMAGIC: u64 = 0x4e42444d41474943;
const IHAVEOPT: u64 = 0x49484156454f5054;
const REPLY_MAGIC: u64 = 0x3e889045565a9;
const REQUEST_MAGIC: u32 = 0x25609513;
const SIMPLE_MAGIC: u32 = 0x67446698;
const STRUCTURED_MAGIC: u32 = 0x668e33ef;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_STARTTLS: u32 = 5;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_LIST_META_CONTEXT: u32 = 9;
const OPT_SET_META_CONTEXT: u32 = 10;
const OPT_EXTENDED_HEADERS: u32 = 11;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_ERR_UNSUP: u32 = 0x8000_0001;
const REP_ERR_INVALID: u32 = 0x8000_0003;
const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_CACHE: u16 = 5;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_BLOCK_STATUS: u16 = 7;

const FLAG_FUA: u16 = 1;
const FLAG_NO_HOLE: u16 = 2;
const FLAG_DF: u16 = 4;
const FLAG_REQ_ONE: u16 = 8;
const FLAG_FAST_ZERO: u16 = 16;

const TYPE_NONE: u16 = 0;
const TYPE_DATA: u16 = 1;
const TYPE_HOLE: u16 = 2;
const TYPE_BLOCK_STATUS: u16 = 5;

const EPERM: u32 = 1;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const EOVERFLOW: u32 = 75;
const ENOTSUP: u32 = 95;

// ---------------------------------------------------------------------------------------------
// The server process.

struct Served {
    child: Option<Child>,
    addr: String,
}

impl Served {
    fn start(args: &[&str]) -> Served {
        let mut child = Command::new(QIMG)
            .args(["serve", "-t", "--bind", "127.0.0.1:0"])
            // Several clients at once unless the test says how many.
            .args(if args.contains(&"--shared") {
                &[][..]
            } else {
                &["--shared=16"][..]
            })
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cannot start qimg serve");
        let mut r = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        std::thread::spawn(move || {
            let mut sink = String::new();
            while r.read_line(&mut sink).is_ok_and(|n| n > 0) {
                sink.clear();
            }
        });
        let uri = line.trim();
        let addr = uri
            .strip_prefix("nbd://")
            .unwrap_or_else(|| panic!("qimg serve did not start: {uri:?}"));
        let addr = addr.split('/').next().unwrap().to_string();
        Served {
            child: Some(child),
            addr,
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn alive(&mut self) -> bool {
        self.child.as_mut().unwrap().try_wait().unwrap().is_none()
    }

    /// Resident memory of the server in KiB.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap()
    }

    fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status();
    }

    fn wait(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        let start = Instant::now();
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            if start.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                panic!("qimg serve did not exit");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn stop(self) -> ExitStatus {
        self.signal("-TERM");
        self.wait()
    }

    /// Checks that a well-behaved client is still served.
    fn assert_serving(&mut self) {
        assert!(self.alive(), "the server died");
        let mut c = Client::open(&self.addr, true, &[]);
        c.read(0, 4096).expect("a good client is served");
        c.disconnect();
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A raw client.

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

fn connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Reads the greeting; returns the handshake flags.
fn greet(s: &mut TcpStream) -> u16 {
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    assert_eq!(be64(&g[0..8]), NBDMAGIC);
    assert_eq!(be64(&g[8..16]), IHAVEOPT);
    be16(&g[16..18])
}

fn send_option(s: &mut TcpStream, opt: u32, data: &[u8]) {
    let mut v = Vec::new();
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    s.write_all(&v).unwrap();
}

/// One option reply: (option, type, data).
fn option_reply(s: &mut TcpStream) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    assert_eq!(be64(&h[0..8]), REPLY_MAGIC);
    let len = be32(&h[16..20]) as usize;
    assert!(len < 1 << 20, "option reply of {len} bytes");
    let mut d = vec![0u8; len];
    s.read_exact(&mut d).unwrap();
    (be32(&h[8..12]), be32(&h[12..16]), d)
}

/// Replies to one option up to and including the final one.
fn option_replies(s: &mut TcpStream, opt: u32) -> Vec<(u32, Vec<u8>)> {
    let mut out = Vec::new();
    loop {
        let (o, t, d) = option_reply(s);
        assert_eq!(o, opt);
        let last = t == REP_ACK || t & 0x8000_0000 != 0;
        out.push((t, d));
        if last {
            return out;
        }
    }
}

fn info_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        v.extend_from_slice(&i.to_be_bytes());
    }
    v
}

fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        v.extend_from_slice(&(q.len() as u32).to_be_bytes());
        v.extend_from_slice(q.as_bytes());
    }
    v
}

/// A message from the server in transmission phase.
#[derive(Debug)]
enum Msg {
    Simple {
        cookie: u64,
        error: u32,
        data: Vec<u8>,
    },
    Chunk {
        flags: u16,
        kind: u16,
        cookie: u64,
        payload: Vec<u8>,
    },
}

impl Msg {
    fn cookie(&self) -> u64 {
        match self {
            Msg::Simple { cookie, .. } | Msg::Chunk { cookie, .. } => *cookie,
        }
    }

    fn is_final(&self) -> bool {
        match self {
            Msg::Simple { .. } => true,
            Msg::Chunk { flags, .. } => flags & 1 != 0,
        }
    }
}

struct Client {
    s: TcpStream,
    structured: bool,
    size: u64,
    tflags: u16,
    /// Metadata contexts: id → name.
    contexts: HashMap<u32, String>,
    next_cookie: u64,
    /// Lengths of outstanding READs (simple replies carry no length).
    reads: HashMap<u64, usize>,
}

impl Client {
    /// Handshake with NBD_OPT_GO on the default export.
    fn open(addr: &str, structured: bool, contexts: &[&str]) -> Client {
        let mut s = connect(addr);
        let hflags = greet(&mut s);
        assert_eq!(hflags & 3, 3, "fixed newstyle and no zeroes");
        s.write_all(&3u32.to_be_bytes()).unwrap();
        if structured {
            send_option(&mut s, OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(option_replies(&mut s, OPT_STRUCTURED_REPLY)[0].0, REP_ACK);
        }
        let mut ctx = HashMap::new();
        if !contexts.is_empty() {
            send_option(&mut s, OPT_SET_META_CONTEXT, &meta_data("", contexts));
            for (t, d) in option_replies(&mut s, OPT_SET_META_CONTEXT) {
                if t == REP_META_CONTEXT {
                    ctx.insert(be32(&d[0..4]), String::from_utf8(d[4..].to_vec()).unwrap());
                } else {
                    assert_eq!(t, REP_ACK);
                }
            }
        }
        send_option(&mut s, OPT_GO, &info_data("", &[3]));
        let mut size = None;
        let mut tflags = 0;
        for (t, d) in option_replies(&mut s, OPT_GO) {
            match t {
                REP_INFO if be16(&d) == 0 => {
                    size = Some(be64(&d[2..10]));
                    tflags = be16(&d[10..12]);
                }
                REP_INFO if be16(&d) == 3 => {
                    assert_eq!(be32(&d[2..6]), 1, "minimum block size");
                    assert_eq!(be32(&d[10..14]), 32 << 20, "maximum payload");
                }
                REP_INFO => {}
                REP_ACK => {}
                other => panic!("GO failed: {other:#x} {}", String::from_utf8_lossy(&d)),
            }
        }
        Client {
            s,
            structured,
            size: size.expect("NBD_INFO_EXPORT"),
            tflags,
            contexts: ctx,
            next_cookie: 1,
            reads: HashMap::new(),
        }
    }

    fn send(&mut self, flags: u16, cmd: u16, offset: u64, len: u32, payload: &[u8]) -> u64 {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let mut v = Vec::with_capacity(28 + payload.len());
        v.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&cmd.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v.extend_from_slice(&offset.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
        v.extend_from_slice(payload);
        self.s.write_all(&v).unwrap();
        if cmd == CMD_READ {
            self.reads.insert(cookie, len as usize);
        }
        cookie
    }

    fn recv(&mut self) -> std::io::Result<Msg> {
        let mut m = [0u8; 4];
        self.s.read_exact(&mut m)?;
        match be32(&m) {
            SIMPLE_MAGIC => {
                let mut h = [0u8; 12];
                self.s.read_exact(&mut h)?;
                let error = be32(&h[0..4]);
                let cookie = be64(&h[4..12]);
                let len = self.reads.remove(&cookie).unwrap_or(0);
                let mut data = Vec::new();
                if error == 0 && len > 0 {
                    assert!(
                        !self.structured,
                        "simple reply with data to a structured client"
                    );
                    data = vec![0u8; len];
                    self.s.read_exact(&mut data)?;
                }
                Ok(Msg::Simple {
                    cookie,
                    error,
                    data,
                })
            }
            STRUCTURED_MAGIC => {
                assert!(self.structured, "structured reply not negotiated");
                let mut h = [0u8; 16];
                self.s.read_exact(&mut h)?;
                let len = be32(&h[12..16]) as usize;
                assert!(len <= (32 << 20) + 8, "chunk of {len} bytes");
                let mut payload = vec![0u8; len];
                self.s.read_exact(&mut payload)?;
                let msg = Msg::Chunk {
                    flags: be16(&h[0..2]),
                    kind: be16(&h[2..4]),
                    cookie: be64(&h[4..12]),
                    payload,
                };
                if msg.is_final() {
                    self.reads.remove(&msg.cookie());
                }
                Ok(msg)
            }
            other => panic!("bad reply magic {other:#x}"),
        }
    }

    /// All messages of the reply to `cookie` (nothing else may be outstanding).
    fn reply(&mut self, cookie: u64) -> Vec<Msg> {
        let mut out = Vec::new();
        loop {
            let m = self.recv().unwrap();
            assert_eq!(m.cookie(), cookie);
            let last = m.is_final();
            out.push(m);
            if last {
                return out;
            }
        }
    }

    /// Error of a reply (0 for success).
    fn error_of(msgs: &[Msg]) -> u32 {
        for m in msgs {
            match m {
                Msg::Simple { error, .. } if *error != 0 => return *error,
                Msg::Chunk { kind, payload, .. } if kind & 0x8000 != 0 => {
                    let e = be32(&payload[0..4]);
                    assert_ne!(e, 0);
                    let mlen = be16(&payload[4..6]) as usize;
                    assert!(mlen + 6 <= payload.len());
                    return e;
                }
                _ => {}
            }
        }
        0
    }

    fn simple_cmd(&mut self, flags: u16, cmd: u16, offset: u64, len: u32) -> u32 {
        let c = self.send(flags, cmd, offset, len, &[]);
        let r = self.reply(c);
        Self::error_of(&r)
    }

    fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> u32 {
        let c = self.send(flags, CMD_WRITE, offset, data.len() as u32, data);
        let r = self.reply(c);
        Self::error_of(&r)
    }

    /// Reads through either reply style; checks that structured chunks tile the request.
    fn read_flags(
        &mut self,
        offset: u64,
        len: u32,
        flags: u16,
    ) -> Result<(Vec<u8>, Vec<u16>), u32> {
        let c = self.send(flags, CMD_READ, offset, len, &[]);
        let msgs = self.reply(c);
        let e = Self::error_of(&msgs);
        if e != 0 {
            return Err(e);
        }
        let mut buf = vec![0xeeu8; len as usize];
        let mut covered = vec![false; len as usize];
        let mut kinds = Vec::new();
        for m in msgs {
            match m {
                Msg::Simple { data, .. } => {
                    assert_eq!(data.len(), len as usize);
                    buf = data;
                    covered.fill(true);
                }
                Msg::Chunk { kind, payload, .. } => {
                    kinds.push(kind);
                    let (start, n, bytes) = match kind {
                        TYPE_DATA => {
                            let at = be64(&payload[0..8]);
                            (at, payload.len() as u64 - 8, Some(payload[8..].to_vec()))
                        }
                        TYPE_HOLE => {
                            assert_eq!(payload.len(), 12);
                            (be64(&payload[0..8]), be32(&payload[8..12]) as u64, None)
                        }
                        TYPE_NONE => continue,
                        other => panic!("unexpected chunk type {other}"),
                    };
                    assert!(n > 0 && start >= offset && start + n <= offset + len as u64);
                    let r = (start - offset) as usize..(start - offset + n) as usize;
                    assert!(covered[r.clone()].iter().all(|c| !c), "overlapping chunks");
                    covered[r.clone()].fill(true);
                    match bytes {
                        Some(b) => buf[r].copy_from_slice(&b),
                        None => buf[r].fill(0),
                    }
                }
            }
        }
        assert!(covered.iter().all(|&c| c), "chunks do not cover the read");
        Ok((buf, kinds))
    }

    fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.read_flags(offset, len, 0).map(|(b, _)| b)
    }

    /// Block status: context name → extents (length, flags).
    fn block_status(
        &mut self,
        offset: u64,
        len: u32,
        flags: u16,
    ) -> Result<BTreeMap<String, Vec<(u32, u32)>>, u32> {
        let c = self.send(flags, CMD_BLOCK_STATUS, offset, len, &[]);
        let msgs = self.reply(c);
        let e = Self::error_of(&msgs);
        if e != 0 {
            return Err(e);
        }
        let mut out = BTreeMap::new();
        for m in msgs {
            let Msg::Chunk { kind, payload, .. } = m else {
                panic!("block status needs a structured reply")
            };
            if kind == TYPE_NONE {
                continue;
            }
            assert_eq!(kind, TYPE_BLOCK_STATUS);
            assert!(payload.len() >= 12 && (payload.len() - 4) % 8 == 0);
            let id = be32(&payload[0..4]);
            let name = self.contexts.get(&id).expect("known context id").clone();
            let ext: Vec<(u32, u32)> = payload[4..]
                .chunks(8)
                .map(|e| (be32(&e[0..4]), be32(&e[4..8])))
                .collect();
            assert!(ext.iter().all(|e| e.0 > 0), "empty extent");
            let total: u64 = ext.iter().map(|e| e.0 as u64).sum();
            assert!(total <= len as u64, "extents exceed the request");
            assert!(out.insert(name, ext).is_none(), "one chunk per context");
        }
        assert_eq!(out.len(), self.contexts.len());
        Ok(out)
    }

    fn disconnect(mut self) {
        self.send(0, CMD_DISC, 0, 0, &[]);
        // The server closes after answering everything.
        let mut b = [0u8; 1];
        assert_eq!(self.s.read(&mut b).unwrap_or(0), 0);
    }
}

/// Whether the server closed the connection (EOF or reset) within the read timeout.
fn closed_by_server(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => {
                return !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                )
            }
        }
    }
}

fn img_path(dir: &Path, name: &str) -> String {
    dir.join(name).to_str().unwrap().to_string()
}

// ---------------------------------------------------------------------------------------------
// Conformance.

#[test]
fn structured_reads_holes_and_block_status() {
    let dir = tempfile::tempdir().unwrap();
    let img = img_path(dir.path(), "s.qcow2");
    let mut srv = Served::start(&["--create", "64M", "-A", &img]);
    let mut c = Client::open(
        &srv.addr,
        true,
        &[
            "base:allocation",
            "qemu:allocation-depth",
            "x-unknown:thing",
        ],
    );
    assert_eq!(c.size, 64 << 20);
    assert_eq!(c.contexts.len(), 2, "unknown contexts are ignored");
    // Advertised: flush, fua, trim, write zeroes, fast zero, df, multi-conn, cache.
    for bit in [2, 3, 5, 6, 7, 8, 10, 11] {
        assert_ne!(c.tflags & (1 << bit), 0, "transmission flag bit {bit}");
    }
    let a = pattern(1, 65536);
    let b = pattern(2, 4096);
    assert_eq!(c.write(1 << 20, &a, 0), 0);
    assert_eq!(c.write((3 << 20) + 4096, &b, FLAG_FUA), 0);

    // A read over data and zeros: holes for the zeros, data for the rest.
    let (got, kinds) = c.read_flags(0, 4 << 20, 0).unwrap();
    let mut want = vec![0u8; 4 << 20];
    want[1 << 20..(1 << 20) + 65536].copy_from_slice(&a);
    want[(3 << 20) + 4096..(3 << 20) + 8192].copy_from_slice(&b);
    assert!(got == want);
    assert!(kinds.contains(&TYPE_HOLE) && kinds.contains(&TYPE_DATA));
    // With DF: one data chunk.
    let (got, kinds) = c.read_flags(0, 4 << 20, FLAG_DF).unwrap();
    assert!(got == want);
    assert_eq!(kinds, vec![TYPE_DATA]);
    // Unaligned, and zero-length reads.
    let (got, _) = c.read_flags((1 << 20) + 1000, 70000, 0).unwrap();
    assert!(got[..64536] == a[1000..]);
    assert!(got[64536..].iter().all(|&x| x == 0));
    assert!(c.read(0, 0).unwrap().is_empty());

    // Block status in both contexts.
    let st = c.block_status(0, 4 << 20, 0).unwrap();
    // Per 4 KiB block: the flags each context reports.
    let blocks = |ext: &[(u32, u32)]| -> Vec<u32> {
        ext.iter()
            .flat_map(|&(l, f)| std::iter::repeat_n(f, l as usize / 4096))
            .collect()
    };
    let alloc = blocks(&st["base:allocation"]);
    let depth = blocks(&st["qemu:allocation-depth"]);
    assert_eq!(alloc.len(), 1024);
    assert_eq!(depth.len(), 1024);
    for (i, (&f, &d)) in alloc.iter().zip(&depth).enumerate() {
        let off = i as u64 * 4096;
        let written = (1 << 20..(1 << 20) + 65536).contains(&off) || off == (3 << 20) + 4096;
        let in_cluster = (3 << 20..(3 << 20) + 65536).contains(&off);
        if written {
            assert_eq!((f, d), (0, 1), "block at {off}");
        } else if in_cluster {
            // Allocated; the unwritten part of the cluster may be reported as zeros (it is a
            // hole in the file, as QEMU reports it too).
            assert!(f == 0 || f == 2, "block at {off}: {f}");
            assert_eq!(d, 1, "block at {off}");
        } else {
            assert_eq!((f, d), (3, 0), "block at {off}");
        }
    }
    // REQ_ONE: one extent per context, within the request.
    let st = c.block_status(1 << 20, 100000, FLAG_REQ_ONE).unwrap();
    for ext in st.values() {
        assert_eq!(ext.len(), 1);
        assert_eq!(ext[0].0, 65536);
    }
    // Past the end, and zero length.
    assert_eq!(c.block_status(64 << 20, 512, 0), Err(EINVAL));
    assert_eq!(c.block_status(0, 0, 0), Err(EINVAL));

    // Write zeroes: FAST_ZERO refuses what would need a data write, and changes nothing.
    let partial = (1 << 20) + 512;
    assert_eq!(
        c.simple_cmd(FLAG_FAST_ZERO, CMD_WRITE_ZEROES, partial, 512),
        ENOTSUP
    );
    assert!(c.read(1 << 20, 65536).unwrap() == a);
    assert_eq!(
        c.simple_cmd(FLAG_FAST_ZERO, CMD_WRITE_ZEROES, 1 << 20, 65536),
        0
    );
    assert!(c.read(1 << 20, 65536).unwrap().iter().all(|&x| x == 0));
    assert_eq!(
        c.simple_cmd(
            FLAG_NO_HOLE | FLAG_FUA,
            CMD_WRITE_ZEROES,
            (3 << 20) + 4096,
            100
        ),
        0
    );
    assert!(c
        .read((3 << 20) + 4096, 100)
        .unwrap()
        .iter()
        .all(|&x| x == 0));
    assert!(c.read((3 << 20) + 4196, 3996).unwrap() == b[100..]);
    // TRIM (ignored by default), CACHE, FLUSH.
    assert_eq!(c.simple_cmd(0, CMD_TRIM, 0, 1 << 20), 0);
    assert_eq!(c.simple_cmd(0, CMD_CACHE, 0, 64 << 20), 0);
    assert_eq!(c.simple_cmd(0, CMD_FLUSH, 0, 0), 0);
    c.disconnect();

    // A client without structured replies gets simple replies with data.
    let mut c = Client::open(&srv.addr, false, &[]);
    assert_eq!(c.tflags & (1 << 7), 0, "no DF without structured replies");
    assert!(c.read((3 << 20) + 4196, 3996).unwrap() == b[100..]);
    assert_eq!(c.simple_cmd(0, CMD_BLOCK_STATUS, 0, 4096), EINVAL);
    c.disconnect();
    srv.assert_serving();
    assert!(srv.stop().success());
    qemu_check_clean(Path::new(&img));
}

#[test]
fn invalid_requests_keep_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let img = img_path(dir.path(), "i.qcow2");
    let mut srv = Served::start(&["--create", "16M", &img]);
    for structured in [true, false] {
        let mut c = Client::open(&srv.addr, structured, &[]);
        let size = c.size;
        let data = pattern(3, 8192);
        assert_eq!(c.write(0, &data, 0), 0);
        let check = |c: &mut Client| assert!(c.read(0, 8192).unwrap() == data);

        assert_eq!(c.read(size - 512, 1024), Err(EINVAL));
        check(&mut c);
        assert_eq!(c.read(u64::MAX - 100, 4096), Err(EINVAL));
        check(&mut c);
        assert_eq!(c.write(size - 512, &[1u8; 1024], 0), ENOSPC);
        check(&mut c);
        assert_eq!(c.simple_cmd(0, CMD_WRITE_ZEROES, size, 512), ENOSPC);
        assert_eq!(c.simple_cmd(0, CMD_TRIM, size - 1, 2), EINVAL);
        assert_eq!(c.simple_cmd(0, CMD_CACHE, size, 1), EINVAL);
        check(&mut c);
        // Longer than the maximum payload.
        let big = (32 << 20) + 4096;
        let want = if structured { EOVERFLOW } else { EINVAL };
        assert_eq!(c.read(0, big), Err(want));
        check(&mut c);
        assert_eq!(c.write(0, &vec![7u8; big as usize], 0), EINVAL);
        check(&mut c);
        // Unknown command and flags that are not valid for the command.
        assert_eq!(c.simple_cmd(0, 99, 0, 0), EINVAL);
        assert_eq!(c.read_flags(0, 512, FLAG_REQ_ONE).err(), Some(EINVAL));
        assert_eq!(c.write(0, &[9u8; 512], 0x8000), EINVAL);
        assert_eq!(c.simple_cmd(FLAG_NO_HOLE, CMD_TRIM, 0, 512), EINVAL);
        check(&mut c);
        // Zero-length requests are harmless.
        assert_eq!(c.write(4096, &[], 0), 0);
        assert_eq!(c.simple_cmd(0, CMD_TRIM, 0, 0), 0);
        check(&mut c);
        c.disconnect();
    }
    srv.assert_serving();
    assert!(srv.stop().success());
    qemu_check_clean(Path::new(&img));

    // A read-only export refuses every write with EPERM.
    let mut srv = Served::start(&["--read-only", &img]);
    let mut c = Client::open(&srv.addr, true, &[]);
    assert_ne!(c.tflags & 2, 0, "READ_ONLY flag");
    assert_eq!(c.write(0, &[1u8; 512], 0), EPERM);
    assert_eq!(c.simple_cmd(0, CMD_TRIM, 0, 512), EPERM);
    assert_eq!(c.simple_cmd(0, CMD_WRITE_ZEROES, 0, 512), EPERM);
    assert_eq!(c.simple_cmd(0, CMD_FLUSH, 0, 0), 0);
    assert!(c.read(0, 8192).unwrap() == pattern(3, 8192));
    c.disconnect();
    srv.assert_serving();
    assert!(srv.stop().success());
}

#[test]
fn option_haggling() {
    let dir = tempfile::tempdir().unwrap();
    let img = img_path(dir.path(), "h.qcow2");
    let mut srv = Served::start(&["--create", "16M", "-A", "-D", "a test disk", &img]);
    let mut s = connect(&srv.addr);
    greet(&mut s);
    s.write_all(&1u32.to_be_bytes()).unwrap(); // fixed newstyle, zeroes wanted

    let expect = |s: &mut TcpStream, opt: u32, data: &[u8], want: u32| {
        send_option(s, opt, data);
        let r = option_replies(s, opt);
        assert_eq!(r.last().unwrap().0, want, "option {opt}");
        r
    };
    // Errors the spec names, and haggling goes on.
    expect(&mut s, 0x1234, b"whatever", REP_ERR_UNSUP);
    // Without TLS credentials, as qemu-nbd: "TLS not configured".
    expect(&mut s, OPT_STARTTLS, &[], 0x8000_0002);
    expect(&mut s, OPT_EXTENDED_HEADERS, b"x", REP_ERR_INVALID);
    expect(&mut s, OPT_LIST, b"x", REP_ERR_INVALID);
    expect(&mut s, OPT_STRUCTURED_REPLY, b"x", REP_ERR_INVALID);
    expect(
        &mut s,
        OPT_SET_META_CONTEXT,
        &meta_data("", &["base:allocation"]),
        REP_ERR_INVALID,
    );
    expect(&mut s, OPT_GO, &[0, 0, 0, 9, b'a'], REP_ERR_INVALID);
    expect(&mut s, OPT_GO, &info_data("nope", &[]), REP_ERR_UNKNOWN);
    let mut trailing = info_data("", &[1]);
    trailing.push(0);
    expect(&mut s, OPT_INFO, &trailing, REP_ERR_INVALID);
    // An option too long to hold is skipped and refused.
    let long = vec![b'x'; 100 << 10];
    expect(&mut s, OPT_INFO, &long, REP_ERR_TOO_BIG);
    expect(&mut s, 0x4242, &long, REP_ERR_UNSUP);
    // The good ones.
    let r = expect(&mut s, OPT_LIST, &[], REP_ACK);
    assert_eq!(r[0].0, REP_SERVER);
    assert_eq!(be32(&r[0].1), 0, "default export name");
    assert_eq!(&r[0].1[4..], b"a test disk");
    let r = expect(&mut s, OPT_INFO, &info_data("h.qcow2", &[1, 2, 3]), REP_ACK);
    let kinds: Vec<u16> = r
        .iter()
        .filter(|x| x.0 == REP_INFO)
        .map(|x| be16(&x.1))
        .collect();
    assert!(kinds.contains(&0) && kinds.contains(&1) && kinds.contains(&2) && kinds.contains(&3));
    expect(&mut s, OPT_STRUCTURED_REPLY, &[], REP_ACK);
    let r = expect(&mut s, OPT_LIST_META_CONTEXT, &meta_data("", &[]), REP_ACK);
    assert_eq!(r.len(), 3, "both contexts listed");
    let r = expect(
        &mut s,
        OPT_LIST_META_CONTEXT,
        &meta_data("", &["qemu:"]),
        REP_ACK,
    );
    assert_eq!(&r[0].1[4..], b"qemu:allocation-depth");
    expect(
        &mut s,
        OPT_LIST_META_CONTEXT,
        &meta_data("nope", &[]),
        REP_ERR_UNKNOWN,
    );
    let mut bad = meta_data("", &["base:allocation"]);
    bad.truncate(bad.len() - 3);
    expect(&mut s, OPT_SET_META_CONTEXT, &bad, REP_ERR_INVALID);
    // EXPORT_NAME still works after all that (with the 124 zero bytes).
    send_option(&mut s, OPT_EXPORT_NAME, b"");
    let mut e = [0u8; 10 + 124];
    s.read_exact(&mut e).unwrap();
    assert_eq!(be64(&e[0..8]), 16 << 20);
    assert!(e[10..].iter().all(|&x| x == 0));
    // Transmission works (structured replies were negotiated).
    let mut c = Client {
        s,
        structured: true,
        size: 16 << 20,
        tflags: be16(&e[8..10]),
        contexts: HashMap::new(),
        next_cookie: 1,
        reads: HashMap::new(),
    };
    assert!(c.read(0, 4096).unwrap().iter().all(|&x| x == 0));
    c.disconnect();

    // ABORT is acknowledged.
    let mut s = connect(&srv.addr);
    greet(&mut s);
    s.write_all(&3u32.to_be_bytes()).unwrap();
    send_option(&mut s, OPT_ABORT, &[]);
    assert_eq!(option_reply(&mut s).1, REP_ACK);
    assert!(closed_by_server(&mut s));
    srv.assert_serving();
    assert!(srv.stop().success());
}

#[test]
fn broken_handshakes_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let img = img_path(dir.path(), "b.qcow2");
    let mut srv = Served::start(&["--create", "16M", &img]);
    // Unknown client flags.
    let mut s = connect(&srv.addr);
    greet(&mut s);
    s.write_all(&0xffff_ffffu32.to_be_bytes()).unwrap();
    assert!(closed_by_server(&mut s));
    // Bad option magic.
    let mut s = connect(&srv.addr);
    greet(&mut s);
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s.write_all(&[0x55u8; 16]).unwrap();
    assert!(closed_by_server(&mut s));
    // EXPORT_NAME of an unknown export cannot be refused otherwise.
    let mut s = connect(&srv.addr);
    greet(&mut s);
    s.write_all(&3u32.to_be_bytes()).unwrap();
    send_option(&mut s, OPT_EXPORT_NAME, b"nope");
    assert!(closed_by_server(&mut s));
    // A 4 GiB option announced, a little sent, then hang up.
    let mut s = connect(&srv.addr);
    greet(&mut s);
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut h = Vec::new();
    h.extend_from_slice(&IHAVEOPT.to_be_bytes());
    h.extend_from_slice(&OPT_GO.to_be_bytes());
    h.extend_from_slice(&u32::MAX.to_be_bytes());
    s.write_all(&h).unwrap();
    s.write_all(&[0u8; 1 << 20]).unwrap();
    drop(s);
    // Endless options.
    let mut s = connect(&srv.addr);
    greet(&mut s);
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut n = 0;
    loop {
        let mut v = Vec::new();
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&OPT_STRUCTURED_REPLY.to_be_bytes());
        v.extend_from_slice(&0u32.to_be_bytes());
        if s.write_all(&v).is_err() {
            break;
        }
        let mut r = [0u8; 20];
        if s.read_exact(&mut r).is_err() {
            break;
        }
        n += 1;
        assert!(n <= 5000, "the server accepts options forever");
    }
    // Random bytes at every stage.
    let mut rng = fastrand::Rng::with_seed(42);
    for i in 0..150 {
        let mut s = connect(&srv.addr);
        greet(&mut s);
        if i % 3 != 0 {
            s.write_all(&3u32.to_be_bytes()).unwrap();
        }
        if i % 3 == 2 {
            // A valid option header with a random option and length, then random data.
            let mut v = Vec::new();
            v.extend_from_slice(&IHAVEOPT.to_be_bytes());
            v.extend_from_slice(&rng.u32(0..16).to_be_bytes());
            v.extend_from_slice(&rng.u32(0..200).to_be_bytes());
            let _ = s.write_all(&v);
        }
        let junk: Vec<u8> = (0..rng.usize(0..300)).map(|_| rng.u8(..)).collect();
        let _ = s.write_all(&junk);
        let _ = s.shutdown(Shutdown::Write);
        assert!(closed_by_server(&mut s), "iteration {i}");
    }
    srv.assert_serving();
    assert!(srv.stop().success());
    qemu_check_clean(Path::new(&img));
}

#[test]
fn stalled_handshakes_time_out() {
    let dir = tempfile::tempdir().unwrap();
    let img = img_path(dir.path(), "t.qcow2");
    let mut srv = Served::start(&[
        "--create",
        "16M",
        "--shared",
        "2",
        "--handshake-limit",
        "1",
        &img,
    ]);
    // Two clients take both slots and say nothing.
    let mut idle: Vec<TcpStream> = (0..2).map(|_| connect(&srv.addr)).collect();
    for s in &mut idle {
        greet(s);
    }
    // A third one is served once the idle ones were dropped.
    let t = Instant::now();
    let mut c = Client::open(&srv.addr, true, &[]);
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(500),
        "the limit was not enforced: {waited:?}"
    );
    assert!(waited < Duration::from_secs(10), "waited {waited:?}");
    c.read(0, 4096).unwrap();
    for s in &mut idle {
        assert!(closed_by_server(s));
    }
    c.disconnect();
    srv.assert_serving();
    assert!(srv.stop().success());
}

#[test]
fn garbage_and_disconnects_in_transmission() {
    let dir = tempfile::tempdir().unwrap();
    let img = img_path(dir.path(), "g.qcow2");
    let mut srv = Served::start(&["--create", "64M", "--discard", "unmap", &img]);
    let mut rng = fastrand::Rng::with_seed(7);
    for i in 0..200 {
        let structured = i % 2 == 0;
        let contexts: &[&str] = if structured {
            &["base:allocation"]
        } else {
            &[]
        };
        let mut c = Client::open(&srv.addr, structured, contexts);
        let mut v = Vec::new();
        match i % 4 {
            // Pure junk: bad magic.
            0 => v.extend((0..rng.usize(1..500)).map(|_| rng.u8(..))),
            // Well-framed requests with random fields, then junk.
            _ => {
                for _ in 0..rng.usize(1..6) {
                    let cmd = rng.u16(0..10);
                    let len = match rng.u8(0..4) {
                        0 => rng.u32(..),
                        1 => rng.u32(0..(1 << 16)),
                        2 => rng.u32(0..(40 << 20)),
                        _ => 512,
                    };
                    let offset = match rng.u8(0..3) {
                        0 => rng.u64(..),
                        _ => rng.u64(0..(70 << 20)),
                    };
                    v.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
                    v.extend_from_slice(&rng.u16(..).to_be_bytes());
                    v.extend_from_slice(&cmd.to_be_bytes());
                    v.extend_from_slice(&rng.u64(..).to_be_bytes());
                    v.extend_from_slice(&offset.to_be_bytes());
                    v.extend_from_slice(&len.to_be_bytes());
                    if cmd == CMD_WRITE && len < (1 << 16) && rng.bool() {
                        v.extend((0..len).map(|_| rng.u8(..)));
                    }
                }
                v.extend((0..rng.usize(0..100)).map(|_| rng.u8(..)));
            }
        }
        let _ = c.s.write_all(&v);
        if rng.bool() {
            let _ = c.s.shutdown(Shutdown::Write);
        }
        drop(c);
    }
    // Disconnects in the middle of a request.
    for cut in [5usize, 27, 28, 28 + 100, 28 + 65535] {
        let mut c = Client::open(&srv.addr, true, &[]);
        let mut v = Vec::new();
        v.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        v.extend_from_slice(&0u16.to_be_bytes());
        v.extend_from_slice(&CMD_WRITE.to_be_bytes());
        v.extend_from_slice(&1u64.to_be_bytes());
        v.extend_from_slice(&0u64.to_be_bytes());
        v.extend_from_slice(&65536u32.to_be_bytes());
        v.extend(std::iter::repeat_n(0xaau8, 65536));
        c.s.write_all(&v[..cut]).unwrap();
        drop(c);
    }
    srv.assert_serving();
    assert!(srv.stop().success());
    qemu_check_clean(Path::new(&img));
}

#[test]
fn memory_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let img = img_path(dir.path(), "m.qcow2");
    qemu_create(Path::new(&img), "", 1 << 30, &[]);
    let mut srv = Served::start(&[&img]);
    let base = srv.rss_kib();
    // Reads: 4 GiB requested, replies never read.
    let c = Client::open(&srv.addr, false, &[]);
    let mut s = c.s.try_clone().unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let sender = std::thread::spawn(move || {
        for i in 0..4096u64 {
            let mut v = Vec::new();
            v.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
            v.extend_from_slice(&0u16.to_be_bytes());
            v.extend_from_slice(&CMD_READ.to_be_bytes());
            v.extend_from_slice(&i.to_be_bytes());
            v.extend_from_slice(&((i % 1024) << 20).to_be_bytes());
            v.extend_from_slice(&(1u32 << 20).to_be_bytes());
            if s.write_all(&v).is_err() {
                return;
            }
        }
    });
    std::thread::sleep(Duration::from_secs(2));
    let rss = srv.rss_kib();
    assert!(
        rss < base + 150 * 1024,
        "server RSS grew from {base} KiB to {rss} KiB with unread replies"
    );
    let _ = c.s.shutdown(Shutdown::Both);
    sender.join().unwrap();
    drop(c);
    eprintln!("server RSS: {base} KiB idle, {rss} KiB with 4 GiB of unread READ replies");

    // Writes: 1 GiB of payload pipelined, replies never read.
    let c = Client::open(&srv.addr, true, &[]);
    let mut s = c.s.try_clone().unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let sender = std::thread::spawn(move || {
        let payload = vec![0x5au8; 1 << 20];
        for i in 0..1024u64 {
            let mut v = Vec::new();
            v.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
            v.extend_from_slice(&0u16.to_be_bytes());
            v.extend_from_slice(&CMD_WRITE.to_be_bytes());
            v.extend_from_slice(&i.to_be_bytes());
            v.extend_from_slice(&(i << 20).to_be_bytes());
            v.extend_from_slice(&(1u32 << 20).to_be_bytes());
            if s.write_all(&v).is_err() || s.write_all(&payload).is_err() {
                return;
            }
        }
    });
    std::thread::sleep(Duration::from_secs(2));
    let rss = srv.rss_kib();
    assert!(
        rss < base + 150 * 1024,
        "server RSS grew from {base} KiB to {rss} KiB with pipelined writes"
    );
    let _ = c.s.shutdown(Shutdown::Both);
    sender.join().unwrap();
    drop(c);
    eprintln!("server RSS: {base} KiB idle, {rss} KiB with 1 GiB of pipelined WRITEs");
    srv.assert_serving();
    assert!(srv.stop().success());
    qemu_check_clean(Path::new(&img));
}

#[test]
fn sigterm_makes_acknowledged_writes_durable() {
    let dir = tempfile::tempdir().unwrap();
    let img = img_path(dir.path(), "d.qcow2");
    let srv = Served::start(&["--create", "256M", &img]);
    let mut c = Client::open(&srv.addr, true, &[]);
    let mut cmds = Vec::new();
    for i in 0..32u64 {
        let off = i * (7 << 20) + 4096;
        assert_eq!(c.write(off, &vec![(i + 1) as u8; 12288], 0), 0);
        cmds.push(format!("read -P {} {off} 12288", i + 1));
    }
    // No FLUSH: the shutdown must flush.
    let status = srv.stop();
    assert!(status.success(), "{status:?}");
    qemu_check_clean(Path::new(&img));
    qemu_io(Path::new(&img), "qcow2", &cmds);
}

/// Kills the server while a client streams allocating writes with periodic FLUSH and FUA
/// writes. Afterwards: no corruption, and every write acknowledged before the last FLUSH reply
/// (and every acknowledged FUA write) is in the image, on any connection.
#[test]
fn sigkill_keeps_every_flushed_write() {
    for round in 0..3u64 {
        let dir = tempfile::tempdir().unwrap();
        let img = img_path(dir.path(), "k.qcow2");
        let srv = Served::start(&["--create", "512M", &img]);
        let mut rng = fastrand::Rng::with_seed(round);
        let mut clusters: Vec<u64> = (0..8192).collect();
        rng.shuffle(&mut clusters);
        let mut c = Client::open(&srv.addr, true, &[]);
        // A second connection does the flushes: multi-conn means they cover all connections.
        let mut f = Client::open(&srv.addr, true, &[]);
        let kill_after = Duration::from_millis(300 + rng.u64(0..500));
        let start = Instant::now();

        let mut inflight: HashMap<u64, (u64, u8, bool)> = HashMap::new(); // cookie → write
        let mut acked: Vec<(u64, u8)> = Vec::new();
        let mut durable: Vec<(u64, u8)> = Vec::new();
        let mut killed = false;
        let mut next = 0usize;
        'stream: while next < clusters.len() {
            while inflight.len() < 16 && next < clusters.len() {
                let off = clusters[next] * 65536 + rng.u64(0..16) * 4096;
                let byte = (next % 250 + 1) as u8;
                let fua = rng.u8(0..10) == 0;
                let data = vec![byte; 4096];
                let mut v = Vec::new();
                let cookie = c.next_cookie;
                c.next_cookie += 1;
                v.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
                v.extend_from_slice(&(if fua { FLAG_FUA } else { 0 }).to_be_bytes());
                v.extend_from_slice(&CMD_WRITE.to_be_bytes());
                v.extend_from_slice(&cookie.to_be_bytes());
                v.extend_from_slice(&off.to_be_bytes());
                v.extend_from_slice(&4096u32.to_be_bytes());
                v.extend_from_slice(&data);
                if c.s.write_all(&v).is_err() {
                    break 'stream;
                }
                inflight.insert(cookie, (off, byte, fua));
                next += 1;
            }
            let Ok(m) = c.recv() else { break };
            let (off, byte, fua) = inflight.remove(&m.cookie()).unwrap();
            assert_eq!(Client::error_of(&[m]), 0);
            acked.push((off, byte));
            if fua {
                durable.push((off, byte));
            }
            if acked.len() % 64 == 0 {
                // Every write acknowledged so far must be durable once this FLUSH is answered.
                let covered = acked.clone();
                let cookie = f.send(0, CMD_FLUSH, 0, 0, &[]);
                match f.recv() {
                    Ok(m) => {
                        assert_eq!(m.cookie(), cookie);
                        assert_eq!(Client::error_of(&[m]), 0);
                        durable = covered;
                    }
                    Err(_) => break,
                }
            }
            // Kill at a random moment, once enough has been flushed to be worth checking.
            if !killed && start.elapsed() > kill_after && durable.len() >= 256 {
                srv.signal("-KILL");
                killed = true;
            }
        }
        if !killed {
            srv.signal("-KILL");
        }
        let _ = srv.wait();
        assert!(
            durable.len() >= 256,
            "round {round}: too few flushed writes to test"
        );
        let (code, corruptions, _leaks, out) = qemu_check(Path::new(&img));
        assert_eq!(corruptions, 0, "round {round}: {out}");
        assert!(code == 0 || code == 3, "round {round}: {out}");
        // Flushed writes are there (targets never overlap: one write per cluster).
        let cmds: Vec<String> = durable
            .iter()
            .map(|(off, b)| format!("read -P {b} {off} 4096"))
            .collect();
        qemu_io(Path::new(&img), "qcow2", &cmds);
        // qimg reads the same.
        let mut args = vec!["io".to_string(), "-r".to_string()];
        for c in cmds.iter().take(200) {
            args.push("-c".into());
            args.push(c.clone());
        }
        args.push(img.clone());
        let o = Command::new(QIMG).args(&args).output().unwrap();
        assert!(
            o.status.success() && !text(&o).contains("failed"),
            "{}",
            text(&o)
        );
        // And the image is usable: a read-write open repairs nothing fatal.
        let srv = Served::start(&[&img]);
        assert!(srv.stop().success());
        let (_, corruptions, _, out) = qemu_check(Path::new(&img));
        assert_eq!(corruptions, 0, "round {round} after reopen: {out}");
    }
}

/// The whole-session fuzz target's body (`qimg::fuzzing::exercise_nbd_session`) on the seeds of
/// its corpus and on every finding kept in tests/data/fuzz (`session-*`): each finishes quickly,
/// and each seed reaches the end it was written for, so the corpus really covers the request loop.
#[test]
fn session_fuzz_inputs_finish_in_bounded_time() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let expected: HashMap<&str, Option<&str>> = [
        ("seed-structured-go", Some("Disconnect")),
        ("seed-simple-export-name", Some("Disconnect")),
        ("seed-readonly-writethrough", Some("Disconnect")),
        ("seed-bad-magic", Some("Violation")),
        ("seed-list-meta-abort", None),
    ]
    .into_iter()
    .collect();
    let mut inputs = Vec::new();
    for (dir, prefix) in [
        ("fuzz/corpus/session", "seed-"),
        ("tests/data/fuzz", "session-"),
    ] {
        for e in std::fs::read_dir(root.join(dir)).unwrap() {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with(prefix) {
                inputs.push((name, path));
            }
        }
    }
    inputs.sort();
    let mut seeds = 0;
    for (name, path) in inputs {
        let data = std::fs::read(&path).unwrap();
        let started = Instant::now();
        let end = qimg::fuzzing::exercise_nbd_session(&data);
        let took = started.elapsed();
        eprintln!("{name}: {end:?} in {took:?}");
        assert!(took < Duration::from_secs(3), "{name}: took {took:?}");
        if let Some(want) = expected.get(name.as_str()) {
            seeds += 1;
            match (want, &end) {
                (None, None) => {}
                (Some(w), Some(e)) if e.starts_with(w) => {}
                _ => panic!("{name}: ended {end:?}, expected {want:?}"),
            }
        }
    }
    assert_eq!(
        seeds,
        expected.len(),
        "a seed is missing from fuzz/corpus/session"
    );
}

// ---------------------------------------------------------------------------------------------
// Extended headers (NBD_OPT_EXTENDED_HEADERS): 32-byte requests and replies, 64-bit lengths.

const EXT_REQUEST_MAGIC: u32 = 0x21e4_1c71;
const EXT_REPLY_MAGIC: u32 = 0x6e8a_278c;
const FLAG_PAYLOAD_LEN: u16 = 1 << 5;
const TYPE_BLOCK_STATUS_EXT: u16 = 6;
const TFLAG_BLOCK_STAT_PAYLOAD: u16 = 1 << 12;

/// One extended reply chunk.
#[derive(Debug)]
struct ExtChunk {
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    payload: Vec<u8>,
}

struct ExtClient {
    s: TcpStream,
    tflags: u16,
    size: u64,
    contexts: HashMap<u32, String>,
    next_cookie: u64,
}

impl ExtClient {
    fn open(addr: &str, contexts: &[&str]) -> ExtClient {
        let mut s = connect(addr);
        greet(&mut s);
        s.write_all(&3u32.to_be_bytes()).unwrap();
        send_option(&mut s, OPT_EXTENDED_HEADERS, &[]);
        assert_eq!(option_replies(&mut s, OPT_EXTENDED_HEADERS)[0].0, REP_ACK);
        // Extended headers imply structured replies: asking again for either is an error.
        send_option(&mut s, OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(
            option_replies(&mut s, OPT_STRUCTURED_REPLY)[0].0,
            REP_ERR_INVALID
        );
        send_option(&mut s, OPT_EXTENDED_HEADERS, &[]);
        assert_eq!(
            option_replies(&mut s, OPT_EXTENDED_HEADERS)[0].0,
            REP_ERR_INVALID
        );
        let mut ctx = HashMap::new();
        send_option(&mut s, OPT_SET_META_CONTEXT, &meta_data("", contexts));
        for (t, d) in option_replies(&mut s, OPT_SET_META_CONTEXT) {
            if t == REP_META_CONTEXT {
                ctx.insert(be32(&d[0..4]), String::from_utf8(d[4..].to_vec()).unwrap());
            }
        }
        send_option(&mut s, OPT_GO, &info_data("", &[]));
        let (mut size, mut tflags) = (0, 0);
        for (t, d) in option_replies(&mut s, OPT_GO) {
            if t == REP_INFO && be16(&d) == 0 {
                size = be64(&d[2..10]);
                tflags = be16(&d[10..12]);
            }
        }
        ExtClient {
            s,
            tflags,
            size,
            contexts: ctx,
            next_cookie: 1,
        }
    }

    fn send(&mut self, flags: u16, cmd: u16, offset: u64, len: u64, payload: &[u8]) -> u64 {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let mut v = Vec::with_capacity(32 + payload.len());
        v.extend_from_slice(&EXT_REQUEST_MAGIC.to_be_bytes());
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&cmd.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v.extend_from_slice(&offset.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
        v.extend_from_slice(payload);
        self.s.write_all(&v).unwrap();
        cookie
    }

    fn recv(&mut self) -> ExtChunk {
        let mut h = [0u8; 32];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(be32(&h[0..4]), EXT_REPLY_MAGIC, "only extended replies");
        let len = be64(&h[24..32]);
        assert!(len <= (32 << 20) + 8, "chunk of {len} bytes");
        let mut payload = vec![0u8; len as usize];
        self.s.read_exact(&mut payload).unwrap();
        ExtChunk {
            flags: be16(&h[4..6]),
            kind: be16(&h[6..8]),
            cookie: be64(&h[8..16]),
            offset: be64(&h[16..24]),
            payload,
        }
    }

    /// The chunks answering one request (sent with `offset`); each echoes cookie and offset.
    fn request(
        &mut self,
        flags: u16,
        cmd: u16,
        offset: u64,
        len: u64,
        payload: &[u8],
    ) -> Vec<ExtChunk> {
        let cookie = self.send(flags, cmd, offset, len, payload);
        let mut out = Vec::new();
        loop {
            let c = self.recv();
            assert_eq!(c.cookie, cookie);
            assert_eq!(
                c.offset, offset,
                "the reply header echoes the request's offset"
            );
            let last = c.flags & 1 != 0;
            out.push(c);
            if last {
                return out;
            }
        }
    }

    fn error_of(chunks: &[ExtChunk]) -> u32 {
        chunks
            .iter()
            .find(|c| c.kind & 0x8000 != 0)
            .map(|c| be32(&c.payload[0..4]))
            .unwrap_or(0)
    }

    /// Block status: context name → 64-bit extents.
    fn status(&mut self, c: Vec<ExtChunk>) -> BTreeMap<String, Vec<(u64, u64)>> {
        let mut out = BTreeMap::new();
        for ch in c {
            assert_eq!(ch.kind, TYPE_BLOCK_STATUS_EXT, "64-bit block status only");
            let p = &ch.payload;
            let id = be32(&p[0..4]);
            let count = be32(&p[4..8]) as usize;
            assert_eq!(p.len(), 8 + 16 * count);
            let ext = p[8..]
                .chunks(16)
                .map(|e| (be64(&e[0..8]), be64(&e[8..16])))
                .collect();
            out.insert(self.contexts[&id].clone(), ext);
        }
        out
    }
}

#[test]
fn extended_headers() {
    let dir = tempfile::tempdir().unwrap();
    let img = img_path(dir.path(), "x.qcow2");
    let mut srv = Served::start(&["--create", "8G", "-A", "--discard=unmap", &img]);
    let mut c = ExtClient::open(&srv.addr, &["base:allocation", "qemu:allocation-depth"]);
    assert_eq!(c.size, 8 << 30);
    assert_ne!(c.tflags & TFLAG_BLOCK_STAT_PAYLOAD, 0);
    assert_eq!(c.contexts.len(), 2);

    // Successes without data are NONE chunks (never simple replies).
    let data = pattern(3, 65536);
    let r = c.request(FLAG_FUA, CMD_WRITE, 1 << 20, data.len() as u64, &data);
    assert_eq!(
        (r.len(), r[0].kind, ExtClient::error_of(&r)),
        (1, TYPE_NONE, 0)
    );
    let r = c.request(0, CMD_FLUSH, 0, 0, &[]);
    assert_eq!((r.len(), r[0].kind), (1, TYPE_NONE));
    // Reads: data chunks carry their offset in the payload, holes their 32-bit length.
    let r = c.request(0, CMD_READ, (1 << 20) - 4096, 65536 + 8192, &[]);
    let mut got = vec![0xeeu8; 65536 + 8192];
    for ch in &r {
        match ch.kind {
            TYPE_DATA => {
                let at = (be64(&ch.payload[0..8]) - ((1 << 20) - 4096)) as usize;
                got[at..at + ch.payload.len() - 8].copy_from_slice(&ch.payload[8..]);
            }
            TYPE_HOLE => {
                let at = (be64(&ch.payload[0..8]) - ((1 << 20) - 4096)) as usize;
                let n = be32(&ch.payload[8..12]) as usize;
                got[at..at + n].fill(0);
            }
            other => panic!("chunk type {other}"),
        }
    }
    assert_eq!(&got[4096..4096 + 65536], &data[..]);
    assert!(got[..4096].iter().all(|&b| b == 0) && got[4096 + 65536..].iter().all(|&b| b == 0));

    // Lengths beyond 32 bits: write zeroes and trim of 5 GiB in one request.
    let big = 5u64 << 30;
    let r = c.request(0, CMD_WRITE_ZEROES, 2 << 30, big, &[]);
    assert_eq!(ExtClient::error_of(&r), 0);
    let r = c.request(0, CMD_TRIM, 2 << 30, big, &[]);
    assert_eq!(ExtClient::error_of(&r), 0);
    // Past the end is still refused.
    let r = c.request(0, CMD_WRITE_ZEROES, 4 << 30, big, &[]);
    assert_eq!(ExtClient::error_of(&r), ENOSPC);

    // Block status over 6 GiB: answered for a prefix, in 64-bit descriptors, for both contexts.
    let r = c.request(0, CMD_BLOCK_STATUS, 0, 6 << 30, &[]);
    let st = c.status(r);
    assert_eq!(st.len(), 2);
    for (name, ext) in &st {
        let total: u64 = ext.iter().map(|e| e.0).sum();
        assert!(total > 0 && total <= 6 << 30, "{name}: {total}");
        assert!(
            ext.iter().all(|e| e.0 > 0 && e.1 >> 32 == 0),
            "{name}: {ext:?}"
        );
    }
    assert_eq!(
        st["base:allocation"][0],
        (1 << 20, 3),
        "hole before the data"
    );
    assert_eq!(st["base:allocation"][1], (65536, 0), "the data");

    // A block status payload selects contexts: only the one named answers.
    let depth_id = *c
        .contexts
        .iter()
        .find(|(_, n)| n.as_str() == "qemu:allocation-depth")
        .unwrap()
        .0;
    let mut p = Vec::new();
    p.extend_from_slice(&(2u64 << 20).to_be_bytes());
    p.extend_from_slice(&depth_id.to_be_bytes());
    let r = c.request(FLAG_PAYLOAD_LEN, CMD_BLOCK_STATUS, 0, p.len() as u64, &p);
    let st = c.status(r);
    assert_eq!(st.keys().collect::<Vec<_>>(), ["qemu:allocation-depth"]);
    assert_eq!(st["qemu:allocation-depth"][0], (1 << 20, 0));
    assert_eq!(st["qemu:allocation-depth"][1], (65536, 1));
    // Payloads that name an unknown context, are malformed or too long: EINVAL, in sync.
    let mut bad_id = p.clone();
    bad_id[8..12].copy_from_slice(&77u32.to_be_bytes());
    let too_long = vec![0u8; 8 + 4 * 4096];
    for payload in [&bad_id[..], &p[..6], &p[..8], &too_long[..]] {
        let r = c.request(
            FLAG_PAYLOAD_LEN,
            CMD_BLOCK_STATUS,
            0,
            payload.len() as u64,
            payload,
        );
        assert_eq!(
            ExtClient::error_of(&r),
            EINVAL,
            "payload of {}",
            payload.len()
        );
    }
    // The payload flag belongs to WRITE and BLOCK_STATUS only.
    let r = c.request(FLAG_PAYLOAD_LEN, CMD_READ, 0, 4096, &[]);
    assert_eq!(ExtClient::error_of(&r), EINVAL);
    let r = c.request(FLAG_PAYLOAD_LEN, CMD_WRITE, 0, 4096, &data[..4096]);
    assert_eq!(ExtClient::error_of(&r), 0);
    // Oversized READ: refused; a WRITE payload beyond 4 GiB ends the connection.
    let r = c.request(0, CMD_READ, 0, 64 << 20, &[]);
    assert_ne!(ExtClient::error_of(&r), 0);
    c.send(0, CMD_WRITE, 0, 1 << 40, &[]);
    assert!(closed_by_server(&mut c.s));
    srv.assert_serving();

    // A compact request header on an extended connection breaks the framing: disconnected.
    let mut c = ExtClient::open(&srv.addr, &["base:allocation"]);
    let mut v = Vec::new();
    v.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    v.extend_from_slice(&[0u8; 28]);
    c.s.write_all(&v).unwrap();
    assert!(closed_by_server(&mut c.s));
    srv.assert_serving();
    assert!(srv.stop().success());
    qemu_check_clean(Path::new(&img));
}
