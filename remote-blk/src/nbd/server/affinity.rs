//! Pinning a connection thread to its client's CPU.

use super::Stream;

/// Only loopback clients are followed: over a NIC with few receive queues every connection
/// would report the same CPU, and pinning them all there would serialise them.
pub(super) fn is_loopback(s: &Stream) -> bool {
    match s {
        Stream::Tcp(t) => t.peer_addr().is_ok_and(|a| a.ip().is_loopback()),
        Stream::Unix(_) => false,
    }
}

/// Keeps a connection thread on the CPU where its client's packets are processed
/// (`SO_INCOMING_CPU`; on loopback that is the client's own CPU). Here a wake-up on the other core costs ~40 us, several
/// times a 4 KiB request, so sharing the client's core turns every request/reply hand-off into
/// a cheap same-core switch. Checked once per batch, re-pinned only when it changes.
pub(super) struct CpuFollower {
    fd: std::os::unix::io::RawFd,
    pinned: Option<i32>,
}

impl CpuFollower {
    pub(super) fn new(s: &Stream) -> Self {
        use std::os::unix::io::AsRawFd;
        let fd = match s {
            Stream::Tcp(t) => t.as_raw_fd(),
            Stream::Unix(u) => u.as_raw_fd(),
        };
        Self { fd, pinned: None }
    }

    pub(super) fn follow(&mut self) {
        let mut cpu: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: cpu and len are valid for writes of the sizes passed; the fd is the
        // connection's socket, open while the connection is served.
        let rc = unsafe {
            libc::getsockopt(
                self.fd,
                libc::SOL_SOCKET,
                libc::SO_INCOMING_CPU,
                (&mut cpu as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if rc != 0
            || cpu < 0
            || self.pinned == Some(cpu)
            || cpu as usize >= libc::CPU_SETSIZE as usize
        {
            return;
        }
        // SAFETY: cpu_set_t is plain data for which all-zeroes is the empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: cpu < CPU_SETSIZE was checked above; set is a valid cpu_set_t.
        unsafe { libc::CPU_SET(cpu as usize, &mut set) };
        // SAFETY: set is a valid cpu_set_t of the size passed; pid 0 is this thread.
        let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
        if rc == 0 {
            self.pinned = Some(cpu);
        }
    }
}
