//! Puts the git commit into `VNODE_GIT_COMMIT` for `--version` (src/version.rs): the short hash
//! of HEAD, `-dirty` when tracked files differ from it, "unknown" outside a git tree or without
//! git. Cargo reruns this when HEAD moves (a commit, a checkout, a reset: HEAD, the branch's ref
//! or packed-refs change) or the index changes (`git add`), in a worktree as in the main tree.

use std::path::{Path, PathBuf};
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        // `git status` must not rewrite the index: that would make cargo rerun this every build.
        .env("GIT_OPTIONAL_LOCKS", "0")
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn watch(p: &Path) {
    if p.exists() {
        println!("cargo:rerun-if-changed={}", p.display());
    }
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let commit = match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(hash) if !hash.is_empty() => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{hash}-dirty")
            } else {
                hash
            }
        }
        _ => "unknown".to_owned(),
    };
    // A worktree has its own git dir (HEAD, index) and shares the common one (refs).
    if let (Some(git_dir), Some(common_dir)) = (
        git(&["rev-parse", "--absolute-git-dir"]),
        git(&["rev-parse", "--path-format=absolute", "--git-common-dir"]),
    ) {
        let git_dir = PathBuf::from(git_dir);
        let common_dir = PathBuf::from(common_dir);
        watch(&git_dir.join("HEAD"));
        watch(&git_dir.join("index"));
        watch(&common_dir.join("packed-refs"));
        if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"]) {
            watch(&common_dir.join(r));
        }
    }
    println!("cargo:rustc-env=VNODE_GIT_COMMIT={commit}");
}
