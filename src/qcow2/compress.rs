//! Compressed cluster writes.
//!
//! Each whole guest cluster is compressed on the CPU threads (`crate::cpu`: never on the async
//! executor, one thread per core, many clusters in flight), then packed into the image
//! right after the previous compressed cluster, byte-contiguously, as QEMU does: host clusters
//! holding compressed data are shared, each holding one reference per compressed cluster that
//! touches it. Host space is handed out in submission order (tickets), so the layout of a
//! stream of writes does not depend on which compression finished first.
//!
//! Data that does not compress below `cluster_size - 1` bytes is written as a normal cluster;
//! an all-zero cluster becomes a zero cluster. Ordering is the allocating write's: the
//! compressed bytes and the refcounts are durable before the L2 entry that points to them, and
//! the cluster's old content is freed only after the new entry is durable.

use super::cache::{put_l2_entry, Dep};
use super::Qcow2;
use crate::block::{check_range, ZeroFlags};
use crate::buf::IoBuf;
use crate::error::{Error, Result};
use crate::format::compression;
use crate::format::header::CompressionType;
use crate::format::table::{compressed_range, max_compressed_offset, Mapping};
use crate::units::{GuestCluster, HostOffset};

/// Orders host space allocation of compressed clusters by submission.
pub(crate) struct Tickets {
    state: parking_lot::Mutex<TicketState>,
    serving: tokio::sync::watch::Sender<u64>,
}

#[derive(Default)]
struct TicketState {
    next: u64,
    serving: u64,
    /// Tickets given up without being served (their request was dropped).
    abandoned: std::collections::BTreeSet<u64>,
}

impl Default for Tickets {
    fn default() -> Self {
        Tickets {
            state: parking_lot::Mutex::new(TicketState::default()),
            serving: tokio::sync::watch::channel(0).0,
        }
    }
}

/// A place in the allocation order. Dropping it unserved gives the place up.
pub(crate) struct Ticket<'a> {
    t: &'a Tickets,
    n: u64,
    served: bool,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if !self.served {
            self.t.finish(self.n, true);
        }
    }
}

/// A ticket's turn to allocate; passes the turn on when dropped (also on errors).
pub(crate) struct Turn<'a> {
    t: &'a Tickets,
    n: u64,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.t.finish(self.n, false);
    }
}

impl Tickets {
    fn take(&self) -> Ticket<'_> {
        let mut st = self.state.lock();
        let n = st.next;
        st.next += 1;
        Ticket {
            t: self,
            n,
            served: false,
        }
    }

    /// Ticket `n` is done (served, or abandoned before its turn).
    fn finish(&self, n: u64, abandoned: bool) {
        let mut st = self.state.lock();
        if abandoned && st.serving != n {
            st.abandoned.insert(n);
            return;
        }
        if st.serving == n {
            st.serving += 1;
            loop {
                let next = st.serving;
                if !st.abandoned.remove(&next) {
                    break;
                }
                st.serving += 1;
            }
            let s = st.serving;
            drop(st);
            self.serving.send_replace(s);
        }
    }

    async fn wait_turn<'a>(&'a self, mut ticket: Ticket<'a>) -> Turn<'a> {
        let mut rx = self.serving.subscribe();
        let n = ticket.n;
        let _ = rx.wait_for(|&s| s >= n).await;
        ticket.served = true;
        Turn { t: self, n }
    }
}

/// Bytes of input per compression job (at least one cluster).
const COMPRESS_JOB_BYTES: usize = 256 << 10;

/// Compresses whole clusters of `input` (the last may be partial: the disk's last cluster,
/// compressed zero padded).
fn compress_clusters(kind: CompressionType, input: &[u8], cs: usize) -> Result<Vec<Outcome>> {
    let mut out = Vec::with_capacity(input.len().div_ceil(cs));
    let mut padded = Vec::new();
    for part in input.chunks(cs) {
        if part.iter().all(|&b| b == 0) {
            out.push(Outcome::Zeros);
            continue;
        }
        let full: &[u8] = if part.len() == cs {
            part
        } else {
            padded.clear();
            padded.extend_from_slice(part);
            padded.resize(cs, 0);
            &padded
        };
        out.push(match compression::compress(kind, full)? {
            Some(c) => Outcome::Compressed(c),
            None => Outcome::Raw,
        });
    }
    Ok(out)
}

