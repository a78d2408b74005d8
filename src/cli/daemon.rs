//! `qimg serve --fork`: the server runs in a child process and the command returns once the
//! server accepts connections, as qemu-nbd's `--fork` does, so that scripts can start a server and
//! use it on the next line.
//!
//! The fork happens before the async runtime exists (forking a process with threads would leave
//! the child with locks held by threads that do not exist there). The child starts a new session,
//! points standard input and output at `/dev/null`, keeps standard error while it starts (its
//! messages still reach whoever started it), and reports readiness by writing one byte into a
//! pipe. The parent waits on that pipe: a byte means the server is up (exit 0); end of file
//! without one means the child failed before listening, and the parent exits with the child's
//! status (its error message was already printed on the shared standard error).
//!
//! Once running, the server's standard error goes to `/dev/null` too unless `-v` asked to keep it,
//! as with qemu-nbd: a caller that captures the command's output (`$(qemu-nbd --fork ...)`) must
//! not wait for a daemon that holds the pipe open.

use std::io::Read as _;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Mutex;

/// The child's end of the readiness pipe, until [`ready`] uses it.
static READY: Mutex<Option<OwnedFd>> = Mutex::new(None);

/// Forks. Returns `Some(exit status)` in the parent, once the child is ready or has failed, and
/// `None` in the child, which goes on to serve and calls [`ready`] once it listens.
pub fn fork() -> Option<u8> {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        eprintln!(
            "{}: Failed to fork: {}",
            super::prog(),
            std::io::Error::last_os_error()
        );
        return Some(1);
    }
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: called before the runtime (or any other thread) exists, so the child is a complete
    // copy of a single-threaded process and may run arbitrary code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        eprintln!(
            "{}: Failed to fork: {}",
            super::prog(),
            std::io::Error::last_os_error()
        );
        return Some(1);
    }
    if pid == 0 {
        drop(rd);
        detach();
        if let Ok(mut r) = READY.lock() {
            *r = Some(wr);
        }
        return None;
    }
    drop(wr);
    let mut byte = [0u8; 1];
    let mut file = std::fs::File::from(rd);
    loop {
        match file.read(&mut byte) {
            Ok(1) => return Some(0),
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    // The child ended (or closed the pipe) without being ready: report its status.
    let mut status = 0i32;
    // SAFETY: `pid` is our child; `status` is a valid int to fill.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    if r == pid && libc::WIFEXITED(status) {
        Some((libc::WEXITSTATUS(status) as u8).max(1))
    } else {
        Some(1)
    }
}

/// New session, standard input and output on `/dev/null` (failures leave them as they were:
/// the server works either way).
fn detach() {
    // SAFETY: setsid has no memory-safety preconditions.
    unsafe {
        libc::setsid();
    }
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        // SAFETY: dup2 onto the standard descriptors of this (still single-threaded) process;
        // `null` stays open for the duration of the calls.
        unsafe {
            libc::dup2(null.as_raw_fd(), 0);
            libc::dup2(null.as_raw_fd(), 1);
        }
    }
}

/// Tells the waiting parent that the server accepts connections (no-op without `--fork`), and
/// detaches standard error unless `keep_stderr`.
pub fn ready(keep_stderr: bool) {
    let fd = READY.lock().ok().and_then(|mut r| r.take());
    if let Some(fd) = fd {
        if !keep_stderr {
            if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
                // SAFETY: dup2 onto standard error; `null` is open for the duration of the call.
                // Other threads may be writing to fd 2: they write to either file, never to a
                // closed descriptor (dup2 replaces atomically).
                unsafe {
                    libc::dup2(null.as_raw_fd(), 2);
                }
            }
        }
        let mut f = std::fs::File::from(fd);
        let _ = std::io::Write::write_all(&mut f, b"R");
    }
}
