//! Live migration of a running guest's RAM between real `vnode-memd` processes, triggered the
//! way an operator does it (`vnode-memd migrate`, authenticated with the cluster key), while
//! the test guest runs `test=mem` with writes through an ExCache much smaller than its working
//! set (pages really go out to the servers and come back). The guest must end `ok:true`, and the
//! old server must hold nothing of the vNode afterwards.
//!
//! Crash tests pause the migration at a named step (a test hook of debug builds of
//! `vnode-memd`: `VNODE_MEMD_TEST_PAUSE=STEP`, `VNODE_MEMD_TEST_PAUSE_FILE=PATH`), kill the
//! source, the target or the VMM, and check that the guest's data is intact wherever the guest
//! survives and that exactly one server owns the region (no orphan, no second copy).

mod mem_support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mem_support::{auth, memd_bin, temp_dir, Memd, SECRET_STR};
use remote_mem::MemClient;
use vnode_tests::{vnode_testguest, wait_deadline, Finished};

const DEADLINE: Duration = Duration::from_secs(300);
/// Each server's capacity, in pages (512 MiB).
const CAPACITY: u64 = 512 * 256;
/// Guest RAM, in pages: the region the VMM allocates (64 MiB).
const GUEST_PAGES: u64 = 64 * 256;

/// A running `vnode` with the test guest on remote memory.
struct Guest {
    child: Child,
    serial: PathBuf,
    stderr: PathBuf,
}

impl Guest {
    /// 32 MiB of working set through an 8 MiB ExCache, half the accesses writes.
    fn start(servers: &str, vnode: u64) -> Guest {
        Self::start_passes(servers, vnode, 3)
    }

