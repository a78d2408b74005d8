//! L1 and L2 table entries, decoded once into a [`Mapping`] that every path matches on.
//!
//! Offsets read from tables are untrusted: a misaligned L2 table or data cluster offset is
//! reported as corruption, never used.

use crate::error::{Error, Result};
use crate::units::{Geometry, HostOffset};

/// Bit 63 of L1 and standard L2 entries: the referenced cluster has refcount exactly 1.
pub const COPIED: u64 = 1 << 63;
/// Bit 62 of L2 entries: compressed cluster descriptor.
pub const COMPRESSED: u64 = 1 << 62;
/// Bit 0 of standard L2 entries: the cluster reads as zeros.
pub const ZERO: u64 = 1;
/// Host offset bits (9..55) of L1 entries and standard L2 entries.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bits of an L1 entry that must be zero.
pub const L1_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
/// Bits of a standard L2 entry that must be zero.
pub const L2_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// Compressed data is counted in 512-byte sectors.
pub const COMPRESSED_SECTOR: u64 = 512;

/// A decoded L1 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L1Entry(pub u64);

impl L1Entry {
    pub const UNALLOCATED: L1Entry = L1Entry(0);

    pub fn new(l2_offset: HostOffset, copied: bool) -> Self {
        L1Entry(l2_offset.0 | if copied { COPIED } else { 0 })
    }

    /// The L2 table offset, `None` if no table is allocated. Errors on a misaligned offset.
    pub fn l2_offset(self, g: Geometry, l1_index: u64) -> Result<Option<HostOffset>> {
        let off = self.0 & OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        if !g.is_aligned(off) {
            return Err(Error::corrupt(format!(
                "L2 table offset {off:#x} unaligned (L1 index: {l1_index:#x})"
            )));
        }
        Ok(Some(HostOffset(off)))
    }

    pub fn copied(self) -> bool {
        self.0 & COPIED != 0
    }

    pub fn reserved_bits(self) -> u64 {
        self.0 & L1_RESERVED_MASK
    }
}

/// What a guest cluster maps to, decoded from its L2 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// Reads from the backing file, or zeros without one.
    Unallocated,
    /// Reads as zeros. `prealloc` is a host cluster kept allocated for it (with its COPIED bit).
    Zero {
        prealloc: Option<HostOffset>,
        copied: bool,
    },
    /// A normal data cluster.
    Data { host: HostOffset, copied: bool },
    /// A compressed cluster: `host` is a byte offset (not aligned), `sectors` the number of
    /// 512-byte sectors (counting the one containing `host`) the data may span.
    Compressed { host: HostOffset, sectors: u64 },
}

impl Mapping {
    /// Decodes an L2 entry. `l2_index`/`guest` are for error messages only.
    pub fn decode(raw: u64, g: Geometry) -> Result<Mapping> {
        if raw & COMPRESSED != 0 {
            let shift = compressed_shift(g);
            let host = raw & ((1u64 << shift) - 1);
            let extra = (raw >> shift) & ((1u64 << (g.cluster_bits - 8)) - 1);
            return Ok(Mapping::Compressed {
                host: HostOffset(host),
                sectors: extra + 1,
            });
        }
        let copied = raw & COPIED != 0;
        let off = raw & OFFSET_MASK;
        if off != 0 && !g.is_aligned(off) {
            return Err(Error::corrupt(format!(
                "Cluster allocation offset {off:#x} unaligned (L2 entry {raw:#x})"
            )));
        }
        let host = (off != 0).then_some(HostOffset(off));
        if raw & ZERO != 0 {
            return Ok(Mapping::Zero {
                prealloc: host,
                copied,
            });
        }
        Ok(match host {
            None => Mapping::Unallocated,
            Some(host) => Mapping::Data { host, copied },
        })
    }

