//! Page memory of one region: an anonymous mapping, or a shared mapping of the region's file in
//! the memory log. The only place in the crate that calls mmap.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// A private or file-backed mapping of `len` bytes. Access goes through `&self`/`&mut self`,
/// so the caller's lock (the region's `RwLock`) is what orders readers and writers.
pub struct Mapping {
    ptr: *mut u8,
    len: usize,
    shared: bool,
}

// SAFETY: the mapping is plain memory owned by this value; moving it to another thread is fine.
unsafe impl Send for Mapping {}
// SAFETY: shared access only hands out `&[u8]` through `&self`; writes need `&mut self`.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Zero-filled anonymous memory, committed lazily by the kernel as pages are written.
    pub fn anonymous(len: usize) -> io::Result<Mapping> {
        Self::map(
            len,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
        )
    }

    /// A shared mapping of the first `len` bytes of `file` (which must be at least that long):
    /// stores land in the page cache, so they outlive this process.
    pub fn file(file: &File, len: usize) -> io::Result<Mapping> {
        Self::map(len, libc::MAP_SHARED, file.as_raw_fd())
    }

    fn map(len: usize, flags: libc::c_int, fd: libc::c_int) -> io::Result<Mapping> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty mapping"));
        }
        // SAFETY: a fresh mapping at an address the kernel picks; no existing memory is
        // affected. For a file mapping, `fd` is open for reading and writing.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            ptr: p.cast(),
            len,
            shared: fd >= 0,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr..ptr+len is mapped readable for the life of self; `&self` excludes
        // `&mut` access through this value.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr..ptr+len is mapped writable for the life of self; `&mut self` makes
        // this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// Writes back `len` bytes at `off` (page aligned) to the file, for `--sync`.
    pub fn sync_range(&self, off: usize, len: usize) -> io::Result<()> {
        if !self.shared || off.checked_add(len).is_none_or(|end| end > self.len) {
            return Ok(());
        }
        // SAFETY: the range lies inside this mapping (checked above); msync does not change
        // memory contents.
        let r = unsafe { libc::msync(self.ptr.add(off).cast(), len, libc::MS_SYNC) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned, and no slice of it outlives self.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anonymous_is_zeroed_and_writable() {
        let mut m = Mapping::anonymous(8192).expect("mmap");
        assert!(m.as_slice().iter().all(|&b| b == 0));
        m.as_mut_slice()[4096] = 7;
        assert_eq!(m.as_slice()[4096], 7);
        assert!(Mapping::anonymous(0).is_err());
    }
}
