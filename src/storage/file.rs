//! A real file, with blocking `pread`/`pwrite`/`fdatasync` run on the worker thread pool.
//!
//! With `direct` the file is also opened with `O_DIRECT` (qemu-img's `-t none`): requests whose
//! offset, length and buffer are 4 KiB aligned bypass the page cache; anything else (a 512-byte
//! header write, an unaligned guest request) goes through a second, buffered descriptor. Linux
//! keeps the two coherent (direct I/O writes back and invalidates cached pages in its range).

use super::lock::{Access, Locking};
use super::pool::Pool;
use super::{IoFuture, Storage};
use crate::buf::{IoBuf, IoBufMut};
use crate::error::Error;
use rustix::fs::FallocateFlags;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;

const DIRECT_ALIGN: u64 = 4096;
const ZERO_CHUNK: usize = 1 << 20;
/// Largest buffered write done on the calling thread where `RWF_NOWAIT` writes are refused
/// (unless `FileOptions::writes_on_caller`).
pub const INLINE_WRITE_MAX: usize = 64 << 10;

/// How to open a file.
#[derive(Clone, Copy, Debug, Default)]
pub struct FileOptions {
    pub read_only: bool,
    /// Bypass the host page cache (`O_DIRECT`).
    pub direct: bool,
    /// Make `flush` a no-op (qemu-img's `cache=unsafe`).
    pub no_flush: bool,
    /// Do buffered writes of any size on the calling thread, not only small ones (see
    /// `try_write_inline`). For batch jobs (convert) whose executor threads have nothing better
    /// to do than the copy: it saves two thread hops per write. Not for servers, where a
    /// multi-megabyte write would stall the other requests of that executor thread.
    pub writes_on_caller: bool,
    /// QEMU-compatible locks to take on the file when it is opened (see [`super::lock`]);
    /// `None` takes none. [`FileStorage::create`] always takes the creator's locks unless
    /// this says `locking=off`.
    pub lock: Option<LockRequest>,
}

/// Which locks to take, and whether to take any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockRequest {
    pub access: Access,
    pub locking: Locking,
}

/// A file on the host.
pub struct FileStorage {
    buffered: Arc<File>,
    direct: Option<Arc<File>>,
    no_flush: bool,
    /// Largest buffered write done on the calling thread where `RWF_NOWAIT` writes are refused.
    inline_write_max: usize,
    path: PathBuf,
    /// The kernel serves `RWF_NOWAIT` reads/writes on this file (cleared on EOPNOTSUPP).
    nowait_reads: AtomicBool,
    nowait_writes: AtomicBool,
    /// The last data region `hole_at` found (start, end): walking an image extent by extent
    /// asks about the same region again and again. Writes only turn holes into data, so only
    /// what punches holes (write-zeroes, discard, set_len) forgets it.
    data_region: std::sync::Mutex<Option<(u64, u64)>>,
}

/// Takes the locks; a conflict becomes an I/O error whose message is QEMU's.
fn lock_file(file: &File, path: &Path, req: LockRequest) -> io::Result<()> {
    super::lock::lock(file, path, req.access, req.locking).map_err(|e| match e {
        Error::Io { source, .. } => source,
        other => io::Error::new(io::ErrorKind::WouldBlock, other.to_string()),
    })
}

impl FileStorage {
    /// Opens an existing file (and locks it as `opts.lock` says).
    pub fn open(path: &Path, opts: FileOptions) -> io::Result<Self> {
        let mut o = OpenOptions::new();
        o.read(true).write(!opts.read_only);
        let buffered = o.open(path)?;
        if let Some(req) = opts.lock {
            lock_file(&buffered, path, req)?;
        }
        Self::with_file(buffered, path, opts)
    }

