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
//! Which structures are checked is QEMU's choice too: a template (`none`, `constant`, `cached`
//! — the default —, `all`) and per-structure switches over it (`overlap-check.active-l2=off`).
//! `all` adds the L2 tables of snapshots: QEMU reads every snapshot's L1 table for each check;
//! here they are read once at open, their tables marked, and the tables a new snapshot shares
//! marked when it is taken.
//!
//! Cost: a data write takes a read lock and tests one bit per cluster it touches (per checked
//! kind of table) plus a handful of ranges; metadata writes do the same. Nothing is read from
//! disk.

use parking_lot::RwLock;
use std::collections::HashSet;

/// The structures QEMU's overlap checks tell apart, in the order a write is checked against
/// them (the first one it overlaps names the error).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Structure {
    MainHeader,
    ActiveL1,
    ActiveL2,
    RefcountTable,
    RefcountBlock,
    SnapshotTable,
    InactiveL1,
    InactiveL2,
    BitmapDirectory,
}

impl Structure {
    pub const ALL: [Structure; 9] = [
        Structure::MainHeader,
        Structure::ActiveL1,
        Structure::ActiveL2,
        Structure::RefcountTable,
        Structure::RefcountBlock,
        Structure::SnapshotTable,
        Structure::InactiveL1,
        Structure::InactiveL2,
        Structure::BitmapDirectory,
    ];

    /// QEMU's name in error messages.
    pub fn name(self) -> &'static str {
        match self {
            Structure::MainHeader => "qcow2_header",
            Structure::ActiveL1 => "active L1 table",
            Structure::ActiveL2 => "active L2 table",
            Structure::RefcountTable => "refcount table",
            Structure::RefcountBlock => "refcount block",
            Structure::SnapshotTable => "snapshot table",
            Structure::InactiveL1 => "inactive L1 table",
            Structure::InactiveL2 => "inactive L2 table",
            Structure::BitmapDirectory => "bitmap directory",
        }
    }

    /// The option that switches its check (`overlap-check.NAME`).
    pub fn option(self) -> &'static str {
        match self {
            Structure::MainHeader => "main-header",
            Structure::ActiveL1 => "active-l1",
            Structure::ActiveL2 => "active-l2",
            Structure::RefcountTable => "refcount-table",
            Structure::RefcountBlock => "refcount-block",
            Structure::SnapshotTable => "snapshot-table",
            Structure::InactiveL1 => "inactive-l1",
            Structure::InactiveL2 => "inactive-l2",
            Structure::BitmapDirectory => "bitmap-directory",
        }
    }

    fn bit(self) -> u16 {
        1 << self as u16
    }
}

/// What a fixed range holds.
pub type Fixed = Structure;

/// Which structures writes are checked against (QEMU's `overlap-check` and its per-structure
/// switches). The default is QEMU's `cached`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OverlapCheck(u16);

impl Default for OverlapCheck {
    fn default() -> Self {
        OverlapCheck::CACHED
    }
}

impl OverlapCheck {
    pub const NONE: OverlapCheck = OverlapCheck(0);
    /// What can be checked in constant time: the header, the L1 tables, the refcount and
    /// snapshot tables, the bitmap directory.
    pub const CONSTANT: OverlapCheck = OverlapCheck(
        1 << Structure::MainHeader as u16
            | 1 << Structure::ActiveL1 as u16
            | 1 << Structure::RefcountTable as u16
            | 1 << Structure::SnapshotTable as u16
            | 1 << Structure::InactiveL1 as u16
            | 1 << Structure::BitmapDirectory as u16,
    );
    /// `constant`, and the active L2 tables and refcount blocks (QEMU checks those in its
    /// caches; here every one of them is known).
    pub const CACHED: OverlapCheck = OverlapCheck(
        OverlapCheck::CONSTANT.0
            | 1 << Structure::ActiveL2 as u16
            | 1 << Structure::RefcountBlock as u16,
    );
    /// `cached`, and the L2 tables of snapshots.
    pub const ALL: OverlapCheck =
        OverlapCheck(OverlapCheck::CACHED.0 | 1 << Structure::InactiveL2 as u16);

    /// A template by QEMU's name.
    pub fn parse(s: &str) -> crate::Result<OverlapCheck> {
        match s {
            "none" => Ok(OverlapCheck::NONE),
            "constant" => Ok(OverlapCheck::CONSTANT),
            "cached" => Ok(OverlapCheck::CACHED),
            "all" => Ok(OverlapCheck::ALL),
            other => Err(crate::Error::arg(format!(
                "Unsupported value '{other}' for qcow2 option 'overlap-check'. Allowed are any of \
                 the following: none, constant, cached, all"
            ))),
        }
    }

