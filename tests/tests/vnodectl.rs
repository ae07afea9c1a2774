//! `vnodectl bench` with real processes, no sandbox: its error paths with the real `vnode` (a
//! missing kernel, a vnode that cannot build the VM, a guest that never prints the console
//! protocol), and its serving flow (READY -> host load -> "stop" on vnode's stdin -> results)
//! against a real memcached, with a stand-in for `vnode` that speaks the guest's console protocol
//! (a stock Linux guest boots far too slowly on this PVM host; the sandbox test covers that).

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vnode_tests::{bin, guest_image, run_with_deadline, Finished};

fn vnodectl(args: &[&str]) -> Finished {
    let mut c = Command::new(bin("vnodectl"));
    c.args(args);
    run_with_deadline(&mut c, Duration::from_secs(120))
}

/// `vnodectl bench BENCH_ARGS -- --kernel testguest.elf --mem 64M VNODE_ARGS`.
fn bench_testguest(bench_args: &[&str], vnode_args: &[&str]) -> Finished {
    let tg = guest_image("testguest.elf");
    let mut args = vec!["bench"];
    args.extend_from_slice(bench_args);
    args.extend_from_slice(&["--", "--kernel", tg.to_str().unwrap(), "--mem", "64M"]);
    args.extend_from_slice(vnode_args);
    vnodectl(&args)
}

fn doc(f: &Finished) -> serde_json::Value {
    serde_json::from_str(&f.stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}):\n{}", f.stdout))
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vnodectl-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn a_missing_kernel_is_a_clear_error() {
    let f = vnodectl(&["bench", "fio", "--", "--kernel", "/no/such/vmlinux"]);
    assert_eq!(f.status.code(), Some(251), "{}", f.stderr);
    assert!(
        f.stderr
            .contains("vnodectl: error: kernel /no/such/vmlinux does not exist"),
        "{}",
        f.stderr
    );
    assert!(f.stdout.is_empty(), "{}", f.stdout);
}

#[test]
fn vnode_failing_to_build_the_vm_is_reported() {
    let f = bench_testguest(&["fio"], &["--disk", "/no/such/disk.img"]);
    assert_eq!(f.status.code(), Some(252), "{}", f.stderr);
    assert!(
        f.stderr
            .contains("vnodectl: error: vnode failed: vnode: error:"),
        "{}",
        f.stderr
    );
    let d = doc(&f);
    assert_eq!(d["vnodectl"]["ok"], false);
    assert_eq!(d["vnodectl"]["vnode_exit"], 251, "vnode could not set up");
}

#[test]
fn a_guest_that_never_prints_the_protocol_is_a_clear_error() {
    let f = bench_testguest(
        &["fio-randread", "--runtime", "5"],
        &["--cmdline", "test=cpu"],
    );
    assert_eq!(f.status.code(), Some(252), "{}", f.stderr);
    assert!(
        f.stderr.contains("no VNODE-JSON block on the console"),
        "{}",
        f.stderr
    );
    // the test guest's own last lines are quoted
    assert!(f.stderr.contains("\"test\":\"cpu\""), "{}", f.stderr);
    let d = doc(&f);
    assert_eq!(d["vnodectl"]["ok"], false);
    // the job went onto the guest's command line, and --stats was added: vnode's counters are in
    let args: Vec<String> = serde_json::from_value(d["vnodectl"]["vnode_args"].clone()).unwrap();
    assert!(
        args.contains(&"test=cpu vnode.job=fio-randread vnode.fio_runtime=5".to_owned()),
        "{args:?}"
    );
    assert!(args.contains(&"--stats".to_owned()), "{args:?}");
    assert!(
        d["vnode_stats"]["vmm"]["exits_pio"].as_u64().unwrap_or(0) > 0,
        "{}",
        d["vnode_stats"]
    );
    assert_eq!(d["guest"], serde_json::json!([]));
}

/// A stand-in for `vnode` that prints what our guest's init prints for a job: $FAKE_MODE
/// `serve` (READY with $FAKE_PORT, then waits for "stop" on stdin) or `fail` (a job error).
/// It records its arguments in $FAKE_ARGS.
const FAKE_VNODE: &str = r#"#!/bin/bash
printf '%s\n' "$@" > "$FAKE_ARGS"
echo "[    0.000000] Linux version 6.1.0-56-cloud-amd64"
echo "VNODE-INITRAMFS-UP uptime=1.25 kernel=6.1.0 cpus=1"
echo "VNODE-INIT-UP uptime=2.50 kernel=6.1.0 cpus=1 job=x"
echo "VNODE-JSON-BEGIN"
if [ "$FAKE_MODE" = fail ]; then
    echo '{"job":"fio-randread","rc":1,"target":"/dev/vdb","error":"no such block device /dev/vdb"}'
    echo '{"job":"summary","rc":1}'
    echo "VNODE-JSON-END"; echo "VNODE-EXIT rc=1"; exit 0
