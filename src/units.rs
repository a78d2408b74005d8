//! Typed offsets and cluster indices.
//!
//! A qcow2 driver juggles two address spaces (the guest's virtual disk and the host image file)
//! and two units (bytes and clusters). Mixing them up is the classic qcow2 bug, so each gets its
//! own type: converting between them needs the cluster geometry and is spelled out at the call
//! site. Plain `u64` is used only for lengths.

use std::fmt;

macro_rules! offset_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub u64);

        impl $name {
            /// The raw number.
            #[inline]
            pub const fn get(self) -> u64 {
                self.0
            }

            /// `self + len`, or `None` on overflow.
            #[inline]
            pub fn checked_add(self, len: u64) -> Option<Self> {
                self.0.checked_add(len).map(Self)
            }
        }

        impl std::ops::Add<u64> for $name {
            type Output = Self;
            #[inline]
            fn add(self, rhs: u64) -> Self {
                Self(self.0 + rhs)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
    };
}

offset_type!(
    /// Byte offset in the guest's view of the disk.
    GuestOffset
);
offset_type!(
    /// Byte offset in the image file.
    HostOffset
);
offset_type!(
    /// Index of a cluster in the guest's view of the disk (guest offset / cluster size).
    GuestCluster
);
offset_type!(
    /// Index of a cluster in the image file (host offset / cluster size).
    HostCluster
);

/// The cluster geometry of an image: the one place where bytes and clusters are converted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// log2 of the cluster size (9..=21).
    pub cluster_bits: u32,
    /// Extended L2 entries (incompatible feature bit 4): 16-byte L2 entries whose second word
    /// describes 32 subclusters.
    pub extended_l2: bool,
    /// Guest data lives in an external data file (incompatible feature bit 2), at host offset
    /// == guest offset. An L2 entry with offset 0 and the COPIED flag then maps guest cluster 0
    /// (offset 0 is a valid data offset there, not "unallocated").
    pub external_data: bool,
}

/// Subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS: u64 = 32;

impl Geometry {
    /// Standard L2 entries.
    pub const fn new(cluster_bits: u32) -> Self {
        Self {
            cluster_bits,
            extended_l2: false,
            external_data: false,
        }
    }

    /// Standard or extended L2 entries.
    pub const fn with_l2(cluster_bits: u32, extended_l2: bool) -> Self {
        Self {
            cluster_bits,
            extended_l2,
            external_data: false,
        }
    }

    /// The same geometry, with guest data in an external data file or not.
    pub const fn with_external_data(self, external_data: bool) -> Self {
        Self {
            external_data,
            ..self
        }
    }

    /// Bytes per L2 entry: 8, or 16 with extended L2 entries.
    #[inline]
    pub const fn l2_entry_size(self) -> u64 {
        if self.extended_l2 {
            16
        } else {
            8
        }
    }

    /// log2 of the unit of allocation state: the subcluster size with extended L2 entries,
    /// the cluster size otherwise.
    #[inline]
    pub const fn subcluster_bits(self) -> u32 {
        if self.extended_l2 {
            self.cluster_bits - 5
        } else {
            self.cluster_bits
        }
    }

    #[inline]
    pub const fn subcluster_size(self) -> u64 {
        1u64 << self.subcluster_bits()
    }

    #[inline]
    pub const fn cluster_size(self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// Number of entries in an L2 table.
    #[inline]
    pub const fn l2_entries(self) -> u64 {
        self.cluster_size() / self.l2_entry_size()
    }

    #[inline]
    pub const fn l2_bits(self) -> u32 {
        if self.extended_l2 {
            self.cluster_bits - 4
        } else {
            self.cluster_bits - 3
        }
    }

    #[inline]
    pub fn guest_cluster(self, off: GuestOffset) -> GuestCluster {
        GuestCluster(off.0 >> self.cluster_bits)
    }

    #[inline]
    pub fn host_cluster(self, off: HostOffset) -> HostCluster {
        HostCluster(off.0 >> self.cluster_bits)
    }

    #[inline]
    pub fn guest_offset(self, c: GuestCluster) -> GuestOffset {
        GuestOffset(c.0 << self.cluster_bits)
    }

    #[inline]
    pub fn host_offset(self, c: HostCluster) -> HostOffset {
        HostOffset(c.0 << self.cluster_bits)
    }

    /// Offset of `off` inside its cluster.
    #[inline]
    pub fn in_cluster(self, off: u64) -> u64 {
        off & (self.cluster_size() - 1)
    }

    #[inline]
    pub fn is_aligned(self, off: u64) -> bool {
        self.in_cluster(off) == 0
    }

    /// Number of clusters needed to hold `bytes` (rounded up).
    #[inline]
    pub fn clusters_for(self, bytes: u64) -> u64 {
        bytes.div_ceil(self.cluster_size())
    }

    /// Index into the L1 table of a guest cluster.
    #[inline]
    pub fn l1_index(self, c: GuestCluster) -> u64 {
        c.0 >> self.l2_bits()
    }

    /// Index into its L2 table of a guest cluster.
    #[inline]
    pub fn l2_index(self, c: GuestCluster) -> usize {
        (c.0 & (self.l2_entries() - 1)) as usize
    }

    /// Number of L1 entries needed for a disk of `size` bytes.
    pub fn l1_entries_for(self, size: u64) -> u64 {
        self.clusters_for(size).div_ceil(self.l2_entries())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_conversions() {
        let g = Geometry::new(16);
        assert_eq!(g.cluster_size(), 65536);
        assert_eq!(g.l2_entries(), 8192);
        assert_eq!(g.guest_cluster(GuestOffset(65536 * 3 + 5)), GuestCluster(3));
        assert_eq!(g.l1_index(GuestCluster(8192 * 2 + 1)), 2);
        assert_eq!(g.l2_index(GuestCluster(8192 * 2 + 1)), 1);
        assert_eq!(g.l1_entries_for(1 << 30), 2);
        assert_eq!(g.l1_entries_for((1 << 30) + 1), 3);
        assert_eq!(g.l1_entries_for(0), 0);
        assert_eq!(g.clusters_for(65537), 2);
        let small = Geometry::new(9);
        assert_eq!(small.l2_entries(), 64);
        assert_eq!(small.in_cluster(1000), 1000 - 512);
        let ext = Geometry::with_l2(17, true);
        assert_eq!(ext.l2_entries(), 8192);
        assert_eq!(ext.subcluster_size(), 4096);
        assert_eq!(ext.l1_index(GuestCluster(8192 * 3)), 3);
        assert_eq!(ext.l1_entries_for(1 << 30), 1);
        assert_eq!(Geometry::new(16).subcluster_size(), 65536);
    }
}