    fn with_file(buffered: File, path: &Path, opts: FileOptions) -> io::Result<Self> {
        let direct = if opts.direct {
            let mut o = OpenOptions::new();
            o.read(true)
                .write(!opts.read_only)
                .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32);
            Some(Arc::new(o.open(path).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot open with O_DIRECT (cache mode 'none'): {e}"),
                )
            })?))
        } else {
            None
        };
        Ok(FileStorage {
            buffered: Arc::new(buffered),
            direct,
            no_flush: opts.no_flush,
            inline_write_max: if opts.writes_on_caller {
                usize::MAX
            } else {
                INLINE_WRITE_MAX
            },
            path: path.to_path_buf(),
            data_region: std::sync::Mutex::new(None),
            nowait_reads: AtomicBool::new(true),
            nowait_writes: AtomicBool::new(true),
        })
    }

    /// Creates a file, or empties an existing one, read-write. The file is locked as its creator
    /// (write and resize held, resize not shared) *before* it is truncated, so an image in use
    /// by another process (qimg or QEMU) is refused rather than destroyed.
    pub fn create(path: &Path, opts: FileOptions) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let locking = opts.lock.map_or(Locking::Auto, |l| l.locking);
        lock_file(
            &file,
            path,
            LockRequest {
                access: Access::CREATE,
                locking,
            },
        )?;
        file.set_len(0)?;
        Self::with_file(
            file,
            path,
            FileOptions {
                read_only: false,
                ..opts
            },
        )
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn no_flush(&self) -> bool {
        self.no_flush
    }

    pub(crate) fn buffered_fd(&self) -> Arc<File> {
        self.buffered.clone()
    }

    /// Tries to serve a read on the calling thread without blocking (RWF_NOWAIT: page cache
    /// hits). `Ok` when complete; otherwise the buffer back with how many bytes were read.
    pub(crate) fn try_read_inline(
        &self,
        mut buf: IoBufMut,
        offset: u64,
    ) -> Result<IoBufMut, (IoBufMut, usize)> {
        if self.direct.is_some() || !self.nowait_reads.load(Relaxed) {
            return Err((buf, 0));
        }
        match nowait_read(&self.buffered, &mut buf, offset) {
            NoWait::Done(0) if !buf.is_empty() => {
                buf.fill(0); // at or past the end of the file
                Ok(buf)
            }
            NoWait::Done(n) if n == buf.len() => Ok(buf),
            NoWait::Done(n) => Err((buf, n)),
            NoWait::WouldBlock => Err((buf, 0)),
            NoWait::Unsupported => {
                self.nowait_reads.store(false, Relaxed);
                Err((buf, 0))
            }
        }
    }

    /// Writes what can be written on the calling thread: how many bytes were (0: hand it all
    /// to a worker). Buffered writes only. Where the file system serves `RWF_NOWAIT` writes,
    /// whatever the page cache absorbs without blocking. Where it does not (ext4 refuses them),
    /// a small write (at most [`INLINE_WRITE_MAX`]) is written with a plain `pwrite` here: it is
    /// a copy into the page cache, far cheaper than waking a worker thread and switching back,
    /// and may only block briefly (page allocation, dirty throttling far above our request
    /// sizes). Large writes go to the pool, unless the file was opened for a batch job
    /// (`FileOptions::writes_on_caller`).
    pub(crate) fn try_write_inline(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.goes_direct(offset, buf.len(), buf.as_ptr() as usize) {
            return Ok(0);
        }
        if self.nowait_writes.load(Relaxed) {
            match nowait_write(&self.buffered, buf, offset) {
                NoWait::Done(n) => return Ok(n),
                NoWait::WouldBlock => return Ok(0),
                NoWait::Unsupported => self.nowait_writes.store(false, Relaxed),
            }
        }
        if buf.len() <= self.inline_write_max {
            self.buffered.write_all_at(buf, offset)?;
            return Ok(buf.len());
        }
        Ok(0)
    }

    /// Whether a write of this shape is buffered on a file system that refuses non-blocking
    /// buffered writes (ext4): the kernel can then only do it in a blocking call, whoever
    /// issues it.
    pub(crate) fn buffered_write_blocks(&self, offset: u64, len: usize, addr: usize) -> bool {
        !self.goes_direct(offset, len, addr) && !self.nowait_writes.load(Relaxed)
    }

    /// The descriptor to use for a request: the direct one if the request is aligned.
    pub(crate) fn fd_for(&self, offset: u64, len: usize, addr: usize) -> Arc<File> {
        match &self.direct {
            Some(d) if self.goes_direct(offset, len, addr) => d.clone(),
            _ => self.buffered.clone(),
        }
    }

    /// Whether a request bypasses the page cache: `O_DIRECT` is on and the request is aligned.
    fn goes_direct(&self, offset: u64, len: usize, addr: usize) -> bool {
        self.direct.is_some()
            && offset % DIRECT_ALIGN == 0
            && len as u64 % DIRECT_ALIGN == 0
            && addr as u64 % DIRECT_ALIGN == 0
    }
}

/// Outcome of a non-blocking attempt.
enum NoWait {
    /// This many bytes were transferred (maybe fewer than asked).
    Done(usize),
    /// The operation would block: hand it to a worker thread.
    WouldBlock,
    /// The kernel or file system does not support RWF_NOWAIT here.
    Unsupported,
}

fn classify(r: rustix::io::Result<usize>) -> NoWait {
    match r {
        Ok(n) => NoWait::Done(n),
        Err(rustix::io::Errno::AGAIN) => NoWait::WouldBlock,
        Err(rustix::io::Errno::OPNOTSUPP) | Err(rustix::io::Errno::INVAL) => NoWait::Unsupported,
        // Anything else (EINTR, real errors): let the worker path retry and report it.
        Err(_) => NoWait::WouldBlock,
    }
}

