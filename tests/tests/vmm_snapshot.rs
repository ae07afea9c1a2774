//! Snapshot and restore with real processes: the test guest runs on real KVM with guest RAM on a
//! real `vnode-memd` (an ExCache smaller than the working set, writes on) or local, and a disk on
//! a real `vnode-blkd`. Mid-run the VM is snapshotted through its API (`PUT /vm/snapshot`), the
//! first vnode is stopped, and a new `vnode restore` process on the same servers lets the guest
//! finish `ok:true`; the two serial files show its progress going on across the switch, not
//! starting again. Also: damaged and foreign snapshot files are refused with a clear error and
//! touch nothing, and a restore whose region is gone names the server.
//!
//! The pause length and the snapshot size are printed (not asserted: this machine is shared and
//! noisy).

mod blk_common;
mod mem_support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use blk_common::{start_blkd, TempDir};
use mem_support::{auth, Memd, SECRET_STR};
use remote_mem::{ErrorCode, MemClient};
use vnode_api::client::Client;
use vnode_api::SnapshotInfo;
use vnode_tests::{bin, vnode_testguest, wait_deadline};

const DEADLINE: Duration = Duration::from_secs(240);
const BANNER: &str = r#""guest":"testguest""#;
const DONE_OK: &str = r#"{"done":true,"ok":true"#;

