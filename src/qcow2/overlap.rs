//! Metadata overlap checks: no write may land on the image's own metadata.
//!
//! An image from elsewhere can be hostile or damaged: an L2 entry may point a guest cluster at the
//! L1 table, the refcount table or an L2 table, and a guest write there would then overwrite the
//! image's own structures — from there on it can redirect reads anywhere in the file. Refcounts do
//! not prevent this (they are just as untrusted). So, as QEMU's `overlap-check` does, every data
//! write and every metadata write is checked against where the metadata lives; a write that would
//! overlap it is refused, the image is marked corrupt, and the error names the offset.
//!
//! Where metadata lives is kept in a [`MetadataMap`]: a few fixed ranges (the header, the active
//! L1 table, the refcount table, the snapshot table and each snapshot's L1 table) and one bit per
//! host cluster for the tables there can be many of (L2 tables of the active L1, refcount blocks).
//! It is built at open from tables already in memory (the L1 table, the refcount table, the
//! snapshot list), so it covers every active L2 table — more than QEMU's default `cached` mode,
//! which knows only the L2 tables in its cache — without reading anything. Metadata allocated
//! later is marked where it is allocated; a cluster leaves the map when its refcount drops to zero
//! (metadata always has a reference, so a free cluster is never metadata, and a stale mark can
//! never refuse a write to a cluster reused for data).
//!
//! A cluster that two structures claim at open (two L1 entries naming one L2 table, an L2 table
//! that is also a refcount block) is recorded as a conflict: any metadata write there is refused.
//!
//! Cost: a data write takes a read lock and tests one bit per cluster it touches plus a handful of
//! ranges; metadata writes do the same. Nothing is read from disk.

use parking_lot::RwLock;
use std::collections::HashSet;

/// What a fixed range holds (named in errors as QEMU names them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fixed {
    Header,
    ActiveL1,
    RefcountTable,
    SnapshotTable,
    InactiveL1,
}

impl Fixed {
    fn name(self) -> &'static str {
        match self {
            Fixed::Header => "qcow2_header",
            Fixed::ActiveL1 => "active L1 table",
            Fixed::RefcountTable => "refcount table",
            Fixed::SnapshotTable => "snapshot table",
            Fixed::InactiveL1 => "inactive L1 table",
        }
    }
}

/// Which checks run (QEMU's `overlap-check` option).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OverlapCheck {
    None,
    /// QEMU's `constant` and `cached` (the default): both are covered by what is checked here.
    #[default]
    Cached,
}

impl OverlapCheck {
    pub fn parse(s: &str) -> crate::Result<OverlapCheck> {
        match s {
            "none" => Ok(OverlapCheck::None),
            "constant" | "cached" => Ok(OverlapCheck::Cached),
            "all" => Err(crate::Error::unsupported(
                "overlap-check=all is not supported (inactive L2 tables are not checked); use \
                 'cached', which checks every active L2 table",
            )),
            other => Err(crate::Error::arg(format!(
                "Unsupported value '{other}' for qcow2 option 'overlap-check'. Allowed are any of \
                 the following: none, constant, cached, all"
            ))),
        }
    }
}

/// A refused write: what it would have overwritten, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlap {
    pub what: &'static str,
    pub offset: u64,
    pub len: u64,
}

impl Overlap {
    /// The message QEMU gives when it marks the image corrupt for such a write.
    pub fn message(&self) -> String {
        format!(
            "Preventing invalid write on metadata (overlaps with {}) at host offset {:#x} \
             (length {:#x})",
            self.what, self.offset, self.len
        )
    }
}

#[derive(Default)]
struct Inner {
    /// `(first cluster, end cluster, kind)`.
    fixed: Vec<(u64, u64, Fixed)>,
    /// One bit per host cluster below [`DENSE_CLUSTERS`]: an L2 table of the active L1 or a
    /// refcount block.
    tables: Vec<u64>,
    /// The same for clusters beyond (huge files of tiny clusters, or hostile offsets far past
    /// the end of the file: the bitmap must not grow with what an image claims).
    far: HashSet<u64>,
    /// Clusters claimed by two structures at open.
    conflicts: HashSet<u64>,
}