/// Reads without blocking (page cache hits), on the calling thread.
fn nowait_read(f: &File, buf: &mut [u8], offset: u64) -> NoWait {
    let mut iov = [std::io::IoSliceMut::new(buf)];
    classify(rustix::io::preadv2(
        f,
        &mut iov,
        offset,
        rustix::io::ReadWriteFlags::NOWAIT,
    ))
}

/// Writes without blocking (into the page cache), on the calling thread.
fn nowait_write(f: &File, buf: &[u8], offset: u64) -> NoWait {
    let iov = [std::io::IoSlice::new(buf)];
    classify(rustix::io::pwritev2(
        f,
        &iov,
        offset,
        rustix::io::ReadWriteFlags::NOWAIT,
    ))
}

fn read_full(f: &File, buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], offset) {
            Ok(0) => {
                buf[done..].fill(0); // past EOF reads as zeros
                return Ok(());
            }
            Ok(n) => {
                done += n;
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn zero_by_writing(f: &File, offset: u64, len: u64) -> io::Result<()> {
    let zeros = vec![0u8; ZERO_CHUNK.min(len as usize)];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        f.write_all_at(&zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(code) if code == rustix::io::Errno::OPNOTSUPP.raw_os_error()
            || code == rustix::io::Errno::NOSYS.raw_os_error()
            || code == rustix::io::Errno::INVAL.raw_os_error()
    )
}

impl Storage for FileStorage {
    fn release_locks(&self) {
        super::lock::unlock(&self.buffered);
    }

    // Reads and writes first try RWF_NOWAIT on the calling thread: a page cache hit (or a write
    // the page cache absorbs) completes in a microsecond without waking a worker thread. Only
    // what would block goes to the pool. O_DIRECT requests always go to the pool.
    fn read_at(&self, buf: IoBufMut, offset: u64) -> IoFuture<'_, io::Result<IoBufMut>> {
        let (mut buf, done) = match self.try_read_inline(buf, offset) {
            Ok(b) => return Box::pin(async move { Ok(b) }),
            Err(partial) => partial,
        };
        let f = self.fd_for(offset, buf.len(), buf.as_ptr() as usize);
        Box::pin(async move {
            Pool::global()
                .run(move || {
                    read_full(&f, &mut buf[done..], offset + done as u64)?;
                    Ok(buf)
                })
                .await
        })
    }

    fn write_at(&self, buf: IoBuf, offset: u64) -> IoFuture<'_, io::Result<()>> {
        let done = match self.try_write_inline(&buf, offset) {
            Ok(n) if n == buf.len() => return Box::pin(async { Ok(()) }),
            Ok(n) => n,
            Err(e) => return Box::pin(async { Err(e) }),
        };
        let f = self.fd_for(offset, buf.len(), buf.as_ptr() as usize);
        Box::pin(async move {
            Pool::global()
                .run(move || f.write_all_at(&buf[done..], offset + done as u64))
                .await
        })
    }

    fn flush(&self) -> IoFuture<'_, io::Result<()>> {
        if self.no_flush {
            return Box::pin(async { Ok(()) });
        }
        let f = self.buffered.clone();
        Box::pin(async move {
            Pool::global()
                .run(move || rustix::fs::fdatasync(&*f).map_err(io::Error::from))
                .await
        })
    }

    fn len(&self) -> IoFuture<'_, io::Result<u64>> {
        let f = self.buffered.clone();
        Box::pin(async move { Ok(f.metadata()?.len()) })
    }

    fn set_len(&self, len: u64) -> IoFuture<'_, io::Result<()>> {
        let f = self.buffered.clone();
        Box::pin(async move {
            self.holes_may_appear();
            let r = Pool::global().run(move || f.set_len(len)).await;
            self.holes_may_appear();
            r
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> IoFuture<'_, io::Result<()>> {
        let f = self.buffered.clone();
        Box::pin(async move {
            if len == 0 {
                return Ok(());
            }
            self.holes_may_appear();
            let r = Pool::global()
                .run(move || {
                    match rustix::fs::fallocate(&*f, FallocateFlags::ZERO_RANGE, offset, len) {
                        Ok(()) => return Ok(()),
                        Err(e) if unsupported(&e.into()) => {}
                        Err(e) => return Err(e.into()),
                    }
                    let end = offset + len;
                    let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
                    match rustix::fs::fallocate(&*f, flags, offset, len) {
                        Ok(()) => {
                            if f.metadata()?.len() < end {
                                f.set_len(end)?;
                            }
                            Ok(())
                        }
                        Err(e) if unsupported(&e.into()) => zero_by_writing(&f, offset, len),
                        Err(e) => Err(e.into()),
                    }
                })
                .await;
            self.holes_may_appear();
            r
        })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, io::Result<()>> {
        let f = self.buffered.clone();
        Box::pin(async move {
            if len == 0 {
                return Ok(());
            }
            self.holes_may_appear();
            let r = Pool::global()
                .run(move || {
                    let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
                    match rustix::fs::fallocate(&*f, flags, offset, len) {
                        Ok(()) => Ok(()),
                        Err(e) if unsupported(&e.into()) => Ok(()),
                        Err(e) => Err(e.into()),
                    }
                })
                .await;
            self.holes_may_appear();
            r
        })
    }

    fn allocate(&self, offset: u64, len: u64) -> IoFuture<'_, io::Result<()>> {
        let f = self.buffered.clone();
        Box::pin(async move {
            if len == 0 {
                return Ok(());
            }
            Pool::global()
                .run(move || {
                    rustix::fs::fallocate(&*f, FallocateFlags::empty(), offset, len)
                        .map_err(io::Error::from)
                })
                .await
        })
    }

    fn allocated_bytes(&self) -> Option<u64> {
        rustix::fs::fstat(&*self.buffered)
            .ok()
            .map(|st| st.st_blocks as u64 * 512)
    }

    fn hole_at(&self, offset: u64, max: u64) -> IoFuture<'_, io::Result<(bool, u64)>> {
        // Two lseeks and an fstat cost less than handing them to a pool thread and back.
        Box::pin(async move {
            if let Some((start, end)) = *self.lock_data_region() {
                if (start..end).contains(&offset) {
                    return Ok((false, (end - offset).min(max)));
                }
            }
            use rustix::fs::SeekFrom;
            let f = &*self.buffered;
            let len = f.metadata()?.len();
            if offset >= len {
                return Ok((true, max));
            }
            // Where the next data starts; ENXIO means there is none.
            let data = match rustix::fs::seek(f, SeekFrom::Data(offset)) {
                Ok(d) => d,
                Err(rustix::io::Errno::NXIO) => len,
                Err(_) => return Ok((false, max)), // no SEEK_DATA: say data
            };
            if data > offset {
                return Ok((true, (data - offset).min(max)));
            }
            let hole = rustix::fs::seek(f, SeekFrom::Hole(offset))
                .unwrap_or(len)
                .max(offset + 1);
            *self.lock_data_region() = Some((offset, hole));
            Ok((false, (hole - offset).min(max)))
        })
    }
}

