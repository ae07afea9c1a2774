//! Guest RAM replicated on two real `vnode-memd` processes while one of them dies (`kill -9`)
//! or hangs (`kill -STOP`) in the middle of a write-heavy run whose working set is eight times
//! the ExCache (so pages really go out to the servers and come back): the guest verifies all of
//! its data and ends `ok:true`, and the stats show the fail-over (replica states, `failovers`,
//! `degraded_since_unix_ms`) within the deadline. Unreplicated, a hung server stops the VM
//! within seconds with an error naming it.

mod mem_support;

use mem_support::failover::{check_survived, now_ms, run_and_act};
use mem_support::Memd;

fn pair() -> (Memd, Memd, String) {
    let primary = Memd::start(&["--capacity", "1G"]);
    let backup = Memd::start(&["--capacity", "1G"]);
    let servers = format!("{},{}", primary.addr, backup.addr);
    (primary, backup, servers)
}

#[test]
fn failover_mem_primary_kill9() {
    let (mut primary, backup, servers) = pair();
    let (f, at) = run_and_act(&servers, || primary.kill9());
    check_survived(&f, at, &primary, &backup, "primary");
}

#[test]
fn failover_mem_primary_stop() {
    let (primary, backup, servers) = pair();
    let (f, at) = run_and_act(&servers, || primary.freeze());
    check_survived(&f, at, &primary, &backup, "primary");
    let failure = f.stderr.contains("deadline");
    assert!(failure, "a hung server misses its deadline: {}", f.stderr);
}

#[test]
fn failover_mem_backup_kill9() {
    let (primary, mut backup, servers) = pair();
    let (f, at) = run_and_act(&servers, || backup.kill9());
    check_survived(&f, at, &backup, &primary, "backup");
}

#[test]
fn failover_mem_backup_stop() {
    let (primary, backup, servers) = pair();
    let (f, at) = run_and_act(&servers, || backup.freeze());
    check_survived(&f, at, &backup, &primary, "backup");
}

#[test]
fn failover_mem_unreplicated_stop_stops_the_vm_naming_the_server() {
    let memd = Memd::start(&["--capacity", "1G"]);
    let (f, at) = run_and_act(&memd.addr, || memd.freeze());
    let took = now_ms() - at;
    // A fatal VM error at run time (252), never a guest status.
    assert_eq!(f.status.code(), Some(252), "{}\n{}", f.stdout, f.stderr);
    let err = f
        .stderr
        .lines()
        .find(|l| l.starts_with("vnode: error:"))
        .unwrap_or_else(|| panic!("no error line: {}", f.stderr));
    assert!(err.contains(&memd.addr), "names the server: {err}");
    assert!(err.contains("deadline"), "says why: {err}");
    assert!(!f.stdout.contains("\"ok\":true"), "{}", f.stdout);
    assert!(took < 10_000, "stopped {took} ms after the server hung");
}
