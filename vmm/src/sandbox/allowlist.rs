//! The system calls each kind of `vnode` thread may make once the guest runs. Drawn up by
//! running the real workloads (the test guest's mem, blk and net tests, remote memory with a
//! replicated region, the hostile-guest tests) with `VNODE_SECCOMP=log` and reading what the
//! kernel logged, then keeping what each kind needs; `ioctl` is limited to the request numbers
//! the KVM and userfaultfd modules declare.

use std::collections::BTreeMap;

use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

use super::ThreadKind;

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// What every thread does: memory management for the allocator, locks, its own stack and
/// signals, time, logging to stderr, closing what it drops, ending itself, and aborting on a
/// panic (SIGABRT to itself only).
const COMMON: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_futex,
    libc::SYS_getpid,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_madvise,
    libc::SYS_mmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_munmap,
    libc::SYS_nanosleep,
    libc::SYS_restart_syscall,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sched_yield,
    libc::SYS_sigaltstack,
    libc::SYS_write,
];

/// Calls that get an error instead of a kill, from a second filter stacked on the first (the
/// kernel takes the stricter answer, and ERRNO beats ALLOW): `openat`, because glibc's malloc
/// opens /proc/sys/vm/overcommit_memory once, from whichever thread first shrinks a heap, and
/// copes with not being able to. No thread opens anything else once the guest runs.
/// Not stacked for the kinds that open files at run time ([`opens_files`]).
pub const REFUSED_WITH_EACCES: &[i64] = &[libc::SYS_openat];

/// Whether `kind` opens files once the guest runs (snapshots, on the API thread).
pub fn opens_files(kind: ThreadKind) -> bool {
    kind == ThreadKind::Api
}

/// Network I/O on sockets opened at set-up, and shutting one down when its peer failed.
const SOCKET_IO: &[i64] = &[
    libc::SYS_shutdown,
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_sendto,
    libc::SYS_writev,
    libc::SYS_poll,
    libc::SYS_ppoll,
];

fn extra(kind: ThreadKind) -> &'static [i64] {
    match kind {
        // Waits for the VM to stop (futex), prints stats, joins the others, tears down:
        // closing the disks' NBD connections (NBD_CMD_DISC, then shutdown), syncing file
        // disks, removing the API socket.
        ThreadKind::Main => &[
            libc::SYS_fsync,
            libc::SYS_fdatasync,
            libc::SYS_shutdown,
            libc::SYS_unlink,
            libc::SYS_sendto,
            libc::SYS_sendmsg,
            libc::SYS_writev,
            libc::SYS_recvfrom,
            libc::SYS_read,
            libc::SYS_poll,
            libc::SYS_ppoll,
        ],
        // The serial output (stdout or a file), eventfds (irqfd, queue notify), a device's
        // DRIVER_OK or reset (dup of the notify eventfd, handing the loop to its worker).
        ThreadKind::Vcpu => &[libc::SYS_read, libc::SYS_writev, libc::SYS_dup],
        // Queue notify and TAP through epoll; NBD requests on the client's socket.
        ThreadKind::Device => &[
            libc::SYS_epoll_create1,
            libc::SYS_epoll_ctl,
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_read,
            libc::SYS_readv,
            libc::SYS_writev,
            libc::SYS_sendto,
            libc::SYS_sendmsg,
            libc::SYS_shutdown,
        ],
        ThreadKind::BlockIo => &[
            libc::SYS_pread64,
            libc::SYS_pwrite64,
            libc::SYS_preadv,
            libc::SYS_pwritev,
            libc::SYS_fdatasync,
            libc::SYS_fsync,
        ],
        ThreadKind::NbdReader => SOCKET_IO,
        // Reconnects (socket, connect, timeouts) and copies between replicas; the new readers
        // it starts enter their own sandbox ([`SPAWN`]).
        ThreadKind::DiskResync => &[
            libc::SYS_read,
            libc::SYS_readv,
            libc::SYS_recvfrom,
            libc::SYS_recvmsg,
            libc::SYS_sendmsg,
            libc::SYS_sendto,
            libc::SYS_writev,
            libc::SYS_poll,
            libc::SYS_ppoll,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_setsockopt,
            libc::SYS_getsockopt,
            libc::SYS_getsockname,
            libc::SYS_getpeername,
            libc::SYS_shutdown,
        ],
        // Fault events, installs and drops; memory servers over TCP, including following a
        // migrated region to a new server (socket, connect, options).
        ThreadKind::Fault => &[
            libc::SYS_read,
            libc::SYS_readv,
            libc::SYS_recvfrom,
            libc::SYS_recvmsg,
            libc::SYS_sendmsg,
            libc::SYS_sendto,
            libc::SYS_writev,
            libc::SYS_poll,
            libc::SYS_ppoll,
            libc::SYS_process_madvise,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_setsockopt,
            libc::SYS_getsockopt,
            libc::SYS_getsockname,
            libc::SYS_getpeername,
            libc::SYS_shutdown,
        ],
        ThreadKind::Events => &[
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_ctl,
            libc::SYS_read,
        ],
        // An async HTTP server on a Unix socket (tokio, axum): its runtime, connections, the
        // blocking pool tokio may start threads in; snapshots (a file created beside its final
        // name, synced and renamed; KVM state read through the VM and vCPU descriptors).
        ThreadKind::Api => &[
            libc::SYS_openat,
            libc::SYS_fstat,
            libc::SYS_newfstatat,
            libc::SYS_statx,
            libc::SYS_lseek,
            libc::SYS_pread64,
            libc::SYS_pwrite64,
            libc::SYS_ftruncate,
            libc::SYS_fsync,
            libc::SYS_fdatasync,
            libc::SYS_rename,
            libc::SYS_renameat2,
            libc::SYS_unlink,
            libc::SYS_unlinkat,
            libc::SYS_accept4,
            libc::SYS_epoll_create1,
            libc::SYS_epoll_ctl,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_wait,
            libc::SYS_eventfd2,
            libc::SYS_getsockname,
            libc::SYS_getpeername,
            libc::SYS_getsockopt,
            libc::SYS_setsockopt,
            libc::SYS_read,
            libc::SYS_readv,
            libc::SYS_recvfrom,
            libc::SYS_recvmsg,
            libc::SYS_sched_getaffinity,
            libc::SYS_sendmsg,
            libc::SYS_sendto,
            libc::SYS_shutdown,
            libc::SYS_writev,
        ],
    }
}