    /// The same guest, with `passes` passes over its working set (3 take ~10 s here).
    fn start_passes(servers: &str, vnode: u64, passes: u32) -> Guest {
        let dir = temp_dir("mig-guest");
        let serial = dir.join("serial.out");
        let stderr = dir.join("vnode.stderr");
        let id = format!("{vnode:#x}");
        let mut cmd = vnode_testguest(
            "64M",
            1,
            &format!("test=mem bytes=32M pattern=random seed=21 writes=50 passes={passes}"),
            &[
                "--mem-server",
                servers,
                "--vnode-id",
                &id,
                "--local-mem",
                "8M",
                "--serial",
                serial.to_str().expect("utf-8 path"),
            ],
        );
        let child = cmd
            .env("VNODE_SECRET", SECRET_STR)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).expect("create stderr file"))
            .spawn()
            .expect("spawn vnode");
        let mut g = Guest {
            child,
            serial,
            stderr,
        };
        g.wait_for("\"phase\":\"fill\"");
        g
    }

    fn serial(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// Waits until the guest's serial output contains `what` (the guest still running).
    fn wait_for(&mut self, what: &str) {
        let t = Instant::now();
        while !self.serial().contains(what) {
            assert!(t.elapsed() < DEADLINE, "guest never printed {what}");
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                panic!(
                    "vnode exited ({st}) before {what}:\n{}\n{}",
                    self.serial(),
                    std::fs::read_to_string(&self.stderr).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn finish(mut self) -> Finished {
        let status = wait_deadline(&mut self.child, DEADLINE);
        Finished {
            status,
            stdout: self.serial(),
            stderr: std::fs::read_to_string(&self.stderr).unwrap_or_default(),
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The guest ran to its end and verified every page it wrote.
fn assert_ok(f: &Finished, what: &str) {
    let done = f.last_with("done");
    assert!(
        f.status.success() && done.as_ref().is_some_and(|d| d["ok"] == true),
        "{what}: guest did not end ok:true ({}):\n{}\n{}",
        f.status,
        f.stdout,
        f.stderr
    );
}

/// Pages the server at `addr` has handed out (to anyone): 0 means it holds nothing.
fn held(addr: &str) -> u64 {
    let c = MemClient::connect(addr, &auth(1)).expect("connect to count pages");
    let (cap, free) = c.server_pages();
    assert_eq!(cap, CAPACITY);
    cap - free
}

/// `vnode-memd migrate`, the operator's command, as a child process.
fn migrate_cmd(from: &str, vnode: u64, to: &str) -> Child {
    Command::new(memd_bin())
        .args(["migrate", "--server", from, "--region"])
        .arg(format!("{vnode:#x}:0"))
        .args(["--to", to])
        .env("VNODE_SECRET", SECRET_STR)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vnode-memd migrate")
}

fn migrate(from: &str, vnode: u64, to: &str) {
    let out = migrate_cmd(from, vnode, to)
        .wait_with_output()
        .expect("wait for vnode-memd migrate");
    assert!(
        out.status.success(),
        "vnode-memd migrate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("migrated"));
}

fn server(env: &[(&str, &str)]) -> Memd {
    Memd::start_env("127.0.0.1:0", &["--capacity", "512M"], env)
}

#[test]
fn guest_ram_migrates_live_between_servers_without_a_backup() {
    let a = server(&[]);
    let b = server(&[]);
    let vnode = 0x51;
    let mut g = Guest::start(&a.addr, vnode);
    assert_eq!(held(&a.addr), GUEST_PAGES);
    migrate(&a.addr, vnode, &b.addr);
    assert!(g.running(), "the migration finished while the guest ran");
    // The old server holds nothing of the vNode; the new one holds its region.
    assert_eq!(held(&a.addr), 0);
    assert_eq!(held(&b.addr), GUEST_PAGES);
    // The guest keeps faulting (it follows the region to b): run it to its end.
    let f = g.finish();
    assert_ok(&f, "unreplicated");
    // It followed its RAM to b: it freed it there when it exited.
    assert_eq!(
        held(&b.addr),
        0,
        "the guest freed its RAM on the new server"
    );
    assert!(a.stderr().contains("region migrated"), "{}", a.stderr());
}

#[test]
fn one_replica_migrates_live_and_the_backup_stays_in_the_write_set() {
    let a = server(&[]);
    let b = server(&[]);
    let mut c = server(&[]);
    let vnode = 0x52;
    let mut g = Guest::start(&format!("{},{}", a.addr, c.addr), vnode);
    migrate(&a.addr, vnode, &b.addr);
    assert!(g.running());
    assert_eq!(held(&a.addr), 0);
    assert_eq!(held(&b.addr), GUEST_PAGES);
    g.wait_for("\"phase\":\"passes\"");
    // The backup kept receiving every write-back: with it gone, the new primary alone has
    // every page, and the guest still verifies all of them.
    c.kill9();
    let f = g.finish();
    assert_ok(&f, "replicated, backup killed after the migration");
}

/// Where a crash test pauses the migration, and whom it kills there.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Victim {
    Source,
    Target,
    Vmm,
}

/// Pauses a migration of a replicated guest's primary (a -> b, backup c) at `step`, kills
/// `victim`, lets the migration go on, and checks the outcome.
fn crash_at(step: &str, victim: Victim) {
    let pause = temp_dir("mig-pause").join("paused");
    let pause_s = pause.to_str().expect("utf-8 path").to_string();
    let mut a = server(&[
        ("VNODE_MEMD_TEST_PAUSE", step),
        ("VNODE_MEMD_TEST_PAUSE_FILE", &pause_s),
    ]);
    let mut b = server(&[]);
    let c = server(&[]);
    let vnode = 0x60;
    let mut g = Guest::start(&format!("{},{}", a.addr, c.addr), vnode);
    let mut cmd = migrate_cmd(&a.addr, vnode, &b.addr);
    wait_file(&pause);
    match victim {
        Victim::Source => a.kill9(),
        Victim::Target => b.kill9(),
        Victim::Vmm => g.kill(),
    }
    std::fs::remove_file(&pause).expect("unpause");
    let migrated = wait_deadline(&mut cmd, DEADLINE).success();
    let what = format!("{victim:?} killed at {step}");
    // Who owns the migrating replica now: exactly one of a and b (among those alive).
    let on = |m: &Memd, alive: bool| if alive { held(&m.addr) } else { 0 };
    let (on_a, on_b) = (
        on(&a, victim != Victim::Source),
        on(&b, victim != Victim::Target),
    );
    match victim {
        Victim::Source => {
            assert!(
                !migrated,
                "{what}: the operator is told the migration failed"
            );
            // Before the commit the target drops its incoming copy; after it, the target owns
            // the region.
            let want = if step == "after-switch" {
                GUEST_PAGES
            } else {
                0
            };
            assert_eq!(on_b, want, "{what}: target holds {on_b} pages");
        }
        Victim::Target => {
            let want = if step == "after-switch" {
                0
            } else {
                GUEST_PAGES
            };
            assert_eq!(migrated, step == "after-switch", "{what}");
            assert_eq!(on_a, want, "{what}: source holds {on_a} pages");
        }
        Victim::Vmm => {
            // The migration does not need the VMM: it completes, and a killed VMM's RAM stays
            // where it is (as it would without a migration), on exactly one server.
            assert!(migrated, "{what}");
            assert_eq!((on_a, on_b), (0, GUEST_PAGES), "{what}");
            return;
        }
    }
    // With a backup, the guest survives the death of either server and verifies every page.
    let f = g.finish();
    assert_ok(&f, &what);
    // It freed what it held: nothing is left behind on the servers still alive (except, when
    // the source died after the switch, the target's copy the VMM never learned about).
    assert_eq!(held(&c.addr), 0, "{what}: backup");
    if victim == Victim::Target {
        assert_eq!(held(&a.addr), 0, "{what}: source after the guest exited");
    } else if step != "after-switch" {
        assert_eq!(held(&b.addr), 0, "{what}: target after the guest exited");
    }
}

/// Waits for the test hook's pause file.
fn wait_file(p: &Path) {
    let t = Instant::now();
    while !p.exists() {
        assert!(
            t.elapsed() < DEADLINE,
            "migration never reached its pause point"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn crash_before_the_copy() {
    for v in [Victim::Source, Victim::Target, Victim::Vmm] {
        crash_at("before-copy", v);
    }
}

#[test]
fn crash_mid_copy() {
    for v in [Victim::Source, Victim::Target, Victim::Vmm] {
        crash_at("mid-copy", v);
    }
}

#[test]
fn crash_after_the_copy_before_the_switch() {
    for v in [Victim::Source, Victim::Target, Victim::Vmm] {
        crash_at("before-switch", v);
    }
}

#[test]
fn crash_after_the_switch() {
    for v in [Victim::Source, Victim::Target, Victim::Vmm] {
        crash_at("after-switch", v);
    }
}

#[test]
fn a_failed_migration_can_be_retried_and_a_silent_target_times_out() {
    let a = server(&[]);
    let b = server(&[]);
    let vnode = 0x53;
    let mut g = Guest::start_passes(&a.addr, vnode, 15);
    // A target that accepts TCP but never speaks: the migration fails within the handshake
    // timeout, and the region is served all along.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent_addr = silent.local_addr().expect("addr").to_string();
    let t = Instant::now();
    let out = migrate_cmd(&a.addr, vnode, &silent_addr)
        .wait_with_output()
        .expect("wait");
    assert!(!out.status.success());
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    assert!(g.running());
    // A target that dies mid-copy, with a memory log: restarted on the same address and
    // directory, it holds nothing of the aborted copy, and the retry succeeds.
    drop(b);
    let dir = temp_dir("mig-target-log");
    let d = dir.to_str().expect("utf-8 path");
    let mut b = Memd::start_env("127.0.0.1:0", &["--capacity", "512M", "--data-dir", d], &[]);
    let b_addr = b.addr.clone();
    let mut cmd = migrate_cmd(&a.addr, vnode, &b_addr);
    // Kill the target as soon as the incoming copy exists on its disk.
    let t = Instant::now();
    while !std::fs::read_dir(&dir).expect("read data dir").any(|e| {
        e.expect("entry")
            .file_name()
            .to_string_lossy()
            .ends_with(".incoming")
    }) {
        assert!(t.elapsed() < DEADLINE, "no incoming file appeared");
        std::thread::sleep(Duration::from_millis(1));
    }
    b.kill9();
    let failed = !wait_deadline(&mut cmd, DEADLINE).success();
    let b = Memd::start_env(&b_addr, &["--capacity", "512M", "--data-dir", d], &[]);
    if failed {
        assert_eq!(held(&b.addr), 0, "the aborted copy was dropped at restart");
        migrate(&a.addr, vnode, &b.addr);
    }
    assert_eq!(held(&a.addr), 0);
    assert_eq!(held(&b.addr), GUEST_PAGES);
    let f = g.finish();
    assert_ok(&f, "after a failed migration and a retry");
}

#[test]
fn only_servers_may_push_a_region_in() {
    let a = server(&[]);
    let mut c = MemClient::connect(&a.addr, &auth(0x54)).expect("connect as the vNode");
    let e = c
        .migrate_in(0, 16)
        .expect_err("a vNode cannot create incoming regions");
    assert_eq!(e.code(), Some(remote_mem::ErrorCode::Auth), "{e}");
    let e = c.commit_region(0).expect_err("nor commit one");
    assert_eq!(e.code(), Some(remote_mem::ErrorCode::Auth), "{e}");
    assert_eq!(held(&a.addr), 0);
}

#[test]
fn the_bandwidth_cap_holds_and_zero_pages_are_not_sent() {
    let a = Memd::start_env(
        "127.0.0.1:0",
        &["--capacity", "512M", "--migrate-bandwidth", "4M"],
        &[],
    );
    let b = server(&[]);
    let vnode = 0x55;
    let mut c = MemClient::connect(&a.addr, &auth(vnode)).expect("connect");
    // 64 MiB region, 8 MiB of it written: only those 8 MiB cross, at 4 MiB/s (all 64 MiB would
    // take 16 s).
    c.alloc_region(0, 64 * 256).expect("alloc");
    let pages: Vec<u64> = (0..2048).map(|i| i * 8).collect();
    for chunk in pages.chunks(256) {
        c.write_pages(0, chunk, &mem_support::pattern(5, chunk))
            .expect("write");
    }
    let t = Instant::now();
    migrate(&a.addr, vnode, &b.addr);
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(8),
        "8 MiB at 4 MiB/s took {took:?}"
    );
    let mut c = MemClient::connect(&b.addr, &auth(vnode)).expect("connect to b");
    let mut out = vec![0u8; 256 * 4096];
    c.read_pages(0, &pages[..256], &mut out).expect("read");
    assert_eq!(out, mem_support::pattern(5, &pages[..256]));
    c.read_pages(0, &[1], &mut out[..4096]).expect("read");
    assert!(out[..4096].iter().all(|&x| x == 0));
}
