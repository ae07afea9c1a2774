//! Helpers for the memory-server tests (tests/tests/mem_*.rs): start the real `vnode-memd`,
//! wait for it to print its address, kill it.

#![allow(dead_code)]

pub mod failover;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

pub const SECRET_STR: &str = "test-secret-0123456789";
pub const SECRET: &[u8] = SECRET_STR.as_bytes();

/// Path of the built `vnode-memd` next to this test's target directory.
pub fn memd_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    let bin = dir.join("vnode-memd");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p remote-mem` first (same CARGO_TARGET_DIR)",
        bin.display()
    );
    bin
}

/// A fresh, empty directory under the system temp dir.
pub fn temp_dir(what: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "vnode-mem-{what}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create temp dir");
    d
}

/// A running `vnode-memd`.
pub struct Memd {
    child: Child,
    pub addr: String,
    pub log: PathBuf,
}

impl Memd {
    /// Starts a server on 127.0.0.1:0 with the test secret and 64 MiB, plus `extra` args.
    pub fn start(extra: &[&str]) -> Memd {
        Self::start_on("127.0.0.1:0", extra)
    }

    pub fn start_on(listen: &str, extra: &[&str]) -> Memd {
        Self::start_env(listen, extra, &[])
    }

    /// Starts a server inside network namespace `ns` of `net`, listening on its address.
    pub fn start_in(net: &vnode_tests::netns::Net, ns: usize, extra: &[&str]) -> Memd {
        let listen = format!("{}:0", net.addrs[ns]);
        Self::start_cmd(&listen, extra, &[], Some(net.command(ns, &memd_bin())))
    }

    /// Starts a server with extra environment variables (e.g. the migration test hooks).
    pub fn start_env(listen: &str, extra: &[&str], env: &[(&str, &str)]) -> Memd {
        Self::start_cmd(listen, extra, env, None)
    }

    fn start_cmd(listen: &str, extra: &[&str], env: &[(&str, &str)], cmd: Option<Command>) -> Memd {
        let mut args = vec!["--listen", listen];
        if !extra.contains(&"--capacity") {
            args.extend(["--capacity", "64M"]);
        }
        args.extend_from_slice(extra);
        let log = temp_dir("log").join("memd.stderr");
        let cmd = cmd.unwrap_or_else(|| Command::new(memd_bin()));
        let mut child = spawn_memd_cmd(cmd, &args, &log, env);
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read server stdout");
        let Some(addr) = line.trim().strip_prefix("listening on ") else {
            let _ = child.wait();
            panic!(
                "vnode-memd did not start: stdout {line:?}, stderr:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        };
        Memd {
            addr: addr.to_string(),
            child,
            log,
        }
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGSTOP: the server stays connected but never answers.
    pub fn freeze(&self) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: sends a signal to our own child process; no memory is involved.
        let r = unsafe { libc::kill(pid, libc::SIGSTOP) };
        assert_eq!(r, 0, "kill(SIGSTOP)");
        // Delivery is asynchronous: wait until the kernel reports the process stopped.
        let stat = format!("/proc/{pid}/stat");
        for _ in 0..1000 {
            let s = std::fs::read_to_string(&stat).unwrap_or_default();
            // Field 3, after "pid (comm) ", is the state.
            if s.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('T'))
            {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        panic!("vnode-memd {pid} did not stop");
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Memd {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Spawns `vnode-memd` with the test secret in its environment and stderr to `log`.
pub fn spawn_memd(args: &[&str], log: &Path) -> Child {
    spawn_memd_env(args, log, &[])
}

/// [`spawn_memd`] with extra environment variables.
pub fn spawn_memd_env(args: &[&str], log: &Path, env: &[(&str, &str)]) -> Child {
    spawn_memd_cmd(Command::new(memd_bin()), args, log, env)
}

/// [`spawn_memd_env`] through `cmd` (`vnode-memd`, or `ip netns exec NS vnode-memd`).
fn spawn_memd_cmd(mut cmd: Command, args: &[&str], log: &Path, env: &[(&str, &str)]) -> Child {
    cmd.args(args)
        .envs(env.iter().copied())
        .env("VNODE_SECRET", SECRET_STR)
        .env("VNODE_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).expect("create stderr log"))
        .spawn()
        .expect("spawn vnode-memd")
}

/// Deterministic page contents: each page distinct per (seed, page).
pub fn pattern(seed: u64, pages: &[u64]) -> Vec<u8> {
    let mut v = Vec::with_capacity(pages.len() * 4096);
    for &p in pages {
        let mut x =
            seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ p.wrapping_mul(0xbf58_476d_1ce4_e5b9);
        for _ in 0..512 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.extend_from_slice(&x.to_le_bytes());
        }
    }
    v
}

/// How a test client with the test cluster key authenticates as vNode `vnode`.
pub fn auth(vnode: u64) -> remote_mem::ClientAuth {
    remote_mem::ClientAuth::from_cluster_key(vnode, &cluster_key())
}

/// The test cluster key.
pub fn cluster_key() -> vnode_common::secret::Secret {
    vnode_common::secret::Secret::from_bytes(SECRET.to_vec()).expect("valid test key")
}
