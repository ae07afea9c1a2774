//! The VMM's sandbox, in Firecracker's way: every thread of `vnode` enters it once, at its start
//! and before the guest runs, with [`enter_thread`] and its [`ThreadKind`]. Entering drops every
//! capability of the thread (capabilities are per thread on Linux; none is needed once the
//! devices, sockets and files are open), sets `no_new_privs` and installs the seccomp filter of
//! that kind (`allowlist.rs`): the system calls, and for `ioctl` the request numbers, that kind
//! of thread makes at run time, nothing else.
//!
//! A forbidden system call raises SIGSYS (SECCOMP_RET_TRAP); the handler installed by [`init`]
//! writes one line naming the thread kind and the call's number, then makes a call no filter
//! allows while SIGSYS is blocked, so the kernel kills the whole process by SIGSYS.
//!
//! Filters stack: a thread started by a thread that already entered keeps its parent's filter
//! too. So threads are started from the main thread before it enters (vCPUs, device workers at
//! build time, I/O threads), and a thread that starts threads at run time needs their calls in
//! its own list.
//!
//! Nothing is installed unless `vnode` called [`init`] (unit tests start device threads too),
//! and `--no-seccomp` ([`Mode::Off`]) leaves the filters out, for debugging only: capabilities are
//! dropped all the same. `VNODE_SECCOMP=log` ([`Mode::Log`]) allows every call but has the
//! kernel log the ones a filter would refuse (`dmesg`: `type=1326 ... comm="vcpu0" ...
//! syscall=N`), which is how the lists were drawn up.

mod allowlist;

use std::cell::Cell;
use std::sync::OnceLock;

use caps::CapSet;
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter};

pub use allowlist::rules;

/// The kinds of thread in `vnode`, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// The main thread once the VM runs: waits for it to stop, prints stats, tears down.
    Main,
    /// A vCPU thread: KVM_RUN and the device models it drives (port I/O, MMIO).
    Vcpu,
    /// A virtio device worker (`blk<i>`, `net<i>`): queues, eventfds, the TAP, NBD requests.
    Device,
    /// A file backend's I/O thread (`blk-file`): pread/pwrite/fdatasync.
    BlockIo,
    /// The NBD client's reply reader (`nbd-client-rx`).
    NbdReader,
    /// A replicated disk's `blk-resync`: reconnects failed replicas (starting their readers,
    /// which enter [`ThreadKind::NbdReader`] on top of this) and copies data to them.
    DiskResync,
    /// The ExCache fault thread (`excache-fault`): userfaultfd, memory servers over TCP.
    Fault,
    /// The event loop for serial input (`vmm-events`).
    Events,
    /// The control API's thread(s): an HTTP server on a Unix socket.
    Api,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 9] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::Device,
        ThreadKind::BlockIo,
        ThreadKind::NbdReader,
        ThreadKind::DiskResync,
        ThreadKind::Fault,
        ThreadKind::Events,
        ThreadKind::Api,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Device => "device",
            ThreadKind::BlockIo => "block-io",
            ThreadKind::NbdReader => "nbd-reader",
            ThreadKind::DiskResync => "disk-resync",
            ThreadKind::Fault => "fault",
            ThreadKind::Events => "events",
            ThreadKind::Api => "api",
        }
    }

    /// The kind named `s` (as [`ThreadKind::name`] spells it).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == s)
    }
}