impl FileStorage {
    fn lock_data_region(&self) -> std::sync::MutexGuard<'_, Option<(u64, u64)>> {
        self.data_region
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Forgets the cached data region: holes may appear now.
    fn holes_may_appear(&self) {
        *self.lock_data_region() = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn file_contract() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let s = FileStorage::create(&p, FileOptions::default()).unwrap();
        s.write_at(IoBuf::copy_from(b"hello"), 10).await.unwrap();
        assert_eq!(s.len().await.unwrap(), 15);
        let b = s.read_at(IoBufMut::zeroed(10), 8).await.unwrap();
        assert_eq!(&b[..], b"\0\0hello\0\0\0");
        s.write_zeroes(11, 2).await.unwrap();
        let b = s.read_at(IoBufMut::zeroed(5), 10).await.unwrap();
        assert_eq!(&b[..], b"h\0\0lo");
        s.write_zeroes(100, 50).await.unwrap();
        assert_eq!(s.len().await.unwrap(), 150);
        s.discard(0, 4096).await.unwrap();
        s.allocate(0, 8192).await.unwrap();
        assert_eq!(s.len().await.unwrap(), 8192);
        s.flush().await.unwrap();
        s.set_len(3).await.unwrap();
        assert_eq!(s.len().await.unwrap(), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn direct_mode_handles_aligned_and_unaligned() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d");
        std::fs::write(&p, vec![0u8; 16384]).unwrap();
        let opts = FileOptions {
            direct: true,
            ..Default::default()
        };
        let s = match FileStorage::open(&p, opts) {
            Ok(s) => s,
            Err(_) => return, // filesystem without O_DIRECT (tmpfs): nothing to test here
        };
        let data = IoBuf::copy_from(&[7u8; 4096]);
        s.write_at(data, 4096).await.unwrap();
        s.write_at(IoBuf::copy_from(b"xy"), 4097).await.unwrap();
        let b = s.read_at(IoBufMut::zeroed(4096), 4096).await.unwrap();
        assert_eq!(&b[..3], b"\x07xy");
        assert!(b[3..].iter().all(|&x| x == 7));
    }
}
