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
            // QEMU's words, and its `%#x` (no prefix for zero).
            let index = if l1_index == 0 {
                "0".to_string()
            } else {
                format!("{l1_index:#x}")
            };
            return Err(Error::corrupt(format!(
                "L2 table offset {off:#x} unaligned (L1 index: {index})"
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
    /// Decodes an L2 entry (the first word of an extended one: there, `Zero` never results, the
    /// subcluster bitmap says what reads as zeros, see [`Subcluster`]).
    pub fn decode(raw: u64, g: Geometry) -> Result<Mapping> {
        // Bit 0 of a standard descriptor has no meaning in extended entries: QEMU ignores it,
        // and so do we. (In a compressed descriptor it is part of the byte offset.)
        let raw = if g.extended_l2 && raw & COMPRESSED == 0 {
            raw & !ZERO
        } else {
            raw
        };
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
        // Offset 0 means "no cluster", except in an external data file, where it is guest
        // cluster 0's place: the COPIED flag (every data cluster there has refcount 1) tells
        // the two apart, as QEMU decides it. A zero flag still wins.
        let host =
            (off != 0 || (g.external_data && copied && raw & ZERO == 0)).then_some(HostOffset(off));
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

/// The second word of an extended L2 entry: bit `i` says subcluster `i` is allocated (reads
/// from the cluster), bit `32 + i` that it reads as zeros; neither: it reads from the backing
/// file (or as zeros without one).
pub mod sub {
    /// Every subcluster allocated.
    pub const ALL_ALLOC: u64 = 0xffff_ffff;
    /// Every subcluster reads as zeros.
    pub const ALL_ZERO: u64 = ALL_ALLOC << 32;

    /// The allocation bits of subclusters `first..end` (at most 32).
    #[inline]
    pub const fn alloc_range(first: u32, end: u32) -> u64 {
        if end <= first {
            return 0;
        }
        let n = end - first;
        let ones = if n >= 32 { ALL_ALLOC } else { (1u64 << n) - 1 };
        (ones << first) & ALL_ALLOC
    }

    /// The zero bits of subclusters `first..end`.
    #[inline]
    pub const fn zero_range(first: u32, end: u32) -> u64 {
        alloc_range(first, end) << 32
    }
}

/// What one subcluster of an extended L2 entry is (QEMU's subcluster types).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subcluster {
    /// Reads from the cluster at this subcluster's place.
    Data,
    /// Reads as zeros; `allocated`: the entry has a host cluster (kept for it).
    Zero { allocated: bool },
    /// Reads from the backing file; `allocated`: the entry has a host cluster.
    Unallocated { allocated: bool },
    /// The entry is a compressed cluster (whole: compressed clusters have no subclusters).
    Compressed,
}

impl Subcluster {
    /// Classifies subcluster `sc` of an entry whose first word decoded to `m`. `None`: an
    /// invalid combination (an allocated subcluster without a host cluster, or one both
    /// allocated and zero), which is corruption.
    pub fn of(m: Mapping, bitmap: u64, sc: u32) -> Option<Subcluster> {
        let alloc = bitmap & (1 << sc) != 0;
        let zero = bitmap & (1 << (32 + sc)) != 0;
        Some(match m {
            Mapping::Compressed { .. } => Subcluster::Compressed,
            Mapping::Data { .. }
            | Mapping::Zero {
                prealloc: Some(_), ..
            } => {
                if (bitmap >> 32) & bitmap != 0 {
                    return None;
                }
                if zero {
                    Subcluster::Zero { allocated: true }
                } else if alloc {
                    Subcluster::Data
                } else {
                    Subcluster::Unallocated { allocated: true }
                }
            }
            Mapping::Unallocated | Mapping::Zero { prealloc: None, .. } => {
                if bitmap & sub::ALL_ALLOC != 0 {
                    return None;
                }
                if zero {
                    Subcluster::Zero { allocated: false }
                } else {
                    Subcluster::Unallocated { allocated: false }
                }
            }
        })
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
    fn subclusters_follow_the_spec() {
        let g = Geometry::with_l2(16, true);
        let data = Mapping::decode(0x8000_0000_0005_0000 | ZERO, g).unwrap();
        assert_eq!(
            data,
            Mapping::Data {
                host: HostOffset(0x5_0000),
                copied: true
            },
            "bit 0 is ignored"
        );
        let bm = sub::alloc_range(0, 2) | sub::zero_range(5, 6);
        assert_eq!(Subcluster::of(data, bm, 1), Some(Subcluster::Data));
        assert_eq!(
            Subcluster::of(data, bm, 5),
            Some(Subcluster::Zero { allocated: true })
        );
        assert_eq!(
            Subcluster::of(data, bm, 9),
            Some(Subcluster::Unallocated { allocated: true })
        );
        assert_eq!(
            Subcluster::of(data, 1 | (1 << 32), 9),
            None,
            "alloc and zero"
        );
        let none = Mapping::decode(0, g).unwrap();
        assert_eq!(Subcluster::of(none, 1 << 3, 0), None, "alloc without host");
        assert_eq!(
            Subcluster::of(none, sub::ALL_ZERO, 31),
            Some(Subcluster::Zero { allocated: false })
        );
        assert_eq!(sub::alloc_range(0, 32), sub::ALL_ALLOC);
        assert_eq!(sub::alloc_range(31, 32), 1 << 31);
        assert_eq!(sub::alloc_range(3, 3), 0);
        assert_eq!(
            Mapping::decode(COMPRESSED | 0x5_0001, g).unwrap(),
            Mapping::Compressed {
                host: HostOffset(0x5_0001),
                sectors: 1
            },
            "an odd compressed offset keeps its bit 0"
        );
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
