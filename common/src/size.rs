//! Sizes on every command line and in every API: "4096", "64K", "512M", "1G", "1.5GiB" (binary
//! units: K = 1024).

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid size {0:?}: use a number with an optional K, M, G or T suffix (binary units)")]
pub struct SizeError(pub String);

/// Parses a size in bytes with binary units.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    parse_size::Config::new()
        .with_binary()
        .parse_size(s.trim())
        .map_err(|_| SizeError(s.to_owned()))
}

/// A size for people, in binary units: "512 B", "64 KiB", "1.5 GiB", "100 TiB".
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 || v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn sizes_for_people() {
        assert_eq!(format_size(512), "512 B");
        assert_eq!(format_size(64 << 10), "64 KiB");
        assert_eq!(format_size(3 << 29), "1.5 GiB");
        assert_eq!(format_size(100 << 40), "100 TiB");
    }
}
