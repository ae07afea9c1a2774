//! Placing a connection thread relative to its client: on the client's CPU, or wherever the
//! scheduler likes. Neither wins everywhere, so each connection measures both.
//!
//! Here a wake-up on the other core costs ~40 us, several times a 4 KiB page-cache request, so
//! a client that waits for each reply (queue depth 1) is served 2-3x faster when the server
//! thread shares its core (`SO_INCOMING_CPU` names it: on loopback, the client's own CPU):
//! every request/reply hand-off becomes a same-core switch. A client that keeps the server busy
//! (deep queues, large transfers) is the opposite case: both cores should work, and pinning
//! costs up to half the throughput (bench/RESULTS.md). Request counts per batch do not tell the
//! two apart (a fast server sees one request per wake-up at any queue depth), so the policy
//! is an experiment: it serves windows of requests in its current placement, every few
//! windows tries the other one for a window, and keeps whichever served requests faster.

use std::time::Instant;

use super::Stream;

/// Requests per measured window.
const WINDOW: u32 = 1024;
/// Windows in the current placement before the first trial of the other one; each failed
/// trial doubles the wait, up to `TRIAL_EVERY_MAX`, so a settled connection rarely pays for one.
const TRIAL_EVERY: u32 = 4;
const TRIAL_EVERY_MAX: u32 = 128;
/// How much faster a trial must be to be kept.
const TRIAL_MARGIN: f64 = 1.05;

/// Only loopback clients are followed: over a NIC with few receive queues every connection
/// would report the same CPU, and pinning them all there would serialise them.
pub(super) fn is_loopback(s: &Stream) -> bool {
    match s {
        Stream::Tcp(t) => t.peer_addr().is_ok_and(|a| a.ip().is_loopback()),
        Stream::Unix(_) => false,
    }
}

/// The per-connection placement policy (see the module docs).
pub(super) struct CpuFollower {
    fd: std::os::unix::io::RawFd,
    /// The thread's affinity before any pinning, restored when unpinning.
    original: Option<libc::cpu_set_t>,
    /// Whether the current placement is "on the client's CPU".
    follow: bool,
    pinned: Option<i32>,
    served: u32,
    window_start: Instant,
    /// Requests per second of the last window in the kept placement.
    kept_rate: f64,
    windows: u32,
    trial_every: u32,
    trial: bool,
}

impl CpuFollower {
    pub(super) fn new(s: &Stream) -> Self {
        // SAFETY: cpu_set_t is plain data for which all-zeroes is the empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: set is a valid cpu_set_t of the size passed; pid 0 is this thread.
        let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
        Self {
            fd: s.as_raw_fd(),
            original: (rc == 0).then_some(set),
            follow: false,
            pinned: None,
            served: 0,
            window_start: Instant::now(),
            kept_rate: 0.0,
            // The first trial comes after the first window.
            windows: TRIAL_EVERY - 1,
            trial_every: TRIAL_EVERY,
            trial: false,
        }
    }

    /// Called before blocking for more requests, with the number served since the last call.
    pub(super) fn on_batch(&mut self, requests: u32) {
        if self.follow {
            self.follow();
        }
        self.served += requests;
        if self.served < WINDOW {
            return;
        }
        let now = Instant::now();
        let secs = now
            .duration_since(self.window_start)
            .as_secs_f64()
            .max(1e-9);
        let rate = f64::from(self.served) / secs;
        (self.served, self.window_start) = (0, now);
        if self.trial {
            self.trial = false;
            if rate > self.kept_rate * TRIAL_MARGIN {
                self.kept_rate = rate;
                self.trial_every = TRIAL_EVERY;
                tracing::debug!(follow = self.follow, rate, "placement trial kept");
                return;
            }
            self.trial_every = (self.trial_every * 2).min(TRIAL_EVERY_MAX);
            self.set_follow(!self.follow);
            return;
        }
        self.kept_rate = rate;
        self.windows += 1;
        if self.windows >= self.trial_every {
            self.windows = 0;
            self.trial = true;
            self.set_follow(!self.follow);
        }
    }

    fn set_follow(&mut self, on: bool) {
        self.follow = on;
        if on {
            self.follow();
        } else {
            self.unpin();
        }
    }

    fn follow(&mut self) {
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
        if set_affinity(&set) {
            self.pinned = Some(cpu);
        }
    }

    fn unpin(&mut self) {
        if let Some(set) = self.original {
            if set_affinity(&set) {
                self.pinned = None;
            }
        }
    }
}

fn set_affinity(set: &libc::cpu_set_t) -> bool {
    // SAFETY: set is a valid cpu_set_t of the size passed; pid 0 is this thread.
    unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(set), set) == 0 }
}
