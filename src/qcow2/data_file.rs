//! External data files: guest data in a file of its own, the metadata in the qcow2 file.
//!
//! An image with incompatible feature bit 2 keeps no guest data: guest cluster `n` lives at byte
//! `n * cluster_size` of the data file (host offset == guest offset), and data clusters have no
//! refcounts (the qcow2 file's refcounts cover its metadata only). The L2 tables still say which
//! clusters are allocated, zero or unallocated; an entry with offset 0 and the COPIED flag maps
//! guest cluster 0 (`Geometry::external_data`).
//!
//! # Which file
//! The data file is the one the user names (the `data-file` runtime option), or else the one the
//! image names in its header extension. That name is untrusted input: an image from elsewhere
//! must not make us open an arbitrary file (QEMU's CVE-2024-4467: `qemu-img info` opened
//! whatever an image's data file name said, `json:` names and protocols included). So:
//! - the name is a plain local path, never parsed as a protocol or `json:` name, resolved as
//!   QEMU resolves it (relative to the working directory);
//! - it is opened only if the embedder's [`crate::block::FilePolicy`] allows data files named by
//!   images (and, with `allowed_dirs`, only inside those directories);
//! - metadata-only opens (`info`) do not open it at all: reads and writes then fail
//!   ([`NoDataFile`]);
//! - it may not be the image itself or a file of its backing chain.
//!
//! # Durability
//! Data written to the data file must be durable before the L2 entry that points at it, the same
//! rule as for data inside the image: the durability barrier (`barrier`) flushes the data file
//! before the image file, so every `Dep::Sync` covers both.
//!
//! # `data_file_raw`
//! With autoclear bit 1 the data file is a valid raw image of the guest disk at all times:
//! creation maps every cluster (preallocated metadata), and write-zeroes writes the zeros into the
//! data file before it changes any entry, as QEMU does. A program that does not maintain the
//! property clears the bit (it is an autoclear bit).

use crate::buf::{IoBuf, IoBufMut};
use crate::storage::{IoFuture, Storage, StorageRef};
use std::io;

/// An open external data file, handed to [`super::Qcow2::open`] through
/// [`super::Qcow2Options::data_file`].
#[derive(Clone)]
pub struct DataFile {
    pub storage: StorageRef,
    /// Its name, for messages and `map`.
    pub name: String,
}

impl std::fmt::Debug for DataFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DataFile({})", self.name)
    }
}

/// Stands in for a data file that was not opened (metadata-only opens): every I/O fails.
pub struct NoDataFile;

fn not_opened() -> io::Error {
    io::Error::other("the image's external data file was not opened (metadata-only open)")
}

impl Storage for NoDataFile {
    fn read_at(&self, _: IoBufMut, _: u64) -> IoFuture<'_, io::Result<IoBufMut>> {
        Box::pin(async { Err(not_opened()) })
    }
    fn write_at(&self, _: IoBuf, _: u64) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async { Err(not_opened()) })
    }
    fn flush(&self) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async { Ok(()) })
    }
    fn len(&self) -> IoFuture<'_, io::Result<u64>> {
        Box::pin(async { Err(not_opened()) })
    }
    fn set_len(&self, _: u64) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async { Err(not_opened()) })
    }
    fn write_zeroes(&self, _: u64, _: u64) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async { Err(not_opened()) })
    }
    fn discard(&self, _: u64, _: u64) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async { Err(not_opened()) })
    }
    fn allocate(&self, _: u64, _: u64) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async { Err(not_opened()) })
    }
    fn allocated_bytes(&self) -> Option<u64> {
        None
    }
}

use super::refcount::Allocation;
use super::Qcow2;
use crate::error::{Error, Result};
use crate::format::table::Mapping;
use crate::units::{GuestCluster, HostCluster, HostOffset};

/// Host places for the clusters of a request that need new ones.
pub(super) struct NewClusters {
    /// `hosts[i]`: where cluster `first + i` goes (meaningful where a new cluster was asked).
    pub hosts: Vec<HostOffset>,
    /// The refcounted extent of the image file they came from (`None` with an external data
    /// file, where a cluster's place is fixed and has no refcount).
    pub alloc: Option<Allocation>,
}

impl NewClusters {
    /// The new clusters lie past the old end of the image file and read as zeros unwritten.
    pub fn fresh(&self) -> bool {
        self.alloc.as_ref().is_some_and(|a| a.fresh)
    }
}

