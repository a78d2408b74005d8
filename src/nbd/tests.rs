//! In-process session tests: the handshake and the request loop over a tiny in-memory pipe, so
//! that every header, payload and reply is cut into many partial reads and writes (what TCP on
//! loopback rarely does), with a small in-flight budget so that admission control kicks in.
//! Pipelined writes and reads are checked against a model of the disk.

use super::commands::Conn;
use super::export::{Export, ExportConfig};
use super::handshake::handshake;
use super::proto::*;
use super::server::Tracker;
use super::transmission::{serve, End, Limits, RUNNING};
use crate::block::{BlockDevice, CacheMode};
use crate::qcow2::{create, CreateOptions, Qcow2, Qcow2Options};
use crate::storage::memory::MemoryStorage;
use crate::storage::StorageRef;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, ReadHalf};
use tokio::sync::watch;

const SIZE: u64 = 8 << 20;

async fn image() -> Arc<dyn BlockDevice> {
    let mem: StorageRef = Arc::new(MemoryStorage::new());
    let opts = CreateOptions {
        size: SIZE,
        cluster_size: 4096,
        ..Default::default()
    };
    create(mem.clone(), &opts).await.unwrap();
    let q = Qcow2::open(
        mem,
        "mem".into(),
        &Qcow2Options::default(),
        false,
        CacheMode::Writeback,
    )
    .await
    .unwrap();
    Arc::new(q)
}

type Pipe = tokio::io::DuplexStream;

/// Client side of the handshake: structured replies, `base:allocation`, GO.
async fn client_handshake(r: &mut ReadHalf<Pipe>, w: &mut tokio::io::WriteHalf<Pipe>) -> u16 {
    let mut g = [0u8; 18];
    r.read_exact(&mut g).await.unwrap();
    w.write_all(&3u32.to_be_bytes()).await.unwrap();
    let send = |opt: u32, data: Vec<u8>| {
        let mut v = OptionHeader {
            option: opt,
            len: data.len() as u32,
        }
        .encode()
        .to_vec();
        v.extend_from_slice(&data);
        v
    };
    let meta = MetaContextRequest {
        export: String::new(),
        queries: vec![CTX_BASE_ALLOCATION.into()],
    };
    let go = InfoRequest {
        name: String::new(),
        infos: vec![INFO_BLOCK_SIZE],
    };
    let mut all = send(OPT_STRUCTURED_REPLY, Vec::new());
    all.extend(send(OPT_SET_META_CONTEXT, meta.encode()));
    all.extend(send(OPT_GO, go.encode()));
    // Options may be pipelined by the client as far as the pipe takes them.
    w.write_all(&all).await.unwrap();
    let mut flags = 0;
    let mut acks = 0;
    while acks < 3 {
        let mut h = [0u8; 20];
        r.read_exact(&mut h).await.unwrap();
        let rtype = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut d = vec![0u8; len];
        r.read_exact(&mut d).await.unwrap();
        assert_eq!(rtype & REP_FLAG_ERROR, 0, "{}", String::from_utf8_lossy(&d));
        if rtype == REP_ACK {
            acks += 1;
        }
        if rtype == REP_INFO && d[0..2] == INFO_EXPORT.to_be_bytes() {
            flags = u16::from_be_bytes([d[10], d[11]]);
        }
    }
    flags
}

