//! Interop: real NBD tools (qemu-img, qemu-io, nbdinfo, nbdcopy, fio's nbd engine) against
//! `vnode-blkd`, checking that data read back equals data written.

mod blk_common;

use std::process::Command;

use blk_common::{have_tool, pattern, run, start_blkd, TempDir};

#[test]
fn qemu_img_info_reports_export_size() {
    if !have_tool("qemu-img") {
        return;
    }
    let dir = TempDir::new("blk-qemu-img");
    let img = dir.path("d.img");
    let srv = start_blkd(&["--export", &format!("disk={}:48M", img.display())]);
    let out = run(Command::new("qemu-img").args(["info", "--output=json", &srv.uri("disk")]));
    let v: serde_json::Value = serde_json::from_str(&out).expect("qemu-img json");
    assert_eq!(v["virtual-size"], 48 << 20, "{out}");
    assert_eq!(v["format"], "raw");
}

#[test]
fn qemu_io_write_read_verify_patterns() {
    if !have_tool("qemu-io") {
        return;
    }
    let dir = TempDir::new("blk-qemu-io");
    let img = dir.path("d.img");
    let srv = start_blkd(&["--export", &format!("disk={}:16M", img.display())]);
    let uri = srv.uri("disk");
    // Writes with distinct patterns (one with FUA), zeroes and a discard, then reads that
    // verify every range in a second qemu-io process (so nothing is served from its cache).
    run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0xa5 0 1M",
        "-c",
        "write -P 0x5a 1M 64k",
        "-c",
        "write -f -P 0x11 4M 4k",
        "-c",
        "write -P 0x77 8M 512",
        "-c",
        "write -z 2M 128k",
        "-c",
        "write -P 0x33 3M 64k",
        "-c",
        "discard 3M 64k",
        "-c",
        "flush",
        &uri,
    ]));
    let out = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-r",
        "-c",
        "read -P 0xa5 0 1M",
        "-c",
        "read -P 0x5a 1M 64k",
        "-c",
        "read -P 0x11 4M 4k",
        "-c",
        "read -P 0x77 8M 512",
        "-c",
        "read -P 0 8389120 4k",
        "-c",
        "read -P 0 2M 128k",
        "-c",
        "read -P 0 15M 1M",
        &uri,
    ]));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert_eq!(out.matches("read ").count(), 7, "{out}");
    // The backing file holds the same bytes.
    let file = std::fs::read(&img).expect("read backing file");
    assert!(file[..1 << 20].iter().all(|&b| b == 0xa5));
    assert!(file[4 << 20..(4 << 20) + 4096].iter().all(|&b| b == 0x11));
}

#[test]
fn nbdinfo_lists_all_exports() {
    if !have_tool("nbdinfo") {
        return;
    }
    let dir = TempDir::new("blk-nbdinfo");
    let srv = start_blkd(&[
        "--export",
        &format!("alpha={}:1M", dir.path("a.img").display()),
        "--export",
        &format!("beta={}:2M", dir.path("b.img").display()),
    ]);
    let out = run(Command::new("nbdinfo").args(["--list", "--json", &srv.uri("")]));
    let v: serde_json::Value = serde_json::from_str(&out).expect("nbdinfo json");
    let exports = v["exports"].as_array().expect("exports array");
    let names: Vec<_> = exports.iter().map(|e| e["export-name"].as_str()).collect();
    assert_eq!(names, [Some("alpha"), Some("beta")], "{out}");
    assert_eq!(exports[1]["export-size"], 2 << 20);
    assert_eq!(exports[0]["can_flush"], true);
    assert_eq!(exports[0]["can_fua"], true);
}

#[test]
fn nbdinfo_over_unix_socket() {
    if !have_tool("nbdinfo") {
        return;
    }
    let dir = TempDir::new("blk-unix");
    let sock = dir.path("blkd.sock");
    let srv = start_blkd(&[
        "--socket",
        sock.to_str().expect("utf-8 path"),
        "--export",
        &format!("disk={}:3M", dir.path("d.img").display()),
    ]);
    let out = run(Command::new("nbdinfo").args(["--size", &srv.uri("disk")]));
    assert_eq!(out.trim(), (3u64 << 20).to_string());
}

#[test]
fn nbdcopy_round_trips_a_file() {
    if !have_tool("nbdcopy") {
        return;
    }
    let dir = TempDir::new("blk-nbdcopy");
    let src = dir.path("src.raw");
    let back = dir.path("back.raw");
    let data = pattern(42, 24 << 20);
    std::fs::write(&src, &data).expect("write source");
    let img = dir.path("d.img");
    // Large reads take the sendfile path here (structured replies, as libnbd negotiates).
    let srv = start_blkd(&[
        "--sendfile-min",
        "64K",
        "--export",
        &format!("disk={}:24M", img.display()),
    ]);
    let uri = srv.uri("disk");
    run(Command::new("nbdcopy").args(["--flush", src.to_str().expect("utf-8"), &uri]));
    assert!(
        std::fs::read(&img).expect("backing file") == data,
        "backing file differs"
    );
    run(Command::new("nbdcopy").args([&uri, back.to_str().expect("utf-8")]));
    assert!(
        std::fs::read(&back).expect("copy") == data,
        "copied-back data differs"
    );
}

#[test]
fn fio_nbd_engine_verify_crc32c() {
    if !have_tool("fio") {
        return;
    }
    let dir = TempDir::new("blk-fio");
    let img = dir.path("d.img");
    let srv = start_blkd(&["--export", &format!("disk={}:32M", img.display())]);
    let out = run(Command::new("fio").args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={}", srv.uri("disk")),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--size=32M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--output-format=json",
    ]));
    let v: serde_json::Value =
        serde_json::from_str(&out[out.find('{').expect("fio json")..]).expect("fio json");
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "{out}");
    // Every block was written and then read back and checked.
    assert_eq!(job["write"]["io_bytes"], 32 << 20, "{out}");
    assert_eq!(job["read"]["io_bytes"], 32 << 20, "{out}");
}