    /// Encodes the mapping as an L2 entry. Compressed `sectors` must be >= 1.
    pub fn encode(self, g: Geometry) -> u64 {
        match self {
            Mapping::Unallocated => 0,
            Mapping::Zero { prealloc, copied } => {
                ZERO | prealloc.map_or(0, |h| h.0) | if copied { COPIED } else { 0 }
            }
            Mapping::Data { host, copied } => host.0 | if copied { COPIED } else { 0 },
            Mapping::Compressed { host, sectors } => {
                let shift = compressed_shift(g);
                COMPRESSED | host.0 | ((sectors - 1) << shift)
            }
        }
    }

    /// The host cluster this mapping keeps allocated (data or preallocated zero), if any.
    pub fn host_cluster(self) -> Option<HostOffset> {
        match self {
            Mapping::Data { host, .. } => Some(host),
            Mapping::Zero { prealloc, .. } => prealloc,
            _ => None,
        }
    }

    /// Whether the guest reads zeros here without consulting a backing file.
    pub fn is_zero(self) -> bool {
        matches!(self, Mapping::Zero { .. })
    }
}

/// Bit position where the compressed sector count starts.
pub fn compressed_shift(g: Geometry) -> u32 {
    62 - (g.cluster_bits - 8)
}

/// Largest host byte offset a compressed descriptor can hold.
pub fn max_compressed_offset(g: Geometry) -> u64 {
    (1u64 << compressed_shift(g)) - 1
}

/// The host byte range a compressed cluster's data may occupy: `[start, start + len)`.
/// Every host cluster this range touches carries one reference for this compressed cluster.
pub fn compressed_range(host: HostOffset, sectors: u64) -> (HostOffset, u64) {
    let end = (host.0 & !(COMPRESSED_SECTOR - 1)) + sectors * COMPRESSED_SECTOR;
    (host, end - host.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for bits in 9..=21 {
            let g = Geometry::new(bits);
            let cs = g.cluster_size();
            let cases = [
                Mapping::Unallocated,
                Mapping::Zero {
                    prealloc: None,
                    copied: false,
                },
                Mapping::Zero {
                    prealloc: Some(HostOffset(cs * 7)),
                    copied: true,
                },
                Mapping::Data {
                    host: HostOffset(cs * 3),
                    copied: true,
                },
                Mapping::Data {
                    host: HostOffset(cs * 3),
                    copied: false,
                },
                Mapping::Compressed {
                    host: HostOffset(12345),
                    sectors: 1,
                },
                Mapping::Compressed {
                    host: HostOffset(cs * 9 + 17),
                    sectors: (cs / 512) + 1,
                },
            ];
            for m in cases {
                assert_eq!(Mapping::decode(m.encode(g), g).unwrap(), m, "bits {bits}");
            }
        }
    }

    #[test]
    fn misaligned_offsets_are_corruption() {
        let g = Geometry::new(16);
        assert!(Mapping::decode(0x10200, g).is_err());
        assert!(L1Entry(0x10200).l2_offset(g, 0).is_err());
        assert_eq!(
            L1Entry(0x8000_0000_0003_0000).l2_offset(g, 0).unwrap(),
            Some(HostOffset(0x30000))
        );
    }

    #[test]
    fn compressed_descriptor_matches_spec() {
        // 64 KiB clusters: x = 62 - 8 = 54; sectors field is bits 54..61.
        let g = Geometry::new(16);
        let raw = COMPRESSED | (3u64 << 54) | 0x5_0123;
        assert_eq!(
            Mapping::decode(raw, g).unwrap(),
            Mapping::Compressed {
                host: HostOffset(0x5_0123),
                sectors: 4
            }
        );
        let (start, len) = compressed_range(HostOffset(0x5_0123), 4);
        assert_eq!(start.0, 0x5_0123);
        assert_eq!(start.0 + len, 0x5_0000 + 4 * 512);
    }

    #[test]
    fn decode_never_panics() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for bits in 9..=21 {
            for _ in 0..5000 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let _ = Mapping::decode(x, Geometry::new(bits));
                let _ = L1Entry(x).l2_offset(Geometry::new(bits), 0);
            }
        }
    }
}