/// What compressing one cluster produced.
enum Outcome {
    /// All zeros: becomes a zero cluster.
    Zeros,
    /// Does not compress: written as a normal cluster.
    Raw,
    Compressed(Vec<u8>),
}

impl Qcow2 {
    /// Writes whole clusters compressed (`offset` and the length cluster aligned, except that the
    /// last cluster of the disk may be partial).
    ///
    /// The place of these clusters in the allocation order is taken when this function is
    /// called, not when the future first runs: calling it for consecutive requests in order lays
    /// them out in that order even if the futures then run concurrently.
    pub fn write_compressed(
        &self,
        offset: u64,
        data: IoBuf,
    ) -> impl std::future::Future<Output = Result<()>> + Send + '_ {
        let cs = self.geo.cluster_size();
        let len = data.len() as u64;
        let checked = self.check_writable().and_then(|()| {
            if self.has_data_file() {
                // A compressed cluster has no place in a data file mapped 1:1 (QEMU: ENOTSUP).
                return Err(Error::unsupported(
                    "compressed writes are not possible with an external data file",
                ));
            }
            check_range(offset, len, self.virtual_size())?;
            let end = offset + len;
            if offset % cs != 0 || (end % cs != 0 && end != self.virtual_size()) {
                return Err(Error::arg(
                    "compressed writes must cover whole clusters (cluster-aligned offset and length)",
                ));
            }
            Ok(())
        });
        let ticket = checked.as_ref().ok().map(|()| self.tickets.take());
        async move {
            checked?;
            let ticket = ticket.ok_or_else(|| Error::arg("no allocation ticket"))?;
            if len == 0 {
                return Ok(());
            }
            let _resize = self.resize_lock.read().await;
            self.check_open()?;
            self.mark_dirty(offset, len);
            self.compressed_request(offset, data, ticket).await?;
            if self.w.writethrough {
                self.flush_plain().await?;
            }
            Ok(())
        }
    }

    async fn compressed_request(&self, offset: u64, data: IoBuf, ticket: Ticket<'_>) -> Result<()> {
        let g = self.geo;
        let cs = g.cluster_size() as usize;
        // Compress on the CPU threads, in jobs of a few clusters so that both cores can work
        // on one request and a job's result comes back soon.
        let per_job = (COMPRESS_JOB_BYTES / cs).max(1) * cs;
        let jobs: Vec<_> = (0..data.len())
            .step_by(per_job)
            .map(|from| {
                let part = data.slice(from..(from + per_job).min(data.len()));
                let kind = self.compression;
                crate::cpu::run(move || compress_clusters(kind, &part, cs))
            })
            .collect();
        let mut outcomes = Vec::with_capacity(data.len().div_ceil(cs));
        for job in futures_util::future::join_all(jobs).await {
            outcomes.extend(job.ok_or_else(|| Error::arg("compression task failed"))??);
        }
        let first = GuestCluster(offset >> g.cluster_bits);
        let n = outcomes.len() as u64;
        self.enable_lazy_refcounts_if_configured().await?;

        // In ticket order: claim the clusters and place the compressed data.
        let turn = self.tickets.wait_turn(ticket).await;
        let claim = loop {
            match self.claims.try_claim(first.0, first.0 + n) {
                Ok(c) => break c,
                Err(ev) => ev.wait().await,
            }
        };
        // The L2 tables first, as QEMU does: a new table comes before the data in the file.
        let mut table_ready = None;
        for (i, o) in outcomes.iter().enumerate() {
            let c = GuestCluster(first.0 + i as u64);
            if matches!(o, Outcome::Compressed(_)) && table_ready != Some(g.l1_index(c)) {
                self.l2_slice_for_write(c).await?;
                table_ready = Some(g.l1_index(c));
            }
        }
        let mut placed: Vec<Option<(HostOffset, u64)>> = Vec::with_capacity(outcomes.len());
        let mut deps = Vec::new();
        for o in &outcomes {
            match o {
                Outcome::Compressed(b) => {
                    let (host, d) = self
                        .rc
                        .allocate_bytes(&self.w, &self.hdr, b.len() as u64)
                        .await?;
                    if host.0 + b.len() as u64 > max_compressed_offset(g) {
                        return Err(Error::NoSpace(
                            "compressed data would lie beyond the offsets a compressed cluster can address"
                                .into(),
                        ));
                    }
                    for d in d {
                        Dep::push_merged(&mut deps, d);
                    }
                    placed.push(Some((host, b.len() as u64)));
                }
                _ => placed.push(None),
            }
        }
        drop(turn);

        // Write the compressed data, one write per contiguous run.
        if let Err(e) = self.write_blobs(&outcomes, &placed).await {
            for (host, len) in placed.iter().flatten() {
                self.rc.release_bytes(&self.w, *host, *len).await?;
            }
            return Err(e);
        }
        deps.push(Dep::Sync(self.w.barrier.generation()));

        // Point the L2 entries at them; free what they pointed to once that is durable.
        for (i, (o, p)) in outcomes.iter().zip(&placed).enumerate() {
            let Some((host, len)) = p else { continue };
            let c = GuestCluster(first.0 + i as u64);
            let sectors = (host.0 + len - 1) / 512 - host.0 / 512 + 1;
            let _ = o;
            self.link_compressed(
                c,
                Mapping::Compressed {
                    host: *host,
                    sectors,
                },
                &deps,
            )
            .await?;
        }
        drop(claim);

        // Zero clusters and clusters that did not compress go the ordinary ways.
        for (i, o) in outcomes.iter().enumerate() {
            let at = offset + (i * cs) as u64;
            let part = data.slice(i * cs..((i + 1) * cs).min(data.len()));
            match o {
                Outcome::Zeros => {
                    self.zero_plain(
                        at,
                        part.len() as u64,
                        ZeroFlags {
                            may_unmap: true,
                            fast_only: false,
                        },
                    )
                    .await?
                }
                Outcome::Raw => self.write_plain(at, part).await?,
                Outcome::Compressed(_) => {}
            }
        }
        Ok(())
    }

    async fn write_blobs(
        &self,
        outcomes: &[Outcome],
        placed: &[Option<(HostOffset, u64)>],
    ) -> Result<()> {
        let mut run: Option<(u64, Vec<u8>)> = None;
        let storage = &self.w.storage;
        let flush = |run: (u64, Vec<u8>)| async move {
            storage
                .write_at(IoBuf::copy_from(&run.1), run.0)
                .await
                .map_err(|e| Error::io(format!("writing compressed data at {:#x}", run.0), e))
        };
        for (o, p) in outcomes.iter().zip(placed) {
            let (Outcome::Compressed(bytes), Some((host, _))) = (o, p) else {
                continue;
            };
            match run.as_mut() {
                Some((start, buf)) if *start + buf.len() as u64 == host.0 => {
                    buf.extend_from_slice(bytes)
                }
                _ => {
                    if let Some(r) = run.take() {
                        flush(r).await?;
                    }
                    run = Some((host.0, bytes.clone()));
                }
            }
        }
        if let Some(r) = run {
            flush(r).await?;
        }
        Ok(())
    }

    /// Sets one L2 entry to a compressed cluster and queues the old content for freeing.
    async fn link_compressed(&self, c: GuestCluster, new: Mapping, deps: &[Dep]) -> Result<()> {
        let g = self.geo;
        let slice = self.l2_slice_for_write(c).await?;
        let i = self.index_in_slice(c);
        let decoded = {
            let mut st = slice.lock();
            // A compressed cluster has no subclusters: its bitmap is zero.
            let old = Mapping::decode(st.l2_at(i, g).0, g);
            if old.is_ok() {
                put_l2_entry(st.modify(deps.iter().cloned()), i, g, new.encode(g), 0);
            }
            old.map(|o| (o, st.version()))
        };
        let (old, version) = match decoded {
            Ok(x) => x,
            Err(e) => return Err(self.signal_corruption(e).await),
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
            } => self
                .rc
                .defer_free(host, g.cluster_size(), after, self.pass_discard_other),
            Mapping::Compressed { host, sectors } => {
                let (start, n) = compressed_range(host, sectors);
                self.rc.defer_free(start, n, after, self.pass_discard_other);
            }
            _ => {}
        }
        Ok(())
    }
}
