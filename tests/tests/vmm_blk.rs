//! virtio-blk end to end: the test guest's `test=blk` (write, flush, read back, verify) against
//! a local file, `vnode-blkd` (nbd://), `qemu-nbd` and `nbdkit` (nbd+unix://). After each run a
//! second guest reads the backing file directly (`mode=verify`), so what the guest wrote is
//! checked on the disk itself, not only through the same path. A full backing disk gives the
//! guest I/O errors and nothing else; bad `--disk` values fail with one line.

mod blk_common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use blk_common::{have_tool, start_blkd, start_nbdkit, start_qemu_nbd, TempDir};
use vnode_tests::{
    bin, guest_image, proc_status, run_watching, run_with_deadline, vnode_testguest, Finished,
};

const DEADLINE: Duration = Duration::from_secs(300);
const DISK_BYTES: u64 = 64 << 20;
const SECTORS: u64 = 64 << 11; // all of DISK_BYTES

fn sparse_file(path: &Path, len: u64) {
    let f = std::fs::File::create(path).expect("create disk file");
    f.set_len(len).expect("size disk file");
}

fn blk_run(disk: &str, cmdline: &str) -> (Finished, Duration) {
    let t0 = Instant::now();
    let f = run_with_deadline(
        &mut vnode_testguest("256M", 1, cmdline, &["--disk", disk]),
        DEADLINE,
    );
    (f, t0.elapsed())
}

/// Runs `test=blk` and checks it passed; returns the report line and the wall time.
fn blk_ok(disk: &str, cmdline: &str) -> (serde_json::Value, Duration) {
    let (f, took) = blk_run(disk, cmdline);
    let done = f
        .last_with("done")
        .unwrap_or_else(|| panic!("no done line; stdout:\n{}\nstderr:\n{}", f.stdout, f.stderr));
    assert_eq!(done["ok"], true, "{}\n{}", f.stdout, f.stderr);
    assert_eq!(f.status.code(), Some(0), "stderr: {}", f.stderr);
    let report = f.last_with("test").expect("report line");
    assert_eq!(report["test"], "blk");
    assert_eq!(report["io_errors"], 0, "{report}");
    assert_eq!(report["errors"], 0, "{report}");
    (report, took)
}

/// Writes through `disk`, then verifies `file` (its backing file) with a second, read-only run.
fn write_then_verify_file(disk: &str, file: &Path, pattern: &str, seed: u64) {
    let cmd = format!("test=blk sectors={SECTORS} pattern={pattern} seed={seed}");
    let (report, took) = blk_ok(disk, &cmd);
    assert_eq!(report["sectors"], SECTORS);
    assert_eq!(report["capacity"], SECTORS);
    assert_eq!(report["id"], "vnode-blk0");
    assert_eq!(report["flush"], true);
    eprintln!(
        "{disk}: {} MiB written, flushed, read back in {took:?} (write {} / read {} cycles)",
        DISK_BYTES >> 20,
        report["write_cycles"],
        report["read_cycles"]
    );
    let ro = format!("{},readonly", file.display());
    blk_ok(
        &ro,
        &format!("test=blk sectors={SECTORS} seed={seed} mode=verify"),
    );
}

#[test]
fn local_file() {
    let dir = TempDir::new("vmm-blk-file");
    let file = dir.path("disk.img");
    sparse_file(&file, DISK_BYTES);
    write_then_verify_file(&file.display().to_string(), &file, "random", 11);
    // The verify run really checks: another seed's content is all mismatches.
    let ro = format!("{},readonly", file.display());
    let (f, _) = blk_run(&ro, "test=blk sectors=64 seed=12 mode=verify");
    assert_eq!(f.status.code(), Some(1), "{}", f.stdout);
    let report = f.last_with("test").expect("report");
    assert_eq!(report["errors"], 64 * 64, "{report}");
    assert_eq!(report["first_error_sector"], 0);
}

#[test]
fn read_only_disk_refuses_writes() {
    let dir = TempDir::new("vmm-blk-ro");
    let file = dir.path("disk.img");
    sparse_file(&file, 1 << 20);
    let (f, _) = blk_run(
        &format!("{},readonly", file.display()),
        "test=blk sectors=16",
    );
    assert_eq!(f.status.code(), Some(1), "{}\n{}", f.stdout, f.stderr);
    let report = f.last_with("test").expect("report");
    assert_eq!(report["io_errors"], 2, "{report}");
    assert_eq!(std::fs::read(&file).unwrap(), vec![0u8; 1 << 20]);
}

