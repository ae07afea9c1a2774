//! The memory log: what a memory server stores, kept in `--data-dir` so it survives a restart.
//!
//! Each region is one file, `<vnode>-<region>.mlog` (both as 16 hex digits), in the
//! double-buffered, checksummed format of [`super::pagefile`], mapped shared into the server: a
//! page write is a store into the page cache plus a 32-byte record, and the kernel writes it
//! back. What survives what:
//! - the server's death (kill -9 included): every acknowledged write, with or without `--sync`
//!   (the page cache outlives the process); a write torn by the kill was not acknowledged and
//!   its page's previous version is served;
//! - a host crash, with `--sync` (an fdatasync per write batch before it is acknowledged, about
//!   one disk flush per batch): every acknowledged write;
//! - a host crash without `--sync`: the most recent writes may be lost (the kernel writes pages
//!   back in its own order, within about 30 s), and a page whose both slots were caught
//!   half-written is reported damaged and refused; a torn page is never served.
//!
//! Recovery checks every record and reports torn records and damaged pages (in the log and in
//! [`LoggedRegion::recovery`]). Why two slots per page rather than an append-only log: the VMM
//! writes the same pages over and over (every eviction of a hot page), so a log would grow
//! without bound and need compaction; two slots bound the file at twice the region
//! and keep the previous version of every page until its replacement is complete. A region's
//! creation is made atomic by creating it under a temporary name and renaming it.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::pagefile::{self, PageFile, PageFileError, Recovery};

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
    #[error("memory log {path}: cannot use region file")]
    Map {
        path: PathBuf,
        #[source]
        source: PageFileError,
    },
}

/// A region found in the log at start-up.
pub struct LoggedRegion {
    pub vnode: u64,
    pub region: u64,
    pub pages: u64,
    pub file: PageFile,
    /// Torn records and damaged pages found in it.
    pub recovery: Recovery,
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
            if name.ends_with(".tmp") || name.ends_with(".incoming") {
                // A creation interrupted by a crash: the region was never acknowledged. Or a
                // migration into this server that never committed: its source still owns it.
                let _ = fs::remove_file(&path);
                continue;
            }
            if name.ends_with(".pages") {
                tracing::warn!(path = %path.display(), "ignoring a region file of the old, unchecksummed format");
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
            let (file, recovery) = match PageFile::open(file) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "ignoring an unusable region file");
                    continue;
                }
            };
            report(&path, &recovery);
            found.push(LoggedRegion {
                vnode,
                region,
                pages: file.pages(),
                file,
                recovery,
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
        self.dir.join(format!("{vnode:016x}-{region:016x}.mlog"))
    }

    /// Creates the file of a new region (its blocks reserved), formatted and mapped.
    pub fn create(&self, vnode: u64, region: u64, pages: u64) -> Result<PageFile, LogError> {
        self.create_at(self.path(vnode, region), pages)
    }

    /// Creates the file of a region migrating in: ignored (and deleted) at the next start
    /// until [`MemLog::commit_incoming`] gives it its real name.
    pub fn create_incoming(
        &self,
        vnode: u64,
        region: u64,
        pages: u64,
    ) -> Result<PageFile, LogError> {
        self.create_at(self.incoming_path(vnode, region), pages)
    }

    fn incoming_path(&self, vnode: u64, region: u64) -> PathBuf {
        self.path(vnode, region).with_extension("incoming")
    }

    /// Makes an incoming region a region of this server (the migration's commit point here).
    pub fn commit_incoming(&self, vnode: u64, region: u64) -> Result<(), LogError> {
        let path = self.path(vnode, region);
        let err = |source| LogError::Create {
            path: path.clone(),
            source,
        };
        fs::rename(self.incoming_path(vnode, region), &path).map_err(err)?;
        self.sync_dir().map_err(err)
    }

    /// Deletes the file of an incoming region that will not commit.
    pub fn remove_incoming(&self, vnode: u64, region: u64) -> Result<(), LogError> {
        let path = self.incoming_path(vnode, region);
        fs::remove_file(&path).map_err(|source| LogError::Remove { path, source })
    }

    fn create_at(&self, path: PathBuf, pages: u64) -> Result<PageFile, LogError> {
        let tmp = path.with_extension("tmp");
        let create_err = |source| LogError::Create {
            path: path.clone(),
            source,
        };
        let len = pagefile::file_len(pages)
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
        let pf = PageFile::create(file, pages).map_err(|source| LogError::Map {
            path: path.clone(),
            source,
        })?;
        if self.sync {
            pf.sync().map_err(create_err)?;
        }
        fs::rename(&tmp, &path).map_err(create_err)?;
        self.sync_dir().map_err(create_err)?;
        Ok(pf)
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

/// Logs what recovery found in one file: a line per problem (the first few) and a summary.
fn report(path: &Path, r: &Recovery) {
    const SHOWN: usize = 8;
    for page in r.torn.iter().take(SHOWN) {
        tracing::warn!(path = %path.display(), page, "torn or corrupt record; serving the page's previous version");
    }
    for page in r.damaged.iter().take(SHOWN) {
        tracing::error!(path = %path.display(), page, "page damaged (no valid version); reads of it are refused");
    }
    if !r.torn.is_empty() || !r.damaged.is_empty() {
        tracing::warn!(
            path = %path.display(),
            torn = r.torn.len(),
            damaged = r.damaged.len(),
            "memory log recovery found bad records"
        );
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

fn parse_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(".mlog")?;
    let (v, r) = stem.split_once('-')?;
    Some((
        u64::from_str_radix(v, 16).ok()?,
        u64::from_str_radix(r, 16).ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::PAGE_SIZE;

    #[test]
    fn names_round_trip() {
        assert_eq!(
            parse_name("000000000000002a-0000000000000003.mlog"),
            Some((42, 3))
        );
        assert_eq!(parse_name("junk.mlog"), None);
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
            let mut page = vec![0u8; PAGE_SIZE];
            page[..3].copy_from_slice(b"abc");
            m.write([1].into_iter(), &page, true).expect("write");
        }
        let (log, found) = MemLog::open(&dir, false).expect("reopen");
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].vnode, found[0].region, found[0].pages), (7, 1, 2));
        let mut out = Vec::new();
        found[0].file.read(1, &mut out).expect("page 1");
        assert_eq!(&out[..3], b"abc");
        assert_eq!(found[0].recovery.pages, 1);
        log.remove(7, 1).expect("remove");
        let _ = fs::remove_dir_all(&dir);
    }
}
