//! Byte sizes as people write them (`12G`, `512M`) and read them.

use crate::{Error, Result};

/// `1.5G`-style size for messages.
pub fn fmt_size(b: u64) -> String {
    if b == u64::MAX {
        return "unlimited".into();
    }
    let units = [("G", 1u64 << 30), ("M", 1 << 20), ("K", 1 << 10)];
    for (u, n) in units {
        if b >= n {
            return format!("{:.2}{u}", b as f64 / n as f64);
        }
    }
    format!("{b}")
}

/// Parses `12G`, `512M`, `1.5G`, `4096` (binary units).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let unit = t[i..].to_ascii_uppercase();
            let m: u64 = match unit.trim_end_matches("IB").trim_end_matches('B') {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                _ => return Err(Error::Invalid(format!("size {s:?}: unknown unit {unit:?}"))),
            };
            (&t[..i], m)
        }
        None => (t, 1),
    };
    let v: f64 = num.trim().parse().map_err(|_| {
        Error::Invalid(format!(
            "size {s:?} is not a number with an optional K/M/G/T unit"
        ))
    })?;
    if !(v.is_finite() && v >= 0.0) || v * mult as f64 > u64::MAX as f64 / 2.0 {
        return Err(Error::Invalid(format!("size {s:?} is out of range")));
    }
    Ok((v * mult as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("12G").unwrap(), 12 << 30);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("16K").unwrap(), 16 << 10);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("G").is_err());
    }
}