    pub fn checks(self, s: Structure) -> bool {
        self.0 & s.bit() != 0
    }

    pub fn with(self, s: Structure, on: bool) -> OverlapCheck {
        if on {
            OverlapCheck(self.0 | s.bit())
        } else {
            OverlapCheck(self.0 & !s.bit())
        }
    }
}

/// The `overlap-check` runtime options as given: the template (`overlap-check` or
/// `overlap-check.template`, which must agree) and per-structure switches over it.
#[derive(Clone, Debug, Default)]
pub struct OverlapOptions {
    template: Option<(String, OverlapCheck)>,
    template_alias: Option<(String, OverlapCheck)>,
    switches: Vec<(Structure, bool)>,
}

impl OverlapOptions {
    /// Takes `key=value` if it is one of the overlap options.
    pub fn set(&mut self, key: &str, value: &str) -> crate::Result<bool> {
        let Some(rest) = key.strip_prefix("overlap-check") else {
            return Ok(false);
        };
        match rest {
            "" => self.template = Some((value.to_string(), OverlapCheck::parse(value)?)),
            ".template" => {
                self.template_alias = Some((value.to_string(), OverlapCheck::parse(value)?))
            }
            _ => {
                let Some(s) = rest
                    .strip_prefix('.')
                    .and_then(|name| Structure::ALL.into_iter().find(|s| s.option() == name))
                else {
                    return Ok(false);
                };
                self.switches
                    .push((s, crate::size::parse_bool(key, value)?));
            }
        }
        Ok(true)
    }

    /// Whether any overlap option was given (a reopen's new template replaces all old ones).
    pub fn sets_template(&self) -> bool {
        self.template.is_some() || self.template_alias.is_some()
    }

    /// The checks these options ask for (QEMU's rules and message for a conflict).
    pub fn resolve(&self) -> crate::Result<OverlapCheck> {
        let base = match (&self.template, &self.template_alias) {
            (Some((a, x)), Some((b, y))) if x != y => {
                return Err(crate::Error::arg(format!(
                    "Conflicting values for qcow2 options 'overlap-check' ('{a}') and \
                     'overlap-check.template' ('{b}')"
                )))
            }
            (Some((_, x)), _) | (None, Some((_, x))) => *x,
            (None, None) => OverlapCheck::default(),
        };
        Ok(self
            .switches
            .iter()
            .fold(base, |acc, &(s, on)| acc.with(s, on)))
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

/// A set of host clusters: a bitmap below [`DENSE_CLUSTERS`], a hash set beyond (huge files of
/// tiny clusters, or hostile offsets far past the end of the file: the bitmap must not grow
/// with what an image claims).
#[derive(Default)]
struct ClusterSet {
    dense: Vec<u64>,
    far: HashSet<u64>,
}

impl ClusterSet {
    fn contains(&self, c: u64) -> bool {
        if c >= DENSE_CLUSTERS {
            return !self.far.is_empty() && self.far.contains(&c);
        }
        self.dense
            .get((c / 64) as usize)
            .is_some_and(|w| w >> (c % 64) & 1 != 0)
    }

    /// Adds `c`; returns whether it was there already.
    fn insert(&mut self, c: u64) -> bool {
        if c >= DENSE_CLUSTERS {
            return !self.far.insert(c);
        }
        let w = (c / 64) as usize;
        if w >= self.dense.len() {
            self.dense.resize(w + 1, 0);
        }
        let was = self.dense[w] >> (c % 64) & 1 != 0;
        self.dense[w] |= 1 << (c % 64);
        was
    }

    fn remove(&mut self, c: u64) {
        if c >= DENSE_CLUSTERS {
            self.far.remove(&c);
        } else if let Some(word) = self.dense.get_mut((c / 64) as usize) {
            *word &= !(1 << (c % 64));
        }
    }

    fn clear(&mut self) {
        self.dense.clear();
        self.far.clear();
    }
}

/// Which kind of table a cluster holds (the clusters there can be many of).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableKind {
    /// An L2 table of the active L1 table.
    L2,
    RefcountBlock,
    /// An L2 table of a snapshot (marked only when those are checked: QEMU's `all`).
    InactiveL2,
}

#[derive(Default)]
struct Inner {
    /// `(first cluster, end cluster, kind)`.
    fixed: Vec<(u64, u64, Fixed)>,
    l2: ClusterSet,
    refblocks: ClusterSet,
    inactive_l2: ClusterSet,
    /// Clusters claimed by two structures at open.
    conflicts: HashSet<u64>,
}

/// Clusters tracked in a bitmap (2 MiB of bits); beyond, in a set.
const DENSE_CLUSTERS: u64 = 1 << 24;

impl Inner {
    fn set_of(&mut self, kind: TableKind) -> &mut ClusterSet {
        match kind {
            TableKind::L2 => &mut self.l2,
            TableKind::RefcountBlock => &mut self.refblocks,
            TableKind::InactiveL2 => &mut self.inactive_l2,
        }
    }

