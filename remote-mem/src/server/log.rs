//! The memory log: what a memory server stores, kept in `--data-dir` so it survives a restart.
//!
//! Each region is one file, `<vnode>-<region>.pages` (both as 16 hex digits), `pages * 4096`
//! bytes long, mapped shared into the server: a page write is a store into the page cache, and
//! the kernel writes it back. So the contents survive the server's death (kill -9 included) at
//! no cost on the write path; `--sync` adds an msync before each write is acknowledged, for
//! surviving a host crash too.
//!
//! Why files rather than an append-only log: the VMM writes the same pages over and over
//! (every eviction of a hot page), so a log would grow without bound and need compaction,
//! while a page file is its own compacted log. A region's creation is made atomic by creating
//! it under a temporary name and renaming it.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::mapping::Mapping;
use crate::protocol::PAGE_SIZE;

#[derive(Debug, Error)]
pub enum LogError {
    #[error("memory log {path}: cannot open")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("memory log {path}: cannot create region file")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "memory log {path}: no room for {bytes} bytes in the data directory ({available} bytes available)"
    )]
    NoSpace {
        path: PathBuf,
        bytes: u64,
        available: u64,
    },
    #[error("memory log {path}: cannot remove region file")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("memory log {path}: cannot map region file")]
    Map {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A region found in the log at start-up.
pub struct LoggedRegion {
    pub vnode: u64,
    pub region: u64,
    pub pages: u64,
    pub mem: Mapping,
}

/// The data directory.
#[derive(Debug)]
pub struct MemLog {
    dir: PathBuf,
    /// fsync region creation and removal (file and directory), for `--sync`.
    sync: bool,
}

impl MemLog {
    /// Opens (creating if needed) `dir` and maps every region file in it.
    pub fn open(dir: &Path, sync: bool) -> Result<(MemLog, Vec<LoggedRegion>), LogError> {
        let open_err = |source| LogError::Open {
            path: dir.to_path_buf(),
            source,
        };
        fs::create_dir_all(dir).map_err(open_err)?;
        let mut found = Vec::new();
        for entry in fs::read_dir(dir).map_err(open_err)? {
            let path = entry.map_err(open_err)?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if name.ends_with(".tmp") {
                // A creation interrupted by a crash: the region was never acknowledged.
                let _ = fs::remove_file(&path);
                continue;
            }
            let Some((vnode, region)) = parse_name(name) else {
                continue;
            };
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|source| LogError::Open {
                    path: path.clone(),
                    source,
                })?;
            let len = file
                .metadata()
                .map_err(|source| LogError::Open {
                    path: path.clone(),
                    source,
                })?
                .len();
            let pages = len / PAGE_SIZE as u64;
            if pages == 0 || len % PAGE_SIZE as u64 != 0 {
                tracing::warn!(path = %path.display(), len, "ignoring region file of bad size");
                continue;
            }
            let mem = map(&file, &path, len)?;
            found.push(LoggedRegion {
                vnode,
                region,
                pages,
                mem,
            });
        }
        Ok((
            MemLog {
                dir: dir.to_path_buf(),
                sync,
            },
            found,
        ))
    }

    fn path(&self, vnode: u64, region: u64) -> PathBuf {
        self.dir.join(format!("{vnode:016x}-{region:016x}.pages"))
    }

    /// Creates the zero-filled (sparse) file of a new region and maps it.
    pub fn create(&self, vnode: u64, region: u64, pages: u64) -> Result<Mapping, LogError> {
        let path = self.path(vnode, region);
        let tmp = path.with_extension("tmp");
        let create_err = |source| LogError::Create {
            path: path.clone(),
            source,
        };
        let len = pages
            .checked_mul(PAGE_SIZE as u64)
            .ok_or_else(|| create_err(io::Error::from(io::ErrorKind::InvalidInput)))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(create_err)?;
        file.set_len(len).map_err(create_err)?;
        // Reserve the blocks now: a sparse file that later cannot grow would turn a page write
        // into SIGBUS for the whole server.
        if let Err(e) = reserve(&file, &self.dir, len) {
            let _ = fs::remove_file(&tmp);
            return Err(match e {
                Reserve::NoSpace(available) => LogError::NoSpace {
                    path,
                    bytes: len,
                    available,
                },
                Reserve::Io(source) => LogError::Create { path, source },
            });
        }
        if self.sync {
            file.sync_all().map_err(create_err)?;
        }
        fs::rename(&tmp, &path).map_err(create_err)?;
        self.sync_dir().map_err(create_err)?;
        map(&file, &path, len)
    }

    /// Deletes a region's file.
    pub fn remove(&self, vnode: u64, region: u64) -> Result<(), LogError> {
        let path = self.path(vnode, region);
        fs::remove_file(&path).map_err(|source| LogError::Remove {
            path: path.clone(),
            source,
        })?;
        self.sync_dir()
            .map_err(|source| LogError::Remove { path, source })
    }

    /// Makes a creation or removal durable (only with `--sync`).
    fn sync_dir(&self) -> io::Result<()> {
        if self.sync {
            File::open(&self.dir)?.sync_all()?;
        }
        Ok(())
    }
}

