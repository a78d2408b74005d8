//! The table of `qimg io`'s commands: names, short names, usage lines and help, and `help`.
//!
//! Usage lines and one-line summaries are qemu-io's, character for character: they are printed
//! on usage errors, and scripts and people switching from qemu-io read them. The extended help
//! describes what qimg does, including the few options it refuses.

/// One command of the table.
pub(super) struct Command {
    pub name: &'static str,
    /// qemu-io's short name (`r` for `read`).
    pub alt: Option<&'static str>,
    /// Usage after the name (qemu-io's; `None` where qemu-io has none, which is not quite the
    /// same as an empty one in its layout).
    pub args: Option<&'static str>,
    /// qemu-io's one-line summary.
    pub oneline: &'static str,
    /// Extended help (`help NAME`), empty where the summary says it all.
    pub help: &'static str,
    /// It works on the open image: without one it says "no file open".
    pub needs_image: bool,
}

const fn cmd(
    name: &'static str,
    alt: Option<&'static str>,
    args: Option<&'static str>,
    oneline: &'static str,
    help: &'static str,
    needs_image: bool,
) -> Command {
    Command {
        name,
        alt,
        args,
        oneline,
        help,
        needs_image,
    }
}

/// Every command, sorted by name (the order `help` lists them in).
pub(super) const COMMANDS: &[Command] = &[
    cmd(
        "abort",
        None,
        None,
        "simulate a program crash using abort(3)",
        "",
        false,
    ),
    cmd(
        "aio_flush",
        None,
        None,
        "completes all outstanding aio requests",
        "",
        true,
    ),
    cmd(
        "aio_read",
        None,
        Some("[-Ciqrv] [-P pattern] off len [len..]"),
        "asynchronously reads a number of bytes",
        "
 Starts a read of the given lengths (added up) and returns at once; the
 result is printed when the read completes, interleaved with later commands.
 -C, -- report statistics in a machine parsable format
 -i, -- account the request as invalid: nothing is read
 -P, -- check that every byte read is the pattern byte
 -q, -- quiet mode, do not show I/O statistics
 -r, -- accepted, without effect (qimg's buffers need no registration)
 -v, -- dump the data read to standard output
",
        true,
    ),
    cmd(
        "aio_write",
        None,
        Some("[-Cfiqruz] [-P pattern] off len [len..]"),
        "asynchronously writes a number of bytes",
        "
 Starts a write of the given lengths (added up) and returns at once; the
 result is printed when the write completes. The data is the pattern byte
 (0xcd unless -P says otherwise).
 -C, -- report statistics in a machine parsable format
 -f, -- Force Unit Access: durable when it completes
 -i, -- account the request as invalid: nothing is written
 -P, -- the byte to write
 -q, -- quiet mode, do not show I/O statistics
 -r, -- accepted, without effect (qimg's buffers need no registration)
 -u, -- with -z, the clusters may be deallocated
 -z, -- write zeroes (one length only)
",
        true,
    ),
    cmd(
        "alloc",
        Some("a"),
        Some("offset [count]"),
        "checks if offset is allocated in the file",
        "
 Counts the bytes of the range (512 unless given) that the image itself
 allocates, as data or as zeros; what only its backing file has does not count.

 Example:
 'alloc 64k 1M' - how much of the megabyte at 64k the image allocates
",
        true,
    ),
    cmd(
        "break",
        None,
        Some("event tag"),
        "sets a breakpoint on event and tags the stopped request as tag",
        "
 Needs a blkdebug node in the image (blkdebug::FILE, file.driver=blkdebug).
 The next request that reaches the event waits, tagged, until 'resume tag'.
",
        true,
    ),
    cmd(
        "close",
        Some("c"),
        None,
        "close the current open file",
        "
 Waits for asynchronous requests, then flushes and closes the image.
",
        false,
    ),
    cmd(
        "discard",
        Some("d"),
        Some("[-Cq] off len"),
        "discards a number of bytes at a specified offset",
        "
 Discards the range: whole clusters in it read as zeros afterwards, their
 space freed (on a version 2 image over a backing file, which has no zero
 flag, they are left as they are); the rest is unchanged.
 With the discard mode 'ignore' (-d) it succeeds and changes nothing.
 -C, -- report statistics in a machine parsable format
 -q, -- quiet mode, do not show I/O statistics
",
        true,
    ),
    cmd(
        "flush",
        Some("f"),
        None,
        "flush all in-core file state to disk",
        "",
        true,
    ),
    cmd(
        "help",
        Some("?"),
        Some("[command]"),
        "help for one or all commands",
        "",
        false,
    ),
    cmd(
        "info",
        Some("i"),
        None,
        "prints information about the current file",
        "",
        true,
    ),
    cmd(
        "length",
        Some("l"),
        None,
        "gets the length of the current file",
        "",
        true,
    ),
    cmd(
        "map",
        None,
        Some(""),
        "prints the allocated areas of a file",
        "",
        true,
    ),
    cmd(
        "open",
        Some("o"),
        Some("[-rsCnkU] [-t cache] [-d discard] [-o options] [path]"),
        "open the file specified by path",
        "
 Opens an image for the other commands (one at a time: 'close' first).
 Without a path, the options name it (-o driver=qcow2,file.filename=PATH).

 Example:
 'open -r -o l2-cache-size=1M disk.qcow2' - opens disk.qcow2 read-only

 -r, -- open read-only
 -s, -- write into a temporary overlay, dropped when closed
 -C, -- copy what reads fetch from the backing chain into the image
 -n, -- bypass the host page cache (-t none)
 -k, -- refused: Linux AIO is not implemented (-i io_uring is)
 -U, -- share the image with writers (read-only opens)
 -i, -- how file I/O is issued: threads or io_uring
 -t, -- cache mode: writethrough (the default), writeback, none,
        directsync, unsafe
 -d, -- discard mode: unmap (the default) or ignore
 -o, -- driver options (cache sizes, overlap checks, file.*, ...)
",
        false,
    ),
    cmd("quit", Some("q"), None, "exit the program", "", false),
    cmd(
        "read",
        Some("r"),
        Some("[-abCqrv] [-P pattern [-s off] [-l len]] off len"),
        "reads a number of bytes at a specified offset",
        "
 Reads the range through the backing chain.

 Example:
 'read -v 512 1k' - reads a kilobyte at 512 and dumps it

 -b, -- refused: qimg has no VM-state area
 -C, -- report statistics in a machine parsable format
 -l, -- with -P, how many bytes to check
 -p, -- accepted, without effect (as in qemu-io)
 -P, -- check that the bytes read are the pattern byte
 -q, -- quiet mode, do not show I/O statistics
 -r, -- accepted, without effect (qimg's buffers need no registration)
 -s, -- with -P, where in the range checking starts
 -v, -- dump the data read to standard output
",
        true,
    ),
    cmd(
        "readv",
        None,
        Some("[-Cqrv] [-P pattern] off len [len..]"),
        "reads a number of bytes at a specified offset",
        "
 Reads the given lengths, one after the other from the offset, as one request.
 -C, -- report statistics in a machine parsable format
 -P, -- check that the bytes read are the pattern byte
 -q, -- quiet mode, do not show I/O statistics
 -r, -- accepted, without effect
 -v, -- dump the data read to standard output
",
        true,
    ),
    cmd(
        "remove_break",
        None,
        Some("tag"),
        "remove a breakpoint by tag",
        "",
        true,
    ),
    cmd(
        "reopen",
        None,
        Some("[(-r|-w)] [-c cache] [-o options]"),
        "reopens an image with new options",
        "
 Closes the image and opens it again with what changes; if that fails, it is
 opened again as it was.
 -r, -- read-only
 -w, -- read-write
 -c, -- cache mode
 -o, -- driver options, added to those it was opened with
",
        true,
    ),
    cmd(
        "resume",
        None,
        Some("tag"),
        "resumes the request tagged as tag",
        "",
        true,
    ),
    cmd(
        "sigraise",
        None,
        Some("signal"),
        "raises a signal",
        "
 Sends the signal (a number) to this process, after what was printed is
 flushed. 'sigraise 9' ends it as a kill -9 would.
",
        false,
    ),
    cmd(
        "sleep",
        None,
        None,
        "waits for the given value in milliseconds",
        "",
        false,
    ),
    cmd(
        "truncate",
        Some("t"),
        Some("[-m prealloc_mode] off"),
        "truncates the current file at the given offset",
        "
 Changes the image's size either way; -m preallocates what grows (off,
 metadata, falloc, full).
",
        true,
    ),
    cmd(
        "wait_break",
        None,
        Some("tag"),
        "waits for the suspension of a request",
        "",
        true,
    ),
    cmd(
        "write",
        Some("w"),
        Some("[-bcCfnqruz] [-P pattern | -s source_file] off len"),
        "writes a number of bytes at a specified offset",
        "
 Writes the range with the pattern byte (0xcd unless -P says otherwise).

 Example:
 'write -P 0xab 512 1k' - writes a kilobyte of 0xab at 512

 -b, -- refused: qimg has no VM-state area
 -c, -- write compressed clusters (whole clusters)
 -C, -- report statistics in a machine parsable format
 -f, -- Force Unit Access: durable when it completes
 -n, -- with -z, fail rather than write zeroes as data
 -p, -- accepted, without effect (as in qemu-io)
 -P, -- the byte to write
 -q, -- quiet mode, do not show I/O statistics
 -r, -- accepted, without effect (qimg's buffers need no registration)
 -s, -- the data is this file's, repeated to the length
 -u, -- with -z, the clusters may be deallocated
 -z, -- write zeroes
",
        true,
    ),
    cmd(
        "writev",
        None,
        Some("[-Cfqr] [-P pattern] off len [len..]"),
        "writes a number of bytes at a specified offset",
        "
 Writes the given lengths, one after the other from the offset, as one request.
 -C, -- report statistics in a machine parsable format
 -f, -- Force Unit Access: durable when it completes
 -P, -- the byte to write
 -q, -- quiet mode, do not show I/O statistics
 -r, -- accepted, without effect
",
        true,
    ),
];

/// The command a name (or short name) stands for.
pub(super) fn find(name: &str) -> Option<&'static Command> {
    COMMANDS
        .iter()
        .find(|c| c.name == name || c.alt == Some(name))
}

/// `help [COMMAND]`: every command's usage line, or one command's with its extended help, as
/// qemu-io lays them out. Returns false for an unknown command.
pub(super) fn help(args: &[&str]) -> bool {
    match args {
        [] => {
            for c in COMMANDS {
                println!("{}", oneline(c.name, c));
            }
            println!("\nUse 'help commandname' for extended help.");
            true
        }
        [name] => match find(name) {
            Some(c) => {
                println!("{}", oneline(name, c));
                print!("{}", c.help);
                true
            }
            None => {
                println!("command {name} not found");
                false
            }
        },
        _ => {
            eprintln!(
                "bad argument count {} to help, expected between 0 and 1 arguments",
                args.len()
            );
            false
        }
    }
}

/// Prints a command's usage line, as qemu-io does after a usage error.
pub(super) fn usage(name: &str) {
    if let Some(c) = find(name) {
        println!("{}", oneline(c.name, c));
    }
}

/// `NAME ARGS -- SUMMARY`, under the name it was asked for.
pub(super) fn oneline(name: &str, c: &Command) -> String {
    match c.args {
        Some(args) => format!("{name} {args} -- {}", c.oneline),
        None => format!("{name} -- {}", c.oneline),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_sorted_and_names_are_unique() {
        for w in COMMANDS.windows(2) {
            assert!(w[0].name < w[1].name, "{} before {}", w[0].name, w[1].name);
        }
        let mut names: Vec<&str> = COMMANDS
            .iter()
            .flat_map(|c| std::iter::once(c.name).chain(c.alt))
            .collect();
        let n = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), n);
    }
}