/// One reply message: `(cookie, Some((flags, type, payload)))` for a structured chunk,
/// `(cookie, None, error)` for a simple reply.
async fn message(r: &mut ReadHalf<Pipe>) -> (u64, Option<(u16, u16, Vec<u8>)>, u32) {
    let mut m = [0u8; 4];
    r.read_exact(&mut m).await.unwrap();
    if u32::from_be_bytes(m) == SIMPLE_REPLY_MAGIC {
        let mut h = [0u8; 12];
        r.read_exact(&mut h).await.unwrap();
        let err = u32::from_be_bytes(h[0..4].try_into().unwrap());
        let cookie = u64::from_be_bytes(h[4..12].try_into().unwrap());
        return (cookie, None, err);
    }
    assert_eq!(u32::from_be_bytes(m), STRUCTURED_REPLY_MAGIC);
    let mut h = [0u8; 16];
    r.read_exact(&mut h).await.unwrap();
    let flags = u16::from_be_bytes([h[0], h[1]]);
    let kind = u16::from_be_bytes([h[2], h[3]]);
    let cookie = u64::from_be_bytes(h[4..12].try_into().unwrap());
    let len = u32::from_be_bytes(h[12..16].try_into().unwrap()) as usize;
    let mut p = vec![0u8; len];
    r.read_exact(&mut p).await.unwrap();
    (cookie, Some((flags, kind, p)), 0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_session_over_a_tiny_pipe() {
    let img = image().await;
    let export = Arc::new(Export::new(img.clone(), ExportConfig::default()));
    let (client, server) = tokio::io::duplex(97);
    let (sr, mut sw) = tokio::io::split(server);
    let (_stop_tx, stop_rx) = watch::channel(RUNNING);
    let tracker = Tracker::default();
    let t2 = tracker.clone();
    let srv = tokio::spawn(async move {
        let mut r = BufReader::with_capacity(61, sr);
        let neg = handshake(&mut r, &mut sw, &export).await.unwrap();
        let conn = Arc::new(Conn::new(export, neg));
        let limits = Limits {
            requests: 7,
            bytes: 300 << 10,
        };
        serve(conn, r, sw, limits, stop_rx, t2).await
    });
    let (mut cr, mut cw) = tokio::io::split(client);
    let flags = client_handshake(&mut cr, &mut cw).await;
    assert_ne!(flags & FLAG_SEND_DF, 0);

    let mut rng = fastrand::Rng::with_seed(11);
    let mut model = vec![0u8; SIZE as usize];
    // Phase 1: writes to disjoint slots, pipelined; then phase 2: reads and block status.
    let mut reqs: Vec<(Request, Vec<u8>)> = Vec::new();
    let mut slots: Vec<u64> = (0..(SIZE / (256 << 10))).collect();
    rng.shuffle(&mut slots);
    for (i, slot) in slots.iter().enumerate() {
        let base = slot * (256 << 10);
        let off = base + rng.u64(0..4096);
        let len = rng.u32(1..(200 << 10));
        let cookie = i as u64 + 1;
        if i % 5 == 4 {
            reqs.push((
                Request {
                    flags: CMD_FLAG_NO_HOLE,
                    cmd: CMD_WRITE_ZEROES,
                    cookie,
                    offset: off,
                    len: len.into(),
                },
                Vec::new(),
            ));
            // The slot was never written: zeros already.
        } else {
            let data: Vec<u8> = (0..len).map(|_| rng.u8(1..)).collect();
            model[off as usize..off as usize + len as usize].copy_from_slice(&data);
            reqs.push((
                Request {
                    flags: if i % 7 == 0 { CMD_FLAG_FUA } else { 0 },
                    cmd: CMD_WRITE,
                    cookie,
                    offset: off,
                    len: len.into(),
                },
                data,
            ));
        }
    }
    let n_writes = reqs.len();
    let sender = tokio::spawn(async move {
        for (r, payload) in reqs {
            cw.write_all(&r.encode()).await.unwrap();
            cw.write_all(&payload).await.unwrap();
        }
        cw
    });
    for _ in 0..n_writes {
        let (cookie, chunk, err) = message(&mut cr).await;
        assert!(chunk.is_none(), "writes get simple replies");
        assert_eq!(err, 0, "cookie {cookie}");
    }
    let mut cw = sender.await.unwrap();

    // Reads (some with DF) and block status, pipelined.
    let mut reads: HashMap<u64, (u64, u32)> = HashMap::new();
    let mut wire = Vec::new();
    for i in 0..60u64 {
        let off = rng.u64(0..SIZE - 1);
        let len = rng.u32(1..=((SIZE - off).min(300 << 10) as u32));
        let cookie = 1000 + i;
        let (cmd, flags) = match i % 6 {
            5 => (CMD_BLOCK_STATUS, 0),
            4 => (CMD_READ, CMD_FLAG_DF),
            _ => (CMD_READ, 0),
        };
        wire.extend_from_slice(
            &Request {
                flags,
                cmd,
                cookie,
                offset: off,
                len: len.into(),
            }
            .encode(),
        );
        reads.insert(cookie, (off, len));
    }
    let sender = tokio::spawn(async move {
        cw.write_all(&wire).await.unwrap();
        cw
    });
    let mut got: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut done = 0;
    while done < reads.len() {
        let (cookie, chunk, err) = message(&mut cr).await;
        assert_eq!(err, 0);
        let (flags, kind, p) = chunk.expect("structured");
        let (off, len) = reads[&cookie];
        let buf = got
            .entry(cookie)
            .or_insert_with(|| vec![0xee; len as usize]);
        match kind {
            REPLY_TYPE_OFFSET_DATA => {
                let at = (u64::from_be_bytes(p[0..8].try_into().unwrap()) - off) as usize;
                buf[at..at + p.len() - 8].copy_from_slice(&p[8..]);
            }
            REPLY_TYPE_OFFSET_HOLE => {
                let at = (u64::from_be_bytes(p[0..8].try_into().unwrap()) - off) as usize;
                let n = u32::from_be_bytes(p[8..12].try_into().unwrap()) as usize;
                buf[at..at + n].fill(0);
            }
            REPLY_TYPE_BLOCK_STATUS => {
                let total: u64 = p[4..]
                    .chunks(8)
                    .map(|e| u32::from_be_bytes(e[0..4].try_into().unwrap()) as u64)
                    .sum();
                assert!(total > 0 && total <= len as u64);
                buf.clear();
            }
            other => panic!("chunk type {other}"),
        }
        if flags & REPLY_FLAG_DONE != 0 {
            done += 1;
            let b = &got[&cookie];
            if !b.is_empty() {
                assert!(
                    b[..] == model[off as usize..off as usize + len as usize],
                    "read {cookie} at {off} len {len}"
                );
            }
        }
    }
    let mut cw = sender.await.unwrap();
    cw.write_all(
        &Request {
            flags: 0,
            cmd: CMD_DISC,
            cookie: 0,
            offset: 0,
            len: 0,
        }
        .encode(),
    )
    .await
    .unwrap();
    let end = srv.await.unwrap();
    assert!(matches!(end, End::Disconnect), "{end:?}");
    tracker.wait_idle().await;
    // The image has the content.
    let all = img
        .read(0, crate::buf::IoBufMut::zeroed(SIZE as usize))
        .await
        .unwrap();
    assert!(all[..] == model[..]);
}

/// The error code of a reply: a simple reply's error field, or an error chunk's code.
fn reply_error(chunk: &Option<(u16, u16, Vec<u8>)>, simple: u32) -> u32 {
    match chunk {
        Some((_, REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET, p)) => {
            u32::from_be_bytes(p[0..4].try_into().unwrap())
        }
        _ => simple,
    }
}

/// A failed fsync under the server (Linux's failed writeback: the next fsync would "succeed")
/// reaches the client as EIO, and from then on every write, write-zeroes and flush does too:
/// nothing tells a client that data is durable when it is not. Reads still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_fsync_gives_clients_eio_from_then_on() {
    use crate::storage::crash::{CrashPolicy, CrashStorage};
    const EIO: u32 = NbdError::Io as u32;
    let mem = Arc::new(MemoryStorage::new());
    let opts = CreateOptions {
        size: SIZE,
        cluster_size: 4096,
        ..Default::default()
    };
    create(mem.clone(), &opts).await.unwrap();
    let crash = Arc::new(CrashStorage::new(&mem));
    let q = Qcow2::open(
        crash.clone(),
        "failing".into(),
        &Qcow2Options::default(),
        false,
        CacheMode::Writeback,
    )
    .await
    .unwrap();
    crash.fail_flush(1, CrashPolicy::KeepNone);
    let img: Arc<dyn BlockDevice> = Arc::new(q);
    let export = Arc::new(Export::new(img.clone(), ExportConfig::default()));
    let (client, server) = tokio::io::duplex(4096);
    let (sr, mut sw) = tokio::io::split(server);
    let (_stop_tx, stop_rx) = watch::channel(RUNNING);
    let srv = tokio::spawn(async move {
        let mut r = BufReader::new(sr);
        let neg = handshake(&mut r, &mut sw, &export).await.unwrap();
        let conn = Arc::new(Conn::new(export, neg));
        serve(conn, r, sw, Limits::default(), stop_rx, Tracker::default()).await
    });
    let (mut cr, mut cw) = tokio::io::split(client);
    client_handshake(&mut cr, &mut cw).await;

    let data = vec![0x6bu8; 8192];
    // One request at a time, so that the order of effects is the order of the steps.
    let steps: [(u16, u64, u32, u32); 6] = [
        (CMD_WRITE, 0, 8192, 0),
        (CMD_FLUSH, 0, 0, EIO),
        (CMD_WRITE, 65536, 8192, EIO),
        (CMD_WRITE_ZEROES, 131072, 4096, EIO),
        (CMD_FLUSH, 0, 0, EIO),
        (CMD_READ, 0, 8192, 0),
    ];
    for (i, (cmd, offset, len, want)) in steps.into_iter().enumerate() {
        let cookie = i as u64 + 1;
        let req = Request {
            flags: 0,
            cmd,
            cookie,
            offset,
            len: len.into(),
        };
        cw.write_all(&req.encode()).await.unwrap();
        if cmd == CMD_WRITE {
            cw.write_all(&data).await.unwrap();
        }
        let mut read = Vec::new();
        loop {
            let (c, chunk, simple) = message(&mut cr).await;
            assert_eq!(c, cookie);
            let err = reply_error(&chunk, simple);
            assert_eq!(err, want, "step {i}: {}", command_name(cmd));
            match chunk {
                Some((flags, kind, p)) => {
                    if kind == REPLY_TYPE_OFFSET_DATA {
                        read.extend_from_slice(&p[8..]);
                    }
                    if flags & REPLY_FLAG_DONE != 0 {
                        break;
                    }
                }
                None => break,
            }
        }
        if cmd == CMD_READ {
            assert!(read == data, "the written data still reads back");
        }
    }
    cw.write_all(
        &Request {
            flags: 0,
            cmd: CMD_DISC,
            cookie: 0,
            offset: 0,
            len: 0,
        }
        .encode(),
    )
    .await
    .unwrap();
    srv.await.unwrap();
    assert!(img.close().await.is_err(), "close cannot claim durability");
}