/// Polls `path` until a line satisfies `want`; panics (with the file) after `deadline`, or if
/// `child` exits first.
fn wait_for_line(child: &mut Child, path: &Path, want: &str, deadline: Duration) {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.lines().any(|l| l.contains(want)) {
            return;
        }
        if let Some(st) = child.try_wait().expect("try_wait") {
            panic!("vnode exited ({st}) before {want:?} appeared:\n{text}");
        }
        assert!(
            start.elapsed() < deadline,
            "{want:?} did not appear within {deadline:?}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn client(socket: &Path) -> Client {
    let c = Client::new(socket).expect("API client");
    let start = Instant::now();
    while c.info().is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "API never answered"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    c
}

/// Snapshots the VM behind `socket` into `file`, stops that vnode and checks it exited cleanly.
fn snapshot_and_stop(child: &mut Child, socket: &Path, file: &Path) -> SnapshotInfo {
    let api = client(socket);
    let info = api
        .snapshot(file.to_str().unwrap())
        .expect("PUT /vm/snapshot");
    assert_eq!(
        api.info().expect("GET /vm").state,
        vnode_api::VmState::Paused
    );
    eprintln!(
        "snapshot: {} bytes, ram {}, {} dirty pages flushed, {} ms from request to file on disk \
         (pause included; shared, noisy machine)",
        info.bytes, info.ram, info.flushed_pages, info.took_ms
    );
    api.stop().expect("PUT /vm/stop");
    let st = wait_deadline(child, DEADLINE);
    assert_eq!(
        st.code(),
        Some(i32::from(vnode_common::cli::STOPPED)),
        "the snapshotted vnode exits as stopped: {st}"
    );
    info
}

fn restore_cmd(file: &Path, serial: &Path, socket: Option<&Path>) -> Command {
    let mut c = Command::new(bin("vnode"));
    c.args(["restore", "--snapshot"])
        .arg(file)
        .arg("--serial")
        .arg(serial)
        .env("VNODE_SECRET", SECRET_STR)
        .stdin(Stdio::null());
    if let Some(s) = socket {
        c.arg("--api-socket").arg(s);
    }
    c
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The serial output went on: the first vnode printed the start, the restored one the end and
/// never the start again.
fn assert_continues(first: &str, second: &str, first_has: &str) {
    assert!(first.contains(BANNER), "first run starts:\n{first}");
    assert!(
        first.contains(first_has),
        "first run got to {first_has}:\n{first}"
    );
    assert!(
        !first.contains(DONE_OK),
        "snapshot was taken before the end:\n{first}"
    );
    assert!(
        !second.contains(BANNER),
        "the restored guest went on, it did not start again:\n{second}"
    );
    assert!(
        second.contains(DONE_OK),
        "restored guest ends ok:\n{second}"
    );
}

struct Paths {
    _dir: TempDir,
    file: PathBuf,
    serial1: PathBuf,
    serial2: PathBuf,
    api1: PathBuf,
    api2: PathBuf,
}

fn paths(tag: &str) -> Paths {
    let dir = TempDir::new(tag);
    Paths {
        file: dir.path("vm.snap"),
        serial1: dir.path("serial1"),
        serial2: dir.path("serial2"),
        api1: dir.path("api1.sock"),
        api2: dir.path("api2.sock"),
        _dir: dir,
    }
}

fn spawn_first(cmd: &mut Command, p: &Paths) -> Child {
    cmd.arg("--serial")
        .arg(&p.serial1)
        .arg("--api-socket")
        .arg(&p.api1)
        .env("VNODE_SECRET", SECRET_STR)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn vnode")
}

fn restore_ok(p: &Paths) -> Output {
    let mut child = restore_cmd(&p.file, &p.serial2, Some(&p.api2))
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vnode restore");
    let st = wait_deadline(&mut child, DEADLINE);
    let out = child.wait_with_output().expect("output");
    assert!(
        st.success(),
        "restored guest exits 0 ({st}); stderr:\n{}\nserial:\n{}",
        String::from_utf8_lossy(&out.stderr),
        read(&p.serial2)
    );
    out
}

#[test]
fn snapshot_of_test_mem_on_remote_memory_goes_on_in_a_new_process() {
    let memd = Memd::start(&["--capacity", "512M"]);
    let p = paths("snap-mem");
    let mut cmd = vnode_testguest(
        "256M",
        2,
        "test=mem bytes=96M pattern=random writes=50 passes=2 seed=11",
        &[
            "--mem-server",
            &memd.addr,
            "--local-mem",
            "24M",
            "--vnode-id",
            "4242",
        ],
    );
    let mut first = spawn_first(&mut cmd, &p);
    wait_for_line(&mut first, &p.serial1, r#""phase":"fill""#, DEADLINE);
    let info = snapshot_and_stop(&mut first, &p.api1, &p.file);
    assert_eq!(info.ram, "remote");
    assert!(
        info.bytes < 1 << 20,
        "no guest RAM in the file: {} bytes",
        info.bytes
    );
    // The region stayed on the server for the restore.
    let mut c = MemClient::connect(&memd.addr, &auth(4242)).expect("connect");
    assert_eq!(
        c.open_region(0, 0).expect("region kept"),
        (256 << 20) / 4096
    );
    drop(c);

    restore_ok(&p);
    assert_continues(&read(&p.serial1), &read(&p.serial2), r#""phase":"fill""#);
    // The restored vnode frees guest RAM when the guest ends.
    let mut c = MemClient::connect(&memd.addr, &auth(4242)).expect("connect");
    let err = c.open_region(0, 0).expect_err("freed at the end");
    assert_eq!(err.code(), Some(ErrorCode::NoRegion), "{err}");
}

#[test]
fn snapshot_of_test_blk_on_vnode_blkd_goes_on_in_a_new_process() {
    let memd = Memd::start(&["--capacity", "512M"]);
    let p = paths("snap-blk");
    let export_file = p._dir.path("export.img");
    let blkd = start_blkd(&["--export", &format!("disk={}:64M", export_file.display())]);
    let uri = blkd.uri("disk");
    let mut cmd = vnode_testguest(
        "128M",
        1,
        "test=blk sectors=131072 pattern=random seed=5",
        &[
            "--mem-server",
            &memd.addr,
            "--local-mem",
            "64M",
            "--vnode-id",
            "4343",
            "--disk",
            &uri,
        ],
    );
    let mut first = spawn_first(&mut cmd, &p);
    wait_for_line(&mut first, &p.serial1, BANNER, DEADLINE);
    // Land in the middle of the writes, with requests in flight.
    std::thread::sleep(Duration::from_millis(300));
    snapshot_and_stop(&mut first, &p.api1, &p.file);
    restore_ok(&p);
    let second = read(&p.serial2);
    assert_continues(&read(&p.serial1), &second, BANNER);
    let report = second
        .lines()
        .find(|l| l.contains(r#""test":"blk""#))
        .expect("blk report");
    assert!(report.contains(r#""io_errors":0"#), "{report}");
    assert!(report.contains(r#""errors":0"#), "{report}");
}

/// `vnodectl vm ... ARGS -o json`, parsed.
fn vnodectl_json(socket: &Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new(bin("vnodectl"))
        .arg("vm")
        .arg("--api-socket")
        .arg(socket)
        .args(["-o", "json"])
        .args(args)
        .output()
        .expect("run vnodectl");
    assert!(
        out.status.success(),
        "vnodectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("vnodectl -o json prints JSON")
}

/// Local RAM, driven through vnodectl: `snapshot FILE`, `stop`, then `restore FILE` (which
/// starts the new vnode in the background and returns once its API answers).
#[test]
fn snapshot_with_local_ram_goes_on_in_a_new_process() {
    let p = paths("snap-local");
    let mut cmd = vnode_testguest(
        "128M",
        1,
        "test=mem bytes=64M pattern=random writes=50 passes=12 seed=3",
        &[],
    );
    let mut first = spawn_first(&mut cmd, &p);
    wait_for_line(&mut first, &p.serial1, r#""phase":"fill""#, DEADLINE);
    client(&p.api1);
    let info = vnodectl_json(&p.api1, &["snapshot", p.file.to_str().unwrap()]);
    eprintln!("snapshot through vnodectl: {info}");
    assert_eq!(info["ram"], "local");
    let bytes = info["bytes"].as_u64().expect("bytes");
    assert!(
        bytes > 64 << 20,
        "the guest's written RAM is in the file: {bytes} bytes"
    );
    assert!(bytes < 128 << 20, "zero pages are not: {bytes} bytes");
    vnodectl_json(&p.api1, &["stop"]);
    wait_deadline(&mut first, DEADLINE);

    let info = vnodectl_json(
        &p.api2,
        &[
            "restore",
            p.file.to_str().unwrap(),
            "--serial",
            p.serial2.to_str().unwrap(),
        ],
    );
    assert_eq!(info["state"], "running", "{info}");
    let restored = Client::new(&p.api2).expect("client");
    assert!(
        restored.wait_gone(DEADLINE),
        "the restored guest ends; serial:\n{}",
        read(&p.serial2)
    );
    assert_continues(&read(&p.serial1), &read(&p.serial2), r#""phase":"fill""#);
}

/// Runs `vnode restore` on `file`, expecting a refusal whose one-line error contains `want`,
/// and that it created nothing (no serial file, no API socket).
fn refused(file: &Path, dir: &TempDir, want: &str) {
    let serial = dir.path("refused-serial");
    let socket = dir.path("refused.sock");
    let out = restore_cmd(file, &serial, Some(&socket))
        .output()
        .expect("run vnode restore");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "refused: {err}");
    assert!(err.contains(want), "error mentions {want:?}: {err}");
    assert!(!serial.exists(), "nothing created before the check: {err}");
    assert!(!socket.exists(), "no API socket: {err}");
}

#[test]
fn damaged_or_foreign_snapshots_are_refused_and_a_lost_region_names_its_server() {
    let memd = Memd::start(&["--capacity", "512M"]);
    let p = paths("snap-bad");
    let mut cmd = vnode_testguest(
        "128M",
        1,
        "test=mem bytes=64M pattern=seq writes=50 passes=50 seed=2",
        &[
            "--mem-server",
            &memd.addr,
            "--local-mem",
            "16M",
            "--vnode-id",
            "4444",
        ],
    );
    let mut first = spawn_first(&mut cmd, &p);
    wait_for_line(&mut first, &p.serial1, r#""phase":"fill""#, DEADLINE);
    snapshot_and_stop(&mut first, &p.api1, &p.file);
    let good = std::fs::read(&p.file).expect("snapshot");
    let bad = p._dir.path("bad.snap");

    std::fs::write(&bad, &good[..good.len() / 2]).unwrap();
    refused(&bad, &p._dir, "snapshot is");
    let mut flipped = good.clone();
    flipped[good.len() / 2] ^= 0x40;
    std::fs::write(&bad, &flipped).unwrap();
    refused(&bad, &p._dir, "snapshot is corrupted");
    let mut newer = good.clone();
    newer[8] = 99;
    std::fs::write(&bad, &newer).unwrap();
    refused(&bad, &p._dir, "snapshot format version 99");
    std::fs::write(&bad, b"#!/bin/sh\necho not a snapshot\n").unwrap();
    refused(&bad, &p._dir, "not a vNode snapshot");

    // None of that touched the server: the region is there, intact.
    let mut c = MemClient::connect(&memd.addr, &auth(4444)).expect("connect");
    c.open_region(0, 0).expect("region still there");
    // Now lose it: the restore names the server it asked.
    c.free_region(0).expect("free");
    refused(&p.file, &p._dir, &memd.addr);
    refused(&p.file, &p._dir, "no region");
}
