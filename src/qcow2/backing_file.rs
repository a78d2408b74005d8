//! Changing which backing file an image names (`rebase`).
//!
//! The header is the last thing `rebase` changes: the clusters that make the image read the
//! same over its new backing file are written first, and they must be durable before the
//! header names the new file. Otherwise a crash between the two could leave a header that
//! points at the new backing file while the copied clusters are lost with the page cache, and
//! the guest would read the new file's data where it had its old one.

use super::Qcow2;
use crate::error::{Error, Result};
use crate::format::header::MAX_BACKING_NAME;

impl Qcow2 {
    /// Makes the image name `file` (with format `format`) as its backing file, or no backing
    /// file at all. Flushes everything written before, then writes and syncs the header.
    ///
    /// Only the header changes: this handle keeps reading through the backing device it was
    /// opened with (reopen the image to read through the new one).
    pub async fn change_backing_file(
        &self,
        file: Option<&str>,
        format: Option<&str>,
    ) -> Result<()> {
        self.check_writable()?;
        if file.is_some() && self.hdr.with(|h| h.data_file_raw()) {
            // The raw data file must read as the whole disk: nothing may show through from
            // below (QEMU: EINVAL).
            return Err(Error::io(
                "an image whose data file is raw (data_file_raw) cannot have a backing file",
                std::io::Error::from_raw_os_error(22),
            ));
        }
        if let Some(name) = file {
            if name.len() > MAX_BACKING_NAME as usize {
                return Err(Error::arg(format!(
                    "Backing file name too long ({} bytes, at most {MAX_BACKING_NAME})",
                    name.len()
                )));
            }
        }
        if format.is_some_and(|f| f.len() >= 16) {
            return Err(Error::arg("Backing file format name too long"));
        }
        // What was copied for the new backing file becomes durable before the header names it.
        self.flush().await?;
        // Encodes before writing: a header that would not fit in its cluster is refused here,
        // with the image unchanged.
        let mut next = self.hdr.get();
        next.backing_file = file.map(str::to_string);
        next.set_backing_format(file.and(format));
        next.encode()?;
        self.hdr
            .update(&self.w, |h| {
                h.backing_file = next.backing_file.clone();
                h.set_backing_format(file.and(format));
            })
            .await?;
        self.w.barrier.sync_now().await
    }
}
