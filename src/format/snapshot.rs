//! The internal snapshot table.
//!
//! The table has no length field: its size is only known by walking the entries, so decoding
//! tells the caller how many bytes it needs when the buffer is too short. QEMU's caps (65536
//! snapshots, a 64 MiB table, 1 KiB of extra data per entry) bound what an untrusted image can
//! make us read.

use crate::error::{Error, Result};
use crate::format::be;
use crate::format::header::MAX_SNAPSHOTS;
use crate::units::{Geometry, HostOffset};

/// QEMU's cap on the snapshot table size.
pub const MAX_TABLE_BYTES: u64 = 64 << 20;
/// QEMU's cap on per-entry extra data.
pub const MAX_EXTRA_DATA: u32 = 1024;
const FIXED_LEN: usize = 40;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub l1_table_offset: HostOffset,
    pub l1_size: u32,
    pub id: String,
    pub name: String,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    /// VM state size (from the 64-bit extra field when present).
    pub vm_state_size: u64,
    /// Virtual disk size when the snapshot was taken, if recorded.
    pub disk_size: Option<u64>,
    pub icount: Option<u64>,
    /// The raw extra data, preserved on rewrite.
    pub extra_data: Vec<u8>,
}

/// Result of decoding: either the table, or how many bytes from the table start are needed.
#[derive(Debug)]
pub enum Decoded {
    Complete(Vec<Snapshot>),
    NeedBytes(usize),
}

/// Decodes `count` entries from `buf` (the table start). Errors on invalid entries.
pub fn decode_table(buf: &[u8], count: u32, _g: Geometry) -> Result<Decoded> {
    if count > MAX_SNAPSHOTS {
        return Err(Error::invalid("Too many snapshots"));
    }
    let mut snaps = Vec::with_capacity(count.min(1024) as usize);
    let mut off = 0usize;
    for i in 0..count {
        off = off.next_multiple_of(8);
        if off + FIXED_LEN > buf.len() {
            return need(off + FIXED_LEN);
        }
        let e = &buf[off..];
        let l1_table_offset = HostOffset(be::u64(e, 0));
        let l1_size = be::u32(e, 8);
        let id_len = be::u16(e, 12) as usize;
        let name_len = be::u16(e, 14) as usize;
        let extra_len = be::u32(e, 36);
        if extra_len > MAX_EXTRA_DATA {
            return Err(Error::invalid(format!(
                "Too much extra metadata in snapshot table entry {i}"
            )));
        }
        let total = FIXED_LEN + extra_len as usize + id_len + name_len;
        if (off + total) as u64 > MAX_TABLE_BYTES {
            return Err(Error::invalid("Snapshot table is too big"));
        }
        if off + total > buf.len() {
            return need(off + total);
        }
        // The L1 offset and size are not validated here: check reports bad ones as corruption
        // of that snapshot (as QEMU does), and nothing else uses snapshot tables yet.
        let extra = &e[FIXED_LEN..FIXED_LEN + extra_len as usize];
        let mut vm_state_size = u64::from(be::u32(e, 32));
        if extra.len() >= 8 {
            vm_state_size = be::u64(extra, 0);
        }
        let disk_size = (extra.len() >= 16).then(|| be::u64(extra, 8));
        let icount = (extra.len() >= 24).then(|| be::u64(extra, 16));
        let id_start = FIXED_LEN + extra_len as usize;
        let id = String::from_utf8_lossy(&e[id_start..id_start + id_len]).into_owned();
        let name = String::from_utf8_lossy(&e[id_start + id_len..id_start + id_len + name_len])
            .into_owned();
        snaps.push(Snapshot {
            l1_table_offset,
            l1_size,
            id,
            name,
            date_sec: be::u32(e, 16),
            date_nsec: be::u32(e, 20),
            vm_clock_nsec: be::u64(e, 24),
            vm_state_size,
            disk_size,
            icount,
            extra_data: extra.to_vec(),
        });
        off += total;
    }
    Ok(Decoded::Complete(snaps))
}

fn need(n: usize) -> Result<Decoded> {
    Ok(Decoded::NeedBytes(n))
}

/// Encodes a snapshot table (entries 8-byte aligned).
pub fn encode_table(snaps: &[Snapshot]) -> Vec<u8> {
    let mut out = Vec::new();
    for s in snaps {
        let start = out.len();
        out.resize(start + FIXED_LEN, 0);
        let e = &mut out[start..];
        be::put_u64(e, 0, s.l1_table_offset.0);
        be::put_u32(e, 8, s.l1_size);
        be::put_u16(e, 12, s.id.len() as u16);
        be::put_u16(e, 14, s.name.len() as u16);
        be::put_u32(e, 16, s.date_sec);
        be::put_u32(e, 20, s.date_nsec);
        be::put_u64(e, 24, s.vm_clock_nsec);
        be::put_u32(e, 32, s.vm_state_size.min(u64::from(u32::MAX)) as u32);
        be::put_u32(e, 36, s.extra_data.len() as u32);
        out.extend_from_slice(&s.extra_data);
        out.extend_from_slice(s.id.as_bytes());
        out.extend_from_slice(s.name.as_bytes());
        out.resize(out.len().next_multiple_of(8), 0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(i: u32) -> Snapshot {
        let mut extra = vec![0u8; 24];
        be::put_u64(&mut extra, 0, 0);
        be::put_u64(&mut extra, 8, 1 << 30);
        be::put_u64(&mut extra, 16, u64::MAX);
        Snapshot {
            l1_table_offset: HostOffset(0x10000 * u64::from(i + 5)),
            l1_size: 2,
            id: (i + 1).to_string(),
            name: format!("snap{i}"),
            date_sec: 1000 + i,
            date_nsec: 5,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: Some(1 << 30),
            icount: Some(u64::MAX),
            extra_data: extra,
        }
    }

    #[test]
    fn round_trip_and_incremental() {
        let g = Geometry::new(16);
        let snaps: Vec<_> = (0..5).map(snap).collect();
        let buf = encode_table(&snaps);
        match decode_table(&buf, 5, g).unwrap() {
            Decoded::Complete(d) => assert_eq!(d, snaps),
            Decoded::NeedBytes(_) => panic!("complete buffer"),
        }
        // Growing the buffer as asked converges.
        let mut have = 8;
        loop {
            match decode_table(&buf[..have.min(buf.len())], 5, g).unwrap() {
                Decoded::Complete(d) => {
                    assert_eq!(d, snaps);
                    break;
                }
                Decoded::NeedBytes(n) => {
                    assert!(n > have && n <= buf.len());
                    have = n;
                }
            }
        }
    }

    #[test]
    fn rejects_bad_entries() {
        let g = Geometry::new(16);
        let mut buf = encode_table(&[snap(0)]);
        be::put_u32(&mut buf, 36, 5000);
        assert!(decode_table(&buf, 1, g).is_err());
        assert!(decode_table(&buf, 70000, g).is_err());
    }

    #[test]
    fn garbage_never_panics() {
        let g = Geometry::new(9);
        let mut x = 7u64;
        for _ in 0..3000 {
            let mut buf = vec![0u8; 256];
            for b in buf.iter_mut() {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                *b = (x >> 56) as u8;
            }
            let _ = decode_table(&buf, 3, g);
        }
    }
}
