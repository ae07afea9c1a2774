//! The whole cluster, end to end, with real processes: `vnodectl up --hosts 3` (a manager in the
//! root namespace, the compute agent on host 1, memory and storage servers on hosts 2 and 3, each
//! host a network namespace on a bridge), two vNodes running the test guest (`test=mem` with an
//! ExCache smaller than its working set, `test=blk` on a remote disk), their stats, a `kill -9`
//! of the manager, and deletion returning every server's usage to zero. Also: a killed VMM's
//! region is reclaimed, and a restarted agent finds its running vNode again.

mod manager_support;

use std::time::Duration;

use manager_support::*;
use serde_json::Value;

fn guest() -> String {
    vnode_tests::guest_image("testguest.elf")
        .display()
        .to_string()
}

fn host_ip(hosts: &Value, id: &str) -> String {
    let h = hosts
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["id"] == id)
        .unwrap();
    h["addr"]
        .as_str()
        .unwrap()
        .split(':')
        .next()
        .unwrap()
        .to_owned()
}

fn ended_ok(c: &Cluster, name: &str) -> Value {
    let v = wait_for(&format!("{name} to end"), Duration::from_secs(180), || {
        let v = c.vnode(name);
        (v["state"] == "exited" || v["state"] == "failed").then_some(v)
    });
    let console = std::fs::read_to_string(v["console"].as_str().unwrap()).unwrap_or_default();
    assert_eq!(v["exit_code"], 0, "{v}\nconsole:\n{console}");
    assert!(
        console.contains("\"ok\":true"),
        "console of {name}:\n{console}"
    );
    v
}

fn usage_zero(hosts: &Value) -> bool {
    hosts.as_array().unwrap().iter().all(|h| {
        let a = &h["allocated"];
        h["used"].as_u64().unwrap_or(0) == 0 && a["mem"] == 0 && a["disk"] == 0 && a["vcpus"] == 0
    })
}

