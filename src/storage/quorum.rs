//! QEMU's `quorum` driver: one disk kept as several identical files, every write going to all
//! of them and reads voted on, so that a file that went bad (a failing disk, a silently
//! corrupted copy) is outvoted instead of believed.
//!
//! The rules are QEMU's, so that an image set up for QEMU behaves the same here:
//! - a read reads every child (`read-pattern=quorum`). If every successful read returned the
//!   same bytes, that is the answer; otherwise the version most children returned wins, and
//!   it must have been returned by at least `vote-threshold` children, else the read fails with
//!   `EIO`. Fewer than `vote-threshold` successful reads fail the read with the error most
//!   children reported. Children that disagree with the winner are named in a warning.
//! - `read-pattern=fifo` reads the first child, and the next only if that one fails.
//! - writes, write-zeroes, discards, flushes and length changes go to every child and succeed
//!   when at least `vote-threshold` children succeeded (the error most children reported
//!   otherwise).
//! - the length is every child's length; children of different lengths are an error (`EIO`).
//!
//! QEMU's `blkverify` mode and `rewrite-corrupted` (writing the winning version back over the
//! losers) are not implemented and refused where the options are read. A quorum node has no
//! directory of its own: a relative backing file name cannot be resolved against it (QEMU's
//! "Cannot generate a base directory for quorum nodes").

use super::{IoFuture, Storage, StorageRef};
use crate::buf::{IoBuf, IoBufMut};
use futures_util::future::join_all;
use std::io;

/// How reads use the children (QEMU's `read-pattern`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReadPattern {
    /// Read all, vote.
    #[default]
    Quorum,
    /// Read the first child that answers.
    Fifo,
}

/// A quorum of files as the user describes it (QEMU's `driver=quorum` options).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuorumSpec {
    /// The children's files, in order.
    pub children: Vec<std::path::PathBuf>,
    /// How many children must agree (QEMU's `vote-threshold`).
    pub threshold: usize,
    pub read_pattern: ReadPattern,
}

impl QuorumSpec {
    /// QEMU's checks of the options, with its messages.
    pub fn validate(&self) -> crate::Result<()> {
        if self.children.is_empty() {
            return Err(crate::Error::arg(
                "Number of provided children must be 1 or more",
            ));
        }
        if self.threshold < 1 {
            return Err(crate::Error::arg(
                "Parameter 'vote-threshold' expects a value >= 1",
            ));
        }
        if self.threshold > self.children.len() {
            return Err(crate::Error::arg("threshold may not exceed children count"));
        }
        Ok(())
    }

    /// The node's name as QEMU builds it from its options (for `info` and messages).
    pub fn qemu_name(&self) -> String {
        let quote = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| format!("\"{s}\""));
        let children: Vec<String> = self
            .children
            .iter()
            .map(|c| {
                format!(
                    "{{\"driver\": \"file\", \"filename\": {}}}",
                    quote(&c.display().to_string())
                )
            })
            .collect();
        let pattern = match self.read_pattern {
            ReadPattern::Quorum => "",
            ReadPattern::Fifo => "\"read-pattern\": \"fifo\", ",
        };
        format!(
            "json:{{\"children\": [{}], \"driver\": \"quorum\", {pattern}\"vote-threshold\": {}}}",
            children.join(", "),
            self.threshold
        )
    }
}

pub struct Quorum {
    children: Vec<StorageRef>,
    names: Vec<String>,
    threshold: usize,
    read_pattern: ReadPattern,
}

impl Quorum {
    /// A quorum over opened children (`names`: for warnings), after [`QuorumSpec::validate`].
    pub fn new(
        children: Vec<StorageRef>,
        names: Vec<String>,
        threshold: usize,
        read_pattern: ReadPattern,
    ) -> Quorum {
        debug_assert!(threshold >= 1 && threshold <= children.len());
        Quorum {
            children,
            names,
            threshold,
            read_pattern,
        }
    }

    /// The outcome of an operation done on every child: success if enough succeeded, else the
    /// error most children reported (the first of them on a tie).
    fn settle(&self, results: Vec<io::Result<()>>) -> io::Result<()> {
        let ok = results.iter().filter(|r| r.is_ok()).count();
        if ok >= self.threshold {
            return Ok(());
        }
        Err(most_common_error(
            results.into_iter().filter_map(|r| r.err()),
        ))
    }