#[test]
fn vnode_blkd_over_tcp() {
    let dir = TempDir::new("vmm-blk-blkd");
    let file = dir.path("export.img");
    let export = format!("disk={}:{DISK_BYTES}", file.display());
    let uri = {
        let server = start_blkd(&["--export", &export]);
        let uri = server.uri("disk");
        write_then_verify_file(&uri, &file, "random", 21);
        uri
    };
    assert!(uri.starts_with("nbd://127.0.0.1:"));
}

#[test]
fn qemu_nbd_over_unix_socket() {
    if !have_tool("qemu-nbd") {
        return;
    }
    let dir = TempDir::new("vmm-blk-qemu");
    let file = dir.path("export.img");
    sparse_file(&file, DISK_BYTES);
    let server = start_qemu_nbd(&dir, &file, "disk");
    let uri = server.uri("disk");
    assert!(uri.starts_with("nbd+unix:///disk?socket="));
    let cmd = format!("test=blk sectors={SECTORS} pattern=random seed=31");
    blk_ok(&uri, &cmd);
    drop(server);
    let ro = format!("{},readonly", file.display());
    blk_ok(
        &ro,
        &format!("test=blk sectors={SECTORS} seed=31 mode=verify"),
    );
}

#[test]
fn nbdkit_over_unix_socket() {
    if !have_tool("nbdkit") {
        return;
    }
    let dir = TempDir::new("vmm-blk-nbdkit");
    let file = dir.path("export.img");
    sparse_file(&file, DISK_BYTES);
    let server = start_nbdkit(&dir, &file, "disk");
    blk_ok(
        &server.uri("disk"),
        "test=blk sectors=8192 pattern=seq seed=41",
    );
    drop(server);
    let ro = format!("{},readonly", file.display());
    blk_ok(&ro, "test=blk sectors=8192 seed=41 mode=verify");
}

/// A small tmpfs, unmounted on drop.
struct Tmpfs(TempDir);

impl Tmpfs {
    /// None (and a note) where mounting is not allowed, outside CI.
    fn mount(tag: &str, size: &str) -> Option<Tmpfs> {
        let dir = TempDir::new(tag);
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir.0)
            .status();
        if st.is_ok_and(|s| s.success()) {
            return Some(Tmpfs(dir));
        }
        assert!(
            std::env::var_os("CI").is_none(),
            "cannot mount a tmpfs (the full-disk tests need root)"
        );
        eprintln!("SKIPPED: cannot mount a tmpfs (needs root)");
        None
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0 .0).status();
    }
}

/// The guest writes 16 MiB to a 32 MiB disk whose file lives on a 4 MiB tmpfs: it gets I/O
/// errors, reports them and fails; vnode exits with the guest's status and nothing else breaks.
fn full_disk(disk: &str) {
    let (f, _) = blk_run(disk, "test=blk sectors=32768 pattern=seq seed=5");
    assert_eq!(f.status.code(), Some(1), "{}\n{}", f.stdout, f.stderr);
    let done = f.last_with("done").expect("done line");
    assert_eq!(done["ok"], false);
    let report = f.last_with("test").expect("report");
    let io_errors = report["io_errors"].as_u64().unwrap();
    assert!(io_errors > 0, "{report}");
    assert!(!f.stderr.contains("panicked"), "{}", f.stderr);
    assert!(!f.stderr.contains("vnode: error"), "{}", f.stderr);
}

#[test]
fn full_local_disk_is_an_io_error() {
    let Some(fs) = Tmpfs::mount("vmm-blk-full", "4m") else {
        return;
    };
    let file = fs.0.path("disk.img");
    sparse_file(&file, 32 << 20);
    full_disk(&file.display().to_string());
}

#[test]
fn full_nbd_disk_is_an_io_error() {
    let Some(fs) = Tmpfs::mount("vmm-blk-full-nbd", "4m") else {
        return;
    };
    let file = fs.0.path("export.img");
    let export = format!("disk={}:32M", file.display());
    let server = start_blkd(&["--export", &export]);
    full_disk(&server.uri("disk"));
    drop(server);
}

