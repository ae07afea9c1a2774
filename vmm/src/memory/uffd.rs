//! The only module that issues userfaultfd ioctls: registering guest RAM for missing-page and
//! write-protect faults, reading fault events, installing pages (UFFDIO_COPY, optionally
//! write-protected), changing write protection, waking waiters, and dropping pages.

use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use userfaultfd::{Event, EventBuffer, FaultKind, ReadWrite, RegisterMode, Uffd, UffdBuilder};

pub const PAGE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error("cannot create a userfaultfd (needs Linux >= 5.7 with write-protect support, and root or vm.unprivileged_userfaultfd=1)")]
    Create(#[source] userfaultfd::Error),
    #[error("cannot register guest RAM with userfaultfd")]
    Register(#[source] userfaultfd::Error),
    #[error("this kernel's userfaultfd lacks write-protect support for anonymous memory")]
    NoWriteProtect,
    #[error("{op} at {addr:#x} failed")]
    Op {
        op: &'static str,
        addr: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("reading userfaultfd events failed")]
    Read(#[source] userfaultfd::Error),
}

/// A fault the guest (or a VMM thread) is waiting on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The page is not present. `write` if the access was a write.
    Missing { addr: usize, write: bool },
    /// The page is present but write-protected, and was written.
    WriteProtect { addr: usize },
}

/// The UFFDIO_COPY ioctl number and its write-protect mode (the userfaultfd crate's `copy` has
/// no way to ask for a write-protected install, which must be atomic with the copy).
const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;

/// The userfaultfd ioctls the fault thread makes once the guest runs (UFFDIO_UNREGISTER,
/// UFFDIO_WAKE, UFFDIO_COPY, UFFDIO_ZEROPAGE, UFFDIO_WRITEPROTECT, from linux/userfaultfd.h):
/// its seccomp filter (`sandbox`) allows these and no other.
pub const RUN_TIME_IOCTLS: [libc::c_ulong; 5] = [
    0x8010_aa01,
    0x8010_aa02,
    UFFDIO_COPY,
    0xc020_aa04,
    0xc018_aa06,
];
const UFFDIO_COPY_MODE_DONTWAKE: u64 = 1 << 0;
const UFFDIO_COPY_MODE_WP: u64 = 1 << 1;

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// Guest RAM registered with a userfaultfd.
pub struct GuestUffd {
    uffd: Uffd,
    /// A pidfd of this process for process_madvise(2), which drops many scattered ranges in one
    /// call (Linux >= 6.13 takes MADV_DONTNEED for the calling process); None: one madvise per
    /// range.
    pidfd: Option<OwnedFd>,
    /// Whether process_madvise took MADV_DONTNEED so far (an older kernel refuses it).
    batched: std::cell::Cell<bool>,
}

/// Ranges per process_madvise call (the kernel's UIO_MAXIOV).
const MAX_IOV: usize = 1024;

impl GuestUffd {
    /// Registers [base, base+len) for missing and write-protect faults.
    pub fn register(base: *mut u8, len: usize) -> Result<Self, UffdError> {
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .require_features(userfaultfd::FeatureFlags::PAGEFAULT_FLAG_WP)
            .create()
            .map_err(UffdError::Create)?;
        let ioctls = uffd
            .register_with_mode(
                base.cast(),
                len,
                RegisterMode::MISSING | RegisterMode::WRITE_PROTECT,
            )
            .map_err(UffdError::Register)?;
        if !ioctls.contains(userfaultfd::IoctlFlags::WRITE_PROTECT) {
            return Err(UffdError::NoWriteProtect);
        }
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is
        // passed.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
        // SAFETY: a non-negative return is a new descriptor that nothing else owns.
        let pidfd = (pidfd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) });
        Ok(Self {
            uffd,
            batched: std::cell::Cell::new(pidfd.is_some()),
            pidfd,
        })
    }

    pub fn fd(&self) -> RawFd {
        self.uffd.as_raw_fd()
    }

    /// Reads the pending faults into `out` (non-blocking: returns 0 when there are none).
    pub fn read_faults(
        &self,
        buf: &mut EventBuffer,
        out: &mut Vec<Fault>,
    ) -> Result<usize, UffdError> {
        out.clear();
        let events = match self.uffd.read_events(buf) {
            Ok(e) => e,
            Err(userfaultfd::Error::SystemError(e)) if e as i32 == libc::EAGAIN => return Ok(0),
            Err(e) => return Err(UffdError::Read(e)),
        };
        for ev in events {
            match ev.map_err(UffdError::Read)? {
                Event::Pagefault { kind, rw, addr, .. } => {
                    let addr = addr as usize & !(PAGE - 1);
                    out.push(match kind {
                        FaultKind::WriteProtected => Fault::WriteProtect { addr },
                        _ => Fault::Missing {
                            addr,
                            write: rw == ReadWrite::Write,
                        },
                    });
                }
                other => tracing::warn!(?other, "unexpected userfaultfd event"),
            }
        }
        Ok(out.len())
    }

    /// Installs one page at `dst` with the content at `src`, write-protected if `wp`, and wakes
    /// threads waiting on it if `wake`. Returns false if the page was already present.
    ///
    /// # Safety
    /// `src` must point to `PAGE` readable bytes; `dst` must be a page inside the registered range.
    pub unsafe fn copy_page(
        &self,
        dst: usize,
        src: *const u8,
        wp: bool,
        wake: bool,
    ) -> Result<bool, UffdError> {
        let mut c = UffdioCopy {
            dst: dst as u64,
            src: src as u64,
            len: PAGE as u64,
            mode: if wp { UFFDIO_COPY_MODE_WP } else { 0 }
                | if wake { 0 } else { UFFDIO_COPY_MODE_DONTWAKE },
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY reads PAGE bytes at `src` (valid per the caller) and writes the
        // page at `dst` inside the registered range; `c` is a live uffdio_copy for the call.
        let r = unsafe { libc::ioctl(self.fd(), UFFDIO_COPY, &mut c as *mut UffdioCopy) };
        if r == 0 {
            return Ok(true);
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EEXIST) {
            return Ok(false);
        }
        Err(UffdError::Op {
            op: "UFFDIO_COPY",
            addr: dst,
            source: err,
        })
    }

    /// Write-protects [addr, addr+len): later writes fault until unprotected.
    pub fn protect(&self, addr: usize, len: usize) -> Result<(), UffdError> {
        self.uffd
            .write_protect(addr as *mut _, len)
            .map_err(|e| op_err("UFFDIO_WRITEPROTECT", addr, e))
    }

    /// Removes write protection from [addr, addr+len) and wakes writers waiting on it.
    pub fn unprotect(&self, addr: usize, len: usize) -> Result<(), UffdError> {
        self.uffd
            .remove_write_protection(addr as *mut _, len, true)
            .map_err(|e| op_err("UFFDIO_WRITEPROTECT", addr, e))
    }

    /// Wakes threads waiting on faults in [addr, addr+len); they retry their access.
    pub fn wake(&self, addr: usize, len: usize) -> Result<(), UffdError> {
        self.uffd
            .wake(addr as *mut _, len)
            .map_err(|e| op_err("UFFDIO_WAKE", addr, e))
    }

    /// Drops the pages in [addr, addr+len): the next access faults as missing.
    pub fn drop_pages(&self, addr: usize, len: usize) -> Result<(), UffdError> {
        // SAFETY: the range is guest RAM owned by this VMM; MADV_DONTNEED on a private anonymous
        // mapping only discards contents, which the caller has saved or knows to be zero.
        let r = unsafe { libc::madvise(addr as *mut _, len, libc::MADV_DONTNEED) };
        if r != 0 {
            return Err(UffdError::Op {
                op: "MADV_DONTNEED",
                addr,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

impl GuestUffd {
    /// Drops every range of `ranges` (address, length): like [`drop_pages`](Self::drop_pages)
    /// on each, but in as few system calls as the kernel allows, so scattered victims do not
    /// each pay a system call.
    pub fn drop_ranges(&self, ranges: &[(usize, usize)]) -> Result<(), UffdError> {
        let Some(pidfd) = self.pidfd.as_ref().filter(|_| self.batched.get()) else {
            return ranges
                .iter()
                .try_for_each(|&(addr, len)| self.drop_pages(addr, len));
        };
        for chunk in ranges.chunks(MAX_IOV) {
            let iov: Vec<libc::iovec> = chunk
                .iter()
                .map(|&(addr, len)| libc::iovec {
                    iov_base: addr as *mut _,
                    iov_len: len,
                })
                .collect();
            let total: usize = chunk.iter().map(|r| r.1).sum();
            // SAFETY: `iov` describes ranges of guest RAM owned by this VMM whose contents the
            // caller has saved or knows to be zero (as for drop_pages); the kernel only reads
            // the iovec array, which outlives the call.
            let done = unsafe {
                libc::syscall(
                    libc::SYS_process_madvise,
                    pidfd.as_raw_fd(),
                    iov.as_ptr(),
                    iov.len(),
                    libc::MADV_DONTNEED,
                    0,
                )
            };
            if done < 0 {
                let err = std::io::Error::last_os_error();
                if matches!(
                    err.raw_os_error(),
                    Some(libc::EINVAL | libc::ENOSYS | libc::EPERM)
                ) {
                    // An older kernel: MADV_DONTNEED through process_madvise is refused before
                    // anything is dropped. Fall back to madvise for good.
                    tracing::debug!(
                        "process_madvise(MADV_DONTNEED) refused ({err}); using madvise"
                    );
                    self.batched.set(false);
                    return self.drop_ranges(ranges);
                }
                return Err(UffdError::Op {
                    op: "process_madvise(MADV_DONTNEED)",
                    addr: chunk[0].0,
                    source: err,
                });
            }
            if (done as usize) < total {
                // A partial advice: finish the rest range by range.
                let mut skip = done as usize;
                for &(addr, len) in chunk {
                    if skip >= len {
                        skip -= len;
                        continue;
                    }
                    self.drop_pages(addr + skip, len - skip)?;
                    skip = 0;
                }
            }
        }
        Ok(())
    }
}

fn op_err(op: &'static str, addr: usize, e: userfaultfd::Error) -> UffdError {
    let source = match e {
        userfaultfd::Error::SystemError(errno) => std::io::Error::from_raw_os_error(errno as i32),
        other => std::io::Error::other(other.to_string()),
    };
    UffdError::Op { op, addr, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Which of `pages` pages at `base` are resident (mincore), without touching them.
    fn resident(base: *mut u8, pages: usize) -> Vec<bool> {
        let mut vec = vec![0u8; pages];
        // SAFETY: [base, base + pages * PAGE) is a live mapping; mincore only writes `vec`,
        // which has one byte per page.
        let rc = unsafe { libc::mincore(base.cast(), pages * PAGE, vec.as_mut_ptr()) };
        assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
        vec.iter().map(|b| b & 1 == 1).collect()
    }

    fn drops_exactly_the_ranges(batched: bool) {
        const N: usize = 8;
        // SAFETY: a fresh anonymous private mapping nothing else refers to; unmapped below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                N * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        let base = base.cast::<u8>();
        let uffd = GuestUffd::register(base, N * PAGE).expect("userfaultfd");
        if !batched {
            uffd.batched.set(false);
        }
        let src = [0xa5u8; PAGE];
        for p in 0..N {
            // SAFETY: `src` is a full page; the destination is a page of the registered range.
            assert!(unsafe {
                uffd.copy_page(base as usize + p * PAGE, src.as_ptr(), false, false)
            }
            .unwrap());
        }
        assert!(resident(base, N).iter().all(|r| *r));
        let at = |p: usize, n: usize| (base as usize + p * PAGE, n * PAGE);
        uffd.drop_ranges(&[at(1, 1), at(3, 2), at(7, 1)]).unwrap();
        assert_eq!(
            resident(base, N),
            [true, false, true, false, false, true, true, false]
        );
        drop(uffd);
        // SAFETY: the mapping made above; nothing refers to it any more.
        unsafe { libc::munmap(base.cast(), N * PAGE) };
    }

    #[test]
    fn drop_ranges_drops_exactly_the_ranges_given() {
        drops_exactly_the_ranges(true);
    }

    #[test]
    fn drop_ranges_without_process_madvise_does_the_same() {
        drops_exactly_the_ranges(false);
    }
}
