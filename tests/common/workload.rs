//! The crash tests' workloads: requests applied to an image and to a model of what the guest
//! must read, and what of the model is durable (at the last successful flush).

use qimg::block::{BlockDevice, ZeroFlags};
use qimg::qcow2::Qcow2;
use qimg::storage::memory::MemoryStorage;
use qimg::storage::StorageRef;
use qimg::IoBuf;
use std::sync::Arc;

#[derive(Clone, Debug)]
pub enum Op {
    Write { off: u64, len: u64, seed: u64 },
    Zero { off: u64, len: u64, unmap: bool },
    Discard { off: u64, len: u64 },
    Flush,
    Grow(u64),
}

/// A random request at `[off, off+len)`: mostly writes (data from `seed`), some write-zeroes
/// (with or without unmap), discards and flushes.
pub fn random_op(r: &mut fastrand::Rng, off: u64, len: u64, seed: u64) -> Op {
    match r.u8(0..10) {
        0..=5 => Op::Write { off, len, seed },
        6 => Op::Zero {
            off,
            len,
            unmap: r.bool(),
        },
        7 => Op::Discard { off, len },
        _ => Op::Flush,
    }
}

/// What a raw backing file of `size` bytes holds (a pattern), or zeros without one.
pub fn backing_data(backing: bool, size: u64) -> Vec<u8> {
    if backing {
        super::pattern(0xbacc, size as usize)
    } else {
        vec![0; size as usize]
    }
}

/// A read-only raw device holding `data`.
pub fn raw_device(data: &[u8]) -> Arc<dyn BlockDevice> {
    let mem: StorageRef = Arc::new(MemoryStorage::from_bytes(data));
    Arc::new(qimg::raw::Raw::with_storage(mem, data.len() as u64, true))
}

/// What the workload knows about durability when the power goes.
pub struct Tracker {
    pub model: Vec<u8>,
    pub durable: Vec<u8>,
    /// Bytes changed since the last successful flush (their content is undefined after a crash).
    pub touched: Vec<bool>,
}

impl Tracker {
    /// A disk that reads `initial` (durably).
    pub fn new(initial: Vec<u8>) -> Tracker {
        Tracker {
            touched: vec![false; initial.len()],
            durable: initial.clone(),
            model: initial,
        }
    }

    pub fn touch(&mut self, off: u64, len: u64) {
        let end = (off + len) as usize;
        if self.touched.len() < end {
            self.touched.resize(end, false);
        }
        self.touched[off as usize..end].fill(true);
    }

    /// Runs `ops` on the image `opened` (with `backing` attached) until they are done or a
    /// request fails (the storage died): what the guest must read then, starting from
    /// `initial`.
    pub async fn run(
        initial: Vec<u8>,
        opened: qimg::Result<Qcow2>,
        backing: Option<Arc<dyn BlockDevice>>,
        ops: &[Op],
    ) -> Tracker {
        let mut t = Tracker::new(initial);
        let Ok(img) = opened else {
            return t;
        };
        if let Some(b) = backing {
            img.set_backing(b);
        }
        for op in ops {
            if t.apply(&img, op).await.is_err() {
                break;
            }
        }
        t
    }

    /// Applies `op` to `img` and to the model (a failed request leaves its range touched:
    /// undefined).
    pub async fn apply(&mut self, img: &Qcow2, op: &Op) -> qimg::Result<()> {
        match op {
            Op::Write { off, len, seed } => {
                let data = super::pattern(*seed, *len as usize);
                self.touch(*off, *len);
                let r = img.write_at(*off, IoBuf::copy_from(&data)).await;
                self.model[*off as usize..(*off + *len) as usize].copy_from_slice(&data);
                r
            }
            Op::Zero { off, len, unmap } => {
                self.touch(*off, *len);
                let flags = ZeroFlags {
                    may_unmap: *unmap,
                    fast_only: false,
                };
                let r = img.zero_range(*off, *len, flags).await;
                self.model[*off as usize..(*off + *len) as usize].fill(0);
                r
            }
            Op::Discard { off, len } => {
                // v3 (and v2 without a backing file): discarded whole clusters read as zeros.
                let cs = img.cluster_size();
                self.touch(*off, *len);
                let r = img.discard_range(*off, *len).await;
                let end = off + len;
                let a = off.next_multiple_of(cs);
                let b = if end == img.virtual_size() {
                    end
                } else {
                    end / cs * cs
                };
                if a < b {
                    self.model[a as usize..b as usize].fill(0);
                }
                r
            }
            Op::Flush => {
                let r = img.flush().await;
                if r.is_ok() {
                    self.durable = self.model.clone();
                    self.touched.fill(false);
                }
                r
            }
            Op::Grow(n) => {
                let r = img.grow(*n).await;
                if r.is_ok() {
                    self.model.resize(*n as usize, 0);
                }
                r
            }
        }
    }
}
