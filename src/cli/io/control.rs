//! qemu-io's commands that steer the session rather than read or write guest data:
//! breakpoints on a `blkdebug` node, `truncate`, `sleep`, `sigraise`.

use super::report::cvtnum;
use super::Dev;
use crate::cli::prog;
use std::io::Write as _;
use std::time::Duration;

/// qemu-io's breakpoint commands on the image's `blkdebug` node: `break EVENT TAG`,
/// `remove_break TAG`, `resume TAG`, `wait_break TAG`, with qemu-io's messages.
pub(super) async fn breakpoint(img: &Dev, name: &str, args: &[&str]) -> bool {
    let want = if name == "break" { 2 } else { 1 };
    if args.len() != want {
        eprintln!(
            "bad argument count {} to {name}, expected {want} arguments",
            args.len()
        );
        return false;
    }
    let handle = img.debug_handle();
    let failed = |what: String, e: std::io::Error| {
        println!("{what}: {}", qimg::error::strerror(&e));
        false
    };
    let enotsup = || std::io::Error::from_raw_os_error(95);
    match (name, handle) {
        ("break", Some(h)) => {
            // QEMU prints the node's messages on standard output, in order with ours.
            h.set_reporter(|m| {
                println!("{m}");
                let _ = std::io::stdout().flush();
            });
            match h.break_at(args[0], args[1]) {
                Ok(()) => true,
                Err(e) => failed("Could not set breakpoint".into(), e),
            }
        }
        ("break", None) => failed("Could not set breakpoint".into(), enotsup()),
        ("remove_break", h) => {
            match h.map_or_else(|| Err(enotsup()), |h| h.remove_break(args[0])) {
                Ok(()) => true,
                Err(e) => failed(format!("Could not remove breakpoint {}", args[0]), e),
            }
        }
        ("resume", h) => match h.map_or_else(|| Err(enotsup()), |h| h.resume(args[0])) {
            Ok(()) => true,
            Err(e) => failed("Could not resume request".into(), e),
        },
        (_, Some(h)) => {
            h.wait_suspended(args[0]).await;
            true
        }
        // Nothing can ever be suspended (qemu-io would wait forever): refused.
        (_, None) => {
            println!("Could not wait for a breakpoint: the image has no blkdebug node");
            false
        }
    }
}

/// `truncate [-m PREALLOC] SIZE`: changes the image's size, either way (qemu-io passes no
/// `--shrink`), preallocating a grown area as `-m` says.
pub(super) async fn truncate(img: &Dev, args: &[&str]) -> bool {
    if args.is_empty() || args.len() > 3 {
        eprintln!(
            "bad argument count {} to truncate, expected between 1 and 3 arguments",
            args.len()
        );
        return false;
    }
    let mut size = None;
    let mut prealloc = qimg::qcow2::Preallocation::Off;
    let mut i = 0;
    while i < args.len() {
        if args[i] == "-m" && i + 1 < args.len() {
            let mode = args[i + 1];
            match qimg::qcow2::Preallocation::parse(mode) {
                Ok(p) => prealloc = p,
                Err(_) => {
                    eprintln!("{}: Invalid preallocation mode '{mode}'", prog());
                    return false;
                }
            }
            i += 2;
            continue;
        }
        let Some(n) = cvtnum(args[i]) else {
            return false;
        };
        size = Some(n);
        i += 1;
    }
    let Some(size) = size else {
        eprintln!(
            "bad argument count {} to truncate, expected between 1 and 3 arguments",
            args.len()
        );
        return false;
    };
    match img.resize(size, prealloc).await {
        Ok(()) => true,
        Err(e) => {
            eprintln!("{}: {e}", prog());
            false
        }
    }
}

/// `sleep MILLISECONDS`.
pub(super) async fn sleep(args: &[&str]) -> bool {
    let [ms] = args[..] else {
        eprintln!(
            "bad argument count {} to sleep, expected 1 arguments",
            args.len()
        );
        return false;
    };
    let Some(ms) = cvtnum(ms) else {
        return false;
    };
    tokio::time::sleep(Duration::from_millis(ms)).await;
    true
}

/// `sigraise SIGNAL`: raises a signal against this process, after flushing what was printed
/// (the iotests use it with SIGKILL to leave an image as a killed process leaves it).
pub(super) fn sigraise(args: &[&str]) -> bool {
    let [arg] = args[..] else {
        eprintln!(
            "bad argument count {} to sigraise, expected 1 arguments",
            args.len()
        );
        return false;
    };
    let Some(sig) = cvtnum(arg) else {
        return false;
    };
    let Ok(sig) = i32::try_from(sig)
        .map_err(|_| ())
        .and_then(|s| if s < 65 { Ok(s) } else { Err(()) })
    else {
        println!("signal argument '{arg}' is too large to be a valid signal");
        return false;
    };
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: raise() has no memory-safety preconditions; the signal's disposition decides what
    // happens next, as for qemu-io.
    unsafe {
        libc::raise(sig);
    }
    true
}