/// Clusters tracked in the bitmap (2 MiB of bits); beyond, in a set.
const DENSE_CLUSTERS: u64 = 1 << 24;

impl Inner {
    fn table_bit(&self, c: u64) -> bool {
        if c >= DENSE_CLUSTERS {
            return !self.far.is_empty() && self.far.contains(&c);
        }
        self.tables
            .get((c / 64) as usize)
            .is_some_and(|w| w >> (c % 64) & 1 != 0)
    }

    fn fixed_at(&self, first: u64, end: u64) -> Option<Fixed> {
        self.fixed
            .iter()
            .find(|(s, e, _)| *s < end && first < *e)
            .map(|(_, _, k)| *k)
    }

    /// Sets the bit of `c`; returns whether it was set already.
    fn set(&mut self, c: u64) -> bool {
        if c >= DENSE_CLUSTERS {
            return !self.far.insert(c);
        }
        let w = (c / 64) as usize;
        if w >= self.tables.len() {
            self.tables.resize(w + 1, 0);
        }
        let was = self.tables[w] >> (c % 64) & 1 != 0;
        self.tables[w] |= 1 << (c % 64);
        was
    }
}

/// Where the image's metadata lives (see module docs).
pub struct MetadataMap {
    check: OverlapCheck,
    cluster_bits: u32,
    inner: RwLock<Inner>,
}

impl MetadataMap {
    pub fn new(check: OverlapCheck, cluster_bits: u32) -> MetadataMap {
        MetadataMap {
            check,
            cluster_bits,
            inner: RwLock::new(Inner::default()),
        }
    }

    fn clusters(&self, offset: u64, len: u64) -> (u64, u64) {
        let first = offset >> self.cluster_bits;
        let end = ((offset.saturating_add(len.max(1)) - 1) >> self.cluster_bits) + 1;
        (first, end)
    }

    /// Sets (replaces) the fixed range of kind `kind` (the header, the active L1 and the refcount
    /// table have one each; snapshot L1 tables add up).
    pub fn set_fixed(&self, kind: Fixed, offset: u64, len: u64) {
        let (first, end) = self.clusters(offset, len);
        let mut g = self.inner.write();
        if kind != Fixed::InactiveL1 {
            g.fixed.retain(|(_, _, k)| *k != kind);
        }
        if len > 0 {
            g.fixed.push((first, end, kind));
        }
    }

    /// Forgets the fixed range of kind `kind` that starts at `offset` (a deleted snapshot's L1).
    pub fn remove_fixed(&self, kind: Fixed, offset: u64) {
        let first = offset >> self.cluster_bits;
        self.inner
            .write()
            .fixed
            .retain(|(s, _, k)| !(*k == kind && *s == first));
    }

    /// Marks host cluster `c` as an L2 table that may be marked already (a table that became
    /// active again when a snapshot was applied): no conflict is recorded.
    pub fn mark_shared_table(&self, c: u64) {
        self.inner.write().set(c);
    }

    /// Marks host cluster `c` as an L2 table or refcount block. Returns false if something else
    /// claims it already (a conflict, remembered).
    pub fn mark_table(&self, c: u64) -> bool {
        let mut g = self.inner.write();
        let clash = g.set(c) || g.fixed_at(c, c + 1).is_some();
        if clash {
            g.conflicts.insert(c);
        }
        !clash
    }

    /// Forgets host cluster `c` (its refcount dropped to zero).
    pub fn unmark(&self, c: u64) {
        let mut g = self.inner.write();
        if c >= DENSE_CLUSTERS {
            g.far.remove(&c);
        } else if let Some(word) = g.tables.get_mut((c / 64) as usize) {
            *word &= !(1 << (c % 64));
        }
        if !g.conflicts.is_empty() {
            g.conflicts.remove(&c);
        }
    }

    /// Drops everything but the fixed ranges (before a refcount rebuild re-marks the blocks).
    pub fn clear_tables(&self) {
        let mut g = self.inner.write();
        g.tables.clear();
        g.far.clear();
        g.conflicts.clear();
    }

