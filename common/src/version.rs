//! `--version` for every binary: the crate version and the git commit it was built from
//! (`build.rs`: the short hash, `-dirty` when tracked files differed, "unknown" outside git).

/// The commit this build came from.
pub const COMMIT: &str = env!("VNODE_GIT_COMMIT");

/// What `--version` prints after the binary's name, e.g. `0.1.0 (commit 50aadab1c2d3)`.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("VNODE_GIT_COMMIT"),
    ")"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_names_the_commit() {
        assert!(VERSION.starts_with(env!("CARGO_PKG_VERSION")));
        assert!(VERSION.contains(&format!("(commit {COMMIT})")));
        assert!(!COMMIT.is_empty());
    }
}
