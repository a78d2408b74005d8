//! The sequential write cache of a compressed target (seed 003), and the request entry points
//! that route through it.
//!
//! An image opened with `compress=on` stores every cluster compressed. Backup tools stream
//! small writes (4 KiB over NBD) in order; compressing them one by one is impossible (a
//! compressed cluster is written whole). The cache gathers them:
//!
//! - each cached cluster holds its full content (its old content, read when the cluster enters
//!   the cache, with every write applied), so any write pattern is correct: sequential writes
//!   just fill the buffer; a non-sequential write merges into it, and if that cluster was
//!   already written out, it is written again (a new compressed cluster; the old one is freed);
//! - the cluster being filled is "unfinished"; it becomes "finished" when writing reaches its end
//!   or moves to another cluster. A cluster filled by its very first write is finished at once
//!   (the bug the seed's author found later);
//! - finished clusters are compressed and written in the background, in the order they were
//!   finished, and leave the cache once written; reads are served from the cache without
//!   waiting for those writes;
//! - a flush writes out every finished cluster and the unfinished one as it stands (it stays in
//!   the cache, and is written again when continued and finished);
//! - memory is bounded: each cached cluster holds a permit of a semaphore, so writers wait when
//!   the cache is full (back-pressure) until writebacks free space.
//!
//! Zero writes and discards on a compressed target first write out any cached cluster they
//! touch, then go the ordinary way.

use super::Qcow2;
use crate::block::{check_range, ZeroFlags};
use crate::buf::{IoBuf, IoBufMut};
use crate::error::Result;
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Weak};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// Memory the cache may hold.
const CACHE_BYTES: u64 = 64 << 20;
/// Writebacks in flight from the background task.
const WRITEBACKS: usize = 8;

struct Entry {
    buf: Vec<u8>,
    /// End of the sequential fill (bytes into the cluster).
    fill: u64,
    finished: bool,
    version: u64,
    written: u64,
    writing: bool,
    queued: bool,
    _permit: OwnedSemaphorePermit,
}

#[derive(Default)]
struct State {
    entries: HashMap<u64, Entry>,
    current: Option<u64>,
    /// Finished clusters waiting to be written, in finishing order.
    queue: VecDeque<u64>,
}

pub(crate) struct SeqCache {
    cs: u64,
    state: Mutex<State>,
    space: Arc<Semaphore>,
    /// Signalled when a writeback ends.
    changed: Notify,
    /// Wakes the background writeback task (clusters were queued).
    wake: Arc<Notify>,
}

impl SeqCache {
    pub(crate) fn new(cluster_size: u64) -> SeqCache {
        let clusters = (CACHE_BYTES / cluster_size).max(16) as usize;
        SeqCache {
            cs: cluster_size,
            state: Mutex::new(State::default()),
            space: Arc::new(Semaphore::new(clusters)),
            changed: Notify::new(),
            wake: Arc::new(Notify::new()),
        }
    }

    /// Forgets every cached cluster from `first` on (a shrink cut them off; they were written
    /// out just before). A later growth must read them from the image, not from here.
    pub(crate) fn forget_from(&self, first: u64) {
        let mut st = self.state.lock();
        st.entries.retain(|&c, _| c < first);
        st.queue.retain(|&c| c < first);
        if st.current.is_some_and(|c| c >= first) {
            st.current = None;
        }
    }

    fn queue(st: &mut State, c: u64) {
        if let Some(e) = st.entries.get_mut(&c) {
            e.finished = true;
            if !e.queued {
                e.queued = true;
                st.queue.push_back(c);
            }
        }
    }
}

/// Settles a cluster's state when its writeback ends (or is abandoned).
struct Writeback<'a> {
    seq: &'a SeqCache,
    c: u64,
    version: u64,
    ok: bool,
}

impl Drop for Writeback<'_> {
    fn drop(&mut self) {
        let mut st = self.seq.state.lock();
        let current = st.current;
        if let Some(e) = st.entries.get_mut(&self.c) {
            e.writing = false;
            if self.ok {
                e.written = self.version;
            }
            let done = e.written == e.version && e.finished && current != Some(self.c);
            let again = e.written != e.version && e.finished;
            if done {
                st.entries.remove(&self.c);
            } else if again {
                SeqCache::queue(&mut st, self.c);
            }
        }
        drop(st);
        self.seq.changed.notify_waiters();
    }
}

