//! Faults across a real network path: each server in its own network namespace (veth pairs on
//! a bridge, `vnodectl up`'s set-up; vnode in the root namespace reaches them through the
//! bridge), and a *partition* made with nftables inside a server's namespace mid-run: every
//! packet in and out dropped, never rejected, so the server looks hung (no reset, no ICMP)
//! and only the deadlines can tell. Replicated guest RAM and a replicated disk fail over to the
//! other server within the deadline and the guest ends `ok:true`; an unreplicated disk gives
//! the guest I/O errors, never a hang.

mod blk_common;
mod mem_support;

use blk_common::failover::{
    check_blk_failover, check_io_error_not_hang, disk_files, export, run_blk_and_act,
};
use blk_common::{start_blkd_in, TempDir};
use mem_support::failover::{check_survived, run_and_act};
use mem_support::Memd;
use vnode_tests::netns::Net;

#[test]
fn failover_net_mem_primary_partitioned() {
    let net = Net::new("fnm", 2);
    let primary = Memd::start_in(&net, 1, &["--capacity", "1G"]);
    let backup = Memd::start_in(&net, 2, &["--capacity", "1G"]);
    let servers = format!("{},{}", primary.addr, backup.addr);
    let (f, at) = run_and_act(&servers, || net.partition(1));
    check_survived(&f, at, &primary, &backup, "primary");
    assert!(
        f.stderr.contains("deadline"),
        "a partitioned server misses its deadline: {}",
        f.stderr
    );
}

#[test]
fn failover_net_blk_primary_partitioned() {
    let net = Net::new("fnb", 2);
    let dir = TempDir::new("failover-net-blk");
    let (pf, bf) = disk_files(&dir);
    let primary = start_blkd_in(&net, 1, &["--export", &export(&pf)]);
    let backup = start_blkd_in(&net, 2, &["--export", &export(&bf)]);
    let disk = format!("{},backup={}", primary.uri("disk"), backup.uri("disk"));
    let (f, at) = run_blk_and_act(&disk, &pf, || net.partition(1));
    check_blk_failover(&f, at, &bf);
}

#[test]
fn failover_net_blk_unreplicated_partition_is_an_io_error_not_a_hang() {
    let net = Net::new("fnu", 1);
    let dir = TempDir::new("failover-net-blk-single");
    let (pf, _) = disk_files(&dir);
    let server = start_blkd_in(&net, 1, &["--export", &export(&pf)]);
    let (f, at) = run_blk_and_act(&server.uri("disk"), &pf, || net.partition(1));
    check_io_error_not_hang(&f, at);
}