enum Reserve {
    NoSpace(u64),
    Io(io::Error),
}

/// Bytes the unprivileged user can still write in the filesystem holding `dir`.
pub fn available_bytes(dir: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path and `st` points at a statvfs the call fills.
    if unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled the struct.
    let st = unsafe { st.assume_init() };
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Allocates `len` bytes of `file`'s blocks (fallocate); where the filesystem cannot, checks
/// that the free space could hold them.
fn reserve(file: &File, dir: &Path, len: u64) -> Result<(), Reserve> {
    use std::os::fd::AsRawFd;
    let Ok(off_len) = libc::off_t::try_from(len) else {
        return Err(Reserve::Io(io::ErrorKind::InvalidInput.into()));
    };
    // SAFETY: `file` is open for writing for the duration of the call; no memory is passed.
    let r = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, off_len) };
    let available = || available_bytes(dir).unwrap_or(0);
    match r {
        0 => Ok(()),
        libc::ENOSPC | libc::EFBIG => Err(Reserve::NoSpace(available())),
        libc::EOPNOTSUPP | libc::EINVAL => match available_bytes(dir) {
            Ok(a) if a >= len => Ok(()),
            Ok(a) => Err(Reserve::NoSpace(a)),
            Err(e) => Err(Reserve::Io(e)),
        },
        e => Err(Reserve::Io(io::Error::from_raw_os_error(e))),
    }
}

fn map(file: &File, path: &Path, len: u64) -> Result<Mapping, LogError> {
    let map_err = |source| LogError::Map {
        path: path.to_path_buf(),
        source,
    };
    let len =
        usize::try_from(len).map_err(|_| map_err(io::Error::from(io::ErrorKind::InvalidInput)))?;
    Mapping::file(file, len).map_err(map_err)
}

fn parse_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(".pages")?;
    let (v, r) = stem.split_once('-')?;
    Some((
        u64::from_str_radix(v, 16).ok()?,
        u64::from_str_radix(r, 16).ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(
            parse_name("000000000000002a-0000000000000003.pages"),
            Some((42, 3))
        );
        assert_eq!(parse_name("junk.pages"), None);
        assert_eq!(parse_name("1-2.tmp"), None);
    }

    #[test]
    fn contents_survive_reopen() {
        let dir = std::env::temp_dir().join(format!("memlog-unit-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        {
            let (log, found) = MemLog::open(&dir, true).expect("open");
            assert!(found.is_empty());
            let mut m = log.create(7, 1, 2).expect("create");
            m.as_mut_slice()[PAGE_SIZE..PAGE_SIZE + 3].copy_from_slice(b"abc");
        }
        let (log, found) = MemLog::open(&dir, false).expect("reopen");
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].vnode, found[0].region, found[0].pages), (7, 1, 2));
        assert_eq!(&found[0].mem.as_slice()[PAGE_SIZE..PAGE_SIZE + 3], b"abc");
        log.remove(7, 1).expect("remove");
        let _ = fs::remove_dir_all(&dir);
    }
}
