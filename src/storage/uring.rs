//! io_uring file I/O: reads, writes and fdatasync go through one process-wide ring; everything
//! else (length changes, fallocate, hole queries) stays on the worker pool of [`FileStorage`].
//!
//! Ownership rule: a submitted operation owns its buffer and a handle to the file until the
//! kernel reports completion. Both live in the ring's pending table, not in the request future,
//! so a future dropped mid-flight (a client that went away) cannot free memory the kernel is
//! still writing into; the completion thread drops them when the CQE arrives.
//!
//! io_uring is often disabled in containers (seccomp, `kernel.io_uring_disabled`), so the ring
//! is probed once, with a real NOP round trip; callers fall back to the thread pool when it is
//! unavailable.

use super::file::FileStorage;
use super::{IoFuture, Storage};
use crate::buf::{IoBuf, IoBufMut};
use io_uring::{opcode, squeue, types, IoUring};
use parking_lot::Mutex;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, OnceLock};
use tokio::sync::oneshot;

const RING_ENTRIES: u32 = 256;
const PROBE: u64 = u64::MAX;

/// What an in-flight operation keeps alive until it completes.
enum Keep {
    Mut(IoBufMut),
    Ref(IoBuf),
    Nothing,
}

struct Pending {
    done: oneshot::Sender<(i32, Keep)>,
    keep: Keep,
    _file: Arc<File>,
}

struct Ring {
    uring: IoUring,
    /// Serializes pushes to the submission queue.
    sq: Mutex<()>,
    pending: Mutex<Slab>,
}

/// A simple slab: operation ids are indices, reused through a free list.
#[derive(Default)]
struct Slab {
    slots: Vec<Option<Pending>>,
    free: Vec<usize>,
}

impl Slab {
    fn insert(&mut self, p: Pending) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(p);
                i
            }
            None => {
                self.slots.push(Some(p));
                self.slots.len() - 1
            }
        }
    }

    fn remove(&mut self, i: usize) -> Option<Pending> {
        let p = self.slots.get_mut(i)?.take();
        if p.is_some() {
            self.free.push(i);
        }
        p
    }
}

