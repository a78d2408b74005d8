//! The read path: look up the runs of a request, then read them all concurrently into disjoint
//! pieces of the caller's buffer (data from the file, zeros, the backing file, or decompressed
//! clusters), and glue the pieces back together without copying.

use super::mapping::{Run, RunKind};
use super::Qcow2;
use crate::block::check_range;
use crate::buf::IoBufMut;
use crate::error::{IoContext, Result};
use crate::format::compression;
use crate::format::table::compressed_range;
use crate::storage::blkdebug::DebugEvent;
use crate::units::HostOffset;
use futures_util::future::try_join_all;

impl Qcow2 {
    /// Reads `buf.len()` bytes of the virtual disk at `offset`.
    pub(crate) async fn read_plain(&self, offset: u64, buf: IoBufMut) -> Result<IoBufMut> {
        check_range(offset, buf.len() as u64, self.virtual_size())?;
        self.read_unchecked(offset, buf).await
    }

    /// [`Qcow2::read_plain`] without the range check: the VM state area lies past the disk.
    pub(crate) async fn read_unchecked(&self, offset: u64, buf: IoBufMut) -> Result<IoBufMut> {
        if buf.is_empty() {
            return Ok(buf);
        }
        let _guard = self.epochs.enter();
        // Fast path: one run covering the whole request, its metadata cached.
        let first = match self.lookup_first_cached(offset, buf.len() as u64) {
            Ok(r) => r,
            Err(e) => return Err(self.signal_corruption(e).await),
        };
        if let Some(run) = first.filter(|r| r.len == buf.len() as u64) {
            return self.read_run(run, buf).await;
        }
        let mut pieces: Vec<(Run, IoBufMut)> = Vec::new();
        let mut rest = buf;
        let mut pos = offset;
        while !rest.is_empty() {
            for run in self.lookup(pos, rest.len() as u64).await? {
                let tail = rest.split_off(run.len as usize);
                pieces.push((run, std::mem::replace(&mut rest, tail)));
                pos += run.len;
            }
        }
        if pieces.len() == 1 {
            let (run, b) = pieces.pop().unwrap_or_else(|| unreachable!());
            return self.read_run(run, b).await;
        }
        let mut parts = try_join_all(pieces.into_iter().map(|(r, b)| self.read_run(r, b)))
            .await?
            .into_iter();
        let mut out = parts.next().unwrap_or_else(|| IoBufMut::zeroed(0));
        for p in parts {
            out.unsplit(p);
        }
        Ok(out)
    }

    pub(crate) async fn read_run(&self, run: Run, mut buf: IoBufMut) -> Result<IoBufMut> {
        match run.kind {
            RunKind::Data { host } => {
                self.data_event(DebugEvent::ReadAio).await;
                self.data
                    .read_at(buf, host)
                    .await
                    .context(|| format!("reading data at host offset {host:#x}"))
            }
            RunKind::Zero { .. } => {
                buf.fill(0);
                Ok(buf)
            }
            RunKind::Unallocated { .. } => self.read_backing(run.offset, buf).await,
            RunKind::Compressed { host, sectors } => {
                let cluster = self.read_compressed(host, sectors).await?;
                let at = (run.offset & (self.geo.cluster_size() - 1)) as usize;
                let n = buf.len();
                buf.copy_from_slice(&cluster[at..at + n]);
                Ok(buf)
            }
        }
    }

    /// Reads guest data from the backing file (zeros where there is none).
    pub(crate) async fn read_backing(&self, offset: u64, mut buf: IoBufMut) -> Result<IoBufMut> {
        let Some(b) = self.backing.get() else {
            buf.fill(0);
            return Ok(buf);
        };
        let bsize = b.size();
        if offset >= bsize {
            buf.fill(0);
            return Ok(buf);
        }
        let inside = (bsize - offset).min(buf.len() as u64) as usize;
        if inside == buf.len() {
            return b.read(offset, buf).await;
        }
        let mut tail = buf.split_off(inside);
        tail.fill(0);
        let mut head = b.read(offset, buf).await?;
        head.unsplit(tail);
        Ok(head)
    }

    /// Reads and decompresses one compressed cluster.
    pub(crate) async fn read_compressed(&self, host: HostOffset, sectors: u64) -> Result<IoBufMut> {
        let (start, len) = compressed_range(host, sectors);
        let raw = self
            .w
            .storage
            .read_at(IoBufMut::zeroed(len as usize), start.0)
            .await
            .context(|| format!("reading compressed cluster at host offset {start}"))?;
        let mut out = IoBufMut::for_overwrite(self.geo.cluster_size() as usize);
        // Bad compressed data is an I/O error for this cluster, not metadata corruption.
        compression::decompress(self.compression, &raw, &mut out)?;
        Ok(out)
    }
}
