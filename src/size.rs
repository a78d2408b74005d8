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

/// Formats a size the way qemu-img's human output does (`1 GiB`, `448 KiB`, `0.977 KiB`):
/// QEMU's `size_to_str`, three significant digits, switching units at 1000.
pub fn human_size(v: u64) -> String {
    const PREFIX: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    let x = v as f64 / (1000.0 / 1024.0);
    // frexp: x = m * 2^e with m in [0.5, 1)
    let e = if x == 0.0 {
        0
    } else {
        x.log2().floor() as i64 + 1
    };
    let i = ((e - 1).max(0) / 10 * 10) as u32;
    let scaled = v as f64 / (1u64 << i) as f64;
    format!("{} {}B", fmt_g3(scaled), PREFIX[(i / 10) as usize])
}

/// C's `%0.3g`.
fn fmt_g3(x: f64) -> String {
    if x == 0.0 {
        return "0".into();
    }
    let sci = format!("{x:.2e}");
    let (mant, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if !(-4..3).contains(&exp) {
        let m = mant.trim_end_matches('0').trim_end_matches('.');
        return format!("{m}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    }
    let decimals = (2 - exp).max(0) as usize;
    let s = format!("{x:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
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
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(999), "999 B");
        assert_eq!(human_size(1000), "0.977 KiB");
        assert_eq!(human_size(1024), "1 KiB");
        assert_eq!(human_size(49664), "48.5 KiB");
        assert_eq!(human_size(197120), "192 KiB");
        assert_eq!(human_size(1310720), "1.25 MiB");
        assert_eq!(human_size(1376256), "1.31 MiB");
    }
}