impl Ring {
    /// The process-wide ring, or `None` if io_uring is unavailable here.
    fn global() -> Option<&'static Arc<Ring>> {
        static RING: OnceLock<Option<Arc<Ring>>> = OnceLock::new();
        RING.get_or_init(|| match Ring::start() {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::info!("io_uring unavailable ({e}); using the thread pool");
                None
            }
        })
        .as_ref()
    }

    fn start() -> io::Result<Arc<Ring>> {
        let uring = IoUring::new(RING_ENTRIES)?;
        // A real round trip: some sandboxes allow io_uring_setup but not io_uring_enter.
        {
            let nop = opcode::Nop::new().build().user_data(PROBE);
            // SAFETY: no other thread knows this ring yet.
            unsafe {
                uring
                    .submission_shared()
                    .push(&nop)
                    .map_err(|_| io::Error::other("io_uring submission queue full"))?;
            }
            uring.submitter().submit_and_wait(1)?;
            // SAFETY: as above.
            let cq = unsafe { uring.completion_shared() };
            let ok = cq.into_iter().any(|c| c.user_data() == PROBE);
            if !ok {
                return Err(io::Error::other("io_uring probe did not complete"));
            }
        }
        let ring = Arc::new(Ring {
            uring,
            sq: Mutex::new(()),
            pending: Mutex::new(Slab::default()),
        });
        let r = ring.clone();
        std::thread::Builder::new()
            .name("qimg-uring".into())
            .spawn(move || r.reap())?;
        Ok(ring)
    }

    /// The completion thread: waits for CQEs and hands results back.
    fn reap(&self) {
        loop {
            match self.uring.submitter().submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(4) || e.raw_os_error() == Some(16) => {} // EINTR, EBUSY
                Err(e) => {
                    tracing::error!("io_uring wait failed: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
            // SAFETY: only this thread consumes completions.
            let cq = unsafe { self.uring.completion_shared() };
            let done: Vec<(u64, i32)> = cq.map(|c| (c.user_data(), c.result())).collect();
            let mut pending = self.pending.lock();
            for (id, res) in done {
                if let Some(p) = pending.remove(id as usize) {
                    let _ = p.done.send((res, p.keep));
                }
            }
        }
    }

    /// Queues `e` and hands it to the kernel. An error means the entry was *not* queued (the
    /// caller may free what it references). Once queued it is the kernel's: a failed
    /// `io_uring_enter` cannot take it back (the next one submits it, and the completion
    /// thread's wait is one), so transient failures (EAGAIN, EBUSY: completion queue full until
    /// the completion thread drains it, EINTR) are retried here, and any other is logged and left
    /// to the next submission, never reported as the operation's failure.
    fn push(&self, e: &squeue::Entry) -> io::Result<()> {
        let _sq = self.sq.lock();
        loop {
            // SAFETY: pushes are serialized by `sq`; the entry's buffer and file are kept alive
            // in `pending` until completion.
            let pushed = unsafe { self.uring.submission_shared().push(e).is_ok() };
            if pushed {
                break;
            }
            // Full: hand what is queued to the kernel and retry. Nothing of ours is queued yet,
            // so a failure here may be returned.
            self.submit()?;
            std::thread::yield_now();
        }
        let mut backoff = std::time::Duration::from_micros(10);
        loop {
            match self.submit() {
                Ok(_) => return Ok(()),
                Err(err) if matches!(err.raw_os_error(), Some(11 | 16 | 4)) => {
                    // EAGAIN, EBUSY, EINTR: the kernel or the completion queue needs a moment.
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(std::time::Duration::from_millis(1));
                }
                Err(err) => {
                    tracing::error!("io_uring submit failed ({err}); the queued operation waits for the next submission");
                    return Ok(());
                }
            }
        }
    }

    /// `io_uring_enter` for the submission queue (tests may inject failures).
    fn submit(&self) -> io::Result<usize> {
        #[cfg(test)]
        if tests::take_injected_submit_failure() {
            return Err(io::Error::from_raw_os_error(11)); // EAGAIN
        }
        self.uring.submitter().submit()
    }

    /// Submits one operation built by `build` and waits for its result.
    async fn run(
        &self,
        file: Arc<File>,
        keep: Keep,
        build: impl FnOnce(&Keep) -> squeue::Entry,
    ) -> io::Result<(i32, Keep)> {
        let (tx, rx) = oneshot::channel();
        let entry = build(&keep);
        let id = self.pending.lock().insert(Pending {
            done: tx,
            keep,
            _file: file,
        });
        if let Err(e) = self.push(&entry.user_data(id as u64)) {
            self.pending.lock().remove(id);
            return Err(e);
        }
        rx.await
            .map_err(|_| io::Error::other("io_uring completion thread lost the request"))
    }
}

/// A file whose reads, writes and flushes go through io_uring.
pub struct UringStorage {
    file: FileStorage,
    ring: &'static Arc<Ring>,
}

impl UringStorage {
    /// Wraps `file`, or gives it back if io_uring is unavailable.
    pub fn new(file: FileStorage) -> Result<UringStorage, FileStorage> {
        match Ring::global() {
            Some(ring) => Ok(UringStorage { file, ring }),
            None => Err(file),
        }
    }

    /// Whether io_uring works in this process.
    pub fn available() -> bool {
        Ring::global().is_some()
    }
}

fn os_err(res: i32) -> io::Error {
    io::Error::from_raw_os_error(-res)
}

impl Storage for UringStorage {
    fn release_locks(&self) {
        self.file.release_locks();
    }

    fn read_at(&self, buf: IoBufMut, offset: u64) -> IoFuture<'_, io::Result<IoBufMut>> {
        let (buf, done) = match self.file.try_read_inline(buf, offset) {
            Ok(b) => return Box::pin(async move { Ok(b) }),
            Err(partial) => partial,
        };
        let f = self.file.fd_for(offset, buf.len(), buf.as_ptr() as usize);
        Box::pin(async move {
            let mut buf = buf;
            let mut done = done;
            while done < buf.len() {
                let fd = types::Fd(f.as_raw_fd());
                let pos = offset + done as u64;
                let (res, keep) = self
                    .ring
                    .run(f.clone(), Keep::Mut(buf), |k| {
                        let Keep::Mut(b) = k else { unreachable!() };
                        // SAFETY of the pointer: the buffer is kept alive in `pending`.
                        let ptr = unsafe { b.as_ptr().add(done) as *mut u8 };
                        opcode::Read::new(fd, ptr, (b.len() - done) as u32)
                            .offset(pos)
                            .build()
                    })
                    .await?;
                let Keep::Mut(b) = keep else {
                    return Err(io::Error::other("io_uring returned the wrong buffer"));
                };
                buf = b;
                match res {
                    0 => {
                        buf[done..].fill(0); // past the end of the file
                        break;
                    }
                    n if n > 0 => done += n as usize,
                    e if e == -4 || e == -11 => {} // EINTR, EAGAIN: retry
                    e => return Err(os_err(e)),
                }
            }
            Ok(buf)
        })
    }

    fn write_at(&self, buf: IoBuf, offset: u64) -> IoFuture<'_, io::Result<()>> {
        // Buffered writes the file system cannot do without blocking (ext4) go the thread
        // pool's way: small ones complete on the calling thread (see `try_write_inline`), large
        // ones on a pool thread. io_uring would punt each to an io-wq worker, which runs
        // buffered writes to one file one at a time (hashed by inode) and completes them
        // through one more thread hop: `convert -O raw` ran ~25% longer that way.
        if self
            .file
            .buffered_write_blocks(offset, buf.len(), buf.as_ptr() as usize)
        {
            return self.file.write_at(buf, offset);
        }
        let inline = match self.file.try_write_inline(&buf, offset) {
            Ok(n) if n == buf.len() => return Box::pin(async { Ok(()) }),
            Ok(n) => n,
            Err(e) => return Box::pin(async { Err(e) }),
        };
        let f = self.file.fd_for(offset, buf.len(), buf.as_ptr() as usize);
        Box::pin(async move {
            let mut done = inline;
            let mut keep = Keep::Ref(buf);
            loop {
                let len = match &keep {
                    Keep::Ref(b) => b.len(),
                    _ => 0,
                };
                if done >= len {
                    return Ok(());
                }
                let fd = types::Fd(f.as_raw_fd());
                let pos = offset + done as u64;
                let (res, k) = self
                    .ring
                    .run(f.clone(), keep, |k| {
                        let Keep::Ref(b) = k else { unreachable!() };
                        // SAFETY of the pointer: the buffer is kept alive in `pending`.
                        let ptr = unsafe { b.as_ptr().add(done) };
                        opcode::Write::new(fd, ptr, (b.len() - done) as u32)
                            .offset(pos)
                            .build()
                    })
                    .await?;
                keep = k;
                match res {
                    n if n > 0 => done += n as usize,
                    e if e == -4 || e == -11 => {}
                    0 => return Err(io::Error::other("io_uring write made no progress")),
                    e => return Err(os_err(e)),
                }
            }
        })
    }

    fn flush(&self) -> IoFuture<'_, io::Result<()>> {
        if self.file.no_flush() {
            return Box::pin(async { Ok(()) });
        }
        let f = self.file.buffered_fd();
        Box::pin(async move {
            let fd = types::Fd(f.as_raw_fd());
            let (res, _) = self
                .ring
                .run(f.clone(), Keep::Nothing, |_| {
                    opcode::Fsync::new(fd)
                        .flags(types::FsyncFlags::DATASYNC)
                        .build()
                })
                .await?;
            if res < 0 {
                return Err(os_err(res));
            }
            Ok(())
        })
    }

    fn len(&self) -> IoFuture<'_, io::Result<u64>> {
        self.file.len()
    }
    fn set_len(&self, len: u64) -> IoFuture<'_, io::Result<()>> {
        self.file.set_len(len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> IoFuture<'_, io::Result<()>> {
        self.file.write_zeroes(offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, io::Result<()>> {
        self.file.discard(offset, len)
    }
    fn allocate(&self, offset: u64, len: u64) -> IoFuture<'_, io::Result<()>> {
        self.file.allocate(offset, len)
    }
    fn allocated_bytes(&self) -> Option<u64> {
        self.file.allocated_bytes()
    }
    fn hole_at(&self, offset: u64, max: u64) -> IoFuture<'_, io::Result<(bool, u64)>> {
        self.file.hole_at(offset, max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::file::FileOptions;
    use std::sync::atomic::{AtomicU32, Ordering::SeqCst};

    static INJECT_SUBMIT_FAILURES: AtomicU32 = AtomicU32::new(0);
    /// Serializes the tests that use the process-wide ring's injection counter.
    static INJECTING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    pub(super) fn take_injected_submit_failure() -> bool {
        INJECT_SUBMIT_FAILURES
            .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    /// io_uring must be tested where it exists: a machine without it says so loudly, and fails
    /// when `QIMG_REQUIRE_URING=1` (CI sets it) instead of passing silently.
    fn uring_file(p: &std::path::Path) -> Option<UringStorage> {
        let f = FileStorage::create(p, FileOptions::default()).unwrap();
        match UringStorage::new(f) {
            Ok(s) => Some(s),
            Err(_) => {
                assert!(
                    std::env::var("QIMG_REQUIRE_URING").as_deref() != Ok("1"),
                    "io_uring is unavailable here but QIMG_REQUIRE_URING=1"
                );
                eprintln!(
                    "SKIPPED: io_uring is unavailable on this machine; its engine is NOT tested"
                );
                None
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failed_submits_neither_fail_nor_free_queued_operations() {
        let _one = INJECTING.lock().await;
        let dir = tempfile::tempdir().unwrap();
        let Some(s) = uring_file(&dir.path().join("u")) else {
            return;
        };
        for round in 0..50u64 {
            // The next three submits fail (EAGAIN) after the entry was queued.
            INJECT_SUBMIT_FAILURES.store(3, SeqCst);
            let data: Vec<u8> = (0..8192u64).map(|i| (i * 7 + round) as u8).collect();
            s.write_at(IoBuf::copy_from(&data), round * 8192)
                .await
                .expect("a write whose submit failed transiently must still complete");
            // A flush always goes through the ring (reads and writes may complete inline).
            INJECT_SUBMIT_FAILURES.store(3, SeqCst);
            s.flush()
                .await
                .expect("a flush whose submit failed transiently must still complete");
            INJECT_SUBMIT_FAILURES.store(2, SeqCst);
            let b = s
                .read_at(IoBufMut::zeroed(8192), round * 8192)
                .await
                .expect("a read whose submit failed transiently must still complete");
            assert_eq!(&b[..], &data[..], "round {round}");
        }
        INJECT_SUBMIT_FAILURES.store(0, SeqCst);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn uring_read_write_flush() {
        let _one = INJECTING.lock().await;
        let dir = tempfile::tempdir().unwrap();
        let Some(s) = uring_file(&dir.path().join("u")) else {
            return;
        };
        s.write_at(IoBuf::copy_from(&[5u8; 10000]), 4096)
            .await
            .unwrap();
        s.flush().await.unwrap();
        let b = s.read_at(IoBufMut::zeroed(20000), 0).await.unwrap();
        assert!(b[..4096].iter().all(|&x| x == 0));
        assert!(b[4096..14096].iter().all(|&x| x == 5));
        assert!(b[14096..].iter().all(|&x| x == 0));
        // Many in flight, and futures dropped while their I/O is in flight.
        for i in 0..200u64 {
            let f = s.write_at(IoBuf::copy_from(&[i as u8; 512]), 100_000 + i * 512);
            let _ = tokio::time::timeout(std::time::Duration::ZERO, f).await;
        }
        let reads = futures_util::future::join_all(
            (0..200u64).map(|i| s.read_at(IoBufMut::zeroed(512), 100_000 + i * 512)),
        )
        .await;
        for r in reads {
            r.unwrap();
        }
    }
}