impl Qcow2 {
    /// Finds host places for the clusters `first + i` with `need[i]`: one contiguous extent of
    /// the image file, in order; with an external data file, each guest cluster's own place.
    /// The caller links them or returns the extent (`Refcounts::release_unlinked`).
    pub(super) async fn place_new_clusters(
        &self,
        first: GuestCluster,
        need: &[bool],
    ) -> Result<NewClusters> {
        let g = self.geo;
        if g.external_data {
            let hosts = (0..need.len() as u64)
                .map(|i| HostOffset((first.0 + i) << g.cluster_bits))
                .collect();
            return Ok(NewClusters { hosts, alloc: None });
        }
        let count = need.iter().filter(|&&n| n).count() as u64;
        let alloc = if count > 0 {
            Some(self.rc.allocate(&self.w, &self.hdr, count).await?)
        } else {
            None
        };
        let mut next = alloc.as_ref().map_or(0, |a| a.start.0);
        let hosts = need
            .iter()
            .map(|&n| {
                if !n {
                    return HostOffset(0);
                }
                next += 1;
                g.host_offset(HostCluster(next - 1))
            })
            .collect();
        Ok(NewClusters { hosts, alloc })
    }

    /// QEMU's checks of an entry of an image with an external data file: no compressed
    /// clusters, and every cluster at its guest offset. `slice` and `i` place the entry (for
    /// the message).
    pub(super) fn check_external_entry(
        &self,
        m: Mapping,
        guest: GuestCluster,
        slice: HostOffset,
        i: usize,
    ) -> Result<()> {
        let (table, index) = self.l2_position(slice, i);
        let hex = super::check::c_hex;
        match m {
            Mapping::Compressed { .. } => Err(Error::corrupt(format!(
                "Compressed cluster entry found in image with external data file (L2 offset: \
                 {}, L2 index: {})",
                hex(table),
                hex(index)
            ))),
            _ => match m.host_cluster() {
                Some(host) if host.0 != guest.0 << self.geo.cluster_bits => {
                    Err(Error::corrupt(format!(
                        "External data file host cluster offset {} does not match guest \
                         cluster offset: {}, L2 index: {})",
                        hex(host.0),
                        hex(guest.0 << self.geo.cluster_bits),
                        hex(index)
                    )))
                }
                _ => Ok(()),
            },
        }
    }

    /// Gives the external data file length `end`: exactly (`exact`, which may shorten it), or
    /// at least, with the space of what it gains allocated (`falloc`) or written (`full`),
    /// as QEMU truncates the data file with the preallocation mode.
    pub(super) async fn size_data_file(
        &self,
        end: u64,
        mode: super::Preallocation,
        exact: bool,
    ) -> Result<()> {
        use crate::error::IoContext;
        let ctx = || "Failed to resize the data file".to_string();
        let len = self.data.len().await.context(ctx)?;
        if exact && end < len {
            return self.data.set_len(end).await.context(ctx);
        }
        if end <= len {
            return Ok(());
        }
        match mode {
            super::Preallocation::Falloc => {
                self.data.allocate(len, end - len).await.context(ctx)?
            }
            super::Preallocation::Full => {
                super::create::write_zeros(&self.data, len, end - len).await?
            }
            _ => {}
        }
        self.data.set_len(end).await.context(ctx)
    }

    /// Passes a discard of data clusters down to the external data file (QEMU's discard
    /// passthrough): the space itself has no refcount to drop. Done while the clusters are
    /// still claimed: once the claim is gone, a write may place new data there at once.
    pub(super) async fn discard_external(&self, ranges: &[(HostOffset, u64)]) {
        for &(start, len) in ranges {
            if let Err(e) = self.data.discard(start.0, len).await {
                tracing::debug!("discarding {len} bytes at {start} in the data file: {e}");
            }
        }
    }
}

/// The header of the qcow2 image on `storage` if it has an external data file (`None` for any
/// other file, qcow2 or not): what an opener needs to find the data file before it opens the
/// image. Errors are left to the real open.
pub async fn header_if_data_file(storage: &dyn Storage) -> Option<crate::format::header::Header> {
    use crate::format::{be, header};
    let head = crate::storage::read_vec(storage, 0, 512).await.ok()?;
    if head[0..4] != header::MAGIC
        || be::u32(&head, 4) < 3
        || be::u64(&head, 72) & header::incompat::DATA_FILE == 0
    {
        return None;
    }
    let bits = be::u32(&head, 20);
    if !(header::MIN_CLUSTER_BITS..=header::MAX_CLUSTER_BITS).contains(&bits) {
        return None;
    }
    let cluster = crate::storage::read_vec(storage, 0, 1 << bits).await.ok()?;
    header::Header::decode(&cluster).ok()
}
