//! Guest RAM on real `vnode-memd` processes through the ExCache, on real KVM: data verified after
//! evictions and write-backs under both policies, residency never over the limit, a dead memory
//! server stops the VM with an error naming it, and a replicated region survives its primary.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vnode_tests::{bin, run_with_deadline, vnode_testguest, Finished};

const DEADLINE: Duration = Duration::from_secs(600);

struct Memd {
    child: Child,
    addr: String,
}

impl Memd {
    fn start() -> Memd {
        Memd::with_capacity("4G")
    }

    fn with_capacity(capacity: &str) -> Memd {
        let mut child = Command::new(bin("vnode-memd"))
            .args(["--listen", "127.0.0.1:0", "--capacity", capacity])
            .env("VNODE_SECRET", "test-secret")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn vnode-memd");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line from vnode-memd: {line:?}"))
            .to_owned();
        Memd { child, addr }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Memd {
    fn drop(&mut self) {
        self.kill();
    }
}

fn stats(f: &Finished) -> serde_json::Value {
    let line = f
        .stderr
        .lines()
        .rev()
        .find(|l| l.starts_with("{\"excache\""))
        .unwrap_or_else(|| panic!("no stats line on stderr:\n{}", f.stderr));
    serde_json::from_str::<serde_json::Value>(line).unwrap()["excache"].clone()
}

/// A 1G verified workload through a 256M ExCache with `policy`, evicting on the fault path or
/// (`reclaim`) with the reclaimer between faults.
fn remote_run(policy: &str, reclaim: bool) {
    let memd = Memd::start();
    let cmdline = "test=mem bytes=1G pattern=random seed=11 writes=50 passes=1";
    let mut args = vec![
        "--mem-server",
        &memd.addr,
        "--local-mem",
        "256M",
        "--excache-policy",
        policy,
        "--stats",
    ];
    if reclaim {
        args.push("--excache-reclaim");
    }
    let mut cmd = vnode_testguest("1280M", 1, cmdline, &args);
    cmd.env("VNODE_SECRET", "test-secret");
    let f = run_with_deadline(&mut cmd, DEADLINE);
    let done = f
        .last_with("done")
        .unwrap_or_else(|| panic!("no done line:\n{}\n{}", f.stdout, f.stderr));
    assert_eq!(done["ok"], true, "{}\n{}", f.stdout, f.stderr);
    assert_eq!(f.status.code(), Some(0));
    let report = f.last_with("test").unwrap();
    assert_eq!(report["errors"], 0);
    assert_eq!(report["pages"], 262_144);
    let s = stats(&f);
    let limit = s["limit_pages"].as_u64().unwrap();
    assert_eq!(limit, 65_536);
    assert!(s["max_resident_pages"].as_u64().unwrap() <= limit, "{s}");
    assert!(s["evictions"].as_u64().unwrap() > 200_000, "{s}");
    assert!(s["writebacks"].as_u64().unwrap() > 100_000, "{s}");
    assert!(s["fetched"].as_u64().unwrap() > 100_000, "{s}");
    assert!(s["bytes_out"].as_u64().unwrap() >= s["writebacks"].as_u64().unwrap() * 4096);
    // Faults that fetched their page from the server have their own latency figures.
    assert!(s["fetch_fault_p50_us"].as_u64().unwrap() > 0, "{s}");
    assert!(
        s["fetch_fault_p99_us"].as_u64() >= s["fetch_fault_p50_us"].as_u64(),
        "{s}"
    );
    // The fault thread's time by phase: every phase ran, and the phases fit in the whole.
    let t = &s["time_us"];
    let phase = |k: &str| t[k].as_u64().unwrap_or_else(|| panic!("time_us.{k}: {s}"));
    let parts: u64 = ["fetch", "install", "wake", "protect", "writeback", "drop"]
        .iter()
        .map(|k| phase(k))
        .sum();
    // The reclaimer's write-backs run between faults: they count in `reclaim`, not `serve`.
    assert!(
        parts > 0 && parts <= phase("serve") + phase("reclaim"),
        "{t}"
    );
    assert_eq!(
        phase("reclaim") > 0,
        reclaim,
        "the reclaimer ran iff asked: {t}"
    );
    for k in ["fetch", "install", "wake", "writeback", "drop"] {
        assert!(phase(k) > 0, "{k}: {t}");
    }
}

#[test]
fn one_gib_on_remote_memory_with_quarter_local_fifo() {
    remote_run("fifo", false);
}

