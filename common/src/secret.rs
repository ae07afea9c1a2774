//! The one secret loader every binary uses: from a file (`--secret-file`, or a `secret-file=`
//! option), else from an environment variable. Trailing line endings (`\n`, `\r\n`, any mix) are
//! stripped the same way everywhere, so a file written on any system works with every binary.
//! Secrets never come from a command-line value (visible in `ps`).

use std::path::{Path, PathBuf};

/// Longest secret accepted, in bytes.
pub const MAX_SECRET: usize = 1024;

/// A secret's bytes. `Debug` never prints them.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// A secret from bytes already in memory (tests, derived keys).
    pub fn from_bytes(bytes: impl Into<Vec<u8>>) -> Result<Self, SecretError> {
        let bytes = strip_line_endings(bytes.into());
        if bytes.is_empty() {
            return Err(SecretError::Empty);
        }
        if bytes.len() > MAX_SECRET {
            return Err(SecretError::TooLong(bytes.len()));
        }
        Ok(Self(bytes))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read secret file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the secret is empty")]
    Empty,
    #[error("the secret is {0} bytes, more than the {MAX_SECRET} allowed")]
    TooLong(usize),
}

fn strip_line_endings(mut b: Vec<u8>) -> Vec<u8> {
    while matches!(b.last(), Some(b'\n' | b'\r')) {
        b.pop();
    }
    b
}

/// Reads the secret from `file` if given, else from `$env` if set; `Ok(None)` if neither is.
pub fn load(file: Option<&Path>, env: &str) -> Result<Option<Secret>, SecretError> {
    let raw = match file {
        Some(path) => std::fs::read(path).map_err(|source| SecretError::Read {
            path: path.to_owned(),
            source,
        })?,
        None => match std::env::var_os(env) {
            Some(v) => std::os::unix::ffi::OsStringExt::into_vec(v),
            None => return Ok(None),
        },
    };
    Secret::from_bytes(raw).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_endings_are_stripped_the_same_way() {
        for raw in [
            &b"key\n"[..],
            b"key\r\n",
            b"key",
            b"key\n\n",
            b"key\r\n\r\n",
        ] {
            assert_eq!(Secret::from_bytes(raw.to_vec()).unwrap().as_bytes(), b"key");
        }
        assert!(matches!(
            Secret::from_bytes(b"\r\n".to_vec()),
            Err(SecretError::Empty)
        ));
        assert!(matches!(
            Secret::from_bytes(vec![b'x'; MAX_SECRET + 1]),
            Err(SecretError::TooLong(_))
        ));
        assert_eq!(
            format!("{:?}", Secret::from_bytes(b"k".to_vec()).unwrap()),
            "Secret(1 bytes)"
        );
    }

    #[test]
    fn file_wins_over_environment() {
        let dir = std::env::temp_dir().join(format!("vnode-secret-{}", std::process::id()));
        std::fs::write(&dir, b"from-file\r\n").unwrap();
        let s = load(Some(&dir), "VNODE_COMMON_TEST_UNSET")
            .unwrap()
            .unwrap();
        assert_eq!(s.as_bytes(), b"from-file");
        assert!(load(None, "VNODE_COMMON_TEST_UNSET").unwrap().is_none());
        assert!(load(Some(Path::new("/nonexistent/x")), "X").is_err());
        std::fs::remove_file(dir).unwrap();
    }
}