#[test]
fn three_hosts_two_vnodes_manager_restart_and_cleanup() {
    let c = Cluster::up(
        "mgr-e2e",
        &[
            "--hosts",
            "3",
            "--mem-capacity",
            "1G",
            "--disk-capacity",
            "1G",
        ],
    );
    let d = c.d();
    let g = guest();
    vnodectl(&[
        "create",
        "--dir",
        &d,
        "--name",
        "memv",
        "--mem",
        "160M",
        "--local-mem",
        "24M",
        "--kernel",
        &g,
        "--cmdline",
        "test=mem bytes=128M pattern=random seed=3 writes=50 passes=4",
    ]);
    vnodectl(&[
        "create",
        "--dir",
        &d,
        "--name",
        "blkv",
        "--mem",
        "64M",
        "--local-mem",
        "64M",
        "--disk-size",
        "32M",
        "--kernel",
        &g,
        "--cmdline",
        "test=blk sectors=16384 pattern=random seed=4",
    ]);
    let hosts = vnodectl_json(&["hosts", "--dir", &d]);
    let compute_ip = host_ip(&hosts, "compute1");
    for v in ["memv", "blkv"] {
        let v = c.vnode(v);
        let r = &v["placement"]["regions"][0];
        assert_ne!(r["primary"], r["backup"]);
        for m in [&r["primary"], &r["backup"]] {
            assert_ne!(
                host_ip(&hosts, m.as_str().unwrap()),
                compute_ip,
                "memory in another namespace"
            );
        }
    }
    let disk = c.vnode("blkv")["placement"]["disk"]["storage"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(
        host_ip(&hosts, &disk),
        compute_ip,
        "the disk in another namespace"
    );
    // While memv runs: its ExCache figures and the memory servers' usage.
    let stats = wait_for("ExCache figures of memv", Duration::from_secs(120), || {
        let s = vnodectl_json(&["stats", "--dir", &d]);
        let v = s["vnodes"]
            .as_array()?
            .iter()
            .find(|v| v["name"] == "memv")?
            .clone();
        let ex = &v["counters"]["excache"];
        (ex["evictions"].as_u64()? > 0 && ex["fetched"].as_u64()? > 0).then_some(s)
    });
    let used: u64 = stats["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["kind"] == "memory")
        .map(|h| h["used"].as_u64().unwrap_or(0))
        .sum();
    assert!(
        used >= 2 * (160 << 20),
        "both copies of memv's RAM are held: {used}"
    );
    let table = vnodectl(&["stats", "--dir", &d]);
    assert!(
        table.contains("memv") && table.contains("EVICTIONS") && table.contains("mem1"),
        "{table}"
    );
    ended_ok(&c, "memv");
    ended_ok(&c, "blkv");
    // kill -9 the manager; after its restart the list still shows both with their placement.
    let before = vnodectl_json(&["list", "--dir", &d]);
    c.restart("manager");
    let after = wait_for("the restarted manager", Duration::from_secs(20), || {
        let out = std::process::Command::new(vnode_tests::bin("vnodectl"))
            .args(["list", "--dir", &d, "-o", "json"])
            .output()
            .ok()?;
        serde_json::from_slice::<Value>(&out.stdout).ok()
    });
    assert_eq!(after.as_array().unwrap().len(), 2);
    for (a, b) in before
        .as_array()
        .unwrap()
        .iter()
        .zip(after.as_array().unwrap())
    {
        assert_eq!(a["placement"], b["placement"]);
        assert_eq!(a["state"], b["state"]);
    }
    vnodectl(&["delete", "--dir", &d, "memv"]);
    vnodectl(&["delete", "--dir", &d, "blkv"]);
    wait_for(
        "every server's usage back to zero",
        Duration::from_secs(30),
        || usage_zero(&vnodectl_json(&["hosts", "--dir", &d])).then_some(()),
    );
}

#[test]
fn killed_vmm_is_reclaimed_and_a_restarted_agent_finds_its_vnode() {
    let c = Cluster::up("mgr-reclaim", &["--mem-capacity", "512M"]);
    let d = c.d();
    let g = guest();
    let v = vnodectl_json(&[
        "create",
        "--dir",
        &d,
        "--name",
        "long",
        "--mem",
        "64M",
        "--local-mem",
        "16M",
        "--kernel",
        &g,
        "--cmdline",
        "test=mem bytes=48M pattern=random seed=9 writes=50 passes=255",
    ]);
    let id = v["id"].as_u64().unwrap();
    let vdir = c.dir.join(format!("compute1/vnodes/{id}"));
    let running = |c: &Cluster| {
        let v = c.vnode("long");
        (v["state"] == "running" && v["counters"]["excache"]["faults"].as_u64()? > 0).then_some(v)
    };
    wait_for("the vNode running", Duration::from_secs(60), || running(&c));
    let pid = std::fs::read_to_string(vdir.join("pid")).unwrap();
    // The agent restarts: it finds the vNode (same process) and keeps reporting its counters.
    c.restart("compute1");
    let before = c.vnode("long")["counters"]["excache"]["faults"]
        .as_u64()
        .unwrap();
    wait_for(
        "counters from the restarted agent",
        Duration::from_secs(30),
        || {
            let v = running(&c)?;
            (v["counters"]["excache"]["faults"].as_u64()? > before).then_some(())
        },
    );
    assert_eq!(
        std::fs::read_to_string(vdir.join("pid")).unwrap(),
        pid,
        "not started twice"
    );
    let held = |c: &Cluster| -> u64 {
        vnodectl_json(&["hosts", "--dir", &c.d()])
            .as_array()
            .unwrap()
            .iter()
            .filter(|h| h["kind"] == "memory")
            .map(|h| h["used"].as_u64().unwrap_or(0))
            .sum()
    };
    assert!(held(&c) >= 2 * (64 << 20));
    // kill -9 the VMM: the agent reports it, the manager releases it, the servers free it.
    let pid: i32 = pid.trim().parse().unwrap();
    // SAFETY: kill(2) has no memory effects; the pid is the vnode this test's cluster started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let v = wait_for("the kill reported", Duration::from_secs(20), || {
        let v = c.vnode("long");
        (v["state"] == "failed").then_some(v)
    });
    assert!(v["message"].as_str().unwrap().contains("signal 9"), "{v}");
    wait_for(
        "the killed VMM's regions freed",
        Duration::from_secs(20),
        || (held(&c) == 0).then_some(()),
    );
}