impl Qcow2 {
    /// Reads the virtual disk (through the compressed target's cache when there is one).
    pub async fn read_at(&self, offset: u64, buf: IoBufMut) -> Result<IoBufMut> {
        self.check_open()?;
        let Some(seq) = &self.seq else {
            return self.read_plain(offset, buf).await;
        };
        check_range(offset, buf.len() as u64, self.virtual_size())?;
        // Cached clusters are copied from the cache first: a cluster may leave the cache (its
        // writeback done) while the image is being read, so the cache is looked at before.
        let cs = seq.cs;
        let len = buf.len();
        let cached: Vec<(usize, Vec<u8>)> = {
            let st = seq.state.lock();
            let mut v = Vec::new();
            let mut pos = 0usize;
            while pos < len {
                let abs = offset + pos as u64;
                let c = abs / cs;
                let in_c = (abs % cs) as usize;
                let n = (cs as usize - in_c).min(len - pos);
                if let Some(e) = st.entries.get(&c) {
                    v.push((pos, e.buf[in_c..in_c + n].to_vec()));
                }
                pos += n;
            }
            v
        };
        let mut buf = self.read_plain(offset, buf).await?;
        for (pos, bytes) in cached {
            buf[pos..pos + bytes.len()].copy_from_slice(&bytes);
        }
        Ok(buf)
    }

    /// Writes guest data (into the compressed target's cache when there is one).
    pub async fn write_at(&self, offset: u64, data: IoBuf) -> Result<()> {
        let Some(seq) = &self.seq else {
            return self.write_plain(offset, data).await;
        };
        self.check_writable()?;
        check_range(offset, data.len() as u64, self.virtual_size())?;
        self.mark_dirty_locked(offset, data.len() as u64).await;
        let cs = seq.cs;
        let mut pos = 0usize;
        while pos < data.len() {
            let abs = offset + pos as u64;
            let c = abs / cs;
            let in_c = abs % cs;
            let cluster_len = cs.min(self.virtual_size() - c * cs);
            let n = ((cluster_len - in_c) as usize).min(data.len() - pos);
            self.cache_write(seq, c, in_c, &data[pos..pos + n], cluster_len)
                .await?;
            pos += n;
        }
        seq.wake.notify_one();
        Ok(())
    }