#[test]
fn bad_disks_fail_with_one_line() {
    let dir = TempDir::new("vmm-blk-bad");
    let refused = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("nbd://{}/disk", l.local_addr().unwrap())
    };
    let missing = dir.path("missing.img").display().to_string();
    // A malformed value is a usage error (250); one that cannot be opened, a set-up error (251).
    for (disk, expect, code) in [
        (missing.as_str(), "cannot open", 251),
        ("ftp://host/disk", "invalid --disk", 250),
        ("nbd://host:notaport/disk", "invalid --disk", 250),
        (refused.as_str(), "refused", 251),
    ] {
        let f = run_with_deadline(
            Command::new(bin("vnode"))
                .args(["run", "--kernel"])
                .arg(guest_image("testguest.elf"))
                .args(["--cmdline", "test=blk", "--disk", disk]),
            Duration::from_secs(60),
        );
        assert_eq!(f.status.code(), Some(code), "{disk}: {}", f.stderr);
        let lines: Vec<_> = f.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{disk}: {}", f.stderr);
        assert!(lines[0].contains(expect), "{disk}: {}", f.stderr);
    }
}

#[test]
fn hostile_chains_are_refused_and_the_vmm_lives() {
    let dir = TempDir::new("vmm-blk-hostile");
    let file = dir.path("disk.img");
    sparse_file(&file, 1 << 20);
    // A read into a buffer at 1 TiB (outside RAM) must get IOERR; a looping chain must set
    // DEVICE_NEEDS_RESET; after a reset the same device must work normally.
    let (report, _) = blk_ok(
        &file.display().to_string(),
        "test=blk sectors=256 mode=hostile",
    );
    assert_eq!(report["outside_ram_status"], 1, "{report}");
    assert_eq!(report["loop_needs_reset"], true, "{report}");
}

#[test]
fn aliased_4g_requests_are_refused_and_host_memory_stays_bounded() {
    let dir = TempDir::new("vmm-blk-aliased");
    let file = dir.path("disk.img");
    // Large enough that a 4 GiB request is in range: only the device's own limits refuse it.
    sparse_file(&file, 8 << 30);
    let mut hwm_kib = 0u64;
    let f = run_watching(
        &mut vnode_testguest(
            "256M",
            1,
            "test=blk sectors=2048 pattern=random mode=hostile-4g",
            &["--disk", &file.display().to_string()],
        ),
        DEADLINE,
        |pid| {
            if let Some(kib) = proc_status(pid, "VmHWM").and_then(|v| v.parse().ok()) {
                hwm_kib = hwm_kib.max(kib);
            }
        },
    );
    assert_eq!(f.status.code(), Some(0), "{}\n{}", f.stdout, f.stderr);
    let report = f.last_with("test").expect("report line");
    // 126 descriptors naming the same 32 MiB: a write and a read of 3.94 GiB, each IOERR.
    assert_eq!(report["aliased_bytes"], 126u64 << 25, "{report}");
    assert_eq!(report["aliased_write_status"], 1, "{report}");
    assert_eq!(report["aliased_read_status"], 1, "{report}");
    // ...and then normal verified I/O on the same device.
    assert_eq!(
        (report["io_errors"].as_u64(), report["errors"].as_u64()),
        (Some(0), Some(0))
    );
    assert_eq!(f.last_with("done").expect("done line")["ok"], true);
    // Guest RAM (256 MiB, of which the guest touches little) plus 200 MiB at most.
    eprintln!("vnode peak RSS: {} MiB", hwm_kib >> 10);
    assert!(hwm_kib > 0, "VmHWM was never read");
    assert!(
        hwm_kib < (256 + 200) << 10,
        "vnode peak RSS {} MiB",
        hwm_kib >> 10
    );
}

