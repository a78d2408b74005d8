//! Image locking that QEMU understands: the same byte-range locks its file driver takes, so that
//! qimg and QEMU's tools (and two qimg processes) refuse each other exactly as two QEMU processes
//! do.
//!
//! A user of an image holds *permissions* (read consistently, write, write without changing
//! content, resize) and refuses to *share* some of them with anyone else. Each permission it holds
//! is a one-byte shared lock at offset 100 + bit of the image file; each one it refuses to share is
//! a one-byte shared lock at 200 + bit. Shared locks never block each other, so taking them always
//! succeeds; what decides is the test that follows: for every permission wanted, nobody may hold
//! the "refuses to share" byte, and for every permission refused, nobody may hold the "holds" byte.
//! The locks are Linux open-file-description locks (`F_OFD_SETLK`): they belong to the open file,
//! not the process, so they vanish when the file is closed, also when the process dies.
//!
//! What each use takes mirrors what QEMU takes for the same command (seen with strace on
//! qemu-img/qemu-io/qemu-nbd 10.0): every user of a qcow2 file refuses to share write and resize
//! (metadata is cached); a reader also holds consistent read; a writer also holds write and
//! resize; `info` holds nothing (it does no guest I/O); `-U` (force share, read-only only) shares
//! everything. Backing files are held as readers.

use crate::error::{Error, Result};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Permission bits, as QEMU numbers them.
pub const PERM_CONSISTENT_READ: u8 = 1 << 0;
pub const PERM_WRITE: u8 = 1 << 1;
pub const PERM_WRITE_UNCHANGED: u8 = 1 << 2;
pub const PERM_RESIZE: u8 = 1 << 3;
pub const PERM_ALL: u8 = 0xf;

const PERM_NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];
const HOLD_BASE: i64 = 100;
const UNSHARED_BASE: i64 = 200;

/// QEMU's file driver option `locking`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Locking {
    /// Lock where the file system supports open-file-description locks (QEMU's default).
    #[default]
    Auto,
    /// Always lock; fail if the file system cannot.
    On,
    /// Take no locks and honour none.
    Off,
}

impl Locking {
    pub fn parse(s: &str) -> Result<Locking> {
        match s {
            "auto" => Ok(Locking::Auto),
            "on" => Ok(Locking::On),
            "off" => Ok(Locking::Off),
            other => Err(Error::arg(format!(
                "Parameter 'locking' does not accept value '{other}'"
            ))),
        }
    }
}

/// What a user of an image holds and what it lets others hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    pub perm: u8,
    pub shared: u8,
}

impl Access {
    /// Reads guest data (check, map, compare, `io -r`, a read-only export, a backing file).
    pub const READ: Access = Access {
        perm: PERM_CONSISTENT_READ,
        shared: PERM_ALL & !(PERM_WRITE | PERM_RESIZE),
    };
    /// Reads and writes (io, serve, `check -r`, resize, a convert target).
    pub const READ_WRITE: Access = Access {
        perm: PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE,
        shared: PERM_ALL & !(PERM_WRITE | PERM_RESIZE),
    };
    /// Reads metadata only (`info`): holds nothing, but nobody may write meanwhile.
    pub const METADATA: Access = Access {
        perm: 0,
        shared: PERM_ALL & !(PERM_WRITE | PERM_RESIZE),
    };
    /// Formats a new image file (create, before its first open).
    pub const CREATE: Access = Access {
        perm: PERM_WRITE | PERM_RESIZE,
        shared: PERM_ALL & !PERM_RESIZE,
    };

    /// The same, sharing everything with anyone (`-U`): only for read-only users.
    pub fn force_shared(self) -> Access {
        Access {
            perm: self.perm,
            shared: PERM_ALL,
        }
    }
}

/// How an image file is locked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LockOptions {
    pub locking: Locking,
    /// `-U`: share every permission (read-only opens only).
    pub force_share: bool,
}