    /// The first structure `check` covers that has a table in `[first, end)`.
    fn table_at(&self, check: OverlapCheck, first: u64, end: u64) -> Option<Structure> {
        [
            (Structure::ActiveL2, &self.l2),
            (Structure::RefcountBlock, &self.refblocks),
            (Structure::InactiveL2, &self.inactive_l2),
        ]
        .into_iter()
        .find(|(s, set)| check.checks(*s) && (first..end).any(|c| set.contains(c)))
        .map(|(s, _)| s)
    }

    fn any_table(&self, c: u64) -> bool {
        self.l2.contains(c) || self.refblocks.contains(c)
    }

    fn fixed_at(&self, first: u64, end: u64) -> Option<Fixed> {
        self.fixed
            .iter()
            .find(|(s, e, _)| *s < end && first < *e)
            .map(|(_, _, k)| *k)
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
        self.inner.write().l2.insert(c);
    }

    /// Marks host cluster `c` as an L2 table of a snapshot (shared with the active tree or
    /// not: no conflict is recorded). Only when those are checked.
    pub fn mark_inactive_l2(&self, c: u64) {
        if self.check.checks(Structure::InactiveL2) {
            self.inner.write().inactive_l2.insert(c);
        }
    }

    /// Whether writes are checked against the L2 tables of snapshots (which must then be
    /// marked with [`MetadataMap::mark_inactive_l2`]).
    pub fn checks_inactive_l2(&self) -> bool {
        self.check.checks(Structure::InactiveL2)
    }

    /// Marks host cluster `c` as an active L2 table or a refcount block. Returns false if
    /// something else claims it already (a conflict, remembered).
    pub fn mark_table(&self, c: u64, kind: TableKind) -> bool {
        let mut g = self.inner.write();
        let clash = g.any_table(c) || g.fixed_at(c, c + 1).is_some();
        g.set_of(kind).insert(c);
        if clash {
            g.conflicts.insert(c);
        }
        !clash
    }

    /// Forgets host cluster `c` (its refcount dropped to zero).
    pub fn unmark(&self, c: u64) {
        let mut g = self.inner.write();
        g.l2.remove(c);
        g.refblocks.remove(c);
        g.inactive_l2.remove(c);
        if !g.conflicts.is_empty() {
            g.conflicts.remove(&c);
        }
    }

    /// Drops the active L2 tables, refcount blocks and conflicts (before a refcount rebuild
    /// re-marks the blocks).
    pub fn clear_tables(&self) {
        let mut g = self.inner.write();
        g.l2.clear();
        g.refblocks.clear();
        g.conflicts.clear();
    }

    /// A guest data write to `[offset, offset+len)`: must not touch any metadata that is
    /// checked.
    #[inline]
    pub fn check_data(&self, offset: u64, len: u64) -> Result<(), Overlap> {
        if self.check == OverlapCheck::NONE {
            return Ok(());
        }
        let (first, end) = self.clusters(offset, len);
        let g = self.inner.read();
        let fixed = g
            .fixed
            .iter()
            .filter(|(s, e, k)| *s < end && first < *e && self.check.checks(*k))
            .map(|(_, _, k)| *k);
        let table = g.table_at(self.check, first, end);
        // QEMU's order: the first structure in `Structure::ALL` that is hit names the error.
        let hit = fixed
            .chain(table)
            .min_by_key(|s| Structure::ALL.iter().position(|x| x == s));
        match hit {
            Some(k) => Err(Overlap {
                what: k.name(),
                offset,
                len,
            }),
            None => Ok(()),
        }
    }

