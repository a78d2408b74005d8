//! The in-memory header and its rewrites.
//!
//! Header changes (feature bits, table locations after growth) are rare and each is a
//! durability point, so they are written immediately: the caller syncs whatever the new header
//! points to first, and syncs after the header write when later steps depend on it. Rewrites
//! keep unknown header fields and extensions (see `format::header`).

use super::cache::Writer;
use crate::buf::IoBuf;
use crate::error::{IoContext, Result};
use crate::format::Header;
use parking_lot::Mutex;

pub struct HeaderStore {
    header: Mutex<Header>,
    /// Serializes rewrites so that two changes cannot overwrite each other on disk.
    write_lock: tokio::sync::Mutex<()>,
}

impl HeaderStore {
    pub fn new(h: Header) -> Self {
        HeaderStore {
            header: Mutex::new(h),
            write_lock: tokio::sync::Mutex::new(()),
        }
    }

    /// A copy of the current header.
    pub fn get(&self) -> Header {
        self.header.lock().clone()
    }

    /// Reads one field without copying the whole header.
    pub fn with<T>(&self, f: impl FnOnce(&Header) -> T) -> T {
        f(&self.header.lock())
    }

    /// Applies `change` and writes the header to disk (no sync).
    pub async fn update(&self, w: &Writer, change: impl FnOnce(&mut Header)) -> Result<()> {
        let _serial = self.write_lock.lock().await;
        let mut next = self.get();
        change(&mut next);
        let mut bytes = next.encode()?;
        // Whole sectors: keeps the write aligned and clears what an older, longer header left.
        let len = bytes
            .len()
            .next_multiple_of(512)
            .min(next.cluster_size() as usize);
        bytes.resize(len, 0);
        w.storage
            .write_at(IoBuf::copy_from(&bytes), 0)
            .await
            .context(|| "writing the qcow2 header".to_string())?;
        *self.header.lock() = next;
        Ok(())
    }
}
