//! qemu-io's guest I/O commands: `read`, `write`, `readv`, `writev`, `discard`, and the
//! asynchronous `aio_read`/`aio_write`, with qemu-io's flag checks and report lines.

use super::report::{cvtnum, dump_buffer, errno_text, parse_pattern, print_report};
use super::{Dev, Session, MAX_REQUEST};
use qimg::block::ZeroFlags;
use qimg::{IoBuf, IoBufMut};
use std::io::Write as _;
use std::time::Instant;

/// Parsed flags of read/write style commands.
#[derive(Default)]
struct Flags {
    pattern: Option<u8>,
    pattern_off: Option<u64>,
    pattern_len: Option<u64>,
    machine: bool,
    quiet: bool,
    verbose: bool,
    zero: bool,
    unmap: bool,
    compress: bool,
    no_fallback: bool,
    /// `-f`: Force Unit Access: the write is durable when it completes.
    fua: bool,
    /// `-i` (aio): account the request as invalid instead of doing it.
    invalid: bool,
    /// `write -s FILE`: the data comes from FILE, repeated to the request's length.
    source: Option<String>,
    /// `-b`: the request is on the VM state area, not the disk.
    vm_state: bool,
    /// `-r`: qemu-io registers the buffer (no effect here but on its checks).
    registered: bool,
}

