//! vnode's sandbox with the real binary on real KVM: every thread runs under its seccomp filter
//! with no capabilities and no_new_privs while the guest runs, and a forbidden system call from
//! a vCPU thread or a device thread kills the process by SIGSYS, naming the thread kind and
//! the call (`--debug-syscall-probe KIND` makes that thread call socket(2) once sandboxed);
//! with `--no-seccomp` the same call goes through and the guest ends well.

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::time::Duration;

use vnode_api::client::Client;
use vnode_tests::{
    proc_status, run_watching, run_with_deadline, status_field, vnode_testguest, Finished,
};

const DEADLINE: Duration = Duration::from_secs(120);

/// A 64 MiB sparse disk in a fresh directory (removed with the guard).
struct Disk(PathBuf);

impl Disk {
    fn new(tag: &str) -> Disk {
        let dir = std::env::temp_dir().join(format!("vnode-sandbox-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = std::fs::File::create(dir.join("disk.img")).unwrap();
        f.set_len(64 << 20).unwrap();
        Disk(dir)
    }
    fn path(&self) -> String {
        self.0.join("disk.img").display().to_string()
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn blk_guest(disk: &Disk, extra: &[&str]) -> Finished {
    let p = disk.path();
    let mut args = vec!["--disk", p.as_str()];
    args.extend(extra);
    run_with_deadline(
        &mut vnode_testguest("128M", 1, "test=blk sectors=512", &args),
        DEADLINE,
    )
}

fn assert_killed_by_sigsys(f: &Finished, kind: &str) {
    assert_eq!(
        f.status.signal(),
        Some(libc::SIGSYS),
        "{kind}: {}\n{}",
        f.status,
        f.stderr
    );
    let want = format!("a {kind} thread made system call {}", libc::SYS_socket);
    assert!(f.stderr.contains(&want), "{kind}: {}", f.stderr);
    assert!(f.last_with("done").is_none(), "the guest must not finish");
}

#[test]
fn a_forbidden_call_on_a_vcpu_thread_kills_the_process() {
    let disk = Disk::new("vcpu");
    let f = blk_guest(&disk, &["--debug-syscall-probe", "vcpu"]);
    assert_killed_by_sigsys(&f, "vcpu");
}

#[test]
fn a_forbidden_call_on_a_device_thread_kills_the_process() {
    let disk = Disk::new("device");
    let f = blk_guest(&disk, &["--debug-syscall-probe", "device"]);
    assert_killed_by_sigsys(&f, "device");
}

#[test]
fn without_seccomp_the_same_call_goes_through() {
    let disk = Disk::new("off");
    for kind in ["vcpu", "device"] {
        let f = blk_guest(&disk, &["--no-seccomp", "--debug-syscall-probe", kind]);
        assert_eq!(f.status.code(), Some(0), "{kind}: {}", f.stderr);
        assert_eq!(f.last_with("done").expect("done line")["ok"], true);
    }
}

/// What /proc said about one thread while the guest ran.
#[derive(Debug, Default, Clone)]
struct Seen {
    seccomp: String,
    no_new_privs: String,
    cap_eff: String,
}

#[test]
fn every_thread_is_sandboxed_while_the_guest_runs() {
    // The census is taken with the VM paused through its API, so it does not race a fast guest
    // (a guest that finishes in half a second left a polling census empty): while paused every
    // thread is alive and, once the main thread is sandboxed, every thread has entered its own.
    let disk = Disk::new("status");
    let p = disk.path();
    let sock = disk.0.join("api.sock");
    let sock_arg = sock.display().to_string();
    let mut threads: std::collections::BTreeMap<String, Seen> = Default::default();
    let mut paused = false;
    let mut resumed = false;
    let want = [
        "vnode",
        "vnode-api",
        "vcpu0",
        "vcpu1",
        "blk0",
        "blk-file",
        "vmm-events",
    ];
    let f = run_watching(
        &mut vnode_testguest(
            "128M",
            2,
            "test=blk sectors=8192 pattern=random",
            &["--disk", &p, "--api-socket", &sock_arg],
        ),
        DEADLINE,
        |pid| {
            if resumed || !sock.exists() {
                return;
            }
            let Ok(api) = Client::new(&sock) else {
                return;
            };
            if !paused {
                paused = api.pause().is_ok();
                return;
            }
            if proc_status(pid, "Seccomp").as_deref() == Some("2") {
                census(pid, &mut threads);
            }
            if want.iter().all(|w| threads.contains_key(*w)) {
                resumed = api.resume().is_ok();
            }
        },
    );
    assert!(
        paused,
        "the VM was never paused through its API: {}",
        f.stderr
    );
    assert!(resumed, "census incomplete while paused: {threads:?}");
    assert_eq!(f.status.code(), Some(0), "{}", f.stderr);
    assert_eq!(f.last_with("done").expect("done line")["ok"], true);
    for name in want {
        let s = threads
            .get(name)
            .unwrap_or_else(|| panic!("thread {name} never seen: {threads:?}"));
        assert_eq!(s.seccomp, "2", "{name}: {s:?}");
        assert_eq!(s.no_new_privs, "1", "{name}: {s:?}");
        assert_eq!(s.cap_eff, "0000000000000000", "{name}: {s:?}");
    }
    eprintln!("threads seen sandboxed: {:?}", threads.keys());
}

/// Records each thread of `pid` by name with its sandbox fields from /proc.
fn census(pid: u32, threads: &mut std::collections::BTreeMap<String, Seen>) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    for t in tasks.flatten() {
        let dir = t.path().display().to_string();
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let field = |f| status_field(&dir, f);
        if let (Some(seccomp), Some(no_new_privs), Some(cap_eff)) =
            (field("Seccomp"), field("NoNewPrivs"), field("CapEff"))
        {
            threads.insert(
                comm.trim().to_owned(),
                Seen {
                    seccomp,
                    no_new_privs,
                    cap_eff,
                },
            );
        }
    }
}