#[test]
fn one_gib_on_remote_memory_with_quarter_local_clock() {
    remote_run("clock", true);
}

#[test]
fn local_page_store_runs_the_same_path() {
    let cmdline = "test=mem bytes=128M pattern=seq seed=2 writes=70 passes=2";
    let mut cmd = vnode_testguest(
        "256M",
        2,
        cmdline,
        &["--mem-server", "local", "--local-mem", "32M", "--stats"],
    );
    let f = run_with_deadline(&mut cmd, DEADLINE);
    assert_eq!(
        f.last_with("done").unwrap()["ok"],
        true,
        "{}\n{}",
        f.stdout,
        f.stderr
    );
    let s = stats(&f);
    assert!(
        s["prefetch_used"].as_u64().unwrap() > 0,
        "sequential faults prefetch: {s}"
    );
    assert!(s["max_resident_pages"].as_u64().unwrap() <= 8192, "{s}");
}

/// Starts a long remote run, waits for its first JSON line, then calls `mid`.
fn run_and_interrupt(servers: &str, mid: impl FnOnce()) -> Finished {
    run_guest_and_interrupt(
        servers,
        "test=mem bytes=512M pattern=random seed=5 writes=50 passes=3",
        &[],
        mid,
    )
}

/// As [`run_and_interrupt`], with the guest's command line given.
fn run_guest_and_interrupt(
    servers: &str,
    cmdline: &str,
    extra: &[&str],
    mid: impl FnOnce(),
) -> Finished {
    // Unique per run: the servers' ports are (parallel tests share this process's id).
    let log = std::env::temp_dir().join(format!(
        "vnode-excache-{}-{}.out",
        std::process::id(),
        servers.replace([':', ',', '.'], "_")
    ));
    let mut cmd = vnode_testguest(
        "640M",
        1,
        cmdline,
        &[
            "--mem-server",
            servers,
            "--local-mem",
            "64M",
            "--serial",
            log.to_str().unwrap(),
            "--stats",
        ],
    );
    cmd.args(extra);
    cmd.env("VNODE_SECRET", "test-secret");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("\"phase\":\"fill\"")
    {
        assert!(
            start.elapsed() < DEADLINE,
            "guest never finished its fill phase"
        );
        assert!(child.try_wait().unwrap().is_none(), "vnode exited early");
        std::thread::sleep(Duration::from_millis(50));
    }
    mid();
    let status = vnode_tests::wait_deadline(&mut child, DEADLINE);
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    let stdout = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    Finished {
        status,
        stdout,
        stderr,
    }
}

#[test]
fn dead_memory_server_stops_the_vm_naming_it() {
    let mut memd = Memd::start();
    let addr = memd.addr.clone();
    let f = run_and_interrupt(&addr, || memd.kill());
    assert_stopped_naming(&f, &addr);
}

/// A write-heavy guest: every page it touches it writes, so with 64M of 512M local the reclaimer
/// always has write-backs in flight when the server is killed.
const WRITE_HEAVY: &str = "test=mem bytes=512M pattern=random seed=9 writes=100 passes=2";

/// The reclaimer's write-backs in flight when the only memory server dies: the VM stops with an
/// error naming the server, and the guest never reports success on lost writes. With a backup,
/// the primary killed mid-write-back loses nothing: the guest verifies every page it wrote.
#[test]
fn reclaimer_with_its_memory_server_killed_mid_write_back() {
    let mut memd = Memd::start();
    let addr = memd.addr.clone();
    let f = run_guest_and_interrupt(&addr, WRITE_HEAVY, &["--excache-reclaim"], || {
        std::thread::sleep(Duration::from_millis(300));
        memd.kill();
    });
    assert_stopped_naming(&f, &addr);

    let mut primary = Memd::start();
    let backup = Memd::start();
    let servers = format!("{},{}", primary.addr, backup.addr);
    let f = run_guest_and_interrupt(&servers, WRITE_HEAVY, &["--excache-reclaim"], || {
        std::thread::sleep(Duration::from_millis(300));
        primary.kill();
    });
    let done = f
        .last_with("done")
        .unwrap_or_else(|| panic!("no done line:\n{}\n{}", f.stdout, f.stderr));
    assert_eq!(done["ok"], true, "{}\n{}", f.stdout, f.stderr);
    assert_eq!(f.last_with("test").unwrap()["errors"], 0);
    let s = stats(&f);
    assert!(s["writebacks"].as_u64().unwrap() > 100_000, "{s}");
    assert!(s["time_us"]["reclaim"].as_u64().unwrap() > 0, "{s}");
    assert!(
        s["max_resident_pages"].as_u64() <= s["limit_pages"].as_u64(),
        "{s}"
    );
}