/// What a thread that starts threads at run time needs: the clone, the new thread's own set-up
/// (robust futex list, rseq, its name), and entering its sandbox (capabilities, which are
/// already gone, then no_new_privs and one more filter: nothing that widens anything).
const SPAWN: &[i64] = &[
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_capget,
    libc::SYS_capset,
];

/// `prctl` options allowed with [`SPAWN`]: a thread's name, dropping ambient capabilities and
/// setting no_new_privs.
const SPAWN_PRCTLS: &[u64] = &[
    libc::PR_SET_NAME as u64,
    libc::PR_CAP_AMBIENT as u64,
    libc::PR_SET_NO_NEW_PRIVS as u64,
];

fn spawns_threads(kind: ThreadKind) -> bool {
    matches!(kind, ThreadKind::DiskResync | ThreadKind::Api)
}

/// `fcntl` commands a kind may make besides F_GETFD (which Rust's debug builds use to check a
/// descriptor before closing it).
fn fcntls(kind: ThreadKind) -> &'static [u64] {
    match kind {
        // Cloning an eventfd (F_DUPFD_CLOEXEC) when a device starts.
        ThreadKind::Vcpu => &[libc::F_DUPFD_CLOEXEC as u64],
        // Reconnecting to a memory server; tokio's sockets.
        ThreadKind::Fault | ThreadKind::Api | ThreadKind::DiskResync => &[
            libc::F_DUPFD_CLOEXEC as u64,
            libc::F_GETFL as u64,
            libc::F_SETFL as u64,
            libc::F_SETFD as u64,
        ],
        _ => &[],
    }
}

/// The fault thread's: userfaultfd's, and FIONBIO for connecting to a memory server with a
/// deadline (TcpStream::connect_timeout) when it follows a migrated or failed-over region.
const FAULT_IOCTLS: [u64; 6] = {
    let u = crate::memory::uffd::RUN_TIME_IOCTLS;
    [u[0], u[1], u[2], u[3], u[4], libc::FIONBIO]
};

/// The API thread's: a snapshot's KVM_GET_*, and FIONBIO (a descriptor made non-blocking for
/// tokio).
const API_IOCTLS: [u64; 17] = {
    let k = crate::kvm::persist::SNAPSHOT_IOCTLS;
    [
        k[0],
        k[1],
        k[2],
        k[3],
        k[4],
        k[5],
        k[6],
        k[7],
        k[8],
        k[9],
        k[10],
        k[11],
        k[12],
        k[13],
        k[14],
        k[15],
        libc::FIONBIO,
    ]
};

