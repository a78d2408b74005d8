//! Parsing of sizes and booleans the way QEMU's tools accept them: `512`, `64k`, `1.5G`,
//! `0x10000`; suffixes k, M, G, T, P, E (powers of 1024, any case), `B` for bytes; a fraction
//! only together with a suffix.

/// Why a size did not parse.
#[derive(Debug, PartialEq, Eq)]
pub enum SizeError {
    Invalid,
    TooLarge,
}

/// Parses a size in bytes.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let s = s.trim();
    if s.is_empty() || s.starts_with('-') {
        return Err(SizeError::Invalid);
    }
    let (digits, rest) = if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        let end = hex
            .find(|c: char| !c.is_ascii_hexdigit())
            .unwrap_or(hex.len());
        if end == 0 {
            return Err(SizeError::Invalid);
        }
        let v = u64::from_str_radix(&hex[..end], 16).map_err(|_| SizeError::TooLarge)?;
        (Number::Int(v), &hex[end..])
    } else {
        let end = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let num = &s[..end];
        if num.is_empty() || num.matches('.').count() > 1 || num.starts_with('.') {
            return Err(SizeError::Invalid);
        }
        match num.split_once('.') {
            None => (
                Number::Int(num.parse().map_err(|_| SizeError::TooLarge)?),
                &s[end..],
            ),
            Some((int, frac)) => {
                let int: u64 = int.parse().map_err(|_| SizeError::TooLarge)?;
                let frac_val: f64 = format!("0.{frac}")
                    .parse()
                    .map_err(|_| SizeError::Invalid)?;
                (Number::Frac(int, frac_val), &s[end..])
            }
        }
    };
    let mult: u64 = match rest {
        "" | "b" | "B" => 1,
        "k" | "K" => 1 << 10,
        "m" | "M" => 1 << 20,
        "g" | "G" => 1 << 30,
        "t" | "T" => 1 << 40,
        "p" | "P" => 1 << 50,
        "e" | "E" => 1 << 60,
        _ => return Err(SizeError::Invalid),
    };
    let v = match digits {
        Number::Int(v) => v.checked_mul(mult).ok_or(SizeError::TooLarge)?,
        Number::Frac(int, frac) => {
            if mult == 1 && frac != 0.0 {
                return Err(SizeError::Invalid); // fractions need a unit
            }
            let whole = int.checked_mul(mult).ok_or(SizeError::TooLarge)?;
            whole
                .checked_add((frac * mult as f64) as u64)
                .ok_or(SizeError::TooLarge)?
        }
    };
    if v > i64::MAX as u64 {
        return Err(SizeError::TooLarge);
    }
    Ok(v)
}

enum Number {
    Int(u64),
    Frac(u64, f64),
}

/// Parses on/off style booleans as QEMU's option parser does.
pub fn parse_bool(key: &str, v: &str) -> crate::error::Result<bool> {
    match v {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(crate::error::Error::arg(format!(
            "Parameter '{key}' expects 'on' or 'off'"
        ))),
    }
}

/// Formats a size the way qemu-img's human output does (`1 GiB`, `448 KiB`, `1.5 MiB`).
pub fn human_size(v: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if v < 1024 {
        return format!("{v} B");
    }
    let mut unit = 0;
    let mut x = v as f64;
    while x >= 1024.0 && unit < UNITS.len() - 1 {
        x /= 1024.0;
        unit += 1;
    }
    // QEMU prints up to 3 significant digits, trimming trailing zeros.
    let s = if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    };
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    };
    format!("{s} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("1.5M"), Ok(3 << 19));
        assert_eq!(parse_size("0x10000"), Ok(65536));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("100B"), Ok(100));
        assert_eq!(parse_size("1.5"), Err(SizeError::Invalid));
        assert_eq!(parse_size("abc"), Err(SizeError::Invalid));
        assert_eq!(parse_size("-1"), Err(SizeError::Invalid));
        assert_eq!(parse_size("10X"), Err(SizeError::Invalid));
        assert_eq!(parse_size("9E"), Err(SizeError::TooLarge));
        assert_eq!(parse_size(""), Err(SizeError::Invalid));
    }

    #[test]
    fn human() {
        assert_eq!(human_size(1 << 30), "1 GiB");
        assert_eq!(human_size(458752), "448 KiB");
        assert_eq!(human_size(397312), "388 KiB");
        assert_eq!(human_size(1536 << 10), "1.5 MiB");
        assert_eq!(human_size(100), "100 B");
    }
}
