//! The memory fail-over scenario shared by the fail-over tests (failover_mem.rs over loopback,
//! failover_net.rs across network namespaces): a write-heavy test guest on replicated guest
//! RAM, a fault mid-run, and what the guest and the stats must show afterwards.

use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::{Memd, SECRET_STR};
use vnode_tests::{vnode_testguest, wait_deadline, Finished};

pub const DEADLINE: Duration = Duration::from_secs(600);
/// Kill or stop to fail-over recorded: the client's deadline (500 ms here) plus the time until
/// the next request to that server, with room for a loaded machine.
pub const FAILOVER_BOUND_MS: u64 = 3000;

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after the epoch")
        .as_millis() as u64
}

/// Runs a write-heavy guest on `servers`; once its fill phase has pushed pages out, calls `act`
/// and notes when. Returns how vnode ended and the time of `act` (ms since the epoch).
pub fn run_and_act(servers: &str, act: impl FnOnce()) -> (Finished, u64) {
    let cmdline = "test=mem bytes=96M pattern=random seed=9 writes=70 passes=1";
    // Unique per call: tests run in parallel in one process and may start in the same ms.
    static RUN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let log = std::env::temp_dir().join(format!(
        "vnode-failover-{}-{}-{}.out",
        std::process::id(),
        RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        now_ms()
    ));
    let mut cmd = vnode_testguest(
        "128M",
        1,
        cmdline,
        &[
            "--mem-server",
            servers,
            "--local-mem",
            "12M",
            "--serial",
            log.to_str().expect("utf-8 path"),
            "--stats",
        ],
    );
    cmd.env("VNODE_SECRET", SECRET_STR);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vnode");
    let start = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("\"phase\":\"fill\"")
    {
        assert!(start.elapsed() < DEADLINE, "guest never finished its fill");
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "vnode exited early"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let at = now_ms();
    act();
    let status = wait_deadline(&mut child, DEADLINE);
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("read stderr");
    let stdout = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    (
        Finished {
            status,
            stdout,
            stderr,
        },
        at,
    )
}

pub fn excache_stats(f: &Finished) -> serde_json::Value {
    let line = f
        .stderr
        .lines()
        .rev()
        .find(|l| l.starts_with('{') && l.contains("\"excache\""))
        .unwrap_or_else(|| panic!("no stats line on stderr:\n{}", f.stderr));
    serde_json::from_str::<serde_json::Value>(line).expect("stats JSON")["excache"].clone()
}

/// The guest verified everything; the stats show `failed_role` failed and the other healthy,
/// one fail-over, recorded within the bound after `at`.
pub fn check_survived(f: &Finished, at: u64, failed: &Memd, survivor: &Memd, failed_role: &str) {
    let done = f
        .last_with("done")
        .unwrap_or_else(|| panic!("no done line:\n{}\n{}", f.stdout, f.stderr));
    assert_eq!(done["ok"], true, "{}\n{}", f.stdout, f.stderr);
    assert_eq!(f.status.code(), Some(0), "{}", f.stderr);
    let report = f.last_with("test").expect("test report");
    assert_eq!(report["errors"], 0);
    let s = excache_stats(f);
    assert!(
        s["writebacks"].as_u64().unwrap() > 10_000,
        "pages went out: {s}"
    );
    assert!(
        s["fetched"].as_u64().unwrap() > 10_000,
        "and came back: {s}"
    );
    let r = &s["replication"];
    assert_eq!(r["state"], "degraded", "{r}");
    assert_eq!(r["failovers"], 1, "{r}");
    let replicas = r["replicas"].as_array().expect("replicas");
    let by_role = |role: &str| {
        replicas
            .iter()
            .find(|x| x["role"] == role)
            .unwrap_or_else(|| panic!("no {role}: {r}"))
            .clone()
    };
    let other = if failed_role == "primary" {
        "backup"
    } else {
        "primary"
    };
    assert_eq!(by_role(failed_role)["state"], "failed", "{r}");
    assert_eq!(by_role(failed_role)["server"], failed.addr.as_str(), "{r}");
    assert_eq!(by_role(other)["state"], "healthy", "{r}");
    assert_eq!(by_role(other)["server"], survivor.addr.as_str(), "{r}");
    let since = r["degraded_since_unix_ms"]
        .as_u64()
        .expect("degraded since");
    assert!(
        since >= at && since - at < FAILOVER_BOUND_MS,
        "fail-over {} ms after the fault: {r}",
        since.saturating_sub(at)
    );
    assert!(r["degraded_ms"].as_u64().unwrap() > 0, "{r}");
}