    /// A metadata write to `[offset, offset+len)` of an L2 table or refcount block (`own` is
    /// `None`) or of a fixed structure `own`: it may overlap only itself.
    pub fn check_metadata(&self, offset: u64, len: u64, own: Option<Fixed>) -> Result<(), Overlap> {
        if self.check == OverlapCheck::NONE {
            return Ok(());
        }
        let (first, end) = self.clusters(offset, len);
        let g = self.inner.read();
        let other_fixed = g
            .fixed
            .iter()
            .find(|(s, e, k)| *s < end && first < *e && Some(*k) != own && self.check.checks(*k));
        if let Some((_, _, k)) = other_fixed {
            return Err(Overlap {
                what: k.name(),
                offset,
                len,
            });
        }
        let clash = match own {
            None => (first..end)
                .any(|c| g.conflicts.contains(&c))
                .then_some("L2 table or refcount block"),
            Some(_) => g.table_at(self.check, first, end).map(Structure::name),
        };
        if let Some(what) = clash {
            return Err(Overlap { what, offset, len });
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
        let m = MetadataMap::new(OverlapCheck::CACHED, 16);
        let cs = 1u64 << 16;
        m.set_fixed(Fixed::MainHeader, 0, cs);
        m.set_fixed(Fixed::ActiveL1, 3 * cs, 8);
        m.set_fixed(Fixed::RefcountTable, cs, cs);
        assert!(m.mark_table(2, TableKind::L2));
        assert!(m.mark_table(5, TableKind::L2));
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
        assert!(!m.mark_table(2, TableKind::L2));
        assert!(m.check_metadata(2 * cs, cs, None).is_err());
        // Hostile offsets far out take no memory to speak of.
        assert!(m.mark_table(1 << 40, TableKind::L2));
        assert!(m.check_data((1 << 40) * cs, 512).is_err());
        m.unmark(1 << 40);
        assert!(m.check_data((1 << 40) * cs, 512).is_ok());
    }

    #[test]
    fn templates_and_switches_like_qemu() {
        let opts = |list: &[(&str, &str)]| {
            let mut o = OverlapOptions::default();
            for (k, v) in list {
                assert!(o.set(k, v).unwrap(), "{k}");
            }
            o.resolve()
        };
        assert_eq!(opts(&[]).unwrap(), OverlapCheck::CACHED);
        assert_eq!(
            opts(&[("overlap-check", "all")]).unwrap(),
            OverlapCheck::ALL
        );
        assert_eq!(
            opts(&[
                ("overlap-check.template", "none"),
                ("overlap-check.main-header", "on")
            ])
            .unwrap(),
            OverlapCheck::NONE.with(Structure::MainHeader, true)
        );
        assert_eq!(
            opts(&[
                ("overlap-check", "constant"),
                ("overlap-check.template", "constant")
            ])
            .unwrap(),
            OverlapCheck::CONSTANT
        );
        let e = opts(&[
            ("overlap-check", "constant"),
            ("overlap-check.template", "all"),
        ]);
        assert!(e.unwrap_err().to_string().contains("Conflicting values"));
        let mut o = OverlapOptions::default();
        assert!(o.set("overlap-check", "blubb").is_err());
        assert!(o.set("overlap-check.inactive-l2", "maybe").is_err());
        assert!(!o.set("overlap-check.nothing", "on").unwrap());
        // A switched-off structure is not checked; the others are, in QEMU's order.
        let cs = 1u64 << 16;
        let m = MetadataMap::new(OverlapCheck::CACHED.with(Structure::MainHeader, false), 16);
        m.set_fixed(Fixed::MainHeader, 0, cs);
        m.set_fixed(Fixed::RefcountTable, cs, cs);
        assert!(m.check_data(0, 512).is_ok());
        assert!(m.mark_table(2, TableKind::RefcountBlock));
        assert_eq!(m.check_data(cs, 2 * cs).unwrap_err().what, "refcount table");
        assert_eq!(
            m.check_data(2 * cs, 512).unwrap_err().what,
            "refcount block"
        );
        // Snapshot L2 tables count only with `all` (or inactive-l2=on).
        let m = MetadataMap::new(OverlapCheck::CACHED, 16);
        m.mark_inactive_l2(7);
        assert!(m.check_data(7 * cs, 512).is_ok());
        let m = MetadataMap::new(OverlapCheck::ALL, 16);
        m.mark_inactive_l2(7);
        assert_eq!(
            m.check_data(7 * cs, 512).unwrap_err().what,
            "inactive L2 table"
        );
        m.unmark(7);
        assert!(m.check_data(7 * cs, 512).is_ok());
    }

    #[test]
    fn none_checks_nothing() {
        let m = MetadataMap::new(OverlapCheck::NONE, 16);
        m.set_fixed(Fixed::MainHeader, 0, 1 << 16);
        assert!(m.check_data(0, 512).is_ok());
    }
}
