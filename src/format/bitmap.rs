//! The persistent dirty bitmap directory (bitmaps header extension).
//!
//! qimg does not use bitmaps yet, but their clusters are referenced and must be counted when
//! checking or rebuilding refcounts, or an image with bitmaps would look leaky.

use crate::error::{Error, Result};
use crate::format::be;
use crate::units::{Geometry, HostOffset};

/// QEMU's cap on the directory size.
pub const MAX_DIRECTORY_BYTES: u64 = 64 << 10 << 10;
/// QEMU's cap on the number of bitmaps.
pub const MAX_BITMAPS: u32 = 65535;
/// QEMU's caps on a bitmap's table: entries, and the bytes of bitmap data they can address.
pub const MAX_TABLE_ENTRIES: u32 = 0x800_0000;
pub const MAX_PHYS_BYTES: u64 = 0x2000_0000;
/// Host offset bits of a bitmap table entry.
pub const TABLE_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapEntry {
    pub table_offset: HostOffset,
    pub table_size: u32,
    pub flags: u32,
    pub kind: u8,
    pub granularity_bits: u8,
    pub name: String,
}

/// Decodes the bitmap directory (`buf` holds exactly the directory).
pub fn decode_directory(buf: &[u8], nb_bitmaps: u32, g: Geometry) -> Result<Vec<BitmapEntry>> {
    if nb_bitmaps > MAX_BITMAPS {
        return Err(Error::invalid("Too many bitmaps in the bitmaps extension"));
    }
    let mut out = Vec::new();
    let mut off = 0usize;
    for _ in 0..nb_bitmaps {
        if off + 24 > buf.len() {
            return Err(Error::invalid("Bitmap directory is truncated"));
        }
        let e = &buf[off..];
        let table_offset = HostOffset(be::u64(e, 0));
        let table_size = be::u32(e, 8);
        let name_size = be::u16(e, 18) as usize;
        let extra = be::u32(e, 20) as usize;
        let len = (24 + extra + name_size).next_multiple_of(8);
        if off + 24 + extra + name_size > buf.len() {
            return Err(Error::invalid(
                "Bitmap directory entry exceeds the directory",
            ));
        }
        if !g.is_aligned(table_offset.0) {
            return Err(Error::invalid("Bitmap table offset is not cluster aligned"));
        }
        // Checked before the table is read: its size comes from the untrusted directory.
        if table_size > MAX_TABLE_ENTRIES
            || u64::from(table_size) * g.cluster_size() > MAX_PHYS_BYTES
        {
            return Err(Error::invalid("Bitmap table is too large"));
        }
        let name_start = 24 + extra;
        out.push(BitmapEntry {
            table_offset,
            table_size,
            flags: be::u32(e, 12),
            kind: e[16],
            granularity_bits: e[17],
            name: String::from_utf8_lossy(&e[name_start..name_start + name_size]).into_owned(),
        });
        off += len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_tables_larger_than_qemu_allows() {
        let mut buf = vec![0u8; 32];
        be::put_u64(&mut buf, 0, 0x50000);
        buf[16] = 1;
        buf[17] = 16;
        be::put_u16(&mut buf, 18, 2);
        buf[24..26].copy_from_slice(b"b0");
        // 512 MiB of bitmap data addressed with 64 KiB clusters is the limit.
        be::put_u32(&mut buf, 8, 8192);
        assert!(decode_directory(&buf, 1, Geometry::new(16)).is_ok());
        be::put_u32(&mut buf, 8, 8193);
        assert!(decode_directory(&buf, 1, Geometry::new(16)).is_err());
        be::put_u32(&mut buf, 8, u32::MAX);
        assert!(decode_directory(&buf, 1, Geometry::new(9)).is_err());
    }

    #[test]
    fn decodes_entry_and_rejects_truncation() {
        let mut buf = vec![0u8; 32];
        be::put_u64(&mut buf, 0, 0x50000);
        be::put_u32(&mut buf, 8, 1);
        buf[16] = 1;
        buf[17] = 16;
        be::put_u16(&mut buf, 18, 2);
        buf[24..26].copy_from_slice(b"b0");
        let d = decode_directory(&buf, 1, Geometry::new(16)).unwrap();
        assert_eq!(d[0].name, "b0");
        assert_eq!(d[0].table_offset, HostOffset(0x50000));
        assert!(decode_directory(&buf[..20], 1, Geometry::new(16)).is_err());
        assert!(decode_directory(&buf, 2, Geometry::new(16)).is_err());
    }
}