    async fn read_fifo(&self, buf: IoBufMut, offset: u64) -> io::Result<IoBufMut> {
        let mut last = None;
        for child in &self.children {
            match child
                .read_at(IoBufMut::for_overwrite(buf.len()), offset)
                .await
            {
                Ok(b) => return Ok(b),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EIO)))
    }

    async fn read_voted(&self, len: usize, offset: u64) -> io::Result<IoBufMut> {
        let reads = join_all(
            self.children
                .iter()
                .map(|c| c.read_at(IoBufMut::for_overwrite(len), offset)),
        )
        .await;
        let mut versions: Vec<(IoBufMut, Vec<usize>)> = Vec::new();
        let mut errors = Vec::new();
        for (i, r) in reads.into_iter().enumerate() {
            match r {
                Ok(b) => match versions.iter_mut().find(|(v, _)| v[..] == b[..]) {
                    Some((_, voters)) => voters.push(i),
                    None => versions.push((b, vec![i])),
                },
                Err(e) => {
                    tracing::warn!(
                        "quorum: reading {len} bytes at {offset} from {} failed: {e}",
                        self.names[i]
                    );
                    errors.push(e)
                }
            }
        }
        let successes: usize = versions.iter().map(|(_, v)| v.len()).sum();
        if successes < self.threshold {
            return Err(most_common_error(errors.into_iter()));
        }
        // The most voted version; the first of equals (QEMU keeps the first it counted).
        let mut best = 0;
        for (i, (_, voters)) in versions.iter().enumerate() {
            if voters.len() > versions[best].1.len() {
                best = i;
            }
        }
        if versions[best].1.len() < self.threshold {
            tracing::warn!(
                "quorum: no version of {len} bytes at {offset} was read from {} children",
                self.threshold
            );
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        for (i, (_, voters)) in versions.iter().enumerate() {
            if i != best {
                for &c in voters {
                    tracing::warn!(
                        "quorum: {} differs from the other children at {offset} ({len} bytes)",
                        self.names[c]
                    );
                }
            }
        }
        Ok(versions.swap_remove(best).0)
    }
}

fn most_common_error(errors: impl Iterator<Item = io::Error>) -> io::Error {
    let errors: Vec<io::Error> = errors.collect();
    let key = |e: &io::Error| e.raw_os_error().unwrap_or(libc::EIO);
    let mut best: Option<(i32, usize)> = None;
    for e in &errors {
        let k = key(e);
        let n = errors.iter().filter(|x| key(x) == k).count();
        if best.is_none_or(|(_, m)| n > m) {
            best = Some((k, n));
        }
    }
    match best {
        Some((k, _)) => errors
            .into_iter()
            .find(|e| key(e) == k)
            .unwrap_or_else(|| io::Error::from_raw_os_error(k)),
        None => io::Error::from_raw_os_error(libc::EIO),
    }
}

