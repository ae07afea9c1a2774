//! The storage side of the agent: serves the exports the manager assigns to this host, one
//! `vnode-blkd` per export (each under a monitor, on its own port of this host's address).
//!
//! Why a blkd per volume rather than an admin endpoint in one blkd: vnode-blkd's exports are
//! fixed at start and shared by its connection threads; one process per volume needs no change
//! to the NBD server, isolates volumes (a crash or a restart touches one disk), and gives each
//! export its own credential file. The cost is a process and a port per disk, which is what a
//! host of a few hundred disks can afford.
//!
//! Each export lives in `STATE/exports/NAME/` (`disk.img`, `addr`, and the monitor's files), so
//! a restarted agent adopts the servers still running. An export no longer assigned is stopped
//! and its files deleted: the space is freed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use vnode_manager_client::types::{ExportSpec, ServedExport};

use super::monitor;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("cannot prepare {path}")]
    Prepare {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub struct Storage {
    root: PathBuf,
    blkd_bin: PathBuf,
    /// The cluster key file: vnode-blkd derives each export's credential from it.
    key_file: PathBuf,
    ip: String,
    exports: BTreeMap<String, PathBuf>,
}

impl Storage {
    pub fn open(
        state_dir: &Path,
        blkd_bin: PathBuf,
        key_file: PathBuf,
        ip: String,
    ) -> Result<Storage, StorageError> {
        let root = state_dir.join("exports");
        std::fs::create_dir_all(&root).map_err(|source| StorageError::Prepare {
            path: root.clone(),
            source,
        })?;
        let exports = std::fs::read_dir(&root)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| Some((e.file_name().to_str()?.to_owned(), e.path())))
            .collect();
        Ok(Storage {
            root,
            blkd_bin,
            key_file,
            ip,
            exports,
        })
    }

    /// Bytes used by export files, and the exports served now with their addresses.
    pub fn report(&self) -> (u64, Vec<ServedExport>) {
        let mut used = 0;
        let mut served = Vec::new();
        for (name, dir) in &self.exports {
            used += std::fs::metadata(dir.join("disk.img")).map_or(0, |m| m.len());
            let addr = std::fs::read_to_string(dir.join("addr")).unwrap_or_default();
            if monitor::alive_pid(dir).is_some() && !addr.trim().is_empty() {
                served.push(ServedExport {
                    name: name.clone(),
                    addr: addr.trim().to_owned(),
                });
            }
        }
        (used, served)
    }

    /// Serves every export of `want` (restarting a server that died), removes the others.
    pub fn apply(&mut self, want: &[ExportSpec]) {
        for e in want {
            if !valid_name(&e.name) {
                tracing::error!(export = %e.name, "refusing an export name that is not a plain file name");
                continue;
            }
            let dir = self.root.join(&e.name);
            let running = monitor::alive_pid(&dir).is_some();
            let starting = dir.join("starting").exists() && monitor::ended(&dir).is_none();
            if running || starting {
                continue;
            }
            match self.serve(e, &dir) {
                Ok(()) => tracing::info!(export = %e.name, "export served"),
                Err(err) => tracing::error!(export = %e.name, error = %err, "cannot serve export"),
            }
            self.exports.insert(e.name.clone(), dir);
        }
        let gone: Vec<String> = self
            .exports
            .keys()
            .filter(|n| !want.iter().any(|e| &e.name == *n))
            .cloned()
            .collect();
        for name in gone {
            let dir = self.exports.remove(&name).expect("listed above");
            if let Some(pid) = monitor::alive_pid(&dir) {
                // SAFETY: kill(2) has no memory effects; pid is the blkd this agent started.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => tracing::info!(export = %name, "export removed, its disk deleted"),
                Err(e) => {
                    tracing::warn!(export = %name, error = %e, "cannot delete the export's files")
                }
            }
        }
    }

    fn serve(&self, e: &ExportSpec, dir: &Path) -> Result<(), StorageError> {
        let prep = |source| StorageError::Prepare {
            path: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(prep)?;
        for f in ["exit", "pid", "addr"] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        std::fs::write(dir.join("starting"), b"").map_err(prep)?;
        let img = dir.join("disk.img");
        let args = vec![
            "--listen".to_owned(),
            format!("{}:0", self.ip),
            "--export".to_owned(),
            format!("{}={}:{}", e.name, img.display(), e.size.0),
            "--ready-file".to_owned(),
            dir.join("addr").display().to_string(),
            "--secret-file".to_owned(),
            self.key_file.display().to_string(),
        ];
        monitor::start(dir, &self.blkd_bin, &args).map_err(|m| StorageError::Prepare {
            path: dir.to_owned(),
            source: std::io::Error::other(m.to_string()),
        })
    }
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 128
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !n.starts_with('.')
}