fi
echo "{\"job\":\"memcached-serve\",\"ready\":true,\"ip\":\"127.0.0.1\",\"port\":$FAKE_PORT}"
got=timeout
while read -r -t 60 line; do [ "${line%$'\r'}" = stop ] && { got=stop; break; }; done
echo "{\"job\":\"memcached-serve\",\"ended\":\"$got\"}"
echo "{\"job\":\"summary\",\"rc\":0}"
echo "VNODE-JSON-END"
echo "VNODE-EXIT rc=0"
echo '{"vmm":{"exits_pio":1},"excache":null}' >&2
"#;

fn fake_vnode(dir: &Path) -> PathBuf {
    let p = dir.join("fake-vnode");
    std::fs::write(&p, FAKE_VNODE).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

struct Memcached(Child);

impl Drop for Memcached {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A real memcached on a free loopback port (Debian's memcached; .ci/run installs it).
fn memcached() -> (Memcached, u16) {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("memcached")
        .args(["-u", "root", "-l", "127.0.0.1", "-U", "0", "-m", "64", "-p"])
        .arg(port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("memcached is not installed: apt-get install memcached (.ci/run does)");
    let m = Memcached(child);
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "memcached did not listen"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (m, port)
}

/// memcached's own counters.
fn stats(port: u16) -> std::collections::HashMap<String, u64> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"stats\r\n").unwrap();
    let mut out = std::collections::HashMap::new();
    for l in BufReader::new(s).lines() {
        let l = l.unwrap();
        if l.starts_with("END") {
            break;
        }
        let w: Vec<&str> = l.split_whitespace().collect();
        if let (Some(k), Some(Ok(v))) = (w.get(1), w.get(2).map(|v| v.parse())) {
            out.insert((*k).to_owned(), v);
        }
    }
    out
}

#[test]
fn memcached_flow_ready_load_stop_against_a_real_memcached() {
    let dir = scratch("serve");
    let fake = fake_vnode(&dir);
    let (_mc, port) = memcached();
    let argfile = dir.join("args");
    let json_out = dir.join("out.json");
    let console = dir.join("console.log");
    let mut c = Command::new(bin("vnodectl"));
    c.env("FAKE_MODE", "serve")
        .env("FAKE_PORT", port.to_string())
        .env("FAKE_ARGS", &argfile)
        .args(["bench", "memtier", "--client", "builtin", "--runtime", "2"])
        .args([
            "--connections",
            "4",
            "--keys",
            "200",
            "--guest-ip",
            "127.0.0.1",
        ])
        .arg("--vnode")
        .arg(&fake)
        .arg("--json-out")
        .arg(&json_out)
        .arg("--console-log")
        .arg(&console)
        .args(["--", "--kernel"])
        .arg(&fake)
        .args(["--mem", "1G"]);
    let f = run_with_deadline(&mut c, Duration::from_secs(60));
    assert_eq!(f.status.code(), Some(0), "{}\n{}", f.stderr, f.stdout);
    let d = doc(&f);
    assert_eq!(
        d,
        serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(&json_out).unwrap())
            .unwrap()
    );
    assert_eq!(d["vnodectl"]["ok"], true, "{d}");
    // the load ran and every value read back was the one written
    let load = &d["load"];
    assert_eq!(load["client"], "builtin", "{load}");
    assert_eq!(load["mismatches"], 0, "{load}");
    assert_eq!(load["verified"], true, "{load}");
    let (sets, hits) = (
        load["sets"].as_u64().unwrap(),
        load["hits"].as_u64().unwrap(),
    );
    assert!(sets > 0 && hits > 0, "{load}");
    // memcached saw that load
    let st = stats(port);
    assert!(st["cmd_set"] >= sets, "{st:?} vs {load}");
    assert!(st["get_hits"] >= hits, "{st:?} vs {load}");
    // the guest got "stop" on its console (vnode's stdin) and finished
    assert!(
        d["guest"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["ended"] == "stop"),
        "{d}"
    );
    assert_eq!(d["boot"]["init_up_uptime_s"], 2.5);
    assert_eq!(d["vnode_stats"]["vmm"]["exits_pio"], 1);
    let args = std::fs::read_to_string(&argfile).unwrap();
    assert!(
        args.contains(
            "console=ttyS0 quiet panic=-1 vnode.job=memcached-serve vnode.ip=127.0.0.1/24"
        ),
        "{args}"
    );
    let log = std::fs::read_to_string(&console).unwrap();
    assert!(log.contains("ms] VNODE-INIT-UP uptime=2.50"), "{log}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_failed_guest_job_fails_vnodectl() {
    let dir = scratch("fail");
    let fake = fake_vnode(&dir);
    let mut c = Command::new(bin("vnodectl"));
    c.env("FAKE_MODE", "fail")
        .env("FAKE_ARGS", dir.join("args"))
        .args(["bench", "fio", "--vnode"])
        .arg(&fake)
        .args(["--", "--kernel"])
        .arg(&fake);
    let f = run_with_deadline(&mut c, Duration::from_secs(60));
    assert_eq!(f.status.code(), Some(252), "{}", f.stderr);
    assert!(
        f.stderr.contains(
            "the guest job reported an error: {\"error\":\"no such block device /dev/vdb\""
        ),
        "{}",
        f.stderr
    );
    let d = doc(&f);
    assert_eq!(d["guest"][0]["rc"], 1);
    let _ = std::fs::remove_dir_all(&dir);
}
