//! The persistent dirty bitmap directory (bitmaps header extension).
//!
//! The directory lists every persistent dirty bitmap of an image: its name, granularity, flags
//! and where its bitmap table lives. The table has one entry per cluster of bitmap data: 0 for a
//! cluster of zeros, 1 for a cluster of ones, or the offset of the cluster that holds the bits
//! (bit `i` of the bitmap is bit `i % 8` of byte `i / 8`). The engine keeps bitmaps in
//! `qcow2::bitmaps`; this module only encodes and decodes.

use crate::error::{Error, Result};
use crate::format::be;
use crate::units::{Geometry, HostOffset};

/// QEMU's cap on the directory size.
pub const MAX_DIRECTORY_BYTES: u64 = 1024 * 65535;
/// QEMU's cap on the number of bitmaps.
pub const MAX_BITMAPS: u32 = 65535;
/// QEMU's caps on a bitmap's table: entries, and the bytes of bitmap data they can address.
pub const MAX_TABLE_ENTRIES: u32 = 0x800_0000;
pub const MAX_PHYS_BYTES: u64 = 0x2000_0000;
/// Host offset bits of a bitmap table entry.
pub const TABLE_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// A table entry without an offset whose bit 0 is set: a cluster of ones.
pub const TABLE_ALL_ONES: u64 = 1;
/// QEMU's bounds on a bitmap's granularity (bytes of disk per bit) and its name's length.
pub const MIN_GRANULARITY_BITS: u8 = 9;
pub const MAX_GRANULARITY_BITS: u8 = 31;
pub const MAX_NAME_BYTES: usize = 1023;
/// The only bitmap type there is: dirty tracking.
pub const KIND_DIRTY_TRACKING: u8 = 1;

/// Bitmap flags.
pub mod flags {
    /// The bitmap is being changed by a program that has the image open (or crashed while it
    /// had): its content cannot be trusted.
    pub const IN_USE: u32 = 1 << 0;
    /// The bitmap tracks writes (an enabled bitmap).
    pub const AUTO: u32 = 1 << 1;
    pub const KNOWN: u32 = IN_USE | AUTO;
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapEntry {
    pub table_offset: HostOffset,
    pub table_size: u32,
    pub flags: u32,
    pub kind: u8,
    pub granularity_bits: u8,
    /// The name (not valid UTF-8 in the image: decoded lossily, see `raw_name`).
    pub name: String,
    /// The name's bytes when they are not valid UTF-8 (QEMU does not check), written back as
    /// they were.
    pub raw_name: Option<Vec<u8>>,
    /// Extra data of the entry, kept verbatim on rewrites.
    pub extra_data: Vec<u8>,
}

impl BitmapEntry {
    pub fn in_use(&self) -> bool {
        self.flags & flags::IN_USE != 0
    }

    pub fn enabled(&self) -> bool {
        self.flags & flags::AUTO != 0
    }

    /// The name as stored.
    pub fn name_bytes(&self) -> &[u8] {
        self.raw_name.as_deref().unwrap_or(self.name.as_bytes())
    }

