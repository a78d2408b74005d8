//! qimg: a qcow2 disk-image engine.
//!
//! Layers, each only looking down (see `docs/ARCHITECTURE.md`):
//! - [`format`]: pure codecs of the on-disk format;
//! - [`storage`]: asynchronous positioned I/O with owned buffers ([`buf`]) and its backends;
//! - [`qcow2`] and [`raw`]: the format drivers, behind [`block::BlockDevice`];
//! - the `qimg` binary (`src/main.rs`, `src/cli/`): qemu-img compatible commands.

pub mod block;
pub mod block_options;
pub mod buf;
pub mod chain;
pub mod copy_on_read;
pub mod cpu;
pub mod dirty_bitmap;
pub mod error;
pub mod format;
#[doc(hidden)]
pub mod fuzzing;
pub mod nbd;
pub mod qcow2;
pub mod raw;
pub mod size;
pub mod storage;
pub mod striped;
pub mod units;

pub use block::{open_image, BlockDevice, CacheMode, Format, OpenOptions, ZeroFlags};
pub use buf::{IoBuf, IoBufMut};
pub use error::{Error, Result};
pub use qcow2::Qcow2;
