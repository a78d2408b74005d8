//! Pure, I/O-free codecs of the qcow2 on-disk format.
//!
//! Everything here takes bytes and returns typed values (or the reverse), validates what it
//! decodes, and never panics on untrusted input. The engine (`crate::qcow2`) does the I/O.

pub mod be;
pub mod bitmap;
pub mod compression;
pub mod header;
pub mod refcount;
pub mod snapshot;
pub mod table;

pub use header::{CompressionType, Extension, Header};
pub use refcount::RefcountWidth;
pub use table::{L1Entry, Mapping};