impl Session {
    /// Parses flags; returns the flags and the positional arguments.
    fn parse<'a>(cmd: &str, args: &[&'a str], allowed: &str) -> Option<(Flags, Vec<&'a str>)> {
        let mut f = Flags::default();
        let mut pos = Vec::new();
        let mut i = 0;
        while i < args.len() {
            let a = args[i];
            if a.len() < 2 || !a.starts_with('-') || a.as_bytes()[1].is_ascii_digit() {
                pos.push(a);
                i += 1;
                continue;
            }
            let mut chars = a[1..].chars();
            while let Some(c) = chars.next() {
                if !allowed.contains(c) {
                    eprintln!("{cmd}: invalid option -- '{c}'");
                    return None;
                }
                let takes_arg = matches!(c, 'P' | 's' | 'l');
                let value = if takes_arg {
                    let rest: String = chars.by_ref().collect();
                    if !rest.is_empty() {
                        Some(rest)
                    } else if i + 1 < args.len() {
                        i += 1;
                        Some(args[i].to_string())
                    } else {
                        eprintln!("{cmd}: option requires an argument -- '{c}'");
                        return None;
                    }
                } else {
                    None
                };
                match (c, value) {
                    ('P', Some(v)) => match parse_pattern(&v) {
                        Some(p) => f.pattern = Some(p),
                        None => {
                            println!("{v} is not a valid pattern byte");
                            return None;
                        }
                    },
                    ('s', Some(v)) if matches!(cmd, "write" | "w") => f.source = Some(v),
                    ('s', Some(v)) => f.pattern_off = Some(cvtnum(&v)?),
                    ('l', Some(v)) => f.pattern_len = Some(cvtnum(&v)?),
                    ('C', _) => f.machine = true,
                    ('q', _) => f.quiet = true,
                    ('v', _) => f.verbose = true,
                    ('z', _) => f.zero = true,
                    ('u', _) => f.unmap = true,
                    ('c', _) => f.compress = true,
                    ('n', _) => f.no_fallback = true,
                    ('b', _) => f.vm_state = true,
                    ('f', _) => f.fua = true,
                    ('i', _) => f.invalid = true,
                    // qemu-io: `-p` is "ignored for backwards compatibility"; `-r` registers the
                    // buffer with the block layer, a performance hint with no effect on what is
                    // read or written (our buffers need no registration).
                    ('r', _) => f.registered = true,
                    ('p', _) => {}
                    _ => {}
                }
            }
            i += 1;
        }
        Some((f, pos))
    }

    pub(super) async fn rw(
        &mut self,
        img: &Dev,
        cmd: &str,
        kind: &str,
        args: &[&str],
        vectored: bool,
    ) -> bool {
        let write = kind.starts_with('w');
        let allowed = match (write, vectored) {
            (false, false) => "CqvPslpbr",
            (false, true) => "CqvPr",
            (true, false) => "CqzuPcnfpbrs",
            (true, true) => "CqPfr",
        };
        let Some((f, pos)) = Self::parse(cmd, args, allowed) else {
            return false;
        };
        if pos.len() < 2 || (!vectored && pos.len() > 2) {
            eprintln!(
                "bad argument count {} to {kind}, expected at least 2 arguments",
                args.len()
            );
            return false;
        }
        let Some(offset) = cvtnum(pos[0]) else {
            return false;
        };
        let mut len = 0u64;
        for p in &pos[1..] {
            let Some(n) = cvtnum(p) else { return false };
            if vectored && n > MAX_REQUEST {
                println!("Argument '{p}' exceeds maximum size {MAX_REQUEST}");
                return false;
            }
            len += n;
        }
        if write {
            if f.vm_state && f.zero {
                println!("-b and -z cannot be specified at the same time");
                return false;
            }
            if f.fua && (f.vm_state || f.compress) {
                println!("-f and -b or -c cannot be specified at the same time");
                return false;
            }
            if usize::from(f.zero)
                + usize::from(f.pattern.is_some())
                + usize::from(f.source.is_some())
                > 1
            {
                println!("Only one of -z, -P, and -s can be specified at the same time");
                return false;
            }
            if f.unmap && !f.zero {
                println!("-u requires -z to be specified");
                return false;
            }
            if f.no_fallback && !f.zero {
                println!("-n requires -z to be specified");
                return false;
            }
            if len > MAX_REQUEST && !(f.zero && f.no_fallback) {
                println!(
                    "length cannot exceed {MAX_REQUEST} without -n, given {}",
                    pos[1]
                );
                return false;
            }
        } else if len > MAX_REQUEST {
            println!("length cannot exceed {MAX_REQUEST}, given {}", pos[1]);
            return false;
        }
        if (f.compress || f.vm_state) && (offset % 512 != 0 || len % 512 != 0) {
            let (what, v) = if offset % 512 != 0 {
                ("offset", offset)
            } else {
                ("count", len)
            };
            println!("{v} is not a sector-aligned value for '{what}'");
            return false;
        }
        if f.vm_state && !write && f.registered {
            println!("I/O buffer registration is not supported when reading from vmstate");
            return false;
        }
        // The data is ready before the clock starts, as in qemu-io.
        let data = if write && !f.zero {
            let Some(buf) = write_buffer(len, &f) else {
                return false;
            };
            Some(buf)
        } else {
            None
        };
        let start = Instant::now();
        let result = match (write, f.vm_state) {
            (true, false) => Self::do_write(img, offset, len, &f, data)
                .await
                .map(|_| None),
            (false, false) => img
                .read(offset, IoBufMut::zeroed(len as usize))
                .await
                .map(Some),
            (true, true) => match vm_state(img, len) {
                Ok(q) => q
                    .write_vm_state(offset, data.unwrap_or_else(|| IoBuf::zeroed(0)))
                    .await
                    .map(|_| None),
                Err(e) => Err(e),
            },
            (false, true) => match vm_state(img, len) {
                Ok(q) => q
                    .read_vm_state(offset, IoBufMut::zeroed(len as usize))
                    .await
                    .map(Some),
                Err(e) => Err(e),
            },
        };
        let elapsed = start.elapsed();
        match result {
            Err(e) => {
                println!("{kind} failed: {}", errno_text(&e));
                false
            }
            Ok(data) => {
                let mut ok = true;
                if let Some(buf) = &data {
                    ok = verify(kind, buf, offset, &f);
                    if f.verbose && !f.quiet {
                        dump_buffer(buf, offset);
                    }
                }
                if !f.quiet {
                    print_report(
                        if write { "wrote" } else { "read" },
                        elapsed,
                        offset,
                        len,
                        f.machine,
                    );
                }
                ok
            }
        }
    }

    /// Writes `data` (zeros with `-z`, where there is none), then flushes for `-f`.
    async fn do_write(
        img: &Dev,
        offset: u64,
        len: u64,
        f: &Flags,
        data: Option<IoBuf>,
    ) -> qimg::Result<()> {
        Self::write_once(img, offset, len, f, data).await?;
        if f.fua {
            // FUA: durable before the write is reported complete.
            img.flush().await?;
        }
        Ok(())
    }

    async fn write_once(
        img: &Dev,
        offset: u64,
        len: u64,
        f: &Flags,
        data: Option<IoBuf>,
    ) -> qimg::Result<()> {
        let Some(buf) = data.filter(|_| !f.zero) else {
            let flags = ZeroFlags {
                may_unmap: f.unmap,
                fast_only: f.no_fallback,
            };
            return img.write_zeroes(offset, len, flags).await;
        };
        if f.compress {
            return match img.as_qcow2() {
                Some(q) => q.write_compressed(offset, buf).await,
                None => Err(qimg::Error::unsupported(
                    "compressed writes need a qcow2 image",
                )),
            };
        }
        img.write(offset, buf).await
    }

    pub(super) async fn discard(&mut self, img: &Dev, cmd: &str, args: &[&str]) -> bool {
        let Some((f, pos)) = Self::parse(cmd, args, "Cq") else {
            return false;
        };
        if pos.len() != 2 {
            eprintln!(
                "bad argument count {} to discard, expected 2 arguments",
                args.len()
            );
            return false;
        }
        let (Some(offset), Some(len)) = (cvtnum(pos[0]), cvtnum(pos[1])) else {
            return false;
        };
        if len > MAX_REQUEST {
            println!("length cannot exceed {MAX_REQUEST}, given {}", pos[1]);
            return false;
        }
        let start = Instant::now();
        match img.discard(offset, len).await {
            Err(e) => {
                println!("discard failed: {}", errno_text(&e));
                false
            }
            Ok(()) => {
                if !f.quiet {
                    print_report("discard", start.elapsed(), offset, len, f.machine);
                }
                true
            }
        }
    }

    /// Starts an asynchronous request; its report is printed when it completes.
    pub(super) fn aio(&mut self, img: &Dev, cmd: &str, write: bool, args: &[&str]) -> bool {
        let allowed = if write { "CfiqruzP" } else { "CiqrvP" };
        let Some((f, pos)) = Self::parse(cmd, args, allowed) else {
            return false;
        };
        if f.invalid {
            // qemu-io only counts such a request in its statistics; it does no I/O.
            println!(
                "injecting invalid {} request",
                if write { "write" } else { "read" }
            );
            return true;
        }
        if pos.len() < 2 {
            eprintln!(
                "bad argument count {} to {cmd}, expected at least 2 arguments",
                args.len()
            );
            return false;
        }
        let Some(offset) = cvtnum(pos[0]) else {
            return false;
        };
        let mut len = 0;
        for p in &pos[1..] {
            let Some(n) = cvtnum(p) else { return false };
            len += n;
        }
        if write && f.zero && pos.len() > 2 {
            println!("-z supports only a single length parameter");
            return false;
        }
        if f.unmap && !f.zero {
            println!("-u requires -z to be specified");
            return false;
        }
        let img = img.clone();
        self.aio.spawn(async move {
            let start = Instant::now();
            if write {
                let r = if f.zero {
                    img.write_zeroes(
                        offset,
                        len,
                        ZeroFlags {
                            may_unmap: f.unmap,
                            fast_only: false,
                        },
                    )
                    .await
                } else {
                    let mut b = IoBufMut::zeroed(len as usize);
                    b.fill(f.pattern.unwrap_or(0xcd));
                    img.write(offset, b.freeze()).await
                };
                let r = match r {
                    Ok(()) if f.fua => img.flush().await,
                    r => r,
                };
                match r {
                    Ok(()) if !f.quiet => {
                        print_report("wrote", start.elapsed(), offset, len, f.machine)
                    }
                    Ok(()) => {}
                    Err(e) => println!("aio_write failed: {}", errno_text(&e)),
                }
            } else {
                let read = img.read(offset, IoBufMut::zeroed(len as usize)).await;
                // Everything this completion prints comes out together (the lock is reentrant).
                let _out = std::io::stdout().lock();
                match read {
                    Ok(buf) => {
                        if let Some(p) = f.pattern {
                            if buf.iter().any(|&b| b != p) {
                                println!(
                                    "Pattern verification failed at offset {offset}, {len} bytes"
                                );
                            }
                        }
                        if f.verbose && !f.quiet {
                            dump_buffer(&buf, offset);
                        }
                        if !f.quiet {
                            print_report("read", start.elapsed(), offset, len, f.machine);
                        }
                    }
                    Err(e) => println!("readv failed: {}", errno_text(&e)),
                }
            }
            let _ = std::io::stdout().flush();
        });
        true
    }
}