#[test]
fn second_disk_on_its_own_slot() {
    let dir = TempDir::new("vmm-blk-two");
    let (first, second) = (dir.path("first.img"), dir.path("second.img"));
    sparse_file(&first, 1 << 20);
    let export = format!("disk={}:4M", second.display());
    let server = start_blkd(&["--export", &export]);
    let f = run_with_deadline(
        &mut vnode_testguest(
            "256M",
            1,
            "test=blk disk=1 sectors=8192 pattern=random seed=9",
            &[
                "--disk",
                &first.display().to_string(),
                "--disk",
                &server.uri("disk"),
            ],
        ),
        DEADLINE,
    );
    assert_eq!(f.status.code(), Some(0), "{}\n{}", f.stdout, f.stderr);
    let report = f.last_with("test").expect("report");
    assert_eq!(
        (report["disk"].as_u64(), report["capacity"].as_u64()),
        (Some(1), Some(8192))
    );
    assert_eq!(report["id"], "vnode-blk1");
    drop(server);
    assert_eq!(
        std::fs::read(&first).unwrap(),
        vec![0u8; 1 << 20],
        "disk 0 untouched"
    );
    let ro = format!("{},readonly", second.display());
    blk_ok(&ro, "test=blk sectors=8192 seed=9 mode=verify");
    // No device in slot 1 without a second --disk: the guest says so and exits 2.
    let (f, _) = blk_run(&ro, "test=blk disk=1");
    assert_eq!(f.status.code(), Some(2), "{}", f.stdout);
    assert!(f.stdout.contains("no virtio-blk device"), "{}", f.stdout);
}

#[test]
fn unknown_export_fails_with_one_line() {
    let dir = TempDir::new("vmm-blk-noexport");
    let export = format!("disk={}:1M", dir.path("e.img").display());
    let server = start_blkd(&["--export", &export]);
    let f = run_with_deadline(
        Command::new(bin("vnode"))
            .args(["run", "--kernel"])
            .arg(guest_image("testguest.elf"))
            .args(["--cmdline", "test=blk", "--disk", &server.uri("nope")]),
        Duration::from_secs(60),
    );
    assert_eq!(f.status.code(), Some(251), "{}", f.stderr);
    assert_eq!(f.stderr.lines().count(), 1, "{}", f.stderr);
    assert!(f.stderr.contains("disk 0: nbd:"), "{}", f.stderr);
    assert!(f.stderr.contains("nope"), "{}", f.stderr);
}

#[test]
fn storage_server_dying_is_an_io_error() {
    use std::io::{BufRead, BufReader, Read};
    use std::process::Stdio;
    let dir = TempDir::new("vmm-blk-dies");
    let export = format!("disk={}:64M", dir.path("e.img").display());
    let mut server = start_blkd(&["--export", &export]);
    let mut vnode = vnode_testguest(
        "256M",
        1,
        &format!("test=blk sectors={SECTORS}"),
        &["--disk", &server.uri("disk")],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .expect("spawn vnode");
    let mut out = BufReader::new(vnode.stdout.take().expect("stdout"));
    let mut first = String::new();
    out.read_line(&mut first).expect("first guest line");
    assert!(first.contains("\"guest\""), "{first}");
    // The guest is running: the server goes away under it.
    let _ = server.child.kill();
    let mut rest = String::new();
    out.read_to_string(&mut rest).expect("guest output");
    let status = vnode_tests::wait_deadline(&mut vnode, DEADLINE);
    assert_eq!(status.code(), Some(1), "{rest}");
    let report: serde_json::Value = rest
        .lines()
        .find(|l| l.contains("\"test\":\"blk\""))
        .map(|l| serde_json::from_str(l).expect("json"))
        .unwrap_or_else(|| panic!("no report: {rest}"));
    assert!(report["io_errors"].as_u64().unwrap() > 0, "{report}");
    assert!(rest.contains("\"done\":true"), "{rest}");
}

#[test]
fn disk_io_into_userfaultfd_guest_ram() {
    // Guest RAM behind the ExCache (32 MiB resident of 256 MiB): the device thread faults on
    // the guest's buffers like a vCPU does, and the fault thread serves it.
    let dir = TempDir::new("vmm-blk-uffd");
    let file = dir.path("disk.img");
    sparse_file(&file, DISK_BYTES);
    let f = run_with_deadline(
        &mut vnode_testguest(
            "256M",
            1,
            &format!("test=blk sectors={SECTORS} pattern=random seed=51"),
            &[
                "--disk",
                &file.display().to_string(),
                "--mem-server",
                "local",
                "--local-mem",
                "32M",
            ],
        ),
        DEADLINE,
    );
    assert_eq!(f.status.code(), Some(0), "{}\n{}", f.stdout, f.stderr);
    let report = f.last_with("test").expect("report");
    assert_eq!(
        (report["errors"].as_u64(), report["io_errors"].as_u64()),
        (Some(0), Some(0))
    );
    let ro = format!("{},readonly", file.display());
    blk_ok(
        &ro,
        &format!("test=blk sectors={SECTORS} seed=51 mode=verify"),
    );
}
