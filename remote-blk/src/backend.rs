//! Storage behind an export: a raw file, opened buffered or with O_DIRECT.
//!
//! The server calls these from its connection threads; every method is positioned I/O on a
//! shared fd (`pread`/`pwrite`/`fallocate`), so many connections can use one export at once.

use std::alloc::{self, Layout};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Alignment O_DIRECT needs for offsets, lengths and buffers (logical block size; 4096 covers
/// every device we meet).
pub const DIRECT_ALIGN: usize = 4096;
/// Offset/length granularity advertised for O_DIRECT exports.
pub const DIRECT_BLOCK: u64 = 512;

#[derive(Debug, Error)]
pub enum BackendError {
    #[error("open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("size {path}")]
    Size {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is {size} bytes, not a multiple of {DIRECT_BLOCK} as --direct needs")]
    Unaligned { path: PathBuf, size: u64 },
}

/// An open raw file backing one export.
#[derive(Debug)]
pub struct FileBackend {
    file: File,
    size: u64,
    direct: bool,
}

impl FileBackend {
    /// Opens `path`, creating it with `create_size` bytes when it does not exist. A given size
    /// for an existing file of another size is ignored (the file wins) and logged.
    pub fn open(path: &Path, create_size: Option<u64>, direct: bool) -> Result<Self, BackendError> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(true);
        if create_size.is_some() {
            opts.create(true);
        }
        if direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let file = opts.open(path).map_err(|source| BackendError::Open {
            path: path.to_owned(),
            source,
        })?;
        let size_err = |source| BackendError::Size {
            path: path.to_owned(),
            source,
        };
        let mut size = file.metadata().map_err(size_err)?.len();
        if let Some(want) = create_size {
            if size == 0 && want != 0 {
                file.set_len(want).map_err(size_err)?;
                size = want;
            } else if size != want {
                tracing::warn!(path = %path.display(), size, want, "existing export keeps its size");
            }
        }
        if direct && !size.is_multiple_of(DIRECT_BLOCK) {
            return Err(BackendError::Unaligned {
                path: path.to_owned(),
                size,
            });
        }
        Ok(Self { file, size, direct })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn direct(&self) -> bool {
        self.direct
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    pub fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.file.write_all_at(buf, offset)?;
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    /// Sends `len` bytes at `offset` straight from the page cache to the socket `sock`
    /// (sendfile): saves the copy through a user buffer for large buffered reads.
    pub fn send_to(&self, sock: std::os::unix::io::RawFd, offset: u64, len: u64) -> io::Result<()> {
        let mut off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let mut left = len as usize;
        while left > 0 {
            // SAFETY: both fds are open for the duration of the call (sock is owned by the
            // caller's stream, the file by self); off is a valid off_t the kernel updates.
            let n = unsafe { libc::sendfile(sock, self.file.as_raw_fd(), &mut off, left) };
            match n {
                n if n > 0 => left -= n as usize,
                0 => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Discards a range. Trim is advisory, so a file system without hole punching is fine.
    pub fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
            r => r,
        }
    }

    /// Zeroes a range, punching a hole when allowed, else allocating zeroes; falls back to
    /// writing zero buffers where the file system supports neither.
    pub fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> io::Result<()> {
        let mode = if may_trim {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        match self.fallocate(mode, offset, len) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                self.write_zero_buffers(offset, len)?
            }
            Err(e) => return Err(e),
        }
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn write_zero_buffers(&self, mut offset: u64, len: u64) -> io::Result<()> {
        let chunk = len.min(1 << 20) as usize;
        let zeroes = AlignedBuf::new(chunk.max(1));
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(chunk as u64) as usize;
            self.file.write_all_at(&zeroes.as_slice()[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let (Ok(off), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: fallocate only reads its integer arguments; the fd is owned by self.file and
        // open for the duration of the call.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, len) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

/// A zero-initialised heap buffer aligned for O_DIRECT.
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    layout: Layout,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    pub fn new(len: usize) -> Self {
        let layout = Layout::from_size_align(len.max(1), DIRECT_ALIGN)
            .expect("DIRECT_ALIGN is a power of two and len is far below isize::MAX");
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = std::ptr::NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        Self { ptr, layout }
    }

    pub fn len(&self) -> usize {
        self.layout.size()
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr points to layout.size() initialised (zeroed at allocation) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was allocated in new() with exactly this layout and is freed once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!("vnode-blk-backend-{tag}-{}", std::process::id()))
    }

    #[test]
    fn creates_at_size_and_round_trips() {
        let p = temp_path("rt");
        let _ = std::fs::remove_file(&p);
        let b = FileBackend::open(&p, Some(1 << 20), false).expect("open");
        assert_eq!(b.size(), 1 << 20);
        b.write_at(b"hello", 4096, true).expect("write");
        let mut got = [0u8; 5];
        b.read_at(&mut got, 4096).expect("read");
        assert_eq!(&got, b"hello");
        b.write_zeroes(4096, 4096, false, false).expect("zero");
        b.read_at(&mut got, 4096).expect("read");
        assert_eq!(got, [0u8; 5]);
        b.trim(0, 8192).expect("trim");
        std::fs::remove_file(&p).expect("cleanup");
    }

    #[test]
    fn aligned_buf_is_aligned() {
        let mut b = AlignedBuf::new(8192);
        assert_eq!(b.as_slice().as_ptr() as usize % DIRECT_ALIGN, 0);
        b.as_mut_slice()[0] = 1;
        assert_eq!(b.len(), 8192);
    }
}