/// The qcow2 image whose VM state `-b` reads or writes: other formats have none (QEMU's
/// ENOTSUP), and qemu-io moves at most `INT_MAX` bytes of it at once (ERANGE).
fn vm_state(img: &Dev, len: u64) -> qimg::Result<&qimg::qcow2::Qcow2> {
    if len > i32::MAX as u64 {
        return Err(qimg::Error::Io {
            context: "VM state request".into(),
            source: std::io::Error::from_raw_os_error(libc::ERANGE),
        });
    }
    img.as_qcow2()
        .ok_or_else(|| qimg::Error::unsupported("the image has no VM state area"))
}

/// A write's data: the `-P` byte (qemu-io's 0xcd without one), or with `-s FILE` the file's
/// first `len` bytes, repeated if it is shorter. `None` after qemu-io's message when the file
/// cannot be read or is empty.
fn write_buffer(len: u64, f: &Flags) -> Option<IoBuf> {
    let mut buf = IoBufMut::zeroed(len as usize);
    let Some(path) = &f.source else {
        buf.fill(f.pattern.unwrap_or(0xcd));
        return Some(buf.freeze());
    };
    let read = std::fs::File::open(path).and_then(|file| {
        use std::io::Read as _;
        // Only what the request needs, however large the file.
        let mut n = 0;
        let mut file = file.take(len);
        loop {
            match file.read(&mut buf[n..]) {
                Ok(0) => return Ok(n),
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    });
    let n = match read {
        Ok(0) => {
            eprintln!("{path}: file is empty");
            return None;
        }
        Ok(n) => n,
        Err(e) => {
            eprintln!("{path}: {}", qimg::error::strerror(&e));
            return None;
        }
    };
    let mut filled = n;
    while n > 0 && filled < buf.len() {
        let k = n.min(buf.len() - filled);
        buf.copy_within(..k, filled);
        filled += k;
    }
    Some(buf.freeze())
}

/// `read -P` verification; prints qemu-io's message and returns false on mismatch.
fn verify(kind: &str, buf: &[u8], offset: u64, f: &Flags) -> bool {
    let Some(p) = f.pattern else { return true };
    let start = f.pattern_off.unwrap_or(0);
    let count = f
        .pattern_len
        .unwrap_or(buf.len() as u64 - start.min(buf.len() as u64));
    if start + count > buf.len() as u64 {
        println!("pattern verification range exceeds end of read data");
        return false;
    }
    let range = &buf[start as usize..(start + count) as usize];
    if range.iter().any(|&b| b != p) {
        if kind == "readv" {
            println!(
                "Pattern verification failed at offset {offset}, {} bytes",
                buf.len()
            );
        } else {
            println!(
                "Pattern verification failed at offset {}, {count} bytes",
                offset + start
            );
        }
        return false;
    }
    true
}
