//! The bodies of the whole-image and whole-session fuzz targets (fuzz/fuzz_targets/image.rs and
//! session.rs), kept in the library so that the regression tests replay findings exactly as the
//! fuzzer ran them (tests/hostile.rs, tests/nbd_hostile.rs).
//!
//! - [`exercise_image`]: a whole image from untrusted bytes: open (read-only and read-write),
//!   read, write, zero, discard, flush, check, close, over the in-memory storage backend.
//! - [`exercise_nbd_session`]: a whole NBD connection from untrusted client bytes: the
//!   handshake, then the request loop, against a small image in memory, exactly as the server
//!   runs them on an accepted socket (buffered reader, bounded in-flight work).
//!
//! Errors are fine; panics, hangs and unbounded allocation are findings. Not part of the
//! supported API.

use crate::block::{BlockDevice, CacheMode};
use crate::nbd::commands::Conn;
use crate::nbd::handshake::handshake;
use crate::nbd::server::Tracker;
use crate::nbd::transmission::{serve, Limits, RUNNING};
use crate::nbd::{DetectZeroes, DiscardMode, Export, ExportConfig};
use crate::qcow2::{create, CreateOptions, Qcow2, Qcow2Options};
use crate::storage::memory::MemoryStorage;
use crate::storage::StorageRef;
use crate::{IoBuf, IoBufMut, ZeroFlags};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};

const MAX_IMAGE: usize = 1 << 20;
/// Reads and writes stay within the first few MiB of the guest, whatever the virtual size.
const MAX_SPAN: u64 = 4 << 20;

/// Runs one input: the last 8 bytes choose the operations, the rest is the image.
pub fn exercise_image(data: &[u8]) {
    if data.len() < 8 || data.len() > MAX_IMAGE + 8 {
        return;
    }
    let (image, ops) = data.split_at(data.len() - 8);
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    {
        Ok(rt) => rt,
        Err(_) => return,
    };
    rt.block_on(exercise(image, ops));
}

fn span(img: &Qcow2, a: u8, b: u8) -> (u64, u64) {
    let size = img.virtual_size().min(MAX_SPAN);
    if size == 0 {
        return (0, 0);
    }
    let off = (u64::from(a) << 14) % size;
    let len = ((u64::from(b) + 1) << 10).min(size - off);
    (off, len)
}

async fn exercise(image: &[u8], ops: &[u8]) {
    let storage: StorageRef = Arc::new(MemoryStorage::from_bytes(image));
    let read_only = ops[0] & 1 == 0;
    let img = match Qcow2::open(
        storage,
        "fuzz".into(),
        &Qcow2Options::default(),
        read_only,
        CacheMode::Writeback,
    )
    .await
    {
        Ok(img) => img,
        Err(_) => return,
    };
    let size = img.virtual_size().min(MAX_SPAN);
    let _ = img.read_at(0, IoBufMut::zeroed(size as usize)).await;
    let mut off = 0;
    while off < size {
        match img.block_status(off, size - off).await {
            Ok(st) => off += st.len.max(1),
            Err(_) => break,
        }
    }
    if !read_only {
        for op in ops[1..].chunks_exact(3) {
            let (off, len) = span(&img, op[1], op[2]);
            if len == 0 {
                continue;
            }
            let _ = match op[0] % 5 {
                0 => {
                    img.write_at(off, IoBuf::copy_from(&vec![op[2]; len as usize]))
                        .await
                }
                1 => {
                    let flags = ZeroFlags {
                        may_unmap: op[2] & 1 == 1,
                        fast_only: false,
                    };
                    img.zero_range(off, len, flags).await
                }
                2 => img.discard_range(off, len).await,
                3 => img.flush().await,
                _ => img
                    .read_at(off, IoBufMut::zeroed(len as usize))
                    .await
                    .map(|_| ()),
            };
        }
    }
    let _ = img.check().await;
    let _ = img.close().await;
}

/// Virtual size of the image an NBD session runs against: small, so that every request the
/// fuzzer can make stays cheap, yet several clusters and L2 tables wide.
const SESSION_IMAGE: u64 = 1 << 20;

/// Runs one NBD connection: the first byte chooses the export's settings, the rest is what the
/// client sends (then it closes its side). What the server sends back is read and dropped.
/// Returns how the request loop ended (`None`: the handshake did not finish), so that tests can
/// tell that a seed reaches the phase it was written for.
pub fn exercise_nbd_session(data: &[u8]) -> Option<String> {
    let (&knobs, client) = data.split_first()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .ok()?;
    rt.block_on(session(knobs, client))
}

async fn session_image(knobs: u8) -> crate::Result<Arc<dyn BlockDevice>> {
    let mem: StorageRef = Arc::new(MemoryStorage::new());
    let opts = CreateOptions {
        size: SESSION_IMAGE,
        cluster_size: 4096,
        ..Default::default()
    };
    create(mem.clone(), &opts).await?;
    let cache = if knobs & 2 != 0 {
        CacheMode::Writethrough
    } else {
        CacheMode::Writeback
    };
    let img = Qcow2::open(mem, "fuzz".into(), &Qcow2Options::default(), false, cache).await?;
    // Some data, some zeros, some holes: reads and block status see every kind of extent.
    img.write_at(0, IoBuf::copy_from(&[0xa5; 12288])).await?;
    img.zero_range(65536, 8192, ZeroFlags::default()).await?;
    Ok(Arc::new(img))
}

async fn session(knobs: u8, client: &[u8]) -> Option<String> {
    let img = session_image(knobs).await.ok()?;
    let export = Arc::new(Export::new(
        img.clone(),
        ExportConfig {
            read_only: knobs & 1 != 0,
            discard: if knobs & 4 != 0 {
                DiscardMode::Unmap
            } else {
                DiscardMode::Ignore
            },
            allocation_depth: knobs & 8 != 0,
            detect_zeroes: if knobs & 16 != 0 {
                DetectZeroes::Unmap
            } else {
                DetectZeroes::Off
            },
            multi_conn: true,
            ..Default::default()
        },
    ));
    // A small pipe, so that replies and requests are cut into many partial reads and writes.
    let (client_end, server_end) = tokio::io::duplex(4096);
    let (sr, mut sw) = tokio::io::split(server_end);
    let (mut cr, mut cw) = tokio::io::split(client_end);
    let input = client.to_vec();
    let sender = tokio::spawn(async move {
        let _ = cw.write_all(&input).await;
        let _ = cw.shutdown().await;
    });
    let drain = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 << 10];
        while matches!(cr.read(&mut buf).await, Ok(n) if n > 0) {}
    });
    let (_stop, stop_rx) = tokio::sync::watch::channel(RUNNING);
    let tracker = Tracker::default();
    let mut r = BufReader::with_capacity(4096, sr);
    let end = if let Ok(neg) = handshake(&mut r, &mut sw, &export).await {
        let conn = Arc::new(Conn::new(export, neg));
        // Small budgets: admission control is part of what the fuzzer exercises.
        let limits = Limits {
            requests: 1 + usize::from(knobs >> 4),
            bytes: 256 << 10,
        };
        let end = serve(conn, r, sw, limits, stop_rx, tracker.clone()).await;
        Some(format!("{end:?}"))
    } else {
        // Both halves gone: the client's writes and reads end instead of waiting.
        drop((r, sw));
        None
    };
    tracker.wait_idle().await;
    let _ = sender.await;
    let _ = drain.await;
    let _ = img.close().await;
    end
}