    /// A guest data write to `[offset, offset+len)`: must not touch any metadata.
    #[inline]
    pub fn check_data(&self, offset: u64, len: u64) -> Result<(), Overlap> {
        if self.check == OverlapCheck::None {
            return Ok(());
        }
        let (first, end) = self.clusters(offset, len);
        let g = self.inner.read();
        if let Some(k) = g.fixed_at(first, end) {
            return Err(Overlap {
                what: k.name(),
                offset,
                len,
            });
        }
        if (first..end).any(|c| g.table_bit(c)) {
            return Err(Overlap {
                what: "L2 table or refcount block",
                offset,
                len,
            });
        }
        Ok(())
    }

    /// A metadata write to `[offset, offset+len)` of an L2 table or refcount block (`own` is
    /// `None`) or of a fixed structure `own`: it may overlap only itself.
    pub fn check_metadata(&self, offset: u64, len: u64, own: Option<Fixed>) -> Result<(), Overlap> {
        if self.check == OverlapCheck::None {
            return Ok(());
        }
        let (first, end) = self.clusters(offset, len);
        let g = self.inner.read();
        let other_fixed = g
            .fixed
            .iter()
            .find(|(s, e, k)| *s < end && first < *e && Some(*k) != own);
        if let Some((_, _, k)) = other_fixed {
            return Err(Overlap {
                what: k.name(),
                offset,
                len,
            });
        }
        let clash = match own {
            None => (first..end).any(|c| g.conflicts.contains(&c)),
            Some(_) => (first..end).any(|c| g.table_bit(c)),
        };
        if clash {
            return Err(Overlap {
                what: "L2 table or refcount block",
                offset,
                len,
            });
        }
        Ok(())
    }

    /// Whether `offset` (a fixed range's start) is where `kind` lives now.
    pub fn fixed_kind_at(&self, offset: u64) -> Option<Fixed> {
        let c = offset >> self.cluster_bits;
        self.inner
            .read()
            .fixed
            .iter()
            .find(|(s, e, _)| *s <= c && c < *e)
            .map(|(_, _, k)| *k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_writes_on_metadata_are_refused_and_freed_clusters_are_not() {
        let m = MetadataMap::new(OverlapCheck::Cached, 16);
        let cs = 1u64 << 16;
        m.set_fixed(Fixed::Header, 0, cs);
        m.set_fixed(Fixed::ActiveL1, 3 * cs, 8);
        m.set_fixed(Fixed::RefcountTable, cs, cs);
        assert!(m.mark_table(2));
        assert!(m.mark_table(5));
        assert_eq!(
            m.check_data(3 * cs + 512, 512).unwrap_err().what,
            "active L1 table"
        );
        assert_eq!(m.check_data(cs - 1, 2).unwrap_err().what, "qcow2_header");
        assert!(m.check_data(5 * cs, 4096).is_err());
        assert!(m.check_data(4 * cs, cs).is_ok());
        assert!(m.check_data(4 * cs, cs + 1).is_err());
        m.unmark(5);
        assert!(m.check_data(5 * cs, 4096).is_ok());
        // Metadata writes: an L2 table may not land on the L1 table; the L1 table may not land
        // on an L2 table; each may overwrite itself.
        assert!(m.check_metadata(2 * cs, cs, None).is_ok());
        assert!(m.check_metadata(3 * cs, cs, None).is_err());
        assert!(m.check_metadata(3 * cs, 8, Some(Fixed::ActiveL1)).is_ok());
        m.set_fixed(Fixed::ActiveL1, 2 * cs, 8);
        assert!(m.check_metadata(2 * cs, 8, Some(Fixed::ActiveL1)).is_err());
        // A cluster claimed twice is a conflict: no metadata write there.
        assert!(!m.mark_table(2));
        assert!(m.check_metadata(2 * cs, cs, None).is_err());
        // Hostile offsets far out take no memory to speak of.
        assert!(m.mark_table(1 << 40));
        assert!(m.check_data((1 << 40) * cs, 512).is_err());
        m.unmark(1 << 40);
        assert!(m.check_data((1 << 40) * cs, 512).is_ok());
    }

    #[test]
    fn none_checks_nothing() {
        let m = MetadataMap::new(OverlapCheck::None, 16);
        m.set_fixed(Fixed::Header, 0, 1 << 16);
        assert!(m.check_data(0, 512).is_ok());
    }
}
