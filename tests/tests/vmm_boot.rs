//! The VMM core against real KVM: the test guest's memory workload on 1 and 2 vCPUs, corruption
//! caught by verification, every bad input refused with one clear line, and Debian's unmodified
//! cloud kernel printing its banner and our e820 map.

use std::process::Command;
use std::time::Duration;

use vnode_tests::{
    bin, boot_linux_until, guest_image, run_with_deadline, vnode_testguest, Finished,
};

const DEADLINE: Duration = Duration::from_secs(300);

fn assert_ok(f: &Finished) -> serde_json::Value {
    let done = f
        .last_with("done")
        .unwrap_or_else(|| panic!("no done line; stdout:\n{}\nstderr:\n{}", f.stdout, f.stderr));
    assert_eq!(
        done["ok"], true,
        "guest reported failure: {}\n{}",
        f.stdout, f.stderr
    );
    assert_eq!(f.status.code(), Some(0), "stderr: {}", f.stderr);
    f.last_with("test").expect("report line")
}

fn mem_run(vcpus: u32) {
    let cmdline = "test=mem bytes=900M pattern=random seed=7 writes=50 passes=1";
    let f = run_with_deadline(&mut vnode_testguest("1G", vcpus, cmdline, &[]), DEADLINE);
    let report = assert_ok(&f);
    assert_eq!(report["errors"], 0);
    assert_eq!(report["vcpus"], vcpus);
    assert_eq!(report["pages"], 900 * 256);
    assert!(report["writes"].as_u64().unwrap() > 50_000, "{report}");
    assert!(report["reads"].as_u64().unwrap() > 50_000, "{report}");
}

#[test]
fn mem_workload_one_vcpu() {
    mem_run(1);
}

#[test]
fn mem_workload_two_vcpus() {
    mem_run(2);
}

#[test]
fn preallocated_ram_runs_the_workload_and_is_refused_with_remote_memory() {
    let cmdline = "test=mem bytes=128M pattern=seq seed=5 writes=50 passes=1";
    let f = run_with_deadline(
        &mut vnode_testguest("256M", 2, cmdline, &["--mem-prealloc"]),
        DEADLINE,
    );
    assert_eq!(assert_ok(&f)["errors"], 0);
    // The ExCache decides what is resident: preallocating that RAM would defeat it.
    let tg = guest_image("testguest.elf");
    let mut c = Command::new(bin("vnode"));
    c.args(["run", "--kernel", tg.to_str().unwrap(), "--mem-prealloc"])
        .args(["--mem-server", "local", "--local-mem", "64M"]);
    let f = run_with_deadline(&mut c, Duration::from_secs(60));
    assert_eq!(f.status.code(), Some(250), "a usage error: {}", f.stderr);
    assert!(f.stderr.contains("cannot be used with"), "{}", f.stderr);
}

#[test]
fn corruption_from_the_vmm_is_caught() {
    // writes=0: phase 2 only reads, so the byte flipped after the fill must be found.
    let cmdline = "test=mem bytes=256M pattern=zipf seed=3 writes=0 passes=1";
    let gpa = "0x9000123";
    let hook = format!("{gpa}@1");
    let f = run_with_deadline(
        &mut vnode_testguest("512M", 2, cmdline, &["--debug-corrupt", &hook]),
        DEADLINE,
    );
    let done = f.last_with("done").expect("done line");
    assert_eq!(done["ok"], false, "{}", f.stdout);
    assert_eq!(f.status.code(), Some(1));
    let report = f.last_with("test").expect("report");
    assert!(report["errors"].as_u64().unwrap() >= 1);
    let first = report["first_error_gpa"].as_u64().unwrap();
    assert_eq!(first & !7, 0x9000123 & !7, "{report}");
}

#[test]
fn cpu_workload_runs() {
    let f = run_with_deadline(
        &mut vnode_testguest("64M", 1, "test=cpu iters=1000000", &[]),
        DEADLINE,
    );
    let report = assert_ok(&f);
    assert_eq!(report["iters"], 1_000_000);
}

/// Runs `vnode` with `args` and expects failure with exit status 1 and one line naming `what`.
fn refused(args: &[&str], what: &str) {
    let mut c = Command::new(bin("vnode"));
    c.args(args);
    let f = run_with_deadline(&mut c, Duration::from_secs(60));
    assert_ne!(f.status.code(), Some(0), "accepted: {args:?}");
    let line = f
        .stderr
        .lines()
        .find(|l| l.contains("error"))
        .unwrap_or_else(|| panic!("no error line for {args:?}: {}", f.stderr));
    assert!(
        line.contains(what),
        "error for {args:?} should mention {what:?}: {line}"
    );
    assert_eq!(
        f.stderr.trim().lines().count(),
        1,
        "one clear line: {}",
        f.stderr
    );
}

#[test]
fn bad_inputs_are_refused_with_one_clear_line() {
    let tg = guest_image("testguest.elf");
    let tg = tg.to_str().unwrap();
    let dir = std::env::temp_dir().join(format!("vnode-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("not-a-kernel");
    std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
    let unreadable = dir.join("missing-kernel");

    refused(
        &["run", "--kernel", unreadable.to_str().unwrap()],
        "missing-kernel",
    );
    refused(
        &["run", "--kernel", script.to_str().unwrap()],
        "not an ELF or bzImage",
    );
    refused(&["run", "--kernel", dir.to_str().unwrap()], "cannot read");
    refused(&["run", "--kernel", tg, "--mem", "1M"], "too small");
    refused(
        &["run", "--kernel", tg, "--mem", "64T"],
        "larger than this host",
    );
    refused(&["run", "--kernel", tg, "--mem", "12Q"], "invalid size");
    refused(
        &["run", "--kernel", tg, "--vcpus", "0"],
        "--vcpus must be at least 1",
    );
    refused(
        &["run", "--kernel", tg, "--kvm-device", "/nonexistent/kvm"],
        "cannot open KVM device /nonexistent/kvm: No such file",
    );
    // A read-only sysfs attribute cannot be opened for writing, even by root: a KVM device
    // that is not writable looks the same.
    let ro = "/sys/kernel/mm/transparent_hugepage/hpage_pmd_size";
    refused(
        &["run", "--kernel", tg, "--kvm-device", ro],
        &format!("cannot open KVM device {ro}: Permission denied"),
    );
    // A writable file that is not KVM.
    let fake = dir.join("fake-kvm");
    std::fs::write(&fake, "").unwrap();
    refused(
        &[
            "run",
            "--kernel",
            tg,
            "--kvm-device",
            fake.to_str().unwrap(),
        ],
        "not a usable KVM device",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn guest_exit_status_is_vnodes_exit_status() {
    // A bad guest command line makes the test guest exit with status 2.
    let f = run_with_deadline(
        &mut vnode_testguest("64M", 1, "test=mem pattern=zigzag", &[]),
        DEADLINE,
    );
    assert_eq!(f.status.code(), Some(2), "{}", f.stdout);
}

/// Debian's linux-image-cloud-amd64, unmodified, loaded as the ELF vmlinux: its banner and the
/// e820 map vnode gave it appear on the serial console within 120 s, even on a PVM host where its
/// supervisor code is emulated.
#[test]
fn debian_cloud_kernel_prints_banner_and_e820() {
    let want = [
        "Linux version ",
        "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
        "BIOS-e820: [mem 0x000000000009fc00-0x000000000009ffff] reserved",
        "BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable",
    ];
    let seen = boot_linux_until(1, &want, Duration::from_secs(120));
    assert!(seen.contains("Debian"), "not the Debian kernel:\n{seen}");
}