/// The VM stopped on a fatal memory error naming `addr`, and the guest did not report success.
fn assert_stopped_naming(f: &Finished, addr: &str) {
    assert_eq!(
        f.status.code(),
        Some(252),
        "a fatal error at run time; stdout:\n{}\nstderr:\n{}",
        f.stdout,
        f.stderr
    );
    let err = f
        .stderr
        .lines()
        .find(|l| l.starts_with("vnode: error:"))
        .expect("error line");
    assert!(
        err.contains(addr),
        "error should name the server {addr}: {err}"
    );
    assert!(
        !f.stdout.contains("\"ok\":true"),
        "a guest whose memory server died must not report success:\n{}",
        f.stdout
    );
}

#[test]
fn replicated_guest_ram_survives_its_primary() {
    let mut primary = Memd::start();
    let backup = Memd::start();
    let servers = format!("{},{}", primary.addr, backup.addr);
    let f = run_and_interrupt(&servers, || primary.kill());
    let done = f
        .last_with("done")
        .unwrap_or_else(|| panic!("no done line:\n{}\n{}", f.stdout, f.stderr));
    assert_eq!(done["ok"], true, "{}\n{}", f.stdout, f.stderr);
    assert_eq!(f.status.code(), Some(0));
    assert!(stats(&f)["fetched"].as_u64().unwrap() > 0);
}

#[test]
fn missing_secret_and_bad_local_mem_are_refused() {
    let memd = Memd::start();
    let mut cmd = vnode_testguest(
        "256M",
        1,
        "test=cpu iters=10",
        &["--mem-server", &memd.addr],
    );
    cmd.env_remove("VNODE_SECRET");
    let f = run_with_deadline(&mut cmd, Duration::from_secs(60));
    assert_eq!(f.status.code(), Some(250), "{}", f.stderr);
    assert!(f.stderr.contains("no memory credential"), "{}", f.stderr);
    let mut cmd = vnode_testguest(
        "256M",
        1,
        "test=cpu iters=10",
        &["--mem-server", "local", "--local-mem", "1G"],
    );
    let f = run_with_deadline(&mut cmd, Duration::from_secs(60));
    assert_eq!(f.status.code(), Some(250), "{}", f.stderr);
    assert!(f.stderr.contains("--local-mem"), "{}", f.stderr);
}

#[test]
fn guest_ram_is_freed_on_the_server_when_the_vm_exits_and_kept_when_it_is_killed() {
    // Room for one 256M guest at a time: a second guest fits only if the first gave its pages
    // back when it exited.
    let memd = Memd::with_capacity("400M");
    let cmdline = "test=mem bytes=64M pattern=random seed=5 writes=50 passes=1";
    let args = ["--mem-server", &memd.addr, "--local-mem", "32M"];
    for run in 0..3 {
        let mut cmd = vnode_testguest("256M", 1, cmdline, &args);
        cmd.env("VNODE_SECRET", "test-secret");
        let f = run_with_deadline(&mut cmd, DEADLINE);
        assert_eq!(f.status.code(), Some(0), "run {run}: {}", f.stderr);
        assert!(f.last_with("done").unwrap()["ok"] == true, "run {run}");
    }
    // A VMM that dies (SIGKILL) cannot free anything: its pages stay on the server (nothing is
    // lost on a crash), so the next guest no longer fits.
    let mut cmd = vnode_testguest("256M", 1, "test=cpu iters=100000000000", &args);
    cmd.env("VNODE_SECRET", "test-secret");
    let mut child = cmd.stdout(Stdio::piped()).spawn().expect("spawn vnode");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("testguest"), "{line}");
    child.kill().unwrap();
    child.wait().unwrap();
    let mut cmd = vnode_testguest("256M", 1, cmdline, &args);
    cmd.env("VNODE_SECRET", "test-secret");
    let f = run_with_deadline(&mut cmd, DEADLINE);
    assert_eq!(f.status.code(), Some(251), "{}", f.stderr);
    assert!(f.stderr.contains("capacity exceeded"), "{}", f.stderr);
}
