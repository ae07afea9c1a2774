//! Helpers for the `blk_*` integration tests: start `vnode-blkd`, `qemu-nbd` and `nbdkit` on
//! port 0 / Unix sockets in temp dirs, and find the external tools.
#![allow(dead_code)] // each blk_* test binary uses a different subset

pub mod failover;

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The `vnode-blkd` binary, built once per test run in the same target dir and profile.
pub fn blkd_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(p) = std::env::var("VNODE_BLKD") {
            return PathBuf::from(p);
        }
        let exe = std::env::current_exe().expect("test executable path");
        // target/<profile>/deps/blk_x-hash -> target/<profile>
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binary lives in target/<profile>/deps");
        let target_dir = profile_dir.parent().expect("target dir");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-q", "-p", "remote-blk", "--bin", "vnode-blkd"])
            .env("CARGO_TARGET_DIR", target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("run cargo build for vnode-blkd");
        assert!(st.success(), "building vnode-blkd failed");
        profile_dir.join("vnode-blkd")
    })
    .clone()
}

/// Whether an external tool is installed. Missing tools skip a test locally; under CI
/// (CI set) they fail it, because .ci/run installs them.
pub fn have_tool(name: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        if std::env::var_os("CI").is_some() {
            panic!("{name} is not installed (CI must install it)");
        }
        eprintln!(
            "SKIPPED: {name} is not installed (apt-get install fio qemu-utils nbdkit libnbd-bin)"
        );
    }
    found
}

/// A temp dir removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("vnode-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        Self(p)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running server process, killed on drop.
pub struct Server {
    pub child: Child,
    /// `host:port` or the socket path.
    pub addr: String,
    pub unix: bool,
}

impl Server {
    pub fn uri(&self, export: &str) -> String {
        if self.unix {
            format!("nbd+unix:///{export}?socket={}", self.addr)
        } else {
            format!("nbd://{}/{export}", self.addr)
        }
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `vnode-blkd` with `args` after `--listen 127.0.0.1:0` (or `--socket` if `args` has
/// one) and waits for its `listening on ADDR` line.
/// Without `--secret-file` in `args` the server runs `--insecure` (every export open, as plain
/// NBD servers are): the interop and I/O tests; the security tests give a key.
pub fn start_blkd(args: &[&str]) -> Server {
    start_blkd_cmd(Command::new(blkd_bin()), "127.0.0.1:0", args)
}

/// [`start_blkd`] inside network namespace `ns` of `net`, listening on its address.
pub fn start_blkd_in(net: &vnode_tests::netns::Net, ns: usize, args: &[&str]) -> Server {
    let listen = format!("{}:0", net.addrs[ns]);
    start_blkd_cmd(net.command(ns, &blkd_bin()), &listen, args)
}

fn start_blkd_cmd(mut cmd: Command, listen: &str, args: &[&str]) -> Server {
    let unix = args.contains(&"--socket");
    if !unix {
        cmd.args(["--listen", listen]);
    }
    cmd.env_remove("VNODE_SECRET");
    if !args.contains(&"--secret-file") {
        cmd.arg("--insecure");
    }
    if std::env::var_os("VNODE_LOG").is_none() {
        cmd.env("VNODE_LOG", "warn");
    }
    let mut child = cmd
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn vnode-blkd");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped stdout"))
        .read_line(&mut line)
        .expect("read vnode-blkd stdout");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("vnode-blkd did not start: {line:?}"))
        .to_owned();
    Server { child, addr, unix }
}

/// Waits until something accepts connections on the Unix socket `path`.
fn wait_for_socket(child: &mut Child, path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Some(st) = child.try_wait().expect("try_wait") {
            panic!("server exited before listening: {st}");
        }
        if UnixStream::connect(path).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("server did not listen on {}", path.display());
}

/// `qemu-nbd` serving `file` as `export` on a Unix socket in `dir`.
pub fn start_qemu_nbd(dir: &TempDir, file: &Path, export: &str) -> Server {
    let sock = dir.path("qemu-nbd.sock");
    let mut child = Command::new("qemu-nbd")
        .args([
            "-f",
            "raw",
            "-t",
            "-e",
            "8",
            "--cache=writeback",
            "-x",
            export,
            "-k",
        ])
        .arg(&sock)
        .arg(file)
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn qemu-nbd");
    wait_for_socket(&mut child, &sock);
    Server {
        child,
        addr: sock.display().to_string(),
        unix: true,
    }
}

/// `nbdkit file` serving `file` as `export` on a Unix socket in `dir`.
pub fn start_nbdkit(dir: &TempDir, file: &Path, export: &str) -> Server {
    let sock = dir.path("nbdkit.sock");
    let mut child = Command::new("nbdkit")
        .args(["-f", "-e", export, "-U"])
        .arg(&sock)
        .arg("file")
        .arg(format!("file={}", file.display()))
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn nbdkit");
    wait_for_socket(&mut child, &sock);
    Server {
        child,
        addr: sock.display().to_string(),
        unix: true,
    }
}

/// Deterministic pseudo-random bytes (xorshift), different per seed.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Runs a command, panicking with its output when it fails; returns stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}
