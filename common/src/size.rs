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
}