    async fn cache_write(
        &self,
        seq: &SeqCache,
        c: u64,
        in_c: u64,
        bytes: &[u8],
        cluster_len: u64,
    ) -> Result<()> {
        let end = in_c + bytes.len() as u64;
        loop {
            {
                let mut st = seq.state.lock();
                let current = st.current;
                if let Some(e) = st.entries.get_mut(&c) {
                    e.buf[in_c as usize..end as usize].copy_from_slice(bytes);
                    e.version += 1;
                    if current == Some(c) && in_c == e.fill {
                        e.fill = end;
                        if e.fill == cluster_len {
                            st.current = None;
                            SeqCache::queue(&mut st, c);
                        }
                    } else if e.finished {
                        // A rewrite of a finished cluster: write it out again.
                        SeqCache::queue(&mut st, c);
                    }
                    return Ok(());
                }
            }
            // A cluster new to the cache: wait for room, then load its content.
            let permit = seq
                .space
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| crate::error::Error::arg("write cache closed"))?;
            let mut buf = if in_c == 0 && end == cluster_len {
                vec![0u8; cluster_len as usize]
            } else {
                let b = self
                    .read_plain(c * seq.cs, IoBufMut::for_overwrite(cluster_len as usize))
                    .await?;
                b.to_vec()
            };
            buf[in_c as usize..end as usize].copy_from_slice(bytes);
            let mut st = seq.state.lock();
            if st.entries.contains_key(&c) {
                continue; // another writer brought it in meanwhile: merge into theirs
            }
            if let Some(prev) = st.current.take() {
                SeqCache::queue(&mut st, prev);
            }
            st.entries.insert(
                c,
                Entry {
                    buf,
                    fill: end,
                    finished: false,
                    version: 1,
                    written: 0,
                    writing: false,
                    queued: false,
                    _permit: permit,
                },
            );
            if end == cluster_len {
                // Filled by its first write: finished at once.
                SeqCache::queue(&mut st, c);
            } else {
                st.current = Some(c);
            }
            return Ok(());
        }
    }

    /// Starts writing one cached cluster out (compressed): snapshots it and takes its place in
    /// the layout now; the returned future does the rest. `None` if there is nothing to do.
    fn start_writeback<'a>(
        &'a self,
        seq: &'a SeqCache,
        c: u64,
    ) -> Option<impl std::future::Future<Output = Result<()>> + Send + 'a> {
        let (data, version) = {
            let mut st = seq.state.lock();
            let current = st.current;
            let e = st.entries.get_mut(&c)?;
            if e.writing {
                return None;
            }
            if e.version == e.written {
                // Already on disk: a finished cluster has nothing left to do in the cache.
                if e.finished && current != Some(c) {
                    st.entries.remove(&c);
                    drop(st);
                    seq.changed.notify_waiters();
                }
                return None;
            }
            e.writing = true;
            e.queued = false;
            (IoBuf::copy_from(&e.buf), e.version)
        };
        let write = self.write_compressed(c * seq.cs, data);
        Some(async move {
            // The guard settles the entry even if this future is dropped half way.
            let mut guard = Writeback {
                seq,
                c,
                version,
                ok: false,
            };
            let r = write.await;
            guard.ok = r.is_ok();
            drop(guard);
            r
        })
    }

    /// Writes out every cached cluster (finished ones in order, then the unfinished one as it
    /// stands), and waits for writebacks already running.
    pub(crate) async fn flush_seq_cache(&self) -> Result<()> {
        let Some(seq) = &self.seq else { return Ok(()) };
        loop {
            let notified = seq.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (order, busy) = {
                let mut st = seq.state.lock();
                let mut order: Vec<u64> = st.queue.drain(..).collect();
                let mut rest: Vec<u64> = st
                    .entries
                    .iter()
                    .filter(|(c, e)| e.version != e.written && !order.contains(c))
                    .map(|(c, _)| *c)
                    .collect();
                rest.sort_unstable();
                order.extend(rest);
                for c in &order {
                    if let Some(e) = st.entries.get_mut(c) {
                        e.queued = false;
                    }
                }
                (order, st.entries.values().any(|e| e.writing))
            };
            let futs: Vec<_> = order
                .into_iter()
                .filter_map(|c| self.start_writeback(seq, c))
                .collect();
            if futs.is_empty() {
                if !busy {
                    return Ok(());
                }
                notified.await; // someone else's writeback is finishing
                continue;
            }
            // Let every writeback finish before reporting the first error.
            for r in futures_util::future::join_all(futs).await {
                r?;
            }
        }
    }

    /// Writes out cached clusters overlapping `[offset, offset+len)` and drops them.
    async fn evict_range(&self, offset: u64, len: u64) -> Result<()> {
        let Some(seq) = &self.seq else { return Ok(()) };
        let first = offset / seq.cs;
        let last = (offset + len.max(1) - 1) / seq.cs;
        {
            let mut st = seq.state.lock();
            if let Some(c) = st.current.filter(|c| (first..=last).contains(c)) {
                st.current = None;
                SeqCache::queue(&mut st, c);
            }
        }
        loop {
            let notified = seq.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let pending: Vec<u64> = {
                let st = seq.state.lock();
                st.entries
                    .keys()
                    .copied()
                    .filter(|c| (first..=last).contains(c))
                    .collect()
            };
            if pending.is_empty() {
                return Ok(());
            }
            let futs: Vec<_> = pending
                .into_iter()
                .filter_map(|c| self.start_writeback(seq, c))
                .collect();
            if futs.is_empty() {
                notified.await;
            } else {
                for r in futures_util::future::join_all(futs).await {
                    r?;
                }
            }
        }
    }

    /// Makes a range read as zeros.
    pub async fn zero_range(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.evict_range(offset, len).await?;
        self.zero_plain(offset, len, flags).await
    }

    /// Discards whole clusters of a range.
    pub async fn discard_range(&self, offset: u64, len: u64) -> Result<()> {
        self.evict_range(offset, len).await?;
        self.discard_plain(offset, len).await
    }

    /// Runs the background writeback of a compressed target's cache: finished clusters are
    /// compressed and written as they finish, in order, a few at a time. Needs the image in an
    /// `Arc`; without the task, cached clusters are written on flush and close.
    pub(crate) fn start_seq_writeback(self: &Arc<Self>) -> Option<tokio::task::JoinHandle<()>> {
        let wake = self.seq.as_ref()?.wake.clone();
        let weak: Weak<Qcow2> = Arc::downgrade(self);
        Some(tokio::spawn(async move {
            loop {
                let notified = wake.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                {
                    let Some(img) = weak.upgrade() else { return };
                    if img.closed.load(std::sync::atomic::Ordering::Relaxed) {
                        return;
                    }
                    img.run_queued_writebacks().await;
                }
                notified.await;
            }
        }))
    }

    async fn run_queued_writebacks(&self) {
        let Some(seq) = &self.seq else { return };
        let mut running = futures_util::stream::FuturesUnordered::new();
        loop {
            while running.len() < WRITEBACKS {
                let next = seq.state.lock().queue.pop_front();
                let Some(c) = next else { break };
                if let Some(f) = self.start_writeback(seq, c) {
                    running.push(f);
                }
            }
            use futures_util::StreamExt;
            match running.next().await {
                Some(Err(e)) => tracing::error!("compressed writeback failed: {e}"),
                Some(Ok(())) => {}
                None => return,
            }
        }
    }
}
