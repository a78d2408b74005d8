//! The library's error type.
//!
//! Every error says what was being done when it happened ("reading L2 table at host offset
//! 0x50000: ...") and keeps the OS error when there is one. The variants are the distinctions the
//! callers act on: the CLI maps them to qemu-img's messages and exit codes, the NBD server to NBD
//! error numbers.

use std::io;

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error from the storage below, with what we were doing. Shown as QEMU shows it:
    /// the C library's text, without Rust's " (os error N)".
    /// An empty context shows the error alone (errors that say everything themselves).
    #[error("{}", io_text(.context, .source))]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// The file is not a valid image of the expected format (bad header, bad sizes...).
    #[error("{0}")]
    InvalidImage(String),
    /// Metadata found inconsistent while using the image (misaligned offsets, overlaps...).
    #[error("qcow2 image is corrupt: {0}")]
    Corrupt(String),
    /// A valid image that uses a feature this implementation does not support (yet).
    #[error("{0}")]
    Unsupported(String),
    /// A caller error: bad option, bad range, bad size.
    #[error("{0}")]
    InvalidArgument(String),
    /// A write to an image opened read-only.
    #[error("Image is read-only")]
    ReadOnly,
    /// A request outside the virtual disk.
    #[error("Request out of range: offset {offset} length {len} (disk size {size})")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// The request is refused by a safety rule (a write that would change the probed format of
    /// a raw image; a file the open policy does not allow).
    #[error("{0}")]
    NotPermitted(String),
    /// Another user of the image holds a lock that excludes this use (QEMU's message).
    #[error("{0}")]
    Locked(String),
    /// The image cannot grow any further (host offsets would exceed the format's limits).
    #[error("No space left in the image: {0}")]
    NoSpace(String),
    /// A structure would exceed one of the format's size limits (a snapshot table, an L1 table).
    #[error("{0}")]
    TooLarge(String),
    /// A backing chain names the same file twice (QEMU's message).
    #[error("Backing file '{0}' creates an infinite loop.")]
    BackingLoop(String),
}

fn io_text(context: &str, source: &io::Error) -> String {
    if context.is_empty() {
        strerror(source)
    } else {
        format!("{context}: {}", strerror(source))
    }
}

/// An I/O error's text as `strerror` gives it ("No such file or directory"): what QEMU's tools
/// print and what scripts match.
pub fn strerror(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

impl Error {
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// An I/O error said as the step that failed (QEMU's wording for an operation), the errno
    /// kept and the low-level context dropped; other errors unchanged.
    pub fn reworded(self, what: impl FnOnce() -> String) -> Self {
        match self {
            Error::Io { source, .. } => Error::io(what(), source),
            e => e,
        }
    }

    /// What every write and flush returns once an fsync of the image failed (`EIO`): Linux
    /// reports a failed writeback once, so nothing written before it can be counted as durable
    /// again in this session (see `qcow2::barrier`, "Failure (poisoning)").
    pub fn sync_failed() -> Self {
        Error::io(
            "an earlier flush of the image file failed, so writes made before it may be lost; \
             the image accepts no more writes or flushes until it is reopened",
            io::Error::from_raw_os_error(5), // EIO
        )
    }

    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidImage(msg.into())
    }

    pub fn corrupt(msg: impl Into<String>) -> Self {
        Error::Corrupt(msg.into())
    }

    pub fn unsupported(msg: impl Into<String>) -> Self {
        Error::Unsupported(msg.into())
    }

    pub fn arg(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }

    /// The errno that best describes this error (for NBD replies and exit statuses).
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc_eio()),
            Error::InvalidImage(_) | Error::Corrupt(_) | Error::BackingLoop(_) => libc_eio(),
            Error::Unsupported(_) => 95, // ENOTSUP
            Error::InvalidArgument(_) | Error::OutOfRange { .. } => 22, // EINVAL
            Error::ReadOnly => 1,        // EPERM
            Error::NoSpace(_) => 28,     // ENOSPC
            Error::TooLarge(_) => 27,    // EFBIG
            Error::Locked(_) => 11,      // EAGAIN
            Error::NotPermitted(_) => 1, // EPERM
        }
    }
}

const fn libc_eio() -> i32 {
    5
}

/// Adds context to I/O results.
pub trait IoContext<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(what(), e))
    }
}