/// What [`enter_thread`] installs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A forbidden call kills the process.
    Enforce,
    /// Every call is allowed; the kernel logs those a filter would refuse.
    Log,
    /// No filter (`--no-seccomp`): for debugging only.
    Off,
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot drop the capabilities of thread kind {0}: {1}")]
    Caps(&'static str, #[source] caps::errors::CapsError),
    #[error("cannot build the seccomp filter of thread kind {0}: {1}")]
    Build(&'static str, #[source] seccompiler::BackendError),
    #[error("cannot install the seccomp filter of thread kind {0}: {1}")]
    Install(&'static str, #[source] seccompiler::Error),
    #[error("cannot handle SIGSYS: {0}")]
    Signal(#[source] std::io::Error),
}

struct Settings {
    mode: Mode,
    /// A hidden debug option: the kind of thread that makes a forbidden call right after it
    /// entered, to show the filter at work.
    probe: Option<ThreadKind>,
}

static SETTINGS: OnceLock<Settings> = OnceLock::new();

thread_local! {
    /// This thread's kind, for the SIGSYS handler's message.
    static KIND: Cell<&'static str> = const { Cell::new("unsandboxed") };
}

/// Turns the sandbox on for this process (once, before any thread enters it).
pub fn init(mode: Mode, probe: Option<ThreadKind>) -> Result<(), SandboxError> {
    if mode == Mode::Enforce {
        install_sigsys_handler()?;
    }
    let _ = SETTINGS.set(Settings { mode, probe });
    Ok(())
}

/// Enters the sandbox of `kind` on the calling thread: what each thread of `vnode` calls first
/// (the main thread once set-up is over). Does nothing before [`init`]. A thread that cannot
/// enter its sandbox must not run: the process exits with a one-line error.
pub fn enter_thread(kind: ThreadKind) {
    if let Err(e) = enter(kind) {
        tracing::error!("{e}");
        eprintln!("vnode: error: {e}");
        std::process::exit(1);
    }
}

/// [`enter_thread`], returning the error.
pub fn enter(kind: ThreadKind) -> Result<(), SandboxError> {
    let Some(s) = SETTINGS.get() else {
        return Ok(());
    };
    drop_capabilities().map_err(|e| SandboxError::Caps(kind.name(), e))?;
    KIND.with(|k| k.set(kind.name()));
    if s.mode != Mode::Off {
        // The permissive one first: installing a filter takes prctl and seccomp, which the
        // kind's own filter then forbids.
        if !allowlist::opens_files(kind) {
            let prog = eacces_filter(kind)?;
            seccompiler::apply_filter(&prog).map_err(|e| SandboxError::Install(kind.name(), e))?;
        }
        let prog = filter(kind, s.mode)?;
        seccompiler::apply_filter(&prog).map_err(|e| SandboxError::Install(kind.name(), e))?;
    }
    if s.probe == Some(kind) {
        probe(kind);
    }
    Ok(())
}

/// The compiled filter of `kind`.
pub fn filter(kind: ThreadKind, mode: Mode) -> Result<BpfProgram, SandboxError> {
    let mismatch = match mode {
        Mode::Log => SeccompAction::Log,
        _ => SeccompAction::Trap,
    };
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|e| SandboxError::Build(kind.name(), e))?;
    let f = SeccompFilter::new(rules(kind), mismatch, SeccompAction::Allow, arch)
        .map_err(|e| SandboxError::Build(kind.name(), e))?;
    f.try_into()
        .map_err(|e| SandboxError::Build(kind.name(), e))
}

/// The filter stacked on every kind's: [`allowlist::REFUSED_WITH_EACCES`] fail with EACCES.
fn eacces_filter(kind: ThreadKind) -> Result<BpfProgram, SandboxError> {
    let rules = allowlist::REFUSED_WITH_EACCES
        .iter()
        .map(|&nr| (nr, Vec::new()))
        .collect();
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|e| SandboxError::Build(kind.name(), e))?;
    let errno = SeccompAction::Errno(libc::EACCES as u32);
    let f = SeccompFilter::new(rules, SeccompAction::Allow, errno, arch)
        .map_err(|e| SandboxError::Build(kind.name(), e))?;
    f.try_into()
        .map_err(|e| SandboxError::Build(kind.name(), e))
}

/// Empties every capability set of the calling thread (bounding set first, while
/// CAP_SETPCAP is still there to drop it).
fn drop_capabilities() -> Result<(), caps::errors::CapsError> {
    if caps::has_cap(None, CapSet::Effective, caps::Capability::CAP_SETPCAP)? {
        caps::clear(None, CapSet::Bounding)?;
    }
    caps::clear(None, CapSet::Ambient)?;
    caps::clear(None, CapSet::Inheritable)?;
    caps::clear(None, CapSet::Effective)?;
    caps::clear(None, CapSet::Permitted)
}

/// Makes a call no thread may make (`socket`), for `--debug-syscall-probe`.
fn probe(kind: ThreadKind) {
    tracing::warn!(
        kind = kind.name(),
        "debug probe: calling socket(2), which this thread may not"
    );
    // SAFETY: socket(2) with constant arguments; the descriptor, if any, is closed at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    if fd >= 0 {
        // SAFETY: `fd` was just returned by socket(2) and nothing else holds it.
        unsafe { libc::close(fd) };
    }
}