    /// Bytes of this entry in the directory (padded to 8).
    pub fn encoded_len(&self) -> usize {
        (24 + self.extra_data.len() + self.name_bytes().len()).next_multiple_of(8)
    }
}

/// The number of bitmap table entries (clusters of bitmap data) a bitmap of `granularity_bits`
/// needs for a disk of `disk_size` bytes.
pub fn table_entries(disk_size: u64, granularity_bits: u8, g: Geometry) -> u64 {
    let bits = disk_size.div_ceil(1 << granularity_bits);
    bits.div_ceil(g.cluster_size() * 8)
}

/// Encodes a directory (the bytes the bitmaps extension points to).
pub fn encode_directory(entries: &[BitmapEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let start = out.len();
        out.resize(start + e.encoded_len(), 0);
        let b = &mut out[start..];
        be::put_u64(b, 0, e.table_offset.0);
        be::put_u32(b, 8, e.table_size);
        be::put_u32(b, 12, e.flags);
        b[16] = e.kind;
        b[17] = e.granularity_bits;
        let name = e.name_bytes();
        be::put_u16(b, 18, name.len() as u16);
        be::put_u32(b, 20, e.extra_data.len() as u32);
        b[24..24 + e.extra_data.len()].copy_from_slice(&e.extra_data);
        let n = 24 + e.extra_data.len();
        b[n..n + name.len()].copy_from_slice(name);
    }
    out
}

/// Decodes the bitmap directory (`buf` holds exactly the directory).
pub fn decode_directory(buf: &[u8], nb_bitmaps: u32, g: Geometry) -> Result<Vec<BitmapEntry>> {
    if nb_bitmaps > MAX_BITMAPS {
        return Err(Error::invalid(format!(
            "bitmaps_ext: Image has {nb_bitmaps} bitmaps, exceeding the QEMU supported maximum of {MAX_BITMAPS}"
        )));
    }
    // QEMU's messages: the directory must hold exactly the entries the extension announces.
    let broken = || Error::invalid("Broken bitmap directory");
    let mut out = Vec::new();
    let mut off = 0usize;
    for _ in 0..nb_bitmaps {
        if off == buf.len() {
            return Err(Error::invalid(
                "Less bitmaps found than specified in header extension",
            ));
        }
        if off + 24 > buf.len() {
            return Err(broken());
        }
        let e = &buf[off..];
        let table_offset = HostOffset(be::u64(e, 0));
        let table_size = be::u32(e, 8);
        let name_size = be::u16(e, 18) as usize;
        let extra = be::u32(e, 20) as usize;
        let len = (24 + extra + name_size).next_multiple_of(8);
        if off + len > buf.len() {
            return Err(broken());
        }
        let name_start = 24 + extra;
        let bytes = &e[name_start..name_start + name_size];
        let (name, raw_name) = match std::str::from_utf8(bytes) {
            Ok(n) => (n.to_string(), None),
            Err(_) => (
                String::from_utf8_lossy(bytes).into_owned(),
                Some(bytes.to_vec()),
            ),
        };
        // Checked before the table is read: its size comes from the untrusted directory.
        if !g.is_aligned(table_offset.0)
            || table_size > MAX_TABLE_ENTRIES
            || u64::from(table_size) * g.cluster_size() > MAX_PHYS_BYTES
        {
            return Err(Error::invalid(format!(
                "Bitmap '{name}' doesn't satisfy the constraints"
            )));
        }
        out.push(BitmapEntry {
            table_offset,
            table_size,
            flags: be::u32(e, 12),
            kind: e[16],
            granularity_bits: e[17],
            name,
            raw_name,
            extra_data: e[24..name_start].to_vec(),
        });
        off += len;
    }
    if off != buf.len() {
        return Err(Error::invalid(
            "More bitmaps found than specified in header extension",
        ));
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
    fn directory_round_trips() {
        let entries = vec![
            BitmapEntry {
                table_offset: HostOffset(0x30000),
                table_size: 3,
                flags: flags::AUTO,
                kind: KIND_DIRTY_TRACKING,
                granularity_bits: 16,
                name: "b0".into(),
                raw_name: None,
                extra_data: Vec::new(),
            },
            BitmapEntry {
                table_offset: HostOffset(0x40000),
                table_size: 1,
                flags: flags::IN_USE,
                kind: KIND_DIRTY_TRACKING,
                granularity_bits: 9,
                name: "a longer name".into(),
                raw_name: None,
                extra_data: vec![1, 2, 3],
            },
        ];
        let bytes = encode_directory(&entries);
        assert_eq!(bytes.len(), 32 + 40);
        assert_eq!(
            decode_directory(&bytes, 2, Geometry::new(16)).unwrap(),
            entries
        );
    }

    #[test]
    fn names_that_are_not_utf8_are_kept() {
        let mut buf = vec![0u8; 32];
        be::put_u64(&mut buf, 0, 0x50000);
        be::put_u32(&mut buf, 8, 1);
        buf[16] = 1;
        buf[17] = 16;
        be::put_u16(&mut buf, 18, 2);
        buf[24..26].copy_from_slice(&[0xff, b'x']);
        let d = decode_directory(&buf, 1, Geometry::new(16)).unwrap();
        assert_eq!(d[0].name_bytes(), &[0xff, b'x']);
        assert_eq!(encode_directory(&d), buf);
    }

    #[test]
    fn table_entries_cover_the_disk() {
        let g = Geometry::new(16);
        // 64 KiB of bitmap data covers 2^19 bits: 32 GiB at 64 KiB granularity.
        assert_eq!(table_entries(32 << 30, 16, g), 1);
        assert_eq!(table_entries((32 << 30) + 1, 16, g), 2);
        assert_eq!(table_entries(0, 16, g), 0);
        assert_eq!(table_entries(1, 9, g), 1);
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
