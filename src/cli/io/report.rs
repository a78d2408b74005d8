//! qemu-io's number syntax (`cvtnum`, patterns) and its output: report lines, sizes, times,
//! buffer dumps and error texts, exactly as qemu-io prints them (scripts compare them).

use qimg::Error;
use std::time::Duration;

pub(super) fn parse_pattern(v: &str) -> Option<u8> {
    let n = if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        i64::from_str_radix(h, 16).ok()?
    } else if v.len() > 1 && v.starts_with('0') {
        i64::from_str_radix(&v[1..], 8).ok()?
    } else {
        v.parse::<i64>().ok()?
    };
    u8::try_from(n).ok()
}

/// qemu-io's number parser (qemu_strtosz), with its error messages.
pub(super) fn cvtnum(s: &str) -> Option<u64> {
    let hex_with_suffix = (s.starts_with("0x") || s.starts_with("0X"))
        && s[2..].chars().any(|c| !c.is_ascii_hexdigit());
    match qimg::size::parse_size(s) {
        Ok(v) if !hex_with_suffix => Some(v),
        Err(qimg::size::SizeError::TooLarge) => {
            println!("Parsing error: argument too large -- {s}");
            None
        }
        _ => {
            println!(
                "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {s}"
            );
            None
        }
    }
}

/// The two report lines after each request.
pub(super) fn print_report(op: &str, t: Duration, offset: u64, count: u64, machine: bool) {
    let secs = t.as_secs_f64().max(1e-9);
    if machine {
        println!(
            "{count},1,{},{:.3},{:.3}",
            timestr(t, true),
            count as f64 / secs,
            1.0 / secs
        );
        return;
    }
    // One write: reports of concurrent requests must not interleave line by line.
    print!(
        "{op} {count}/{count} bytes at offset {offset}\n{}, 1 ops; {} ({}/sec and {:.4} ops/sec)\n",
        cvtstr(count as f64),
        timestr(t, false),
        cvtstr(count as f64 / secs),
        1.0 / secs
    );
}

/// qemu-io's human size (`64 KiB`, `1.500 KiB`, `40 bytes`).
pub(super) fn cvtstr(v: f64) -> String {
    const UNITS: [(f64, &str); 6] = [
        ((1u64 << 60) as f64, "EiB"),
        ((1u64 << 50) as f64, "PiB"),
        ((1u64 << 40) as f64, "TiB"),
        ((1u64 << 30) as f64, "GiB"),
        ((1u64 << 20) as f64, "MiB"),
        ((1u64 << 10) as f64, "KiB"),
    ];
    let (s, suffix) = match UNITS.iter().find(|(u, _)| v >= *u) {
        Some((u, name)) => (format!("{:.3}", v / u), format!(" {name}")),
        None => (format!("{v:.6}"), " bytes".to_string()),
    };
    match s.find(".000") {
        Some(i) if s[i..].chars().skip(1).all(|c| c == '0') => format!("{}{suffix}", &s[..i]),
        _ => format!("{s}{suffix}"),
    }
}

/// qemu-io's elapsed time (`00.01 sec`, or `H:MM:SS.ss`).
pub(super) fn timestr(t: Duration, always_hms: bool) -> String {
    let secs = t.as_secs();
    let frac = f64::from(t.subsec_nanos()) / 1e9;
    if secs == 0 && !always_hms {
        return format!("{frac:05.2} sec");
    }
    format!(
        "{}:{:02}:{:05.2}",
        secs / 3600,
        (secs / 60) % 60,
        (secs % 60) as f64 + frac
    )
}

/// `read -v`: 16 bytes per line, offset, hex, printable characters.
pub(super) fn dump_buffer(buf: &[u8], offset: u64) {
    let mut out = String::new();
    for (i, line) in buf.chunks(16).enumerate() {
        out += &format!("{:08x}:  ", offset + i as u64 * 16);
        for b in line {
            out += &format!("{b:02x} ");
        }
        out.push(' ');
        for &b in line {
            out.push(if b.is_ascii_alphanumeric() {
                b as char
            } else {
                '.'
            });
        }
        out.push('\n');
    }
    print!("{out}");
}

/// The strerror text of an error, as qemu-io prints after "read failed: ".
pub fn errno_text(e: &Error) -> String {
    match e {
        Error::OutOfRange { .. } => "Input/output error".into(),
        Error::ReadOnly => "Block node is read-only".into(),
        other => qimg::error::strerror(&std::io::Error::from_raw_os_error(other.errno())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_like_qemu_io() {
        assert_eq!(cvtstr(0.0), "0 bytes");
        assert_eq!(cvtstr(40.0), "40 bytes");
        assert_eq!(cvtstr(511.5), "511.500000 bytes");
        assert_eq!(cvtstr(1024.0), "1 KiB");
        assert_eq!(cvtstr(1025.0), "1.001 KiB");
        assert_eq!(cvtstr(1536.0), "1.500 KiB");
        assert_eq!(cvtstr(65535.0), "63.999 KiB");
        assert_eq!(cvtstr(65536.0), "64 KiB");
        assert_eq!(cvtstr(100000.0), "97.656 KiB");
        assert_eq!(cvtstr(1048576.0), "1 MiB");
        assert_eq!(cvtstr(1073741824.0), "1 GiB");
    }

    #[test]
    fn times_like_qemu_io() {
        assert_eq!(timestr(Duration::from_millis(10), false), "00.01 sec");
        assert_eq!(timestr(Duration::from_millis(1500), false), "0:00:01.50");
        assert_eq!(timestr(Duration::from_millis(61250), false), "0:01:01.25");
    }

    #[test]
    fn patterns() {
        assert_eq!(parse_pattern("0xab"), Some(0xab));
        assert_eq!(parse_pattern("0101"), Some(65));
        assert_eq!(parse_pattern("65"), Some(65));
        assert_eq!(parse_pattern("256"), None);
        assert_eq!(parse_pattern("xyz"), None);
    }
}
