//! Helpers shared by the integration tests in tests/tests/: where the binaries and guest images
//! are, and running `vnode` with a deadline.

pub mod netns;
pub mod prom;
pub mod wire;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the repository root")
        .to_owned()
}

/// The directory holding the workspace's binaries for this build profile (target/<profile>).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe
        .parent()
        .expect("test binary lives in target/<profile>/deps");
    deps.parent().expect("target/<profile>").to_owned()
}

/// A workspace binary, e.g. `vnode`; panics with the command to build it if it is missing.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --bins` (tests/run.sh does)",
        p.display()
    );
    p
}

/// A built guest image in guest-images/out; panics with the command to build it if missing.
pub fn guest_image(name: &str) -> PathBuf {
    let p = repo_root().join("guest-images/out").join(name);
    assert!(
        p.exists(),
        "{} is missing: run `bash guest-images/build.sh testguest` and `bash guest-images/build.sh kernel` (tests/run.sh does)",
        p.display()
    );
    p
}

/// What a finished process printed, and how it ended.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    /// The JSON lines of stdout (other lines skipped).
    pub fn json_lines(&self) -> Vec<serde_json::Value> {
        self.stdout
            .lines()
            .filter_map(|l| serde_json::from_str(l.trim()).ok())
            .collect()
    }

    /// The last JSON line that has `key`.
    pub fn last_with(&self, key: &str) -> Option<serde_json::Value> {
        self.json_lines()
            .into_iter()
            .rev()
            .find(|v| v.get(key).is_some())
    }
}

/// Runs `cmd` with stdout/stderr captured, killing it after `deadline`.
pub fn run_with_deadline(cmd: &mut Command, deadline: Duration) -> Finished {
    run_watching(cmd, deadline, |_| {})
}

/// Like [`run_with_deadline`], calling `watch` with the child's pid every 20 ms while it runs.
pub fn run_watching(cmd: &mut Command, deadline: Duration, mut watch: impl FnMut(u32)) -> Finished {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let out = drain(child.stdout.take().expect("stdout"));
    let err = drain(child.stderr.take().expect("stderr"));
    let pid = child.id();
    let status = wait_deadline_with(&mut child, deadline, || watch(pid));
    Finished {
        status,
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

fn drain(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = r.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    })
}

/// Waits for `child`, killing it if it runs past `deadline`.
pub fn wait_deadline(child: &mut Child, deadline: Duration) -> ExitStatus {
    wait_deadline_with(child, deadline, || {})
}

fn wait_deadline_with(child: &mut Child, deadline: Duration, mut tick: impl FnMut()) -> ExitStatus {
    let start = Instant::now();
    loop {
        tick();
        if let Some(st) = child.try_wait().expect("try_wait") {
            return st;
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let st = child.wait().expect("wait");
            panic!("process ran past its {deadline:?} deadline and was killed ({st})");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A field of `/proc/PID/status` (e.g. `VmHWM`, `Seccomp`), its value without the unit; None
/// once the process is gone.
pub fn proc_status(pid: u32, field: &str) -> Option<String> {
    status_field(&format!("/proc/{pid}"), field)
}

/// A field of `DIR/status` (DIR: `/proc/PID` or `/proc/PID/task/TID`), as [`proc_status`].
pub fn status_field(dir: &str, field: &str) -> Option<String> {
    let text = std::fs::read_to_string(format!("{dir}/status")).ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k == field).then(|| v.split_whitespace().next().unwrap_or("").to_owned())
    })
}

/// `vnode run` with the test guest and the given extra arguments.
pub fn vnode_testguest(mem: &str, vcpus: u32, cmdline: &str, extra: &[&str]) -> Command {
    let mut c = Command::new(bin("vnode"));
    c.args(["run", "--kernel"])
        .arg(guest_image("testguest.elf"))
        .args([
            "--mem",
            mem,
            "--vcpus",
            &vcpus.to_string(),
            "--cmdline",
            cmdline,
        ])
        .args(extra);
    c
}

/// Boots Debian's vmlinux (guest-images/out/vmlinux) directly with `vcpus` vCPUs and 512 MiB,
/// polling its serial console until every line of `want` appears or `deadline` passes, then stops
/// the VM. Returns the console text; panics if vnode exits first or a line never appears.
pub fn boot_linux_until(vcpus: u32, want: &[&str], deadline: Duration) -> String {
    let log = std::env::temp_dir().join(format!("vnode-linux-{}-{vcpus}.log", std::process::id()));
    let mut child = Command::new(bin("vnode"))
        .args(["run", "--kernel"])
        .arg(guest_image("vmlinux"))
        .args(["--mem", "512M", "--vcpus", &vcpus.to_string(), "--serial"])
        .arg(&log)
        .args(["--cmdline", "console=ttyS0 earlyprintk=serial,ttyS0,115200"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vnode");
    let start = Instant::now();
    let mut seen = String::new();
    while start.elapsed() < deadline {
        seen = std::fs::read_to_string(&log).unwrap_or_default();
        if want.iter().all(|w| seen.contains(w)) {
            break;
        }
        if let Some(st) = child.try_wait().expect("try_wait") {
            let mut err = String::new();
            let _ = child
                .stderr
                .take()
                .expect("stderr")
                .read_to_string(&mut err);
            panic!("vnode exited early ({st}): {err}\nconsole:\n{seen}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&log);
    for w in want {
        assert!(
            seen.contains(w),
            "console lacks {w:?} after {:?}:\n{seen}",
            start.elapsed()
        );
    }
    seen
}
