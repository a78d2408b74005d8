//! The body of the `image` fuzz target (fuzz/fuzz_targets/image.rs), kept in the library so
//! that the regression tests replay findings exactly as the fuzzer ran them (tests/hostile.rs).
//!
//! A whole image from untrusted bytes: open (read-only and read-write), read, write, zero,
//! discard, flush, check, close, over the in-memory storage backend. Errors are fine; panics,
//! hangs and unbounded allocation are findings. Not part of the supported API.

use crate::block::{BlockDevice, CacheMode};
use crate::qcow2::{Qcow2, Qcow2Options};
use crate::storage::memory::MemoryStorage;
use crate::storage::StorageRef;
use crate::{IoBuf, IoBufMut, ZeroFlags};
use std::sync::Arc;

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
