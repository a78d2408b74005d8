//! Compressed cluster writes.
//!
//! Each whole guest cluster is compressed on a worker thread (never on the async executor; at
//! most one compression per CPU at a time, many clusters in flight), then packed into the image
//! right after the previous compressed cluster, byte-contiguously, as QEMU does: host clusters
//! holding compressed data are shared, each holding one reference per compressed cluster that
//! touches it. Host space is handed out in submission order (tickets), so the layout of a
//! stream of writes does not depend on which compression finished first.
//!
//! Data that does not compress below `cluster_size - 1` bytes is written as a normal cluster;
//! an all-zero cluster becomes a zero cluster. Ordering is the allocating write's: the
//! compressed bytes and the refcounts are durable before the L2 entry that points to them, and
//! the cluster's old content is freed only after the new entry is durable.

use super::cache::{put_u64, Dep};
use super::Qcow2;
use crate::block::{check_range, ZeroFlags};
use crate::buf::IoBuf;
use crate::error::{Error, Result};
use crate::format::compression;
use crate::format::table::{compressed_range, max_compressed_offset, Mapping};
use crate::units::GuestCluster;
use std::sync::atomic::Ordering::SeqCst;

/// Orders host space allocation of compressed clusters by submission.
pub(crate) struct Tickets {
    next: std::sync::atomic::AtomicU64,
    serving: tokio::sync::watch::Sender<u64>,
    /// Limits concurrent compressions to the number of CPUs.
    cpus: tokio::sync::Semaphore,
}

impl Default for Tickets {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        Tickets {
            next: std::sync::atomic::AtomicU64::new(0),
            serving: tokio::sync::watch::channel(0).0,
            cpus: tokio::sync::Semaphore::new(cpus),
        }
    }
}

/// A ticket's turn to allocate; passes the turn on when dropped (also on errors).
struct Turn<'a> {
    t: &'a Tickets,
    n: u64,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.t.serving.send_modify(|s| *s = (*s).max(self.n + 1));
    }
}

impl Tickets {
    fn take(&self) -> u64 {
        self.next.fetch_add(1, SeqCst)
    }

    async fn wait_turn(&self, n: u64) -> Turn<'_> {
        let mut rx = self.serving.subscribe();
        let _ = rx.wait_for(|&s| s >= n).await;
        Turn { t: self, n }
    }
}

impl Qcow2 {
    /// Writes whole clusters compressed (`offset` and the length cluster aligned, except that the
    /// last cluster of the disk may be partial).
    pub async fn write_compressed(&self, offset: u64, data: IoBuf) -> Result<()> {
        self.check_writable()?;
        let len = data.len() as u64;
        check_range(offset, len, self.virtual_size())?;
        let cs = self.geo.cluster_size();
        let end = offset + len;
        if offset % cs != 0 || (end % cs != 0 && end != self.virtual_size()) {
            return Err(Error::arg(
                "compressed writes must cover whole clusters (cluster-aligned offset and length)",
            ));
        }
        let _resize = self.resize_lock.read().await;
        // Tickets are taken in order before anything waits, so clusters of one request, and
        // requests issued one after another, are laid out in that order.
        let tickets: Vec<u64> = (0..len.div_ceil(cs)).map(|_| self.tickets.take()).collect();
        let futs = tickets.into_iter().enumerate().map(|(i, t)| {
            let from = i * cs as usize;
            let to = (from + cs as usize).min(data.len());
            self.compress_cluster(offset + from as u64, data.slice(from..to), t)
        });
        futures_util::future::try_join_all(futs).await?;
        if self.w.writethrough {
            self.flush().await?;
        }
        Ok(())
    }

    /// Compresses and writes one guest cluster (its data may be short at the end of the disk).
    async fn compress_cluster(&self, guest: u64, data: IoBuf, ticket: u64) -> Result<()> {
        let cs = self.geo.cluster_size() as usize;
        let kind = self.compression;
        let compressed = if data.iter().all(|&b| b == 0) {
            None // zeros: no data at all
        } else {
            let _cpu = self.tickets.cpus.acquire().await;
            let input = data.clone();
            let out = tokio::task::spawn_blocking(move || {
                let mut full = input.to_vec();
                full.resize(cs, 0); // the disk's last, partial cluster: zero padded
                compression::compress(kind, &full)
            })
            .await
            .map_err(|e| Error::arg(format!("compression task failed: {e}")))??;
            Some(out)
        };
        let turn = self.tickets.wait_turn(ticket).await;
        match compressed {
            None => {
                drop(turn);
                self.zero_range(guest, data.len() as u64, ZeroFlags { may_unmap: true, fast_only: false })
                    .await
            }
            Some(None) => {
                drop(turn);
                self.write_at(guest, data).await // does not compress: a normal cluster
            }
            Some(Some(bytes)) => self.write_compressed_bytes(guest, bytes, turn).await,
        }
    }

    async fn write_compressed_bytes(&self, guest: u64, bytes: Vec<u8>, turn: Turn<'_>) -> Result<()> {
        let g = self.geo;
        let first = GuestCluster(guest >> g.cluster_bits);
        self.enable_lazy_refcounts_if_configured().await?;
        let slice = self.l2_slice_for_write(first).await?;
        let claim = loop {
            match self.claims.try_claim(first.0, first.0 + 1) {
                Ok(c) => break c,
                Err(ev) => ev.wait().await,
            }
        };
        let (host, deps) = self
            .rc
            .allocate_bytes(&self.w, &self.hdr, bytes.len() as u64)
            .await?;
        drop(turn);
        if host.0 + bytes.len() as u64 > max_compressed_offset(g) {
            return Err(Error::NoSpace(
                "compressed data would lie beyond the offsets a compressed cluster can address"
                    .into(),
            ));
        }
        let len = bytes.len() as u64;
        if let Err(e) = self
            .w
            .storage
            .write_at(IoBuf::copy_from(&bytes), host.0)
            .await
        {
            self.rc.release_bytes(&self.w, host, len).await?;
            return Err(Error::io(format!("writing compressed cluster at {host}"), e));
        }
        let data_gen = self.w.barrier.generation();
        let sectors = (host.0 + len - 1) / 512 - host.0 / 512 + 1;
        let new = Mapping::Compressed { host, sectors };
        let i = self.index_in_slice(first);
        let mut all_deps = deps;
        all_deps.push(Dep::Sync(data_gen));
        let decoded = {
            let mut st = slice.lock();
            let old = Mapping::decode(st.u64_at(i), g);
            if old.is_ok() {
                put_u64(st.modify(all_deps), i, new.encode(g));
            }
            old.map(|o| (o, st.version()))
        };
        drop(claim);
        let (old, version) = match decoded {
            Ok(x) => x,
            Err(e) => {
                self.rc.release_bytes(&self.w, host, len).await?;
                return Err(self.signal_corruption(e).await);
            }
        };
        let after = Some(Dep::Table {
            table: slice.clone(),
            version,
        });
        match old {
            Mapping::Data { host, .. }
            | Mapping::Zero {
                prealloc: Some(host),
                ..
            } => self.rc.defer_free(host, g.cluster_size(), after, false),
            Mapping::Compressed { host, sectors } => {
                let (start, n) = compressed_range(host, sectors);
                self.rc.defer_free(start, n, after, false);
            }
            _ => {}
        }
        Ok(())
    }
}
