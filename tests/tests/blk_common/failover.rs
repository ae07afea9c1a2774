//! The disk fail-over scenario shared by the fail-over tests (failover_blk.rs over loopback,
//! failover_net.rs across network namespaces): `test=blk` on a disk, a fault mid-run once the
//! guest has written a few MiB, and the stats line.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::{Server, TempDir};
use vnode_tests::{run_with_deadline, vnode_testguest, wait_deadline, Finished};

pub const DEADLINE: Duration = Duration::from_secs(300);
pub const SECTORS: u64 = 64 << 11; // 64 MiB

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after the epoch")
        .as_millis() as u64
}

pub fn stop(server: &Server) {
    let pid = libc::pid_t::try_from(server.child.id()).expect("pid fits");
    // SAFETY: signals our own child process; no memory is involved.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
}

pub fn disk_files(dir: &TempDir) -> (std::path::PathBuf, std::path::PathBuf) {
    (dir.path("primary.img"), dir.path("backup.img"))
}

pub fn export(file: &Path) -> String {
    format!("disk={}:64M", file.display())
}

/// Runs `test=blk` over `disk`; once `watch` (the primary's file) holds a few MiB of the
/// guest's writes, calls `act`. Returns how vnode ended and when `act` ran.
pub fn run_blk_and_act(disk: &str, watch: &Path, act: impl FnOnce()) -> (Finished, u64) {
    let mut child = vnode_testguest(
        "256M",
        1,
        &format!("test=blk sectors={SECTORS} pattern=random seed=77"),
        &["--disk", disk, "--stats"],
    )
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("spawn vnode");
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("stdout")));
    let err = drain(Box::new(child.stderr.take().expect("stderr")));
    let start = Instant::now();
    while std::fs::metadata(watch).map_or(0, |m| m.blocks() * 512) < 4 << 20 {
        assert!(start.elapsed() < DEADLINE, "the guest never wrote");
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "vnode exited early"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let at = now_ms();
    act();
    let status = wait_deadline(&mut child, DEADLINE);
    let f = Finished {
        status,
        stdout: out.join().expect("stdout"),
        stderr: err.join().expect("stderr"),
    };
    (f, at)
}

pub fn stats(f: &Finished) -> serde_json::Value {
    let line = f
        .stderr
        .lines()
        .rev()
        .find(|l| l.starts_with('{') && l.contains("\"replicated_disks\""))
        .unwrap_or_else(|| panic!("no stats line:\n{}", f.stderr));
    serde_json::from_str(line).expect("stats JSON")
}

/// A replicated disk whose primary failed at `at` (ms since the epoch): the guest is unharmed,
/// the stats show the fail-over within the bound, and `backup_file` holds everything (a second,
/// read-only guest verifies it).
pub fn check_blk_failover(f: &Finished, at: u64, backup_file: &Path) {
    let bf = backup_file;
    let done = f
        .last_with("done")
        .unwrap_or_else(|| panic!("no done line:\n{}\n{}", f.stdout, f.stderr));
    assert_eq!(done["ok"], true, "{}\n{}", f.stdout, f.stderr);
    assert_eq!(f.status.code(), Some(0), "{}", f.stderr);
    let report = f.last_with("test").expect("report");
    assert_eq!(
        (report["io_errors"].as_u64(), report["errors"].as_u64()),
        (Some(0), Some(0))
    );
    let s = stats(f);
    assert_eq!(s["vmm"]["blk_io_errors"], 0, "{s}");
    let d = &s["replicated_disks"][0];
    assert_eq!(d["state"], "degraded", "{d}");
    assert_eq!(d["failovers"], 1, "{d}");
    assert_eq!(d["replicas"][0]["state"], "failed", "{d}");
    assert_eq!(d["replicas"][1]["state"], "healthy", "{d}");
    assert!(
        d["replicas"][0]["dirty_bytes"].as_u64().unwrap() > 0,
        "missed writes tracked: {d}"
    );
    // The NBD deadline: 2 s for a write, 8 s for a flush or a FUA write (they wait for fsync).
    let since = d["degraded_since_unix_ms"]
        .as_u64()
        .expect("degraded since");
    assert!(
        since >= at && since - at < 10_000,
        "fail-over {} ms after the fault: {d}",
        since - at
    );
    let verify = run_with_deadline(
        &mut vnode_testguest(
            "256M",
            1,
            &format!("test=blk sectors={SECTORS} seed=77 mode=verify"),
            &["--disk", &format!("{},readonly", bf.display())],
        ),
        DEADLINE,
    );
    assert_eq!(
        verify.last_with("done").expect("done")["ok"],
        true,
        "the backup holds every sector: {}",
        verify.stdout
    );
}

/// An unreplicated disk whose server stopped answering at `at`: the guest saw I/O errors (and
/// said so: status 1, `done`), within a bound, not a hang.
pub fn check_io_error_not_hang(f: &Finished, at: u64) {
    let took = now_ms() - at;
    assert_eq!(f.status.code(), Some(1), "{}\n{}", f.stdout, f.stderr);
    let report = f.last_with("test").expect("report");
    assert!(report["io_errors"].as_u64().unwrap() > 0, "{report}");
    assert!(f.stdout.contains("\"done\":true"), "{}", f.stdout);
    let s = stats(f);
    assert!(s["vmm"]["blk_io_errors"].as_u64().unwrap() > 0, "{s}");
    assert!(
        took < 30_000,
        "the guest ended {took} ms after the server hung"
    );
}
