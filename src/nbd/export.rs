//! What is served: one open image, its names, and what the server promises about it (transmission
//! flags and block size constraints).
//!
//! Kept apart from the protocol code so that the promises are in one place: every flag set here
//! must be honoured by `commands.rs`, and nothing there may rely on a flag not set here.

use super::handshake::Negotiated;
use super::proto::*;
use super::status::Context;
use crate::block::{BlockDevice, CacheMode};
use crate::dirty_bitmap::DirtyBitmap;
use std::sync::Arc;

/// What TRIM does (qemu-nbd's `--discard`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DiscardMode {
    /// TRIM succeeds and changes nothing; WRITE_ZEROES never deallocates.
    #[default]
    Ignore,
    /// TRIM discards whole clusters; WRITE_ZEROES without NO_HOLE may deallocate.
    Unmap,
}

impl DiscardMode {
    pub fn parse(s: &str) -> crate::Result<DiscardMode> {
        match s {
            "ignore" | "off" => Ok(DiscardMode::Ignore),
            "unmap" | "on" => Ok(DiscardMode::Unmap),
            other => Err(crate::Error::arg(format!(
                "Invalid discard mode '{other}' (expected ignore or unmap)"
            ))),
        }
    }
}

/// What the server does with writes of zeros (qemu-nbd's `--detect-zeroes`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DetectZeroes {
    /// Writes are written as they come.
    #[default]
    Off,
    /// A write whose data is all zeros becomes a write-zeroes request.
    On,
    /// As `On`, and the zeroed range may be deallocated (with `--discard=unmap` only).
    Unmap,
}

impl DetectZeroes {
    pub fn parse(s: &str) -> crate::Result<DetectZeroes> {
        match s {
            "off" => Ok(DetectZeroes::Off),
            "on" => Ok(DetectZeroes::On),
            "unmap" => Ok(DetectZeroes::Unmap),
            other => Err(crate::Error::arg(format!(
                "invalid detect-zeroes mode '{other}' (expected off, on or unmap)"
            ))),
        }
    }
}

/// How to export an image.
#[derive(Clone, Debug, Default)]
pub struct ExportConfig {
    /// The canonical export name (listed by `NBD_OPT_LIST`, `""` is the default export).
    pub name: String,
    /// Other names the export answers to.
    pub aliases: Vec<String>,
    /// Free text shown by `NBD_OPT_LIST` / `NBD_INFO_DESCRIPTION`.
    pub description: String,
    /// Refuse writes even if the image is writable.
    pub read_only: bool,
    pub discard: DiscardMode,
    /// The cache mode the image was opened with (decides what FUA costs).
    pub cache: CacheMode,
    pub detect_zeroes: DetectZeroes,
    /// Offer the `qemu:allocation-depth` context (qemu-nbd's `-A`).
    pub allocation_depth: bool,
    /// Advertise that several connections may be used at once (`NBD_FLAG_CAN_MULTI_CONN`).
    pub multi_conn: bool,
    /// Dirty bitmaps offered as `qemu:dirty-bitmap:NAME` contexts (qemu-nbd's `-B`).
    pub bitmaps: Vec<(String, Arc<DirtyBitmap>)>,
}

/// An image being served.
pub struct Export {
    pub img: Arc<dyn BlockDevice>,
    pub name: String,
    pub aliases: Vec<String>,
    pub description: String,
    pub read_only: bool,
    pub discard: DiscardMode,
    /// Every completed write is already durable (writethrough modes): FUA needs no flush.
    pub writethrough: bool,
    pub detect_zeroes: DetectZeroes,
    pub allocation_depth: bool,
    pub multi_conn: bool,
    /// Names of the exported bitmaps, by context index.
    pub bitmap_names: Vec<String>,
    pub bitmaps: Vec<Arc<DirtyBitmap>>,
}

/// Minimum block size: any byte is addressable (the engine does read-modify-write).
pub const MIN_BLOCK: u32 = 1;
/// Preferred block size: aligned 4 KiB requests avoid partial-page host I/O.
pub const PREFERRED_BLOCK: u32 = 4096;

impl Export {
    pub fn new(img: Arc<dyn BlockDevice>, cfg: ExportConfig) -> Export {
        Export {
            read_only: cfg.read_only || img.read_only(),
            img,
            name: cfg.name,
            aliases: cfg.aliases,
            description: cfg.description,
            discard: cfg.discard,
            writethrough: cfg.cache.writethrough(),
            detect_zeroes: cfg.detect_zeroes,
            allocation_depth: cfg.allocation_depth,
            multi_conn: cfg.multi_conn,
            bitmap_names: cfg.bitmaps.iter().map(|(n, _)| n.clone()).collect(),
            bitmaps: cfg.bitmaps.into_iter().map(|(_, b)| b).collect(),
        }
    }

    /// Whether a client's export name selects this export.
    pub fn matches(&self, name: &str) -> bool {
        self.name == name || self.aliases.iter().any(|a| a == name)
    }

    pub fn size(&self) -> u64 {
        self.img.size()
    }

    /// Whether the export offers metadata context `c`.
    pub fn offers(&self, c: Context) -> bool {
        match c {
            Context::Allocation => true,
            Context::Depth => self.allocation_depth,
            Context::Bitmap(i) => (i as usize) < self.bitmaps.len(),
        }
    }

    /// Transmission flags. Multi-conn is always safe when it is offered: every connection of this
    /// server uses the same image handle in the same process, so a FLUSH (or FUA) on one
    /// connection makes the writes completed on all connections durable and visible. It is
    /// offered only where a second connection can be served at once (qemu-nbd's rule).
    pub fn transmission_flags(&self, neg: &Negotiated) -> u16 {
        let structured = neg.structured;
        let mut f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_CACHE;
        if self.multi_conn {
            f |= FLAG_CAN_MULTI_CONN;
        }
        if structured {
            f |= FLAG_SEND_DF;
        }
        if neg.extended {
            f |= FLAG_BLOCK_STAT_PAYLOAD;
        }
        if self.read_only {
            f |= FLAG_READ_ONLY;
        } else {
            f |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
        }
        f
    }

    /// `(minimum, preferred, maximum payload)`.
    pub fn block_sizes(&self) -> (u32, u32, u32) {
        let min = MIN_BLOCK.max(self.img.request_alignment());
        (min, PREFERRED_BLOCK.max(min), MAX_PAYLOAD)
    }
}
