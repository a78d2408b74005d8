//! The VM state area: where a virtual machine's saved RAM and device state live in a qcow2
//! image, next to its disk.
//!
//! The format has no structure of its own for it. The guest address space simply goes on past
//! the disk: the VM state starts at the first offset that no L1 entry of the disk covers (the
//! virtual size rounded up to what one L2 table maps) and is mapped by further L1 entries, like
//! the disk. So it is allocated, copied on write, counted by refcounts, checked and snapshotted
//! exactly as guest data is: an internal snapshot copies the whole L1 table, VM state included,
//! and reverting to it brings that state back. This is QEMU's layout, and images written by
//! either program read the same in the other.
//!
//! Writing past the L1 table grows it (QEMU's growth steps, by half again each time, so a saved
//! state written in many pieces does not copy the table each time). Reading where nothing was
//! written gives zeros (or the backing file's data there, as QEMU reads it). Dirty bitmaps do
//! not track the VM state: it is not part of the disk. Resizing the disk moves the area (as in
//! QEMU), so state written before a resize is not found after it.

use super::Qcow2;
use crate::buf::{IoBuf, IoBufMut};
use crate::error::{Error, Result};
use crate::format::header::MAX_L1_BYTES;

impl Qcow2 {
    /// Where the VM state area starts in the guest address space: the disk's size rounded up
    /// to the range one L2 table maps.
    pub fn vm_state_offset(&self) -> u64 {
        let g = self.geo;
        g.l1_entries_for(self.virtual_size()) * g.l2_entries() * g.cluster_size()
    }

    /// Reads `buf.len()` bytes of the VM state at `pos`.
    pub async fn read_vm_state(&self, pos: u64, buf: IoBufMut) -> Result<IoBufMut> {
        let offset = self.vm_state_range(pos, buf.len() as u64)?;
        self.read_unchecked(offset, buf).await
    }

    /// Writes `data` into the VM state at `pos`, growing the L1 table as needed.
    pub async fn write_vm_state(&self, pos: u64, data: IoBuf) -> Result<()> {
        self.check_writable()?;
        let offset = self.vm_state_range(pos, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let g = self.geo;
        let needed = g.l1_entries_for(offset + data.len() as u64);
        if needed > self.l1.size() {
            let _exclusive = self.resize_lock.write().await;
            self.check_open()?;
            let have = self.l1.size();
            if needed > have {
                self.grow_l1(l1_growth(have, needed)?).await?;
            }
        }
        self.write_unchecked(offset, data).await
    }

    /// The guest offset of `[pos, pos + len)` of the VM state (which must end within what a
    /// signed 64-bit offset reaches, as QEMU requires of any request). Reads past what the L1
    /// table maps give zeros; writes there are refused when growing it cannot reach them.
    fn vm_state_range(&self, pos: u64, len: u64) -> Result<u64> {
        let offset = self.vm_state_offset();
        match offset.checked_add(pos).and_then(|o| o.checked_add(len)) {
            Some(end) if end <= i64::MAX as u64 => Ok(offset + pos),
            _ => Err(Error::OutOfRange {
                offset: pos,
                len,
                size: i64::MAX as u64 - offset,
            }),
        }
    }
}

/// QEMU's L1 growth: from `have` entries, by half again (rounded up) until `needed` fit;
/// refused where that passes the largest L1 table (as QEMU refuses, even when `needed` alone
/// would fit).
fn l1_growth(have: u64, needed: u64) -> Result<u64> {
    let too_large = |size: u64| {
        Error::TooLarge(format!(
            "growing the L1 table to {size} entries passes its largest size"
        ))
    };
    if needed * 8 > MAX_L1_BYTES {
        return Err(too_large(needed));
    }
    let mut size = have.max(1);
    while size < needed {
        size = (size * 3).div_ceil(2);
    }
    if size * 8 > MAX_L1_BYTES {
        return Err(too_large(size));
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::l1_growth;

    #[test]
    fn growth_steps_like_qemu() {
        assert_eq!(l1_growth(1, 2).unwrap(), 2);
        assert_eq!(l1_growth(1, 3).unwrap(), 3);
        assert_eq!(l1_growth(0, 1).unwrap(), 1);
        // 1 → 2 → 3 → 5 → 8 → 12 → 18 → 27 → 41 → 62 → 93
        assert_eq!(l1_growth(1, 50).unwrap(), 62);
        assert_eq!(l1_growth(100, 101).unwrap(), 150);
        assert!(l1_growth(4 << 20, (4 << 20) + 1).is_err());
    }
}