impl Storage for Quorum {
    fn read_at(&self, buf: IoBufMut, offset: u64) -> IoFuture<'_, io::Result<IoBufMut>> {
        Box::pin(async move {
            match self.read_pattern {
                ReadPattern::Fifo => self.read_fifo(buf, offset).await,
                ReadPattern::Quorum => self.read_voted(buf.len(), offset).await,
            }
        })
    }

    fn write_at(&self, buf: IoBuf, offset: u64) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async move {
            let r = join_all(
                self.children
                    .iter()
                    .map(|c| c.write_at(buf.clone(), offset)),
            )
            .await;
            self.settle(r)
        })
    }

    fn flush(&self) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async move {
            let r = join_all(self.children.iter().map(|c| c.flush())).await;
            self.settle(r)
        })
    }

    fn len(&self) -> IoFuture<'_, io::Result<u64>> {
        Box::pin(async move {
            let mut len = None;
            for c in &self.children {
                let l = c.len().await?;
                if len.is_some_and(|x| x != l) {
                    return Err(io::Error::from_raw_os_error(libc::EIO));
                }
                len = Some(l);
            }
            Ok(len.unwrap_or(0))
        })
    }

    fn set_len(&self, len: u64) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async move {
            let r = join_all(self.children.iter().map(|c| c.set_len(len))).await;
            self.settle(r)
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async move {
            let r = join_all(self.children.iter().map(|c| c.write_zeroes(offset, len))).await;
            self.settle(r)
        })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async move {
            let r = join_all(self.children.iter().map(|c| c.discard(offset, len))).await;
            self.settle(r)
        })
    }

    fn allocate(&self, offset: u64, len: u64) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async move {
            let r = join_all(self.children.iter().map(|c| c.allocate(offset, len))).await;
            self.settle(r)
        })
    }

    fn allocated_bytes(&self) -> Option<u64> {
        // What the children take together, as QEMU sums a node's children.
        self.children.iter().map(|c| c.allocated_bytes()).sum()
    }

    fn release_locks(&self) {
        for c in &self.children {
            c.release_locks();
        }
    }

    fn protocol(&self) -> &'static str {
        "quorum"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::fault::{FaultError, FaultStorage, OpKind};
    use crate::storage::memory::MemoryStorage;
    use std::sync::Arc;

    fn quorum(contents: &[&[u8]], threshold: usize) -> (Quorum, Vec<Arc<MemoryStorage>>) {
        let mems: Vec<Arc<MemoryStorage>> = contents
            .iter()
            .map(|c| Arc::new(MemoryStorage::from_bytes(c)))
            .collect();
        let children: Vec<StorageRef> = mems.iter().map(|m| m.clone() as StorageRef).collect();
        let names = (0..children.len()).map(|i| format!("child{i}")).collect();
        (
            Quorum::new(children, names, threshold, ReadPattern::Quorum),
            mems,
        )
    }

    async fn read(q: &Quorum, len: usize) -> io::Result<Vec<u8>> {
        q.read_at(IoBufMut::zeroed(len), 0)
            .await
            .map(|b| b.to_vec())
    }

    #[tokio::test]
    async fn the_majority_wins_and_a_short_majority_fails() {
        let (q, _) = quorum(&[b"aaaa", b"bbbb", b"aaaa"], 2);
        assert_eq!(read(&q, 4).await.unwrap(), b"aaaa");
        let (q, _) = quorum(&[b"aaaa", b"bbbb", b"cccc"], 2);
        assert_eq!(
            read(&q, 4).await.unwrap_err().raw_os_error(),
            Some(libc::EIO)
        );
        // Threshold 1: the first of equally voted versions.
        let (q, _) = quorum(&[b"bbbb", b"aaaa"], 1);
        assert_eq!(read(&q, 4).await.unwrap(), b"bbbb");
    }

    #[tokio::test]
    async fn writes_reach_every_child() {
        let (q, mems) = quorum(&[b"0000", b"0000"], 2);
        q.write_at(IoBuf::copy_from(b"xy"), 1).await.unwrap();
        for m in mems {
            assert_eq!(&m.to_vec()[..4], b"0xy0");
        }
        assert_eq!(q.len().await.unwrap(), 4);
    }

    #[tokio::test]
    async fn failures_count_against_the_threshold() {
        let good = Arc::new(MemoryStorage::from_bytes(b"data"));
        let bad = Arc::new(FaultStorage::new(MemoryStorage::from_bytes(b"data")));
        bad.handle().fail_from(OpKind::Read, 1, FaultError::Io);
        bad.handle().fail_from(OpKind::Write, 1, FaultError::Io);
        let children: Vec<StorageRef> = vec![good.clone(), bad.clone()];
        let names = vec!["good".into(), "bad".into()];
        let one = Quorum::new(children.clone(), names.clone(), 1, ReadPattern::Quorum);
        assert_eq!(read(&one, 4).await.unwrap(), b"data");
        one.write_at(IoBuf::copy_from(b"D"), 0).await.unwrap();
        let two = Quorum::new(children.clone(), names.clone(), 2, ReadPattern::Quorum);
        assert!(read(&two, 4).await.is_err());
        assert!(two.write_at(IoBuf::copy_from(b"D"), 0).await.is_err());
        // fifo: the failing child is skipped.
        let fifo = Quorum::new(vec![bad, good], names, 1, ReadPattern::Fifo);
        assert_eq!(read(&fifo, 4).await.unwrap(), b"Data");
    }

    #[test]
    fn qemu_checks_of_the_options() {
        let spec = |n: usize, t: usize| QuorumSpec {
            children: (0..n).map(|i| format!("c{i}").into()).collect(),
            threshold: t,
            read_pattern: ReadPattern::Quorum,
        };
        assert!(spec(2, 1).validate().is_ok());
        assert!(spec(2, 3).validate().is_err());
        assert!(spec(2, 0).validate().is_err());
        assert!(spec(0, 1).validate().is_err());
    }
}