/// Takes `access`'s locks on `file` (named `path` in messages) and checks that no other user
/// conflicts. On a conflict the error is QEMU's ("Failed to get "write" lock" and the hint);
/// the caller drops the file, which releases what was taken.
pub fn lock(file: &File, path: &Path, access: Access, locking: Locking) -> Result<()> {
    if locking == Locking::Off {
        return Ok(());
    }
    let fd = file.as_raw_fd();
    if let Err(e) = probe(fd) {
        if locking == Locking::Auto {
            tracing::debug!("{}: no OFD locks here ({e}); not locking", path.display());
            return Ok(());
        }
        return Err(Error::io(
            format!("Failed to lock '{}' (locking=on)", path.display()),
            e,
        ));
    }
    let fail = |e: io::Error| Error::io(format!("Failed to lock byte of '{}'", path.display()), e);
    for bit in 0..4 {
        let mask = 1u8 << bit;
        if access.perm & mask != 0 {
            set_shared(fd, HOLD_BASE + bit).map_err(fail)?;
        }
        if access.shared & mask == 0 {
            set_shared(fd, UNSHARED_BASE + bit).map_err(fail)?;
        }
    }
    for bit in 0..4 {
        let mask = 1u8 << bit;
        let name = PERM_NAMES[bit as usize];
        if access.perm & mask != 0 && held_by_other(fd, UNSHARED_BASE + bit).map_err(fail)? {
            return Err(conflict(format!("Failed to get \"{name}\" lock"), path));
        }
        if access.shared & mask == 0 && held_by_other(fd, HOLD_BASE + bit).map_err(fail)? {
            return Err(conflict(
                format!("Failed to get shared \"{name}\" lock"),
                path,
            ));
        }
    }
    Ok(())
}

/// Drops every lock this open file holds on the permission bytes (the image was closed).
pub fn unlock(file: &File) {
    let fd = file.as_raw_fd();
    let mut fl = flock(libc::F_UNLCK, HOLD_BASE, UNSHARED_BASE + 4 - HOLD_BASE);
    // Unlocking a range this file holds no lock on is not an error; a failure (a closed or
    // lock-less file system) leaves nothing held either.
    let _ = fcntl_lock(fd, libc::F_OFD_SETLK, &mut fl);
}

fn conflict(what: String, path: &Path) -> Error {
    Error::Locked(format!(
        "{what}\nIs another process using the image [{}]?",
        path.display()
    ))
}

fn flock(kind: libc::c_int, start: i64, len: i64) -> libc::flock {
    // SAFETY: `flock` is plain data; all-zero is a valid value, the fields are set below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start;
    fl.l_len = len;
    fl
}

fn fcntl_lock(fd: i32, cmd: libc::c_int, fl: &mut libc::flock) -> io::Result<()> {
    // SAFETY: `fl` is a valid, exclusively borrowed `flock` for the duration of the call, and
    // `fd` is an open descriptor owned by the caller's `File`.
    let r = unsafe { libc::fcntl(fd, cmd, fl as *mut libc::flock) };
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Whether the file system takes open-file-description locks.
fn probe(fd: i32) -> io::Result<()> {
    let mut fl = flock(libc::F_WRLCK, 0, 0);
    fcntl_lock(fd, libc::F_OFD_GETLK, &mut fl)
}

fn set_shared(fd: i32, byte: i64) -> io::Result<()> {
    let mut fl = flock(libc::F_RDLCK, byte, 1);
    fcntl_lock(fd, libc::F_OFD_SETLK, &mut fl)
}

/// Whether another open file holds a lock on `byte` (our own locks never conflict with us).
fn held_by_other(fd: i32, byte: i64) -> io::Result<bool> {
    let mut fl = flock(libc::F_WRLCK, byte, 1);
    fcntl_lock(fd, libc::F_OFD_GETLK, &mut fl)?;
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(p: &Path) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(p)
            .unwrap()
    }

    #[test]
    fn two_users_refuse_each_other_as_qemu_does() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, [0u8; 512]).unwrap();
        let writer = open(&p);
        lock(&writer, &p, Access::READ_WRITE, Locking::On).unwrap();

        let e = lock(&open(&p), &p, Access::READ_WRITE, Locking::On).unwrap_err();
        assert!(
            e.to_string().starts_with("Failed to get \"write\" lock\n"),
            "{e}"
        );
        let e = lock(&open(&p), &p, Access::READ, Locking::On).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "Failed to get shared \"write\" lock\nIs another process using the image [{}]?",
                p.display()
            )
        );
        lock(&open(&p), &p, Access::READ.force_shared(), Locking::On).unwrap();
        lock(&open(&p), &p, Access::READ_WRITE, Locking::Off).unwrap();

        // Readers share with readers; once the writer is gone, a writer may come.
        drop(writer);
        let r1 = open(&p);
        lock(&r1, &p, Access::READ, Locking::On).unwrap();
        lock(&open(&p), &p, Access::METADATA, Locking::On).unwrap();
        let e = lock(&open(&p), &p, Access::READ_WRITE, Locking::On).unwrap_err();
        assert!(
            e.to_string().starts_with("Failed to get \"write\" lock"),
            "{e}"
        );
        drop(r1);
        lock(&open(&p), &p, Access::READ_WRITE, Locking::On).unwrap();
    }
}