/// A call in no list: made from the SIGSYS handler (SIGSYS blocked) so the kernel kills.
const NEVER_ALLOWED: libc::c_long = libc::SYS_kexec_load;

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // siginfo's _sigsys: a pointer (call address) at offset 16, then the int syscall number.
    // SAFETY: the kernel hands a valid siginfo_t for SIGSYS (SA_SIGINFO), whose `_sigsys`
    // member holds the call number at offset 24 on x86-64 and aarch64.
    let nr = unsafe { info.cast::<u8>().add(24).cast::<i32>().read_unaligned() };
    let mut msg = [0u8; 160];
    let mut n = 0;
    let kind = KIND.with(|k| k.get());
    for part in ["vnode: seccomp: a ", kind, " thread made system call "] {
        n += copy_into(&mut msg[n..], part.as_bytes());
    }
    n += write_decimal(&mut msg[n..], nr);
    n += copy_into(
        &mut msg[n..],
        b", which it may not: killing the process (--no-seccomp to debug)\n",
    );
    // SAFETY: write(2) of a stack buffer to stderr, and a system call no filter allows (with
    // SIGSYS blocked in this handler, the kernel then kills the process by SIGSYS).
    unsafe {
        libc::write(2, msg.as_ptr().cast(), n);
        libc::syscall(NEVER_ALLOWED, 0, 0, 0, 0);
        libc::abort();
    }
}

fn copy_into(dst: &mut [u8], src: &[u8]) -> usize {
    let n = dst.len().min(src.len());
    dst[..n].copy_from_slice(&src[..n]);
    n
}

fn write_decimal(dst: &mut [u8], v: i32) -> usize {
    let mut digits = [0u8; 12];
    let mut i = digits.len();
    let mut x = i64::from(v).unsigned_abs();
    loop {
        i -= 1;
        digits[i] = b'0' + (x % 10) as u8;
        x /= 10;
        if x == 0 {
            break;
        }
    }
    if v < 0 {
        i -= 1;
        digits[i] = b'-';
    }
    copy_into(dst, &digits[i..])
}

fn install_sigsys_handler() -> Result<(), SandboxError> {
    // SAFETY: a zeroed sigaction is valid; we fill the handler, SA_SIGINFO and an empty mask,
    // and install it for SIGSYS only. The handler is async-signal-safe (no allocation, no lock).
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
            return Err(SandboxError::Signal(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_a_filter_that_compiles() {
        for kind in ThreadKind::ALL {
            let r = rules(kind);
            let ioctls = r.get(&libc::SYS_ioctl).map(Vec::len);
            eprintln!(
                "{}: {} system calls, ioctl requests {ioctls:?}",
                kind.name(),
                r.len()
            );
            assert!(!filter(kind, Mode::Enforce).unwrap().is_empty(), "{kind:?}");
            assert!(!eacces_filter(kind).unwrap().is_empty());
            assert_eq!(ThreadKind::parse(kind.name()), Some(kind));
        }
    }

    #[test]
    fn decimal() {
        let mut b = [0u8; 12];
        let n = write_decimal(&mut b, 41);
        assert_eq!(&b[..n], b"41");
        let n = write_decimal(&mut b, -7);
        assert_eq!(&b[..n], b"-7");
    }
}