/// `ioctl` requests a kind may make; None: no ioctl at all.
fn ioctls(kind: ThreadKind) -> Option<&'static [u64]> {
    match kind {
        ThreadKind::Vcpu => Some(&crate::kvm::VCPU_RUN_TIME_IOCTLS),
        ThreadKind::Fault => Some(&FAULT_IOCTLS),
        ThreadKind::Api => Some(&API_IOCTLS),
        // FIONBIO: connecting with a deadline (TcpStream::connect_timeout) to a replica.
        ThreadKind::DiskResync => Some(&[libc::FIONBIO]),
        _ => None,
    }
}

/// The rules of `kind`'s filter: each allowed call, with conditions where it has some.
pub fn rules(kind: ThreadKind) -> Rules {
    let mut r: Rules = COMMON
        .iter()
        .chain(extra(kind))
        .chain(REFUSED_WITH_EACCES)
        .map(|&nr| (nr, Vec::new()))
        .collect();
    // tgkill: SIGABRT, which a panic's abort sends to its own thread; and for the threads that
    // pause or stop the VM (main, API), the signal that kicks a vCPU out of KVM_RUN.
    let mut signals = vec![arg_eq(2, libc::SIGABRT as u64)];
    if matches!(kind, ThreadKind::Main | ThreadKind::Api) {
        signals.push(arg_eq(2, crate::kvm::kick_signal() as u64));
    }
    r.insert(libc::SYS_tgkill, signals);
    let f = std::iter::once(libc::F_GETFD as u64).chain(fcntls(kind).iter().copied());
    r.insert(libc::SYS_fcntl, f.map(|cmd| arg_eq(1, cmd)).collect());
    if let Some(reqs) = ioctls(kind) {
        let per_request = reqs.iter().map(|&req| arg_eq(1, req)).collect();
        r.insert(libc::SYS_ioctl, per_request);
    }
    if spawns_threads(kind) {
        r.extend(SPAWN.iter().map(|&nr| (nr, Vec::new())));
        let prctls = SPAWN_PRCTLS.iter().map(|&op| arg_eq(0, op)).collect();
        r.insert(libc::SYS_prctl, prctls);
        let filter_mode = libc::SECCOMP_SET_MODE_FILTER as u64;
        r.insert(libc::SYS_seccomp, vec![arg_eq(0, filter_mode)]);
    }
    r
}

/// A rule matching calls whose argument `index` (compared as 32 bits) is `value`.
fn arg_eq(index: u8, value: u64) -> SeccompRule {
    let cond = SeccompCondition::new(index, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
        .expect("argument index below 6");
    SeccompRule::new(vec![cond]).expect("one condition")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_and_vcpu_threads_cannot_exec_or_open_sockets() {
        for kind in [ThreadKind::Vcpu, ThreadKind::Device, ThreadKind::BlockIo] {
            let r = rules(kind);
            for nr in [libc::SYS_execve, libc::SYS_socket, libc::SYS_clone3] {
                assert!(!r.contains_key(&nr), "{kind:?} allows {nr}");
            }
        }
        assert_eq!(
            rules(ThreadKind::Vcpu)[&libc::SYS_ioctl].len(),
            crate::kvm::VCPU_RUN_TIME_IOCTLS.len()
        );
        assert!(!rules(ThreadKind::Device).contains_key(&libc::SYS_ioctl));
    }

    #[test]
    fn the_api_thread_may_read_kvm_state_but_not_run_or_change_it() {
        let r = rules(ThreadKind::Api);
        let allowed = &r[&libc::SYS_ioctl];
        assert_eq!(allowed.len(), API_IOCTLS.len(), "one rule per request");
        // The requests are distinct (two equal numbers would hide a missing one).
        let mut reqs = API_IOCTLS.to_vec();
        reqs.sort_unstable();
        reqs.dedup();
        assert_eq!(reqs.len(), API_IOCTLS.len());
        // KVM_RUN and KVM_SET_REGS (from the vCPU list) are not among them.
        let run = crate::kvm::VCPU_RUN_TIME_IOCTLS[0];
        let set_regs = crate::kvm::VCPU_RUN_TIME_IOCTLS[2];
        assert!(!API_IOCTLS.contains(&run) && !API_IOCTLS.contains(&set_regs));
        // KVM_GET_REGS is, and is the number the vCPU thread uses.
        assert!(API_IOCTLS.contains(&crate::kvm::VCPU_RUN_TIME_IOCTLS[1]));
    }
}
