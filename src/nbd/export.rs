//! What is served: one open image, its names, and what the server promises about it (transmission
//! flags and block size constraints).
//!
//! Kept apart from the protocol code so that the promises are in one place: every flag set here
//! must be honoured by `commands.rs`, and nothing there may rely on a flag not set here.

use super::proto::*;
use crate::block::{BlockDevice, CacheMode};
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
        }
    }

    /// Whether a client's export name selects this export.
    pub fn matches(&self, name: &str) -> bool {
        self.name == name || self.aliases.iter().any(|a| a == name)
    }

    pub fn size(&self) -> u64 {
        self.img.size()
    }

    /// Transmission flags. Multi-conn is always safe: every connection of this server uses the
    /// same image handle in the same process, so a FLUSH (or FUA) on one connection makes the
    /// writes completed on all connections durable and visible.
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        let mut f = FLAG_HAS_FLAGS
            | FLAG_SEND_FLUSH
            | FLAG_SEND_FUA
            | FLAG_SEND_CACHE
            | FLAG_CAN_MULTI_CONN;
        if structured {
            f |= FLAG_SEND_DF;
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
        (MIN_BLOCK, PREFERRED_BLOCK, MAX_PAYLOAD)
    }
}
